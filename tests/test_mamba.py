"""Mamba family: exact reconstruction against the real modules, and the views agree with dense()."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers as tf
from conftest import GPU_BOUND, OutputRecorder, capture_with_kernel, rel_err, requires_cuda
from hypothesis import given
from hypothesis import strategies as st

import captum_implicit as ci


def _randomize_free_terms(model: torch.nn.Module, seed: int) -> None:
    """Random init gives D = 1 and may leave conv biases at 0: make every term the formula needs non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv1d.bias") or name.endswith(".D") or name.endswith("dt_proj.bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _inputs(batch: int, length: int, vocab: int, pad: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and pad:
        mask[-1, : min(pad, length - 1)] = 0  # left padding on the last row
    return ids, mask


def _check_exact(model, ids, mask, bound: float) -> list[ci.LayerAttention]:
    with OutputRecorder(model) as rec:
        layers = ci.implicit_attention(model, ids, attention_mask=mask, use_cache=False)
    # hybrids (Jamba, Zamba) also list their softmax-attention layers; this file checks the Mamba ones
    layers = [la for la in layers if la.family == "mamba"]
    assert [la.name for la in layers] == list(rec.inputs)
    for la in layers:
        err = rel_err(la.output(), rec.inputs[la.name])
        assert err <= bound, f"{la.name}: relative error {err:.3g} > {bound}"
    return layers


mamba_configs = st.fixed_dictionaries(
    {
        "hidden_size": st.sampled_from([8, 16, 24]),
        "state_size": st.integers(1, 8),
        "conv_kernel": st.integers(1, 5),
        "expand": st.integers(1, 3),
        "time_step_rank": st.integers(1, 4),
        "use_conv_bias": st.booleans(),
        "num_hidden_layers": st.integers(1, 2),
    }
)


@given(
    cfg=mamba_configs,
    batch=st.integers(1, 3),
    length=st.integers(1, 48),
    pad=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_hf_mamba_float64_exact(cfg, batch, length, pad, seed):
    # float64: the HF torch scan casts B and u to float32 in its input term; the formulation mirrors
    # exactly that, so what remains is float64 rounding (~1e-15), far inside the 1e-10 bound.
    torch.manual_seed(seed)
    model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=32, **cfg)).double().eval()
    _randomize_free_terms(model, seed)
    ids, mask = _inputs(batch, length, 32, pad, seed)
    _check_exact(model, ids, mask, 1e-10)


@given(cfg=mamba_configs, length=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_hf_mamba_float32_exact(cfg, length, seed):
    torch.manual_seed(seed)
    model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=32, **cfg)).eval()
    _randomize_free_terms(model, seed)
    ids, mask = _inputs(2, length, 32, 3, seed)
    _check_exact(model, ids, mask, 1e-4)


def _falcon(seed):
    cfg = tf.FalconMambaConfig(hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=32)
    return tf.FalconMambaForCausalLM(cfg)


def _jamba(seed):
    return tf.JambaForCausalLM(
        tf.JambaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
            expert_layer_offset=1, mamba_d_state=4, vocab_size=32, experts_implementation="eager",
        )
    )


def _zamba(seed):
    # Zamba needs at least two hybrid layers (shared attention block tied across them)
    return tf.ZambaForCausalLM(
        tf.ZambaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
            n_mamba_heads=2, mamba_d_state=4, attn_layer_period=2, attn_layer_offset=1, vocab_size=32,
        )
    )


@pytest.mark.parametrize("make", [_falcon, _jamba, _zamba], ids=["falcon_mamba", "jamba", "zamba"])
@given(length=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_mamba_variants_float64_exact(make, length, seed):
    torch.manual_seed(seed)
    model = make(seed).double().eval()
    _randomize_free_terms(model, seed)
    ids, mask = _inputs(2, length, 32, 4, seed)
    layers = _check_exact(model, ids, mask, 1e-10)
    assert layers and all(la.family == "mamba" for la in layers)


@given(length=st.integers(1, 40), seed=st.integers(0, 2**16), index=st.integers(0, 10**6))
def test_views_agree_with_dense(length, seed, index):
    torch.manual_seed(seed)
    model = tf.MambaForCausalLM(tf.MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=1, vocab_size=32))
    model = model.double().eval()
    _randomize_free_terms(model, seed)
    ids, mask = _inputs(2, length, 32, 3, seed)
    (la,) = ci.implicit_attention(model, ids, attention_mask=mask, use_cache=False)
    dense = la.dense()
    assert dense.shape == (2, la.num_channels, length, length)
    assert torch.equal(dense.triu(1), torch.zeros_like(dense)), "implicit attention must be causal"
    y = dense @ la.values + la.offset
    assert rel_err(la.to_output_layout(y), la.output()) < 1e-12
    grad = torch.randn_like(la.values)
    weighted = dense * (grad @ la.values.transpose(-1, -2))
    with ci.blockwise(tile=7):  # tiles that do not divide L, so every tile shape is exercised
        assert rel_err(la.aggregate("mean"), dense.mean(1)) < 1e-12
        assert rel_err(la.aggregate("abs_mean"), dense.abs().mean(1)) < 1e-12
        assert rel_err(la.aggregate("max_abs"), dense.abs().amax(1)) < 1e-12
        assert rel_err(la.aggregate("positive_mean", grad=grad), weighted.clamp(min=0).mean(1)) < 1e-12
        i = index % length
        assert rel_err(la.row(i), dense[:, :, i]) < 1e-12
        assert rel_err(la.row(i, reduce="sum"), dense[:, :, i].sum(1)) < 1e-12
    sub = la.dense(channels=[3, 0])
    assert torch.equal(sub, dense[:, [3, 0]])


def test_dense_matches_published_formula_on_a_hand_checkable_layer():
    """One channel, state size 1, no conv, no gate: A[t, s] = C_t exp(A Σ Δ) Δ_s B_s + D δ_ts, checked by hand."""
    from captum_implicit.layers.mamba import build_mamba_attention

    L = 4
    u = torch.tensor([[[1.0, 2.0, -1.0, 0.5]]], dtype=torch.float64)
    dt = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]], dtype=torch.float64)  # Δ (no softplus)
    A = torch.tensor([[-1.5]], dtype=torch.float64)
    B = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64)
    C = torch.tensor([[[0.5, 0.25, 2.0, 1.0]]], dtype=torch.float64)
    D = torch.tensor([0.7], dtype=torch.float64)
    la = build_mamba_attention(
        "toy", u=u, dt=dt, A=A, B=B, C=C, D=D, z=None, delta_bias=None, delta_softplus=False,
        conv_input=None, conv_weight=None, conv_bias=None, torch_scan_casts=False,
    )
    want = torch.zeros(L, L, dtype=torch.float64)
    d, b, c = dt[0, 0], B[0, 0], C[0, 0]
    for t in range(L):
        for s in range(t + 1):
            want[t, s] = c[t] * torch.exp(-1.5 * d[s + 1 : t + 1].sum()) * d[s] * b[s] + (0.7 if s == t else 0.0)
    assert rel_err(la.dense()[0, 0], want) < 1e-15
    # and it is the recurrence h_t = exp(ΔA) h + Δ B u, y = C h + D u
    h, ys = 0.0, []
    for t in range(L):
        h = torch.exp(-1.5 * d[t]) * h + d[t] * b[t] * u[0, 0, t]
        ys.append(c[t] * h + 0.7 * u[0, 0, t])
    assert rel_err(la.output()[0, :, 0], torch.stack(ys)) < 1e-15


def test_bfloat16_model_is_explained_in_float32():
    # bf16 models round every intermediate to 8 bits of mantissa; the explanation is computed in float32
    # from the captured bf16 tensors, so agreement is at bf16 resolution (documented bound: 2e-2).
    torch.manual_seed(0)
    model = tf.MambaForCausalLM(tf.MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=32))
    model = model.to(torch.bfloat16).eval()
    ids, mask = _inputs(2, 30, 32, 0, 0)
    with OutputRecorder(model) as rec:
        layers = ci.implicit_attention(model, ids)
    for la in layers:
        assert la.dtype == torch.float32
        assert rel_err(la.output(), rec.inputs[la.name].float()) < 2e-2


def test_default_cache_prefill_is_exact():
    # with use_cache left on, HF prepends the (zero) conv state to the conv input; it carries nothing
    torch.manual_seed(1)
    model = tf.MambaForCausalLM(tf.MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=32))
    model = model.double().eval()
    _randomize_free_terms(model, 1)
    ids, _ = _inputs(1, 9, 32, 0, 1)
    with OutputRecorder(model) as rec:
        layers = ci.implicit_attention(model, ids)
    for la in layers:
        assert rel_err(la.output(), rec.inputs[la.name]) < 1e-10


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_falcon_mamba_on_cuda(dtype):
    """FalconMamba on CUDA (the scan transformers binds there: mamba-ssm's CUDA selective scan when it imports),
    float32 and bf16, left padding: exact to conftest.GPU_BOUND. HF Mamba: tests/test_gpu_mamba.py; the Mamba
    mixers of Jamba and Zamba: tests/test_softmax.py::test_every_layer_of_the_hybrids_on_cuda."""
    torch.manual_seed(0)
    model = _falcon(0).eval()
    _randomize_free_terms(model, 0)
    model = model.to("cuda", dtype)
    ids, mask = _inputs(2, 80, 32, 5, 3)
    layers = _check_exact(model, ids.cuda(), mask.cuda(), GPU_BOUND[dtype])
    assert len(layers) == 2 and all(la.device.type == "cuda" for la in layers)
    if importlib.util.find_spec("mamba_ssm") is not None:  # the scan that ran is mamba-ssm's (not torch's)
        capture_with_kernel(model, "mamba_selective_scan", "mamba_ssm", input_ids=ids.cuda(),
                            attention_mask=mask.cuda(), use_cache=False)

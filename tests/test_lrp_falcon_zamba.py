"""LRP (captum_implicit.lrp) on HF FalconMamba (Mamba with weight-free RMS norms on Δ, B, C) and Zamba v1 (multi-head
Mamba layers + one shared attention block applied at several depths). Tiny random float64 models with spread weights.

Target logit: the ``lm_head`` output where the model's logits are not float64 (``relevance`` records it).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("zennit")
transformers = pytest.importorskip("transformers")

from captum_implicit.lrp import GatedLinearRules  # noqa: E402
from captum_implicit.lrp.canonizers import find_lrp_form  # noqa: E402

from conftest import rel_err, requires_cuda  # noqa: E402
from test_lrp_families import _spread  # noqa: E402
from _lrp_checks import CONSERVE, check_ablation, check_bias_absorption  # noqa: E402
from _lrp_checks import check_cached_continuation_refused, check_canonized_logits_identical  # noqa: E402
from _lrp_checks import check_conservation, check_conservation_float32, check_gpu_canonized_logits  # noqa: E402
from _lrp_checks import check_restored_and_captum_class, draw_target_and_mask, left_padded  # noqa: E402
from _lrp_checks import rel_conservation, relevance  # noqa: E402

EXAMPLES = min(settings().max_examples, 6)
VOCAB = 32


# ----------------------------------------------------------------------------- tiny models
def tiny_falcon_mamba(seed=0, hidden=8, state=4, expand=2, kernel=3, rank=2, layers=2, residual_in_fp32=True,
                      use_bias=False):
    return transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(
        vocab_size=VOCAB, hidden_size=hidden, state_size=state, expand=expand, conv_kernel=kernel, time_step_rank=rank,
        num_hidden_layers=layers, residual_in_fp32=residual_in_fp32, use_bias=use_bias,
    ))


def tiny_zamba(seed=0, hidden=16, mamba_heads=2, state=4, kernel=3, rank=2, heads=2, kv_heads=None, layers=6,
               attn="sdpa"):
    """Hybrid layers at depths 2 and 4 of 6 (Zamba needs at least two: the shared block is tied across them)."""
    return transformers.ZambaForCausalLM(transformers.ZambaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, n_mamba_heads=mamba_heads,
        mamba_d_state=state, mamba_d_conv=kernel, mamba_dt_rank=rank, attn_layer_period=2, attn_layer_offset=1,
        attn_implementation=attn,
    ))


def _share_block(model):
    """The same ``ZambaAttentionDecoderLayer`` instance at every hybrid depth (HF 5.24 builds one instance per depth
    with tied parameters; the instance then runs several times per forward)."""
    hybrids = [layer for layer in model.model.layers if hasattr(layer, "shared_transf")]
    for layer in hybrids[1:]:
        layer.shared_transf = hybrids[0].shared_transf
    return model


MAKERS = {
    "falcon_mamba": tiny_falcon_mamba,
    "falcon_mamba_fp64_residual": lambda **kw: tiny_falcon_mamba(residual_in_fp32=False, **kw),
    "zamba": tiny_zamba,
    "zamba_eager": lambda **kw: tiny_zamba(attn="eager", **kw),  # HF's eager attention (the form's fallback)
    "zamba_shared": lambda **kw: _share_block(tiny_zamba(**kw)),
}
KINDS = list(MAKERS)
EXPECTED = {
    "falcon_mamba": {"FalconMambaMixer", "FalconMambaWeightlessRMSNorm", "FalconMambaRMSNorm", "FalconMambaBlock"},
    "falcon_mamba_fp64_residual": {"FalconMambaMixer"},
    "zamba": {"ZambaMambaMixer", "ZambaAttention", "ZambaMLP", "ZambaRMSNorm"},
    "zamba_eager": {"ZambaAttention"},
    "zamba_shared": {"ZambaAttention", "ZambaMLP"},
}
HYPOTHESIS_CONFIGS = {
    "falcon_mamba": st.fixed_dictionaries({
        "hidden": st.sampled_from([4, 8, 12]), "state": st.sampled_from([1, 2, 4]), "expand": st.sampled_from([1, 2]),
        "kernel": st.sampled_from([2, 3, 4]), "rank": st.integers(1, 3), "layers": st.integers(1, 2),
        "residual_in_fp32": st.booleans(),
    }),
    "zamba": st.fixed_dictionaries({
        "hidden": st.sampled_from([8, 16]), "mamba_heads": st.sampled_from([1, 2]), "state": st.sampled_from([2, 4]),
        "kernel": st.sampled_from([2, 3, 4]), "rank": st.integers(1, 2), "heads": st.sampled_from([1, 2]),
    }),
    "zamba_shared": st.fixed_dictionaries({"mamba_heads": st.sampled_from([1, 2])}),
}


def build(kind: str, seed: int = 0, dtype: torch.dtype = torch.float64, zero_biases: bool = True, **config):
    torch.manual_seed(seed)
    model = MAKERS[kind](**config).to(dtype).eval()
    _spread(model, zero_biases)
    with torch.no_grad():  # the norms' weights start at 1: spread them
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(1, 0.3)
    return model


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- registry, values
@pytest.mark.parametrize("kind", KINDS)
def test_every_class_has_a_form(kind):
    model = build(kind)
    found = {type(m).__name__ for m in model.modules() if find_lrp_form(m) is not None}
    assert found >= EXPECTED[kind], found
    from captum_implicit.lrp.canonizers import mixers_without_lrp_form

    assert mixers_without_lrp_form(model) == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_canonized_logits_identical(kind, dtype):
    model = build(kind, seed=1, dtype=dtype, zero_biases=False)
    check_canonized_logits_identical(model, _ids(2, 9, 1), left_padded(2, 9, 3, row=1), same=_identical)


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaNs in the same places: HF Zamba's eager attention in float64 takes its softmax in float32, where
    the float64 mask minimum is -inf, so a left-padded (fully masked) query row is NaN, and the Mamba layers' padding
    masks (0 · NaN) spread it over that sequence. The model's own output; the form reproduces it."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


# ----------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("kind", sorted(HYPOTHESIS_CONFIGS))
@settings(max_examples=EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**16), length=st.integers(1, 20), batch=st.integers(1, 2), padded=st.booleans(),
       data=st.data())
def test_conservation_exact(kind, seed, length, batch, padded, data):
    model = build(kind, seed=seed, **data.draw(HYPOTHESIS_CONFIGS[kind]))
    target, mask = draw_target_and_mask(data, batch, length, VOCAB, padded)
    # padded positions are zeroed before the conv and the scan (and masked as keys)
    check_conservation(model, _ids(batch, length, seed), target, mask)


@pytest.mark.parametrize("kind", KINDS)
def test_bias_absorption_accounts_for_the_difference(kind):
    """With biases (the mixers' conv biases), Σ R + Σ b ⊙ grad_b = f."""
    model = build(kind, seed=3, zero_biases=False)
    check_bias_absorption(model, _ids(1, 9, 3), torch.tensor([3]))


def test_conservation_float32():
    for kind in KINDS:
        model = build(kind, seed=3, dtype=torch.float32)
        check_conservation_float32(model, _ids(2, 12, 3), torch.tensor([1, 2]), msg=kind)


# ----------------------------------------------------------------------------- ablations
_MAMBA = ("identity_act", "detach_ssm", "half_gate", "detach_norm")
ABLATIONS = {
    # rule switched off -> conservation error must exceed this (each rule matters on these models)
    **{("falcon_mamba", r): 1e-3 for r in _MAMBA},
    ("falcon_mamba", "exact_casts"): CONSERVE,  # float32 norms, residual and scan input: ~1e-7 remains
    **{("zamba_shared", r): 1e-3 for r in (*_MAMBA, "detach_softmax")},
    ("zamba_shared", "exact_casts"): CONSERVE,
}


@pytest.mark.parametrize("kind,rule", sorted(ABLATIONS))
def test_ablation_breaks_conservation(kind, rule):
    model = build(kind, seed=0)
    check_ablation(model, _ids(2, 9, 0), torch.tensor([3, 7]), rule, ABLATIONS[kind, rule])


@pytest.mark.parametrize("exact_casts", [True, False])
def test_weightless_norm_rule(exact_casts):
    """The new form, alone: with its scale held, ``x · ∂(Σ y)/∂x`` sums to ``Σ y`` (a diagonal map); with the
    scale free it does not (an RMS norm is scale-invariant: that sum is then ~ε-sized). In a float64 input the float32
    round trip is absorbed with ``exact_casts`` (≤ 1e-12) and costs ~1e-7 without."""
    from transformers.models.falcon_mamba.modeling_falcon_mamba import FalconMambaWeightlessRMSNorm

    from captum_implicit.lrp.falcon_mamba import weightless_rms_norm_lrp

    norm = FalconMambaWeightlessRMSNorm(6, eps=1e-6)
    x = torch.randn(3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    rules = GatedLinearRules(exact_casts=exact_casts)
    y = weightless_rms_norm_lrp(norm, rules, x)
    assert torch.equal(y, norm(x))
    (g,) = torch.autograd.grad(y.sum(), x)
    bound = 1e-12 if exact_casts else 1e-6
    assert rel_err((x * g).sum(-1), y.sum(-1).detach()) <= bound
    y = weightless_rms_norm_lrp(norm, rules.without("detach_norm"), x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert rel_err((x * g).sum(-1), y.sum(-1).detach()) > 0.5


# ----------------------------------------------------------------------------- model left as it was, cache
@pytest.mark.parametrize("kind", KINDS)
def test_model_restored_and_captum_class(kind):
    model = build(kind, seed=4, zero_biases=False)
    check_restored_and_captum_class(model, _ids(2, 6, 4), [2, 9])


@pytest.mark.parametrize("kind", KINDS)
def test_cached_continuation_refused(kind):
    model = build(kind, seed=2)
    check_cached_continuation_refused(model, _ids(1, 6, 2))


# ----------------------------------------------------------------------------- Zamba's shared block
def test_zamba_shared_instance_equals_tied_copies():
    """One block instance run at two depths gives the relevance of two weight-tied instances, token by token (each
    call keeps its own held tensors)."""
    import copy

    tied = build("zamba", seed=5)
    shared = _share_block(copy.deepcopy(tied))
    blocks = [layer.shared_transf for layer in shared.model.layers if hasattr(layer, "shared_transf")]
    assert len(blocks) == 2 and blocks[0] is blocks[1]
    calls = []
    handle = blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    ids, target = _ids(2, 11, 5), torch.tensor([4, 8])
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        assert torch.equal(shared(ids, attention_mask=mask, use_cache=False).logits,
                           tied(ids, attention_mask=mask, use_cache=False).logits)
    assert len(calls) == 2  # the one instance ran at both depths
    handle.remove()
    R_shared, f, _ = relevance(shared, ids, target, mask=mask)
    R_tied, f_tied, _ = relevance(tied, ids, target, mask=mask)
    assert torch.equal(f, f_tied)
    assert torch.allclose(R_shared, R_tied, rtol=0, atol=1e-12 * float(R_tied.abs().max()))
    assert rel_conservation(R_shared, f) <= CONSERVE


def test_zamba_mixer_heads_are_separate_scans():
    """Known answer on the interleaved in_proj: with ``out_proj`` reading only head 0's channels, the relevance of
    the mixer's output equals that of a run where head 1's scan input (in_proj rows 2i, i in head 1) is zeroed."""
    model = build("zamba", seed=6, layers=6)
    mixer = model.model.layers[0].mamba
    heads, d = mixer.n_mamba_heads, mixer.mamba_head_dim
    assert heads == 2
    with torch.no_grad():
        mixer.out_proj.weight[:, d:] = 0  # only head 0 reaches the output
    from captum_implicit.lrp.zamba import zamba_mixer_lrp

    x = torch.randn(2, 7, mixer.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x.requires_grad_()
    y = zamba_mixer_lrp(mixer, GatedLinearRules(), x)
    assert torch.equal(y.detach(), mixer(x.detach()))
    (g,) = torch.autograd.grad(y.sum(), x)
    with torch.no_grad():
        mixer.in_proj.weight[2 * d: 4 * d: 2] = 0  # head 1's conv input channels (interleaved: even rows)
    y2 = zamba_mixer_lrp(mixer, GatedLinearRules(), x)
    (g2,) = torch.autograd.grad(y2.sum(), x)
    assert torch.equal(y.detach(), y2.detach())
    assert torch.allclose(g, g2, rtol=0, atol=1e-14)
    assert rel_err((x * g).sum(), y.sum()) <= 1e-12  # the mixer alone conserves (no biases: the conv's is zero)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_canonized_model(kind):
    """On CUDA transformers may call fused kernels (mamba-ssm, causal-conv1d) for the model's own forward; the LRP
    forms run HF's torch paths, so logits agree to float32 rounding and relevance conserves to float32 rounding."""
    model = build(kind, seed=8, dtype=torch.float32).cuda()
    ids = _ids(2, 40, 8).cuda()
    check_gpu_canonized_logits(model, ids, torch.tensor([1, 2], device="cuda"))

"""Softmax attention in hybrids: one matrix per token-mixing layer in forward order, exact outputs."""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from captum_implicit.config import blockwise
from captum_implicit.core.capture import implicit_attention
from captum_implicit.layers.softmax import SoftmaxAttention
from conftest import OutputRecorder, assert_views_match_dense, check_every_layer, rel_err, requires_cuda

transformers = pytest.importorskip("transformers")

VOCAB = 128


@lru_cache(maxsize=8)  # models are reused across examples (capture leaves them unchanged)
def _jamba(dtype: torch.dtype, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.JambaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=2,
        num_experts_per_tok=1,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        vocab_size=VOCAB,
        experts_implementation="eager",  # grouped_mm has no float64 kernel on CPU
    )
    return transformers.JambaForCausalLM(cfg).to(dtype).eval()


@lru_cache(maxsize=8)
def _qwen3_next(dtype: torch.dtype, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.Qwen3NextConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=2,
        num_experts_per_tok=1,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        vocab_size=VOCAB,
        experts_implementation="eager",
    )
    return transformers.Qwen3NextForCausalLM(cfg).to(dtype).eval()


def _run(model, seed: int, length: int, pad: int) -> tuple[list, dict]:
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[-1, : min(pad, length - 1)] = 0
    implementation = model.config._attn_implementation
    with OutputRecorder(model, "o_proj") as attn_rec, OutputRecorder(model, "out_proj") as mixer_rec:
        layers = implicit_attention(model, input_ids=ids, attention_mask=mask, use_cache=False)
    assert model.config._attn_implementation == implementation  # the forced eager mode is undone
    return layers, {**attn_rec.inputs, **mixer_rec.inputs}


def _pad(dtype: torch.dtype, pad: int) -> int:
    # float64 + left padding used to give NaN under forced eager (HF adds finfo(float64).min and takes
    # the softmax in float32); the adapter clamps the mask during capture, so padding is tested in both
    return pad


@given(
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2),
    length=st.integers(1, 40),
    pad=st.integers(0, 5),
)
def test_jamba_one_matrix_per_mixing_layer_in_forward_order(dtype, seed, length, pad):
    model = _jamba(dtype, seed)
    layers, real = _run(model, seed, length, _pad(dtype, pad))
    assert [a.name for a in layers] == [
        "model.layers.0.mamba",
        "model.layers.1.self_attn",
        "model.layers.2.mamba",
        "model.layers.3.self_attn",
    ]
    assert [a.family for a in layers] == ["mamba", "softmax", "mamba", "softmax"]
    for attn in layers:
        # softmax: output() is probs @ V, the very product eager attention computed; Mamba: the HF
        # scan casts B and u to float32 (mirrored), measured ≤ 1e-15 in float64
        bound = 1e-10 if dtype == torch.float64 else 1e-4
        assert rel_err(attn.output(), real[attn.name]) < bound


@given(
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2),
    length=st.integers(1, 40),
    pad=st.integers(0, 5),
)
def test_qwen3_next_gated_softmax_layer(dtype, seed, length, pad):
    layers, real = _run(_qwen3_next(dtype, seed), seed, length, _pad(dtype, pad))
    assert [a.family for a in layers] == ["gated_deltanet", "softmax", "gated_deltanet"]
    names = [f"model.layers.{i}.{n}" for i, n in enumerate(["linear_attn", "self_attn"] * 2)]
    assert [a.name for a in layers] == names[:3]
    soft = layers[1]
    assert isinstance(soft, SoftmaxAttention) and soft.row_scale is not None  # the σ(gate) of Qwen3-Next
    bound = 1e-10 if dtype == torch.float64 else 1e-4  # eager's probs @ V and the σ(gate) product
    assert rel_err(soft.output(), real[soft.name]) < bound
    # gated delta rule: float32 kernel (see test_gated_deltanet)
    for attn in (layers[0], layers[2]):
        assert rel_err(attn.output(), real[attn.name]) < (1e-5 if dtype == torch.float64 else 1e-4)


@given(seed=st.integers(0, 2), length=st.integers(1, 30))
def test_rows_are_probabilities(seed, length):
    """Without an output gate, every row of A is a probability distribution over past tokens."""
    layers, _ = _run(_jamba(torch.float64, seed), seed, length, 0)
    dense = layers[1].dense()
    assert (dense >= 0).all()
    assert torch.allclose(dense.sum(-1), torch.ones_like(dense[..., 0]), atol=1e-6)  # softmax taken in float32
    assert torch.equal(dense.triu(1), torch.zeros_like(dense))


@given(seed=st.integers(0, 2), length=st.integers(2, 30), reduce=st.sampled_from(["mean", "abs_sum", "max_abs"]))
def test_aggregate_and_row_equal_reductions_of_dense(seed, length, reduce):
    layers, _ = _run(_qwen3_next(torch.float64, seed), seed, length, 0)
    attn = layers[1]
    assert_views_match_dense(attn, rows=(length // 2,), reduces=(reduce,))


def test_capture_leaves_the_model_unchanged():
    """Forced eager mode and the float64 mask fix are undone: outputs before and after capture are identical."""
    model = _jamba(torch.float64, 0)
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :3] = 0
    modeling = transformers.models.jamba.modeling_jamba
    eager = modeling.eager_attention_forward
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        layers = implicit_attention(model, input_ids=ids, attention_mask=mask, use_cache=False)
        after = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(before, after) and modeling.eager_attention_forward is eager
    assert all(torch.isfinite(a.output()).all() for a in layers)  # no NaN from fully masked pad rows


_E = {"experts_implementation": "eager"}
_HYBRIDS = {
    "bamba": ("BambaForCausalLM", "BambaConfig", dict(
        num_hidden_layers=3, num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_state=16,
        mamba_chunk_size=16)),
    "zamba": ("ZambaForCausalLM", "ZambaConfig", dict(
        num_hidden_layers=6, num_key_value_heads=4, n_mamba_heads=2, mamba_d_state=8, attn_layer_period=2,
        attn_layer_offset=1)),
    "kimi_linear": ("KimiLinearForCausalLM", "KimiLinearConfig", dict(
        moe_intermediate_size=64, num_hidden_layers=2, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, num_local_experts=2, num_experts_per_tok=1, linear_head_dim=16,
        linear_num_heads=4, layer_types=["linear_attention", "full_attention"], pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **_E)),
    "minimax": ("MiniMaxForCausalLM", "MiniMaxConfig", dict(
        num_hidden_layers=2, num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
        block_size=16, layer_types=["linear_attention", "full_attention"], **_E)),
    "lfm2": ("Lfm2ForCausalLM", "Lfm2Config", dict(
        num_hidden_layers=2, num_key_value_heads=2, layer_types=["conv", "full_attention"])),
    "olmo_hybrid": ("OlmoHybridForCausalLM", "OlmoHybridConfig", dict(
        num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, pad_token_id=0, eos_token_id=1)),
    "granitemoehybrid": ("GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig", dict(
        shared_intermediate_size=128, num_hidden_layers=3, num_key_value_heads=2, num_local_experts=2,
        num_experts_per_tok=1, layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8, mamba_d_state=16,
        mamba_chunk_size=16, **_E)),
    "recurrent_gemma": ("RecurrentGemmaForCausalLM", "RecurrentGemmaConfig", dict(
        num_hidden_layers=3, attention_window_size=16)),
}


def _hybrid(kind: str, dtype: torch.dtype) -> torch.nn.Module:
    model_cls, config_cls, extra = _HYBRIDS[kind]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=VOCAB, **extra
    )
    return getattr(transformers, model_cls)(cfg).to(dtype).eval()


@pytest.mark.parametrize("kind", sorted(_HYBRIDS))
def test_softmax_layers_of_other_hybrids(kind):
    """Every softmax entry's output() equals the real input of its output projection (float64, left padding)."""
    layers, real = _run(_hybrid(kind, torch.float64), 0, 21, 3)
    soft = [a for a in layers if a.family == "softmax"]
    assert soft, [a.family for a in layers]
    for attn in soft:
        assert rel_err(attn.output(), real[attn.name]) < 1e-10  # eager's own probs @ V, float64


def test_fully_masked_pad_rows_are_causal_with_an_offset():
    """Eager attention gives fully masked (left-pad) query rows a uniform row over all keys, future ones
    included. A stays causal (so dense/aggregate do not depend on the tile size) and the future part is the
    offset: output() stays exact also when L exceeds a tile, where tiles above the diagonal are skipped."""
    for dtype in (torch.float64, torch.float32):
        layers, real = _run(_jamba(dtype, 0), 0, 23, 4)
        for attn in [a for a in layers if a.family == "softmax"]:
            assert attn.offset is not None and attn.offset[0].abs().max() == 0  # unpadded row: no offset
            assert attn.offset[1, :, :4].abs().max() > 0 and attn.offset[1, :, 4:].abs().max() == 0
            with blockwise(tile=8):  # L = 23 > tile
                dense = attn.dense()
                assert torch.equal(dense, dense.tril())
                assert rel_err(attn.output(), real[attn.name]) < (1e-10 if dtype == torch.float64 else 1e-4)
                with blockwise(tile=5):
                    # the same sum in another channel order: float64 rounding, or float32 rounding (≈ 1e-7)
                    bound = 1e-12 if dtype == torch.float64 else 1e-6
                    assert rel_err(attn.aggregate("abs_sum"), dense.abs().sum(1)) < bound


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(_HYBRIDS) + ["jamba", "qwen3_next"])
def test_every_layer_of_the_hybrids_on_cuda(kind, dtype):
    """On CUDA, float32 and bf16, left padding: every captured layer of each hybrid, the recurrent mixers (the
    kernels transformers binds there: mamba-ssm's scans, fla's delta rules, ...) as well as the softmax layers,
    reproduces the real input of its output projection (bounds: conftest.GPU_BOUND)."""
    try:
        model = (_jamba(torch.float32, 0) if kind == "jamba" else _qwen3_next(torch.float32, 0) if kind == "qwen3_next"
                 else _hybrid(kind, torch.float32))
    except AttributeError as error:  # the GPU machine's transformers may predate the family
        if "module transformers has no attribute" not in str(error):
            raise
        pytest.skip(f"{kind}: not in transformers {transformers.__version__}")
    model = copy.deepcopy(model).to("cuda", dtype)
    ids = torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(3))
    layers = check_every_layer(model, ids, dtype)
    assert len({a.family for a in layers}) == 2, [a.family for a in layers]  # a recurrent family and softmax

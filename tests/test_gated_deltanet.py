"""Gated DeltaNet: exact reconstruction on HF models, closed form against a float64 recurrence, reductions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from captum_implicit.core.capture import implicit_attention
from captum_implicit.layers.gated_deltanet import DeltaRuleAttention, decayed_products
from conftest import (
    GPU_BOUND,
    OutputRecorder,
    assert_views_match_dense,
    capture_with_kernel,
    direct_decayed_products,
    rel_err,
    requires_cuda,
)

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _model(kind: str, dtype: torch.dtype, seed: int, gqa: bool) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(seed)
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2 if gqa else 4,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        vocab_size=VOCAB,
    )
    if kind == "qwen3_next":
        cfg = transformers.Qwen3NextConfig(
            **common,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=2,
            num_experts_per_tok=1,
            experts_implementation="eager",  # grouped_mm has no float64 kernel on CPU
        )
        model, norm, out = transformers.Qwen3NextForCausalLM(cfg), "norm", "out_proj"
    elif kind == "qwen3_5":
        cfg = transformers.Qwen3_5TextConfig(**common, num_key_value_heads=2, head_dim=16)
        model, norm, out = transformers.Qwen3_5ForCausalLM(cfg), "norm", "out_proj"
    else:
        cfg = transformers.OlmoHybridConfig(**common, linear_allow_neg_eigval=True, pad_token_id=0, eos_token_id=1)
        model, norm, out = transformers.OlmoHybridForCausalLM(cfg), "o_norm", "o_proj"
    model = model.to(dtype).eval()
    with torch.no_grad():  # the norm weight initialises to 1: make the row scale non-trivial
        for name, p in model.named_parameters():
            if name.endswith(f"{norm}.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model, out


def _inputs(seed: int, batch: int, length: int, pad: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, : min(pad, length - 1)] = 0  # left padding on the last row
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False}


@given(
    kind=st.sampled_from(["qwen3_next", "qwen3_5", "olmo_hybrid"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
    length=st.integers(1, 70),  # crosses the kernel's 64-token chunk
    pad=st.integers(0, 6),
    gqa=st.booleans(),
)
def test_output_equals_real_layer_output(kind, dtype, seed, length, pad, gqa):
    model, out_name = _model(kind, dtype, seed, gqa)
    with OutputRecorder(model, suffix=out_name) as rec:
        layers = implicit_attention(model, **_inputs(seed, 2, length, pad))
    gdn = [a for a in layers if a.family == "gated_deltanet"]
    assert len(gdn) == 1 and isinstance(gdn[0], DeltaRuleAttention)
    real = rec.inputs[gdn[0].name]
    # The HF kernel casts q, k, v, g, β to float32 and runs the chunked UT solve in float32, so
    # even a float64 model agrees only to float32 rounding amplified by the solve (measured ≤ 3e-7).
    bound = 1e-5 if dtype == torch.float64 else 1e-4
    assert rel_err(gdn[0].output(), real) < bound


def _recurrent_probe(attn: DeltaRuleAttention) -> torch.Tensor:
    """Float64 step-by-step delta rule with V = I (one-hot time basis): returns A per head, (b, H, L, L)."""
    q, k, beta = attn.query.double(), attn.key.double(), attn.beta.double()
    log_decay = torch.diff(attn.cum.double(), dim=2, prepend=torch.zeros_like(attn.cum[:, :, :1]))
    b, h, length, dk = k.shape
    state = torch.zeros(b, h, dk, length, dtype=torch.float64)
    eye = torch.eye(length, dtype=torch.float64)
    rows = []
    for t in range(length):
        state = state * torch.exp(log_decay[:, :, t])[..., None]  # (b,H,dk,1|dk) decay per key channel
        kt = k[:, :, t]
        delta = (eye[t] - (state * kt[..., None]).sum(-2)) * beta[:, :, t, None]
        state = state + kt[..., None] * delta[:, :, None, :]
        rows.append((state * q[:, :, t, :, None]).sum(-2))
    return torch.stack(rows, dim=2)


@given(seed=st.integers(0, 2**16), length=st.integers(1, 40), kind=st.sampled_from(["qwen3_next", "olmo_hybrid"]))
def test_closed_form_equals_float64_recurrence(seed, length, kind):
    """Linearity probing (formulas.md §5): the recurrence run on one-hot values gives A column by column."""
    model, _ = _model(kind, torch.float64, seed, gqa=True)
    (attn,) = [a for a in implicit_attention(model, **_inputs(seed, 2, length, 3)) if a.family == "gated_deltanet"]
    probe = _recurrent_probe(attn)
    assert rel_err(attn.head_matrix(), probe) < 1e-10


@given(seed=st.integers(0, 2**16), length=st.integers(1, 45), chunk=st.sampled_from([1, 4, 7, 64]))
def test_decayed_products_equal_direct_sum(seed, length, chunk):
    """The pivot-factorised product equals the direct masked sum, for shared and per-channel decays."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 3, length, 5, generator=g, dtype=torch.float64).unbind(0)
    for width in (1, 5):
        cum = torch.cumsum(-3 * torch.rand(3, length, width, generator=g, dtype=torch.float64), dim=1)
        direct = direct_decayed_products(a, b, cum, torch.ones(length, length, dtype=torch.bool).tril())
        assert rel_err(decayed_products(a, b, cum, chunk=chunk), direct) < 1e-12
        strict = decayed_products(a, b, cum, strict=True, chunk=chunk)
        assert rel_err(strict, direct.tril(-1)) < 1e-12


def test_long_strong_decay_stays_finite():
    """log-decays summing to −1.2e4 must not overflow (no (q·e^G)(k·e^−G) factorisation), and the products still
    equal the direct masked sum (each exponent ``G_t − G_s ≤ 0`` on its own), the first diagonals included."""
    length = 300
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 1, length, 4, generator=g, dtype=torch.float64).unbind(0)
    cum = torch.cumsum(-80 * torch.rand(1, length, 1, generator=g, dtype=torch.float64), dim=1)  # one decay per row
    assert float(-cum.min()) > 709  # e^{−G} overflows float64
    out = decayed_products(a, b, cum)
    direct = direct_decayed_products(a, b, cum, torch.ones(length, length, dtype=torch.bool).tril())
    assert torch.isfinite(out).all()
    assert rel_err(out, direct) < 1e-12
    assert bool((out.diagonal(offset=-1, dim1=-2, dim2=-1) != 0).any())  # decays small enough to leave some mass


@given(seed=st.integers(0, 2**16), length=st.integers(2, 30), reduce=st.sampled_from(["mean", "abs_sum", "max_abs"]))
def test_aggregate_and_row_equal_reductions_of_dense(seed, length, reduce):
    model, _ = _model("qwen3_next", torch.float64, seed, gqa=True)
    (attn,) = [a for a in implicit_attention(model, **_inputs(seed, 2, length, 2)) if a.family == "gated_deltanet"]
    assert_views_match_dense(attn, rows=(length // 2,), reduces=(reduce,), max_block_elements=512)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["qwen3_next", "qwen3_5", "olmo_hybrid"])
def test_fla_kernel_output_on_gpu(kind, dtype):
    """On CUDA with fla importable, transformers binds fla's chunk_gated_delta_rule; the capture records it
    (no torch fallback on CUDA) and the closed form must reproduce its output."""
    pytest.importorskip("fla")
    model, out_name = _model(kind, torch.float32, 0, gqa=True)
    model = model.to("cuda", dtype)
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _inputs(0, 2, 200, 5).items()}
    with OutputRecorder(model, suffix=out_name) as rec:
        layers = capture_with_kernel(model, "torch_chunk_gated_delta_rule", "fla", **inputs)
    (attn,) = [a for a in layers if a.family == "gated_deltanet"]
    # float32: fla's kernels in IEEE float32 (conftest._fla_in_full_float32; in their default TF32 mode ~1e-3).
    # bf16: the kernel rounds its output, the gated norm its own, to bf16 (2^-8), the closed form runs in float32
    assert rel_err(attn.output(), rec.inputs[attn.name].float()) < GPU_BOUND[dtype]

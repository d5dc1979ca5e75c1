"""KDA (Kimi-Linear): exact reconstruction, closed form against a float64 recurrence, reductions, long-L stability."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from captum_implicit.config import blockwise
from captum_implicit.core.capture import implicit_attention
from captum_implicit.layers.gated_deltanet import delta_rule_matrix
from captum_implicit.layers.kda import KDAAttention
from conftest import GPU_BOUND, OutputRecorder, capture_with_kernel, rel_err, requires_cuda
from test_gated_deltanet import _recurrent_probe

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _model(dtype: torch.dtype, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.KimiLinearConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        linear_head_dim=16,
        linear_num_heads=4,
        layer_types=["linear_attention", "full_attention"],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        vocab_size=VOCAB,
        experts_implementation="eager",  # grouped_mm has no float64 kernel on CPU
    )
    model = transformers.KimiLinearForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # the o_norm weight initialises to 1: make the row scale non-trivial
        for name, p in model.named_parameters():
            if name.endswith("o_norm.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def _inputs(seed: int, length: int, pad: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[-1, : min(pad, length - 1)] = 0
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False}


def _kda(model: torch.nn.Module, **inputs) -> KDAAttention:
    (attn,) = [a for a in implicit_attention(model, **inputs) if a.family == "kda"]
    assert isinstance(attn, KDAAttention) and attn.cum.shape[-1] == attn.key.shape[-1]  # per key channel
    return attn


@given(
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
    length=st.integers(1, 70),  # crosses the kernel's 64-token chunk
    pad=st.integers(0, 6),
)
def test_output_equals_real_layer_output(dtype, seed, length, pad):
    model = _model(dtype, seed)
    with OutputRecorder(model, suffix="o_proj") as rec:
        attn = _kda(model, **_inputs(seed, length, pad))
    # The HF kernel casts to float32 and solves the UT system by float32 forward substitution, so a
    # float64 model agrees only to float32 rounding amplified by the solve (measured ≤ 3e-7).
    bound = 1e-5 if dtype == torch.float64 else 1e-4
    assert rel_err(attn.output(), rec.inputs[attn.name]) < bound


@given(seed=st.integers(0, 2**16), length=st.integers(1, 40))
def test_closed_form_equals_float64_recurrence(seed, length):
    """Linearity probing (formulas.md §5) with per-key-channel decays."""
    attn = _kda(_model(torch.float64, seed), **_inputs(seed, length, 3))
    assert rel_err(attn.head_matrix(), _recurrent_probe(attn)) < 1e-10


def test_long_sequence_strong_decay_is_finite_and_matches_recurrence():
    """Total log-decay ≈ −1000 per channel: (q·e^G)(k·e^−G) would overflow even in float64; ours must not."""
    torch.manual_seed(0)
    length, dk = 200, 8
    q = torch.nn.functional.normalize(torch.randn(1, length, dk, dtype=torch.float64), dim=-1) / dk**0.5
    k = torch.nn.functional.normalize(torch.randn(1, length, dk, dtype=torch.float64), dim=-1)
    g = -8.0 * torch.rand(1, length, dk, dtype=torch.float64)
    beta = torch.rand(1, length, dtype=torch.float64)
    cum = torch.cumsum(g, dim=1)
    assert float(-cum.min()) > 709  # exp(−G) overflows float64 here
    A = delta_rule_matrix(q, k, cum, beta)
    assert torch.isfinite(A).all()

    factors = SimpleNamespace(query=q[None], key=k[None], cum=cum[None], beta=beta[None])  # what the probe reads
    assert rel_err(A, _recurrent_probe(factors)[0]) < 1e-10


@given(seed=st.integers(0, 2**16), length=st.integers(2, 30), reduce=st.sampled_from(["sum", "abs_mean", "max_abs"]))
def test_aggregate_and_row_equal_reductions_of_dense(seed, length, reduce):
    attn = _kda(_model(torch.float64, seed), **_inputs(seed, length, 2))
    dense = attn.dense()
    ref = {"sum": dense.sum(1), "abs_mean": dense.abs().mean(1), "max_abs": dense.abs().amax(1)}[reduce]
    with blockwise(tile=4, max_block_elements=512):
        assert rel_err(attn.aggregate(reduce), ref) < 1e-12
        i = length - 1
        assert rel_err(attn.row(i), dense[:, :, i]) < 1e-12
        assert rel_err(attn.row(i, reduce=reduce), ref[:, i]) < 1e-12


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_kernel_output_on_gpu(dtype):
    """On CUDA with fla importable, transformers binds fla's chunk_kda; the capture records it (no torch fallback)
    and the closed form must reproduce it."""
    pytest.importorskip("fla")
    model = _model(torch.float32, 0).to("cuda", dtype)
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _inputs(0, 200, 5).items()}
    with OutputRecorder(model, suffix="o_proj") as rec:
        (attn,) = [a for a in capture_with_kernel(model, "chunk_kimi_delta_attention", "fla", **inputs)
                   if a.family == "kda"]
    # float32: fla's kernels in IEEE float32 (conftest._fla_in_full_float32; in their default TF32 mode ~1e-3).
    # bf16: the kernel rounds its output, the gated norm its own, to bf16 (2^-8), the closed form runs in float32
    assert rel_err(attn.output(), rec.inputs[attn.name].float()) < GPU_BOUND[dtype]

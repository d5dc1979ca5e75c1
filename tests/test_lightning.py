"""MiniMax lightning attention: exact reconstruction, a float64 recurrence probe, reductions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from captum_implicit.core.capture import implicit_attention
from captum_implicit.layers.lightning import LightningAttention
from conftest import OutputRecorder, assert_views_match_dense, rel_err

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _model(dtype: torch.dtype, seed: int, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.MiniMaxConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        block_size=16,
        layer_types=(["linear_attention"] * (layers - 1)) + ["full_attention"],
        vocab_size=VOCAB,
        experts_implementation="eager",  # grouped_mm has no float64 kernel on CPU
    )
    model = transformers.MiniMaxForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # RMSNorm weight initialises to 1: make the row scale non-trivial
        for name, p in model.named_parameters():
            if name.endswith("self_attn.norm.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def _run(model, seed: int, length: int, pad: int) -> tuple[list[LightningAttention], dict]:
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[-1, : min(pad, length - 1)] = 0
    with OutputRecorder(model) as rec:
        layers = implicit_attention(model, input_ids=ids, attention_mask=mask, use_cache=False)
    assert [a.family for a in layers][-1] == "softmax"  # the last (full attention) layer
    layers = [a for a in layers if a.family == "lightning"]
    assert all(isinstance(a, LightningAttention) for a in layers)
    return layers, rec.inputs


@given(
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
    length=st.integers(1, 50),  # crosses the 16-token blocks
    pad=st.integers(0, 5),
)
def test_output_equals_real_layer_output(dtype, seed, length, pad):
    layers, real = _run(_model(dtype, seed, layers=3), seed, length, pad)
    assert len(layers) == 2
    # The decay buffers are built in float32 at init (exp(−λ·n), then cast), and the RMSNorm
    # reduces in float32, so a float64 model agrees only to float32 rounding (measured ≤ 1e-7).
    bound = 1e-6 if dtype == torch.float64 else 1e-4
    for attn in layers:
        assert rel_err(attn.output(), real[attn.name]) < bound


@given(seed=st.integers(0, 2**16), length=st.integers(1, 40))
def test_matrix_equals_float64_recurrence_probe(seed, length):
    """S_t = e^{−λ} S_{t−1} + k_t v_tᵀ, o_t = S_tᵀ q_t, run with one-hot values, gives A per head."""
    (attn,), _ = _run(_model(torch.float64, seed), seed, length, 2)
    q, k = attn.query, attn.key
    b, h, _, d = q.shape
    state = torch.zeros(b, h, d, length, dtype=torch.float64)
    rows = []
    for t in range(length):
        state = state * torch.exp(-attn.slope)[None, :, None, None]
        state[..., t] += k[:, :, t]
        rows.append((state * q[:, :, t, :, None]).sum(-2))
    probe = torch.stack(rows, dim=2)
    core = attn.dense() / attn.row_scale[..., None]
    assert rel_err(core[:, :: attn.head_dim_v], probe) < 1e-12


@given(seed=st.integers(0, 2**16), length=st.integers(2, 30), reduce=st.sampled_from(["mean", "abs_sum", "max_abs"]))
def test_aggregate_and_row_equal_reductions_of_dense(seed, length, reduce):
    (attn,), _ = _run(_model(torch.float64, seed), seed, length, 1)
    assert_views_match_dense(attn, rows=(length // 2,), reduces=(reduce,))

"""LFM2 gated short conv: exact reconstruction (float64 throughout), conv probe, reductions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from captum_implicit.core.capture import implicit_attention
from captum_implicit.layers.short_conv import ShortConvAttention
from conftest import OutputRecorder, assert_views_match_dense, rel_err

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _model(dtype: torch.dtype, seed: int, bias: bool) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.Lfm2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["conv", "full_attention", "conv"],
        vocab_size=VOCAB,
        conv_bias=bias,
    )
    model = transformers.Lfm2ForCausalLM(cfg).to(dtype).eval()
    if bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("conv.conv.bias"):
                    p.copy_(torch.randn_like(p))
    return model


def _run(model, seed: int, length: int, pad: int) -> tuple[list[ShortConvAttention], dict]:
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[-1, : min(pad, length - 1)] = 0
    with OutputRecorder(model) as rec:
        layers = implicit_attention(model, input_ids=ids, attention_mask=mask, use_cache=False)
    assert [a.family for a in layers] == ["short_conv", "softmax", "short_conv"]  # forward order
    layers = [a for a in layers if a.family == "short_conv"]
    assert all(isinstance(a, ShortConvAttention) for a in layers)
    return layers, rec.inputs


@given(
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
    length=st.integers(1, 50),
    pad=st.integers(0, 5),
    bias=st.booleans(),
)
def test_output_equals_real_layer_output(dtype, seed, length, pad, bias):
    layers, real = _run(_model(dtype, seed, bias), seed, length, pad)
    # the layer computes in the model dtype throughout (products and a depthwise conv)
    bound = 1e-10 if dtype == torch.float64 else 1e-4
    for attn in layers:
        assert (attn.offset is not None) == bias
        assert rel_err(attn.output(), real[attn.name]) < bound


@given(seed=st.integers(0, 2**16), length=st.integers(1, 30))
def test_matrix_equals_conv_probe(seed, length):
    """Linearity probing: the model's own torch conv applied to B ⊙ one-hot inputs, gated by C, gives A."""
    conv_fn = transformers.models.lfm2.modeling_lfm2.causal_conv1d_fn
    conv_fn = getattr(conv_fn, "__wrapped__", conv_fn)
    (attn, _), _ = _run(_model(torch.float64, seed, bias=False), seed, length, 0)
    b, c = attn.batch_size, attn.num_channels
    eye = torch.eye(length, dtype=torch.float64)
    # probe s: input B[:, :, s] at position s only -> column s of A (before the row gate)
    probes = attn.write[:, :, None, :] * eye  # (b, C, L_probe, L)
    out = conv_fn(probes.permute(0, 2, 1, 3).reshape(b * length, c, length), attn.taps)
    columns = out.reshape(b, length, c, length).permute(0, 2, 3, 1)  # (b, C, t, s)
    assert rel_err(attn.dense(), attn.row_scale[..., None] * columns) < 1e-12


@given(seed=st.integers(0, 2**16), length=st.integers(2, 30), reduce=st.sampled_from(["mean", "abs_sum", "max_abs"]))
def test_aggregate_and_row_equal_reductions_of_dense(seed, length, reduce):
    (attn, _), _ = _run(_model(torch.float64, seed, bias=True), seed, length, 1)
    assert_views_match_dense(attn, rows=(length // 2,), reduces=(reduce,))

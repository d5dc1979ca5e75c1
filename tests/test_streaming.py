"""Streaming `ImplicitAttnGrad` (one layer's factors in memory at a time) equals the normal run.

The streaming run re-runs every layer alone from its recorded input and checkpoints the blocks, so the
two runs share no captured tensor: equality checks the recorded arguments, the output gradients pulled
back through each layer's output projection, and the undoing of every change made to the model.
"""

from __future__ import annotations

import pytest
import torch

from captum_implicit import CaptureError, ImplicitAttnGrad
from captum_implicit.attr import _streaming

from _attr_models import tiny_mamba_lm
from _hygiene import assert_unchanged, snapshot
from conftest import rel_err
from test_lrp_families import tiny_mamba2, tiny_rg, tiny_rwkv
from test_lrp_hybrids import tiny_jamba, tiny_qwen3_next

BUILD = {
    "mamba": lambda dtype: tiny_mamba_lm(3, dtype),
    "mamba2": lambda dtype: tiny_mamba2(layers=3, dtype=dtype, zero_biases=False),
    "rwkv": lambda dtype: tiny_rwkv(dtype=dtype, zero_biases=False),
    "recurrent_gemma": lambda dtype: tiny_rg(dtype=dtype, zero_biases=False),
    "jamba": lambda dtype: tiny_jamba(dtype=dtype, zero_biases=False),  # Mamba + softmax attention + MoE
    "qwen3_next": lambda dtype: tiny_qwen3_next(dtype=dtype, zero_biases=False),  # Gated DeltaNet + attention
}
PADDED = {"mamba", "jamba", "qwen3_next"}  # models taking the attention mask as second positional argument


def _inputs(kind: str, length: int = 19):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 16, (2, length), generator=gen)
    if kind not in PADDED:
        return ids, ()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, (mask,)


@pytest.mark.parametrize("kind", sorted(BUILD))
@pytest.mark.parametrize("reduce", ["positive_mean", "abs_mean"])
def test_streaming_equals_normal_run_float64(kind, reduce):
    model = BUILD[kind](torch.float64)
    ids, afa = _inputs(kind)
    # HF RWKV cannot backpropagate through its in-place cache update: the normal run needs use_cache=False
    forward = (lambda i: model(i, use_cache=False).logits) if kind == "rwkv" else model
    explainer = ImplicitAttnGrad(forward, model=model)
    before = snapshot(model)
    normal = explainer.attribute(ids, target=5, additional_forward_args=afa, reduce=reduce)
    streamed = explainer.attribute(ids, target=5, additional_forward_args=afa, reduce=reduce, streaming=True)
    assert_unchanged(model, before)
    assert normal.abs().max() > 0
    # the same float64 operations on the same values, in another grouping (checkpointed blocks, layers alone)
    assert rel_err(streamed, normal) <= 1e-12, kind


def test_streaming_float32_start_layer_and_gae():
    model = tiny_mamba_lm(3, torch.float32)
    ids, (mask,) = _inputs("mamba")
    explainer = ImplicitAttnGrad(model)
    for kwargs in [dict(start_layer=1), dict(row_normalize=False)]:
        normal = explainer.attribute(ids, target=2, additional_forward_args=(mask,), **kwargs)
        streamed = explainer.attribute(ids, target=2, additional_forward_args=(mask,), streaming=True, **kwargs)
        assert rel_err(streamed, normal) <= 1e-5, kwargs


def test_streaming_keeps_one_layer_of_factors(monkeypatch):
    """Each layer is rebuilt on demand and dropped before the next one is built."""
    model = tiny_mamba_lm(4, torch.float64)
    ids, (mask,) = _inputs("mamba")
    alive: list = []
    peak = 0
    original = _streaming._recompute

    def counting(rec, grad):
        nonlocal peak
        attn = original(rec, grad)
        alive[:] = [r for r in alive if r() is not None]
        import weakref

        alive.append(weakref.ref(attn))
        peak = max(peak, len(alive))
        return attn

    monkeypatch.setattr(_streaming, "_recompute", counting)
    ImplicitAttnGrad(model).attribute(ids, target=2, additional_forward_args=(mask,), streaming=True)
    assert peak == 1


def test_streaming_restores_the_model_when_the_forward_raises():
    model = tiny_mamba_lm(2, torch.float64)
    model.config.use_cache = True
    ids, _ = _inputs("mamba")
    before = snapshot(model)

    def failing(i):
        model(i)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ImplicitAttnGrad(failing, model=model).attribute(ids, target=1, streaming=True)
    assert_unchanged(model, before)
    assert model.config.use_cache is True
    assert all("forward" not in vars(m) for m in model.modules())


def test_streaming_refuses_uia():
    model = tiny_mamba_lm(2, torch.float64)
    ids, _ = _inputs("mamba")
    with pytest.raises(ValueError, match="chefer"):
        ImplicitAttnGrad(model).attribute(ids, target=1, method="uia", streaming=True)


def test_streaming_clear_error_when_recomputation_differs():
    """A forward that changes state between calls cannot be checkpointed: a clear error, model restored."""

    class Drifting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = tiny_mamba_lm(2, torch.float64)
            self.calls = 0

        def forward(self, ids):
            return self.lm(ids).logits

    model = Drifting()
    block = model.lm.backbone.layers[0]
    original = block.forward

    def drifting_forward(*args, **kwargs):  # a different op sequence on every call
        model.calls += 1
        out = original(*args, **kwargs)
        scale = torch.ones(1 if model.calls % 2 else out.shape[-1], dtype=out.dtype)
        return out * scale  # mul saves ``scale`` for backward: its shape differs in the recomputation

    block.forward = drifting_forward
    ids, _ = _inputs("mamba")
    with pytest.raises(CaptureError, match="recomput"):
        ImplicitAttnGrad(model).attribute(ids, target=1, streaming=True)
    assert block.forward is drifting_forward

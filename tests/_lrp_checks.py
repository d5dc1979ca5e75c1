"""Checks shared by the LRP test files (``test_lrp_*.py``): each function asserts one property of a model under the
``GatedLinearComposite`` and is called by a thin parametrised test per family, so pytest still reports one test per
family and property.

Conventions: ``relevance`` is the reference relevance (input × gradient of the target logit under the composite,
one backward); checks take it as ``relevance_fn`` where a file reads another logit (xLSTM / MiniMax: the logit the
model returns, soft-capped).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable

import pytest
import torch
from hypothesis import strategies as st
from torch import nn

from captum_implicit.core.capture import torch_fallback_of
from captum_implicit.lrp import GatedLinearComposite, GatedLinearLRP, GatedLinearRules, LRPError, is_canonized
from captum_implicit.lrp.canonizers import find_lrp_form
from conftest import rel_err

CONSERVE = 1e-8  # relative, float64, biases zero
FLOAT32 = 1e-4  # relative, float32 models: the model's own rounding

RelevanceFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

#: fla importable without a GPU: transformers binds fla's Triton kernels at import (Kimi-Linear, Qwen3-Next, ...),
#: and they fail on CPU tensors, so the models' own forward cannot run on CPU there
FLA_WITHOUT_GPU = importlib.util.find_spec("fla") is not None and not torch.cuda.is_available()


# ----------------------------------------------------------------------------- the model's own forward
def hf_forward(model: nn.Module, *args, **kwargs):
    """``model(*args, **kwargs)``, the reference the LRP forms are checked against. Where fla is importable without a
    GPU (:data:`FLA_WITHOUT_GPU`), the kernel wrappers of the model's modeling modules run their torch functions
    during the call: the model's own forward as HF runs it without fla (fla's Triton kernels fail on CPU tensors)."""
    if not (FLA_WITHOUT_GPU and next(model.parameters()).device.type == "cpu"):
        return model(*args, **kwargs)
    modules = {sys.modules[type(m).__module__] for m in model.modules()}
    kernels = [(mod, name, fn, torch_fallback_of(fn)) for mod in modules for name, fn in vars(mod).items()
               if callable(fn)]
    swapped = [(mod, name, fn, fallback) for mod, name, fn, fallback in kernels if fallback is not None]
    try:
        for mod, name, _, fallback in swapped:
            setattr(mod, name, fallback)
        return model(*args, **kwargs)
    finally:
        for mod, name, fn, _ in swapped:
            setattr(mod, name, fn)


def hf_kernel(fn: Callable) -> Callable:
    """A transformers kernel wrapper's torch function (what it runs without fla; fla's kernel fails on CPU)."""
    return torch_fallback_of(fn) or fn


# ----------------------------------------------------------------------------- reference relevance
def relevance(model: nn.Module, ids: torch.Tensor, target: torch.Tensor, composite=None, mask=None,
              with_biases: bool = False, model_logit: bool = False):
    """(R per token (B, L), target logit (B,), relevance absorbed by the biases (scalar)) in one backward.

    The target is the ``lm_head`` output (recorded with a hook) where the model's logits are not float64 (HF casts
    some to float32), else the logit returned. ``model_logit=True``: always the logit the model returns (soft-capped,
    float32 for xLSTM), as float64.
    """
    composite = composite if composite is not None else GatedLinearComposite()
    head = model.get_output_embeddings()
    rec = {}
    handle = head.register_forward_hook(lambda m, a, o: rec.__setitem__("z", o))
    biases = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"] if with_biases else []
    try:
        with composite.context(model):
            emb = model.get_input_embeddings()(ids).detach().requires_grad_()
            kw = {"attention_mask": mask} if mask is not None else {}
            logits = model(inputs_embeds=emb, use_cache=False, **kw).logits
            if not model_logit and logits.dtype != torch.float64:
                logits = rec["z"]  # e.g. Mamba2: before HF's .float()
            f = logits[:, -1].gather(1, target[:, None])[:, 0]
            grads = torch.autograd.grad(f.sum(), [emb, *biases], allow_unused=True)
    finally:
        handle.remove()
    absorbed = sum((b.detach() * g).sum() for b, g in zip(biases, grads[1:]) if g is not None)
    return (emb * grads[0]).sum(-1).detach(), f.detach().double() if model_logit else f.detach(), absorbed


def rel_conservation(R: torch.Tensor, f: torch.Tensor) -> float:
    """max over the batch of |Σ_t R_t − f| / |f|."""
    return float(((R.sum(-1) - f).abs() / f.abs().clamp_min(1e-300)).max())


def left_padded(batch: int, length: int, pad: int, row: int = 0) -> torch.Tensor:
    """An attention mask (batch, length) with the first ``pad`` positions of ``row`` padded."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[row, :pad] = 0
    return mask


def draw_target_and_mask(data, batch: int, length: int, vocab: int, padded: bool):
    """Hypothesis draws: a target token per row, and (``padded``) a left-padded mask, else None."""
    target = torch.tensor(data.draw(st.lists(st.integers(0, vocab - 1), min_size=batch, max_size=batch)))
    mask = left_padded(batch, length, data.draw(st.integers(0, length - 1))) if padded else None
    return target, mask


# ----------------------------------------------------------------------------- values unchanged
def check_canonized_logits_identical(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None,
                                     cached: bool = True, same: Callable = torch.equal):
    """Under the composite the logits are the model's, bit for bit, without a cache and with a fresh cache filled as
    HF fills it (``cached=False``: a model HF cannot run with a cache). Returns the cached outputs (canonized, plain)
    for further checks (e.g. the cache's contents)."""
    kw = {"attention_mask": mask} if mask is not None else {}
    ref = hf_forward(model, ids, use_cache=False, **kw)
    ref_cache = hf_forward(model, ids, use_cache=True, **kw) if cached else ref
    with GatedLinearComposite().context(model):
        assert any(is_canonized(m) for m in model.modules())
        out = model(ids, use_cache=False, **kw)
        out_cache = model(ids, use_cache=True, **kw) if cached else out
    assert same(out.logits, ref.logits) and same(out_cache.logits, ref_cache.logits)
    return out_cache, ref_cache


# ----------------------------------------------------------------------------- conservation
def check_conservation(model: nn.Module, ids: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                       relevance_fn: RelevanceFn = relevance, padded_carry_nothing: bool = True,
                       bound: float = CONSERVE) -> None:
    """Σ_t R_t = f to ``bound`` (relative); with a mask and ``padded_carry_nothing``, padded positions get R = 0
    exactly (the mixers zero padded states / mask padded keys)."""
    R, f, _ = relevance_fn(model, ids, target, mask=mask)
    assert R.shape == ids.shape
    assert rel_conservation(R, f) <= bound
    if mask is not None and padded_carry_nothing:
        assert torch.all(R[mask == 0] == 0)


def check_conservation_float32(model: nn.Module, ids: torch.Tensor, target: torch.Tensor,
                               relevance_fn: RelevanceFn = relevance, msg: str = "") -> None:
    """A float32 model conserves to float32 rounding."""
    R, f, _ = relevance_fn(model, ids, target)
    assert rel_conservation(R.double(), f.double()) < FLOAT32, msg


def check_bias_absorption(model: nn.Module, ids: torch.Tensor, target: torch.Tensor,
                          relevance_fn: RelevanceFn = relevance) -> None:
    """Σ R + Σ_b b ⊙ grad_b = f (every additive bias absorbs its share, same backward), and the biases do absorb."""
    R, f, absorbed = relevance_fn(model, ids, target, with_biases=True)
    assert abs(float((R.sum() + absorbed - f.sum()) / f.sum())) <= CONSERVE
    assert abs(float(absorbed / f.sum())) > 1e-6


def check_ablation(model: nn.Module, ids: torch.Tensor, target: torch.Tensor, rule: str, bound: float,
                   relevance_fn: RelevanceFn = relevance) -> None:
    """With every rule the relevance conserves; with ``rule`` switched off the error exceeds ``bound``."""
    R, f, _ = relevance_fn(model, ids, target)
    assert rel_conservation(R, f) <= CONSERVE
    R, f, _ = relevance_fn(model, ids, target, GatedLinearComposite(GatedLinearRules().without(rule)))
    assert rel_conservation(R, f) > bound


# ----------------------------------------------------------------------------- model left as it was
def model_state(model: nn.Module) -> dict:
    return {
        "params": {n: (id(p), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "modules": {
            n: (
                "forward" in m.__dict__,
                m.training,
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for n, m in model.named_modules()
        },
    }


def assert_restored(model: nn.Module, before: dict) -> None:
    after = model_state(model)
    assert after["modules"] == before["modules"]
    for name, (pid, value, flag) in before["params"].items():
        pid2, value2, flag2 = after["params"][name]
        assert pid2 == pid and flag2 == flag, name
        assert torch.equal(value2, value), name  # bit-identical
    assert not any(is_canonized(m) for m in model.modules())


def check_restored_after_context(model: nn.Module, ids: torch.Tensor, composite=None,
                                 logits: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> None:
    """The model is restored (parameters bit for bit, hooks, forwards, modes) after a composite context with a
    backward, and after an exception raised inside the context. ``logits(model, ids)``: how to call the model
    (default: an HF causal LM without a cache)."""
    composite = composite if composite is not None else GatedLinearComposite()
    logits = logits if logits is not None else (lambda m, x: m(x, use_cache=False).logits)
    before = model_state(model)
    with composite.context(model):
        assert all(is_canonized(m) for m in model.modules() if find_lrp_form(m) is not None)
        logits(model, ids).sum().backward()
    model.zero_grad(set_to_none=True)
    assert_restored(model, before)
    with pytest.raises(RuntimeError, match="boom"):
        with composite.context(model):
            raise RuntimeError("boom")
    assert_restored(model, before)


def check_restored_after_failed_attribution(model: nn.Module, ids: torch.Tensor, composite=None) -> None:
    """An attribution that fails (a wrong target length) leaves the model as it was, without .grad."""
    before = model_state(model)
    with pytest.raises(Exception):
        GatedLinearLRP(model, composite).attribute(ids, target=[1, 2, 3])  # wrong target length
    assert_restored(model, before)
    assert all(p.grad is None for p in model.parameters())  # attribution never fills .grad


def check_captum_class(model: nn.Module, ids: torch.Tensor, target: list[int],
                       relevance_fn: RelevanceFn = relevance) -> None:
    """``GatedLinearLRP.attribute`` is the reference relevance; it leaves the model as it was, without .grad."""
    before = model_state(model)
    R = GatedLinearLRP(model).attribute(ids, target=target)
    R_ref, _, _ = relevance_fn(model, ids, torch.tensor(target))
    assert torch.allclose(R, R_ref, rtol=0, atol=1e-13)
    assert_restored(model, before)
    assert all(p.grad is None for p in model.parameters())


def check_restored_and_captum_class(model: nn.Module, ids: torch.Tensor, target: list[int],
                                    relevance_fn: RelevanceFn = relevance) -> None:
    check_restored_after_context(model, ids)
    check_captum_class(model, ids, target, relevance_fn)


def check_cached_continuation_refused(model: nn.Module, ids: torch.Tensor, match: str = "cached state",
                                      continuation: Callable | None = None) -> None:
    """A call continuing from a cached state is refused (LRPError matching ``match``); the model is restored.

    ``continuation(model, ids)`` runs the prefix and returns the keyword arguments of the one-token continuation
    (default: HF's ``cache`` from ``model(ids, use_cache=True)``)."""
    if continuation is not None:
        cont = continuation(model, ids)
    else:
        cont = {"cache": hf_forward(model, ids, use_cache=True).cache}
    before = model_state(model)
    with pytest.raises(LRPError, match=match):
        with GatedLinearComposite().context(model):
            model(ids[:, -1:], use_cache=True, **cont)
    assert_restored(model, before)


# ----------------------------------------------------------------------------- GPU
def check_gpu_canonized_logits(model: nn.Module, ids: torch.Tensor, target: torch.Tensor,
                               relevance_fn: RelevanceFn = relevance, skip_refusal: bool = False) -> None:
    """On CUDA (fused kernels in the plain forward, HF's torch paths in the forms) logits agree to float32 rounding
    and relevance conserves to float32 rounding. ``skip_refusal``: a form refusing this transformers version skips."""
    ref = model(ids, use_cache=False).logits
    try:
        with GatedLinearComposite().context(model):
            out = model(ids, use_cache=False).logits
    except LRPError as e:
        if not skip_refusal:
            raise
        pytest.skip(str(e))
    assert rel_err(out, ref) < FLOAT32
    check_conservation_float32(model, ids, target, relevance_fn)

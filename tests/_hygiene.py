"""What a call must leave unchanged in the user's model (the library's "harmless" promise), checked in one place:
parameters (same objects, same values, gradients, ``requires_grad``), buffers, modes, every module's hooks, each
parameter's hooks, and every public attribute of every module (same value, or the same object)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_PLAIN = (bool, int, float, str, bytes, type(None))


def _value(v: Any) -> Any:
    """A comparable record of an attribute: plain values as they are, tensors by identity and content, HF configs
    by identity and settings, other objects (submodules' helpers) by identity."""
    if isinstance(v, Tensor):
        return ("tensor", id(v), v.detach().clone())
    if isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v)):
        return v
    if callable(getattr(v, "to_dict", None)):  # an HF config: its settings too (e.g. use_cache, patched in calls)
        return ("config", id(v), repr(v.to_dict()))
    return ("object", id(v))


def snapshot(model: nn.Module) -> dict:
    """Everything about ``model`` a call must leave unchanged."""
    params = dict(model.named_parameters())
    return {
        "params": {n: (id(p), p.detach().clone()) for n, p in params.items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in params.items()},
        "requires_grad": {n: p.requires_grad for n, p in params.items()},
        "param_hooks": {
            n: (dict(p._backward_hooks or {}), dict(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
            for n, p in params.items()
        },
        "buffers": {n: (id(b), b.clone()) for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: tuple(dict(getattr(m, h)) for h in _MODULE_HOOKS) for n, m in model.named_modules()},
        "attributes": {
            n: {k: _value(v) for k, v in vars(m).items() if not k.startswith("_")} for n, m in model.named_modules()
        },
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """``model`` is as :func:`snapshot` saw it; the message names the first difference."""
    after = snapshot(model)
    for key, old in before.items():
        new = after[key]
        assert old.keys() == new.keys(), f"{key}: names changed: {sorted(old.keys() ^ new.keys())}"
        for name, value in old.items():
            if key == "attributes":
                assert value.keys() == new[name].keys(), (name, sorted(value.keys() ^ new[name].keys()))
                for attr, record in value.items():
                    assert _same(record, new[name][attr]), f"module {name!r}: attribute {attr!r} changed"
            else:
                assert _same(value, new[name]), f"{key} of {name!r} changed"

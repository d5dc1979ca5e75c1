"""A linear-cost backward for transformers' pure-torch Mamba selective scan (CPU captures).

HF's fallback ``mamba_selective_scan`` loops over the tokens and reads ``discrete_A[:, :, t]`` and
``deltaB_u[:, :, t]`` by indexing. Autograd's backward of each index allocates a zero tensor of the
*whole* ``(b, d, L, N)`` input and adds it into the gradient, so one backward through a scan costs
``O(d·L²·N)`` memory traffic (profiled: ~all of ImplicitAttnGrad's backward on a 4-layer, L = 256 model).

:func:`linear_backward_scan` wraps the fallback: the forward value is the fallback's own output,
computed under ``no_grad`` (bit-identical: the model is left exactly as it was), and the backward
recomputes the same arithmetic with the sequence ``unbind``-ed once (whose backward is one
``stack``, ``O(d·L·N)``) and differentiates that. If the recomputation does not reproduce the
fallback's output bit for bit (a transformers version with other arithmetic), the backward
differentiates the fallback itself, as autograd would have.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..ops.hf_scans import mamba_selective_scan_unbound

_NAMES = ("hidden_states", "dt", "A", "B", "C", "D", "z", "delta_bias")


class _LinearBackwardScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fallback: Callable, flags: dict, *tensors: Tensor | None) -> tuple[Tensor, Tensor]:
        ctx.fallback, ctx.flags = fallback, flags
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            out, state = fallback(**flags, **dict(zip(_NAMES, tensors, strict=True)), return_last_state=True)
        ctx.results = (out.detach(), state.detach())
        return out, state

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_state: Tensor) -> tuple[Tensor | None, ...]:
        tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        leaves = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip(tensors, needs, strict=True)]
        wanted = [t for t, n in zip(leaves, needs, strict=True) if n and t is not None]
        with torch.enable_grad():
            kwargs = dict(zip(_NAMES, leaves, strict=True))
            results = mamba_selective_scan_unbound(
                **kwargs, delta_softplus=bool(ctx.flags.get("delta_softplus", False)), return_last_state=True
            )
            if not all(torch.equal(r.detach(), o) for r, o in zip(results, ctx.results, strict=True)):
                # other arithmetic than we mirror: differentiate the fallback itself
                results = ctx.fallback(**ctx.flags, **kwargs, return_last_state=True)
            grads = iter(torch.autograd.grad(results, wanted, (grad, grad_state), allow_unused=True))
        result = [next(grads) if n and t is not None else None for t, n in zip(leaves, needs, strict=True)]
        return (None, None, *result)


def linear_backward_scan(fallback: Callable) -> Callable:
    """``fallback`` (transformers' torch ``mamba_selective_scan``) with a linear-cost backward.

    Used only where autograd records (grad enabled, some tensor argument requiring grad);
    otherwise ``fallback`` runs unchanged.
    Where the fallback took another path (mambapy's ``pscan``, the associative scan under
    ``torch.compile``), the backward's bit-for-bit check sends it to the fallback's own autograd.
    """
    signature = inspect.signature(fallback)

    @functools.wraps(fallback)
    def scan(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return fallback(*args, **kwargs)
        arguments = dict(bound.arguments)
        extra = arguments.pop("kwargs", {})
        tensors = [arguments.pop(n, None) for n in _NAMES]
        flags = arguments  # delta_softplus, return_last_state, use_mambapy, use_associative_scan
        plain = (
            torch.is_grad_enabled()
            and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)
            and all(t is None or isinstance(t, Tensor) for t in tensors)
            and not extra
            and set(flags) <= {"delta_softplus", "return_last_state", "use_mambapy", "use_associative_scan"}
        )
        if not plain:
            return fallback(*args, **kwargs)
        last = bool(flags.pop("return_last_state", False))
        out, state = _LinearBackwardScan.apply(fallback, flags, *tensors)
        return (out, state) if last else out

    return scan

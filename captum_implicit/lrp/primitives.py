"""Detach primitives: forward values unchanged, gradients re-routed so that Gradient×Input conserves.

LRP in the gradient×input (GI) convention (MambaLRP, LXT/AttnLRP): run the model's own
maths, replace the local Jacobian of the few operations where GI does not conserve, and
read the relevance of any tensor ``h`` as ``h ⊙ h.grad``. Every primitive here returns
*exactly* the value the plain operation returns (bit for bit), only its backward differs.

================  ===============  =======================================  ==============================
primitive         forward          backward                                 use for
================  ===============  =======================================  ==============================
``proportional``  ``y`` (given)    ``grad · y / x``                         any elementwise map, rounding
``identity_rule`` ``f(x)``         ``grad · f(x) / stabilize(x)``           SiLU, GELU, softplus, ...
``cast_rule``     ``x.to(dtype)``  ``grad · fl(x) / x``                     float32 casts in float64 models
``round_rule``    ``fl(x)``        ``grad · fl(x) / x`` (in ``x.dtype``)    the same, consumer promotes back
``uniform_rule``  ``x``            ``grad / k``                             products of k varying factors
``stop_gradient`` ``x``            ``0``                                    Ā, B̄, C, Δ, norm scales
================  ===============  =======================================  ==============================

Why each one conserves: for ``y = f(x)`` elementwise, ``x · (grad · y / x) = y · grad``,
so the relevance entering ``x`` equals the relevance leaving ``y``. A product ``y = a ⊙ b``
of two input-dependent factors under plain GI hands ``y · grad`` to *each* factor (2× the
relevance); dividing the gradient by 2 hands half to each. A detached coefficient makes the
operation linear in the remaining input, where GI is LRP-0 and conserves up to biases.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def stabilize(x: Tensor, epsilon: float) -> Tensor:
    """``x + sign0(x)·ε`` with ``sign0(0) = +1`` (Zennit's and MambaLRP's sign-preserving stabiliser)."""
    return x + ((x == 0).to(x) + x.sign()) * epsilon


class _Proportional(torch.autograd.Function):
    """Value ``y``; gradient to ``x`` is ``grad · y / x`` (``y/stabilize(x, ε)`` when ``ε > 0``)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, epsilon: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, y)
        ctx.epsilon = epsilon
        return y.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        x, y = ctx.saved_tensors
        y = y.to(x.dtype)
        if ctx.epsilon > 0:
            ratio = y / stabilize(x, ctx.epsilon)
        else:
            # exact ratio; at x == 0 the relevance x·grad is 0 whatever the ratio, choose 0
            zero = x == 0
            ratio = torch.where(zero, torch.zeros_like(y), y / torch.where(zero, torch.ones_like(x), x))
        return grad.to(x.dtype) * ratio, None, None


def proportional(x: Tensor, y: Tensor, epsilon: float = 0.0) -> Tensor:
    """Return ``y`` (computed by the caller from ``x``, any graph it has is dropped) with the
    backward of the diagonal linear map ``x ↦ (y/x) ⊙ x``.

    Parameters
    ----------
    x : Tensor, any shape
        The input the relevance flows to.
    y : Tensor, same shape as ``x`` (any dtype)
        The exact forward value.
    epsilon : float
        ``0`` divides exactly (the relevance ``x · grad_x`` equals ``y · grad_y`` to rounding);
        ``> 0`` divides by :func:`stabilize` ``(x, epsilon)`` (MambaLRP uses ``1e-6``).

    Returns
    -------
    Tensor
        Equal to ``y`` bit for bit.
    """
    if x.shape != y.shape:
        raise ValueError(f"proportional: x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape")
    if not (torch.is_grad_enabled() and x.requires_grad):
        return y.detach()
    return _Proportional.apply(x, y.detach(), float(epsilon))


def identity_rule(fn: Callable[[Tensor], Tensor], x: Tensor, epsilon: float = 0.0) -> Tensor:
    """Forward ``fn(x)``; backward ``grad · fn(x)/x`` — the LRP identity rule for elementwise ``fn``.

    For SiLU the local slope becomes ``σ(x)``, i.e. the gate ``σ`` is treated as a constant
    (MambaLRP ``ModifiedAct(transform='identity')``, LXT ``identity_rule_implicit``).

    Parameters
    ----------
    fn : callable, elementwise
    x : Tensor
    epsilon : float
        Stabiliser of the division (``0``: exact; MambaLRP: ``1e-6``).
    """
    with torch.no_grad():
        y = fn(x)
    return proportional(x, y, epsilon)


def cast_rule(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` whose rounding is absorbed into the gradient (``grad · fl(x)/x``).

    A plain cast passes the gradient through unchanged, so ``x · grad`` sums to the
    relevance of the *unrounded* value: a float64 model that rounds to float32 somewhere
    (HF's RMSNorm, ``residual_in_fp32``, the scan's ``u.float()``) then misses conservation
    by ~1e-7. This primitive makes it exact. Casts that do not round return ``x.to(dtype)``.
    """
    if x.dtype == dtype:
        return x
    if not (x.is_floating_point() and dtype.is_floating_point):
        return x.to(dtype)
    if torch.finfo(dtype).bits > torch.finfo(x.dtype).bits:
        return x.to(dtype)  # widening is exact
    return proportional(x, x.detach().to(dtype))


def round_rule(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to ``dtype`` but kept in ``x.dtype``, rounding absorbed into the gradient.

    Use it for a narrowing cast whose consumer promotes back (``u.float()`` multiplied by
    a float64 factor, a float32 residual added to a float64 branch): the forward value is
    the same, and the gradient keeps ``x``'s precision (a real float32 tensor would round
    the gradient itself, ~1e-7 relative). Widening or same-dtype casts return ``x.to(dtype)``.
    """
    if not (x.is_floating_point() and dtype.is_floating_point) or torch.finfo(dtype).bits > torch.finfo(
        x.dtype
    ).bits or x.dtype == dtype:
        return x.to(dtype)
    return proportional(x, x.detach().to(dtype).to(x.dtype))


class _DivideGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, k: float) -> Tensor:  # type: ignore[override]
        ctx.k = k
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad / ctx.k, None


def uniform_rule(x: Tensor, k: float = 2.0) -> Tensor:
    """Forward ``x``; backward ``grad / k``: the uniform (half, for ``k = 2``) rule.

    Apply it to the *result* of a product of ``k`` input-dependent factors (e.g. the gated
    output ``y ⊙ SiLU(z)``): plain GI gives each factor the full relevance of the product,
    this gives each ``1/k`` of it (Arras et al. 2019; MambaLRP's half rule).
    """
    if k <= 0:
        raise ValueError(f"uniform_rule: k must be positive, got {k}")
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _DivideGradient.apply(x, float(k))


def stop_gradient(x: Tensor) -> Tensor:
    """``x.detach()``: treat a data-dependent coefficient (decay, read/write vector, norm scale) as constant."""
    return x.detach()

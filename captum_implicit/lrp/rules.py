"""Zennit rules (ε, γ, z⁺, ...) for linear layers, speaking the gradient×input convention.

Zennit's own rules pass *relevance* between hooked modules, while our canonized mixers
pass *gradients* (relevance = tensor ⊙ gradient). Mixing the two conventions corrupts
the result (zennit.md §4), so a Zennit rule is used here through :class:`GIRule`:

* the module's forward output is kept (value unchanged);
* in backward, the output relevance is ``R_out = y ⊙ grad`` and the wrapped Zennit rule
  computes ``R_in`` exactly as Zennit would (its input/param/output modifiers, gradient
  mapper and reducer), from the input saved *for this call*;
* the gradient handed to the input is ``R_in / x`` (0 where ``x = 0``), so ``x ⊙ grad_x = R_in``.

Because the input is saved per call inside an autograd function (not in the hook's
``stored_tensors``), a module called several times in one forward gets the right
relevance for every call. With ``Epsilon(0)`` this reduces to the plain gradient (LRP-0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module
from zennit.core import BasicHook, Hook, ParamMod, RemovableHandle, RemovableHandleList, zero_wrap
from zennit.rules import Epsilon, Gamma, ZPlus


def _modified_parameters(param_mod: Any, module: nn.Module) -> dict[str, Tensor]:
    """The parameters a Zennit ``ParamMod`` would set (its semantics in 0.5 and 1.0), without touching ``module``.

    Zennit 1.0 applies a ParamMod with ``load_state_dict(assign=True)``, which leaves new
    ``Parameter`` objects behind; we swap them only for the one modified forward instead.
    """
    pm = ParamMod.ensure(param_mod)
    keys = pm.param_keys
    if keys is None:
        keys = [name for name, _ in module.named_parameters(recurse=False)]
    missing = [key for key in keys if not hasattr(module, key)]
    if pm.require_params and missing:
        raise RuntimeError(f"Module {module} requires missing parameters: {missing}")
    modifier = zero_wrap(pm.zero_params or [])(pm.modifier)
    out = {}
    for key in keys:
        param = None if key in missing else getattr(module, key)
        if param is not None:
            out[key] = modifier(param.detach(), key)
    return out


def zennit_relevance(rule: BasicHook, module: nn.Module, x: Tensor, relevance: Tensor) -> Tensor:
    """Input relevance of a Zennit ``BasicHook`` rule for one call of ``module`` (Zennit's backward).

    Parameters
    ----------
    rule : zennit.core.BasicHook
    module : nn.Module
        Single-input module (Linear, Conv1d, ...).
    x : Tensor
        The input of this call.
    relevance : Tensor, shape of the module output
        ``R_out``.

    Returns
    -------
    Tensor, shape of ``x``
    """
    x = x.detach()
    with torch.enable_grad():
        inputs, outputs = [], []
        for in_mod, param_mod, out_mod in zip(rule.input_modifiers, rule.param_modifiers, rule.output_modifiers):
            inp = in_mod(x).requires_grad_()
            with _reparametrize_module(module, _modified_parameters(param_mod, module)):
                out = out_mod(type(module).forward(module, inp))  # class forward: no hooks, no canonized swap
            inputs.append(inp)
            outputs.append(out)
        grad_outputs = rule.gradient_mapper(relevance, outputs)
        gradients = torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs)
    return rule.reducer(inputs, gradients)


class _GIRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, module: nn.Module, hook: GIRule) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, y)
        ctx.module, ctx.hook = module, hook
        return y.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        x, y = ctx.saved_tensors
        module, hook = ctx.module, ctx.hook
        if not hook.active:  # Composite.inactive(): the plain gradient
            with torch.enable_grad():
                inp = x.detach().requires_grad_()
                out = type(module).forward(module, inp)
                return torch.autograd.grad(out, inp, grad)[0], None, None, None
        r_in = zennit_relevance(hook.rule, module, x, y * grad)
        zero = x == 0
        grad_x = torch.where(zero, torch.zeros_like(r_in), r_in / torch.where(zero, torch.ones_like(x), x))
        return grad_x, None, None, None


class GIRule(Hook):
    """Use a Zennit ``BasicHook`` rule inside a gradient×input explanation.

    Parameters
    ----------
    rule : zennit.core.BasicHook
        E.g. ``zennit.rules.Epsilon(1e-6)``, ``Gamma(0.25)``, ``ZPlus()``.

    Notes
    -----
    Registered as a forward hook that routes the output through an autograd function;
    removing the composite removes the hook. Only single-input modules are supported
    (Zennit's BasicHook attributes only the first input in both 0.5 and 1.0).
    """

    def __init__(self, rule: BasicHook) -> None:
        super().__init__()
        if not isinstance(rule, BasicHook):
            raise TypeError(f"GIRule wraps a zennit BasicHook rule (Epsilon, Gamma, ZPlus, ...), got {type(rule)}")
        self.rule = rule

    def register(self, module: nn.Module) -> RemovableHandleList:
        return RemovableHandleList([RemovableHandle(self), module.register_forward_hook(self._route)])

    def _route(self, module: nn.Module, args: tuple, output: Any) -> Tensor | None:
        if not (args and isinstance(args[0], Tensor) and isinstance(output, Tensor)):
            return None
        if not (torch.is_grad_enabled() and args[0].requires_grad):
            return None
        return _GIRuleFunction.apply(args[0], output, module, self)

    def copy(self) -> GIRule:
        return GIRule(self.rule.copy())


def GIEpsilon(epsilon: float = 1e-6, zero_params: list[str] | None = None) -> GIRule:
    """LRP-ε (Zennit ``Epsilon``) in the GI convention; ``epsilon=0`` is LRP-0 (= the plain gradient)."""
    return GIRule(Epsilon(epsilon=epsilon, zero_params=zero_params))


def GIGamma(gamma: float = 0.25, stabilizer: float = 1e-6, zero_params: list[str] | None = None) -> GIRule:
    """Generalised LRP-γ (Zennit ``Gamma``) in the GI convention (MambaLRP's optional γ = 0.25 rule)."""
    return GIRule(Gamma(gamma=gamma, stabilizer=stabilizer, zero_params=zero_params))


def GIZPlus(stabilizer: float = 1e-6, zero_params: list[str] | None = None) -> GIRule:
    """LRP-z⁺ (Zennit ``ZPlus``) in the GI convention."""
    return GIRule(ZPlus(stabilizer=stabilizer, zero_params=zero_params))

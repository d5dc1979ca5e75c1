"""Per-instance forward swaps: each supported mixer / norm / block runs its LRP form while canonized.

A family supports LRP by registering one :class:`LRPForm` per module class: a function
``forward(module, rules, *args, **kwargs)`` that recomputes the module's maths in torch
with the detach primitives (values identical to the real forward). :class:`GatedLinearCanonizer`
(Zennit's ``AttributeCanonizer`` pattern) sets ``module.forward`` on each matching *instance*
and restores the previous state on ``remove()`` — classes are never patched, so other
instances and other models are untouched, and it composes with Zennit's other canonizers.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn
from zennit.canonizers import AttributeCanonizer

from ..core.errors import CaptumImplicitError


class LRPError(CaptumImplicitError, RuntimeError):
    """An LRP form cannot explain this call (e.g. continuing from a cached state)."""


@dataclass(frozen=True)
class GatedLinearRules:
    """Which rules the LRP forms apply (each flag can be switched off for ablations).

    Parameters
    ----------
    identity_act : bool
        Identity rule on elementwise activations (SiLU after the conv, SiLU of the gate).
    act_stabilizer : float
        Stabiliser of the identity rule's division; ``0`` is exact (conserves to rounding),
        MambaLRP uses ``1e-6`` (sign-preserving), which loses ``~1e-6/|x|`` per activation.
    detach_ssm : bool
        Stop-gradient on the data-dependent recurrence parameters (Mamba's Ā, B̄, C and Δ;
        Mamba2's Δ, decays, B, C; RWKV's ``exp(k)``, decays and normaliser; RG-LRU's gates):
        the recurrence is linear in its input.
    half_gate : bool
        Uniform (half) rule on gated products (``y ⊙ SiLU(z)``, ``σ(r) ⊙ wkv``, ``x ⊙ GELU(y)``).
    detach_softmax : bool
        Softmax probabilities held constant (queries and keys detached; CP-LRP), so softmax
        attention is linear in its values (RecurrentGemma's local attention).
    detach_routing : bool
        Mixture-of-experts routing weights (and shared-expert gates) held constant, so a MoE
        block is a sum of its experts with constant weights.
    detach_norm : bool
        Stop-gradient on norm scales (RMSNorm ``rsqrt(mean x² + ε)``; the CP-LRP LN rule).
    exact_casts : bool
        Absorb the rounding of float32 casts inside float64 models into the gradient
        (:func:`~captum_implicit.lrp.primitives.cast_rule`), so conservation is exact to
        float64 rounding. MambaLRP passes gradients through casts unchanged (``False``).
    """

    identity_act: bool = True
    act_stabilizer: float = 0.0
    detach_ssm: bool = True
    half_gate: bool = True
    detach_softmax: bool = True
    detach_routing: bool = True
    detach_norm: bool = True
    exact_casts: bool = True

    def without(self, *names: str) -> GatedLinearRules:
        """A copy with the named boolean rules switched off (ablations)."""
        return replace(self, **{n: False for n in names})


#: MambaLRP's rule set (Rezaei Jafari et al. 2024, official code): stabiliser 1e-6, plain casts.
MAMBALRP_RULES = GatedLinearRules(act_stabilizer=1e-6, exact_casts=False)


LRPForward = Callable[..., Any]


@dataclass(frozen=True)
class LRPForm:
    """The LRP form of one family of module classes.

    Parameters
    ----------
    family : str
    classes : tuple of str or type
        Qualified class names (``"pkg.mod.Class"``, nothing imported) or classes.
    forward : callable ``(module, rules, *args, **kwargs) -> output``
        Same signature and output as the class's ``forward`` after ``module, rules``.
    notes : str
    """

    family: str
    classes: tuple[str | type, ...]
    forward: LRPForward
    notes: str = ""

    def matches(self, module: nn.Module) -> bool:
        cls = type(module)
        qual = f"{cls.__module__}.{cls.__qualname__}"
        return any(c is cls if isinstance(c, type) else c == qual for c in self.classes)


_FORMS: list[LRPForm] = []


def register_lrp_form(form: LRPForm, *, first: bool = True) -> LRPForm:
    """Register ``form``; user registrations take precedence over built-ins (``first=True``)."""
    if first:
        _FORMS.insert(0, form)
    else:
        _FORMS.append(form)
    return form


def unregister_lrp_form(form: LRPForm) -> None:
    _FORMS.remove(form)


#: Built-in family modules (``captum_implicit.lrp.<name>``), each registering its forms on import.
#: Adding a family: one file with its forms and ``register_lrp_form`` calls, and one name here.
BUILTIN_FAMILIES: tuple[str, ...] = (
    "mamba", "mamba2", "rwkv", "recurrent_gemma", "qwen3_next", "jamba", "lfm2", "kimi_linear", "mamba2_hybrids",
    "falcon_h1", "zamba2", "xlstm", "minimax", "qwen3_5", "lfm2_moe", "lfm3", "bailing_hybrid", "glm5_next",
    "lara_mini", "olmo_hybrid", "qwen4_exp", "falcon_mamba", "zamba", "mamba_ssm", "fla",
    "norms",
)


def lrp_forms() -> list[LRPForm]:
    """All registered forms, built-ins loaded on first use."""
    for name in BUILTIN_FAMILIES:
        importlib.import_module(f"{__package__}.{name}")
    return list(_FORMS)


def find_lrp_form(module: nn.Module, forms: Sequence[LRPForm] | None = None) -> LRPForm | None:
    for form in lrp_forms() if forms is None else forms:
        if form.matches(module):
            return form
    return None


def mixers_without_lrp_form(model: nn.Module) -> list[str]:
    """``"name (Class)"`` of every token mixer in ``model`` that captum-implicit explains (a registered capture
    adapter) but no LRP form covers: such a layer would run its plain forward and leak relevance."""
    from ..core.registry import find_adapter

    return [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if find_adapter(m) is not None and find_lrp_form(m) is None
    ]


_MARK = "__captum_implicit_lrp_form__"


class GatedLinearCanonizer(AttributeCanonizer):
    """Swap the forward of every supported module instance for its LRP form.

    Parameters
    ----------
    rules : GatedLinearRules, optional
        Rule flags passed to every form (default: all rules, exact).
    forms : sequence of LRPForm, optional
        Restrict to these forms (default: every registered form).

    Notes
    -----
    ``remove()`` restores the instance's previous ``forward`` attribute (or deletes ours
    when there was none), so the class method is visible again and stacked canonizers
    unwind correctly when removed in reverse order.
    """

    def __init__(self, rules: GatedLinearRules | None = None, forms: Sequence[LRPForm] | None = None) -> None:
        self.rules = rules if rules is not None else GatedLinearRules()
        self.forms = None if forms is None else tuple(forms)
        super().__init__(self._attribute_map)
        self._previous: dict[str, Any] = {}

    def _attribute_map(self, name: str, module: nn.Module) -> dict[str, Any] | None:
        form = find_lrp_form(module, self.forms)
        if form is None:
            return None
        forward = functools.partial(form.forward, module, self.rules)
        setattr(forward, _MARK, form)
        return {"forward": forward}

    def register(self, module: nn.Module, attributes: dict[str, Any]) -> None:
        self._previous = {k: module.__dict__[k] for k in attributes if k in module.__dict__}
        super().register(module, attributes)

    def remove(self) -> None:
        if self.module is None:
            return
        for key in self.attribute_keys:
            if key in self._previous:
                setattr(self.module, key, self._previous[key])
            elif key in self.module.__dict__:
                delattr(self.module, key)
        self.module, self._previous = None, {}

    def copy(self) -> GatedLinearCanonizer:
        return GatedLinearCanonizer(self.rules, self.forms)


def is_canonized(module: nn.Module) -> bool:
    """Whether ``module`` currently runs an LRP form."""
    return hasattr(module.__dict__.get("forward"), _MARK)

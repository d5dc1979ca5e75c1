"""Zennit composites for gated-linear models (registered as ``'gated_linear'`` and ``'mamba_lrp'``).

A composite is the canonizer (LRP forms of mixers, norms, blocks) plus an optional layer
map of GI-convention Zennit rules for the linear layers. With an empty layer map every
linear layer is LRP-0 (the plain gradient), which is MambaLRP's default. Relevance is read
as ``input ⊙ gradient`` — e.g. with :class:`zennit.attribution.Gradient` on the embeddings,
or with :class:`~captum_implicit.lrp.attribution.GatedLinearLRP`.

Conservation: with biases zero, ``Σ relevance(inputs) = f`` to float64 rounding. With
biases, each bias ``b`` absorbs ``Σ b ⊙ ∂f/∂b`` (the same modified backward), and
``Σ relevance(inputs) + Σ_b b ⊙ grad_b = f`` (``dt_proj.bias`` only feeds the detached Δ
and absorbs nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from zennit.canonizers import Canonizer
from zennit.composites import LayerMapComposite, register_composite
from zennit.core import Hook

from .canonizers import MAMBALRP_RULES, GatedLinearCanonizer, GatedLinearRules, LRPError, mixers_without_lrp_form
from .rules import GIGamma, GIRule

LayerMap = Sequence[tuple[Any, Hook]]


def _check_gi(layer_map: LayerMap) -> list[tuple[Any, Hook]]:
    for types, rule in layer_map:
        if not isinstance(rule, GIRule):
            raise TypeError(
                f"layer_map rule {type(rule).__name__} for {types} speaks Zennit's relevance convention, but the "
                "canonized gated-linear layers pass gradients (relevance = input × gradient); mixing them corrupts "
                "the attribution. Wrap it: GIRule(zennit.rules.Epsilon(...))."
            )
    return list(layer_map)


class GatedLinearComposite(LayerMapComposite):
    """Gradient×input LRP for gated-linear RNNs / SSMs with exact conservation.

    Parameters
    ----------
    rules : GatedLinearRules, optional
        Rule flags of the LRP forms (default: every rule on, exact identity rule and casts).
    layer_map : list of (module types, GIRule), optional
        Rules for linear layers, e.g. ``[(torch.nn.Conv1d, GIGamma(0.25))]``; first match wins.
        Only :class:`~captum_implicit.lrp.rules.GIRule` instances are accepted.
    canonizers : list of zennit Canonizer, optional
        Further canonizers, applied after the gated-linear one.
    strict : bool
        Refuse (:class:`LRPError`, on registration) a model containing a token mixer that
        captum-implicit explains (a registered adapter class) but has no LRP form for: without its
        form such a layer runs its plain forward and relevance is not conserved. ``False``
        lets it run as is (the convergence delta then shows the leak).

    Examples
    --------
    >>> with GatedLinearComposite().context(model):          # doctest: +SKIP
    ...     logits = model(inputs_embeds=emb).logits
    ...     (emb.grad,) = torch.autograd.grad(logits[:, -1, t].sum(), emb)
    """

    def __init__(
        self,
        rules: GatedLinearRules | None = None,
        layer_map: LayerMap | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = True,
    ) -> None:
        self.rules = rules if rules is not None else GatedLinearRules()
        self.strict = strict
        super().__init__(
            layer_map=_check_gi(layer_map or []),
            canonizers=[GatedLinearCanonizer(self.rules), *(canonizers or [])],
        )

    def register(self, module: nn.Module) -> None:
        if self.strict:
            _refuse_mixers_without_form(module)
        # undo everything if a canonizer or hook fails half-way (Zennit would leave it applied)
        try:
            super().register(module)
        except BaseException:
            self.remove()
            raise


def _refuse_mixers_without_form(model: nn.Module) -> None:
    missing = mixers_without_lrp_form(model)
    if missing:
        raise LRPError(
            f"no LRP form for the token mixer(s) {', '.join(missing)}: relevance would not be conserved through "
            "them. Register one with captum_implicit.lrp.register_lrp_form, or pass strict=False to run them "
            "unchanged (docs/supported.md lists the classes with LRP forms)."
        )


class MambaLRPComposite(GatedLinearComposite):
    """MambaLRP's rule set (Rezaei Jafari et al., NeurIPS 2024), as in the official code.

    Identity rule on SiLUs with MambaLRP's sign-preserving stabiliser ``1e-6``, Ā/B̄/C
    detached, half rule on ``y ⊙ SiLU(z)``, RMSNorm scale detached, gradients through dtype
    casts unchanged, LRP-0 on the linear layers. ``gamma`` adds LRP-γ on ``nn.Linear`` and
    ``nn.Conv1d`` (Zennit's generalised γ; MambaLRP's own γ differs only in splitting
    outputs at ``z > 1e-6`` instead of ``z > 0``).

    Because of the stabiliser, conservation holds to ``~1e-6/|x|`` per activation, not to
    rounding; use :class:`GatedLinearComposite` for exact conservation.
    """

    def __init__(
        self,
        gamma: float | None = None,
        layer_map: LayerMap | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = True,
    ) -> None:
        layer_map = list(layer_map or [])
        if gamma is not None:
            layer_map += [((nn.Linear, nn.Conv1d), GIGamma(gamma))]
        super().__init__(rules=MAMBALRP_RULES, layer_map=layer_map, canonizers=canonizers, strict=strict)


register_composite("gated_linear")(GatedLinearComposite)
register_composite("mamba_lrp")(MambaLRPComposite)

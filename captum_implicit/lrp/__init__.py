"""LRP for gated-linear RNNs / SSMs in Zennit's orthogonal pieces (gradient×input convention).

* :mod:`.primitives` — detach primitives (identity rule, uniform rule, stop-gradient, exact casts);
* :mod:`.rules` — Zennit rules (ε, γ, z⁺) for linear layers, wrapped to speak gradient×input;
* :mod:`.canonizers` — per-instance forward swaps of mixers / norms / blocks for their LRP forms;
* :mod:`.composites` — :class:`GatedLinearComposite` (``'gated_linear'``) and
  :class:`MambaLRPComposite` (``'mamba_lrp'``) in Zennit's composite registry;
* :mod:`.attribution` — :class:`GatedLinearLRP`, the Captum attribution.

Families (one file each): HF Mamba (:mod:`.mamba`), Mamba2 (:mod:`.mamba2`), RWKV (:mod:`.rwkv`),
RecurrentGemma / Griffin (:mod:`.recurrent_gemma`), and ``nn.LayerNorm`` (:mod:`.norms`). A new
family registers one :class:`LRPForm` per module class with :func:`register_lrp_form` (built-ins:
one file plus its name in ``canonizers.BUILTIN_FAMILIES``). Only the Zennit API shared by 0.5.1
and 1.0 is used.
"""

from .attribution import GatedLinearLRP
from .canonizers import (
    MAMBALRP_RULES,
    GatedLinearCanonizer,
    GatedLinearRules,
    LRPError,
    LRPForm,
    is_canonized,
    lrp_forms,
    register_lrp_form,
    unregister_lrp_form,
)
from .composites import GatedLinearComposite, MambaLRPComposite
from .primitives import cast_rule, identity_rule, proportional, round_rule, stop_gradient, uniform_rule
from .rules import GIEpsilon, GIGamma, GIRule, GIZPlus

__all__ = [
    "MAMBALRP_RULES",
    "GIEpsilon",
    "GIGamma",
    "GIRule",
    "GIZPlus",
    "GatedLinearCanonizer",
    "GatedLinearComposite",
    "GatedLinearLRP",
    "GatedLinearRules",
    "LRPError",
    "LRPForm",
    "MambaLRPComposite",
    "cast_rule",
    "identity_rule",
    "is_canonized",
    "lrp_forms",
    "proportional",
    "register_lrp_form",
    "round_rule",
    "stop_gradient",
    "uniform_rule",
    "unregister_lrp_form",
]

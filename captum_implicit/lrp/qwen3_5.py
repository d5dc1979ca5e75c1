"""LRP forms of HF transformers' Qwen3.5 and Qwen3.5-MoE (text models): Qwen3-Next's layers, re-registered.

Every class but the Gated DeltaNet has Qwen3-Next's forward verbatim (checked against transformers 5.24), so
the Qwen3-Next forms are registered for them (:mod:`captum_implicit.lrp.qwen3_next`; the forms look up RoPE,
eager attention and the delta-rule kernel in the module's own transformers file):

* ``Qwen3_5GatedDeltaNet`` / ``Qwen3_5MoeGatedDeltaNet``: Qwen3-Next's layer with separate input projections
  (``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a`` instead of the interleaved ``in_proj_qkvz`` /
  ``in_proj_ba``); after them it is Qwen3-Next's (identity rule on the conv's SiLU; q, k, β, decays held; the
  float32 kernel made exact; gated norm);
* ``*RMSNormGated``, ``*Attention`` (sigmoid output gate), ``*MLP``, ``*RMSNorm`` (``1 + w``): Qwen3-Next's;
* ``Qwen3_5MoeExperts`` / ``Qwen3_5MoeSparseMoeBlock``: Qwen3-Next's (routing weights and the shared expert's
  gate held; the router always renormalises its top-k, which the held weights carry).

A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import mask_padding, refuse_cached_state
from .qwen3_next import (
    gdn_after_projections,
    qwen3_next_attention_lrp,
    qwen3_next_experts_lrp,
    qwen3_next_moe_lrp,
    rms_norm_gated_lrp,
)
from .recurrent_gemma import rg_mlp_lrp, rg_rms_norm_lrp

_HF = {"qwen3_5": "transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5",
       "qwen3_5_moe": "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5Moe"}


def split_gdn_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """LRP form of a Gated DeltaNet with separate q/k/v, z, b, a projections (Qwen3.5); (b, L, H) -> (b, L, H)."""
    if cache is None:
        cache = kwargs.pop("cache_params", None)
    hidden_states = mask_padding(hidden_states, attention_mask)
    refuse_cached_state(module, cache)
    batch, seq_len = hidden_states.shape[:2]
    mixed = module.in_proj_qkv(hidden_states)
    z = module.in_proj_z(hidden_states).reshape(batch, seq_len, -1, module.head_v_dim)
    return gdn_after_projections(
        module, rules, mixed, z, module.in_proj_b(hidden_states), module.in_proj_a(hidden_states), cache
    )


_FORMS = [
    ("GatedDeltaNet", split_gdn_lrp,
     "separate q/k/v, z, b, a projections, then Qwen3-Next's: identity rule on the conv's SiLU; q, k, β, decays "
     "held: delta rule linear in v; float32 kernel made exact"),
    ("RMSNormGated", rms_norm_gated_lrp, "1/rms held, half rule on norm(y) ⊙ SiLU(z), float32 made exact"),
    ("Attention", qwen3_next_attention_lrp,
     "softmax probabilities held (q, k detached): linear in V; half rule on o ⊙ σ(gate)"),
    ("MLP", rg_mlp_lrp, "identity rule on SiLU, half rule on SiLU(gate) ⊙ up"),
    ("RMSNorm", rg_rms_norm_lrp, "scale held (LN rule) with (1 + w), float32 computation made exact"),
]
_MOE_FORMS = [
    ("Experts", qwen3_next_experts_lrp, "per expert: identity rule on SiLU, half rule; routing weights held"),
    ("SparseMoeBlock", qwen3_next_moe_lrp, "routing weights and the shared expert's gate held constant"),
]

for _family, _prefix in _HF.items():
    for _cls, _fwd, _note in _FORMS + (_MOE_FORMS if _family == "qwen3_5_moe" else []):
        register_lrp_form(LRPForm(family=_family, classes=(f"{_prefix}{_cls}",), forward=_fwd, notes=_note),
                          first=False)

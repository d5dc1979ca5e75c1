"""LRP forms of HF transformers' OlmoHybrid (Gated DeltaNet + q/k-norm softmax attention, dense MLP).

Existing forms serve the classes whose forwards match (checked against transformers 5.24):

* ``OlmoHybridGatedDeltaNet``: separate q/k/v/a/b projections and a ``g_proj`` output gate, then Qwen3-Next's
  layer (:func:`~captum_implicit.lrp.qwen3_next.gdn_after_projections`, which doubles β where
  ``allow_neg_eigval`` and uses ``o_norm``/``o_proj``);
* ``OlmoHybridRMSNormGated``: Qwen3-Next's; ``OlmoHybridMLP``: Qwen3-Next's;
* ``OlmoHybridAttention``: LFM3's q/k-norm attention (norms over the whole projection, optional RoPE, no gate);
* ``OlmoHybridRMSNorm``: LaraMini's plain RMSNorm with the weight in the model's dtype.

A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import mask_padding, refuse_cached_state
from .lara_mini import plain_rms_norm_lrp
from .lfm3 import qk_norm_attention_lrp
from .qwen3_next import gdn_after_projections, rms_norm_gated_lrp
from .recurrent_gemma import rg_mlp_lrp

_HF = "transformers.models.olmo_hybrid.modeling_olmo_hybrid"


def olmo_gdn_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """LRP form of ``OlmoHybridGatedDeltaNet.forward``; (b, L, H) -> (b, L, H)."""
    if cache is None:
        cache = kwargs.pop("cache_params", None)
    hidden_states = mask_padding(hidden_states, attention_mask)
    refuse_cached_state(module, cache)
    batch, seq_len = hidden_states.shape[:2]
    h = hidden_states
    mixed = torch.cat([module.q_proj(h), module.k_proj(h), module.v_proj(h)], dim=-1)
    z = module.g_proj(h).reshape(batch, seq_len, -1, module.head_v_dim)
    return gdn_after_projections(module, rules, mixed, z, module.b_proj(h), module.a_proj(h), cache)


for _cls, _fwd, _note in [
    ("OlmoHybridGatedDeltaNet", olmo_gdn_lrp,
     "separate projections, then Qwen3-Next's: identity rule on the conv's SiLU; q, k, β, decays held: delta rule "
     "linear in v; float32 kernel made exact"),
    ("OlmoHybridRMSNormGated", rms_norm_gated_lrp, "1/rms held, half rule on norm(y) ⊙ SiLU(z), float32 made exact"),
    ("OlmoHybridAttention", qk_norm_attention_lrp, "softmax probabilities held (q, k detached): linear in V"),
    ("OlmoHybridMLP", rg_mlp_lrp, "identity rule on SiLU, half rule on SiLU(gate) ⊙ up"),
    ("OlmoHybridRMSNorm", functools.partial(plain_rms_norm_lrp, weight_in_float32=False),
     "scale held (LN rule), float32 computation made exact"),
]:
    register_lrp_form(
        LRPForm(family="olmo_hybrid", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False
    )

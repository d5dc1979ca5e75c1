"""LRP forms of HF transformers' Bailing-Hybrid (Ling 3: KDA + gated MLA softmax attention + MoE).

Kimi-Linear's forms serve the classes whose forwards are Kimi-Linear's (:mod:`captum_implicit.lrp.kimi_linear`,
checked against transformers 5.24):

* ``BailingHybridDeltaAttention``: KDA as Kimi's, its output gate one projection ``g_proj`` instead of the
  low-rank ``g_b_proj ∘ g_a_proj`` (the decay comes from ``BailingHybridForgetGate``, held with q, k, β);
* ``BailingHybridRMSNormGated``, ``BailingHybridRMSNorm``, ``BailingHybridMLP``, ``BailingHybridExperts``,
  ``BailingHybridMoE``: Kimi-Linear's.

``BailingHybridAttention`` is a new form: MLA with interleaved RoPE on the shared rotary key and a per-head sigmoid
output gate (computed in float32). Softmax probabilities held (queries and the expanded keys detached after RoPE;
CP-LRP): with the latent norm's scale held the values ``kv_b_proj(RMSNorm(kv_a(x)))`` are linear in x; the gated
product ``o_h ⊙ σ(g_proj x)_h`` takes the half rule, the sigmoid the identity rule.

A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import act, fill_cache_first_call, half_rule, hold
from .kimi_linear import kda_lrp, kimi_moe_lrp, kimi_rms_norm_gated_lrp
from .mamba import rms_norm_lrp
from .qwen3_next import qwen3_next_experts_lrp
from .recurrent_gemma import rg_mlp_lrp

_HF = "transformers.models.bailing_hybrid.modeling_bailing_hybrid"


def _sigmoid32(x: Tensor) -> Tensor:
    # HF: torch.sigmoid(g.float()).to(dtype); under the identity rule the relevance is out · grad whatever the dtype
    return torch.sigmoid(x.float()).to(x.dtype)


def bailing_attention_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    attention_mask: Tensor | None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """LRP form of ``BailingHybridAttention.forward`` (gated MLA): probabilities held, gate split half/half."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bailing_hybrid.modeling_bailing_hybrid import (
        apply_rotary_pos_emb_interleave,
        eager_attention_forward,
    )

    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    batch, seq_len = hidden_states.shape[:-1]
    if module.q_lora_rank is None:
        q_states = module.q_proj(hidden_states)
    else:
        q_states = module.q_b_proj(module.q_a_layernorm(module.q_a_proj(hidden_states)))
    q_states = q_states.view(batch, seq_len, -1, module.qk_head_dim).transpose(1, 2)
    q_pass, q_rot = torch.split(q_states, [module.qk_nope_head_dim, module.qk_rope_head_dim], dim=-1)
    kv_nope, k_rot = torch.split(
        module.kv_a_proj_with_mqa(hidden_states), [module.kv_lora_rank, module.qk_rope_head_dim], dim=-1
    )
    kv_nope = module.kv_a_layernorm(kv_nope).view(batch, 1, seq_len, module.kv_lora_rank)
    k_rot = k_rot.view(batch, 1, seq_len, module.qk_rope_head_dim)
    cos, sin = position_embeddings
    q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
    if cache is not None:  # HF expands K and V from the cache's copies of the latents: same layout
        kv_nope, k_rot = fill_cache_first_call(module, cache, kv_nope, k_rot, kwargs, what="latent")
    query = hold(torch.cat((q_pass, q_rot), dim=-1), rules.detach_softmax)
    key, value = module.expand_kv(kv_nope, k_rot)
    key = hold(key, rules.detach_softmax)  # the keys share kv_b_proj with the values: only the keys are held
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)
    out, weights = interface(
        module, query, key, value, attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout, scaling=module.scaling, **kwargs,
    )
    out = out * act(_sigmoid32, module.g_proj(hidden_states), rules).unsqueeze(-1)
    out = half_rule(out, rules)
    return module.o_proj(out.reshape(batch, seq_len, -1).contiguous()), weights


for _cls, _fwd, _note in [
    ("BailingHybridDeltaAttention", kda_lrp,
     "as Kimi's KDA (single g_proj output gate): identity rule on the conv's SiLU; q, k, β, channel-wise decays "
     "held: delta rule linear in v; float32 kernel made exact"),
    ("BailingHybridRMSNormGated", kimi_rms_norm_gated_lrp,
     "1/rms held, half rule on norm(y) ⊙ σ(z), float32 made exact"),
    ("BailingHybridAttention", bailing_attention_lrp,
     "gated MLA: softmax probabilities held (q, expanded k detached after RoPE): linear in the value latents; "
     "half rule on o ⊙ σ(g_proj x) per head"),
    ("BailingHybridMLP", rg_mlp_lrp, "identity rule on SiLU, half rule on SiLU(gate) ⊙ up"),
    ("BailingHybridExperts", qwen3_next_experts_lrp,
     "per expert: identity rule on SiLU, half rule; routing weights held"),
    ("BailingHybridMoE", kimi_moe_lrp, "router's top-k weights held constant; shared experts added"),
    ("BailingHybridRMSNorm", rms_norm_lrp, "scale held (LN rule), float32 computation made exact"),
]:
    register_lrp_form(
        LRPForm(family="bailing_hybrid", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False
    )

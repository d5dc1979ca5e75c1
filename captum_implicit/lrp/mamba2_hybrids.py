"""LRP forms of the HF hybrids whose Mamba2 mixer is HF's ``Mamba2Mixer`` line for line: Bamba, NemotronH and
GraniteMoeHybrid (mostly registrations of existing forms, hence one file), plus the softmax attention form these
hybrids, FalconH1 and Zamba2 share.

Rules:

* ``BambaMixer`` / ``NemotronHMamba2Mixer`` / ``GraniteMoeHybridMambaLayer``: the Mamba2 form
  (:func:`~captum_implicit.lrp.mamba2.mamba2_mixer_lrp`): identity rule on the conv's activation and the gate's
  SiLU, Δ / decays / B / C held, half rule in the grouped gated RMSNorm, its float32 region made exact;
* attention (``BambaAttention``, ``NemotronHAttention`` without RoPE, ``GraniteMoeHybridAttention`` with its
  ``attention_multiplier`` scaling, ``FalconH1Attention`` with its ``key_multiplier``): softmax probabilities
  held (queries and keys detached after RoPE; CP-LRP), so it is linear in V;
* MLPs: identity rule on the activation, half rule on a gated product (Bamba's ``SiLU(gate) ⊙ up``, Granite's
  shared MLP); NemotronH's MLP ``down(act(up x))`` has no product;
* ``GraniteMoeHybridMoE``: the router's top-k softmax weights held; ``NemotronHMoE``: the sigmoid router's
  weights held, the latent projections and the shared experts linear paths;
* RMSNorms: scale held (LN rule); NemotronH's keeps ``weight`` in float32, so its form is the diagonal map
  ``x ↦ (value / x) · x`` (scale, weight and casts constant).

A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import act, cast, half_rule, held_softmax_attention, hold, project_heads
from .jamba import jamba_moe_lrp
from .mamba import rms_norm_lrp
from .mamba2 import mamba2_mixer_lrp
from .primitives import proportional
from .qwen3_next import qwen3_next_experts_lrp
from .recurrent_gemma import rg_mlp_lrp

_MODELS = "transformers.models"


def softmax_attention_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    *,
    position_embeddings: tuple[Tensor, Tensor] | None = None,
    attention_mask: Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """LRP form of a Llama-style ``*Attention.forward`` (q/k/v/o projections, optional RoPE): q, k held.

    ``hidden_states`` (b, L, H) -> ((b, L, H), weights). The module's own modeling file supplies RoPE and the eager
    attention; a ``key_multiplier`` attribute (FalconH1) scales the keys as HF does. The hybrids order their
    arguments differently and always call attention by keyword, hence keyword-only arguments here.
    """

    hf = sys.modules[type(module).__module__]
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    query, key, value = project_heads(module, hidden_states, "q_proj", "k_proj", "v_proj")
    if getattr(module, "key_multiplier", None) is not None:
        key = key * module.key_multiplier
    if position_embeddings is not None:
        cos, sin = position_embeddings
        query, key = hf.apply_rotary_pos_emb(query, key, cos, sin)
    out, weights = held_softmax_attention(
        module, rules, query, key, value, attention_mask, cache, kwargs, hf.eager_attention_forward
    )
    return module.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def fp32_weight_rms_norm_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor) -> Tensor:
    """LRP form of an RMSNorm computing ``(w.float() · x · rsqrt(mean x² + ε)).to(x.dtype)`` (NemotronH)."""
    if rules.detach_norm and rules.exact_casts:
        with torch.no_grad():
            value = type(module).forward(module, hidden_states)
        return proportional(hidden_states, value)  # scale, weight and casts constant: a diagonal map
    h = cast(hidden_states, torch.float32, rules)
    scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return (module.weight.to(torch.float32) * (h * hold(scale, rules.detach_norm))).to(hidden_states.dtype)


def granite_shared_mlp_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor) -> Tensor:
    """LRP form of ``GraniteMoeHybridMLP.forward``: ``out(act(a) ⊙ b)`` with ``(a, b) = in(x)``."""
    gate, up = module.input_linear(hidden_states).chunk(2, dim=-1)
    return module.output_linear(half_rule(act(module.activation, gate, rules) * up, rules))


def nemotron_h_mlp_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor) -> Tensor:
    """LRP form of ``NemotronHMLP.forward``: ``down(act(up x))`` (no gated product)."""
    return module.down_proj(act(module.act_fn, module.up_proj(x), rules))


def nemotron_h_experts_lrp(
    module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """LRP form of ``NemotronHExperts.forward``: per expert ``down(act(up x))``, routing weights held.

    HF accumulates in the router's dtype (float32, even in a float64 model); with ``rules.exact_casts`` the
    relevance path accumulates in the input's dtype (else in HF's), and the value is HF's own forward (whichever
    experts kernel it dispatches to), joined by :func:`proportional`, so the float32 rounding is absorbed into the
    gradient.
    """
    top_k_weights = hold(top_k_weights, rules.detach_routing)
    final = torch.zeros_like(hidden_states, dtype=hidden_states.dtype if rules.exact_casts else top_k_weights.dtype)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=module.num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().squeeze(-1)
    for expert_idx in expert_hit.tolist():
        if expert_idx == module.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        h = act(module.act_fn, F.linear(hidden_states[token_idx], module.up_proj[expert_idx]), rules)
        h = F.linear(h, module.down_proj[expert_idx]) * top_k_weights[token_idx, top_k_pos, None]
        final = final.index_add(0, token_idx, h.to(final.dtype))
    with torch.no_grad():
        value = type(module).forward(module, hidden_states, top_k_index, top_k_weights)
    return proportional(final, value.to(final.dtype))


def nemotron_h_moe_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor) -> Tensor:
    """LRP form of ``NemotronHMoE.forward``: the router's weights held, experts and shared experts added."""
    shape = hidden_states.shape
    _, weights, index = module.gate(hidden_states)
    flat = module.fc1_latent_proj(hidden_states.view(-1, shape[-1]))
    out = module.fc2_latent_proj(module.experts(flat, index, hold(weights, rules.detach_routing)))
    return out.view(*shape) + module.shared_experts(hidden_states)


_ATTN = "softmax probabilities held (q, k detached): linear in V"
_MIXER = "the Mamba2 form: identity rule on activations, Δ/decays/B/C held, half rule in the gated norm"
for _family, _module, _cls, _fwd, _note in [
    ("bamba", "bamba.modeling_bamba", "BambaMixer", mamba2_mixer_lrp, _MIXER),
    ("bamba", "bamba.modeling_bamba", "BambaAttention", softmax_attention_lrp, _ATTN),
    ("bamba", "bamba.modeling_bamba", "BambaMLP", rg_mlp_lrp, "identity rule on SiLU, half rule on SiLU(gate) ⊙ up"),
    ("bamba", "bamba.modeling_bamba", "BambaRMSNorm", rms_norm_lrp, "scale held (LN rule)"),
    ("nemotron_h", "nemotron_h.modeling_nemotron_h", "NemotronHMamba2Mixer", mamba2_mixer_lrp, _MIXER),
    ("nemotron_h", "nemotron_h.modeling_nemotron_h", "NemotronHAttention", softmax_attention_lrp, _ATTN),
    ("nemotron_h", "nemotron_h.modeling_nemotron_h", "NemotronHMLP", nemotron_h_mlp_lrp,
     "identity rule on the activation"),
    ("nemotron_h", "nemotron_h.modeling_nemotron_h", "NemotronHExperts", nemotron_h_experts_lrp,
     "per expert: identity rule on the activation; routing weights held"),
    ("nemotron_h", "nemotron_h.modeling_nemotron_h", "NemotronHMoE", nemotron_h_moe_lrp,
     "router's weights held; latent projections and shared experts linear paths"),
    ("nemotron_h", "nemotron_h.modeling_nemotron_h", "NemotronHRMSNorm", fp32_weight_rms_norm_lrp,
     "scale held (LN rule); float32 weight and casts made exact"),
    ("granitemoehybrid", "granitemoehybrid.modeling_granitemoehybrid", "GraniteMoeHybridMambaLayer",
     mamba2_mixer_lrp, _MIXER),
    ("granitemoehybrid", "granitemoehybrid.modeling_granitemoehybrid", "GraniteMoeHybridAttention",
     softmax_attention_lrp, _ATTN),
    ("granitemoehybrid", "granitemoehybrid.modeling_granitemoehybrid", "GraniteMoeHybridMLP", granite_shared_mlp_lrp,
     "identity rule on the activation, half rule on act(a) ⊙ b"),
    ("granitemoehybrid", "granitemoehybrid.modeling_granitemoehybrid", "GraniteMoeHybridExperts",
     qwen3_next_experts_lrp, "per expert: identity rule on SiLU, half rule; routing weights held"),
    ("granitemoehybrid", "granitemoehybrid.modeling_granitemoehybrid", "GraniteMoeHybridMoE", jamba_moe_lrp,
     "router's top-k weights held constant"),
    ("granitemoehybrid", "granitemoehybrid.modeling_granitemoehybrid", "GraniteMoeHybridRMSNorm", rms_norm_lrp,
     "scale held (LN rule)"),
]:
    register_lrp_form(
        LRPForm(family=_family, classes=(f"{_MODELS}.{_module}.{_cls}",), forward=_fwd, notes=_note), first=False
    )

"""LRP forms of HF transformers' Jamba (Mamba + softmax attention + MoE hybrid).

Rules:

* ``JambaMambaMixer``: as HF Mamba's mixer (:mod:`captum_implicit.lrp.mamba`): identity rule
  on the conv's SiLU and the gate's SiLU, Ā, B̄ and C held (Jamba's extra RMSNorms on Δ, B and
  C only feed held quantities), half rule on ``y ⊙ SiLU(z)``;
* ``JambaAttention`` (no positional encoding): softmax probabilities held (queries and keys
  detached; CP-LRP), so it is linear in V;
* ``JambaMLP`` / ``JambaExperts``: identity rule on SiLU, half rule on ``SiLU(gate) ⊙ up``;
* ``JambaSparseMoeBlock``: the router's top-k softmax weights held (``rules.detach_routing``);
* ``JambaRMSNorm``: ``w · x · rsqrt(mean x² + ε)`` in float32, scale held (as ``MambaRMSNorm``).

A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPError, LRPForm, register_lrp_form
from .common import act, held_softmax_attention, hold, mask_padding, project_heads, refuse_cached_state
from .mamba import _conv_is_causal, rms_norm_lrp, selective_scan_lrp
from .qwen3_next import qwen3_next_experts_lrp
from .recurrent_gemma import rg_mlp_lrp

_HF = "transformers.models.jamba.modeling_jamba"


def jamba_mixer_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """LRP form of ``JambaMambaMixer.forward``; (b, L, H) -> (b, L, H).

    Also ``FalconMambaMixer``'s (the same forward: norms on Δ, B and C called as modules, weight-free there).
    """
    import torch.nn.functional as F

    if cache is None:
        cache = kwargs.pop("cache_params", None)
    name = type(module).__name__
    refuse_cached_state(module, cache)
    idx = module.layer_idx
    if module.use_mambapy:
        raise LRPError(f"{name}: use_mambapy=True (pscan) is not mirrored by the LRP form; set it False")
    seq_len, dtype = hidden_states.shape[1], hidden_states.dtype
    hidden_states = mask_padding(hidden_states, attention_mask)
    x, gate = module.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
    if cache is not None:
        cache.update_conv_state(x.detach(), idx, conv_kernel_size=module.conv_kernel_size)
    weight = module.conv1d.weight
    if _conv_is_causal(module.conv1d):
        pre = module.conv1d(x.to(weight.dtype))
    else:
        pre = F.conv1d(x.to(weight.dtype), weight, module.conv1d.bias, padding=weight.shape[-1] - 1,
                       groups=x.shape[1])
    u = act(module.act, pre[:, :, :seq_len], rules).to(x.dtype)
    u = mask_padding(u.transpose(1, 2), attention_mask)  # (b, L, C)
    time_step, B, C = torch.split(
        module.x_proj(u), [module.time_step_rank, module.ssm_state_size, module.ssm_state_size], dim=-1
    )
    time_step = module.dt_layernorm(time_step)
    B, C = module.b_layernorm(B), module.c_layernorm(C)
    if hasattr(module.config, "_is_quantized"):
        time_step = (module.dt_proj(time_step) - module.dt_proj.bias).transpose(1, 2)
    else:
        time_step = module.dt_proj.weight @ time_step.transpose(1, 2)
    dt_bias = module.dt_proj.bias.float() if module.dt_proj.bias is not None else None
    A = -torch.exp(module.A_log.float())
    y, last = selective_scan_lrp(
        u.transpose(1, 2), time_step, A, B.transpose(1, 2), C.transpose(1, 2), module.D.float(), gate, dt_bias, rules
    )
    if cache is not None:
        cache.update_recurrent_state(last.detach(), idx)
    return module.out_proj(y.transpose(1, 2).to(dtype))


def jamba_attention_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """LRP form of ``JambaAttention.forward``: HF's attention with queries and keys held constant."""
    from transformers.models.jamba.modeling_jamba import eager_attention_forward

    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    query, key, value = project_heads(module, hidden_states, "q_proj", "k_proj", "v_proj")
    out, weights = held_softmax_attention(
        module, rules, query, key, value, attention_mask, cache, kwargs, eager_attention_forward
    )
    return module.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def jamba_moe_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor) -> Tensor:
    """LRP form of ``JambaSparseMoeBlock.forward``: the router's weights held constant."""
    batch, seq_len, hidden = hidden_states.shape
    flat = hidden_states.view(-1, hidden)
    routed = module.router(flat)
    if not (isinstance(routed, tuple) and len(routed) == 3):  # transformers < 5.2x: a Linear router
        raise LRPError(
            f"{type(module).__name__}: this transformers version routes inside the block (its router returns "
            f"{type(routed).__name__}); the Jamba LRP form follows the router of transformers ≥ 5.2x"
        )
    _, weights, index = routed
    out = module.experts(flat, index, hold(weights, rules.detach_routing))
    return out.reshape(batch, seq_len, hidden)


for _cls, _fwd, _note in [
    ("JambaMambaMixer", jamba_mixer_lrp, "identity rule on SiLUs, Ā/B̄/C held, half rule on the gate"),
    ("JambaAttention", jamba_attention_lrp, "softmax probabilities held (q, k detached): linear in V"),
    ("JambaMLP", rg_mlp_lrp, "identity rule on SiLU, half rule on SiLU(gate) ⊙ up"),
    ("JambaExperts", qwen3_next_experts_lrp, "per expert: identity rule on SiLU, half rule; routing weights held"),
    ("JambaSparseMoeBlock", jamba_moe_lrp, "router's top-k weights held constant"),
    ("JambaRMSNorm", rms_norm_lrp, "scale held (LN rule)"),
]:
    register_lrp_form(LRPForm(family="jamba", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)

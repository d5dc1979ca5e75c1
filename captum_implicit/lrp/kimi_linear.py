"""LRP forms of HF transformers' Kimi-Linear (Kimi Delta Attention + MLA softmax attention + MoE hybrid).

Rules:

* ``KimiLinearDeltaAttention`` (KDA): the conv on (q, k, v) is linear, its SiLU takes the identity
  rule; the delta rule's queries, keys (after their L2 norm), betas and per-key-channel decays
  are held constant (``rules.detach_ssm``), so
  ``S_t = Diag(e^{g_t}) S_{t-1} … (I − β_t k_t k_tᵀ) + β_t k_t v_tᵀ`` and ``o_t = S_tᵀ q_t`` are
  linear in v. HF computes the delta rule in float32 even in a float64 model: the value is HF's
  own chunked kernel, the relevance a float64 recurrence
  (:func:`~captum_implicit.lrp.common.exact_region`);
* ``KimiLinearRMSNormGated``: ``w ⊙ norm(y) ⊙ σ(z)`` in float32: 1/rms held, half rule on the
  product, identity rule on the sigmoid; its float32 region made exact;
* ``KimiLinearAttention`` (MLA, no positional encoding): softmax probabilities held (queries and
  the expanded keys detached; CP-LRP). The values ``kv_b_proj(RMSNorm(kv_a_proj(x)))`` are linear
  in x once the latent norm's scale is held, so the layer is linear in its input;
* ``KimiLinearMLP`` / ``KimiLinearExperts``: ``SiLU(gate) ⊙ up``: half rule, identity on SiLU;
* ``KimiLinearMoE``: the router's top-k weights held constant (``rules.detach_routing``): a sum
  of experts with constant weights plus the shared experts;
* ``KimiLinearRMSNorm``: ``w · x · rsqrt(mean x² + ε)`` in float32, scale held (as ``MambaRMSNorm``).

A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import (
    act, exact_region, fill_cache_first_call, half_rule, held_delta_rule, hold, mask_padding, refuse_cached_state,
)
from .mamba import _conv_is_causal, rms_norm_lrp
from .qwen3_next import qwen3_next_experts_lrp
from .recurrent_gemma import rg_mlp_lrp

_HF = "transformers.models.kimi_linear.modeling_kimi_linear"


def _hf() -> Any:
    import importlib

    return importlib.import_module(_HF)


def _l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    # HF's (and FLA's) KDA l2norm: x / sqrt(Σx² + ε), not x · rsqrt(…)
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def kda_recurrent(
    query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor, compute_dtype: torch.dtype
) -> Tensor:
    """The Kimi delta rule token by token in ``compute_dtype`` (HF's ``recurrent_kimi_delta_attention``, no cache).

    Parameters
    ----------
    query, key : (b, L, h, dk)  before the L2 norm (applied here, as HF's ``use_qk_l2norm_in_kernel``)
    value : (b, L, h, dv)
    g : (b, L, h, dk)  per-key-channel log decays (≤ 0)
    beta : (b, L, h)

    Returns
    -------
    (b, L, h, dv) in ``value.dtype``; linear in ``value`` (the other inputs enter as coefficients).
    """
    q, k, v, d, b = (x.to(compute_dtype) for x in (query, key, value, g, beta))
    q, k = _l2norm(q), _l2norm(k)
    q = q * (1 / (q.shape[-1] ** 0.5))
    state = v.new_zeros(v.shape[0], v.shape[2], k.shape[-1], v.shape[-1])
    outs = []
    for t in range(v.shape[1]):
        state = state * d[:, t][..., None].exp()  # channel-wise decay: one factor per key dim
        kv_mem = (state * k[:, t][..., None]).sum(dim=-2)
        delta = (v[:, t] - kv_mem) * b[:, t][..., None]
        state = state + k[:, t].unsqueeze(-1) * delta.unsqueeze(-2)
        outs.append((state * q[:, t].unsqueeze(-1)).sum(dim=-2))
    return torch.stack(outs, dim=1).to(value.dtype)


def kda_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """LRP form of ``KimiLinearDeltaAttention.forward``; (b, L, H) -> (b, L, H)."""
    hf = _hf()
    if cache is None:
        cache = kwargs.pop("cache_params", None)
    refuse_cached_state(module, cache)
    idx = module.layer_idx
    hidden_states = mask_padding(hidden_states, attention_mask)
    batch, seq_len = hidden_states.shape[:2]
    hidden_shape = (batch, seq_len, -1, module.head_dim)
    mixed = torch.cat(
        [module.q_proj(hidden_states), module.k_proj(hidden_states), module.v_proj(hidden_states)], dim=-1
    ).transpose(1, 2)
    if cache is not None:  # HF conv's the (possibly left-padded) prefill it caches; same numbers, live graph
        full = cache.update_conv_state(mixed.detach(), idx, conv_kernel_size=module.conv_kernel_size)
        mixed = F.pad(mixed, (full.shape[-1] - seq_len, 0))
    weight = module.conv1d.weight
    if _conv_is_causal(module.conv1d):  # the module computes HF's conv: call it so Zennit rules can attach
        conv = module.conv1d(mixed.to(weight.dtype))
    else:
        conv = F.conv1d(mixed.to(weight.dtype), weight=weight, bias=module.conv1d.bias,
                        padding=weight.shape[-1] - 1, groups=weight.shape[0])
    conv = conv[:, :, : mixed.shape[-1]]
    mixed = act(hf.ACT2FN[module.activation], conv, rules).to(mixed.dtype)
    mixed = mixed[:, :, -seq_len:]
    query, key, value = torch.split(mixed.transpose(1, 2), [module.qkv_dim] * 3, dim=-1)
    query, key, value = (x.reshape(hidden_shape) for x in (query, key, value))
    g = module.forget_gate(hidden_states)
    beta = torch.sigmoid(module.b_proj(hidden_states))
    # queries, keys, betas and channel-wise decays are functions of the input held constant: linear in v
    core, final_state = held_delta_rule(
        hf.chunk_kimi_delta_attention, kda_recurrent, query, key, value, g, beta, rules,
        keep_state=cache is not None,
    )
    if cache is not None:
        cache.update_recurrent_state(final_state.detach().to(torch.float32), idx)
    if getattr(module, "g_proj", None) is not None:  # Bailing-Hybrid: one output-gate projection, not low rank
        gate = module.g_proj(hidden_states).view(hidden_shape)
    else:
        gate = module.g_b_proj(module.g_a_proj(hidden_states)).view(hidden_shape)
    out = module.o_norm(core, gate).reshape(batch, seq_len, -1)
    return module.o_proj(out)


def kimi_rms_norm_gated_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor, gate: Tensor) -> Tensor:
    """LRP form of ``KimiLinearRMSNormGated.forward``: ``w ⊙ (y / rms(y)) ⊙ σ(z)``, all in float32."""
    from transformers.activations import ACT2FN

    dtype = hidden_states.dtype

    def region(compute_dtype: torch.dtype) -> Tensor:
        h = hidden_states.to(compute_dtype)
        scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        h = module.weight.to(compute_dtype) * (h * hold(scale, rules.detach_norm))
        out = h * act(ACT2FN[module.activation], gate.to(compute_dtype), rules)
        out = half_rule(out, rules)
        return out.to(dtype)

    return exact_region(region, dtype, torch.float32, rules)


def kimi_attention_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    attention_mask: Tensor | None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """LRP form of ``KimiLinearAttention.forward`` (MLA): probabilities held, linear in the value latents."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    hf = _hf()
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    batch, seq_len = hidden_states.shape[:-1]
    if module.q_lora_rank is None:
        q_states = module.q_proj(hidden_states)
    else:
        q_states = module.q_b_proj(module.q_a_layernorm(module.q_a_proj(hidden_states)))
    query = hold(q_states.view(batch, seq_len, -1, module.qk_head_dim).transpose(1, 2), rules.detach_softmax)
    kv_nope, k_rot = torch.split(
        module.kv_a_proj_with_mqa(hidden_states), [module.kv_lora_rank, module.qk_rope_head_dim], dim=-1
    )
    kv_nope = module.kv_a_layernorm(kv_nope).view(batch, 1, seq_len, module.kv_lora_rank)
    k_rot = k_rot.view(batch, 1, seq_len, module.qk_rope_head_dim)
    if cache is not None:  # HF expands K and V from the cache's copies of the latents: same layout
        kv_nope, k_rot = fill_cache_first_call(module, cache, kv_nope, k_rot, kwargs, what="latent")
    key, value = module.expand_kv(kv_nope, k_rot)
    key = hold(key, rules.detach_softmax)  # the keys share kv_b_proj with the values: only the keys are held
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, hf.eager_attention_forward)
    out, weights = interface(
        module, query, key, value, attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout, scaling=module.scaling, **kwargs,
    )
    return module.o_proj(out.reshape(batch, seq_len, -1).contiguous()), weights


def kimi_moe_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor) -> Tensor:
    """LRP form of ``KimiLinearMoE.forward``: the router's top-k weights held constant, plus the shared experts."""
    shape = hidden_states.shape
    _, weights, index = module.gate(hidden_states)
    flat = hidden_states.view(-1, shape[-1])
    out = module.experts(flat, index, hold(weights, rules.detach_routing)).view(*shape)
    return out + module.shared_experts(hidden_states)


for _cls, _fwd, _note in [
    ("KimiLinearDeltaAttention", kda_lrp,
     "identity rule on the conv's SiLU; q, k, β, channel-wise decays held: delta rule linear in v; float32 kernel "
     "made exact"),
    ("KimiLinearRMSNormGated", kimi_rms_norm_gated_lrp,
     "1/rms held, half rule on norm(y) ⊙ σ(z), float32 made exact"),
    ("KimiLinearAttention", kimi_attention_lrp,
     "MLA: softmax probabilities held (q, expanded k detached): linear in the value latents"),
    ("KimiLinearMLP", rg_mlp_lrp, "identity rule on SiLU, half rule on SiLU(gate) ⊙ up"),
    ("KimiLinearExperts", qwen3_next_experts_lrp, "per expert: identity rule on SiLU, half rule; routing weights held"),
    ("KimiLinearMoE", kimi_moe_lrp, "router's top-k weights held constant; shared experts added"),
    ("KimiLinearRMSNorm", rms_norm_lrp, "scale held (LN rule), float32 computation made exact"),
]:
    register_lrp_form(
        LRPForm(family="kimi_linear", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False
    )

"""LRP forms of HF transformers' Qwen3-Next (Gated DeltaNet + gated softmax attention hybrid).

Rules:

* ``Qwen3NextGatedDeltaNet``: the conv on (q, k, v) is linear, its SiLU takes the identity
  rule; the delta rule's queries, keys (after their L2 norm), betas and decays are held
  constant (``rules.detach_ssm``), so ``S_t = e^{g_t} S_{t-1} (I − β_t k_t k_tᵀ) + β_t k_t v_tᵀ``
  and ``o_t = S_tᵀ q_t`` are linear in v. HF computes the delta rule in float32 even in a
  float64 model: the value is HF's own chunked kernel, the relevance a float64 recurrence
  (:func:`~captum_implicit.lrp.common.exact_region`);
* ``Qwen3NextRMSNormGated``: ``w ⊙ norm(y) ⊙ SiLU(z)``: 1/rms held, half rule on the product,
  identity rule on SiLU; its float32 region made exact;
* ``Qwen3NextAttention``: softmax probabilities held (queries and keys detached after q/k norm
  and RoPE; CP-LRP), so it is linear in V; the output gate ``o ⊙ σ(g)``: half rule, identity
  rule on the sigmoid;
* ``Qwen3NextMLP`` / ``Qwen3NextExperts``: ``SiLU(gate) ⊙ up``: half rule, identity on SiLU
  (the relevance path is HF's eager expert loop; where the config selects another experts
  kernel, e.g. ``grouped_mm``, the value is that kernel's, joined by ``proportional``);
* ``Qwen3NextSparseMoeBlock``: routing weights and the shared expert's sigmoid gate held
  constant (``rules.detach_routing``): the block is a sum of experts with constant weights;
* ``Qwen3NextRMSNorm``: ``x · rsqrt(mean x² + ε) · (1 + w)`` in float32, scale held constant.

A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import (
    act, exact_region, half_rule, held_delta_rule, held_softmax_attention, hold, mask_padding, refuse_cached_state,
)
from .mamba import _conv_is_causal
from .primitives import proportional
from .recurrent_gemma import rg_mlp_lrp, rg_rms_norm_lrp

_HF = "transformers.models.qwen3_next.modeling_qwen3_next"


def _hf(module: nn.Module | None = None) -> Any:
    """The transformers module defining ``module``'s class (its own delta-rule kernel, RoPE, eager attention), so
    the forms serve every relative whose code is Qwen3-Next's (Qwen3.5, Qwen3.5-MoE, ...); Qwen3-Next's by default."""
    import importlib

    return importlib.import_module(_HF if module is None else type(module).__module__)


def _l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_delta_rule_recurrent(
    query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor, compute_dtype: torch.dtype
) -> Tensor:
    """The gated delta rule token by token in ``compute_dtype`` (HF's recurrent torch path, no cache).

    Parameters
    ----------
    query, key : (b, L, hk, dk)  before the L2 norm (applied here, as HF's ``use_qk_l2norm_in_kernel``)
    value : (b, L, hv, dv)
    g : (b, L, hv)  log decays (≤ 0)
    beta : (b, L, hv)

    Returns
    -------
    (b, L, hv, dv) in ``value.dtype``; linear in ``value`` (the other inputs enter as coefficients).
    """
    hk, hv = key.shape[2], value.shape[2]
    if hk != hv:
        query = query.repeat_interleave(hv // hk, dim=2)
        key = key.repeat_interleave(hv // hk, dim=2)
    q, k, v, b, d = (x.transpose(1, 2).to(compute_dtype) for x in (query, key, value, beta, g))
    q, k = _l2norm(q), _l2norm(k)
    q = q / (q.shape[-1] ** 0.5)
    state = v.new_zeros(v.shape[0], v.shape[1], k.shape[-1], v.shape[-1])
    outs = []
    for t in range(v.shape[2]):
        state = state * d[:, :, t].exp()[..., None, None]
        kv_mem = (state * k[:, :, t, :, None]).sum(-2)
        delta = (v[:, :, t] - kv_mem) * b[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[:, :, None, :]
        outs.append((state * q[:, :, t, :, None]).sum(-2))
    return torch.stack(outs, dim=2).transpose(1, 2).to(value.dtype)


def gdn_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """LRP form of ``Qwen3NextGatedDeltaNet.forward``; (b, L, H) -> (b, L, H)."""
    if cache is None:
        cache = kwargs.pop("cache_params", None)
    kwargs.pop("cu_seq_lens_q", None)
    hidden_states = mask_padding(hidden_states, attention_mask)
    refuse_cached_state(module, cache)
    qkvz = module.in_proj_qkvz(hidden_states)
    ba = module.in_proj_ba(hidden_states)
    query, key, value, z, b, a = module.fix_query_key_value_ordering(qkvz, ba)
    query, key, value = (x.reshape(x.shape[0], x.shape[1], -1) for x in (query, key, value))
    mixed = torch.cat((query, key, value), dim=-1)
    return gdn_after_projections(module, rules, mixed, z, b, a, cache)


def gdn_after_projections(
    module: nn.Module, rules: GatedLinearRules, mixed: Tensor, z: Tensor, b: Tensor, a: Tensor, cache: Any
) -> Tensor:
    """A Gated DeltaNet layer after its input projections (shared by Qwen3-Next and its relatives).

    Parameters
    ----------
    mixed : (b, L, 2·key_dim + value_dim)  the conv's input, channels ordered (q, k, v)
    z : (b, L, hv, dv)  the output gate;  b, a : (b, L, hv)  β and decay logits

    Returns
    -------
    (b, L, H): ``out_proj(norm(delta_rule(SiLU(conv(mixed))), z))`` (OlmoHybrid: ``o_proj``, ``o_norm``, and β
    doubled where ``allow_neg_eigval``).
    """
    hf = _hf(module)
    seq_len = mixed.shape[1]
    mixed = mixed.transpose(1, 2)
    if cache is not None:  # HF conv's the (possibly left-padded) prefill it caches; same numbers, live graph
        full = cache.update_conv_state(mixed.detach(), module.layer_idx, conv_kernel_size=module.conv_kernel_size)
        mixed = F.pad(mixed, (full.shape[-1] - seq_len, 0))
    weight = module.conv1d.weight
    if _conv_is_causal(module.conv1d):  # the module computes HF's conv: call it so Zennit rules can attach
        conv = module.conv1d(mixed.to(weight.dtype))
    else:
        conv = F.conv1d(mixed.to(weight.dtype), weight=weight, bias=module.conv1d.bias,
                        padding=weight.shape[-1] - 1, groups=weight.shape[0])
    conv = conv[:, :, : mixed.shape[-1]]
    mixed = act(hf.ACT2FN[module.activation], conv, rules).to(mixed.dtype)
    mixed = mixed[:, :, -seq_len:].transpose(1, 2)
    query, key, value = torch.split(mixed, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    query = query.reshape(query.shape[0], query.shape[1], -1, module.head_k_dim)
    key = key.reshape(key.shape[0], key.shape[1], -1, module.head_k_dim)
    value = value.reshape(value.shape[0], value.shape[1], -1, module.head_v_dim)
    beta = b.sigmoid()
    if getattr(module, "allow_neg_eigval", False):  # OlmoHybrid: β ∈ [0, 2]
        beta = beta * 2.0
    g = -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)
    # queries, keys, betas and decays are functions of the input held constant: linear in v
    core, final_state = held_delta_rule(
        hf.torch_chunk_gated_delta_rule, gated_delta_rule_recurrent, query, key, value, g, beta, rules,
        keep_state=cache is not None,
    )
    if cache is not None:
        cache.update_recurrent_state(final_state.detach(), module.layer_idx)
    z_shape = z.shape
    norm, out_proj = (module.norm, module.out_proj) if hasattr(module, "out_proj") else (module.o_norm, module.o_proj)
    core = norm(core.reshape(-1, core.shape[-1]), z.reshape(-1, z.shape[-1]))
    core = core.reshape(z_shape).reshape(z_shape[0], z_shape[1], -1)
    return out_proj(core)


def rms_norm_gated_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor, gate: Tensor) -> Tensor:
    """LRP form of ``Qwen3NextRMSNormGated.forward``: ``w ⊙ (y / rms(y)) ⊙ SiLU(z)``, norm before gate."""
    from transformers.activations import ACT2FN

    dtype = hidden_states.dtype

    def region(compute_dtype: torch.dtype) -> Tensor:
        h = hidden_states.to(compute_dtype)
        scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        h = module.weight * (h * hold(scale, rules.detach_norm)).to(dtype)
        out = h * act(ACT2FN[module.activation], gate.to(compute_dtype), rules)
        out = half_rule(out, rules)
        return out.to(dtype)

    return exact_region(region, dtype, torch.float32, rules)


def qwen3_next_attention_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    attention_mask: Tensor | None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """LRP form of ``Qwen3NextAttention.forward``: probabilities held, sigmoid output gate split half/half."""

    hf = _hf(module)
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    query, gate = torch.chunk(module.q_proj(hidden_states).view(*input_shape, -1, module.head_dim * 2), 2, dim=-1)
    gate = gate.reshape(*input_shape, -1)
    query = module.q_norm(query.view(hidden_shape)).transpose(1, 2)
    key = module.k_norm(module.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
    value = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = hf.apply_rotary_pos_emb(query, key, cos, sin)
    out, weights = held_softmax_attention(
        module, rules, query, key, value, attention_mask, cache, kwargs, hf.eager_attention_forward
    )
    out = out.reshape(*input_shape, -1).contiguous()
    out = out * act(torch.sigmoid, gate, rules)
    out = half_rule(out, rules)
    return module.o_proj(out), weights


def swiglu(gate: Tensor, up: Tensor, rules: GatedLinearRules, act_fn: Any = F.silu, limit: float | None = None
           ) -> Tensor:
    """``act_fn(gate) ⊙ up``: identity rule on the activation, half rule on the product.

    With ``limit`` (GLM-5-Next's clamped SwiGLU) ``gate`` is first clamped to ``≤ limit`` and ``up`` to
    ``[−limit, limit]``, each clamp under the identity rule (``clamp(x) / x`` carries the relevance through).
    """
    if limit is not None:
        gate = act(lambda t: t.clamp(max=limit), gate, rules)
        up = act(lambda t: t.clamp(min=-limit, max=limit), up, rules)
    h = act(act_fn, gate, rules) * up
    return half_rule(h, rules)


def qwen3_next_experts_lrp(
    module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """LRP form of ``Qwen3NextExperts.forward`` (HF's eager loop, shared by the relatives' experts); (T, H) -> (T, H).

    Experts without ``act_fn`` use SiLU; with ``swiglu_limit`` (GLM-5-Next) the clamped SwiGLU (:func:`swiglu`).
    """
    top_k_weights = hold(top_k_weights, rules.detach_routing)
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=module.num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == module.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        gate, up = F.linear(hidden_states[token_idx], module.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        h = swiglu(gate, up, rules, getattr(module, "act_fn", F.silu), getattr(module, "swiglu_limit", None))
        h = F.linear(h, module.down_proj[expert_idx]) * top_k_weights[token_idx, top_k_pos, None]
        final = final.index_add(0, token_idx, h.to(final.dtype))
    if getattr(getattr(module, "config", None), "_experts_implementation", None) not in (None, "eager"):
        # HF dispatches to another kernel (e.g. grouped_mm): its value, the eager loop's relevance path
        with torch.no_grad():
            value = type(module).forward(module, hidden_states, top_k_index, top_k_weights)
        return proportional(final, value.to(final.dtype))
    return final


def qwen3_next_moe_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor) -> Tensor:
    """LRP form of ``Qwen3NextSparseMoeBlock.forward``: routing weights and the shared gate held constant."""
    batch, seq_len, hidden = hidden_states.shape
    flat = hidden_states.view(-1, hidden)
    shared = module.shared_expert(flat)
    _, routing_weights, selected = module.gate(flat)
    expert = module.experts(flat, selected, hold(routing_weights, rules.detach_routing))
    shared_gate = hold(F.sigmoid(module.shared_expert_gate(flat)), rules.detach_routing)
    return (expert + shared_gate * shared).reshape(batch, seq_len, hidden)


for _cls, _fwd, _note in [
    ("Qwen3NextGatedDeltaNet", gdn_lrp,
     "identity rule on the conv's SiLU; q, k, β, decays held: delta rule linear in v; float32 kernel made exact"),
    ("Qwen3NextRMSNormGated", rms_norm_gated_lrp, "1/rms held, half rule on norm(y) ⊙ SiLU(z), float32 made exact"),
    ("Qwen3NextAttention", qwen3_next_attention_lrp,
     "softmax probabilities held (q, k detached): linear in V; half rule on o ⊙ σ(gate)"),
    ("Qwen3NextMLP", rg_mlp_lrp, "identity rule on SiLU, half rule on SiLU(gate) ⊙ up"),
    ("Qwen3NextExperts", qwen3_next_experts_lrp, "per expert: identity rule on SiLU, half rule; routing weights held"),
    ("Qwen3NextSparseMoeBlock", qwen3_next_moe_lrp, "routing weights and the shared expert's gate held constant"),
    ("Qwen3NextRMSNorm", rg_rms_norm_lrp, "scale held (LN rule) with (1 + w), float32 computation made exact"),
]:
    register_lrp_form(
        LRPForm(family="qwen3_next", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False
    )

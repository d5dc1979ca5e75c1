"""LRP forms of flash-linear-attention's (fla 0.6) layers: GLA, HGRN2, RetNet, RWKV-6, DeltaNet, Gated DeltaNet.

Every form recomputes its layer in torch with the detach primitives; fla's Triton pieces are replaced by the
torch versions :mod:`captum_implicit.adapters.fla` routes to on CPU (fla's float32 naive kernel references,
torch norms, rotary, token shift), on every device, so a form runs on CPU and its logits equal those of the
routed layer. On CUDA the real layer runs Triton; the form's value then differs by float32 kernel rounding
(the GPU test bounds it). Rules:

* kernels: queries, keys, decays (GLA's ``gk``, HGRN2's ``g`` and ``k = 1 − e^g``, RetNet's fixed decay,
  RWKV-6's ``w``, GDN's in-kernel gate), betas and RWKV-6's bonus ``u`` held constant (``rules.detach_ssm``): the
  recurrence is linear in its values. The value is fla's float32 naive reference; the relevance runs through
  the float64 closed forms of :mod:`captum_implicit.layers.gla` / :mod:`~captum_implicit.layers.gated_deltanet`
  (:func:`~captum_implicit.lrp.common.exact_region`; Gated DeltaNet through
  :func:`~captum_implicit.lrp.common.held_delta_rule`);
* norms (``RMSNorm``, ``FusedRMSNormGated``, ``GroupNorm``, HGRN2's fused ``rms_norm_linear``): the scale
  ``rsqrt(mean x² + ε)`` held (``rules.detach_norm``); GroupNorm's centering is linear, its bias absorbs;
* output gates ``norm(o) ⊙ act(g)`` (fused or not): half rule, identity rule on the activation;
* SiLU on values (DeltaNet / GDN without short conv, the short convs' SiLU): identity rule; the short
  convolutions themselves are linear (depthwise causal ``conv1d``, their bias absorbs);
* RWKV-6 token shift: ``x + (shift(x) − x) ⊙ μ`` with the data-dependent lerp ``μ`` (``x_proj``) held: linear.

Refused with :class:`LRPError` naming the layer: a cache (``past_key_values``), packed sequences
(``cu_seqlens``) and, except for RWKV-6 (which multiplies its inputs by the mask), an attention mask with
padding (fla unpads such a batch into packed sequences).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import fla as routes
from ..ops import fla_torch
from ..layers.gated_deltanet import DeltaRuleAttention, build_delta_rule_attention
from ..layers.gla import build_gla_attention, retention_log_decay
from .canonizers import GatedLinearRules, LRPError, LRPForm, register_lrp_form
from .common import act, continuation_refused, exact_region, half_rule, held_delta_rule, hold
from .primitives import proportional
from .qwen3_next import gated_delta_rule_recurrent

_L = "fla.layers"


# ---------------------------------------------------------------- refusals, device dispatch
def _refuse(module: nn.Module, attention_mask: Tensor | None, past_key_values: Any, kwargs: dict,
            unpads: bool = True) -> None:
    name = f"{type(module).__name__} layer {getattr(module, 'layer_idx', None)}"
    if past_key_values is not None:
        idx = getattr(module, "layer_idx", None)
        if idx is not None and len(past_key_values) > idx:
            raise continuation_refused(name)
        raise LRPError(f"{name}: the LRP form keeps no state and does not fill fla's cache; run the full sequence "
                       "with use_cache=False (past_key_values=None).")
    if kwargs.get("cu_seqlens") is not None:
        raise LRPError(f"{name}: packed sequences (cu_seqlens) are not supported by the LRP form.")
    if unpads and attention_mask is not None and not bool(attention_mask.all()):
        raise LRPError(f"{name}: fla unpads a padded batch (attention_mask with zeros) into packed sequences, which "
                       "the LRP form does not take; explain unpadded sequences (attention_mask=None).")


@contextlib.contextmanager
def _routed(module: nn.Module) -> Iterator[None]:
    """fla's Triton helpers (rotary, swish, token shift) routed to torch on CPU tensors, as during a capture."""
    restore = routes.route_to_torch_on_cpu(module)
    try:
        yield
    finally:
        restore()


def _on_cpu(x: Tensor) -> bool:
    return x.device.type == "cpu"


def _gate_fn(module: nn.Module, x: Tensor) -> Callable[[Tensor], Tensor]:
    """The layer's ``gate_fn``; fla's Triton swish is ``F.silu`` on CPU (as the capture's ``record_gate``)."""
    fn = module.gate_fn
    swish = importlib.import_module("fla.modules.activations").ACT2FN.get("swish")
    return F.silu if (_on_cpu(x) and fn is swish) else fn


def _joined(relevance: Tensor, value: Callable[[], Tensor]) -> Tensor:
    """``value()`` (computed without a graph) whose gradient flows into ``relevance`` (same value to rounding)."""
    with torch.no_grad():
        v = value()
    if not (torch.is_grad_enabled() and relevance.requires_grad):
        return v
    return proportional(relevance, v.to(relevance.dtype)).to(v.dtype)


# ---------------------------------------------------------------- norms
def _held_rms(module: nn.Module, rules: GatedLinearRules, x: Tensor, residual: Tensor | None,
              residual_in_fp32: bool) -> tuple[Tensor, Tensor]:
    """``(x [+ residual]) · rsqrt(mean x² + ε) · w + b`` with the scale held, and the residual fla's fused add
    returns; in the norm's compute dtype."""
    total, res_out = fla_torch.with_residual(x, residual, residual_in_fp32)
    rel = total * hold(fla_torch.rms_factor(total, module.weight, module.eps), rules.detach_norm)
    return (rel + module.bias if module.bias is not None else rel), res_out


def rms_norm_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor, residual: Tensor | None = None,
                 prenorm: bool = False, residual_in_fp32: bool = False) -> Any:
    """LRP form of fla's ``RMSNorm.forward``: ``x · rsqrt(mean x² + ε) · w + b``, scale held (fused add too)."""
    rel, res_out = _held_rms(module, rules, x, residual, residual_in_fp32)
    rel = rel.to(x.dtype)

    def value() -> Tensor:
        if _on_cpu(x):
            return fla_torch.torch_rms_norm(x, module.weight, module.bias, residual, module.eps)
        return type(module).forward(module, x, residual)

    return (_joined(rel, value), res_out) if prenorm else _joined(rel, value)


def rms_norm_gated_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor, g: Tensor,
                       residual: Tensor | None = None, prenorm: bool = False, residual_in_fp32: bool = False) -> Any:
    """LRP form of fla's ``FusedRMSNormGated.forward``: ``(x / rms(x) · w + b) ⊙ act(g)``: scale held, identity
    rule on the activation, half rule on the product."""
    rel, res_out = _held_rms(module, rules, x, residual, residual_in_fp32)
    rel = rel * act(lambda t: fla_torch.activate(t, module.activation), g, rules)
    rel = half_rule(rel, rules)
    rel = rel.to(x.dtype)

    def value() -> Tensor:
        if _on_cpu(x):
            return fla_torch.torch_rms_norm_gated(x, g, module.weight, module.bias, module.activation, residual,
                                                eps=module.eps)
        return type(module).forward(module, x, g, residual)

    return (_joined(rel, value), res_out) if prenorm else _joined(rel, value)


def group_norm_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor, residual: Tensor | None = None,
                   prenorm: bool = False, residual_in_fp32: bool = False) -> Any:
    """LRP form of fla's ``GroupNorm.forward``: per group ``(x − mean) · rsqrt(var + ε) · w + b``, scale held
    (the centering is linear, the bias absorbs)."""
    total, res_out = fla_torch.with_residual(x, residual, residual_in_fp32)
    factor, centered = fla_torch.group_norm_parts(total, module.weight, module.eps, module.is_rms_norm,
                                                module.num_groups)
    rel = centered * hold(factor, rules.detach_norm)
    if module.bias is not None:
        rel = rel + module.bias.to(rel.dtype)
    rel = rel.to(x.dtype)

    def value() -> Tensor:
        if _on_cpu(x):
            return fla_torch.torch_group_norm(x, module.weight, module.bias, residual, module.eps,
                                            is_rms_norm=module.is_rms_norm, num_groups=module.num_groups)
        return type(module).forward(module, x, residual)

    return (_joined(rel, value), res_out) if prenorm else _joined(rel, value)


# ---------------------------------------------------------------- pieces shared by the layers
def _short_conv(conv: nn.Module, x: Tensor, rules: GatedLinearRules) -> Tensor:
    """fla's ``ShortConvolution`` (no cache): depthwise causal conv1d (linear), SiLU under the identity rule."""
    length = x.shape[1]
    y = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=conv.weight.shape[-1] - 1,
                 groups=conv.weight.shape[0])[..., :length].transpose(1, 2)
    return act(F.silu, y, rules) if conv.activation in ("silu", "swish") else y


def _qkv(module: nn.Module, x: Tensor, rules: GatedLinearRules, names: tuple[str, str, str]) -> list[Tensor]:
    """The three projections (through their short convs when the layer has them)."""
    out = []
    for name in names:
        h = getattr(module, f"{name}_proj")(x)
        out.append(_short_conv(getattr(module, f"{name}_conv1d"), h, rules) if module.use_short_conv else h)
    return out


def _heads(x: Tensor, d: int) -> Tensor:
    return x.unflatten(-1, (-1, d))


def _repeat_heads(x: Tensor, groups: int, d: int) -> Tensor:
    """einops ``'... (h d) -> ... (h g) d'``: each key/value head serves ``groups`` consecutive heads."""
    return _heads(x, d).repeat_interleave(groups, dim=-2)


def _held_gla(rules: GatedLinearRules, value_kernel: Callable[..., tuple[Tensor, Any]], q: Tensor, k: Tensor,
              v: Tensor, log_decay: Tensor, scale: float | None = None, bonus: Tensor | None = None,
              **kernel_kwargs: Any) -> Tensor:
    """A GLA-type recurrence (GLA, HGRN2, RetNet, RWKV-6) linear in ``v``: ``q``, ``k``, decays, bonus held.

    The value is ``value_kernel`` (fla's float32 naive reference, as the capture routes it); the relevance, in
    float64 models, the float64 closed form ``o = A v`` (:func:`~captum_implicit.layers.gla.gla_matrix`).
    ``q``, ``k`` (b, L, H, dk); ``v`` (b, L, H, dv); ``log_decay`` (b, L, H, dk) or (b, L, H).
    """
    q, k, log_decay = (hold(t, rules.detach_ssm) for t in (q, k, log_decay))
    bonus = hold(bonus, rules.detach_ssm) if bonus is not None else None

    def region(compute_dtype: torch.dtype) -> Tensor:
        if compute_dtype == torch.float32:
            return value_kernel(q, k, v, log_decay, **kernel_kwargs)[0]
        attn = build_gla_attention("lrp", query=q, key=k, value=v.detach(),
                                   log_decay=log_decay, scale=scale, bonus=bonus)
        matrix = attn.head_matrix().to(compute_dtype)  # (b, H, L, L): constant when the rules hold q, k, g
        return torch.einsum("bhts,bshd->bthd", matrix, v.to(compute_dtype))

    return exact_region(region, v.dtype, torch.float32, rules).to(v.dtype)


def _output(module: nn.Module, rules: GatedLinearRules, o: Tensor, x: Tensor) -> Tensor:
    """GLA / RetNet output: fused ``norm(o) ⊙ swish(g)``, unfused ``norm(o) ⊙ gate_fn(g)`` or ``norm(o)``; then
    ``o_proj``. ``o`` (b, L, H, dv)."""
    if module.use_output_gate and module.fuse_norm_and_gate:
        g = _heads(module.g_proj(x), module.head_v_dim)
        o = rms_norm_gated_lrp(module.g_norm_swish_gate, rules, o, g).flatten(-2)
    else:
        o = rms_norm_lrp(module.g_norm, rules, o).flatten(-2)
        if module.use_output_gate:
            g = module.g_proj(x)
            o = o * act(_gate_fn(module, g), g, rules)
            o = half_rule(o, rules)
    return module.o_proj(o)


# ---------------------------------------------------------------- the layers
def gla_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor, attention_mask: Tensor | None = None,
            past_key_values: Any = None, use_cache: bool | None = False, output_attentions: bool | None = False,
            **kwargs: Any) -> tuple[Tensor, None, Any]:
    """LRP form of ``GatedLinearAttention.forward``; (b, L, D) -> ((b, L, D), None, None)."""
    _refuse(module, attention_mask, past_key_values, kwargs)
    x = hidden_states
    q, k, v = _qkv(module, x, rules, ("q", "k", "v"))
    gk = module.gk_proj(x)
    q = _heads(q, module.head_k_dim)
    if module.num_kv_groups > 1:
        k, gk = (_repeat_heads(t, module.num_kv_groups, module.head_k_dim) for t in (k, gk))
        v = _repeat_heads(v, module.num_kv_groups, module.head_v_dim)
    else:
        k, gk, v = _heads(k, module.head_k_dim), _heads(gk, module.head_k_dim), _heads(v, module.head_v_dim)
    gk = F.logsigmoid(gk) / module.gate_logit_normalizer
    if module.clamp_min is not None:
        gk = torch.clamp_min(gk, module.clamp_min)
    if module.feature_map_fn is not None:
        q, k = map(module.feature_map_fn, (q, k))
    o = _held_gla(rules, lambda q_, k_, v_, g_: fla_torch.torch_gla(q_, k_, v_, gk=g_), q, k, v, gk)
    return _output(module, rules, o, x), None, past_key_values


def hgrn2_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor,
              attention_mask: Tensor | None = None, past_key_values: Any = None, use_cache: bool | None = False,
              output_attentions: bool | None = False, lower_bound: Tensor | None = None,
              **kwargs: Any) -> tuple[Tensor, None, Any]:
    """LRP form of ``HGRN2Attention.forward``: GLA with ``k = 1 − e^g`` (held) and values ``i``."""
    _refuse(module, attention_mask, past_key_values, kwargs)
    x = hidden_states
    q, f, i = _qkv(module, x, rules, ("q", "f", "i"))
    q = F.silu(q) if _on_cpu(q) else importlib.import_module(type(module).__module__).swish(q)
    g = F.logsigmoid(f)
    if lower_bound is not None and module.layer_idx > 0:
        g = torch.logaddexp(lower_bound.log(), torch.log1p(-lower_bound) + g)
    k = 1 - g.exp()
    q, k, g = (_heads(t, module.head_f_dim) for t in (q, k.to(i), g))
    i = _heads(i, module.head_i_dim)
    o = _held_gla(rules, lambda q_, k_, v_, g_: fla_torch.torch_gla(q_, k_, v_, gk=g_), q, k, i, g).flatten(-2)
    # fla's fused rms_norm_linear: the norm, then o_proj's weight (called as a module so Zennit rules attach)
    return module.o_proj(rms_norm_lrp(module.g_norm, rules, o)), None, past_key_values


def retnet_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor,
               attention_mask: Tensor | None = None, past_key_values: Any = None, use_cache: bool | None = False,
               output_attentions: bool | None = False, **kwargs: Any) -> tuple[Tensor, None, Any]:
    """LRP form of ``MultiScaleRetention.forward``: fixed per-head decays; q, k after rotary held."""
    _refuse(module, attention_mask, past_key_values, kwargs)
    x = hidden_states
    q, k, v = _qkv(module, x, rules, ("q", "k", "v"))
    q, k = _heads(q, module.head_k_dim), _heads(k, module.head_k_dim)
    if module.feature_map_fn is not None:
        q, k = map(module.feature_map_fn, (q, k))
    with _routed(module):  # fla's rotary (Triton) routed to its torch reference on CPU
        q, k = module.rotary(q, k, seqlen_offset=0, max_seqlen=q.shape[1])
    if module.num_kv_groups > 1:
        k = k.repeat_interleave(module.num_kv_groups, dim=-2)
        v = _repeat_heads(v, module.num_kv_groups, module.head_v_dim)
    else:
        v = _heads(v, module.head_v_dim)
    bsz, length, heads = q.shape[:3]
    decay = retention_log_decay(heads).to(q.device)[None, None, :].expand(bsz, length, heads)
    o = _held_gla(rules, lambda q_, k_, v_, g_: fla_torch.torch_retention(q_, k_, v_), q, k, v, decay)
    return _output(module, rules, o, x), None, past_key_values


def rwkv6_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor,
              attention_mask: Tensor | None = None, past_key_values: Any = None, use_cache: bool | None = False,
              output_attentions: bool | None = False, cu_seqlens: Tensor | None = None,
              **kwargs: Any) -> tuple[Tensor, None, Any]:
    """LRP form of ``RWKV6Attention.forward``: lerp coefficients, r, k, w, u held; GroupNorm scale held; half
    rule on ``norm(o) ⊙ swish(g)``. The mask multiplies inputs and values (linear): padding is honoured."""
    _refuse(module, None, past_key_values, {"cu_seqlens": cu_seqlens})
    x = hidden_states
    batch, length, hidden = x.shape
    if length == 0:
        return x, None, past_key_values
    if attention_mask is not None:
        x = x.mul(attention_mask[:, -length:, None])
    delta = fla_torch.torch_token_shift(x) if _on_cpu(x) else importlib.import_module(type(module).__module__) \
        .token_shift(x)  # shift(x) − x: linear
    mix = module.x_proj[0](x, delta).view(batch, length, -1, module.proj_low_rank_dim)
    mix = torch.einsum("b t n r, h n r-> b t n h", module.x_proj[1](mix),
                       module.x_proj[2].weight.view(hidden, 5, -1))
    # the data-dependent lerp coefficients μ are held: x + δ ⊙ μ is linear in x
    r, w, k, v, g = hold(mix + module.x_bias, rules.detach_ssm).unbind(-2)
    r = module.r_proj(x, r, delta)
    w = module.w_proj(x, w, delta)
    k = module.k_proj(x, k, delta)
    v = module.v_proj(x, v, delta)
    g = module.g_proj(x, g, delta)
    if attention_mask is not None:
        v = v.mul(attention_mask[:, -length:, None])
    r, w, k = (_heads(t, module.head_k_dim) for t in (r, w, k))
    v = _heads(v, module.head_v_dim)
    w = -torch.exp(w)
    o = _held_gla(rules, lambda q_, k_, v_, w_, u: fla_torch.torch_rwkv6(q_, k_, v_, w_, u, scale=1.0),
                  r, k, v, w, scale=1.0, bonus=module.bonus, u=hold(module.bonus, rules.detach_ssm))
    o = group_norm_lrp(module.g_norm, rules, o.flatten(-2))
    o = o * act(_gate_fn(module, g), g, rules)
    o = half_rule(o, rules)
    return module.o_proj(o), None, past_key_values


def _gated_output(module: nn.Module, rules: GatedLinearRules, o: Tensor, x: Tensor) -> Tensor:
    """DeltaNet / GDN: ``o_norm(o, g)`` (FusedRMSNormGated) or ``o_norm(o)`` (RMSNorm), then ``o_proj``."""
    if module.use_gate:
        o = rms_norm_gated_lrp(module.o_norm, rules, o, _heads(module.g_proj(x), module.head_v_dim))
    else:
        o = rms_norm_lrp(module.o_norm, rules, o)
    return module.o_proj(o.flatten(-2))


def _delta_rule_relevance(l2: bool) -> Callable[..., Tensor]:
    """The float64 relevance path of the (ungated) delta rule: the closed form ``o = A v``, l2 or not."""

    def recurrent(query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor, dtype: torch.dtype) -> Tensor:
        attn = build_delta_rule_attention(
            "lrp", cls=DeltaRuleAttention, query=query, key=key, value=value.detach(), g=g, beta=beta,
            use_l2norm=l2, norm_out=None, norm_gate=None, norm_weight=None, norm_eps=0.0, norm_activation="silu",
        )
        return torch.einsum("bhts,bshd->bthd", attn.head_matrix().to(dtype), value.to(dtype)).to(value.dtype)

    return recurrent


def delta_net_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor,
                  attention_mask: Tensor | None = None, past_key_values: Any = None, use_cache: bool | None = False,
                  output_attentions: bool | None = False, **kwargs: Any) -> tuple[Tensor, None, Any]:
    """LRP form of ``DeltaNet.forward``: q, k (after activation and norm) and β held; identity rule on v's SiLU."""
    _refuse(module, attention_mask, past_key_values, kwargs)
    x = hidden_states
    if module.use_short_conv:
        q, k, v = _qkv(module, x, rules, ("q", "k", "v"))
    else:
        q, k = module.q_proj(x), module.k_proj(x)
        if module.qk_activation == "silu":
            q, k = F.silu(q), F.silu(k)
        v = act(F.silu, module.v_proj(x), rules)
    q, k = _heads(q, module.head_k_dim), _heads(k, module.head_k_dim)
    v = _heads(v, module.head_v_dim)
    layer = importlib.import_module(type(module).__module__)  # its torch helpers elu_p1, sum_norm
    if module.qk_activation != "silu":
        if module.qk_activation == "relu":
            q, k = q.relu(), k.relu()
        elif module.qk_activation == "elu":
            q, k = layer.elu_p1(q), layer.elu_p1(k)
        elif module.qk_activation != "identity":
            raise LRPError(f"DeltaNet layer {module.layer_idx}: qk_activation {module.qk_activation!r} unknown")
    if module.qk_norm == "sum":
        q, k = layer.sum_norm(q).to(q), layer.sum_norm(k).to(k)
    beta = module.b_proj(x).sigmoid() if module.use_beta else torch.ones_like(q[..., 0])
    if module.allow_neg_eigval:
        beta = beta * 2.0
    l2 = module.qk_norm == "l2"

    def kernel(query, key, value, g=None, beta=None, initial_state=None, output_final_state=False, **_):
        return fla_torch.torch_delta_rule(query, key, value, beta=beta, use_qk_l2norm_in_kernel=l2)

    g = torch.zeros_like(beta, dtype=torch.float32)  # no decay
    o, _ = held_delta_rule(kernel, _delta_rule_relevance(l2), q, k, v, g, beta, rules, keep_state=False)
    return _gated_output(module, rules, o, x), None, past_key_values


def gated_deltanet_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor,
                       attention_mask: Tensor | None = None, past_key_values: Any = None,
                       use_cache: bool | None = False, output_attentions: bool | None = False,
                       **kwargs: Any) -> tuple[Tensor, None, Any]:
    """LRP form of ``GatedDeltaNet.forward``: q, k, in-kernel gate and σ(β) held; identity rule on v's SiLU."""
    _refuse(module, attention_mask, past_key_values, kwargs)
    x = hidden_states
    if module.use_short_conv:  # fla may fuse the three convs into one: the same depthwise maths
        q, k, v = _qkv(module, x, rules, ("q", "k", "v"))
    else:
        q, k, v = F.silu(module.q_proj(x)), F.silu(module.k_proj(x)), act(F.silu, module.v_proj(x), rules)
    q, k = _heads(q, module.head_k_dim), _heads(k, module.head_k_dim)
    v = _heads(v, module.head_v_dim)
    # the kernel's in-kernel transforms (gate −exp(A_log)·softplus(a + dt_bias), σ(β), ×2), as the capture
    # reads them
    q, k, v, g, beta = fla_torch.gdn_kernel_inputs({
        "q": q, "k": k, "v": v, "g": module.a_proj(x), "beta": module.b_proj(x), "use_gate_in_kernel": True,
        "A_log": module.A_log, "dt_bias": module.dt_bias, "use_beta_sigmoid_in_kernel": True,
        "allow_neg_eigval": module.allow_neg_eigval,
    })
    o, _ = held_delta_rule(fla_torch.torch_gated_delta_rule, gated_delta_rule_recurrent, q, k, v, g, beta, rules,
                           keep_state=False)
    return _gated_output(module, rules, o, x), None, past_key_values


_NORMS = "fla.modules.norm"
for _cls, _fwd, _note in [
    (f"{_L}.gla.GatedLinearAttention", gla_lrp,
     "q, k, gk held: GLA linear in v; norm scale held, half rule on norm(o) ⊙ swish(g); short convs linear with "
     "identity-rule SiLU"),
    (f"{_L}.hgrn2.HGRN2Attention", hgrn2_lrp,
     "q, g, k = 1 − e^g held: linear in i; rms_norm_linear's norm scale held"),
    (f"{_L}.multiscale_retention.MultiScaleRetention", retnet_lrp,
     "q, k (after rotary) held, fixed decays: linear in v; norm scale held, half rule on the output gate"),
    (f"{_L}.rwkv6.RWKV6Attention", rwkv6_lrp,
     "lerp coefficients μ held (token shift linear); r, k, w, bonus u held: WKV linear in v; GroupNorm scale held; "
     "half rule on norm(o) ⊙ swish(g)"),
    (f"{_L}.delta_net.DeltaNet", delta_net_lrp,
     "q, k, β held: delta rule linear in v; identity rule on v's SiLU; o_norm scale held, half rule on its gate"),
    (f"{_L}.gated_deltanet.GatedDeltaNet", gated_deltanet_lrp,
     "q, k, in-kernel gate, σ(β) held: gated delta rule linear in v; identity rule on SiLU; o_norm as DeltaNet"),
    (f"{_NORMS}.layernorm.RMSNorm", rms_norm_lrp, "scale held (LN rule), fused residual add linear"),
    (f"{_NORMS}.fused_norm_gate.FusedRMSNormGated", rms_norm_gated_lrp,
     "scale held, identity rule on the gate's activation, half rule on the product"),
    (f"{_NORMS}.layernorm.GroupNorm", group_norm_lrp, "per-group scale held, centering linear, bias absorbs"),
]:
    register_lrp_form(LRPForm(family="fla", classes=(_cls,), forward=_fwd, notes=_note), first=False)

"""Torch versions of flash-linear-attention's Triton functions, for CPU tensors.

fla's kernels, norms, rotary embedding, token shift and swish are Triton only ("0 active drivers" on CPU).
These are their torch equivalents: the kernels call fla's own naive references (``fla.ops.*.naive``, which
compute in float32), the norms and the rest follow the Triton maths. ``adapters/fla.py`` routes fla's globals to
them while a capture runs on CPU tensors (its ``CPU_ROUTES``); the LRP forms (``lrp/fla.py``) compute their
values with them on every device. fla is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.errors import CaptureError
from ..layers.gated_deltanet import l2_normalise


def refuse_varlen_or_state(cu_seqlens: Any = None, initial_state: Any = None) -> None:
    if cu_seqlens is not None:
        raise CaptureError(
            "fla layer on CPU: a padded / packed (cu_seqlens) batch reached the kernel; fla's naive references "
            "take no variable-length input. Pass attention_mask=None (or run on a GPU)."
        )
    if initial_state is not None:
        raise CaptureError("fla layer: the layer continued from a cached state; explain the full sequence with "
                           "use_cache=False")


def norm_dtype(x: Tensor) -> torch.dtype:
    """fla's Triton norms compute in float32; float64 inputs stay float64 on CPU."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_factor(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """``w · rsqrt(mean(x²) + eps)`` over the last dim, in the norm's compute dtype (``x``'s shape)."""
    dt = norm_dtype(x)
    xf = x.to(dt)
    factor = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps).expand_as(xf)
    return factor * weight.to(dt) if weight is not None else factor


def activate(gate: Tensor, activation: str) -> Tensor:
    g = gate.to(norm_dtype(gate))
    return torch.sigmoid(g) if activation == "sigmoid" else F.silu(g)


def with_residual(x: Tensor, residual: Tensor | None, residual_in_fp32: bool) -> tuple[Tensor, Tensor]:
    """fla's fused add-norm: the norm reads ``x + residual`` (summed in the compute dtype) and, with
    ``prenorm``, also returns that sum in the residual's dtype (float32 with ``residual_in_fp32``)."""
    keep = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    total = x.to(norm_dtype(x)) if residual is None else x.to(norm_dtype(x)) + residual.to(norm_dtype(x))
    return total, total.to(keep)


def torch_rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False, **_):
    total, res_out = with_residual(x, residual, residual_in_fp32)
    y = total * rms_factor(total, weight, eps)
    if bias is not None:
        y = y + bias
    y = y.to(x.dtype)
    return (y, res_out) if prenorm else y


def torch_rms_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False,
                          residual_in_fp32=False, eps=1e-6, **_):
    total, res_out = with_residual(x, residual, residual_in_fp32)
    y = total * rms_factor(total, weight, eps)
    if bias is not None:
        y = y + bias
    y = (y * activate(g, activation)).to(x.dtype)
    return (y, res_out) if prenorm else y


def torch_rms_norm_linear(x, norm_weight, norm_bias, linear_weight, linear_bias, residual=None, eps=1e-5,
                           prenorm=False, residual_in_fp32=False, **_):
    y = torch_rms_norm(x, norm_weight, norm_bias, residual, eps, prenorm, residual_in_fp32)
    y, res_out = y if prenorm else (y, None)
    out = F.linear(y.to(linear_weight.dtype), linear_weight, linear_bias)
    return (out, res_out) if prenorm else out


def torch_group_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
                      is_rms_norm=False, num_groups=1, **_):
    total, res_out = with_residual(x, residual, residual_in_fp32)
    factor, centered = group_norm_parts(total, weight, eps, is_rms_norm, num_groups)
    y = centered * factor
    if bias is not None:
        y = y + bias.to(y.dtype)
    y = y.to(x.dtype)
    return (y, res_out) if prenorm else y


def group_norm_parts(x: Tensor, weight: Tensor | None, eps: float, is_rms_norm: bool, groups: int):
    """fla's group norm ``w · (x − mean_g x) · rsqrt(mean_g (x − mean_g x)² + eps) + b`` as
    ``(factor, centered)``, both ``x``'s shape, in the norm's compute dtype (no centering for RMS)."""
    dt = norm_dtype(x)
    xg = x.to(dt).unflatten(-1, (groups, -1))
    if not is_rms_norm:
        xg = xg - xg.mean(-1, keepdim=True)
    factor = torch.rsqrt(xg.square().mean(-1, keepdim=True) + eps).expand_as(xg).flatten(-2)
    return (factor * weight.to(dt) if weight is not None else factor), xg.flatten(-2)


def torch_layer_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
                      is_rms_norm=False, **_):
    return torch_group_norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm, 1)


def torch_swiglu(x: Tensor, y: Tensor) -> Tensor:
    dt = norm_dtype(x)
    return (F.silu(x.to(dt)) * y.to(dt)).to(x.dtype)


def torch_token_shift(x, cu_seqlens=None, **_):
    from fla.modules.token_shift import token_shift_ref

    refuse_varlen_or_state(cu_seqlens)
    return token_shift_ref(x)


def torch_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, reverse=False,
                 cu_seqlens=None, **_):
    from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

    refuse_varlen_or_state(cu_seqlens, initial_state)
    if reverse:
        raise CaptureError("fla RWKV-6 kernel with reverse=True is not routed on CPU")
    o, state = naive_recurrent_rwkv6(*(x.transpose(1, 2) for x in (r, k, v, w)), u, scale, None,
                                     output_final_state)
    return o.transpose(1, 2), state


def torch_rotary(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, **_):
    from fla.modules.rotary.ops import rotary_embedding_ref

    refuse_varlen_or_state(cu_seqlens)
    if not isinstance(seqlen_offsets, int):
        raise CaptureError("fla rotary embedding with per-sequence offsets is not routed on CPU")
    length = x.shape[1]
    cos, sin = cos[seqlen_offsets : seqlen_offsets + length], sin[seqlen_offsets : seqlen_offsets + length]
    return rotary_embedding_ref(x, cos.to(x.dtype), sin.to(x.dtype), interleaved)


def scaled_for_naive(q: Tensor, scale: float | None) -> Tensor:
    """``q`` for a naive reference that hard-codes the scale ``dk^{-1/2}``, so that it applies ``scale`` instead."""
    return q if scale is None else q * (scale * q.shape[-1] ** 0.5)


def torch_gla(q, k, v, g=None, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
               reverse=False, state_v_first=False, cu_seqlens=None, **_):
    from fla.ops.gla.naive import naive_recurrent_gla

    refuse_varlen_or_state(cu_seqlens, initial_state)
    if gv is not None or reverse:
        raise CaptureError("fla GLA kernel with gv / reverse is not routed on CPU")
    gate = g if g is not None else gk
    o, state = naive_recurrent_gla(scaled_for_naive(q, scale), k, v, gate, None, output_final_state)
    if state is not None and state_v_first:
        state = state.transpose(-1, -2)
    return o, state


def torch_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **_):
    from fla.ops.retention.naive import naive_retention

    refuse_varlen_or_state(cu_seqlens, initial_state)
    if output_final_state:
        raise CaptureError("fla retention on CPU: explain with use_cache=False (the naive reference keeps no state)")
    o = naive_retention(*(x.transpose(1, 2) for x in (scaled_for_naive(q, scale), k, v)))
    return o.transpose(1, 2), None


def delta_qk(q: Tensor, k: Tensor, l2: bool) -> tuple[Tensor, Tensor]:
    """q, k as the delta-rule closed form takes them: rounded to float32 (as the kernels load them), then
    l2-normalised in float64 (fla's ``l2norm``: ``x · rsqrt(Σx² + 1e-6)``), so router and closed form agree."""
    q, k = q.float().double(), k.float().double()
    return (l2_normalise(q), l2_normalise(k)) if l2 else (q, k)


def torch_delta_rule(q, k, v, beta=None, scale=None, initial_state=None, output_final_state=False,
                      use_qk_l2norm_in_kernel=False, cu_seqlens=None, **_):
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    refuse_varlen_or_state(cu_seqlens, initial_state)
    q, k = delta_qk(q, k, use_qk_l2norm_in_kernel)
    q = scaled_for_naive(q, scale)
    beta = torch.ones_like(v[..., 0]) if beta is None else beta.float()
    o, state = delta_rule_recurrence(*(x.transpose(1, 2) for x in (q, k, v, beta)), None, output_final_state)
    return o.transpose(1, 2).to(v.dtype), state


def gdn_kernel_inputs(arguments: dict) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(q, k, v, g, β)`` as the gated delta rule sees them after the kernel's in-kernel transforms.

    ``use_gate_in_kernel``: ``g = −exp(A_log)·softplus(g + dt_bias)`` (fla's ``naive_gdn_gate``);
    ``use_beta_sigmoid_in_kernel``: ``β = σ(β)``; ``allow_neg_eigval``: ``β ← 2β``;
    ``use_qk_l2norm_in_kernel`` is left to the caller. Float32, as in the kernels.
    """
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate

    q, k, v = arguments["q"], arguments["k"], arguments["v"]
    g, beta = arguments.get("g"), arguments.get("beta")
    if arguments.get("gk") is not None or arguments.get("gv") is not None:
        raise CaptureError("fla gated delta rule with per-channel gates (gk/gv) is not supported")
    if arguments.get("use_gate_in_kernel", False):
        g = naive_gdn_gate(g, arguments["A_log"], arguments.get("dt_bias"))
    beta = torch.ones_like(q[..., 0]) if beta is None else beta.float()
    if arguments.get("use_beta_sigmoid_in_kernel", False):
        beta = beta.sigmoid()
    if arguments.get("allow_neg_eigval", False):
        beta = beta * 2
    return q, k, v, g.float(), beta


def torch_gated_delta_rule(*args, **kwargs):
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    names = ("q", "k", "v", "g", "beta")
    arguments = {**dict(zip(names, args, strict=False)), **kwargs}
    refuse_varlen_or_state(arguments.get("cu_seqlens"), arguments.get("initial_state"))
    q, k, v, g, beta = gdn_kernel_inputs(arguments)
    q, k = delta_qk(q, k, bool(arguments.get("use_qk_l2norm_in_kernel", False)))
    final = bool(arguments.get("output_final_state", False))
    o, state = naive_recurrent_gated_delta_rule(q, k, v, beta, g, arguments.get("scale"), None, final)
    if state is not None and arguments.get("state_v_first", False):
        state = state.transpose(-1, -2)
    return o.to(v.dtype), state


def swish(x: Tensor) -> Tensor:
    return F.silu(x)

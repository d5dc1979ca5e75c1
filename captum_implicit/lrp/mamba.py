"""LRP forms of HF transformers' Mamba (5.15+): ``MambaMixer``, ``MambaRMSNorm``, ``MambaBlock``.

Each form recomputes the module's forward with the same torch operations in the same
order as transformers' CPU path (so values are identical), with the MambaLRP rules:

* SiLU after the conv and SiLU of the gate: identity rule;
* selective scan: Ā, B̄, C detached (Δ only reaches the scan through them), so the scan
  is linear in its input ``u``; the D skip is linear too;
* gated output ``y ⊙ SiLU(z)``: half rule;
* RMSNorm: scale ``rsqrt(mean x² + ε)`` detached;
* float32 casts inside float64 models (RMSNorm, ``residual_in_fp32``, the scan's
  ``u.float()``): rounding absorbed by :func:`cast_rule` (``rules.exact_casts``).

The linear maps (``in_proj``, ``conv1d``, ``x_proj``, ``out_proj``) are called as modules,
so Zennit rules (:class:`~captum_implicit.lrp.rules.GIRule`) can attach to them. The
scan is the sequential torch loop transformers runs on CPU; on CUDA it is slower than the
fused kernel but gives the same values to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import act, cast, half_rule, mask_padding, refuse_cached_state, round_to
from .primitives import proportional, stop_gradient

_HF = "transformers.models.mamba.modeling_mamba"


def selective_scan_lrp(
    u: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    rules: GatedLinearRules,
) -> tuple[Tensor, Tensor]:
    """The selective scan with MambaLRP's rules (transformers' ``mamba_selective_scan`` torch loop).

    Parameters
    ----------
    u : (b, C, L)  scan input (post-conv, post-activation, masked)
    dt : (b, C, L)  time step before ``delta_bias`` and softplus
    A : (C, N)
    B, C : (b, N, L)
    D : (C,) or None
    z : (b, C, L) or None  gate pre-activation
    delta_bias : (C,) or None

    Returns
    -------
    y : (b, C, L)
    last_state : (b, C, N)
    """
    batch, channels, length = u.shape
    input_dtype = u.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    dt = F.softplus(dt)
    B, C = B.transpose(1, 2), C.transpose(1, 2)  # (b, L, N)
    decay = torch.exp(A[None, :, None, :] * dt[:, :, :, None])  # Ā (b, C, L, N)
    write = dt[:, :, :, None] * B[:, None, :, :].float()  # B̄
    if rules.detach_ssm:
        decay, write, C = stop_gradient(decay), stop_gradient(write), stop_gradient(C)
    inputs = write * round_to(u, torch.float32, rules)[:, :, :, None]  # transformers' u.float()

    state = torch.zeros(batch, channels, A.shape[-1], dtype=input_dtype, device=u.device)
    outputs = []
    for t in range(length):
        state = decay[:, :, t] * state + inputs[:, :, t]
        outputs.append(torch.matmul(state.to(input_dtype), C[:, t, :].unsqueeze(-1))[:, :, 0])
    y = torch.stack(outputs, dim=-1)
    if D is not None:
        y = y + u * D[None, :, None]
    if z is not None:
        y = y * act(F.silu, z, rules)
        y = half_rule(y, rules)
    return y, state


def mamba_mixer_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """LRP form of ``MambaMixer.forward(hidden_states, cache=None, attention_mask=None, **kwargs)``.

    ``hidden_states`` is ``(b, L, hidden)``; returns ``(b, L, hidden)``. A fresh cache (no
    state yet, e.g. ``use_cache=True`` on a first call) is filled as the real forward fills
    it; continuing from a cached state is refused (explain the full sequence instead).
    """
    if cache is None:
        cache = kwargs.pop("cache_params", None)
    refuse_cached_state(module, cache)
    idx = module.layer_idx
    seq_len, dtype = hidden_states.shape[1], hidden_states.dtype

    hidden_states = mask_padding(hidden_states, attention_mask)
    projected = module.in_proj(hidden_states).transpose(1, 2)
    x, gate = projected.chunk(2, dim=1)
    if cache is not None:
        cache.update_conv_state(x.detach(), idx, conv_kernel_size=module.conv_kernel_size)

    weight = module.conv1d.weight
    if _conv_is_causal(module.conv1d):  # the module computes transformers' conv: call it so rules can attach
        pre = module.conv1d(x.to(weight.dtype))
    else:
        pad = weight.shape[-1] - 1
        pre = F.conv1d(x.to(weight.dtype), weight, module.conv1d.bias, padding=pad, groups=x.shape[1])
    pre = pre[:, :, :seq_len]
    u = act(module.act, pre, rules).to(x.dtype)
    u = mask_padding(u.transpose(1, 2), attention_mask)  # (b, L, C)

    time_step, B, C = torch.split(
        module.x_proj(u), [module.time_step_rank, module.ssm_state_size, module.ssm_state_size], dim=-1
    )
    time_step = module.dt_proj.weight @ time_step.transpose(1, 2)
    dt_bias = module.dt_proj.bias.float() if module.dt_proj.bias is not None else None
    A = -torch.exp(module.A_log.float())
    y, last = selective_scan_lrp(
        u.transpose(1, 2), time_step, A, B.transpose(1, 2), C.transpose(1, 2), module.D.float(), gate, dt_bias, rules
    )
    if cache is not None:
        cache.update_recurrent_state(last.detach(), idx)
    return module.out_proj(y.transpose(1, 2).to(dtype))


def _conv_is_causal(conv: nn.Module) -> bool:
    k = conv.weight.shape[-1]
    return (
        isinstance(conv, nn.Conv1d)
        and tuple(conv.padding) == (k - 1,)
        and tuple(conv.stride) == (1,)
        and tuple(conv.dilation) == (1,)
        and conv.padding_mode == "zeros"
        and conv.groups == conv.weight.shape[0]
    )


def rms_norm_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor) -> Tensor:
    """LRP form of ``MambaRMSNorm.forward``: ``weight · x · rsqrt(mean x² + ε)`` computed in float32."""
    input_dtype = hidden_states.dtype
    h = hidden_states.to(torch.float32)
    scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    if rules.detach_norm and rules.exact_casts:
        # the detached scale and both casts as one diagonal map: exact value, exact conservation
        normed = proportional(hidden_states, (h.detach() * scale.detach()).to(input_dtype))
    elif rules.detach_norm:
        normed = (h * stop_gradient(scale)).to(input_dtype)
    else:
        h = cast(hidden_states, torch.float32, rules)
        normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(input_dtype)
    return module.weight * normed


def mamba_block_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """LRP form of ``MambaBlock.forward``: residual add (conservative under GI) with exact casts."""
    if cache is None:
        cache = kwargs.pop("cache_params", None)
    residual = hidden_states
    hidden_states = module.norm(cast(hidden_states, module.norm.weight.dtype, rules))
    out_dtype = hidden_states.dtype
    if module.residual_in_fp32:
        out_dtype = torch.promote_types(torch.float32, out_dtype)
        residual = round_to(residual, torch.float32, rules)
    hidden_states = module.mixer(hidden_states, cache=cache, attention_mask=attention_mask)
    out_dtype = torch.promote_types(out_dtype, hidden_states.dtype)
    return (residual + hidden_states).to(out_dtype)


for _cls, _fwd, _note in [
    ("MambaMixer", mamba_mixer_lrp, "identity rule on SiLUs, Ā/B̄/C detached, half rule on the gate"),
    ("MambaRMSNorm", rms_norm_lrp, "scale detached (LN rule)"),
    ("MambaBlock", mamba_block_lrp, "residual add; float32 residual cast made exact"),
]:
    register_lrp_form(LRPForm(family="mamba", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)

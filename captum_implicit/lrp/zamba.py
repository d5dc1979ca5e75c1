"""LRP forms of HF transformers' Zamba (v1): multi-head Mamba layers + one shared transformer block at several depths.

Rules:

* ``ZambaMambaMixer``: HF Mamba's rules per head (:func:`~captum_implicit.lrp.mamba.selective_scan_lrp`: identity
  rule on the SiLUs, Ā/B̄/C held, half rule on ``y ⊙ SiLU(z)``). Zamba interleaves ``in_proj``'s output (channel
  ``2i`` feeds the conv, ``2i + 1`` the gate), runs one conv over all channels, then splits them into heads with
  their own ``x_proj`` / ``dt_proj`` weights (plain matmuls: linear) and one scan per head;
* ``ZambaAttention`` (input: the concatenation of the hidden state and the embeddings; no positional encoding):
  Zamba2's form (:func:`~captum_implicit.lrp.zamba2.zamba2_attention_lrp`), softmax probabilities held;
* ``ZambaMLP``: ``down(act(gate x) ⊙ up x)``: identity rule on the activation, half rule on the product;
* ``ZambaRMSNorm``: scale held (LN rule).

The shared block: HF 5.24 builds one ``ZambaAttentionDecoderLayer`` per hybrid layer with tied parameters; the same
instance may also appear at every hybrid depth (older releases, user code) and then runs several times per forward.
As for Zamba2 the forms keep no state on the module, so both work (see :mod:`captum_implicit.lrp.zamba2`).

A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import act, mask_padding, refuse_cached_state
from .mamba import _conv_is_causal, rms_norm_lrp, selective_scan_lrp
from .recurrent_gemma import rg_mlp_lrp
from .zamba2 import zamba2_attention_lrp

_HF = "transformers.models.zamba.modeling_zamba"


def zamba_mixer_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """LRP form of ``ZambaMambaMixer.forward(hidden_states, cache=None, attention_mask=None, **kwargs)``.

    ``hidden_states`` is ``(b, L, hidden)``; returns ``(b, L, hidden)``. A fresh cache is filled as HF fills it;
    continuing from a cached state is refused.
    """
    if cache is None:
        cache = kwargs.pop("cache_params", None)
    refuse_cached_state(module, cache)
    idx = module.layer_idx
    batch, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    heads, head_dim = module.n_mamba_heads, module.mamba_head_dim

    hidden_states = mask_padding(hidden_states, attention_mask)
    projected = module.in_proj(hidden_states).transpose(1, 2)  # (b, 2C, L)
    x, gate = projected.view(batch, -1, 2, seq_len).chunk(2, dim=2)  # interleaved: 2i -> x_i, 2i + 1 -> gate_i
    x = x.squeeze(2).contiguous()
    gate = gate.reshape(batch, heads, head_dim, seq_len).transpose(0, 1)  # (H, b, d, L)
    if cache is not None:
        cache.update_conv_state(x.detach(), idx, conv_kernel_size=module.conv_kernel_size)

    weight = module.conv1d.weight
    if _conv_is_causal(module.conv1d):  # the conv HF computes: call the module so that rules can attach
        pre = module.conv1d(x.to(weight.dtype))
    else:
        pre = F.conv1d(x.to(weight.dtype), weight, module.conv1d.bias, padding=weight.shape[-1] - 1,
                       groups=x.shape[1])
    u = act(module.act, pre[:, :, :seq_len], rules).to(x.dtype)
    u = mask_padding(u.transpose(1, 2), attention_mask).transpose(1, 2)
    u = u.reshape(batch, heads, head_dim, seq_len).transpose(0, 1)  # (H, b, d, L)

    # per-head x_proj / dt_proj: plain (bias-free) matmuls with the module's weights, as HF
    params = (module.x_proj_weight[:, None] @ u).transpose(-1, -2)
    time_step, B, C = torch.split(params, [module.time_step_rank, module.ssm_state_size, module.ssm_state_size], -1)
    time_step = module.dt_proj_weight[:, None] @ time_step.transpose(-1, -2)
    dt_bias = module.dt_proj_bias.float() if module.dt_proj_bias is not None else None
    A = -torch.exp(module.A_log.float())

    outputs, states = [], []
    for h in range(heads):
        y, last = selective_scan_lrp(
            u[h], time_step[h], A[h], B[h].transpose(1, 2), C[h].transpose(1, 2), module.D[h].float(), gate[h],
            dt_bias[h] if dt_bias is not None else None, rules,
        )
        outputs.append(y)
        states.append(last)
    y = torch.cat(outputs, dim=1)
    if cache is not None:
        cache.update_recurrent_state(torch.stack(states, dim=1).detach(), idx)
    return module.out_proj(y.transpose(1, 2).to(dtype))


for _cls, _fwd, _note in [
    ("ZambaMambaMixer", zamba_mixer_lrp,
     "per head: identity rule on SiLUs, Ā/B̄/C detached, half rule on the gate (interleaved in_proj)"),
    ("ZambaAttention", zamba2_attention_lrp,
     "softmax probabilities held (q, k detached): linear in V; shared block: per-call state"),
    ("ZambaMLP", rg_mlp_lrp, "identity rule on the activation, half rule on act(gate) ⊙ up"),
    ("ZambaRMSNorm", rms_norm_lrp, "scale held (LN rule)"),
]:
    register_lrp_form(LRPForm(family="zamba", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)

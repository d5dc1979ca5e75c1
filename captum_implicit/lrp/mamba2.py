"""LRP forms of HF transformers' Mamba2: ``Mamba2Mixer``, ``Mamba2RMSNorm``, ``Mamba2Block``.

The mixer form recomputes transformers' torch path (``causal_conv1d_fn`` and
``mamba2_chunk_scan`` fallbacks, the gated RMSNorm) with the rules:

* SiLU after the conv (on x, B and C together) and SiLU of the gate: identity rule;
* SSD scan: Δ (after bias, softplus and clamp), the decays ``exp(A·Δ)``, B and C held
  constant, so the chunked scan is linear in x; the ``D`` skip is linear too;
* gated RMSNorm ``y ⊙ SiLU(z) · rsqrt(mean (y ⊙ SiLU(z))² + ε)``: half rule on the product,
  the group scale held constant;
* HF computes the scan and the gated norm in float32 even in a float64 model: that region
  runs once as HF does (the value) and once in float64 with the rules (the relevance,
  :func:`~captum_implicit.lrp.common.exact_region`).

``in_proj``, ``conv1d`` and ``out_proj`` are called as modules (Zennit rules can attach).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPError, LRPForm, register_lrp_form
from .common import act, cast, exact_region, half_rule, hold, mask_padding, refuse_cached_state, round_to
from .mamba import _conv_is_causal, rms_norm_lrp

_HF = "transformers.models.mamba2.modeling_mamba2"


def _pad(x: Tensor, pad_size: int) -> Tensor:
    shape = (0, 0, 0, 0, 0, pad_size, 0, 0) if x.dim() == 4 else (0, 0, 0, pad_size, 0, 0)
    return F.pad(x, shape, mode="constant", value=0)


def _chunks(x: Tensor, pad_size: int, chunk_size: int) -> Tensor:
    x = _pad(x, pad_size)
    return x.reshape(x.shape[0], -1, chunk_size, *x.shape[2:])


def _segment_sum(x: Tensor) -> Tensor:
    """transformers' ``segment_sum`` (masked cumulative sums, ``-inf`` above the diagonal)."""
    n = x.size(-1)
    x = x[..., None].expand(*x.size(), n)
    x = x.masked_fill(~torch.tril(torch.ones(n, n, device=x.device, dtype=torch.bool), diagonal=-1), 0)
    x = torch.cumsum(x, dim=-2)
    return x.masked_fill(~torch.tril(torch.ones(n, n, device=x.device, dtype=torch.bool), diagonal=0), -torch.inf)


def ssd_scan_lrp(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    chunk_size: int,
    compute_dtype: torch.dtype,
    rules: GatedLinearRules,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """transformers' ``mamba2_chunk_scan`` torch path computed in ``compute_dtype`` (HF: float32).

    Parameters
    ----------
    x : (b, L, h, p)  scan input
    dt : (b, L, h)  Δ after bias, softplus and clamp
    A : (h,)  negative decay rates
    B, C : (b, L, g, n)
    D : (h,)
    initial_state : (b, h, p, n) or None

    Returns
    -------
    y : (b, L, h, p)  (dtype: ``compute_dtype`` promoted with ``D``'s, as in HF)
    final_state : (b, h, p, n)
    """
    batch, length, heads, head_dim = x.shape
    groups = B.shape[2]
    dt, B, C = hold(dt, rules.detach_ssm), hold(B, rules.detach_ssm), hold(C, rules.detach_ssm)
    x = x.to(compute_dtype)
    B = B.to(compute_dtype).repeat_interleave(heads // groups, dim=2, output_size=heads)
    C = C.to(compute_dtype).repeat_interleave(heads // groups, dim=2, output_size=heads)
    pad_size = (chunk_size - length % chunk_size) % chunk_size
    d_residual = D[..., None] * _pad(x, pad_size)
    x = x * dt[..., None].to(compute_dtype)
    A = A.to(x.dtype) * dt.to(compute_dtype)
    x, A, B, C = (_chunks(t, pad_size, chunk_size) for t in (x, A, B, C))
    A = A.permute(0, 3, 1, 2)
    A_cumsum = torch.cumsum(A, dim=-1)
    L = torch.exp(_segment_sum(A))
    G = torch.einsum("bclhn,bcshn->bclsh", C, B)
    M = G * L.permute(0, 2, 3, 4, 1)
    y_diag = torch.einsum("bclsh,bcshp->bclhp", M, x)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    B_decay = B * decay_states.permute(0, -2, -1, 1)[..., None]
    states = torch.einsum("bclhn,bclhp->bchpn", B_decay, x)
    previous = (
        initial_state[:, None].to(dtype=states.dtype, device=states.device)
        if initial_state is not None
        else torch.zeros_like(states[:, :1])
    )
    states = torch.cat([previous, states], dim=1)
    decay_chunk = torch.exp(_segment_sum(F.pad(A_cumsum[:, :, :, -1], (1, 0)))).transpose(1, 3)
    new_states = torch.einsum("bzch,bzhpn->bchpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    y_off = torch.einsum("bclhn,bchpn->bclhp", C, states) * torch.exp(A_cumsum).permute(0, 2, 3, 1)[..., None]
    y = (y_diag + y_off).contiguous().reshape(batch, -1, heads, head_dim)
    y = y + d_residual
    return y[:, :length], final_state


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def gated_norm_lrp(
    norm: nn.Module, y: Tensor, gate: Tensor, compute_dtype: torch.dtype, rules: GatedLinearRules
) -> Tensor:
    """``MambaRMSNormGated`` up to (not including) its weight, in ``compute_dtype`` (HF: float32).

    ``y`` (b, L, C) scan output, ``gate`` (b, L, C) pre-activation; returns (b, L, C) in ``y.dtype``.
    """
    input_dtype = y.dtype
    h = y.to(compute_dtype) * act(F.silu, gate.to(compute_dtype), rules)
    h = half_rule(h, rules)
    *prefix, last = h.shape
    if not hasattr(norm, "group_size"):
        # measured on transformers 5.17 (GPU machine): its Mamba2 torch path differs from the form below, which
        # mirrors the grouped gated norm of newer releases (5.24); refuse rather than give relevance that is wrong
        raise LRPError(
            f"the Mamba2 LRP form needs a transformers release whose MambaRMSNormGated has `group_size` "
            f"(tested: 5.24); this one ({_transformers_version()}) is not supported"
        )
    groups = h.view(*prefix, last // norm.group_size, norm.group_size)
    scale = torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    groups = groups * hold(scale, rules.detach_norm)
    return groups.view(*prefix, last).to(input_dtype)


def mamba2_mixer_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """LRP form of ``Mamba2Mixer.forward(hidden_states, cache=None, attention_mask=None, **kwargs)``.

    ``hidden_states`` (b, L, hidden) -> (b, L, hidden). Continuing from a cached state is refused.
    Also the form of the hybrids' copies of this mixer (Bamba, GraniteMoeHybrid, NemotronH).
    """
    if cache is None:
        cache = kwargs.pop("cache_params", None)
    return mamba2_mixer_core(module, rules, hidden_states, cache, attention_mask)


Finish = Callable[[Callable[[torch.dtype], Tensor], Tensor], Tensor]


def mamba2_mixer_core(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    cache: Any,
    attention_mask: Tensor | None,
    *,
    in_multiplier: float | None = None,
    proj_multiplier: Tensor | None = None,
    finish: Finish | None = None,
) -> Tensor:
    """The Mamba2 mixer's maths with the LRP rules, shared by the Mamba2 hybrids' mixers.

    Parameters
    ----------
    in_multiplier : float, optional
        Constant scale of the (masked) input before ``in_proj`` (FalconH1's ``ssm_in_multiplier``).
    proj_multiplier : (1, 1, P) tensor, optional
        Constant scale of ``in_proj``'s output (FalconH1's ``mup_vector``).
    finish : callable ``(scan, gate) -> Tensor``, optional
        From the scan to ``out_proj``'s input: ``scan(compute_dtype)`` gives the scan output
        (b, L, C) computed in ``compute_dtype``, ``gate`` (b, L, C) is the gate's pre-activation.
        Default: Mamba2's grouped gated RMSNorm (norm after gate) with its float32 region made exact.
    """
    refuse_cached_state(module, cache)
    idx = module.layer_idx
    batch, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype

    hidden_states = mask_padding(hidden_states, attention_mask)
    if in_multiplier is not None:
        hidden_states = hidden_states * in_multiplier
    projected = module.in_proj(hidden_states)
    if proj_multiplier is not None:
        projected = projected * proj_multiplier
    A = -torch.exp(module.A_log.float())
    gate, xBC, dt = projected.split([module.intermediate_size, module.conv_dim, module.num_heads], dim=-1)

    xBC = xBC.transpose(1, 2)
    if cache is not None:
        cache.update_conv_state(xBC.detach(), idx, conv_kernel_size=module.conv_kernel_size)
    weight = module.conv1d.weight
    if _conv_is_causal(module.conv1d):
        pre = module.conv1d(xBC.to(weight.dtype))[:, :, :seq_len]
    else:
        pre = F.conv1d(xBC.to(weight.dtype), weight, module.conv1d.bias, padding=weight.shape[-1] - 1,
                       groups=xBC.shape[1])[:, :, :seq_len]
    xBC = act(module.act, pre, rules).to(xBC.dtype)
    xBC = mask_padding(xBC.transpose(1, 2), attention_mask)
    n = module.n_groups * module.ssm_state_size
    x, B, C = torch.split(xBC, [module.intermediate_size, n, n], dim=-1)
    x = x.view(batch, seq_len, module.num_heads, module.head_dim)
    B = B.view(batch, seq_len, module.n_groups, module.ssm_state_size)
    C = C.view(batch, seq_len, module.n_groups, module.ssm_state_size)
    dt = F.softplus(dt + module.dt_bias.to(dt.dtype))
    dt = torch.clamp(dt, min=module.time_step_limit[0], max=module.time_step_limit[1])

    final: list[Tensor] = []

    def scan(compute_dtype: torch.dtype) -> Tensor:
        y, last = ssd_scan_lrp(x, dt, A, B, C, module.D, module.chunk_size, compute_dtype, rules)
        final.append(last)
        return y.reshape(batch, seq_len, -1)

    if finish is None:
        def region(compute_dtype: torch.dtype) -> Tensor:
            return gated_norm_lrp(module.norm, scan(compute_dtype), gate, compute_dtype, rules)

        out = module.norm.weight * exact_region(region, x.dtype, torch.float32, rules)
    else:
        out = finish(scan, gate)
    if cache is not None:
        cache.update_recurrent_state(final[0].detach(), layer_idx=idx)  # the model's (float32) state
    return module.out_proj(out.to(dtype))


def mamba2_block_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """LRP form of ``Mamba2Block.forward``: residual add with the float32 residual cast made exact."""
    if cache is None:
        cache = kwargs.pop("cache_params", None)
    residual = hidden_states
    hidden_states = module.norm(cast(hidden_states, module.norm.weight.dtype, rules))
    if module.residual_in_fp32:
        residual = round_to(residual, torch.float32, rules)  # HF: residual.to(float32), promoted back in the add
    hidden_states = module.mixer(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    return residual + hidden_states


for _cls, _fwd, _note in [
    ("Mamba2Mixer", mamba2_mixer_lrp, "identity rule on SiLUs, Δ/decays/B/C held, half rule in the gated norm"),
    ("Mamba2RMSNorm", rms_norm_lrp, "scale detached (LN rule)"),
    ("Mamba2Block", mamba2_block_lrp, "residual add; float32 residual cast made exact"),
]:
    register_lrp_form(LRPForm(family="mamba2", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)

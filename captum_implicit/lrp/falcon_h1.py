"""LRP forms of HF transformers' FalconH1 (a Mamba2 mixer and softmax attention in parallel in every layer).

Rules:

* ``FalconH1Mixer``: the Mamba2 form (:func:`~captum_implicit.lrp.mamba2.mamba2_mixer_core`) with FalconH1's
  constant multipliers (``ssm_in_multiplier`` on the input, the µP vector on ``in_proj``'s output: linear, no
  rule needed); its gated RMSNorm (optional, gate before or after the norm, weight inside the float32 region):
  identity rule on SiLU, half rule on the gated product, the group scale held, the float32 region made exact;
  without the norm, ``y ⊙ SiLU(z)`` in the model's dtype: identity rule and half rule;
* ``FalconH1Attention``: softmax probabilities held (q, k detached after ``key_multiplier`` and RoPE), linear in V
  (:func:`~captum_implicit.lrp.mamba2_hybrids.softmax_attention_lrp`);
* ``FalconH1MLP``: ``down(up x ⊙ act(m_g · gate x)) · m_d``: identity rule on the activation, half rule;
* ``FalconH1RMSNorm``: scale held (LN rule).

The decoder layer's ``attention_in`` / ``ssm_out`` / ``attention_out`` multipliers, the embedding and ``lm_head``
multipliers are constant scales (linear). A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import act, exact_region, half_rule, hold
from .mamba import rms_norm_lrp
from .mamba2 import mamba2_mixer_core
from .mamba2_hybrids import softmax_attention_lrp

_HF = "transformers.models.falcon_h1.modeling_falcon_h1"


def _gated(y: Tensor, gate: Tensor, rules: GatedLinearRules) -> Tensor:
    return half_rule(y * act(F.silu, gate, rules), rules)


def falcon_h1_gated_norm(
    norm: nn.Module, y: Tensor, gate: Tensor, compute_dtype: torch.dtype, rules: GatedLinearRules
) -> Tensor:
    """``FalconH1RMSNormGated.forward(y, gate)`` with the rules, its float32 computations in ``compute_dtype``.

    ``y`` (b, L, C) scan output, ``gate`` (b, L, C) pre-activation; returns (b, L, C) in ``y.dtype``.
    """
    input_dtype = y.dtype
    if not norm.norm_before_gate:
        y = _gated(y, gate.to(compute_dtype), rules)
    batch, seq_len, dim = y.shape
    h = y.to(compute_dtype).view(batch, seq_len, norm.n_groups, dim // norm.n_groups)
    scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    h = h * hold(scale, rules.detach_norm)
    h = (norm.weight.view(norm.n_groups, dim // norm.n_groups) * h).view(batch, seq_len, dim)
    if norm.norm_before_gate:
        h = _gated(h, gate.to(compute_dtype), rules)
    return h.to(input_dtype)


def falcon_h1_mixer_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """LRP form of ``FalconH1Mixer.forward``; (b, L, hidden) -> (b, L, hidden)."""
    if cache is None:
        cache = kwargs.pop("cache_params", None)
    wide = hidden_states.dtype

    def finish(scan: Callable[[torch.dtype], Tensor], gate: Tensor) -> Tensor:
        if module.mamba_rms_norm:
            return exact_region(
                lambda cd: falcon_h1_gated_norm(module.norm, scan(cd), gate, cd, rules), wide, torch.float32, rules
            )
        return _gated(exact_region(scan, wide, torch.float32, rules), gate, rules)  # HF: in the model's dtype

    return mamba2_mixer_core(
        module, rules, hidden_states, cache, attention_mask,
        in_multiplier=module.ssm_in_multiplier, proj_multiplier=module.mup_vector, finish=finish,
    )


def falcon_h1_mlp_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor) -> Tensor:
    """LRP form of ``FalconH1MLP.forward``: ``down(up x ⊙ act(m_g · gate x)) · m_d``."""
    y = module.up_proj(x) * act(module.act_fn, module.gate_proj(x) * module.gate_multiplier, rules)
    return module.down_proj(half_rule(y, rules)) * module.down_multiplier


for _cls, _fwd, _note in [
    ("FalconH1Mixer", falcon_h1_mixer_lrp,
     "the Mamba2 form with constant multipliers; gated norm (either order): half rule, scale held, float32 exact"),
    ("FalconH1Attention", softmax_attention_lrp, "softmax probabilities held (q, k detached): linear in V"),
    ("FalconH1MLP", falcon_h1_mlp_lrp, "identity rule on the activation, half rule on up ⊙ act(gate)"),
    ("FalconH1RMSNorm", rms_norm_lrp, "scale held (LN rule)"),
]:
    register_lrp_form(LRPForm(family="falcon_h1", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)

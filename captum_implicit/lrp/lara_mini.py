"""LRP forms of HF transformers' LaraMini (Gated DeltaNet + q/k-norm softmax attention + MoE with a shared expert).

Existing forms serve the classes whose forwards match (checked against transformers 5.24):

* ``LaraMiniGatedDeltaNet``: Qwen3.5's (:func:`~captum_implicit.lrp.qwen3_5.split_gdn_lrp`);
* ``LaraMiniRMSNormGated``: Kimi-Linear's (weight and gate in float32);
* ``LaraMiniAttention``: LFM3's q/k-norm attention (no gate; sliding window, optional RoPE):
  :func:`~captum_implicit.lrp.lfm3.qk_norm_attention_lrp`;
* ``LaraMiniMLP`` / ``LaraMiniExperts``: Qwen3-Next's.

New forms: ``LaraMiniRMSNorm`` ``(w_fp32 · x · rsqrt(mean x² + ε)).to(dtype)`` (scale held; weight in float32,
unlike Mamba's; :func:`plain_rms_norm_lrp`) and ``LaraMiniSparseMoeBlock`` (routing weights held; the shared expert
added without a gate). A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import cast, hold
from .kimi_linear import kimi_rms_norm_gated_lrp
from .lfm3 import qk_norm_attention_lrp
from .primitives import proportional
from .qwen3_5 import split_gdn_lrp
from .qwen3_next import qwen3_next_experts_lrp
from .recurrent_gemma import rg_mlp_lrp

_HF = "transformers.models.lara_mini.modeling_lara_mini"


def plain_rms_norm_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor, weight_in_float32: bool = True
                       ) -> Tensor:
    """LRP form of an RMSNorm computing ``(w · x32 · rsqrt(mean x32² + ε)).to(dtype)`` in float32.

    ``weight_in_float32``: the weight cast to float32 first (LaraMini), or kept in its dtype (OlmoHybrid).
    With the scale held and exact casts the norm is the diagonal map ``x ↦ (value / x) · x``: HF's value, exact
    conservation.
    """
    if rules.detach_norm and rules.exact_casts:
        with torch.no_grad():
            value = type(module).forward(module, x)
        return proportional(x, value)
    h = cast(x, torch.float32, rules)
    scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    weight = module.weight.to(torch.float32) if weight_in_float32 else module.weight
    return (weight * (h * hold(scale, rules.detach_norm))).to(x.dtype)


def shared_moe_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor) -> Tensor:
    """LRP form of ``LaraMiniSparseMoeBlock.forward``: routing weights held, the ungated shared expert added."""
    batch, seq_len, hidden = hidden_states.shape
    flat = hidden_states.view(-1, hidden)
    _, weights, selected = module.gate(flat)
    out = module.experts(flat, selected, hold(weights, rules.detach_routing)) + module.shared_expert(flat)
    return out.reshape(batch, seq_len, hidden)


for _cls, _fwd, _note in [
    ("LaraMiniGatedDeltaNet", split_gdn_lrp,
     "as Qwen3.5's: identity rule on the conv's SiLU; q, k, β, decays held: delta rule linear in v; float32 kernel "
     "made exact"),
    ("LaraMiniRMSNormGated", kimi_rms_norm_gated_lrp,
     "1/rms held, half rule on norm(y) ⊙ act(z), float32 made exact"),
    ("LaraMiniAttention", qk_norm_attention_lrp, "softmax probabilities held (q, k detached): linear in V"),
    ("LaraMiniMLP", rg_mlp_lrp, "identity rule on SiLU, half rule on SiLU(gate) ⊙ up"),
    ("LaraMiniExperts", qwen3_next_experts_lrp, "per expert: identity rule on SiLU, half rule; routing weights held"),
    ("LaraMiniSparseMoeBlock", shared_moe_lrp, "routing weights held constant; shared expert added ungated"),
    ("LaraMiniRMSNorm", functools.partial(plain_rms_norm_lrp, weight_in_float32=True),
     "scale held (LN rule), float32 weight and computation made exact"),
]:
    register_lrp_form(LRPForm(family="lara_mini", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)

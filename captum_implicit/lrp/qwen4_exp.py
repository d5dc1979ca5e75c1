"""LRP forms of HF transformers' Qwen4-Exp text model (Gated DeltaNet + gated residual hyper-connections + MoE).

Existing forms serve the classes whose forwards are Qwen3.5-MoE's (checked against transformers 5.24):
``Qwen4ExpTextGatedDeltaNet`` (:func:`~captum_implicit.lrp.qwen3_5.split_gdn_lrp`), ``Qwen4ExpTextRMSNormGated``
(its activation SiLU or sigmoid, ``output_gate_type``), ``Qwen4ExpTextMLP``, ``Qwen4ExpTextExperts``,
``Qwen4ExpTextSparseMoeBlock`` (Qwen3-Next's).

New forms:

* ``Qwen4ExpTextRMSNorm``: ``(1 + w)`` RMSNorm, optionally per group of ``group_size`` features (the
  hyper-connection norms): the scale held (LN rule), float32 made exact;
* ``Qwen4ExpTextGatedResidual``: the stream-mixing weights ``σ(up(SiLU(down(n)/N)))`` and the injection weights
  ``2σ(inject(n)/N)`` are functions of the normalised streams ``n``, held constant (``rules.detach_routing``: like
  MoE routing they only weight a sum); the mixed input ``mean_s(w_s ⊙ n_s)`` is then linear in ``n``, and the
  decoder's ``hyper_input + out ⊙ injection`` linear in the streams and the block output.

Not covered: the indexed sparse attention (QSA, ``Qwen4ExpTextAttention``) and the per-layer n-gram embeddings
(PLE, ``ple_layer_ids``): the n-gram embeddings are a second input that ``inputs_embeds`` does not carry. A call that
continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import cast, hold
from .primitives import proportional
from .qwen3_5 import split_gdn_lrp
from .qwen3_next import qwen3_next_experts_lrp, qwen3_next_moe_lrp, rms_norm_gated_lrp
from .recurrent_gemma import rg_mlp_lrp

_HF = "transformers.models.qwen4_exp.modeling_qwen4_exp"


def grouped_rms_norm_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor) -> Tensor:
    """LRP form of ``Qwen4ExpTextRMSNorm.forward``: ``x · rsqrt(mean_group x² + ε) · (1 + w)`` in float32."""
    if rules.detach_norm and rules.exact_casts:
        with torch.no_grad():
            value = type(module).forward(module, x)
        return proportional(x, value)  # the diagonal map x ↦ (value/x)·x: scales, (1 + w) and casts constant
    h = cast(x, torch.float32, rules)
    if module.group_size is not None:
        h = h.reshape(*h.shape[:-1], -1, module.group_size)
    out = h * hold(torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.eps), rules.detach_norm)
    if module.group_size is not None:
        out = out.flatten(-2)
    return (out * (1.0 + module.weight.float())).type_as(x)


def gated_residual_lrp(
    module: nn.Module, rules: GatedLinearRules, hyper_input: Tensor
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """LRP form of ``Qwen4ExpTextGatedResidual.forward``: mixing and injection weights held.

    ``hyper_input`` (b, L, N·H) -> ``mixed`` (b, L, H), and with ``block_inject_weight`` also ``hyper_input`` and
    the injection weights (b, L, N).
    """
    count, hidden = module.hc_count, module.hidden_size
    if hyper_input.shape[-1] != count * hidden:
        raise ValueError(f"Expected {count * hidden} hyper-connection features, got {hyper_input.shape[-1]}.")
    normed = module.hc_norm(hyper_input)
    held = hold(normed, rules.detach_routing)
    weight = F.silu(module.input_mix_weight_down(held) / count)
    weight = torch.sigmoid(module.input_mix_weight_up(weight)).unflatten(-1, (count, hidden))
    mixed = (weight * normed.unflatten(-1, (count, hidden))).mean(dim=-2)
    if module.block_inject_weight is None:
        return mixed
    injection = 2 * torch.sigmoid(module.block_inject_weight(held) / count)
    return mixed, hyper_input, injection


for _cls, _fwd, _note in [
    ("Qwen4ExpTextGatedDeltaNet", split_gdn_lrp,
     "as Qwen3.5's: identity rule on the conv's SiLU; q, k, β, decays held: delta rule linear in v; float32 kernel "
     "made exact"),
    ("Qwen4ExpTextRMSNormGated", rms_norm_gated_lrp,
     "1/rms held, half rule on norm(y) ⊙ act(z), float32 made exact"),
    ("Qwen4ExpTextGatedResidual", gated_residual_lrp,
     "stream-mixing and injection weights held constant: hyper-connections linear"),
    ("Qwen4ExpTextMLP", rg_mlp_lrp, "identity rule on SiLU, half rule on SiLU(gate) ⊙ up"),
    ("Qwen4ExpTextExperts", qwen3_next_experts_lrp,
     "per expert: identity rule on SiLU, half rule; routing weights held"),
    ("Qwen4ExpTextSparseMoeBlock", qwen3_next_moe_lrp, "routing weights and the shared expert's gate held constant"),
    ("Qwen4ExpTextRMSNorm", grouped_rms_norm_lrp,
     "(grouped) scale held (LN rule) with (1 + w), float32 computation made exact"),
]:
    register_lrp_form(LRPForm(family="qwen4_exp", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)

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

* ``Qwen4ExpTextAttention`` (QSA): the indexer's block selection (a discrete choice: HF's own indexer, run without
  a graph) is held and combined with the causal mask as HF combines them; then Qwen3-Next's gated attention form
  (:func:`~captum_implicit.lrp.qwen3_next.qwen3_next_attention_lrp`: q/k normed and rotated, probabilities held,
  half rule and identity rule on ``o ⊙ σ(gate)``), linear in V.

Not covered: the per-layer n-gram embeddings (PLE, ``ple_layer_ids``): they are a second input that
``inputs_embeds`` does not carry. A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import cast, continuation_refused, hold
from .primitives import proportional
from .qwen3_5 import split_gdn_lrp
from .qwen3_next import qwen3_next_attention_lrp, qwen3_next_experts_lrp, qwen3_next_moe_lrp, rms_norm_gated_lrp
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


def qsa_attention_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    attention_mask: Tensor,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """LRP form of ``Qwen4ExpTextAttention.forward``: the indexer's selection and the probabilities held.

    ``hidden_states`` (b, L, H); ``position_embeddings`` cos/sin over all positions (b, P, d_rot); ``attention_mask``
    the model's 4-D causal mask (bool for SDPA, additive for eager). Returns ``(o_proj(out) (b, L, H), weights)``.
    """
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    if cache is not None and cache.get_seq_length(module.layer_idx) > 0:  # before the indexer writes to the cache
        raise continuation_refused(f"{type(module).__name__} layer {module.layer_idx}")
    with torch.no_grad():  # a discrete choice (top-k blocks), as HF computes it
        selected = module.indexer(hidden_states, position_embeddings, attention_mask, cache)
    if attention_mask.dtype == torch.bool:
        attention_mask = attention_mask & selected
    else:
        attention_mask = attention_mask.masked_fill(~selected, torch.finfo(attention_mask.dtype).min)
    seq_len = hidden_states.shape[1]
    position_embeddings = tuple(x[:, -seq_len:, :] for x in position_embeddings)
    return qwen3_next_attention_lrp(module, rules, hidden_states, position_embeddings, attention_mask, cache,
                                    **kwargs)


for _cls, _fwd, _note in [
    ("Qwen4ExpTextAttention", qsa_attention_lrp,
     "QSA: indexer's block selection held; softmax probabilities held (q, k detached): linear in V; half rule on "
     "o ⊙ σ(gate)"),
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

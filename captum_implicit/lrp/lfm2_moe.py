"""LRP forms of HF transformers' LFM2-MoE: LFM2's layers re-registered, plus its sparse MoE block.

``Lfm2MoeShortConv``, ``Lfm2MoeAttention``, ``Lfm2MoeMLP`` and ``Lfm2MoeRMSNorm`` have LFM2's forwards verbatim
(transformers 5.24), so LFM2's forms serve them (:mod:`captum_implicit.lrp.lfm2`). ``Lfm2MoeExperts`` is HF's
eager expert loop (Qwen3-Next's form: identity rule on SiLU, half rule, routing weights held).
``Lfm2MoeSparseMoeBlock``: the sigmoid router's top-k weights (renormalised, scaled, expert bias used only for
the choice) held constant (``rules.detach_routing``): a sum of experts with constant weights, no shared expert.

A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import hold
from .lfm2 import lfm2_attention_lrp, lfm2_mlp_lrp, short_conv_lrp
from .mamba import rms_norm_lrp
from .qwen3_next import qwen3_next_experts_lrp

_HF = "transformers.models.lfm2_moe.modeling_lfm2_moe"


def lfm2_moe_block_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor) -> Tensor:
    """LRP form of ``Lfm2MoeSparseMoeBlock.forward``: the router's top-k weights held; (b, L, H) -> (b, L, H)."""
    shape = hidden_states.shape
    flat = hidden_states.view(-1, shape[-1])
    _, weights, selected = module.gate(flat, module.expert_bias if module.use_expert_bias else None)
    return module.experts(flat, selected, hold(weights, rules.detach_routing)).reshape(shape)


for _cls, _fwd, _note in [
    ("Lfm2MoeShortConv", short_conv_lrp, "half rule on B ⊙ x and on C ⊙ conv(·); conv linear"),
    ("Lfm2MoeAttention", lfm2_attention_lrp, "softmax probabilities held (q, k detached): linear in V"),
    ("Lfm2MoeMLP", lfm2_mlp_lrp, "identity rule on SiLU, half rule on SiLU(w1 x) ⊙ w3 x"),
    ("Lfm2MoeExperts", qwen3_next_experts_lrp, "per expert: identity rule on SiLU, half rule; routing weights held"),
    ("Lfm2MoeSparseMoeBlock", lfm2_moe_block_lrp, "sigmoid router's top-k weights held constant"),
    ("Lfm2MoeRMSNorm", rms_norm_lrp, "scale held (LN rule)"),
]:
    register_lrp_form(LRPForm(family="lfm2_moe", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)

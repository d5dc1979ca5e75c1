"""LRP forms of HF transformers' GLM-5-Next text model (KDA + manifold-constrained hyper-connections + MoE).

Kimi-Linear's forms serve the classes whose forwards are Kimi-Linear's (:mod:`captum_implicit.lrp.kimi_linear`,
checked against transformers 5.24): ``Glm5NextTextLinearAttention`` (KDA; its low-rank forget gate held with q, k,
β), ``Glm5NextTextRMSNormGated`` (sigmoid gate), ``Glm5NextTextRMSNorm``, ``Glm5NextTextMoE``.

New forms:

* ``Glm5NextTextMLP`` / ``Glm5NextTextExperts``: SwiGLU with clamps (``gate ≤ limit``, ``|up| ≤ limit``): the
  identity rule on each clamp and on SiLU, half rule on the product
  (:func:`~captum_implicit.lrp.qwen3_next.swiglu`; the experts run Qwen3-Next's eager-loop form);
* ``Glm5NextTextHyperConnection``: the weights ``pre``, ``post`` (sigmoids) and ``comb`` (Sinkhorn-normalised
  softmax) are computed from the streams; held constant (``rules.detach_routing``: like MoE routing they only
  weight a sum), the collapse ``Σ_n pre_n x_n`` and the decoder's ``post ⊙ out + combᵀ x`` are linear in the
  streams. The final ``Glm5NextTextHyperHead`` (a mean) is linear as it is.

The indexed sparse MLA of its softmax layers (``Glm5NextTextAttention``, DSA) has no form: a model with softmax
layers runs them as they are and relevance does not conserve there. A call that continues from a cached state is
refused (:class:`LRPError`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import hold
from .kimi_linear import kda_lrp, kimi_moe_lrp, kimi_rms_norm_gated_lrp
from .mamba import rms_norm_lrp
from .qwen3_next import qwen3_next_experts_lrp, swiglu

_HF = "transformers.models.glm5_next.modeling_glm5_next"


def glm_mlp_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor) -> Tensor:
    """LRP form of ``Glm5NextTextMLP.forward``: ``down(SiLU(clamp gate) ⊙ clamp up)``; (…, H) -> (…, H)."""
    return module.down_proj(swiglu(module.gate_proj(x), module.up_proj(x), rules, module.act_fn,
                                   module.swiglu_limit))


def hyper_connection_lrp(
    module: nn.Module, rules: GatedLinearRules, hidden_streams: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """LRP form of ``Glm5NextTextHyperConnection.forward``: the mixing weights held constant.

    ``hidden_streams`` (b, L, N, H) -> ``post`` (b, L, N), ``comb`` (b, L, N, N), ``collapsed`` (b, L, H); the
    weights as HF computes them (float32), from the streams detached when ``rules.detach_routing``.
    """
    batch, seq_len = hidden_streams.shape[:2]
    hc = module.hc_mult
    flattened = module.input_norm(hold(hidden_streams, rules.detach_routing).view(batch, seq_len, -1).float())
    flattened = torch.nn.functional.linear(flattened, module.fn.float())
    pre_w, post_w, comb_w = flattened.split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = module.base.split([hc, hc, hc * hc])
    pre_scale, post_scale, comb_scale = module.scale.unbind(0)
    comb_w = comb_w.view(*comb_w.shape[:-1], hc, hc)
    comb_b = comb_b.view(hc, hc)
    pre = torch.sigmoid(pre_w * pre_scale + pre_b) + module.hc_eps
    post = 2 * torch.sigmoid(post_w * post_scale + post_b)
    comb = torch.softmax(comb_w * comb_scale + comb_b, dim=-1) + module.hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + module.hc_eps)
    for _ in range(module.hc_sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + module.hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + module.hc_eps)
    collapsed = (pre.unsqueeze(-1) * hidden_streams).sum(dim=2).to(hidden_streams.dtype)
    return post, comb, collapsed


for _cls, _fwd, _note in [
    ("Glm5NextTextLinearAttention", kda_lrp,
     "as Kimi's KDA: identity rule on the conv's SiLU; q, k, β, channel-wise decays held: delta rule linear in v; "
     "float32 kernel made exact"),
    ("Glm5NextTextRMSNormGated", kimi_rms_norm_gated_lrp,
     "1/rms held, half rule on norm(y) ⊙ σ(z), float32 made exact"),
    ("Glm5NextTextHyperConnection", hyper_connection_lrp,
     "hyper-connection weights pre, post, comb held constant: stream collapse and mixing linear"),
    ("Glm5NextTextMLP", glm_mlp_lrp, "identity rule on the clamps and SiLU, half rule on SiLU(gate) ⊙ up"),
    ("Glm5NextTextExperts", qwen3_next_experts_lrp,
     "per expert: identity rule on the clamps and SiLU, half rule; routing weights held"),
    ("Glm5NextTextMoE", kimi_moe_lrp, "router's top-k weights held constant; shared experts added"),
    ("Glm5NextTextRMSNorm", rms_norm_lrp, "scale held (LN rule), float32 computation made exact"),
]:
    register_lrp_form(LRPForm(family="glm5_next", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)

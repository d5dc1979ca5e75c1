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

* ``Glm5NextTextAttention`` (DSA: indexed sparse MLA, NoPE): ``q = q_b(RMSNorm(q_a x))``, ``[k_nope, v] =
  kv_b(RMSNorm(kv_a x))``; the indexer's top-k selection (its own ``wq_b`` / ``wk`` / k-pool scoring, computed by
  HF under ``no_grad``; a ``"shared"`` layer reuses the previous layer's indices) is a discrete choice held as it
  is, turned into the additive mask by the module's own ``build_attention_mask_from_topk``; queries and the
  expanded keys held (``rules.detach_softmax``, :func:`~captum_implicit.lrp.common.held_softmax_attention`): the
  probabilities are constants and the layer is linear in the value latents (through ``kv_a_layernorm``'s LN rule
  and ``kv_b_proj``). The cache stores the latents (filled as HF fills it on a first call).

A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import fill_cache_first_call, held_softmax_attention, hold
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


def dsa_attention_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    attention_mask: Tensor | None,
    cache: Any = None,
    prev_topk_indices: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """LRP form of ``Glm5NextTextAttention.forward``: selection and probabilities held, linear in the value latents.

    ``hidden_states`` (b, L, H); ``attention_mask`` the model's (b, L) boolean padding mask (the indexer's input).
    Returns ``(o_proj(out) (b, L, H), weights, top-k indices (b, L, k) for a following shared layer, or None)``.
    """
    hf = importlib.import_module(type(module).__module__)
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    batch, seq_len = hidden_states.shape[:-1]
    q_resid = module.q_a_layernorm(module.q_a_proj(hidden_states))
    query = module.q_b_proj(q_resid).view(batch, seq_len, -1, module.qk_head_dim).transpose(1, 2)
    kv_pass, k_rot = torch.split(
        module.kv_a_proj_with_mqa(hidden_states), [module.kv_lora_rank, module.qk_rope_head_dim], dim=-1
    )
    k_pass = module.kv_a_layernorm(kv_pass).view(batch, 1, seq_len, module.kv_lora_rank)
    k_rot = k_rot.view(batch, 1, seq_len, module.qk_rope_head_dim)
    if cache is not None:  # HF caches the latents before the indexer runs (the indexer reads the cache's length)
        k_pass, k_rot = fill_cache_first_call(module, cache, k_pass, k_rot, kwargs, what="latent")
    key, value = module.expand_kv(k_pass, k_rot)
    if module.indexer is not None:  # HF's own indexer (under no_grad): the top-k selection is a discrete choice
        topk_indices = module.indexer(hidden_states=hidden_states, q_resid=q_resid, attention_mask=attention_mask,
                                      cache=cache)
    elif prev_topk_indices is None:
        raise ValueError("Shared DSA layers require top-k indices from a previous full indexer layer.")
    else:
        topk_indices = prev_topk_indices
    mask = module.build_attention_mask_from_topk(topk_indices=topk_indices, query_states=query,
                                                 kv_length=key.shape[2])
    # the latents are cached already: K and V are expanded from the cache's copies, no second fill
    out, weights = held_softmax_attention(module, rules, query, key, value, mask, None, kwargs,
                                          hf.eager_attention_forward)
    out = module.o_proj(out.reshape(batch, seq_len, -1).contiguous())
    return out, weights, topk_indices if module.next_skip_topk else None


for _cls, _fwd, _note in [
    ("Glm5NextTextAttention", dsa_attention_lrp,
     "DSA (sparse MLA): indexer's top-k selection held; softmax probabilities held (q, expanded k detached): "
     "linear in the value latents"),
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

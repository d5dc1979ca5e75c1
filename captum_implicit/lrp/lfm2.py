"""LRP forms of HF transformers' LFM2 (gated short convolutions + softmax attention hybrid).

Rules:

* ``Lfm2ShortConv``: ``y = C ⊙ conv(B ⊙ x)`` with B, C, x linear in the block's input: half rule
  on each of the two products (``rules.half_gate``), the conv linear;
* ``Lfm2Attention``: softmax probabilities held (queries and keys detached after their
  RMSNorms and RoPE; CP-LRP), so it is linear in V;
* ``Lfm2MLP``: ``w2(SiLU(w1 x) ⊙ w3 x)``: identity rule on SiLU, half rule on the product;
* ``Lfm2RMSNorm``: ``w · x · rsqrt(mean x² + ε)`` in float32, scale held (as ``MambaRMSNorm``).

A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import act, half_rule, held_softmax_attention, mask_padding, refuse_cached_state
from .mamba import _conv_is_causal, rms_norm_lrp

_HF = "transformers.models.lfm2.modeling_lfm2"


def short_conv_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """LRP form of ``Lfm2ShortConv.forward``; (b, L, H) -> (b, L, H)."""
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    seq_len = hidden_states.shape[1]
    refuse_cached_state(module, cache, recurrent=False)
    hidden_states = mask_padding(hidden_states, attention_mask)
    B, C, x = module.in_proj(hidden_states).transpose(-1, -2).chunk(3, dim=-2)
    h = half_rule(B * x, rules)
    if cache is not None:  # HF conv's the (possibly left-padded) prefill it caches; same numbers, live graph
        full = cache.update_conv_state(h.detach(), module.layer_idx, conv_kernel_size=module.conv_kernel_size)
        h = F.pad(h, (full.shape[-1] - seq_len, 0))
    weight = module.conv.weight
    if _conv_is_causal(module.conv):  # the module computes HF's conv: call it so Zennit rules can attach
        conv = module.conv(h.to(weight.dtype))
    else:
        conv = F.conv1d(h.to(weight.dtype), weight=weight, bias=module.conv.bias, padding=weight.shape[-1] - 1,
                        groups=h.shape[1])
    conv = conv[:, :, : h.shape[-1]].to(h.dtype)
    y = half_rule(C * conv[:, :, -seq_len:], rules)
    return module.out_proj(y.transpose(-1, -2).contiguous())


def lfm2_mlp_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor) -> Tensor:
    """LRP form of ``Lfm2MLP.forward``: ``w2(SiLU(w1 x) ⊙ w3 x)``."""
    return module.w2(half_rule(act(F.silu, module.w1(x), rules) * module.w3(x), rules))


def lfm2_attention_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    attention_mask: Tensor | None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """LRP form of ``Lfm2Attention.forward``: HF's attention with queries and keys held constant."""
    from transformers.models.lfm2.modeling_lfm2 import apply_rotary_pos_emb, eager_attention_forward

    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    query = module.q_layernorm(module.q_proj(hidden_states).view(*hidden_shape)).transpose(1, 2)
    key = module.k_layernorm(module.k_proj(hidden_states).view(*hidden_shape)).transpose(1, 2)
    value = module.v_proj(hidden_states).view(*hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    out, weights = held_softmax_attention(
        module, rules, query, key, value, attention_mask, cache, kwargs, eager_attention_forward, dropout=0.0
    )
    return module.out_proj(out.reshape(*input_shape, -1).contiguous()), weights


for _cls, _fwd, _note in [
    ("Lfm2ShortConv", short_conv_lrp, "half rule on B ⊙ x and on C ⊙ conv(·); conv linear"),
    ("Lfm2Attention", lfm2_attention_lrp, "softmax probabilities held (q, k detached): linear in V"),
    ("Lfm2MLP", lfm2_mlp_lrp, "identity rule on SiLU, half rule on SiLU(w1 x) ⊙ w3 x"),
    ("Lfm2RMSNorm", rms_norm_lrp, "scale held (LN rule)"),
]:
    register_lrp_form(LRPForm(family="lfm2", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)

"""LRP forms of HF transformers' LFM3: LFM2's short conv, MLP and RMSNorm re-registered, a new attention form.

``Lfm3ShortConv``, ``Lfm3MLP`` and ``Lfm3RMSNorm`` have LFM2's forwards verbatim (transformers 5.24), so LFM2's
forms serve them (:mod:`captum_implicit.lrp.lfm2`; the optional sandwich norms are ``Lfm3RMSNorm`` too).

``Lfm3Attention`` differs from LFM2's: ``q_norm``/``k_norm``/``o_proj`` names, an optional sliding window and an
optional per-head sigmoid output gate ``o_h ⊙ σ(g_proj(x))_h``. Its form holds the softmax probabilities
(queries and keys detached after their RMSNorms and RoPE; CP-LRP), so it is linear in V, and splits the gated
product half/half with the identity rule on the sigmoid (``rules.half_gate``, ``rules.identity_act``), as
Qwen3-Next's gated attention.

A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import act, half_rule, held_softmax_attention
from .lfm2 import lfm2_mlp_lrp, short_conv_lrp
from .mamba import rms_norm_lrp

_HF = "transformers.models.lfm3.modeling_lfm3"


def qk_norm_attention_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor] | None,
    attention_mask: Tensor | None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """LRP form of ``Lfm3Attention.forward`` (also LaraMini's and OlmoHybrid's q/k-norm attention).

    Probabilities held; the optional per-head sigmoid gate ``g_proj`` split half/half. RoPE and eager attention
    come from the module's own transformers file; ``position_embeddings=None`` skips RoPE (NoPE layers). The q/k
    norms act per head, or on the whole projection where their size says so (OlmoHybrid).
    """
    import importlib


    hf = importlib.import_module(type(module).__module__)
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)

    def normed(norm: nn.Module, x: Tensor) -> Tensor:
        if norm.weight.shape[-1] == module.head_dim:  # per head
            return norm(x.view(hidden_shape)).transpose(1, 2)
        return norm(x).view(hidden_shape).transpose(1, 2)  # over the whole projection (OlmoHybrid)

    query = normed(module.q_norm, module.q_proj(hidden_states))
    key = normed(module.k_norm, module.k_proj(hidden_states))
    value = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    if position_embeddings is not None:
        cos, sin = position_embeddings
        query, key = hf.apply_rotary_pos_emb(query, key, cos, sin)
    # the sliding window as the module passes it (OlmoHybrid's attention does not)
    extra = {"sliding_window": module.sliding_window} if hasattr(module, "sliding_window") else {}
    out, weights = held_softmax_attention(
        module, rules, query, key, value, attention_mask, cache, kwargs, hf.eager_attention_forward, **extra
    )
    if getattr(module, "g_proj", None) is not None:  # (b, L, heads, d) ⊙ σ(g)(b, L, heads, 1)
        out = out * act(torch.sigmoid, module.g_proj(hidden_states), rules).unsqueeze(-1)
        out = half_rule(out, rules)
    return module.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


for _cls, _fwd, _note in [
    ("Lfm3ShortConv", short_conv_lrp, "half rule on B ⊙ x and on C ⊙ conv(·); conv linear"),
    ("Lfm3Attention", qk_norm_attention_lrp,
     "softmax probabilities held (q, k detached): linear in V; half rule on o ⊙ σ(g_proj x) per head"),
    ("Lfm3MLP", lfm2_mlp_lrp, "identity rule on SiLU, half rule on SiLU(w1 x) ⊙ w3 x"),
    ("Lfm3RMSNorm", rms_norm_lrp, "scale held (LN rule)"),
]:
    register_lrp_form(LRPForm(family="lfm3", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)

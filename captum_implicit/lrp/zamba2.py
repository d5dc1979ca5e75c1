"""LRP forms of HF transformers' Zamba2 (Mamba2 layers + one shared transformer block applied at several depths).

Rules:

* ``Zamba2MambaMixer``: the Mamba2 form (:func:`~captum_implicit.lrp.mamba2.mamba2_mixer_lrp`; HF's forward is
  Mamba2's line for line);
* ``Zamba2Attention`` (input: the concatenation of the hidden state and the embeddings; optional per-depth LoRA
  adapters on q, k, v; optional RoPE): softmax probabilities held (q, k detached), linear in V;
* ``Zamba2MLP``: ``down(act(a) ⊙ b)`` with ``(a, b) = gate_up(x) + adapter(x)``: identity rule on the
  activation, half rule on the product;
* ``Zamba2RMSNorm``: scale held (LN rule).

The shared block. HF 5.24 builds one ``Zamba2AttentionDecoderLayer`` per hybrid layer with tied parameters; older
releases (and user code) may insert the *same instance* at every hybrid depth, so that one module runs several
times per forward. Both are supported: the forms keep no state on the module (every call's held queries, keys,
routing and scales live in that call's autograd graph) and the canonizer swaps each instance's forward once,
however often it appears in the tree; the GI-convention Zennit rules (:class:`~captum_implicit.lrp.rules.GIRule`)
also save their input per call. The per-depth adapters are picked by the ``layer_idx`` of each call, as in HF.

A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import act, half_rule, held_softmax_attention
from .mamba import rms_norm_lrp
from .mamba2 import mamba2_mixer_lrp

_HF = "transformers.models.zamba2.modeling_zamba2"


def zamba2_attention_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    layer_idx: int,
    attention_mask: Tensor | None = None,
    cache: Any = None,
    position_embeddings: tuple[Tensor, Tensor] | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """LRP form of ``Zamba2Attention.forward``: (b, L, 2H) -> ((b, L, H), weights); q and k held constant.

    Also ``ZambaAttention``'s (Zamba v1: the same forward without adapters and RoPE). The module's own modeling
    file supplies RoPE and the eager attention.
    """

    hf = sys.modules[type(module).__module__]
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    query = module.q_proj(hidden_states)
    key = module.k_proj(hidden_states)
    value = module.v_proj(hidden_states)
    if getattr(module.config, "use_shared_attention_adapter", False):
        adapter = module.layer_dic[layer_idx]  # this depth's adapters (linear)
        query = query + module.linear_q_adapter_list[adapter](hidden_states)
        key = key + module.linear_k_adapter_list[adapter](hidden_states)
        value = value + module.linear_v_adapter_list[adapter](hidden_states)
    query = query.view(hidden_shape).transpose(1, 2)
    key = key.view(hidden_shape).transpose(1, 2)
    value = value.view(hidden_shape).transpose(1, 2)
    if getattr(module.config, "use_mem_rope", False):
        cos, sin = position_embeddings
        query, key = hf.apply_rotary_pos_emb(query, key, cos, sin)
    out, weights = held_softmax_attention(
        module, rules, query, key, value, attention_mask, cache, kwargs, hf.eager_attention_forward,
        layer_idx=layer_idx,
    )
    return module.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def zamba2_mlp_lrp(module: nn.Module, rules: GatedLinearRules, hidden_state: Tensor, layer_idx: int | None = None
                   ) -> Tensor:
    """LRP form of ``Zamba2MLP.forward``: ``down(act(a) ⊙ b)``, ``(a, b) = gate_up(x) + adapter_depth(x)``."""
    gate_up = module.gate_up_proj(hidden_state)
    gate_up = gate_up + module.gate_up_proj_adapter_list[module.layer_dic[layer_idx]](hidden_state)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = act(module.act_fn, gate, rules) * up
    hidden = half_rule(hidden, rules)
    return module.down_proj(hidden)


for _cls, _fwd, _note in [
    ("Zamba2MambaMixer", mamba2_mixer_lrp,
     "the Mamba2 form: identity rule on SiLUs, Δ/decays/B/C held, half rule in the gated norm"),
    ("Zamba2Attention", zamba2_attention_lrp,
     "softmax probabilities held (q, k detached; per-depth adapters): linear in V; shared block: per-call state"),
    ("Zamba2MLP", zamba2_mlp_lrp, "identity rule on the activation, half rule on act(a) ⊙ b (per-depth adapters)"),
    ("Zamba2RMSNorm", rms_norm_lrp, "scale held (LN rule)"),
]:
    register_lrp_form(LRPForm(family="zamba2", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)

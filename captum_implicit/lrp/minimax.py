"""LRP forms of HF transformers' MiniMax (lightning attention + softmax attention hybrid, MoE in every layer).

Rules:

* ``MiniMaxLightningAttention``: ``SiLU(qkv_proj(x))`` takes the identity rule; queries and keys
  are held constant (``rules.detach_ssm``: the q·k products are held like attention
  probabilities), and the per-head decays ``exp(−slope·Δt)`` are fixed buffers, so the blockwise
  ``o = Σ_s (q_t·k_s) e^{−λ(t−s)} v_s`` is linear in v. HF computes it in the model's dtype;
  the form runs HF's own block loop (same operations, same value). The output
  ``σ(output_gate(x)) ⊙ RMSNorm(o)``: half rule (both factors depend on the input, as every
  other output gate here), identity rule on the sigmoid; the norm is ``MiniMaxRMSNorm``'s form;
* ``MiniMaxAttention``: softmax probabilities held (queries and keys detached after RoPE;
  CP-LRP), so it is linear in V;
* ``MiniMaxExperts``: per expert ``SiLU(gate) ⊙ up``: half rule, identity on SiLU (Qwen3-Next's
  form: the routing weights held);
* ``MiniMaxSparseMoeBlock``: the router's (float32 softmax, renormalised) top-k weights held
  constant (``rules.detach_routing``): a sum of experts with constant weights;
* ``MiniMaxRMSNorm``: ``w · x · rsqrt(mean x² + ε)`` in float32, scale held (Mamba's form, the same
  maths).

``MiniMaxDecoderLayer``'s residual scalings ``α·residual + β·branch`` are constant scalars: linear,
so gradient×input conserves through them as they are (no form needed). A call that continues from a
cached state is refused (:class:`LRPError`), as is the training-mode router jitter (it rescales its
input in place).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPError, LRPForm, register_lrp_form
from .common import act, continuation_refused, half_rule, held_softmax_attention, hold, mask_padding, project_heads
from .mamba import rms_norm_lrp
from .qwen3_next import qwen3_next_experts_lrp

_HF = "transformers.models.minimax.modeling_minimax"


def _hf() -> Any:
    import importlib

    return importlib.import_module(_HF)


def lightning_blocks(module: nn.Module, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """HF's block loop of ``MiniMaxLightningAttention`` from a zero state (the same operations, so the same value).

    Parameters
    ----------
    query, key, value : (b, H, L, d)

    Returns
    -------
    (b, H, L, d) output and the final ``(b, H, d, d)`` KV state; linear in ``value``.
    """
    batch, heads, seq_len, dim = value.shape
    inter = torch.zeros(batch, heads, dim, dim, device=value.device, dtype=value.dtype)
    outs = []
    for start in range(0, seq_len, module.block_size):
        end = min(start + module.block_size, seq_len)
        size = end - start
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        intra = torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * module.diagonal_decay[:, :, :size, :size], v)
        outs.append(torch.matmul(q * module.query_decay[:, :size], inter) + intra)
        inter = inter * torch.exp(-module.slope_rate * size) + torch.matmul(
            (k * module.key_decay[:, -size:]).transpose(-1, -2), v
        )
    return torch.cat(outs, dim=-2), inter


def lightning_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    position_embeddings: Any = None,
    attention_mask: Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """LRP form of ``MiniMaxLightningAttention.forward``; (b, L, H) -> ((b, L, H), final KV state)."""
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    if cache is not None and cache.get_linear_cache(module.layer_idx) is not None:
        raise continuation_refused(f"MiniMaxLightningAttention layer {module.layer_idx}")
    batch, seq_len, _ = hidden_states.shape
    qkv = act(module.act_fn, module.qkv_proj(hidden_states), rules)
    qkv = mask_padding(qkv, attention_mask)
    qkv = qkv.reshape(batch, seq_len, module.num_attention_heads, 3 * module.head_dim)
    query, key, value = (t.transpose(1, 2) for t in torch.split(qkv, module.head_dim, dim=3))
    # q·k held (the decays are fixed buffers): linear in v
    query, key = hold(query, rules.detach_ssm), hold(key, rules.detach_ssm)
    out, inter = lightning_blocks(module, query, key, value)
    out = out.transpose(1, 2).reshape(batch, seq_len, module.num_attention_heads * module.head_dim)
    out = act(F.sigmoid, module.output_gate(hidden_states), rules) * module.norm(out)
    out = half_rule(out, rules)
    out = module.out_proj(out)
    if cache is not None:
        cache.set_linear_cache(module.layer_idx, inter.detach())
    return out, inter


def minimax_attention_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    attention_mask: Tensor | None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """LRP form of ``MiniMaxAttention.forward``: softmax probabilities held, linear in V."""

    hf = _hf()
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    query, key, value = project_heads(module, hidden_states, "q_proj", "k_proj", "v_proj")
    cos, sin = position_embeddings
    query, key = hf.apply_rotary_pos_emb(query, key, cos, sin)
    out, weights = held_softmax_attention(
        module, rules, query, key, value, attention_mask, cache, kwargs, hf.eager_attention_forward,
        sliding_window=getattr(module.config, "sliding_window", None),
    )
    return module.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def minimax_moe_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor) -> Tensor:
    """LRP form of ``MiniMaxSparseMoeBlock.forward``: the router's top-k weights held constant."""
    if module.training and module.jitter_noise > 0:
        raise LRPError("MiniMaxSparseMoeBlock: router jitter (training mode) rescales the input in place; use eval()")
    batch, seq_len, hidden = hidden_states.shape
    flat = hidden_states.view(-1, hidden)
    _, weights, index = module.gate(flat)
    return module.experts(flat, index, hold(weights, rules.detach_routing)).reshape(batch, seq_len, hidden)


for _cls, _fwd, _note in [
    ("MiniMaxLightningAttention", lightning_lrp,
     "identity rule on SiLU(qkv); q, k held (fixed per-head decays): linear in v; half rule on σ(gate) ⊙ norm(o)"),
    ("MiniMaxAttention", minimax_attention_lrp, "softmax probabilities held (q, k detached): linear in V"),
    ("MiniMaxExperts", qwen3_next_experts_lrp, "per expert: identity rule on SiLU, half rule; routing weights held"),
    ("MiniMaxSparseMoeBlock", minimax_moe_lrp, "router's top-k weights held constant"),
    ("MiniMaxRMSNorm", rms_norm_lrp, "scale held (LN rule), float32 computation made exact"),
]:
    register_lrp_form(LRPForm(family="minimax", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)

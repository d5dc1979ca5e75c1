"""LRP forms of HF transformers' RecurrentGemma (Griffin / Hawk).

Rules:

* ``RecurrentGemmaRglru``: the input gate, the recurrence ``a_t`` and ``√(1 − a_t²)`` are
  computed from the block's own input; all held constant (``rules.detach_ssm``), so the
  RG-LRU is linear in its input. HF accumulates the scan in float32 even in float64 models:
  that region is made exact by :func:`~captum_implicit.lrp.common.exact_region`;
* ``RecurrentGemmaRecurrentBlock``: conv linear; ``x_branch ⊙ GELU(y)``: half rule, identity
  rule on the GELU;
* ``RecurrentGemmaMlp``: ``GELU(gate) ⊙ up``: half rule, identity rule on the GELU;
* ``RecurrentGemmaAttention`` (local attention): the softmax probabilities held constant
  (queries and keys detached, ``rules.detach_softmax``; CP-LRP), so it is linear in V;
* ``RecurrentGemmaRMSNorm``: ``x · rsqrt(mean x² + ε) · (1 + w)`` computed in float32, scale
  held constant — a diagonal map, written as :func:`proportional` of the exact value;
* ``RecurrentGemmaForCausalLM``: the logit soft cap ``c·tanh(z/c)``: identity rule, so the
  relevance sums to the capped logit the model returns.

A decoding step that continues from a cached state is refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPError, LRPForm, register_lrp_form
from .common import (
    act, cast, continuation_refused, exact_region, half_rule, held_softmax_attention, hold, project_heads,
)
from .primitives import proportional

_HF = "transformers.models.recurrent_gemma.modeling_recurrent_gemma"


def rg_rms_norm_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor) -> Tensor:
    """LRP form of ``RecurrentGemmaRMSNorm.forward(x)``."""
    if rules.detach_norm and rules.exact_casts:
        with torch.no_grad():
            value = type(module).forward(module, x)
        return proportional(x, value)  # the diagonal map x ↦ (value/x)·x: scale, (1 + w) and casts constant
    h = cast(x, torch.float32, rules)
    scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.eps)
    out = (h * hold(scale, rules.detach_norm)) * (1.0 + module.weight.float())
    return out.type_as(x)


def _linear_scan(
    x: Tensor, a: Tensor, reset: Tensor, initial: Tensor | None, compute_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """HF ``RecurrentGemmaRglru._rnn_scan`` with accumulation dtype ``compute_dtype`` (HF: float32)."""
    a = a * ~reset
    if x.shape[1] == 1:
        if initial is None:
            return x, x[:, 0].type(compute_dtype)
        states = a.type(compute_dtype) * initial[:, None].to(a.device)
        states = states + x.type(compute_dtype)
        return states.type(x.dtype), states[:, -1]
    states = torch.zeros(x[:, 0].shape, dtype=compute_dtype, device=x.device) if initial is None else initial
    states = states.to(compute_dtype)
    outputs = []
    for t in range(x.shape[1]):
        states = a[:, t].type(compute_dtype) * states.to(a.device)
        states = states + x[:, t].type(compute_dtype)
        outputs.append(states.type(x.dtype))
    return torch.stack(outputs, dim=1), states


def rglru_lrp(module: nn.Module, rules: GatedLinearRules, activations: Tensor, position_ids: Tensor) -> Tensor:
    """LRP form of ``RecurrentGemmaRglru.forward(activations, position_ids)``; (b, L, W) -> (b, L, W)."""
    batch, seq_len, width = activations.shape
    reset = position_ids[:, :, None] == 0
    reshaped = activations.reshape(batch * seq_len, module.num_attention_heads, module.block_width).permute(1, 0, 2)
    res = torch.baddbmm(module.input_gate_bias[:, None, :], reshaped, module.input_gate_weight)
    input_gate = torch.sigmoid(res.transpose(0, 1).reshape(batch, seq_len, width))
    res = torch.baddbmm(module.recurrent_gate_bias[:, None, :], reshaped, module.recurrent_gate_weight)
    recurrent_gate = torch.sigmoid(res.transpose(0, 1).reshape(batch, seq_len, width))
    log_a = -8.0 * recurrent_gate * F.softplus(module.recurrent_param)
    a = torch.exp(log_a)
    a_square = torch.exp(2 * log_a)
    multiplier = torch.sqrt(1 - a_square)  # HF's SqrtBoundDerivative only clips the gradient of a held value
    multiplier = reset + ~reset * multiplier
    # the gates (functions of the input and of their biases) are held constant: linear in the input
    input_gate, a, multiplier = (hold(t, rules.detach_ssm) for t in (input_gate, a, multiplier))
    gated = activations * input_gate
    normalized = gated * multiplier.type(activations.dtype)

    initial = module.recurrent_states
    if initial is not None and seq_len == 1 and bool(initial.any()):
        raise LRPError(
            "RecurrentGemmaRglru: the LRP form explains a whole sequence from an empty state; this call continues "
            "from a cached state. Run the full sequence in one forward (use_cache=False)."
        )
    last: list[Tensor] = []

    def region(compute_dtype: torch.dtype) -> Tensor:
        y, state = _linear_scan(normalized, a, reset, initial, compute_dtype)
        last.append(state)
        return y

    out = exact_region(region, normalized.dtype, torch.float32, rules)
    module.recurrent_states = last[0].detach()  # HF keeps the (float32) last state on the module
    return out


def rg_recurrent_block_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    input_states: Tensor,
    position_ids: Tensor,
    attention_mask: Tensor | None = None,
    use_cache: bool = True,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """LRP form of ``RecurrentGemmaRecurrentBlock.forward``; (b, L, H) -> ((b, L, H), None)."""
    _, seq_len, _ = input_states.shape
    batch = input_states.shape[0]
    y_branch = act(module.act_fn, module.linear_y(input_states), rules)
    x_branch = module.linear_x(input_states).transpose(1, 2)
    if use_cache:
        if module.conv1d_state is None or module.conv1d_state.shape[0] != batch:
            module.conv1d_state = torch.zeros(
                (batch, module.hidden_size, module.conv1d_width - 1), device=input_states.device,
                dtype=input_states.dtype,
            )
            module.rg_lru.recurrent_states = torch.zeros(
                (batch, module.lru_width), device=input_states.device, dtype=torch.float32
            )
        if position_ids.shape[1] != 1:  # prefill
            module.conv1d_state = F.pad(x_branch, (module.conv1d_width - x_branch.shape[-1] - 1, 0)).detach()
            x_branch = module.conv_1d(x_branch)[..., :seq_len]
        else:  # one step: linear in x_branch; a non-empty cached state is refused by the RG-LRU form
            if bool(module.conv1d_state.any()):
                raise continuation_refused("RecurrentGemmaRecurrentBlock")
            conv_state = torch.cat((module.conv1d_state, x_branch), -1)
            x_branch = torch.sum(conv_state * module.conv_1d.weight[:, 0, :], dim=-1) + module.conv_1d.bias
            x_branch = x_branch.unsqueeze(-1)
            module.conv1d_state = conv_state[:, :, 1:].detach()
    else:
        module.conv1d_state = None
        module.rg_lru.recurrent_states = None
        x_branch = module.conv_1d(x_branch)[..., :seq_len]
    x_branch = module.rg_lru(x_branch.transpose(1, 2), position_ids)
    hidden = x_branch * y_branch
    hidden = half_rule(hidden, rules)
    return module.linear_out(hidden), None


def rg_mlp_lrp(module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor) -> Tensor:
    """LRP form of ``RecurrentGemmaMlp.forward``: ``down(GELU(gate(h)) ⊙ up(h))``."""
    gate = act(module.act_fn, module.gate_proj(hidden_states), rules)
    hidden = gate * module.up_proj(hidden_states)
    hidden = half_rule(hidden, rules)
    return module.down_proj(hidden)


def rg_attention_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden_states: Tensor,
    position_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """LRP form of ``RecurrentGemmaAttention.forward``: HF's attention with queries and keys held constant."""
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import (
        apply_rotary_pos_emb,
        eager_attention_forward,
    )

    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    query, key, value = project_heads(module, hidden_states, "q_proj", "k_proj", "v_proj")
    cos, sin = module.rotary_emb(value, position_ids)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    out, weights = held_softmax_attention(
        module, rules, query, key, value, attention_mask, cache, kwargs, eager_attention_forward,
        sliding_window=module.sliding_window,
    )
    out = out.reshape(*input_shape, -1).contiguous()
    return module.o_proj(out), weights


def rg_causal_lm_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    input_ids: Tensor | None = None,
    position_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    labels: Tensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | Tensor = 0,
    cache: Any = None,
    **kwargs: Any,
) -> Any:
    """LRP form of ``RecurrentGemmaForCausalLM.forward``: identity rule on the logit soft cap."""
    from transformers.modeling_outputs import CausalLMOutput

    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # transformers < 5.2x slices inline, as here
        def slice_logits_to_keep(hidden: Tensor, keep: int | Tensor) -> Tensor:
            return hidden[:, slice(-keep, None) if isinstance(keep, int) else keep, :]

    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    return_dict = kwargs.pop("return_dict", None)
    outputs = module.model(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
        inputs_embeds=inputs_embeds, use_cache=use_cache, cache=cache, **kwargs,
    )
    hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    logits = module.lm_head(hidden)
    cap = module.config.logits_soft_cap
    if cap is not None:
        logits = act(lambda z: F.tanh(z / cap) * cap, logits, rules)
    loss = None
    if labels is not None:
        loss = module.loss_function(logits=logits, labels=labels, vocab_size=module.config.vocab_size, **kwargs)
    result = CausalLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                            attentions=outputs.attentions)
    return result.to_tuple() if return_dict is False else result


for _cls, _fwd, _note in [
    ("RecurrentGemmaRglru", rglru_lrp, "input gate, a_t and √(1−a²) held: linear in x; float32 scan made exact"),
    ("RecurrentGemmaRecurrentBlock", rg_recurrent_block_lrp, "identity rule on GELU, half rule on x ⊙ GELU(y)"),
    ("RecurrentGemmaMlp", rg_mlp_lrp, "identity rule on GELU, half rule on GELU(gate) ⊙ up"),
    ("RecurrentGemmaAttention", rg_attention_lrp, "softmax probabilities held (q, k detached): linear in V"),
    ("RecurrentGemmaRMSNorm", rg_rms_norm_lrp, "scale held (LN rule), float32 computation made exact"),
    ("RecurrentGemmaForCausalLM", rg_causal_lm_lrp, "identity rule on the logit soft cap"),
]:
    register_lrp_form(
        LRPForm(family="recurrent_gemma", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False
    )

"""LRP forms of HF transformers' RWKV (v4): ``RwkvSelfAttention`` and ``RwkvFeedForward``.

Rules (the LayerNorms are :mod:`.norms`' LN rule; residual adds and token shift are linear):

* token shift ``h·μ + shift(h)·(1−μ)``: linear, plain gradient;
* WKV: ``exp(k)``, the decays, ``time_first`` and the normaliser (denominator) all depend on
  ``k`` only; ``k`` is held constant (``rules.detach_ssm``), so WKV is linear in ``v``;
* receptance ``σ(r) ⊙ wkv`` and ``σ(r) ⊙ value`` (feed-forward): half rule on the product,
  identity rule on the sigmoid (value ``σ(r)``, relevance ``σ(r)·grad`` handed to ``r``);
* squared ReLU ``relu(k)²``: identity rule (relevance ``relu(k)²·grad`` handed to ``k``).

The WKV loop is transformers' CPU loop (``rwkv_linear_attention_cpu``), also on CUDA.
A state passed in (``use_cache``) must be fresh (HF's zero state): continuing a cached
sequence is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import act, continuation_refused, half_rule, hold

_HF = "transformers.models.rwkv.modeling_rwkv"


def _squared_relu(x: Tensor) -> Tensor:
    return torch.square(torch.relu(x))


def _check_fresh(module: nn.Module, state: list[Tensor] | None, slots: tuple[int, ...]) -> None:
    if state is None:
        return
    lid = module.layer_id
    if any(bool(state[i][:, :, lid].any()) for i in slots):
        raise continuation_refused(f"{type(module).__name__} layer {lid}")


def _mix(module: nn.Module, hidden: Tensor, state: list[Tensor] | None, slot: int) -> Tensor:
    """The shifted sequence (token shift), as in HF (the previous token from ``state`` at step 0)."""
    if hidden.size(1) == 1 and state is not None:
        return state[slot][:, :, module.layer_id]
    shifted = module.time_shift(hidden)
    if state is not None:
        shifted[:, 0] = state[slot][:, :, module.layer_id]
    return shifted


def wkv_lrp(
    time_decay: Tensor,
    time_first: Tensor,
    key: Tensor,
    value: Tensor,
    rules: GatedLinearRules,
    state: tuple[Tensor, Tensor, Tensor] | None = None,
    return_state: bool = False,
) -> tuple[Tensor, list[Tensor] | None]:
    """transformers' ``rwkv_linear_attention_cpu`` with ``key`` held constant (linear in ``value``).

    ``key``, ``value`` (b, L, C); ``time_decay``, ``time_first`` (C,). Returns ``(b, L, C)`` and the state.
    """
    key = hold(key, rules.detach_ssm)
    if state is None:
        num_state = torch.zeros_like(key[:, 0], dtype=torch.float32)
        den_state = torch.zeros_like(key[:, 0], dtype=torch.float32)
        max_state = torch.zeros_like(key[:, 0], dtype=torch.float32) - 1e38
    else:
        num_state, den_state, max_state = state
    time_decay = -torch.exp(time_decay)
    outputs = []
    for t in range(key.shape[1]):
        current_key = key[:, t].float()
        current_value = value[:, t]
        max_for_output = torch.maximum(max_state, current_key + time_first)
        e1 = torch.exp(max_state - max_for_output)
        e2 = torch.exp(current_key + time_first - max_for_output)
        numerator = e1 * num_state + e2 * current_value
        denominator = e1 * den_state + e2
        outputs.append((numerator / denominator).to(key.dtype))
        max_for_state = torch.maximum(max_state + time_decay, current_key)
        e1 = torch.exp(max_state + time_decay - max_for_state)
        e2 = torch.exp(current_key - max_for_state)
        num_state = e1 * num_state + e2 * current_value
        den_state = e1 * den_state + e2
        max_state = max_for_state
    out = torch.stack(outputs, dim=1) if outputs else torch.zeros_like(key)
    new_state = [num_state, den_state, max_state] if (return_state or state is not None) else None
    return out, new_state


def rwkv_attention_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    hidden: Tensor,
    state: list[Tensor] | None = None,
    use_cache: bool = False,
) -> tuple[Tensor, list[Tensor] | None]:
    """LRP form of ``RwkvSelfAttention.forward(hidden, state=None, use_cache=False)``; ``hidden`` (b, L, H)."""
    _check_fresh(module, state, (1, 2, 3))
    lid = module.layer_id
    shifted = _mix(module, hidden, state, 1)
    key = hidden * module.time_mix_key + shifted * (1 - module.time_mix_key)
    value = hidden * module.time_mix_value + shifted * (1 - module.time_mix_value)
    receptance = hidden * module.time_mix_receptance + shifted * (1 - module.time_mix_receptance)
    key = module.key(key)
    value = module.value(value)
    receptance = act(torch.sigmoid, module.receptance(receptance), rules)
    if state is not None:
        state[1][:, :, lid] = hidden[:, -1].detach()
    layer_state = tuple(s[:, :, lid] for s in state[2:]) if state is not None else None
    rwkv, layer_state = wkv_lrp(module.time_decay, module.time_first, key, value, rules, layer_state, use_cache)
    if layer_state is not None:
        for i, s in enumerate(layer_state):
            state[2 + i][:, :, lid] = s.detach()
    out = receptance * rwkv
    out = half_rule(out, rules)
    return module.output(out), state


def rwkv_feed_forward_lrp(
    module: nn.Module, rules: GatedLinearRules, hidden: Tensor, state: list[Tensor] | None = None
) -> tuple[Tensor, list[Tensor] | None]:
    """LRP form of ``RwkvFeedForward.forward(hidden, state=None)``; ``hidden`` (b, L, H)."""
    _check_fresh(module, state, (0,))
    shifted = _mix(module, hidden, state, 0)
    key = hidden * module.time_mix_key + shifted * (1 - module.time_mix_key)
    receptance = hidden * module.time_mix_receptance + shifted * (1 - module.time_mix_receptance)
    key = act(_squared_relu, module.key(key), rules)
    value = module.value(key)
    receptance = act(torch.sigmoid, module.receptance(receptance), rules)
    if state is not None:
        state[0][:, :, module.layer_id] = hidden[:, -1].detach()
    out = receptance * value
    out = half_rule(out, rules)
    return out, state


for _cls, _fwd, _note in [
    ("RwkvSelfAttention", rwkv_attention_lrp, "WKV linear in v (k held), half rule on σ(r)·wkv, identity rule on σ"),
    ("RwkvFeedForward", rwkv_feed_forward_lrp, "identity rule on relu² and σ, half rule on σ(r)·value"),
]:
    register_lrp_form(LRPForm(family="rwkv", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False)

"""Training-only speed-up of HF's pure-torch recurrences (Mamba, RWKV, Griffin) on CPU.

HF's CPU fallbacks loop over time and index ``x[:, t]`` / write ``out[:, t] = ...``. Autograd turns every such
index into a full-size zero tensor in the backward pass, so a backward costs O(L) full-tensor passes: 10 s per
64 x 40 batch for a tiny Mamba. The replacements below run the *same* per-step float operations in the same order,
but split the sequence with ``unbind`` and join it with ``stack`` (one backward each), so their outputs are
identical (tested). They are patched in only while :func:`fast_recurrences` is active (train.py); evaluation and
every recorded number use HF's own code.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..ops.hf_scans import mamba_selective_scan_unbound


def _rwkv_linear_attention(time_decay, time_first, key, value, state=None, return_state=False):
    """HF ``rwkv_linear_attention_cpu``. key, value: (b, L, H)."""
    if state is None:
        num_state = torch.zeros_like(key[:, 0], dtype=torch.float32)
        den_state = torch.zeros_like(key[:, 0], dtype=torch.float32)
        max_state = torch.zeros_like(key[:, 0], dtype=torch.float32) - 1e38
    else:
        num_state, den_state, max_state = state
    time_decay = -torch.exp(time_decay)
    outs = []
    for current_key, current_value in zip(key.float().unbind(1), value.unbind(1)):
        max_for_output = torch.maximum(max_state, current_key + time_first)
        e1 = torch.exp(max_state - max_for_output)
        e2 = torch.exp(current_key + time_first - max_for_output)
        outs.append(((e1 * num_state + e2 * current_value) / (e1 * den_state + e2)).to(key.dtype))
        max_for_state = torch.maximum(max_state + time_decay, current_key)
        e1 = torch.exp(max_state + time_decay - max_for_state)
        e2 = torch.exp(current_key - max_for_state)
        num_state = e1 * num_state + e2 * current_value
        den_state = e1 * den_state + e2
        max_state = max_for_state
    output = torch.stack(outs, dim=1)
    if return_state or state is not None:
        state = [num_state, den_state, max_state]
    return output, state


def _griffin_rnn_scan(self, hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype=torch.float32):
    """HF ``RecurrentGemmaRglru._rnn_scan`` (linear mode). hidden_states, recurrent_gate: (b, L, W)."""
    if hidden_states.shape[1] == 1:
        return _GRIFFIN_ORIGINAL(self, hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype)
    recurrent_gate = recurrent_gate * ~reset
    if recurrent_states is None:
        recurrent_states = torch.zeros(hidden_states[:, 0].shape, dtype=acc_dtype, device=hidden_states.device)
    outs = []
    for a, x in zip(recurrent_gate.unbind(1), hidden_states.unbind(1)):
        recurrent_states = a.type(acc_dtype) * recurrent_states.to(a.device) + x.type(acc_dtype)
        outs.append(recurrent_states.type(hidden_states.dtype))
    return torch.stack(outs, dim=1), recurrent_states


_GRIFFIN_ORIGINAL = None


@contextlib.contextmanager
def fast_recurrences() -> Iterator[None]:
    """Patch the three HF CPU recurrences with their unbind/stack twins; restored on exit."""
    global _GRIFFIN_ORIGINAL
    from transformers.models.mamba import modeling_mamba
    from transformers.models.recurrent_gemma import modeling_recurrent_gemma
    from transformers.models.rwkv import modeling_rwkv

    rglru = modeling_recurrent_gemma.RecurrentGemmaRglru
    saved = [(modeling_mamba, "mamba_selective_scan", modeling_mamba.mamba_selective_scan),
             (modeling_rwkv, "rwkv_linear_attention_cpu", modeling_rwkv.rwkv_linear_attention_cpu),
             (rglru, "_rnn_scan", rglru.__dict__["_rnn_scan"])]
    _GRIFFIN_ORIGINAL = rglru.__dict__["_rnn_scan"]
    try:
        modeling_mamba.mamba_selective_scan = mamba_selective_scan_unbound
        modeling_rwkv.rwkv_linear_attention_cpu = _rwkv_linear_attention
        rglru._rnn_scan = _griffin_rnn_scan
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)

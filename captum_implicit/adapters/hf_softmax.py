"""Adapters for the softmax attention layers of HF hybrids (Jamba, Zamba, Bamba, Qwen3-Next, ...).

During capture the layer's config is switched to ``attn_implementation="eager"`` (restored on
exit; the model's masks are then built for eager too), and the module-global
``eager_attention_forward`` is recorded: it returns the probabilities exactly as the layer
used them. Qwen3-Next / Qwen3.5 gate the attention output with ``σ(gate)``, ``gate`` being the
second half of ``q_proj``'s per-head output; it is recomputed from ``q_proj``'s recorded input.
LFM3 and Bailing-Hybrid gate each head with ``σ(g_proj(x))`` (one scalar per head and token,
Bailing takes the sigmoid in float32); it is recomputed from ``g_proj``'s recorded input the same way.

Float64 models: HF's eager attention adds ``finfo(float64).min`` to masked scores and takes the
softmax in float32, where that is ``−inf``; fully masked query rows (left padding) then become NaN
and the NaN spreads to every later layer, although the model's default SDPA path is finite. During
capture the float64 mask is therefore clamped to ``finfo(float32).min``: rows with any visible key
get bitwise the same probabilities (masked entries still underflow to exactly 0 in float32), fully
masked pad rows get the uniform row float32 models get instead of NaN.

Indexed sparse attention (issues 3 and 5). Both layers pass their sparse selection to eager attention as part of
the additive mask, so the recorded probabilities are already the sparse matrix the layer applies to V:

* GLM-5-Next ``Glm5NextTextAttention`` (DSA, MLA-style latents, NoPE: ``qk_rope_head_dim = 0``):
  ``q = q_b(RMSNorm(q_a(x)))``, ``[k_nope, v] = kv_b(RMSNorm(kv_a(x)))`` per head, ``k = [k_nope, k_rot]``
  (``k_rot`` empty); the indexer (its own ``wq_b``/``wk`` scoring of k-pools, ReLU, head weights, top-k pools
  expanded to tokens, plus the visible incomplete tail pool; a ``"shared"`` layer reuses the previous layer's
  indices) gives per query ``t`` a key set ``S_t`` (causal, non-pad). Per head
  ``P[t, s] = softmax_s(q_t·k_s/√d_qk + m_ts)``, ``m_ts = 0`` for ``s ∈ S_t`` else ``finfo.min``;
  ``A_c = P_{h(c)}``, values ``v`` (no gate, no sink). A query with an empty ``S_t`` (a pad row) has every key
  masked: uniform over all keys (see :mod:`~captum_implicit.layers.softmax` for its future part).
* Qwen4-Exp ``Qwen4ExpTextAttention`` (QSA): the causal mask restricted to the indexer's selected tokens (complete
  blocks of ``indexer_compress_ratio`` visible tokens scored by mean-pooled, normed, rotated keys against the
  indexer's queries, ``Σ_heads ReLU(q·k)``, the top ``budget / ratio`` blocks, plus the incomplete tail block);
  then Qwen3-Next's gated attention: ``A_c = diag(σ(gate_c)) · P_{h(c)}`` with ``P`` softmax over the selected
  keys (q/k RMS-normed, partial RoPE), values ``v_proj(x)`` repeated over the query heads of each kv head.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.capture import Recording
from ..core.errors import CaptureError
from ..core.registry import Adapter, register_adapter
from ..layers.softmax import SoftmaxAttention, build_softmax_attention
from ._common import argument
from ._gpu_runs import HF_VARIANTS, HYBRIDS_ON_CUDA, NO_GPU_TEST, ONLY_5_24, default_bounds

_TF = "transformers.models"


def _force_eager(module: nn.Module) -> Callable[[], None]:
    config = module.config
    old = config._attn_implementation_internal
    config._attn_implementation_internal = "eager"  # this config only (not its sub-configs)

    def undo() -> None:
        config._attn_implementation_internal = old

    return undo


def _float64_safe(eager: Callable) -> Callable:
    """``eager_attention_forward`` with a float64 additive mask clamped to the float32 range."""

    @functools.wraps(eager)
    def wrapper(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, *args, **kwargs):
        if isinstance(attention_mask, Tensor) and attention_mask.dtype == torch.float64:
            attention_mask = attention_mask.clamp(min=torch.finfo(torch.float32).min)
        return eager(module, query, key, value, attention_mask, *args, **kwargs)

    wrapper._float64_mask_fix = True  # type: ignore[attr-defined]  # (copied onto wrappers by functools.wraps)
    return wrapper


def _prepare(module: nn.Module) -> Callable[[], None]:
    """Force eager attention for this layer's config and make its float64 masks float32-safe."""
    undo_eager = _force_eager(module)
    modeling = sys.modules[type(module).__module__]
    current = getattr(modeling, "eager_attention_forward", None)
    if current is None or getattr(current, "_float64_mask_fix", False):
        return undo_eager  # another layer of this model file installed the fix already
    modeling.eager_attention_forward = _float64_safe(current)

    def undo() -> None:
        modeling.eager_attention_forward = current
        undo_eager()

    return undo


def _qwen_gate(module: nn.Module, rec: Recording) -> Tensor:
    """``σ(gate)`` of Qwen3-Next-style attention: ``q_proj(x)`` is ``[query, gate]`` per head."""
    recorded = rec.submodule_inputs.get("q_proj")
    if not recorded:
        raise CaptureError("expected a call of 'q_proj' during the attention forward")
    hidden = recorded[0][0]
    proj = module.q_proj
    states = F.linear(hidden, proj.weight, proj.bias)
    states = states.view(*hidden.shape[:-1], -1, module.head_dim * 2)
    gate = torch.chunk(states, 2, dim=-1)[1].reshape(*hidden.shape[:-1], -1)
    return torch.sigmoid(gate)


def _head_gate(float32_sigmoid: bool) -> Callable[[nn.Module, Recording], Tensor]:
    """``σ(g_proj(x))`` per (token, head), repeated over the head's value dims: ``(b, L, H·d)``."""

    def gate(module: nn.Module, rec: Recording) -> Tensor:
        recorded = rec.submodule_inputs.get("g_proj")
        if not recorded:
            raise CaptureError("expected a call of 'g_proj' during the attention forward")
        hidden = recorded[0][0]
        logits = F.linear(hidden, module.g_proj.weight, module.g_proj.bias)  # (b, L, H)
        # the same ops as the layer: Bailing casts to float32 for the sigmoid and back, LFM3 does not
        gate = torch.sigmoid(logits.float()).to(hidden.dtype) if float32_sigmoid else torch.sigmoid(logits)
        head_dim = getattr(module, "v_head_dim", None) or module.head_dim
        return gate.repeat_interleave(head_dim, dim=-1)

    return gate


def _builder(gate_fn: Callable[[nn.Module, Recording], Tensor] | None) -> Callable:
    def build(module: nn.Module, rec: Recording, name: str) -> SoftmaxAttention:
        call = rec.call("eager_attention_forward")
        _, probs = call.output
        if probs is None:
            raise CaptureError(f"layer {name!r}: eager attention returned no probabilities")
        try:
            return build_softmax_attention(
                name,
                probs=probs,
                value=argument(call, "value"),
                gate=gate_fn(module, rec) if gate_fn is not None else None,
                module_type=type(module).__name__,
            )
        except ValueError as e:
            raise CaptureError(str(e)) from e

    return build


# Every class below is covered by a CPU exactness test: tests/test_softmax.py (Jamba, Zamba, Bamba,
# GraniteMoeHybrid, MiniMax, LFM2, OLMo-Hybrid, Kimi-Linear, RecurrentGemma, Qwen3-Next) and
# tests/test_hf_variants.py (the others). Gates: None, "qwen" (σ of q_proj's second half), "head" (σ(g_proj)
# per head), "head_f32" (the same with the sigmoid in float32).
_GATES: dict[str | None, tuple[Callable[[nn.Module, Recording], Tensor] | None, tuple[str, ...], str]] = {
    None: (None, (), ""),
    "qwen": (_qwen_gate, ("q_proj",), "; σ(gate) row scale"),
    "head": (_head_gate(False), ("g_proj",), "; σ(g_proj) per-head row scale"),
    "head_f32": (_head_gate(True), ("g_proj",), "; σ(g_proj) per-head row scale (sigmoid in float32)"),
}

#: per model: what the GPU tests compared against (adapters/_gpu_runs.py); the others: no GPU test
_GPU = {
    **dict.fromkeys(
        ["zamba2", "falcon_h1", "nemotron_h", "lfm2_moe", "qwen3_5_moe", "qwen3_5"],
        f"eager attention on CUDA (the capture turns SDPA eager), {HF_VARIANTS}",
    ),
    **dict.fromkeys(
        ["glm5_next", "qwen4_exp"],
        "eager attention on CUDA (the capture turns SDPA eager), the linear layers through fla's kernels, "
        f"{ONLY_5_24}, {default_bounds('tests/test_sparse_attention.py::test_every_layer_on_cuda')}",
    ),
    **dict.fromkeys(
        ["lfm3", "lara_mini", "bailing_hybrid"],
        f"eager attention on CUDA (the capture turns SDPA eager), {ONLY_5_24}, {HF_VARIANTS}",
    ),
    **dict.fromkeys(
        ["jamba", "zamba", "bamba", "granitemoehybrid", "minimax", "lfm2", "olmo_hybrid", "kimi_linear",
         "recurrent_gemma", "qwen3_next"],
        f"eager attention on CUDA (the capture turns SDPA eager), {HYBRIDS_ON_CUDA}",
    ),
}

for _model, _cls, _out, _gate in [
    ("jamba", "JambaAttention", "o_proj", None),
    ("zamba", "ZambaAttention", "o_proj", None),
    ("zamba2", "Zamba2Attention", "o_proj", None),
    ("bamba", "BambaAttention", "o_proj", None),
    ("granitemoehybrid", "GraniteMoeHybridAttention", "o_proj", None),
    ("falcon_h1", "FalconH1Attention", "o_proj", None),
    ("nemotron_h", "NemotronHAttention", "o_proj", None),
    ("minimax", "MiniMaxAttention", "o_proj", None),
    ("lfm2", "Lfm2Attention", "out_proj", None),
    ("lfm2_moe", "Lfm2MoeAttention", "out_proj", None),
    ("lfm3", "Lfm3Attention", "o_proj", "head"),
    ("olmo_hybrid", "OlmoHybridAttention", "o_proj", None),
    ("kimi_linear", "KimiLinearAttention", "o_proj", None),
    ("recurrent_gemma", "RecurrentGemmaAttention", "o_proj", None),
    ("qwen3_next", "Qwen3NextAttention", "o_proj", "qwen"),
    ("qwen3_5", "Qwen3_5Attention", "o_proj", "qwen"),
    ("qwen3_5_moe", "Qwen3_5MoeAttention", "o_proj", "qwen"),
    ("lara_mini", "LaraMiniAttention", "o_proj", None),
    ("bailing_hybrid", "BailingHybridAttention", "o_proj", "head_f32"),
    # indexed sparse attention: the selection is in the mask eager attention gets (tests/test_sparse_attention.py)
    ("glm5_next", "Glm5NextTextAttention", "o_proj", None),
    ("qwen4_exp", "Qwen4ExpTextAttention", "o_proj", "qwen"),
]:
    _sparse_note = {
        "Glm5NextTextAttention": "; DSA: only the indexer's top-k pools (+ tail) unmasked",
        "Qwen4ExpTextAttention": "; QSA: only the indexer's top-k blocks (+ tail) unmasked",
    }.get(_cls, "")
    _gate_fn, _gate_inputs, _gate_note = _GATES[_gate]
    register_adapter(
        Adapter(
            family="softmax",
            padding="honoured (eager attention mask)",
            gpu=_GPU.get(_model, NO_GPU_TEST),
            classes=(f"{_TF}.{_model}.modeling_{_model}.{_cls}",),
            build=_builder(_gate_fn),
            functions=(f"{_TF}.{_model}.modeling_{_model}.eager_attention_forward",),
            submodule_inputs=_gate_inputs,
            output_module=_out,
            prepare=_prepare,
            notes="probabilities as eager attention gives them; values = V per head" + _gate_note + _sparse_note,
        ),
        first=False,
    )

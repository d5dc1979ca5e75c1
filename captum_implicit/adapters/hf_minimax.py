"""Adapter for HF MiniMax lightning attention (``MiniMaxLightningAttention``).

The layer calls no kernel function, so q, k, v are recomputed from the recorded input of
``qkv_proj`` with the layer's own weights and activation (the same ops, so bitwise the
tensors the layer used), then masked as the layer masks them; the RMSNorm's input gives the
frozen RMS and ``output_gate``'s input the gate.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..core.capture import Recording
from ..core.errors import CaptureError
from ..core.registry import Adapter, register_adapter
from ..layers.lightning import LightningAttention, build_lightning_attention
from ._gpu_runs import HYBRIDS_ON_CUDA


def _input(rec: Recording, sub: str, name: str):
    recorded = rec.submodule_inputs.get(sub)
    if not recorded:
        raise CaptureError(f"layer {name!r}: expected a call of {sub!r} during the layer's forward")
    return recorded[0][0]


def build_hf_lightning(module: nn.Module, rec: Recording, name: str) -> LightningAttention:
    cache = rec.kwargs.get("cache", rec.kwargs.get("past_key_values"))
    if cache is not None and getattr(cache, "linear_cache", None) and cache.linear_cache[module.layer_idx] != []:
        raise CaptureError(f"layer {name!r}: continued from a cached state; explain the full sequence without a cache")
    hidden = _input(rec, "qkv_proj", name)
    proj = module.qkv_proj
    qkv = module.act_fn(F.linear(hidden, proj.weight, proj.bias))
    mask = rec.kwargs.get("attention_mask", rec.args[2] if len(rec.args) > 2 else None)
    if mask is not None:
        if mask.dim() != 2:
            raise CaptureError(f"layer {name!r}: expected a 2-D padding mask, got shape {tuple(mask.shape)}")
        qkv = (qkv * mask[:, :, None]).to(qkv.dtype)
    gate = module.output_gate
    return build_lightning_attention(
        name,
        qkv=qkv,
        num_heads=module.num_attention_heads,
        slope=module.slope_rate.reshape(-1),
        attn_out=_input(rec, "norm", name),
        norm_weight=module.norm.weight,
        norm_eps=float(module.norm.variance_epsilon),
        gate_preact=F.linear(_input(rec, "output_gate", name), gate.weight, gate.bias),
        module_type=type(module).__name__,
    )


register_adapter(
    Adapter(
        family="lightning",
        padding="honoured (pad rows zeroed after the activation)",
        gpu=f"torch lightning attention on CUDA, {HYBRIDS_ON_CUDA}",
        classes=("transformers.models.minimax.modeling_minimax.MiniMaxLightningAttention",),
        build=build_hf_lightning,
        submodule_inputs=("qkv_proj", "norm", "output_gate"),
        output_module="out_proj",
        notes="values are v after SiLU and mask; RMSNorm (all heads) and σ(output_gate) as row scale",
    ),
    first=False,
)

"""Adapters for HF LFM2 gated short convolutions (``Lfm2ShortConv``, ``Lfm2MoeShortConv``, ``Lfm3ShortConv``).

``B, C, x`` are recomputed from the recorded input of ``in_proj`` with its own weights (the same
op, so bitwise what the layer used); the conv taps and bias are read from the recorded
``causal_conv1d_fn`` call (forced to the torch fallback on CPU).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..core.capture import Recording
from ..core.errors import CaptureError
from ..core.registry import Adapter, register_adapter
from ..layers.short_conv import ShortConvAttention
from ._common import positional
from ._gpu_runs import HF_VARIANTS, HYBRIDS_ON_CUDA, KERNELS_5_24, ONLY_5_24

_TF = "transformers.models"


def build_hf_short_conv(module: nn.Module, rec: Recording, name: str) -> ShortConvAttention:
    recorded = rec.submodule_inputs.get("in_proj")
    if not recorded:
        raise CaptureError(f"layer {name!r}: expected a call of 'in_proj' during the layer's forward")
    hidden = recorded[0][0]
    length = hidden.shape[1]
    calls = rec.calls_of("causal_conv1d_fn")
    if not calls:
        if rec.calls_of("causal_conv1d_update"):
            raise CaptureError(f"layer {name!r}: a cached decode step was run; explain the full sequence")
        rec.call("causal_conv1d_fn")
    conv_input, weight, bias = positional(calls[0], 3)
    if conv_input.shape[-1] != length:
        raise CaptureError(f"layer {name!r}: the conv continued from a cached state; use use_cache=False")
    if weight.dim() == 3:
        weight = weight[:, 0]
    bcx = F.linear(hidden, module.in_proj.weight, module.in_proj.bias).transpose(-1, -2)
    B, C, x = bcx.chunk(3, dim=-2)  # (b, C, L) each
    return ShortConvAttention(
        name=name,
        values=x[..., None],
        write=B,
        taps=weight,
        bias=bias,
        row_scale=C,
        module_type=type(module).__name__,
    )


for _model, _cls in [("lfm2", "Lfm2ShortConv"), ("lfm2_moe", "Lfm2MoeShortConv"), ("lfm3", "Lfm3ShortConv")]:
    _base = f"{_TF}.{_model}.modeling_{_model}"
    register_adapter(
        Adapter(
            family="short_conv",
            # CPU exactness: tests/test_short_conv.py (LFM2), tests/test_hf_variants.py (LFM2-MoE, LFM3)
            padding="honoured (mask on the mixer input)",
            gpu={
                "lfm2": f"{KERNELS_5_24} (causal-conv1d's conv), {HYBRIDS_ON_CUDA}",
                "lfm2_moe": f"torch conv (transformers 5.17) and causal-conv1d's conv (5.24) on CUDA, {HF_VARIANTS}",
                # causal-conv1d takes widths 2 to 4: at LFM3's default width 7 the model's own forward raises there
                "lfm3": f"causal-conv1d's conv ({ONLY_5_24}) at conv_L_cache = 4, {HF_VARIANTS}",
            }[_model],
            classes=(f"{_base}.{_cls}",),
            build=build_hf_short_conv,
            functions=(f"{_base}.causal_conv1d_fn", f"{_base}.causal_conv1d_update"),
            submodule_inputs=("in_proj",),
            output_module="out_proj",
            notes="banded A = diag(C)·T·diag(B) on x; conv bias gives the offset C ⊙ b",
        ),
        first=False,
    )

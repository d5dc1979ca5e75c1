"""Adapters for HF transformers (5.15+) module classes.

transformers calls its SSM kernels as module-level functions of each
``modeling_*`` file; we record those calls (forcing the pure-torch fallback on
CPU, where an importable CUDA package would otherwise crash) and build the
family's factored attention from exactly the tensors the model used.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.capture import FALLBACK_WRAPPERS, Recording
from ..core.errors import CaptureError
from ..core.registry import Adapter, register_adapter
from ..layers.mamba import MambaAttention, build_mamba_attention
from ._common import argument, positional
from ._gpu_runs import BOTH_CONVS, HYBRIDS_ON_CUDA, KERNELS_5_24
from ._scan_backward import linear_backward_scan

_TF = "transformers.models"


def build_hf_mamba(module: nn.Module, rec: Recording, name: str) -> MambaAttention:
    """Mamba-family mixers: one ``mamba_selective_scan`` call per B/C head (one for most models)."""
    scans = rec.calls_of("mamba_selective_scan")
    if not scans:
        if rec.calls_of("mamba_selective_state_update"):
            raise CaptureError(
                f"layer {name!r}: a single-token decode step with a cache was run; explain the full "
                "sequence in one forward with use_cache=False"
            )
        rec.call("mamba_selective_scan")  # raises the standard capture error
    parts = [positional(c, 5) for c in scans]
    u = torch.cat([p[0] for p in parts], dim=1)
    dt = torch.cat([p[1] for p in parts], dim=1)
    A = torch.cat([p[2] for p in parts], dim=0)
    B = torch.stack([p[3] for p in parts], dim=1)  # (b, H, N, L)
    C = torch.stack([p[4] for p in parts], dim=1)
    head_of = torch.cat(
        [torch.full((p[0].shape[1],), h, dtype=torch.long, device=u.device) for h, p in enumerate(parts)]
    )
    D = _cat_optional([argument(c, "D") for c in scans])
    z = _cat_optional([argument(c, "z") for c in scans], dim=1)
    delta_bias = _cat_optional([argument(c, "delta_bias") for c in scans])
    conv = rec.calls_of("causal_conv1d_fn")
    conv_input = conv_weight = conv_bias = None
    if conv:
        conv_input, conv_weight, conv_bias = positional(conv[0], 3)
        if conv_weight.dim() == 3:
            conv_weight = conv_weight[:, 0]
    return build_mamba_attention(
        name,
        u=u,
        dt=dt,
        A=A,
        B=B,
        C=C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=bool(argument(scans[0], "delta_softplus", default=False)),
        conv_input=conv_input,
        conv_weight=conv_weight,
        conv_bias=conv_bias,
        torch_scan_casts=all(c.torch_fallback for c in scans),
        module_type=type(module).__name__,
        head_of=head_of,
    )


def _cat_optional(items: list, dim: int = 0) -> torch.Tensor | None:
    if any(i is None for i in items):
        return None
    return torch.cat(items, dim=dim)


def _mamba_functions(model: str) -> tuple[str, ...]:
    base = f"{_TF}.{model}.modeling_{model}"
    return (f"{base}.mamba_selective_scan", f"{base}.causal_conv1d_fn", f"{base}.mamba_selective_state_update")


_HYBRIDS_ON_CUDA = f"{KERNELS_5_24}, {HYBRIDS_ON_CUDA}"
_GPU_KERNELS = (
    "mamba-ssm's CUDA selective scan (the test asserts it ran), float32 ≤ 1e-4 and bf16 ≤ 3e-2, L = 1 … 4096, "
    f"with padding, H200 (tests/test_gpu_mamba.py); {BOTH_CONVS}"
)

# HF Mamba's torch scan: same forward, O(L) instead of O(L²) backward (adapters/_scan_backward.py)
FALLBACK_WRAPPERS[f"{_TF}.mamba.modeling_mamba.mamba_selective_scan"] = linear_backward_scan

for _model, _cls, _gpu, _note in [
    ("mamba", "MambaMixer", _GPU_KERNELS, "MambaModel / MambaForCausalLM"),
    ("falcon_mamba", "FalconMambaMixer", f"{KERNELS_5_24} (mamba-ssm's CUDA selective scan), float32 ≤ 1e-4 and "
     "bf16 ≤ 2e-2, L = 80 with padding, H200 (tests/test_mamba.py::test_falcon_mamba_on_cuda)",
     "B/C/Δ RMS norms are part of the captured scan arguments"),
    ("jamba", "JambaMambaMixer", _HYBRIDS_ON_CUDA, "hybrid: its attention layers are a separate family"),
    ("zamba", "ZambaMambaMixer", _HYBRIDS_ON_CUDA, "multi-head: one scan per head, interleaved in_proj"),
]:
    register_adapter(
        Adapter(
            family="mamba",
            classes=(f"{_TF}.{_model}.modeling_{_model}.{_cls}",),
            build=build_hf_mamba,
            functions=_mamba_functions(_model),
            output_module="out_proj",
            padding="honoured (mask as a column scaling)",
            gpu=_gpu,
            notes=_note,
        ),
        first=False,
    )

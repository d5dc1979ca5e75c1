"""Adapters for mamba-ssm (2.x) modules.

mamba-ssm's fused ``mamba_inner_fn`` path cannot be observed, so the capture
temporarily switches the instance to its unfused path (``use_fast_path=False``),
which runs the same CUDA selective-scan and causal-conv kernels step by step.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..core.capture import Recording
from ..core.registry import Adapter, register_adapter
from ..layers.mamba import MambaAttention, build_mamba_attention
from ._common import argument, positional

_SIMPLE = "mamba_ssm.modules.mamba_simple"


def _unfused(module: nn.Module) -> Callable[[], None]:
    old = module.use_fast_path
    module.use_fast_path = False

    def undo() -> None:
        module.use_fast_path = old

    return undo


def build_mamba_ssm(module: nn.Module, rec: Recording, name: str) -> MambaAttention:
    scan = rec.call("selective_scan_fn")
    u, dt, A, B, C = positional(scan, 5)
    conv = rec.calls_of("causal_conv1d_fn")
    if conv:
        conv_input = argument(conv[0], "x")
        if conv_input is None:
            conv_input = positional(conv[0], 1)[0]
    elif "conv1d" in rec.submodule_inputs:
        conv_input = rec.submodule_inputs["conv1d"][0][0]
    else:
        conv_input = None
    weight = module.conv1d.weight[:, 0]
    return build_mamba_attention(
        name,
        u=u,
        dt=dt,
        A=A,
        B=B,
        C=C,
        D=argument(scan, "D"),
        z=argument(scan, "z"),
        delta_bias=argument(scan, "delta_bias"),
        delta_softplus=bool(argument(scan, "delta_softplus", default=False)),
        conv_input=conv_input,
        conv_weight=weight,
        conv_bias=module.conv1d.bias,
        torch_scan_casts=False,
        module_type=type(module).__name__,
    )


register_adapter(
    Adapter(
        family="mamba",
        classes=(f"{_SIMPLE}.Mamba",),
        build=build_mamba_ssm,
        functions=(f"{_SIMPLE}.selective_scan_fn", f"{_SIMPLE}.causal_conv1d_fn"),
        submodule_inputs=("conv1d",),
        output_module="out_proj",
        prepare=_unfused,
        cpu="— (mamba-ssm needs CUDA)",
        padding="no mask in mamba-ssm",
        gpu="CUDA selective scan + causal-conv1d, fp32/bf16, L ≤ 4096 (fused path switched off during capture)",
        notes="fused fast path switched off during capture (same CUDA kernels, unfused)",
    ),
    first=False,
)

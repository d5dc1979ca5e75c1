"""Adapters for mamba-ssm (2.x) modules.

mamba-ssm's fused paths (``mamba_inner_fn`` for ``Mamba``, ``mamba_split_conv1d_scan_combined``
for ``Mamba2``) cannot be observed, so the capture temporarily switches the instance to
its unfused path (``use_fast_path=False`` / ``use_mem_eff_path=False``), which runs the
same CUDA / Triton kernels step by step.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..core.attention import compute_dtype
from ..core.capture import Recording
from ..core.errors import CaptureError
from ..core.registry import Adapter, register_adapter
from ..layers.mamba import MambaAttention, build_mamba_attention
from ..layers.mamba2 import Mamba2Attention, build_mamba2_attention, gated_norm_scale
from ._common import argument, positional

_SIMPLE = "mamba_ssm.modules.mamba_simple"
_MAMBA2 = "mamba_ssm.modules.mamba2"


def _switched_off(flag: str) -> Callable[[nn.Module], Callable[[], None]]:
    """A ``prepare`` that sets ``module.<flag> = False`` for the capture (a fused path that cannot be
    observed) and returns the undo."""

    def prepare(module: nn.Module) -> Callable[[], None]:
        old = getattr(module, flag)
        setattr(module, flag, False)
        return lambda: setattr(module, flag, old)

    return prepare


def _conv_input(rec: Recording):
    """The pre-conv input: ``causal_conv1d_fn``'s ``x`` when causal-conv1d is installed, else ``conv1d``'s input."""
    conv = rec.calls_of("causal_conv1d_fn")
    if conv:
        x = argument(conv[0], "x")
        return positional(conv[0], 1)[0] if x is None else x
    if "conv1d" in rec.submodule_inputs:
        return rec.submodule_inputs["conv1d"][0][0]
    return None


def build_mamba_ssm(module: nn.Module, rec: Recording, name: str) -> MambaAttention:
    scan = rec.call("selective_scan_fn")
    u, dt, A, B, C = positional(scan, 5)
    conv_input = _conv_input(rec)
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
        prepare=_switched_off("use_fast_path"),
        cpu="— (mamba-ssm needs CUDA)",
        padding="no mask in mamba-ssm",
        gpu="CUDA selective scan + causal-conv1d, fp32/bf16, L ≤ 4096 (fused path switched off during capture)",
        notes="fused fast path switched off during capture (same CUDA kernels, unfused)",
    ),
    first=False,
)


def build_mamba_ssm2(module: nn.Module, rec: Recording, name: str) -> Mamba2Attention:
    """``Mamba2`` on its unfused path: ``causal_conv1d_fn`` (or ``conv1d``), ``mamba_chunk_scan_combined``,
    then ``norm(y, z)`` (``rmsnorm=True``) or the gate inside the scan (``z=``, ``rmsnorm=False``)."""
    scan = rec.call("mamba_chunk_scan_combined")
    if argument(scan, "seq_idx") is not None or argument(scan, "cu_seqlens") is not None:
        raise CaptureError(f"layer {name!r}: packed sequences (seq_idx / cu_seqlens) are not supported")
    x, dt, A, B, C = positional(scan, 5)
    d_mlp = module.in_proj.out_features - 2 * module.d_ssm - 2 * module.ngroups * module.d_state - module.nheads
    if d_mlp > 0:
        raise CaptureError(
            f"layer {name!r}: d_ssm < d_inner (a gated-MLP part next to the SSM in out_proj's input) is not supported"
        )
    dtype = compute_dtype(x, dt, B, C)
    conv_input = _conv_input(rec)
    batch, length = x.shape[:2]
    if module.rmsnorm:
        y, z = rec.submodule_inputs["norm"][0][:2]
        norm = module.norm
        row_scale = gated_norm_scale(
            y, z, norm.weight, norm.eps, norm.group_size or y.shape[-1], bool(norm.norm_before_gate), True, dtype
        )
    else:
        z = argument(scan, "z")
        z = z.reshape(batch, length, -1) if z is not None else None
        row_scale = gated_norm_scale(None, z, None, 0.0, 1, False, normalize=False, dtype=dtype)
    return build_mamba2_attention(
        name,
        x=x,
        dt=dt,
        A=A,
        B=B,
        C=C,
        D=argument(scan, "D"),
        dt_bias=argument(scan, "dt_bias"),
        dt_softplus=bool(argument(scan, "dt_softplus", default=False)),
        dt_limit=tuple(argument(scan, "dt_limit", default=(0.0, float("inf")))),
        conv_input=conv_input,
        conv_weight=module.conv1d.weight[:, 0],
        conv_bias=module.conv1d.bias,
        row_scale=row_scale,
        torch_scan_casts=False,
        initial_states=argument(scan, "initial_states"),
        module_type=type(module).__name__,
    )


register_adapter(
    Adapter(
        family="mamba2",
        classes=(f"{_MAMBA2}.Mamba2",),
        build=build_mamba_ssm2,
        functions=(f"{_MAMBA2}.mamba_chunk_scan_combined", f"{_MAMBA2}.causal_conv1d_fn"),
        submodule_inputs=("conv1d", "norm"),
        output_module="out_proj",
        prepare=_switched_off("use_mem_eff_path"),
        cpu="— (mamba-ssm needs CUDA)",
        padding="no mask in mamba-ssm",
        gpu="Triton chunk scan + causal-conv1d, fp32/bf16, L ≤ 4096 (mem-eff path switched off during capture)",
        notes="fused mem-eff path switched off during capture (same Triton kernels, unfused)",
    ),
    first=False,
)

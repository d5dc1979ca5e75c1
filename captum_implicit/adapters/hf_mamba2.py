"""Adapters for HF transformers (5.15+) Mamba2-family mixers.

``Mamba2Mixer`` and the hybrids that copy it (Bamba, Zamba2, GraniteMoeHybrid, NemotronH,
FalconH1) call two module-level functions of their ``modeling_*`` file during a full
(non-decode) forward: ``causal_conv1d_fn(xBC, weight, bias, activation=...)`` and
``mamba2_chunk_scan(x, dt, A, B, C, chunk_size, D=, dt_bias=, dt_softplus=True,
dt_limit=, initial_states=)``. We record both (on CPU the pure-torch fallbacks run) and
the inputs of ``norm`` (the scan output and the gate ``z``, as the gated RMS norm got
them). FalconH1 without its RMS norm gates with ``SiLU(z)`` directly; its ``z`` is
recomputed from the recorded ``in_proj`` input (``in_proj(h) · mup_vector``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.capture import Recording
from ..core.errors import CaptureError
from ..core.registry import Adapter, register_adapter
from ..core.attention import compute_dtype
from ..layers.mamba2 import Mamba2Attention, build_mamba2_attention, gated_norm_scale
from ._common import argument, positional
from ._gpu_runs import BOTH_CONVS, HF_VARIANTS, HYBRIDS_ON_CUDA, KERNELS_5_24

_TF = "transformers.models"


def _scan_call(rec: Recording, name: str, scan_fn: str, decode_fn: str):
    scans = rec.calls_of(scan_fn)
    if not scans:
        if rec.calls_of(decode_fn):
            raise CaptureError(
                f"layer {name!r}: a single-token decode step with a cache was run; explain the full "
                "sequence in one forward with use_cache=False"
            )
        rec.call(scan_fn)  # raises the standard capture error
    if len(scans) > 1:
        raise CaptureError(f"layer {name!r}: expected one call of {scan_fn!r}, recorded {len(scans)}")
    scan = scans[0]
    if argument(scan, "seq_idx") is not None or argument(scan, "cu_seqlens") is not None:
        raise CaptureError(f"layer {name!r}: packed sequences (seq_idx / cu_seqlens) are not supported")
    return scan


def _norm_row_scale(norm: nn.Module, norm_args: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Row scale of the HF gated RMS norms (``*RMSNormGated``, ``FalconH1RMSNormGated``)."""
    y, gate = norm_args[0], norm_args[1] if len(norm_args) > 1 else None
    width = y.shape[-1]
    group_size = getattr(norm, "group_size", None) or width // getattr(norm, "n_groups", 1)
    return gated_norm_scale(
        y,
        gate,
        norm.weight,
        eps=norm.variance_epsilon,
        group_size=group_size,
        norm_before_gate=bool(getattr(norm, "norm_before_gate", False)),
        normalize=True,
        dtype=dtype,
    )


def _recomputed_gate(module: nn.Module, rec: Recording, name: str) -> torch.Tensor:
    """``z`` of a mixer whose norm was not called (FalconH1 with ``mamba_rms_norm=False``)."""
    inputs = rec.submodule_inputs.get("in_proj")
    if not inputs:
        raise CaptureError(f"layer {name!r}: could not observe in_proj's input to recover the gate")
    with torch.no_grad():
        projected = module.in_proj(inputs[0][0])
        mup = getattr(module, "mup_vector", None)
        if mup is not None:
            projected = projected * mup
    return projected[..., : module.intermediate_size]


def build_hf_mamba2(module: nn.Module, rec: Recording, name: str) -> Mamba2Attention:
    """Mamba2-family mixers: one ``mamba2_chunk_scan`` call, one ``causal_conv1d_fn`` call, a gated norm."""
    scan = _scan_call(rec, name, "mamba2_chunk_scan", "mamba2_selective_state_update")
    x, dt, A, B, C = positional(scan, 5)
    dtype = compute_dtype(x, dt, B, C)
    conv = rec.calls_of("causal_conv1d_fn")
    conv_input = conv_weight = conv_bias = None
    if conv:
        conv_input, conv_weight, conv_bias = positional(conv[0], 3)
        if conv_weight.dim() == 3:
            conv_weight = conv_weight[:, 0]
    norm_calls = rec.submodule_inputs.get("norm")
    if norm_calls:
        row_scale = _norm_row_scale(module.norm, norm_calls[0], dtype)
    else:  # FalconH1 without RMS norm: `scan_output * silu(gate)`
        gate = _recomputed_gate(module, rec, name)
        row_scale = gated_norm_scale(None, gate, None, 0.0, 1, False, normalize=False, dtype=dtype)
    z = argument(scan, "z")
    if z is not None:  # no HF mixer passes a gate into the scan today; refuse rather than guess
        raise CaptureError(f"layer {name!r}: a gate passed into mamba2_chunk_scan is not supported")
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
        conv_weight=conv_weight,
        conv_bias=conv_bias,
        row_scale=row_scale,
        torch_scan_casts=scan.torch_fallback,
        initial_states=argument(scan, "initial_states"),
        module_type=type(module).__name__,
    )


def _mamba2_functions(model: str) -> tuple[str, ...]:
    base = f"{_TF}.{model}.modeling_{model}"
    return (
        f"{base}.mamba2_chunk_scan",
        f"{base}.causal_conv1d_fn",
        f"{base}.mamba2_selective_state_update",
    )


for _model, _cls, _note in [
    ("mamba2", "Mamba2Mixer", "Mamba2Model / Mamba2ForCausalLM"),
    ("bamba", "BambaMixer", "hybrid: Mamba2 layers"),
    ("zamba2", "Zamba2MambaMixer", "hybrid; dt clamped at time_step_min"),
    ("granitemoehybrid", "GraniteMoeHybridMambaLayer", "hybrid MoE; residual_multiplier is outside the mixer"),
    ("nemotron_h", "NemotronHMamba2Mixer", "hybrid; dt clamped at time_step_min; conv activation mamba_hidden_act"),
    ("falcon_h1", "FalconH1Mixer", "ssm_in_multiplier and mup_vector are inside the captured tensors; optional norm"),
]:
    _gpu = {
        "mamba2": f"the path transformers takes on CUDA with mamba-ssm installed, {BOTH_CONVS}, "
        "float32 ≤ 1e-4 and bf16 ≤ 2e-2, L = 7 and 4096, with padding, H200 (tests/test_mamba2.py)",
        **dict.fromkeys(["bamba", "granitemoehybrid"], f"{KERNELS_5_24}, {HYBRIDS_ON_CUDA}"),
    }.get(_model, f"the path transformers takes on CUDA with mamba-ssm installed, {BOTH_CONVS}, {HF_VARIANTS}")
    register_adapter(
        Adapter(
            family="mamba2",
            padding="honoured (mask as a column scaling)",
            gpu=_gpu,
            classes=(f"{_TF}.{_model}.modeling_{_model}.{_cls}",),
            build=build_hf_mamba2,
            functions=_mamba2_functions(_model),
            submodule_inputs=("norm", "in_proj"),
            output_module="out_proj",
            notes=_note,
        ),
        first=False,
    )

"""Adapters for mamba-ssm (2.x) modules.

mamba-ssm's fused paths (``mamba_inner_fn`` for ``Mamba``, ``mamba_split_conv1d_scan_combined``
for ``Mamba2``) cannot be observed, so the capture temporarily switches the instance to
its unfused path (``use_fast_path=False`` / ``use_mem_eff_path=False``), which runs the
same CUDA / Triton kernels step by step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.attention import compute_dtype
from ..core.capture import Recording
from ..core.errors import CaptureError
from ..core.registry import Adapter, register_adapter
from ..layers.mamba import MambaAttention, build_mamba_attention
from ..layers.mamba2 import Mamba2Attention, build_mamba2_attention, gated_norm_scale
from ..layers.mha import LocalChannelsSoftmaxAttention
from ..layers.softmax import SoftmaxAttention, build_softmax_attention
from ._common import argument, positional
from ._gpu_runs import BOTH_CONVS

_SIMPLE = "mamba_ssm.modules.mamba_simple"
_MAMBA2 = "mamba_ssm.modules.mamba2"
_MHA = "mamba_ssm.modules.mha"
_SDPA = "torch.nn.functional.scaled_dot_product_attention"


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
        padding="no mask in mamba-ssm; padding before a query is refused",
        masks_padding=False,
        gpu="CUDA selective scan, float32 ≤ 1e-4 and bf16 ≤ 3e-2, L = 1 … 4096 and a MambaLMHeadModel, H200 "
        f"(tests/test_gpu_mamba.py; fused path switched off during capture); {BOTH_CONVS}",
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
        padding="no mask in mamba-ssm; padding before a query is refused",
        masks_padding=False,
        gpu="Triton chunk scan, float32 ≤ 1e-4 and bf16 ≤ 2e-2, L = 1, 301, 4096, gated RMSNorm on and off, H200 "
        f"(tests/test_mamba2.py; mem-eff path switched off during capture); {BOTH_CONVS}",
        notes="fused mem-eff path switched off during capture (same Triton kernels, unfused)",
    ),
    first=False,
)


# ----------------------------------------------------------------------------- MHA (attention layers of hybrids)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_arguments(rec: Recording, name: str) -> dict:
    """The arguments of the layer's one ``F.scaled_dot_product_attention`` call, by parameter name (the builtin
    has no signature, so the recorder keeps ``args`` and keywords)."""
    calls = rec.calls_of("scaled_dot_product_attention")
    if len(calls) != 1:
        raise CaptureError(
            f"layer {name!r}: expected one F.scaled_dot_product_attention call, recorded {len(calls)} (a call "
            "continuing from a kv cache runs flash_attn_with_kvcache: explain the full sequence with "
            "inference_params=None)"
        )
    arguments = dict(calls[0].arguments)
    values = dict(zip(_SDPA_PARAMS, arguments.pop("args", ())))
    values.update(arguments)
    return values


def sdpa_probabilities(query: Tensor, key: Tensor, is_causal: bool, scale: float | None) -> Tensor:
    """The probabilities ``F.scaled_dot_product_attention`` applies to V (no mask, no dropout), recomputed.

    ``softmax(q kᵀ · scale)`` with ``scale = 1/√d`` by default and, with ``is_causal``, keys after the query
    masked (SDPA's top-left aligned causal mask). Computed in float64 for float64 inputs, else float32 (the
    kernels' softmax arithmetic). ``query`` (b, H, Lq, d), ``key`` (b, H, Lk, d) -> (b, H, Lq, Lk).
    """
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query.detach().to(dtype) @ key.detach().to(dtype).transpose(-1, -2)) * scale
    if is_causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1)


def build_mamba_ssm_mha(module: nn.Module, rec: Recording, name: str) -> SoftmaxAttention:
    """``mha.MHA``: the probabilities SDPA applied to V (recomputed from the q / k it got: after the qkv conv,
    rotary, GQA repeat), values V per query head; with ``mlp_dim > 0`` the gated-MLP half of the out_proj input
    as token-local channels (:class:`~captum_implicit.layers.mha.LocalChannelsSoftmaxAttention`)."""
    args = _sdpa_arguments(rec, name)
    if args.get("attn_mask") is not None or float(args.get("dropout_p") or 0.0) != 0.0 or args.get("enable_gqa"):
        raise CaptureError(f"layer {name!r}: SDPA with a mask, dropout or enable_gqa is not mamba-ssm's MHA call")
    query, key, value = args["query"], args["key"], args["value"]
    if query.shape[-2] != key.shape[-2]:
        raise CaptureError(
            f"layer {name!r}: queries ({query.shape[-2]}) and keys ({key.shape[-2]}) differ in length — the layer "
            "attended to a kv cache; explain the full sequence with inference_params=None"
        )
    probs = sdpa_probabilities(query, key, bool(args.get("is_causal", False)), args.get("scale"))
    attention = build_softmax_attention(name, probs=probs, value=value.detach(), module_type=type(module).__name__)
    if module.mlp_dim == 0:
        return attention
    recorded = rec.submodule_inputs.get("in_proj")
    if not recorded:
        raise CaptureError(f"layer {name!r}: expected a call of 'in_proj' during the attention forward")
    x = recorded[0][0].detach()
    x_mlp = F.linear(x, module.in_proj.weight, module.in_proj.bias)[..., -module.mlp_dim:]
    up, gate = x_mlp.chunk(2, dim=-1)
    x_mlp = up * F.silu(gate)  # the module's ops, in its dtype: bit for bit its out_proj input's last channels
    local = x_mlp.to(attention.dtype).detach().transpose(1, 2)[..., None]  # (b, M, L, 1)
    values = torch.cat([attention.values, local], dim=1)
    return LocalChannelsSoftmaxAttention(name, values, probs, attention.num_channels, type(module).__name__)


register_adapter(
    Adapter(
        family="softmax",
        classes=(f"{_MHA}.MHA",),
        build=build_mamba_ssm_mha,
        functions=(_SDPA,),
        submodule_inputs=("in_proj",),
        output_module="out_proj",
        cpu="yes (stand-in running mha.py's forward; mamba-ssm cannot be imported on CPU)",
        padding="no mask in mamba-ssm; padding before a query is refused",
        masks_padding=False,
        gpu="F.scaled_dot_product_attention (flash / mem-efficient), float32 ≤ 1e-4; GQA, d_conv and mlp_dim "
        "configs, H200 (tests/test_mamba_ssm_mha.py); rotary needs flash_attn: untested",
        notes="probabilities recomputed from the q / k SDPA got (after conv, rotary, GQA repeat); values = V per "
        "head; mlp_dim: the gated-MLP half as token-local channels (A = I, values up ⊙ SiLU(gate)); "
        "non-causal rows' future part in offset; kv-cache continuations refused",
    ),
    first=False,
)

"""Adapters for flash-linear-attention's layers (``fla.layers``): GLA, HGRN2, RetNet, RWKV-6, DeltaNet, GDN.

fla is optional and never imported by this module at import time: classes are registered by
qualified name, fla's functions are looked up when a capture starts.

Every layer calls its kernel (``chunk_gla``, ``fused_recurrent_gla``, ``chunk_retention``,
``chunk_delta_rule``, ``chunk_gated_delta_rule`` ...) as a global of its ``fla.layers.*`` module; the
capture records that call (``functions``) together with the output norm's function call
(``rms_norm``, ``rms_norm_gated``, HGRN2's fused ``rms_norm_linear``), so the closed forms of
:mod:`~captum_implicit.layers.gla` and :mod:`~captum_implicit.layers.gated_deltanet` are built from
exactly the tensors the model used.

On CPU every one of those functions is Triton ("0 active drivers"), and so are fla's rotary
embedding, swish and short convolution. While a capture runs on CPU tensors, the functions listed in
:data:`CPU_ROUTES` go to their torch versions in :mod:`captum_implicit.ops.fla_torch`: the kernels to
fla's own naive references (``fla.ops.*.naive``, which compute in float32), the norms/rotary/swish to
torch equivalents of the Triton math. On CUDA tensors nothing is routed: fla's Triton kernels run and are recorded.
Everything is restored when the capture ends. Configurations that run on CPU:
``use_short_conv=False`` (``ShortConvolution`` is not routed), ``attention_mask=None`` (fla unpads a
padded batch into a variable-length one, which the naive references do not take; RWKV-6 does not
unpad and takes a mask). The block-level pieces of fla's own models are routed too (fused add-norms,
``GatedMLP``'s ``swiglu``, RWKV-6's channel-mix token shift), so ``*ForCausalLM`` models with
``fuse_swiglu=False`` run under a CPU capture.

Unfused output gates (``o = norm(o) · gate_fn(g)``) are read from the gate itself: a plain-function
``gate_fn`` is wrapped per instance during the capture (:func:`record_gate`), a module one recorded
through ``submodule_inputs``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.capture import Call, Recording
from ..core.errors import CaptureError
from ..core.registry import Adapter, register_adapter
from ..layers.gated_deltanet import DeltaRuleAttention, build_delta_rule_attention
from ..layers.gla import GLAAttention, build_gla_attention, retention_log_decay
from ..ops.fla_torch import (
    activate, gdn_kernel_inputs, group_norm_parts, refuse_varlen_or_state, rms_factor, swish, torch_delta_rule,
    torch_gated_delta_rule, torch_gla, torch_group_norm, torch_layer_norm, torch_retention, torch_rms_norm,
    torch_rms_norm_gated, torch_rms_norm_linear, torch_rotary, torch_rwkv6, torch_swiglu, torch_token_shift,
)
from ._common import argument, positional

_GLA_KERNELS = ("chunk_gla", "fused_chunk_gla", "fused_recurrent_gla")
_RET_KERNELS = ("chunk_retention", "fused_chunk_retention", "parallel_retention", "fused_recurrent_retention")
_DN_KERNELS = ("chunk_delta_rule", "fused_recurrent_delta_rule")
_GDN_KERNELS = ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule")
_RMS = "fla.modules.norm.layernorm.rms_norm"  # fla.modules.RMSNorm.forward
_RMS_GATED = "fla.modules.norm.fused_norm_gate.rms_norm_gated"  # fla.modules.FusedRMSNormGated.forward
_ROTARY = "fla.modules.rotary.ops.rotary_embedding"  # fla.modules.rotary.RotaryEmbedding.forward
_GROUP_NORM = "fla.modules.norm.layernorm.group_norm"  # fla.modules.GroupNorm.forward (RWKV-6)
_RWKV6_KERNELS = ("chunk_rwkv6", "fused_recurrent_rwkv6")


#: fla globals routed to torch while a capture runs on CPU tensors (qualified name -> torch version).
CPU_ROUTES: dict[str, Callable] = {
    **{f"fla.layers.gla.{k}": torch_gla for k in _GLA_KERNELS},
    **{f"fla.layers.hgrn2.{k}": torch_gla for k in _GLA_KERNELS},
    "fla.layers.hgrn2.swish": swish,
    "fla.layers.hgrn2.rms_norm_linear": torch_rms_norm_linear,
    **{f"fla.layers.multiscale_retention.{k}": torch_retention for k in _RET_KERNELS},
    **{f"fla.layers.delta_net.{k}": torch_delta_rule for k in _DN_KERNELS},
    **{f"fla.layers.gated_deltanet.{k}": torch_gated_delta_rule for k in _GDN_KERNELS},
    **{f"fla.layers.rwkv6.{k}": torch_rwkv6 for k in _RWKV6_KERNELS},
    "fla.layers.rwkv6.token_shift": torch_token_shift,
    _GROUP_NORM: torch_group_norm,
    # outside the layers, so that fla's own models (blocks: add-norms, GatedMLP, RWKV-6 channel mix) run on CPU
    "fla.modules.norm.layernorm.layer_norm": torch_layer_norm,
    "fla.modules.mlp.swiglu": torch_swiglu,
    "fla.models.rwkv6.modeling_rwkv6.token_shift": torch_token_shift,
    _RMS: torch_rms_norm,
    _RMS_GATED: torch_rms_norm_gated,
    _ROTARY: torch_rotary,
}


def _first_tensor_on_cpu(args: tuple, kwargs: dict) -> bool:
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            return a.device.type == "cpu"
    return False


def _route(original: Callable, torch_version: Callable) -> Callable:
    @functools.wraps(original)  # the capture binds recorded arguments to the original's signature
    def routed(*args: Any, **kwargs: Any) -> Any:
        fn = torch_version if _first_tensor_on_cpu(args, kwargs) else original
        return fn(*args, **kwargs)

    routed._captum_implicit_route = True  # type: ignore[attr-defined]
    return routed


def route_to_torch_on_cpu(model: nn.Module) -> Callable[[], None]:
    """Install :data:`CPU_ROUTES` (on CPU tensors only); returns the undo. Idempotent per capture."""
    undo: list[Callable[[], None]] = []
    for qualified, torch_version in CPU_ROUTES.items():
        mod_name, _, fn_name = qualified.rpartition(".")
        try:
            module = importlib.import_module(mod_name)
        except Exception:
            continue
        original = getattr(module, fn_name, None)
        if original is None or getattr(original, "_captum_implicit_route", False):
            continue
        setattr(module, fn_name, _route(original, torch_version))
        undo.append(functools.partial(setattr, module, fn_name, original))

    def restore() -> None:
        for fn in reversed(undo):
            fn()

    return restore


def record_gate(module: nn.Module) -> Callable[[], None]:
    """Wrap an unfused output gate ``gate_fn`` (a plain function) so that the capture can read its output.

    GLA / RWKV-6 (fla's ``ACT2FN``, whose ``swish`` is Triton: ``F.silu`` on a CPU module) keep it as
    a plain attribute; the wrapper keeps the outputs in ``.outputs``. A gate that is an ``nn.Module``
    (RetNet's transformers activation) is a submodule and is recorded through ``submodule_inputs``.
    """
    fn = module.__dict__.get("gate_fn")
    if fn is None or isinstance(fn, nn.Module) or not callable(fn):
        return lambda: None
    swish = importlib.import_module("fla.modules.activations").ACT2FN.get("swish")
    on_cpu = any(p.device.type == "cpu" for p in module.parameters())
    impl = F.silu if (on_cpu and fn is swish) else fn

    def gate_fn(x: Tensor) -> Tensor:
        out = impl(x)
        gate_fn.outputs.append(out)  # type: ignore[attr-defined]
        return out

    gate_fn.outputs = []  # type: ignore[attr-defined]
    gate_fn.captum_implicit_gate = True  # type: ignore[attr-defined]
    module.gate_fn = gate_fn

    def undo() -> None:
        module.gate_fn = fn

    return undo


def _gate_value(module: nn.Module, rec: Recording) -> Tensor:
    """The unfused output gate ``gate_fn(g)`` of this forward, ``(b, L, C)``."""
    fn = module.__dict__.get("gate_fn")
    if getattr(fn, "captum_implicit_gate", False) and fn.outputs:
        return fn.outputs[-1]
    recorded = rec.submodule_inputs.get("gate_fn")
    if recorded:
        return module.gate_fn(recorded[-1][0])
    raise CaptureError(f"layer {rec.name!r}: the output gate gate_fn was not observed")


# ---------------------------------------------------------------- reading a recording
def _kernel_call(rec: Recording, names: tuple[str, ...]) -> Call:
    calls = [c for c in rec.calls if c.name in names]
    if not calls:
        rec.call(names[0])  # raises the standard capture error
    call = calls[0]
    refuse_varlen_or_state(argument(call, "cu_seqlens"), argument(call, "initial_state"))
    return call


def _output_row_scale(module: nn.Module, rec: Recording, dtype: torch.dtype) -> Tensor | None:
    """The output norm (and gate) between kernel and ``o_proj`` as a frozen per-channel factor ``(b, C, L)``.

    ``rms_norm_gated(o, g)``: ``w · rsqrt(mean o² + eps) · act(g)`` per head; ``rms_norm(o)``: the same
    without the gate, times the unfused output gate ``gate_fn(g_proj(x))`` when the layer has one;
    HGRN2's ``rms_norm_linear(o)``: one norm over all channels.
    """
    gated = rec.calls_of("rms_norm_gated")
    plain = rec.calls_of("rms_norm") or rec.calls_of("rms_norm_linear")
    if gated:
        a = gated[0].arguments
        x = a["x"]
        gate = activate(a["g"], a.get("activation", "swish"))
        factor = rms_factor(x, a["weight"], float(a.get("eps", 1e-6))) * gate
    elif plain:
        a = plain[0].arguments
        x = a["x"]
        factor = rms_factor(x, a.get("weight", a.get("norm_weight")), float(a.get("eps", 1e-5)))
        if getattr(module, "use_output_gate", False):  # GLA / RetNet with fuse_norm=False: o ← norm(o)·gate_fn(g)
            gate = _gate_value(module, rec)
            factor = factor.reshape(*gate.shape) * gate.to(factor.dtype)
    else:
        return None
    if a.get("bias", a.get("norm_bias")) is not None:
        raise CaptureError(f"layer {rec.name!r}: an output norm with a bias is not supported")
    bsz, length = x.shape[:2]
    return factor.reshape(bsz, length, -1).transpose(1, 2).to(dtype)


def _dtype(value: Tensor) -> torch.dtype:
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def build_gla(module: nn.Module, rec: Recording, name: str) -> GLAAttention:
    call = _kernel_call(rec, _GLA_KERNELS)
    q, k, v = positional(call, 3)
    g = argument(call, "g", "gk")
    if g is None or argument(call, "gv") is not None:
        raise CaptureError(f"layer {name!r}: expected a GLA kernel call with a key-channel log-decay")
    family = "hgrn2" if type(module).__name__ == "HGRN2Attention" else "gla"
    return build_gla_attention(
        name, query=q, key=k, value=v, log_decay=g, scale=argument(call, "scale"),
        row_scale=_output_row_scale(module, rec, _dtype(v)), module_type=type(module).__name__, family=family,
    )


def build_retention(module: nn.Module, rec: Recording, name: str) -> GLAAttention:
    call = _kernel_call(rec, _RET_KERNELS)
    q, k, v = positional(call, 3)
    bsz, length, heads = q.shape[:3]
    decay = retention_log_decay(heads).to(q.device)[None, None, :].expand(bsz, length, heads)
    return build_gla_attention(
        name, query=q, key=k, value=v, log_decay=decay, scale=argument(call, "scale"),
        row_scale=_output_row_scale(module, rec, _dtype(v)), module_type=type(module).__name__, family="retnet",
    )


def _delta_attention(
    name: str, module: nn.Module, rec: Recording, q, k, v, g, beta, l2: bool, scale
) -> DeltaRuleAttention:
    if scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12 * scale:
        raise CaptureError(f"layer {name!r}: delta-rule kernel called with a non-default scale {scale}")
    attn = build_delta_rule_attention(
        name, cls=DeltaRuleAttention, query=q, key=k, value=v, g=g, beta=beta, use_l2norm=l2,
        norm_out=None, norm_gate=None, norm_weight=None, norm_eps=0.0, norm_activation="silu",
        module_type=type(module).__name__,
    )
    attn.row_scale = _output_row_scale(module, rec, attn.dtype)
    return attn


def build_delta_net(module: nn.Module, rec: Recording, name: str) -> DeltaRuleAttention:
    call = _kernel_call(rec, _DN_KERNELS)
    q, k, v = positional(call, 3)
    beta = argument(call, "beta")
    beta = torch.ones_like(q[..., 0]) if beta is None else beta
    g = torch.zeros_like(beta, dtype=torch.float32)  # DeltaNet: the delta rule without decay
    l2 = bool(argument(call, "use_qk_l2norm_in_kernel", default=False))
    return _delta_attention(name, module, rec, q, k, v, g, beta, l2, argument(call, "scale"))


def build_gated_delta_net(module: nn.Module, rec: Recording, name: str) -> DeltaRuleAttention:
    call = _kernel_call(rec, _GDN_KERNELS)
    arguments = dict(call.arguments)
    arguments.update(zip(("q", "k", "v"), positional(call, 3), strict=False))
    q, k, v, g, beta = gdn_kernel_inputs(arguments)
    l2 = bool(arguments.get("use_qk_l2norm_in_kernel", False))
    return _delta_attention(name, module, rec, q, k, v, g, beta, l2, arguments.get("scale"))


class GLAWithNormBias(GLAAttention):
    """GLA whose output norm adds a bias: ``offset = gate · b`` (RWKV-6's GroupNorm), ``(b, C, L, 1)``."""

    norm_offset: Tensor | None = None

    def _compute_offset(self) -> Tensor | None:
        return self.norm_offset


def build_rwkv6(module: nn.Module, rec: Recording, name: str) -> GLAAttention:
    """RWKV-6: ``o_proj(GroupNorm(o) · gate)`` with per-head GroupNorm (σ frozen).

    The values of a head share its matrix, so the GroupNorm's centering commutes with it
    (``o − mean_h o = A (v − mean_h v)``): values are ``v`` centered per head, the row scale is
    ``gate · w / σ`` and the offset ``gate · b`` (as for xLSTM's mLSTM).
    """
    call = _kernel_call(rec, _RWKV6_KERNELS)
    r, k, v, w, u = positional(call, 5)
    norms = rec.calls_of("group_norm")
    if not norms:
        rec.call("group_norm")
    a = norms[0].arguments
    groups, rms = int(a.get("num_groups", 1)), bool(a.get("is_rms_norm", False))
    bsz, length, heads, dv = v.shape
    if groups != heads:
        raise CaptureError(f"layer {name!r}: GroupNorm with {groups} groups over {heads} heads is not supported")
    dtype = _dtype(v)
    factor, _ = group_norm_parts(a["x"], a["weight"], float(a.get("eps", 1e-5)), rms, groups)
    gate = _gate_value(module, rec).to(factor.dtype)
    values = v if rms else v.to(dtype) - v.to(dtype).mean(-1, keepdim=True)
    attn = build_gla_attention(
        name, query=r, key=k, value=values, log_decay=w, scale=argument(call, "scale"), bonus=u,
        row_scale=(factor * gate).transpose(1, 2).to(dtype), module_type=type(module).__name__,
        family="rwkv6", cls=GLAWithNormBias,
    )
    bias = a.get("bias")
    if bias is not None:
        attn.norm_offset = (gate * bias.to(gate.dtype)).transpose(1, 2).to(dtype)[..., None]
    return attn


_NORMS = (_RMS, _RMS_GATED)
_CPU = "yes (use_short_conv=False; kernels routed to fla's float32 naive references)"
_GPU = (
    "fla Triton kernels: fused_recurrent (L ≤ 64) and chunk, float32 (fla in IEEE mode) ≤ 1e-4 and bf16 ≤ 3e-2, "
    "H200 (fla refuses float32 chunk DeltaNet; fla's default TF32 products differ from float32 maths by ≤ 2.5e-3)"
)
_UNPADS = "refused: fla unpads a masked batch to cu_seqlens (pass attention_mask=None)"
for _family, _cls, _build, _kernels, _extra, _out, _padding, _notes in [
    ("gla", "fla.layers.gla.GatedLinearAttention", build_gla, [f"fla.layers.gla.{k}" for k in _GLA_KERNELS], (),
     "o_proj", _UNPADS, "values v; output norm (+ swish gate) a frozen row scale; fuse_norm either way"),
    ("hgrn2", "fla.layers.hgrn2.HGRN2Attention", build_gla, [f"fla.layers.hgrn2.{k}" for k in _GLA_KERNELS],
     ("fla.layers.hgrn2.rms_norm_linear",), None, _UNPADS,
     "GLA with k = 1 − e^g; values i; the norm of the fused rms_norm_linear is a frozen row scale (o_proj is "
     "never called as a module: output() is what its weight multiplies)"),
    ("retnet", "fla.layers.multiscale_retention.MultiScaleRetention", build_retention,
     [f"fla.layers.multiscale_retention.{k}" for k in _RET_KERNELS], (), "o_proj", _UNPADS,
     "fixed per-head decay; q, k after rotary; output norm (+ gate) a frozen row scale"),
    ("rwkv6", "fla.layers.rwkv6.RWKV6Attention", build_rwkv6, [f"fla.layers.rwkv6.{k}" for k in _RWKV6_KERNELS],
     (_GROUP_NORM,), "o_proj", "honoured (the layer multiplies its inputs and v by the mask; no unpadding)",
     "decay read before the step, bonus u, scale 1; values v centered per head (GroupNorm, σ frozen); "
     "gate·w/σ row scale, gate·b offset"),
    ("gated_deltanet", "fla.layers.delta_net.DeltaNet", build_delta_net,
     [f"fla.layers.delta_net.{k}" for k in _DN_KERNELS], (), "o_proj", _UNPADS,
     "delta rule with zero decay; q, k l2-normalised in the kernel (or sum-normalised before it); o_norm a "
     "frozen row scale"),
    ("gated_deltanet", "fla.layers.gated_deltanet.GatedDeltaNet", build_gated_delta_net,
     [f"fla.layers.gated_deltanet.{k}" for k in _GDN_KERNELS], (), "o_proj", _UNPADS,
     "in-kernel gate −exp(A_log)·softplus(a + dt_bias), σ(β) (×2 with allow_neg_eigval); o_norm a frozen "
     "row scale"),
]:
    register_adapter(
        Adapter(
            family=_family,
            classes=(_cls,),
            build=_build,
            functions=(*_kernels, *_extra, *_NORMS),
            output_module=_out,
            prepare=record_gate,
            submodule_inputs=("gate_fn",),
            prepare_model=route_to_torch_on_cpu,
            cpu=_CPU if _family != "rwkv6" else "yes (kernels routed to fla's float32 naive references)",
            padding=_padding,
            gpu=_GPU,
            notes=_notes,
        ),
        first=False,
    )

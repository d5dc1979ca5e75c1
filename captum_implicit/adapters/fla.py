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
embedding, swish and short convolution. While a capture runs on CPU tensors, the functions below
are routed to torch (see :data:`CPU_ROUTES`): the kernels to fla's own naive references
(``fla.ops.*.naive``, which compute in float32), the norms/rotary/swish to torch equivalents of
the Triton math. On CUDA tensors nothing is routed: fla's Triton kernels run and are recorded.
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
from ..layers.gated_deltanet import DeltaRuleAttention, build_delta_rule_attention, l2_normalise
from ..layers.gla import GLAAttention, build_gla_attention, retention_log_decay
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


# ---------------------------------------------------------------- torch versions used on CPU
def _refuse(cu_seqlens: Any = None, initial_state: Any = None) -> None:
    if cu_seqlens is not None:
        raise CaptureError(
            "fla layer on CPU: a padded / packed (cu_seqlens) batch reached the kernel; fla's naive references "
            "take no variable-length input. Pass attention_mask=None (or run on a GPU)."
        )
    if initial_state is not None:
        raise CaptureError("fla layer: the layer continued from a cached state; explain the full sequence with "
                           "use_cache=False")


def _norm_dtype(x: Tensor) -> torch.dtype:
    """fla's Triton norms compute in float32; float64 inputs stay float64 on CPU."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rms_factor(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """``w · rsqrt(mean(x²) + eps)`` over the last dim, in the norm's compute dtype (``x``'s shape)."""
    dt = _norm_dtype(x)
    xf = x.to(dt)
    factor = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps).expand_as(xf)
    return factor * weight.to(dt) if weight is not None else factor


def _activate(gate: Tensor, activation: str) -> Tensor:
    g = gate.to(_norm_dtype(gate))
    return torch.sigmoid(g) if activation == "sigmoid" else F.silu(g)


def _with_residual(x: Tensor, residual: Tensor | None, residual_in_fp32: bool) -> tuple[Tensor, Tensor]:
    """fla's fused add-norm: the norm reads ``x + residual`` (summed in the compute dtype) and, with
    ``prenorm``, also returns that sum in the residual's dtype (float32 with ``residual_in_fp32``)."""
    keep = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    total = x.to(_norm_dtype(x)) if residual is None else x.to(_norm_dtype(x)) + residual.to(_norm_dtype(x))
    return total, total.to(keep)


def _torch_rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False, **_):
    total, res_out = _with_residual(x, residual, residual_in_fp32)
    y = total * _rms_factor(total, weight, eps)
    if bias is not None:
        y = y + bias
    y = y.to(x.dtype)
    return (y, res_out) if prenorm else y


def _torch_rms_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False,
                          residual_in_fp32=False, eps=1e-6, **_):
    total, res_out = _with_residual(x, residual, residual_in_fp32)
    y = total * _rms_factor(total, weight, eps)
    if bias is not None:
        y = y + bias
    y = (y * _activate(g, activation)).to(x.dtype)
    return (y, res_out) if prenorm else y


def _torch_rms_norm_linear(x, norm_weight, norm_bias, linear_weight, linear_bias, residual=None, eps=1e-5,
                           prenorm=False, residual_in_fp32=False, **_):
    y = _torch_rms_norm(x, norm_weight, norm_bias, residual, eps, prenorm, residual_in_fp32)
    y, res_out = y if prenorm else (y, None)
    out = F.linear(y.to(linear_weight.dtype), linear_weight, linear_bias)
    return (out, res_out) if prenorm else out


def _torch_group_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
                      is_rms_norm=False, num_groups=1, **_):
    total, res_out = _with_residual(x, residual, residual_in_fp32)
    factor, centered = _group_norm_parts(total, weight, eps, is_rms_norm, num_groups)
    y = centered * factor
    if bias is not None:
        y = y + bias.to(y.dtype)
    y = y.to(x.dtype)
    return (y, res_out) if prenorm else y


def _group_norm_parts(x: Tensor, weight: Tensor | None, eps: float, is_rms_norm: bool, groups: int):
    """fla's group norm ``w · (x − mean_g x) · rsqrt(mean_g (x − mean_g x)² + eps) + b`` as
    ``(factor, centered)``, both ``x``'s shape, in the norm's compute dtype (no centering for RMS)."""
    dt = _norm_dtype(x)
    xg = x.to(dt).unflatten(-1, (groups, -1))
    if not is_rms_norm:
        xg = xg - xg.mean(-1, keepdim=True)
    factor = torch.rsqrt(xg.square().mean(-1, keepdim=True) + eps).expand_as(xg).flatten(-2)
    return (factor * weight.to(dt) if weight is not None else factor), xg.flatten(-2)


def _torch_layer_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
                      is_rms_norm=False, **_):
    return _torch_group_norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm, 1)


def _torch_swiglu(x: Tensor, y: Tensor) -> Tensor:
    dt = _norm_dtype(x)
    return (F.silu(x.to(dt)) * y.to(dt)).to(x.dtype)


def _torch_token_shift(x, cu_seqlens=None, **_):
    from fla.modules.token_shift import token_shift_ref

    _refuse(cu_seqlens)
    return token_shift_ref(x)


def _torch_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, reverse=False,
                 cu_seqlens=None, **_):
    from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

    _refuse(cu_seqlens, initial_state)
    if reverse:
        raise CaptureError("fla RWKV-6 kernel with reverse=True is not routed on CPU")
    o, state = naive_recurrent_rwkv6(*(x.transpose(1, 2) for x in (r, k, v, w)), u, scale, None,
                                     output_final_state)
    return o.transpose(1, 2), state


def _torch_rotary(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, **_):
    from fla.modules.rotary.ops import rotary_embedding_ref

    _refuse(cu_seqlens)
    if not isinstance(seqlen_offsets, int):
        raise CaptureError("fla rotary embedding with per-sequence offsets is not routed on CPU")
    length = x.shape[1]
    cos, sin = cos[seqlen_offsets : seqlen_offsets + length], sin[seqlen_offsets : seqlen_offsets + length]
    return rotary_embedding_ref(x, cos.to(x.dtype), sin.to(x.dtype), interleaved)


def _torch_gla(q, k, v, g=None, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
               reverse=False, state_v_first=False, cu_seqlens=None, **_):
    from fla.ops.gla.naive import naive_recurrent_gla

    _refuse(cu_seqlens, initial_state)
    if gv is not None or reverse:
        raise CaptureError("fla GLA kernel with gv / reverse is not routed on CPU")
    dk = q.shape[-1]
    if scale is not None:  # naive_recurrent_gla hard-codes dk^{-1/2}
        q = q * (scale * dk**0.5)
    o, state = naive_recurrent_gla(q, k, v, g if g is not None else gk, None, output_final_state)
    if state is not None and state_v_first:
        state = state.transpose(-1, -2)
    return o, state


def _torch_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **_):
    from fla.ops.retention.naive import naive_retention

    _refuse(cu_seqlens, initial_state)
    if output_final_state:
        raise CaptureError("fla retention on CPU: explain with use_cache=False (the naive reference keeps no state)")
    if scale is not None:  # naive_retention hard-codes dk^{-1/2}
        q = q * (scale * q.shape[-1] ** 0.5)
    o = naive_retention(*(x.transpose(1, 2) for x in (q, k, v)))
    return o.transpose(1, 2), None


def _delta_qk(q: Tensor, k: Tensor, l2: bool) -> tuple[Tensor, Tensor]:
    """q, k as the delta-rule closed form takes them: rounded to float32 (as the kernels load them), then
    l2-normalised in float64 (fla's ``l2norm``: ``x · rsqrt(Σx² + 1e-6)``), so router and closed form agree."""
    q, k = q.float().double(), k.float().double()
    return (l2_normalise(q), l2_normalise(k)) if l2 else (q, k)


def _torch_delta_rule(q, k, v, beta=None, scale=None, initial_state=None, output_final_state=False,
                      use_qk_l2norm_in_kernel=False, cu_seqlens=None, **_):
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    _refuse(cu_seqlens, initial_state)
    q, k = _delta_qk(q, k, use_qk_l2norm_in_kernel)
    if scale is not None:  # delta_rule_recurrence hard-codes dk^{-1/2}
        q = q * (scale * q.shape[-1] ** 0.5)
    beta = torch.ones_like(v[..., 0]) if beta is None else beta.float()
    o, state = delta_rule_recurrence(*(x.transpose(1, 2) for x in (q, k, v, beta)), None, output_final_state)
    return o.transpose(1, 2).to(v.dtype), state


def gdn_kernel_inputs(arguments: dict) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(q, k, v, g, β)`` as the gated delta rule sees them after the kernel's in-kernel transforms.

    ``use_gate_in_kernel``: ``g = −exp(A_log)·softplus(g + dt_bias)`` (fla's ``naive_gdn_gate``);
    ``use_beta_sigmoid_in_kernel``: ``β = σ(β)``; ``allow_neg_eigval``: ``β ← 2β``;
    ``use_qk_l2norm_in_kernel`` is left to the caller. Float32, as in the kernels.
    """
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate

    q, k, v = arguments["q"], arguments["k"], arguments["v"]
    g, beta = arguments.get("g"), arguments.get("beta")
    if arguments.get("gk") is not None or arguments.get("gv") is not None:
        raise CaptureError("fla gated delta rule with per-channel gates (gk/gv) is not supported")
    if arguments.get("use_gate_in_kernel", False):
        g = naive_gdn_gate(g, arguments["A_log"], arguments.get("dt_bias"))
    beta = torch.ones_like(q[..., 0]) if beta is None else beta.float()
    if arguments.get("use_beta_sigmoid_in_kernel", False):
        beta = beta.sigmoid()
    if arguments.get("allow_neg_eigval", False):
        beta = beta * 2
    return q, k, v, g.float(), beta


def _torch_gated_delta_rule(*args, **kwargs):
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    names = ("q", "k", "v", "g", "beta")
    arguments = {**dict(zip(names, args, strict=False)), **kwargs}
    _refuse(arguments.get("cu_seqlens"), arguments.get("initial_state"))
    q, k, v, g, beta = gdn_kernel_inputs(arguments)
    q, k = _delta_qk(q, k, bool(arguments.get("use_qk_l2norm_in_kernel", False)))
    final = bool(arguments.get("output_final_state", False))
    o, state = naive_recurrent_gated_delta_rule(q, k, v, beta, g, arguments.get("scale"), None, final)
    if state is not None and arguments.get("state_v_first", False):
        state = state.transpose(-1, -2)
    return o.to(v.dtype), state


def _swish(x: Tensor) -> Tensor:
    return F.silu(x)


#: fla globals routed to torch while a capture runs on CPU tensors (qualified name -> torch version).
CPU_ROUTES: dict[str, Callable] = {
    **{f"fla.layers.gla.{k}": _torch_gla for k in _GLA_KERNELS},
    **{f"fla.layers.hgrn2.{k}": _torch_gla for k in _GLA_KERNELS},
    "fla.layers.hgrn2.swish": _swish,
    "fla.layers.hgrn2.rms_norm_linear": _torch_rms_norm_linear,
    **{f"fla.layers.multiscale_retention.{k}": _torch_retention for k in _RET_KERNELS},
    **{f"fla.layers.delta_net.{k}": _torch_delta_rule for k in _DN_KERNELS},
    **{f"fla.layers.gated_deltanet.{k}": _torch_gated_delta_rule for k in _GDN_KERNELS},
    **{f"fla.layers.rwkv6.{k}": _torch_rwkv6 for k in _RWKV6_KERNELS},
    "fla.layers.rwkv6.token_shift": _torch_token_shift,
    _GROUP_NORM: _torch_group_norm,
    # outside the layers, so that fla's own models (blocks: add-norms, GatedMLP, RWKV-6 channel mix) run on CPU
    "fla.modules.norm.layernorm.layer_norm": _torch_layer_norm,
    "fla.modules.mlp.swiglu": _torch_swiglu,
    "fla.models.rwkv6.modeling_rwkv6.token_shift": _torch_token_shift,
    _RMS: _torch_rms_norm,
    _RMS_GATED: _torch_rms_norm_gated,
    _ROTARY: _torch_rotary,
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
    _refuse(argument(call, "cu_seqlens"), argument(call, "initial_state"))
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
        gate = _activate(a["g"], a.get("activation", "swish"))
        factor = _rms_factor(x, a["weight"], float(a.get("eps", 1e-6))) * gate
    elif plain:
        a = plain[0].arguments
        x = a["x"]
        factor = _rms_factor(x, a.get("weight", a.get("norm_weight")), float(a.get("eps", 1e-5)))
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
    factor, _ = _group_norm_parts(a["x"], a["weight"], float(a.get("eps", 1e-5)), rms, groups)
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

"""LRP forms of mamba-ssm (2.x): ``Mamba``, ``Mamba2``, their ``Block``, ``MixerModel``, ``RMSNorm``s, ``GatedMLP``.

mamba-ssm has no CPU build, so the classes are named as strings (nothing is imported). Each form
is a pure-torch computation of the module's forward — never mamba-ssm's CUDA / Triton kernels,
whose autograd backward would bypass the detach rules — reusing the maths of the HF forms:

* ``Mamba``: :func:`~captum_implicit.lrp.mamba.selective_scan_lrp` (Ā, B̄, C detached, Δ only
  reaches the scan through them; half rule on ``y ⊙ SiLU(z)``), identity rule on the conv's SiLU;
* ``Mamba2``: :func:`~captum_implicit.lrp.mamba2.ssd_scan_lrp` (Δ after bias, softplus and
  ``dt_limit``, decays, B, C held; grouped B/C; ``D`` per head or per channel), then the gated
  RMSNorm with its group size and either order (``norm_before_gate``): half rule on the product,
  group scale held; without ``rmsnorm`` the half rule on ``y ⊙ SiLU(z)``; the gated-MLP part
  (``d_ssm < d_inner``) with the half rule;
* ``MHA`` (the attention layers of ``attn_layer_idx``): q and k held after the qkv conv (linear, depthwise)
  and rotary, so ``F.scaled_dot_product_attention`` (the module's own call) is linear in V; GQA's repeat
  sums back; the gated-MLP half ``up ⊙ SiLU(gate)`` with the identity and half rules;
* ``Block`` / ``MixerModel``: the residual adds, fused (``layer_norm_fn``) or not, and the
  ``residual_in_fp32`` cast, with the norm scale held (LN rule).

Values: a form computes in float32 where the kernels do (float32 and narrower models), so on CUDA
it reproduces the module to float32 rounding (the kernels sum in another order; mamba-ssm's SSD
``tl.dot`` products use TF32 unless ``TRITON_F32_DEFAULT=ieee``). mamba-ssm's kernels refuse float64
(selective scan, causal-conv1d), but a form runs in float64 in pure torch: it then computes the
same maths in float64, ``residual_in_fp32`` rounding the residual to float32 as the module does
(value rounded, tensor kept in float64 so that the gradient keeps float64 precision), and
conservation holds to float64 rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPError, LRPForm, register_lrp_form
from .common import act, cast, continuation_refused, half_rule, hold, round_to
from .mamba import selective_scan_lrp
from .mamba2 import ssd_scan_lrp

_SIMPLE = "mamba_ssm.modules.mamba_simple"
_MAMBA2 = "mamba_ssm.modules.mamba2"
_BLOCK = "mamba_ssm.modules.block"
_MLP = "mamba_ssm.modules.mlp"
_MHA = "mamba_ssm.modules.mha"
_MODEL = "mamba_ssm.models.mixer_seq_simple"
_NORM = "mamba_ssm.ops.triton.layer_norm"
_GATED = "mamba_ssm.ops.triton.layernorm_gated"


# ----------------------------------------------------------------------------- shared pieces
def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The kernels' arithmetic: float32, or float64 for a float64 model (pure torch only)."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _store(x: Tensor, dtype: torch.dtype, rules: GatedLinearRules) -> Tensor:
    """``x`` stored in ``dtype`` as a kernel stores it, rounding absorbed into the gradient.

    A float64 tensor narrowed to float32 (``residual_in_fp32`` in a float64 model, which only the
    forms can run) keeps its dtype and holds the rounded value (:func:`round_to`), so its gradient
    keeps float64 precision; every other cast gives the kernel's dtype.
    """
    if x.dtype == torch.float64 and dtype != torch.float64:
        return round_to(x, dtype, rules)
    return cast(x, dtype, rules)


def _states(module: nn.Module, inference_params: Any, batch: int) -> tuple[Tensor | None, Tensor | None]:
    """The module's cache tensors on a first call (filled as the module fills them); a continuation is refused."""
    if inference_params is None:
        return None, None
    if inference_params.seqlen_offset > 0:
        raise continuation_refused(f"{type(module).__name__} layer {module.layer_idx}", "inference_params=None")
    return module._get_states_from_cache(inference_params, batch)


def _causal_conv(conv: nn.Conv1d, x: Tensor, length: int, rules: GatedLinearRules) -> Tensor:
    """``causal_conv1d_fn(x, weight, bias, activation="silu")`` as ``conv1d`` (padding ``d_conv − 1``, called as a
    module so Zennit rules can attach) and SiLU under the identity rule. ``x`` (b, C, L) -> (b, C, L)."""
    return act(F.silu, conv(x.to(conv.weight.dtype))[..., :length], rules).to(x.dtype)


def norm_lrp(s: Tensor, weight: Tensor, bias: Tensor | None, eps: float, is_rms_norm: bool,
             rules: GatedLinearRules) -> Tensor:
    """mamba-ssm's (RMS / Layer) norm of ``s`` in ``s``'s dtype with the scale held (LN rule): centring (LayerNorm)
    is linear, ``rsqrt(var + ε)`` is held, so the map is linear in ``s`` up to the bias. ``s`` (..., H)."""
    if not is_rms_norm:
        s = s - s.mean(-1, keepdim=True)
    scale = torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    out = s * hold(scale, rules.detach_norm) * weight.to(s.dtype)
    return out + bias.to(s.dtype) if bias is not None else out


def add_norm_lrp(
    x: Tensor,
    norm: nn.Module,
    rules: GatedLinearRules,
    residual: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    is_rms_norm: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's ``layer_norm_fn`` / ``rms_norm_fn`` (dropout 0): ``s = x + residual`` in float32, the norm of
    ``s``, stored in ``x``'s dtype; with ``prenorm`` also ``s`` stored in the residual's dtype (``residual.dtype``, or
    float32 with ``residual_in_fp32`` when there is no residual yet, else ``x.dtype``).

    ``x``, ``residual`` (..., H); ``norm`` has ``weight``, ``bias`` (or None) and ``eps``.
    """
    if residual is not None and not (residual_in_fp32 and residual.dtype == torch.float64):
        residual_dtype = residual.dtype  # the kernel's rule
    else:
        # no residual yet: float32 with residual_in_fp32 (the kernel's rule). A float64 residual with
        # residual_in_fp32 only arises in a float64 model run by the forms (the previous call's float32 residual,
        # kept in float64 by _store): round it again, as the unfused path does at every block
        residual_dtype = torch.float32 if residual_in_fp32 else (residual.dtype if residual is not None else x.dtype)
    dtype = _compute_dtype(x.dtype, residual_dtype)
    s = x.to(dtype) if residual is None else x.to(dtype) + residual.to(dtype)
    out = _store(norm_lrp(s, norm.weight, norm.bias, norm.eps, is_rms_norm, rules), x.dtype, rules)
    return (out, _store(s, residual_dtype, rules)) if prenorm else out


def gated_rms_norm_lrp(
    y: Tensor,
    z: Tensor | None,
    norm: nn.Module,
    compute_dtype: torch.dtype,
    rules: GatedLinearRules,
) -> Tensor:
    """mamba-ssm's gated ``RMSNorm`` (``layernorm_gated``) with the rules, computed in ``compute_dtype``.

    ``norm_before_gate``: ``rms(y) · w ⊙ SiLU(z)``, else ``rms(y ⊙ SiLU(z)) · w``; the RMS over groups of
    ``norm.group_size`` channels (None: all), its scale held; half rule on the product with the gate.
    ``y``, ``z`` (..., C); returns (..., C) in ``y.dtype``.
    """
    h = y.to(compute_dtype)
    gate = act(F.silu, z.to(compute_dtype), rules) if z is not None else None
    if gate is not None and not norm.norm_before_gate:
        h = half_rule(h * gate, rules)
    *prefix, channels = h.shape
    size = norm.group_size or channels
    groups = h.view(*prefix, channels // size, size)
    scale = torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + norm.eps)
    out = (groups * hold(scale, rules.detach_norm)).view(*prefix, channels) * norm.weight.to(compute_dtype)
    if norm.bias is not None:
        out = out + norm.bias.to(compute_dtype)
    if gate is not None and norm.norm_before_gate:
        out = half_rule(out * gate, rules)
    return _store(out, y.dtype, rules)


# ----------------------------------------------------------------------------- mixers
def mamba_ssm_mixer_lrp(
    module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor, inference_params: Any = None
) -> Tensor:
    """LRP form of ``mamba_simple.Mamba.forward(hidden_states, inference_params=None)``: (b, L, d_model) -> same.

    The unfused path (``causal_conv1d_fn`` + ``selective_scan_fn``); the fused ``mamba_inner_fn`` computes the
    same maths. A first call with ``inference_params`` fills the conv and SSM states as the module does.
    """
    batch, length, _ = hidden_states.shape
    conv_state, ssm_state = _states(module, inference_params, batch)
    x, z = module.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, L) each
    if conv_state is not None:
        conv_state.copy_(F.pad(x.detach(), (module.d_conv - length, 0)))
    u = _causal_conv(module.conv1d, x, length, rules)
    dt, B, C = torch.split(module.x_proj(u.transpose(1, 2)), [module.dt_rank, module.d_state, module.d_state], dim=-1)
    dt = module.dt_proj.weight @ dt.transpose(1, 2)  # (b, d_inner, L); the bias is the scan's delta_bias
    A = -torch.exp(module.A_log.float())
    y, last = selective_scan_lrp(
        u, dt, A, B.transpose(1, 2), C.transpose(1, 2), module.D.float(), z, module.dt_proj.bias.float(), rules
    )
    if ssm_state is not None:
        ssm_state.copy_(last.detach())
    return module.out_proj(_store(y, u.dtype, rules).transpose(1, 2))


def mamba_ssm2_mixer_lrp(
    module: nn.Module,
    rules: GatedLinearRules,
    u: Tensor,
    seqlen: int | None = None,
    seq_idx: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    inference_params: Any = None,
) -> Tensor:
    """LRP form of ``mamba2.Mamba2.forward(u, seqlen=None, seq_idx=None, cu_seqlens=None, inference_params=None)``.

    ``u`` (b, L, d_model), or (b·L, d_model) with ``seqlen``; same shape out. The unfused path
    (``causal_conv1d_fn``, ``mamba_chunk_scan_combined``, ``norm(y, z)``); the mem-eff path computes the same
    maths. Packed sequences (``seq_idx`` / ``cu_seqlens``) and tensor-parallel layers are refused.
    """
    if seq_idx is not None or cu_seqlens is not None:
        raise LRPError(f"Mamba2 layer {module.layer_idx}: packed sequences (seq_idx / cu_seqlens) are not supported")
    if getattr(module, "process_group", None) is not None:
        raise LRPError(f"Mamba2 layer {module.layer_idx}: tensor-parallel layers are not supported")
    flat = seqlen is not None
    if flat:
        u = u.view(-1, seqlen, u.shape[-1])
    batch, length, _ = u.shape
    conv_state, ssm_state = _states(module, inference_params, batch)
    zxbcdt = module.in_proj(u)
    dtype = zxbcdt.dtype
    heads, head_dim, groups, state = module.nheads, module.headdim, module.ngroups, module.d_state
    d_mlp = (zxbcdt.shape[-1] - 2 * module.d_ssm - 2 * groups * state - heads) // 2
    z0, x0, z, xBC, dt = torch.split(
        zxbcdt, [d_mlp, d_mlp, module.d_ssm, module.d_ssm + 2 * groups * state, heads], dim=-1
    )
    xBC = xBC.transpose(1, 2)
    if conv_state is not None:
        conv_state.copy_(F.pad(xBC.detach(), (module.d_conv - length, 0)))
    xBC = _causal_conv(module.conv1d, xBC, length, rules).transpose(1, 2)
    x, B, C = torch.split(xBC, [module.d_ssm, groups * state, groups * state], dim=-1)
    x = x.reshape(batch, length, heads, head_dim)
    B = B.reshape(batch, length, groups, state)
    C = C.reshape(batch, length, groups, state)
    # the chunk-cumsum kernel: softplus(dt + dt_bias) (identity above 20, as F.softplus), clamped to dt_limit
    dt = F.softplus(dt + module.dt_bias.to(dt.dtype))
    dt = torch.clamp(dt, min=module.dt_limit[0], max=module.dt_limit[1])
    A = -torch.exp(module.A_log.float())
    compute = _compute_dtype(x.dtype)

    if module.D_has_hdim:  # D per channel: the scan without D, then the skip D ⊙ x (linear in x)
        y, last = ssd_scan_lrp(x, dt, A, B, C, module.D.new_zeros(heads), module.chunk_size, compute, rules)
        y = y + module.D.view(heads, head_dim).to(compute) * x.to(compute)
    else:
        y, last = ssd_scan_lrp(x, dt, A, B, C, module.D, module.chunk_size, compute, rules)
    if ssm_state is not None:
        ssm_state.copy_(last.detach())
    y = y.reshape(batch, length, module.d_ssm)
    if module.rmsnorm:  # the scan's output stored in x's dtype, then the gated norm
        y = gated_rms_norm_lrp(_store(y, dtype, rules), z, module.norm, compute, rules)
    else:  # the gate inside the scan kernel: (y + D x) ⊙ SiLU(z) before the store
        y = _store(half_rule(y * act(F.silu, z.to(compute), rules), rules), dtype, rules)
    if d_mlp > 0:
        y = torch.cat([half_rule(act(F.silu, z0, rules) * x0, rules), y], dim=-1)
    out = module.out_proj(y)
    return out.reshape(batch * length, -1) if flat else out


def gated_rms_norm_module_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor, z: Tensor | None = None) -> Tensor:
    """LRP form of ``layernorm_gated.RMSNorm.forward(x, z=None)`` (see :func:`gated_rms_norm_lrp`)."""
    return gated_rms_norm_lrp(x, z, module, _compute_dtype(x.dtype), rules)


def gated_mlp_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor) -> Tensor:
    """LRP form of ``mlp.GatedMLP.forward(x)``: ``fc2(y ⊙ act(gate))``, identity rule on the activation, half rule."""
    y, gate = module.fc1(x).chunk(2, dim=-1)
    return module.fc2(half_rule(y * act(module.activation, gate, rules), rules))


def _rotary_cos_sin(rotary: nn.Module, length: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """flash_attn ``RotaryEmbedding._update_cos_sin_cache(length, dtype=like.dtype)``'s tables, computed without
    touching the module's cache: ``cos/sin(outer(t, inv_freq))`` in float32, stored in ``like``'s dtype. (L, r/2)."""
    if getattr(rotary, "scale", None) is not None:
        raise LRPError("MHA rotary with XPos scaling (scale_base) is not supported")
    inv_freq = rotary.inv_freq
    if inv_freq.dtype != torch.float32:  # the module recomputes it in float32 then
        inv_freq = 1.0 / (rotary.base ** (torch.arange(0, rotary.dim, 2, device=like.device,
                                                        dtype=torch.float32) / rotary.dim))
    freqs = torch.outer(torch.arange(length, device=like.device, dtype=torch.float32), inv_freq.to(like.device))
    return torch.cos(freqs).to(like.dtype), torch.sin(freqs).to(like.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """flash_attn's rotary on the first ``2·cos.shape[-1]`` dims of ``x`` (b, L, h, d), offset 0, out of place
    (its Triton kernel works in place; the maths of its torch reference ``apply_rotary_emb_torch``)."""
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pattern = (lambda t: t.repeat_interleave(2, dim=-1)) if interleaved else (lambda t: torch.cat([t, t], dim=-1))
    cos, sin = pattern(cos)[:, None], pattern(sin)[:, None]  # (L, 1, rot)
    if interleaved:
        x1, x2 = x_rot[..., ::2], x_rot[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def mha_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor, inference_params: Any = None) -> Tensor:
    """LRP form of ``mha.MHA.forward(x, inference_params=None)``: (b, L, d_model) -> same.

    The module's maths on its SDPA path (flash_attn is only called for cached continuations, refused here):
    ``in_proj`` -> [qkv, mlp]; depthwise causal conv over qkv (``d_conv``, no activation; linear); q, kv heads;
    rotary (flash_attn's ``RotaryEmbedding`` maths in torch); q and k held (``detach_softmax``), so the
    module's own ``F.scaled_dot_product_attention`` call is linear in V (GQA's ``repeat_interleave`` sums the
    relevance back onto each kv head); the gated-MLP half ``up ⊙ SiLU(gate)`` with the identity rule on SiLU and
    the half rule; ``out_proj([context, x_mlp])``. A first call with ``inference_params`` fills the kv cache and
    conv state as the module does; a continuation is refused.
    """
    batch, length, _ = x.shape
    if inference_params is not None:
        lengths = getattr(inference_params, "lengths_per_sample", None)
        if inference_params.seqlen_offset > 0 or (lengths is not None and bool(lengths.any())):
            raise continuation_refused(f"MHA layer {module.layer_idx}", "inference_params=None")
        if module.layer_idx not in inference_params.key_value_memory_dict:
            inference_params.key_value_memory_dict[module.layer_idx] = module.allocate_inference_cache(
                batch, inference_params.max_seqlen, dtype=x.dtype
            )
    qkv = module.in_proj(x)
    x_mlp = None
    if module.mlp_dim > 0:
        qkv, x_mlp = qkv.split([qkv.shape[-1] - module.mlp_dim, module.mlp_dim], dim=-1)
        up, gate = x_mlp.chunk(2, dim=-1)
        x_mlp = half_rule(up * act(F.silu, gate, rules), rules)
    if module.d_conv > 0:  # depthwise causal conv, no activation: linear (its bias absorbs relevance)
        qkv = module.conv1d(qkv.transpose(1, 2))[..., :length].transpose(1, 2)
        if inference_params is not None:  # the module stores the conv's *output* (as mha.py does)
            _, conv_state = inference_params.key_value_memory_dict[module.layer_idx]
            conv_state.copy_(F.pad(qkv.detach().transpose(1, 2), (module.d_conv - length, 0)))
    heads, heads_kv, head_dim = module.num_heads, module.num_heads_kv, module.head_dim
    q, kv = qkv.split([heads * head_dim, heads_kv * 2 * head_dim], dim=-1)
    q = q.reshape(batch, length, heads, head_dim)
    k, v = kv.reshape(batch, length, 2, heads_kv, head_dim).unbind(dim=2)
    if module.rotary_emb_dim > 0:
        cos, sin = _rotary_cos_sin(module.rotary_emb, length, q)
        interleaved = bool(module.rotary_emb.interleaved)
        q, k = _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)
    q, k = hold(q, rules.detach_softmax), hold(k, rules.detach_softmax)
    if inference_params is not None:  # the kv cache gets what the module writes: k after rotary, v
        module._update_kv_cache(torch.stack([k, v], dim=2).detach(), inference_params)
    k = torch.repeat_interleave(k, dim=2, repeats=heads // heads_kv)
    v = torch.repeat_interleave(v, dim=2, repeats=heads // heads_kv)
    context = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=module.causal, scale=module.softmax_scale
    ).transpose(1, 2).reshape(batch, length, heads * head_dim)
    if x_mlp is not None:
        context = torch.cat([context, x_mlp], dim=-1)
    return module.out_proj(context)


# ----------------------------------------------------------------------------- norms, blocks, backbone
def _is_rms(norm: nn.Module) -> bool:
    """``isinstance(norm, layer_norm.RMSNorm)``; ``fused_add_norm`` allows only it and ``nn.LayerNorm``."""
    return not isinstance(norm, nn.LayerNorm)


def rms_norm_lrp(
    module: nn.Module, rules: GatedLinearRules, x: Tensor, residual: Tensor | None = None, prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """LRP form of ``layer_norm.RMSNorm.forward(x, residual=None, prenorm=False, residual_in_fp32=False)``."""
    if getattr(module, "drop", None) is not None and module.training:
        raise LRPError("mamba-ssm RMSNorm with dropout in training mode: call model.eval() first")
    return add_norm_lrp(x, module, rules, residual, prenorm, residual_in_fp32, is_rms_norm=True)


def _add_then_norm(
    norm: nn.Module, fused: bool, residual_in_fp32: bool, rules: GatedLinearRules, hidden_states: Tensor,
    residual: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``Block``'s "Add -> LN": returns ``(norm(hidden_states + residual), hidden_states + residual)``."""
    if fused:
        return add_norm_lrp(hidden_states, norm, rules, residual, True, residual_in_fp32, _is_rms(norm))
    residual = hidden_states + residual if residual is not None else hidden_states
    hidden_states = norm(cast(residual, norm.weight.dtype, rules))  # the norm's own form
    if residual_in_fp32:
        residual = _store(residual, torch.float32, rules)
    return hidden_states, residual


def block_lrp(
    module: nn.Module, rules: GatedLinearRules, hidden_states: Tensor, residual: Tensor | None = None,
    inference_params: Any = None, **mixer_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """LRP form of ``block.Block.forward(hidden_states, residual=None, inference_params=None, **mixer_kwargs)``.

    Add -> norm (fused or not) -> mixer [-> add -> norm2 -> mlp]; returns ``(hidden_states, residual)``.
    """
    hidden_states, residual = _add_then_norm(
        module.norm, module.fused_add_norm, module.residual_in_fp32, rules, hidden_states, residual
    )
    hidden_states = module.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
    if module.mlp is not None:
        hidden_states, residual = _add_then_norm(
            module.norm2, module.fused_add_norm, module.residual_in_fp32, rules, hidden_states, residual
        )
        hidden_states = module.mlp(hidden_states)
    return hidden_states, residual


def mixer_model_lrp(
    module: nn.Module, rules: GatedLinearRules, input_ids: Tensor, inference_params: Any = None, **mixer_kwargs: Any
) -> Tensor:
    """LRP form of ``mixer_seq_simple.MixerModel.forward(input_ids, inference_params=None, **mixer_kwargs)``.

    Needed because the final add + ``norm_f`` with ``fused_add_norm`` is a functional Triton call
    (``layer_norm_fn``), not a module call; the blocks and ``norm_f`` (unfused) run their own forms.
    Returns (b, L, d_model).
    """
    hidden_states = module.embedding(input_ids)
    residual = None
    for layer in module.layers:
        hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params, **mixer_kwargs)
    norm = module.norm_f
    if module.fused_add_norm:
        return add_norm_lrp(hidden_states, norm, rules, residual, False, module.residual_in_fp32, _is_rms(norm))
    residual = hidden_states + residual if residual is not None else hidden_states
    return norm(cast(residual, norm.weight.dtype, rules))


for _family, _cls, _fwd, _note in [
    ("mamba", f"{_SIMPLE}.Mamba", mamba_ssm_mixer_lrp,
     "pure torch (no kernels); identity rule on SiLUs, Ā/B̄/C detached, half rule on the gate"),
    ("mamba2", f"{_MAMBA2}.Mamba2", mamba_ssm2_mixer_lrp,
     "pure torch (no kernels); identity rule on SiLUs, Δ/decays/B/C held, half rule in the gated norm "
     "(either order) or gate, gated-MLP part"),
    ("mamba2", f"{_GATED}.RMSNorm", gated_rms_norm_module_lrp, "gated RMSNorm: group scale held, half rule"),
    ("mamba-ssm", f"{_NORM}.RMSNorm", rms_norm_lrp, "fused add + RMSNorm in pure torch, scale held (LN rule)"),
    ("mamba-ssm", f"{_BLOCK}.Block", block_lrp,
     "add -> norm (fused or not) -> mixer [-> MLP]; residual_in_fp32 cast made exact"),
    ("mamba-ssm", f"{_MODEL}.MixerModel", mixer_model_lrp, "the final (fused) add + norm_f in pure torch"),
    ("mamba-ssm", f"{_MLP}.GatedMLP", gated_mlp_lrp, "identity rule on the activation, half rule on the product"),
    ("softmax", f"{_MHA}.MHA", mha_lrp,
     "q, k held after the qkv conv and rotary (the module's SDPA call, linear in V; GQA summed back); gated-MLP "
     "half: identity rule on SiLU, half rule; kv-cache continuations refused"),
]:
    register_lrp_form(LRPForm(family=_family, classes=(_cls,), forward=_fwd, notes=_note), first=False)

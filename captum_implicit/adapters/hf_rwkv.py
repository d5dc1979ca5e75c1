"""Adapter for HF transformers RWKV-4 (``RwkvSelfAttention``, the time mix).

Capture: the module's input ``x`` (the ``ln1`` output) comes from the forward pre-hook; the
call of the module-level ``rwkv_linear_attention`` is recorded (the keys as the kernel saw
them, CPU loop or CUDA kernel alike); receptance and the two token-shift halves of the
value are recomputed from the module's parameters, and the recomputed key and value are
checked against what the kernel received (a mismatch means the module's forward is not
the RWKV-4 forward this adapter knows).

Things HF RWKV does that a capture must not get wrong:

* ``attention_mask`` is ignored by the model (it only warns): padding tokens are mixed in
  like any other token, and the explanation shows that.
* The first eval-mode forward rescales ``attention.output.weight`` and
  ``feed_forward.value.weight`` **in place** (``RwkvModel._rescale_layers``; ``train()``
  undoes it on the next training forward). The capture runs the model in eval mode, so
  :func:`_keep_rescaling` inverts that afterwards, bit for bit, together with
  ``layers_are_rescaled``.
* In eval mode ``use_cache`` defaults to ``config.use_cache`` (True); the cache's state is
  updated in place, so no gradient can flow back through such a forward. A fresh cache
  gives the same output as no cache, so a forward-only capture works either way; with
  ``track_grad=True`` we raise a clear error asking for ``use_cache=False``. A forward
  that continues from an earlier state (non-zero cache) is refused: explain the full
  sequence instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.capture import Recording
from ..core.errors import CaptureError
from ..core.registry import Adapter, register_adapter
from ..core.attention import compute_dtype
from ..layers.rwkv import RwkvAttention, build_rwkv_attention
from ._common import positional

_MOD = "transformers.models.rwkv.modeling_rwkv"

_CACHE_GRAD = (
    "HF RWKV ran with a cache (use_cache defaults to True in eval mode) and updates the cache's state in "
    "place, so no gradient can flow back through this forward (autograd reports 'a variable needed for "
    "gradient computation has been modified by an inplace operation'). Call the model with use_cache=False."
)


def _state_of(args: tuple, kwargs: dict) -> list[Tensor] | None:
    if "state" in kwargs:
        return kwargs["state"]
    return args[1] if len(args) > 1 else None


def _check_state(module: nn.Module) -> Callable[[], None]:
    """Pre-hook refusing the cache states a token-to-token explanation cannot represent."""

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        state = _state_of(args, kwargs)
        if state is None:
            return
        layer = mod.layer_id
        hidden = args[0] if args else kwargs["hidden"]
        if hidden.shape[1] == 1 and hidden.shape[0] > 1:
            raise CaptureError(
                f"RWKV layer {layer}: HF RWKV's single-token step with a cache broadcasts the (batch, C) shift "
                "state against the (batch, 1, C) input, turning a batch of one-token inputs into a (batch, "
                "batch, C) tensor (a transformers bug for batch > 1); call the model with use_cache=False."
            )
        # [ffn-shift, att-shift, num, den, max]; the model initialises max to -1e30 (the kernel to -1e38)
        fresh = (
            bool(state[1][:, :, layer].eq(0).all())
            and bool(state[2][:, :, layer].eq(0).all())
            and bool(state[3][:, :, layer].eq(0).all())
            and bool(state[4][:, :, layer].le(-1e30).all())
        )
        if not fresh:
            raise CaptureError(
                f"RWKV layer {layer}: the forward continued from a cached state (earlier tokens); explain the "
                "full sequence in one forward with use_cache=False (and no state=)."
            )

    return module.register_forward_pre_hook(hook, with_kwargs=True).remove


def _keep_rescaling(model: nn.Module) -> Callable[[], None]:
    """Make ``RwkvModel._rescale_layers`` (in-place weight scaling on a mode switch) undoable, bit for bit.

    The rescale multiplies or divides by ``2**k``; that is exactly invertible unless a result
    leaves the normal range (subnormal underflow, overflow), so a weight is copied only then
    (or when it is quantised) — a first eval-mode capture of a large model costs no extra memory.
    Nothing is recorded for models whose forward will not rescale.
    """
    saved: list[tuple] = []
    for rwkv in model.modules():
        if not hasattr(rwkv, "layers_are_rescaled") or not hasattr(rwkv, "blocks"):
            continue
        every = getattr(rwkv.config, "rescale_every", 0)
        weights = []
        # the forward rescales iff training == layers_are_rescaled (dividing in eval, multiplying in train)
        if every > 0 and rwkv.training == rwkv.layers_are_rescaled:
            divide = not rwkv.training
            for block_id, block in enumerate(rwkv.blocks):
                factor = 2 ** int(block_id // every)
                if factor == 1:
                    continue  # scaling by 1 leaves the weights bit-identical
                for owner in (block.attention.output, block.feed_forward.value):
                    param = owner.weight
                    exact = _exactly_invertible(param, factor, divide)
                    scb = getattr(param, "SCB", None)
                    quantised = scb is not None or hasattr(param, "quant_state")  # weight data not scaled
                    copy = None if exact or quantised else param.detach().clone()
                    weights.append((owner, param, factor, copy, None if scb is None else scb.clone()))
        saved.append((rwkv, rwkv.layers_are_rescaled, weights))

    def undo() -> None:
        with torch.no_grad():
            for rwkv, flag, weights in saved:
                if rwkv.layers_are_rescaled != flag:  # the rescale ran: invert it
                    for owner, param, factor, copy, scb in weights:
                        if owner.weight is not param:  # bitsandbytes 4-bit: the rescale replaced the parameter
                            setattr(owner, "weight", param)
                        elif scb is not None:  # bitsandbytes 8-bit: the rescale scaled the statistics
                            param.SCB.copy_(scb)
                        elif copy is not None:
                            param.copy_(copy)
                        elif flag:  # it multiplied (train mode)
                            param.div_(factor)
                        else:
                            param.mul_(factor)
                rwkv.layers_are_rescaled = flag

    return undo


def _exactly_invertible(param: Tensor, factor: int, divide: bool) -> bool:
    """Whether scaling ``param`` by ``factor`` (a power of two) and back returns it bit for bit."""
    if not param.is_floating_point() or hasattr(param, "SCB") or hasattr(param, "quant_state"):
        return False
    finfo = torch.finfo(param.dtype)
    mags = param.detach().abs()
    if divide:  # every non-zero magnitude must stay normal after the division
        nonzero = mags[mags != 0]
        return not nonzero.numel() or bool(nonzero.min() >= finfo.tiny * factor)
    return bool(mags.max() <= finfo.max / factor) if mags.numel() else True


def _within(a: Tensor, b: Tensor, dtype: torch.dtype) -> bool:
    """``a`` equals ``b`` up to a few roundings in ``dtype`` (relative to ``max|b|``)."""
    if a.shape != b.shape:
        return False
    if not b.numel():
        return True
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max()) <= 16 * torch.finfo(dtype).eps * float(b.abs().max())


def build_hf_rwkv(module: nn.Module, rec: Recording, name: str) -> RwkvAttention:
    hidden = rec.args[0] if rec.args else rec.kwargs["hidden"]
    call = rec.call("rwkv_linear_attention")
    time_decay, time_first, key, value = positional(call, 4)
    state = _state_of(rec.args, rec.kwargs)
    if state is not None and rec.output_input is not None and rec.output_input.requires_grad:
        if rec.track_grad:
            raise CaptureError(f"layer {name!r}: {_CACHE_GRAD}")
        warnings.warn(f"layer {name!r}: {_CACHE_GRAD}", stacklevel=2)

    with torch.no_grad():
        # the same operations as RwkvSelfAttention.extract_key_value (a fresh state shifts in zeros)
        shifted = module.time_shift(hidden)
        mix_k, mix_v, mix_r = module.time_mix_key, module.time_mix_value, module.time_mix_receptance
        key_check = module.key(hidden * mix_k + shifted * (1 - mix_k))
        receptance = torch.sigmoid(module.receptance(hidden * mix_r + shifted * (1 - mix_r)))
        # the value's two token-shift halves, in the explanation's dtype
        dtype = compute_dtype(hidden)
        x, mv, weight = hidden.to(dtype), mix_v.to(dtype), module.value.weight.to(dtype)
        v_cur = F.linear(x * mv, weight)
        v_prev = F.linear(x * (1 - mv), weight)
        v_check = v_cur + F.pad(v_prev, (0, 0, 1, -1))

    if not _within(key_check, key, key.dtype) or not _within(v_check, value, value.dtype):
        raise CaptureError(
            f"layer {name!r}: the key/value recomputed from the module's parameters differ from those the WKV "
            "kernel received; this RwkvSelfAttention forward is not the RWKV-4 forward the adapter supports "
            "(transformers version?), or the forward continued from a cached state."
        )
    return build_rwkv_attention(
        name,
        key=key,
        value_current=v_cur,
        value_previous=v_prev,
        receptance=receptance,
        time_decay=time_decay,
        time_first=time_first,
        module_type=type(module).__name__,
    )


register_adapter(
    Adapter(
        family="rwkv",
        padding="ignored by the model (HF warns); padding before a query is refused",
        masks_padding=False,
        gpu="HF on CUDA (torch WKV; the hub CUDA kernel was not available), float32 ≤ 1e-4 and bf16 ≤ 2e-2, H200 "
        "(tests/test_rwkv.py)",
        classes=(f"{_MOD}.RwkvSelfAttention",),
        build=build_hf_rwkv,
        functions=(f"{_MOD}.rwkv_linear_attention",),
        output_module="output",
        prepare=_check_state,
        prepare_model=_keep_rescaling,
        notes="RWKV-4 time mix; token shift folded in as 2·A channels; attention_mask is ignored by the model",
    ),
    first=False,
)

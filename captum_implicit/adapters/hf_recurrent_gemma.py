"""Adapter for HF transformers RecurrentGemma (Griffin/Hawk) recurrent blocks (``RecurrentGemmaRecurrentBlock``).

The RG-LRU has no kernel function to record: the capture records the block's input (pre-hook),
the conv input (``conv_1d``: the ``linear_x`` output) and the RG-LRU's inputs
``(activations, position_ids)``; the gates are recomputed from the module's parameters with the
same operations as ``RecurrentGemmaRglru.forward`` (so they are bit-identical), and ``y`` from the
block input.

State and cache: RecurrentGemma keeps its state **on the modules** (``conv1d_state``,
``rg_lru.recurrent_states``) and ``use_cache`` defaults to True. A prefill (``L > 1``, fresh cache)
computes exactly what ``use_cache=False`` computes — the model zeroes the states first — so both
work; a forward continuing from non-zero states (decoding with a cache) is refused with a clear
error. The modules' state attributes are put back as they were when the capture ends.

``attention_mask`` is not used by recurrent blocks: the state resets where ``position_ids == 0``.
With left padding, pass ``position_ids`` that are 0 at the first real token, or the padding flows
into the state (and the explanation shows it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..core.capture import Recording
from ..core.errors import CaptureError
from ..core.registry import Adapter, register_adapter
from ..layers.rglru import RglruAttention, build_rglru_attention
from ._gpu_runs import HYBRIDS_ON_CUDA

_MOD = "transformers.models.recurrent_gemma.modeling_recurrent_gemma"

_CONTINUED = (
    "the recurrent block continued from a non-zero cached state (a decoding step with a cache); explain the "
    "full sequence in one forward with use_cache=False (or a fresh cache)."
)


def _nonzero(t: Tensor | None) -> bool:
    return t is not None and bool(t.ne(0).any())


def _guard_state(block: nn.Module) -> Callable[[], None]:
    """Refuse non-zero carried-in state; restore the modules' state attributes afterwards."""
    lru = block.rg_lru
    conv_state, lru_state = block.conv1d_state, lru.recurrent_states

    def block_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        use_cache = kwargs.get("use_cache", args[3] if len(args) > 3 else True)
        decoding = use_cache and position_ids is not None and position_ids.shape[1] == 1
        if decoding and _nonzero(mod.conv1d_state):  # only the decode path reads the conv state
            raise CaptureError(f"RecurrentGemma: {_CONTINUED}")

    def lru_hook(mod: nn.Module, args: tuple) -> None:
        if _nonzero(mod.recurrent_states):
            raise CaptureError(f"RecurrentGemma: {_CONTINUED}")

    handles = [
        block.register_forward_pre_hook(block_hook, with_kwargs=True),
        lru.register_forward_pre_hook(lru_hook),
    ]

    def undo() -> None:
        for h in handles:
            h.remove()
        block.conv1d_state = conv_state
        lru.recurrent_states = lru_state

    return undo


def build_hf_rglru(module: nn.Module, rec: Recording, name: str) -> RglruAttention:
    inputs = rec.args[0] if rec.args else rec.kwargs["input_states"]
    if "rg_lru" not in rec.submodule_inputs:
        raise CaptureError(f"layer {name!r}: the RG-LRU of this block did not run during its forward")
    activations, position_ids = rec.submodule_inputs["rg_lru"][0][:2]
    lru = module.rg_lru
    with torch.no_grad():
        if "conv_1d" in rec.submodule_inputs:
            x_lin = rec.submodule_inputs["conv_1d"][0][0].transpose(1, 2)
        else:  # single-token step: the model convolved by hand from its (zero) conv state
            x_lin = module.linear_x(inputs)
        gate = module.act_fn(module.linear_y(inputs))

        # the operations of RecurrentGemmaRglru.forward, so every gate is bit-identical to the model's
        bsz, length, width = activations.shape
        heads, block_width = lru.num_attention_heads, lru.block_width
        reset = position_ids[:, :, None] == 0
        act = activations.reshape(bsz * length, heads, block_width).permute(1, 0, 2)
        res = torch.baddbmm(lru.input_gate_bias[:, None, :], act, lru.input_gate_weight)
        input_gate = torch.sigmoid(res.transpose(0, 1).reshape(bsz, length, width))
        res = torch.baddbmm(lru.recurrent_gate_bias[:, None, :], act, lru.recurrent_gate_weight)
        recurrent_gate = torch.sigmoid(res.transpose(0, 1).reshape(bsz, length, width))
        log_a = -8.0 * recurrent_gate * nn.functional.softplus(lru.recurrent_param)
        a = torch.exp(log_a)
        a_square = torch.exp(2 * log_a)
        multiplier = torch.sqrt(1 - a_square)  # SqrtBoundDerivative's forward
        multiplier = reset + ~reset * multiplier
        scan_input = (activations * input_gate) * multiplier.type(activations.dtype)

    return build_rglru_attention(
        name,
        values=x_lin,
        conv_output=activations,
        scan_input=scan_input,
        input_scale=input_gate * multiplier,
        decay=a,
        log_decay=log_a,
        reset=reset[..., 0].expand(bsz, length),
        gate=gate,
        conv_weight=module.conv_1d.weight[:, 0],
        conv_bias=module.conv_1d.bias,
        module_type=type(module).__name__,
    )


register_adapter(
    Adapter(
        family="rglru",
        padding="no mask in the model (state resets where position_ids == 0); padding before a query is refused",
        masks_padding=False,
        gpu="HF's torch path on CUDA, float32 ≤ 1e-4 and bf16 ≤ 2e-2, with a state reset, H200 "
        f"(tests/test_rglru.py); {HYBRIDS_ON_CUDA}",
        classes=(f"{_MOD}.RecurrentGemmaRecurrentBlock",),
        build=build_hf_rglru,
        submodule_inputs=("conv_1d", "rg_lru"),
        output_module="linear_out",
        prepare=_guard_state,
        notes="Griffin/RecurrentGemma RG-LRU block; resets at position_ids == 0; attention_mask unused",
    ),
    first=False,
)

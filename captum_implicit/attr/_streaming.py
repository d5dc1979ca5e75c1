"""Streaming runs: one layer's captured factors in memory at a time, for long inputs on large models.

A normal run keeps every layer's factors until the explanation is computed — about 28 bytes per
channel and token and layer for Mamba (4.7 GB per layer of a 2.8b model at 32k tokens, 300 GB for
its 64 layers). A streaming run instead

1. runs the forward and one backward with the block around each layer under activation checkpointing
   (``torch.utils.checkpoint``, set per instance and undone on exit), keeping for every layer call only
   its arguments and the gradient reaching its output;
2. then, **last layer first**, re-runs each layer alone from its recorded arguments under a capture,
   pulls the recorded output gradient back to the tensor entering its output projection (the layer's
   ``output_grad``), turns the factors into the layer's ``(B, L, L)`` map and drops them.

The maps equal those of a normal run (same capture path, same numerics). Cost: the model's forward twice
(checkpointing) and its backward once, plus one more forward and backward of every layer alone. Memory:
the residual stream per block, every layer's input and output gradient (``B·L·d_model`` each), one block's
activations and one layer's factors and map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointError, checkpoint

from ..core.attention import LayerAttention
from ..core.capture import Capture, Recording
from ..core.errors import CaptureError
from ._base import _CONTAINERS, _anchors, _block_of, refuse_unmasked_padding
from ._utils import (
    QueryType,
    check_attribution_inputs,
    padding_mask,
    resolve_model,
    resolve_queries,
    target_scores,
    valid_tokens,
)


@dataclass
class StreamedRun:
    """A streaming run: the model is still prepared for capture (inside :func:`streamed_run`).

    Attributes
    ----------
    calls : list of Recording
        Every layer call, in forward order (arguments and output; no factors).
    grads : list of Tensor
        The gradient of the summed target scores at each call's output (first tensor of the output).
    queries, valid, mask, length
        As in :class:`~captum_implicit.attr._base.Run`.
    """

    calls: list[Recording]
    grads: list[Tensor]
    queries: Tensor
    valid: Tensor
    mask: Tensor | None
    length: int

    def layer(self, index: int) -> LayerAttention:
        """Re-run call ``index`` alone under a capture; its attention with ``output_grad`` set."""
        return _recompute(self.calls[index], self.grads[index])

    def maps(
        self,
        start_layer: int,
        layer_map: Callable[[LayerAttention], Tensor],
        first_rows: Callable[[LayerAttention], Tensor] | None = None,
    ) -> Iterator[Tensor]:
        """Every layer's ``(B, L, L)`` map from ``start_layer`` on, **last first**, padding columns zeroed; the
        last layer's ``(B, L)`` query rows instead of its map with ``first_rows`` (as :func:`._base.layer_maps`)."""
        if not 0 <= start_layer < len(self.calls):
            raise ValueError(f"start_layer={start_layer} out of range for {len(self.calls)} captured layers")

        def maps() -> Iterator[Tensor]:
            for index in reversed(range(start_layer, len(self.calls))):
                attn = self.layer(index)
                rows = first_rows is not None and index == len(self.calls) - 1
                mat = first_rows(attn) if rows else layer_map(attn)
                del attn  # drop the factors before the next layer is captured
                if self.mask is not None and self.mask.shape[1] == mat.shape[-1]:
                    cols = self.mask.to(device=mat.device, dtype=mat.dtype)
                    mat = mat * (cols if rows else cols[:, None, :])
                yield mat

        return maps()


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for o in output:
            if isinstance(o, Tensor):
                return o
    return None


def _checkpointed(forward: Callable) -> Callable:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


class streamed_run:  # noqa: N801 - a context manager used like a function
    """Phase 1 of a streaming run, as a context manager yielding a :class:`StreamedRun`.

    The model stays prepared for capture (eval mode, capture path, checkpointed blocks) until exit, so
    that every layer re-run inside sees the very state of the forward; everything is undone on exit.
    """

    def __init__(
        self,
        forward_func: Callable,
        model: nn.Module | None,
        inputs: tuple[Tensor, ...],
        target: Any,
        additional_forward_args: tuple,
        query_position: QueryType,
    ) -> None:
        self.forward_func, self.model = forward_func, resolve_model(forward_func, model)
        self.inputs, self.target = inputs, target
        self.afa, self.query_position = additional_forward_args, query_position
        self._capture = Capture(self.model, build=False)

    def __enter__(self) -> StreamedRun:
        cap = self._capture.__enter__()
        try:
            return self._forward_backward(cap)
        except BaseException:
            self._capture.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        self._capture.__exit__(*exc)

    def _forward_backward(self, cap: Capture) -> StreamedRun:
        inputs, model = self.inputs, self.model
        check_attribution_inputs(self.forward_func, model, inputs, self.afa)
        mask = padding_mask(self.forward_func, inputs, self.afa)
        refuse_unmasked_padding(cap._targets, mask, self.query_position)
        blocks: dict[str, nn.Module] = {}
        for name, _, _ in cap._targets:
            block = _block_of(model, name)
            module = model.get_submodule(block)
            if block and not isinstance(module, _CONTAINERS):
                blocks[block] = module
        for module in blocks.values():  # undone by the capture's guard on exit
            cap._guard.patch_attribute(module, "forward", _checkpointed(module.forward))
        # a cache filled by the forward would send the recomputation down the decoding path
        configs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "use_cache", False)}
        for config in configs.values():
            cap._guard.patch_attribute(config, "use_cache", False)
        anchors = _anchors(model, "output")
        assert anchors is not None
        with anchors, torch.enable_grad():
            output = self.forward_func(*inputs, *self.afa)
            cap.paused = True  # the recomputations during backward are not new calls
            calls = cap.recordings
            if not calls:
                raise CaptureError("the forward ran no supported layer")
            outs = [_first_tensor(rec.output) for rec in calls]
            missing = [rec.name for rec, o in zip(calls, outs, strict=True) if o is None or not o.requires_grad]
            if missing:
                raise CaptureError(f"no differentiable output recorded for layers {missing}")
            scores = target_scores(output, self.target, self.query_position, mask)
            try:
                grads = torch.autograd.grad(scores.sum(), outs, allow_unused=True)
            except CheckpointError as e:
                raise CaptureError(
                    "streaming recomputes each block in the backward, and the recomputation differed from the "
                    "forward: the model keeps state between calls (pass use_cache=False, no cache objects)"
                ) from e
        grads = [torch.zeros_like(o) if g is None else g.detach() for o, g in zip(outs, grads, strict=True)]
        for rec in calls:
            rec.output = None  # the outputs are no longer needed (nor their graphs)
        # the length the model ran on (not inputs[0]'s: the LLM wrapper's first input is the prompt's feature mask)
        batch, length = outs[0].shape[0], outs[0].shape[1]
        for rec, out in zip(calls, outs, strict=True):
            if tuple(out.shape[:2]) != (batch, length):
                raise CaptureError(
                    f"layer {rec.name!r} returned {tuple(out.shape)}, expected (batch, length) {(batch, length)} first"
                )
        queries = resolve_queries(self.query_position, mask, batch, length).to(grads[0].device)
        if mask is not None:
            mask = mask.to(grads[0].device)
        return StreamedRun(calls, grads, queries, valid_tokens(queries, mask, length), mask, length)


def _anchored(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Detached arguments; the first floating tensor requires grad so that the layer builds a graph."""
    done = False

    def fix(v: Any) -> Any:
        nonlocal done
        if not isinstance(v, Tensor):
            return v
        v = v.detach()
        if not done and v.is_floating_point():
            done = True
            v = v.requires_grad_(True)
        return v

    new_args = tuple(fix(a) for a in args)
    hs = kwargs.get("hidden_states")
    new_kwargs = {"hidden_states": fix(hs)} if isinstance(hs, Tensor) else {}
    new_kwargs.update({k: fix(v) for k, v in kwargs.items() if k not in new_kwargs})
    return new_args, new_kwargs


def _recompute(rec: Recording, grad: Tensor) -> LayerAttention:
    """Re-run one layer call alone under a capture and pull ``grad`` back to its output projection."""
    args, kwargs = _anchored(rec.args, rec.kwargs)
    with Capture(rec.module, track_grad=True) as cap, torch.enable_grad():
        out = _first_tensor(rec.module(*args, **kwargs))
        cap.check_finite()
        built = [r for r in cap.recordings if r.module is rec.module]
        if out is None or len(built) != 1 or built[0].output_input is None:
            raise CaptureError(f"layer {rec.name!r}: re-running it alone did not reproduce one captured call")
        anchor = built[0].output_input
        if not anchor.requires_grad:
            raise CaptureError(f"layer {rec.name!r}: the input of its output projection is not differentiable")
        torch.autograd.grad(out, [anchor], grad_outputs=grad.to(out.dtype))
    attn = built[0].attention
    assert attn is not None
    attn.name = rec.name
    # the recording holds the projection input, whose grad hook holds the recording: break the cycle so the
    # factors go as soon as the caller drops them (not at the next garbage collection)
    for r in cap.recordings:
        r.attention = r.output_input = r.output = None
    cap.recordings.clear()
    return attn

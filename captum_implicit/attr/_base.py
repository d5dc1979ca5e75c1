"""What every implicit-attention attribution shares: the model, one captured run, the output layout.

A *run* is one forward of ``forward_func(*inputs, *additional_forward_args)`` under
:class:`~captum_implicit.core.capture.Capture` and, for gradient methods, one backward
of the summed per-example target scores to the tensors a method needs (each layer's
output for attention × gradient; each block's input for the published pipelines).
Examples of a batch never interact, so the summed backward equals per-example backwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
)
from captum._utils.typing import TargetType
from torch import Tensor, nn

from ..core.attention import LayerAttention
from ..core.capture import Capture
from ..core.errors import CaptureError, InputError
from ..core.registry import find_adapter
from ._utils import (
    GradAnchors,
    QueryType,
    check_attribution_inputs,
    padding_mask,
    resolve_model,
    resolve_queries,
    target_scores,
    to_input_layout,
    valid_tokens,
)

GradTo = Literal["none", "output", "block"]


@dataclass
class Run:
    """One captured forward (and backward).

    Attributes
    ----------
    layers : list of LayerAttention
        Every captured layer, in forward order (``output_grad`` set when ``grad_to="output"``).
    queries : (B,) long
        Query position of each example.
    valid : (B, L) bool
        Tokens at or before the query that are not padding.
    mask : (B, L) bool or None
        The padding mask found among the forward arguments.
    block_grads : list of Tensor
        With ``grad_to="block"``: per layer, the gradient at the input of the block that
        contains it (the residual stream), ``(B, L, ...)``.
    """

    layers: list[LayerAttention]
    queries: Tensor
    valid: Tensor
    mask: Tensor | None
    block_grads: list[Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.layers[0].seq_len

    def column_mask(self, attn: LayerAttention) -> Tensor | None:
        """``(B, 1, L)`` in ``attn``'s dtype: zero at padding columns (``None`` without padding)."""
        if self.mask is None or self.mask.shape[1] != attn.seq_len:
            return None
        return self.mask.to(device=attn.device, dtype=attn.dtype)[:, None, :]


class ImplicitAttributionMixin:
    """Constructor, flags and the captured run shared by all implicit-attention attributions.

    Parameters
    ----------
    forward_func : nn.Module or callable
        The model (HF causal LM or classifier, any module with registered layers) or a
        function of the inputs returning scores. Called as
        ``forward_func(*inputs, *additional_forward_args)``.
    model : nn.Module, optional
        The module containing the explained layers, when ``forward_func`` is a plain function.
    """

    #: set on the copy Captum's LLM wrapper makes (see :class:`ImplicitLLMAttribution`)
    _sequence_layout: bool = False
    forward_func: Callable

    def _init_model(self, forward_func: Callable, model: nn.Module | None) -> None:
        self.model = model if model is not None else (forward_func if isinstance(forward_func, nn.Module) else None)
        resolve_model(forward_func, self.model)  # fail early on a plain function without model=

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def has_convergence_delta(self) -> bool:
        return False

    def attribute_future(self) -> Callable:
        raise NotImplementedError(f"attribute_future is not implemented for {type(self).__name__}")

    # ---------------------------------------------------------------- runs
    def _run(
        self,
        inputs: tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: tuple,
        query_position: QueryType,
        grad_to: GradTo = "none",
    ) -> Run:
        model = resolve_model(self.forward_func, self.model)
        check_attribution_inputs(self.forward_func, model, inputs, additional_forward_args)
        mask = padding_mask(self.forward_func, inputs, additional_forward_args)
        anchors = _anchors(model, grad_to)
        with Capture(model, track_grad=grad_to == "output") as cap:
            refuse_unmasked_padding(cap._targets, mask, query_position)
            with anchors if anchors is not None else nullcontext(), torch.set_grad_enabled(grad_to != "none"):
                output = self.forward_func(*inputs, *additional_forward_args)
                layers = cap.layers
                if not layers:
                    raise CaptureError("the forward ran no supported layer")
                block_grads: list[Tensor] = []
                if grad_to != "none":
                    scores = target_scores(output, target, query_position, mask)
                    if grad_to == "output":
                        _backward_to_outputs(scores, cap)
                    else:
                        block_grads = _backward_to_blocks(scores, layers, anchors, model)
        batch, length = layers[0].batch_size, layers[0].seq_len
        for attn in layers:
            if (attn.batch_size, attn.seq_len) != (batch, length):
                raise CaptureError(
                    f"layer {attn.name!r} ran on {(attn.batch_size, attn.seq_len)}, expected {(batch, length)}"
                )
        queries = resolve_queries(query_position, mask, batch, length).to(layers[0].device)
        if mask is not None:
            mask = mask.to(layers[0].device)
        return Run(layers, queries, valid_tokens(queries, mask, length), mask, block_grads)

    def _format(self, relevance: Tensor, inputs: tuple[Tensor, ...], is_tuple: bool) -> Any:
        out = to_input_layout(relevance.detach(), inputs, self._sequence_layout)
        return _format_output(is_tuple, out)


def refuse_unmasked_padding(targets: list, mask: Tensor | None, query_position: QueryType) -> None:
    """Refuse a batch with padding before an example's query when a captured layer's model ignores the padding mask
    (``Adapter.masks_padding``): there the padding tokens act on the tokens after them, and zeroing their columns,
    as the attributions do, would misstate what the model did. ``targets``: the capture's ``(name, module,
    adapter)``; ``mask``: ``(B, L)`` as found among the forward arguments."""
    if mask is None or bool(mask.all()):
        return
    ignoring = [(name, module) for name, module, adapter in targets if not adapter.masks_padding]
    if not ignoring:
        return
    batch, length = mask.shape
    queries = resolve_queries(query_position, mask, batch, length).to(mask.device)
    positions = torch.arange(length, device=mask.device)
    padded = (~mask.bool() & (positions[None, :] < queries[:, None])).any(dim=1)
    if bool(padded.any()):
        name, module = ignoring[0]
        raise InputError(
            f"layer {name!r} ({type(module).__name__}) does not mask padding: its model lets padding tokens act on "
            f"the tokens after them, and example(s) {padded.nonzero().flatten().tolist()} have padding before the "
            "query. Explain those examples without it (one at a time, or padded on the right)"
        )


def layer_maps(
    run: Run,
    start_layer: int,
    layer_map: Callable[[LayerAttention], Tensor],
    first_rows: Callable[[LayerAttention], Tensor] | None = None,
) -> Iterator[Tensor]:
    """Every layer's ``(B, L, L)`` map from ``start_layer`` on, **last first**, padding columns zeroed.

    ``layer_map`` turns one captured layer into its map (e.g. ``aggregate("abs_mean")``); a generator, so
    one map is in memory at a time. With ``first_rows`` (a layer's ``(B, L)`` query rows, e.g. through
    :func:`query_rows`) the first item, the last layer's, is those rows instead of its map
    (:func:`~captum_implicit.attr._rollout.rollout_first_step` needs nothing else).
    """
    if not 0 <= start_layer < len(run.layers):  # checked now, not on the generator's first step
        raise ValueError(f"start_layer={start_layer} out of range for {len(run.layers)} captured layers")

    def maps() -> Iterator[Tensor]:
        for i, attn in enumerate(reversed(run.layers[start_layer:])):
            rows = first_rows is not None and i == 0
            mat = first_rows(attn) if rows else layer_map(attn)
            cols = run.column_mask(attn)
            yield mat if cols is None else mat * (cols[:, 0] if rows else cols)

    return maps()


def prepare(inputs: Any, additional_forward_args: Any) -> tuple[bool, tuple[Tensor, ...], tuple]:
    """``(is_tuple, inputs as tuple, additional_forward_args as tuple)`` (Captum's formatting)."""
    is_tuple = _is_tuple(inputs)
    afa = _format_additional_forward_args(additional_forward_args)
    return is_tuple, _format_tensor_into_tuples(inputs), tuple(afa) if afa is not None else ()


def _layer_names(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if find_adapter(m) is not None}


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def _block_of(model: nn.Module, name: str) -> str:
    """Name of the block containing layer ``name``: its parent module (whose input is the residual
    stream in HF/mamba-ssm models), or the layer itself when the parent is the root or a container."""
    parent = name.rpartition(".")[0]
    if not parent or isinstance(model.get_submodule(parent), _CONTAINERS):
        return name
    return parent


def _anchors(model: nn.Module, grad_to: GradTo) -> GradAnchors | None:
    if grad_to == "none":
        return None
    layers = _layer_names(model)
    if grad_to == "output":
        return GradAnchors(layers)
    blocks = {_block_of(model, n) for n in layers}
    return GradAnchors({b: model.get_submodule(b) for b in sorted(blocks)})


def _backward_to_outputs(scores: Tensor, cap: Capture) -> None:
    """One backward from ``Σ scores`` to every layer output; the capture stores ``output_grad``."""
    tensors, missing = [], []
    for rec in cap.recordings:
        t = rec.output_input
        if t is None or not t.requires_grad:
            missing.append(rec.name)
        else:
            tensors.append(t)
    if missing:
        raise CaptureError(
            f"no differentiable layer output recorded for {missing}; their adapters need an `output_module`"
        )
    torch.autograd.grad(scores.sum(), tensors, allow_unused=True)


def _backward_to_blocks(
    scores: Tensor, layers: list[LayerAttention], anchors: GradAnchors, model: nn.Module
) -> list[Tensor]:
    """One backward from ``Σ scores`` to the input of the block of every layer."""
    picked, seen = [], {}
    for attn in layers:
        k = seen.get(attn.name, 0)
        seen[attn.name] = k + 1
        block = _block_of(model, attn.name)
        recorded = anchors.inputs.get(block, [])
        if len(recorded) <= k:
            raise CaptureError(f"layer {attn.name!r}: the input of its block {block!r} was not recorded")
        picked.append(recorded[k])
    unique = list({id(t): t for t in picked}.values())
    grads = torch.autograd.grad(scores.sum(), unique, allow_unused=True)
    by_id = {id(t): (g if g is not None else torch.zeros_like(t)) for t, g in zip(unique, grads, strict=True)}
    return [by_id[id(t)].detach() for t in picked]


def query_rows(
    attn: LayerAttention,
    queries: Tensor,
    reduce: str | None,
    grad: Tensor | None = None,
    row_fn: Callable | None = None,
) -> Tensor:
    """Each example's query row of ``attn``: ``(B, L)`` reduced, or ``(B, C, L)`` with ``reduce=None``.

    Examples sharing a query position share one blockwise row computation.
    ``row_fn(index) -> (B, C, L)`` replaces ``attn.row`` (e.g. the S6-only rows of Mamba-Attr).
    """
    out: Tensor | None = None
    for q in torch.unique(queries).tolist():
        r = row_fn(q) if row_fn is not None else attn.row(q, reduce=reduce, grad=grad)
        if out is None:
            out = torch.zeros_like(r)
        sel = queries.to(r.device) == q
        out[sel] = r[sel]
    assert out is not None
    return out

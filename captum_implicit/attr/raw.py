"""Raw implicit attention of one layer: its channel-reduced matrix or a query row."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor, nn

from ..core.attention import LayerAttention
from ._base import ImplicitAttributionMixin, prepare, query_rows
from ._utils import QueryType


class ImplicitAttention(ImplicitAttributionMixin, Attribution):
    r"""Raw implicit attention (the "Raw-Attention" baseline of Ali et al. 2024 / Zimerman et al. 2025).

    For the chosen layer, ``reduce_c(A)[q, :]`` — the query row of the channel-reduced exact
    implicit attention (Mamba: with conv, gate, ``D`` skip and padding) — or, with
    ``return_matrix=True``, the whole ``(B, L, L)`` reduced matrix. Padding columns are
    zeroed. The target is accepted for API uniformity and ignored.

    Shapes: the row follows the input layout (token ids ``(B, L)`` → ``(B, L)``; embeddings
    ``(B, L, D)`` → ``(B, L, D)`` spread evenly over ``D``; tensor in → tensor out, tuple in →
    tuple out). The matrix is returned as a ``(B, L, L)`` tensor.

    Cost: one forward; one blockwise row (``O(B·C·L)`` memory) per distinct query position,
    or one blockwise ``aggregate`` (``O(B·L²)``) for the matrix.

    Parameters
    ----------
    forward_func : nn.Module or callable
        The model, or a function of the inputs calling it (then pass ``model=``).
    model : nn.Module, optional
        The module with the explained layers when ``forward_func`` is a plain function.
    """

    def __init__(self, forward_func: Callable, model: nn.Module | None = None) -> None:
        Attribution.__init__(self, forward_func)
        self._init_model(forward_func, model)

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Any = None,
        query_position: QueryType = None,
        layer: int | str = -1,
        reduce: str = "mean",
        return_matrix: bool = False,
    ) -> TensorOrTupleOfTensorsGeneric | Tensor:
        """Row ``q`` (or the matrix) of one layer's reduced implicit attention.

        Parameters
        ----------
        inputs, target, additional_forward_args, query_position
            As for :meth:`ImplicitAttnGrad.attribute` (``target`` is ignored).
        layer : int or str
            Index into the captured layers (forward order; negative from the end) or the
            module's qualified name.
        reduce : str
            Channel reduction (see :meth:`LayerAttention.aggregate`), default ``"mean"`` (signed).
        return_matrix : bool
            Return the ``(B, L, L)`` matrix instead of the query row.
        """
        is_tuple, inputs_t, afa = prepare(inputs, additional_forward_args)
        run = self._run(inputs_t, target, afa, query_position, grad_to="none")
        attn = _select(run.layers, layer)
        cols = run.column_mask(attn)
        with torch.no_grad():
            if return_matrix:
                mat = attn.aggregate(reduce)
                return mat if cols is None else mat * cols
            row = query_rows(attn, run.queries, reduce)
            relevance = row if cols is None else row * cols[:, 0]
        return self._format(relevance, inputs_t, is_tuple)


def _select(layers: list[LayerAttention], layer: int | str) -> LayerAttention:
    if isinstance(layer, str):
        found = [a for a in layers if a.name == layer]
        if not found:
            raise ValueError(f"no captured layer named {layer!r}; captured: {[a.name for a in layers]}")
        return found[0]
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer index {layer} out of range for {len(layers)} captured layers")
    return layers[layer]


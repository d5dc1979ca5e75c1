"""Implicit attention × gradient with rollout (Chefer et al. 2021), and the published UIA pipeline."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from ..core.attention import LayerAttention
from ..ops.blockwise import REDUCTIONS

from ._base import ImplicitAttributionMixin, Run, layer_maps, prepare, query_rows
from ._rollout import rollout_first_step, rollout_row
from ._utils import QueryType, one_hot_rows


class ImplicitAttnGrad(ImplicitAttributionMixin, GradientAttribution):
    r"""Implicit-attention × gradient, rolled out over layers (Chefer, Gur & Wolf, 2021).

    For every captured layer ``l`` (any family: Mamba, Mamba2, RWKV, softmax attention in
    hybrids, ...), with the layer exact as ``y = A @ V + offset``::

        Ā_l = mean_c (A_l ⊙ ∂f/∂A_l)⁺,      ∂f/∂A_l[c, t, s] = ⟨∂f/∂y_l[c, t], V_l[c, s]⟩

    (values held fixed: ``LayerAttention.aggregate("positive_mean", grad=output_grad)``).
    Padding columns are zeroed. The relevance of the query ``q`` is row ``q`` of::

        R = F_n ··· F_s,      F_l = I + Ā_l      (row-normalised if ``row_normalize``)

    carried as a row vector from the last layer down (``r ← r F_l``), so no ``L × L × L``
    product is ever formed. ``row_normalize=True`` is the normalisation of Chefer et al.'s
    released code (``compute_rollout_attention``: ``I`` added, rows normalised, as in Abnar &
    Zuidema); ``False`` gives GAE's ``R ← R + Ā R`` (Chefer et al., ICCV 2021).

    ``method="uia"`` computes instead the published pipeline of Zimerman, Ali & Wolf (ICLR 2025,
    ``generate_ours`` in their code; anchors.md §1.3), documented as published:

    1. ``s_l = minmax_tokens(max_features (∂f/∂h_l)⁺)`` with ``h_l`` the residual stream entering
       the block containing layer ``l``;
    2. ``v_l = minmax_tokens(mean_c (A_l[q, :])⁺ ⊙ s_l)`` (here ``A_l`` is our exact matrix, with
       the ``D`` skip and padding the published code leaves out);
    3. the published "rollout" of these vectors from ``start_layer``: every ``v_l`` is broadcast
       to the rank-1 matrix ``1 v_lᵀ + I``, row-normalised and multiplied; row ``q``, clamped ≥ 0.
       (This rollout is degenerate: the result is dominated by the start layer, anchors.md §1.3.)

    Shapes
    ------
    ``inputs``: token ids ``(B, L)`` → ``(B, L)``; embeddings ``(B, L, D)`` → ``(B, L, D)`` with
    each token's relevance spread evenly over ``D`` (``attr.sum(-1)`` is the token relevance);
    further tuple inputs → zeros of their shape. Tensor in → tensor out, tuple in → tuple out.

    Cost
    ----
    One forward and one backward (from the target score down to the layer outputs only, or
    the block inputs for ``"uia"``; parameters get no ``.grad``). Then per layer one blockwise
    ``aggregate`` — memory ``O(B·L²)`` for ``Ā_l`` (one layer at a time) plus one tile — and one
    ``O(B·L²)`` vector–matrix product; ``"uia"`` needs one blockwise row per layer (``O(B·C·L)``).

    Parameters
    ----------
    forward_func : nn.Module or callable
        HF causal LM (outputs ``(B, L, V)`` logits: ``target`` is a token id read at the query
        position), HF-style classifier (``(B, K)``: ``target`` is a class), any function
        returning ``(B,)`` or ``(B, K)`` scores, or a module containing registered layers.
    model : nn.Module, optional
        The module with the explained layers when ``forward_func`` is a plain function.
    """

    def __init__(self, forward_func: Callable, model: nn.Module | None = None) -> None:
        GradientAttribution.__init__(self, forward_func)
        self._init_model(forward_func, model)

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Any = None,
        query_position: QueryType = None,
        method: Literal["chefer", "uia"] = "chefer",
        start_layer: int = 0,
        row_normalize: bool = True,
        reduce: str = "positive_mean",
        streaming: bool = False,
    ) -> TensorOrTupleOfTensorsGeneric:
        """Relevance of every input token for the target score at the query position.

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            ``(B, L)`` token ids or ``(B, L, D)`` embeddings first; passed to ``forward_func``.
        target : TargetType
            Any Captum target form (int, tuple, list, tensor, None), applied to the scores at the
            query position.
        additional_forward_args : Any
            Appended to the inputs when calling ``forward_func`` (e.g. ``(attention_mask,)``).
        query_position : int, sequence of int or (B,) Tensor, optional
            Explained position(s). Default: the last non-padding token (the padding mask is the
            forward argument named ``attention_mask``/``mask``/``padding_mask``), else the last.
        method : {"chefer", "uia"}
            Attention × gradient rollout, or the published UIA pipeline (see class docstring).
        start_layer : int
            First captured layer entering the rollout (the UIA paper uses 15 of Vim-S's 24).
        row_normalize : bool
            ``"chefer"`` only: row-normalise ``I + Ā_l`` (default) or not (GAE).
        reduce : str
            ``"chefer"`` only: channel reduction of ``A_l ⊙ ∂f/∂A_l`` (see :meth:`LayerAttention.aggregate`).
            ``"positive_mean"`` (default) is Chefer et al.'s positive part; ``"abs_mean"`` keeps evidence carried
            with a negative sign (measured much better on RWKV, docs/evaluation.md).
        streaming : bool
            ``"chefer"`` only: keep one layer's captured factors in memory at a time instead of all of them
            (:mod:`captum_implicit.attr._streaming`): the blocks run under activation checkpointing, and each
            layer is re-run alone from its recorded input, last layer first. Same result, about twice the
            forward cost; for long inputs on large models (e.g. 32k tokens on a 2.8b Mamba on one GPU).

        Returns
        -------
        Tensor or tuple of Tensor
            Shaped like ``inputs`` (see class docstring).
        """
        is_tuple, inputs_t, afa = prepare(inputs, additional_forward_args)
        if method not in ("chefer", "uia"):
            raise ValueError(f"method must be 'chefer' or 'uia', got {method!r}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"unknown reduce {reduce!r}; expected one of {REDUCTIONS}")
        if streaming:
            if method != "chefer":
                raise ValueError("streaming=True is available for method='chefer' only")
            relevance = self._streamed_relevance(
                inputs_t, target, afa, query_position, start_layer, row_normalize, reduce
            )
            return self._format(relevance, inputs_t, is_tuple)
        grad_to = "output" if method == "chefer" else "block"
        run = self._run(inputs_t, target, afa, query_position, grad_to=grad_to)
        with torch.no_grad():
            if method == "chefer":
                relevance = chefer_relevance(run, start_layer, row_normalize, reduce)
            else:
                from .published import published_relevance, uia_vector

                relevance = published_relevance(run, run.layers, run.block_grads, uia_vector, start_layer)
        return self._format(relevance, inputs_t, is_tuple)


    def _streamed_relevance(
        self, inputs: tuple[Tensor, ...], target: TargetType, afa: tuple, query_position: QueryType,
        start_layer: int, row_normalize: bool, reduce: str,
    ) -> Tensor:
        from ._streaming import streamed_run

        with streamed_run(self.forward_func, self.model, inputs, target, afa, query_position) as run, torch.no_grad():
            maps = run.maps(start_layer, *_map_and_rows(run.queries, reduce))
            rows = next(maps)  # the last layer's query rows; their dtype and device start the row
            start = one_hot_rows(run.queries, run.length, rows.dtype, rows.device)
            return rollout_row(rollout_first_step(start, rows, row_normalize), maps, row_normalize)


def _attn_grad(attn: LayerAttention, reduce: str = "positive_mean") -> Tensor:
    return attn.aggregate(reduce, grad=_output_grad(attn))


def _attn_grad_rows(attn: LayerAttention, queries: Tensor, reduce: str = "positive_mean") -> Tensor:
    """Each example's query row of ``Ā`` (``(B, L)``): all that the first layer of a rollout contributes."""
    return query_rows(attn, queries, reduce, _output_grad(attn))


def _output_grad(attn: LayerAttention) -> Tensor:
    return attn.output_grad if attn.output_grad is not None else torch.zeros_like(attn.values)


def _map_and_rows(queries: Tensor, reduce: str) -> tuple[Callable, Callable]:
    """A layer's ``Ā`` and its query rows, as ``layer_map`` and ``first_rows`` of the map generators."""
    rows = functools.partial(_attn_grad_rows, queries=queries, reduce=reduce)
    return functools.partial(_attn_grad, reduce=reduce), rows


def attn_grad_maps(run: Run, start_layer: int, reduce: str = "positive_mean") -> Iterator[Tensor]:
    """``Ā_l`` (``(B, L, L)``, padding columns zeroed) for the layers from ``start_layer``, last first."""

    return layer_maps(run, start_layer, functools.partial(_attn_grad, reduce=reduce))


def chefer_relevance(run: Run, start_layer: int, row_normalize: bool, reduce: str = "positive_mean") -> Tensor:
    """Row ``q`` of ``Π (I + Ā_l)`` for every example, ``(B, L)``."""
    # raises on a bad start_layer before any work; the last layer enters through its query rows alone
    maps = layer_maps(run, start_layer, *_map_and_rows(run.queries, reduce))
    ref = run.layers[0]
    start = one_hot_rows(run.queries, run.length, ref.dtype, ref.device)
    return rollout_row(rollout_first_step(start, next(maps), row_normalize), maps, row_normalize)

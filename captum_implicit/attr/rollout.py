"""Implicit attention rollout (Abnar & Zuidema 2020): forward only, class-agnostic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import Attribution
from captum.log import log_usage
from torch import nn

from ._base import ImplicitAttributionMixin, layer_maps, prepare, query_rows
from ._rollout import rollout_first_step, rollout_row
from ._utils import QueryType, one_hot_rows


class ImplicitAttentionRollout(ImplicitAttributionMixin, Attribution):
    r"""Attention rollout over implicit attention (Abnar & Zuidema, "Quantifying Attention Flow
    in Transformers", ACL 2020).

    Per captured layer (any family, hybrids included) ``M_l = reduce_c(A_l)`` (default
    ``abs_mean``: implicit attention is signed, and rollout needs non-negative rows),
    padding columns zeroed; the identity accounts for the residual connection::

        R = F_n ··· F_s,      F_l = rownorm(I + M_l)

    and the relevance is row ``q`` (the query position), carried as a row vector from the last
    layer down. The target is accepted for API uniformity and ignored (rollout is
    class-agnostic).

    Shapes: token ids ``(B, L)`` → ``(B, L)``; embeddings ``(B, L, D)`` → ``(B, L, D)`` spread
    evenly over ``D``; further tuple inputs → zeros. Rows sum to 1 over the tokens.

    Cost: one forward (no backward); per layer one blockwise ``aggregate`` (memory ``O(B·L²)``,
    one layer at a time) and one ``O(B·L²)`` vector–matrix product.

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
        reduce: str = "abs_mean",
        start_layer: int = 0,
    ) -> TensorOrTupleOfTensorsGeneric:
        """Rollout relevance of every input token for the query position.

        Parameters
        ----------
        inputs, target, additional_forward_args, query_position
            As for :meth:`ImplicitAttnGrad.attribute` (``target`` is ignored).
        reduce : str
            Channel reduction of each layer's matrix (see :meth:`LayerAttention.aggregate`).
            Signed reductions (``"mean"``) can give rows of ``I + M`` summing to 0.
        start_layer : int
            First captured layer entering the rollout.
        """
        is_tuple, inputs_t, afa = prepare(inputs, additional_forward_args)
        run = self._run(inputs_t, target, afa, query_position, grad_to="none")
        # the last layer enters through its query rows alone
        maps = layer_maps(run, start_layer, lambda attn: attn.aggregate(reduce),
                          lambda attn: query_rows(attn, run.queries, reduce))
        with torch.no_grad():
            ref = run.layers[0]
            start = one_hot_rows(run.queries, run.length, ref.dtype, ref.device)
            relevance = rollout_row(rollout_first_step(start, next(maps), True), maps, row_normalize=True)
        return self._format(relevance, inputs_t, is_tuple)


"""Rollout algebra on one query row: vector–matrix products, never matrix–matrix chains.

Matrix rollouts (Abnar & Zuidema 2020; Chefer et al. 2021) multiply per-layer token maps
``M_l`` (``(b, L, L)``, rows = queries, columns = keys)::

    R = F_n · F_{n-1} ··· F_s,      F_l = norm(I + M_l)

and read the query row ``e_qᵀ R``. Carrying the row vector from the last layer down
(``r ← r · F_l``) costs ``O(b·L²)`` per layer instead of ``O(b·L³)``.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


def rollout_step(row: Tensor, attention: Tensor, row_normalize: bool) -> Tensor:
    """``row · F`` with ``F = I + attention``, row-normalised if asked.

    Parameters
    ----------
    row : (b, L)
        Current relevance row (over the outputs of this layer).
    attention : (b, L, L)
        The layer's token map ``M`` (rows = queries).
    row_normalize : bool
        Divide each row of ``I + M`` by its sum (Abnar & Zuidema; Chefer et al. 2021a).

    Returns
    -------
    (b, L)
        ``Σ_j row_j · F[j, :]``.
    """
    if row_normalize:
        row = row / (1.0 + attention.sum(dim=-1))
    return row + (row[:, None, :] @ attention)[:, 0]


def rollout_first_step(start: Tensor, rows: Tensor, row_normalize: bool) -> Tensor:
    """``rollout_step(start, M)`` for one-hot ``start`` rows, from ``M``'s query rows alone.

    A rollout starts from one-hot rows, so its first layer (the last captured) enters only through its query
    rows: computed as rows they cost ``O(C·L·N)`` instead of the whole map's ``O(C·L²·N)``.

    Parameters
    ----------
    start : (b, L)
        One-hot at each example's query position ``q_b``.
    rows : (b, L)
        ``M[b, q_b, :]``.
    row_normalize : bool
        As for :func:`rollout_step`.
    """
    if row_normalize:
        return (start + rows) / (1.0 + rows.sum(dim=-1, keepdim=True))
    return start + rows


def rollout_row(start: Tensor, layers_last_first: Iterable[Tensor], row_normalize: bool) -> Tensor:
    """Query row of ``F_n ··· F_s``: ``start`` (``(b, L)``, one-hot rows) pushed through the layers.

    ``layers_last_first`` yields each layer's ``(b, L, L)`` map, **last layer first** (a generator
    keeps one map in memory at a time).
    """
    row = start
    for attention in layers_last_first:
        row = rollout_step(row, attention, row_normalize)
    return row


def rank_one_rollout_row(start: Tensor, vectors_last_first: Iterable[Tensor]) -> Tensor:
    """The published UIA / Mamba-Attr "rollout" of per-layer *vectors*, on one query row.

    The published ``compute_rollout_attention`` receives ``(b, L)`` vectors ``v_l``; adding
    ``I`` broadcasts each into ``1 v_lᵀ + I`` (every row equals ``v_l + e_j``), which is then
    row-normalised (every row sums to ``1 + Σ v_l``) and multiplied. For a row ``r``::

        r · (1 v_lᵀ + I) / (1 + Σ v_l) = (Σr · v_l + r) / (1 + Σ v_l)

    so each layer costs ``O(b·L)``.
    """
    row = start
    for v in vectors_last_first:
        row = (row.sum(-1, keepdim=True) * v + row) / (1.0 + v.sum(-1, keepdim=True))
    return row

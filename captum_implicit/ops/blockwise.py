"""Blockwise evaluation of a factored implicit attention.

A :class:`~captum_implicit.core.attention.LayerAttention` exposes one primitive,
``block(channels, rows, cols) -> (b, c, r, k)``. Everything a user asks for —
the dense matrix, ``A @ V``, a channel-reduced ``(b, L, L)`` map, one query row,
attention × gradient — is computed here by walking causal tiles, so peak memory is
set by the tile size, never by ``C · L²``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..config import config

if TYPE_CHECKING:
    from ..core.attention import LayerAttention

REDUCTIONS = ("mean", "sum", "abs_mean", "abs_sum", "max_abs", "positive_mean", "positive_sum")


def channel_blocks(
    num_channels: int, per_channel_elements: int, cost_factor: int = 1, device: torch.device | str = "cpu"
) -> Iterator[slice]:
    """Split ``range(num_channels)`` so that one block's tile holds at most the configured number of
    elements (``config.budget(device)``, divided by the family's ``cost_factor``)."""
    budget = max(1, config.budget(device) // max(1, per_channel_elements * cost_factor))
    for start in range(0, num_channels, budget):
        yield slice(start, min(start + budget, num_channels))


def causal_tiles(length: int, tile: int) -> Iterator[tuple[slice, slice]]:
    """Yield ``(rows, cols)`` tiles of the lower triangle (tiles above the diagonal are all zero)."""
    for r0 in range(0, length, tile):
        r1 = min(r0 + tile, length)
        for k0 in range(0, r1, tile):
            yield slice(r0, r1), slice(k0, min(k0 + tile, length))


def _reduce(x: Tensor, reduce: str, inplace: bool = False) -> Tensor:
    """Reduce a ``(b, c, r, k)`` tile over channels into a partial sum / max of shape ``(b, r, k)``.

    ``inplace``: ``x`` is a scratch tile the caller owns (its elementwise step reuses the memory)."""
    if reduce in ("mean", "sum"):
        return x.sum(1)
    if reduce in ("abs_mean", "abs_sum"):
        return (x.abs_() if inplace else x.abs()).sum(1)
    if reduce in ("positive_mean", "positive_sum"):
        return (x.clamp_(min=0) if inplace else x.clamp(min=0)).sum(1)
    if reduce == "max_abs":
        return (x.abs_() if inplace else x.abs()).amax(1)
    raise ValueError(f"unknown reduce {reduce!r}; expected one of {REDUCTIONS}")


def _combine(acc: Tensor, part: Tensor, reduce: str) -> Tensor:
    return torch.maximum(acc, part) if reduce == "max_abs" else acc + part


def _finish(acc: Tensor, reduce: str, num_channels: int) -> Tensor:
    # in place: at 32k tokens the (b, L, L) result is the largest tensor we hold
    return acc.div_(num_channels) if reduce.endswith("mean") else acc


def grad_weight(grad: Tensor, values: Tensor, channels: slice, rows: slice, cols: slice) -> Tensor:
    """``∂f/∂A`` with values held fixed: ``G[b, c, t, s] = Σ_p grad[b, c, t, p] · values[b, c, s, p]``."""
    return grad[:, channels, rows] @ values[:, channels, cols].transpose(-1, -2)


def aggregate(
    attn: LayerAttention,
    reduce: str = "mean",
    grad: Tensor | None = None,
    tile: int | None = None,
) -> Tensor:
    """Channel-reduced implicit attention, ``(b, L, L)``.

    With ``grad`` (``(b, C, L, dv)``, the gradient at the layer output in channel
    layout) the reduced quantity is ``A ⊙ (grad @ valuesᵀ)`` — attention × gradient —
    instead of ``A``.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; expected one of {REDUCTIONS}")
    tile = tile or config.tile
    bsz, nch, length = attn.batch_size, attn.num_channels, attn.seq_len
    out = torch.zeros(bsz, length, length, dtype=attn.dtype, device=attn.device)
    values = attn.values if grad is not None else None
    for rows, cols in causal_tiles(length, tile):
        acc = None
        per_channel = bsz * (rows.stop - rows.start) * (cols.stop - cols.start)
        for ch in channel_blocks(nch, per_channel, attn.cost_factor, attn.device):
            blk = attn.block(ch, rows, cols)
            if grad is not None:  # the fresh ∂f/∂A tile takes the product (no further (b, c, r, k) allocation)
                blk = grad_weight(grad.to(blk.dtype), values.to(blk.dtype), ch, rows, cols).mul_(blk)
            part = _reduce(blk, reduce, inplace=grad is not None)
            acc = part if acc is None else _combine(acc, part, reduce)
        out[:, rows, cols] = acc
    return _finish(out, reduce, nch)


def row(attn: LayerAttention, index: int, reduce: str | None = None, grad: Tensor | None = None) -> Tensor:
    """One query row ``A[:, :, index, :]``: ``(b, C, L)``, or ``(b, L)`` when reduced."""
    bsz, nch, length = attn.batch_size, attn.num_channels, attn.seq_len
    if not -length <= index < length:
        raise IndexError(f"query position {index} out of range for sequence length {length}")
    index = index % length
    rows, cols = slice(index, index + 1), slice(0, index + 1)
    parts = []
    for ch in channel_blocks(nch, bsz * length, getattr(attn, "row_cost_factor", attn.cost_factor), attn.device):
        blk = attn.block(ch, rows, cols)
        if grad is not None:
            blk = blk * grad_weight(grad.to(blk.dtype), attn.values.to(blk.dtype), ch, rows, cols)
        parts.append(blk if reduce is None else _reduce(blk, reduce))
    if reduce is None:
        full = torch.cat(parts, dim=1)[:, :, 0]
    else:
        acc = parts[0]
        for p in parts[1:]:
            acc = _combine(acc, p, reduce)
        full = _finish(acc, reduce, nch)[:, 0]
    pad = torch.zeros(*full.shape[:-1], length - index - 1, dtype=full.dtype, device=full.device)
    return torch.cat([full, pad], dim=-1)


def dense(attn: LayerAttention, channels: Tensor | slice | None = None, tile: int | None = None) -> Tensor:
    """The full per-channel matrix, ``(b, c, L, L)``; memory ``b·c·L²`` by definition."""
    tile = tile or config.tile
    index = _channel_index(attn, channels)
    length = attn.seq_len
    out = torch.zeros(attn.batch_size, len(index), length, length, dtype=attn.dtype, device=attn.device)
    for rows, cols in causal_tiles(length, tile):
        per_channel = attn.batch_size * (rows.stop - rows.start) * (cols.stop - cols.start)
        for ch in channel_blocks(len(index), per_channel, attn.cost_factor, attn.device):
            out[:, ch, rows, cols] = attn.block(index[ch], rows, cols)
    return out


def apply(
    attn: LayerAttention,
    values: Tensor,
    block_fn: Callable[[Tensor | slice, slice, slice], Tensor] | None = None,
    tile: int | None = None,
) -> Tensor:
    """Blockwise ``A @ values`` for ``values`` of shape ``(b, C, L, dv)`` without building ``A``.

    ``block_fn`` defaults to ``attn.block``; families pass their inner kernel to
    compute affine terms with the same machinery.
    """
    tile = tile or config.tile
    block_fn = block_fn or attn.block
    bsz, nch, length = attn.batch_size, attn.num_channels, attn.seq_len
    out = torch.zeros(bsz, nch, length, values.shape[-1], dtype=attn.dtype, device=attn.device)
    values = values.to(attn.dtype)
    for rows, cols in causal_tiles(length, tile):
        per_channel = bsz * (rows.stop - rows.start) * (cols.stop - cols.start)
        for ch in channel_blocks(nch, per_channel, attn.cost_factor, attn.device):
            out[:, ch, rows] += block_fn(ch, rows, cols) @ values[:, ch, cols]
    return out


def _channel_index(attn: LayerAttention, channels: Tensor | slice | int | list[int] | None) -> Tensor:
    all_idx = torch.arange(attn.num_channels, device=attn.device)
    if channels is None:
        return all_idx
    if isinstance(channels, int):
        channels = [channels]
    if isinstance(channels, slice):
        return all_idx[channels]
    idx = torch.as_tensor(channels, device=attn.device, dtype=torch.long)
    if idx.numel() and (idx.min() < -attn.num_channels or idx.max() >= attn.num_channels):
        raise IndexError(f"channel index out of range for {attn.num_channels} channels")
    return all_idx[idx]

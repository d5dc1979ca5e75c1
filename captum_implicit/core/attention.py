"""`LayerAttention`: one explained layer's implicit attention, kept in factored form.

Every supported layer, for the given input, satisfies exactly::

    y[b, c, t, :] = Σ_s A[b, c, t, s] · values[b, c, s, :] + offset[b, c, t, :]

where ``c`` indexes the layer's *channels* (what a channel is depends on the family:
an inner channel for Mamba, a (head, head-dim) pair for Mamba2, ...), ``values``
are the layer's token-wise inputs to the mixing and ``offset`` the affine part
(e.g. what the conv bias contributes). ``y``, rearranged by :meth:`to_output_layout`,
is the tensor that enters the layer's output projection.

``A`` is never stored. A family stores factors (gates, log-space cumulative decays,
B/C factors, conv taps) and implements :meth:`core_block`; the generic
:meth:`block` composes ::

    A = diag(row_scale) · core · diag(col_scale) · T(conv_weight)

and :mod:`captum_implicit.ops.blockwise` walks tiles of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from ..ops import blockwise

Channels = Tensor | slice


class LayerAttention(ABC):
    """Factored implicit attention of one layer for one forward pass.

    Attributes
    ----------
    name : str
        Qualified name of the module in the model (``model.named_modules()``).
    family : str
        Family key, e.g. ``"mamba"``.
    values : Tensor, (b, C, L, dv)
        What ``A`` multiplies.
    row_scale, col_scale : Tensor or None, (b, C, L)
        Data-dependent diagonal scalings left and right of the core kernel
        (output gates, frozen activation slopes, padding masks).
    conv_weight : Tensor or None, (C, K)
        Depthwise causal conv taps applied to the values (rightmost factor ``T``).
    conv_bias : Tensor or None, (C,)
        The conv bias; its contribution ``row ⊙ core (col ⊙ bias)`` is :attr:`offset`.
    output_grad : Tensor or None, (b, C, L, dv)
        Gradient of a scalar at the layer output, in channel layout, once a backward
        pass has run through a capture with ``track_grad=True``.
    """

    family: ClassVar[str] = ""
    #: how many times larger than ``b·c·r·k`` a family's intermediate tile is (e.g. the SSM state size)
    cost_factor: int = 1
    #: the same for the intermediates of one query row (``row()``)
    row_cost_factor: int = 1

    def __init__(
        self,
        name: str,
        values: Tensor,
        row_scale: Tensor | None = None,
        col_scale: Tensor | None = None,
        conv_weight: Tensor | None = None,
        conv_bias: Tensor | None = None,
        module_type: str = "",
    ) -> None:
        self.name = name
        self.module_type = module_type
        self.values = values
        self.row_scale = row_scale
        self.col_scale = col_scale
        self.conv_weight = conv_weight
        self.conv_bias = conv_bias
        self._offset: Tensor | None = None
        self._offset_done = False
        self._output_grad: Tensor | None = None

    # ------------------------------------------------------------------ shape
    @property
    def batch_size(self) -> int:
        return self.values.shape[0]

    @property
    def num_channels(self) -> int:
        return self.values.shape[1]

    @property
    def seq_len(self) -> int:
        return self.values.shape[2]

    @property
    def value_dim(self) -> int:
        return self.values.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, family={self.family!r}, batch={self.batch_size}, "
            f"channels={self.num_channels}, length={self.seq_len}, value_dim={self.value_dim}, dtype={self.dtype})"
        )

    # ------------------------------------------------------------- the kernel
    @abstractmethod
    def core_block(self, channels: Channels, rows: slice, cols: slice) -> Tensor:
        """Tile of the family's core kernel (between the scalings and the conv), ``(b, c, r, k)``.

        Must be zero above the diagonal (``col > row``).
        """

    def block(self, channels: Channels, rows: slice, cols: slice) -> Tensor:
        """Tile ``A[:, channels, rows, cols]``, ``(b, c, r, k)``."""
        length = self.seq_len
        taps = 1 if self.conv_weight is None else self.conv_weight.shape[-1]
        # A is causal, and T needs K-1 columns of halo to the right of the tile
        ext = slice(cols.start, min(cols.stop + taps - 1, rows.stop, length))
        width = cols.stop - cols.start
        if ext.stop <= ext.start:
            nch = _count(channels, self.num_channels)
            shape = (self.batch_size, nch, rows.stop - rows.start, width)
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        core = self.core_block(channels, rows, ext)
        if self.col_scale is not None:
            core = core * self.col_scale[:, channels, None, ext].to(core.dtype)
        if self.conv_weight is not None:
            core = conv_right(core, self.conv_weight[channels].to(core.dtype), width)
        elif core.shape[-1] < width:
            core = torch.nn.functional.pad(core, (0, width - core.shape[-1]))
        if self.row_scale is not None:
            core = core * self.row_scale[:, channels, rows, None].to(core.dtype)
        return core

    # ---------------------------------------------------------- public views
    def dense(self, channels: Tensor | slice | int | list[int] | None = None) -> Tensor:
        """The dense matrix ``(b, c, L, L)`` (all channels unless ``channels`` selects some).

        Memory ``b·c·L²``: only for small inputs or a few channels.
        """
        return blockwise.dense(self, channels)

    @property
    def offset(self) -> Tensor | None:
        """Affine term ``(b, C, L, dv)`` (``None`` when the layer has none)."""
        if not self._offset_done:
            self._offset = self._compute_offset()
            self._offset_done = True
        return self._offset

    def _compute_offset(self) -> Tensor | None:
        if self.conv_bias is None:
            return None
        bias = self.conv_bias.to(self.dtype)[None, :, None].expand(self.batch_size, -1, self.seq_len)
        if self.col_scale is not None:
            bias = bias * self.col_scale.to(self.dtype)
        out = blockwise.apply(self, bias[..., None].expand(-1, -1, -1, self.value_dim), block_fn=self.core_block)
        if self.row_scale is not None:
            out = out * self.row_scale.to(self.dtype)[..., None]
        return out

    def apply(self, values: Tensor | None = None) -> Tensor:
        """``A @ values`` computed block by block, ``(b, C, L, dv)``."""
        return blockwise.apply(self, self.values if values is None else values)

    def output(self) -> Tensor:
        """``A @ values + offset`` in the layout of the tensor entering the output projection."""
        y = self.apply()
        if self.offset is not None:
            y = y + self.offset
        return self.to_output_layout(y)

    def aggregate(self, reduce: str = "mean", grad: Tensor | None = None) -> Tensor:
        """Channel-reduced map ``(b, L, L)``, computed tile by tile.

        Parameters
        ----------
        reduce : {"mean", "sum", "abs_mean", "abs_sum", "max_abs", "positive_mean", "positive_sum"}
        grad : (b, C, L, dv), optional
            If given, reduce ``A ⊙ (grad @ valuesᵀ)`` (attention × gradient) instead of ``A``.
        """
        return blockwise.aggregate(self, reduce, grad)

    def row(self, index: int, reduce: str | None = None, grad: Tensor | None = None) -> Tensor:
        """Query row ``index``: ``(b, C, L)``, or ``(b, L)`` when ``reduce`` is given."""
        return blockwise.row(self, index, reduce, grad)

    # ------------------------------------------------------------- layouts
    def to_output_layout(self, y: Tensor) -> Tensor:
        """Rearrange ``(b, C, L, dv)`` to the layout of the tensor entering the output projection.

        Default: ``dv = 1`` and channels last, ``(b, C, L, 1) -> (b, L, C)`` — what most mixers feed
        their output projection. Families with another layout override this and :meth:`from_output_layout`.
        """
        return y[..., 0].transpose(1, 2)

    def from_output_layout(self, t: Tensor) -> Tensor:
        """Inverse of :meth:`to_output_layout` (used to map output gradients to channels)."""
        return t.transpose(1, 2)[..., None]

    @property
    def output_grad(self) -> Tensor | None:
        return self._output_grad

    def set_output_grad(self, grad_in_output_layout: Tensor) -> None:
        """Store the gradient at the layer output (given in output layout)."""
        g = self.from_output_layout(grad_in_output_layout.to(self.dtype))
        self._output_grad = g if self._output_grad is None else self._output_grad + g


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if the model computes in float64, else float32 (half-precision models are explained in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def conv_right(inner: Tensor, weight: Tensor, width: int) -> Tensor:
    """Right-multiply tiles by depthwise causal conv matrices.

    ``out[..., r] = Σ_j inner[..., r + j] · weight[:, K-1-j]`` (``T[t, t-j] = w[K-1-j]``).

    Parameters
    ----------
    inner : (b, c, rows, width + halo)
        Columns ``[c0, c0 + width + halo)`` of the matrix left of ``T`` (halo ≤ K-1).
    weight : (c, K)
    width : int
        Number of output columns.
    """
    taps = weight.shape[-1]
    have = inner.shape[-1]
    if have < width:
        inner = torch.nn.functional.pad(inner, (0, width - have))
    out = inner[..., :width] * weight[None, :, None, taps - 1 : taps]
    # missing halo columns are zero: each shifted term only touches the columns it reaches (no padded copy),
    # accumulated in place
    for j in range(1, min(taps, have)):
        span = min(width, have - j)
        out[..., :span].addcmul_(inner[..., j : j + span], weight[None, :, None, taps - 1 - j : taps - j])
    return out


def _count(channels: Channels, total: int) -> int:
    if isinstance(channels, slice):
        return len(range(*channels.indices(total)))
    return int(channels.numel())

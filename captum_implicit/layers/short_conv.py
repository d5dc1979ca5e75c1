"""Gated short convolutions (LFM2): exact implicit attention of ``C ⊙ conv(B ⊙ x)``.

Per channel ``c`` (formulas.md §3.9), with ``B, C, x = chunk(in_proj(h), 3)`` and the depthwise
causal conv ``T_c`` (taps ``w_c``, optional bias ``b_c``)::

    y_c = diag(C_c) · (T_c · diag(B_c) · x_c + b_c 1),     A_c[t, s] = C_{t,c} · w_c[K−1−(t−s)] · B_{s,c}

for ``0 ≤ t − s < K``: a banded matrix, not recurrent. ``B`` multiplies the values *before*
the conv, so here the conv is part of the core (``T ⊙ B`` per tile) instead of the generic
rightmost conv factor; ``C`` is the row scale and ``C ⊙ b`` the offset.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.attention import Channels, LayerAttention


class ShortConvAttention(LayerAttention):
    """Implicit attention of a gated short conv.

    Factors: ``values`` ``(b, C, L, 1)`` (``x``); ``write`` ``(b, C, L)`` (``B``); ``taps`` ``(C, K)``;
    ``bias`` ``(C,)`` or None; ``row_scale`` ``(b, C, L)`` (``C``). A tile costs ``O(b·c·r·k)``.
    """

    family = "short_conv"

    def __init__(
        self,
        name: str,
        values: Tensor,
        write: Tensor,
        taps: Tensor,
        bias: Tensor | None,
        row_scale: Tensor,
        module_type: str = "",
    ) -> None:
        super().__init__(name, values, row_scale=row_scale, module_type=module_type)
        self.write = write
        self.taps = taps
        self.bias = bias

    def core_block(self, channels: Channels, rows: slice, cols: slice) -> Tensor:
        width = self.taps.shape[-1]
        lag = (
            torch.arange(rows.start, rows.stop, device=self.device)[:, None]
            - torch.arange(cols.start, cols.stop, device=self.device)[None, :]
        )
        band = (lag >= 0) & (lag < width)
        # T[t, s] = w[K-1-(t-s)] on the band
        index = (width - 1 - lag).clamp(0, width - 1)
        taps = self.taps[channels].to(self.dtype)[:, index] * band.to(self.dtype)  # (c, r, k)
        return taps[None] * self.write[:, channels, None, cols].to(self.dtype)

    def _compute_offset(self) -> Tensor | None:
        if self.bias is None:
            return None
        return (self.row_scale * self.bias.to(self.dtype)[None, :, None])[..., None]


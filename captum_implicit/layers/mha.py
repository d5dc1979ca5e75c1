"""Softmax attention next to token-local channels: mamba-ssm's ``MHA`` with its in-layer gated MLP.

``mamba_ssm.modules.mha.MHA`` with ``mlp_dim > 0`` feeds its output projection
``[context, x_mlp]``: the attention output ``context`` (``H·d`` channels, ``o[:, h] = P_h V_h``)
followed by ``x_mlp = up ⊙ SiLU(gate)`` (``M = mlp_dim / 2`` channels) computed from the same
token only. Both halves are exact as ``y = A @ values + offset``::

    c < H·d :  A_c = P_{h(c)},  values_c = V (the values SDPA got, repeated over grouped heads)
    c ≥ H·d :  A_c = I,         values_c = x_mlp[:, c − H·d]

so every row of ``A_c`` sums to one on both halves (a channel-mean stays row-stochastic) and the
MLP half is read as "each token attends only to itself"; ``offset`` holds only the future part of
non-causal attention rows (see :mod:`~captum_implicit.layers.softmax`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.attention import Channels
from .softmax import SoftmaxAttention


class LocalChannelsSoftmaxAttention(SoftmaxAttention):
    """:class:`SoftmaxAttention` whose last channels are token-local (identity rows).

    Parameters
    ----------
    values : (b, H·d + M, L, 1)
        Attention values (channel ``h·d + j``) then the ``M`` token-local values.
    probs : (b, H, L, L)
    attn_channels : int
        ``H·d``, the number of attention channels.
    """

    def __init__(self, name: str, values: Tensor, probs: Tensor, attn_channels: int, module_type: str = "") -> None:
        super().__init__(name, values[:, :attn_channels], probs, module_type=module_type)
        self.attn_channels = attn_channels
        self.values = values
        if self.future is not None:  # (b, H·d, L, 1): the local channels have no future part
            self.future = F.pad(self.future, (0, 0, 0, 0, 0, values.shape[1] - attn_channels))

    def core_block(self, channels: Channels, rows: slice, cols: slice) -> Tensor:
        index = torch.arange(self.num_channels, device=self.device)[channels]
        local = index >= self.attn_channels
        heads = index.clamp(max=self.attn_channels - 1) // self.head_dim_v
        tile = self.probs[:, :, rows, cols][:, heads].to(self.dtype)
        if bool(local.any()):
            r = torch.arange(rows.start, rows.stop, device=self.device)
            c = torch.arange(cols.start, cols.start + tile.shape[-1], device=self.device)
            eye = (r[:, None] == c[None, :]).to(self.dtype)
            tile = torch.where(local[None, :, None, None], eye, tile)
        return tile

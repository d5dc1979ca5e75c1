"""MiniMax lightning attention: exact implicit attention of a decayed (ALiBi-like) linear attention.

Per head ``h`` (formulas.md §3.8), with ``q, k, v = split(SiLU(qkv_proj(x)))`` (padding rows
zeroed) and slope ``λ_h``::

    A_h[t, s] = (q_t · k_s) · exp(−λ_h (t − s))      (s ≤ t; no 1/√d, no normalisation)
    out       = out_proj(σ(output_gate(x)) ⊙ RMSNorm(A v))

The RMSNorm runs over all ``H·d`` channels at once, so channels are the (head, head dim)
pairs and ``w_c · rsqrt(mean(o_t²) + eps) · σ(gate_{t,c})`` (RMS frozen) is the row scale.
The decay is formed from the index difference ``t − s ≥ 0``, so it never overflows; a tile
costs one ``(r × d)·(d × k)`` matmul per head and nothing is stored beyond q, k, v.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.attention import Channels, LayerAttention


class LightningAttention(LayerAttention):
    """Implicit attention of a ``MiniMaxLightningAttention`` layer.

    Factors: ``query``, ``key`` ``(b, H, L, d)``; ``slope`` ``(H,)``; ``values`` ``(b, H·d, L, 1)``;
    ``row_scale`` ``(b, H·d, L)``.
    """

    family = "lightning"

    def __init__(
        self,
        name: str,
        values: Tensor,
        query: Tensor,
        key: Tensor,
        slope: Tensor,
        row_scale: Tensor | None,
        module_type: str = "",
    ) -> None:
        super().__init__(name, values, row_scale=row_scale, module_type=module_type)
        self.query = query
        self.key = key
        self.slope = slope
        self.head_dim_v = values.shape[1] // query.shape[1]

    def core_block(self, channels: Channels, rows: slice, cols: slice) -> Tensor:
        heads = torch.arange(self.num_channels, device=self.device)[channels] // self.head_dim_v
        unique, inverse = torch.unique(heads, return_inverse=True)
        scores = self.query[:, unique, rows] @ self.key[:, unique, cols].transpose(-1, -2)
        lag = (
            torch.arange(rows.start, rows.stop, device=self.device)[:, None]
            - torch.arange(cols.start, cols.stop, device=self.device)[None, :]
        ).to(scores.dtype)
        expo = (-self.slope[unique].to(scores.dtype)[:, None, None] * lag).masked_fill(lag < 0, float("-inf"))
        return (scores * torch.exp(expo))[:, inverse]



def build_lightning_attention(
    name: str,
    *,
    qkv: Tensor,
    num_heads: int,
    slope: Tensor,
    attn_out: Tensor,
    norm_weight: Tensor,
    norm_eps: float,
    gate_preact: Tensor,
    module_type: str = "",
) -> LightningAttention:
    """Assemble :class:`LightningAttention`.

    Parameters
    ----------
    qkv : (b, L, H·3d)
        ``SiLU(qkv_proj(x))`` after the padding mask (per head ``[q, k, v]``).
    slope : (H,) ; attn_out : (b, L, H·d)
        The attention output as the RMSNorm received it (its RMS is frozen).
    norm_weight : (H·d,) ; gate_preact : (b, L, H·d)
    """
    dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    bsz, length = qkv.shape[:2]
    q, k, v = qkv.to(dtype).reshape(bsz, length, num_heads, -1).chunk(3, dim=-1)
    d = v.shape[-1]
    values = v.permute(0, 2, 3, 1).reshape(bsz, num_heads * d, length)[..., None]
    o32 = attn_out.to(torch.float32)  # MiniMaxRMSNorm reduces in float32
    rms = torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + norm_eps).to(dtype)
    scale = norm_weight.to(dtype) * rms * torch.sigmoid(gate_preact.to(dtype))
    return LightningAttention(
        name=name,
        values=values,
        query=q.transpose(1, 2).contiguous(),
        key=k.transpose(1, 2).contiguous(),
        slope=slope.to(dtype),
        row_scale=scale.transpose(1, 2),
        module_type=module_type,
    )

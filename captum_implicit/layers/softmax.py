"""Softmax attention (the attention layers of hybrids), so every token-mixing layer has a matrix.

Per head ``h``, with the probabilities ``P_h = softmax(q kᵀ·scale + mask)`` exactly as the
model's eager attention computed them and ``V`` repeated over grouped query heads::

    o[:, h] = P_h V_h,     A_c = diag(gate_c) · P_{h(c)}      (c = (head, head dim) pair)

``gate`` is the optional output gate some models apply before the output projection
(Qwen3-Next: ``σ(gate)``). Memory: the probabilities ``(b, H, L, L)`` the model already
materialised; tiles are slices of them.

Fully masked query rows (left-padding positions) are not causal in the model: eager attention
gives them a uniform row over *all* keys, future ones included. ``A`` must be causal (tiles above
the diagonal are never visited, so ``dense``/``aggregate`` would otherwise depend on the tile size and
``output()`` would lose that mass once ``L`` exceeds a tile), so the part above the diagonal,
``Σ_{s>t} P[t, s] v_s`` — non-zero only on such pad rows — is the layer's :attr:`offset` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.attention import Channels, LayerAttention


class SoftmaxAttention(LayerAttention):
    """Implicit attention of a softmax attention layer.

    Factors: ``probs`` ``(b, H, L, L)``; ``values`` ``(b, H·d, L, 1)``; ``row_scale`` ``(b, H·d, L)`` or None.
    """

    family = "softmax"

    def __init__(
        self, name: str, values: Tensor, probs: Tensor, row_scale: Tensor | None = None, module_type: str = ""
    ) -> None:
        super().__init__(name, values, row_scale=row_scale, module_type=module_type)
        self.head_dim_v = values.shape[1] // probs.shape[1]
        future = probs.triu(1)
        self.future: Tensor | None = None  # (b, C, L, 1): Σ_{s>t} P[t, s] v_s, only when some row has future mass
        if bool(future.any()):
            bsz, heads, length = probs.shape[:3]
            v = values[..., 0].reshape(bsz, heads, self.head_dim_v, length)
            self.future = torch.einsum("bhts,bhds->bhdt", future.to(self.dtype), v).reshape(bsz, -1, length)[..., None]
            probs = probs.tril()
        self.probs = probs

    def _compute_offset(self) -> Tensor | None:
        if self.future is None:
            return None
        return self.future if self.row_scale is None else self.future * self.row_scale.to(self.dtype)[..., None]

    def core_block(self, channels: Channels, rows: slice, cols: slice) -> Tensor:
        heads = torch.arange(self.num_channels, device=self.device)[channels] // self.head_dim_v
        return self.probs[:, :, rows, cols][:, heads].to(self.dtype)



def build_softmax_attention(
    name: str, *, probs: Tensor, value: Tensor, gate: Tensor | None = None, module_type: str = ""
) -> SoftmaxAttention:
    """Assemble :class:`SoftmaxAttention`.

    Parameters
    ----------
    probs : (b, H, L, L)
        Attention probabilities (after mask and softmax, as eager attention returns them).
    value : (b, Hkv, L, d)
        Value states before ``repeat_kv``.
    gate : (b, L, H·d), optional
        Multiplicative output gate (already activated) applied before the output projection.
    """
    if probs.shape[-1] != probs.shape[-2]:
        raise ValueError(
            f"{name}: queries ({probs.shape[-2]}) and keys ({probs.shape[-1]}) differ in length — the layer "
            "attended to a cache; explain the full sequence with use_cache=False"
        )
    bsz, heads, length = probs.shape[:3]
    value = value.repeat_interleave(heads // value.shape[1], dim=1)  # repeat_kv: head h reads kv head h // n_rep
    dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    values = value.to(dtype).permute(0, 1, 3, 2).reshape(bsz, -1, length)[..., None]
    row_scale = None if gate is None else gate.to(dtype).transpose(1, 2)
    return SoftmaxAttention(name, values, probs, row_scale, module_type)

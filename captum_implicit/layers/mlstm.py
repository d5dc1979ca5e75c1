"""xLSTM mLSTM: exact implicit attention including the normaliser, per-head LayerNorm and output gate.

Per head (formulas.md §3.5), with ``F_t = Σ_{j≤t} logσ(f_j)``, zero initial state (``m₀ = 0``)::

    logD[t, s] = F_t − F_s + i_s  (s ≤ t),      m_t = max(F_t, max_{s≤t} logD[t, s])
    W[t, s]    = exp(logD[t, s] − m_t) · (q_t·k_s) / √dqk
    A[t, s]    = W[t, s] / (max(|Σ_s W[t, s]|, exp(−m_t)) + eps),          h = A v

The chunkwise kernel and the recurrent steps it uses for the remainder compute the same
``m_t`` (both unroll to the formula above), so one formula covers the chunk+recurrent split.

The per-head LayerNorm ``w ⊙ (h − mean_j h)/σ + b`` becomes linear with ``σ`` frozen, and
since all value channels of a head share ``A``, the centering commutes with it:
``h − mean_j h = A (v − mean_j v)``. So, with channels the (head, value dim) pairs::

    y_c = σ(o_c) ⊙ (w_c/σ_h) ⊙ (A_h (v_c − mean_{c'∈h} v_{c'})) + σ(o_c) ⊙ b_c

i.e. ``values`` are the per-head *centered* values, ``row_scale = σ(o)·w/σ`` and the offset
is ``σ(o)·b``.

Numerics: with ``u_t = F_t − m_t`` and ``w_s = i_s − F_s`` the exponent is ``u_t + w_s ≤ 0``.
Tiles below the diagonal factorise through ``M_p = max_{s≤p} w_s`` at the pivot ``p = r0 − 1``:
``exp(u_t + M_p) · exp(w_s − M_p)``, both factors ≤ 1, so nothing overflows however long the
input. The row denominators are one ``O(L²·dqk)`` pass per head, stored as ``(b, H, L)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.attention import Channels, LayerAttention


class MLSTMAttention(LayerAttention):
    """Implicit attention of an mLSTM layer.

    Factors (``b`` batch, ``H`` heads, ``L`` tokens, ``dqk``, ``dv`` head dims), float64 except ``values``:

    * ``query`` (scaled by ``dqk^−½``), ``key`` ``(b, H, L, dqk)``;
    * ``u`` ``(b, H, L)`` = ``F_t − m_t``; ``w`` ``(b, H, L)`` = ``i_s − F_s``; ``w_max`` its running max;
    * ``inv_den`` ``(b, H, L)`` — ``1 / (max(|Σ_s W|, exp(−m)) + eps)`` (0 where that overflows);
    * ``values`` ``(b, H·dv, L, 1)`` centered per head; ``row_scale`` ``(b, H·dv, L)``;
      ``bias_term`` ``(b, H·dv, L)`` or None — ``σ(o)·b``.

    Cost of an ``(r × k)`` tile: one ``(r × dqk)·(dqk × k)`` matmul per head.
    """

    family = "mlstm"

    def __init__(
        self,
        name: str,
        values: Tensor,
        query: Tensor,
        key: Tensor,
        log_forget: Tensor,
        log_input: Tensor,
        eps: float,
        row_scale: Tensor | None,
        bias_term: Tensor | None,
        module_type: str = "",
    ) -> None:
        super().__init__(name, values, row_scale=row_scale, module_type=module_type)
        self.query = query
        self.key = key
        cum = torch.cumsum(log_forget.to(torch.float64), dim=-1)
        self.w = log_input.to(torch.float64) - cum
        self.w_max = torch.cummax(self.w, dim=-1).values
        self.u = -self.w_max.clamp(min=0)  # F_t − m_t, with m_t = F_t + max(0, max_{s≤t} w_s)
        self.eps = eps
        self.bias_term = bias_term
        self.head_dim_v = values.shape[1] // query.shape[1]
        # the stabiliser m_t = F_t − u_t; exp(−m_t) may overflow (then the row is 0, as in the model)
        floor = torch.exp(-(cum - self.u))
        self.inv_den = 1.0 / (self._row_sums().abs().maximum(floor) + eps)

    def _weights(self, heads: Tensor | slice, rows: slice, cols: slice) -> Tensor:
        """Unnormalised ``W[:, heads, rows, cols]`` in float64, ``(b, h, r, k)``."""
        r0, r1, k0, k1 = rows.start, rows.stop, cols.start, cols.stop
        q = self.query[:, heads, r0:r1]
        out = q.new_zeros(*q.shape[:2], r1 - r0, k1 - k0)
        split = min(max(r0, k0), k1)
        if split > k0:  # columns before the first row: pivot p = r0 − 1
            pivot = self.w_max[:, heads, r0 - 1, None]
            left = q * torch.exp(self.u[:, heads, r0:r1] + pivot)[..., None]
            right = self.key[:, heads, k0:split] * torch.exp(self.w[:, heads, k0:split] - pivot)[..., None]
            out[..., : split - k0] = left @ right.transpose(-1, -2)
        if split < k1:
            expo = self.u[:, heads, r0:r1, None] + self.w[:, heads, None, split:k1]
            causal = torch.arange(r0, r1, device=q.device)[:, None] >= torch.arange(split, k1, device=q.device)
            expo = expo.masked_fill(~causal, float("-inf"))
            out[..., split - k0 :] = (q @ self.key[:, heads, split:k1].transpose(-1, -2)) * torch.exp(expo)
        return out

    def _row_sums(self, chunk: int = 64) -> Tensor:
        length = self.query.shape[2]
        heads = slice(None)
        sums = [
            self._weights(heads, slice(r0, min(r0 + chunk, length)), slice(0, min(r0 + chunk, length))).sum(-1)
            for r0 in range(0, length, chunk)
        ]
        return torch.cat(sums, dim=-1)

    def core_block(self, channels: Channels, rows: slice, cols: slice) -> Tensor:
        heads = torch.arange(self.num_channels, device=self.device)[channels] // self.head_dim_v
        unique, inverse = torch.unique(heads, return_inverse=True)
        tile = self._weights(unique, rows, cols) * self.inv_den[:, unique, rows, None]
        return tile[:, inverse].to(self.dtype)

    def _compute_offset(self) -> Tensor | None:
        return None if self.bias_term is None else self.bias_term[..., None].to(self.dtype)



def build_mlstm_attention(
    name: str,
    *,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    igate: Tensor,
    fgate: Tensor,
    eps: float,
    norm_input: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm_eps: float,
    norm_float32: bool,
    ogate_preact: Tensor,
    module_type: str = "",
) -> MLSTMAttention:
    """Assemble :class:`MLSTMAttention` from the backend's inputs, the norm's input and the o-gate.

    Parameters
    ----------
    query, key : (b, H, L, dqk)
    value : (b, H, L, dv)
    igate, fgate : (b, H, L)
        Soft-capped gate pre-activations, as passed to the backend.
    norm_input : (b, L, H, dv)
        The backend output ``h`` as the multi-head LayerNorm received it.
    norm_weight, norm_bias : (H·dv,) or None
    ogate_preact : (b, L, H·dv)
    """
    dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    bsz, nh, length, dv = value.shape
    q = query.to(torch.float64) * query.shape[-1] ** -0.5
    centered = value.to(dtype) - value.to(dtype).mean(-1, keepdim=True)
    values = centered.permute(0, 1, 3, 2).reshape(bsz, nh * dv, length)[..., None]

    h = norm_input.float() if norm_float32 else norm_input
    inv_std = torch.rsqrt(h.var(-1, keepdim=True, unbiased=False) + norm_eps).to(dtype)  # (b, L, H, 1), frozen
    gate = torch.sigmoid(ogate_preact.to(dtype)).reshape(bsz, length, nh, dv)
    scale = gate * inv_std
    if norm_weight is not None:
        scale = scale * norm_weight.to(dtype).reshape(nh, dv)
    row_scale = scale.reshape(bsz, length, nh * dv).transpose(1, 2)
    bias_term = None
    if norm_bias is not None:
        bias_term = (gate * norm_bias.to(dtype).reshape(nh, dv)).reshape(bsz, length, nh * dv).transpose(1, 2)
    return MLSTMAttention(
        name=name,
        values=values,
        query=q,
        key=key.to(torch.float64),
        log_forget=F.logsigmoid(fgate.to(torch.float64)),
        log_input=igate.to(torch.float64),
        eps=eps,
        row_scale=row_scale,
        bias_term=bias_term,
        module_type=module_type,
    )

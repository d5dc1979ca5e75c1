"""RWKV-4 family: the WKV time mix as an exact token-to-token implicit attention.

Per attention channel ``c`` (HF ``RwkvSelfAttention``; formulas.md §3.3), with
``w = −exp(time_decay)`` and ``u = time_first``::

    e_c[t, s] = (t−1−s)·w_c + k_{s,c}   (s < t);   u_c + k_{t,c}   (s = t);   −∞ (s > t)
    A_c       = row-softmax(e_c)                       (rows sum to 1)
    wkv_c     = A_c v_c,        out = output(σ(r) ⊙ wkv)

The value ``v`` already mixes each token with the previous one (the *token shift*):
``v_s = value(μ_v⊙x_s) + value((1−μ_v)⊙x_{s−1}) = v_cur_s + v_prev_{s−1}`` with ``x`` the
attention block's input (the ``ln1`` output). So the map on tokens is ::

    (σ(r) ⊙ wkv)_c = diag(σ(r_c)) [ A_c v_cur_c + (A_c S) v_prev_c ],   (A_c S)[t, s] = A_c[t, s+1]

**Channel layout (a choice).** The ``A`` attention channels are doubled: channel ``c``
(``0 ≤ c < A``) is ``diag(σ(r_c)) A_c`` acting on ``v_cur_c``, channel ``A + c`` is
``diag(σ(r_c)) A_c S`` acting on ``v_prev_c``. :meth:`~RwkvAttention.output` sums the two
halves. Both groups are maps *from the token whose hidden state the value was computed
from* to the output token, so every reduction over channels (``aggregate``, ``row``) is a
token-to-token map of the block input: ``aggregate("sum")`` is ``Σ_c diag(σ(r_c))(A_c + A_c S)``;
``"mean"`` divides by the ``2A`` channels. With the shift dropped (``A_c`` alone on the
post-shift ``v``) the map is exact on ``v`` but mis-attributes the previous-token half
(0.55 relative error on a tiny model, formulas.md §3.0).

**Stability.** ``A_c[t, s] = exp(e_c[t, s] − lse_t)``: the row log-normaliser ``lse`` is
computed once in float64 by a chunked log-sum-exp scan whose exponents are exact integer
multiples of ``w`` (never ``t·w − s·w``, which cancels for long ``L``); tiles then only
exponentiate non-positive numbers, so nothing overflows however large the keys (the
published code uses ``exp(k)`` directly and returns inf/NaN once a key exceeds ≈ 88).

Numerics mirrored from HF: the WKV kernels use ``key.float()`` (also for a float64
model), so the keys are rounded to float32 before entering the exponents.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.attention import Channels, LayerAttention, compute_dtype


def wkv_log_normaliser(keys: Tensor, decay: Tensor, bonus: Tensor, chunk: int = 64) -> Tensor:
    """Row log-normalisers of the WKV softmax, stably for any length.

    ``lse[b, c, t] = log( Σ_{s<t} exp((t−1−s)·w_c + k_{s,c}) + exp(u_c + k_{t,c}) )``.

    Within a chunk of ``n ≤ chunk`` tokens the in-chunk part is a masked log-sum-exp over
    exact exponents ``(j−1−i)·w + k``; a sequential log-space carry over chunks adds the
    earlier tokens (``P_{c0+n} = logaddexp(P_{c0} + n·w, …)``).

    Parameters
    ----------
    keys : (b, C, L) float64
    decay : (C,) float64
        ``w = −exp(time_decay)`` (≤ 0).
    bonus : (C,) float64
        ``u = time_first``.
    chunk : int
        Chunk length; memory ``O(b·C·L·chunk)``, ``⌈L/chunk⌉`` sequential steps of ``O(b·C)``.

    Returns
    -------
    (b, C, L) float64
    """
    bsz, nch, length = keys.shape
    n = max(1, min(chunk, length))
    nchunks = -(-length // n)
    pad = nchunks * n - length
    k = torch.nn.functional.pad(keys, (0, pad), value=float("-inf")) if pad else keys
    k = k.reshape(bsz, nch, nchunks, n)
    j = torch.arange(n, device=keys.device, dtype=keys.dtype)
    w = decay[None, :, None, None]
    lag = j[:, None] - 1 - j[None, :]  # (n, n): [j, i] = j − 1 − i
    expo = k[..., None, :] + lag * w[..., None]  # (b, C, nchunks, j, i)
    expo = expo.masked_fill(lag < 0, float("-inf"))  # only i < j
    inner = torch.logsumexp(expo, dim=-1)  # (b, C, nchunks, n): log Σ_{i<j} exp((j−1−i)w + k_i)
    total = torch.logsumexp(k + (n - 1 - j) * w, dim=-1)  # (b, C, nchunks): the whole chunk, seen at its end
    carry = torch.full((bsz, nch), float("-inf"), dtype=keys.dtype, device=keys.device)
    starts = []
    for ci in range(nchunks):  # P at each chunk start: a log-space linear recurrence over chunks
        starts.append(carry)
        carry = torch.logaddexp(carry + n * decay, total[:, :, ci])
    start = torch.stack(starts, dim=2)  # (b, C, nchunks)
    before = torch.logaddexp(start[..., None] + j * w, inner)  # log Σ_{s<t}
    before = before.reshape(bsz, nch, nchunks * n)[..., :length]
    return torch.logaddexp(before, bonus[None, :, None] + keys)


class RwkvAttention(LayerAttention):
    """Implicit attention of an RWKV-4 time mix, token shift folded in (``2A`` channels, see module doc).

    Factors (``b`` batch, ``A`` attention channels, ``L`` tokens):

    * ``keys`` ``(b, A, L)`` float64 — the keys as the WKV kernel used them;
    * ``decay`` ``(A,)``, ``bonus`` ``(A,)`` float64 — ``w = −exp(time_decay)``, ``u = time_first``;
    * ``lse`` ``(b, A, L)`` float64 — row log-normalisers (:func:`wkv_log_normaliser`);
    * ``row_scale`` ``(b, 2A, L)`` — ``σ(r)`` for both channel groups;
    * ``values`` ``(b, 2A, L, 1)`` — ``[v_cur, v_prev]``.

    Cost of one ``(r × k)`` tile: ``O(b·c·(r+k))`` exponentials below the diagonal (the
    tile is rank one there), ``O(b·c·r·k)`` where it touches the diagonal.
    """

    family = "rwkv"

    def __init__(
        self,
        name: str,
        values: Tensor,
        keys: Tensor,
        decay: Tensor,
        bonus: Tensor,
        lse: Tensor,
        row_scale: Tensor,
        module_type: str = "",
    ) -> None:
        super().__init__(name, values, row_scale=row_scale, module_type=module_type)
        self.keys = keys
        self.decay = decay
        self.bonus = bonus
        self.lse = lse

    @property
    def attention_channels(self) -> int:
        """``A``: the number of attention channels (half of :attr:`num_channels`)."""
        return self.keys.shape[1]

    # ------------------------------------------------------------ the kernel
    def core_block(self, channels: Channels, rows: slice, cols: slice) -> Tensor:
        half = self.attention_channels
        if isinstance(channels, slice):
            start, stop, step = channels.indices(self.num_channels)
            if step == 1 and stop <= half:
                return self._group_tile(slice(start, stop), rows, cols, shift=0)
            if step == 1 and start >= half:
                return self._group_tile(slice(start - half, stop - half), rows, cols, shift=1)
            channels = torch.arange(start, stop, step, device=self.device)
        index = channels.to(self.device)
        out = torch.zeros(
            self.batch_size, index.numel(), rows.stop - rows.start, cols.stop - cols.start,
            dtype=self.dtype, device=self.device,
        )
        for shift in (0, 1):
            sel = (index >= half) if shift else (index < half)
            if bool(sel.any()):
                out[:, sel] = self._group_tile(index[sel] - shift * half, rows, cols, shift)
        return out

    def _group_tile(self, base: Channels, rows: slice, cols: slice, shift: int) -> Tensor:
        """Tile of ``A_c`` (``shift=0``) or ``A_c S`` (``shift=1``: column ``s`` is ``A_c``'s column ``s+1``)."""
        if not shift:
            return self._softmax_tile(base, rows, cols)
        length = self.seq_len
        src = slice(min(cols.start + 1, length), min(cols.stop + 1, length))
        tile = self._softmax_tile(base, rows, src)
        width = cols.stop - cols.start
        if tile.shape[-1] < width:
            tile = torch.nn.functional.pad(tile, (0, width - tile.shape[-1]))
        return tile

    def _softmax_tile(self, base: Channels, rows: slice, cols: slice) -> Tensor:
        """``A_c[t, s] = exp(e_c[t, s] − lse_t)`` on a tile, ``(b, c, r, k)``; exponents in float64."""
        r0, r1, k0, k1 = rows.start, rows.stop, cols.start, cols.stop
        keys, lse = self.keys[:, base], self.lse[:, base]
        w, u = self.decay[base][None, :, None], self.bonus[base][None, :, None]
        out = torch.zeros(keys.shape[0], keys.shape[1], r1 - r0, max(k1 - k0, 0), dtype=self.dtype, device=self.device)
        if k1 <= k0 or k0 >= r1:  # empty, or entirely above the diagonal
            return out
        f64 = dict(dtype=torch.float64, device=self.device)
        split = min(max(r0, k0), k1)
        if split > k0:
            # columns left of every row: e[t, s] = (t−r0)·w + [(r0−1−s)·w + k_s], a rank-one tile.
            # Column factor relative to its max m, row factor (t−r0)w + m − lse_t = e[t, s*] − lse_t ≤ 0:
            # both exponents are ≤ 0, so neither factor overflows.
            s = torch.arange(k0, split, **f64)
            col = (r0 - 1 - s) * w + keys[:, :, k0:split]  # (b, c, k')
            top = col.amax(dim=-1, keepdim=True)
            t = torch.arange(r0, r1, **f64)
            row = (t - r0) * w + top - lse[:, :, r0:r1]  # (b, c, r)
            out[..., : split - k0] = torch.exp(row).to(self.dtype)[..., None] * torch.exp(col - top).to(self.dtype)[
                ..., None, :
            ]
        if split < k1:  # columns inside the rows' range: masked, elementwise
            t = torch.arange(r0, r1, **f64)[:, None]
            s = torch.arange(split, k1, **f64)[None, :]
            expo = (t - 1 - s) * w[..., None] + keys[:, :, None, split:k1]
            diag = keys[:, :, r0:r1, None] + u[..., None]  # u + k_t, used where s = t
            expo = torch.where(s == t, diag, expo).masked_fill(s > t, float("-inf"))
            out[..., split - k0 :] = torch.exp(expo - lse[:, :, r0:r1, None]).to(self.dtype)
        return out

    # ------------------------------------------------------------- layouts
    def to_output_layout(self, y: Tensor) -> Tensor:
        half = self.attention_channels
        return (y[:, :half] + y[:, half:])[..., 0].transpose(1, 2)  # (b, 2A, L, 1) -> (b, L, A) = σ(r) ⊙ wkv

    def from_output_layout(self, t: Tensor) -> Tensor:
        g = t.transpose(1, 2)[..., None]
        return torch.cat([g, g], dim=1)  # both channel groups feed the same output channel



def build_rwkv_attention(
    name: str,
    *,
    key: Tensor,
    value_current: Tensor,
    value_previous: Tensor,
    receptance: Tensor,
    time_decay: Tensor,
    time_first: Tensor,
    module_type: str = "",
) -> RwkvAttention:
    """Assemble :class:`RwkvAttention`.

    Parameters
    ----------
    key : (b, L, A)
        The keys the WKV kernel received (rounded to float32 here, as the kernels do).
    value_current, value_previous : (b, L, A)
        ``value(μ_v ⊙ x)`` and ``value((1 − μ_v) ⊙ x)`` of the block input ``x``
        (the kernel's value is ``v_cur_s + v_prev_{s−1}``).
    receptance : (b, L, A)
        ``σ(receptance(·))``, the row gate.
    time_decay, time_first : (A,)
        Raw parameters; ``w = −exp(time_decay)`` is taken in the parameter's dtype, as HF does.
    """
    key, value_current, value_previous, receptance = (
        t.detach() for t in (key, value_current, value_previous, receptance)
    )
    time_decay, time_first = time_decay.detach(), time_first.detach()
    dtype = compute_dtype(value_current, value_previous)
    keys = key.float().to(torch.float64).transpose(1, 2).contiguous()
    decay = (-torch.exp(time_decay)).to(torch.float64)
    bonus = time_first.to(torch.float64, copy=True)
    lse = wkv_log_normaliser(keys, decay, bonus)
    values = torch.cat([value_current, value_previous], dim=-1).to(dtype).transpose(1, 2)[..., None]
    gate = receptance.to(dtype).transpose(1, 2)
    return RwkvAttention(
        name=name,
        values=values.contiguous(),
        keys=keys,
        decay=decay,
        bonus=bonus,
        lse=lse,
        row_scale=torch.cat([gate, gate], dim=1).contiguous(),
        module_type=module_type,
    )

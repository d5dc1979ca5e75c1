"""Numerically stable decay kernels (torch reference).

Every gated-linear layer has token-to-token factors of the form
``exp(Σ_{r=s+1..t} ℓ_r)`` with per-step log-decays ``ℓ ≤ 0``. We never divide
cumulative products (they underflow to 0/0) and never exponentiate a difference
of two long float32 cumulative sums (cancellation). Instead:

* cumulative sums are kept in float64 (``cum``), so ``cum_t - cum_s`` is exact to
  ~1e-16 relative to ``|cum|`` even at 32k tokens;
* tiles that lie strictly below the diagonal are factorised through a pivot
  ``p`` with ``s ≤ p < t``: ``exp(a(cum_t-cum_p)) * exp(a(cum_p-cum_s))`` — both
  exponents are ≤ 0, so nothing overflows and the tile becomes a small matmul;
* tiles that touch the diagonal use the masked form (``-inf`` above the diagonal
  *before* ``exp``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def segsum(log_decay: Tensor) -> Tensor:
    """Masked-cumsum segment sums.

    Parameters
    ----------
    log_decay : (..., L)
        Per-step log-decays ``ℓ``.

    Returns
    -------
    (..., L, L)
        ``out[..., t, s] = Σ_{r=s+1..t} ℓ_r`` for ``s ≤ t`` and ``-inf`` above the diagonal.
    """
    length = log_decay.shape[-1]
    x = log_decay[..., None].expand(*log_decay.shape, length)  # x[t, s] = ℓ_t
    strictly_lower = torch.ones(length, length, dtype=torch.bool, device=log_decay.device).tril(-1)
    x = x.masked_fill(~strictly_lower, 0.0)
    out = torch.cumsum(x, dim=-2)
    lower = torch.ones(length, length, dtype=torch.bool, device=log_decay.device).tril(0)
    return out.masked_fill(~lower, float("-inf"))


#: rows per chunk on the diagonal; the masked elementwise part costs O(chunk) per row
DIAGONAL_CHUNK = 32


def diagonal_ssm_tile(
    cum: Tensor,
    rate: Tensor,
    c_at: Callable[[slice], Tensor],
    b_at: Callable[[slice], Tensor],
    rows: slice,
    cols: slice,
    out_dtype: torch.dtype,
) -> Tensor:
    """One tile of a diagonal selective-SSM kernel.

    ``α[t, s] = Σ_n C[t, n] · exp(rate[n] · (cum_t − cum_s)) · B[s, n]`` for ``s ≤ t``,
    0 above the diagonal (Mamba: ``rate = A[d]``, ``cum = cumsum Δ[d]``,
    ``B = Δ_s B_s``).

    Parameters
    ----------
    cum : (b, c, L) float64
        Cumulative sum of the per-step time scale (``Δ``), per channel.
    rate : (c, N)
        Non-positive decay rates.
    c_at : callable, ``slice -> (b, c | 1, len, N)``
        Read-out factor ``C`` at the given positions (may broadcast over channels).
    b_at : callable, ``slice -> (b, c, len, N)``
        Write factor ``B̄`` (already multiplied by ``Δ_s``) at the given positions.
    rows, cols : slice
        Row (query ``t``) and column (key ``s``) ranges of the tile.
    out_dtype : torch.dtype
        Dtype of the returned tile (float32 or float64).

    Returns
    -------
    (b, c, len(rows), len(cols))

    Cost: ``O(b·c·N·(r+k))`` exponentials and one batched ``(r×N)·(N×k)`` matmul per
    channel for tiles strictly below the diagonal; ``O(b·c·N·r·k)`` exponentials for
    the part touching it.
    """
    r0, r1 = rows.start, rows.stop
    k0, k1 = cols.start, cols.stop
    bsz, nch = cum.shape[0], cum.shape[1]
    if r0 < k1 and k0 < r1 and r1 - r0 >= 2 * SSM_CHUNK:
        # tiles crossing the diagonal; a tile entirely left of it needs one pivot (one matmul) below
        return _chunked_ssm_tile(cum, rate, c_at, b_at, rows, cols, out_dtype, SSM_CHUNK)
    out = torch.zeros(bsz, nch, r1 - r0, k1 - k0, dtype=out_dtype, device=cum.device)
    if k0 >= r1:  # entirely above the diagonal
        return out
    rate64 = rate.to(torch.float64)[None, :, None, :]
    # Walk the rows in chunks; for each chunk, columns left of it factorise through the pivot just before
    # the chunk (both exponents ≤ 0, a rank-N matmul), and only the chunk's own diagonal square needs the
    # masked elementwise form. This keeps the O(r·k·N) exponentials to O(r·DIAGONAL_CHUNK·N).
    for a0 in range(r0, r1, DIAGONAL_CHUNK if k1 > r0 else r1 - r0):
        a1 = min(a0 + DIAGONAL_CHUNK, r1) if k1 > r0 else r1
        chunk = slice(a0, a1)
        c_rows = c_at(chunk).to(out_dtype)
        split = min(max(a0, k0), k1)
        if split > k0:
            left_cols = slice(k0, split)
            pivot = cum[:, :, a0 - 1, None]
            left = c_rows * torch.exp((cum[:, :, chunk] - pivot)[..., None] * rate64).to(out_dtype)
            right = b_at(left_cols).to(out_dtype) * torch.exp(
                (pivot - cum[:, :, left_cols])[..., None] * rate64
            ).to(out_dtype)
            out[:, :, a0 - r0 : a1 - r0, : split - k0] = left @ right.transpose(-1, -2)
        stop = min(a1, k1)
        if split < stop:  # the chunk's diagonal square: masked, elementwise
            diag_cols = slice(split, stop)
            diff = cum[:, :, chunk, None] - cum[:, :, None, diag_cols]  # (b, c, r', k')
            t_idx = torch.arange(a0, a1, device=cum.device)[:, None]
            s_idx = torch.arange(split, stop, device=cum.device)[None, :]
            expo = diff[..., None] * rate64[:, :, None]  # (b, c, r', k', N)
            expo = expo.masked_fill(~(s_idx <= t_idx)[..., None], float("-inf"))
            decay = torch.exp(expo).to(out_dtype)
            out[:, :, a0 - r0 : a1 - r0, split - k0 : stop - k0] = torch.einsum(
                "bcrn,bcrkn,bckn->bcrk", c_rows.expand(bsz, nch, -1, -1), decay, b_at(diag_cols).to(out_dtype)
            )
    return out


#: chunk side of :func:`_chunked_ssm_tile` (tiles with at least two chunks of rows take that path)
SSM_CHUNK = 8


def _chunked_ssm_tile(
    cum: Tensor,
    rate: Tensor,
    c_at: Callable[[slice], Tensor],
    b_at: Callable[[slice], Tensor],
    rows: slice,
    cols: slice,
    out_dtype: torch.dtype,
    chunk: int,
) -> Tensor:
    """:func:`diagonal_ssm_tile` with every chunk-to-chunk decay factorised through chunk pivots.

    Rows and columns are cut into chunks of ``chunk`` positions on one grid (aligned at
    ``rows.start``; the column grid extends to the left of it). With ``P_i`` the position before
    row chunk ``i`` and ``Q_j`` the last position of column chunk ``j < i`` (so ``s ≤ Q_j ≤ P_i < t``)::

        exp(a(cum_t − cum_s)) = exp(a(cum_t − cum_Pi)) · exp(a(cum_Pi − cum_Qj)) · exp(a(cum_Qj − cum_s))

    — three exponents ≤ 0 (no overflow), each a float64 difference (no cancellation). The whole
    off-diagonal part is then one batched rank-``N`` matmul, and only the ``chunk × chunk``
    squares on the diagonal use the masked elementwise form. Exponentials:
    ``O(b·c·N·(r + k + r·chunk + (r/chunk)·(k/chunk)))`` instead of
    :func:`diagonal_ssm_tile`'s per-row-chunk ``O(b·c·N·r·k/32 + r·32)``; no Python loop.
    """
    r0, r1 = rows.start, rows.stop
    k0, k1 = cols.start, cols.stop
    kk1 = min(k1, r1)  # columns at or right of r1 are above the diagonal: zero
    length = cum.shape[-1]
    device = cum.device
    bsz, nch = cum.shape[0], cum.shape[1]
    n_i = -(-(r1 - r0) // chunk)
    j_lo = (k0 - r0) // chunk  # column chunk index (relative to r0) of column k0; may be negative
    n_j = -(-(kk1 - r0) // chunk) - j_lo
    g0 = r0 + j_lo * chunk  # first grid column (may precede 0: padding)
    rate64 = rate.to(torch.float64)[None, :, None, None, :]  # (1, c, 1, 1, N)

    def clamp_pos(start: int, count: int) -> Tensor:
        return torch.arange(start, start + count, device=device).clamp_(0, length - 1)

    # positions on the grid; padding rows / columns get zero C / B̄ and any in-range cum (finite exponents ≤ 0)
    cum_r = cum[:, :, clamp_pos(r0, n_i * chunk)].view(bsz, nch, n_i, chunk)
    cum_c = cum[:, :, clamp_pos(g0, n_j * chunk)].view(bsz, nch, n_j, chunk)
    cum_p = cum[:, :, clamp_pos(r0 - 1, n_i * chunk)[::chunk]]  # P_i = r0 + i·chunk − 1
    cum_q = cum[:, :, clamp_pos(g0 + chunk - 1, n_j * chunk)[::chunk]]  # Q_j = g0 + (j+1)·chunk − 1
    c_rows = c_at(slice(r0, r1)).to(out_dtype)
    c_rows = torch.nn.functional.pad(c_rows, (0, 0, 0, n_i * chunk - (r1 - r0)))
    c_rows = c_rows.view(bsz, c_rows.shape[1], n_i, chunk, -1)
    b_cols = b_at(slice(k0, kk1)).to(out_dtype)
    b_cols = torch.nn.functional.pad(b_cols, (0, 0, k0 - g0, g0 + n_j * chunk - kk1))
    b_cols = b_cols.view(bsz, nch, n_j, chunk, -1)

    left = c_rows * torch.exp((cum_r - cum_p[..., None])[..., None] * rate64).to(out_dtype)  # (b, c, I, d, N)
    right = b_cols * torch.exp((cum_q[..., None] - cum_c)[..., None] * rate64).to(out_dtype)  # (b, c, J, d, N)
    # chunk-to-chunk decays, only for column chunks strictly left of the row chunk
    below = (torch.arange(n_j, device=device) + j_lo)[None, :] < torch.arange(n_i, device=device)[:, None]
    inter = (cum_p[..., :, None] - cum_q[..., None, :])[..., None] * rate64  # (b, c, I, J, N)
    inter = torch.exp(inter.masked_fill(~below[..., None], float("-inf"))).to(out_dtype)
    scaled = (inter[..., None, :] * right[:, :, None]).flatten(3, 4)  # (b, c, I, J·d, N)
    out = left @ scaled.transpose(-1, -2)  # (b, c, I, d, J·d)

    # the diagonal squares (row chunk i, column chunk i − j_lo): masked, elementwise
    d_lo, d_hi = max(0, j_lo), min(n_i, j_lo + n_j)
    if d_lo < d_hi:
        diag_i = torch.arange(d_lo, d_hi, device=device)
        diag_j = diag_i - j_lo
        tri = torch.ones(chunk, chunk, dtype=torch.bool, device=device).tril_()
        expo = (cum_r[:, :, diag_i, :, None] - cum_c[:, :, diag_j, None, :])[..., None] * rate64[:, :, None]
        decay = torch.exp(expo.masked_fill_(~tri[..., None], float("-inf"))).to(out_dtype)  # (b, c, D, d, d, N)
        cr = c_rows[:, :, diag_i].expand(bsz, nch, -1, -1, -1)
        blocks = torch.einsum("bcitn,bcitsn,bcisn->bcits", cr, decay, b_cols[:, :, diag_j])
        view = out.view(bsz, nch, n_i, chunk, n_j, chunk).diagonal(offset=-j_lo, dim1=2, dim2=4)  # (b, c, d, d, D)
        view += blocks.permute(0, 1, 3, 4, 2)

    out = out.view(bsz, nch, n_i * chunk, n_j * chunk)[:, :, : r1 - r0, k0 - g0 : kk1 - g0]
    if kk1 < k1:
        out = torch.nn.functional.pad(out, (0, k1 - kk1))
    return out


def scalar_decay_reference(log_decay: Tensor) -> Tensor:
    """Naive reference of :func:`scalar_decay_tile`: the full ``exp(seg(ℓ))``, ``(..., L, L)``."""
    return torch.exp(segsum(log_decay))


def scalar_decay_tile(cum: Tensor, rows: slice, cols: slice, out_dtype: torch.dtype) -> Tensor:
    """One tile of a scalar (per head) decay matrix ``exp(cum_t − cum_s)`` for ``s ≤ t``, 0 above.

    Used by SSD / Mamba2, whose decay is one scalar per head and token
    (``ℓ = A_h · Δ_{t,h}``), so a tile is an outer product away from the diagonal.

    Parameters
    ----------
    cum : (..., L) float64
        Cumulative sum of the per-step log-decays ``ℓ ≤ 0`` (non-increasing).
    rows, cols : slice
        Query (``t``) and key (``s``) ranges of the tile.
    out_dtype : torch.dtype

    Returns
    -------
    (..., len(rows), len(cols))

    Columns left of the first row are factorised through the pivot ``p = rows.start − 1``
    (``exp(cum_t − cum_p) · exp(cum_p − cum_s)``, both exponents ≤ 0: ``r + k``
    exponentials, no overflow); columns inside the rows' range use the masked form
    (``−inf`` above the diagonal before ``exp``).
    """
    r0, r1 = rows.start, rows.stop
    k0, k1 = cols.start, cols.stop
    out = torch.zeros(*cum.shape[:-1], r1 - r0, k1 - k0, dtype=out_dtype, device=cum.device)
    if k0 >= r1:
        return out
    split = min(max(r0, k0), k1)
    if split > k0:
        pivot = cum[..., r0 - 1, None]
        left = torch.exp(cum[..., r0:r1] - pivot)
        right = torch.exp(pivot - cum[..., k0:split])
        out[..., : split - k0] = (left[..., :, None] * right[..., None, :]).to(out_dtype)
    if split < k1:
        diff = cum[..., r0:r1, None] - cum[..., None, split:k1]
        t_idx = torch.arange(r0, r1, device=cum.device)[:, None]
        s_idx = torch.arange(split, k1, device=cum.device)[None, :]
        out[..., split - k0 :] = torch.exp(diff.masked_fill(s_idx > t_idx, float("-inf"))).to(out_dtype)
    return out

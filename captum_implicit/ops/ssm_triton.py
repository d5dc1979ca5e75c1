"""Triton kernels for the diagonal selective-SSM (Mamba) implicit attention: dense tiles and channel reductions.

The torch reference is :func:`captum_implicit.ops.decay.diagonal_ssm_tile` walked by
:mod:`captum_implicit.ops.blockwise`; these kernels compute the same quantities, per layer (and chunk of channels)
one launch of :func:`_factor_kernel` and one or two of :func:`_ssm_kernel` (far tiles apart, see :data:`SEPARATE_FAR`):

* ``dense``: ``A[b, c, t, s]`` for all channels (every tile written once, zeros above the diagonal);
* ``aggregate``: ``Σ_c f(λ_t · A[b, c, t, s] · ρ_s)`` with ``f`` ∈ {identity, abs, positive part} or
  ``max_c |·|`` — with ``λ = ∂f/∂y`` and ``ρ = values`` this is attention × gradient (``Ā`` of
  ``ImplicitAttnGrad``), with ``λ = ρ = 1`` the plain channel reduction.

Per channel ``c`` (head ``h``) the matrix is, with ``T`` the causal depthwise conv (taps ``w``)::

    A[t, s] = row_t · Σ_j w_{K-1-j} · core[t, s+j] · col_{s+j}
    core[t, s'] = Σ_n C[t, n] · exp(a_n (cum_t − cum_{s'})) · B[s', n] · Δ_{s'}  +  D · [t = s']    (s' ≤ t)

Tiles left of a row block ``I`` (rows ``[I·BT, I·BT + BT)``, pivot ``p = I·BT − 1``, ``cum_{−1} = 0``) are one
rank-``N`` product of factors precomputed once per layer (:func:`_factor_kernel`; its torch reference
:func:`_factors`), each pivoted inside its own block so every exponent is ≤ 0:
``Q[t, n] = λ_t C[t, n] e^{a_n (cum_t − cum_p)}`` and
``K'[s, n] = ρ_s Σ_j w_{K-1-j} col_{s+j} B̄[s+j, n] e^{a_n (cum_q − cum_{s+j})}`` (``q`` the last conv-halo
position of ``s``'s block), joined by ``e^{a_n (cum_p − cum_q)} ≤ 1``. The two tiles touching the row block
(the diagonal, and its left neighbour whose conv halo reaches it) are causal per tap, ``s + j ≤ t``: the same
product of ``Q`` and ``K'`` where every tap is, the causal taps alone on the ``K − 1`` diagonals below the main
one (:data:`NEAR_FROM_FACTORS`); they use the row block's pivot when ``max |a| · (cum-span of a block and its
halo)`` stays below :data:`MAX_EXPONENT` (float32 overflows at 88.7), and otherwise one exponential per entry and state
(``e^{a_n (cum_t − cum_{s+j})}``, exponent ≤ 0), which needs no bound — only in the row blocks that fail the
bound, so that a Δ spike costs only its own block (:data:`MIXED_NEAR_FORMS`, at :data:`MIXED_BLOCK`;
:func:`_near_forms`). The reductions' far tiles may be larger than the near ones (:data:`WIDE_FAR_BLOCK`).
Differences of cumulative sums are taken in float64, the rest in float32 (``tl.dot`` as three TF32 products that
recover float32 accuracy, see :data:`PRODUCT`), accumulation in float32.

The far-tile loop has opt-in variants for ``benchmarks/sweep_kernel.py`` (:data:`FAR_PRODUCT` ``"fused"``,
:data:`FAR_UNROLL`, :data:`SEPARATE_FAR`, :data:`OVERLAP_NEAR`, :data:`WIDE_FAR_WARPS`);
``benchmarks/kernel_resources.py`` shows their registers, spills and shared memory on sm_90 without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import config

try:  # triton comes with CUDA builds of torch; the package works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

#: largest ``|a| · Δ-span`` over one row block (+ conv halo) that the factorisation accepts
MAX_EXPONENT = 80.0
BLOCK = 64
#: precision of the rank-N products: "ieee" (float32 FMAs) or "tf32x3" (tensor cores, three TF32 products
#: recovering float32 accuracy)
PRODUCT = "tf32x3"
NUM_WARPS = 4
#: far tiles: "split" loads the right factor pre-split into TF32 high and low parts (three TF32 products, the B
#: operands straight from memory, software-pipelined over channels); "fused" does the same
#: three products as ONE TF32 product of contraction 4·N (left operand interleaved in registers, right operand
#: interleaved in memory, 4x the size of the split parts); "register" applies ``PRODUCT`` to factors held in
#: registers
FAR_PRODUCT = "split"
#: far tiles: channels per loop iteration (1 or 2; 2 gives the scheduler two independent product chains)
FAR_UNROLL = 1
#: far tiles in a launch of their own, the other tiles in a second one: each compiles only its own loop, so the
#: far loop's register allocation (hence occupancy) is not that of the tiles next to the diagonal. ``None``: two
#: launches for the reductions, one for dense (H200, 130m layer: Ā at L = 4096 0.041 s instead of 0.048 s;
#: ``dense()`` at L = 1024 0.0086 s instead of 0.0083 s; benchmarks/sweep_kernel.py)
SEPARATE_FAR: bool | None = None
#: with separate launches on CUDA, run the launch of the tiles next to the diagonal (few programs, each long) on a
#: side stream, first, concurrently with the far launch (the tiles are disjoint), as the single launch overlapped them
OVERLAP_NEAR = False
#: the pivoted form of the tiles next to the diagonal from the far tiles' precomputed factors: one product of ``Q``
#: and ``K'`` (every tap) where all taps are causal, and the ``K − 1`` diagonals below the main one (where some taps
#: are not) from the causal taps, one exponential per row, state and offset (:func:`_near_tile_factored`); False:
#: one product per tap, each masked (:func:`_near_tile_pivoted`; 255 registers and 40 B spilled against 168 and
#: none, sm_90). H200, 130m layer at L = 4096: the near launch 5.0 → 2.8 ms, Ā 0.0141 → 0.0118 s
NEAR_FROM_FACTORS = True
#: software-pipelining stages of the channel loop
NUM_STAGES = 4
#: channels per program in dense mode (each writes its own tiles; more per program amortises the setup)
DENSE_CHANNELS = 16
#: always use the per-entry form next to the diagonal (tests)
FORCE_NEAR_EXACT = False
#: where the pivoted form's bound fails somewhere, take the per-entry form only in the row blocks that fail it (per
#: batch row and channel) instead of in the whole layer (False: one channel's Δ spike sends the whole layer to the
#: slower form). H200, session 7: ``dense()`` of HF's random-init 130m-sized layer at L = 1024 0.0145-0.0160 s, not
#: 0.0220 s (benchmarks/bench_matrix.py)
MIXED_NEAR_FORMS = True
#: the row block of the tiles next to the diagonal where the pivoted form fails at every candidate block, so that
#: some or all of them take the per-entry form (capped by BLOCK, at least 16). H200, session 9, HF's random-init
#: 130m-sized layer (Δ spikes: 44 % of its (channel, row block)s fail the bound at 64, 28 % at 32): at 64 the near
#: launch holding both forms spills (255 registers, ≈ 200 B a thread) and takes 16.6 ms of Ā at L = 2048; at 32,
#: 6.7 ms without spills (Ā 0.0192 → 0.0107 s; dense() at L = 1024 0.0109 → 0.0070 s)
MIXED_BLOCK = 32
#: the reductions' far tiles at this block size when the tiles next to the diagonal need a smaller one (their
#: pivoted form's bound fails at BLOCK; far tiles need no bound): fewer, larger tile products over the bulk of the
#: matrix, at the cost of a second factor set (peak memory of Ā about twice). ``None``: every tile at the near tiles'
#: block. Not for ``dense()``, which is bound by writing its output. H200, session 7, the 130m layer whose near
#: tiles need 32 (benchmarks/sweep_kernel.py): Ā at L = 4096 0.0223-0.0237 s at 128 (8 warps), 0.0283-0.0297 s at 64,
#: 0.0306-0.0309 s without; dense at L = 1024 0.0054 s without, 0.0063 s at 64. A layer whose near tiles pass at
#: 64: 0.021 s at 128 against 0.026 s without
WIDE_FAR_BLOCK: int | None = 128
#: warps of the launch of the wide far tiles (``None``: :data:`NUM_WARPS`): a 128-tile's accumulator and product
#: take 248 registers a thread at 8 warps; at 4 they spill 744 B a thread (sm_90), Ā 0.0263 s instead of 0.0237 s
WIDE_FAR_WARPS: int | None = 8
#: elements of one precomputed factor tensor per launch (channels are processed in chunks of this size)
FACTOR_ELEMENTS = 1 << 28
#: build the factors with :func:`_factor_kernel` (False: the torch reference :func:`_factors`, which makes a dozen
#: passes over ``(b, c, L, N)`` tensors)
FACTOR_KERNEL = True
#: positions per program of the factor kernel
FACTOR_ROWS = 64
#: programs per multiprocessor to aim for when splitting the channel reduction into partial-sum groups (H200, Ā
#: of a 130m layer at L = 4096: 16 gave 2 groups and 7.05 waves of the 128-tile far launch, whose last wave is
#: nearly empty, 15.8 ms; 24 gives 3 groups, 10.6 waves, 14.6 ms; 40 and 56 no better)
PROGRAMS_PER_SM = 24
#: programs to aim for in all (``None``: :data:`PROGRAMS_PER_SM` times the GPU's multiprocessors)
PROGRAMS: int | None = None
MODES = {"dense": 0, "sum": 1, "abs": 2, "positive": 3, "max_abs": 4}
FAR_CODES = {"register": 0, "split": 1, "fused": 2}


def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device`` (CUDA, or any device under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device.type == "cuda"


if triton is not None:

    @triton.jit
    def _emit(acc, m, ptrs, mask, MODE: tl.constexpr):
        """Dense mode: store the channel's tile; otherwise fold it into the channel reduction."""
        if MODE == 0:
            tl.store(ptrs, m, mask=mask)
        elif MODE == 1:
            acc += m
        elif MODE == 2:
            acc += tl.abs(m)
        elif MODE == 3:
            acc += tl.maximum(m, 0.0)
        else:
            acc = tl.maximum(acc, tl.abs(m))
        return acc

    @triton.jit
    def _tile_ptrs(out_ptr, b, c, offs_t, offs_s, s_ob, s_oc, s_ot):
        """Output addresses of the tile of ``c``: a channel (dense mode) or a channel group (the reductions)."""
        # 64-bit offsets: a dense (b, C, L, L) output passes 2^31 entries from C·L² on (1536 channels at L = 1182)
        base = out_ptr + (b.to(tl.int64) * s_ob + c.to(tl.int64) * s_oc)
        return base + offs_t[:, None].to(tl.int64) * s_ot + offs_s[None, :]

    @triton.jit
    def _tf32_high(x):
        """``x`` truncated to TF32 (10 mantissa bits): exactly representable, so a TF32 product keeps it."""
        return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)

    @triton.jit
    def _near_tile_pivoted(
        q_ptr, cum_ptr, rate_ptr, write_ptr, ws_ptr, skip_ptr, lsc_ptr, col_ptr, w_ptr,
        base_bc, base_bh, base_q, c, pivot, offs_t, offs_s, offs_n, mask_t, mask_n, L, N,
        N_P: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
        HAS_SKIP: tl.constexpr, HAS_LSC: tl.constexpr, HAS_COL: tl.constexpr, PRODUCT: tl.constexpr,
    ):
        """A tile touching the row block, through the row block's pivot (needs the exponent bound); λ included."""
        rate = tl.load(rate_ptr + c * N + offs_n, mask=mask_n, other=0.0)
        cum_p = tl.load(cum_ptr + base_bc + pivot, mask=pivot >= 0, other=0.0)
        q = tl.load(q_ptr + (base_q + offs_t[:, None]) * N_P + offs_n[None, :], mask=mask_t[:, None], other=0.0)
        m = tl.zeros((BT, BS), dtype=tl.float32)
        if HAS_SKIP:
            d = tl.load(skip_ptr + c)
            if HAS_LSC:
                d_row = d * tl.load(lsc_ptr + base_bc + offs_t, mask=mask_t, other=0.0)
            else:
                d_row = d + tl.zeros((BT,), dtype=tl.float32)
        for j in tl.static_range(K):
            s_j = offs_s + j
            m_j = s_j < L
            cum_s = tl.load(cum_ptr + base_bc + s_j, mask=m_j, other=0.0)
            ds = tl.where(m_j, (cum_p - cum_s).to(tl.float32), 0.0)
            scale = tl.load(ws_ptr + base_bc + s_j, mask=m_j, other=0.0)
            tap = tl.load(w_ptr + c * K + (K - 1 - j))
            if HAS_COL:
                col = tl.load(col_ptr + base_bc + s_j, mask=m_j, other=0.0) * tap
            else:
                col = tap + tl.zeros((BS,), dtype=tl.float32)
            kj = tl.load(
                write_ptr + (base_bh + s_j[:, None]) * N + offs_n[None, :],
                mask=m_j[:, None] & mask_n[None, :], other=0.0,
            )
            kj = kj * tl.exp(ds[:, None] * rate[None, :]) * (scale * col)[:, None]
            part = tl.dot(q, tl.trans(kj), input_precision=PRODUCT)
            m += tl.where(s_j[None, :] <= offs_t[:, None], part, 0.0)
            if HAS_SKIP:
                m += tl.where(s_j[None, :] == offs_t[:, None], d_row[:, None] * col[None, :], 0.0)
        return m

    @triton.jit
    def _near_tile_exact(
        cum_ptr, rate_ptr, read_ptr, write_ptr, ws_ptr, skip_ptr, lsc_ptr, col_ptr, w_ptr,
        base_bc, base_bh, c, offs_t, offs_s, mask_t, L, N,
        N_P: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
        HAS_SKIP: tl.constexpr, HAS_LSC: tl.constexpr, HAS_COL: tl.constexpr,
    ):
        """A tile touching the row block with one exponential per entry and state (``e^{a (cum_t − cum_s)}``,
        exponent ≤ 0 on the causal part): no bound needed, used where the pivoted form's bound fails; λ included."""
        cum_t = tl.load(cum_ptr + base_bc + offs_t, mask=mask_t, other=0.0)
        m = tl.zeros((BT, BS), dtype=tl.float32)
        if HAS_SKIP:
            d = tl.load(skip_ptr + c)
        for j in tl.static_range(K):
            s_j = offs_s + j
            m_j = s_j < L
            cum_s = tl.load(cum_ptr + base_bc + s_j, mask=m_j, other=0.0)
            causal = (s_j[None, :] <= offs_t[:, None]) & m_j[None, :] & mask_t[:, None]
            diff = tl.where(causal, (cum_t[:, None] - cum_s[None, :]).to(tl.float32), 0.0)
            scale = tl.load(ws_ptr + base_bc + s_j, mask=m_j, other=0.0)
            tap = tl.load(w_ptr + c * K + (K - 1 - j))
            if HAS_COL:
                col = tl.load(col_ptr + base_bc + s_j, mask=m_j, other=0.0) * tap
            else:
                col = tap + tl.zeros((BS,), dtype=tl.float32)
            part = tl.zeros((BT, BS), dtype=tl.float32)
            # a loop, not unrolled: 16 states x K taps of unrolled tiles made ptxas fall back to 32 registers and
            # spill 34 KB a thread (sm_90, Triton 3.8); the states are independent, unrolling gains nothing
            for n in range(N):
                rate_n = tl.load(rate_ptr + c * N + n)
                c_n = tl.load(read_ptr + (base_bh + offs_t) * N + n, mask=mask_t, other=0.0)
                b_n = tl.load(write_ptr + (base_bh + s_j) * N + n, mask=m_j, other=0.0)
                part += c_n[:, None] * tl.exp(diff * rate_n) * b_n[None, :]
            m += tl.where(causal, part * (scale * col)[None, :], 0.0)
            if HAS_SKIP:
                m += tl.where(s_j[None, :] == offs_t[:, None], d * col[None, :], 0.0)
        if HAS_LSC:
            m = m * tl.load(lsc_ptr + base_bc + offs_t, mask=mask_t, other=0.0)[:, None]
        return m

    @triton.jit
    def _far_tile(
        q_ptr, k_ptr, kh_ptr, kl_ptr, kf_ptr, cum_ptr, rate_ptr,
        b, c, lc, c_count, pivot, col_pivot, offs_t, offs_s, offs_n, mask_t, mask_s, mask_n, L, C, N,
        N_P: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, PRODUCT: tl.constexpr, FAR: tl.constexpr,
    ):
        """A tile left of the row block and of its conv halo: one rank-N product of the precomputed factors
        (λ and ρ included). ``FAR``: 0 "register", 1 "split", 2 "fused" (see :data:`FAR_PRODUCT`)."""
        base_bc = (b * C + c).to(tl.int64) * L
        base_q = (b * c_count + lc) * L  # < 2^28 / N_P: channels come in chunks of FACTOR_ELEMENTS
        rate = tl.load(rate_ptr + c * N + offs_n, mask=mask_n, other=0.0)
        cum_p = tl.load(cum_ptr + base_bc + pivot, mask=pivot >= 0, other=0.0)
        q = tl.load(q_ptr + (base_q + offs_t[:, None]) * N_P + offs_n[None, :], mask=mask_t[:, None], other=0.0)
        # K'[s] carries e^{a (cum_{col_pivot} - cum_{s+j})}; move its pivot to the row block's (≤ 1)
        cum_q = tl.load(cum_ptr + base_bc + col_pivot)
        shift = tl.exp((cum_p - cum_q).to(tl.float32) * rate)
        if FAR == 1:
            # K'ᵀ (N_P, BS) in high and low TF32 parts; the shift moves to Q (it scales the contraction). Stored
            # (L, N_P), states contiguous: the product wants them contiguous in shared memory (K-major; TF32 has no
            # transposed operands), so the pipelined copies move 16 bytes each instead of 4 (from (N_P, L))
            kt = (base_q + offs_s[None, :]) * N_P + offs_n[:, None]
            kh = tl.load(kh_ptr + kt, mask=mask_s[None, :], other=0.0)
            kl = tl.load(kl_ptr + kt, mask=mask_s[None, :], other=0.0)
            qs = q * shift[None, :]
            q_hi = _tf32_high(qs)
            m = tl.dot(qs - q_hi, kh, input_precision="tf32")
            m = tl.dot(q_hi, kl, m, input_precision="tf32")
            m = tl.dot(q_hi, kh, m, input_precision="tf32")
        elif FAR == 2:
            # the same three TF32 products as one of contraction 4·N_P, so no product waits on another:
            # rows 4n..4n+3 of the right factor (4·N_P, BS) are [kh_n, kl_n, kh_n, 0] (built by the host),
            # columns 4n..4n+3 of the left one [q_lo_n, q_hi_n, q_hi_n, 0]. join adds a minor axis, so
            # reshape(join(join(a, b), join(c, d))) lays out [a, c, b, d] per n (element (n, i, j) at 4n + 2i + j).
            # The zero pads 3 to a power of two.
            offs_f = tl.arange(0, 4 * N_P)
            kf = tl.load(
                kf_ptr + base_q * (4 * N_P) + offs_f[:, None] * L + offs_s[None, :], mask=mask_s[None, :], other=0.0
            )
            qs = q * shift[None, :]
            q_hi = _tf32_high(qs)
            # (BT, N_P, 2, 2), laid out [q_lo, q_hi, q_hi, 0] per n
            pairs = tl.join(tl.join(qs - q_hi, q_hi), tl.join(q_hi, tl.zeros_like(qs)))
            m = tl.dot(tl.reshape(pairs, (BT, 4 * N_P)), kf, input_precision="tf32")
        else:
            kk = tl.load(k_ptr + (base_q + offs_s[:, None]) * N_P + offs_n[None, :], mask=mask_s[:, None], other=0.0)
            m = tl.dot(q, tl.trans(kk * shift[None, :]), input_precision=PRODUCT)
        return m

    @triton.jit
    def _far_channels(
        acc, out_ptr, q_ptr, k_ptr, kh_ptr, kl_ptr, kf_ptr, cum_ptr, rate_ptr,
        b, lc0, lc1, c_base, c_count, pivot, col_pivot, offs_t, offs_s, offs_n, mask_t, mask_s, mask_n, mask_ts,
        L, C, N, s_ob, s_oc, s_ot,
        N_P: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, MODE: tl.constexpr, PRODUCT: tl.constexpr,
        FAR: tl.constexpr, UNROLL: tl.constexpr,
    ):
        """Channels ``[lc0, lc1)`` of a far tile (see :func:`_far_tile`), emitted into ``acc``."""
        if UNROLL == 2:
            # two channels per iteration: two independent product chains the scheduler can overlap;
            # emitted in channel order, so the result is the same as one channel per iteration
            lc_pair_end = lc0 + tl.maximum(lc1 - lc0, 0) // 2 * 2  # clamped: // of negatives differs
            for lc in range(lc0, lc_pair_end, 2):
                m0 = _far_tile(
                    q_ptr, k_ptr, kh_ptr, kl_ptr, kf_ptr, cum_ptr, rate_ptr,
                    b, c_base + lc, lc, c_count, pivot, col_pivot, offs_t, offs_s, offs_n,
                    mask_t, mask_s, mask_n, L, C, N, N_P, BT, BS, PRODUCT, FAR,
                )
                m1 = _far_tile(
                    q_ptr, k_ptr, kh_ptr, kl_ptr, kf_ptr, cum_ptr, rate_ptr,
                    b, c_base + lc + 1, lc + 1, c_count, pivot, col_pivot, offs_t, offs_s, offs_n,
                    mask_t, mask_s, mask_n, L, C, N, N_P, BT, BS, PRODUCT, FAR,
                )
                acc = _emit(
                    acc, m0, _tile_ptrs(out_ptr, b, c_base + lc, offs_t, offs_s, s_ob, s_oc, s_ot), mask_ts, MODE
                )
                acc = _emit(
                    acc, m1, _tile_ptrs(out_ptr, b, c_base + lc + 1, offs_t, offs_s, s_ob, s_oc, s_ot), mask_ts, MODE
                )
            if lc_pair_end < lc1:  # odd channel count: the last channel alone
                m = _far_tile(
                    q_ptr, k_ptr, kh_ptr, kl_ptr, kf_ptr, cum_ptr, rate_ptr,
                    b, c_base + lc_pair_end, lc_pair_end, c_count, pivot, col_pivot, offs_t, offs_s, offs_n,
                    mask_t, mask_s, mask_n, L, C, N, N_P, BT, BS, PRODUCT, FAR,
                )
                ptrs = _tile_ptrs(out_ptr, b, c_base + lc_pair_end, offs_t, offs_s, s_ob, s_oc, s_ot)
                acc = _emit(acc, m, ptrs, mask_ts, MODE)
        else:
            for lc in range(lc0, lc1):
                m = _far_tile(
                    q_ptr, k_ptr, kh_ptr, kl_ptr, kf_ptr, cum_ptr, rate_ptr,
                    b, c_base + lc, lc, c_count, pivot, col_pivot, offs_t, offs_s, offs_n,
                    mask_t, mask_s, mask_n, L, C, N, N_P, BT, BS, PRODUCT, FAR,
                )
                acc = _emit(
                    acc, m, _tile_ptrs(out_ptr, b, c_base + lc, offs_t, offs_s, s_ob, s_oc, s_ot), mask_ts, MODE
                )
        return acc

    @triton.jit
    def _near_tile_factored(
        q_ptr, k_ptr, kh_ptr, kl_ptr, kf_ptr, cum_ptr, rate_ptr, read_ptr, write_ptr, ws_ptr, skip_ptr, lsc_ptr,
        rsc_ptr, col_ptr, w_ptr,
        b, c, lc, c_count, pivot, col_pivot, base_bc, base_bh, offs_t, offs_s, offs_n, mask_t, mask_s, mask_n, L, C, N,
        N_P: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, HAS_SKIP: tl.constexpr,
        HAS_LSC: tl.constexpr, HAS_RSC: tl.constexpr, HAS_COL: tl.constexpr, PRODUCT: tl.constexpr,
        FAR: tl.constexpr,
    ):
        """A tile touching the row block (pivoted form: needs the exponent bound), λ and ρ included. Where every
        tap is causal (``t − s ≥ K − 1``) it is the far tiles' product of ``Q`` and ``K'`` (:func:`_far_tile`; the
        shift ``e^{a (cum_p − cum_q)}`` is ≥ 1 here, below ``e^{MAX_EXPONENT}``). On the diagonals
        ``t − s = d < K − 1`` only the taps ``j ≤ d`` reach ``s + j ≤ t``:
        ``Σ_{j ≤ d} w_{K-1-j} core[t, t − d + j]``, where ``core[t, t + o]`` (``o = j − d ≤ 0``) takes one
        exponential per row and state, exponent ``a (cum_t − cum_{t+o}) ≤ 0``; plus the skip ``D`` where
        ``s + j = t``. Above the diagonal: zero."""
        m = _far_tile(
            q_ptr, k_ptr, kh_ptr, kl_ptr, kf_ptr, cum_ptr, rate_ptr,
            b, c, lc, c_count, pivot, col_pivot, offs_t, offs_s, offs_n, mask_t, mask_s, mask_n, L, C, N,
            N_P, BT, BS, PRODUCT, FAR,
        )
        diff = offs_t[:, None] - offs_s[None, :]
        m = tl.where(diff >= K - 1, m, 0.0)
        lam = tl.full((BT,), 1.0, dtype=tl.float32)
        if HAS_LSC:
            lam = tl.load(lsc_ptr + base_bc + offs_t, mask=mask_t, other=0.0)
        band = tl.zeros((BT, BS), dtype=tl.float32)
        if K > 1:
            rate = tl.load(rate_ptr + c * N + offs_n, mask=mask_n, other=0.0)
            cum_t = tl.load(cum_ptr + base_bc + offs_t, mask=mask_t, other=0.0)
            c_t = tl.load(
                read_ptr + (base_bh + offs_t[:, None]) * N + offs_n[None, :],
                mask=mask_t[:, None] & mask_n[None, :], other=0.0,
            )
            for i in tl.static_range(K - 1):  # offset o = −i of the column s + j from the row t
                src = offs_t - i
                ok = mask_t & (src >= 0)
                b_src = tl.load(
                    write_ptr + (base_bh + src[:, None]) * N + offs_n[None, :],
                    mask=ok[:, None] & mask_n[None, :], other=0.0,
                )
                if i == 0:
                    core = tl.sum(c_t * b_src, axis=1)
                else:
                    cum_src = tl.load(cum_ptr + base_bc + src, mask=ok, other=0.0)
                    decay = tl.exp(tl.where(ok, (cum_t - cum_src).to(tl.float32), 0.0)[:, None] * rate[None, :])
                    core = tl.sum(c_t * decay * b_src, axis=1)
                core = core * lam * tl.load(ws_ptr + base_bc + src, mask=ok, other=0.0)
                if HAS_COL:
                    core = core * tl.load(col_ptr + base_bc + src, mask=ok, other=0.0)
                for j in tl.static_range(K - 1 - i):  # tap j on the diagonal d = j + i
                    tap = tl.load(w_ptr + c * K + (K - 1 - j))
                    band += tl.where(diff == j + i, (core * tap)[:, None], 0.0)
        if HAS_SKIP:  # D where s + j = t: the diagonal d = j, tap j
            d_row = tl.load(skip_ptr + c) * lam
            if HAS_COL:
                d_row = d_row * tl.load(col_ptr + base_bc + offs_t, mask=mask_t, other=0.0)
            for j in tl.static_range(K):
                tap = tl.load(w_ptr + c * K + (K - 1 - j))
                band += tl.where(diff == j, (d_row * tap)[:, None], 0.0)
        if HAS_RSC:
            band = band * tl.load(rsc_ptr + base_bc + offs_s, mask=mask_s, other=0.0)[None, :]
        return m + band

    @triton.jit
    def _near_channels(
        acc, out_ptr, q_ptr, k_ptr, kh_ptr, kl_ptr, kf_ptr, cum_ptr, rate_ptr, read_ptr, write_ptr, ws_ptr, head_ptr,
        skip_ptr, lsc_ptr, rsc_ptr, col_ptr, w_ptr, exact_ptr,
        b, lc0, lc1, c_base, c_count, pivot, col_pivot, offs_t, offs_s, offs_n, mask_t, mask_s, mask_n, mask_ts,
        L, C, H, N, NB, s_ob, s_oc, s_ot,
        N_P: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, MODE: tl.constexpr,
        HAS_SKIP: tl.constexpr, HAS_LSC: tl.constexpr, HAS_RSC: tl.constexpr, HAS_COL: tl.constexpr,
        PRODUCT: tl.constexpr, NEAR_EXACT: tl.constexpr, FAR: tl.constexpr, NEAR_FACTORED: tl.constexpr,
    ):
        """Channels ``[lc0, lc1)`` of a tile touching the row block, emitted into ``acc``. ``NEAR_EXACT``: 0 the
        pivoted form, 1 the per-entry form, 2 per channel and row block as ``exact_ptr`` ``(b, C, NB)`` says."""
        for lc in range(lc0, lc1):
            c = c_base + lc
            base_bc = (b * C + c).to(tl.int64) * L
            h = tl.load(head_ptr + c)
            base_bh = (b * H + h).to(tl.int64) * L
            base_q = (b * c_count + lc) * L
            if NEAR_EXACT == 2:  # per (batch row, channel, row block), from the table
                per_entry = tl.load(exact_ptr + (b * C + c) * NB + (pivot + 1) // BT) != 0
            else:  # a compile-time constant: each launch compiles only its own form
                per_entry = NEAR_EXACT == 1
            if per_entry:
                m = _near_tile_exact(
                    cum_ptr, rate_ptr, read_ptr, write_ptr, ws_ptr, skip_ptr, lsc_ptr, col_ptr, w_ptr,
                    base_bc, base_bh, c, offs_t, offs_s, mask_t, L, N,
                    N_P, K, BT, BS, HAS_SKIP, HAS_LSC, HAS_COL,
                )
                if HAS_RSC:
                    m = m * tl.load(rsc_ptr + base_bc + offs_s, mask=mask_s, other=0.0)[None, :]
            elif NEAR_FACTORED:  # ρ included (the factors carry it)
                m = _near_tile_factored(
                    q_ptr, k_ptr, kh_ptr, kl_ptr, kf_ptr, cum_ptr, rate_ptr, read_ptr, write_ptr, ws_ptr, skip_ptr,
                    lsc_ptr, rsc_ptr, col_ptr, w_ptr,
                    b, c, lc, c_count, pivot, col_pivot, base_bc, base_bh, offs_t, offs_s, offs_n, mask_t, mask_s,
                    mask_n, L, C, N, N_P, K, BT, BS, HAS_SKIP, HAS_LSC, HAS_RSC, HAS_COL, PRODUCT, FAR,
                )
            else:
                m = _near_tile_pivoted(
                    q_ptr, cum_ptr, rate_ptr, write_ptr, ws_ptr, skip_ptr, lsc_ptr, col_ptr, w_ptr,
                    base_bc, base_bh, base_q, c, pivot, offs_t, offs_s, offs_n, mask_t, mask_n, L, N,
                    N_P, K, BT, BS, HAS_SKIP, HAS_LSC, HAS_COL, PRODUCT,
                )
                if HAS_RSC:
                    m = m * tl.load(rsc_ptr + base_bc + offs_s, mask=mask_s, other=0.0)[None, :]
            acc = _emit(acc, m, _tile_ptrs(out_ptr, b, c, offs_t, offs_s, s_ob, s_oc, s_ot), mask_ts, MODE)
        return acc

    @triton.jit
    def _ssm_kernel(
        out_ptr, tiles_ptr, q_ptr, k_ptr, kh_ptr, kl_ptr, kf_ptr, cum_ptr, rate_ptr, read_ptr, write_ptr, ws_ptr,
        head_ptr, skip_ptr, lsc_ptr, rsc_ptr, col_ptr, w_ptr, exact_ptr,
        L, C, H, N, NB, c_base, c_count, ch_per_prog,
        s_ob, s_oc, s_ot,  # out strides (batch, channel|group, row); columns contiguous
        N_P: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, MODE: tl.constexpr,
        HAS_SKIP: tl.constexpr, HAS_LSC: tl.constexpr, HAS_RSC: tl.constexpr, HAS_COL: tl.constexpr,
        ACCUMULATE: tl.constexpr, PRODUCT: tl.constexpr, NEAR_EXACT: tl.constexpr, FAR: tl.constexpr,
        UNROLL: tl.constexpr, TILES: tl.constexpr, NEAR_FACTORED: tl.constexpr,
    ):
        # TILES: 0 any tile, 1 only far tiles, 2 only the others (touching the row block, or above it)
        tile = tl.program_id(0)
        b = tl.program_id(1)
        grp = tl.program_id(2)
        bi = tl.load(tiles_ptr + 2 * tile)
        bj = tl.load(tiles_ptr + 2 * tile + 1)
        offs_t = bi * BT + tl.arange(0, BT)
        offs_s = bj * BS + tl.arange(0, BS)
        offs_n = tl.arange(0, N_P)
        mask_t = offs_t < L
        mask_s = offs_s < L
        mask_n = offs_n < N
        mask_ts = mask_t[:, None] & mask_s[None, :]
        lc0 = grp * ch_per_prog
        lc1 = tl.minimum(lc0 + ch_per_prog, c_count)
        if bj > bi:  # above the diagonal: dense mode writes its zeros
            zero = tl.zeros((BT, BS), dtype=tl.float32)
            for lc in range(lc0, lc1):
                ptrs = _tile_ptrs(out_ptr, b, c_base + lc, offs_t, offs_s, s_ob, s_oc, s_ot)
                tl.store(ptrs, zero, mask=mask_ts)
        else:
            pivot = bi * BT - 1
            # columns (with their conv halo) left of the row block: precomputed factors, one product
            far = bj * BS + BS - 1 + K - 1 <= pivot
            col_pivot = tl.minimum(bj * BS + BS - 1 + K - 1, L - 1)
            out_tile = _tile_ptrs(out_ptr, b, grp, offs_t, offs_s, s_ob, s_oc, s_ot)
            if ACCUMULATE:
                acc = tl.load(out_tile, mask=mask_ts, other=0.0)
            else:
                acc = tl.zeros((BT, BS), dtype=tl.float32)
            # far tiles (almost all) and the two next to the diagonal run separate branch-free loops, so the
            # far loop's loads can be pipelined across channels; TILES is a constexpr, so a launch of only one
            # kind folds this test and compiles only its loop: the far loop gets registers of its own (SEPARATE_FAR)
            if TILES == 1 or (TILES == 0 and far):
                acc = _far_channels(
                    acc, out_ptr, q_ptr, k_ptr, kh_ptr, kl_ptr, kf_ptr, cum_ptr, rate_ptr,
                    b, lc0, lc1, c_base, c_count, pivot, col_pivot, offs_t, offs_s, offs_n,
                    mask_t, mask_s, mask_n, mask_ts, L, C, N, s_ob, s_oc, s_ot, N_P, BT, BS, MODE, PRODUCT, FAR, UNROLL,
                )
            else:
                acc = _near_channels(
                    acc, out_ptr, q_ptr, k_ptr, kh_ptr, kl_ptr, kf_ptr, cum_ptr, rate_ptr, read_ptr, write_ptr, ws_ptr,
                    head_ptr, skip_ptr, lsc_ptr, rsc_ptr, col_ptr, w_ptr, exact_ptr,
                    b, lc0, lc1, c_base, c_count, pivot, col_pivot, offs_t, offs_s, offs_n, mask_t, mask_s, mask_n,
                    mask_ts, L, C, H, N, NB, s_ob, s_oc, s_ot,
                    N_P, K, BT, BS, MODE, HAS_SKIP, HAS_LSC, HAS_RSC, HAS_COL, PRODUCT, NEAR_EXACT, FAR, NEAR_FACTORED,
                )
            if MODE != 0:
                tl.store(out_tile, acc, mask=mask_ts)

    @triton.jit
    def _factor_kernel(
        q_ptr, k_ptr, kh_ptr, kl_ptr, cum_ptr, rate_ptr, read_ptr, write_ptr, ws_ptr, head_ptr, lsc_ptr, col_ptr,
        rsc_ptr, w_ptr, L, C, H, N, c_base, c_count, block,
        N_P: tl.constexpr, K: tl.constexpr, BL: tl.constexpr, HAS_LSC: tl.constexpr, HAS_COL: tl.constexpr,
        HAS_RSC: tl.constexpr, SPLIT: tl.constexpr,
    ):
        """:func:`_factors` for ``BL`` positions of one channel: ``Q`` (``(b, c, L, N_P)``) and ``K'``, as is
        (``(b, c, L, N_P)``) or, with ``SPLIT``, in TF32 high and low parts (``(b, c, L, N_P)`` each; the far
        tiles read only those). Same operations in the same order as the torch reference; one pass over the
        outputs instead of a dozen over ``(b, c, L, N)`` tensors."""
        tb = tl.program_id(0)
        b = tl.program_id(1)
        lc = tl.program_id(2)
        c = c_base + lc
        offs_t = tb * BL + tl.arange(0, BL)
        offs_n = tl.arange(0, N_P)
        in_t = offs_t < L
        in_n = offs_n < N
        head = tl.load(head_ptr + c)
        rate = tl.load(rate_ptr + c * N + offs_n, mask=in_n, other=0.0)
        row = (b * C + c).to(tl.int64) * L  # (b, C, L) tensors: cum, write scale, row / column scalings
        state = (b * H + head).to(tl.int64) * L  # (b, H, L, N) tensors: read, write
        start = (offs_t // block) * block
        cum_t = tl.load(cum_ptr + row + offs_t, mask=in_t, other=0.0)
        cum_row = tl.load(cum_ptr + row + start - 1, mask=in_t & (start > 0), other=0.0)
        read = tl.load(read_ptr + (state + offs_t[:, None]) * N + offs_n[None, :], mask=in_t[:, None] & in_n[None, :],
                       other=0.0)
        q = read * tl.exp((cum_t - cum_row).to(tl.float32)[:, None] * rate[None, :])
        if HAS_LSC:
            q = q * tl.load(lsc_ptr + row + offs_t, mask=in_t, other=0.0)[:, None]
        out = ((b * c_count + lc).to(tl.int64) * L + offs_t[:, None]) * N_P + offs_n[None, :]
        tl.store(q_ptr + out, q, mask=in_t[:, None])
        col_pivot = tl.minimum(start + block - 1 + K - 1, L - 1)
        cum_col = tl.load(cum_ptr + row + col_pivot, mask=in_t, other=0.0)
        k = tl.zeros((BL, N_P), dtype=tl.float32)
        for j in tl.static_range(K):
            src = offs_t + j
            valid = src < L
            src = tl.minimum(src, L - 1)
            expo = tl.where(valid, (cum_col - tl.load(cum_ptr + row + src)).to(tl.float32), 0.0)
            scale = tl.load(ws_ptr + row + src) * tl.load(w_ptr + c * K + (K - 1 - j)) * valid.to(tl.float32)
            if HAS_COL:
                scale = scale * tl.load(col_ptr + row + src)
            write = tl.load(write_ptr + (state + src[:, None]) * N + offs_n[None, :], mask=in_n[None, :], other=0.0)
            k += write * tl.exp(expo[:, None] * rate[None, :]) * scale[:, None]
        if HAS_RSC:
            k = k * tl.load(rsc_ptr + row + offs_t, mask=in_t, other=0.0)[:, None]
        if SPLIT:
            high = _tf32_high(k)
            tl.store(kh_ptr + out, high, mask=in_t[:, None])
            tl.store(kl_ptr + out, k - high, mask=in_t[:, None])
        else:
            tl.store(k_ptr + out, k, mask=in_t[:, None])


def _factors(
    ch: slice, block: int, n_pad: int, *, cum: Tensor, rate: Tensor, read: Tensor, write: Tensor, ws: Tensor,
    head_of: Tensor, lsc: Tensor | None, col: Tensor | None, rsc: Tensor | None, weight: Tensor,
) -> tuple[Tensor, Tensor]:
    """Rank-N factors of the channels ``ch``, each pivoted inside its own block: ``(b, c, L, n_pad)`` float32.

    ``Q[t] = λ_t C_t e^{a (cum_t − cum_{p(t)})}`` with ``p(t)`` the position before ``t``'s row block, and
    ``K'[s] = ρ_s Σ_j w_{K-1-j} col_{s+j} Δ_{s+j} B_{s+j} e^{a (cum_{q(s)} − cum_{s+j})}`` with ``q(s)`` the last
    conv-halo position of ``s``'s column block: every exponent is ≤ 0.
    """
    bsz, _, length = cum.shape
    taps = weight.shape[-1]
    pos = torch.arange(length, device=cum.device)
    heads = head_of[ch]
    cumc = cum[:, ch]
    rate_c = rate[ch].float()[None, :, None, :]
    row_pivot = (pos // block) * block - 1
    cum_row = torch.where(row_pivot >= 0, cumc[..., row_pivot.clamp(min=0)], torch.zeros_like(cumc))
    q = read[:, heads].float() * torch.exp((cumc - cum_row).float()[..., None] * rate_c)
    if lsc is not None:
        q = q * lsc[:, ch, :, None]
    col_pivot = ((pos // block) * block + block - 1 + taps - 1).clamp(max=length - 1)
    k = torch.zeros_like(q)
    w_heads = write[:, heads].float()
    for j in range(taps):
        src = pos + j
        valid = src < length
        src = src.clamp(max=length - 1)
        expo = (cumc[..., col_pivot] - cumc[..., src]).float().masked_fill(~valid, 0.0)
        scale = ws[:, ch][..., src] * weight[ch, taps - 1 - j][None, :, None] * valid
        if col is not None:
            scale = scale * col[:, ch][..., src]
        k += w_heads[:, :, src] * torch.exp(expo[..., None] * rate_c) * scale[..., None]
    if rsc is not None:
        k = k * rsc[:, ch, :, None]
    pad = n_pad - q.shape[-1]
    return (
        torch.nn.functional.pad(q, (0, pad)).contiguous(),
        torch.nn.functional.pad(k, (0, pad)).contiguous(),
    )


def _kernel_factors(
    ch: slice, block: int, n_pad: int, split: bool, *, cum: Tensor, rate: Tensor, read: Tensor, write: Tensor,
    ws: Tensor, head_of: Tensor, lsc: Tensor | None, col: Tensor | None, rsc: Tensor | None, weight: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_factors` by :func:`_factor_kernel`: ``(q, k, kh, kl)``, ``Q`` ``(b, c, L, n_pad)`` float32 and
    either, if ``split``, ``K'`` ``(b, c, L, n_pad)`` in its TF32 high part and the rest, or ``K'``
    ``(b, c, L, n_pad)`` as is; placeholders for the others (the kernel reads one form or the other: storing both
    cost a quarter of the factors' memory and writes). Inputs as prepared by :func:`ssm_kernel` (contiguous,
    float32; ``cum`` float64, ``head_of`` int32)."""
    bsz, nch, length = cum.shape
    count = ch.stop - ch.start
    q = torch.empty(bsz, count, length, n_pad, dtype=torch.float32, device=cum.device)
    dummy = k = kh = kl = q[:0]
    if split:
        kh, kl = torch.empty_like(q), torch.empty_like(q)
    else:
        k = torch.empty_like(q)
    grid = (math.ceil(length / FACTOR_ROWS), bsz, count)
    _factor_kernel[grid](
        q, k, kh, kl, cum, rate, read, write, ws, head_of, dummy if lsc is None else lsc,
        dummy if col is None else col, dummy if rsc is None else rsc, weight,
        length, nch, read.shape[1], read.shape[-1], ch.start, count, block,
        N_P=n_pad, K=weight.shape[-1], BL=FACTOR_ROWS, HAS_LSC=lsc is not None, HAS_COL=col is not None,
        HAS_RSC=rsc is not None, SPLIT=split,
    )
    return q, k, kh, kl


def _chunk_factors(
    ch: slice, block: int, n_pad: int, far_product: str, head_of: Tensor, inputs: dict
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The kernel's factor arguments for the channels ``ch``, pivoted at ``block``: ``(q, k, kh, kl, kf)`` with
    placeholders for what ``far_product`` (see :data:`FAR_PRODUCT`) does not read. ``inputs``: as prepared by
    :func:`ssm_kernel`."""
    split = far_product != "register"  # (b, c, L, n_pad): high TF32 part (low 13 mantissa bits cleared), rest
    if FACTOR_KERNEL:
        q, k, kh, kl = _kernel_factors(ch, block, n_pad, split, head_of=head_of, **inputs)
    else:
        q, k = _factors(ch, block, n_pad, head_of=head_of.long(), **inputs)
        kh = kl = q[:0]
        if split:  # the far tiles read only the parts (as from _kernel_factors)
            kh = (k.view(torch.int32) & -8192).view(torch.float32)
            kl = k - kh
            k = q[:0]
    kf = q[:0]  # placeholders (what the kernel does not read) are empty views of q, as in _kernel_factors
    if far_product == "fused":
        # (b, c, 4·n_pad, L): rows [kh_n, kl_n, kh_n, 0] per state n (the kernel's left interleave)
        bsz, count, length, _ = kh.shape
        kh, kl = kh.transpose(-1, -2), kl.transpose(-1, -2)
        kf = torch.stack([kh, kl, kh, torch.zeros_like(kh)], dim=-2).reshape(bsz, count, 4 * n_pad, length)
        kh = kl = q[:0]
    return q, k, kh, kl, kf


def _block_exponents(cum: Tensor, rate: Tensor, taps: int, length: int, block: int) -> Tensor:
    """``(b, C, blocks)``: the largest exponent the pivoted form of a row block's tiles next to the diagonal takes,
    ``max_n |a_n|`` times the cumulative-Δ span of the block and its conv halo (from the position before it)."""
    padded = torch.cat([torch.zeros_like(cum[..., :1]), cum], dim=-1)  # padded[i] = cum_{i-1}
    starts = torch.arange(0, length, block, device=cum.device)
    ends = torch.clamp(starts + block - 1 + taps - 1, max=length - 1)
    span = padded[..., ends + 1] - padded[..., starts]
    return span * rate.abs().amax(-1).to(torch.float64)[:, None]


def _near_statistics(
    cum: Tensor, rate: Tensor, taps: int, length: int, ahead: NearStatistics | None = None
) -> tuple[list[int], list[float], int, Tensor]:
    """``(blocks, largest exponent per block, mixed block, exponents at it)``: the candidate row blocks (BLOCK,
    BLOCK/2, BLOCK/4; at least 16 for ``tl.dot``), the largest exponent of each (see :func:`_block_exponents`) and,
    last in the list, the smallest at the mixed forms' block (:func:`_mixed_block`), all read back at once: each
    read is a host synchronisation on a GPU, which leaves it idle until the next launch; then the mixed block and
    the ``(b, C, blocks)`` exponents there (left on the device). ``ahead``: the same started earlier
    (:func:`start_near_statistics`)."""
    if ahead is None or (ahead.block, ahead.mixed_block) != (BLOCK, _mixed_block()):
        ahead = _near_statistics_on_device(cum, rate, taps, length)
    if ahead.ready is not None:
        ahead.ready.synchronize()  # waits for the copy alone, not for what was queued after it
    return ahead.blocks, ahead.values.tolist(), ahead.mixed_block, ahead.at_mixed


def _mixed_block() -> int:
    """The row block of the per-entry and mixed forms next to the diagonal (see :data:`MIXED_BLOCK`)."""
    return max(16, min(BLOCK, MIXED_BLOCK))


class NearStatistics(NamedTuple):
    """The statistics of :func:`_near_statistics`, being copied to the host (``values``: pinned memory, filled by
    a non-blocking copy that ``ready`` follows; on the CPU a plain tensor and ``ready`` None)."""

    block: int
    blocks: list[int]
    values: Tensor
    ready: Any
    mixed_block: int
    at_mixed: Tensor


@torch.no_grad()
def _near_statistics_on_device(cum: Tensor, rate: Tensor, taps: int, length: int) -> NearStatistics:
    blocks = [b for b in (BLOCK, BLOCK // 2, BLOCK // 4) if b >= 16]
    mixed = _mixed_block()
    cum = cum.to(torch.float64)
    exponents = {b: _block_exponents(cum, rate, taps, length, b) for b in {*blocks, mixed}}
    values = torch.stack([*(exponents[b].max() for b in blocks), exponents[mixed].min()])
    if values.device.type != "cuda":
        return NearStatistics(BLOCK, blocks, values, None, mixed, exponents[mixed])
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return NearStatistics(BLOCK, blocks, host, ready, mixed, exponents[mixed])


def start_near_statistics(cum: Tensor, rate: Tensor, taps: int) -> NearStatistics | None:
    """Start, on a GPU, what :func:`ssm_kernel` reads back to choose the form of the tiles next to the diagonal
    (see :func:`_near_forms`), e.g. when a layer is captured: by the time the kernel runs it has arrived, and
    the kernel call does not wait for the GPU's queue to drain (it would, once per layer, leaving the GPU idle
    until its next launch). ``None`` off the GPU. Shapes as for :func:`ssm_kernel`."""
    if cum.device.type != "cuda":
        return None
    return _near_statistics_on_device(cum, rate, taps, cum.shape[-1])


def _block_for(cum: Tensor, rate: Tensor, taps: int, length: int) -> int | None:
    """Largest row block (64 or 32, at least 16 for ``tl.dot``) whose exponents stay below MAX_EXPONENT."""
    return _largest_passing(*_near_statistics(cum, rate, taps, length)[:2])


def _largest_passing(blocks: list[int], maxima: list[float]) -> int | None:
    """The first (largest) of ``blocks`` whose largest exponent stays below MAX_EXPONENT (``maxima`` may carry more
    statistics after them)."""
    return next((b for b, m in zip(blocks, maxima, strict=False) if m < MAX_EXPONENT), None)


def _near_forms(
    cum: Tensor, rate: Tensor, taps: int, length: int, ahead: NearStatistics | None = None
) -> tuple[int, int, Tensor | None]:
    """The row block and the form of the tiles next to the diagonal: ``(block, NEAR_EXACT, exact)``. The pivoted
    form (0) at the largest block whose exponents all stay below MAX_EXPONENT; else, at :data:`MIXED_BLOCK`, the
    per-entry form everywhere (1) or, with :data:`MIXED_NEAR_FORMS`, where the exponents do not stay below it, per
    batch row, channel and row block (2, with ``exact`` the ``(b, C, blocks)`` int8 table; 1 when nowhere do they)."""
    blocks, maxima, mixed, at_mixed = _near_statistics(cum, rate, taps, length, ahead)
    block = _largest_passing(blocks, maxima)
    if FORCE_NEAR_EXACT:
        return block or mixed, 1, None
    if block is not None:
        return block, 0, None
    if not MIXED_NEAR_FORMS or maxima[-1] >= MAX_EXPONENT:  # the smallest fails too: the per-entry form everywhere
        return mixed, 1, None
    return mixed, 2, (at_mixed >= MAX_EXPONENT).to(torch.int8).contiguous()


def _far(tiles: Tensor, block: int, taps: int) -> Tensor:
    """Which ``(row block, column block)`` tiles are far: their columns and conv halo end before the row block."""
    return tiles[:, 1] * block + block - 1 + taps - 1 <= tiles[:, 0] * block - 1


def _launch_plan(
    length: int, block: int, taps: int, dense: bool, separate_far: bool, device: torch.device
) -> list[tuple[int, Tensor, int]]:
    """The launches of one call: ``(TILES, tiles (n, 2) int32, their block size)``, each output tile in exactly
    one. The reductions' far tiles at :data:`WIDE_FAR_BLOCK` where it applies; with ``separate_far`` far tiles
    (TILES 1) apart from the others (TILES 2), else one launch (TILES 0); ``dense`` adds the tiles above the
    diagonal (zeros). Built on the host and kept per shape: selecting tiles on the GPU synchronises it."""
    return _cached_launch_plan(length, block, taps, dense, separate_far, WIDE_FAR_BLOCK, device)


@functools.lru_cache(maxsize=64)
def _cached_launch_plan(
    length: int, block: int, taps: int, dense: bool, separate_far: bool, wide: int | None, device: torch.device
) -> list[tuple[int, Tensor, int]]:
    cpu = torch.device("cpu")
    tiles = _tiles(math.ceil(length / block), dense, cpu)
    launches = []
    if wide is not None and not dense and block < wide and wide % block == 0:
        wide_tiles = _tiles(math.ceil(length / wide), False, cpu)
        launches.append((1, wide_tiles[_far(wide_tiles, wide, taps)].contiguous(), wide))
        # the small tiles inside a far wide tile are its launch's
        tiles = tiles[~_far(torch.div(tiles, wide // block, rounding_mode="floor"), wide, taps)]
    if separate_far:  # far: the columns and their conv halo end before the row block (as in the kernel)
        far = _far(tiles, block, taps)
        launches += [(kind, part.contiguous(), block) for kind, part in ((1, tiles[far]), (2, tiles[~far]))]
    else:
        launches.append((0, tiles, block))
    return [(kind, part.to(device), size) for kind, part, size in launches if len(part)]


def _products() -> tuple[str, str]:
    """``(PRODUCT, FAR_PRODUCT)`` for this call: the module's, or one TF32 product per tile where the user chose
    ``precision="tf32"`` (:func:`captum_implicit.config.blockwise`)."""
    if config.precision == "tf32":
        return "tf32", "register"
    return PRODUCT, FAR_PRODUCT


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tiles(num_blocks: int, upper: bool, device: torch.device) -> Tensor:
    idx = torch.arange(num_blocks, device=device)
    bi, bj = torch.meshgrid(idx, idx, indexing="ij")
    keep = torch.ones_like(bi, dtype=torch.bool) if upper else bj <= bi
    return torch.stack([bi[keep], bj[keep]], dim=-1).to(torch.int32).contiguous()


def ssm_kernel(
    mode: str,
    *,
    cum: Tensor,
    rate: Tensor,
    read: Tensor,
    write: Tensor,
    write_scale: Tensor,
    head_of: Tensor,
    skip: Tensor | None,
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    col_values: Tensor | None,
    conv_weight: Tensor | None,
    near_statistics: NearStatistics | None = None,
) -> Tensor:
    """Run the kernel (any decay magnitudes: see the module docstring).

    Parameters
    ----------
    mode : {"dense", "sum", "abs", "positive", "max_abs"}
    cum : (b, C, L) float64 ; rate : (C, N) ; read, write : (b, H, L, N) ; write_scale : (b, C, L)
    head_of : (C,) long ; skip : (C,) or None
    row_scale : (b, C, L) or None
        Left scaling ``λ`` (the layer's output gate, times the output gradient for attention × gradient).
    col_scale : (b, C, L) or None
        Scaling between the core and the conv (frozen activation slope, padding mask).
    col_values : (b, C, L) or None
        Right scaling ``ρ`` after the conv (the values, for attention × gradient).
    conv_weight : (C, K) or None
    near_statistics : NearStatistics or None
        :func:`start_near_statistics` of these ``cum``, ``rate`` and taps, started earlier (else computed here,
        which on a GPU waits for its queue to drain).

    Returns
    -------
    (b, C, L, L) float32 for ``"dense"``; ``(b, L, L)`` float32 channel sum (or max) otherwise.
    """
    bsz, nch, length = cum.shape
    nheads, nstate = read.shape[1], read.shape[-1]
    device = cum.device
    taps = 1 if conv_weight is None else conv_weight.shape[-1]
    # the pivoted form of the tiles next to the diagonal needs an exponent bound; where it fails they take one
    # exponential per entry and state (exact, slower); tiles further left never need it
    cum = cum.to(torch.float64).contiguous()
    block, near_form, exact_blocks = _near_forms(cum, rate, taps, length, near_statistics)
    f32 = torch.float32

    def prep(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(f32).contiguous()

    weight = prep(conv_weight) if conv_weight is not None else torch.ones(nch, 1, dtype=f32, device=device)
    rate, read, write, ws = prep(rate), prep(read), prep(write), prep(write_scale)
    skip, lsc, rsc, col = prep(skip), prep(row_scale), prep(col_values), prep(col_scale)
    head_of = head_of.to(torch.int32).contiguous()
    dummy = torch.zeros(1, dtype=f32, device=device)
    n_pad = max(16, triton.next_power_of_2(nstate))
    num_blocks = math.ceil(length / block)
    dense = mode == "dense"
    separate_far = (not dense) if SEPARATE_FAR is None else SEPARATE_FAR
    launches = _launch_plan(length, block, taps, dense, separate_far, device)
    product, far_product = _products()
    if far_product not in FAR_CODES or FAR_UNROLL not in (1, 2):
        raise ValueError(f"FAR_PRODUCT={far_product!r}, FAR_UNROLL={FAR_UNROLL!r}: unknown far-tile variant")
    fused = far_product == "fused"
    # channels per launch: the precomputed factors are (b, c, L, n_pad) float32 tensors, the fused right
    # factor 4x that: no one tensor exceeds FACTOR_ELEMENTS
    chunk = max(1, min(nch, FACTOR_ELEMENTS // (bsz * length * n_pad * (4 if fused else 1))))
    if dense:
        groups, per_prog = chunk, max(1, min(DENSE_CHANNELS, chunk))
        out = torch.empty(bsz, nch, length, length, dtype=f32, device=device)
    else:
        # enough programs to fill the GPU; partial sums per channel group, summed (deterministically) after
        want = (PROGRAMS or PROGRAMS_PER_SM * _multiprocessors(device)) if device.type == "cuda" else 1
        groups = max(1, min(chunk, math.ceil(want / (sum(len(part) for _, part, _ in launches) * bsz))))
        per_prog = math.ceil(chunk / groups)
        groups = math.ceil(chunk / per_prog)
        out = torch.zeros(bsz, groups, length, length, dtype=f32, device=device)
    inputs = dict(cum=cum, rate=rate, read=read, write=write, ws=ws, lsc=lsc, col=col, rsc=rsc, weight=weight)
    for c0 in range(0, nch, chunk):
        ch = slice(c0, min(c0 + chunk, nch))
        count = ch.stop - ch.start
        # (q, k, kh, kl, kf) per block size in use, pivoted at that size
        factors = {blk: _chunk_factors(ch, blk, n_pad, far_product, head_of, inputs)
                   for blk in {b for _, _, b in launches}}
        side, order = None, launches
        if OVERLAP_NEAR and len(launches) > 1 and device.type == "cuda":
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))  # the factors above, and earlier chunks' tiles
            # the long near-tile programs first: the GPU hands out a kernel's blocks roughly in launch order,
            # so the far launch's many short programs then fill the slots around them
            order = launches[::-1]
        for kind, part, blk in order:  # each tile belongs to exactly one launch: no two write the same output
            grid = (part.shape[0], bsz, math.ceil(count / per_prog) if dense else groups)
            with torch.cuda.stream(side) if side is not None and kind == 2 else contextlib.nullcontext():
                _ssm_kernel[grid](
                    out, part, *factors[blk], cum, rate, read, write, ws, head_of,
                    skip if skip is not None else dummy, lsc if lsc is not None else dummy,
                    rsc if rsc is not None else dummy, col if col is not None else dummy, weight,
                    exact_blocks if exact_blocks is not None else dummy,
                    length, nch, nheads, nstate, num_blocks, c0, count, per_prog,
                    out.stride(0), out.stride(1), out.stride(2),
                    N_P=n_pad, K=taps, BT=blk, BS=blk, MODE=MODES[mode],
                    HAS_SKIP=skip is not None, HAS_LSC=lsc is not None, HAS_RSC=rsc is not None,
                    HAS_COL=col is not None, ACCUMULATE=c0 > 0 and not dense, PRODUCT=product,
                    NEAR_EXACT=near_form, FAR=FAR_CODES[far_product], UNROLL=FAR_UNROLL,
                    TILES=kind, NEAR_FACTORED=NEAR_FROM_FACTORS,
                    num_warps=(WIDE_FAR_WARPS or NUM_WARPS) if blk > block else NUM_WARPS,
                    num_stages=NUM_STAGES,
                )
        if side is not None:
            # later work (the next chunk, the group sum, freeing the factors) waits for the side stream too
            torch.cuda.current_stream(device).wait_stream(side)
        del factors
    if dense:
        return out
    if mode == "max_abs":
        return out.amax(1)
    return out.sum(1)

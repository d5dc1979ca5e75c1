"""Triton kernel for the diagonal selective-SSM (Mamba) implicit attention: dense tiles and channel reductions.

The torch reference is :func:`captum_implicit.ops.decay.diagonal_ssm_tile` walked by
:mod:`captum_implicit.ops.blockwise`; this kernel computes the same quantities in one launch per layer:

* ``dense``: ``A[b, c, t, s]`` for all channels (every tile written once, zeros above the diagonal);
* ``aggregate``: ``Σ_c f(λ_t · A[b, c, t, s] · ρ_s)`` with ``f`` ∈ {identity, abs, positive part} or
  ``max_c |·|`` — with ``λ = ∂f/∂y`` and ``ρ = values`` this is attention × gradient (``Ā`` of
  ``ImplicitAttnGrad``), with ``λ = ρ = 1`` the plain channel reduction.

Per channel ``c`` (head ``h``) the matrix is, with ``T`` the causal depthwise conv (taps ``w``)::

    A[t, s] = row_t · Σ_j w_{K-1-j} · core[t, s+j] · col_{s+j}
    core[t, s'] = Σ_n C[t, n] · exp(a_n (cum_t − cum_{s'})) · B[s', n] · Δ_{s'}  +  D · [t = s']    (s' ≤ t)

Every tile of a row block ``I`` (rows ``[I·BT, I·BT + BT)``) is factorised through the pivot
``p = I·BT − 1`` (``cum_{−1} = 0``): ``Q[t, n] = C[t, n] e^{a_n (cum_t − cum_p)}`` (exponent ≤ 0) and
``K_j[s, n] = B̄[s+j, n] e^{a_n (cum_p − cum_{s+j})}``. Left of the row block the exponent is ≤ 0 and the
conv taps are summed into one ``K`` before one rank-``N`` product; in the two tiles that touch the row
block (the diagonal and its left neighbour, whose conv halo reaches it) one product per tap is masked to
``s + j ≤ t``. There ``e^{a_n (cum_p − cum_{s'})}`` can exceed 1, by at most ``e^{|a|·span}`` with
``span`` the cumulative ``Δ`` over one row block and the halo; the launcher checks ``max |a| · span`` against
:data:`MAX_EXPONENT` (float32 overflows at 88.7) and declines (the torch path then runs) otherwise.
Differences of cumulative sums are taken in float64, the rest in float32 (``tl.dot`` in IEEE float32, no
TF32), accumulation in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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
MODES = {"dense": 0, "sum": 1, "abs": 2, "positive": 3, "max_abs": 4}


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
    def _ssm_kernel(
        out_ptr, tiles_ptr, cum_ptr, rate_ptr, read_ptr, write_ptr, ws_ptr, head_ptr,
        skip_ptr, lsc_ptr, rsc_ptr, col_ptr, w_ptr,
        L, C, H, N, ch_per_prog,
        s_ob, s_oc, s_ot,  # out strides (batch, channel|group, row); columns contiguous
        N_P: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, MODE: tl.constexpr,
        HAS_SKIP: tl.constexpr, HAS_LSC: tl.constexpr, HAS_RSC: tl.constexpr, HAS_COL: tl.constexpr,
        PRODUCT: tl.constexpr,
    ):
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
        c0 = grp * ch_per_prog
        c1 = tl.minimum(c0 + ch_per_prog, C)
        if bj > bi:  # above the diagonal: dense mode writes its zeros
            zero = tl.zeros((BT, BS), dtype=tl.float32)
            for c in range(c0, c1):
                ptrs = out_ptr + b * s_ob + c * s_oc + offs_t[:, None] * s_ot + offs_s[None, :]
                tl.store(ptrs, zero, mask=mask_t[:, None] & mask_s[None, :])
        else:
            pivot = bi * BT - 1
            # the conv halo of the tile's last column: does any s + j reach the row block?
            far = bj * BS + BS - 1 + K - 1 <= pivot
            acc = tl.zeros((BT, BS), dtype=tl.float32)
            for c in range(c0, c1):
                h = tl.load(head_ptr + c)
                base_bc = (b * C + c) * L
                base_bh = (b * H + h) * L
                cum_p = tl.load(cum_ptr + base_bc + pivot, mask=pivot >= 0, other=0.0)
                rate = tl.load(rate_ptr + c * N + offs_n, mask=mask_n, other=0.0)
                cum_t = tl.load(cum_ptr + base_bc + offs_t, mask=mask_t, other=0.0)
                dt_t = tl.where(mask_t, (cum_t - cum_p).to(tl.float32), 0.0)
                q = tl.load(
                    read_ptr + (base_bh + offs_t[:, None]) * N + offs_n[None, :],
                    mask=mask_t[:, None] & mask_n[None, :], other=0.0,
                )
                q = q * tl.exp(dt_t[:, None] * rate[None, :])
                m = tl.zeros((BT, BS), dtype=tl.float32)
                kacc = tl.zeros((BS, N_P), dtype=tl.float32)
                for j in tl.static_range(K):
                    s_j = offs_s + j
                    m_j = s_j < L
                    cum_s = tl.load(cum_ptr + base_bc + s_j, mask=m_j, other=0.0)
                    ds = tl.where(m_j, (cum_p - cum_s).to(tl.float32), 0.0)
                    scale = tl.load(ws_ptr + base_bc + s_j, mask=m_j, other=0.0)
                    if HAS_COL:
                        scale = scale * tl.load(col_ptr + base_bc + s_j, mask=m_j, other=0.0)
                    tap = tl.load(w_ptr + c * K + (K - 1 - j))
                    kj = tl.load(
                        write_ptr + (base_bh + s_j[:, None]) * N + offs_n[None, :],
                        mask=m_j[:, None] & mask_n[None, :], other=0.0,
                    )
                    kj = kj * tl.exp(ds[:, None] * rate[None, :]) * (scale * tap)[:, None]
                    if far:
                        kacc += kj
                    else:
                        part = tl.dot(q, tl.trans(kj), input_precision=PRODUCT)
                        causal = s_j[None, :] <= offs_t[:, None]
                        m += tl.where(causal, part, 0.0)
                        if HAS_SKIP:
                            d = tl.load(skip_ptr + c)
                            dcol = tap * d
                            if HAS_COL:
                                dcol = dcol * tl.load(col_ptr + base_bc + s_j, mask=m_j, other=0.0)
                            else:
                                dcol = dcol + tl.zeros((BS,), dtype=tl.float32)
                            m += tl.where(s_j[None, :] == offs_t[:, None], dcol[None, :], 0.0)
                if far:
                    m = tl.dot(q, tl.trans(kacc), input_precision=PRODUCT)
                if HAS_LSC:
                    m = m * tl.load(lsc_ptr + base_bc + offs_t, mask=mask_t, other=0.0)[:, None]
                if HAS_RSC:
                    m = m * tl.load(rsc_ptr + base_bc + offs_s, mask=mask_s, other=0.0)[None, :]
                if MODE == 0:
                    ptrs = out_ptr + b * s_ob + c * s_oc + offs_t[:, None] * s_ot + offs_s[None, :]
                    tl.store(ptrs, m, mask=mask_t[:, None] & mask_s[None, :])
                elif MODE == 1:
                    acc += m
                elif MODE == 2:
                    acc += tl.abs(m)
                elif MODE == 3:
                    acc += tl.maximum(m, 0.0)
                else:
                    acc = tl.maximum(acc, tl.abs(m))
            if MODE != 0:
                ptrs = out_ptr + b * s_ob + grp * s_oc + offs_t[:, None] * s_ot + offs_s[None, :]
                tl.store(ptrs, acc, mask=mask_t[:, None] & mask_s[None, :])


def _block_for(cum: Tensor, rate: Tensor, taps: int, length: int) -> int | None:
    """Largest row block (64 or 32, at least 16 for ``tl.dot``) whose exponents stay below MAX_EXPONENT."""
    zero = torch.zeros_like(cum[..., :1])
    padded = torch.cat([zero, cum], dim=-1)  # padded[i] = cum_{i-1}
    amax = rate.abs().amax(-1).to(torch.float64)  # (C,)
    for block in [b for b in (BLOCK, BLOCK // 2, BLOCK // 4) if b >= 16]:
        starts = torch.arange(0, length, block, device=cum.device)
        ends = torch.clamp(starts + block - 1 + taps - 1, max=length - 1)
        span = padded[..., ends + 1] - padded[..., starts]  # (b, C, blocks)
        if float((span.amax(dim=(0, 2)) * amax).max()) < MAX_EXPONENT:
            return block
    return None


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
) -> Tensor | None:
    """Run the kernel; ``None`` when the factorisation's exponent bound does not hold (use the torch path).

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

    Returns
    -------
    (b, C, L, L) float32 for ``"dense"``; ``(b, L, L)`` float32 channel sum (or max) otherwise.
    """
    bsz, nch, length = cum.shape
    nheads, nstate = read.shape[1], read.shape[-1]
    device = cum.device
    taps = 1 if conv_weight is None else conv_weight.shape[-1]
    block = _block_for(cum, rate, taps, length)
    if block is None:
        return None
    f32 = torch.float32

    def prep(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(f32).contiguous()

    cum = cum.to(torch.float64).contiguous()
    weight = prep(conv_weight) if conv_weight is not None else torch.ones(nch, 1, dtype=f32, device=device)
    args = dict(
        rate=prep(rate), read=prep(read), write=prep(write), ws=prep(write_scale),
        skip=prep(skip), lsc=prep(row_scale), rsc=prep(col_values), col=prep(col_scale),
    )
    dummy = torch.zeros(1, dtype=f32, device=device)
    num_blocks = math.ceil(length / block)
    dense = mode == "dense"
    tiles = _tiles(num_blocks, dense, device)
    if dense:
        groups, per_prog = nch, 1
        out = torch.empty(bsz, nch, length, length, dtype=f32, device=device)
    else:
        # enough programs to fill the GPU; partial sums per channel group, summed (deterministically) after
        want = 4 * 132 if device.type == "cuda" else 1
        groups = max(1, min(nch, math.ceil(want / (tiles.shape[0] * bsz))))
        per_prog = math.ceil(nch / groups)
        groups = math.ceil(nch / per_prog)
        out = torch.zeros(bsz, groups, length, length, dtype=f32, device=device)
    grid = (tiles.shape[0], bsz, groups)
    _ssm_kernel[grid](
        out, tiles, cum, args["rate"], args["read"], args["write"], args["ws"], head_of.to(torch.int32).contiguous(),
        args["skip"] if args["skip"] is not None else dummy,
        args["lsc"] if args["lsc"] is not None else dummy,
        args["rsc"] if args["rsc"] is not None else dummy,
        args["col"] if args["col"] is not None else dummy,
        weight,
        length, nch, nheads, nstate, per_prog,
        out.stride(0), out.stride(1), out.stride(2),
        N_P=max(16, triton.next_power_of_2(nstate)), K=taps, BT=block, BS=block, MODE=MODES[mode],
        HAS_SKIP=skip is not None, HAS_LSC=row_scale is not None, HAS_RSC=col_values is not None,
        HAS_COL=col_scale is not None, PRODUCT=PRODUCT, num_warps=NUM_WARPS,
    )
    if dense:
        return out
    if mode == "max_abs":
        return out.amax(1)
    return out.sum(1)

"""The published algorithm (Itamarzimm/UnifiedImplicitAttnRepr, `compute_attn_matrix_fn` /
`compute_attn_vector_fn`), transcribed for timing comparisons: Python loops over (row, column) pairs,
one cumulative product per entry, dense per-channel matrices, gates applied as dense matrix products.

It is deliberately *not* optimised: it is the baseline the speed claims are measured against. Its
maths is the published one (no D skip, no conv bias), so it is also not exact — see anchors.md §1.5.
"""

from __future__ import annotations

import torch
from torch import Tensor


def s6_full_matrix(dA: Tensor, dB: Tensor, C: Tensor) -> Tensor:
    """α[b, d, r, c] = Σ_n C_r[n] · Π_{k=c+1..r} dA_k[d, n] · dB_c[d, n], entry by entry (≈ L³/6 kernels).

    dA, dB : (b, D, L, N) — ``exp(Δ A)`` and ``Δ B``; C : (b, N, L).
    """
    b, d, length, n = dA.shape
    attn = torch.zeros(b, d, length, length, device=dA.device, dtype=dA.dtype)
    for r in range(length):
        curr_c = C[:, None, :, r]
        for c in range(r + 1):
            curr_a = torch.ones(b, d, n, device=dA.device, dtype=dA.dtype)
            for i in range(r - c):
                curr_a = curr_a * dA[:, :, r - i]
            attn[:, :, r, c] = (curr_a * dB[:, :, c] * curr_c).sum(-1)
    return attn


def conv_matrix(weight: Tensor, length: int) -> Tensor:
    """The published `conv2Mat`: a dense (D, L, L) Toeplitz matrix per channel."""
    d, k = weight.shape
    mat = torch.zeros(d, length, length, device=weight.device, dtype=weight.dtype)
    for t in range(length):
        for j in range(k):
            if t - j >= 0:
                mat[:, t, t - j] = weight[:, k - 1 - j]
    return mat


def uia_full_matrix(dA: Tensor, dB: Tensor, C: Tensor, gate: Tensor, act_slope: Tensor, weight: Tensor) -> Tensor:
    """``diag(SiLU z) · α · diag(σ(p)) · T`` with the diagonals as dense matrices (as published)."""
    alpha = s6_full_matrix(dA, dB, C)
    length = alpha.shape[-1]
    gate_mat = torch.diag_embed(gate)  # (b, D, L, L)
    slope_mat = torch.diag_embed(act_slope)
    return gate_mat @ alpha @ slope_mat @ conv_matrix(weight, length)[None]


def uia_last_row(dA: Tensor, dB: Tensor, C: Tensor, gate: Tensor, act_slope: Tensor, weight: Tensor) -> Tensor:
    """The published `compute_attn_vector_fn` for the last row: one cumulative product per column."""
    b, d, length, n = dA.shape
    r = length - 1
    vec = torch.zeros(b, d, length, device=dA.device, dtype=dA.dtype)
    for c in range(r + 1):
        prod = dA[:, :, c + 1 : r + 1].prod(dim=2) if c < r else torch.ones_like(dA[:, :, 0])
        vec[:, :, c] = (prod * dB[:, :, c] * C[:, None, :, r]).sum(-1)
    vec = vec * act_slope
    k = weight.shape[-1]
    # row r of (v · T): out[c] = Σ_j v[c + j] w[k-1-j], the published F.conv1d(padding=k) formulation
    conv = torch.nn.functional.conv1d(
        torch.nn.functional.pad(vec, (0, k - 1)), weight.flip(-1)[:, None], groups=d
    )[..., :length]
    return conv * gate[..., r : r + 1]

"""ops: every fast tile against its naive reference, and numerical stability at long L."""

from __future__ import annotations

import torch
from conftest import rel_err
from hypothesis import given
from hypothesis import strategies as st

from captum_implicit.core.attention import conv_right
from captum_implicit.ops.decay import diagonal_ssm_tile, segsum


def naive_diagonal_ssm(delta, rate, c, b):
    """α[b, c, t, s] = Σ_n C[t, n] exp(rate[c, n] seg(Δ)[t, s]) B[s, n] Δ_s, via the masked-cumsum segsum."""
    log_decay = delta[:, :, None, :] * rate[None, :, :, None]  # (b, c, N, L): ℓ = Δ·A per state
    decay = torch.exp(segsum(log_decay)).permute(0, 1, 3, 4, 2)  # (b, c, L, L, N)
    return torch.einsum("bctn,bctsn,bcsn->bcts", c.expand(-1, delta.shape[1], -1, -1), decay, b * delta[..., None])


def test_segsum_is_the_sum_over_the_segment():
    x = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)
    seg = segsum(x)
    assert seg[3, 0] == -1.0 + 2.0 + 3.0 and seg[2, 2] == 0 and seg[1, 0] == -1.0
    assert torch.isinf(seg[0, 1]) and seg[0, 1] < 0


@given(
    length=st.integers(1, 40),
    channels=st.integers(1, 4),
    state=st.integers(1, 5),
    r0=st.integers(0, 39),
    rows=st.integers(1, 40),
    k0=st.integers(0, 39),
    cols=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_diagonal_ssm_tile_matches_naive(length, channels, state, r0, rows, k0, cols, seed):
    g = torch.Generator().manual_seed(seed)
    delta = torch.rand(2, channels, length, generator=g, dtype=torch.float64) * 2
    rate = -torch.rand(channels, state, generator=g, dtype=torch.float64) * 3
    c = torch.randn(2, 1, length, state, generator=g, dtype=torch.float64)
    b = torch.randn(2, channels, length, state, generator=g, dtype=torch.float64)
    r0, k0 = r0 % length, k0 % length
    rows_s, cols_s = slice(r0, min(length, r0 + rows)), slice(k0, min(length, k0 + cols))
    cum = torch.cumsum(delta, -1)
    tile = diagonal_ssm_tile(
        cum, rate, lambda p: c[:, :, p], lambda p: b[:, :, p] * delta[:, :, p, None], rows_s, cols_s, torch.float64
    )
    want = naive_diagonal_ssm(delta, rate, c, b)[:, :, rows_s, cols_s]
    assert torch.allclose(tile, want, rtol=1e-12, atol=1e-14)


def test_float32_tiles_stay_accurate_at_long_length():
    # log-decays uniform in [-2, 0] (formulas.md §1): a cumprod ratio is non-finite here and a float32 cumsum
    # difference loses ~1e-4; float64 cumulative sums with pivot factorisation stay at float32 rounding.
    torch.manual_seed(0)
    L = 4096
    delta = torch.rand(1, 1, L, dtype=torch.float64) * 2
    rate = -torch.ones(1, 1, dtype=torch.float64)
    cum = torch.cumsum(delta, -1)
    ones = torch.ones(1, 1, L, 1, dtype=torch.float64)
    rows, cols = slice(L - 64, L), slice(L - 256, L)
    t32 = diagonal_ssm_tile(cum, rate, lambda p: ones[:, :, p], lambda p: ones[:, :, p], rows, cols, torch.float32)
    t64 = diagonal_ssm_tile(cum, rate, lambda p: ones[:, :, p], lambda p: ones[:, :, p], rows, cols, torch.float64)
    assert torch.isfinite(t32).all()
    mask = t64 > 1e-30
    assert float(((t32.double() - t64).abs()[mask] / t64[mask]).max()) < 1e-6


@given(taps=st.integers(1, 5), width=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_conv_right_is_multiplication_by_the_toeplitz_matrix(taps, width, seed):
    g = torch.Generator().manual_seed(seed)
    L = width + taps + 3
    m = torch.randn(1, 2, 4, L, generator=g, dtype=torch.float64)
    w = torch.randn(2, taps, generator=g, dtype=torch.float64)
    T = torch.zeros(2, L, L, dtype=torch.float64)
    for c in range(2):
        for t in range(L):
            for j in range(taps):
                if t - j >= 0:
                    T[c, t, t - j] = w[c, taps - 1 - j]
    want = (m @ T)[..., :width]
    got = conv_right(m[..., : width + taps - 1], w, width)
    assert rel_err(got, want) < 1e-14

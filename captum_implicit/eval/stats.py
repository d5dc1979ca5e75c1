"""Small statistics shared by the metrics: ranks, Spearman correlation, trapezoids, confidence intervals.

Pure torch / ``math`` (no SciPy): the evaluation must run wherever the library runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor


def trapezoid(y: Tensor, x: Tensor) -> Tensor:
    """Area under ``y`` over ``x`` by the trapezoid rule, along the last dimension.

    Parameters
    ----------
    y : (..., F) Tensor
    x : (F,) Tensor, increasing

    Returns
    -------
    (...) Tensor
    """
    x = x.to(y.dtype)
    return ((y[..., 1:] + y[..., :-1]) * (x[1:] - x[:-1]) / 2).sum(-1)


def rankdata(x: Tensor) -> Tensor:
    """Average ranks (1-based, ties share the mean rank) along the last dimension.

    Exact pairwise count, ``O(L²)`` memory per row: fine for token sequences of a few thousand.

    Parameters
    ----------
    x : (..., L) Tensor

    Returns
    -------
    (..., L) float64 Tensor
    """
    x = x.double()
    less = (x[..., None, :] < x[..., :, None]).sum(-1).double()
    equal = (x[..., None, :] == x[..., :, None]).sum(-1).double()
    return less + (equal + 1) / 2


def spearman(a: Tensor, b: Tensor, valid: Tensor | None = None) -> Tensor:
    """Spearman rank correlation per row, over the ``valid`` positions of each row.

    A constant row has no order. Two constant rows count as identically ordered (ρ = 1) — so a
    weight-independent constant explanation *fails* a randomisation test instead of escaping it
    with NaN — and one constant row against a non-constant one as unrelated (ρ = 0).

    Parameters
    ----------
    a, b : (B, L) Tensor
    valid : (B, L) bool Tensor, optional
        Positions to compare (default: all).

    Returns
    -------
    (B,) float64 Tensor (NaN for rows with fewer than two valid positions)
    """
    if valid is None:
        valid = torch.ones_like(a, dtype=torch.bool)
    out = torch.full((a.shape[0],), float("nan"), dtype=torch.float64)
    for i in range(a.shape[0]):
        m = valid[i].to(a.device)
        if int(m.sum()) < 2:
            continue
        ra, rb = rankdata(a[i][m]), rankdata(b[i][m])
        ca, cb = ra - ra.mean(), rb - rb.mean()
        na, nb = ca.norm(), cb.norm()
        if na == 0 and nb == 0:
            out[i] = 1.0
        elif na == 0 or nb == 0:
            out[i] = 0.0
        else:
            out[i] = (ca @ cb / (na * nb)).cpu()
    return out


@lru_cache(maxsize=256)
def t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t distribution with ``df`` degrees of freedom (``0.5 < q < 1``).

    Bisection on the CDF, itself a Simpson integral of the density (error ≪ 1e-6 for the
    quantiles used here).
    """
    if not 0.5 < q < 1 or df < 1:
        raise ValueError(f"need 0.5 < q < 1 and df >= 1, got q={q}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:
        n = 4000  # even
        xs = torch.linspace(0.0, t, n + 1, dtype=torch.float64)
        pdf = torch.exp(log_c - (df + 1) / 2 * torch.log1p(xs * xs / df))
        w = torch.ones(n + 1, dtype=torch.float64)
        w[1:-1:2], w[2:-1:2] = 4.0, 2.0
        return 0.5 + float((w * pdf).sum()) * t / (3 * n)

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Sequence[float] | Tensor, level: float = 0.95) -> tuple[float, float, int]:
    """Mean and half-width of the Student-t ``level`` interval over examples, ignoring NaNs.

    Returns
    -------
    mean, half_width, n
        ``half_width`` is NaN for ``n < 2``; everything is NaN for ``n = 0``.
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    v = v[~torch.isnan(v)]
    n = int(v.numel())
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = float(v.mean())
    if n < 2:
        return mean, float("nan"), 1
    sd = float(v.std(unbiased=True))
    return mean, t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n), n

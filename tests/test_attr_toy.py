"""Known answers on toy models whose implicit attention and gradients can be written down by hand.

``ToyMixer`` computes ``y[t, c] = Σ_s W[c, t, s] x[s, c]`` (so ``A = W``), the classifier reads
position ``q = L-1`` and applies a head ``H``: ``f_k = Σ_c y[q, c] H[c, k]``. Every expected
value below is written with explicit loops from these formulas, not with the library.
"""

from __future__ import annotations

import pytest
import torch
from _attr_models import ToyClassifier, toy_registered
from conftest import rel_err

from captum_implicit import ImplicitAttention, ImplicitAttentionRollout, ImplicitAttnGrad

L, C, K = 6, 3, 2


@pytest.fixture(autouse=True)
def _toy():
    with toy_registered():
        yield


def _ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 11, (batch, L), generator=torch.Generator().manual_seed(3))


def _rownorm_step(r: list[float], m: list[list[float]], normalize: bool) -> list[float]:
    """r · (I + m), rows of (I + m) normalised if asked, by loops."""
    out = [0.0] * L
    for j in range(L):
        s = 1.0 + sum(m[j]) if normalize else 1.0
        for k in range(L):
            out[k] += r[j] * ((1.0 if j == k else 0.0) + m[j][k]) / s
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_attn_grad_one_layer(normalize: bool) -> None:
    model = ToyClassifier(C, L, depth=1, classes=K)
    ids, k, q = _ids(), 1, L - 1
    got = ImplicitAttnGrad(model).attribute(ids, target=k, row_normalize=normalize)
    W, H = model.mixers[0].weight.detach(), model.head.detach()
    for b in range(ids.shape[0]):
        x = model.embed.weight.detach()[ids[b]]  # (L, C)
        # ∂f/∂y[t, c] = δ_tq H[c, k];  ∂f/∂A[c, t, s] = δ_tq H[c, k] x[s, c]
        abar = [[0.0] * L for _ in range(L)]
        for s in range(L):
            abar[q][s] = sum(max(float(W[c, q, s] * H[c, k] * x[s, c]), 0.0) for c in range(C)) / C
        start = [1.0 if t == q else 0.0 for t in range(L)]
        want = torch.tensor(_rownorm_step(start, abar, normalize), dtype=torch.float64)
        assert rel_err(got[b], want) < 1e-12


def test_attn_grad_two_layers() -> None:
    model = ToyClassifier(C, L, depth=2, classes=K)
    ids, k, q = _ids(), 0, L - 1
    got = ImplicitAttnGrad(model).attribute(ids, target=k)
    (W1, W2), H = (m.weight.detach() for m in model.mixers), model.head.detach()
    for b in range(ids.shape[0]):
        x = model.embed.weight.detach()[ids[b]]
        y1 = torch.einsum("cts,sc->tc", W1, x)
        # layer 2: ∂f/∂y2[t, c] = δ_tq H[c, k], values y1
        # layer 1: ∂f/∂y1[t, c] = W2[c, q, t] H[c, k], values x
        a2 = [[0.0] * L for _ in range(L)]
        a1 = [[0.0] * L for _ in range(L)]
        for t in range(L):
            for s in range(L):
                a2[t][s] = (t == q) * sum(max(float(W2[c, q, s] * H[c, k] * y1[s, c]), 0.0) for c in range(C)) / C
                a1[t][s] = sum(max(float(W1[c, t, s] * W2[c, q, t] * H[c, k] * x[s, c]), 0.0) for c in range(C)) / C
        r = [1.0 if t == q else 0.0 for t in range(L)]
        want = _rownorm_step(_rownorm_step(r, a2, True), a1, True)  # e_q F2 F1
        assert rel_err(got[b], torch.tensor(want, dtype=torch.float64)) < 1e-12


def test_rollout_two_layers() -> None:
    model = ToyClassifier(C, L, depth=2, classes=K)
    ids, q = _ids(), L - 1
    got = ImplicitAttentionRollout(model).attribute(ids)
    Ws = [m.weight.detach() for m in model.mixers]
    mats = [[[sum(abs(float(W[c, t, s])) for c in range(C)) / C for s in range(L)] for t in range(L)] for W in Ws]
    r = [1.0 if t == q else 0.0 for t in range(L)]
    want = torch.tensor(_rownorm_step(_rownorm_step(r, mats[1], True), mats[0], True), dtype=torch.float64)
    for b in range(ids.shape[0]):  # data-independent attention: every example gets the same row
        assert rel_err(got[b], want) < 1e-12
    assert torch.allclose(got.sum(-1), torch.ones(ids.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("reduce", ["mean", "abs_sum", "max_abs"])
def test_raw_row_and_matrix(reduce: str) -> None:
    model = ToyClassifier(C, L, depth=2, classes=K)
    ids = _ids()
    W = model.mixers[0].weight.detach()
    ops = {"mean": lambda v: v.mean(0), "abs_sum": lambda v: v.abs().sum(0), "max_abs": lambda v: v.abs().amax(0)}
    want = ops[reduce](W)
    method = ImplicitAttention(model)
    row = method.attribute(ids, layer=0, reduce=reduce, query_position=2)
    assert rel_err(row, want[2].expand(ids.shape[0], -1)) < 1e-14
    mat = method.attribute(ids, layer="mixers.0", reduce=reduce, return_matrix=True)
    assert mat.shape == (ids.shape[0], L, L) and rel_err(mat[1], want) < 1e-14


def test_uia_one_layer() -> None:
    """UIA: s = minmax(max_c (∂f/∂x)⁺), v = minmax(mean_c W[c,q,:]⁺ ⊙ s); rank-1 rollout (v + e_q)/(1+Σv)."""
    model = ToyClassifier(C, L, depth=1, classes=K)
    ids, k, q = _ids(), 1, L - 1
    got = ImplicitAttnGrad(model).attribute(ids, target=k, method="uia")
    W, H = model.mixers[0].weight.detach(), model.head.detach()

    def mm(v: list[float]) -> list[float]:
        lo, hi = min(v), max(v)
        return [(a - lo) / (hi - lo) for a in v]

    for b in range(ids.shape[0]):
        # the mixer has no enclosing block (its parent is a ModuleList): the gradient is at its input x
        s = mm([max(max(float(W[c, q, t] * H[c, k]), 0.0) for c in range(C)) for t in range(L)])
        a = [sum(max(float(W[c, q, t]), 0.0) for c in range(C)) / C for t in range(L)]
        v = mm([a[t] * s[t] for t in range(L)])
        want = [(v[t] + (t == q)) / (1 + sum(v)) for t in range(L)]
        assert rel_err(got[b], torch.tensor(want, dtype=torch.float64)) < 1e-12

"""Ground-truth recovery for tasks whose relevant tokens are known (trigger, copy, shortcut tasks).

Each function scores every example on its ``valid`` positions (real, non-special tokens) against a
boolean ground-truth mask ``G``; an example where the score is undefined (no relevant or no
irrelevant valid token) gives NaN, which the summaries skip.

* **AUROC**: probability that a relevant token outscores an irrelevant one (ties count ½).
* **precision@k**: fraction of the ``k`` top-scored tokens that are relevant; ``k = |G|`` by default,
  which is also the relevance-rank accuracy ``|top_|G| ∩ G| / |G|`` (ties broken at random, seeded).
* **relevance mass accuracy**: ``Σ_{i∈G} R_i⁺ / Σ_i R_i⁺``.
* **pointing game**: is the top-scored token relevant?
"""

from __future__ import annotations

import torch
from torch import Tensor

from .perturb import rank_positions

_NAN = float("nan")


def _check(scores: Tensor, relevant: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and relevant {tuple(relevant.shape)} differ in shape")
    valid = torch.ones_like(relevant, dtype=torch.bool) if valid is None else valid.bool()
    return scores.detach().double().cpu(), relevant.bool().cpu(), valid.cpu()


def auroc(scores: Tensor, relevant: Tensor, valid: Tensor | None = None) -> Tensor:
    """``(B,)`` AUROC of the scores for the relevant tokens (Mann–Whitney, exact with ties)."""
    s, g, v = _check(scores, relevant, valid)
    out = torch.full((s.shape[0],), _NAN, dtype=torch.float64)
    for i in range(s.shape[0]):
        pos, neg = s[i][v[i] & g[i]], s[i][v[i] & ~g[i]]
        if pos.numel() and neg.numel():
            d = pos[:, None] - neg[None, :]
            out[i] = ((d > 0).double() + 0.5 * (d == 0).double()).mean()
    return out


def precision_at_k(
    scores: Tensor, relevant: Tensor, valid: Tensor | None = None, k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``(B,)`` fraction of the top-``k`` valid tokens that are relevant (``k = |G|`` by default)."""
    s, g, v = _check(scores, relevant, valid)
    ranks = rank_positions(s, v, generator)
    n_rel = (g & v).sum(1)
    kk = n_rel if k is None else torch.minimum(torch.full_like(n_rel, k), v.sum(1))
    hits = ((ranks < kk[:, None]) & g & v).sum(1).double()
    out = hits / kk.double()
    return torch.where((kk > 0) & (n_rel > 0), out, torch.full_like(out, _NAN))


def relevance_mass(scores: Tensor, relevant: Tensor, valid: Tensor | None = None) -> Tensor:
    """``(B,)`` share of the positive relevance that falls on relevant tokens."""
    s, g, v = _check(scores, relevant, valid)
    pos = s.clamp_min(0) * v
    total = pos.sum(1)
    out = (pos * g).sum(1) / total
    return torch.where((total > 0) & (g & v).any(1), out, torch.full_like(out, _NAN))


def pointing_game(
    scores: Tensor, relevant: Tensor, valid: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """``(B,)`` 1.0 if the top-scored valid token is relevant, else 0.0 (ties broken at random)."""
    s, g, v = _check(scores, relevant, valid)
    top = rank_positions(s, v, generator) == 0
    out = (top & g).any(1).double()
    return torch.where((g & v).any(1), out, torch.full_like(out, _NAN))

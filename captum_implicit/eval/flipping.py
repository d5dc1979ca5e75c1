"""Token flipping: MoRF / LeRF curves, the area between them (ΔA^F) and Chefer's ± perturbation AUC.

Definitions (evaluation.md §1.1; MambaLRP / AttnLRP; Chefer et al. CVPR 2021):

* fractions ``p_j = j / steps`` (``j = 0..steps``), ``k_j = ⌈p_j · n⌉`` of the ``n`` flippable tokens;
* MoRF flips the ``k`` highest-scored tokens (signed scores, descending), LeRF the ``k`` lowest;
* ``s(p)`` is the explained class's logit (default), its probability, or the 0/1 accuracy;
* ``A_order = ∫₀¹ s_order(p) dp`` (trapezoid), per example; **ΔA^F = A_LeRF − A_MoRF** (higher is
  better, ≈ 0 for a random order; invariant to subtracting ``s(0)`` since both curves share it);
* Chefer **positive** perturbation = AUC of accuracy (%) over the removed fraction ``p ∈ [0, 0.9]`` in
  MoRF order (lower is better), **negative** = the same in LeRF order (higher is better).
  Accuracy is against the true label when given, else against the unperturbed prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from .perturb import Forward, Replacement, flip_masks, fraction_counts, perturbed_scores, rank_positions
from .stats import trapezoid

ScoreKind = Literal["logit", "prob", "accuracy"]


@dataclass
class FlipCurves:
    """Flipping curves of ``N`` examples at ``F`` fractions (all ``(N, F)``, CPU).

    ``*_morf`` / ``*_lerf``: target logit, target probability and predicted class after flipping.
    ``labels``: ``(N,)`` true labels, or ``-1`` where unknown.
    """

    fractions: Tensor
    logit_morf: Tensor
    logit_lerf: Tensor
    prob_morf: Tensor
    prob_lerf: Tensor
    pred_morf: Tensor
    pred_lerf: Tensor
    labels: Tensor

    @classmethod
    def cat(cls, parts: list["FlipCurves"]) -> "FlipCurves":
        """Concatenate batches along the example dimension."""
        kw = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls) if f.name != "fractions"}
        return cls(fractions=parts[0].fractions, **kw)

    def curve(self, order: Literal["morf", "lerf"], score: ScoreKind = "logit") -> Tensor:
        """``(N, F)`` curve ``s_order(p)``; accuracy is 1.0 / 0.0."""
        if score == "accuracy":
            pred = getattr(self, f"pred_{order}")
            ref = torch.where(self.labels >= 0, self.labels, self.pred_morf[:, 0])
            return (pred == ref[:, None]).double()
        return getattr(self, f"{score}_{order}")


def flipping_curves(
    forward: Forward,
    input_ids: Tensor,
    attention_mask: Tensor,
    attributions: Tensor,
    target: Tensor,
    flippable: Tensor,
    replacement: Replacement,
    steps: int = 10,
    labels: Tensor | None = None,
    batch_size: int = 64,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> FlipCurves:
    """MoRF and LeRF flipping curves of one batch (``2·(steps+1)`` variants per example).

    Parameters
    ----------
    forward : (input_ids, attention_mask) -> (B, C) logits
    input_ids, attention_mask : (B, L)
    attributions : (B, L) — signed token scores for ``target``
    target : (B,) long — the explained class
    flippable : (B, L) bool — see :func:`~captum_implicit.eval.perturb.flippable_mask`
    replacement : int or "delete" — an in-distribution neutral token (never an unseen PAD)
    steps : int — number of equal fraction steps (10 or 20 in the literature)
    labels : (B,) long, optional — true labels for the accuracy curves (-1 = unknown)
    generator : torch.Generator, optional — seeds the tie-breaking

    Returns
    -------
    FlipCurves
    """
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    ranks = rank_positions(attributions, flippable, generator)
    ks = fraction_counts(fractions, flippable)
    flips = torch.cat([flip_masks(ranks, flippable, ks, "top"), flip_masks(ranks, flippable, ks, "bottom")], 1)
    sc = perturbed_scores(forward, input_ids, attention_mask, flips, replacement, target, batch_size, pad_id)
    f = steps + 1
    if labels is None:
        labels = torch.full((input_ids.shape[0],), -1, dtype=torch.long)
    return FlipCurves(
        fractions,
        sc.logit[:, :f], sc.logit[:, f:],
        sc.prob[:, :f], sc.prob[:, f:],
        sc.pred[:, :f], sc.pred[:, f:],
        labels.cpu().long(),
    )


def area(curves: FlipCurves, order: Literal["morf", "lerf"], score: ScoreKind = "logit") -> Tensor:
    """``(N,)`` area ``A_order = ∫₀¹ s(p) dp`` per example."""
    return trapezoid(curves.curve(order, score), curves.fractions)


def delta_af(
    curves: FlipCurves, score: ScoreKind = "logit", normalise: Literal["none", "divide"] = "none"
) -> Tensor:
    """``(N,)`` ΔA^F = A_LeRF − A_MoRF per example (higher is better).

    ``normalise="divide"`` divides both curves by ``s(0)`` first (relative units, so long and short
    inputs weigh alike); examples with ``s(0) ≤ 0`` give NaN there, since dividing by a non-positive
    score would flip or explode the curves. Not applicable to accuracy.
    """
    d = area(curves, "lerf", score) - area(curves, "morf", score)
    if normalise == "divide":
        if score == "accuracy":
            raise ValueError("normalise='divide' is meaningless for accuracy curves")
        s0 = curves.curve("morf", score)[:, 0]
        d = torch.where(s0 > 0, d / s0, torch.full_like(d, float("nan")))
    elif normalise != "none":
        raise ValueError(f"normalise must be 'none' or 'divide', got {normalise!r}")
    return d


def perturbation_auc(curves: FlipCurves, order: Literal["morf", "lerf"], max_fraction: float = 0.9) -> Tensor:
    """``(N,)`` Chefer perturbation AUC: accuracy (%) over the removed fraction ``p ≤ max_fraction``.

    ``order="morf"`` is the positive test (lower is better), ``"lerf"`` the negative one (higher is
    better). The dataset mean of this per-example value equals the AUC of the mean accuracy curve.
    """
    keep = curves.fractions <= max_fraction + 1e-9
    return 100 * trapezoid(curves.curve(order, "accuracy")[:, keep], curves.fractions[keep])

"""AOPC: Samek et al.'s perturbation curve average and ERASER comprehensiveness / sufficiency.

* **AOPC** (Samek et al. 2017): ``1/(K+1) · Σ_{k=0..K} (f(x⁽⁰⁾) − f(x⁽ᵏ⁾))`` over the flipping curve's
  fractions, on the explained logit. MoRF: higher is better; LeRF: lower is better.
* **ERASER** (DeYoung et al. 2020, ``rationale_benchmark/metrics.py``), with ``j`` the *predicted*
  class and ``m`` its softmax probability; the rationale ``r`` is the top ``⌈t·n⌉`` flippable tokens:

  - comprehensiveness ``m(x)_j − m(x \\ r)_j`` (rationale replaced; higher is better),
  - sufficiency ``m(x)_j − m(r)_j`` (every other flippable token replaced; lower is better),
  - their AOPC versions average over ``t ∈ {1, 5, 10, 20, 50} %`` with **no** ``k = 0`` term (as the
    ERASER code). Special and read-out tokens stay in both ``x \\ r`` and ``r``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .flipping import FlipCurves
from .perturb import Forward, Replacement, flip_masks, fraction_counts, perturbed_scores, rank_positions

ERASER_THRESHOLDS = (0.01, 0.05, 0.1, 0.2, 0.5)


def aopc(curves: FlipCurves, order: Literal["morf", "lerf"] = "morf") -> Tensor:
    """``(N,)`` Samek AOPC of the logit curve, ``mean_k (s(0) − s(p_k))`` over all fractions incl. 0."""
    s = curves.curve(order, "logit")
    return (s[:, :1] - s).mean(1)


@dataclass
class EraserScores:
    """Per-example ERASER scores: ``(N, T)`` per threshold and their ``(N,)`` AOPC means."""

    thresholds: Tensor
    comprehensiveness: Tensor
    sufficiency: Tensor

    @property
    def aopc_comprehensiveness(self) -> Tensor:
        return self.comprehensiveness.mean(1)

    @property
    def aopc_sufficiency(self) -> Tensor:
        return self.sufficiency.mean(1)

    @classmethod
    def cat(cls, parts: list["EraserScores"]) -> "EraserScores":
        return cls(
            parts[0].thresholds,
            torch.cat([p.comprehensiveness for p in parts]),
            torch.cat([p.sufficiency for p in parts]),
        )


def eraser_scores(
    forward: Forward,
    input_ids: Tensor,
    attention_mask: Tensor,
    attributions: Tensor,
    flippable: Tensor,
    replacement: Replacement,
    thresholds: Sequence[float] = ERASER_THRESHOLDS,
    predicted: Tensor | None = None,
    batch_size: int = 64,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> EraserScores:
    """ERASER comprehensiveness and sufficiency of one batch (``1 + 2·T`` variants per example).

    Parameters
    ----------
    forward : (input_ids, attention_mask) -> (B, C) logits
    input_ids, attention_mask, attributions, flippable : (B, L)
        ``attributions`` should explain the predicted class (ERASER's ``j``).
    replacement : int or "delete"
    thresholds : fractions of the flippable tokens forming the rationale
    predicted : (B,) long, optional — the predicted class; computed here when omitted
    generator : torch.Generator, optional — seeds the tie-breaking

    Returns
    -------
    EraserScores
    """
    b = input_ids.shape[0]
    t = torch.as_tensor(list(thresholds), dtype=torch.float64)
    if predicted is None:
        with torch.no_grad():
            predicted = forward(input_ids, attention_mask).argmax(-1)
    ranks = rank_positions(attributions, flippable, generator)
    k = fraction_counts(t, flippable)
    n = flippable.sum(1, keepdim=True).to(k.device)
    zero = torch.zeros(b, 1, dtype=torch.long, device=k.device)
    flips = torch.cat(
        [
            flip_masks(ranks, flippable, zero, "top"),  # the unperturbed input
            flip_masks(ranks, flippable, k, "top"),  # x \ r
            flip_masks(ranks, flippable, n - k, "bottom"),  # r only
        ],
        1,
    )
    p = perturbed_scores(forward, input_ids, attention_mask, flips, replacement, predicted, batch_size, pad_id).prob
    nt = t.numel()
    return EraserScores(t, p[:, :1] - p[:, 1 : 1 + nt], p[:, :1] - p[:, 1 + nt :])

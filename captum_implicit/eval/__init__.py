"""Faithfulness, ground-truth and sanity evaluation of token attributions.

An *explainer* is any callable ``(input_ids, attention_mask, target) -> (B, L)`` token scores;
:mod:`.registry` builds them by name (Captum baselines, a random baseline, and our methods, imported
lazily). The metrics:

* :mod:`.flipping` — MoRF / LeRF token flipping, ΔA^F on logit and accuracy, Chefer ± perturbation AUC;
* :mod:`.aopc` — Samek AOPC, ERASER comprehensiveness / sufficiency;
* :mod:`.ground_truth` — AUROC, precision@k, relevance mass, pointing game;
* :mod:`.sanity` — cascading model-parameter randomisation (MPRT);

all built on one perturbation engine (:mod:`.perturb`; the flip value is a required parameter:
an in-distribution neutral token, never an unseen PAD). :func:`.runner.evaluate` runs everything
and writes Markdown / CSV tables, PNG curves and the exact command and seed.
"""

from .aopc import ERASER_THRESHOLDS, EraserScores, aopc, eraser_scores
from .explainers import attribution_explainer, embedding_explainer, random_explainer
from .flipping import FlipCurves, area, delta_af, flipping_curves, perturbation_auc
from .ground_truth import auroc, pointing_game, precision_at_k, relevance_mass
from .model import IdsForward, TokenModel
from .perturb import apply_flips, flippable_mask, perturbed_scores, rank_positions
from .registry import available_methods, build_explainer, register_method
from .runner import EvaluationResult, Task, evaluate
from .sanity import MPRTResult, layer_groups, mprt
from .stats import mean_ci, spearman

__all__ = [
    "ERASER_THRESHOLDS", "EraserScores", "EvaluationResult", "FlipCurves", "IdsForward", "MPRTResult", "Task",
    "TokenModel", "aopc", "apply_flips", "area", "attribution_explainer", "auroc", "available_methods",
    "build_explainer", "delta_af", "embedding_explainer", "eraser_scores", "evaluate", "flippable_mask",
    "flipping_curves", "layer_groups", "mean_ci", "mprt", "perturbation_auc", "perturbed_scores",
    "pointing_game", "precision_at_k", "random_explainer", "rank_positions", "register_method",
    "relevance_mass", "spearman",
]

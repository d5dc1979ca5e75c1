"""Explainers: anything that maps ``(input_ids, attention_mask, target)`` to ``(B, L)`` token scores.

Every metric takes such a callable. This module adapts the usual sources to it:

* **Captum attribution classes on token models** act on ``inputs_embeds`` through a small forward
  wrapper (:meth:`TokenModel.logits_from_embeds`: the model called with ``inputs_embeds=`` and the
  padding mask, read at the read-out). The ``(B, L, D)`` attribution becomes one score per token by

  - **summing over the embedding dimension** for gradient methods (Saliency: ``Σ_d |∂f/∂e_d|`` with
    Captum's default ``abs=True``; InputXGradient and IntegratedGradients: ``Σ_d e_d · ∂f/∂e_d``, the
    token's share of the first-order / path decomposition);
  - **reading the token's shared value** for token-grouped perturbation methods (FeatureAblation,
    Occlusion with a ``(1, D)`` window, KernelShap), which give every coordinate of a group the same
    number (summing would multiply it by ``D``). Their baseline is the embedding of the replacement
    token, the same in-distribution token the flipping metrics use, so ablation = flipping.

* **Captum-style objects on token ids** (our ``captum_implicit.attr`` / ``lrp`` classes) are called as
  ``obj.attribute(input_ids, target=target, additional_forward_args=(attention_mask,))``; a
  ``(B, L, D)`` result is summed over ``D``.
* a seeded **random** baseline.

Scores at padding positions are set to 0 (the metrics never use them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .model import TokenModel

Explainer = Callable[[Tensor, Tensor, Tensor], Tensor]


def _finish(scores: Tensor, attention_mask: Tensor) -> Tensor:
    return (scores.detach() * attention_mask.to(scores.device, scores.dtype)).to(attention_mask.device)


def random_explainer(seed: int = 0) -> Explainer:
    """Uniform random scores from a generator seeded once (reproducible given the call order)."""
    gen = torch.Generator().manual_seed(seed)

    def explain(input_ids: Tensor, attention_mask: Tensor, target: Tensor) -> Tensor:
        return _finish(torch.rand(input_ids.shape, generator=gen, dtype=torch.float64), attention_mask.cpu())

    return explain


def _baseline_embeds(tm: TokenModel, input_ids: Tensor, baseline_token_id: int | None) -> Tensor | None:
    if baseline_token_id is None:
        return None
    with torch.no_grad():
        return tm.embed(torch.full_like(input_ids, int(baseline_token_id))).detach()


def embedding_explainer(
    method_cls: type, tm: TokenModel, reduce: str = "sum", baseline_token_id: int | None = None,
    init_kwargs: dict[str, Any] | None = None, **attribute_kwargs: Any,
) -> Explainer:
    """Adapt a Captum attribution class to token ids by attributing the input embeddings.

    Parameters
    ----------
    method_cls : a Captum ``Attribution`` class constructed as ``method_cls(forward_func)``
    tm : TokenModel
    reduce : "sum" (gradient methods) or "group" (token-grouped perturbation methods: every
        coordinate of a token holds the same value; its mean is that value)
    baseline_token_id : int, optional
        Baselines become this token's embedding (default: Captum's zeros).
    attribute_kwargs
        Passed to ``attribute`` (e.g. ``n_steps=50``, ``n_samples=200``).
    """

    def forward(inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        return tm.logits_from_embeds(inputs_embeds, attention_mask)

    method = method_cls(forward, **(init_kwargs or {}))

    def explain(input_ids: Tensor, attention_mask: Tensor, target: Tensor) -> Tensor:
        embeds = tm.embed(input_ids).detach()
        if reduce == "sum":  # gradient methods: Captum would set it anyway, with a warning
            embeds.requires_grad_()
        b, length, d = embeds.shape
        kw = dict(attribute_kwargs)
        base = _baseline_embeds(tm, input_ids, baseline_token_id)
        if base is not None:
            kw["baselines"] = base
        if reduce == "group" and "sliding_window_shapes" not in kw:
            kw["feature_mask"] = torch.arange(length, device=embeds.device).view(1, length, 1).expand(b, length, d)
        attr = method.attribute(embeds, target=target, additional_forward_args=(attention_mask,), **kw)
        scores = attr.sum(-1) if reduce == "sum" else attr.mean(-1)
        return _finish(scores, attention_mask)

    explain.method = method  # type: ignore[attr-defined]
    return explain


def attribution_explainer(obj: Any, **attribute_kwargs: Any) -> Explainer:
    """Adapt a Captum-style object working on token ids (``attribute(input_ids, target=…,
    additional_forward_args=(attention_mask,))``, e.g. ``ImplicitAttnGrad(IdsForward(model))``)."""

    def explain(input_ids: Tensor, attention_mask: Tensor, target: Tensor) -> Tensor:
        attr = obj.attribute(input_ids, target=target, additional_forward_args=(attention_mask,), **attribute_kwargs)
        if isinstance(attr, tuple):
            attr = attr[0]
        if attr.dim() == 3:
            attr = attr.sum(-1)
        return _finish(attr, attention_mask)

    explain.method = obj  # type: ignore[attr-defined]
    return explain


class WeightedLeastSquares:
    """Closed-form weighted least squares with intercept, as Captum's interpretable ``Model``.

    KernelShap's default interpretable model is scikit-learn's ``LinearRegression``; this one needs
    no scikit-learn, is deterministic, and solves the same problem (KernelShap's sampling already
    follows the Shapley kernel, and its end-point samples carry a large weight).
    """

    def __init__(self) -> None:
        self.coef: Tensor | None = None
        self.intercept: Tensor | None = None
        self.device = torch.device("cpu")

    def fit(self, train_data: DataLoader, **kwargs: object) -> dict:
        # solved on the CPU in float64 (the SVD-based `gelsd` driver is CPU-only and handles rank deficiency)
        xs, ys, ws = [], [], []
        for batch in train_data:
            x, y = batch[0], batch[1]
            self.device = x.device
            w = batch[2] if len(batch) > 2 else torch.ones(x.shape[0])
            xs.append(x.double().cpu())
            ys.append(y.double().cpu().reshape(x.shape[0], -1))
            ws.append(w.double().cpu().reshape(-1))
        x, y, w = torch.cat(xs), torch.cat(ys), torch.cat(ws)
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        sw = w.sqrt()[:, None]
        sol = torch.linalg.lstsq(xa * sw, y * sw, driver="gelsd").solution  # (F+1, K)
        self.coef, self.intercept = sol[:-1].T.contiguous(), sol[-1]
        return {}

    def representation(self) -> Tensor:
        assert self.coef is not None, "fit first"
        return self.coef.float().to(self.device)

    def __call__(self, x: Tensor) -> Tensor:
        assert self.coef is not None and self.intercept is not None
        return (x.double().cpu() @ self.coef.T + self.intercept).to(x.device)


def _register_model_class() -> type:
    from captum._utils.models.model import Model

    Model.register(WeightedLeastSquares)
    return WeightedLeastSquares


# ---------------------------------------------------------------- the Captum baselines


def saliency(tm: TokenModel, **kw: Any) -> Explainer:
    """Saliency (``Σ_d |∂f/∂e_d|``; one forward + one backward)."""
    from captum.attr import Saliency

    return embedding_explainer(Saliency, tm, "sum", **kw)


def input_x_gradient(tm: TokenModel, **kw: Any) -> Explainer:
    """InputXGradient (``Σ_d e_d ∂f/∂e_d``; one forward + one backward)."""
    from captum.attr import InputXGradient

    return embedding_explainer(InputXGradient, tm, "sum", **kw)


def integrated_gradients(
    tm: TokenModel, n_steps: int = 50, baseline_token_id: int | None = None,
    internal_batch_size: int | None = None, **kw: Any,
) -> Explainer:
    """IntegratedGradients, ``n_steps=50`` (Gauss–Legendre), zero-embedding baseline unless a token is given."""
    from captum.attr import IntegratedGradients

    return embedding_explainer(
        IntegratedGradients, tm, "sum", baseline_token_id, n_steps=n_steps,
        internal_batch_size=internal_batch_size, **kw,
    )


def feature_ablation(
    tm: TokenModel, baseline_token_id: int | None = None, perturbations_per_eval: int = 8, **kw: Any
) -> Explainer:
    """FeatureAblation with one feature per token (about ``L`` forwards of the batch)."""
    from captum.attr import FeatureAblation

    return embedding_explainer(
        FeatureAblation, tm, "group", baseline_token_id, perturbations_per_eval=perturbations_per_eval, **kw
    )


def occlusion(tm: TokenModel, baseline_token_id: int | None = None, window: int = 1, **kw: Any) -> Explainer:
    """Occlusion with a ``window``-token sliding window of stride 1 token (about ``L`` forwards)."""
    from captum.attr import Occlusion

    d = tm.model.get_input_embeddings().weight.shape[1]
    return embedding_explainer(
        Occlusion, tm, "group", baseline_token_id, sliding_window_shapes=(window, d), strides=(1, d), **kw
    )


def _require_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "kernel_shap(solver='sklearn') fits Captum's default interpretable model "
            "(scikit-learn's LinearRegression) and needs scikit-learn: `pip install captum-implicit[eval]`, "
            "or pass solver='lstsq' for the built-in weighted least squares (same problem, no dependency)"
        ) from e


#: KernelShap coalitions per example; rank stability between two seeds measured in docs/evaluation.md
KERNEL_SHAP_SAMPLES = 500


def kernel_shap(
    tm: TokenModel, n_samples: int = KERNEL_SHAP_SAMPLES, baseline_token_id: int | None = None,
    perturbations_per_eval: int = 50, solver: str = "sklearn", **kw: Any,
) -> Explainer:
    """KernelShap with ``n_samples`` coalitions per example, one feature per token.

    ``solver="sklearn"`` (default) keeps Captum's own interpretable model, scikit-learn's
    ``LinearRegression`` (the ``eval`` extra); ``"lstsq"`` uses :class:`WeightedLeastSquares`, the
    same weighted regression solved in torch. Sampling uses torch's global RNG: seed it (the runner
    does). The default ``n_samples`` was chosen by the seed-to-seed rank stability measured on the
    bundled models (docs/evaluation.md); 200–1000 are needed for text (evaluation.md §4).
    """
    from captum.attr import KernelShap

    if solver not in ("sklearn", "lstsq"):
        raise ValueError(f"solver must be 'sklearn' or 'lstsq', got {solver!r}")
    if solver == "sklearn":
        _require_sklearn()
    fn = embedding_explainer(
        KernelShap, tm, "group", baseline_token_id, n_samples=n_samples,
        perturbations_per_eval=perturbations_per_eval, **kw,
    )
    if solver == "lstsq":
        fn.method.interpretable_model = _register_model_class()()  # type: ignore[attr-defined]

    def explain(input_ids: Tensor, attention_mask: Tensor, target: Tensor) -> Tensor:
        with warnings.catch_warnings():
            # Captum warns that a batch trains one regression per example: that is what we want
            warnings.filterwarnings("ignore", message="You are providing multiple inputs for Lime")
            return fn(input_ids, attention_mask, target)

    explain.method = fn.method  # type: ignore[attr-defined]
    return explain


# ---------------------------------------------------------------- LRP


class _EmbedsForward(nn.Module):
    """``forward(input_ids=None, attention_mask=None, inputs_embeds=None)`` → ``(B, C)`` read-out logits.

    :class:`~captum_implicit.lrp.GatedLinearLRP` calls a module that takes ``inputs_embeds`` as
    ``module(None, *additional_forward_args, inputs_embeds=...)`` and reads position ``-1`` of
    per-position logits; this wrapper gives it the read-out at the last *real* token instead (right
    padding), and contains the model so the composite finds its layers.
    """

    def __init__(self, tm: TokenModel) -> None:
        super().__init__()
        self.model = tm.model
        self._tm = tm

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        if inputs_embeds is None:
            return self._tm.logits(input_ids, attention_mask)
        return self._tm.logits_from_embeds(inputs_embeds, attention_mask)


def gated_linear_lrp(tm: TokenModel, composite: Any = None) -> Explainer:
    """:class:`~captum_implicit.lrp.GatedLinearLRP` (default composite: exact gradient × input LRP).

    Raises
    ------
    UnsupportedModelError
        When a gated-linear layer of the model has no LRP form (the runner reports the method as
        "n/a (unsupported family)" for that model).
    """
    from ..core.errors import UnsupportedModelError
    from ..lrp import GatedLinearLRP

    from ..lrp.canonizers import mixers_without_lrp_form

    missing = mixers_without_lrp_form(tm.model)
    if missing:
        raise UnsupportedModelError(
            f"no LRP form for {len(missing)} layer(s), e.g. {missing[0]}; GatedLinearLRP supports "
            "the families with a registered LRPForm (captum_implicit.lrp.lrp_forms())"
        )
    lrp = GatedLinearLRP(_EmbedsForward(tm), composite=composite, embedding=tm.model.get_input_embeddings())
    return attribution_explainer(lrp)

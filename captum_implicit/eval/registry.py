"""Methods by name: ``name -> factory(token_model, **options) -> Explainer``.

The Captum baselines and the random baseline are registered here. Our own methods live in
``captum_implicit.attr`` / ``captum_implicit.lrp`` and are imported only when first built, so the
evaluation works (and can be tested) before, and independently of, those modules. Each of ours is
constructed as ``cls(IdsForward(model))`` (LRP: see :func:`~.explainers.gated_linear_lrp`) — an ``nn.Module``
calling the model by keyword with ``(input_ids, attention_mask)`` — and called as
``attribute(input_ids, target=target, additional_forward_args=(attention_mask,), **options)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Union

from . import explainers as ex
from .model import TokenModel

Explainer = ex.Explainer
MethodFactory = Callable[..., Explainer]
#: what :func:`build_explainer` accepts: a registered name, (name, options), or ``factory(token_model)``
MethodSpec = Union[str, tuple[str, dict[str, Any]], Callable[[TokenModel], Explainer]]

_REGISTRY: dict[str, MethodFactory] = {}
#: options a factory may take from the task (filled in by the runner when the factory accepts them)
TASK_OPTIONS = ("baseline_token_id", "seed")


def register_method(name: str, factory: MethodFactory, overwrite: bool = False) -> None:
    """Register ``factory(token_model, **options) -> Explainer`` under ``name``."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"method {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = factory


def available_methods() -> list[str]:
    """Registered names (ours included, whether or not their modules are importable yet)."""
    return sorted(_REGISTRY)


def lazy_attribution(module: str, cls_name: str, **attribute_kwargs: Any) -> MethodFactory:
    """A factory for ``module.cls_name`` (a Captum-style class on token ids), imported when built."""

    def factory(tm: TokenModel, **options: Any) -> Explainer:
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError) as e:
            raise ImportError(f"{module}.{cls_name} is not available ({e}); it is needed by this method") from e
        return ex.attribution_explainer(cls(tm.ids_forward), **{**attribute_kwargs, **options})

    factory.__doc__ = f"{module}.{cls_name}({attribute_kwargs or ''}), imported lazily"
    return factory


def _random(tm: TokenModel, seed: int = 0) -> Explainer:
    return ex.random_explainer(seed)


def build_explainer(spec: MethodSpec, tm: TokenModel, **task_options: Any) -> Explainer:
    """Resolve a method spec into an explainer for ``tm``.

    ``task_options`` (``baseline_token_id``, ``seed``) are passed to registered factories that take
    them — so ablation baselines use the task's replacement token — and never override options
    given explicitly in ``(name, options)``.
    """
    import inspect

    if callable(spec) and not isinstance(spec, str):
        return spec(tm)
    name, options = (spec, {}) if isinstance(spec, str) else spec
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(available_methods())}")
    factory = _REGISTRY[name]
    params = inspect.signature(factory).parameters
    extra = {k: v for k, v in task_options.items() if k in params and k not in options}
    return factory(tm, **extra, **options)


#: methods whose explainer raises this for a model report "n/a" for it instead of stopping the run
def not_applicable_errors() -> tuple[type[BaseException], ...]:
    """The library's error types meaning "this method does not apply to this model's layers"."""
    from ..core.errors import UnsupportedModelError

    return (UnsupportedModelError,)


for _name, _factory in {
    "random": _random,
    "saliency": ex.saliency,
    "input_x_gradient": ex.input_x_gradient,
    "integrated_gradients": ex.integrated_gradients,
    "feature_ablation": ex.feature_ablation,
    "occlusion": ex.occlusion,
    "kernel_shap": ex.kernel_shap,
    # ours (lazy)
    "implicit_attn_grad": lazy_attribution("captum_implicit.attr", "ImplicitAttnGrad"),
    "uia": lazy_attribution("captum_implicit.attr", "ImplicitAttnGrad", method="uia"),
    "implicit_attention_rollout": lazy_attribution("captum_implicit.attr", "ImplicitAttentionRollout"),
    "implicit_attention": lazy_attribution("captum_implicit.attr", "ImplicitAttention"),
    "mamba_attr": lazy_attribution("captum_implicit.attr", "MambaAttr"),
    "gated_linear_lrp": ex.gated_linear_lrp,
}.items():
    register_method(_name, _factory)

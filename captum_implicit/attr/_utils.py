"""Plumbing shared by the attribution classes: inputs, forward outputs, targets, query positions, layouts.

Kept free of any method logic so that every class formats inputs, selects targets and
lays out its result the same way (the Captum contract, see ``captum.md`` §3–4).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from captum._utils.common import _select_targets
from captum._utils.typing import TargetType
from torch import Tensor, nn

from ..core.capture import check_inputs
from ..core.errors import InputError

QueryType = int | Sequence[int] | Tensor | None

#: names under which a forward function receives the padding mask (1 = token, 0 = padding)
MASK_NAMES = ("attention_mask", "mask", "padding_mask")


# --------------------------------------------------------------------- model
def resolve_model(forward_func: Callable, model: nn.Module | None) -> nn.Module:
    """The module to capture: ``model`` if given, else ``forward_func`` itself (an ``nn.Module``).

    Captum's LLM wrappers replace ``forward_func`` by an ``nn.Module`` holding the model
    (``GradientForwardFunc``), which is therefore captured as well.
    """
    if model is not None:
        return model
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    if isinstance(getattr(owner, "model", None), nn.Module):
        return owner.model
    raise InputError(
        "forward_func is a plain function: pass the model containing the explained layers as `model=` "
        "(e.g. ImplicitAttnGrad(lambda e: model(inputs_embeds=e).logits[:, -1], model=model))."
    )


# -------------------------------------------------------------------- inputs
def check_attribution_inputs(
    forward_func: Callable, model: nn.Module, inputs: tuple[Tensor, ...], additional_forward_args: tuple
) -> None:
    """Refuse inputs the explanation cannot run on, before the model runs, with an error naming the problem.

    The first input must be ``(B, L)`` token ids or ``(B, L, D, ...)`` embeddings with ``L ≥ 1``; where the model
    itself is an HF model called directly, its inputs are checked as HF's (:func:`~captum_implicit.core.capture.
    check_inputs`: integer ``(B, L)`` ids, no NaN or inf in floating inputs). A wrapper's own inputs are its own.
    """
    first = inputs[0]
    if first.dim() < 2:
        raise InputError(f"the first input must be (B, L) token ids or (B, L, D) embeddings, got {tuple(first.shape)}")
    if first.shape[0] == 0 or first.shape[1] == 0:
        raise InputError(f"the first input has no tokens to explain: shape {tuple(first.shape)} (B, L, ...)")
    if forward_func is model and getattr(model, "main_input_name", None) == "input_ids":  # an HF model's own forward
        check_inputs(model, (*inputs, *additional_forward_args), {})


def padding_mask(forward_func: Callable, inputs: tuple, additional_forward_args: tuple) -> Tensor | None:
    """The ``(B, L)`` padding mask among the forward arguments, found by parameter name.

    ``forward_func`` is called as ``forward_func(*inputs, *additional_forward_args)``; the
    argument landing on a parameter named ``attention_mask`` (or ``mask`` / ``padding_mask``)
    is the mask. Returns ``None`` when there is none (every token is real).
    """
    fn = forward_func.forward if isinstance(forward_func, nn.Module) else forward_func
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    args = (*inputs, *additional_forward_args)
    ref = inputs[0]
    for param, arg in zip(positional, args, strict=False):
        if param.name in MASK_NAMES and isinstance(arg, Tensor) and arg.dim() == 2:
            if tuple(arg.shape) != tuple(ref.shape[:2]):
                raise InputError(f"{param.name} has shape {tuple(arg.shape)}, expected {tuple(ref.shape[:2])}")
            return arg != 0
    return None


def resolve_queries(query_position: QueryType, mask: Tensor | None, batch: int, length: int) -> Tensor:
    """Query position of every example, ``(B,)`` long in ``[0, length)``.

    ``None``: the last non-padding token (by ``mask``), else the last token. An int (negative
    counts from the end of ``length``) applies to every example; a sequence/tensor gives one per
    example. Integer positions only, and none on padding (its row would be a padding token's).
    """
    device = mask.device if mask is not None else None
    if query_position is None:
        if mask is None or mask.shape[1] != length:
            return torch.full((batch,), length - 1, dtype=torch.long, device=device)
        pos = torch.arange(length, device=mask.device).expand(batch, -1)
        last = torch.where(mask, pos, -1).amax(dim=1)
        if bool((last < 0).any()):
            raise InputError("an example has no non-padding token (its attention_mask is all zero)")
        return last
    q = torch.as_tensor(query_position, device=device)
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise InputError(f"query_position must be integer positions, got {q.tolist()} ({q.dtype})")
    q = q.long()
    if q.dim() == 0:
        q = q.expand(batch)
    if q.shape != (batch,):
        raise InputError(f"query_position must be an int or one position per example ({batch}), got {tuple(q.shape)}")
    if bool(((q < -length) | (q >= length)).any()):
        raise InputError(f"query_position {q.tolist()} out of range for sequence length {length}")
    q = q % length
    if mask is not None and mask.shape[1] == length:
        padded = ~mask.bool()[torch.arange(batch, device=mask.device), q.to(mask.device)]
        if bool(padded.any()):  # its row would be a padding token's, and padding columns are zeroed
            raise InputError(
                f"query_position {q.tolist()} falls on padding (attention_mask 0) in example(s) "
                f"{padded.nonzero().flatten().tolist()}; query a real token"
            )
    return q


def valid_tokens(queries: Tensor, mask: Tensor | None, length: int) -> Tensor:
    """``(B, L)`` bool: positions at or before the query that are not padding."""
    pos = torch.arange(length, device=queries.device)
    valid = pos[None, :] <= queries[:, None]
    if mask is not None and mask.shape[1] == length:
        valid = valid & mask.to(valid.device)
    return valid


def one_hot_rows(queries: Tensor, length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(B, L)`` with a 1 at each example's query position."""
    out = torch.zeros(queries.shape[0], length, dtype=dtype, device=device)
    out[torch.arange(queries.shape[0], device=device), queries.to(device)] = 1
    return out


# ------------------------------------------------------------------ outputs
def logits_of(output: Any) -> Tensor:
    """The tensor a forward returned: ``.logits`` of HF outputs, the first element of tuples."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise InputError(f"cannot read scores from a forward output of type {type(output).__name__}")


def target_scores(
    output: Any, target: TargetType, query_position: QueryType, mask: Tensor | None
) -> Tensor:
    """One scalar per example, ``(B,)``: the target score at the query position.

    ``(B, L, V)`` outputs (causal LMs) are first read at each example's query position,
    giving ``(B, V)``; then ``target`` is applied exactly as Captum does
    (:func:`captum._utils.common._select_targets`).
    """
    scores = logits_of(output)
    batch = scores.shape[0]
    if scores.dim() == 3:
        q = resolve_queries(query_position, mask, batch, scores.shape[1]).to(scores.device)
        scores = scores[torch.arange(batch, device=scores.device), q]
    try:
        scores = _select_targets(scores, target)
    except IndexError as err:  # torch's message names neither the target nor what it indexes
        raise InputError(
            f"target {target!r} is out of range for the {scores.shape[-1]} scores per example of the model's output"
        ) from err
    if scores.numel() != batch:
        raise InputError(
            f"the forward output gives {scores.numel() // max(batch, 1)} scores per example after target "
            f"selection; pass `target` (a class index, or a token id for causal LMs) so that there is one"
        )
    return scores.reshape(batch)


# ------------------------------------------------------------------ layouts
def to_input_layout(relevance: Tensor, inputs: tuple[Tensor, ...], sequence_layout: bool) -> tuple[Tensor, ...]:
    """Lay per-token relevance ``(B, L)`` out like the inputs.

    * token ids ``(B, L)``: ``(B, L)``;
    * embeddings ``(B, L, D, ...)``: the token's score spread uniformly over the feature
      dimensions (each gets ``r / D``), so ``attr.sum(-1)`` is the token relevance and
      ``attr.shape == inputs.shape`` (as ``captum.metrics.infidelity`` requires);
    * further inputs of a tuple (masks, ...): zeros of their shape;
    * ``sequence_layout`` (Captum's LLM wrapper): ``(B, L_model, 1)``, where ``L_model`` is the
      length the model ran on (the prompt plus already generated target tokens).
    """
    if sequence_layout:
        return (relevance[..., None],) + tuple(torch.zeros_like(x, dtype=relevance.dtype) for x in inputs[1:])
    first = inputs[0]
    if tuple(first.shape[:2]) != tuple(relevance.shape):
        raise InputError(
            f"the model ran on {relevance.shape[1]} tokens but the first input has shape {tuple(first.shape)}; "
            "the first input must be the (B, L) token ids or the (B, L, D) embeddings of the explained sequence"
        )
    if first.dim() > 2:
        features = first.shape[2:].numel()
        out_dtype = first.dtype if first.is_floating_point() else relevance.dtype
        view = relevance.to(out_dtype).reshape(*relevance.shape, *([1] * (first.dim() - 2))) / features
        main = view.expand(first.shape).contiguous()
    else:
        main = relevance
    rest = tuple(
        torch.zeros(x.shape, dtype=x.dtype if x.is_floating_point() else relevance.dtype, device=x.device)
        for x in inputs[1:]
    )
    return (main, *rest)


# ------------------------------------------------------------- grad anchors
class GradAnchors:
    """Forward pre-hooks on chosen modules that make their input part of the autograd graph.

    The first floating tensor argument of each hooked module (positional, else the
    ``hidden_states`` keyword, else any floating keyword) is replaced, when it does not
    require grad (frozen parameters, token-id inputs), by a detached copy that does — values
    unchanged, nothing upstream lost (nothing upstream required grad). Each (possibly
    replaced) input is recorded per module name, in call order.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.inputs: dict[str, list[Tensor]] = {name: [] for name in modules}
        self._handles: list[Any] = []

    def __enter__(self) -> GradAnchors:
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if not torch.is_grad_enabled():
                return None
            for i, a in enumerate(args):
                if _is_float(a):
                    a = _anchor(a)
                    self.inputs[name].append(a)
                    return (*args[:i], a, *args[i + 1 :]), kwargs
            keys = ["hidden_states"] if _is_float(kwargs.get("hidden_states")) else []
            keys += [k for k, v in kwargs.items() if _is_float(v) and k != "hidden_states"]
            if keys:
                a = _anchor(kwargs[keys[0]])
                self.inputs[name].append(a)
                return args, {**kwargs, keys[0]: a}
            return None

        return hook


def _is_float(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def _anchor(x: Tensor) -> Tensor:
    return x if x.requires_grad else x.detach().requires_grad_(True)


def minmax(x: Tensor, valid: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Min–max normalise ``x`` over ``dims`` using only valid tokens (last dim); invalid → 0.

    Constant inputs give 0 (the published code would divide by zero).
    """
    v = valid.reshape(valid.shape[0], *([1] * (x.dim() - 2)), valid.shape[-1]).expand_as(x)
    lo = torch.where(v, x, torch.full_like(x, float("inf"))).amin(dim=dims, keepdim=True)
    hi = torch.where(v, x, torch.full_like(x, float("-inf"))).amax(dim=dims, keepdim=True)
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, (x - lo) / safe, torch.zeros_like(x))
    return torch.where(v, out, torch.zeros_like(out))

"""Explain one text with a user's own model (``captum-implicit explain``): targets, methods, the report section.

A causal LM is explained at its last position: by default for the token it predicts next (the arg-max
of the logits there), or for ``target`` (a token string or id). A sequence classifier is explained for
its predicted class, or ``target`` (a label name or index).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .attr._utils import logits_of
from .core.errors import InputError
from .local_model import LocalModel

#: ``--method`` names → what the report calls them
METHODS = {
    "attn_grad": "ImplicitAttnGrad (implicit attention × gradient, rolled out)",
    "rollout": "ImplicitAttentionRollout (|implicit attention|, rolled out; target-agnostic)",
    "uia": "ImplicitAttnGrad(method='uia') (the published UIA pipeline)",
    "ig": "Captum LayerIntegratedGradients (50 steps, baseline: every token replaced by {baseline})",
}
DEFAULT_METHODS = ("attn_grad", "ig")


@dataclass
class Explanation:
    """What ``explain`` prints and reports for one text."""

    text: str
    tokens: list[str]
    target: int
    target_label: str
    probability: float
    scores: dict[str, Tensor]  # method name → (L,) relevance
    maps: list[tuple[str, str, Tensor]]  # (layer name, family, (L, L) channel-mean |A|)
    labels: dict[str, str]  # method name → its description in the report

    @property
    def caption(self) -> str:
        return f"explained: {self.target_label} (p = {self.probability:.3f})"


def encode(lm: LocalModel, text: str) -> Tensor:
    """Token ids ``(1, L)`` on the model's device, after the checks a newcomer needs."""
    if not text.strip():
        raise InputError("empty --text: give a text to explain")
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    if ids.shape[-1] == 0:
        raise InputError(f"the tokenizer turned {text!r} into no tokens")
    if lm.max_length is not None and ids.shape[-1] > lm.max_length:
        raise InputError(
            f"text has {ids.shape[-1]} tokens, more than the model's maximum of {lm.max_length} positions; shorten it"
        )
    return ids.to(lm.device)


def display_tokens(lm: LocalModel, ids: Tensor) -> list[str]:
    """Readable token strings (byte-level BPE markers decoded; blanks shown by their raw token)."""
    raw = lm.tokenizer.convert_ids_to_tokens(ids.tolist())
    out = []
    for i, r in zip(ids.tolist(), raw, strict=True):
        text = lm.tokenizer.decode([i]).strip()
        out.append(text if text else str(r))
    return out


def resolve_target(lm: LocalModel, target: str | None, scores: Tensor) -> tuple[int, str]:
    """``(index into scores, description)``; ``scores`` is ``(V,)`` (causal LM) or ``(K,)`` (classifier)."""
    count = scores.shape[-1]
    if target is None:
        index = int(scores.argmax())
        how = "predicted"
    elif target.lstrip("-").isdigit():
        index, how = int(target), "given"
        if not 0 <= index < count:
            what = "token id" if lm.kind == "causal_lm" else "class index"
            raise InputError(f"--target {target}: {what} out of range [0, {count})")
    elif lm.kind == "classifier":
        by_name = {v: k for k, v in lm.labels.items()}
        if target not in by_name:
            raise InputError(f"--target {target!r} is not a label of this classifier; labels: {lm.labels}")
        index, how = by_name[target], "given"
    else:
        index, how = _token_id(lm, target), "given"
    if lm.kind == "classifier":
        return index, f"{how} class {index} ({lm.labels.get(index, index)})"
    return index, f"{how} next token {lm.tokenizer.decode([index])!r} (id {index}) at the last position"


def _token_id(lm: LocalModel, token: str) -> int:
    tok = lm.tokenizer
    vocab = tok.get_vocab()
    if token in vocab:
        return int(vocab[token])
    ids = tok(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InputError(
            f"--target {token!r} is {len(ids)} tokens for this tokenizer; give one token (or its id)"
        )
    return int(ids[0])


def no_cache_forward(model: torch.nn.Module) -> Callable[[Tensor], object]:
    """``ids -> model(ids)`` with ``use_cache=False`` where the forward takes it: a whole-sequence explanation
    needs no cache, and HF RWKV's in-place cache update would block the backward of gradient methods."""
    try:
        takes_cache = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_cache = False
    if takes_cache:
        return lambda ids: model(ids, use_cache=False)
    return model


def explain_text(lm: LocalModel, text: str, target: str | None, methods: list[str]) -> Explanation:
    """Run every method in ``methods`` (keys of :data:`METHODS`) on ``text``."""
    import captum_implicit as ci

    ids = encode(lm, text)
    model = lm.model
    forward = no_cache_forward(model)
    with torch.no_grad():
        logits = logits_of(forward(ids)).float()
    scores = logits[0, -1] if lm.kind == "causal_lm" else logits[0]
    index, label = resolve_target(lm, target, scores)
    probability = float(scores.softmax(-1)[index])
    results: dict[str, Tensor] = {}
    labels = {name: METHODS.get(name, name) for name in methods}
    for name in methods:
        if name == "attn_grad":
            results[name] = ci.ImplicitAttnGrad(forward, model=model).attribute(ids, target=index)[0]
        elif name == "uia":
            results[name] = ci.ImplicitAttnGrad(forward, model=model).attribute(ids, target=index, method="uia")[0]
        elif name == "rollout":
            results[name] = ci.ImplicitAttentionRollout(forward, model=model).attribute(ids)[0]
        elif name == "ig":
            results[name], base = _integrated_gradients(lm, ids, index)
            labels[name] = labels[name].format(baseline=base)
        else:
            raise InputError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    with ci.Capture(model) as cap, torch.no_grad():
        forward(ids)
    layers = cap.layers
    maps = [(la.name, la.family, la.aggregate("abs_mean")[0].detach().cpu()) for la in layers]
    tokens = display_tokens(lm, ids[0])
    results = {k: v.detach().cpu() for k, v in results.items()}
    return Explanation(text, tokens, index, label, probability, results, maps, labels)


def _integrated_gradients(lm: LocalModel, ids: Tensor, index: int) -> tuple[Tensor, str]:
    """LayerIntegratedGradients on the embeddings; the baseline repeats the pad (else eos, unk, id 0) token."""
    from captum.attr import LayerIntegratedGradients

    run = no_cache_forward(lm.model)
    causal = lm.kind == "causal_lm"

    def forward(x: Tensor) -> Tensor:
        out = logits_of(run(x))
        return out[:, -1] if causal else out

    tok = lm.tokenizer
    base_id = next((t for t in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) if t is not None), 0)
    baseline = torch.full_like(ids, int(base_id))
    lig = LayerIntegratedGradients(forward, lm.embedding())
    attr = lig.attribute(ids, baselines=baseline, target=index, n_steps=50, internal_batch_size=25)
    return attr.sum(-1)[0], repr(tok.decode([int(base_id)]) or tok.convert_ids_to_tokens(int(base_id)))

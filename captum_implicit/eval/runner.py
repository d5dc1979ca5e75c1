"""Run every metric for every method on every (model, dataset) task and write the report.

``evaluate(tasks, methods, out_dir)`` writes into ``out_dir``:

* ``results.md`` / ``results.csv`` — per task and method, mean ± 95 % interval over examples of every
  metric (ΔA^F on logit and accuracy, MoRF/LeRF areas, AOPC, Chefer ± perturbation AUC, ERASER
  comprehensiveness/sufficiency, ground-truth AUROC / precision / mass / pointing where the dataset
  marks relevant tokens, MPRT ρ after full randomisation, seconds per explanation);
* ``per_example.csv`` — every metric of every example;
* ``flip_<task>.png`` (flipping curves) and ``mprt_<task>.png`` (randomisation curves);
* ``run.json`` — the exact command, seed, settings, replacement tokens and package versions.

A method whose explainer raises the library's "not supported" error for a model (``UnsupportedModelError``:
LRP on a family without an LRP form, MambaAttr on a model without Mamba layers) is reported as "n/a" for
that task, with the reason, instead of stopping the run.

Dataset items are dicts with ``input_ids`` (ints) or ``text`` (tokenised with the task's tokenizer),
optionally ``label`` (int), and ``relevant_mask`` (one bool per token) or ``relevant_positions``
(ints) for ground-truth tasks; or tuples ``(ids_or_text, label[, relevant_mask])``.

Example::

    from captum_implicit.eval import Task, evaluate
    evaluate(
        [Task("trigger/mamba", model, tokenizer, data, replacement=neutral_id)],
        {"random": "random", "IG-50": "integrated_gradients", "KernelSHAP-500": ("kernel_shap", {"n_samples": 500}),
         "AttnGrad": "implicit_attn_grad", "UIA": "uia", "MambaAttr": "mamba_attr"},
        "reports/trigger", seed=0,
    )
"""

from __future__ import annotations

import json
import platform
import sys
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .aopc import ERASER_THRESHOLDS, EraserScores, aopc, eraser_scores
from .flipping import FlipCurves, area, delta_af, flipping_curves, perturbation_auc
from .ground_truth import auroc, pointing_game, precision_at_k, relevance_mass
from .model import TokenModel
from .perturb import Replacement, flippable_mask
from .registry import MethodSpec, build_explainer, not_applicable_errors
from .report import markdown, plot_flip_curves, plot_mprt, summarise, write_csv
from .sanity import MPRTResult, mprt


@dataclass
class Task:
    """One model and dataset to evaluate.

    Attributes
    ----------
    name : str
    model : nn.Module
        See :class:`~captum_implicit.eval.model.TokenModel` for the calling convention.
    tokenizer : HF tokenizer, optional
        Needed for ``text`` items; gives the pad id, padding side and special tokens.
    dataset : sequence of items (see module docstring)
    replacement : int, "delete" or None
        The flip value. ``None`` picks the most frequent non-special token of the dataset that is
        never marked relevant — an in-distribution, usually neutral token — and records it. Never
        an unseen PAD id (evaluation.md §2).
    target : "predicted" or "label"
        The explained class (ERASER always uses the predicted one).
    special_ids : ints, optional
        Never flipped (default: the tokenizer's special ids).
    protect_last : bool, optional
        Never flip the last real token (default: True when the model returns per-position logits,
        i.e. a causal read-out).
    pad_id : int, optional
        Default: the tokenizer's, else 0.
    max_length : int, optional
        Truncation for ``text`` items.
    """

    name: str
    model: nn.Module
    tokenizer: Any = None
    dataset: Sequence[Any] = ()
    replacement: Replacement | None = None
    target: Literal["predicted", "label"] = "predicted"
    special_ids: Sequence[int] | None = None
    protect_last: bool | None = None
    pad_id: int | None = None
    max_length: int | None = None


@dataclass
class Example:
    ids: list[int]
    label: int | None = None
    relevant: list[bool] | None = None


@dataclass
class Batch:
    index: Tensor  # (B,) example indices
    ids: Tensor
    mask: Tensor
    labels: Tensor  # (B,), -1 = unknown
    relevant: Tensor | None  # (B, L) bool
    target: Tensor = field(default_factory=lambda: torch.empty(0))
    predicted: Tensor = field(default_factory=lambda: torch.empty(0))
    flippable: Tensor = field(default_factory=lambda: torch.empty(0))


@dataclass
class EvaluationResult:
    """Everything :func:`evaluate` computed (also written to ``out_dir``)."""

    summary: list[dict[str, Any]]
    per_example: list[dict[str, Any]]
    curves: dict[str, dict[str, FlipCurves]]
    mprt: dict[str, dict[str, MPRTResult]]
    meta: dict[str, Any]
    out_dir: Path


# ---------------------------------------------------------------- data


def _encode(item: Any, tokenizer: Any, max_length: int | None) -> Example:
    relevant = None
    if isinstance(item, Mapping):
        x = item["input_ids"] if "input_ids" in item else item["text"]
        label = item.get("label")
        relevant = item.get("relevant_mask")
        positions = item.get("relevant_positions")
    elif isinstance(item, (tuple, list)) and item and not isinstance(item[0], int):
        x, label = item[0], item[1] if len(item) > 1 else None
        relevant = item[2] if len(item) > 2 else None
        positions = None
    else:
        x, label, positions = item, None, None
    if isinstance(x, str):
        if tokenizer is None:
            raise ValueError("a text item needs the task's tokenizer")
        kw = {"truncation": True, "max_length": max_length} if max_length else {}
        x = tokenizer(x, **kw)["input_ids"]
    ids = [int(t) for t in (x.tolist() if isinstance(x, Tensor) else x)]
    if positions is not None:
        relevant = [False] * len(ids)
        for p in positions:
            relevant[int(p)] = True
    if relevant is not None:
        relevant = [bool(r) for r in (relevant.tolist() if isinstance(relevant, Tensor) else relevant)]
        if len(relevant) != len(ids):
            raise ValueError(f"relevant mask of length {len(relevant)} for {len(ids)} tokens")
    return Example(ids, None if label is None else int(label), relevant)


def _special_ids(task: Task) -> list[int]:
    if task.special_ids is not None:
        return [int(i) for i in task.special_ids]
    return [int(i) for i in getattr(task.tokenizer, "all_special_ids", [])]


def _pad_id(task: Task) -> int:
    if task.pad_id is not None:
        return task.pad_id
    pid = getattr(task.tokenizer, "pad_token_id", None)
    return int(pid) if pid is not None else 0


def choose_replacement(examples: Sequence[Example], special_ids: Sequence[int]) -> int:
    """The most frequent non-special token never marked relevant (ties: smallest id)."""
    exclude = set(special_ids)
    for ex in examples:
        if ex.relevant is not None:
            exclude.update(t for t, r in zip(ex.ids, ex.relevant) if r)
    counts = Counter(t for ex in examples for t in ex.ids if t not in exclude)
    if not counts:
        raise ValueError("no candidate replacement token; pass Task.replacement")
    return min(counts, key=lambda t: (-counts[t], t))


def _collate(examples: Sequence[Example], start: int, pad_id: int, left: bool, device: torch.device) -> Batch:
    length = max(len(e.ids) for e in examples)
    b = len(examples)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    has_gt = any(e.relevant is not None for e in examples)
    rel = torch.zeros((b, length), dtype=torch.bool) if has_gt else None
    for i, e in enumerate(examples):
        sl = slice(length - len(e.ids), length) if left else slice(0, len(e.ids))
        ids[i, sl] = torch.tensor(e.ids)
        mask[i, sl] = 1
        if rel is not None and e.relevant is not None:
            rel[i, sl] = torch.tensor(e.relevant)
    labels = torch.tensor([-1 if e.label is None else e.label for e in examples])
    idx = torch.arange(start, start + b)
    return Batch(idx, ids.to(device), mask.to(device), labels, rel)


def _progress(it: Any, desc: str, total: int, enabled: bool) -> Any:
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra
        return it
    return tqdm(it, desc=desc, total=total, leave=False)


# ---------------------------------------------------------------- evaluation


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _prepare(
    task: Task, tm: TokenModel, batch_size: int, max_examples: int | None
) -> tuple[list[Batch], dict[str, Any]]:
    examples = [_encode(it, task.tokenizer, task.max_length) for it in task.dataset]
    if max_examples is not None:
        examples = examples[:max_examples]
    if not examples:
        raise ValueError(f"task {task.name!r} has no examples")
    special = _special_ids(task)
    replacement = task.replacement if task.replacement is not None else choose_replacement(examples, special)
    pad_id = _pad_id(task)
    left = getattr(task.tokenizer, "padding_side", "right") == "left"
    device = _model_device(task.model)
    batches = [
        _collate(examples[s : s + batch_size], s, pad_id, left, device) for s in range(0, len(examples), batch_size)
    ]
    protect_last = task.protect_last
    with torch.no_grad():
        for bt in batches:
            logits = tm.logits(bt.ids, bt.mask)
            bt.predicted = logits.argmax(-1)
            if task.target == "label":
                if (bt.labels < 0).any():
                    raise ValueError(f"task {task.name!r}: target='label' but some examples have no label")
                bt.target = bt.labels.to(logits.device)
            else:
                bt.target = bt.predicted
            if protect_last is None:
                protect_last = bool(tm.sequence_output)
            bt.flippable = flippable_mask(bt.ids, bt.mask, special, protect_last)
    if isinstance(replacement, int) and not any(replacement in ex.ids for ex in examples):
        warnings.warn(
            f"task {task.name!r}: the flip value {replacement} never occurs in the dataset; if the model never "
            "saw it in training, flipping to it can add evidence and hide differences between methods "
            "(evaluation.md §2). Prefer a frequent neutral token or 'delete'.",
            stacklevel=3,
        )
    token = None
    if isinstance(replacement, int) and hasattr(task.tokenizer, "convert_ids_to_tokens"):
        token = task.tokenizer.convert_ids_to_tokens(replacement)
    info = {
        "n_examples": len(examples),
        "replacement": replacement,
        "replacement_token": token,
        "replacement_chosen": "given" if task.replacement is not None else "most frequent non-special, non-relevant",
        "special_ids": special,
        "protect_last": protect_last,
        "pad_id": pad_id,
        "padding_side": "left" if left else "right",
        "target": task.target,
        "with_ground_truth": any(bt.relevant is not None for bt in batches),
    }
    return batches, info


def _per_example(
    task: str, method: str, bt: Batch, curves: FlipCurves, eraser: EraserScores, attr: Tensor, seconds: float,
    gen: torch.Generator,
) -> list[dict[str, Any]]:
    cols: dict[str, Tensor] = {
        "dAF_logit": delta_af(curves, "logit"),
        "dAF_acc": delta_af(curves, "accuracy"),
        "A_morf_logit": area(curves, "morf"),
        "A_lerf_logit": area(curves, "lerf"),
        "aopc_morf": aopc(curves, "morf"),
        "aopc_lerf": aopc(curves, "lerf"),
        "pert_pos": perturbation_auc(curves, "morf"),
        "pert_neg": perturbation_auc(curves, "lerf"),
        "eraser_comp": eraser.aopc_comprehensiveness,
        "eraser_suff": eraser.aopc_sufficiency,
    }
    if bt.relevant is not None:
        rel, valid = bt.relevant, bt.flippable.cpu()
        cols.update(
            gt_auroc=auroc(attr, rel, valid),
            gt_precision=precision_at_k(attr, rel, valid, generator=gen),
            gt_mass=relevance_mass(attr, rel, valid),
            gt_pointing=pointing_game(attr, rel, valid, generator=gen),
        )
    rows = []
    for i in range(len(bt.index)):
        row: dict[str, Any] = {"task": task, "method": method, "example": int(bt.index[i])}
        row.update({k: float(v[i]) for k, v in cols.items()})
        row["seconds"] = seconds / len(bt.index)
        rows.append(row)
    return rows


def evaluate(
    tasks: Sequence[Task | tuple[str, nn.Module, Any, Sequence[Any]]],
    methods: Mapping[str, MethodSpec],
    out_dir: str | Path,
    *,
    steps: int = 10,
    eraser_thresholds: Sequence[float] = ERASER_THRESHOLDS,
    batch_size: int = 16,
    perturb_batch_size: int = 128,
    max_examples: int | None = None,
    seed: int = 0,
    sanity: bool = True,
    sanity_examples: int = 8,
    sanity_layers: Sequence[str] | Literal["auto"] = "auto",
    progress: bool = True,
    command: str | None = None,
) -> EvaluationResult:
    """Compute every metric per example for every method on every task and write the report.

    Parameters
    ----------
    tasks : Task or (name, model, tokenizer, dataset) tuples
    methods : {display name: spec}
        A spec is a registered name (``"integrated_gradients"``, ``"implicit_attn_grad"``, …; see
        :func:`~captum_implicit.eval.registry.available_methods`), ``(name, options)``, or a
        factory ``token_model -> explainer``. Registered factories that take a
        ``baseline_token_id`` receive the task's replacement token.
    out_dir : directory for the report (created)
    steps : fraction steps of the flipping curves (``p = 0, 1/steps, …, 1``)
    eraser_thresholds : ERASER rationale sizes (fractions of the flippable tokens)
    batch_size : examples per explanation call
    perturb_batch_size : rows per forward of the perturbed variants
    max_examples : use only the first examples of each dataset
    seed : seeds torch (KernelShap sampling, random baseline, tie-breaking, MPRT)
    sanity : run the randomisation test on the first ``sanity_examples`` examples
    sanity_layers : see :func:`~captum_implicit.eval.sanity.layer_groups`
    progress : tqdm progress bars
    command : recorded in ``run.json`` (default: this process's command line)

    Returns
    -------
    EvaluationResult
    """
    wall0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "command": command if command is not None else " ".join([sys.executable, *sys.argv]),
        "seed": seed,
        "steps": steps,
        "eraser_thresholds": list(eraser_thresholds),
        "batch_size": batch_size,
        "max_examples": max_examples,
        "sanity": {"enabled": sanity, "examples": sanity_examples, "layers": sanity_layers, "order": "cascading"},
        "score": "logit of the target class (ΔA^F, AOPC); softmax probability of the predicted class (ERASER)",
        "methods": {name: repr(spec) for name, spec in methods.items()},
        "versions": _versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tasks": {},
    }
    per_example: list[dict[str, Any]] = []
    all_curves: dict[str, dict[str, FlipCurves]] = {}
    all_mprt: dict[str, dict[str, MPRTResult]] = {}
    not_applicable = not_applicable_errors()
    for raw in tasks:
        task = raw if isinstance(raw, Task) else Task(*raw)
        tm = TokenModel(task.model)
        was_training = task.model.training
        task.model.eval()
        try:
            batches, info = _prepare(task, tm, batch_size, max_examples)
            meta["tasks"][task.name] = info
            all_curves[task.name], all_mprt[task.name] = {}, {}
            rep = info["replacement"]
            info["not_applicable"] = {}
            for name, spec in methods.items():
                torch.manual_seed(seed)
                gen = torch.Generator().manual_seed(seed)
                try:
                    explainer = build_explainer(
                        spec, tm, baseline_token_id=rep if isinstance(rep, int) else None, seed=seed
                    )
                    t0 = time.perf_counter()
                    first = explainer(batches[0].ids, batches[0].mask, batches[0].target)
                    first_seconds = time.perf_counter() - t0
                except not_applicable as e:  # e.g. LRP or MambaAttr on a family they do not cover
                    info["not_applicable"][name] = f"{type(e).__name__}: {e}"
                    continue
                parts = []
                for bi, bt in enumerate(_progress(batches, f"{task.name} · {name}", len(batches), progress)):
                    if bi == 0:  # computed above, where a method that does not apply is detected
                        attr, seconds = first, first_seconds
                    else:
                        t0 = time.perf_counter()
                        attr = explainer(bt.ids, bt.mask, bt.target)
                        seconds = time.perf_counter() - t0
                    attr = attr.detach().cpu().double()
                    if attr.shape != bt.ids.shape:
                        raise ValueError(
                            f"method {name!r} returned {tuple(attr.shape)}, expected {tuple(bt.ids.shape)}"
                        )
                    curves = flipping_curves(
                        tm, bt.ids, bt.mask, attr, bt.target, bt.flippable, rep, steps, bt.labels,
                        perturb_batch_size, info["pad_id"], gen,
                    )
                    eraser = eraser_scores(
                        tm, bt.ids, bt.mask, attr, bt.flippable, rep, eraser_thresholds, bt.predicted,
                        perturb_batch_size, info["pad_id"], gen,
                    )
                    parts.append(curves)
                    per_example += _per_example(task.name, name, bt, curves, eraser, attr, seconds, gen)
                all_curves[task.name][name] = FlipCurves.cat(parts)
                if sanity:
                    res = _sanity(task, tm, explainer, batches, sanity_examples, sanity_layers, seed)
                    all_mprt[task.name][name] = res
                    # the sanity subset is the first examples of the first batch: indices 0..n-1
                    rows = {r["example"]: r for r in per_example if r["task"] == task.name and r["method"] == name}
                    for i, rho in enumerate(res.final().tolist()):
                        rows[i]["mprt_rho"] = rho
        finally:
            task.model.train(was_training)
    meta["wall_seconds"] = round(time.perf_counter() - wall0, 1)
    return _write(out, meta, per_example, all_curves, all_mprt)


def _sanity(
    task: Task, tm: TokenModel, explainer: Any, batches: list[Batch], n: int, layers: Any, seed: int
) -> MPRTResult:
    first = batches[0]
    n = min(n, len(first.index))
    sl = slice(0, n)
    return mprt(
        task.model, explainer, first.ids[sl], first.mask[sl], first.target[sl],
        valid=first.flippable[sl], layers=layers, seed=seed,
    )


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("captum", "transformers", "captum_implicit"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except ImportError:
                continue
        out[mod] = getattr(m, "__version__", "?")
    return out


def _write(
    out: Path, meta: dict[str, Any], per_example: list[dict[str, Any]],
    curves: dict[str, dict[str, FlipCurves]], mprt_res: dict[str, dict[str, MPRTResult]],
) -> EvaluationResult:
    summary = summarise(per_example)
    na = {t: info.get("not_applicable", {}) for t, info in meta["tasks"].items()}
    na_rows = [
        {"task": t, "method": m, "metric": "n/a", "mean": float("nan"), "ci95": float("nan"), "n": 0, "note": why}
        for t, by_method in na.items() for m, why in by_method.items()
    ]
    write_csv(summary + na_rows, out / "results.csv")
    write_csv(per_example, out / "per_example.csv")
    header = ["# Faithfulness evaluation", "", f"Command: `{meta['command']}`  ", f"Seed: {meta['seed']}  ",
              f"Wall time: {meta.get('wall_seconds', float('nan')):.0f} s", ""]
    for name, info in meta["tasks"].items():
        tok = f" ({info['replacement_token']!r})" if info["replacement_token"] is not None else ""
        header.append(
            f"- **{name}**: {info['n_examples']} examples; flip value {info['replacement']}{tok} "
            f"({info['replacement_chosen']}); read-out token protected: {info['protect_last']}; "
            f"explained class: {info['target']}"
        )
    (out / "results.md").write_text(markdown(summary, "\n".join(header), na))
    try:
        import matplotlib  # noqa: F401  (the optional `viz` extra)
    except ImportError:
        warnings.warn("matplotlib is not installed: no PNG plots written", stacklevel=3)
    else:
        for task, by_method in curves.items():
            if by_method:
                plot_flip_curves(by_method, out / f"flip_{_slug(task)}.png", f"{task}: token flipping")
        for task, by_method in mprt_res.items():
            if by_method:
                plot_mprt(by_method, out / f"mprt_{_slug(task)}.png", f"{task}: cascading randomisation")
    (out / "run.json").write_text(json.dumps(meta, indent=2, default=str))
    return EvaluationResult(summary, per_example, curves, mprt_res, meta, out)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)

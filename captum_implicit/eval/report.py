"""Tables and figures of an evaluation: CSV, Markdown (mean ± 95 % interval) and PNG curves."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .flipping import FlipCurves
from .sanity import MPRTResult
from .stats import mean_ci


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool


#: every per-example metric the runner records, in table order
METRICS: tuple[Metric, ...] = (
    Metric("dAF_logit", "ΔA^F logit", True),
    Metric("dAF_acc", "ΔA^F acc.", True),
    Metric("A_morf_logit", "A_MoRF logit", False),
    Metric("A_lerf_logit", "A_LeRF logit", True),
    Metric("aopc_morf", "AOPC MoRF", True),
    Metric("aopc_lerf", "AOPC LeRF", False),
    Metric("pert_pos", "pos. pert. AUC %", False),
    Metric("pert_neg", "neg. pert. AUC %", True),
    Metric("eraser_comp", "comprehensiveness", True),
    Metric("eraser_suff", "sufficiency", False),
    Metric("gt_auroc", "GT AUROC", True),
    Metric("gt_precision", "GT P@k", True),
    Metric("gt_mass", "GT mass acc.", True),
    Metric("gt_pointing", "GT pointing", True),
    Metric("mprt_rho", "MPRT ρ (randomised)", False),
    Metric("seconds", "s / explanation", False),
)


def summarise(per_example: Sequence[Mapping[str, Any]], level: float = 0.95) -> list[dict[str, Any]]:
    """Long-format summary rows ``task, method, metric, mean, ci95, n`` (NaNs skipped)."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in per_example:
        groups.setdefault((row["task"], row["method"]), []).append(row)
    out = []
    for (task, method), rows in groups.items():
        for m in METRICS:
            vals = [r[m.key] for r in rows if r.get(m.key) is not None]
            mean, hw, n = mean_ci(vals, level)
            if n:
                out.append({"task": task, "method": method, "metric": m.key, "mean": mean, "ci95": hw, "n": n})
    return out


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Write dict rows (union of keys, first-seen order) to ``path``."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _fmt(mean: float, hw: float) -> str:
    digits = 3 if abs(mean) < 100 else 1
    return f"{mean:.{digits}f}" if math.isnan(hw) else f"{mean:.{digits}f} ± {hw:.{digits}f}"


def markdown(
    summary: Sequence[Mapping[str, Any]], header: str = "",
    not_applicable: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """One Markdown table per task: methods as rows, metrics as columns (↑/↓ = better).

    ``not_applicable[task][method]`` (a reason) adds an "n/a" line under the task's table.
    """
    lines = [header.rstrip(), ""] if header else []
    na = not_applicable or {}
    for task in dict.fromkeys([*(r["task"] for r in summary), *na]):
        rows = [r for r in summary if r["task"] == task]
        skipped = [f"- {m}: n/a (unsupported family) — {why}" for m, why in na.get(task, {}).items()]
        if not rows:
            lines += [f"## {task}", "", *skipped, ""]
            continue
        present = [m for m in METRICS if any(r["metric"] == m.key for r in rows)]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        cell = {(r["method"], r["metric"]): r for r in rows}
        n = max(r["n"] for r in rows)
        lines += [f"## {task} (n = {n})", ""]
        heads = [f"{m.label} {'↑' if m.higher_is_better else '↓'}" for m in present]
        lines.append("| method | " + " | ".join(heads) + " |")
        lines.append("|---" * (len(present) + 1) + "|")
        for meth in methods:
            vals = [cell.get((meth, m.key)) for m in present]
            lines.append(f"| {meth} | " + " | ".join(_fmt(v["mean"], v["ci95"]) if v else "—" for v in vals) + " |")
        lines.append("")
        if skipped:
            lines += [*skipped, ""]
    lines.append(
        "Mean ± half-width of the Student-t 95 % interval over examples. GT P@k: k = number of relevant "
        "tokens. MPRT ρ: Spearman ρ of |R| with the original after cascading randomisation of all layers."
    )
    return "\n".join(lines) + "\n"


def _band(ax: Any, x: Any, y: torch.Tensor, label: str) -> None:
    mean = y.nanmean(0)
    n = (~torch.isnan(y)).sum(0).clamp_min(1)
    se = torch.nan_to_num(torch.sqrt(((y - mean) ** 2).nansum(0) / (n - 1).clamp_min(1) / n))
    line = ax.plot(x, mean, marker=".", label=label)[0]
    ax.fill_between(x, mean - 1.96 * se, mean + 1.96 * se, alpha=0.15, color=line.get_color())


def plot_flip_curves(curves: Mapping[str, FlipCurves], path: Path, title: str = "") -> None:
    """2×2 PNG: logit change ``s(p) − s(0)`` and accuracy, MoRF and LeRF, mean ± 1.96 s.e. per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax in axes.flat:  # 20 distinct colours: the full benchmark plots 13 methods
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for name, c in curves.items():
        x = c.fractions.numpy()
        for col, order in enumerate(("morf", "lerf")):
            logit = c.curve(order, "logit")
            _band(axes[0, col], x, logit - logit[:, :1], name)
            _band(axes[1, col], x, c.curve(order, "accuracy"), name)
    for col, order in enumerate(("MoRF", "LeRF")):
        axes[0, col].set_title(f"{order}: target logit change")
        axes[1, col].set_title(f"{order}: accuracy")
        axes[1, col].set_xlabel("fraction of tokens flipped")
    axes[0, 0].set_ylabel("s(p) − s(0)")
    axes[1, 0].set_ylabel("accuracy")
    axes[0, 1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_mprt(results: Mapping[str, MPRTResult], path: Path, title: str = "") -> None:
    """PNG: mean Spearman ρ (|R|) of each randomisation step, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    steps: list[str] = []
    for name, r in results.items():
        steps = r.steps
        ax.plot(range(len(r.steps)), r.spearman_abs.nanmean(0).numpy(), marker="o", label=name)
    ax.set_xticks(range(len(steps)), steps, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("Spearman ρ with the original |R|")
    ax.set_xlabel("randomised down to (cascading, top first)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

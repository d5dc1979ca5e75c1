"""A self-contained HTML report: per text, token heatmaps per method and each layer's matrix as an image.

The page has no external resources (PNGs are inlined as ``data:`` URIs) so it opens offline; the
PNGs are also written next to it (``text{k}_layer{j}.png``).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .matrix import matrix_png
from .text import html_heatmap

_STYLE = """body{font-family:sans-serif;margin:2em}
.tok{padding:2px 3px;margin:1px;border-radius:3px;display:inline-block}
.heatmap{margin:.6em 0} .method{font-size:.85em;color:#555} .matrices{display:flex;flex-wrap:wrap;gap:1em}
img.matrix{max-width:420px}"""


@dataclass
class ReportSection:
    """One explained text.

    Attributes
    ----------
    text : str
        The heading (the input text).
    caption : str
        A line under it (e.g. the prediction and the explained target).
    heatmaps : list of (method label, tokens, scores)
        ``scores`` one per token, any sign (red positive, blue negative).
    matrices : list of (layer name, family, (L, L) tensor)
        E.g. ``LayerAttention.aggregate("abs_mean")[0]``.
    matrix_tokens : list of str
        Tick labels of the matrices (length ``L``).
    """

    text: str
    caption: str
    heatmaps: list[tuple[str, Sequence[str], torch.Tensor]] = field(default_factory=list)
    matrices: list[tuple[str, str, torch.Tensor]] = field(default_factory=list)
    matrix_tokens: Sequence[str] = ()


def write_report(out: str | Path, title: str, intro: str, sections: Sequence[ReportSection]) -> Path:
    """Write ``out/report.html`` and ``out/text{k}_layer{j}.png``; returns the HTML path.

    ``intro`` is inserted as HTML (trusted text from the caller); every other string is escaped.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for k, sec in enumerate(sections):
        imgs = []
        for j, (name, family, mat) in enumerate(sec.matrices):
            png = matrix_png(mat, list(sec.matrix_tokens) or None, title=f"{name} ({family}): mean |A| over channels")
            (out / f"text{k}_layer{j}.png").write_bytes(png)
            imgs.append(
                f"<figure><img class='matrix' alt='{html.escape(name)}' "
                f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
                f"<figcaption>{html.escape(name)} ({html.escape(family)})</figcaption></figure>"
            )
        parts.append(
            f"<section><h2>{html.escape(sec.text)}</h2><p>{html.escape(sec.caption)}</p>"
            + "".join(html_heatmap(tokens, scores, label) for label, tokens, scores in sec.heatmaps)
            + "<div class='matrices'>"
            + "".join(imgs)
            + "</div></section>"
        )
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>captum-implicit: {html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>captum-implicit — {html.escape(title)}</h1>\n"
        f"<p>{intro}</p>\n{''.join(parts)}</body></html>"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path

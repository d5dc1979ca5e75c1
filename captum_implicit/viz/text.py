"""Per-token heatmaps: ANSI colours for terminals, ``<span>`` backgrounds for HTML.

Scores are scaled by their maximum absolute value; positive relevance is red, negative blue
(the convention of Captum's ``visualize_text``).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import torch


def _normalise(scores: Sequence[float] | torch.Tensor) -> list[float]:
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    top = float(s.abs().max()) if s.numel() else 0.0
    return [0.0 if top == 0 else float(v) / top for v in s]


def _rgb(v: float) -> tuple[int, int, int]:
    """White → red for v > 0, white → blue for v < 0 (|v| ≤ 1)."""
    a = min(1.0, abs(v))
    fade = int(round(255 * (1 - 0.75 * a)))
    return (255, fade, fade) if v >= 0 else (fade, fade, 255)


def ansi_heatmap(tokens: Sequence[str], scores: Sequence[float] | torch.Tensor) -> str:
    """One line with every token on a 24-bit background colour proportional to its score."""
    if len(tokens) != len(_normalise(scores)):
        raise ValueError(f"{len(tokens)} tokens but {len(_normalise(scores))} scores")
    parts = []
    for tok, v in zip(tokens, _normalise(scores), strict=True):
        r, g, b = _rgb(v)
        parts.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m {tok} \x1b[0m")
    return "".join(parts)


def html_heatmap(tokens: Sequence[str], scores: Sequence[float] | torch.Tensor, title: str = "") -> str:
    """An HTML fragment: each token a ``<span class="tok">`` with its colour and score as a tooltip."""
    if len(tokens) != len(_normalise(scores)):
        raise ValueError(f"{len(tokens)} tokens but {len(_normalise(scores))} scores")
    raw = torch.as_tensor(scores, dtype=torch.float64).flatten().tolist()
    spans = []
    for tok, v, x in zip(tokens, _normalise(scores), raw, strict=True):
        r, g, b = _rgb(v)
        spans.append(
            f'<span class="tok" title="{x:.4g}" style="background: rgb({r},{g},{b})">{html.escape(tok)}</span>'
        )
    head = f"<div class='method'>{html.escape(title)}</div>" if title else ""
    return f"<div class='heatmap'>{head}{' '.join(spans)}</div>"

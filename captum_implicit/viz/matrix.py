"""Implicit-attention matrices as PNG images (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

import torch


def matrix_png(matrix: torch.Tensor, tokens: Sequence[str] | None = None, title: str = "") -> bytes:
    """Render an ``(L, L)`` map (e.g. ``LayerAttention.aggregate("abs_mean")[0]``) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = matrix.detach().double().cpu()
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square (L, L) matrix, got {tuple(m.shape)}")
    size = 2.5 + 0.18 * m.shape[0]
    fig, ax = plt.subplots(figsize=(min(size, 12), min(size, 12)), dpi=90)
    ax.imshow(m.numpy(), cmap="viridis")
    if tokens is not None and len(tokens) <= 64:
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
    ax.set_xlabel("key (source token)")
    ax.set_ylabel("query")
    if title:
        # wrapped to the figure width (11 characters per inch at this font size, with margin): long names stay visible
        ax.set_title("\n".join(textwrap.wrap(title, max(20, int(11 * min(size, 12))))), fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()

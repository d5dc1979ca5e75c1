"""Visualisation: token heatmaps for terminals and HTML, and implicit-attention matrices as images."""

from .text import ansi_heatmap, html_heatmap
from .matrix import matrix_png

__all__ = ["ansi_heatmap", "html_heatmap", "matrix_png"]

"""Visualisation: token heatmaps for terminals and HTML, implicit-attention matrices as images, HTML reports."""

from .text import ansi_heatmap, html_heatmap
from .matrix import matrix_png
from .report import ReportSection, write_report

__all__ = ["ReportSection", "ansi_heatmap", "html_heatmap", "matrix_png", "write_report"]

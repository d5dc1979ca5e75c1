"""The demo's report.html, opened in a real browser (headless Chromium): it renders, and the heatmaps are there.

Skips where no Chromium is installed (``.ci/run`` installs Debian's ``chromium`` when it can).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from captum_implicit.cli import main

PIL = pytest.importorskip("PIL.Image")  # matplotlib depends on Pillow


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)")

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]
TEXT = "a gorgeous , witty and moving film"
WORDS = len(TEXT.split())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main(["demo", "--text", TEXT, "--out", str(out)]) == 0
    return out / "report.html"


def chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    profile = tmp / "profile"  # a fresh profile: no state shared with anything else
    proc = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_report_renders_non_blank_with_heatmap_and_matrix_colours(report, tmp_path):
    shot = tmp_path / "shot.png"
    chromium([f"--screenshot={shot}", "--window-size=1200,1100", report.as_uri()], tmp_path)
    img = np.asarray(PIL.open(shot).convert("RGB")).astype(np.int64)  # (H, W, 3)
    assert img.shape == (1100, 1200, 3)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    # non-blank: not all white, and real variation (text, coloured spans, images)
    white = float(((r == 255) & (g == 255) & (b == 255)).mean())
    assert white < 0.97, f"{white:.1%} white"
    assert img.mean(-1).var() > 200
    # the token backgrounds (strong red: the top tokens are scaled to rgb(255, 64, 64)) were painted
    assert int(((r == 255) & (g < 120) & (b < 120)).sum()) > 100
    # the matrix images were decoded and painted: viridis's minimum colour (68, 1, 84) fills the zero
    # upper triangle of each causal matrix
    assert int(((abs(r - 68) < 8) & (g < 10) & (abs(b - 84) < 8)).sum()) > 2000


def test_report_dom_has_the_heatmaps_and_matrix_images(report, tmp_path):
    dom = chromium(["--dump-dom", report.as_uri()], tmp_path).stdout
    spans = re.findall(r'<span class="tok" title="([^"]+)" style="background: rgb\((\d+), ?(\d+), ?(\d+)\);?">', dom)
    assert len(spans) == 2 * WORDS, dom[:2000]  # ImplicitAttnGrad and IntegratedGradients, one span per word
    assert all(max(map(int, s[1:])) <= 255 for s in spans)
    assert any(s[1:] != ("255", "255", "255") for s in spans)  # coloured, not all white
    imgs = re.findall(r'<img class="matrix" alt="([^"]+)" src="data:image/png;base64,', dom)
    assert imgs == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    assert dom.count('class="heatmap"') == 2

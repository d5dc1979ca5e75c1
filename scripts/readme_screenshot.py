"""Regenerate docs/img/demo-report.png, the README's picture of the demo report (needs headless Chromium).

    python scripts/readme_screenshot.py [--chromium /usr/bin/chromium]

Runs ``captum-implicit demo`` on two sentences, renders report.html in headless Chromium and saves a
palette PNG (< 300 KB).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from captum_implicit.cli import main as cli  # noqa: E402

OUT = ROOT / "docs" / "img" / "demo-report.png"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report"
        assert cli(["demo", "--text", "a gorgeous , witty and moving film",
                    "--text", "the plot is thin and the jokes fall flat", "--out", str(report)]) == 0
        shot = Path(tmp) / "shot.png"
        subprocess.run(
            [args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={Path(tmp) / 'profile'}", f"--screenshot={shot}",
             "--window-size=1000,760", (report / "report.html").as_uri()],
            check=True, capture_output=True, timeout=120,
        )
        img = Image.open(shot).convert("RGB").quantize(colors=128, dither=Image.Dither.NONE)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        img.save(OUT, optimize=True)
    print(f"{OUT.relative_to(ROOT)}: {OUT.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()

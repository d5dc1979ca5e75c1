"""Generated documentation stays in sync with the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_support_table_is_generated_from_the_registry():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "support_table.py"), "--check"], capture_output=True, text=True,
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert proc.returncode == 0, proc.stderr

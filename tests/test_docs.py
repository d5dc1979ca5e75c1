"""Generated documentation stays in sync with the code."""

from __future__ import annotations

import re
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


def test_readme_lists_every_registered_class_and_its_links_exist():
    """The README's family table names every registered module class; every relative link resolves."""
    import re

    from captum_implicit.core.registry import adapters

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Supported modules"):]
    for adapter in adapters():
        for cls in adapter.classes:
            short = (cls if isinstance(cls, str) else cls.__qualname__).rpartition(".")[2]
            row = next((line for line in table.splitlines() if line.startswith(f"| {adapter.family} ")), "")
            assert f"`{short}`" in row, f"README's supported table lacks {adapter.family} {short}"
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to missing {target}"
    image = ROOT / "docs" / "img" / "demo-report.png"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size < 300 * 1024


def test_recipe_index_links_exist():
    import re

    index = ROOT / "docs" / "recipes" / "README.md"
    for target in re.findall(r"\]\(([^)#]+)\)", index.read_text()):
        assert (index.parent / target).exists(), f"docs/recipes/README.md links to missing {target}"


def test_gpu_script_covers_every_gpu_test_file():
    """scripts/gpu_tests.sh runs the GPU tests in parts: every test file with a gpu-marked test is in one part."""
    script = (ROOT / "scripts" / "gpu_tests.sh").read_text()
    listed = set(re.findall(r"tests/(test_\w+\.py)", script))
    # a decorator, a module-level pytestmark, or a parameter's marks
    gpu_mark = re.compile(r"^@pytest\.mark\.gpu\b|^pytestmark = .*pytest\.mark\.gpu|marks=\[pytest\.mark\.gpu\]", re.M)
    marked = {p.name for p in (ROOT / "tests").glob("test_*.py")
              if p.name != Path(__file__).name and gpu_mark.search(p.read_text())}
    assert marked, "no gpu-marked test file found"
    assert marked <= listed, f"not in scripts/gpu_tests.sh: {sorted(marked - listed)}"
    assert listed <= {p.name for p in (ROOT / "tests").glob("test_*.py")}, "gpu_tests.sh names a missing file"

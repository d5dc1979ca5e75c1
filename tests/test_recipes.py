"""The docs cannot rot: every ```python block of docs/recipes/ and README.md runs, and every examples/*.py runs in
smoke mode.

A recipe file's blocks run in order in one namespace (later blocks use earlier names), in a temporary
working directory. Blocks fenced as ```python gpu need CUDA and mamba-ssm: skipped without them.
The examples run as subprocesses (``--smoke``), all started when the module starts, so that they run
on the second CI core while the recipes run in this process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "docs" / "recipes").glob("*.md"))
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[str, str]]:
    """``(tags, code)`` of every ```python block, in order; the code is preceded by blank lines so that
    tracebacks give the line numbers of the Markdown file."""
    text = path.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        first = text.count("\n", 0, m.start(2))
        blocks.append((m.group(1).strip(), "\n" * first + m.group(2)))
    return blocks


def _gpu_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        return False
    return True


def test_recipes_and_examples_exist():
    names = {p.stem for p in RECIPES}
    assert {"captum", "zennit", "hf_model", "mamba_ssm", "custom_layer", "visualisation", "evaluation",
            "performance"} <= names, names
    assert len(EXAMPLES) >= 5
    for path in RECIPES:
        if path.stem != "README":
            assert python_blocks(path), f"{path.name} has no ```python block"


def _recipe_param(path: Path):
    """Files with ```python gpu blocks carry the gpu mark, so GPU runs (`pytest -m gpu`) include them."""
    gpu = any("gpu" in tags.split() for tags, _ in python_blocks(path))
    return pytest.param(path, marks=[pytest.mark.gpu] if gpu else [],
                        id="README" if path.parent == ROOT else path.stem)


@pytest.mark.parametrize("path", [_recipe_param(p) for p in RECIPES if p.stem != "README"]
                         + [_recipe_param(ROOT / "README.md")])
def test_recipe_runs(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    gpu = _gpu_available()
    runnable = [(tags, code) for tags, code in blocks if "gpu" not in tags.split() or gpu]
    if not runnable:
        pytest.skip(f"{path.name}: every block needs CUDA and mamba-ssm")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": f"recipe_{path.stem}"}
    for _, code in runnable:
        exec(compile(code, str(path), "exec"), namespace)


@pytest.fixture(scope="module", autouse=True)
def example_runs(tmp_path_factory):
    """Start every example at once when this module starts (each single-threaded), so that they run
    while the recipes run in this process; the example tests at the end wait on their own process."""
    procs = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1", "CAPTUM_IMPLICIT_SMOKE": "1"}
    for path in EXAMPLES:
        cwd = tmp_path_factory.mktemp(path.stem)
        procs[path.name] = subprocess.Popen(
            [sys.executable, str(path), "--smoke"], cwd=cwd, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
    yield procs
    for proc in procs.values():  # only our own children, by handle
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_in_smoke_mode(path, example_runs):
    proc = example_runs[path.name]
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{path.name} --smoke took more than 300 s")
    assert proc.returncode == 0, f"{path.name} failed:\n{out[-2000:]}\n{err[-4000:]}"
    assert out.strip(), f"{path.name} printed nothing"

"""Generate docs/supported.md from the adapter registry (never edit that file by hand).

    python scripts/support_table.py            # rewrite docs/supported.md
    python scripts/support_table.py --check    # exit 1 if docs/supported.md is stale (run by the tests)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from captum_implicit.core.registry import adapters

DOC = Path(__file__).resolve().parent.parent / "docs" / "supported.md"


def render() -> str:
    lines = [
        "# Supported module classes",
        "",
        "Generated from the adapter registry by `scripts/support_table.py`; do not edit by hand.",
        "\"exact on CPU: yes\" means a CPU exactness property test covers the class (`output()` equals the tensor",
        "entering the layer's output projection: ≤ 1e-10 relative in float64 where the model computes in float64 —",
        "otherwise the bound its own float32 casts allow, stated in the test — and ≤ 1e-4 in float32); the GPU",
        "column names the fast kernels the GPU tests (`pytest -m gpu`) compare against.",
        "",
        "| family | module class | exact on CPU | GPU kernels covered | padding | notes |",
        "|---|---|---|---|---|---|",
    ]
    for a in adapters():
        for cls in a.classes:
            name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
            lines.append(f"| {a.family} | `{name}` | {a.cpu} | {a.gpu or '—'} | {a.padding or '—'} | {a.notes or ''} |")
    lines += [
        "",
        "## flash-linear-attention (optional extra `fla`)",
        "",
        "`captum_implicit.layers.gla` gives the exact closed forms of GLA, HGRN2 (GLA with `k = 1 − e^g`),",
        "RetNet (fixed per-head decay) and RWKV-6 (decay read before the step, bonus `u`); DeltaNet is the",
        "delta-rule closed form with zero log-decay. fla's layer modules do not run on CPU (their kernels, norms",
        "and short convs are Triton), so no module class is registered for them yet: `tests/test_fla.py` checks",
        "the closed forms on CPU against fla's naive references (float32) and a float64 recurrence (≤ 1e-10),",
        "and on the GPU against fla's Triton chunk kernels (`chunk_gla`, `chunk_rwkv6`, `chunk_retention`,",
        "`chunk_delta_rule`; written, not yet run). CI does not install fla: with fla importable, transformers",
        "binds fla's kernels for every Gated DeltaNet / KDA model and plain CPU forwards outside a capture crash.",
        "To run them: `pip download --no-deps -d /tmp/fla-dl flash-linear-attention fla-core`,",
        "`pip install --no-deps --target /tmp/fla-site /tmp/fla-dl/*.whl` (needs `einops` and `triton`), then",
        "`PYTHONPATH=/tmp/fla-site:. pytest tests/test_fla.py`.",
    ]
    lines += _lrp_lines()
    return "\n".join(lines) + "\n"


def _lrp_lines() -> list[str]:
    """The LRP forms (captum_implicit.lrp) by module class; empty where zennit is not installed."""
    try:
        from captum_implicit.lrp import lrp_forms
    except ImportError:
        return []
    lines = [
        "",
        "## LRP forms (`GatedLinearComposite`, `GatedLinearLRP`)",
        "",
        "Module classes whose forward the LRP canonizer swaps for its LRP form (`captum_implicit.lrp`); conservation",
        "in float64 (≤ 1e-8 relative, biases zero) is tested per family in `tests/test_lrp*.py`.",
        "",
        "| family | module class | rules |",
        "|---|---|---|",
    ]
    for form in lrp_forms():  # registration order (user forms first)
        for cls in form.classes:
            name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
            lines.append(f"| {form.family} | `{name}` | {form.notes} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python scripts/support_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

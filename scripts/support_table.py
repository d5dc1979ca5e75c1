"""Generate docs/supported.md from the adapter registry (never edit that file by hand).

    python scripts/support_table.py            # rewrite docs/supported.md
    python scripts/support_table.py --check    # exit 1 if docs/supported.md is stale (run by the tests)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from captum_implicit.adapters._gpu_runs import NO_GPU_TEST
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
            lines.append(f"| {a.family} | `{name}` | {a.cpu} | {a.gpu or NO_GPU_TEST} | {a.padding or '—'} | "
                         f"{a.notes or ''} |")
    lines += [
        "",
        "## flash-linear-attention (optional extra `fla`)",
        "",
        "fla's layers `GatedLinearAttention`, `HGRN2Attention`, `MultiScaleRetention` (RetNet), `RWKV6Attention`,",
        "`DeltaNet` and `GatedDeltaNet` are registered by name in `captum_implicit/adapters/fla.py` (fla is",
        "imported only when a capture meets one of them), for the layers alone and for models built from them,",
        "fla's own `*ForCausalLM` included. The capture records the layer's kernel call (`chunk_*` /",
        "`fused_recurrent_*`: q, k, v, decays, β, scale, and the in-kernel gate/β/l2 transforms) and its output",
        "norm call; the closed forms are `captum_implicit.layers.gla` and `layers.gated_deltanet`.",
        "",
        "**GPU**: nothing is routed; fla's Triton kernels run and are recorded (every config, short convs",
        "included). `tests/test_fla_layers.py -m gpu` compares against them in float32 (≤ 1e-4) and bf16 (≤ 3e-2:",
        "kernel output, norm and gate each rounded to bf16); float32 chunk DeltaNet is skipped (fla refuses it).",
        "In float32 the GPU tests put fla's kernels in IEEE mode (`tests/conftest.py::_fla_in_full_float32`:",
        "`TRITON_F32_DEFAULT=ieee`, and the TF32 that fla hard-codes in the delta rules' triangular solves switched",
        "off), so they compare maths, not TF32 rounding: in fla's default mode its float32 kernels differ from",
        "float32 maths by up to 2.5e-3 (GLA, Gated DeltaNet at L = 200, H200), their own rounding.",
        "",
        "GPU test runs: `scripts/gpu_tests.sh fla|mamba|rest|all` (`pytest -v -m gpu` in three parts that each fit",
        "a 10-minute call on a fresh machine; one autotune config of fla's and mamba-ssm's kernels; each failure",
        "logged as it happens; a test checks that every gpu-marked test file is in one part).",
        "",
        "**GPU runs** (one H200, torch 2.11, triton 3.6, mamba-ssm 2.3.2.post1 for sm_90, fla 0.6.0). Sessions 4",
        "and 5 had transformers 5.17 and no causal-conv1d. Session 4 ran all 186 GPU tests of the time: 171 passed,",
        "14 skipped (fla's float32 chunk DeltaNet, which fla refuses; models and layer layouts 5.17 lacks; float64",
        "HF Mamba, whose CUDA kernels have no float64), 1 did not finish. Session 5 ran what was new or unfinished:",
        "all passed but 7 skips for models transformers 5.17 lacks. Session 6 added transformers 5.24 and",
        "causal-conv1d 1.7.0 (its CUDA conv, which transformers and mamba-ssm then take) and ran the GPU tests of",
        "the Mamba and Mamba2 families, the HF relatives and hybrids (every captured layer of each), xLSTM,",
        "FalconMamba, Qwen3.5's Gated DeltaNet, the mamba-ssm LRP and MHA tests, the LRP GPU tests of the HF",
        "families and the Mamba Triton kernel: 193 tests passed in their final form, 1 skipped (float64 HF Mamba).",
        "Found on the way: HF LFM3 at its default conv width 7, and tiny Mamba2 configs whose in_proj width is not a",
        "multiple of 8, raise inside causal-conv1d in the real model's own forward; the GPU tests now build widths",
        "it takes (the LFM3 and mamba-ssm tests passed again). Session 7 (the same setup) ran the rest: dense",
        "Qwen3.5's attention and GLM-5-Next's / Qwen4-Exp's sparse layers, every captured layer (8 passed); the LRP",
        "GPU tests of the HF relatives and HF Mamba2 (13 passed), after two more tiny configs the real models cannot",
        "run on CUDA were replaced: HF Mamba2's conv must also have a multiple of 8 channels, and BailingHybrid's MLA",
        "with head dims of 2 + 2 and 4 makes torch's CUDA SDPA raise 'misaligned address' (eager attention or head",
        "dims of 8 pass). No GPU test is left unrun. Session 10 ran the fla part again with CI's transformers 5.24",
        "and fla 0.6.0 (`tests/test_fla.py`, `test_fla_layers.py`, `test_lrp_fla.py`, `test_gated_deltanet.py`,",
        "`test_kda.py`; `-n 8`, one autotune config): 73 passed, 5 skipped (fla's float32 chunk DeltaNet) in 99 s.",
        "Without `CAPTUM_IMPLICIT_FIRST_TRITON_CONFIG=1` the same run did not finish in 500 s (3 tests): fla's",
        "autotuning compiles every config of each kernel first, over 240 s for one test. At the end of session 10",
        "every GPU test ran in one call (transformers 5.24, fla 0.6.0, mamba-ssm 2.3.2.post1; no causal-conv1d): 308",
        "passed, 6 skipped (fla's float32 chunk DeltaNet; float64 with CUDA kernels); the fla delta-rule tests now",
        "also assert that transformers bound fla's kernel and the capture did not force its torch fallback. Logs:",
        "the closing notes of issues 3 and 8.",
        "",
        "**CPU**: every fla kernel, norm, rotary, token shift and swish is Triton. While a capture runs on CPU",
        "tensors, the adapter routes them (module globals, restored on exit; CUDA tensors pass through): the",
        "kernels to fla's own naive references (`naive_recurrent_gla`, `naive_retention`, `naive_recurrent_rwkv6`,",
        "`delta_rule_recurrence`, `naive_recurrent_gated_delta_rule` with `naive_gdn_gate`), `rms_norm`,",
        "`rms_norm_gated`, `group_norm`/`layer_norm` (fused add-norm included), `rms_norm_linear`, rotary,",
        "`token_shift`, `swish`/`swiglu` to torch. Configs that run on CPU: `use_short_conv=False` (fla's",
        "`ShortConvolution` is not routed), no `attention_mask` except for RWKV-6, and for the causal LMs",
        "`fuse_swiglu=False` (`fuse_norm` either way). Outside a capture fla's layers still fail on CPU.",
        "The naive references compute in float32 whatever the input dtype, so a float64 model is reproduced",
        "to ≤ 1e-5 (measured ≤ 3e-6), a float32 one to ≤ 1e-4 (measured ≤ 3e-6); with the kernels routed to",
        "float64 recurrences instead, float64 layers are reproduced to 1e-15 (test: ≤ 1e-10).",
        "Padding: fla's GLA/HGRN2/RetNet/DeltaNet/GatedDeltaNet unpad a masked batch into one variable-length",
        "sequence (`cu_seqlens`); that is refused (CPU and GPU) with a clear error.",
        "",
        "`tests/test_fla.py` checks the closed forms themselves against fla's naive references and a float64",
        "recurrence (≤ 1e-10), and on the GPU against the chunk kernels. The dev install leaves fla out: with fla",
        "importable, transformers binds fla's kernels for every Gated DeltaNet / KDA model and their plain CPU",
        "forwards outside a capture crash. CI runs the whole suite a second time with fla 0.6.0 on PYTHONPATH",
        "(`.ci/run`, step 4); by hand: `pip download --no-deps -d /tmp/fla-dl flash-linear-attention fla-core`,",
        "`pip install --no-deps --target /tmp/fla-site /tmp/fla-dl/*.whl` (needs `einops` and `triton`), then",
        "`PYTHONPATH=/tmp/fla-site:. pytest`.",
        "",
        "**LRP** (`captum_implicit/lrp/fla.py`, `tests/test_lrp_fla.py`): the six layers and fla's `RMSNorm`,",
        "`FusedRMSNormGated`, `GroupNorm` have forms that compute in torch on every device (values: the CPU routes",
        "above, so on CPU the logits equal the routed model's bit for bit; on CUDA they differ from the Triton",
        "kernels by float32 rounding, GPU test ≤ 1e-4). Refused: caches (`past_key_values`), `cu_seqlens`, and a",
        "padding mask except for RWKV-6.",
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

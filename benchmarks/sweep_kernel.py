"""Tuning sweep of the Mamba Triton kernel (far-tile products, pipelining stages, dense channels per program,
warps, tile size, product precision) on one 130m-sized layer. Variants set the module constants of
``captum_implicit.ops.ssm_triton``; each was checked for correctness in Triton's interpreter on CPU.

    python benchmarks/sweep_kernel.py --length 4096

Prints seconds of ``aggregate("positive_mean", grad)`` (Ā), of ``aggregate("mean")`` and of ``dense()`` (at
--dense-length) per variant, and the error against the torch reference.
"""

from __future__ import annotations

import argparse
import time

import torch

from captum_implicit.config import blockwise
from captum_implicit.ops import ssm_triton
from bench_kernel import capture_layer


SHIPPED = dict(
    FAR_PRODUCT="split", FAR_UNROLL=1, SEPARATE_FAR=None, OVERLAP_NEAR=False, PRODUCT="tf32x3", NUM_STAGES=4,
    DENSE_CHANNELS=16, NUM_WARPS=4, BLOCK=64, FACTOR_KERNEL=True, FACTOR_ROWS=64, FORCE_NEAR_EXACT=False,
    WIDE_FAR_BLOCK=128, WIDE_FAR_WARPS=8, MIXED_NEAR_FORMS=True, PROGRAMS=None,
    PROGRAMS_PER_SM=24, NEAR_FROM_FACTORS=True, MIXED_BLOCK=32,
)
_BLOCK128 = dict(BLOCK=128, NUM_WARPS=8, NUM_STAGES=2)
#: module settings per variant, the shipped ones first
VARIANTS = [SHIPPED] + [{**SHIPPED, **change} for change in [
    # session 9 (--layer hf_spikes): where no block passes the pivoted form's bound, the mixed forms at 64 (shipped
    # until session 9; the near launch spills) or at 16 instead of 32
    dict(MIXED_BLOCK=64),
    dict(MIXED_BLOCK=16),
    # session 8: the tiles next to the diagonal one product per tap (the default until session 8; 255 registers and
    # 40 B spilled, sm_90) instead of from the far tiles' factors and a diagonal band (168, none): near launch 5.0 ms
    # against 2.8, Ā 0.0141 s against 0.0118 (H200)
    dict(NEAR_FROM_FACTORS=False),
    # session 8: partial-sum groups of the reductions (groups = ⌈programs / tiles⌉). Shipped until session 8: 16
    # programs per SM, i.e. at L = 4096 2 groups and 7.05 waves of the 128-tile far launch at one program per SM,
    # whose last wave is nearly empty (Ā 0.0158 s; 24 per SM: 3 groups, 10.6 waves, 0.0146 s; 40 and 56 per SM: 5
    # and 6 groups, 0.0146 s). The tiles next to the diagonal on a side stream (0.0150 s; with 3 groups 0.0145 s)
    dict(PROGRAMS_PER_SM=16),
    dict(PROGRAMS_PER_SM=40),
    dict(OVERLAP_NEAR=True),
    # most promising first, so that a sweep cut by a time limit still answers the main question.
    # the 128-tile far launch (8 warps): one product of contraction 4N instead of three dependent ones (no spills
    # at 128 with 8 warps, sm_90), two channels per iteration, 16 warps
    dict(FAR_PRODUCT="fused"),
    dict(FAR_PRODUCT="fused", NUM_STAGES=3),
    dict(FAR_UNROLL=2),
    dict(WIDE_FAR_WARPS=16),
    # this layer's tiles next to the diagonal need 32 (the pivoted form's bound fails at 64), so until session 6 every
    # tile ran at 32 (WIDE_FAR_BLOCK=None). Session 7 (H200, Ā at L = 4096): far tiles at 64 0.0283-0.0297 s, at
    # 128 with 4 warps 0.0263-0.0267 s (744 B of spills a thread), at 128 with 8 warps 0.0237 s (the default since),
    # all tiles at 32 0.0306-0.0309 s; at 64 with 8 warps 0.0380 s
    dict(WIDE_FAR_BLOCK=64, WIDE_FAR_WARPS=None),
    dict(WIDE_FAR_BLOCK=128, WIDE_FAR_WARPS=None),
    dict(WIDE_FAR_BLOCK=128, NUM_STAGES=3),
    dict(WIDE_FAR_BLOCK=None),
    # one TF32 product instead of three (≈5e-6 relative instead of ≈4e-7; blockwise(precision="tf32")): 0.0118 s
    dict(FAR_PRODUCT="register", PRODUCT="tf32"),
    dict(WIDE_FAR_BLOCK=64, WIDE_FAR_WARPS=None, FAR_PRODUCT="register", PRODUCT="tf32"),
    dict(WIDE_FAR_BLOCK=64, WIDE_FAR_WARPS=8),
    dict(WIDE_FAR_BLOCK=64, WIDE_FAR_WARPS=None, FAR_UNROLL=2),
    # the factors by torch (the default until session 6), and the factor kernel's positions per program
    dict(FACTOR_KERNEL=False),
    # the per-entry form next to the diagonal, which layers take when a channel decays too fast for the pivoted one
    dict(FORCE_NEAR_EXACT=True),
    dict(FACTOR_ROWS=32),
    dict(FACTOR_ROWS=128),
    # the launch of the tiles next to the diagonal (few programs, each long) on a side stream, concurrent with
    # the far launch (session 6: no gain beyond noise)
    dict(OVERLAP_NEAR=True),
    dict(OVERLAP_NEAR=True, FAR_UNROLL=2),
    # far tiles in their own launch (the shipped default for the reductions), compiled without the near-tile code:
    # fewer registers, more programs per SM; one launch for all tiles was the default until session 5
    dict(SEPARATE_FAR=False),
    dict(SEPARATE_FAR=True, FAR_PRODUCT="fused"),
    # the far-tile loop looks latency-bound (three dependent K=N products per channel): one product of
    # contraction 4N, and/or two channels per iteration (two independent chains to overlap; each alone: first above)
    dict(SEPARATE_FAR=True, FAR_UNROLL=2),
    dict(SEPARATE_FAR=True, NUM_WARPS=8),
    {**_BLOCK128, "SEPARATE_FAR": True},
    {**_BLOCK128, "SEPARATE_FAR": True, "FAR_PRODUCT": "fused"},
    dict(FAR_PRODUCT="fused", FAR_UNROLL=2),
    dict(BLOCK=128, NUM_WARPS=8, NUM_STAGES=2),  # 4× the outputs per loaded factor, half the loads per entry
    {**_BLOCK128, "FAR_PRODUCT": "fused"},
    {**_BLOCK128, "FAR_UNROLL": 2},
    {**_BLOCK128, "FAR_PRODUCT": "fused", "FAR_UNROLL": 2},
    dict(FAR_PRODUCT="fused", FAR_UNROLL=2, NUM_STAGES=2),  # 4 stages: 168 KiB shared memory, 1 program/SM
    dict(FAR_PRODUCT="register"),
    dict(FAR_PRODUCT="register", PRODUCT="ieee"),
    dict(BLOCK=128, NUM_WARPS=8, NUM_STAGES=3),
    dict(BLOCK=128, NUM_WARPS=8, NUM_STAGES=2, FAR_PRODUCT="register", PRODUCT="tf32"),
    dict(BLOCK=32, NUM_STAGES=4),
]]


def seconds(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


class _TimedLaunches:
    """Stands in for a kernel of ``ssm_triton``: each launch bracketed by CUDA events and labelled (the factor
    kernel; or, by ``TILES``, the launch of all tiles, of the far tiles or of the others)."""

    def __init__(self, kernel, events):
        self.kernel, self.events = kernel, events

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.kernel[grid](*args, **kwargs)
            end.record()
            label = ("all tiles", "far tiles", "near tiles")[kwargs["TILES"]] if "TILES" in kwargs else "factors"
            self.events.append((label, start, end))

        return launch


def launch_split(fn) -> str:
    """Milliseconds per launch kind of one call of ``fn`` (run once before, to compile), summed over its launches,
    and the rest of the call (torch work, launch gaps)."""
    fn()
    torch.cuda.synchronize()
    events = []
    kernels = {name: getattr(ssm_triton, name) for name in ("_ssm_kernel", "_factor_kernel")}
    for name, kernel in kernels.items():
        setattr(ssm_triton, name, _TimedLaunches(kernel, events))
    try:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        total = time.perf_counter() - start
    finally:
        for name, kernel in kernels.items():
            setattr(ssm_triton, name, kernel)
    per_label: dict[str, list[float]] = {}
    for label, start, end in events:
        per_label.setdefault(label, []).append(start.elapsed_time(end))
    parts = [f"{label} {sum(ms):.2f} ms ({len(ms)} launches)" for label, ms in per_label.items()]
    rest = 1e3 * total - sum(sum(ms) for ms in per_label.values())
    return "; ".join(parts + [f"rest {rest:.2f} ms"])


def compiled_kernels() -> dict:
    """Triton's compiled specialisations of the kernel so far (id → kernel); empty if this Triton keeps them
    elsewhere (``device_caches`` values start with the kernel cache in Triton 3.x)."""
    try:
        return {id(k): k for cache in ssm_triton._ssm_kernel.device_caches.values() for k in cache[0].values()}
    except (AttributeError, IndexError, TypeError):
        return {}


def resources(kernels) -> str:
    """Registers per thread, spills and shared memory of the given compiled kernels (register pressure)."""
    return "; ".join(
        f"{getattr(k, 'n_regs', '?')} regs {getattr(k, 'n_spills', '?')} spills "
        f"{getattr(getattr(k, 'metadata', None), 'shared', 0) // 1024} KiB smem" for k in kernels
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--dense-length", type=int, default=1024)
    p.add_argument("--first", type=int, default=None, help="only the first N variants (the shipped one first)")
    p.add_argument("--only", default=None, help="only these variants (comma-separated indices; 0 is the shipped one)")
    p.add_argument("--layer", default="mamba_ssm", choices=["mamba_ssm", "hf_spikes"],
                   help="a mamba-ssm Mamba layer, or HF's random-init mixer of bench_matrix.py (Δ spikes: many row "
                   "blocks fail the pivoted form's bound)")
    a = p.parse_args()
    if a.layer == "hf_spikes":
        from bench_matrix import mixer_and_capture

        def capture(length):
            return mixer_and_capture(length, "cuda", published_terms_only=False)[0]
    else:
        def capture(length):
            return capture_layer(768, length)
    la = capture(a.length)
    grad = torch.randn_like(la.values)
    taps = la.conv_weight.shape[-1]
    print(f"tiles next to the diagonal: (block, form) {ssm_triton._near_forms(la.cum, la.rate, taps, a.length)[:2]} "
          f"(form 0 pivoted, 1 per-entry, 2 mixed)", flush=True)
    small = capture(a.dense_length)
    with blockwise(triton=False):
        ref = small.aggregate("positive_mean", grad=torch.ones_like(small.values))
        ref_mean = small.aggregate("mean")
    chosen = VARIANTS[: a.first] if a.only is None else [VARIANTS[int(i)] for i in a.only.split(",")]
    for variant in chosen:
        for key, value in variant.items():
            setattr(ssm_triton, key, value)
        before = compiled_kernels()
        try:  # a variant Triton cannot compile (shared memory, registers, a shape) must not end the sweep
            t_agg = seconds(lambda: la.aggregate("positive_mean", grad=grad))
            t_mean = seconds(lambda: la.aggregate("mean"))
            t_dense = seconds(lambda: small.dense(), reps=2)
            got = small.aggregate("positive_mean", grad=torch.ones_like(small.values))
            got_mean = small.aggregate("mean")
        except Exception as e:  # noqa: BLE001 - reported, then the next variant
            print(f"{variant}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            continue
        err = float((got - ref).abs().max() / ref.abs().max())
        err_mean = float((got_mean - ref_mean).abs().max() / ref_mean.abs().max())
        new = [k for key, k in compiled_kernels().items() if key not in before]
        print(f"{variant}: Ā(L={a.length}) {t_agg:.4f} s  mean {t_mean:.4f} s  dense(L={a.dense_length}) "
              f"{t_dense:.4f} s  rel err {err:.1e} (mean {err_mean:.1e})  [{resources(new)}]", flush=True)
        # the launch split where the variant changes a setting that moves time between launches (every variant
        # names every setting: the shipped ones restore what an earlier variant changed)
        changed = {key for key, value in variant.items() if SHIPPED[key] != value}
        split_launches = {"SEPARATE_FAR", "FACTOR_KERNEL", "FORCE_NEAR_EXACT", "WIDE_FAR_BLOCK",
                          "PROGRAMS_PER_SM", "OVERLAP_NEAR", "NEAR_FROM_FACTORS", "BLOCK", "MIXED_BLOCK"} & changed
        if variant is SHIPPED or split_launches and variant.get("SEPARATE_FAR") is not True:
            print(f"    Ā launches: {launch_split(lambda: la.aggregate('positive_mean', grad=grad))}", flush=True)
            print(f"    dense launches: {launch_split(small.dense)}", flush=True)

if __name__ == "__main__":
    main()

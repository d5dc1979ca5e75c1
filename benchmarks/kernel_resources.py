"""Registers, spills and shared memory of the Mamba Triton kernel per sweep variant, compiled ahead of time for
an H100/H200 (sm_90) — no GPU needed: Triton's own compiler and its bundled ``ptxas`` do the work.

    python benchmarks/kernel_resources.py            # every variant of sweep_kernel.py, Ā's specialisation
    python benchmarks/kernel_resources.py --dense    # the dense specialisation

Why: a program's registers bound how many programs share an SM (65536 per SM: 255 registers × 128 threads
leave room for 2, 128 for 4), and the far-tile loop hides the latency of its dependent products only through
other programs. Also counts the ``warp_group_dot`` (wgmma) ops and their waits in the TTGIR: a wait with
``pendings = 0`` right after each product means the products of one program never overlap.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from captum_implicit.ops import ssm_triton
from sweep_kernel import VARIANTS

POINTERS = {"tiles_ptr": "*i32", "head_ptr": "*i32", "cum_ptr": "*fp64", "exact_ptr": "*i8"}


def compile_variant(variant: dict, mode: int, tiles: int, *, state: int = 16, taps: int = 4):
    """Compile ``_ssm_kernel`` as ``ssm_kernel`` would launch it for a mamba-130m layer's Ā (λ, ρ, skip, conv,
    column scale), every pointer and integer 16-aligned as at L = 4096; returns Triton's compiled kernel."""
    settings = {**VARIANTS[0], **variant}
    kernel = ssm_triton._ssm_kernel
    const = dict(
        N_P=max(16, triton.next_power_of_2(state)), K=taps, BT=settings["BLOCK"], BS=settings["BLOCK"], MODE=mode,
        HAS_SKIP=True, HAS_LSC=True, HAS_RSC=True, HAS_COL=True, ACCUMULATE=False, PRODUCT=settings["PRODUCT"],
        NEAR_EXACT=0, FAR=ssm_triton.FAR_CODES[settings["FAR_PRODUCT"]], UNROLL=settings["FAR_UNROLL"], TILES=tiles,
        NEAR_FACTORED=settings.get("NEAR_FROM_FACTORS", False),
    )
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in const:
            signature[name] = "constexpr"
        else:
            signature[name] = POINTERS.get(name, "*fp32") if name.endswith("_ptr") else "i32"
            if name != "H":  # one head in Mamba-1: Triton would make it a constant 1; left generic here
                attrs[(i,)] = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", 90, 32)
    options = triton.compiler.make_backend(target).parse_options(
        {"num_warps": settings["NUM_WARPS"], "num_stages": settings["NUM_STAGES"]}
    )
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=const, attrs=attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def describe(compiled) -> str:
    """Registers and spills (from ``ptxas -v``), shared memory, wgmma ops and waits of one compiled kernel."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True
        ).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    ttgir = compiled.asm["ttgir"]
    return (
        f"{regs.group(1) if regs else '?'} regs, {spills.group(1) if spills else '?'} B spilled, "
        f"{compiled.metadata.shared // 1024} KiB smem, {ttgir.count('ttng.warp_group_dot ')} wgmma / "
        f"{len(re.findall(r'warp_group_dot_wait [^{]*[{]pendings = 0', ttgir))} waits(0)"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dense", action="store_true", help="the dense specialisation instead of Ā's (positive part)")
    a = p.parse_args()
    mode = ssm_triton.MODES["dense" if a.dense else "positive"]
    for variant in VARIANTS:
        separate = (not a.dense) if variant.get("SEPARATE_FAR") is None else variant["SEPARATE_FAR"]
        kinds = {1: "far tiles", 2: "other tiles"} if separate else {0: "all tiles"}
        changed = {k: v for k, v in variant.items() if VARIANTS[0].get(k) != v} or "shipped"
        for tiles, what in kinds.items():
            try:
                line = describe(compile_variant(variant, mode, tiles))
            except Exception as e:  # noqa: BLE001 - reported, then the next variant
                line = f"FAILED {type(e).__name__}: {str(e)[:300]}"
            print(f"{changed} [{what}]: {line}", flush=True)


if __name__ == "__main__":
    main()

"""Tuning sweep of the Mamba Triton kernel: product precision × warps × block, on one 130m-sized layer.

    python benchmarks/sweep_kernel.py --length 4096

Prints seconds of ``aggregate("positive_mean", grad)`` (Ā) and of ``dense()`` (at --dense-length) per variant,
and the error against the torch reference.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from captum_implicit.config import blockwise
from captum_implicit.ops import ssm_triton
from bench_kernel import capture_layer


def seconds(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--dense-length", type=int, default=1024)
    a = p.parse_args()
    la = capture_layer(768, a.length)
    grad = torch.randn_like(la.values)
    small = capture_layer(768, a.dense_length)
    with blockwise(triton=False):
        ref = small.aggregate("positive_mean", grad=torch.ones_like(small.values))
    for product, warps, block in itertools.product(["tf32x3", "tf32"], [4, 8], [64, 128]):
        ssm_triton.PRODUCT, ssm_triton.NUM_WARPS, ssm_triton.BLOCK = product, warps, block
        t_agg = seconds(lambda: la.aggregate("positive_mean", grad=grad))
        t_dense = seconds(lambda: small.dense(), reps=2)
        got = small.aggregate("positive_mean", grad=torch.ones_like(small.values))
        err = float((got - ref).abs().max() / ref.abs().max())
        print(f"{product:7s} warps={warps} block={block}: Ā(L={a.length}) {t_agg:.4f} s  "
              f"dense(L={a.dense_length}) {t_dense:.4f} s  rel err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()

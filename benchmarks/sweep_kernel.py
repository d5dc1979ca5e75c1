"""Tuning sweep of the Mamba Triton kernel (far-tile products, pipelining stages, dense channels per program,
warps) on one 130m-sized layer.

    python benchmarks/sweep_kernel.py --length 4096

Prints seconds of ``aggregate("positive_mean", grad)`` (Ā) and of ``dense()`` (at --dense-length) per variant,
and the error against the torch reference.
"""

from __future__ import annotations

import argparse
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
    variants = [dict(FAR_PRODUCT=f, NUM_STAGES=st, DENSE_CHANNELS=dc, NUM_WARPS=w)
                for f, st, dc, w in [("register", 3, 1, 4), ("split", 3, 8, 4), ("split", 2, 8, 4),
                                     ("split", 4, 16, 4), ("split", 3, 8, 8)]]
    for variant in variants:
        for key, value in variant.items():
            setattr(ssm_triton, key, value)
        t_agg = seconds(lambda: la.aggregate("positive_mean", grad=grad))
        t_dense = seconds(lambda: small.dense(), reps=2)
        got = small.aggregate("positive_mean", grad=torch.ones_like(small.values))
        err = float((got - ref).abs().max() / ref.abs().max())
        print(f"{variant}: Ā(L={a.length}) {t_agg:.4f} s  dense(L={a.dense_length}) {t_dense:.4f} s  "
              f"rel err {err:.1e}", flush=True)

if __name__ == "__main__":
    main()

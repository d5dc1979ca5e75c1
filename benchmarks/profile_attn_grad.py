"""Where one ``ImplicitAttnGrad`` explanation's time goes on the GPU.

    python benchmarks/profile_attn_grad.py --size 130m --length 4096 --impl mamba_ssm

Prints the wall clock of one explanation, the time inside the library's Mamba kernel calls
(``ops.ssm_triton.ssm_kernel``, synchronised around each call), torch.profiler's GPU time per kernel (the
Mamba kernel's launches, its factor kernel, the model's own kernels) and the GPU's idle time (wall clock
minus the kernels' sum: host work, Python, synchronisations). Same models and inputs as ``bench_methods.py``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench_methods import build
from captum_implicit import ImplicitAttnGrad
from captum_implicit.ops import ssm_triton


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="130m")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--impl", default="mamba_ssm", choices=["hf", "mamba_ssm"])
    p.add_argument("--rows", type=int, default=20, help="kernels listed")
    a = p.parse_args()
    torch.manual_seed(0)
    model, _ = build(a.impl, a.size, "cuda")
    ids = torch.randint(0, 256, (1, a.length), device="cuda")
    ours = ImplicitAttnGrad(model)

    def explain():
        ours.attribute(ids, target=7)
        torch.cuda.synchronize()

    for _ in range(2):  # Triton compiles, mamba-ssm autotunes
        explain()
    t = time.perf_counter()
    explain()
    wall = time.perf_counter() - t

    # the kernel calls, each synchronised (this run is slower by the syncs, and says how much is outside them)
    inside, calls, original = [0.0], [0], ssm_triton.ssm_kernel

    def timed_kernel(*args, **kwargs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        torch.cuda.synchronize()
        inside[0] += time.perf_counter() - t0
        calls[0] += 1
        return out

    ssm_triton.ssm_kernel = timed_kernel
    try:
        t = time.perf_counter()
        explain()
        synced = time.perf_counter() - t
    finally:
        ssm_triton.ssm_kernel = original

    # the caching allocator over one explanation: device allocations (cudaMalloc) after the warm-up are a cost
    before = torch.cuda.memory_stats()
    explain()
    after = torch.cuda.memory_stats()
    counters = ("num_device_alloc", "num_device_free", "num_alloc_retries", "segment.all.allocated",
                "segment.all.freed", "oversize_allocations.allocated")
    allocator = ", ".join(f"{k} +{after.get(k, 0) - before.get(k, 0)}" for k in counters)
    reserved = after.get("reserved_bytes.all.current", 0) / 2**30

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        explain()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name][0] += e.time_range.elapsed_us() / 1e6
            per_kernel[e.name][1] += 1
    busy = sum(s for s, _ in per_kernel.values())
    print(f"ImplicitAttnGrad, {a.size} ({a.impl}), L={a.length}: wall {wall:.4f} s")
    print(f"  with each ssm_kernel call synchronised: {synced:.4f} s, of which {inside[0]:.4f} s in {calls[0]} calls")
    print(f"  GPU kernels (profiled run): {busy:.4f} s busy")
    print(f"  allocator over one explanation: {allocator}; {reserved:.1f} GiB reserved")
    print()
    print("| kernel | launches | GPU s | share |")
    print("|---|---|---|---|")
    for name, (sec, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[: a.rows]:
        print(f"| {name[:90]} | {n} | {sec:.4f} | {sec / busy:.1%} |")
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()

"""Benchmarks 3b and 4: one Mamba layer's ``aggregate()`` / ``Ā`` — time, peak memory and achieved FLOP/s.

    python benchmarks/bench_kernel.py --out benchmarks/results/kernel-h200.md

For mamba-130m-, 1.4b- and 2.8b-sized mixers (d_inner 1536 / 4096 / 5120, N = 16, conv 4; random weights,
bf16 weights as the scaling benchmark asks, explained in float32) at L = 1k … 32k, one layer's implicit
attention is captured from a real mamba-ssm ``Mamba`` forward (HF's factors with random data where mamba-ssm
is missing), then timed:

* ``Ā``: ``aggregate("positive_mean", grad)`` — attention × gradient, what ``ImplicitAttnGrad`` needs;
* ``aggregate("mean")`` — the plain channel mean;
* ``Ā`` with ``blockwise(precision="tf32")`` (opt-in): one TF32 product per tile instead of the three that keep
  float32 accuracy, so the same counted FLOPs take a third of the tensor-core work.

FLOPs counted are those of the products the maths needs (``2·BT·BS·N_pad`` per channel and tile
left of the row block, ``K`` times that in the two tiles touching it; elementwise work and exponentials
not counted; each runs as three TF32 products by default), against the measured float32 (IEEE) and TF32 matmul
rates of the same GPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import captum_implicit as ci
from captum_implicit.config import blockwise
from captum_implicit.ops import ssm_triton

SIZES = {"130m": 768, "1.4b": 2048, "2.8b": 2560}


def matmul_rate(tf32: bool, n: int = 8192) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    torch.backends.cuda.matmul.allow_tf32 = False
    return 2 * n**3 * reps / (time.perf_counter() - t)


def capture_layer(d_model: int, length: int):
    torch.manual_seed(0)
    try:
        from mamba_ssm import Mamba

        mixer = Mamba(d_model=d_model, d_state=16, d_conv=4, expand=2, layer_idx=0).cuda().to(torch.bfloat16)
    except ImportError:  # HF's mixer: same factors; its torch scan is slow at long L but only runs once
        import transformers as tf

        cfg = tf.MambaConfig(hidden_size=d_model, state_size=16, num_hidden_layers=1, vocab_size=16)
        mixer = tf.MambaModel(cfg).layers[0].mixer.cuda().to(torch.bfloat16)
    mixer.eval()
    x = torch.randn(1, length, d_model, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        (la,) = ci.implicit_attention(mixer, x)
    del mixer
    return la


def kernel_flops(la, block: int) -> float:
    """FLOPs of the kernel's rank-N products for ``Ā``: ``2·B²·N`` per channel and tile of size ``B``, ×K next to
    the diagonal, over the tiles of the kernel's own launch plan (WIDE_FAR_BLOCK included)."""
    n_pad = max(16, 1 << (la.rate.shape[-1] - 1).bit_length())
    taps = la.conv_weight.shape[-1] if la.conv_weight is not None else 1
    plan = ssm_triton._launch_plan(la.seq_len, block, taps, False, True, torch.device("cpu"))
    products = sum(len(tiles) * size * size * (1 if kind == 1 else taps) for kind, tiles, size in plan)
    return la.batch_size * la.num_channels * 2 * n_pad * products


def timed(fn) -> tuple[float, float]:
    fn()  # compile / warm up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    del out
    return seconds, (torch.cuda.max_memory_allocated() - base) / 2**30


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="130m,1.4b,2.8b")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--max-tokens-squared-channels", type=float, default=float("inf"),
                   help="skip configurations with d_inner·L² above this (to fit a time box)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    f32, tf32 = matmul_rate(False), matmul_rate(True)
    lines = [
        f"# One layer's aggregate() and Ā on {torch.cuda.get_device_name()} (torch {torch.__version__})",
        "",
        f"Measured matmul rates (8192², torch.matmul): float32 IEEE {f32 / 1e12:.1f} TFLOP/s, "
        f"TF32 {tf32 / 1e12:.1f} TFLOP/s.",
        "",
        "| size | d_inner | L | near block | Ā (s) | mean (s) | peak extra GiB (Ā) | kernel FLOPs | TFLOP/s (Ā) "
        "| % of fp32 | % of TF32 | Ā, one TF32 product (s) | its % of TF32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in a.sizes.split(","):
        for length in [int(x) for x in a.lengths.split(",")]:
            if 2 * SIZES[size] * length**2 > a.max_tokens_squared_channels:
                continue
            la = capture_layer(SIZES[size], length)
            grad = torch.randn_like(la.values)
            # the kernel's own choice of near block and form (0 pivoted, 1 per-entry, 2 mixed)
            block, form, _ = ssm_triton._near_forms(la.cum, la.rate, la.conv_weight.shape[-1], length)
            t_grad, mem = timed(lambda: la.aggregate("positive_mean", grad=grad))
            t_mean = timed(lambda: la.aggregate("mean"))[0] if length <= 8192 else float("nan")
            with blockwise(precision="tf32"):  # the opt-in: one TF32 product per tile instead of three
                t_tf32 = timed(lambda: la.aggregate("positive_mean", grad=grad))[0]
            flops = kernel_flops(la, block)
            rate = flops / t_grad
            lines.append(
                f"| {size} | {la.num_channels} | {length} | {block}{('', ' per-entry', ' mixed')[form]} | "
                f"{t_grad:.3f} | {t_mean:.3f} | {mem:.2f} | {flops:.2e} | "
                f"{rate / 1e12:.1f} | {100 * rate / f32:.0f}% | {100 * rate / tf32:.0f}% | {t_tf32:.3f} | "
                f"{100 * flops / t_tf32 / tf32:.0f}% |"
            )
            print(lines[-1], flush=True)
            if a.out:  # written as we go: a long run cut short keeps its rows
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text("\n".join(lines) + "\n")
            la = grad = None  # free the layer before the next capture (not `del`: the lambdas above name them)
            torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

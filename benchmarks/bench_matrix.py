"""Benchmark 1: the published algorithm against ours, on one mamba-130m-sized mixer (D=1536, N=16).

    python benchmarks/bench_matrix.py --device cuda --out benchmarks/results/matrix-h200.md
    python benchmarks/bench_matrix.py --device cpu --lengths 256,512,1024 --out benchmarks/results/matrix-cpu.md

Measures (random weights, float32, batch 1):
* full dense matrix: published loops at small L (their cost is cubic: we fit c·L³ and extrapolate),
  ours ``dense()`` at L up to 2048, and the time to merely write a (D, L, L) float32 tensor;
* last row: published vector path vs ours ``row(L-1)``, with the max difference of the two results
  (the published row omits the D skip, so we compare against ours with D=0 and no conv bias).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))
import captum_implicit as ci  # noqa: E402
from reference_uia import uia_full_matrix, uia_last_row  # noqa: E402


def timed(fn, device: str, repeat: int = 1) -> tuple[float, object]:
    out = None
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def mixer_and_capture(length: int, device: str, published_terms_only: bool):
    torch.manual_seed(0)
    cfg = tf.MambaConfig(hidden_size=768, state_size=16, num_hidden_layers=1, vocab_size=64, use_conv_bias=True)
    model = tf.MambaModel(cfg).to(device).eval()
    if published_terms_only:  # the published matrix has no D and no conv bias
        with torch.no_grad():
            model.layers[0].mixer.D.zero_()
            model.layers[0].mixer.conv1d.bias.zero_()
    ids = torch.randint(0, 64, (1, length), device=device)
    (la,) = ci.implicit_attention(model, ids, use_cache=False)
    delta = torch.diff(la.cum, dim=-1, prepend=torch.zeros_like(la.cum[..., :1])).float()
    dA = torch.exp(delta[..., None] * la.rate[None, :, None, :].float())  # (1, D, L, N)
    dB = delta[..., None] * la.write[:, 0:1].float()  # (1, D, L, N)
    C = la.read[:, 0].transpose(-1, -2).float()  # (1, N, L)
    factors = (dA, dB, C, la.row_scale.float(), la.col_scale.float(), la.conv_weight.float())
    return la, factors


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ref-lengths", default="16,32,48")
    p.add_argument("--lengths", default="256,512,1024,2048")
    p.add_argument("--row-lengths", default="1024,4096")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = a.device
    lines = [f"# Implicit-attention matrix: published loops vs captum-implicit ({dev})", ""]
    if dev == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; D=1536, N=16, float32, batch 1")
    else:
        lines.append(f"CPU: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
                     f"torch {torch.__version__}; D=1536, N=16, float32, batch 1")
    lines += ["", "## Full matrix", ""]
    lines += ["| L | published loops (s) | ours dense() (s) | write (D,L,L) (s) | ours / write |"]
    lines += ["|---|---|---|---|---|"]

    ref_times = {}
    for length in [int(x) for x in a.ref_lengths.split(",")]:
        la, f = mixer_and_capture(length, dev, published_terms_only=True)
        ref_times[length], ref = timed(lambda: uia_full_matrix(*f), dev)
        ours = la.dense()
        diff = float((ours - ref).abs().max() / ref.abs().max())
        t_ours = timed(la.dense, dev)[0]
        lines.append(f"| {length} | {ref_times[length]:.3f} | {t_ours:.4f} | | (max rel diff {diff:.1e}) |")
    # cubic fit through the largest measured reference point
    l0 = max(ref_times)
    coef = ref_times[l0] / l0**3
    for length in [int(x) for x in a.lengths.split(",")]:
        la, _ = mixer_and_capture(length, dev, published_terms_only=False)
        t_ours, dense = timed(la.dense, dev, repeat=2)
        del dense
        t_write, buf = timed(lambda: torch.empty(1, la.num_channels, length, length, device=dev).fill_(1.0), dev, 2)
        del buf
        extrap = coef * length**3
        lines.append(
            f"| {length} | ≈{extrap:.0f} (extrapolated c·L³) | {t_ours:.4f} | {t_write:.4f} | "
            f"{t_ours / t_write:.1f}× "
            f"(speed-up vs published ≈{extrap / t_ours:.0f}×) |"
        )
    lines += ["", "## One query row (the last)", ""]
    lines += ["| L | published row (s) | ours row() (s) | speed-up | max rel diff |", "|---|---|---|---|---|"]
    for length in [int(x) for x in a.row_lengths.split(",")]:
        la, f = mixer_and_capture(length, dev, published_terms_only=True)
        t_ref, ref = timed(lambda: uia_last_row(*f), dev)
        t_ours, ours = timed(lambda: la.row(length - 1), dev, repeat=3)
        diff = float((ours - ref).abs().max() / ref.abs().max())
        lines.append(f"| {length} | {t_ref:.3f} | {t_ours:.4f} | {t_ref / t_ours:.0f}× | {diff:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

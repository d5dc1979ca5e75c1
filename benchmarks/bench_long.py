"""Benchmark 3a: whole-model `ImplicitAttnGrad` on long inputs (streaming mode): time and peak GPU memory.

    python benchmarks/bench_long.py --size 2.8b --lengths 1024,2048,4096,8192,16384,32768 --attn-layers all \
        --out benchmarks/results/long-h200.md

mamba-ssm ``MambaLMHeadModel`` with random bf16 weights (speed and memory do not depend on training), batch 1.
``ImplicitAttnGrad(..., streaming=True)``: the forward and backward of the *whole* model run (all layers, blocks
checkpointed), then the last ``--attn-layers`` layers are re-run alone and turned into ``Ā`` (``start_layer``
= n_layer − attn-layers); every layer costs the same, so the full rollout's time is extrapolated linearly
from the measured per-layer time and said so (``--attn-layers all``: measured, nothing extrapolated). Peak memory
does not depend on how many layers enter the rollout (one layer's factors and map at a time).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from captum_implicit import ImplicitAttnGrad

SIZES = {  # the mamba-ssm reference configs (d_model, n_layer)
    "130m": (768, 24),
    "1.4b": (2048, 48),
    "2.8b": (2560, 64),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="2.8b", choices=sorted(SIZES))
    p.add_argument("--lengths", default="8192,32768")
    p.add_argument("--attn-layers", default="4", help="layers entering the rollout (the last ones), or 'all'")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    d_model, n_layer = SIZES[a.size]
    attn_layers = n_layer if a.attn_layers == "all" else int(a.attn_layers)
    torch.manual_seed(0)
    model = MambaLMHeadModel(
        MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50280, ssm_cfg={"layer": "Mamba1"}),
        device="cuda", dtype=torch.bfloat16,
    ).eval()
    for p_ in model.parameters():
        p_.requires_grad_(False)
    explainer = ImplicitAttnGrad(lambda ids: model(ids).logits, model=model)
    lines = [
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; mamba-ssm {a.size}-sized config "
        f"(d_model {d_model}, {n_layer} layers, d_inner {2 * d_model}), bf16 weights, batch 1, streaming=True",
        "",
        "| L | layers in rollout | seconds | peak GPU GiB | seconds per further rollout layer | all layers (s) |",
        "|---|---|---|---|---|---|",
    ]
    warm = torch.randint(0, 50280, (1, 1024), device="cuda")
    explainer.attribute(warm, target=0, streaming=True, start_layer=n_layer - 1)  # compile the kernels first
    for length in [int(x) for x in a.lengths.split(",")]:
        ids = torch.randint(0, 50280, (1, length), device="cuda")
        times = {}
        explainer.attribute(ids, target=0, streaming=True, start_layer=n_layer - 1)  # warm at this length
        for k in (1, attn_layers):  # two rollout depths: per-layer cost = difference
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t = time.perf_counter()
            attr = explainer.attribute(ids, target=0, streaming=True, start_layer=n_layer - k)
            torch.cuda.synchronize()
            times[k] = (time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**30)
            assert torch.isfinite(attr).all() and attr.abs().sum() > 0
            print(f"L={length} layers={k}: {times[k][0]:.2f} s, peak {times[k][1]:.1f} GiB", flush=True)
        per_layer = (times[attn_layers][0] - times[1][0]) / max(attn_layers - 1, 1)
        total = times[1][0] + per_layer * (n_layer - 1)  # = times[n_layer] where every layer ran
        measured = "" if attn_layers == n_layer else " (est.)"
        for k, (sec, gib) in times.items():
            lines.append(f"| {length} | {k} | {sec:.2f} | {gib:.1f} | {per_layer:.3f} | {total:.1f}{measured} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

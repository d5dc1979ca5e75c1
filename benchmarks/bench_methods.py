"""Benchmark 2: seconds per explanation — ImplicitAttnGrad against one forward+backward of the same model and
against Captum's IntegratedGradients (50 steps), FeatureAblation and KernelShap, on the same inputs.

    python benchmarks/bench_methods.py --device cpu  --size tiny   --length 64   --skip kernel_shap \
        --out benchmarks/results/methods-cpu.md

(Captum's KernelShap needs scikit-learn, which the dev install does not include.)
    python benchmarks/bench_methods.py --device cuda --size 130m   --length 4096 --impl mamba_ssm \
        --out benchmarks/results/methods-h200.md

``--impl mamba_ssm`` uses mamba-ssm's ``MambaLMHeadModel`` (its CUDA kernels) instead of HF's ``MambaForCausalLM``.

Random weights (speed does not depend on training). Token models: Captum's embedding-space methods run on
``inputs_embeds`` through a small wrapper returning the target logit at the last position.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers as tf
from captum.attr import FeatureAblation, IntegratedGradients, KernelShap

from captum_implicit import ImplicitAttnGrad
from captum_implicit.config import blockwise

SIZES = {
    "tiny": dict(hidden_size=64, state_size=8, num_hidden_layers=2),
    "small": dict(hidden_size=128, state_size=16, num_hidden_layers=4),
    "130m": dict(hidden_size=768, state_size=16, num_hidden_layers=24),
}


class SSMLastLogit(torch.nn.Module):
    """The same for mamba-ssm's MambaLMHeadModel, which takes no embeddings: its embedding's output is replaced."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        ids = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        handle = self.model.backbone.embedding.register_forward_hook(lambda m, a, out: embeds.to(out.dtype))
        try:
            return self.model(ids).logits[:, -1]
        finally:
            handle.remove()


def build(impl: str, size: str, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model for ImplicitAttnGrad, wrapper embeds -> last-position logits for Captum)."""
    if impl == "mamba_ssm":
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        cfg = SIZES[size]
        model = MambaLMHeadModel(
            MambaConfig(d_model=cfg["hidden_size"], n_layer=cfg["num_hidden_layers"], vocab_size=256,
                        ssm_cfg={"layer": "Mamba1", "d_state": cfg["state_size"]}),
            device=device,
        ).eval()
        return model, SSMLastLogit(model)
    model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=256, **SIZES[size])).to(device).eval()
    return model, LastLogit(model)


class LastLogit(torch.nn.Module):
    """inputs_embeds (B, L, D) -> logits at the last position (B, V), for Captum's embedding-space methods."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=embeds, use_cache=False).logits[:, -1]


def timed(fn, device: str, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--impl", default="hf", choices=["hf", "mamba_ssm"])
    p.add_argument("--batch", type=int, default=1, help="perturbations per forward for FeatureAblation")
    p.add_argument("--skip", default="", help="comma-separated methods to skip (e.g. kernel_shap)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev, length = a.device, a.length
    torch.manual_seed(0)
    model, wrapped = build(a.impl, a.size, dev)
    ids = torch.randint(0, 256, (1, length), device=dev)
    target = 7
    embedding = model.backbone.embedding if a.impl == "mamba_ssm" else model.get_input_embeddings()
    embeds = embedding(ids).detach()
    skip = set(a.skip.split(",")) if a.skip else set()

    def fwd_bwd():
        e = embeds.clone().requires_grad_()
        wrapped(e)[0, target].backward()

    rows = [("one forward + backward", timed(fwd_bwd, dev))]
    ours = ImplicitAttnGrad(model)
    rows.append(("ImplicitAttnGrad", timed(lambda: ours.attribute(ids, target=target), dev)))
    if dev == "cuda":  # the kernels' one-TF32-product switch (TF32 accuracy: see captum_implicit.config)
        with blockwise(precision="tf32"):
            rows.append(('ImplicitAttnGrad, precision="tf32"', timed(lambda: ours.attribute(ids, target=target), dev)))
    if "ig" not in skip:
        ig = IntegratedGradients(wrapped)

        def run():
            return ig.attribute(embeds, target=target, n_steps=50, internal_batch_size=10)

        rows.append(("IntegratedGradients (50 steps)", timed(run, dev, 1)))
    if "feature_ablation" not in skip:
        fa = FeatureAblation(wrapped)
        mask = torch.arange(length, device=dev)[None, :, None].expand_as(embeds)

        def run():
            return fa.attribute(embeds, target=target, feature_mask=mask, perturbations_per_eval=a.batch)

        rows.append(("FeatureAblation (one token at a time)", timed(run, dev, 1)))
    if "kernel_shap" not in skip:
        ks = KernelShap(wrapped)
        mask = torch.arange(length, device=dev)[None, :, None].expand_as(embeds)

        def run():
            return ks.attribute(embeds, target=target, feature_mask=mask, n_samples=200)

        rows.append(("KernelShap (200 samples)", timed(run, dev, 1)))
    base = dict(rows)["ImplicitAttnGrad"]
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    lines = [
        f"# Seconds per explanation ({name}; Mamba {a.size} ({a.impl}), random weights, L={length}, batch 1, float32)",
        "",
        "| method | seconds | × ImplicitAttnGrad |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {t:.4f} | {t / base:.2f} |" for n, t in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

"""docs/evaluation.md: ImplicitAttnGrad layer reductions on a bundled model (RWKV investigation).

Usage: PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/eval_rwkv_variants.py \
    rwkv-trigger current,combined,signed,abs,cur_only 64
Each variant replaces LayerAttention.aggregate("positive_mean", grad) for the run (dense per layer: small models only).
"""
import sys, tempfile, time

from captum_implicit.cli import zoo_task
from captum_implicit.eval import evaluate
from captum_implicit.layers.rwkv import RwkvAttention
from captum_implicit.core.attention import LayerAttention

orig = LayerAttention.aggregate

def contributions(self, grad):
    d = self.dense()  # (b, 2A, L, L)
    g = grad.to(d.dtype) @ self.values.to(d.dtype).transpose(-1, -2)
    return d * g

def make(variant):
    def agg(self, reduce="mean", grad=None):
        if grad is None or reduce != "positive_mean" or variant == "current":
            return orig(self, reduce, grad)
        c = contributions(self, grad)
        h = getattr(self, "attention_channels", None)
        if variant == "combined":
            return (c[:, :h] + c[:, h:]).clamp(min=0).mean(1)
        if variant == "combined_sum2A":  # same but divided by 2A (scale as current)
            return (c[:, :h] + c[:, h:]).clamp(min=0).sum(1) / (2 * h)
        if variant == "signed":
            return c.mean(1)
        if variant == "abs":
            return c.abs().mean(1)
        if variant == "cur_only":
            return c[:, :h].clamp(min=0).mean(1)
        raise ValueError(variant)
    return agg

variants = sys.argv[2].split(",")
models = sys.argv[1].split(",")
n = int(sys.argv[3])
for model in models:
    for v in variants:
        RwkvAttention.aggregate = make(v)
        if "rwkv" not in model:
            LayerAttention.aggregate = make(v) if v != "current" else orig
        t = time.time()
        r = evaluate([zoo_task(model, n)], {"attn_grad": "implicit_attn_grad"}, tempfile.mkdtemp(), sanity=False,
                     progress=False)
        m = {row["metric"]: (row["mean"], row["ci95"]) for row in r.summary}
        auroc = m.get("gt_auroc", (float("nan"),) * 2)
        print(model, v, "dAF %.3f±%.3f" % m["dAF_logit"], "AUROC %.3f±%.3f" % auroc, "%.0fs" % (time.time() - t),
              flush=True)
        LayerAttention.aggregate = orig

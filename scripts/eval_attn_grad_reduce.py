"""docs/evaluation.md: ImplicitAttnGrad's channel reduction, positive part (Chefer) vs absolute value, per model.

Usage: PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/eval_attn_grad_reduce.py [examples] [models]
"""
import sys
import tempfile
import time

from captum_implicit.cli import zoo_task
from captum_implicit.eval import evaluate

n = int(sys.argv[1]) if len(sys.argv) > 1 else 32
models = (sys.argv[2] if len(sys.argv) > 2 else
          "mamba-trigger,mamba2-trigger,rwkv-trigger,griffin-trigger,"
          "mamba-rotten-tomatoes,mamba2-rotten-tomatoes,rwkv-rotten-tomatoes,griffin-rotten-tomatoes").split(",")
methods = {
    "positive_mean": "implicit_attn_grad",
    "abs_mean": ("implicit_attn_grad", {"reduce": "abs_mean"}),
}
print("| model | reduction | ΔA^F logit | ground-truth AUROC |")
print("|---|---|---|---|")
for model in models:
    t = time.time()
    r = evaluate([zoo_task(model, n)], methods, tempfile.mkdtemp(), sanity=False, progress=False)
    for row_method in methods:
        m = {row["metric"]: (row["mean"], row["ci95"]) for row in r.summary if row["method"] == row_method}
        auroc = m.get("gt_auroc")
        print(f"| {model} | {row_method} | {m['dAF_logit'][0]:.2f} ± {m['dAF_logit'][1]:.2f} | "
              + (f"{auroc[0]:.3f} ± {auroc[1]:.3f} |" if auroc else "— |"), flush=True)

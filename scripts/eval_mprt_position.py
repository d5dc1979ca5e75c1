"""docs/evaluation.md: why implicit-attention maps survive MPRT (position prior vs learned evidence).

Usage: PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/eval_mprt_position.py \
    rwkv-trigger,griffin-trigger,mamba-trigger implicit_attn_grad,integrated_gradients
Same full randomisation as the runner (cascading, seed 0), first 8 test examples.
"""
import sys, torch
from captum_implicit.cli import zoo_task
from captum_implicit.eval import TokenModel, build_explainer, spearman
from captum_implicit.eval.runner import _prepare
from captum_implicit.eval.sanity import layer_groups, randomise_

def partial(rxy, rxz, ryz):
    return (rxy - rxz * ryz) / ((1 - rxz**2) * (1 - ryz**2)).clamp_min(1e-12).sqrt()

methods = sys.argv[2].split(",")
for name in sys.argv[1].split(","):
    task = zoo_task(name, 8)
    model = task.model.eval()
    tm = TokenModel(model)
    batches, info = _prepare(task, tm, 16, 8)
    bt = batches[0]
    ids, mask, tgt, valid = bt.ids, bt.mask, bt.target, bt.flippable
    pos = torch.arange(ids.shape[1], dtype=torch.float64).expand(ids.shape)  # larger = closer to the read-out
    # same tokens, random order (read-out kept last): does the randomised map still follow the input?
    g = torch.Generator().manual_seed(1)
    shuf = ids.clone()
    for i in range(len(ids)):
        idx = valid[i].nonzero().flatten()
        shuf[i, idx] = ids[i, idx[torch.randperm(len(idx), generator=g)]]
    saved = [(p, p.detach().clone()) for p in model.parameters()]
    for m in methods:
        ex = build_explainer(m, tm, baseline_token_id=info["replacement"], seed=0)
        torch.manual_seed(0)
        r0 = ex(ids, mask, tgt).abs()
        gen = torch.Generator().manual_seed(0)
        for _, ps in reversed(layer_groups(model)):
            randomise_(ps, gen)
        torch.manual_seed(0)
        r1 = ex(ids, mask, tgt).abs()
        torch.manual_seed(0)
        r1s = ex(shuf, mask, tgt).abs()
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)
        rho = spearman(r0, r1, valid)
        p0, p1 = spearman(r0, pos, valid), spearman(r1, pos, valid)
        # randomised map of a shuffled input, compared position by position with the randomised map of the input
        rs = spearman(r1, r1s, valid)
        print(f"{name:16s} {m:28s} MPRT rho {rho.nanmean():+.2f} | rho(orig, position) {p0.nanmean():+.2f} "
              f"| rho(random, position) {p1.nanmean():+.2f} | partial MPRT rho given position "
              f"{partial(rho, p0, p1).nanmean():+.2f} | randomised: input vs shuffled input {rs.nanmean():+.2f}",
              flush=True)

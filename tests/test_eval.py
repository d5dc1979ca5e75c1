"""Evaluation suite: every metric on toy models whose answers are known.

The main toy is a linear bag-of-words classifier, ``logit_c(x) = Σ_i m_i · e(x_i)·w_c + b_c``: the
exact contribution of token ``i`` to class ``c`` is ``e(x_i)·w_c`` and the neutral token has a zero
embedding, so flipping token ``i`` to it lowers ``logit_c`` by exactly that contribution.
"""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from captum_implicit.eval import (
    Task,
    TokenModel,
    aopc,
    apply_flips,
    area,
    auroc,
    build_explainer,
    delta_af,
    eraser_scores,
    evaluate,
    flippable_mask,
    flipping_curves,
    mean_ci,
    mprt,
    perturbation_auc,
    pointing_game,
    precision_at_k,
    random_explainer,
    rank_positions,
    relevance_mass,
    spearman,
)
from captum_implicit.eval.stats import t_quantile
from conftest import requires_cuda

NEUTRAL = 1
PAD = 0


class BagOfWords(nn.Module):
    """Linear bag of words over token ids (HF-like: keyword forward, ``get_input_embeddings``)."""

    def __init__(self, vocab: int = 24, dim: int = 6, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim).double()
        self.head = nn.Linear(dim, classes).double()
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, dim, generator=g, dtype=torch.float64))
            self.emb.weight[NEUTRAL] = 0
            self.head.weight.copy_(torch.randn(classes, dim, generator=g, dtype=torch.float64))
            self.head.bias.copy_(torch.randn(classes, generator=g, dtype=torch.float64))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        e = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        m = torch.ones(e.shape[:2], dtype=e.dtype) if attention_mask is None else attention_mask.to(e.dtype)
        return SimpleNamespace(logits=self.head((e * m[..., None]).sum(1)))

    def contributions(self, input_ids, attention_mask, target):
        """Exact per-token contribution to the target logit, (B, L)."""
        w = self.head.weight[target]  # (B, D)
        return torch.einsum("bld,bd->bl", self.emb(input_ids), w).detach() * attention_mask


def oracle(model: BagOfWords, sign: float = 1.0):
    return lambda ids, mask, target: sign * model.contributions(ids, mask, target)


def random_batch(n: int = 64, length: int = 12, vocab: int = 24, seed: int = 1):
    """Random ids in 2..vocab-1 with right padding of random length (at least 4 real tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, length), generator=g)
    lens = torch.randint(4, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lens[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def hand_model() -> BagOfWords:
    """Tokens 2..5 contribute 3, 1, −1, 0 to class 1 (class 0 logit ≡ 0); class-1 bias 0.5."""
    m = BagOfWords(vocab=6, dim=1, classes=2)
    with torch.no_grad():
        m.emb.weight.copy_(torch.tensor([[0.0], [0.0], [3.0], [1.0], [-1.0], [0.0]], dtype=torch.float64))
        m.head.weight.copy_(torch.tensor([[0.0], [1.0]], dtype=torch.float64))
        m.head.bias.copy_(torch.tensor([0.0, 0.5], dtype=torch.float64))
    return m


# ---------------------------------------------------------------- stats


def test_t_quantile_and_ci_known_values():
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.9602, abs=1e-3)
    mean, hw, n = mean_ci([1.0, 2.0, 3.0, 4.0, float("nan"), 5.0])
    assert (mean, n) == (3.0, 5)
    assert hw == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5), abs=1e-4)


def test_spearman_ties_and_constants():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 2.0, 3.0]])
    b = torch.tensor([[4.0, 3.0, 2.0, 1.0], [2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 2.0, 3.0]])
    rho = spearman(a, b)
    assert rho.tolist() == pytest.approx([-1.0, 1.0, 0.0, 1.0])


# ---------------------------------------------------------------- engine


def test_ranks_are_morf_order_and_skip_protected_positions():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 9.0]])
    flippable = torch.tensor([[True, True, True, True, False]])
    assert rank_positions(scores, flippable).tolist() == [[3, 0, 2, 1, 5]]


def test_ties_are_broken_at_random_not_by_position():
    scores = torch.zeros(400, 5)
    ranks = rank_positions(scores, torch.ones(400, 5, dtype=torch.bool), torch.Generator().manual_seed(0))
    first = (ranks == 0).double().mean(0)  # how often each position is flipped first
    assert (first - 0.2).abs().max() < 0.07


def test_flippable_excludes_padding_special_and_readout():
    ids = torch.tensor([[7, 3, 4, 8, 0], [0, 7, 3, 4, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    f = flippable_mask(ids, mask, special_ids=[7], protect_last=True)
    assert f.tolist() == [[False, True, True, False, False], [False, False, True, True, False]]


def test_deletion_packs_tokens_on_the_padding_side():
    ids = torch.tensor([[5, 6, 7, 0], [0, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    flip = torch.tensor([[False, True, False, False], [False, False, True, False]])
    # two rows with different padding sides cannot share a batch; check each side separately
    x, m = apply_flips(ids[:1], mask[:1], flip[:1], "delete", pad_id=9)
    assert x.tolist() == [[5, 7, 9, 9]] and m.tolist() == [[1, 1, 0, 0]]
    x, m = apply_flips(ids[1:], mask[1:], flip[1:], "delete", pad_id=9)
    assert x.tolist() == [[9, 9, 5, 7]] and m.tolist() == [[0, 0, 1, 1]]
    with pytest.raises(ValueError):
        apply_flips(ids[:1], mask[:1], torch.tensor([[False, False, False, True]]), 2)


def test_padding_is_never_flipped_and_batching_does_not_change_the_curves():
    model = BagOfWords()
    tm = TokenModel(model)
    ids, mask = random_batch(n=8)
    seen = []

    def recording_forward(x, m):
        seen.append((x.clone(), m.clone()))
        return tm(x, m)

    target = tm(ids, mask).argmax(-1)
    attr = oracle(model)(ids, mask, target)
    f = flippable_mask(ids, mask)
    batched = flipping_curves(recording_forward, ids, mask, attr, target, f, NEUTRAL, steps=5, batch_size=7)
    for x, m in seen:
        assert (x[m == 0] == PAD).all()  # padding untouched, never replaced
    for i in range(len(ids)):
        n = int(mask[i].sum())
        one = flipping_curves(tm, ids[i : i + 1, :n], mask[i : i + 1, :n], attr[i : i + 1, :n], target[i : i + 1],
                              f[i : i + 1, :n], NEUTRAL, steps=5)
        torch.testing.assert_close(one.logit_morf[0], batched.logit_morf[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(one.logit_lerf[0], batched.logit_lerf[i], rtol=1e-12, atol=1e-12)


def test_deletion_equals_a_neutral_token_on_a_bag_of_words():
    """Removing a token and replacing it with a zero-embedding token change a bag of words alike."""
    model = BagOfWords()
    tm = TokenModel(model)
    ids, mask = random_batch(n=16)
    target = tm(ids, mask).argmax(-1)
    attr = random_explainer(2)(ids, mask, target)
    f = flippable_mask(ids, mask)
    a = flipping_curves(tm, ids, mask, attr, target, f, NEUTRAL, generator=torch.Generator().manual_seed(0))
    b = flipping_curves(tm, ids, mask, attr, target, f, "delete", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.logit_morf, b.logit_morf, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.logit_lerf, b.logit_lerf, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- flipping, AOPC, ERASER: hand-computed


def test_flipping_aopc_and_perturbation_auc_by_hand():
    """Contributions (3, 1, −1, 0), bias 0.5, steps of 1/4: MoRF flips 3, 1, 0, −1; LeRF −1, 0, 1, 3.

    s_MoRF = (3.5, 0.5, −0.5, −0.5, 0.5), s_LeRF = (3.5, 4.5, 4.5, 3.5, 0.5) → A_MoRF = 0.375,
    A_LeRF = 3.625, ΔA^F = 3.25; AOPC_MoRF = (0+3+4+4+3)/5 = 2.8, AOPC_LeRF = (0−1−1+0+3)/5 = 0.2.
    Accuracy (label 1 ⇔ logit > 0): MoRF (1, 1, 0, 0, 1), LeRF all 1 → ΔA^F_acc = 1 − 0.5 = 0.5;
    Chefer AUC over p ≤ 0.9 (p = 0, ¼, ½, ¾): positive 100·¼·(1 + ½ + 0) = 37.5, negative 75.
    """
    model = hand_model()
    tm = TokenModel(model)
    ids, mask = torch.tensor([[2, 3, 4, 5]]), torch.ones(1, 4, dtype=torch.long)
    target = torch.tensor([1])
    attr = model.contributions(ids, mask, target)
    c = flipping_curves(tm, ids, mask, attr, target, flippable_mask(ids, mask), NEUTRAL, steps=4, labels=target)
    assert c.logit_morf[0].tolist() == pytest.approx([3.5, 0.5, -0.5, -0.5, 0.5])
    assert c.logit_lerf[0].tolist() == pytest.approx([3.5, 4.5, 4.5, 3.5, 0.5])
    assert float(area(c, "morf")[0]) == pytest.approx(0.375)
    assert float(area(c, "lerf")[0]) == pytest.approx(3.625)
    assert float(delta_af(c)[0]) == pytest.approx(3.25)
    assert float(delta_af(c, normalise="divide")[0]) == pytest.approx(3.25 / 3.5)
    assert float(aopc(c, "morf")[0]) == pytest.approx(2.8)
    assert float(aopc(c, "lerf")[0]) == pytest.approx(0.2)
    assert float(delta_af(c, "accuracy")[0]) == pytest.approx(0.5)
    assert float(perturbation_auc(c, "morf")[0]) == pytest.approx(37.5)
    assert float(perturbation_auc(c, "lerf")[0]) == pytest.approx(75.0)


def test_eraser_by_hand():
    """Predicted class 1, p₁ = σ(S + ½). t = ¼ → r = {3}: comp σ(3.5) − σ(0.5), suff σ(3.5) − σ(3.5) = 0.
    t = ½ → r = {3, 1}: comp σ(3.5) − σ(−0.5), suff σ(3.5) − σ(4.5)."""
    model = hand_model()
    tm = TokenModel(model)
    ids, mask = torch.tensor([[2, 3, 4, 5]]), torch.ones(1, 4, dtype=torch.long)
    attr = model.contributions(ids, mask, torch.tensor([1]))
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    e = eraser_scores(tm, ids, mask, attr, flippable_mask(ids, mask), NEUTRAL, thresholds=(0.25, 0.5))
    comp = [sig(3.5) - sig(0.5), sig(3.5) - sig(-0.5)]
    suff = [0.0, sig(3.5) - sig(4.5)]
    assert e.comprehensiveness[0].tolist() == pytest.approx(comp)
    assert e.sufficiency[0].tolist() == pytest.approx(suff, abs=1e-12)
    assert float(e.aopc_comprehensiveness[0]) == pytest.approx(sum(comp) / 2)
    assert float(e.aopc_sufficiency[0]) == pytest.approx(sum(suff) / 2)


# ---------------------------------------------------------------- oracle vs random vs reversed


def test_oracle_beats_random_and_reversed_oracle_loses():
    model = BagOfWords()
    tm = TokenModel(model)
    ids, mask = random_batch(n=96)
    target = tm(ids, mask).argmax(-1)
    f = flippable_mask(ids, mask)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    res = {}
    for name, ex in {"oracle": oracle(model), "reversed": oracle(model, -1.0), "random": random_explainer(0)}.items():
        attr = ex(ids, mask, target)
        c = flipping_curves(tm, ids, mask, attr, target, f, NEUTRAL, steps=10, generator=gen())
        e = eraser_scores(tm, ids, mask, attr, f, NEUTRAL, generator=gen())
        res[name] = (c, e)
    oc, rc, xc = res["oracle"][0], res["random"][0], res["reversed"][0]
    # additive model: removing the k largest contributions is the lowest logit any order reaches
    assert (oc.logit_morf <= rc.logit_morf + 1e-9).all() and (oc.logit_lerf >= rc.logit_lerf - 1e-9).all()
    # reversing the order swaps MoRF and LeRF exactly
    torch.testing.assert_close(delta_af(xc), -delta_af(oc))
    d = {k: float(delta_af(c).mean()) for k, (c, _) in res.items()}
    assert d["oracle"] > d["random"] + 1 and d["reversed"] < d["random"] - 1
    assert abs(d["random"]) < 0.5 * d["oracle"]
    comp = {k: float(e.aopc_comprehensiveness.mean()) for k, (_, e) in res.items()}
    suff = {k: float(e.aopc_sufficiency.mean()) for k, (_, e) in res.items()}
    assert comp["oracle"] > comp["random"] > comp["reversed"]
    assert suff["oracle"] < suff["random"] < suff["reversed"]
    aop = {k: float(aopc(c).mean()) for k, (c, _) in res.items()}
    assert aop["oracle"] > aop["random"] > aop["reversed"]
    pos = {k: float(perturbation_auc(c, "morf").mean()) for k, (c, _) in res.items()}
    neg = {k: float(perturbation_auc(c, "lerf").mean()) for k, (c, _) in res.items()}
    assert pos["oracle"] < pos["random"] < pos["reversed"]
    assert neg["oracle"] > neg["random"] > neg["reversed"]


# ---------------------------------------------------------------- ground truth


def test_ground_truth_by_hand():
    s = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    g = torch.tensor([[True, False, False, True]])
    assert float(auroc(s, g)[0]) == pytest.approx(0.75)
    assert float(precision_at_k(s, g)[0]) == pytest.approx(0.5)
    assert float(precision_at_k(s, g, k=1)[0]) == pytest.approx(1.0)
    assert float(relevance_mass(s, g)[0]) == pytest.approx(1.2 / 1.8)
    assert float(pointing_game(s, g)[0]) == 1.0
    # ties count one half: a constant map is at chance, whatever the positions
    assert float(auroc(torch.tensor([[0.5, 0.5, 0.1]]), torch.tensor([[True, False, False]]))[0]) == 0.75
    assert float(auroc(torch.ones(1, 4), g)[0]) == 0.5
    # undefined without relevant tokens
    assert math.isnan(float(auroc(s, torch.zeros_like(g))[0]))


def test_ground_truth_oracle_is_perfect_and_random_is_chance():
    """Trigger task: only tokens 2 and 3 carry weight; relevant = their positions."""
    model = BagOfWords()
    with torch.no_grad():
        model.emb.weight[4:] = 0
    ids, mask = random_batch(n=400, length=10, vocab=8, seed=3)
    relevant = ((ids == 2) | (ids == 3)) & mask.bool()
    target = TokenModel(model)(ids, mask).argmax(-1)
    o = oracle(model)(ids, mask, target).abs()
    r = random_explainer(1)(ids, mask, target)
    valid = mask.bool()
    a_o, a_r = auroc(o, relevant, valid), auroc(r, relevant, valid)
    defined = ~torch.isnan(a_o)
    assert defined.sum() > 300
    assert (a_o[defined] == 1).all()
    assert (precision_at_k(o, relevant, valid)[defined] == 1).all()
    assert abs(float(a_r.nanmean()) - 0.5) < 0.04
    base_rate = float((relevant & valid).sum() / valid.sum())
    assert abs(float(precision_at_k(r, relevant, valid).nanmean()) - base_rate) < 0.06


# ---------------------------------------------------------------- explainers


@pytest.mark.parametrize(
    "name", ["input_x_gradient", "integrated_gradients", "feature_ablation", "occlusion", "kernel_shap"]
)
def test_captum_adapters_recover_exact_contributions(name):
    """On a linear model every one of these attributions equals the exact per-token contribution
    (for ablation methods: with the neutral-token embedding as baseline)."""
    model = BagOfWords()
    tm = TokenModel(model)
    ids, mask = random_batch(n=3, length=7)
    target = tm(ids, mask).argmax(-1)
    torch.manual_seed(0)
    ex = build_explainer(name, tm, baseline_token_id=NEUTRAL)
    attr = ex(ids, mask, target)
    assert attr.shape == ids.shape
    assert (attr[mask == 0] == 0).all()
    # Captum itself rounds two of them to float32: KernelShap casts the regression data
    # (lime.py `.float()`), Occlusion its window-count normalisation (feature_ablation.py
    # `single_attrib.float() / weight`). The others stay in the model's float64.
    tol = {"kernel_shap": 1e-4, "occlusion": 1e-6}.get(name, 1e-9)
    torch.testing.assert_close(attr.double(), model.contributions(ids, mask, target), rtol=tol, atol=tol)


def test_saliency_shape_and_sign():
    model = BagOfWords()
    tm = TokenModel(model)
    ids, mask = random_batch(n=3, length=7)
    attr = build_explainer("saliency", tm)(ids, mask, tm(ids, mask).argmax(-1))
    assert attr.shape == ids.shape and (attr >= 0).all() and (attr[mask == 1] > 0).all()


def test_random_explainer_is_seeded():
    ids, mask = random_batch(n=4)
    t = torch.zeros(4, dtype=torch.long)
    a, b, c = random_explainer(5)(ids, mask, t), random_explainer(5)(ids, mask, t), random_explainer(6)(ids, mask, t)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_our_methods_are_registered_lazily():
    """Importing the evaluation must not import captum_implicit.attr / lrp (they may not exist yet)."""
    code = (
        "import sys, captum_implicit.eval as e; "
        "assert {'implicit_attn_grad', 'uia', 'mamba_attr', 'gated_linear_lrp'} <= set(e.available_methods()); "
        "assert 'captum_implicit.attr' not in sys.modules and 'captum_implicit.lrp' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- sanity (MPRT)


class TokenMLP(nn.Module):
    """embedding → 2 blocks (per-token MLP with residual) → sum → head."""

    def __init__(self, vocab: int = 24, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(2))
        self.scale = nn.Parameter(torch.ones(dim))  # a raw Parameter, as SSMs keep A_log / D
        self.head = nn.Linear(dim, classes)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        h = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        for blk in self.blocks:
            h = h + blk(h)
        h = (h * self.scale * attention_mask[..., None]).sum(1)
        return self.head(h)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_mprt_detects_weight_independent_explanations_and_restores_weights():
    model = TokenMLP()
    tm = TokenModel(model)
    ids, mask = random_batch(n=16, length=10)
    target = tm(ids, mask).argmax(-1)
    before = _state(model)
    ixg = build_explainer("input_x_gradient", tm)
    good = mprt(model, ixg, ids, mask, target)
    assert good.steps == ["<after blocks>", "blocks.1", "blocks.0", "<before blocks>"]
    assert good.passed() and abs(float(good.final().mean())) < 0.3
    constant = mprt(model, lambda i, m, t: torch.ones(i.shape), ids, mask, target)
    by_id = mprt(model, lambda i, m, t: i.double(), ids, mask, target)
    for res in (constant, by_id):
        assert not res.passed()
        torch.testing.assert_close(res.spearman_abs, torch.ones_like(res.spearman_abs), rtol=0, atol=1e-12)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.scale.requires_grad


def test_mprt_restores_weights_on_error_and_in_independent_order():
    model = TokenMLP()
    ids, mask = random_batch(n=4, length=6)
    before = _state(model)
    calls = []

    def failing(i, m, t):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return torch.rand(i.shape)

    with pytest.raises(RuntimeError, match="boom"):
        mprt(model, failing, ids, mask, torch.zeros(4, dtype=torch.long))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # independent: step s randomises group s only — the head-only step leaves the embedding intact
    seen = []
    mprt(model, lambda i, m, t: seen.append(model.emb.weight.clone()) or torch.rand(i.shape), ids, mask,
         torch.zeros(4, dtype=torch.long), order="independent")
    assert torch.equal(seen[1], before["emb.weight"]) and not torch.equal(seen[-1], before["emb.weight"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- runner


def test_runner_writes_tables_plots_and_command(tmp_path):
    model = BagOfWords()
    model.train()
    ids, mask = random_batch(n=20, length=9)
    tm = TokenModel(model)
    target = tm(ids, mask).argmax(-1)
    data = []
    for i in range(len(ids)):
        n = int(mask[i].sum())
        x = ids[i, :n]
        data.append({"input_ids": x.tolist(), "label": int(target[i]), "relevant_mask": (x == 2).tolist()})
    methods = {
        "oracle": lambda tm_: oracle(tm_.model),
        "random": "random",
        "IxG": "input_x_gradient",
    }
    res = evaluate([("bow", model, None, data)], methods, tmp_path, steps=5, batch_size=8, sanity_examples=6,
                   progress=False, command="pytest runner", seed=3)
    assert model.training  # mode restored
    for f in ("results.md", "results.csv", "per_example.csv", "run.json", "flip_bow.png", "mprt_bow.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    md = (tmp_path / "results.md").read_text()
    assert "pytest runner" in md and "Seed: 3" in md and "| oracle |" in md and "ΔA^F logit" in md
    meta = res.meta
    assert meta["seed"] == 3 and meta["command"] == "pytest runner"
    assert meta["tasks"]["bow"]["replacement"] != 2  # never a relevant token
    means = {(r["method"], r["metric"]): r["mean"] for r in res.summary}
    assert means[("oracle", "dAF_logit")] > means[("random", "dAF_logit")]
    # IxG is exact on a linear model, so it ties with the oracle
    assert means[("IxG", "dAF_logit")] == pytest.approx(means[("oracle", "dAF_logit")])
    assert ("random", "gt_auroc") in means and ("oracle", "seconds") in means and ("IxG", "mprt_rho") in means
    n_rows = {(r["method"], r["metric"]): r["n"] for r in res.summary}
    assert n_rows[("oracle", "dAF_logit")] == 20 and n_rows[("oracle", "mprt_rho")] == 6
    assert len(res.per_example) == 3 * 20


def test_runner_warns_about_an_unseen_flip_value(tmp_path):
    model = BagOfWords()
    data = [{"input_ids": [2, 3, 4, 5]}, {"input_ids": [5, 6, 7]}]
    with pytest.warns(UserWarning, match="never occurs in the dataset"):
        evaluate([Task("bow", model, dataset=data, replacement=PAD)], {"random": "random"}, tmp_path,
                 steps=2, sanity=False, progress=False)


class CausalBag(BagOfWords):
    """Causal LM-shaped bag of words: logits at position t sum the contributions of tokens ≤ t."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        e = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        m = torch.ones(e.shape[:2], dtype=e.dtype) if attention_mask is None else attention_mask.to(e.dtype)
        return (self.head.weight @ (e * m[..., None]).cumsum(1).transpose(1, 2)).transpose(1, 2) + self.head.bias


@pytest.mark.filterwarnings("ignore:task .lm.. the flip value")  # the toy data never contain the neutral id
def test_causal_readout_is_the_last_real_token_and_is_never_flipped(tmp_path):
    model = CausalBag()
    tm = TokenModel(model)
    ids, mask = random_batch(n=6, length=8)
    out = tm(ids, mask)
    assert tm.sequence_output
    for i in range(len(ids)):
        n = int(mask[i].sum())
        torch.testing.assert_close(out[i], tm(ids[i : i + 1, :n], mask[i : i + 1, :n])[0], rtol=0, atol=1e-12)
    seen = []

    class Spy(CausalBag):
        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
            if input_ids is not None:
                seen.append((input_ids.clone(), attention_mask.clone()))
            return super().forward(input_ids, attention_mask, inputs_embeds)

    data = [{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [9, 8, 7]}]
    res = evaluate([Task("lm", Spy(), dataset=data, replacement=NEUTRAL)], {"random": "random"}, tmp_path,
                   steps=4, sanity=False, progress=False)
    assert res.meta["tasks"]["lm"]["protect_last"] is True
    assert len(seen) > 1
    for x, m in seen:  # every forward, perturbed or not: each row still ends in its read-out token (9 or 7)
        for row, row_mask in zip(x, m):
            assert int(row[row_mask.bool()][-1]) in (9, 7)


@pytest.mark.gpu
@requires_cuda
def test_runner_on_cuda_matches_cpu(tmp_path):
    data = [{"input_ids": r[m.bool()].tolist(), "label": 0, "relevant_mask": (r[m.bool()] == 2).tolist()}
            for r, m in zip(*random_batch(n=12, length=9))]
    methods = {"random": "random", "IxG": "input_x_gradient", "FA": "feature_ablation",
               "KS": ("kernel_shap", {"n_samples": 64})}
    kw = dict(steps=5, batch_size=5, sanity_examples=4, progress=False, command="gpu test")
    cpu = evaluate([Task("bow", BagOfWords(), dataset=data)], methods, tmp_path / "cpu", **kw)
    gpu = evaluate([Task("bow", BagOfWords().cuda(), dataset=data)], methods, tmp_path / "gpu", **kw)
    a = {(r["method"], r["metric"]): r["mean"] for r in cpu.summary if r["metric"] != "seconds"}
    b = {(r["method"], r["metric"]): r["mean"] for r in gpu.summary if r["metric"] != "seconds"}
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-9), k


# ---------------------------------------------------------------- KernelShap solvers, LRP applicability


def test_kernel_shap_sklearn_and_lstsq_solve_the_same_regression():
    """Captum's default interpretable model (scikit-learn) and the built-in weighted least squares
    fit the same coalitions (same seed) to the same coefficients, up to Captum's float32 cast."""
    pytest.importorskip("sklearn")
    model = BagOfWords()
    tm = TokenModel(model)
    ids, mask = random_batch(n=3, length=7)
    target = tm(ids, mask).argmax(-1)
    out = {}
    for solver in ("sklearn", "lstsq"):
        torch.manual_seed(0)
        out[solver] = build_explainer(("kernel_shap", {"n_samples": 64, "solver": solver}), tm,
                                      baseline_token_id=NEUTRAL)(ids, mask, target)
    torch.testing.assert_close(out["sklearn"].double(), out["lstsq"].double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["sklearn"].double(), model.contributions(ids, mask, target), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="solver"):
        build_explainer(("kernel_shap", {"solver": "nope"}), tm)


def test_kernel_shap_without_sklearn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` now raises ImportError
    with pytest.raises(ImportError, match=r"captum-implicit\[eval\].*solver='lstsq'"):
        build_explainer("kernel_shap", TokenModel(BagOfWords()))


def test_runner_reports_methods_that_do_not_apply_as_na(tmp_path):
    """A method raising the library's UnsupportedModelError is "n/a" for that task; the run goes on."""
    from captum_implicit.core.errors import UnsupportedModelError

    def unsupported(tm_):
        raise UnsupportedModelError("no such layers here")

    def fails_when_called(tm_):
        def explain(i, m, t):
            raise UnsupportedModelError("found out at the first call")
        return explain

    data = [{"input_ids": [2, 3, 4, NEUTRAL]}, {"input_ids": [5, 6, NEUTRAL]}]
    res = evaluate([Task("bow", BagOfWords(), dataset=data)],
                   {"random": "random", "never": unsupported, "later": fails_when_called}, tmp_path,
                   steps=2, sanity=False, progress=False)
    na = res.meta["tasks"]["bow"]["not_applicable"]
    assert set(na) == {"never", "later"} and "no such layers here" in na["never"]
    assert {r["method"] for r in res.per_example} == {"random"}
    md = (tmp_path / "results.md").read_text()
    assert "- never: n/a (unsupported family)" in md and "| random |" in md
    assert "n/a" in (tmp_path / "results.csv").read_text()


# ---------------------------------------------------------------- CI smoke of the whole benchmark


def _check_report(res, out, names):
    """Every method has finite per-example numbers on every task, or an explicit n/a line."""
    md = (out / "results.md").read_text()
    for f in ("results.md", "results.csv", "per_example.csv", "run.json"):
        assert (out / f).stat().st_size > 0, f
    for task, info in res.meta["tasks"].items():
        na = info["not_applicable"]
        assert (out / f"flip_{task}.png").stat().st_size > 0 and (out / f"mprt_{task}.png").stat().st_size > 0
        done = {r["method"] for r in res.per_example if r["task"] == task}
        assert done | set(na) == set(names) and not done & set(na), task
        rows = [r for r in res.per_example if r["task"] == task]
        assert len(rows) == info["n_examples"] * len(done)
        for r in rows:
            for key in ("dAF_logit", "dAF_acc", "aopc_morf", "pert_pos", "eraser_comp", "eraser_suff", "seconds"):
                assert math.isfinite(r[key]), (task, r["method"], key)
        # ground truth is undefined on examples without a trigger (label 0): finite over the task
        means = {(r["method"], r["metric"]): r["mean"] for r in res.summary if r["task"] == task}
        for m in done:
            assert math.isfinite(means[(m, "gt_auroc")]) and math.isfinite(means[(m, "gt_precision")]), (task, m)
            assert (m, "mprt_rho") in means and f"| {m} |" in md
        for m in na:
            assert f"- {m}: n/a (unsupported family)" in md
    return {t: set(info["not_applicable"]) for t, info in res.meta["tasks"].items()}


def test_full_method_list_smoke_on_bundled_models(tmp_path):
    """CI smoke of the benchmark: every method of ``--full`` on 3 examples of the (fast) Griffin trigger
    model — MambaAttr (S6 layers only) must say n/a there, not crash; LRP has Griffin forms and must give
    numbers — and the Mamba-specific methods on 2 examples of the Mamba trigger model."""
    pytest.importorskip("sklearn")
    from captum_implicit.cli import ALL_METHODS, zoo_task

    names = ALL_METHODS.split(",")
    methods = {m: m for m in names}
    methods["kernel_shap"] = ("kernel_shap", {"n_samples": 24})  # the smoke checks plumbing, not stability
    methods["integrated_gradients"] = ("integrated_gradients", {"n_steps": 8})
    kw = dict(steps=4, sanity_examples=2, progress=False, command="smoke")
    res = evaluate([zoo_task("griffin-trigger", 3)], methods, tmp_path / "all", **kw)
    assert _check_report(res, tmp_path / "all", names) == {"griffin-trigger": {"mamba_attr"}}
    mamba_only = ["gated_linear_lrp", "mamba_attr"]
    res = evaluate([zoo_task("mamba-trigger", 2)], {m: m for m in mamba_only}, tmp_path / "mamba", **kw)
    assert _check_report(res, tmp_path / "mamba", mamba_only) == {"mamba-trigger": set()}

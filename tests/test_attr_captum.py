"""Captum conformance: batch invariance, target forms, tensor/tuple, embeddings, NoiseTunnel, metrics,
visualisation, the LLM path, and hygiene (the model is left exactly as it was)."""

from __future__ import annotations

import pytest
import torch
from _attr_models import MambaClassifier, tiny_mamba_lm
from _hygiene import assert_unchanged, snapshot
from captum.attr import Attribution, GradientAttribution, NoiseTunnel, TextTokenInput
from captum.metrics import infidelity, sensitivity_max
from conftest import rel_err

from captum_implicit import (
    ImplicitAttention,
    ImplicitAttentionRollout,
    ImplicitAttnGrad,
    ImplicitLLMAttribution,
    InputError,
    MambaAttr,
)

METHODS = {
    "attn_grad": (ImplicitAttnGrad, {}),
    "attn_grad_gae": (ImplicitAttnGrad, {"row_normalize": False}),
    "uia": (ImplicitAttnGrad, {"method": "uia"}),
    "rollout": (ImplicitAttentionRollout, {}),
    "raw": (ImplicitAttention, {}),
    "mamba_attr": (MambaAttr, {}),
}
GRADIENT = ("attn_grad", "attn_grad_gae", "uia", "mamba_attr")
#: the methods with a streamed run (``streaming=True``: an option of ImplicitAttnGrad's chefer method)
STREAMED = ("attn_grad", "attn_grad_gae")
TOL = 1e-10  # float64 model, float64 attributions


@pytest.fixture(scope="module")
def lm():
    return tiny_mamba_lm(2)


def _padded(side: str):
    lengths = [5, 8, 6]
    ids = torch.randint(1, 40, (3, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, 8 - n :] = 1
    return ids * mask, mask, lengths


# ------------------------------------------------------------------ batches
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(METHODS))
def test_padded_batch_equals_examples_alone(lm, name, side) -> None:
    cls, kw = METHODS[name]
    ids, mask, lengths = _padded(side)
    targets = [3, 7, 11]
    method = cls(lm)
    batch = method.attribute(ids, target=targets, additional_forward_args=(mask,), **kw)
    assert batch.shape == ids.shape
    for b, n in enumerate(lengths):
        real = mask[b].bool()
        alone = method.attribute(ids[b : b + 1, real], target=targets[b], **kw)
        assert rel_err(batch[b, real], alone[0]) < TOL, (name, b)
        assert bool((batch[b, ~real] == 0).all())


@pytest.mark.parametrize("name", ["attn_grad", "uia", "mamba_attr"])
def test_target_forms(lm, name) -> None:
    cls, kw = METHODS[name]
    ids = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    method = cls(lm)
    per = torch.cat([method.attribute(ids[b : b + 1], target=t, **kw) for b, t in enumerate([4, 9, 2])])
    for target in ([4, 9, 2], torch.tensor([4, 9, 2]), [(4,), (9,), (2,)]):
        assert rel_err(method.attribute(ids, target=target, **kw), per) < TOL
    same = [method.attribute(ids, target=t, **kw) for t in (6, (6,), torch.tensor(6), torch.tensor([6]))]
    for other in same[1:]:
        assert torch.equal(same[0], other)
    with pytest.raises(Exception, match="target"):
        method.attribute(ids, **kw)  # (B, V) scores and no target: not one scalar per example


def test_query_position_is_settable(lm) -> None:
    ids = torch.randint(1, 40, (2, 7), generator=torch.Generator().manual_seed(2))
    method = ImplicitAttnGrad(lm)
    at3 = method.attribute(ids, target=1, query_position=3)
    alone = method.attribute(ids[:, :4], target=1)
    assert rel_err(at3[:, :4], alone) < TOL and bool((at3[:, 4:] == 0).all())
    per = method.attribute(ids, target=1, query_position=[3, 5])
    assert rel_err(per[1], method.attribute(ids[1:], target=1, query_position=5)[0]) < TOL


def test_sequence_classifier() -> None:
    model = MambaClassifier(classes=3)
    ids, mask, lengths = _padded("right")
    for cls in (ImplicitAttnGrad, MambaAttr, ImplicitAttentionRollout):
        method = cls(model)
        batch = method.attribute(ids, target=[0, 2, 1], additional_forward_args=mask)
        for b, n in enumerate(lengths):
            alone = method.attribute(ids[b : b + 1, :n], target=[0, 2, 1][b])
            assert rel_err(batch[b, :n], alone[0]) < TOL


# ------------------------------------------------------------- input forms
def test_tuple_in_tuple_out_and_extra_inputs(lm) -> None:
    ids, mask, _ = _padded("right")
    method = ImplicitAttnGrad(lm)
    plain = method.attribute(ids, target=3, additional_forward_args=(mask,))
    tup = method.attribute((ids,), target=3, additional_forward_args=(mask,))
    assert isinstance(tup, tuple) and len(tup) == 1 and torch.equal(tup[0], plain)
    both = method.attribute((ids, mask), target=3)  # the mask as a second input: found by name, gets zeros
    assert torch.equal(both[0], plain) and both[1].shape == mask.shape and not both[1].any()


def _embed_forward(model):
    def forward(embeds, attention_mask=None):
        return model(inputs_embeds=embeds, attention_mask=attention_mask).logits[:, -1]

    return forward


@pytest.mark.parametrize("name", list(METHODS))
def test_embeddings_in_same_shape_out(lm, name) -> None:
    cls, kw = METHODS[name]
    ids = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(4))
    embeds = lm.get_input_embeddings()(ids).detach()
    out = cls(_embed_forward(lm), model=lm).attribute(embeds, target=5, **kw)
    assert out.shape == embeds.shape and out.dtype == embeds.dtype
    assert rel_err(out.sum(-1), cls(lm).attribute(ids, target=5, **kw)) < TOL


# ----------------------------------------------------- NoiseTunnel, metrics
@pytest.mark.parametrize("name", ["attn_grad", "rollout"])
def test_noise_tunnel_is_the_mean_over_noisy_inputs(lm, name) -> None:
    cls, kw = METHODS[name]
    embeds = lm.get_input_embeddings()(torch.randint(1, 40, (2, 6))).detach()
    method = cls(_embed_forward(lm), model=lm)
    torch.manual_seed(0)
    smooth = NoiseTunnel(method).attribute(embeds, nt_type="smoothgrad", nt_samples=3, stdevs=0.05, target=5, **kw)
    torch.manual_seed(0)  # NoiseTunnel draws one normal sample of the expanded shape
    noisy = embeds.repeat_interleave(3, dim=0) + torch.normal(0, torch.full((6, *embeds.shape[1:]), 0.05))
    each = method.attribute(noisy, target=5, **kw).view(2, 3, *embeds.shape[1:])
    assert smooth.shape == embeds.shape and rel_err(smooth, each.mean(1)) < TOL


def test_infidelity_and_sensitivity(lm) -> None:
    embeds = lm.get_input_embeddings()(torch.randint(1, 40, (3, 6))).detach()
    forward = _embed_forward(lm)
    method = ImplicitAttnGrad(forward, model=lm)
    attr = method.attribute(embeds, target=5)

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.01
        return noise, inputs - noise

    infid = infidelity(forward, perturb, embeds, attr, target=5, n_perturb_samples=4)
    sens = sensitivity_max(method.attribute, embeds, target=5, n_perturb_samples=3, perturb_radius=0.01)
    assert infid.shape == (3,) and bool(torch.isfinite(infid).all())
    assert sens.shape == (3,) and bool(torch.isfinite(sens).all()) and bool((sens >= 0).all())


def test_visualize_text(lm, monkeypatch) -> None:
    from captum.attr import visualization as viz
    from captum.attr._utils import visualization as viz_impl

    if not viz_impl.HAS_IPYTHON:  # IPython is not in the test environment: stand in for its display only
        monkeypatch.setattr(viz_impl, "HAS_IPYTHON", True)
        monkeypatch.setattr(viz_impl, "HTML", lambda html: html, raising=False)
        monkeypatch.setattr(viz_impl, "display", lambda obj: None, raising=False)
    ids = torch.randint(1, 40, (1, 6))
    attr = ImplicitAttnGrad(lm).attribute(ids, target=5)[0]
    words = [f"tok{i}" for i in ids[0].tolist()]
    record = viz.VisualizationDataRecord(attr / attr.norm(), 0.5, 5, 5, 5, attr.sum(), words, 0.0)
    html = viz.visualize_text([record])
    text = html if isinstance(html, str) else html.data
    assert all(w in text for w in words)


# ------------------------------------------------------------------ LLM path
class CharTokenizer:
    """Character tokenizer with offsets (what Captum's LLM wrappers need); ids 1..26 for a..z."""

    def encode(self, text, add_special_tokens=True, return_tensors=None):  # noqa: ANN001, ANN201
        ids = [ord(ch) - 96 for ch in text]
        return torch.tensor([ids]) if return_tensors == "pt" else ids

    def decode(self, ids):  # noqa: ANN001, ANN201
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        ids = [ids] if isinstance(ids, int) else ids
        return "".join(chr(i + 96) for i in ids)

    def convert_ids_to_tokens(self, ids):  # noqa: ANN001, ANN201
        return [chr(i + 96) for i in ids] if isinstance(ids, list) else chr(ids + 96)

    def convert_tokens_to_ids(self, tokens):  # noqa: ANN001, ANN201
        return [ord(t) - 96 for t in tokens] if isinstance(tokens, list) else ord(tokens) - 96

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False, **kw):  # noqa: ANN001, ANN201
        out = {"input_ids": self.encode(text)}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out


@pytest.mark.parametrize("name", ["attn_grad", "rollout", "mamba_attr"])
def test_llm_gradient_attribution_path(lm, name) -> None:
    cls, kw = METHODS[name]
    tok = CharTokenizer()
    method = cls(lm)
    llm = ImplicitLLMAttribution(method, tok)
    if name in STREAMED:  # the streamed run too: the length the model ran on, not the prompt's
        for prompt in ("h", "hello"):
            plain, streamed = (llm.attribute(TextTokenInput(prompt, tok), target=torch.tensor([3, 4, 5]), **kw,
                                             **({"streaming": True} if s else {})) for s in (False, True))
            assert rel_err(streamed.token_attr, plain.token_attr) < TOL, prompt
    assert not method._sequence_layout  # the user's instance is untouched
    prompt, target = "hello", torch.tensor([3, 4, 5])
    res = llm.attribute(TextTokenInput(prompt, tok), target=target, **kw)
    assert res.token_attr.shape == (3, len(prompt)) and res.seq_attr.shape == (len(prompt),)
    # token i: relevance for log p(target_i | prompt, target_<i), computed directly
    log_probs = cls(lambda x: torch.log_softmax(lm(x).logits, -1), model=lm)
    prompt_ids = torch.tensor([tok.encode(prompt)])
    for i in range(3):
        seq = torch.cat([prompt_ids, target[None, :i]], dim=1)
        direct = log_probs.attribute(seq, target=int(target[i]), **kw)[0, : len(prompt)]
        assert rel_err(res.token_attr[i], direct) < TOL
    fig, ax = res.plot_token_attr(show=False)
    assert fig is not None


# -------------------------------------------------------------------- hygiene
def test_contract_flags(lm) -> None:
    for name, (cls, _) in METHODS.items():
        method = cls(lm)
        base = GradientAttribution if name in GRADIENT else Attribution
        assert isinstance(method, base)
        assert (name in GRADIENT) == isinstance(method, GradientAttribution)
        assert hasattr(cls.attribute, "__wrapped__")  # @log_usage (NoiseTunnel calls __wrapped__)
        assert method.multiplies_by_inputs is False and method.has_convergence_delta() is False
        with pytest.raises(NotImplementedError):
            method.attribute_future()


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("name", list(METHODS))
def test_bad_inputs_get_an_error_naming_them(name, streaming) -> None:
    """Inputs an explanation cannot run on are refused before the model runs, with the problem named (not the
    model's or torch's own message from deep inside the forward), and the model is left as it was."""
    cls, kw = METHODS[name]
    if streaming and name not in STREAMED:
        pytest.skip("streaming is an option of ImplicitAttnGrad's chefer method")
    kw = {**kw, "streaming": True} if streaming else kw
    model = tiny_mamba_lm(2)
    before = snapshot(model)
    ids = torch.randint(1, 40, (2, 6))
    target = 4 if name in GRADIENT else None
    cases = [
        (ids[:, :0], r"no tokens to explain: shape \(2, 0\)"),
        (ids[:0], r"no tokens to explain: shape \(0, 6\)"),
        (ids[0], r"must be \(B, L\) token ids or \(B, L, D\) embeddings, got \(6,\)"),
        (ids[:, None], r"input_ids must have shape \(batch, length\), got \(2, 1, 6\)"),
        (ids.double(), "input_ids must be integer token ids, got dtype torch.float64"),
    ]
    for bad, message in cases:
        with pytest.raises(InputError, match=message):
            cls(model).attribute(bad, target=target, **kw)
        assert_unchanged(model, before)
    # a query on padding (its row would be a padding token's) and a position that is not an integer
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding
    queries = [(-1, r"query_position \[5, 5\] falls on padding .* example\(s\) \[1\]"),
               (torch.tensor(3.7), "query_position must be integer positions")]
    for query, message in queries:
        with pytest.raises(InputError, match=message):
            cls(model).attribute(ids, target=target, additional_forward_args=(mask,), query_position=query, **kw)
        assert_unchanged(model, before)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("name", list(METHODS))
def test_model_left_exactly_as_it_was(name, frozen) -> None:
    import transformers.models.mamba.modeling_mamba as mm

    model = tiny_mamba_lm(2)
    model.train()  # a mode the attribution must restore
    if frozen:
        model.requires_grad_(False)
    else:
        model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    kernels = (mm.mamba_selective_scan, mm.causal_conv1d_fn)
    before = snapshot(model)
    cls, kw = METHODS[name]
    ids = torch.randint(1, 40, (2, 6))
    out = cls(model).attribute(ids, target=4, **kw)
    assert bool(torch.isfinite(out).all()) and out.abs().sum() > 0
    assert_unchanged(model, before)
    assert (mm.mamba_selective_scan, mm.causal_conv1d_fn) == kernels
    if name in GRADIENT:  # fails after the forward, while the capture is active
        with pytest.raises(InputError, match="target 10000 is out of range for the 40 scores"):
            cls(model).attribute(ids, target=10_000, **kw)
        assert_unchanged(model, before)

    def crash(mod, args, out):
        raise RuntimeError("boom")

    handle = model.backbone.layers[1].register_forward_hook(crash)  # fails mid-forward, layer 0 captured
    try:
        with_crash = snapshot(model)
        with pytest.raises(RuntimeError, match="boom"):
            cls(model).attribute(ids, target=4, **kw)
        assert_unchanged(model, with_crash)
    finally:
        handle.remove()
    assert_unchanged(model, before)
    assert (mm.mamba_selective_scan, mm.causal_conv1d_fn) == kernels


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("name", list(METHODS))
def test_nothing_captured_outlives_the_call(name, streaming) -> None:
    """An explanation's captured layers are freed when it returns. A gradient hook on each out-projection's input
    once held the layer's recording, which holds that tensor: a cycle through the tensor's hook table that
    Python's collector cannot break, so every call's factors stayed alive (5.8 MB a call on a 3-layer toy, GBs
    on a GPU at 4096 tokens)."""
    import gc

    from captum_implicit import LayerAttention

    cls, kw = METHODS[name]
    if streaming and name not in STREAMED:
        pytest.skip("streaming is an option of ImplicitAttnGrad's chefer method")
    model = tiny_mamba_lm(2)
    ids = torch.randint(1, 40, (2, 6))
    explainer = cls(model)

    def alive() -> int:
        gc.collect()
        return sum(isinstance(o, LayerAttention) for o in gc.get_objects())

    before = alive()
    for _ in range(2):
        explainer.attribute(ids, target=4, **kw, **({"streaming": True} if streaming else {}))
    assert alive() == before


def test_frozen_parameters_give_the_same_relevance() -> None:
    model = tiny_mamba_lm(2)
    ids = torch.randint(1, 40, (2, 6))
    live = {n: ImplicitAttnGrad(model).attribute(ids, target=4, method=m) for n, m in (("c", "chefer"), ("u", "uia"))}
    model.requires_grad_(False)
    for n, m in (("c", "chefer"), ("u", "uia")):
        # the backward graph differs (no weight branches), so agreement is at float64 rounding
        assert rel_err(ImplicitAttnGrad(model).attribute(ids, target=4, method=m), live[n]) < 1e-12


def test_inputs_grad_untouched(lm) -> None:
    embeds = lm.get_input_embeddings()(torch.randint(1, 40, (2, 6))).detach().requires_grad_(True)
    embeds.grad = torch.full_like(embeds, 3.0)
    ImplicitAttnGrad(_embed_forward(lm), model=lm).attribute(embeds, target=5)
    assert torch.equal(embeds.grad, torch.full_like(embeds, 3.0)) and embeds.requires_grad

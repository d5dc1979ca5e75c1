"""Blockwise attention × gradient equals autograd through a dense ``A`` (float64, HF Mamba), and the
published pipelines equal direct transcriptions of the published code on dense quantities."""

from __future__ import annotations

import pytest
import torch
from _attr_models import ToyMixer, tiny_mamba_lm, toy_registered
from conftest import OutputRecorder, rel_err

from captum_implicit import ImplicitAttnGrad, MambaAttr
from captum_implicit.attr.attn_grad import attn_grad_maps
from captum_implicit.attr.published import s6_row

TARGET = 5


def _inputs(padding: str | None):
    ids = torch.randint(1, 40, (3, 9), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[0, 6:] = 0
        mask[2, 8:] = 0
    elif padding == "left":
        mask[0, :3] = 0
        mask[1, :1] = 0
    ids = ids * mask  # pad id 0
    return ids, (mask if padding else None)


def _last(mask, ids):
    if mask is None:
        return torch.full((ids.shape[0],), ids.shape[1] - 1)
    return (torch.arange(ids.shape[1]) * mask).argmax(1)


def _score(model, ids, mask, q):
    out = model(ids, attention_mask=mask).logits
    return out[torch.arange(ids.shape[0]), q, TARGET].sum()


def dense_attn_grad_maps(model, layers, score_fn, absolute=False):
    """Per layer, ``mean_c (A ⊙ ∂f/∂A)⁺`` (or ``mean_c |A ⊙ ∂f/∂A|``) by autograd through a dense ``A``
    substituted into the model."""
    maps = []
    for attn in layers:
        dense = attn.dense().detach().requires_grad_(True)  # (b, C, L, L)
        offset = attn.offset.detach() if attn.offset is not None else 0.0
        y = attn.to_output_layout(dense @ attn.values.detach() + offset)

        def substitute(mod, args, y=y):
            assert rel_err(y, args[0]) < 1e-12  # the dense reconstruction is what the layer computed
            return (y,)

        handle = model.get_submodule(attn.name).out_proj.register_forward_pre_hook(substitute)
        try:
            score_fn().backward(inputs=[dense])
        finally:
            handle.remove()
        contribution = dense.detach() * dense.grad
        maps.append((contribution.abs() if absolute else contribution.clamp(min=0)).mean(1))
    return maps


def dense_rollout_row(maps, q):
    """Row q of F_n ··· F_1, F = rownorm(I + Ā), by dense matrix products."""
    eye = torch.eye(maps[0].shape[-1], dtype=maps[0].dtype)
    full = None
    for m in maps:
        f = (eye + m) / (eye + m).sum(-1, keepdim=True)
        full = f if full is None else f @ full
    return full[torch.arange(full.shape[0]), q]


@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_blockwise_attn_grad_equals_dense_autograd(padding) -> None:
    model = tiny_mamba_lm(2)
    ids, mask = _inputs(padding)
    q = _last(mask, ids)
    method = ImplicitAttnGrad(model)
    afa = (mask,) if mask is not None else ()
    run = method._run((ids,), TARGET, afa, None, grad_to="output")
    assert torch.equal(run.queries, q)
    got = list(reversed(list(attn_grad_maps(run, 0))))  # forward order
    want = dense_attn_grad_maps(model, run.layers, lambda: _score(model, ids, mask, q))
    if mask is not None:
        want = [w * mask[:, None, :].double() for w in want]
    for layer_idx, (g, w) in enumerate(zip(got, want, strict=True)):
        assert rel_err(g, w) < 1e-10, (layer_idx, rel_err(g, w))

    rel = method.attribute(ids, target=TARGET, additional_forward_args=afa)
    assert rel_err(rel, dense_rollout_row(want, q)) < 1e-10
    if mask is not None:
        assert bool((rel[mask == 0] == 0).all())


class _ToyBlock(torch.nn.Module):
    def __init__(self, channels, length):
        super().__init__()
        self.mixer = ToyMixer(channels, length, seed=3)

    def forward(self, h):
        return h + self.mixer(h)


class HybridLM(torch.nn.Module):
    """Mamba block, a block of another registered family (the toy layer), Mamba block: one rollout."""

    def __init__(self):
        super().__init__()
        lm = tiny_mamba_lm(2)
        self.embeddings, self.norm, self.head = lm.backbone.embeddings, lm.backbone.norm_f, lm.lm_head
        self.block0, self.block2 = lm.backbone.layers
        self.block1 = _ToyBlock(lm.config.hidden_size, 9)
        with torch.no_grad():
            self.block1.mixer.weight.mul_(0.2)

    def forward(self, input_ids):
        h = self.embeddings(input_ids)
        h = self.block2(self.block1(self.block0(h)))
        return self.head(self.norm(h))


def test_hybrid_layers_enter_the_rollout_uniformly() -> None:
    model = HybridLM()
    ids, _ = _inputs(None)
    q = _last(None, ids)
    with toy_registered():
        method = ImplicitAttnGrad(model)
        run = method._run((ids,), TARGET, (), None, grad_to="output")
        assert [a.family for a in run.layers] == ["mamba", "toy", "mamba"]
        got = list(reversed(list(attn_grad_maps(run, 0))))
        score = lambda: model(ids)[torch.arange(ids.shape[0]), q, TARGET].sum()  # noqa: E731
        want = dense_attn_grad_maps(model, run.layers, score)
        for g, w in zip(got, want, strict=True):
            assert rel_err(g, w) < 1e-10
        assert rel_err(method.attribute(ids, target=TARGET), dense_rollout_row(want, q)) < 1e-10
        want_abs = dense_attn_grad_maps(model, run.layers, score, absolute=True)
        got_abs = method.attribute(ids, target=TARGET, reduce="abs_mean")
        assert rel_err(got_abs, dense_rollout_row(want_abs, q)) < 1e-10
        with pytest.raises(ValueError, match="reduce"):
            method.attribute(ids, target=TARGET, reduce="median")
        # the published Mamba-Attr is defined on S6 layers only: it skips the toy layer
        assert MambaAttr(model).attribute(ids, target=TARGET, start_layer=1).shape == ids.shape
        with pytest.raises(ValueError, match="start_layer"):
            MambaAttr(model).attribute(ids, target=TARGET, start_layer=2)


def test_s6_row_reconstructs_the_scan() -> None:
    """``SiLU(z_q) · (Σ_s α[q, s] u_s + D u_q)`` is the out_proj input at ``q`` (u, y recorded independently)."""
    model = tiny_mamba_lm(1)
    ids, _ = _inputs(None)
    from captum_implicit import implicit_attention

    with OutputRecorder(model, "x_proj") as rec_u, OutputRecorder(model, "out_proj") as rec_y:
        attn = implicit_attention(model, ids)[0]
    u = rec_u.inputs["backbone.layers.0.mixer"].transpose(1, 2)  # (b, C, L): the scan input
    y = rec_y.inputs["backbone.layers.0.mixer"].transpose(1, 2)
    D = model.backbone.layers[0].mixer.D.detach()
    for q in (0, 4, 8):
        alpha = s6_row(attn, q)  # (b, C, L)
        assert bool((alpha[..., q + 1 :] == 0).all())
        scan = (alpha * u).sum(-1) + D * u[..., q]
        # HF's torch scan feeds float32 B and u into the state: agreement at float32 rounding
        assert rel_err(attn.row_scale[..., q] * scan, y[..., q]) < 1e-6


def _minmax(x, dims):
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo)


def _published_rollout(vectors, q):
    """``compute_rollout_attention`` of the published code on (B, L) vectors, row q, clamped."""
    n = vectors[0].shape[-1]
    eye = torch.eye(n, dtype=vectors[0].dtype).expand(vectors[0].shape[0], n, n)
    mats = [v[:, None, :] + eye for v in vectors]
    mats = [m / m.sum(dim=-1, keepdim=True) for m in mats]
    joint = mats[0]
    for m in mats[1:]:
        joint = m.bmm(joint)
    return joint[torch.arange(joint.shape[0]), q].clamp(min=0)


def _block_grads(model, ids):
    """∂f/∂(residual entering block l), by hooks independent of the library."""
    saved = []

    def hook(mod, args):
        h = args[0] if args[0].requires_grad else args[0].detach().requires_grad_(True)
        saved.append(h)
        return (h,)

    handles = [blk.register_forward_pre_hook(hook) for blk in model.backbone.layers]
    try:
        score = _score(model, ids, None, torch.full((ids.shape[0],), ids.shape[1] - 1))
        grads = torch.autograd.grad(score, saved)
    finally:
        for h in handles:
            h.remove()
    return grads


@pytest.mark.parametrize("method", ["uia", "mamba_attr"])
def test_published_pipelines_match_transcription(method) -> None:
    model = tiny_mamba_lm(3)
    ids, _ = _inputs(None)
    q = torch.full((ids.shape[0],), ids.shape[1] - 1)
    from captum_implicit import implicit_attention

    layers = implicit_attention(model, ids)
    grads = _block_grads(model, ids)
    vectors = []
    for attn, g in zip(layers, grads):
        s = _minmax(g.clamp(min=0).amax(-1), dims=(1,))
        if method == "uia":
            a = attn.dense()[:, :, -1, :].clamp(min=0).mean(1)
            vectors.append(_minmax(a * s, dims=(1,)))
        else:
            alpha = s6_row(attn, ids.shape[1] - 1)
            vectors.append(_minmax(alpha, dims=(1, 2)).mean(1) * s)
    for start in (0, 1):
        want = _published_rollout(vectors[start:], q)
        if method == "uia":
            got = ImplicitAttnGrad(model).attribute(ids, target=TARGET, method="uia", start_layer=start)
        else:
            got = MambaAttr(model).attribute(ids, target=TARGET, start_layer=start)
        assert rel_err(got, want) < 1e-10

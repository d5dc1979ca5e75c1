"""RWKV-4 (HF ``RwkvSelfAttention``): exact reconstruction, reductions, stability, harmlessness.

Bounds: HF's WKV computes in float64 for a float64 model (apart from the keys, which it rounds
to float32 and which we round the same way), so float64 agreement is at rounding level: ≤ 1e-10.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import captum_implicit as ci
from captum_implicit.layers.rwkv import RwkvAttention, wkv_log_normaliser
from tests.conftest import OutputRecorder, rel_err, requires_cuda

transformers = pytest.importorskip("transformers")
from transformers import RwkvConfig, RwkvForCausalLM  # noqa: E402

VOCAB = 64


@functools.lru_cache(maxsize=8)
def _base_model(hidden: int, att: int | None, layers: int, rescale_every: int) -> RwkvForCausalLM:
    cfg = RwkvConfig(
        vocab_size=VOCAB, hidden_size=hidden, attention_hidden_size=att, intermediate_size=2 * hidden,
        num_hidden_layers=layers, context_length=128, rescale_every=rescale_every,
    )
    torch.manual_seed(0)
    return RwkvForCausalLM(cfg)


def make_model(hidden: int, att: int | None = None, layers: int = 2, rescale_every: int = 1, seed: int = 0,
               dtype: torch.dtype = torch.float64) -> RwkvForCausalLM:
    """A tiny RWKV with generic (randomised) decays, bonuses and token-shift mixes."""
    model = _copy(_base_model(hidden, att, layers, rescale_every))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.rwkv.blocks:
            a = block.attention
            a.time_decay.copy_(torch.empty(a.time_decay.shape).uniform_(-3, 2, generator=g))
            a.time_first.copy_(torch.randn(a.time_first.shape, generator=g))
            for p in (a.time_mix_key, a.time_mix_value, a.time_mix_receptance):
                p.copy_(torch.rand(p.shape, generator=g))
            for lin in (a.key, a.value, a.receptance):
                lin.weight.mul_(3.0)  # keys and values of order a few units
        model.rwkv.embeddings.weight.copy_(torch.randn(model.rwkv.embeddings.weight.shape, generator=g))
    return model.to(dtype)


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def real_outputs(model: torch.nn.Module, **inputs) -> dict[str, torch.Tensor]:
    """The tensor entering each ``attention.output``, recorded independently (one plain forward)."""
    model.eval()
    with OutputRecorder(model, "output") as rec, torch.no_grad():
        model(**inputs)
    return rec.inputs


def naive_wkv(keys: torch.Tensor, decay: torch.Tensor, bonus: torch.Tensor) -> torch.Tensor:
    """Direct float64 row-softmax of e[t,s] (formulas.md §3.3), (b, C, L, L)."""
    length = keys.shape[-1]
    t = torch.arange(length, dtype=torch.float64)[:, None]
    s = torch.arange(length, dtype=torch.float64)[None, :]
    e = (t - 1 - s) * decay[None, :, None, None] + keys[:, :, None, :]
    e = torch.where(s == t, bonus[None, :, None, None] + keys[:, :, :, None], e).masked_fill(s > t, float("-inf"))
    return torch.softmax(e, dim=-1)


REDUCTIONS = ("sum", "mean", "abs_mean", "max_abs", "positive_sum")


def reduce_dense(d: torch.Tensor, reduce: str) -> torch.Tensor:
    return {
        "sum": d.sum(1), "mean": d.mean(1), "abs_mean": d.abs().mean(1), "max_abs": d.abs().amax(1),
        "positive_sum": d.clamp(min=0).sum(1),
    }[reduce]


# ------------------------------------------------------------------ exactness
@given(
    hidden=st.sampled_from([8, 16]),
    att=st.sampled_from([None, 8, 12]),
    length=st.integers(1, 64),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    cache=st.booleans(),
)
def test_output_equals_real_float64(hidden, att, length, batch, seed, cache):
    model = make_model(hidden, att, seed=seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    # HF only supports a cache when attention_hidden_size == hidden_size (the state is sized by hidden_size)
    use_cache = cache and att in (None, hidden)
    if use_cache and length == 1 and batch > 1:
        # HF's single-token cached step mis-broadcasts the shift state for batch > 1: refused, clearly
        with pytest.raises(ci.CaptureError, match="use_cache=False"):
            ci.implicit_attention(model, input_ids=ids, use_cache=use_cache)
        return
    real = real_outputs(model, input_ids=ids, use_cache=use_cache)
    with ci.blockwise(tile=16, max_block_elements=batch * 16 * 16 * 5):  # many tiles, channel blocks across groups
        layers = ci.implicit_attention(model, input_ids=ids, use_cache=use_cache)
        assert [a.name for a in layers] == list(real)
        for attn in layers:
            assert isinstance(attn, RwkvAttention) and attn.num_channels == 2 * (att or hidden)
            assert attn.offset is None
            assert rel_err(attn.output(), real[attn.name]) <= 1e-10
        # aggregate / row are the same reductions of dense
        attn = layers[-1]
        dense = attn.dense()
        assert (dense.triu(1) == 0).all()
        for reduce in REDUCTIONS:
            assert rel_err(attn.aggregate(reduce), reduce_dense(dense, reduce)) <= 1e-12
        i = length // 2
        assert rel_err(attn.row(i), dense[:, :, i]) <= 1e-12
        assert rel_err(attn.row(i, reduce="abs_sum"), dense[:, :, i].abs().sum(1)) <= 1e-12
        grad = torch.randn(attn.batch_size, attn.num_channels, length, 1, dtype=torch.float64)
        expected = (dense * (grad @ attn.values.transpose(-1, -2))).sum(1)
        assert rel_err(attn.aggregate("sum", grad=grad), expected) <= 1e-12


def test_dense_is_the_wkv_softmax_with_the_token_shift():
    """Known answer: group 0 is diag(σ(r))·softmax(e), group 1 the same shifted one column left — with r, k, the
    decay and the bonus rebuilt from the layer's weights and its recorded input (HF's token shift and mixes), not
    taken from the capture, so that a capture error in them cannot cancel."""
    model = make_model(16, 12, seed=3)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3))
    layer = model.rwkv.blocks[0].attention
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        attn = ci.implicit_attention(model, input_ids=ids, use_cache=False)[0]
    finally:
        handle.remove()
    h = seen[0]  # (b, L, hidden): ln1 of the block input
    shifted = torch.nn.functional.pad(h, (0, 0, 1, -1))  # h_{t-1}, zero before the first token

    def mixed(mix: torch.Tensor) -> torch.Tensor:
        return h * mix + shifted * (1 - mix)

    with torch.no_grad():
        # (b, C, L); HF's CPU WKV reads each key in float32 (rwkv_linear_attention_cpu), also in a float64 model
        keys = layer.key(mixed(layer.time_mix_key)).transpose(1, 2).float().double()
        gate = torch.sigmoid(layer.receptance(mixed(layer.time_mix_receptance))).transpose(1, 2)[..., None]
        decay, bonus = -torch.exp(layer.time_decay), layer.time_first
    assert rel_err(attn.keys, keys) <= 1e-13
    ref = naive_wkv(keys, decay, bonus)
    dense = attn.dense()
    assert rel_err(dense[:, :12], gate * ref) <= 1e-13
    assert rel_err(dense[:, 12:, :, :-1], gate * ref[..., 1:]) <= 1e-13
    assert (dense[:, 12:, :, -1] == 0).all()
    # each A_c is a row-softmax: its rows sum to one
    assert torch.allclose(ref.sum(-1), torch.ones((), dtype=ref.dtype), atol=1e-13, rtol=0)


def test_dropping_the_token_shift_is_not_exact():
    """The shift term matters: A_c alone on v_cur misses a sizeable part of the output."""
    model = make_model(16, seed=5)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(5))
    real = real_outputs(model, input_ids=ids, use_cache=False)
    attn = ci.implicit_attention(model, input_ids=ids, use_cache=False)[0]
    y = attn.apply()
    without_shift = attn.to_output_layout(torch.cat([y[:, :16], torch.zeros_like(y[:, 16:])], 1))
    assert rel_err(without_shift, real[attn.name]) > 1e-2
    assert rel_err(attn.output(), real[attn.name]) <= 1e-10


def test_float32_model():
    model = make_model(16, 8, seed=7, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    real = real_outputs(model, input_ids=ids, use_cache=False)
    for attn in ci.implicit_attention(model, input_ids=ids, use_cache=False):
        assert attn.dtype == torch.float32
        assert rel_err(attn.output(), real[attn.name]) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_keys_stay_finite_and_exact(dtype):
    """Keys ≫ 88: exp(k) overflows float32 (the published code returns inf/NaN); log-space does not."""
    model = make_model(16, seed=11, layers=2, dtype=dtype)
    ids = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        model.rwkv.blocks[0].attention.key.weight.mul_(80.0)
    real = real_outputs(model, input_ids=ids, use_cache=False)
    attn = ci.implicit_attention(model, input_ids=ids, use_cache=False)[0]
    assert attn.keys.abs().max() > 150  # the regime where exp(k) overflows float32 (and nearly float64's 709 × …)
    assert torch.isfinite(real[attn.name]).all()
    with ci.blockwise(tile=8):
        out, dense = attn.output(), attn.dense()
    assert torch.isfinite(out).all() and torch.isfinite(dense).all()
    assert rel_err(out, real[attn.name]) <= (1e-10 if dtype == torch.float64 else 1e-4)
    # the naive exp(k) form overflows float32 here, i.e. the stable form is needed
    assert not torch.isfinite(torch.exp(attn.keys.float())).all()


# ---------------------------------------------------------- long sequences
@pytest.mark.parametrize("decay", [-1e-4, -0.7, -60.0])
def test_log_normaliser_matches_direct_logsumexp(decay):
    g = torch.Generator().manual_seed(1)
    length = 700
    keys = torch.randn(1, 2, length, generator=g, dtype=torch.float64) * 30
    w = torch.tensor([decay, decay / 3], dtype=torch.float64)
    u = torch.tensor([0.5, -2.0], dtype=torch.float64)
    t = torch.arange(length, dtype=torch.float64)[:, None]
    s = torch.arange(length, dtype=torch.float64)[None, :]
    e = (t - 1 - s) * w[:, None, None] + keys[0, :, None, :]
    e = torch.where(s == t, u[:, None, None] + keys[0, :, :, None], e).masked_fill(s > t, float("-inf"))
    direct = torch.logsumexp(e, dim=-1)
    for chunk in (1, 7, 64, 1000):
        got = wkv_log_normaliser(keys, w, u, chunk=chunk)[0]
        assert (got - direct).abs().max() <= 1e-12 * direct.abs().max()


def test_rows_at_32k_tokens_are_finite_and_exact():
    """L = 32768: the last rows are normalised (sum to 1) and equal a direct per-row float64 softmax."""
    length = 32768
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(1, 3, length, generator=g, dtype=torch.float64) * 40
    w = torch.tensor([-1e-5, -0.3, -40.0], dtype=torch.float64)
    u = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    values = torch.randn(1, 6, length, 1, generator=g, dtype=torch.float64)
    attn = RwkvAttention(
        "synthetic", values, keys, w, u, wkv_log_normaliser(keys, w, u),
        row_scale=torch.ones(1, 6, length, dtype=torch.float64),
    )
    for t in (length - 1, length // 2 + 5):
        row = attn.row(t)  # (1, 6, L)
        assert torch.isfinite(row).all()
        s = torch.arange(t + 1, dtype=torch.float64)
        e = (t - 1 - s) * w[:, None] + keys[0, :, : t + 1]
        e[:, t] = u + keys[0, :, t]
        direct = torch.softmax(e, dim=-1)
        # float64 rounding of |e| ~ 1e2 accumulates over the L/64 sequential chunk carries: ~1e-12 here
        assert (row[0, :3, : t + 1] - direct).abs().max() <= 1e-10
        assert (row[0, 3:, :t] - direct[:, 1:]).abs().max() <= 1e-10
        assert torch.allclose(row[0, :3].sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-10, rtol=0)


# ------------------------------------------------------------ harmlessness
def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _same(model, snap):
    return all(torch.equal(p, snap[k]) for k, p in model.named_parameters())


@pytest.mark.parametrize("mode", ["train", "eval", "eval-already-rescaled"])
def test_model_left_bit_identical(mode):
    """HF rescales output weights in place on the first eval forward; the capture must undo that."""
    model = make_model(8, layers=3, rescale_every=1, seed=1)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    model.train(mode == "train")
    if mode == "eval-already-rescaled":
        with torch.no_grad():
            model(ids, use_cache=False)
        assert model.rwkv.layers_are_rescaled
    snap, flag = _snapshot(model), model.rwkv.layers_are_rescaled
    reference = _copy(model)
    layers = ci.implicit_attention(model, input_ids=ids, use_cache=False)
    assert len(layers) == 3
    assert _same(model, snap)
    assert model.rwkv.layers_are_rescaled == flag
    assert model.training == (mode == "train") and all(m.training == model.training for m in model.modules())
    # and the model still computes exactly what an untouched copy computes (a user forward may rescale it)
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, reference(ids, use_cache=False).logits)
    assert _same(model, _snapshot(reference)) and model.rwkv.layers_are_rescaled == reference.rwkv.layers_are_rescaled
    # an error inside the capture also leaves it untouched
    model.train(mode == "train")
    if mode == "eval":  # back to a never-rescaled eval model
        model.load_state_dict(snap)
        model.rwkv.layers_are_rescaled = flag
    snap, flag = _snapshot(model), model.rwkv.layers_are_rescaled
    with pytest.raises(RuntimeError, match="boom"):
        with ci.Capture(model):
            model(ids, use_cache=False)
            raise RuntimeError("boom")
    assert _same(model, snap) and model.rwkv.layers_are_rescaled == flag


def test_rescale_that_underflows_is_still_undone_bit_for_bit():
    """A weight that the eval rescale pushes into the subnormal range cannot be multiplied back exactly;
    the capture keeps a copy of such a weight instead."""
    model = make_model(8, layers=3, rescale_every=1, seed=12).eval()
    tiny = 5.123456789012345e-308  # normal in float64, subnormal (losing mantissa bits) once divided by 4
    with torch.no_grad():
        model.rwkv.blocks[2].attention.output.weight[0, 0] = tiny
    assert (torch.tensor(tiny, dtype=torch.float64) / 4 * 4).item() != tiny
    snap = _snapshot(model)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(12))
    ci.implicit_attention(model, input_ids=ids, use_cache=False)
    assert _same(model, snap) and not model.rwkv.layers_are_rescaled


def test_attention_mask_is_ignored_by_the_model():
    model = make_model(8, seed=2)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with_mask = ci.implicit_attention(model, input_ids=ids, attention_mask=mask, use_cache=False)
    without = ci.implicit_attention(model, input_ids=ids, use_cache=False)
    for a, b in zip(with_mask, without, strict=True):
        assert torch.equal(a.output(), b.output())


# ------------------------------------------------------- cache and gradients
def test_default_cache_forward_is_exact():
    """A fresh cache (eval default) gives the no-cache result; the capture accepts it."""
    model = make_model(8, seed=4)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    real = real_outputs(model, input_ids=ids)
    for attn in ci.implicit_attention(model, input_ids=ids):
        assert rel_err(attn.output(), real[attn.name]) <= 1e-10


def test_continuing_from_a_cached_state_is_refused():
    model = make_model(8, seed=4).eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        state = model(ids[:, :6], use_cache=True).state
    with pytest.raises(ci.CaptureError, match="use_cache=False"):
        ci.implicit_attention(model, input_ids=ids[:, 6:], state=state, use_cache=True)


def test_gradient_capture_needs_use_cache_false():
    model = make_model(8, seed=6)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(6))
    snap = _snapshot(model)
    with pytest.raises(ci.CaptureError, match="use_cache=False"):
        with ci.Capture(model, track_grad=True):
            model(ids)
    assert _same(model, snap)
    # without track_grad a grad-enabled forward with the cache is captured, with a warning
    with pytest.warns(UserWarning, match="use_cache=False"), ci.Capture(model) as cap:
        model(ids)
    assert len(cap.layers) == 2 and _same(model, snap)

    real = real_outputs(model, input_ids=ids, use_cache=False)  # a user eval forward: HF rescales now
    snap = _snapshot(model)
    grads = {}

    def keep_grad(i):
        def pre_hook(mod, args):
            args[0].register_hook(lambda g: grads.__setitem__(i, g.detach().clone()))

        return pre_hook

    hooks = [blk.attention.output.register_forward_pre_hook(keep_grad(i)) for i, blk in enumerate(model.rwkv.blocks)]
    try:
        with ci.Capture(model, track_grad=True) as cap:
            model(ids, use_cache=False).logits.square().sum().backward()
    finally:
        for h in hooks:
            h.remove()
    for i, attn in enumerate(cap.layers):
        assert rel_err(attn.output(), real[attn.name]) <= 1e-10
        half = attn.attention_channels
        g = attn.output_grad
        assert g.shape == attn.values.shape and torch.equal(g[:, :half], g[:, half:])
        assert torch.equal(g[:, :half, :, 0].transpose(1, 2), grads[i])  # the real gradient at the layer output
        dense = attn.dense()
        expected = (dense * (g @ attn.values.transpose(-1, -2))).sum(1)
        assert rel_err(attn.aggregate("sum", grad=g), expected) <= 1e-12
        # attention × gradient summed over sources is the output gradient's inner product with the output
        total = (attn.output() * grads[i]).sum((1, 2))
        assert rel_err(attn.aggregate("sum", grad=g).sum((1, 2)), total) <= 1e-10
    model.zero_grad(set_to_none=True)
    assert _same(model, snap)


# ------------------------------------------------------------------- GPU
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])  # H200: 3e-7, 5e-3
def test_cuda(dtype, bound):
    """On CUDA (the WKV kernel if it loads, else HF's loop on the GPU); bf16 rounds values to 8 bits."""
    model = make_model(64, layers=2, seed=9, dtype=torch.float32).to("cuda", dtype)
    ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(9)).cuda()
    real = real_outputs(model, input_ids=ids, use_cache=False)
    snap = _snapshot(model)
    layers = ci.implicit_attention(model, input_ids=ids, use_cache=False)
    assert _same(model, snap)
    for attn in layers:
        assert attn.device.type == "cuda" and attn.dtype == torch.float32
        assert rel_err(attn.output(), real[attn.name]) <= bound
        dense = attn.dense()
        assert rel_err(attn.aggregate("abs_mean"), dense.abs().mean(1)) <= 1e-5
    assert math.isfinite(float(layers[0].aggregate("sum").sum()))


def test_padding_before_a_query_is_refused_as_the_model_ignores_the_mask():
    """HF RWKV ignores attention_mask: left padding acts on the tokens after it, so zeroing its columns would
    misstate the model; the attributions refuse it by name. Padding after the query cannot act on it: explained."""
    from captum_implicit import ImplicitAttnGrad, ImplicitAttentionRollout, InputError

    model = make_model(8, seed=2)
    model.config.use_cache = False  # HF RWKV's cache is updated in place: no gradient through it
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    left = torch.ones_like(ids)
    left[1, :2] = 0
    right = torch.ones_like(ids)
    right[1, 5:] = 0
    for method, kwargs in ((ImplicitAttnGrad(model), {"target": 3}), (ImplicitAttnGrad(model), {"target": 3,
                           "streaming": True}), (ImplicitAttentionRollout(model), {})):
        with pytest.raises(InputError, match=r"'rwkv.blocks.0.attention' \(RwkvSelfAttention\) does not mask padding"
                           r".*example\(s\) \[1\] have padding before the query"):
            method.attribute(ids, additional_forward_args=(left,), **kwargs)
        padded = method.attribute(ids, additional_forward_args=(right,), **kwargs)  # queries at the last real token
        alone = method.attribute(ids[1:, :5], **kwargs)
        assert rel_err(padded[1, :5], alone[0]) <= 1e-10 and not padded[1, 5:].any()

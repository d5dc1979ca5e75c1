"""Griffin / RecurrentGemma RG-LRU (HF ``RecurrentGemmaRecurrentBlock``): exactness, reductions, resets, state.

Bounds. HF's ``_rnn_scan`` accumulates the state in float32 whatever the model dtype (it casts
``a`` and the input to float32 and rounds the state at every step), so a float64 model agrees
with our float64 closed form to float32 accumulation error: ≤ 4·L·2⁻²⁴ relative (a few roundings
per step, damped by |a| < 1). With the scan's accumulator switched to float64 (test-only patch)
the model computes in float64 throughout, and the agreement is ≤ 1e-10.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import captum_implicit as ci
from captum_implicit.layers.rglru import RglruAttention
from tests.conftest import OutputRecorder, rel_err, requires_cuda

pytest.importorskip("transformers")
from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM  # noqa: E402
from transformers.models.recurrent_gemma import modeling_recurrent_gemma as hf_rg  # noqa: E402

VOCAB = 64


@functools.lru_cache(maxsize=8)

def _base_model(hidden: int, width: int, heads: int, layers: int) -> RecurrentGemmaForCausalLM:
    cfg = RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=hidden, lru_width=width, num_attention_heads=heads,
        intermediate_size=2 * hidden, num_hidden_layers=layers, attention_window_size=8,
        block_types=["recurrent", "recurrent", "attention"],
    )
    torch.manual_seed(0)
    return RecurrentGemmaForCausalLM(cfg)


def make_model(hidden: int = 16, width: int = 16, heads: int = 2, layers: int = 3, seed: int = 0,
               dtype: torch.dtype = torch.float64) -> RecurrentGemmaForCausalLM:
    """A tiny RecurrentGemma with generic gates and non-zero biases (the conv bias starts at 0)."""
    model = copy.deepcopy(_base_model(hidden, width, heads, layers))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, hf_rg.RecurrentGemmaRecurrentBlock):
                for lin in (mod.linear_x, mod.linear_y, mod.linear_out):
                    lin.bias.copy_(0.3 * torch.randn(lin.bias.shape, generator=g))
                mod.conv_1d.bias.copy_(torch.randn(mod.conv_1d.bias.shape, generator=g))
                mod.conv_1d.weight.copy_(0.5 * torch.randn(mod.conv_1d.weight.shape, generator=g))
                lru = mod.rg_lru
                for p in (lru.input_gate_bias, lru.recurrent_gate_bias):
                    p.copy_(torch.randn(p.shape, generator=g))
                for p in (lru.input_gate_weight, lru.recurrent_gate_weight):
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
                # a in roughly [0.3, 0.999]: short and long memories
                lru.recurrent_param.copy_(torch.empty(lru.recurrent_param.shape).uniform_(-9, 0.5, generator=g))
    return model.to(dtype)


def real_outputs(model: torch.nn.Module, **inputs) -> dict[str, torch.Tensor]:
    """The tensor entering each recurrent block's ``linear_out``, recorded independently."""
    model.eval()
    with OutputRecorder(model, "linear_out") as rec, torch.no_grad():
        model(**inputs)
    return rec.inputs


def positions(batch: int, length: int, starts: list[list[int]]) -> torch.Tensor:
    """position_ids restarting at 0 at every listed start (and at 0)."""
    pos = torch.empty(batch, length, dtype=torch.long)
    for b in range(batch):
        cuts = sorted({0, *[s for s in starts[b] if 0 < s < length]})
        for i, c in enumerate(cuts):
            end = cuts[i + 1] if i + 1 < len(cuts) else length
            pos[b, c:end] = torch.arange(end - c)
    return pos


def float64_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make HF's scan accumulate in float64 (it hard-codes float32), so a float64 model is float64 throughout."""
    original = hf_rg.RecurrentGemmaRglru._rnn_scan

    def scan(self, *args, **kwargs):
        kwargs["acc_dtype"] = torch.float64
        return original(self, *args, **kwargs)

    monkeypatch.setattr(hf_rg.RecurrentGemmaRglru, "_rnn_scan", scan)


REDUCTIONS = ("sum", "mean", "abs_mean", "max_abs", "positive_mean")


def reduce_dense(d: torch.Tensor, reduce: str) -> torch.Tensor:
    return {
        "sum": d.sum(1), "mean": d.mean(1), "abs_mean": d.abs().mean(1), "max_abs": d.abs().amax(1),
        "positive_mean": d.clamp(min=0).mean(1),
    }[reduce]


config_strategy = st.sampled_from([(8, 8, 1), (16, 16, 2), (16, 12, 4), (8, 24, 3), (24, 16, 4)])


@st.composite
def case(draw):
    hidden, width, heads = draw(config_strategy)
    length = draw(st.integers(1, 64))
    batch = draw(st.integers(1, 3))
    starts = [draw(st.lists(st.integers(1, max(1, length - 1)), max_size=3)) for _ in range(batch)]
    # the HF decode path (L = 1 with a cache) sizes its conv state by hidden_size: only when widths agree
    cache = draw(st.booleans()) and (length > 1 or width == hidden)
    return hidden, width, heads, length, batch, starts, cache, draw(st.integers(0, 2**16))


# ------------------------------------------------------------------ exactness
@given(case())
def test_output_equals_real_float64(c):
    hidden, width, heads, length, batch, starts, cache, seed = c
    model = make_model(hidden, width, heads, seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    pos = positions(batch, length, starts)
    real = real_outputs(model, input_ids=ids, position_ids=pos, use_cache=cache)
    with ci.blockwise(tile=16, max_block_elements=batch * 16 * 16 * 5):
        layers = _rglru_only(ci.implicit_attention(model, input_ids=ids, position_ids=pos, use_cache=cache))
        assert [a.name for a in layers] == list(real) and len(layers) == 2
        for attn in layers:
            assert isinstance(attn, RglruAttention) and attn.num_channels == width
            # HF accumulates in float32 (module doc): a few roundings per step
            assert rel_err(attn.output(), real[attn.name]) <= 4 * length * 2.0**-24
        attn = layers[0]
        dense = attn.dense()
        assert (dense.triu(1) == 0).all()
        for reduce in REDUCTIONS:
            assert rel_err(attn.aggregate(reduce), reduce_dense(dense, reduce)) <= 1e-12
        i = length - 1
        assert rel_err(attn.row(i), dense[:, :, i]) <= 1e-12
        assert rel_err(attn.row(i, reduce="mean"), dense[:, :, i].mean(1)) <= 1e-12
        grad = torch.randn(attn.batch_size, width, length, 1, dtype=torch.float64, generator=g)
        expected = (dense * (grad @ attn.values.transpose(-1, -2))).sum(1)
        assert rel_err(attn.aggregate("sum", grad=grad), expected) <= 1e-12
        # y = A x + offset, with the conv bias as the offset
        assert rel_err(attn.to_output_layout(dense @ attn.values + attn.offset), attn.output()) <= 1e-12


@pytest.mark.parametrize("cache", [False, True])
def test_exact_in_float64_with_a_float64_scan(monkeypatch, cache):
    float64_scan(monkeypatch)
    model = make_model(16, 12, 4, seed=3)
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(3))
    pos = positions(2, 37, [[9, 30], [1]])
    real = real_outputs(model, input_ids=ids, position_ids=pos, use_cache=cache)
    for attn in _rglru_only(ci.implicit_attention(model, input_ids=ids, position_ids=pos, use_cache=cache)):
        assert rel_err(attn.output(), real[attn.name]) <= 1e-10


def test_conv_bias_is_needed(monkeypatch):
    """The published code drops the conv bias; it is the offset and changes the output by O(1)."""
    float64_scan(monkeypatch)
    model = make_model(16, 16, 2, seed=4)
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(4))
    real = real_outputs(model, input_ids=ids)
    attn = ci.implicit_attention(model, input_ids=ids)[0]
    assert rel_err(attn.output(), real[attn.name]) <= 1e-10
    no_bias = attn.to_output_layout(attn.apply())
    assert rel_err(no_bias, real[attn.name]) > 1e-2


def test_resets_cut_the_map_up_to_the_conv_width():
    """Known answer: after a reset at p the recurrence forgets everything before p; only the conv
    (which ignores resets, as in the model) still reaches K−1 tokens back."""
    model = make_model(16, 16, 2, seed=5)
    length, p = 30, 13
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(5))
    pos = positions(1, length, [[p]])
    attn = ci.implicit_attention(model, input_ids=ids, position_ids=pos)[0]
    taps = attn.conv_weight.shape[-1]
    dense = attn.dense()
    assert (dense[:, :, p:, : p - taps + 1] == 0).all()
    assert (dense[:, :, p:, p - taps + 1 : p].abs() > 0).any()
    assert (dense[:, :, p - 1, : p - taps + 1].abs() > 0).any()  # before the reset: full history


def test_float32_model():
    model = make_model(16, 16, 2, seed=6, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 50), generator=torch.Generator().manual_seed(6))
    real = real_outputs(model, input_ids=ids, use_cache=False)
    for attn in _rglru_only(ci.implicit_attention(model, input_ids=ids, use_cache=False)):
        assert attn.dtype == torch.float32
        assert rel_err(attn.output(), real[attn.name]) <= 1e-4


def test_long_sequence_rows_are_exact():
    """L = 8192, long memory (|log a| ~ 1e-4) and resets: a row equals a direct float64 product of decays."""
    length, width = 8192, 3
    g = torch.Generator().manual_seed(7)
    log_a = -torch.rand(1, length, width, generator=g, dtype=torch.float64) * torch.tensor([1e-4, 1e-2, 1.0])
    reset = torch.zeros(1, length, dtype=torch.bool)
    reset[0, [0, 5000]] = True
    from captum_implicit.layers.rglru import build_rglru_attention

    x = torch.randn(1, length, width, generator=g, dtype=torch.float64)
    scale = torch.rand(1, length, width, generator=g, dtype=torch.float64)
    attn = build_rglru_attention(
        "synthetic", values=x, conv_output=x, scan_input=x * scale, input_scale=scale, decay=log_a.exp(),
        log_decay=log_a, reset=reset, gate=torch.ones_like(x), conv_weight=torch.ones(width, 1, dtype=torch.float64),
        conv_bias=None,
    )
    for t in (4999, length - 1):
        start = 0 if t < 5000 else 5000
        tail = torch.flip(torch.cumsum(torch.flip(log_a[0, start + 1 : t + 1], [0]), 0), [0])  # Σ_{r=s+1..t}
        expected = torch.zeros(width, length, dtype=torch.float64)
        expected[:, start:t] = (tail.exp() * scale[0, start:t]).T
        expected[:, t] = scale[0, t]
        assert rel_err(attn.row(t)[0], expected) <= 1e-10


# ------------------------------------------------------------- state, cache
def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _same(model, snap):
    return all(torch.equal(p, snap[k]) for k, p in model.named_parameters())


def _states(model):
    blocks = [m for m in model.modules() if isinstance(m, hf_rg.RecurrentGemmaRecurrentBlock)]
    return [(b.conv1d_state, b.rg_lru.recurrent_states) for b in blocks]


@pytest.mark.parametrize("train", [False, True])
def test_model_and_module_state_left_as_they_were(train):
    model = make_model(8, 8, 1, seed=8)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(8))
    model.eval()
    with torch.no_grad():
        model(ids, use_cache=True)  # the modules now hold a state from an earlier forward
    model.train(train)
    before = _states(model)
    assert all(c is not None and r is not None for c, r in before)
    kept = [(c.clone(), r.clone()) for c, r in before]
    snap = _snapshot(model)
    for cache in (True, False):
        layers = _rglru_only(ci.implicit_attention(model, input_ids=ids, use_cache=cache))
        assert len(layers) == 2
        after = _states(model)
        assert all(c1 is c0 and r1 is r0 for (c0, r0), (c1, r1) in zip(before, after, strict=True))
        assert all(torch.equal(c, kc) and torch.equal(r, kr) for (c, r), (kc, kr) in zip(after, kept, strict=True))
        assert _same(model, snap)
        assert all(m.training == train for m in model.modules())


def test_continuing_from_a_cached_state_is_refused():
    model = make_model(8, 8, 1, seed=9, layers=3).eval()
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        model(ids, use_cache=True)  # prefill: the modules keep the final state
    from transformers import DynamicCache

    step = ids[:, -1:]
    with pytest.raises(ci.CaptureError, match="use_cache=False"):
        ci.implicit_attention(
            model, input_ids=step, position_ids=torch.tensor([[8]]), use_cache=True,
            cache=DynamicCache(config=model.config),
        )


def test_single_token_with_a_fresh_cache():
    """L = 1 with use_cache=True runs HF's decode path (hand-written conv from a zero state)."""
    model = make_model(8, 8, 1, seed=10)
    ids = torch.randint(0, VOCAB, (1, 1), generator=torch.Generator().manual_seed(10))
    real = real_outputs(model, input_ids=ids, use_cache=True)
    layers = _rglru_only(ci.implicit_attention(model, input_ids=ids, use_cache=True))
    for attn in layers:
        assert rel_err(attn.output(), real[attn.name]) <= 4 * 2.0**-24


def test_gradient_capture():
    model = make_model(16, 12, 2, seed=11)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(11))
    grads = {}

    def keep_grad(name):
        def pre_hook(mod, args):
            args[0].register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))

        return pre_hook

    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, hf_rg.RecurrentGemmaRecurrentBlock)]
    hooks = [m.linear_out.register_forward_pre_hook(keep_grad(n)) for n, m in blocks]
    try:
        with ci.Capture(model, track_grad=True) as cap:
            model(ids).logits.square().sum().backward()
    finally:
        for h in hooks:
            h.remove()
    for attn in _rglru_only(cap.layers):
        g = attn.output_grad
        assert torch.equal(attn.to_output_layout(g), grads[attn.name])
        total = (attn.output() * grads[attn.name]).sum((1, 2))
        offset_part = (attn.to_output_layout(attn.offset) * grads[attn.name]).sum((1, 2))
        # attention × gradient over all (t, s) recovers ⟨grad, y − offset⟩
        assert rel_err(attn.aggregate("sum", grad=g).sum((1, 2)), total - offset_part) <= 1e-10


# ------------------------------------------------------------------- GPU
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])  # H200: 5e-7, 4e-3
def test_cuda(dtype, bound):
    """bf16: the model rounds the conv output, the state readout and h·y to 8 bits (we mirror a and the
    input factor, not those roundings)."""
    model = make_model(64, 64, 4, seed=12, dtype=torch.float32).to("cuda", dtype)
    ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(12)).cuda()
    pos = positions(2, 100, [[40], []]).cuda()
    real = real_outputs(model, input_ids=ids, position_ids=pos, use_cache=False)
    snap = _snapshot(model)
    layers = _rglru_only(ci.implicit_attention(model, input_ids=ids, position_ids=pos, use_cache=False))
    assert _same(model, snap) and len(layers) == 2
    for attn in layers:
        assert attn.device.type == "cuda" and attn.dtype == torch.float32
        assert rel_err(attn.output(), real[attn.name]) <= bound
        dense = attn.dense()
        assert rel_err(attn.aggregate("abs_mean"), dense.abs().mean(1)) <= 1e-5


def _rglru_only(layers):
    """RecurrentGemma's local-attention blocks are captured too (family "softmax"); these tests check the RG-LRU."""
    return [a for a in layers if a.family == "rglru"]

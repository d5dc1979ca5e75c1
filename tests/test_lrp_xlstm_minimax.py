"""LRP (captum_implicit.lrp) on HF xLSTM (mLSTM blocks, soft-capped float32 logits) and HF MiniMax (lightning
attention + softmax attention + MoE hybrid). Tiny random float64 models.

xLSTM returns float32 logits (HF's ``.float()``) soft-capped by ``c·tanh(z/c)``; its relevance is checked against
that capped float32 logit (exact in float64 arithmetic: the cast and cap are one identity-rule map). xLSTM takes
no attention mask, so its conservation runs without padding.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("zennit")
transformers = pytest.importorskip("transformers")
from transformers import xLSTMConfig, xLSTMForCausalLM  # noqa: E402

from captum_implicit.lrp.canonizers import find_lrp_form  # noqa: E402
from captum_implicit.lrp.xlstm import mlstm_parallel  # noqa: E402

from test_lrp_families import VOCAB, _spread  # noqa: E402
from _lrp_checks import CONSERVE, check_ablation, check_bias_absorption  # noqa: E402
from _lrp_checks import check_cached_continuation_refused, check_canonized_logits_identical  # noqa: E402
from _lrp_checks import check_conservation, check_conservation_float32, check_restored_and_captum_class  # noqa: E402
from _lrp_checks import draw_target_and_mask, left_padded, rel_conservation, relevance  # noqa: E402

EXAMPLES = min(settings().max_examples, 6)


def logit_relevance(model, ids, target, composite=None, mask=None, with_biases=False):
    """``_lrp_checks.relevance`` with the logit the model returns as the target (soft-capped, float32 for xLSTM; as
    float64), not the LM head's output."""
    return relevance(model, ids, target, composite, mask=mask, with_biases=with_biases, model_logit=True)


# ============================================================================= xLSTM
def tiny_xlstm(seed=0, hidden=8, heads=2, layers=2, chunk=4, weight_mode="single", use_bias=False, zero_biases=True,
               cap=3.0, dtype=torch.float64, **_):
    torch.manual_seed(seed)
    cfg = xLSTMConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_heads=heads,
                      chunk_size=chunk, ffn_round_up_to_multiple_of=4, weight_mode=weight_mode, use_bias=use_bias,
                      output_logit_soft_cap=cap, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    if weight_mode == "fused":  # HF's _init_weights fails on fused gates (shape bug); every weight is set below
        from transformers.initialization import no_init_weights

        with no_init_weights():
            model = xLSTMForCausalLM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.5)
    else:
        model = xLSTMForCausalLM(cfg)
    model = model.to(dtype).eval()
    _spread(model, zero_biases)
    with torch.no_grad():  # spread norms and gates so that no branch is negligible (the gate biases are not additive
        for name, p in model.named_parameters():  # biases of the value path: they only set the held gates)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.normal_(1, 0.3)
            elif "gate_preact" in name and name.endswith("bias") or "ifgate" in name and name.endswith("bias"):
                p.normal_(0, 1.0)
    return model


def test_every_xlstm_class_has_a_form():
    expected = {"xLSTMLayer", "xLSTMMultiHeadLayerNorm", "xLSTMRMSNorm", "xLSTMFeedForward", "xLSTMForCausalLM"}
    for mode in ("single", "fused"):
        found = {type(m).__name__ for m in tiny_xlstm(weight_mode=mode).modules() if find_lrp_form(m) is not None}
        assert found >= expected, found


@pytest.mark.parametrize("mode", ["single", "fused"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_xlstm_canonized_logits_identical(dtype, mode):
    # hidden 128: HF's xLSTMCache sizes its states by dims rounded up to 64 (a smaller model cannot use_cache)
    model = tiny_xlstm(seed=1, dtype=dtype, hidden=128, weight_mode=mode, zero_biases=False, use_bias=True)
    ids = torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))  # 2 chunks of 4 + 3 steps
    out_cache, ref_cache = check_canonized_logits_identical(model, ids)  # a fresh (zero) cache, as HF fills it
    assert out_cache.cache.rnn_state  # the states compared below exist
    for a, b in zip(out_cache.cache.rnn_state.values(), ref_cache.cache.rnn_state.values(), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_mlstm_parallel_matches_hf_kernels():
    """The float64 relevance path of the mLSTM is HF's recurrence (and chunkwise kernel) in another dtype."""
    from transformers.models.xlstm import modeling_xlstm as hf

    g = torch.Generator().manual_seed(0)
    b, h, L, d = 2, 2, 12, 4
    q, k, v = (torch.randn(b, h, L, d, generator=g) for _ in range(3))
    i, f = torch.randn(b, h, L, generator=g) * 3, torch.randn(b, h, L, generator=g) * 3
    rec = hf.mlstm_recurrent_sequence_native(q, k, v, i, f, eps=1e-6)
    chunk, _ = hf.mlstm_chunkwise_native_autograd(q, k, v, i, f, chunk_size=4, return_last_states=True, eps=1e-6)
    ours = mlstm_parallel(q.double(), k.double(), v.double(), i.double(), f.double(), 1e-6, torch.float64)
    assert torch.allclose(ours.float(), rec, rtol=0, atol=2e-5)
    assert torch.allclose(ours.float(), chunk, rtol=0, atol=2e-5)
    # linear in v with q, k and the gates fixed: f(2v + w) = 2 f(v) + f(w)
    w = torch.randn(b, h, L, d, generator=g).double()
    args = (i.double(), f.double(), 1e-6, torch.float64)
    lhs = mlstm_parallel(q.double(), k.double(), 2 * v.double() + w, *args)
    assert torch.allclose(lhs, 2 * ours + mlstm_parallel(q.double(), k.double(), w, *args), rtol=0, atol=1e-12)


XLSTM_CONFIG = st.fixed_dictionaries({
    "seed": st.integers(0, 2**16), "heads": st.sampled_from([1, 2]), "hidden": st.sampled_from([8, 12]),
    "layers": st.integers(1, 3), "chunk": st.sampled_from([2, 4, 64]),
    "weight_mode": st.sampled_from(["single", "fused"]),
    "cap": st.sampled_from([3.0, 30.0]),  # HF types it as float (None refused)
})


@settings(max_examples=EXAMPLES, deadline=None)
@given(length=st.integers(1, 12), batch=st.integers(1, 2), data=st.data())
def test_xlstm_conservation_exact(length, batch, data):
    cfg = data.draw(XLSTM_CONFIG)
    model = tiny_xlstm(**cfg)
    ids = torch.randint(1, VOCAB, (batch, length))
    target, _ = draw_target_and_mask(data, batch, length, VOCAB, padded=False)
    check_conservation(model, ids, target, relevance_fn=logit_relevance)


def test_xlstm_bias_absorption_accounts_for_the_difference():
    """With use_bias (q/k/v/o projections, norms, FFN): Σ R + Σ b ⊙ grad_b = f (the gate biases only set held gates
    and absorb nothing)."""
    model = tiny_xlstm(seed=3, zero_biases=False, use_bias=True)
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    check_bias_absorption(model, ids, torch.tensor([3]), logit_relevance)


def test_xlstm_conservation_float32():
    model = tiny_xlstm(seed=3, dtype=torch.float32)
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    check_conservation_float32(model, ids, torch.tensor([1, 2]), logit_relevance)


XLSTM_ABLATIONS = {
    # rule switched off -> conservation error must exceed this (each rule matters on this model)
    **{r: 1e-3 for r in ("identity_act", "detach_ssm", "half_gate", "detach_norm")},
    "exact_casts": CONSERVE,  # float32 mLSTM states and norm reductions: ~1e-7 remains
}


@pytest.mark.parametrize("rule", sorted(XLSTM_ABLATIONS))
def test_xlstm_ablation_breaks_conservation(rule):
    model = tiny_xlstm(seed=0)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    check_ablation(model, ids, torch.tensor([3, 7]), rule, XLSTM_ABLATIONS[rule], logit_relevance)


def test_xlstm_model_restored_and_captum_class():
    model = tiny_xlstm(seed=4, zero_biases=False, use_bias=True)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    check_restored_and_captum_class(model, ids, [2, 9], logit_relevance)


def test_xlstm_cached_continuation_refused():
    model = tiny_xlstm(seed=2, hidden=128)  # HF's cache needs dims that are multiples of 64
    ids = torch.randint(1, VOCAB, (1, 6))
    check_cached_continuation_refused(model, ids, "xLSTMLayer: this call continues from a cached state")


def test_xlstm_across_hf_chunks():
    """L = 70 with HF's chunk 64: the chunkwise kernel then the recurrent remainder; the relevance still conserves."""
    model = tiny_xlstm(seed=9, chunk=64)
    ids = torch.randint(1, VOCAB, (1, 70), generator=torch.Generator().manual_seed(9))
    R, f, _ = logit_relevance(model, ids, torch.tensor([4]))
    assert rel_conservation(R, f) <= CONSERVE


# ============================================================================= MiniMax
from transformers import MiniMaxConfig, MiniMaxForCausalLM  # noqa: E402

from captum_implicit.lrp.minimax import lightning_blocks  # noqa: E402


def tiny_minimax(seed=0, hidden=8, heads=2, kv_heads=1, head_dim=4, block=4, experts=3, top_k=2,
                 layers=("linear_attention", "full_attention"), factors=(0.7, 1.3, 1.1, 0.9, 1.2, 0.8),
                 dtype=torch.float64, **_):
    torch.manual_seed(seed)
    la, lb, fa, fb, ma, mb = factors  # residual scalings α (residual) and β (branch): constants, tested non-unit
    cfg = MiniMaxConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=6, num_hidden_layers=len(layers),
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                        num_local_experts=experts, num_experts_per_tok=top_k, block_size=block,
                        layer_types=list(layers), linear_attn_alpha_factor=la, linear_attn_beta_factor=lb,
                        full_attn_alpha_factor=fa, full_attn_beta_factor=fb, mlp_alpha_factor=ma, mlp_beta_factor=mb,
                        tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    cfg._experts_implementation = "eager"  # grouped_mm refuses float64 on CPU
    model = MiniMaxForCausalLM(cfg).to(dtype).eval()
    _spread(model, True)
    with torch.no_grad():  # spread every weight and norm so that no branch is negligible
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(1, 0.3)
            elif p.dim() >= 2:
                p.normal_(0, 0.5)
    return model


def test_every_minimax_class_has_a_form():
    expected = {"MiniMaxLightningAttention", "MiniMaxAttention", "MiniMaxExperts", "MiniMaxSparseMoeBlock",
                "MiniMaxRMSNorm"}
    found = {type(m).__name__ for m in tiny_minimax().modules() if find_lrp_form(m) is not None}
    assert found >= expected, found


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_minimax_canonized_logits_identical(dtype):
    model = tiny_minimax(seed=1, dtype=dtype)
    ids = torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))  # 2 blocks of 4 + 3
    out_cache, ref_cache = check_canonized_logits_identical(model, ids, left_padded(2, 11, 3, row=1))
    assert torch.equal(out_cache.past_key_values.linear_cache[0], ref_cache.past_key_values.linear_cache[0])


def test_lightning_blocks_match_a_dense_decay_attention():
    """HF's block loop (run by the form) is o_t = Σ_{s≤t} (q_t·k_s) e^{−λ_h (t−s)} v_s: known answer, linear in
    v."""
    model = tiny_minimax(seed=0, block=4)
    layer = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    b, h, L, d = 2, 2, 11, 4
    q, k, v = (torch.randn(b, h, L, d, generator=g, dtype=torch.float64) for _ in range(3))
    out, _ = lightning_blocks(layer, q, k, v)
    t = torch.arange(L, dtype=torch.float64)
    lag = t[:, None] - t[None, :]
    decay = torch.where(lag >= 0, torch.exp(-layer.slope_rate * lag.clamp_min(0)), torch.zeros(()))  # (h, L, L)
    dense = ((q @ k.transpose(-1, -2)) * decay) @ v
    # HF computes the decay buffers in float32 at __init__ (.to(float64) only widens them): ~1e-7 relative
    assert float((out - dense).abs().max() / dense.abs().max()) < 1e-6
    with torch.no_grad():  # the same buffers recomputed in float64: the block loop is the dense formula exactly
        buffers = {n: getattr(layer, n).clone() for n in ("query_decay", "key_decay", "diagonal_decay")}
        for n, b64 in zip(buffers, layer.decay_factors(layer.slope_rate)):
            getattr(layer, n).copy_(b64)
        exact, _ = lightning_blocks(layer, q, k, v)
        for n, buf in buffers.items():
            getattr(layer, n).copy_(buf)
    assert torch.allclose(exact, dense, rtol=0, atol=1e-12)
    w = torch.randn(b, h, L, d, generator=g, dtype=torch.float64)
    assert torch.allclose(lightning_blocks(layer, q, k, 2 * v + w)[0], 2 * out + lightning_blocks(layer, q, k, w)[0],
                          rtol=0, atol=1e-12)


MINIMAX_CONFIG = st.fixed_dictionaries({
    "seed": st.integers(0, 2**16), "heads": st.sampled_from([1, 2]), "head_dim": st.sampled_from([2, 4]),
    "block": st.sampled_from([2, 4, 16]), "top_k": st.sampled_from([1, 2]),
    "layers": st.sampled_from([("linear_attention",), ("linear_attention", "full_attention"),
                               ("full_attention", "linear_attention", "linear_attention")]),
})


@settings(max_examples=EXAMPLES, deadline=None)
@given(length=st.integers(1, 12), batch=st.integers(1, 2), padded=st.booleans(), data=st.data())
def test_minimax_conservation_exact(length, batch, padded, data):
    cfg = data.draw(MINIMAX_CONFIG)
    model = tiny_minimax(**cfg, kv_heads=1)
    ids = torch.randint(1, VOCAB, (batch, length))
    target, mask = draw_target_and_mask(data, batch, length, VOCAB, padded)
    # lightning zeroes padded qkv, softmax masks padded keys: padded positions carry nothing
    check_conservation(model, ids, target, mask, logit_relevance)


def test_minimax_has_no_bias_to_absorb():
    """MiniMax's projections, router and experts are bias-free (HF hard-codes bias=False): Σ R = f is the whole
    statement, also at HF's own initialisation (no spread weights, unit residual scalings)."""
    torch.manual_seed(5)
    cfg = MiniMaxConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=6, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_local_experts=3,
                        num_experts_per_tok=2, block_size=4, layer_types=["linear_attention", "full_attention"],
                        tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    cfg._experts_implementation = "eager"
    model = MiniMaxForCausalLM(cfg).double().eval()
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    R, f, absorbed = logit_relevance(model, ids, torch.tensor([1, 2]), with_biases=True)
    assert absorbed == 0 and rel_conservation(R, f) <= CONSERVE


def test_minimax_conservation_float32():
    model = tiny_minimax(seed=3, dtype=torch.float32)
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    check_conservation_float32(model, ids, torch.tensor([1, 2]), logit_relevance)


MINIMAX_ABLATIONS = {
    # rule switched off -> conservation error must exceed this (each rule matters on this model)
    **{r: 1e-3 for r in ("identity_act", "detach_ssm", "half_gate", "detach_norm", "detach_softmax",
                         "detach_routing")},
    "exact_casts": CONSERVE,  # float32 RMSNorms (and the float32 router weights, held): ~1e-7 remains
}


@pytest.mark.parametrize("rule", sorted(MINIMAX_ABLATIONS))
def test_minimax_ablation_breaks_conservation(rule):
    model = tiny_minimax(seed=0)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    check_ablation(model, ids, torch.tensor([3, 7]), rule, MINIMAX_ABLATIONS[rule], logit_relevance)


def test_minimax_model_restored_and_captum_class():
    model = tiny_minimax(seed=4)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    check_restored_and_captum_class(model, ids, [2, 9], logit_relevance)


@pytest.mark.parametrize("layers,first", [(("linear_attention", "full_attention"), "MiniMaxLightningAttention"),
                                          (("full_attention", "linear_attention"), "MiniMaxAttention")])
def test_minimax_cached_continuation_refused(layers, first):
    model = tiny_minimax(seed=2, layers=layers)
    ids = torch.randint(1, VOCAB, (1, 6))
    check_cached_continuation_refused(model, ids, f"{first} layer 0: this call continues from a cached state",
                                      lambda m, i: {"cache": m(i, use_cache=True).past_key_values})


def test_minimax_across_lightning_blocks():
    """L = 70 with block 16: five lightning blocks (the inter-block KV state carried four times); still conserves."""
    model = tiny_minimax(seed=9, block=16, layers=("linear_attention", "full_attention", "linear_attention"))
    ids = torch.randint(1, VOCAB, (1, 70), generator=torch.Generator().manual_seed(9))
    R, f, _ = logit_relevance(model, ids, torch.tensor([4]))
    assert rel_conservation(R, f) <= CONSERVE

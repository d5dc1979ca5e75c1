"""LRP (captum_implicit.lrp) on hybrids: Qwen3-Next (Gated DeltaNet + gated softmax attention, dense or MoE), Jamba
(Mamba + softmax attention + MoE) and LFM2 (gated short convs + softmax attention). Tiny random float64 models; all
return float64 logits.

HF's default MoE experts implementation (``grouped_mm``) refuses float64 on CPU, so the MoE models use HF's
``eager`` experts (the loop the LRP form mirrors).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("zennit")
transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    JambaConfig,
    JambaForCausalLM,
    Lfm2Config,
    Lfm2ForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

from captum_implicit.lrp import GatedLinearComposite  # noqa: E402
from captum_implicit.lrp.canonizers import find_lrp_form  # noqa: E402
from captum_implicit.lrp.qwen3_next import gated_delta_rule_recurrent  # noqa: E402

from conftest import requires_cuda  # noqa: E402
from test_lrp_families import VOCAB, _spread  # noqa: E402
from _lrp_checks import CONSERVE, check_ablation, check_bias_absorption  # noqa: E402
from _lrp_checks import check_cached_continuation_refused, check_canonized_logits_identical  # noqa: E402
from _lrp_checks import check_conservation, check_conservation_float32, check_gpu_canonized_logits  # noqa: E402
from _lrp_checks import check_restored_and_captum_class, draw_target_and_mask, left_padded  # noqa: E402
from _lrp_checks import hf_forward, hf_kernel, rel_conservation, relevance  # noqa: E402
EXAMPLES = min(settings().max_examples, 8)


# ----------------------------------------------------------------------------- tiny models
def _spread_hybrid(model, zero_biases: bool) -> None:
    _spread(model, zero_biases)
    with torch.no_grad():  # Qwen3-Next's (1 + w) norms start at w = 0, Jamba's at 1: spread them too
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(0 if isinstance(model, Qwen3NextForCausalLM) else 1, 0.3)
            elif p.dim() >= 2:
                p.normal_(0, 0.5)


def tiny_qwen3_next(seed=0, hidden=8, heads=2, kv_heads=1, k_heads=1, v_heads=2, head_dim=4, kernel=3,
                    layers=("linear_attention", "full_attention"), experts=0, moe_dim=6, use_bias=False,
                    zero_biases=True, dtype=torch.float64, **_):
    torch.manual_seed(seed)
    cfg = Qwen3NextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=len(layers), num_attention_heads=heads, num_key_value_heads=kv_heads,
                          head_dim=head_dim, linear_conv_kernel_dim=kernel, linear_key_head_dim=head_dim,
                          linear_value_head_dim=head_dim, linear_num_key_heads=k_heads, linear_num_value_heads=v_heads,
                          num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=moe_dim,
                          shared_expert_intermediate_size=moe_dim, layer_types=list(layers), attention_bias=use_bias,
                          tie_word_embeddings=False)
    cfg._experts_implementation = "eager"
    model = Qwen3NextForCausalLM(cfg).to(dtype).eval()
    _spread_hybrid(model, zero_biases)
    return model


def tiny_jamba(seed=0, hidden=8, layers=4, experts=4, attn_period=2, kernel=3, state=4, use_bias=False,
               zero_biases=True, dtype=torch.float64, **_):
    torch.manual_seed(seed)
    cfg = JambaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=12, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, num_experts=experts, num_experts_per_tok=2,
                      expert_layer_period=2, expert_layer_offset=1, attn_layer_period=attn_period,
                      attn_layer_offset=1, mamba_d_state=state, mamba_d_conv=kernel, mamba_expand=2,
                      mamba_dt_rank=2, mamba_proj_bias=use_bias, tie_word_embeddings=False, pad_token_id=0)
    cfg._experts_implementation = "eager"
    model = JambaForCausalLM(cfg).to(dtype).eval()
    _spread_hybrid(model, zero_biases)
    return model


def tiny_lfm2(seed=0, hidden=8, layers=("conv", "full_attention"), kernel=3, use_bias=False, zero_biases=True,
              dtype=torch.float64, **_):
    torch.manual_seed(seed)
    cfg = Lfm2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=len(layers),
                     num_attention_heads=2, num_key_value_heads=1, conv_L_cache=kernel, conv_bias=use_bias,
                     block_auto_adjust_ff_dim=False, layer_types=list(layers), tie_word_embeddings=False)
    model = Lfm2ForCausalLM(cfg).to(dtype).eval()
    _spread_hybrid(model, zero_biases)
    return model


BUILD = {
    "qwen3_next": tiny_qwen3_next,
    "qwen3_next_moe": lambda **kw: tiny_qwen3_next(**{"experts": 4, **kw}),
    "jamba": tiny_jamba,
    "lfm2": tiny_lfm2,
}


# ----------------------------------------------------------------------------- registry, values
def test_every_hybrid_class_has_a_form():
    expected = {
        "qwen3_next": {"Qwen3NextGatedDeltaNet", "Qwen3NextRMSNormGated", "Qwen3NextAttention", "Qwen3NextMLP",
                       "Qwen3NextRMSNorm"},
        "qwen3_next_moe": {"Qwen3NextSparseMoeBlock", "Qwen3NextExperts"},
        "jamba": {"JambaMambaMixer", "JambaAttention", "JambaMLP", "JambaSparseMoeBlock", "JambaExperts",
                  "JambaRMSNorm"},
        "lfm2": {"Lfm2ShortConv", "Lfm2Attention", "Lfm2MLP", "Lfm2RMSNorm"},
    }
    for family, build in BUILD.items():
        found = {type(m).__name__ for m in build().modules() if find_lrp_form(m) is not None}
        assert found >= expected[family], (family, found)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", sorted(BUILD))
def test_canonized_logits_identical(family, dtype):
    model = BUILD[family](seed=1, dtype=dtype, zero_biases=False, use_bias=True)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    check_canonized_logits_identical(model, ids, left_padded(2, 9, 3, row=1))


@pytest.mark.parametrize("family", ["qwen3_next_moe", "jamba"])
def test_moe_default_experts_kernel_float32(family):
    """HF's default experts kernel (grouped_mm, float32 only on CPU): the canonized logits stay the model's, bit for
    bit, and relevance conserves to float32 rounding."""
    model = BUILD[family](seed=7, dtype=torch.float32, moe_dim=8)  # grouped_mm wants 16-byte strides
    model.config._experts_implementation = "grouped_mm"
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    ref = hf_forward(model, ids, use_cache=False).logits
    with GatedLinearComposite().context(model):
        assert torch.equal(model(ids, use_cache=False).logits, ref)
    R, f, _ = relevance(model, ids, torch.tensor([1, 2]))
    assert rel_conservation(R.double(), f.double()) < 1e-4


def test_delta_rule_recurrence_matches_hf_kernels():
    """The float64 relevance path of the delta rule is HF's recurrence (and chunked kernel) in another dtype."""
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    g = torch.Generator().manual_seed(0)
    b, L, hk, hv, d = 2, 11, 1, 2, 4
    q, k = torch.randn(b, L, hk, d, generator=g), torch.randn(b, L, hk, d, generator=g)
    v = torch.randn(b, L, hv, d, generator=g)
    decay = -torch.rand(b, L, hv, generator=g) * 2
    beta = torch.rand(b, L, hv, generator=g)
    ours = gated_delta_rule_recurrent(q, k, v, decay, beta, torch.float32)
    rec, _ = hf_kernel(hf.torch_recurrent_gated_delta_rule)(q, k, v, g=decay, beta=beta,
                                                             use_qk_l2norm_in_kernel=True)
    chunk, _ = hf_kernel(hf.torch_chunk_gated_delta_rule)(q, k, v, g=decay, beta=beta, chunk_size=4,
                                                          use_qk_l2norm_in_kernel=True)
    assert torch.equal(ours, rec)
    assert torch.allclose(ours, chunk, rtol=0, atol=1e-5)
    ours64 = gated_delta_rule_recurrent(q.double(), k.double(), v.double(), decay.double(), beta.double(),
                                        torch.float64)
    assert torch.allclose(ours64.float(), rec, rtol=0, atol=1e-5)
    # linear in v with q, k, β, decays fixed: f(2v + w) = 2 f(v) + f(w)
    w = torch.randn(b, L, hv, d, generator=g).double()
    args = (decay.double(), beta.double(), torch.float64)
    lhs = gated_delta_rule_recurrent(q.double(), k.double(), 2 * v.double() + w, *args)
    rhs = 2 * ours64 + gated_delta_rule_recurrent(q.double(), k.double(), w, *args)
    assert torch.allclose(lhs, rhs, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- conservation
CONFIGS = {
    "qwen3_next": st.fixed_dictionaries({
        "seed": st.integers(0, 2**16), "heads": st.sampled_from([1, 2]), "k_heads": st.just(1),
        "v_heads": st.sampled_from([1, 2]), "head_dim": st.sampled_from([2, 4]), "kernel": st.sampled_from([2, 4]),
        "layers": st.sampled_from([("linear_attention",), ("linear_attention", "full_attention"),
                                   ("full_attention", "linear_attention", "linear_attention")]),
    }),
    "jamba": st.fixed_dictionaries({
        "seed": st.integers(0, 2**16), "layers": st.integers(1, 4), "experts": st.sampled_from([1, 3]),
        "attn_period": st.sampled_from([2, 3]), "kernel": st.sampled_from([2, 4]), "state": st.sampled_from([1, 4]),
    }),
    "lfm2": st.fixed_dictionaries({
        "seed": st.integers(0, 2**16), "kernel": st.sampled_from([2, 3, 5]),
        "layers": st.sampled_from([("conv",), ("conv", "full_attention"), ("full_attention", "conv", "conv")]),
    }),
}
CONFIGS["qwen3_next_moe"] = CONFIGS["qwen3_next"]


@pytest.mark.parametrize("family", sorted(BUILD))
@settings(max_examples=EXAMPLES, deadline=None)
@given(length=st.integers(1, 12), batch=st.integers(1, 2), padded=st.booleans(), data=st.data())
def test_conservation_exact(family, length, batch, padded, data):
    model = BUILD[family](**data.draw(CONFIGS[family]))
    ids = torch.randint(1, VOCAB, (batch, length))
    target, mask = draw_target_and_mask(data, batch, length, VOCAB, padded)
    # every mixer masks padded positions (states zeroed, keys masked): they carry nothing
    check_conservation(model, ids, target, mask)


@pytest.mark.parametrize("family", ["qwen3_next", "jamba", "lfm2"])
def test_bias_absorption_accounts_for_the_difference(family):
    """With biases (Qwen3-Next: attention projections; Jamba: conv, Δ, projections; LFM2: conv, projections),
    Σ R + Σ b ⊙ grad_b = f."""
    model = BUILD[family](seed=3, zero_biases=False, use_bias=True)
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    check_bias_absorption(model, ids, torch.tensor([3]))


def test_conservation_float32():
    for family, build in BUILD.items():
        model = build(seed=3, dtype=torch.float32)
        ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
        check_conservation_float32(model, ids, torch.tensor([1, 2]), msg=family)


# ----------------------------------------------------------------------------- ablations
ABLATIONS = {
    # rule switched off -> conservation error must exceed this (each rule matters on these models)
    **{("qwen3_next_moe", r): 1e-3 for r in ("identity_act", "detach_ssm", "half_gate", "detach_norm",
                                             "detach_softmax", "detach_routing")},
    ("qwen3_next_moe", "exact_casts"): CONSERVE,  # float32 delta rule and norms: ~1e-7 remains
    **{("jamba", r): 1e-3 for r in ("identity_act", "detach_ssm", "half_gate", "detach_norm", "detach_softmax",
                                    "detach_routing")},
    ("jamba", "exact_casts"): CONSERVE,
    **{("lfm2", r): 1e-3 for r in ("identity_act", "half_gate", "detach_norm", "detach_softmax")},
    ("lfm2", "exact_casts"): CONSERVE,
}


@pytest.mark.parametrize("family,rule", sorted(ABLATIONS))
def test_ablation_breaks_conservation(family, rule):
    model = BUILD[family](seed=0)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    check_ablation(model, ids, torch.tensor([3, 7]), rule, ABLATIONS[family, rule])


# ----------------------------------------------------------------------------- model left as it was, cache
@pytest.mark.parametrize("family", sorted(BUILD))
def test_model_restored_and_captum_class(family):
    model = BUILD[family](seed=4, zero_biases=False, use_bias=True)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    check_restored_and_captum_class(model, ids, [2, 9])


@pytest.mark.parametrize("family", sorted(BUILD))
def test_cached_continuation_refused(family):
    model = BUILD[family](seed=2)
    ids = torch.randint(1, VOCAB, (1, 6))
    check_cached_continuation_refused(model, ids, "cached state")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("family", sorted(BUILD))
def test_gpu_canonized_model(family):
    """On CUDA transformers may call fused kernels (fla's chunked delta rule, causal-conv1d, mamba-ssm, grouped_mm
    experts); the LRP forms run HF's torch paths for the relevance (HF's own kernel for the delta rule's value), so
    logits agree to float32 rounding and relevance conserves to float32 rounding."""
    model = BUILD[family](seed=8, dtype=torch.float32, moe_dim=8).cuda()
    ids = torch.randint(1, VOCAB, (2, 32), device="cuda")
    # a form refusing this transformers version (e.g. Jamba's router before 5.2x) skips
    check_gpu_canonized_logits(model, ids, torch.tensor([1, 2], device="cuda"), skip_refusal=True)


def test_qwen3_next_across_hf_chunks():
    """L = 70 crosses HF's 64-token chunk of the delta rule (the value's kernel); the relevance still conserves."""
    model = tiny_qwen3_next(seed=9, layers=("linear_attention", "linear_attention"))
    ids = torch.randint(1, VOCAB, (1, 70), generator=torch.Generator().manual_seed(9))
    R, f, _ = relevance(model, ids, torch.tensor([4]))
    assert rel_conservation(R, f) <= CONSERVE


def test_forms_use_the_torch_kernel_where_transformers_bound_a_gpu_one(monkeypatch):
    """With fla importable transformers binds fla's Triton delta rule (a kernel-hub wrapper that keeps the torch
    function in its closure), which fails on CPU tensors. The form must take the torch function on CPU: here the
    wrapper's implementation raises, as fla's does without a GPU; the plain forward fails, the composite does not."""
    import transformers.models.qwen3_next.modeling_qwen3_next as hf

    def hub_wrapper(torch_function):
        def implementation(*args, **kwargs):
            raise RuntimeError("0 active drivers ([]). There should only be one.")

        def wrapped(*args, **kwargs):  # the closure transformers' hub kernels leave: implementation, torch_function
            return implementation(*args, **kwargs) if implementation is not None else torch_function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(hf, "torch_chunk_gated_delta_rule", hub_wrapper(hf.torch_chunk_gated_delta_rule))
    model = tiny_qwen3_next(seed=2)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with pytest.raises(RuntimeError, match="active drivers"):
        model(ids, use_cache=False)
    check_conservation(model, ids, torch.tensor([1, 2]))

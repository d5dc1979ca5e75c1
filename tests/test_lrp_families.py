"""LRP (captum_implicit.lrp) on HF Mamba2, RWKV and RecurrentGemma: tiny random float64 models.

Target logit: HF's Mamba2ForCausalLM casts its logits to float32 (``.float()``), so the exact float64 target is
the ``lm_head`` output (recorded with a hook); RWKV and RecurrentGemma return float64 logits (RecurrentGemma's
after the soft cap, which its LRP form treats with the identity rule).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("zennit")
transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Mamba2Config,
    Mamba2ForCausalLM,
    RecurrentGemmaConfig,
    RecurrentGemmaForCausalLM,
    RwkvConfig,
    RwkvForCausalLM,
)

from captum_implicit.lrp import GatedLinearComposite, GatedLinearLRP, lrp_forms  # noqa: E402
from captum_implicit.lrp.canonizers import find_lrp_form  # noqa: E402

from conftest import requires_cuda  # noqa: E402
# relevance, rel_conservation: also imported from here by other test files
from _lrp_checks import CONSERVE, check_ablation, check_bias_absorption  # noqa: E402,F401
from _lrp_checks import check_canonized_logits_identical, check_cached_continuation_refused  # noqa: E402,F401
from _lrp_checks import check_conservation, check_conservation_float32, check_gpu_canonized_logits  # noqa: E402,F401
from _lrp_checks import check_restored_after_context, check_restored_after_failed_attribution  # noqa: E402,F401
from _lrp_checks import draw_target_and_mask, left_padded  # noqa: E402,F401
from _lrp_checks import rel_conservation, relevance  # noqa: E402,F401

VOCAB = 24
# three families share the CI's 2 cores: at most this many examples per family (fewer if the profile says so)
EXAMPLES = min(settings().max_examples, 8)


# ----------------------------------------------------------------------------- tiny models
def _spread(model: nn.Module, zero_biases: bool) -> None:
    """Spread the weights so that no branch is negligible; zero (or randomise) every additive bias."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.zero_() if zero_biases else p.normal_(0, 0.3)
            elif leaf in ("A_log", "time_decay"):
                p.add_(torch.randn_like(p) * 0.3)
            elif leaf in ("D", "time_first", "recurrent_param"):
                p.normal_(0, 1)
            elif p.dim() >= 2:
                p.normal_(0, 0.5)
            elif "norm" in name or name.endswith("ln_out.weight") or ".ln" in name or "pre_ln" in name:
                p.normal_(1 if "recurrent_gemma" not in type(model).__module__ else 0, 0.3)


def tiny_mamba2(seed=0, hidden=8, expand=2, head_dim=4, groups=1, state=4, layers=2, kernel=3, chunk=4,
                residual_in_fp32=True, use_bias=False, zero_biases=True, dtype=torch.float64):
    torch.manual_seed(seed)
    heads = expand * hidden // head_dim
    cfg = Mamba2Config(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, state_size=state,
                       expand=expand, head_dim=head_dim, num_heads=heads, n_groups=groups, conv_kernel=kernel,
                       chunk_size=chunk, use_bias=use_bias, use_conv_bias=use_bias,
                       residual_in_fp32=residual_in_fp32, tie_word_embeddings=False)
    model = Mamba2ForCausalLM(cfg).to(dtype).eval()
    _spread(model, zero_biases)
    return model


def tiny_rwkv(seed=0, hidden=8, attention=8, intermediate=16, layers=2, zero_biases=True, dtype=torch.float64,
              **_):
    torch.manual_seed(seed)
    cfg = RwkvConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                     attention_hidden_size=attention, intermediate_size=intermediate, context_length=64,
                     rescale_every=0, tie_word_embeddings=False)
    model = RwkvForCausalLM(cfg).to(dtype).eval()
    _spread(model, zero_biases)
    return model


def tiny_rg(seed=0, hidden=8, heads=2, layers=3, kernel=3, window=6, blocks=("recurrent", "attention"), cap=3.0,
            zero_biases=True, dtype=torch.float64, **_):
    torch.manual_seed(seed)
    cfg = RecurrentGemmaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                               intermediate_size=2 * hidden, num_attention_heads=heads, num_key_value_heads=1,
                               head_dim=hidden // heads, lru_width=hidden, conv1d_width=kernel,
                               attention_window_size=window, block_types=list(blocks), logits_soft_cap=cap,
                               tie_word_embeddings=False)
    model = RecurrentGemmaForCausalLM(cfg).to(dtype).eval()
    _spread(model, zero_biases)
    return model


BUILD = {"mamba2": tiny_mamba2, "rwkv": tiny_rwkv, "recurrent_gemma": tiny_rg}
MASKED = {"mamba2", "recurrent_gemma"}  # forwards that take attention_mask (HF RWKV ignores it)


# ----------------------------------------------------------------------------- registry
def test_every_family_class_has_a_form():
    forms = lrp_forms()
    assert {f.family for f in forms} >= {"mamba", "mamba2", "rwkv", "recurrent_gemma", "norm"}
    for family, build in BUILD.items():
        model = build()
        expected = {"mamba2": ["Mamba2Mixer", "Mamba2RMSNorm", "Mamba2Block"],
                    "rwkv": ["RwkvSelfAttention", "RwkvFeedForward", "LayerNorm"],
                    "recurrent_gemma": ["RecurrentGemmaRglru", "RecurrentGemmaRecurrentBlock", "RecurrentGemmaMlp",
                                        "RecurrentGemmaAttention", "RecurrentGemmaRMSNorm",
                                        "RecurrentGemmaForCausalLM"]}[family]
        found = {type(m).__name__ for m in model.modules() if find_lrp_form(m) is not None}
        assert found >= set(expected), (family, found)


# ----------------------------------------------------------------------------- values unchanged
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", sorted(BUILD))
def test_canonized_logits_identical(family, dtype):
    model = BUILD[family](seed=1, dtype=dtype, zero_biases=False, use_bias=True)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = left_padded(2, 9, 3, row=1) if family in MASKED else None
    check_canonized_logits_identical(model, ids, mask)


# ----------------------------------------------------------------------------- conservation
CONFIGS = {
    "mamba2": st.fixed_dictionaries({
        "seed": st.integers(0, 2**16), "hidden": st.sampled_from([4, 8]), "expand": st.sampled_from([1, 2]),
        "head_dim": st.sampled_from([2, 4]), "groups": st.sampled_from([1, 2]), "state": st.sampled_from([1, 3]),
        "layers": st.integers(1, 2), "kernel": st.sampled_from([2, 4]), "chunk": st.sampled_from([3, 4, 16]),
        "residual_in_fp32": st.booleans(), "use_bias": st.booleans(),
    }),
    "rwkv": st.fixed_dictionaries({
        "seed": st.integers(0, 2**16), "hidden": st.sampled_from([4, 8]), "attention": st.sampled_from([4, 8]),
        "intermediate": st.sampled_from([4, 16]), "layers": st.just(2),  # HF RWKV's init divides by layers - 1
    }),
    "recurrent_gemma": st.fixed_dictionaries({
        "seed": st.integers(0, 2**16), "hidden": st.sampled_from([4, 8]), "heads": st.sampled_from([1, 2]),
        "layers": st.integers(1, 3), "kernel": st.sampled_from([2, 4]), "window": st.sampled_from([3, 32]),
        "blocks": st.sampled_from([("recurrent",), ("recurrent", "attention"), ("attention", "recurrent")]),
        "cap": st.sampled_from([3.0, 30.0]),
    }),
}


@pytest.mark.parametrize("family", sorted(BUILD))
@settings(max_examples=EXAMPLES)
@given(length=st.integers(1, 14), batch=st.integers(1, 2), padded=st.booleans(), data=st.data())
def test_conservation_exact(family, length, batch, padded, data):
    cfg = data.draw(CONFIGS[family])
    if family == "mamba2" and cfg["expand"] * cfg["hidden"] % (cfg["head_dim"] * cfg["groups"]):
        cfg["groups"] = 1
    model = BUILD[family](**cfg)
    ids = torch.randint(0, VOCAB, (batch, length))
    target, mask = draw_target_and_mask(data, batch, length, VOCAB, padded and family in MASKED)
    # Mamba2 zeroes padded states: they carry nothing
    check_conservation(model, ids, target, mask, padded_carry_nothing=family == "mamba2")


@pytest.mark.parametrize("family", sorted(BUILD))
@settings(max_examples=max(EXAMPLES // 2, 1))
@given(length=st.integers(1, 10), data=st.data())
def test_bias_absorption_accounts_for_the_difference(family, length, data):
    """With biases, Σ R(emb) + Σ_b b ⊙ grad_b = f (every additive bias absorbs its share, same backward)."""
    cfg = {**data.draw(CONFIGS[family]), "zero_biases": False, "use_bias": True}
    if family == "mamba2":
        cfg["groups"] = 1
    model = BUILD[family](**cfg)
    ids = torch.randint(0, VOCAB, (1, length))
    check_bias_absorption(model, ids, torch.tensor([3]))  # RWKV: its LayerNorm biases only


def test_conservation_float32():
    """float32 models: conservation to float32 rounding (the model's own precision)."""
    for family, build in BUILD.items():
        model = build(seed=3, dtype=torch.float32)
        ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
        check_conservation_float32(model, ids, torch.tensor([1, 2]), msg=family)


# ----------------------------------------------------------------------------- ablations
ABLATIONS = {
    # rule switched off -> conservation error must exceed this (each rule matters on these models)
    ("mamba2", "identity_act"): 1e-3,
    ("mamba2", "detach_ssm"): 1e-3,
    ("mamba2", "half_gate"): 1e-3,
    ("mamba2", "detach_norm"): 1e-3,
    ("mamba2", "exact_casts"): CONSERVE,  # only float32 roundings (~1e-7) remain, still above the float64 bound
    ("rwkv", "identity_act"): 1e-3,
    ("rwkv", "detach_ssm"): 1e-3,
    ("rwkv", "half_gate"): 1e-3,
    ("rwkv", "detach_norm"): 1e-3,
    ("recurrent_gemma", "identity_act"): 1e-3,
    ("recurrent_gemma", "detach_ssm"): 1e-3,
    ("recurrent_gemma", "half_gate"): 1e-3,
    ("recurrent_gemma", "detach_norm"): 1e-3,
    ("recurrent_gemma", "detach_softmax"): 1e-3,
    ("recurrent_gemma", "exact_casts"): CONSERVE,
}


@pytest.mark.parametrize("family,rule", sorted(ABLATIONS))
def test_ablation_breaks_conservation(family, rule):
    model = BUILD[family](seed=0, layers=2)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    check_ablation(model, ids, torch.tensor([3, 7]), rule, ABLATIONS[family, rule])


# ----------------------------------------------------------------------------- model left as it was
@pytest.mark.parametrize("family", sorted(BUILD))
def test_model_restored_after_with_and_on_exceptions(family):
    model = BUILD[family](seed=4, zero_biases=False, use_bias=True)
    model.train()
    ids = torch.randint(0, VOCAB, (1, 5))
    comp = GatedLinearComposite()
    check_restored_after_context(model, ids, comp)
    model.eval()
    check_restored_after_failed_attribution(model, ids, comp)


@pytest.mark.parametrize("family", sorted(BUILD))
def test_cached_continuation_refused(family):
    model = BUILD[family](seed=2)
    ids = torch.randint(0, VOCAB, (1, 6))
    check_cached_continuation_refused(model, ids, continuation=_continuation if family != "mamba2" else None)


def _continuation(model, ids):
    """The prefix's state as the one-token continuation's keywords: RWKV returns ``state``; HF keeps Griffin's
    recurrent state on the modules (the cache holds attention)."""
    if isinstance(model, RecurrentGemmaForCausalLM):
        cache = transformers.DynamicCache(config=model.config)
        model(ids, use_cache=True, cache=cache)
        return dict(cache=cache, position_ids=torch.tensor([[ids.shape[1]]]))
    return dict(state=model(ids, use_cache=True).state)


# ----------------------------------------------------------------------------- zoo classifiers
@pytest.mark.parametrize("name", ["mamba2-rotten-tomatoes", "rwkv-rotten-tomatoes", "griffin-rotten-tomatoes"])
def test_zoo_classifier_relevance_sums_to_logit(name):
    """The bundled SequenceClassifiers in float64: Σ relevance + the biases' share = the target logit."""
    from captum_implicit import zoo

    model, tok = zoo.load(name)
    model = model.double().eval()
    enc = tok.pad([tok.encode("a gripping , funny and moving film"), tok.encode("dull")])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    biases = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]
    with torch.no_grad():
        ref = model(ids, mask)
    with GatedLinearComposite().context(model):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        f = model(None, mask, inputs_embeds=emb)[:, 1]
        grads = torch.autograd.grad(f.sum(), [emb, *biases], allow_unused=True)
    absorbed = sum((b.detach() * g).sum() for b, g in zip(biases, grads[1:]) if g is not None)
    R = GatedLinearLRP(model).attribute(ids, target=1, additional_forward_args=(mask,))
    assert torch.equal(f.detach(), ref[:, 1])
    assert torch.allclose(R, (emb * grads[0]).sum(-1), rtol=0, atol=1e-12)
    assert abs(float((R.sum() + absorbed - f.detach().sum()) / f.detach().abs().sum())) <= CONSERVE


# ----------------------------------------------------------------------------- Captum class on the causal LMs
@pytest.mark.parametrize("family", sorted(BUILD))
def test_gated_linear_lrp_on_causal_lm(family):
    model = BUILD[family](seed=5)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    R, delta = GatedLinearLRP(model).attribute(ids, target=[2, 9], return_convergence_delta=True)
    R_ref, f, _ = relevance(model, ids, torch.tensor([2, 9]))
    assert R.shape == (2, 7) and torch.allclose(R, R_ref, rtol=0, atol=1e-13)
    # Mamba2's delta includes HF's float32 cast of the logits; RWKV and RecurrentGemma return float64 logits
    bound = 1e-6 if family == "mamba2" else CONSERVE
    assert float((delta.abs() / f.abs()).max()) <= bound


# ----------------------------------------------------------------------------- one instance, several calls
@pytest.mark.parametrize("family", sorted(BUILD))
def test_module_called_twice_in_one_forward(family):
    """The last layer used at two depths gives the relevance of two weight-sharing copies (and conserves)."""
    import copy

    shared = BUILD[family](seed=6, layers=2)
    copies = copy.deepcopy(shared)
    layers = {"mamba2": "backbone.layers", "rwkv": "rwkv.blocks", "recurrent_gemma": "model.layers"}[family]
    owner_s, owner_c = (m.get_submodule(layers.rsplit(".", 1)[0]) for m in (shared, copies))
    name = layers.rsplit(".", 1)[1]
    last = getattr(owner_s, name)[-1]
    setattr(owner_s, name, nn.ModuleList([*getattr(owner_s, name), last]))
    last_c = getattr(owner_c, name)[-1]
    setattr(owner_c, name, nn.ModuleList([*getattr(owner_c, name), copy.deepcopy(last_c)]))
    if family == "recurrent_gemma":  # HF reads the block types per layer index from the config
        for m in (shared, copies):
            m.config.num_hidden_layers = 3
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    target = torch.tensor([0, 5])
    R_shared, f_shared, _ = relevance(shared, ids, target)
    R_copies, f_copies, _ = relevance(copies, ids, target)
    assert torch.equal(f_shared, f_copies)
    assert torch.allclose(R_shared, R_copies, rtol=0, atol=1e-12 * float(R_copies.abs().max()))
    assert rel_conservation(R_shared, f_shared) <= CONSERVE


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("family", sorted(BUILD))
def test_gpu_canonized_model(family):
    """On CUDA transformers may call fused kernels (mamba-ssm's Triton scan, RWKV's WKV kernel); the LRP forms run
    the torch paths, so logits agree to float32 rounding and relevance conserves to float32 rounding."""
    # Mamba2: HF hands causal-conv1d (where installed) a channel-last view of in_proj's output, which it takes only
    # when in_proj's width, 2·intermediate + 2·groups·state + heads, and the conv's channels, intermediate +
    # 2·groups·state, are multiples of 8 (the real model raises otherwise, H200: in_proj 44 at the default head dim 4
    # and state 4, session 6; conv 28 at state 6, session 7); 8 heads of 2 and state 4 make them 48 and 24
    extra = {"state": 4, "head_dim": 2} if family == "mamba2" else {}
    model = BUILD[family](seed=8, hidden=8, dtype=torch.float32, **extra).cuda()
    norms = [m for m in model.modules() if type(m).__name__ == "MambaRMSNormGated"]
    if any(not hasattr(m, "group_size") for m in norms):
        pytest.skip("this transformers' Mamba2 gated norm is refused by the LRP form (see lrp/mamba2.py)")
    ids = torch.randint(0, VOCAB, (2, 32), device="cuda")
    check_gpu_canonized_logits(model, ids, torch.tensor([1, 2], device="cuda"))

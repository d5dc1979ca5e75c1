"""LRP (captum_implicit.lrp) on the HF hybrids built on Mamba2 mixers: Bamba, NemotronH, GraniteMoeHybrid,
FalconH1, Zamba2. The tiny configs are ``tests/test_mamba2.py``'s ``_model(kind)`` (whose exact implicit attention
is tested there), in float64 with spread weights; NemotronH also in a MoE variant.

Target logit: the ``lm_head`` output where the model's logits are not float64 (``relevance`` records it).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("zennit")
transformers = pytest.importorskip("transformers")

from captum_implicit.lrp import GatedLinearComposite, LRPError  # noqa: E402
from captum_implicit.lrp.canonizers import find_lrp_form  # noqa: E402

from conftest import rel_err, requires_cuda  # noqa: E402
from test_lrp_families import _spread  # noqa: E402
from _lrp_checks import CONSERVE, check_ablation, check_bias_absorption  # noqa: E402
from _lrp_checks import check_cached_continuation_refused, check_canonized_logits_identical  # noqa: E402
from _lrp_checks import check_conservation, check_conservation_float32, check_restored_and_captum_class  # noqa: E402
from _lrp_checks import draw_target_and_mask, left_padded, rel_conservation, relevance  # noqa: E402
from test_mamba2 import _model  # noqa: E402


EXAMPLES = min(settings().max_examples, 6)
VOCAB = 128  # _model's vocabulary


def _nemotron_h_moe():
    cfg = transformers.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=64, layers_block_type=["mamba", "moe", "attention", "moe"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128, ssm_state_size=16,
        mamba_num_heads=8, mamba_head_dim=16, n_groups=2, chunk_size=16, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1,
        experts_implementation="eager",  # HF's default grouped_mm refuses float64 on CPU
    )
    return transformers.NemotronHForCausalLM(cfg)


def _variant(kind: str, **changes):
    """``_model(kind)`` with config fields changed."""
    model = _model(kind)
    for key, value in changes.items():
        setattr(model.config, key, value)
    return type(model)(model.config)


VARIANTS = {
    "nemotron_h_moe": _nemotron_h_moe,
    # FalconH1's gated norm with the gate before the norm, and without the norm (y ⊙ SiLU(z) in the model's dtype)
    "falcon_h1_gate_first": lambda: _variant("falcon_h1", mamba_norm_before_gate=False),
    "falcon_h1_no_norm": lambda: _variant("falcon_h1", mamba_rms_norm=False),
    # Zamba2 with per-depth LoRA adapters on the shared block and RoPE; then the shared block as ONE instance
    "zamba2_adapters": lambda: _variant("zamba2", use_shared_attention_adapter=True, use_mem_rope=True),
    "zamba2_shared": lambda: _share_block(_variant("zamba2", use_shared_attention_adapter=True, use_mem_rope=True)),
}


def _share_block(model):
    """The same ``Zamba2AttentionDecoderLayer`` instance at every hybrid depth (HF 5.24 builds one instance per
    depth with tied parameters; the instance then runs several times per forward)."""
    hybrids = [layer for layer in model.model.layers if hasattr(layer, "shared_transformer")]
    for layer in hybrids[1:]:
        layer.shared_transformer = hybrids[0].shared_transformer
    return model


def build(kind: str, seed: int = 0, dtype: torch.dtype = torch.float64, zero_biases: bool = True):
    torch.manual_seed(seed)
    model = (VARIANTS[kind]() if kind in VARIANTS else _model(kind)).to(dtype).eval()
    _spread(model, zero_biases)
    for m in model.modules():
        if type(m).__name__ == "GraniteMoeHybridTopKRouter":
            # _model routes each token to 1 of 2 experts: its softmax weight is 1 and nothing depends on holding
            # it; route to both so that the routing rule matters
            m.top_k = 2
    with torch.no_grad():  # spread the norms' weights too (some start at 1, Zamba2's at 0 offsets)
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(1, 0.3)
    return model


KINDS = ["bamba", "nemotron_h", "nemotron_h_moe", "granitemoehybrid", "falcon_h1", "falcon_h1_gate_first",
         "falcon_h1_no_norm", "zamba2", "zamba2_adapters", "zamba2_shared"]
EXPECTED = {
    "bamba": {"BambaMixer", "BambaAttention", "BambaMLP", "BambaRMSNorm"},
    "nemotron_h": {"NemotronHMamba2Mixer", "NemotronHAttention", "NemotronHMLP", "NemotronHRMSNorm"},
    "nemotron_h_moe": {"NemotronHMoE", "NemotronHExperts"},
    "granitemoehybrid": {"GraniteMoeHybridMambaLayer", "GraniteMoeHybridAttention", "GraniteMoeHybridMLP",
                         "GraniteMoeHybridMoE", "GraniteMoeHybridExperts", "GraniteMoeHybridRMSNorm"},
    "falcon_h1": {"FalconH1Mixer", "FalconH1Attention", "FalconH1MLP", "FalconH1RMSNorm"},
    "falcon_h1_gate_first": {"FalconH1Mixer"},
    "falcon_h1_no_norm": {"FalconH1Mixer"},
    "zamba2": {"Zamba2MambaMixer", "Zamba2Attention", "Zamba2MLP", "Zamba2RMSNorm"},
    "zamba2_adapters": {"Zamba2Attention", "Zamba2MLP"},
    "zamba2_shared": {"Zamba2Attention", "Zamba2MLP"},
}


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- registry, values
@pytest.mark.parametrize("kind", KINDS)
def test_every_class_has_a_form(kind):
    found = {type(m).__name__ for m in build(kind).modules() if find_lrp_form(m) is not None}
    assert found >= EXPECTED[kind], found


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_canonized_logits_identical(kind, dtype):
    model = build(kind, seed=1, dtype=dtype, zero_biases=False)
    check_canonized_logits_identical(model, _ids(2, 9, 1), left_padded(2, 9, 3, row=1))


# ----------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**16), length=st.integers(1, 20), batch=st.integers(1, 2), padded=st.booleans(),
       data=st.data())
def test_conservation_exact(kind, seed, length, batch, padded, data):
    """Lengths up to 20 cross the configs' 16-token SSD chunk."""
    model = build(kind, seed=seed)
    target, mask = draw_target_and_mask(data, batch, length, VOCAB, padded)
    # every mixer masks padded positions (states zeroed, keys masked): they carry nothing
    check_conservation(model, _ids(batch, length, seed), target, mask)


@pytest.mark.parametrize("kind", KINDS)
def test_bias_absorption_accounts_for_the_difference(kind):
    """With biases (the mixers' conv biases), Σ R + Σ b ⊙ grad_b = f."""
    model = build(kind, seed=3, zero_biases=False)
    check_bias_absorption(model, _ids(1, 9, 3), torch.tensor([3]))


def test_conservation_float32():
    for kind in KINDS:
        model = build(kind, seed=3, dtype=torch.float32)
        check_conservation_float32(model, _ids(2, 12, 3), torch.tensor([1, 2]), msg=kind)


# ----------------------------------------------------------------------------- ablations
_COMMON = ("identity_act", "detach_ssm", "half_gate", "detach_norm", "detach_softmax")
ABLATIONS = {
    # rule switched off -> conservation error must exceed this (each rule matters on these models)
    **{("bamba", r): 1e-3 for r in _COMMON},
    ("bamba", "exact_casts"): CONSERVE,  # float32 scan / norms: ~1e-7 remains
    **{("nemotron_h_moe", r): 1e-3 for r in (*_COMMON, "detach_routing")},
    ("nemotron_h_moe", "exact_casts"): CONSERVE,
    **{("granitemoehybrid", r): 1e-3 for r in (*_COMMON, "detach_routing")},
    ("granitemoehybrid", "exact_casts"): CONSERVE,
    **{("falcon_h1", r): 1e-3 for r in _COMMON},
    ("falcon_h1", "exact_casts"): CONSERVE,
    **{("falcon_h1_no_norm", r): 1e-3 for r in ("identity_act", "half_gate")},  # the gate outside the norm
    **{("zamba2_shared", r): 1e-3 for r in _COMMON},
    # the shared block's attention logits are small here (scores nearly flat): the ablation moves ~3e-5, far above
    # the 1e-8 that the rules give
    ("zamba2_shared", "detach_softmax"): 1e-6,
    ("zamba2_shared", "exact_casts"): CONSERVE,
}


@pytest.mark.parametrize("kind,rule", sorted(ABLATIONS))
def test_ablation_breaks_conservation(kind, rule):
    model = build(kind, seed=0)
    check_ablation(model, _ids(2, 9, 0), torch.tensor([3, 7]), rule, ABLATIONS[kind, rule])


# ----------------------------------------------------------------------------- model left as it was, cache
@pytest.mark.parametrize("kind", KINDS)
def test_model_restored_and_captum_class(kind):
    model = build(kind, seed=4, zero_biases=False)
    check_restored_and_captum_class(model, _ids(2, 6, 4), [2, 9])


@pytest.mark.parametrize("kind", KINDS)
def test_cached_continuation_refused(kind):
    model = build(kind, seed=2)
    check_cached_continuation_refused(model, _ids(1, 6, 2))


# ----------------------------------------------------------------------------- Zamba2's shared block
@pytest.mark.parametrize("layer_map", ["none", "epsilon"])
def test_zamba2_shared_instance_equals_tied_copies(layer_map):
    """One block instance run at two depths gives the relevance of two weight-tied instances, token by token: each
    call keeps its own held tensors (also with a Zennit rule on every Linear, which saves its input per call)."""
    import copy

    from captum_implicit.lrp import GIEpsilon

    tied = build("zamba2_adapters", seed=5)
    shared = _share_block(copy.deepcopy(tied))
    blocks = [layer.shared_transformer for layer in shared.model.layers if hasattr(layer, "shared_transformer")]
    assert len(blocks) == 2 and blocks[0] is blocks[1]
    calls = []
    handle = blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    ids, target = _ids(2, 11, 5), torch.tensor([4, 8])
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        assert torch.equal(shared(ids, attention_mask=mask, use_cache=False).logits,
                           tied(ids, attention_mask=mask, use_cache=False).logits)
    assert len(calls) == 2  # the one instance ran at both depths
    handle.remove()
    composite = (lambda: GatedLinearComposite(layer_map=[(torch.nn.Linear, GIEpsilon(1e-9))])) if layer_map == \
        "epsilon" else GatedLinearComposite
    R_shared, f, _ = relevance(shared, ids, target, composite(), mask=mask)
    R_tied, f_tied, _ = relevance(tied, ids, target, composite(), mask=mask)
    assert torch.equal(f, f_tied)
    assert torch.allclose(R_shared, R_tied, rtol=0, atol=1e-12 * float(R_tied.abs().max()))
    if layer_map == "none":
        assert rel_conservation(R_shared, f) <= CONSERVE


# ----------------------------------------------------------------------------- GPU
def _record_calls(model):
    """Every call of a module with an LRP form in one plain forward: [(module, args, kwargs, output)] (clones)."""
    from torch.utils._pytree import tree_map

    def clone(x):
        return x.detach().clone() if isinstance(x, torch.Tensor) else x

    calls, handles = [], []
    for module in model.modules():
        if find_lrp_form(module) is not None:
            handles.append(module.register_forward_hook(
                lambda m, a, k, o: calls.append((m, tree_map(clone, a), tree_map(clone, k), tree_map(clone, o))),
                with_kwargs=True))
    return calls, handles


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_canonized_model(kind):
    """Float32 on CUDA, module by module: every module with a form, called under the composite on the inputs it got
    in the plain forward, gives that forward's output to float32 rounding; relevance conserves to float32 rounding.

    Why not the end-to-end logits (as on CPU, where they are bit-identical): on CUDA the plain forward's chunk scan
    is mamba-ssm's ``mamba_chunk_scan_combined`` (HF dispatches to it whenever mamba-ssm is installed), and on
    other transformers releases HF's own torch scan sums in another order (5.17: broadcast products + ``.sum``;
    5.24: ``einsum``, which the forms mirror). Both differ from the forms only by float32 rounding, but these tiny
    spread-weight models amplify rounding a lot: 1e-7 relative noise on Zamba2's first mixer output moves its
    logits by 2e-4 (FalconH1: 2e-7), so 5.17's torch scan alone gives 9e-2 on ``zamba2_adapters`` (CPU, measured).
    Per module that amplification is absent. mamba-ssm's kernels feed float32 operands to ``tl.dot``, TF32 on
    Hopper unless ``TRITON_F32_DEFAULT=ieee`` (set by tests/conftest.py for GPU runs); L = 40 crosses the 16-token
    SSD chunk twice."""
    model = build(kind, seed=8, dtype=torch.float32).cuda()
    ids = _ids(2, 40, 8).cuda()
    calls, handles = _record_calls(model)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert calls
    try:
        with GatedLinearComposite().context(model), torch.no_grad():
            for module, args, kwargs, ref in calls:
                out = module(*args, **kwargs)
                out, ref = (out[0], ref[0]) if isinstance(ref, tuple) else (out, ref)
                assert rel_err(out, ref) < 1e-4, (type(module).__name__, rel_err(out, ref))
    except LRPError as e:  # e.g. the Mamba2 form on a transformers without grouped MambaRMSNormGated (< 5.2x)
        pytest.skip(str(e))
    check_conservation_float32(model, ids, torch.tensor([1, 2], device="cuda"))

"""LRP forms of mamba-ssm (captum_implicit.lrp.mamba_ssm).

mamba-ssm has no CPU build. On CPU the forms are checked on *stand-ins*: modules whose classes carry mamba-ssm's
qualified names (so the registered forms match them by name, as they match the real classes) and mamba-ssm's
attribute names and layouts, holding the weights of a tiny HF Mamba / Mamba2. HF's models compute the same maths
(mamba-ssm's checkpoints load into them), so the forms' pure-torch forward on the stand-in must give HF's logits:
this tests the form code that runs on the real modules, for every layout the stand-ins share with mamba-ssm. The
real modules (attribute names, kernels, ``fused_add_norm``, ``residual_in_fp32``, ``norm_before_gate``, ``D`` per
channel, the gated-MLP part) are checked by the GPU tests at the bottom (marked ``gpu``; skipped without CUDA or
mamba-ssm).
"""

from __future__ import annotations

import collections
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("zennit")
pytest.importorskip("transformers")

from captum_implicit.lrp import GatedLinearComposite, GatedLinearRules, LRPError, is_canonized  # noqa: E402
from captum_implicit.lrp.canonizers import find_lrp_form  # noqa: E402

from conftest import rel_err, requires_cuda  # noqa: E402
from test_lrp import tiny_mamba  # noqa: E402
from test_lrp_families import VOCAB, tiny_mamba2  # noqa: E402
from _lrp_checks import (  # noqa: E402
    CONSERVE, FLOAT32, assert_restored, check_restored_after_context, draw_target_and_mask, model_state,
    rel_conservation,
)

# GPU runs: mamba-ssm's SSD Triton dots in IEEE float32 and cuDNN / matmul TF32 off (tests/conftest.py), so the
# forms' float32 torch arithmetic agrees with the kernels to float32 rounding (with TF32 expect ~1e-3)

EXAMPLES = min(settings().max_examples, 6)
Output = collections.namedtuple("CausalLMOutput", ["logits"])


# ----------------------------------------------------------------------------- relevance (any token model)
def relevance(model: nn.Module, ids: torch.Tensor, target: torch.Tensor, composite=None, mask=None,
              with_biases: bool = False):
    """(R per token (B, L), target logit (B,), 0.0): input × gradient at the embedding output under the composite.

    mamba-ssm's ``MambaLMHeadModel`` takes token ids only: a forward hook on ``backbone.embedding`` hands the
    model a leaf copy of the embeddings, whose gradient is read."""
    assert mask is None and not with_biases
    composite = composite if composite is not None else GatedLinearComposite()
    leaf = {}

    def swap(module, args, out):
        leaf["emb"] = out.detach().requires_grad_()
        return leaf["emb"]

    handle = model.backbone.embedding.register_forward_hook(swap)
    try:
        with composite.context(model):
            f = model(ids).logits[:, -1].gather(1, target[:, None])[:, 0]
            (grad,) = torch.autograd.grad(f.sum(), leaf["emb"])
    finally:
        handle.remove()
    return (leaf["emb"] * grad).sum(-1).detach(), f.detach(), 0.0


# ----------------------------------------------------------------------------- CPU stand-ins
def _named(module: str, name: str, forward=None) -> type:
    """An ``nn.Module`` subclass whose qualified name is mamba-ssm's ``module.name`` (no forward of its own: it runs
    only under the composite, through its form)."""
    attrs = {"__module__": module, "__qualname__": name}
    if forward is not None:
        attrs["forward"] = forward
    return type(name, (nn.Module,), attrs)


Mamba = _named("mamba_ssm.modules.mamba_simple", "Mamba")
Mamba2 = _named("mamba_ssm.modules.mamba2", "Mamba2")
GatedRMSNorm = _named("mamba_ssm.ops.triton.layernorm_gated", "RMSNorm")
RMSNorm = _named("mamba_ssm.ops.triton.layer_norm", "RMSNorm")
GatedMLP = _named("mamba_ssm.modules.mlp", "GatedMLP")
Block = _named("mamba_ssm.modules.block", "Block")
MixerModel = _named("mamba_ssm.models.mixer_seq_simple", "MixerModel")
# MambaLMHeadModel has no form: its forward (backbone, lm_head) is the real one
LMHead = _named("mamba_ssm.models.mixer_seq_simple", "MambaLMHeadModel",
                forward=lambda self, input_ids: Output(self.lm_head(self.backbone(input_ids))))


def _set(module: nn.Module, **attrs) -> nn.Module:
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


def _rms(hf_norm: nn.Module) -> nn.Module:
    return _set(RMSNorm(), weight=hf_norm.weight, bias=None, eps=hf_norm.variance_epsilon, drop=None)


def _mamba(hf: nn.Module, idx: int) -> nn.Module:
    """mamba_simple.Mamba's attributes (__init__) from HF's MambaMixer."""
    return _set(Mamba(), in_proj=hf.in_proj, conv1d=hf.conv1d, x_proj=hf.x_proj, dt_proj=hf.dt_proj, A_log=hf.A_log,
                D=hf.D, out_proj=hf.out_proj, act=nn.SiLU(), activation="silu", d_state=hf.ssm_state_size,
                d_conv=hf.conv_kernel_size, dt_rank=hf.time_step_rank, d_inner=hf.intermediate_size, layer_idx=idx,
                use_fast_path=True)


def _mamba2(hf: nn.Module, idx: int) -> nn.Module:
    """mamba2.Mamba2's attributes (__init__) from HF's Mamba2Mixer: in_proj [z, x, B, C, dt] is HF's [gate, xBC, dt]."""
    norm = _set(GatedRMSNorm(), weight=hf.norm.weight, bias=None, eps=hf.norm.variance_epsilon,
                group_size=hf.norm.group_size, norm_before_gate=False)
    return _set(Mamba2(), in_proj=hf.in_proj, conv1d=hf.conv1d, dt_bias=hf.dt_bias, A_log=hf.A_log, D=hf.D,
                norm=norm, out_proj=hf.out_proj, act=nn.SiLU(), activation="silu", d_ssm=hf.intermediate_size,
                d_inner=hf.intermediate_size, ngroups=hf.n_groups, d_state=hf.ssm_state_size, headdim=hf.head_dim,
                nheads=hf.num_heads, chunk_size=hf.chunk_size, dt_limit=tuple(hf.time_step_limit), rmsnorm=True,
                norm_before_gate=False, D_has_hdim=False, d_conv=hf.conv_kernel_size, layer_idx=idx,
                process_group=None, use_mem_eff_path=True)


def stand_in(hf_model: nn.Module, fused: bool, residual_in_fp32: bool) -> nn.Module:
    """A MambaLMHeadModel-shaped stand-in sharing ``hf_model``'s weights (HF's pre-norm blocks are mamba-ssm's
    "add -> norm -> mixer" blocks regrouped; the last add is MixerModel's)."""
    hf = hf_model.backbone
    mixer = _mamba2 if type(hf.layers[0].mixer).__name__ == "Mamba2Mixer" else _mamba
    layers = nn.ModuleList(
        _set(Block(), norm=_rms(blk.norm), mixer=mixer(blk.mixer, i), mlp=None, fused_add_norm=fused,
             residual_in_fp32=residual_in_fp32)
        for i, blk in enumerate(hf.layers)
    )
    backbone = _set(MixerModel(), embedding=hf.embeddings, layers=layers, norm_f=_rms(hf.norm_f),
                    fused_add_norm=fused, residual_in_fp32=residual_in_fp32)
    return _set(LMHead(), backbone=backbone, lm_head=hf_model.lm_head)


def zero_biases_but_dt(model: nn.Module) -> None:
    """Every bias zero (conservation then holds exactly) except dt_proj's, which feeds the held Δ only."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "dt_proj" not in name:
                p.zero_()


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf(kind: str, **kw) -> nn.Module:
    return tiny_mamba(vocab=VOCAB, **kw) if kind == "mamba" else tiny_mamba2(**kw)


# ----------------------------------------------------------------------------- CPU: registry
def test_forms_registered_by_name():
    model = stand_in(_hf("mamba2"), fused=True, residual_in_fp32=True)
    model.backbone.layers[0].mlp = _set(GatedMLP(), fc1=nn.Linear(8, 8), fc2=nn.Linear(4, 8), activation=F.silu)
    found = {f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules() if find_lrp_form(m) is not None}
    assert found == {
        "mamba_ssm.modules.mamba2.Mamba2", "mamba_ssm.ops.triton.layernorm_gated.RMSNorm",
        "mamba_ssm.ops.triton.layer_norm.RMSNorm", "mamba_ssm.modules.block.Block",
        "mamba_ssm.models.mixer_seq_simple.MixerModel", "mamba_ssm.modules.mlp.GatedMLP",
    }
    assert find_lrp_form(_mamba(_hf("mamba").backbone.layers[0].mixer, 0)) is not None


# ----------------------------------------------------------------------------- CPU: values = HF's
def _hf_logits(hf: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """HF's ``lm_head`` output (HF returns some logits cast to float32)."""
    rec = {}
    handle = hf.lm_head.register_forward_hook(lambda m, a, o: rec.__setitem__("z", o))
    try:
        with torch.no_grad():
            hf(ids, use_cache=False)
    finally:
        handle.remove()
    return rec["z"]


# HF computes parts of a float64 model in float32 (RMSNorm, the float32 residual, Mamba2's scan and gated norm) where
# the forms of a float64 model compute in float64: ≤ 1e-6 covers that rounding through two layers (measured 2.4e-7).
# In float32 the forms run HF's own torch scans (imported from the HF forms) and the same norm arithmetic: measured
# bit-identical on CPU; 1e-6 leaves room for another torch build's kernels.
VALUE_BOUND = {torch.float64: 1e-6, torch.float32: 1e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_logits_equal_hf(kind, fused, dtype):
    hf = _hf(kind, seed=1, dtype=dtype, zero_biases=False, use_bias=True)
    model = stand_in(hf, fused=fused, residual_in_fp32=True)
    ids = _ids(2, 11, 1)  # Mamba2: chunk 4, so 3 chunks, the last one partial
    ref = _hf_logits(hf, ids)
    with GatedLinearComposite().context(model), torch.no_grad():
        out = model(ids).logits
    assert out.dtype == ref.dtype == dtype
    assert rel_err(out, ref) < VALUE_BOUND[dtype]


def test_logits_equal_hf_is_sensitive():
    """The value check above sees a wrong detail of the maths (here the gated norm's group size)."""
    hf = _hf("mamba2", seed=1, groups=2)
    model = stand_in(hf, fused=True, residual_in_fp32=True)
    ids = _ids(2, 11, 1)
    ref = _hf_logits(hf, ids)
    with GatedLinearComposite().context(model), torch.no_grad():
        assert rel_err(model(ids).logits, ref) < VALUE_BOUND[torch.float64]
        for blk in model.backbone.layers:
            blk.mixer.norm.group_size = None
        assert rel_err(model(ids).logits, ref) > 1e-3


# ----------------------------------------------------------------------------- CPU: conservation
def _variant(model: nn.Module, norm_before_gate: bool, d_has_hdim: bool, rmsnorm: bool, mlp: bool, seed: int):
    """Switch the stand-in's Mamba2 layers to mamba-ssm options HF does not have (no HF reference: conservation
    only)."""
    g = torch.Generator().manual_seed(seed)
    for blk in model.backbone.layers:
        mx = blk.mixer
        mx.norm.norm_before_gate = mx.norm_before_gate = norm_before_gate
        mx.rmsnorm = rmsnorm
        if d_has_hdim:
            mx.D = nn.Parameter(torch.randn(mx.d_ssm, generator=g, dtype=mx.D.dtype))
            mx.D_has_hdim = True
        if mlp:
            hidden = mx.in_proj.in_features
            blk.norm2 = _set(RMSNorm(), weight=nn.Parameter(1 + 0.3 * torch.randn(hidden, generator=g).double()),
                             bias=None, eps=1e-5, drop=None)
            fc1, fc2 = nn.Linear(hidden, 12, bias=False).double(), nn.Linear(6, hidden, bias=False).double()
            blk.mlp = _set(GatedMLP(), fc1=fc1, fc2=fc2, activation=F.silu)


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data())
def test_conservation_float64(data):
    kind = data.draw(st.sampled_from(["mamba", "mamba2"]))
    groups = data.draw(st.sampled_from([1, 2])) if kind == "mamba2" else 1
    hf = _hf(kind, seed=data.draw(st.integers(0, 50)), **({"groups": groups} if kind == "mamba2" else {}))
    model = stand_in(hf, fused=data.draw(st.booleans()), residual_in_fp32=data.draw(st.booleans()))
    if kind == "mamba2":
        _variant(model, norm_before_gate=data.draw(st.booleans()), d_has_hdim=data.draw(st.booleans()),
                 rmsnorm=data.draw(st.booleans()), mlp=data.draw(st.booleans()), seed=3)
    check_conservation(model, data, max_length=13)


def check_conservation(model: nn.Module, data, max_length: int) -> None:
    """Drawn ids (batch 1–2, length 1–``max_length``) and targets: the relevance sums to the target logit."""
    batch, length = data.draw(st.integers(1, 2)), data.draw(st.integers(1, max_length))
    ids = _ids(batch, length, data.draw(st.integers(0, 99)))
    target, _ = draw_target_and_mask(data, batch, length, VOCAB, padded=False)
    R, f, _ = relevance(model, ids, target)
    assert R.shape == ids.shape
    assert rel_conservation(R, f) <= CONSERVE


# without the rule the relevance misses the logit by more than this (measured: 0.7 to 3.5; exact_casts 7.6e-8)
ABLATIONS = {
    ("fused", "detach_norm"): 1e-3,  # the fused add + RMSNorm (and MixerModel's final one) in pure torch
    ("norm_before_gate", "half_gate"): 1e-2,  # rms(y)·w ⊙ SiLU(z)
    ("norm_before_gate", "detach_norm"): 1e-3,  # the gated norm's group scale
    ("mlp", "half_gate"): 1e-2,  # GatedMLP's y ⊙ SiLU(gate)
    ("fp32", "exact_casts"): 1e-12,  # residual_in_fp32 in a float64 model: float32 rounding of the residual
}


@pytest.mark.parametrize("case, rule", sorted(ABLATIONS))
def test_ablation(case, rule):
    model = stand_in(_hf("mamba2", seed=4), fused=True, residual_in_fp32=case == "fp32")
    if case != "fused" and case != "fp32":
        _variant(model, norm_before_gate=case == "norm_before_gate", d_has_hdim=False, rmsnorm=True,
                 mlp=case == "mlp", seed=4)
    ids, target = _ids(2, 9, 0), torch.tensor([3, 7])
    R, f, _ = relevance(model, ids, target)
    assert rel_conservation(R, f) <= CONSERVE
    R, f, _ = relevance(model, ids, target, GatedLinearComposite(GatedLinearRules().without(rule)))
    assert rel_conservation(R, f) > ABLATIONS[case, rule]


# ----------------------------------------------------------------------------- CPU: model left unchanged
def test_model_restored_and_refusals():
    model = stand_in(_hf("mamba2", seed=2), fused=True, residual_in_fp32=True)
    ids = _ids(2, 7, 2)
    check_restored_after_context(model, ids, logits=lambda m, x: m(x).logits)
    before = model_state(model)
    mixer = model.backbone.layers[0].mixer
    with GatedLinearComposite().context(model):
        with pytest.raises(LRPError, match="packed"):
            mixer(torch.zeros(1, 3, 8, dtype=torch.float64), seq_idx=torch.zeros(1, 3, dtype=torch.int32))
        with pytest.raises(LRPError, match="cached state"):
            mixer(torch.zeros(1, 1, 8, dtype=torch.float64), inference_params=_set(nn.Module(), seqlen_offset=3))
    assert_restored(model, before)


def test_flat_input_with_seqlen():
    """Mamba2's ``(b·L, d)`` input with ``seqlen=L`` gives the (b, L, d) result flattened."""
    model = stand_in(_hf("mamba2", seed=5), fused=True, residual_in_fp32=True)
    mixer = model.backbone.layers[0].mixer
    u = torch.randn(2, 6, 8, dtype=torch.float64)
    with GatedLinearComposite().context(model), torch.no_grad():
        assert torch.equal(mixer(u.reshape(12, 8), seqlen=6), mixer(u).reshape(12, 8))


# ----------------------------------------------------------------------------- GPU: the real mamba-ssm
def _real(layer: str, fused: bool, residual_in_fp32: bool, mlp: bool = False, seed: int = 0, **ssm):
    """A tiny MambaLMHeadModel (float32, CUDA). Mamba2: 4 heads of 32 in 2 groups, 64-token chunks (L = 100 crosses
    one chunk boundary, the last chunk partial)."""
    pytest.importorskip("mamba_ssm")
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    ssm_cfg = {"layer": layer, "d_state": 16}
    if layer == "Mamba2":
        ssm_cfg.update(headdim=32, ngroups=2, chunk_size=64)
        # Mamba2's memory-efficient path needs causal-conv1d's CUDA op; without it the module's other path runs
        ssm_cfg["use_mem_eff_path"] = importlib.util.find_spec("causal_conv1d") is not None
    ssm_cfg.update(ssm)
    cfg = MambaConfig(d_model=64, n_layer=2, vocab_size=64, d_intermediate=48 if mlp else 0, ssm_cfg=ssm_cfg,
                      rms_norm=True, residual_in_fp32=residual_in_fp32, fused_add_norm=fused,
                      pad_vocab_size_multiple=8, tie_embeddings=True)
    torch.manual_seed(seed)
    model = MambaLMHeadModel(cfg, device="cuda", dtype=torch.float32).eval()
    with torch.no_grad():  # mamba-ssm initialises D to 1, conv biases randomly: spread D, keep the rest
        for name, p in model.named_parameters():
            if name.endswith(".D"):
                p.normal_(0, 1)
    return model


def _gpu_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed)).cuda()


GPU_CASES = [  # (layer, fused_add_norm, residual_in_fp32, mlp, extra ssm_cfg)
    ("Mamba1", True, True, False, {}),
    ("Mamba1", False, False, False, {}),
    ("Mamba1", True, False, True, {}),
    ("Mamba2", True, True, False, {}),
    ("Mamba2", False, True, False, {}),
    ("Mamba2", True, False, True, {"norm_before_gate": True}),
    ("Mamba2", True, True, False, {"D_has_hdim": True, "dt_limit": (0.01, 0.2)}),
    ("Mamba2", True, True, False, {"rmsnorm": False}),
    ("Mamba2", False, True, False, {"d_ssm": 64}),  # a gated-MLP part next to the SSM in in_proj / out_proj
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("layer, fused, fp32, mlp, ssm", GPU_CASES)
def test_gpu_logits_equal_real_model(layer, fused, fp32, mlp, ssm):
    """Under the composite (pure torch, float32) the logits are the real model's (CUDA selective scan / Triton SSD,
    causal-conv1d, Triton fused add + norm) to float32 rounding: ≤ 1e-4 relative to the largest logit (SSD dots in
    IEEE float32 and TF32 off, see the top; with TF32 expect ~1e-3). Every mamba-ssm module runs its form."""
    model = _real(layer, fused, fp32, mlp, **ssm)
    ids = _gpu_ids(2, 100, 1)
    with torch.no_grad():
        ref = model(ids).logits
        with GatedLinearComposite().context(model):
            names = {type(m).__name__ for m in model.modules() if is_canonized(m)}
            out = model(ids).logits
    assert {"MixerModel", "Block", "RMSNorm", "Mamba" if layer == "Mamba1" else "Mamba2"} <= names, names
    assert out.dtype == ref.dtype
    assert rel_err(out, ref) < FLOAT32, rel_err(out, ref)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("layer, fused, fp32, mlp, ssm", GPU_CASES)
def test_gpu_conservation(layer, fused, fp32, mlp, ssm):
    """float64, biases zero: Σ R = f ≤ 1e-8 relative. mamba-ssm's kernels refuse float64, but under the composite no
    kernel runs (every module of the model has a pure-torch form, the rest is embedding / Linear / Conv1d), so the
    model converted with ``.double()`` runs there; its plain forward is never called. float32: ≤ 1e-4."""
    model = _real(layer, fused, fp32, mlp, **ssm)
    zero_biases_but_dt(model)
    ids, target = _gpu_ids(2, 70, 2), torch.tensor([3, 7], device="cuda")
    R, f, _ = relevance(model, ids, target)
    assert rel_conservation(R.double(), f.double()) < FLOAT32
    model.double()
    R, f, _ = relevance(model, ids, target)
    assert f.dtype == torch.float64
    assert rel_conservation(R, f) <= CONSERVE


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_gpu_ablation_and_model_unchanged(layer):
    """The held norm scale of the fused add + RMSNorm is needed (float64); the composite leaves the real model as it
    was (parameters bit for bit, hooks, forwards), after a backward and after an exception."""
    model = _real(layer, fused=True, residual_in_fp32=True)
    ids, target = _gpu_ids(2, 40, 3), torch.tensor([1, 2], device="cuda")
    ref = model(ids).logits.detach()
    check_restored_after_context(model, ids, logits=lambda m, x: m(x).logits)
    assert torch.equal(model(ids).logits, ref)  # the real forward (kernels) again, bit for bit
    zero_biases_but_dt(model)
    model.double()
    R, f, _ = relevance(model, ids, target)
    assert rel_conservation(R, f) <= CONSERVE
    R, f, _ = relevance(model, ids, target, GatedLinearComposite(GatedLinearRules().without("detach_norm")))
    assert rel_conservation(R, f) > 1e-3


@pytest.mark.gpu
@requires_cuda
def test_gpu_cache_filled_on_first_call_and_continuation_refused():
    """A first call with ``inference_params`` fills the conv / SSM states as the real model does; continuing from
    them is refused."""
    pytest.importorskip("mamba_ssm")
    from mamba_ssm.utils.generation import InferenceParams

    for layer in ("Mamba1", "Mamba2"):
        # Mamba2's decoding path hands causal-conv1d a channel-last view of in_proj's output, which causal-conv1d
        # takes only when its width, 2·d_inner + 2·ngroups·d_state + nheads, is a multiple of 8: 8 heads of 16 make
        # 328 (the default 4 heads of 32 make 324, and the real module raises)
        model = _real(layer, fused=True, residual_in_fp32=True, **({"headdim": 16} if layer == "Mamba2" else {}))
        ids = _gpu_ids(1, 20, 4)
        ref_params, params = InferenceParams(max_seqlen=32, max_batch_size=1), InferenceParams(32, 1)
        with torch.no_grad():
            model(ids, inference_params=ref_params)
            with GatedLinearComposite().context(model):
                model(ids, inference_params=params)
                params.seqlen_offset = 20
                with pytest.raises(LRPError, match="cached state"):
                    model(ids[:, -1:], inference_params=params)
        assert len(ref_params.key_value_memory_dict) == len(params.key_value_memory_dict) > 0, layer
        for i, (conv, ssm) in ref_params.key_value_memory_dict.items():
            conv2, ssm2 = params.key_value_memory_dict[i]
            # the pre-conv inputs and the last states; float32 rounding apart (Mamba computes in_proj as
            # weight @ x, the form calls in_proj; the scans sum in other orders)
            assert conv2.abs().max() > 0 and rel_err(conv2, conv) < FLOAT32, (layer, i)
            assert ssm2.abs().max() > 0 and rel_err(ssm2, ssm) < FLOAT32, (layer, i)

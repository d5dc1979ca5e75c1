"""flash-linear-attention layer modules (``fla.layers``) captured end to end: ``adapters/fla.py``.

On CPU, fla's kernels, norms, rotary, token shift and swish are Triton; during a capture the adapter routes
them to fla's naive references / torch (see the adapter's docstring). Configurations that run on CPU:
``use_short_conv=False`` and no ``attention_mask`` (RWKV-6 takes a mask: it multiplies its inputs).
The reference is independent of captum-implicit: the tensor entering ``o_proj``, recorded by our own
forward pre-hook (HGRN2 never calls ``o_proj`` as a module: its fused ``rms_norm_linear`` applies the weight,
so there ``o_proj.weight · output()`` is compared with the layer's return value).

fla's naive references compute in float32 whatever the input dtype, so a float64 model routed to them agrees
with the float64 closed form only to float32 rounding (``NAIVE_BOUND``). The float64 algebra of the adapter
(norm row scales, gates, centering, in-kernel gate and β transforms) is checked to 1e-10 by routing to float64
recurrences written here instead (``test_float64_algebra_is_exact``). Skipped when fla is absent.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from captum_implicit import implicit_attention
from captum_implicit.core.capture import Capture
from captum_implicit.core.errors import CaptureError
from conftest import assert_views_match_dense, rel_err, requires_cuda

fla = pytest.importorskip("fla")
# fla's kernels compute float32 dots in TF32 on Hopper (10-bit mantissa, ~1e-3); GPU runs switch them to IEEE
# float32 (conftest._fla_in_full_float32), so the exact closed form must match them to float32 rounding

import fla.layers as fl  # noqa: E402

HIDDEN = 32
# fla's naive references cast to float32 and run a float32 recurrence of ≤ 70 steps: measured ≤ 3e-6 (max-abs
# relative; GLA without output gate, where the RMSNorm output is compared directly), float32 models ≤ 3e-6 too
NAIVE_BOUND = 1e-5
F32_BOUND = 1e-4

KINDS: dict[str, tuple] = {
    "gla": (fl.GatedLinearAttention, {"fuse_norm": True}),
    "gla_unfused": (fl.GatedLinearAttention, {"fuse_norm": False}),
    "gla_no_gate": (fl.GatedLinearAttention, {"use_output_gate": False}),
    "hgrn2": (fl.HGRN2Attention, {"expand_ratio": 8}),
    "retnet": (fl.MultiScaleRetention, {"fuse_norm": True}),
    "retnet_unfused": (fl.MultiScaleRetention, {"fuse_norm": False}),
    "rwkv6": (fl.RWKV6Attention, {"proj_low_rank_dim": 8, "gate_low_rank_dim": 8}),
    "deltanet": (fl.DeltaNet, {}),
    "deltanet_gate": (fl.DeltaNet, {"use_gate": True}),
    "deltanet_sum_norm": (fl.DeltaNet, {"qk_norm": "sum", "qk_activation": "relu"}),
    "gated_deltanet": (fl.GatedDeltaNet, {"head_dim": 8}),
    "gated_deltanet_no_gate": (fl.GatedDeltaNet, {"head_dim": 8, "use_gate": False, "allow_neg_eigval": True}),
}
_CONV = {fl.DeltaNet, fl.GatedDeltaNet, fl.GatedLinearAttention, fl.MultiScaleRetention, fl.HGRN2Attention}


def make(kind: str, dtype: torch.dtype, seed: int = 0, cpu: bool = True) -> torch.nn.Module:
    """A tiny fla layer with randomised norm weights/biases (fla initialises them to 1/0)."""
    cls, kw = KINDS[kind]
    kw = dict(kw)
    if cpu and cls in _CONV:
        kw["use_short_conv"] = False  # ShortConvolution is Triton and not routed
    torch.manual_seed(seed)
    model = cls(hidden_size=HIDDEN, num_heads=2, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p))
    return model.to(dtype).eval()


def run(model: torch.nn.Module, x: torch.Tensor, **kwargs) -> tuple:
    """(attention, reference, layer output): reference = tensor entering o_proj, by our own hook."""
    seen: list[torch.Tensor] = []
    handle = model.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        with Capture(model) as cap, torch.no_grad():
            out = model(x, **kwargs)[0]
    finally:
        handle.remove()
    (attn,) = cap.layers
    return attn, (seen[0] if seen else None), out


def check(model, attn, ref, out, bound: float) -> None:
    if ref is None:  # HGRN2: o_proj applied inside rms_norm_linear
        err = rel_err(F.linear(attn.output().to(out.dtype), model.o_proj.weight), out)
    else:
        err = rel_err(attn.output(), ref)
    assert err < bound, f"relative error {err:.3g} ≥ {bound:g}"


def _x(seed: int, length: int, dtype: torch.dtype, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, length, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("kind", list(KINDS))
@given(seed=st.integers(0, 2**16), length=st.integers(1, 70))
def test_output_equals_o_proj_input(kind, seed, length):
    """L ≤ 64 runs fla's fused_recurrent branch, L > 64 its chunk branch (both routed on CPU)."""
    model = make(kind, torch.float32, seed % 7)
    attn, ref, out = run(model, _x(seed, length, torch.float32))
    check(model, attn, ref, out, F32_BOUND)
    model64 = make(kind, torch.float64, seed % 7)
    attn, ref, out = run(model64, _x(seed, length, torch.float64))
    assert attn.dtype == torch.float64
    check(model64, attn, ref, out, NAIVE_BOUND)


# ---------------------------------------------------------------- float64 recurrences in place of the naive ones
def _recurrence64(q, k, v, g=None, beta=None, u=None, scale=None):
    """Float64 step-by-step reference, (b, L, H, d) layout: GLA / RetNet (``g``), RWKV-6 (``u``: read the
    state before the decay, current token with bonus), delta rule (``beta``, optional scalar ``g``)."""
    q, k, v = q.double(), k.double(), v.double()
    b, length, h, dk = q.shape
    scale = dk**-0.5 if scale is None else scale
    state = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float64)
    out = []
    for t in range(length):
        if g is None:
            decay = torch.ones(b, h, 1, 1, dtype=torch.float64)
        else:  # (b, H, dk) per key channel or (b, H) per head
            decay = torch.exp(g[:, t].double())
            decay = decay[..., None] if decay.dim() == 3 else decay[..., None, None]
        kt, vt, qt = k[:, t], v[:, t], q[:, t] * scale
        if beta is not None:  # delta rule: S ← e^g S;  S ← S + β k (v − Sᵀk)ᵀ
            state = state * decay
            vt = beta[:, t].double()[..., None] * (vt - (state * kt[..., None]).sum(-2))
        kv = kt[..., None] * vt[..., None, :]
        if u is not None:
            out.append((qt[..., None] * (state + u.double()[None, :, :, None] * kv)).sum(-2))
            state = state * decay + kv
        else:
            state = (state if beta is not None else state * decay) + kv
            out.append((qt[..., None] * state).sum(-2))
    return torch.stack(out, 1)


def _heads(x):
    return x.transpose(1, 2)


def _float64_naive(monkeypatch) -> None:
    import fla.ops.delta_rule.naive as dn
    import fla.ops.gated_delta_rule.naive as gdn
    import fla.ops.gla.naive as gla
    import fla.ops.retention.naive as ret
    import fla.ops.rwkv6.recurrent_naive as rwkv6

    monkeypatch.setattr(gla, "naive_recurrent_gla",
                        lambda q, k, v, gk, s=None, f=False: (_recurrence64(q, k, v, gk), None))

    def retention(q, k, v):
        h = q.shape[1]
        g = torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(h, dtype=torch.float64)))
        g = g[None, None, :].expand(q.shape[0], q.shape[2], h)
        return _heads(_recurrence64(_heads(q), _heads(k), _heads(v), g))

    monkeypatch.setattr(ret, "naive_retention", retention)
    monkeypatch.setattr(rwkv6, "naive_recurrent_rwkv6", lambda q, k, v, w, u, scale=None, s=None, f=False: (
        _heads(_recurrence64(_heads(q), _heads(k), _heads(v), _heads(w), u=u, scale=scale)), None))
    monkeypatch.setattr(dn, "delta_rule_recurrence", lambda q, k, v, beta, s=None, f=False: (
        _heads(_recurrence64(_heads(q), _heads(k), _heads(v), beta=_heads(beta))), None))
    monkeypatch.setattr(gdn, "naive_recurrent_gated_delta_rule", lambda q, k, v, beta, g, scale=None, s=None, f=False: (
        _recurrence64(q, k, v, g=g, beta=beta, scale=scale), None))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("length", [1, 9, 70])
def test_float64_algebra_is_exact(kind, length, monkeypatch):
    """With the kernels routed to float64 recurrences, a float64 layer is reproduced to 1e-10: everything the
    adapter adds to the closed forms (norms, gates, centering, in-kernel transforms) is exact."""
    _float64_naive(monkeypatch)
    model = make(kind, torch.float64, 1)
    attn, ref, out = run(model, _x(length, length, torch.float64))
    check(model, attn, ref, out, 1e-10)


@pytest.mark.parametrize("kind", ["gla_unfused", "hgrn2", "retnet", "rwkv6", "gated_deltanet"])
def test_aggregate_and_row_equal_reductions_of_dense(kind):
    model = make(kind, torch.float64, 2)
    (attn,) = implicit_attention(model, _x(3, 11, torch.float64))
    assert_views_match_dense(attn, rows=(5,), max_block_elements=128)


def test_rwkv6_with_padding_mask():
    """RWKV-6 does not unpad: the mask multiplies its inputs and v, which the recorded kernel inputs carry."""
    model = make("rwkv6", torch.float64, 3)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    attn, ref, out = run(model, _x(4, 12, torch.float64), attention_mask=mask)
    check(model, attn, ref, out, NAIVE_BOUND)


MODELS = {
    "gla": ("GLAConfig", "GLAForCausalLM", {}),
    "retnet": ("RetNetConfig", "RetNetForCausalLM", {}),
    "deltanet": ("DeltaNetConfig", "DeltaNetForCausalLM", {"use_short_conv": False}),
    "gated_deltanet": ("GatedDeltaNetConfig", "GatedDeltaNetForCausalLM", {"use_short_conv": False, "head_dim": 8}),
    "hgrn2": ("HGRN2Config", "HGRN2ForCausalLM", {"expand_ratio": 8}),
    "rwkv6": ("RWKV6Config", "RWKV6ForCausalLM", {"proj_low_rank_dim": 8, "gate_low_rank_dim": 8}),
}


@pytest.mark.parametrize("fuse_norm", [True, False])
@pytest.mark.parametrize("kind", list(MODELS))
def test_fla_models_on_cpu(kind, fuse_norm):
    """fla's own causal LMs (2 layers) run under the capture on CPU with ``fuse_swiglu=False`` (its fused
    SwiGLU-linear is not routed) and ``use_short_conv=False``; the block norms (fused add-norm with
    ``fuse_norm``) and GatedMLP's swiglu are routed too. Every layer's output() = its o_proj input."""
    import fla.models as fm

    cfg_name, model_name, extra = MODELS[kind]
    config = getattr(fm, cfg_name)(hidden_size=HIDDEN, num_hidden_layers=2, num_heads=2, vocab_size=40,
                                   fuse_norm=fuse_norm, fuse_swiglu=False, fuse_cross_entropy=False, **extra)
    torch.manual_seed(0)
    model = getattr(fm, model_name)(config).eval()
    layers = [m for m in model.modules() if isinstance(m, tuple(cls for cls, _ in KINDS.values()))]
    seen: dict[int, list] = {id(m): [] for m in layers}
    handles = [m.o_proj.register_forward_pre_hook(lambda mod, a, i=id(m): seen[i].append(a[0].detach()))
               for m in layers]
    handles += [m.register_forward_hook(lambda mod, a, out, i=id(m): seen[i].append(out[0].detach()))
                for m in layers]
    try:
        found = implicit_attention(model, torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1)),
                                   use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert len(found) == 2
    for attn, layer in zip(found, layers, strict=True):
        recorded = seen[id(layer)]
        ref, out = (recorded[0], recorded[1]) if len(recorded) == 2 else (None, recorded[0])
        check(layer, attn, ref, out, F32_BOUND)


def _globals() -> dict[str, object]:
    import importlib

    from captum_implicit.adapters.fla import CPU_ROUTES

    found = {}
    for q in CPU_ROUTES:
        mod, _, name = q.rpartition(".")
        found[q] = getattr(importlib.import_module(mod), name)
    return found


@pytest.mark.parametrize("kind", ["gla_unfused", "rwkv6", "retnet"])
def test_model_and_fla_left_untouched(kind):
    model = make(kind, torch.float32, 4)
    before_globals, before_state = _globals(), {k: v.clone() for k, v in model.state_dict().items()}
    gate = model.__dict__.get("gate_fn")
    run(model, _x(5, 8, torch.float32))
    if kind != "rwkv6":  # fla unpads a masked batch to cu_seqlens: refused on CPU, undone all the same
        with pytest.raises(CaptureError, match="attention_mask=None"):
            with Capture(model), torch.no_grad():
                model(_x(5, 8, torch.float32), attention_mask=torch.tensor([[0] * 3 + [1] * 5] * 2))
    assert _globals() == before_globals
    assert model.__dict__.get("gate_fn") is gate
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_package_imports_without_fla():
    """The built-in adapters register fla's classes by name: importing them must not import fla."""
    code = "import sys, captum_implicit.adapters, captum_implicit.core.registry as r; " \
           "assert 'fla' not in sys.modules; assert any('fla.layers.gla' in c for c in r.supported_classes())"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.getcwd())


# ---------------------------------------------------------------- GPU: fla's real Triton kernels, nothing routed
# float32: fla's kernels in IEEE mode (tests/conftest.py::_fla_in_full_float32): float32 rounding.
# bfloat16: the kernel output, the norm output and the gate are each rounded to bf16 (2^-8 ≈ 4e-3 relative)
# before o_proj, while the closed form runs in float32/float64 from the bf16 kernel inputs: ~1e-2.
GPU_BOUNDS = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [37, 200])
@pytest.mark.parametrize("kind", list(KINDS))
def test_triton_kernels_on_gpu(kind, length, dtype):
    """Default fla configs (short convs on where the layer has them); L ≤ 64: fused_recurrent, else chunk."""
    if dtype == torch.float32 and length > 64 and kind.startswith("deltanet"):
        pytest.skip("fla's chunk_delta_rule refuses float32 ('Please use bfloat16'); bf16 is tested")
    model = make(kind, torch.float32, 5, cpu=False).to("cuda", dtype)
    x = _x(6, length, torch.float32).to("cuda", dtype)
    attn, ref, out = run(model, x)
    assert not math.isnan(float(attn.output().float().abs().max()))
    check(model, attn, ref, out, GPU_BOUNDS[dtype])

"""flash-linear-attention families (GLA, HGRN2, RetNet, RWKV-6, DeltaNet): closed forms against fla's kernels.

fla's layer modules cannot run on CPU (every kernel, norm and short conv is Triton: "0 active drivers"), so
on CPU the closed forms are checked against fla's own naive references (``fla.ops.*.naive``, which compute in
float32) and against a float64 step-by-step recurrence written here; on the GPU against fla's Triton chunk
kernels. The checks against fla's references and kernels skip where ``fla`` is absent (optional extra ``fla``;
see docs/supported.md); those against the float64 recurrence and between the views run without it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from captum_implicit.layers.gated_deltanet import delta_rule_matrix, l2_normalise
from captum_implicit.layers.gla import GLAAttention, build_gla_attention, gla_matrix, retention_log_decay
from conftest import GPU_BOUND, assert_views_match_dense, direct_decayed_products, rel_err, requires_cuda

H, DK, DV = 3, 8, 4
# fla's naive references cast everything to float32 and run a float32 recurrence: the float64 closed form
# agrees with them to float32 rounding accumulated over ≤ 70 steps (measured ≤ 2e-7)
NAIVE_BOUND = 1e-5


@pytest.fixture(scope="module")
def naive() -> SimpleNamespace:
    """fla's naive references (float32 recurrences); a test that takes them skips where fla is absent."""
    pytest.importorskip("fla")
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.retention.naive import naive_retention
    from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

    return SimpleNamespace(gla=naive_recurrent_gla, retention=naive_retention, rwkv6=naive_recurrent_rwkv6,
                           delta_rule=delta_rule_recurrence)


def _factors(seed: int, length: int, dtype=torch.float32, decay_scale: float = 1.0) -> dict:
    """Random kernel inputs in fla's (b, L, H, d) layout."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, length, H, DK, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(2, length, H, DV, generator=g, dtype=dtype)
    log_decay = F.logsigmoid(torch.randn(2, length, H, DK, generator=g, dtype=dtype) + 2) * decay_scale
    u = torch.randn(H, DK, generator=g, dtype=dtype)
    return {"q": q, "k": k, "v": v, "g": log_decay, "u": u}


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()


def _as_output(o: torch.Tensor) -> torch.Tensor:
    """(b, L, H, dv) -> the (b, L, H·dv) layout of ``output()``."""
    return o.reshape(*o.shape[:2], -1)


def _recurrence64(q, k, v, g, scale, u=None) -> torch.Tensor:
    """Float64 step-by-step S_t = diag(e^{g_t}) S_{t−1} + k_t v_tᵀ; o_t = scale·q_tᵀ S_t (GLA), or RWKV-6's
    o_t = scale·q_tᵀ (S_{t−1} + diag(u) k_t v_tᵀ) then S_t = diag(e^{g_t}) S_{t−1} + k_t v_tᵀ.
    (b, L, H, dv)."""
    q, k, v, g = (x.double() for x in (q, k, v, g))
    state = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=torch.float64)
    out = []
    for t in range(q.shape[1]):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        if u is None:
            state = state * torch.exp(g[:, t])[..., None] + kv
            out.append((scale * q[:, t, :, :, None] * state).sum(-2))
        else:
            out.append((scale * q[:, t, :, :, None] * (state + u.double()[None, :, :, None] * kv)).sum(-2))
            state = state * torch.exp(g[:, t])[..., None] + kv
    return torch.stack(out, dim=1)


@given(seed=st.integers(0, 2**16), length=st.integers(1, 70))
def test_gla_equals_fla_naive(naive, seed, length):
    f = _factors(seed, length)
    attn = build_gla_attention("gla", query=f["q"], key=f["k"], value=f["v"], log_decay=f["g"])
    out, _ = naive.gla(f["q"], f["k"], f["v"], f["g"])
    assert rel_err(attn.output(), _as_output(out)) < NAIVE_BOUND


@given(seed=st.integers(0, 2**16), length=st.integers(1, 70))
def test_gla_equals_float64_recurrence(seed, length):
    f64 = _factors(seed, length, torch.float64)
    attn64 = build_gla_attention("gla", query=f64["q"], key=f64["k"], value=f64["v"], log_decay=f64["g"])
    ref = _recurrence64(f64["q"], f64["k"], f64["v"], f64["g"], DK**-0.5)
    assert rel_err(attn64.output(), _as_output(ref)) < 1e-10


@given(seed=st.integers(0, 2**16), length=st.integers(1, 70))
def test_hgrn2_is_gla_with_forget_gate_as_key(naive, seed, length):
    """HGRN2 feeds GLA's kernel k = 1 − e^{g} (fla.layers.hgrn2); the same closed form applies."""
    f = _factors(seed, length)
    key = 1 - f["g"].exp()
    attn = build_gla_attention("hgrn2", query=f["q"], key=key, value=f["v"], log_decay=f["g"], family="hgrn2")
    out, _ = naive.gla(f["q"], key, f["v"], f["g"])
    assert attn.family == "hgrn2"
    assert rel_err(attn.output(), _as_output(out)) < NAIVE_BOUND


@given(seed=st.integers(0, 2**16), length=st.integers(1, 70))
def test_retention_equals_fla_naive(naive, seed, length):
    f = _factors(seed, length)
    decay = retention_log_decay(H)[None, None, :].expand(2, length, H)  # fixed per-head decay
    attn = build_gla_attention("ret", query=f["q"], key=f["k"], value=f["v"], log_decay=decay, family="retnet")
    out = naive.retention(*(_heads_first(f[x]) for x in "qkv"))
    # naive_retention forms the decay in float32 as exp2((n − m)·log2(1 − 2^{−5−h})): float32 rounding of
    # the exponent grows with the distance n − m, hence a slightly wider float32-level bound
    assert rel_err(attn.output(), _as_output(_heads_first(out))) < 1e-4


@given(seed=st.integers(0, 2**16), length=st.integers(1, 70))
def test_retention_equals_float64_recurrence(seed, length):
    decay = retention_log_decay(H)[None, None, :].expand(2, length, H)  # fixed per-head decay
    f64 = _factors(seed, length, torch.float64)
    attn64 = build_gla_attention("ret", query=f64["q"], key=f64["k"], value=f64["v"], log_decay=decay)
    ref = _recurrence64(f64["q"], f64["k"], f64["v"], decay[..., None].expand(-1, -1, -1, DK), DK**-0.5)
    assert rel_err(attn64.output(), _as_output(ref)) < 1e-10


@given(seed=st.integers(0, 2**16), length=st.integers(1, 70))
def test_rwkv6_equals_fla_naive(naive, seed, length):
    f = _factors(seed, length)
    # fla.layers.rwkv6 calls its kernel with scale=1 and w = −exp(·) (any log-decay ≤ 0)
    attn = build_gla_attention("rwkv6", query=f["q"], key=f["k"], value=f["v"], log_decay=f["g"], scale=1.0,
                                bonus=f["u"], family="rwkv6")
    out, _ = naive.rwkv6(*(_heads_first(f[x]) for x in "qkvg"), f["u"], scale=1.0)
    assert rel_err(attn.output(), _as_output(_heads_first(out))) < NAIVE_BOUND


@given(seed=st.integers(0, 2**16), length=st.integers(1, 70))
def test_rwkv6_equals_float64_recurrence(seed, length):
    f64 = _factors(seed, length, torch.float64)
    attn64 = build_gla_attention("rwkv6", query=f64["q"], key=f64["k"], value=f64["v"], log_decay=f64["g"],
                                  scale=1.0, bonus=f64["u"])
    ref = _recurrence64(f64["q"], f64["k"], f64["v"], f64["g"], 1.0, u=f64["u"])
    assert rel_err(attn64.output(), _as_output(ref)) < 1e-10


@given(seed=st.integers(0, 2**16), length=st.integers(1, 70))
def test_deltanet_equals_fla_naive(naive, seed, length):
    """DeltaNet is the gated delta rule without the gate: the delta-rule closed form with zero log-decay."""
    f = _factors(seed, length)
    q, k = l2_normalise(f["q"]), l2_normalise(f["k"])  # what use_qk_l2norm_in_kernel does
    beta = torch.sigmoid(f["g"][..., 0])  # (b, L, H)
    out, _ = naive.delta_rule(*(_heads_first(x) for x in (q, k, f["v"], beta)))
    qh, kh = _heads_first(q).double() * DK**-0.5, _heads_first(k).double()
    A = delta_rule_matrix(qh, kh, torch.zeros_like(qh[..., :1]), _heads_first(beta).double())  # (b, H, L, L)
    ours = A @ _heads_first(f["v"]).double()
    assert rel_err(ours, out) < NAIVE_BOUND


def test_long_strong_decay_is_finite_and_exact():
    """Total log-decay ≈ −4000 per channel: e^{−G} overflows float64; the closed forms must not, and must equal
    the direct sum over pairs (each exponent ``G_t − G_s ≤ 0`` taken on its own)."""
    torch.manual_seed(0)
    length = 300
    q, k = torch.randn(2, length, DK, dtype=torch.float64).unbind(0)
    cum = torch.cumsum(-torch.rand(length, DK, dtype=torch.float64) * 25, dim=0)
    assert float(-cum.min()) > 709
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    gla = gla_matrix(q, k, cum)
    assert torch.isfinite(gla).all()
    assert rel_err(gla, direct_decayed_products(q, k, cum, causal)) < 1e-12
    u = torch.randn(DK, dtype=torch.float64)  # RWKV-6: rows read the state before their own decay, u on the diagonal
    rwkv = gla_matrix(q, k, cum, u)
    previous = torch.cat([torch.zeros_like(cum[:1]), cum[:-1]])
    want = direct_decayed_products(q, k, cum, causal.tril(-1), row_cum=previous) + torch.diag((q * u * k).sum(-1))
    assert torch.isfinite(rwkv).all()
    assert rel_err(rwkv, want) < 1e-12


@given(seed=st.integers(0, 2**16), length=st.integers(2, 30), rwkv=st.booleans())
def test_aggregate_and_row_equal_reductions_of_dense(seed, length, rwkv):
    f = _factors(seed, length, torch.float64)
    attn = build_gla_attention("x", query=f["q"], key=f["k"], value=f["v"], log_decay=f["g"],
                               bonus=f["u"] if rwkv else None, row_scale=torch.rand(2, H * DV, length).double())
    assert isinstance(attn, GLAAttention)
    assert_views_match_dense(attn, rows=(length // 2, length - 1), max_block_elements=128)


# ----------------------------------------------------------------------------- GPU: fla's Triton kernels
def _cuda(f: dict) -> dict:
    return {k: v.cuda() for k, v in f.items()}


# fla's kernels in IEEE mode (tests/conftest.py): float32 rounding
FLOAT32_GPU = GPU_BOUND[torch.float32]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("length", [37, 200])
def test_chunk_kernels_on_gpu(length):
    pytest.importorskip("fla")
    from fla.ops.delta_rule import fused_recurrent_delta_rule  # chunk_delta_rule refuses float32
    from fla.ops.gla import chunk_gla
    from fla.ops.retention import chunk_retention
    from fla.ops.rwkv6 import chunk_rwkv6

    f = _factors(0, length)
    c = _cuda(f)
    o, _ = chunk_gla(c["q"], c["k"], c["v"], c["g"])
    attn = build_gla_attention("gla", query=f["q"], key=f["k"], value=f["v"], log_decay=f["g"])
    assert rel_err(attn.output(), _as_output(o.cpu())) < FLOAT32_GPU

    o, _ = chunk_rwkv6(c["q"], c["k"], c["v"], c["g"], c["u"], scale=1.0)
    attn = build_gla_attention("rwkv6", query=f["q"], key=f["k"], value=f["v"], log_decay=f["g"], scale=1.0,
                               bonus=f["u"])
    assert rel_err(attn.output(), _as_output(o.cpu())) < FLOAT32_GPU

    o, _ = chunk_retention(c["q"], c["k"], c["v"])
    decay = retention_log_decay(H)[None, None, :].expand(2, length, H)
    attn = build_gla_attention("ret", query=f["q"], key=f["k"], value=f["v"], log_decay=decay)
    assert rel_err(attn.output(), _as_output(o.cpu())) < FLOAT32_GPU

    beta = torch.sigmoid(f["g"][..., 0])
    o, _ = fused_recurrent_delta_rule(c["q"], c["k"], c["v"], beta.cuda(), use_qk_l2norm_in_kernel=True)
    qh = _heads_first(l2_normalise(f["q"].double())) * DK**-0.5
    kh = _heads_first(l2_normalise(f["k"].double()))
    A = delta_rule_matrix(qh, kh, torch.zeros_like(qh[..., :1]), _heads_first(beta).double())
    ours = (A @ _heads_first(f["v"]).double()).transpose(1, 2)
    assert rel_err(ours, o.cpu()) < FLOAT32_GPU

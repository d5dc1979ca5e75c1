"""mamba-ssm's attention layer ``mamba_ssm.modules.mha.MHA`` (``MambaConfig.attn_layer_idx`` / ``attn_cfg``): capture
(captum_implicit.adapters.mamba_ssm) and LRP form (captum_implicit.lrp.mamba_ssm).

mamba-ssm cannot be imported on this CPU machine (no CUDA build). The CPU tests therefore use *stand-ins*: classes
carrying mamba-ssm's qualified names and attribute names whose forwards are **mamba-ssm 2.3.2.post1's own code,
copied below and restricted to what it runs with flash_attn and causal-conv1d absent** (``mha.py``: the SDPA paths;
``mamba_simple.py``: the unfused path; ``block.py`` / ``mixer_seq_simple.py``: ``fused_add_norm=False``). Rotary
needs flash_attn's ``RotaryEmbedding`` (mha.py asserts it is installed): its stand-in runs flash_attn's torch
reference maths (``apply_rotary_emb_torch``), not its Triton kernel. The Mamba stand-in's scan is mamba-ssm's
``selective_scan_ref`` (float64 kept for float64 inputs; the CUDA kernel refuses float64), installed as
``mamba_ssm.modules.mamba_simple.selective_scan_fn`` in a stand-in module for the test's duration so that the capture
records it as it records the real kernel.

The GPU tests at the bottom (marked ``gpu``; skipped without CUDA or mamba-ssm) run the real ``MambaLMHeadModel``
with ``attn_layer_idx=[1]``; the GPU machine has no flash_attn, so they keep ``rotary_emb_dim=0``.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("zennit")

from captum_implicit import Capture, ImplicitAttentionRollout, implicit_attention  # noqa: E402
from captum_implicit.core.errors import CaptureError  # noqa: E402
from captum_implicit.lrp import GatedLinearComposite, GatedLinearRules, LRPError, is_canonized  # noqa: E402
from captum_implicit.lrp.canonizers import find_lrp_form, mixers_without_lrp_form  # noqa: E402

from conftest import OutputRecorder, rel_err, requires_cuda  # noqa: E402
from _lrp_checks import (  # noqa: E402
    CONSERVE, FLOAT32, assert_restored, check_restored_after_context, model_state, rel_conservation,
)
from test_lrp_mamba_ssm import (  # noqa: E402
    VOCAB, _gpu_ids, _ids, check_conservation, relevance, zero_biases_but_dt,
)

EXAMPLES = min(settings().max_examples, 6)
SIMPLE = "mamba_ssm.modules.mamba_simple"


def _named(module: str, name: str, **attrs) -> type:
    return type(name, (nn.Module,), {"__module__": module, "__qualname__": name, **attrs})


# ============================================================================= copied reference code (mamba-ssm)
# --- flash_attn.layers.rotary (torch reference maths; the real module applies them in place with Triton)
def _rotate_half(x, interleaved=False):
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return rearrange(torch.stack((-x2, x1), dim=-1), "... d two -> ... (d two)", two=2)


def _apply_rotary_emb_torch(x, cos, sin, interleaved=False):
    ro_dim = cos.shape[-1] * 2
    cos = cos.repeat_interleave(2, -1) if interleaved else torch.cat([cos, cos], -1)
    sin = sin.repeat_interleave(2, -1) if interleaved else torch.cat([sin, sin], -1)
    cos, sin = cos[:, None], sin[:, None]  # "... d -> ... 1 (2 d)"
    return torch.cat([x[..., :ro_dim] * cos + _rotate_half(x[..., :ro_dim], interleaved) * sin, x[..., ro_dim:]],
                     dim=-1)


def _rotary_init(self, dim, base=10000.0, interleaved=False, device=None):
    nn.Module.__init__(self)
    self.dim, self.base, self.interleaved, self.scale_base = dim, float(base), interleaved, None
    inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    self.register_buffer("inv_freq", inv_freq, persistent=False)
    self.register_buffer("scale", None, persistent=False)


def _rotary_forward(self, q, kv, seqlen_offset=0, max_seqlen=None):
    length = max_seqlen if max_seqlen is not None else q.shape[1] + seqlen_offset
    freqs = torch.outer(torch.arange(length, device=q.device, dtype=torch.float32), self.inv_freq)
    cos, sin = torch.cos(freqs).to(q.dtype), torch.sin(freqs).to(q.dtype)
    cos, sin = cos[seqlen_offset: seqlen_offset + q.shape[1]], sin[seqlen_offset: seqlen_offset + q.shape[1]]
    q = _apply_rotary_emb_torch(q, cos, sin, self.interleaved)
    k = _apply_rotary_emb_torch(kv[:, :, 0], cos, sin, self.interleaved)
    return q, torch.stack([k, kv[:, :, 1]], dim=2)


RotaryEmbedding = _named("flash_attn.layers.rotary", "RotaryEmbedding", __init__=_rotary_init, forward=_rotary_forward)


# --- mamba_ssm/modules/mha.py (flash_attn and causal_conv1d absent)
def _update_kv_cache(kv, inference_params, layer_idx):
    num_heads, head_dim = kv.shape[-2:]
    assert layer_idx in inference_params.key_value_memory_dict
    kv_cache, _ = inference_params.key_value_memory_dict[layer_idx]
    batch_start = inference_params.batch_size_offset
    batch_end = batch_start + kv.shape[0]
    sequence_start = inference_params.seqlen_offset
    sequence_end = sequence_start + kv.shape[1]
    kv_cache[batch_start:batch_end, sequence_start:sequence_end, ...] = kv
    return kv_cache[batch_start:batch_end, :sequence_end, ...]


def _mha_init(self, embed_dim, num_heads, num_heads_kv=None, head_dim=None, mlp_dim=0, qkv_proj_bias=True,
              out_proj_bias=True, softmax_scale=None, causal=False, layer_idx=None, d_conv=0, rotary_emb_dim=0,
              rotary_emb_base=10000.0, rotary_emb_interleaved=False, device=None, dtype=None):
    factory_kwargs = {"device": device, "dtype": dtype}
    nn.Module.__init__(self)
    self.embed_dim = embed_dim
    self.layer_idx = layer_idx
    self.d_conv = d_conv
    self.rotary_emb_dim = rotary_emb_dim
    self.softmax_scale = softmax_scale
    self.causal = causal
    self.num_heads = num_heads
    self.num_heads_kv = num_heads_kv if num_heads_kv is not None else num_heads
    assert self.num_heads % self.num_heads_kv == 0
    self.head_dim = head_dim if head_dim is not None else self.embed_dim // num_heads
    self.mlp_dim = math.ceil(mlp_dim / 256) * 256
    qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
    out_dim = self.head_dim * self.num_heads
    if self.rotary_emb_dim > 0:
        self.rotary_emb = RotaryEmbedding(self.rotary_emb_dim, base=rotary_emb_base,
                                          interleaved=rotary_emb_interleaved, device=device)
    self.in_proj = nn.Linear(embed_dim, qkv_dim + self.mlp_dim, bias=qkv_proj_bias, **factory_kwargs)
    if self.d_conv > 0:
        self.conv1d = nn.Conv1d(qkv_dim, qkv_dim, kernel_size=self.d_conv, padding=self.d_conv - 1, groups=qkv_dim,
                                **factory_kwargs)
    self.out_proj = nn.Linear(out_dim + self.mlp_dim // 2, embed_dim, bias=out_proj_bias, **factory_kwargs)


def _mha_allocate_inference_cache(self, batch_size, max_seqlen, dtype=None):
    dtype = self.out_proj.weight.dtype if dtype is None else dtype
    device = self.out_proj.weight.device
    conv_state = (torch.zeros(batch_size, self.conv1d.weight.shape[0], self.d_conv, device=device, dtype=dtype)
                  if self.d_conv > 0 else None)
    kv_cache = torch.empty(batch_size, max_seqlen, 2, self.num_heads_kv, self.head_dim, dtype=dtype, device=device)
    return kv_cache, conv_state


def _mha_update_kv_cache(self, kv, inference_params):
    return _update_kv_cache(kv, inference_params, self.layer_idx)


def _mha_update_kvcache_attention(self, q, kv, inference_params):
    # flash_attn_with_kvcache is None: always the SDPA branch
    kv = self._update_kv_cache(kv, inference_params)
    k, v = kv.unbind(dim=-3)
    k = torch.repeat_interleave(k, dim=2, repeats=self.num_heads // self.num_heads_kv)
    v = torch.repeat_interleave(v, dim=2, repeats=self.num_heads // self.num_heads_kv)
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal, scale=self.softmax_scale
    ).transpose(1, 2)


def _mha_forward(self, x, inference_params=None):
    if inference_params is not None and self.layer_idx not in inference_params.key_value_memory_dict:
        inference_params.key_value_memory_dict[self.layer_idx] = self.allocate_inference_cache(
            x.shape[0], inference_params.max_seqlen, dtype=x.dtype)
    seqlen_offset = (0 if inference_params is None else (
        inference_params.lengths_per_sample if inference_params.lengths_per_sample is not None
        else inference_params.seqlen_offset))
    rotary_max_seqlen = inference_params.max_seqlen if inference_params is not None else None
    qkv = self.in_proj(x)
    if self.mlp_dim > 0:
        qkv, x_mlp = qkv.split([qkv.shape[-1] - self.mlp_dim, self.mlp_dim], dim=-1)
        x_mlp_up, x_mlp_gate = x_mlp.chunk(2, dim=-1)
        x_mlp = x_mlp_up * F.silu(x_mlp_gate)
    if self.d_conv > 0:
        assert inference_params is None or inference_params.seqlen_offset == 0  # (the step path is not copied)
        qkv = rearrange(self.conv1d(rearrange(qkv, "b s d -> b d s"))[..., :-(self.d_conv - 1)],
                        "b d s -> b s d").contiguous()
        if inference_params is not None:
            _, conv_state = inference_params.key_value_memory_dict[self.layer_idx]
            qkv_t = rearrange(qkv, "b l d -> b d l")
            conv_state.copy_(F.pad(qkv_t, (self.d_conv - qkv_t.shape[-1], 0)))
    q, kv = qkv.split([self.num_heads * self.head_dim, self.num_heads_kv * 2 * self.head_dim], dim=-1)
    q = rearrange(q, "... (h d) -> ... h d", d=self.head_dim)
    kv = rearrange(kv, "... (two hkv d) -> ... two hkv d", two=2, d=self.head_dim)
    # (flash_attn's fused rotary + kv-cache path, taken only when continuing with rotary_emb_dim % 16 == 0, is not
    # copied)
    assert (inference_params is None or inference_params.seqlen_offset == 0 or self.rotary_emb_dim == 0
            or self.rotary_emb_dim % 16 != 0)
    if self.rotary_emb_dim > 0:
        q, kv = self.rotary_emb(q, kv, seqlen_offset=seqlen_offset, max_seqlen=rotary_max_seqlen)
    if inference_params is None:
        k, v = kv.unbind(dim=-3)
        k = torch.repeat_interleave(k, dim=2, repeats=self.num_heads // self.num_heads_kv)
        v = torch.repeat_interleave(v, dim=2, repeats=self.num_heads // self.num_heads_kv)
        context = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal, scale=self.softmax_scale
        ).transpose(1, 2)
    else:
        context = self._update_kvcache_attention(q, kv, inference_params)
    context = rearrange(context, "... h d -> ... (h d)")
    if self.mlp_dim > 0:
        context = torch.cat([context, x_mlp], dim=-1)
    return self.out_proj(context)


MHA = _named("mamba_ssm.modules.mha", "MHA", __init__=_mha_init, forward=_mha_forward,
             allocate_inference_cache=_mha_allocate_inference_cache, _update_kv_cache=_mha_update_kv_cache,
             _update_kvcache_attention=_mha_update_kvcache_attention)


# --- mamba_ssm/ops/selective_scan_interface.py: selective_scan_ref (real A, B / C (b, N, L)), float64 kept
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    dtype_in = u.dtype
    work = torch.promote_types(torch.float32, dtype_in)  # the original: .float()
    u, delta = u.to(work), delta.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(work)
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    A, B, C = A.to(work), B.to(work), C.to(work)
    x = A.new_zeros((batch, dim, dstate))
    ys = []
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * rearrange(D.to(work), "d -> d 1")
    if z is not None:
        out = out * F.silu(z.to(work))
    out = out.to(dtype=dtype_in)
    return out if not return_last_state else (out, x)


# --- mamba_ssm/modules/mamba_simple.py: Mamba.forward, unfused path, causal_conv1d absent, no inference_params
def _mamba_forward(self, hidden_states, inference_params=None):
    assert inference_params is None
    batch, seqlen, dim = hidden_states.shape
    xz = rearrange(self.in_proj.weight @ rearrange(hidden_states, "b l d -> d (b l)"), "d (b l) -> b d l", l=seqlen)
    A = -torch.exp(self.A_log.float())
    x, z = xz.chunk(2, dim=1)
    x = self.act(self.conv1d(x)[..., :seqlen])
    x_dbl = self.x_proj(rearrange(x, "b d l -> (b l) d"))
    dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
    dt = self.dt_proj.weight @ dt.t()
    dt = rearrange(dt, "d (b l) -> b d l", l=seqlen)
    B = rearrange(B, "(b l) dstate -> b dstate l", l=seqlen).contiguous()
    C = rearrange(C, "(b l) dstate -> b dstate l", l=seqlen).contiguous()
    selective_scan_fn = sys.modules[SIMPLE].selective_scan_fn  # the module global (patched by a capture)
    y = selective_scan_fn(x, dt, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                          delta_softplus=True, return_last_state=False)
    return self.out_proj(rearrange(y, "b d l -> b l d"))


Mamba = _named(SIMPLE, "Mamba", forward=_mamba_forward)


# --- ops/triton/layer_norm.py RMSNorm (rms_norm_fn's maths: float32, float64 kept), block.py / mixer_seq_simple.py
def _rms_forward(self, x):
    work = torch.promote_types(torch.float32, x.dtype)
    h = x.to(work)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(work)).to(x.dtype)


def _block_forward(self, hidden_states, residual=None, inference_params=None, **mixer_kwargs):
    residual = (hidden_states + residual) if residual is not None else hidden_states  # fused_add_norm=False
    hidden_states = self.norm(residual.to(dtype=self.norm.weight.dtype))
    if self.residual_in_fp32:
        residual = residual.to(torch.float32)
    hidden_states = self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
    return hidden_states, residual  # mlp = None


def _mixer_model_forward(self, input_ids, inference_params=None, **mixer_kwargs):
    hidden_states = self.embedding(input_ids)
    residual = None
    for layer in self.layers:
        hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params, **mixer_kwargs)
    residual = (hidden_states + residual) if residual is not None else hidden_states
    return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))


def _lm_forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0, **mixer_kwargs):
    hidden_states = self.backbone(input_ids, inference_params=inference_params, **mixer_kwargs)
    return types.SimpleNamespace(logits=self.lm_head(hidden_states))


RMSNorm = _named("mamba_ssm.ops.triton.layer_norm", "RMSNorm", forward=_rms_forward)
Block = _named("mamba_ssm.modules.block", "Block", forward=_block_forward)
MixerModel = _named("mamba_ssm.models.mixer_seq_simple", "MixerModel", forward=_mixer_model_forward)
LMHead = _named("mamba_ssm.models.mixer_seq_simple", "MambaLMHeadModel", forward=_lm_forward)
# ============================================================================= end of copied reference code


@pytest.fixture
def scan_module(monkeypatch):
    """``mamba_ssm.modules.mamba_simple`` stand-in holding ``selective_scan_fn`` (and no causal-conv1d) while a test
    runs, so that a capture records the scan as it records mamba-ssm's kernel (the Mamba stand-in's plain forward
    needs it; under the composite only its form runs). Restored afterwards: with mamba-ssm installed (GPU machine)
    the real module is back in ``sys.modules``, never re-imported."""
    module = types.ModuleType(SIMPLE)
    module.selective_scan_fn, module.causal_conv1d_fn = selective_scan_ref, None
    monkeypatch.setitem(sys.modules, SIMPLE, module)
    yield module


def _set(module: nn.Module, **attrs) -> nn.Module:
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


def _spread(module: nn.Module, g: torch.Generator, scale: float = 0.5) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def make_mha(d_model=8, heads=2, heads_kv=None, head_dim=None, mlp_dim=0, d_conv=0, rotary=0, interleaved=False,
             causal=True, softmax_scale=None, layer_idx=0, seed=0, dtype=torch.float64, bias=True) -> nn.Module:
    torch.manual_seed(seed)
    mha = MHA(d_model, heads, num_heads_kv=heads_kv, head_dim=head_dim, mlp_dim=mlp_dim, d_conv=d_conv,
              rotary_emb_dim=rotary, rotary_emb_interleaved=interleaved, causal=causal, softmax_scale=softmax_scale,
              layer_idx=layer_idx, qkv_proj_bias=bias, out_proj_bias=bias, dtype=dtype)
    return _spread(mha, torch.Generator().manual_seed(seed)).eval()


def make_mamba(d_model=8, d_state=4, d_conv=3, expand=2, layer_idx=0, seed=0, dtype=torch.float64) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    d_inner, dt_rank = expand * d_model, 2
    m = _set(Mamba(), in_proj=nn.Linear(d_model, 2 * d_inner, bias=False, dtype=dtype),
             conv1d=nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, dtype=dtype),
             x_proj=nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False, dtype=dtype),
             dt_proj=nn.Linear(dt_rank, d_inner, dtype=dtype), out_proj=nn.Linear(d_inner, d_model, bias=False,
                                                                                  dtype=dtype),
             act=nn.SiLU(), activation="silu", d_state=d_state, d_conv=d_conv, dt_rank=dt_rank, d_inner=d_inner,
             layer_idx=layer_idx, use_fast_path=True)
    _spread(m, g)
    m.A_log = nn.Parameter(torch.log(torch.rand(d_inner, d_state, generator=g, dtype=dtype) + 0.5))
    m.D = nn.Parameter(torch.randn(d_inner, generator=g, dtype=dtype))
    return m


def hybrid(attn: dict, layers=("mamba", "mha", "mamba"), d_model=8, seed=0, dtype=torch.float64,
           zero_biases=False) -> nn.Module:
    """A ``MambaLMHeadModel`` stand-in: blocks with a Mamba or an MHA mixer (``attn`` = MHA kwargs)."""
    g = torch.Generator().manual_seed(seed)

    def rms():
        return _set(RMSNorm(), weight=nn.Parameter(1 + 0.2 * torch.randn(d_model, generator=g, dtype=dtype)),
                    bias=None, eps=1e-5, drop=None)

    blocks = []
    for i, kind in enumerate(layers):
        mixer = (make_mha(d_model, layer_idx=i, seed=seed + i, dtype=dtype, **attn) if kind == "mha"
                 else make_mamba(d_model, layer_idx=i, seed=seed + i, dtype=dtype))
        blocks.append(_set(Block(), norm=rms(), mixer=mixer, mlp=None, fused_add_norm=False, residual_in_fp32=False))
    embedding = nn.Embedding(VOCAB, d_model, dtype=dtype)
    _spread(embedding, g, 1.0)
    backbone = _set(MixerModel(), embedding=embedding, layers=nn.ModuleList(blocks), norm_f=rms(),
                    fused_add_norm=False, residual_in_fp32=False)
    head = nn.Linear(d_model, VOCAB, bias=False, dtype=dtype)
    _spread(head, g)
    model = _set(LMHead(), backbone=backbone, lm_head=head).eval()
    if zero_biases:
        zero_biases_but_dt(model)
    return model


def mha_configs():
    """MHA options: GQA (heads_kv), head_dim ≠ d_model / heads, mlp_dim (rounded up to 256 by MHA), d_conv, rotary
    (flash_attn's maths; partial or full head dim, interleaved or not), causal or not, softmax_scale."""
    return st.fixed_dictionaries({
        "heads": st.sampled_from([2, 4]),
        "heads_kv": st.sampled_from([None, 1, 2]),
        "head_dim": st.sampled_from([4, 6]),  # ≥ the rotary dim
        "mlp_dim": st.sampled_from([0, 20]),
        "d_conv": st.sampled_from([0, 3, 4]),
        "rotary": st.sampled_from([0, 2, 4]),
        "interleaved": st.booleans(),
        "causal": st.sampled_from([True, True, False]),
        "softmax_scale": st.sampled_from([None, 0.3]),
    })


# ============================================================================= capture
def _layer_input(d_model, batch, length, seed, dtype):
    return torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@settings(max_examples=EXAMPLES, deadline=None)
@given(cfg=mha_configs(), length=st.integers(1, 40), batch=st.integers(1, 2), seed=st.integers(0, 99))
def test_capture_exact_float64(cfg, length, batch, seed):
    """``output()`` = the real out_proj input (≤ 1e-10, float64); attention rows are the softmax rows (sum 1, causal
    when the layer is), the MLP half is the identity."""
    mha = make_mha(seed=seed, **cfg)
    x = _layer_input(8, batch, length, seed, torch.float64)
    with OutputRecorder(mha) as rec:
        (attn,) = implicit_attention(mha, x)
    real = rec.inputs[""]
    assert attn.family == "softmax" and attn.module_type == "MHA"
    assert rel_err(attn.output(), real) <= 1e-10
    hd = mha.num_heads * mha.head_dim
    assert attn.num_channels == hd + mha.mlp_dim // 2 == real.shape[-1]
    dense = attn.dense()
    assert torch.allclose(dense[:, :hd].sum(-1), torch.ones((), dtype=dense.dtype), atol=1e-12)  # softmax rows
    assert bool((dense[:, :hd] >= 0).all())
    if cfg["causal"]:
        assert attn.offset is None
        assert not dense[:, :hd].triu(1).any()
    if mha.mlp_dim:
        eye = torch.eye(length, dtype=dense.dtype).expand_as(dense[:, hd:])
        assert torch.equal(dense[:, hd:], eye)


@pytest.mark.parametrize("cfg", [dict(heads=4, heads_kv=2, head_dim=4, mlp_dim=20, d_conv=4, rotary=4),
                                 dict(heads=2, causal=False, softmax_scale=0.5)])
def test_capture_exact_float32(cfg):
    mha = make_mha(seed=3, dtype=torch.float32, **cfg)
    x = _layer_input(8, 2, 33, 3, torch.float32)
    with OutputRecorder(mha) as rec:
        (attn,) = implicit_attention(mha, x)
    assert rel_err(attn.output(), rec.inputs[""]) <= FLOAT32


def test_capture_sensitive_and_restored():
    """The check above sees a wrong detail (the scale SDPA got), and the capture restores SDPA and the module."""
    mha = make_mha(heads=2, softmax_scale=0.3, seed=1)
    x = _layer_input(8, 1, 12, 1, torch.float64)
    sdpa = F.scaled_dot_product_attention
    before = model_state(mha)
    with OutputRecorder(mha) as rec, Capture(mha) as cap, torch.no_grad():
        mha(x)
        assert F.scaled_dot_product_attention is not sdpa  # recorded while capturing
    assert F.scaled_dot_product_attention is sdpa
    assert_restored(mha, before)
    (attn,) = cap.layers
    assert rel_err(attn.output(), rec.inputs[""]) <= 1e-10
    mha.softmax_scale = None  # the same probabilities under another scale are not the layer's
    with torch.no_grad():
        other = implicit_attention(mha, x)[0]
    assert rel_err(other.output(), rec.inputs[""]) > 1e-3


def test_capture_refuses_cached_continuation():
    mha = make_mha(heads=2, seed=2)
    params = types.SimpleNamespace(max_seqlen=16, max_batch_size=1, seqlen_offset=0, batch_size_offset=0,
                                   lengths_per_sample=None, key_value_memory_dict={})
    x = _layer_input(8, 1, 6, 2, torch.float64)
    with OutputRecorder(mha) as rec:
        (attn,) = implicit_attention(mha, x, inference_params=params)  # a first call: the full square
    assert rel_err(attn.output(), rec.inputs[""]) <= 1e-10
    params.seqlen_offset = 6
    with pytest.raises(CaptureError, match="kv cache"):
        implicit_attention(mha, x[:, :1], inference_params=params)


# ============================================================================= hybrid: rollout includes MHA
ATTN = dict(heads=2, heads_kv=1, mlp_dim=20, d_conv=3, causal=True)


@pytest.mark.usefixtures("scan_module")
def test_hybrid_capture_in_forward_order_and_rollout():
    model = hybrid(ATTN)
    ids = _ids(2, 10, 0)
    with OutputRecorder(model) as rec:
        layers = implicit_attention(model, ids)
    names = [a.name for a in layers]
    assert names == ["backbone.layers.0.mixer", "backbone.layers.1.mixer", "backbone.layers.2.mixer"]
    assert [a.family for a in layers] == ["mamba", "softmax", "mamba"]
    for a in layers:
        assert rel_err(a.output(), rec.inputs[a.name]) <= 1e-10, a.name
    # rollout = rownorm(I + abs_mean A_l) multiplied from the last layer down, MHA included
    rollout = ImplicitAttentionRollout(lambda i: model(i).logits, model=model).attribute(ids)
    eye = torch.eye(10, dtype=torch.float64)

    def step(a):
        m = eye + a.dense().abs().mean(1)
        return m / m.sum(-1, keepdim=True)

    def manual(used):
        r = eye[-1].expand(2, -1)
        for a in reversed(used):
            r = torch.einsum("bs,bst->bt", r, step(a))
        return r

    assert torch.allclose(rollout.double(), manual(layers), atol=1e-12)
    assert not torch.allclose(rollout.double(), manual([layers[0], layers[2]]), atol=1e-3)  # MHA matters


# ============================================================================= LRP
def test_forms_registered_and_strict():
    model = hybrid(ATTN)
    assert find_lrp_form(model.backbone.layers[1].mixer) is not None
    assert mixers_without_lrp_form(model) == []


@pytest.mark.parametrize("cfg", [dict(heads=4, heads_kv=2, head_dim=4, mlp_dim=20, d_conv=4, rotary=4),
                                 dict(heads=2, rotary=2, interleaved=True, causal=False, softmax_scale=0.4),
                                 dict(heads=2, head_dim=6)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_form_values_equal_module(cfg, dtype):
    """Under the composite the MHA output is the module's: bit for bit (the form makes the module's own SDPA call on
    the same tensors; rotary: the same torch arithmetic)."""
    mha = make_mha(seed=5, dtype=dtype, **cfg)
    x = _layer_input(8, 2, 13, 5, dtype)
    with torch.no_grad():
        ref = mha(x)
        with GatedLinearComposite().context(mha):
            assert is_canonized(mha)
            out = mha(x)
    assert torch.equal(out, ref)


@pytest.mark.usefixtures("scan_module")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hybrid_logits_under_composite(dtype):
    """The whole hybrid under the composite: the MHA layer's output bit for bit (above); the Mamba form rounds u and B
    to float32 in a float64 model (as transformers' scan does; mamba-ssm's CUDA scan refuses float64) where this
    stand-in's scan keeps float64, and computes ``in_proj`` as a module call where mamba-ssm computes ``weight @ x``:
    ≤ 1e-6 (measured 7e-8 float64)."""
    model = hybrid(ATTN, dtype=dtype)
    ids = _ids(2, 9, 1)
    with torch.no_grad():
        ref = model(ids).logits
        with GatedLinearComposite().context(model):
            out = model(ids).logits
    assert out.dtype == dtype
    assert rel_err(out, ref) <= 1e-6


@settings(max_examples=EXAMPLES, deadline=None)
@given(cfg=mha_configs(), data=st.data())
def test_conservation_float64(cfg, data):
    model = hybrid(cfg, layers=data.draw(st.sampled_from([("mamba", "mha"), ("mha", "mamba", "mha")])),
                   seed=data.draw(st.integers(0, 50)), zero_biases=True)
    check_conservation(model, data, max_length=16)


# without the rule the relevance misses the logit by more than this
ABLATIONS = {"detach_softmax": 1e-3, "half_gate": 1e-3, "identity_act": 1e-3}


@pytest.mark.parametrize("rule", sorted(ABLATIONS))
def test_ablation(rule):
    """One MHA layer with the MLP half (Mamba form's rules switched off too for half_gate / identity_act, so the
    model is MHA-only here: the ablation measures the MHA form's rule)."""
    model = hybrid(dict(heads=2, heads_kv=1, mlp_dim=20, d_conv=3, rotary=4), layers=("mha",), seed=4,
                   zero_biases=True)
    ids, target = _ids(2, 9, 0), torch.tensor([3, 7])
    R, f, _ = relevance(model, ids, target)
    assert rel_conservation(R, f) <= CONSERVE
    R, f, _ = relevance(model, ids, target, GatedLinearComposite(GatedLinearRules().without(rule)))
    assert rel_conservation(R, f) > ABLATIONS[rule]


def test_bias_absorption():
    """With biases (qkv, conv, out_proj) the relevance plus what the biases absorb is the logit."""
    model = hybrid(dict(heads=2, mlp_dim=20, d_conv=3), layers=("mha",), seed=6)
    ids = _ids(1, 8, 6)  # target: token 5 at the last position
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    leaf = {}
    handle = model.backbone.embedding.register_forward_hook(
        lambda m, a, o: leaf.setdefault("e", o.detach().requires_grad_()))
    try:
        with GatedLinearComposite().context(model):
            f = model(ids).logits[0, -1, 5]
            grads = torch.autograd.grad(f, [leaf["e"], *biases])
    finally:
        handle.remove()
    absorbed = sum((b.detach() * g).sum() for b, g in zip(biases, grads[1:]))
    R, f = (leaf["e"] * grads[0]).sum().detach(), f.detach()
    assert abs(float((R + absorbed - f) / f)) <= CONSERVE
    assert abs(float(absorbed / f)) > 1e-6


def test_model_restored_and_cache():
    model = hybrid(ATTN, zero_biases=True)
    ids = _ids(2, 7, 2)
    check_restored_after_context(model, ids, logits=lambda m, x: m(x).logits)
    # MHA alone: a first call with inference_params fills the kv cache and conv state as the module does;
    # a continuation is refused
    mha = make_mha(heads=4, heads_kv=2, head_dim=4, d_conv=3, rotary=4, seed=7)
    x = _layer_input(8, 1, 6, 7, torch.float64)

    def params():
        return types.SimpleNamespace(max_seqlen=10, max_batch_size=1, seqlen_offset=0, batch_size_offset=0,
                                     lengths_per_sample=None, key_value_memory_dict={})

    ref_params, form_params = params(), params()
    with torch.no_grad():
        ref = mha(x, inference_params=ref_params)
        with GatedLinearComposite().context(mha):
            out = mha(x, inference_params=form_params)
            form_params.seqlen_offset = 6
            with pytest.raises(LRPError, match="cached state"):
                mha(x[:, :1], inference_params=form_params)
    assert torch.equal(out, ref)
    (kv_ref, conv_ref), (kv, conv) = ref_params.key_value_memory_dict[0], form_params.key_value_memory_dict[0]
    assert torch.equal(kv[:, :6], kv_ref[:, :6]) and torch.equal(conv, conv_ref)


# ============================================================================= GPU: the real mamba-ssm
GPU_ATTN = [  # attn_cfg variants (rotary_emb_dim = 0: the GPU machine has no flash_attn, which rotary needs)
    dict(num_heads=4, causal=True),
    dict(num_heads=4, num_heads_kv=2, causal=True, d_conv=4),
    dict(num_heads=4, num_heads_kv=1, causal=True, mlp_dim=64),
    dict(num_heads=2, head_dim=32, causal=True, d_conv=3, mlp_dim=64, softmax_scale=0.2),
]


def _real(attn_cfg: dict, layer: str = "Mamba1", seed: int = 0):
    """A tiny float32 CUDA ``MambaLMHeadModel`` with an MHA at layer 1 of 3."""
    pytest.importorskip("mamba_ssm")
    import importlib.util

    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    ssm_cfg = {"layer": layer, "d_state": 16}
    if layer == "Mamba2":
        mem_eff = importlib.util.find_spec("causal_conv1d") is not None
        ssm_cfg.update(headdim=32, chunk_size=64, use_mem_eff_path=mem_eff)
    cfg = MambaConfig(d_model=64, n_layer=3, vocab_size=64, d_intermediate=0, ssm_cfg=ssm_cfg, attn_layer_idx=[1],
                      attn_cfg=dict(attn_cfg), rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                      pad_vocab_size_multiple=8, tie_embeddings=True)
    torch.manual_seed(seed)
    return MambaLMHeadModel(cfg, device="cuda", dtype=torch.float32).eval()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("attn_cfg", GPU_ATTN)
def test_gpu_capture_exact(attn_cfg):
    """Every layer of the real model, MHA included (SDPA's CUDA kernels, causal-conv1d over qkv when installed),
    in forward order: ``output()`` = the real out_proj input ≤ 1e-4 (float32)."""
    model = _real(attn_cfg)
    ids = _gpu_ids(2, 100, 1)
    with OutputRecorder(model) as rec:
        layers = implicit_attention(model, ids)
    assert [a.module_type for a in layers] == ["Mamba", "MHA", "Mamba"]
    for a in layers:
        assert rel_err(a.output(), rec.inputs[a.name]) <= FLOAT32, (a.name, rel_err(a.output(), rec.inputs[a.name]))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("attn_cfg", GPU_ATTN)
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_gpu_lrp_logits_and_conservation(attn_cfg, layer):
    """Under the composite the logits are the real model's ≤ 1e-4 (TF32 off); float64 (pure-torch forms, biases
    zero) conserves ≤ 1e-8; the model is left as it was."""
    # Mamba2's SSD dots in IEEE float32, TF32 off: tests/conftest.py sets both for GPU runs
    model = _real(attn_cfg, layer)
    ids, target = _gpu_ids(2, 70, 2), torch.tensor([3, 7], device="cuda")
    before = model_state(model)
    with torch.no_grad():
        ref = model(ids).logits
        with GatedLinearComposite().context(model):
            assert is_canonized(model.backbone.layers[1].mixer)
            out = model(ids).logits
    assert rel_err(out, ref) < FLOAT32, rel_err(out, ref)
    assert_restored(model, before)
    zero_biases_but_dt(model)
    model.double()
    R, f, _ = relevance(model, ids, target)
    assert f.dtype == torch.float64
    assert rel_conservation(R, f) <= CONSERVE

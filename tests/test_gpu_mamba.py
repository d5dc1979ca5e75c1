"""Mamba family on the GPU, against the real fused CUDA kernels (run on the GPU machine; skipped without CUDA).

Bounds: float32 ≤ 1e-4 relative. bf16 models round every intermediate (in_proj output, conv, scan output)
to 8 mantissa bits while the explanation is computed in float32 from the captured bf16 tensors, so the
agreement is at bf16 resolution: ≤ 3e-2 relative to the largest entry (bf16 epsilon is 7.8e-3).
"""

from __future__ import annotations

import pytest
import torch
from conftest import OutputRecorder, rel_err, requires_cuda

import captum_implicit as ci

pytestmark = [pytest.mark.gpu, requires_cuda]

LENGTHS = [1, 17, 512, 4096]
BOUND = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _mamba_ssm():
    return pytest.importorskip("mamba_ssm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", LENGTHS)
def test_mamba_ssm_module_fused_path(dtype, length):
    _mamba_ssm()
    from mamba_ssm import Mamba

    torch.manual_seed(0)
    mixer = Mamba(d_model=256, d_state=16, d_conv=4, expand=2, layer_idx=0).cuda().to(dtype).eval()
    with torch.no_grad():
        mixer.D.normal_()
        mixer.conv1d.bias.normal_()
    x = torch.randn(2, length, 256, device="cuda", dtype=dtype)
    assert mixer.use_fast_path
    with torch.no_grad():
        fused = mixer(x)  # the fused mamba_inner_fn path, as users run it
    with OutputRecorder(mixer) as rec:
        (la,) = ci.implicit_attention(mixer, x)
    assert mixer.use_fast_path, "the capture must restore the fast path"
    assert la.dtype == torch.float32
    assert rel_err(la.output(), rec.inputs[""].float()) <= BOUND[dtype]
    # and through the output projection, against the fused kernel's own output
    with torch.no_grad():
        projected = torch.nn.functional.linear(la.output(), mixer.out_proj.weight.float())
    assert rel_err(projected, fused.float()) <= BOUND[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mamba_ssm_lm_head_model(dtype):
    _mamba_ssm()
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=128, n_layer=2, vocab_size=256, ssm_cfg={"layer": "Mamba1"})
    model = MambaLMHeadModel(cfg, device="cuda", dtype=dtype).eval()
    ids = torch.randint(0, 256, (2, 1024), device="cuda")
    with OutputRecorder(model) as rec:
        layers = ci.implicit_attention(model, ids)
    assert [la.name for la in layers] == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    for la in layers:
        assert rel_err(la.output(), rec.inputs[la.name].float()) <= BOUND[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", LENGTHS)
def test_hf_mamba_on_cuda(dtype, length):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MambaConfig(hidden_size=128, state_size=16, num_hidden_layers=2, vocab_size=256)
    model = tf.MambaForCausalLM(cfg).cuda().to(dtype).eval()
    ids = torch.randint(0, 256, (2, length), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, : length // 3] = 0
    with OutputRecorder(model) as rec:
        with ci.Capture(model) as cap, torch.no_grad():
            model(ids, attention_mask=mask, use_cache=False)
    for rec_ in cap.recordings:
        scans = rec_.calls_of("mamba_selective_scan")
        try:
            import mamba_ssm  # noqa: F401

            assert scans and not any(c.torch_fallback for c in scans), "expected the CUDA selective scan to run"
        except ImportError:
            pass
    for la in cap.layers:
        assert rel_err(la.output(), rec.inputs[la.name].float()) <= BOUND[dtype]


def test_views_agree_with_dense_on_cuda():
    import transformers as tf

    torch.manual_seed(0)
    model = tf.MambaForCausalLM(tf.MambaConfig(hidden_size=64, state_size=16, num_hidden_layers=1, vocab_size=64))
    model = model.cuda().eval()
    (la,) = ci.implicit_attention(model, torch.randint(0, 64, (1, 600), device="cuda"))
    dense = la.dense()
    assert rel_err(la.aggregate("abs_mean"), dense.abs().mean(1)) < 1e-5
    assert rel_err(la.row(599, reduce="mean"), dense[:, :, 599].mean(1)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_factors_are_refused_on_cuda(dtype, bad):
    """On CUDA (fused kernels where installed), a NaN or an infinity in one layer's factors is refused with the
    layer's name: the capture reads every layer's largest magnitudes at once (a NaN must propagate through the
    device's maximum); the finite model passes."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MambaConfig(hidden_size=64, state_size=8, num_hidden_layers=3, vocab_size=64)
    model = tf.MambaForCausalLM(cfg).cuda().to(dtype).eval()
    ids = torch.randint(0, 64, (2, 40), device="cuda")
    assert len(ci.implicit_attention(model, ids, use_cache=False)) == 3
    with torch.no_grad():
        model.backbone.layers[1].mixer.D[5] = bad  # the skip factor of one channel: layer 1 alone
    with pytest.raises(ci.NonFiniteError, match=r"backbone\.layers\.1\.mixer"):
        ci.implicit_attention(model, ids, use_cache=False)

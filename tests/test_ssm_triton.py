"""The Triton kernel of the Mamba family (ops/ssm_triton.py) against the torch reference path.

Both compute the same matrix in float32; they differ only in rounding order (the kernel contracts the
state dimension in one IEEE float32 dot, the reference through float64 exponentials cast to float32),
so agreement is at float32 rounding: ≤ 1e-5 relative to the largest entry.

On the GPU machine the kernel runs compiled; on CPU (CI) one small case runs in Triton's interpreter
(``TRITON_INTERPRET=1``, in a subprocess because the variable is read when kernels are defined).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err, requires_cuda

import captum_implicit as ci
from captum_implicit.config import blockwise
from captum_implicit.layers.mamba import build_mamba_attention

REDUCTIONS = ["mean", "sum", "abs_mean", "positive_mean", "positive_sum", "max_abs"]
BOUND = 1e-5


def random_mamba_attention(
    device: str, *, batch=2, channels=6, length=150, state=5, taps=4, heads=1, skip=True, conv=True, gate=True,
    rate_scale=3.0, seed=0,
):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    bc_shape = (batch, heads, state, length) if heads > 1 else (batch, state, length)
    return build_mamba_attention(
        "mixer",
        u=rnd(batch, channels, length),
        dt=rnd(batch, channels, length),
        A=-(torch.rand(channels, state, generator=g) * rate_scale).to(device),
        B=rnd(*bc_shape),
        C=rnd(*bc_shape),
        D=rnd(channels) if skip else None,
        z=rnd(batch, channels, length) if gate else None,
        delta_bias=None,
        delta_softplus=True,
        conv_input=rnd(batch, channels, length) if conv else None,
        conv_weight=rnd(channels, taps) if conv else None,
        conv_bias=rnd(channels) if conv else None,
        torch_scan_casts=False,
        head_of=torch.randint(0, heads, (channels,), generator=g).to(device) if heads > 1 else None,
    )


def compare_with_reference(attn) -> None:
    """Kernel (default path) against the torch reference for dense and every reduction, ± gradient."""
    with blockwise(triton=False):
        ref_dense = attn.dense()
    assert rel_err(attn.dense(), ref_dense) <= BOUND
    grad = torch.randn(attn.values.shape, generator=torch.Generator().manual_seed(1)).to(attn.device)
    for reduce in REDUCTIONS:
        for g in (None, grad):
            with blockwise(triton=False):
                ref = attn.aggregate(reduce, grad=g)
            assert rel_err(attn.aggregate(reduce, grad=g), ref) <= BOUND, (reduce, g is not None)


CASES = {
    "conv-skip-gate": {},
    "no-conv": dict(conv=False),
    "no-skip-no-gate": dict(skip=False, gate=False),
    "multi-head": dict(heads=3, length=70),
    "state16-long": dict(state=16, channels=3, length=600, batch=1),
    "one-token": dict(length=1),
    "two-taps": dict(taps=2, length=65),
}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference_on_gpu(case):
    attn = random_mamba_attention("cuda", **CASES[case])
    compare_with_reference(attn)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("rate_scale", [3.0, 1e4], ids=["moderate", "huge"])
def test_kernel_per_entry_form_next_to_the_diagonal(rate_scale, monkeypatch):
    """Decays so fast that e^{|a|·Δ} overflows float32 within one token: the tiles next to the diagonal take
    the per-entry form (forced for moderate decays too), and the result still equals the reference."""
    from captum_implicit.ops import ssm_triton

    monkeypatch.setattr(ssm_triton, "FORCE_NEAR_EXACT", True)
    compare_with_reference(random_mamba_attention("cuda", rate_scale=rate_scale, length=150))


@pytest.mark.gpu
@requires_cuda
def test_attn_grad_same_with_and_without_kernel_on_hf_mamba():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MambaConfig(hidden_size=64, state_size=16, num_hidden_layers=3, vocab_size=128)
    model = tf.MambaForCausalLM(cfg).cuda().eval()
    ids = torch.randint(0, 128, (2, 300), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    explainer = ci.ImplicitAttnGrad(model)
    fast = explainer.attribute(ids, target=5, additional_forward_args=(mask,))
    with blockwise(triton=False):
        slow = explainer.attribute(ids, target=5, additional_forward_args=(mask,))
    assert rel_err(fast, slow) <= BOUND


def test_kernel_logic_in_triton_interpreter():
    """CI has no GPU: run one small case of the kernel in Triton's CPU interpreter."""
    pytest.importorskip("triton")
    code = (
        "import sys; sys.path.insert(0, 'tests'); import test_ssm_triton as t; "
        "from captum_implicit.ops import ssm_triton; ssm_triton.BLOCK = 16; "  # 16-token tiles: far tiles exist
        "a = t.random_mamba_attention('cpu', channels=3, length=40, state=3, batch=1); "
        "t.compare_with_reference(a); "  # several channels per program (dense and reductions)
        "ssm_triton.FAR_PRODUCT = 'register'; t.compare_with_reference(a); ssm_triton.FAR_PRODUCT = 'split'; "
        "ssm_triton.FACTOR_ELEMENTS = 40 * 16; t.compare_with_reference(a); "  # one channel per launch
        "huge = t.random_mamba_attention('cpu', channels=2, length=40, state=3, batch=1, rate_scale=1e4); "
        "assert ssm_triton._block_for(huge.cum, huge.rate, 4, 40) is None; t.compare_with_reference(huge); "
        "print('ok')"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr

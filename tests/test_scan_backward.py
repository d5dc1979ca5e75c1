"""The linear-cost backward of HF Mamba's torch scan (adapters/_scan_backward.py): same forward bits, same
gradients as autograd through the original fallback."""

from __future__ import annotations

import pytest
import torch

tf = pytest.importorskip("transformers")
from transformers.models.mamba import modeling_mamba  # noqa: E402

from captum_implicit.adapters._scan_backward import linear_backward_scan  # noqa: E402
from captum_implicit.core.capture import torch_fallback_of  # noqa: E402
from captum_implicit.ops.hf_scans import mamba_selective_scan_unbound  # noqa: E402

FALLBACK = torch_fallback_of(modeling_mamba.mamba_selective_scan) or modeling_mamba.mamba_selective_scan


def _inputs(dtype: torch.dtype, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, d, n, length = 2, 5, 3, 11

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    return dict(
        hidden_states=r(b, d, length), dt=r(b, d, length),
        A=(-torch.rand(d, n, generator=g, dtype=dtype)).requires_grad_(),
        B=r(b, n, length), C=r(b, n, length), D=r(d), z=r(b, d, length), delta_bias=r(d),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("last_state", [False, True])
def test_same_forward_bits_and_gradients(dtype: torch.dtype, last_state: bool) -> None:
    fast = linear_backward_scan(FALLBACK)
    results = []
    for fn in (FALLBACK, fast):
        inp = _inputs(dtype, 0)
        out = fn(**inp, delta_softplus=True, return_last_state=last_state)
        outs = out if last_state else (out,)
        weights = [
            torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=dtype) for i, o in enumerate(outs)
        ]
        loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
        grads = torch.autograd.grad(loss, list(inp.values()))
        results.append(([o.detach() for o in outs], grads))
    (ref_out, ref_grads), (out, grads) = results
    assert all(torch.equal(a, b) for a, b in zip(ref_out, out, strict=True))  # the forward is the fallback's own
    # the backward differentiates its linear-cost mirror only where the mirror has the fallback's bits (else the
    # fallback itself, and the gradients above would compare autograd with itself): make sure it is the mirror
    with torch.no_grad():
        inp = _inputs(dtype, 0)
        mirror = mamba_selective_scan_unbound(**inp, delta_softplus=True, return_last_state=True)
        own = FALLBACK(**inp, delta_softplus=True, return_last_state=True)
    assert all(torch.equal(a, b) for a, b in zip(mirror, own, strict=True))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(ref_grads, grads, strict=True):
        assert torch.allclose(a, b, rtol=tol, atol=tol * float(a.abs().max()))


def test_other_arithmetic_falls_back_to_the_fallbacks_own_gradient() -> None:
    calls = []

    def other(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
              return_last_state=False):  # not what _scan mirrors: its backward must differentiate this function
        calls.append(1)
        out, state = FALLBACK(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
        return (out * 2, state) if return_last_state else out * 2

    fast = linear_backward_scan(other)
    inp = _inputs(torch.float64, 1)
    out = fast(**inp, delta_softplus=True, return_last_state=False)
    (g_fast,) = torch.autograd.grad(out.sum(), [inp["hidden_states"]])
    inp2 = _inputs(torch.float64, 1)
    (g_ref,) = torch.autograd.grad(other(**inp2, delta_softplus=True).sum(), [inp2["hidden_states"]])
    assert torch.allclose(g_fast, g_ref, rtol=1e-12, atol=1e-12) and len(calls) >= 3


def test_no_grad_runs_the_fallback_unchanged() -> None:
    fast = linear_backward_scan(FALLBACK)
    inp = _inputs(torch.float32, 2)
    with torch.no_grad():
        assert torch.equal(fast(**inp, delta_softplus=True), FALLBACK(**inp, delta_softplus=True))

"""transformers' pure-torch Mamba scan restated with ``unbind`` / ``stack``: bit-identical outputs, a linear-cost
backward. Used by the capture's backward (``adapters/_scan_backward.py``, checked bit for bit against the model's
own output) and by the zoo's training-only speed-up (``zoo/_fastscan.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mamba_selective_scan_unbound(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                 return_last_state=False, **kwargs):
    """transformers' ``mamba_selective_scan`` (its sequential branch: the same float operations in the same order),
    reading the tokens through one ``unbind`` and joining them with one ``stack`` instead of one index per token, so
    its backward costs O(L) instead of O(L²) full-size passes. hidden_states, dt, z: (b, d, L); B, C: (b, N, L).
    Returns the output (b, d, L), and the last state (b, d, N) with ``return_last_state``."""
    batch_size, intermediate_size, _ = hidden_states.shape
    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    B, C = B.transpose(1, 2), C.transpose(1, 2)
    discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    deltaB_u = dt[:, :, :, None] * B[:, None, :, :].float() * hidden_states[:, :, :, None].float()
    ssm_state = torch.zeros(batch_size, intermediate_size, A.shape[-1], dtype=input_dtype, device=hidden_states.device)
    outs = []
    for a, bu, c in zip(discrete_A.unbind(2), deltaB_u.unbind(2), C.unbind(1), strict=True):
        ssm_state = a * ssm_state + bu
        outs.append(torch.matmul(ssm_state.to(input_dtype), c.unsqueeze(-1))[:, :, 0])
    scan_output = torch.stack(outs, dim=-1)
    if D is not None:
        scan_output = scan_output + hidden_states * D[None, :, None]
    if z is not None:
        scan_output = scan_output * F.silu(z)
    return (scan_output, ssm_state) if return_last_state else scan_output

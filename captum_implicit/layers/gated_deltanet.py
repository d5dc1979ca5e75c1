"""Gated DeltaNet (and the delta-rule machinery KDA reuses): exact implicit attention.

The gated delta rule ``S_t = e^{g_t}(I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t``
(zero initial state) is linear in ``v`` once the gates are frozen. Per value head::

    A = (Q̂K̂ᵀ ⊙ Γ) · (I + tril_{−1}(diag(β)(K̂K̂ᵀ ⊙ Γ)))^{−1} · diag(β),      o = A v

with ``Q̂ = l2(q)/√dk``, ``K̂ = l2(k)``, ``Γ[t, s] = exp(Σ_{r=s+1..t} g_r)``. KDA has one
log-decay per key channel, so the Hadamard products become
``Σ_i q̂_{t,i} k̂_{s,i} exp(G_{t,i} − G_{s,i})`` (``G = cumsum g``); both cases are computed by
:func:`decayed_products`, which never exponentiates a positive number (pivot factorisation
below the diagonal, masked exponent on it) — the ``(q·e^{G})(k·e^{−G})ᵀ`` factorisation
overflows for long inputs and is not used.

Channels are (value head, value dim) pairs, ``C = H·dv``, each with ``dv = 1``: all channels
of a head share the head's matrix, and the model's gated output norm
``w ⊙ rms(o) ⊙ act(z)`` (RMS frozen) is a per-channel row scale. The values are ``v``
after the conv and its SiLU (the conv and activation also feed q and k, so they are part
of the data-dependent gates, not of ``A``).

Memory: the inverse is global (every column depends on all earlier rows), so the per-head
matrix ``(b, H, L, L)`` is computed once, lazily, by one ``solve_triangular`` per head (no
explicit inverse) in float64, and stored in the compute dtype. That is ``dv`` times smaller
than the dense per-channel matrix ``(b, C, L, L)``; transient memory is three float64
``(b, L, L)`` matrices per head, plus ``(b, 64, 64, dk)`` for the per-key-channel decays of KDA.
Tiles, rows and channel reductions are then slices of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.attention import Channels, LayerAttention


def decayed_products(
    a: Tensor, b: Tensor, cum: Tensor, strict: bool = False, chunk: int = 64, row_cum: Tensor | None = None
) -> Tensor:
    """``out[..., t, s] = Σ_i a[t, i] · b[s, i] · exp(cum[t, i] − cum[s, i])`` below the diagonal.

    Parameters
    ----------
    a, b : (..., L, dk)
    cum : (..., L, dk) or (..., L, 1)
        Cumulative log-decays (non-increasing in ``t``), float64; a trailing 1 broadcasts one
        decay over all key channels (Gated DeltaNet).
    strict : bool
        Keep only ``s < t`` (else ``s ≤ t``).
    chunk : int
        Row block size; columns left of a block are factorised through the pivot
        ``p = r0 − 1`` (``exp(cum_t − cum_p) · exp(cum_p − cum_s)``, both exponents ≤ 0), the
        block's own columns use the masked exponent.
    row_cum : (..., L, dk) or (..., L, 1), optional
        Cumulative log-decays on the row side, ``exp(row_cum[t] − cum[s])`` instead (RWKV-6:
        ``row_cum[t] = cum[t − 1]``, with ``strict``); must satisfy ``row_cum[t] ≤ cum[s]`` wherever used.

    Returns
    -------
    (..., L, L), zero above the diagonal (and on it when ``strict``).
    """
    length = a.shape[-2]
    rcum = cum if row_cum is None else row_cum
    out = a.new_zeros(*a.shape[:-2], length, length)
    keep = torch.ones(chunk, chunk, dtype=torch.bool, device=a.device).tril(-1 if strict else 0)
    for r0 in range(0, length, chunk):
        r1 = min(r0 + chunk, length)
        if r0 > 0:
            pivot = cum[..., r0 - 1 : r0, :]
            left = a[..., r0:r1, :] * torch.exp(rcum[..., r0:r1, :] - pivot)
            right = b[..., :r0, :] * torch.exp(pivot - cum[..., :r0, :])
            out[..., r0:r1, :r0] = left @ right.transpose(-1, -2)
        n = r1 - r0
        expo = rcum[..., r0:r1, None, :] - cum[..., None, r0:r1, :]  # (..., n, n, dk)
        expo = expo.masked_fill(~keep[:n, :n, None], float("-inf"))
        out[..., r0:r1, r0:r1] = (a[..., r0:r1, None, :] * b[..., None, r0:r1, :] * torch.exp(expo)).sum(-1)
    return out


def delta_rule_matrix(query: Tensor, key: Tensor, cum: Tensor, beta: Tensor) -> Tensor:
    """Per-head implicit attention of the (gated) delta rule, float64.

    ``A = QK · (I + tril_{−1}(diag(β) KK))^{−1} · diag(β)`` via one triangular solve from the
    right (``X M = QK``), never an explicit inverse.

    Parameters
    ----------
    query : (..., L, dk)
        Normalised and scaled queries ``Q̂``.
    key : (..., L, dk)
        Normalised keys ``K̂``.
    cum : (..., L, dk) or (..., L, 1)
        Cumulative log-decays.
    beta : (..., L)

    Returns
    -------
    (..., L, L)
    """
    q, k, c, bt = (t.to(torch.float64) for t in (query, key, cum, beta))
    qk = decayed_products(q, k, c)
    system = decayed_products(k, k, c, strict=True) * bt[..., :, None]
    # unitriangular: the (zero) diagonal of ``system`` is read as 1, giving I + tril_{-1}(...)
    solved = torch.linalg.solve_triangular(system, qk, upper=False, left=False, unitriangular=True)
    return solved * bt[..., None, :]


class DeltaRuleAttention(LayerAttention):
    """Implicit attention of a Gated DeltaNet layer (per-key-channel decay: :class:`~.kda.KDAAttention`).

    Factors (``b`` batch, ``H`` value heads, ``L`` tokens, ``dk`` key dim, ``dv`` value dim):

    * ``query``, ``key`` ``(b, H, L, dk)`` — ``Q̂`` and ``K̂`` (GQA key heads already repeated);
    * ``cum`` ``(b, H, L, 1)`` (GDN) or ``(b, H, L, dk)`` (KDA), float64 — cumulative log-decays;
    * ``beta`` ``(b, H, L)``;
    * ``values`` ``(b, H·dv, L, 1)``; ``row_scale`` ``(b, H·dv, L)`` — the frozen gated norm.

    The per-head matrix is computed on first use (see the module docstring for memory).
    """

    family = "gated_deltanet"

    def __init__(
        self,
        name: str,
        values: Tensor,
        query: Tensor,
        key: Tensor,
        cum: Tensor,
        beta: Tensor,
        row_scale: Tensor | None,
        module_type: str = "",
    ) -> None:
        super().__init__(name, values, row_scale=row_scale, module_type=module_type)
        self.query = query
        self.key = key
        self.cum = cum
        self.beta = beta
        self.head_dim_v = values.shape[1] // query.shape[1]
        self._head_matrix: Tensor | None = None

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    def head_matrix(self) -> Tensor:
        """The per-head implicit attention ``(b, H, L, L)`` (computed once, one head at a time)."""
        if self._head_matrix is None:
            heads = [
                delta_rule_matrix(self.query[:, h], self.key[:, h], self.cum[:, h], self.beta[:, h]).to(self.dtype)
                for h in range(self.num_heads)
            ]
            self._head_matrix = torch.stack(heads, dim=1)
        return self._head_matrix

    def core_block(self, channels: Channels, rows: slice, cols: slice) -> Tensor:
        heads = torch.arange(self.num_channels, device=self.device)[channels] // self.head_dim_v
        return self.head_matrix()[:, :, rows, cols][:, heads]



def l2_normalise(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(Σx² + eps)`` over the last dim (transformers' and fla's kernel normalisation)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_norm_scale(
    out: Tensor, gate: Tensor, weight: Tensor, eps: float, activation: str, dtype: torch.dtype
) -> Tensor:
    """Frozen gated RMSNorm as a per-element factor: ``w ⊙ rsqrt(mean(o²) + eps) ⊙ act(z)``.

    Reductions and the gate activation run in float32, as in every transformers gated norm.

    Parameters
    ----------
    out, gate : (b, L, H, dv)
    weight : (dv,)

    Returns
    -------
    (b, H·dv, L)
    """
    o32 = out.to(torch.float32)
    rms = torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + eps)
    act = torch.sigmoid if activation == "sigmoid" else F.silu
    scale = weight.to(dtype) * rms.to(dtype) * act(gate.to(torch.float32)).to(dtype)
    b, length = scale.shape[:2]
    return scale.reshape(b, length, -1).transpose(1, 2)


def build_delta_rule_attention(
    name: str,
    *,
    cls: type[DeltaRuleAttention],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    g: Tensor,
    beta: Tensor,
    use_l2norm: bool,
    norm_out: Tensor | None,
    norm_gate: Tensor | None,
    norm_weight: Tensor | None,
    norm_eps: float,
    norm_activation: str,
    module_type: str = "",
) -> DeltaRuleAttention:
    """Assemble a delta-rule attention from the kernel's arguments and the output norm's inputs.

    Parameters
    ----------
    query, key : (b, L, Hk, dk)
        Kernel inputs (post-conv, post-SiLU, not yet normalised).
    value : (b, L, Hv, dv)
    g : (b, L, Hv) or (b, L, Hv, dk)
        Log-decays (≤ 0).
    beta : (b, L, Hv)
    norm_out, norm_gate : (b, L, Hv, dv) or anything reshaping to it, optional
        Inputs of the gated output norm (kernel output and gate pre-activation).
    """
    dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    bsz, length, hv, dv = value.shape
    hk = key.shape[2]
    # the kernels cast q, k, g, β to float32 before anything else; mirror that rounding
    q, k = query.float(), key.float()
    if use_l2norm:
        q, k = l2_normalise(q.double()), l2_normalise(k.double())
    q = q.double() * q.shape[-1] ** -0.5
    k = k.double()
    if hk != hv:  # grouped heads: each key head serves hv/hk consecutive value heads
        q = q.repeat_interleave(hv // hk, dim=2)
        k = k.repeat_interleave(hv // hk, dim=2)
    log_decay = g.float().double()
    if log_decay.dim() == 3:
        log_decay = log_decay[..., None]
    cum = torch.cumsum(log_decay.transpose(1, 2), dim=2)  # (b, H, L, 1 | dk)
    values = value.to(dtype).permute(0, 2, 3, 1).reshape(bsz, hv * dv, length)[..., None]
    row_scale = None
    if norm_out is not None and norm_weight is not None and norm_gate is not None:
        row_scale = gated_norm_scale(
            norm_out.reshape(bsz, length, hv, dv),
            norm_gate.reshape(bsz, length, hv, dv),
            norm_weight,
            norm_eps,
            norm_activation,
            dtype,
        )
    return cls(
        name=name,
        values=values,
        query=q.transpose(1, 2).contiguous(),
        key=k.transpose(1, 2).contiguous(),
        cum=cum,
        beta=beta.float().double().transpose(1, 2).contiguous(),
        row_scale=row_scale,
        module_type=module_type,
    )

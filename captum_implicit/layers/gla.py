"""Gated linear attention and its relatives (flash-linear-attention's GLA, HGRN2, RetNet, RWKV-6).

All four keep a matrix state ``S_t = diag(e^{g_t}) S_{t−1} + k_t v_tᵀ`` (one log-decay per key
channel, or one per head) and read it with a query; with the gates frozen the output is linear in
``v``. Per head, with ``G = cumsum g`` per key channel ``i`` and the kernel's ``scale``::

    GLA / HGRN2 / RetNet:  A[t, s] = scale · Σ_i q_{t,i} k_{s,i} exp(G_{t,i} − G_{s,i})           (s ≤ t)
    RWKV-6 (bonus u):      A[t, s] = scale · Σ_i q_{t,i} k_{s,i} exp(G_{t−1,i} − G_{s,i})         (s < t)
                           A[t, t] = scale · Σ_i q_{t,i} u_i k_{t,i}

(RWKV-6 reads the state *before* the decay of step ``t`` and adds the current token with the bonus
``u``.) HGRN2 is GLA with ``k = 1 − e^{g}``; RetNet is GLA with the fixed per-head decay
``g = log(1 − 2^{−5−h})``. The exponent ``G_t − G_s`` is formed inside the key-channel sum
(:func:`~.gated_deltanet.decayed_products`: pivot-factorised, never a positive exponent), never
as ``(q·e^{G})(k·e^{−G})ᵀ``, which overflows for long inputs.

Channels are (head, value dim) pairs with ``dv = 1``, as for the delta rule; an output norm/gate
applied before the output projection is a frozen per-channel row scale. Memory: the per-head
matrix ``(b, H, L, L)`` is computed once, lazily, in float64 and stored in the compute dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.attention import Channels, LayerAttention
from .gated_deltanet import decayed_products


def gla_matrix(query: Tensor, key: Tensor, cum: Tensor, bonus: Tensor | None = None) -> Tensor:
    """Per-head implicit attention of gated linear attention, float64.

    Parameters
    ----------
    query : (..., L, dk)
        Queries with the kernel's scale folded in.
    key : (..., L, dk)
    cum : (..., L, dk) or (..., L, 1)
        Cumulative log-decays (non-increasing in ``t``).
    bonus : (dk,) or (..., dk), optional
        RWKV-6's ``u``: the state is read before step ``t``'s decay and the current token enters
        with weight ``u`` (see the module docstring).

    Returns
    -------
    (..., L, L)
    """
    q, k, c = (t.to(torch.float64) for t in (query, key, cum))
    if bonus is None:
        return decayed_products(q, k, c)
    row_cum = torch.cat([torch.zeros_like(c[..., :1, :]), c[..., :-1, :]], dim=-2)  # G_{t−1}, G_{−1} = 0
    out = decayed_products(q, k, c, strict=True, row_cum=row_cum)
    diag = (q * bonus.to(torch.float64).unsqueeze(-2) * k).sum(-1)
    return out + torch.diag_embed(diag)


class GLAAttention(LayerAttention):
    """Implicit attention of a gated-linear-attention layer (GLA, HGRN2, RetNet, RWKV-6).

    Factors (``b`` batch, ``H`` heads, ``L`` tokens, ``dk`` key dim, ``dv`` value dim):

    * ``query`` ``(b, H, L, dk)`` float64, the kernel's scale folded in; ``key`` ``(b, H, L, dk)`` float64;
    * ``cum`` ``(b, H, L, dk)`` or ``(b, H, L, 1)`` float64 — cumulative log-decays;
    * ``bonus`` ``(H, dk)`` or None — RWKV-6's ``u``;
    * ``values`` ``(b, H·dv, L, 1)``; ``row_scale`` ``(b, H·dv, L)`` or None.
    """

    family = "gla"

    def __init__(
        self,
        name: str,
        values: Tensor,
        query: Tensor,
        key: Tensor,
        cum: Tensor,
        bonus: Tensor | None = None,
        row_scale: Tensor | None = None,
        module_type: str = "",
        family: str | None = None,
    ) -> None:
        super().__init__(name, values, row_scale=row_scale, module_type=module_type)
        if family is not None:
            self.family = family  # "gla", "hgrn2", "retnet" or "rwkv6": same matrix, different layer
        self.query, self.key, self.cum, self.bonus = query, key, cum, bonus
        self.head_dim_v = values.shape[1] // query.shape[1]
        self._head_matrix: Tensor | None = None

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    def head_matrix(self) -> Tensor:
        """The per-head implicit attention ``(b, H, L, L)`` (computed once, one head at a time)."""
        if self._head_matrix is None:
            heads = []
            for h in range(self.num_heads):
                u = None if self.bonus is None else self.bonus[h]
                heads.append(gla_matrix(self.query[:, h], self.key[:, h], self.cum[:, h], u).to(self.dtype))
            self._head_matrix = torch.stack(heads, dim=1)
        return self._head_matrix

    def core_block(self, channels: Channels, rows: slice, cols: slice) -> Tensor:
        heads = torch.arange(self.num_channels, device=self.device)[channels] // self.head_dim_v
        return self.head_matrix()[:, :, rows, cols][:, heads]


def build_gla_attention(
    name: str,
    *,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    log_decay: Tensor,
    scale: float | None = None,
    bonus: Tensor | None = None,
    row_scale: Tensor | None = None,
    module_type: str = "",
    family: str = "gla",
    cls: type[GLAAttention] | None = None,
) -> GLAAttention:
    """Assemble :class:`GLAAttention` from the kernel's arguments (fla's ``(b, L, H, d)`` layout).

    Parameters
    ----------
    query, key : (b, L, H, dk)
    value : (b, L, H, dv)
    log_decay : (b, L, H, dk) or (b, L, H)
        Per-step log-decays ``g`` (≤ 0); a per-head decay broadcasts over key channels.
    scale : float, optional
        The kernel's query scale (fla's default ``dk^{−1/2}``).
    bonus : (H, dk), optional
        RWKV-6's ``u``.
    row_scale : (b, H·dv, L), optional
        Frozen output norm / gate.
    cls : subclass of GLAAttention, optional
        Class to build (an adapter's subclass, e.g. with an output-norm bias).
    """
    dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    bsz, length, heads, dv = value.shape
    dk = query.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    g = log_decay.to(torch.float64)
    if g.dim() == 3:
        g = g[..., None]
    return (cls or GLAAttention)(
        name,
        values=value.to(dtype).permute(0, 2, 3, 1).reshape(bsz, heads * dv, length)[..., None],
        query=(query.to(torch.float64) * scale).transpose(1, 2).contiguous(),
        key=key.to(torch.float64).transpose(1, 2).contiguous(),
        cum=torch.cumsum(g.transpose(1, 2), dim=2),
        bonus=bonus,
        row_scale=row_scale,
        module_type=module_type,
        family=family,
    )


def retention_log_decay(num_heads: int) -> Tensor:
    """RetNet's fixed per-head log-decay ``log(1 − 2^{−5−h})`` (``(H,)``, float64)."""
    return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(num_heads, dtype=torch.float64)))

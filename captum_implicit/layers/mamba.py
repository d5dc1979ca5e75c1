"""Mamba (S6) family: exact implicit attention of the selective scan with its conv, gate and skip.

Per inner channel ``d`` (Ali et al. 2024; Zimerman et al. 2024, with the terms the
published code drops)::

    y_d = diag(SiLU z_d) · (α_d + D_d I) · diag(m ⊙ σ(p_d)) · (T_d x_d + b_d 1)
    α_d[t, s] = Σ_n C_t[n] · exp(A[d, n] · Σ_{r=s+1..t} Δ_r[d]) · Δ_s[d] · B_s[n]      (s ≤ t)

with ``x`` the pre-conv input (the ``in_proj`` x-half), ``T_d`` the causal depthwise
conv, ``p = T x + b`` its pre-activation and ``m`` the padding mask. So the layer is
``A @ values + offset`` with ``values = x`` (``dv = 1``), ``A = diag(SiLU z)(α + D I)
diag(m σ(p)) T`` and ``offset = diag(SiLU z)(α + D I)(m σ(p) b)``.

Channels are the ``d_inner`` channels (all heads concatenated for multi-head
variants such as Zamba).

Numerics mirrored from the model: the scan's ``A`` is used as captured (HF casts it
to float32), and when the pure-torch HF scan ran on a float64 model its float32
casts of ``B`` and ``u`` in the input term are reproduced (``u``'s rounding enters
as a per-token factor ``fl32(u)/u``), so float64 agreement is at rounding level.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import config
from ..core.attention import Channels, LayerAttention, compute_dtype
from ..ops import ssm_triton
from ..ops.decay import diagonal_ssm_tile

_KERNEL_MODE = {
    "mean": "sum", "sum": "sum", "abs_mean": "abs", "abs_sum": "abs",
    "positive_mean": "positive", "positive_sum": "positive", "max_abs": "max_abs",
}


class MambaAttention(LayerAttention):
    """Implicit attention of a Mamba (S6) mixer.

    Factors (``b`` batch, ``C`` = ``d_inner`` channels, ``L`` tokens, ``N`` state size,
    ``H`` B/C heads):

    * ``cum``  ``(b, C, L)`` float64 — cumulative ``Δ`` per channel (log-space decays are
      ``A[d, n] · (cum_t − cum_s)``);
    * ``rate`` ``(C, N)`` — ``A = −exp(A_log)`` as the scan used it;
    * ``read`` ``(b, H, L, N)`` — ``C``; ``write`` ``(b, H, L, N)`` — ``B`` (as the scan used it);
    * ``write_scale`` ``(b, C, L)`` — ``Δ`` times the scan's rounding factor of ``u``;
    * ``skip`` ``(C,)`` — ``D``; ``head_of`` ``(C,)`` — which B/C head each channel reads.

    Cost of one ``(r × k)`` tile below the diagonal: ``O(b·c·N·(r+k))`` exponentials and a
    rank-``N`` matmul; memory ``O(b·c·(r+k)·N + b·c·r·k)``.
    """

    family = "mamba"

    def __init__(
        self,
        name: str,
        values: Tensor,
        cum: Tensor,
        rate: Tensor,
        read: Tensor,
        write: Tensor,
        write_scale: Tensor,
        skip: Tensor | None,
        head_of: Tensor,
        row_scale: Tensor | None,
        col_scale: Tensor | None,
        conv_weight: Tensor | None,
        conv_bias: Tensor | None,
        module_type: str = "",
    ) -> None:
        super().__init__(name, values, row_scale, col_scale, conv_weight, conv_bias, module_type)
        self.cum = cum
        self.rate = rate
        self.read = read
        self.write = write
        self.write_scale = write_scale
        self.skip = skip
        self.head_of = head_of
        # a tile's rank-N factors are (c, r+k, N) next to the (c, r, k) tile, so the tile dominates;
        # a single row's factors are (c, L, N) in float64 next to a (c, L) row
        self.cost_factor = 2
        self.row_cost_factor = 2 * rate.shape[-1]
        # what the kernel reads back to choose its tiles next to the diagonal, started while the forward runs:
        # read at Ā time it would wait for the GPU's queue to drain, once per layer (None where no kernel runs)
        taps = 1 if conv_weight is None else conv_weight.shape[-1]
        self._near_statistics = ssm_triton.start_near_statistics(cum, rate, taps) if self._kernel_runs() else None

    @functools.cached_property
    def _single_head(self) -> bool:
        # asked by the torch tiles only: reading it is a synchronisation on a GPU, which the kernel path avoids
        return self.read.shape[1] == 1 and bool((self.head_of == 0).all())

    def _heads(self, channels: Channels) -> Tensor | slice:
        return slice(0, 1) if self._single_head else self.head_of[channels]

    def core_block(self, channels: Channels, rows: slice, cols: slice) -> Tensor:
        heads = self._heads(channels)
        dtype = self.dtype

        def c_at(pos: slice) -> Tensor:
            return self.read[:, heads, pos]

        def b_at(pos: slice) -> Tensor:
            return self.write[:, heads, pos] * self.write_scale[:, channels, pos, None]

        out = diagonal_ssm_tile(self.cum[:, channels], self.rate[channels], c_at, b_at, rows, cols, dtype)
        if self.skip is not None:
            lo, hi = max(rows.start, cols.start), min(rows.stop, cols.stop)
            if lo < hi:
                idx = torch.arange(lo, hi, device=out.device)
                out[:, :, idx - rows.start, idx - cols.start] += self.skip[channels].to(dtype)[None, :, None]
        return out

    # ------------------------------------------------ fused kernel (CUDA, float32)
    def _kernel_runs(self) -> bool:
        """Whether the Triton kernel applies (CPU, float64: the torch path runs)."""
        return config.triton and self.dtype == torch.float32 and ssm_triton.available(self.device)

    def _kernel(self, mode: str, grad: Tensor | None) -> Tensor | None:
        """The Triton kernel's result, or ``None`` where it does not apply (:meth:`_kernel_runs`)."""
        if not self._kernel_runs():
            return None
        lam, rho = self.row_scale, None
        if grad is not None:
            g = grad[..., 0].to(torch.float32)
            lam = g if lam is None else lam * g
            rho = self.values[..., 0]
        return ssm_triton.ssm_kernel(
            mode, cum=self.cum, rate=self.rate, read=self.read, write=self.write, write_scale=self.write_scale,
            head_of=self.head_of, skip=self.skip, row_scale=lam, col_scale=self.col_scale, col_values=rho,
            conv_weight=self.conv_weight, near_statistics=self._near_statistics,
        )

    def aggregate(self, reduce: str = "mean", grad: Tensor | None = None) -> Tensor:
        if reduce in _KERNEL_MODE:
            out = self._kernel(_KERNEL_MODE[reduce], grad)
            if out is not None:
                return out.div_(self.num_channels) if reduce.endswith("mean") else out
        return super().aggregate(reduce, grad)

    def dense(self, channels: Tensor | slice | int | list[int] | None = None) -> Tensor:
        if channels is None:
            out = self._kernel("dense", None)
            if out is not None:
                return out
        return super().dense(channels)


def build_mamba_attention(
    name: str,
    *,
    u: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    conv_input: Tensor | None,
    conv_weight: Tensor | None,
    conv_bias: Tensor | None,
    torch_scan_casts: bool,
    module_type: str = "",
    head_of: Tensor | None = None,
) -> MambaAttention:
    """Assemble :class:`MambaAttention` from the selective scan's arguments.

    Parameters
    ----------
    u : (b, C, L)
        Scan input (post-conv, post-activation, post-mask).
    dt : (b, C, L)
        Time step before ``delta_bias`` and softplus.
    A : (C, N)
    B, C : (b, N, L) or (b, H, N, L)
        Input-dependent state factors (one set, or one per head for ``head_of``).
    D : (C,) or None
    z : (b, C, L) or None
        Gate pre-activation (output is multiplied by ``SiLU(z)``).
    conv_input : (b, C, L') or None
        Pre-conv input (``L' ≥ L``; a longer input carries conv state, which must be zero).
    conv_weight : (C, K) ; conv_bias : (C,) or None
    torch_scan_casts : bool
        The HF pure-torch scan ran: reproduce its float32 casts of ``B`` and ``u``.
    head_of : (C,) long, optional
        B/C head of each channel (multi-head variants).
    """
    dtype = compute_dtype(u, dt, B, C)
    length = u.shape[-1]
    up = u.to(dtype)

    delta = dt.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    cum = torch.cumsum(delta.to(torch.float64), dim=-1)

    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    write = B.transpose(-1, -2)  # (b, H, L, N)
    read = C.transpose(-1, -2).to(dtype)
    if torch_scan_casts:
        write = write.float()
    write = write.to(dtype)

    write_scale = delta
    if torch_scan_casts and up.dtype == torch.float64:
        # HF's torch scan feeds u.float() into the state (but u itself into the D skip)
        rounded = u.float().to(dtype)
        ratio = torch.where(up == 0, torch.ones_like(up), rounded / torch.where(up == 0, torch.ones_like(up), up))
        write_scale = delta * ratio

    row_scale = F.silu(z.to(dtype)) if z is not None else None
    skip = D.to(dtype) if D is not None else None
    if head_of is None:
        head_of = torch.zeros(u.shape[1], dtype=torch.long, device=u.device)

    if conv_input is None or conv_weight is None:
        values, col_scale, taps, bias = up, None, None, None
    else:
        x = conv_input.to(dtype)
        if x.shape[-1] > length:  # a cache prepended earlier conv inputs
            prefix = x[..., : x.shape[-1] - length]
            if bool(prefix.ne(0).any()):
                raise ValueError(
                    "the layer continued from a cached state; explain the full sequence with use_cache=False"
                )
            x = x[..., -length:]
        taps = conv_weight.to(dtype)
        bias = conv_bias.to(dtype) if conv_bias is not None else None
        pre = F.conv1d(x, taps[:, None], bias, padding=taps.shape[-1] - 1, groups=taps.shape[0])[..., :length]
        # u = (whatever the model did after the conv: activation, mask, casts) · pre, frozen per token
        safe = torch.where(pre == 0, torch.ones_like(pre), pre)
        col_scale = torch.where(pre == 0, torch.zeros_like(pre), up / safe)
        values = x

    return MambaAttention(
        name=name,
        values=values[..., None],
        cum=cum,
        rate=A,
        read=read,
        write=write,
        write_scale=write_scale,
        skip=skip,
        head_of=head_of,
        row_scale=row_scale,
        col_scale=col_scale,
        conv_weight=taps,
        conv_bias=bias,
        module_type=module_type,
    )

"""Mamba2 / SSD family: exact implicit attention of the chunked state-space dual with its conv, skip and gated norm.

Channels are the ``C = H·P`` (head, head-dim) pairs of the scan, ordered ``c = h·P + p``
(the layout of the tensor entering ``out_proj``). Per head ``h`` (group ``g(h)`` of the
``G`` B/C groups)::

    α_h[t, s] = (C_t^{g(h)} · B_s^{g(h)}) · exp(A_h · Σ_{r=s+1..t} Δ_{r,h}) · Δ_{s,h}        (s ≤ t)
    y_c       = (α_{h(c)} + D_c I) u_c,            u_c = m ⊙ SiLU(p_c),  p_c = T_c x_c + b_c
    o_c       = diag(w_c ⊙ SiLU(z_c) ⊙ ρ_{g'(c)}) y_c

with ``x`` the pre-conv x-channels of ``xBC`` (the values, ``dv = 1``), ``T_c`` the causal
depthwise conv, ``m`` the padding mask (SiLU stands for whatever activation the conv has,
e.g. NemotronH's ``mamba_hidden_act``; it is frozen as the slope ``u/p``),
``Δ = clamp(softplus(dt + dt_bias), *dt_limit)`` and ``ρ_{t,g'} = rsqrt(mean_{group g'}((y ⊙ SiLU z)_t²) + eps)``
the gated group-RMS statistic (``(y)_t²`` when the norm comes before the gate), frozen per token. All ``P``
channels of a head share ``α_h``: it is computed once per head and expanded.

So ``A = diag(o/y) (α + D I) diag(u/p) T`` and ``offset = diag(o/y)(α + D I)(u/p ⊙ b)``.

Numerics mirrored from the model: HF's pure-torch ``mamba2_chunk_scan`` casts ``x``,
``B``, ``C``, ``Δ`` and ``A·Δ`` to float32 even in a float64 model; these input roundings
are reproduced (``fl32(u)`` enters through the column scale, ``fl32(A·fl32(Δ))`` as the
per-step log-decay), and the gated norms' float32 statistics are recomputed the way the
model computes them. What remains is the float32 *arithmetic* of the model's own chunk
scan (sums over the state and the chunk, float32 ``exp``): ~1e-7 relative on the scan
output, up to a few times that after the RMS norm, which rescales tokens with small ``y``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.attention import Channels, LayerAttention, compute_dtype
from ..core.errors import CaptureError
from ..ops.decay import scalar_decay_tile


class Mamba2Attention(LayerAttention):
    """Implicit attention of a Mamba2 (SSD) mixer; channels are the ``C = H·P`` (head, head-dim) pairs.

    Factors (``b`` batch, ``H`` heads, ``P`` head dim, ``G`` B/C groups, ``N`` state size, ``L`` tokens):

    * ``cum``   ``(b, H, L)`` float64 — cumulative log-decay ``Σ_{r≤t} A_h Δ_{r,h}``;
    * ``delta`` ``(b, H, L)`` — ``Δ`` (the write scale of token ``s``);
    * ``read``  ``(b, G, L, N)`` — ``C``; ``write`` ``(b, G, L, N)`` — ``B``;
    * ``group_of`` ``(H,)`` — B/C group of each head;
    * ``skip``  ``(C,)`` or None — ``D`` per channel (``D`` of shape ``(H,)`` is repeated over ``P``).

    Cost of an ``(r × k)`` tile: one ``(r×N)·(N×k)`` matmul per *group* touched, ``r + k``
    exponentials per head below the diagonal (``r·k`` on it), then an expansion to the
    ``P`` channels of each head; memory ``O(b·c·r·k)``.
    """

    family = "mamba2"

    def __init__(
        self,
        name: str,
        values: Tensor,
        cum: Tensor,
        delta: Tensor,
        read: Tensor,
        write: Tensor,
        group_of: Tensor,
        head_dim: int,
        skip: Tensor | None,
        row_scale: Tensor | None,
        col_scale: Tensor | None,
        conv_weight: Tensor | None,
        conv_bias: Tensor | None,
        module_type: str = "",
    ) -> None:
        super().__init__(name, values, row_scale, col_scale, conv_weight, conv_bias, module_type)
        self.cum = cum
        self.delta = delta
        self.read = read
        self.write = write
        self.group_of = group_of
        self.head_dim = head_dim
        self.skip = skip
        self.cost_factor = 2  # the per-head tile and the C·B tile live next to the channel tile

    @property
    def num_heads(self) -> int:
        return self.cum.shape[1]

    def head_block(self, heads: Tensor | slice, rows: slice, cols: slice) -> Tensor:
        """Per-head kernel ``α_h`` on a tile, ``(b, h, r, k)`` (no skip, no scalings).

        ``heads`` is a slice or a sorted LongTensor of head indices.
        """
        dtype = self.dtype
        rep = self.num_heads // self.read.shape[1]  # heads per group; head h reads group h // rep
        if isinstance(heads, slice):  # contiguous heads touch contiguous groups: no host sync
            groups: Tensor | slice = slice(heads.start // rep, (heads.stop - 1) // rep + 1)
            inverse = torch.arange(heads.start, heads.stop, device=self.device) // rep - heads.start // rep
        else:
            groups, inverse = torch.unique(self.group_of[heads], return_inverse=True)
        # C·B once per group touched, then shared by the heads of that group
        scores = self.read[:, groups, rows].to(dtype) @ self.write[:, groups, cols].to(dtype).transpose(-1, -2)
        decay = scalar_decay_tile(self.cum[:, heads], rows, cols, dtype)
        return scores[:, inverse] * decay * self.delta[:, heads, None, cols].to(dtype)

    def core_block(self, channels: Channels, rows: slice, cols: slice) -> Tensor:
        P = self.head_dim
        if isinstance(channels, slice) and channels.indices(self.num_channels)[2] == 1:
            start, stop, _ = channels.indices(self.num_channels)
            index = torch.arange(start, stop, device=self.device)
            heads: Tensor | slice = slice(start // P, (stop - 1) // P + 1)
            local = index // P - start // P
        else:
            index = torch.arange(self.num_channels, device=self.device)[channels]
            heads, local = torch.unique(index // P, return_inverse=True)
        out = self.head_block(heads, rows, cols)[:, local]  # all P channels of a head share α_h
        if self.skip is not None:
            lo, hi = max(rows.start, cols.start), min(rows.stop, cols.stop)
            if lo < hi:
                idx = torch.arange(lo, hi, device=out.device)
                out[:, :, idx - rows.start, idx - cols.start] += self.skip[index].to(out.dtype)[None, :, None]
        return out



def gated_norm_scale(
    y: Tensor | None,
    gate: Tensor | None,
    weight: Tensor | None,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
    normalize: bool,
    dtype: torch.dtype,
) -> Tensor | None:
    """Frozen per-token, per-channel output scale ``o / y`` of a (gated) group RMS norm, ``(b, L, C)``.

    With ``normalize`` it is ``w ⊙ SiLU(z) ⊙ ρ`` where ``ρ`` is the group RMS statistic computed
    in float32 as every Mamba2 norm (HF ``*RMSNormGated``, mamba-ssm ``RMSNormGated``) does;
    without it, only the gate ``SiLU(z)`` (FalconH1 without norm, mamba-ssm ``rmsnorm=False``).

    Parameters
    ----------
    y : (b, L, C) or None
        The norm's input (the scan output); needed only with ``normalize``.
    gate : (b, L, C) or None
        ``z``.
    weight : (C,) or None
    group_size : int
        Channels per RMS group.
    """
    if not normalize:
        if gate is None:
            return None
        return F.silu(gate.to(torch.float64 if gate.dtype == torch.float64 else torch.float32)).to(dtype)
    assert y is not None
    h = y.float()
    silu = F.silu(gate.float()) if gate is not None else None
    if silu is not None and not norm_before_gate:
        h = h * silu
    b, L, C = h.shape
    var = h.view(b, L, C // group_size, group_size).pow(2).mean(-1, keepdim=True)
    rho = torch.rsqrt(var + eps).expand(-1, -1, -1, group_size).reshape(b, L, C)
    scale = rho.to(dtype)
    if silu is not None:
        scale = scale * silu.to(dtype)
    if weight is not None:
        scale = scale * weight.to(dtype)
    return scale


def build_mamba2_attention(
    name: str,
    *,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    conv_input: Tensor | None,
    conv_weight: Tensor | None,
    conv_bias: Tensor | None,
    row_scale: Tensor | None,
    torch_scan_casts: bool,
    initial_states: Tensor | None = None,
    module_type: str = "",
) -> Mamba2Attention:
    """Assemble :class:`Mamba2Attention` from the chunk scan's arguments.

    Parameters
    ----------
    x : (b, L, H, P)
        Scan input (post-conv, post-activation, post-mask).
    dt : (b, L, H)
        Time step before ``dt_bias``, softplus and the ``dt_limit`` clamp.
    A : (H,)
        Negative decay rates (``−exp(A_log)``, as the scan got them).
    B, C : (b, L, G, N)
    D : (H,) or (H, P) or None
    conv_input : (b, ≥C, L') or None
        Pre-conv ``xBC`` (channels first; its first ``C = H·P`` channels are the x-channels;
        ``L' > L`` when a cache prepended zeros).
    conv_weight : (≥C, K); conv_bias : (≥C,) or None
    row_scale : (b, L, C) or None
        The frozen output scale (see :func:`gated_norm_scale`).
    torch_scan_casts : bool
        HF's pure-torch chunk scan ran: reproduce its float32 casts of its inputs.
    initial_states : (b, H, P, N) or None
        Must be None or zero (a carried state would be an extra affine term).
    """
    if initial_states is not None and bool(initial_states.ne(0).any()):
        raise CaptureError(
            f"layer {name!r}: the scan started from a cached state; explain the full sequence with use_cache=False"
        )
    dtype = compute_dtype(x, dt, B, C)
    bsz, length, nheads, head_dim = x.shape
    ngroups = B.shape[2]
    nch = nheads * head_dim

    # Δ exactly as the scan forms it (HF: in dt's dtype; the Triton kernels: in float32)
    delta = dt if torch_scan_casts else dt.to(dtype)
    if dt_bias is not None:
        delta = delta + dt_bias.to(delta.dtype)
    if dt_softplus:
        delta = F.softplus(delta)
    delta = torch.clamp(delta, min=dt_limit[0], max=dt_limit[1])
    if torch_scan_casts:
        delta = delta.float()  # HF: `dt.float()` in both the write term and `A * dt`
        log_decay = A.float() * delta
    else:
        log_decay = A.to(delta.dtype) * delta
    cum = torch.cumsum(log_decay.to(torch.float64), dim=1).transpose(1, 2).contiguous()  # (b, H, L)
    delta = delta.to(dtype).transpose(1, 2).contiguous()

    def factor(t: Tensor) -> Tensor:  # (b, L, G, N) -> (b, G, L, N), with the scan's cast
        t = t.float() if torch_scan_casts else t
        return t.to(dtype).permute(0, 2, 1, 3).contiguous()

    read, write = factor(C), factor(B)
    group_of = torch.div(torch.arange(nheads, device=x.device), nheads // ngroups, rounding_mode="floor")

    skip = None
    if D is not None:
        D = D.detach().to(dtype)
        skip = D.repeat_interleave(head_dim) if D.dim() == 1 else D.reshape(nch)

    # u as the scan used it (HF's torch scan: fl32(u) in both the state and the D term)
    u = x.reshape(bsz, length, nch).transpose(1, 2)
    u = (u.float() if torch_scan_casts else u).to(dtype)

    values, col_scale, taps, bias = u, None, None, None
    if conv_input is not None and conv_weight is not None:
        xin = conv_input[:, :nch].to(dtype)
        if xin.shape[-1] > length:  # a cache prepended earlier conv inputs
            if bool(xin[..., : xin.shape[-1] - length].ne(0).any()):
                raise CaptureError(
                    f"layer {name!r}: the layer continued from a cached state; explain the full sequence "
                    "with use_cache=False"
                )
            xin = xin[..., -length:]
        # detached: views of parameters taken under no_grad still require grad
        taps = conv_weight[:nch].detach().to(dtype)
        bias = conv_bias[:nch].detach().to(dtype) if conv_bias is not None else None
        pre = F.conv1d(xin, taps[:, None], bias, padding=taps.shape[-1] - 1, groups=nch)[..., :length]
        # u = (activation, mask, casts) · pre, frozen per token and channel
        safe = torch.where(pre == 0, torch.ones_like(pre), pre)
        col_scale = torch.where(pre == 0, torch.zeros_like(pre), u / safe)
        values = xin

    return Mamba2Attention(
        name=name,
        values=values[..., None],
        cum=cum,
        delta=delta,
        read=read,
        write=write,
        group_of=group_of,
        head_dim=head_dim,
        skip=skip,
        row_scale=row_scale.transpose(1, 2).to(dtype) if row_scale is not None else None,
        col_scale=col_scale,
        conv_weight=taps,
        conv_bias=bias,
        module_type=module_type,
    )

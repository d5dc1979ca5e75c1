"""Griffin / RecurrentGemma RG-LRU family: exact implicit attention of the recurrent block.

Per LRU channel ``c`` (HF ``RecurrentGemmaRecurrentBlock``; formulas.md §3.4)::

    h_t = a_t (1 − reset_t) h_{t−1} + i_t · mult_t · xb_t,      xb = T x + b (depthwise causal conv)
    out = linear_out(h ⊙ y),   y = gelu_tanh(linear_y(·)),   log a = −8 · r · softplus(Λ)

with ``mult = √(1 − a²)`` (1 at a reset, ``position_ids == 0``). So ::

    (h ⊙ y)_c = diag(y_c) α_c (T_c x_c + b_c 1)
    α_c[t, s] = exp(Σ_{r=s+1..t} log a_{r,c}) · i_{s,c} · mult_{s,c}     (0 if a reset lies in (s, t])

i.e. ``A = diag(y) · D · diag(i·mult) · T`` with ``D`` the decay kernel, ``values`` the
``linear_x`` output (pre-conv, ``dv = 1``) and ``offset = diag(y) D (i·mult·b)`` (the conv
bias; the published code drops it, and also the √(1−a²) normaliser).

Decays: float64 cumulative sums of ``log a`` and the pivot factorisation of
:func:`~captum_implicit.ops.decay.diagonal_ssm_tile` (its ``N = 1`` case). A reset cuts the
sequence into segments: ``α[t, s] = 0`` unless ``t`` and ``s`` have the same segment id
(number of resets up to the position); ``log a`` is set to 0 at resets so the cumulative
sums stay finite (never ``−∞`` differences).

Numerics mirrored from the model: ``log a`` is the log of the decay ``a`` the scan
multiplied by, as rounded in the model dtype (in bfloat16, ``a = 0.999`` is rounded to 8
bits; ignoring that would be far off after a few dozen tokens), and the input factor
``i·mult`` is the model's own ``normalized_x / xb`` (its roundings included). Not
mirrored: HF's scan accumulates the state in float32 whatever the model dtype, so a
float64 model agrees to float32 accumulation error (≈ L·1e-7 relative at worst), not 1e-10.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.attention import Channels, LayerAttention, compute_dtype
from ..ops.decay import diagonal_ssm_tile


class RglruAttention(LayerAttention):
    """Implicit attention of an RG-LRU recurrent block.

    Factors (``b`` batch, ``W`` LRU channels, ``L`` tokens, ``K`` conv taps):

    * ``cum`` ``(b, W, L)`` float64 — cumulative ``log a`` (0 at resets);
    * ``segment`` ``(b, L)`` long or None — reset segment ids (None when no reset after position 0);
    * ``row_scale`` ``(b, W, L)`` — the ``y`` gate; ``col_scale`` ``(b, W, L)`` — ``i · mult``;
    * ``conv_weight`` ``(W, K)``, ``conv_bias`` ``(W,)``; ``values`` ``(b, W, L, 1)`` — ``linear_x`` output.

    Cost of one ``(r × k)`` tile: ``O(b·c·(r+k))`` exponentials and a rank-one product below the
    diagonal, ``O(b·c·r·k)`` where it touches the diagonal.
    """

    family = "rglru"

    def __init__(
        self,
        name: str,
        values: Tensor,
        cum: Tensor,
        segment: Tensor | None,
        row_scale: Tensor,
        col_scale: Tensor,
        conv_weight: Tensor | None,
        conv_bias: Tensor | None,
        module_type: str = "",
    ) -> None:
        super().__init__(name, values, row_scale, col_scale, conv_weight, conv_bias, module_type)
        self.cum = cum
        self.segment = segment

    def core_block(self, channels: Channels, rows: slice, cols: slice) -> Tensor:
        cum = self.cum[:, channels]
        bsz, nch = cum.shape[0], cum.shape[1]
        unit_rate = torch.ones(nch, 1, dtype=torch.float64, device=cum.device)

        def ones(pos: slice) -> Tensor:  # the N = 1 SSM with C = B = 1: a pure decay kernel
            return torch.ones(1, 1, 1, 1, dtype=self.dtype, device=cum.device).expand(bsz, nch, pos.stop - pos.start, 1)

        out = diagonal_ssm_tile(cum, unit_rate, ones, ones, rows, cols, self.dtype)
        if self.segment is not None:
            same = self.segment[:, rows, None] == self.segment[:, None, cols]  # (b, r, k)
            out = out * same[:, None].to(out.dtype)
        return out




def build_rglru_attention(
    name: str,
    *,
    values: Tensor,
    conv_output: Tensor,
    scan_input: Tensor,
    input_scale: Tensor,
    decay: Tensor,
    log_decay: Tensor,
    reset: Tensor,
    gate: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    module_type: str = "",
) -> RglruAttention:
    """Assemble :class:`RglruAttention` (all per-token tensors in ``(b, L, W)`` layout).

    Parameters
    ----------
    values : (b, L, W)
        ``linear_x`` output (the conv input).
    conv_output : (b, L, W)
        ``xb``, what the RG-LRU received.
    scan_input : (b, L, W)
        ``i · mult · xb`` as the model computed it (the scan's input).
    input_scale : (b, L, W)
        ``i · mult`` (used where ``xb == 0``, where the ratio is undefined and irrelevant).
    decay : (b, L, W)
        ``a`` as the model computed it (model dtype, before the reset mask).
    log_decay : (b, L, W)
        ``−8 r softplus(Λ)``; used where ``a`` underflowed to 0.
    reset : (b, L) bool
        ``position_ids == 0``.
    gate : (b, L, W)
        ``y``, the row gate.
    conv_weight : (W, K) ; conv_bias : (W,) or None
    """
    values, conv_output, scan_input, input_scale, decay, log_decay, gate, conv_weight = (
        t.detach() for t in (values, conv_output, scan_input, input_scale, decay, log_decay, gate, conv_weight)
    )
    conv_bias = None if conv_bias is None else conv_bias.detach()
    dtype = compute_dtype(values, conv_output)
    a64 = decay.to(torch.float64)
    step = torch.where(a64 > 0, torch.log(a64.clamp_min(torch.finfo(torch.float64).tiny)), log_decay.to(torch.float64))
    step = step.masked_fill(reset[..., None], 0.0)  # resets are handled by segments
    cum = torch.cumsum(step, dim=1).transpose(1, 2).contiguous()
    segment = torch.cumsum(reset.long(), dim=1)
    if bool((segment == segment[:, :1]).all()):
        segment = None  # no reset after the first position: nothing to cut

    xb = conv_output.to(dtype)
    safe = torch.where(xb != 0, xb, torch.ones_like(xb))
    col = torch.where(xb != 0, scan_input.to(dtype) / safe, input_scale.to(dtype))
    return RglruAttention(
        name=name,
        values=values.to(dtype).transpose(1, 2)[..., None].contiguous(),
        cum=cum,
        segment=segment,
        row_scale=gate.to(dtype).transpose(1, 2).contiguous(),
        col_scale=col.transpose(1, 2).contiguous(),
        conv_weight=conv_weight.to(dtype, copy=True),
        conv_bias=None if conv_bias is None else conv_bias.to(dtype, copy=True),
        module_type=module_type,
    )

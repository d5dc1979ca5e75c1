"""Published attribution pipelines for comparison: UIA (Zimerman et al.) and Mamba-Attr (Ali et al.).

Both follow the Vision-Mamba code of the papers (anchors.md §1.3–1.4), transcribed for
sequences: the explained row is the query position instead of the middle CLS token, and
min–max normalisations run over the query's non-padding tokens ``≤ q`` (so a padded batch
gives what its examples give alone). Known bugs of the published code are *not* copied: the
HMA off-by-one (missing ``Ā_q`` and diagonal), hard-coded geometry, the missing SiLU' in the
Vim backward. The rank-1 "rollout" is reproduced as published, degenerate as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from ..core.attention import LayerAttention
from ..core.errors import UnsupportedModelError
from ..layers.mamba import MambaAttention
from ..ops.blockwise import channel_blocks
from ..ops.decay import diagonal_ssm_tile
from ._base import ImplicitAttributionMixin, Run, prepare, query_rows
from ._rollout import rank_one_rollout_row
from ._utils import QueryType, minmax, one_hot_rows

VectorFn = Callable[[Run, LayerAttention, Tensor], Tensor]


def gradient_score(run: Run, block_grad: Tensor) -> Tensor:
    """``s = minmax_tokens(max_features clamp(∂f/∂h, 0))``, ``(B, L)`` (step 3 of ``generate_ours``)."""
    g = block_grad.clamp(min=0).flatten(2).amax(-1)
    return minmax(g, run.valid.to(g.device), dims=(1,))


def uia_vector(run: Run, attn: LayerAttention, block_grad: Tensor) -> Tensor:
    """UIA per-layer vector ``minmax(mean_c (A[q, :])⁺ ⊙ s)``, ``(B, L)``."""
    a = query_rows(attn, run.queries, "positive_mean")
    s = gradient_score(run, block_grad).to(a.dtype)
    return minmax(a * s, run.valid, dims=(1,))


def mamba_attr_vector(run: Run, attn: LayerAttention, block_grad: Tensor) -> Tensor:
    """Mamba-Attr per-layer vector ``mean_c minmax_{c,tokens}(α[q, :]) ⊙ s``, ``(B, L)`` (no final min–max)."""
    alpha = query_rows(attn, run.queries, None, row_fn=lambda q: s6_row(attn, q))
    a = minmax(alpha, run.valid, dims=(1, 2)).mean(1)
    return a * gradient_score(run, block_grad).to(a.dtype)


def published_relevance(
    run: Run, layers: list[LayerAttention], block_grads: list[Tensor], vector_fn: VectorFn, start_layer: int
) -> Tensor:
    """Rank-1 rollout of the per-layer vectors from ``start_layer``, row ``q``, clamped ≥ 0, ``(B, L)``."""
    if not 0 <= start_layer < len(layers):
        raise ValueError(f"start_layer={start_layer} out of range for {len(layers)} layers")
    pairs = list(zip(layers, block_grads, strict=True))[start_layer:]
    vectors = (vector_fn(run, attn, g) for attn, g in reversed(pairs))
    ref = layers[0]
    start = one_hot_rows(run.queries, run.length, ref.dtype, ref.device)
    out = rank_one_rollout_row(start, vectors).clamp(min=0)
    return torch.where(run.valid, out, torch.zeros_like(out))


def s6_row(attn: MambaAttention, index: int) -> Tensor:
    """Row ``index`` of the S6 hidden attention ``α`` alone (no conv, gate, SiLU or ``D``), ``(B, C, L)``.

    ``α_d[t, s] = Σ_n C_t[n] exp(A[d, n] Σ_{r=s+1..t} Δ_r[d]) Δ_s[d] B_s[n]`` maps the scan
    input ``u`` to the scan output before the skip and gate (Ali et al. 2024).
    """
    rows, cols = slice(index, index + 1), slice(0, index + 1)
    parts = []
    for ch in channel_blocks(attn.num_channels, attn.batch_size * attn.seq_len, attn.cost_factor):
        heads = attn._heads(ch)  # which B/C head each channel reads (multi-head variants)

        def c_at(pos: slice, heads: Any = heads) -> Tensor:
            return attn.read[:, heads, pos]

        def b_at(pos: slice, heads: Any = heads, ch: slice = ch) -> Tensor:
            return attn.write[:, heads, pos] * attn.write_scale[:, ch, pos, None]

        parts.append(diagonal_ssm_tile(attn.cum[:, ch], attn.rate[ch], c_at, b_at, rows, cols, attn.dtype))
    row = torch.cat(parts, dim=1)[:, :, 0]
    return torch.nn.functional.pad(row, (0, attn.seq_len - index - 1))


class MambaAttr(ImplicitAttributionMixin, GradientAttribution):
    r"""Mamba-Attr (Ali, Zimerman & Wolf, "The Hidden Attention of Mamba Models", ACL 2025), as published.

    The baseline ``generate_mamba_attr`` of the paper's code (anchors.md §1.4), on sequences:
    per Mamba (S6) layer ``l`` with block input ``h_l``::

        s_l = minmax_tokens(max_features (∂f/∂h_l)⁺)
        v_l = mean_c minmax_{c, tokens}(α_l[c, q, :]) ⊙ s_l

    with ``α`` the S6 hidden attention alone (no conv, gate, SiLU or ``D``; the published
    off-by-one that drops ``Ā_q`` is corrected), followed by the same rank-1 "rollout" of the
    vectors as UIA from ``start_layer`` (see :class:`ImplicitAttnGrad` ``method="uia"``).
    Non-Mamba layers of hybrid models are skipped (the method is defined for S6 only).

    Shapes: as :class:`ImplicitAttnGrad` (``(B, L)`` for token ids, ``(B, L, D)`` spread evenly
    for embeddings). Cost: one forward, one backward (to the block inputs), one ``O(B·C·L·N)``
    S6 row per layer and distinct query position; memory ``O(B·C·L)``.

    Parameters
    ----------
    forward_func : nn.Module or callable
        As for :class:`ImplicitAttnGrad`.
    model : nn.Module, optional
        The module with the explained layers when ``forward_func`` is a plain function.
    """

    def __init__(self, forward_func: Callable, model: nn.Module | None = None) -> None:
        GradientAttribution.__init__(self, forward_func)
        self._init_model(forward_func, model)

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Any = None,
        query_position: QueryType = None,
        start_layer: int = 0,
    ) -> TensorOrTupleOfTensorsGeneric:
        """Relevance of every input token (see :meth:`ImplicitAttnGrad.attribute` for the arguments).

        ``start_layer`` counts Mamba layers only (the paper uses 15 of Vim-S's 24).
        """
        is_tuple, inputs_t, afa = prepare(inputs, additional_forward_args)
        run = self._run(inputs_t, target, afa, query_position, grad_to="block")
        pairs = [(a, g) for a, g in zip(run.layers, run.block_grads, strict=True) if isinstance(a, MambaAttention)]
        if not pairs:
            raise UnsupportedModelError("MambaAttr explains Mamba (S6) layers; the model ran none")
        with torch.no_grad():
            layers, grads = [a for a, _ in pairs], [g for _, g in pairs]
            relevance = published_relevance(run, layers, grads, mamba_attr_vector, start_layer)
        return self._format(relevance, inputs_t, is_tuple)

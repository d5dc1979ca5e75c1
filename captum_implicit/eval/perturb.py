"""The one perturbation engine behind every faithfulness metric.

An explanation orders the *flippable* tokens of each example (real tokens that are neither special
nor the causal read-out; padding is never flipped); a metric asks for the scores of variants of the
input in which the first (``"top"``) or last (``"bottom"``) ``k`` tokens of that order are replaced.
All variants of a batch are scored in forwards of at most ``batch_size`` rows, under ``no_grad``.

The replacement is a parameter and has no default on purpose: replacing with a token the model never
saw (an unused PAD id) can *add* evidence and makes the metrics unable to separate methods
(evaluation.md §2, measured: MoRF AUC oracle 21.6 vs random 22.9 with PAD, 0.39 vs 14.13 with a
neutral in-distribution token). Pass an in-distribution neutral token id, or ``"delete"`` to remove
the tokens (the remaining real tokens are packed together, padding on the model's padding side).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import Tensor

from .model import last_positions

Replacement = Union[int, Literal["delete"]]
Forward = Callable[[Tensor, Tensor], Tensor]  # (input_ids, attention_mask) -> (B, C) logits


def flippable_mask(
    input_ids: Tensor, attention_mask: Tensor, special_ids: Iterable[int] = (), protect_last: bool = False
) -> Tensor:
    """``(B, L)`` bool: the tokens an ordering may flip.

    Excludes padding (``attention_mask == 0``), the ``special_ids`` (BOS, [CLS], [SEP], …) and, with
    ``protect_last``, each row's last real token (the read-out of a causal model).
    """
    keep = attention_mask.bool().clone()
    special = torch.as_tensor(sorted(set(int(s) for s in special_ids)), dtype=input_ids.dtype, device=input_ids.device)
    if special.numel():
        keep &= ~torch.isin(input_ids, special)
    if protect_last:
        keep[torch.arange(keep.shape[0], device=keep.device), last_positions(attention_mask)] = False
    return keep


def rank_positions(scores: Tensor, flippable: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Rank of every flippable position by descending score (0 = most relevant, the MoRF order).

    Ties are broken uniformly at random (seeded by ``generator``), so a constant or coarse map is not
    silently ranked by position. Non-flippable positions get rank ``L``.

    Parameters
    ----------
    scores : (B, L) Tensor
    flippable : (B, L) bool Tensor
    generator : torch.Generator, optional (a CPU generator)

    Returns
    -------
    (B, L) long Tensor, on ``flippable``'s device
    """
    s = scores.detach().double().cpu()
    f = flippable.cpu()
    if torch.isnan(s[f]).any():
        raise ValueError("the attribution has NaN scores at flippable positions")
    b, length = s.shape
    perm = torch.rand(b, length, generator=generator, dtype=torch.float64).argsort(1)
    # sort by (flippable first, then descending score), ties in the random order `perm`
    o = s.gather(1, perm).argsort(dim=1, descending=True, stable=True)
    perm = perm.gather(1, o)
    o = f.gather(1, perm).to(torch.int8).argsort(dim=1, descending=True, stable=True)
    order = perm.gather(1, o)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(length).expand(b, -1).contiguous())
    ranks[~f] = length
    return ranks.to(flippable.device)


def flip_masks(ranks: Tensor, flippable: Tensor, ks: Tensor, end: Literal["top", "bottom"]) -> Tensor:
    """``(B, V, L)`` bool: for each of ``V`` counts, the ``k`` top (MoRF) or bottom (LeRF) flippable tokens.

    Parameters
    ----------
    ranks : (B, L) long, from :func:`rank_positions`
    flippable : (B, L) bool
    ks : (B, V) long, 0 ≤ k ≤ number of flippable tokens of the row
    end : "top" or "bottom"
    """
    r = ranks[:, None, :]
    k = ks[:, :, None]
    if end == "top":
        return r < k
    n = flippable.sum(1)[:, None, None]
    return flippable[:, None, :] & (r >= n - k)


def fraction_counts(fractions: Tensor, flippable: Tensor) -> Tensor:
    """``(B, F)`` token counts ``k = ⌈p · n⌉`` for each fraction ``p`` and row with ``n`` flippable tokens."""
    n = flippable.sum(1).double()
    # the small tolerance keeps p·n = 3.0000000000000004 from rounding up to 4
    return torch.ceil(fractions.double()[None, :].to(n.device) * n[:, None] - 1e-9).long().clamp_min(0)


def apply_flips(
    input_ids: Tensor, attention_mask: Tensor, flip: Tensor, replacement: Replacement, pad_id: int = 0
) -> tuple[Tensor, Tensor]:
    """Replace (or delete) the flipped tokens.

    Parameters
    ----------
    input_ids, attention_mask, flip : (N, L)
    replacement : int or "delete"
    pad_id : int
        Id written into positions freed by deletion.

    Returns
    -------
    input_ids, attention_mask : (N, L)
    """
    if flip.dtype != torch.bool:
        raise TypeError("flip must be a bool mask")
    if (flip & ~attention_mask.bool()).any():
        raise ValueError("a padding position was marked for flipping")
    if replacement != "delete":
        return input_ids.masked_fill(flip, int(replacement)), attention_mask
    keep = attention_mask.bool() & ~flip
    left = bool((attention_mask[:, -1] != 0).all() and (attention_mask[:, 0] == 0).any())
    # kept tokens packed to the front (right padding) or the back (left padding), order preserved
    order = keep.to(torch.int8).argsort(dim=1, descending=not left, stable=True)
    ids = input_ids.gather(1, order).masked_fill(~keep.gather(1, order), pad_id)
    return ids, keep.gather(1, order).to(attention_mask.dtype)


@dataclass
class Scores:
    """Scores of perturbed variants, each ``(B, V)``: target logit, target probability, predicted class."""

    logit: Tensor
    prob: Tensor
    pred: Tensor


@torch.no_grad()
def perturbed_scores(
    forward: Forward,
    input_ids: Tensor,
    attention_mask: Tensor,
    flips: Tensor,
    replacement: Replacement,
    target: Tensor,
    batch_size: int = 64,
    pad_id: int = 0,
) -> Scores:
    """Score ``V`` flipped variants of each of ``B`` inputs.

    Parameters
    ----------
    forward : (input_ids, attention_mask) -> (B, C) logits
    input_ids, attention_mask : (B, L)
    flips : (B, V, L) bool
    replacement : int or "delete"
    target : (B,) long — the explained class (or next token) of each input
    batch_size : int
        Rows per forward (all variants of one input are contiguous).

    Returns
    -------
    Scores with ``(B, V)`` fields, float64 / long, on the CPU.
    """
    b, v, length = flips.shape
    ids = input_ids[:, None, :].expand(b, v, length).reshape(b * v, length)
    mask = attention_mask[:, None, :].expand(b, v, length).reshape(b * v, length)
    tgt = target.to(input_ids.device)[:, None].expand(b, v).reshape(-1)
    flat = flips.reshape(b * v, length).to(input_ids.device)
    logit, prob, pred = [], [], []
    for s in range(0, b * v, batch_size):
        sl = slice(s, s + batch_size)
        x, m = apply_flips(ids[sl], mask[sl], flat[sl], replacement, pad_id)
        out = forward(x, m).double()
        t = tgt[sl].to(out.device)[:, None]
        logit.append(out.gather(1, t)[:, 0].cpu())
        prob.append(out.softmax(-1).gather(1, t)[:, 0].cpu())
        pred.append(out.argmax(-1).cpu())
    return Scores(*(torch.cat(x).reshape(b, v) for x in (logit, prob, pred)))

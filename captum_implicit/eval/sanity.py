"""Model-parameter randomisation test (MPRT; Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

Layers are re-initialised **cascading from the top** (logits) down — or one at a time with
``order="independent"`` — and after each step the explanation is compared with the original one by
the Spearman rank correlation over each example's valid tokens (on ``|R|`` and on signed ``R``). A
faithful method decorrelates: an explanation that does not depend on the weights stays at ρ = 1.

Re-initialisation: every parameter of the layer is replaced by seeded Gaussian noise of the
parameter's own scale (its standard deviation, or its mean magnitude for constant tensors such as
norm weights or ``D``). Unlike Quantus (``reset_parameters`` only), this also randomises raw
``nn.Parameter``s — ``A_log``, ``D``, ``dt_bias``, ``time_decay`` — which SSMs keep outside
submodules. All weights are restored bit for bit afterwards, also on error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .stats import spearman

Explainer = Callable[[Tensor, Tensor, Tensor], Tensor]


def layer_groups(
    model: nn.Module, layers: Sequence[str] | Literal["auto"] = "auto"
) -> list[tuple[str, list[nn.Parameter]]]:
    """Parameter groups in forward (bottom-up) order, each ``(name, parameters)``.

    ``"auto"``: if the model has an ``nn.ModuleList`` of blocks (the largest one), the groups are the
    parameters registered before it (embeddings), each block, and those after it (final norm, head);
    otherwise every module with parameters of its own. A list of module names (``""`` for the root's
    own parameters) gives those modules with all their descendants. Shared (tied) parameters belong to
    their first group only.
    """
    seen: set[int] = set()

    def take(params: list[nn.Parameter]) -> list[nn.Parameter]:
        out = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in out)
        return out

    groups: list[tuple[str, list[nn.Parameter]]] = []
    if layers != "auto":
        for name in layers:
            mod = model.get_submodule(name)
            groups.append((name or "<root>", take(list(mod.parameters()))))
        return [g for g in groups if g[1]]
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if lists:
        lname, blocks = max(lists, key=lambda nm: len(nm[1]))
        inside = {id(p) for p in blocks.parameters()}
        named = list(model.named_parameters())
        first = next(i for i, (_, p) in enumerate(named) if id(p) in inside)
        groups.append(("<before blocks>", take([p for _, p in named[:first] if id(p) not in inside])))
        for i, blk in enumerate(blocks):
            groups.append((f"{lname}.{i}", take(list(blk.parameters()))))
        groups.append(("<after blocks>", take([p for _, p in named[first:] if id(p) not in inside])))
    else:
        for name, mod in model.named_modules():
            groups.append((name or "<root>", take(list(mod.parameters(recurse=False)))))
    return [g for g in groups if g[1]]


@torch.no_grad()
def randomise_(params: Sequence[nn.Parameter], generator: torch.Generator) -> None:
    """Replace each parameter in place by seeded Gaussian noise of its own scale."""
    for p in params:
        x = p.detach().double()
        scale = float(x.std()) if x.numel() > 1 else 0.0
        if not scale > 0:
            scale = float(x.abs().mean()) or 1.0
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale
        p.copy_(noise.to(device=p.device, dtype=p.dtype))


@dataclass
class MPRTResult:
    """Similarity of each randomisation step's explanation to the original one.

    Attributes
    ----------
    steps : list of str
        Group randomised at each step (top first); with ``cascading``, step ``s`` has groups
        ``0..s`` randomised.
    spearman_abs, spearman_signed : (N, S) float64
        Per example and step, Spearman ρ on ``|R|`` and on ``R``.
    """

    steps: list[str]
    spearman_abs: Tensor
    spearman_signed: Tensor

    def final(self, signed: bool = False) -> Tensor:
        """``(N,)`` ρ after the last step (full randomisation when cascading)."""
        return (self.spearman_signed if signed else self.spearman_abs)[:, -1]

    def passed(self, threshold: float = 0.5, signed: bool = False) -> bool:
        """True if the mean ρ after the last step is below ``threshold``."""
        return bool(self.final(signed).nanmean() < threshold)


def mprt(
    model: nn.Module,
    explainer: Explainer,
    input_ids: Tensor,
    attention_mask: Tensor,
    target: Tensor,
    valid: Tensor | None = None,
    layers: Sequence[str] | Literal["auto"] = "auto",
    order: Literal["cascading", "independent"] = "cascading",
    seed: int = 42,
) -> MPRTResult:
    """Run the randomisation test on one batch and restore every weight.

    Parameters
    ----------
    model : nn.Module
        The model the ``explainer`` uses (randomised in place, then restored).
    explainer : (input_ids, attention_mask, target) -> (B, L) scores
    input_ids, attention_mask : (B, L)
    target : (B,) long
        Kept fixed at the original model's classes, so only the weights change.
    valid : (B, L) bool, optional
        Positions compared (default: ``attention_mask``).
    layers : "auto" or module names, see :func:`layer_groups`
    order : "cascading" (top-down, cumulative) or "independent" (one group at a time)
    seed : int

    Returns
    -------
    MPRTResult
    """
    valid = attention_mask.bool() if valid is None else valid
    groups = list(reversed(layer_groups(model, layers)))  # top (logits) first
    saved = [(p, p.detach().clone()) for _, ps in groups for p in ps]
    gen = torch.Generator().manual_seed(seed)

    def restore() -> None:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)

    def explain() -> Tensor:
        # stochastic explainers (KernelShap's coalitions) draw the same samples for every model, whatever ran
        # before: ρ then measures the model change, not sampling noise, and is the same on every device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return explainer(input_ids, attention_mask, target).detach()

    try:
        ref = explain()
        rho_abs, rho_signed = [], []
        for _, params in groups:
            if order == "independent":
                restore()
            elif order != "cascading":
                raise ValueError(f"order must be 'cascading' or 'independent', got {order!r}")
            randomise_(params, gen)
            r = explain()
            rho_abs.append(spearman(ref.abs(), r.abs(), valid))
            rho_signed.append(spearman(ref, r, valid))
    finally:
        restore()
    return MPRTResult([name for name, _ in groups], torch.stack(rho_abs, 1), torch.stack(rho_signed, 1))

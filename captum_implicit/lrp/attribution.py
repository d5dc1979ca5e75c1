"""Captum-side LRP for gated-linear models: one forward and one backward under a composite."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from captum._utils.common import _format_additional_forward_args, _select_targets
from captum._utils.typing import TargetType
from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor, nn
from zennit.core import Composite

from ..core.errors import InputError
from .composites import GatedLinearComposite


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise InputError(f"cannot find the logits in the model output of type {type(output).__name__}")


class GatedLinearLRP(Attribution):
    """LRP for gated-linear RNNs / SSMs (MambaLRP and its extensions) as a Captum attribution.

    The model runs once under ``composite`` (default :class:`GatedLinearComposite`); relevance
    is ``embedding ⊙ gradient`` of the target logit, which with biases zero sums to that logit.

    Parameters
    ----------
    forward_func : nn.Module
        A token model, e.g. HF ``MambaForCausalLM`` (anything taking ``inputs_embeds=``), or
        a module taking embeddings as its first argument. Its outputs (or ``.logits``) are
        ``(B, L, V)`` — the position ``position`` is explained — or ``(B, V)``.
    composite : zennit.core.Composite, optional
        Registered on ``forward_func`` for the call and removed afterwards.
    embedding : nn.Module, optional
        Maps token ids to embeddings; default ``forward_func.get_input_embeddings()``.
    position : int
        Sequence position whose logits are explained (default: the last).
    """

    def __init__(
        self,
        forward_func: nn.Module,
        composite: Composite | None = None,
        embedding: nn.Module | None = None,
        position: int = -1,
    ) -> None:
        super().__init__(forward_func)
        self.composite = composite if composite is not None else GatedLinearComposite()
        self.embedding = embedding
        self.position = position

    @property
    def multiplies_by_inputs(self) -> bool:
        return True

    def has_convergence_delta(self) -> bool:
        return True

    def _embed(self, inputs: Tensor) -> Tensor:
        embedding = self.embedding
        if embedding is None:
            getter: Callable[[], nn.Module] | None = getattr(self.forward_func, "get_input_embeddings", None)
            if getter is None:
                raise InputError("token-id inputs need an embedding module: pass GatedLinearLRP(..., embedding=...)")
            embedding = getter()
        return embedding(inputs)

    def _call(self, emb: Tensor, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        model = self.forward_func
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "inputs_embeds" in params:
            if "use_cache" in params and "use_cache" not in kwargs:
                kwargs = {**kwargs, "use_cache": False}
            # HF convention: input_ids first; additional args follow it positionally (e.g. attention_mask)
            return _logits(model(None, *args, inputs_embeds=emb, **kwargs))
        return _logits(model(emb, *args, **kwargs))

    @log_usage()
    def attribute(
        self,
        inputs: Tensor,
        target: TargetType = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Relevance of each token (or embedding feature) for the target logit.

        Parameters
        ----------
        inputs : LongTensor (B, L) token ids, or float Tensor (B, L, H) embeddings
        target : int, list of int, (B,) Tensor, ...
            Class index in the logits at ``position`` (Captum ``TargetType``); ``None``
            requires a model output that is already one scalar per example.
        additional_forward_args : tuple, Tensor or dict, optional
            Appended after the inputs (a dict is passed as keyword arguments), e.g.
            ``(attention_mask,)`` for HF models.
        return_convergence_delta : bool
            Also return ``f − Σ relevance`` per example (B,), as Captum's ``LRP`` does.

        Returns
        -------
        Tensor
            ``(B, L)`` relevance per token for token-id inputs (summed over the embedding
            dim); ``(B, L, H)`` for embedding inputs (the input's shape).
        """
        tokens = not inputs.is_floating_point()
        if isinstance(additional_forward_args, dict):
            args, kwargs = (), dict(additional_forward_args)
        else:
            args, kwargs = tuple(_format_additional_forward_args(additional_forward_args) or ()), {}
        with self.composite.context(self.forward_func), torch.enable_grad():
            emb = (self._embed(inputs) if tokens else inputs).detach().requires_grad_(True)
            logits = self._call(emb, args, kwargs)
            if logits.dim() == 3:
                logits = logits[:, self.position]
            selected = _select_targets(logits, target)
            if selected.dim() != 1 or selected.shape[0] != emb.shape[0]:
                raise InputError(
                    f"target {target!r} selects output of shape {tuple(selected.shape)}; expected one scalar per "
                    f"example ({emb.shape[0]},)"
                )
            (grad,) = torch.autograd.grad(selected.sum(), emb)
        relevance = emb.detach() * grad
        if tokens:
            relevance = relevance.sum(-1)
        if return_convergence_delta:
            return relevance, self.compute_convergence_delta(relevance, selected.detach())
        return relevance

    def compute_convergence_delta(self, attributions: Tensor, output: Tensor) -> Tensor:
        """``output − Σ attributions`` per example, shape ``(B,)``.

        For float64 HF models note that transformers casts logits to float32 (``.float()``),
        so the delta includes that rounding (~1e-7 relative) on top of the biases' share.
        """
        summed = attributions.reshape(attributions.shape[0], -1).sum(-1)
        return output.reshape(-1).to(summed.dtype) - summed

    def attribute_future(self) -> None:
        raise NotImplementedError("attribute_future is not implemented for GatedLinearLRP")

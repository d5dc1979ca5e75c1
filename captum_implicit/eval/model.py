"""One view of a token model for the evaluation: ids (or embeddings) + padding mask → read-out logits.

Every metric calls the model through :class:`TokenModel`, so classifiers (``(B, C)`` logits) and
causal LMs (``(B, L, V)`` logits, read at the last real token) are scored the same way.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn


def logits_of(output: Any) -> Tensor:
    """The logits tensor of a model output (a tensor, an HF ``ModelOutput`` or a tuple)."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def last_positions(attention_mask: Tensor) -> Tensor:
    """``(B,)`` index of the last real token of each row (left or right padding; 0 for an empty row)."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, -1).amax(1).clamp_min(0)


def read_out(logits: Tensor, attention_mask: Tensor) -> Tensor:
    """``(B, C)`` logits: unchanged if already 2-D, else read at each row's last real token."""
    if logits.dim() == 2:
        return logits
    if logits.dim() != 3:
        raise ValueError(f"expected (B, C) or (B, L, V) logits, got {tuple(logits.shape)}")
    idx = last_positions(attention_mask).to(logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), idx]


class IdsForward(nn.Module):
    """``forward(input_ids, attention_mask=None)`` → the model's raw output, by keyword.

    HF models do not take the mask as their second positional argument (``MambaForCausalLM``'s is
    ``inputs_embeds``), while Captum-style attributions call ``forward_func(*inputs,
    *additional_forward_args)``. This wrapper fixes the order; being an ``nn.Module`` that contains
    the model, attribution classes that search a module for layers find them inside it.
    """

    def __init__(self, model: nn.Module, **forward_kwargs: Any) -> None:
        super().__init__()
        self.model = model
        self.forward_kwargs = forward_kwargs

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.forward_kwargs)


class TokenModel:
    """A model seen as ``(input_ids, attention_mask) -> (B, C)`` read-out logits.

    Parameters
    ----------
    model : nn.Module
        Called by keyword as ``model(input_ids=..., attention_mask=...)`` or
        ``model(inputs_embeds=..., attention_mask=...)``; ``get_input_embeddings()`` gives the
        embedding used by embedding-level methods. Returns logits (``(B, C)``, or ``(B, L, V)``
        read at the last real token) as a tensor, tuple or HF output.
    forward_kwargs : dict, optional
        Extra keywords for every call. Default: ``use_cache=False`` when the forward accepts it
        (evaluation never needs a recurrent cache).
    """

    def __init__(self, model: nn.Module, forward_kwargs: dict[str, Any] | None = None) -> None:
        self.model = model
        if forward_kwargs is None:
            params = inspect.signature(model.forward).parameters
            forward_kwargs = {"use_cache": False} if "use_cache" in params else {}
        self.forward_kwargs = forward_kwargs
        #: set after the first forward: True when the model returns per-position logits
        self.sequence_output: bool | None = None

    @property
    def ids_forward(self) -> IdsForward:
        """The model as ``forward(input_ids, attention_mask)`` (raw outputs), for Captum-style objects."""
        return IdsForward(self.model, **self.forward_kwargs)

    def embed(self, input_ids: Tensor) -> Tensor:
        """``(B, L, D)`` input embeddings."""
        return self.model.get_input_embeddings()(input_ids)

    def _read(self, output: Any, attention_mask: Tensor) -> Tensor:
        logits = logits_of(output)
        self.sequence_output = logits.dim() == 3
        return read_out(logits, attention_mask)

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(B, C)`` read-out logits of token ids."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self.forward_kwargs)
        return self._read(out, attention_mask)

    def logits_from_embeds(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """``(B, C)`` read-out logits of input embeddings (the forward wrapper of embedding methods)."""
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **self.forward_kwargs)
        return self._read(out, attention_mask)

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.logits(input_ids, attention_mask)

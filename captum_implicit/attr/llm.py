"""Captum's LLM path: ``LLMGradientAttribution`` extended to the implicit-attention methods.

Captum's wrapper asserts ``isinstance(attr_method, SUPPORTED_METHODS)``; we extend that
tuple (captum.md §6, route 1) and ask our methods, on the wrapper's private copy, for the
layout its loop expects: ``(1, n_prompt + i, 1)`` per generated token ``i`` (the model runs on
the prompt plus the ``i`` target tokens before it; the wrapper cuts the last ``i`` and sums
the last dimension). ``plot_token_attr`` / ``plot_seq_attr`` of the returned
``LLMAttributionResult`` then work unchanged.
"""

from __future__ import annotations

from captum._utils.typing import TokenizerLike
from captum.attr import Attribution, LLMGradientAttribution

from ._base import ImplicitAttributionMixin
from .attn_grad import ImplicitAttnGrad
from .published import MambaAttr
from .raw import ImplicitAttention
from .rollout import ImplicitAttentionRollout


class ImplicitLLMAttribution(LLMGradientAttribution):
    """:class:`captum.attr.LLMGradientAttribution` that also accepts the implicit-attention methods.

    Example
    -------
    >>> llm_attr = ImplicitLLMAttribution(ImplicitAttnGrad(model), tokenizer)
    >>> res = llm_attr.attribute(TextTokenInput(prompt, tokenizer), target="a reply")
    >>> res.plot_token_attr(show=False)

    ``res.token_attr[i]`` is the relevance of the prompt tokens for the ``i``-th target token
    (its log-probability for gradient methods; the query row at its position for the
    target-agnostic ones), ``res.seq_attr`` their sum. Cost: one attribution per target token.
    """

    SUPPORTED_METHODS = LLMGradientAttribution.SUPPORTED_METHODS + (
        ImplicitAttnGrad,
        ImplicitAttentionRollout,
        ImplicitAttention,
        MambaAttr,
    )

    def __init__(self, attr_method: Attribution, tokenizer: TokenizerLike) -> None:
        super().__init__(attr_method, tokenizer)  # type: ignore[arg-type]
        if isinstance(self.attr_method, ImplicitAttributionMixin):
            # only the wrapper's shallow copy; the user's instance is untouched
            self.attr_method._sequence_layout = True

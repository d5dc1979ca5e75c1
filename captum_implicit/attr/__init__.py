"""Captum attribution classes built on implicit attention.

* :class:`ImplicitAttnGrad` — attention × gradient rollout (Chefer et al. 2021); ``method="uia"``
  for the published UIA pipeline (Zimerman et al. 2025);
* :class:`ImplicitAttentionRollout` — attention rollout (Abnar & Zuidema 2020);
* :class:`ImplicitAttention` — one layer's raw implicit attention (row or matrix);
* :class:`MambaAttr` — the published Mamba-Attr baseline (Ali et al. 2024);
* :class:`ImplicitLLMAttribution` — Captum's ``LLMGradientAttribution`` accepting all of them.
"""

from .attn_grad import ImplicitAttnGrad
from .llm import ImplicitLLMAttribution
from .published import MambaAttr
from .raw import ImplicitAttention
from .rollout import ImplicitAttentionRollout

__all__ = [
    "ImplicitAttention",
    "ImplicitAttentionRollout",
    "ImplicitAttnGrad",
    "ImplicitLLMAttribution",
    "MambaAttr",
]

"""captum-implicit: exact implicit-attention explanations for gated-linear RNNs and SSMs.

Entry points:

* :func:`implicit_attention` — capture every supported layer's factored attention;
* :class:`LayerAttention` — the per-layer object (``dense``, ``aggregate``, ``row``, ``output``);
* :func:`register_adapter` — support your own layer class;
* Captum attributions: :class:`ImplicitAttnGrad`, :class:`ImplicitAttentionRollout`,
  :class:`ImplicitAttention`, :class:`MambaAttr`, :class:`ImplicitLLMAttribution`.
"""

from .attr import (
    ImplicitAttention,
    ImplicitAttentionRollout,
    ImplicitAttnGrad,
    ImplicitLLMAttribution,
    MambaAttr,
)
from .config import blockwise, config
from .core.attention import LayerAttention
from .core.capture import Capture, implicit_attention
from .core.errors import (
    CaptumImplicitError,
    CaptureError,
    InputError,
    NonFiniteError,
    UnsupportedModelError,
)
from .core.registry import Adapter, register_adapter, supported_classes, unregister_adapter

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "CaptumImplicitError",
    "Capture",
    "CaptureError",
    "ImplicitAttention",
    "ImplicitAttentionRollout",
    "ImplicitAttnGrad",
    "ImplicitLLMAttribution",
    "InputError",
    "LayerAttention",
    "MambaAttr",
    "NonFiniteError",
    "UnsupportedModelError",
    "blockwise",
    "config",
    "implicit_attention",
    "register_adapter",
    "supported_classes",
    "unregister_adapter",
]

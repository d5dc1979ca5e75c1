"""captum-implicit: exact implicit-attention explanations for gated-linear RNNs and SSMs.

Entry points:

* :func:`implicit_attention` — capture every supported layer's factored attention;
* :class:`LayerAttention` — the per-layer object (``dense``, ``aggregate``, ``row``, ``output``);
* :func:`register_adapter` — support your own layer class;
* Captum attributions: :class:`ImplicitAttnGrad`, :class:`ImplicitAttentionRollout`,
  :class:`ImplicitAttention`, :class:`MambaAttr`, :class:`ImplicitLLMAttribution`.
"""

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

# The Captum classes import captum.attr (slow, and not needed to capture matrices): load them on first use.
_ATTR = ("ImplicitAttention", "ImplicitAttentionRollout", "ImplicitAttnGrad", "ImplicitLLMAttribution", "MambaAttr")


def __getattr__(name: str):
    if name in _ATTR:
        from . import attr

        return getattr(attr, name)
    raise AttributeError(f"module 'captum_implicit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

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

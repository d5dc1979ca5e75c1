"""LRP form of ``torch.nn.LayerNorm`` (used by HF RWKV): the LN rule, scale held constant.

``(x − mean x) · rsqrt(var x + ε) · w + b`` with ``rsqrt(var x + ε)`` held constant is linear
in ``x`` (centering is linear), so gradient×input conserves up to the bias ``b``. The value
is torch's own ``F.layer_norm`` (bit for bit); the relevance path is the explicit formula,
joined by :func:`~captum_implicit.lrp.primitives.proportional` (the two differ by float64
rounding only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import hold
from .primitives import proportional


def layer_norm_lrp(module: nn.LayerNorm, rules: GatedLinearRules, input: Tensor) -> Tensor:
    """LRP form of ``nn.LayerNorm.forward(input)``; same shape and value."""
    with torch.no_grad():
        value = F.layer_norm(input, module.normalized_shape, module.weight, module.bias, module.eps)
    if not (torch.is_grad_enabled() and input.requires_grad):
        return value
    dims = tuple(range(-len(module.normalized_shape), 0))
    centred = input - input.mean(dims, keepdim=True)
    scale = torch.rsqrt(input.var(dims, unbiased=False, keepdim=True) + module.eps)
    out = centred * hold(scale, rules.detach_norm)
    if module.weight is not None:
        out = out * module.weight
    if module.bias is not None:
        out = out + module.bias
    return proportional(out, value)


register_lrp_form(
    LRPForm(family="norm", classes=(nn.LayerNorm,), forward=layer_norm_lrp, notes="LN rule: scale held constant"),
    first=False,
)

"""LRP forms of HF transformers' FalconMamba: the Mamba mixer with weight-free RMS norms on Δ, B and C.

``FalconMambaMixer`` is HF Mamba's mixer line for line, except that the ``x_proj`` outputs
``(time_step, B, C)`` pass through ``FalconMambaWeightlessRMSNorm`` (``x · rsqrt(mean x² + ε)`` in float32,
no weight) before ``dt_proj`` and the scan. The forms:

* ``FalconMambaMixer``: Jamba's mixer form (:func:`~captum_implicit.lrp.jamba.jamba_mixer_lrp`, HF Mamba's form
  with the Δ/B/C norms called as modules where HF calls them, as in FalconMamba: identity rule on the SiLUs,
  Ā/B̄/C held, half rule on the gate);
* ``FalconMambaWeightlessRMSNorm``: scale held (LN rule), casts exact. While Ā/B̄/C are held nothing of the
  relevance flows through Δ, B or C, so this rule only matters with ``detach_ssm`` switched off;
* ``FalconMambaRMSNorm`` / ``FalconMambaBlock``: HF Mamba's (identical code).

A call that continues from a cached state is refused (:class:`LRPError`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .canonizers import GatedLinearRules, LRPForm, register_lrp_form
from .common import cast, hold
from .jamba import jamba_mixer_lrp
from .mamba import mamba_block_lrp, rms_norm_lrp
from .primitives import proportional

_HF = "transformers.models.falcon_mamba.modeling_falcon_mamba"


def weightless_rms_norm_lrp(module: nn.Module, rules: GatedLinearRules, x: Tensor) -> Tensor:
    """LRP form of ``FalconMambaWeightlessRMSNorm.forward``: ``(x.float() · rsqrt(mean x² + ε)).type_as(x)``.

    ``x`` is ``(..., d)``, normalised over the last dimension; same shape, dtype and value.
    """
    if rules.detach_norm and rules.exact_casts:
        # the held scale and both casts as one diagonal map (as MambaRMSNorm's form): exact value and conservation
        with torch.no_grad():
            value = type(module).forward(module, x)
        return proportional(x, value)
    h = cast(x, torch.float32, rules)
    scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.eps)
    return cast(h * hold(scale, rules.detach_norm), x.dtype, rules)


for _cls, _fwd, _note in [
    ("FalconMambaMixer", jamba_mixer_lrp,
     "the Mamba form: identity rule on SiLUs, Ā/B̄/C detached, half rule on the gate; Δ/B/C norms inside"),
    ("FalconMambaWeightlessRMSNorm", weightless_rms_norm_lrp, "scale held (LN rule; off the path while Ā/B̄/C held)"),
    ("FalconMambaRMSNorm", rms_norm_lrp, "scale detached (LN rule)"),
    ("FalconMambaBlock", mamba_block_lrp, "residual add; float32 residual cast made exact"),
]:
    register_lrp_form(
        LRPForm(family="falcon_mamba", classes=(f"{_HF}.{_cls}",), forward=_fwd, notes=_note), first=False
    )

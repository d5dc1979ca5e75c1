"""Adapters for HF KDA layers (Kimi-Linear, Bailing-Hybrid, GLM-5-Next).

They call ``chunk_kimi_delta_attention(query, key, value, g, beta, ...)`` as a module
global (``fla``'s ``chunk_kda`` when importable: forced to the torch fallback on CPU) and
apply the sigmoid-gated RMSNorm ``o_norm(out, gate)`` before ``o_proj``.
"""

from __future__ import annotations

from torch import nn

from ..core.capture import Recording
from ..core.registry import Adapter, register_adapter
from ..layers.gated_deltanet import build_delta_rule_attention
from ..layers.kda import KDAAttention
from ._gpu_runs import HF_VARIANTS, ONLY_5_24, default_bounds
from .hf_gated_deltanet import delta_rule_call, norm_inputs

_TF = "transformers.models"


def build_hf_kda(module: nn.Module, rec: Recording, name: str) -> KDAAttention:
    kernel = delta_rule_call(rec, name, "chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")
    return build_delta_rule_attention(  # type: ignore[return-value]
        name, cls=KDAAttention, **kernel, **norm_inputs(module, rec, "o_norm"), module_type=type(module).__name__
    )


_FLA_KDA = "fla's chunk_kda (bound by transformers when fla imports), "
#: per model: what the GPU tests compared against (adapters/_gpu_runs.py)
_GPU = {
    "kimi_linear": _FLA_KDA + default_bounds("tests/test_kda.py"),
    "glm5_next": _FLA_KDA + HF_VARIANTS,
    "bailing_hybrid": f"{_FLA_KDA}{ONLY_5_24}, {HF_VARIANTS}",
}

for _model, _cls in [
    ("kimi_linear", "KimiLinearDeltaAttention"),
    ("bailing_hybrid", "BailingHybridDeltaAttention"),
    ("glm5_next", "Glm5NextTextLinearAttention"),
]:
    _base = f"{_TF}.{_model}.modeling_{_model}"
    register_adapter(
        Adapter(
            family="kda",
            # CPU exactness: tests/test_kda.py (Kimi-Linear), tests/test_hf_variants.py (Bailing, GLM-5-Next)
            padding="honoured (mask on the mixer input)",
            gpu=_GPU[_model],
            classes=(f"{_base}.{_cls}",),
            build=build_hf_kda,
            functions=(
                f"{_base}.chunk_kimi_delta_attention",
                f"{_base}.recurrent_kimi_delta_attention",
                f"{_base}.causal_conv1d_fn",
                f"{_base}.causal_conv1d_update",
            ),
            submodule_inputs=("o_norm",),
            output_module="o_proj",
            notes="per-key-channel decay; values are v after conv+SiLU; sigmoid-gated RMSNorm as row scale",
        ),
        first=False,
    )

"""Adapters for HF Gated DeltaNet layers (Qwen3-Next, Qwen3.5, Qwen3.5-MoE, OLMo-Hybrid, LaraMini, Qwen4-Exp).

The layers call ``torch_chunk_gated_delta_rule(query, key, value, g=, beta=, ...)`` as a
module global; we record it (forcing its pure-torch fallback on CPU, where an importable
``fla`` would crash with "0 active drivers") together with the inputs of the gated output
norm (``norm`` or ``o_norm``: kernel output and gate).
"""

from __future__ import annotations

from torch import nn

from ..core.capture import Recording
from ..core.errors import CaptureError
from ..core.registry import Adapter, register_adapter
from ..layers.gated_deltanet import DeltaRuleAttention, build_delta_rule_attention
from ._common import argument, positional
from ._gpu_runs import HF_VARIANTS, ONLY_5_24, default_bounds

_TF = "transformers.models"


def delta_rule_call(rec: Recording, name: str, chunk_fn: str, step_fn: str) -> dict:
    """Arguments of the chunked delta-rule kernel call, with clear errors for cached decoding."""
    calls = rec.calls_of(chunk_fn)
    if not calls:
        if rec.calls_of(step_fn):
            raise CaptureError(
                f"layer {name!r}: a single-token decode step with a cache was run; explain the full sequence "
                "in one forward with use_cache=False"
            )
        rec.call(chunk_fn)  # raises the standard capture error
    call = calls[0]
    if argument(call, "initial_state") is not None:
        raise CaptureError(
            f"layer {name!r}: the layer continued from a cached recurrent state; explain the full sequence "
            "with use_cache=False"
        )
    query, key, value = positional(call, 3)
    return {
        "query": query,
        "key": key,
        "value": value,
        "g": argument(call, "g"),
        "beta": argument(call, "beta"),
        "use_l2norm": bool(argument(call, "use_qk_l2norm_in_kernel", default=False)),
    }


def norm_inputs(module: nn.Module, rec: Recording, norm_name: str) -> dict:
    """The gated output norm's recorded inputs ``(out, gate)`` and its weight / eps."""
    norm = module.get_submodule(norm_name)
    recorded = rec.submodule_inputs.get(norm_name)
    if not recorded or len(recorded[0]) < 2:
        raise CaptureError(f"expected a call of the gated output norm {norm_name!r} with (output, gate)")
    out, gate = recorded[0][0], recorded[0][1]
    return {
        "norm_out": out,
        "norm_gate": gate,
        "norm_weight": norm.weight,
        "norm_eps": float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))),
        "norm_activation": getattr(norm, "activation", "silu"),
    }


def _builder(norm_name: str):
    def build(module: nn.Module, rec: Recording, name: str) -> DeltaRuleAttention:
        kernel = delta_rule_call(rec, name, "torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")
        return build_delta_rule_attention(
            name,
            cls=DeltaRuleAttention,
            **kernel,
            **norm_inputs(module, rec, norm_name),
            module_type=type(module).__name__,
        )

    return build


def _functions(model: str) -> tuple[str, ...]:
    base = f"{_TF}.{model}.modeling_{model}"
    return (
        f"{base}.torch_chunk_gated_delta_rule",
        f"{base}.torch_recurrent_gated_delta_rule",
        f"{base}.causal_conv1d_fn",
        f"{base}.causal_conv1d_update",
    )


_FLA_GDN = "fla's chunk_gated_delta_rule (bound by transformers when fla imports), "
#: per model: what the GPU tests compared against (adapters/_gpu_runs.py)
_GPU = {
    **dict.fromkeys(
        ["qwen3_next", "olmo_hybrid", "qwen3_5"],
        _FLA_GDN + default_bounds("tests/test_gated_deltanet.py"),
    ),
    **dict.fromkeys(["qwen3_5_moe", "qwen4_exp"], _FLA_GDN + HF_VARIANTS),
    "lara_mini": f"{_FLA_GDN}{ONLY_5_24}, {HF_VARIANTS}",
}

for _model, _cls, _norm, _out in [
    ("qwen3_next", "Qwen3NextGatedDeltaNet", "norm", "out_proj"),
    ("qwen3_5", "Qwen3_5GatedDeltaNet", "norm", "out_proj"),
    ("qwen3_5_moe", "Qwen3_5MoeGatedDeltaNet", "norm", "out_proj"),
    ("olmo_hybrid", "OlmoHybridGatedDeltaNet", "o_norm", "o_proj"),
    ("lara_mini", "LaraMiniGatedDeltaNet", "norm", "out_proj"),
    ("qwen4_exp", "Qwen4ExpTextGatedDeltaNet", "norm", "out_proj"),
]:
    register_adapter(
        Adapter(
            family="gated_deltanet",
            # CPU exactness: tests/test_gated_deltanet.py (Qwen3-Next, Qwen3.5, OLMo-Hybrid) and
            # tests/test_hf_variants.py (Qwen3.5-MoE, LaraMini, Qwen4-Exp)
            padding="honoured (mask on the mixer input)",
            gpu=_GPU[_model],
            classes=(f"{_TF}.{_model}.modeling_{_model}.{_cls}",),
            build=_builder(_norm),
            functions=_functions(_model),
            submodule_inputs=(_norm,),
            output_module=_out,
            notes="values are v after conv+SiLU; the gated RMSNorm is a frozen row scale",
        ),
        first=False,
    )

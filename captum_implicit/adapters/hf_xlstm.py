"""Adapter for HF xLSTM's mLSTM layer (``xLSTMLayer``, transformers' own implementation).

The backend (``mlstm_backend``, an ``xLSTMBackend`` module) is called with keyword
arguments only, so its keyword inputs are recorded; the per-head LayerNorm's input gives
the frozen standard deviations and the ``ogate_act_fn`` (sigmoid) input the output gate.
When the external ``xlstm`` package is installed transformers uses its block classes
instead, which this adapter does not cover.
"""

from __future__ import annotations

from torch import nn

from ..core.capture import Recording
from ..core.errors import CaptureError
from ..core.registry import Adapter, register_adapter
from ..layers.mlstm import MLSTMAttention, build_mlstm_attention


def _recorded(rec: Recording, sub: str, name: str) -> tuple[tuple, dict]:
    args = rec.submodule_inputs.get(sub)
    if not args:
        raise CaptureError(f"layer {name!r}: expected a call of {sub!r} during the layer's forward")
    return args[0], rec.submodule_kwargs.get(sub, [{}])[0]


def build_hf_mlstm(module: nn.Module, rec: Recording, name: str) -> MLSTMAttention:
    args, kwargs = _recorded(rec, "mlstm_backend", name)
    names = ("query", "key", "value", "igate", "fgate", "c_initial", "n_initial", "m_initial")
    inputs = {**dict(zip(names, args, strict=False)), **kwargs}
    if any(inputs.get(k) is not None for k in ("c_initial", "n_initial", "m_initial")):
        raise CaptureError(
            f"layer {name!r}: the layer continued from a cached state; explain the full sequence without a cache"
        )
    (norm_input, *_), _ = _recorded(rec, "multihead_norm", name)
    (ogate, *_), _ = _recorded(rec, "ogate_act_fn", name)
    norm = module.multihead_norm
    config = module.config
    return build_mlstm_attention(
        name,
        query=inputs["query"],
        key=inputs["key"],
        value=inputs["value"],
        igate=inputs["igate"],
        fgate=inputs["fgate"],
        eps=float(config.eps),
        norm_input=norm_input,
        norm_weight=norm.weight,
        norm_bias=norm.bias,
        norm_eps=float(norm.eps),
        norm_float32=bool(norm.force_float32_reductions),
        ogate_preact=ogate,
        module_type=type(module).__name__,
    )


register_adapter(
    Adapter(
        family="mlstm",
        padding="no mask in the model; padding before a query is refused",
        masks_padding=False,
        gpu="HF's native chunkwise kernels on CUDA, float32 ≤ 1e-4, L = 80 (five chunks), H200 "
        "(tests/test_mlstm.py::test_cuda_float32); bf16 untested: HF's own kernel fails in bf16",
        classes=("transformers.models.xlstm.modeling_xlstm.xLSTMLayer",),
        build=build_hf_mlstm,
        submodule_inputs=("mlstm_backend", "multihead_norm", "ogate_act_fn"),
        output_module="out_proj",
        notes="values centered per head (LayerNorm with frozen std); σ(o)·w/σ row scale; σ(o)·b offset",
    ),
    first=False,
)

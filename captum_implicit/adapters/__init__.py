"""Built-in adapters: importing this package registers them (one module per source library and family)."""

from . import (  # noqa: F401
    fla,
    hf_gated_deltanet,
    hf_kda,
    hf_lfm2,
    hf_mamba,
    hf_mamba2,
    hf_minimax,
    hf_recurrent_gemma,
    hf_rwkv,
    hf_softmax,
    hf_xlstm,
    mamba_ssm,
)

"""Built-in adapters: importing this package registers them (one module per source library and family)."""

from . import hf_mamba, hf_recurrent_gemma, hf_rwkv, mamba_ssm  # noqa: F401

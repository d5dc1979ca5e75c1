"""Built-in adapters: importing this package registers them (one module per source library and family)."""

from . import hf_mamba, hf_mamba2, mamba_ssm  # noqa: F401

"""Built-in adapters: importing this package registers them (one module per source library)."""

from . import hf, mamba_ssm  # noqa: F401

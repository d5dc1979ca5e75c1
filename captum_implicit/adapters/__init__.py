"""Built-in adapters: importing this package registers them (one module per source library and family)."""

from . import hf_mamba, mamba_ssm  # noqa: F401
from . import hf_gated_deltanet  # noqa: F401
from . import hf_kda  # noqa: F401
from . import hf_xlstm  # noqa: F401
from . import hf_minimax  # noqa: F401
from . import hf_lfm2  # noqa: F401
from . import hf_softmax  # noqa: F401

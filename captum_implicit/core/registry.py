"""Which module classes are explained by which family, and how their tensors are captured.

An :class:`Adapter` is declarative: the module classes it covers (by qualified
name, so nothing is imported until a model uses them), the module-level kernel
functions to record while such a module runs, the submodules whose inputs to
record, and a ``build`` function turning the recording into a
:class:`~captum_implicit.core.attention.LayerAttention`.

Users register their own layer classes with :func:`register_adapter` (or the
decorator form) — see ``docs/recipes/custom_layer.md``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .attention import LayerAttention
    from .capture import Recording


@dataclass(frozen=True)
class Adapter:
    """How to capture one family of module classes.

    Parameters
    ----------
    family : str
        Family key (``"mamba"``, ``"mamba2"``, ...).
    classes : tuple of str or type
        Module classes covered: ``"package.module.ClassName"`` strings or classes.
    build : callable ``(module, recording, name) -> LayerAttention``
        Turns what was recorded during the module's forward into the factored attention.
    functions : tuple of str
        Fully qualified module-level functions (``"pkg.mod.func"``) to record while the
        module runs; on CPU their pure-torch fallback is forced.
    submodule_inputs : tuple of str
        Submodules whose positional inputs are recorded (e.g. ``"conv1d"``).
    output_module : str or None
        Submodule whose input is the layer output (the output projection); its input is
        recorded and, with gradient tracking, its gradient.
    prepare : callable ``(module) -> undo`` or None
        Temporary per-instance change needed for capture (e.g. ``use_fast_path=False``);
        returns a callable that restores the module.
    prepare_model : callable ``(model) -> undo`` or None
        Called once per capture with the whole captured model, after it is put in eval
        mode, when any of its modules uses this adapter: for state that lives outside the
        explained module (e.g. HF RWKV rescales weights of the whole model in place on its
        first eval forward); returns a callable that restores it.
    cpu : str
        Whether the CPU exactness tests cover this class (for the generated support table).
    padding : str
        How padding masks are handled (for the generated support table).
    masks_padding : bool
        Whether the model keeps padding tokens from acting on the tokens after them when it is given a padding
        mask (the attributions then zero padding columns). False where it ignores the mask: a batch with padding
        before an example's query is refused, since zeroing those columns would misstate what the model did.
    gpu : str
        Which GPU kernels the exactness tests cover (for the generated support table).
    notes : str
        Anything else a user should know (for the generated support table).
    """

    family: str
    classes: tuple[str | type, ...]
    build: Callable[[nn.Module, Recording, str], LayerAttention]
    functions: tuple[str, ...] = ()
    submodule_inputs: tuple[str, ...] = ()
    output_module: str | None = "out_proj"
    prepare: Callable[[nn.Module], Callable[[], None]] | None = None
    prepare_model: Callable[[nn.Module], Callable[[], None]] | None = None
    cpu: str = "yes"
    padding: str = ""
    masks_padding: bool = True
    gpu: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def matches(self, module: nn.Module) -> bool:
        cls = type(module)
        qual = f"{cls.__module__}.{cls.__qualname__}"
        return any(c is cls if isinstance(c, type) else c == qual for c in self.classes)


_ADAPTERS: list[Adapter] = []
#: find_adapter's answers per module class, emptied by every (un)registration: an explanation asks it for every
#: module of the model, which was ≈ 70 µs each through the whole list (≈ 30 ms for a 24-layer Mamba, GPU idle)
_BY_CLASS: weakref.WeakKeyDictionary[type, Adapter | None] = weakref.WeakKeyDictionary()


def register_adapter(adapter: Adapter, *, first: bool = True) -> Adapter:
    """Register ``adapter``; user registrations take precedence over built-ins (``first=True``)."""
    if first:
        _ADAPTERS.insert(0, adapter)
    else:
        _ADAPTERS.append(adapter)
    _BY_CLASS.clear()
    return adapter


def unregister_adapter(adapter: Adapter) -> None:
    """Remove a previously registered adapter."""
    _ADAPTERS.remove(adapter)
    _BY_CLASS.clear()


def adapters() -> list[Adapter]:
    """All registered adapters, in lookup order (built-ins are loaded on first use)."""
    from .. import adapters as _builtin  # noqa: F401  (registers the built-in adapters)

    return list(_ADAPTERS)


def find_adapter(module: nn.Module) -> Adapter | None:
    """The adapter that handles ``module``'s class, or ``None``."""
    cls = type(module)
    if cls not in _BY_CLASS:
        _BY_CLASS[cls] = next((adapter for adapter in adapters() if adapter.matches(module)), None)
    return _BY_CLASS[cls]


def supported_classes() -> list[str]:
    """Qualified names of every supported module class."""
    names: list[str] = []
    for adapter in adapters():
        for c in adapter.classes:
            names.append(c if isinstance(c, str) else f"{c.__module__}.{c.__qualname__}")
    return names

"""Leave the user's model exactly as it was: modes, ``requires_grad``, hooks, patched globals."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from torch import nn


class ModelGuard(AbstractContextManager):
    """Snapshot train/eval modes and ``requires_grad`` on enter; undo every registered change on exit.

    Changes are registered with :meth:`add_undo` (hook handles, patched functions,
    per-instance attributes) and undone in reverse order, also when the body raises.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._modes: list[tuple[nn.Module, bool]] = []
        self._grads: list[tuple[nn.Parameter, bool]] = []
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> ModelGuard:
        self._modes = [(m, m.training) for m in self.model.modules()]
        self._grads = [(p, p.requires_grad) for p in self.model.parameters()]
        return self

    def add_undo(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def patch_attribute(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)`` until exit (restores or deletes the attribute)."""
        missing = object()
        old = obj.__dict__.get(name, missing) if hasattr(obj, "__dict__") else getattr(obj, name, missing)
        setattr(obj, name, value)

        def undo() -> None:
            if old is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

        self._undo.append(undo)

    def patch_function(self, qualified: str, wrapper_factory: Callable[[Callable], Callable]) -> bool:
        """Replace module-level function ``pkg.mod.func`` by ``wrapper_factory(original)``.

        Returns ``False`` when the module is not imported or has no such function.
        """
        mod_name, _, fn_name = qualified.rpartition(".")
        try:
            module = importlib.import_module(mod_name)
        except Exception:  # the optional package is absent (or, like mamba_ssm on CPU, fails to import)
            return False
        original = getattr(module, fn_name, None)
        if original is None:
            return False
        self.patch_attribute(module, fn_name, wrapper_factory(original))
        return True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        errors = []
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except Exception as e:  # keep undoing; report afterwards
                errors.append(e)
        for m, mode in self._modes:
            m.training = mode
        for p, flag in self._grads:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        if errors and exc is None:
            raise errors[0]

"""Helpers shared by adapters: reading recorded kernel calls in a version-robust way."""

from __future__ import annotations

from typing import Any

from ..core.capture import Call


def positional(call: Call, count: int) -> list[Any]:
    """The first ``count`` arguments of ``call`` in the order of the function's parameters.

    mamba-ssm and transformers name the scan's parameters differently (``u, delta`` vs
    ``hidden_states, dt``) but agree on their order.
    """
    values = [v for k, v in call.arguments.items() if k != "args"]
    if "args" in call.arguments:
        values = list(call.arguments["args"]) + values
    return values[:count]


def argument(call: Call, *names: str, default: Any = None) -> Any:
    """The first of ``names`` present among ``call``'s arguments."""
    for name in names:
        if name in call.arguments:
            return call.arguments[name]
    return default

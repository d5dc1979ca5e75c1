"""Run a model once and capture every supported layer's implicit attention.

The capture records exactly the tensors the model used — the arguments of the
kernel functions it called (``mamba_selective_scan``, ``causal_conv1d_fn``, ...),
inputs of chosen submodules, the input of the output projection — so the
factored attention mirrors the model's own numerics. Everything is undone on
exit (see :class:`~captum_implicit.core.guard.ModelGuard`).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from .attention import LayerAttention
from .errors import CaptureError, InputError, NonFiniteError, UnsupportedModelError
from .guard import ModelGuard
from .registry import Adapter, find_adapter


@dataclass
class Call:
    """One recorded call of a kernel function: arguments bound to the original's parameter names."""

    name: str
    arguments: dict[str, Any]
    output: Any
    torch_fallback: bool  # True when the pure-torch implementation ran


@dataclass
class Recording:
    """What one supported module did during one forward."""

    name: str
    module: nn.Module
    adapter: Adapter
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    submodule_inputs: dict[str, list[tuple]] = field(default_factory=dict)
    submodule_kwargs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # keyword inputs, same order
    output_input: Tensor | None = None  # the tensor entering the output projection
    output: Any = None
    attention: LayerAttention | None = None
    track_grad: bool = False  # the capture records output gradients (a backward pass will follow)

    def call(self, name: str, index: int = 0) -> Call:
        """The ``index``-th recorded call of function ``name`` (raises a clear error if absent)."""
        found = [c for c in self.calls if c.name == name]
        if len(found) <= index:
            raise CaptureError(
                f"layer {self.name!r} ({type(self.module).__name__}): expected a call of {name!r} during its "
                f"forward, recorded {[c.name for c in self.calls]}. The module may be on a fused path that "
                "cannot be observed; use model.eval() and no cache."
            )
        return found[index]

    def calls_of(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]


#: qualified kernel name -> wrapper of its pure-torch fallback with the same forward values and a cheaper
#: backward (e.g. ``adapters._scan_backward``); registered by adapters, used where the capture forces the fallback
FALLBACK_WRAPPERS: dict[str, Callable[[Callable], Callable]] = {}


def torch_fallback_of(fn: Callable) -> Callable | None:
    """The pure-torch implementation behind a transformers kernel wrapper, if ``fn`` is one.

    transformers (5.15+) binds optional CUDA packages at import time with no device
    check; the wrapper keeps ``torch_function`` in its closure. Wrappers of wrappers are
    unwrapped to the innermost torch function.
    """
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ is None:
        return None
    cells = dict(zip(code.co_freevars, fn.__closure__, strict=False))
    if "torch_function" in cells and "implementation" in cells:
        inner = cells["torch_function"].cell_contents
        return torch_fallback_of(inner) or inner
    wrapped = getattr(fn, "__wrapped__", None)
    return torch_fallback_of(wrapped) if wrapped is not None and wrapped is not fn else None


def _on_cpu(args: tuple, kwargs: dict) -> bool:
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            return a.device.type == "cpu"
    return False


class Capture:
    """Context manager that captures every supported layer of ``model`` during the forwards run inside it.

    Parameters
    ----------
    model : nn.Module
        Any module containing registered layers (HF model, mamba-ssm model, a single mixer).
    track_grad : bool
        Also record the gradient reaching each layer's output during a backward pass
        (available as ``LayerAttention.output_grad``).
    eval_mode : bool
        Put the model in eval mode while capturing (fused training-only paths cannot
        be observed); the original modes are restored on exit.
    build : bool
        Build each layer's :class:`LayerAttention` (default). ``False`` keeps only each call's
        arguments and output (``recordings``), for runs that rebuild layers one at a time.

    Attributes
    ----------
    layers : list of LayerAttention
        One entry per supported layer call, in forward order.
    """

    def __init__(
        self, model: nn.Module, track_grad: bool = False, eval_mode: bool = True, build: bool = True
    ) -> None:
        self.model = model
        self.track_grad = track_grad
        self.eval_mode = eval_mode
        self.build = build
        #: while True, layer calls run on the capture's path (torch fallbacks, unfused) but are not recorded
        self.paused = False
        self.recordings: list[Recording] = []
        self._stack: list[Recording] = []
        self._guard = ModelGuard(model)
        self._targets: list[tuple[str, nn.Module, Adapter]] = []
        #: built layers whose finiteness flags have not been read yet (see :meth:`check_finite`)
        self._unchecked: list[tuple[LayerAttention, list[str], Tensor]] = []

    @property
    def layers(self) -> list[LayerAttention]:
        """The built layers, in forward order; raises :class:`NonFiniteError` if a captured factor is not finite."""
        self.check_finite()
        return [r.attention for r in self.recordings if r.attention is not None]

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` naming the first layer (in forward order) built since the last check
        whose captured factors hold a NaN or an infinity. The flags of all those layers are read at once: on a
        GPU each read is a synchronisation, and one per layer in the forward would leave the GPU idle while the
        next layer's work is being issued."""
        pending, self._unchecked = self._unchecked, []
        _raise_if_not_finite(pending)

    # ------------------------------------------------------------------ setup
    def __enter__(self) -> Capture:
        for name, module in self.model.named_modules():
            adapter = find_adapter(module)
            if adapter is not None:
                self._targets.append((name, module, adapter))
        if not self._targets:
            from .registry import supported_classes

            kinds = sorted({type(m).__name__ for m in self.model.modules()})
            raise UnsupportedModelError(
                f"{type(self.model).__name__} contains no supported layer (module types found: "
                f"{', '.join(kinds[:20])}{' ...' if len(kinds) > 20 else ''}). Supported: "
                f"{', '.join(c.rsplit('.', 1)[-1] for c in supported_classes())}. Register a custom layer with "
                "captum_implicit.register_adapter."
            )
        self._guard.__enter__()
        try:
            if self.eval_mode:
                self.model.eval()
            prepared: list[Adapter] = []
            for _, _, adapter in self._targets:
                if adapter.prepare_model is not None and not any(a is adapter for a in prepared):
                    prepared.append(adapter)
                    self._guard.add_undo(adapter.prepare_model(self.model))
            patched: set[str] = set()
            for name, module, adapter in self._targets:
                self._instrument(name, module, adapter)
                for qualified in adapter.functions:
                    if qualified not in patched:
                        patched.add(qualified)
                        self._guard.patch_function(qualified, functools.partial(self._recorder, qualified))
        except BaseException:
            self._guard.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.clear()
        self._guard.__exit__(exc_type, exc, tb)
        if exc is not None:
            self._raise_earlier_non_finite(exc)

    def _raise_earlier_non_finite(self, failure: BaseException) -> None:
        """A forward or a build failed: if a layer built before it was not finite, that is the cause to report."""
        try:
            self.check_finite()
        except NonFiniteError as non_finite:
            raise non_finite from failure

    def _instrument(self, name: str, module: nn.Module, adapter: Adapter) -> None:
        guard = self._guard
        if adapter.prepare is not None:
            guard.add_undo(adapter.prepare(module))

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.paused:
                return
            rec = Recording(
                name=name, module=mod, adapter=adapter, args=args, kwargs=dict(kwargs), track_grad=self.track_grad
            )
            self._stack.append(rec)

        def post_hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.paused:
                return
            if not self._stack or self._stack[-1].module is not mod:
                raise CaptureError(f"layer {name!r}: capture stack out of order (re-entrant forward?)")
            rec = self._stack.pop()
            rec.output = output
            if self.build:
                rec.attention = self._build(rec)
            else:  # keep the call, drop what only a build needs
                rec.calls, rec.submodule_inputs, rec.submodule_kwargs, rec.output_input = [], {}, {}, None
            self.recordings.append(rec)

        guard.add_undo(module.register_forward_pre_hook(pre_hook, with_kwargs=True).remove)
        guard.add_undo(module.register_forward_hook(post_hook, with_kwargs=True).remove)

        for sub in adapter.submodule_inputs:
            submodule = _get_submodule(module, sub)
            if submodule is not None:
                hook = self._submodule_hook(module, sub)
                guard.add_undo(submodule.register_forward_pre_hook(hook, with_kwargs=True).remove)
        if adapter.output_module is not None:
            out_mod = _get_submodule(module, adapter.output_module)
            if out_mod is not None:
                guard.add_undo(out_mod.register_forward_pre_hook(self._output_hook(module)).remove)

    def _current(self, owner: nn.Module | None = None) -> Recording | None:
        if not self._stack:
            return None
        rec = self._stack[-1]
        return rec if owner is None or rec.module is owner else None

    def _submodule_hook(self, owner: nn.Module, sub: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            rec = self._current(owner)
            if rec is not None:
                rec.submodule_inputs.setdefault(sub, []).append(args)
                rec.submodule_kwargs.setdefault(sub, []).append(dict(kwargs))

        return hook

    def _output_hook(self, owner: nn.Module) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            rec = self._current(owner)
            if rec is None or not args or not isinstance(args[0], Tensor):
                return
            rec.output_input = args[0]
            if self.track_grad and args[0].requires_grad:
                # a weak reference: the recording holds this tensor (output_input), and a hook holding the
                # recording would close a cycle through the tensor's hook table that Python's collector cannot
                # break, keeping every captured factor of the call alive after the explanation
                args[0].register_hook(functools.partial(self._store_grad, weakref.ref(rec)))

        return hook

    @staticmethod
    def _store_grad(rec_ref: weakref.ref[Recording], grad: Tensor) -> None:
        rec = rec_ref()
        if rec is not None and rec.attention is not None:
            rec.attention.set_output_grad(grad)

    def _recorder(self, qualified: str, original: Callable) -> Callable:
        short = qualified.rpartition(".")[2]
        fallback = torch_fallback_of(original)
        faster = FALLBACK_WRAPPERS.get(qualified)
        run_fallback = faster(fallback) if faster is not None and fallback is not None else fallback
        try:
            signature = inspect.signature(fallback or original)
        except (TypeError, ValueError):
            signature = None

        @functools.wraps(original)
        def recorder(*args: Any, **kwargs: Any) -> Any:
            rec = self._current()
            use_torch = fallback is not None and _on_cpu(args, kwargs)
            fn = run_fallback if use_torch else original
            out = fn(*args, **kwargs)
            if rec is not None:
                if signature is not None:
                    try:
                        bound = signature.bind(*args, **kwargs)
                        arguments = dict(bound.arguments)
                        extra = arguments.pop("kwargs", {})
                        arguments.update(extra if isinstance(extra, dict) else {})
                    except TypeError:
                        arguments = {"args": args, **kwargs}
                else:
                    arguments = {"args": args, **kwargs}
                torch_ran = use_torch or fallback is None or _implementation_is_torch(original)
                rec.calls.append(Call(short, arguments, out, torch_ran))
            return out

        return recorder

    def _build(self, rec: Recording) -> LayerAttention:
        try:
            attn = rec.adapter.build(rec.module, rec, rec.name)
        except (CaptureError, NonFiniteError) as e:
            self._raise_earlier_non_finite(e)
            raise
        except Exception as e:
            self._raise_earlier_non_finite(e)
            raise CaptureError(f"layer {rec.name!r} ({type(rec.module).__name__}): could not build: {e}") from e
        freeze(attn)
        flags = _finite_flags(attn)
        if flags is not None:
            self._unchecked.append((attn, *flags))
        return attn


def _implementation_is_torch(fn: Callable) -> bool:
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ is None:
        return False
    cells = dict(zip(code.co_freevars, fn.__closure__, strict=False))
    if "implementation" in cells and "torch_function" in cells:
        return cells["implementation"].cell_contents is cells["torch_function"].cell_contents
    return False


def _get_submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def freeze(attn: LayerAttention) -> None:
    """Detach every captured factor: the explanation is a snapshot of this forward, and a factor that
    still requires grad (e.g. a view of a conv weight) would make every blockwise reduction build a graph."""
    for key, value in list(vars(attn).items()):
        if isinstance(value, Tensor) and value.requires_grad:
            setattr(attn, key, value.detach())


def _finite_flags(attn: LayerAttention) -> tuple[list[str], Tensor] | None:
    """The names of ``attn``'s floating-point factors and, on the device (not read), each one's largest magnitude
    in float64: finite exactly when the factor is (a NaN propagates through the maximum, and float64 holds every
    float32 maximum). One reduction per factor, where ``isfinite(v).all()`` launches five kernels."""
    floats = {k: v for k, v in vars(attn).items() if isinstance(v, Tensor) and v.is_floating_point() and v.numel()}
    if not floats:
        return None
    device = next(iter(floats.values())).device
    largest = [torch.linalg.vector_norm(v, float("inf"), dtype=torch.float64).to(device) for v in floats.values()]
    return list(floats), torch.stack(largest)


def _raise_if_not_finite(pending: list[tuple[LayerAttention, list[str], Tensor]]) -> None:
    """Read the flags of :func:`_finite_flags` for several layers at once; raise for the first false one."""
    if not pending:
        return
    device = pending[0][2].device
    finite = torch.isfinite(torch.cat([flags.to(device) for _, _, flags in pending])).tolist()
    names = [(attn, key) for attn, keys, _ in pending for key in keys]
    for (attn, key), ok in zip(names, finite, strict=True):
        if not ok:
            raise NonFiniteError(
                f"layer {attn.name!r}: captured tensor {key!r} contains NaN or infinite values; the model's "
                "forward pass is not finite for this input (check the input and the weights)."
            )


def implicit_attention(model: nn.Module, *args: Any, **kwargs: Any) -> list[LayerAttention]:
    """Run ``model(*args, **kwargs)`` once and return every supported layer's implicit attention.

    Parameters
    ----------
    model : nn.Module
        A model containing supported layers (HF transformers, mamba-ssm, or registered classes).
    *args, **kwargs
        Passed to ``model`` unchanged. The forward runs in eval mode and without
        gradient tracking; the model's modes, hooks and ``requires_grad`` flags are
        restored afterwards, also when the forward raises.

    Returns
    -------
    list of LayerAttention
        One entry per supported layer call, in forward order.

    Raises
    ------
    UnsupportedModelError
        The model has no supported layer.
    NonFiniteError
        An input or captured tensor is NaN/inf.
    """
    check_inputs(model, args, kwargs)
    with Capture(model) as cap, torch.no_grad():
        model(*args, **kwargs)
    return cap.layers


def check_inputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Validate HF-style inputs before running the model, so that mistakes get a clear error.

    Checks: no NaN/inf in floating inputs; ``input_ids`` (first positional or keyword) are integer
    ``(batch, length)``; ``inputs_embeds`` are floating ``(batch, length, hidden)`` with the embedding width;
    ``attention_mask`` has the same ``(batch, length)``.
    """
    for key, value in [*enumerate(args), *kwargs.items()]:
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"model input {key!r} contains NaN or infinite values")
    if not hasattr(model, "get_input_embeddings"):
        return
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
    embeds = kwargs.get("inputs_embeds")
    shape = None
    if ids is not None:
        if ids.is_floating_point() or ids.is_complex():
            raise InputError(
                f"input_ids must be integer token ids, got dtype {ids.dtype}; pass embeddings as inputs_embeds="
            )
        if ids.dim() != 2:
            raise InputError(f"input_ids must have shape (batch, length), got {tuple(ids.shape)}")
        shape = tuple(ids.shape)
    if embeds is not None:
        if not embeds.is_floating_point():
            raise InputError(f"inputs_embeds must be floating point, got dtype {embeds.dtype}")
        emb = model.get_input_embeddings()
        width = getattr(emb, "embedding_dim", None)
        if embeds.dim() != 3 or (width is not None and embeds.shape[-1] != width):
            raise InputError(
                f"inputs_embeds must have shape (batch, length, {width}), got {tuple(embeds.shape)}"
            )
        shape = tuple(embeds.shape[:2])
    mask = kwargs.get("attention_mask")
    if mask is not None and shape is not None and tuple(mask.shape) != shape:
        raise InputError(f"attention_mask has shape {tuple(mask.shape)}, expected {shape} (batch, length)")

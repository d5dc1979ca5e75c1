"""Exceptions raised by captum-implicit. Each names the problem and what to do."""

from __future__ import annotations


class CaptumImplicitError(Exception):
    """Base class of every error raised by captum-implicit."""


class UnsupportedModelError(CaptumImplicitError, TypeError):
    """The model contains no layer that any registered adapter supports."""


class CaptureError(CaptumImplicitError, RuntimeError):
    """A supported layer ran, but its tensors could not be captured as expected."""


class NonFiniteError(CaptumImplicitError, FloatingPointError):
    """A captured tensor (or a model input) contains NaN or infinite values."""


class InputError(CaptumImplicitError, ValueError):
    """An input has the wrong shape, dtype or value."""

"""Typed errors for everything a user can cause.

Every message is one line that says what was wrong and what to do about it. The CLI prints
``error: <message>`` and exits with code 2 for any :class:`LowbitError`.
"""

from __future__ import annotations


class LowbitError(Exception):
    """Base class of all errors a user can cause (bad input, bad arguments, bad files)."""


class InputFileError(LowbitError):
    """A model, text or tensor file is missing, truncated, corrupt or of an unsupported kind."""


class UnsupportedArchitectureError(LowbitError):
    """The model's architecture is not in the registry."""


class SchemeError(LowbitError):
    """A quantization scheme name or its parameters are invalid."""


class ShapeError(LowbitError):
    """A tensor cannot be quantized as asked (shape does not fit the format)."""


class NonFiniteWeightError(LowbitError):
    """A weight tensor holds NaN or Inf values."""


class OutputExistsError(LowbitError):
    """The output path exists and --force was not given."""


class ArgumentError(LowbitError):
    """A command-line or API argument is out of range."""

"""The method contract: one linear layer at a time.

A method takes a weight ``(out_features, in_features)``, the codec, and whatever calibration statistics
it declared (``needs``), and returns the codec's quantized result. It never sees a file or a model.
Methods register themselves by name; the CLI's ``--method`` choices come from this registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from lowbit.errors import SchemeError
from lowbit.formats.base import Codec, QuantizedTensor

METHODS: dict[str, type[Method]] = {}


class Method(ABC):
    """Base of quantization methods; subclasses set ``name`` and are registered on definition."""

    name: ClassVar[str]
    # Calibration statistics the method consumes, by accumulator name (e.g. "hessian"); empty = none.
    needs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", None):
            METHODS[cls.name] = cls

    @abstractmethod
    def quantize_linear(
        self, weight: torch.Tensor, codec: Codec, stats: dict[str, torch.Tensor] | None = None
    ) -> QuantizedTensor:
        """Quantize one linear weight ``(out, in)`` with ``codec``."""


def get_method(name: str) -> Method:
    # Import the built-in methods so that they register.
    from lowbit.methods import gptq, rtn  # noqa: F401

    cls = METHODS.get(name)
    if cls is None:
        raise SchemeError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return cls()

"""LLM.int8() (Dettmers et al. 2022): int8 weight rows, with the outlier problem measured.

The weights are rounded to int8 per output row (bitsandbytes' vector-wise quantization,
:class:`~lowbit.formats.int8.Int8RowCodec`); the mixed-precision decomposition happens at run time,
on the activations (:class:`~lowbit.formats.activations.LLMInt8`). Given calibration text, the method
also counts each linear's *outlier features*: input columns where some calibration token reaches the
threshold in magnitude — the columns bitsandbytes keeps in 16-bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lowbit.errors import ArgumentError
from lowbit.formats.activations import count_outlier_features
from lowbit.formats.base import Codec, QuantizedTensor
from lowbit.methods.base import Method


class LLMInt8Method(Method):
    name = "llm-int8"
    needs = ("absmax",)
    activation_method = "LLM.int8()'s 8-bit activations with outlier features"
    calibration_optional = True
    default_scheme = "int8"

    def __init__(self, threshold: float = 6.0) -> None:
        if not threshold > 0:
            raise ArgumentError(f"--threshold must be > 0 (bitsandbytes' default is 6.0), not {threshold}")
        self.threshold = float(threshold)

    def quantize_linear(
        self, weight: torch.Tensor, codec: Codec, stats: dict[str, torch.Tensor] | None = None
    ) -> QuantizedTensor:
        return codec.quantize(weight)

    def describe_layer(self, stats: Mapping[str, torch.Tensor]) -> dict[str, float]:
        absmax = stats.get("absmax")
        if absmax is None:
            return {}
        return {
            "outlier_features": float(count_outlier_features(absmax, self.threshold)),
            "input_absmax": float(absmax.max()),
        }

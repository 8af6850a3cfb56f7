"""Round-to-nearest: each weight goes to the nearest code of the codec, with no calibration."""

from __future__ import annotations

import torch

from lowbit.formats.base import Codec, QuantizedTensor
from lowbit.methods.base import Method


class RTN(Method):
    name = "rtn"

    def quantize_linear(
        self, weight: torch.Tensor, codec: Codec, stats: dict[str, torch.Tensor] | None = None
    ) -> QuantizedTensor:
        return codec.quantize(weight)


class WeightedRTN(RTN):
    """Round-to-nearest guided by each input column's importance (mean ``x²`` over the calibration
    tokens): ggml's quantizers with an importance matrix, the matrix computed in the walk itself (what
    ``llama-imatrix`` + ``llama-quantize --imatrix`` do, in one pass). What ``--method rtn --calib TEXT``
    runs for GGUF mixes; codecs without a parameter search ignore the importance."""

    name = ""  # not a --method of its own
    needs = ("importance",)

    def quantize_linear(
        self, weight: torch.Tensor, codec: Codec, stats: dict[str, torch.Tensor] | None = None
    ) -> QuantizedTensor:
        return codec.quantize_weighted(weight, None if stats is None else stats.get("importance"))

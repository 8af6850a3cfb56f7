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

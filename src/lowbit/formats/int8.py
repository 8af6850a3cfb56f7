"""bitsandbytes' vector-wise int8 weights (LLM.int8()): one absmax per output row, codes ``round(w * 127 /
absmax)`` computed from the fp16 weight, as ``bitsandbytes.functional.int8_vectorwise_quant`` does when
``transformers`` loads a model with ``load_in_8bit``.

The stored tensors are bitsandbytes' ``CB`` (int8, ``(out, in)``) and ``SCB`` (float32 row absmax,
``(out,)``); the weight is ``CB * SCB / 127``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.errors import NonFiniteWeightError, ShapeError
from lowbit.formats.base import Codec, QuantizedTensor


@dataclass(frozen=True)
class Int8RowQuantized(QuantizedTensor):
    codes: torch.Tensor  # (out, in) int8
    row_absmax: torch.Tensor  # (out,) float32 — bitsandbytes' SCB
    codec: Int8RowCodec


@dataclass(frozen=True)
class Int8RowCodec(Codec):
    """LLM.int8() weights: int8 per output row, scale absmax / 127 (bitsandbytes' convention)."""

    @property
    def name(self) -> str:
        return "int8 rows (LLM.int8)"

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        return 8 * math.prod(shape) + 32 * shape[0]

    def quantize(self, w: torch.Tensor) -> Int8RowQuantized:
        if w.ndim != 2 or w.numel() == 0:
            raise ShapeError(f"LLM.int8() quantizes 2-D linear weights, not shape {tuple(w.shape)}")
        if not w.is_floating_point():
            raise ShapeError(f"expected a floating-point weight, got {w.dtype}")
        w32 = w.detach().float()
        # (isfinite on fp16 is slow on CPU: check the float32 values against fp16's range instead)
        if not bool(w32.abs().amax() <= torch.finfo(torch.float16).max):
            raise NonFiniteWeightError(
                "weight holds NaN or Inf values (or values beyond fp16's range, which LLM.int8() casts to); "
                "fix or exclude the tensor"
            )
        w16 = w32.to(torch.float16)
        absmax = w16.abs().amax(dim=1).float()
        codes = torch.round(w16 * (127.0 / absmax.unsqueeze(-1)))
        codes = torch.where(absmax.unsqueeze(-1) == 0, torch.zeros_like(codes), codes).to(torch.int8)
        return Int8RowQuantized(shape=tuple(w.shape), codes=codes, row_absmax=absmax, codec=self)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if not isinstance(q, Int8RowQuantized):
            raise TypeError(f"Int8RowCodec cannot dequantize {type(q).__name__}")
        return q.codes.float() * (q.row_absmax.float().unsqueeze(1) / 127.0)

"""FP8 codecs: float8 e4m3 (``torch.float8_e4m3fn``) and e5m2 (``torch.float8_e5m2``) with float32 scales.

The convention is compressed-tensors' (llm-compressor's ``FP8`` / ``FP8_DYNAMIC`` weight schemes,
``calculate_qparams`` for float types):

* ``scale = absmax / finfo(fp8).max`` per block (448 for e4m3, 57344 for e5m2), in float32; a block of
  zeros gets ``finfo(float32).eps`` instead of 0, so that nothing divides by zero;
* ``codes = clamp(w / scale, -max, max).to(fp8)`` (round to nearest, ties to even);
* ``w ≈ codes.float() * scale``.

Granularity is a :class:`~lowbit.formats.base.Block`: per tensor ``Block(None, None)``, per output
channel ``Block(1, None)`` (the default), or any block shape (e.g. ``Block(128, 128)``, DeepSeek-style);
ragged edge blocks get their own scale. Scales are stored as the grid ``block.grid(shape)``: per
channel that is ``(out_features, 1)``, compressed-tensors' ``weight_scale`` shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from lowbit.errors import NonFiniteWeightError, SchemeError, ShapeError
from lowbit.formats.affine import block_reduce, expand_blocks
from lowbit.formats.base import PER_CHANNEL, Block, Codec, QuantizedTensor


class Fp8Format(Enum):
    """The two OCP FP8 formats torch stores natively."""

    E4M3 = "e4m3"
    E5M2 = "e5m2"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self is Fp8Format.E4M3 else torch.float8_e5m2

    @property
    def max(self) -> float:
        """Largest finite value: 448 (e4m3fn) or 57344 (e5m2)."""
        return float(torch.finfo(self.dtype).max)


@dataclass(frozen=True)
class Fp8Quantized(QuantizedTensor):
    """Result of :class:`Fp8Codec`.

    ``codes``: ``(out, in)`` in ``codec.fmt.dtype`` (a 1-D weight is stored as one row).
    ``scales``: float32, ``codec.block.grid((out, in))``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    codec: Fp8Codec


@dataclass(frozen=True)
class Fp8Codec(Codec):
    fmt: Fp8Format = Fp8Format.E4M3
    block: Block = PER_CHANNEL

    def __post_init__(self) -> None:
        if not isinstance(self.fmt, Fp8Format):
            raise SchemeError(f"fmt must be an Fp8Format (e4m3 or e5m2), not {self.fmt!r}")
        for n in (self.block.rows, self.block.cols):
            if n is not None and n < 1:
                raise SchemeError(f"block sizes must be positive, not {self.block}")

    @property
    def name(self) -> str:
        return f"fp8-{self.fmt.value} {self.block.label}"

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        rows, cols = _as_2d(shape)
        gr, gc = self.block.grid((rows, cols))
        return 8 * rows * cols + 32 * gr * gc

    # ----------------------------------------------------------------- primitives
    def choose_scales(self, w: torch.Tensor) -> torch.Tensor:
        """Float32 scale grid for ``w`` (out, in)."""
        absmax = block_reduce(w.float().abs(), self.block, "amax")
        scale = absmax / self.fmt.max
        eps = torch.finfo(torch.float32).eps
        return torch.where(scale == 0, torch.full_like(scale, eps), scale)

    def quantize_with(self, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """FP8 codes (shape of ``w``) for a scale grid (or scales already expanded to ``w``'s shape)."""
        s = scales if tuple(scales.shape) == tuple(w.shape) else expand_blocks(scales, self.block, _shape2(w))
        m = self.fmt.max
        return (w.float() / s.float()).clamp(-m, m).to(self.fmt.dtype)

    # ----------------------------------------------------------------- codec API
    def quantize(self, w: torch.Tensor) -> Fp8Quantized:
        if not w.is_floating_point():
            raise ShapeError(f"expected a floating-point weight, got {w.dtype}")
        w2 = w.detach().reshape(_as_2d(tuple(w.shape))).float()
        if not torch.isfinite(w2).all():
            raise NonFiniteWeightError("weight holds NaN or Inf values; fix or exclude the tensor")
        scales = self.choose_scales(w2)
        codes = self.quantize_with(w2, scales)
        return Fp8Quantized(shape=tuple(w.shape), codes=codes, scales=scales, codec=self)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if not isinstance(q, Fp8Quantized):
            raise TypeError(f"Fp8Codec cannot dequantize {type(q).__name__}")
        s = expand_blocks(q.scales, self.block, _shape2(q.codes))
        return (q.codes.float() * s).reshape(q.shape)


def _shape2(t: torch.Tensor) -> tuple[int, int]:
    return t.shape[0], t.shape[1]


def _as_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) != 2:
        raise ShapeError(f"fp8 codecs take 1-D or 2-D weights, not shape {tuple(shape)}")
    return shape[0], shape[1]

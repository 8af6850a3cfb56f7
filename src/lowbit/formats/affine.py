"""Affine integer codecs, 2..8 bits, symmetric and asymmetric, any block granularity.

Conventions (shared by every exporter, which converts where its format differs):

* symmetric: signed codes ``q`` in ``[-2**(b-1), 2**(b-1) - 1]``, ``w ≈ q * s`` with
  ``s = absmax / ((2**b - 1) / 2)`` (the full signed range is used; the positive extreme is clipped by
  half a step, as GPTQ and llm-compressor do); no zero point is stored.
* asymmetric: unsigned codes ``q`` in ``[0, 2**b - 1]``, integer zero point ``z`` in the same range,
  ``w ≈ (q - z) * s`` with the range widened to include 0 (so exact zeros stay exact).

Scales are rounded to ``scale_dtype`` *before* the codes are chosen, so that dequantizing what an
exporter stored reproduces :meth:`AffineCodec.dequantize` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.errors import NonFiniteWeightError, SchemeError, ShapeError
from lowbit.formats.base import PER_CHANNEL, Block, Codec, QuantizedTensor

_FLOAT_BITS: dict[torch.dtype, int] = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32}


@dataclass(frozen=True)
class AffineQuantized(QuantizedTensor):
    """Result of :class:`AffineCodec`.

    ``codes``: ``(out, in)`` int16 (signed range if symmetric, unsigned if not).
    ``scales``: ``block.grid(shape)`` in ``codec.scale_dtype``.
    ``zeros``: same grid, int16 zero points, or ``None`` when symmetric.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    codec: AffineCodec


@dataclass(frozen=True)
class AffineCodec(Codec):
    bits: int = 4
    symmetric: bool = True
    block: Block = PER_CHANNEL
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise SchemeError(f"integer codes take 2..8 bits, not {self.bits}")
        if self.scale_dtype not in _FLOAT_BITS:
            raise SchemeError(f"scale dtype must be float16, bfloat16 or float32, not {self.scale_dtype}")
        for n in (self.block.rows, self.block.cols):
            if n is not None and n < 1:
                raise SchemeError(f"block sizes must be positive, not {self.block}")

    # ----------------------------------------------------------------- properties
    @property
    def name(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits}-{kind} {self.block.label}"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        rows, cols = _as_2d(shape)
        gr, gc = self.block.grid((rows, cols))
        per_block = _FLOAT_BITS[self.scale_dtype] + (0 if self.symmetric else self.bits)
        return rows * cols * self.bits + gr * gc * per_block

    # ----------------------------------------------------------------- primitives
    def choose_qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scales (grid, ``scale_dtype``) and zero points (grid, int16, or ``None``) for ``w`` (out, in)."""
        w = w.float()
        if self.symmetric:
            absmax = block_reduce(w.abs(), self.block, "amax")
            scale = absmax / ((self.qmax - self.qmin) / 2)
            return _finish_scale(scale, self.scale_dtype), None
        lo = block_reduce(w, self.block, "amin").clamp(max=0.0)
        hi = block_reduce(w, self.block, "amax").clamp(min=0.0)
        s = _finish_scale((hi - lo) / (self.qmax - self.qmin), self.scale_dtype)
        zero = (self.qmin - torch.round(lo / s.float())).clamp(self.qmin, self.qmax)
        return s, zero.to(torch.int16)

    def quantize_with(
        self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
    ) -> torch.Tensor:
        """Codes (int16, shape of ``w``) for given parameters; ``scales``/``zeros`` may be a grid for
        ``w``'s shape or already expanded to it (GPTQ quantizes column by column)."""
        s = self._expand(scales, w.shape).float()
        q = torch.round(w.float() / s)
        if zeros is not None:
            q = q + self._expand(zeros, w.shape).float()
        return q.clamp(self.qmin, self.qmax).to(torch.int16)

    def dequantize_codes(
        self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
    ) -> torch.Tensor:
        q = codes.float()
        if zeros is not None:
            q = q - self._expand(zeros, codes.shape).float()
        return q * self._expand(scales, codes.shape).float()

    def _expand(self, grid: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        if tuple(grid.shape) == tuple(shape):
            return grid
        return expand_blocks(grid, self.block, (shape[0], shape[1]))

    # ----------------------------------------------------------------- codec API
    def quantize(self, w: torch.Tensor) -> AffineQuantized:
        w2 = _check_weight(w)
        scales, zeros = self.choose_qparams(w2)
        codes = self.quantize_with(w2, scales, zeros)
        return AffineQuantized(shape=tuple(w.shape), codes=codes, scales=scales, zeros=zeros, codec=self)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if not isinstance(q, AffineQuantized):
            raise TypeError(f"AffineCodec cannot dequantize {type(q).__name__}")
        return self.dequantize_codes(q.codes, q.scales, q.zeros).reshape(q.shape)


# --------------------------------------------------------------------- helpers
def _as_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) != 2:
        raise ShapeError(f"affine codecs take 1-D or 2-D weights, not shape {tuple(shape)}")
    return shape[0], shape[1]


def _check_weight(w: torch.Tensor) -> torch.Tensor:
    if not w.is_floating_point():
        raise ShapeError(f"expected a floating-point weight, got {w.dtype}")
    w2 = w.reshape(_as_2d(tuple(w.shape))).float()
    if not torch.isfinite(w2).all():
        raise NonFiniteWeightError("weight holds NaN or Inf values; fix or exclude the tensor")
    return w2


def _finish_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # An all-zero block gets scale 1 (its codes are then 0 / the zero point): a scale of 0 would divide
    # by zero, and any positive value reconstructs the zeros exactly. Tiny nonzero scales are lifted to
    # the smallest subnormal of the storage dtype so they survive the cast instead of flushing to zero.
    info = torch.finfo(dtype)
    tiny = info.tiny * info.eps
    scale = torch.where(scale == 0, torch.ones_like(scale), scale.clamp(min=tiny))
    return scale.to(dtype)


def block_reduce(w: torch.Tensor, block: Block, op: str) -> torch.Tensor:
    """Reduce ``w`` (rows, cols) over each block with ``op`` in {"amax", "amin"} -> grid tensor.

    Ragged last blocks are padded by replicating their edge values, which changes neither min nor max.
    """
    rows, cols = w.shape
    r, c = block.resolve((rows, cols))
    gr, gc = block.grid((rows, cols))
    pad_r, pad_c = gr * r - rows, gc * c - cols
    if pad_r or pad_c:
        w = F.pad(w[None, None], (0, pad_c, 0, pad_r), mode="replicate")[0, 0]
    blocks = w.reshape(gr, r, gc, c)
    if op == "amax":
        return blocks.amax(dim=(1, 3))
    if op == "amin":
        return blocks.amin(dim=(1, 3))
    raise ValueError(f"unknown reduction {op!r}")


def expand_blocks(grid: torch.Tensor, block: Block, shape: tuple[int, int]) -> torch.Tensor:
    """Broadcast a per-block grid back to ``shape`` (the inverse of :func:`block_reduce`'s layout)."""
    r, c = block.resolve(shape)
    return grid.repeat_interleave(r, dim=0)[: shape[0]].repeat_interleave(c, dim=1)[:, : shape[1]]

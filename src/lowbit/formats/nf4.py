"""bitsandbytes 4-bit block codecs: NF4 and FP4, with optional double quantization of the block scales.

The format, as ``bitsandbytes.functional.quantize_4bit`` writes it (read from bitsandbytes 0.50, and
verified bit for bit against its CPU implementation in ``tests/formats/test_nf4.py``):

* The tensor is flattened (row-major) and cut into blocks of ``blocksize`` consecutive values; a numel
  that the block size does not divide leaves a short last block. Rows play no part: a block may span
  two rows of a weight.
* Each block stores its absmax as float32. A value's 4-bit code is the index of the entry of a fixed
  16-entry table (values in ``[-1, 1]``) nearest to ``x * (1 / absmax)``; a value exactly halfway
  between two entries takes the lower one. ``w ≈ table[code] * absmax``.
* Two codes share a byte, the first in the high nibble::

      byte k = | code[2k] (bits 7..4) | code[2k+1] (bits 3..0) |

  An odd numel gets one pad code in the last low nibble: the code of 0.0 (NF4: 7, FP4: 0).
* ``double_quant`` (``compress_statistics=True``): the float32 absmax vector (one per block) minus its
  mean ``offset`` is quantized again, in blocks of 256, to 8-bit indices into bitsandbytes' signed
  "dynamic" map (:func:`dynamic_map`), with one float32 absmax per 256-block; the absmax a 4-bit block
  uses is then ``dynamic_map[code] * absmax2 + offset``.

Where bitsandbytes' backends disagree, lowbit follows its CPU backend, the one every lowbit machine can
run as an oracle:

* FP4 stores the sign in bit 3, so its table holds both +0 (code 0) and -0 (code 8). bitsandbytes' CPU
  quantizer maps ``x`` in ``(-0.0026, 0]`` to code 0 and ``x`` in ``(0, 0.0026]`` to code 8 (its sorted
  table lists +0 before -0); its CUDA kernel sets bit 3 for ``x < 0`` instead. Either way the
  dequantized value is a zero.
* The 8-bit absmax codes come from bitsandbytes' CPU kernel, which does not search the map: it
  discretises ``[-1, 1]`` into 65536 points, precomputes the nearest map entry of each point, and
  looks values up by their nearest point (:func:`_dynamic_lut`). Near 0, where map entries are closer
  together than those points, this differs from an exact nearest-entry search (and from the CUDA
  kernel); the stored codes are still valid dynamic-map indices for every reader.
* In a short last block bitsandbytes divides by the absmax (full blocks multiply by its reciprocal)
  and stores an all-zero short block's absmax as 1e-38 (a full block's as 0); lowbit does the same.

:meth:`Bnb4Codec.storage_bits` counts the packed codes, the absmax values (or, with double
quantization, their 8-bit codes, the 256-block absmax values and the offset). The constant code tables
(16 and 256 float32 values) that bitsandbytes checkpoints repeat beside each tensor are not counted.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from lowbit.errors import NonFiniteWeightError, SchemeError, ShapeError
from lowbit.formats.base import Codec, QuantizedTensor
from lowbit.formats.bitpack import MSB_FIRST_U8_4BIT, pack, unpack

#: Block sizes bitsandbytes accepts for 4-bit quantization.
BNB_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: bitsandbytes double-quantizes the block absmax values in blocks of this many.
NESTED_BLOCKSIZE = 256

#: NF4 (QLoRA's NormalFloat4): 16 quantiles of N(0, 1) scaled to [-1, 1], in code order (sorted).
NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: bitsandbytes FP4 before normalisation, in code order. Bit 3 is the sign; bits 2..0 are an
#: exponent/mantissa pattern (0b000 = 0, 0b001 = 0.0625 subnormal, 0b010 = 8, 0b011 = 12, 0b100 = 4,
#: 0b101 = 6, 0b110 = 2, 0b111 = 3). Divided by 12 (its absmax) to give the table in [-1, 1].
FP4_RAW_VALUES: tuple[float, ...] = (
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
    -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
)  # fmt: skip

#: FP4 codes in ascending order of their value, +0 (code 0) before -0 (code 8), as bitsandbytes' CPU
#: quantizer orders them. Bucket ``i`` of a search over the sorted table's midpoints is code ``[i]``.
_FP4_CODES_ASCENDING: tuple[int, ...] = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)


class Float4Type(Enum):
    """Which 16-entry table the 4-bit codes index."""

    NF4 = "nf4"
    FP4 = "fp4"


@functools.cache
def code_table(quant_type: Float4Type) -> torch.Tensor:
    """The 16 float32 values that codes 0..15 dequantize to (before scaling by the block absmax)."""
    if quant_type is Float4Type.NF4:
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    raw = torch.tensor(FP4_RAW_VALUES, dtype=torch.float32)
    return raw / raw.abs().max()


@functools.cache
def _bucket_search(quant_type: Float4Type) -> tuple[torch.Tensor, torch.Tensor]:
    """(15 float32 midpoints of the sorted table, int64 code of each of the 16 buckets)."""
    table = code_table(quant_type)
    order = torch.arange(16) if quant_type is Float4Type.NF4 else torch.tensor(_FP4_CODES_ASCENDING)
    ascending = table[order]
    return (ascending[:-1] + ascending[1:]) / 2, order


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (``create_dynamic_map(signed=True)``): 256 sorted float32
    values in ``[-1, 1]``.

    For each decade ``i`` = 0..6 the map holds ``2**i`` values ``±10**(i-6) * m``, with ``m`` the
    midpoints of ``2**i`` equal steps over ``[0.1, 1]``; plus 0 and 1 (254 + 2 = 256 entries).
    """
    magnitudes = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        magnitudes.append(mids * (10.0 ** (i - 6)))
    mags = torch.cat(magnitudes)
    values = torch.cat([mags, -mags, torch.tensor([0.0, 1.0])])
    return values.sort().values


_LUT_POINTS = 65536


@functools.cache
def _dynamic_lut() -> torch.Tensor:
    """(65536,) uint8: dynamic-map index for each of the points ``-1 + 2 i / 65535`` (bitsandbytes' CPU
    quantizer table). Point ``i`` takes the first entry whose upper midpoint is not below the point.

    Computed in numpy float32, step by step, to reproduce the C++ float arithmetic exactly.
    """
    code = dynamic_map().numpy()
    midpoints = np.float32(0.5) * (code[:-1] + code[1:])
    i = np.arange(_LUT_POINTS, dtype=np.float32)
    points = np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(_LUT_POINTS - 1)
    # Index = how many midpoints lie strictly below the point.
    idx = np.searchsorted(midpoints, points, side="left")
    return torch.from_numpy(idx.astype(np.uint8))


def _dynamic_quantize_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU ``quantize_blockwise`` with the dynamic map: ``x`` (n,) float32 ->
    (codes (n,) uint8, absmax (ceil(n / blocksize),) float32)."""
    n = x.numel()
    nblocks = -(-n // blocksize)
    padded = torch.zeros(nblocks * blocksize, dtype=torch.float32)
    padded[:n] = x
    blocks = padded.view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (nblocks,)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    v = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    # Nearest LUT point, in the kernel's float32 order of operations; truncation toward zero.
    point = ((((v + 1.0) * 0.5) * float(_LUT_POINTS - 1)) + 0.5).to(torch.int64)
    codes = _dynamic_lut()[point]
    # An all-zero block writes code 0 (the map's -1 entry): its absmax of 0 dequantizes it to 0.
    codes = torch.where((absmax == 0)[:, None], torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n].contiguous(), absmax


@dataclass(frozen=True)
class NestedAbsmax:
    """Double-quantized block absmax values (bitsandbytes ``compress_statistics=True``).

    ``codes``: (n_blocks,) uint8 indices into :func:`dynamic_map`.
    ``absmax``: (ceil(n_blocks / 256),) float32, one per block of 256 codes.
    ``offset``: () float32, the mean of the first-level absmax values, added back after dequantizing.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    offset: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The (n_blocks,) float32 absmax values the 4-bit blocks are scaled by."""
        n = self.codes.numel()
        scale = self.absmax.repeat_interleave(NESTED_BLOCKSIZE)[:n]
        return dynamic_map().to(self.codes.device)[self.codes.long()] * scale + self.offset


@dataclass(frozen=True)
class Bnb4Quantized(QuantizedTensor):
    """Result of :class:`Bnb4Codec`, the tensors bitsandbytes' ``QuantState`` holds.

    ``packed``: (ceil(numel / 2),) uint8, two codes per byte, the first in the high nibble
    (bitsandbytes' own tensor is this with shape ``(ceil(numel / 2), 1)``).
    ``absmax``: (n_blocks,) float32 block absmax values, or ``None`` when ``nested`` holds them.
    ``nested``: the double-quantized absmax values, or ``None``.
    """

    packed: torch.Tensor
    absmax: torch.Tensor | None
    nested: NestedAbsmax | None
    codec: Bnb4Codec

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def codes(self) -> torch.Tensor:
        """(numel,) uint8 4-bit codes, unpacked."""
        return unpack(self.packed, 4, dim=0, order=MSB_FIRST_U8_4BIT, length=self.numel)

    def block_absmax(self) -> torch.Tensor:
        """(n_blocks,) float32 absmax each block is dequantized with."""
        if self.nested is not None:
            return self.nested.dequantize()
        assert self.absmax is not None
        return self.absmax


@dataclass(frozen=True)
class Bnb4Codec(Codec):
    """bitsandbytes NF4/FP4, ``blocksize`` values per float32 absmax over the flattened tensor.

    Accepts a float tensor of any shape (it is flattened row-major, like bitsandbytes does).
    """

    quant_type: Float4Type = Float4Type.NF4
    blocksize: int = 64
    double_quant: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.quant_type, Float4Type):
            raise SchemeError(f"quant_type must be a Float4Type (nf4 or fp4), not {self.quant_type!r}")
        if self.blocksize not in BNB_BLOCKSIZES:
            raise SchemeError(
                f"bitsandbytes 4-bit block size must be one of {BNB_BLOCKSIZES}, not {self.blocksize}"
            )

    @property
    def name(self) -> str:
        dq = " dq" if self.double_quant else ""
        return f"{self.quant_type.value} b{self.blocksize}{dq}"

    def num_blocks(self, shape: tuple[int, ...]) -> int:
        return -(-math.prod(shape) // self.blocksize)

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        n = math.prod(shape)
        nblocks = self.num_blocks(shape)
        code_bits = 8 * -(-n // 2)  # whole bytes: an odd numel carries one pad nibble
        if not self.double_quant:
            return code_bits + 32 * nblocks
        nested_blocks = -(-nblocks // NESTED_BLOCKSIZE)
        return code_bits + 8 * nblocks + 32 * nested_blocks + 32

    # ----------------------------------------------------------------- primitives
    def scale_blocks(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``flat`` (n,) float32 -> (values divided by their block absmax, clamped to [-1, 1], (n,);
        block absmax (n_blocks,) float32)."""
        n = flat.numel()
        full = n - n % self.blocksize
        head = flat[:full].view(-1, self.blocksize)  # (full / bs, bs)
        absmax = head.abs().amax(dim=1)
        scaled = (head * torch.reciprocal(absmax.clamp(min=1e-38))[:, None]).clamp(-1.0, 1.0).reshape(-1)
        if full < n:
            tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
            tail = (flat[full:] / tail_absmax).clamp(-1.0, 1.0)
            absmax = torch.cat([absmax, tail_absmax[None]])
            scaled = torch.cat([scaled, tail])
        return scaled, absmax

    def encode(self, scaled: torch.Tensor) -> torch.Tensor:
        """Nearest-entry 4-bit codes (uint8) of values in [-1, 1]; ties go to the lower entry."""
        midpoints, bucket_code = _bucket_search(self.quant_type)
        buckets = torch.bucketize(scaled, midpoints.to(scaled.device))
        return bucket_code.to(scaled.device)[buckets].to(torch.uint8)

    # ----------------------------------------------------------------- codec API
    def quantize(self, w: torch.Tensor) -> Bnb4Quantized:
        if not w.is_floating_point():
            raise ShapeError(f"expected a floating-point weight, got {w.dtype}")
        if w.numel() == 0:
            raise ShapeError(f"cannot quantize an empty tensor of shape {tuple(w.shape)}")
        flat = w.detach().reshape(-1).float()
        if not torch.isfinite(flat).all():
            raise NonFiniteWeightError("weight holds NaN or Inf values; fix or exclude the tensor")
        scaled, absmax = self.scale_blocks(flat)
        if scaled.numel() % 2:
            scaled = torch.cat([scaled, scaled.new_zeros(1)])
        packed = pack(self.encode(scaled), 4, torch.uint8, dim=0, order=MSB_FIRST_U8_4BIT)
        if not self.double_quant:
            return Bnb4Quantized(shape=tuple(w.shape), packed=packed, absmax=absmax, nested=None, codec=self)
        offset = absmax.mean()
        codes2, absmax2 = _dynamic_quantize_blocks(absmax - offset, NESTED_BLOCKSIZE)
        nested = NestedAbsmax(codes=codes2, absmax=absmax2, offset=offset)
        return Bnb4Quantized(shape=tuple(w.shape), packed=packed, absmax=None, nested=nested, codec=self)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if not isinstance(q, Bnb4Quantized):
            raise TypeError(f"Bnb4Codec cannot dequantize {type(q).__name__}")
        n = q.numel
        values = code_table(self.quant_type).to(q.packed.device)[q.codes().long()]  # (n,)
        scale = q.block_absmax().repeat_interleave(self.blocksize)[:n]
        return (values * scale).reshape(q.shape)


def nf4(blocksize: int = 64, double_quant: bool = False) -> Bnb4Codec:
    """bitsandbytes NF4 (``bnb_4bit_quant_type="nf4"``)."""
    return Bnb4Codec(Float4Type.NF4, blocksize, double_quant)


def fp4(blocksize: int = 64, double_quant: bool = False) -> Bnb4Codec:
    """bitsandbytes FP4 (``bnb_4bit_quant_type="fp4"``)."""
    return Bnb4Codec(Float4Type.FP4, blocksize, double_quant)

"""ggml's block types as a codec the method layer drives: :class:`GGMLCodec` is to Q4_K what
:class:`~lowbit.formats.affine.AffineCodec` is to int4 g128.

The bytes come from the bit-exact block codecs of :mod:`lowbit.formats.gguf` (numpy / C); this module
only adapts them to the torch-side contracts:

* :class:`~lowbit.formats.base.Codec`: ``quantize`` / ``quantize_weighted`` are ggml's quantizer without /
  with an importance vector (the bytes llama-quantize writes, with ``--imatrix`` for the latter), and
  ``dequantize`` is ggml's ``to_float``;
* :class:`~lowbit.formats.base.RegionCodec` (GPTQ): a region is one ggml block of a row (32 elements for
  the legacy types and IQ4_NL, a super-block of 256 for the k-quants and IQ4_XS). Fitting a run of
  regions runs ggml's own parameter search on the given weights and importance (llama-quantize's
  scales, minimums and their 6-/4-bit codes, fp16 super-block scales) and keeps the block headers; a
  column is then quantized to the nearest level under its sub-block's fixed ``(scale, offset)``
  (``x ≈ scale · level - offset``), and packing writes the chosen codes into the kept headers. The
  dequantized column a method sees is, float for float, what llama.cpp's ``to_float`` gives for the
  packed bytes.

The result, :class:`GGMLQuantized`, holds the rows as ggml stores them (uint8 ``(rows, row_bytes)``):
the GGUF writer copies them into the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lowbit.errors import SchemeError, ShapeError
from lowbit.formats.base import Block, ColumnQuantizer, ElementGrid, QuantizedTensor, RegionCodec
from lowbit.formats.gguf import GGMLBlockCodec, GGMLType, get_codec, ggml_type, tensor_nbytes


@dataclass(frozen=True)
class GGMLQuantized(QuantizedTensor):
    """A weight in ggml type ``type``: ``data`` uint8 ``(rows, row_bytes)``, rows of ``shape[-1]``
    elements, exactly the bytes of the tensor in a GGUF file."""

    type: GGMLType
    data: np.ndarray = field(repr=False)


@dataclass(frozen=True, eq=False)
class GGMLRun(ColumnQuantizer):
    """Fixed parameters of a run of whole ggml blocks of every row: the blocks' bytes as fitted
    (``header``, uint8 ``(out, blocks * type_size)``: their codes are replaced at packing) and each
    sub-block's ``scale``/``offset`` ``(out, width / sub_size)`` float32."""

    start: int
    width: int
    header: np.ndarray
    scale: torch.Tensor
    offset: torch.Tensor
    sub_size: int
    levels: torch.Tensor  # (n,) float32, ascending
    uniform: bool  # levels are consecutive integers: round instead of searching
    _mids: torch.Tensor  # (n-1,) midpoints between levels

    def quantize_column(self, x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = c // self.sub_size
        s = self.scale[:, k]
        o = self.offset[:, k]
        t = (x + o) / s  # the level this weight would take; +-inf/NaN where the scale is 0
        n = self.levels.numel()
        if self.uniform:
            lo = float(self.levels[0])
            idx = torch.nan_to_num(torch.round(t) - lo, nan=-lo).clamp(0, n - 1)
        else:
            idx = torch.bucketize(torch.nan_to_num(t, nan=0.0), self._mids).clamp(0, n - 1)
        codes = idx.to(torch.int16)
        deq = s * self.levels[codes.long()] - o
        return codes, deq


@dataclass(frozen=True)
class GGMLCodec(RegionCodec):
    """One ggml block type (``Q4_K``, ``Q6_K``, ``Q4_0``, ``IQ4_XS`` ...) on 2-D weights ``(out, in)``
    whose rows are whole blocks."""

    type: GGMLType

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", ggml_type(self.type))
        get_codec(self.type)  # a one-line error for a type lowbit has no codec for

    @property
    def searches_range(self) -> bool:
        return True  # ggml's quantizers search each block's scale (and min) themselves

    @property
    def blocks(self) -> GGMLBlockCodec:
        """The numpy/C block codec of the type."""
        return get_codec(self.type)

    @property
    def name(self) -> str:
        return self.type.name

    @property
    def block(self) -> Block:
        """The weights sharing one scale: a sub-block of a row (32, or 16 in Q2_K/Q3_K/Q6_K)."""
        return Block(1, self.blocks.sub_size or self.blocks.block_size)

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        return 8 * tensor_nbytes(self.type, tuple(int(d) for d in shape))

    # ---------------------------------------------------------------- codec
    def _rows(self, w: torch.Tensor) -> np.ndarray:
        if w.ndim != 2 or not w.is_floating_point():
            raise ShapeError(f"{self.name} quantizes 2-D float weights, not {w.dtype} {tuple(w.shape)}")
        return np.ascontiguousarray(w.detach().to(torch.float32).cpu().numpy())

    @staticmethod
    def _importance(importance: torch.Tensor | None, n: int) -> np.ndarray | None:
        if importance is None:
            return None
        v = np.ascontiguousarray(importance.detach().to(torch.float32).cpu().numpy().reshape(-1))
        if v.shape != (n,):
            raise ShapeError(f"an importance vector for rows of {n} has {n} values, not {v.size}")
        return v

    def quantize(self, w: torch.Tensor) -> GGMLQuantized:
        return self.quantize_weighted(w, None)

    def quantize_weighted(self, w: torch.Tensor, importance: torch.Tensor | None) -> GGMLQuantized:
        x = self._rows(w)
        data = self.blocks.quantize_rows(x, self._importance(importance, x.shape[1]))
        return GGMLQuantized(shape=tuple(w.shape), type=self.type, data=data)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if not isinstance(q, GGMLQuantized) or q.type != self.type:
            raise TypeError(f"{self.name} cannot dequantize {type(q).__name__}")
        n = int(q.shape[-1])
        return torch.from_numpy(self.blocks.dequantize_rows(q.data, n)).reshape(q.shape)

    # ---------------------------------------------------------------- regions (GPTQ)
    def region_width(self, shape: tuple[int, int]) -> int:
        return self.blocks.block_size

    def _check_splittable(self) -> GGMLBlockCodec:
        b = self.blocks
        if not b.splittable:
            raise SchemeError(
                f"{self.name} blocks are not split into scales and codes by lowbit, so GPTQ/AWQ cannot "
                "choose their codes; use --method rtn for this type"
            )
        return b

    def fit_region(self, w: torch.Tensor, start: int, importance: torch.Tensor | None = None) -> GGMLRun:
        """ggml's parameter search (llama-quantize's, with ``importance`` as its importance vector) on
        ``w`` (out, k), ``k`` a multiple of the block size."""
        b = self._check_splittable()
        x = self._rows(w)
        out_f, k = x.shape
        data = b.quantize_rows(x, self._importance(importance, k))
        scale, offset, _ = b.split_blocks(data.reshape(-1, b.type_size))
        levels = torch.tensor(b.levels, dtype=torch.float32)
        return GGMLRun(
            start=start,
            width=k,
            header=data,
            scale=torch.from_numpy(scale.reshape(out_f, -1)),
            offset=torch.from_numpy(offset.reshape(out_f, -1)),
            sub_size=b.sub_size,
            levels=levels,
            uniform=bool(torch.all(levels[1:] - levels[:-1] == 1)),
            _mids=(levels[1:] + levels[:-1]) / 2,
        )

    def pack_regions(
        self,
        shape: tuple[int, int],
        codes: torch.Tensor,
        regions: Sequence[ColumnQuantizer],
        perm: torch.Tensor | None = None,
    ) -> GGMLQuantized:
        if perm is not None and not torch.equal(perm, torch.arange(shape[1])):
            raise SchemeError(f"{self.name} blocks are consecutive columns: regions cannot be permuted")
        runs = [r for r in regions if isinstance(r, GGMLRun)]
        if len(runs) != len(regions) or sum(r.width for r in runs) != shape[1]:
            raise ShapeError(f"{self.name}: the regions do not cover the {shape[1]} columns")
        b = self._check_splittable()
        header = np.concatenate([r.header for r in runs], axis=1) if len(runs) > 1 else runs[0].header
        c = codes.to(torch.int32).numpy().reshape(-1, b.block_size)
        data = b.join_blocks(header.reshape(-1, b.type_size), c).reshape(shape[0], -1)
        return GGMLQuantized(shape=tuple(shape), type=self.type, data=data)

    def from_grid(self, grid: ElementGrid) -> GGMLQuantized | None:
        """The grid in this type's blocks, for the types whose parameters are plain fp16 values (Q4_0,
        Q4_1, Q5_0, Q5_1, Q8_0): every block of 32 must share one scale and offset in ``grid`` (groups
        of a multiple of 32 columns, or one per row) and hold integer levels that fit the type's levels
        after a shift ``k`` (``s·L - o = s·(L + k) - (o + s·k)``). Types without a stored offset need
        ``o + s·k = 0`` (symmetric grids); types with a min take, per block, the shift whose offset fp16
        holds exactly where one exists (so a 4-bit asymmetric grid is exact in Q5_1 with ``k = 16 - z``),
        else the smallest. The scale is stored as fp16: exact for fp16 scales and for bf16/float32 ones
        that fp16 holds. ``None`` where the grid does not fit (k-quants, i-quants: their sub-block
        scales are 6-bit codes of one fp16 per 256, which another grid almost never lands on)."""
        b = self.blocks
        if not b.buildable:
            return None
        codes = grid.codes
        if codes.ndim != 2 or codes.shape[1] % b.block_size:
            return None
        out_f, n = (int(d) for d in codes.shape)
        nb = n // b.block_size
        scale = grid.scale.to(torch.float64).reshape(out_f, nb, b.block_size)
        offset = grid.offset.to(torch.float64).reshape(out_f, nb, b.block_size)
        s, o = scale[..., 0], offset[..., 0]  # (out, nb)
        if not (bool((scale == s[..., None]).all()) and bool((offset == o[..., None]).all())):
            return None
        levels = grid.levels.to(torch.float64)
        if not bool((levels == levels.round()).all()):
            return None
        lv = levels[codes.long()].reshape(out_f, nb, b.block_size)  # the integer level of each element
        lo, hi = lv.amin(-1), lv.amax(-1)
        t0, t1 = float(b.levels[0]), float(b.levels[-1])
        if b.stores_offset:
            k = self._best_shift(s, o, t0 - lo, t1 - hi)
            if k is None:
                return None
        else:
            k = torch.where(s != 0, (-o / s).round(), torch.zeros_like(s))
            if not bool((o + s * k == 0).all()) or not bool(((lo + k >= t0) & (hi + k <= t1)).all()):
                return None
        if not bool(torch.isfinite(torch.from_numpy(_fp16(s.numpy()))).all()):
            return None  # a scale fp16 cannot hold
        idx = (lv + k[..., None] - t0).to(torch.int32).reshape(-1, b.block_size).numpy()
        new_offset = torch.where(k == 0, o, o + s * k)  # k = 0 keeps a -0.0 min as ggml wrote it
        data = b.build_blocks(
            s.reshape(-1).numpy().astype(np.float32), new_offset.reshape(-1).numpy().astype(np.float32), idx
        )
        return GGMLQuantized(shape=(out_f, n), type=self.type, data=data.reshape(out_f, -1))

    @staticmethod
    def _best_shift(
        s: torch.Tensor, o: torch.Tensor, k_min: torch.Tensor, k_max: torch.Tensor
    ) -> torch.Tensor | None:
        """Per block, an integer shift in ``[k_min, k_max]`` whose offset ``o + s·k`` fp16 holds exactly
        (the one nearest 0), else the one nearest 0; None if some block has no room."""
        if not bool((k_min <= k_max).all()):
            return None
        chosen = torch.clamp(torch.zeros_like(s), k_min, k_max)
        exact = torch.zeros_like(s, dtype=torch.bool)
        lo, hi = int(k_min.min()), int(k_max.max())
        for k in sorted(range(lo, hi + 1), key=abs):
            ok = (k >= k_min) & (k <= k_max) & ~exact
            if not bool(ok.any()):
                continue
            off = (o + s * k if k else o).numpy()
            holds = torch.from_numpy(_fp16(off).astype(np.float64) == off)
            take = ok & holds
            chosen = torch.where(take, torch.full_like(s, float(k)), chosen)
            exact |= take
            if bool(exact.all()):
                break
        return chosen

    def element_grid(self, q: QuantizedTensor) -> ElementGrid:
        if not isinstance(q, GGMLQuantized) or q.type != self.type:
            raise TypeError(f"{self.name} cannot read {type(q).__name__}")
        b = self._check_splittable()
        rows = q.data.shape[0]
        scale, offset, codes = b.split_blocks(q.data.reshape(-1, b.type_size))

        def per_element(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.repeat(a, b.sub_size, axis=1).reshape(rows, -1))

        return ElementGrid(
            per_element(scale),
            per_element(offset),
            torch.tensor(b.levels, dtype=torch.float32),
            torch.from_numpy(codes.reshape(rows, -1).astype(np.int64)),
        )

    def with_codes(self, q: QuantizedTensor, codes: torch.Tensor) -> GGMLQuantized:
        if not isinstance(q, GGMLQuantized) or q.type != self.type:
            raise TypeError(f"{self.name} cannot read {type(q).__name__}")
        b = self._check_splittable()
        c = codes.to(torch.int64).clamp(0, len(b.levels) - 1).numpy().reshape(-1, b.block_size)
        data = b.join_blocks(q.data.reshape(-1, b.type_size), c).reshape(q.data.shape)
        return GGMLQuantized(shape=q.shape, type=self.type, data=data)


def _fp16(v: np.ndarray) -> np.ndarray:
    """``v`` rounded to fp16 as ggml stores it (overflow to inf), as float32."""
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=np.float32).astype(np.float16).astype(np.float32)

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

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.errors import NonFiniteWeightError, SchemeError, ShapeError
from lowbit.formats.base import PER_CHANNEL, Block, ColumnQuantizer, ElementGrid, QuantizedTensor, RegionCodec

_FLOAT_BITS: dict[torch.dtype, int] = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32}
#: Factors a block's range is shrunk by in the clipping search of :meth:`AffineCodec.fit_region`
#: with an importance (GPTQ): 1 (min-max) down to 0.75 in steps of 0.01.
CLIP_SEARCH: tuple[float, ...] = tuple(1.0 - 0.01 * i for i in range(26))


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
class GroupIndexedQuantized(AffineQuantized):
    """:class:`AffineQuantized` whose groups need not be runs of consecutive columns (GPTQ's act-order
    with dynamic groups).

    ``codes``: ``(out, in)`` in the original column order; ``codec.dequantize(q)`` is the result.
    ``g_idx``: ``(in,)`` int32, the group of each input column: column ``c`` uses
    ``group_scales[:, g_idx[c]]`` (and ``group_zeros``); ``arange(in) // g`` for contiguous groups.
    ``group_scales`` / ``group_zeros``: ``(row blocks, groups)``, indexed by ``g_idx``.
    ``scales`` / ``zeros``: the codec's grid (the same tensors as ``group_*``) when the groups are
    contiguous; otherwise expanded to ``(out, in)``, so that the codec dequantizes them correctly
    (an exporter that stores ``g_idx`` must read ``group_scales`` instead).
    """

    g_idx: torch.Tensor
    group_scales: torch.Tensor
    group_zeros: torch.Tensor | None

    @property
    def contiguous_groups(self) -> bool:
        """True when column ``c`` is in group ``c // g`` (no ``g_idx`` needed to load it)."""
        g = self.codec.block.resolve((self.shape[0], self.shape[1]))[1]
        return torch.equal(self.g_idx, (torch.arange(self.shape[1]) // g).to(torch.int32))


@dataclass(frozen=True, eq=False)
class AffineRun(ColumnQuantizer):
    """Affine parameters of the groups of a run of columns: ``scales``/``zeros`` ``(row blocks, groups)``
    (the codec's grid for those columns), and the same expanded to rows as float32 for the column loop."""

    start: int
    width: int
    codec: AffineCodec
    group_cols: int
    scales: torch.Tensor
    zeros: torch.Tensor | None
    _s_rows: torch.Tensor
    _z_rows: torch.Tensor | None

    def quantize_column(self, x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = c // self.group_cols
        s = self._s_rows[:, k]
        q = torch.round(x / s)
        z = None if self._z_rows is None else self._z_rows[:, k]
        if z is not None:
            q = q + z
        codes = q.clamp(self.codec.qmin, self.codec.qmax).to(torch.int16)
        deq = codes.float()
        if z is not None:
            deq = deq - z
        return codes, deq * s


@dataclass(frozen=True)
class AffineCodec(RegionCodec):
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

    def choose_qparams_searched(
        self, w: torch.Tensor, importance: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`choose_qparams` with each block's range (its absmax, or its min and max) shrunk by the
        factor of :data:`CLIP_SEARCH` whose codes give the least ``Σ importance_c · (w - ŵ)²`` over the
        block (``importance`` (in,) float32, e.g. the Hessian's diagonal: GPTQ's clipping search, as
        GPTQ's ``mse`` option, weighted like ggml's searches). Unshrunk on ties."""
        w = w.float()
        shape = (w.shape[0], w.shape[1])
        imp = importance.detach().float().reshape(1, -1).clamp(min=0.0)
        if imp.shape[1] != shape[1]:
            raise ShapeError(f"an importance vector for {shape[1]} columns has {imp.shape[1]} values")
        if self.symmetric:
            absmax = block_reduce(w.abs(), self.block, "amax")
        else:
            lo = block_reduce(w, self.block, "amin").clamp(max=0.0)
            hi = block_reduce(w, self.block, "amax").clamp(min=0.0)
        best: tuple[torch.Tensor, torch.Tensor | None] | None = None
        best_err = torch.empty(0)
        for shrink in CLIP_SEARCH:
            if self.symmetric:
                s = _finish_scale(absmax * shrink / ((self.qmax - self.qmin) / 2), self.scale_dtype)
                z = None
            else:
                s = _finish_scale((hi - lo) * shrink / (self.qmax - self.qmin), self.scale_dtype)
                z = (self.qmin - torch.round(lo * shrink / s.float())).clamp(self.qmin, self.qmax)
                z = z.to(torch.int16)
            deq = self.dequantize_codes(self.quantize_with(w, s, z), s, z)
            err = block_sum((w - deq).square() * imp, self.block)
            if best is None:
                best, best_err = (s, z), err
                continue
            take = err < best_err
            best_err = torch.where(take, err, best_err)
            bz = best[1]
            best = (
                torch.where(take, s, best[0]),
                None if z is None or bz is None else torch.where(take, z, bz),
            )
        assert best is not None
        return best

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

    # ----------------------------------------------------------------- regions (GPTQ)
    def region_width(self, shape: tuple[int, int]) -> int:
        return self.block.resolve(shape)[1]

    @property
    def contiguous_regions_only(self) -> bool:
        return False  # a g_idx (GPTQ's desc_act) can say which group each column is in

    def fit_region(self, w: torch.Tensor, start: int, importance: torch.Tensor | None = None) -> AffineRun:
        """Scales/zeros of the groups of ``w`` (out, k): by range (absmax / min-max, as :meth:`quantize`)
        without ``importance``; with it (k,), the range of each group shrunk by the factor of
        :data:`CLIP_SEARCH` that minimizes its importance-weighted squared error
        (:meth:`choose_qparams_searched`)."""
        out_f, k = w.shape
        if importance is None:
            scales, zeros = self.choose_qparams(w)  # (row blocks, ceil(k / g))
        else:
            scales, zeros = self.choose_qparams_searched(w, importance)
        r = self.block.resolve((out_f, k))[0]
        g = self.block.cols if self.block.cols is not None else k

        def rows(grid: torch.Tensor) -> torch.Tensor:
            return grid.repeat_interleave(r, dim=0)[:out_f]

        return AffineRun(
            start=start,
            width=k,
            codec=self,
            group_cols=min(g, k),
            scales=scales,
            zeros=zeros,
            _s_rows=rows(scales).float(),
            _z_rows=None if zeros is None else rows(zeros).float(),
        )

    def pack_regions(
        self,
        shape: tuple[int, int],
        codes: torch.Tensor,
        regions: Sequence[ColumnQuantizer],
        perm: torch.Tensor | None = None,
    ) -> GroupIndexedQuantized:
        """Codes (out, in) in processing order and the runs' group parameters -> the result in the
        original column order, with ``g_idx`` saying where each column's group went."""
        out_f, in_f = shape
        runs = [r for r in regions if isinstance(r, AffineRun)]
        if len(runs) != len(regions):
            raise TypeError("AffineCodec packs only its own AffineRun regions")
        group_scales = torch.cat([r.scales for r in runs], dim=1)
        group_zeros = (
            None if self.symmetric else torch.cat([r.zeros for r in runs if r.zeros is not None], dim=1)
        )
        g = self.region_width(shape)
        if perm is None:
            inv = torch.arange(in_f)
            g_idx = (torch.arange(in_f) // g).to(torch.int32)
        else:
            inv = torch.argsort(perm)
            # processed position j (column perm[j]) lies in run group j // g
            g_idx = (torch.arange(in_f) // g)[inv].to(torch.int32)
        codes = codes[:, inv]
        if torch.equal(g_idx, (torch.arange(in_f) // g).to(torch.int32)):
            scales, zeros = group_scales, group_zeros
        else:
            r = self.block.resolve(shape)[0]
            gi = g_idx.long()
            scales = group_scales.repeat_interleave(r, dim=0)[:out_f][:, gi]  # (out, in)
            zeros = None if group_zeros is None else group_zeros.repeat_interleave(r, dim=0)[:out_f][:, gi]
        assert math.ceil(in_f / g) == group_scales.shape[1]
        return GroupIndexedQuantized(
            shape=(out_f, in_f),
            codes=codes,
            scales=scales,
            zeros=zeros,
            codec=self,
            g_idx=g_idx,
            group_scales=group_scales,
            group_zeros=group_zeros,
        )

    def element_grid(self, q: QuantizedTensor) -> ElementGrid:
        """Codes ``q`` at levels ``qmin..qmax``; ``(q - z) * s`` is ``s * q - s * z``."""
        if not isinstance(q, AffineQuantized):
            raise TypeError(f"AffineCodec cannot read {type(q).__name__}")
        shape = (q.codes.shape[0], q.codes.shape[1])
        s = self._expand(q.scales, shape).float()
        z = torch.zeros_like(s) if q.zeros is None else self._expand(q.zeros, shape).float()
        levels = torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32)
        return ElementGrid(s, s * z, levels, q.codes.long() - self.qmin)

    def with_codes(self, q: QuantizedTensor, codes: torch.Tensor) -> AffineQuantized:
        if not isinstance(q, AffineQuantized):
            raise TypeError(f"AffineCodec cannot read {type(q).__name__}")
        if tuple(codes.shape) != tuple(q.codes.shape):
            raise ShapeError(f"codes of shape {tuple(codes.shape)} do not fit {tuple(q.codes.shape)}")
        new = (codes.long() + self.qmin).clamp(self.qmin, self.qmax).to(torch.int16)
        return dataclasses.replace(q, codes=new)

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


def block_sum(w: torch.Tensor, block: Block) -> torch.Tensor:
    """Sum of ``w`` (rows, cols) over each block -> grid tensor (ragged last blocks: their elements)."""
    rows, cols = w.shape
    r, c = block.resolve((rows, cols))
    gr, gc = block.grid((rows, cols))
    pad_r, pad_c = gr * r - rows, gc * c - cols
    if pad_r or pad_c:
        w = F.pad(w, (0, pad_c, 0, pad_r))
    return w.reshape(gr, r, gc, c).sum(dim=(1, 3))


def expand_blocks(grid: torch.Tensor, block: Block, shape: tuple[int, int]) -> torch.Tensor:
    """Broadcast a per-block grid back to ``shape`` (the inverse of :func:`block_reduce`'s layout)."""
    r, c = block.resolve(shape)
    return grid.repeat_interleave(r, dim=0)[: shape[0]].repeat_interleave(c, dim=1)[:, : shape[1]]

"""The codec contract: one tensor in, codes + parameters out, and back.

A codec never sees a model or a file. It quantizes one 2-D weight ``(out_features, in_features)``
(or any tensor it documents), dequantizes it, and reports its exact storage cost.

Granularity is one notion for every codec: a :class:`Block` shape ``(rows, cols)``. ``None`` means
"the whole dimension", so per-tensor is ``Block(None, None)``, per-output-channel is ``Block(1, None)``
and groups of ``g`` input columns are ``Block(1, g)``. A dimension that the block does not divide gets
a ragged last block (it is quantized with its own parameters, never padded with garbage).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Block:
    """Shape of the region that shares one set of quantization parameters.

    ``rows``/``cols`` of ``None`` span the whole dimension.
    """

    rows: int | None = 1
    cols: int | None = None

    def resolve(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The concrete block shape for a tensor of ``shape`` (clipped to the tensor)."""
        r = shape[0] if self.rows is None else min(self.rows, shape[0])
        c = shape[1] if self.cols is None else min(self.cols, shape[1])
        return max(r, 1), max(c, 1)

    def grid(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Number of blocks along each dimension (ragged last blocks counted)."""
        r, c = self.resolve(shape)
        return math.ceil(shape[0] / r), math.ceil(shape[1] / c)

    @property
    def label(self) -> str:
        if self.rows is None and self.cols is None:
            return "per-tensor"
        if self.rows == 1 and self.cols is None:
            return "per-channel"
        if self.rows == 1:
            return f"group {self.cols}"
        return f"block {self.rows}x{self.cols}"


PER_TENSOR = Block(None, None)
PER_CHANNEL = Block(1, None)


def group(g: int) -> Block:
    """Groups of ``g`` consecutive input columns within each output row."""
    return Block(1, g)


@dataclass(frozen=True)
class QuantizedTensor:
    """Base of every codec's result. ``shape`` is the original tensor's shape."""

    shape: tuple[int, ...]


class Codec(ABC):
    """One tensor <-> codes and parameters. Subclasses are frozen dataclasses (their config)."""

    @property
    @abstractmethod
    def name(self) -> str:
        """Short name, e.g. ``int4-sym g128``."""

    @abstractmethod
    def quantize(self, w: torch.Tensor) -> QuantizedTensor:
        """Quantize ``w`` (float, any float dtype; computed in float32)."""

    def quantize_weighted(self, w: torch.Tensor, importance: torch.Tensor | None) -> QuantizedTensor:
        """Round-to-nearest guided by an importance per input column (``importance`` (in,) float32, the
        mean ``x²`` of each input: an importance matrix); codecs without a parameter search ignore it."""
        return self.quantize(w)

    @abstractmethod
    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        """Float32 tensor of ``q.shape``."""

    @abstractmethod
    def storage_bits(self, shape: tuple[int, ...]) -> int:
        """Exact number of bits the codec stores for a tensor of ``shape``: codes + scales + zeros + any
        second-level parameters."""

    def bits_per_weight(self, shape: tuple[int, ...]) -> float:
        return self.storage_bits(shape) / math.prod(shape)

    @property
    def searches_range(self) -> bool:
        """Whether round-to-nearest already searches each region's range (scale, min) for the least
        error, as ggml's quantizers do; False for min-max / absmax codecs, whose range a method may
        clip beforehand (AWQ's clipping search)."""
        return False

    def from_grid(self, grid: ElementGrid) -> QuantizedTensor | None:
        """A weight that is already quantized on ``grid`` (another codec's or another tool's result, as
        :meth:`RegionCodec.element_grid` describes it), held by this codec with the same codes under the
        same scales and offsets, up to the rounding of its parameters' storage dtype; ``None`` when this
        codec cannot hold the grid (its regions cut the grid's groups, its levels do not hold the codes,
        it stores no offset where the grid has one). Converting a checkpoint without rounding twice."""
        return None

    def fake_quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """``dequantize(quantize(w))`` in ``w``'s dtype: the simulated-quantization weight; with
        ``importance``, :meth:`quantize_weighted`'s."""
        return self.dequantize(self.quantize_weighted(w, importance)).to(w.dtype)


class ColumnQuantizer(ABC):
    """Quantization parameters fixed for a run of input columns: quantizes one column at a time.

    Made by :meth:`RegionCodec.fit_region` for the columns ``[start, start + width)`` of a weight; a
    column is addressed by its index *within the run* (``0 .. width-1``).
    """

    start: int
    width: int

    @abstractmethod
    def quantize_column(self, x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Column ``c`` of the run, ``x`` (out,) float32 -> (codes (out,) int16, dequantized (out,) float32)."""


@dataclass(frozen=True, eq=False)
class ElementGrid:
    """A quantized weight as points on a per-element grid: element ``(o, c)`` is
    ``scale[o, c] * levels[codes[o, c]] - offset[o, c]`` (up to the float rounding of the codec's own
    dequantization). ``scale``, ``offset``: ``(out, in)`` float32 (a scale may be 0 or negative);
    ``levels``: ``(n,)`` float32 ascending; ``codes``: ``(out, in)`` int64 indices into ``levels``.
    What a method that moves codes between levels (block-output refinement) works on."""

    scale: torch.Tensor
    offset: torch.Tensor
    levels: torch.Tensor
    codes: torch.Tensor


class RegionCodec(Codec):
    """A codec whose parameters are shared by runs of consecutive input columns ("regions"): an affine
    group of ``g`` columns, a ggml block of 32 or super-block of 256. Methods that choose the codes
    themselves (GPTQ) drive it in three steps, gpt-fast's choose-qparams -> quantize -> pack:

    1. :meth:`fit_region`: parameters for a run of whole regions, from the weights as they are now
       (GPTQ: its error-corrected weights, or the original weights up front) and an importance per
       column (the Hessian diagonal, an importance matrix), which codecs with a parameter search use;
    2. :meth:`ColumnQuantizer.quantize_column`: codes of one column under those fixed parameters;
    3. :meth:`pack_regions`: the codes and the parameters as the codec's quantized result, which
       :meth:`dequantize` turns back into exactly the dequantized columns of step 2.

    ``quantize`` (round-to-nearest) is the same as fitting every region to the weights and rounding each
    column, up to the codec's own rounding conventions (ggml's ties and zero blocks).
    """

    @abstractmethod
    def region_width(self, shape: tuple[int, int]) -> int:
        """Columns per region of a weight of ``shape`` (out, in); a last region may be shorter."""

    @property
    def contiguous_regions_only(self) -> bool:
        """Whether a region must be consecutive columns of the stored weight (ggml blocks); False for
        codecs whose format can store a per-column group index (affine groups with a ``g_idx``)."""
        return True

    @abstractmethod
    def fit_region(
        self, w: torch.Tensor, start: int, importance: torch.Tensor | None = None
    ) -> ColumnQuantizer:
        """Parameters for columns ``[start, start + w.shape[1])`` from their weights ``w`` (out, k),
        ``k`` a whole number of regions (or up to the end of the row); ``importance`` (k,) float32,
        larger = the column's error costs more."""

    @abstractmethod
    def pack_regions(
        self,
        shape: tuple[int, int],
        codes: torch.Tensor,
        regions: Sequence[ColumnQuantizer],
        perm: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        """The quantized result of ``codes`` (out, in) int16 and ``regions``, which cover the columns
        in order. ``perm`` (in,): when given, position ``j`` of ``codes`` and of the regions' column
        numbering is input column ``perm[j]`` (act-order with regions in processing order; only codecs
        whose :attr:`contiguous_regions_only` is False accept a permutation that is not the identity)."""

    @abstractmethod
    def element_grid(self, q: QuantizedTensor) -> ElementGrid:
        """``q`` (a result of this codec) as levels on its per-element grid."""

    @abstractmethod
    def with_codes(self, q: QuantizedTensor, codes: torch.Tensor) -> QuantizedTensor:
        """``q`` with its codes replaced by ``codes`` (out, in), indices into ``element_grid(q).levels``;
        the parameters (scales, offsets) are kept."""


@dataclass(frozen=True)
class CodecPlan:
    """Which codec quantizes which tensor: ``default`` for every tensor the walk quantizes, except those
    named in ``tensors`` (full tensor names), whose entry may be ``None``: kept in float (e.g. a GGUF
    mix's F16 fall-back for a width no block type divides). A scheme is one codec; a GGUF mix is a plan
    (Q4_K for most linears, Q6_K for some ``attn_v``/``ffn_down``, fall-backs for odd widths)."""

    default: Codec | None
    tensors: Mapping[str, Codec | None] = field(default_factory=dict)

    def __call__(self, name: str) -> Codec | None:
        return self.tensors.get(name, self.default)

    @classmethod
    def of(cls, codec: Codec | CodecPlan) -> CodecPlan:
        return codec if isinstance(codec, CodecPlan) else cls(codec)

    def codecs(self) -> list[Codec]:
        """Every distinct codec of the plan (the default first)."""
        out: list[Codec] = []
        for c in (self.default, *self.tensors.values()):
            if c is not None and c not in out:
                out.append(c)
        return out


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum w^2 / sum (w - w_hat)^2)`` in dB.

    ``inf`` for an exact reconstruction.
    """
    w64 = w.detach().to(torch.float64)
    err = (w64 - w_hat.detach().to(torch.float64)).pow(2).sum().item()
    sig = w64.pow(2).sum().item()
    if err == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / err)

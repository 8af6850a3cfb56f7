"""The ggml tensor types as data: enum value, block size, bytes per block, bits per weight.

The numbers are not re-typed here: they come from gguf-py (``gguf.constants.GGML_QUANT_SIZES``), the
Python half of llama.cpp, so they follow ggml. :data:`GGMLType` *is* gguf-py's ``GGMLQuantizationType``
(an ``IntEnum`` whose values are ggml's ``enum ggml_type``), so the types read by ``gguf.GGUFReader``
and those chosen by :mod:`lowbit.formats.gguf.mixes` are the same objects.

A ggml tensor is stored row by row; ``ne[0]`` (the length of one contiguous row, the *last* dimension in
PyTorch/numpy order) must be a multiple of the type's block size, and one row of ``n`` elements takes
``n // block_size * type_size`` bytes. Shapes in this module are in PyTorch/numpy order
(``(out_features, in_features)``, or ``(n_expert, out, in)``); GGUF files and llama.cpp logs print them
reversed (``ne`` order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.errors import SchemeError, ShapeError

GGMLType = GGMLQuantizationType
"""ggml's tensor type enum (``GGMLType.Q4_K == 12``), shared with gguf-py."""

# Types that ggml_is_quantized() reports as plain (not block-quantized) storage.
_PLAIN: frozenset[GGMLType] = frozenset(
    {
        GGMLType.F32,
        GGMLType.F16,
        GGMLType.BF16,
        GGMLType.F64,
        GGMLType.I8,
        GGMLType.I16,
        GGMLType.I32,
        GGMLType.I64,
    }
)


@dataclass(frozen=True)
class GGMLTypeInfo:
    """Storage layout of one ggml type: ``block_size`` elements take ``type_size`` bytes."""

    type: GGMLType
    block_size: int
    type_size: int

    @property
    def name(self) -> str:
        return self.type.name

    @property
    def value(self) -> int:
        return int(self.type)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def is_quantized(self) -> bool:
        """True for block-quantized types (what ``ggml_is_quantized`` reports), False for F32/F16/BF16/ints."""
        return self.type not in _PLAIN

    def row_bytes(self, n_per_row: int) -> int:
        """Bytes of one row of ``n_per_row`` elements; :class:`ShapeError` unless the block divides it."""
        if n_per_row < 0:
            raise ShapeError(f"row length must be >= 0, not {n_per_row}")
        if n_per_row % self.block_size != 0:
            raise ShapeError(
                f"a {self.name} row holds whole blocks of {self.block_size} elements; "
                f"{n_per_row} is not a multiple of {self.block_size}"
            )
        return n_per_row // self.block_size * self.type_size

    def tensor_bytes(self, shape: Sequence[int]) -> int:
        """Exact bytes of a tensor of ``shape`` (numpy order: last dimension = contiguous row)."""
        if len(shape) == 0:
            return self.row_bytes(1)
        n_rows = math.prod(int(d) for d in shape[:-1])
        return n_rows * self.row_bytes(int(shape[-1]))


def _build_table() -> Mapping[GGMLType, GGMLTypeInfo]:
    table: dict[GGMLType, GGMLTypeInfo] = {}
    for t, (block_size, type_size) in GGML_QUANT_SIZES.items():
        table[GGMLType(t)] = GGMLTypeInfo(GGMLType(t), int(block_size), int(type_size))
    return MappingProxyType(table)


GGML_TYPES: Mapping[GGMLType, GGMLTypeInfo] = _build_table()
"""Every ggml type gguf-py knows (F32 … Q8_K, IQ1_S … IQ4_XS, TQ1_0, TQ2_0, MXFP4, …) -> its layout."""


def ggml_type(t: GGMLType | str | int) -> GGMLType:
    """Parse a type given as the enum, its value, or its name (case-insensitive: ``"q4_k"``, ``"IQ4_XS"``)."""
    if isinstance(t, GGMLType):
        return t
    if isinstance(t, int):
        try:
            return GGMLType(t)
        except ValueError:
            raise SchemeError(f"{t} is not a ggml type value known to gguf-py") from None
    member = GGMLType.__members__.get(t.strip().upper())
    if member is None:
        known = ", ".join(sorted(x.name for x in GGML_TYPES))
        raise SchemeError(f"unknown ggml type {t!r}; known: {known}")
    return member


def type_info(t: GGMLType | str | int) -> GGMLTypeInfo:
    """The :class:`GGMLTypeInfo` of ``t`` (see :func:`ggml_type` for accepted spellings)."""
    gt = ggml_type(t)
    info = GGML_TYPES.get(gt)
    if info is None:
        raise SchemeError(f"gguf-py has no block size for ggml type {gt.name}")
    return info


def block_size(t: GGMLType | str | int) -> int:
    return type_info(t).block_size


def is_quantized(t: GGMLType | str | int) -> bool:
    return type_info(t).is_quantized


def row_bytes(t: GGMLType | str | int, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` elements of type ``t`` (ggml's ``ggml_row_size``)."""
    return type_info(t).row_bytes(n_per_row)


def tensor_nbytes(t: GGMLType | str | int, shape: Sequence[int]) -> int:
    """Exact bytes of a tensor of ``shape`` (numpy order, last dim = row) stored as ``t``.

    Raises :class:`ShapeError` when the row length is not a multiple of the type's block size.
    """
    return type_info(t).tensor_bytes(shape)

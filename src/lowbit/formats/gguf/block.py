"""The contract of a ggml block codec, its registry, and the float32 primitives that mirror ggml's.

A :class:`GGMLBlockCodec` turns rows of float32 weights into the exact bytes ggml's
``ggml_quantize_chunk`` writes for its type, and back into the floats ggml's ``to_float`` returns.
One codec instance per ggml type; every concrete subclass that sets ``ggml_type`` registers itself in
:data:`CODECS` (keyed by the type name, ``"Q4_0"``, ``"IQ4_XS"``). :func:`get_codec` finds one by
name, enum or value and imports the modules that define codecs on first use.

Bit-exactness with ggml rests on computing in float32 exactly as ggml's C does. The helpers below are
the pieces every codec needs for that:

* :func:`nearest_int` is ggml's ``nearest_int`` (the ``+ 12582912.f`` magic-number trick: round half
  to even, and the same wrap-around as the C for out-of-range input).
* :func:`seq_sum` sums along an axis strictly left to right in float32, as a C ``for`` loop does
  (``np.sum`` sums pairwise and differs in the last bits).
* :func:`fp16_bytes` is ``GGML_FP32_TO_FP16`` (round to nearest even, subnormals kept: numpy's
  ``astype(float16)``), returned as little-endian bytes.
* :func:`absmax_first` is the ``if (fabsf(x) > amax)`` scan: the largest magnitude and the signed
  value holding it, the first one on ties.
* :func:`pack_nibbles` / :func:`pack_high_bits` are ggml's layout of 4-bit codes (element ``j`` and
  ``j + n/2`` share byte ``j``, low nibble first) and of 5th bits (bit ``j`` of a little-endian word).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
from gguf import quants as gguf_quants

from lowbit.errors import NonFiniteWeightError, SchemeError, ShapeError
from lowbit.formats.gguf.types import GGMLType, ggml_type, type_info

CODECS: dict[str, GGMLBlockCodec] = {}
"""ggml type name (``"Q4_0"``) -> the codec of that type. Filled by subclasses of :class:`GGMLBlockCodec`."""

# Modules whose import registers codecs; :func:`get_codec` imports them on demand.
_PROVIDERS: tuple[str, ...] = (
    "lowbit.formats.gguf.legacy",
    "lowbit.formats.gguf.iquants",
    "lowbit.formats.gguf.ternary",
    "lowbit.formats.gguf.kquants",
)


class GGMLBlockCodec(ABC):
    """Rows of float32 <-> ggml's bytes for one block type.

    Subclasses set ``ggml_type`` (and ``uses_imatrix = False`` for types whose ggml quantizer ignores
    the importance vector) and implement :meth:`_quantize`; :meth:`_dequantize` defaults to gguf-py's
    ``dequantize``, which is bit-exact with ggml's ``to_float`` for every type.
    """

    ggml_type: ClassVar[GGMLType]
    uses_imatrix: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "ggml_type" in cls.__dict__:
            name = cls.ggml_type.name
            if name in CODECS:
                raise RuntimeError(f"two codecs registered for ggml type {name}")
            CODECS[name] = cls()

    @property
    def name(self) -> str:
        return self.ggml_type.name

    @property
    def block_size(self) -> int:
        return type_info(self.ggml_type).block_size

    @property
    def type_size(self) -> int:
        return type_info(self.ggml_type).type_size

    def row_bytes(self, n_per_row: int) -> int:
        return type_info(self.ggml_type).row_bytes(n_per_row)

    def quantize_rows(self, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """Quantize ``x`` float (rows, n_per_row) -> uint8 (rows, row_bytes), byte for byte as ggml.

        ``imatrix`` is float32 (n_per_row,), the importance of each column (llama-imatrix's values),
        or None; it is ggml's ``quant_weights`` argument of ``ggml_quantize_chunk``.
        """
        x = np.asarray(x)
        if x.ndim != 2:
            raise ShapeError(f"{self.name} quantizes a 2-D array (rows, n_per_row), not shape {x.shape}")
        n_per_row = int(x.shape[1])
        self.row_bytes(n_per_row)  # raises ShapeError unless whole blocks
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise NonFiniteWeightError(f"cannot quantize to {self.name}: the input holds NaN or Inf values")
        qw: np.ndarray | None = None
        if imatrix is not None and self.uses_imatrix:
            qw = np.ascontiguousarray(imatrix, dtype=np.float32)
            if qw.shape != (n_per_row,):
                raise ShapeError(
                    f"the importance vector of a {self.name} row of {n_per_row} has shape ({n_per_row},), "
                    f"not {qw.shape}"
                )
            if not np.isfinite(qw).all():
                raise NonFiniteWeightError(f"the importance vector for {self.name} holds NaN or Inf values")
        if x.shape[0] == 0:
            return np.zeros((0, self.row_bytes(n_per_row)), dtype=np.uint8)
        out = self._quantize(x, qw)
        assert out.dtype == np.uint8 and out.shape == (x.shape[0], self.row_bytes(n_per_row))
        return out

    def dequantize_rows(self, data: np.ndarray, n_per_row: int) -> np.ndarray:
        """ggml's ``to_float``: uint8 (rows, row_bytes) -> float32 (rows, n_per_row)."""
        data = np.asarray(data)
        rb = self.row_bytes(n_per_row)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != rb:
            raise ShapeError(
                f"{self.name} rows of {n_per_row} elements are uint8 (rows, {rb}), "
                f"not {data.dtype} {data.shape}"
            )
        if data.shape[0] == 0:
            return np.zeros((0, n_per_row), dtype=np.float32)
        out = self._dequantize(np.ascontiguousarray(data), n_per_row)
        assert out.dtype == np.float32 and out.shape == (data.shape[0], n_per_row)
        return out

    @abstractmethod
    def _quantize(self, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        """x float32 (rows, n_per_row), C-contiguous, finite; imatrix float32 (n_per_row,) or None."""

    def _dequantize(self, data: np.ndarray, n_per_row: int) -> np.ndarray:
        out = gguf_quants.dequantize(data, self.ggml_type)
        return np.asarray(out, dtype=np.float32).reshape(data.shape[0], n_per_row)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def get_codec(t: GGMLType | str | int) -> GGMLBlockCodec:
    """The registered codec of ggml type ``t`` (enum, value or case-insensitive name)."""
    gt = ggml_type(t)
    for module in _PROVIDERS:
        if gt.name in CODECS:
            break
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    codec = CODECS.get(gt.name)
    if codec is None:
        have = ", ".join(sorted(CODECS))
        raise SchemeError(f"lowbit has no codec for ggml type {gt.name}; available: {have}")
    return codec


# ---------------------------------------------------------------------------------------------------
# float32 primitives that reproduce ggml's C arithmetic
# ---------------------------------------------------------------------------------------------------

_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: float32 -> int32, round half to even (valid for ``|v| <= 4194303``)."""
    s = np.asarray(v, dtype=np.float32) + _MAGIC
    return (s.view(np.int32) & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def seq_sum(a: np.ndarray, axis: int = -1, out: np.ndarray | None = None) -> np.ndarray:
    """Sum float32 ``a`` along ``axis`` strictly in order (a C accumulation loop), axis removed.

    Along axis 0 it is a loop of vector adds (fast when the other axes are wide: keep blocks as
    ``(block_len, n_blocks)``); along any other axis it is ``np.add.accumulate`` (also sequential).
    """
    a = np.asarray(a, dtype=np.float32)
    ax = axis % a.ndim
    if ax != 0:
        acc = np.add.accumulate(a, axis=ax, dtype=np.float32)
        res = np.take(acc, -1, axis=ax)
        if out is None:
            return res
        np.copyto(out, res)
        return out
    if out is None:
        out = np.empty(a.shape[1:], dtype=np.float32)
    np.copyto(out, a[0])
    for i in range(1, a.shape[0]):
        np.add(out, a[i], out=out)
    return out


def absmax_first(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks x float32 (n, B) -> (amax, max) (B,): the largest |x| and the signed element holding it.

    On a tie between ``+a`` and ``-a`` the first in the block wins, as ggml's ``if (ax > amax)`` scan.
    (``np.argmax`` gives that too, but is several times slower than two reductions.)
    """
    hi = x.max(axis=0)
    lo = x.min(axis=0)
    neg = -lo
    amax = np.maximum(hi, neg)
    mx = np.where(hi >= neg, hi, lo)
    tie = np.nonzero(hi == neg)[0]
    if tie.size:
        sub = x[:, tie]
        first = np.argmax(np.abs(sub), axis=0)
        mx[tie] = sub[first, np.arange(tie.size)]
    return amax, mx


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """``GGML_FP32_TO_FP16`` of float32 (...,) -> uint8 (..., 2), little-endian."""
    with np.errstate(over="ignore"):  # |v| >= 65520 -> inf, as in ggml
        h = np.asarray(v, dtype=np.float32).astype("<f2")
    return h.view(np.uint8).reshape(*h.shape, 2)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """4-bit codes uint8 (..., n) -> uint8 (..., n/2): byte j = q[j] | q[j + n/2] << 4."""
    half = q.shape[-1] // 2
    return (q[..., :half] & 0x0F) | ((q[..., half:] & 0x0F) << 4)


def pack_high_bits(q: np.ndarray, bit: int = 4) -> np.ndarray:
    """Bit ``bit`` of codes (..., n<=32) -> uint8 (..., 4): a little-endian uint32, element j at bit j."""
    n = q.shape[-1]
    bits = ((q.astype(np.uint32) >> bit) & 1) << np.arange(n, dtype=np.uint32)
    word = np.bitwise_or.reduce(bits, axis=-1).astype("<u4")
    return word[..., None].view(np.uint8)

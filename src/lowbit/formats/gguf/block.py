"""The contract of a ggml block codec, its registry, and the float32 primitives that mirror ggml's.

A :class:`GGMLBlockCodec` turns rows of float32 weights into the exact bytes ggml's
``ggml_quantize_chunk`` writes for its type, and back into the floats ggml's ``to_float`` returns.
One codec instance per ggml type; every concrete subclass that sets ``ggml_type`` registers itself in
:data:`CODECS` (keyed by the type name, ``"Q4_0"``, ``"IQ4_XS"``). :func:`get_codec` finds one by
name, enum or value.

Bit-exactness with ggml rests on computing in float32 exactly as ggml's C does. The primitives below
are the one implementation every codec uses for that (the scale searches built on them are in
:mod:`lowbit.formats.gguf.search`):

* :func:`nearest_int` is ggml's ``nearest_int`` (the ``+ 12582912.f`` magic-number trick: round half
  to even, and the same wrap-around as the C for out-of-range input); :func:`c_trunc_int` and
  :func:`c_int8` are C's ``(int)``/``(int8_t)`` conversions as x86-64 executes them.
* :func:`seq_sum` sums along an axis strictly left to right in float32, as a C ``for`` loop does,
  from ``0`` or from the first term (``np.sum`` sums pairwise and differs in the last bits).
* :func:`absmax_first`, :func:`min_first`, :func:`max_first` are ggml's ``if (x > m)`` scans: which
  element wins a tie, and which zero (``+0.0``/``-0.0``) a zero result is, both reach the bytes.
* :func:`fp16_bytes` / :func:`fp16_round` / :func:`fp16_from_bytes` are ``GGML_FP32_TO_FP16`` (round
  to nearest even, subnormals kept: numpy's ``astype(float16)``) and back.
* :func:`pack_nibbles` / :func:`pack_high_bits` are ggml's layout of 4-bit codes (element ``j`` and
  ``j + n/2`` share byte ``j``, low nibble first) and of 5th bits (bit ``j`` of a little-endian word).
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import ClassVar

import numpy as np
import numpy.typing as npt
from gguf import quants as gguf_quants

from lowbit.errors import NonFiniteWeightError, SchemeError, ShapeError
from lowbit.formats.gguf.types import GGMLType, ggml_type, type_info

_native: ModuleType | None
try:  # the compiled row quantizers (setup.py); optional: the numpy codecs give the same bytes
    import lowbit.formats.gguf._kernels as _native
except ImportError:  # pragma: no cover - installed without a C compiler
    _native = None

NATIVE_TYPES: frozenset[str] = frozenset(
    {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
)
"""Types whose rows :mod:`lowbit.formats.gguf._kernels` quantizes (with and without an importance
vector), byte for byte as the numpy codec of the type (tested on both paths)."""

NATIVE_DEQUANT_TYPES: frozenset[str] = frozenset(
    {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
)
"""Types whose rows :mod:`lowbit.formats.gguf._kernels` dequantizes (ggml's ``to_float``), bit for bit
as gguf-py's and the numpy codecs' ``dequantize``, NaN payloads included (tested on both paths)."""


def native_kernels() -> ModuleType | None:
    """The compiled kernels, or None when they are not built or switched off (``LOWBIT_NATIVE=0``
    forces the numpy codecs, e.g. to compare the two)."""
    return _native if os.environ.get("LOWBIT_NATIVE", "1") != "0" else None


CODECS: dict[str, GGMLBlockCodec] = {}
"""ggml type name (``"Q4_0"``) -> the codec of that type. Filled by subclasses of :class:`GGMLBlockCodec`
as their modules are imported; importing :mod:`lowbit.formats.gguf` imports all of them."""

# The modules that define codecs (importing one registers its codecs).
_PROVIDERS: tuple[str, ...] = (
    "lowbit.formats.gguf.legacy",
    "lowbit.formats.gguf.iquants",
    "lowbit.formats.gguf.ternary",
    "lowbit.formats.gguf.kquants",
)


PIECE_ELEMENTS = 1 << 17
"""Elements (whole rows) per piece of work handed to a thread by :meth:`GGMLBlockCodec.quantize_rows`:
small enough that two threads share out a tensor evenly on a busy machine, large enough that numpy's
per-call overhead stays small."""


def n_workers() -> int:
    """Threads for independent pieces: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def register_all_codecs() -> None:
    """Import every module that defines codecs, so that :data:`CODECS` is complete."""
    for module in _PROVIDERS:
        importlib.import_module(module)


class GGMLBlockCodec(ABC):
    """Rows of float32 <-> ggml's bytes for one block type.

    Subclasses set ``ggml_type`` (and ``uses_imatrix = False`` for types whose ggml quantizer ignores
    the importance vector) and implement :meth:`_quantize`; :meth:`_dequantize` defaults to gguf-py's
    ``dequantize``, which is bit-exact with ggml's ``to_float`` for every type.
    """

    ggml_type: ClassVar[GGMLType]
    uses_imatrix: ClassVar[bool] = True
    # A block as parameters + codes (for methods that choose the codes: GPTQ): every ``sub_size``
    # consecutive elements share one (scale, offset) and element ``e`` dequantizes, in float32 as ggml's
    # ``to_float``, to ``scale * levels[code] - offset``. 0: the type is not split (ternary, MXFP4).
    sub_size: ClassVar[int] = 0
    levels: ClassVar[tuple[int, ...]] = ()  # value of each code index, ascending

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

    def quantize_rows(
        self, x: np.ndarray, imatrix: np.ndarray | None = None, threads: int | None = None
    ) -> np.ndarray:
        """Quantize ``x`` float (rows, n_per_row) -> uint8 (rows, row_bytes), byte for byte as ggml.

        ``imatrix`` is float32 (n_per_row,), the importance of each column (llama-imatrix's values),
        or None; it is ggml's ``quant_weights`` argument of ``ggml_quantize_chunk``. ``threads``: how
        many threads share the rows (None: one per CPU; callers that run their own pool pass 1).
        """
        x = np.asarray(x)
        if x.ndim != 2:
            raise ShapeError(f"{self.name} quantizes a 2-D array (rows, n_per_row), not shape {x.shape}")
        n_per_row = int(x.shape[1])
        self.row_bytes(n_per_row)  # raises ShapeError unless whole blocks
        x = np.ascontiguousarray(x, dtype=np.float32)
        native = native_kernels() if self.name in NATIVE_TYPES else None
        non_finite = f"cannot quantize to {self.name}: the input holds NaN or Inf values"
        if native is None and not np.isfinite(x).all():  # the kernels check each row themselves
            raise NonFiniteWeightError(non_finite)
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
        rows = int(x.shape[0])
        out = np.empty((rows, self.row_bytes(n_per_row)), dtype=np.uint8)
        if rows == 0:
            return out
        step = max(1, PIECE_ELEMENTS // max(n_per_row, 1))

        def run(a: int) -> None:
            b = min(a + step, rows)
            if native is not None:  # releases the GIL: the pieces run in parallel
                if not native.quantize(int(self.ggml_type), x[a:b], b - a, n_per_row, qw, out[a:b]):
                    raise NonFiniteWeightError(non_finite)
                return
            # ggml overflows and divides by zero silently (huge inputs, zero blocks), so does numpy
            # here; np.errstate is per thread, hence set in the worker
            with np.errstate(all="ignore"):
                part = self._quantize(x[a:b], qw)
            assert part.dtype == np.uint8 and part.shape == (b - a, out.shape[1])
            out[a:b] = part

        starts = range(0, rows, step)
        workers = min(len(starts), n_workers() if threads is None else max(1, threads))
        if workers <= 1:
            for a in starts:
                run(a)
        else:
            # numpy releases the GIL inside its loops; rows are independent (every statistic ggml
            # computes is per block, super-block or row), so the bytes do not depend on the threads
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(run, starts):
                    pass
        return out

    def dequantize_rows(self, data: np.ndarray, n_per_row: int) -> np.ndarray:
        """ggml's ``to_float``: uint8 (rows, row_bytes) -> float32 (rows, n_per_row).

        Every byte pattern is a block: scales that are NaN or infinite in fp16 give NaN/Inf floats,
        as in ggml. The compiled kernels (:data:`NATIVE_DEQUANT_TYPES`) release the GIL, so callers
        may dequantize pieces of a tensor in parallel threads.
        """
        data = np.asarray(data)
        rb = self.row_bytes(n_per_row)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != rb:
            raise ShapeError(
                f"{self.name} rows of {n_per_row} elements are uint8 (rows, {rb}), "
                f"not {data.dtype} {data.shape}"
            )
        rows = int(data.shape[0])
        if rows == 0:
            return np.zeros((0, n_per_row), dtype=np.float32)
        data = np.ascontiguousarray(data)
        native = native_kernels() if self.name in NATIVE_DEQUANT_TYPES else None
        if native is not None:
            out = np.empty((rows, n_per_row), dtype=np.float32)
            native.dequantize(int(self.ggml_type), data, rows, n_per_row, out)
            return out
        with np.errstate(all="ignore"):  # ggml's to_float overflows silently (huge fp16 scale products)
            out = self._dequantize(data, n_per_row)
        assert out.dtype == np.float32 and out.shape == (rows, n_per_row)
        return out

    # ------------------------------------------------------------------ parameters and codes
    @property
    def splittable(self) -> bool:
        """Whether :meth:`split_blocks` / :meth:`join_blocks` exist for this type."""
        return self.sub_size > 0

    def split_blocks(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 (B, type_size) blocks -> ``scale``, ``offset`` float32 (B, block_size / sub_size) and
        ``codes`` uint8 (B, block_size), indices into :attr:`levels`: element ``e`` of block ``b`` is
        ``scale[b, e // sub_size] * levels[codes[b, e]] - offset[b, e // sub_size]``, the float32 that
        :meth:`dequantize_rows` gives (ggml's order of operations)."""
        blocks = self._check_blocks(blocks)
        if not self.splittable:
            raise SchemeError(f"{self.name} blocks cannot be split into scales and codes")
        with np.errstate(over="ignore", invalid="ignore"):
            return self._split(blocks)

    def join_blocks(self, blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """``blocks`` (B, type_size) with their codes replaced by ``codes`` (B, block_size), indices into
        :attr:`levels`; the parameters (scales, minimums) are kept. A new array."""
        blocks = self._check_blocks(blocks)
        if not self.splittable:
            raise SchemeError(f"{self.name} blocks cannot be split into scales and codes")
        codes = np.asarray(codes)
        if codes.shape != (blocks.shape[0], self.block_size):
            raise ShapeError(
                f"{self.name} codes are ({blocks.shape[0]}, {self.block_size}), not {codes.shape}"
            )
        if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= len(self.levels)):
            raise ShapeError(f"{self.name} codes are indices 0..{len(self.levels) - 1}")
        return self._join(blocks.copy(), codes.astype(np.int32))

    @property
    def buildable(self) -> bool:
        """Whether :meth:`build_blocks` exists: blocks whose parameters are plain fp16 values (the
        legacy types), which can be made from given scales, offsets and codes."""
        return False

    @property
    def stores_offset(self) -> bool:
        """Whether a block stores an offset (a min: Q4_1, Q5_1); without one the offset is 0."""
        return False

    def build_blocks(self, scale: np.ndarray, offset: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`split_blocks` for :attr:`buildable` types: ``scale``, ``offset`` float32
        (B,) stored as fp16 (``offset`` must be 0 for types that store none), ``codes`` (B, block_size)
        indices into :attr:`levels` -> uint8 (B, type_size) blocks."""
        if not self.buildable:
            raise SchemeError(f"{self.name} blocks are not made from given scales by lowbit")
        scale = np.asarray(scale, dtype=F32).reshape(-1)
        offset = np.asarray(offset, dtype=F32).reshape(-1)
        if not self.stores_offset and np.any(offset != 0):
            raise ShapeError(f"{self.name} blocks store no offset; every offset must be 0")
        header = np.zeros((scale.shape[0], self.type_size), dtype=np.uint8)
        header[:, 0:2] = fp16_bytes(scale)
        if self.stores_offset:
            header[:, 2:4] = fp16_bytes(-offset)  # the min m of x = d * L + m
        return self.join_blocks(header, codes)

    def _check_blocks(self, blocks: np.ndarray) -> np.ndarray:
        blocks = np.asarray(blocks)
        if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] != self.type_size:
            raise ShapeError(
                f"{self.name} blocks are uint8 (n, {self.type_size}), not {blocks.dtype} {blocks.shape}"
            )
        return np.ascontiguousarray(blocks)

    def _split(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _join(self, blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @abstractmethod
    def _quantize(self, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        """x float32 (rows, n_per_row), C-contiguous, finite; imatrix float32 (n_per_row,) or None.

        Called from worker threads on disjoint pieces of whole rows (:meth:`quantize_rows`): it must
        keep no state between calls."""

    def _dequantize(self, data: np.ndarray, n_per_row: int) -> np.ndarray:
        out = gguf_quants.dequantize(data, self.ggml_type)
        return np.asarray(out, dtype=np.float32).reshape(data.shape[0], n_per_row)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class GGUFPyCodec(GGMLBlockCodec):
    """A type whose ggml quantizer ignores the importance vector and whose bytes gguf-py's
    ``quantize`` reproduces exactly (Q8_0, MXFP4, TQ1_0, TQ2_0: checked against the goldens and
    libggml in the tests; no signed zero reaches their bytes)."""

    uses_imatrix = False

    def _quantize(self, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        out = gguf_quants.quantize(x, self.ggml_type)
        return np.asarray(out, dtype=np.uint8).reshape(x.shape[0], self.row_bytes(x.shape[1]))


def get_codec(t: GGMLType | str | int) -> GGMLBlockCodec:
    """The registered codec of ggml type ``t`` (enum, value or case-insensitive name)."""
    gt = ggml_type(t)
    if gt.name not in CODECS:
        register_all_codecs()
    codec = CODECS.get(gt.name)
    if codec is None:
        have = ", ".join(sorted(CODECS))
        raise SchemeError(f"lowbit has no codec for ggml type {gt.name}; available: {have}")
    return codec


# ---------------------------------------------------------------------------------------------------
# float32 primitives that reproduce ggml's C arithmetic
# ---------------------------------------------------------------------------------------------------

F32 = np.float32
F32Array = npt.NDArray[np.float32]
I32Array = npt.NDArray[np.int32]
U8Array = npt.NDArray[np.uint8]

GROUP_MAX_EPS = F32(1e-15)
"""ggml's ``GROUP_MAX_EPS``: a block whose largest magnitude is below it is stored as all zeros."""

_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves the rounded integer in the low mantissa bits
NEAREST_INT_EXACT = F32(4194303.0)
"""Up to this magnitude :func:`nearest_int` equals ``np.rint`` (beyond it the C wraps)."""


def nearest_int(v: np.ndarray) -> I32Array:
    """ggml's ``nearest_int``: float32 -> int32, round half to even.

    Exact for ``|v| <= 4194303``; outside it (and for NaN) it returns the same wrapped value as ggml,
    whose assert is compiled out.
    """
    s = np.asarray(v, dtype=F32) + _MAGIC
    return (s.view(np.int32) & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def c_int8(v: np.ndarray) -> I32Array:
    """C's ``(int8_t)`` of int32 values (two's-complement wrap), as int32."""
    return ((np.asarray(v, dtype=np.int32) + 128) & 0xFF) - 128


def c_trunc_int(v: np.ndarray) -> I32Array:
    """C's float -> int conversion as x86-64 does it (``cvttss2si``): toward zero, and INT32_MIN for
    NaN or out-of-range values (numpy's cast compiles to the same instruction)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(v, dtype=F32).astype(np.int32)


def inv_or_zero(v: np.ndarray) -> F32Array:
    """C's ``v ? 1.0f/v : 0.0f`` in float32 (NaN is true in C: 1/NaN = NaN)."""
    with np.errstate(divide="ignore"):
        return np.where(v != 0, F32(1.0) / v, F32(0.0)).astype(F32)


def seq_sum(
    a: np.ndarray, axis: int = 0, out: np.ndarray | None = None, *, from_first: bool = False
) -> F32Array:
    """Sum float32 ``a`` along ``axis`` strictly in order, as a C loop does; the axis is removed.

    ``from_first=False`` is ``float s = 0; for (i = 0; ...) s += a[i];``, ``True`` is ``float s = a[0];
    for (i = 1; ...) s += a[i];``. They differ only where every term is ``-0.0`` (``+0.0`` from zero),
    which reaches the output as the sign of a zero scale. ``np.sum`` along a contiguous axis sums
    pairwise and differs in the last bits. Along axis 0 (blocks laid out ``(block_len, n_blocks)``) it
    is a row-by-row reduction; along any other axis ``np.add.accumulate`` (also sequential).
    """
    a = np.asarray(a, dtype=F32)
    ax = axis % a.ndim
    if ax != 0:
        res = np.take(np.add.accumulate(a, axis=ax, dtype=F32), -1, axis=ax)
        if not from_first:
            res += F32(0.0)  # -0.0 + 0.0 = +0.0; every other value is unchanged
        if out is None:
            return res
        np.copyto(out, res)
        return out
    if a.ndim >= 2 and a[0].size >= 2 and a.flags.c_contiguous:
        # numpy reduces a C-contiguous array along its outer axis row after row, from ``initial``
        # (pairwise summation is used only along the contiguous axis, see np.sum): the C loop's
        # order without a Python loop. -0.0 + a[0] is a[0] exactly, so initial=-0.0 starts from the
        # first term. A single column would be reduced along the contiguous axis: the loop below.
        return np.add.reduce(a, axis=0, out=out, initial=F32(-0.0) if from_first else F32(0.0))
    if out is None:
        out = np.array(a[0], dtype=F32)  # a (n,) gives a 0-d array
    else:
        np.copyto(out, a[0])
    for i in range(1, a.shape[0]):
        np.add(out, a[i], out=out)
    if not from_first:
        out += F32(0.0)
    return out


def absmax_first(x: np.ndarray) -> tuple[F32Array, F32Array]:
    """Blocks x float32 (n, B) -> (amax, max) (B,): ggml's ``float amax = 0, max = 0; for (...) if
    (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }``.

    The largest magnitude and the signed element holding it, the first one on ties between ``+a`` and
    ``-a``; NaNs never win; ``(+0, +0)`` when nothing beats 0. (Two reductions, with ``np.argmax`` only
    on tied or NaN columns: several times faster than ``np.argmax`` everywhere.)
    """
    hi = x.max(axis=0)
    lo = x.min(axis=0)
    neg = -lo
    amax = np.maximum(hi, neg)
    mx = np.where(hi >= neg, hi, lo)
    slow = np.nonzero(((hi == neg) & (hi > 0)) | np.isnan(amax))[0]
    if slow.size:
        sub = np.abs(x[:, slow])
        sub[np.isnan(sub)] = -1
        first = np.argmax(sub, axis=0)
        amax[slow] = sub[first, np.arange(slow.size)]
        mx[slow] = x[first, slow]
    found = amax > 0
    return np.where(found, amax, F32(0)).astype(F32), np.where(found, mx, F32(0)).astype(F32)


def min_first(x: np.ndarray) -> F32Array:
    """Blocks x float32 (n, B) -> (B,): ggml's ``min = x[0]; for (...) if (x[i] < min) min = x[i];``.

    The minimum; where it is zero, the first zero of the block with its sign (``np.min`` does not say
    which zero it returns). Finite input.
    """
    return _zero_first(x, x.min(axis=0))


def max_first(x: np.ndarray) -> F32Array:
    """As :func:`min_first` for ``if (x[i] > max) max = x[i];``."""
    return _zero_first(x, x.max(axis=0))


def _zero_first(x: np.ndarray, m: np.ndarray) -> F32Array:
    """``m`` with each zero replaced by the first zero of its column (with that zero's sign); the
    search runs only on those columns (few: real blocks rarely have a zero extreme)."""
    m = np.asarray(m, dtype=F32)
    cols = np.nonzero(m == 0)[0]
    if cols.size:
        sub = x[:, cols]
        m[cols] = sub[np.argmax(sub == 0, axis=0), np.arange(cols.size)]
    return m


def fp16_round(v: np.ndarray) -> F32Array:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``: the float32 value of the fp16 ggml stores.

    numpy's float32 -> float16 cast rounds exactly as ggml's (nearest even, subnormals kept, overflow
    to inf); checked on all fp16 ties in ``test_block.py``.
    """
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=F32).astype(np.float16).astype(F32)


def fp16_bytes(v: np.ndarray) -> U8Array:
    """``GGML_FP32_TO_FP16`` of float32 (...,) -> uint8 (..., 2), little-endian."""
    with np.errstate(over="ignore"):  # |v| >= 65520 -> inf, as in ggml
        h = np.asarray(v, dtype=F32).astype("<f2")
    return h.view(np.uint8).reshape(*h.shape, 2)


def fp16_from_bytes(b: np.ndarray) -> F32Array:
    """uint8 (..., 2) little-endian fp16 -> float32 (...,) (exact)."""
    b = np.ascontiguousarray(b, dtype=np.uint8)
    return b.view("<f2").reshape(b.shape[:-1]).astype(F32)


def pack_nibbles(q: np.ndarray) -> U8Array:
    """4-bit codes (..., n) -> uint8 (..., n/2): byte j = q[j] & 15 | (q[j + n/2] & 15) << 4."""
    half = q.shape[-1] // 2
    return ((q[..., :half] & 0x0F) | ((q[..., half:] & 0x0F) << 4)).astype(np.uint8)


def unpack_nibbles(b: np.ndarray) -> U8Array:
    """Inverse of :func:`pack_nibbles`: uint8 (..., n/2) -> codes (..., n) in 0..15."""
    b = np.asarray(b, dtype=np.uint8)
    return np.concatenate([b & 0x0F, b >> 4], axis=-1)


def unpack_high_bits(b: np.ndarray, n: int = 32) -> U8Array:
    """Inverse of :func:`pack_high_bits` for the bit itself: uint8 (..., 4) -> (..., n) in 0..1."""
    word = np.ascontiguousarray(b, dtype=np.uint8).view("<u4")  # (..., 1)
    return ((word >> np.arange(n, dtype=np.uint32)) & 1).astype(np.uint8)


def pack_high_bits(q: np.ndarray, bit: int = 4) -> U8Array:
    """Bit ``bit`` of codes (..., n<=32) -> uint8 (..., 4): a little-endian uint32, element j at bit j."""
    n = q.shape[-1]
    bits = ((q.astype(np.uint32) >> bit) & 1) << np.arange(n, dtype=np.uint32)
    word = np.bitwise_or.reduce(bits, axis=-1).astype("<u4")
    return word[..., None].view(np.uint8)

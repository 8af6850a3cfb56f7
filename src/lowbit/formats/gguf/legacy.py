"""ggml's legacy block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32), bit-exact with ggml.

``ggml_quantize_chunk`` takes one of two paths:

* no importance vector: ``quantize_row_q*_ref``. Q4_0/Q5_0 scale each block by its signed absmax
  (``d = max / -8``, codes ``MIN(15, (int8_t)(x/d + 8.5f))``), Q4_1/Q5_1 by its range (``d = (max -
  min) / 15``, ``m = min``, codes truncated from ``(x - min)/d + 0.5f``). Written out here because
  the sign of a zero ``max``/``min`` reaches the bytes (an all-zero block stores ``d = -0.0`` in
  Q4_0; a block whose minimum is zero stores the sign of its first zero as ``m``), and gguf-py, whose
  ``np.argmax``/``np.min`` pick other zeros, differs there. Q8_0 is delegated to gguf-py, which
  matches ggml byte for byte (its ``d`` is ``amax/127``, never a signed zero);
* with one: ``quantize_row_q*_impl``, a weighted least-squares search per block, with weights
  ``imatrix[j] * sqrt(sigma2 + x[j]^2)`` (``sigma2`` = mean of ``x^2`` over the whole row): 19 scales
  around ``nmax/max`` for the symmetric types (``make_qx_quants``), 37 (scale, min) pairs for the types
  with a minimum (``make_qkx3_quants``), both from :mod:`search`. Q8_0 ignores the vector.

Byte layouts (little-endian, one block of 32):

    Q4_0  d:f16 | qs[16]            qs[j] = L[j] | L[j+16] << 4; x = d * (L - 8)
    Q4_1  d:f16 m:f16 | qs[16]      x = d * L + m
    Q5_0  d:f16 | qh:u32 | qs[16]   bit j of qh = bit 4 of L[j]; x = d * (L - 16)
    Q5_1  d:f16 m:f16 | qh | qs     x = d * L + m
    Q8_0  d:f16 | qs:i8[32]         x = d * qs
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import quants as gguf_quants

from lowbit.formats.gguf.block import (
    F32,
    F32Array,
    GGMLBlockCodec,
    U8Array,
    absmax_first,
    c_int8,
    c_trunc_int,
    fp16_bytes,
    fp16_from_bytes,
    inv_or_zero,
    max_first,
    min_first,
    pack_high_bits,
    pack_nibbles,
    seq_sum,
    unpack_high_bits,
    unpack_nibbles,
)
from lowbit.formats.gguf.search import imatrix_weights, make_qkx_quants, make_qx_quants
from lowbit.formats.gguf.types import GGMLType

QK = 32
# Blocks handled per numpy pass: keeps the (32, chunk) float32 temporaries in cache.
_CHUNK = 2048
_BELOW_HALF = np.nextafter(F32(0.5), F32(0.0))


def _to_blocks_t(a: np.ndarray) -> np.ndarray:
    """(rows, n) -> (32, n_blocks): element index first, so that sums over a block are sequential adds."""
    return np.ascontiguousarray(a.reshape(-1, QK).T)


class _Legacy(GGMLBlockCodec):
    """Blocks of 32 in chunks: :meth:`_ref_blocks` without an importance vector, :meth:`_weighted_blocks`
    with one. Both take blocks as columns, ``(32, B)`` float32, and return ``(B, type_size)`` bytes.

    Split (:meth:`split_blocks`): one scale ``d`` per block (offset ``-m`` for the types with a min),
    the 4 or 5-bit code ``L`` as the level index (Q8_0: the int8 value + 128)."""

    nmax: ClassVar[int]  # codes in [0, 2*nmax) (symmetric types) or [0, nmax] (types with a min)
    sub_size = QK
    n_heads: ClassVar[int] = 1  # fp16 values at the start of a block: d (and m)

    @property
    def buildable(self) -> bool:
        return True

    @property
    def stores_offset(self) -> bool:
        return self.n_heads == 2

    def _split(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = fp16_from_bytes(blocks[:, 0:2])[:, None]
        # x = d*L + m = d*L - (-m); symmetric types: d*(L - nmax) - (+0), which keeps a -0.0 as ggml
        offset = -fp16_from_bytes(blocks[:, 2:4])[:, None] if self.n_heads == 2 else np.zeros_like(d)
        qs = 2 * self.n_heads + (4 if self.nmax > 15 else 0)
        codes = unpack_nibbles(blocks[:, qs : qs + 16])
        if self.nmax > 15:
            codes |= unpack_high_bits(blocks[:, qs - 4 : qs]) << 4
        return d, offset, codes

    def _join(self, blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
        qs = 2 * self.n_heads + (4 if self.nmax > 15 else 0)
        if self.nmax > 15:
            blocks[:, qs - 4 : qs] = pack_high_bits(codes)
        blocks[:, qs : qs + 16] = pack_nibbles(codes)
        return blocks

    def _quantize(self, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        rows, n = x.shape
        out = np.empty((rows, self.row_bytes(n)), dtype=np.uint8)
        step = max(1, _CHUNK * QK // n)  # whole rows per pass (sigma2 is per row), ~_CHUNK blocks
        for s in range(0, rows, step):
            xg = x[s : s + step]
            if imatrix is None:
                blocks = self._ref_blocks(_to_blocks_t(xg))
            else:
                sigma2 = seq_sum(xg * xg, axis=1) / F32(n)  # sum_x2/n_per_row, per row
                wg = imatrix_weights(xg, imatrix, sigma2)
                blocks = self._weighted_blocks(_to_blocks_t(xg), _to_blocks_t(wg))
            out[s : s + step] = blocks.reshape(xg.shape[0], -1)
        return out

    def _ref_blocks(self, xt: F32Array) -> U8Array:
        raise NotImplementedError

    def _weighted_blocks(self, xt: F32Array, wt: F32Array) -> U8Array:
        raise NotImplementedError


class _Symmetric(_Legacy):
    """Q4_0, Q5_0: ``x = d * (L - nmax)``."""

    def _ref_blocks(self, xt: F32Array) -> U8Array:
        _, mx = absmax_first(xt)  # +0 for an all-zero block: d = +0 / -nmax = -0, as ggml stores
        d = mx / F32(-self.nmax)
        idd = inv_or_zero(d)
        v = np.multiply(xt, idd)
        v += F32(self.nmax + 0.5)
        if np.isfinite(idd).all():
            # |x*id| <= nmax to a few ulps when id is finite: v lies in [0, 2*nmax + 1), where C's
            # (int8_t) is a truncation, and truncation commutes with the clamp at 2*nmax - 1
            np.minimum(v, F32(2 * self.nmax - 1), out=v)
            return self._pack_t(d, v.astype(np.uint8))
        L = np.minimum(c_int8(c_trunc_int(v)), 2 * self.nmax - 1) & 0xFF  # MIN(2nmax-1, (int8_t)v), stored u8
        return self._pack(d, L.T)

    def _weighted_blocks(self, xt: F32Array, wt: F32Array) -> U8Array:
        d, L = make_qx_quants(xt, self.nmax, wt)
        return self._pack(d, L.T)

    def _pack(self, d: F32Array, L: np.ndarray) -> U8Array:
        """d (B,), codes L (B, 32) -> bytes."""
        parts = [fp16_bytes(d)]
        if self.nmax > 8:
            parts.append(pack_high_bits(L))
        parts.append(pack_nibbles(L))
        return np.concatenate(parts, axis=1)

    def _pack_t(self, d: F32Array, Lt: U8Array) -> U8Array:
        """:meth:`_pack` of codes given as columns, ``Lt (32, B)`` uint8."""
        return _pack_blocks_t([fp16_bytes(d)], Lt, high_bits=self.nmax > 8)


class _WithMin(_Legacy):
    """Q4_1, Q5_1: ``x = d * L + m``."""

    n_heads = 2

    def _ref_blocks(self, xt: F32Array) -> U8Array:
        mn = min_first(xt)  # C: min = FLT_MAX, max = -FLT_MAX, strict comparisons: a zero keeps its sign
        mx = max_first(xt)
        d = (mx - mn) / F32(self.nmax)
        idd = inv_or_zero(d)
        v = np.subtract(xt, mn)
        v *= idd
        v += F32(0.5)
        if np.isfinite(idd).all():
            # 0 <= (x - min)*id <= nmax to a few ulps when id is finite: the codes truncate values in
            # [0, nmax + 1); Q4_1's clamp at 15 commutes with the truncation; Q5_1 has none (bit 5 of
            # a 32 is dropped by the packing, as in ggml)
            if self.nmax == 15:
                np.minimum(v, F32(15.0), out=v)
            return _pack_blocks_t([fp16_bytes(d), fp16_bytes(mn)], v.astype(np.uint8), self.nmax > 15)
        codes = c_trunc_int(v)
        # Q4_1: MIN(15, (int8_t)v); Q5_1: (uint8_t)v with no clamp (bits above 4 are dropped)
        L = np.minimum(c_int8(codes), self.nmax) & 0xFF if self.nmax == 15 else codes & 0xFF
        return self._pack(d, mn, L.T)

    def _weighted_blocks(self, xt: F32Array, wt: F32Array) -> U8Array:
        d, the_min, L = make_qkx_quants(xt, wt, self.nmax, -0.9, 0.05, 36, False, version=3)
        return self._pack(d, -the_min, L.T)

    def _pack(self, d: F32Array, m: F32Array, L: np.ndarray) -> U8Array:
        """d, m (B,), codes L (B, 32) -> bytes."""
        parts = [fp16_bytes(d), fp16_bytes(m)]
        if self.nmax > 15:
            parts.append(pack_high_bits(L))
        parts.append(pack_nibbles(L))
        return np.concatenate(parts, axis=1)


def _pack_blocks_t(head: list[U8Array], Lt: U8Array, high_bits: bool) -> U8Array:
    """Blocks ``head (B, k) ... | [qh:u32] | qs[16]`` from codes as columns, ``Lt (32, B)`` uint8: the
    nibble and bit packing run along B (vectorized), only the packed bytes are transposed."""
    B = Lt.shape[1]
    k = sum(h.shape[1] for h in head)
    out = np.empty((B, k + (4 if high_bits else 0) + 16), dtype=np.uint8)
    col = 0
    for h in head:
        out[:, col : col + h.shape[1]] = h
        col += h.shape[1]
    if high_bits:  # bit 4 of code j at bit j of a little-endian uint32
        bits = (Lt >> 4).astype(np.uint32)
        bits &= 1
        bits <<= np.arange(QK, dtype=np.uint32)[:, None]
        out[:, col : col + 4] = np.bitwise_or.reduce(bits, axis=0).astype("<u4").view(np.uint8).reshape(B, 4)
        col += 4
    lo = Lt[:16] & 0x0F
    lo |= Lt[16:] << 4
    out[:, col:] = lo.T
    return out


class Q4_0(_Symmetric):
    ggml_type = GGMLType.Q4_0
    nmax = 8
    levels = tuple(range(-8, 8))


class Q5_0(_Symmetric):
    ggml_type = GGMLType.Q5_0
    nmax = 16
    levels = tuple(range(-16, 16))


class Q4_1(_WithMin):
    ggml_type = GGMLType.Q4_1
    nmax = 15
    levels = tuple(range(16))


class Q5_1(_WithMin):
    ggml_type = GGMLType.Q5_1
    nmax = 31
    levels = tuple(range(32))


class Q8_0(_Legacy):
    """ggml's ``quantize_row_q8_0_ref``: ``d = amax/127``, codes ``roundf(x*id)``; the importance vector
    is ignored. gguf-py's quantizer gives the same bytes (the path for degenerate scales); the common
    case is computed here in fewer passes, blocks as columns."""

    ggml_type = GGMLType.Q8_0
    uses_imatrix = False
    nmax = 127
    levels = tuple(range(-128, 128))

    def _split(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = fp16_from_bytes(blocks[:, 0:2])[:, None]
        codes = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return d, np.zeros_like(d), codes

    def _join(self, blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
        blocks[:, 2:] = (codes - 128).astype(np.int8).view(np.uint8)
        return blocks

    def _ref_blocks(self, xt: F32Array) -> U8Array:
        amax = np.maximum(xt.max(axis=0), -xt.min(axis=0))  # max |x|: exact (no sums)
        amax += F32(0.0)  # fabsf's max is +0 for an all-zero block (np.maximum may keep -0)
        d = amax / F32(127.0)
        idd = inv_or_zero(d)
        if not np.isfinite(idd).all():
            out = gguf_quants.quantize(np.ascontiguousarray(xt.T), self.ggml_type)
            return np.asarray(out, dtype=np.uint8).reshape(xt.shape[1], -1)
        v = np.multiply(xt, idd)
        # roundf (half away from zero) for |v| <= 127: add the float just below 0.5 with v's sign and
        # truncate (the int8 conversion); the sum rounds to the next integer exactly when |frac| >= 0.5
        v += np.copysign(_BELOW_HALF, v)
        out = np.empty((xt.shape[1], 2 + QK), dtype=np.uint8)
        out[:, :2] = fp16_bytes(d)
        out[:, 2:] = v.astype(np.int8).T.view(np.uint8)
        return out

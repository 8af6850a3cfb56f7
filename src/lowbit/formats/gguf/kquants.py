"""ggml's k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (super-blocks of 256), bit-exact with ggml.

``ggml_quantize_chunk`` takes two different paths per type, and both are reproduced:

* no importance vector: ``quantize_row_q*_K_ref`` (the reference path; searches without weights
  or with ``|x|``-based weights, super-block scales from the largest sub-block scale);
* with one: ``quantize_row_q*_K_impl`` (weights ``imatrix[j] * sqrt(sigma2 + x[j]^2)``, more
  candidate scales, super-block scales fitted by ``make_qp_quants`` / ``make_qx_quants``).

Each super-block is independent of the others (``sigma2`` is per super-block), so all super-blocks
of the tensor are processed together, in chunks (see :mod:`search` for the float32 rules).

Byte layouts (one super-block of 256, little-endian; ``L`` = code, ``e`` = element index):

    Q2_K  scales[16] | qs[64] | d:f16 | dmin:f16                                  84 B
          scales[s] = sc | m << 4 for sub-block s = e // 16;  x = d*sc*L - dmin*m
          qs[32*(e//128) + e%32] bits 2*((e%128)//32) .. +1 = L (2 bits)
    Q3_K  hmask[32] | qs[64] | scales[12] | d:f16                                 110 B
          hmask[e%32] bit e//32 = bit 2 of L; qs as Q2_K (low 2 bits);  x = d*(sc-32)*(L-4)
          6-bit sc: scales[s%8] nibble s//8 = low 4 bits, scales[8 + s%4] bits 2*(s//4) = high 2
    Q4_K  d:f16 | dmin:f16 | scales[12] | qs[128]                                 144 B
          8 sub-blocks of 32, 6-bit (sc, m) packed as in get_scale_min_k4;  x = d*sc*L - dmin*m
          qs[32*(e//64) + e%32] nibble (e%64)//32 = L (4 bits)
    Q5_K  d:f16 | dmin:f16 | scales[12] | qh[32] | qs[128]                        176 B
          as Q4_K, plus qh[e%32] bit e//32 = bit 4 of L
    Q6_K  ql[128] | qh[64] | scales:i8[16] | d:f16                                210 B
          x = d*sc*(L-32);  g = (e%128)//32:  ql[64*(e//128) + 32*(g%2) + e%32] nibble g//2 = low 4
          bits, qh[32*(e//128) + e%32] bits 2g..2g+1 = high 2 bits
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np

from lowbit.formats.gguf.block import (
    F32,
    GROUP_MAX_EPS,
    F32Array,
    GGMLBlockCodec,
    I32Array,
    U8Array,
    absmax_first,
    c_int8,
    fp16_bytes,
    fp16_from_bytes,
    fp16_round,
    nearest_int,
    pack_nibbles,
    seq_sum,
)
from lowbit.formats.gguf.search import (
    imatrix_weights,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    to_f32,
)
from lowbit.formats.gguf.types import GGMLType

QK_K = 256
# Super-blocks per numpy pass: the (32, 8*chunk) float32 temporaries stay in cache (fastest on a
# 4096x4096 tensor among 128..2048).
_CHUNK = 512


def _sub_t(a: np.ndarray, n: int) -> np.ndarray:
    """``(B, 256)`` -> ``(n, B*256/n)``: one column per sub-block of ``n``, element index first."""
    return np.ascontiguousarray(a.reshape(-1, n).T)


def _from_sub_t(a: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_sub_t`: ``(n, B*256/n)`` -> ``(B, 256)``."""
    return np.ascontiguousarray(a.T).reshape(-1, QK_K)


def _block_sigma2(xb: F32Array, factor: int) -> F32Array:
    """``factor*sum_x2/QK_K`` per super-block (``sum_x2`` accumulated in order), ``(B,)``."""
    xt = _sub_t(xb, QK_K)
    sum_x2 = seq_sum(xt * xt)
    return F32(factor) * sum_x2 / F32(QK_K)


def max_from_zero(a: F32Array, axis: int) -> F32Array:
    """ggml's ``float m = 0; for (...) if (a[i] > m) m = a[i];`` (NaNs are skipped, the result is >= +0)."""
    m = np.fmax.reduce(a, axis=axis)
    return np.where(m > 0, m, F32(0.0))


def _requantize(xb: F32Array, L: I32Array, d: F32Array, dm: F32Array | None, lo: int, hi: int) -> I32Array:
    """ggml's final pass: ``l = clamp(nearest_int((x + dm)/d))`` per sub-block; sub-blocks whose
    ``d == 0`` keep the codes of the search. ``xb, L (B, 256)``; ``d, dm (B, nsub)``.

    Returns codes offset by ``-lo`` (so in ``[0, hi - lo]``).
    """
    B, nsub = d.shape
    xs = xb.reshape(B, nsub, -1)
    num = xs if dm is None else xs + dm[:, :, None]
    new = np.clip(nearest_int(num / d[:, :, None]), lo, hi) - lo
    keep = (d == 0)[:, :, None]
    return np.where(keep, L.reshape(B, nsub, -1), new).reshape(B, QK_K)


def _pack_2bit(L: I32Array) -> U8Array:
    """``(B, 256)`` codes in 0..3 -> ``(B, 64)``: ``qs[32h + l] = L[128h+l] | L[128h+l+32] << 2 | ...``."""
    q = (L & 3).reshape(-1, 2, 4, 32)
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return packed.reshape(-1, 64).astype(np.uint8)


def _unpack_2bit(qs: U8Array) -> I32Array:
    """Inverse of :func:`_pack_2bit`: ``(B, 64)`` -> ``(B, 256)``."""
    q = qs.astype(np.int32).reshape(-1, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.int32).reshape(1, 1, 4, 1)
    return ((q >> shifts) & 3).reshape(-1, QK_K)


def _pack_4bit(L: I32Array) -> U8Array:
    """``(B, 256)`` codes -> ``(B, 128)``: ``q[32c + l] = L[64c+l] & 15 | (L[64c+l+32] & 15) << 4``."""
    return pack_nibbles(L.reshape(-1, 4, 64)).reshape(-1, 128)


def _unpack_4bit(qs: U8Array) -> I32Array:
    q = qs.astype(np.int32).reshape(-1, 4, 1, 32)
    shifts = np.array([0, 4], dtype=np.int32).reshape(1, 1, 2, 1)
    return ((q >> shifts) & 15).reshape(-1, QK_K)


def _pack_bit_planes(bits: I32Array) -> U8Array:
    """``(B, 256)`` bits -> ``(B, 32)``: byte ``e % 32`` bit ``e // 32`` (Q3_K hmask, Q5_K qh)."""
    b = (bits & 1).reshape(-1, 8, 32)
    shifts = np.arange(8, dtype=np.int32).reshape(1, 8, 1)
    return np.bitwise_or.reduce(b << shifts, axis=1).astype(np.uint8)


def _unpack_bit_planes(q: U8Array) -> I32Array:
    shifts = np.arange(8, dtype=np.int32).reshape(1, 8, 1)
    return ((q.astype(np.int32)[:, None, :] >> shifts) & 1).reshape(-1, QK_K)


def _pack_q3_scales(ls: I32Array) -> U8Array:
    """``(B, 16)`` 6-bit values -> ``(B, 12)`` (ggml's Q3_K scale packing, with its truncations)."""
    out = np.zeros((ls.shape[0], 12), dtype=np.int32)
    out[:, 0:8] = (ls[:, 0:8] & 0xF) | ((ls[:, 8:16] & 0xF) << 4)
    hi = ls >> 4  # (B, 16); sub-block s goes to byte 8 + s%4 at bit 2*(s//4)
    for s in range(16):
        out[:, 8 + s % 4] |= hi[:, s] << (2 * (s // 4))
    return (out & 0xFF).astype(np.uint8)


def _unpack_q3_scales(q: U8Array) -> I32Array:
    """``(B, 12)`` -> ``(B, 16)`` signed scales ``-32..31``."""
    q = q.astype(np.int32)
    low = np.concatenate([q[:, 0:8] & 0xF, q[:, 0:8] >> 4], axis=1)
    s = np.arange(16)
    high = (q[:, 8 + s % 4] >> (2 * (s // 4))) & 3
    return (low | (high << 4)) - 32


def pack_scale_min_k4(ls: I32Array, lm: I32Array) -> U8Array:
    """``ls, lm (B, 8)`` uint8 values (normally 0..63) -> ``(B, 12)`` bytes, with ggml's truncations.

    Bytes 0-3: low 6 bits of scales 0-3, top 2 bits = bits 4-5 of scales 4-7; bytes 4-7: the same for
    the mins; bytes 8-11: low nibble = scale 4-7 bits 0-3, high nibble = min 4-7 bits 0-3.
    """
    ls = ls & 0xFF
    lm = lm & 0xFF
    out = np.zeros((ls.shape[0], 12), dtype=np.int32)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return (out & 0xFF).astype(np.uint8)


def unpack_scale_min_k4(q: U8Array) -> tuple[I32Array, I32Array]:
    """``(B, 12)`` bytes -> ``(sc, m)`` each ``(B, 8)`` int32 in 0..63 (ggml ``get_scale_min_k4``)."""
    q = q.astype(np.int32)
    sc = np.empty((q.shape[0], 8), dtype=np.int32)
    m = np.empty((q.shape[0], 8), dtype=np.int32)
    sc[:, 0:4] = q[:, 0:4] & 63
    m[:, 0:4] = q[:, 4:8] & 63
    sc[:, 4:8] = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    m[:, 4:8] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc, m


def _fit_scales_and_mins(
    xb: F32Array, qw: F32Array, sub: int, sigma_factor: int, nmax: int, scale_max: int
) -> tuple[I32Array, I32Array, I32Array, F32Array, F32Array]:
    """The imatrix path of Q2_K and Q4_K/Q5_K: weights ``qw*sqrt(sigma2 + x^2)``, ``make_qkx3_quants``
    per sub-block of ``sub``, then ``make_qp_quants`` of the sub-block scales and of the mins, each
    weighted by the sub-block's sum of weights.

    ``xb, qw (B, 256)``. Returns codes ``L (B, 256)``, scale and min codes ``ls, lm (B, 256/sub)``, and
    the super-block ``d, dmin (B,)`` (before fp16).
    """
    B, nsub = xb.shape[0], QK_K // sub
    w = imatrix_weights(xb, qw, _block_sigma2(xb, sigma_factor))
    X = _sub_t(xb, sub)
    W = _sub_t(w, sub)
    sw = seq_sum(W).reshape(B, nsub).T  # (nsub, B): sum of weights per sub-block
    scales, mins, Lt = make_qkx_quants(X, W, nmax, -0.9, 0.05, 36, False, version=3)
    d, ls = make_qp_quants(scales.reshape(B, nsub).T, scale_max, sw)
    dmin, lm = make_qp_quants(mins.reshape(B, nsub).T, scale_max, sw)
    return _from_sub_t(Lt), ls.T, lm.T, d, dmin


class _KQuant(GGMLBlockCodec):
    """Rows are cut into super-blocks of 256; the imatrix repeats along the rows."""

    def _quantize(self, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        rows, n = x.shape
        xb = x.reshape(-1, QK_K)
        qwb = None if imatrix is None else imatrix.reshape(-1, QK_K)
        per_row = n // QK_K
        nb = xb.shape[0]
        out = np.empty((nb, self.type_size), dtype=np.uint8)
        for s in range(0, nb, _CHUNK):
            e = min(s + _CHUNK, nb)
            if qwb is None:
                out[s:e] = self._quantize_ref(xb[s:e])
            else:
                # block b of the flattened rows is block b % per_row of its row
                out[s:e] = self._quantize_impl(xb[s:e], qwb[np.arange(s, e) % per_row])
        return out.reshape(rows, self.row_bytes(n))

    def _dequantize(self, data: np.ndarray, n_per_row: int) -> np.ndarray:
        blocks = data.reshape(-1, self.type_size)
        with np.errstate(over="ignore", invalid="ignore"):
            y = self._dequantize_blocks(blocks)
        return y.reshape(data.shape[0], n_per_row)

    @abstractmethod
    def _quantize_ref(self, xb: F32Array) -> U8Array:
        """``quantize_row_*_ref``: ``xb (B, 256)`` float32 -> ``(B, type_size)`` bytes."""

    @abstractmethod
    def _quantize_impl(self, xb: F32Array, qw: F32Array) -> U8Array:
        """``quantize_row_*_impl`` with quant_weights ``qw (B, 256)``."""

    @abstractmethod
    def _dequantize_blocks(self, blocks: U8Array) -> F32Array:
        """``dequantize_row_*``: ``(B, type_size)`` -> ``(B, 256)`` float32, in ggml's float order."""


# ===================================================================================================
# Q2_K: 16 sub-blocks of 16, 2-bit codes, 4-bit (scale, min) per sub-block
# ===================================================================================================
class Q2_K(_KQuant):
    ggml_type: ClassVar[GGMLType] = GGMLType.Q2_K
    sub_size = 16
    levels = (0, 1, 2, 3)

    def _split(self, blocks: U8Array) -> tuple[F32Array, F32Array, U8Array]:
        sc = blocks[:, 0:16].astype(np.int32)
        d = fp16_from_bytes(blocks[:, 80:82])
        dmin = fp16_from_bytes(blocks[:, 82:84])
        scale = d[:, None] * to_f32(sc & 0xF)
        offset = dmin[:, None] * to_f32(sc >> 4)
        return scale, offset, _unpack_2bit(blocks[:, 16:80]).astype(np.uint8)

    def _join(self, blocks: U8Array, codes: I32Array) -> U8Array:
        blocks[:, 16:80] = _pack_2bit(codes)
        return blocks

    def _quantize_ref(self, xb: F32Array) -> U8Array:
        B = xb.shape[0]
        X = _sub_t(xb, 16)
        scales, mins, Lt = make_qkx_quants(X, np.abs(X), 3, -0.5, 0.1, 15, True, version=2)
        scales = scales.reshape(B, 16)
        mins = mins.reshape(B, 16)
        L = _from_sub_t(Lt)
        max_scale = max_from_zero(scales, axis=1)
        max_min = max_from_zero(mins, axis=1)
        has_s = max_scale > 0
        has_m = max_min > 0
        ls = np.where(has_s[:, None], nearest_int((F32(15.0) / max_scale)[:, None] * scales), 0)
        lm = np.where(has_m[:, None], nearest_int((F32(15.0) / max_min)[:, None] * mins), 0)
        sc = (ls | (lm << 4)) & 0xFF
        d = np.where(has_s, max_scale / F32(15.0), F32(0.0))
        dmin = np.where(has_m, max_min / F32(15.0), F32(0.0))
        return self._finish(xb, L, sc, d, dmin)

    def _quantize_impl(self, xb: F32Array, qw: F32Array) -> U8Array:
        L, ls, lm, d, dmin = _fit_scales_and_mins(xb, qw, sub=16, sigma_factor=1, nmax=3, scale_max=15)
        return self._finish(xb, L, (ls | (lm << 4)) & 0xFF, d, dmin)

    @staticmethod
    def _finish(xb: F32Array, L: I32Array, sc: I32Array, d: F32Array, dmin: F32Array) -> U8Array:
        """Store ``d, dmin (B,)`` as fp16 and requantize with the stored values."""
        dl = fp16_round(d)[:, None] * to_f32(sc & 0xF)
        ml = fp16_round(dmin)[:, None] * to_f32(sc >> 4)
        L = _requantize(xb, L, dl, ml, 0, 3)
        return np.concatenate([sc.astype(np.uint8), _pack_2bit(L), fp16_bytes(d), fp16_bytes(dmin)], axis=1)

    def _dequantize_blocks(self, blocks: U8Array) -> F32Array:
        sc = blocks[:, 0:16].astype(np.int32)
        q = to_f32(_unpack_2bit(blocks[:, 16:80])).reshape(-1, 16, 16)
        d = fp16_from_bytes(blocks[:, 80:82])
        dmin = fp16_from_bytes(blocks[:, 82:84])
        dl = (d[:, None] * to_f32(sc & 0xF))[:, :, None]
        ml = (dmin[:, None] * to_f32(sc >> 4))[:, :, None]
        return (dl * q - ml).reshape(-1, QK_K)


# ===================================================================================================
# Q3_K: 16 sub-blocks of 16, 3-bit symmetric codes, 6-bit signed scales
# ===================================================================================================
class Q3_K(_KQuant):
    ggml_type: ClassVar[GGMLType] = GGMLType.Q3_K
    sub_size = 16
    levels = tuple(range(-4, 4))  # code L = low 2 bits + 4 * hmask bit, value L - 4

    def _split(self, blocks: U8Array) -> tuple[F32Array, F32Array, U8Array]:
        L = _unpack_2bit(blocks[:, 32:96]) | (_unpack_bit_planes(blocks[:, 0:32]) << 2)
        d = fp16_from_bytes(blocks[:, 108:110])
        scale = d[:, None] * to_f32(_unpack_q3_scales(blocks[:, 96:108]))
        return scale, np.zeros_like(scale), L.astype(np.uint8)

    def _join(self, blocks: U8Array, codes: I32Array) -> U8Array:
        blocks[:, 0:32] = _pack_bit_planes(codes >> 2)
        blocks[:, 32:96] = _pack_2bit(codes & 3)
        return blocks

    def _quantize_ref(self, xb: F32Array) -> U8Array:
        B = xb.shape[0]
        scales, Lt = make_q3_quants(_sub_t(xb, 16), 4)
        scales = scales.reshape(B, 16)
        _, max_scale = absmax_first(scales.T)
        nz = max_scale != 0
        iscale = F32(-32.0) / max_scale
        ls = np.clip(c_int8(nearest_int(iscale[:, None] * scales)), -32, 31) + 32
        ls = np.where(nz[:, None], ls, 0)
        d = np.where(nz, F32(1.0) / iscale, F32(0.0))
        return self._finish(xb, _from_sub_t(Lt), ls, d)

    def _quantize_impl(self, xb: F32Array, qw: F32Array) -> U8Array:
        B = xb.shape[0]
        w = imatrix_weights(xb, qw, _block_sigma2(xb, 2))
        W = _sub_t(w, 16)
        sw = seq_sum(W).reshape(B, 16)
        scales, Lt = make_qx_quants(_sub_t(xb, 16), 4, W)
        d_block, Ls = make_qx_quants(scales.reshape(B, 16).T, 32, sw.T)
        return self._finish(xb, _from_sub_t(Lt), Ls.T, d_block)

    @staticmethod
    def _finish(xb: F32Array, L: I32Array, ls: I32Array, d: F32Array) -> U8Array:
        packed = _pack_q3_scales(ls)
        dl = fp16_round(d)[:, None] * to_f32(_unpack_q3_scales(packed))
        L = _requantize(xb, L, dl, None, -4, 3)
        hmask = _pack_bit_planes(L >> 2)
        return np.concatenate([hmask, _pack_2bit(L & 3), packed, fp16_bytes(d)], axis=1)

    def _dequantize_blocks(self, blocks: U8Array) -> F32Array:
        hm = _unpack_bit_planes(blocks[:, 0:32])
        q = _unpack_2bit(blocks[:, 32:96])
        sc = _unpack_q3_scales(blocks[:, 96:108])
        d = fp16_from_bytes(blocks[:, 108:110])
        dl = (d[:, None] * to_f32(sc))[:, :, None]
        codes = to_f32(q - np.where(hm != 0, 0, 4)).reshape(-1, 16, 16)
        return (dl * codes).reshape(-1, QK_K)


# ===================================================================================================
# Q4_K / Q5_K: 8 sub-blocks of 32, asymmetric codes, 6-bit (scale, min) per sub-block
# ===================================================================================================
class _Q45K(_KQuant):
    nmax: ClassVar[int]
    ref_search: ClassVar[tuple[float, float, int]]  # (rmin, rdelta, nstep) of make_qkx2_quants
    clamp_impl_scales: ClassVar[bool]  # the impl path applies MIN(63, .) to the qp codes (Q5_K only)
    sub_size = 32

    def _split(self, blocks: U8Array) -> tuple[F32Array, F32Array, U8Array]:
        d = fp16_from_bytes(blocks[:, 0:2])
        dmin = fp16_from_bytes(blocks[:, 2:4])
        sc, m = unpack_scale_min_k4(blocks[:, 4:16])
        if self.nmax > 15:
            q = _unpack_4bit(blocks[:, 48:176]) + (_unpack_bit_planes(blocks[:, 16:48]) << 4)
        else:
            q = _unpack_4bit(blocks[:, 16:144])
        return d[:, None] * to_f32(sc), dmin[:, None] * to_f32(m), q.astype(np.uint8)

    def _join(self, blocks: U8Array, codes: I32Array) -> U8Array:
        if self.nmax > 15:
            blocks[:, 16:48] = _pack_bit_planes(codes >> 4)
            blocks[:, 48:176] = _pack_4bit(codes & 15)
        else:
            blocks[:, 16:144] = _pack_4bit(codes)
        return blocks

    def _quantize_ref(self, xb: F32Array) -> U8Array:
        B = xb.shape[0]
        X = _sub_t(xb, 32)
        av_x = np.sqrt(seq_sum(X * X) / F32(32.0))
        W = av_x + np.abs(X)
        rmin, rdelta, nstep = self.ref_search
        scales, mins, Lt = make_qkx_quants(X, W, self.nmax, rmin, rdelta, nstep, False, version=2)
        scales = scales.reshape(B, 8)
        mins = mins.reshape(B, 8)
        max_scale = max_from_zero(scales, axis=1)
        max_min = max_from_zero(mins, axis=1)
        inv_scale = np.where(max_scale > 0, F32(63.0) / max_scale, F32(0.0))
        inv_min = np.where(max_min > 0, F32(63.0) / max_min, F32(0.0))
        ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
        lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
        return self._finish(xb, _from_sub_t(Lt), ls, lm, max_scale / F32(63.0), max_min / F32(63.0))

    def _quantize_impl(self, xb: F32Array, qw: F32Array) -> U8Array:
        L, ls, lm, d, dmin = _fit_scales_and_mins(
            xb, qw, sub=32, sigma_factor=2, nmax=self.nmax, scale_max=63
        )
        if self.clamp_impl_scales:
            ls = np.minimum(ls, 63)
            lm = np.minimum(lm, 63)
        return self._finish(xb, L, ls, lm, d, dmin)

    def _finish(
        self,
        xb: F32Array,
        L: I32Array,
        ls: I32Array,
        lm: I32Array,
        d: F32Array,
        dmin: F32Array,
    ) -> U8Array:
        packed = pack_scale_min_k4(ls, lm)
        sc, m = unpack_scale_min_k4(packed)
        dl = fp16_round(d)[:, None] * to_f32(sc)
        ml = fp16_round(dmin)[:, None] * to_f32(m)
        L = _requantize(xb, L, dl, ml, 0, self.nmax)
        parts = [fp16_bytes(d), fp16_bytes(dmin), packed]
        if self.nmax > 15:
            parts.append(_pack_bit_planes(L >> 4))
        parts.append(_pack_4bit(L))
        return np.concatenate(parts, axis=1)

    def _dequantize_blocks(self, blocks: U8Array) -> F32Array:
        d = fp16_from_bytes(blocks[:, 0:2])
        dmin = fp16_from_bytes(blocks[:, 2:4])
        sc, m = unpack_scale_min_k4(blocks[:, 4:16])
        if self.nmax > 15:
            q = _unpack_4bit(blocks[:, 48:176]) + (_unpack_bit_planes(blocks[:, 16:48]) << 4)
        else:
            q = _unpack_4bit(blocks[:, 16:144])
        dl = (d[:, None] * to_f32(sc))[:, :, None]
        ml = (dmin[:, None] * to_f32(m))[:, :, None]
        return (dl * to_f32(q).reshape(-1, 8, 32) - ml).reshape(-1, QK_K)


class Q4_K(_Q45K):
    ggml_type: ClassVar[GGMLType] = GGMLType.Q4_K
    nmax = 15
    levels = tuple(range(16))
    ref_search = (-1.0, 0.1, 20)
    clamp_impl_scales = False


class Q5_K(_Q45K):
    ggml_type: ClassVar[GGMLType] = GGMLType.Q5_K
    nmax = 31
    levels = tuple(range(32))
    ref_search = (-0.5, 0.1, 15)
    clamp_impl_scales = True


# ===================================================================================================
# Q6_K: 16 sub-blocks of 16, 6-bit symmetric codes, int8 scales
# ===================================================================================================
class Q6_K(_KQuant):
    ggml_type: ClassVar[GGMLType] = GGMLType.Q6_K
    sub_size = 16
    levels = tuple(range(-32, 32))

    def _quantize_ref(self, xb: F32Array) -> U8Array:
        return self._quantize_with(xb, None)

    def _quantize_impl(self, xb: F32Array, qw: F32Array) -> U8Array:
        # ggml's impl path passes the importance vector as the weights, unscaled.
        return self._quantize_with(xb, qw)

    def _quantize_with(self, xb: F32Array, qw: F32Array | None) -> U8Array:
        B = xb.shape[0]
        scales, Lt = make_qx_quants(_sub_t(xb, 16), 32, None if qw is None else _sub_t(qw, 16))
        scales = scales.reshape(B, 16)
        max_abs, max_scale = absmax_first(scales.T)
        zero = max_abs < GROUP_MAX_EPS
        iscale = F32(-128.0) / max_scale
        d_block = F32(1.0) / iscale
        d = fp16_round(d_block)
        sc = c_int8(np.minimum(nearest_int(iscale[:, None] * scales), 127))
        dl = d[:, None] * to_f32(sc)
        L = _requantize(xb, _from_sub_t(Lt), dl, None, -32, 31)
        ql, qh = _pack_q6(L)
        out = np.concatenate([ql, qh, (sc & 0xFF).astype(np.uint8), fp16_bytes(d_block)], axis=1)
        out[zero] = 0
        return out

    def _split(self, blocks: U8Array) -> tuple[F32Array, F32Array, U8Array]:
        d = fp16_from_bytes(blocks[:, 208:210])
        scale = d[:, None] * to_f32(blocks[:, 192:208].view(np.int8).astype(np.int32))
        return scale, np.zeros_like(scale), _unpack_q6(blocks[:, 0:128], blocks[:, 128:192]).astype(np.uint8)

    def _join(self, blocks: U8Array, codes: I32Array) -> U8Array:
        blocks[:, 0:128], blocks[:, 128:192] = _pack_q6(codes)
        return blocks

    def _dequantize_blocks(self, blocks: U8Array) -> F32Array:
        B = blocks.shape[0]
        sc = blocks[:, 192:208].view(np.int8).astype(np.int32)
        d = fp16_from_bytes(blocks[:, 208:210])
        q = _unpack_q6(blocks[:, 0:128], blocks[:, 128:192]) - 32
        dl = (d[:, None] * to_f32(sc))[:, :, None]
        return (dl * to_f32(q).reshape(B, 16, 16)).reshape(B, QK_K)


def _pack_q6(L: I32Array) -> tuple[U8Array, U8Array]:
    """Q6_K codes ``(B, 256)`` in 0..63 -> ``ql (B, 128)``, ``qh (B, 64)`` (layout in the module docstring)."""
    B = L.shape[0]
    Lq = L.reshape(B, 2, 4, 32)  # (block, half, group g, l)
    ql = (Lq[:, :, 0:2] & 0xF) | ((Lq[:, :, 2:4] & 0xF) << 4)  # (B, 2, 2, 32)
    qh = (
        (Lq[:, :, 0] >> 4) | ((Lq[:, :, 1] >> 4) << 2) | ((Lq[:, :, 2] >> 4) << 4) | ((Lq[:, :, 3] >> 4) << 6)
    )
    return ql.reshape(B, 128).astype(np.uint8), qh.reshape(B, 64).astype(np.uint8)


def _unpack_q6(ql_bytes: U8Array, qh_bytes: U8Array) -> I32Array:
    """Inverse of :func:`_pack_q6`: codes ``(B, 256)`` in 0..63."""
    B = ql_bytes.shape[0]
    ql = ql_bytes.astype(np.int32).reshape(B, 2, 1, 2, 32)  # (block, half, ., g%2, l)
    qh = qh_bytes.astype(np.int32).reshape(B, 2, 1, 32)
    low = (ql >> np.array([0, 4]).reshape(1, 1, 2, 1, 1)) & 0xF  # (B, 2, g//2, g%2, 32)
    high = (qh >> np.array([0, 2, 4, 6]).reshape(1, 1, 4, 1)) & 3  # (B, 2, g, 32)
    return (low.reshape(B, 2, 4, 32) | (high << 4)).reshape(B, QK_K)

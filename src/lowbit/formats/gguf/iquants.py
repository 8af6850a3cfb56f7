"""ggml's 4-bit non-linear types IQ4_NL and IQ4_XS (and MXFP4), bit-exact with ggml.

IQ4_NL and IQ4_XS store, per block of 32, indices into the 16-entry non-uniform codebook
``kvalues_iq4nl`` (denser near zero, asymmetric). Both come from ggml's ``quantize_row_iq4_nl_impl``
(with ``ntry = 7``, the path ``ggml_quantize_chunk`` takes with and without an importance vector):

1. weights per element: ``imatrix[j] * sqrt(sigma2 + x[j]^2)`` with ``sigma2 = 2 * mean(x^2)`` over the
   super-block (32 values for IQ4_NL, 256 for IQ4_XS), or ``x[j]^2`` without an imatrix;
2. per block of 32, a weighted least-squares scale: start from ``max / 127`` (``max`` = the element
   of largest magnitude, signed), then try the 15 inverse scales ``(itry - 127) / max``,
   ``itry = -7..7``, each time snapping ``x / d`` to the nearest codebook entry and keeping the
   scale with the best ``sumqx^2 / sumq2``;
3. IQ4_NL stores that scale as fp16 and re-snaps every value with it. IQ4_XS stores one fp16 ``d =
   -max_scale / 32`` per super-block of 256 and a 6-bit signed multiplier ``l`` per block of 32
   (``scale = d * l``), then re-snaps with ``d * l`` (the float32 value, not the fp16 one).

Everything runs in float32 in ggml's order of operations, vectorized across blocks.

Byte layouts (little-endian):

    IQ4_NL (32 values, 18 bytes)   d:f16 | qs[16]                      qs[j] = L[j] | L[j+16] << 4
    IQ4_XS (256 values, 136 bytes) d:f16 | scales_h:u16 | scales_l[4] | qs[128]
        block ib (of 32): ls = (scales_l[ib/2] >> 4*(ib%2)) & 15 | ((scales_h >> 2*ib) & 3) << 4;
        x = d * (ls - 32) * kvalues_iq4nl[L]; qs as IQ4_NL, 16 bytes per block of 32.
    MXFP4 (32 values, 17 bytes)    e:u8 (E8M0) | qs[16]  — the importance vector is ignored.
"""

from __future__ import annotations

import numpy as np

from lowbit.formats.gguf.block import (
    F32,
    GROUP_MAX_EPS,
    GGMLBlockCodec,
    GGUFPyCodec,
    absmax_first,
    fp16_bytes,
    fp16_from_bytes,
    inv_or_zero,
    nearest_int,
    pack_nibbles,
    seq_sum,
    unpack_nibbles,
)
from lowbit.formats.gguf.search import imatrix_weights
from lowbit.formats.gguf.types import GGMLType

KVALUES_IQ4NL: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
"""ggml's ``kvalues_iq4nl`` (ggml-common.h); gguf-py's ``IQ4_NL.kvalues`` is the same table."""

NTRY = 7
QK = 32
_CHUNK = 2048  # blocks of 32 per numpy pass: keeps the (32, chunk) float32 temporaries in L2


class _Codebook:
    """ggml's ``best_index_int8`` for a sorted int8 codebook, as a table lookup.

    ggml's binary search picks level ``i`` once ``x - val[i-1] >= val[i] - x``, i.e. ``2x >= val[i-1] +
    val[i]`` (exact in float32 near the midpoints; ties go up). The midpoint sums are integers, so the
    decision only needs ``floor(2x)``: a table indexed by it gives the level (and a second one the
    level's value). NaN fails every comparison of the search and ends on the last level, as in ggml
    (IQ4_NL blocks whose scale overflowed to NaN store all 15s).
    """

    def __init__(self, values: tuple[int, ...]) -> None:
        v = np.asarray(values, dtype=np.int32)
        assert np.all(np.diff(v) > 0)
        mids = v[:-1] + v[1:]  # (n-1,) integer thresholds on 2x
        lo = int(mids[0]) - 1
        hi = int(mids[-1])
        ks = np.arange(lo, hi + 1)
        self.level_table = np.searchsorted(mids, ks, side="right").astype(np.uint8)  # levels with mid <= k
        self.value_table = v[self.level_table].astype(np.float32)
        self.values = v.astype(np.float32)
        self.f_lo = F32(lo)
        self.f_hi = F32(hi)

    def _slots(self, two_x: np.ndarray, tmp: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """floor(clip(2x)) - lo as intp, in ``idx`` (tmp, idx: buffers shaped like two_x)."""
        np.fmin(two_x, self.f_hi, out=tmp)  # fmin/fmax: NaN -> f_hi, the last level
        np.fmax(tmp, self.f_lo, out=tmp)
        np.floor(tmp, out=tmp)
        tmp -= self.f_lo  # exact: small integers
        np.copyto(idx, tmp, casting="unsafe")
        return idx

    def values_of(self, two_x: np.ndarray, out: np.ndarray, tmp: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """The codebook value (float32) nearest to each x, given 2x; written to ``out``."""
        return np.take(self.value_table, self._slots(two_x, tmp, idx), mode="clip", out=out)

    def levels_of(self, two_x: np.ndarray) -> np.ndarray:
        """The codebook level (uint8) nearest to each x, given 2x."""
        tmp = np.empty(two_x.shape, dtype=np.float32)
        idx = np.empty(two_x.shape, dtype=np.intp)
        return np.take(self.level_table, self._slots(two_x, tmp, idx), mode="clip")


_IQ4NL = _Codebook(KVALUES_IQ4NL)


def _block_scales(xt: np.ndarray, wt: np.ndarray, cb: _Codebook, ntry: int = NTRY) -> np.ndarray:
    """Step 2 of the module docstring for blocks xt, wt float32 (32, B) -> scale float32 (B,)."""
    B = xt.shape[1]
    amax, mx = absmax_first(xt)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    v0 = cb.values[0]
    v = np.empty_like(xt)
    q = np.empty_like(xt)
    t = np.empty_like(xt)
    idx = np.empty(xt.shape, dtype=np.intp)
    sumqx = np.empty(B, dtype=np.float32)
    sumq2 = np.empty(B, dtype=np.float32)

    def trial(iscale: np.ndarray) -> None:
        # C: al = id*x; l = best_index_int8(al) (which compares al+al); 2*(id*x) == (2*id)*x exactly
        np.multiply(xt, iscale + iscale, out=v)
        cb.values_of(v, q, t, idx)
        # the C's association: sumqx += (w*q)*x, sumq2 += (w*q)*q
        np.multiply(wt, q, out=t)
        np.multiply(t, xt, out=v)
        seq_sum(v, axis=0, out=sumqx)
        np.multiply(t, q, out=v)
        seq_sum(v, axis=0, out=sumq2)

    d = (-mx) / v0 if ntry > 0 else mx / v0
    trial(F32(1) / d)
    d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        trial(F32(itry + int(v0)) / mx)
        upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        if upd.any():
            d = np.where(upd, sumqx / sumq2, d)
            best = np.where(upd, d * sumqx, best)
    return np.where(zero, F32(0), d).astype(np.float32)


def _weights(xs: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """Step 1: xs float32 (S, sbs) super-blocks, imatrix (sbs,) tiled per super-block or None -> (S, sbs)."""
    if imatrix is None:
        return xs * xs
    sbs = xs.shape[1]
    sigma2 = seq_sum(xs * xs, axis=1) * F32(2.0 / sbs)  # sigma2 *= 2.f/super_block_size
    return imatrix_weights(xs, imatrix, sigma2)


class _IQ4(GGMLBlockCodec):
    super_block: int = QK
    sub_size = QK
    levels = KVALUES_IQ4NL
    qs_start: int  # byte where the 4-bit indices start (16 bytes per block of 32)

    def _codes(self, blocks: np.ndarray) -> np.ndarray:
        n = self.super_block // QK
        qs = blocks[:, self.qs_start :].reshape(-1, n, QK // 2)
        return unpack_nibbles(qs).reshape(blocks.shape[0], self.super_block)

    def _join(self, blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
        n = self.super_block // QK
        packed = pack_nibbles(codes.reshape(-1, n, QK))
        blocks[:, self.qs_start :] = packed.reshape(blocks.shape[0], -1)
        return blocks

    def _quantize(self, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        rows, n = x.shape
        sbs = self.super_block
        xs = x.reshape(-1, sbs)  # (S, sbs), super-blocks in row order
        qw_sb = None if imatrix is None else imatrix.reshape(-1, sbs)  # (n/sbs, sbs)
        n_super = xs.shape[0]
        step = max(1, _CHUNK * QK // sbs)
        out = np.empty((n_super, self.type_size), dtype=np.uint8)
        for s in range(0, n_super, step):
            e = min(s + step, n_super)
            xc = xs[s:e]
            qc = None if qw_sb is None else qw_sb[np.arange(s, e) % qw_sb.shape[0]]
            out[s:e] = self._super_blocks(xc, _weights(xc, qc))
        return out.reshape(rows, self.row_bytes(n))

    def _super_blocks(self, xs: np.ndarray, ws: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class IQ4_NL(_IQ4):
    ggml_type = GGMLType.IQ4_NL
    super_block = QK
    qs_start = 2

    def _split(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = fp16_from_bytes(blocks[:, 0:2])[:, None]
        return d, np.zeros_like(d), self._codes(blocks)

    def _super_blocks(self, xs: np.ndarray, ws: np.ndarray) -> np.ndarray:
        xt = np.ascontiguousarray(xs.T)  # (32, B)
        d = _block_scales(xt, np.ascontiguousarray(ws.T), _IQ4NL)
        idd = inv_or_zero(d)
        L = _IQ4NL.levels_of((idd + idd)[:, None] * xs)  # (B, 32)
        return np.concatenate([fp16_bytes(d), pack_nibbles(L)], axis=1)


class IQ4_XS(_IQ4):
    ggml_type = GGMLType.IQ4_XS
    super_block = 256
    qs_start = 8

    def _split(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = fp16_from_bytes(blocks[:, 0:2])
        sh = blocks[:, 2:4].copy().view("<u2").astype(np.int32)  # (B, 1)
        sl = blocks[:, 4:8].astype(np.int32)
        ib = np.arange(8)
        ls = ((sl[:, ib // 2] >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4)
        scale = d[:, None] * (ls - 32).astype(np.float32)
        return scale, np.zeros_like(scale), self._codes(blocks)

    def _super_blocks(self, xs: np.ndarray, ws: np.ndarray) -> np.ndarray:
        S = xs.shape[0]
        nb = self.super_block // QK
        xb = xs.reshape(-1, QK)  # (S*8, 32)
        scales = _block_scales(np.ascontiguousarray(xb.T), np.ascontiguousarray(ws.reshape(-1, QK).T), _IQ4NL)
        scales = scales.reshape(S, nb)
        _, max_scale = absmax_first(scales.T)  # the first scale of largest magnitude, +0 if none
        d = -max_scale / F32(32)
        idd = inv_or_zero(d)
        ls = np.clip(nearest_int(idd[:, None] * scales), -32, 31)  # (S, 8)
        dl = d[:, None] * ls.astype(np.float32)
        idl = inv_or_zero(dl)
        L = _IQ4NL.levels_of((idl + idl).reshape(-1, 1) * xb)  # (S*8, 32)
        qs = pack_nibbles(L).reshape(S, nb * QK // 2)
        u = (ls + 32).astype(np.uint16)  # 6-bit codes
        lo = (u & 0xF).astype(np.uint8)
        scales_l = lo[:, 0::2] | (lo[:, 1::2] << 4)  # (S, 4)
        scales_h = np.bitwise_or.reduce((u >> 4) << (2 * np.arange(nb, dtype=np.uint16)), axis=1)
        scales_h_bytes = scales_h.astype("<u2")[:, None].view(np.uint8)
        return np.concatenate([fp16_bytes(d), scales_h_bytes, scales_l, qs], axis=1)


class MXFP4(GGUFPyCodec):
    """OCP MXFP4 (E2M1 values, one E8M0 exponent per 32). ggml ignores the importance vector, and
    gguf-py's quantizer reproduces ggml's ``quantize_row_mxfp4_ref`` byte for byte."""

    ggml_type = GGMLType.MXFP4

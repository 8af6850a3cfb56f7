"""ggml's legacy block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32), bit-exact with ggml.

Without an importance vector ggml rounds each block to its absmax (``quantize_row_q4_0_ref`` ...), and
gguf-py's ``quantize`` reproduces those bytes exactly, so that path is delegated to it. With one,
``ggml_quantize_chunk`` takes the ``quantize_row_q*_impl`` path: a weighted least-squares scale search
per block, with weights ``imatrix[j] * sqrt(sigma2 + x[j]^2)`` (``sigma2`` = mean of ``x^2`` over the
whole row). Symmetric types search 19 scales around ``nmax/max`` (``make_qx_quants``); types with a
minimum search 37 (scale, min) pairs (``make_qkx3_quants``). Both are reproduced here in float32, in
ggml's order of operations, vectorized across blocks (the candidate loop is the only Python loop).
Q8_0 ignores the importance vector, as ggml does.

Byte layouts (little-endian, one block of 32):

    Q4_0  d:f16 | qs[16]            qs[j] = L[j] | L[j+16] << 4; x = d * (L - 8)
    Q4_1  d:f16 m:f16 | qs[16]      x = d * L + m
    Q5_0  d:f16 | qh:u32 | qs[16]   bit j of qh = bit 4 of L[j]; x = d * (L - 16)
    Q5_1  d:f16 m:f16 | qh | qs     x = d * L + m
    Q8_0  d:f16 | qs:i8[32]         x = d * qs
"""

from __future__ import annotations

import numpy as np
from gguf import quants as gguf_quants

from lowbit.formats.gguf.block import (
    GGMLBlockCodec,
    absmax_first,
    fp16_bytes,
    pack_high_bits,
    pack_nibbles,
    seq_sum,
)
from lowbit.formats.gguf.types import GGMLType

QK = 32
GROUP_MAX_EPS = np.float32(1e-15)
# Blocks handled per numpy pass: keeps the (32, chunk) float32 temporaries in cache.
_CHUNK = 2048

_F32 = np.float32


def _row_weights(x: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """ggml's ``weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j])``, sigma2 = sum(x^2)/n_per_row per row.

    x float32 (rows, n), imatrix float32 (n,) -> float32 (rows, n).
    """
    n = x.shape[1]
    sigma2 = seq_sum(x * x, axis=1) / _F32(n)  # (rows,)
    return imatrix[None, :] * np.sqrt(sigma2[:, None] + x * x)


def _to_blocks_t(a: np.ndarray) -> np.ndarray:
    """(rows, n) -> (32, n_blocks): element index first, so that sums over a block are sequential adds."""
    return np.ascontiguousarray(a.reshape(-1, QK).T)


def make_qx_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` for many blocks at once.

    x, w float32 (n, B) (element, block). Returns scale float32 (B,) and L uint8 (n, B) in [0, 2*nmax).
    Rounding: ``clamp(nearest_int(v))`` equals ``rint(clip(v))`` (monotone, integer bounds, |v| small).
    L is a function of the winning inverse scale, so only that is tracked and L is rebuilt at the end.
    """
    B = x.shape[1]
    amax, mx = absmax_first(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, _F32(1), mx)
    wx = w * x
    v = np.empty_like(x)
    t = np.empty_like(x)
    sumlx = np.empty(B, dtype=np.float32)
    suml2 = np.empty(B, dtype=np.float32)
    lo, hi = _F32(-nmax), _F32(nmax - 1)

    def levels(iscale: np.ndarray) -> None:
        np.multiply(x, iscale, out=v)
        np.clip(v, lo, hi, out=v)
        np.rint(v, out=v)

    def trial(iscale: np.ndarray) -> None:
        levels(iscale)
        # the C's association: sumlx += (w*x)*l, suml2 += (w*l)*l
        np.multiply(wx, v, out=t)
        seq_sum(t, axis=0, out=sumlx)
        np.multiply(w, v, out=t)
        np.multiply(t, v, out=t)
        seq_sum(t, axis=0, out=suml2)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        best_is = _F32(-nmax) / mx
        trial(best_is)
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0))
        best = scale * sumlx
        for i in range(-9, 10):
            if i == 0:
                continue
            iscale = -(_F32(nmax) + _F32(0.1) * _F32(i)) / mx
            trial(iscale)
            upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if upd.any():
                best_is = np.where(upd, iscale, best_is)
                scale = np.where(upd, sumlx / suml2, scale)
                best = np.where(upd, scale * sumlx, best)
    levels(best_is)
    v += _F32(nmax)
    v *= ~zero  # all-zero blocks: L = 0
    scale = np.where(zero, _F32(0), scale).astype(np.float32)
    return scale, v.astype(np.uint8)


def make_qkx3_quants(
    x: np.ndarray,
    w: np.ndarray,
    nmax: int,
    rmin: float = -0.9,
    rdelta: float = 0.05,
    nstep: int = 36,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, false)``.

    x, w float32 (n, B). Returns scale (B,), the_min (B,) (so that x ~ scale * L - the_min) and
    L uint8 (n, B) in [0, nmax]. The search moves ``min`` as it improves, exactly as the C does.
    """
    B = x.shape[1]
    mn = x.min(axis=0)
    mx = x.max(axis=0)
    sum_w = seq_sum(w, axis=0)
    sum_x = seq_sum(w * x, axis=0)
    mn = np.where(mn > 0, _F32(0), mn)
    flat = mx <= mn
    nm = _F32(nmax)
    zero = _F32(0)
    v = np.empty_like(x)
    t = np.empty_like(x)
    u = np.empty_like(x)
    sum_l = np.empty(B, dtype=np.float32)
    sum_l2 = np.empty(B, dtype=np.float32)
    sum_xl = np.empty(B, dtype=np.float32)
    mad = np.empty(B, dtype=np.float32)

    def levels(iscale: np.ndarray, mn: np.ndarray) -> None:
        # C: v = iscale*(x - min); l = v > 0 ? nearest_int(MIN(v, nmax)) : 0  (NaN -> 0, inf -> nmax)
        np.subtract(x, mn, out=v)
        np.multiply(v, iscale, out=v)
        np.fmax(v, zero, out=v)
        np.fmin(v, nm, out=v)
        np.rint(v, out=v)

    def weighted_sq_err(scale: np.ndarray, mn: np.ndarray, L: np.ndarray, out: np.ndarray) -> None:
        # C: diff = scale*L + min - x; err += w * (diff*diff)
        np.multiply(L, scale, out=u)
        np.add(u, mn, out=u)
        np.subtract(u, x, out=u)
        np.multiply(u, u, out=u)
        np.multiply(u, w, out=u)
        seq_sum(u, axis=0, out=out)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = nm / (mx - mn)
        scale = _F32(1) / iscale
        levels(iscale, mn)
        # L is a function of (iscale, min) at the time it was made: track those, rebuild L at the end
        best_is, best_mn = iscale, mn
        best_mad = np.empty(B, dtype=np.float32)
        weighted_sq_err(scale, mn, v, best_mad)
        for i in range(nstep + 1):
            iscale = (_F32(rmin) + _F32(rdelta) * _F32(i) + nm) / (mx - mn)
            levels(iscale, mn)
            np.multiply(w, v, out=t)
            seq_sum(t, axis=0, out=sum_l)
            np.multiply(t, v, out=u)
            seq_sum(u, axis=0, out=sum_l2)
            np.multiply(t, x, out=u)
            seq_sum(u, axis=0, out=sum_xl)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, zero, this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            weighted_sq_err(this_scale, this_min, v, mad)
            upd = (D > 0) & (mad < best_mad) & ~flat
            if upd.any():
                best_is = np.where(upd, iscale, best_is)
                best_mn = np.where(upd, mn, best_mn)
                best_mad = np.where(upd, mad, best_mad)
                scale = np.where(upd, this_scale, scale)
                mn = np.where(upd, this_min, mn)
        levels(best_is, best_mn)
    v *= ~flat  # flat blocks: L = 0
    scale = np.where(flat, zero, scale).astype(np.float32)
    return scale, (-mn).astype(np.float32), v.astype(np.uint8)


class _Legacy(GGMLBlockCodec):
    """No imatrix: gguf-py (bit-exact with ggml's ``_ref`` path). With one: :meth:`_weighted_blocks`."""

    def _quantize(self, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        rows, n = x.shape
        if imatrix is None:
            out = gguf_quants.quantize(x, self.ggml_type)
            return np.asarray(out, dtype=np.uint8).reshape(rows, self.row_bytes(n))
        out = np.empty((rows, self.row_bytes(n)), dtype=np.uint8)
        step = max(1, _CHUNK * QK // n)  # whole rows per pass (sigma2 is per row), ~_CHUNK blocks
        for s in range(0, rows, step):
            xg = x[s : s + step]
            wg = _row_weights(xg, imatrix)
            blocks = self._weighted_blocks(_to_blocks_t(xg), _to_blocks_t(wg))  # (rows*n/32, type_size)
            out[s : s + step] = blocks.reshape(xg.shape[0], -1)
        return out

    def _weighted_blocks(self, xt: np.ndarray, wt: np.ndarray) -> np.ndarray:
        """xt, wt float32 (32, B) -> uint8 (B, type_size) (ggml's ``quantize_row_*_impl``)."""
        raise NotImplementedError


class Q4_0(_Legacy):
    ggml_type = GGMLType.Q4_0

    def _weighted_blocks(self, xt: np.ndarray, wt: np.ndarray) -> np.ndarray:
        d, L = make_qx_quants(xt, wt, 8)
        return np.concatenate([fp16_bytes(d), pack_nibbles(L.T)], axis=1)


class Q5_0(_Legacy):
    ggml_type = GGMLType.Q5_0

    def _weighted_blocks(self, xt: np.ndarray, wt: np.ndarray) -> np.ndarray:
        d, L = make_qx_quants(xt, wt, 16)
        Lb = L.T
        return np.concatenate([fp16_bytes(d), pack_high_bits(Lb), pack_nibbles(Lb)], axis=1)


class Q4_1(_Legacy):
    ggml_type = GGMLType.Q4_1

    def _weighted_blocks(self, xt: np.ndarray, wt: np.ndarray) -> np.ndarray:
        d, the_min, L = make_qkx3_quants(xt, wt, 15)
        return np.concatenate([fp16_bytes(d), fp16_bytes(-the_min), pack_nibbles(L.T)], axis=1)


class Q5_1(_Legacy):
    ggml_type = GGMLType.Q5_1

    def _weighted_blocks(self, xt: np.ndarray, wt: np.ndarray) -> np.ndarray:
        d, the_min, L = make_qkx3_quants(xt, wt, 31)
        Lb = L.T
        return np.concatenate(
            [fp16_bytes(d), fp16_bytes(-the_min), pack_high_bits(Lb), pack_nibbles(Lb)], axis=1
        )


class Q8_0(_Legacy):
    """ggml's Q8_0 quantizer ignores the importance vector."""

    ggml_type = GGMLType.Q8_0
    uses_imatrix = False

"""float32 building blocks of ggml's k-quants, vectorized across sub-blocks and bit-exact with ggml.

ggml quantizes one sub-block of ``n`` (16 or 32) values at a time with small searches
(``make_qx_quants``, ``make_q3_quants``, ``make_qkx2_quants``, ``make_qkx3_quants``,
``make_qp_quants`` in ``ggml-quants.c``). Here each search runs on *all* sub-blocks at once:

* arrays are laid out ``(n, S)``: element index first, one column per sub-block, so that the
  element-by-element loops of the C code become ``n`` vector operations over ``S`` columns;
* every sum is accumulated in float32, element by element, in ggml's order (:func:`seqsum`;
  ``np.sum`` sums pairwise and would change the last bit, which changes later rounding decisions);
* every product/quotient is evaluated in float32 in the C expression's left-to-right order;
* :func:`nearest_int` is ggml's magic-number rounding, bit for bit (round half to even in range,
  the same wrapped garbage out of range);
* ``uint8``/``int8`` stores keep the C truncation (``& 0xFF``), so degenerate inputs give ggml's bytes.

Callers must run these under ``np.errstate(all="ignore")``: ggml divides by zero in branches whose
result it then discards; here both branches are computed and one is selected with ``np.where``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F32 = np.float32
F32Array = npt.NDArray[np.float32]
I32Array = npt.NDArray[np.int32]
U8Array = npt.NDArray[np.uint8]

GROUP_MAX_EPS = F32(1e-15)
_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves the rounded integer in the low mantissa bits


def nearest_int(v: F32Array) -> I32Array:
    """ggml's ``nearest_int``: ``(bits(v + 1.5*2**23) & 0x7fffff) - 0x400000`` (round half to even).

    Exact for ``|v| <= 4194303``; outside it returns the same wrapped value as ggml (whose assert is
    compiled out).
    """
    s = np.asarray(v, dtype=F32) + _MAGIC
    return (s.view(np.int32) & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def to_f32(a: npt.NDArray[np.integer]) -> F32Array:
    return a.astype(F32)


def seqsum(a: F32Array) -> F32Array:
    """``float s = 0; for (i...) s += a[i];`` over axis 0 of ``a (n, S)`` -> ``(S,)`` float32."""
    acc = a[0] + F32(0.0)
    for i in range(1, a.shape[0]):
        acc += a[i]
    return acc


def seqsum_from_first(a: F32Array) -> F32Array:
    """``float s = a[0]; for (i = 1...) s += a[i];`` (differs from :func:`seqsum` only for -0.0)."""
    acc = a[0].copy()
    for i in range(1, a.shape[0]):
        acc += a[i]
    return acc


def first_absmax(x: F32Array) -> tuple[F32Array, F32Array]:
    """``(amax, max)`` of ggml's ``float amax = 0, max = 0; ... if (fabsf(x[i]) > amax) { amax =
    fabsf(x[i]); max = x[i]; }`` over axis 0 of ``x (n, S)``: the signed value of the first element of
    largest magnitude; NaNs never win a comparison, and ``(0, 0)`` when nothing beats 0."""
    ax = np.abs(x)
    ax = np.where(np.isnan(ax), F32(-1.0), ax)
    idx = np.argmax(ax, axis=0)
    cols = np.arange(x.shape[1])
    best = ax[idx, cols]
    found = best > 0
    return np.where(found, best, F32(0.0)), np.where(found, x[idx, cols], F32(0.0))


def max_from_zero(a: F32Array, axis: int) -> F32Array:
    """ggml's ``float m = 0; for (...) if (a[i] > m) m = a[i];`` (NaNs are skipped, the result is >= +0)."""
    m = np.fmax.reduce(a, axis=axis)
    return np.where(m > 0, m, F32(0.0))


def fp16_round(v: F32Array) -> tuple[npt.NDArray[np.uint16], F32Array]:
    """``GGML_FP32_TO_FP16`` (round to nearest even, subnormals, overflow to inf) and its value back.

    numpy's float32 -> float16 cast rounds exactly like ggml's (checked on all fp16 ties and 5 M random
    floats against ``ggml_fp32_to_fp16_row``).
    """
    with np.errstate(over="ignore"):
        h = np.asarray(v, dtype=F32).astype(np.float16)
    return h.view(np.uint16), h.astype(F32)


# ---------------------------------------------------------------------------------------------------
# make_qx_quants: symmetric, codes in [-nmax, nmax-1], 19 candidate scales around -nmax/max
# ---------------------------------------------------------------------------------------------------
def make_qx_quants(x: F32Array, nmax: int, qw: F32Array | None) -> tuple[F32Array, I32Array]:
    """ggml ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` on every column of ``x (n, S)``.

    Weights are ``qw`` if given, else ``x*x``. Returns ``(scale (S,), L (n, S))`` with ``L`` in
    ``[0, 2*nmax)`` (``l + nmax``), or all 0 for columns whose ``max|x| < 1e-15``.
    """
    amax, mx = first_absmax(x)
    w = x * x if qw is None else qw
    wx = w * x
    iscale = F32(-nmax) / mx

    def codes(isc: F32Array) -> tuple[I32Array, F32Array, F32Array]:
        li = np.clip(nearest_int(isc * x), -nmax, nmax - 1)
        lf = to_f32(li)
        return li, seqsum(wx * lf), seqsum(w * lf * lf)

    li, sumlx, suml2 = codes(iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0))
    best = scale * sumlx
    L = li + nmax
    for step in range(-9, 10):
        if step == 0:
            continue
        isc = -(F32(nmax) + F32(0.1) * F32(step)) / mx
        li, sumlx, suml2 = codes(isc)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better, li + nmax, L)
        new_scale = sumlx / suml2
        scale = np.where(better, new_scale, scale)
        best = np.where(better, new_scale * sumlx, best)
    zero = amax < GROUP_MAX_EPS
    scale = np.where(zero, F32(0.0), scale)
    L = np.where(zero, 0, L)
    return scale.astype(F32), L.astype(np.int32)


# ---------------------------------------------------------------------------------------------------
# make_q3_quants: Q3_K reference path, x*x-weighted coordinate descent on the codes
# ---------------------------------------------------------------------------------------------------
def make_q3_quants(x: F32Array, nmax: int) -> tuple[F32Array, I32Array]:
    """ggml ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on every column of ``x (n, S)``.

    Returns ``(scale (S,), L (n, S))`` with ``L = l + nmax``, or all 0 where ``max|x| < 1e-15``.
    """
    n = x.shape[0]
    amax, mx = first_absmax(x)
    iscale = F32(-nmax) / mx
    L = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)  # (n, S), signed codes
    w = x * x
    wx = w * x
    lf = to_f32(L)
    sumlx = seqsum(wx * lf)
    suml2 = seqsum(w * lf * lf)
    # ggml stops after a pass that changes nothing; such a pass leaves the state as it was, so running
    # all 5 passes on every column gives the same result.
    for _ in range(5):
        for i in range(n):
            li = to_f32(L[i])
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = np.clip(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
            nl = to_f32(new_l)
            slx2 = slx + wx[i] * nl
            sl22 = sl2 + w[i] * nl * nl
            take = (slx > 0) & (new_l != L[i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = np.where(take, new_l, L[i])
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl22, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0))
    zero = amax < GROUP_MAX_EPS
    scale = np.where(zero, F32(0.0), scale)
    L = np.where(zero, 0, L + nmax)
    return scale.astype(F32), L.astype(np.int32)


# ---------------------------------------------------------------------------------------------------
# make_qkx2_quants / make_qkx3_quants: asymmetric (scale, min), codes in [0, nmax]
# ---------------------------------------------------------------------------------------------------
def make_qkx_quants(
    x: F32Array,
    w: F32Array,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    version: int,
) -> tuple[F32Array, F32Array, I32Array]:
    """ggml ``make_qkx2_quants`` (``version=2``) / ``make_qkx3_quants`` (``version=3``, with weights).

    The two differ only in the test for a flat sub-block (``max == min`` / ``max <= min``) and in
    qkx3's ``weights == NULL`` default, which no k-quant uses.

    ``x, w (n, S)``. Returns ``(scale (S,), the_min (S,), L (n, S))``: the sub-block dequantizes as
    ``scale * L - the_min``. The running ``min`` of the search is the best fit so far: later candidate
    scales are measured from it, as in ggml. This is the hot loop of Q2_K/Q4_K/Q5_K: buffers are reused
    and codes stay float32.
    """
    xmin = np.min(x, axis=0)
    mx = np.max(x, axis=0)
    # ggml: min = x[0], lowered on strict '<', then 'if (min > 0) min = 0'. A zero minimum is therefore
    # the first zero of the sub-block, with its sign (np.min/np.minimum do not say which zero); the sign
    # reaches the output of types that store -the_min as fp16 (Q4_1/Q5_1).
    is_zero = x == 0
    first_zero = x[np.argmax(is_zero, axis=0), np.arange(x.shape[1])]
    mn0 = np.where(xmin > 0, F32(0.0), np.where(xmin == 0, first_zero, xmin)).astype(F32)
    mn = mn0
    sum_w = seqsum_from_first(w)
    sum_x = seqsum_from_first(w * x)
    degenerate = (mx <= mn) if version == 3 else (mx == mn)
    fmax = F32(nmax)

    v = np.empty_like(x)
    buf = np.empty_like(x)

    def err(lf: F32Array, scale: np.ndarray, the_min: np.ndarray) -> F32Array:
        """seqsum(w * diff^2) (or w*|diff|), diff = scale*L + min - x, in ggml's order."""
        d = np.multiply(scale, lf, out=buf)
        d += the_min
        d -= x
        if use_mad:
            np.abs(d, out=d)
        else:
            d *= d
        d *= w
        return seqsum(d)

    iscale = fmax / (mx - mn)
    scale = F32(1.0) / iscale
    L = rounded_codes(x, mn, iscale, xmin, mx, 0, nmax)
    best = err(L, scale, mn)
    if nstep >= 1:
        for step in range(nstep + 1):
            isc = (F32(rmin) + F32(rdelta) * F32(step) + fmax) / (mx - mn)
            # Both versions clamp nearest_int(v), garbage included when the running min has moved
            # next to max (v huge or inf). Newer llama.cpp clamps v before rounding in qkx3; the
            # reference build (0c1e570) does not, and ggml_quantize_chunk of that build agrees.
            lf = rounded_codes(x, mn, isc, xmin, mx, 0, nmax, out=v)
            wl = np.multiply(w, lf, out=buf)
            sum_l = seqsum(wl)
            sum_xl = seqsum(wl * x)
            wl *= lf
            sum_l2 = seqsum(wl)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clipped = this_min > 0
            this_min = np.where(clipped, F32(0.0), this_min)
            this_scale = np.where(clipped, sum_xl / sum_l2, this_scale)
            cur = err(lf, this_scale, this_min)
            better = (D > 0) & (cur < best)
            if better.any():
                np.copyto(L, lf, where=better)
                best = np.where(better, cur, best)
                scale = np.where(better, this_scale, scale)
                mn = np.where(better, this_min, mn)
    scale = np.where(degenerate, F32(0.0), scale)
    mn = np.where(degenerate, mn0, mn)
    L[:, degenerate] = 0
    return scale.astype(F32), (-mn).astype(F32), L.astype(np.int32)


def rounded_codes(
    x: F32Array,
    mn: F32Array,
    iscale: F32Array,
    xmin: F32Array,
    xmax: F32Array,
    lo: int,
    hi: int,
    out: F32Array | None = None,
) -> F32Array:
    """``MAX(lo, MIN(hi, nearest_int(iscale*(x - mn))))`` as float32 ``(n, S)``.

    ``np.rint`` equals ``nearest_int`` wherever ``|v| <= 4194303``; the bound is checked per column
    from the column's extremes (``v`` is monotonic in ``x``), and columns beyond it (huge or non-finite
    scales) take the exact bit-trick path.
    """
    v = np.subtract(x, mn, out=out)
    v *= iscale
    reach = np.maximum(np.abs(iscale * (xmax - mn)), np.abs(iscale * (xmin - mn)))
    in_range = reach <= F32(4194303.0)
    exact = None if in_range.all() else np.clip(nearest_int(v), lo, hi).astype(F32)
    np.clip(v, F32(lo), F32(hi), out=v)
    np.rint(v, out=v)
    if exact is not None:
        np.copyto(v, exact, where=~in_range)
    return v


# ---------------------------------------------------------------------------------------------------
# make_qp_quants: non-negative super-block scales in [0, nmax] (imatrix paths of Q2_K, Q4_K, Q5_K)
# ---------------------------------------------------------------------------------------------------
def make_qp_quants(x: F32Array, nmax: int, qw: F32Array) -> tuple[F32Array, I32Array]:
    """ggml ``make_qp_quants(n, nmax, x, L, quant_weights)`` on every column of ``x, qw (n, S)``.

    Returns ``(scale (S,), L (n, S))``; ``L`` holds the ``uint8`` values ggml stores (0..255).
    """
    n = x.shape[0]
    mx = np.zeros(x.shape[1], dtype=F32)
    for i in range(n):  # MAX(max, x[i]) = max > x[i] ? max : x[i], a NaN included as the C does
        mx = np.where(mx > x[i], mx, x[i])
    iscale = F32(nmax) / mx
    scale0 = F32(1.0) / iscale
    l0 = nearest_int(iscale * x) & 0xFF
    d = x - scale0 * to_f32(l0)
    best_mse = seqsum(qw * d * d)
    for step in range(-4, 5):
        if step == 0:
            continue
        isc = (F32(0.1) * F32(step) + F32(nmax)) / mx
        sc = F32(1.0) / isc
        lf = to_f32(np.minimum(nearest_int(isc * x), nmax))
        d = x - sc * lf
        mse = seqsum(qw * d * d)
        better = mse < best_mse
        best_mse = np.where(better, mse, best_mse)
        iscale = np.where(better, isc, iscale)
    li = np.minimum(nearest_int(iscale * x), nmax)
    lf = to_f32(li)
    wx = qw * x
    sumlx = seqsum(wx * lf)
    suml2 = seqsum(qw * lf * lf)
    L = li & 0xFF  # stored in uint8_t
    for _ in range(5):  # see make_q3_quants: a pass without change is a fixed point
        for i in range(n):
            Li = to_f32(L[i])
            slx = sumlx - wx[i] * Li
            sl2 = suml2 - qw[i] * Li * Li
            new_l = np.minimum(nearest_int(x[i] * sl2 / slx), nmax)
            nl = to_f32(new_l)
            slx2 = slx + wx[i] * nl
            sl22 = sl2 + qw[i] * nl * nl
            take = (slx > 0) & (sl2 > 0) & (new_l != L[i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = np.where(take, new_l & 0xFF, L[i])
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl22, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0))
    zero = mx < GROUP_MAX_EPS
    scale = np.where(zero, F32(0.0), scale)
    L = np.where(zero, 0, L)
    return scale.astype(F32), L.astype(np.int32)


# ---------------------------------------------------------------------------------------------------
# The 12-byte 6-bit (scale, min) packing of Q4_K / Q5_K (ggml get_scale_min_k4)
# ---------------------------------------------------------------------------------------------------
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


def fp16_bytes(h: npt.NDArray[np.uint16]) -> U8Array:
    """``(B,)`` fp16 bit patterns -> ``(B, 2)`` little-endian bytes."""
    return np.ascontiguousarray(h.astype("<u2")).view(np.uint8).reshape(-1, 2)


def fp16_from_bytes(b: U8Array) -> F32Array:
    """``(B, 2)`` little-endian fp16 bytes -> ``(B,)`` float32 (exact)."""
    return np.ascontiguousarray(b).view("<f2").reshape(-1).astype(F32)

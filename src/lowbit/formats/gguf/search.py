"""ggml's scale searches (``make_qx_quants``, ``make_q3_quants``, ``make_qkx2_quants``,
``make_qkx3_quants``, ``make_qp_quants`` in ``ggml-quants.c``), vectorized across blocks and bit-exact.

ggml fits one block (or sub-block) of ``n`` values at a time. Here each search runs on *all* blocks
at once:

* arrays are laid out ``(n, S)``: element index first, one column per block, so that the C's
  element-by-element loops become ``n`` vector operations over ``S`` columns;
* every sum is accumulated in float32, element by element, in ggml's order and from ggml's start
  value (:func:`~lowbit.formats.gguf.block.seq_sum`);
* every product/quotient is evaluated in float32 in the C expression's left-to-right order
  (``w*x[i]*l`` is ``(w*x)*l``, ``w*l*x[i]`` is ``(w*l)*x``);
* rounding is ggml's ``nearest_int``; where it provably equals ``np.rint`` (``|v| <= 4194303``, checked
  per column from the column's extremes) the fast ``rint`` is used, elsewhere (huge or non-finite
  scales) the exact bit trick, so degenerate inputs give ggml's bytes too;
* ggml divides by zero in branches whose result it then discards; here both branches are computed
  and one selected with ``np.where``, under ``np.errstate(all="ignore")``.

Used by the legacy types (Q4_0..Q5_1 with an importance vector) and the k-quants (Q2_K..Q6_K).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lowbit.formats.gguf.block import (
    F32,
    GROUP_MAX_EPS,
    NEAREST_INT_EXACT,
    F32Array,
    I32Array,
    absmax_first,
    min_first,
    nearest_int,
    seq_sum,
)


def to_f32(a: np.ndarray) -> F32Array:
    """Integer codes -> float32, as C's implicit ``int -> float`` conversion."""
    return a.astype(F32)


def imatrix_weights(x: F32Array, qw: F32Array, sigma2: F32Array) -> F32Array:
    """ggml's importance weights ``qw[j] * sqrtf(sigma2 + x[j]*x[j])``.

    ``x (R, m)`` float32, ``qw`` broadcastable to it, ``sigma2 (R,)``: per row (legacy types) or per
    super-block (k-quants, IQ4), a multiple of the mean of ``x^2`` whose factor each type chooses.
    """
    return qw * np.sqrt(sigma2[:, None] + x * x)


def clamped_codes(
    v: F32Array, lo: int, hi: int, exact: np.ndarray | None = None, exact_v: F32Array | None = None
) -> F32Array:
    """``MAX(lo, MIN(hi, nearest_int(v)))`` as float32 codes, in place in ``v (n, S)``.

    ``exact (S,)`` (or None: no column) marks the columns that need the bit trick (values beyond
    ``NEAREST_INT_EXACT``, or NaN); ``exact_v (n, k)`` holds their unrounded values if ``v`` does not.
    """
    fixed = None
    if exact is not None:
        cols = np.nonzero(exact)[0]
        fixed = np.clip(nearest_int(v[:, cols] if exact_v is None else exact_v), lo, hi).astype(F32)
    np.clip(v, F32(lo), F32(hi), out=v)
    np.rint(v, out=v)
    if fixed is not None:
        v[:, cols] = fixed
    return v


# ---------------------------------------------------------------------------------------------------
# make_qx_quants: symmetric, codes in [-nmax, nmax-1], 19 candidate scales around -nmax/max
# ---------------------------------------------------------------------------------------------------
def make_qx_quants(x: F32Array, nmax: int, qw: F32Array | None = None) -> tuple[F32Array, I32Array]:
    """ggml ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` on every column of ``x (n, S)``.

    Weights are ``qw (n, S)`` if given, else ``x*x``. Returns ``(scale (S,), L (n, S))`` with ``L`` in
    ``[0, 2*nmax)`` (``l + nmax``), or all 0 (and scale 0) for columns whose ``max|x| < 1e-15``.
    ``L`` is a function of the winning inverse scale: only that is tracked, ``L`` is rebuilt at the end.
    """
    n, S = x.shape
    amax, mx = absmax_first(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1.0), mx)  # zero columns are overwritten at the end
    has_nan = np.isnan(x.max(axis=0))  # only second-level fits see NaN (scales of overflowed blocks)
    w = x * x if qw is None else qw
    wx = w * x
    v = np.empty_like(x)
    t = np.empty_like(x)
    sumlx = np.empty(S, dtype=F32)
    suml2 = np.empty(S, dtype=F32)

    def codes(iscale: F32Array) -> None:
        np.multiply(iscale, x, out=v)
        exact = has_nan | ~(np.abs(iscale) * amax <= NEAREST_INT_EXACT)
        clamped_codes(v, -nmax, nmax - 1, exact if exact.any() else None)

    def trial(iscale: F32Array) -> None:
        codes(iscale)
        np.multiply(wx, v, out=t)  # sumlx += w*x[i]*l
        seq_sum(t, out=sumlx)
        np.multiply(w, v, out=t)  # suml2 += w*l*l
        np.multiply(t, v, out=t)
        seq_sum(t, out=suml2)

    with np.errstate(all="ignore"):
        best_is = F32(-nmax) / mx
        trial(best_is)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
            trial(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if better.any():
                best_is = np.where(better, iscale, best_is)
                scale = np.where(better, sumlx / suml2, scale)
                best = np.where(better, scale * sumlx, best)
        codes(best_is)
    L = v.astype(np.int32) + nmax
    L[:, zero] = 0
    return np.where(zero, F32(0.0), scale).astype(F32), L


def _coordinate_descent(
    n: int,
    L: I32Array,
    sumlx: F32Array,
    suml2: F32Array,
    data: tuple[F32Array, ...],
    refine: Callable[[int, I32Array, F32Array, F32Array, tuple[F32Array, ...]], np.ndarray],
    passes: int = 5,
) -> None:
    """Up to ``passes`` sweeps of ggml's code-by-code refinement (``make_q3_quants``, ``make_qp_quants``),
    in place on ``L (n, S)``, ``sumlx, suml2 (S,)``.

    ``refine(i, L_c, sumlx_c, suml2_c, data_c)`` updates element ``i`` of the columns still running (given
    as their sub-arrays: the state, updated in place, and ``data``'s ``(n, S)`` arrays) and returns where
    it changed a code. ggml stops a block after a
    sweep that changes nothing, and such a sweep leaves the block as it was: so a column drops out of
    later sweeps as soon as one of its sweeps changes nothing, which gives ggml's result and usually
    ends after one or two sweeps instead of five.
    """
    cols = np.arange(L.shape[1])
    for sweep in range(passes):
        if cols.size == 0:
            return
        if sweep == 0:  # every column: work on the arrays themselves
            Lc, slx, sl2, dc = L, sumlx, suml2, data
        else:
            Lc, slx, sl2 = L[:, cols], sumlx[cols], suml2[cols]
            dc = tuple(a[:, cols] for a in data)
        changed = np.zeros(cols.size, dtype=bool)
        for i in range(n):
            changed |= refine(i, Lc, slx, sl2, dc)
        if sweep > 0:
            L[:, cols], sumlx[cols], suml2[cols] = Lc, slx, sl2
        cols = cols[changed]


# ---------------------------------------------------------------------------------------------------
# make_q3_quants: Q3_K reference path, x*x-weighted coordinate descent on the codes
# ---------------------------------------------------------------------------------------------------
def make_q3_quants(x: F32Array, nmax: int) -> tuple[F32Array, I32Array]:
    """ggml ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on every column of ``x (n, S)``.

    Returns ``(scale (S,), L (n, S))`` with ``L = l + nmax``, or all 0 where ``max|x| < 1e-15``.
    """
    n = x.shape[0]
    amax, mx = absmax_first(x)
    with np.errstate(all="ignore"):
        iscale = F32(-nmax) / mx
        L = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)  # (n, S), signed codes
        w = x * x
        wx = w * x
        lf = to_f32(L)
        sumlx = seq_sum(wx * lf)
        suml2 = seq_sum(w * lf * lf)

        def refine(
            i: int, L: I32Array, sumlx: F32Array, suml2: F32Array, d: tuple[F32Array, ...]
        ) -> np.ndarray:
            li = to_f32(L[i])
            xi, wi, wxi = d[0][i], d[1][i], d[2][i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new_l = np.clip(nearest_int(xi * sl2 / slx), -nmax, nmax - 1)
            nl = to_f32(new_l)
            slx2 = slx + wxi * nl
            sl22 = sl2 + wi * nl * nl
            take = (slx > 0) & (new_l != L[i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = np.where(take, new_l, L[i])
            sumlx[:] = np.where(take, slx2, sumlx)
            suml2[:] = np.where(take, sl22, suml2)
            return take

        _coordinate_descent(n, L, sumlx, suml2, (x, w, wx), refine)
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

    The two differ only in the test for a flat block (``max == min`` / ``max <= min``) and in qkx3's
    ``weights == NULL`` default, which no caller uses. The reference build (0c1e570) clamps
    ``nearest_int(v)`` in both, garbage included when the running min has moved next to max (``v``
    huge or inf); newer llama.cpp clamps ``v`` before rounding in qkx3.

    ``x, w (n, S)``. Returns ``(scale (S,), the_min (S,), L (n, S))``: the block dequantizes as
    ``scale * L - the_min``. The running ``min`` of the search is the best fit so far: later candidate
    scales are measured from it, as in ggml. A zero ``min`` is the first zero of the block with its
    sign, which Q4_1/Q5_1 store (``-the_min`` as fp16). This is the hot loop of Q2_K/Q4_K/Q5_K and of
    Q4_1/Q5_1 with an imatrix: buffers are reused, codes stay float32, and ``L`` is rebuilt at the end
    from the winning ``(iscale, min)``.
    """
    xmin = np.min(x, axis=0)
    mx = np.max(x, axis=0)
    mn0 = min_first(x)
    mn0 = np.where(mn0 > 0, F32(0.0), mn0)  # 'if (min > 0) min = 0'
    mn = mn0
    sum_w = seq_sum(w, from_first=True)  # sum_w = w[0]; sum_x = sum_w*x[0]; then i = 1..n-1
    sum_x = seq_sum(w * x, from_first=True)
    degenerate = (mx <= mn) if version == 3 else (mx == mn)
    fmax = F32(nmax)

    v = np.empty_like(x)
    t = np.empty_like(x)
    u = np.empty_like(x)

    def err(lf: F32Array, scale: np.ndarray, the_min: np.ndarray) -> F32Array:
        """seq_sum(w * diff^2) (or w*|diff|), diff = scale*L + min - x, in ggml's order."""
        d = np.multiply(scale, lf, out=u)
        d += the_min
        d -= x
        if use_mad:
            np.abs(d, out=d)
        else:
            d *= d
        d *= w
        return seq_sum(d)

    with np.errstate(all="ignore"):
        iscale = fmax / (mx - mn)
        scale = F32(1.0) / iscale
        best = err(rounded_codes(x, mn, iscale, xmin, mx, 0, nmax, out=v), scale, mn)
        # L is a function of (iscale, min) at the time it was made: track those, rebuild L at the end
        best_is, best_mn = iscale, mn
        if nstep >= 1:
            for step in range(nstep + 1):
                isc = (F32(rmin) + F32(rdelta) * F32(step) + fmax) / (mx - mn)
                lf = rounded_codes(x, mn, isc, xmin, mx, 0, nmax, out=v)
                wl = np.multiply(w, lf, out=t)
                sum_l = seq_sum(wl)  # sum_l += w*l
                sum_xl = seq_sum(np.multiply(wl, x, out=u))  # sum_xl += w*l*x[i]
                sum_l2 = seq_sum(np.multiply(wl, lf, out=u))  # sum_l2 += w*l*l
                D = sum_w * sum_l2 - sum_l * sum_l
                this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
                this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
                clipped = this_min > 0
                this_min = np.where(clipped, F32(0.0), this_min)
                this_scale = np.where(clipped, sum_xl / sum_l2, this_scale)
                cur = err(lf, this_scale, this_min)
                better = (D > 0) & (cur < best)
                if better.any():
                    best_is = np.where(better, isc, best_is)
                    best_mn = np.where(better, mn, best_mn)
                    best = np.where(better, cur, best)
                    scale = np.where(better, this_scale, scale)
                    mn = np.where(better, this_min, mn)
        L = rounded_codes(x, best_mn, best_is, xmin, mx, 0, nmax, out=v).astype(np.int32)
    L[:, degenerate] = 0
    scale = np.where(degenerate, F32(0.0), scale)
    mn = np.where(degenerate, mn0, mn)
    return scale.astype(F32), (-mn).astype(F32), L


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

    ``v`` is monotonic in ``x``, so the column's extremes bound it: columns within
    ``NEAREST_INT_EXACT`` take ``np.rint``, the others (huge or non-finite scales) the bit trick.
    """
    v = np.subtract(x, mn, out=out)
    reach = np.maximum(np.abs(iscale * (xmax - mn)), np.abs(iscale * (xmin - mn)))
    exact = ~(reach <= NEAREST_INT_EXACT)
    if not exact.any():
        v *= iscale
        return clamped_codes(v, lo, hi)
    exact_v = iscale[exact] * v[:, exact]  # C: iscale*(x[i] - min)
    v *= iscale
    return clamped_codes(v, lo, hi, exact, exact_v)


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
    with np.errstate(all="ignore"):
        iscale = F32(nmax) / mx
        scale0 = F32(1.0) / iscale
        l0 = nearest_int(iscale * x) & 0xFF  # stored in uint8_t L
        d = x - scale0 * to_f32(l0)
        best_mse = seq_sum(qw * d * d)
        for step in range(-4, 5):
            if step == 0:
                continue
            isc = (F32(0.1) * F32(step) + F32(nmax)) / mx
            sc = F32(1.0) / isc
            lf = to_f32(np.minimum(nearest_int(isc * x), nmax))
            d = x - sc * lf
            mse = seq_sum(qw * d * d)
            better = mse < best_mse
            best_mse = np.where(better, mse, best_mse)
            iscale = np.where(better, isc, iscale)
        li = np.minimum(nearest_int(iscale * x), nmax)
        lf = to_f32(li)
        wx = qw * x
        sumlx = seq_sum(wx * lf)
        suml2 = seq_sum(qw * lf * lf)
        L = li & 0xFF  # stored in uint8_t

        def refine(
            i: int, L: I32Array, sumlx: F32Array, suml2: F32Array, d: tuple[F32Array, ...]
        ) -> np.ndarray:
            Li = to_f32(L[i])
            xi, qi, wxi = d[0][i], d[1][i], d[2][i]
            slx = sumlx - wxi * Li
            sl2 = suml2 - qi * Li * Li
            new_l = np.minimum(nearest_int(xi * sl2 / slx), nmax)
            nl = to_f32(new_l)
            slx2 = slx + wxi * nl
            sl22 = sl2 + qi * nl * nl
            take = (slx > 0) & (sl2 > 0) & (new_l != L[i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = np.where(take, new_l & 0xFF, L[i])
            sumlx[:] = np.where(take, slx2, sumlx)
            suml2[:] = np.where(take, sl22, suml2)
            return take

        _coordinate_descent(n, L, sumlx, suml2, (x, qw, wx), refine)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0))
    zero = mx < GROUP_MAX_EPS
    scale = np.where(zero, F32(0.0), scale)
    L = np.where(zero, 0, L)
    return scale.astype(F32), L.astype(np.int32)

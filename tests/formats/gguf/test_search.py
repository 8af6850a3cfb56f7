"""ggml's scale searches (:mod:`lowbit.formats.gguf.search`), vectorized across blocks, equal bit for
bit to scalar transcriptions of the C, one block and one float32 operation at a time.

The blocks include ggml's awkward cases: all zeros of either sign, a zero minimum whose sign is
stored (Q4_1/Q5_1), tied magnitudes, values on the code grid, tiny values and tiny weights whose
products underflow to signed zeros. (The same routines meet ggml itself in the ``libggml`` tests of
test_legacy.py and test_kquants.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import c_nearest_int

from lowbit.formats.gguf.search import make_qkx_quants, make_qp_quants, make_qx_quants

F = np.float32


def _bits(v: np.ndarray) -> list[int]:
    return np.asarray(v, dtype=F).view(np.uint32).tolist()


def _ref_make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None) -> tuple[np.float32, list[int]]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw), one block."""
    n = len(x)
    amax, mx = F(0), F(0)
    for i in range(n):
        if F(abs(x[i])) > amax:
            amax, mx = F(abs(x[i])), x[i]
    if amax < F(1e-15):
        return F(0), [0] * n
    w = [F(x[i] * x[i]) if qw is None else qw[i] for i in range(n)]

    def run(iscale: np.float32) -> tuple[list[int], np.float32, np.float32]:
        L, sumlx, suml2 = [], F(0), F(0)
        for i in range(n):
            li = max(-nmax, min(nmax - 1, c_nearest_int(F(iscale * x[i]))))
            L.append(li + nmax)
            sumlx = F(sumlx + F(F(w[i] * x[i]) * F(li)))
            suml2 = F(suml2 + F(F(w[i] * F(li)) * F(li)))
        return L, sumlx, suml2

    L, sumlx, suml2 = run(F(F(-nmax) / mx))
    scale = F(sumlx / suml2) if suml2 != 0 else F(0)
    best = F(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        La, sumlx, suml2 = run(F(-F(F(nmax) + F(F(0.1) * F(step))) / mx))
        if suml2 > 0 and F(sumlx * sumlx) > F(best * suml2):
            L, scale = La, F(sumlx / suml2)
            best = F(scale * sumlx)
    return scale, L


def _ref_make_qkx_quants(
    x: np.ndarray,
    w: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    version: int,
) -> tuple[np.float32, np.float32, list[int]]:
    """make_qkx2_quants / make_qkx3_quants (reference build: nearest_int, then clamp), one block."""
    n = len(x)
    mn, mx = x[0], x[0]
    sum_w = w[0]
    sum_x = F(sum_w * x[0])
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w = F(sum_w + w[i])
        sum_x = F(sum_x + F(w[i] * x[i]))
    if mn > 0:
        mn = F(0)
    if (mx <= mn) if version == 3 else (mx == mn):
        return F(0), F(-mn), [0] * n
    nm = F(nmax)

    def error(scale: np.float32, the_min: np.float32, L: list[int]) -> np.float32:
        e = F(0)
        for i in range(n):
            diff = F(F(F(scale * F(L[i])) + the_min) - x[i])
            diff = F(abs(diff)) if use_mad else F(diff * diff)
            e = F(e + F(w[i] * diff))
        return e

    def codes(iscale: np.float32, the_min: np.float32) -> list[int]:
        return [max(0, min(nmax, c_nearest_int(F(iscale * F(x[i] - the_min))))) for i in range(n)]

    iscale = F(nm / F(mx - mn))
    scale = F(F(1) / iscale)
    L = codes(iscale, mn)
    best = error(scale, mn, L)
    for step in range(nstep + 1):
        iscale = F(F(F(F(rmin) + F(F(rdelta) * F(step))) + nm) / F(mx - mn))
        La = codes(iscale, mn)
        sum_l, sum_l2, sum_xl = F(0), F(0), F(0)
        for i in range(n):
            wl = F(w[i] * F(La[i]))
            sum_l = F(sum_l + wl)
            sum_l2 = F(sum_l2 + F(wl * F(La[i])))
            sum_xl = F(sum_xl + F(wl * x[i]))
        D = F(F(sum_w * sum_l2) - F(sum_l * sum_l))
        if D > 0:
            this_scale = F(F(F(sum_w * sum_xl) - F(sum_x * sum_l)) / D)
            this_min = F(F(F(sum_l2 * sum_x) - F(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = F(0)
                this_scale = F(sum_xl / sum_l2)
            cur = error(this_scale, this_min, La)
            if cur < best:
                L, best, scale, mn = La, cur, this_scale, this_min
    return scale, F(-mn), L


def _ref_make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.float32, list[int]]:
    """make_qp_quants(n, nmax, x, L, quant_weights), one block (L is uint8_t)."""
    n = len(x)
    mx = F(0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < F(1e-15):
        return F(0), [0] * n
    iscale = F(F(nmax) / mx)
    L = [c_nearest_int(F(iscale * x[i])) & 0xFF for i in range(n)]
    scale = F(F(1) / iscale)
    best = F(0)
    for i in range(n):
        diff = F(x[i] - F(scale * F(L[i])))
        best = F(best + F(F(qw[i] * diff) * diff))
    for step in range(-4, 5):
        if step == 0:
            continue
        isc = F(F(F(F(0.1) * F(step)) + F(nmax)) / mx)
        sc = F(F(1) / isc)
        mse = F(0)
        for i in range(n):
            li = min(nmax, c_nearest_int(F(isc * x[i])))
            diff = F(x[i] - F(sc * F(li)))
            mse = F(mse + F(F(qw[i] * diff) * diff))
        if mse < best:
            best, iscale = mse, isc
    sumlx, suml2 = F(0), F(0)
    for i in range(n):
        li = min(nmax, c_nearest_int(F(iscale * x[i])))
        L[i] = li & 0xFF
        sumlx = F(sumlx + F(F(qw[i] * x[i]) * F(li)))
        suml2 = F(suml2 + F(F(qw[i] * F(li)) * F(li)))
    for _ in range(5):
        changed = 0
        for i in range(n):
            slx = F(sumlx - F(F(qw[i] * x[i]) * F(L[i])))
            sl2 = F(suml2 - F(F(qw[i] * F(L[i])) * F(L[i])))
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, c_nearest_int(F(F(x[i] * sl2) / slx)))
                if new_l != L[i]:
                    slx = F(slx + F(F(qw[i] * x[i]) * F(new_l)))
                    sl2 = F(sl2 + F(F(qw[i] * F(new_l)) * F(new_l)))
                    if F(F(slx * slx) * suml2) > F(F(sumlx * sumlx) * sl2):
                        L[i], sumlx, suml2 = new_l & 0xFF, slx, sl2
                        changed += 1
        if not changed:
            break
    return (F(sumlx / suml2) if suml2 > 0 else F(0)), L


def _awkward_blocks(n: int, n_random: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks (B, n) of random and edge-case values, and positive weights (B, n)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n_random, n)).astype(F) * F(0.02)
    special = np.zeros((12, n), F)
    special[1] = 0.5  # constant
    special[2] = -0.25  # negative constant (flat for the min/scale search)
    special[3, 7] = 1.0  # one nonzero
    special[4] = np.tile([0.02, -0.02], n // 2)  # tied magnitudes of both signs
    special[5] = (np.arange(n) % 16 - 8) * F(0.01)  # on a 4-bit grid
    special[6] = -np.abs(rng.standard_normal(n)).astype(F)  # all negative
    special[7] = rng.standard_normal(n).astype(F) * F(1e-8)  # tiny
    special[8] = -0.0  # all negative zeros
    special[9] = np.where(rng.random(n) < 0.2, np.abs(g[0]), F(0.0)) * F(1.0)  # min is a zero ...
    special[9, 0] = -0.0  # ... and the first zero is negative
    special[9, 1] = 0.0
    special[10] = np.where(rng.random(n) < 0.1, g[1], F(0.0))  # sparse, signed zeros where g < 0
    special[10] = np.copysign(special[10], g[1])
    special[11] = np.abs(g[2])  # all positive
    x = np.concatenate([g, special])
    w = np.exp(rng.standard_normal(x.shape)).astype(F) * (F(1e-4) + x * x)
    w[-1] = F(1e-30)  # products w*x*l underflow to (signed) zeros
    return x, w


@pytest.mark.parametrize("weighted", [True, False], ids=["qw", "x2"])
@pytest.mark.parametrize(("n", "nmax"), [(32, 8), (32, 16), (16, 4), (16, 32)])
def test_make_qx_quants_equals_scalar_transcription(n: int, nmax: int, weighted: bool) -> None:
    x, w = _awkward_blocks(n, 16, seed=nmax + n)
    scale, L = make_qx_quants(
        np.ascontiguousarray(x.T), nmax, np.ascontiguousarray(w.T) if weighted else None
    )
    assert scale.dtype == F and L.shape == (n, x.shape[0])
    for b in range(x.shape[0]):
        ref_scale, ref_L = _ref_make_qx_quants(x[b], nmax, w[b] if weighted else None)
        assert _bits(scale[b]) == _bits(ref_scale), b
        assert L[:, b].tolist() == ref_L, b


QKX_CALLS = {
    # (n, nmax, rmin, rdelta, nstep, use_mad, version): who calls it
    "q4_1/q5_1/q4_K impl": (32, 15, -0.9, 0.05, 36, False, 3),
    "q5_1 impl": (32, 31, -0.9, 0.05, 36, False, 3),
    "q2_K impl": (16, 3, -0.9, 0.05, 36, False, 3),
    "q2_K ref": (16, 3, -0.5, 0.1, 15, True, 2),
    "q4_K ref": (32, 15, -1.0, 0.1, 20, False, 2),
}


@pytest.mark.parametrize("call", sorted(QKX_CALLS))
def test_make_qkx_quants_equals_scalar_transcription(call: str) -> None:
    n, nmax, rmin, rdelta, nstep, use_mad, version = QKX_CALLS[call]
    x, w = _awkward_blocks(n, 8, seed=nmax + nstep)
    scale, the_min, L = make_qkx_quants(
        np.ascontiguousarray(x.T), np.ascontiguousarray(w.T), nmax, rmin, rdelta, nstep, use_mad, version
    )
    for b in range(x.shape[0]):
        ref_scale, ref_min, ref_L = _ref_make_qkx_quants(
            x[b], w[b], nmax, rmin, rdelta, nstep, use_mad, version
        )
        assert _bits(scale[b]) == _bits(ref_scale), b
        assert _bits(the_min[b]) == _bits(ref_min), b  # the sign of a zero min included
        assert L[:, b].tolist() == ref_L, b


def test_make_qkx_quants_keeps_the_sign_of_the_first_zero() -> None:
    x = np.zeros((32, 2), F)
    x[5:9] = 0.01
    x[0, 0], x[3, 0] = -0.0, 0.0  # first zero negative: ggml's min is -0.0, the stored m = -(-min) too
    x[3, 1] = -0.0  # first zero positive
    _, the_min, _ = make_qkx_quants(x, np.ones_like(x), 15, -0.9, 0.05, 36, False, 3)
    assert np.signbit(-the_min).tolist() == [True, False]


@pytest.mark.parametrize("nmax", [15, 63])
def test_make_qp_quants_equals_scalar_transcription(nmax: int) -> None:
    x, w = _awkward_blocks(16, 12, seed=nmax)
    x = np.abs(x)  # make_qp_quants fits non-negative scales and mins
    scale, L = make_qp_quants(np.ascontiguousarray(x.T), nmax, np.ascontiguousarray(w.T))
    for b in range(x.shape[0]):
        ref_scale, ref_L = _ref_make_qp_quants(x[b], nmax, w[b])
        assert _bits(scale[b]) == _bits(ref_scale), b
        assert L[:, b].tolist() == ref_L, b

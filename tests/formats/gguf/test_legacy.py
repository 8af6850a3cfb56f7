"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: byte-exact with ggml (goldens), equal to a scalar transcription of
ggml's weighted searches, and sane on random data without ../shared."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from ggml_golden import INPUTS, check_against_golden

from lowbit.formats.gguf import legacy
from lowbit.formats.gguf.block import get_codec
from lowbit.formats.gguf.legacy import make_qkx3_quants, make_qx_quants

F = np.float32
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
WEIGHTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")


# ------------------------------------------------------------------------------ goldens (../shared)


@pytest.mark.shared
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["none", "imatrix"])
@pytest.mark.parametrize("input_name", INPUTS)
@pytest.mark.parametrize("type_name", TYPES)
def test_bit_exact_with_ggml(
    shared_file: Callable[[str], Path], type_name: str, input_name: str, with_imatrix: bool
) -> None:
    check_against_golden(shared_file, type_name, input_name, with_imatrix)


# ------------------------------------------- scalar transcriptions of ggml's C (float32 throughout)


def _nearest_int(v: np.float32) -> int:
    s = np.array([F(v) + F(12582912.0)], dtype=F)
    return (int(s.view(np.int32)[0]) & 0x007FFFFF) - 0x00400000


def _ref_make_qx_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.float32, list[int]]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=w), one block, element by element."""
    n = len(x)
    amax, mx = F(0), F(0)
    for i in range(n):
        if F(abs(x[i])) > amax:
            amax, mx = F(abs(x[i])), x[i]
    if amax < F(1e-15):
        return F(0), [0] * n

    def run(iscale: np.float32) -> tuple[list[int], np.float32, np.float32]:
        L, sumlx, suml2 = [], F(0), F(0)
        for i in range(n):
            li = max(-nmax, min(nmax - 1, _nearest_int(F(iscale * x[i]))))
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


def _ref_make_qkx3_quants(
    x: np.ndarray, w: np.ndarray, nmax: int
) -> tuple[np.float32, np.float32, list[int]]:
    """make_qkx3_quants(n, nmax, x, w, L, &the_min, Laux, -0.9f, 0.05f, 36, false), one block."""
    n = len(x)
    mn, mx = x[0], x[0]
    sum_w = w[0]
    sum_x = F(sum_w * x[0])
    for i in range(1, n):
        mn, mx = min(mn, x[i]), max(mx, x[i])
        sum_w = F(sum_w + w[i])
        sum_x = F(sum_x + F(w[i] * x[i]))
    if mn > 0:
        mn = F(0)
    if mx <= mn:
        return F(0), F(-mn), [0] * n
    nm = F(nmax)
    iscale = F(nm / F(mx - mn))
    scale = F(F(1) / iscale)
    L = [max(0, min(nmax, _nearest_int(F(iscale * F(x[i] - mn))))) for i in range(n)]
    best_mad = F(0)
    for i in range(n):
        diff = F(F(F(scale * F(L[i])) + mn) - x[i])
        best_mad = F(best_mad + F(w[i] * F(diff * diff)))
    for step in range(37):
        iscale = F(F(F(F(-0.9) + F(F(0.05) * F(step))) + nm) / F(mx - mn))
        La = []
        sum_l, sum_l2, sum_xl = F(0), F(0), F(0)
        for i in range(n):
            v = F(iscale * F(x[i] - mn))
            li = _nearest_int(min(v, nm)) if v > 0 else 0
            La.append(li)
            sum_l = F(sum_l + F(w[i] * F(li)))
            sum_l2 = F(sum_l2 + F(F(w[i] * F(li)) * F(li)))
            sum_xl = F(sum_xl + F(F(w[i] * F(li)) * x[i]))
        D = F(F(sum_w * sum_l2) - F(sum_l * sum_l))
        if D > 0:
            this_scale = F(F(F(sum_w * sum_xl) - F(sum_x * sum_l)) / D)
            this_min = F(F(F(sum_l2 * sum_x) - F(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = F(0)
                this_scale = F(sum_xl / sum_l2)
            mad = F(0)
            for i in range(n):
                diff = F(F(F(this_scale * F(La[i])) + this_min) - x[i])
                mad = F(mad + F(w[i] * F(diff * diff)))
            if mad < best_mad:
                L, best_mad, scale, mn = La, mad, this_scale, this_min
    return scale, F(-mn), L


def _awkward_blocks(n_random: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks (B, 32) of random and edge-case values, and positive weights (B, 32)."""
    rng = np.random.default_rng(seed)
    blocks = [rng.standard_normal((n_random, 32)).astype(F) * F(0.02)]
    special = np.zeros((8, 32), F)
    special[1] = 0.5  # constant
    special[2] = -0.25  # negative constant (flat for the min/scale search)
    special[3, 7] = 1.0  # one nonzero
    special[4] = np.tile([0.02, -0.02], 16)  # tied magnitudes of both signs
    special[5] = (np.arange(32) % 16 - 8) * F(0.01)  # on a 4-bit grid
    special[6] = -np.abs(rng.standard_normal(32)).astype(F)  # all negative
    special[7] = rng.standard_normal(32).astype(F) * F(1e-8)  # tiny
    blocks.append(special)
    x = np.concatenate(blocks)
    w = np.exp(rng.standard_normal(x.shape)).astype(F) * (F(1e-4) + x * x)
    return x, w


@pytest.mark.parametrize("nmax", [8, 16])
def test_make_qx_quants_equals_scalar_transcription(nmax: int) -> None:
    x, w = _awkward_blocks(24, seed=nmax)
    scale, L = make_qx_quants(np.ascontiguousarray(x.T), np.ascontiguousarray(w.T), nmax)
    for b in range(x.shape[0]):
        ref_scale, ref_L = _ref_make_qx_quants(x[b], w[b], nmax)
        assert scale[b].view(np.uint32) == ref_scale.view(np.uint32), b
        assert L[:, b].tolist() == ref_L, b


@pytest.mark.parametrize("nmax", [15, 31])
def test_make_qkx3_quants_equals_scalar_transcription(nmax: int) -> None:
    x, w = _awkward_blocks(12, seed=nmax)
    scale, the_min, L = make_qkx3_quants(np.ascontiguousarray(x.T), np.ascontiguousarray(w.T), nmax)
    for b in range(x.shape[0]):
        ref_scale, ref_min, ref_L = _ref_make_qkx3_quants(x[b], w[b], nmax)
        assert scale[b].view(np.uint32) == ref_scale.view(np.uint32), b
        assert the_min[b].view(np.uint32) == ref_min.view(np.uint32), b
        assert L[:, b].tolist() == ref_L, b


# ----------------------------------------------------------------------- properties on random data


def _rel_rmse(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    w = np.ones(x.shape[1], F) if w is None else w
    return float(np.sqrt(np.sum(w * (x - y) ** 2) / np.sum(w * x * x)))


# Relative RMS error bounds on N(0, 1) rows (measured: Q4_0 0.087, Q4_1 0.079, Q5_0 0.043, Q5_1 0.038,
# Q8_0 0.0054), with some room.
BOUNDS = {"Q4_0": 0.10, "Q4_1": 0.09, "Q5_0": 0.05, "Q5_1": 0.045, "Q8_0": 0.007}


@pytest.mark.parametrize("type_name", TYPES)
def test_error_bounds_and_zero_rows(type_name: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 512)).astype(F)
    x[3] = 0.0
    im = np.exp(rng.standard_normal(512)).astype(F)
    codec = get_codec(type_name)
    for imatrix in (None, im):
        q = codec.quantize_rows(x, imatrix)
        assert q.shape == (16, codec.row_bytes(512)) and q.dtype == np.uint8
        y = codec.dequantize_rows(q, 512)
        assert np.all(y[3] == 0)
        assert _rel_rmse(x, y) < BOUNDS[type_name]


@pytest.mark.parametrize("type_name", WEIGHTED)
def test_imatrix_lowers_the_weighted_error(type_name: str) -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((32, 1024)).astype(F)
    im = np.exp(2 * rng.standard_normal(1024)).astype(F)
    codec = get_codec(type_name)
    plain = codec.dequantize_rows(codec.quantize_rows(x), 1024)
    weighted = codec.dequantize_rows(codec.quantize_rows(x, im), 1024)
    # measured: the imatrix path cuts the imatrix-weighted error by 40-65 %
    assert _rel_rmse(x, weighted, im) < 0.85 * _rel_rmse(x, plain, im)


def test_q8_0_ignores_the_imatrix() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 256)).astype(F)
    codec = get_codec("Q8_0")
    assert np.array_equal(
        codec.quantize_rows(x, np.exp(rng.standard_normal(256)).astype(F)), codec.quantize_rows(x)
    )


@pytest.mark.parametrize("type_name", WEIGHTED)
def test_rows_and_chunks_are_independent(type_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((5, 320)) * 0.05).astype(F)
    im = np.exp(rng.standard_normal(320)).astype(F)
    codec = get_codec(type_name)
    whole = codec.quantize_rows(x, im)
    by_row = np.concatenate([codec.quantize_rows(x[i : i + 1], im) for i in range(5)])
    monkeypatch.setattr(legacy, "_CHUNK", 7)  # one row per pass
    assert np.array_equal(whole, by_row)
    assert np.array_equal(codec.quantize_rows(x, im), whole)


def test_print_speed_q4_0_with_imatrix(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((4096, 4096)) * 0.02).astype(F)
    im = np.exp(rng.standard_normal(4096)).astype(F)
    codec = get_codec("Q4_0")
    t0 = time.perf_counter()
    q = codec.quantize_rows(x, im)
    dt = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nQ4_0 + imatrix, 4096x4096: {x.nbytes / dt / 1e6:.1f} MB/s of float32 input ({dt:.2f} s)")
    assert q.shape == (4096, 4096 // 32 * 18)
    y = codec.dequantize_rows(q[:64], 4096)
    assert _rel_rmse(x[:64], y) < BOUNDS["Q4_0"]

"""IQ4_NL, IQ4_XS (and MXFP4): byte-exact with ggml (goldens, and libggml itself on fresh inputs), equal
to a scalar transcription of ggml's ``quantize_row_iq4_nl_impl``, and sane on random data without
../shared."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from ggml_golden import INPUTS, check_against_golden
from ggml_oracle import GGMLQuantize, assert_matches_libggml, c_nearest_int, fuzz_inputs

from lowbit.formats.gguf import get_codec, iquants
from lowbit.formats.gguf.iquants import KVALUES_IQ4NL

F = np.float32
TYPES = ("IQ4_NL", "IQ4_XS", "MXFP4")


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

VALUES = [F(v) for v in KVALUES_IQ4NL]


def _best_index_int8(x: np.float32) -> int:
    """ggml's ``best_index_int8(16, kvalues_iq4nl, x)``: clamp at the ends, bisect, then the nearer
    of the two neighbours (ties up). Every comparison with NaN is false: NaN ends on the last level."""
    val = VALUES
    if x <= val[0]:
        return 0
    if x >= val[-1]:
        return len(val) - 1
    ml, mu = 0, len(val) - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < val[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if F(x - val[mu - 1]) < F(val[mu] - x) else mu


def _ref_iq4(x: np.ndarray, qw: np.ndarray | None, super_block: int) -> bytes:
    """quantize_row_iq4_nl_impl(super_block, 32, 16, x, ..., kvalues_iq4nl, qw, ntry=7) -> block bytes."""
    sigma2 = F(0)
    for j in range(super_block):
        sigma2 = F(sigma2 + F(x[j] * x[j]))
    sigma2 = F(sigma2 * F(F(2) / F(super_block)))
    nb = super_block // 32
    scales = [F(0)] * nb
    max_scale, amax_scale = F(0), F(0)
    for ib in range(nb):
        xb = x[32 * ib : 32 * ib + 32]
        if qw is not None:
            w = [F(qw[32 * ib + j] * np.sqrt(F(sigma2 + F(xb[j] * xb[j])))) for j in range(32)]
        else:
            w = [F(xb[j] * xb[j]) for j in range(32)]
        amax, mx = F(0), F(0)
        for j in range(32):
            if F(abs(xb[j])) > amax:
                amax, mx = F(abs(xb[j])), xb[j]
        if amax < F(1e-15):
            continue

        def sums(iscale: np.float32, xb: np.ndarray = xb, w: list = w) -> tuple[np.float32, np.float32]:
            sqx, sq2 = F(0), F(0)
            for j in range(32):
                q = VALUES[_best_index_int8(F(iscale * xb[j]))]
                sqx = F(sqx + F(F(w[j] * q) * xb[j]))
                sq2 = F(sq2 + F(F(w[j] * q) * q))
            return sqx, sq2

        d = F(F(-mx) / VALUES[0])
        sqx, sq2 = sums(F(F(1) / d))
        d = F(sqx / sq2) if sq2 > 0 else F(0)
        best = F(d * sqx)
        for itry in range(-7, 8):
            sqx, sq2 = sums(F(F(itry + KVALUES_IQ4NL[0]) / mx))
            if sq2 > 0 and F(sqx * sqx) > F(best * sq2):
                d = F(sqx / sq2)
                best = F(d * sqx)
        scales[ib] = d
        if F(abs(d)) > amax_scale:
            amax_scale, max_scale = F(abs(d)), d
    L = [0] * super_block
    if nb > 1:
        d = F(F(-max_scale) / F(32))
        head = np.array([d], "<f2").tobytes()
        idd = F(F(1) / d) if d != 0 else F(0)
        scales_h, scales_l = 0, [0] * (nb // 2)
        for ib in range(nb):
            li = max(-32, min(31, c_nearest_int(F(idd * scales[ib]))))
            dl = F(d * F(li))
            idl = F(F(1) / dl) if dl != 0 else F(0)
            for j in range(32):
                L[32 * ib + j] = _best_index_int8(F(idl * x[32 * ib + j]))
            li += 32
            scales_l[ib // 2] |= (li & 0xF) << (4 * (ib % 2))
            scales_h |= (li >> 4) << (2 * ib)
        head += scales_h.to_bytes(2, "little") + bytes(scales_l)
    else:
        head = np.array([scales[0]], "<f2").tobytes()
        idd = F(F(1) / scales[0]) if scales[0] != 0 else F(0)
        L = [_best_index_int8(F(idd * x[j])) for j in range(super_block)]
    qs = bytes(L[32 * i + j] | (L[32 * i + 16 + j] << 4) for i in range(nb) for j in range(16))
    return head + qs


def _test_rows(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((6, 256)) * 0.02).astype(F)
    x[1] = 0.0  # zero super-block
    x[2, :128] = 0.0  # zero blocks inside a super-block
    x[3] = np.tile([0.02, -0.02], 128)  # tied magnitudes
    x[4] = rng.standard_normal(256).astype(F) * F(1e-8)
    x[5, 40] = 3.0  # an outlier
    im = np.exp(rng.standard_normal(256)).astype(F)
    return x, im


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["none", "imatrix"])
@pytest.mark.parametrize("type_name", ["IQ4_NL", "IQ4_XS"])
def test_equals_scalar_transcription(type_name: str, with_imatrix: bool) -> None:
    x, im = _test_rows(seed=10)
    qw = im if with_imatrix else None
    codec = get_codec(type_name)
    got = codec.quantize_rows(x, qw)
    sb = 256 if type_name == "IQ4_XS" else 32
    for r in range(x.shape[0]):
        ref = b"".join(
            _ref_iq4(x[r, s : s + sb], None if qw is None else qw[s : s + sb], sb) for s in range(0, 256, sb)
        )
        assert got[r].tobytes() == ref, f"row {r}"


def test_codebook_lookup_is_ggmls_best_index() -> None:
    rng = np.random.default_rng(11)
    mids = np.array([(a + b) / 2 for a, b in zip(KVALUES_IQ4NL[:-1], KVALUES_IQ4NL[1:], strict=True)], F)
    probes = np.concatenate(
        [
            (rng.standard_normal(3000) * 80).astype(F),
            mids,
            np.nextafter(mids, F(-np.inf)),
            np.nextafter(mids, F(np.inf)),
            np.array([-1e9, -127.5, -127, 0, -0.0, 113, 113.5, 1e9, np.inf, -np.inf, np.nan], F),
        ]
    )
    got = iquants._IQ4NL.levels_of(probes + probes)
    assert got[-1] == 15  # NaN (IQ4_NL blocks whose scale overflowed): all 15s, as libggml writes
    assert got.tolist() == [_best_index_int8(v) for v in probes]
    # away from the midpoints, the nearest codebook value
    far = probes[:3000]
    nearest = np.argmin(np.abs(far[:, None] - np.array(KVALUES_IQ4NL, F)[None, :]), axis=1)
    assert np.array_equal(got[:3000], nearest)


# ------------------------------------------------- ggml itself (libggml, ../shared) on fresh inputs


@pytest.mark.shared
@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_matches_libggml_on_fresh_inputs(ggml_quantize: GGMLQuantize, type_name: str) -> None:
    """Scales 1e-30..1e30 (IQ4_NL at 1e30: weights x*x overflow, the scale is NaN), ties, sparse rows
    with signed zeros, odd imatrices; with and without."""
    assert_matches_libggml(ggml_quantize, type_name, fuzz_inputs(20261123))


# ----------------------------------------------------------------------- properties on random data


def _rel_rmse(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    w = np.ones(x.shape[1], F) if w is None else w
    return float(np.sqrt(np.sum(w * (x - y) ** 2) / np.sum(w * x * x)))


# Relative RMS error on N(0, 1) rows (measured: IQ4_NL 0.076, IQ4_XS 0.077, MXFP4 0.116), with room.
BOUNDS = {"IQ4_NL": 0.09, "IQ4_XS": 0.09, "MXFP4": 0.13}


@pytest.mark.parametrize("type_name", TYPES)
def test_error_bounds_and_zero_rows(type_name: str) -> None:
    rng = np.random.default_rng(12)
    x = rng.standard_normal((16, 512)).astype(F)
    x[3] = 0.0
    im = np.exp(rng.standard_normal(512)).astype(F)
    codec = get_codec(type_name)
    for imatrix in (None, im):
        q = codec.quantize_rows(x, imatrix)
        y = codec.dequantize_rows(q, 512)
        assert np.all(y[3] == 0)
        assert _rel_rmse(x, y) < BOUNDS[type_name]


@pytest.mark.parametrize("type_name", ["IQ4_NL", "IQ4_XS"])
def test_imatrix_lowers_the_weighted_error(type_name: str) -> None:
    rng = np.random.default_rng(13)
    x = rng.standard_normal((32, 1024)).astype(F)
    im = np.exp(2 * rng.standard_normal(1024)).astype(F)
    codec = get_codec(type_name)
    plain = codec.dequantize_rows(codec.quantize_rows(x), 1024)
    weighted = codec.dequantize_rows(codec.quantize_rows(x, im), 1024)
    assert _rel_rmse(x, weighted, im) < 0.85 * _rel_rmse(x, plain, im)  # measured: ~0.72


def test_mxfp4_ignores_the_imatrix() -> None:
    rng = np.random.default_rng(14)
    x = rng.standard_normal((4, 256)).astype(F)
    codec = get_codec("MXFP4")
    assert np.array_equal(
        codec.quantize_rows(x, np.exp(rng.standard_normal(256)).astype(F)), codec.quantize_rows(x)
    )


@pytest.mark.parametrize("type_name", ["IQ4_NL", "IQ4_XS"])
def test_rows_and_chunks_are_independent(type_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(15)
    x = (rng.standard_normal((5, 512)) * 0.05).astype(F)
    im = np.exp(rng.standard_normal(512)).astype(F)
    codec = get_codec(type_name)
    for qw in (None, im):
        whole = codec.quantize_rows(x, qw)
        by_row = np.concatenate([codec.quantize_rows(x[i : i + 1], qw) for i in range(5)])
        assert np.array_equal(whole, by_row)
        with monkeypatch.context() as m:
            m.setattr(iquants, "_CHUNK", 24)  # chunk borders inside rows (3 IQ4_XS super-blocks)
            assert np.array_equal(codec.quantize_rows(x, qw), whole)


def test_print_speed_iq4_xs_with_imatrix(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(16)
    x = (rng.standard_normal((4096, 4096)) * 0.02).astype(F)
    im = np.exp(rng.standard_normal(4096)).astype(F)
    codec = get_codec("IQ4_XS")
    t0 = time.perf_counter()
    q = codec.quantize_rows(x, im)
    dt = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nIQ4_XS + imatrix, 4096x4096: {x.nbytes / dt / 1e6:.1f} MB/s of float32 input ({dt:.2f} s)")
    assert q.shape == (4096, 4096 // 256 * 136)
    y = codec.dequantize_rows(q[:64], 4096)
    assert _rel_rmse(x[:64], y) < BOUNDS["IQ4_XS"]

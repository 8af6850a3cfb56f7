"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: byte-exact with ggml (goldens, and libggml itself on fresh inputs),
ggml's signed zeros, and sane on random data without ../shared. (The weighted searches are checked
against scalar transcriptions of ggml's C in test_search.py.)"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from ggml_golden import INPUTS, check_against_golden
from ggml_oracle import GGMLQuantize, assert_matches_libggml, fuzz_inputs, sparse_signed_zero_inputs

from lowbit.formats.gguf import get_codec, legacy

F = np.float32
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
WEIGHTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")


# ------------------------------------------------------------------------------ goldens (../shared)


@pytest.mark.shared
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["none", "imatrix"])
@pytest.mark.parametrize("input_name", INPUTS)
@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.usefixtures("codec_path")
def test_bit_exact_with_ggml(
    shared_file: Callable[[str], Path], type_name: str, input_name: str, with_imatrix: bool
) -> None:
    check_against_golden(shared_file, type_name, input_name, with_imatrix)


# ------------------------------------------------- ggml itself (libggml, ../shared) on fresh inputs


@pytest.mark.shared
@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.usefixtures("codec_path")
def test_quantize_matches_libggml_on_fresh_inputs(ggml_quantize: GGMLQuantize, type_name: str) -> None:
    """Scales 1e-30..1e30, ties, sparse rows with signed zeros, odd imatrices; with and without."""
    assert_matches_libggml(ggml_quantize, type_name, fuzz_inputs(20261123))


@pytest.mark.shared
@pytest.mark.parametrize("type_name", WEIGHTED)
@pytest.mark.usefixtures("codec_path")
def test_signed_zero_minimum_matches_libggml(ggml_quantize: GGMLQuantize, type_name: str) -> None:
    """Sparse rows with signed zeros and an imatrix: Q4_1/Q5_1 store the sign of the first zero of a
    block whose minimum is zero (before the fix, 28 of these 40 tensors differed in that byte)."""
    assert_matches_libggml(ggml_quantize, type_name, sparse_signed_zero_inputs(1, 40), both=False)


@pytest.mark.usefixtures("codec_path")
def test_ref_path_keeps_ggmls_signed_zeros() -> None:
    """Without an imatrix: an all-zero block stores d = -0.0 in Q4_0/Q5_0 (ggml's +0 / -8), whatever
    the signs of its zeros; Q4_1/Q5_1 store m = the first zero of a block whose minimum is zero, and
    d = +0.0 for an all-zero block."""
    x = np.zeros((1, 64), F)
    x[0, 0] = -0.0  # block 0: all zeros, the first one negative
    x[0, 32:40] = 0.5  # block 1: minimum zero, its first zero (element 40) negative
    x[0, 40] = -0.0
    for name in ("Q4_0", "Q5_0"):
        q = get_codec(name).quantize_rows(x).reshape(2, -1)
        assert q[0, :2].tolist() == [0x00, 0x80], name
    for name in ("Q4_1", "Q5_1"):
        q = get_codec(name).quantize_rows(x).reshape(2, -1)
        assert q[0, :4].tolist() == [0x00, 0x00, 0x00, 0x80], name  # d = +0, m = -0 (first zero)
        assert q[1, 2:4].tolist() == [0x00, 0x80], name


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
    for qw in (None, im):
        whole = codec.quantize_rows(x, qw)
        by_row = np.concatenate([codec.quantize_rows(x[i : i + 1], qw) for i in range(5)])
        assert np.array_equal(whole, by_row)
        with monkeypatch.context() as m:
            m.setattr(legacy, "_CHUNK", 7)  # one row per pass
            assert np.array_equal(codec.quantize_rows(x, qw), whole)


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

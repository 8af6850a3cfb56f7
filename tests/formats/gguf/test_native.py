"""The compiled kernels (``lowbit.formats.gguf._kernels``) against the numpy codecs they mirror.

The goldens and libggml tests run on both implementations (the ``codec_path`` fixture); here the two
are compared directly on inputs neither of those covers: widths whose last group of 8 blocks is
partial (the kernels search 8 blocks at a time and the rest one by one), every scale from 1e-30 to
1e30, importance vectors with zeros, and rows with a NaN or an infinity, which must be refused.
The dequantizers are compared on random blocks with NaN- and Inf-making scales, as uint32.
"""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import first_difference, fuzz_inputs, random_blocks

from lowbit.errors import NonFiniteWeightError
from lowbit.formats.gguf import block, get_codec

pytestmark = pytest.mark.usefixtures("native_kernels")  # skip without them, fail under CI=true


def _both(
    type_name: str, x: np.ndarray, imatrix: np.ndarray | None, monkeypatch: pytest.MonkeyPatch
) -> tuple[np.ndarray, np.ndarray]:
    codec = get_codec(type_name)
    monkeypatch.setenv("LOWBIT_NATIVE", "1")
    native = codec.quantize_rows(x, imatrix)
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    reference = codec.quantize_rows(x, imatrix)
    monkeypatch.setenv("LOWBIT_NATIVE", "1")
    return native, reference


def test_every_legacy_and_k_quant_type_has_a_kernel() -> None:
    assert set(block.NATIVE_TYPES) == {
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
    }
    assert block.native_kernels() is not None


@pytest.mark.parametrize("type_name", sorted(block.NATIVE_TYPES))
def test_kernels_equal_numpy_on_fuzz_inputs(type_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    codec = get_codec(type_name)
    n = 768 if codec.block_size == 256 else 576  # 576 = 18 blocks of 32: two groups of 8 and a tail of 2
    failures = []
    for label, x, imatrix in fuzz_inputs(7, n=n):
        for im in (None, imatrix):
            got, want = _both(type_name, x, im, monkeypatch)
            if not np.array_equal(got, want):
                failures.append(f"{label} imatrix={im is not None}: {first_difference(got, want)}")
    assert not failures, f"{type_name}: {len(failures)} differ; " + "; ".join(failures[:3])


@pytest.mark.parametrize("width", [32, 96, 288, 544])
@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_kernels_equal_numpy_for_any_number_of_blocks(
    type_name: str, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(width)
    x = rng.standard_normal((5, width)).astype(np.float32)
    x[1, : width // 2] = 0.0
    x[2] = np.abs(x[2])
    imatrix = rng.exponential(1.0, width).astype(np.float32)
    imatrix[::5] = 0.0
    for im in (None, imatrix):
        got, want = _both(type_name, x, im, monkeypatch)
        assert np.array_equal(got, want), first_difference(got, want)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0", "Q4_K", "Q6_K"])
def test_kernels_refuse_non_finite_rows(type_name: str, bad: float) -> None:
    codec = get_codec(type_name)
    x = np.ones((6, 512), dtype=np.float32)
    x[4, 300] = bad
    with pytest.raises(NonFiniteWeightError, match="NaN or Inf"):
        codec.quantize_rows(x, threads=2)


def test_kernels_check_buffer_sizes() -> None:
    assert block._native is not None
    x = np.ones((2, 256), dtype=np.float32)
    out = np.empty((2, 10), dtype=np.uint8)
    with pytest.raises(ValueError, match="buffer sizes"):
        block._native.quantize(12, x, 2, 256, None, out)
    with pytest.raises(ValueError, match="no kernel"):
        block._native.quantize(20, x, 2, 256, None, out)


def test_bf16_kernel_equals_gguf_py() -> None:
    from gguf import quants as gguf_quants

    assert block._native is not None
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(1 << 16) * np.exp(rng.uniform(-80, 80, 1 << 16))).astype(np.float32)
    bits = x.view(np.uint32)
    # NaNs (quiet, signalling, negative), infinities, zeros, subnormals, ties at the 16-bit boundary
    bits[:9] = [0x7FC00000, 0xFFC00001, 0x7F800001, 0x7F800000, 0xFF800000, 0, 0x80000000, 1, 0x80000001]
    bits[12:20] = [
        0x3F808000,
        0x3F818000,
        0x3F80C000,
        0x7F7FFFFF,
        0x7F7F8000,
        0x00008000,
        0x00018000,
        0x7FFFFFFF,
    ]
    want = (
        np.asarray(gguf_quants.quantize(x, gguf_quants.GGMLQuantizationType.BF16)).view(np.uint16).reshape(-1)
    )
    got = np.empty(x.size, dtype=np.uint16)
    block._native.to_bf16(x, got)
    assert np.array_equal(got, want)


def test_every_legacy_and_k_quant_type_has_a_dequant_kernel() -> None:
    assert block.NATIVE_DEQUANT_TYPES == block.NATIVE_TYPES


@pytest.mark.parametrize("rows", [1, 3, 65])
@pytest.mark.parametrize("type_name", sorted(block.NATIVE_DEQUANT_TYPES))
def test_dequant_kernels_equal_numpy_bit_for_bit(
    type_name: str, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    codec = get_codec(type_name)
    blocks = 5 if codec.block_size == 256 else 11
    data = random_blocks(type_name, rows, blocks, seed=100 + rows)
    n = blocks * codec.block_size
    got = codec.dequantize_rows(data, n)
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    with np.errstate(all="ignore"):
        want = codec.dequantize_rows(data, n)
    bad = got.view(np.uint32) != want.view(np.uint32)
    assert not bad.any(), f"{int(bad.sum())} floats differ, first at {np.argwhere(bad)[0].tolist()}"


def test_dequant_kernels_are_the_native_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the kernels on, dequantize_rows never reaches the numpy codec; with LOWBIT_NATIVE=0 it does."""
    codec = get_codec("Q4_K")
    data = random_blocks("Q4_K", 4, 2, seed=1)

    def numpy_path(data: np.ndarray, n_per_row: int) -> np.ndarray:
        raise AssertionError("the numpy codec ran")

    monkeypatch.setattr(codec, "_dequantize", numpy_path)
    assert codec.dequantize_rows(data, 512).shape == (4, 512)
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    with pytest.raises(AssertionError, match="numpy codec ran"):
        codec.dequantize_rows(data, 512)


def test_dequant_kernels_check_buffer_sizes() -> None:
    assert block._native is not None
    data = np.zeros((2, 144), dtype=np.uint8)
    out = np.empty((2, 256), dtype=np.float32)
    block._native.dequantize(12, data, 2, 256, out)
    with pytest.raises(ValueError, match="buffer sizes"):
        block._native.dequantize(12, data, 2, 256, out[:1])
    with pytest.raises(ValueError, match="buffer sizes"):
        block._native.dequantize(12, data, 3, 256, out)
    with pytest.raises(ValueError, match="no kernel"):
        block._native.dequantize(20, data, 2, 256, out)
    with pytest.raises(TypeError):
        block._native.dequantize(12, data, 2, 256, bytes(2048))  # out must be writable

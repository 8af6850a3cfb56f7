"""Dequantization (ggml's ``to_float``) of the legacy and k-quant types, on both implementations (the
``codec_path`` fixture: the compiled kernels and the numpy codecs), bit for bit against gguf-py's
``dequantize`` and ggml's own ``dequantize_row_*`` (libggml through ctypes).

The inputs are random bytes, since every byte pattern is a block a GGUF file may hold, with fp16
scales that make NaNs (with payloads) and infinities: the floats are compared as uint32, so a NaN
must be the same NaN. Row counts are odd (1, 7, 129) and rows hold several blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import GGMLToFloat, random_blocks

from lowbit.errors import ShapeError
from lowbit.formats.gguf import block, get_codec

TYPES = sorted(block.NATIVE_DEQUANT_TYPES)


def _bits_differ(got: np.ndarray, want: np.ndarray) -> str:
    """'' when ``got`` and ``want`` (float32) are the same bits, else where they first differ."""
    assert got.dtype == np.float32 and got.shape == want.shape
    bad = np.argwhere(got.view(np.uint32) != want.view(np.uint32))
    if not bad.size:
        return ""
    r, c = (int(v) for v in bad[0])
    return (
        f"{len(bad)} floats differ, first at row {r} col {c}: "
        f"{got.view(np.uint32)[r, c]:#010x} vs {want.view(np.uint32)[r, c]:#010x}"
    )


def _gguf_py(type_name: str, data: np.ndarray, n: int) -> np.ndarray:
    from gguf import quants as gguf_quants

    with np.errstate(all="ignore"):  # NaN and Inf scales are the point here
        out = gguf_quants.dequantize(data, get_codec(type_name).ggml_type)
    return np.asarray(out, dtype=np.float32).reshape(data.shape[0], n)


@pytest.mark.usefixtures("codec_path")
@pytest.mark.parametrize("rows", [1, 7, 129])
@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_rows_equals_gguf_py_bit_for_bit(type_name: str, rows: int) -> None:
    codec = get_codec(type_name)
    blocks = 3 if codec.block_size == 256 else 9
    data = random_blocks(type_name, rows, blocks, seed=rows)
    n = blocks * codec.block_size
    with np.errstate(all="ignore"):
        got = codec.dequantize_rows(data, n)
    want = _gguf_py(type_name, data, n)
    assert np.isnan(want).any() and np.isinf(want).any() or rows == 1
    assert not _bits_differ(got, want), _bits_differ(got, want)


@pytest.mark.shared
@pytest.mark.usefixtures("codec_path")
@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_rows_equals_libggml_bit_for_bit(type_name: str, ggml_to_float: GGMLToFloat) -> None:
    codec = get_codec(type_name)
    blocks = 4 if codec.block_size == 256 else 12
    data = random_blocks(type_name, 129, blocks, seed=5)
    n = blocks * codec.block_size
    with np.errstate(all="ignore"):
        got = codec.dequantize_rows(data, n)
    want = ggml_to_float(type_name, data, n)
    assert np.isnan(want).any() and np.isinf(want).any()
    assert not _bits_differ(got, want), _bits_differ(got, want)


@pytest.mark.usefixtures("codec_path")
@pytest.mark.parametrize("type_name", ["Q4_1", "Q6_K"])
def test_dequantize_rows_of_strided_and_empty_input(type_name: str) -> None:
    """A view of every other row (not contiguous) reads as its copy; zero rows give (0, n)."""
    codec = get_codec(type_name)
    data = random_blocks(type_name, 10, 2, seed=3)
    n = 2 * codec.block_size
    with np.errstate(all="ignore"):
        got = codec.dequantize_rows(data[::2], n)
        want = codec.dequantize_rows(np.ascontiguousarray(data[::2]), n)
    assert not _bits_differ(got, want)
    assert codec.dequantize_rows(data[:0], n).shape == (0, n)


@pytest.mark.usefixtures("codec_path")
def test_dequantize_rows_refuses_a_wrong_row_size() -> None:
    codec = get_codec("Q4_K")
    with pytest.raises(ShapeError, match="uint8"):
        codec.dequantize_rows(np.zeros((2, 145), dtype=np.uint8), 256)
    with pytest.raises(ShapeError):
        codec.dequantize_rows(np.zeros((2, 144), dtype=np.uint8), 200)

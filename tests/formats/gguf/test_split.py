"""A ggml block as parameters + codes (``split_blocks`` / ``join_blocks``): what GPTQ drives.

For every splittable type, on fuzz inputs (scales 1e-30 .. 1e30, ties, zeros, outliers) and both code
paths: ``scale * levels[code] - offset`` is, bit for bit, ggml's ``to_float`` of the blocks; joining a
block's own codes gives the block back; any codes written by ``join_blocks`` are read back by
``split_blocks`` and leave the parameters alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import fuzz_inputs

from lowbit.errors import SchemeError, ShapeError
from lowbit.formats.gguf import CODECS, get_codec

SPLITTABLE = sorted(n for n, c in CODECS.items() if c.splittable)


def test_which_types_split() -> None:
    assert set(SPLITTABLE) == {
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
    }  # fmt: skip
    for name in SPLITTABLE:
        c = get_codec(name)
        assert c.block_size % c.sub_size == 0
        assert list(c.levels) == sorted(set(c.levels))


def _expand(a: np.ndarray, sub: int) -> np.ndarray:
    return np.repeat(a, sub, axis=1)


@pytest.mark.parametrize("type_name", SPLITTABLE)
def test_split_is_to_float_and_join_inverts_it(type_name: str, codec_path: str) -> None:
    codec = get_codec(type_name)
    n = 512
    rng = np.random.default_rng(3)
    for label, x, imatrix in fuzz_inputs(11, n=n):
        data = codec.quantize_rows(x, imatrix)
        blocks = data.reshape(-1, codec.type_size)
        scale, offset, codes = codec.split_blocks(blocks)
        nsub = codec.block_size // codec.sub_size
        assert scale.shape == offset.shape == (blocks.shape[0], nsub) and scale.dtype == np.float32
        assert codes.shape == (blocks.shape[0], codec.block_size) and codes.dtype == np.uint8
        levels = np.asarray(codec.levels, dtype=np.float32)
        with np.errstate(all="ignore"):
            y = _expand(scale, codec.sub_size) * levels[codes] - _expand(offset, codec.sub_size)
        want = codec.dequantize_rows(data, n).reshape(y.shape)
        assert np.array_equal(y.view(np.uint32), want.view(np.uint32)), label
        assert np.array_equal(codec.join_blocks(blocks, codes), blocks), label
        other = rng.integers(0, len(levels), codes.shape).astype(np.uint8)
        joined = codec.join_blocks(blocks, other)
        s2, o2, c2 = codec.split_blocks(joined)
        assert np.array_equal(c2, other), label
        assert np.array_equal(s2.view(np.uint32), scale.view(np.uint32)), label
        assert np.array_equal(o2.view(np.uint32), offset.view(np.uint32)), label


def test_bad_codes_and_unsplittable_types() -> None:
    codec = get_codec("Q4_K")
    blocks = codec.quantize_rows(np.ones((1, 256), np.float32))
    with pytest.raises(ShapeError, match="0..15"):
        codec.join_blocks(blocks, np.full((1, 256), 16))
    with pytest.raises(ShapeError):
        codec.join_blocks(blocks, np.zeros((1, 32)))
    tq = get_codec("TQ2_0")
    with pytest.raises(SchemeError, match="cannot be split"):
        tq.split_blocks(tq.quantize_rows(np.ones((1, 256), np.float32)))

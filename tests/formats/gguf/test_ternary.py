"""TQ1_0, TQ2_0: byte-exact with ggml (goldens, and libggml itself on fresh inputs), and ternary by
construction without ../shared."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from ggml_golden import INPUTS, check_against_golden
from ggml_oracle import GGMLQuantize, assert_matches_libggml, fuzz_inputs

from lowbit.formats.gguf import get_codec

F = np.float32
TYPES = ("TQ1_0", "TQ2_0")


@pytest.mark.shared
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["none", "imatrix"])
@pytest.mark.parametrize("input_name", INPUTS)
@pytest.mark.parametrize("type_name", TYPES)
def test_bit_exact_with_ggml(
    shared_file: Callable[[str], Path], type_name: str, input_name: str, with_imatrix: bool
) -> None:
    check_against_golden(shared_file, type_name, input_name, with_imatrix)


@pytest.mark.shared
@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_matches_libggml_on_fresh_inputs(ggml_quantize: GGMLQuantize, type_name: str) -> None:
    assert_matches_libggml(ggml_quantize, type_name, fuzz_inputs(20261123))


@pytest.mark.parametrize("type_name", TYPES)
def test_ternary_weights_round_trip_exactly(type_name: str) -> None:
    # values already in {-d, 0, d} per super-block (d a power of two, so fp16-exact) come back unchanged
    rng = np.random.default_rng(20)
    trits = rng.integers(-1, 2, size=(8, 512)).astype(F)
    trits[:, ::256] = 1.0  # every super-block reaches its absmax
    d = np.repeat(F(2.0) ** rng.integers(-10, 2, size=(8, 2)).astype(F), 256, axis=1)
    x = trits * d
    codec = get_codec(type_name)
    y = codec.dequantize_rows(codec.quantize_rows(x), 512)
    assert np.array_equal(y, x)


@pytest.mark.parametrize("type_name", TYPES)
def test_values_are_ternary_and_imatrix_is_ignored(type_name: str) -> None:
    rng = np.random.default_rng(21)
    x = rng.standard_normal((6, 768)).astype(F)
    x[2] = 0.0
    codec = get_codec(type_name)
    q = codec.quantize_rows(x)
    assert np.array_equal(codec.quantize_rows(x, np.exp(rng.standard_normal(768)).astype(F)), q)
    y = codec.dequantize_rows(q, 768).reshape(6, 3, 256)
    d = np.abs(x).reshape(6, 3, 256).max(axis=2, keepdims=True).astype(np.float16).astype(F)
    assert np.all((y == 0) | (y == d) | (y == -d))
    assert np.all(y[2] == 0)
    # sign kept wherever a value was coded nonzero; |x| > d/2 is never coded 0
    xs = x.reshape(6, 3, 256)
    assert np.all(np.sign(y[y != 0]) == np.sign(xs[y != 0]))
    assert not np.any((y == 0) & (np.abs(xs) > 0.5001 * d))

"""Access to ggml's golden vectors (``../shared/data/golden/ggml_quants.*``) for the codec tests.

The test cases are a fixed list (type x input x with/without imatrix) so that they are collected
even without ``../shared``; each test then asks :func:`golden_case` for its entry, which skips (or,
under ``CI=true``, fails) through the ``shared_file`` fixture when the goldens are missing.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

GOLDEN_JSON = "data/golden/ggml_quants.json"
GOLDEN_TENSORS = "data/golden/ggml_quants.safetensors"
INPUTS = ("gaussian", "student_t", "special", "uniform", "rowscale_4096")


@dataclass(frozen=True)
class GoldenCase:
    type_name: str
    input: np.ndarray  # float32 (rows, n_per_row)
    imatrix: np.ndarray | None  # float32 (n_per_row,)
    output: np.ndarray  # uint8 (rows, row_bytes): ggml_quantize_chunk's bytes
    dequant: np.ndarray  # float32 (rows, n_per_row): to_float(output)
    imatrix_ignored: bool


@functools.cache
def _load(json_path: Path, tensors_path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with open(json_path) as f:
        meta = json.load(f)
    return meta, load_file(str(tensors_path))


def golden_case(
    shared_file: Callable[[str], Path], type_name: str, input_name: str, with_imatrix: bool
) -> GoldenCase:
    """The golden entry of ``type_name`` on ``input.<input_name>``; fails if the goldens lack it."""
    meta, tensors = _load(shared_file(GOLDEN_JSON), shared_file(GOLDEN_TENSORS))
    found = [
        e
        for e in meta["entries"]
        if e["type"] == type_name
        and e["input"] == f"input.{input_name}"
        and (e["imatrix"] is not None) == with_imatrix
    ]
    assert len(found) == 1, f"goldens have {len(found)} entries for {type_name} {input_name} {with_imatrix}"
    e = found[0]
    return GoldenCase(
        type_name=type_name,
        input=tensors[e["input"]],
        imatrix=tensors[e["imatrix"]] if e["imatrix"] else None,
        output=tensors[e["output"]],
        dequant=tensors[e["dequant"]],
        imatrix_ignored=bool(e["imatrix_ignored"]),
    )


def same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality of float32 arrays (distinguishes -0.0 from 0.0)."""
    return a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a, dtype=np.float32).view(np.uint32),
        np.ascontiguousarray(b, dtype=np.float32).view(np.uint32),
    )


def check_against_golden(
    shared_file: Callable[[str], Path], type_name: str, input_name: str, with_imatrix: bool
) -> None:
    """Assert that lowbit's codec of ``type_name`` reproduces ggml's golden entry exactly:
    quantize -> identical bytes; dequantize(golden bytes) -> identical floats, equal to gguf-py's."""
    from gguf import quants as gguf_quants

    from lowbit.formats.gguf.block import get_codec
    from lowbit.formats.gguf.types import ggml_type

    case = golden_case(shared_file, type_name, input_name, with_imatrix)
    codec = get_codec(type_name)
    n = case.input.shape[1]

    got = codec.quantize_rows(case.input, case.imatrix)
    assert got.dtype == np.uint8 and got.shape == case.output.shape
    bad = np.nonzero((got != case.output).any(axis=1))[0]
    assert bad.size == 0, (
        f"{type_name} {input_name} imatrix={with_imatrix}: rows {bad.tolist()} differ from ggml"
    )
    if case.imatrix is not None and case.imatrix_ignored:
        assert np.array_equal(codec.quantize_rows(case.input, None), case.output)

    deq = codec.dequantize_rows(case.output, n)
    assert same_floats(deq, case.dequant), (
        f"{type_name} {input_name}: dequantize differs from ggml's to_float"
    )
    ref = np.asarray(gguf_quants.dequantize(case.output, ggml_type(type_name)), dtype=np.float32)
    assert same_floats(deq, ref.reshape(deq.shape))

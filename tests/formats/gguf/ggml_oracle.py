"""ggml itself as the oracle of the codec tests: ``ggml_quantize_chunk`` from the reference build's
``libggml-base.so.0`` (through ctypes) on fresh random inputs, and scalar transcriptions of ggml's C.

The library is reached through the ``ggml_quantize`` fixture (``conftest.py`` next to this file),
which skips, or fails under ``CI=true``, when ``../shared`` is missing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import numpy as np

GGML_BASE = "tools/llama.cpp/lib/libggml-base.so.0"

GGMLQuantize = Callable[[str, np.ndarray, "np.ndarray | None"], np.ndarray]
"""``quantize(type_name, x (rows, n) float32, imatrix (n,) or None) -> uint8 (rows, row_bytes)``."""

FuzzCase = tuple[str, np.ndarray, "np.ndarray | None"]

GGMLToFloat = Callable[[str, np.ndarray, int], np.ndarray]
"""``to_float(type_name, data uint8 (rows, row_bytes), n_per_row) -> float32 (rows, n_per_row)``."""


def load_ggml_quantize(library: Path) -> GGMLQuantize:
    """``ggml_quantize_chunk(type, src, dst, 0, rows, n_per_row, imatrix)`` of ``library``."""
    from lowbit.formats.gguf import get_codec

    lib = ctypes.CDLL(str(library))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, i64, ptr]

    def quantize(type_name: str, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        codec = get_codec(type_name)
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], codec.row_bytes(x.shape[1])), dtype=np.uint8)
        im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        written = fn(
            int(codec.ggml_type), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
            None if im is None else im.ctypes.data,
        )  # fmt: skip
        assert written == out.size
        return out

    return quantize


class _TypeTraits(ctypes.Structure):
    """ggml.h's ``struct ggml_type_traits`` (the fields up to ``to_float`` are read)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def load_ggml_to_float(library: Path) -> GGMLToFloat:
    """``ggml_get_type_traits(type)->to_float`` of ``library`` (ggml's ``dequantize_row_*``)."""
    from lowbit.formats.gguf import get_codec

    lib = ctypes.CDLL(str(library))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    signature = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)

    def to_float(type_name: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
        codec = get_codec(type_name)
        traits = lib.ggml_get_type_traits(int(codec.ggml_type)).contents
        assert traits.type_name.decode().upper() == type_name and traits.type_size == codec.type_size
        data = np.ascontiguousarray(data, dtype=np.uint8)
        assert data.shape[1] == codec.row_bytes(n_per_row)
        out = np.empty((data.shape[0], n_per_row), dtype=np.float32)
        signature(traits.to_float)(data.ctypes.data, out.ctypes.data, out.size)
        return out

    return to_float


# Where each legacy / k-quant block keeps its fp16 scales (d, and the minimum's scale where there is one).
SCALE_OFFSETS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}  # fmt: skip

# fp16 scales that make NaN and Inf floats (and the edges of the finite ones): +-inf (inf * 0 is a
# NaN), quiet and signalling NaNs with payloads and either sign, the smallest subnormal, -0, the
# largest finite value.
SPECIAL_F16 = np.array(
    [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE55, 0x7D2A, 0x0001, 0x8000, 0x7BFF], dtype=np.uint16
)


def random_blocks(type_name: str, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """uint8 (rows, row_bytes) of random bytes (every byte pattern is a valid block), with each scale
    of half the blocks set to one of :data:`SPECIAL_F16`; in a quarter of the blocks of the types with a
    minimum, a non-finite ``d`` meets a NaN minimum over zero codes (a sum of two NaNs, whose
    payload depends on the order of the operands)."""
    from lowbit.formats.gguf import get_codec

    codec = get_codec(type_name)
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, blocks_per_row * codec.type_size), dtype=np.uint8)
    blocks = data.reshape(-1, codec.type_size)
    n_blocks = blocks.shape[0]
    for off in SCALE_OFFSETS[type_name]:
        pick = rng.random(n_blocks) < 0.5
        special = SPECIAL_F16[rng.integers(0, SPECIAL_F16.size, n_blocks)].view(np.uint8).reshape(-1, 2)
        blocks[pick, off : off + 2] = special[pick]
    if type_name in ("Q4_1", "Q5_1"):
        both = rng.random(n_blocks) < 0.25
        k = int(both.sum())
        inf_or_nan, nan = SPECIAL_F16[[0, 2, 4]], SPECIAL_F16[[2, 3, 4, 5]]
        blocks[both, 0:2] = inf_or_nan[rng.integers(0, 3, k)].view(np.uint8).reshape(-1, 2)
        blocks[both, 2:4] = nan[rng.integers(0, 4, k)].view(np.uint8).reshape(-1, 2)
        blocks[both, -16:] &= 0x0F  # codes 16..31 have no low bits: 0 (or 16 with Q5_1's fifth bit)
    return data


def fuzz_inputs(seed: int, n: int = 512) -> list[FuzzCase]:
    """42 tensors (3, n) float32 the goldens do not cover, each with an importance vector or None.

    Scales 1e-30 .. 1e30, each with: gaussian, values on a code grid and half-way between (exact
    ties), sparse rows (90 % zeros, signed: ``-0.0`` where the gaussian was negative), all positive,
    all negative, outliers. The importance vectors: None, exp(N(0, 1)), a huge range with 20 % zeros,
    or tiny (products underflow to signed zeros).
    """
    rng = np.random.default_rng(seed)
    cases: list[FuzzCase] = []
    for scale in (1e-30, 1e-7, 3e-5, 1.0, 7e4, 1e30):
        g = rng.normal(0, scale, (3, n))
        grid = rng.integers(-8, 8, (3, n)) * scale / 8
        half = (rng.integers(-16, 16, (3, n)) + 0.5) * scale / 16
        sparse = g * (rng.random((3, n)) < 0.1)
        skew = np.abs(g) + scale * 0.01
        outl = g.copy()
        outl[:, rng.integers(0, n, 4)] *= 300
        for name, x in (("gauss", g), ("grid", grid), ("half", half), ("sparse", sparse),
                        ("positive", skew), ("negative", -skew), ("outliers", outl)):  # fmt: skip
            imatrix = None
            k = rng.integers(0, 4)
            if k == 1:
                imatrix = np.exp(rng.normal(0, 1, n))
            elif k == 2:
                imatrix = np.exp(rng.normal(0, 4, n)) * (rng.random(n) > 0.2)
            elif k == 3:
                imatrix = rng.random(n) * 1e-20
            im = None if imatrix is None else imatrix.astype(np.float32)
            cases.append((f"{name} {scale:g}", x.astype(np.float32), im))
    return cases


def sparse_signed_zero_inputs(seed: int, count: int, n: int = 256) -> list[FuzzCase]:
    """``count`` tensors (4, n) of 90 % signed zeros, each with a positive importance vector: the
    blocks whose minimum is a zero, where ggml keeps the sign of the first zero."""
    rng = np.random.default_rng(seed)
    cases: list[FuzzCase] = []
    for i in range(count):
        x = rng.normal(0, 0.02, (4, n)) * (rng.random((4, n)) < 0.1)
        imatrix = np.exp(rng.normal(0, 1, n)).astype(np.float32)
        cases.append((f"signed zeros #{i}", x.astype(np.float32), imatrix))
    return cases


def first_difference(got: np.ndarray, want: np.ndarray) -> str:
    bad = np.argwhere(got != want)
    row, byte = (int(v) for v in bad[0])
    rows = sorted({int(r) for r in bad[:, 0]})
    return f"first difference at row {row} byte {byte}: ours {got[row, byte]} ggml {want[row, byte]}; rows {rows}"


def assert_matches_libggml(
    ggml_quantize: GGMLQuantize, type_name: str, cases: list[FuzzCase], both: bool = True
) -> None:
    """Quantize every case with lowbit and with ggml, with its importance vector and (``both``) also
    without; fail listing how many differ and where the first one does."""
    from lowbit.formats.gguf import get_codec

    codec = get_codec(type_name)
    failures: list[str] = []
    runs = 0
    for label, x, imatrix in cases:
        variants = [imatrix]
        if both and imatrix is not None:
            variants.insert(0, None)
        for im in variants:
            runs += 1
            want = ggml_quantize(type_name, x, im)
            got = codec.quantize_rows(x, im)
            if not np.array_equal(got, want):
                failures.append(f"{label} imatrix={im is not None}: {first_difference(got, want)}")
    assert not failures, f"{type_name}: {len(failures)} of {runs} tensors differ from ggml; " + "; ".join(
        failures[:3]
    )


def c_nearest_int(v: float) -> int:
    """ggml's scalar ``nearest_int``: one float32 add of 1.5 * 2**23 and a bit reinterpretation."""
    s = np.array([np.float32(v) + np.float32(12582912.0)], dtype=np.float32)
    return (int(s.view(np.int32)[0]) & 0x007FFFFF) - 0x00400000

"""llama.cpp's conversion of a matmul's input (``lowbit.formats.gguf.dot_input``) against ggml's CPU backend.

The oracle is the reference build's CPU backend itself (``libggml-cpu-haswell.so``, AVX2): its
``ggml_get_type_traits_cpu`` says which type each weight type's input is converted to, and that type's
``from_float`` is the converter the runtime calls; the bytes it writes, dequantized as ggml's dot products
read them, must equal :meth:`GGMLDotInput.fake_quantize` bit for bit.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.errors import SchemeError
from lowbit.formats.gguf.dot_input import GGMLDotInput, vec_dot_type
from lowbit.formats.gguf.types import GGMLType

CPU_LIB = "tools/llama.cpp/bin/libggml-cpu-haswell.so"

#: weight types whose input conversion is checked against ggml's table
WEIGHT_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
    "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ3_S", "TQ1_0", "TQ2_0",
)  # fmt: skip


class _TraitsCPU(ctypes.Structure):
    """ggml-cpu.h's ``struct ggml_type_traits_cpu``."""

    _fields_ = [
        ("from_float", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
    ]


FromFloat = Callable[[np.ndarray], np.ndarray]


class GGMLCPU:
    """The CPU backend's type table and input converters, through ctypes."""

    def __init__(self, library: Path) -> None:
        ctypes.CDLL(str(library.parent.parent / "lib" / "libggml-base.so.0"), mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(str(library))
        self.lib.ggml_cpu_init.restype = None
        self.lib.ggml_cpu_init()
        self.lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TraitsCPU)
        self.lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]

    def traits(self, t: GGMLType) -> _TraitsCPU:
        return self.lib.ggml_get_type_traits_cpu(int(t)).contents

    def from_float(self, t: GGMLType, x: np.ndarray, row_bytes: int) -> np.ndarray:
        """``from_float`` of type ``t`` on each row of ``x`` (float32): the raw bytes per row."""
        fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(
            self.traits(t).from_float
        )
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], row_bytes), dtype=np.uint8)
        for r in range(x.shape[0]):
            fn(x[r].ctypes.data, out[r].ctypes.data, x.shape[1])
        return out


@pytest.fixture(scope="module")
def ggml_cpu(shared_file: Callable[[str], Path]) -> GGMLCPU:
    return GGMLCPU(shared_file(CPU_LIB))


def _inputs(n: int, seed: int) -> np.ndarray:
    """Rows like a transformer's linear inputs: heavy-tailed, a few outliers, an all-zero block, a row of
    ties for Q8_0 (multiples of absmax/127 plus one half) and a constant row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4, size=(6, n)).astype(np.float32)
    x[1, ::97] *= 40
    x[2, :256] = 0
    x[3] = (rng.integers(-127, 128, n) + 0.5).astype(np.float32) / 127
    x[3, ::32] = 1.0
    x[4] = 0.25
    x[5] *= np.float32(1e-3)
    return x


def _dequantize(t: GGMLType, raw: np.ndarray, n: int) -> np.ndarray:
    """The input as ggml's dot products read it: ``d * q`` per block (Q8_0/Q8_1: fp16 ``d``; Q8_K: f32)."""
    rows = raw.shape[0]
    if t == GGMLType.Q8_K:
        b = raw.reshape(rows, n // 256, 4 + 256 + 32)
        d = b[..., :4].copy().view(np.float32)
        q = b[..., 4:260].copy().view(np.int8).astype(np.float32)
    else:
        head = 2 if t == GGMLType.Q8_0 else 4  # Q8_1: d and s, both fp16
        b = raw.reshape(rows, n // 32, head + 32)
        d = b[..., :2].copy().view(np.float16).astype(np.float32)
        q = b[..., head:].copy().view(np.int8).astype(np.float32)
    return (q * d).reshape(rows, n)


@pytest.mark.shared
@pytest.mark.parametrize("name", WEIGHT_TYPES)
def test_input_types_are_ggml_cpus(ggml_cpu: GGMLCPU, name: str) -> None:
    t = GGMLType[name]
    assert vec_dot_type(t) == GGMLType(ggml_cpu.traits(t).vec_dot_type)


@pytest.mark.shared
@pytest.mark.parametrize(("weight", "row_bytes_per_block"), [("Q4_0", 34), ("Q4_1", 36), ("Q4_K", 292)])
def test_8_bit_inputs_equal_ggml_cpus_bit_for_bit(
    ggml_cpu: GGMLCPU, weight: str, row_bytes_per_block: int
) -> None:
    spec = GGMLDotInput.for_weight(weight)
    it = spec.input_type
    n = 1024
    x = _inputs(n, seed=int(it))
    bs = 256 if it == GGMLType.Q8_K else 32
    raw = ggml_cpu.from_float(it, x, n // bs * row_bytes_per_block)
    want = _dequantize(it, raw, n)
    got = spec.fake_quantize(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, x)


@pytest.mark.shared
@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_16_bit_inputs_equal_ggml_cpus(ggml_cpu: GGMLCPU, name: str) -> None:
    t = GGMLType[name]
    x = _inputs(512, seed=7)
    raw = ggml_cpu.from_float(t, x, 2 * 512)
    if t == GGMLType.F16:
        want = raw.view(np.float16).astype(np.float32)
    else:
        want = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    got = GGMLDotInput.for_weight(t).fake_quantize(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, want.reshape(x.shape))


def test_properties_without_the_oracle() -> None:
    """What holds whatever the build: codes on the grid, the extreme kept, F32 untouched, a batch of
    rows converted row by row, bad widths refused."""
    x = torch.from_numpy(_inputs(512, seed=3)).reshape(2, 3, 512)
    # Q8_K's scale is a float32; Q8_0's is rounded to fp16 after the codes are chosen, which moves each
    # element by up to 127 codes x the scale's rounding (2^-11 relative, 2^-25 absolute below fp16's
    # normal range) on top of half a step
    for weight, bs in (("Q4_K", 256), ("Q5_0", 32)):
        y = GGMLDotInput.for_weight(weight).fake_quantize(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        blocks, yb = x.reshape(-1, bs), y.reshape(-1, bs)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        d_err = d * 1e-6 if bs == 256 else torch.maximum(d * 2.0**-11, torch.full_like(d, 2.0**-25))
        assert torch.all((yb - blocks).abs() <= 0.5 * d + 127 * d_err + 1e-12)
        flat = GGMLDotInput.for_weight(weight).fake_quantize(x.reshape(6, 512))
        assert torch.equal(flat.reshape(x.shape), y)
    f32 = GGMLDotInput.for_weight("F32")
    assert not f32.changes_input and f32.fake_quantize(x) is x
    with pytest.raises(SchemeError, match="multiple of 256"):
        GGMLDotInput.for_weight("Q6_K").fake_quantize(torch.ones(3, 96))
    with pytest.raises(SchemeError, match="I32"):
        vec_dot_type("I32")

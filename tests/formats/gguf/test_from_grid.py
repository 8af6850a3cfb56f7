"""A weight already on an integer grid (a GPTQ/AWQ/compressed-tensors checkpoint) held by a ggml block
type without rounding twice: :meth:`lowbit.formats.ggml.GGMLCodec.from_grid`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.formats.affine import AffineCodec
from lowbit.formats.base import PER_CHANNEL, ElementGrid, group
from lowbit.formats.ggml import GGMLCodec, GGMLQuantized


def _weight(out_f: int = 24, in_f: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[3, 17] = 0.4  # an outlier
    w[5, :32] = 0.0  # an all-zero group
    return w


def _grid(bits: int, symmetric: bool, block: object, dtype: torch.dtype = torch.float16) -> tuple:
    codec = AffineCodec(bits, symmetric, block, scale_dtype=dtype)  # type: ignore[arg-type]
    q = codec.quantize(_weight())
    return codec.element_grid(q), codec.dequantize(q)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
@pytest.mark.parametrize("block", [group(32), group(128), PER_CHANNEL], ids=["g32", "g128", "per-channel"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_symmetric_grids_are_exact_in_every_legacy_type(type_name: str, block: object, bits: int) -> None:
    """Symmetric int2..4 with groups of a multiple of 32 (or one per row): the legacy types' levels hold
    the codes, their fp16 scale holds the fp16 scale, and Q4_1/Q5_1's min ``-s·k`` is an fp16 too."""
    grid, want = _grid(bits, True, block)
    codec = GGMLCodec(type_name)
    q = codec.from_grid(grid)
    assert isinstance(q, GGMLQuantized) and q.type.name == type_name
    assert torch.equal(codec.dequantize(q), want)


def test_int5_and_int8_grids() -> None:
    grid5, want5 = _grid(5, True, group(64))
    for t in ("Q5_0", "Q5_1", "Q8_0"):
        q = GGMLCodec(t).from_grid(grid5)
        assert q is not None and torch.equal(GGMLCodec(t).dequantize(q), want5), t
    assert GGMLCodec("Q4_0").from_grid(grid5) is None  # 32 levels do not fit in 16
    grid8, want8 = _grid(8, True, PER_CHANNEL)
    q8 = GGMLCodec("Q8_0").from_grid(grid8)
    assert q8 is not None and torch.equal(GGMLCodec("Q8_0").dequantize(q8), want8)
    assert GGMLCodec("Q5_0").from_grid(grid8) is None


def test_asymmetric_grids_keep_codes_and_scales() -> None:
    """AWQ / asymmetric GPTQ int4 g32: Q4_0 has no offset and its 16 levels cannot hold ``q - z`` for
    every zero point; Q5_0's 32 levels can (``s·(q - z)``, ``q - z`` in -15..15): exact. In Q4_1 the
    codes and scales are kept and only the min ``-s·z`` is rounded to fp16 (half an fp16 ulp of it at
    most); in Q5_1 a shift of the codes by ``16 - z`` makes the min ``-16 s``, which fp16 holds: exact."""
    grid, want = _grid(4, False, group(32))
    assert GGMLCodec("Q4_0").from_grid(grid) is None
    q50 = GGMLCodec("Q5_0").from_grid(grid)
    assert q50 is not None and torch.equal(GGMLCodec("Q5_0").dequantize(q50), want)
    q41 = GGMLCodec("Q4_1").from_grid(grid)
    assert q41 is not None
    got = GGMLCodec("Q4_1").dequantize(q41)
    offset = grid.offset.abs()
    ulp = torch.from_numpy(np.spacing(offset.numpy().astype(np.float16)).astype(np.float32))
    assert bool(((got - want).abs() <= ulp / 2 + 1e-12).all())
    assert not torch.equal(got, want)  # most s·z are not fp16 values: this is not exact
    # ggml's Q4_1 quantizer finds the same grid again in blocks whose codes span 0..15 (min and max
    # are then -s·z and s·(15 - z)), not in the others: never less error than keeping the grid
    requant = GGMLCodec("Q4_1").fake_quantize(want)
    assert float((got - want).pow(2).sum()) <= float((requant - want).pow(2).sum())
    grid0, want0 = _grid(4, True, group(32))  # a symmetric grid, no code at +7 in many blocks
    q0 = GGMLCodec("Q4_0").from_grid(grid0)
    assert q0 is not None and torch.equal(GGMLCodec("Q4_0").dequantize(q0), want0)
    assert not torch.equal(GGMLCodec("Q4_0").fake_quantize(want0), want0)  # requantizing rounds twice
    q51 = GGMLCodec("Q5_1").from_grid(grid)
    assert q51 is not None and torch.equal(GGMLCodec("Q5_1").dequantize(q51), want)


def test_grids_the_types_cannot_hold() -> None:
    grid16, _ = _grid(4, True, group(16))  # two scales in one block of 32
    assert GGMLCodec("Q4_0").from_grid(grid16) is None
    grid, _ = _grid(4, True, group(32))
    for t in ("Q4_K", "Q6_K", "Q2_K", "IQ4_NL", "IQ4_XS"):  # scales as codes of a super-block's fp16
        assert GGMLCodec(t).from_grid(grid) is None, t
    odd = ElementGrid(grid.scale[:, :100], grid.offset[:, :100], grid.levels, grid.codes[:, :100])
    assert GGMLCodec("Q4_0").from_grid(odd) is None  # rows that are not whole blocks
    frac = ElementGrid(grid.scale, grid.offset, grid.levels + 0.5, grid.codes)
    assert GGMLCodec("Q4_0").from_grid(frac) is None  # levels that are not integers
    huge = ElementGrid(grid.scale * 1e6, grid.offset, grid.levels, grid.codes)
    assert GGMLCodec("Q4_0").from_grid(huge) is None  # scales fp16 cannot hold


def test_bf16_scales_fp16_holds_are_exact() -> None:
    grid, want = _grid(4, True, group(64), dtype=torch.bfloat16)
    q = GGMLCodec("Q4_0").from_grid(grid)
    assert q is not None and torch.equal(GGMLCodec("Q4_0").dequantize(q), want)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_a_ggml_result_through_its_grid_gives_its_bytes(type_name: str) -> None:
    """from_grid inverts element_grid for the legacy types: ggml's own bytes, all-zero blocks included."""
    codec = GGMLCodec(type_name)
    q = codec.quantize(_weight(seed=3))
    back = codec.from_grid(codec.element_grid(q))
    assert back is not None and np.array_equal(back.data, q.data)

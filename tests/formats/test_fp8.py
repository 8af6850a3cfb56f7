"""FP8 e4m3/e5m2 codecs: exact on-grid round trips, scale shapes, error bounds, SQNR, storage cost, and
bit-exactness with compressed-tensors' FP8 quantizer."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import NonFiniteWeightError, SchemeError, ShapeError
from lowbit.formats.base import PER_CHANNEL, PER_TENSOR, Block, group, sqnr_db
from lowbit.formats.fp8 import Fp8Codec, Fp8Format

E4M3, E5M2 = Fp8Format.E4M3, Fp8Format.E5M2


def _finite_grid(fmt: Fp8Format) -> torch.Tensor:
    """Every finite value of the format, as float32 (256 bit patterns less NaN/Inf)."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt.dtype).float()
    return values[torch.isfinite(values)]


def test_format_constants() -> None:
    assert E4M3.max == 448.0 and E4M3.dtype == torch.float8_e4m3fn
    assert E5M2.max == 57344.0 and E5M2.dtype == torch.float8_e5m2
    assert _finite_grid(E4M3).numel() == 254  # e4m3fn: no infinities, two NaNs
    assert _finite_grid(E5M2).numel() == 248  # e5m2: two infinities, six NaNs


@pytest.mark.parametrize("fmt", list(Fp8Format))
def test_every_grid_value_round_trips_exactly(fmt: Fp8Format) -> None:
    grid = _finite_grid(fmt)  # includes +-max, so the per-tensor scale is exactly 1
    codec = Fp8Codec(fmt, PER_TENSOR)
    q = codec.quantize(grid)
    assert q.scales.item() == 1.0
    assert torch.equal(codec.dequantize(q), grid)
    assert torch.equal(q.codes.float().reshape(-1), grid)


@pytest.mark.parametrize("fmt", list(Fp8Format))
def test_scaled_grid_values_round_trip_exactly_per_channel(fmt: Fp8Format) -> None:
    g = torch.Generator().manual_seed(0)
    grid = _finite_grid(fmt)
    rows = grid[torch.randint(0, grid.numel(), (16, 300), generator=g)]
    rows[:, 7] = fmt.max  # every row reaches the format's max -> scale = 2**k exactly
    powers = 2.0 ** torch.randint(-20, 4, (16, 1), generator=g).float()
    w = rows * powers
    codec = Fp8Codec(fmt, PER_CHANNEL)
    q = codec.quantize(w)
    assert torch.equal(q.scales, powers)
    assert torch.equal(codec.dequantize(q), w)


def test_scale_shapes_follow_the_block() -> None:
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    assert Fp8Codec(block=PER_CHANNEL).quantize(w).scales.shape == (300, 1)
    assert Fp8Codec(block=PER_TENSOR).quantize(w).scales.shape == (1, 1)
    q = Fp8Codec(block=Block(128, 128)).quantize(w)
    assert q.scales.shape == (3, 2)  # ragged edge blocks counted
    assert q.scales[2, 1].item() == (w[256:, 128:].abs().max() / 448).item()
    for q in (Fp8Codec(E5M2, PER_CHANNEL).quantize(w), Fp8Codec(E4M3, group(64)).quantize(w)):
        assert q.scales.dtype == torch.float32
    assert Fp8Codec(E5M2).quantize(w).codes.dtype == torch.float8_e5m2
    assert Fp8Codec(E4M3).quantize(w).codes.shape == (300, 200)


@pytest.mark.parametrize("fmt", list(Fp8Format))
@pytest.mark.parametrize("block", [PER_TENSOR, PER_CHANNEL, Block(16, 32)], ids=lambda b: b.label)
def test_scale_is_absmax_over_fp8_max_and_the_max_is_exact(fmt: Fp8Format, block: Block) -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(2)) * 3
    codec = Fp8Codec(fmt, block)
    q = codec.quantize(w)
    out = codec.dequantize(q)
    r, c = block.resolve((64, 96))
    for i in range(q.scales.shape[0]):
        for j in range(q.scales.shape[1]):
            tile = w[i * r : (i + 1) * r, j * c : (j + 1) * c]
            assert q.scales[i, j].item() == (tile.abs().max() / fmt.max).item()
            # The block's absmax maps to the format's max and comes back to within float32 rounding.
            k = tile.abs().argmax()
            top = tile.reshape(-1)[k]
            assert (
                out[i * r : (i + 1) * r, j * c : (j + 1) * c].reshape(-1)[k] - top
            ).abs() <= 1e-6 * top.abs()


@pytest.mark.parametrize(("fmt", "mantissa_bits"), [(E4M3, 3), (E5M2, 2)])
def test_relative_error_bound(fmt: Fp8Format, mantissa_bits: int) -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    codec = Fp8Codec(fmt, PER_CHANNEL)
    q = codec.quantize(w)
    err = (w - codec.dequantize(q)).abs()
    # Half an ulp: relative 2**-(m+1) for normal values, half the smallest subnormal step below them.
    smallest_subnormal = torch.finfo(fmt.dtype).smallest_normal * 2.0**-mantissa_bits
    bound = (w.abs() * 2.0 ** -(mantissa_bits + 1) + q.scales * smallest_subnormal / 2) * (1 + 1e-5)
    assert bool((err <= bound).all())


def test_sqnr_bands_on_gaussian() -> None:
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(4))
    e4m3 = sqnr_db(w, Fp8Codec(E4M3).fake_quantize(w))
    e5m2 = sqnr_db(w, Fp8Codec(E5M2).fake_quantize(w))
    # Floating point: SQNR set by the mantissa (~6 dB per bit), nearly independent of the scale.
    assert 30.5 < e4m3 < 32.5
    assert 24.5 < e5m2 < 26.5
    assert 5.0 < e4m3 - e5m2 < 7.0
    per_tensor = sqnr_db(w, Fp8Codec(E4M3, PER_TENSOR).fake_quantize(w))
    assert abs(per_tensor - e4m3) < 0.2


def test_all_zero_rows_get_eps_scale() -> None:
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    w[2] = 0.0
    codec = Fp8Codec(E4M3, PER_CHANNEL)
    q = codec.quantize(w)
    assert q.scales[2].item() == torch.finfo(torch.float32).eps
    out = codec.dequantize(q)
    assert torch.equal(out[2], torch.zeros(64)) and bool(torch.isfinite(out).all())


def test_storage_bits_exact() -> None:
    shape = (4096, 4096)
    assert Fp8Codec(E4M3, PER_CHANNEL).bits_per_weight(shape) == 8 + 32 / 4096
    assert Fp8Codec(E5M2, PER_TENSOR).storage_bits(shape) == 8 * 4096 * 4096 + 32
    assert Fp8Codec(E4M3, Block(128, 128)).storage_bits((300, 200)) == 8 * 300 * 200 + 32 * 3 * 2
    assert Fp8Codec(E4M3, PER_CHANNEL).storage_bits((100,)) == 800 + 32


def test_names_and_errors() -> None:
    assert Fp8Codec().name == "fp8-e4m3 per-channel"
    assert Fp8Codec(E5M2, PER_TENSOR).name == "fp8-e5m2 per-tensor"
    with pytest.raises(SchemeError):
        Fp8Codec("e4m3")  # type: ignore[arg-type]
    with pytest.raises(SchemeError):
        Fp8Codec(block=group(0))
    w = torch.randn(4, 8)
    w[1, 1] = float("inf")
    with pytest.raises(NonFiniteWeightError):
        Fp8Codec().quantize(w)
    with pytest.raises(ShapeError):
        Fp8Codec().quantize(torch.zeros(2, 2, 2))
    with pytest.raises(ShapeError):
        Fp8Codec().quantize(torch.zeros(2, 2, dtype=torch.int8))


def test_half_precision_input() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    codec = Fp8Codec()
    assert torch.equal(
        codec.quantize(w).codes.view(torch.uint8), codec.quantize(w.float()).codes.view(torch.uint8)
    )
    assert codec.fake_quantize(w).dtype == torch.bfloat16


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_bit_exact_with_compressed_tensors(strategy: str) -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    g = torch.Generator().manual_seed(7)
    w = torch.randn(96, 200, generator=g) * torch.exp(torch.randn(96, 1, generator=g))
    w[5] = 0.0
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)
    if strategy == "channel":
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    else:
        lo, hi = w.amin(), w.amax()
    scale, zero = calculate_qparams(lo, hi, args)
    ct_codes = quantize(w, scale, zero, args, dtype=torch.float8_e4m3fn)
    ct_out = dequantize(ct_codes, scale, zero, args, dtype=torch.float32)

    codec = Fp8Codec(E4M3, PER_CHANNEL if strategy == "channel" else PER_TENSOR)
    q = codec.quantize(w)
    assert torch.equal(q.scales.reshape(scale.shape), scale)
    assert torch.equal(q.codes.view(torch.uint8), ct_codes.view(torch.uint8))
    assert torch.equal(codec.dequantize(q), ct_out)

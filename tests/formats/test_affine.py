"""AffineCodec: error bounds, code ranges, granularity, ragged groups, exact zeros, storage cost."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowbit.errors import NonFiniteWeightError, SchemeError, ShapeError
from lowbit.formats.affine import AffineCodec, AffineQuantized
from lowbit.formats.base import PER_CHANNEL, PER_TENSOR, Block, group, sqnr_db


def _gauss(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Rows of different magnitudes, so per-tensor and per-channel scales differ.
    return torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))


def _expanded(q: AffineQuantized, codec: AffineCodec) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = q.codes.shape
    s = codec._expand(q.scales, (rows, cols)).float()
    z = torch.zeros_like(s) if q.zeros is None else codec._expand(q.zeros, (rows, cols)).float()
    return s, z


BLOCKS = [PER_TENSOR, PER_CHANNEL, group(32), group(100), Block(3, 48)]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.label)
def test_round_trip_error_is_at_most_half_a_step(bits: int, symmetric: bool, block: Block) -> None:
    w = _gauss(12, 200, seed=bits)
    codec = AffineCodec(bits, symmetric, block)
    q = codec.quantize(w)
    s, z = _expanded(q, codec)
    err = (w - codec.dequantize(q)).abs()
    # Elements the scale's rounding to fp16 pushed past the last code are clipped: off by at most a step.
    pos = w / s + z
    clipped = (pos > codec.qmax + 0.5) | (pos < codec.qmin - 0.5)
    tol = 1e-6 * s
    assert bool((err[~clipped] <= s[~clipped] / 2 + tol[~clipped]).all())
    assert bool((err <= s + tol).all())
    if symmetric:
        # Only the positive extreme is clipped (the grid has one more negative code than positive).
        assert bool((w[clipped] > 0).all())
        assert bool((q.codes[clipped] == codec.qmax).all())


def test_symmetric_positive_extreme_is_clipped_by_half_a_step() -> None:
    w = torch.tensor([[-7.5, 2.0, 7.5]])  # absmax 7.5: the scale is exactly 1
    codec = AffineCodec(4, True, PER_CHANNEL)
    q = codec.quantize(w)
    assert q.scales.item() == 1.0
    assert q.codes.tolist() == [[-8, 2, 7]]  # -7.5 -> -8 (half to even); 7.5 -> 8 -> clipped to 7
    assert codec.dequantize(q).tolist() == [[-8.0, 2.0, 7.0]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_and_zero_points_within_range(bits: int, symmetric: bool) -> None:
    w = _gauss(16, 256, seed=1) + (0.0 if symmetric else 0.7)  # asym: lopsided ranges
    codec = AffineCodec(bits, symmetric, group(64))
    q = codec.quantize(w)
    assert q.codes.dtype == torch.int16
    assert int(q.codes.min()) >= codec.qmin and int(q.codes.max()) <= codec.qmax
    if symmetric:
        assert q.zeros is None
        assert int(q.codes.min()) == -(1 << (bits - 1))  # the negative extreme is reached
    else:
        assert q.zeros is not None and q.zeros.dtype == torch.int16
        assert int(q.zeros.min()) >= 0 and int(q.zeros.max()) <= (1 << bits) - 1
        assert int(q.codes.min()) == 0 and int(q.codes.max()) == (1 << bits) - 1


@pytest.mark.parametrize("symmetric", [True, False])
def test_ragged_last_group_has_its_own_scale(symmetric: bool) -> None:
    w = _gauss(8, 576, seed=2)
    w[:, 512:] *= 0.01  # the last 64 columns are much smaller than the rest
    codec = AffineCodec(4, symmetric, group(128))
    q = codec.quantize(w)
    assert codec.block.grid((8, 576)) == (8, 5)
    assert q.scales.shape == (8, 5)
    tail_scales, tail_zeros = AffineCodec(4, symmetric, PER_CHANNEL).choose_qparams(w[:, 512:])
    assert torch.equal(q.scales[:, 4:], tail_scales)
    if not symmetric:
        assert q.zeros is not None and tail_zeros is not None
        assert torch.equal(q.zeros[:, 4:], tail_zeros)
    # And the small tail is quantized as finely as its own range allows.
    err = (w - codec.dequantize(q))[:, 512:].abs()
    assert bool((err <= q.scales[:, 4:].float()).all())


@pytest.mark.parametrize("block", BLOCKS + [Block(5, None), Block(None, 64)], ids=lambda b: b.label)
def test_scales_match_a_loop_over_blocks(block: Block) -> None:
    w = _gauss(12, 200, seed=3)
    for symmetric in (True, False):
        codec = AffineCodec(4, symmetric, block, scale_dtype=torch.float32)
        q = codec.quantize(w)
        r, c = block.resolve((12, 200))
        gr, gc = block.grid((12, 200))
        assert q.scales.shape == (gr, gc)
        for i, j in itertools.product(range(gr), range(gc)):
            tile = w[i * r : (i + 1) * r, j * c : (j + 1) * c]
            if symmetric:
                expected = tile.abs().max() / 7.5
            else:
                expected = (tile.max().clamp(min=0) - tile.min().clamp(max=0)) / 15
            assert q.scales[i, j].item() == pytest.approx(expected.item(), rel=1e-6)


def test_granularity_labels_and_shapes() -> None:
    w = _gauss(6, 40, seed=4)
    assert AffineCodec(block=PER_TENSOR).quantize(w).scales.shape == (1, 1)
    assert AffineCodec(block=PER_CHANNEL).quantize(w).scales.shape == (6, 1)
    assert AffineCodec(block=group(16)).quantize(w).scales.shape == (6, 3)
    assert AffineCodec(4, True, group(128)).name == "int4-sym group 128"
    assert AffineCodec(3, False, PER_TENSOR).name == "int3-asym per-tensor"


@pytest.mark.parametrize("symmetric", [True, False])
def test_exact_zeros_stay_exact(symmetric: bool) -> None:
    w = _gauss(16, 128, seed=5) + 0.3
    w[torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.2] = 0.0
    codec = AffineCodec(3, symmetric, group(32))
    out = codec.dequantize(codec.quantize(w))
    assert bool((out[w == 0] == 0).all())


def test_asymmetric_all_positive_block_still_represents_zero() -> None:
    w = torch.tensor([[0.5, 0.75, 1.0, 0.0, 0.6, 0.9, 0.8, 0.7]])
    codec = AffineCodec(4, False, PER_CHANNEL)
    q = codec.quantize(w)
    assert q.zeros is not None and q.zeros.item() == 0
    assert codec.dequantize(q)[0, 3].item() == 0.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_rows(symmetric: bool) -> None:
    w = _gauss(4, 64, seed=6)
    w[1] = 0.0
    codec = AffineCodec(4, symmetric, PER_CHANNEL)
    q = codec.quantize(w)
    out = codec.dequantize(q)
    assert torch.equal(out[1], torch.zeros(64))
    assert q.scales[1].item() == 1.0
    z = 0 if q.zeros is None else int(q.zeros[1])
    assert bool((q.codes[1] == z).all())
    assert bool(torch.isfinite(out).all())
    # The other rows are untouched by the zero row.
    assert (w[0] - out[0]).abs().max() <= q.scales[0].float() / 2 + 1e-6


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_raise(bad: float) -> None:
    w = _gauss(4, 32)
    w[2, 5] = bad
    with pytest.raises(NonFiniteWeightError):
        AffineCodec().quantize(w)


def test_bad_configs_and_shapes_raise() -> None:
    with pytest.raises(SchemeError):
        AffineCodec(bits=1)
    with pytest.raises(SchemeError):
        AffineCodec(bits=9)
    with pytest.raises(SchemeError):
        AffineCodec(scale_dtype=torch.int8)
    with pytest.raises(SchemeError):
        AffineCodec(block=group(0))
    with pytest.raises(ShapeError):
        AffineCodec().quantize(torch.zeros(2, 3, 4))
    with pytest.raises(ShapeError):
        AffineCodec().quantize(torch.zeros(2, 3, dtype=torch.int32))


def test_bits_per_weight_exact() -> None:
    shape = (4096, 4096)
    assert AffineCodec(4, True, group(128)).bits_per_weight(shape) == 4.125
    assert AffineCodec(4, False, group(128)).bits_per_weight(shape) == 4 + 20 / 128
    assert AffineCodec(8, True, PER_CHANNEL).bits_per_weight(shape) == 8 + 16 / 4096
    assert AffineCodec(4, True, PER_TENSOR, torch.float32).storage_bits(shape) == 4 * 4096 * 4096 + 32
    assert AffineCodec(3, False, group(64), torch.bfloat16).storage_bits((2, 128)) == 2 * 128 * 3 + 4 * (
        16 + 3
    )
    # Ragged: 576 columns in groups of 128 -> 5 groups per row.
    assert AffineCodec(4, True, group(128)).storage_bits((8, 576)) == 8 * 576 * 4 + 8 * 5 * 16
    assert AffineCodec(4, True, group(128)).storage_bits((576,)) == 576 * 4 + 5 * 16


def test_sqnr_of_4bit_g128_on_gaussian() -> None:
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(7))
    sqnr = {b: sqnr_db(w, AffineCodec(b, True, group(128)).fake_quantize(w)) for b in range(3, 9)}
    # Step = absmax / 7.5 with absmax of 128 Gaussians ~ 2.8 sigma: noise step^2 / 12 -> ~19.3 dB.
    assert 18.0 < sqnr[4] < 20.5
    for b in range(3, 8):  # ~6.02 dB per bit
        assert 5.7 < sqnr[b + 1] - sqnr[b] < 6.8
    asym = sqnr_db(w, AffineCodec(4, False, group(128)).fake_quantize(w))
    assert sqnr[4] < asym < sqnr[4] + 1.5  # one extra level used on each side


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_is_exactly_codes_times_stored_scales(scale_dtype: torch.dtype, symmetric: bool) -> None:
    w = _gauss(8, 96, seed=8).to(torch.bfloat16)
    codec = AffineCodec(4, symmetric, group(32), scale_dtype)
    q = codec.quantize(w)
    assert q.scales.dtype == scale_dtype
    s = q.scales.float().repeat_interleave(32, dim=1)
    z = 0.0 if q.zeros is None else q.zeros.float().repeat_interleave(32, dim=1)
    assert torch.equal(codec.dequantize(q), (q.codes.float() - z) * s)
    assert codec.fake_quantize(w).dtype == torch.bfloat16


def test_quantize_with_accepts_expanded_parameters() -> None:
    w = _gauss(4, 64, seed=9)
    codec = AffineCodec(4, False, group(16))
    s, z = codec.choose_qparams(w)
    assert z is not None
    grid = codec.quantize_with(w, s, z)
    full = codec.quantize_with(w, codec._expand(s, w.shape), codec._expand(z, w.shape))
    assert torch.equal(grid, full)


def test_one_dimensional_weights() -> None:
    w = torch.randn(300, generator=torch.Generator().manual_seed(10))
    codec = AffineCodec(4, True, group(128))
    q = codec.quantize(w)
    assert q.codes.shape == (1, 300) and q.scales.shape == (1, 3)
    assert codec.dequantize(q).shape == (300,)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [PER_CHANNEL, group(32), group(48)], ids=lambda b: b.label)
def test_clipping_search_never_loses_to_min_max(symmetric: bool, block: Block) -> None:
    """The range shrunk per block where that lowers the importance-weighted squared error: never more
    error than min-max in any block, less in most (heavy tails), min-max itself when nothing matters."""
    from lowbit.formats.affine import block_sum

    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, 100, generator=g) * torch.exp(torch.randn(16, 1, generator=g))
    w[2, 5] *= 8  # an outlier: clipping it pays where its column matters little
    imp = torch.exp(torch.randn(100, generator=g))
    codec = AffineCodec(3, symmetric, block)

    def err(s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        deq = codec.dequantize_codes(codec.quantize_with(w, s, z), s, z)
        return block_sum((w - deq).square() * imp, block)

    searched, minmax = err(*codec.choose_qparams_searched(w, imp)), err(*codec.choose_qparams(w))
    assert bool((searched <= minmax * (1 + 1e-6)).all())
    assert float(searched.sum()) < 0.9 * float(minmax.sum())
    s0, z0 = codec.choose_qparams_searched(w, torch.zeros(100))
    s1, z1 = codec.choose_qparams(w)
    assert torch.equal(s0, s1) and (z0 is None) == (z1 is None) and (z0 is None or torch.equal(z0, z1))
    assert torch.equal(block_sum(torch.ones(16, 100), block).sum(), torch.tensor(1600.0))

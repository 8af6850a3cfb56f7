"""bitsandbytes NF4/FP4: code tables, ties, nibble order, ragged blocks, double quantization, storage
cost; and bit-exactness against bitsandbytes itself when it is installed."""

from __future__ import annotations

import math
import os
import types

import pytest
import torch

from lowbit.errors import NonFiniteWeightError, SchemeError, ShapeError
from lowbit.formats.base import sqnr_db
from lowbit.formats.nf4 import (
    _FP4_CODES_ASCENDING,
    Bnb4Codec,
    Bnb4Quantized,
    Float4Type,
    code_table,
    dynamic_map,
    fp4,
    nf4,
)

NF4 = Float4Type.NF4
FP4 = Float4Type.FP4


def _bnb() -> types.ModuleType:
    """bitsandbytes.functional; skipped when not installed, except in CI where the oracle must exist."""
    if os.environ.get("CI") == "true":
        import bitsandbytes.functional as bnbf

        return bnbf
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")


def _heavy(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))


# --------------------------------------------------------------------------- tables
def test_nf4_table() -> None:
    t = code_table(NF4)
    assert t.dtype == torch.float32 and t.shape == (16,)
    assert bool((t[1:] > t[:-1]).all())  # codes in ascending order
    assert (t[0].item(), t[7].item(), t[15].item()) == (-1.0, 0.0, 1.0)
    assert t[8].item() == pytest.approx(0.07958029955625534, abs=0)
    assert t[14].item() == pytest.approx(0.7229568362236023, abs=0)
    assert t[1].item() == pytest.approx(-0.6961928009986877, abs=0)


def test_fp4_table_sign_bit_and_values() -> None:
    t = code_table(FP4)
    # bits 2..0: 0, 0.0625, 8, 12, 4, 6, 2, 3 (divided by 12); bit 3 is the sign.
    raw = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
    for c, v in enumerate(raw):
        expected = torch.tensor(v, dtype=torch.float32) / 12
        assert t[c].item() == expected.item()
        assert t[c | 8].item() == -expected.item()
    assert math.copysign(1.0, t[8].item()) == -1.0  # code 8 is -0
    assert t[3].item() == 1.0 and t[11].item() == -1.0
    ascending = t[list(_FP4_CODES_ASCENDING)]
    assert bool((ascending[1:] >= ascending[:-1]).all())
    assert sorted(_FP4_CODES_ASCENDING) == list(range(16))


def test_dynamic_map_shape_and_hand_checked_entries() -> None:
    m = dynamic_map()
    assert m.dtype == torch.float32 and m.shape == (256,)
    assert bool((m[1:] > m[:-1]).all())  # sorted, no duplicates
    assert m[-1].item() == 1.0
    assert int((m == 0).sum()) == 1
    # Largest magnitude below 1: the midpoint of the last of 64 steps over [0.1, 1].
    assert m[-2].item() == pytest.approx(1 - 0.9 / 128, rel=1e-6)
    assert m[0].item() == pytest.approx(-(1 - 0.9 / 128), rel=1e-6)
    # Smallest magnitude: 1e-6 * (0.1 + 1) / 2.
    assert m[m > 0].min().item() == pytest.approx(0.55e-6, rel=1e-6)
    # Negative half mirrors the positive half (less the entry 1.0).
    assert torch.equal(-m[:127].flip(0), m[128:255])


# --------------------------------------------------------------------------- encoding rules
def test_nearest_entry_and_ties_go_to_the_lower_entry() -> None:
    t = code_table(NF4)
    mids = (t[:-1] + t[1:]) / 2  # float32 midpoints: exact ties after scaling by absmax 1
    x = torch.cat([torch.tensor([1.0]), mids, mids.nextafter(torch.tensor(2.0))])
    x = torch.cat([x, torch.zeros(64 - x.numel())])
    codes = nf4().quantize(x).codes()
    assert codes[0].item() == 15
    assert codes[1:16].tolist() == list(range(15))  # tie -> lower
    assert codes[16:31].tolist() == list(range(1, 16))  # one ulp above -> upper
    assert bool((codes[31:] == 7).all())


def test_codes_are_nearest_table_entries() -> None:
    x = _heavy(64 * 40, seed=1)
    for quant_type in Float4Type:
        q = Bnb4Codec(quant_type).quantize(x)
        t = code_table(quant_type)
        assert q.absmax is not None
        scaled = (x.view(-1, 64) / q.absmax[:, None]).reshape(-1)
        chosen = (t[q.codes().long()] - scaled).abs()
        best = (t[None, :] - scaled[:, None]).abs().min(dim=1).values
        assert torch.allclose(chosen, best, rtol=0, atol=1e-6)


def test_fp4_zero_sign_follows_bitsandbytes_cpu() -> None:
    x = torch.tensor([1.0, 1e-3, -1e-3, 0.0, -0.0, 0.004, -0.004, 0.5] + [0.0] * 56)
    q = fp4().quantize(x)
    assert q.codes()[:8].tolist() == [3, 8, 0, 0, 0, 1, 9, 5]
    out = fp4().dequantize(q)
    assert bool((out[1:5] == 0).all())


def test_first_element_goes_to_the_high_nibble() -> None:
    x = torch.tensor([1.0, -1.0, 0.0, 1.0] + [0.5] * 60)
    q = nf4().quantize(x)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (32,)
    assert q.packed[:2].tolist() == [0xF0, 0x7F]


@pytest.mark.parametrize(("quant_type", "pad"), [(NF4, 7), (FP4, 0)])
def test_odd_numel_pads_with_the_code_of_zero(quant_type: Float4Type, pad: int) -> None:
    x = torch.full((3, 5), -1.0)  # every code is 0 (NF4) / 11 (FP4)
    q = Bnb4Codec(quant_type).quantize(x)
    assert q.packed.shape == (8,)
    assert int(q.packed[-1]) & 0xF == pad
    assert q.codes().shape == (15,)
    assert torch.equal(Bnb4Codec(quant_type).dequantize(q), x)


def test_ragged_last_block() -> None:
    x = _heavy(200, seed=2)
    x[192:] *= 1e-3
    q = nf4().quantize(x)
    assert q.absmax is not None and q.absmax.shape == (4,)
    assert q.absmax[3].item() == x[192:].abs().max().item()
    for b in range(3):
        assert q.absmax[b].item() == x[64 * b : 64 * (b + 1)].abs().max().item()
    err = (x - nf4().dequantize(q)).abs()
    assert bool((err[192:] <= 0.2 * q.absmax[3]).all())  # quantized on its own small scale


def test_blocks_run_over_the_flattened_tensor() -> None:
    x = _heavy(6 * 40, seed=3).reshape(6, 40)  # blocks of 64 straddle rows
    q = nf4().quantize(x)
    q_flat = nf4().quantize(x.reshape(-1))
    assert torch.equal(q.packed, q_flat.packed)
    assert nf4().dequantize(q).shape == (6, 40)


def test_all_zero_blocks() -> None:
    x = _heavy(64 * 3 + 10, seed=4)
    x[64:128] = 0.0
    x[192:] = 0.0
    for codec in (nf4(), fp4(), nf4(double_quant=True)):
        q = codec.quantize(x)
        out = codec.dequantize(q)
        assert bool(torch.isfinite(out).all())
        assert bool((out[64:128] == 0).all()) and bool((out[192:] == 0).all())
    q = nf4().quantize(x)
    assert q.absmax is not None
    assert q.absmax[1].item() == 0.0
    assert q.absmax[3].item() == pytest.approx(1e-38)  # bitsandbytes' CPU floor for a short zero block


@pytest.mark.parametrize("quant_type", list(Float4Type))
def test_error_bound_half_the_widest_gap(quant_type: Float4Type) -> None:
    x = _heavy(64 * 50, seed=5)
    codec = Bnb4Codec(quant_type)
    q = codec.quantize(x)
    assert q.absmax is not None
    t = code_table(quant_type).sort().values
    half_gap = ((t[1:] - t[:-1]).max() / 2).item()
    err = (x - codec.dequantize(q)).view(-1, 64).abs()
    assert bool((err <= half_gap * q.absmax[:, None] * (1 + 1e-6)).all())
    # The block's absmax itself is exact.
    top = x.view(-1, 64).abs().argmax(dim=1)
    assert torch.equal(err.gather(1, top[:, None]), torch.zeros(50, 1))


def test_sqnr_on_gaussian() -> None:
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(6))
    s_nf4 = sqnr_db(w, nf4().fake_quantize(w))
    s_fp4 = sqnr_db(w, fp4().fake_quantize(w))
    s_nf4_128 = sqnr_db(w, nf4(128).fake_quantize(w))
    s_nf4_dq = sqnr_db(w, nf4(double_quant=True).fake_quantize(w))
    assert 20.0 < s_nf4 < 21.5  # NF4 is built for Gaussian weights
    assert 17.5 < s_fp4 < 19.0
    assert s_nf4_128 < s_nf4  # larger blocks, coarser scales
    assert abs(s_nf4_dq - s_nf4) < 0.05  # 8-bit absmax costs almost nothing


def test_double_quantized_absmax() -> None:
    x = _heavy(64 * 600 + 32, seed=7)  # 601 blocks -> 3 blocks of 256 absmax values
    plain = nf4().quantize(x)
    dq = nf4(double_quant=True).quantize(x)
    assert plain.absmax is not None and dq.absmax is None and dq.nested is not None
    assert torch.equal(dq.packed, plain.packed)  # the 4-bit codes use the exact absmax
    n = dq.nested
    assert n.codes.dtype == torch.uint8 and n.codes.shape == (601,)
    assert n.absmax.dtype == torch.float32 and n.absmax.shape == (3,)
    assert n.offset.dtype == torch.float32 and n.offset.item() == plain.absmax.mean().item()
    centred = plain.absmax - n.offset
    for b in range(3):
        assert n.absmax[b].item() == centred[256 * b : 256 * (b + 1)].abs().max().item()
    approx = dq.block_absmax()
    assert approx.shape == (601,)
    # 8-bit dynamic map: relative error of a centred value <= a few % of its 256-block absmax.
    block_scale = n.absmax.repeat_interleave(256)[:601]
    assert bool(((approx - plain.absmax).abs() <= 0.02 * block_scale).all())


def test_storage_bits_exact() -> None:
    shape = (4096, 4096)
    n = 4096 * 4096
    assert nf4().bits_per_weight(shape) == 4.5
    assert fp4(128).bits_per_weight(shape) == 4.25
    nblocks = n // 64
    dq_bits = 4 * n + 8 * nblocks + 32 * (nblocks // 256) + 32
    assert nf4(double_quant=True).storage_bits(shape) == dq_bits
    assert nf4(double_quant=True).bits_per_weight(shape) == 4 + 8 / 64 + 32 / (64 * 256) + 32 / n
    assert nf4(double_quant=True).bits_per_weight(shape) == pytest.approx(4.126955, abs=1e-6)
    # Ragged and odd: 1001 values -> 501 bytes, 16 blocks, 1 nested block.
    assert nf4().storage_bits((7, 143)) == 8 * 501 + 32 * 16
    assert nf4(double_quant=True).storage_bits((1001,)) == 8 * 501 + 8 * 16 + 32 + 32


def test_storage_bits_match_the_stored_tensors() -> None:
    x = _heavy(64 * 300 + 7, seed=8)
    for codec in (nf4(), fp4(double_quant=True)):
        q = codec.quantize(x)
        tensors = (
            [q.packed, q.absmax]
            if q.nested is None
            else [q.packed, q.nested.codes, q.nested.absmax, q.nested.offset]
        )
        stored = sum(t.numel() * t.element_size() * 8 for t in tensors if t is not None)
        assert codec.storage_bits(tuple(x.shape)) == stored


def test_names_and_config_errors() -> None:
    assert nf4().name == "nf4 b64"
    assert fp4(128, double_quant=True).name == "fp4 b128 dq"
    with pytest.raises(SchemeError):
        Bnb4Codec(NF4, blocksize=48)
    with pytest.raises(SchemeError):
        Bnb4Codec("nf4", 64)  # type: ignore[arg-type]


def test_bad_weights_raise() -> None:
    x = torch.randn(128)
    x[3] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        nf4().quantize(x)
    with pytest.raises(ShapeError):
        nf4().quantize(torch.zeros(0))
    with pytest.raises(ShapeError):
        nf4().quantize(torch.ones(64, dtype=torch.int32))
    with pytest.raises(TypeError):
        nf4().dequantize(object())  # type: ignore[arg-type]


def test_input_dtypes_computed_in_float32() -> None:
    x = _heavy(64 * 8, seed=9).to(torch.bfloat16)
    q = nf4().quantize(x)
    assert isinstance(q, Bnb4Quantized)
    assert torch.equal(q.packed, nf4().quantize(x.float()).packed)
    assert nf4().dequantize(q).dtype == torch.float32
    assert nf4().fake_quantize(x).dtype == torch.bfloat16


# --------------------------------------------------------------------------- against bitsandbytes
def test_tables_equal_bitsandbytes() -> None:
    bnbf = _bnb()
    assert torch.equal(code_table(NF4), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code_table(FP4), bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map(signed=True))


BNB_CASES = [
    # (shape, blocksize, data)
    ((64, 256), 64, "gauss"),
    ((48, 96), 64, "heavy"),  # 72 blocks, rows straddle blocks
    ((5000,), 64, "heavy"),  # ragged last block of 8
    ((3, 1000), 128, "gauss"),  # ragged, 24 blocks
    ((130, 512), 64, "heavy"),  # 1040 blocks: 5 nested blocks, the last short
    ((2, 64 * 5 + 6), 64, "zeros"),  # all-zero full and short blocks
    ((1, 64), 64, "ties"),  # exact midpoints
    ((10, 64), 64, "const"),  # equal absmax everywhere: the centred absmax are all 0
]


def _bnb_input(shape: tuple[int, ...], data: str) -> torch.Tensor:
    n = math.prod(shape)
    if data == "gauss":
        return torch.randn(n, generator=torch.Generator().manual_seed(n)).reshape(shape)
    if data == "const":
        return torch.full(shape, -2.5)
    x = _heavy(n, seed=n)
    if data == "zeros":
        x[64:128] = 0.0
        x[n - n % 64 :] = 0.0
    if data == "ties":
        t = code_table(NF4)
        x = torch.cat([torch.tensor([1.0]), (t[:-1] + t[1:]) / 2, torch.linspace(-1, 1, 48)])
    return x.reshape(shape)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", list(Float4Type), ids=lambda t: t.value)
@pytest.mark.parametrize(("shape", "blocksize", "data"), BNB_CASES, ids=lambda v: str(v))
def test_bit_exact_with_bitsandbytes(
    shape: tuple[int, ...], blocksize: int, data: str, quant_type: Float4Type, double_quant: bool
) -> None:
    bnbf = _bnb()
    x = _bnb_input(shape, data)
    codec = Bnb4Codec(quant_type, blocksize, double_quant)
    q = codec.quantize(x)
    packed, state = bnbf.quantize_4bit(
        x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type.value
    )
    assert torch.equal(q.packed, packed.reshape(-1))
    if double_quant:
        assert q.nested is not None
        assert torch.equal(q.nested.codes, state.absmax)
        assert torch.equal(q.nested.absmax, state.state2.absmax)
        assert torch.equal(q.nested.offset, state.offset)
    else:
        assert q.absmax is not None
        assert torch.equal(q.absmax, state.absmax)
    # Dequantize through a flat copy: bitsandbytes 0.50's AVX-512 CPU dequantizer indexes absmax per row
    # and gets 2-D shapes wrong whose last dimension is a multiple of 16 but not of the block size
    # (e.g. (48, 96) with blocks of 64); its 1-D path is right. It returns 1-D shapes as (1, n).
    flat_packed, flat_state = bnbf.quantize_4bit(
        x.reshape(-1), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type.value
    )
    assert torch.equal(flat_packed, packed)
    expected = bnbf.dequantize_4bit(flat_packed, flat_state).reshape(shape)
    assert torch.equal(codec.dequantize(q), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bit_exact_with_bitsandbytes_half_inputs(dtype: torch.dtype) -> None:
    bnbf = _bnb()
    x = _heavy(64 * 64, seed=10).reshape(32, 128).to(dtype)
    for quant_type in Float4Type:
        codec = Bnb4Codec(quant_type, 64, double_quant=True)
        q = codec.quantize(x)
        packed, state = bnbf.quantize_4bit(
            x, blocksize=64, compress_statistics=True, quant_type=quant_type.value
        )
        assert torch.equal(q.packed, packed.reshape(-1))
        assert q.nested is not None and torch.equal(q.nested.codes, state.absmax)
        out = bnbf.dequantize_4bit(packed, state)
        assert out.dtype == dtype
        assert torch.equal(codec.fake_quantize(x), out)

"""The ggml block-codec contract: registry, argument checks, and the float32 primitives that must
reproduce ggml's C arithmetic (nearest_int, in-order sums, fp16 rounding, bit layouts)."""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import c_nearest_int

import lowbit.formats.gguf as gguf_pkg
from lowbit.errors import NonFiniteWeightError, SchemeError, ShapeError
from lowbit.formats.gguf import block
from lowbit.formats.gguf.block import (
    CODECS,
    GGMLBlockCodec,
    absmax_first,
    c_int8,
    c_trunc_int,
    fp16_bytes,
    fp16_from_bytes,
    fp16_round,
    get_codec,
    inv_or_zero,
    max_first,
    min_first,
    nearest_int,
    pack_high_bits,
    pack_nibbles,
    seq_sum,
)
from lowbit.formats.gguf.types import GGMLType, type_info

F = np.float32
MY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4")


# ------------------------------------------------------------------------------------------ registry


@pytest.mark.parametrize("name", MY_TYPES)
def test_registry_finds_codec_by_name_enum_and_value(name: str) -> None:
    t = GGMLType.__members__[name]
    codec = get_codec(name.lower())
    assert isinstance(codec, GGMLBlockCodec)
    assert get_codec(t) is codec and get_codec(int(t)) is codec and CODECS[name] is codec
    assert codec.ggml_type == t
    info = type_info(t)
    assert (codec.block_size, codec.type_size) == (info.block_size, info.type_size)


def test_registry_rejects_unknown_types() -> None:
    with pytest.raises(SchemeError, match="unknown ggml type"):
        get_codec("Q4_7")
    with pytest.raises(SchemeError, match="no codec for ggml type F32"):
        get_codec("F32")


def test_the_package_exports_the_registry() -> None:
    assert gguf_pkg.get_codec is get_codec and gguf_pkg.CODECS is CODECS
    assert gguf_pkg.GGMLBlockCodec is GGMLBlockCodec
    # importing the package registers every codec: CODECS is complete without a get_codec call
    assert set(MY_TYPES) | {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"} <= set(gguf_pkg.CODECS)
    assert isinstance(gguf_pkg.get_codec("Q6_K"), gguf_pkg.GGMLBlockCodec)


def test_a_second_codec_for_a_registered_type_is_refused() -> None:
    with pytest.raises(RuntimeError, match="two codecs"):

        class Duplicate(GGMLBlockCodec):  # noqa: F841
            ggml_type = GGMLType.Q4_0

            def _quantize(self, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
                raise AssertionError


# ------------------------------------------------------------------------------------ argument checks


def test_quantize_rows_checks_its_arguments() -> None:
    codec = get_codec("Q4_0")
    with pytest.raises(ShapeError, match="multiple of 32"):
        codec.quantize_rows(np.zeros((2, 48), np.float32))
    with pytest.raises(ShapeError, match="2-D"):
        codec.quantize_rows(np.zeros(64, np.float32))
    with pytest.raises(ShapeError, match="importance vector"):
        codec.quantize_rows(np.zeros((2, 64), np.float32), np.ones(32, np.float32))
    bad = np.zeros((2, 64), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(NonFiniteWeightError):
        codec.quantize_rows(bad)
    with pytest.raises(NonFiniteWeightError):
        codec.quantize_rows(np.zeros((2, 64), np.float32), np.full(64, np.inf, np.float32))
    assert codec.quantize_rows(np.zeros((0, 64), np.float32)).shape == (0, 36)


def test_dequantize_rows_checks_its_arguments() -> None:
    codec = get_codec("IQ4_XS")
    with pytest.raises(ShapeError, match=r"uint8 \(rows, 136\)"):
        codec.dequantize_rows(np.zeros((2, 135), np.uint8), 256)
    with pytest.raises(ShapeError):
        codec.dequantize_rows(np.zeros((2, 136), np.int8), 256)
    with pytest.raises(ShapeError, match="multiple of 256"):
        codec.dequantize_rows(np.zeros((2, 136), np.uint8), 200)
    assert codec.dequantize_rows(np.zeros((0, 136), np.uint8), 256).shape == (0, 256)


def test_quantize_accepts_other_float_dtypes_and_layouts() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    codec = get_codec("Q5_1")
    ref = codec.quantize_rows(np.ascontiguousarray(x.T))
    assert np.array_equal(codec.quantize_rows(x.T), ref)  # non-contiguous view
    assert np.array_equal(codec.quantize_rows(x.T.astype(np.float64)), ref)  # float64 is cast first


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["none", "imatrix"])
@pytest.mark.parametrize("name", sorted(set(MY_TYPES) | {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}))
def test_threaded_pieces_give_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch, name: str, with_imatrix: bool
) -> None:
    """quantize_rows cuts the rows into pieces for worker threads: any cut, any thread count, the same
    bytes as one call on all rows (every statistic ggml computes is per block, super-block or row)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_t(3, (13, 512)) * 0.02).astype(np.float32)
    x[4] = 0.0  # an all-zero row among others
    imatrix = np.exp(rng.normal(0, 1, 512)).astype(np.float32) if with_imatrix else None
    codec = get_codec(name)
    monkeypatch.setattr(block, "n_workers", lambda: 1)
    monkeypatch.setattr(block, "PIECE_ELEMENTS", 1 << 20)
    whole = codec.quantize_rows(x, imatrix)
    for piece_rows, threads in ((1, 2), (3, 2), (4, 3)):
        monkeypatch.setattr(block, "PIECE_ELEMENTS", 512 * piece_rows)
        monkeypatch.setattr(block, "n_workers", lambda t=threads: t)
        assert np.array_equal(codec.quantize_rows(x, imatrix), whole), (piece_rows, threads)


# ------------------------------------------------------------------------------------------ numerics


def test_nearest_int_rounds_half_to_even_like_ggml() -> None:
    vals = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 7.5, -8.5, 3.2, -3.7, 0.0, -0.0], F)
    got = nearest_int(vals)
    assert got.dtype == np.int32
    assert got.tolist() == [0, 2, 2, 0, -2, -2, 0, 8, -8, 3, -4, 0, 0]
    rng = np.random.default_rng(1)
    r = (rng.standard_normal(2000) * 40).astype(F)
    r[:500] = np.round(r[:500]) + F(0.5)  # exact halves
    assert got.tolist() == [c_nearest_int(v) for v in vals]
    assert nearest_int(r).tolist() == [c_nearest_int(v) for v in r]
    assert np.array_equal(nearest_int(r), np.rint(r).astype(np.int32))


@pytest.mark.parametrize("axis", [0, 1])
def test_seq_sum_adds_strictly_in_order(axis: int) -> None:
    rng = np.random.default_rng(2)
    a = (rng.standard_normal((40, 300)) * np.exp(rng.standard_normal((40, 300)) * 4)).astype(F)
    moved = np.moveaxis(a, axis, 0)
    expected = np.zeros(moved.shape[1:], F)
    for i in range(moved.shape[0]):
        expected = (expected + moved[i]).astype(F)
    got = seq_sum(a, axis=axis)
    assert got.dtype == F and np.array_equal(got, expected)
    # the data is order-sensitive: summing in reverse (or pairwise, np.sum along axis 1) differs
    backwards = np.zeros(moved.shape[1:], F)
    for i in reversed(range(moved.shape[0])):
        backwards = (backwards + moved[i]).astype(F)
    assert not np.array_equal(backwards, expected)
    if axis == 1:
        assert not np.array_equal(a.sum(axis=1, dtype=F), expected)
    out = np.empty(moved.shape[1:], F)
    assert seq_sum(a, axis=axis, out=out) is out and np.array_equal(out, expected)


@pytest.mark.parametrize("n", [2, 8, 9, 16, 32, 256])
@pytest.mark.parametrize("cols", [1, 2, 3, 7, 16, 100, 4096])
def test_seq_sum_is_sequential_for_every_block_shape(n: int, cols: int) -> None:
    """Blocks as columns (n, cols), the layout of every search: numpy's row-by-row reduction must add
    in order for all of them (a single column falls back to the loop: numpy would sum it pairwise)."""
    rng = np.random.default_rng(n * 10007 + cols)
    a = (rng.standard_normal((n, cols)) * np.exp(rng.standard_normal((n, cols)) * 6)).astype(F)
    expected = a[0].copy()
    for i in range(1, n):
        expected = (expected + a[i]).astype(F)
    assert np.array_equal(seq_sum(a, from_first=True), expected)
    assert np.array_equal(seq_sum(np.asfortranarray(a), from_first=True), expected)
    assert np.array_equal(seq_sum(a), expected)  # no column here is all -0.0


def test_seq_sum_starts_from_zero_or_from_the_first_term() -> None:
    a = np.array([[-0.0, -0.0, 1.0], [-0.0, 0.0, -1.0], [-0.0, -0.0, 0.5]], F)  # (3, 3)
    # C: float s = 0; s += a[i]   ->  +0.0 for all -0.0 terms;  float s = a[0]; ...  ->  -0.0
    assert np.signbit(seq_sum(a)).tolist() == [False, False, False]
    assert np.signbit(seq_sum(a, from_first=True)).tolist() == [True, False, False]
    assert np.signbit(seq_sum(a.T, axis=1)).tolist() == [False, False, False]
    assert np.signbit(seq_sum(a.T, axis=1, from_first=True)).tolist() == [True, False, False]
    assert seq_sum(a[:, 2]) == F(0.5) and seq_sum(a[:, :1]).tolist() == [0.0]


def _ggml_fp32_to_fp16(f: np.ndarray) -> np.ndarray:
    """ggml's portable ``ggml_compute_fp32_to_fp16`` (the FP16 library's algorithm), vectorized."""
    f = f.astype(F)
    with np.errstate(over="ignore"):
        base = (np.abs(f) * F(2.0**112)) * F(2.0**-110)
    w = f.view(np.uint32).astype(np.uint64)
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = np.maximum(shl1_w & 0xFF000000, 0x71000000)
    base = ((bias >> 1) + 0x07800000).astype(np.uint32).view(F) + base
    bits = base.view(np.uint32).astype(np.uint64)
    nonsign = ((bits >> 13) & 0x7C00) + (bits & 0x0FFF)
    out = (sign >> 16) | np.where(shl1_w > 0xFF000000, 0x7E00, nonsign)
    return out.astype(np.uint16)


def test_fp16_conversion_is_ggmls_round_to_nearest_even() -> None:
    # every fp16 value, the float32 midpoints between neighbours (the ties) and one float32 ulp
    # either side of them, subnormals, overflow to inf, and random floats
    h = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(F)  # all finite positives
    mids = ((h[:-1].astype(np.float64) + h[1:].astype(np.float64)) / 2).astype(F)
    probes = np.concatenate(
        [
            h,
            mids,
            np.nextafter(mids, F(np.inf)),
            np.nextafter(mids, F(0)),
            np.array([65504, 65519.996, 65520, 1e6, 2.0**-25, 2.0**-26, 3 * 2.0**-26, 1e-8, 1e-30], F),
            (
                np.random.default_rng(3).standard_normal(20000) * 10.0 ** np.arange(-10, 10).repeat(1000)
            ).astype(F),
        ]
    )
    probes = np.concatenate([probes, -probes])
    got = fp16_bytes(probes).view("<u2").reshape(-1)
    assert np.array_equal(got, _ggml_fp32_to_fp16(probes))


def test_absmax_first_takes_the_first_of_tied_magnitudes() -> None:
    x = np.array(
        [
            [0.5, -0.5, 0.0, 0.25, -1.0],
            [-0.5, 0.5, 0.0, -0.25, 1.0],
            [0.1, 0.1, 0.0, 0.0, 0.3],
        ],
        F,
    )  # (n=3, B=5): columns are blocks
    amax, mx = absmax_first(x)
    assert amax.tolist() == [0.5, 0.5, 0.0, 0.25, 1.0]
    assert mx.tolist() == [0.5, -0.5, 0.0, 0.25, -1.0]
    rng = np.random.default_rng(4)
    r = rng.integers(-3, 4, size=(8, 500)).astype(F)  # many ties
    idx = np.argmax(np.abs(r), axis=0)
    amax, mx = absmax_first(r)
    assert np.array_equal(mx, r[idx, np.arange(500)]) and np.array_equal(amax, np.abs(r).max(axis=0))


def test_absmax_first_nan_never_wins_and_nothing_gives_plus_zero() -> None:
    nan, inf = np.nan, np.inf
    x = np.array(
        [
            [nan, -0.0, nan, 0.0, -inf],
            [0.5, -0.0, nan, -2.0, 3.0],
            [-0.7, -0.0, nan, 2.0, inf],
        ],
        F,
    )
    amax, mx = absmax_first(x)
    assert amax.tolist() == [F(0.7), 0.0, 0.0, 2.0, inf]
    assert mx.tolist() == [F(-0.7), 0.0, 0.0, -2.0, -inf]
    assert not np.signbit(mx[1]) and not np.signbit(mx[2])  # ggml's max stays +0 when nothing wins


def test_min_first_and_max_first_keep_the_first_zero() -> None:
    x = np.array(
        [
            [0.5, -0.0, 0.0, 0.0, -0.0, 1.0],
            [-0.0, 0.0, -0.0, -3.0, 0.0, 2.0],
            [0.0, 0.5, 1.0, 0.0, -1.0, 3.0],
        ],
        F,
    )  # (3, 6): one block per column
    mn = min_first(x)
    assert mn.tolist() == [0.0, 0.0, 0.0, -3.0, -1.0, 1.0]
    assert np.signbit(mn).tolist() == [True, True, False, True, True, False]
    mxf = max_first(x)
    assert mxf.tolist() == [0.5, 0.5, 1.0, 0.0, 0.0, 3.0]
    assert np.signbit(mxf).tolist() == [False, False, False, False, True, False]


def test_fp16_round_and_from_bytes_agree_with_fp16_bytes() -> None:
    rng = np.random.default_rng(5)
    v = np.concatenate(
        [(rng.standard_normal(3000) * 10.0 ** rng.integers(-9, 6, 3000)).astype(F), np.array([-0.0, 1e6], F)]
    )
    b = fp16_bytes(v)
    assert b.shape == (v.size, 2) and b.dtype == np.uint8
    back = fp16_from_bytes(b)
    assert np.array_equal(back.view(np.uint32), fp16_round(v).view(np.uint32))
    assert np.isinf(back[-1]) and np.signbit(back[-2])
    assert fp16_from_bytes(b.reshape(-1, 1, 2)).shape == (v.size, 1)


def test_c_conversions_truncate_and_wrap_like_x86() -> None:
    v = np.array([2.9, -2.9, 127.5, 128.4, -129.0, 255.9, np.nan, 3e9, -0.0], F)
    i = c_trunc_int(v)
    assert i.tolist()[:6] == [2, -2, 127, 128, -129, 255]
    assert i.tolist()[6:8] == [-(2**31), -(2**31)]  # cvttss2si's "integer indefinite"
    assert c_int8(i).tolist() == [2, -2, 127, -128, 127, -1, 0, 0, 0]
    assert inv_or_zero(np.array([0.0, -0.0, 4.0, np.nan], F)).tolist()[:3] == [0.0, 0.0, 0.25]
    assert np.isnan(inv_or_zero(np.array([np.nan], F))[0])  # C: NaN ? 1/NaN : 0 -> NaN


def test_bit_layout_helpers() -> None:
    q = np.arange(32, dtype=np.uint8)[None, :] % 16
    packed = pack_nibbles(q)
    assert packed.shape == (1, 16) and packed.dtype == np.uint8
    assert np.array_equal(pack_nibbles(q.astype(np.int32)), packed)  # codes of any integer dtype
    assert packed[0].tolist() == [(j % 16) | (((j + 16) % 16) << 4) for j in range(16)]
    q5 = np.zeros((1, 32), np.uint8)
    q5[0, [0, 3, 31]] = 16
    assert pack_high_bits(q5)[0].tolist() == list(((1 << 0) | (1 << 3) | (1 << 31)).to_bytes(4, "little"))

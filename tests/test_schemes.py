"""Scheme names parse into the codecs they promise."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import SchemeError
from lowbit.formats.affine import AffineCodec
from lowbit.formats.base import PER_CHANNEL, group
from lowbit.schemes import GGUF_MIXES, parse_scheme, scheme_help


@pytest.mark.parametrize(
    ("name", "bits", "sym", "block"),
    [
        ("w4", 4, True, PER_CHANNEL),
        ("w8", 8, True, PER_CHANNEL),
        ("w4g128", 4, True, group(128)),
        ("W3G64-ASYM", 3, False, group(64)),
        ("w2g32-asym", 2, False, group(32)),
        ("w4-sym", 4, True, PER_CHANNEL),
    ],
)
def test_affine_names(name: str, bits: int, sym: bool, block: object) -> None:
    codec = parse_scheme(name).codec(torch.float32)
    assert isinstance(codec, AffineCodec)
    assert (codec.bits, codec.symmetric, codec.block, codec.scale_dtype) == (bits, sym, block, torch.float32)


def test_canonical_names() -> None:
    assert parse_scheme("W4G128-sym").name == "w4g128"
    assert parse_scheme("w4g128-asym").name == "w4g128-asym"


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "fp4", "fp8", "fp8-e5m2"])
def test_float_schemes_build_codecs(name: str) -> None:
    codec = parse_scheme(name).codec()
    w = torch.randn(16, 128)
    assert codec.fake_quantize(w).shape == w.shape
    assert 4.0 < codec.bits_per_weight((16, 128)) < 8.6


@pytest.mark.parametrize("name", ["w1", "w9", "w4g0", "int4", "", "q4_k_m_x"])
def test_bad_names(name: str) -> None:
    with pytest.raises(SchemeError):
        parse_scheme(name)


def test_gguf_mixes_need_the_gguf_format() -> None:
    """A GGUF mix is a per-tensor choice of ggml types, not one codec: it parses only for --format gguf."""
    with pytest.raises(SchemeError, match="GGUF mix"):
        parse_scheme("q4_k_m")
    assert parse_scheme("q4_k_m", "gguf").name == "Q4_K_M"


def test_help_lists_every_form() -> None:
    text = scheme_help()
    for token in ("wNgG", "-asym", "nf4", "fp4", "fp8", *GGUF_MIXES):
        assert token in text

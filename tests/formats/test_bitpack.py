"""pack/unpack: round trips for every width, container, order and dimension; known words."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats.bitpack import AWQ_ORDER, MSB_FIRST_U8_4BIT, codes_per_word, pack, unpack

CONTAINERS = (torch.uint8, torch.int32)


@st.composite
def pack_cases(draw: st.DrawFn) -> tuple[torch.Tensor, int, torch.dtype, int, list[int] | None]:
    bits = draw(st.integers(1, 8))
    container = draw(st.sampled_from(CONTAINERS))
    per = codes_per_word(bits, container)
    order = draw(st.one_of(st.none(), st.permutations(list(range(per)))))
    dim = draw(st.sampled_from([0, -1]))
    words = draw(st.integers(1, 3))
    other = draw(st.integers(1, 4))
    shape = (words * per, other) if dim == 0 else (other, words * per)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64)
    # Make sure the extremes (all-ones, which sets the int32 sign bit) occur.
    codes.view(-1)[0] = (1 << bits) - 1
    return codes, bits, container, dim, order


@settings(max_examples=300, deadline=None)
@given(pack_cases())
def test_unpack_inverts_pack(case: tuple[torch.Tensor, int, torch.dtype, int, list[int] | None]) -> None:
    codes, bits, container, dim, order = case
    packed = pack(codes, bits, container, dim=dim, order=order)
    per = codes_per_word(bits, container)
    assert packed.dtype == container
    expected_shape = list(codes.shape)
    expected_shape[dim] //= per
    assert list(packed.shape) == expected_shape
    out = unpack(packed, bits, dim=dim, order=order)
    assert out.dtype == torch.uint8
    assert torch.equal(out.long(), codes)


@settings(max_examples=50, deadline=None)
@given(
    bits=st.sampled_from([3, 5, 6, 7]),
    container=st.sampled_from(CONTAINERS),
    seed=st.integers(0, 1000),
)
def test_widths_that_do_not_divide_the_word_leave_high_bits_zero(
    bits: int, container: torch.dtype, seed: int
) -> None:
    per = codes_per_word(bits, container)
    codes = torch.randint(0, 1 << bits, (4, per * 3), generator=torch.Generator().manual_seed(seed))
    words = pack(codes, bits, container).long() & ((1 << torch.iinfo(container).bits) - 1)
    assert bool((words >> (per * bits) == 0).all())


def test_known_answer_lsb_first_int32() -> None:
    word = pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4, torch.int32)
    assert word.dtype == torch.int32
    assert word.item() == 0x87654321 - (1 << 32)  # the signed view of 0x87654321


def test_known_answer_awq_order() -> None:
    # AutoAWQ puts elements [0, 2, 4, 6, 1, 3, 5, 7] into nibbles 0..7.
    word = pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4, torch.int32, order=AWQ_ORDER)
    assert word.item() == 0x86427531 - (1 << 32)
    assert unpack(word, 4, order=AWQ_ORDER).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]


def test_known_answer_msb_first_nibbles() -> None:
    packed = pack(torch.tensor([0xA, 0x5, 0x0, 0xF]), 4, torch.uint8, dim=0, order=MSB_FIRST_U8_4BIT)
    assert packed.tolist() == [0xA5, 0x0F]


def test_known_answers_other_widths() -> None:
    assert pack(torch.tensor([[1, 2, 3, 4]]), 8, torch.int32).item() == 0x04030201
    assert pack(torch.tensor([[1, 2, 3, 0]]), 2, torch.uint8).item() == 0b00_11_10_01
    assert pack(torch.tensor([[5, 3]]), 3, torch.uint8).item() == 5 | (3 << 3)
    assert pack(torch.tensor([[1] * 32]), 1, torch.int32).item() == -1
    assert pack(torch.tensor([[0xF] * 8]), 4, torch.int32).item() == -1


def test_pack_along_dim0_packs_columns_independently() -> None:
    # GPTQ qweight layout: 8 consecutive rows of one column share an int32.
    codes = torch.arange(16).reshape(8, 2) % 16
    words = pack(codes, 4, torch.int32, dim=0)
    assert words.shape == (1, 2)
    assert words[0, 0].item() == 0xECA86420 - (1 << 32)
    assert words[0, 1].item() == 0xFDB97531 - (1 << 32)


def test_unpack_length_trims_padding() -> None:
    packed = pack(torch.tensor([1, 2, 3, 0]), 4, torch.uint8, dim=0, order=MSB_FIRST_U8_4BIT)
    assert unpack(packed, 4, dim=0, order=MSB_FIRST_U8_4BIT, length=3).tolist() == [1, 2, 3]


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple"):
        pack(torch.tensor([[1, 2, 3]]), 4, torch.int32)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([[16, 0]]), 4, torch.uint8)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([[-1, 0]]), 4, torch.uint8)
    with pytest.raises(ValueError, match="permutation"):
        pack(torch.tensor([[1, 2]]), 4, torch.uint8, order=(0, 0))
    with pytest.raises(ValueError, match="bits"):
        pack(torch.tensor([[1]]), 9, torch.int32)
    with pytest.raises(ValueError, match="container"):
        pack(torch.tensor([[1]]), 4, torch.int16)

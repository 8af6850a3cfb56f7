"""The one place bits are shifted: pack/unpack n-bit codes into uint8 / int32 containers.

Codes are unsigned integers in ``[0, 2**bits)``. ``per = container_bits // bits`` codes share one word;
packing runs along ``dim``, whose length must be a multiple of ``per`` (callers pad if their format
pads). Within a word, code ``j`` of the ``order`` goes to bits ``[j*bits, (j+1)*bits)``:

* ``order=None`` — LSB-first: element ``i`` of a word's run sits at bits ``i*bits`` (compressed-tensors
  ``pack-quantized``, GPTQ ``qweight``/``qzeros``).
* ``order=AWQ_ORDER`` — AutoAWQ's interleave for 4-bit in int32: the word holds elements
  ``[0, 2, 4, 6, 1, 3, 5, 7]`` at nibbles 0..7.
* ``order=MSB_FIRST_U8_4BIT`` — two 4-bit codes per byte, the first element in the high nibble
  (bitsandbytes 4-bit).

Widths that do not divide the container (3, 5, 6, 7 bits) use ``per = floor(container_bits / bits)``
and leave the high bits of each word zero, the layout of formats that pack those widths per word.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
MSB_FIRST_U8_4BIT: tuple[int, ...] = (1, 0)

_CONTAINERS: dict[torch.dtype, int] = {torch.uint8: 8, torch.int32: 32}


def codes_per_word(bits: int, container: torch.dtype) -> int:
    if container not in _CONTAINERS:
        raise ValueError(f"container must be uint8 or int32, not {container}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, not {bits}")
    return _CONTAINERS[container] // bits


def _check_order(order: Sequence[int] | None, per: int) -> list[int]:
    if order is None:
        return list(range(per))
    if sorted(order) != list(range(per)):
        raise ValueError(f"order {tuple(order)} is not a permutation of 0..{per - 1}")
    return list(order)


def pack(
    codes: torch.Tensor,
    bits: int,
    container: torch.dtype = torch.int32,
    dim: int = -1,
    order: Sequence[int] | None = None,
) -> torch.Tensor:
    """Pack unsigned ``codes`` (any integer dtype, values in ``[0, 2**bits)``) along ``dim``.

    Returns a ``container`` tensor whose ``dim`` is ``codes.shape[dim] // per`` long.
    """
    per = codes_per_word(bits, container)
    perm = _check_order(order, per)
    dim = dim % codes.ndim
    n = codes.shape[dim]
    if n % per:
        raise ValueError(f"length {n} along dim {dim} is not a multiple of {per} codes per word")
    c = codes.movedim(dim, -1).to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    c = c.reshape(*c.shape[:-1], n // per, per)
    word = torch.zeros(c.shape[:-1], dtype=torch.int64)
    for slot, elem in enumerate(perm):
        word |= c[..., elem] << (slot * bits)
    if container == torch.int32:
        # Two's-complement view of the unsigned 32-bit word.
        word = torch.where(word >= (1 << 31), word - (1 << 32), word)
    return word.to(container).movedim(-1, dim).contiguous()


def unpack(
    packed: torch.Tensor,
    bits: int,
    dim: int = -1,
    order: Sequence[int] | None = None,
    length: int | None = None,
) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8`` codes, ``dim`` restored to ``length`` (default: all slots)."""
    container = packed.dtype
    per = codes_per_word(bits, container)
    perm = _check_order(order, per)
    dim = dim % packed.ndim
    w = packed.movedim(dim, -1).to(torch.int64)
    if container == torch.int32:
        w = w & 0xFFFFFFFF
    mask = (1 << bits) - 1
    out = torch.empty(*w.shape, per, dtype=torch.int64)
    for slot, elem in enumerate(perm):
        out[..., elem] = (w >> (slot * bits)) & mask
    out = out.reshape(*w.shape[:-1], w.shape[-1] * per)
    if length is not None:
        out = out[..., :length]
    return out.to(torch.uint8).movedim(-1, dim).contiguous()


# Bounds the int64 bit stream of the 3/5/6/7-bit dense packer to ~2**24 bits per chunk of rows.
_STREAM_BITS = 1 << 24


def pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``codes`` (rows, n) along dim 1 into int32 (rows, ceil(n * bits / 32)), dense."""
    rows, n = codes.shape
    n_words = math.ceil(n * bits / 32)
    if 32 % bits == 0:
        per = 32 // bits
        return pack(F.pad(codes.to(torch.int64), (0, n_words * per - n)), bits, torch.int32)
    out = torch.empty(rows, n_words, dtype=torch.int32)
    step = max(1, _STREAM_BITS // max(1, n_words * 32))
    for r0 in range(0, rows, step):
        chunk = codes[r0 : r0 + step].to(torch.uint8)
        r = chunk.shape[0]
        # Each code's 8 bits LSB-first, keep the low `bits`: the row's bit stream.
        stream = unpack(chunk, 1).reshape(r, n, 8)[..., :bits].reshape(r, n * bits)
        stream = F.pad(stream, (0, n_words * 32 - n * bits))
        out[r0 : r0 + r] = pack(stream, 1, torch.int32)
    return out


def unpack_dense(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_dense`: int32 (rows, words) -> uint8 codes (rows, n)."""
    rows, n_words = words.shape
    if 32 % bits == 0:
        return unpack(words, bits, length=n)
    out = torch.empty(rows, n, dtype=torch.uint8)
    step = max(1, _STREAM_BITS // max(1, n_words * 32))
    for r0 in range(0, rows, step):
        chunk = words[r0 : r0 + step]
        r = chunk.shape[0]
        stream = unpack(chunk, 1)[:, : n * bits].reshape(r, n, bits)
        out[r0 : r0 + r] = pack(F.pad(stream, (0, 8 - bits)).reshape(r, n * 8), 1, torch.uint8)
    return out

"""A GGUF file written as a stream: header, metadata and tensor table first, then one tensor at a time.

gguf-py's ``GGUFWriter`` holds metadata as Python values and packs them element by element (a 49 K-token
vocabulary with its merges is ~100 K ``struct.pack`` calls); here a metadata entry is either bytes
already in GGUF form (copied from an input file, see :meth:`lowbit.walk.gguf_read.GGUFFile.raw`) or a
typed value packed by :func:`encode_kv` exactly as gguf-py packs it. The layout is gguf-py's and
llama.cpp's: version 3, tensors at offsets padded to the alignment, each tensor's data padded too.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from lowbit.walk.gguf_read import GGUF_MAGIC, SCALAR_FORMATS, T_ARRAY, T_BOOL, T_FLOAT32, T_INT32, T_STRING

GGUF_VERSION = 3
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _encode_string(v: str | bytes) -> bytes:
    b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
    return _U64.pack(len(b)) + b


def _infer_type(v: Any) -> int:
    """gguf-py's ``GGUFValueType.get_type`` for an array item without a declared type."""
    if isinstance(v, (str, bytes, bytearray)):
        return T_STRING
    if isinstance(v, list):
        return T_ARRAY
    if isinstance(v, float):
        return T_FLOAT32
    if isinstance(v, bool):
        return T_BOOL
    if isinstance(v, int):
        return T_INT32
    raise ValueError(f"cannot store a {type(v).__name__} in GGUF metadata")


def encode_value(value: Any, vtype: int, sub_type: int | None = None) -> bytes:
    """A GGUF value (without its type tag), as gguf-py's ``GGUFWriter`` packs it."""
    vtype = int(vtype)
    fmt = SCALAR_FORMATS.get(vtype)
    if fmt is not None:
        return struct.pack(fmt, value)
    if vtype == T_STRING:
        return _encode_string(value)
    if vtype == T_ARRAY:
        if isinstance(value, (bytes, bytearray)) and sub_type is None:
            sub_type = 0  # UINT8, as gguf-py
        items = list(value)
        if not items:
            raise ValueError("GGUF metadata arrays cannot be empty")
        sub = int(sub_type) if sub_type is not None else _infer_type(items[0])
        head = _U32.pack(sub) + _U64.pack(len(items))
        sfmt = SCALAR_FORMATS.get(sub)
        if sfmt is not None:  # one pack call, the same bytes as one per item
            return head + struct.pack(f"<{len(items)}{sfmt[1:]}", *items)
        if sub == T_STRING:
            return head + b"".join(_encode_string(v) for v in items)
        if sub == T_ARRAY:
            return head + b"".join(encode_value(v, T_ARRAY) for v in items)
    raise ValueError(f"unknown GGUF value type {vtype}")


def encode_kv(key: str, value: Any, vtype: int, sub_type: int | None = None) -> bytes:
    """One metadata entry (key, type tag, value) in GGUF form."""
    return _encode_string(key) + _U32.pack(int(vtype)) + encode_value(value, vtype, sub_type)


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the table: name, ``ne`` (ggml order), ggml type value, bytes."""

    name: str
    ne: tuple[int, ...]
    type: int
    nbytes: int


def _pad(n: int, alignment: int) -> int:
    return (-n) % alignment


class GGUFStreamWriter:
    """Writes to an open binary file: :meth:`write_header` once, then :meth:`write_tensor` for every
    tensor of the table, in its order (sizes checked)."""

    def __init__(self, f: BinaryIO, alignment: int = 32) -> None:
        self._f = f
        self._alignment = int(alignment)
        self._pending: list[TensorEntry] = []
        self._pos = 0

    def _write(self, b: Any) -> None:
        self._f.write(b)
        self._pos += int(b.nbytes if hasattr(b, "nbytes") else len(b))

    def write_header(self, kvs: Sequence[bytes | memoryview], tensors: Sequence[TensorEntry]) -> None:
        head = bytearray(GGUF_MAGIC)
        head += _U32.pack(GGUF_VERSION) + _U64.pack(len(tensors)) + _U64.pack(len(kvs))
        self._write(head)
        for kv in kvs:
            self._write(kv)
        table = bytearray()
        offset = 0
        for t in tensors:
            table += _encode_string(t.name) + _U32.pack(len(t.ne))
            table += struct.pack(f"<{len(t.ne)}Q", *t.ne)
            table += _U32.pack(t.type) + _U64.pack(offset)
            offset += t.nbytes + _pad(t.nbytes, self._alignment)
        table += bytes(_pad(self._pos + len(table), self._alignment))
        self._write(table)
        self._pending = list(reversed(tensors))

    def write_tensor(self, data: np.ndarray | memoryview) -> None:
        """The next tensor of the table, whole."""
        self.write_tensor_pieces([data])

    def write_tensor_pieces(self, pieces: Iterable[np.ndarray | memoryview]) -> int:
        """The next tensor of the table from consecutive pieces of its bytes; returns its size. Too
        many bytes fail before they are written, too few after (the caller discards the file)."""
        if not self._pending:
            raise AssertionError("every tensor of the table is written already")
        t = self._pending.pop()
        nbytes = 0
        for data in pieces:
            payload: Any = np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data.cast("B")
            nbytes += int(payload.nbytes)
            if nbytes > t.nbytes:
                raise AssertionError(f"tensor {t.name}: more than the {t.nbytes} bytes the table says")
            self._write(payload)
        if nbytes != t.nbytes:
            raise AssertionError(f"tensor {t.name}: {nbytes} bytes, the table says {t.nbytes}")
        pad = _pad(nbytes, self._alignment)
        if pad:
            self._write(bytes(pad))
        return nbytes

    def close(self) -> None:
        if self._pending:
            raise AssertionError(f"{len(self._pending)} tensors of the table were not written")

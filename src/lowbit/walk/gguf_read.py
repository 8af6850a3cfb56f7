"""Opening GGUF files with one-line errors for damaged input.

Two readers:

* :func:`open_gguf`: gguf-py's ``GGUFReader`` (memory-mapped), for callers that want its field objects.
  It decodes every metadata value into numpy views as it opens the file, one Python object per element:
  for a 49 K-token vocabulary with its merges that is ~1 M objects, seconds and hundreds of MB.
* :func:`read_gguf` -> :class:`GGUFFile`: the header only, for streaming a file through (requantizing).
  Each metadata entry is kept as its byte span in the memory-mapped file plus its type; values are
  decoded on request, and arrays of strings are only walked to find where they end (never decoded
  unless asked for). Tensor data are ``uint8`` views of the map. This is what lets
  :mod:`lowbit.export.gguf` copy a tokenizer through as raw bytes.

The layout (GGUF v2/v3, little-endian): ``magic "GGUF" | version u32 | n_tensors u64 | n_kv u64``, then
``n_kv`` entries ``key (u64 len + utf-8) | type u32 | value``, then ``n_tensors`` infos ``name | n_dims u32
| ne[n_dims] u64 | type u32 | offset u64``, padding to ``general.alignment`` (32), the tensor data (each
at its offset from the data start). A string value is ``u64 len + bytes``; an array ``item type u32 |
count u64 | items``.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import InputFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4

# GGUF value types (gguf-py's GGUFValueType, ggml's enum gguf_type)
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = range(8, 13)

SCALAR_FORMATS: dict[int, str] = {
    T_UINT8: "<B",
    T_INT8: "<b",
    T_UINT16: "<H",
    T_INT16: "<h",
    T_UINT32: "<I",
    T_INT32: "<i",
    T_FLOAT32: "<f",
    T_BOOL: "<?",
    T_UINT64: "<Q",
    T_INT64: "<q",
    T_FLOAT64: "<d",
}
_SCALAR_DTYPES: dict[int, str] = {t: "?" if f == "<?" else f for t, f in SCALAR_FORMATS.items()}
_SCALAR_SIZES: dict[int, int] = {t: struct.calcsize(f) for t, f in SCALAR_FORMATS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFEntry:
    """One metadata entry: its key, types and where its bytes are in the file.

    ``start``..``end`` is the whole entry (key, type, value) as stored: copying those bytes copies the
    entry exactly. ``sub_type`` is the item type of an array (None otherwise); ``count`` its length.
    """

    key: str
    vtype: int
    sub_type: int | None
    count: int
    start: int
    value_start: int
    end: int

    @property
    def is_string_array(self) -> bool:
        return self.vtype == T_ARRAY and self.sub_type == T_STRING


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor: its name, ``ne`` (ggml order: ``ne[0]`` is the row length), type and bytes in the file."""

    name: str
    ne: tuple[int, ...]
    type: int  # ggml type value (lowbit.formats.gguf.types.GGMLType)
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy/PyTorch order (the reverse of ``ne``)."""
        return tuple(reversed(self.ne))


class GGUFFile:
    """A GGUF file's header, read lazily from a read-only memory map (see the module docstring).

    ``entries`` keeps the file's key order; ``tensors`` the file's tensor order. Tensor data are views of
    the map (no copy): :meth:`release` drops a span's pages from this process's memory once read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as f:
                size = f.seek(0, 2)
                if size < 24:
                    raise InputFileError(f"{path} is not a GGUF file (only {size} bytes); check the path")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise InputFileError(f"cannot open {path}: {e.strerror}") from e
        self.size = size
        self._buf = np.frombuffer(self._mm, dtype=np.uint8)
        if self._mm[:4] != GGUF_MAGIC:
            raise InputFileError(f"{path} is not a GGUF file (bad magic {self._mm[:4]!r}); check the path")
        self.version = _U32.unpack_from(self._mm, 4)[0]
        if self.version not in SUPPORTED_VERSIONS:
            what = "big-endian or " if self.version & 0xFFFF == 0 else ""
            raise InputFileError(
                f"{path}: GGUF version {self.version} is not supported ({what}not v2/v3); "
                "re-export it with a current llama.cpp"
            )
        n_tensors, n_kv = struct.unpack_from("<QQ", self._mm, 8)
        # every entry takes >= 13 bytes (empty key, type, 1-byte value); every tensor info >= 24
        if n_kv * 13 + n_tensors * 24 > size - 24:
            raise InputFileError(
                f"{path}: the header claims {n_kv} metadata entries and {n_tensors} tensors, more than the "
                f"file ({size} bytes) can hold; the file is damaged"
            )
        self.entries: dict[str, GGUFEntry] = {}
        off = 24
        for _ in range(n_kv):
            entry = self._entry(off)
            if entry.key in self.entries:
                raise InputFileError(f"{path}: metadata key {entry.key!r} appears twice; the file is damaged")
            self.entries[entry.key] = entry
            off = entry.end
        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name, off = self._string(off)
            n_dims = self._u32(off)
            off += 4
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise InputFileError(f"{path}: tensor {name!r} has {n_dims} dimensions; the file is damaged")
            self._need(off, 8 * n_dims + 12)
            ne = struct.unpack_from(f"<{n_dims}Q", self._mm, off)
            off += 8 * n_dims
            ttype, rel = struct.unpack_from("<IQ", self._mm, off)
            off += 12
            infos.append((name, tuple(int(n) for n in ne), int(ttype), int(rel)))
        self.alignment = DEFAULT_ALIGNMENT
        al = self.entries.get("general.alignment")
        if al is not None:
            if al.vtype != T_UINT32:
                raise InputFileError(f"{path}: general.alignment is not a uint32; the file is damaged")
            self.alignment = int(self.value("general.alignment"))
            if self.alignment == 0 or self.alignment & (self.alignment - 1):
                raise InputFileError(f"{path}: general.alignment {self.alignment} is not a power of two")
        self.data_offset = off + (-off) % self.alignment
        self.tensors = self._tensor_infos(infos)

    # ------------------------------------------------------------------------------------- parsing
    def _need(self, off: int, n: int) -> None:
        if n < 0 or off + n > self.size:
            raise InputFileError(
                f"{self.path} is truncated or damaged (a field at byte {off} runs past the end)"
            )

    def _u32(self, off: int) -> int:
        self._need(off, 4)
        return int(_U32.unpack_from(self._mm, off)[0])

    def _string(self, off: int) -> tuple[str, int]:
        self._need(off, 8)
        n = _U64.unpack_from(self._mm, off)[0]
        self._need(off + 8, n)
        raw = self._mm[off + 8 : off + 8 + n]
        try:
            return raw.decode("utf-8"), off + 8 + n
        except UnicodeDecodeError as e:
            raise InputFileError(
                f"{self.path}: a name at byte {off} is not UTF-8; the file is damaged"
            ) from e

    def _skip_value(self, off: int, vtype: int) -> int:
        """The offset just past a value of ``vtype`` at ``off`` (arrays walked, never decoded)."""
        size = _SCALAR_SIZES.get(vtype)
        if size is not None:
            self._need(off, size)
            return off + size
        if vtype == T_STRING:
            self._need(off, 8)
            n = _U64.unpack_from(self._mm, off)[0]
            self._need(off + 8, n)
            return off + 8 + n
        if vtype == T_ARRAY:
            self._need(off, 12)
            sub, count = struct.unpack_from("<IQ", self._mm, off)
            off += 12
            size = _SCALAR_SIZES.get(sub)
            if size is not None:
                self._need(off, size * count)
                return off + size * count
            if sub == T_STRING:
                if count * 8 > self.size - off:
                    self._need(off, count * 8)
                mm, unpack, end = self._mm, _U64.unpack_from, self.size
                for _ in range(count):  # variable lengths: one walk, no decoding
                    if off + 8 > end:
                        self._need(off, 8)
                    off += 8 + unpack(mm, off)[0]
                self._need(off, 0)
                return off
            if sub == T_ARRAY:
                if count > self.size - off:
                    self._need(off, count)
                for _ in range(count):
                    off = self._skip_value(off, T_ARRAY)
                return off
        raise InputFileError(
            f"{self.path}: unknown metadata value type {vtype} at byte {off}; the file is damaged"
        )

    def _entry(self, off: int) -> GGUFEntry:
        key, p = self._string(off)
        vtype = self._u32(p)
        p += 4
        sub: int | None = None
        count = 1
        if vtype == T_ARRAY:
            self._need(p, 12)
            sub, count = (int(v) for v in struct.unpack_from("<IQ", self._mm, p))
        end = self._skip_value(p, vtype)
        return GGUFEntry(key, int(vtype), sub, count, off, p, end)

    def _tensor_infos(self, infos: list[tuple[str, tuple[int, ...], int, int]]) -> list[GGUFTensorInfo]:
        from lowbit.errors import SchemeError
        from lowbit.formats.gguf.types import type_info

        out: list[GGUFTensorInfo] = []
        seen: set[str] = set()
        for name, ne, ttype, rel in infos:
            if name in seen:
                raise InputFileError(f"{self.path}: tensor {name!r} appears twice; the file is damaged")
            seen.add(name)
            try:
                info = type_info(ttype)
            except SchemeError as e:
                raise InputFileError(f"{self.path}: tensor {name!r} has unknown type {ttype}") from e
            if info.type_size == 0 or ne[0] % info.block_size:
                raise InputFileError(
                    f"{self.path}: tensor {name!r} has rows of {ne[0]}, not whole {info.name} blocks"
                )
            n = math.prod(ne)
            nbytes = n // info.block_size * info.type_size
            start = self.data_offset + rel
            if rel % self.alignment or start + nbytes > self.size:
                raise InputFileError(
                    f"{self.path}: tensor {name!r} lies outside the file or off its alignment; "
                    "the file is truncated or damaged"
                )
            out.append(GGUFTensorInfo(name, ne, ttype, start, nbytes))
        return out

    # ------------------------------------------------------------------------------------- access
    def raw(self, entry: GGUFEntry) -> memoryview:
        """The entry's bytes as stored (key, type and value)."""
        return memoryview(self._mm)[entry.start : entry.end]

    def value(self, key: str) -> Any:
        """The decoded value of ``key``: int/float/bool, str (UTF-8, undecodable bytes replaced), a list for
        arrays (numbers, or str for arrays of strings: slow for a vocabulary, so ask only when needed)."""
        e = self.entries[key]
        return self._decode(e.value_start, e.vtype)[0]

    def values(self, skip_string_arrays: bool = True) -> dict[str, Any]:
        """Every entry's decoded value (arrays of strings left out by default), in file order."""
        return {
            k: self.value(k)
            for k, e in self.entries.items()
            if not (skip_string_arrays and e.is_string_array)
        }

    def _decode(self, off: int, vtype: int) -> tuple[Any, int]:
        fmt = SCALAR_FORMATS.get(vtype)
        if fmt is not None:
            return struct.unpack_from(fmt, self._mm, off)[0], off + _SCALAR_SIZES[vtype]
        if vtype == T_STRING:
            n = _U64.unpack_from(self._mm, off)[0]
            return self._mm[off + 8 : off + 8 + n].decode("utf-8", errors="replace"), off + 8 + n
        sub, count = struct.unpack_from("<IQ", self._mm, off)
        off += 12
        if sub in _SCALAR_SIZES:
            arr = np.frombuffer(self._mm, dtype=np.dtype(_SCALAR_DTYPES[sub]), count=count, offset=off)
            return arr.tolist(), off + arr.nbytes
        items = []
        for _ in range(count):
            v, off = self._decode(off, sub)
            items.append(v)
        return items, off

    def tensor_data(self, t: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes, ``uint8 (nbytes,)``, a read-only view of the map."""
        return self._buf[t.offset : t.offset + t.nbytes]

    def release(self, start: int, nbytes: int) -> None:
        """``madvise(DONTNEED)`` over ``[start, start + nbytes)``: the pages (file-backed, re-readable)
        leave this process's resident memory; without it a walk over every tensor ends with the whole
        file counted in its RSS."""
        if not hasattr(mmap, "MADV_DONTNEED") or nbytes <= 0:
            return
        a = start - start % mmap.PAGESIZE
        with contextlib.suppress(OSError, ValueError):  # not fatal: memory use only
            self._mm.madvise(mmap.MADV_DONTNEED, a, start + nbytes - a)

    def __iter__(self) -> Iterator[GGUFTensorInfo]:
        return iter(self.tensors)


def read_gguf(path: str | Path) -> GGUFFile:
    """The header of a GGUF file (see :class:`GGUFFile`), or :class:`InputFileError` if it is not a
    readable GGUF file (bad magic, unsupported version, absurd counts, offsets or sizes outside the file)."""
    p = Path(path)
    try:
        return GGUFFile(p)
    except InputFileError:
        raise
    except (struct.error, ValueError, OverflowError, MemoryError) as e:
        raise InputFileError(f"{p} is a damaged or truncated GGUF file ({type(e).__name__}: {e})") from e


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` (memory-mapped) for ``path``, or :class:`InputFileError` if it is not a
    readable GGUF file (bad magic, unsupported version, offsets or sizes outside the file)."""
    from gguf import GGUFReader

    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise InputFileError(f"cannot open {path}: {e.strerror}") from e
    if magic != b"GGUF":
        raise InputFileError(f"{path} is not a GGUF file (bad magic {magic!r}); check the path")
    try:
        reader = GGUFReader(str(path), "r")
    except (ValueError, IndexError, KeyError, OverflowError, MemoryError, TypeError) as e:
        raise InputFileError(f"{path} is a damaged or truncated GGUF file ({type(e).__name__}: {e})") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise InputFileError(
                f"{path}: tensor {t.name} runs past the end of the file; the file is truncated"
            )
    return reader

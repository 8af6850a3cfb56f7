"""Opening GGUF files through gguf-py with one-line errors for damaged input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.errors import InputFileError


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

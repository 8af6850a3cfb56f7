"""A streaming safetensors writer: tensors are appended one at a time, so peak memory is one tensor.

Hand-written because ``safetensors.torch.save_file`` needs every tensor in memory at once, which defeats
the block-by-block walk. The file layout is the safetensors spec: an 8-byte little-endian header length,
a JSON header (name -> dtype, shape, data_offsets; ``__metadata__``), padded with spaces to 8 bytes, then
the raw little-endian tensor bytes. Files written here are read back with ``safetensors`` in the tests.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class StreamingSafetensorsWriter:
    """Append tensors with :meth:`add`; :meth:`close` writes ``path``. Use as a context manager."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.metadata = dict(metadata or {})
        self._header: dict[str, Any] = {}
        self._offset = 0
        self._data = tempfile.TemporaryFile(dir=path.parent)  # noqa: SIM115 - closed by close()/abort()

    @property
    def nbytes(self) -> int:
        return self._offset

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"safetensors cannot store dtype {tensor.dtype}")
        t = tensor.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self._offset, self._offset + len(raw)],
        }
        self._data.write(raw)
        self._offset += len(raw)

    def close(self) -> None:
        header = dict(self._header)
        if self.metadata:
            header["__metadata__"] = self.metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._data.seek(0)
        with self.path.open("wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(self._data, out, length=16 << 20)
        self._data.close()

    def abort(self) -> None:
        self._data.close()

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

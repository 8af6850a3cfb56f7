"""What is in a GGUF file or a safetensors checkpoint: tensors, types, sizes, metadata."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import InputFileError


def inspect_path(path: str | Path) -> dict[str, Any]:
    """A JSON-ready description of ``path`` (.gguf, a model directory, or one .safetensors file)."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p} does not exist")
    if p.is_file() and (p.suffix.lower() == ".gguf" or p.read_bytes()[:4] == b"GGUF"):
        return _inspect_gguf(p)
    return _inspect_safetensors(p)


def _summary(
    path: Path, kind: str, tensors: list[dict[str, Any]], params: int, **extra: Any
) -> dict[str, Any]:
    n_bytes = sum(int(t["nbytes"]) for t in tensors)
    return {
        "path": str(path),
        "kind": kind,
        "n_tensors": len(tensors),
        "n_params": params,
        "n_bytes": n_bytes,
        "bits_per_weight": 8 * n_bytes / params if params else float("nan"),
        "types": dict(Counter(str(t["type"]) for t in tensors)),
        "tensors": tensors,
        **extra,
    }


def _inspect_gguf(path: Path) -> dict[str, Any]:
    from gguf import GGUFValueType

    from lowbit.walk.gguf_read import open_gguf

    reader = open_gguf(path)
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.data) > 16:
            meta[key] = f"[array of {len(field.data)}]"
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError):
            meta[key] = "?"
    tensors = []
    params = 0
    for t in reader.tensors:
        shape = [int(s) for s in reversed(t.shape.tolist())]
        n = int(np.prod(shape))
        params += n
        tensors.append(
            {
                "name": t.name,
                "type": t.tensor_type.name,
                "shape": shape,
                "nbytes": int(t.n_bytes),
                "bits_per_weight": 8 * int(t.n_bytes) / n if n else 0.0,
            }
        )
    return _summary(
        path,
        "gguf",
        tensors,
        params,
        metadata=meta,
        gguf_version=int(reader.fields["GGUF.version"].contents()),
    )


def _inspect_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise InputFileError(f"{path} has no .safetensors files and is not a GGUF file")
    config: dict[str, Any] = {}
    if path.is_dir() and (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
    qcfg = config.get("quantization_config")
    from lowbit.walk.sources import _SAFETENSORS_DTYPE_BYTES

    tensors = []
    logical: dict[str, int] = {}
    for f in files:
        try:
            h = safe_open(str(f), framework="pt")
        except (SafetensorError, OSError) as e:
            raise InputFileError(f"{f} is not a readable safetensors file ({e})") from e
        for k in h.keys():  # noqa: SIM118
            sl = h.get_slice(k)
            shape = [int(s) for s in sl.get_shape()]
            dt = sl.get_dtype()
            nbytes = int(np.prod(shape)) * _SAFETENSORS_DTYPE_BYTES.get(dt, 4)
            tensors.append({"name": k, "type": dt, "shape": shape, "nbytes": nbytes})
            if k.endswith(".weight_shape"):
                logical[k.rpartition(".")[0]] = int(np.prod(h.get_tensor(k).tolist()))
            elif ".weight.quant_state.bitsandbytes__" in k:  # bitsandbytes 4-bit: shape in its JSON state
                state = json.loads(bytes(h.get_tensor(k).tolist()).decode())
                logical[k.split(".weight.quant_state.")[0]] = int(np.prod(state["shape"]))
    params = _logical_params(tensors, logical)
    return _summary(
        path, "safetensors", tensors, params, quantization_config=qcfg, model_type=config.get("model_type")
    )


def _logical_params(tensors: list[dict[str, Any]], logical: dict[str, int]) -> int:
    """Weights the checkpoint represents: a packed weight counts its logical shape (``weight_shape``),
    scales and zero points count as storage, not as weights."""
    total = sum(logical.values())
    for t in tensors:
        name = t["name"]
        module = name.split(".weight")[0] if ".weight" in name else name.rpartition(".")[0]
        if module in logical:
            continue
        total += int(np.prod(t["shape"]))
    return total

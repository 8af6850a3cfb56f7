"""Lazy, memory-mapped model sources: a Hugging Face safetensors directory or a GGUF file.

Every source presents the model under its Hugging Face tensor names, reads one tensor at a time
(nothing is loaded until asked for), and groups tensors by transformer block so that callers walk the
model one block at a time. GGUF tensors are dequantized on read and llama.cpp's rotary row permutation
of q/k is undone, so a GGUF file and the checkpoint it came from look the same to the rest of lowbit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lowbit.errors import InputFileError, SchemeError
from lowbit.formats.base import QuantizedTensor
from lowbit.models.registry import GGUF_TO_MODEL_TYPE, Architecture, get_architecture

if TYPE_CHECKING:
    from lowbit.formats.activations import LinearActivation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInfo:
    """What a source knows about one tensor without reading it. ``shape`` is PyTorch order."""

    name: str
    shape: tuple[int, ...]
    storage: str  # storage type as in the file: "F32", "BF16", "Q4_1", "int32 packed", ...
    nbytes: int


@dataclass(frozen=True)
class BlockGroup:
    """Tensor names of one transformer block (``index``), or of the globals (``index`` None)."""

    index: int | None
    names: tuple[str, ...]


class ModelSource(ABC):
    """A model whose tensors are read lazily, by Hugging Face name."""

    path: Path
    config: dict[str, Any]
    arch: Architecture

    @property
    def activations(self) -> dict[str, LinearActivation]:
        """Module name -> how that linear's input is quantized at run time (W8A8 / LLM.int8()
        checkpoints); empty when activations run in float."""
        return self.__dict__.setdefault("_activations", {})

    @abstractmethod
    def names(self) -> list[str]:
        """All tensor names, in file order."""

    @abstractmethod
    def info(self, name: str) -> TensorInfo: ...

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """The tensor as floats (its stored float dtype, or float32 if it had to be dequantized)."""

    def read_stored(self, name: str) -> QuantizedTensor | None:
        """``name`` as a quantized checkpoint stores it: its codec's result (codes and parameters;
        the result's ``codec`` attribute names the codec, whose ``dequantize`` gives :meth:`read`), for
        converting it without rounding twice (:meth:`lowbit.formats.base.Codec.from_grid`); None for
        tensors stored in float and for sources that present weights otherwise (GGUF, rotated)."""
        return None

    @property
    def holds_quantized(self) -> bool:
        """Whether some tensors are stored quantized (:meth:`read_stored` reads them)."""
        return False

    def tokenizer(self) -> Any:
        """A ``transformers`` tokenizer for this model, loaded once per source (loading one from a GGUF
        file parses its whole vocabulary: seconds)."""
        tok = self.__dict__.get("_tokenizer")
        if tok is None:
            tok = self.__dict__["_tokenizer"] = self._load_tokenizer()
        return tok

    @abstractmethod
    def _load_tokenizer(self) -> Any:
        """A new ``transformers`` tokenizer for this model."""

    @property
    def format_name(self) -> str:
        return type(self).__name__

    @property
    def origin(self) -> ModelSource:
        """The source whose files this one presents: itself, or what a wrapper (a rotation) wraps."""
        return self

    def blocks(self) -> list[BlockGroup]:
        """Tensors grouped as: globals before the blocks, each block in order, globals after."""
        by_block: dict[int, list[str]] = {}
        head: list[str] = []
        tail: list[str] = []
        for name in self.names():
            split = self.arch.split_block_name(name)
            if split is None:
                (tail if by_block else head).append(name)
            else:
                by_block.setdefault(split[0], []).append(name)
        groups = [BlockGroup(None, tuple(head))] if head else []
        groups += [BlockGroup(i, tuple(by_block[i])) for i in sorted(by_block)]
        if tail:
            groups.append(BlockGroup(None, tuple(tail)))
        return groups

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles (sources are also usable as context managers)."""

    def __enter__(self) -> ModelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- safetensors
class SafetensorsSource(ModelSource):
    """A Hugging Face model directory: ``config.json`` + ``model.safetensors`` or sharded with
    ``model.safetensors.index.json``. Tensors are memory-mapped through ``safetensors.safe_open``."""

    def __init__(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise InputFileError(
                f"{path} has no config.json; give a Hugging Face model directory or a .gguf file"
            )
        try:
            self.config = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputFileError(f"{cfg_path} is not valid JSON ({e}); restore the file") from e
        self.arch = get_architecture(self.config.get("model_type"))
        files = _safetensors_files(path)
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise InputFileError(
                    f"{f} is not a readable safetensors file ({e}); re-download or re-export it"
                ) from e
            self._handles[f] = h
            for k in h.keys():  # noqa: SIM118 - safe_open handles are not mappings
                self._where[k] = f
        self._order = list(self._where)
        self._decoders: dict[str, Callable[[], torch.Tensor]] = {}
        self._stored: dict[str, Callable[[], QuantizedTensor]] = {}
        self._hidden: set[str] = set()
        # Set by the quantized-checkpoint readers: bits/weight of the stored quantized linears.
        self.linear_bits_per_weight: float | None = None

    def names(self) -> list[str]:
        return [n for n in self._order if n not in self._hidden]

    def raw_names(self) -> list[str]:
        """Names as stored in the files (quantized checkpoints store several tensors per weight)."""
        return list(self._where)

    def raw(self, name: str) -> torch.Tensor:
        """A stored tensor as it is in the file (no decoding)."""
        if name not in self._where:
            raise InputFileError(f"tensor {name!r} is not in {self.path}")
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as e:  # safetensors raises several types for a truncated buffer
            raise InputFileError(
                f"cannot read tensor {name!r} from {self._where[name]} ({e}); the file is damaged"
            ) from e

    def raw_info(self, name: str) -> TensorInfo:
        h = self._handles[self._where[name]]
        sl = h.get_slice(name)
        shape = tuple(int(s) for s in sl.get_shape())
        dtype = sl.get_dtype()
        nbytes = int(np.prod(shape, dtype=np.int64)) * _SAFETENSORS_DTYPE_BYTES.get(dtype, 4)
        return TensorInfo(name, shape, dtype, nbytes)

    def add_virtual(
        self,
        name: str,
        decode: Callable[[], torch.Tensor],
        replaces: list[str],
        at: str,
        stored: Callable[[], QuantizedTensor] | None = None,
    ) -> None:
        """Present ``name`` (read through ``decode``) in place of the stored tensors ``replaces``;
        ``stored`` reads it as the quantized result it is stored as (a codec's, whose ``codec``
        attribute names it)."""
        self._decoders[name] = decode
        if stored is not None:
            self._stored[name] = stored
        self._hidden.update(replaces)
        if name not in self._order:
            self._order.insert(self._order.index(at), name)

    def read_stored(self, name: str) -> QuantizedTensor | None:
        read = self._stored.get(name)
        return None if read is None else read()

    @property
    def holds_quantized(self) -> bool:
        return bool(self._stored)

    def info(self, name: str) -> TensorInfo:
        if name in self._decoders:
            t = self._decoders[name]()
            return TensorInfo(name, tuple(t.shape), "quantized", 0)
        return self.raw_info(name)

    def read(self, name: str) -> torch.Tensor:
        if name in self._decoders:
            return self._decoders[name]()
        return self.raw(name)

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path))

    def close(self) -> None:
        self._handles.clear()


_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise InputFileError(f"{index} is not a valid safetensors index ({e})") from e
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputFileError(
                f"{path} lacks shard(s) {', '.join(missing)} named in its index; download them"
            )
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise InputFileError(
            f"{path} holds only pickle checkpoints (.bin/.pt), which can run code when loaded; "
            "convert them to safetensors first (e.g. transformers' save_pretrained(safe_serialization=True))"
        )
    raise InputFileError(f"{path} has no .safetensors weights")


# ---------------------------------------------------------------------------- GGUF
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row permutation (convert_hf_to_gguf's ``permute``) of a q/k weight."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary row permutation of a q/k weight (HF half-split -> interleaved pairs)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource(ModelSource):
    """A GGUF file (any tensor type gguf-py can dequantize), read through ``gguf.GGUFReader``'s memmap."""

    def __init__(self, path: Path) -> None:
        from lowbit.walk.gguf_read import open_gguf

        self.path = path
        self.reader = open_gguf(path)
        self.config = _llama_family_config(self.reader) or _gguf_config(path)
        self.arch = get_architecture(self.config.get("model_type"))
        inv_block = {v: k for k, v in self.arch.gguf_block_names.items()}
        inv_global = {v: k for k, v in self.arch.gguf_global_names.items()}
        self._map: dict[str, tuple[Any, int | None]] = {}  # HF name -> (reader tensor, expert index)
        for t in self.reader.tensors:
            m = _GGUF_BLOCK.match(t.name)
            if m:
                i, gname, suffix = int(m.group(1)), m.group(2), m.group(3)
                rel = inv_block.get(gname)
                if rel is None:
                    log.warning(
                        "GGUF tensor %s has no Hugging Face name in the %s registry; skipped",
                        t.name,
                        self.arch.name,
                    )
                    continue
                prefix = self.arch.block_prefix.format(i=i)
                if "{e}" in rel:
                    for e in range(int(t.shape[-1]) if len(t.shape) == 3 else 1):
                        self._map[f"{prefix}{rel.format(e=e)}.{suffix}"] = (t, e)
                else:
                    self._map[f"{prefix}{rel}.{suffix}"] = (t, None)
                continue
            base, _, suffix = t.name.rpartition(".")
            rel = inv_global.get(base)
            if rel is None:
                log.warning("GGUF tensor %s has no Hugging Face name; skipped", t.name)
                continue
            self._map[f"{rel}.{suffix}"] = (t, None)
        self._n_head = int(self.config["num_attention_heads"])
        self._n_kv = int(self.config.get("num_key_value_heads", self._n_head))

    def names(self) -> list[str]:
        return list(self._map)

    def gguf_tensor(self, name: str) -> Any:
        return self._map[name][0]

    def info(self, name: str) -> TensorInfo:
        t, e = self._lookup(name)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        if e is not None:
            shape = shape[1:]
        return TensorInfo(
            name, shape, t.tensor_type.name, int(t.n_bytes) // (1 if e is None else int(t.shape[-1]))
        )

    def _lookup(self, name: str) -> tuple[Any, int | None]:
        if name not in self._map:
            raise InputFileError(f"tensor {name!r} is not in {self.path}")
        return self._map[name]

    def read(self, name: str) -> torch.Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        from lowbit.formats.gguf.block import GGMLBlockCodec, get_codec

        t, e = self._lookup(name)
        data = t.data if e is None else t.data[e]
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        if e is not None:
            shape = shape[1:]
        codec: GGMLBlockCodec | None = None  # lowbit's (compiled for the legacy and k-quant types)
        if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            with contextlib.suppress(SchemeError):
                codec = get_codec(int(t.tensor_type))
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                arr = np.asarray(data).reshape(shape)
                w = torch.from_numpy(arr.copy())
            elif codec is not None:
                raw = np.asarray(data)
                w = torch.from_numpy(
                    codec.dequantize_rows(raw.reshape(-1, raw.shape[-1]), shape[-1]).reshape(shape)
                )
            else:
                w = torch.from_numpy(
                    np.ascontiguousarray(dequantize(np.asarray(data), t.tensor_type)).reshape(shape)
                )
        except (ValueError, NotImplementedError) as e2:
            raise InputFileError(
                f"cannot dequantize {t.name} ({t.tensor_type.name}) from {self.path}: {e2}"
            ) from e2
        self._release(t)
        if self.arch.gguf_permute_qk and name.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, self._n_head)
        elif self.arch.gguf_permute_qk and name.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, self._n_kv)
        return w

    def _release(self, t: Any) -> None:
        """Drop the file pages of a tensor just read (copied out) from this process's resident memory:
        the walk reads each tensor once, and otherwise the whole mapped file would count in its RSS."""
        mm = getattr(self.reader.data, "_mmap", None)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = int(t.data_offset) - int(t.data_offset) % mmap.PAGESIZE
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_DONTNEED, start, int(t.data_offset) + int(t.n_bytes) - start)

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)


# GGUF architectures whose Hugging Face config lowbit derives itself from the metadata (the whole config of
# these families is in these keys); others go through transformers' GGUF loader, which re-reads the file.
_SIMPLE_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _llama_family_config(reader: Any) -> dict[str, Any] | None:
    """The Hugging Face config of a llama/qwen2/qwen3 GGUF from its metadata, or None for other archs."""
    fields = reader.fields

    def get(key: str, default: Any = None) -> Any:
        f = fields.get(key)
        if f is None:
            return default
        v = f.contents()
        return max(v) if isinstance(v, list) and v and all(isinstance(x, int) for x in v) else v

    arch = get("general.architecture")
    if arch not in _SIMPLE_GGUF_ARCHS:
        return None
    hidden = int(get(f"{arch}.embedding_length"))
    heads = int(get(f"{arch}.attention.head_count"))
    tokens = fields.get("tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    cfg: dict[str, Any] = {
        "model_type": _SIMPLE_GGUF_ARCHS[arch],
        "num_hidden_layers": int(get(f"{arch}.block_count")),
        "hidden_size": hidden,
        "intermediate_size": int(get(f"{arch}.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(
            get(f"{arch}.attention.key_length", get(f"{arch}.rope.dimension_count", hidden // heads))
        ),
        "max_position_embeddings": int(get(f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get(f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": len(tokens.data) if tokens is not None else int(get(f"{arch}.vocab_size")),
        "tie_word_embeddings": "output.weight" not in names,
    }
    for key, hf in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("padding_token_id", "pad_token_id"),
    ):
        v = get(f"tokenizer.ggml.{key}")
        if v is not None:
            cfg[hf] = int(v)
    if get(f"{arch}.rope.scaling.type") not in (None, "none"):
        return None  # rope scaling: let transformers' loader map it
    return cfg


def _gguf_config(path: Path) -> dict[str, Any]:
    """The Hugging Face config of a GGUF file, as transformers' GGUF loader derives it."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        cfg = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    except (ValueError, KeyError, NotImplementedError) as e:
        raise InputFileError(f"cannot read the model configuration of {path}: {e}") from e
    arch_name = cfg.get("model_type")
    cfg["model_type"] = GGUF_TO_MODEL_TYPE.get(str(arch_name), str(arch_name))
    return cfg


def open_model(path: str | Path) -> ModelSource:
    """A :class:`ModelSource` for a model directory or a ``.gguf`` file."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p} does not exist; give a Hugging Face model directory or a .gguf file")
    if p.is_dir():
        from lowbit.walk.quantized import attach_quantized_decoders

        src = SafetensorsSource(p)
        attach_quantized_decoders(src)
        return src
    if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
        return GGUFSource(p)
    if p.suffix in (".bin", ".pt", ".pth", ".pkl"):
        raise InputFileError(
            f"{p} is a pickle checkpoint, which can run code when loaded; convert it to safetensors"
        )
    raise InputFileError(f"{p} is neither a model directory nor a GGUF file")


def _has_gguf_magic(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def iter_blocks(source: ModelSource) -> Iterator[BlockGroup]:
    yield from source.blocks()

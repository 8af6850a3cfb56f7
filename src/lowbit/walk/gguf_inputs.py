"""The tensors of a GGUF file or of a Hugging Face directory as the GGUF writer reads them: lazily, in
pieces of float32 rows, each piece's input pages released once it is converted.

* a GGUF file (:func:`gguf_inputs`): the tensors in llama.cpp's order (by layer, then by name: what
  llama-quantize walks), each readable as its stored bytes or as float32 rows (a view of the map for
  F32, a widening for F16/BF16, ggml's ``to_float`` for block types), already in llama.cpp's rotary
  layout. No torch is imported.
* a Hugging Face directory (:func:`hf_inputs`): the tensors as llama.cpp's ``convert_hf_to_gguf.py``
  lays them out (checkpoint order, GGUF names, q/k rows rotary-permuted, no ``output.weight`` when the
  embeddings are tied), read once per tensor through the source.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lowbit.errors import InputFileError, SchemeError
from lowbit.formats.gguf.mixes import llama_order_key
from lowbit.formats.gguf.types import GGMLType, tensor_nbytes
from lowbit.walk.gguf_read import GGUFFile, GGUFTensorInfo

if TYPE_CHECKING:  # torch-based sources are imported only for Hugging Face input
    from lowbit.walk.sources import SafetensorsSource

PLAIN_FLOATS = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})


@dataclass(frozen=True)
class TensorInput:
    """One tensor of the output: where its floats (or bytes) come from, and the type it becomes
    (``dst_type``: the input's own type until a mix assigns one)."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order: last dim = ggml ne[0]
    src_type: GGMLType  # as stored in the input (HF: as convert_hf_to_gguf would store it)
    dst_type: GGMLType
    # float32 rows [start, stop) of the tensor viewed as (rows, ne0)
    float_rows: Callable[[int, int], np.ndarray] = field(compare=False)
    # the stored bytes, when the input already holds the tensor in ``dst_type`` (None for HF input)
    raw: Callable[[], np.ndarray] | None = field(default=None, compare=False)
    # drops the input pages of this tensor from memory once it is written (they are re-readable)
    release: Callable[[], None] = field(default=lambda: None, compare=False)
    # the same for rows [start, stop) once converted: a large tensor never sits whole in memory
    release_rows: Callable[[int, int], None] = field(default=lambda a, b: None, compare=False)

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def ne0(self) -> int:
        return int(self.shape[-1])


def plain_to_float(data: np.ndarray, t: GGMLType) -> np.ndarray:
    if t == GGMLType.F32:
        return np.asarray(data, dtype=np.float32)
    if t == GGMLType.F16:
        return np.asarray(data).view(np.float16).astype(np.float32)  # exact
    # BF16 is the top half of a float32: widening is exact
    u16 = np.asarray(data).view(np.uint16)
    return (u16.astype(np.uint32) << 16).view(np.float32)


def gguf_float_rows(g: GGUFFile, t: GGUFTensorInfo) -> Callable[[int, int], np.ndarray]:
    """float32 rows [start, stop) of tensor ``t`` viewed as (rows, ne0): a view of the map for F32,
    a widening for F16/BF16, the codec's ``dequantize_rows`` (bit-exact with ggml's ``to_float``;
    compiled for the legacy and k-quant types) for block types, gguf-py's ``dequantize`` for block
    types lowbit has no codec of."""
    from lowbit.formats.gguf.block import GGMLBlockCodec, get_codec

    ttype = GGMLType(t.type)
    ne0 = int(t.ne[0])
    codec: GGMLBlockCodec | None = None
    if ttype not in PLAIN_FLOATS:
        with contextlib.suppress(SchemeError):
            codec = get_codec(ttype)

    def rows(start: int, stop: int) -> np.ndarray:
        data = g.tensor_data(t)
        if ttype in PLAIN_FLOATS:
            flat = data.view(np.float32 if ttype == GGMLType.F32 else np.uint16)
            return plain_to_float(flat[start * ne0 : stop * ne0], ttype).reshape(stop - start, ne0)
        raw = data.reshape(-1, tensor_nbytes(ttype, (ne0,)))
        if codec is not None:
            return codec.dequantize_rows(raw[start:stop], ne0)
        from gguf.quants import dequantize

        try:
            out = dequantize(raw[start:stop], ttype)
        except (ValueError, NotImplementedError) as e:
            raise InputFileError(f"cannot dequantize {t.name} ({ttype.name}): {e}") from e
        return np.ascontiguousarray(out, dtype=np.float32).reshape(stop - start, ne0)

    return rows


def gguf_inputs(g: GGUFFile) -> tuple[list[TensorInput], dict[str, Any]]:
    """Tensors of a GGUF input in llama.cpp's order, and its metadata values (arrays of strings, the
    tokenizer's, are not decoded: they are copied through as bytes)."""
    items: list[TensorInput] = []
    for t in g.tensors:
        ttype = GGMLType(t.type)

        def raw(t: GGUFTensorInfo = t) -> np.ndarray:
            return g.tensor_data(t)

        def release(t: GGUFTensorInfo = t) -> None:
            g.release(t.offset, t.nbytes)

        def release_rows(a: int, b: int, t: GGUFTensorInfo = t) -> None:
            rb = tensor_nbytes(GGMLType(t.type), (t.ne[0],))
            g.release(t.offset + a * rb, (b - a) * rb)

        items.append(
            TensorInput(
                name=t.name,
                shape=t.shape,
                src_type=ttype,
                dst_type=ttype,
                float_rows=gguf_float_rows(g, t),
                raw=raw,
                release=release,
                release_rows=release_rows,
            )
        )
    items.sort(key=lambda it: llama_order_key(it.name))
    return items, g.values()


# safetensors dtype -> the type convert_hf_to_gguf stores 2-D tensors in (--outtype = the source's type)
_HF_STORAGE_TYPE: Mapping[str, GGMLType] = {"F32": GGMLType.F32, "F16": GGMLType.F16, "BF16": GGMLType.BF16}


def hf_inputs(source: SafetensorsSource) -> list[TensorInput]:
    """Tensors of a llama-family HF checkpoint as convert_hf_to_gguf lays them out (checkpoint order)."""
    arch = source.arch
    cfg = source.config
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    tied = source.tied_embeddings
    items: list[TensorInput] = []
    for name in source.names():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp
        if tied and name == f"{arch.lm_head}.weight":
            continue  # llama.cpp reads the tied output from token_embd
        gname = arch.gguf_name(name)
        if gname is None:
            raise InputFileError(
                f"tensor {name} of {source.path} has no GGUF name for architecture {arch.name}; "
                "lowbit cannot convert this checkpoint (llama.cpp's convert_hf_to_gguf.py may)"
            )
        info = source.info(name)
        shape = tuple(int(s) for s in info.shape)
        heads = None
        if arch.gguf_permute_qk and name.endswith("self_attn.q_proj.weight"):
            heads = n_head
        elif arch.gguf_permute_qk and name.endswith("self_attn.k_proj.weight"):
            heads = n_kv
        # the converter keeps 1-D tensors in F32; decoded quantized checkpoints count as F32
        src_type = GGMLType.F32 if len(shape) <= 1 else _HF_STORAGE_TYPE.get(info.storage, GGMLType.F32)
        rows, release = _hf_float_rows(source, name, shape, heads)
        items.append(
            TensorInput(
                name=gname,
                shape=shape,
                src_type=src_type,
                dst_type=src_type,
                float_rows=rows,
                release=release,
            )
        )
    return items


def _hf_float_rows(
    source: SafetensorsSource, name: str, shape: tuple[int, ...], heads: int | None
) -> tuple[Callable[[int, int], np.ndarray], Callable[[], None]]:
    """float32 rows of an HF tensor (read once, rotary-permuted, widened), and its release."""
    cache: dict[str, np.ndarray] = {}
    lock = threading.Lock()
    ne0 = int(shape[-1])

    def rows(start: int, stop: int) -> np.ndarray:
        with lock:  # pieces are converted by several threads: the first one reads the tensor
            if "w" not in cache:
                w = source.read(name)
                if heads is not None:
                    from lowbit.walk.sources import permute_qk

                    w = permute_qk(w, heads)
                # widening bf16/f16 to float32 is exact
                cache["w"] = np.ascontiguousarray(w.float().numpy()).reshape(-1, ne0)
            return cache["w"][start:stop]

    return rows, cache.clear

"""GGUF files that llama.cpp loads: llama-quantize's mixes, written one tensor at a time.

Two inputs, two tools imitated:

* **A GGUF file** (read by :func:`lowbit.walk.gguf_read.read_gguf`): lowbit acts as ``llama-quantize``
  (with ``--allow-requantize``). Every metadata key of the input is copied in its order;
  ``general.quantization_version`` (2) and ``general.file_type`` (the mix's ftype) are then set again,
  which moves them to the end, as ggml's ``gguf_set_val_u32`` does; the ``split.*`` keys are dropped;
  ``quantize.imatrix.*`` keys follow when an importance matrix is used. Tensors are written in
  llama.cpp's order (by layer, then by name: llama-quantize walks a sorted map), each with the type
  :func:`lowbit.formats.gguf.mixes.tensor_types` chooses. The input's metadata entries are copied as
  the bytes they are in the file (the tokenizer's arrays are never decoded). A tensor whose type does
  not change is copied byte for byte; the others are read raw (already in llama.cpp's rotary layout,
  so never un-permuted), dequantized to float32 and quantized with lowbit's bit-exact ggml codecs. The result is the very file
  llama-quantize writes, byte for byte, wherever the codecs of its types are available.
* **A Hugging Face directory** (:class:`~lowbit.walk.sources.SafetensorsSource`, llama family): lowbit
  acts as llama.cpp's ``convert_hf_to_gguf.py`` with ``--outtype`` the source's float type, followed by
  llama-quantize, in one pass. The metadata and the tokenizer are what the converter writes (gguf-py's
  ``Metadata``, ``SpecialVocab`` and ``LlamaHfVocab`` do part of it), the tensors keep the checkpoint's
  order, q/k rows get llama.cpp's rotary permutation, and tied embeddings leave no ``output.weight``.

Peak memory is a few pieces of rows, not a tensor: the header, metadata and tensor table are written
first (:class:`lowbit.export.gguf_stream.GGUFStreamWriter`), then each tensor is read from the memory
map in pieces of rows that a pool of threads (one per CPU) converts; the pieces are written in order as
they complete, and each piece's input pages are released once it is converted. No torch is imported
for GGUF input.
The output appears only when complete (:func:`lowbit.export.atomic.atomic_file`).

Importance matrices: :class:`lowbit.calib.imatrix.Imatrix` (``load_imatrix`` reads llama-imatrix's GGUF
and legacy ``.dat`` files) gives, per tensor, the vector llama-quantize passes to ggml's quantizers; a
plain mapping of GGUF names to vectors works too.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import logging
import math
import operator
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lowbit.calib.imatrix import Imatrix
from lowbit.errors import InputFileError, NonFiniteWeightError, SchemeError, UnsupportedArchitectureError
from lowbit.export.atomic import atomic_file, check_output
from lowbit.export.gguf_stream import GGUFStreamWriter, TensorEntry, encode_kv
from lowbit.formats.gguf.mixes import (
    Category,
    ModelInfo,
    TensorSpec,
    allows_quantization,
    category_of,
    get_mix,
    llama_order_key,
    requires_imatrix,
    tensor_types,
)
from lowbit.formats.gguf.types import GGMLType, is_quantized, tensor_nbytes
from lowbit.walk.gguf_read import T_STRING, T_UINT32, GGUFFile, GGUFTensorInfo, read_gguf

if TYPE_CHECKING:  # torch-based sources are imported only for Hugging Face input
    from lowbit.walk.sources import ModelSource, SafetensorsSource

log = logging.getLogger(__name__)

QUANTIZATION_VERSION = 2
"""ggml's ``GGML_QNT_VERSION``: what ``general.quantization_version`` says in every file llama.cpp writes."""

# Rows converted at a time by one thread (whole rows, at least one): bounds the float32 scratch and
# the codecs' intermediates, and is fine enough for two threads to share out a tensor evenly.
_PIECE_ELEMENTS = 1 << 18

_PLAIN_FLOATS = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})
_SPLIT_KEYS = frozenset({"split.no", "split.count", "split.tensors.count"})
_DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT


# ---------------------------------------------------------------------------------------- imatrix
@dataclass(frozen=True)
class _ImatrixUse:
    """The importance vectors for one run, and what the ``quantize.imatrix.*`` keys record."""

    vector: Callable[[str], np.ndarray | None]  # GGUF name -> float32 (n_per_row * n_mat,) or None
    n_entries: int
    file: str | None
    dataset: str | None
    chunk_count: int


def _imatrix_use(imatrix: Imatrix | Mapping[str, np.ndarray] | None, file: str | None) -> _ImatrixUse | None:
    if imatrix is None:
        return None
    if isinstance(imatrix, Imatrix):
        if not imatrix.legacy and not imatrix.has_metadata:
            raise InputFileError(
                f"the importance matrix {file or ''} lacks the imatrix.* metadata keys, which llama-quantize "
                "requires; recompute it with llama-imatrix or lowbit"
            )
        im = imatrix

        def vector(name: str) -> np.ndarray | None:
            return im.importance(name) if name in im else None

        return _ImatrixUse(
            vector, len(im), file, im.datasets[0] if im.datasets else None, int(im.chunk_count)
        )
    table = {k: np.asarray(v, dtype=np.float32).reshape(-1) for k, v in imatrix.items()}
    return _ImatrixUse(table.get, len(table), file, None, 0)


# ---------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class GGUFTensorRecord:
    """One tensor as written: GGUF name, numpy-order shape, type, bytes."""

    name: str
    shape: tuple[int, ...]
    type: str
    nbytes: int
    quantizable: bool


@dataclass(frozen=True)
class GGUFReport:
    """What :func:`write_gguf` wrote."""

    output: Path
    mix: str
    file_type: int
    input_kind: str  # "gguf" (llama-quantize) or "hf" (convert_hf_to_gguf + llama-quantize)
    seconds: float
    file_bytes: int
    tensors: tuple[GGUFTensorRecord, ...] = field(repr=False)
    imatrix_entries_used: int = 0

    @property
    def quantizable_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors if t.quantizable)

    @property
    def linear_bits_per_weight(self) -> float:
        """Bits per weight of the tensors llama-quantize may quantize (2-D weights except norms ...)."""
        n = self.quantizable_params
        return 8 * sum(t.nbytes for t in self.tensors if t.quantizable) / n if n else math.nan

    @property
    def model_bits_per_weight(self) -> float:
        n = sum(math.prod(t.shape) for t in self.tensors)
        return 8 * sum(t.nbytes for t in self.tensors) / n if n else math.nan

    @property
    def types(self) -> dict[str, str]:
        return {t.name: t.type for t in self.tensors}


# ----------------------------------------------------------------------------------- tensor inputs
@dataclass(frozen=True)
class _Planned:
    """One output tensor: where its floats come from and what it becomes."""

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


def _plain_to_float(data: np.ndarray, t: GGMLType) -> np.ndarray:
    if t == GGMLType.F32:
        return np.asarray(data, dtype=np.float32)
    if t == GGMLType.F16:
        return np.asarray(data).view(np.float16).astype(np.float32)  # exact
    # BF16 is the top half of a float32: widening is exact
    u16 = np.asarray(data).view(np.uint16)
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _gguf_float_rows(g: GGUFFile, t: GGUFTensorInfo) -> Callable[[int, int], np.ndarray]:
    """float32 rows [start, stop) of tensor ``t`` viewed as (rows, ne0): a view of the map for F32,
    a widening for F16/BF16, the codec's ``dequantize_rows`` (bit-exact with ggml's ``to_float``;
    compiled for the legacy and k-quant types) for block types, gguf-py's ``dequantize`` for block
    types lowbit has no codec of."""
    from lowbit.formats.gguf.block import GGMLBlockCodec, get_codec

    ttype = GGMLType(t.type)
    ne0 = int(t.ne[0])
    codec: GGMLBlockCodec | None = None
    if ttype not in _PLAIN_FLOATS:
        with contextlib.suppress(SchemeError):
            codec = get_codec(ttype)

    def rows(start: int, stop: int) -> np.ndarray:
        data = g.tensor_data(t)
        if ttype in _PLAIN_FLOATS:
            flat = data.view(np.float32 if ttype == GGMLType.F32 else np.uint16)
            return _plain_to_float(flat[start * ne0 : stop * ne0], ttype).reshape(stop - start, ne0)
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


def _plan_gguf(g: GGUFFile) -> tuple[list[_Planned], dict[str, Any]]:
    """Tensors of a GGUF input in llama.cpp's order, and its metadata values (arrays of strings, the
    tokenizer's, are not decoded: they are copied through as bytes)."""
    items: list[_Planned] = []
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
            _Planned(
                name=t.name,
                shape=t.shape,
                src_type=ttype,
                dst_type=ttype,
                float_rows=_gguf_float_rows(g, t),
                raw=raw,
                release=release,
                release_rows=release_rows,
            )
        )
    items.sort(key=lambda it: llama_order_key(it.name))
    return items, g.values()


# safetensors dtype -> the type convert_hf_to_gguf stores 2-D tensors in (--outtype = the source's type)
_HF_STORAGE_TYPE: Mapping[str, GGMLType] = {"F32": GGMLType.F32, "F16": GGMLType.F16, "BF16": GGMLType.BF16}


def _plan_hf(source: SafetensorsSource) -> list[_Planned]:
    """Tensors of a llama-family HF checkpoint as convert_hf_to_gguf lays them out (checkpoint order)."""
    arch = source.arch
    cfg = source.config
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    tied = source.tied_embeddings
    items: list[_Planned] = []
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
            _Planned(
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


# ------------------------------------------------------------------------------------ conversion
def _encode(x: np.ndarray, t: GGMLType, qw: np.ndarray | None) -> np.ndarray:
    """float32 rows (k, n) -> uint8 (k, row_bytes) of ggml type ``t``."""
    from lowbit.formats.gguf import block

    kernels = block.native_kernels() if t == GGMLType.BF16 else None
    if kernels is not None:
        out = np.empty(x.shape, dtype=np.uint16)  # one pass, GIL released (gguf-py's takes four)
        kernels.to_bf16(np.ascontiguousarray(x, dtype=np.float32), out)
        return out.view(np.uint8)
    if t in _PLAIN_FLOATS:
        from gguf.quants import quantize

        return np.ascontiguousarray(quantize(x, t)).view(np.uint8).reshape(x.shape[0], -1)
    from lowbit.formats.gguf.block import get_codec

    return get_codec(t).quantize_rows(x, qw, threads=1)  # the caller runs the threads


def _piece_jobs(item: _Planned, qw: np.ndarray | None, threads: int) -> list[Callable[[], np.ndarray]]:
    """The work that makes ``item``'s bytes in its destination type, in file order: one job per
    piece of about ``_PIECE_ELEMENTS`` rows' worth, each reading, converting and releasing the input
    pages of its rows. A small tensor is still cut into a few pieces per thread, so that every
    thread works on it.

    ``qw`` is the importance vector (n_per_row * n_mat,): one (n_per_row,) slice per stacked matrix
    (expert), as llama-quantize quantizes each expert with its own slice.
    """
    if item.raw is not None and item.src_type == item.dst_type:
        raw = item.raw
        return [lambda: np.ascontiguousarray(raw()).reshape(-1).view(np.uint8)]
    ne0 = item.ne0
    rows_per_mat = int(item.shape[-2]) if len(item.shape) >= 2 else 1
    n_mat = item.n_rows // rows_per_mat
    step = max(1, min(_PIECE_ELEMENTS // max(ne0, 1), -(-rows_per_mat // (2 * threads))))

    def work(m: int, a: int, b: int) -> np.ndarray:
        w = None if qw is None else qw[m * ne0 : (m + 1) * ne0]
        try:
            data = _encode(item.float_rows(a, b), item.dst_type, w)
        except NonFiniteWeightError as e:  # the codec does not know which tensor it was given
            raise NonFiniteWeightError(f"{item.name}: {e}") from None
        item.release_rows(a, b)
        return data.reshape(-1)

    jobs: list[Callable[[], np.ndarray]] = [
        functools.partial(work, m, a, min(a + step, (m + 1) * rows_per_mat))
        for m in range(n_mat)
        for a in range(m * rows_per_mat, (m + 1) * rows_per_mat, step)
    ]
    return jobs or [lambda: np.zeros(0, dtype=np.uint8)]  # every tensor yields a piece, even empty


def _in_order(
    jobs: Iterator[tuple[int, Callable[[], np.ndarray]]], pool: ThreadPoolExecutor, window: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Run ``(key, job)`` pairs on ``pool`` with at most ``window`` in flight, yielding ``(key,
    result)`` in the order given. The window runs across tensors, so the threads do not wait at each
    tensor's end for its last piece to be written; memory holds ``window`` pieces."""
    in_flight: collections.deque[tuple[int, Future[np.ndarray]]] = collections.deque()
    for key, job in itertools.islice(jobs, window):
        in_flight.append((key, pool.submit(job)))
    try:
        while in_flight:
            key, fut = in_flight.popleft()
            data = fut.result()
            nxt = next(jobs, None)
            if nxt is not None:
                in_flight.append((nxt[0], pool.submit(nxt[1])))
            yield key, data
    finally:
        for _, f in in_flight:  # an error, or the consumer stopped: start nothing more
            f.cancel()


def _imatrix_for(item: _Planned, imatrix: _ImatrixUse | None) -> np.ndarray | None:
    """llama-quantize's lookup: by tensor name; a size mismatch is an error except for token_embd."""
    if imatrix is None or item.src_type == item.dst_type or item.dst_type in _PLAIN_FLOATS:
        return None
    v = imatrix.vector(item.name)
    if v is None:
        # llama-imatrix never collects token_embd (nor output.weight without --process-output)
        never = category_of(item.name) in (Category.TOKEN_EMBD, Category.OUTPUT)
        log.log(logging.DEBUG if never else logging.INFO, "no importance vector for %s", item.name)
        return None
    n_mat = math.prod(item.shape[:-2]) if len(item.shape) > 2 else 1
    want = item.ne0 * n_mat
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    if v.size != want:
        if category_of(item.name) == Category.TOKEN_EMBD:
            return None
        raise InputFileError(
            f"the importance matrix has {v.size} values for {item.name}, which needs {want}; "
            "it was computed for another model"
        )
    if not np.isfinite(v).all():
        raise InputFileError(f"the importance matrix holds NaN/Inf values for {item.name}; recompute it")
    return v


# -------------------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class _KV:
    key: str
    value: Any
    vtype: int  # GGUF value type (gguf.GGUFValueType)
    sub_type: int | None = None

    def encode(self) -> bytes:
        return encode_kv(self.key, self.value, self.vtype, self.sub_type)


def _gguf_metadata(g: GGUFFile, file_type: int, imatrix: _ImatrixUse | None) -> list[bytes | memoryview]:
    """The input's entries as stored (raw bytes, the tokenizer's arrays included), then the keys
    llama-quantize sets, as its ``gguf_set_val_*`` does (remove, then append)."""
    kvs: dict[str, bytes | memoryview] = {
        key: g.raw(e) for key, e in g.entries.items() if key not in _SPLIT_KEYS
    }

    def set_val(kv: _KV) -> None:
        kvs.pop(kv.key, None)
        kvs[kv.key] = kv.encode()

    set_val(_KV("general.quantization_version", QUANTIZATION_VERSION, T_UINT32))
    set_val(_KV("general.file_type", file_type, T_UINT32))
    for kv in _imatrix_kvs(imatrix):
        set_val(kv)
    return list(kvs.values())


def _imatrix_kvs(imatrix: _ImatrixUse | None) -> list[_KV]:
    """The keys llama-quantize adds for an importance matrix (strings cut at 127 bytes, as it does)."""
    if imatrix is None:
        return []
    kvs = []
    if imatrix.file is not None:
        kvs.append(_KV("quantize.imatrix.file", imatrix.file.encode()[:127], T_STRING))
    if imatrix.dataset is not None:
        kvs.append(_KV("quantize.imatrix.dataset", imatrix.dataset.encode()[:127], T_STRING))
    kvs.append(_KV("quantize.imatrix.entries_count", imatrix.n_entries, T_UINT32))
    if imatrix.chunk_count > 0:
        kvs.append(_KV("quantize.imatrix.chunks_count", imatrix.chunk_count, T_UINT32))
    return kvs


def _hf_metadata(
    source: SafetensorsSource, file_type: int, items: Sequence[_Planned], imatrix: _ImatrixUse | None
) -> list[bytes | memoryview]:
    """convert_hf_to_gguf's metadata for a llama-family checkpoint, key for key and in its order."""
    import gguf

    cfg = source.config
    arch = source.arch.gguf_arch
    with _quiet_gguf_writer():
        w = gguf.GGUFWriter(path=None, arch=arch)  # used only to collect typed values in order
    total = sum(math.prod(it.shape) for it in items)
    meta = gguf.Metadata.load(None, source.path, None, total)
    if meta.name is None:
        meta.name = source.path.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, total, 0, 0)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)

    def first(*keys: str) -> Any:
        return next((cfg[k] for k in keys if cfg.get(k) is not None), None)

    rope = dict(cfg.get("rope_parameters") or {})
    legacy_scaling = cfg.get("rope_scaling") or {}
    w.add_block_count(int(first("num_hidden_layers", "n_layers", "n_layer", "num_layers")))
    if (ctx := first("max_position_embeddings", "n_ctx", "n_positions", "max_length")) is not None:
        w.add_context_length(int(ctx))
    w.add_embedding_length(int(cfg["hidden_size"]))
    if (ff := first("intermediate_size", "n_inner")) is not None:
        w.add_feed_forward_length(int(ff))
    n_head = int(cfg["num_attention_heads"])
    w.add_head_count(n_head)
    if (n_kv := cfg.get("num_key_value_heads")) is not None:
        w.add_head_count_kv(int(n_kv))
    if (theta := rope.get("rope_theta", cfg.get("rope_theta"))) is not None:
        w.add_rope_freq_base(float(theta))
    if (eps := cfg.get("rms_norm_eps")) is not None:
        w.add_layer_norm_rms_eps(float(eps))
    if (head_dim := cfg.get("head_dim")) is not None:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    w.add_file_type(file_type)
    w.add_vocab_size(int(cfg["vocab_size"]))
    w.add_rope_dimension_count(int(head_dim) if head_dim is not None else int(cfg["hidden_size"]) // n_head)
    rope_type = rope.get("rope_type") or legacy_scaling.get("rope_type") or legacy_scaling.get("type")
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope.get("factor", legacy_scaling.get("factor", 1.0))))
    elif rope_type not in (None, "default"):
        raise UnsupportedArchitectureError(
            f"{source.path}: rope scaling {rope_type!r} is not converted by lowbit yet; convert the model "
            "with llama.cpp's convert_hf_to_gguf.py and give lowbit the .gguf"
        )
    w.add_quantization_version(QUANTIZATION_VERSION)
    _add_tokenizer(w, source.path, cfg)
    kvs = [
        _KV(k, v.value, int(v.type), None if v.sub_type is None else int(v.sub_type))
        for k, v in w.kv_data[0].items()
    ]
    return [kv.encode() for kv in kvs + _imatrix_kvs(imatrix)]


# ------------------------------------------------------------------------------------- tokenizer
def _looks_special(token: str) -> bool:
    """Added tokens that are control tokens by their look even when not flagged special."""
    return bool(re.fullmatch(r"<\|[^|<>]*\|>|</?s>|<unk>|<pad>|<mask>|<(start|end)_of_turn>", token))


def _add_tokenizer(w: Any, model_dir: Path, cfg: Mapping[str, Any]) -> None:
    """tokenizer.ggml.* keys: sentencepiece ``tokenizer.model`` -> ``llama``; ``tokenizer.json`` BPE with
    byte fall-back -> ``llama`` (gguf-py's LlamaHfVocab); byte-level BPE -> ``gpt2`` with merges."""
    import gguf

    vocab_size = cfg.get("vocab_size")
    tj_path = model_dir / "tokenizer.json"
    load_merges = False
    if (model_dir / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece_vocab(model_dir, vocab_size)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
    elif tj_path.is_file():
        try:
            tj = json.loads(tj_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputFileError(f"{tj_path} is not valid JSON ({e})") from e
        model = tj.get("model", {})
        if model.get("type") == "BPE" and model.get("byte_fallback", False):
            hf = gguf.LlamaHfVocab(model_dir)
            tokens, scores, types = [], [], []
            for text, score, toktype in hf.all_tokens():
                tokens.append(text)
                scores.append(score)
                types.append(int(toktype))
            w.add_tokenizer_model("llama")
            w.add_tokenizer_pre("default")
        elif model.get("type") == "BPE":
            tokens, types = _bpe_vocab(tj, vocab_size)
            scores = []
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(_bpe_pre_name(tj))
            load_merges = True
        else:
            raise InputFileError(
                f"{tj_path}: tokenizer model {model.get('type')!r} is not converted by lowbit yet "
                "(sentencepiece and BPE are); convert with llama.cpp's convert_hf_to_gguf.py"
            )
    else:
        raise InputFileError(
            f"{model_dir} has neither tokenizer.model nor tokenizer.json; a GGUF file needs the tokenizer"
        )
    w.add_token_list(tokens)
    if scores:
        w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _sentencepiece_vocab(
    model_dir: Path, vocab_size: int | None
) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and ggml token types of a sentencepiece model, padded to the config's vocab size,
    with ``added_tokens.json`` and ``tokenizer_config.json``'s ``added_tokens_decoder`` applied."""
    from gguf import TokenType
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    n = int(vocab_size or sp.vocab_size())
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [int(TokenType.UNUSED)] * n
    for i in range(min(n, sp.vocab_size())):
        kind = TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = TokenType.UNUSED
        elif sp.IsByte(i):
            kind = TokenType.BYTE
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = float(sp.GetScore(i))
        types[i] = int(kind)
    if sp.vocab_size() > n:
        log.warning(
            "tokenizer.model has %d pieces, config.json vocab_size %d: extra pieces dropped",
            sp.vocab_size(),
            n,
        )
    added = model_dir / "added_tokens.json"
    if added.is_file():
        for text, idx in json.loads(added.read_text(encoding="utf-8")).items():
            if 0 <= int(idx) < n:
                tokens[int(idx)] = str(text).encode("utf-8")
                scores[int(idx)] = -1000.0
                types[int(idx)] = int(TokenType.USER_DEFINED)
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        decoder = json.loads(tc.read_text(encoding="utf-8")).get("added_tokens_decoder", {}) or {}
        for idx_s, data in decoder.items():
            idx = int(idx_s)
            if not 0 <= idx < n:
                continue
            text = str(data["content"])
            if data.get("special") or _looks_special(text):
                types[idx] = int(TokenType.CONTROL)
            else:
                text = text.replace(" ", "\u2581")
                types[idx] = int(TokenType.USER_DEFINED)
            tokens[idx] = text.encode("utf-8")
            scores[idx] = -1000.0
    return tokens, scores, types


def _bpe_vocab(tj: Mapping[str, Any], vocab_size: int | None) -> tuple[list[bytes], list[int]]:
    """Tokens and types of a byte-level BPE ``tokenizer.json`` (ids without a token become [PADn])."""
    from gguf import TokenType

    vocab: Mapping[str, int] = tj["model"]["vocab"]
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    by_id = {int(i): t for t, i in vocab.items()}
    n = int(vocab_size or (max([*by_id, *added]) + 1))
    tokens: list[bytes] = []
    types: list[int] = []
    for i in range(n):
        if i in added:
            text = str(added[i]["content"])
            special = bool(added[i].get("special")) or _looks_special(text)
            tokens.append(text.encode("utf-8"))
            types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
        elif i in by_id:
            tokens.append(by_id[i].encode("utf-8"))
            types.append(int(TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]".encode())
            types.append(int(TokenType.UNUSED))
    return tokens, types


# Pre-tokenizers recognised by their structure in tokenizer.json -> llama.cpp's pre-tokenizer name.
# (llama.cpp's converter identifies them by hashing the tokenization of a test text instead.)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bpe_pre_name(tj: Mapping[str, Any]) -> str:
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"  # = "starcoder" in llama.cpp: digits one by one, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT:
            return "qwen2"
    log.warning(
        "the BPE pre-tokenizer of this tokenizer.json is not one lowbit recognises; writing 'default' "
        "(llama.cpp may split text differently from transformers): convert with convert_hf_to_gguf.py "
        "for an exact tokenizer"
    )
    return "default"


# -------------------------------------------------------------------------------------- the writer
def _check_hf_architecture(source: SafetensorsSource) -> None:
    arch = source.arch
    if arch.gguf_arch != "llama" or arch.experts_key is not None:
        raise UnsupportedArchitectureError(
            f"lowbit converts Hugging Face checkpoints to GGUF for dense llama-family models only, not "
            f"{arch.name}; convert it with llama.cpp's convert_hf_to_gguf.py and give lowbit the .gguf"
        )


def _assign_types(mix: str, items: list[_Planned], model: ModelInfo, has_imatrix: bool) -> list[_Planned]:
    specs = [TensorSpec(it.name, it.shape, it.src_type) for it in items]
    chosen = tensor_types(mix, specs, model, imatrix=has_imatrix)
    return [replace(it, dst_type=chosen[it.name]) for it in items]


def _check_plan(mix: str, items: Sequence[_Planned], imatrix: _ImatrixUse | None) -> None:
    """Everything that can fail before a byte is written: missing codecs, missing importance vectors."""
    from lowbit.formats.gguf.block import get_codec

    for it in items:
        if it.dst_type == it.src_type and it.raw is not None:
            continue
        if is_quantized(it.dst_type):
            get_codec(it.dst_type)  # SchemeError naming the type lowbit has no codec for
        if allows_quantization(it.name, it.shape) and requires_imatrix(mix, it.name, it.dst_type):
            if imatrix is None:
                raise SchemeError(
                    f"{mix} needs an importance matrix ({it.name} becomes {it.dst_type.name}); "
                    "pass --imatrix FILE made by llama-imatrix, as llama-quantize requires"
                )
            if imatrix.vector(it.name) is None:
                raise SchemeError(
                    f"the importance matrix has no entry for {it.name}, which {mix} makes "
                    f"{it.dst_type.name}; it was computed for another model"
                )


def write_gguf(
    source: ModelSource | str | Path,
    mix: str,
    out: str | Path,
    imatrix: Imatrix | Mapping[str, np.ndarray] | None = None,
    force: bool = False,
    progress: bool = False,
    imatrix_file: str | None = None,
) -> GGUFReport:
    """Write ``source`` as a GGUF file of llama-quantize mix ``mix`` (``Q4_K_M``, ``Q8_0``, ``F16`` ...).

    ``source`` is a GGUF file (requantized as llama-quantize does) or a llama-family Hugging Face
    directory (converted as convert_hf_to_gguf does, then quantized). ``imatrix`` maps GGUF tensor
    names to importance vectors (see :class:`Imatrix`). ``out`` appears only when complete.
    """
    t0 = time.perf_counter()
    spec = get_mix(mix)
    out_path = Path(out)
    check_output(out_path, force)
    src = _open_input(source)
    im = _imatrix_use(imatrix, imatrix_file)

    kvs: list[bytes | memoryview]
    if isinstance(src, GGUFFile):
        kind = "gguf"
        items, values = _plan_gguf(src)
        split = values.get("split.count")
        if split is not None and int(split) > 1:
            raise InputFileError(
                f"{src.path} is one part of a split GGUF; merge the parts first (llama-gguf-split --merge)"
            )
        model = ModelInfo.from_gguf_fields(values, [it.name for it in items])
        items = _assign_types(spec.name, items, model, im is not None)
        alignment = src.alignment
        _check_plan(spec.name, items, im)
        kvs = _gguf_metadata(src, spec.file_type, im)
    elif _is_safetensors_source(src):
        kind = "hf"
        _check_hf_architecture(src)
        items = _plan_hf(src)
        cfg = src.config
        n_head = int(cfg["num_attention_heads"])
        model = ModelInfo(
            n_layer=int(cfg["num_hidden_layers"]),
            n_head=n_head,
            n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
            arch=src.arch.gguf_arch,
        )
        items = _assign_types(spec.name, items, model, im is not None)
        alignment = _DEFAULT_ALIGNMENT
        _check_plan(spec.name, items, im)
        kvs = _hf_metadata(src, spec.file_type, items, im)
    else:
        raise InputFileError(f"lowbit cannot write GGUF from a {src.format_name}")

    table = [
        TensorEntry(
            it.name, tuple(reversed(it.shape)), int(it.dst_type), tensor_nbytes(it.dst_type, it.shape)
        )
        for it in items
    ]
    records: list[GGUFTensorRecord] = []
    from lowbit.formats.gguf.block import n_workers

    qws = [_imatrix_for(it, im) for it in items]
    used = sum(qw is not None for qw in qws)
    threads = n_workers()
    with (
        atomic_file(out_path, force) as tmp,
        tmp.open("wb") as f,
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lowbit-gguf") as pool,
    ):
        writer = GGUFStreamWriter(f, alignment)
        writer.write_header(kvs, table)
        jobs = ((i, job) for i, it in enumerate(items) for job in _piece_jobs(it, qws[i], threads))
        stream = itertools.groupby(_in_order(jobs, pool, 2 * threads), key=operator.itemgetter(0))
        for it, (_, pieces) in zip(_progress(items, progress, spec.name), stream, strict=True):
            nbytes = writer.write_tensor_pieces(data for _, data in pieces)
            it.release()
            records.append(
                GGUFTensorRecord(
                    it.name, it.shape, it.dst_type.name, nbytes, allows_quantization(it.name, it.shape)
                )
            )
        writer.close()
    counts: dict[str, int] = {}
    for r in records:
        counts[r.type] = counts.get(r.type, 0) + 1
    log.info("%s: %s", out_path, ", ".join(f"{n} {t}" for t, n in sorted(counts.items())))
    return GGUFReport(
        output=out_path,
        mix=spec.name,
        file_type=spec.file_type,
        input_kind=kind,
        seconds=time.perf_counter() - t0,
        file_bytes=out_path.stat().st_size,
        tensors=tuple(records),
        imatrix_entries_used=used,
    )


@contextlib.contextmanager
def _quiet_gguf_writer() -> Iterator[None]:
    """gguf-py's writer logs its plan at INFO (endianness, temp file names); keep that out of lowbit's log."""
    logger = logging.getLogger("gguf.gguf_writer")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _open_input(source: ModelSource | str | Path) -> Any:
    """A GGUF input as a :class:`GGUFFile` (its header only), any other input as a :class:`ModelSource`.

    A GGUF path is opened with the header reader alone: :class:`GGUFSource` would also decode the whole
    metadata through gguf-py (seconds for a 49 K vocabulary) and import torch, which nothing here needs.
    """
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_file() and (p.suffix.lower() == ".gguf" or _has_gguf_magic(p)):
            return read_gguf(p)
        from lowbit.walk.sources import open_model

        return open_model(p)
    from lowbit.walk.sources import GGUFSource

    if isinstance(source, GGUFSource):
        return read_gguf(source.path)
    return source


def _is_safetensors_source(src: Any) -> bool:
    from lowbit.walk.sources import SafetensorsSource

    return isinstance(src, SafetensorsSource)


def _has_gguf_magic(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _progress(items: Sequence[_Planned], enabled: bool, desc: str) -> Iterator[_Planned]:
    if not enabled:  # tqdm (and asyncio, which tqdm.auto imports) load only for a progress bar
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, unit="tensor", leave=False)

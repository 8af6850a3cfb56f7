"""GGUF files that llama.cpp loads: llama-quantize's mixes, written one tensor at a time.

The writer streams tensors into a :class:`~lowbit.export.gguf_stream.GGUFStreamWriter`: header, metadata
and tensor table first, then each tensor's bytes in the table's order. What it consumes is a stream of
tensors, each either already quantized in ggml's layout (a :class:`~lowbit.formats.ggml.GGMLQuantized`
a method produced in the quantize walk) or float rows that it converts with ggml's own quantizer (the
bit-exact codecs of :mod:`lowbit.formats.gguf`, guided by an importance vector when there is one), in
pieces of rows that a pool of threads converts in order; each piece's input pages are released once it
is converted. Two producers:

* :func:`write_gguf` — round-to-nearest, as llama-quantize (+ ``--imatrix``) does, on numpy alone (no
  torch is imported for GGUF input):

  - **a GGUF file** (:func:`lowbit.walk.gguf_inputs.gguf_inputs`): lowbit acts as ``llama-quantize``
    (with ``--allow-requantize``): the input's metadata copied (:func:`~lowbit.export.gguf_meta.gguf_metadata`),
    tensors in llama.cpp's order, each with the type :func:`lowbit.formats.gguf.mixes.tensor_types`
    chooses; a tensor whose type does not change is copied byte for byte. The result is the very file
    llama-quantize writes, byte for byte, wherever the codecs of its types are available.
  - **a Hugging Face directory** (llama family, :func:`lowbit.walk.gguf_inputs.hf_inputs`): lowbit acts
    as llama.cpp's ``convert_hf_to_gguf.py`` with ``--outtype`` the source's float type, followed by
    llama-quantize, in one pass (:func:`~lowbit.export.gguf_meta.hf_metadata`).

* :func:`write_gguf_walk` — the output of the quantize walk (:mod:`lowbit.walk.quantize_walk`,
  :mod:`lowbit.walk.calibrate`) over a torch model source: GPTQ/AWQ-quantized block linears arrive as
  ggml bytes (their codec plan, :meth:`GGUFWalkPlan.codec_plan`, has the mix's type for each), the
  other tensors (embeddings, output, norms) as floats that the writer quantizes like llama-quantize.
  Tensors keep the walk's order; q/k rows get llama.cpp's rotary permutation (quantized rows are
  permuted as bytes: ggml blocks never cross rows).

The output appears only when complete (:func:`lowbit.export.atomic.atomic_file`).

Importance matrices: :class:`lowbit.calib.imatrix.Imatrix` (``load_imatrix`` reads llama-imatrix's GGUF
and legacy ``.dat`` files) gives, per tensor, the vector llama-quantize passes to ggml's quantizers; a
plain mapping of GGUF names to vectors works too.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import operator
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lowbit.calib.imatrix import Imatrix
from lowbit.errors import InputFileError, NonFiniteWeightError, SchemeError
from lowbit.export.atomic import atomic_file, check_output
from lowbit.export.gguf_meta import check_hf_architecture, gguf_metadata, hf_metadata
from lowbit.export.gguf_plan import ImatrixUse, assign_types, check_plan, imatrix_use, importance_for
from lowbit.export.gguf_stream import GGUFStreamWriter, TensorEntry
from lowbit.formats.gguf.mixes import MixSpec, ModelInfo, TypeOverride, allows_quantization, get_mix
from lowbit.formats.gguf.types import GGMLType, is_quantized, tensor_nbytes
from lowbit.walk.gguf_inputs import PLAIN_FLOATS, TensorInput, gguf_inputs, hf_inputs
from lowbit.walk.gguf_read import GGUFFile, read_gguf

if TYPE_CHECKING:  # torch-based sources are imported only for Hugging Face input and methods
    from lowbit.formats.base import CodecPlan
    from lowbit.walk.quantize_walk import WalkItem
    from lowbit.walk.sources import ModelSource

log = logging.getLogger(__name__)

# Rows converted at a time by one thread (whole rows, at least one): bounds the float32 scratch and
# the codecs' intermediates, and is fine enough for two threads to share out a tensor evenly.
_PIECE_ELEMENTS = 1 << 18
_DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT

Job = Callable[[], np.ndarray]


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


# ------------------------------------------------------------------------------------ conversion
def _encode(x: np.ndarray, t: GGMLType, qw: np.ndarray | None) -> np.ndarray:
    """float32 rows (k, n) -> uint8 (k, row_bytes) of ggml type ``t``."""
    from lowbit.formats.gguf import block

    kernels = block.native_kernels() if t == GGMLType.BF16 else None
    if kernels is not None:
        out = np.empty(x.shape, dtype=np.uint16)  # one pass, GIL released (gguf-py's takes four)
        kernels.to_bf16(np.ascontiguousarray(x, dtype=np.float32), out)
        return out.view(np.uint8)
    if t in PLAIN_FLOATS:
        from gguf.quants import quantize

        return np.ascontiguousarray(quantize(x, t)).view(np.uint8).reshape(x.shape[0], -1)
    from lowbit.formats.gguf.block import get_codec

    return get_codec(t).quantize_rows(x, qw, threads=1)  # the caller runs the threads


def _piece_jobs(item: TensorInput, qw: np.ndarray | None, threads: int) -> list[Callable[[], np.ndarray]]:
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


# -------------------------------------------------------------------------------------- the writers
def write_gguf(
    source: ModelSource | str | Path,
    mix: str,
    out: str | Path,
    imatrix: Imatrix | Mapping[str, np.ndarray] | None = None,
    force: bool = False,
    progress: bool = False,
    imatrix_file: str | None = None,
    overrides: Sequence[TypeOverride] = (),
) -> GGUFReport:
    """Write ``source`` as a GGUF file of llama-quantize mix ``mix`` (``Q4_K_M``, ``Q8_0``, ``F16`` ...),
    every tensor rounded by ggml's quantizer; ``overrides``: llama-quantize's ``--tensor-type`` options.

    ``source`` is a GGUF file (requantized as llama-quantize does) or a llama-family Hugging Face
    directory (converted as convert_hf_to_gguf does, then quantized). ``imatrix`` maps GGUF tensor
    names to importance vectors (see :class:`Imatrix`). ``out`` appears only when complete.
    """
    t0 = time.perf_counter()
    spec = get_mix(mix)
    out_path = Path(out)
    check_output(out_path, force)
    src = _open_input(source)
    im = imatrix_use(imatrix, imatrix_file)

    kvs: list[bytes | memoryview]
    if isinstance(src, GGUFFile):
        kind = "gguf"
        items, values = gguf_inputs(src)
        _check_not_split(src, values)
        model = ModelInfo.from_gguf_fields(values, [it.name for it in items])
        items = assign_types(spec.name, items, model, im is not None, overrides)
        alignment = src.alignment
        check_plan(spec.name, items, im)
        kvs = gguf_metadata(src, spec.file_type, im)
    elif _is_safetensors_source(src):
        kind = "hf"
        check_hf_architecture(src)
        items = hf_inputs(src)
        items = assign_types(spec.name, items, _hf_model_info(src), im is not None, overrides)
        alignment = _DEFAULT_ALIGNMENT
        check_plan(spec.name, items, im)
        kvs = hf_metadata(src, spec.file_type, items, im)
    else:
        raise InputFileError(f"lowbit cannot write GGUF from a {src.format_name}")

    from lowbit.formats.gguf.block import n_workers

    threads = n_workers()
    qws = [importance_for(it, im) for it in items]

    def jobs() -> Iterator[tuple[int, Job]]:
        for i, it in enumerate(items):
            for job in _piece_jobs(it, qws[i], threads):
                yield i, job

    records = _stream(out_path, force, alignment, kvs, items, jobs(), threads, progress, spec.name)
    return _report(out_path, spec, kind, t0, records, sum(qw is not None for qw in qws))


@dataclass(frozen=True)
class GGUFWalkPlan:
    """A mix applied to a torch model source, for :func:`write_gguf_walk`.

    ``tensors``: the output's tensors in the walk's order (GGUF names, ``dst_type`` set); ``names``:
    the source (Hugging Face) name of each; ``heads``: the q/k tensors (source name -> heads) whose rows
    get llama.cpp's rotary permutation; ``kvs``/``alignment``: the header; ``imatrix``: the importance
    matrix given by the user (for the tensors the walk does not quantize), if any.
    """

    mix: MixSpec
    tensors: tuple[TensorInput, ...]
    names: tuple[str, ...]
    heads: Mapping[str, int]
    kvs: tuple[bytes | memoryview, ...] = field(repr=False)
    alignment: int
    kind: str  # "gguf" (metadata copied) or "hf" (converted)
    imatrix: ImatrixUse | None = None

    def codec_plan(self, quantizable: Callable[[str], bool], embedding: str | None = None) -> CodecPlan:
        """The walk's codecs: for each tensor the walk quantizes (``quantizable``: its block linears),
        the :class:`~lowbit.formats.ggml.GGMLCodec` of the mix's type; ``None`` (kept in float, written
        as the mix says) where that type is a plain float (F16 fall-back for an odd width). With
        ``embedding`` (the source's embedding tensor), the embeddings too when the mix quantizes them:
        the calibration walk then runs the blocks on the embeddings the file will hold."""
        from lowbit.formats.base import CodecPlan
        from lowbit.formats.ggml import GGMLCodec

        per: dict[str, Any] = {}
        for name, t in zip(self.names, self.tensors, strict=True):
            if quantizable(name) or (name == embedding and is_quantized(t.dst_type)):
                per[name] = GGMLCodec(t.dst_type) if is_quantized(t.dst_type) else None
        return CodecPlan(None, per)


def plan_gguf_walk(
    source: ModelSource,
    mix: str,
    *,
    calibrated: Iterable[str] = (),
    imatrix: Imatrix | Mapping[str, np.ndarray] | None = None,
    imatrix_file: str | None = None,
    overrides: Sequence[TypeOverride] = (),
) -> GGUFWalkPlan:
    """Types, names and header of ``source`` written as mix ``mix`` (GGUF metadata copied from a GGUF
    source's file, converted from a Hugging Face one). ``calibrated``: the source names whose importance
    the walk computes itself (methods with calibration): the mix's types are then chosen as with an
    importance matrix, and those tensors need none from the user."""
    from lowbit.walk.sources import GGUFSource

    spec = get_mix(mix)
    arch = source.arch
    calibrated = frozenset(calibrated)
    im = imatrix_use(imatrix, imatrix_file)
    cfg = source.config
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    names: list[str] = []
    items: list[TensorInput] = []
    heads: dict[str, int] = {}
    tied = source.tied_embeddings
    for grp in source.blocks():
        for name in grp.names:
            if name.endswith("rotary_emb.inv_freq") or (tied and name == f"{arch.lm_head}.weight"):
                continue
            gname = arch.gguf_name(name)
            if gname is None:
                raise InputFileError(
                    f"tensor {name} of {source.path} has no GGUF name for architecture {arch.name}; "
                    "lowbit cannot write it as GGUF"
                )
            info = source.info(name)
            shape = tuple(int(s) for s in info.shape)
            src_type = _storage_type(info.storage, shape)
            if arch.gguf_permute_qk and name.endswith("self_attn.q_proj.weight"):
                heads[name] = n_head
            elif arch.gguf_permute_qk and name.endswith("self_attn.k_proj.weight"):
                heads[name] = n_kv
            names.append(name)
            items.append(
                TensorInput(name=gname, shape=shape, src_type=src_type, dst_type=src_type, float_rows=_unset)
            )
    gnames = {it.name for it, n in zip(items, names, strict=True) if n in calibrated}
    if isinstance(source.origin, GGUFSource):  # metadata copied from the file, as llama-quantize does
        g = read_gguf(source.origin.path)
        values = g.values()
        _check_not_split(g, values)
        model = ModelInfo.from_gguf_fields(values, [it.name for it in items])
        items = assign_types(spec.name, items, model, im is not None or bool(calibrated), overrides)
        check_plan(spec.name, items, im, frozenset(gnames))
        kvs = gguf_metadata(g, spec.file_type, im)
        return GGUFWalkPlan(spec, tuple(items), tuple(names), heads, tuple(kvs), g.alignment, "gguf", im)
    check_hf_architecture(source)
    items = assign_types(
        spec.name, items, _hf_model_info(source), im is not None or bool(calibrated), overrides
    )
    check_plan(spec.name, items, im, frozenset(gnames))
    kvs = hf_metadata(source, spec.file_type, items, im)
    return GGUFWalkPlan(spec, tuple(items), tuple(names), heads, tuple(kvs), _DEFAULT_ALIGNMENT, "hf", im)


def write_gguf_walk(
    walk: Iterable[WalkItem],
    plan: GGUFWalkPlan,
    out: str | Path,
    force: bool = False,
    progress: bool = False,
) -> GGUFReport:
    """Write the walk's tensors (in the order of ``plan``) as a GGUF file: quantized linears as their
    ggml bytes, every other tensor converted to its planned type by ggml's quantizer (with the
    user's importance vector where there is one). ``out`` appears only when complete."""
    import torch

    from lowbit.formats.ggml import GGMLQuantized
    from lowbit.formats.gguf.block import n_workers
    from lowbit.walk.sources import permute_qk

    t0 = time.perf_counter()
    out_path = Path(out)
    check_output(out_path, force)
    threads = n_workers()
    used = 0

    def row_order(name: str, rows: int) -> torch.Tensor | None:
        if name not in plan.heads:
            return None
        return permute_qk(torch.arange(rows, dtype=torch.float32)[:, None], plan.heads[name])[:, 0].long()

    def jobs() -> Iterator[tuple[int, Job]]:
        nonlocal used
        stream = iter(walk)
        for i, (name, it) in enumerate(zip(plan.names, plan.tensors, strict=True)):
            item = next(stream, None)
            if item is None or item.name != name:
                got = "the end" if item is None else item.name
                raise RuntimeError(f"the walk gave {got} where the plan expects {name}")
            order = row_order(name, int(it.shape[0]) if len(it.shape) == 2 else 0)
            q = item.quantized
            if q is not None:
                if not isinstance(q, GGMLQuantized) or q.type != it.dst_type:
                    raise SchemeError(
                        f"{it.name}: the method produced {getattr(q, 'type', type(q).__name__)}, the mix "
                        f"needs {it.dst_type.name}"
                    )
                data = q.data if order is None else q.data[order.numpy()]
                yield i, functools.partial(np.ascontiguousarray, data.reshape(-1))
                continue
            w = item.tensor.detach()
            if order is not None:
                w = w[order]
            rows = np.ascontiguousarray(w.float().numpy()).reshape(-1, it.ne0)  # widening is exact
            fed = replace(it, float_rows=functools.partial(_slice_rows, rows))
            qw = importance_for(fed, plan.imatrix)
            used += qw is not None
            yield from ((i, job) for job in _piece_jobs(fed, qw, threads))

    records = _stream(
        out_path,
        force,
        plan.alignment,
        list(plan.kvs),
        list(plan.tensors),
        jobs(),
        threads,
        progress,
        plan.mix.name,
    )
    return _report(out_path, plan.mix, plan.kind, t0, records, used)


def _slice_rows(rows: np.ndarray, start: int, stop: int) -> np.ndarray:
    return rows[start:stop]


def _unset(start: int, stop: int) -> np.ndarray:
    raise AssertionError("the walk supplies this tensor's rows")  # pragma: no cover


def _storage_type(storage: str, shape: tuple[int, ...]) -> GGMLType:
    """The type a tensor is stored as for the mix's rules: F32 for 1-D tensors (as convert_hf_to_gguf),
    its float type, or its ggml type (GGUF input); dequantized checkpoints count as F32."""
    if len(shape) <= 1:
        return GGMLType.F32
    member = GGMLType.__members__.get(storage.upper())
    return member if member is not None else GGMLType.F32


def _hf_model_info(source: ModelSource) -> ModelInfo:
    cfg = source.config
    n_head = int(cfg["num_attention_heads"])
    return ModelInfo(
        n_layer=int(cfg["num_hidden_layers"]),
        n_head=n_head,
        n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
        arch=source.arch.gguf_arch,
    )


def _check_not_split(g: GGUFFile, values: Mapping[str, Any]) -> None:
    split = values.get("split.count")
    if split is not None and int(split) > 1:
        raise InputFileError(
            f"{g.path} is one part of a split GGUF; merge the parts first (llama-gguf-split --merge)"
        )


def _stream(
    out_path: Path,
    force: bool,
    alignment: int,
    kvs: list[bytes | memoryview],
    items: Sequence[TensorInput],
    jobs: Iterator[tuple[int, Job]],
    threads: int,
    progress: bool,
    desc: str,
) -> list[GGUFTensorRecord]:
    """Header and tensor table for ``items``, then each tensor's bytes as ``jobs`` (tensor index, job)
    produce them, in order, at most ``2 x threads`` pieces in flight."""
    table = [
        TensorEntry(
            it.name, tuple(reversed(it.shape)), int(it.dst_type), tensor_nbytes(it.dst_type, it.shape)
        )
        for it in items
    ]
    records: list[GGUFTensorRecord] = []
    with (
        atomic_file(out_path, force) as tmp,
        tmp.open("wb") as f,
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lowbit-gguf") as pool,
    ):
        writer = GGUFStreamWriter(f, alignment)
        writer.write_header(kvs, table)
        stream = itertools.groupby(_in_order(jobs, pool, 2 * threads), key=operator.itemgetter(0))
        for it, (_, pieces) in zip(_progress(items, progress, desc), stream, strict=True):
            nbytes = writer.write_tensor_pieces(data for _, data in pieces)
            it.release()
            records.append(
                GGUFTensorRecord(
                    it.name, it.shape, it.dst_type.name, nbytes, allows_quantization(it.name, it.shape)
                )
            )
        writer.close()
    return records


def _report(
    out_path: Path, spec: MixSpec, kind: str, t0: float, records: list[GGUFTensorRecord], used: int
) -> GGUFReport:
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


def _progress(items: Sequence[TensorInput], enabled: bool, desc: str) -> Iterator[TensorInput]:
    if not enabled:  # tqdm (and asyncio, which tqdm.auto imports) load only for a progress bar
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, unit="tensor", leave=False)

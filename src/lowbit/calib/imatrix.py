"""Importance matrices as llama.cpp computes, stores and uses them.

An importance matrix holds, for every linear weight ``W`` (out, in) of every transformer block, the sum
over calibration tokens of the squared inputs per input column, ``Σ_t x_t[c]²`` (in,), and the number of
tokens summed. ``llama-quantize`` divides one by the other and hands ``E[x²]`` (in,) to its quantizers as
per-column weights of the rounding error. The rules below were read from llama.cpp at the commit the
reference tools are built from (``tools/imatrix/imatrix.cpp``, ``common/imatrix-loader.cpp``,
``tools/quantize/quantize.cpp``, ``src/llama-quant.cpp``) and checked against the binaries.

How ``llama-imatrix`` collects (what :func:`compute_imatrix` reproduces):

- The whole text is tokenized once with BOS when the vocabulary adds one (special-token text is not
  parsed); ``n_chunk = min(--chunks, n_tokens // n_ctx)``; chunk ``i`` is ``tokens[i*n_ctx:(i+1)*n_ctx]``
  with its first token replaced by BOS (when the model adds BOS), run from an empty KV cache. These are
  llama-perplexity's windows (:mod:`lowbit.eval.windows`). Several chunks share one batch as separate
  sequences, which changes nothing in the sums.
- Every matrix multiplication whose weight is named ``blk.*`` is collected, with the f32 input ``x`` of
  every token (all logits are requested, so the last block runs on every token too). ``output.weight``
  only with ``--process-output``; with tied embeddings the head multiplies by ``token_embd.weight`` and is
  never collected. MoE expert tensors (``mul_mat_id``) keep one sum row and one count per expert.
- ``in_sum2`` accumulates ``x²`` per column, ``counts`` the tokens; ``chunk_size = n_ctx``,
  ``chunk_count = max(counts) // chunk_size``.

The GGUF file (default of ``llama-imatrix``): ``general.type = "imatrix"``, ``imatrix.datasets`` (array of
strings: the text file paths as given), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (uint32); per
weight, in name order, an F32 tensor ``<name>.in_sum2`` of ggml shape ``[n_per_row, n_mat]`` and an F32
tensor ``<name>.counts`` of shape ``[1, n_mat]`` (``n_mat`` = experts, else 1; trailing 1-dims dropped).
Newer llama.cpp also writes ``<name>.in_sum`` (``Σ x``); it is read and written back, not used.

The legacy ``.dat`` file (``--output-format dat``), little-endian: int32 ``n_entries``; per entry in name
order: int32 name length, the name bytes, int32 ``ncall = ceil(max(counts) / chunk_size)``, int32 ``nval``,
float32 ``values[nval] = (in_sum2 / count) * ncall`` (a count of 0 stores ``ncall``); then, optionally,
int32 chunk count, int32 length and the bytes of one dataset name. Entries without any data are skipped.

What ``llama-quantize --imatrix`` passes to the quantizer (:meth:`Imatrix.importance`): GGUF files
``in_sum2 / count`` per matrix (1 where a count is 0); ``.dat`` files ``values / ncall`` (the stored
values where ``ncall`` is 0). It refuses a GGUF imatrix without the three metadata keys, and a vector
whose length is not ``n_per_row * n_expert`` of its tensor.
"""

from __future__ import annotations

import ast
import logging
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from lowbit.errors import ArgumentError, InputFileError, UnsupportedArchitectureError
from lowbit.export.atomic import atomic_file

if TYPE_CHECKING:  # torch is imported where activations are computed, not to read or write files
    import torch

    from lowbit.calib.absmean import ImportanceAccumulator
    from lowbit.walk.sources import ModelSource

log = logging.getLogger(__name__)

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUM2 = ".in_sum2"
SUFFIX_COUNTS = ".counts"
SUFFIX_SUM = ".in_sum"
# llama-imatrix's default -c: the chunk size it assumes when it reads a .dat file (which records none).
DEFAULT_CHUNK_SIZE = 512
OUTPUT_WEIGHT = "output.weight"


class ImatrixFormat(StrEnum):
    """On-disk format: llama-imatrix's GGUF (default) or its legacy binary ``.dat``."""

    GGUF = "gguf"
    DAT = "dat"

    @classmethod
    def for_path(cls, path: Path) -> ImatrixFormat:
        """The format a file name suggests: ``.dat`` -> DAT, anything else -> GGUF."""
        return cls.DAT if path.suffix.lower() == ".dat" else cls.GGUF


# ---------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ImatrixEntry:
    """The statistics of one weight.

    Attributes:
        sums: ``(n_mat, n_per_row)`` float32. GGUF-style: ``Σ_t x_t²`` per input column and matrix
            (``n_mat`` = experts of a MoE tensor, else 1). Legacy (.dat): the stored values
            ``E[x²] * ncall`` as one row, ``n_mat`` 1 (the format does not record experts).
        counts: ``(n_mat,)`` int64: tokens summed per matrix (GGUF-style) or ``[ncall]`` (legacy).
        in_sum: ``(n_mat, n_per_row)`` float32 ``Σ_t x_t`` when the file had ``.in_sum`` (newer llama.cpp).
    """

    sums: np.ndarray
    counts: np.ndarray
    in_sum: np.ndarray | None = None

    def __post_init__(self) -> None:
        assert self.sums.ndim == 2 and self.counts.shape == (self.sums.shape[0],), (
            self.sums.shape,
            self.counts.shape,
        )
        assert self.in_sum is None or self.in_sum.shape == self.sums.shape

    @property
    def n_mat(self) -> int:
        return int(self.sums.shape[0])

    @property
    def n_per_row(self) -> int:
        return int(self.sums.shape[1])

    @property
    def size(self) -> int:
        return int(self.sums.size)


@dataclass(frozen=True)
class Imatrix:
    """An importance matrix: statistics per weight, keyed by GGUF tensor name (``blk.0.attn_q.weight``).

    Attributes:
        entries: GGUF weight name -> :class:`ImatrixEntry`.
        datasets: calibration text files (as recorded by the tool that computed it).
        chunk_count: chunks the statistics were computed from.
        chunk_size: tokens per chunk; 0 where unknown (legacy files do not record it).
        legacy: the entries hold a legacy ``.dat`` file's values (``E[x²] * ncall``, counts ``[ncall]``)
            instead of sums and token counts.
        has_metadata: the file had all three ``imatrix.*`` keys (llama-quantize refuses GGUF files without).
    """

    entries: Mapping[str, ImatrixEntry]
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    has_metadata: bool = True
    _names: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", MappingProxyType(dict(self.entries)))
        object.__setattr__(self, "_names", tuple(sorted(self.entries)))

    def names(self) -> tuple[str, ...]:
        """Weight names in sorted order (the order both file formats store them in)."""
        return self._names

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, name: str) -> ImatrixEntry:
        e = self.entries.get(name)
        if e is None:
            raise ArgumentError(f"the imatrix has no entry for {name!r}; it holds {len(self)} weights")
        return e

    def importance(self, name: str, expert: int | None = None) -> np.ndarray:
        """What llama-quantize hands the quantizer for weight ``name``: float32 ``E[x²]`` per input column.

        Returns ``(n_mat * n_per_row,)`` (the whole vector llama-quantize passes: ``(n_per_row,)`` for a
        dense weight, experts one after another for a MoE tensor), or expert ``expert``'s ``(n_per_row,)``.
        """
        e = self.entry(name)
        sums = e.sums.astype(np.float32, copy=False)
        if self.legacy:
            ncall = int(e.counts[0])
            values = sums / np.float32(ncall) if ncall > 0 else sums.copy()
            if expert is not None:
                raise ArgumentError(
                    f"{name}: a legacy .dat imatrix does not record experts; take importance({name!r}) "
                    "and reshape it to (n_expert, n_per_row)"
                )
            return values.reshape(-1)
        counts = e.counts.astype(np.float32)[:, None]  # (n_mat, 1)
        safe = np.where(counts > 0, counts, np.float32(1))
        values = np.where(counts > 0, sums / safe, np.float32(1)).astype(np.float32)
        if expert is None:
            return values.reshape(-1)
        if not 0 <= expert < e.n_mat:
            raise ArgumentError(f"{name} has {e.n_mat} matrices; expert {expert} is out of range")
        return values[expert]

    def with_sums(self, chunk_size: int | None = None) -> Imatrix:
        """GGUF-style sums and token counts; a legacy imatrix is converted as llama-imatrix does when it
        reads a .dat file (``sums = values * chunk_size``, ``counts = ncall * chunk_size``)."""
        if not self.legacy:
            return self
        cs = chunk_size or self.chunk_size or DEFAULT_CHUNK_SIZE
        entries = {
            n: ImatrixEntry(
                (e.sums.astype(np.float64) * cs).astype(np.float32), e.counts.astype(np.int64) * cs
            )
            for n, e in self.entries.items()
        }
        chunks = max((int(e.counts.max()) for e in entries.values()), default=0) // cs
        return Imatrix(entries, self.datasets, chunks, cs, legacy=False)

    def check_model(self, source: ModelSource, origin: str = "the imatrix") -> None:
        """Raise :class:`InputFileError` naming the first entry (in name order) that is not a collected
        weight of ``source`` or whose length is not that weight's ``n_per_row * n_expert``."""
        expected = imatrix_shapes(source)
        for name in self.names():
            e = self.entries[name]
            shape = expected.get(name)
            if shape is None:
                raise InputFileError(
                    f"{origin}: tensor {name} is not a linear weight of {source.path}; "
                    "was the imatrix computed for another model?"
                )
            n_mat, n_per_row = shape
            if e.size != n_mat * n_per_row or (not self.legacy and e.n_mat not in (1, n_mat)):
                raise InputFileError(
                    f"{origin}: tensor {name} has {e.n_mat} x {e.n_per_row} values, the model's weight "
                    f"needs {n_mat} x {n_per_row}; was the imatrix computed for another model?"
                )
        missing = sorted(set(expected) - set(self.entries))
        if missing:
            log.warning(
                "%s has no data for %d of the model's %d weights (first: %s); they are quantized without it",
                origin,
                len(missing),
                len(expected),
                missing[0],
            )


def imatrix_shapes(source: ModelSource) -> dict[str, tuple[int, int]]:
    """GGUF name -> ``(n_mat, n_per_row)`` of every weight llama-imatrix can collect for ``source``:
    the block linears (MoE routers and experts included; ``n_mat`` = experts) and, for untied
    models, ``output.weight``."""
    arch = source.arch
    shapes: dict[str, tuple[int, int]] = {}
    names = source.names()
    for name in names:
        split = arch.split_block_name(name)
        if split is None or not split[1].endswith(".weight"):
            continue
        i, rel = split
        pattern = arch.linear_pattern(rel[: -len(".weight")])
        gname = arch.gguf_block_names.get(pattern) if pattern else None
        if gname is None:
            continue
        full = f"blk.{i}.{gname}.weight"
        n_per_row = int(source.info(name).shape[-1])
        n_mat = shapes[full][0] + 1 if "{e}" in (pattern or "") and full in shapes else 1
        shapes[full] = (n_mat, n_per_row)
    head = f"{arch.lm_head}.weight"
    if not source.tied_embeddings and head in names:
        out = arch.gguf_name(head) or OUTPUT_WEIGHT
        shapes[out] = (1, int(source.info(head).shape[-1]))
    return shapes


# ---------------------------------------------------------------------------- reading
def load_imatrix(path: str | Path, model: ModelSource | None = None) -> Imatrix:
    """Read an imatrix file (GGUF or legacy ``.dat``, told apart by the GGUF magic).

    Args:
        path: the file.
        model: if given, every entry must be a weight of this model with the right length.

    Raises:
        InputFileError: missing, malformed, or (with ``model``) not matching the model.
    """
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"imatrix file {p} does not exist")
    with p.open("rb") as f:
        magic = f.read(4)
    im = _read_gguf(p) if magic == b"GGUF" else _read_dat(p)
    if model is not None:
        im.check_model(model, origin=str(p))
    return im


def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, struct.error, IndexError... on damaged files
        raise InputFileError(f"{path} is not a readable GGUF file ({e}); regenerate the imatrix") from e
    kind = _field(reader, KEY_TYPE)
    if kind is not None and kind != "imatrix":
        raise InputFileError(
            f"{path} is a GGUF {kind} file, not an importance matrix; pass the file llama-imatrix or "
            "`lowbit imatrix` wrote"
        )
    parts: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        for suffix in (SUFFIX_SUM2, SUFFIX_COUNTS, SUFFIX_SUM):
            if t.name.endswith(suffix):
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = t
                break
    if not parts:
        raise InputFileError(f"{path} holds no imatrix tensors (<name>.in_sum2 / <name>.counts)")
    entries: dict[str, ImatrixEntry] = {}
    for name in sorted(parts):
        got = parts[name]
        if SUFFIX_SUM2 not in got or SUFFIX_COUNTS not in got:
            raise InputFileError(f"{path}: tensor {name} lacks its .in_sum2 or .counts; the file is damaged")
        for t in got.values():
            if t.tensor_type != GGMLQuantizationType.F32:
                raise InputFileError(f"{path}: {t.name} is {t.tensor_type.name}, imatrix tensors are F32")
        raw_counts = np.asarray(got[SUFFIX_COUNTS].data, dtype=np.float32).reshape(-1)
        raw_sums = np.asarray(got[SUFFIX_SUM2].data, dtype=np.float32).reshape(-1)
        n_mat = raw_counts.size
        if n_mat == 0 or raw_sums.size == 0 or raw_sums.size % n_mat:
            raise InputFileError(
                f"{path}: tensor {name} has {raw_sums.size} sums for {n_mat} counts; the file is damaged"
            )
        if not (np.isfinite(raw_counts).all() and (raw_counts >= 0).all()):
            raise InputFileError(f"{path}: tensor {name} has negative or non-finite counts")
        _check_values(path, name, raw_sums)
        in_sum = None
        if SUFFIX_SUM in got:
            raw_in = np.asarray(got[SUFFIX_SUM].data, dtype=np.float32).reshape(-1)
            if raw_in.size != raw_sums.size:
                raise InputFileError(f"{path}: tensor {name} has .in_sum and .in_sum2 of different sizes")
            in_sum = raw_in.reshape(n_mat, -1).copy()
        entries[name] = ImatrixEntry(
            raw_sums.reshape(n_mat, -1).copy(), np.rint(raw_counts).astype(np.int64), in_sum
        )
    datasets = _field(reader, KEY_DATASETS)
    chunk_count = _field(reader, KEY_CHUNK_COUNT)
    chunk_size = _field(reader, KEY_CHUNK_SIZE)
    has_metadata = datasets is not None and chunk_count is not None and chunk_size is not None
    if not has_metadata:
        log.warning(
            "%s lacks imatrix.datasets/chunk_count/chunk_size; llama-quantize refuses such a file", path
        )
    if isinstance(datasets, str):
        datasets = [datasets]
    return Imatrix(
        entries,
        tuple(str(d) for d in datasets or ()),
        int(chunk_count or 0),
        int(chunk_size or 0),
        legacy=False,
        has_metadata=has_metadata,
    )


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception as e:
        raise InputFileError(f"{reader.path}: metadata {key} cannot be read ({e})") from e


def _check_values(path: Path, name: str, values: np.ndarray) -> None:
    if not np.isfinite(values).all() or (values < 0).any():
        raise InputFileError(
            f"{path}: tensor {name} holds negative or non-finite values; an imatrix holds sums of squares"
        )


class _Cursor:
    """Little-endian reads from a byte string that fail with a message instead of struct.error."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data, self.pos = path, data, 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left:
            raise InputFileError(
                f"{self.path} is truncated or not an imatrix file (reading {what} at byte {self.pos})"
            )
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def i32(self, what: str) -> int:
        return int(struct.unpack("<i", self.take(4, what))[0])


def _read_dat(path: Path) -> Imatrix:
    cur = _Cursor(path, path.read_bytes())
    n_entries = cur.i32("the entry count")
    if n_entries < 1:
        raise InputFileError(f"{path} is neither a GGUF nor a legacy .dat imatrix (entry count {n_entries})")
    entries: dict[str, ImatrixEntry] = {}
    for k in range(n_entries):
        n_len = cur.i32(f"entry {k}'s name length")
        try:
            name = cur.take(n_len, f"entry {k}'s name").decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputFileError(f"{path}: entry {k}'s name is not UTF-8; not an imatrix file") from e
        ncall = cur.i32(f"{name}'s call count")
        nval = cur.i32(f"{name}'s value count")
        if nval < 1:
            raise InputFileError(f"{path}: entry {name} has {nval} values; the file is damaged")
        values = np.frombuffer(cur.take(4 * nval, f"{name}'s values"), dtype="<f4").astype(np.float32)
        _check_values(path, name, values)
        if name in entries:
            raise InputFileError(f"{path}: entry {name} appears twice; the file is damaged")
        entries[name] = ImatrixEntry(values.reshape(1, -1), np.array([ncall], dtype=np.int64))
    chunk_count = 0
    datasets: tuple[str, ...] = ()
    if cur.left >= 4:  # the chunk count and the dataset name are optional
        chunk_count = cur.i32("the chunk count")
        if cur.left >= 4:
            n_len = cur.i32("the dataset name length")
            if n_len > 0:
                datasets = (cur.take(n_len, "the dataset name").decode("utf-8", errors="replace"),)
    if cur.left:
        log.warning("%s: %d bytes after the imatrix data are ignored", path, cur.left)
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True)


# ---------------------------------------------------------------------------- writing
def write_imatrix(
    imatrix: Imatrix, path: str | Path, fmt: ImatrixFormat | str | None = None, force: bool = False
) -> Path:
    """Write ``imatrix`` atomically as llama-imatrix would (``fmt`` None: from the file name).

    Raises:
        OutputExistsError: ``path`` exists and not ``force``.
    """
    p = Path(path)
    f = ImatrixFormat.for_path(p) if fmt is None else ImatrixFormat(fmt)
    if len(imatrix) == 0:
        raise ArgumentError("the imatrix is empty; nothing to write")
    with atomic_file(p, force=force) as tmp:
        if f is ImatrixFormat.GGUF:
            _write_gguf(imatrix.with_sums(), tmp)
        else:
            tmp.write_bytes(_dat_bytes(imatrix))
    return p


def _write_gguf(im: Imatrix, path: Path) -> None:
    from gguf import GGUFType, GGUFValueType, GGUFWriter, Keys

    writer = GGUFWriter(path, arch="")
    # GGUFWriter always adds general.architecture; llama-imatrix's files have no such key.
    writer.kv_data[0].pop(Keys.General.ARCHITECTURE, None)
    writer.add_type(GGUFType.IMATRIX)
    # gguf-py cannot write an empty array, and llama-quantize wants the key: one empty name stands in.
    writer.add_key_value(KEY_DATASETS, list(im.datasets) or [""], GGUFValueType.ARRAY, GGUFValueType.STRING)
    writer.add_uint32(KEY_CHUNK_COUNT, im.chunk_count)
    writer.add_uint32(KEY_CHUNK_SIZE, im.chunk_size)
    for name in im.names():
        e = im.entries[name]
        # ggml drops trailing 1-dims: a dense weight's sums are [n_per_row], its counts [1].
        sums = e.sums[0] if e.n_mat == 1 else e.sums
        counts = e.counts.astype(np.float32)
        writer.add_tensor(name + SUFFIX_SUM2, np.ascontiguousarray(sums, dtype=np.float32))
        writer.add_tensor(name + SUFFIX_COUNTS, counts if e.n_mat == 1 else counts[:, None])
        if e.in_sum is not None:
            in_sum = e.in_sum[0] if e.n_mat == 1 else e.in_sum
            writer.add_tensor(name + SUFFIX_SUM, np.ascontiguousarray(in_sum, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _dat_bytes(im: Imatrix) -> bytes:
    out = bytearray()
    stored: list[tuple[str, int, np.ndarray]] = []
    if im.legacy:
        stored = [(n, int(im.entries[n].counts[0]), im.entries[n].sums.reshape(-1)) for n in im.names()]
    else:
        cs = im.chunk_size
        if cs < 1:
            raise ArgumentError("the imatrix records no chunk size; the .dat format needs one")
        for name in im.names():
            e = im.entries[name]
            if not (e.counts > 0).any():
                log.warning("imatrix entry %s has no data; not written to the .dat file", name)
                continue
            ncall = (int(e.counts.max()) + cs - 1) // cs
            counts = e.counts.astype(np.float32)[:, None]
            # float32 arithmetic in llama-imatrix's order, so the bytes match its own .dat files
            values = np.where(
                counts > 0,
                e.sums.astype(np.float32) / np.where(counts > 0, counts, np.float32(1)),
                np.float32(1),
            ).astype(np.float32) * np.float32(ncall)
            stored.append((name, ncall, values.astype(np.float32).reshape(-1)))
    out += struct.pack("<i", len(stored))
    for name, ncall, values in stored:
        b = name.encode("utf-8")
        out += struct.pack("<i", len(b)) + b
        out += struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    out += struct.pack("<i", im.chunk_count)
    dataset = im.datasets[-1].encode("utf-8") if im.datasets else b""
    out += struct.pack("<i", len(dataset)) + dataset
    return bytes(out)


# ---------------------------------------------------------------------------- computing
@dataclass(frozen=True)
class ImatrixConfig:
    """llama-imatrix's knobs: ``-c`` (``ctx``), ``--chunks`` (None: all), ``--process-output``;
    ``batch`` is how many chunks lowbit runs through a block at once (memory vs. speed only)."""

    ctx: int = 512
    chunks: int | None = None
    process_output: bool = False
    batch: int = 4

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ArgumentError(f"batch must be at least 1 chunk, got {self.batch}")


def text_tokens(source: ModelSource, text: Path) -> tuple[torch.Tensor, int | None]:
    """Tokenize ``text`` as llama-imatrix does (once, BOS first when the tokenizer adds one) with the
    model's Hugging Face tokenizer. Returns ``(n_tokens,)`` int64 and the BOS id (None: no BOS).

    The Hugging Face tokenizer need not split text exactly as llama.cpp's does (it does for the
    bundled sentencepiece models; it does not for SmolLM2's GGUF vocabulary): for llama.cpp's own ids use
    ``llama-tokenize --ids --no-parse-special`` and :func:`read_token_ids`.
    """
    from lowbit.eval.windows import encode_text, read_text_exact, tokenizer_bos_id

    if not text.is_file():
        raise InputFileError(f"calibration text {text} does not exist")
    tok = source.tokenizer()
    return encode_text(tok, read_text_exact(text)), tokenizer_bos_id(tok)


def read_token_ids(path: Path, source: ModelSource) -> tuple[torch.Tensor, int | None]:
    """Token ids from a file as ``llama-tokenize --ids`` prints them (``[1, 2, 3]``; whitespace- or
    comma-separated integers also work). The BOS id is the model's when the ids start with it (llama.cpp
    adds BOS exactly when the model wants it at the start of every chunk)."""
    if not path.is_file():
        raise InputFileError(f"token id file {path} does not exist")
    raw = path.read_text(encoding="utf-8").strip()
    try:
        ids = (
            ast.literal_eval(raw) if raw.startswith("[") else [int(x) for x in raw.replace(",", " ").split()]
        )
    except (ValueError, SyntaxError) as e:
        raise InputFileError(
            f"{path} is not a list of token ids ({e}); write it with llama-tokenize --ids"
        ) from e
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise InputFileError(f"{path} is not a list of integer token ids")
    import torch

    tokens = torch.tensor(ids, dtype=torch.int64)
    bos = source.config.get("bos_token_id")
    bos_id = int(bos) if isinstance(bos, int) and tokens.numel() and int(tokens[0]) == bos else None
    return tokens, bos_id


def _entry(acc: ImportanceAccumulator) -> ImatrixEntry:
    """An accumulator's sums of squares and token count as an imatrix entry (llama-imatrix's layout)."""
    return ImatrixEntry(acc.sum.numpy().astype(np.float32)[None, :], np.array([acc.count], dtype=np.int64))


def compute_imatrix(
    source: ModelSource,
    tokens: torch.Tensor,
    bos_id: int | None,
    config: ImatrixConfig | None = None,
    dataset: str = "",
    progress: bool | None = None,
) -> Imatrix:
    """The importance matrix of ``source`` over ``tokens``, as llama-imatrix computes it.

    Runs one transformer block at a time (:class:`lowbit.walk.blocks.BlockRunner`): all chunks' hidden
    states ``(n_chunks, ctx, hidden)`` float32 are kept, one block's weights are materialized, and a
    forward pre-hook on each of its linears sums the squared inputs.

    Args:
        source: the model.
        tokens: ``(n_tokens,)`` int64, the whole tokenized text (with the leading BOS, if any).
        bos_id: written over the first token of every chunk; None when the model adds no BOS.
        config: context, chunk limit, ``process_output``.
        dataset: recorded in ``imatrix.datasets`` (llama-imatrix records the text path as given).
        progress: a progress bar over blocks (None: only on a terminal).

    Raises:
        ArgumentError: ``ctx`` < 8, ``chunks`` < 1, or fewer tokens than one chunk.
        UnsupportedArchitectureError: a MoE model (expert collection is not implemented yet).
    """
    import torch

    from lowbit.calib.absmean import ImportanceAccumulator
    from lowbit.eval.windows import check_tokens, plan_windows, progress_enabled
    from lowbit.walk.blocks import BlockRunner
    from lowbit.walk.torch_model import threads_for

    cfg = config or ImatrixConfig()
    arch = source.arch
    if arch.experts_key is not None:
        raise UnsupportedArchitectureError(
            f"imatrix collection for MoE models ({arch.name}) is not implemented yet; use llama-imatrix "
            "and read its file with lowbit"
        )
    tokens = check_tokens(tokens)
    plan = plan_windows(tokens.numel(), cfg.ctx, cfg.chunks, bos_id)
    if plan.n_tokens < 2 * cfg.ctx:
        log.info("llama-imatrix would refuse this text: it wants at least 2 x ctx = %d tokens", 2 * cfg.ctx)
    windows = tokens[: plan.n_used].reshape(plan.n_chunks, cfg.ctx).clone()  # (chunks, ctx)
    if bos_id is not None:
        windows[:, 0] = bos_id
    t0 = time.perf_counter()
    stats: dict[str, ImportanceAccumulator] = {}
    with threads_for(source.config), torch.inference_mode():
        runner = BlockRunner(source)
        hidden = torch.cat(
            [runner.embed(windows[b : b + cfg.batch]) for b in range(0, plan.n_chunks, cfg.batch)]
        )  # (chunks, ctx, hidden)
        pos = runner.position_embeddings(hidden[:1])
        from tqdm.auto import tqdm

        bar = tqdm(
            total=runner.num_layers,
            desc="imatrix",
            unit="block",
            disable=not progress_enabled(progress),
            leave=False,
        )
        for i in range(runner.num_layers):
            layer = runner.layer(i, runner.block_weights(i))
            handles = [
                module.register_forward_pre_hook(_hook(stats.setdefault(gname, ImportanceAccumulator(in_f))))
                for gname, in_f, module in _block_linears(source, i, layer)
            ]
            try:
                for b in range(0, plan.n_chunks, cfg.batch):
                    hidden[b : b + cfg.batch] = runner.run_layer(layer, hidden[b : b + cfg.batch], pos)
            finally:
                for h in handles:
                    h.remove()
            del layer
            bar.update()
        bar.close()
        if cfg.process_output:
            _collect_output(source, runner, hidden, cfg.batch, stats)
    log.info(
        "imatrix of %d weights from %d chunks x %d tokens in %.1f s",
        len(stats),
        plan.n_chunks,
        cfg.ctx,
        time.perf_counter() - t0,
    )
    return Imatrix(
        {n: _entry(s) for n, s in stats.items()},
        (dataset,) if dataset else (),
        plan.n_chunks,
        cfg.ctx,
    )


def _hook(acc: ImportanceAccumulator) -> Any:
    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        acc.add(args[0])

    return hook


def _block_linears(
    source: ModelSource, i: int, layer: torch.nn.Module
) -> Iterator[tuple[str, int, torch.nn.Module]]:
    """``(GGUF name, in_features, module)`` of every linear of block ``i`` that has a GGUF name."""
    import torch

    arch = source.arch
    prefix = arch.block_prefix.format(i=i)
    for rel, module in layer.named_modules():
        if not isinstance(module, torch.nn.Linear) or arch.linear_pattern(rel) is None:
            continue
        gname = arch.gguf_name(f"{prefix}{rel}.weight")
        if gname is None:
            log.debug("block %d linear %s has no GGUF name; not collected", i, rel)
            continue
        yield gname, int(module.in_features), module


def _collect_output(
    source: ModelSource,
    runner: Any,
    hidden: torch.Tensor,
    batch: int,
    stats: dict[str, ImportanceAccumulator],
) -> None:
    """``output.weight``'s inputs: the final norm of the last block's outputs (llama-imatrix
    ``--process-output``). Tied embeddings have no output tensor, as in llama.cpp."""
    import torch
    from transformers import AutoModelForCausalLM

    from lowbit.calib.absmean import ImportanceAccumulator

    arch = source.arch
    head = f"{arch.lm_head}.weight"
    if source.tied_embeddings or head not in source.names():
        log.warning("the model ties its output to the embeddings: there is no output.weight to collect")
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(runner.config)
    norm = skeleton.get_submodule(arch.final_norm)
    norm.to_empty(device="cpu")
    prefix = arch.final_norm + "."
    norm.load_state_dict(
        {n[len(prefix) :]: source.read(n).float() for n in source.names() if n.startswith(prefix)}
    )
    norm = norm.float().eval()
    acc = stats.setdefault(arch.gguf_name(head) or OUTPUT_WEIGHT, ImportanceAccumulator(hidden.shape[-1]))
    for b in range(0, hidden.shape[0], batch):
        acc.add(norm(hidden[b : b + batch]))

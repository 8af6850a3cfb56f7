"""GPTQ checkpoints (the AutoGPTQ / GPTQModel layout) as a :class:`CheckpointFormat`, and their reader.

transformers 5.x loads them through optimum + GPTQModel (``quant_method: gptq``); vLLM reads the same
files. Stored tensors of one Linear ``(out, in)`` with ``b`` bits and ``G`` groups of ``g`` input
columns (per-channel: ``g = in``, ``G = 1``, ``group_size: -1`` in the config)::

    qweight  int32   (ceil(in * b / 32), out)   codes, packed along *in* (dim 0)
    qzeros   int32   (G, ceil(out * b / 32))    zero points, packed along *out* (dim 1)
    scales   float16 (G, out)
    g_idx    int32   (in,)                      group of input column c (c // g unless act-order)

Packing, per column of ``qweight`` and per row of ``qzeros`` (``bitpack``'s LSB-first order):

* b in {2, 4, 8}: ``32 / b`` codes per word, code ``i`` at bits ``[(i % (32/b)) * b, ... + b)`` of word
  ``i // (32/b)``. A length that is not a multiple of ``32 / b`` is padded with zero codes; GPTQModel's
  unpacking trims the padding (rows of ``qweight`` beyond ``in``, columns of the zeros beyond ``out``).
* b = 3: a continuous little-endian bit stream, 32 codes filling 3 words (code ``i`` at stream bits
  ``[3i, 3i + 3)``, codes 10 and 21 straddling words). GPTQModel reshapes the words in threes, so ``in``
  and ``out`` must be multiples of 32 (a :class:`ShapeError` otherwise).

Dequantization: ``w[o, c] = (q[c, o] - z[g_idx[c], o]) * s[g_idx[c], o]`` with unsigned ``q``, ``z``.

Zero points: ``checkpoint_format`` says how ``qzeros`` holds ``z``.

* ``"gptq"`` (v1, AutoGPTQ's): ``z - 1``, the off-by-one of the original CUDA kernels. Its readers
  disagree where a field wraps: GPTQModel (transformers' loader) adds ``0x11111111`` to each 4-bit word
  (per-field ``+1`` with carries into the next field, the inverse of its own word-wise ``-1`` export;
  3-bit: per field, mod 8), AutoGPTQ/ExLlama/vLLM add 1 per field without carries. Both agree exactly
  when no stored field wraps, i.e. ``z >= 1``.
* ``"gptq_v2"`` (GPTQModel): ``z`` itself. transformers (GPTQModel) and vLLM read it.

lowbit writes symmetric schemes as ``"gptq"``: ``z = 2**(b-1)``, stored field ``2**(b-1) - 1``
(``0x77777777`` at 4 bits), which every GPTQ loader reads alike; it is what GPTQModel and optimum write
for ``sym=True``. Asymmetric schemes are written as ``"gptq_v2"``: any ``z = 0`` (a group whose minimum
is 0 or positive) would wrap in v1 and be read differently by different loaders, and optimum itself
switches asymmetric quantization to ``gptq_v2``. The reader follows GPTQModel for both.

Activation order (:class:`~lowbit.formats.affine.GroupIndexedQuantized` with a ``g_idx`` that is not
``arange(in) // g``): ``g_idx`` is stored as is, ``scales``/``qzeros`` hold the group-ordered parameters,
the codes stay in the original column order, and the config says ``desc_act: true`` (loaders that would
otherwise assume contiguous groups then read ``g_idx``).

Limits (checked before any work is done, each a one-line error):

* bits 2, 3, 4, 8 (transformers' GPTQConfig refuses others); integer :class:`AffineCodec` only.
* groups: per-channel or ``g`` in 16, 32, ..., 1024: GPTQModel has no kernel for other group sizes.
* ``in % g == 0``: GPTQ's ``g_idx`` could express a shorter last group, and GPTQModel's plain torch
  kernel (2/3/8 bits) dequantizes it correctly, but its CPU 4-bit kernels (``aten._weight_int4pack_mm``)
  refuse ``K % group_size != 0``, as do Marlin-style GPU kernels: a ragged last group is a ShapeError.
* scales are float16 (the format's dtype; :meth:`GptqFormat.scale_dtype`).

Known loader limits on CPU (GPTQModel 7.6, transformers 5.23), not refused here because the files are
valid and GPU kernels run them: 4-bit per-channel loads only when every ``in`` is 32, 64, 128 or 256
(aten's int4 kernel takes the whole row as one group); the 4-bit CPU kernels compute in bfloat16, even
for a float32 model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import torch

import lowbit
from lowbit.errors import InputFileError, SchemeError, ShapeError
from lowbit.export.hf_checkpoint import CheckpointFormat
from lowbit.formats import bitpack
from lowbit.formats.activations import ActQuant, LLMInt8
from lowbit.formats.affine import AffineCodec, AffineQuantized, GroupIndexedQuantized
from lowbit.formats.base import PER_CHANNEL, Codec, QuantizedTensor, group

if TYPE_CHECKING:
    from lowbit.walk.sources import SafetensorsSource

log = logging.getLogger(__name__)

QUANT_METHOD = "gptq"
QWEIGHT = "qweight"
QZEROS = "qzeros"
SCALES = "scales"
G_IDX = "g_idx"
SUFFIXES = (QWEIGHT, QZEROS, SCALES, G_IDX)

BITS = (2, 3, 4, 8)
#: Group sizes some GPTQModel kernel runs (its torch kernel's list; the others take subsets).
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
SCALE_DTYPE = torch.float16


class ZeroFormat(StrEnum):
    """``checkpoint_format``: how ``qzeros`` stores the zero points (module docstring)."""

    V1 = "gptq"  # z - 1
    V2 = "gptq_v2"  # z

    @classmethod
    def written_for(cls, symmetric: bool) -> ZeroFormat:
        """What lowbit writes: v1 for symmetric schemes, v2 for asymmetric ones (module docstring)."""
        return cls.V1 if symmetric else cls.V2


@dataclasses.dataclass(frozen=True)
class GptqLayout:
    """Bits, group size (``None``: per-channel) and symmetry: what the config says of every Linear."""

    bits: int
    group_size: int | None
    symmetric: bool

    @classmethod
    def of(cls, codec: Codec) -> GptqLayout:
        """The layout storing ``codec``; a one-line :class:`SchemeError` for what GPTQ cannot hold."""
        if not isinstance(codec, AffineCodec):
            raise SchemeError(
                f"GPTQ checkpoints hold integer weights, not {codec.name}; choose a wN/wNgG scheme"
            )
        if codec.bits not in BITS:
            raise SchemeError(
                f"GPTQ checkpoints hold {', '.join(map(str, BITS))}-bit codes, not {codec.bits} "
                "(transformers refuses other widths); use compressed-tensors for them"
            )
        block = codec.block
        if block == PER_CHANNEL:
            return cls(codec.bits, None, codec.symmetric)
        if block.rows == 1 and block.cols is not None:
            if block.cols not in GROUP_SIZES:
                raise SchemeError(
                    f"GPTQ group size {block.cols} has no GPTQModel kernel (transformers cannot load it); "
                    f"use one of {', '.join(map(str, GROUP_SIZES))} or per-channel scales"
                )
            return cls(codec.bits, block.cols, codec.symmetric)
        raise SchemeError(
            f"GPTQ stores per-channel scales or groups of input columns, not {block.label} blocks"
        )

    @property
    def config_group_size(self) -> int:
        return -1 if self.group_size is None else self.group_size

    def codec(self, scale_dtype: torch.dtype = SCALE_DTYPE) -> AffineCodec:
        block = PER_CHANNEL if self.group_size is None else group(self.group_size)
        return AffineCodec(bits=self.bits, symmetric=self.symmetric, block=block, scale_dtype=scale_dtype)

    def check_shape(self, shape: tuple[int, ...], ragged_ok: bool = False) -> tuple[int, int]:
        """``(out, in)``; a one-line :class:`ShapeError` for a weight GPTQ cannot store. ``ragged_ok``:
        reading, where a ragged last group (which GPTQModel itself writes, e.g. 172 inputs in groups of
        32) is read as its ``g_idx`` says; lowbit never writes one."""
        if len(shape) != 2:
            raise ShapeError(f"GPTQ stores 2-D Linear weights, not shape {tuple(shape)}")
        out_f, in_f = shape
        if self.group_size is not None and in_f % self.group_size and not ragged_ok:
            raise ShapeError(
                f"GPTQ cannot hold a ragged last group: input width {in_f} is not a multiple of group size "
                f"{self.group_size} (GPTQModel's 4-bit CPU kernels and Marlin refuse it); use a group size "
                "that divides it or per-channel scales"
            )
        if self.bits == 3 and (in_f % 32 or out_f % 32):
            raise ShapeError(
                f"3-bit GPTQ packs 32 codes into 3 words along both dimensions: weight {out_f}x{in_f} is not "
                "a multiple of 32 in both (GPTQModel cannot unpack it); use 2, 4 or 8 bits"
            )
        return out_f, in_f

    def groups(self, in_f: int) -> tuple[int, int]:
        """``(group size, number of groups)`` for ``in_f`` input columns."""
        g = in_f if self.group_size is None else self.group_size
        return g, math.ceil(in_f / g)


# --------------------------------------------------------------------- packing
def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (rows, n) -> int32 (rows, ceil(n * bits / 32)): LSB-first along dim 1, zero-padded
    (2/4/8 bits), or the continuous stream (3 bits), which is GPTQ's 3-words-per-32-codes layout."""
    return bitpack.pack_dense(codes, bits)


def _unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_rows`: uint8 codes (rows, n)."""
    return bitpack.unpack_dense(words, bits, n)


def _v1_offset_word(bits: int) -> int:
    """The int32 word whose every ``bits``-wide field is 1 (``0x11111111`` at 4 bits)."""
    per = bitpack.codes_per_word(bits, torch.int32)
    return int(bitpack.pack(torch.ones(1, per, dtype=torch.int64), bits, torch.int32)[0, 0])


def _add_words(words: torch.Tensor, delta: int) -> torch.Tensor:
    """``words + delta`` modulo 2**32, as int32 (two's complement)."""
    w = (words.to(torch.int64) + delta) & 0xFFFFFFFF
    return torch.where(w >= (1 << 31), w - (1 << 32), w).to(torch.int32)


def encode_zeros(zeros: torch.Tensor, bits: int, fmt: ZeroFormat) -> torch.Tensor:
    """``qzeros`` int32 ``(G, ceil(out * b / 32))`` for true zero points ``zeros`` (G, out) in ``[0, 2**b)``.

    v1 subtracts 1 the way GPTQModel does (word-wise at 2/4/8 bits, per field mod 8 at 3 bits), so that
    GPTQModel's loader restores every ``z`` exactly; for ``z >= 1`` this is also AutoGPTQ's per-field ``z-1``.
    """
    z = zeros.to(torch.int64)
    if fmt is ZeroFormat.V2:
        return _pack_rows(z, bits)
    if bits == 3:
        return _pack_rows((z - 1) % 8, bits)
    return _add_words(_pack_rows(z, bits), -_v1_offset_word(bits))


def decode_zeros(qzeros: torch.Tensor, bits: int, out_f: int, fmt: ZeroFormat) -> torch.Tensor:
    """True zero points int16 ``(G, out)`` from ``qzeros``, as GPTQModel (transformers' loader) reads them."""
    if fmt is ZeroFormat.V2:
        return _unpack_rows(qzeros, bits, out_f).to(torch.int16)
    if bits == 3:
        return ((_unpack_rows(qzeros, bits, out_f).to(torch.int16) + 1) % 8).to(torch.int16)
    return _unpack_rows(_add_words(qzeros, _v1_offset_word(bits)), bits, out_f).to(torch.int16)


# --------------------------------------------------------------------- one Linear
def linear_tensors(q: AffineQuantized) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` of one quantized Linear (layouts in the module
    docstring). A :class:`GroupIndexedQuantized` with activation-order groups stores its ``g_idx`` and group
    parameters; any other :class:`AffineQuantized` stores ``g_idx = arange(in) // g``."""
    codec = q.codec
    layout = GptqLayout.of(codec)
    out_f, in_f = layout.check_shape(q.shape)
    if codec.scale_dtype != SCALE_DTYPE:
        raise SchemeError(
            f"GPTQ stores float16 scales; these were chosen in {codec.scale_dtype} and would be rounded "
            "again (quantize with scale_dtype float16, as `lowbit quantize --format gptq` does)"
        )
    bits = codec.bits
    offset = 1 << (bits - 1)
    g, n_groups = layout.groups(in_f)

    if isinstance(q, GroupIndexedQuantized) and not q.contiguous_groups:
        g_idx = q.g_idx.to(torch.int32)
        scales, zeros = q.group_scales, q.group_zeros  # (out, G), indexed by g_idx
    else:
        g_idx = (torch.arange(in_f) // g).to(torch.int32)
        scales, zeros = q.scales, q.zeros  # the codec's grid (out, G)
    if tuple(scales.shape) != (out_f, n_groups):
        raise SchemeError(
            f"expected {(out_f, n_groups)} scales for a {out_f}x{in_f} weight, got {tuple(scales.shape)}"
        )

    codes = q.codes.reshape(out_f, in_f).to(torch.int64)  # (out, in)
    if codec.symmetric:
        codes = codes + offset
        zeros = torch.full((out_f, n_groups), offset, dtype=torch.int64)
    elif zeros is None:
        raise SchemeError("asymmetric AffineQuantized without zero points")
    return {
        QWEIGHT: _pack_rows(codes, bits).T.contiguous(),  # (out, words) -> (words along in, out)
        QZEROS: encode_zeros(zeros.reshape(out_f, n_groups).T, bits, ZeroFormat.written_for(codec.symmetric)),
        SCALES: scales.reshape(out_f, n_groups).T.to(SCALE_DTYPE).contiguous(),
        G_IDX: g_idx.contiguous(),
    }


def read_linear(tensors: Mapping[str, torch.Tensor], layout: GptqLayout, fmt: ZeroFormat) -> AffineQuantized:
    """Inverse of :func:`linear_tensors`: an :class:`AffineQuantized` (codes in lowbit's convention:
    signed when symmetric) whose ``codec.dequantize`` is the stored weight, exactly.

    Activation-order files (a ``g_idx`` other than ``arange(in) // g``) give a :class:`GroupIndexedQuantized`
    with ``g_idx``, the group parameters and their expansion to ``(out, in)``; the order in which GPTQ
    processed the columns is not stored (``perm`` None) and neither is its report (NaN losses).
    """
    for key in (QWEIGHT, QZEROS, SCALES):
        if key not in tensors:
            raise InputFileError(f"GPTQ Linear lacks '{key}' (has {sorted(tensors)})")
    qweight, qzeros, scale = tensors[QWEIGHT], tensors[QZEROS], tensors[SCALES]
    bits = layout.bits
    if scale.ndim != 2 or scale.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InputFileError(
            f"GPTQ scales are {scale.dtype} {tuple(scale.shape)}; expected float16 (groups, out)"
        )
    n_groups, out_f = scale.shape
    g_idx_t = tensors.get(G_IDX)
    # Old AutoGPTQ files without g_idx: the packed length (they never padded).
    in_f = g_idx_t.numel() if g_idx_t is not None else qweight.shape[0] * 32 // bits
    out_f, in_f = layout.check_shape((out_f, in_f), ragged_ok=True)
    g, want_groups = layout.groups(in_f)
    n_words_in, n_words_out = math.ceil(in_f * bits / 32), math.ceil(out_f * bits / 32)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (n_words_in, out_f):
        raise InputFileError(
            f"GPTQ qweight is {qweight.dtype} {tuple(qweight.shape)}; expected int32 {(n_words_in, out_f)} "
            f"for {bits}-bit codes of a {out_f}x{in_f} weight"
        )
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (n_groups, n_words_out):
        raise InputFileError(
            f"GPTQ qzeros is {qzeros.dtype} {tuple(qzeros.shape)}; expected int32 {(n_groups, n_words_out)}"
        )
    if n_groups != want_groups:
        raise InputFileError(
            f"GPTQ scales have {n_groups} groups; group size {layout.config_group_size} over {in_f} "
            f"inputs makes {want_groups}"
        )
    codec = layout.codec(scale.dtype)  # the file's dtype, so that dequantize reproduces it exactly

    codes = _unpack_rows(qweight.T.contiguous(), bits, in_f).to(torch.int16)  # (out, in)
    zeros = decode_zeros(qzeros, bits, out_f, fmt).T.contiguous()  # (out, G)
    group_scales = scale.T.to(codec.scale_dtype).contiguous()  # (out, G)
    offset = 1 << (bits - 1)
    group_zeros: torch.Tensor | None = zeros
    if layout.symmetric:
        if bool(zeros.ne(offset).any()):
            raise InputFileError(
                f"the config says sym=true but qzeros hold zero points other than {offset}; "
                "the file and its quantization_config disagree"
            )
        codes = codes - offset
        group_zeros = None

    trivial = (torch.arange(in_f) // g).to(torch.int32)
    g_idx = trivial if g_idx_t is None else g_idx_t.reshape(-1).to(torch.int32)
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        raise InputFileError(f"GPTQ g_idx points outside the {n_groups} groups")
    if torch.equal(g_idx, trivial):
        return AffineQuantized(
            shape=(out_f, in_f), codes=codes, scales=group_scales, zeros=group_zeros, codec=codec
        )
    gi = g_idx.long()
    return GroupIndexedQuantized(
        shape=(out_f, in_f),
        codes=codes,
        scales=group_scales[:, gi],
        zeros=None if group_zeros is None else group_zeros[:, gi],
        codec=codec,
        g_idx=g_idx,
        group_scales=group_scales,
        group_zeros=group_zeros,
    )


# --------------------------------------------------------------------- config.json
def quantization_config(
    codec: Codec, ignore: Iterable[str] = ("lm_head",), desc_act: bool = False
) -> dict[str, Any]:
    """The ``quantization_config`` block, with the keys GPTQModel writes (its ``QuantizeConfig.to_dict``)
    that transformers/optimum and vLLM read. ``ignore``: modules left dense besides ``lm_head`` become
    GPTQModel ``dynamic`` skip rules (``"-:<regex>": {}``; honoured by GPTQModel and vLLM, not by
    transformers' optimum path, which converts every Linear of the decoder blocks)."""
    layout = GptqLayout.of(codec)
    fmt = ZeroFormat.written_for(layout.symmetric)
    config: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "bits": layout.bits,
        "group_size": layout.config_group_size,
        "desc_act": desc_act,
        "sym": layout.symmetric,
        "lm_head": False,
        "checkpoint_format": fmt.value,
        "format": fmt.value,
        "pack_dtype": "int32",
        "true_sequential": True,
        "meta": {"quantizer": [f"lowbit:{lowbit.__version__}"]},
    }
    skips = [p for p in ignore if p != "lm_head"]
    if skips:
        config["dynamic"] = {f"-:{p.removeprefix('re:')}": {} for p in skips}
        log.warning(
            "GPTQ config: %s stay unquantized; GPTQModel and vLLM skip them, transformers' GPTQ loader "
            "does not (it expects every decoder Linear quantized)",
            ", ".join(skips),
        )
    return config


def layout_from_config(qcfg: Mapping[str, Any]) -> tuple[GptqLayout, ZeroFormat]:
    """The layout and zero-point format of a GPTQ ``quantization_config``."""
    if str(qcfg.get("quant_method", "")).lower() != QUANT_METHOD:
        raise SchemeError(f"quant_method is {qcfg.get('quant_method')!r}, not {QUANT_METHOD!r}")
    raw_fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or ZeroFormat.V1.value).lower()
    try:
        fmt = ZeroFormat(raw_fmt)
    except ValueError:
        raise SchemeError(
            f"GPTQ checkpoint_format {raw_fmt!r}: lowbit reads 'gptq' and 'gptq_v2' (not marlin/bitblas/"
            "planar repacks)"
        ) from None
    if qcfg.get("dynamic"):
        raise SchemeError("GPTQ 'dynamic' per-module overrides are not supported by lowbit's reader")
    bits = int(qcfg.get("bits", 4))
    gs = int(qcfg.get("group_size", -1))
    sym = bool(qcfg.get("sym", True))
    if bits not in BITS:
        raise SchemeError(f"GPTQ bits {bits}: lowbit reads {', '.join(map(str, BITS))}")
    if gs == 0 or gs < -1:
        raise SchemeError(f"GPTQ group_size {gs} is neither -1 nor positive")
    return GptqLayout(bits, None if gs == -1 else gs, sym), fmt


# --------------------------------------------------------------------- the format
class GptqFormat(CheckpointFormat):
    """``--format gptq``. ``desc_act`` in the config becomes true once a Linear with activation-order
    groups has been written (:func:`write_checkpoint` asks for the config after the last Linear)."""

    name = "gptq"
    metadata_suffixes = (G_IDX,)  # the column -> group map, 32 bits per input column
    holds_group_index = True

    def __init__(self, activations: ActQuant | LLMInt8 | None = None) -> None:
        super().__init__(activations)
        self._desc_act = False

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return SCALE_DTYPE

    def check(self, codec: Codec, shapes: Iterable[tuple[int, ...]]) -> None:
        layout = GptqLayout.of(codec)
        for shape in shapes:
            layout.check_shape(shape)

    def linear_tensors(self, q: QuantizedTensor) -> dict[str, torch.Tensor]:
        if not isinstance(q, AffineQuantized):
            raise SchemeError(f"GPTQ checkpoints hold integer weights, not a {type(q).__name__}")
        if isinstance(q, GroupIndexedQuantized) and not q.contiguous_groups:
            self._desc_act = True
        return linear_tensors(q)

    def quantization_config(self, codec: Codec, ignore: list[str]) -> dict[str, Any]:
        return quantization_config(codec, ignore, desc_act=self._desc_act)


def attach_decoders(src: SafetensorsSource, qcfg: Mapping[str, Any]) -> None:
    """Present each quantized Linear of a GPTQ checkpoint as a dequantized float32 ``.weight``."""
    layout, fmt = layout_from_config(qcfg)
    stored = set(src.raw_names())
    modules = [n.removesuffix(f".{QWEIGHT}") for n in src.raw_names() if n.endswith(f".{QWEIGHT}")]
    total_bits = total_params = 0
    for module in modules:
        parts = {s: f"{module}.{s}" for s in SUFFIXES if f"{module}.{s}" in stored}

        def read_stored(parts: dict[str, str] = parts) -> AffineQuantized:
            return read_linear({s: src.raw(p) for s, p in parts.items()}, layout, fmt)

        def decode(read: Callable[[], AffineQuantized] = read_stored) -> torch.Tensor:
            q = read()
            return q.codec.dequantize(q)

        scales = src.raw_info(parts.get(SCALES, f"{module}.{SCALES}"))
        out_f = scales.shape[-1]
        in_f = (
            src.raw_info(parts[G_IDX]).shape[0]
            if G_IDX in parts
            else src.raw_info(parts[QWEIGHT]).shape[0] * 32 // layout.bits
        )
        total_bits += sum(src.raw_info(p).nbytes * 8 for s, p in parts.items() if s != G_IDX)
        total_params += out_f * in_f
        src.add_virtual(
            f"{module}.weight", decode, replaces=list(parts.values()), at=parts[QWEIGHT], stored=read_stored
        )
    src.linear_bits_per_weight = total_bits / total_params if total_params else None

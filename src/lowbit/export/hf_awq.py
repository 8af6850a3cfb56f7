"""AWQ checkpoints (AutoAWQ's GEMM layout) as a :class:`CheckpointFormat`, and their reader.

transformers 5.x loads ``quant_method: awq`` through GPTQModel (AutoAWQ is no longer used); vLLM reads
the same files. Stored tensors of one Linear ``(out, in)``, 4-bit codes, ``G = in / g`` groups::

    qweight  int32   (in, out / 8)   codes, transposed, packed along *out* (dim 1)
    qzeros   int32   (G, out / 8)    zero points, packed along out the same way
    scales   float16 (G, out)

Packing (``bitpack.AWQ_ORDER``): word ``j`` of a row holds columns ``8j .. 8j+7``, column ``8j + e`` in
the nibble ``AWQ_ORDER.index(e)``, i.e. nibbles 0..7 hold columns ``8j + [0, 2, 4, 6, 1, 3, 5, 7]``
(the interleave AutoAWQ's GEMM kernel unpacks with shifts of ``[0, 16, 4, 20, 8, 24, 12, 28]``)::

    word bits   31..28  27..24  23..20  19..16  15..12  11..8   7..4    3..0
    column        +7      +5      +3      +1      +6      +4      +2      +0

Dequantization: ``w[o, c] = (q[c, o] - z[c // g, o]) * s[c // g, o]``, unsigned ``q`` and ``z`` in
``[0, 16)``: AutoAWQ's zero-point convention (``zero_point: true``) is lowbit's asymmetric one, stored as
it is (no off-by-one, unlike GPTQ v1).

Limits (one-line errors before any work): 4-bit asymmetric integer codecs only (AutoAWQ's GEMM format
has no symmetric variant that transformers loads); per-channel or groups ``g`` in 16, 32, 64, 128 (the
group sizes GPTQModel's AWQ kernels run) dividing ``in``; ``out % 8 == 0`` (whole words; AutoAWQ's
packer asserts it, GPTQModel's torch kernel requires it); float16 scales.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from lowbit.errors import InputFileError, SchemeError, ShapeError
from lowbit.export.hf_checkpoint import CheckpointFormat
from lowbit.formats import bitpack
from lowbit.formats.affine import AffineCodec, AffineQuantized
from lowbit.formats.base import PER_CHANNEL, Codec, QuantizedTensor, group

if TYPE_CHECKING:
    from lowbit.walk.sources import SafetensorsSource

log = logging.getLogger(__name__)

QUANT_METHOD = "awq"
VERSION = "gemm"
QWEIGHT = "qweight"
QZEROS = "qzeros"
SCALES = "scales"
SUFFIXES = (QWEIGHT, QZEROS, SCALES)

BITS = 4
PACK = 32 // BITS  # codes per int32
GROUP_SIZES = (16, 32, 64, 128)
SCALE_DTYPE = torch.float16


def group_size_of(codec: Codec) -> int | None:
    """The AWQ group size of ``codec`` (``None``: per-channel); a one-line SchemeError for any codec the
    format cannot hold."""
    if not isinstance(codec, AffineCodec):
        raise SchemeError(f"AWQ checkpoints hold 4-bit integer weights, not {codec.name}; use w4gG-asym")
    if codec.bits != BITS or codec.symmetric:
        raise SchemeError(
            f"AWQ (GEMM) checkpoints hold 4-bit asymmetric codes with zero points, not {codec.name}; "
            "use a w4gG-asym scheme, or --format gptq / compressed-tensors"
        )
    block = codec.block
    if block == PER_CHANNEL:
        return None
    if block.rows == 1 and block.cols in GROUP_SIZES:
        return block.cols
    raise SchemeError(
        f"AWQ stores per-channel scales or groups of {', '.join(map(str, GROUP_SIZES))} input columns "
        f"(the sizes GPTQModel's AWQ kernels run), not {block.label}"
    )


def check_linear_shape(shape: tuple[int, ...], group_size: int | None) -> tuple[int, int]:
    """``(out, in)``; a one-line :class:`ShapeError` for a weight AWQ cannot store."""
    if len(shape) != 2:
        raise ShapeError(f"AWQ stores 2-D Linear weights, not shape {tuple(shape)}")
    out_f, in_f = shape
    if out_f % PACK:
        raise ShapeError(
            f"AWQ packs 8 output channels per int32: output width {out_f} is not a multiple of 8; "
            "use --format gptq or compressed-tensors, or leave this layer unquantized"
        )
    if group_size is not None and in_f % group_size:
        raise ShapeError(
            f"AWQ groups must divide the input width: {in_f} is not a multiple of {group_size}; "
            "use a group size that divides it or per-channel scales"
        )
    return out_f, in_f


def _pack_out(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes (rows, out) -> int32 (rows, out / 8) in AWQ's interleaved order."""
    return bitpack.pack(codes.to(torch.int64), BITS, torch.int32, dim=1, order=bitpack.AWQ_ORDER)


def _unpack_out(words: torch.Tensor) -> torch.Tensor:
    return bitpack.unpack(words, BITS, dim=1, order=bitpack.AWQ_ORDER).to(torch.int16)


def linear_tensors(q: AffineQuantized) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` of one quantized Linear (layout in the module docstring)."""
    codec = q.codec
    g = group_size_of(codec)
    out_f, in_f = check_linear_shape(q.shape, g)
    if codec.scale_dtype != SCALE_DTYPE:
        raise SchemeError(
            f"AWQ stores float16 scales; these were chosen in {codec.scale_dtype} and would be rounded "
            "again (quantize with scale_dtype float16, as `lowbit quantize --format awq` does)"
        )
    if q.zeros is None:
        raise SchemeError("asymmetric AffineQuantized without zero points")
    n_groups = codec.block.grid((out_f, in_f))[1]
    codes = q.codes.reshape(out_f, in_f)
    return {
        QWEIGHT: _pack_out(codes.T),  # (in, out / 8)
        QZEROS: _pack_out(q.zeros.reshape(out_f, n_groups).T),  # (G, out / 8)
        SCALES: q.scales.reshape(out_f, n_groups).T.to(SCALE_DTYPE).contiguous(),  # (G, out)
    }


def read_linear(tensors: Mapping[str, torch.Tensor], group_size: int | None) -> AffineQuantized:
    """Inverse of :func:`linear_tensors`; ``group_size`` from the config (``None``: per-channel). The
    scale dtype is the file's, so ``codec.dequantize`` reproduces the stored weight exactly."""
    for key in SUFFIXES:
        if key not in tensors:
            raise InputFileError(f"AWQ Linear lacks '{key}' (has {sorted(tensors)})")
    qweight, qzeros, scale = tensors[QWEIGHT], tensors[QZEROS], tensors[SCALES]
    if scale.ndim != 2 or scale.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InputFileError(
            f"AWQ scales are {scale.dtype} {tuple(scale.shape)}; expected float16 (groups, out)"
        )
    n_groups, out_f = scale.shape
    if qweight.dtype != torch.int32 or qweight.ndim != 2 or qweight.shape[1] * PACK != out_f:
        raise InputFileError(
            f"AWQ qweight is {qweight.dtype} {tuple(qweight.shape)}; expected int32 (in, {out_f // PACK})"
        )
    in_f = qweight.shape[0]
    check_linear_shape((out_f, in_f), group_size)
    want_groups = 1 if group_size is None else in_f // group_size
    if (
        n_groups != want_groups
        or tuple(qzeros.shape) != (n_groups, out_f // PACK)
        or qzeros.dtype != torch.int32
    ):
        raise InputFileError(
            f"AWQ scales {tuple(scale.shape)} / qzeros {qzeros.dtype} {tuple(qzeros.shape)} do not fit "
            f"{want_groups} groups of a {out_f}x{in_f} weight"
        )
    block = PER_CHANNEL if group_size is None else group(group_size)
    codec = AffineCodec(bits=BITS, symmetric=False, block=block, scale_dtype=scale.dtype)
    return AffineQuantized(
        shape=(out_f, in_f),
        codes=_unpack_out(qweight).T.contiguous(),
        scales=scale.T.contiguous(),
        zeros=_unpack_out(qzeros).T.contiguous(),
        codec=codec,
    )


def quantization_config(codec: Codec, ignore: Iterable[str] = ("lm_head",)) -> dict[str, Any]:
    """The ``quantization_config`` block as AutoAWQ writes it (``version: gemm``, ``zero_point: true``).
    ``ignore`` beyond ``lm_head`` (which transformers skips anyway) becomes ``modules_to_not_convert``
    (transformers matches each as a regex or a module-name suffix)."""
    g = group_size_of(codec)
    skips = [p.removeprefix("re:") for p in ignore if p != "lm_head"]
    return {
        "quant_method": QUANT_METHOD,
        "bits": BITS,
        "group_size": -1 if g is None else g,
        "zero_point": True,
        "version": VERSION,
        "modules_to_not_convert": skips or None,
    }


def group_size_from_config(qcfg: Mapping[str, Any]) -> int | None:
    """The group size (``None``: per-channel) of an AWQ ``quantization_config``; SchemeError for the
    variants lowbit does not read."""
    if str(qcfg.get("quant_method", "")).lower() != QUANT_METHOD:
        raise SchemeError(f"quant_method is {qcfg.get('quant_method')!r}, not {QUANT_METHOD!r}")
    version = str(qcfg.get("version") or qcfg.get("format") or VERSION).lower()
    if version != VERSION:
        raise SchemeError(f"AWQ version {version!r}: lowbit reads the GEMM layout only")
    if int(qcfg.get("bits", BITS)) != BITS or not qcfg.get("zero_point", True):
        raise SchemeError("lowbit reads 4-bit AWQ with zero points (zero_point: true) only")
    gs = int(qcfg.get("group_size", 128))
    if gs == 0 or gs < -1:
        raise SchemeError(f"AWQ group_size {gs} is neither -1 nor positive")
    return None if gs == -1 else gs


class AwqFormat(CheckpointFormat):
    """``--format awq``."""

    name = "awq"

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return SCALE_DTYPE

    def check(self, codec: Codec, shapes: Iterable[tuple[int, ...]]) -> None:
        g = group_size_of(codec)
        for shape in shapes:
            check_linear_shape(shape, g)

    def linear_tensors(self, q: QuantizedTensor) -> dict[str, torch.Tensor]:
        if not isinstance(q, AffineQuantized):
            raise SchemeError(f"AWQ checkpoints hold integer weights, not a {type(q).__name__}")
        return linear_tensors(q)

    def quantization_config(self, codec: Codec, ignore: list[str]) -> dict[str, Any]:
        return quantization_config(codec, ignore)


def attach_decoders(src: SafetensorsSource, qcfg: Mapping[str, Any]) -> None:
    """Present each quantized Linear of an AWQ checkpoint as a dequantized float32 ``.weight``."""
    g = group_size_from_config(qcfg)
    stored = set(src.raw_names())
    modules = [n.removesuffix(f".{QWEIGHT}") for n in src.raw_names() if n.endswith(f".{QWEIGHT}")]
    total_bits = total_params = 0
    for module in modules:
        parts = {s: f"{module}.{s}" for s in SUFFIXES}
        missing = [p for p in parts.values() if p not in stored]
        if missing:
            raise InputFileError(f"AWQ checkpoint {src.path} lacks {', '.join(missing)}")

        def read_stored(parts: dict[str, str] = parts) -> AffineQuantized:
            return read_linear({s: src.raw(p) for s, p in parts.items()}, g)

        def decode(read: Callable[[], AffineQuantized] = read_stored) -> torch.Tensor:
            q = read()
            return q.codec.dequantize(q)

        in_f = src.raw_info(parts[QWEIGHT]).shape[0]
        out_f = src.raw_info(parts[SCALES]).shape[-1]
        total_bits += sum(src.raw_info(p).nbytes * 8 for p in parts.values())
        total_params += out_f * in_f
        src.add_virtual(
            f"{module}.weight", decode, replaces=list(parts.values()), at=parts[QWEIGHT], stored=read_stored
        )
    src.linear_bits_per_weight = total_bits / total_params if total_params else None

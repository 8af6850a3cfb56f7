"""compressed-tensors checkpoints: per-Linear tensors and the ``quantization_config``.

Two of its formats: ``pack-quantized`` (integer weights; what llm-compressor writes for W4A16/W8A16-style
schemes) and ``float-quantized`` (FP8 e4m3 weights; the weight part of llm-compressor's FP8 /
FP8_DYNAMIC schemes). transformers (with compressed-tensors installed) and vLLM load both. The functions
here are pure: one quantized Linear in, the tensors stored under its module prefix out (and back), plus
the config.json block. Writing shards is the pipeline's job.

Stored tensors of one Linear ``(out, in)``, as compressed-tensors 0.20 writes and reads them
(``compressors/pack_quantized``)::

    weight_packed      int32 (out, ceil(in * b / 32))   codes, b bits each, densely packed along in
    weight_scale       scale dtype; tensor: (1,)  channel: (out, 1)  group: (out, in / g)
    weight_zero_point  asymmetric only, int32 (ceil(out * b / 32), G): packed along *out* (rows);
                       per-tensor: int8 (1,), not packed (compressed-tensors packs only group/channel)
    weight_shape       int64 (2,) = [out, in]

Code conventions (compressed-tensors' integer range is the signed ``[-2**(b-1), 2**(b-1) - 1]`` for
symmetric *and* asymmetric schemes; packing adds ``2**(b-1)`` to make the stored field unsigned):

* symmetric: ct code = lowbit code, stored field = code + 2**(b-1); no zero point.
* asymmetric: ct code = lowbit code - 2**(b-1) and ct zero = lowbit zero - 2**(b-1), so the stored
  fields are exactly lowbit's unsigned codes and zero points. ``w = (q - z) * s`` either way.

Dense packing: element ``i`` of a packed row occupies bits ``[i*b, (i+1)*b)`` of the row's little-endian
bit stream, word ``k`` holding stream bits ``[32k, 32k+32)``. For b in {2, 4, 8} this is the plain
LSB-first ``32 // b`` codes-per-word layout; for 3, 5, 6, 7 bits codes straddle words (as compressed-tensors
0.20 packs them; earlier packers used ``32 // b`` codes per word with the high bits wasted, a layout this
module refuses, by its width, rather than misreads).

Limits of the format (checked, not silently worked around):

* Groups must divide the input width: compressed-tensors' dequantization raises on a ragged last group
  (and vLLM's kernels need it too), so ``in % g != 0`` is a :class:`~lowbit.errors.ShapeError`.
* Only per-tensor, per-channel and ``Block(1, g)`` groups map to its strategies.
* ``weight_g_idx`` (activation-order groups) is gone from compressed-tensors 0.20; it is never written and
  only a trivial one is accepted on reading.
* vLLM's WNA16 scheme takes 4 and 8 bits only; transformers dequantizes any of 2..8.

Asymmetric checkpoints and transformers 5.23: its default ("run compressed") load path builds each
module's parameters with compressed-tensors' meta-device compression, which skips packing the zero point,
so it allocates ``weight_zero_point`` unpacked ``(out, G)`` int8 and rejects the packed tensor ("size
mismatch"); an unpacked int8 tensor loads but then fails at decompression, which unpacks int32 along rows.
Its ``dequantize=True`` path decompresses the stored tensors directly and reads the canonical layout. So
lowbit writes the canonical layout (what compressed-tensors' compressor, llm-compressor and vLLM use) and,
for asymmetric schemes, adds ``"dequantize": true`` to the config: a transformers loading attribute that
compressed-tensors' ``QuantizationConfig`` ignores (vLLM reads only the keys it knows; not tested here).

``float-quantized`` (``compressors/naive_quantized``: ``FloatQuantizationCompressor``, the weight cast to
the args' ``pytorch_dtype()``, which for ``type: float, num_bits: 8`` is always ``float8_e4m3fn``)::

    weight        float8_e4m3fn (out, in)   w / scale, clamped to +-448, rounded to nearest (ties even)
    weight_scale  float32; tensor: (1,)  channel: (out, 1)

``w = weight.float() * scale``; symmetric, no zero point. Only e4m3 exists in the format (there is no
field for e5m2), so :class:`~lowbit.formats.fp8.Fp8Codec` with e5m2 is a :class:`SchemeError`. lowbit
stores the codec's float32 scales whatever the model dtype: that is the dtype vLLM keeps FP8 scales in,
and an fp32 model loads in transformers bit for bit. In a bf16/fp16 model transformers' run-compressed path
casts the scales to the model dtype and multiplies there (llm-compressor stores them in that dtype to begin
with): two roundings where lowbit has one, so some weights differ from lowbit's by a bf16 ulp or two
(<= 2**-7 relative on stories260K in bf16). ``naive-quantized`` stores the same two tensors and is read too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from enum import Enum, StrEnum
from typing import Any

import torch

from lowbit.errors import InputFileError, SchemeError, ShapeError
from lowbit.formats import bitpack
from lowbit.formats.activations import ActKind, ActQuant, ActStrategy
from lowbit.formats.affine import AffineCodec, AffineQuantized
from lowbit.formats.base import PER_CHANNEL, PER_TENSOR, Block, group
from lowbit.formats.fp8 import Fp8Codec, Fp8Format, Fp8Quantized

logger = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
FLOAT_FORMAT = "float-quantized"
INT_FORMAT = "int-quantized"  # int8 weights stored unpacked, for W8A8 (weights + input activations)
INPUT_SCALE = "input_scale"
NAIVE_FORMAT = "naive-quantized"  # the same tensors as float-quantized (its base class)
MIXED_FORMAT = "mixed-precision"  # global format when config groups differ; each group names its own
#: The compressed-tensors release whose layouts (dense packing, row-packed zero points) this module writes.
FORMAT_VERSION = "0.20.0"

WEIGHT = "weight"
PACKED = "weight_packed"
SCALE = "weight_scale"
ZERO_POINT = "weight_zero_point"
SHAPE = "weight_shape"
G_IDX = "weight_g_idx"

_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Strategy(StrEnum):
    """compressed-tensors' name for the granularity of the scales."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"


@dataclasses.dataclass(frozen=True)
class Granularity:
    """A lowbit :class:`Block` in compressed-tensors' terms."""

    strategy: Strategy
    group_size: int | None = None

    @classmethod
    def of(cls, block: Block) -> Granularity:
        if block == PER_TENSOR:
            return cls(Strategy.TENSOR)
        if block == PER_CHANNEL:
            return cls(Strategy.CHANNEL)
        if block.rows == 1 and block.cols is not None:
            return cls(Strategy.GROUP, block.cols)
        raise SchemeError(
            f"compressed-tensors pack-quantized has no strategy for {block.label} blocks; "
            "use per-tensor, per-channel or groups of input columns"
        )

    @property
    def block(self) -> Block:
        if self.strategy is Strategy.TENSOR:
            return PER_TENSOR
        if self.strategy is Strategy.CHANNEL:
            return PER_CHANNEL
        assert self.group_size is not None
        return group(self.group_size)


# --------------------------------------------------------------------- scale dtype
def scale_dtype_for(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype to store (and therefore to quantize with) scales for a model of ``model_dtype``.

    The model's own dtype. transformers' ``dequantize`` path computes ``(q - z) * s`` in the *stored*
    scale dtype and casts to the model dtype; its run-compressed path first casts the stored scales to
    the model dtype. With scales in the model dtype both equal ``codec.dequantize(q).to(model_dtype)``
    bit for bit: the integer ``q - z`` (at most 9 bits) is exact in every float type, and the product is
    rounded once. fp32 model -> fp32 scales (fp16 scales would make the dequantize path round the product
    to fp16: ~2.6e-4 relative logit error on stories260K); bf16/fp16 models -> bf16/fp16 scales, which is
    also what llm-compressor stores and the dtype vLLM casts scales to. A float64 model gets fp32 scales
    (lowbit dequantizes in fp32).
    """
    if model_dtype in _SCALE_DTYPES:
        return model_dtype
    if model_dtype == torch.float64:
        return torch.float32
    raise SchemeError(f"no compressed-tensors scale dtype for a {model_dtype} model; expected a float dtype")


# --------------------------------------------------------------------- per-tensor conversion
def check_linear_shape(shape: tuple[int, ...], gran: Granularity) -> tuple[int, int]:
    """``(out, in)`` of a Linear weight of ``shape`` stored with ``gran``; a one-line :class:`ShapeError`
    if compressed-tensors cannot hold it (not 2-D, or a group size that does not divide ``in``)."""
    if len(shape) != 2:
        raise ShapeError(f"compressed-tensors stores 2-D Linear weights, not shape {tuple(shape)}")
    out_f, in_f = shape
    if gran.strategy is Strategy.GROUP:
        assert gran.group_size is not None
        if in_f % gran.group_size:
            raise ShapeError(
                f"compressed-tensors cannot hold a ragged last group: input width {in_f} is not a multiple "
                f"of group size {gran.group_size} (transformers and vLLM refuse it); use a group size that "
                "divides it, per-channel scales, or leave this layer unquantized"
            )
    return out_f, in_f


def linear_tensors(q: AffineQuantized) -> dict[str, torch.Tensor]:
    """The tensors stored for one quantized Linear under its module prefix, suffix -> tensor.

    Keys: ``weight_packed`` (int32), ``weight_scale`` (``q.codec.scale_dtype``), ``weight_shape``
    (int64 (2,)) and, when asymmetric, ``weight_zero_point`` (layouts in the module docstring).
    """
    codec = q.codec
    gran = Granularity.of(codec.block)
    out_f, in_f = check_linear_shape(q.shape, gran)
    if not getattr(q, "contiguous_groups", True):  # a GPTQ result with activation-order groups
        raise SchemeError(
            "compressed-tensors cannot store activation-order groups (g_idx); quantize with static groups "
            "(--act-order static) or write --format gptq"
        )
    bits = codec.bits
    offset = 1 << (bits - 1)

    codes = q.codes.reshape(out_f, in_f).to(torch.int64)
    if codec.symmetric:
        codes = codes + offset
    tensors = {PACKED: bitpack.pack_dense(codes, bits)}

    grid = codec.block.grid((out_f, in_f))
    scales = q.scales.reshape(grid)
    if gran.strategy is Strategy.TENSOR:
        scales = scales.reshape(1)
    tensors[SCALE] = scales.to(codec.scale_dtype).contiguous().clone()

    if not codec.symmetric:
        if q.zeros is None:
            raise SchemeError("asymmetric AffineQuantized without zero points")
        zeros = q.zeros.reshape(grid).to(torch.int64)
        if gran.strategy is Strategy.TENSOR:
            tensors[ZERO_POINT] = (zeros - offset).reshape(1).to(torch.int8)
        else:
            # (groups, out) packed along out, transposed back: (ceil(out * b / 32), groups)
            tensors[ZERO_POINT] = bitpack.pack_dense(zeros.T, bits).T.contiguous()
    tensors[SHAPE] = torch.tensor([out_f, in_f], dtype=torch.int64)
    return tensors


def read_linear(tensors: Mapping[str, torch.Tensor], codec: AffineCodec) -> AffineQuantized:
    """Inverse of :func:`linear_tensors`; also reads what compressed-tensors' compressor (llm-compressor)
    wrote, including zero points stored unpacked (int8 ``(out, G)``) or row-packed in an ``(out, G)``
    int32 tensor (the layout transformers 5.23 allocates).

    ``codec`` gives bits, symmetry and granularity (see :func:`codec_from_config`); the scale dtype is
    taken from the file, so the result dequantizes exactly as stored.
    """
    for key in (PACKED, SCALE, SHAPE):
        if key not in tensors:
            raise InputFileError(f"compressed-tensors Linear lacks '{key}' (has {sorted(tensors)})")
    gran = Granularity.of(codec.block)
    shape = tuple(int(v) for v in tensors[SHAPE].reshape(-1).tolist())
    out_f, in_f = check_linear_shape(shape, gran)
    bits = codec.bits
    offset = 1 << (bits - 1)

    packed = tensors[PACKED]
    n_words = math.ceil(in_f * bits / 32)
    if packed.dtype != torch.int32 or tuple(packed.shape) != (out_f, n_words):
        raise InputFileError(
            f"weight_packed is {packed.dtype} {tuple(packed.shape)}, expected int32 {(out_f, n_words)} for "
            f"{bits}-bit codes of shape {shape} (dense packing as compressed-tensors 0.20 writes it)"
        )
    codes = bitpack.unpack_dense(packed, bits, in_f).to(torch.int16)
    if codec.symmetric:
        codes = codes - offset

    scale = tensors[SCALE]
    if scale.dtype not in _SCALE_DTYPES:
        raise InputFileError(f"weight_scale has dtype {scale.dtype}; expected float16, bfloat16 or float32")
    if scale.dtype != codec.scale_dtype:
        logger.debug("taking scale dtype %s from the file instead of %s", scale.dtype, codec.scale_dtype)
        codec = dataclasses.replace(codec, scale_dtype=scale.dtype)
    grid = codec.block.grid((out_f, in_f))
    if scale.numel() != grid[0] * grid[1]:
        raise InputFileError(
            f"weight_scale has shape {tuple(scale.shape)}, expected {grid} for shape {shape}"
        )
    scales = scale.reshape(grid).clone()

    zeros: torch.Tensor | None = None
    zp = tensors.get(ZERO_POINT)
    if codec.symmetric:
        if zp is not None and bool(zp.ne(0).any()):
            raise InputFileError("symmetric scheme but the file holds nonzero weight_zero_point values")
    else:
        if zp is None:
            raise InputFileError("asymmetric scheme but the file has no weight_zero_point")
        zeros = _read_zero_points(zp, gran, bits, grid)
        if int(zeros.min()) < 0 or int(zeros.max()) > codec.qmax:
            raise InputFileError(f"weight_zero_point values fall outside the {bits}-bit range")

    g_idx = tensors.get(G_IDX)
    if g_idx is not None:
        cols_per_block = codec.block.resolve((out_f, in_f))[1]
        trivial = torch.arange(in_f) // cols_per_block
        if g_idx.numel() != in_f or not torch.equal(g_idx.reshape(-1).to(torch.int64), trivial):
            raise InputFileError(
                "weight_g_idx reorders columns (activation-order groups), which lowbit cannot represent; "
                "re-quantize without actorder='group'"
            )
    return AffineQuantized(shape=shape, codes=codes, scales=scales, zeros=zeros, codec=codec)


def _read_zero_points(zp: torch.Tensor, gran: Granularity, bits: int, grid: tuple[int, int]) -> torch.Tensor:
    """lowbit's unsigned int16 zero points (grid) from any zero-point layout a writer produced."""
    offset = 1 << (bits - 1)
    out_f, n_groups = grid
    if gran.strategy is Strategy.TENSOR or zp.dtype != torch.int32:
        # Unpacked, compressed-tensors' signed convention.
        if zp.numel() != out_f * n_groups or zp.is_floating_point():
            raise InputFileError(f"weight_zero_point is {zp.dtype} {tuple(zp.shape)}, expected {grid}")
        return (zp.reshape(grid).to(torch.int16) + offset).contiguous()
    zp2 = zp.reshape(zp.shape[0], -1)
    n_words = math.ceil(out_f * bits / 32)
    if zp2.shape[1] != n_groups or zp2.shape[0] not in (n_words, out_f):
        raise InputFileError(
            f"weight_zero_point is int32 {tuple(zp.shape)}; expected ({n_words}, {n_groups}) packed along rows"
        )
    if zp2.shape[0] != n_words and bool(zp2[n_words:].ne(0).any()):
        raise InputFileError(
            "weight_zero_point is int32 of unpacked shape but not row-packed; cannot read it"
        )
    return bitpack.unpack_dense(zp2[:n_words].T.contiguous(), bits, out_f).T.to(torch.int16).contiguous()


# --------------------------------------------------------------------- int-quantized (W8A8)
def int_linear_tensors(q: AffineQuantized) -> dict[str, torch.Tensor]:
    """``int-quantized`` (``IntQuantizationCompressor``): the signed codes as ``weight`` int8 ``(out, in)``
    and ``weight_scale``; symmetric 8-bit only (what llm-compressor's W8A8 presets write and vLLM runs)."""
    codec = q.codec
    if codec.bits != 8 or not codec.symmetric:
        raise SchemeError(f"compressed-tensors int-quantized holds symmetric 8-bit weights, not {codec.name}")
    gran = Granularity.of(codec.block)
    out_f, in_f = check_linear_shape(q.shape, gran)
    scales = q.scales.reshape(codec.block.grid((out_f, in_f)))
    if gran.strategy is Strategy.TENSOR:
        scales = scales.reshape(1)
    return {
        WEIGHT: q.codes.reshape(out_f, in_f).to(torch.int8).contiguous(),
        SCALE: scales.to(codec.scale_dtype).contiguous().clone(),
    }


def read_int_linear(tensors: Mapping[str, torch.Tensor], codec: AffineCodec) -> AffineQuantized:
    """Inverse of :func:`int_linear_tensors` (also what llm-compressor's W8A8 presets write)."""
    for key in (WEIGHT, SCALE):
        if key not in tensors:
            raise InputFileError(
                f"compressed-tensors int-quantized Linear lacks '{key}' (has {sorted(tensors)})"
            )
    w = tensors[WEIGHT]
    if w.dtype != torch.int8 or w.ndim != 2:
        raise InputFileError(
            f"int-quantized weight is {w.dtype} {tuple(w.shape)}; expected a 2-D int8 tensor"
        )
    if codec.bits != 8 or not codec.symmetric:
        raise InputFileError(
            f"int-quantized weights with {codec.bits} bits, symmetric={codec.symmetric}: lowbit reads symmetric int8"
        )
    out_f, in_f = check_linear_shape(tuple(w.shape), Granularity.of(codec.block))
    scale = tensors[SCALE]
    if scale.dtype not in _SCALE_DTYPES:
        raise InputFileError(f"weight_scale has dtype {scale.dtype}; expected float16, bfloat16 or float32")
    codec = dataclasses.replace(codec, scale_dtype=scale.dtype)
    grid = codec.block.grid((out_f, in_f))
    if scale.numel() != grid[0] * grid[1]:
        raise InputFileError(
            f"weight_scale has shape {tuple(scale.shape)}, expected {grid} for shape {(out_f, in_f)}"
        )
    zp = tensors.get(ZERO_POINT)
    if zp is not None and bool(zp.ne(0).any()):
        raise InputFileError("symmetric scheme but the file holds nonzero weight_zero_point values")
    return AffineQuantized(
        shape=(out_f, in_f),
        codes=w.to(torch.int16),
        scales=scale.reshape(grid).clone(),
        zeros=None,
        codec=codec,
    )


def activation_args(act: ActQuant) -> dict[str, Any]:
    """The ``input_activations`` QuantizationArgs of a config group for ``act``."""
    return {
        "num_bits": act.bits,
        "type": act.kind.value,
        "symmetric": True,
        "group_size": None,
        "strategy": act.strategy.value,
        "dynamic": act.dynamic,
        "observer": None if act.dynamic else "minmax",
    }


def activations_from_config(config_group: Mapping[str, Any]) -> ActQuant | None:
    """The :class:`ActQuant` of a config group's ``input_activations`` (None when activations stay float);
    a one-line :class:`SchemeError` for what lowbit cannot simulate."""
    args = config_group.get("input_activations")
    if not args:
        return None
    if not isinstance(args, Mapping):
        raise SchemeError(f"input_activations is {args!r}; expected quantization args")
    kind = config_text(args.get("type", "int"))
    strategy = config_text(args.get("strategy") or "tensor")
    dynamic = args.get("dynamic")
    if not bool(args.get("symmetric", True)):
        raise SchemeError("asymmetric activation quantization is not supported by lowbit's evaluator")
    if strategy not in ("token", "tensor"):
        raise SchemeError(f"activation strategy {strategy!r}: lowbit simulates per-token and per-tensor")
    if config_text(dynamic) == "local":
        raise SchemeError("locally dynamic (NVFP4-style) activation scales are not supported by lowbit")
    try:
        return ActQuant(
            ActKind(kind), int(args.get("num_bits", 8)), ActStrategy(strategy), dynamic=bool(dynamic)
        )
    except ValueError as e:
        raise SchemeError(f"input_activations {dict(args)}: {e}") from None


# --------------------------------------------------------------------- float-quantized (FP8)
def fp8_granularity(codec: Fp8Codec) -> Granularity:
    """The strategy of an FP8 codec in float-quantized terms; :class:`SchemeError` for what the format
    cannot hold (e5m2 codes, groups or 2-D blocks)."""
    if codec.fmt is not Fp8Format.E4M3:
        raise SchemeError(
            f"compressed-tensors {FLOAT_FORMAT} stores only FP8 e4m3 (float8_e4m3fn) weights, not "
            f"{codec.fmt.value}; use the fp8 (e4m3) scheme"
        )
    if codec.block == PER_TENSOR:
        return Granularity(Strategy.TENSOR)
    if codec.block == PER_CHANNEL:
        return Granularity(Strategy.CHANNEL)
    raise SchemeError(
        f"lowbit writes compressed-tensors {FLOAT_FORMAT} per tensor or per channel, not {codec.block.label} "
        "blocks; use a per-tensor or per-channel FP8 codec"
    )


def fp8_linear_tensors(q: Fp8Quantized) -> dict[str, torch.Tensor]:
    """The tensors stored for one FP8-quantized Linear under its module prefix, suffix -> tensor.

    Keys: ``weight`` (float8_e4m3fn ``(out, in)``, the codes as they are) and ``weight_scale`` (float32,
    ``(1,)`` per tensor or ``(out, 1)`` per channel).
    """
    gran = fp8_granularity(q.codec)
    out_f, in_f = check_linear_shape(q.shape, gran)
    assert q.codes.dtype == torch.float8_e4m3fn, q.codes.dtype
    scales = q.scales.to(torch.float32).reshape(q.codec.block.grid((out_f, in_f)))
    if gran.strategy is Strategy.TENSOR:
        scales = scales.reshape(1)
    return {WEIGHT: q.codes.reshape(out_f, in_f).contiguous(), SCALE: scales.contiguous().clone()}


def read_fp8_linear(tensors: Mapping[str, torch.Tensor], codec: Fp8Codec) -> Fp8Quantized:
    """Inverse of :func:`fp8_linear_tensors`; also reads what compressed-tensors' compressor
    (llm-compressor) wrote: scales in float16/bfloat16 (converted to float32 exactly) and an all-zero
    ``weight_zero_point``.

    ``codec`` gives the granularity (see :func:`codec_from_config`). The shape is the stored weight's.
    """
    for key in (WEIGHT, SCALE):
        if key not in tensors:
            raise InputFileError(f"compressed-tensors FP8 Linear lacks '{key}' (has {sorted(tensors)})")
    gran = fp8_granularity(codec)
    codes = tensors[WEIGHT]
    if codes.dtype != torch.float8_e4m3fn:
        raise InputFileError(f"FP8 weight has dtype {codes.dtype}; {FLOAT_FORMAT} stores float8_e4m3fn")
    shape = tuple(int(n) for n in codes.shape)
    out_f, in_f = check_linear_shape(shape, gran)
    scale = tensors[SCALE]
    if scale.dtype not in _SCALE_DTYPES:
        raise InputFileError(f"weight_scale has dtype {scale.dtype}; expected float16, bfloat16 or float32")
    grid = codec.block.grid((out_f, in_f))
    if scale.numel() != grid[0] * grid[1]:
        raise InputFileError(
            f"weight_scale has shape {tuple(scale.shape)}, expected {grid} for shape {shape}"
        )
    zp = tensors.get(ZERO_POINT)
    if zp is not None and bool(zp.float().ne(0).any()):
        raise InputFileError("FP8 weights are symmetric but the file holds nonzero weight_zero_point values")
    return Fp8Quantized(
        shape=shape, codes=codes.clone(), scales=scale.reshape(grid).to(torch.float32), codec=codec
    )


# --------------------------------------------------------------------- config.json
#: A codec this module stores: integers (pack-quantized) or FP8 e4m3 (float-quantized).
CtCodec = AffineCodec | Fp8Codec


def weights_args(codec: AffineCodec, observer: str = "minmax") -> dict[str, Any]:
    """The ``weights`` QuantizationArgs of a config group, as compressed-tensors 0.20 serializes them."""
    gran = Granularity.of(codec.block)
    return {
        "num_bits": codec.bits,
        "type": "int",
        "symmetric": codec.symmetric,
        "group_size": gran.group_size,
        "strategy": gran.strategy.value,
        "dynamic": False,
        "observer": observer,
    }


def fp8_weights_args(codec: Fp8Codec, observer: str = "minmax") -> dict[str, Any]:
    """The ``weights`` QuantizationArgs of an FP8 config group (``type: float``, 8 bits, symmetric)."""
    gran = fp8_granularity(codec)
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "group_size": None,
        "strategy": gran.strategy.value,
        "dynamic": False,
        "observer": observer,
    }


def quantization_config(
    codec: CtCodec,
    ignore: Sequence[str],
    targets: Sequence[str] = ("Linear",),
    observer: str = "minmax",
    dequantize_on_load: bool | None = None,
    activations: ActQuant | None = None,
) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json for one config group quantized with ``codec``.

    An :class:`AffineCodec` is written as ``pack-quantized``, an :class:`Fp8Codec` as ``float-quantized``
    (weights only: ``input_activations`` is null, i.e. FP8 W8A16). ``ignore``: module names (or ``re:``
    patterns) that match ``targets`` but stay dense, e.g. ``["lm_head"]``. ``observer`` is informational.
    ``dequantize_on_load`` (default: asymmetric integer schemes only) adds transformers' ``"dequantize":
    true`` loading attribute, without which transformers 5.23 cannot load row-packed zero points (see the
    module docstring). ``activations``: how the linears' inputs are quantized (W8A8); integer weights
    are then stored ``int-quantized`` (llm-compressor's W8A8 layout).
    """
    if isinstance(codec, Fp8Codec):
        weights, fmt, symmetric = fp8_weights_args(codec, observer), FLOAT_FORMAT, True
    elif activations is not None:
        weights, fmt, symmetric = weights_args(codec, observer), INT_FORMAT, codec.symmetric
    else:
        weights, fmt, symmetric = weights_args(codec, observer), FORMAT, codec.symmetric
        if codec.bits not in (4, 8):
            logger.info(
                "%d-bit pack-quantized loads in transformers; vLLM runs only 4 and 8 bits", codec.bits
            )
    config: dict[str, Any] = {
        "config_groups": {
            "group_0": {
                "targets": list(targets),
                "weights": weights,
                "input_activations": None if activations is None else activation_args(activations),
                "output_activations": None,
                "format": fmt,
            }
        },
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": FORMAT_VERSION,
    }
    if dequantize_on_load is None:
        dequantize_on_load = not symmetric
    if dequantize_on_load:
        config["dequantize"] = True
    return config


def codec_from_config(
    config_group: Mapping[str, Any],
    scale_dtype: torch.dtype = torch.float32,
    default_format: str | None = None,
) -> CtCodec:
    """The codec of one ``config_groups`` entry (a QuantizationScheme dict): an :class:`AffineCodec` for
    integer ``pack-quantized`` weights, an :class:`Fp8Codec` (e4m3) for 8-bit ``float-quantized`` (or
    ``naive-quantized``) float weights.

    The group's ``format`` wins; without one, ``default_format`` (the config's global format), and
    without that the format compressed-tensors would infer for the weight type. ``scale_dtype`` is not
    part of the config (the stored scales carry it); :func:`read_linear` takes the file's dtype regardless.
    """
    args = config_group.get("weights")
    if not isinstance(args, Mapping):
        raise SchemeError("config group has no 'weights' quantization args; nothing for lowbit to read")
    kind = config_text(args.get("type", "int"))
    if kind not in ("int", "float"):
        raise SchemeError(
            f"compressed-tensors weights of type {args.get('type')!r}: lowbit reads int and float"
        )
    fmt_value = config_group.get("format") or default_format
    fmt = config_text(fmt_value) if fmt_value is not None else (FORMAT if kind == "int" else FLOAT_FORMAT)
    readable = (FORMAT, INT_FORMAT, NAIVE_FORMAT) if kind == "int" else (FLOAT_FORMAT, NAIVE_FORMAT)
    if fmt not in readable:
        raise SchemeError(
            f"config group format {fmt_value!r} with {kind} weights: lowbit reads {kind} weights only as "
            f"{' or '.join(map(repr, readable))}"
        )
    if args.get("actorder") is True or config_text(args.get("actorder")) in ("group", "dynamic"):
        raise SchemeError(
            "activation-order groups (actorder='group') are not supported; lowbit cannot read g_idx"
        )
    if args.get("dynamic") not in (None, False):
        raise SchemeError("dynamic weight quantization has no stored scales; nothing for lowbit to read")
    bits = int(args.get("num_bits", 8))
    group_size = args.get("group_size")
    strategy = args.get("strategy")
    if strategy is None:  # compressed-tensors infers it from group_size
        strategy = "tensor" if group_size is None else ("channel" if group_size == -1 else "group")
    try:
        strat = Strategy(config_text(strategy))
    except ValueError:
        raise SchemeError(f"compressed-tensors strategy {strategy!r} is not supported by lowbit") from None
    if strat is Strategy.GROUP and (not isinstance(group_size, int) or group_size <= 0):
        raise SchemeError(f"group strategy needs a positive group_size, not {group_size!r}")
    gran = Granularity(strat, group_size if strat is Strategy.GROUP else None)
    symmetric = bool(args.get("symmetric", True))
    if kind == "float":
        if bits != 8 or not symmetric or strat is Strategy.GROUP:
            raise SchemeError(
                f"compressed-tensors float weights with {bits} bits, {strat.value} strategy"
                f"{'' if symmetric else ', asymmetric'}: lowbit reads symmetric FP8 per tensor or per channel"
            )
        return Fp8Codec(fmt=Fp8Format.E4M3, block=gran.block)
    return AffineCodec(bits=bits, symmetric=symmetric, block=gran.block, scale_dtype=scale_dtype)


def config_text(value: Any) -> str:
    """A config value as lower-case text (dicts from ``model_dump()`` hold str-enums, config.json strings)."""
    return str(value.value if isinstance(value, Enum) else value).lower()


def codecs_from_config(
    config: Mapping[str, Any], scale_dtype: torch.dtype = torch.float32
) -> dict[str, CtCodec]:
    """Codec of every config group of a ``quantization_config`` block, by group name (groups may differ
    in format: the global format is then ``mixed-precision`` and each group names its own)."""
    if config_text(config.get("quant_method")) != QUANT_METHOD:
        raise SchemeError(f"quant_method is {config.get('quant_method')!r}, not {QUANT_METHOD!r}")
    fmt = config.get("format")
    default = None if fmt is None or config_text(fmt) == MIXED_FORMAT else config_text(fmt)
    groups = config.get("config_groups") or {}
    if not isinstance(groups, Mapping) or not groups:
        raise SchemeError("quantization_config has no config_groups")
    codecs: dict[str, CtCodec] = {}
    for name, scheme in groups.items():
        if not isinstance(scheme, Mapping):
            raise SchemeError(f"config group {name!r} is a preset name list; expand it before reading")
        codecs[name] = codec_from_config(scheme, scale_dtype, default)
    return codecs

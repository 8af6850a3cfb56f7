"""compressed-tensors as a :class:`CheckpointFormat` (``pack-quantized`` integers, ``float-quantized`` FP8),
and its reader.

Which compressed-tensors format a codec is stored in is data: :data:`LAYOUTS` maps a codec type to its
:class:`Layout`, which the writer (:class:`CompressedTensorsFormat`) and the reader
(:func:`attach_decoders`) share.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lowbit.errors import InputFileError, SchemeError
from lowbit.export import compressed_tensors as ct
from lowbit.export.hf_checkpoint import CheckpointFormat
from lowbit.formats.activations import ActQuant, LinearActivation, LLMInt8
from lowbit.formats.affine import AffineCodec, AffineQuantized
from lowbit.formats.base import Codec, QuantizedTensor
from lowbit.formats.fp8 import Fp8Codec, Fp8Quantized

if TYPE_CHECKING:
    from lowbit.walk.sources import SafetensorsSource

log = logging.getLogger(__name__)

# Activation quantization parameters a config group with input_activations stores next to the weight.
_ACTIVATION_SUFFIXES = ("input_scale", "input_zero_point", "input_global_scale")


class Layout(ABC):
    """How one codec family is stored per Linear in one compressed-tensors format."""

    codec_type: ClassVar[type[Codec]]
    format: ClassVar[str]
    #: Stored tensor suffixes of one Linear, the first being where the decoded ``.weight`` is listed.
    suffixes: ClassVar[tuple[str, ...]]

    @abstractmethod
    def check(self, codec: Codec, shapes: Iterable[tuple[int, ...]]) -> None:
        """One-line SchemeError/ShapeError if ``codec`` cannot be stored for these shapes."""

    @abstractmethod
    def tensors(self, q: QuantizedTensor) -> dict[str, torch.Tensor]:
        """Suffix -> tensor for one quantized Linear."""

    @abstractmethod
    def read(self, tensors: Mapping[str, torch.Tensor], codec: Codec) -> QuantizedTensor:
        """The codec's result (codes and parameters, as stored) from the stored tensors (suffix -> tensor)."""

    def decode(self, tensors: Mapping[str, torch.Tensor], codec: Codec) -> torch.Tensor:
        """The float32 weight ``(out, in)`` from the stored tensors (suffix -> tensor)."""
        q = self.read(tensors, codec)
        stored_codec = getattr(q, "codec", codec)
        assert isinstance(stored_codec, Codec)
        return stored_codec.dequantize(q)

    @abstractmethod
    def shape(self, src: SafetensorsSource, module: str) -> tuple[int, int]:
        """The logical ``(out, in)`` of the stored Linear ``module``, without decoding it."""

    def payload(self, suffix: str) -> bool:
        """Whether a stored tensor counts towards the bits per weight (metadata such as shapes does not)."""
        return True


class PackQuantized(Layout):
    codec_type = AffineCodec
    format = ct.FORMAT
    suffixes = (ct.PACKED, ct.SCALE, ct.ZERO_POINT, ct.SHAPE, ct.G_IDX)

    def check(self, codec: Codec, shapes: Iterable[tuple[int, ...]]) -> None:
        assert isinstance(codec, AffineCodec)
        gran = ct.Granularity.of(codec.block)
        for shape in shapes:
            ct.check_linear_shape(shape, gran)

    def tensors(self, q: QuantizedTensor) -> dict[str, torch.Tensor]:
        assert isinstance(q, AffineQuantized)
        return ct.linear_tensors(q)

    def read(self, tensors: Mapping[str, torch.Tensor], codec: Codec) -> QuantizedTensor:
        assert isinstance(codec, AffineCodec)
        return ct.read_linear(tensors, codec)

    def shape(self, src: SafetensorsSource, module: str) -> tuple[int, int]:
        shape = tuple(int(v) for v in src.raw(f"{module}.{ct.SHAPE}").reshape(-1).tolist())
        if len(shape) != 2:
            raise InputFileError(f"{module}.{ct.SHAPE} is {shape}; expected 2 values")
        return shape[0], shape[1]

    def payload(self, suffix: str) -> bool:
        return suffix != ct.SHAPE


class UnpackedLayout(Layout):
    """Formats that store the codes as a plain ``weight`` tensor of the Linear's shape."""

    suffixes = (ct.WEIGHT, ct.SCALE, ct.ZERO_POINT)

    def shape(self, src: SafetensorsSource, module: str) -> tuple[int, int]:
        info = src.raw_info(f"{module}.{ct.WEIGHT}")
        if len(info.shape) != 2:
            raise InputFileError(f"{module}.{ct.WEIGHT} has shape {info.shape}; expected a 2-D Linear weight")
        return info.shape[0], info.shape[1]


class IntQuantized(UnpackedLayout):
    """Symmetric int8 weights, unpacked (W8A8: the weights of llm-compressor's W8A8 presets)."""

    codec_type = AffineCodec
    format = ct.INT_FORMAT

    def check(self, codec: Codec, shapes: Iterable[tuple[int, ...]]) -> None:
        assert isinstance(codec, AffineCodec)
        if codec.bits != 8 or not codec.symmetric:
            raise SchemeError(
                f"W8A8 in compressed-tensors stores symmetric int8 weights, not {codec.name}; use w8a8"
            )
        PackQuantized().check(codec, shapes)

    def tensors(self, q: QuantizedTensor) -> dict[str, torch.Tensor]:
        assert isinstance(q, AffineQuantized)
        return ct.int_linear_tensors(q)

    def read(self, tensors: Mapping[str, torch.Tensor], codec: Codec) -> QuantizedTensor:
        assert isinstance(codec, AffineCodec)
        return ct.read_int_linear(tensors, codec)


class FloatQuantized(UnpackedLayout):
    codec_type = Fp8Codec
    format = ct.FLOAT_FORMAT

    def check(self, codec: Codec, shapes: Iterable[tuple[int, ...]]) -> None:
        assert isinstance(codec, Fp8Codec)
        gran = ct.fp8_granularity(codec)
        for shape in shapes:
            ct.check_linear_shape(shape, gran)

    def tensors(self, q: QuantizedTensor) -> dict[str, torch.Tensor]:
        assert isinstance(q, Fp8Quantized)
        return ct.fp8_linear_tensors(q)

    def read(self, tensors: Mapping[str, torch.Tensor], codec: Codec) -> QuantizedTensor:
        assert isinstance(codec, Fp8Codec)
        return ct.read_fp8_linear(tensors, codec)


#: Codec type -> how compressed-tensors stores it with float activations (weight-only schemes).
LAYOUTS: dict[type[Codec], Layout] = {
    layout.codec_type: layout for layout in (PackQuantized(), FloatQuantized())
}
#: ... and with quantized activations (W8A8): integer weights are then stored unpacked.
ACTIVATION_LAYOUTS: dict[type[Codec], Layout] = {
    layout.codec_type: layout for layout in (IntQuantized(), FloatQuantized())
}
#: Config-group format name -> layout, for reading.
FORMAT_LAYOUTS: dict[str, Layout] = {
    ct.FORMAT: PackQuantized(),
    ct.INT_FORMAT: IntQuantized(),
    ct.FLOAT_FORMAT: FloatQuantized(),
    ct.NAIVE_FORMAT: FloatQuantized(),
}


def layout_for(codec: Codec, activations: bool = False) -> Layout:
    """The :class:`Layout` storing ``codec`` (``activations``: the scheme quantizes linear inputs too);
    a one-line SchemeError for codecs compressed-tensors cannot hold."""
    table = ACTIVATION_LAYOUTS if activations else LAYOUTS
    layout = next((table[t] for t in type(codec).__mro__ if t in table), None)
    if layout is None:
        raise SchemeError(
            f"compressed-tensors holds integer (pack-/int-quantized) and FP8 e4m3 (float-quantized) weights, "
            f"not {codec.name}; choose a wN/wNgG, w8a8 or fp8 scheme, or another output format"
        )
    return layout


class CompressedTensorsFormat(CheckpointFormat):
    name = "compressed-tensors"
    metadata_suffixes = (ct.SHAPE,)

    def check_activations(self, activations: ActQuant | LLMInt8 | None) -> None:
        if isinstance(activations, LLMInt8):
            raise SchemeError(
                "LLM.int8()'s outlier decomposition is a bitsandbytes runtime feature; write it with --format bnb"
            )

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return ct.scale_dtype_for(model_dtype)

    def check(self, codec: Codec, shapes: Iterable[tuple[int, ...]]) -> None:
        layout_for(codec, self.activations is not None).check(codec, shapes)

    def linear_tensors(self, q: QuantizedTensor) -> dict[str, torch.Tensor]:
        codec = getattr(q, "codec", None)
        if not isinstance(codec, Codec):
            raise SchemeError(f"compressed-tensors cannot store a {type(q).__name__}: it names no codec")
        return layout_for(codec, self.activations is not None).tensors(q)

    def quantization_config(self, codec: Codec, ignore: list[str]) -> dict[str, Any]:
        layout_for(codec, self.activations is not None)  # the one-line SchemeError
        assert isinstance(codec, AffineCodec | Fp8Codec)
        assert not isinstance(self.activations, LLMInt8)
        return ct.quantization_config(codec, ignore, activations=self.activations)


def _targets_match(targets: Iterable[str], module: str) -> bool:
    return any(t.startswith("re:") and re.match(t[3:], module) for t in targets)


def attach_decoders(src: SafetensorsSource, qcfg: Mapping[str, Any]) -> None:
    """Present each quantized Linear of a compressed-tensors checkpoint as a dequantized ``.weight``.

    Config groups may use different formats (``mixed-precision``): each module is decoded by the layout
    of its group's format. Groups that quantize input activations record a :class:`LinearActivation`
    per module in ``src.activations`` (with its stored ``input_scale`` when static), so evaluation
    quantizes activations as the checkpoint says.
    """
    codecs = ct.codecs_from_config(qcfg)
    global_fmt = qcfg.get("format")
    groups: Mapping[str, Any] = qcfg.get("config_groups") or {}
    default = next((n for n, g in groups.items() if "Linear" in g.get("targets", [])), next(iter(codecs)))
    raw_names = src.raw_names()
    stored = set(raw_names)
    # A quantized Linear stores weight_packed (pack-quantized) or weight_scale (every format).
    modules = dict.fromkeys(
        name.rpartition(".")[0] for name in raw_names if name.endswith((f".{ct.PACKED}", f".{ct.SCALE}"))
    )
    total_bits = 0
    total_params = 0
    for module in modules:
        group = next((n for n, g in groups.items() if _targets_match(g.get("targets", []), module)), default)
        codec = codecs[group]
        fmt = groups[group].get("format") or global_fmt
        layout = FORMAT_LAYOUTS.get(ct.config_text(fmt)) if fmt else None
        layout = layout or layout_for(codec)
        parts = {s: f"{module}.{s}" for s in layout.suffixes if f"{module}.{s}" in stored}
        first = layout.suffixes[0]
        if first not in parts:
            raise InputFileError(
                f"{module} has {sorted(s for s in (ct.PACKED, ct.WEIGHT, ct.SCALE) if f'{module}.{s}' in stored)} "
                f"but config group {group!r} is {layout.format}, which stores '{first}'; the file and its "
                "quantization_config disagree"
            )

        def decode(
            layout: Layout = layout, codec: Codec = codec, parts: dict[str, str] = parts
        ) -> torch.Tensor:
            return layout.decode({s: src.raw(p) for s, p in parts.items()}, codec)

        def read_stored(
            layout: Layout = layout, codec: Codec = codec, parts: dict[str, str] = parts
        ) -> QuantizedTensor:
            return layout.read({s: src.raw(p) for s, p in parts.items()}, codec)

        out_f, in_f = layout.shape(src, module)
        total_bits += sum(src.raw_info(p).nbytes * 8 for s, p in parts.items() if layout.payload(s))
        total_params += out_f * in_f
        weight = f"{module}.{ct.WEIGHT}"
        hidden = [p for p in parts.values() if p != weight]
        acts = [f"{module}.{s}" for s in _ACTIVATION_SUFFIXES if f"{module}.{s}" in stored]
        spec = ct.activations_from_config(groups[group]) if group in groups else None
        if spec is not None:
            scale = None
            if not spec.dynamic:
                if f"{module}.{ct.INPUT_SCALE}" not in stored:
                    raise InputFileError(
                        f"{module} quantizes its input with a static scale but the file has no input_scale"
                    )
                scale = src.raw(f"{module}.{ct.INPUT_SCALE}").float().reshape(())
            src.activations[module] = LinearActivation(spec, input_scale=scale)
        src.add_virtual(weight, decode, replaces=hidden + acts, at=parts[first], stored=read_stored)
    src.linear_bits_per_weight = total_bits / total_params if total_params else None

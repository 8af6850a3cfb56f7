"""The compressed-tensors ``pack-quantized`` format as a :class:`CheckpointFormat`, and its reader."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from lowbit.errors import InputFileError, SchemeError
from lowbit.export import compressed_tensors as ct
from lowbit.export.hf_checkpoint import CheckpointFormat
from lowbit.formats.affine import AffineCodec, AffineQuantized
from lowbit.formats.base import Codec, QuantizedTensor

if TYPE_CHECKING:
    from lowbit.walk.sources import SafetensorsSource


class CompressedTensorsFormat(CheckpointFormat):
    name = "compressed-tensors"

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return ct.scale_dtype_for(model_dtype)

    def check(self, codec: Codec, shapes: Iterable[tuple[int, ...]]) -> None:
        if not isinstance(codec, AffineCodec):
            raise SchemeError(f"compressed-tensors pack-quantized holds integer schemes, not {codec.name}")
        gran = ct.Granularity.of(codec.block)
        for shape in shapes:
            ct._check_linear_shape(shape, gran)

    def linear_tensors(self, q: QuantizedTensor) -> dict[str, torch.Tensor]:
        assert isinstance(q, AffineQuantized)
        return ct.linear_tensors(q)

    def quantization_config(self, codec: Codec, ignore: list[str]) -> dict[str, Any]:
        assert isinstance(codec, AffineCodec)
        return ct.quantization_config(codec, ignore)


def _targets_match(targets: Iterable[str], module: str) -> bool:
    return any(t.startswith("re:") and re.match(t[3:], module) for t in targets)


def attach_decoders(src: SafetensorsSource, qcfg: Mapping[str, Any]) -> None:
    """Present each packed Linear of a compressed-tensors checkpoint as a dequantized ``.weight``."""
    codecs = ct.codecs_from_config(qcfg)
    groups = qcfg.get("config_groups") or {}
    default = next((n for n, g in groups.items() if "Linear" in g.get("targets", [])), next(iter(codecs)))
    total_bits = 0
    total_params = 0
    for raw in src.raw_names():
        if not raw.endswith("." + ct.PACKED):
            continue
        module = raw[: -len(ct.PACKED) - 1]
        group = next((n for n, g in groups.items() if _targets_match(g.get("targets", []), module)), default)
        codec = codecs[group]
        parts = [f"{module}.{s}" for s in (ct.PACKED, ct.SCALE, ct.ZERO_POINT, ct.SHAPE, ct.G_IDX)]
        parts = [p for p in parts if p in src.raw_names()]

        def decode(module: str = module, codec: AffineCodec = codec, parts: list[str] = parts) -> torch.Tensor:
            q = ct.read_linear({p.rpartition(".")[2]: src.raw(p) for p in parts}, codec)
            return q.codec.dequantize(q)

        shape = tuple(int(v) for v in src.raw(f"{module}.{ct.SHAPE}").tolist())
        if len(shape) != 2:
            raise InputFileError(f"{module}.weight_shape is {shape}; expected 2 values")
        total_bits += sum(src.raw_info(p).nbytes * 8 for p in parts if not p.endswith(ct.SHAPE))
        total_params += shape[0] * shape[1]
        src.add_virtual(f"{module}.weight", decode, replaces=parts, at=raw)
    src.linear_bits_per_weight = total_bits / total_params if total_params else None

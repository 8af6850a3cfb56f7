"""Quantized Hugging Face checkpoints: the directory layout shared by every HF-side format.

A :class:`CheckpointFormat` knows only how one quantized linear is stored (tensor suffix -> tensor) and
what ``quantization_config`` says; this module streams the walk into ``model.safetensors``, writes
``config.json`` and the tokenizer, and renames the finished directory into place.
"""

from __future__ import annotations

import json
import logging
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from lowbit.errors import SchemeError
from lowbit.export.atomic import atomic_dir
from lowbit.export.safetensors_writer import StreamingSafetensorsWriter
from lowbit.formats.activations import ActQuant, LLMInt8
from lowbit.formats.base import Codec, QuantizedTensor
from lowbit.walk.quantize_walk import WalkItem
from lowbit.walk.sources import ModelSource, SafetensorsSource

log = logging.getLogger(__name__)

FORMATS: dict[str, type[CheckpointFormat]] = {}

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


class CheckpointFormat(ABC):
    """How quantized linears are stored in one Hugging Face checkpoint format."""

    name: ClassVar[str]
    # Stored tensors that describe a linear (e.g. its shape) rather than encode it: not counted as bits.
    metadata_suffixes: ClassVar[tuple[str, ...]] = ()
    #: Whether the format stores each input column's group (GPTQ's ``g_idx``): what activation-order
    #: GPTQ with dynamic groups needs.
    holds_group_index: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", None):
            FORMATS[cls.name] = cls

    def __init__(self, activations: ActQuant | LLMInt8 | None = None) -> None:
        self.check_activations(activations)
        #: How the scheme quantizes linear inputs at run time (None: float activations).
        self.activations = activations

    def check_activations(self, activations: ActQuant | LLMInt8 | None) -> None:
        """One-line :class:`SchemeError` if the format cannot say how activations are quantized."""
        if activations is not None:
            raise SchemeError(
                f"{self.name} checkpoints store weights only; a scheme that quantizes activations "
                f"({activations.label}) needs compressed-tensors (w8a8, fp8) or bnb (int8)"
            )

    @abstractmethod
    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the format stores scales in for a model of ``model_dtype``."""

    @abstractmethod
    def check(self, codec: Codec, shapes: Iterable[tuple[int, ...]]) -> None:
        """Raise a one-line :class:`SchemeError`/:class:`ShapeError` if ``codec`` cannot be stored
        for these weight shapes, before any work is done."""

    @abstractmethod
    def linear_tensors(self, q: QuantizedTensor) -> dict[str, torch.Tensor]:
        """Suffix -> tensor for one quantized linear (stored under ``<module>.<suffix>``)."""

    @abstractmethod
    def quantization_config(self, codec: Codec, ignore: list[str]) -> dict[str, Any]:
        """The ``quantization_config`` block of config.json."""


def available_formats() -> list[str]:
    """Names of the Hugging Face checkpoint formats lowbit writes (importing them registers them)."""
    from lowbit.export import bnb, ct_format, hf_awq, hf_gptq  # noqa: F401

    return sorted(FORMATS)


def get_format(name: str, activations: ActQuant | LLMInt8 | None = None) -> CheckpointFormat:
    """The writer of format ``name`` for a scheme whose linear inputs are quantized as ``activations``."""
    available_formats()
    cls = FORMATS.get(name)
    if cls is None:
        raise SchemeError(f"unknown output format {name!r}; available: {', '.join(sorted(FORMATS))}")
    return cls(activations)


def model_dtype(source: ModelSource) -> torch.dtype:
    """The float dtype the checkpoint's weights are in (float32 for GGUF, which is dequantized)."""
    name = source.config.get("dtype") or source.config.get("torch_dtype") or "float32"
    if isinstance(source, SafetensorsSource):
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)
    return torch.float32


@dataclass(frozen=True)
class WrittenCheckpoint:
    path: Path
    file_bytes: int
    linear_bits: int  # bits stored for the quantized linears (codes, scales, zeros, padding included)
    linear_params: int

    @property
    def linear_bits_per_weight(self) -> float:
        return self.linear_bits / self.linear_params if self.linear_params else float("nan")


def write_checkpoint(
    items: Iterable[WalkItem],
    source: ModelSource,
    fmt: CheckpointFormat,
    codec: Codec,
    out: Path,
    force: bool = False,
    extra_config: Mapping[str, Any] | None = None,
) -> WrittenCheckpoint:
    """Stream ``items`` into a checkpoint directory ``out`` (atomic: complete or absent)."""
    ignore = ["lm_head"] + [f"re:.*{k.replace('.', '[.]')}$" for k in source.arch.keep_linears]
    dtype = model_dtype(source)
    linear_bits = linear_params = 0
    with atomic_dir(out, force) as tmp:
        with StreamingSafetensorsWriter(tmp / "model.safetensors", {"format": "pt"}) as writer:
            for item in items:
                if item.quantized is None:
                    t = item.tensor
                    writer.add(item.name, t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t)
                    continue
                prefix = item.name[: -len(".weight")]
                linear_params += item.tensor.numel()
                for suffix, t in fmt.linear_tensors(item.quantized).items():
                    writer.add(f"{prefix}.{suffix}", t)
                    if suffix not in fmt.metadata_suffixes:
                        linear_bits += t.numel() * t.element_size() * 8
                if item.input_scale is not None:
                    writer.add(f"{prefix}.input_scale", item.input_scale.reshape(1).to(torch.float32))
        extra = {"quantization_config": fmt.quantization_config(codec, ignore), **(extra_config or {})}
        _write_config_and_tokenizer(source, tmp, dtype, extra)
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    log.info("wrote %s (%.2f MB of weights)", out, size / 1e6)
    return WrittenCheckpoint(out, size, linear_bits, linear_params)


def write_float_checkpoint(
    source: ModelSource, out: Path, force: bool = False, dtype: torch.dtype = torch.float32
) -> Path:
    """``source`` as a plain Hugging Face directory ``out`` (atomic): every tensor of ``source.names()``
    in ``dtype`` (floats; others as they are), streamed one at a time, its config (without any
    quantization_config) and its tokenizer. Writes e.g. a rotated model (:class:`~lowbit.walk.rotated.
    RotatedSource`) for runtimes and converters that take a checkpoint directory."""
    with atomic_dir(out, force) as tmp:
        with StreamingSafetensorsWriter(tmp / "model.safetensors", {"format": "pt"}) as writer:
            for name in source.names():
                t = source.read(name)
                writer.add(name, t.to(dtype) if t.is_floating_point() else t)
        _write_config_and_tokenizer(source, tmp, dtype, {})
    log.info("wrote %s (%.2f MB)", out, (out / "model.safetensors").stat().st_size / 1e6)
    return out


def _write_config_and_tokenizer(
    source: ModelSource, out: Path, dtype: torch.dtype, extra: Mapping[str, Any]
) -> None:
    """config.json (``source``'s, in ``dtype``, updated with ``extra``) and the tokenizer files."""
    config = {k: v for k, v in source.config.items() if not k.startswith("_")}
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    if "architectures" not in config:
        config["architectures"] = [_causal_lm_class(config["model_type"])]
    config.update(extra)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_tokenizer(source, out)


def _causal_lm_class(model_type: str) -> str:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    AutoConfig.for_model(model_type)  # validates the type
    return str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def _write_tokenizer(source: ModelSource, out: Path) -> None:
    # A model directory's own files (also behind a wrapper such as RotatedSource, whose path is the
    # directory it reads): converters read tokenizer.model, which save_pretrained may not write.
    if source.path.is_dir():
        for name in _TOKENIZER_FILES:
            f = source.path / name
            if f.is_file():
                shutil.copy2(f, out / name)
        return
    source.tokenizer().save_pretrained(str(out))

"""bitsandbytes checkpoints: what ``transformers`` saves for a model loaded with ``load_in_8bit`` /
``load_in_4bit``, and loads back with bitsandbytes installed (on CPU too).

Stored tensors of one Linear ``(out, in)``, as transformers 5.23 + bitsandbytes 0.50 save them::

    8-bit (LLM.int8()):
        weight          int8 (out, in)       codes, round(w_fp16 * 127 / SCB)
        SCB             float32 (out,)       row absmax
        weight_format   uint8 ()             0 (row-major; older bitsandbytes had tiled layouts)
    4-bit (NF4 / FP4):
        weight          uint8 (ceil(out*in/2), 1)  two codes per byte, first in the high nibble
        weight.absmax   float32 (blocks,) or, with double quantization, uint8 codes (blocks,)
        weight.quant_map            float32 (16,)    the NF4/FP4 code table
        weight.nested_absmax        float32 (ceil(blocks/256),)   double quantization only
        weight.nested_quant_map     float32 (256,)   bitsandbytes' dynamic map, double quantization only
        weight.quant_state.bitsandbytes__nf4  uint8 JSON: quant_type, blocksize, dtype, shape
                                    (+ nested_blocksize, nested_dtype, nested_offset)

The layout is what ``bitsandbytes.functional.QuantState.as_dict(packed=True)`` produces; it is written
here from lowbit's own codec results (bit-exact with ``quantize_4bit``, tested) so that writing needs
neither bitsandbytes nor a GPU. Reading gives dequantized weights and, for 8-bit, the LLM.int8()
activation handling the runtime applies (:class:`~lowbit.formats.activations.LLMInt8`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from lowbit.errors import InputFileError, SchemeError, ShapeError
from lowbit.export.hf_checkpoint import CheckpointFormat
from lowbit.formats.activations import ActQuant, LinearActivation, LLMInt8
from lowbit.formats.base import Codec, QuantizedTensor
from lowbit.formats.int8 import Int8RowCodec, Int8RowQuantized
from lowbit.formats.nf4 import (
    NESTED_BLOCKSIZE,
    Bnb4Codec,
    Bnb4Quantized,
    Float4Type,
    NestedAbsmax,
    code_table,
    dynamic_map,
)

if TYPE_CHECKING:
    from lowbit.walk.sources import SafetensorsSource

log = logging.getLogger(__name__)

QUANT_METHOD = "bitsandbytes"
SCB = "SCB"
WEIGHT_FORMAT = "weight_format"
QUANT_STATE = "weight.quant_state.bitsandbytes__"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def int8_tensors(q: Int8RowQuantized) -> dict[str, torch.Tensor]:
    return {
        "weight": q.codes.contiguous(),
        SCB: q.row_absmax.to(torch.float32).contiguous(),
        WEIGHT_FORMAT: torch.tensor(0, dtype=torch.uint8),
    }


def bnb4_tensors(q: Bnb4Quantized, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The ``QuantState.as_dict(packed=True)`` tensors of one 4-bit weight, plus the packed codes."""
    codec = q.codec
    state: dict[str, Any] = {
        "quant_type": codec.quant_type.value,
        "blocksize": codec.blocksize,
        "dtype": _dtype_name(dtype),
        "shape": list(q.shape),
    }
    tensors = {"weight": q.packed.reshape(-1, 1).contiguous()}
    if q.nested is None:
        assert q.absmax is not None
        tensors["weight.absmax"] = q.absmax.to(torch.float32).contiguous()
    else:
        tensors["weight.absmax"] = q.nested.codes.to(torch.uint8).contiguous()
    tensors["weight.quant_map"] = code_table(codec.quant_type).to(torch.float32).clone()
    if q.nested is not None:
        tensors["weight.nested_absmax"] = q.nested.absmax.to(torch.float32).contiguous()
        tensors["weight.nested_quant_map"] = dynamic_map().to(torch.float32).clone()
        state |= {
            "nested_blocksize": NESTED_BLOCKSIZE,
            "nested_dtype": "float32",
            "nested_offset": float(q.nested.offset.item()),
        }
    blob = json.dumps(state).encode()
    tensors[QUANT_STATE + codec.quant_type.value] = torch.tensor(list(blob), dtype=torch.uint8)
    return tensors


class BnbFormat(CheckpointFormat):
    """bitsandbytes 8-bit (LLM.int8()) and 4-bit (NF4/FP4, optional double quantization) checkpoints."""

    name = "bnb"
    metadata_suffixes = (
        WEIGHT_FORMAT,
        "weight.quant_map",
        "weight.nested_quant_map",
        QUANT_STATE + "nf4",
        QUANT_STATE + "fp4",
    )

    def __init__(self, activations: ActQuant | LLMInt8 | None = None) -> None:
        super().__init__(activations)
        self._dtype = torch.float32

    def check_activations(self, activations: ActQuant | LLMInt8 | None) -> None:
        if isinstance(activations, ActQuant):
            raise SchemeError(
                f"bitsandbytes checkpoints quantize activations only as LLM.int8() does, not {activations.label}; "
                "write w8a8/fp8 as compressed-tensors"
            )

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        # bitsandbytes keeps absmax in float32; the model dtype is what quant_state records.
        self._dtype = model_dtype
        return torch.float32

    def check(self, codec: Codec, shapes: Iterable[tuple[int, ...]]) -> None:
        if isinstance(codec, Int8RowCodec):
            if not isinstance(self.activations, LLMInt8):
                raise SchemeError("bitsandbytes 8-bit weights are LLM.int8(): use --scheme int8")
        elif isinstance(codec, Bnb4Codec):
            if self.activations is not None:
                raise SchemeError("bitsandbytes 4-bit layers keep activations in float")
        else:
            raise SchemeError(
                f"bitsandbytes checkpoints hold int8 (LLM.int8()) and NF4/FP4 weights, not {codec.name}; "
                "use --scheme int8, nf4, nf4-dq or fp4"
            )
        for shape in shapes:
            if len(shape) != 2:
                raise ShapeError(f"bitsandbytes stores 2-D Linear weights, not shape {tuple(shape)}")

    def linear_tensors(self, q: QuantizedTensor) -> dict[str, torch.Tensor]:
        if isinstance(q, Int8RowQuantized):
            return int8_tensors(q)
        if isinstance(q, Bnb4Quantized):
            return bnb4_tensors(q, self._dtype)
        raise SchemeError(f"bitsandbytes cannot store a {type(q).__name__}")

    def quantization_config(self, codec: Codec, ignore: list[str]) -> dict[str, Any]:
        skip = [m.removeprefix("re:.*").replace("[.]", ".").rstrip("$") for m in ignore]
        eight = isinstance(codec, Int8RowCodec)
        b4 = codec if isinstance(codec, Bnb4Codec) else None
        threshold = self.activations.threshold if isinstance(self.activations, LLMInt8) else 6.0
        return {
            "_load_in_4bit": not eight,
            "_load_in_8bit": eight,
            "bnb_4bit_compute_dtype": _dtype_name(self._dtype),
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": b4.quant_type.value if b4 else "fp4",
            "bnb_4bit_use_double_quant": bool(b4 and b4.double_quant),
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skip,
            "llm_int8_threshold": threshold,
            "load_in_4bit": not eight,
            "load_in_8bit": eight,
            "quant_method": QUANT_METHOD,
        }


# --------------------------------------------------------------------- reading
def _read_int8(src: SafetensorsSource, module: str) -> Int8RowQuantized:
    codes = src.raw(f"{module}.weight")
    scb = src.raw(f"{module}.{SCB}")
    if codes.dtype != torch.int8 or codes.ndim != 2 or scb.shape != (codes.shape[0],):
        raise InputFileError(
            f"{module}: bitsandbytes 8-bit weight is {codes.dtype} {tuple(codes.shape)} with SCB "
            f"{tuple(scb.shape)}; expected int8 (out, in) and float32 (out,)"
        )
    return Int8RowQuantized(
        shape=tuple(codes.shape), codes=codes, row_absmax=scb.float(), codec=Int8RowCodec()
    )


def _read_bnb4(src: SafetensorsSource, module: str, state_name: str) -> Bnb4Quantized:
    try:
        state = json.loads(bytes(src.raw(state_name).tolist()).decode())
        quant_type = Float4Type(state["quant_type"])
        shape = tuple(int(v) for v in state["shape"])
        blocksize = int(state["blocksize"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise InputFileError(f"{state_name} is not a bitsandbytes quant state ({e})") from None
    nested = "nested_offset" in state
    codec = Bnb4Codec(quant_type, blocksize, nested)
    n = 1
    for d in shape:
        n *= d
    packed = src.raw(f"{module}.weight").reshape(-1)
    if packed.dtype != torch.uint8 or packed.numel() != -(-n // 2):
        raise InputFileError(
            f"{module}.weight is {packed.dtype} with {packed.numel()} bytes; expected uint8 with "
            f"{-(-n // 2)} for shape {shape}"
        )
    absmax = src.raw(f"{module}.weight.absmax")
    if absmax.numel() != codec.num_blocks(shape):
        raise InputFileError(
            f"{module}.weight.absmax has {absmax.numel()} values, expected {codec.num_blocks(shape)}"
        )
    if not nested:
        return Bnb4Quantized(shape=shape, packed=packed, absmax=absmax.float(), nested=None, codec=codec)
    if int(state.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE:
        raise InputFileError(
            f"{state_name}: nested block size {state.get('nested_blocksize')}; lowbit reads 256"
        )
    nested_abs = src.raw(f"{module}.weight.nested_absmax").float()
    qmap = src.raw(f"{module}.weight.nested_quant_map").float()
    if not torch.equal(qmap, dynamic_map().float()):
        raise InputFileError(f"{module}.weight.nested_quant_map is not bitsandbytes' dynamic map")
    nest = NestedAbsmax(
        codes=absmax.to(torch.uint8), absmax=nested_abs, offset=torch.tensor(float(state["nested_offset"]))
    )
    return Bnb4Quantized(shape=shape, packed=packed, absmax=None, nested=nest, codec=codec)


def attach_decoders(src: SafetensorsSource, qcfg: Mapping[str, Any]) -> None:
    """Present each bitsandbytes Linear as a dequantized ``.weight``; 8-bit linears also record their
    LLM.int8() activation handling (threshold from the config) in ``src.activations``."""
    load_8bit = bool(qcfg.get("load_in_8bit") or qcfg.get("_load_in_8bit"))
    threshold = float(qcfg.get("llm_int8_threshold", 6.0))
    if load_8bit and qcfg.get("llm_int8_has_fp16_weight"):
        raise InputFileError(
            "bitsandbytes checkpoint keeps fp16 weights (llm_int8_has_fp16_weight); nothing quantized"
        )
    raw_names = src.raw_names()
    stored = set(raw_names)
    total_bits = 0
    total_params = 0
    for name in raw_names:
        module = None
        if name.endswith(f".{SCB}"):
            module = name[: -len(SCB) - 1]
            parts = [name] + [f"{module}.{WEIGHT_FORMAT}"] * (f"{module}.{WEIGHT_FORMAT}" in stored)
            q8 = _read_int8(src, module)
            total_params += q8.codes.numel()
            total_bits += q8.codec.storage_bits(q8.shape)

            def decode8(module: str = module) -> torch.Tensor:
                q = _read_int8(src, module)
                return q.codec.dequantize(q)

            def codes8(module: str = module) -> tuple[torch.Tensor, torch.Tensor]:
                q = _read_int8(src, module)
                return q.codes, q.row_absmax

            src.activations[module] = LinearActivation(LLMInt8(threshold), int8_weight=codes8)
            src.add_virtual(f"{module}.weight", decode8, replaces=parts, at=f"{module}.weight")
        elif ".weight.quant_state.bitsandbytes__" in name:
            module = name.split(".weight.quant_state.")[0]
            extra = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
            parts = [name] + [f"{module}.weight.{e}" for e in extra if f"{module}.weight.{e}" in stored]
            q4 = _read_bnb4(src, module, name)
            total_params += q4.numel
            total_bits += q4.codec.storage_bits(q4.shape)

            def decode4(module: str = module, state_name: str = name) -> torch.Tensor:
                q = _read_bnb4(src, module, state_name)
                return q.codec.dequantize(q)

            src.add_virtual(f"{module}.weight", decode4, replaces=parts, at=f"{module}.weight")
    if not total_params:
        raise InputFileError(
            f"{src.path} says it is a bitsandbytes checkpoint but holds no quantized linears"
        )
    src.linear_bits_per_weight = total_bits / total_params

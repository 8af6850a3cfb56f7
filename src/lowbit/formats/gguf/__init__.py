"""ggml block types (Q4_0, Q8_0, Q2_K..Q6_K, IQ*, TQ*): their sizes, their codecs (bit-exact with
ggml's quantizers: ``get_codec("Q4_K").quantize_rows(x, imatrix)``), and llama-quantize's per-tensor mixes."""

from lowbit.formats.gguf.block import CODECS, GGMLBlockCodec, get_codec, register_all_codecs
from lowbit.formats.gguf.types import (
    GGML_TYPES,
    GGMLType,
    GGMLTypeInfo,
    block_size,
    ggml_type,
    is_quantized,
    row_bytes,
    tensor_nbytes,
    type_info,
)

register_all_codecs()

__all__ = [
    "CODECS",
    "GGMLBlockCodec",
    "GGML_TYPES",
    "GGMLType",
    "GGMLTypeInfo",
    "block_size",
    "get_codec",
    "ggml_type",
    "is_quantized",
    "row_bytes",
    "tensor_nbytes",
    "type_info",
]

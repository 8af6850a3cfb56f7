"""ggml block types (Q4_0, Q8_0, Q2_K..Q6_K, IQ*, TQ*): their sizes, and llama-quantize's per-tensor mixes."""

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

__all__ = [
    "GGML_TYPES",
    "GGMLType",
    "GGMLTypeInfo",
    "block_size",
    "ggml_type",
    "is_quantized",
    "row_bytes",
    "tensor_nbytes",
    "type_info",
]

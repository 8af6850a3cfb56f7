"""ggml's ternary types TQ1_0 and TQ2_0 (BitNet b1.58 / TriLM weights), bit-exact with ggml.

Each super-block of 256 values keeps one fp16 absmax ``d`` and codes ``round(x / d)`` in {-1, 0, 1}
(``lroundf``: halves away from zero). ggml's quantizers ignore the importance vector, and gguf-py's
``quantize`` reproduces ``quantize_row_tq1_0_ref`` / ``quantize_row_tq2_0_ref`` byte for byte, so both
delegate to it (:class:`~lowbit.formats.gguf.block.GGUFPyCodec`).

Byte layouts (little-endian, one super-block of 256):

    TQ2_0 (66 bytes)  qs[64] | d:f16    2 bits per value, (code + 1); byte m of each 32-byte group
                                        holds elements m, m+32, m+64, m+96 at bits 0, 2, 4, 6.
    TQ1_0 (54 bytes)  qs[48] | qh[4] | d:f16
                      5 trits per byte (qs) and 4 per byte (qh), stored as ceil(t * 256 / 243) so that
                      multiplying by 3 shifts the next trit into the top bits.
"""

from __future__ import annotations

from lowbit.formats.gguf.block import GGUFPyCodec
from lowbit.formats.gguf.types import GGMLType


class TQ1_0(GGUFPyCodec):
    ggml_type = GGMLType.TQ1_0


class TQ2_0(GGUFPyCodec):
    ggml_type = GGMLType.TQ2_0

"""Reading quantized Hugging Face checkpoints: each quantized linear is presented as a float ``.weight``.

lowbit's own outputs and checkpoints from other tools (llm-compressor's compressed-tensors) are then
evaluated and inspected like any other model. The per-tensor decoding lives with each export format.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lowbit.walk.sources import SafetensorsSource

log = logging.getLogger(__name__)


def attach_quantized_decoders(src: SafetensorsSource) -> None:
    """If ``src``'s config names a quantization format lowbit reads, present dequantized weights."""
    qcfg = src.config.get("quantization_config")
    if not qcfg:
        return
    method = qcfg.get("quant_method")
    if method == "compressed-tensors":
        from lowbit.export import ct_format

        ct_format.attach_decoders(src, qcfg)
        return
    if method == "gptq":
        from lowbit.export import hf_gptq

        hf_gptq.attach_decoders(src, qcfg)
        return
    if method == "awq":
        from lowbit.export import hf_awq

        hf_awq.attach_decoders(src, qcfg)
        return
    if method == "bitsandbytes":
        from lowbit.export import bnb

        bnb.attach_decoders(src, qcfg)
        return
    from lowbit.errors import InputFileError

    raise InputFileError(
        f"{src.path} is quantized with {method!r}, which lowbit cannot read yet; supported: "
        "compressed-tensors, gptq, awq, bitsandbytes"
    )

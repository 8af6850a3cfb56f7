"""The model walk: one transformer block at a time, each block linear through a method and a codec.

Tensors are read lazily from the source (memory-mapped), quantized, handed to the consumer and dropped,
so peak memory is about one block, not the model. Consumers are the exporters (write a checkpoint) and
the simulator (an in-memory float model with quantized-then-dequantized weights, for evaluation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lowbit.errors import NonFiniteWeightError
from lowbit.formats.base import Codec, CodecPlan, QuantizedTensor, RegionCodec, sqnr_db
from lowbit.methods.base import Method
from lowbit.walk.sources import ModelSource
from lowbit.walk.stats import LayerStat, WalkStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WalkItem:
    """One tensor of the model: ``quantized`` is set for the linears the walk quantized."""

    name: str
    tensor: torch.Tensor
    quantized: QuantizedTensor | None = None
    # Static activation quantization: the calibrated scale of this linear's input.
    input_scale: torch.Tensor | None = None


def check_finite(name: str, w: torch.Tensor) -> None:
    if w.is_floating_point() and not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise NonFiniteWeightError(
            f"tensor {name} holds {bad} NaN/Inf values; fix the checkpoint before quantizing"
        )


def walk_quantize(
    source: ModelSource,
    codec: Codec | CodecPlan,
    method: Method,
    stats: WalkStats | None = None,
    progress: bool = True,
    measure_error: bool = True,
    keep_grids: bool = False,
) -> Iterator[WalkItem]:
    """Yield every tensor of ``source`` in block order, block linears quantized with their codec of
    ``codec`` (one codec, or a :class:`CodecPlan` per tensor).

    Embeddings, norms and lm_head pass through unchanged (``quantized`` is None) unless the plan names
    them (a GGUF mix quantizes the embeddings: round-to-nearest), as do linears whose plan says ``None``.

    ``keep_grids``: a linear the source stores quantized (a GPTQ, AWQ or compressed-tensors checkpoint)
    keeps its codes and scales where its codec can hold that grid (:meth:`Codec.from_grid`) instead of
    being quantized again from its dequantized weights (the method runs on the others); its
    :class:`LayerStat` notes ``kept_grid`` 1 (0 for a linear quantized again), and its error is
    measured against the stored weights as for every linear (``inf`` dB: exact).
    """
    arch = source.arch
    plan = CodecPlan.of(codec)
    groups = source.blocks()
    bar = tqdm(groups, desc="quantize", unit="block", disable=not progress, leave=False)
    for grp in bar:
        for name in grp.names:
            stored = source.read_stored(name) if keep_grids and arch.is_quantizable(name) else None
            stored_codec = getattr(stored, "codec", None)
            if stored is not None and isinstance(stored_codec, Codec):
                t = stored_codec.dequantize(stored)  # what source.read gives, without reading it again
            else:
                t = source.read(name)
            c = plan(name) if arch.is_quantizable(name) else plan.tensors.get(name)
            if c is not None:
                check_finite(name, t)
                q = None
                notes: dict[str, float] = {}
                if stored is not None and isinstance(stored_codec, RegionCodec):
                    q = c.from_grid(stored_codec.element_grid(stored))
                    notes["kept_grid"] = float(q is not None)
                if q is None:
                    q = method.quantize_linear(t, c) if arch.is_quantizable(name) else c.quantize(t)
                bits = c.storage_bits(tuple(t.shape))
                if stats is not None:
                    err = sqnr_db(t, c.dequantize(q)) if measure_error else math.nan
                    stats.layers.append(LayerStat(name, tuple(t.shape), bits, err, notes))
                    stats.quantized_params += t.numel()
                    stats.quantized_bits += bits
                    log.debug("%s %s: %.2f dB", name, tuple(t.shape), err)
                yield WalkItem(name, t, q)
            else:
                if stats is not None:
                    stats.other_params += t.numel()
                    stats.other_bits += t.numel() * t.element_size() * 8
                yield WalkItem(name, t)


def simulate(
    source: ModelSource,
    codec: Codec | CodecPlan,
    method: Method,
    stats: WalkStats | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Float weights of the simulated-quantization model: each quantized linear replaced by its
    dequantized codes (float32), everything else as stored."""
    out: dict[str, torch.Tensor] = {}
    plan = CodecPlan.of(codec)
    for item in walk_quantize(source, plan, method, stats, progress):
        if item.quantized is not None:
            c = plan(item.name)
            assert c is not None
            out[item.name] = c.dequantize(item.quantized).to(torch.float32)
        else:
            out[item.name] = item.tensor
    return out

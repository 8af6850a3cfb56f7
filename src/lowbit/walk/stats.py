"""What a quantization walk produced: bits and error per layer (no torch, so that GGUF paths can report it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lowbit.formats.activations import LinearActivation


@dataclass(frozen=True)
class LayerStat:
    name: str
    shape: tuple[int, ...]
    bits: int
    sqnr_db: float
    # What the method reports about this layer from calibration (e.g. LLM.int8()'s outlier features).
    notes: dict[str, float] = field(default_factory=dict)


@dataclass
class WalkStats:
    """Bits and error of what the walk produced, filled in while it runs."""

    layers: list[LayerStat] = field(default_factory=list)
    quantized_params: int = 0
    quantized_bits: int = 0
    other_params: int = 0
    other_bits: int = 0
    # Simulation of a scheme that quantizes activations: module name -> how its input is quantized.
    activations: dict[str, LinearActivation] = field(default_factory=dict)

    @property
    def linear_bits_per_weight(self) -> float:
        return self.quantized_bits / self.quantized_params if self.quantized_params else math.nan

    @property
    def model_bits_per_weight(self) -> float:
        n = self.quantized_params + self.other_params
        return (self.quantized_bits + self.other_bits) / n if n else math.nan

    @property
    def mean_sqnr_db(self) -> float:
        finite = [s.sqnr_db for s in self.layers if math.isfinite(s.sqnr_db)]
        return sum(finite) / len(finite) if finite else math.nan

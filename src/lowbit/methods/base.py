"""The method contract: one linear layer at a time.

A method takes a weight ``(out_features, in_features)``, the codec, and whatever calibration statistics
it declared (``needs``), and returns the codec's quantized result. It never sees a file or a model.
Methods register themselves by name; the CLI's ``--method`` choices come from this registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lowbit.errors import ArgumentError, SchemeError
from lowbit.formats.activations import ActQuant, LLMInt8
from lowbit.formats.base import Codec, QuantizedTensor

if TYPE_CHECKING:
    from lowbit.methods.refine import RefineConfig
    from lowbit.models.registry import Architecture

METHODS: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class BlockContext:
    """What a block-level method (AWQ, SmoothQuant) sees of one transformer block during calibration.

    ``weights``: the block's float tensors by block-relative name (``"mlp.up_proj.weight"``).
    ``inputs``: sampled input activations ``(tokens, in_features)`` float32 of each linear input, keyed by
    the registry's feeding op: a norm mapping's ``source`` for the linears it feeds (they share the input),
    otherwise the linear's own relative name (``"self_attn.o_proj"``).
    ``run``: runs the block with the given weights on the sampled calibration hidden states and returns
    its output ``(samples, seq, hidden)``; the block's original output is ``run(weights)``.
    ``stats``: the accumulated statistics the method declared in ``needs`` over *all* calibration tokens,
    keyed like ``inputs`` (e.g. ``stats["input_layernorm"]["absmax"]``). A transform that changes a
    linear's inputs updates their statistics here (AWQ: the importance of the scaled inputs): the walk
    hands these, not the original block's, to :meth:`Method.quantize_linear`.
    ``activations``: how the scheme quantizes the linears' inputs at run time (None: float).
    ``codec`` quantizes every linear except those in ``codecs`` (block-relative linear name, without
    ``.weight`` -> codec, or None: the linear stays in float): a GGUF mix gives some linears more bits,
    and keeps widths no block type divides in F16; use :meth:`codec_for`.
    """

    index: int
    weights: Mapping[str, torch.Tensor]
    arch: Architecture
    codec: Codec
    inputs: Mapping[str, torch.Tensor]
    run: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
    stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    activations: ActQuant | LLMInt8 | None = None
    codecs: Mapping[str, Codec | None] = field(default_factory=dict)

    def codec_for(self, linear: str) -> Codec | None:
        """The codec of block-relative linear ``linear`` (``"mlp.down_proj"``); None: kept in float."""
        return self.codecs.get(linear, self.codec)


class Method(ABC):
    """Base of quantization methods; subclasses set ``name`` and are registered on definition."""

    name: ClassVar[str]
    # Calibration statistics the method consumes, by accumulator name (e.g. "hessian"); empty = none.
    needs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", None):
            METHODS[cls.name] = cls

    # The scheme a method implies when none is given (LLM.int8() -> "int8").
    default_scheme: ClassVar[str | None] = None
    # Methods that use calibration statistics only for reporting (LLM.int8()'s outlier counts) run
    # without calibration text too.
    calibration_optional: ClassVar[bool] = False

    # Block-level methods edit a whole block's float weights (scales folded into norms, clipping) before
    # its linears are quantized; the walk then captures sampled inputs and calls transform_block.
    transforms_block: ClassVar[bool] = False

    # Methods whose point is a scheme that quantizes activations too (SmoothQuant, LLM.int8()) say what
    # they are for; weight-only formats (GGUF mixes) refuse them.
    activation_method: ClassVar[str | None] = None

    # Block-output refinement after the block's linears are quantized (methods.refine); None: off.
    refinement: RefineConfig | None = None

    @property
    def scatters_groups(self) -> bool:
        """Whether the method's groups can be non-contiguous sets of input columns (GPTQ's act-order with
        dynamic groups), which only formats with a per-column group index can store."""
        return False

    @property
    def statistics(self) -> tuple[str, ...]:
        """The statistics this configured method takes (``needs``, unless its options add some)."""
        return self.needs

    @property
    def refines(self) -> bool:
        """Whether the walk refines each quantized block's codes on its output (``refinement``)."""
        return self.refinement is not None and self.refinement.iters > 0

    @property
    def needs_calibration(self) -> bool:
        """Whether the method cannot run without calibration data (statistics or a block-level search)."""
        return (
            bool(self.statistics) or self.transforms_block or self.refines
        ) and not self.calibration_optional

    def describe_layer(self, stats: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Numbers worth reporting about one linear from its calibration statistics (default: none)."""
        return {}

    def transform_block(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        """New float weights for the block (all of ``ctx.weights``' names). Default: unchanged."""
        return dict(ctx.weights)

    @abstractmethod
    def quantize_linear(
        self, weight: torch.Tensor, codec: Codec, stats: dict[str, torch.Tensor] | None = None
    ) -> QuantizedTensor:
        """Quantize one linear weight ``(out, in)`` with ``codec``."""


def get_method(name: str, **options: Any) -> Method:
    """The method ``name`` configured with ``options`` (e.g. ``alpha`` for SmoothQuant); a one-line
    error for an unknown method or an option it does not take."""
    # Import the built-in methods so that they register.
    from lowbit.methods import awq, gptq, llm_int8, rtn, smoothquant  # noqa: F401

    cls = METHODS.get(name)
    if cls is None:
        raise SchemeError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    opts = {k: v for k, v in options.items() if v is not None}
    refine = opts.pop("refine", None)  # any method's blocks can be refined on their output
    try:
        method = cls(**opts)
    except TypeError:
        raise ArgumentError(
            f"method {name} takes no option {', '.join(sorted(opts))}; see lowbit quantize --help"
        ) from None
    if refine is not None:
        from lowbit.methods.refine import RefineConfig

        method.refinement = refine if isinstance(refine, RefineConfig) else RefineConfig(iters=int(refine))
    return method

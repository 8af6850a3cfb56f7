"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, then W8A8.

For each norm that feeds linears (the registry's ``kind="norm"`` mappings: attention input norm -> q, k,
v; MLP norm -> gate, up) and, unless ``mappings="norms"``, each linear that feeds another linear through
an elementwise path (``kind="linear"``: up -> down; v -> o where the shapes allow), per input channel
``j`` of the targets::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

with ``max|X_j|`` over every calibration token (the ``absmax`` statistic) and ``max|W_j|`` over the
column ``j`` of all the targets. ``1/s`` is folded into the norm and ``s`` into the targets' columns
(:func:`lowbit.transforms.scaling.fold_scales`), so the float model computes the same function; the
activations the linears see have flatter channels, which per-token or per-tensor int8 quantizes with less
error. Then the weights are rounded (per channel, by the scheme's codec).

The paper and llm-compressor's default mappings smooth only the norms. lowbit also smooths up -> down by
default because that is where small Llama-style models keep their largest activation outliers (SmolLM2-135M:
up to 663 of down_proj's 1536 input features reach |x| >= 6 in one layer, against at most a few for q/k/v),
and nothing else smooths them. Dividing up_proj's output rows by ``s`` does not change its own per-channel
weight quantization (each row has its own scale), so the extra fold costs nothing there.

``alpha="auto"`` searches alpha over a grid per mapping, minimizing the error of the targets' outputs
with both weights and activations quantized as the scheme says, on sampled calibration tokens,
against the unquantized outputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lowbit.errors import ArgumentError
from lowbit.formats.activations import ActKind, ActQuant, ActStrategy
from lowbit.formats.base import Codec, QuantizedTensor
from lowbit.methods.base import BlockContext, Method
from lowbit.models.registry import FeedMapping
from lowbit.transforms.scaling import expand_mapping, fold_scales, input_key, scaled_width

log = logging.getLogger(__name__)

AUTO = "auto"
ALPHA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
SEARCH_TOKENS = 1024
_EPS = 1e-5
MAPPING_SETS: dict[str, tuple[str, ...]] = {"all": ("norm", "linear"), "norms": ("norm",)}


@dataclass(frozen=True)
class SmoothReport:
    block: int
    source: str
    alpha: float
    loss: float  # relative output error at alpha (auto search), NaN when alpha was given
    loss_unsmoothed: float


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|X|^alpha / max|W|^(1-alpha)`` per channel, clamped away from zero (dead channels get 1)."""
    x = x_absmax.double().clamp(min=_EPS)
    w = w_absmax.double().clamp(min=_EPS)
    s = x.pow(alpha) / w.pow(1 - alpha)
    s = torch.where((x_absmax <= 0) | (w_absmax <= 0), torch.ones_like(s), s)
    return s.clamp(min=_EPS).float()


def parse_alpha(alpha: float | str) -> float | None:
    """``alpha`` as a float in [0, 1], or None for ``"auto"``; a one-line error otherwise."""
    if isinstance(alpha, str):
        if alpha.strip().lower() == AUTO:
            return None
        try:
            alpha = float(alpha)
        except ValueError:
            raise ArgumentError(f"--alpha takes a number in [0, 1] or 'auto', not {alpha!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise ArgumentError(f"--alpha must be in [0, 1] (0.5 is SmoothQuant's default), not {alpha}")
    return float(alpha)


def _input_key(mapping: FeedMapping) -> str | None:
    """The calibration key of the targets' common input, or None when they have none (a linear source
    feeding several targets separately)."""
    keys = {input_key(mapping, t) for t in mapping.targets}
    return keys.pop() if len(keys) == 1 else None


class SmoothQuant(Method):
    name = "smoothquant"
    needs = ("absmax",)
    activation_method = "int8 activations (W8A8)"
    transforms_block = True
    default_scheme = "w8a8"

    def __init__(self, alpha: float | str = 0.5, mappings: str = "all") -> None:
        self.alpha = parse_alpha(alpha)
        if mappings not in MAPPING_SETS:
            raise ArgumentError(
                f"SmoothQuant mappings must be one of {', '.join(MAPPING_SETS)} (norms: the paper's), not {mappings!r}"
            )
        self.kinds = MAPPING_SETS[mappings]
        self.reports: list[SmoothReport] = []

    def quantize_linear(
        self, weight: torch.Tensor, codec: Codec, stats: dict[str, torch.Tensor] | None = None
    ) -> QuantizedTensor:
        return codec.quantize(weight)

    def transform_block(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        weights = {k: v.float() if v.is_floating_point() else v for k, v in ctx.weights.items()}
        for generic in ctx.arch.mappings:
            if generic.kind not in self.kinds:
                continue
            for mapping in expand_mapping(generic, weights):
                weights = self._smooth(ctx, weights, mapping)
        return {k: weights[k].to(v.dtype) if v.is_floating_point() else v for k, v in ctx.weights.items()}

    def _smooth(
        self, ctx: BlockContext, weights: dict[str, torch.Tensor], mapping: FeedMapping
    ) -> dict[str, torch.Tensor]:
        where = f"SmoothQuant block {ctx.index}: {mapping.source} -> {', '.join(mapping.targets)}"
        key = _input_key(mapping)
        stats = ctx.stats.get(key, {}) if key is not None else {}
        x_absmax = stats.get("absmax")
        if x_absmax is None or scaled_width(weights, mapping) is None:
            log.info("%s: no activation ranges or shapes that fold; not smoothed", where)
            return weights
        w_absmax = torch.cat([weights[f"{t}.weight"] for t in mapping.targets]).abs().amax(dim=0)
        alpha = self.alpha
        loss = base = float("nan")
        if alpha is None:
            alpha, loss, base = self._search(ctx, weights, mapping, key, x_absmax, w_absmax)
        s = smoothing_scales(x_absmax, w_absmax, alpha)
        self.reports.append(SmoothReport(ctx.index, mapping.source, alpha, loss, base))
        log.info("%s: alpha %.2f (output error %.4g, unsmoothed %.4g)", where, alpha, loss, base)
        return fold_scales(weights, mapping, s, ctx.arch.norm_offset)

    def _search(
        self,
        ctx: BlockContext,
        weights: dict[str, torch.Tensor],
        mapping: FeedMapping,
        key: str | None,
        x_absmax: torch.Tensor,
        w_absmax: torch.Tensor,
    ) -> tuple[float, float, float]:
        """The grid alpha with the least relative output error of the mapping's targets."""
        x = ctx.inputs.get(key) if key is not None else None
        if x is None:
            return 0.5, float("nan"), float("nan")
        x = x[:SEARCH_TOKENS].float()
        act = ctx.activations if isinstance(ctx.activations, ActQuant) else None
        if act is not None and not act.dynamic:  # a static scale: the search sample's own range
            act = ActQuant(act.kind, act.bits, ActStrategy.TENSOR, dynamic=True)
        act = act or ActQuant(ActKind.INT, 8, ActStrategy.TOKEN)
        w = torch.cat([weights[f"{t}.weight"] for t in mapping.targets]).float()
        ref = x @ w.t()
        norm = ref.pow(2).sum().item() or 1.0

        codec = ctx.codec_for(mapping.targets[0]) or ctx.codec

        def error(s: torch.Tensor) -> float:
            xq = act.fake_quantize(x / s[None, :])
            wq = codec.fake_quantize(w * s[None, :])
            return (xq @ wq.t() - ref).pow(2).sum().item() / norm

        base = error(torch.ones_like(x_absmax))
        losses = {a: error(smoothing_scales(x_absmax, w_absmax, a)) for a in ALPHA_GRID}
        best = min(losses, key=lambda a: losses[a])
        return best, losses[best], base

"""AWQ: activation-aware scaling of weight channels, then clipping, then round-to-nearest.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for
On-Device LLM Compression and Acceleration" (MLSys 2024), as AutoAWQ and llm-compressor run it.

Input channels that carry large activations matter most. Multiplying a linear's input column ``j`` by
``s_j > 1`` (and dividing the op that feeds it by ``s_j``, an exact fold: :mod:`lowbit.transforms.scaling`)
shrinks that weight's *relative* rounding error, at the cost of the other weights of its group. AWQ picks
``s`` per feeding op (a norm and the projections it feeds, or v_proj → o_proj, up_proj → down_proj)
from a one-parameter family by grid search:

1. ``x̄ = mean_t |x_t|`` per input channel, over the calibration tokens of the targets' input;
2. for α in ``{0, 1/n, …, (n-1)/n}``: ``s = x̄^α`` (``duo_scaling``: ``s = x̄^α / (w̄^(1-α) + 1e-4)``
   with ``w̄`` the mean over the targets' rows of ``|W|`` normalized by its quantization group's max),
   clamped at ``1e-4``, normalized by ``sqrt(max(s) · min(s))``; with ``duo_scaling`` the identity
   ``s = 1`` is also tried (llm-compressor does so; AutoAWQ does not);
3. the loss of a candidate is the output error of quantizing the targets with ``s`` folded in; the best
   ``s`` is folded into the block's weights before the next mapping is searched.

The loss (``AWQConfig.loss``):

* ``LossScope.LINEAR`` (default): ``Σ_t ‖X Wᵀ - (X/s) Q(W·s)ᵀ‖²`` over the mapping's quantized targets
  on the sampled input tokens, evaluated through the Gram matrix ``XᵀX`` (float64), so each candidate
  costs one quantization and ``out·in²`` multiply-adds per target, independent of the token count.
  Because the identity is a candidate, this loss is never above round-to-nearest's.
* ``LossScope.BLOCK``: the mean squared difference of the whole block's output (``ctx.run`` on the
  sampled windows) with only the mapping's targets quantized. This is what AutoAWQ / llm-compressor
  measure on the parent module (attention, MLP), one block run per candidate.

4. Clipping (AutoAWQ's ``auto_clip``; llm-compressor has none): for each quantized linear (AutoAWQ skips
   q/k, whose errors meet in ``QKᵀ``; lowbit clips them too by default, ``clip_skip`` restores AutoAWQ's
   choice: on SmolLM2-135M at W3 g64 clipping q/k takes WikiText-2 KLD from 1.31 to 1.02, RTN's 2.15),
   on the *scaled* inputs and weights, every
   quantization group (a row's group of columns; the codec's block when it spans rows) gets the bound
   ``max|w| · (1 - i/n_grid)``, ``i < max_shrink · n_grid``, that minimizes the group's share of the
   output error ``mean_t (x_g · (Q(clip(w)) - w)_g)²`` on ``clip_sample_tokens`` tokens; the weights are
   clamped to it. ``i = 0`` (no clipping) is a candidate.
5. The transformed weights are quantized by round-to-nearest (:meth:`AWQ.quantize_linear`).

Steps 1-4 run in :meth:`AWQ.transform_block`, which the calibration walk calls once per block with
sampled inputs of every linear (:class:`~lowbit.methods.base.BlockContext`).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lowbit.errors import ArgumentError, SchemeError
from lowbit.formats.affine import block_reduce, expand_blocks
from lowbit.formats.base import PER_CHANNEL, Block, Codec, QuantizedTensor
from lowbit.methods.base import BlockContext, Method
from lowbit.models.registry import FeedMapping
from lowbit.transforms.scaling import expand_mapping, fold_scales, input_key, scaled_width

log = logging.getLogger(__name__)


class LossScope(enum.Enum):
    """What the scale search measures (see the module docstring)."""

    LINEAR = "linear"
    BLOCK = "block"


@dataclass(frozen=True)
class AWQConfig:
    """AWQ's knobs; defaults are AutoAWQ's (``duo_scaling`` is also llm-compressor's default), except that
    q/k are clipped too (``clip_skip``).

    ``n_grid``: α candidates ``i / n_grid``, ``i < n_grid``.
    ``duo_scaling``: ``s = x̄^α / w̄^(1-α)`` instead of ``x̄^α`` (identity added to the grid).
    ``loss``: :class:`LossScope` of the scale search.
    ``max_tokens``: at most this many sampled input tokens per linear input in the scale search.
    ``clip``: run the clipping search after scaling; ``clip_n_grid``, ``clip_max_shrink``: bounds
    ``max|w| · (1 - i/clip_n_grid)`` for ``i < clip_max_shrink · clip_n_grid``;
    ``clip_sample_tokens``: tokens (evenly strided from the sample) the clipping error is measured on;
    ``clip_skip``: last name components of linears never clipped (AutoAWQ's: q_proj, k_proj, qkv_proj,
    query, key, Wqkv; lowbit's default: none, see the module docstring).
    """

    n_grid: int = 20
    duo_scaling: bool = True
    loss: LossScope = LossScope.LINEAR
    max_tokens: int = 8192
    clip: bool = True  # block types that search their own range (ggml's) are never clipped
    clip_n_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_sample_tokens: int = 512
    clip_skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n_grid < 1 or self.clip_n_grid < 1:
            raise SchemeError(
                f"AWQ grids need at least one point (n_grid={self.n_grid}, clip_n_grid={self.clip_n_grid})"
            )
        if not 0.0 <= self.clip_max_shrink < 1.0:
            raise SchemeError(f"AWQ clip_max_shrink must lie in [0, 1), not {self.clip_max_shrink}")
        if self.max_tokens < 1 or self.clip_sample_tokens < 1:
            raise SchemeError("AWQ token limits must be positive")


@dataclass(frozen=True)
class ScaleReport:
    """The scale search of one concrete mapping in block ``block``: the chosen ``alpha`` (``duo`` says
    which family), its ``loss`` and the loss of ``s = 1`` (round-to-nearest of the unscaled weights)."""

    block: int
    source: str
    targets: tuple[str, ...]
    alpha: float
    duo: bool
    loss: float
    identity_loss: float

    @property
    def ratio(self) -> float:
        """``loss / identity_loss`` (< 1: scaling helped)."""
        if self.identity_loss == 0.0:
            return 0.0 if self.loss == 0.0 else math.inf
        return self.loss / self.identity_loss


@dataclass(frozen=True)
class ClipReport:
    """The clipping search of one linear: mean shrink factor over its groups, output-error loss with
    and without the clipping (both on the scaled weights)."""

    block: int
    linear: str
    mean_factor: float
    loss: float
    unclipped_loss: float


# --------------------------------------------------------------------- helpers
def _codec(ctx: BlockContext, linear: str) -> Codec:
    """The codec of a linear AWQ quantizes (those kept in float are never measured)."""
    codec = ctx.codec_for(linear)
    assert codec is not None, f"{linear} is kept in float"
    return codec


def grouping(codec: Codec, shape: tuple[int, int]) -> Block:
    """The block of weights that share quantization parameters under ``codec`` (affine codecs say so;
    flat-block codecs such as NF4 count as row groups when their block size divides the row; anything
    else is treated per channel)."""
    block = getattr(codec, "block", None)
    if isinstance(block, Block):
        return block
    size = getattr(codec, "blocksize", None)
    if isinstance(size, int) and size > 0 and shape[1] % size == 0:
        return Block(1, size)
    return PER_CHANNEL


def normalized_weight_mean(weights: list[torch.Tensor], codecs: list[Codec]) -> torch.Tensor:
    """``w̄`` (in,): mean over all rows of ``weights`` (each (out_i, in)) of ``|W|`` divided by the max of
    its quantization group under its codec (+1e-6), as duo scaling uses it."""
    total = torch.zeros(weights[0].shape[1], dtype=torch.float64)
    rows = 0
    for w, codec in zip(weights, codecs, strict=True):
        a = w.float().abs()
        block = grouping(codec, (a.shape[0], a.shape[1]))
        gmax = expand_blocks(block_reduce(a, block, "amax"), block, (a.shape[0], a.shape[1]))
        total += (a / (gmax + 1e-6)).sum(0, dtype=torch.float64)
        rows += a.shape[0]
    return (total / rows).float()


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``s`` (in,) float32 for exponent ``alpha``: ``x̄^α`` or, with ``w_mean``, ``x̄^α / (w̄^(1-α) + 1e-4)``;
    clamped at 1e-4 and normalized by ``sqrt(max · min)``; non-finite entries set to 1."""
    s = x_mean.pow(alpha) if w_mean is None else x_mean.pow(alpha) / (w_mean.pow(1.0 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def _gram(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``XᵀX`` (in, in) float64 of ``x`` (tokens, in), and the token count."""
    x64 = x.double()
    return x64.T @ x64, x.shape[0]


def _output_loss(delta: torch.Tensor, gram: torch.Tensor, n: int) -> float:
    """``‖X Δᵀ‖² / n`` = ``tr(Δ XᵀX Δᵀ) / n`` for ``delta`` (out, in)."""
    d = delta.double()
    return float(((d @ gram) * d).sum()) / max(n, 1)


@dataclass
class _Search:
    """Per-block working state: current float weights (float32 copies) and current inputs."""

    weights: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    quantizable: set[str]
    grams: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)
    # Product of the scales each input has been divided by (the weights it feeds multiplied by).
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)

    def gram(self, key: str) -> tuple[torch.Tensor, int]:
        if key not in self.grams:
            self.grams[key] = _gram(self.inputs[key])
        return self.grams[key]

    def rescale_inputs(self, key: str, s: torch.Tensor) -> None:
        self.inputs[key] = self.inputs[key] / s[None, :]
        self.grams.pop(key, None)
        prev = self.input_scales.get(key)
        self.input_scales[key] = s.clone() if prev is None else prev * s

    def importance(self, key: str | None) -> torch.Tensor | None:
        """Mean ``x²`` per column of the (current, rescaled) sampled inputs ``key``: what a codec with
        an importance-weighted search (ggml's block types) weights each column's error by."""
        if key is None or key not in self.inputs:
            return None
        return self.inputs[key].pow(2).mean(dim=0)


def _input_key(mapping: FeedMapping, target: str, inputs: Mapping[str, torch.Tensor]) -> str | None:
    """The :attr:`BlockContext.inputs` key of ``target``'s input (:func:`input_key`), falling back to
    the linear's own name (e.g. MoE experts that see only their routed tokens); None if neither was
    captured."""
    key = input_key(mapping, target)
    if key in inputs:
        return key
    return target if target in inputs else None


# --------------------------------------------------------------------- the method
class AWQ(Method):
    """AWQ as a block-level :class:`~lowbit.methods.base.Method` (see the module docstring).

    After each :meth:`transform_block`, :attr:`reports` and :attr:`clip_reports` hold what was chosen.
    """

    name = "awq"
    needs = ("importance",)  # of each linear's inputs: ggml's searches weight the columns by it
    transforms_block = True

    def __init__(self, config: AWQConfig | None = None) -> None:
        self.config = config or AWQConfig()
        self.reports: list[ScaleReport] = []
        self.clip_reports: list[ClipReport] = []
        self._transformed = False

    def quantize_linear(
        self, weight: torch.Tensor, codec: Codec, stats: dict[str, torch.Tensor] | None = None
    ) -> QuantizedTensor:
        # The weights arrive scaled and clipped by transform_block: what is left is round-to-nearest,
        # guided (for codecs that search their parameters: ggml's block types) by the importance of the
        # scaled inputs, which transform_block put in the block's statistics. A caller that never ran
        # transform_block (a walk without calibration) would get plain RTN labelled "awq": refuse.
        if not self._transformed:
            raise ArgumentError(
                "AWQ scales and clips each block from calibration activations before rounding; run it "
                "through the calibration walk (pass calibration text), or use --method rtn"
            )
        return codec.quantize_weighted(weight, None if stats is None else stats.get("importance"))

    # ----------------------------------------------------------------- block transform
    def transform_block(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        """Scaled (and clipped) float weights for every name of ``ctx.weights``, in their own dtypes.

        An architecture whose registry entry lists no feeding-op mappings cannot be AWQ-scaled at all: a
        :class:`SchemeError`. Linears that no applicable mapping reaches (v -> o under grouped-query
        attention, a fused projection) are documented fallbacks: clipped and rounded, not scaled (logged).
        """
        if not ctx.arch.mappings:
            raise SchemeError(
                f"AWQ folds its scales into the op that feeds each linear, and the {ctx.arch.name} "
                "architecture lists no such mapping in the registry; use --method gptq or rtn"
            )
        self._transformed = True
        prefix = ctx.arch.block_prefix.format(i=ctx.index)
        quantizable = {
            n[: -len(".weight")]
            for n in ctx.weights
            if n.endswith(".weight")
            and ctx.arch.is_quantizable(prefix + n)
            and ctx.codec_for(n[: -len(".weight")]) is not None
        }
        state = _Search(
            weights={k: v.float() if v.is_floating_point() else v for k, v in ctx.weights.items()},
            inputs={k: v[: self.config.max_tokens].float() for k, v in ctx.inputs.items()},
            quantizable=quantizable,
        )
        reference = ctx.run(ctx.weights) if self.config.loss is LossScope.BLOCK else None
        scaled: set[str] = set()
        for generic in ctx.arch.mappings:
            for mapping in expand_mapping(generic, state.weights):
                if self._scale_mapping(ctx, state, mapping, reference):
                    scaled.update(mapping.targets)
        if quantizable - scaled:
            log.info(
                "AWQ block %d: no foldable mapping scales %s; clipped and rounded only",
                ctx.index,
                ", ".join(sorted(quantizable - scaled)),
            )
        # The inputs the quantized linears see are the scaled ones: so is their importance (mean x²).
        for k_in, scale in state.input_scales.items():
            imp = ctx.stats.get(k_in, {}).get("importance")
            if imp is not None:
                ctx.stats[k_in]["importance"] = imp / scale.to(imp.dtype).square()
        if self.config.clip:
            for lin in sorted(quantizable):
                if lin.rsplit(".", 1)[-1] in self.config.clip_skip:
                    continue
                codec = ctx.codec_for(lin)
                if codec is not None and codec.searches_range:
                    # ggml's block types search each block's range themselves: clipping first only
                    # takes values from that search (tiny256 Q4_K_M: KLD 0.0089 with, 0.0086 without)
                    continue
                key = lin if lin in state.inputs else None
                if key is None:  # a linear fed by a norm: its input is stored under the norm's name
                    key = next(
                        (
                            m.source
                            for m in ctx.arch.mappings
                            if m.kind == "norm" and lin in m.targets and m.source in state.inputs
                        ),
                        None,
                    )
                if key is None:
                    log.info("AWQ block %d: no calibration inputs for %s; not clipped", ctx.index, lin)
                    continue
                self._clip_linear(ctx, state, lin, key)
        return {
            k: state.weights[k].to(v.dtype) if v.is_floating_point() else v for k, v in ctx.weights.items()
        }

    def _scale_mapping(
        self,
        ctx: BlockContext,
        state: _Search,
        mapping: FeedMapping,
        reference: torch.Tensor | None,
    ) -> bool:
        """Search and fold ``mapping``'s scales; False when it could not be searched (nothing folded)."""
        cfg = self.config
        where = f"AWQ block {ctx.index}: {mapping.source} -> {', '.join(mapping.targets)}"
        if scaled_width(state.weights, mapping) is None:
            log.info("%s: shapes do not allow a fold (e.g. grouped-query v -> o); skipped", where)
            return False
        keys = {t: _input_key(mapping, t, state.inputs) for t in mapping.targets}
        measured = [t for t in mapping.targets if t in state.quantizable and keys[t] is not None]
        if not measured:
            log.info("%s: no calibration inputs reach a quantized target; skipped", where)
            return False
        distinct = sorted({k for k in keys.values() if k is not None})
        x_mean = torch.cat([state.inputs[k] for k in distinct]).abs().mean(0)  # (in,)
        w_mean = (
            normalized_weight_mean(
                [state.weights[f"{t}.weight"] for t in measured], [_codec(ctx, t) for t in measured]
            )
            if cfg.duo_scaling
            else None
        )
        grid: list[tuple[float, bool]] = [(i / cfg.n_grid, cfg.duo_scaling) for i in range(cfg.n_grid)]
        if cfg.duo_scaling:
            grid.insert(0, (0.0, False))  # the identity, so that scaling never loses to plain RTN

        def loss_of(s: torch.Tensor) -> float:
            if reference is not None:
                cand = fold_scales(state.weights, mapping, s, ctx.arch.norm_offset)
                for t in measured:
                    imp = state.importance(keys[t])
                    cand[f"{t}.weight"] = _codec(ctx, t).fake_quantize(
                        cand[f"{t}.weight"], None if imp is None else imp / s.square()
                    )
                return float((ctx.run(cand) - reference).double().pow(2).mean())
            total = 0.0
            for t in measured:
                w = state.weights[f"{t}.weight"]  # (out, in)
                key = keys[t]
                assert key is not None
                gram, n = state.gram(key)
                imp = state.importance(key)
                imp = None if imp is None else imp / s.square()
                delta = w - _codec(ctx, t).fake_quantize(w * s[None, :], imp).float() / s[None, :]
                total += _output_loss(delta, gram, n)
            return total

        best: tuple[float, float, bool, torch.Tensor] | None = None
        identity_loss = math.nan
        for alpha, duo in grid:
            s = candidate_scales(x_mean, w_mean if duo else None, alpha)
            loss = loss_of(s)
            if alpha == 0.0 and not duo:
                identity_loss = loss
            if math.isfinite(loss) and (best is None or loss < best[0]):
                best = (loss, alpha, duo, s)
        if best is None:
            log.warning("%s: every candidate gave a non-finite loss; left unscaled", where)
            return False
        loss, alpha, duo, s = best
        report = ScaleReport(ctx.index, mapping.source, mapping.targets, alpha, duo, loss, identity_loss)
        self.reports.append(report)
        log.info(
            "%s: alpha %.2f%s, loss %.4g vs %.4g unscaled (ratio %.3f)",
            where,
            alpha,
            " (duo)" if duo else "",
            loss,
            identity_loss,
            report.ratio,
        )
        state.weights = fold_scales(state.weights, mapping, s, ctx.arch.norm_offset)
        for k in distinct:
            state.rescale_inputs(k, s)
        return True

    def _clip_linear(self, ctx: BlockContext, state: _Search, lin: str, key: str) -> None:
        cfg = self.config
        w = state.weights[f"{lin}.weight"]  # (out, in) float32
        out_f, in_f = w.shape
        x = state.inputs[key]
        x = x[:: max(1, x.shape[0] // cfg.clip_sample_tokens)][: cfg.clip_sample_tokens]  # (T, in)
        codec = _codec(ctx, lin)
        imp = state.importance(key)
        block = grouping(codec, (out_f, in_f))
        r, c = block.resolve((out_f, in_f))
        n_groups = math.ceil(in_f / c)
        xg = F.pad(x, (0, n_groups * c - in_f)).reshape(x.shape[0], n_groups, c)  # (T, G, c)
        org_max = block_reduce(w.abs(), block, "amax")  # (R, G') unit grid
        best_err = torch.full_like(org_max, math.inf)
        best_factor = torch.ones_like(org_max)
        unclipped = 0.0
        chunk = max(1, (1 << 24) // max(1, x.shape[0] * n_groups))
        for i in range(max(1, int(cfg.clip_max_shrink * cfg.clip_n_grid))):
            factor = 1.0 - i / cfg.clip_n_grid
            bound = expand_blocks(org_max * factor, block, (out_f, in_f))  # (out, in)
            cur = torch.minimum(torch.maximum(w, -bound), bound)
            d = codec.fake_quantize(cur, imp).float() - w  # (out, in)
            dg = F.pad(d, (0, n_groups * c - in_f)).reshape(out_f, n_groups, c)  # (out, G, c)
            err = torch.empty(out_f, n_groups)
            for o in range(0, out_f, chunk):
                e = torch.einsum("tgc,ogc->ogt", xg, dg[o : o + chunk])  # (rows, G, T)
                err[o : o + chunk] = e.pow(2).mean(-1)
            unit_err = _sum_units(err, r)  # (R, G), the shape of org_max
            if i == 0:
                unclipped = float(unit_err.sum())
            better = unit_err < best_err
            best_err = torch.where(better, unit_err, best_err)
            best_factor = torch.where(better, torch.full_like(best_factor, factor), best_factor)
        bound = expand_blocks(org_max * best_factor, block, (out_f, in_f))
        state.weights[f"{lin}.weight"] = torch.minimum(torch.maximum(w, -bound), bound)
        report = ClipReport(ctx.index, lin, float(best_factor.mean()), float(best_err.sum()), unclipped)
        self.clip_reports.append(report)
        log.info(
            "AWQ block %d: clip %s, mean bound factor %.3f, group loss %.4g vs %.4g unclipped",
            ctx.index,
            lin,
            report.mean_factor,
            report.loss,
            report.unclipped_loss,
        )


def _sum_units(err: torch.Tensor, r: int) -> torch.Tensor:
    """Per-(row, column group) errors ``err`` (out, G) summed over each block of ``r`` rows -> the codec's
    block grid (ceil(out / r), G) (a ragged last row block sums fewer rows)."""
    out_f, n_groups = err.shape
    units = math.ceil(out_f / r)
    return F.pad(err, (0, 0, 0, units * r - out_f)).reshape(units, r, n_groups).sum(1)

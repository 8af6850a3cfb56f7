"""Block-output refinement: move a quantized block's codes between neighbouring levels so that the
block's output on the quantized model's inputs matches the original model's output.

GPTQ (and round-to-nearest) choose each linear's codes from that linear's own reconstruction error on
the inputs it sees in the quantized model. What the model needs is the block's *output* to follow the
original model's: ``Q_block(x_q) ≈ F_block(x_f)``, where ``x_q`` are the block's inputs in the quantized
model (errors of the blocks before included) and ``x_f`` those of the original model. That loss sees
what the per-linear one cannot: the attention softmax and the MLP's gate between the linears, and the
error the earlier blocks handed down. This is AutoRound's objective (Cheng et al., "Optimize Weight
Rounding via Signed Gradient Descent for the Quantization of LLMs", 2023/24), here started from
GPTQ's codes instead of round-to-nearest and moving codes only, under the codec's fixed parameters, so
that the result is exactly representable in any :class:`~lowbit.formats.base.RegionCodec` (ggml's
block types included: their scales stay llama-quantize's search's, only the codes move).

The variables: per weight a continuous position ``u`` in level units; the weight used in the forward
pass is ``scale * level(u) - offset`` with ``level(u)`` the nearest level to ``u`` (the straight-through
estimator passes the gradient to ``u``). ``u`` starts where the original weight lies on the grid,
``(w + offset) / scale``, when that lies in the bin of the code the base method chose (round-to-nearest's
code: where AutoRound starts, a weight close to the edge of its bin flips easily); a code the base
method moved elsewhere (GPTQ's error feedback) starts at its level, the middle of its bin (started at
the edge nearest the original weight, the first steps would undo GPTQ's compensation: measured on
tiny256 Q3_K, the block's output error then only grew). Signed gradient descent,
``u ← u - lr · sign(∂loss/∂u)`` with ``lr`` decaying linearly to 0 over ``iters`` steps, each step on
``batch`` random calibration windows, the loss ``mean ‖Q_block(x_q) - F_block(x_f)‖²``. Every
``check_every`` steps (and before the first) the loss is measured on a fixed set of ``batch`` windows
and the codes with the lowest such loss are kept, the base method's included: refinement never
returns codes worse on that set than it was given. With ``iters = 0`` nothing changes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from lowbit.errors import SchemeError
from lowbit.formats.base import Codec, ElementGrid, QuantizedTensor, RegionCodec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineConfig:
    """``iters``: signed-gradient steps per block (0: off); ``lr``: the first step, in levels (default
    ``1.5 / iters``: the steps add up to at most 0.75 of a level, so a code moves to a neighbour at
    most); ``batch``: calibration windows per step; ``seed``: of the window sampling."""

    iters: int = 0
    lr: float | None = None
    batch: int = 8
    seed: int = 0
    check_every: int = 10

    def __post_init__(self) -> None:
        if self.iters < 0 or self.batch < 1 or self.check_every < 1:
            raise SchemeError(
                f"refinement needs iters >= 0, batch >= 1 and check_every >= 1, not {self.iters}, "
                f"{self.batch}, {self.check_every}"
            )
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise SchemeError(f"refinement lr must be positive, not {self.lr}")

    @property
    def first_lr(self) -> float:
        return self.lr if self.lr is not None else 1.5 / max(self.iters, 1)


@dataclass(frozen=True)
class RefineReport:
    """One block: the loss of the codes it started from and of those it kept (mean squared output
    difference on the step's windows), the step they come from, and the fraction of codes moved."""

    block: int
    initial_loss: float
    best_loss: float
    best_step: int
    moved: float


class _Variable:
    """One linear's grid and its continuous code positions ``u`` (out, in), leaf of autograd."""

    def __init__(self, grid: ElementGrid, weight: torch.Tensor) -> None:
        self.grid = grid
        lv = grid.levels
        self.uniform = bool(lv.numel() > 1 and torch.all(lv[1:] - lv[:-1] == 1))
        self.mids = (lv[1:] + lv[:-1]) / 2
        chosen = lv[grid.codes]  # (out, in) level values
        # the bin of each chosen level: halfway to its neighbours (the end levels' bins are open)
        lo = torch.cat([lv[:1] - 1e4, self.mids])[grid.codes]
        hi = torch.cat([self.mids, lv[-1:] + 1e4])[grid.codes]
        with torch.no_grad():
            t = (weight.float() + grid.offset) / grid.scale  # where the original weight lies
            t = torch.where(torch.isfinite(t), t, chosen)  # a zero scale: every level is the same
            # a code the base method moved away from the original weight's bin starts at its level:
            # put at its bin's edge, the first steps would undo the base method's compensation
            inside = (t >= lo) & (t <= hi)
            u0 = torch.where(inside, t, chosen)
        self.u = u0.requires_grad_(True)

    def level(self, u: torch.Tensor) -> torch.Tensor:
        """Nearest level value of ``u``, as a float tensor (no gradient)."""
        lv = self.grid.levels
        if self.uniform:
            return torch.round(u).clamp(float(lv[0]), float(lv[-1]))
        return lv[torch.bucketize(u, self.mids)]

    def weight(self) -> torch.Tensor:
        """``scale * level(u) - offset`` with a straight-through gradient to ``u``."""
        u = self.u
        ste = u + (self.level(u.detach()) - u).detach()
        return self.grid.scale * ste - self.grid.offset

    def codes(self) -> torch.Tensor:
        """Indices of the current levels (out, in) int64."""
        lv = self.grid.levels
        v = self.level(self.u.detach())
        if self.uniform:
            return (v - lv[0]).long()
        return torch.bucketize(self.u.detach(), self.mids)


def refine_block(
    index: int,
    weights: Mapping[str, torch.Tensor],
    quantized: Mapping[str, tuple[Codec, QuantizedTensor]],
    forward: Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: RefineConfig,
) -> tuple[dict[str, QuantizedTensor], RefineReport]:
    """Refine the codes of one block's quantized linears.

    ``weights``: the float weights the quantized ones stand for, by block-relative name;
    ``quantized``: block-relative weight name (``"mlp.down_proj.weight"``) -> (its region codec, its
    quantized result); ``forward(weights, x)``: the block's output ``(b, T, hidden)`` for inputs ``x``
    with those weights substituted (the others as they are), differentiable in them; ``inputs``:
    ``(N, T, hidden)`` the block's inputs in the quantized model; ``targets``: ``(N, T, hidden)`` the
    original block's outputs on the original model's inputs. Returns the new quantized results (the
    same parameters, new codes) and a report.
    """
    vars_: dict[str, _Variable] = {}
    codecs: dict[str, RegionCodec] = {}
    for name, (codec, q) in quantized.items():
        if not isinstance(codec, RegionCodec):
            raise SchemeError(
                f"block-output refinement moves codes between levels, which {codec.name} has not"
            )
        codecs[name] = codec
        vars_[name] = _Variable(codec.element_grid(q), weights[name])
    n = inputs.shape[0]
    gen = torch.Generator().manual_seed(config.seed + index)
    lr0 = config.first_lr
    params = [v.u for v in vars_.values()]
    check = torch.arange(min(config.batch, n))  # the fixed windows the kept codes are chosen on

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        w = {name: v.weight() for name, v in vars_.items()}
        out = forward(w, inputs[idx].float())
        return (out.float() - targets[idx].float()).pow(2).mean()

    def checked() -> float:
        with torch.no_grad():
            return float(loss_on(check))

    best_codes = {name: v.grid.codes.clone() for name, v in vars_.items()}
    initial = best_loss = checked() if config.iters else math.nan
    best_step = 0
    for step in range(config.iters):
        idx = torch.randperm(n, generator=gen)[: min(config.batch, n)]
        grads = torch.autograd.grad(loss_on(idx), params)
        lr = lr0 * (1.0 - step / config.iters)
        with torch.no_grad():
            for u, g in zip(params, grads, strict=True):
                u.sub_(lr * torch.sign(g))
        if (step + 1) % config.check_every == 0 or step + 1 == config.iters:
            value = checked()
            log.debug("refine block %d step %d: loss %.5g", index, step + 1, value)
            if value < best_loss:
                best_loss, best_step = value, step + 1
                best_codes = {name: v.codes() for name, v in vars_.items()}
    moved = sum(int((best_codes[k] != v.grid.codes).sum()) for k, v in vars_.items())
    total = sum(v.grid.codes.numel() for v in vars_.values())
    out = {name: codecs[name].with_codes(q, best_codes[name]) for name, (_, q) in quantized.items()}
    report = RefineReport(index, initial, best_loss, best_step, moved / max(total, 1))
    log.info(
        "refine block %d: output loss %.4g -> %.4g (step %d of %d), %.2f%% of codes moved",
        index,
        initial,
        best_loss,
        best_step,
        config.iters,
        100 * report.moved,
    )
    return out, report

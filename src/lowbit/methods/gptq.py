"""GPTQ: quantize a linear layer column by column, folding each column's error into the columns not yet
quantized so that the layer's *output* error ``Σ_t ‖(W - Q) x_t‖²`` stays small.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023), Algorithm 1. With ``H = (2/N) Σ_t x_t x_tᵀ`` (see
:mod:`lowbit.calib.hessian`) the loss of a weight matrix is ``tr((W - Q) H (W - Q)ᵀ)`` (up to ``N/2``).
Quantizing column ``j`` to ``q`` and updating the remaining columns by ``-(w_j - q) / U_jj · U_j,j:``,
where ``U`` is the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``), is the optimal (OBS) compensation.

What this implementation does, step by step (``W`` (out, in), ``H`` (in, in)):

1. ``diag_blend`` β (default 0.25; 0 is the paper's GPTQ): ``H ← (1-β) H + β diag(H)``, see
   "Robustness to the calibration domain" below;
2. dead inputs (``H_ii == 0``: the channel was always zero during calibration) get ``H_ii = 1`` and
   ``W[:, i] = 0``: their weights never reach the output, and zeroing them keeps them out of the ranges;
3. act-order (``desc_act``): columns are processed by descending ``H_ii`` (the largest inputs first,
   while the most columns are left to absorb their error);
4. damping: ``H + λ mean(diag H) I`` with ``λ = damp``; if a Cholesky factorization fails (``H`` not
   positive definite: too few tokens, or a corrupt statistic), ``λ`` is multiplied by ``damp_growth`` and
   retried up to ``max_damp_retries`` times; after that the layer falls back to ``diag(H)``, which makes
   GPTQ round-to-nearest, with a warning. The factorizations run in float64, the column loop in float32;
5. the column loop in blocks of ``block_size`` columns with lazy batch updates of the columns after the
   block (the result does not depend on ``block_size`` beyond float rounding);
6. quantization parameters (the codec's :meth:`~lowbit.formats.affine.AffineCodec.choose_qparams`):
   per-channel / per-tensor codecs: once, from the (dead-zeroed) weights; groups of ``g`` columns: when
   the loop enters a group, from the *current, error-updated* weights of the group's columns (exactly
   current: where the group reaches past the current block, the block's pending updates are applied to
   those columns first; the reference applies them only at block ends, so it chooses groups that start
   inside a block from slightly stale weights); with ``static_groups``: for every group up front, from the
   un-permuted weights before any update. A width that ``g`` does not divide gets a shorter last group.

Robustness to the calibration domain (why ``diag_blend`` defaults to 0.25). GPTQ puts its error where
the calibration inputs have little energy: into the directions of small eigenvalues of ``H``. A narrow
calibration text (TinyStories) gives Hessians of lower effective rank than the text the model is then
used on (SmolLM2-135M, 128 x 512 tokens: effective rank of the down_proj inputs 162-232 on TinyStories vs
273-363 on WikiText-2), and WikiText-2 puts 2-3x more of its input energy into TinyStories' weakest 90%
of eigen-directions (0.51-0.66 of its energy vs 0.18-0.30). Plain GPTQ calibrated on TinyStories is
3-5x better than round-to-nearest on TinyStories' own Hessians but worse than it on WikiText-2's for
the MLP down projections (up to 1.64x on the one with massive activations, layer 28), and its WikiText-2
KL-divergence is no better than RTN's. The per-channel energies ``diag(H)`` are a property of the model
more than of the text (their logs correlate at 0.86-0.997 between the two texts for the attention and
gate/up inputs), while the correlations between channels are not (relative distance of the two
correlation matrices 0.7-2.1). So the Hessian GPTQ minimizes is a mixture: with weight 1-β the
calibration inputs, with weight β inputs that have the same per-channel energies and no correlations
(for which GPTQ is round-to-nearest). Measured on SmolLM2 (WikiText-2 KLD; RTN 0.413 at W4 g64,
2.151 at W3 g64): β = 0.25 gives 0.196 in-domain and 0.316 calibrated on TinyStories at W4 g64 (β = 0:
0.361 and 0.413), 0.754 and 1.550 at W3 g64. The same β helps in-domain because the calibration sample is
itself a narrow view of its own domain. Stronger identity damping (``damp`` 0.1, 0.3) helps
out-of-domain less (0.399, 0.368 at W4 g64) because ``mean(diag H)`` is dominated by the massive-
activation channels and over-damps every other channel. A held-out split of the calibration text does
not detect the shift (on TinyStories' own Hessians GPTQ keeps winning), so no per-layer check against
RTN on calibration data is used.

With act-order and dynamic groups, group ``k`` is the ``k``-th run of ``g`` columns *in processing
order*: its columns are scattered in the original order. Checkpoints that support act-order (GPTQ
``desc_act``, compressed-tensors ``actorder="group"``) store this as ``g_idx``: the group of each input
column. :class:`GPTQQuantized` carries ``g_idx`` and the group-ordered parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lowbit.errors import ArgumentError, NonFiniteWeightError, SchemeError, ShapeError
from lowbit.formats.affine import GroupIndexedQuantized
from lowbit.formats.base import Codec, ColumnQuantizer, QuantizedTensor, RegionCodec
from lowbit.methods.base import Method

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's knobs. The defaults are the paper's / reference implementation's, except two:
    act-order with static groups (llm-compressor's default ``actorder="static"``) and ``diag_blend``.

    ``damp``: damping as a fraction of the mean diagonal of ``H``.
    ``block_size``: columns per lazy-batch block (speed only; results equal up to float rounding).
    ``act_order``: process columns by descending ``diag(H)`` (``desc_act``). On by default: SmolLM2-135M,
    WikiText-2 KLD at W4 g64 0.156 with it, 0.196 without; at W3 g64 0.646 vs 0.754 (``bench/gptq_awq.py``).
    ``static_groups``: choose every group's parameters up front from the original weights (contiguous
    groups even with act-order: no ``g_idx`` needed at inference, so every format holds the result; on by
    default). Off with act-order: "dynamic" groups, a ``g_idx`` only the GPTQ format stores.
    ``max_damp_retries``, ``damp_growth``: on a failed Cholesky, retry with ``damp *= damp_growth``.
    ``diag_blend``: β in ``H ← (1-β) H + β diag(H)``; 0 is the paper's GPTQ, 1 is round-to-nearest;
    the default 0.25 is chosen by the evidence in the module docstring.
    ``asymmetric``: quantize the weight whose outputs on the quantized model's inputs best match the
    original model's outputs, ``W + W D (H + λI)⁻¹`` with ``D`` the statistic of the inputs' error
    against the original model's (GPTAQ's asymmetric calibration: the error of the layers before is corrected too;
    the walk then also runs the original model).
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    max_damp_retries: int = 3
    damp_growth: float = 10.0
    diag_blend: float = 0.25
    asymmetric: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.damp) and self.damp >= 0):
            raise SchemeError(f"GPTQ damp must be a non-negative fraction of mean(diag H), not {self.damp}")
        if self.block_size < 1:
            raise SchemeError(f"GPTQ block_size must be positive, not {self.block_size}")
        if self.max_damp_retries < 0:
            raise SchemeError(f"GPTQ max_damp_retries must be >= 0, not {self.max_damp_retries}")
        if not (math.isfinite(self.damp_growth) and self.damp_growth > 1):
            raise SchemeError(f"GPTQ damp_growth must be > 1, not {self.damp_growth}")
        if not 0.0 <= self.diag_blend <= 1.0:
            raise SchemeError(f"GPTQ diag_blend must lie in [0, 1], not {self.diag_blend}")


@dataclass(frozen=True)
class GPTQReport:
    """What happened to one layer.

    ``loss`` / ``rtn_loss``: ``tr((W - Q) H (W - Q)ᵀ)`` with the ``H`` given (before blending and damping)
    for GPTQ's result and for round-to-nearest with the same codec. ``damp``: the damping fraction that
    factorized; ``retries``: failed factorizations before it; ``diagonal_fallback``: every retry failed
    and the layer was quantized with ``diag(H)`` (= round-to-nearest).
    """

    loss: float
    rtn_loss: float
    damp: float
    retries: int
    diagonal_fallback: bool

    @property
    def ratio(self) -> float:
        """``loss / rtn_loss`` (< 1: GPTQ helped); 0 when both are 0."""
        if self.rtn_loss == 0.0:
            return 0.0 if self.loss == 0.0 else math.inf
        return self.loss / self.rtn_loss


@dataclass(frozen=True)
class GPTQQuantized(GroupIndexedQuantized):
    """An affine GPTQ result: :class:`~lowbit.formats.affine.GroupIndexedQuantized` (codes in the
    original column order, ``g_idx`` and the group-ordered parameters act-order produces) plus
    ``perm`` (in,) int64, the order in which columns were quantized (act-order), else ``None``, and the
    layer's :class:`GPTQReport`. Results of other region codecs (ggml block types) are the codec's own
    quantized type."""

    perm: torch.Tensor | None
    report: GPTQReport


# --------------------------------------------------------------------- linear algebra
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """GPTQ runs on one thread: the column loop is thousands of small ops and the factorizations are
    of (in, in) matrices, where intra-op threads only add synchronisation (measured on 2 busy cores:
    the loop 10-30x and ``cholesky_inverse`` of 1536² 50x slower with 2 threads than with 1)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def hessian_loss(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ)`` for ``Δ`` (out, in) and ``H`` (in, in), in float64: ``(2/N) Σ_t ‖Δ x_t‖²``."""
    d = delta.to(torch.float64)
    return float(((d @ hessian.to(torch.float64)) * d).sum())


def _inverse_cholesky(h: torch.Tensor, config: GPTQConfig) -> tuple[torch.Tensor, float, int, bool]:
    """Upper ``U`` with ``(H + λ mean(diag H) I)⁻¹ = UᵀU`` for ``h`` (in, in) float64, retrying with more
    damping when ``H + λ·I`` is not positive definite. Returns ``(U, λ, retries, diagonal_fallback)``."""
    mean_diag = float(h.diagonal().mean())
    base = mean_diag if math.isfinite(mean_diag) and mean_diag > 0 else 1.0
    lam = config.damp
    for attempt in range(config.max_damp_retries + 1):
        hd = h.clone()
        hd.diagonal().add_(lam * base)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                if attempt:
                    log.warning("GPTQ: Hessian factorized after %d retries with damp %.3g", attempt, lam)
                return u, lam, attempt, False
        log.warning(
            "GPTQ: Hessian + %.3g·mean(diag) is not positive definite (attempt %d of %d); more damping",
            lam,
            attempt + 1,
            config.max_damp_retries + 1,
        )
        lam = lam * config.damp_growth if lam > 0 else 0.01
    # Every factorization failed: keep only the diagonal. No column then updates another, so the
    # result is round-to-nearest (in the processing order's groups), which is always well defined.
    log.warning(
        "GPTQ: the Hessian could not be factorized with up to %.3g damping; this layer falls back to "
        "round-to-nearest (check the calibration statistics)",
        lam / config.damp_growth,
    )
    d = h.diagonal().abs()
    d = torch.where(d > 0, d, torch.ones_like(d)) + lam / config.damp_growth * base
    return torch.diag(d.rsqrt()), lam / config.damp_growth, config.max_damp_retries + 1, True


# --------------------------------------------------------------------- the algorithm
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codec: RegionCodec,
    config: GPTQConfig | None = None,
    importance: torch.Tensor | None = None,
    input_error: torch.Tensor | None = None,
) -> QuantizedTensor:
    """GPTQ-quantize ``weight`` (out, in), any float dtype, given ``hessian`` (in, in) (see
    :class:`lowbit.calib.hessian.HessianAccumulator`), with a codec whose parameters are shared by runs
    of input columns (:class:`~lowbit.formats.base.RegionCodec`: integer groups, ggml block types).

    ``importance`` (in,): what codecs with a parameter search weight each column's error by when they
    fit a region (ggml's importance matrix); default the Hessian's diagonal, which is llama-imatrix's
    statistic of the same inputs (mean ``x²`` per column) up to a factor. ``input_error`` (in, in): how the
    inputs differ from the original model's, ``[D, H]`` (2, in, in) on the same tokens
    (:class:`~lowbit.calib.hessian.InputErrorAccumulator`): GPTQ then quantizes ``W + W D (H + λI)⁻¹``
    (:func:`corrected_target`). An affine codec returns a
    :class:`GPTQQuantized`."""
    with _one_thread():
        if input_error is not None:
            weight = corrected_target(weight, input_error, (config or GPTQConfig()).damp)
        return _gptq_quantize(weight, hessian, codec, config or GPTQConfig(), importance)


def corrected_target(weight: torch.Tensor, input_error: torch.Tensor, damp: float) -> torch.Tensor:
    """``W + W D (H + λI)⁻¹`` (out, in) float32, ``λ = damp · mean(diag H)``, from ``input_error`` =
    ``[D, H]`` (2, in, in) of the same tokens (:class:`~lowbit.calib.hessian.InputErrorAccumulator`):
    the weight whose outputs on the quantized model's inputs best match ``W``'s on the original inputs,
    ridge-regularized towards ``W`` itself: ``argmin ‖W* X - W X̂‖² + λ‖W* - W‖²``, whose normal equations
    are ``W* (H + λI) = W (H + D + λI)``. It is ``W`` exactly when the inputs carry no error
    (regularizing towards 0 instead, ``W (H + D)(H + λI)⁻¹``, shrinks every weak direction of ``H``:
    measured on tiny256 Q4_K_M with λ = 0.05, KLD 4x worse). Dead inputs (zero diagonal) keep their
    weight."""
    in_f = weight.shape[1]
    if tuple(input_error.shape) != (2, in_f, in_f):
        raise ShapeError(
            f"input-error statistics of shape {tuple(input_error.shape)} do not fit a weight {tuple(weight.shape)}"
        )
    d = input_error[0].detach().to(torch.float64)
    h = input_error[1].detach().to(torch.float64)
    if not (torch.isfinite(h).all() and torch.isfinite(d).all()):
        raise ArgumentError("calibration statistics hold NaN or Inf values; recompute them")
    h = (h + h.T) / 2
    mean_diag = float(h.diagonal().mean())
    lam = max(damp, 1e-6) * (mean_diag if mean_diag > 0 else 1.0)
    hd = h.clone()
    hd.diagonal().add_(lam)
    w = weight.detach().to(torch.float64)
    # Hd (W* - W)ᵀ = (W D)ᵀ, Hd symmetric positive definite
    chol, info = torch.linalg.cholesky_ex(hd)
    rhs = (w @ d).T
    delta = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.lstsq(hd, rhs).solution
    target = w + delta.T
    dead = h.diagonal() == 0
    target[:, dead] = w[:, dead]
    if not torch.isfinite(target).all():
        raise ArgumentError("the corrected GPTQ target is not finite; use more damping (--damp)")
    log.debug(
        "asymmetric GPTQ target: |W* - W| / |W| = %.3g",
        float((target - w).norm() / w.norm().clamp(min=1e-30)),
    )
    return target.float()


def _gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codec: RegionCodec,
    config: GPTQConfig,
    importance: torch.Tensor | None,
) -> QuantizedTensor:
    if not isinstance(codec, RegionCodec):
        raise SchemeError(
            f"GPTQ needs a codec with per-group parameters (integers, ggml block types), not {codec.name}"
        )
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ShapeError(f"GPTQ quantizes 2-D float linear weights, not {weight.dtype} {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if tuple(hessian.shape) != (in_f, in_f):
        raise ShapeError(
            f"Hessian of shape {tuple(hessian.shape)} does not fit a weight {tuple(weight.shape)}"
        )
    w_orig = weight.detach().float()
    if not torch.isfinite(w_orig).all():
        raise NonFiniteWeightError("weight holds NaN or Inf values; fix or exclude the tensor")
    h_orig = hessian.detach().to(torch.float64)
    if not torch.isfinite(h_orig).all():
        raise ArgumentError("the Hessian holds NaN or Inf values; recompute the calibration statistics")
    region = codec.region_width((out_f, in_f))  # columns sharing parameters (= in_f per channel)
    static = config.static_groups or region >= in_f
    if config.act_order and not static and codec.contiguous_regions_only:
        raise SchemeError(
            f"{codec.name} keeps its parameters per run of {region} consecutive columns, so GPTQ's "
            "act-order needs static groups with it (--act-order static or none, not group)"
        )
    if importance is None:
        imp = h_orig.diagonal().float().clamp(min=0.0)
    else:
        imp = importance.detach().float().reshape(-1)
        if imp.shape != (in_f,) or not torch.isfinite(imp).all():
            raise ArgumentError(f"the importance vector must be {in_f} finite values, not {tuple(imp.shape)}")

    h = (h_orig + h_orig.T) / 2  # (in, in); x.T @ x is not always bitwise symmetric
    if config.diag_blend:
        h = (1.0 - config.diag_blend) * h + config.diag_blend * torch.diag(h.diagonal())
    w = w_orig.clone()  # (out, in) float32
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    if config.act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)  # (in,)
        w_p = w[:, perm]
        h_p = h[perm][:, perm]
    else:
        perm = torch.arange(in_f)
        w_p, h_p = w, h

    u64, damp, retries, fallback = _inverse_cholesky(h_p, config)
    u = u64.float()  # (in, in) upper triangular

    # Static: every region's parameters up front, from the un-permuted (dead-zeroed) weights; column
    # perm[j] is column perm[j] of that one run. Dynamic: a region's parameters when the loop enters it,
    # from the current, error-updated weights of its columns (in processing order).
    regions: list[ColumnQuantizer] = [codec.fit_region(w, 0, imp)] if static else []
    imp_p = imp[perm]
    perm_list = perm.tolist()

    # The loop works on the transpose: column j of W is row j of wt, contiguous, so the per-column
    # update of the block's remaining columns is one in-place rank-1 update of contiguous rows.
    wt = w_p.T.contiguous()  # (in, out): row j = processed column j
    codes_t = torch.empty(in_f, out_f, dtype=torch.int16)  # in processing order
    run = regions[0] if static else None
    for i1 in range(0, in_f, config.block_size):
        i2 = min(i1 + config.block_size, in_f)
        err1 = torch.zeros(i2 - i1, out_f)  # (B, out) scaled errors, for the lazy update
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % region == 0:
                end = min(j + region, in_f)
                cur = wt[j : min(end, i2)]
                if end > i2:  # the region reaches past this block: apply the block's pending updates
                    ahead = wt[i2:end] - u[i1:j, i2:end].T @ err1[:i]
                    cur = torch.cat([cur, ahead])
                run = codec.fit_region(cur.T, j, imp_p[j:end])
                regions.append(run)
            assert run is not None
            col = wt[j]  # (out,)
            codes_t[j], deq = run.quantize_column(col, perm_list[j] if static else j - run.start)
            e = err1[i]
            torch.sub(col, deq, out=e)
            e.div_(u[j, j])
            if i + 1 < i2 - i1:  # wt[j+1:i2] -= u[j, j+1:i2]ᵀ ⊗ e
                wt[j + 1 : i2].addr_(u[j, j + 1 : i2], e, alpha=-1.0)
        if i2 < in_f:
            wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)
    codes_p = codes_t.T

    if static:
        q = codec.pack_regions((out_f, in_f), codes_p[:, torch.argsort(perm)], regions)
    else:
        q = codec.pack_regions((out_f, in_f), codes_p, regions, perm if config.act_order else None)

    q_hat = codec.dequantize(q).reshape(out_f, in_f)
    loss = hessian_loss(w_orig - q_hat, h_orig)
    rtn_loss = hessian_loss(w_orig - codec.dequantize(codec.quantize_weighted(w_orig, imp)), h_orig)
    report = GPTQReport(loss=loss, rtn_loss=rtn_loss, damp=damp, retries=retries, diagonal_fallback=fallback)
    log.info(
        "GPTQ %s %dx%d: tr(ΔHΔᵀ) %.4g vs RTN %.4g (ratio %.3f), damp %.3g%s",
        codec.name,
        out_f,
        in_f,
        loss,
        rtn_loss,
        report.ratio,
        damp,
        " (diagonal fallback)" if fallback else "",
    )
    if isinstance(q, GroupIndexedQuantized):
        fields = {f.name: getattr(q, f.name) for f in dataclasses.fields(q)}
        return GPTQQuantized(**fields, perm=perm if config.act_order else None, report=report)
    return q


#: ``--act-order`` value -> (act_order, static_groups)
ACT_ORDERS: dict[str, tuple[bool, bool]] = {
    "static": (True, True),
    "group": (True, False),
    "none": (False, False),
}


class GPTQ(Method):
    """GPTQ as a :class:`~lowbit.methods.base.Method`: reads ``stats["hessian"]`` (in, in)."""

    name = "gptq"
    needs = ("hessian",)

    def __init__(
        self,
        config: GPTQConfig | None = None,
        *,
        act_order: str | None = None,
        damp: float | None = None,
        diag_blend: float | None = None,
        asymmetric: bool | None = None,
    ) -> None:
        """``config``, with any of the given knobs replaced (the CLI's ``--act-order``, ``--damp``,
        ``--diag-blend``). ``act_order`` as llm-compressor's ``actorder``: ``"static"`` (act-order,
        contiguous groups), ``"group"`` (act-order, dynamic groups: ``g_idx``) or ``"none"``."""
        config = config or GPTQConfig()
        if damp is not None:
            config = dataclasses.replace(config, damp=damp)
        if diag_blend is not None:
            config = dataclasses.replace(config, diag_blend=diag_blend)
        if asymmetric is not None:
            config = dataclasses.replace(config, asymmetric=asymmetric)
        if act_order is not None:
            if act_order not in ACT_ORDERS:
                raise ArgumentError(
                    f"act-order must be one of {', '.join(ACT_ORDERS)} (llm-compressor's actorder), not {act_order!r}"
                )
            ordered, static = ACT_ORDERS[act_order]
            config = dataclasses.replace(config, act_order=ordered, static_groups=static)
        self.config = config

    @property
    def scatters_groups(self) -> bool:
        return self.config.act_order and not self.config.static_groups

    @property
    def statistics(self) -> tuple[str, ...]:
        return ("hessian", "input_error") if self.config.asymmetric else ("hessian",)

    def quantize_linear(
        self, weight: torch.Tensor, codec: Codec, stats: dict[str, torch.Tensor] | None = None
    ) -> QuantizedTensor:
        if stats is None or "hessian" not in stats:
            raise ArgumentError(
                "GPTQ needs the layer's Hessian (stats['hessian'], from calibration); "
                "run with calibration text, or use --method rtn"
            )
        if not isinstance(codec, RegionCodec):
            raise SchemeError(
                f"GPTQ needs a codec with per-group parameters (integers, ggml block types), not {codec.name}"
            )
        return gptq_quantize(
            weight, stats["hessian"], codec, self.config, stats.get("importance"), stats.get("input_error")
        )

"""Per-token metrics and their summaries: NLL, top-k KL-divergence, llama.cpp's uncertainties.

All arithmetic is float64 on CPU. Rows are processed in blocks of :data:`ROW_BLOCK` positions so a large
vocabulary (150 K) never needs more than ``ROW_BLOCK * V * 8`` bytes of scratch at once.

Top-k KL-divergence
-------------------
The reference distribution ``P`` is stored only as its top-k log-probs ``log p_i`` (float32, ids ``S``),
plus the exact mass of the rest, ``p_rest = sum_{j not in S} p_j`` (float64, computed from the full
reference logits). For a model ``Q`` with full log-probs ``log q``::

    KL_k(P || Q) = sum_{i in S} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest),
    q_rest = sum_{j not in S} q_j   (clamped to >= float64 tiny)

This is the KL-divergence between ``P`` and ``Q`` after both are coarsened to ``k + 1`` outcomes (the
top-k tokens and one "rest" bucket). By the chain rule / log-sum inequality,
``KL(P||Q) = KL_k(P||Q) + p_rest * KL(P_tail || Q_tail) >= KL_k(P||Q)``, where ``P_tail``, ``Q_tail`` are
the distributions renormalized on the tail. So ``KL_k`` is a lower bound, exact when ``k = V`` and off
by at most ``p_rest * KL(P_tail||Q_tail)`` otherwise, which is tiny because ``p_rest`` is.

``Q``'s top-k log-probs are rounded to float32 exactly as the stored ``P`` values were, and both rest
masses come from the same function, so ``KL_k(P || P) = 0`` bit-exactly for a deterministic model.

llama.cpp's own ``--kl-divergence`` is approximate in a different way: it stores every log-prob as
uint16 on ``[max - 16, max]`` (steps of 2.4e-4 nats) and drops reference tokens with ``log p < -16``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ROW_BLOCK = 64


def log_softmax64(logits: torch.Tensor) -> torch.Tensor:
    """``(n, V)`` logits of any float dtype -> ``(n, V)`` float64 log-probs on CPU."""
    return torch.log_softmax(logits.detach().to(device="cpu", dtype=torch.float64), dim=-1)


def tail_mass(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Probability outside the given ids.

    Args:
        logp: ``(n, V)`` float64 log-probs.
        ids: ``(n, k)`` int64 token ids (distinct within a row).

    Returns:
        ``(n,)`` float64 ``sum_{j not in ids} exp(logp_j)``, exactly 0 when ``k = V``.
    """
    p = logp.exp()
    p.scatter_(-1, ids, 0.0)
    return p.sum(dim=-1)


@dataclass(frozen=True)
class RefRows:
    """Reference data for one block of scored positions.

    Attributes:
        nll: ``(n,)`` float64 reference NLL of the true next token.
        argmax: ``(n,)`` int64 reference argmax (first maximal logit).
        topk_ids: ``(n, k)`` int64 top-k token ids.
        topk_logp: ``(n, k)`` float32 top-k log-probs.
        tail: ``(n,)`` float64 reference mass outside the top-k.
    """

    nll: torch.Tensor
    argmax: torch.Tensor
    topk_ids: torch.Tensor
    topk_logp: torch.Tensor
    tail: torch.Tensor


def reference_rows(logits: torch.Tensor, targets: torch.Tensor, topk: int) -> RefRows:
    """Summarize reference logits: ``(n, V)`` logits, ``(n,)`` int64 targets -> :class:`RefRows`."""
    parts: list[RefRows] = []
    k = min(topk, logits.shape[-1])
    for s in range(0, logits.shape[0], ROW_BLOCK):
        blk = logits[s : s + ROW_BLOCK]
        tgt = targets[s : s + ROW_BLOCK].to(device="cpu", dtype=torch.int64)
        lp = log_softmax64(blk)  # (b, V) float64
        vals, ids = torch.topk(lp, k, dim=-1)  # (b, k)
        parts.append(
            RefRows(
                nll=-lp.gather(-1, tgt[:, None])[:, 0],
                argmax=torch.argmax(blk.detach().cpu(), dim=-1).to(torch.int64),
                topk_ids=ids,
                topk_logp=vals.to(torch.float32),
                tail=tail_mass(lp, ids),
            )
        )
    return RefRows(
        nll=torch.cat([p.nll for p in parts]),
        argmax=torch.cat([p.argmax for p in parts]),
        topk_ids=torch.cat([p.topk_ids for p in parts]),
        topk_logp=torch.cat([p.topk_logp for p in parts]),
        tail=torch.cat([p.tail for p in parts]),
    )


@dataclass(frozen=True)
class ModelRows:
    """Per-position metrics of the evaluated model against the reference (all ``(n,)``).

    Attributes:
        nll: float64 NLL of the true next token under the model.
        kld: float64 top-k KL(P_ref || Q_model).
        same_top: bool, model argmax == reference argmax.
    """

    nll: torch.Tensor
    kld: torch.Tensor
    same_top: torch.Tensor


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(n, V)`` logits, ``(n,)`` int64 targets -> ``(n,)`` float64 negative log-likelihoods."""
    out = []
    for s in range(0, logits.shape[0], ROW_BLOCK):
        lp = log_softmax64(logits[s : s + ROW_BLOCK])
        tgt = targets[s : s + ROW_BLOCK].to(device="cpu", dtype=torch.int64)
        out.append(-lp.gather(-1, tgt[:, None])[:, 0])
    return torch.cat(out)


def model_rows(logits: torch.Tensor, targets: torch.Tensor, ref: RefRows) -> ModelRows:
    """Compare model logits ``(n, V)`` with the reference rows of the same positions."""
    nll, kld, same = [], [], []
    tiny = torch.finfo(torch.float64).tiny
    for s in range(0, logits.shape[0], ROW_BLOCK):
        e = s + ROW_BLOCK
        blk = logits[s:e]
        lq = log_softmax64(blk)  # (b, V)
        tgt = targets[s:e].to(device="cpu", dtype=torch.int64)
        ids = ref.topk_ids[s:e]
        lp_top = ref.topk_logp[s:e].to(torch.float64)  # (b, k)
        lq_top = lq.gather(-1, ids).to(torch.float32).to(torch.float64)  # same rounding as lp_top
        kl = (lp_top.exp() * (lp_top - lq_top)).sum(dim=-1)
        p_rest = ref.tail[s:e]
        q_rest = tail_mass(lq, ids).clamp_min(tiny)
        safe_p = p_rest.clamp_min(tiny)
        rest = torch.where(p_rest > 0, p_rest * (safe_p.log() - q_rest.log()), torch.zeros_like(p_rest))
        nll.append(-lq.gather(-1, tgt[:, None])[:, 0])
        kld.append(kl + rest)
        same.append(torch.argmax(blk.detach().cpu(), dim=-1).to(torch.int64) == ref.argmax[s:e])
    return ModelRows(nll=torch.cat(nll), kld=torch.cat(kld), same_top=torch.cat(same))


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error as llama.cpp prints them: ``sqrt((E[x^2] - E[x]^2) / (n - 1))``.

    The standard error is 0 for fewer than 2 values or a non-positive variance estimate.
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n == 0:
        return 0.0, 0.0
    mean = float(x.sum() / n)
    var = float((x * x).sum() / n - mean * mean)
    err = math.sqrt(var / (n - 1)) if n > 1 and var > 0 else 0.0
    return mean, err


def ppl_and_stderr(nll: np.ndarray) -> tuple[float, float]:
    """``exp(mean nll)`` and llama.cpp's uncertainty ``PPL * stderr(nll)``."""
    mean, err = mean_and_stderr(nll)
    ppl = math.exp(mean)
    return ppl, ppl * err


def ppl_diff_stderr(nll_q: np.ndarray, nll_ref: np.ndarray) -> float:
    """Uncertainty of ``PPL(Q) - PPL(ref)`` with llama.cpp's covariance formula (paired tokens)."""
    q = np.asarray(nll_q, dtype=np.float64)
    r = np.asarray(nll_ref, dtype=np.float64)
    n = q.size
    if n < 10:
        return 0.0
    ppl_q, unc_q = ppl_and_stderr(q)
    ppl_r, unc_r = ppl_and_stderr(r)
    cov = float((q * r).sum() / n - (q.sum() / n) * (r.sum() / n)) / (n - 1)
    v = unc_q * unc_q + unc_r * unc_r - 2.0 * ppl_q * ppl_r * cov
    return math.sqrt(v) if v > 0 else 0.0


def percentile(values: np.ndarray, fraction: float) -> float:
    """Linear-interpolated percentile at ``fraction * (n - 1)``, the rule llama.cpp uses for KLD."""
    return float(np.quantile(np.asarray(values, dtype=np.float64), fraction))

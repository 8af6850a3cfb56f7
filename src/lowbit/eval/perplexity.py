"""Perplexity exactly as llama.cpp's ``llama-perplexity`` computes it, and KLD / top-1 against a reference.

Typical use::

    tokens = encode_text(tokenizer, text)                 # BOS first if the tokenizer adds it
    bos = tokenizer_bos_id(tokenizer)
    ref = load_or_build_reference(logits_fn_from_hf(fp_model), tokens, 512, 40, bos,
                                  model_fingerprint="stories260K@sha256:...")
    result = evaluate(logits_fn_from_hf(q_model), ref)    # EvalResult: ppl, kld_*, top1, ...
    ppl_only = compute_perplexity(logits_fn_from_hf(fp_model), tokens, 512, 40, bos)

The window rules (copied from llama.cpp's source and documented in :mod:`lowbit.eval.windows`): one
tokenization of the whole text, chunk ``i = tokens[i*ctx:(i+1)*ctx]``, ``min(chunks, n_tokens // ctx)``
chunks, the first token of each chunk replaced by BOS when the model adds BOS, logits at positions
``ctx//2 .. ctx-2`` scored against the next token, ``PPL = exp(mean NLL)``. The KL-divergence uses the
top-k reference described in :mod:`lowbit.eval.metrics` and :mod:`lowbit.eval.refcache`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lowbit.eval.metrics import (
    PerplexityResult,
    mean_and_stderr,
    model_rows,
    percentile,
    ppl_and_stderr,
    ppl_diff_stderr,
    token_nll,
)
from lowbit.eval.refcache import (
    DEFAULT_TAIL_SAMPLES,
    DEFAULT_TOPK,
    Reference,
    ReferenceMeta,
    build_reference,
    default_cache_dir,
    load_or_build_reference,
    load_reference,
    reference_cache_key,
    reference_cache_path,
    save_reference,
    tokens_fingerprint,
)
from lowbit.eval.windows import (
    LogitsFn,
    WindowPlan,
    check_tokens,
    encode_text,
    plan_windows,
    run_windows,
    tokenizer_bos_id,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TAIL_SAMPLES",
    "DEFAULT_TOPK",
    "EvalResult",
    "LogitsFn",
    "PerplexityResult",
    "Reference",
    "ReferenceMeta",
    "WindowPlan",
    "build_reference",
    "compute_perplexity",
    "default_cache_dir",
    "encode_text",
    "evaluate",
    "load_or_build_reference",
    "load_reference",
    "logits_fn_from_hf",
    "plan_windows",
    "reference_cache_key",
    "reference_cache_path",
    "save_reference",
    "tokenizer_bos_id",
    "tokens_fingerprint",
]


def logits_fn_from_hf(model: torch.nn.Module) -> LogitsFn:
    """Wrap a Hugging Face causal LM (``model(input_ids=...).logits``) as a :data:`LogitsFn`.

    The ids are moved to the model's device; the logits are returned where the model left them.
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    def fn(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids.to(device), use_cache=False)
        logits: torch.Tensor = out.logits
        return logits

    return fn


@dataclass(frozen=True)
class EvalResult:
    """A model measured against a reference on the same windows.

    Attributes:
        ppl, ppl_stderr: the model's perplexity and llama.cpp's uncertainty of it.
        ref_ppl, ref_ppl_stderr: the reference's.
        delta_ppl, delta_ppl_stderr: ``ppl - ref_ppl`` and its uncertainty (llama.cpp's paired formula).
        kld_mean, kld_stderr: mean KL(P_ref || Q) in nats per token (top-k exact + sampled-tail estimate,
            see :mod:`lowbit.eval.metrics`) and its standard error.
        kld_median, kld_p99, kld_p999, kld_max: distribution of the per-token KLD (llama.cpp percentiles).
        kld_bound_mean: mean of the deterministic top-k + rest-bucket lower bound (<= kld_mean).
        top1: fraction of scored positions where the model's argmax equals the reference argmax.
        tokens: scored tokens; chunks, ctx: the windows.
        topk: reference log-probs kept per position. tail_samples: reference tail draws per position.
        ref_tail_mass: mean reference probability outside the top-k (what the "rest" bucket holds).
    """

    ppl: float
    ppl_stderr: float
    ref_ppl: float
    ref_ppl_stderr: float
    delta_ppl: float
    delta_ppl_stderr: float
    kld_mean: float
    kld_stderr: float
    kld_median: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    kld_bound_mean: float
    top1: float
    tokens: int
    chunks: int
    ctx: int
    topk: int
    tail_samples: int
    ref_tail_mass: float

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_perplexity(
    logits_fn: LogitsFn,
    tokens: torch.Tensor,
    ctx: int,
    max_chunks: int | None,
    bos_id: int | None,
    *,
    progress: bool | None = None,
) -> PerplexityResult:
    """Perplexity of ``logits_fn`` over llama-perplexity's windows (no reference needed).

    Args:
        logits_fn: ``(1, T)`` int64 ids -> ``(1, T, V)`` logits.
        tokens: ``(n,)`` integer ids of the whole text, BOS first if the tokenizer adds BOS.
        ctx: window length (>= 8). max_chunks: llama.cpp ``--chunks`` (``None``: all that fit).
        bos_id: BOS id when the model adds BOS (every window's first token is replaced by it), else None.
        progress: tqdm bar over chunks (``None``: only on a terminal).

    Raises:
        ArgumentError: bad ctx/chunks, text shorter than one window, or a model/vocabulary mismatch.
    """
    toks = check_tokens(tokens)
    plan = plan_windows(toks.numel(), ctx, max_chunks, bos_id)
    parts = [
        token_nll(logits, targets)
        for _, logits, targets in run_windows(logits_fn, toks, plan, progress=progress, desc="perplexity")
    ]
    nll = torch.cat(parts).numpy()
    assert nll.size == plan.n_scored
    res = PerplexityResult.from_nll(nll, chunks=plan.n_chunks, ctx=ctx)
    ppl, err = res.ppl, res.ppl_stderr
    logger.info(
        "PPL %.4f +/- %.5f over %d chunks x %d ctx (%d tokens)", ppl, err, plan.n_chunks, ctx, res.tokens
    )
    return res


def evaluate(
    logits_fn: LogitsFn,
    reference: Reference,
    *,
    tokens: torch.Tensor | None = None,
    ctx: int | None = None,
    max_chunks: int | None = None,
    progress: bool | None = None,
) -> EvalResult:
    """Measure a model against a reference: PPL of both, top-k KL-divergence, top-1 agreement.

    The model is run on the reference's stored tokens and windows (as llama.cpp's ``--kl-divergence``
    takes them from the base file). ``tokens``/``ctx``/``max_chunks``, when given, are checked against
    the reference so a stale cache cannot be used by mistake.

    Raises:
        InputFileError: the reference does not match the given tokens/ctx/chunks or the model's vocabulary.
    """
    reference.check_matches(tokens, ctx, max_chunks)
    plan = reference.meta.plan
    per = plan.scored_per_chunk
    nll_parts, kld_parts, bound_parts, same_parts = [], [], [], []
    for i, logits, targets in run_windows(logits_fn, reference.tokens, plan, progress=progress, desc="kld"):
        reference.check_vocab(int(logits.shape[-1]))
        m = model_rows(logits, targets, reference.rows.slice(i * per, (i + 1) * per))
        nll_parts.append(m.nll)
        kld_parts.append(m.kld)
        bound_parts.append(m.kld_bound)
        same_parts.append(m.same_top)
    nll = torch.cat(nll_parts).numpy()
    kld = torch.cat(kld_parts).numpy()
    same = torch.cat(same_parts).numpy()
    ref_nll = reference.rows.nll.numpy()
    ppl, ppl_err = ppl_and_stderr(nll)
    ref_ppl, ref_err = ppl_and_stderr(ref_nll)
    kld_mean, kld_err = mean_and_stderr(kld)
    res = EvalResult(
        ppl=ppl,
        ppl_stderr=ppl_err,
        ref_ppl=ref_ppl,
        ref_ppl_stderr=ref_err,
        delta_ppl=ppl - ref_ppl,
        delta_ppl_stderr=ppl_diff_stderr(nll, ref_nll),
        kld_mean=kld_mean,
        kld_stderr=kld_err,
        kld_median=float(np.median(kld)),
        kld_p99=percentile(kld, 0.99),
        kld_p999=percentile(kld, 0.999),
        kld_max=float(kld.max()),
        kld_bound_mean=mean_and_stderr(torch.cat(bound_parts).numpy())[0],
        top1=float(same.mean()),
        tokens=int(nll.size),
        chunks=plan.n_chunks,
        ctx=plan.ctx,
        topk=reference.meta.topk,
        tail_samples=reference.meta.tail_samples,
        ref_tail_mass=reference.mean_tail_mass,
    )
    if not math.isfinite(res.kld_mean):
        logger.warning("KL-divergence is not finite: the model produced NaN/Inf logits")
    logger.info(
        "PPL %.4f (ref %.4f, delta %+.4f), KLD mean %.6f p99 %.6f, top-1 %.4f over %d tokens",
        res.ppl,
        res.ref_ppl,
        res.delta_ppl,
        res.kld_mean,
        res.kld_p99,
        res.top1,
        res.tokens,
    )
    return res

"""The reference model's predictions, computed once and cached in one compressed ``.npz``.

llama.cpp's ``--kl-divergence-base`` stores every log-prob of every scored position (uint16,
``2 * V`` bytes each: 1 GB for SmolLM2's 49 K vocabulary at ctx 512 x 40 chunks). lowbit keeps, per scored
position, only what the metrics need:

==================  ===========  ==========================================================
array               dtype        meaning
==================  ===========  ==========================================================
``topk_logp``       float32      ``(N, k)`` largest reference log-probs, descending
``topk_ids``        int32        ``(N, k)`` their token ids
``tail``            float64      ``(N,)`` exact reference mass outside the top-k
``tail_ids``        int32        ``(N, s)`` stratified draws from the renormalized tail
``tail_logp``       float32      ``(N, s)`` their reference log-probs
``nll``             float64      ``(N,)`` reference NLL of the true next token
``argmax``          int32        ``(N,)`` reference argmax (first maximal logit)
``tokens``          int32        ``(chunks * ctx,)`` the evaluated tokens (as llama.cpp stores them)
``meta``            str          JSON of :class:`ReferenceMeta`
==================  ===========  ==========================================================

``N = chunks * (ctx - 1 - ctx//2)``. Log-probs are float32, not float16: a float16 log-prob near -10
is off by up to 4e-3 nats, per-position KLD errors of order 1e-3, the size of a good 8-bit
quantization's whole KLD. float32 errors are ~1e-7 nats.

Defaults ``k = 128`` (:data:`DEFAULT_TOPK`) and ``s = 32`` tail draws (:data:`DEFAULT_TAIL_SAMPLES`):
1.25 KB per position, about 13 MB for 40 x 512 windows whatever the vocabulary (llama.cpp: 1 GB for
SmolLM2). Measured (see :mod:`lowbit.eval.metrics`):

- stories260K (V = 512), perturbed model: top-128 tail mass 2e-5; the bucket bound is 6e-5 relative
  below the full KL, the estimate closer still (asserted in the tests).
- SmolLM2-135M (V = 49152) on WikiText-2: the top-128 tail holds 10% of the mass, the bucket bound alone
  is 16% low; with 32 tail draws the mean KLD is within 0.25% of the full-vocabulary value and p99
  within 2%. Raising k instead helps slowly (top-1024 bucket bound: still 4% low), which is why the
  tail is sampled.

:attr:`Reference.mean_tail_mass` reports the tail mass of a given reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import ArgumentError, InputFileError
from lowbit.eval.metrics import PerplexityResult, RefRows, reference_rows
from lowbit.eval.windows import LogitsFn, WindowPlan, check_tokens, plan_windows, run_windows

logger = logging.getLogger(__name__)

DEFAULT_TOPK = 128
DEFAULT_TAIL_SAMPLES = 32
DEFAULT_SEED = 0
FORMAT_VERSION = 2
_ARRAYS = ("topk_logp", "topk_ids", "tail", "tail_ids", "tail_logp", "nll", "argmax", "tokens")


def tokens_fingerprint(tokens: torch.Tensor) -> str:
    """sha256 (hex) of token ids as little-endian int32: ``(n,)`` integer tensor -> str."""
    arr = check_tokens(tokens).numpy().astype("<i4")
    return hashlib.sha256(arr.tobytes()).hexdigest()


@dataclass(frozen=True)
class ReferenceMeta:
    """What a reference cache was computed from.

    Attributes:
        ctx: window length.
        n_chunks: windows evaluated.
        n_vocab: reference model's logit width.
        topk: stored log-probs per position (``min(requested, n_vocab)``).
        tail_samples: stored tail draws per position.
        seed: seed of the tail draws.
        bos_id: BOS written over each window's first token, or ``None``.
        tokens_sha256: :func:`tokens_fingerprint` of the ``n_chunks * ctx`` evaluated tokens.
        model_fingerprint: caller's identifier of the reference model ("" if none given).
        format_version: cache layout version.
    """

    ctx: int
    n_chunks: int
    n_vocab: int
    topk: int
    tail_samples: int
    seed: int
    bos_id: int | None
    tokens_sha256: str
    model_fingerprint: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def plan(self) -> WindowPlan:
        """The window plan over the stored tokens."""
        return WindowPlan(
            ctx=self.ctx, n_chunks=self.n_chunks, bos_id=self.bos_id, n_tokens=self.n_chunks * self.ctx
        )


@dataclass(frozen=True, eq=False)
class Reference:
    """A reference model's predictions on llama-perplexity windows (see the module docstring).

    Attributes:
        meta: provenance and shape.
        tokens: ``(n_chunks * ctx,)`` int64 evaluated tokens.
        rows: per scored position, ``N = n_chunks * (ctx - 1 - ctx//2)`` rows in window order.
    """

    meta: ReferenceMeta
    tokens: torch.Tensor
    rows: RefRows

    @property
    def n_scored(self) -> int:
        return int(self.rows.nll.numel())

    @property
    def mean_tail_mass(self) -> float:
        """Average reference probability outside the stored top-k (the "rest" bucket)."""
        return float(self.rows.tail.mean())

    def perplexity(self) -> PerplexityResult:
        """The reference's own perplexity from the cached NLLs (no model run), as llama-perplexity computes it."""
        return PerplexityResult.from_nll(self.rows.nll.numpy(), chunks=self.meta.n_chunks, ctx=self.meta.ctx)

    def check_matches(
        self,
        tokens: torch.Tensor | None = None,
        ctx: int | None = None,
        max_chunks: int | None = None,
        *,
        source: str = "the reference cache",
    ) -> None:
        """Raise :class:`InputFileError` unless this reference was computed on these windows.

        Args:
            tokens: ``(n,)`` token sequence the caller wants to evaluate (its first ``n_chunks * ctx``
                tokens must be the stored ones), or ``None`` to skip.
            ctx: expected window length, or ``None``.
            max_chunks: the caller's chunk limit (``None``: all that fit in ``tokens``).
            source: how to name the cache in the message (e.g. its path).
        """
        m = self.meta
        redo = "delete it to recompute the reference, or evaluate with the settings it was made with"
        if ctx is not None and ctx != m.ctx:
            raise InputFileError(f"{source} was computed with ctx {m.ctx}, not {ctx}; {redo}")
        if tokens is None:
            if max_chunks is not None and max_chunks != m.n_chunks:
                raise InputFileError(f"{source} holds {m.n_chunks} chunks, not {max_chunks}; {redo}")
            return
        toks = check_tokens(tokens)
        try:
            plan = plan_windows(toks.numel(), m.ctx, max_chunks, m.bos_id)
        except ArgumentError as exc:
            raise InputFileError(f"{source} does not match the text: {exc}") from exc
        if plan.n_chunks != m.n_chunks:
            raise InputFileError(
                f"{source} holds {m.n_chunks} chunks but the text gives {plan.n_chunks}; {redo}"
            )
        if tokens_fingerprint(toks[: plan.n_used]) != m.tokens_sha256:
            raise InputFileError(f"{source} was computed on different tokens than this text; {redo}")

    def check_vocab(self, n_vocab: int, *, source: str = "the reference cache") -> None:
        """Raise :class:`InputFileError` if a model's logit width differs from the reference's."""
        if n_vocab != self.meta.n_vocab:
            raise InputFileError(
                f"{source} has a vocabulary of {self.meta.n_vocab} but the model returns {n_vocab} logits; "
                "compare models that share a tokenizer, or rebuild the reference"
            )


def build_reference(
    logits_fn: LogitsFn,
    tokens: torch.Tensor,
    ctx: int,
    max_chunks: int | None,
    bos_id: int | None,
    *,
    topk: int = DEFAULT_TOPK,
    tail_samples: int = DEFAULT_TAIL_SAMPLES,
    seed: int = DEFAULT_SEED,
    model_fingerprint: str = "",
    progress: bool | None = None,
) -> Reference:
    """Run the reference model once over llama-perplexity's windows and keep its top-k predictions.

    Args:
        logits_fn: reference model, ``(1, T)`` int64 -> ``(1, T, V)`` logits.
        tokens: ``(n,)`` integer token ids of the whole text (BOS first if the tokenizer adds it).
        ctx: window length; ``max_chunks``: ``--chunks`` (``None`` = all); ``bos_id``: see
            :func:`lowbit.eval.windows.plan_windows`.
        topk: log-probs kept per position (>= 1; clipped to the vocabulary).
        tail_samples: draws from the tail beyond the top-k per position (>= 0; 0 = bucket bound only).
        seed: seed of the tail draws (the cache is reproducible bit for bit).
        model_fingerprint: caller's identifier of the reference, stored in the metadata.
        progress: tqdm bar (``None``: only on a terminal).
    """
    if topk < 1:
        raise ArgumentError(f"topk must be at least 1, got {topk}")
    if tail_samples < 0:
        raise ArgumentError(f"tail_samples must be >= 0, got {tail_samples}")
    gen = torch.Generator().manual_seed(seed)
    toks = check_tokens(tokens)
    plan = plan_windows(toks.numel(), ctx, max_chunks, bos_id)
    parts: list[RefRows] = []
    n_vocab = -1
    for _, logits, targets in run_windows(logits_fn, toks, plan, progress=progress, desc="reference"):
        if n_vocab < 0:
            n_vocab = int(logits.shape[-1])
        elif logits.shape[-1] != n_vocab:
            raise ArgumentError("the reference model changed its vocabulary size between windows")
        parts.append(reference_rows(logits, targets, topk, tail_samples, gen))
    rows = RefRows.concat(parts)
    used = toks[: plan.n_used].clone()
    meta = ReferenceMeta(
        ctx=ctx,
        n_chunks=plan.n_chunks,
        n_vocab=n_vocab,
        topk=min(topk, n_vocab),
        tail_samples=tail_samples,
        seed=seed,
        bos_id=bos_id,
        tokens_sha256=tokens_fingerprint(used),
        model_fingerprint=model_fingerprint,
    )
    ref = Reference(meta=meta, tokens=used, rows=rows)
    pr = ref.perplexity()
    ppl, err = pr.ppl, pr.ppl_stderr
    logger.info(
        "reference: %d chunks x %d ctx, %d scored tokens, PPL %.4f +/- %.5f, top-%d tail mass %.3g",
        plan.n_chunks,
        ctx,
        ref.n_scored,
        ppl,
        err,
        meta.topk,
        ref.mean_tail_mass,
    )
    return ref


def save_reference(ref: Reference, path: str | os.PathLike[str]) -> Path:
    """Write ``ref`` to ``path`` as one compressed ``.npz``, atomically (temp file + ``os.replace``)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "topk_logp": ref.rows.topk_logp.numpy().astype(np.float32),
        "topk_ids": ref.rows.topk_ids.numpy().astype(np.int32),
        "tail": ref.rows.tail.numpy().astype(np.float64),
        "tail_ids": ref.rows.tail_ids.numpy().astype(np.int32),
        "tail_logp": ref.rows.tail_logp.numpy().astype(np.float32),
        "nll": ref.rows.nll.numpy().astype(np.float64),
        "argmax": ref.rows.argmax.numpy().astype(np.int32),
        "tokens": ref.tokens.numpy().astype(np.int32),
        "meta": np.array(json.dumps(asdict(ref.meta), sort_keys=True)),
    }
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    logger.info("saved reference (%d positions, top-%d) to %s", ref.n_scored, ref.meta.topk, out)
    return out


def load_reference(path: str | os.PathLike[str]) -> Reference:
    """Read a cache written by :func:`save_reference`.

    Raises:
        InputFileError: missing, unreadable, from another format version, or internally inconsistent.
    """
    p = Path(path)
    bad = f"{p} is not a valid lowbit reference cache"
    fix = "delete it and run again to recompute the reference"
    if not p.is_file():
        raise InputFileError(f"reference cache {p} does not exist; build it first (or pass another path)")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in (*_ARRAYS, "meta") if k not in z.files]
            if missing:
                raise InputFileError(f"{bad} (missing {', '.join(missing)}); {fix}")
            data = {k: z[k] for k in _ARRAYS}
            meta_d = json.loads(str(z["meta"]))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputFileError(f"{bad} ({exc}); {fix}") from exc
    if not isinstance(meta_d, dict) or meta_d.get("format_version") != FORMAT_VERSION:
        raise InputFileError(f"{bad} (format version {meta_d.get('format_version')!r}); {fix}")
    try:
        meta = ReferenceMeta(**meta_d)
    except TypeError as exc:
        raise InputFileError(f"{bad} (metadata: {exc}); {fix}") from exc
    n = meta.n_chunks * (meta.ctx - 1 - meta.ctx // 2)
    shapes = {
        "topk_logp": (n, meta.topk),
        "topk_ids": (n, meta.topk),
        "tail": (n,),
        "tail_ids": (n, meta.tail_samples),
        "tail_logp": (n, meta.tail_samples),
        "nll": (n,),
        "argmax": (n,),
        "tokens": (meta.n_chunks * meta.ctx,),
    }
    for k, shape in shapes.items():
        if data[k].shape != shape:
            raise InputFileError(f"{bad} ({k} has shape {data[k].shape}, metadata implies {shape}); {fix}")
    tokens = torch.from_numpy(data["tokens"].astype(np.int64))
    if tokens_fingerprint(tokens) != meta.tokens_sha256:
        raise InputFileError(f"{bad} (stored tokens do not match their fingerprint); {fix}")
    rows = RefRows(
        nll=torch.from_numpy(data["nll"].astype(np.float64)),
        argmax=torch.from_numpy(data["argmax"].astype(np.int64)),
        topk_ids=torch.from_numpy(data["topk_ids"].astype(np.int64)),
        topk_logp=torch.from_numpy(data["topk_logp"].astype(np.float32)),
        tail=torch.from_numpy(data["tail"].astype(np.float64)),
        tail_ids=torch.from_numpy(data["tail_ids"].astype(np.int64)),
        tail_logp=torch.from_numpy(data["tail_logp"].astype(np.float32)),
    )
    return Reference(meta=meta, tokens=tokens, rows=rows)


def default_cache_dir() -> Path:
    """``$LOWBIT_CACHE_DIR/refs`` if set, else ``$XDG_CACHE_HOME/lowbit/refs``, else ``~/.cache/lowbit/refs``."""
    env = os.environ.get("LOWBIT_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "refs"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lowbit" / "refs"


def reference_cache_key(
    model_fingerprint: str,
    tokens: torch.Tensor,
    ctx: int,
    max_chunks: int | None,
    topk: int = DEFAULT_TOPK,
    bos_id: int | None = None,
    *,
    tail_samples: int = DEFAULT_TAIL_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> str:
    """A 24-hex-digit key naming a reference cache.

    Built from the caller's model fingerprint, the fingerprint of the tokens the windows cover, ctx, the
    effective number of chunks, topk, bos_id, tail_samples and seed: any change gives another file.
    """
    toks = check_tokens(tokens)
    plan = plan_windows(toks.numel(), ctx, max_chunks, bos_id)
    ident = json.dumps(
        {
            "v": FORMAT_VERSION,
            "model": model_fingerprint,
            "tokens": tokens_fingerprint(toks[: plan.n_used]),
            "ctx": ctx,
            "chunks": plan.n_chunks,
            "topk": topk,
            "bos": bos_id,
            "tail_samples": tail_samples,
            "seed": seed,
        },
        sort_keys=True,
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def reference_cache_path(
    model_fingerprint: str,
    tokens: torch.Tensor,
    ctx: int,
    max_chunks: int | None,
    topk: int = DEFAULT_TOPK,
    bos_id: int | None = None,
    *,
    tail_samples: int = DEFAULT_TAIL_SAMPLES,
    seed: int = DEFAULT_SEED,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """``<cache_dir or default_cache_dir()>/ref-<key>.npz`` (key from :func:`reference_cache_key`)."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = reference_cache_key(
        model_fingerprint, tokens, ctx, max_chunks, topk, bos_id, tail_samples=tail_samples, seed=seed
    )
    return base / f"ref-{key}.npz"


def load_or_build_reference(
    logits_fn: LogitsFn,
    tokens: torch.Tensor,
    ctx: int,
    max_chunks: int | None,
    bos_id: int | None,
    *,
    model_fingerprint: str,
    topk: int = DEFAULT_TOPK,
    tail_samples: int = DEFAULT_TAIL_SAMPLES,
    seed: int = DEFAULT_SEED,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> Reference:
    """Load the cached reference for these settings, or compute it and cache it atomically.

    ``model_fingerprint`` must change whenever the reference model does (e.g. a hash of its weights
    file, or its name plus revision): the cache cannot detect another model under the same fingerprint.

    Raises:
        InputFileError: the cached file is corrupt or does not match these settings.
    """
    path = reference_cache_path(
        model_fingerprint,
        tokens,
        ctx,
        max_chunks,
        topk,
        bos_id,
        tail_samples=tail_samples,
        seed=seed,
        cache_dir=cache_dir,
    )
    if path.is_file():
        ref = load_reference(path)
        ref.check_matches(tokens, ctx, max_chunks, source=str(path))
        m = ref.meta
        if (m.model_fingerprint, m.bos_id, m.tail_samples, m.seed) != (
            model_fingerprint,
            bos_id,
            tail_samples,
            seed,
        ):
            raise InputFileError(f"{path} was made with other reference settings; delete it and run again")
        logger.info("using cached reference %s", path)
        return ref
    ref = build_reference(
        logits_fn,
        tokens,
        ctx,
        max_chunks,
        bos_id,
        topk=topk,
        tail_samples=tail_samples,
        seed=seed,
        model_fingerprint=model_fingerprint,
        progress=progress,
    )
    save_reference(ref, path)
    return ref

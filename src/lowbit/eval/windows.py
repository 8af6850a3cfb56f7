"""Evaluation windows exactly as llama.cpp's ``llama-perplexity`` lays them out.

Read from ``tools/perplexity/perplexity.cpp`` (function ``perplexity``, the default path without
``--ppl-stride``) and its ``kl_divergence`` function, which use the same windows:

- The whole text is tokenized **once**, with ``common_tokenize(ctx, text, add_special=true)``: a BOS
  token is prepended when the vocabulary says ``add_bos`` (and llama.cpp asserts it never adds EOS).
  Special-token text inside the file is *not* parsed as special tokens.
- ``n_chunk_max = n_tokens / n_ctx`` (integer division); ``n_chunk = min(--chunks, n_chunk_max)``
  (``--chunks`` < 0, the default, means all). The trailing ``n_tokens % n_ctx`` tokens are never used.
- Chunk ``i`` is ``tokens[i*n_ctx : (i+1)*n_ctx]``, evaluated from an empty KV cache at positions
  ``0 .. n_ctx-1``. When the model adds BOS, the *first token of every chunk* is replaced by BOS for
  the forward pass only (the stored token list is restored afterwards).
- ``first = n_ctx/2``. The logits at positions ``first .. n_ctx-2`` are scored against the next token
  ``tokens[start + j + 1]``: ``n_ctx - 1 - first`` scored tokens per chunk. The BOS replacement never
  touches a target (targets start at position ``first + 1 >= 1``).
- ``PPL = exp(sum(nll) / count)`` over all scored tokens of all chunks, and the printed uncertainty is
  ``PPL * sqrt((E[nll^2] - E[nll]^2) / (count - 1))``.

One deliberate difference: llama.cpp refuses texts of fewer than ``2 * n_ctx`` tokens, although it
only needs ``n_ctx`` for one chunk. lowbit accepts any text with at least one full chunk; on every
input llama.cpp accepts, the windows are identical.

A model here is a :data:`LogitsFn`: any callable mapping ``(1, T)`` int64 token ids to ``(1, T, V)``
float logits, so the evaluator does not care how (or in which runtime) the model was loaded.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from lowbit.errors import ArgumentError, InputFileError

logger = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""A model: ``(1, T)`` int64 token ids -> ``(1, T, V)`` float logits (any float dtype)."""

MIN_CTX = 8


class TextTokenizer(Protocol):
    """The part of a Hugging Face tokenizer the evaluator uses."""

    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class WindowPlan:
    """Which tokens are evaluated and scored (see the module docstring for the llama.cpp rules).

    Attributes:
        ctx: window length ``n_ctx`` in tokens.
        n_chunks: number of windows actually evaluated.
        bos_id: token written over position 0 of every window, or ``None`` if the model adds no BOS.
        n_tokens: length of the full token sequence the plan was made for.
    """

    ctx: int
    n_chunks: int
    bos_id: int | None
    n_tokens: int

    @property
    def first(self) -> int:
        """First scored logit position in a window (``n_ctx/2``)."""
        return self.ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        """Scored tokens per window: ``n_ctx - 1 - n_ctx/2``."""
        return self.ctx - 1 - self.first

    @property
    def n_scored(self) -> int:
        """Scored tokens over all windows."""
        return self.n_chunks * self.scored_per_chunk

    @property
    def n_used(self) -> int:
        """Tokens covered by the windows (a prefix of the sequence)."""
        return self.n_chunks * self.ctx


def check_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Validate a token sequence and return it as a contiguous 1-D int64 CPU tensor."""
    if not isinstance(tokens, torch.Tensor):
        raise ArgumentError(f"tokens must be a 1-D torch integer tensor, got {type(tokens).__name__}")
    if tokens.dim() != 1:
        raise ArgumentError(f"tokens must be 1-D (one token sequence), got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ArgumentError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    out = tokens.detach().to(device="cpu", dtype=torch.int64).contiguous()
    if out.numel() and int(out.min()) < 0:
        raise ArgumentError("tokens contain negative ids; pass the ids produced by the model's tokenizer")
    return out


def plan_windows(n_tokens: int, ctx: int, max_chunks: int | None, bos_id: int | None) -> WindowPlan:
    """Lay out llama-perplexity's windows over ``n_tokens`` tokens.

    Args:
        n_tokens: length of the tokenized text (including the leading BOS, if any).
        ctx: window length (llama.cpp ``-c``); at least 8.
        max_chunks: llama.cpp ``--chunks``; ``None`` for as many as fit.
        bos_id: BOS id if the model's tokenizer adds BOS, else ``None``.

    Raises:
        ArgumentError: ``ctx`` < 8, ``max_chunks`` < 1, or fewer than ``ctx`` tokens.
    """
    if ctx < MIN_CTX:
        raise ArgumentError(f"context length {ctx} is too small; use a context of at least {MIN_CTX} tokens")
    if max_chunks is not None and max_chunks < 1:
        raise ArgumentError(f"chunks must be at least 1 (got {max_chunks}); omit it to use every chunk")
    if bos_id is not None and bos_id < 0:
        raise ArgumentError(f"bos_id must be a token id >= 0 or None, got {bos_id}")
    n_max = n_tokens // ctx
    if n_max < 1:
        raise ArgumentError(
            f"the text has only {n_tokens} tokens, fewer than one window of {ctx}; "
            "use a longer text or a smaller context"
        )
    n_chunks = n_max if max_chunks is None else min(max_chunks, n_max)
    return WindowPlan(ctx=ctx, n_chunks=n_chunks, bos_id=bos_id, n_tokens=n_tokens)


def tokenizer_bos_id(tokenizer: TextTokenizer) -> int | None:
    """The BOS id if ``tokenizer`` prepends BOS when adding special tokens (llama.cpp ``add_bos``), else None.

    Found by encoding a probe string with and without special tokens: Hugging Face tokenizers record
    "adds BOS" in different places (``add_bos_token``, a post-processor template), the output is the truth.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer.encode("a", add_special_tokens=True)
    without = tokenizer.encode("a", add_special_tokens=False)
    if len(with_special) > len(without) and with_special[0] == bos:
        return int(bos)
    return None


def read_text_exact(path: Path) -> str:
    """A UTF-8 text file as llama.cpp reads it: bytes decoded, no newline translation (WikiText has CRLF
    line ends, which Python's text mode would turn into LF and so change the tokens).

    Raises:
        InputFileError: the file is not UTF-8.
    """
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path} is not UTF-8 text ({e}); convert it") from e


def encode_text(tokenizer: TextTokenizer, text: str) -> torch.Tensor:
    """Tokenize ``text`` once, as llama-perplexity does: BOS first if the tokenizer adds BOS, never EOS.

    One known difference: a Hugging Face tokenizer turns special-token text in ``text`` (``"<s>"``) into
    the special token, llama.cpp's perplexity tool does not. On stories260K and TinyStories the ids equal
    ``llama-tokenize``'s (tested).

    Returns:
        ``(n_tokens,)`` int64 tensor.
    """
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos = tokenizer_bos_id(tokenizer)
    if bos is not None:
        ids.insert(0, bos)
    return torch.tensor(ids, dtype=torch.int64)


def progress_enabled(progress: bool | None) -> bool:
    """``None`` means "only when stderr is a terminal"."""
    if progress is None:
        return sys.stderr.isatty()
    return progress


def run_windows(
    logits_fn: LogitsFn,
    tokens: torch.Tensor,
    plan: WindowPlan,
    *,
    progress: bool | None = None,
    desc: str = "eval",
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Run the model over every window and yield the scored part of each.

    Args:
        logits_fn: the model (see :data:`LogitsFn`).
        tokens: ``(n_tokens,)`` int64, the sequence ``plan`` was made for.
        plan: from :func:`plan_windows`.
        progress: tqdm bar over chunks; ``None`` = only on a terminal.
        desc: label of the progress bar.

    Yields:
        ``(chunk_index, logits, targets)``: ``logits`` is ``(scored_per_chunk, V)`` in the dtype the
        model returned (positions ``first .. ctx-2``), ``targets`` is ``(scored_per_chunk,)`` int64.

    Raises:
        ArgumentError: the model returns logits of the wrong shape, or a target id is outside its vocabulary.
    """
    if tokens.numel() != plan.n_tokens:
        raise ArgumentError(
            f"tokens have length {tokens.numel()} but the window plan was made for {plan.n_tokens}; re-plan"
        )
    ctx, first = plan.ctx, plan.first
    bar = tqdm(total=plan.n_chunks, desc=desc, unit="chunk", disable=not progress_enabled(progress))
    try:
        for i in range(plan.n_chunks):
            chunk = tokens[i * ctx : (i + 1) * ctx]
            ids = chunk.clone()
            if plan.bos_id is not None:
                ids[0] = plan.bos_id
            try:
                with torch.inference_mode():
                    out = logits_fn(ids.unsqueeze(0))  # (1, ctx, V)
            except IndexError as exc:  # an embedding lookup past the vocabulary
                raise ArgumentError(
                    f"the model failed on window {i} (largest token id {int(ids.max())}): {exc}; "
                    "tokenize the text with this model's tokenizer"
                ) from exc
            if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != (1, ctx):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ArgumentError(
                    f"the model returned logits of shape {shape}, expected (1, {ctx}, vocab); "
                    "wrap it so that it maps (1, T) ids to (1, T, V) logits"
                )
            logits = out[0, first : ctx - 1]  # (scored, V)
            targets = chunk[first + 1 : ctx]  # (scored,)
            n_vocab = logits.shape[-1]
            if int(targets.max()) >= n_vocab:
                raise ArgumentError(
                    f"token id {int(targets.max())} is outside the model's vocabulary of {n_vocab}; "
                    "tokenize the text with this model's tokenizer"
                )
            yield i, logits, targets
            bar.update(1)
    finally:
        bar.close()

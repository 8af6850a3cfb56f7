"""Accuracy on a task, and the answers quantization flipped: what perplexity and KLD can hide.

A task file is JSON lines, one item per line:

* multiple choice ``{"prompt": "...", "choices": ["...", ...], "answer": i}``: ``prompt + " " + choice`` is
  tokenized for each choice (BOS first, as the model is run); the tokens every choice's sequence shares
  are the context, the rest are the choice's, and the choice is scored by the log-probability of its
  tokens: their sum (``score="sum"``, the default: lm-eval's ``acc``, no length normalisation) or their
  mean (``score="mean"``: normalised per token, ``llama-perplexity --hellaswag``'s ``acc_norm``, so a task
  of four-choice items written out by :func:`write_hellaswag` gets the same accuracy in llama.cpp). With
  a small vocabulary the mean favours words split into many pieces, whose later pieces are near certain;
* generation ``{"prompt": "...", "answer": "...", "max_tokens": n}`` (``max_tokens`` optional, default 16):
  greedy decoding from ``prompt`` until a newline, the end of sequence or ``max_tokens`` tokens; right when
  the generated text, trimmed, equals ``answer`` trimmed.

A model's *flips* are the items whose answer (the chosen index, or the generated text) differs from the
reference model's on the same item, right or wrong ("Accuracy is Not All You Need", Dutta et al. 2024).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import InputFileError

log = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class ChoiceItem:
    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class GenerationItem:
    prompt: str
    answer: str
    max_tokens: int = DEFAULT_MAX_TOKENS


TaskItem = ChoiceItem | GenerationItem


def load_task(path: str | Path) -> list[TaskItem]:
    """The items of a JSON-lines task file; a malformed line is an :class:`InputFileError` naming it."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"task file {p} does not exist")
    items: list[TaskItem] = []
    for no, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{where}: not JSON ({e.msg}); each line is one item") from None
        items.append(_item(obj, where))
    if not items:
        raise InputFileError(f"task file {p} has no items")
    return items


def _item(obj: Any, where: str) -> TaskItem:
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise InputFileError(f'{where}: an item is an object with a "prompt" string')
    if "choices" in obj:
        choices, answer = obj["choices"], obj.get("answer")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise InputFileError(f'{where}: "choices" is a list of at least two non-empty strings')
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise InputFileError(
                f'{where}: "answer" is the index of the right choice (0..{len(choices) - 1})'
            )
        return ChoiceItem(obj["prompt"], tuple(choices), answer)
    answer = obj.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise InputFileError(f'{where}: a generation item has an "answer" string (or give "choices")')
    max_tokens = obj.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 512:
        raise InputFileError(f'{where}: "max_tokens" is an integer in 1..512')
    return GenerationItem(obj["prompt"], answer, max_tokens)


def task_fingerprint(items: Sequence[TaskItem]) -> str:
    return hashlib.sha256(repr(list(items)).encode()).hexdigest()


@dataclass(frozen=True)
class TaskResult:
    """A model's answers: per item the chosen index (multiple choice) or generated text, and whether right."""

    answers: tuple[int | str, ...]
    correct: tuple[bool, ...]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else float("nan")

    def flips(self, reference: TaskResult) -> int:
        """Items whose answer differs from ``reference``'s."""
        if len(reference.answers) != len(self.answers):
            raise InputFileError("the reference was scored on another task")
        return sum(a != b for a, b in zip(self.answers, reference.answers, strict=True))

    def to_json(self) -> dict[str, Any]:
        return {"answers": list(self.answers), "correct": list(self.correct)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TaskResult:
        return cls(tuple(d["answers"]), tuple(bool(c) for c in d["correct"]))


def _encode(tokenizer: Any, text: str, bos: int | None) -> list[int]:
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return [bos, *ids] if bos is not None else ids


SCORES = ("sum", "mean")


def choice_scores(
    fn: LogitsFn, tokenizer: Any, bos: int | None, item: ChoiceItem, score: str = "sum"
) -> list[float]:
    """Each choice's log-probability after the tokens all choices share: summed over its tokens, or their
    mean (``score="mean"``, llama.cpp's acc_norm)."""
    seqs = [_encode(tokenizer, f"{item.prompt} {c}", bos) for c in item.choices]
    common = 0
    while all(len(s) > common + 1 for s in seqs) and len({s[common] for s in seqs}) == 1:
        common += 1
    # one forward pass for all choices, padded on the right (causal: padding never reaches the scored
    # positions)
    width = max(len(q) for q in seqs)
    batch = torch.tensor([q + [q[-1]] * (width - len(q)) for q in seqs], dtype=torch.long)
    logp_all = torch.log_softmax(fn(batch).double(), dim=-1)
    scores = []
    for row, q in enumerate(seqs):
        targets = torch.tensor(q[common:], dtype=torch.long)
        picked = logp_all[row, common - 1 : len(q) - 1].gather(1, targets[:, None])
        scores.append(float(picked.mean() if score == "mean" else picked.sum()))
    return scores


def generate(fn: LogitsFn, tokenizer: Any, bos: int | None, item: GenerationItem) -> str:
    """Greedy continuation of ``item.prompt`` up to a newline, EOS or ``item.max_tokens`` tokens."""
    ids = _encode(tokenizer, item.prompt, bos)
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for _ in range(item.max_tokens):
        nxt = int(fn(torch.tensor([ids + out], dtype=torch.long))[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        if "\n" in tokenizer.decode(out):
            break
    return str(tokenizer.decode(out)).split("\n")[0]


def run_task(
    fn: LogitsFn, tokenizer: Any, bos: int | None, items: Sequence[TaskItem], score: str = "sum"
) -> TaskResult:
    """Score every item with the model behind ``fn`` (``(1, T)`` ids -> ``(1, T, V)`` logits); multiple
    choice by ``score`` (``sum`` or ``mean``, see the module docstring)."""
    if score not in SCORES:
        raise InputFileError(f"task score {score!r}: choose sum (log-likelihood) or mean (per token)")
    answers: list[int | str] = []
    correct: list[bool] = []
    for item in items:
        if isinstance(item, ChoiceItem):
            scores = choice_scores(fn, tokenizer, bos, item, score)
            pick = max(range(len(scores)), key=lambda i: scores[i])  # the first of equal scores, as llama.cpp
            answers.append(pick)
            correct.append(pick == item.answer)
        else:
            text = generate(fn, tokenizer, bos, item).strip()
            answers.append(text)
            correct.append(text == item.answer.strip())
    return TaskResult(tuple(answers), tuple(correct))


def write_hellaswag(items: Sequence[TaskItem], path: str | Path) -> int:
    """Write the four-choice items in ``llama-perplexity --hellaswag``'s text format (six lines each:
    the prompt, the right choice's index, the four choices); returns how many were written. Items with
    another number of choices, generation items and text holding newlines are refused."""
    lines: list[str] = []
    for n, item in enumerate(items, start=1):
        if not isinstance(item, ChoiceItem) or len(item.choices) != 4:
            raise InputFileError(f"item {n}: llama.cpp's hellaswag format holds four-choice items only")
        fields = [item.prompt, *item.choices]
        if any("\n" in f for f in fields):
            raise InputFileError(f"item {n}: a prompt or choice holds a newline, which the format cannot")
        lines += [item.prompt, str(item.answer), *item.choices]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines) // 6

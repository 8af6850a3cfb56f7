"""Evaluate a model (directory, lowbit output, GGUF) against a reference on a text file.

Glue between the model sources, the torch model builder and the evaluator: tokenization with the
reference's tokenizer, one cached reference per (reference weights, text, ctx, chunks), and bits/weight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import InputFileError
from lowbit.eval.perplexity import EvalResult, evaluate, load_or_build_reference
from lowbit.eval.refcache import Reference, default_cache_dir
from lowbit.eval.tasks import TaskItem, TaskResult, run_task, task_fingerprint
from lowbit.eval.windows import encode_text, read_text_exact, tokenizer_bos_id
from lowbit.export.atomic import atomic_file
from lowbit.formats.activations import LinearActivation
from lowbit.walk.sources import GGUFSource, ModelSource, SafetensorsSource, open_model
from lowbit.walk.torch_model import build_model, logits_fn, threads_for

log = logging.getLogger(__name__)


def model_fingerprint(source: ModelSource) -> str:
    """sha256 over the files that hold ``source``'s weights and config (content, not names)."""
    h = hashlib.sha256()
    files: list[Path]
    if isinstance(source, SafetensorsSource):
        files = sorted(source.path.glob("*.safetensors")) + [source.path / "config.json"]
    else:
        files = [source.path]
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def source_bits_per_weight(source: ModelSource) -> float | None:
    """Bits per weight of the quantized linears (lowbit/compressed-tensors outputs), or of all weights
    for a GGUF file (as llama.cpp reports it); None for an unquantized checkpoint."""
    if isinstance(source, GGUFSource):
        total_bits = sum(int(t.n_bytes) * 8 for t in source.reader.tensors)
        n = sum(int(t.n_elements) for t in source.reader.tensors)
        return total_bits / n if n else None
    bpw = getattr(source, "linear_bits_per_weight", None)
    return float(bpw) if bpw is not None else None


@dataclass(frozen=True)
class EvalSetup:
    """Tokens and reference shared by every model evaluated against one original on one text."""

    tokens: torch.Tensor
    bos_id: int | None
    reference: Reference
    ref_source: ModelSource
    fingerprint: str = ""
    cache_dir: Path | None = None


def prepare_reference(
    ref: str | Path | ModelSource,
    text_file: str | Path,
    ctx: int = 512,
    chunks: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
) -> EvalSetup:
    """Tokenize ``text_file`` with the reference's tokenizer and load or compute the cached reference."""
    ref_source = ref if isinstance(ref, ModelSource) else open_model(ref)
    path = Path(text_file)
    if not path.is_file():
        raise InputFileError(f"text file {path} does not exist")
    text = read_text_exact(path)
    tok = ref_source.tokenizer()
    tokens = encode_text(tok, text)
    bos = tokenizer_bos_id(tok)
    fp = model_fingerprint(ref_source)

    ref_model: Any = None  # built only when the reference is not cached

    def ref_fn(ids: torch.Tensor) -> torch.Tensor:
        nonlocal ref_model
        if ref_model is None:
            ref_model = build_model(ref_source)  # its weights with float inputs, even from a GGUF file
        return logits_fn(ref_model)(ids)

    with threads_for(ref_source.config):
        reference = load_or_build_reference(
            ref_fn, tokens, ctx, chunks, bos, model_fingerprint=fp, cache_dir=cache_dir, progress=progress
        )
    return EvalSetup(
        tokens,
        bos,
        reference,
        ref_source,
        fp,
        Path(cache_dir) if cache_dir is not None else default_cache_dir(),
    )


def llama_cpp_inputs(source: ModelSource) -> dict[str, LinearActivation]:
    """Module name -> the input conversion llama.cpp's CPU backend applies before each matmul of a GGUF
    file (:mod:`lowbit.formats.gguf.dot_input`): every block linear and the output head (the token
    embedding's type where the head is tied). Empty for other sources, and for linears stored in F32.
    Expert linears stacked in one GGUF tensor are left as they are."""
    from lowbit.formats.gguf.dot_input import GGMLDotInput

    if not isinstance(source, GGUFSource):
        return {}
    arch = source.arch
    names = set(source.names())
    out: dict[str, LinearActivation] = {}
    weights = [n for n in source.names() if n.endswith(".weight") and ".experts." not in n]
    for name in weights:
        split = arch.split_block_name(name)
        if split is None or arch.linear_pattern(split[1][: -len(".weight")]) is None:
            continue
        out[name[: -len(".weight")]] = LinearActivation(GGMLDotInput.for_weight(source.info(name).storage))
    head = f"{arch.lm_head}.weight"
    head_from = head if head in names else f"{arch.embed}.weight"
    if head_from in names:
        out[arch.lm_head] = LinearActivation(GGMLDotInput.for_weight(source.info(head_from).storage))
    return {k: a for k, a in out.items() if not isinstance(a.spec, GGMLDotInput) or a.spec.changes_input}


def inputs_label(source: ModelSource, runtime_inputs: bool = True) -> str:
    """How :func:`evaluate_source` multiplies ``source``'s linears: ``"float"``, or the run-time input
    quantizations it applies (``"llama.cpp CPU: Q8_0, Q8_K inputs"``, W8A8's per-token int8, ...)."""
    if isinstance(source, GGUFSource):
        if not runtime_inputs:
            return "float"
        from lowbit.formats.gguf.dot_input import GGMLDotInput

        kinds = {
            a.spec.input_type.name
            for a in llama_cpp_inputs(source).values()
            if isinstance(a.spec, GGMLDotInput)
        }
        return f"llama.cpp CPU: {', '.join(sorted(kinds))} inputs" if kinds else "float"
    labels = sorted({a.spec.label for a in source.activations.values()})
    return "; ".join(labels) if labels else "float"


def evaluate_source(
    setup: EvalSetup,
    model: str | Path | ModelSource,
    weights: Mapping[str, torch.Tensor] | None = None,
    progress: bool | None = None,
    activations: Mapping[str, LinearActivation] | None = None,
    runtime_inputs: bool = True,
) -> EvalResult:
    """Evaluate ``model`` (or ``weights`` on its architecture) against ``setup``'s reference.

    Linears whose inputs are quantized at run time (``activations``; default: what the checkpoint
    says) quantize them during the evaluation, as the runtime does. A GGUF file is judged as llama.cpp
    runs it: each matmul's input converted to its weight type's dot-product type (:func:`llama_cpp_inputs`),
    unless ``runtime_inputs`` is False (its weights alone, with float inputs)."""
    return evaluate_model(setup, model, weights, progress, activations, runtime_inputs)[0]


def evaluate_model(
    setup: EvalSetup,
    model: str | Path | ModelSource,
    weights: Mapping[str, torch.Tensor] | None = None,
    progress: bool | None = None,
    activations: Mapping[str, LinearActivation] | None = None,
    runtime_inputs: bool = True,
    task: Sequence[TaskItem] | None = None,
    task_score: str = "sum",
) -> tuple[EvalResult, TaskResult | None]:
    """:func:`evaluate_source`, and the model's answers on ``task`` (:mod:`lowbit.eval.tasks`) from the
    same built model."""
    source = model if isinstance(model, ModelSource) else open_model(model)
    if activations is None and runtime_inputs and isinstance(source, GGUFSource):
        activations = llama_cpp_inputs(source)
    vocab = int(source.config.get("vocab_size", 0))
    ref_vocab = int(setup.ref_source.config.get("vocab_size", 0))
    if vocab and ref_vocab and vocab != ref_vocab:
        raise InputFileError(
            f"{source.path} has a vocabulary of {vocab}, the reference {setup.ref_source.path} of {ref_vocab}; "
            "evaluate a model against the original it was quantized from"
        )
    torch_model = build_model(source, weights, activations=activations)
    with threads_for(source.config):
        fn = logits_fn(torch_model)
        result = evaluate(fn, setup.reference, progress=progress)
        answers = None
        if task is not None:
            tok = setup.ref_source.tokenizer()
            answers = run_task(fn, tok, tokenizer_bos_id(tok), task, task_score)
    return result, answers


def reference_task(setup: EvalSetup, task: Sequence[TaskItem], task_score: str = "sum") -> TaskResult:
    """The reference model's answers on ``task`` (float inputs), cached beside its logits."""
    cache = None
    if setup.cache_dir is not None and setup.fingerprint:
        key = f"{setup.fingerprint[:16]}-{task_fingerprint(task)[:16]}-{task_score}"
        cache = setup.cache_dir / f"task-{key}.json"
        if cache.is_file():
            return TaskResult.from_json(json.loads(cache.read_text()))
    torch_model = build_model(setup.ref_source, activations={})
    with threads_for(setup.ref_source.config):
        tok = setup.ref_source.tokenizer()
        res = run_task(logits_fn(torch_model), tok, tokenizer_bos_id(tok), task, task_score)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cache, force=True) as tmp:
            tmp.write_text(json.dumps(res.to_json()))
    return res


def task_dict(result: TaskResult, reference: TaskResult, task_score: str = "sum") -> dict[str, Any]:
    """The ``--task`` fields of ``lowbit eval --json``."""
    return {
        "task_scoring": "log-likelihood sum" if task_score == "sum" else "mean log-likelihood per token",
        "task_accuracy": result.accuracy,
        "ref_task_accuracy": reference.accuracy,
        "task_items": len(result.answers),
        "task_flips": result.flips(reference),
    }


def result_dict(result: EvalResult, bpw: float | None) -> dict[str, Any]:
    """The ``lowbit eval --json`` object: the contract fields first, then the rest."""
    d = result.to_json_dict()
    out: dict[str, Any] = {
        "ppl": d["ppl"],
        "ref_ppl": d["ref_ppl"],
        "kld_mean": d["kld_mean"],
        "kld_p99": d["kld_p99"],
        "top1": d["top1"],
        "tokens": d["tokens"],
        "bpw": None if bpw is None or math.isnan(bpw) else bpw,
    }
    out.update({k: v for k, v in d.items() if k not in out})
    return out

"""``lowbit compare``: every candidate scheme made as a real file, judged alike, the Pareto front, a pick.

A *candidate* is a scheme (a GGUF mix such as ``Q4_K_M``, or a Hugging Face scheme such as ``w4g128``,
``nf4``, ``w8a8``) with a method (``rtn``, ``gptq``, ``awq``), written in the scheme's default format by
:func:`lowbit.api.quantize` — the file a user would run, in the runtime that loads it. Each is evaluated
by :func:`lowbit.eval.run.evaluate_source` against one cached reference pass of the original on the
text (a GGUF file as llama.cpp's CPU backend multiplies it; a W8A8 checkpoint with its activations
quantized), and sized for running at ``context`` tokens with :mod:`lowbit.eval.fit`'s KV-cache and
overhead model (the weights are the file's bytes).

Shared work: the reference logits are computed once (and cached on disk, so every worker reads them);
with calibration text, round-to-nearest GGUF candidates share one importance matrix of that text (the
llama-quantize + imatrix recipe). GPTQ and AWQ candidates each calibrate: their statistics depend on
the scheme (sequential calibration runs through the already-quantized blocks).

Every candidate runs in its own worker process (``workers`` at a time), so its quantize time and peak RSS
are its own and a crash in one does not take the sweep down; rows come back in candidate order, so the
result does not depend on ``workers``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lowbit.errors import ArgumentError, LowbitError

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "awq")
PRESETS: dict[str, tuple[str, ...]] = {
    # what llama.cpp users pick from (llama-quantize's table), small to large
    "local": ("Q2_K", "Q3_K_M", "Q4_0", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"),
    # what transformers / vLLM users pick from
    "gpu": ("w4g128", "w4g128-asym", "nf4", "fp4", "w8", "w8a8", "fp8", "int8"),
}
PRESETS["all"] = PRESETS["local"] + PRESETS["gpu"]
#: output format -> the runtimes that load it
RUNTIMES: dict[str, str] = {
    "gguf": "llama.cpp",
    "compressed-tensors": "vLLM / transformers",
    "gptq": "transformers (GPTQModel) / vLLM",
    "awq": "transformers / vLLM",
    "bnb": "transformers (bitsandbytes)",
}


@dataclass(frozen=True)
class Candidate:
    """One file to make: ``scheme`` quantized by ``method`` and written as ``fmt``."""

    scheme: str
    method: str = "rtn"
    fmt: str = "gguf"

    @property
    def name(self) -> str:
        return self.scheme if self.method == "rtn" else f"{self.scheme}+{self.method}"

    @property
    def runtime(self) -> str:
        return RUNTIMES.get(self.fmt, self.fmt)

    @property
    def filename(self) -> str:
        safe = self.name.replace("+", "-")
        return f"{safe}.gguf" if self.fmt == "gguf" else safe


@dataclass(frozen=True)
class RunTarget:
    """The machine a file should run on: ``memory`` bytes for ``context`` tokens x ``batch`` sequences
    with a ``kv`` KV cache (llama.cpp's ``--cache-type-k/v`` names)."""

    memory: int | None = None
    context: int = 4096
    batch: int = 1
    kv: str = "f16"

    def __post_init__(self) -> None:
        if self.memory is not None and self.memory <= 0:
            raise ArgumentError(f"memory must be positive, not {self.memory}")
        if self.context <= 0 or self.batch <= 0:
            raise ArgumentError(f"context and batch must be positive, not {self.context} and {self.batch}")


@dataclass(frozen=True)
class CompareConfig:
    """What every candidate shares: the evaluation text and windows, the calibration, the target."""

    text: Path
    calib: Path | None = None
    samples: int = 128
    seqlen: int = 512
    ctx: int = 512
    chunks: int | None = None
    target: RunTarget = field(default_factory=RunTarget)
    workers: int = 1
    cache_dir: Path | None = None
    task: Path | None = None
    task_score: str = "sum"


def plan_candidates(schemes: Iterable[str], methods: Iterable[str]) -> tuple[list[Candidate], list[str]]:
    """The candidates of ``schemes`` x ``methods`` (each scheme in its default format), and one note per
    combination that does not exist (a method on a scheme it cannot drive). Unknown schemes and methods
    are a :class:`SchemeError` / :class:`ArgumentError`."""
    from lowbit.schemes import GGUF_FORMAT, gguf_mix_name, parse_scheme

    methods = [m.strip().lower() for m in methods if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ArgumentError(
            f"unknown method {', '.join(bad) or '(none)'}; compare takes {', '.join(METHODS)}"
        )
    out: list[Candidate] = []
    notes: list[str] = []
    seen: set[Candidate] = set()
    for raw in schemes:
        if not raw.strip():
            continue
        mix = gguf_mix_name(raw)
        if mix is not None and mix not in ("F16", "BF16", "F32"):
            name, fmt, calibrated = parse_scheme(mix, GGUF_FORMAT).name, GGUF_FORMAT, True
        else:
            sch = parse_scheme(raw)
            name, fmt = sch.name, sch.default_format
            # GPTQ and AWQ drive weight codecs; schemes that also quantize activations, and the float
            # formats of bitsandbytes, are made by round-to-nearest alone
            calibrated = sch.activations is None and fmt != "bnb"
        for method in methods:
            if method != "rtn" and not calibrated:
                notes.append(f"{name}: {method} does not apply (made by round-to-nearest only)")
                continue
            cand = Candidate(name, method, fmt)
            if cand not in seen:
                seen.add(cand)
                out.append(cand)
    if not out:
        raise ArgumentError("no candidates: give --schemes or --preset and --methods")
    return out, notes


def expand_schemes(schemes: str | None, preset: str | None) -> list[str]:
    """``--schemes`` (comma-separated) or ``--preset local|gpu|all`` (default: all)."""
    if schemes and preset:
        raise ArgumentError("give --schemes or --preset, not both")
    if schemes:
        return [s.strip() for s in schemes.split(",") if s.strip()]
    key = (preset or "all").strip().lower()
    if key not in PRESETS:
        raise ArgumentError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return list(PRESETS[key])


# ----------------------------------------------------------------------------------------- one row
@dataclass(frozen=True)
class _Job:
    index: int
    candidate: Candidate
    model: str
    out: Path
    config: CompareConfig
    imatrix: Path | None
    threads: int


def _run_job(job: _Job) -> dict[str, Any]:
    """Make and evaluate one candidate (in a worker process): its row, or its error."""
    import torch

    from lowbit.api import quantize
    from lowbit.eval.run import evaluate_model, inputs_label, prepare_reference, reference_task, task_dict
    from lowbit.eval.tasks import load_task
    from lowbit.walk.calibrate import CalibConfig
    from lowbit.walk.sources import open_model

    torch.set_num_threads(job.threads)
    cand, cfg = job.candidate, job.config
    row: dict[str, Any] = {
        "name": cand.name,
        "scheme": cand.scheme,
        "method": cand.method,
        "format": cand.fmt,
        "runtime": cand.runtime,
        "file": str(job.out),
    }
    calib = None
    if cand.method != "rtn":
        assert cfg.calib is not None
        calib = CalibConfig(cfg.calib, samples=cfg.samples, seqlen=cfg.seqlen)
    imatrix = job.imatrix if cand.method == "rtn" and cand.fmt == "gguf" else None
    try:
        rep = quantize(
            job.model, cand.scheme, job.out, method=cand.method, fmt=cand.fmt, progress=False,
            calib=calib, imatrix=imatrix,
        )  # fmt: skip
        setup = prepare_reference(job.model, cfg.text, cfg.ctx, cfg.chunks, cfg.cache_dir, progress=False)
        source = open_model(job.out)
        t0 = time.perf_counter()
        task = load_task(cfg.task) if cfg.task is not None else None
        res, answers = evaluate_model(setup, source, progress=False, task=task, task_score=cfg.task_score)
        if task is not None and answers is not None:
            row.update(task_dict(answers, reference_task(setup, task, cfg.task_score), cfg.task_score))
        row.update(
            file_bytes=rep.file_bytes,
            bpw=8 * rep.file_bytes / _n_params(setup.ref_source),
            linear_bpw=_finite(rep.linear_bits_per_weight),
            quantize_s=round(rep.seconds, 3),
            quantize_peak_rss_bytes=rep.peak_rss_bytes,
            eval_s=round(time.perf_counter() - t0, 3),
            method_label=rep.method + (" (shared imatrix)" if imatrix is not None else ""),
            inputs=inputs_label(source),
            ppl=res.ppl,
            ppl_stderr=res.ppl_stderr,
            ref_ppl=res.ref_ppl,
            delta_ppl=res.delta_ppl,
            delta_ppl_stderr=res.delta_ppl_stderr,
            kld_mean=res.kld_mean,
            kld_stderr=res.kld_stderr,
            kld_p99=res.kld_p99,
            top1=res.top1,
            tokens=res.tokens,
        )
    except LowbitError as e:
        row["error"] = str(e)
    return row


def _n_params(source: Any) -> int:
    return sum(math.prod(source.info(n).shape) for n in source.names())


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


# ------------------------------------------------------------------------------------ the comparison
@dataclass(frozen=True)
class CompareReport:
    model: str
    rows: tuple[dict[str, Any], ...]
    recommended: dict[str, Any] | None
    recommended_by_runtime: dict[str, dict[str, Any]]
    notes: tuple[str, ...]
    target: RunTarget
    text: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "text": self.text,
            "memory_bytes": self.target.memory,
            "context": self.target.context,
            "batch": self.target.batch,
            "kv_type": self.target.kv,
            "seconds": round(self.seconds, 2),
            "rows": [_json_safe(r) for r in self.rows],
            "recommended": self.recommended,
            "recommended_by_runtime": self.recommended_by_runtime,
            "notes": list(self.notes),
        }


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def pareto(rows: Sequence[dict[str, Any]]) -> None:
    """Mark each evaluated row ``pareto`` (no other row is both no larger and no worse in KLD, and better
    in one) or ``dominated_by`` the dominating row with the lowest KLD (ties: the smaller file)."""
    ok = [r for r in rows if "kld_mean" in r]
    for r in ok:
        doms = [
            o
            for o in ok
            if o is not r
            and o["file_bytes"] <= r["file_bytes"]
            and o["kld_mean"] <= r["kld_mean"]
            and (o["file_bytes"] < r["file_bytes"] or o["kld_mean"] < r["kld_mean"])
        ]
        r["pareto"] = not doms
        r["dominated_by"] = (
            min(doms, key=lambda o: (o["kld_mean"], o["file_bytes"]))["name"] if doms else None
        )


def size_for_target(rows: Sequence[dict[str, Any]], model: str, target: RunTarget) -> None:
    """Add the memory to run each row at ``target`` (file bytes + KV cache + overhead, as ``lowbit fit``),
    whether it fits, and the longest context that would."""
    from lowbit.eval.fit import OverheadModel, kv_bytes_per_token, kv_type, load_model, max_context

    fm = load_model(model)
    config = fm.config
    per_token = kv_bytes_per_token(config, kv_type(target.kv)) * target.batch
    kv = per_token * target.context
    overhead = OverheadModel().bytes(config, target.batch)
    for r in rows:
        if "file_bytes" not in r:
            continue
        r["kv_bytes"] = kv
        r["overhead_bytes"] = overhead
        r["run_bytes"] = r["file_bytes"] + kv + overhead
        if target.memory is not None:
            r["fits"] = r["run_bytes"] <= target.memory
            r["max_context"] = max_context(
                target.memory, r["file_bytes"], overhead, per_token, config.max_context
            )
        else:
            r["fits"] = None


def recommend(
    rows: Sequence[dict[str, Any]], target: RunTarget
) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """With a memory size: the fitting row with the lowest KLD, overall and per runtime, each with one line
    of reasons; when nothing fits, the smallest row and the context that would fit it."""
    from lowbit.eval.fit import format_bytes

    if target.memory is None:
        return None, {}
    memory: int = target.memory
    ok = [r for r in rows if "run_bytes" in r]
    if not ok:
        return None, {}

    def pick(cands: list[dict[str, Any]]) -> dict[str, Any]:
        fitting = [r for r in cands if r["fits"]]
        if fitting:
            best = min(fitting, key=lambda r: (r["kld_mean"], r["file_bytes"]))
            spare = memory - best["run_bytes"]
            why = (
                f"{best['name']} for {best['runtime']}: {format_bytes(best['file_bytes'])} + "
                f"{format_bytes(best['kv_bytes'])} KV at {target.context} tokens + "
                f"{format_bytes(best['overhead_bytes'])} overhead fits {format_bytes(memory)} "
                f"with {format_bytes(spare)} to spare; KLD {best['kld_mean']:.4g}, top-1 {100 * best['top1']:.1f}%"
            )
            if "task_flips" in best:
                why += (
                    f"; {100 * best['task_flips'] / best['task_items']:.1f}% of answers flipped on your task "
                    f"(accuracy {100 * best['task_accuracy']:.1f}%, original {100 * best['ref_task_accuracy']:.1f}%)"
                )
            return {"name": best["name"], "fits": True, "reason": why}
        small = min(cands, key=lambda r: r["run_bytes"])
        ctx = small["max_context"]
        why = (
            f"nothing for {small['runtime']} fits {format_bytes(memory)} at {target.context} tokens "
            f"(smallest: {small['name']}, {format_bytes(small['run_bytes'])}); "
            + (
                f"{small['name']} fits at {ctx} tokens of context"
                if ctx > 0
                else "not even its weights and the runtime's overhead fit"
            )
        )
        return {"name": small["name"], "fits": False, "reason": why, "max_context": ctx}

    by_runtime: dict[str, dict[str, Any]] = {}
    for runtime in dict.fromkeys(r["runtime"] for r in ok):
        by_runtime[runtime] = pick([r for r in ok if r["runtime"] == runtime])
    return pick(ok), by_runtime


def compare(
    model: str | Path,
    candidates: Sequence[Candidate],
    config: CompareConfig,
    out_dir: Path,
    notes: Sequence[str] = (),
    progress: bool | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> CompareReport:
    """Make, evaluate and size every candidate; files go to ``out_dir/files``. See the module docstring."""
    from lowbit.eval.run import prepare_reference

    t0 = time.perf_counter()
    model_s = str(model)
    if any(c.method != "rtn" for c in candidates) and config.calib is None:
        raise ArgumentError("GPTQ and AWQ candidates need calibration text: pass --calib FILE")
    if config.workers < 1:
        raise ArgumentError(f"--workers must be at least 1, not {config.workers}")
    files = out_dir / "files"
    files.mkdir(parents=True, exist_ok=True)
    cache = config.cache_dir or out_dir / "cache"
    config = replace(config, cache_dir=cache)
    # the reference once, in this process: the workers read it (and its task answers) from the cache
    setup = prepare_reference(model_s, config.text, config.ctx, config.chunks, cache, progress=progress)
    if config.task is not None:
        from lowbit.eval.run import reference_task
        from lowbit.eval.tasks import load_task

        reference_task(setup, load_task(config.task), config.task_score)
    imatrix = _shared_imatrix(model_s, candidates, config, out_dir, progress)
    workers = min(config.workers, len(candidates))
    threads = max(1, (os.cpu_count() or 1) // workers)
    jobs = [
        _Job(i, c, model_s, files / c.filename, config, imatrix, threads) for i, c in enumerate(candidates)
    ]
    for j in jobs:
        if j.out.exists():
            raise ArgumentError(f"{j.out} exists: compare into a new directory, or pass --force")
    rows = _run_all(jobs, workers, progress, on_row)
    size_for_target(rows, model_s, config.target)
    pareto(rows)
    best, by_runtime = recommend(rows, config.target)
    for r in rows:
        r["recommended"] = best is not None and best["fits"] and r["name"] == best["name"]
    return CompareReport(
        model=model_s,
        rows=tuple(rows),
        recommended=best,
        recommended_by_runtime=by_runtime,
        notes=tuple(notes),
        target=config.target,
        text=str(config.text),
        seconds=time.perf_counter() - t0,
    )


def _shared_imatrix(
    model: str, candidates: Sequence[Candidate], config: CompareConfig, out_dir: Path, progress: bool | None
) -> Path | None:
    """One importance matrix of the calibration text for every round-to-nearest GGUF candidate."""
    if config.calib is None or not any(c.method == "rtn" and c.fmt == "gguf" for c in candidates):
        return None
    from lowbit.calib.imatrix import ImatrixConfig, ImatrixFormat, compute_imatrix, text_tokens, write_imatrix
    from lowbit.walk.sources import open_model

    path = out_dir / "imatrix.gguf"
    with open_model(model) as source:
        tokens, bos = text_tokens(source, config.calib)
        chunks = min(config.samples, max(1, tokens.numel() // config.seqlen))
        im = compute_imatrix(
            source, tokens, bos, ImatrixConfig(ctx=config.seqlen, chunks=chunks), dataset=str(config.calib),
            progress=progress,
        )  # fmt: skip
    write_imatrix(im, path, ImatrixFormat.GGUF, force=True)
    return path


def _preload() -> list[str]:
    """The modules a worker needs that this process has imported: lowbit's and its libraries'."""
    import sys

    roots = (
        "torch",
        "transformers",
        "tokenizers",
        "safetensors",
        "gguf",
        "numpy",
        "lowbit",
        "compressed_tensors",
    )
    wanted = ["torch", "transformers", "lowbit.api", "lowbit.eval.run"]
    return wanted + sorted(m for m in list(sys.modules) if m.split(".")[0] in roots and m not in wanted)


def _run_all(
    jobs: Sequence[_Job], workers: int, progress: bool | None, on_row: Callable[[dict[str, Any]], None] | None
) -> list[dict[str, Any]]:
    import multiprocessing

    from tqdm import tqdm

    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc="compare", unit="file", disable=progress is False)
    # A fork server that imported the libraries once forks a fresh worker per candidate: fast to start,
    # and safe (it never ran torch's thread pools, which a fork of this process would inherit broken).
    # It imports what this process has (transformers loads its model and tokenizer classes lazily:
    # seconds per worker otherwise).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_preload())
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1) as pool:
            futures = {pool.submit(_run_job, j): j for j in jobs}
            pending = set(futures)
            from concurrent.futures import FIRST_COMPLETED, wait

            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    job = futures[f]
                    try:
                        row = f.result()
                    except Exception as e:  # a worker that died (out of memory, a crash): the row says so
                        row = {"name": job.candidate.name, "scheme": job.candidate.scheme,
                               "method": job.candidate.method, "format": job.candidate.fmt,
                               "runtime": job.candidate.runtime, "error": f"worker failed: {e}"}  # fmt: skip
                    rows[job.index] = row
                    bar.set_postfix_str(job.candidate.name)
                    bar.update(1)
                    if "error" in row:
                        log.warning("%s: %s", job.candidate.name, row["error"])
                    if on_row is not None:
                        on_row(row)
    finally:
        bar.close()
    return [r for r in rows if r is not None]

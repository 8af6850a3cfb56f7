"""``lowbit compare MODEL --text FILE [--calib FILE] [--schemes ... | --preset local|gpu|all]
[--methods rtn,gptq,awq] [--memory 8GiB --context 8192] [--workers N] -o DIR [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "compare",
        help="make every candidate scheme as a real file, measure each, mark the Pareto front, recommend one",
        description="Quantizes MODEL with every candidate (scheme x method) into its real format (GGUF for "
        "llama.cpp, compressed-tensors / GPTQ / AWQ / bitsandbytes for transformers and vLLM), evaluates each "
        "against the original on --text with one cached reference pass, sizes each for running at --context, "
        "and writes DIR/results.json, DIR/pareto.png and DIR/report.html (the candidate files in DIR/files).",
    )
    p.add_argument("model", help="the original: a Hugging Face directory or a GGUF file")
    p.add_argument("--text", required=True, help="UTF-8 text to evaluate on")
    p.add_argument(
        "--calib", default=None, help="calibration text: GPTQ/AWQ, and one imatrix for the GGUF mixes"
    )
    p.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--schemes", default=None, help="comma-separated schemes (Q4_K_M, w4g128, nf4, w8a8, ...)")
    p.add_argument("--preset", default=None, help="local (GGUF mixes), gpu (HF formats) or all (default)")
    p.add_argument("--methods", default="rtn", help="comma-separated: rtn, gptq, awq (default rtn)")
    p.add_argument("--memory", default=None, help="memory to run in (8GiB, 16GB, ...): recommend what fits")
    p.add_argument("--context", type=int, default=4096, help="context to run at, tokens (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences run together (default 1)")
    p.add_argument("--kv-type", default="f16", help="KV cache type (f16, q8_0, q4_0, ...; default f16)")
    p.add_argument("--ctx", type=int, default=512, help="evaluation window, tokens (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="evaluation windows (default: all)")
    p.add_argument(
        "--task", default=None, help="JSON-lines task (see lowbit eval --task): accuracy and flips per row"
    )
    p.add_argument(
        "--task-score", choices=("sum", "mean"), default="sum", help="multiple-choice scoring (default sum)"
    )
    p.add_argument("--workers", type=int, default=1, help="candidates made at once (default 1)")
    p.add_argument("--cache-dir", default=None, help="reference logits cache (default DIR/cache)")
    p.add_argument("-o", "--output", required=True, help="directory for the report and the files")
    p.add_argument("--force", action="store_true", help="write into DIR even if it holds a comparison")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lowbit.errors import ArgumentError, InputFileError
    from lowbit.eval.compare import CompareConfig, RunTarget, compare, expand_schemes, plan_candidates
    from lowbit.eval.fit import kv_type, parse_memory
    from lowbit.eval.report import text_table, write_report

    out = Path(args.output)
    text = Path(args.text)
    if not text.is_file():
        raise InputFileError(f"text file {text} does not exist")
    calib = Path(args.calib) if args.calib else None
    if calib is not None and not calib.is_file():
        raise InputFileError(f"calibration text {calib} does not exist")
    if not Path(args.model).exists():
        raise InputFileError(f"model {args.model} does not exist")
    kv_type(args.kv_type)
    task = Path(args.task) if args.task else None
    if task is not None:
        from lowbit.eval.tasks import load_task

        load_task(task)  # a malformed line fails here, before any file is made
    target = RunTarget(
        memory=parse_memory(args.memory) if args.memory else None,
        context=args.context,
        batch=args.batch,
        kv=args.kv_type,
    )
    candidates, notes = plan_candidates(expand_schemes(args.schemes, args.preset), args.methods.split(","))
    if calib is None and any(c.method != "rtn" for c in candidates):
        raise ArgumentError("GPTQ and AWQ candidates need calibration text: pass --calib FILE")
    if args.workers < 1:
        raise ArgumentError(f"--workers must be at least 1, not {args.workers}")
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"{out} is a file; -o takes a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ArgumentError(f"{out} is not empty: compare into a new directory, or pass --force")
    if args.force and (out / "files").is_dir():
        import shutil

        shutil.rmtree(out / "files")
    out.mkdir(parents=True, exist_ok=True)
    config = CompareConfig(
        text=text,
        calib=calib,
        samples=args.samples,
        seqlen=args.seqlen,
        ctx=args.ctx,
        chunks=args.chunks,
        target=target,
        workers=args.workers,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        task=task,
        task_score=args.task_score,
    )
    report = compare(
        args.model, candidates, config, out, notes=notes, progress=None if not args.json else False
    )
    paths = write_report(report, out)
    if args.json:
        print(json.dumps(report.to_json()))
        return 0
    print(text_table(report))
    print(f"\n{paths['report']} (table and plot), {paths['results']}, {paths['plot']}", file=sys.stdout)
    return 0

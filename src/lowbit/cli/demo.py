"""``lowbit demo``: lowbit's main job on the bundled model, end to end, in about a minute.

``lowbit compare`` on the bundled tiny256 (a 5 M-parameter Llama trained for this project, every width a
multiple of 256, so llama.cpp's k-quants apply): GGUF mixes for llama.cpp beside the Hugging Face formats
for transformers and vLLM, each made as a real file and judged against the original on TinyStories text
the model never saw in training; the table with the Pareto front, a recommendation for a small memory,
and the report (``DIR/report.html``).
"""

from __future__ import annotations

import argparse
import json
import re
from importlib.resources import files
from pathlib import Path

DEFAULT_SCHEMES = (
    "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K",
    "w8a8", "fp8", "int8", "w4g128", "w4g64-asym", "nf4",
)  # fmt: skip
#: tiny256 was trained on the first 3,872 blank-line blocks of the bundled TinyStories text; the demo
#: evaluates on the rest (a few blocks of margin) and calibrates on the start
HELD_OUT_FROM = 3880
CALIB_BLOCKS = 600
DEFAULT_OUTPUT = "lowbit-demo"


def bundled_model() -> Path:
    return Path(str(files("lowbit") / "assets" / "models" / "tiny256"))


def bundled_text() -> Path:
    return Path(str(files("lowbit") / "assets" / "text" / "tinystories-val.txt"))


def bundled_task() -> Path:
    return Path(str(files("lowbit") / "assets" / "tasks" / "tinystories-mc.jsonl"))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="compare GGUF and Hugging Face schemes on the bundled model: table, Pareto front, report",
        description="lowbit compare on the bundled tiny256 with held-out TinyStories text.",
    )
    p.add_argument("--model", default=None, help="model to use instead of the bundled tiny256")
    p.add_argument("--text", default=None, help="evaluation text instead of held-out TinyStories")
    p.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES), help="comma-separated schemes")
    p.add_argument("--methods", default="rtn", help="rtn, gptq, awq (default rtn)")
    p.add_argument("--memory", default="72MiB", help="memory to recommend for (default 72MiB)")
    p.add_argument("--context", type=int, default=512, help="context to run at (default 512)")
    p.add_argument("--ctx", type=int, default=256, help="evaluation window (default 256)")
    p.add_argument("--chunks", type=int, default=40, help="evaluation windows (default 40)")
    p.add_argument("--workers", type=int, default=1, help="candidates made at once (default 1)")
    p.add_argument(
        "-o", "--output", default=DEFAULT_OUTPUT, help=f"report directory (default ./{DEFAULT_OUTPUT})"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with every row")
    p.set_defaults(func=run)


def demo_texts(out: Path) -> tuple[Path, Path]:
    """The held-out evaluation text and the calibration text, cut from the bundled TinyStories."""
    blocks = re.split(r"\n\s*\n", bundled_text().read_text(encoding="utf-8"))
    text, calib = out / "heldout.txt", out / "calib.txt"
    text.write_text("\n\n".join(blocks[HELD_OUT_FROM:]), encoding="utf-8")
    calib.write_text("\n\n".join(blocks[:CALIB_BLOCKS]), encoding="utf-8")
    return text, calib


def run(args: argparse.Namespace) -> int:
    import shutil

    from lowbit.errors import ArgumentError
    from lowbit.eval.compare import CompareConfig, RunTarget, compare, plan_candidates
    from lowbit.eval.fit import parse_memory
    from lowbit.eval.report import text_table, write_report

    out = Path(args.output)
    candidates, notes = plan_candidates(args.schemes.split(","), args.methods.split(","))
    target = RunTarget(memory=parse_memory(args.memory), context=args.context)
    # the demo's own directory is replaced; anything else is left alone
    if out.exists() and any(out.iterdir()) and not (out / "results.json").is_file():
        raise ArgumentError(f"{out} exists and is not a lowbit demo directory; pass -o NEW_DIR")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    text, calib = demo_texts(out)
    if args.text:
        text = Path(args.text)
    model = Path(args.model) if args.model else bundled_model()
    config = CompareConfig(
        text=text, calib=calib, samples=32, seqlen=256, ctx=args.ctx, chunks=args.chunks, target=target,
        workers=args.workers, task=None if args.model else bundled_task(),
    )  # fmt: skip
    report = compare(model, candidates, config, out, notes=notes, progress=False if args.json else None)
    paths = write_report(report, out)
    if args.json:
        print(json.dumps(report.to_json()))
        return 0
    ok = [r for r in report.rows if "tokens" in r]
    head = f"lowbit demo: {model.name} on held-out TinyStories, ctx {args.ctx}"
    if ok:
        head += f", {ok[0]['tokens']} tokens scored, reference PPL {ok[0]['ref_ppl']:.3f}"
    print(head)
    print(text_table(report))
    print(f"\nreport: {paths['report']}  ({report.seconds:.0f} s)")
    return 0

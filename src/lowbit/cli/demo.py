"""``lowbit demo``: lowbit's main job on the bundled model, end to end, in about a minute.

Quantizes the bundled stories260K with several schemes, writes each in its real format where lowbit
writes that format (and evaluates the written file through lowbit's reader), evaluates every result
against the original on the bundled TinyStories text, and prints one table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

DEFAULT_SCHEMES = (
    "w8", "w8a8", "int8", "fp8", "w4", "w4-asym", "w4g32", "w3-asym", "w2g32-asym", "nf4", "nf4-dq", "fp4",
)  # fmt: skip


def bundled_model() -> Path:
    return Path(str(files("lowbit") / "assets" / "models" / "stories260K"))


def bundled_text() -> Path:
    return Path(str(files("lowbit") / "assets" / "text" / "tinystories-val.txt"))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="quantize the bundled model with several schemes and compare them")
    p.add_argument("--model", default=None, help="model to use instead of the bundled stories260K")
    p.add_argument("--text", default=None, help="evaluation text instead of the bundled TinyStories sample")
    p.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES), help="comma-separated schemes")
    p.add_argument("--ctx", type=int, default=256, help="evaluation window (default 256)")
    p.add_argument("--chunks", type=int, default=40, help="evaluation windows (default 40)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every row")
    p.set_defaults(func=run)


def run_scheme(setup: Any, name: str, workdir: Path) -> dict[str, Any]:
    """One row of the demo table: write ``name`` in its format where lowbit can and evaluate the written
    checkpoint; where the format cannot hold it (yet), evaluate the in-memory simulation and say why."""
    from lowbit.api import quantize, simulate_scheme
    from lowbit.errors import ShapeError
    from lowbit.eval.run import evaluate_source, result_dict
    from lowbit.export.hf_checkpoint import available_formats
    from lowbit.schemes import parse_scheme
    from lowbit.walk.sources import open_model

    scheme = parse_scheme(name)
    original = setup.ref_source
    t0 = time.perf_counter()
    reason = f"{scheme.default_format} output is not written yet"
    if scheme.default_format in available_formats():
        try:
            report = quantize(original, scheme.name, workdir / scheme.name, progress=False)
        except ShapeError as e:  # the format cannot hold this layout: show the codec's quality anyway
            reason = str(e).split(";")[0]
        else:
            result = evaluate_source(setup, open_model(report.output), progress=False)
            return {
                "scheme": scheme.name,
                **result_dict(result, report.linear_bits_per_weight),
                "file_bytes": report.file_bytes,
                "written_as": scheme.default_format,
                "seconds": round(time.perf_counter() - t0, 2),
            }
    weights, stats = simulate_scheme(original, scheme.name)
    result = evaluate_source(setup, original, weights=weights, progress=False, activations=stats.activations)
    return {
        "scheme": scheme.name,
        **result_dict(result, stats.linear_bits_per_weight),
        "file_bytes": (stats.quantized_bits + stats.other_bits) // 8,
        "written_as": f"simulated: {reason}",
        "seconds": round(time.perf_counter() - t0, 2),
    }


def run(args: argparse.Namespace) -> int:
    from lowbit.eval.run import prepare_reference

    model = Path(args.model) if args.model else bundled_model()
    text = Path(args.text) if args.text else bundled_text()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as tmp:
        setup = prepare_reference(
            model, text, args.ctx, args.chunks, cache_dir=Path(tmp) / "cache", progress=False
        )
        rows = [run_scheme(setup, s.strip(), Path(tmp)) for s in args.schemes.split(",") if s.strip()]
    if args.json:
        print(json.dumps({"model": str(model), "text": str(text), "ctx": args.ctx, "rows": rows}))
        return 0
    if not rows:
        print("no schemes given")
        return 0
    print(
        f"lowbit demo: {model.name} on {text.name}, ctx {args.ctx}, {rows[0]['tokens']} tokens scored, "
        f"reference PPL {rows[0]['ref_ppl']:.4f}"
    )
    header = f"{'scheme':<12} {'bits/w':>7} {'size KB':>9} {'PPL':>8} {'ΔPPL':>8} {'KLD':>9} {'top-1':>7}  written as"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['scheme']:<12} {r['bpw']:>7.3f} {r['file_bytes'] / 1024:>9.1f} {r['ppl']:>8.4f} "
            f"{r['delta_ppl']:>+8.4f} {r['kld_mean']:>9.5f} {100 * r['top1']:>6.2f}%  {r['written_as']}"
        )
    print(
        f"({time.perf_counter() - t_start:.1f} s; bits/w: codes + scales + zeros of the quantized linears; "
        "size: the checkpoint's weights file)",
        file=sys.stderr,
    )
    return 0

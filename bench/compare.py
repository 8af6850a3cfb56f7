"""``lowbit compare`` on SmolLM2-135M: a sweep of GGUF mixes and Hugging Face schemes, and what it saves.

The sweep: ``lowbit compare`` of SmolLM2 (its package's Q4_1 GGUF, as every SmolLM2 bench reads it) with
``--schemes`` (default 17 candidates in 3 formats: 11 llama.cpp mixes, compressed-tensors W8A8 / FP8 /
W4 g64 / W4 g64 asym, bitsandbytes NF4 / LLM.int8()), calibrated on the WikiText-2 calibration half (one
importance matrix for the mixes), evaluated on WikiText-2 test (ctx 512, ``--chunks`` 40), sized for
8 GiB at 4096 tokens, with the bundled 40-item general-knowledge task (accuracy and flips per row). Its wall time is set against the same work done as separate commands, as without
``compare``: for each candidate ``lowbit quantize`` (the mixes with ``--calib``, each computing its own
importance matrix) then ``lowbit eval`` (with one reference cache for all, as ``eval``'s default cache
gives). Both runs' rows must agree (same files, same evaluator); the table has compare's rows.
Results: ``bench/results/compare_smollm2.json``, with the compare directory's ``results.json`` inside.

Usage: python bench/compare.py [--schemes Q4_K_M,...] [--chunks 40] [--samples 128] [--workers 1] [--no-separate]
       [--no-task]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import last_json_line, print_table, run_measured, shared_path, smollm2_gguf, write_results

SCHEMES = (
    "Q2_K,Q3_K_S,Q3_K_M,Q4_0,IQ4_XS,Q4_K_S,Q4_K_M,Q5_K_S,Q5_K_M,Q6_K,Q8_0,w4g64,w4g64-asym,nf4,w8a8,fp8,int8"
)
TEXT = "data/text/wikitext-2-raw-test.txt"
TASK = (
    Path(__file__).resolve().parents[1] / "src" / "lowbit" / "assets" / "tasks" / "general-knowledge-mc.jsonl"
)
CALIB = "data/text/wikitext-2-raw-test-calib.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-separate", action="store_true", help="skip the one-command-at-a-time baseline")
    ap.add_argument("--no-task", action="store_true", help="without the general-knowledge task")
    args = ap.parse_args()
    model = smollm2_gguf()
    text, calib = shared_path(TEXT), shared_path(CALIB)
    lowbit = [sys.executable, "-m", "lowbit", "-q"]
    with tempfile.TemporaryDirectory(prefix="lowbit-compare-") as tmp_s:
        tmp = Path(tmp_s)
        out = tmp / "cmp"
        argv = [*lowbit, "compare", str(model), "--text", str(text), "--calib", str(calib)]
        argv += ["--samples", str(args.samples), "--chunks", str(args.chunks), "--schemes", args.schemes]
        argv += [
            "--memory",
            "8GiB",
            "--context",
            "4096",
            "--workers",
            str(args.workers),
            "-o",
            str(out),
            "--json",
        ]
        m = run_measured(argv)
        report = last_json_line(m.stdout)
        result: dict[str, Any] = {
            "model": "SmolLM2-135M (its package's Q4_1 GGUF)",
            "eval": f"WikiText-2 test, ctx 512 x {args.chunks} chunks",
            "calibration": f"WikiText-2 calibration half, {args.samples} x 512",
            "candidates": len(report["rows"]),
            "formats": sorted({r["format"] for r in report["rows"]}),
            "compare_wall_s": m.seconds,
            "compare_peak_rss_mib": m.peak_rss_bytes / 2**20,
            "workers": args.workers,
            "task": None if args.no_task else TASK.name,
            "report": report,
        }
        print(f"compare: {len(report['rows'])} candidates in {m.seconds:.0f} s", flush=True)
        write_results("compare_smollm2", result)  # again below, with the baseline
        if not args.no_separate:
            t0 = time.perf_counter()
            cache = tmp / "cache"
            diffs = []
            for r in report["rows"]:
                if "error" in r:
                    continue
                f = tmp / "sep" / Path(r["file"]).name
                f.parent.mkdir(exist_ok=True)
                q = [*lowbit, "quantize", str(model), "--scheme", r["scheme"], "-o", str(f)]
                if r["format"] == "gguf":
                    q += ["--calib", str(calib), "--samples", str(args.samples)]
                run_measured(q)
                e = [*lowbit, "eval", str(f), "--ref", str(model), "--text", str(text), "--ctx", "512"]
                e += ["--chunks", str(args.chunks), "--cache-dir", str(cache), "--json"]
                kld = last_json_line(run_measured(e).stdout)["kld_mean"]
                diffs.append(abs(kld / r["kld_mean"] - 1))
                print(f"  separately: {r['name']} KLD {kld:.5f} (compare {r['kld_mean']:.5f})", flush=True)
            result["separate_wall_s"] = time.perf_counter() - t0
            result["speedup"] = result["separate_wall_s"] / m.seconds
            result["max_kld_rel_diff_vs_separate"] = max(diffs) if diffs else None
            print(
                f"separately: {result['separate_wall_s']:.0f} s ({result['speedup']:.2f}x compare's)",
                flush=True,
            )
    write_results("compare_smollm2", result)
    print_table(
        [r for r in report["rows"] if "error" not in r],
        [
            ("name", "candidate", "s"),
            ("format", "format", "s"),
            ("file_bytes", "bytes", "d"),
            ("bpw", "bits/w", ".2f"),
            ("ppl", "PPL", ".3f"),
            ("kld_mean", "KLD", ".5f"),
            ("top1", "top-1", ".4f"),
            ("task_accuracy", "task", ".3f"),
            ("task_flips", "flips", "d"),
            ("quantize_s", "quantize s", ".1f"),
            ("pareto", "front", ""),
            ("dominated_by", "beaten by", "s"),
        ],
    )
    if report.get("recommended"):
        print("recommended:", report["recommended"]["reason"])
    print(json.dumps({k: v for k, v in result.items() if k != "report"}))


if __name__ == "__main__":
    main()

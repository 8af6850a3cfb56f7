"""Weights + activations on SmolLM2-135M: W8A8 (naive, per-token, SmoothQuant), LLM.int8(), FP8, and the
bitsandbytes 4-bit types next to INT4-absmax at the same block size.

Calibration (static activation scales, SmoothQuant's ranges, LLM.int8()'s outlier counts):
``wikitext-2-raw-test-calib.txt`` (the second half of WikiText-2 test; no article shared with the
evaluation). Evaluation: WikiText-2 test, ctx 512, 40 chunks, lowbit's evaluator, which quantizes each
linear's input at run time exactly as the checkpoint says (compressed-tensors' fake quantization for
W8A8/FP8, bitsandbytes' mixed int8/fp16 matmul for LLM.int8()). Every row is a checkpoint written by
``lowbit quantize`` in a child process (wall time and peak RSS are its own) and read back.

Usage: python bench/w8a8.py [--samples 128] [--seqlen 512] [--rows naive,per-token,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import print_table, run_measured, shared_path, smollm2_gguf, write_results

from lowbit.eval.run import evaluate_source, prepare_reference, result_dict
from lowbit.walk.sources import open_model

# row name -> (lowbit quantize arguments, whether it calibrates)
ROWS: dict[str, tuple[list[str], bool]] = {
    "fp32": ([], False),
    "w8a8 naive (per-tensor static)": (["--scheme", "w8a8-static"], True),
    "w8a8 per-token (dynamic)": (["--scheme", "w8a8"], False),
    "smoothquant a=0.5 per-tensor static": (["--scheme", "w8a8-static", "--method", "smoothquant"], True),
    "smoothquant a=0.5 norms only (paper) per-tensor static": (
        ["--scheme", "w8a8-static", "--method", "smoothquant", "--smooth", "norms"],
        True,
    ),
    "smoothquant a=auto per-tensor static": (
        ["--scheme", "w8a8-static", "--method", "smoothquant", "--alpha", "auto"],
        True,
    ),
    "smoothquant a=0.5 per-token": (["--scheme", "w8a8", "--method", "smoothquant"], True),
    "smoothquant a=auto per-token": (
        ["--scheme", "w8a8", "--method", "smoothquant", "--alpha", "auto"],
        True,
    ),
    "llm.int8() t=6": (["--method", "llm-int8"], True),
    "fp8 (e4m3 w + dynamic a)": (["--scheme", "fp8"], False),
    "w8 weight-only": (["--scheme", "w8"], False),
    "nf4": (["--scheme", "nf4"], False),
    "nf4 + double quant": (["--scheme", "nf4", "--double-quant"], False),
    "fp4": (["--scheme", "fp4"], False),
    "int4 absmax b64 (w4g64)": (["--scheme", "w4g64"], False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (see ROWS)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    args = ap.parse_args()
    model = smollm2_gguf()
    calib = shared_path("data/text/wikitext-2-raw-test-calib.txt")
    eval_text = shared_path("data/text/wikitext-2-raw-test.txt")
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {list(ROWS)}")
    rows: list[dict[str, Any]] = []
    outlier_layers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        setup = prepare_reference(model, eval_text, 512, args.chunks, cache_dir=Path(tmp) / "cache")
        for name in names:
            extra, calibrates = ROWS[name]
            if not extra:
                res = evaluate_source(setup, open_model(model))
                rows.append({"row": name, **result_dict(res, 32.0), "seconds": None, "peak_rss_mib": None})
                continue
            out = Path(tmp) / f"row{len(rows)}"
            argv = [
                sys.executable,
                "-m",
                "lowbit",
                "-q",
                "quantize",
                str(model),
                *extra,
                "-o",
                str(out),
                "--json",
            ]
            if calibrates:
                argv += ["--calib", str(calib), "--samples", str(args.samples), "--seqlen", str(args.seqlen)]
            m = run_measured(argv)
            rep = json.loads(m.stdout)
            res = evaluate_source(setup, open_model(out))
            row: dict[str, Any] = {
                "row": name,
                "scheme": rep["scheme"],
                "method": rep["method"],
                "format": rep["format"],
                **result_dict(res, rep["bpw"]),
                "seconds": m.seconds,
                "peak_rss_mib": m.peak_rss_bytes / 2**20,
            }
            notes = rep.get("layer_notes") or {}
            counts = [int(n["outlier_features"]) for n in notes.values() if "outlier_features" in n]
            if counts:
                row["outliers_total"] = sum(counts)
                row["outliers_max_layer"] = max(counts)
                row["layers_with_outliers"] = sum(c > 0 for c in counts)
                outlier_layers = {k: v for k, v in notes.items()}
            rows.append(row)
            write_results(
                "w8a8", {"samples": args.samples, "seqlen": args.seqlen, "rows": rows, "partial": True}
            )
            print(
                f"  {name}: KLD {row['kld_mean']:.5f} PPL {row['ppl']:.3f} top-1 {row['top1']:.4f} "
                f"{m.seconds:.0f} s {row['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    fp32 = next((r for r in rows if r["row"] == "fp32"), None)
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / fp32["ppl"] if fp32 else None
    print(
        f"SmolLM2-135M on WikiText-2 test, ctx 512, {args.chunks} chunks; calibration "
        f"{args.samples}x{args.seqlen} tokens of {calib.name}"
    )
    print_table(
        rows,
        [
            ("row", "row", "s"),
            ("bpw", "bits/w", ".3f"),
            ("ppl", "PPL", ".3f"),
            ("ppl_ratio", "PPL/fp32", ".4f"),
            ("kld_mean", "KLD", ".5f"),
            ("top1", "top-1", ".4f"),
            ("outliers_total", "outlier feats", "d"),
            ("seconds", "s", ".0f"),
            ("peak_rss_mib", "RSS MiB", ".0f"),
        ],
    )
    if outlier_layers:
        by_kind: dict[str, list[int]] = {}
        for layer, n in outlier_layers.items():
            kind = layer.rsplit(".", 2)[-2]
            by_kind.setdefault(kind, []).append(int(n["outlier_features"]))
        print(
            "LLM.int8() outlier features (|x| >= 6 on some calibration token) per projection, over the 30 layers:"
        )
        for kind, c in by_kind.items():
            print(
                f"  {kind:<10} total {sum(c):>5}  max {max(c):>4}  layers with any {sum(x > 0 for x in c):>2}"
            )
    payload = {"samples": args.samples, "seqlen": args.seqlen, "rows": rows, "outliers": outlier_layers}
    print(f"wrote {write_results('w8a8', payload)}")


if __name__ == "__main__":
    main()

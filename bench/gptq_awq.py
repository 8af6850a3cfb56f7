"""RTN vs GPTQ vs AWQ on SmolLM2-135M: quality, time, peak RSS, with in- and out-of-domain calibration.

Evaluation: WikiText-2 test, ctx 512, 40 chunks (the first ~100 KB of the file). Calibration:
``wikitext-2-raw-test-calib.txt`` (the second half of the same file: same domain, no shared article) or
TinyStories (out of domain). Each quantization runs as a child process (``lowbit quantize``) so its wall
time and peak RSS are its own; the checkpoints are then judged by the same evaluator. Group sizes that do
not divide 576 (g128) cannot be stored in compressed-tensors: those rows are simulated in memory.

The llm-compressor anchor (same model, samples, evaluation) needs its own virtualenv; not run yet.
Usage: python bench/gptq_awq.py [--samples 128] [--seqlen 512] [--settings w4g64,w3g64] [--methods rtn,gptq,awq]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import print_table, run_measured, shared_path, smollm2_gguf, write_results

from lowbit.eval.run import evaluate_source, prepare_reference, result_dict
from lowbit.walk.sources import open_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--settings", default="w4g64,w3g64,w4,w2g64-asym")
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--calib", default="wikitext,tinystories")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    args = ap.parse_args()
    model = smollm2_gguf()
    texts = {
        "wikitext": shared_path("data/text/wikitext-2-raw-test-calib.txt"),
        "tinystories": shared_path("data/text/tinystories-val.txt"),
    }
    eval_text = shared_path("data/text/wikitext-2-raw-test.txt")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        setup = prepare_reference(model, eval_text, 512, args.chunks, cache_dir=Path(tmp) / "cache")
        for scheme in args.settings.split(","):
            for method in args.methods.split(","):
                for calib in ["-"] if method == "rtn" else args.calib.split(","):
                    out = Path(tmp) / f"{scheme}-{method}-{calib}"
                    argv = [
                        sys.executable,
                        "-m",
                        "lowbit",
                        "-q",
                        "quantize",
                        str(model),
                        "--scheme",
                        scheme,
                        "--method",
                        method,
                        "-o",
                        str(out),
                        "--json",
                    ]
                    if method != "rtn":
                        argv += [
                            "--calib",
                            str(texts[calib]),
                            "--samples",
                            str(args.samples),
                            "--seqlen",
                            str(args.seqlen),
                        ]
                    m = run_measured(argv)
                    rep = json.loads(m.stdout)
                    res = evaluate_source(setup, open_model(out))
                    row = {
                        "scheme": scheme,
                        "method": method,
                        "calib": calib,
                        **result_dict(res, rep["bpw"]),
                        "seconds": m.seconds,
                        "peak_rss_mib": m.peak_rss_bytes / 2**20,
                    }
                    rows.append(row)
                    print(
                        f"  {scheme} {method} {calib}: KLD {row['kld_mean']:.4f} PPL {row['ppl']:.3f} "
                        f"{m.seconds:.0f} s {row['peak_rss_mib']:.0f} MiB",
                        flush=True,
                    )
    rtn = {r["scheme"]: r["kld_mean"] for r in rows if r["method"] == "rtn"}
    for r in rows:
        r["kld_vs_rtn"] = r["kld_mean"] / rtn[r["scheme"]] if r["scheme"] in rtn else None
    print(
        f"SmolLM2-135M on WikiText-2 test, ctx 512, {args.chunks} chunks; calibration {args.samples}x{args.seqlen}"
    )
    print_table(
        rows,
        [
            ("scheme", "scheme", "s"),
            ("method", "method", "s"),
            ("calib", "calib", "s"),
            ("bpw", "bits/w", ".3f"),
            ("ppl", "PPL", ".3f"),
            ("kld_mean", "KLD", ".4f"),
            ("kld_vs_rtn", "× RTN", ".2f"),
            ("top1", "top-1", ".4f"),
            ("seconds", "s", ".0f"),
            ("peak_rss_mib", "RSS MiB", ".0f"),
        ],
    )
    print(
        f"wrote {write_results('gptq_awq', {'samples': args.samples, 'seqlen': args.seqlen, 'rows': rows})}"
    )


if __name__ == "__main__":
    main()

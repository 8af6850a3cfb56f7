"""RTN on SmolLM2-135M: lowbit's wall time and peak RSS, next to llama-quantize in the same run.

lowbit reads the model one block at a time from the memory-mapped file, so its peak memory should be
about one block plus the (dequantized) embedding on top of the interpreter's baseline, not the model.
The anchor is llama-quantize (2 threads) making Q8_0 and Q4_0 (its round-to-nearest types) from the F32
GGUF. Usage: python bench/rtn.py [--schemes w4g64,w8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import LLAMA_BIN, print_table, run_measured, shared_path, smollm2_gguf, write_results

BASELINE = [sys.executable, "-c", "import torch, transformers, safetensors, gguf, lowbit.api"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--schemes", default="w8,w4g64,w4g64-asym,w3g64-asym,w4")
    args = ap.parse_args()
    src = smollm2_gguf()
    shared_path("tools/llama.cpp/bin/llama-quantize")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        f32 = Path(tmp) / "smollm2-f32.gguf"
        run_measured(
            [str(LLAMA_BIN / "llama-quantize"), "--allow-requantize", str(src), str(f32), "F32", "2"]
        )
        base = run_measured(BASELINE)
        for inp_name, inp in (("Q4_1 gguf", src), ("F32 gguf", f32)):
            for scheme in args.schemes.split(","):
                out = Path(tmp) / f"out-{scheme}"
                m = run_measured(
                    [
                        sys.executable,
                        "-m",
                        "lowbit",
                        "-q",
                        "quantize",
                        str(inp),
                        "--scheme",
                        scheme,
                        "-o",
                        str(out),
                        "--force",
                        "--json",
                    ]
                )
                rep = json.loads(m.stdout)
                rows.append(
                    {
                        "tool": "lowbit",
                        "input": inp_name,
                        "scheme": scheme,
                        "seconds": m.seconds,
                        "peak_rss_mib": m.peak_rss_bytes / 2**20,
                        "over_baseline_mib": (m.peak_rss_bytes - base.peak_rss_bytes) / 2**20,
                        "bpw": rep["bpw"],
                        "file_mb": rep["file_bytes"] / 1e6,
                    }
                )
        for qtype in ("Q8_0", "Q4_0"):
            out = Path(tmp) / f"ref-{qtype}.gguf"
            m = run_measured([str(LLAMA_BIN / "llama-quantize"), str(f32), str(out), qtype, "2"])
            rows.append(
                {
                    "tool": "llama-quantize",
                    "input": "F32 gguf",
                    "scheme": qtype,
                    "seconds": m.seconds,
                    "peak_rss_mib": m.peak_rss_bytes / 2**20,
                    "over_baseline_mib": None,
                    "bpw": None,
                    "file_mb": out.stat().st_size / 1e6,
                }
            )
    anchor = next(r["seconds"] for r in rows if r["scheme"] == "Q8_0")
    for r in rows:
        r["time_vs_llama_q8_0"] = r["seconds"] / anchor
    print(
        f"interpreter + imports baseline: {base.peak_rss_bytes / 2**20:.0f} MiB, {base.seconds:.1f} s; "
        "SmolLM2 fp32 weights: 513 MiB, one block fp32: 13.5 MiB, embedding fp32: 108 MiB"
    )
    print_table(
        rows,
        [
            ("tool", "tool", "s"),
            ("input", "input", "s"),
            ("scheme", "scheme", "s"),
            ("seconds", "s", ".2f"),
            ("time_vs_llama_q8_0", "× llama Q8_0", ".2f"),
            ("peak_rss_mib", "peak RSS MiB", ".0f"),
            ("over_baseline_mib", "over baseline", ".0f"),
            ("bpw", "bits/w", ".3f"),
            ("file_mb", "file MB", ".1f"),
        ],
    )
    path = write_results(
        "rtn", {"baseline_rss_bytes": base.peak_rss_bytes, "baseline_seconds": base.seconds, "rows": rows}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

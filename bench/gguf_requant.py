"""Requantizing a quantized GGUF: lowbit vs llama-quantize --allow-requantize, same machine, same run.

Inputs: SmolLM2-135M as llama-quantize makes it from its F32 GGUF (itself made by llama-quantize from
the package's Q4_1 file, as ``gguf_mixes.py`` does) in Q4_0, Q4_1, Q8_0, Q4_K_M (Q4_K tensors, with
Q6_K and fallbacks where a width is not a multiple of 256) and Q6_K, plus the package's own Q4_1 file
(token_embd in Q8_0). Each is requantized to each target (Q4_K_M, Q8_0) by ``lowbit quantize`` and by
``llama-quantize --allow-requantize`` (2 threads), alternating, ``--repeat`` times; the minimum wall time
of each, the ratio, lowbit's time inside the library (no interpreter start-up and imports), and
whether the two files are byte-identical (sha256). The CPU (model, SIMD flags) and the load average
are recorded with the results: the machine is shared, compare the ratios. lowbit's bytecode is written
first (``compileall``), as an installed package has it.

Where the target's types are the input's (Q8_0 -> Q8_0, Q4_K_M -> Q4_K_M) both tools copy every
tensor: the row then measures start-up and I/O, where the interpreter and its imports (numpy, gguf-py)
cost lowbit a fixed ~0.15 s that llama-quantize does not pay.

Usage: python bench/gguf_requant.py [--inputs Q4_0,Q4_1,Q8_0,Q4_K_M,Q6_K,package] [--targets Q4_K_M,Q8_0]
       [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    LLAMA_BIN,
    TIMING_COLUMNS,
    Measured,
    compile_lowbit,
    print_table,
    run_measured,
    smollm2_gguf,
    write_results,
)
from gguf_mixes import KERNELS_CHECK, sha

INPUTS = "Q4_0,Q4_1,Q8_0,Q4_K_M,Q6_K,package"
TARGETS = "Q4_K_M,Q8_0"
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "amx_tile")


def cpu() -> dict[str, Any]:
    """The processor's model name and which SIMD extensions it has (from /proc/cpuinfo)."""
    info: dict[str, Any] = {"model": None, "simd": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["model"] is None:
            info["model"] = value.strip()
        if key.strip() == "flags":
            flags = set(value.split())
            info["simd"] = [f for f in SIMD_FLAGS if f in flags]
            break
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", default=INPUTS, help="types to requantize from ('package': its Q4_1 file)")
    ap.add_argument("--targets", default=TARGETS)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each tool per row (min is kept)")
    ap.add_argument("--out", default="gguf_requant", help="results name (bench/results/NAME.json)")
    args = ap.parse_args()
    q = str(LLAMA_BIN / "llama-quantize")
    package = compile_lowbit()
    kernels = (
        "compiled (lowbit.formats.gguf._kernels)"
        if run_measured([sys.executable, "-c", KERNELS_CHECK]).stdout.strip() == "True"
        else "numpy (the compiled kernels are not built)"
    )
    proc = cpu()
    print(f"CPU: {proc['model']} ({', '.join(proc['simd'])}); lowbit's codecs: {kernels}", flush=True)
    meta: dict[str, Any] = {
        "lowbit_codecs": kernels,
        "cpu": proc,
        "repeat": args.repeat,
        "load_average_start": os.getloadavg(),
        "llama_quantize_threads": 2,
        "lowbit_package": str(package),
        "lowbit_bytecode": "precompiled (compileall), as an installed package",
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp_s:
        tmp = Path(tmp_s)
        f32 = tmp / "smollm2-f32.gguf"
        run_measured([q, "--allow-requantize", str(smollm2_gguf()), str(f32), "F32", "2"])
        inputs: dict[str, Path] = {}
        for name in (s.strip() for s in args.inputs.split(",") if s.strip()):
            if name.lower() == "package":
                inputs["Q4_1 (package)"] = smollm2_gguf()
                continue
            path = tmp / f"smollm2-{name}.gguf"
            run_measured([q, str(f32), str(path), name.upper(), "2"])
            inputs[name.upper()] = path
        for label, inp in inputs.items():
            for target in (s.strip().upper() for s in args.targets.split(",") if s.strip()):
                ours, theirs = tmp / "ours.gguf", tmp / "theirs.gguf"
                lowbit_argv = [
                    sys.executable, "-m", "lowbit", "-q", "quantize", str(inp), "--scheme", target,
                    "-o", str(ours), "--force", "--json",
                ]  # fmt: skip
                llama_argv = [q, "--allow-requantize", str(inp), str(theirs), target, "2"]
                runs_l: list[Measured] = []
                runs_q: list[Measured] = []
                for _ in range(args.repeat):  # alternate, so both see the same load
                    runs_l.append(run_measured(lowbit_argv))
                    runs_q.append(run_measured(llama_argv))
                t_l = min(m.seconds for m in runs_l)
                t_q = min(m.seconds for m in runs_q)
                inner = min(json.loads(m.stdout.strip().splitlines()[-1])["seconds"] for m in runs_l)
                row = {
                    "input": label,
                    "target": target,
                    "input_mb": inp.stat().st_size / 1e6,
                    "lowbit_s": t_l,
                    "lowbit_inner_s": inner,
                    "llama_s": t_q,
                    "time_ratio": t_l / t_q,
                    "lowbit_runs_s": [m.seconds for m in runs_l],
                    "llama_runs_s": [m.seconds for m in runs_q],
                    "lowbit_rss_mib": max(m.peak_rss_bytes for m in runs_l) / 2**20,
                    "llama_rss_mib": max(m.peak_rss_bytes for m in runs_q) / 2**20,
                    "identical": sha(ours) == sha(theirs),
                }
                rows.append(row)
                write_results(args.out, {**meta, "complete": False, "rows": rows})  # survives a stop
                print(
                    f"  {label} -> {target}: {t_l:.2f} s vs {t_q:.2f} s ({t_l / t_q:.2f}x, library "
                    f"{inner:.2f} s), identical={row['identical']}",
                    flush=True,
                )
    meta["load_average_end"] = os.getloadavg()
    print_table(
        rows,
        [
            ("input", "input", "s"),
            ("target", "target", "s"),
            *TIMING_COLUMNS,
            ("identical", "same bytes", ""),
        ],
    )
    print(f"wrote {write_results(args.out, {**meta, 'complete': True, 'rows': rows})}")


if __name__ == "__main__":
    main()

"""GGUF mixes: lowbit vs llama-quantize, same machine, same run.

For each input (SmolLM2 as F32 GGUF, tiny256 BF16 GGUF) and every mix of llama-quantize's list, without
and (where the mix's types use one) with an importance matrix from llama-imatrix on the WikiText-2
calibration half: wall time (min of ``--repeat`` runs, lowbit and llama-quantize alternating, so both
see the same machine load) and peak RSS of ``lowbit quantize`` and of ``llama-quantize`` (2 threads), the
ratio, lowbit's time inside the library (without interpreter start-up and imports), file size, bits per
weight, whether the files are byte-identical, and llama-perplexity's PPL and KL-divergence (WikiText-2
test, ctx 512) of both files — computed once when the files are identical, since identical bytes give
identical numbers.

Memory: the budget the issue sets is ``1.5 x the largest tensor + a constant``; the constant is measured
here as the peak RSS of a process that only imports what ``lowbit quantize X.gguf`` imports (Python,
numpy, gguf-py, lowbit's GGUF modules), and each row says whether lowbit stayed within it.

Usage: python bench/gguf_mixes.py [--mixes Q4_K_M,Q8_0] [--inputs smollm2,tiny256] [--repeat 3]
       [--chunks 40] [--ppl-mixes Q4_K_M,Q2_K | --no-ppl]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    LLAMA_BIN,
    TIMING_COLUMNS,
    Measured,
    parse_perplexity,
    print_table,
    run_measured,
    shared_path,
    smollm2_gguf,
    write_results,
)

MIXES = (
    "Q2_K,Q2_K_S,Q3_K_S,Q3_K_M,Q3_K_L,Q4_0,Q4_1,Q4_K_S,Q4_K_M,Q5_0,Q5_1,Q5_K_S,Q5_K_M,Q6_K,Q8_0,"
    "IQ4_NL,IQ4_XS,TQ1_0,TQ2_0,F16,BF16"
)
# Mixes whose every type ignores the importance matrix (llama-quantize accepts --imatrix and writes the
# same tensors): measured without one only.
NO_IMATRIX = frozenset({"Q8_0", "TQ1_0", "TQ2_0", "F16", "BF16"})
LEGACY_AND_K = frozenset(
    {"Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1"}
    | {"Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"}
)
BASELINE_IMPORTS = (
    "import numpy, gguf, tqdm.auto; import lowbit.cli.main as m; m.build_parser(); "
    "import lowbit.api, lowbit.export.gguf, lowbit.formats.gguf.kquants, lowbit.formats.gguf.legacy, "
    "lowbit.formats.gguf.iquants, lowbit.formats.gguf.ternary"
)

KERNELS_CHECK = "import lowbit.formats.gguf.block as b; print(b.native_kernels() is not None)"


def sha(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_stats(p: Path) -> tuple[float, int, int]:
    """(bits per weight over all tensors, parameters, largest tensor's bytes) of a GGUF file."""
    from lowbit.walk.gguf_read import read_gguf

    tensors = read_gguf(p).tensors
    n = sum(math.prod(t.ne) for t in tensors)
    return 8 * sum(t.nbytes for t in tensors) / n, n, max(t.nbytes for t in tensors)


PPL_THREADS = 2


def perplexity(model: Path, text: Path, chunks: int, base: Path, make_base: bool) -> dict[str, float]:
    argv = [
        str(LLAMA_BIN / "llama-perplexity"),
        "-m",
        str(model),
        "-f",
        str(text),
        "-c",
        "512",
        "--chunks",
        str(chunks),
        "-t",
        str(PPL_THREADS),
        "-nr",
        "--kl-divergence-base",
        str(base),
    ]
    if not make_base:
        argv.append("--kl-divergence")
    return parse_perplexity(run_measured(argv, capture_stderr=True).stdout)


def try_run(argv: list[str]) -> Measured | None:
    try:
        return run_measured(argv)
    except RuntimeError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixes", default=MIXES)
    ap.add_argument("--inputs", default="smollm2,tiny256")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each tool per row (min is kept)")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--ppl-mixes", default=None, help="evaluate only these mixes (default: all)")
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument(
        "--no-timing",
        action="store_true",
        help="quality only: quantize once with each tool, compare the files, run llama-perplexity "
        "(PPL/KLD do not depend on the machine's load, so this can run next to other work)",
    )
    ap.add_argument("--ppl-threads", type=int, default=2)
    ap.add_argument("--out", default="gguf", help="results name (bench/results/NAME.json)")
    args = ap.parse_args()
    global PPL_THREADS
    PPL_THREADS = args.ppl_threads
    if args.no_timing:
        args.repeat = 1
    q = str(LLAMA_BIN / "llama-quantize")
    calib = shared_path("data/text/wikitext-2-raw-test-calib.txt")
    text = shared_path("data/text/wikitext-2-raw-test.txt")
    mixes = [m.strip().upper() for m in args.mixes.split(",") if m.strip()]
    ppl_mixes = set(mixes if args.ppl_mixes is None else args.ppl_mixes.upper().split(","))
    if args.no_ppl:
        ppl_mixes = set()
    baseline = max(
        run_measured([sys.executable, "-c", BASELINE_IMPORTS]).peak_rss_bytes for _ in range(args.repeat)
    )
    print(
        f"baseline (interpreter + numpy + gguf-py + lowbit GGUF modules): {baseline / 2**20:.0f} MiB",
        flush=True,
    )
    kernels = (
        "compiled (lowbit.formats.gguf._kernels)"
        if run_measured([sys.executable, "-c", KERNELS_CHECK]).stdout.strip() == "True"
        else "numpy (the compiled kernels are not built)"
    )
    print(f"lowbit's legacy/k-quant codecs: {kernels}", flush=True)
    meta = {
        "timing": not args.no_timing,
        "lowbit_codecs": kernels,
        "chunks": args.chunks,
        "repeat": args.repeat,
        "baseline_rss_mib": baseline / 2**20,
        "baseline_imports": BASELINE_IMPORTS,
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp_s:
        tmp = Path(tmp_s)
        inputs: dict[str, Path] = {}
        if "smollm2" in args.inputs:
            smol = tmp / "smollm2-f32.gguf"
            run_measured([q, "--allow-requantize", str(smollm2_gguf()), str(smol), "F32", "2"])
            inputs["SmolLM2 F32"] = smol
        if "tiny256" in args.inputs:
            inputs["tiny256 BF16"] = shared_path("data/golden/tiny256-bf16.gguf")
        for label, inp in inputs.items():
            _, n_params, largest = tensor_stats(inp)
            budget = baseline + 1.5 * largest
            imat = tmp / f"{label.split()[0]}.imatrix.gguf"
            run_measured(
                [
                    str(LLAMA_BIN / "llama-imatrix"),
                    "-m",
                    str(inp),
                    "-f",
                    str(calib),
                    "-c",
                    "512",
                    "--chunks",
                    "32",
                    "-t",
                    "2",
                    "-nr",
                    "-o",
                    str(imat),
                ]
            )
            base = tmp / f"{label.split()[0]}.kld"
            ref = {} if not ppl_mixes else perplexity(inp, text, args.chunks, base, make_base=True)
            for mix in mixes:
                for use_imatrix in (False,) if mix in NO_IMATRIX else (False, True):
                    ours, theirs = tmp / "ours.gguf", tmp / "theirs.gguf"
                    extra = ["--imatrix", str(imat)] if use_imatrix else []
                    lowbit_argv = [
                        sys.executable,
                        "-m",
                        "lowbit",
                        "-q",
                        "quantize",
                        str(inp),
                        "--scheme",
                        mix,
                        "-o",
                        str(ours),
                        "--force",
                        "--json",
                        *extra,
                    ]
                    llama_argv = [q, *extra, str(inp), str(theirs), mix, "2"]
                    runs_l: list[Measured] = []
                    runs_q: list[Measured] = []
                    for _ in range(args.repeat):  # alternate, so both see the same load
                        m_l, m_q = try_run(lowbit_argv), try_run(llama_argv)
                        if m_l is None or m_q is None:
                            break
                        runs_l.append(m_l)
                        runs_q.append(m_q)
                    row: dict[str, Any] = {"input": label, "mix": mix, "imatrix": use_imatrix}
                    if not runs_l:
                        row["refused"] = (
                            "both" if try_run(lowbit_argv) is None and try_run(llama_argv) is None else "one"
                        )
                        rows.append(row)
                        print(
                            f"  {label} {mix} imatrix={use_imatrix}: refused by {row['refused']}", flush=True
                        )
                        continue
                    t_l = min(m.seconds for m in runs_l)
                    t_q = min(m.seconds for m in runs_q)
                    inner = min(json.loads(m.stdout.strip().splitlines()[-1])["seconds"] for m in runs_l)
                    same = sha(ours) == sha(theirs)
                    bpw, _, _ = tensor_stats(ours)
                    rss_l = max(m.peak_rss_bytes for m in runs_l)
                    row.update(
                        {
                            "lowbit_s": t_l,
                            "lowbit_inner_s": inner,
                            "llama_s": t_q,
                            "time_ratio": t_l / t_q,
                            "lowbit_runs_s": [m.seconds for m in runs_l],
                            "llama_runs_s": [m.seconds for m in runs_q],
                            "lowbit_rss_mib": rss_l / 2**20,
                            "llama_rss_mib": max(m.peak_rss_bytes for m in runs_q) / 2**20,
                            "rss_budget_mib": budget / 2**20,
                            "rss_within_budget": rss_l <= budget,
                            "file_mb": ours.stat().st_size / 1e6,
                            "bpw": bpw,
                            "identical": same,
                            "ref_ppl": ref.get("ppl"),
                        }
                    )
                    if args.no_timing:
                        for k in ("lowbit_s", "lowbit_inner_s", "llama_s", "time_ratio", "lowbit_runs_s"):
                            row.pop(k)
                        row.pop("llama_runs_s")
                    if mix in ppl_mixes:
                        pl = perplexity(ours, text, args.chunks, base, make_base=False)
                        pq = pl if same else perplexity(theirs, text, args.chunks, base, make_base=False)
                        row.update(
                            {
                                "ppl_lowbit": pl.get("ppl"),
                                "kld_lowbit": pl.get("kld"),
                                "ppl_llama": pq.get("ppl"),
                                "kld_llama": pq.get("kld"),
                            }
                        )
                    rows.append(row)
                    write_results(args.out, {**meta, "complete": False, "rows": rows})  # survives a stop
                    what = (
                        f"PPL {row.get('ppl_lowbit')} KLD {row.get('kld_lowbit')}"
                        if args.no_timing
                        else f"{t_l:.2f} s vs {t_q:.2f} s ({t_l / t_q:.2f}x, library {inner:.2f} s)"
                    )
                    print(
                        f"  {label} {mix} imatrix={use_imatrix}: {what}, {rss_l / 2**20:.0f} MiB, identical={same}",
                        flush=True,
                    )
            rows.append(
                {"input": label, "mix": "(budget)", "rss_budget_mib": budget / 2**20, "params": n_params}
            )
    print_table(
        [r for r in rows if "bpw" in r],
        [
            ("input", "input", "s"),
            ("mix", "mix", "s"),
            ("imatrix", "imat", ""),
            *TIMING_COLUMNS,
            ("file_mb", "MB", ".1f"),
            ("bpw", "bpw", ".3f"),
            ("identical", "same bytes", ""),
            ("ppl_lowbit", "PPL", ".4f"),
            ("kld_lowbit", "KLD", ".5f"),
            ("ppl_llama", "PPL llama", ".4f"),
            ("kld_llama", "KLD llama", ".5f"),
        ],
    )
    print(f"wrote {write_results(args.out, {**meta, 'complete': True, 'rows': rows})}")


if __name__ == "__main__":
    main()

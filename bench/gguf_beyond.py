"""GGUF files that lose less than llama-quantize's at the same size: methods inside llama.cpp's block types.

For each model (tiny256: every width a multiple of 256; SmolLM2-135M: most tensors take llama.cpp's
fall-back types), each mix and each calibration text, every column is a GGUF file with llama-quantize's
per-tensor types, judged by ``llama-perplexity`` on WikiText-2 test (ctx 512, ``--chunks`` 40): PPL and
KL-divergence against the unquantized model's logits (tiny256: its BF16 GGUF; SmolLM2: the F32 GGUF of
its package's weights). Columns:

* ``llama-quantize``: llama.cpp's file without an importance matrix;
* ``llama-quantize+imatrix``: with ``llama-imatrix``'s matrix of the calibration text (``--samples``
  chunks of 512 tokens, the same tokens lowbit calibrates on) — the anchor every ratio is taken against;
* ``lowbit rtn+imatrix``: ``lowbit quantize --imatrix`` of the same matrix (must be the same bytes);
* ``lowbit gptq`` / ``gptq-asym`` (``--asymmetric``: towards the original model's outputs) /
  ``gptq-refine`` / ``awq`` (and ``-rot``: ``--rotate hadamard``): lowbit's methods driving the block
  types (``--calib``, ``--samples`` x 512 tokens);
* ``autoround``: Intel AutoRound 0.16.1's ``gguf:*`` files (``bench/anchors/autoround_tiny256.py``), read
  from ``bench/results/autoround_tiny256.json`` (same calibration windows, same evaluation).

Calibration: the WikiText-2 calibration half (in domain: ``wiki``) and TinyStories (out of domain:
``tinystories``); the imatrix of the anchor comes from the same text. Each quantization runs as a measured
child (wall time, peak RSS). ``--lowbit-eval`` also evaluates lowbit's files with ``lowbit eval`` (its KLD
must agree with llama-perplexity's within 2 %). Results are written after every row
(``bench/results/gguf_beyond.json``); ``--append`` keeps the rows already there (others are redone).

Usage: python bench/gguf_beyond.py [--models tiny256,smollm2] [--mixes Q4_K_M,Q3_K_M]
       [--methods lq,lq-im,rtn-im,gptq,gptq-refine,awq] [--calib wiki,tinystories] [--samples 128]
       [--refine 100] [--chunks 40] [--append]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import LLAMA_BIN, RESULTS, print_table, run_measured, shared_path, smollm2_gguf, write_results

MIXES = "Q2_K,Q2_K_S,Q3_K_S,Q3_K_M,Q4_K_M,Q5_K_M,Q6_K,IQ4_XS"
CALIBS = {
    "wiki": "data/text/wikitext-2-raw-test-calib.txt",
    "tinystories": "data/text/tinystories-val.txt",
}
EVAL = "data/text/wikitext-2-raw-test.txt"
#: column -> (``lowbit quantize`` method, extra arguments); ``{refine}`` is replaced by ``--refine``'s value
LOWBIT = {
    "gptq": ["--method", "gptq"],
    "gptq-asym": ["--method", "gptq", "--asymmetric"],
    "gptq-asym-rot": ["--method", "gptq", "--asymmetric", "--rotate", "hadamard"],
    "gptq-refine": ["--method", "gptq", "--refine", "{refine}"],
    "awq": ["--method", "awq"],
    "gptq-rot": ["--method", "gptq", "--rotate", "hadamard"],
    "gptq-refine-rot": ["--method", "gptq", "--refine", "{refine}", "--rotate", "hadamard"],
    "awq-rot": ["--method", "awq", "--rotate", "hadamard"],
    "rtn-rot": ["--method", "rtn", "--rotate", "hadamard"],
}
ANCHOR_COLUMN = "lq-im"
PPL_THREADS = 2


def perplexity(model: Path, text: Path, chunks: int, base: Path, make_base: bool) -> dict[str, float]:
    """llama-perplexity's PPL and mean KLD (against ``base``'s logits, or writing them). The tool's
    asynchronous logger can drop its last lines: its output goes to a file, and a run without the
    summary is repeated."""
    argv = [str(LLAMA_BIN / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "512"]
    argv += ["--chunks", str(chunks), "-t", str(PPL_THREADS), "-nr", "--kl-divergence-base", str(base)]
    if not make_base:
        argv.append("--kl-divergence")
    res: dict[str, float] = {}
    for _ in range(4):
        with tempfile.TemporaryFile("w+") as log:
            subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=True)
            log.seek(0)
            out = log.read()
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", out) or re.search(
            r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", out
        )
        if m:
            res["ppl"] = float(m.group(1))
        m = re.search(r"Mean\s+KLD:\s+([0-9.]+)", out)
        if m:
            res["kld"] = float(m.group(1))
        if "ppl" in res and (make_base or "kld" in res):
            return res
    raise RuntimeError(f"llama-perplexity gave no summary for {model}")


def lowbit_eval(model: Path, ref: Path, text: Path, chunks: int) -> float:
    out = run_measured(
        [sys.executable, "-m", "lowbit", "-q", "eval", str(model), "--ref", str(ref), "--text", str(text)]
        + ["--ctx", "512", "--chunks", str(chunks), "--json"]
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["kld_mean"])


def file_bytes(p: Path) -> int:
    return p.stat().st_size


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("rows", []))


def autoround_rows() -> dict[tuple[str, str], dict[str, Any]]:
    """AutoRound's measured files: (mix, calibration) -> row (``bench/results/autoround_tiny256.json``)."""
    path = RESULTS / "autoround_tiny256.json"
    if not path.is_file():
        return {}
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in json.loads(path.read_text()).get("rows", []):
        mix = str(r.get("mix") or r.get("scheme") or "").upper()
        out[(mix, str(r.get("calib", "wiki")))] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny256,smollm2")
    ap.add_argument("--mixes", default=MIXES)
    ap.add_argument("--methods", default="lq,lq-im,rtn-im,gptq,gptq-refine,awq")
    ap.add_argument("--calib", default="wiki,tinystories")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--refine", type=int, default=100)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--lowbit-eval", action="store_true", help="also judge lowbit's files with lowbit eval")
    ap.add_argument("--out", default="gguf_beyond")
    ap.add_argument("--append", action="store_true", help="keep the rows of an earlier run, redo the rest")
    args = ap.parse_args()

    import torch

    results_path = RESULTS / f"{args.out}.json"
    rows = load_rows(results_path) if args.append else []
    key_of = lambda r: (r["model"], r["mix"], r["calib"], r["method"])  # noqa: E731
    done = {key_of(r) for r in rows}
    meta = {
        "eval": f"llama-perplexity, WikiText-2 test, ctx 512 x {args.chunks} chunks",
        "samples": args.samples,
        "seqlen": 512,
        "refine": args.refine,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    methods = args.methods.split(",")
    text = shared_path(EVAL)
    ar = autoround_rows()
    lq = str(LLAMA_BIN / "llama-quantize")

    def save() -> None:
        write_results(args.out, {**meta, "rows": rows})

    with tempfile.TemporaryDirectory(prefix="lowbit-beyond-") as tmp_s:
        tmp = Path(tmp_s)
        for model in args.models.split(","):
            if model == "tiny256":
                base = shared_path("data/golden/tiny256-bf16.gguf")
                lowbit_in = shared_path("data/models/tiny256")
            elif model == "smollm2":
                base = tmp / "smollm2-f32.gguf"
                run_measured([lq, "--allow-requantize", str(smollm2_gguf()), str(base), "F32", "2"])
                lowbit_in = base
            else:
                sys.exit(f"unknown model {model}")
            kld_base = tmp / f"{model}.kld"
            ref = perplexity(base, text, args.chunks, kld_base, make_base=True)
            print(f"{model}: unquantized PPL {ref['ppl']:.4f}", flush=True)
            for calib in args.calib.split(","):
                calib_text = shared_path(CALIBS[calib])
                imatrix = tmp / f"{model}-{calib}.imatrix.gguf"
                run_measured(
                    [str(LLAMA_BIN / "llama-imatrix"), "-m", str(base), "-f", str(calib_text), "-c", "512"]
                    + ["--chunks", str(args.samples), "-t", "2", "-nr", "-o", str(imatrix)]
                )
                for mix in args.mixes.split(","):
                    anchor: dict[str, Any] | None = next(
                        (r for r in rows if key_of(r) == (model, mix, calib, ANCHOR_COLUMN)), None
                    )
                    for method in methods:
                        if (model, mix, "-" if method == "lq" else calib, method) in done:
                            continue
                        if method == "lq" and calib != args.calib.split(",")[0]:
                            continue  # no calibration: one row is enough
                        out = tmp / f"{model}-{mix}-{calib}-{method}.gguf"
                        if method == "lq":
                            try:
                                m = run_measured([lq, "--allow-requantize", str(base), str(out), mix, "2"])
                            except RuntimeError as e:  # Q2_K_S, IQ2/IQ1: llama-quantize needs an imatrix
                                print(f"{model} {mix} lq: {str(e)[-120:]}", flush=True)
                                continue
                        elif method == "lq-im":
                            m = run_measured(
                                [
                                    lq,
                                    "--allow-requantize",
                                    "--imatrix",
                                    str(imatrix),
                                    str(base),
                                    str(out),
                                    mix,
                                    "2",
                                ]
                            )
                        elif method == "rtn-im":
                            m = run_measured(
                                [sys.executable, "-m", "lowbit", "-q", "quantize", str(base), "--scheme", mix]
                                + ["--imatrix", str(imatrix), "-o", str(out)]
                            )
                        elif method in LOWBIT:
                            extra = [a.replace("{refine}", str(args.refine)) for a in LOWBIT[method]]
                            m = run_measured(
                                [
                                    sys.executable,
                                    "-m",
                                    "lowbit",
                                    "-q",
                                    "quantize",
                                    str(lowbit_in),
                                    "--scheme",
                                    mix,
                                ]
                                + extra
                                + ["--calib", str(calib_text), "--samples", str(args.samples), "-o", str(out)]
                            )
                        else:
                            sys.exit(f"unknown method {method}")
                        q = perplexity(out, text, args.chunks, kld_base, make_base=False)
                        row: dict[str, Any] = {
                            "model": model,
                            "mix": mix,
                            "calib": calib if method != "lq" else "-",
                            "method": method,
                            "bytes": file_bytes(out),
                            "seconds": m.seconds,
                            "peak_rss_mib": m.peak_rss_bytes / 2**20,
                            "ppl": q.get("ppl"),
                            "kld": q.get("kld"),
                            "ref_ppl": ref["ppl"],
                        }
                        if method == "lq-im":
                            anchor = row
                            keep = tmp / f"{model}-{mix}-{calib}-anchor.gguf"
                            out.rename(keep)
                        if method == "rtn-im":
                            keep = tmp / f"{model}-{mix}-{calib}-anchor.gguf"
                            row["same_bytes_as_anchor"] = (
                                keep.is_file() and keep.read_bytes() == out.read_bytes()
                            )
                        if args.lowbit_eval and method in LOWBIT:
                            row["lowbit_eval_kld"] = lowbit_eval(out, lowbit_in, text, args.chunks)
                        if anchor is not None and anchor.get("kld"):
                            row["kld_vs_anchor"] = (row["kld"] or float("nan")) / anchor["kld"]
                            row["size_vs_anchor"] = row["bytes"] / anchor["bytes"]
                        a = ar.get((mix, calib)) if model == "tiny256" else None
                        if a is not None and a.get("kld") and row.get("kld"):
                            row["kld_vs_autoround"] = row["kld"] / a["kld"]
                            if a.get("seconds"):
                                row["time_vs_autoround"] = row["seconds"] / a["seconds"]
                        rows.append(row)
                        done.add(key_of(row))
                        out.unlink(missing_ok=True)
                        save()
                        print(
                            f"{model} {mix} {calib} {method}: KLD {row['kld']} "
                            f"({row.get('kld_vs_anchor', float('nan')):.3f}x anchor) {row['seconds']:.1f} s",
                            flush=True,
                        )
    print_table(
        rows,
        [
            ("model", "model", ""),
            ("mix", "mix", ""),
            ("calib", "calib", ""),
            ("method", "method", ""),
            ("bytes", "bytes", "d"),
            ("size_vs_anchor", "size/anchor", ".3f"),
            ("seconds", "s", ".1f"),
            ("peak_rss_mib", "MiB", ".0f"),
            ("ppl", "PPL", ".3f"),
            ("kld", "KLD", ".5f"),
            ("kld_vs_anchor", "KLD/anchor", ".3f"),
            ("kld_vs_autoround", "KLD/AR", ".3f"),
        ],
    )


if __name__ == "__main__":
    main()

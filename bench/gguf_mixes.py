"""GGUF mixes: lowbit vs llama-quantize, same machine, same run.

For each input (SmolLM2 as F32 GGUF, tiny256 BF16 GGUF) and mix (with and without an imatrix from
llama-imatrix on the WikiText-2 calibration half): wall time and peak RSS of `lowbit quantize` and of
`llama-quantize` (2 threads), the ratio, file size, bits/weight, whether the files are byte-identical,
and llama-perplexity's PPL and KL-divergence (WikiText-2 test, ctx 512) of both files — computed once
when the files are identical, since identical bytes give identical numbers.
Usage: python bench/gguf_mixes.py [--mixes Q4_K_M,Q8_0] [--chunks 40] [--no-ppl]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tempfile
from pathlib import Path

from _common import LLAMA_BIN, print_table, run_measured, shared_path, smollm2_gguf, write_results

MIXES = "Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_K_S,Q4_0,Q3_K_M,Q2_K,IQ4_XS"


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


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
        "2",
        "-nr",
        "--kl-divergence-base",
        str(base),
    ]
    if not make_base:
        argv.append("--kl-divergence")
    out = run_measured(argv, capture_stderr=True).stdout
    res: dict[str, float] = {}
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out) or re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", out)
    if m:
        res["ppl"] = float(m.group(1))
    m = re.search(r"Mean\s+KLD:\s+([0-9.]+)", out)
    if m:
        res["kld"] = float(m.group(1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mixes", default=MIXES)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--no-ppl", action="store_true")
    args = ap.parse_args()
    q = str(LLAMA_BIN / "llama-quantize")
    calib = shared_path("data/text/wikitext-2-raw-test-calib.txt")
    text = shared_path("data/text/wikitext-2-raw-test.txt")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp_s:
        tmp = Path(tmp_s)
        smol = tmp / "smollm2-f32.gguf"
        run_measured([q, "--allow-requantize", str(smollm2_gguf()), str(smol), "F32", "2"])
        inputs = {"SmolLM2 F32": smol, "tiny256 BF16": shared_path("data/golden/tiny256-bf16.gguf")}
        for label, inp in inputs.items():
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
            ref = {} if args.no_ppl else perplexity(inp, text, args.chunks, base, make_base=True)
            for mix in args.mixes.split(","):
                for use_imatrix in (False, True):
                    ours, theirs = tmp / "ours.gguf", tmp / "theirs.gguf"
                    extra = ["--imatrix", str(imat)] if use_imatrix else []
                    m_l = run_measured(
                        [
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
                            *extra,
                        ]
                    )
                    m_q = run_measured([q, *extra, str(inp), str(theirs), mix, "2"])
                    same = sha(ours) == sha(theirs)
                    row = {
                        "input": label,
                        "mix": mix,
                        "imatrix": use_imatrix,
                        "lowbit_s": m_l.seconds,
                        "llama_s": m_q.seconds,
                        "time_ratio": m_l.seconds / m_q.seconds,
                        "lowbit_rss_mib": m_l.peak_rss_bytes / 2**20,
                        "llama_rss_mib": m_q.peak_rss_bytes / 2**20,
                        "file_mb": ours.stat().st_size / 1e6,
                        "identical": same,
                        "ref_ppl": ref.get("ppl"),
                    }
                    if not args.no_ppl:
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
                    print(
                        f"  {label} {mix} imatrix={use_imatrix}: {m_l.seconds:.1f} s vs {m_q.seconds:.1f} s, "
                        f"identical={same}",
                        flush=True,
                    )
    print_table(
        rows,
        [
            ("input", "input", "s"),
            ("mix", "mix", "s"),
            ("imatrix", "imat", ""),
            ("lowbit_s", "lowbit s", ".1f"),
            ("llama_s", "llama s", ".1f"),
            ("time_ratio", "ratio", ".2f"),
            ("lowbit_rss_mib", "lowbit MiB", ".0f"),
            ("llama_rss_mib", "llama MiB", ".0f"),
            ("file_mb", "MB", ".1f"),
            ("identical", "same bytes", ""),
            ("ppl_lowbit", "PPL", ".4f"),
            ("kld_lowbit", "KLD", ".5f"),
            ("ppl_llama", "PPL llama", ".4f"),
        ],
    )
    print(f"wrote {write_results('gguf', {'chunks': args.chunks, 'rows': rows})}")


if __name__ == "__main__":
    main()

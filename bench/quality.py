"""Quality of each scheme on SmolLM2-135M, WikiText-2 test, ctx 512, 40 chunks (no calibration).

Every row is judged by lowbit's evaluator against the dequantized Q4_1 original (the shared README's
"original model"): schemes compressed-tensors can store are written and read back from the file; the
others are simulated in memory. llama-quantize's own Q8_0 / Q4_0 files (made from the F32 GGUF) are
evaluated by the same evaluator as anchors. Usage: python bench/quality.py [--chunks 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import LLAMA_BIN, print_table, run_measured, shared_path, smollm2_gguf, write_results

from lowbit.cli.demo import run_scheme
from lowbit.eval.run import evaluate_source, prepare_reference, result_dict, source_bits_per_weight
from lowbit.walk.sources import open_model

SCHEMES = "w8,w4,w4g64,w4g128,w4g64-asym,w3g64,w3g64-asym,w2g64-asym,nf4,nf4-dq,fp4,fp8"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    args = ap.parse_args()
    text = shared_path("data/text/wikitext-2-raw-test.txt")
    model = smollm2_gguf()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        t0 = time.perf_counter()
        setup = prepare_reference(model, text, args.ctx, args.chunks, cache_dir=Path(tmp) / "cache")
        print(
            f"reference: {time.perf_counter() - t0:.1f} s, PPL {setup.reference.meta.ref_ppl:.4f}"
            if hasattr(setup.reference.meta, "ref_ppl")
            else f"reference: {time.perf_counter() - t0:.1f} s"
        )
        for name in args.schemes.split(","):
            row = run_scheme(setup, name, Path(tmp))
            rows.append(row)
            print(
                f"  {name}: PPL {row['ppl']:.4f} KLD {row['kld_mean']:.5f} ({row['seconds']:.0f} s)",
                flush=True,
            )
        f32 = Path(tmp) / "f32.gguf"
        run_measured(
            [str(LLAMA_BIN / "llama-quantize"), "--allow-requantize", str(model), str(f32), "F32", "2"]
        )
        for qtype in ("Q8_0", "Q4_0"):
            out = Path(tmp) / f"{qtype}.gguf"
            run_measured([str(LLAMA_BIN / "llama-quantize"), str(f32), str(out), qtype, "2"])
            src = open_model(out)
            t1 = time.perf_counter()
            res = evaluate_source(setup, src)
            rows.append(
                {
                    "scheme": f"llama.cpp {qtype}",
                    **result_dict(res, source_bits_per_weight(src)),
                    "file_bytes": out.stat().st_size,
                    "written_as": "gguf (llama-quantize)",
                    "seconds": round(time.perf_counter() - t1, 2),
                }
            )
    print(
        f"SmolLM2-135M, {text.name}, ctx {args.ctx}, {rows[0]['tokens']} tokens, reference PPL {rows[0]['ref_ppl']:.4f}"
    )
    print_table(
        rows,
        [
            ("scheme", "scheme", "s"),
            ("bpw", "bits/w", ".3f"),
            ("ppl", "PPL", ".4f"),
            ("delta_ppl", "ΔPPL", "+.4f"),
            ("kld_mean", "KLD", ".5f"),
            ("kld_p99", "KLD p99", ".4f"),
            ("top1", "top-1", ".4f"),
            ("written_as", "written as", "s"),
        ],
    )
    print(
        f"wrote {write_results('quality', {'model': 'SmolLM2-135M-Instruct (Q4_1 dequantized)', 'text': text.name, 'ctx': args.ctx, 'chunks': args.chunks, 'rows': rows})}"
    )


if __name__ == "__main__":
    main()

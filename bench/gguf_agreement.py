"""``lowbit eval`` against ``llama-perplexity`` on the same GGUF files: does lowbit measure what llama.cpp runs?

For each model and mix, the same file is judged by both on WikiText-2 test (ctx 512, ``--chunks`` 40):

* ``llama-perplexity --kl-divergence`` against the base logits of the model's F32 GGUF (tiny256: its BF16
  GGUF widened by ``llama-quantize ... F32``; SmolLM2: its package's Q4_1 weights widened the same way);
* ``lowbit eval`` against the same weights in float32 — as llama.cpp's CPU backend multiplies them (each
  matmul's input converted to the weight type's Q8_0/Q8_1/Q8_K or 16-bit dot-product type: the default),
  and with float inputs (``--float-inputs``: the weights alone).

``floor`` is llama-perplexity's KLD of the F32 file against its own base: what its stored base logits
(16-bit log-probabilities, the tail below max-16 clamped) add to every row. Files: ``lq`` is
llama-quantize's (no imatrix), ``gptq`` ``lowbit quantize --method gptq`` (128 x 512 windows of the
WikiText-2 calibration half). Results: ``bench/results/gguf_agreement.json``.

Usage: python bench/gguf_agreement.py [--models tiny256,smollm2] [--mixes Q8_0,Q4_K_M,...]
       [--methods lq,gptq] [--chunks 40] [--append]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import LLAMA_BIN, RESULTS, print_table, run_measured, shared_path, smollm2_gguf, write_results
from gguf_beyond import EVAL, perplexity

from lowbit.eval.run import evaluate_source, prepare_reference

MIXES = "Q8_0,Q6_K,Q5_K_M,Q5_0,Q4_K_M,Q4_1,Q4_0,IQ4_XS,Q3_K_M,Q2_K"
CALIB = "data/text/wikitext-2-raw-test-calib.txt"


def f32_gguf(model: str, out: Path) -> Path:
    src = shared_path("data/golden/tiny256-bf16.gguf") if model == "tiny256" else smollm2_gguf()
    run_measured([str(LLAMA_BIN / "llama-quantize"), "--allow-requantize", str(src), str(out), "F32", "2"])
    return out


def make_file(method: str, model_in: Path, f32: Path, mix: str, out: Path) -> None:
    if method == "lq":
        run_measured([str(LLAMA_BIN / "llama-quantize"), str(f32), str(out), mix, "2"])
    elif method == "gptq":
        argv = [sys.executable, "-m", "lowbit", "-q", "quantize", str(model_in), "--scheme", mix]
        argv += ["--method", "gptq", "--calib", str(shared_path(CALIB)), "--samples", "128", "-o", str(out)]
        run_measured(argv)
    else:
        sys.exit(f"unknown method {method}; choose lq or gptq")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny256")
    ap.add_argument("--mixes", default=MIXES)
    ap.add_argument("--methods", default="lq,gptq")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--out", default="gguf_agreement", help="bench/results/NAME.json")
    ap.add_argument("--append", action="store_true", help="keep the rows already measured, skip them")
    args = ap.parse_args()
    text = shared_path(EVAL)
    path = RESULTS / f"{args.out}.json"
    rows: list[dict[str, Any]] = []
    if args.append and path.is_file():
        rows = [r for r in json.loads(path.read_text())["rows"] if "error" not in r]
    done = {(r["model"], r["mix"], r["method"]) for r in rows}
    meta = {
        "eval": f"WikiText-2 test, ctx 512 x {args.chunks} chunks; llama-perplexity against the F32 GGUF's "
        "logits, lowbit eval against the same weights in float32",
        "llama_threads": 2,
    }
    with tempfile.TemporaryDirectory(prefix="lowbit-agree-") as tmp_s:
        tmp = Path(tmp_s)
        for model in args.models.split(","):
            f32 = f32_gguf(model, tmp / f"{model}-f32.gguf")
            model_in = shared_path("data/models/tiny256") if model == "tiny256" else f32
            base = tmp / f"{model}.kld"
            perplexity(f32, text, args.chunks, base, make_base=True)
            try:
                floor: float | None = perplexity(f32, text, args.chunks, base, make_base=False)["kld"]
            except RuntimeError as e:  # the floor is context, not a row: go on without it
                print(f"{model}: no floor ({e})", flush=True)
                floor = None
            setup = prepare_reference(model_in, text, ctx=512, chunks=args.chunks, progress=False)
            print(f"{model}: llama-perplexity's floor (F32 against its own base) {floor}", flush=True)
            for mix in args.mixes.split(","):
                for method in args.methods.split(","):
                    if (model, mix, method) in done:
                        continue
                    out = tmp / f"{model}-{mix}-{method}.gguf"
                    try:
                        make_file(method, model_in, f32, mix, out)
                        # the tool's logger sometimes loses its summary on a loaded machine, 4 times running
                        llama = perplexity(out, text, args.chunks, base, make_base=False)
                    except RuntimeError as e:
                        print(f"{model} {mix} {method}: {str(e)[-160:]}", flush=True)
                        rows.append({"model": model, "mix": mix, "method": method, "error": str(e)[-300:]})
                        write_results(args.out, {**meta, "rows": rows})
                        continue
                    runtime = evaluate_source(setup, out, progress=False)
                    floats = evaluate_source(setup, out, progress=False, runtime_inputs=False)
                    row = {
                        "model": model,
                        "mix": mix,
                        "method": method,
                        "llama_kld": llama["kld"],
                        "llama_floor": floor,
                        "lowbit_kld": runtime.kld_mean,
                        "lowbit_float_kld": floats.kld_mean,
                        "ratio": runtime.kld_mean / llama["kld"],
                        "ratio_float": floats.kld_mean / llama["kld"],
                        "ratio_less_floor": None
                        if floor is None
                        else runtime.kld_mean / (llama["kld"] - floor),
                        "llama_ppl": llama["ppl"],
                        "lowbit_ppl": runtime.ppl,
                    }
                    row["within_2pct"] = abs(row["ratio"] - 1) <= 0.02
                    rows.append(row)
                    out.unlink()
                    write_results(args.out, {**meta, "rows": rows})
                    print(
                        f"{model} {mix:7s} {method:5s} llama {row['llama_kld']:.6f} lowbit {row['lowbit_kld']:.6f} "
                        f"({row['ratio']:.3f}x; float inputs {row['ratio_float']:.3f}x)",
                        flush=True,
                    )
    print_table(
        [r for r in rows if "error" not in r],
        [
            ("model", "model", "s"),
            ("mix", "mix", "s"),
            ("method", "file", "s"),
            ("llama_kld", "llama KLD", ".6f"),
            ("lowbit_kld", "lowbit KLD", ".6f"),
            ("ratio", "ratio", ".3f"),
            ("ratio_less_floor", "ratio-floor", ".3f"),
            ("lowbit_float_kld", "float inputs", ".6f"),
            ("ratio_float", "ratio", ".3f"),
            ("llama_ppl", "llama PPL", ".3f"),
            ("lowbit_ppl", "lowbit PPL", ".3f"),
        ],
    )


if __name__ == "__main__":
    main()

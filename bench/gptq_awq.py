"""RTN vs GPTQ vs AWQ on SmolLM2-135M: quality, time, peak RSS, with in- and out-of-domain calibration.

Evaluation: WikiText-2 test, ctx 512, 40 chunks (the first ~100 KB of the file). Calibration:
``wikitext-2-raw-test-calib.txt`` (the second half of the same file: same domain, no shared article) or
TinyStories (out of domain). Each quantization runs as a child process (``lowbit quantize``) so its wall
time and peak RSS are its own; the checkpoints are then judged by the same evaluator. Group sizes that do
not divide 576 (g128) cannot be stored in compressed-tensors: those rows are simulated in memory.

The llm-compressor anchor (methods ``llmc-gptq``, ``llmc-gptq-noact``, ``llmc-awq``) runs
``bench/anchors/llmc_quantize.py`` in llm-compressor's own virtualenv (``bench/anchors/setup_llmc.sh``;
``--anchor-python``) on the same model (a float32 Hugging Face copy of the weights lowbit reads), the same
calibration windows (lowbit's ``calibration_tokens``, handed over as token ids) and the same evaluation (its
compressed-tensors checkpoint read by lowbit). Making that copy and the token file is charged to neither tool.
``llmc-gptq`` is llm-compressor's default GPTQ (static activation order), ``llmc-gptq-noact`` the same without
activation order (as lowbit's ``gptq``); ``llmc-awq`` its default AWQ mappings, grid and clipping.

lowbit methods: ``rtn``, ``gptq`` (lowbit's default: act-order with static groups, the Hessian blended 25%
towards its diagonal), ``gptq-noact`` (the same without act-order), ``gptq-paper`` (neither: the paper's
GPTQ), ``awq``.
A setting no checkpoint format holds (g128 on width 576: a ragged last group) is quantized in memory by
``bench/simulate_child.py`` and saved as float weights (the row says ``simulated``).

``--model tiny256`` runs the same on tiny256 (../shared; bf16, widths multiples of 256). The ``autoround``
method reads Intel AutoRound 0.16.1's checkpoints of the model (W4/W3 g128, and g64 on SmolLM2 where
measured) as measured by ``bench/anchors/autoround_tiny256.py --model MODEL`` (same windows, same
evaluation; its time is from that run; ``bench/results/autoround_MODEL.json``).
``gptq-asym`` is ``--asymmetric`` (towards the original model's outputs), ``gptq-asym-db0`` the same
without the diagonal blend.

Usage: python bench/gptq_awq.py [--model smollm2|tiny256] [--samples 128] [--seqlen 512] [--settings w4g64,w3g64]
       [--methods rtn,gptq,awq,llmc-gptq,llmc-awq] [--calib wikitext,tinystories] [--anchor-python PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    Measured,
    last_json_line,
    print_table,
    run_measured,
    shared_path,
    smollm2_gguf,
    venv_python,
    write_results,
)
from anchors.prepare import calibration_file, hf_directory

from lowbit.eval.run import evaluate_source, prepare_reference, result_dict, source_bits_per_weight
from lowbit.walk.sources import open_model

ANCHOR_SCRIPT = Path(__file__).resolve().parent / "anchors" / "llmc_quantize.py"
SIMULATE_SCRIPT = Path(__file__).resolve().parent / "simulate_child.py"
#: bench method -> (lowbit method, extra ``lowbit quantize`` arguments)
LOWBIT_METHODS: dict[str, tuple[str, list[str]]] = {
    "rtn": ("rtn", []),
    "gptq": ("gptq", []),  # lowbit's default: act-order (static groups), Hessian blended 25% to its diagonal
    "gptq-noact": ("gptq", ["--act-order", "none"]),  # the same in the paper's column order
    "gptq-paper": ("gptq", ["--act-order", "none", "--diag-blend", "0"]),  # the paper's GPTQ
    "awq": ("awq", []),
    # towards the original model's outputs (GPTAQ), with and without the diagonal blend
    "gptq-asym": ("gptq", ["--asymmetric"]),
    "gptq-asym-db0": ("gptq", ["--asymmetric", "--diag-blend", "0"]),
}
#: Models the bench runs on: SmolLM2-135M (its package's Q4_1 GGUF) or tiny256 (../shared, bf16).
MODELS = ("smollm2", "tiny256")
#: AutoRound's measured checkpoints (bench/anchors/autoround_tiny256.py --model MODEL), per model.
AUTOROUND_RESULTS = "autoround_{model}.json"
#: bench method -> (llm-compressor method, extra arguments of llmc_quantize.py)
LLMC_METHODS: dict[str, tuple[str, list[str]]] = {
    "llmc-gptq": ("gptq", []),
    "llmc-gptq-noact": ("gptq", ["--actorder", "none"]),
    "llmc-awq": ("awq", []),
}


def default_anchor_python() -> Path:
    """The llm-compressor virtualenv's python: $LOWBIT_LLMC_VENV, else ../venvs/llmc beside the repo."""
    return venv_python("LOWBIT_LLMC_VENV", "llmc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=MODELS, default="smollm2")
    ap.add_argument("--settings", default="w4g64,w3g64,w4,w2g64-asym")
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--calib", default="wikitext,tinystories")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument(
        "--anchor-python",
        type=Path,
        default=default_anchor_python(),
        help="python of llm-compressor's virtualenv (default: $LOWBIT_LLMC_VENV or ../venvs/llmc)",
    )
    ap.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep the reference cache, the anchor's HF copy and token files here between runs "
        "(default: a temporary directory)",
    )
    ap.add_argument("--results", default="gptq_awq", help="name of bench/results/NAME.json")
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in bench/results/NAME.json (a row with the same scheme, method and "
        "calibration is replaced): build one table from several runs",
    )
    args = ap.parse_args()
    meta = {
        "model": args.model,
        "samples": args.samples,
        "seqlen": args.seqlen,
        "chunks": args.chunks,
        "argv": sys.argv[1:],
    }
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in LLMC_METHODS and m not in LOWBIT_METHODS and m != "autoround"]
    if unknown:
        sys.exit(f"unknown methods {unknown}; choose from {[*LOWBIT_METHODS, *LLMC_METHODS, 'autoround']}")
    if any(m in LLMC_METHODS for m in methods) and not args.anchor_python.is_file():
        sys.exit(f"{args.anchor_python} is missing: run bench/anchors/setup_llmc.sh or pass --anchor-python")
    model = smollm2_gguf() if args.model == "smollm2" else shared_path("data/models/tiny256")
    texts = {
        "wikitext": shared_path("data/text/wikitext-2-raw-test-calib.txt"),
        "tinystories": shared_path("data/text/tinystories-val.txt"),
    }
    eval_text = shared_path("data/text/wikitext-2-raw-test.txt")
    rows: list[dict[str, Any]] = []
    old = RESULTS / f"{args.results}.json"
    if args.append and old.is_file():
        prev = json.loads(old.read_text())
        if (prev.get("samples"), prev.get("seqlen"), prev.get("chunks")) != (
            args.samples,
            args.seqlen,
            args.chunks,
        ):
            sys.exit(f"{old} was measured with other samples/seqlen/chunks; use another --results name")
        rows = [r for r in prev.get("rows", []) if "error" not in r]
        meta["argv"] = [*prev.get("argv", []), "+", *sys.argv[1:]]

    def keep(row: dict[str, Any]) -> None:
        key = (row["scheme"], row["method"], row["calib"])
        rows[:] = [r for r in rows if (r["scheme"], r["method"], r["calib"]) != key]
        rows.append(row)

    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        setup = prepare_reference(model, eval_text, 512, args.chunks, cache_dir=work / "cache")
        for scheme in args.settings.split(","):
            for method in methods:
                for calib in ["-"] if method == "rtn" else args.calib.split(","):
                    out = Path(tmp) / f"{scheme}-{method}-{calib}"
                    row: dict[str, Any] = {"scheme": scheme, "method": method, "calib": calib}
                    if method == "autoround":
                        ar = autoround_row(args.model, scheme, calib, f"{args.samples}x{args.seqlen}")
                        if ar is not None:
                            keep({**row, **ar})
                        continue
                    try:
                        if method in LLMC_METHODS:
                            # Not charged to either tool: the HF copy and the token file.
                            hf = hf_directory(model, work / "hf-f32")
                            ids = calibration_file(
                                model,
                                texts[calib],
                                args.samples,
                                args.seqlen,
                                work / f"calib-{calib}-{args.samples}x{args.seqlen}.npy",
                            )
                            m, bpw, extra = run_llmc(args.anchor_python, method, hf, ids, scheme, out)
                        else:
                            m, bpw, extra = run_lowbit(model, method, scheme, texts.get(calib), args, out)
                    except RuntimeError as e:
                        row["error"] = str(e)[-400:]
                        keep(row)
                        print(f"  {scheme} {method} {calib}: FAILED {row['error']}", flush=True)
                        continue
                    res = evaluate_source(setup, open_model(out))
                    row.update(
                        **result_dict(res, bpw),
                        seconds=m.seconds,
                        peak_rss_mib=m.peak_rss_bytes / 2**20,
                        **extra,
                    )
                    keep(row)
                    # Partial results survive an interrupted (hours-long) run.
                    write_results(args.results, {**meta, "complete": False, "rows": rows})
                    print(
                        f"  {scheme} {method} {calib}: KLD {row['kld_mean']:.4f} PPL {row['ppl']:.3f} "
                        f"{m.seconds:.0f} s {row['peak_rss_mib']:.0f} MiB",
                        flush=True,
                    )
    rtn = {r["scheme"]: r["kld_mean"] for r in rows if r["method"] == "rtn" and "kld_mean" in r}
    for r in rows:
        r["kld_vs_rtn"] = r["kld_mean"] / rtn[r["scheme"]] if r["scheme"] in rtn and "kld_mean" in r else None
    name = "SmolLM2-135M" if args.model == "smollm2" else "tiny256"
    print(
        f"{name} on WikiText-2 test, ctx 512, {args.chunks} chunks; calibration {args.samples}x{args.seqlen}"
    )
    print_table(
        [r for r in rows if "error" not in r],
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
    for r in rows:
        if "error" in r:
            print(f"{r['scheme']} {r['method']} {r['calib']}: failed: {r['error']}")
    print(f"wrote {write_results(args.results, {**meta, 'complete': True, 'rows': rows})}")


def autoround_row(model: str, scheme: str, calib: str, windows: str) -> dict[str, Any] | None:
    """AutoRound's checkpoint of ``scheme`` on ``model`` as measured by ``anchors/autoround_tiny256.py``
    (WikiText-2 calibration, the same ``windows`` (``"128x512"``) and ``lowbit eval`` as this bench), or
    None."""
    name = AUTOROUND_RESULTS.format(model=model)
    path = RESULTS / name
    if calib != "wikitext" or not path.is_file():
        return None
    for r in json.loads(path.read_text()).get("rows", []):
        same = str(r.get("row", "")).lower() == scheme.lower() and r.get("samples_x_seqlen") == windows
        if same and r.get("kld_mean") is not None:
            return {
                "kld_mean": r["kld_mean"],
                "ppl": r.get("ppl"),
                "bpw": r.get("bpw"),
                "top1": r.get("top1"),
                "seconds": r.get("wall_s"),
                "peak_rss_mib": r.get("peak_rss_mib"),
                "from": f"{name} (measured in an earlier run)",
            }
    return None


def run_lowbit(
    model: Path, method: str, scheme: str, text: Path | None, args: argparse.Namespace, out: Path
) -> tuple[Measured, float | None, dict[str, Any]]:
    """``lowbit quantize`` as a measured child; (measurement, bits/weight, extra row fields). A setting
    no checkpoint format can hold (a ragged last group) is quantized in memory instead
    (``simulate_child.py``) and saved as float weights."""
    base, flags = LOWBIT_METHODS[method]
    calib: list[str] = []
    if base != "rtn":
        assert text is not None
        calib = ["--calib", str(text), "--samples", str(args.samples), "--seqlen", str(args.seqlen)]
    argv = [sys.executable, "-m", "lowbit", "-q", "quantize", str(model), "--scheme", scheme]
    argv += ["--method", base, *flags, *calib, "-o", str(out), "--json"]
    try:
        m = run_measured(argv)
        return m, last_json_line(m.stdout)["bpw"], {}
    except RuntimeError as e:
        if "ragged last group" not in str(e):
            raise
    argv = [sys.executable, str(SIMULATE_SCRIPT), str(model), scheme, base, str(out), *flags, *calib]
    m = run_measured(argv)
    return m, last_json_line(m.stdout)["bpw"], {"simulated": True}


def run_llmc(
    python: Path, method: str, hf: Path, ids: Path, scheme: str, out: Path
) -> tuple[Measured, float | None, dict[str, Any]]:
    """llm-compressor in its virtualenv as a measured child; its checkpoint's bits/weight as lowbit reads it."""
    base, extra_args = LLMC_METHODS[method]
    argv = [str(python), str(ANCHOR_SCRIPT), str(hf), str(ids), "--scheme", scheme, "--method", base]
    m = run_measured([*argv, *extra_args, "-o", str(out)], env={"TOKENIZERS_PARALLELISM": "false"})
    rep = last_json_line(m.stdout)
    with open_model(out) as src:
        bpw = source_bits_per_weight(src)
    return m, bpw, {"tool_quantize_seconds": rep["quantize_seconds"]}


if __name__ == "__main__":
    main()

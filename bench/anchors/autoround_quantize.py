"""Quantize a Hugging Face model with Intel AutoRound on the CPU (the anchor of issue 18).

Runs inside AutoRound's own virtualenv (``bench/anchors/setup_autoround.sh``); it must not import lowbit.
The calibration samples come pre-tokenized (``.npy``, int64 ``(samples, seqlen)``, written by lowbit's
``calibration_tokens``) so both tools calibrate on exactly the same windows; everything else is AutoRound's
default (SignRound, ``iters`` 200, learning rate 1/iters, batch size 8, its own device and dtype choices on a
CPU). Nothing is downloaded: the hub is switched off and AutoRound's GGUF writer uses the llama.cpp
conversion code it bundles (``AUTO_ROUND_GGUF_AUTO_UPDATE`` is forced off).

Outputs (``-o OUT``, a directory that appears complete or not at all):

* ``--format gguf:q4_k_m`` (or any of AutoRound's ``gguf:*`` presets): the scheme and the export are that
  preset; AutoRound's own GGUF writer puts one ``.gguf`` file in OUT.
* ``--scheme w4g128`` / ``w3g128`` (lowbit's names; symmetric integer weights in groups of 128 input
  columns; ``-asym`` suffix for asymmetric): AutoRound's ``WnA16`` with that group size, exported as
  ``--export auto_gptq`` (default, a GPTQ checkpoint) or ``llm_compressor`` (compressed-tensors).

Prints one JSON line: wall and CPU seconds (self + children, ``resource.getrusage``), peak RSS, AutoRound's
version, the arguments, and the path of the GGUF file when there is one.

Usage: python autoround_quantize.py HF_DIR IDS.npy (--format gguf:q4_k_m | --scheme w4g128)
       [--iters 200] [--samples N] [--export auto_gptq|llm_compressor] -o OUT
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import time
from pathlib import Path
from typing import Any

_SCHEME = re.compile(r"^w([2-8])g(\d+)(?:-(sym|asym))?$")

# No downloads at run time, whatever AutoRound or transformers would otherwise do.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["AUTO_ROUND_GGUF_AUTO_UPDATE"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def scheme_kwargs(scheme: str) -> dict[str, Any]:
    """AutoRound keyword arguments for a lowbit integer scheme name ``wNgG[-sym|-asym]``."""
    m = _SCHEME.match(scheme)
    if m is None:
        raise SystemExit(f"scheme {scheme!r}: expected wNgG with optional -sym/-asym (e.g. w4g128)")
    bits, group = int(m.group(1)), int(m.group(2))
    return {"scheme": f"W{bits}A16", "bits": bits, "group_size": group, "sym": m.group(3) != "asym"}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark (``VmHWM``), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="Hugging Face model directory")
    ap.add_argument("calib", type=Path, help=".npy of token ids, (samples, seqlen)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--format", help="an AutoRound GGUF preset, e.g. gguf:q4_k_m (scheme and export)")
    what.add_argument("--scheme", help="lowbit integer scheme, e.g. w4g128 (symmetric) or w3g128")
    ap.add_argument(
        "--export",
        default="auto_gptq",
        choices=["auto_gptq", "llm_compressor", "auto_round"],
        help="checkpoint format for --scheme (default auto_gptq: a GPTQ checkpoint)",
    )
    ap.add_argument("--iters", type=int, default=200, help="SignRound iterations (AutoRound's default 200)")
    ap.add_argument("--samples", type=int, default=None, help="use the first N windows (default: all)")
    ap.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    args = ap.parse_args()

    t0 = time.perf_counter()
    import numpy as np
    import torch
    from auto_round import AutoRound
    from auto_round import __version__ as autoround_version

    ids = np.load(args.calib)
    if ids.ndim != 2:
        raise SystemExit(f"{args.calib}: expected (samples, seqlen) token ids, got shape {ids.shape}")
    if args.samples is not None:
        ids = ids[: args.samples]
    samples, seqlen = (int(n) for n in ids.shape)
    # A list of (1, seqlen) tensors is AutoRound's "samples" form of ``dataset``: it runs each through the
    # model as given (no re-tokenization, no shuffling).
    dataset = [torch.from_numpy(row.astype(np.int64)).unsqueeze(0) for row in ids]
    if args.format is not None:
        fmt = args.format.lower()
        if not fmt.startswith("gguf:"):
            raise SystemExit(f"--format {args.format!r}: expected a gguf:* preset (use --scheme otherwise)")
        quant: dict[str, Any] = {"scheme": fmt}
    else:
        fmt = args.export
        quant = scheme_kwargs(args.scheme)

    tmp = args.output.with_name(args.output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    autoround = AutoRound(
        str(args.model),
        dataset=dataset,
        nsamples=samples,
        seqlen=seqlen,
        iters=args.iters,
        device_map="cpu",
        **quant,
    )
    t1 = time.perf_counter()
    autoround.quantize_and_save(output_dir=str(tmp), format=fmt)
    t2 = time.perf_counter()
    # AutoRound writes into a sub-folder named after the model and scheme; OUT becomes that folder.
    made = [p for p in tmp.iterdir() if p.is_dir()]
    if len(made) != 1:
        raise SystemExit(f"expected one folder in {tmp}, found {sorted(p.name for p in made)}")
    shutil.rmtree(args.output, ignore_errors=True)
    made[0].rename(args.output)
    shutil.rmtree(tmp)
    ggufs = sorted(args.output.glob("*.gguf"))
    if fmt.startswith("gguf:") and len(ggufs) != 1:
        raise SystemExit(f"expected one .gguf file in {args.output}, found {[p.name for p in ggufs]}")
    amp_dtype = getattr(getattr(autoround, "model_context", None), "amp_dtype", None)
    print(
        json.dumps(
            {
                "tool": "auto-round",
                "version": autoround_version,
                "torch": torch.__version__,
                "format": fmt,
                "scheme": args.scheme or fmt,
                "quant_kwargs": quant,
                "iters": args.iters,
                "samples": samples,
                "seqlen": seqlen,
                "threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "tuning_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else None,
                "gguf": str(ggufs[0]) if fmt.startswith("gguf:") else None,
                "seconds": time.perf_counter() - t0,
                "load_seconds": t1 - t0,
                "quantize_seconds": t2 - t1,
                "cpu_seconds": cpu_seconds(),
                "peak_rss_bytes": peak_rss_bytes(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

"""Quantize a model in memory (``lowbit.api.simulate_scheme``) and save the dequantized weights as a
float32 Hugging Face directory: the benchmark's path for settings no checkpoint format can hold (a group
size that does not divide SmolLM2's width 576, e.g. g128: compressed-tensors, GPTQ and AWQ refuse a ragged
last group). Run as a measured child so its time and peak RSS are its own; the directory is then
evaluated like any checkpoint. Prints one JSON line: bits per weight of the quantized linears as the
codec stores them, and seconds.

Usage: python bench/simulate_child.py MODEL SCHEME METHOD OUT [--calib TEXT --samples N --seqlen L]
       [--act-order static|group|none] [--diag-blend B] [--asymmetric]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from anchors.prepare import save_float_directory

from lowbit.api import simulate_scheme
from lowbit.walk.calibrate import CalibConfig
from lowbit.walk.sources import open_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", type=Path)
    ap.add_argument("scheme")
    ap.add_argument("method")
    ap.add_argument("out", type=Path)
    ap.add_argument("--calib", type=Path)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--act-order", choices=["static", "group", "none"], default=None)
    ap.add_argument("--diag-blend", type=float, default=None)
    ap.add_argument(
        "--asymmetric", action="store_true", default=None, help="GPTQ towards the original outputs"
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    opts = {"act_order": args.act_order, "diag_blend": args.diag_blend, "asymmetric": args.asymmetric}
    calib = CalibConfig(args.calib, samples=args.samples, seqlen=args.seqlen) if args.calib else None
    with open_model(args.model) as src:
        weights, stats = simulate_scheme(
            src,
            args.scheme,
            args.method,
            calib=calib,
            method_options={k: v for k, v in opts.items() if v is not None},
        )
        seconds = time.perf_counter() - t0
        save_float_directory(src, weights, args.out)
    print(json.dumps({"bpw": stats.linear_bits_per_weight, "quantize_seconds": seconds}))


if __name__ == "__main__":
    main()

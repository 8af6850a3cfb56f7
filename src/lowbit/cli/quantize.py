"""``lowbit quantize MODEL --scheme SCHEME -o OUT``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lowbit.errors import ArgumentError
from lowbit.methods.base import METHODS
from lowbit.schemes import scheme_help
from lowbit.walk.calibrate import CalibConfig


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model's linear layers and write a checkpoint",
        description="Quantize every linear layer of every transformer block (embeddings and lm_head keep "
        "their precision) and write a checkpoint that real runtimes load.\n\nSchemes:\n" + scheme_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="Hugging Face model directory (safetensors) or .gguf file")
    p.add_argument("--scheme", required=True, help="quantization scheme (see above), e.g. w4g128")
    p.add_argument(
        "--method", default="rtn", help="rtn (default, no calibration), gptq or awq (these need --calib)"
    )
    p.add_argument(
        "--format",
        dest="fmt",
        default=None,
        help="output format: compressed-tensors (default for wN schemes and fp8), gptq, awq (GEMM), gguf "
        "(default for GGUF mixes); bnb for nf4/fp4 is not written yet",
    )
    p.add_argument(
        "--imatrix",
        default=None,
        metavar="FILE",
        help="importance matrix for GGUF mixes (llama-imatrix's .gguf or legacy .dat), as llama-quantize --imatrix",
    )
    p.add_argument("--calib", default=None, help="calibration text file (methods that need one)")
    p.add_argument(
        "--samples",
        type=int,
        default=128,
        help="calibration windows (default 128; a text too short for them gives fewer, with a warning)",
    )
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument(
        "--calib-dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="dtype the calibration forward passes run in (default bfloat16: the CPU's bf16 matrix units; "
        "the statistics are accumulated in float32/float64 either way)",
    )
    p.add_argument(
        "--non-sequential",
        action="store_true",
        help="statistics and next-block inputs from the original blocks, not the quantized ones",
    )
    p.add_argument(
        "-o", "--output", required=True, help="output directory, or .gguf file for GGUF (written atomically)"
    )
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object with the run's numbers")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lowbit.api import quantize
    from lowbit.methods.base import get_method

    method = get_method(args.method)
    if args.calib is not None and not method.needs_calibration:
        raise ArgumentError(
            f"--calib is not used by method {args.method!r}; drop it (methods: {', '.join(sorted(METHODS))})"
        )
    calib = None
    if args.calib is not None:
        calib = CalibConfig(
            Path(args.calib),
            args.samples,
            args.seqlen,
            sequential=not args.non_sequential,
            dtype=getattr(torch, args.calib_dtype),
        )
    report = quantize(
        args.model,
        args.scheme,
        args.output,
        method=args.method,
        fmt=args.fmt,
        force=args.force,
        progress=sys.stderr.isatty(),
        calib=calib,
        imatrix=args.imatrix,
    )
    if args.json:
        print(json.dumps(report.to_json_dict()))
    elif report.format == "gguf":
        print(
            f"{report.output}: {report.scheme} (GGUF, {report.method}), {report.quantized_layers} tensors quantized, "
            f"{report.linear_bits_per_weight:.3f} bits/weight in them, {report.model_bits_per_weight:.3f} overall, "
            f"{report.file_bytes / 1e6:.2f} MB, {report.seconds:.1f} s, peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB"
        )
    else:
        print(
            f"{report.output}: {report.scheme} ({report.method}, {report.format}), {report.quantized_layers} layers, "
            f"{report.linear_bits_per_weight:.3f} bits/weight in linears, {report.model_bits_per_weight:.3f} overall, "
            f"{report.file_bytes / 1e6:.2f} MB, mean SQNR {report.mean_sqnr_db:.2f} dB, "
            f"{report.seconds:.1f} s, peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB"
        )
    return 0

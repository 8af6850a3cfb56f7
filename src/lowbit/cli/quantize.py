"""``lowbit quantize MODEL --scheme SCHEME -o OUT``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lowbit.errors import ArgumentError
from lowbit.schemes import GGUF_FORMAT, scheme_help

if TYPE_CHECKING:
    from lowbit.api import QuantizeReport


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model's linear layers and write a checkpoint",
        description="Quantize every linear layer of every transformer block (embeddings and lm_head keep "
        "their precision) and write a checkpoint that real runtimes load.\n\nSchemes:\n" + scheme_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="Hugging Face model directory (safetensors) or .gguf file")
    p.add_argument(
        "--scheme",
        default=None,
        help="quantization scheme (see above), e.g. w4g128; optional for llm-int8 (int8) and smoothquant (w8a8)",
    )
    p.add_argument(
        "--method",
        default="rtn",
        help="rtn (default, no calibration); gptq, awq, smoothquant (these need --calib); llm-int8 "
        "(--calib optional: counts outlier features per layer). GGUF mixes take rtn, gptq and awq: each "
        "linear is quantized with its ggml block type",
    )
    p.add_argument(
        "--format",
        dest="fmt",
        default=None,
        help="output format: compressed-tensors (default for wN, w8a8 and fp8 schemes), gptq, awq (GEMM), "
        "bnb (bitsandbytes: int8, nf4, fp4; the default for them), gguf (default for GGUF mixes)",
    )
    p.add_argument(
        "--alpha",
        default=None,
        help="SmoothQuant migration strength in [0, 1] (default 0.5), or 'auto' to search it per layer",
    )
    g = p.add_argument_group("GPTQ (--method gptq)")
    g.add_argument(
        "--act-order",
        choices=["static", "group", "none"],
        default=None,
        help="column order, as llm-compressor's actorder: static (default: largest inputs first, contiguous "
        "groups, every format), group (largest inputs first, groups follow the order: a g_idx, --format "
        "gptq only) or none (the paper's left-to-right order)",
    )
    g.add_argument(
        "--damp",
        type=float,
        default=None,
        help="Hessian damping as a fraction of its mean diagonal (default 0.01)",
    )
    g.add_argument(
        "--asymmetric",
        action="store_true",
        default=None,
        help="quantize each linear towards the original model's outputs (the weight W C H^-1 whose "
        "outputs on the quantized model's inputs match W's on the original inputs: errors of the layers "
        "before are corrected too; GPTAQ's asymmetric calibration). Runs the original model beside",
    )
    g.add_argument(
        "--diag-blend",
        type=float,
        default=None,
        help="blend the Hessian towards its diagonal, 0..1 (default 0.25; 0 is the paper's GPTQ, 1 is "
        "round-to-nearest): robustness when the calibration text differs from the text the model sees",
    )
    p.add_argument(
        "--rotate",
        choices=["hadamard", "random"],
        default=None,
        help="quantize the rotated model (QuaRot-style, folded into the weights: norms into the next "
        "linears, a randomized Hadamard on the residual stream and on each head's values; the same "
        "outputs in float, fewer outliers to quantize); every method and format. Tied embeddings "
        "come out untied. random: seeded random orthogonal matrices",
    )
    p.add_argument(
        "--refine",
        type=int,
        default=None,
        metavar="ITERS",
        help="after a block's linears are quantized (any method), move codes between neighbouring levels "
        "for ITERS signed-gradient steps so that the block's output follows the original model's "
        "(needs --calib; 0: off)",
    )
    p.add_argument(
        "--smooth",
        choices=["all", "norms"],
        default=None,
        help="SmoothQuant mappings: all (default: norm -> q/k/v, norm -> gate/up and up -> down) or norms "
        "(the paper's and llm-compressor's default: the norms only)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="LLM.int8() outlier threshold: input features reaching it stay in 16-bit (default 6.0)",
    )
    p.add_argument(
        "--double-quant",
        action="store_true",
        help="nf4/fp4: quantize the block absmax values to 8 bits too (QLoRA's double quantization)",
    )
    p.add_argument(
        "--tensor-type",
        action="append",
        default=[],
        metavar="PATTERN=TYPE",
        help="GGUF mixes: tensors whose name matches the regular expression PATTERN take ggml type TYPE "
        "(as llama-quantize --tensor-type; repeatable, the last match wins), e.g. attn_v=q8_0",
    )
    p.add_argument(
        "--imatrix",
        default=None,
        metavar="FILE",
        help="importance matrix for GGUF mixes (llama-imatrix's .gguf or legacy .dat), as llama-quantize --imatrix",
    )
    p.add_argument(
        "--calib",
        default=None,
        help="calibration text file (methods that need one; with --method rtn and a GGUF mix: the "
        "importance matrix is computed from it, as llama-imatrix would)",
    )
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


def _one_blas_thread_for_gguf(args: argparse.Namespace) -> None:
    """A GGUF file written without calibration never calls BLAS (the codecs are elementwise, in C or
    numpy): keep the OpenBLAS that numpy loads to one thread, unless the user chose a number. Its
    thread pool costs ~30 ms of CPU to start, and its spinning threads compete with the codec threads
    (on 2 cores, 10 % of a light requantization). Only before numpy is imported: later it has no effect."""
    gguf_out = args.fmt == GGUF_FORMAT or str(args.output).lower().endswith(".gguf")
    if gguf_out and args.calib is None and "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def run(args: argparse.Namespace) -> int:
    _one_blas_thread_for_gguf(args)  # before lowbit.api imports numpy
    from lowbit.api import quantize
    from lowbit.schemes import gguf_mix_name, parse_scheme

    scheme = args.scheme
    if args.double_quant:
        if scheme is None or scheme.lower() not in ("nf4", "fp4", "nf4-dq", "fp4-dq"):
            raise ArgumentError("--double-quant applies to --scheme nf4 or fp4")
        scheme = scheme.lower().removesuffix("-dq") + "-dq"
    if args.alpha is not None and args.method != "smoothquant":
        raise ArgumentError("--alpha is SmoothQuant's; use it with --method smoothquant")
    gptq_opts = {
        "act_order": args.act_order,
        "damp": args.damp,
        "diag_blend": args.diag_blend,
        "asymmetric": args.asymmetric,
    }
    given = [f"--{k.replace('_', '-')}" for k, v in gptq_opts.items() if v is not None]
    if given and args.method != "gptq":
        raise ArgumentError(
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} GPTQ's; use with --method gptq"
        )
    if args.smooth is not None and args.method != "smoothquant":
        raise ArgumentError("--smooth is SmoothQuant's; use it with --method smoothquant")
    options: dict[str, object] = {"alpha": args.alpha} if args.alpha is not None else {}
    if args.refine is not None:
        if args.refine < 0:
            raise ArgumentError(f"--refine takes a number of steps >= 0, not {args.refine}")
        options["refine"] = args.refine
    if args.smooth is not None:
        options["mappings"] = args.smooth
    options.update({k: v for k, v in gptq_opts.items() if v is not None})
    calib = None
    if args.calib is not None:
        # torch-based methods load only when calibration is asked for (GGUF mixes need neither)
        from lowbit.methods.base import METHODS, get_method
        from lowbit.walk.calibrate import CalibConfig

        method = get_method(args.method, refine=args.refine)
        gguf = scheme is not None and (
            args.fmt == GGUF_FORMAT or (args.fmt is None and gguf_mix_name(scheme))
        )
        static = scheme is not None and not gguf and parse_scheme(scheme, args.fmt).static_activations
        if not (method.needs_calibration or method.statistics or static or gguf):
            raise ArgumentError(
                f"--calib is not used by method {args.method!r}; drop it (methods: {', '.join(sorted(METHODS))})"
            )
        import torch

        calib = CalibConfig(
            Path(args.calib),
            args.samples,
            args.seqlen,
            sequential=not args.non_sequential,
            dtype=getattr(torch, args.calib_dtype),
        )
    report = quantize(
        args.model,
        scheme,
        args.output,
        method=args.method,
        fmt=args.fmt,
        force=args.force,
        progress=sys.stderr.isatty(),
        calib=calib,
        imatrix=args.imatrix,
        method_options=options,
        threshold=args.threshold,
        rotate=args.rotate,
        tensor_types=args.tensor_type,
    )
    if args.json:
        print(json.dumps(report.to_json_dict()))
    elif report.format == "gguf":
        print(
            f"{report.output}: {report.scheme} (GGUF, {report.method}), {report.quantized_layers} tensors quantized, "
            f"{report.linear_bits_per_weight:.3f} bits/weight in them, {report.model_bits_per_weight:.3f} overall, "
            f"{report.file_bytes / 1e6:.2f} MB, {report.seconds:.1f} s, peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB"
        )
        _print_kept_grids(report)
    else:
        print(
            f"{report.output}: {report.scheme} ({report.method}, {report.format}), {report.quantized_layers} layers, "
            f"{report.linear_bits_per_weight:.3f} bits/weight in linears, {report.model_bits_per_weight:.3f} overall, "
            f"{report.file_bytes / 1e6:.2f} MB, mean SQNR {report.mean_sqnr_db:.2f} dB, "
            f"{report.seconds:.1f} s, peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB"
        )
        _print_outliers(report)
    return 0


def _print_kept_grids(report: QuantizeReport) -> None:
    """A quantized checkpoint converted: which linears kept its grid (exactly or with their minimums
    rounded to fp16) and which were quantized again, with the loss against the checkpoint's weights."""
    layers = [ls for ls in report.stats.layers if "kept_grid" in ls.notes]
    if not layers:
        return
    kept = [ls for ls in layers if ls.notes["kept_grid"]]
    exact = [ls for ls in kept if math.isinf(ls.sqnr_db)]
    again = [ls for ls in layers if not ls.notes["kept_grid"]]
    line = f"checkpoint grids: {len(kept)} of {len(layers)} linears kept ({len(exact)} exactly"
    if len(kept) > len(exact):
        worst = min(ls.sqnr_db for ls in kept if not math.isinf(ls.sqnr_db))
        line += f"; {len(kept) - len(exact)} with scales or minimums rounded to fp16, SQNR >= {worst:.1f} dB"
    line += ")"
    if again:
        mean = sum(ls.sqnr_db for ls in again) / len(again)
        line += (
            f"; {len(again)} quantized again from their dequantized weights (their grid does not fit "
            f"the type), mean SQNR {mean:.1f} dB against the checkpoint"
        )
    print(line)


def _print_outliers(report: QuantizeReport) -> None:
    """LLM.int8()'s outlier features per layer (when calibration measured them)."""
    layers = [ls for ls in report.stats.layers if "outlier_features" in ls.notes]
    if not layers:
        return
    print("outlier features (input columns reaching the threshold on calibration text):")
    for ls in layers:
        n = int(ls.notes["outlier_features"])
        print(f"  {ls.name:<48} {n:>5} of {ls.shape[1]:<6} max |x| {ls.notes['input_absmax']:.1f}")

"""``lowbit fit``: will this model fit in this much memory, at which context, under which scheme?"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lowbit.eval.fit import DEFAULT_SCHEMES, KV_TYPES, fit, format_table, load_model, parse_memory
from lowbit.models.presets import preset_names

DEFAULT_CONTEXT = 8192


def _machine_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "fit",
        help="memory needed by a model under each quantization scheme (weights + KV cache + overhead)",
        description=(
            "Compute, for each scheme, the exact weight bytes (tensor by tensor; GGUF mixes as llama-quantize "
            "chooses them), the KV cache for --context tokens x --batch sequences, a rough runtime overhead, "
            "whether the total fits in --memory and the longest context that would. "
            f"Presets: {', '.join(preset_names())}."
        ),
    )
    p.add_argument(
        "model",
        metavar="MODEL_OR_CONFIG",
        help="a preset name (e.g. llama-3.1-8b), a config.json, a Hugging Face model directory or a .gguf file",
    )
    p.add_argument(
        "--memory",
        default=None,
        help="memory budget: 8GiB, 8GB (=8e9 bytes), 512MiB, 24G (=24GiB); default: this machine's RAM",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help=f"context length in tokens (default: {DEFAULT_CONTEXT}, or the model's maximum if smaller)",
    )
    p.add_argument("--batch", type=int, default=1, help="parallel sequences sharing the memory (default: 1)")
    p.add_argument(
        "--kv-type", default="f16", help=f"KV cache element type: {', '.join(KV_TYPES)} (default: f16)"
    )
    p.add_argument(
        "--schemes",
        nargs="+",
        default=None,
        metavar="SCHEME",
        help=(
            "schemes to size (space or comma separated): f32 f16 bf16 fp8 nf4 nf4-dq w8 w4g128 w4g64-asym ... "
            f"and GGUF mixes Q2_K ... Q8_0, IQ4_XS ... (default: {' '.join(DEFAULT_SCHEMES)})"
        ),
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    memory = parse_memory(args.memory) if args.memory is not None else _machine_memory()
    context = args.context if args.context is not None else min(DEFAULT_CONTEXT, model.config.max_context)
    schemes = (
        [s for item in args.schemes for s in item.split(",") if s.strip()]
        if args.schemes
        else DEFAULT_SCHEMES
    )
    report = fit(model, memory, context, batch=args.batch, kv=args.kv_type, schemes=schemes)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(format_table(report))
    return 0

"""``lowbit inspect FILE_OR_DIR``: tensors, shapes, types, bits/weight, metadata, quantization config."""

from __future__ import annotations

import argparse
import json

from lowbit.inspect import inspect_path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("inspect", help="list a GGUF file's or a checkpoint's tensors, types and metadata")
    p.add_argument("path", help=".gguf file, model directory, or .safetensors file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--all", action="store_true", help="list every tensor (default: a summary and the first 40)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = inspect_path(args.path)
    if args.json:
        print(json.dumps(report, default=str))
        return 0
    print(f"{report['path']}  ({report['kind']})")
    print(
        f"  tensors: {report['n_tensors']}, parameters: {report['n_params']:,}, bytes: {report['n_bytes']:,}, "
        f"bits/weight: {report['bits_per_weight']:.3f}"
    )
    if report.get("quantization_config"):
        print(f"  quantization_config: {json.dumps(report['quantization_config'])[:400]}")
    for k, v in list(report.get("metadata", {}).items())[:40]:
        print(f"  {k} = {str(v)[:100]}")
    print("  types: " + ", ".join(f"{t}: {n}" for t, n in report["types"].items()))
    rows = report["tensors"] if args.all else report["tensors"][:40]
    width = max((len(r["name"]) for r in rows), default=10)
    for r in rows:
        print(f"  {r['name']:<{width}}  {r['type']:<8} {str(r['shape']):<18} {r['nbytes']:>12,}")
    if not args.all and len(report["tensors"]) > 40:
        print(f"  ... {len(report['tensors']) - 40} more (--all lists them)")
    return 0

"""Quantize a model in memory (``lowbit.api.simulate_scheme``) and save the dequantized weights as a
float32 Hugging Face directory: the benchmark's path for settings no checkpoint format can hold (a group
size that does not divide SmolLM2's width 576, e.g. g128: compressed-tensors, GPTQ and AWQ refuse a ragged
last group). Run as a measured child so its time and peak RSS are its own; the directory is then
evaluated like any checkpoint. Prints one JSON line: bits per weight of the quantized linears as the
codec stores them, and seconds.

Usage: python bench/simulate_child.py MODEL SCHEME METHOD OUT [--calib TEXT --samples N --seqlen L]
       [--act-order] [--static-groups] [--diag-blend B]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

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
    ap.add_argument("--act-order", action="store_true", default=None)
    ap.add_argument("--static-groups", action="store_true", default=None)
    ap.add_argument("--diag-blend", type=float, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    opts = {"act_order": args.act_order, "static_groups": args.static_groups, "diag_blend": args.diag_blend}
    calib = CalibConfig(args.calib, samples=args.samples, seqlen=args.seqlen) if args.calib else None
    with open_model(args.model) as src:
        weights, stats = simulate_scheme(
            src, args.scheme, args.method, calib=calib, method_options={k: v for k, v in opts.items() if v is not None}
        )
        seconds = time.perf_counter() - t0
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.to(torch.float32).contiguous() for k, v in weights.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        config = {k: v for k, v in src.config.items() if not k.startswith("_")}
        config.pop("torch_dtype", None)
        config["dtype"] = "float32"
        config.setdefault("architectures", [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]])
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        src.tokenizer().save_pretrained(str(tmp))
    os.replace(tmp, args.out)
    print(json.dumps({"bpw": stats.linear_bits_per_weight, "quantize_seconds": seconds}))


if __name__ == "__main__":
    main()

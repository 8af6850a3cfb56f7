"""Quantize a Hugging Face model with llm-compressor's GPTQ or AWQ on the CPU (the anchor for lowbit's).

Runs inside llm-compressor's own virtualenv (``bench/anchors/setup_llmc.sh``); it must not import lowbit.
The calibration samples come pre-tokenized (``.npy``, int64 ``(samples, seqlen)``, written by lowbit's
``calibration_tokens``) so both tools calibrate on exactly the same windows. llm-compressor's own defaults
are kept (GPTQ: dampening 0.01, blocks of 128, its default static activation order; AWQ: its default
mappings, grid and clipping); lm_head is not quantized. The result is saved compressed (compressed-tensors
``pack-quantized``).

Schemes use lowbit's names: ``wN`` (per output channel), ``wNgG`` (groups of G input columns), suffix
``-sym`` (default) or ``-asym``.

Prints one JSON line: {"seconds": ..., "quantize_seconds": ..., "method": ..., ...}.

Usage: python llmc_quantize.py HF_DIR CALIB.npy --scheme w4g64 --method gptq|awq [--actorder static|none]
       [--ignore re:.*down_proj] [--dtype float16] -o OUT
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

_SCHEME = re.compile(r"^w([2-8])(?:g(\d+))?(?:-(sym|asym))?$")


def weights_args(scheme: str) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` (as a dict) for a lowbit integer scheme name."""
    m = _SCHEME.match(scheme)
    if m is None:
        raise SystemExit(f"scheme {scheme!r}: expected wN, wNgG, with optional -sym/-asym")
    bits, group, sym = int(m.group(1)), m.group(2), m.group(3) != "asym"
    args: dict[str, Any] = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False}
    if group is None:
        args["strategy"] = "channel"
    else:
        args.update(strategy="group", group_size=int(group))
    return args


def _cpu_workarounds() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations (``IntermediatesCache.pin_memory``) before
    each mapping's grid search, to speed up host-to-GPU copies; without an accelerator torch raises
    "Cannot access accelerator device when none is available". Pinning changes no value: skip it on CPU."""
    import torch

    if torch.accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    def no_pin(self: Any, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    IntermediatesCache.pin_memory = no_pin


def _awq_mappings(model: Any, ignore: list[str]) -> dict[str, Any]:
    """AWQModifier kwargs: its default mappings for ``model``, less those whose balance layers are all
    ignored. llm-compressor 0.14 keeps such a mapping and then divides by zero averaging the (unquantized)
    balance layers' weights; with nothing ignored but lm_head this is exactly its default."""
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY, default_mappings

    arch = (getattr(model.config, "architectures", None) or [""])[0]
    mappings = AWQ_MAPPING_REGISTRY.get(arch, default_mappings)
    kept = [m for m in mappings if not set(m.balance_layers) <= set(ignore)]
    return {} if len(kept) == len(mappings) else {"mappings": kept}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="Hugging Face model directory")
    ap.add_argument("calib", type=Path, help=".npy of token ids, (samples, seqlen)")
    ap.add_argument("--scheme", required=True)
    ap.add_argument("--method", choices=["gptq", "awq"], required=True)
    ap.add_argument(
        "--actorder",
        default="default",
        choices=["default", "none", "static", "group"],
        help="GPTQ activation order (default: llm-compressor's default, static)",
    )
    ap.add_argument(
        "--bypass-divisibility",
        action="store_true",
        help="let llm-compressor quantize groups that do not divide the input width",
    )
    ap.add_argument(
        "--ignore",
        action="append",
        default=["lm_head"],
        help="module names or re:patterns to leave unquantized (lm_head always)",
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="dtype the model is loaded (and saved) in",
    )
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()

    t0 = time.perf_counter()
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = np.load(args.calib)
    if ids.ndim != 2:
        raise SystemExit(f"{args.calib}: expected (samples, seqlen) token ids, got shape {ids.shape}")
    samples, seqlen = (int(n) for n in ids.shape)
    dataset = Dataset.from_dict(
        {"input_ids": ids.astype(np.int64).tolist(), "attention_mask": np.ones_like(ids).tolist()}
    )
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    scheme = {
        "group_0": {
            "targets": ["Linear"],
            "weights": weights_args(args.scheme),
            "input_activations": None,
            "output_activations": None,
        }
    }
    quant_kwargs: dict[str, Any] = {"config_groups": scheme, "ignore": args.ignore}
    if args.bypass_divisibility:
        quant_kwargs["bypass_divisibility_checks"] = True
    recipe: list[Any]
    if args.method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        if args.actorder != "default":
            quant_kwargs["actorder"] = None if args.actorder == "none" else args.actorder
        recipe = [GPTQModifier(**quant_kwargs)]
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        recipe = [AWQModifier(**_awq_mappings(model, args.ignore)), QuantizationModifier(**quant_kwargs)]
    _cpu_workarounds()
    t1 = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=samples,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        log_dir=None,
    )
    t2 = time.perf_counter()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    model.save_pretrained(str(tmp), save_compressed=True)
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(args.output)
    t3 = time.perf_counter()
    print(
        json.dumps(
            {
                "tool": "llmcompressor",
                "method": args.method,
                "scheme": args.scheme,
                "actorder": args.actorder,
                "samples": samples,
                "seqlen": seqlen,
                "threads": torch.get_num_threads(),
                "seconds": t3 - t0,
                "load_seconds": t1 - t0,
                "quantize_seconds": t2 - t1,
                "save_seconds": t3 - t2,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

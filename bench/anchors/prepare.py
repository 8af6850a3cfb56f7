"""Inputs for the llm-compressor anchor, made with lowbit (runs in lowbit's environment, not the anchor's).

* :func:`hf_directory`: a float32 Hugging Face safetensors directory whose weights are exactly what lowbit
  reads from a model (for SmolLM2's Q4_1 GGUF: the dequantized weights, q/k rotary permutation undone),
  so both tools start from the same "original" model.
* :func:`calibration_file`: the calibration windows lowbit uses (``lowbit.walk.calibrate.calibration_tokens``)
  as a ``(samples, seqlen)`` int64 ``.npy``, so both tools see exactly the same samples.
* :func:`compare_with_transformers_gguf`: the largest difference between lowbit's GGUF weights and
  transformers' own GGUF loader (which undoes the permutation independently).

Usage: python bench/anchors/prepare.py MODEL [--hf OUT_DIR [--verify]]
                                             [--calib TEXT --samples N --seqlen L --ids OUT.npy]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from lowbit.walk.calibrate import CalibConfig, calibration_tokens
from lowbit.walk.sources import ModelSource, open_model

log = logging.getLogger(__name__)


def hf_directory(model: Path, out: Path) -> Path:
    """Write ``out`` (config.json, model.safetensors in float32, tokenizer) from ``model`` as lowbit reads
    it; returns ``out``. Atomic: the directory appears complete or not at all."""
    if (out / "config.json").is_file():
        return out
    with open_model(model) as src:
        save_float_directory(src, {name: src.read(name) for name in src.names()}, out)
    return out


def save_float_directory(src: ModelSource, tensors: Mapping[str, torch.Tensor], out: Path) -> None:
    """``out`` (config.json, model.safetensors in float32, tokenizer): ``tensors`` as a Hugging Face model
    with ``src``'s config and tokenizer. Atomic: the directory appears complete or not at all."""
    from safetensors.torch import save_file
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    floats = {name: t.to(torch.float32).contiguous() for name, t in tensors.items()}
    save_file(floats, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in src.config.items() if not k.startswith("_")}
    config.pop("torch_dtype", None)
    config["dtype"] = "float32"
    config.setdefault("architectures", [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]])
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    src.tokenizer().save_pretrained(str(tmp))
    os.replace(tmp, out)


def calibration_file(model: Path | ModelSource, text: Path, samples: int, seqlen: int, out: Path) -> Path:
    """``out`` (.npy, int64 ``(samples, seqlen)``): lowbit's calibration windows of ``text``."""
    if out.is_file():
        return out
    src = open_model(model) if isinstance(model, Path) else model
    ids = calibration_tokens(src, CalibConfig(text=text, samples=samples, seqlen=seqlen))
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, ids.numpy().astype(np.int64))
    os.replace(tmp, out)
    return out


def compare_with_transformers_gguf(gguf: Path, hf_dir: Path) -> float:
    """Max |difference| between the weights in ``hf_dir`` and transformers' GGUF loader's weights."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    theirs = {k: v.detach() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        theirs.pop("lm_head.weight", None)
    worst = 0.0
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        ours = set(f.keys())
        missing = sorted(set(theirs) ^ ours)
        if missing:
            raise RuntimeError(f"tensor names differ between lowbit and transformers: {missing[:5]}")
        for name in sorted(ours):
            a = f.get_tensor(name)
            b = theirs[name].to(torch.float32)
            if a.shape != b.shape:
                raise RuntimeError(f"{name}: lowbit {tuple(a.shape)} vs transformers {tuple(b.shape)}")
            worst = max(worst, float((a - b).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="model directory or .gguf file, as lowbit reads it")
    ap.add_argument("--hf", type=Path, help="write the float32 Hugging Face copy here")
    ap.add_argument("--verify", action="store_true", help="compare the copy with transformers' GGUF loader")
    ap.add_argument("--calib", type=Path, help="calibration text: write its token windows to --ids")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ids", type=Path, help="output .npy of (samples, seqlen) token ids")
    args = ap.parse_args()
    if args.hf is not None:
        hf_directory(args.model, args.hf)
        print(f"wrote {args.hf}")
        if args.verify:
            diff = compare_with_transformers_gguf(args.model, args.hf)
            print(f"max |lowbit - transformers gguf loader| over all tensors: {diff:.3g}")
            if diff != 0.0:
                sys.exit(1)
    if args.calib is not None:
        if args.ids is None:
            ap.error("--calib needs --ids OUT.npy")
        calibration_file(args.model, args.calib, args.samples, args.seqlen, args.ids)
        print(f"wrote {args.ids}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()

"""What llm-compressor's own stack makes of a compressed-tensors checkpoint: the expected numbers for lowbit.

Runs inside llm-compressor's virtualenv (transformers + compressed-tensors as llm-compressor pins them);
must not import lowbit. For each quantized Linear it decompresses the weight with compressed-tensors
(transformers' ``run_compressed=False`` load path) and records the sha256 of its bytes in the checkpoint's
dtype, its shape and its float64 sum; then it runs the decompressed model in float32 on a fixed text and
records the token ids and, per position, the argmax, the logsumexp and the first 8 logits.

Usage: python llmc_reference.py CHECKPOINT OUT.json [--text "Once upon a time"]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any


def dense_weights(path: Path, dtype: Any) -> dict[str, Any]:
    """Module weight name -> decompressed weight (loaded through compressed-tensors)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    model.eval()
    return {"model": model, "state": model.state_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--text", default="Once upon a time, there was a little girl named Lily. She loved")
    args = ap.parse_args()

    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from transformers import AutoTokenizer

    config = json.loads((args.checkpoint / "config.json").read_text())
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    quantized = sorted(
        {
            name.rpartition(".")[0]
            for name in _stored_names(args.checkpoint)
            if name.endswith((".weight_packed", ".weight_scale"))
        }
    )
    native = dense_weights(args.checkpoint, getattr(torch, stored))["state"]
    weights: dict[str, dict[str, Any]] = {}
    for module in quantized:
        w = native[f"{module}.weight"].detach().contiguous()
        weights[f"{module}.weight"] = {
            "dtype": str(w.dtype).removeprefix("torch."),
            "shape": list(w.shape),
            "sha256": hashlib.sha256(w.cpu().view(torch.uint8).numpy().tobytes()).hexdigest(),
            "sum": float(w.double().sum()),
        }

    model = dense_weights(args.checkpoint, torch.float32)["model"]
    tok = AutoTokenizer.from_pretrained(str(args.checkpoint))
    ids = tok(args.text, return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits[0].double()
    expected = {
        "made_with": {
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "weights": weights,
        "logits": {
            "text": args.text,
            "ids": ids[0].tolist(),
            "argmax": logits.argmax(-1).tolist(),
            "logsumexp": logits.logsumexp(-1).tolist(),
            "first8": logits[:, :8].tolist(),
        },
    }
    args.out.write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {args.out}: {len(weights)} quantized weights")


def _stored_names(path: Path) -> list[str]:
    from safetensors import safe_open

    names: list[str] = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            names += list(h.keys())
    return names


if __name__ == "__main__":
    main()

"""W8A8 compressed-tensors checkpoints (int8 and FP8, dynamic and static activations): the config and
tensors llm-compressor writes, loading in transformers, and logits equal to lowbit's evaluator, which
quantizes activations exactly as compressed-tensors does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.api import quantize, simulate_scheme
from lowbit.errors import ArgumentError, SchemeError
from lowbit.walk.calibrate import CalibConfig
from lowbit.walk.sources import open_model
from lowbit.walk.torch_model import build_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

MODEL_DIR = Path(lowbit.__file__).parent / "assets" / "models" / "stories260K"
CALIB_TEXT = Path(lowbit.__file__).parent / "assets" / "text" / "tinystories-val.txt"
IDS = torch.tensor([[1, 415, 251, 260, 93, 292, 27, 471, 263, 217, 78, 300, 12, 5, 99, 411]])
CALIB = CalibConfig(CALIB_TEXT, samples=4, seqlen=128)

# name -> (quantize kwargs, weight type, stored format, activation strategy, dynamic)
CASES = {
    "w8a8": ({"scheme": "w8a8"}, "int", "int-quantized", "token", True),
    "w8a8-static": ({"scheme": "w8a8-static", "calib": CALIB}, "int", "int-quantized", "tensor", False),
    "fp8": ({"scheme": "fp8"}, "float", "float-quantized", "token", True),
    "smoothquant": ({"scheme": None, "method": "smoothquant", "calib": CALIB}, "int", "int-quantized", "token", True),
    "smoothquant-static": (
        {"scheme": "w8a8-static", "method": "smoothquant", "calib": CALIB, "method_options": {"alpha": 0.7}},
        "int", "int-quantized", "tensor", False,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("w8a8")
    out = {}
    for name, (kwargs, *_rest) in CASES.items():
        out[name] = root / name
        quantize(MODEL_DIR, out=out[name], progress=False, **kwargs)  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_config_and_tensors(name: str, written: dict[str, Path]) -> None:
    from safetensors import safe_open

    _, wtype, fmt, strategy, dynamic = CASES[name]
    qcfg = json.loads((written[name] / "config.json").read_text())["quantization_config"]
    group = qcfg["config_groups"]["group_0"]
    assert qcfg["format"] == group["format"] == fmt
    assert group["weights"]["type"] == wtype and group["weights"]["strategy"] == "channel"
    acts = group["input_activations"]
    assert acts["num_bits"] == 8 and acts["type"] == wtype and acts["symmetric"]
    assert acts["strategy"] == strategy and acts["dynamic"] is dynamic
    with safe_open(str(written[name] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        assert w.dtype == (torch.int8 if wtype == "int" else torch.float8_e4m3fn)
        assert w.shape == (64, 172)
        scales = [k for k in keys if k.endswith(".input_scale")]
        assert len(scales) == (0 if dynamic else 35)
        for k in scales:
            s = f.get_tensor(k)
            assert s.shape == (1,) and float(s) > 0


@pytest.mark.parametrize("name", list(CASES))
def test_loads_in_transformers_with_the_same_logits(name: str, written: dict[str, Path]) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(written[name]), dtype=torch.float32).eval()
    src = open_model(written[name])
    assert len(src.activations) == 35
    with torch.no_grad():
        theirs = hf(IDS).logits
        ours = build_model(src)(IDS).logits
        weights_only = build_model(src, activations={})(IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
    # transformers quantizes the activations too: float activations give visibly different logits
    assert (weights_only - theirs).abs().max() > 1e-3


def test_simulation_equals_the_written_checkpoint(written: dict[str, Path]) -> None:
    src = open_model(MODEL_DIR)
    weights, stats = simulate_scheme(src, "w8a8-static", calib=CALIB)
    assert len(stats.activations) == 35
    sim = build_model(src, weights, activations=stats.activations)
    ckpt = build_model(open_model(written["w8a8-static"]))
    with torch.no_grad():
        torch.testing.assert_close(sim(IDS).logits, ckpt(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"scheme": "w8a8-static"}, ArgumentError, "--calib"),
        ({"scheme": "w8a8", "fmt": "gptq"}, SchemeError, "cannot be written"),
        ({"scheme": None, "method": "smoothquant", "calib": CALIB, "method_options": {"alpha": 1.5}}, ArgumentError, "alpha"),
        ({"scheme": None, "method": "smoothquant"}, ArgumentError, "calibration"),
        ({"scheme": None, "method": "gptq", "calib": CALIB}, ArgumentError, "needs a --scheme"),
        ({"scheme": "w4g64", "method": "rtn", "method_options": {"alpha": 0.5}}, ArgumentError, "no option"),
    ],
)  # fmt: skip
def test_bad_input(tmp_path: Path, kwargs: dict[str, object], error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        quantize(MODEL_DIR, out=tmp_path / "out", progress=False, **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()

"""bitsandbytes checkpoints: lowbit's files equal what transformers + bitsandbytes save, load back in
transformers on CPU, and compute what lowbit's evaluator computes (LLM.int8() activations included)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import lowbit
from lowbit.api import quantize
from lowbit.errors import ArgumentError, SchemeError
from lowbit.walk.sources import open_model
from lowbit.walk.torch_model import build_model

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

MODEL_DIR = Path(lowbit.__file__).parent / "assets" / "models" / "stories260K"
CALIB_TEXT = Path(lowbit.__file__).parent / "assets" / "text" / "tinystories-val.txt"
IDS = torch.tensor([[1, 415, 251, 260, 93, 292, 27, 471, 263, 217, 78, 300, 12, 5, 99, 411]])

# scheme -> transformers' BitsAndBytesConfig arguments that quantize the same way on load
CONFIGS: dict[str, dict[str, Any]] = {
    "int8": {"load_in_8bit": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "nf4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bnb")
    out = {}
    for scheme in CONFIGS:
        out[scheme] = root / scheme
        quantize(MODEL_DIR, scheme, out[scheme], fmt="bnb", progress=False)
    return out


def _hf_load(path: Path, **kwargs: Any) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), device_map="cpu", dtype=torch.float32, **kwargs
    )
    # bitsandbytes' AVX512-BF16 4-bit CPU kernel repacks weights in tiles of 32 output rows and asserts
    # on stories260K's 172/44-row layers; its portable path computes the same dequantize-then-matmul.
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model.eval()


@pytest.fixture(scope="module")
def transformers_saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What transformers + bitsandbytes themselves save after quantizing stories260K on load."""
    root = tmp_path_factory.mktemp("hf-bnb")
    out = {}
    for scheme, kwargs in CONFIGS.items():
        cfg = transformers.BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float32, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(MODEL_DIR), quantization_config=cfg, device_map="cpu", dtype=torch.float32
        )
        model.save_pretrained(str(root / scheme))
        out[scheme] = root / scheme
    return out


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_tensors_equal_what_transformers_and_bitsandbytes_save(
    scheme: str, written: dict[str, Path], transformers_saved: dict[str, Path]
) -> None:
    from safetensors import safe_open

    with (
        safe_open(str(written[scheme] / "model.safetensors"), "pt") as ours,
        safe_open(str(transformers_saved[scheme] / "model.safetensors"), "pt") as theirs,
    ):
        assert set(ours.keys()) == set(theirs.keys())
        for k in theirs.keys():  # noqa: SIM118 - safe_open handles are not mappings
            a, b = ours.get_tensor(k), theirs.get_tensor(k)
            assert a.dtype == b.dtype and a.shape == b.shape, k
            assert torch.equal(a, b), k
    qa = json.loads((written[scheme] / "config.json").read_text())["quantization_config"]
    qb = json.loads((transformers_saved[scheme] / "config.json").read_text())["quantization_config"]
    for key in ("quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                "bnb_4bit_use_double_quant", "llm_int8_threshold"):  # fmt: skip
        assert qa[key] == qb[key], key


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_loads_in_transformers_and_matches_lowbit(scheme: str, written: dict[str, Path]) -> None:
    hf = _hf_load(written[scheme])
    layer = hf.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("Linear8bitLt" if scheme == "int8" else "Linear4bit")
    src = open_model(written[scheme])
    assert bool(src.activations) == (scheme == "int8")
    ours = build_model(src)
    with torch.no_grad():
        a, b = ours(IDS).logits, hf(IDS).logits
        plain = build_model(src, activations={})(IDS).logits
    # LLM.int8(): lowbit's emulation of the mixed int8/fp16 matmul is bitsandbytes' own arithmetic.
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 if scheme == "int8" else 1e-4)
    if scheme == "int8":
        assert (plain - b).abs().max() > 1e-3  # activations really are quantized


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_lowbit_reads_checkpoints_transformers_saved(
    scheme: str, written: dict[str, Path], transformers_saved: dict[str, Path]
) -> None:
    ours, theirs = open_model(written[scheme]), open_model(transformers_saved[scheme])
    assert ours.names() == theirs.names()
    for n in ours.names():
        assert torch.equal(ours.read(n), theirs.read(n)), n
    assert ours.linear_bits_per_weight == pytest.approx(theirs.linear_bits_per_weight)


def test_double_quant_bits_per_weight(written: dict[str, Path]) -> None:
    """QLoRA's arithmetic: 32/64 = 0.5 bits of absmax per weight become 8/64 + 32/(64*256) = 0.127."""
    plain = open_model(written["nf4"]).linear_bits_per_weight
    dq = open_model(written["nf4-dq"]).linear_bits_per_weight
    assert plain is not None and dq is not None
    assert plain == pytest.approx(4.5, abs=0.01)  # the odd-sized tail blocks cost a little
    assert plain - dq == pytest.approx(0.373, abs=0.01)


def test_llm_int8_threshold_and_outliers(tmp_path: Path) -> None:
    rep = quantize(
        MODEL_DIR,
        None,
        tmp_path / "int8",
        method="llm-int8",
        threshold=3.0,
        progress=False,
        calib=lowbit.walk.calibrate.CalibConfig(CALIB_TEXT, samples=4, seqlen=64),
    )
    assert rep.scheme == "int8" and rep.format == "bnb"
    cfg = json.loads((tmp_path / "int8" / "config.json").read_text())["quantization_config"]
    assert cfg["llm_int8_threshold"] == 3.0
    notes = rep.to_json_dict()["layer_notes"]
    assert isinstance(notes, dict) and len(notes) == rep.quantized_layers
    counts = [n["outlier_features"] for n in notes.values()]
    assert all(0 <= c <= 172 for c in counts) and sum(counts) > 0
    src = open_model(tmp_path / "int8")
    assert {a.spec.threshold for a in src.activations.values()} == {3.0}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"scheme": "int8", "threshold": 0.0}, ArgumentError, "threshold"),
        ({"scheme": "nf4", "threshold": 6.0}, ArgumentError, "LLM.int8"),
        ({"scheme": "w8a8", "fmt": "bnb"}, SchemeError, "cannot be written"),
        ({"scheme": "w4g64", "fmt": "bnb"}, SchemeError, "cannot be written"),
        ({"scheme": "int8", "fmt": "compressed-tensors"}, SchemeError, "cannot be written"),
    ],
)
def test_bad_input(tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        quantize(MODEL_DIR, out=tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()

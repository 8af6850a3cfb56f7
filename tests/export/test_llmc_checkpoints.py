"""Checkpoints written by llm-compressor are read by lowbit exactly as llm-compressor's own stack reads them.

The checkpoints and their expected numbers live in ``tests/data/llmc`` (see its README): the numbers were
computed in llm-compressor's virtualenv (compressed-tensors' decompression, transformers' forward pass), so
these tests compare lowbit with the other tool, not with itself.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit.cli.main import main
from lowbit.walk.sources import SafetensorsSource, open_model
from lowbit.walk.torch_model import build_model, logits_fn

DATA = Path(__file__).resolve().parents[1] / "data" / "llmc"
CASES = ("stories260K-gptq-w4", "stories260K-awq-w4g32-asym")
STORIES = Path(lowbit.__file__).parent / "assets" / "models" / "stories260K"
TEXT = Path(lowbit.__file__).parent / "assets" / "text" / "tinystories-val.txt"


def _expected(case: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((DATA / case / "expected.json").read_text())
    return result


def _stored(case: str) -> dict[str, torch.Tensor]:
    with safe_open(str(DATA / case / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("case", CASES)
def test_weights_equal_compressed_tensors_decompression(case: str) -> None:
    """Every quantized Linear dequantizes to exactly the bytes compressed-tensors produced (after the
    rounding to the checkpoint's float16 that compressed-tensors' ``(q - z) * s`` makes); everything else
    is passed through as stored."""
    exp = _expected(case)["weights"]
    stored = _stored(case)
    src = open_model(DATA / case)
    assert isinstance(src, SafetensorsSource)
    decoded = {n for n in src.names() if n not in stored}
    assert decoded == set(exp), "lowbit decodes exactly the Linears llm-compressor quantized"
    for name, e in exp.items():
        w = src.read(name)
        assert list(w.shape) == e["shape"]
        w = w.to(getattr(torch, e["dtype"])).contiguous()
        assert hashlib.sha256(w.view(torch.uint8).numpy().tobytes()).hexdigest() == e["sha256"], name
        assert float(w.double().sum()) == pytest.approx(e["sum"], rel=1e-12, abs=1e-12)
    for name in src.names():
        if name in stored:
            assert torch.equal(src.read(name), stored[name]), name
    bpw = src.linear_bits_per_weight
    assert bpw is not None and 4.0 < bpw < 5.0


def test_awq_case_has_row_packed_zero_points() -> None:
    """The asymmetric case is what makes this test worth having: zero points are int32, 8 per word along
    the output rows, one column per group (and there is an unquantized Linear beside the quantized ones)."""
    stored = _stored("stories260K-awq-w4g32-asym")
    zp = stored["model.layers.0.mlp.gate_proj.weight_zero_point"]
    assert zp.dtype == torch.int32 and tuple(zp.shape) == (22, 2)  # ceil(172 * 4 / 32), 64 / 32
    assert "model.layers.0.mlp.down_proj.weight" in stored
    cfg = json.loads((DATA / "stories260K-gptq-w4" / "config.json").read_text())
    assert cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] == "static"


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers_on_the_decompressed_model(case: str) -> None:
    exp = _expected(case)["logits"]
    model = build_model(open_model(DATA / case))
    logits = logits_fn(model)(torch.tensor([exp["ids"]]))[0].double()
    assert logits.argmax(-1).tolist() == exp["argmax"]
    torch.testing.assert_close(
        logits.logsumexp(-1), torch.tensor(exp["logsumexp"], dtype=torch.float64), rtol=0, atol=1e-4
    )
    torch.testing.assert_close(
        logits[:, :8], torch.tensor(exp["first8"], dtype=torch.float64), rtol=0, atol=1e-4
    )


def _run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result: dict[str, Any] = json.loads(out[-1])
    return result


@pytest.mark.parametrize("case", CASES)
def test_cli_inspect_and_eval(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = DATA / case
    info = _run_json(capsys, ["inspect", str(ckpt), "--json"])
    assert info["quantization_config"]["format"] == "pack-quantized"
    with safe_open(str(STORIES / "model.safetensors"), framework="pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    assert info["n_params"] == n_params
    res = _run_json(
        capsys,
        [
            "eval",
            str(ckpt),
            "--ref",
            str(STORIES),
            "--text",
            str(TEXT),
            "--ctx",
            "128",
            "--chunks",
            "4",
            "--cache-dir",
            str(tmp_path),
            "--json",
        ],
    )
    src = open_model(ckpt)
    assert isinstance(src, SafetensorsSource)
    assert res["bpw"] == pytest.approx(src.linear_bits_per_weight)
    assert 0.0 < res["kld_mean"] < 0.5 and 0.7 < res["top1"] < 1.0 and res["ppl"] > res["ref_ppl"]

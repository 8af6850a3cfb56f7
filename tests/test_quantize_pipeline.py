"""End to end: ``lowbit.api.quantize`` on the bundled stories260K, the output loaded by transformers and by
lowbit, atomic outputs, and the one-line errors a user gets for bad inputs (library and CLI)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
import lowbit.api
from lowbit.api import QuantizeReport, quantize, simulate_scheme
from lowbit.cli.main import main
from lowbit.errors import (
    InputFileError,
    NonFiniteWeightError,
    OutputExistsError,
    SchemeError,
    ShapeError,
    UnsupportedArchitectureError,
)
from lowbit.walk import quantize_walk
from lowbit.walk.sources import SafetensorsSource, open_model
from lowbit.walk.torch_model import build_model

MODEL_DIR = Path(lowbit.__file__).parent / "assets" / "models" / "stories260K"
GGUF = "data/golden/stories260K-f32.gguf"
# w4g4: 4 divides both widths of the model (64, 172); w4g32 does not divide 172.
SCHEMES = ("w4", "w8", "w4-asym", "w3-asym", "w4g4", "fp8")
FORMAT = {"fp8": "float-quantized"}  # the rest are pack-quantized
N_LINEARS = 5 * 7
PROMPT = "Once upon a time, there was a little girl named Lily"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, QuantizeReport]]:
    """``written(scheme)``: stories260K quantized with ``scheme`` (once per module), and the report."""
    root = tmp_path_factory.mktemp("outputs")
    cache: dict[str, tuple[Path, QuantizeReport]] = {}

    def get(scheme: str) -> tuple[Path, QuantizeReport]:
        if scheme not in cache:
            out = root / scheme
            cache[scheme] = (out, quantize(MODEL_DIR, scheme, out, progress=False))
        return cache[scheme]

    return get


@pytest.fixture(scope="module")
def prompt_ids() -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(MODEL_DIR)(PROMPT, return_tensors="pt")["input_ids"]
    assert isinstance(ids, torch.Tensor)
    return ids


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _linear_names() -> list[str]:
    with open_model(MODEL_DIR) as src:
        return [n for n in src.names() if src.arch.is_quantizable(n)]


def _open_output(path: Path) -> SafetensorsSource:
    src = open_model(path)
    assert isinstance(src, SafetensorsSource)
    return src


def _copy_model(dst: Path) -> Path:
    shutil.copytree(MODEL_DIR, dst)
    return dst


def _assert_nothing_written(parent: Path) -> None:
    assert sorted(p.name for p in parent.iterdir()) == [], "a failed run left files behind"


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------ what is written
@pytest.mark.parametrize("scheme", SCHEMES)
def test_transformers_loads_output_like_lowbit(
    scheme: str, written: Callable[[str], tuple[Path, QuantizeReport]], prompt_ids: torch.Tensor
) -> None:
    from transformers import AutoModelForCausalLM

    out, report = written(scheme)
    config = json.loads((out / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg["format"] == FORMAT.get(scheme, "pack-quantized")
    assert qcfg["config_groups"]["group_0"]["weights"]["type"] == ("float" if scheme == "fp8" else "int")
    assert report.quantized_layers == N_LINEARS and report.format == "compressed-tensors"

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    src = _open_output(out)
    with src:
        # The report's bits/weight are what the file stores.
        assert src.linear_bits_per_weight == pytest.approx(report.linear_bits_per_weight, rel=1e-12)
        simulated = build_model(src)
        got, want = _logits(loaded, prompt_ids), _logits(simulated, prompt_ids)
        rel = _rel(got, want)
        assert rel <= 1e-4, f"{scheme}: transformers and lowbit logits differ by {rel:.2e} relative"
        # Stronger: after the first forward transformers holds lowbit's dequantized weights bit for bit.
        for name in _linear_names():
            assert torch.equal(loaded.get_parameter(name).float(), src.read(name)), name

    # The quantization did something: the logits moved away from the original model's.
    original = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    assert _rel(got, _logits(original, prompt_ids)) > 1e-5


@pytest.mark.parametrize("scheme", SCHEMES)
def test_simulation_equals_what_is_written(
    scheme: str, written: Callable[[str], tuple[Path, QuantizeReport]]
) -> None:
    out, _ = written(scheme)
    with open_model(MODEL_DIR) as orig:
        simulated, stats = simulate_scheme(orig, scheme)
        originals = {n: orig.read(n) for n in _linear_names()}
    assert len(stats.layers) == N_LINEARS
    with open_model(out) as src:
        assert sorted(src.names()) == sorted(simulated)
        for name, w in simulated.items():
            back = src.read(name)
            assert back.dtype == w.dtype and torch.equal(back, w), name
    assert all(not torch.equal(simulated[n], w) for n, w in originals.items())


def test_inspect_reports_the_quantization(
    written: Callable[[str], tuple[Path, QuantizeReport]], capsys: pytest.CaptureFixture[str]
) -> None:
    bpw: dict[str, float] = {}
    for scheme in ("w4", "fp8"):
        out, _ = written(scheme)
        assert main(["inspect", str(out), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        config = json.loads((out / "config.json").read_text())
        assert report["quantization_config"] == config["quantization_config"]
        bpw[scheme] = report["bits_per_weight"]
    assert main(["inspect", str(MODEL_DIR), "--json"]) == 0
    original = json.loads(capsys.readouterr().out)
    assert original["quantization_config"] is None and original["bits_per_weight"] == 32.0
    assert bpw["w4"] < bpw["fp8"] < 32.0


# ------------------------------------------------------------------------------------ atomic outputs
def _failing_walk(parent: Path, fail_at: int) -> Callable[..., Iterator[quantize_walk.WalkItem]]:
    real = quantize_walk.walk_quantize

    def walk(*args: Any, **kwargs: Any) -> Iterator[quantize_walk.WalkItem]:
        for i, item in enumerate(real(*args, **kwargs)):
            if i == fail_at:
                # The run is really mid-way: its temporary directory exists.
                assert any(".lowbit-tmp-" in p.name for p in parent.iterdir())
                raise RuntimeError("boom")
            yield item

    return walk


def test_failed_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parent = tmp_path / "runs"
    parent.mkdir()
    monkeypatch.setattr(lowbit.api, "walk_quantize", _failing_walk(parent, fail_at=20))
    with pytest.raises(RuntimeError, match="boom"):
        quantize(MODEL_DIR, "w4", parent / "out", progress=False)
    _assert_nothing_written(parent)


def test_failed_forced_run_keeps_the_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("old")
    monkeypatch.setattr(lowbit.api, "walk_quantize", _failing_walk(tmp_path, fail_at=20))
    with pytest.raises(RuntimeError, match="boom"):
        quantize(MODEL_DIR, "w4", out, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["marker"]


def test_existing_output_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        quantize(MODEL_DIR, "w4", out, progress=False)
    assert main(["quantize", str(MODEL_DIR), "--scheme", "w4", "-o", str(out)]) == 2
    assert "exists" in _one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["marker"]

    quantize(MODEL_DIR, "w4", out, force=True, progress=False)
    assert "marker" not in {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old directories
    src = _open_output(out)
    with src:
        assert src.linear_bits_per_weight is not None


# ------------------------------------------------------------------------------------ refused schemes
def _walk_must_not_run(*args: Any, **kwargs: Any) -> Iterator[quantize_walk.WalkItem]:
    raise AssertionError("the walk started before the scheme was checked")


@pytest.mark.parametrize(
    ("scheme", "fmt", "error", "match"),
    [
        ("w4g32", None, ShapeError, "ragged"),
        ("nf4", "compressed-tensors", SchemeError, "nf4"),
        ("fp8-e5m2", None, SchemeError, "e4m3"),
    ],
)
def test_refused_before_anything_is_written(
    scheme: str,
    fmt: str | None,
    error: type[Exception],
    match: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    parent = tmp_path / "runs"
    parent.mkdir()
    monkeypatch.setattr(lowbit.api, "walk_quantize", _walk_must_not_run)
    with pytest.raises(error, match=match):
        quantize(MODEL_DIR, scheme, parent / "out", fmt=fmt, progress=False)
    argv = ["quantize", str(MODEL_DIR), "--scheme", scheme, "-o", str(parent / "out")]
    assert main(argv + (["--format", fmt] if fmt else [])) == 2
    assert match in _one_error_line(capsys)
    _assert_nothing_written(parent)


# ------------------------------------------------------------------------------------ bad inputs
def test_nan_weight_is_named(tmp_path: Path) -> None:
    model = _copy_model(tmp_path / "model")
    state = load_file(model / "model.safetensors")
    bad = "model.layers.2.mlp.up_proj.weight"
    state[bad][3, 5] = float("nan")
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    parent = tmp_path / "runs"
    parent.mkdir()
    with pytest.raises(NonFiniteWeightError, match=bad.replace(".", r"\.")):
        quantize(model, "w4", parent / "out", progress=False)
    _assert_nothing_written(parent)


def test_truncated_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _copy_model(tmp_path / "model")
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(InputFileError, match="model.safetensors"):
        quantize(model, "w4", out, progress=False)
    assert main(["quantize", str(model), "--scheme", "w4", "-o", str(out)]) == 2
    assert "model.safetensors" in _one_error_line(capsys)
    assert not out.exists()


def test_pickle_only_model_dir(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(MODEL_DIR / "config.json", model / "config.json")
    (model / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(InputFileError, match="safetensors"):
        quantize(model, "w4", tmp_path / "out", progress=False)


def test_unknown_model_type(tmp_path: Path) -> None:
    model = _copy_model(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "no_such_model"
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match=r"no_such_model.*supported: .*llama"):
        quantize(model, "w4", tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------ GGUF input
@pytest.mark.shared
def test_gguf_input(
    shared_file: Callable[[str], Path],
    tmp_path: Path,
    written: Callable[[str], tuple[Path, QuantizeReport]],
    prompt_ids: torch.Tensor,
) -> None:
    """The f32 GGUF of stories260K quantizes to the very checkpoint its safetensors original does (so
    the q/k un-permutation is right), and transformers loads it."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "from-gguf"
    report = quantize(shared_file(GGUF), "w4", out, progress=False)
    assert report.quantized_layers == N_LINEARS
    from_gguf = load_file(out / "model.safetensors")
    from_dir = load_file(written("w4")[0] / "model.safetensors")
    assert sorted(from_gguf) == sorted(from_dir)
    for name, t in from_gguf.items():
        assert t.dtype == from_dir[name].dtype and torch.equal(t, from_dir[name]), name

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with open_model(out) as src:
        rel = _rel(_logits(loaded, prompt_ids), _logits(build_model(src), prompt_ids))
    assert rel <= 1e-4, f"logits differ by {rel:.2e} relative"

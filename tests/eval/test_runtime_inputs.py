"""A GGUF file is evaluated as llama.cpp's CPU backend runs it: each matmul's input converted to its weight
type's dot-product type (Q8_0/Q8_1/Q8_K, fp16/bf16), unless asked for float inputs; the reference never is.

Agreement with ``llama-perplexity`` itself is checked on tiny256 in ``tests/export/test_gguf_walk.py`` and
measured in ``bench/gguf_agreement.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowbit.api import quantize
from lowbit.cli.main import main
from lowbit.eval.run import evaluate_source, inputs_label, llama_cpp_inputs, prepare_reference
from lowbit.formats.gguf.dot_input import GGMLDotInput
from lowbit.walk.sources import open_model

ROOT = Path(__file__).resolve().parents[2]
STORIES = ROOT / "src" / "lowbit" / "assets" / "models" / "stories260K"
TEXT = ROOT / "src" / "lowbit" / "assets" / "text" / "tinystories-val.txt"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime-inputs")
    (root / "eval.txt").write_bytes(TEXT.read_bytes()[-30_000:])
    out = {"text": root / "eval.txt"}
    for scheme in ("Q8_0", "Q4_K_M", "Q4_1"):
        out[scheme] = root / f"{scheme}.gguf"
        quantize(STORIES, scheme, out[scheme], progress=False)
    return out


def test_every_linear_and_the_head_take_their_weights_input_type(files: dict[str, Path]) -> None:
    src = open_model(files["Q4_K_M"])
    acts = llama_cpp_inputs(src)
    linears = {n[: -len(".weight")] for n in src.names() if src.arch.is_quantizable(n)}
    assert linears and linears | {"lm_head"} == set(acts)
    head_from = "lm_head.weight" if "lm_head.weight" in src.names() else "model.embed_tokens.weight"
    for module, act in acts.items():
        assert isinstance(act.spec, GGMLDotInput)
        weight = head_from if module == "lm_head" else f"{module}.weight"
        assert act.spec.weight_type.name == src.info(weight).storage
    # stories260K's widths (64, 172) are not multiples of 256: its Q4_K_M falls back to 32-blocks and F16
    kinds = sorted({a.spec.input_type.name for a in acts.values() if isinstance(a.spec, GGMLDotInput)})
    assert inputs_label(src) == f"llama.cpp CPU: {', '.join(kinds)} inputs"
    assert "Q8_1" in inputs_label(open_model(files["Q4_1"]))
    assert inputs_label(src, runtime_inputs=False) == "float"
    assert llama_cpp_inputs(open_model(STORIES)) == {}


def test_8_bit_inputs_cost_what_the_weights_alone_do_not(files: dict[str, Path]) -> None:
    """A Q8_0 file: the input rounding is most of what llama.cpp loses on it (tiny256: 0.00023 against
    0.00006 with float inputs)."""
    setup = prepare_reference(STORIES, files["text"], ctx=128, chunks=8, progress=False)
    runtime = evaluate_source(setup, files["Q8_0"], progress=False).kld_mean
    weights_only = evaluate_source(setup, files["Q8_0"], progress=False, runtime_inputs=False).kld_mean
    assert runtime > 1.5 * weights_only > 0, (runtime, weights_only)


def test_a_gguf_reference_is_its_weights_with_float_inputs(files: dict[str, Path]) -> None:
    setup = prepare_reference(files["Q4_K_M"], files["text"], ctx=128, chunks=4, progress=False)
    assert evaluate_source(setup, files["Q4_K_M"], progress=False, runtime_inputs=False).kld_mean < 1e-9
    assert evaluate_source(setup, files["Q4_K_M"], progress=False).kld_mean > 1e-6


def test_cli_says_how_the_inputs_were_multiplied(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    base = ["eval", str(files["Q8_0"]), "--ref", str(STORIES), "--text", str(files["text"])]
    base += ["--ctx", "128", "--chunks", "4", "--cache-dir", str(tmp_path), "--json"]
    res = {}
    for extra in ([], ["--float-inputs"]):
        assert main([*base, *extra]) == 0
        res[bool(extra)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res[False]["inputs"].startswith("llama.cpp CPU:") and "Q8_0" in res[False]["inputs"]
    assert res[True]["inputs"] == "float"
    assert res[False]["kld_mean"] != res[True]["kld_mean"]

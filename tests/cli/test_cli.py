"""The command line contract: subcommands, --json fields, one-line errors with exit code 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lowbit.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
STORIES = ROOT / "src" / "lowbit" / "assets" / "models" / "stories260K"
TEXT = ROOT / "src" / "lowbit" / "assets" / "text" / "tinystories-val.txt"
GPTQ_W4 = ["quantize", str(STORIES), "--method", "gptq", "--scheme", "w4"]


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:  # type: ignore[type-arg]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, "--json prints exactly one line"
    return json.loads(out[0])


def test_eval_json_contract_and_independent_ppl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lowbit's perplexity of the unquantized model equals a plain transformers computation on the same
    windows (llama.cpp's: BOS over each window's first token, the second half scored)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx, chunks = 128, 6
    res = run_json(
        capsys,
        [
            "eval",
            str(STORIES),
            "--ref",
            str(STORIES),
            "--text",
            str(TEXT),
            "--ctx",
            str(ctx),
            "--chunks",
            str(chunks),
            "--cache-dir",
            str(tmp_path),
            "--json",
        ],
    )
    for key in ("ppl", "ref_ppl", "kld_mean", "kld_p99", "top1", "tokens", "bpw"):
        assert key in res
    assert res["bpw"] is None and res["tokens"] == chunks * (ctx - 1 - ctx // 2)
    assert res["kld_mean"] == pytest.approx(0.0, abs=1e-9) and res["top1"] == 1.0

    tok = AutoTokenizer.from_pretrained(str(STORIES))
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    ids = [1] + tok.encode(TEXT.read_text(), add_special_tokens=False)
    nll = []
    for i in range(chunks):
        window = torch.tensor(ids[i * ctx : (i + 1) * ctx])
        window[0] = 1
        with torch.no_grad():
            logits = model(window[None]).logits[0].double()
        first = ctx // 2
        nll.append(F.cross_entropy(logits[first : ctx - 1], window[first + 1 :], reduction="none"))
    expected = math.exp(torch.cat(nll).mean().item())
    assert res["ppl"] == pytest.approx(expected, rel=1e-6)
    assert res["ref_ppl"] == pytest.approx(expected, rel=1e-6)


def test_quantize_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w4"
    q = run_json(capsys, ["quantize", str(STORIES), "--scheme", "w4-asym", "-o", str(out), "--json"])
    assert q["quantized_layers"] == 35 and 4.0 < q["bpw"] < 5.0 and q["file_bytes"] > 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    res = run_json(
        capsys,
        [
            "eval",
            str(out),
            "--ref",
            str(STORIES),
            "--text",
            str(TEXT),
            "--ctx",
            "128",
            "--chunks",
            "4",
            "--cache-dir",
            str(tmp_path / "c"),
            "--json",
        ],
    )
    assert res["bpw"] == pytest.approx(q["bpw"])
    assert 0.0 < res["kld_mean"] < 1.0 and 0.5 < res["top1"] < 1.0 and res["ppl"] > res["ref_ppl"]
    info = run_json(capsys, ["inspect", str(out), "--json"])
    assert info["quantization_config"]["format"] == "pack-quantized"
    assert info["n_params"] == sum(p.numel() for p in _stories_params())
    assert 8 < info["bits_per_weight"] < 32  # fp32 embeddings dominate this tiny model


def _stories_params() -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(str(STORIES / "model.safetensors")).values())


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["quantize", "nope/dir", "--scheme", "w4", "-o", "{tmp}/o"], "does not exist"),
        (["quantize", str(STORIES), "--scheme", "w11", "-o", "{tmp}/o"], "unknown scheme"),
        (["quantize", str(STORIES), "--scheme", "w4g32", "-o", "{tmp}/o"], "ragged last group"),
        (
            ["quantize", str(STORIES), "--scheme", "w4", "--method", "magic", "-o", "{tmp}/o"],
            "unknown method",
        ),
        (["quantize", str(STORIES), "--scheme", "w4", "-o", "{tmp}"], "exists; pass --force"),
        (
            ["quantize", str(STORIES), "--scheme", "w4", "--method", "gptq", "--calib", "{tmp}/no.txt"]
            + ["-o", "{tmp}/o"],
            "does not exist",
        ),
        (
            ["quantize", str(STORIES), "--scheme", "w4", "--method", "awq", "--calib", "{tmp}/empty.txt"]
            + ["-o", "{tmp}/o"],
            "is empty",
        ),
        (
            ["quantize", str(STORIES), "--scheme", "w4", "--method", "gptq", "--calib", "{tmp}/short.txt"]
            + ["-o", "{tmp}/o"],
            "fewer than one window",
        ),
        (
            ["quantize", str(STORIES), "--scheme", "w4g32", "--method", "gptq", "--format", "gptq"]
            + ["--calib", str(TEXT), "-o", "{tmp}/o"],
            "ragged last group",
        ),
        (
            ["quantize", str(STORIES), "--scheme", "w4g32-asym", "--method", "awq", "--format", "awq"]
            + ["--calib", str(TEXT), "-o", "{tmp}/o"],
            "must divide the input width",
        ),
        (["eval", str(STORIES), "--ref", str(STORIES), "--text", "{tmp}/missing.txt"], "does not exist"),
        (["eval", str(STORIES), "--ref", str(STORIES), "--text", str(TEXT), "--ctx", "2"], "context"),
        (["inspect", "{tmp}/nothing.gguf"], "does not exist"),
        (["quantize", str(STORIES), "--scheme", "w8a8-static", "-o", "{tmp}/o"], "--calib"),
        (["quantize", str(STORIES), "--method", "smoothquant", "-o", "{tmp}/o"], "calibration"),
        (["quantize", str(STORIES), "--scheme", "w8a8", "--alpha", "0.5", "-o", "{tmp}/o"], "--alpha"),
        (["quantize", str(STORIES), "--scheme", "w8a8", "--smooth", "norms", "-o", "{tmp}/o"], "--smooth"),
        (["quantize", str(STORIES), "--scheme", "w4", "--act-order", "none", "-o", "{tmp}/o"], "GPTQ's"),
        *(
            (GPTQ_W4 + [flag, value, "--calib", str(TEXT), "-o", "{tmp}/o"], message)
            for flag, value, message in (("--diag-blend", "1.5", "diag_blend"), ("--damp", "-1", "damp"))
        ),
        (
            GPTQ_W4 + ["--scheme", "w4g4", "--act-order", "group", "--calib", str(TEXT), "-o", "{tmp}/o"],
            "g_idx",
        ),
        (
            [
                "quantize",
                str(STORIES),
                "--method",
                "smoothquant",
                "--alpha",
                "2",
                "--calib",
                str(TEXT),
                "-o",
                "{tmp}/o",
            ],
            "[0, 1]",
        ),
        (["quantize", str(STORIES), "--method", "llm-int8", "--threshold", "-1", "-o", "{tmp}/o"], "> 0"),
        (["quantize", str(STORIES), "--scheme", "w4", "--threshold", "6", "-o", "{tmp}/o"], "LLM.int8"),
        (["quantize", str(STORIES), "--scheme", "w4", "--double-quant", "-o", "{tmp}/o"], "nf4 or fp4"),
        (
            ["quantize", str(STORIES), "--scheme", "w8a8", "--format", "awq", "-o", "{tmp}/o"],
            "cannot be written",
        ),
        (
            ["quantize", str(STORIES), "--scheme", "nf4", "--format", "compressed-tensors", "-o", "{tmp}/o"],
            "cannot",
        ),
    ],
)
def test_errors_are_one_line_exit_2(
    argv: list[str], pattern: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Once upon a time.")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], err
    assert not list(tmp_path.glob(".*lowbit-tmp*")) and not (tmp_path / "o").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_demo_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo compares GGUF mixes with the Hugging Face formats on the bundled tiny256 (held-out
    TinyStories): quality floors measured 2026-12-08 (Q8_0 0.00009, Q4_K_M 0.0027, nf4 0.0038 at 40 chunks)."""
    out = tmp_path / "demo"
    argv = ["demo", "--schemes", "Q8_0,Q4_K_M,w8a8,nf4", "--chunks", "8", "--memory", "72MiB", "-o", str(out)]
    res = run_json(capsys, [*argv, "--json"])
    rows = {r["name"]: r for r in res["rows"]}
    assert [rows[n]["format"] for n in ("Q8_0", "Q4_K_M", "w8a8", "nf4")] == [
        "gguf",
        "gguf",
        "compressed-tensors",
        "bnb",
    ]
    assert rows["Q8_0"]["kld_mean"] < 0.001 and rows["Q4_K_M"]["kld_mean"] < 0.01
    assert (
        rows["Q8_0"]["kld_mean"] < rows["Q4_K_M"]["kld_mean"]
        and rows["w8a8"]["kld_mean"] < rows["nf4"]["kld_mean"]
    )
    assert rows["Q4_K_M"]["inputs"] == "llama.cpp CPU: Q8_K inputs"
    assert res["recommended"]["fits"] and res["recommended"]["name"] in rows
    assert rows["Q4_K_M"]["task_items"] == 40 and "task_flips" in rows["nf4"]  # the bundled task
    assert (out / "report.html").is_file() and (out / "files" / "Q4_K_M.gguf").is_file()
    # a second run replaces the demo's own directory; a directory that is not one is refused
    assert main([*argv, "--schemes", "Q8_0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["rows"][0]["name"] == "Q8_0"
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert main(["demo", "--schemes", "Q8_0", "-o", str(other)]) == 2
    assert (other / "notes.txt").read_text() == "keep"


def test_w8a8_quantize_then_eval_quantizes_activations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sq"
    q = run_json(
        capsys,
        ["quantize", str(STORIES), "--method", "smoothquant", "--alpha", "auto", "--calib", str(TEXT),
         "--samples", "4", "--seqlen", "128", "-o", str(out), "--json"],
    )  # fmt: skip
    assert q["scheme"] == "w8a8" and q["method"] == "smoothquant"
    res = run_json(
        capsys,
        [
            "eval",
            str(out),
            "--ref",
            str(STORIES),
            "--text",
            str(TEXT),
            "--chunks",
            "4",
            "--ctx",
            "128",
            "--json",
        ],
    )
    assert 0.0 < res["kld_mean"] < 0.05 and res["top1"] > 0.9


def test_gptq_options_reach_the_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--act-order and --diag-blend change GPTQ's codes (the default is act-order static, blended). (stories260K's width 172 takes no group size that GPTQ kernels load, so act-order with
    dynamic groups, which only --format gptq stores, is tested on tiny256 in tests/export/test_hf_gptq.py.)"""
    from safetensors.torch import load_file

    def run(name: str, flags: list[str]) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        q = run_json(
            capsys,
            ["quantize", str(STORIES), "--method", "gptq", "--scheme", "w4g4", *flags, "--calib", str(TEXT),
             "--samples", "4", "--seqlen", "128", "-o", str(out), "--json"],
        )  # fmt: skip
        assert q["method"] == "gptq" and q["format"] == "compressed-tensors"
        return load_file(str(out / "model.safetensors"))

    plain = run("plain", ["--diag-blend", "0", "--act-order", "none"])
    act = run("act", ["--diag-blend", "0", "--act-order", "static"])
    default = run("default", [])
    key = "model.layers.0.mlp.down_proj.weight_packed"
    assert not torch.equal(plain[key], act[key])
    assert not torch.equal(act[key], default[key])  # the blend
    assert run("explicit", ["--act-order", "static", "--diag-blend", "0.25"])[key].equal(default[key])


def test_only_the_named_subcommand_is_imported(capsys: pytest.CaptureFixture[str]) -> None:
    """`lowbit quantize ...` builds a parser with that subcommand alone (the others' imports are not
    paid for); without a subcommand, or with an unknown one, the full parser answers."""
    import subprocess
    import sys

    from lowbit.cli.main import SUBCOMMANDS, _subcommand, build_parser

    assert _subcommand(["-v", "quantize", "m.gguf", "--scheme", "Q4_0"]) == "quantize"
    assert _subcommand(["--version"]) is None and _subcommand(["bogus"]) is None
    assert set(build_parser(only="inspect")._subparsers._group_actions[0].choices) == {"inspect"}  # type: ignore[union-attr]
    child = (
        "import contextlib, sys\n"
        "import lowbit.cli.main as m\n"
        "with contextlib.suppress(SystemExit):\n"
        "    m.main(['inspect', '--help'])\n"
        "print(sorted(k for k in sys.modules if k.startswith('lowbit.cli.') and k != 'lowbit.cli.main'))\n"
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['lowbit.cli.inspect']"
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in SUBCOMMANDS)

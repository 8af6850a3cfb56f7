"""A GPTQ, AWQ or compressed-tensors checkpoint converted to GGUF without rounding twice.

``lowbit quantize CHECKPOINT --scheme Q4_0 -o out.gguf`` keeps each linear's stored codes and scales
where the mix's block type holds the checkpoint's grid (symmetric int4 with groups of a multiple of 32
or one scale per row -> Q4_0/Q5_0/Q8_0 exactly; asymmetric int4 -> Q5_0/Q5_1 exactly, Q4_1 with the
minimums rounded to fp16), and quantizes the others again from their dequantized weights, saying so.
The checkpoints are the llm-compressor and GPTQModel files of ``tests/data`` (stories260K: widths 64 and
172), with the bundled model's tokenizer beside them.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from llama_tools import run_logged

from lowbit.api import quantize
from lowbit.cli.main import main
from lowbit.walk.sources import open_model

DATA = Path(__file__).resolve().parents[1] / "data"


def _stories_dir() -> Path:
    import lowbit

    return Path(lowbit.__file__).parent / "assets" / "models" / "stories260K"


def _with_tokenizer(ckpt: Path, tmp: Path) -> Path:
    """A copy of a test checkpoint with stories260K's tokenizer (the GGUF needs one)."""
    out = tmp / ckpt.name
    shutil.copytree(ckpt, out)
    for f in _stories_dir().glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


def _linears(gguf: Path, ckpt: Path) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, the GGUF's weight as lowbit reads it, the checkpoint's dequantized weight) per linear the
    checkpoint stores quantized and the mix quantizes (stories260K's 172-wide down_proj stays F16)."""
    with open_model(gguf) as g, open_model(ckpt) as c:
        names = [n for n in c.names() if c.read_stored(n) is not None and g.info(n).storage != "F16"]
        return [(n, g.read(n).float(), c.read(n).float()) for n in names]


@pytest.mark.parametrize(
    ("ckpt", "mix"),
    [
        ("llmc/stories260K-gptq-w4", "Q4_0"),  # symmetric, one scale per row
        ("llmc/stories260K-gptq-w4", "Q8_0"),
        ("gptqmodel/stories260K-gptq-w4", "Q4_0"),  # GPTQ's own packing (zero point 8)
        ("llmc/stories260K-awq-w4g32-asym", "Q5_1"),  # asymmetric g32: a shifted min, -16 s
        ("llmc/stories260K-awq-w4g32-asym", "Q5_0"),  # s (q - z), q - z in -15..15
    ],
)
def test_grids_that_fit_are_kept_exactly(ckpt: str, mix: str, tmp_path: Path) -> None:
    src = _with_tokenizer(DATA / ckpt, tmp_path)
    out = tmp_path / "out.gguf"
    rep = quantize(src, mix, out, progress=False)
    notes = [ls for ls in rep.stats.layers if "kept_grid" in ls.notes]
    assert notes and all(ls.notes["kept_grid"] == 1 and math.isinf(ls.sqnr_db) for ls in notes)
    assert "grids kept" in rep.method
    pairs = _linears(out, src)
    assert len(pairs) == len(notes)
    for name, got, want in pairs:
        assert torch.equal(got, want), name


def test_asymmetric_into_q4_1_rounds_only_the_minimums(tmp_path: Path, capsys: Any) -> None:
    src = _with_tokenizer(DATA / "llmc/stories260K-awq-w4g32-asym", tmp_path)
    out = tmp_path / "q41.gguf"
    assert main(["quantize", str(src), "--scheme", "Q4_1", "-o", str(out)]) == 0
    line = capsys.readouterr().out
    assert "30 of 30 linears kept" in line and "rounded to fp16" in line
    for name, got, want in _linears(out, src):
        # codes and scales kept: the error is that of one fp16 rounding of each block's min
        assert float((got - want).abs().max()) <= 2.0**-11 * float(want.abs().max()) + 1e-12, name


def test_grids_that_do_not_fit_are_quantized_again_and_said(tmp_path: Path, capsys: Any) -> None:
    """Activation-order groups (a g_idx) scatter a group's columns over ggml blocks; asymmetric int4
    does not fit Q4_0's 16 levels: both are quantized again from their dequantized weights."""
    for ckpt, mix in [
        ("gptqmodel/stories260K-gptq-w4g32-act", "Q4_0"),
        ("llmc/stories260K-awq-w4g32-asym", "Q4_0"),
    ]:
        src = _with_tokenizer(DATA / ckpt, tmp_path / mix / Path(ckpt).parent.name)
        out = tmp_path / f"{Path(ckpt).name}.gguf"
        assert main(["quantize", str(src), "--scheme", mix, "-o", str(out)]) == 0
        line = capsys.readouterr().out
        assert "0 of 30 linears kept" in line and "30 quantized again" in line, line
        for name, got, want in _linears(out, src):
            assert not torch.equal(got, want), name  # rounded twice
            assert torch.allclose(got, want, atol=0.25 * float(want.abs().max())), name


def test_float32_scales_are_rounded_to_fp16_and_a_float_model_is_untouched(tmp_path: Path) -> None:
    """lowbit's own w4 checkpoint of the fp32 stories260K stores float32 scales (the model's dtype):
    Q4_0 keeps its codes with each scale rounded to fp16 (SQNR > 60 dB against the checkpoint, where
    quantizing again gives ~25 dB). A float model takes llama-quantize's own path."""
    ct = tmp_path / "ct"
    quantize(_stories_dir(), "w4", ct, progress=False)
    out = tmp_path / "ct.gguf"
    rep = quantize(ct, "Q4_0", out, progress=False)
    layers = [ls for ls in rep.stats.layers if "kept_grid" in ls.notes]
    assert layers and all(ls.notes["kept_grid"] == 1 and ls.sqnr_db > 60 for ls in layers)
    for name, got, want in _linears(out, ct):
        scale = want.abs().amax(dim=1, keepdim=True) / 7.5
        assert bool(((got - want).abs() <= 2.0**-11 * 8 * scale + 1e-12).all()), name
    plain = quantize(_stories_dir(), "Q4_0", tmp_path / "plain.gguf", progress=False)
    assert plain.method == "ggml"


@pytest.mark.shared
def test_llama_cpp_runs_the_converted_file(tmp_path: Path, shared_file: Any) -> None:
    src = _with_tokenizer(DATA / "llmc/stories260K-gptq-w4", tmp_path)
    out = tmp_path / "q40.gguf"
    quantize(src, "Q4_0", out, progress=False)
    text = tmp_path / "eval.txt"
    text.write_bytes(shared_file("data/text/tinystories-val.txt").read_bytes()[:40000])
    exe = shared_file("tools/llama.cpp/bin/llama-perplexity")
    # -nr: no weight repacking (the AMX repack kernels die with SIGILL where AMX is not enabled)
    cmd = [str(exe), "-m", str(out), "-f", str(text), "-c", "128", "--chunks", "8", "-t", "2", "-nr"]
    for _ in range(6):  # llama.cpp's asynchronous logger sometimes drops its last lines at exit
        rc, log = run_logged(cmd, timeout=300)
        assert rc == 0, log[-1500:]
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
        if m:
            assert 1.0 < float(m.group(1)) < 20.0  # stories260K's own PPL on this text is ~4
            return
    pytest.fail(f"llama-perplexity printed no final estimate: {log[-1500:]}")

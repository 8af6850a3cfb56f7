"""GGUF from the quantize walk: methods drive llama.cpp's block types and the writer takes their bytes.

* round-to-nearest through the walk (torch, one codec per tensor from the mix) writes the same file as
  llama-quantize's own path (numpy) — byte for byte from a Hugging Face directory, tensor for tensor
  from a GGUF file (whose walk order differs from llama.cpp's);
* GPTQ into a mix keeps llama-quantize + imatrix's per-tensor types and sizes, and its file runs in
  llama.cpp with a lower KL-divergence than llama-quantize + imatrix on held-out text (the issue's CI
  check, on tiny256: every width a multiple of 256);
* what cannot be done fails in one line before anything is written.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llama_tools import run_logged

from lowbit.api import quantize
from lowbit.cli.main import main
from lowbit.export.gguf import plan_gguf_walk, write_gguf, write_gguf_walk
from lowbit.methods.rtn import RTN
from lowbit.walk.calibrate import CalibConfig
from lowbit.walk.quantize_walk import walk_quantize
from lowbit.walk.sources import open_model

BIN = "tools/llama.cpp/bin"
TINY_DIR = "data/models/tiny256"
TINY_GGUF = "data/golden/tiny256-bf16.gguf"
CALIB = "data/text/wikitext-2-raw-test-calib.txt"
WIKI = "data/text/wikitext-2-raw-test.txt"


def _stories_dir() -> Path:
    import lowbit

    return Path(lowbit.__file__).parent / "assets" / "models" / "stories260K"


def _tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return {
        t.name: (t.tensor_type.name, tuple(int(s) for s in t.shape), np.asarray(t.data).tobytes())
        for t in r.tensors
    }


def _rtn_walk(model: Path, mix: str, out: Path) -> None:
    source = open_model(model)
    plan = plan_gguf_walk(source, mix)
    items = walk_quantize(source, plan.codec_plan(source.arch.is_quantizable), RTN(), progress=False)
    write_gguf_walk(items, plan, out)


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q4_0", "Q2_K", "Q8_0", "IQ4_XS", "F16"])
def test_rtn_walk_writes_llama_quantizes_file_from_hf(mix: str, tmp_path: Path) -> None:
    """stories260K (widths 64, 172: fall-back types, F16 for rows no block divides)."""
    walk, fast = tmp_path / "walk.gguf", tmp_path / "fast.gguf"
    _rtn_walk(_stories_dir(), mix, walk)
    write_gguf(_stories_dir(), mix, fast)
    assert walk.read_bytes() == fast.read_bytes()


@pytest.mark.shared
@pytest.mark.parametrize("model", [TINY_DIR, TINY_GGUF], ids=["hf", "gguf"])
@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_S", "Q6_K"])
def test_rtn_walk_equals_fast_path_on_tiny256(
    model: str, mix: str, shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    walk, fast = tmp_path / "walk.gguf", tmp_path / "fast.gguf"
    _rtn_walk(shared_file(model), mix, walk)
    write_gguf(shared_file(model), mix, fast)
    if model == TINY_DIR:
        assert walk.read_bytes() == fast.read_bytes()
    else:  # the walk's order is the source's block order, llama-quantize's is by layer then name
        a, b = _tensors(walk), _tensors(fast)
        assert sorted(a) == sorted(b)
        for name, ref in b.items():
            assert a[name] == ref, name


# -------------------------------------------------------------------------------- GPTQ in llama.cpp
def _kld(exe: Path, model: Path, text: Path, base: Path, make_base: bool) -> float:
    cmd = [str(exe), "-m", str(model), "-f", str(text), "-c", "256", "--chunks", "12", "-t", "2", "-nr"]
    cmd += ["--kl-divergence-base", str(base)] + ([] if make_base else ["--kl-divergence"])
    log = ""
    for _ in range(6):  # llama.cpp's async logger sometimes drops its last lines at exit
        rc, log = run_logged(cmd, timeout=600)
        assert rc == 0, log[-2000:]
        if make_base:
            if re.search(r"Final estimate: PPL", log):
                return 0.0
            continue
        m = re.search(r"Mean\s+KLD:\s+([0-9.]+)", log)
        if m:
            return float(m.group(1))
    pytest.fail(f"llama-perplexity printed no result: {log[-1500:]}")


@pytest.fixture(scope="module")
def tiny256_files(
    shared_file: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """tiny256: lowbit GPTQ Q4_K_M, plain and on the Hadamard-rotated model (32 x 512 calibration windows
    of WikiText-2's calibration half), and llama-quantize + llama-imatrix on the same 32 windows' worth
    of the same text."""
    root = tmp_path_factory.mktemp("gptq-gguf")
    calib = shared_file(CALIB)
    gptq, rotated = root / "gptq.gguf", root / "gptq-rot.gguf"
    reports = [
        quantize(
            shared_file(TINY_DIR),
            "Q4_K_M",
            out,
            method="gptq",
            progress=False,
            calib=CalibConfig(calib, samples=32, seqlen=512),
            rotate=rotate,
        )
        for out, rotate in ((gptq, None), (rotated, "hadamard"))
    ]
    rep = reports[0]
    imatrix = root / "imatrix.gguf"
    argv = [str(shared_file(f"{BIN}/llama-imatrix")), "-m", str(shared_file(TINY_GGUF)), "-f", str(calib)]
    argv += ["-c", "512", "--chunks", "32", "-t", "2", "-nr", "-o", str(imatrix)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-1500:]
    ref = root / "llama.gguf"
    argv = [str(shared_file(f"{BIN}/llama-quantize")), "--imatrix", str(imatrix)]
    argv += [str(shared_file(TINY_GGUF)), str(ref), "Q4_K_M", "2"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-1500:]
    return {"gptq": gptq, "gptq-rot": rotated, "ref": ref, "report": rep, "root": root}


@pytest.mark.shared
@pytest.mark.slow
def test_gptq_q4_k_m_has_llama_quantizes_types_and_size(tiny256_files: dict[str, Any]) -> None:
    ours, ref = _tensors(tiny256_files["gptq"]), _tensors(tiny256_files["ref"])
    assert sorted(ours) == sorted(ref)
    for name, (rtype, rshape, rdata) in ref.items():
        assert ours[name][:2] == (rtype, rshape), name
        assert len(ours[name][2]) == len(rdata)
    assert tiny256_files["report"].method == "gptq"


@pytest.mark.shared
@pytest.mark.slow
def test_gptq_q4_k_m_beats_llama_quantize_with_imatrix_in_llama_cpp(
    tiny256_files: dict[str, Any], shared_file: Callable[[str], Path]
) -> None:
    """Held-out text: the start of WikiText-2's test half (calibration is on its second half)."""
    exe = shared_file(f"{BIN}/llama-perplexity")
    text = tiny256_files["root"] / "eval.txt"
    text.write_bytes(shared_file(WIKI).read_bytes()[:60000])
    base = tiny256_files["root"] / "base.kld"
    _kld(exe, shared_file(TINY_GGUF), text, base, make_base=True)
    ours = _kld(exe, tiny256_files["gptq"], text, base, make_base=False)
    rotated = _kld(exe, tiny256_files["gptq-rot"], text, base, make_base=False)
    ref = _kld(exe, tiny256_files["ref"], text, base, make_base=False)
    # measured 0.64x (128 windows; ctx 512 x 40 chunks: 0.0054 vs 0.0087), rotated 0.60x (0.0052)
    assert 0 < ours < 0.85 * ref, (ours, ref)
    assert 0 < rotated < 0.85 * ref, (rotated, ref)


@pytest.mark.shared
@pytest.mark.slow
def test_lowbit_eval_agrees_with_llama_perplexity(
    tiny256_files: dict[str, Any], shared_file: Callable[[str], Path]
) -> None:
    """The same files, the same text and windows: ``lowbit eval``'s KLD (llama.cpp's 8-bit matmul inputs
    emulated) against llama-perplexity's with the F32 model's logits as the base. Measured here: GPTQ
    0.003854 vs 0.003838 (+0.4%), llama-quantize + imatrix 0.005676 vs 0.005657 (+0.3%); with float
    inputs 7% and 6% below. The bench (bench/gguf_agreement.py: ctx 512 x 40 chunks, every mix) has the
    table."""
    from lowbit.eval.run import evaluate_source, prepare_reference

    root = tiny256_files["root"]
    exe = shared_file(f"{BIN}/llama-perplexity")
    text = root / "agree.txt"
    text.write_bytes(shared_file(WIKI).read_bytes()[:60000])
    f32 = root / "tiny256-f32.gguf"
    argv = [str(shared_file(f"{BIN}/llama-quantize")), str(shared_file(TINY_GGUF)), str(f32), "F32", "2"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-1500:]
    base = root / "f32.kld"
    _kld(exe, f32, text, base, make_base=True)
    setup = prepare_reference(shared_file(TINY_DIR), text, ctx=256, chunks=12, progress=False)
    for name in ("gptq", "ref"):
        llama = _kld(exe, tiny256_files[name], text, base, make_base=False)
        ours = evaluate_source(setup, tiny256_files[name], progress=False).kld_mean
        floats = evaluate_source(setup, tiny256_files[name], progress=False, runtime_inputs=False).kld_mean
        assert abs(ours / llama - 1) < 0.02, (name, ours, llama, floats)
        assert floats < ours, (name, ours, llama, floats)


# ------------------------------------------------------------------------------- --tensor-type
OVERRIDES = ["attn_v=q8_0", r"blk\.[0-2]\.ffn_down=q6_k", "output=q8_0", "attn_q=q5_0"]


@pytest.mark.shared
def test_tensor_type_overrides_write_llama_quantizes_file(
    shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    """``--tensor-type`` as llama-quantize applies it: after the mix's rules, the last match winning, before
    the row-width fall-back. From the BF16 GGUF the file is llama-quantize's byte for byte; from the
    Hugging Face directory (whose metadata lowbit converts) every tensor is."""
    ref = tmp_path / "llama.gguf"
    argv = [str(shared_file(f"{BIN}/llama-quantize"))]
    for o in OVERRIDES:
        argv += ["--tensor-type", o]
    argv += [str(shared_file(TINY_GGUF)), str(ref), "Q4_K_M", "2"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-1500:]
    from_gguf, from_hf = tmp_path / "gguf.gguf", tmp_path / "hf.gguf"
    quantize(shared_file(TINY_GGUF), "Q4_K_M", from_gguf, progress=False, tensor_types=OVERRIDES)
    quantize(shared_file(TINY_DIR), "Q4_K_M", from_hf, progress=False, tensor_types=OVERRIDES)
    assert from_gguf.read_bytes() == ref.read_bytes()
    assert _tensors(from_hf) == _tensors(ref)
    types = {n: t for n, (t, _, _) in _tensors(ref).items()}
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["output.weight"] == "Q8_0"
    assert types["blk.1.ffn_down.weight"] == "Q6_K" and types["blk.4.ffn_down.weight"] != "Q6_K"
    assert types["blk.3.attn_q.weight"] == "Q5_0"


def test_tensor_type_overrides_drive_the_methods_too(tmp_path: Path) -> None:
    """GPTQ through the walk takes the overridden types; the last matching pattern wins."""
    out = tmp_path / "gptq.gguf"
    calib = CalibConfig(_stories_dir().parent.parent / "text" / "tinystories-val.txt", samples=4, seqlen=128)
    quantize(_stories_dir(), "Q4_0", out, method="gptq", calib=calib, progress=False,
             tensor_types=["attn=q8_0", "attn_k=q5_0"])  # fmt: skip
    types = {n: t for n, (t, _, _) in _tensors(out).items()}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_k.weight"] == "Q5_0"
    assert types["blk.0.ffn_up.weight"] == "Q4_0"


@pytest.mark.parametrize(
    ("tensor_types", "scheme", "needle"),
    [
        (["attn_v"], "Q4_K_M", "NAME_PATTERN=TYPE"),
        (["attn_v=q9_k"], "Q4_K_M", "q9_k"),
        (["attn_v[=q8_0"], "Q4_K_M", "regular expression"),
        (["attn_vv=q8_0"], "Q4_K_M", "matches no quantized tensor"),
        (["attn_v=q8_0"], "w4", "only when writing a GGUF"),
    ],
)
def test_bad_tensor_types(tensor_types: list[str], scheme: str, needle: str, tmp_path: Path) -> None:
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match=re.escape(needle)):
        quantize(_stories_dir(), scheme, tmp_path / "o.gguf", progress=False, tensor_types=tensor_types)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--method", "gptq", "--act-order", "group"], "static groups"),
        (["--method", "gptq"], "calibration"),
        (["--method", "smoothquant"], "smoothquant"),
    ],
)
def test_what_the_mixes_cannot_take(extra: list[str], needle: str, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out.gguf"
    calib = ["--calib", str(_stories_dir().parent.parent / "text" / "tinystories-val.txt")]
    argv = ["quantize", str(_stories_dir()), "--scheme", "Q4_K_M", "-o", str(out), *extra]
    if extra != ["--method", "gptq"]:
        argv += [*calib, "--samples", "4", "--seqlen", "64"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- every method, stories260K
@pytest.fixture(scope="module")
def stories_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """stories260K as Q4_0 (64-wide rows: Q4_0; the 172-wide down_proj: F16), by each method, calibrated
    on the first TinyStories paragraphs of the bundled text."""
    root = tmp_path_factory.mktemp("methods-gguf")
    text = root / "calib.txt"
    text.write_bytes((_stories_dir().parent.parent / "text" / "tinystories-val.txt").read_bytes()[:200_000])
    calib = CalibConfig(text, samples=16, seqlen=256)
    out: dict[str, Path] = {}
    runs: dict[str, dict[str, Any]] = {
        "rtn": {},
        "rtn+imatrix": {"calib": calib},
        "gptq": {"method": "gptq", "calib": calib},
        "gptq-asym": {"method": "gptq", "calib": calib, "method_options": {"asymmetric": True}},
        "awq": {"method": "awq", "calib": calib},
        "gptq-rot": {"method": "gptq", "calib": calib, "rotate": "hadamard"},
    }
    for name, kwargs in runs.items():
        out[name] = root / f"{name}.gguf"
        rep = quantize(_stories_dir(), "Q4_0", out[name], progress=False, **kwargs)
        assert rep.format == "gguf"
    return out


def test_every_method_writes_the_mixs_types(stories_files: dict[str, Path]) -> None:
    ref = _tensors(stories_files["rtn"])
    for name, path in stories_files.items():
        got = _tensors(path)
        # a rotation unties the embeddings: token_embd is no longer the output
        rotated = name.endswith("-rot")
        assert sorted(got) == sorted(set(ref) | ({"output.weight"} if rotated else set())), name
        for t, (rtype, rshape, rdata) in ref.items():
            if rotated and t == "token_embd.weight":
                continue
            assert got[t][:2] == (rtype, rshape), (name, t)
            assert len(got[t][2]) == len(rdata), (name, t)


def test_calibrated_methods_lose_less_than_round_to_nearest(stories_files: dict[str, Path]) -> None:
    """lowbit's evaluator on held-out TinyStories (the end of the bundled text): KLD against the float model."""
    from lowbit.eval.run import evaluate_source, prepare_reference

    text = (_stories_dir().parent.parent / "text" / "tinystories-val.txt").read_bytes()[-60_000:]
    root = stories_files["rtn"].parent
    (root / "eval.txt").write_bytes(text)
    setup = prepare_reference(_stories_dir(), root / "eval.txt", ctx=256, chunks=12, progress=False)
    kld = {
        name: evaluate_source(setup, path, progress=False).kld_mean for name, path in stories_files.items()
    }
    for name in ("gptq", "gptq-asym", "awq", "gptq-rot"):
        assert kld[name] < kld["rtn+imatrix"] <= kld["rtn"] * 1.02, kld

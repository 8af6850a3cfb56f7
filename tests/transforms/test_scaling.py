"""Scale folding keeps every block's output (to 1e-5 relative) and touches exactly the tensors it should."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch

from lowbit.errors import ShapeError
from lowbit.models.registry import Architecture, FeedMapping, get_architecture
from lowbit.transforms.scaling import expand_mapping, fold_norm, fold_scales, scaled_width
from lowbit.walk.blocks import BlockRunner
from lowbit.walk.sources import open_model

ROOT = Path(__file__).resolve().parents[2]
STORIES = ROOT / "src" / "lowbit" / "assets" / "models" / "stories260K"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_scales(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.exp(torch.randn(n, generator=gen, dtype=torch.float64) * 0.7)


def _fold_everything(
    weights: Mapping[str, torch.Tensor], arch: Architecture, gen: torch.Generator
) -> tuple[dict[str, torch.Tensor], list[FeedMapping], list[FeedMapping]]:
    """Fold random positive scales into every foldable mapping; returns (weights, folded, skipped)."""
    out = dict(weights)
    folded, skipped = [], []
    for generic in arch.mappings:
        for m in expand_mapping(generic, out):
            width = scaled_width(out, m)
            if width is None:
                skipped.append(m)
                continue
            out = fold_scales(out, m, _random_scales(width, gen), arch.norm_offset)
            folded.append(m)
    return out, folded, skipped


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


def _block_outputs_unchanged(model_dir: Path, min_folded: int) -> None:
    src = open_model(model_dir)
    runner = BlockRunner(src)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2, 48), generator=gen)
    h = runner.embed(ids)
    pos = runner.position_embeddings(h)
    for i in range(runner.num_layers):
        weights = runner.block_weights(i)
        ref = runner.run_layer(runner.layer(i, weights), h, pos)
        new, folded, _ = _fold_everything(weights, src.arch, gen)
        assert len(folded) >= min_folded
        changed = [n for n in weights if not torch.equal(weights[n], new[n])]
        assert len(changed) >= 2 * len(folded)  # the test cannot pass by folding nothing
        out = runner.run_layer(runner.layer(i, new), h, pos)
        assert _rel_err(out, ref) < 1e-5, (i, _rel_err(out, ref))
        h = ref


def test_folding_keeps_stories260k_blocks() -> None:
    """Every llama mapping that fits (v -> o does not: 4 KV heads, 8 query heads) keeps each block's output."""
    src = open_model(STORIES)
    w = BlockRunner(src).block_weights(0)
    _, folded, skipped = _fold_everything(w, src.arch, torch.Generator().manual_seed(1))
    assert [m.source for m in folded] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    assert [m.source for m in skipped] == ["self_attn.v_proj"]  # GQA: v_proj out 32 != o_proj in 64
    _block_outputs_unchanged(STORIES, min_folded=3)


def _tiny_model(tmp: Path, model_type: str, **overrides: object) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    kw: dict[str, object] = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        vocab_size=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw))
    with torch.no_grad():  # untrained norms are all-equal; make them (and biases) informative
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp)
    return tmp


def test_folding_keeps_blocks_with_v_to_o_and_biases(tmp_path: Path) -> None:
    """Multi-head attention (v -> o folds) and qwen2's q/k/v biases (v's is divided by the scales)."""
    _block_outputs_unchanged(_tiny_model(tmp_path, "qwen2"), min_folded=4)


def test_folding_keeps_gemma_blocks(tmp_path: Path) -> None:
    """Gemma's RMSNorm multiplies by (1 + weight): the fold must respect the offset."""
    arch = get_architecture("gemma2")
    assert arch.norm_offset == 1.0
    _block_outputs_unchanged(_tiny_model(tmp_path, "gemma2", num_key_value_heads=4), min_folded=4)


def test_gemma_offset_rule_on_a_hand_made_rmsnorm() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10, 16, generator=gen, dtype=torch.float64)
    stored = 0.5 * torch.randn(16, generator=gen, dtype=torch.float64)
    w_lin = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    s = _random_scales(16, gen)

    def gemma_rmsnorm(x: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + stored)

    new_norm = fold_norm(stored, s, offset=1.0)
    torch.testing.assert_close(new_norm, (stored + 1.0) / s - 1.0)
    ref = gemma_rmsnorm(x, stored) @ w_lin.T
    out = gemma_rmsnorm(x, new_norm) @ (w_lin * s).T
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # Without the offset the same fold would change the output: the rule is not vacuous.
    wrong = gemma_rmsnorm(x, fold_norm(stored, s, offset=0.0)) @ (w_lin * s).T
    assert _rel_err(wrong, ref) > 1e-2


def _dict_for(arch: Architecture, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {n: torch.randn(*shp, generator=gen) for n, shp in shapes.items()}


def _changed(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> set[str]:
    assert set(before) == set(after)
    return {n for n in before if not torch.equal(before[n], after[n])}


def test_phi3_fused_projections_change_the_right_tensors() -> None:
    arch = get_architecture("phi3")
    h, f = 16, 24
    w = _dict_for(
        arch,
        {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.qkv_proj.weight": (3 * h, h),
            "self_attn.o_proj.weight": (h, h),
            "mlp.gate_up_proj.weight": (2 * f, h),
            "mlp.down_proj.weight": (h, f),
        },
    )
    new, folded, skipped = _fold_everything(w, arch, torch.Generator().manual_seed(4))
    assert [m.source for m in folded] == ["input_layernorm", "post_attention_layernorm"] and not skipped
    assert _changed(w, new) == {
        "input_layernorm.weight",
        "self_attn.qkv_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_up_proj.weight",
    }


def test_qwen2_changes_v_bias_but_not_q_k_biases() -> None:
    arch = get_architecture("qwen2")
    h, kv, f = 16, 16, 24
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h),
        "self_attn.q_proj.bias": (h,),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    w = _dict_for(arch, shapes)
    s = _random_scales(kv, torch.Generator().manual_seed(5))
    vo = FeedMapping("self_attn.v_proj", ("self_attn.o_proj",), kind="linear")
    new = fold_scales(w, vo, s)
    assert _changed(w, new) == {"self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight"}
    torch.testing.assert_close(new["self_attn.v_proj.bias"], (w["self_attn.v_proj.bias"] / s).float())
    torch.testing.assert_close(new["self_attn.o_proj.weight"], (w["self_attn.o_proj.weight"] * s).float())
    new, folded, _ = _fold_everything(w, arch, torch.Generator().manual_seed(6))
    assert len(folded) == 4
    assert _changed(w, new) == set(shapes) - {"self_attn.q_proj.bias", "self_attn.k_proj.bias"}
    # Under GQA (k/v with fewer rows than o_proj's columns) v -> o does not fold.
    gqa = dict(w, **{"self_attn.v_proj.weight": torch.randn(8, h), "self_attn.v_proj.bias": torch.randn(8)})
    assert scaled_width(gqa, vo) is None
    with pytest.raises(ShapeError):
        fold_scales(gqa, vo, torch.ones(8))


def test_expert_mappings_expand_per_expert() -> None:
    arch = get_architecture("mixtral")
    names = ["post_attention_layernorm.weight", "block_sparse_moe.gate.weight"] + [
        f"block_sparse_moe.experts.{e}.{k}.weight" for e in (0, 2) for k in ("w1", "w2", "w3")
    ]
    norm, w3w2 = arch.mappings[2], arch.mappings[3]
    (m,) = expand_mapping(norm, names)
    assert m.targets == (
        "block_sparse_moe.gate",
        "block_sparse_moe.experts.0.w1",
        "block_sparse_moe.experts.2.w1",
        "block_sparse_moe.experts.0.w3",
        "block_sparse_moe.experts.2.w3",
    )
    assert [(m.source, m.targets) for m in expand_mapping(w3w2, names)] == [
        ("block_sparse_moe.experts.0.w3", ("block_sparse_moe.experts.0.w2",)),
        ("block_sparse_moe.experts.2.w3", ("block_sparse_moe.experts.2.w2",)),
    ]
    assert expand_mapping(arch.mappings[0], names) == []  # no attention tensors given
    with pytest.raises(ValueError, match="concrete"):
        fold_scales({}, w3w2, torch.ones(3))

"""SmoothQuant: the fold leaves the float model unchanged, flattens the activation channels, and the
alpha search never does worse than no smoothing on its own objective."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lowbit.errors import ArgumentError
from lowbit.formats.activations import ActQuant
from lowbit.formats.base import Codec, QuantizedTensor
from lowbit.methods.base import BlockContext, get_method
from lowbit.methods.smoothquant import ALPHA_GRID, SmoothQuant, parse_alpha, smoothing_scales
from lowbit.schemes import parse_scheme
from lowbit.walk.calibrate import CalibConfig, calibrate_walk
from lowbit.walk.sources import open_model

ROOT = Path(__file__).resolve().parents[2]
STORIES = ROOT / "src" / "lowbit" / "assets" / "models" / "stories260K"
TEXT = ROOT / "src" / "lowbit" / "assets" / "text" / "tinystories-val.txt"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Capture(SmoothQuant):
    name = "_test_sq_capture"

    def __init__(self) -> None:
        super().__init__()
        self.contexts: list[BlockContext] = []

    def transform_block(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        self.contexts.append(ctx)
        return dict(ctx.weights)

    def quantize_linear(
        self, weight: torch.Tensor, codec: Codec, stats: dict[str, torch.Tensor] | None = None
    ) -> QuantizedTensor:
        return codec.quantize(weight)


@pytest.fixture(scope="module")
def contexts() -> list[BlockContext]:
    torch.set_num_threads(1)
    cap = _Capture()
    sch = parse_scheme("w8a8")
    cfg = CalibConfig(TEXT, samples=8, seqlen=256, sequential=False)
    for _ in calibrate_walk(
        open_model(STORIES), sch.codec(torch.float32), cap, cfg, progress=False, activations=sch.activations
    ):
        pass
    assert len(cap.contexts) == 5
    return cap.contexts


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


@pytest.mark.parametrize("alpha", [0.5, "auto"])
@pytest.mark.parametrize(
    ("mappings", "sources", "n_changed"),
    [
        # stories260K has grouped-query attention (4 kv heads, 8 heads): v -> o does not fold
        ("all", ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"], 8),  # + down (up: twice)
        ("norms", ["input_layernorm", "post_attention_layernorm"], 7),  # two norms, q k v, gate up
    ],
)
def test_fold_keeps_float_block_outputs(
    contexts: list[BlockContext], alpha: float | str, mappings: str, sources: list[str], n_changed: int
) -> None:
    for ctx in contexts:
        sq = SmoothQuant(alpha, mappings=mappings)
        new = sq.transform_block(ctx)
        assert [r.source for r in sq.reports] == sources
        assert _rel_err(ctx.run(new), ctx.run(ctx.weights)) < 1e-5
        changed = [n for n in new if not torch.equal(new[n], ctx.weights[n])]
        assert len(changed) == n_changed


def test_smoothing_balances_activation_and_weight_ranges(contexts: list[BlockContext]) -> None:
    """At alpha 0.5 each channel's activation range and weight range become equal (sqrt(max|X| max|W|))."""
    for ctx in contexts:
        for key, targets in (
            ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
            ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
            ("mlp.down_proj", ["mlp.down_proj"]),
        ):
            x_abs = ctx.stats[key]["absmax"]
            w_abs = torch.cat([ctx.weights[f"{t}.weight"] for t in targets]).abs().amax(0)
            s = smoothing_scales(x_abs, w_abs, 0.5)
            torch.testing.assert_close(x_abs / s, w_abs * s, rtol=1e-5, atol=1e-7)


def test_smoothing_moves_an_outlier_channel_into_the_weights() -> None:
    x_abs = torch.ones(64)
    x_abs[7] = 60.0  # an outlier feature
    w_abs = torch.full((64,), 0.1)
    s = smoothing_scales(x_abs, w_abs, 0.5)
    assert (x_abs / s).max() / (x_abs / s).median() < 60.0**0.5 + 1e-3
    assert (w_abs * s).max() / (w_abs * s).median() == pytest.approx(60.0**0.5, rel=1e-5)


def test_auto_alpha_no_worse_than_unsmoothed(contexts: list[BlockContext]) -> None:
    for ctx in contexts:
        sq = SmoothQuant("auto")
        sq.transform_block(ctx)
        for r in sq.reports:
            assert r.alpha in ALPHA_GRID
            assert r.loss <= r.loss_unsmoothed * 1.01  # the grid's best vs no smoothing at all


def test_activation_stats_reach_the_block_context(contexts: list[BlockContext]) -> None:
    ctx = contexts[0]
    assert set(ctx.stats) >= {"input_layernorm", "post_attention_layernorm"}
    assert isinstance(ctx.activations, ActQuant)
    x = ctx.inputs["input_layernorm"]
    # the absmax statistic covers all tokens, the sampled inputs are a subset of them
    assert bool((ctx.stats["input_layernorm"]["absmax"] >= x.abs().amax(0) - 1e-6).all())


def test_alpha_is_checked() -> None:
    assert parse_alpha("auto") is None and parse_alpha("0.25") == 0.25 and parse_alpha(1) == 1.0
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(ArgumentError):
            parse_alpha(bad)
    assert isinstance(get_method("smoothquant", alpha="auto"), SmoothQuant)
    with pytest.raises(ArgumentError):
        SmoothQuant(mappings="everything")


def test_smoothing_down_proj_flattens_its_input(contexts: list[BlockContext]) -> None:
    """The up -> down fold divides down_proj's input channels by s = max|X|^a / max|W|^(1-a): its
    channel ranges get flatter, and s goes into down_proj's columns."""
    for ctx in contexts:
        new = SmoothQuant(0.5).transform_block(ctx)
        down = ctx.weights["mlp.down_proj.weight"].float()
        s = smoothing_scales(ctx.stats["mlp.down_proj"]["absmax"], down.abs().amax(0), 0.5)
        torch.testing.assert_close(new["mlp.down_proj.weight"].float(), down * s[None, :])
        x = ctx.inputs["mlp.down_proj"]
        spread = lambda a: float(a.abs().amax(0).max() / a.abs().amax(0).median())  # noqa: E731
        assert spread(x / s[None, :]) < spread(x)

"""The calibration walk: block-by-block execution equals the full model, statistics equal the batch
statistics of the real activations, and GPTQ through the walk beats RTN on held-out text."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from lowbit.calib.hessian import HessianAccumulator
from lowbit.errors import ArgumentError, InputFileError
from lowbit.formats.base import Codec, QuantizedTensor
from lowbit.methods.base import Method, get_method
from lowbit.schemes import parse_scheme
from lowbit.walk.blocks import BlockRunner
from lowbit.walk.calibrate import CalibConfig, calibrate_walk, calibration_tokens
from lowbit.walk.quantize_walk import walk_quantize
from lowbit.walk.sources import open_model
from lowbit.walk.torch_model import build_model

ROOT = Path(__file__).resolve().parents[2]
STORIES = ROOT / "src" / "lowbit" / "assets" / "models" / "stories260K"
TEXT = ROOT / "src" / "lowbit" / "assets" / "text" / "tinystories-val.txt"


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(TEXT.read_text()[:120_000])
    return p


def test_block_by_block_equals_full_model() -> None:
    src = open_model(STORIES)
    runner = BlockRunner(src)
    ids = torch.tensor([[1, 403, 30, 55, 100, 200, 7, 9, 300, 2]])
    with torch.no_grad():
        ref = build_model(src)(ids, output_hidden_states=True).hidden_states
    h = runner.embed(ids)
    pos = runner.position_embeddings(h)
    assert torch.equal(h, ref[0])
    for i in range(runner.num_layers):
        h = runner.run_layer(runner.layer(i, runner.block_weights(i)), h, pos)
        if i < runner.num_layers - 1:  # transformers applies the final norm to the last hidden state
            torch.testing.assert_close(h, ref[i + 1], rtol=1e-5, atol=1e-5)


class _Recorder(Method):
    """Quantizes nothing; records the Hessians the walk hands it."""

    name = "_test_recorder"
    needs: ClassVar[tuple[str, ...]] = ("hessian",)

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def quantize_linear(
        self, weight: torch.Tensor, codec: Codec, stats: dict[str, torch.Tensor] | None = None
    ) -> QuantizedTensor:
        assert stats is not None
        self.seen.append(stats["hessian"])
        return codec.quantize(weight)


def test_hessians_equal_batch_statistics_of_real_activations(calib_text: Path) -> None:
    """Non-sequential walk: each linear's Hessian is 2/N XᵀX of its inputs in the full original model."""
    src = open_model(STORIES)
    cfg = CalibConfig(calib_text, samples=4, seqlen=64, batch=3, sequential=False, dtype=torch.float32)
    rec = _Recorder()
    codec = parse_scheme("w8").codec()
    items = [it for it in calibrate_walk(src, codec, rec, cfg, progress=False) if it.quantized is not None]
    assert len(items) == len(rec.seen) == 35
    model = build_model(src)
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, a, n=n: inputs.setdefault(n, []).append(a[0]))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
    with torch.no_grad():
        model(calibration_tokens(src, cfg))
    for h in handles:
        h.remove()
    for it, hess in zip(items, rec.seen, strict=True):
        x = torch.cat(inputs[it.name[: -len(".weight")]]).reshape(-1, it.tensor.shape[1]).double()
        expected = 2.0 * x.T @ x / x.shape[0]
        torch.testing.assert_close(hess.double(), expected, rtol=2e-4, atol=1e-6)


def test_gptq_through_the_walk_beats_rtn_on_held_out_text(calib_text: Path) -> None:
    """Output error of the last block's inputs: GPTQ (sequential) below RTN at 3 bits."""
    from lowbit.eval.perplexity import evaluate
    from lowbit.eval.refcache import build_reference
    from lowbit.walk.torch_model import logits_fn

    src = open_model(STORIES)
    codec = parse_scheme("w3-asym").codec(torch.float32)
    cfg = CalibConfig(calib_text, samples=16, seqlen=256)
    held = torch.tensor([1] + src.tokenizer().encode(TEXT.read_text()[-60_000:], add_special_tokens=False))
    ref = build_reference(
        logits_fn(build_model(src)), held, 256, 8, 1, model_fingerprint="stories", progress=False
    )
    klds = {}
    for name, items in (
        ("rtn", walk_quantize(src, codec, get_method("rtn"), progress=False)),
        ("gptq", calibrate_walk(src, codec, get_method("gptq"), cfg, progress=False)),
    ):
        w = {
            it.name: codec.dequantize(it.quantized) if it.quantized is not None else it.tensor for it in items
        }
        klds[name] = evaluate(logits_fn(build_model(src, w)), ref, progress=False).kld_mean
    assert klds["gptq"] < 0.8 * klds["rtn"], klds


def test_calibration_input_errors(tmp_path: Path) -> None:
    src = open_model(STORIES)
    with pytest.raises(InputFileError, match="does not exist"):
        calibration_tokens(src, CalibConfig(tmp_path / "nope.txt"))
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    with pytest.raises(InputFileError, match="fewer than one window"):
        calibration_tokens(src, CalibConfig(short, seqlen=64))
    with pytest.raises(ArgumentError):
        CalibConfig(short, samples=0)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(InputFileError, match="is empty"):
        calibration_tokens(src, CalibConfig(empty))


def test_short_text_is_an_error_unless_fewer_windows_are_allowed(
    calib_text: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A text too short for the windows asked: one line naming both counts; with allow_fewer_windows,
    calibration on the windows it holds, with a warning naming both counts."""
    src = open_model(STORIES)
    n_tokens = len(src.tokenizer().encode(calib_text.read_text(), add_special_tokens=False))
    with pytest.raises(InputFileError, match=f"{n_tokens // 256} windows of 256, fewer than the 10000 asked"):
        calibration_tokens(src, CalibConfig(calib_text, samples=10_000, seqlen=256))
    cfg = CalibConfig(calib_text, samples=10_000, seqlen=256, allow_fewer_windows=True)
    with caplog.at_level("WARNING", logger="lowbit.walk.calibrate"):
        ids = calibration_tokens(src, cfg)
    assert ids.shape == (n_tokens // 256, 256)
    msg = [r.message for r in caplog.records if "instead of the 10000 asked for" in r.message]
    assert len(msg) == 1 and f"on {n_tokens // 256} windows" in msg[0]


class _BrokenMethod(Method):
    """Returns NaN scales: what a numerically broken method would hand the writer."""

    name = "_test_broken"
    needs: ClassVar[tuple[str, ...]] = ("hessian",)

    def quantize_linear(
        self, weight: torch.Tensor, codec: Codec, stats: dict[str, torch.Tensor] | None = None
    ) -> QuantizedTensor:
        q = codec.quantize(weight)
        return dataclasses.replace(q, scales=torch.full_like(q.scales, math.nan))


@pytest.mark.parametrize("sequential", [True, False])
def test_nan_never_leaves_the_walk(calib_text: Path, sequential: bool, tmp_path: Path) -> None:
    """A NaN weight in the model, or NaN weights out of a method, stop the walk with a one-line error
    naming the tensor, whichever walk mode (and the checkpoint writer never renames its output)."""
    from safetensors.torch import load_file, save_file

    from lowbit.errors import NonFiniteWeightError

    cfg = CalibConfig(calib_text, samples=2, seqlen=64, sequential=sequential)
    codec = parse_scheme("w4").codec(torch.float32)
    with pytest.raises(NonFiniteWeightError, match=r"\(quantized\)"):
        list(calibrate_walk(open_model(STORIES), codec, _BrokenMethod(), cfg, progress=False))
    bad = tmp_path / "bad"
    shutil.copytree(STORIES, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.2.mlp.up_proj.weight"][3, 5] = math.nan
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    for method in ("gptq", "awq"):
        with pytest.raises(NonFiniteWeightError, match="model.layers.2"):
            list(calibrate_walk(open_model(bad), codec, get_method(method), cfg, progress=False))


def test_hessian_accumulator_registered_by_name() -> None:
    from lowbit.walk.calibrate import ACCUMULATORS

    assert ACCUMULATORS["hessian"] is HessianAccumulator

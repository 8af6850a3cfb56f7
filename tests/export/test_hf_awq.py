"""AWQ (AutoAWQ GEMM) checkpoint export: exact round trips, the interleaved packing drawn by hand, refusals,
and the real loader (transformers 5.23 loads ``quant_method: awq`` through GPTQModel) reproducing lowbit's
weights bit for bit.

The loader tests need ``gptqmodel`` (see tests/export/test_hf_gptq.py for the venv that has it); they skip
without it. stories260K cannot be written as AWQ (its 172-wide gate/up outputs do not fill int32 words of
8 nibbles), so the loader tests use ``../shared``'s tiny256.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import lowbit
from lowbit.api import quantize
from lowbit.errors import InputFileError, SchemeError, ShapeError
from lowbit.export import hf_awq
from lowbit.export.hf_awq import linear_tensors, read_linear
from lowbit.export.hf_checkpoint import get_format
from lowbit.formats import bitpack
from lowbit.formats.affine import AffineCodec, AffineQuantized
from lowbit.formats.base import PER_CHANNEL, PER_TENSOR, Block, group
from lowbit.methods.base import get_method
from lowbit.walk.quantize_walk import walk_quantize
from lowbit.walk.sources import SafetensorsSource, open_model

MODEL_DIR = Path(lowbit.__file__).parent / "assets" / "models" / "stories260K"
TINY256 = "data/models/tiny256"


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :40] = 0.0
    w[1] = w[1].abs()  # zero point 0
    w[2] = -w[2].abs()  # zero point 15
    return w


def _u32(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


def _codec(g: int | None) -> AffineCodec:
    return AffineCodec(
        bits=4, symmetric=False, block=PER_CHANNEL if g is None else group(g), scale_dtype=torch.float16
    )


@pytest.mark.parametrize("g", [None, 32, 128], ids=["channel", "g32", "g128"])
def test_round_trip_and_layout(g: int | None) -> None:
    codec = _codec(g)
    q = codec.quantize(_weight(96, 256))
    t = linear_tensors(q)
    groups = 1 if g is None else 256 // g
    assert set(t) == {"qweight", "qzeros", "scales"}
    assert t["qweight"].dtype == torch.int32 and tuple(t["qweight"].shape) == (256, 12)
    assert t["qzeros"].dtype == torch.int32 and tuple(t["qzeros"].shape) == (groups, 12)
    assert t["scales"].dtype == torch.float16 and tuple(t["scales"].shape) == (groups, 96)
    back = read_linear(t, g)
    assert back.codec == codec and back.shape == q.shape
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)
    assert q.zeros is not None and back.zeros is not None and torch.equal(back.zeros, q.zeros)
    assert {0, 15} <= set(q.zeros.flatten().tolist())  # both ends of the zero-point range occur
    assert torch.equal(codec.dequantize(back), codec.dequantize(q))


def test_known_answer_interleave() -> None:
    """Input column 0 has codes 0..7 for outputs 0..7 (9..15 and 0 for outputs 8..15): the first word holds
    nibbles [0, 2, 4, 6, 1, 3, 5, 7] from the bottom, i.e. 0x75316420 (AutoAWQ's order)."""
    codes = torch.zeros(16, 2, dtype=torch.int16)  # (out 16, in 2)
    codes[:, 0] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 0])
    zeros = torch.arange(16, dtype=torch.int16)[:, None]  # (out, 1 group)
    codec = _codec(None)
    q = AffineQuantized(
        shape=(16, 2), codes=codes, scales=torch.ones(16, 1, dtype=torch.float16), zeros=zeros, codec=codec
    )
    t = linear_tensors(q)
    assert t["qweight"].tolist() == [[0x75316420, 0x0ECAFDB9], [0, 0]]
    assert t["qzeros"].tolist() == [[0x75316420, _u32(0xFDB9ECA8)]]
    assert bitpack.AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)


def test_refusals_are_one_line_errors() -> None:
    fmt = get_format("awq")
    cases: list[tuple[type[Exception], str, Callable[[], object]]] = [
        (ShapeError, "multiple of 8", lambda: fmt.check(_codec(32), [(172, 64)])),
        (ShapeError, "divide", lambda: fmt.check(_codec(32), [(64, 172)])),
        (SchemeError, "asymmetric", lambda: fmt.check(AffineCodec(bits=4, symmetric=True), [(64, 64)])),
        (SchemeError, "4-bit", lambda: fmt.check(AffineCodec(bits=8, symmetric=False), [(64, 64)])),
        (SchemeError, "group 4", lambda: fmt.check(_codec(4), [(64, 64)])),
        (SchemeError, "per-tensor", lambda: fmt.check(AffineCodec(bits=4, symmetric=False, block=PER_TENSOR), [])),
        (SchemeError, "block 2x32", lambda: fmt.check(AffineCodec(bits=4, symmetric=False, block=Block(2, 32)), [])),
        (ShapeError, "2-D", lambda: fmt.check(_codec(32), [(64,)])),
        (SchemeError, "float16", lambda: linear_tensors(AffineCodec(4, False, group(32), torch.float32).quantize(_weight(8, 64)))),
    ]  # fmt: skip
    for error, match, call in cases:
        with pytest.raises(error, match=match) as info:
            call()
        assert "\n" not in str(info.value), str(info.value)


def test_reader_rejects_inconsistent_files() -> None:
    t = linear_tensors(_codec(32).quantize(_weight(16, 64)))
    with pytest.raises(InputFileError):
        read_linear({**t, "qzeros": t["qzeros"][:1]}, 32)
    with pytest.raises(InputFileError):
        read_linear({k: v for k, v in t.items() if k != "scales"}, 32)
    with pytest.raises(InputFileError):
        read_linear(t, 16)  # 4 groups expected, 2 stored


@pytest.mark.parametrize("g", [None, 64, 128])
def test_config_parses_in_transformers(g: int | None) -> None:
    from transformers import AwqConfig

    cfg = get_format("awq").quantization_config(_codec(g), ["lm_head"])
    json.dumps(cfg)
    assert cfg == {"quant_method": "awq", "bits": 4, "group_size": -1 if g is None else g, "zero_point": True,
                   "version": "gemm", "modules_to_not_convert": None}  # fmt: skip
    hf = AwqConfig.from_dict(cfg)
    assert (hf.bits, hf.group_size, hf.zero_point, hf.format) == (4, cfg["group_size"], True, "gemm")
    assert hf.to_dict()["version"] == "gemm"
    assert hf_awq.group_size_from_config(cfg) == g
    with pytest.raises(SchemeError):
        hf_awq.group_size_from_config({**cfg, "version": "gemv"})
    with pytest.raises(SchemeError):
        hf_awq.group_size_from_config({**cfg, "zero_point": False})
    skip = hf_awq.quantization_config(_codec(g), ["lm_head", "re:.*block_sparse_moe[.]gate$"])
    assert skip["modules_to_not_convert"] == [".*block_sparse_moe[.]gate$"]


def test_stories260k_is_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "awq"
    with pytest.raises(ShapeError, match="multiple of 8"):
        quantize(MODEL_DIR, "w4-asym", out, fmt="awq", progress=False)
    assert not out.exists()


@pytest.mark.shared
def test_quantize_writes_awq_that_lowbit_reads_back(
    shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    model = shared_file(TINY256)
    out = tmp_path / "awq"
    report = quantize(model, "w4g128-asym", out, fmt="awq", progress=False)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["group_size"], cfg["version"]) == ("awq", 128, "gemm")
    src = open_model(out)
    assert isinstance(src, SafetensorsSource) and src.linear_bits_per_weight is not None
    assert abs(src.linear_bits_per_weight - report.linear_bits_per_weight) < 1e-9
    codec = _codec(128)
    want = {
        item.name: codec.dequantize(item.quantized)
        for item in walk_quantize(open_model(model), codec, get_method("rtn"), progress=False)
        if item.quantized is not None
    }
    assert len(want) == 6 * 7
    for name, w in want.items():
        assert torch.equal(src.read(name), w), name


# ------------------------------------------------------------------------------------ the real loader
def _require_loader() -> None:
    if importlib.util.find_spec("gptqmodel") is None:
        pytest.skip(
            "transformers 5.23 loads AWQ checkpoints through gptqmodel, not installed in this environment "
            "(gptqmodel==7.6.0 pins numpy 2.2.6; see tests/export/test_hf_gptq.py)"
        )


def test_packing_matches_gptqmodels_awq_unpacking() -> None:
    """GPTQModel's own AWQ dequantization (what its torch kernel runs) of lowbit's tensors is lowbit's
    dequantization rounded once to float16."""
    _require_loader()
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    for g in (32, 128):
        q = _codec(g).quantize(_weight(64, 256, seed=g))
        t = linear_tensors(q)
        w = dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, g)  # (in, out) float16
        assert torch.equal(w.T, _codec(g).dequantize(q).to(torch.float16))


def _check_loaded(out: Path, dtype: torch.dtype, backend: str | None = None) -> tuple[float, float]:
    """As in test_hf_gptq: per-Linear weights of the loader equal lowbit's rounded to float16 (via
    GPTQModel's ``dequantize_gemm`` on the loaded buffers, before the first forward repacks them); then
    logits against lowbit's float32 simulation, and a same-dtype dense control."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from transformers import AutoModelForCausalLM, AutoTokenizer, AwqConfig

    from lowbit.walk.torch_model import build_model

    kwargs: dict[str, Any] = {}
    if backend is not None:
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        kwargs["quantization_config"] = AwqConfig.from_dict({**cfg, "backend": backend})
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, **kwargs).eval()
    src = open_model(out)
    names = [n for n in src.names() if n.endswith("proj.weight")]
    assert names
    for name in names:
        m = loaded.get_submodule(name.removesuffix(".weight"))
        w_loader = dequantize_gemm(m.qweight, m.qzeros, m.scales.to(torch.float16), 4, m.group_size).T
        assert torch.equal(w_loader, src.read(name).to(torch.float16)), name
    ids = AutoTokenizer.from_pretrained(out)("Once upon a time, there was a little girl", return_tensors="pt")
    with torch.no_grad():
        got = loaded(**ids).logits.float()
        want = build_model(src)(**ids).logits.float()
        control = build_model(src, dtype=dtype)(**ids).logits.float()
    scale = want.abs().max()
    return float((got - want).abs().max() / scale), float((control - want).abs().max() / scale)


# bfloat16 (tiny256's dtype) on the kernel transformers picks by default on CPU (GPTQModel's aten int4
# kernel for groups of 32/64/128); per-channel forced to GPTQModel's torch AWQ kernel, since the aten
# kernel takes the whole 768-wide down_proj row as one group and refuses it. The runtime computes in
# bfloat16: logits are held to twice the error of the dense bf16 control plus 2e-3 (measured 0.0068 and
# 0.0070 against controls of 0.0049 and 0.0061).
LOAD_CASES = {"w4g128-asym": None, "w4g32-asym": None, "w4-asym": "torch_awq"}


@pytest.mark.shared
@pytest.mark.parametrize("scheme", list(LOAD_CASES))
def test_transformers_loads_tiny256(scheme: str, shared_file: Callable[[str], Path], tmp_path: Path) -> None:
    _require_loader()
    model = shared_file(TINY256)
    out = tmp_path / "ckpt"
    quantize(model, scheme, out, fmt="awq", progress=False)
    rel, control = _check_loaded(out, torch.bfloat16, LOAD_CASES[scheme])
    assert rel <= 2 * control + 2e-3, f"logits differ by {rel:.2e} relative (bf16 control {control:.2e})"

"""GPTQ checkpoint export: exact round trips, hand-checked bit layouts, the zero-point conventions, and the
real loader (transformers + optimum + GPTQModel) reproducing lowbit's weights bit for bit.

The loader tests need ``gptqmodel`` and ``optimum``, which transformers uses for ``quant_method: gptq``.
gptqmodel 7.6 (the newest release that accepts torch 2.13; 7.7 wants torch >= 2.14.1) pins numpy 2.2.6 and
pulls torchao, so it is not in the project's environment: the tests skip without it. To run them::

    python -m venv /work/venvs/gptq --system-site-packages
    printf 'torch==2.13.0\\ntransformers==5.23.0\\n' > /tmp/pin.txt
    /work/venvs/gptq/bin/pip install -c /tmp/pin.txt gptqmodel==7.6.0 optimum==2.3.0
    /work/venvs/gptq/bin/python -m pytest tests/export/test_hf_gptq.py tests/export/test_hf_awq.py
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import lowbit
from lowbit.api import quantize
from lowbit.errors import InputFileError, SchemeError, ShapeError
from lowbit.export import hf_gptq
from lowbit.export.hf_checkpoint import get_format, write_checkpoint
from lowbit.export.hf_gptq import (
    GptqLayout,
    ZeroFormat,
    decode_zeros,
    encode_zeros,
    linear_tensors,
    read_linear,
)
from lowbit.formats.affine import AffineCodec, AffineQuantized, GroupIndexedQuantized
from lowbit.formats.base import PER_CHANNEL, PER_TENSOR, Block, group
from lowbit.methods.gptq import GPTQConfig, gptq_quantize
from lowbit.walk.quantize_walk import walk_quantize
from lowbit.walk.sources import SafetensorsSource, open_model

MODEL_DIR = Path(lowbit.__file__).parent / "assets" / "models" / "stories260K"
CALIB_TEXT = Path(lowbit.__file__).parent / "assets" / "text" / "tinystories-val.txt"
TINY256 = "data/models/tiny256"
BLOCKS = {"channel": PER_CHANNEL, "g32": group(32), "g128": group(128)}


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :40] = 0.0  # exact zeros, an all-positive (zero point 0) and an all-negative region
    w[1] = w[1].abs()
    w[2] = -w[2].abs()
    return w


def _assert_same(a: AffineQuantized, b: AffineQuantized) -> None:
    assert a.shape == b.shape and a.codec == b.codec
    assert a.codes.dtype == b.codes.dtype == torch.int16 and torch.equal(a.codes, b.codes)
    assert a.scales.dtype == b.scales.dtype and torch.equal(a.scales, b.scales)
    assert (a.zeros is None) == (b.zeros is None)
    if a.zeros is not None:
        assert b.zeros is not None and torch.equal(a.zeros, b.zeros)


def _u32(x: int) -> int:
    """An unsigned 32-bit word as the int32 value torch stores."""
    return x - (1 << 32) if x >= 1 << 31 else x


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("block", list(BLOCKS))
def test_round_trip_and_layout(bits: int, symmetric: bool, block: str) -> None:
    codec = AffineCodec(bits=bits, symmetric=symmetric, block=BLOCKS[block], scale_dtype=torch.float16)
    q = codec.quantize(_weight(96, 256))
    t = linear_tensors(q)
    groups = {"channel": 1, "g32": 8, "g128": 2}[block]
    assert set(t) == {"qweight", "qzeros", "scales", "g_idx"}
    assert t["qweight"].dtype == torch.int32 and tuple(t["qweight"].shape) == (256 * bits // 32, 96)
    assert t["qzeros"].dtype == torch.int32 and tuple(t["qzeros"].shape) == (groups, 96 * bits // 32)
    assert t["scales"].dtype == torch.float16 and tuple(t["scales"].shape) == (groups, 96)
    g = 256 // groups
    assert t["g_idx"].dtype == torch.int32 and torch.equal(
        t["g_idx"], torch.arange(256, dtype=torch.int32) // g
    )
    layout = GptqLayout.of(codec)
    back = read_linear(t, layout, ZeroFormat.written_for(symmetric))
    _assert_same(back, q)
    assert torch.equal(codec.dequantize(back), codec.dequantize(q))
    if symmetric:  # v1: every field holds 2**(b-1) - 1, which decodes to the zero point 2**(b-1)
        fields = hf_gptq._unpack_rows(t["qzeros"], bits, 96)
        assert bool((fields == (1 << (bits - 1)) - 1).all())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_trip_pads_widths_that_do_not_fill_a_word(bits: int) -> None:
    """stories260K's 172 inputs and 44 outputs do not fill whole words at 4 bits: zero codes pad them and
    the reader (like GPTQModel's unpacking) drops the padding."""
    for symmetric in (True, False):
        codec = AffineCodec(bits=bits, symmetric=symmetric, block=PER_CHANNEL, scale_dtype=torch.float16)
        q = codec.quantize(_weight(44, 172, seed=1))
        t = linear_tensors(q)
        assert tuple(t["qweight"].shape) == (math.ceil(172 * bits / 32), 44)
        assert tuple(t["qzeros"].shape) == (1, math.ceil(44 * bits / 32))
        _assert_same(read_linear(t, GptqLayout.of(codec), ZeroFormat.written_for(symmetric)), q)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_act_order_round_trip(symmetric: bool) -> None:
    """GPTQ with act-order and dynamic groups scatters each group's columns: g_idx and the group-ordered
    parameters are stored, the codes stay in column order, and the config says desc_act."""
    torch.manual_seed(0)
    x = torch.randn(512, 128) * torch.linspace(0.1, 3.0, 128)[torch.randperm(128)]
    h = 2 * x.T @ x / x.shape[0]
    codec = AffineCodec(bits=4, symmetric=symmetric, block=group(32), scale_dtype=torch.float16)
    q = gptq_quantize(_weight(64, 128, seed=2), h, codec, GPTQConfig(act_order=True, static_groups=False))
    assert not q.contiguous_groups
    with pytest.raises(SchemeError, match="activation-order"):  # compressed-tensors has no g_idx
        get_format("compressed-tensors").linear_tensors(q)
    fmt = get_format("gptq")
    t = fmt.linear_tensors(q)
    assert torch.equal(t["g_idx"], q.g_idx)
    assert torch.equal(t["scales"], q.group_scales.T)
    back = read_linear(t, GptqLayout.of(codec), ZeroFormat.written_for(symmetric))
    assert isinstance(back, GroupIndexedQuantized)
    _assert_same(back, q)
    assert torch.equal(back.g_idx, q.g_idx) and torch.equal(back.group_scales, q.group_scales)
    if q.group_zeros is not None:
        assert back.group_zeros is not None and torch.equal(back.group_zeros, q.group_zeros)
    assert torch.equal(codec.dequantize(back), codec.dequantize(q))
    assert fmt.quantization_config(codec, ["lm_head"])["desc_act"] is True
    # Static groups keep the groups contiguous: no desc_act needed.
    qs = gptq_quantize(_weight(64, 128, seed=2), h, codec, GPTQConfig(act_order=True, static_groups=True))
    fresh = get_format("gptq")
    _assert_same(
        read_linear(fresh.linear_tensors(qs), GptqLayout.of(codec), ZeroFormat.written_for(symmetric)), qs
    )
    assert fresh.quantization_config(codec, ["lm_head"])["desc_act"] is False


# ------------------------------------------------------------------------------------ known answers
def _quantized(codes: torch.Tensor, zeros: torch.Tensor | None, bits: int) -> AffineQuantized:
    out_f, in_f = codes.shape
    codec = AffineCodec(bits=bits, symmetric=zeros is None, block=PER_CHANNEL, scale_dtype=torch.float16)
    scales = torch.ones(out_f, 1, dtype=torch.float16)
    return AffineQuantized(
        shape=(out_f, in_f), codes=codes.to(torch.int16), scales=scales, zeros=zeros, codec=codec
    )


def test_known_answer_4bit() -> None:
    """Output row o holds codes (c + o) % 16 over 8 inputs, zero point o: qweight column o packs the inputs
    LSB-first (0x76543210 for o = 0), qzeros packs the outputs the same way."""
    o = torch.arange(8)[:, None]
    codes = (torch.arange(8)[None, :] + o) % 16  # (out 8, in 8)
    t = linear_tensors(_quantized(codes, o.to(torch.int16), 4))
    assert t["qweight"].tolist() == [[_u32(0x76543210), _u32(0x87654321), _u32(0x98765432), _u32(0xA9876543),
                                      _u32(0xBA987654), _u32(0xCBA98765), _u32(0xDCBA9876), _u32(0xEDCBA987)]]  # fmt: skip
    assert t["qzeros"].tolist() == [[0x76543210]]  # asymmetric: gptq_v2, true zero points
    assert t["g_idx"].tolist() == [0] * 8
    # Symmetric (signed codes c - 8): v1 zero points 8 - 1 = 7 in every field.
    t = linear_tensors(_quantized(codes - 8, None, 4))
    assert t["qweight"][0, 0].item() == 0x76543210 and t["qzeros"].tolist() == [[0x77777777]]


def test_known_answer_2_and_8_bit() -> None:
    codes = torch.arange(16)[None, :] % 4  # one output, 16 inputs: 0,1,2,3,... -> 0b11100100 per byte
    assert linear_tensors(_quantized(codes - 2, None, 2))["qweight"].tolist() == [[_u32(0xE4E4E4E4)]]
    codes = torch.tensor([[1, 2, 3, 4]])
    t = linear_tensors(_quantized(codes - 128, None, 8))
    assert t["qweight"].tolist() == [[0x04030201]]
    # One output: zero point 128 in field 0, three padding fields of 0; v1 subtracts 0x01010101 word-wise
    # (the padding borrows), and GPTQModel's word-wise +0x01010101 gives back 0x00000080.
    assert t["qzeros"].tolist() == [[_u32(0xFEFEFF7F)]]
    assert decode_zeros(t["qzeros"], 8, 1, ZeroFormat.V1).tolist() == [[128]]


def test_known_answer_3bit_straddles_words() -> None:
    """3-bit: 32 codes fill 3 words as one bit stream; code 10 takes bits 30-31 of word 0 and bit 0 of word
    1, code 21 bit 31 of word 1 and bits 0-1 of word 2 (GPTQ's layout, which GPTQModel unpacks)."""
    codes = torch.zeros(32, 32, dtype=torch.int64)
    codes[0, 10] = 0b111
    codes[0, 21] = 0b101
    codes[0, 31] = 0b100
    t = linear_tensors(_quantized(codes - 4, None, 3))
    assert tuple(t["qweight"].shape) == (3, 32) and tuple(t["qzeros"].shape) == (1, 3)
    assert t["qweight"][:, 0].tolist() == [_u32(0xC0000000), _u32(0x80000001), _u32(0x80000002)]
    assert not bool(t["qweight"][:, 1:].any())
    # Symmetric v1 zero points: 32 fields of 4 - 1 = 0b011, the stream 110110... cut into words.
    assert t["qzeros"].tolist() == [[_u32(0xDB6DB6DB), _u32(0xB6DB6DB6), 0x6DB6DB6D]]


# ------------------------------------------------------------------------------------ zero points
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_point_formats(bits: int) -> None:
    """v2 stores z; v1 stores z - 1 the way GPTQModel reads it back (word-wise at 2/4/8 bits, per field mod 8
    at 3 bits), so every z in [0, 2**b), zero included, survives both."""
    zmax = 1 << bits
    zeros = torch.arange(2 * 64).reshape(2, 64) % zmax  # (groups, out), 0 and 2**b - 1 included
    for fmt in ZeroFormat:
        assert torch.equal(decode_zeros(encode_zeros(zeros, bits, fmt), bits, 64, fmt), zeros.to(torch.int16))
    v2 = encode_zeros(zeros, bits, ZeroFormat.V2)
    v1 = encode_zeros(zeros, bits, ZeroFormat.V1)
    assert not torch.equal(v1, v2)
    # For z >= 1 GPTQModel's v1 equals AutoGPTQ's per-field z - 1; a zero point of 0 makes them differ,
    # which is why lowbit writes asymmetric schemes as gptq_v2.
    ones = zeros.clamp(min=1)
    per_field = hf_gptq._pack_rows(ones.to(torch.int64) - 1, bits)
    assert torch.equal(encode_zeros(ones, bits, ZeroFormat.V1), per_field)
    if bits != 3:
        per_field_wrapped = hf_gptq._pack_rows((zeros.to(torch.int64) - 1) % zmax, bits)
        assert not torch.equal(v1, per_field_wrapped)


def test_v1_file_with_true_zeros_is_caught_for_symmetric_configs() -> None:
    codec = AffineCodec(bits=4, symmetric=True, block=group(32), scale_dtype=torch.float16)
    t = linear_tensors(codec.quantize(_weight(16, 64)))
    with pytest.raises(InputFileError, match="sym=true"):
        read_linear(t, GptqLayout.of(codec), ZeroFormat.V2)  # 7s read as true zeros


# ------------------------------------------------------------------------------------ refusals
def test_refusals_are_one_line_errors() -> None:
    fmt = get_format("gptq")
    ok = AffineCodec(bits=4, block=group(32), scale_dtype=torch.float16)
    cases: list[tuple[type[Exception], str, Callable[[], object]]] = [
        (ShapeError, "ragged", lambda: fmt.check(ok, [(64, 172)])),
        (ShapeError, "ragged", lambda: linear_tensors(ok.quantize(_weight(8, 172)))),
        (
            SchemeError,
            "no GPTQModel kernel",
            lambda: fmt.check(AffineCodec(bits=4, block=group(4)), [(64, 64)]),
        ),
        (SchemeError, "5-bit|not 5", lambda: fmt.check(AffineCodec(bits=5), [(64, 64)])),
        (SchemeError, "per-tensor", lambda: fmt.check(AffineCodec(bits=4, block=PER_TENSOR), [(64, 64)])),
        (SchemeError, "block 2x32", lambda: fmt.check(AffineCodec(bits=4, block=Block(2, 32)), [(64, 64)])),
        (ShapeError, "multiple of 32", lambda: fmt.check(AffineCodec(bits=3), [(48, 64)])),
        (ShapeError, "2-D", lambda: fmt.check(ok, [(64,)])),
        (
            SchemeError,
            "float16",
            lambda: linear_tensors(AffineCodec(scale_dtype=torch.bfloat16).quantize(_weight(8, 64))),
        ),
    ]
    from lowbit.formats.nf4 import nf4

    cases.append((SchemeError, "integer", lambda: fmt.check(nf4(), [(64, 64)])))
    for error, match, call in cases:
        with pytest.raises(error, match=match) as info:
            call()
        assert "\n" not in str(info.value), str(info.value)


def test_reader_rejects_inconsistent_files() -> None:
    codec = AffineCodec(bits=4, block=group(32), scale_dtype=torch.float16)
    t = linear_tensors(codec.quantize(_weight(16, 64)))
    layout = GptqLayout.of(codec)
    with pytest.raises(InputFileError):
        read_linear({**t, "qweight": t["qweight"][:-1]}, layout, ZeroFormat.V1)
    with pytest.raises(InputFileError):
        read_linear({k: v for k, v in t.items() if k != "qzeros"}, layout, ZeroFormat.V1)
    with pytest.raises(InputFileError):
        read_linear(t, GptqLayout(4, 16, True), ZeroFormat.V1)  # 4 groups expected, 2 stored


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("bits", "symmetric", "block"), [(4, True, group(128)), (2, False, PER_CHANNEL), (8, False, group(32))]
)
def test_config_parses_in_transformers(bits: int, symmetric: bool, block: Block) -> None:
    from transformers import GPTQConfig as HfGPTQConfig

    codec = AffineCodec(bits=bits, symmetric=symmetric, block=block, scale_dtype=torch.float16)
    cfg = get_format("gptq").quantization_config(codec, ["lm_head"])
    json.dumps(cfg)
    hf = HfGPTQConfig.from_dict(cfg)
    assert (hf.bits, hf.sym, hf.desc_act) == (bits, symmetric, False)
    assert hf.group_size == (-1 if block == PER_CHANNEL else block.cols)
    assert hf.format == ("gptq" if symmetric else "gptq_v2")
    assert hf.to_dict()["checkpoint_format"] == cfg["checkpoint_format"]
    layout, fmt = hf_gptq.layout_from_config(cfg)
    assert layout == GptqLayout.of(codec) and fmt is ZeroFormat.written_for(symmetric)
    assert layout.codec() == codec


def test_config_lists_unquantized_linears_as_dynamic_skips() -> None:
    codec = AffineCodec(bits=4, block=group(128), scale_dtype=torch.float16)
    cfg = hf_gptq.quantization_config(codec, ["lm_head", "re:.*block_sparse_moe[.]gate$"])
    assert cfg["dynamic"] == {"-:.*block_sparse_moe[.]gate$": {}}
    with pytest.raises(SchemeError, match="dynamic"):
        hf_gptq.layout_from_config(cfg)
    with pytest.raises(SchemeError, match="marlin"):
        hf_gptq.layout_from_config({**hf_gptq.quantization_config(codec), "checkpoint_format": "marlin"})


# ------------------------------------------------------------------------------------ lowbit pipeline
def test_quantize_writes_gptq_that_lowbit_reads_back(tmp_path: Path) -> None:
    out = tmp_path / "w8"
    report = quantize(MODEL_DIR, "w8", out, fmt="gptq", progress=False)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["bits"], cfg["group_size"], cfg["sym"]) == ("gptq", 8, -1, True)
    assert cfg["checkpoint_format"] == "gptq" and cfg["desc_act"] is False
    codec = AffineCodec(bits=8, block=PER_CHANNEL, scale_dtype=torch.float16)
    src = open_model(out)
    assert isinstance(src, SafetensorsSource) and src.linear_bits_per_weight is not None
    assert abs(src.linear_bits_per_weight - report.linear_bits_per_weight) < 1e-9
    want = {
        item.name: codec.dequantize(item.quantized)
        for item in walk_quantize(open_model(MODEL_DIR), codec, _rtn(), progress=False)
        if item.quantized is not None
    }
    assert len(want) == 35
    for name, w in want.items():
        assert torch.equal(src.read(name), w), name
    assert not any(n.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for n in src.names())


def test_quantize_refuses_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "ragged"
    with pytest.raises(ShapeError, match="ragged"):
        quantize(MODEL_DIR, "w4g32", out, fmt="gptq", progress=False)  # down_proj has 172 inputs
    assert not out.exists()


def _rtn() -> Any:
    from lowbit.methods.base import get_method

    return get_method("rtn")


# ------------------------------------------------------------------------------------ the real loader
def _require_loader() -> None:
    missing = [m for m in ("gptqmodel", "optimum") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"transformers loads GPTQ checkpoints through {' and '.join(missing)}, not installed in this "
            "environment (gptqmodel==7.6.0 optimum==2.3.0 pin numpy 2.2.6; see the module docstring)"
        )


def _load(out: Path, dtype: torch.dtype, backend: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM, GPTQConfig

    kwargs: dict[str, Any] = {}
    if backend is not None:
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        kwargs["quantization_config"] = GPTQConfig.from_dict({**cfg, "backend": backend})
    return AutoModelForCausalLM.from_pretrained(out, dtype=dtype, **kwargs).eval()


def _check_loaded(out: Path, dtype: torch.dtype, backend: str | None = None) -> tuple[float, float]:
    """Load ``out`` in transformers; assert every quantized Linear's weights as the loader dequantizes them
    (float16: fp16 scales times integer codes) equal lowbit's float32 weights rounded to float16, bit for
    bit; return the max relative logit difference to lowbit's simulated float32 model, and the same for a
    control: lowbit's weights as a plain ``dtype`` model in the same runtime (the rounding noise of
    ``dtype`` alone)."""
    from transformers import AutoTokenizer

    from lowbit.walk.torch_model import build_model

    loaded = _load(out, dtype, backend)
    src = open_model(out)
    names = [n for n in src.names() if n.endswith("proj.weight")]
    assert names
    for name in names:
        module = loaded.get_submodule(name.removesuffix(".weight"))
        w_loader = module.dequantize_weight().T  # (out, in), before the first forward repacks the kernel
        w_lowbit = src.read(name)
        assert w_loader.dtype == torch.float16 and torch.equal(w_loader, w_lowbit.to(torch.float16)), name
    ids = AutoTokenizer.from_pretrained(out)("Once upon a time, there was a little girl", return_tensors="pt")
    with torch.no_grad():
        got = loaded(**ids).logits.float()
        want = build_model(src)(**ids).logits.float()
        control = build_model(src, dtype=dtype)(**ids).logits.float()
    scale = want.abs().max()
    return float((got - want).abs().max() / scale), float((control - want).abs().max() / scale)


# fp32 stories260K: GPTQModel's torch kernel (2/3/8 bits; 4 bits only forced: its CPU int4 kernels need
# in in {32, 64, 128, 256} per-channel and refuse stories260K's 172). The weights are lowbit's rounded once
# to float16 (relative error <= 2**-11 = 4.9e-4 each), the matmuls float32: 2e-3 leaves 4x margin over
# that rounding (measured: <= 4.1e-4) and is far below a zero-point slip (one step of s per weight).
STORIES_CASES = {"w8": None, "w2-asym": None, "w4": "torch"}


@pytest.mark.parametrize("scheme", list(STORIES_CASES))
def test_transformers_loads_stories260k(scheme: str, tmp_path: Path) -> None:
    _require_loader()
    out = tmp_path / "ckpt"
    quantize(MODEL_DIR, scheme, out, fmt="gptq", progress=False)
    rel, _ = _check_loaded(out, torch.float32, STORIES_CASES[scheme])
    assert rel <= 2e-3, f"logits differ by {rel:.2e} relative"


@pytest.mark.shared
@pytest.mark.parametrize("scheme", ["w4g128", "w4g64-asym", "w3g64", "w8g32-asym"])
def test_transformers_loads_tiny256(scheme: str, shared_file: Callable[[str], Path], tmp_path: Path) -> None:
    """tiny256 in its own bfloat16, on the kernels transformers picks by default (GPTQModel's aten int4
    kernel at 4 bits, its torch kernel otherwise). The runtime computes in bfloat16, so the logits are
    held to the control (the same bf16 runtime with lowbit's weights as a dense model): twice its error
    plus 2e-3 (measured: 0.0054-0.0059 against controls of 0.0043-0.0071)."""
    _require_loader()
    model = shared_file(TINY256)
    out = tmp_path / "ckpt"
    quantize(model, scheme, out, fmt="gptq", progress=False)
    rel, control = _check_loaded(out, torch.bfloat16)
    assert rel <= 2 * control + 2e-3, f"logits differ by {rel:.2e} relative (bf16 control {control:.2e})"


@pytest.mark.shared
def test_transformers_loads_act_order(shared_file: Callable[[str], Path], tmp_path: Path) -> None:
    """GPTQ with act-order (dynamic groups, desc_act) on tiny256: scattered g_idx, loaded exactly."""
    _require_loader()
    from lowbit.methods.gptq import GPTQ
    from lowbit.walk.calibrate import CalibConfig, calibrate_walk

    src = open_model(shared_file(TINY256))
    codec = AffineCodec(bits=4, symmetric=False, block=group(64), scale_dtype=torch.float16)
    fmt = get_format("gptq")
    calib = CalibConfig(text=CALIB_TEXT, samples=8, seqlen=128)
    items = calibrate_walk(
        src, codec, GPTQ(GPTQConfig(act_order=True, static_groups=False)), calib, progress=False
    )
    out = tmp_path / "ckpt"
    write_checkpoint(items, src, fmt, codec, out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    reread = open_model(out)
    assert isinstance(reread, SafetensorsSource)
    g_idx = reread.raw("model.layers.0.mlp.down_proj.g_idx")
    assert not torch.equal(g_idx, (torch.arange(768) // 64).to(torch.int32))
    rel, control = _check_loaded(out, torch.bfloat16)
    assert rel <= 2 * control + 2e-3, f"logits differ by {rel:.2e} relative (bf16 control {control:.2e})"


def test_loader_disagrees_when_the_zero_convention_is_mislabelled(tmp_path: Path) -> None:
    """The weight check can fail: the same asymmetric file labelled v1 ("gptq") is read by GPTQModel with
    zero points one higher, and its weights move by one scale step from what lowbit wrote."""
    _require_loader()
    out = tmp_path / "ckpt"
    quantize(MODEL_DIR, "w8-asym", out, fmt="gptq", progress=False)
    src = open_model(out)
    written = {n: src.read(n) for n in src.names() if n.endswith("proj.weight")}
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    assert config["quantization_config"]["checkpoint_format"] == "gptq_v2"
    config["quantization_config"]["checkpoint_format"] = config["quantization_config"]["format"] = "gptq"
    config_path.write_text(json.dumps(config))
    loaded = _load(out, torch.float32)
    for name, w in written.items():
        w_loader = loaded.get_submodule(name.removesuffix(".weight")).dequantize_weight().T
        assert not torch.equal(w_loader, w.to(torch.float16)), name


# GPTQModel's own output (tests/data/gptqmodel, made by GPTQModel 7.6.0 on a CPU): lowbit reads it, and in
# the gptqmodel virtualenv every weight equals what GPTQModel's loader dequantizes and the logits agree.
GPTQMODEL_DATA = Path(__file__).resolve().parents[1] / "data" / "gptqmodel"


@pytest.mark.parametrize("name", ["stories260K-gptq-w4", "stories260K-gptq-w4g32-act"])
def test_reads_gptqmodel_checkpoints(name: str) -> None:
    src = open_model(GPTQMODEL_DATA / name)
    cfg = json.loads((GPTQMODEL_DATA / name / "config.json").read_text())["quantization_config"]
    assert cfg["quantizer"] if "quantizer" in cfg else cfg["meta"]["quantizer"][0].startswith("gptqmodel")
    ref = open_model(MODEL_DIR)
    for n in ref.names():
        w, w0 = src.read(n), ref.read(n)
        assert w.shape == w0.shape, n
        if n.endswith("proj.weight"):  # 4-bit: close to the original, not equal
            assert 0 < float((w - w0).norm() / w0.norm()) < 0.2, n
    assert src.linear_bits_per_weight is not None and 4.0 < src.linear_bits_per_weight < 5.0
    _require_loader()
    rel, control = _check_loaded(GPTQMODEL_DATA / name, torch.float32, "torch")
    assert rel <= 2e-3, f"logits differ by {rel:.2e} relative (fp16 rounding alone: {control:.2e})"

"""compressed-tensors ``float-quantized`` (FP8 e4m3 weights): byte-exact against compressed-tensors' own
compressor, exact round trips, the config, mixed-precision checkpoints, and what the format refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import InputFileError, SchemeError, ShapeError
from lowbit.export import compressed_tensors as ct
from lowbit.export.ct_format import CompressedTensorsFormat, FloatQuantized, PackQuantized, layout_for
from lowbit.formats.affine import AffineCodec
from lowbit.formats.base import PER_CHANNEL, PER_TENSOR, Block, group
from lowbit.formats.fp8 import Fp8Codec, Fp8Format, Fp8Quantized
from lowbit.formats.nf4 import nf4
from lowbit.walk.sources import SafetensorsSource, open_model

MODEL_DIR = Path(lowbit.__file__).parent / "assets" / "models" / "stories260K"
BLOCKS = {"tensor": PER_TENSOR, "channel": PER_CHANNEL}


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    w[3] = 0.0  # an all-zero row gets the eps scale
    return w


def _assert_same(a: Fp8Quantized, b: Fp8Quantized) -> None:
    assert a.shape == b.shape and a.codec == b.codec
    assert a.codes.dtype == b.codes.dtype == torch.float8_e4m3fn
    assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8))
    assert a.scales.dtype == b.scales.dtype == torch.float32 and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("block", list(BLOCKS))
def test_round_trip_and_layout(block: str) -> None:
    codec = Fp8Codec(Fp8Format.E4M3, BLOCKS[block])
    q = codec.quantize(_weight(33, 96))
    t = ct.fp8_linear_tensors(q)
    assert set(t) == {"weight", "weight_scale"}
    assert t["weight"].dtype == torch.float8_e4m3fn and tuple(t["weight"].shape) == (33, 96)
    assert t["weight_scale"].dtype == torch.float32
    assert tuple(t["weight_scale"].shape) == {"tensor": (1,), "channel": (33, 1)}[block]
    back = ct.read_fp8_linear(t, codec)
    _assert_same(back, q)
    assert torch.equal(codec.dequantize(back), codec.dequantize(q))


def test_reads_half_precision_scales_and_zero_points() -> None:
    """llm-compressor stores the scales in the model dtype and may keep an all-zero zero point."""
    codec = Fp8Codec()
    q = codec.quantize(_weight(16, 64, seed=1))
    t = ct.fp8_linear_tensors(q)
    bf16 = t["weight_scale"].to(torch.bfloat16)
    back = ct.read_fp8_linear({**t, "weight_scale": bf16}, codec)
    assert back.scales.dtype == torch.float32 and torch.equal(back.scales, bf16.float())
    zeros = torch.zeros(16, 1, dtype=torch.float8_e4m3fn)
    _assert_same(ct.read_fp8_linear({**t, "weight_zero_point": zeros}, codec), q)


def test_read_refuses_what_it_cannot_read() -> None:
    codec = Fp8Codec()
    t = ct.fp8_linear_tensors(codec.quantize(_weight(16, 64)))
    with pytest.raises(InputFileError, match="float8_e4m3fn"):
        ct.read_fp8_linear({**t, "weight": t["weight"].float()}, codec)
    with pytest.raises(InputFileError, match="weight_scale"):
        ct.read_fp8_linear({"weight": t["weight"]}, codec)
    with pytest.raises(InputFileError, match="shape"):
        ct.read_fp8_linear({**t, "weight_scale": torch.ones(8, 1)}, codec)
    with pytest.raises(InputFileError, match="zero_point"):
        ct.read_fp8_linear({**t, "weight_zero_point": torch.ones(16, 1)}, codec)


def test_e5m2_blocks_and_shapes_are_refused() -> None:
    w = _weight(16, 64)
    with pytest.raises(SchemeError, match="e4m3") as e:
        ct.fp8_linear_tensors(Fp8Codec(Fp8Format.E5M2).quantize(w))
    assert "\n" not in str(e.value)
    for block in (group(32), Block(8, 8)):
        with pytest.raises(SchemeError):
            ct.fp8_linear_tensors(Fp8Codec(block=block).quantize(w))
    with pytest.raises(ShapeError):
        ct.fp8_linear_tensors(Fp8Codec(block=PER_TENSOR).quantize(torch.randn(64)))
    with pytest.raises(SchemeError, match="e4m3"):
        ct.quantization_config(Fp8Codec(Fp8Format.E5M2), ignore=[])


@pytest.mark.parametrize("block", list(BLOCKS))
def test_config_validates_and_round_trips(block: str) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    codec = Fp8Codec(Fp8Format.E4M3, BLOCKS[block])
    cfg = ct.quantization_config(codec, ignore=["lm_head"])
    json.dumps(cfg)
    assert "dequantize" not in cfg  # FP8 checkpoints load compressed
    parsed = QuantizationConfig.model_validate(cfg)
    assert parsed.format == "float-quantized" and parsed.quantization_status == "compressed"
    group_0 = parsed.config_groups["group_0"]
    assert group_0.format == "float-quantized" and group_0.input_activations is None  # FP8 W8A16
    w = group_0.weights
    assert (w.num_bits, w.type, w.symmetric, w.strategy, w.dynamic) == (8, "float", True, block, False)
    assert w.pytorch_dtype() == torch.float8_e4m3fn
    assert w.model_dump() == cfg["config_groups"]["group_0"]["weights"]
    assert ct.codec_from_config(cfg["config_groups"]["group_0"]) == codec
    assert ct.codecs_from_config(cfg) == {"group_0": codec}


def test_codec_from_config_formats() -> None:
    fp8_group: dict[str, Any] = {
        "targets": ["Linear"],
        "weights": {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": "channel",
            "dynamic": False,
        },
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
        "format": None,
    }  # FP8_DYNAMIC as llm-compressor writes it
    for fmt in ("float-quantized", "naive-quantized", None):
        assert ct.codec_from_config(fp8_group, default_format=fmt) == Fp8Codec(block=PER_CHANNEL)
    with pytest.raises(SchemeError, match="pack-quantized"):
        ct.codec_from_config({**fp8_group, "format": "pack-quantized"})
    int_group = {**fp8_group, "weights": {"num_bits": 4, "type": "int", "strategy": "channel"}}
    with pytest.raises(SchemeError, match="float-quantized"):
        ct.codec_from_config({**int_group, "format": "float-quantized"})
    for bad in ({"num_bits": 4}, {"symmetric": False}, {"strategy": "group", "group_size": 32}):
        with pytest.raises(SchemeError):
            ct.codec_from_config({**fp8_group, "weights": {**fp8_group["weights"], **bad}})
    mixed = {"quant_method": "compressed-tensors", "format": "mixed-precision",
             "config_groups": {"a": {**int_group, "format": "pack-quantized"},
                               "b": {**fp8_group, "format": "float-quantized"}}}  # fmt: skip
    codecs = ct.codecs_from_config(mixed)
    assert codecs["b"] == Fp8Codec() and isinstance(codecs["a"], AffineCodec) and codecs["a"].bits == 4
    with pytest.raises(SchemeError):  # a mixed-precision group must name its format... or its type decides
        ct.codecs_from_config({**mixed, "config_groups": {"b": {**fp8_group, "format": "pack-quantized"}}})


def test_format_dispatches_on_the_codec() -> None:
    fmt = CompressedTensorsFormat()
    assert isinstance(layout_for(Fp8Codec()), FloatQuantized)
    assert isinstance(layout_for(AffineCodec(bits=4)), PackQuantized)
    fmt.check(Fp8Codec(), [(64, 172), (172, 64)])
    q = Fp8Codec().quantize(_weight(8, 16))
    assert set(fmt.linear_tensors(q)) == {"weight", "weight_scale"}
    assert fmt.quantization_config(Fp8Codec(), ["lm_head"])["format"] == "float-quantized"
    assert fmt.quantization_config(AffineCodec(bits=4), ["lm_head"])["format"] == "pack-quantized"
    for codec in (nf4(blocksize=64), Fp8Codec(Fp8Format.E5M2), Fp8Codec(block=Block(128, 128))):
        with pytest.raises(SchemeError) as e:
            fmt.check(codec, [(64, 172)])
        assert "\n" not in str(e.value)
    with pytest.raises(SchemeError, match="compressed-tensors holds"):
        fmt.linear_tensors(nf4(blocksize=64).quantize(_weight(8, 64)))
    with pytest.raises(ShapeError, match="ragged"):
        fmt.check(AffineCodec(bits=4, block=group(32)), [(64, 172)])


@pytest.mark.parametrize("strategy", list(BLOCKS))
def test_same_bytes_as_compressed_tensors_own_compressor(strategy: str) -> None:
    """compressed-tensors quantizes and compresses the model as llm-compressor would (its min-max qparams,
    its float-quantized compressor); lowbit quantizing the same weights stores the very same bytes, and
    reads every module back to what compressed-tensors' decompression gives."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.naive_quantized import FloatQuantizationCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="float-quantized")
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        ignore=["lm_head"],
        quantization_status="frozen",
        format="float-quantized",
    )
    apply_quantization_config(model, config, show_progress=False)
    modules = {n: m for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}
    assert len(modules) == 35
    for module in modules.values():
        w = module.weight.detach()
        if strategy == "channel":
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        else:
            lo, hi = w.min(), w.max()
        scale, _ = calculate_qparams(lo, hi, args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype)
    ModelCompressor(quantization_config=config).compress_model(model)

    codec = ct.codec_from_config(config.config_groups["group_0"].model_dump(mode="json"))
    assert codec == Fp8Codec(block=BLOCKS[strategy])
    for name, module in modules.items():
        stored = {k: v.detach() for k, v in module.state_dict().items()}
        assert stored["weight"].dtype == torch.float8_e4m3fn, name
        q = ct.read_fp8_linear(stored, codec)
        reference = FloatQuantizationCompressor.decompress(stored, module.quantization_scheme)["weight"]
        assert torch.equal(codec.dequantize(q), reference.float()), name
        mine = ct.fp8_linear_tensors(codec.quantize(original[f"{name}.weight"]))
        assert set(mine) == set(stored), name
        for key, value in mine.items():
            theirs = stored[key].reshape(value.shape)
            assert value.dtype == theirs.dtype, (name, key)
            assert torch.equal(value.view(torch.uint8), theirs.view(torch.uint8)), (name, key)


def test_mixed_precision_checkpoint(tmp_path: Path) -> None:
    """Attention in int4 (pack-quantized), MLP in FP8 (float-quantized): lowbit and transformers read each
    module with its own group's format, to the same weights."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "mixed"
    shutil.copytree(MODEL_DIR, out)
    int4 = AffineCodec(bits=4, block=PER_CHANNEL, scale_dtype=torch.float32)
    fp8 = Fp8Codec()
    tensors: dict[str, torch.Tensor] = {}
    want: dict[str, torch.Tensor] = {}
    for name, w in load_file(MODEL_DIR / "model.safetensors").items():
        prefix = name.removesuffix(".weight")
        if ".layers." in name and name.endswith("_proj.weight"):
            if ".mlp." in name:
                q8 = fp8.quantize(w)
                tensors.update({f"{prefix}.{k}": v for k, v in ct.fp8_linear_tensors(q8).items()})
                want[name] = fp8.dequantize(q8)
            else:
                q4 = int4.quantize(w)
                tensors.update({f"{prefix}.{k}": v for k, v in ct.linear_tensors(q4).items()})
                want[name] = int4.dequantize(q4)
        else:
            tensors[name] = w
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    qcfg = ct.quantization_config(int4, ["lm_head"], targets=["re:.*self_attn.*"])
    fp8_group = ct.quantization_config(fp8, ["lm_head"], targets=["re:.*mlp.*"])["config_groups"]["group_0"]
    qcfg["config_groups"]["group_1"] = fp8_group
    qcfg["format"] = "mixed-precision"
    config = json.loads((MODEL_DIR / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": qcfg}))

    src = open_model(out)
    assert isinstance(src, SafetensorsSource)
    with src:
        assert set(want) <= set(src.names())
        assert not any(n.endswith(("weight_packed", "weight_scale", "weight_shape")) for n in src.names())
        for name, w in want.items():
            assert torch.equal(src.read(name), w), name
        # int4: 4 bits + 32 per row (+ packing padding); fp8: 8 bits + 32 per row
        assert src.linear_bits_per_weight is not None and 4.4 < src.linear_bits_per_weight < 8.5

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        loaded(input_ids=torch.tensor([[1, 20, 30, 40]]))  # the first forward decompresses
    for name, w in want.items():
        assert torch.equal(loaded.get_parameter(name), w), name


def test_quantization_config_disagreeing_with_file_is_an_input_error(tmp_path: Path) -> None:
    out = tmp_path / "bad"
    shutil.copytree(MODEL_DIR, out)
    tensors = load_file(MODEL_DIR / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    q = AffineCodec(bits=4, scale_dtype=torch.float32).quantize(tensors.pop(f"{name}.weight"))
    tensors.update({f"{name}.{k}": v for k, v in ct.linear_tensors(q).items()})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((MODEL_DIR / "config.json").read_text())
    config["quantization_config"] = ct.quantization_config(Fp8Codec(), ["lm_head"])  # says FP8, holds int4
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputFileError, match="disagree"):
        open_model(out)


def test_bf16_model_loads_within_scale_rounding(tmp_path: Path) -> None:
    """fp32 scales in a bf16 model: transformers rounds them to bf16 before multiplying, lowbit does not;
    the weights agree to a bf16 ulp or two (the bound the module docstring states)."""
    from transformers import AutoModelForCausalLM

    from lowbit.api import quantize

    model = tmp_path / "bf16"
    shutil.copytree(MODEL_DIR, model)
    state = {k: v.to(torch.bfloat16) for k, v in load_file(MODEL_DIR / "model.safetensors").items()}
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((MODEL_DIR / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}))
    out = tmp_path / "out"
    quantize(model, "fp8", out, progress=False)
    stored = load_file(out / "model.safetensors")
    assert stored["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.float32
    assert stored["model.norm.weight"].dtype == torch.bfloat16

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == torch.bfloat16
    with torch.no_grad():
        loaded(input_ids=torch.tensor([[1, 20, 30, 40]]))
    src = open_model(out)
    worst = 0.0
    for name in (n for n in src.names() if src.arch.is_quantizable(n)):
        mine = src.read(name).to(torch.bfloat16).float()
        theirs = loaded.get_parameter(name).float()
        worst = max(worst, ((theirs - mine).abs() / mine.abs().clamp_min(1e-30)).max().item())
    assert worst <= 2**-7

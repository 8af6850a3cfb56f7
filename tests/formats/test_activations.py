"""Activation quantizers and LLM.int8(): against bitsandbytes' own CPU kernels and compressed-tensors."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import SchemeError
from lowbit.formats.activations import ActKind, ActQuant, ActStrategy, LLMInt8, llm_int8_linear
from lowbit.formats.int8 import Int8RowCodec

bnb = pytest.importorskip("bitsandbytes")


def _weights(out: int = 96, inp: int = 160, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.05


def test_int8_rows_bit_exact_with_bitsandbytes() -> None:
    w = _weights()
    w[3] = 0.0  # an all-zero row
    w[5, 7] = 4.0  # a large weight
    q = Int8RowCodec().quantize(w)
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
    assert torch.equal(q.codes, cb)
    assert torch.equal(q.row_absmax, scb)
    assert q.codes.dtype == torch.int8 and q.row_absmax.dtype == torch.float32
    deq = Int8RowCodec().dequantize(q)
    assert (deq - w).abs().max() <= (scb.max() / 127) / 2 + 1e-3


@pytest.mark.parametrize("threshold", [6.0, 2.0, 100.0])
def test_llm_int8_linear_matches_bitsandbytes_linear8bitlt(threshold: float) -> None:
    torch.manual_seed(1)
    w = _weights(64, 128, seed=2)
    layer = bnb.nn.Linear8bitLt(128, 64, bias=True, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = torch.nn.Parameter(torch.randn(64) * 0.1)
    layer = layer.to("cpu")  # quantizes the weight as transformers' load_in_8bit does
    layer.eval()
    x = torch.randn(2, 9, 128)
    x[:, :, 5] *= 20  # an outlier feature in every token
    x[1, 3, 40] = 9.0  # an outlier in one token only
    q = Int8RowCodec().quantize(w)
    assert torch.equal(layer.weight.data, q.codes)
    with torch.no_grad():
        ref = layer(x)
    ours = llm_int8_linear(x, q.codes, q.row_absmax, threshold, layer.bias.data)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_llm_int8_outliers_matter() -> None:
    """With a big outlier feature, the decomposition is far closer to the float matmul than plain int8."""
    w = _weights(64, 128, seed=3)
    q = Int8RowCodec().quantize(w)
    x = torch.randn(32, 128)
    x[:, 11] = 60.0
    exact = x @ Int8RowCodec().dequantize(q).t()
    mixed = llm_int8_linear(x, q.codes, q.row_absmax, 6.0)
    plain = llm_int8_linear(x, q.codes, q.row_absmax, 1e9)
    assert (mixed - exact).pow(2).mean() * 20 < (plain - exact).pow(2).mean()


def test_dynamic_int8_per_token_matches_compressed_tensors() -> None:
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    x = torch.randn(3, 7, 50) * 3
    aq = ActQuant(ActKind.INT, 8, ActStrategy.TOKEN, dynamic=True)
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    mn = x.amin(dim=-1, keepdim=True)
    mx = x.amax(dim=-1, keepdim=True)
    scale, zp = calculate_qparams(mn, mx, args)
    ref = fake_quantize(x, scale, zp, args)
    torch.testing.assert_close(aq.fake_quantize(x), ref, rtol=0, atol=1e-6)
    assert ct is not None


def test_fp8_activations_round_to_e4m3_grid() -> None:
    aq = ActQuant(ActKind.FLOAT, 8, ActStrategy.TOKEN)
    x = torch.randn(5, 40)
    y = aq.fake_quantize(x)
    s = aq.dynamic_scale(x)
    back = (y / s).to(torch.float8_e4m3fn).float() * s
    torch.testing.assert_close(back, y)
    assert ((y - x).abs() <= x.abs().amax(dim=-1, keepdim=True) / 16).all()


def test_static_tensor_scale_and_bad_configs() -> None:
    aq = ActQuant(ActKind.INT, 8, ActStrategy.TENSOR, dynamic=False)
    x = torch.linspace(-2, 2, 11)
    y = aq.fake_quantize(x, aq.scale_from_absmax(torch.tensor(1.0)))
    assert y.max() <= 1.0 + 1e-6 and y.min() >= -1.01  # clipped to the calibrated range
    with pytest.raises(SchemeError):
        aq.fake_quantize(x)
    with pytest.raises(SchemeError):
        ActQuant(ActKind.INT, 8, ActStrategy.TOKEN, dynamic=False)
    with pytest.raises(SchemeError):
        LLMInt8(threshold=0.0)


def test_integer_matmul_is_exact_beyond_float32_range() -> None:
    from lowbit.formats.activations import _exact_int_matmul

    g = torch.Generator().manual_seed(5)
    a = torch.randint(-127, 128, (6, 5000), generator=g)
    b = torch.randint(-127, 128, (7, 5000), generator=g, dtype=torch.int8)
    a[0] = 127
    b[0] = 127  # 127 * 127 * 5000 = 80,645,000 > 2**24
    exact = a.long() @ b.long().t()
    assert torch.equal(_exact_int_matmul(a, b), exact.double())

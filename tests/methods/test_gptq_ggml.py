"""GPTQ inside ggml's block types (:class:`lowbit.formats.ggml.GGMLCodec`).

* the codec is ggml's quantizer: ``quantize_weighted`` writes llama-quantize's bytes (with ``--imatrix``);
* with an identity Hessian GPTQ is round-to-nearest: byte for byte for the k-quants (whose stored codes
  are the nearest level under the stored parameters), never a larger error for the legacy types and
  IQ4 (whose ggml codes come from the search's trial scale, not the stored one);
* on a correlated Hessian GPTQ's loss is below round-to-nearest + importance vector for every type,
  with and without act-order, and the bytes it packs dequantize to the weights it measured;
* what cannot be: act-order with dynamic groups (ggml blocks are consecutive columns), a type that is
  not split into scales and codes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from lowbit.errors import SchemeError
from lowbit.formats.ggml import GGMLCodec, GGMLQuantized
from lowbit.formats.gguf import get_codec
from lowbit.methods.gptq import GPTQ, GPTQConfig, gptq_quantize, hessian_loss

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
K_QUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
IN = 512


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (48, 512) and a Hessian of correlated inputs with channels of different scales."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, IN, generator=g) * torch.exp(0.5 * torch.randn(48, 1, generator=g))
    mix = (
        torch.eye(IN, dtype=torch.float64)
        + 0.5 * torch.randn(IN, IN, generator=g, dtype=torch.float64) / IN**0.5
    )
    x = torch.randn(3000, IN, generator=g, dtype=torch.float64) @ mix
    x *= torch.exp(torch.randn(IN, generator=g, dtype=torch.float64))
    return w, 2.0 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("type_name", TYPES)
def test_codec_is_ggml(type_name: str) -> None:
    codec = GGMLCodec(type_name)
    w = torch.randn(4, IN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    imp = torch.rand(IN, generator=torch.Generator().manual_seed(2)) + 0.1
    blocks = get_codec(type_name)
    x = w.float().numpy()
    q = codec.quantize_weighted(w, imp)
    assert isinstance(q, GGMLQuantized) and q.shape == (4, IN)
    assert np.array_equal(q.data, blocks.quantize_rows(x, imp.numpy()))
    assert np.array_equal(codec.quantize(w).data, blocks.quantize_rows(x))
    assert torch.equal(codec.dequantize(q), torch.from_numpy(blocks.dequantize_rows(q.data, IN)))
    assert codec.storage_bits((4, IN)) == 8 * q.data.size


@pytest.mark.parametrize("type_name", TYPES)
def test_identity_hessian_is_round_to_nearest(
    type_name: str, layer: tuple[torch.Tensor, torch.Tensor]
) -> None:
    w, _ = layer
    codec = GGMLCodec(type_name)
    eye = torch.eye(IN)
    ones = torch.ones(IN)
    rtn = codec.quantize_weighted(w, ones)
    for config in (GPTQConfig(), GPTQConfig(act_order=False, static_groups=False)):
        q = gptq_quantize(w, eye, codec, config, importance=ones)
        assert isinstance(q, GGMLQuantized)
        if type_name in K_QUANTS and config.static_groups:
            assert np.array_equal(q.data, rtn.data)
        lq = hessian_loss(w - codec.dequantize(q), eye)
        assert lq <= hessian_loss(w - codec.dequantize(rtn), eye) * (1 + 1e-6)


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize(
    "config",
    [
        GPTQConfig(),
        GPTQConfig(act_order=False, static_groups=False),
        GPTQConfig(diag_blend=0.0, block_size=48),
    ],
    ids=["static", "no-act-order", "paper"],
)
def test_gptq_beats_rtn_with_importance(
    type_name: str, config: GPTQConfig, layer: tuple[torch.Tensor, torch.Tensor]
) -> None:
    w, h = layer
    codec = GGMLCodec(type_name)
    q = GPTQ(config).quantize_linear(w, codec, {"hessian": h.float()})
    assert isinstance(q, GGMLQuantized) and q.data.shape == (48, get_codec(type_name).row_bytes(IN))
    rtn = codec.quantize_weighted(w, h.diagonal().float())  # llama-quantize with the same inputs' imatrix
    assert hessian_loss(w - codec.dequantize(q), h) < 0.97 * hessian_loss(w - codec.dequantize(rtn), h)


def test_what_ggml_blocks_cannot_do(layer: tuple[torch.Tensor, torch.Tensor]) -> None:
    w, h = layer
    with pytest.raises(SchemeError, match="static groups"):
        gptq_quantize(w, h, GGMLCodec("Q4_K"), GPTQConfig(static_groups=False))
    with pytest.raises(SchemeError, match="--method rtn"):
        gptq_quantize(w, h, GGMLCodec("TQ2_0"))

"""HessianAccumulator: streaming over batches equals the one-shot computation, merging is exact, and
``tr(Δ H Δᵀ)`` is the layer's output error ``(2/N) Σ_t ‖Δ x_t‖²``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lowbit.calib.hessian import HessianAccumulator
from lowbit.errors import ArgumentError, ShapeError
from lowbit.methods.gptq import hessian_loss


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These matrices are tiny: on a busy machine, intra-op threads only add synchronisation
    (measured 10x slower with 2 threads on 2 loaded cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _activations(seed: int = 0) -> list[torch.Tensor]:
    """Batches of differing shapes, (batch, seq, in) and (tokens, in), with an outlier channel."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 7, 24), (13, 24), (1, 1, 24), (3, 5, 24), (40, 24)]
    out = []
    for s in shapes:
        x = torch.randn(*s, generator=g, dtype=torch.float64)
        x[..., 3] *= 50.0
        out.append(x)
    return out


def _batch_hessian(xs: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat([b.reshape(-1, b.shape[-1]) for b in xs])  # (N, in)
    return 2.0 * x.T @ x / x.shape[0]


def test_streaming_equals_batch_in_float64() -> None:
    xs = _activations()
    acc = HessianAccumulator(24)
    for x in xs:
        acc.add(x)
    ref = _batch_hessian(xs)
    assert acc.count == sum(x.numel() // 24 for x in xs) == 83
    h = acc.result(torch.float64)
    assert h.dtype == torch.float64 and h.shape == (24, 24)
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)
    # Symmetric positive semi-definite.
    torch.testing.assert_close(h, h.T, rtol=1e-12, atol=1e-12)
    assert float(torch.linalg.eigvalsh(h).min()) > -1e-9


def test_merge_equals_one_stream() -> None:
    xs = _activations(1)
    one = HessianAccumulator(24)
    for x in xs:
        one.add(x)
    a, b = HessianAccumulator(24), HessianAccumulator(24)
    for x in xs[:2]:
        a.add(x)
    for x in xs[2:]:
        b.add(x)
    merged = a.merge(b)
    assert merged is a and merged.count == one.count
    torch.testing.assert_close(
        merged.result(torch.float64), one.result(torch.float64), rtol=1e-12, atol=1e-12
    )


def test_low_precision_inputs_and_float32_result() -> None:
    xs = [x.to(torch.bfloat16) for x in _activations(2)]
    acc = HessianAccumulator(24)
    for x in xs:
        acc.add(x)
    # bf16 inputs: the Hessian of the bf16 values, their exact products summed in float32 per chunk
    # (relative error of the order of float32's epsilon times the chunk's terms).
    ref = _batch_hessian([x.double() for x in xs])
    scale = float(ref.abs().max())
    torch.testing.assert_close(acc.result(torch.float64), ref, rtol=1e-6, atol=1e-6 * scale)
    h32 = acc.result()
    assert h32.dtype == torch.float32
    torch.testing.assert_close(h32.double(), ref, rtol=1e-6, atol=1e-6)


def test_trace_form_is_the_output_error() -> None:
    xs = _activations(3)
    acc = HessianAccumulator(24)
    for x in xs:
        acc.add(x)
    x = torch.cat([b.reshape(-1, 24) for b in xs])  # (N, in)
    delta = torch.randn(10, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    direct = float((x @ delta.T).pow(2).sum())  # Σ_t ‖Δ x_t‖²
    assert hessian_loss(delta, acc.result(torch.float64)) * acc.count / 2 == pytest.approx(direct, rel=1e-12)


def test_chunks_of_a_long_stream_add_up_in_float64() -> None:
    """More tokens than one chunk, with an outlier channel: the float64 sum of float32 chunk products
    is as close to the exact Hessian as one chunk's float32 rounding, for float32 and bf16 inputs."""
    from lowbit.calib.hessian import CHUNK_TOKENS

    g = torch.Generator().manual_seed(7)
    x = torch.randn(3 * CHUNK_TOKENS + 17, 32, generator=g, dtype=torch.float64)
    x[:, 5] *= 100.0
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        acc = HessianAccumulator(32)
        acc.add(xd[:100])
        acc.add(xd[100:])
        ref = _batch_hessian([xd.double()])
        err = (acc.result(torch.float64) - ref).abs().max() / ref.abs().max()
        assert float(err) < 1e-6, (dtype, float(err))


def test_float32_accumulation_is_available_and_close() -> None:
    xs = _activations(5)
    acc = HessianAccumulator(24, dtype=torch.float32)
    for x in xs:
        acc.add(x)
    assert acc.sum.dtype == torch.float32
    torch.testing.assert_close(acc.result(torch.float64), _batch_hessian(xs), rtol=1e-5, atol=1e-4)


def test_errors() -> None:
    acc = HessianAccumulator(8)
    with pytest.raises(ArgumentError, match="no calibration tokens"):
        acc.result()
    with pytest.raises(ShapeError):
        acc.add(torch.randn(3, 9))
    with pytest.raises(ShapeError):
        acc.add(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ArgumentError, match="NaN or Inf"):
        acc.add(torch.tensor([[float("inf")] + [0.0] * 7]))
    assert acc.count == 0 and not acc.sum.any()  # a rejected batch leaves no trace
    with pytest.raises(ShapeError):
        acc.merge(HessianAccumulator(9))
    with pytest.raises(ShapeError):
        HessianAccumulator(0)

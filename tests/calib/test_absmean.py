"""Per-channel mean |x| (AWQ) and max |x| (SmoothQuant): streaming equals batch, merging is exact."""

from __future__ import annotations

import pytest
import torch

from lowbit.calib.absmean import AbsMaxAccumulator, AbsMeanAccumulator
from lowbit.errors import ArgumentError, ShapeError


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(*s, generator=g, dtype=torch.float64) for s in [(2, 9, 16), (5, 16), (1, 3, 16), (30, 16)]
    ]
    xs[2][0, 1, 7] = -400.0  # an outlier in a small batch: the max must come from it
    return xs


def _flat(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1, 16) for x in xs])


def test_absmean_streaming_equals_batch() -> None:
    xs = _batches()
    acc = AbsMeanAccumulator(16)
    for x in xs:
        acc.add(x)
    ref = _flat(xs).abs().mean(dim=0)
    assert acc.count == 56
    torch.testing.assert_close(acc.result(torch.float64), ref, rtol=1e-12, atol=1e-12)
    assert acc.result().dtype == torch.float32


def test_absmax_streaming_equals_batch() -> None:
    xs = [x.float() for x in _batches()]
    acc = AbsMaxAccumulator(16)
    for x in xs:
        acc.add(x)
    ref = _flat(xs).abs().amax(dim=0)
    assert torch.equal(acc.result(), ref)
    assert acc.result()[7] == 400.0


@pytest.mark.parametrize("cls", [AbsMeanAccumulator, AbsMaxAccumulator])
def test_merge_equals_one_stream(cls: type[AbsMeanAccumulator] | type[AbsMaxAccumulator]) -> None:
    xs = _batches()
    one, a, b = cls(16), cls(16), cls(16)
    for x in xs:
        one.add(x)
    a.add(xs[0])
    for x in xs[1:]:
        b.add(x)
    assert a.merge(b) is a  # type: ignore[arg-type]
    assert a.count == one.count
    torch.testing.assert_close(a.result(torch.float64), one.result(torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [AbsMeanAccumulator, AbsMaxAccumulator])
def test_errors(cls: type[AbsMeanAccumulator] | type[AbsMaxAccumulator]) -> None:
    acc = cls(4)
    with pytest.raises(ArgumentError):
        acc.result()
    with pytest.raises(ShapeError):
        acc.add(torch.randn(2, 5))
    with pytest.raises(ArgumentError):
        acc.add(torch.tensor([[float("nan"), 0.0, 0.0, 0.0]]))
    with pytest.raises(ShapeError):
        acc.merge(cls(5))  # type: ignore[arg-type]

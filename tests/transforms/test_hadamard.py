"""Hadamard matrices are exactly Hadamard (H Hᵀ = n I, entries ±1); the random ones are orthogonal and
reproducible from their seed."""

from __future__ import annotations

import pytest
import torch

from lowbit.transforms.hadamard import (
    RotationKind,
    describe,
    hadamard,
    hadamard_factors,
    orthogonal,
    paley,
    random_orthogonal,
    randomized_hadamard,
    sylvester,
)


def _assert_hadamard(h: torch.Tensor) -> None:
    n = h.shape[0]
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 256, 1024])
def test_sylvester(n: int) -> None:
    _assert_hadamard(sylvester(n))


@pytest.mark.parametrize(
    ("q", "order"),
    [(3, 4), (7, 8), (11, 12), (19, 20), (43, 44), (47, 48), (5, 12), (13, 28), (17, 36), (29, 60)],
)
def test_paley_both_constructions(q: int, order: int) -> None:
    """Paley I (q ≡ 3 mod 4) has order q + 1, Paley II (q ≡ 1 mod 4) 2(q + 1)."""
    h = paley(q)
    assert h.shape[0] == order
    _assert_hadamard(h)


@pytest.mark.parametrize("bad", [2, 9, 15])
def test_paley_refuses_non_odd_primes(bad: int) -> None:
    with pytest.raises(ValueError):
        paley(bad)


@pytest.mark.parametrize(
    ("n", "factors"),
    [(64, (1, 64)), (576, (36, 16)), (768, (12, 64)), (896, (28, 32)), (2304, (36, 64)), (5120, (20, 256))],
)
def test_model_widths_get_a_hadamard(n: int, factors: tuple[int, int]) -> None:
    """The widths of real models (SmolLM2 576, Qwen2-0.5B 896, Gemma2-2B 2304, ...) are Paley ⊗ Sylvester."""
    assert hadamard_factors(n) == factors
    if n > 1024:
        return  # seconds of matrix product; their Paley factors are checked in test_paley_both_constructions
    h = hadamard(n)
    assert h is not None
    _assert_hadamard(h)


@pytest.mark.parametrize("n", [3, 6, 100, 172])
def test_no_hadamard_where_none_is_built(n: int) -> None:
    assert hadamard_factors(n) is None and hadamard(n) is None
    assert describe(n, RotationKind.HADAMARD) == f"random orthogonal {n}"


def _assert_orthogonal(q: torch.Tensor, tol: float) -> None:
    n = q.shape[0]
    assert q.dtype == torch.float64
    assert float((q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max()) < tol
    assert float((q.T @ q - torch.eye(n, dtype=torch.float64)).abs().max()) < tol


@pytest.mark.parametrize("n", [8, 64, 576])
def test_randomized_hadamard_is_orthogonal_and_seeded(n: int) -> None:
    a, b, c = (randomized_hadamard(n, s) for s in (1, 1, 2))
    assert a is not None and b is not None and c is not None
    _assert_orthogonal(a, 1e-12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every entry has magnitude 1/√n: each coordinate is spread evenly over all others
    assert torch.allclose(a.abs(), torch.full_like(a, n**-0.5), rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", [5, 64, 172])
def test_random_orthogonal_is_orthogonal_and_seeded(n: int) -> None:
    a, b, c = random_orthogonal(n, 7), random_orthogonal(n, 7), random_orthogonal(n, 8)
    _assert_orthogonal(a, 1e-12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.linalg.det(a).abs().item() == pytest.approx(1.0, abs=1e-10)


def test_random_orthogonal_sign_fix_makes_it_unbiased() -> None:
    """Without the sign fix, QR returns Q with a biased sign convention; with it, the mean of the
    first column's entries over many draws is near 0."""
    first = torch.stack([random_orthogonal(4, s)[0, 0] for s in range(400)])
    assert abs(float(first.mean())) < 0.1


def test_orthogonal_falls_back_to_random_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="lowbit.transforms.hadamard"):
        q = orthogonal(172, RotationKind.HADAMARD, 0)
    assert "no Hadamard matrix of order 172" in caplog.text
    assert torch.equal(q, random_orthogonal(172, 0))
    expected = randomized_hadamard(576, 0)
    assert expected is not None and torch.equal(orthogonal(576, RotationKind.HADAMARD, 0), expected)
    assert torch.equal(orthogonal(576, RotationKind.RANDOM, 0), random_orthogonal(576, 0))

"""Hadamard and random orthogonal matrices for rotations (QuaRot, SpinQuant): pure, float64, seeded.

A Hadamard matrix ``H`` (n, n) has entries ±1 and ``H Hᵀ = n I``; ``H diag(s) / √n`` with random signs
``s`` is orthogonal and spreads every coordinate of a vector over all others (what makes outliers
quantize better). Orders built here:

* Sylvester: ``H_{2n} = [[H, H], [H, -H]]`` for powers of two;
* Paley I: order ``q + 1`` for a prime ``q ≡ 3 (mod 4)`` (12, 20, 24, 32, 44, 48, 60, ...);
* Paley II: order ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)`` (12, 28, 36, 60, 76, ...);
* Kronecker products ``H_m ⊗ H_{2^k}`` of one Paley matrix with a Sylvester one (576 = 36 · 16,
  768 = 12 · 64, 896 = 28 · 32).

Other orders (prime powers that are not primes, products of two Paley orders, ...) are not built:
:func:`hadamard` returns None and :func:`orthogonal` falls back to a seeded random orthogonal matrix.
"""

from __future__ import annotations

import logging
from enum import StrEnum

import torch

log = logging.getLogger(__name__)


class RotationKind(StrEnum):
    """How a rotation matrix is drawn."""

    HADAMARD = "hadamard"  # H diag(±1) / √n where a Hadamard matrix of that order is known
    RANDOM = "random"  # QR of a Gaussian matrix (Haar-distributed)


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q**0.5) + 1))


def sylvester(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix ``(n, n)`` float64 of ±1, ``n`` a power of two (1 included)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """``(q, q)`` float64: ``Q[i, j] = χ(j - i)``, χ the quadratic character modulo the prime ``q``."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    chi[[(x * x) % q for x in range(1, q)]] = 1.0
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley(q: int) -> torch.Tensor:
    """A Hadamard matrix from the prime ``q``: order ``q + 1`` (Paley I, ``q ≡ 3 mod 4``) or
    ``2(q + 1)`` (Paley II, ``q ≡ 1 mod 4``); float64 of ±1."""
    if not _is_prime(q) or q == 2:
        raise ValueError(f"Paley's constructions here take an odd prime, not {q}")
    jac = _jacobsthal(q)
    ones = torch.ones(1, q, dtype=torch.float64)
    if q % 4 == 3:
        # S = [[0, 1ᵀ], [-1, Q]] is a skew conference matrix (Q is skew: χ(-1) = -1); H = I + S.
        s = torch.cat(
            [torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones], 1), torch.cat([-ones.T, jac], 1)], 0
        )
        return torch.eye(q + 1, dtype=torch.float64) + s
    # C = [[0, 1ᵀ], [1, Q]] is a symmetric conference matrix (χ(-1) = 1): 0 -> [[1,-1],[-1,-1]], ±1 -> ±[[1,1],[1,-1]].
    c = torch.cat(
        [torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones], 1), torch.cat([ones.T, jac], 1)], 0
    )
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    sign_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, sign_block) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero_block)


def _paley_prime(m: int) -> int | None:
    """The prime ``q`` whose Paley matrix has order ``m``, if there is one."""
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return m - 1
    q = m // 2 - 1
    if _is_prime(q) and q % 4 == 1:
        return q
    return None


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """``(m, 2^k)`` with ``n = m · 2^k`` and ``m`` 1 or a Paley order (the smallest such ``m``), or None
    where no Hadamard matrix of order ``n`` is built here."""
    if n < 1:
        return None
    k = (n & -n).bit_length() - 1  # the largest power of two dividing n
    for j in range(k, -1, -1):
        m = n >> j
        if m == 1 or _paley_prime(m) is not None:
            return m, 1 << j
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix ``(n, n)`` float64 of ±1 with ``H Hᵀ = n I`` exactly, or None where none of
    the constructions above gives order ``n``."""
    factors = hadamard_factors(n)
    if factors is None:
        return None
    m, p = factors
    h = sylvester(p)
    if m == 1:
        return h
    q = _paley_prime(m)
    assert q is not None
    return torch.kron(paley(q), h)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """``(n,)`` float64 of ±1, equiprobable, determined by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal ``(n, n)`` float64 matrix determined by ``seed``: QR of a Gaussian
    matrix, with each column of Q multiplied by the sign of R's diagonal (without the fix QR's sign
    convention would bias the distribution)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return q * d[None, :]


def randomized_hadamard(n: int, seed: int) -> torch.Tensor | None:
    """``H diag(s) / √n`` ``(n, n)`` float64 (orthogonal), ``s`` random signs from ``seed``; None where
    no Hadamard matrix of order ``n`` is built here."""
    h = hadamard(n)
    if h is None:
        return None
    return h * random_signs(n, seed)[None, :] / n**0.5


def orthogonal(n: int, kind: RotationKind, seed: int) -> torch.Tensor:
    """An orthogonal ``(n, n)`` float64 matrix of ``kind``: a randomized Hadamard matrix where one of
    order ``n`` is known (else, logged, a random orthogonal one), or a random orthogonal matrix."""
    if kind is RotationKind.HADAMARD:
        q = randomized_hadamard(n, seed)
        if q is not None:
            return q
        log.info("no Hadamard matrix of order %d is built by lowbit; using a seeded random orthogonal one", n)
    return random_orthogonal(n, seed)


def describe(n: int, kind: RotationKind) -> str:
    """What :func:`orthogonal` builds for order ``n``: ``"Hadamard 36·16"``, ``"random orthogonal"``."""
    factors = hadamard_factors(n) if kind is RotationKind.HADAMARD else None
    if factors is None:
        return f"random orthogonal {n}"
    m, p = factors
    return f"Hadamard {n}" if m == 1 else f"Hadamard {m}·{p}"

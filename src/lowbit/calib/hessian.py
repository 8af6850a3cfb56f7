"""Streaming Hessian of a linear layer's reconstruction loss: ``H = (2/N) Σ_t x_t x_tᵀ``.

For a linear ``y = W x`` and a quantized ``Q``, ``Σ_t ‖(W - Q) x_t‖² = (N/2) tr((W - Q) H (W - Q)ᵀ)``, so
``H`` is all GPTQ needs to know about the calibration inputs. It is fed batches of inputs of any shape
``(..., in_features)`` (the hook sees ``(batch, seq, in)``); every leading position is one token.

The sum ``S = Σ_t x_t x_tᵀ`` and the token count ``N`` are kept apart and ``H = 2 S / N`` is formed only in
:meth:`HessianAccumulator.result`, so that the result does not depend on how the tokens were split into
batches, and two accumulators (two processes, two calibration sets) merge exactly by adding ``S`` and ``N``.

Why float64 by default: ``S`` is a sum over 10⁴–10⁶ tokens of products whose magnitudes differ by
orders of magnitude between channels (LLM activations have outlier channels 100× the median).
In float32 the rounding error of such a sum grows with the number of terms (up to ``N · 6e-8``
relative), which reaches the size of ``H``'s small eigenvalues, and those are exactly what the
Cholesky factorization of ``H + λI`` and the GPTQ updates ``H⁻¹`` depend on: a rank-deficient ``H``
accumulated in float32 can come out indefinite. The cost is memory (``8 · in²`` bytes: 16 MB for
in = 1536, 0.5 GB for in = 8192); pass ``dtype=torch.float32`` to trade that back.

How a batch is added (speed without giving that up): the tokens are taken in chunks of
:data:`CHUNK_TOKENS`; each chunk's ``xᵀx`` is one float32 matrix product (``addmm``) whose result is
added to the float64 sum, so rounding grows with the chunk, not with ``N``. Float64 inputs are
multiplied in float64. bfloat16 inputs (the calibration walk's default) are multiplied on the CPU's
bf16 units with float32 accumulation (oneDNN's bf16 "fpmath" mode): the products of two bf16 numbers
are exact in float32, so this is the same float32 product, 2-4x faster.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import ClassVar, Self

import torch

from lowbit.errors import ArgumentError, ShapeError

CHUNK_TOKENS = 4096


@functools.cache
def _bf16_matmul_supported() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextlib.contextmanager
def _bf16_products() -> Iterator[None]:
    """float32 matrix products computed from bf16-rounded operands with float32 accumulation: exact
    for operands that are bf16 values."""
    m = getattr(torch.backends.mkldnn, "matmul")  # noqa: B009 (not in torch's type stubs)
    before = m.fp32_precision
    m.fp32_precision = "bf16"
    try:
        yield
    finally:
        m.fp32_precision = before


def xtx_into(total: torch.Tensor, x: torch.Tensor) -> None:
    """``total += xᵀx`` for ``x`` (tokens, in), chunk by chunk (see the module docstring); ``total``
    (in, in) float32 or float64."""
    exact_bf16 = x.dtype == torch.bfloat16 and _bf16_matmul_supported()
    mm_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    direct = total.dtype == mm_dtype
    for c in range(0, x.shape[0], CHUNK_TOKENS):
        xc = x[c : c + CHUNK_TOKENS].to(mm_dtype)
        with _bf16_products() if exact_bf16 else contextlib.nullcontext():
            if direct:
                total.addmm_(xc.T, xc)
            else:
                total += xc.T @ xc


_NON_FINITE = (
    "calibration activations hold NaN or Inf (an overflow in float16/bfloat16?); "
    "run the calibration forward pass in float32"
)


def as_tokens(x: torch.Tensor, in_features: int, dtype: torch.dtype, check: bool = True) -> torch.Tensor:
    """``x`` (..., in_features) -> (tokens, in_features) in ``dtype``; rejects other widths and (unless
    ``check`` is False: the caller checks a cheaper derived quantity) NaN/Inf."""
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ShapeError(f"expected inputs of shape (..., {in_features}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ShapeError(f"expected floating-point activations, got {x.dtype}")
    x2 = x.detach().reshape(-1, in_features).to(dtype)
    if check and not torch.isfinite(x2).all():
        raise ArgumentError(_NON_FINITE)
    return x2


class HessianAccumulator:
    """``H = (2/N) Σ_t x_t x_tᵀ`` over every token ``x_t`` (in_features,) fed to :meth:`add`.

    State: ``sum`` (in, in) in ``dtype`` (float64 by default, see the module docstring) and ``count``
    (tokens seen, an ``int``).
    """

    name: ClassVar[str] = "hessian"

    def __init__(
        self, in_features: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> None:
        if in_features < 1:
            raise ShapeError(f"in_features must be positive, not {in_features}")
        if not dtype.is_floating_point:
            raise ArgumentError(f"the Hessian accumulates in a floating-point dtype, not {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self.sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch ``x`` (..., in_features), any float dtype (converted to ``dtype`` first)."""
        # A NaN or Inf anywhere in column i of x makes the diagonal entry sum_t x_ti^2 NaN or Inf, so
        # checking the (in,) diagonal after the product replaces a pass over all of x (measured: 0.16 s
        # per bf16 batch of 65536 x 1536, 15% of a SmolLM2 GPTQ run).
        x2 = as_tokens(x, self.in_features, x.dtype, check=False)  # (T, in)
        before = self.sum.clone()  # (in, in): a rejected batch leaves no trace
        xtx_into(self.sum, x2.to(self.sum.device))  # += xᵀx, (in, in)
        if not bool(torch.isfinite(self.sum.diagonal()).all()):
            self.sum = before
            raise ArgumentError(_NON_FINITE)
        self.count += x2.shape[0]

    def merge(self, other: HessianAccumulator) -> Self:
        """Add ``other``'s tokens to this accumulator (in place) and return it."""
        if other.in_features != self.in_features:
            raise ShapeError(f"cannot merge Hessians of widths {self.in_features} and {other.in_features}")
        self.sum += other.sum.to(device=self.sum.device, dtype=self.dtype)
        self.count += other.count
        return self

    def result(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``H = 2 S / N`` (in, in) in ``dtype`` (symmetric, positive semi-definite)."""
        if self.count == 0:
            raise ArgumentError(
                "the Hessian saw no calibration tokens: this layer was never run during calibration "
                "(check the calibration text and the hooks)"
            )
        return (self.sum * (2.0 / self.count)).to(dtype)


class InputErrorAccumulator:
    """How a linear's inputs in the quantized model, ``x_t``, differ from those it receives in the
    *original* model, ``x̂_t``, token for token: ``D = (2/N) Σ_t (x̂_t - x_t) x_tᵀ`` and, on the same
    tokens, ``H = (2/N) Σ_t x_t x_tᵀ`` (both (in, in)).

    ``W + W D H⁻¹`` is the weight whose outputs on the quantized model's inputs come closest to the
    original model's outputs ``W x̂_t`` (least squares: ``W (H + D) H⁻¹`` with ``H + D`` the cross
    statistic ``C = (2/N) Σ x̂_t x_tᵀ``): what GPTQ quantizes when it also corrects the error the layers
    before handed down (asymmetric calibration, GPTAQ: Li, Yang, Wei, Xu, Yin, ICML 2025). ``D`` and ``H``
    must come from the same tokens: with ``H`` of more tokens than ``D``, ``D H⁻¹`` is no longer a
    projection of the data and the correction grows block after block (measured on SmolLM2:
    ``|W* - W| > |W|`` by block 6). The walk feeds both inputs (``needs_original``).

    ``C`` is accumulated as :func:`xtx_into` accumulates ``xᵀx`` (float32 chunk products into float64;
    bf16 inputs on the bf16 units, exact), and ``D = C - H`` is formed in :meth:`result` (float64: the
    cancellation costs ~1e-5 of ``|C|``). ``H`` is this accumulator's own, or, after :meth:`share_gram`,
    a :class:`HessianAccumulator` of the same tokens (the walk shares the one GPTQ uses when the original
    model ran on every window, which saves a second ``xᵀx``). :meth:`result` is ``(2, in, in)``: ``[D, H]``.
    """

    name: ClassVar[str] = "input_error"
    needs_original: ClassVar[bool] = True

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if in_features < 1:
            raise ShapeError(f"in_features must be positive, not {in_features}")
        self.in_features = in_features
        self.cross = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)  # Σ x̂ xᵀ
        self.gram: HessianAccumulator | None = HessianAccumulator(in_features, device=device)
        self._shared = False
        self.count = 0

    def share_gram(self, hessian: HessianAccumulator) -> None:
        """Use ``hessian`` (fed the same tokens as this accumulator, by the caller) for ``H``."""
        if hessian.in_features != self.in_features or self.count or hessian.count:
            raise ArgumentError("share_gram needs an empty Hessian of the same width, before any token")
        self.gram, self._shared = hessian, True

    def add(self, x: torch.Tensor, original: torch.Tensor) -> None:
        """Accumulate a batch ``x`` (..., in) of the quantized model's inputs and the original model's
        ``original`` (same shape) for the same tokens; a NaN or Inf in either shows in the products and
        is refused."""
        x2 = as_tokens(x, self.in_features, x.dtype, check=False)  # (T, in)
        o2 = as_tokens(original, self.in_features, original.dtype, check=False)
        if o2.shape != x2.shape:
            raise ShapeError(f"the original inputs {tuple(o2.shape)} do not pair with {tuple(x2.shape)}")
        exact_bf16 = x2.dtype == o2.dtype == torch.bfloat16 and _bf16_matmul_supported()
        part = torch.zeros_like(self.cross)
        for c in range(0, x2.shape[0], CHUNK_TOKENS):
            xc = x2[c : c + CHUNK_TOKENS].float()
            oc = o2[c : c + CHUNK_TOKENS].float()
            with _bf16_products() if exact_bf16 else contextlib.nullcontext():
                part += oc.T @ xc
        if not bool(torch.isfinite(part.diagonal()).all()) or not bool(torch.isfinite(part).all()):
            raise ArgumentError(_NON_FINITE)
        if not self._shared:
            assert self.gram is not None
            self.gram.add(x2)
        self.cross += part
        self.count += x2.shape[0]

    def result(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[D, H]`` (2, in, in) in ``dtype``: ``D`` row ``i`` of the input error, column ``j`` of the
        inputs; ``H`` of the same tokens."""
        if self.count == 0:
            raise ArgumentError("the input-error statistic saw no calibration tokens; was the layer run?")
        assert self.gram is not None
        if self.gram.count != self.count:
            raise ArgumentError(
                f"the input-error statistic saw {self.count} tokens but its Gram matrix {self.gram.count}: "
                "they must be the same tokens"
            )
        h = self.gram.sum.to(torch.float64)
        return (torch.stack([self.cross - h, h]) * (2.0 / self.count)).to(dtype)

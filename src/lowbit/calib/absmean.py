"""Streaming per-input-channel activation magnitudes.

* :class:`AbsMeanAccumulator` (``"absmean"``): ``mean_t |x_t[c]|`` for each input channel ``c``, the
  activation scale AWQ searches its per-channel scaling exponent against.
* :class:`AbsMaxAccumulator` (``"absmax"``): ``max_t |x_t[c]|``, the activation range SmoothQuant
  migrates into the weights.
* :class:`ImportanceAccumulator` (``"importance"``): ``mean_t x_t[c]²``, llama-imatrix's importance of
  each input column, which ggml's quantizers weight their parameter search with.

Both take batches of any shape ``(..., in_features)`` (every leading position is one token), keep state
that does not depend on how the tokens were split into batches, and merge exactly.
"""

from __future__ import annotations

from typing import ClassVar, Self

import torch

from lowbit.calib.hessian import as_tokens
from lowbit.errors import ArgumentError, ShapeError


class AbsMeanAccumulator:
    """``mean_t |x_t|`` (in_features,) over every token fed to :meth:`add`.

    State: ``sum`` of ``|x|`` (in,) in ``dtype`` (float64 by default: a sum of 10⁵+ positive terms loses
    about ``N · 6e-8`` of its value in float32) and ``count`` (tokens).
    """

    name: ClassVar[str] = "absmean"

    def __init__(
        self, in_features: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> None:
        if in_features < 1:
            raise ShapeError(f"in_features must be positive, not {in_features}")
        self.in_features = in_features
        self.dtype = dtype
        self.sum = torch.zeros(in_features, dtype=dtype, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x2 = as_tokens(x, self.in_features, self.dtype).to(self.sum.device)  # (T, in)
        self.sum += x2.abs().sum(dim=0)
        self.count += x2.shape[0]

    def merge(self, other: AbsMeanAccumulator) -> Self:
        if other.in_features != self.in_features:
            raise ShapeError(f"cannot merge statistics of widths {self.in_features} and {other.in_features}")
        self.sum += other.sum.to(device=self.sum.device, dtype=self.dtype)
        self.count += other.count
        return self

    def result(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-channel mean ``|x|`` (in_features,) in ``dtype``."""
        if self.count == 0:
            raise ArgumentError("the activation statistic saw no calibration tokens; was the layer run?")
        return (self.sum / self.count).to(dtype)


class AbsMaxAccumulator:
    """``max_t |x_t|`` (in_features,) over every token fed to :meth:`add`.

    A maximum is exact in any dtype; the state is kept in float32 (activations are cast to it, so
    float16/bfloat16 inputs are represented exactly).
    """

    name: ClassVar[str] = "absmax"

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if in_features < 1:
            raise ShapeError(f"in_features must be positive, not {in_features}")
        self.in_features = in_features
        self.max = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x2 = as_tokens(x, self.in_features, torch.float32).to(self.max.device)  # (T, in)
        if x2.shape[0]:
            torch.maximum(self.max, x2.abs().amax(dim=0), out=self.max)
        self.count += x2.shape[0]

    def merge(self, other: AbsMaxAccumulator) -> Self:
        if other.in_features != self.in_features:
            raise ShapeError(f"cannot merge statistics of widths {self.in_features} and {other.in_features}")
        torch.maximum(self.max, other.max.to(self.max.device), out=self.max)
        self.count += other.count
        return self

    def result(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-channel max ``|x|`` (in_features,) in ``dtype``."""
        if self.count == 0:
            raise ArgumentError("the activation statistic saw no calibration tokens; was the layer run?")
        return self.max.to(dtype)


class ImportanceAccumulator:
    """``mean_t x_t²`` (in_features,): llama-imatrix's statistic (its ``in_sum2 / counts``).

    State: ``sum`` of ``x²`` (in,) in float64 and ``count`` (tokens). One batch is summed in float32
    (torch reduces pairwise: ~1e-7 relative error) and batches are added in float64; a NaN/Inf shows in
    the batch sum and is refused.
    """

    name: ClassVar[str] = "importance"

    def __init__(self, in_features: int) -> None:
        if in_features < 1:
            raise ShapeError(f"in_features must be positive, not {in_features}")
        self.in_features = in_features
        self.sum = torch.zeros(in_features, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"expected inputs of shape (..., {self.in_features}), got {tuple(x.shape)}")
        x2 = x.detach().reshape(-1, self.in_features).float()  # (T, in)
        part = (x2 * x2).sum(dim=0)
        if not torch.isfinite(part).all():
            raise ArgumentError(
                "calibration activations overflow (NaN or Inf in the sum of squares); "
                "the model does not run stably in float32 on this text"
            )
        self.sum += part.double()
        self.count += x2.shape[0]

    def merge(self, other: ImportanceAccumulator) -> Self:
        if other.in_features != self.in_features:
            raise ShapeError(f"cannot merge statistics of widths {self.in_features} and {other.in_features}")
        self.sum += other.sum
        self.count += other.count
        return self

    def result(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-channel mean ``x²`` (in_features,) in ``dtype``."""
        if self.count == 0:
            raise ArgumentError("the activation statistic saw no calibration tokens; was the layer run?")
        return (self.sum / self.count).to(dtype)

"""Activation quantizers: what a W8A8 runtime does to a linear layer's *input* before the matmul.

Weights are quantized once, offline, by a :class:`~lowbit.formats.base.Codec`; activations are quantized on
the fly, every forward pass. :class:`ActQuant` says how (integer or FP8, per token or per tensor, dynamic
or with a static scale from calibration) and :meth:`ActQuant.fake_quantize` reproduces it in float so an
evaluation of a W8A8 model measures what the runtime computes.

Conventions follow compressed-tensors (the format lowbit writes W8A8 in, and what vLLM reads):
``scale = absmax / (range / 2)`` with range 255 for int8 (so the symmetric grid is [-128, 127] with the
positive extreme just clipped) and 896 for FP8 e4m3 (±448).

:func:`llm_int8_linear` is bitsandbytes' LLM.int8() matmul — int8 rows × int8 per-token activations with
the outlier input columns kept in 16-bit — computed exactly as bitsandbytes' CPU path does (the integer
product is exact: see :func:`_exact_int_matmul`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from lowbit.errors import SchemeError

# The scheme vocabulary (lowbit.schemes) names these specs without loading torch (GGUF mixes run on numpy
# alone); the functions that compute import it when called.
if TYPE_CHECKING:
    import torch

    from lowbit.formats.gguf.dot_input import GGMLDotInput


class ActKind(StrEnum):
    INT = "int"
    FLOAT = "float"


class ActStrategy(StrEnum):
    TOKEN = "token"  # one scale per token (row of the flattened input)
    TENSOR = "tensor"  # one scale for the whole input


FP8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class ActQuant:
    """How a linear's input is quantized at run time (symmetric: zero maps to zero).

    ``dynamic``: the scale is computed from each input as it arrives; otherwise a static scale measured
    on calibration data is stored with the weights (``input_scale``) and only ``TENSOR`` is allowed.
    """

    kind: ActKind = ActKind.INT
    bits: int = 8
    strategy: ActStrategy = ActStrategy.TOKEN
    dynamic: bool = True

    def __post_init__(self) -> None:
        if self.kind == ActKind.INT and not 2 <= self.bits <= 8:
            raise SchemeError(f"integer activations take 2..8 bits, not {self.bits}")
        if self.kind == ActKind.FLOAT and self.bits != 8:
            raise SchemeError(f"float activations are FP8 e4m3 (8 bits), not {self.bits} bits")
        if not self.dynamic and self.strategy != ActStrategy.TENSOR:
            raise SchemeError("static activation scales are per tensor; per-token scales must be dynamic")

    @property
    def label(self) -> str:
        kind = f"int{self.bits}" if self.kind == ActKind.INT else "fp8"
        return f"{kind} per-{self.strategy.value} {'dynamic' if self.dynamic else 'static'}"

    @property
    def half_range(self) -> float:
        """``absmax / scale``: 127.5 for int8, 448 for FP8 e4m3."""
        if self.kind == ActKind.FLOAT:
            return FP8_E4M3_MAX
        return (2**self.bits - 1) / 2

    def scale_from_absmax(self, absmax: torch.Tensor) -> torch.Tensor:
        """The scale(s) for inputs whose largest magnitude is ``absmax`` (never zero)."""
        import torch

        return (absmax.float() / self.half_range).clamp(min=torch.finfo(torch.float32).eps)

    def dynamic_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Scale of ``x`` (..., in): (..., 1) per token, or () per tensor."""
        if self.strategy == ActStrategy.TOKEN:
            return self.scale_from_absmax(x.detach().abs().amax(dim=-1, keepdim=True))
        return self.scale_from_absmax(x.detach().abs().amax())

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` quantized and dequantized (same shape and dtype). ``scale``: the static scale (required
        when not dynamic)."""
        import torch

        if scale is None:
            if not self.dynamic:
                raise SchemeError("static activation quantization needs its calibrated input_scale")
            scale = self.dynamic_scale(x)
        s = scale.float()
        xf = x.float()
        if self.kind == ActKind.FLOAT:
            q = (xf / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
        else:
            lo, hi = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
            q = torch.round(xf / s).clamp(lo, hi)
        return (q * s).to(x.dtype)


@dataclass(frozen=True)
class LLMInt8:
    """bitsandbytes' LLM.int8() activations: int8 per token (absmax / 127) except the input columns where
    some token reaches ``threshold`` in magnitude, which stay in 16-bit."""

    threshold: float = 6.0

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise SchemeError(
                f"LLM.int8() outlier threshold must be > 0 (bitsandbytes' default is 6.0), not {self.threshold}"
            )

    @property
    def label(self) -> str:
        return f"LLM.int8() int8 per-token, outliers >= {self.threshold:g} in 16-bit"


def llm_int8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    row_absmax: torch.Tensor,
    threshold: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """bitsandbytes ``Linear8bitLt`` inference: ``x`` (..., in) times int8 weight ``codes`` (out, in) with
    row scales ``row_absmax`` / 127.

    As bitsandbytes does on CPU: the input is cast to fp16; columns holding any element with
    ``|x| >= threshold`` are outlier columns; the outlier *elements* are zeroed before each token's
    absmax is taken; the int8 product skips the outlier columns, which are added back as the original
    input times the dequantized weight columns.
    """
    import torch

    shape = x.shape
    a = x.reshape(-1, shape[-1])
    a16 = a.to(torch.float16)
    outliers = a16.abs() >= threshold
    cols = torch.nonzero(outliers.any(dim=0)).view(-1)
    masked = a16.masked_fill(outliers, 0)
    row_stats = masked.abs().amax(dim=1).float()
    ca = torch.round(masked * (127.0 / row_stats.unsqueeze(-1)))
    if a.shape[0] > 1 and cols.numel():
        ca[:, cols] = 0
    acc = _exact_int_matmul(ca, codes)
    # bitsandbytes' int8_mm_dequant: int32 * (row * col) * (1 / 127^2 as a float32 literal)
    out = acc.float() * (row_stats.unsqueeze(1) * row_absmax.float().unsqueeze(0)) * 6.200124e-05
    if bias is not None:
        out = out + bias
    out = out.to(x.dtype)
    if cols.numel():
        sub_b = (codes[:, cols].float() * (row_absmax.float().unsqueeze(1) / 127.0)).to(x.dtype)
        out = out.addmm(a[:, cols], sub_b.t())
    return out.reshape(*shape[:-1], codes.shape[0])


# float32 represents every integer up to 2**24 exactly, and a sum of k int8 x int8 products is at most
# 127**2 * k = 16,516,096 < 2**24 for k = 1024: every partial sum of such a chunk is exact in float32.
_EXACT_CHUNK = 1024


def _exact_int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for integer-valued ``a`` (m, k) and int8 ``b`` (n, k), exactly, as float64: float32
    matmuls over chunks of 1024 columns (exact, and fast) summed in float64."""
    import torch

    af, bf = a.float(), b.float()
    k = af.shape[1]
    out = torch.zeros(af.shape[0], bf.shape[0], dtype=torch.float64)
    for c in range(0, k, _EXACT_CHUNK):
        out += (af[:, c : c + _EXACT_CHUNK] @ bf[:, c : c + _EXACT_CHUNK].t()).double()
    return out


def count_outlier_features(absmax: torch.Tensor, threshold: float) -> int:
    """Input features whose calibration absmax reaches ``threshold`` (LLM.int8()'s outlier columns)."""
    return int((absmax >= threshold).sum())


@dataclass(frozen=True)
class LinearActivation:
    """How one linear's input is quantized at run time, with what the runtime stores for it:
    ``input_scale`` for a static :class:`ActQuant`, the int8 weight ``(codes, row_absmax)`` for
    :class:`LLMInt8` (its matmul runs on the codes, not on a float weight), or a function that reads it.
    :class:`~lowbit.formats.gguf.dot_input.GGMLDotInput`: llama.cpp's conversion of the input to its
    weight type's dot-product type.
    """

    spec: ActQuant | LLMInt8 | GGMLDotInput
    input_scale: torch.Tensor | None = None
    int8_weight: (
        tuple[torch.Tensor, torch.Tensor] | Callable[[], tuple[torch.Tensor, torch.Tensor]] | None
    ) = None

    def __post_init__(self) -> None:
        if isinstance(self.spec, ActQuant) and not self.spec.dynamic and self.input_scale is None:
            raise SchemeError("static activation quantization needs an input_scale for every linear")
        if isinstance(self.spec, LLMInt8) and self.int8_weight is None:
            raise SchemeError("LLM.int8() needs the int8 weight codes and row absmax of the linear")

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The runtime's ``x @ weight.T + bias`` with this input quantization."""
        import torch

        if isinstance(self.spec, LLMInt8):
            assert self.int8_weight is not None
            w8 = self.int8_weight
            codes, absmax = w8() if callable(w8) else w8
            return llm_int8_linear(x, codes, absmax, self.spec.threshold, bias)
        return torch.nn.functional.linear(self.spec.fake_quantize(x, self.input_scale), weight, bias)

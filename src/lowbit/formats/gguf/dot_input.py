"""What llama.cpp's CPU backend does to a matmul's *input* before multiplying it by a ggml weight.

ggml never multiplies a quantized weight by float activations: each weight type has a "vec_dot type", and
the input row is first converted to it (ggml-cpu's ``type_traits_cpu``): Q4_0, Q5_0, Q8_0 and IQ4_NL
multiply 32-element blocks of Q8_0 (``d = absmax/127`` stored in fp16), Q4_1 and Q5_1 blocks of Q8_1 (the
same codes, plus the block's sum), the k-quants, IQ4_XS and the other 256-element types super-blocks of
Q8_K (``d = -max/127`` in float32, ``max`` the signed element of largest magnitude), F16 weights fp16
inputs and BF16 weights bf16 inputs; F32 weights take the input as it is. The integer dot products are
exact, so the result is the float product of the dequantized weight with the *dequantized input*: what
:meth:`GGMLDotInput.fake_quantize` returns.

An evaluation that applies it to every linear of a GGUF file measures what ``llama-perplexity`` measures
on that file (to the summation order), where the weights alone miss that part of the loss: on tiny256's
Q8_0 file the input rounding is most of the KLD. Not reproduced: Q8_1's block sum is stored in fp16 (it
scales a Q4_1/Q5_1 weight block's min), the attention's fp16 KV cache and flash attention's fp16
accumulator, and ties (``x * 127/absmax`` exactly halfway between two codes; llama.cpp's SIMD code and its
reference round them differently).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowbit.errors import SchemeError
from lowbit.formats.gguf.types import GGMLType, ggml_type, type_info

if TYPE_CHECKING:
    import torch

#: weight types whose input ggml converts to Q8_0 / Q8_1 (32-element blocks) on the CPU
_Q8_0_INPUT = frozenset({GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.IQ4_NL})
_Q8_1_INPUT = frozenset({GGMLType.Q4_1, GGMLType.Q5_1})
#: float weight types and the float format their input is converted to
_FLOAT_INPUT = {GGMLType.F32: GGMLType.F32, GGMLType.F16: GGMLType.F16, GGMLType.BF16: GGMLType.BF16}


def vec_dot_type(weight_type: GGMLType | str | int) -> GGMLType:
    """The type llama.cpp's CPU backend converts a matmul's input to for a weight of ``weight_type``."""
    t = ggml_type(weight_type)
    if t in _FLOAT_INPUT:
        return _FLOAT_INPUT[t]
    if t in _Q8_0_INPUT:
        return GGMLType.Q8_0
    if t in _Q8_1_INPUT:
        return GGMLType.Q8_1
    if type_info(t).is_quantized and type_info(t).block_size == 256:
        return GGMLType.Q8_K  # Q2_K..Q6_K, IQ1..IQ4_XS, TQ1_0, TQ2_0
    raise SchemeError(
        f"llama.cpp's CPU backend has no matmul input type known to lowbit for {t.name} weights"
    )


@dataclass(frozen=True)
class GGMLDotInput:
    """A linear's input as llama.cpp's CPU backend converts it for a weight of type ``weight_type``."""

    weight_type: GGMLType

    @classmethod
    def for_weight(cls, weight_type: GGMLType | str | int) -> GGMLDotInput:
        t = ggml_type(weight_type)
        vec_dot_type(t)  # raises for types with no known input conversion
        return cls(t)

    @property
    def input_type(self) -> GGMLType:
        return vec_dot_type(self.weight_type)

    @property
    def label(self) -> str:
        return f"llama.cpp {self.input_type.name} inputs ({self.weight_type.name} weights)"

    @property
    def changes_input(self) -> bool:
        """False for F32 weights, whose input ggml multiplies as it is."""
        return self.input_type != GGMLType.F32

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (..., in) converted to the input type and back, as float32 then ``x``'s dtype. ``scale``
        is unused (the conversion is always dynamic); it keeps the signature of the other activation
        quantizers."""
        import torch

        it = self.input_type
        xf = x.float()
        if it == GGMLType.F32:
            return x
        if it == GGMLType.F16:
            return xf.to(torch.float16).to(x.dtype)
        if it == GGMLType.BF16:
            return xf.to(torch.bfloat16).to(x.dtype)
        n = xf.shape[-1]
        bs = 256 if it == GGMLType.Q8_K else 32
        if n % bs:
            raise SchemeError(
                f"a {it.name} input row holds whole blocks of {bs}; {n} is not a multiple of {bs}"
            )
        blocks = xf.reshape(*xf.shape[:-1], n // bs, bs)
        if it == GGMLType.Q8_K:
            return _q8_k(blocks).reshape(x.shape).to(x.dtype)
        return _q8_0(blocks).reshape(x.shape).to(x.dtype)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 / Q8_1 blocks (..., 32) dequantized: codes ``round(x * 127/absmax)``, scale ``absmax/127``
    rounded to fp16 (the dot product uses the stored fp16 scale)."""
    import torch

    amax = blocks.abs().amax(dim=-1, keepdim=True)
    nonzero = amax > 0
    # torch's ``scalar / tensor`` multiplies by the reciprocal: a true division, as in C
    inv = torch.where(nonzero, torch.div(torch.full_like(amax, 127.0), torch.where(nonzero, amax, 1.0)), 0.0)
    q = torch.round(blocks * inv)
    d = torch.div(amax, 127.0).to(torch.float16).float()
    return q * d


def _q8_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_K super-blocks (..., 256) dequantized: ``iscale = -127/max`` with ``max`` the first element of
    largest magnitude (signed), codes ``round(iscale * x)`` capped at 127, scale ``1/iscale`` in float32."""
    import torch

    idx = blocks.abs().argmax(dim=-1, keepdim=True)
    mx = torch.gather(blocks, -1, idx)
    nonzero = mx != 0
    # true divisions, as in C (torch's ``scalar / tensor`` multiplies by the reciprocal)
    iscale = torch.where(nonzero, torch.div(torch.full_like(mx, -127.0), torch.where(nonzero, mx, 1.0)), 0.0)
    q = torch.round(iscale * blocks).clamp(max=127.0)
    d = torch.where(nonzero, torch.div(torch.ones_like(iscale), torch.where(nonzero, iscale, 1.0)), 0.0)
    return q * d

"""Scheme names -> codecs: the vocabulary of ``lowbit quantize --scheme``.

Integer weight schemes (written as compressed-tensors ``pack-quantized``):

* ``wN``        N-bit integers (2..8), one scale per output channel.
* ``wNgG``      N-bit integers, one scale per group of G input columns (a ragged last group is allowed).
* suffix ``-sym`` (the default: what llm-compressor's W4A16 and most GPTQ checkpoints use) or ``-asym``
  (an integer zero point per group, better at 2-3 bits).

Float schemes: ``nf4`` / ``fp4`` (bitsandbytes 4-bit, blocks of 64, fp32 absmax; ``-dq`` adds double
quantization of the absmax values, written as bitsandbytes checkpoints), ``fp8-w`` (e4m3 weights,
per-channel scale, 16-bit activations), ``fp8-e5m2``.

Weights + activations (the linear's input is quantized at run time too, see
:mod:`lowbit.formats.activations`): ``w8a8`` (int8 weights per channel, int8 activations per token,
dynamic), ``w8a8-static`` (... one calibrated int8 scale per linear input; needs ``--calib``), ``fp8``
(FP8 e4m3 weights per channel, FP8 activations per token, dynamic — llm-compressor's FP8_DYNAMIC), all
written as compressed-tensors; ``int8`` (bitsandbytes LLM.int8(): int8 weight rows, int8 per-token
activations with outlier features >= 6.0 kept in 16-bit), written as a bitsandbytes 8-bit checkpoint.

GGUF mixes (``Q4_K_M``, ``Q8_0``, ``IQ4_XS`` ... and ``F16``/``BF16``/``F32``; case-insensitive,
llama-quantize's aliases accepted) are llama-quantize's per-tensor type mixes, written only as GGUF files
(``--format gguf``, the default for these names) by :mod:`lowbit.export.gguf`; they have no single codec.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lowbit.errors import SchemeError
from lowbit.formats.activations import ActKind, ActQuant, ActStrategy, LLMInt8

if TYPE_CHECKING:  # the codecs (torch) load when a scheme's codec is built, not to parse its name
    import torch

    from lowbit.formats.base import Block, Codec


@dataclass(frozen=True)
class Scheme:
    """A named way to quantize the linear weights of a model."""

    name: str
    description: str
    # Builds the codec; its argument is the dtype scales must be stored in for the output format.
    make_codec: Callable[[torch.dtype], Codec] = field(compare=False)
    formats: tuple[str, ...] = ("compressed-tensors",)
    # How each quantized linear's input is quantized at run time; None: activations stay in float.
    activations: ActQuant | LLMInt8 | None = None

    @property
    def static_activations(self) -> bool:
        """Whether the scheme stores calibrated activation scales (so it needs calibration text)."""
        return isinstance(self.activations, ActQuant) and not self.activations.dynamic

    def codec(self, scale_dtype: torch.dtype | None = None) -> Codec:
        """The codec; scales in ``scale_dtype`` (float16 if None)."""
        if scale_dtype is None:
            import torch

            scale_dtype = torch.float16
        return self.make_codec(scale_dtype)

    @property
    def default_format(self) -> str:
        return self.formats[0]


_AFFINE = re.compile(r"^w([2-8])(?:g(\d+))?(?:-(sym|asym))?$")

# Schemes with fixed names (not parsed from a pattern), built lazily so the codec modules load on use.
_NAMED: dict[str, tuple[str, Callable[[torch.dtype], Codec], tuple[str, ...], ActQuant | LLMInt8 | None]] = {}


def _register(
    name: str, description: str, formats: tuple[str, ...], activations: ActQuant | LLMInt8 | None = None
) -> Callable[[Callable[[torch.dtype], Codec]], Callable[[torch.dtype], Codec]]:
    def deco(fn: Callable[[torch.dtype], Codec]) -> Callable[[torch.dtype], Codec]:
        _NAMED[name] = (description, fn, formats, activations)
        return fn

    return deco


@_register("nf4", "4-bit NormalFloat (bitsandbytes), blocks of 64, fp32 absmax", ("bnb",))
def _nf4(_: torch.dtype) -> Codec:
    from lowbit.formats.nf4 import nf4

    return nf4(blocksize=64)


@_register("nf4-dq", "NF4 with double quantization of the absmax values (QLoRA)", ("bnb",))
def _nf4_dq(_: torch.dtype) -> Codec:
    from lowbit.formats.nf4 import nf4

    return nf4(blocksize=64, double_quant=True)


@_register("fp4-dq", "FP4 with double quantization of the absmax values", ("bnb",))
def _fp4_dq(_: torch.dtype) -> Codec:
    from lowbit.formats.nf4 import fp4

    return fp4(blocksize=64, double_quant=True)


@_register("fp4", "4-bit float e2m1 (bitsandbytes), blocks of 64, fp32 absmax", ("bnb",))
def _fp4(_: torch.dtype) -> Codec:
    from lowbit.formats.nf4 import fp4

    return fp4(blocksize=64)


@_register(
    "fp8-w",
    "FP8 e4m3 weights, one fp32 scale per output channel; 16-bit activations",
    ("compressed-tensors",),
)
@_register(
    "fp8",
    "W8A8 FP8: e4m3 weights per output channel, e4m3 activations per token (dynamic)",
    ("compressed-tensors",),
    ActQuant(ActKind.FLOAT, 8, ActStrategy.TOKEN, dynamic=True),
)
def _fp8(_: torch.dtype) -> Codec:
    from lowbit.formats.base import PER_CHANNEL
    from lowbit.formats.fp8 import Fp8Codec, Fp8Format

    return Fp8Codec(fmt=Fp8Format.E4M3, block=PER_CHANNEL)


@_register(
    "w8a8",
    "W8A8 int8: weights per output channel (symmetric), activations per token (dynamic)",
    ("compressed-tensors",),
    ActQuant(ActKind.INT, 8, ActStrategy.TOKEN, dynamic=True),
)
@_register(
    "w8a8-static",
    "W8A8 int8: weights per output channel, one calibrated activation scale per linear (needs --calib)",
    ("compressed-tensors",),
    ActQuant(ActKind.INT, 8, ActStrategy.TENSOR, dynamic=False),
)
def _w8a8(scale_dtype: torch.dtype) -> Codec:
    from lowbit.formats.base import PER_CHANNEL

    return _affine(8, True, PER_CHANNEL, scale_dtype)


@_register(
    "int8",
    "LLM.int8() (bitsandbytes 8-bit): int8 weight rows, int8 per-token activations, outliers >= 6.0 in 16-bit",
    ("bnb",),
    LLMInt8(6.0),
)
def _int8(_: torch.dtype) -> Codec:
    from lowbit.formats.int8 import Int8RowCodec

    return Int8RowCodec()


@_register("fp8-e5m2", "FP8 e5m2 weights, one fp32 scale per output channel", ("compressed-tensors",))
def _fp8_e5m2(_: torch.dtype) -> Codec:
    from lowbit.formats.base import PER_CHANNEL
    from lowbit.formats.fp8 import Fp8Codec, Fp8Format

    return Fp8Codec(fmt=Fp8Format.E5M2, block=PER_CHANNEL)


GGUF_MIXES: tuple[str, ...] = (
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1",
    "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0",
)  # fmt: skip

EXAMPLE_AFFINE: tuple[str, ...] = (
    "w8",
    "w4",
    "w4g128",
    "w4g64",
    "w4g32",
    "w3g128",
    "w3g64",
    "w2g64",
    "w4g128-asym",
)


def _affine(bits: int, symmetric: bool, block: Block, scale_dtype: torch.dtype) -> Codec:
    from lowbit.formats.affine import AffineCodec

    return AffineCodec(bits=bits, symmetric=symmetric, block=block, scale_dtype=scale_dtype)


GGUF_FORMAT = "gguf"


def gguf_mix_name(name: str) -> str | None:
    """The llama-quantize mix ``name`` stands for (``q4_k_m`` -> ``Q4_K_M``, ``Q4_K`` -> ``Q4_K_M``), or None."""
    from lowbit.formats.gguf.mixes import MIX_ALIASES, MIXES

    key = name.strip().upper()
    key = MIX_ALIASES.get(key, key)
    return key if key in MIXES else None


def _gguf_mix_scheme(mix: str) -> Scheme:
    def no_codec(_: torch.dtype) -> Codec:
        raise SchemeError(
            f"{mix} is a GGUF mix (a type per tensor, chosen as llama-quantize does), not one codec; "
            f"write it with `lowbit quantize MODEL --scheme {mix} -o OUT.gguf`"
        )

    return Scheme(mix, f"llama-quantize mix {mix}, written as a GGUF file", no_codec, (GGUF_FORMAT,))


def parse_scheme(name: str, fmt: str | None = None) -> Scheme:
    """The :class:`Scheme` for ``name``; :class:`SchemeError` naming the valid forms otherwise.

    GGUF mix names are schemes only with ``fmt="gguf"``; without a format they are refused, since callers
    that give none (simulation) need a single codec, which a mix is not.
    """
    key = name.strip()
    mix = gguf_mix_name(key)
    if fmt == GGUF_FORMAT:
        if mix is None:
            raise SchemeError(
                f"{name!r} is not a GGUF mix; --format gguf takes one of llama-quantize's mixes "
                f"({', '.join(GGUF_MIXES)}, F16, BF16, F32 ...)"
            )
        return _gguf_mix_scheme(mix)
    m = _AFFINE.match(key.lower())
    if m:
        from lowbit.formats.base import PER_CHANNEL, group

        bits = int(m.group(1))
        g = int(m.group(2)) if m.group(2) else None
        sym = m.group(3) != "asym"
        if g is not None and g < 1:
            raise SchemeError(f"group size in {name!r} must be positive")
        block = PER_CHANNEL if g is None else group(g)
        gran = "one scale per output channel" if g is None else f"groups of {g} columns"
        desc = f"{bits}-bit integers, {gran}, {'symmetric' if sym else 'asymmetric (zero point)'}"
        canonical = f"w{bits}" + (f"g{g}" if g else "") + ("" if sym else "-asym")
        return Scheme(
            canonical,
            desc,
            functools.partial(_affine, bits, sym, block),
            ("compressed-tensors", "gptq", "awq"),
        )
    if key.lower() in _NAMED:
        desc, fn, formats, acts = _NAMED[key.lower()]
        return Scheme(key.lower(), desc, fn, formats, acts)
    if mix is not None and (mix not in ("F16", "BF16", "F32") or fmt is not None):
        raise SchemeError(
            f"{mix} is a GGUF mix: it is written only as a GGUF file (--format gguf, the default for it), "
            "and has no single codec to simulate"
        )
    raise SchemeError(
        f"unknown scheme {name!r}; use wN, wNgG (2<=N<=8), with -sym/-asym, or one of: {', '.join(_NAMED)}"
    )


def scheme_help() -> str:
    """Every scheme form, one per line, for ``--help``."""
    lines = [
        "wN           N-bit integers (N=2..8), one scale per output channel, symmetric",
        "wNgG         N-bit integers, one scale per group of G input columns (e.g. w4g128, w3g64)",
        "wN[gG]-asym  ... with an integer zero point per group (default is -sym)",
    ]
    lines += [f"{n:<12} {d}" for n, (d, _, _, _) in _NAMED.items()]
    lines.append(
        "GGUF mixes   " + " ".join(GGUF_MIXES) + " IQ* F16 BF16 F32 (llama-quantize's per-tensor mixes, "
        "written as a .gguf file: --format gguf, the default for them; --imatrix FILE for importance-weighted)"
    )
    return "\n".join(lines)

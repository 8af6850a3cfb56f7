"""Does it fit? Weights + KV cache + runtime overhead of a model under each quantization scheme.

Model: a preset name (``llama-3.1-8b``, case-insensitive), a ``config.json``, a Hugging Face model
directory (only its ``config.json`` is read) or a GGUF file (metadata + its real tensor list).

Per scheme (see :func:`get_scheme`):

* weights: summed tensor by tensor over every tensor of the architecture (embeddings, per-layer
  q/k/v/o, gate/up/down or the per-expert stacks and the router, norms, biases, the output head unless
  tied), each with its exact storage:

  - ``f32``/``f16``/``bf16``: every tensor at that width.
  - ``wN`` / ``wNgG`` / ``...-asym`` (lowbit integer schemes): N-bit codes plus one fp16 scale per
    group of G input columns (per output channel without ``gG``), plus an N-bit zero point per group
    for ``-asym``. Embeddings, the output head, routers, norms and biases stay 16-bit.
  - ``nf4``: 4-bit codes plus an fp32 absmax per block of 64 (bitsandbytes, 4.5 bits/weight);
    ``nf4-dq``: double quantization, 8-bit absmax per 64 + an fp32 scale per 256 absmaxes
    (≈ 4.127 bits/weight). Same 16-bit exceptions as above.
  - ``fp8``: 8-bit E4M3 codes plus a 16-bit scale per output channel; same 16-bit exceptions.
  - GGUF mixes (``Q2_K`` … ``Q8_0``, ``IQ4_XS``, ...): each tensor's type as llama-quantize chooses it
    (:mod:`lowbit.formats.gguf.mixes`), with the exact ggml block sizes; norms stay F32.
* KV cache: ``2 (K and V) × layers × context × batch × row_bytes(kv_type, kv_heads × head_dim)``, i.e.
  ``2 × L × kv_heads × head_dim × context × batch × bytes/element`` with f16 = 2, q8_0 = 34/32,
  q4_0 = 18/32 (llama.cpp's ``--cache-type-k/v``). Sliding-window layers (Gemma-2) are counted at full
  context: an upper bound.
* overhead (a rough llama.cpp-like estimate, see :class:`OverheadModel`): a fixed 64 MiB for the runtime,
  the logits output buffer ``vocab × batch × 4`` bytes, and the compute buffer that llama.cpp reserves
  for one micro-batch of 512 tokens, ``4 × 512 × (vocab + 4 × hidden)`` bytes (dominated by the
  worst-case logits of a full micro-batch; flash attention assumed, so no context-sized score matrix).
* fits: ``weights + KV + overhead <= memory``; max context: the longest context (tokens) whose total
  fits, capped at the model's ``max_position_embeddings``, 0 when not even one token fits.

Memory sizes: ``GB``/``MB``/``KB``/``TB`` are powers of 10 (``8GB`` = 8·10⁹ bytes); ``GiB``/``MiB``/...
and the bare letters ``G``/``M``/``K``/``T`` are powers of 2 (``24G`` = ``24GiB`` = 24·2³⁰ bytes, as
GPU memory is quoted); a bare number is bytes.
"""

from __future__ import annotations

import enum
import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from lowbit.errors import ArgumentError, InputFileError, SchemeError
from lowbit.formats.gguf.mixes import MIX_ALIASES, MIXES, TensorSpec, get_mix, tensor_types
from lowbit.formats.gguf.types import GGMLType, row_bytes, tensor_nbytes
from lowbit.models.presets import (
    GGUF_ARCH_TO_MODEL_TYPE,
    ModelConfig,
    find_preset,
    load_hf_config,
    preset_names,
)

if TYPE_CHECKING:  # torch-based codecs load only when one is built
    from lowbit.formats.affine import AffineCodec

log = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


# ------------------------------------------------------------------------------------ memory strings
_UNIT_EXPONENT: Mapping[str, int] = MappingProxyType({"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5})
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGTP]?)(I?)(B?)\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """Bytes in ``text``: ``8GiB``, ``8GB``, ``512MiB``, ``24G``, ``1.5T``, ``1073741824``.

    ``xB`` is decimal (10³ⁿ); ``xiB`` and a bare ``x`` are binary (2¹⁰ⁿ); no unit means bytes.
    """
    m = _MEMORY_RE.match(text)
    if m is None:
        raise ArgumentError(f"cannot read memory size {text!r}; write e.g. 8GiB, 8GB, 512MiB or 24G")
    number, letter, binary, b = m.groups()
    exponent = _UNIT_EXPONENT[letter.upper()]
    if binary and not letter:
        raise ArgumentError(f"cannot read memory size {text!r}; write e.g. 8GiB, 8GB, 512MiB or 24G")
    decimal = bool(b) and not binary and bool(letter)
    factor = 1000**exponent if decimal else 1024**exponent
    value = math.floor(float(number) * factor)
    if value <= 0:
        raise ArgumentError(f"memory size must be positive, not {text!r}")
    return value


def format_count(n: int) -> str:
    """``8030261248`` -> ``8.03 B``; ``4982528`` -> ``4.98 M``."""
    for value, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= value:
            return f"{n / value:.2f} {suffix}"
    return str(n)


def format_bytes(n: int) -> str:
    """``n`` bytes in GiB (or MiB below 1 GiB), e.g. ``4.58 GiB``."""
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


# ------------------------------------------------------------------------------------- tensor roles
class Role(enum.Enum):
    """What a tensor is, as far as non-GGUF schemes care."""

    EMBEDDING = "embedding"
    OUTPUT = "output"
    LINEAR = "linear"  # quantized by integer/nf4/fp8 schemes
    ROUTER = "router"
    VECTOR = "vector"  # norms, biases, rope factors: every 1-D tensor


_ROLE_BY_NAME: tuple[tuple[Callable[[str], bool], Role], ...] = (
    (lambda n: n in ("token_embd.weight", "per_layer_token_embd.weight"), Role.EMBEDDING),
    (lambda n: n == "output.weight", Role.OUTPUT),
    (lambda n: "ffn_gate_inp" in n, Role.ROUTER),
)


def role_of(t: TensorSpec) -> Role:
    if len(t.shape) < 2:
        return Role.VECTOR
    for matches, role in _ROLE_BY_NAME:
        if matches(t.name):
            return role
    return Role.LINEAR


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _matrices(shape: Sequence[int]) -> tuple[int, int, int]:
    """``(n_matrices, rows, cols)``: a 3-D ``(experts, out, in)`` stack is that many ``(out, in)``."""
    if len(shape) == 1:
        return 1, 1, int(shape[0])
    return _numel(shape[:-2]), int(shape[-2]), int(shape[-1])


# ------------------------------------------------------------------------------------------ schemes
class WeightScheme(ABC):
    """How a checkpoint stores its weights; knows the exact bytes of each tensor."""

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def description(self) -> str: ...

    def weight_bytes(self, tensors: Sequence[TensorSpec], config: ModelConfig) -> int:
        return sum(self.tensor_bytes(t) for t in tensors)

    def tensor_bytes(self, t: TensorSpec) -> int:
        raise NotImplementedError


@dataclass(frozen=True)
class FloatScheme(WeightScheme):
    """Every tensor as an IEEE float of ``bits`` bits."""

    label: str
    bits: int

    @property
    def name(self) -> str:
        return self.label

    @property
    def description(self) -> str:
        return f"every tensor {self.label}"

    def tensor_bytes(self, t: TensorSpec) -> int:
        return _numel(t.shape) * self.bits // 8


_KEPT_16BIT = 16  # bits of the tensors that integer/nf4/fp8 checkpoints leave unquantized


@dataclass(frozen=True)
class _LinearOnlyScheme(WeightScheme):
    """Quantizes the linear layers; embeddings, output head, routers and 1-D tensors stay 16-bit."""

    def tensor_bytes(self, t: TensorSpec) -> int:
        if role_of(t) is not Role.LINEAR:
            return _numel(t.shape) * _KEPT_16BIT // 8
        return self.linear_bytes(t.shape)

    @abstractmethod
    def linear_bytes(self, shape: Sequence[int]) -> int: ...


@dataclass(frozen=True)
class IntScheme(_LinearOnlyScheme):
    """lowbit's affine integer schemes: ``bits``-bit codes, fp16 scale per group (``group_size`` input
    columns; ``None`` = per output channel), N-bit zero point per group when asymmetric."""

    bits: int
    group_size: int | None = None
    asymmetric: bool = False

    def __post_init__(self) -> None:
        # the codec validates bits and group size (one source of truth for the storage cost)
        self.codec()

    def codec(self) -> AffineCodec:
        from lowbit.formats.affine import AffineCodec
        from lowbit.formats.base import PER_CHANNEL, group

        block = PER_CHANNEL if self.group_size is None else group(self.group_size)
        return AffineCodec(bits=self.bits, symmetric=not self.asymmetric, block=block)

    @property
    def name(self) -> str:
        g = f"g{self.group_size}" if self.group_size else ""
        return f"w{self.bits}{g}{'-asym' if self.asymmetric else ''}"

    @property
    def description(self) -> str:
        where = f"per group of {self.group_size}" if self.group_size else "per output channel"
        zero = f" + {self.bits}-bit zero" if self.asymmetric else ""
        return f"int{self.bits} codes, fp16 scale{zero} {where}; embeddings/head 16-bit"

    def linear_bytes(self, shape: Sequence[int]) -> int:
        n, rows, cols = _matrices(shape)
        return n * math.ceil(self.codec().storage_bits((rows, cols)) / 8)


@dataclass(frozen=True)
class NF4Scheme(_LinearOnlyScheme):
    """bitsandbytes NF4: blocks of 64 over the flattened tensor, fp32 absmax per block; with double
    quantization the absmaxes are 8-bit in blocks of 256 with an fp32 scale each (+ one fp32 offset)."""

    double_quant: bool = False
    block: int = 64
    dq_block: int = 256

    @property
    def name(self) -> str:
        return "nf4-dq" if self.double_quant else "nf4"

    @property
    def description(self) -> str:
        scales = "8-bit absmax/64 + fp32 per 256 absmax" if self.double_quant else "fp32 absmax per 64"
        return f"4-bit NormalFloat, {scales}; embeddings/head 16-bit"

    def linear_bytes(self, shape: Sequence[int]) -> int:
        n = _numel(shape)
        blocks = math.ceil(n / self.block)
        codes = math.ceil(n / 2)
        if not self.double_quant:
            return codes + 4 * blocks
        return codes + blocks + 4 * math.ceil(blocks / self.dq_block) + 4


@dataclass(frozen=True)
class FP8Scheme(_LinearOnlyScheme):
    """FP8 E4M3 weights with a 16-bit scale per output channel."""

    @property
    def name(self) -> str:
        return "fp8"

    @property
    def description(self) -> str:
        return "fp8 e4m3 codes, 16-bit scale per output channel; embeddings/head 16-bit"

    def linear_bytes(self, shape: Sequence[int]) -> int:
        n, rows, cols = _matrices(shape)
        return n * rows * (cols + 2)


@dataclass(frozen=True)
class GGUFMixScheme(WeightScheme):
    """A llama-quantize mix: per-tensor ggml types chosen as llama-quantize does."""

    mix: str

    @property
    def name(self) -> str:
        return self.mix

    @property
    def description(self) -> str:
        return f"llama.cpp {self.mix} mix (default type {get_mix(self.mix).default_type.name})"

    def types(self, tensors: Sequence[TensorSpec], config: ModelConfig) -> dict[str, GGMLType]:
        return tensor_types(self.mix, tensors, config.model_info())

    def weight_bytes(self, tensors: Sequence[TensorSpec], config: ModelConfig) -> int:
        types = self.types(tensors, config)
        return sum(tensor_nbytes(types[t.name], t.shape) for t in tensors)


@dataclass(frozen=True)
class AsIsScheme(WeightScheme):
    """The tensors as they are stored in the input GGUF file."""

    @property
    def name(self) -> str:
        return "as-is"

    @property
    def description(self) -> str:
        return "the GGUF file's own tensor types"

    def tensor_bytes(self, t: TensorSpec) -> int:
        return tensor_nbytes(t.type, t.shape)


_FIXED_SCHEMES: Mapping[str, Callable[[], WeightScheme]] = MappingProxyType(
    {
        "f32": lambda: FloatScheme("f32", 32),
        "f16": lambda: FloatScheme("f16", 16),
        "bf16": lambda: FloatScheme("bf16", 16),
        "fp8": FP8Scheme,
        "nf4": lambda: NF4Scheme(double_quant=False),
        "nf4-dq": lambda: NF4Scheme(double_quant=True),
    }
)
_INT_RE = re.compile(r"^w(\d+)(?:g(\d+))?(-asym)?$", re.IGNORECASE)


def _int_scheme(m: re.Match[str]) -> WeightScheme:
    return IntScheme(
        bits=int(m.group(1)), group_size=int(m.group(2)) if m.group(2) else None, asymmetric=bool(m.group(3))
    )


def _mix_scheme(m: re.Match[str]) -> WeightScheme:
    return GGUFMixScheme(get_mix(m.group(0)).name)


_MIX_RE = re.compile(
    "^(" + "|".join(sorted({*MIXES, *MIX_ALIASES}, key=len, reverse=True)) + ")$", re.IGNORECASE
)
_PATTERN_SCHEMES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], WeightScheme]], ...] = (
    (_INT_RE, _int_scheme),
    (_MIX_RE, _mix_scheme),
)

DEFAULT_SCHEMES: tuple[str, ...] = (
    "bf16", "fp8", "w8", "w4g128", "nf4", "w3g128", "w2g64",
    "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_XS", "Q3_K_M", "Q2_K",
)  # fmt: skip


def get_scheme(name: str) -> WeightScheme:
    """The scheme called ``name``: ``f32``, ``f16``, ``bf16``, ``fp8``, ``nf4``, ``nf4-dq``,
    ``w<bits>[g<group>][-asym]`` (``w8``, ``w4g128``, ``w4g64-asym``) or a GGUF mix (``Q4_K_M``;
    ``f16``/``bf16``/``f32`` mean the plain float schemes, not the GGUF F16/BF16/F32 mixes)."""
    key = name.strip()
    fixed = _FIXED_SCHEMES.get(key.lower())
    if fixed is not None:
        return fixed()
    for pattern, make in _PATTERN_SCHEMES:
        m = pattern.match(key)
        if m is not None:
            return make(m)
    raise SchemeError(
        f"unknown scheme {name!r}; use {', '.join(_FIXED_SCHEMES)}, w<bits>[g<group>][-asym] "
        f"(e.g. w4g128) or a GGUF mix ({', '.join(MIXES)})"
    )


# --------------------------------------------------------------------------------------- KV and RAM
KV_TYPES: Mapping[str, GGMLType] = MappingProxyType(
    {
        "f32": GGMLType.F32,
        "f16": GGMLType.F16,
        "bf16": GGMLType.BF16,
        "q8_0": GGMLType.Q8_0,
        "q5_1": GGMLType.Q5_1,
        "q5_0": GGMLType.Q5_0,
        "q4_1": GGMLType.Q4_1,
        "q4_0": GGMLType.Q4_0,
        "iq4_nl": GGMLType.IQ4_NL,
    }
)
"""KV cache element types llama.cpp accepts for ``--cache-type-k/-v``."""


def kv_type(name: str) -> GGMLType:
    t = KV_TYPES.get(name.strip().lower())
    if t is None:
        raise ArgumentError(f"unknown KV cache type {name!r}; use one of {', '.join(KV_TYPES)}")
    return t


def kv_bytes_per_token(config: ModelConfig, kv: GGMLType) -> int:
    """Bytes of K and V for one token of one sequence, over all layers."""
    return 2 * config.n_layer * row_bytes(kv, config.kv_dim)


def kv_cache_bytes(config: ModelConfig, context: int, batch: int = 1, kv: GGMLType = GGMLType.F16) -> int:
    """``2 × layers × context × batch × row_bytes(kv, kv_heads × head_dim)``."""
    return kv_bytes_per_token(config, kv) * context * batch


@dataclass(frozen=True)
class OverheadModel:
    """Rough runtime memory beyond weights and KV cache (llama.cpp-like; see the module docstring).

    ``base_bytes`` + logits buffer ``4 × vocab × batch`` + compute buffer
    ``4 × ubatch × (vocab + hidden_factor × hidden)``.
    """

    base_bytes: int = 64 * MiB
    ubatch: int = 512
    hidden_factor: int = 4

    def bytes(self, config: ModelConfig, batch: int) -> int:
        logits = 4 * config.vocab_size * batch
        compute = 4 * self.ubatch * (config.vocab_size + self.hidden_factor * config.hidden_size)
        return self.base_bytes + logits + compute


# ------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class FitModel:
    """A model to size: its config and the tensors it has (GGUF names, numpy-order shapes)."""

    config: ModelConfig
    tensors: tuple[TensorSpec, ...]
    from_gguf: bool = False

    @property
    def n_params(self) -> int:
        return sum(_numel(t.shape) for t in self.tensors)


def _gguf_value(fields: Mapping[str, Any], key: str) -> Any:
    v = fields.get(key)
    if isinstance(v, list) and v and all(isinstance(x, int) for x in v):
        return max(v)  # per-layer arrays (e.g. head_count_kv of hybrid models): size for the largest
    return v


def _config_from_gguf(path: Path) -> FitModel:
    import gguf  # deferred: only GGUF inputs need the reader

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise InputFileError(f"cannot read GGUF file {path}: {e}") from None
    fields: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key == "tokenizer.ggml.tokens":
            fields[key] = len(f.data)
        elif not key.startswith("tokenizer."):
            fields[key] = f.contents()
    arch = str(fields.get("general.architecture", ""))
    if not arch:
        raise InputFileError(f"{path}: GGUF metadata has no general.architecture")
    tensors = tuple(
        TensorSpec(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), GGMLType(int(t.tensor_type)))
        for t in reader.tensors
    )
    names = {t.name for t in tensors}

    def need(key: str) -> int:
        v = _gguf_value(fields, f"{arch}.{key}")
        if v is None:
            raise InputFileError(f"{path}: GGUF metadata has no {arch}.{key}")
        return int(v)

    def opt(key: str, default: int) -> int:
        v = _gguf_value(fields, f"{arch}.{key}")
        return default if v is None else int(v)

    hidden = need("embedding_length")
    n_head = need("attention.head_count")
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    vocab = int(fields.get("tokenizer.ggml.tokens") or opt("vocab_size", embd.shape[0] if embd else 0))
    n_expert = opt("expert_count", 0)
    ffn = opt("feed_forward_length", 4 * hidden)
    config = ModelConfig(
        name=path.name,
        model_type=GGUF_ARCH_TO_MODEL_TYPE.get(arch, "llama"),
        hidden_size=hidden,
        n_layer=need("block_count"),
        n_head=n_head,
        n_head_kv=opt("attention.head_count_kv", n_head),
        head_dim=opt("attention.key_length", hidden // n_head),
        intermediate_size=ffn,
        vocab_size=vocab,
        tied_embeddings="output.weight" not in names,
        max_context=opt("context_length", 2048),
        n_expert=n_expert,
        n_expert_used=opt("expert_used_count", 0),
        expert_intermediate_size=opt("expert_feed_forward_length", ffn) if n_expert else 0,
        source=str(path),
        gguf_arch_name=arch,  # the mix rules look at the file's own arch name (e.g. falcon)
    )
    return FitModel(config, tensors, from_gguf=True)


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load_model(spec: str) -> FitModel:
    """A preset name, a ``config.json``, a HF model directory or a GGUF file -> :class:`FitModel`."""
    path = Path(spec).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file():
            config = load_hf_config(cfg)
            return FitModel(config, tuple(config.tensors()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _config_from_gguf(ggufs[0])
        raise InputFileError(
            f"{path} has no config.json{' and several .gguf files' if ggufs else ''}; "
            "pass a config.json, a .gguf file or a preset name"
        )
    if path.is_file():
        if _is_gguf(path):
            return _config_from_gguf(path)
        config = load_hf_config(path)
        return FitModel(config, tuple(config.tensors()))
    preset = find_preset(spec)
    if preset is not None:
        return FitModel(preset.config, tuple(preset.config.tensors()))
    if spec.lower().endswith((".json", ".gguf")) or spec.startswith((".", "/", "~")):
        raise InputFileError(f"no such file or directory: {spec}")
    raise ArgumentError(
        f"unknown model {spec!r}: not a file and not a preset; known presets: {', '.join(preset_names())}"
    )


# ---------------------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class FitRow:
    scheme: str
    description: str
    weight_bytes: int
    bits_per_weight: float
    kv_bytes: int
    overhead_bytes: int
    total_bytes: int
    fits: bool
    max_context: int

    def to_json(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "description": self.description,
            "weight_bytes": self.weight_bytes,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "kv_bytes": self.kv_bytes,
            "overhead_bytes": self.overhead_bytes,
            "total_bytes": self.total_bytes,
            "fits": self.fits,
            "max_context": self.max_context,
        }


@dataclass(frozen=True)
class FitReport:
    model: str
    n_params: int
    memory_bytes: int
    context: int
    batch: int
    kv_type: str
    model_max_context: int
    rows: tuple[FitRow, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "n_params": self.n_params,
            "memory_bytes": self.memory_bytes,
            "context": self.context,
            "batch": self.batch,
            "kv_type": self.kv_type,
            "model_max_context": self.model_max_context,
            "rows": [r.to_json() for r in self.rows],
        }


def max_context(memory: int, weights: int, overhead: int, per_token: int, cap: int) -> int:
    """Longest context (tokens) with ``weights + overhead + per_token × context <= memory``, capped."""
    free = memory - weights - overhead
    if free < per_token or per_token <= 0:
        return 0
    return min(cap, free // per_token)


def fit(
    model: FitModel,
    memory: int,
    context: int,
    *,
    batch: int = 1,
    kv: str = "f16",
    schemes: Sequence[str] = DEFAULT_SCHEMES,
    overhead: OverheadModel = OverheadModel(),
) -> FitReport:
    """Size ``model`` under each scheme for ``context`` tokens × ``batch`` sequences in ``memory`` bytes."""
    if memory <= 0:
        raise ArgumentError(f"memory must be positive, not {memory}")
    if context <= 0:
        raise ArgumentError(f"context must be a positive number of tokens, not {context}")
    if batch <= 0:
        raise ArgumentError(f"batch must be a positive number of sequences, not {batch}")
    kvt = kv_type(kv)
    config = model.config
    if context > config.max_context:
        log.warning("context %d is longer than %s's maximum %d", context, config.name, config.max_context)
    resolved = [get_scheme(s) for s in schemes]
    if model.from_gguf:
        resolved.insert(0, AsIsScheme())
    per_token = kv_bytes_per_token(config, kvt) * batch
    kv_total = per_token * context
    ovh = overhead.bytes(config, batch)
    n_params = model.n_params
    rows = []
    for scheme in resolved:
        w = scheme.weight_bytes(model.tensors, config)
        total = w + kv_total + ovh
        rows.append(
            FitRow(
                scheme=scheme.name,
                description=scheme.description,
                weight_bytes=w,
                bits_per_weight=8 * w / n_params if n_params else 0.0,
                kv_bytes=kv_total,
                overhead_bytes=ovh,
                total_bytes=total,
                fits=total <= memory,
                max_context=max_context(memory, w, ovh, per_token, config.max_context),
            )
        )
    return FitReport(
        model=config.name,
        n_params=n_params,
        memory_bytes=memory,
        context=context,
        batch=batch,
        kv_type=kv.strip().lower(),
        model_max_context=config.max_context,
        rows=tuple(rows),
    )


def format_table(report: FitReport) -> str:
    """A plain aligned text table of ``report``."""
    head = (
        f"{report.model}: {format_count(report.n_params)} parameters; memory {format_bytes(report.memory_bytes)}, "
        f"context {report.context} × batch {report.batch}, KV cache {report.kv_type} "
        f"(model max context {report.model_max_context})"
    )
    cols = ("scheme", "bits/w", "weights", "KV cache", "overhead", "total", "fits", "max context")
    body = [
        (
            r.scheme,
            f"{r.bits_per_weight:.2f}",
            format_bytes(r.weight_bytes),
            format_bytes(r.kv_bytes),
            format_bytes(r.overhead_bytes),
            format_bytes(r.total_bytes),
            "yes" if r.fits else "no",
            str(r.max_context),
        )
        for r in report.rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in body)) if body else len(c) for i, c in enumerate(cols)]
    left = {0}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [head, "", line(cols), line(["-" * w for w in widths])]
    out.extend(line(row) for row in body)
    return "\n".join(out)

"""llama-quantize's per-tensor type choice for its named mixes (Q4_K_M, Q3_K_S, IQ4_XS, ...).

A "mix" (llama.cpp: ``llama_ftype``) names a default ggml type plus rules that give some tensors more or
fewer bits: the output tensor Q6_K, ``attn_v``/``ffn_down`` of some layers Q6_K in Q4_K_M, and so on.
This module reproduces ``llama_tensor_get_type`` of llama.cpp's ``src/llama-quant.cpp`` so that a GGUF
file written by lowbit holds, tensor by tensor, the types ``llama-quantize`` would have chosen.

Provenance. Written against the ``llama-quant.cpp`` stored for ggml-org/llama.cpp at commit
``007dbbf3fd17eefe9b47fee45f48f7ba5e62b714`` (the exact reference commit ``0c1e57098bba`` was not
available as source), and checked tensor by tensor against the reference ``llama-quantize`` binary built
from ``0c1e57098bba`` (tests/formats/gguf/test_mixes.py). One behaviour comes from the binary, not from
that source: a row whose width a 32-element block type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4) does
not divide falls back to F16 (that source throws "no tensor type fallback" instead).

What is data and what is code: the mix table (name -> llama ftype id, default type), the fall-back
table, the name -> category table, the exclusions from quantization, and the simple per-category
lookups are tables. The genuinely conditional parts (attn_v and ffn_down per-layer rules, GQA/MoE
adjustments) are ordered rule lists evaluated first-match, in the order of llama.cpp's if/else chain.

Conventions.
* Tensor names are GGUF names (``blk.3.ffn_down.weight``, ``token_embd.weight``, ``output.weight``).
* Shapes are in PyTorch/numpy order: ``(out, in)`` for a matrix, ``(n_expert, out, in)`` for stacked
  experts; the last dimension is ggml's ``ne[0]`` (the row that a block type must divide).
* ``tensor_types`` is the faithful one: llama.cpp's per-category counters (``i_attention_wv`` ...) run
  over the tensors in llama.cpp's order (by layer, then by name) and "tied embeddings" means "no
  ``output.weight`` among the tensors". ``choose_type`` answers for one tensor, taking the counters to be
  the tensor's layer index (true for every standard layout: one attn_v / ffn_down per layer).

``--tensor-type`` overrides (:class:`TypeOverride`) are applied as llama-quantize applies them. Not
modelled: ``--output-tensor-type`` / ``--token-embedding-type`` (``--tensor-type output=...`` does it),
``--leave-output-tensor``, ``--prune-layers``; llama.cpp's Q1_0/Q2_0/NVFP4 mixes (gguf-py does not know
all of their types).
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

from lowbit.errors import InputFileError, SchemeError, ShapeError
from lowbit.formats.gguf.types import GGMLType, block_size, ggml_type, is_quantized

log = logging.getLogger(__name__)

T = GGMLType


# --------------------------------------------------------------------------------------------- mixes
@dataclass(frozen=True)
class MixSpec:
    """One llama-quantize mix: its name, llama.cpp ``llama_ftype`` value (GGUF ``general.file_type``)
    and the type every quantizable tensor gets unless a rule says otherwise."""

    name: str
    file_type: int
    default_type: GGMLType


_MIX_ROWS: tuple[tuple[str, int, GGMLType], ...] = (
    # name        llama_ftype  default type (llama_ftype_get_default_type)
    ("F32", 0, T.F32),
    ("F16", 1, T.F16),
    ("Q4_0", 2, T.Q4_0),
    ("Q4_1", 3, T.Q4_1),
    ("Q8_0", 7, T.Q8_0),
    ("Q5_0", 8, T.Q5_0),
    ("Q5_1", 9, T.Q5_1),
    ("Q2_K", 10, T.Q2_K),
    ("Q3_K_S", 11, T.Q3_K),
    ("Q3_K_M", 12, T.Q3_K),
    ("Q3_K_L", 13, T.Q3_K),
    ("Q4_K_S", 14, T.Q4_K),
    ("Q4_K_M", 15, T.Q4_K),
    ("Q5_K_S", 16, T.Q5_K),
    ("Q5_K_M", 17, T.Q5_K),
    ("Q6_K", 18, T.Q6_K),
    ("IQ2_XXS", 19, T.IQ2_XXS),
    ("IQ2_XS", 20, T.IQ2_XS),
    ("Q2_K_S", 21, T.Q2_K),
    ("IQ3_XS", 22, T.IQ3_S),
    ("IQ3_XXS", 23, T.IQ3_XXS),
    ("IQ1_S", 24, T.IQ1_S),
    ("IQ4_NL", 25, T.IQ4_NL),
    ("IQ3_S", 26, T.IQ3_S),
    ("IQ3_M", 27, T.IQ3_S),
    ("IQ2_S", 28, T.IQ2_XS),
    ("IQ2_M", 29, T.IQ2_S),
    ("IQ4_XS", 30, T.IQ4_XS),
    ("IQ1_M", 31, T.IQ1_M),
    ("BF16", 32, T.BF16),
    ("TQ1_0", 36, T.TQ1_0),
    ("TQ2_0", 37, T.TQ2_0),
    ("MXFP4_MOE", 38, T.MXFP4),
)

MIXES: Mapping[str, MixSpec] = MappingProxyType({n: MixSpec(n, f, t) for n, f, t in _MIX_ROWS})
"""Every supported mix by its llama-quantize name."""

# llama-quantize's own aliases ("Q4_K : alias for Q4_K_M").
MIX_ALIASES: Mapping[str, str] = MappingProxyType({"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"})


def get_mix(name: str) -> MixSpec:
    """The mix called ``name`` (case-insensitive, llama-quantize aliases accepted)."""
    key = name.strip().upper()
    key = MIX_ALIASES.get(key, key)
    spec = MIXES.get(key)
    if spec is None:
        raise SchemeError(f"unknown GGUF mix {name!r}; known: {', '.join(MIXES)}")
    return spec


# ------------------------------------------------------------------------------------ model facts
@dataclass(frozen=True)
class ModelInfo:
    """The model hyper-parameters that llama-quantize's rules look at.

    ``arch`` is the GGUF architecture name (``general.architecture``: llama, qwen2, gemma2, phi3,
    falcon, ...); Mistral and Mixtral GGUFs are ``llama``. ``n_expert`` is 0 for dense models.
    """

    n_layer: int
    n_head: int
    n_head_kv: int
    arch: str = "llama"
    n_expert: int = 0
    tied_embeddings: bool = False

    @property
    def n_gqa(self) -> int:
        """Query heads per KV head (llama.cpp ``hparams.n_gqa()``: 0 when there are no KV heads)."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """Whether llama.cpp types this model ``LLM_TYPE_70B`` (its attn_v gets Q5_K instead of Q3_K/Q4_K)."""
        rule = _LLM_TYPE_70B.get(self.arch)
        return bool(rule and rule(self))

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, object], tensor_names: Iterable[str]) -> ModelInfo:
        """From a GGUF file's metadata values (``{arch}.block_count`` ...) and its tensor names."""
        arch = str(fields.get("general.architecture", "llama"))

        def get_int(key: str, default: int | None = None) -> int:
            v = fields.get(f"{arch}.{key}", default)
            if v is None:
                raise InputFileError(f"GGUF metadata has no {arch}.{key}; is this a language model file?")
            if isinstance(v, (list, tuple)):  # per-layer arrays (some archs): llama.cpp uses layer 0
                v = v[0] if v else 0
            return int(v)  # type: ignore[call-overload]

        n_head = get_int("attention.head_count")
        return cls(
            n_layer=get_int("block_count"),
            n_head=n_head,
            n_head_kv=get_int("attention.head_count_kv", n_head),
            arch=arch,
            n_expert=get_int("expert_count", 0),
            tied_embeddings="output.weight" not in set(tensor_names),
        )


# llama.cpp's load_hparams sets LLM_TYPE_70B for these (arch -> condition); only that type matters here.
_LLM_TYPE_70B: Mapping[str, Callable[[ModelInfo], bool]] = MappingProxyType(
    {
        "llama": lambda m: m.n_expert != 8 and m.n_layer == 80 and m.n_head != m.n_head_kv,
        "qwen2": lambda m: m.n_layer == 80,
        "deci": lambda m: m.n_layer == 80,
        "olmoe": lambda m: m.n_layer == 80,
    }
)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as llama-quantize sees it: GGUF name, shape (numpy order) and its current type."""

    name: str
    shape: tuple[int, ...]
    type: GGMLType = T.F32


# ------------------------------------------------------------------------------------- categories
class Category(enum.Enum):
    TOKEN_EMBD = "token_embd"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_QKV = "attn_qkv"
    ATTN_KV_B = "attn_kv_b"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"


_EXACT_CATEGORY: Mapping[str, Category] = MappingProxyType(
    {
        "output.weight": Category.OUTPUT,
        "token_embd.weight": Category.TOKEN_EMBD,
        "per_layer_token_embd.weight": Category.TOKEN_EMBD,
    }
)
# First substring that occurs in the name decides (order matters, as in tensor_get_category).
_SUBSTRING_CATEGORY: tuple[tuple[str, Category], ...] = (
    ("attn_qkv.weight", Category.ATTN_QKV),
    ("attn_kv_b.weight", Category.ATTN_KV_B),
    ("attn_v.weight", Category.ATTN_V),
    ("attn_k.weight", Category.ATTN_K),
    ("attn_q.weight", Category.ATTN_Q),
    ("attn_output.weight", Category.ATTN_OUTPUT),
    ("ffn_up", Category.FFN_UP),
    ("ffn_gate", Category.FFN_GATE),
    ("ffn_down", Category.FFN_DOWN),
)
# attn_v-like tensors share attn_v's rules and counter.
_ATTN_V_LIKE = frozenset({Category.ATTN_V, Category.ATTN_QKV, Category.ATTN_KV_B})
# Which counter a category advances (llama.cpp's i_attention_wv, i_ffn_down, i_ffn_gate, i_ffn_up).
_COUNTER_OF: Mapping[Category, str] = MappingProxyType(
    {
        Category.ATTN_V: "attn_v",
        Category.ATTN_QKV: "attn_v",
        Category.ATTN_KV_B: "attn_v",
        Category.FFN_DOWN: "ffn_down",
        Category.FFN_GATE: "ffn_gate",
        Category.FFN_UP: "ffn_up",
    }
)


def category_of(name: str) -> Category:
    exact = _EXACT_CATEGORY.get(name)
    if exact is not None:
        return exact
    for sub, cat in _SUBSTRING_CATEGORY:
        if sub in name:
            return cat
    return Category.OTHER


# ----------------------------------------------------------------- which tensors are quantized at all
_NEVER_QUANTIZED_SUBSTRINGS: tuple[str, ...] = (
    "_norm.weight",
    "ffn_gate_inp.weight",  # MoE routers
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    *(
        f"time_mix_{s}.weight"
        for s in (
            "first",
            "w0",
            "w1",
            "w2",
            "v0",
            "v1",
            "v2",
            "a0",
            "a1",
            "a2",
            "g1",
            "g2",
            "decay_w1",
            "decay_w2",
            "lerp_fused",
        )
    ),
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_QUANTIZED_NAMES = frozenset({"position_embd.weight", "token_types.weight"})


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """llama.cpp's ``tensor_allows_quantization``: 2-D/3-D ``*weight`` tensors except norms, routers,
    position embeddings and a list of small special tensors. Others keep their current type."""
    if len(shape) < 2:
        return False
    if not name.endswith("weight") or name in _NEVER_QUANTIZED_NAMES:
        return False
    return not any(s in name for s in _NEVER_QUANTIZED_SUBSTRINGS)


# ------------------------------------------------------------------------------ row-width fall-back
# A type whose block does not divide the row (ne[0]) falls back to one with 32-element blocks.
FALLBACK: Mapping[GGMLType, GGMLType] = MappingProxyType(
    {
        T.IQ1_S: T.IQ4_NL,
        T.IQ1_M: T.IQ4_NL,
        T.IQ2_XXS: T.IQ4_NL,
        T.IQ2_XS: T.IQ4_NL,
        T.IQ2_S: T.IQ4_NL,
        T.IQ3_XXS: T.IQ4_NL,
        T.IQ3_S: T.IQ4_NL,
        T.IQ4_XS: T.IQ4_NL,
        T.Q2_K: T.Q4_0,
        T.Q3_K: T.Q4_0,
        T.TQ1_0: T.Q4_0,
        T.TQ2_0: T.Q4_0,
        T.Q4_K: T.Q5_0,
        T.Q5_K: T.Q5_1,
        T.Q6_K: T.Q8_0,
    }
)
_LAST_RESORT = T.F16  # when even the fall-back's block does not divide the row


def fallback_type(t: GGMLType, ncols: int) -> GGMLType:
    """``t`` if its block divides a row of ``ncols``, else llama.cpp's fall-back (``tensor_type_fallback``).

    32-element block types without a table entry (Q4_0 … Q8_0, IQ4_NL, MXFP4) go straight to F16, as the
    reference binary does; a larger block type without an entry is an error, as in llama.cpp.
    """
    if ncols % block_size(t) == 0:
        return t
    fb = FALLBACK.get(t)
    if fb is None:
        if block_size(t) > 32:
            raise ShapeError(
                f"rows of {ncols} are not a multiple of {block_size(t)} and {t.name} has no fall-back"
            )
        fb = _LAST_RESORT
    return fb if ncols % block_size(fb) == 0 else _LAST_RESORT


# ---------------------------------------------------------------------------------- rule machinery
@dataclass(frozen=True)
class _Ctx:
    """Everything one decision looks at."""

    mix: str
    default: GGMLType
    name: str
    category: Category
    ncols: int  # ne[0]: the row width
    n_slices: int  # ne[2]: experts stacked in a 3-D tensor, else 1
    model: ModelInfo
    imatrix: bool
    i_attn_v: int  # llama.cpp qs.i_attention_wv before this tensor
    n_attn_v: int  # qs.n_attention_wv
    i_counter: int  # this category's own counter (i_ffn_down / i_ffn_gate / i_ffn_up)
    n_layer: int  # qs.n_ffn_down == n_ffn_gate == n_ffn_up == n_layer

    @property
    def gqa(self) -> int:
        return self.model.n_gqa

    @property
    def n_expert(self) -> int:
        return self.model.n_expert

    @property
    def falcon(self) -> bool:
        return self.model.arch == "falcon"

    @property
    def layer(self) -> int:
        """llama.cpp's ``layer_info``: the counter, or (MoE) the layer parsed from the tensor name."""
        if max(1, self.n_expert) > 1:
            m = _BLK.match(self.name)
            if m is None:
                raise InputFileError(f"cannot tell the layer of MoE tensor {self.name!r} (expected blk.N.)")
            i = int(m.group(1))
            if not 0 <= i < self.n_layer:
                raise InputFileError(f"tensor {self.name!r}: layer {i} is outside [0, {self.n_layer})")
            return i
        return self.i_counter


_BLK = re.compile(r"^blk\.(-?\d+)\.")


def _c_div(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _c_mod(a: int, b: int) -> int:
    return a - b * _c_div(a, b)


def _use_more_bits(i: int, n: int) -> bool:
    return i < _c_div(n, 8) or i >= _c_div(7 * n, 8) or _c_mod(i - _c_div(n, 8), 3) == 2


def _ffn_use_more_bits(c: _Ctx) -> bool:
    return _use_more_bits(c.layer, c.n_layer)


def _first_eighth(c: _Ctx) -> bool:
    return c.layer < _c_div(c.n_layer, 8)


def _first_sixteenth(c: _Ctx) -> bool:
    return c.layer < _c_div(c.n_layer, 16)


def _middle(c: _Ctx) -> bool:
    return _c_div(c.n_layer, 8) <= c.layer < _c_div(7 * c.n_layer, 8)


Choice = GGMLType | Callable[[_Ctx], GGMLType | None]


@dataclass(frozen=True)
class Rule:
    """``if mix in mixes and when(ctx): type = then`` — one arm of llama.cpp's if/else chains.

    ``then`` may be a callable returning the type, or ``None`` for "leave it as it is".
    """

    mixes: frozenset[str]
    then: Choice
    when: Callable[[_Ctx], bool] | None = None

    def matches(self, c: _Ctx) -> bool:
        return c.mix in self.mixes and (self.when is None or self.when(c))

    def apply(self, c: _Ctx, current: GGMLType) -> GGMLType:
        out = self.then(c) if callable(self.then) else self.then
        return current if out is None else out


def _mixes(*names: str) -> frozenset[str]:
    unknown = set(names) - set(MIXES)
    assert not unknown, unknown
    return frozenset(names)


def _first_match(rules: Sequence[Rule], c: _Ctx, current: GGMLType) -> GGMLType:
    for rule in rules:
        if rule.matches(c):
            return rule.apply(c, current)
    return current


_ALL = frozenset(MIXES)
_IQ2_FAMILY = _mixes("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
_IQ2_SM = _mixes("IQ2_S", "IQ2_M")

# Output tensor (and token_embd when embeddings are tied): mixes that use Q5_K instead of Q6_K.
_OUTPUT_Q5_K = _mixes("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")

# Untied token embeddings.
_TOKEN_EMBD: tuple[Rule, ...] = (
    Rule(_mixes("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"), T.Q2_K),
    Rule(_mixes("IQ2_S", "IQ2_M", "IQ3_XXS"), T.IQ3_S),
    Rule(_mixes("TQ1_0", "TQ2_0"), T.Q4_K),
)

# The very-low-bit IQ2/IQ1 mixes have their own chain, checked before everything below.
_IQ2_RULES: Mapping[Category, tuple[Rule, ...]] = MappingProxyType(
    {
        **{
            cat: (
                Rule(_IQ2_FAMILY, T.Q4_K, when=lambda c: c.gqa >= 4 or c.n_expert >= 4),
                Rule(_IQ2_SM, T.IQ3_S),
                Rule(_IQ2_FAMILY, T.Q2_K),
            )
            for cat in _ATTN_V_LIKE
        },
        Category.ATTN_K: (Rule(_IQ2_FAMILY, T.Q4_K, when=lambda c: c.n_expert == 8),),
        # note: the raw counter, not layer_info, as in llama.cpp
        Category.FFN_DOWN: (
            Rule(_IQ2_SM, T.IQ3_S, when=lambda c: c.i_counter < _c_div(c.n_layer, 8)),
            Rule(_IQ2_FAMILY, T.Q2_K, when=lambda c: c.i_counter < _c_div(c.n_layer, 8)),
        ),
        Category.ATTN_OUTPUT: (
            Rule(_IQ2_FAMILY, T.Q5_K, when=lambda c: c.n_expert == 8),
            Rule(_mixes("IQ1_S", "IQ1_M"), T.IQ2_XXS),
            Rule(_IQ2_SM, T.IQ3_S),
        ),
    }
)

_ATTN_V: tuple[Rule, ...] = (
    Rule(_mixes("Q2_K"), lambda c: T.Q4_K if c.gqa >= 4 else T.Q3_K),
    Rule(_mixes("Q2_K_S"), T.Q4_K, when=lambda c: c.gqa >= 4),
    Rule(
        _mixes("IQ3_XXS"),
        lambda c: T.Q4_K if c.gqa >= 4 else (T.IQ3_XXS if c.imatrix else T.IQ3_S),
    ),
    Rule(_mixes("IQ3_XS", "IQ3_S"), T.Q4_K, when=lambda c: c.gqa >= 4),
    Rule(_mixes("IQ3_M"), T.Q4_K),
    Rule(_mixes("Q3_K_M"), lambda c: T.Q5_K if c.i_attn_v < 2 else T.Q4_K),
    Rule(_mixes("Q3_K_L"), T.Q5_K),
    Rule(_mixes("IQ4_NL", "IQ4_XS"), T.Q5_K, when=lambda c: c.gqa >= 4),
    Rule(_mixes("Q4_K_M", "Q5_K_M"), T.Q6_K, when=lambda c: _use_more_bits(c.i_attn_v, c.n_attn_v)),
    Rule(_mixes("Q4_K_S"), T.Q5_K, when=lambda c: c.i_attn_v < 4),
)


def _attn_v_after(c: _Ctx, t: GGMLType) -> GGMLType:
    # 70B: attn_v is 8x smaller than attn_q (GQA), so a few more bits cost little.
    if c.model.is_70b and t in (T.Q3_K, T.Q4_K):
        t = T.Q5_K
    if c.n_expert == 8:
        t = T.Q8_0
    return t


_ATTN_K: tuple[Rule, ...] = (
    Rule(_ALL, T.Q8_0, when=lambda c: c.n_expert == 8),
    Rule(_mixes("IQ3_XS"), T.IQ3_XXS),
    Rule(_mixes("IQ3_XXS"), T.IQ2_S),
)
_ATTN_Q: tuple[Rule, ...] = (
    Rule(_mixes("IQ3_XS"), T.IQ3_XXS),
    Rule(_mixes("IQ3_XXS"), T.IQ2_S),
)


def _q3_k_m_ffn_down(c: _Ctx) -> GGMLType:
    if _first_sixteenth(c):
        return T.Q5_K
    return T.Q4_K if (not c.falcon or _ffn_use_more_bits(c)) else T.Q3_K


def _q4_k_m_ffn_down(c: _Ctx) -> GGMLType | None:
    if c.falcon:
        return T.Q6_K if _first_sixteenth(c) else (T.Q5_K if _ffn_use_more_bits(c) else T.Q4_K)
    return T.Q6_K if _ffn_use_more_bits(c) else None


_FFN_DOWN: tuple[Rule, ...] = (
    Rule(_mixes("Q2_K"), T.Q3_K),
    Rule(_mixes("Q2_K_S"), lambda c: T.Q4_K if _first_eighth(c) else None),
    Rule(
        _mixes("IQ3_XXS"),
        lambda c: T.Q4_K if _first_eighth(c) else T.Q3_K,
        when=lambda c: not c.imatrix,
    ),
    Rule(_mixes("Q3_K_M"), _q3_k_m_ffn_down),
    Rule(
        _mixes("IQ3_M"),
        T.Q4_K,
        when=lambda c: _first_eighth(c) or (c.n_expert == 8 and _ffn_use_more_bits(c)),
    ),
    Rule(_mixes("Q3_K_L"), lambda c: T.Q4_K if c.falcon else T.Q5_K),
    Rule(_mixes("Q4_K_M"), _q4_k_m_ffn_down),
    Rule(_mixes("IQ4_NL", "IQ4_XS"), T.Q5_K, when=lambda c: _first_eighth(c) and not c.imatrix),
    Rule(_mixes("Q5_K_M"), T.Q6_K, when=_ffn_use_more_bits),
    Rule(_mixes("Q4_K_S"), T.Q5_K, when=lambda c: not c.falcon and _first_eighth(c)),
    # Only with an imatrix, so that plain Q4_0/Q5_0 stay what they always were.
    Rule(_mixes("Q4_0"), T.Q4_1, when=lambda c: c.imatrix and _first_eighth(c)),
    Rule(_mixes("Q5_0"), T.Q5_1, when=lambda c: c.imatrix and _first_eighth(c)),
)

_ATTN_OUTPUT_MOE8_Q5_K = _mixes(
    "Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"
)
_ATTN_OUTPUT: tuple[Rule, ...] = (
    Rule(_mixes("Q3_K_L"), T.Q4_K, when=lambda c: c.falcon),
    Rule(_ALL, lambda c: None, when=lambda c: c.falcon),  # falcon: nothing else changes
    Rule(_ATTN_OUTPUT_MOE8_Q5_K, T.Q5_K, when=lambda c: c.n_expert == 8),
    Rule(_ALL, lambda c: None, when=lambda c: c.n_expert == 8),
    Rule(_mixes("Q2_K"), T.Q3_K),
    Rule(_mixes("IQ3_XXS"), T.IQ3_S),
    Rule(_mixes("Q3_K_M"), T.Q4_K),
    Rule(_mixes("Q3_K_L"), T.Q5_K),
    Rule(_mixes("IQ3_M"), T.Q4_K),
)

_FFN_GATE_UP: tuple[Rule, ...] = (Rule(_mixes("IQ3_XS"), T.IQ3_XXS, when=_middle),)

# The main chain (after the output / MXFP4 / token_embd / IQ2-family branches). attn_qkv and attn_kv_b
# are attn_v-like here, as in llama.cpp (whose separate attn_qkv arm is therefore unreachable).
_MAIN_RULES: Mapping[Category, tuple[Rule, ...]] = MappingProxyType(
    {
        **{cat: _ATTN_V for cat in _ATTN_V_LIKE},
        Category.ATTN_K: _ATTN_K,
        Category.ATTN_Q: _ATTN_Q,
        Category.FFN_DOWN: _FFN_DOWN,
        Category.ATTN_OUTPUT: _ATTN_OUTPUT,
        Category.FFN_GATE: _FFN_GATE_UP,
        Category.FFN_UP: _FFN_GATE_UP,
    }
)

# MXFP4_MOE: on bailingmoe3 only the expert FFN tensors count as MoE tensors (its MLA projections are 3-D).
_MXFP4_EXPERT_ONLY_ARCHS = frozenset({"bailingmoe3"})
_FFN_CATEGORIES = frozenset({Category.FFN_UP, Category.FFN_GATE, Category.FFN_DOWN})


def _output_type(c: _Ctx) -> GGMLType:
    if c.mix == "MXFP4_MOE" or c.falcon or c.ncols % block_size(c.default) != 0:
        return T.Q8_0
    if c.mix in _OUTPUT_Q5_K:
        return T.Q5_K
    return T.Q6_K if c.default != T.Q8_0 else c.default


def _mxfp4_moe_type(c: _Ctx) -> GGMLType:
    is_moe = c.n_slices > 1 and (
        c.model.arch not in _MXFP4_EXPERT_ONLY_ARCHS or c.category in _FFN_CATEGORIES
    )
    return T.MXFP4 if is_moe else T.Q8_0


def _rule_type(c: _Ctx) -> GGMLType:
    """llama.cpp ``llama_tensor_get_type_impl``: the mix's choice before the row-width fall-back."""
    if c.category == Category.OUTPUT or (c.model.tied_embeddings and c.category == Category.TOKEN_EMBD):
        return _output_type(c)
    if c.mix == "MXFP4_MOE":
        return _mxfp4_moe_type(c)
    if c.category == Category.TOKEN_EMBD:
        return _first_match(_TOKEN_EMBD, c, c.default)
    if c.mix in _IQ2_FAMILY:
        return _first_match(_IQ2_RULES.get(c.category, ()), c, c.default)
    t = _first_match(_MAIN_RULES.get(c.category, ()), c, c.default)
    return _attn_v_after(c, t) if c.category in _ATTN_V_LIKE else t


# ------------------------------------------------------------------------------------------ overrides
@dataclass(frozen=True)
class TypeOverride:
    """llama-quantize's ``--tensor-type PATTERN=TYPE``: tensors whose GGUF name ``PATTERN`` (a regular
    expression, searched anywhere in the name) matches take ``type`` instead of the mix's choice."""

    pattern: str
    type: GGMLType

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def parse_type_overrides(specs: Iterable[str]) -> tuple[TypeOverride, ...]:
    """``["attn_v=q8_0", "blk\\.[0-3]\\.ffn_down=q6_k"]`` -> overrides; :class:`SchemeError` for a bad one."""
    out: list[TypeOverride] = []
    for spec in specs:
        pattern, sep, type_name = spec.rpartition("=")
        if not sep or not pattern or not type_name:
            raise SchemeError(f"--tensor-type {spec!r}: write NAME_PATTERN=TYPE, e.g. attn_v=q8_0")
        try:
            re.compile(pattern)
        except re.error as e:
            raise SchemeError(
                f"--tensor-type {spec!r}: {pattern!r} is not a regular expression ({e})"
            ) from None
        t = ggml_type(type_name)
        if not is_quantized(t) and t not in (T.F16, T.BF16, T.F32):
            raise SchemeError(f"--tensor-type {spec!r}: {t.name} is not a type a weight can be stored in")
        out.append(TypeOverride(pattern, t))
    return tuple(out)


# ------------------------------------------------------------------------------------------ public
def _select(
    spec: MixSpec,
    t: TensorSpec,
    model: ModelInfo,
    counters: Mapping[str, int],
    n_attn_v: int,
    *,
    imatrix: bool,
    pure: bool,
    overrides: Sequence[TypeOverride] = (),
) -> GGMLType:
    if not allows_quantization(t.name, t.shape):
        return t.type
    if not is_quantized(spec.default_type):
        return spec.default_type
    new = spec.default_type
    cat = category_of(t.name)
    if not pure:
        ctx = _Ctx(
            mix=spec.name,
            default=spec.default_type,
            name=t.name,
            category=cat,
            ncols=int(t.shape[-1]),
            n_slices=int(t.shape[-3]) if len(t.shape) >= 3 else 1,
            model=model,
            imatrix=imatrix,
            i_attn_v=counters.get("attn_v", 0),
            n_attn_v=n_attn_v,
            i_counter=counters.get(_COUNTER_OF.get(cat, ""), 0),
            n_layer=model.n_layer,
        )
        new = _rule_type(ctx)
        for o in overrides:  # as llama-quantize: every pattern is tried, the last match wins
            if o.matches(t.name):
                new = o.type
    return fallback_type(new, int(t.shape[-1]))


def choose_type(
    mix: str,
    tensor_name: str,
    shape: Sequence[int],
    model_info: ModelInfo,
    *,
    source_type: GGMLType = T.F32,
    imatrix: bool = False,
    pure: bool = False,
) -> GGMLType:
    """The type llama-quantize gives one tensor under ``mix``.

    ``shape`` is in numpy order (last dim = row). ``source_type`` is what the tensor is stored as now:
    tensors that are never quantized (norms, biases, routers: 1-D or excluded by name) keep it.
    Embedding tying comes from ``model_info.tied_embeddings``; llama.cpp's per-category counters are
    taken to equal the layer index (use :func:`tensor_types` for the exact, whole-model computation).
    """
    spec = get_mix(mix)
    m = _BLK.match(tensor_name)
    layer = int(m.group(1)) if m else 0
    counters = {"attn_v": layer, "ffn_down": layer, "ffn_gate": layer, "ffn_up": layer}
    t = TensorSpec(tensor_name, tuple(int(d) for d in shape), source_type)
    return _select(spec, t, model_info, counters, model_info.n_layer, imatrix=imatrix, pure=pure)


def llama_order_key(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order (``weight_name_comparer``): by ``blk.N`` (others first), then by name."""
    m = _BLK.match(name)
    return (int(m.group(1)) if m else -1, name)


def tensor_types(
    mix: str,
    tensors: Iterable[TensorSpec],
    model_info: ModelInfo,
    *,
    imatrix: bool = False,
    pure: bool = False,
    overrides: Sequence[TypeOverride] = (),
) -> dict[str, GGMLType]:
    """Every tensor's type under ``mix``, exactly as llama-quantize computes it (with ``overrides``: its
    ``--tensor-type`` options, applied after the mix's rules and before the row-width fall-back).

    The result is ordered as llama-quantize writes its output file (by layer, then by name).
    ``model_info.tied_embeddings`` is overridden by whether ``output.weight`` is among ``tensors``.
    """
    spec = get_mix(mix)
    specs = sorted(tensors, key=lambda t: llama_order_key(t.name))
    names = [t.name for t in specs]
    if len(set(names)) != len(names):
        raise InputFileError("tensor names must be unique")
    model = replace(model_info, tied_embeddings="output.weight" not in names)
    n_attn_v = sum(category_of(n) in _ATTN_V_LIKE for n in names)

    counters: dict[str, int] = {}
    out: dict[str, GGMLType] = {}
    for t in specs:
        out[t.name] = _select(
            spec, t, model, counters, n_attn_v, imatrix=imatrix, pure=pure, overrides=overrides
        )
        key = _COUNTER_OF.get(category_of(t.name))
        # llama.cpp advances a counter only when its rules ran for that tensor
        if key and allows_quantization(t.name, t.shape) and is_quantized(spec.default_type) and not pure:
            counters[key] = counters.get(key, 0) + 1
    return out


# Types for which llama-quantize insists on an importance matrix (tensor_requires_imatrix).
_IMATRIX_TYPES = frozenset({T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S})


def requires_imatrix(mix: str, tensor_name: str, chosen: GGMLType) -> bool:
    """Whether llama-quantize refuses to write ``tensor_name`` as ``chosen`` without an imatrix."""
    if category_of(tensor_name) in (Category.TOKEN_EMBD, Category.OUTPUT):
        return False
    if chosen == T.Q2_K:
        return get_mix(mix).name == "Q2_K_S"
    return chosen in _IMATRIX_TYPES

"""Shapes of well-known models, and the tensor list of an architecture computed from its config.

Built-in presets are the published ``config.json`` values of each model, stored as JSON next to this
module (``presets/<name>.json``, with a ``_lowbit`` entry naming the source repository and aliases).
They are parsed by the same :func:`ModelConfig.from_hf_config` that reads a user's ``config.json``.

:meth:`ModelConfig.tensors` lists every tensor the model has under its GGUF names (what
``convert_hf_to_gguf.py`` would write), with shapes in PyTorch/numpy order: the layout of each
architecture is data (:data:`LAYOUTS`), shapes are symbolic dimension names resolved from the config.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lowbit.errors import ArgumentError, InputFileError
from lowbit.formats.gguf.mixes import ModelInfo, TensorSpec
from lowbit.formats.gguf.types import GGMLType

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """The sizes that decide a decoder-only transformer's memory footprint.

    ``intermediate_size`` is the dense FFN width; for MoE models ``expert_intermediate_size`` is the width
    of one expert. ``max_context`` is the model's ``max_position_embeddings``.
    """

    name: str
    model_type: str
    hidden_size: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    max_context: int
    n_expert: int = 0
    n_expert_used: int = 0
    expert_intermediate_size: int = 0
    llama3_rope: bool = False  # llama.cpp stores a rope_freqs tensor for llama3-style rope scaling
    source: str = ""
    gguf_arch_name: str = ""  # GGUF general.architecture when read from a file; else from the layout

    def __post_init__(self) -> None:
        for field_name in ("hidden_size", "n_layer", "n_head", "n_head_kv", "head_dim", "vocab_size"):
            if getattr(self, field_name) <= 0:
                raise InputFileError(
                    f"{self.name}: {field_name} must be positive, not {getattr(self, field_name)}"
                )

    @property
    def layout(self) -> Layout:
        return layout_for(self.model_type)

    @property
    def gguf_arch(self) -> str:
        return self.gguf_arch_name or self.layout.gguf_arch

    @property
    def kv_dim(self) -> int:
        """Elements per token per layer of K (and of V): ``n_head_kv * head_dim``."""
        return self.n_head_kv * self.head_dim

    def dims(self) -> Mapping[str, int]:
        """Values of the symbolic dimension names used by :data:`LAYOUTS`."""
        q = self.n_head * self.head_dim
        kv = self.kv_dim
        return {
            "hidden": self.hidden_size,
            "ffn": self.intermediate_size,
            "ffn2": 2 * self.intermediate_size,
            "vocab": self.vocab_size,
            "q": q,
            "kv": kv,
            "qkv": q + 2 * kv,
            "head_dim": self.head_dim,
            "rope_half": self.head_dim // 2,
            "experts": self.n_expert,
            "expert_ffn": self.expert_intermediate_size or self.intermediate_size,
        }

    def tensors(self) -> list[TensorSpec]:
        """Every tensor under its GGUF name; 2-D/3-D weights as F16 and 1-D tensors/routers as F32
        (the types ``convert_hf_to_gguf.py`` writes for an f16 conversion)."""
        lay = self.layout
        dims = self.dims()
        out: list[TensorSpec] = []

        def add(tpl: TensorTemplate, layer: int | None = None) -> None:
            name = tpl.name.format(i=layer) if layer is not None else tpl.name
            shape = tuple(dims[d] for d in tpl.shape)
            f32 = len(shape) == 1 or tpl.keep_f32
            out.append(TensorSpec(name, shape, GGMLType.F32 if f32 else GGMLType.F16))

        add(_TOKEN_EMBD)
        if self.llama3_rope:
            add(_ROPE_FREQS)
        ffn = _FFN_MOE if self.n_expert > 0 else lay.ffn
        for i in range(self.n_layer):
            for tpl in (*lay.attention, *ffn, *lay.extra):
                add(tpl, i)
        add(_OUTPUT_NORM)
        if not self.tied_embeddings:
            add(_OUTPUT)
        return out

    @property
    def n_params(self) -> int:
        total = 0
        for t in self.tensors():
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_head_kv=self.n_head_kv,
            arch=self.gguf_arch,
            n_expert=self.n_expert,
            tied_embeddings=self.tied_embeddings,
        )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], name: str = "", source: str = "") -> ModelConfig:
        """From a Hugging Face ``config.json`` (multimodal configs: their ``text_config``)."""
        text = config.get("text_config")
        cfg: Mapping[str, Any] = {**config, **text} if isinstance(text, Mapping) else config
        model_type = str(cfg.get("model_type") or config.get("model_type") or "")
        if model_type not in LAYOUTS:
            log.warning("model_type %r has no layout here; assuming a llama-like one", model_type)
        label = name or str(cfg.get("_name_or_path") or model_type or "model")

        def pick(keys: tuple[str, ...], default: Any = None) -> Any:
            for k in keys:
                v = cfg.get(k)
                if v is not None:
                    return v
            if default is None:
                raise InputFileError(
                    f"{label}: config has none of {', '.join(keys)}; is it a decoder LLM config?"
                )
            return default

        hidden = int(pick(("hidden_size", "n_embd", "d_model")))
        n_head = int(pick(("num_attention_heads", "n_head", "num_heads")))
        n_expert = int(pick(("num_local_experts", "num_experts", "n_routed_experts"), 0))
        intermediate = int(pick(("intermediate_size", "ffn_dim", "n_inner"), 4 * hidden))
        rope = cfg.get("rope_scaling") or {}
        lay = layout_for(model_type)
        return cls(
            name=label,
            model_type=model_type if model_type in LAYOUTS else "llama",
            hidden_size=hidden,
            n_layer=int(pick(("num_hidden_layers", "n_layer", "num_layers"))),
            n_head=n_head,
            n_head_kv=int(pick(("num_key_value_heads", "n_head_kv"), n_head)),
            head_dim=int(pick(("head_dim",), hidden // n_head)),
            intermediate_size=intermediate,
            vocab_size=int(pick(("vocab_size",))),
            tied_embeddings=bool(pick(("tie_word_embeddings",), lay.tied_default)),
            max_context=int(pick(("max_position_embeddings", "n_positions", "seq_length"), 2048)),
            n_expert=n_expert,
            n_expert_used=int(pick(("num_experts_per_tok",), 0)) if n_expert else 0,
            expert_intermediate_size=int(pick(("moe_intermediate_size",), intermediate)) if n_expert else 0,
            llama3_rope=isinstance(rope, Mapping) and rope.get("rope_type", rope.get("type")) == "llama3",
            source=source,
        )


# ------------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class TensorTemplate:
    """One tensor of a layout: GGUF name (``{i}`` = layer) and shape as symbolic dimension names."""

    name: str
    shape: tuple[str, ...]
    keep_f32: bool = False  # stored as F32 even though it is 2-D (MoE router)


@dataclass(frozen=True)
class Layout:
    """Per-layer tensors of an architecture, apart from the FFN of MoE models (:data:`_FFN_MOE`)."""

    gguf_arch: str
    attention: tuple[TensorTemplate, ...]
    ffn: tuple[TensorTemplate, ...]
    extra: tuple[TensorTemplate, ...] = ()
    tied_default: bool = False  # transformers' default tie_word_embeddings for this model_type


def _t(name: str, *shape: str, keep_f32: bool = False) -> TensorTemplate:
    return TensorTemplate(f"blk.{{i}}.{name}", shape, keep_f32)


_TOKEN_EMBD = TensorTemplate("token_embd.weight", ("vocab", "hidden"))
_OUTPUT_NORM = TensorTemplate("output_norm.weight", ("hidden",))
_OUTPUT = TensorTemplate("output.weight", ("vocab", "hidden"))
_ROPE_FREQS = TensorTemplate("rope_freqs.weight", ("rope_half",))

_NORMS = (_t("attn_norm.weight", "hidden"), _t("ffn_norm.weight", "hidden"))
_ATTN = (
    *_NORMS,
    _t("attn_q.weight", "q", "hidden"),
    _t("attn_k.weight", "kv", "hidden"),
    _t("attn_v.weight", "kv", "hidden"),
    _t("attn_output.weight", "hidden", "q"),
)
_ATTN_FUSED = (*_NORMS, _t("attn_qkv.weight", "qkv", "hidden"), _t("attn_output.weight", "hidden", "q"))
_QKV_BIAS = (_t("attn_q.bias", "q"), _t("attn_k.bias", "kv"), _t("attn_v.bias", "kv"))
_QK_NORM = (_t("attn_q_norm.weight", "head_dim"), _t("attn_k_norm.weight", "head_dim"))
_POST_NORMS = (_t("post_attention_norm.weight", "hidden"), _t("post_ffw_norm.weight", "hidden"))
_FFN_GLU = (
    _t("ffn_gate.weight", "ffn", "hidden"),
    _t("ffn_up.weight", "ffn", "hidden"),
    _t("ffn_down.weight", "hidden", "ffn"),
)
_FFN_FUSED = (_t("ffn_up.weight", "ffn2", "hidden"), _t("ffn_down.weight", "hidden", "ffn"))
_FFN_MOE = (
    _t("ffn_gate_inp.weight", "experts", "hidden", keep_f32=True),
    _t("ffn_gate_exps.weight", "experts", "expert_ffn", "hidden"),
    _t("ffn_up_exps.weight", "experts", "expert_ffn", "hidden"),
    _t("ffn_down_exps.weight", "experts", "hidden", "expert_ffn"),
)

LAYOUTS: Mapping[str, Layout] = MappingProxyType(
    {
        "llama": Layout("llama", _ATTN, _FFN_GLU),
        "mistral": Layout("llama", _ATTN, _FFN_GLU),
        "mixtral": Layout("llama", _ATTN, _FFN_GLU),
        "qwen2": Layout("qwen2", _ATTN, _FFN_GLU, extra=_QKV_BIAS),
        "qwen3": Layout("qwen3", _ATTN, _FFN_GLU, extra=_QK_NORM),
        "gemma": Layout("gemma", _ATTN, _FFN_GLU, tied_default=True),
        "gemma2": Layout("gemma2", _ATTN, _FFN_GLU, extra=_POST_NORMS, tied_default=True),
        "gemma3": Layout("gemma3", _ATTN, _FFN_GLU, extra=(*_POST_NORMS, *_QK_NORM), tied_default=True),
        "gemma3_text": Layout("gemma3", _ATTN, _FFN_GLU, extra=(*_POST_NORMS, *_QK_NORM), tied_default=True),
        "phi3": Layout("phi3", _ATTN_FUSED, _FFN_FUSED),
    }
)
"""HF ``model_type`` -> tensor layout (GGUF names); unknown types are treated as llama."""

# GGUF general.architecture -> the model_type whose layout describes it.
GGUF_ARCH_TO_MODEL_TYPE: Mapping[str, str] = MappingProxyType(
    {
        "llama": "llama",
        "qwen2": "qwen2",
        "qwen3": "qwen3",
        "gemma": "gemma",
        "gemma2": "gemma2",
        "gemma3": "gemma3",
        "phi3": "phi3",
    }
)


def layout_for(model_type: str) -> Layout:
    return LAYOUTS.get(model_type, LAYOUTS["llama"])


# ------------------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class Preset:
    name: str
    hf_id: str
    aliases: tuple[str, ...]
    config: ModelConfig


@cache
def _load_presets() -> tuple[Preset, ...]:
    out: list[Preset] = []
    folder = resources.files("lowbit.models") / "presets"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        raw = json.loads(entry.read_text(encoding="utf-8"))
        meta = raw.get("_lowbit", {})
        name = entry.name[: -len(".json")]
        cfg = ModelConfig.from_hf_config(raw, name=name, source=str(meta.get("source", "")))
        out.append(Preset(name, str(meta.get("hf_id", "")), tuple(meta.get("aliases", ())), cfg))
    return tuple(out)


def preset_names() -> list[str]:
    return [p.name for p in _load_presets()]


def presets() -> Mapping[str, Preset]:
    return MappingProxyType({p.name: p for p in _load_presets()})


def find_preset(name: str) -> Preset | None:
    """The preset called ``name`` (case-insensitive; its HF id and aliases match too), else None."""
    key = name.strip().lower()
    for p in _load_presets():
        if key in {p.name.lower(), p.hf_id.lower(), *(a.lower() for a in p.aliases)}:
            return p
    return None


def get_preset(name: str) -> ModelConfig:
    """The config of preset ``name``; :class:`ArgumentError` listing the known presets otherwise."""
    p = find_preset(name)
    if p is None:
        raise ArgumentError(f"unknown model preset {name!r}; known presets: {', '.join(preset_names())}")
    return p.config


def load_hf_config(path: Path) -> ModelConfig:
    """A :class:`ModelConfig` from a ``config.json`` file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputFileError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise InputFileError(f"{path} does not hold a JSON object; expected a Hugging Face config.json")
    name = path.parent.name if path.name == "config.json" else path.stem
    return ModelConfig.from_hf_config(raw, name=name, source=str(path))

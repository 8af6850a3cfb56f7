"""Architecture knowledge as data, keyed by Hugging Face ``model_type``.

For each architecture: the linear layers of one transformer block (names as stored in the checkpoint,
relative to the block prefix; ``{e}`` stands for an expert index), the norms, which norm (or linear)
feeds which projections (AWQ and SmoothQuant fold scales into the feeding op), the global tensors,
and the GGUF tensor names. Nothing here is code that branches on an architecture name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType

from lowbit.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class FeedMapping:
    """``source`` (a norm or a linear, relative to the block) feeds the inputs of ``targets``.

    ``kind`` is "norm" (scales fold into the norm's weight) or "linear" (into the source's output rows).
    ``slice_of`` names a fused target where only part of the output rows feed the targets (not foldable).
    """

    source: str
    targets: tuple[str, ...]
    kind: str = "norm"


class NormKind(StrEnum):
    """What a block's norms compute."""

    RMS = "rmsnorm"  # x / rms(x) * γ: no mean subtraction, no bias (commutes with an orthogonal Q once γ = 1)
    LAYER = "layernorm"  # (x - mean(x)) / std(x) * γ + β


_RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    gguf_arch: str
    linears: tuple[str, ...]
    norms: tuple[str, ...]
    mappings: tuple[FeedMapping, ...]
    # Linears that are part of the block but that quantizers leave alone by default (MoE routers).
    keep_linears: tuple[str, ...] = ()
    block_prefix: str = "model.layers.{i}."
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Gemma stores RMSNorm weights as (w - 1): the effective scale is weight + norm_offset.
    norm_offset: float = 0.0
    # llama.cpp permutes q/k rows of llama-family models for its rotary layout (see convert_hf_to_gguf).
    gguf_permute_qk: bool = True
    # HF-relative name (without ".weight") -> GGUF name in block (without "blk.N." and ".weight").
    # Names with "{e}" are stacked into one 3-D GGUF tensor over experts.
    gguf_block_names: Mapping[str, str] = field(default_factory=dict)
    gguf_global_names: Mapping[str, str] = field(default_factory=dict)
    experts_key: str | None = None  # config.json key that holds the expert count
    # What a rotation of the residual stream (QuaRot, SpinQuant) needs to know. The linears fed by a
    # norm (the targets of the "norm" mappings) read the residual stream; these write into it:
    residual_writers: tuple[str, ...] = _RESIDUAL_WRITERS
    norm_kind: NormKind = NormKind.RMS
    # Norms applied to a sub-layer's output before it joins the residual stream (Gemma2/3's post-norms):
    # they normalize a rotated vector by its own scale, which no weight edit can undo.
    output_norms: tuple[str, ...] = ()
    # (value projection, output projection): the value rows of each KV head feed the output columns of
    # the query heads that read it, linearly (attention averages value rows); None where v is fused.
    head_value_out: tuple[str, str] | None = ("self_attn.v_proj", "self_attn.o_proj")

    @property
    def block_regex(self) -> re.Pattern[str]:
        head = re.escape(self.block_prefix).replace(re.escape("{i}"), r"(\d+)")
        return re.compile("^" + head + "(.+)$")

    def split_block_name(self, tensor_name: str) -> tuple[int, str] | None:
        """``model.layers.3.mlp.up_proj.weight`` -> ``(3, "mlp.up_proj.weight")``; None if not in a block."""
        m = self.block_regex.match(tensor_name)
        return (int(m.group(1)), m.group(2)) if m else None

    def linear_pattern(self, relative_module: str) -> str | None:
        """The registry entry (with ``{e}``) a block-relative module name matches, if it is a linear."""
        generic = re.sub(r"\.experts\.\d+\.", ".experts.{e}.", relative_module)
        if generic in self.linears or generic in self.keep_linears:
            return generic
        return None

    def is_quantizable(self, tensor_name: str) -> bool:
        """Whether ``tensor_name`` is the weight of a block linear that quantizers target by default."""
        split = self.split_block_name(tensor_name)
        if split is None or not split[1].endswith(".weight"):
            return False
        generic = self.linear_pattern(split[1][: -len(".weight")])
        return generic is not None and generic in self.linears

    def gguf_name(self, tensor_name: str) -> str | None:
        """GGUF name of a (non-expert) HF tensor, or None where the format has none."""
        base, dot, suffix = tensor_name.rpartition(".")
        split = self.split_block_name(tensor_name)
        if split is None:
            g = self.gguf_global_names.get(base)
            return f"{g}.{suffix}" if g else None
        i, rel = split
        rel_base = rel.rpartition(".")[0]
        g = self.gguf_block_names.get(rel_base)
        return f"blk.{i}.{g}.{suffix}" if g and dot else None


_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_LLAMA_MAPPINGS = (
    FeedMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    FeedMapping("self_attn.v_proj", ("self_attn.o_proj",), kind="linear"),
    FeedMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    FeedMapping("mlp.up_proj", ("mlp.down_proj",), kind="linear"),
)
_LLAMA_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}

_GEMMA_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
_GEMMA_OUTPUT_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")
_GEMMA_MAPPINGS = (
    FeedMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    FeedMapping("self_attn.v_proj", ("self_attn.o_proj",), kind="linear"),
    FeedMapping("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    FeedMapping("mlp.up_proj", ("mlp.down_proj",), kind="linear"),
)
_GEMMA_GGUF = {
    **{k: v for k, v in _LLAMA_GGUF.items() if k != "post_attention_layernorm"},
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}

_ATTN = _LLAMA_LINEARS[:4]
_ATTN_MAPPINGS = _LLAMA_MAPPINGS[:2]

_MIXTRAL_EXPERTS = (
    "block_sparse_moe.experts.{e}.w1",
    "block_sparse_moe.experts.{e}.w3",
    "block_sparse_moe.experts.{e}.w2",
)
_QWEN2MOE_EXPERTS = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")
_QWEN2MOE_SHARED = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")


_LLAMA = Architecture(
    name="llama",
    model_types=("llama",),
    gguf_arch="llama",
    linears=_LLAMA_LINEARS,
    norms=("input_layernorm", "post_attention_layernorm"),
    mappings=_LLAMA_MAPPINGS,
    gguf_block_names=_LLAMA_GGUF,
    gguf_global_names=_GLOBAL_GGUF,
)

# Variants of the llama block: (name, model_types, GGUF architecture, rotary permutation, extra norms).
_LLAMA_LIKE: tuple[tuple[str, tuple[str, ...], str, bool, dict[str, str]], ...] = (
    ("mistral", ("mistral",), "llama", True, {}),
    ("qwen2", ("qwen2",), "qwen2", False, {}),
    ("qwen3", ("qwen3",), "qwen3", False, _QK_NORMS),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    _LLAMA,
    *(
        replace(
            _LLAMA,
            name=name,
            model_types=types,
            gguf_arch=garch,
            gguf_permute_qk=permute,
            norms=(*_LLAMA.norms, *extra),
            gguf_block_names={**_LLAMA_GGUF, **extra},
        )
        for name, types, garch, permute, extra in _LLAMA_LIKE
    ),
    Architecture(
        name="gemma2",
        model_types=("gemma2",),
        gguf_arch="gemma2",
        linears=_LLAMA_LINEARS,
        norms=_GEMMA_NORMS,
        mappings=_GEMMA_MAPPINGS,
        output_norms=_GEMMA_OUTPUT_NORMS,
        norm_offset=1.0,
        gguf_permute_qk=False,
        gguf_block_names=_GEMMA_GGUF,
        gguf_global_names=_GLOBAL_GGUF,
    ),
    Architecture(
        name="gemma3",
        # The text model (Gemma-3 1B and the language part of the larger ones). The multimodal
        # "gemma3" checkpoints nest it under language_model.* and are not registered yet.
        model_types=("gemma3_text",),
        gguf_arch="gemma3",
        linears=_LLAMA_LINEARS,
        norms=(*_GEMMA_NORMS, "self_attn.q_norm", "self_attn.k_norm"),
        mappings=_GEMMA_MAPPINGS,
        output_norms=_GEMMA_OUTPUT_NORMS,
        norm_offset=1.0,
        gguf_permute_qk=False,
        gguf_block_names={**_GEMMA_GGUF, **_QK_NORMS},
        gguf_global_names=_GLOBAL_GGUF,
    ),
    Architecture(
        name="phi3",
        model_types=("phi3",),
        gguf_arch="phi3",
        linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        norms=("input_layernorm", "post_attention_layernorm"),
        # Fused projections: the norm feeds the whole fused linear; v->o and up->down are slices of fused
        # outputs (the fold would have to touch only some rows), so they are not listed.
        mappings=(
            FeedMapping("input_layernorm", ("self_attn.qkv_proj",)),
            FeedMapping("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
        head_value_out=None,  # v is a slice of qkv_proj's rows
        gguf_permute_qk=False,
        gguf_block_names={
            "self_attn.qkv_proj": "attn_qkv",
            "self_attn.o_proj": "attn_output",
            "mlp.gate_up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down",
            "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm",
        },
        gguf_global_names=_GLOBAL_GGUF,
    ),
    Architecture(
        name="mixtral",
        model_types=("mixtral",),
        gguf_arch="llama",
        linears=(*_ATTN, *_MIXTRAL_EXPERTS),
        keep_linears=("block_sparse_moe.gate",),
        norms=("input_layernorm", "post_attention_layernorm"),
        mappings=(
            *_ATTN_MAPPINGS,
            FeedMapping(
                "post_attention_layernorm",
                (
                    "block_sparse_moe.gate",
                    "block_sparse_moe.experts.{e}.w1",
                    "block_sparse_moe.experts.{e}.w3",
                ),
            ),
            FeedMapping(
                "block_sparse_moe.experts.{e}.w3", ("block_sparse_moe.experts.{e}.w2",), kind="linear"
            ),
        ),
        gguf_block_names={
            **{k: v for k, v in _LLAMA_GGUF.items() if not k.startswith("mlp.")},
            "block_sparse_moe.gate": "ffn_gate_inp",
            "block_sparse_moe.experts.{e}.w1": "ffn_gate_exps",
            "block_sparse_moe.experts.{e}.w3": "ffn_up_exps",
            "block_sparse_moe.experts.{e}.w2": "ffn_down_exps",
        },
        gguf_global_names=_GLOBAL_GGUF,
        experts_key="num_local_experts",
        residual_writers=("self_attn.o_proj", "block_sparse_moe.experts.{e}.w2"),
    ),
    Architecture(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        gguf_arch="qwen2moe",
        linears=(*_ATTN, *_QWEN2MOE_EXPERTS, *_QWEN2MOE_SHARED),
        keep_linears=("mlp.gate", "mlp.shared_expert_gate"),
        norms=("input_layernorm", "post_attention_layernorm"),
        mappings=(
            *_ATTN_MAPPINGS,
            FeedMapping(
                "post_attention_layernorm",
                (
                    "mlp.gate",
                    "mlp.shared_expert_gate",
                    "mlp.experts.{e}.gate_proj",
                    "mlp.experts.{e}.up_proj",
                    "mlp.shared_expert.gate_proj",
                    "mlp.shared_expert.up_proj",
                ),
            ),
            FeedMapping("mlp.experts.{e}.up_proj", ("mlp.experts.{e}.down_proj",), kind="linear"),
            FeedMapping("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), kind="linear"),
        ),
        gguf_permute_qk=False,
        gguf_block_names={
            **{k: v for k, v in _LLAMA_GGUF.items() if not k.startswith("mlp.")},
            "mlp.gate": "ffn_gate_inp",
            "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
            "mlp.experts.{e}.gate_proj": "ffn_gate_exps",
            "mlp.experts.{e}.up_proj": "ffn_up_exps",
            "mlp.experts.{e}.down_proj": "ffn_down_exps",
            "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
            "mlp.shared_expert.up_proj": "ffn_up_shexp",
            "mlp.shared_expert.down_proj": "ffn_down_shexp",
        },
        gguf_global_names=_GLOBAL_GGUF,
        experts_key="num_experts",
        residual_writers=("self_attn.o_proj", "mlp.experts.{e}.down_proj", "mlp.shared_expert.down_proj"),
    ),
)


def _index(archs: Iterable[Architecture]) -> Mapping[str, Architecture]:
    table: dict[str, Architecture] = {}
    for arch in archs:
        for mt in arch.model_types:
            if mt in table:
                raise ValueError(f"model_type {mt!r} registered twice")
            table[mt] = arch
    return MappingProxyType(table)


REGISTRY: Mapping[str, Architecture] = _index(ARCHITECTURES)

# GGUF general.architecture -> HF model_type, for reading GGUF files (llama covers mistral/mixtral layouts).
GGUF_TO_MODEL_TYPE: Mapping[str, str] = MappingProxyType(
    {
        "llama": "llama",
        "qwen2": "qwen2",
        "qwen3": "qwen3",
        "gemma2": "gemma2",
        "gemma3": "gemma3_text",
        "phi3": "phi3",
        "qwen2moe": "qwen2_moe",
    }
)


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def get_architecture(model_type: str | None) -> Architecture:
    """The registry entry for ``model_type``; a one-line error naming the supported ones otherwise."""
    arch = REGISTRY.get(model_type or "")
    if arch is None:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    return arch

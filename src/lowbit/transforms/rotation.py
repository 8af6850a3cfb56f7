"""Rotations that fold into the weights (QuaRot / SpinQuant's offline rotations): output-preserving.

With row vectors and ``nn.Linear``'s ``y = x Wᵀ`` (``W`` (out, in)), an orthogonal ``Q`` (hidden, hidden)
applied to the residual stream ``h -> h Q`` leaves the model's logits unchanged when:

* every norm that feeds linears is folded into them first (``W -> W diag(γ)``, ``γ -> 1``): RMSNorm
  without a scale commutes with ``Q`` because ``‖x Q‖ = ‖x‖``;
* the embeddings become ``E Q`` and every linear that reads the normalized stream ``W -> W Q``
  (q/k/v, gate/up, MoE routers and experts: the targets of the architecture's "norm" mappings);
* every linear that writes into the stream ``W -> Qᵀ W`` and its bias ``b -> Qᵀ b`` (o_proj, down_proj:
  ``Architecture.residual_writers``);
* lm_head, after the final norm is folded into it, ``W -> W diag(γ) Q``. lm_head then differs from the
  embeddings: a tied model comes back untied.

Independently, per attention head: value rows of KV head ``k`` ``W_v[k] -> H_kᵀ W_v[k]`` (and its bias)
and the output columns of every query head ``j`` that reads KV head ``k = j // (n_heads / n_kv_heads)``
``W_o[:, j] -> W_o[:, j] H_k``: attention mixes the value rows of one head linearly, so the head's output
is rotated by ``H_k`` and o_proj undoes it.

The rotated model is a plain model of the same architecture (any runtime loads it) whose weights have
fewer outliers, so it quantizes better. Arithmetic is float64; results are float32 (rotated weights
are not representable in a 16-bit float).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import ArgumentError, ShapeError, UnsupportedArchitectureError
from lowbit.models.registry import Architecture, NormKind
from lowbit.transforms.hadamard import RotationKind, orthogonal
from lowbit.transforms.scaling import expand_mapping, expert_indices

log = logging.getLogger(__name__)

_EXPERT = "{e}"


@dataclass(frozen=True)
class RotationConfig:
    """Which rotations to apply, and how the matrices are drawn.

    ``residual``: one ``(hidden, hidden)`` rotation of the residual stream (norms folded, untied lm_head).
    ``heads``: one ``(head_dim, head_dim)`` rotation per KV head of the value/output projections.
    """

    kind: RotationKind = RotationKind.HADAMARD
    seed: int = 0
    residual: bool = True
    heads: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.kind, RotationKind):
            try:
                object.__setattr__(self, "kind", RotationKind(self.kind))
            except ValueError:
                kinds = ", ".join(k.value for k in RotationKind)
                raise ArgumentError(f"unknown rotation {self.kind!r}; choose one of: {kinds}") from None
        if not (self.residual or self.heads):
            raise ArgumentError("a rotation needs residual=True or heads=True (or both)")


@dataclass(frozen=True)
class HeadLayout:
    """The attention heads of a model, from its config."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HeadLayout:
        """From a Hugging Face config (``head_dim`` defaults to hidden_size / num_attention_heads)."""
        hidden = int(config["hidden_size"])
        n_heads = int(config["num_attention_heads"])
        n_kv = int(config.get("num_key_value_heads") or n_heads)
        head_dim = int(config.get("head_dim") or hidden // n_heads)
        if n_heads % n_kv:
            raise ShapeError(f"{n_heads} attention heads do not divide into {n_kv} KV heads")
        return cls(n_heads, n_kv, head_dim)

    def kv_head_of(self) -> torch.Tensor:
        """``(n_heads,)`` int64: the KV head each query head reads (transformers' ``repeat_kv`` order)."""
        return torch.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)


@dataclass(frozen=True, eq=False)
class Rotations:
    """The matrices of one rotated model, float64.

    ``residual``: ``(hidden, hidden)`` orthogonal, or None. ``heads``: ``(n_kv_heads, head_dim,
    head_dim)``, one orthogonal matrix per KV head, or None.
    """

    layout: HeadLayout
    residual: torch.Tensor | None
    heads: torch.Tensor | None


def sub_seed(seed: int, *tags: object) -> int:
    """A 63-bit seed for one matrix, derived from the user's ``seed`` and what the matrix is for (so each
    matrix is reproducible on its own, whatever else is drawn)."""
    digest = hashlib.sha256(repr((seed, *tags)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_rotations(config: RotationConfig, hidden: int, layout: HeadLayout) -> Rotations:
    """The matrices ``config`` asks for, for a model of width ``hidden`` with heads ``layout``."""
    residual = orthogonal(hidden, config.kind, sub_seed(config.seed, "residual")) if config.residual else None
    heads = None
    if config.heads:
        heads = torch.stack(
            [
                orthogonal(layout.head_dim, config.kind, sub_seed(config.seed, "kv-head", k))
                for k in range(layout.n_kv_heads)
            ]
        )
    return Rotations(layout, residual, heads)


# ------------------------------------------------------------------------------------ what can rotate
def check_rotatable(arch: Architecture, residual: bool = True) -> None:
    """Raise :class:`UnsupportedArchitectureError` if ``arch``'s residual stream cannot be rotated by
    editing weights (``residual``; the per-head rotation needs nothing of the norms)."""
    if not residual:
        return
    if arch.norm_kind is not NormKind.RMS:
        raise UnsupportedArchitectureError(
            f"{arch.name} uses {arch.norm_kind.value}, which does not commute with a rotation; "
            "quantize it without rotation"
        )
    if arch.output_norms:
        raise UnsupportedArchitectureError(
            f"{arch.name} normalizes each sub-layer's output ({arch.output_norms[0]}) before adding it to "
            "the residual stream; that norm cannot be folded into a rotation: quantize it without rotation"
        )


def _expand(pattern: str, names: Iterable[str]) -> list[str]:
    """Concrete module names of ``pattern`` (``{e}`` over the experts present) whose weight is in ``names``."""
    names = list(names)
    if _EXPERT in pattern:
        return [pattern.format(e=e) for e in expert_indices(pattern, names)]
    return [pattern] if f"{pattern}.weight" in names else []


def _fold_norms(w: dict[str, torch.Tensor], arch: Architecture, names: list[str]) -> list[str]:
    """Fold each feeding norm's γ into the input columns of its targets (γ -> 1, in place on the float64
    dict ``w``); returns the targets (the linears that read the residual stream)."""
    readers: list[str] = []
    for generic in arch.mappings:
        if generic.kind != "norm":
            continue
        for m in expand_mapping(generic, names):
            if f"{m.source}.bias" in w:
                raise UnsupportedArchitectureError(
                    f"{arch.name}'s {m.source} has a bias, which a rotation cannot fold; "
                    "quantize it without rotation"
                )
            key = f"{m.source}.weight"
            gamma = w[key] + arch.norm_offset
            for t in m.targets:
                w[f"{t}.weight"] = w[f"{t}.weight"] * gamma[None, :]
            w[key] = torch.full_like(w[key], 1.0 - arch.norm_offset)
            readers.extend(m.targets)
    return readers


def _rotate_residual(
    w: dict[str, torch.Tensor], arch: Architecture, names: list[str], q: torch.Tensor
) -> None:
    """Norms folded, readers ``W Q``, writers ``Qᵀ W`` (and ``Qᵀ b``), in place on the float64 dict."""
    hidden = q.shape[0]
    sources = {m.source for m in arch.mappings if m.kind == "norm"}
    for n in arch.norms:
        # a norm of the residual width that feeds nothing the registry names would keep its γ on a
        # rotated vector (q/k norms act on head_dim and are left alone)
        key = f"{n}.weight"
        if n not in sources and key in w and w[key].shape == (hidden,):
            raise UnsupportedArchitectureError(
                f"{arch.name}: the registry says of no linear that {n} feeds it, so it cannot be folded "
                "into a rotation; quantize it without rotation"
            )
    readers = _fold_norms(w, arch, names)
    writers = [c for p in arch.residual_writers for c in _expand(p, names)]
    linears = {n[: -len(".weight")] for n in names if n.endswith(".weight")}
    linears = {n for n in linears if arch.linear_pattern(n) is not None}
    stray = sorted(linears - set(readers) - set(writers))
    if stray:
        raise UnsupportedArchitectureError(
            f"{arch.name}: {stray[0]} neither reads a norm's output nor writes the residual stream in the "
            "registry, so it cannot be rotated; quantize it without rotation"
        )
    for t in readers:
        w[f"{t}.weight"] = w[f"{t}.weight"] @ q
    for t in writers:
        w[f"{t}.weight"] = q.T @ w[f"{t}.weight"]
        if f"{t}.bias" in w:
            w[f"{t}.bias"] = q.T @ w[f"{t}.bias"]


def _rotate_heads(w: dict[str, torch.Tensor], arch: Architecture, rot: Rotations) -> None:
    """Per-KV-head rotation of the value rows and the matching output columns, in place (float64)."""
    assert rot.heads is not None and arch.head_value_out is not None
    v, o = arch.head_value_out
    lay = rot.layout
    hd = lay.head_dim
    wv, wo = w[f"{v}.weight"], w[f"{o}.weight"]
    if wv.shape[0] != lay.n_kv_heads * hd or wo.shape[1] != lay.n_heads * hd:
        raise ShapeError(
            f"{v} has {wv.shape[0]} rows and {o} {wo.shape[1]} columns; the config's "
            f"{lay.n_kv_heads} KV heads / {lay.n_heads} heads of {hd} do not fit them"
        )
    h = rot.heads  # (n_kv, hd, hd)
    # (n_kv, hd, in): rows of KV head k -> H_kᵀ rows
    w[f"{v}.weight"] = torch.einsum("kji,kjc->kic", h, wv.reshape(lay.n_kv_heads, hd, -1)).reshape(wv.shape)
    if f"{v}.bias" in w:
        bv = w[f"{v}.bias"].reshape(lay.n_kv_heads, hd)
        w[f"{v}.bias"] = torch.einsum("kji,kj->ki", h, bv).reshape(-1)
    # (out, n_heads, hd): columns of query head q -> columns · H_{kv(q)}
    per_query = h[lay.kv_head_of()]  # (n_heads, hd, hd)
    wo3 = wo.reshape(wo.shape[0], lay.n_heads, hd)
    w[f"{o}.weight"] = torch.einsum("oqj,qji->oqi", wo3, per_query).reshape(wo.shape)


def _as_float64(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in weights.items()}


def _as_float32(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float().contiguous() if v.is_floating_point() else v for k, v in weights.items()}


def rotate_block(
    weights: Mapping[str, torch.Tensor], arch: Architecture, rot: Rotations
) -> dict[str, torch.Tensor]:
    """Every tensor of one block (block-relative names, with ``.weight``/``.bias``), rotated as
    ``rot`` says; float tensors come back float32. The block's output, for an input rotated by
    ``rot.residual``, is the original output rotated by it too."""
    check_rotatable(arch, rot.residual is not None)
    names = list(weights)
    w = _as_float64(weights)
    if rot.residual is not None:
        _rotate_residual(w, arch, names, rot.residual)
    if rot.heads is not None:
        if arch.head_value_out is None:
            log.debug("%s has no separate value projection: heads are not rotated", arch.name)
        else:
            _rotate_heads(w, arch, rot)
    return _as_float32(w)


# ------------------------------------------------------------------------------------ globals
def rotate_embedding(embed: torch.Tensor, rot: Rotations) -> torch.Tensor:
    """Token embeddings ``(vocab, hidden)`` -> ``E Q`` float32."""
    if rot.residual is None:
        return embed.float()
    return (embed.double() @ rot.residual).float()


def rotate_final_norm(gamma: torch.Tensor, arch: Architecture, rot: Rotations) -> torch.Tensor:
    """The final norm ``(hidden,)``: folded into lm_head, so its effective scale becomes 1."""
    if rot.residual is None:
        return gamma.float()
    return torch.full_like(gamma, 1.0 - arch.norm_offset, dtype=torch.float32)


def rotate_lm_head(
    lm_head: torch.Tensor, final_norm: torch.Tensor, arch: Architecture, rot: Rotations
) -> torch.Tensor:
    """lm_head ``(vocab, hidden)`` (the embeddings, for a tied model) with the final norm's scale
    ``(hidden,)`` folded in and rotated: ``W diag(γ) Q`` float32."""
    if rot.residual is None:
        return lm_head.float()
    gamma = final_norm.double() + arch.norm_offset
    return ((lm_head.double() * gamma[None, :]) @ rot.residual).float()


def unties(rot: Rotations) -> bool:
    """Whether rotating with ``rot`` makes lm_head differ from the embeddings."""
    return rot.residual is not None


def rotate_globals(
    weights: Mapping[str, torch.Tensor], arch: Architecture, rot: Rotations, tied: bool
) -> dict[str, torch.Tensor]:
    """The global tensors (embeddings, final norm, lm_head; full names with ``.weight``) rotated; a
    ``tied`` model (no lm_head in ``weights``) gets an lm_head when :func:`unties`. Other globals pass
    through (as float32)."""
    check_rotatable(arch, rot.residual is not None)
    embed, norm, head = (f"{n}.weight" for n in (arch.embed, arch.final_norm, arch.lm_head))
    out = _as_float32(weights)
    if embed in weights:
        out[embed] = rotate_embedding(weights[embed], rot)
    if norm in weights:
        out[norm] = rotate_final_norm(weights[norm], arch, rot)
        source = weights.get(head, weights[embed] if tied and embed in weights else None)
        if source is not None and (head in weights or unties(rot)):
            out[head] = rotate_lm_head(source, weights[norm], arch, rot)
    return out

"""Per-channel scale folding: an output-preserving weight edit (AWQ, SmoothQuant).

A :class:`~lowbit.models.registry.FeedMapping` says that ``source`` produces the input of ``targets``.
For a vector ``s`` (in_features,) of positive scales, dividing the source's output channels by ``s`` and
multiplying the targets' input columns by ``s`` leaves every target's output unchanged::

    y = W x = (W diag(s)) (diag(s)⁻¹ x)

* kind ``"norm"``: the norm's *effective* scale ``γ = weight + offset`` becomes ``γ / s``; Gemma stores
  ``weight = γ - 1`` (``Architecture.norm_offset = 1``), so the stored weight becomes
  ``(weight + offset) / s - offset``. A norm bias (LayerNorm) is divided by ``s`` too.
* kind ``"linear"``: the source linear's output rows (and bias) are divided by ``s``; this is exact when
  nothing non-linear sits between source and targets (v_proj → o_proj through the attention average,
  up_proj → down_proj through the elementwise product with act(gate_proj)).

Mappings written with ``{e}`` (MoE experts) are instantiated for each expert index present in the
weights by :func:`expand_mapping`. Everything here is a pure function of a dict of tensors: nothing is
edited in place.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch

from lowbit.errors import ShapeError
from lowbit.models.registry import FeedMapping

_EXPERT = "{e}"


def _expert_regex(pattern: str) -> re.Pattern[str]:
    head, _, tail = pattern.partition(_EXPERT)
    return re.compile("^" + re.escape(head) + r"(\d+)" + re.escape(tail) + r"\.weight$")


def expert_indices(pattern: str, names: Iterable[str]) -> list[int]:
    """Sorted expert indices ``e`` for which ``pattern.format(e=e) + ".weight"`` is among ``names``."""
    rx = _expert_regex(pattern)
    return sorted({int(m.group(1)) for n in names if (m := rx.match(n))})


def input_key(mapping: FeedMapping, target: str) -> str:
    """The calibration key of ``target``'s input, given that ``mapping`` feeds it: the targets of a norm
    share one input, keyed by the norm's name; a linear source (up → down, v → o) feeds each target
    separately, keyed by the target's own name. The walk's statistics and the block methods that look
    them up (AWQ, SmoothQuant) use this one rule."""
    return mapping.source if mapping.kind == "norm" else target


def input_keys(mappings: Iterable[FeedMapping], linears: Iterable[str]) -> dict[str, str]:
    """Block-relative linear name -> the key of its input (:func:`input_key`): linears fed by the same
    norm share one key; every other linear (or an unexpanded ``{e}`` pattern's experts) is its own."""
    keys = {lin: lin for lin in linears}
    for m in mappings:
        for t in m.targets:
            if t in keys:
                keys[t] = input_key(m, t)
    return keys


def expand_mapping(mapping: FeedMapping, names: Iterable[str]) -> list[FeedMapping]:
    """Concrete mappings (no ``{e}``) of ``mapping`` over the tensors ``names`` (block-relative,
    with ``.weight``).

    A source with ``{e}`` (an expert's up_proj → its down_proj) gives one mapping per expert present;
    a norm feeding ``{e}`` targets (and perhaps a router) gives one mapping whose targets list every
    expert present. Targets absent from ``names`` are dropped; a mapping whose source or every target is
    absent gives nothing.
    """
    names = list(names)
    present = set(names)

    def targets_for(e: int | None) -> tuple[str, ...]:
        out: list[str] = []
        for t in mapping.targets:
            if _EXPERT in t:
                idx = [e] if e is not None else expert_indices(t, names)
                out.extend(t.format(e=i) for i in idx)
            else:
                out.append(t)
        return tuple(t for t in out if f"{t}.weight" in present)

    if _EXPERT in mapping.source:
        result = []
        for e in expert_indices(mapping.source, names):
            targets = targets_for(e)
            if targets:
                result.append(replace(mapping, source=mapping.source.format(e=e), targets=targets))
        return result
    targets = targets_for(None)
    if f"{mapping.source}.weight" not in present or not targets:
        return []
    return [replace(mapping, targets=targets)]


def scaled_width(weights: Mapping[str, torch.Tensor], mapping: FeedMapping) -> int | None:
    """The number of channels a concrete ``mapping`` scales, or None when the shapes do not allow a fold
    (e.g. v_proj → o_proj under grouped-query attention, where v_proj has fewer output rows than o_proj
    has input columns: one v row feeds several heads' columns)."""
    src = weights[f"{mapping.source}.weight"]
    width = src.shape[0]  # a norm's (hidden,) or a linear's (out, in): both channels along dim 0
    if mapping.kind == "norm" and src.ndim != 1:
        return None
    if mapping.kind == "linear" and src.ndim != 2:
        return None
    for t in mapping.targets:
        w = weights[f"{t}.weight"]
        if w.ndim != 2 or w.shape[1] != width:
            return None
    return width


def fold_norm(weight: torch.Tensor, scales: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """Stored norm weight ``(hidden,)`` whose effective scale ``weight + offset`` is divided by ``scales``."""
    w = weight.double()
    return ((w + offset) / scales.double() - offset).to(weight.dtype)


def scale_rows(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``diag(scales)⁻¹ · weight``: output rows ``(out, ...)`` divided by ``scales`` ``(out,)``."""
    s = scales.double().reshape(-1, *([1] * (weight.ndim - 1)))
    return (weight.double() / s).to(weight.dtype)


def scale_columns(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``weight · diag(scales)``: input columns of ``weight`` ``(out, in)`` multiplied by ``scales`` ``(in,)``."""
    return (weight.double() * scales.double()[None, :]).to(weight.dtype)


def fold_scales(
    weights: Mapping[str, torch.Tensor],
    mapping: FeedMapping,
    scales: torch.Tensor,
    norm_offset: float = 0.0,
) -> dict[str, torch.Tensor]:
    """New weights (every name of ``weights``) with ``scales`` ``(channels,)`` folded into the concrete
    ``mapping`` (see :func:`expand_mapping`): the source's output channels divided by ``scales``, the
    targets' input columns multiplied by it. The targets' outputs are unchanged up to rounding.

    ``norm_offset``: the architecture's ``norm_offset`` (1 for Gemma's ``weight + 1`` RMSNorm).
    The arithmetic is done in float64 and cast back to each tensor's dtype.
    """
    if _EXPERT in mapping.source or any(_EXPERT in t for t in mapping.targets):
        raise ValueError(f"fold_scales takes a concrete mapping; expand {mapping} first")
    width = scaled_width(weights, mapping)
    if width is None:
        raise ShapeError(
            f"cannot fold scales from {mapping.source} into {', '.join(mapping.targets)}: shapes differ"
        )
    if tuple(scales.shape) != (width,):
        raise ShapeError(f"{mapping.source} has {width} channels; got scales of shape {tuple(scales.shape)}")
    if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        raise ValueError("scales must be finite and positive")
    out = dict(weights)
    src_w = f"{mapping.source}.weight"
    if mapping.kind == "norm":
        out[src_w] = fold_norm(weights[src_w], scales, norm_offset)
    elif mapping.kind == "linear":
        out[src_w] = scale_rows(weights[src_w], scales)
    else:
        raise ValueError(f"unknown mapping kind {mapping.kind!r}")
    bias = f"{mapping.source}.bias"
    if bias in weights:
        out[bias] = scale_rows(weights[bias], scales)
    for t in mapping.targets:
        out[f"{t}.weight"] = scale_columns(weights[f"{t}.weight"], scales)
    return out

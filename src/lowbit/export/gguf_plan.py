"""What each tensor of a GGUF output becomes: llama-quantize's per-tensor types for a mix, the importance
vector each quantized tensor is given, and the checks that run before a byte is written.

The rules of the mixes are data in :mod:`lowbit.formats.gguf.mixes`; this module applies them to a
model's tensors (:class:`~lowbit.walk.gguf_inputs.TensorInput`) and looks up importance matrices as
llama-quantize does (by GGUF name; a size mismatch is an error except for ``token_embd``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from lowbit.calib.imatrix import Imatrix
from lowbit.errors import InputFileError, SchemeError
from lowbit.formats.gguf.mixes import (
    Category,
    ModelInfo,
    TensorSpec,
    TypeOverride,
    allows_quantization,
    category_of,
    requires_imatrix,
    tensor_types,
)
from lowbit.formats.gguf.types import is_quantized
from lowbit.walk.gguf_inputs import PLAIN_FLOATS, TensorInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImatrixUse:
    """The importance vectors for one run, and what the ``quantize.imatrix.*`` keys record."""

    vector: Callable[[str], np.ndarray | None]  # GGUF name -> float32 (n_per_row * n_mat,) or None
    n_entries: int
    file: str | None
    dataset: str | None
    chunk_count: int


def imatrix_use(imatrix: Imatrix | Mapping[str, np.ndarray] | None, file: str | None) -> ImatrixUse | None:
    if imatrix is None:
        return None
    if isinstance(imatrix, Imatrix):
        if not imatrix.legacy and not imatrix.has_metadata:
            raise InputFileError(
                f"the importance matrix {file or ''} lacks the imatrix.* metadata keys, which llama-quantize "
                "requires; recompute it with llama-imatrix or lowbit"
            )
        im = imatrix

        def vector(name: str) -> np.ndarray | None:
            return im.importance(name) if name in im else None

        return ImatrixUse(vector, len(im), file, im.datasets[0] if im.datasets else None, int(im.chunk_count))
    table = {k: np.asarray(v, dtype=np.float32).reshape(-1) for k, v in imatrix.items()}
    return ImatrixUse(table.get, len(table), file, None, 0)


def assign_types(
    mix: str,
    items: list[TensorInput],
    model: ModelInfo,
    has_imatrix: bool,
    overrides: Sequence[TypeOverride] = (),
) -> list[TensorInput]:
    """``items`` with the type llama-quantize's mix ``mix`` (and its ``--tensor-type`` ``overrides``)
    gives each (``dst_type``). An override that matches no quantized tensor is an error: a typo would
    otherwise write the mix unchanged."""
    specs = [TensorSpec(it.name, it.shape, it.src_type) for it in items]
    chosen = tensor_types(mix, specs, model, imatrix=has_imatrix, overrides=overrides)
    for o in overrides:
        if not any(o.matches(it.name) and allows_quantization(it.name, it.shape) for it in items):
            raise SchemeError(f"--tensor-type {o.pattern}={o.type.name.lower()} matches no quantized tensor")
    return [replace(it, dst_type=chosen[it.name]) for it in items]


def check_plan(
    mix: str,
    items: Sequence[TensorInput],
    imatrix: ImatrixUse | None,
    calibrated: frozenset[str] = frozenset(),
) -> None:
    """Everything that can fail before a byte is written: missing codecs, missing importance vectors.
    ``calibrated``: tensors whose importance comes from the run's own calibration (not from ``imatrix``)."""
    from lowbit.formats.gguf.block import get_codec

    for it in items:
        if it.dst_type == it.src_type and it.raw is not None:
            continue
        if is_quantized(it.dst_type):
            get_codec(it.dst_type)  # SchemeError naming the type lowbit has no codec for
        if it.name in calibrated:
            continue
        if allows_quantization(it.name, it.shape) and requires_imatrix(mix, it.name, it.dst_type):
            if imatrix is None:
                raise SchemeError(
                    f"{mix} needs an importance matrix ({it.name} becomes {it.dst_type.name}); "
                    "pass --imatrix FILE made by llama-imatrix, as llama-quantize requires"
                )
            if imatrix.vector(it.name) is None:
                raise SchemeError(
                    f"the importance matrix has no entry for {it.name}, which {mix} makes "
                    f"{it.dst_type.name}; it was computed for another model"
                )


def importance_for(item: TensorInput, imatrix: ImatrixUse | None) -> np.ndarray | None:
    """llama-quantize's lookup: by tensor name; a size mismatch is an error except for token_embd."""
    if imatrix is None or item.src_type == item.dst_type or item.dst_type in PLAIN_FLOATS:
        return None
    v = imatrix.vector(item.name)
    if v is None:
        # llama-imatrix never collects token_embd (nor output.weight without --process-output)
        never = category_of(item.name) in (Category.TOKEN_EMBD, Category.OUTPUT)
        log.log(logging.DEBUG if never else logging.INFO, "no importance vector for %s", item.name)
        return None
    n_mat = math.prod(item.shape[:-2]) if len(item.shape) > 2 else 1
    want = item.ne0 * n_mat
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    if v.size != want:
        if category_of(item.name) == Category.TOKEN_EMBD:
            return None
        raise InputFileError(
            f"the importance matrix has {v.size} values for {item.name}, which needs {want}; "
            "it was computed for another model"
        )
    if not np.isfinite(v).all():
        raise InputFileError(f"the importance matrix holds NaN/Inf values for {item.name}; recompute it")
    return v

"""A rotated model, presented lazily: any :class:`ModelSource` seen through QuaRot-style rotations.

``RotatedSource(source, RotationConfig(...))`` is an ordinary :class:`ModelSource` whose tensors are
those of the rotated model (see :mod:`lowbit.transforms.rotation`): reading a tensor of block ``i``
rotates block ``i`` (its tensors are cached until other groups push it out: at most ``cached_groups``
blocks or global tensors are held), reading a global rotates that one tensor. So every method (RTN,
GPTQ, AWQ) and every writer downstream sees a plain float32 model of the same architecture, one block
at a time.

A residual rotation folds the final norm into lm_head, so lm_head no longer equals the embeddings: a
model with tied embeddings comes back untied (``lm_head.weight`` among the names,
``tie_word_embeddings: false`` in ``config``).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

from lowbit.errors import ArgumentError, InputFileError
from lowbit.transforms.hadamard import describe
from lowbit.transforms.rotation import (
    HeadLayout,
    RotationConfig,
    check_rotatable,
    make_rotations,
    rotate_block,
    rotate_embedding,
    rotate_final_norm,
    rotate_lm_head,
    unties,
)
from lowbit.walk.sources import ModelSource, TensorInfo

log = logging.getLogger(__name__)

# Stored types that are not floats: such tensors pass through as they are.
_NON_FLOAT_STORAGE = frozenset({"I64", "I32", "I16", "I8", "U8", "BOOL"})


class RotatedSource(ModelSource):
    """``inner`` rotated as ``rotation`` says (default: randomized Hadamard, seed 0, residual stream
    and per-head value/output). Float tensors read as float32."""

    def __init__(
        self, inner: ModelSource, rotation: RotationConfig | None = None, cached_groups: int = 2
    ) -> None:
        self.inner = inner
        self.rotation = rotation or RotationConfig()
        self.path = inner.path
        self.arch = inner.arch
        check_rotatable(self.arch, self.rotation.residual)
        if inner.activations:
            raise ArgumentError(
                f"{inner.path} quantizes activations at run time; rotate the float model it came from"
            )
        cfg = inner.config
        hidden = int(cfg["hidden_size"])
        layout = HeadLayout.from_config(cfg)
        self.rotations = make_rotations(self.rotation, hidden, layout)
        self._cached_groups = max(1, cached_groups)
        self._cache: OrderedDict[Hashable, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

        self._inner_names = inner.names()
        self._block_names: dict[int, tuple[str, ...]] = {}
        self._block_of: dict[str, tuple[int, str]] = {}
        for grp in inner.blocks():
            if grp.index is None:
                continue
            prefix = self.arch.block_prefix.format(i=grp.index)
            self._block_names[grp.index] = grp.names
            for n in grp.names:
                self._block_of[n] = (grp.index, n[len(prefix) :])
        self._embed = f"{self.arch.embed}.weight"
        self._norm = f"{self.arch.final_norm}.weight"
        self._head = f"{self.arch.lm_head}.weight"
        self._present = frozenset(self._inner_names)
        self._adds_head = (
            unties(self.rotations) and self._head not in self._present and self._embed in self._present
        )

        self.config = dict(cfg)
        self.config.pop("torch_dtype", None)
        self.config["dtype"] = "float32"
        if unties(self.rotations):
            self.config["tie_word_embeddings"] = False
        log.info(
            "rotating %s (seed %d): residual stream %s, value/output heads %s",
            inner.path,
            self.rotation.seed,
            describe(hidden, self.rotation.kind) if self.rotation.residual else "not rotated",
            (
                f"{layout.n_kv_heads} × {describe(layout.head_dim, self.rotation.kind)}"
                if self.rotation.heads and self.arch.head_value_out is not None
                else "not rotated"
            ),
        )
        if self._adds_head:
            shape = inner.info(self._embed).shape
            log.info(
                "the rotated model has its own lm_head %s (the final norm folds into it, not into the "
                "embeddings): tie_word_embeddings becomes false, +%.1f MB in float32",
                tuple(shape),
                shape[0] * shape[1] * 4 / 1e6,
            )

    # ------------------------------------------------------------------ ModelSource
    def names(self) -> list[str]:
        return [*self._inner_names, self._head] if self._adds_head else list(self._inner_names)

    def info(self, name: str) -> TensorInfo:
        if name == self._head and self._adds_head:
            shape = self.inner.info(self._embed).shape
        else:
            inner = self._inner_info(name)
            if inner.storage in _NON_FLOAT_STORAGE:
                return inner
            shape = inner.shape
        return TensorInfo(name, tuple(shape), "F32", 4 * math.prod(shape))

    def read(self, name: str) -> torch.Tensor:
        where = self._block_of.get(name)
        if where is not None:
            i, rel = where
            return self._cached(i, lambda: self._rotated_block(i))[rel]
        if name == self._head and (self._adds_head or name in self._present):
            return self._cached(name, self._rotated_head)[name]
        if name == self._embed:
            return self._cached(name, self._rotated_embedding)[name]
        if name == self._norm:
            return rotate_final_norm(self.inner.read(name), self.arch, self.rotations)
        self._inner_info(name)  # a one-line error for a name the model does not have
        t = self.inner.read(name)
        return t.float() if t.is_floating_point() else t

    def tokenizer(self) -> Any:
        return self.inner.tokenizer()

    def _load_tokenizer(self) -> Any:
        return self.inner.tokenizer()

    @property
    def format_name(self) -> str:
        return f"rotated {self.inner.format_name}"

    @property
    def origin(self) -> ModelSource:
        return self.inner.origin

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
        self.inner.close()

    # ------------------------------------------------------------------ rotation, one group at a time
    def _inner_info(self, name: str) -> TensorInfo:
        if name not in self._present:
            raise InputFileError(f"tensor {name!r} is not in {self.path}")
        return self.inner.info(name)

    def _cached(
        self, key: Hashable, compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The tensors of group ``key``, computed once while it stays among the last groups used.
        Serialized: writers read tensors from several threads."""
        with self._lock:
            group = self._cache.get(key)
            if group is None:
                group = compute()
                self._cache[key] = group
                while len(self._cache) > self._cached_groups:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            return group

    def _rotated_block(self, i: int) -> dict[str, torch.Tensor]:
        prefix = self.arch.block_prefix.format(i=i)
        weights = {n[len(prefix) :]: self.inner.read(n) for n in self._block_names[i]}
        return rotate_block(weights, self.arch, self.rotations)

    def _rotated_embedding(self) -> dict[str, torch.Tensor]:
        return {self._embed: rotate_embedding(self.inner.read(self._embed), self.rotations)}

    def _rotated_head(self) -> dict[str, torch.Tensor]:
        source = self._embed if self._adds_head else self._head
        w = rotate_lm_head(self.inner.read(source), self.inner.read(self._norm), self.arch, self.rotations)
        return {self._head: w}

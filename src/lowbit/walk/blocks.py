"""Run a model one transformer block at a time, for calibration.

Only one block's weights are materialized at once: the architecture's own ``transformers`` decoder-layer
class is instantiated for block ``i`` and loaded with that block's tensors from the source, so
calibration runs the exact same math as ``transformers`` without holding the model in memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.errors import InputFileError
from lowbit.walk.sources import ModelSource
from lowbit.walk.torch_model import hf_config

log = logging.getLogger(__name__)

# Architectures whose models multiply the token embeddings by sqrt(hidden_size) before block 0.
_SQRT_HIDDEN_EMBED_SCALE = frozenset({"gemma2", "gemma3_text"})


class BlockRunner:
    """Embeddings, rotary tables and one decoder layer at a time, from a :class:`ModelSource`."""

    def __init__(self, source: ModelSource, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM

        self.source = source
        self.dtype = dtype
        self.config = hf_config(source)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.config)
        base = skeleton.model
        self._layer_cls = type(base.layers[0])
        self._rotary = type(base.rotary_emb)(config=self.config) if hasattr(base, "rotary_emb") else None
        self._embed_scale = (
            math.sqrt(self.config.hidden_size)
            if source.config.get("model_type") in _SQRT_HIDDEN_EMBED_SCALE
            else 1.0
        )
        self.num_layers = int(self.config.num_hidden_layers)

    def embed(self, ids: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T)`` token ids -> ``(B, T, hidden)`` inputs of block 0; ``weight``: the embedding table to
        use instead of the source's (a quantized one)."""
        w = weight if weight is not None else self.source.read(f"{self.source.arch.embed}.weight")
        h = F.embedding(ids, w.to(self.dtype))
        if self._embed_scale != 1.0:
            h = h * torch.tensor(self._embed_scale, dtype=self.dtype)
        return h

    def position_embeddings(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary ``(cos, sin)`` for ``hidden`` (B, T, hidden), in ``hidden``'s dtype (computed in
        float32 and rounded, as transformers does)."""
        if self._rotary is None:
            return None
        pos = torch.arange(hidden.shape[1])[None]
        cos, sin = self._rotary(hidden, pos)
        return cos, sin

    def block_weights(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s tensors by their name relative to the block prefix."""
        prefix = self.source.arch.block_prefix.format(i=i)
        return {n[len(prefix) :]: self.source.read(n) for n in self.source.names() if n.startswith(prefix)}

    def layer(
        self, i: int, weights: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
    ) -> torch.nn.Module:
        """Decoder layer ``i`` with ``weights`` (block-relative names), in eval mode, in ``dtype``
        (default: the runner's)."""
        dtype = dtype or self.dtype
        layer = self._layer_cls(self.config, layer_idx=i)
        missing, unexpected = layer.load_state_dict(
            {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}, strict=False
        )
        if missing or unexpected:
            raise InputFileError(
                f"block {i} of {self.source.path} does not fit {self._layer_cls.__name__} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return layer.to(dtype).requires_grad_(False).eval()

    def layer_forward(
        self,
        layer: torch.nn.Module,
        hidden: torch.Tensor,
        pos: tuple[torch.Tensor, torch.Tensor] | None,
        weights: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """:meth:`run_layer` with ``weights`` (block-relative names) in place of the layer's own, under
        autograd: the output is differentiable in them (block-output refinement)."""
        kwargs: dict[str, Any] = {"attention_mask": None, "position_embeddings": pos}
        kwargs["position_ids"] = torch.arange(hidden.shape[1])[None]
        out = torch.func.functional_call(layer, dict(weights), (hidden,), kwargs, strict=False)
        return out[0] if isinstance(out, tuple) else out

    def run_layer(
        self, layer: torch.nn.Module, hidden: torch.Tensor, pos: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """One layer over ``(B, T, hidden)`` with a causal mask (sdpa's ``is_causal``)."""
        kwargs: dict[str, Any] = {"attention_mask": None, "position_embeddings": pos}
        kwargs["position_ids"] = torch.arange(hidden.shape[1])[None]
        with torch.inference_mode():
            out = layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

"""Build a runnable ``transformers`` model from a source's (dequantized) tensors.

Evaluation runs every model — an original directory, a lowbit output, another tool's checkpoint, a GGUF
file — through the same ``transformers`` architecture in float32, so they are judged alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from lowbit.errors import InputFileError
from lowbit.formats.activations import LinearActivation
from lowbit.walk.sources import ModelSource

log = logging.getLogger(__name__)


def hf_config(source: ModelSource) -> Any:
    """A ``transformers`` config for ``source`` without any quantization_config (weights arrive as floats)."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in source.config.items() if k not in ("quantization_config", "transformers_version")}
    model_type = cfg.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise InputFileError(f"transformers cannot build a {model_type} model from {source.path}: {e}") from e


class ActQuantLinear(torch.nn.Module):
    """A linear layer whose input is quantized at run time as :class:`LinearActivation` says (W8A8's
    fake-quantized activations, or LLM.int8()'s mixed int8/16-bit matmul on the stored codes)."""

    def __init__(self, linear: torch.nn.Linear, act: LinearActivation) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        w8 = act.int8_weight
        # Resolve a lazily read int8 weight once, not on every forward.
        self.act = dataclasses.replace(act, int8_weight=w8() if callable(w8) else w8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act.linear(x, self.weight, self.bias)


def quantize_activations(model: Any, activations: Mapping[str, LinearActivation]) -> int:
    """Replace each ``nn.Linear`` named in ``activations`` (module name -> how its input is quantized)
    by an :class:`ActQuantLinear`; returns how many were replaced. A name that matches no linear is an
    :class:`InputFileError` (the checkpoint and the architecture disagree)."""
    modules = dict(model.named_modules())
    for name, act in activations.items():
        mod = modules.get(name)
        if not isinstance(mod, torch.nn.Linear):
            raise InputFileError(
                f"activation quantization names {name!r}, which is not a linear of the model"
            )
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, ActQuantLinear(mod, act))
    if activations:
        kinds = sorted({a.spec.label for a in activations.values()})
        log.info("quantizing the inputs of %d linears at run time: %s", len(activations), "; ".join(kinds))
    return len(activations)


def build_model(
    source: ModelSource,
    weights: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    activations: Mapping[str, LinearActivation] | None = None,
) -> Any:
    """A ``transformers`` causal LM in eval mode with ``weights`` (default: every tensor of ``source``).

    Linears whose inputs the scheme quantizes (``activations``, default: what the checkpoint says in
    ``source.activations``) quantize them at run time, so W8A8 and LLM.int8() models are judged on what
    their runtime computes.
    """
    from transformers import AutoModelForCausalLM

    cfg = hf_config(source)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    state = weights if weights is not None else {n: source.read(n) for n in source.names()}
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise InputFileError(
            f"{source.path}: weights do not fit the {cfg.model_type} architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if tied:
        model.tie_weights()
    quantize_activations(model, source.activations if activations is None else activations)
    model.eval()
    return model


# Below this width, intra-op threads cost more than they save (a 64x64 matmul is ~20x slower on two
# busy threads than on one), so tiny models run single-threaded.
SINGLE_THREAD_BELOW_HIDDEN = 512


@contextlib.contextmanager
def threads_for(config: dict[str, Any]) -> Iterator[None]:
    """Run the enclosed evaluation single-threaded when the model is tiny (set once: changing the thread
    count rebuilds the pool)."""
    hidden = int(config.get("hidden_size", SINGLE_THREAD_BELOW_HIDDEN))
    before = torch.get_num_threads()
    if hidden < SINGLE_THREAD_BELOW_HIDDEN:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def logits_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a ``transformers`` model as ``(1, T) token ids -> (1, T, V) float32 logits``, without autograd."""
    from lowbit.eval.perplexity import logits_fn_from_hf

    inner = logits_fn_from_hf(model)

    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return inner(ids).float()

    return run

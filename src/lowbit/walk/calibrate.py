"""The calibration walk: block by block, statistics through hooks, quantize, feed the next block.

1. The calibration text becomes ``samples`` windows of ``seqlen`` tokens (consecutive, non-overlapping,
   the first token of each replaced by BOS when the tokenizer adds one — as llama-perplexity and
   llama-imatrix treat their chunks).
2. Block 0's inputs are the embeddings of those windows.
3. For each block: materialize only that block, hook its linears' inputs into the accumulators the
   method needs (linears fed by the same norm share one accumulator: the registry says which), run the
   block, quantize each linear with its statistics, and produce the next block's inputs by running the
   *quantized* block (``sequential=True``, the GPTQ paper's and llm-compressor's mode) or the original
   block (``sequential=False``: faster to reason about, errors do not propagate into the statistics).

Peak memory: one block's weights + the calibration activations (2 x samples x seqlen x hidden floats)
+ the statistics of one block.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.calib.absmean import AbsMaxAccumulator, AbsMeanAccumulator
from lowbit.calib.hessian import HessianAccumulator
from lowbit.errors import ArgumentError, InputFileError
from lowbit.formats.activations import ActQuant, LLMInt8
from lowbit.formats.base import Codec, sqnr_db
from lowbit.methods.base import BlockContext, Method
from lowbit.walk.blocks import BlockRunner
from lowbit.walk.quantize_walk import LayerStat, WalkItem, WalkStats, check_finite
from lowbit.walk.sources import ModelSource

log = logging.getLogger(__name__)

ACCUMULATORS: dict[str, Callable[[int], Any]] = {
    cls.name: cls for cls in (HessianAccumulator, AbsMeanAccumulator, AbsMaxAccumulator)
}


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data and walk mode. Defaults follow GPTQ/llm-compressor: 128 windows of 512 tokens."""

    text: Path
    samples: int = 128
    seqlen: int = 512
    batch: int = 8
    sequential: bool = True
    # Block-level methods (AWQ) search on a sample: this many input tokens per linear input, and this
    # many windows for block-output losses.
    block_sample_tokens: int = 8192
    block_sample_windows: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 8 or self.batch < 1:
            raise ArgumentError(
                f"calibration needs samples >= 1, seqlen >= 8 and batch >= 1 (got {self.samples}, "
                f"{self.seqlen}, {self.batch})"
            )


def calibration_tokens(source: ModelSource, config: CalibConfig) -> torch.Tensor:
    """``(samples, seqlen)`` int64 windows of the calibration text (fewer if the text is short)."""
    from lowbit.eval.windows import encode_text, read_text_exact, tokenizer_bos_id

    if not config.text.is_file():
        raise InputFileError(f"calibration text {config.text} does not exist")
    tok = source.tokenizer()
    ids = encode_text(tok, read_text_exact(config.text))
    n = min(config.samples, ids.numel() // config.seqlen)
    if n < 1:
        raise InputFileError(
            f"calibration text {config.text} has {ids.numel()} tokens, fewer than one window of {config.seqlen}"
        )
    if n < config.samples:
        log.warning(
            "calibration text gives only %d windows of %d tokens (asked for %d)",
            n,
            config.seqlen,
            config.samples,
        )
    windows = ids[: n * config.seqlen].reshape(n, config.seqlen).clone()
    bos = tokenizer_bos_id(tok)
    if bos is not None:
        windows[:, 0] = bos
    return windows


def _sample_tokens(x: torch.Tensor, limit: int, gen: torch.Generator) -> torch.Tensor:
    """Up to ``limit`` random token rows of ``x`` (..., in) as float32 (tokens, in)."""
    x2 = x.detach().reshape(-1, x.shape[-1]).float()
    if x2.shape[0] <= limit:
        return x2.clone()
    idx = torch.randperm(x2.shape[0], generator=gen)[:limit]
    return x2[idx]


def _input_keys(source: ModelSource, rel_linears: list[str]) -> dict[str, str]:
    """Relative linear name -> the name of its input (linears fed by the same norm share one)."""
    keys = {lin: lin for lin in rel_linears}
    for m in source.arch.mappings:
        if m.kind == "norm":
            for t in m.targets:
                if t in keys:
                    keys[t] = m.source
    return keys


def calibrate_walk(
    source: ModelSource,
    codec: Codec,
    method: Method,
    config: CalibConfig,
    stats: WalkStats | None = None,
    progress: bool = True,
    activations: ActQuant | LLMInt8 | None = None,
) -> Iterator[WalkItem]:
    """Yield every tensor of ``source`` in block order, block linears quantized with calibration
    statistics (the same stream as :func:`lowbit.walk.quantize_walk.walk_quantize`).

    ``activations``: how the scheme quantizes linear inputs at run time. With a static scale, each
    quantized linear's ``input_scale`` is calibrated on the inputs it sees in the *quantized* (and, for
    block-level methods, transformed) block, and carried on its :class:`WalkItem`.
    """
    static = isinstance(activations, ActQuant) and not activations.dynamic
    runner = BlockRunner(source)
    arch = source.arch
    ids = calibration_tokens(source, config)
    log.info("calibrating on %d windows x %d tokens of %s", ids.shape[0], ids.shape[1], config.text)
    hidden = torch.cat(
        [runner.embed(ids[i : i + config.batch]) for i in range(0, ids.shape[0], config.batch)]
    )
    pos = runner.position_embeddings(hidden[: config.batch])
    groups = source.blocks()
    gen = torch.Generator().manual_seed(config.seed)
    bar = tqdm(total=len(groups), desc=f"{method.name}", unit="block", disable=not progress, leave=False)
    for grp in groups:
        if grp.index is None:
            for name in grp.names:
                t = source.read(name)
                if stats is not None:
                    stats.other_params += t.numel()
                    stats.other_bits += t.numel() * t.element_size() * 8
                yield WalkItem(name, t)
            bar.update()
            continue
        i = grp.index
        prefix = arch.block_prefix.format(i=i)
        weights = {n[len(prefix) :]: source.read(n) for n in grp.names}
        layer = runner.layer(i, weights)
        rel_linears = [n[: -len(".weight")] for n in weights if arch.is_quantizable(prefix + n)]
        keys = _input_keys(source, rel_linears)
        accs: dict[str, dict[str, Any]] = {}
        samples: dict[str, list[torch.Tensor]] = {}
        modules = dict(layer.named_modules())
        handles = []
        for lin in rel_linears:
            key = keys[lin]
            if key in accs:
                continue
            in_f = weights[lin + ".weight"].shape[1]
            accs[key] = {need: ACCUMULATORS[need](in_f) for need in method.needs}

            def hook(
                _m: torch.nn.Module,
                args: tuple[torch.Tensor, ...],
                key: str = key,
                accs: dict[str, dict[str, Any]] = accs,
                samples: dict[str, list[torch.Tensor]] = samples,
            ) -> None:
                for acc in accs[key].values():
                    acc.add(args[0])
                if method.transforms_block:
                    samples.setdefault(key, []).append(
                        _sample_tokens(args[0], config.block_sample_tokens, gen)
                    )

            handles.append(modules[lin].register_forward_pre_hook(hook))
        outputs = []
        for b in range(0, hidden.shape[0], config.batch):
            outputs.append(runner.run_layer(layer, hidden[b : b + config.batch], pos))
        for h in handles:
            h.remove()
        if method.transforms_block:
            sub = hidden[: config.block_sample_windows]

            def run(w: Mapping[str, torch.Tensor], i: int = i, sub: torch.Tensor = sub) -> torch.Tensor:
                return runner.run_layer(runner.layer(i, w), sub, runner.position_embeddings(sub))

            ctx = BlockContext(
                index=i,
                weights=weights,
                arch=arch,
                codec=codec,
                inputs={k: torch.cat(v)[: config.block_sample_tokens] for k, v in samples.items()},
                run=run,
                stats={k: {n: a.result() for n, a in v.items()} for k, v in accs.items()},
                activations=activations,
            )
            # Statistics above were taken on the original block: a block-level method quantizes its
            # transformed weights without them (AWQ: RTN after scaling and clipping).
            weights = method.transform_block(ctx)
        quantized: dict[str, torch.Tensor] = {}
        items: list[WalkItem] = []
        for rel, w in weights.items():
            name = prefix + rel
            if rel[: -len(".weight")] in keys and rel.endswith(".weight"):
                lin = rel[: -len(".weight")]
                check_finite(name, w)
                lin_stats = {need: acc.result() for need, acc in accs[keys[lin]].items()}
                q = method.quantize_linear(w, codec, lin_stats)
                deq = codec.dequantize(q)
                check_finite(name, deq)
                quantized[rel] = deq
                if stats is not None:
                    bits = codec.storage_bits(tuple(w.shape))
                    notes = method.describe_layer(lin_stats)
                    stats.layers.append(LayerStat(name, tuple(w.shape), bits, sqnr_db(w, deq), notes))
                    stats.quantized_params += w.numel()
                    stats.quantized_bits += bits
                items.append(WalkItem(name, w, q))
            else:
                if stats is not None:
                    stats.other_params += w.numel()
                    stats.other_bits += w.numel() * w.element_size() * 8
                items.append(WalkItem(name, w))
        if config.sequential or static:
            layer = runner.layer(i, {**weights, **quantized})
            ranges: dict[str, torch.Tensor] = {}
            range_handles = []
            if static:
                for lin in rel_linears:

                    def range_hook(
                        _m: torch.nn.Module,
                        args: tuple[torch.Tensor, ...],
                        lin: str = lin,
                        ranges: dict[str, torch.Tensor] = ranges,
                    ) -> None:
                        m = args[0].detach().abs().amax().float()
                        ranges[lin] = torch.maximum(ranges[lin], m) if lin in ranges else m

                    range_handles.append(
                        dict(layer.named_modules())[lin].register_forward_pre_hook(range_hook)
                    )
            rerun = [
                runner.run_layer(layer, hidden[b : b + config.batch], pos)
                for b in range(0, hidden.shape[0], config.batch)
            ]
            for h in range_handles:
                h.remove()
            if config.sequential:
                outputs = rerun
            if static:
                assert isinstance(activations, ActQuant)
                for k, item in enumerate(items):
                    lin = item.name[len(prefix) : -len(".weight")]
                    if item.quantized is not None and lin in ranges:
                        items[k] = dataclasses.replace(
                            item, input_scale=activations.scale_from_absmax(ranges[lin]).reshape(1)
                        )
        yield from items
        hidden = torch.cat(outputs)
        del layer, weights, quantized
        bar.update()
    bar.close()

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

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.calib.absmean import AbsMaxAccumulator, AbsMeanAccumulator, ImportanceAccumulator
from lowbit.calib.hessian import HessianAccumulator, InputErrorAccumulator
from lowbit.errors import ArgumentError, InputFileError
from lowbit.formats.activations import ActQuant, LLMInt8
from lowbit.formats.base import Codec, CodecPlan, QuantizedTensor, sqnr_db
from lowbit.methods.base import BlockContext, Method
from lowbit.methods.refine import RefineConfig, refine_block
from lowbit.transforms.scaling import input_keys
from lowbit.walk.blocks import BlockRunner
from lowbit.walk.quantize_walk import LayerStat, WalkItem, WalkStats, check_finite
from lowbit.walk.sources import ModelSource

log = logging.getLogger(__name__)

ACCUMULATORS: dict[str, Callable[[int], Any]] = {
    cls.name: cls
    for cls in (
        HessianAccumulator,
        AbsMeanAccumulator,
        AbsMaxAccumulator,
        ImportanceAccumulator,
        InputErrorAccumulator,
    )
}


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data and walk mode. Defaults follow GPTQ/llm-compressor: 128 windows of 512 tokens.

    ``batch``: windows per forward pass; ``None`` runs all of them at once when their activations are
    estimated to fit ``max_batch_bytes`` (see :func:`batch_windows`), else as many as fit.
    ``dtype``: the dtype the blocks run in and the activations are kept in. ``bfloat16`` (default)
    runs the matrix products on the CPU's bf16 units (AMX, AVX512-BF16: 3-6x faster than float32);
    the statistics are still accumulated in float32/float64 from those bf16 activations, exactly.
    Use ``float32`` to calibrate on float32 activations.
    """

    text: Path
    samples: int = 128
    seqlen: int = 512
    batch: int | None = None
    sequential: bool = True
    dtype: torch.dtype = torch.bfloat16
    max_batch_bytes: int = 3 << 29  # 1.5 GiB of block activations
    # Block-level methods (AWQ) search on a sample: this many input tokens per linear input, and this
    # many windows for block-output losses.
    block_sample_tokens: int = 8192
    block_sample_windows: int = 16
    seed: int = 0
    # A text with fewer windows than ``samples``: an error (the default: what was asked cannot be done),
    # or calibrate on the windows it holds, with a warning.
    allow_fewer_windows: bool = False
    # Windows the original model runs on for statistics that compare it with the quantized one (GPTQ's
    # asymmetric target): the first this many, None for all (always all for block-output refinement).
    # Measured on SmolLM2 Q4_K_M (128 windows): all 0.0157 KLD, the first 32 0.0208, at 80% of the time.
    original_windows: int | None = None

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 8 or (self.batch is not None and self.batch < 1):
            raise ArgumentError(
                f"calibration needs samples >= 1, seqlen >= 8 and batch >= 1 (got {self.samples}, "
                f"{self.seqlen}, {self.batch})"
            )
        if self.original_windows is not None and self.original_windows < 1:
            raise ArgumentError(f"original_windows must be >= 1 or None (all), not {self.original_windows}")
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ArgumentError(f"calibration runs in float32, bfloat16 or float16, not {self.dtype}")


def batch_windows(source: ModelSource, config: CalibConfig, windows: int) -> int:
    """Windows per forward pass: ``config.batch``, or all ``windows`` when one block's activations for
    all of them fit ``max_batch_bytes``. The estimate per token is the widest intermediate (the MLP's,
    or 4 x hidden if the config does not say) four times over (gate, up, activation, product) plus
    four hidden-size tensors (input, attention, residual, output), in ``config.dtype``."""
    if config.batch is not None:
        return min(config.batch, windows)
    cfg = source.config
    hidden = int(cfg.get("hidden_size", 0) or 0)
    inter = (
        max(int(cfg.get(k, 0) or 0) for k in ("intermediate_size", "moe_intermediate_size", "ffn_dim"))
        or 4 * hidden
    )
    per_window = config.seqlen * (4 * inter + 4 * hidden) * torch.finfo(config.dtype).bits // 8
    return max(1, min(windows, config.max_batch_bytes // max(per_window, 1)))


def calibration_tokens(source: ModelSource, config: CalibConfig) -> torch.Tensor:
    """``(samples, seqlen)`` int64 windows of the calibration text.

    A text too short for ``samples`` windows is an :class:`InputFileError` that names both counts,
    unless ``allow_fewer_windows``: then calibration runs on the whole windows it holds, with a warning
    (GPTQ's damping keeps the statistics of a few windows usable). A missing or empty file, or one
    shorter than a single window, is always an :class:`InputFileError`.
    """
    from lowbit.eval.windows import encode_text, read_text_exact, tokenizer_bos_id

    if not config.text.is_file():
        raise InputFileError(f"calibration text {config.text} does not exist")
    text = read_text_exact(config.text)
    if not text.strip():
        raise InputFileError(f"calibration text {config.text} is empty")
    tok = source.tokenizer()
    ids = encode_text(tok, text)
    n = min(config.samples, ids.numel() // config.seqlen)
    if n < 1:
        raise InputFileError(
            f"calibration text {config.text} has {ids.numel()} tokens, fewer than one window of "
            f"{config.seqlen}; give a longer text or a smaller --seqlen"
        )
    if n < config.samples and not config.allow_fewer_windows:
        raise InputFileError(
            f"calibration text {config.text} holds {ids.numel()} tokens: {n} windows of {config.seqlen}, "
            f"fewer than the {config.samples} asked for; pass --samples {n}, a smaller --seqlen or a longer text"
        )
    if n < config.samples:
        log.warning(
            "calibration text %s holds %d tokens: calibrating on %d windows of %d tokens instead of the "
            "%d asked for",
            config.text,
            ids.numel(),
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


class _StopForward(Exception):
    """Raised by a statistics hook once every input of the block has been seen: the rest of the
    block's forward pass (the last linear and the residual) is not needed."""


def _windows_for(method: Method, config: CalibConfig, available: int) -> int:
    """Calibration windows the walk runs. A block-level method (AWQ) searches on at most
    ``block_sample_tokens`` tokens and ``block_sample_windows`` windows: only those windows are run
    (the others would be propagated through every block and never looked at). A block-level method
    that also takes statistics over all tokens (SmoothQuant's activation ranges) runs every window."""
    if not method.transforms_block or method.statistics:
        return available
    need = max(config.block_sample_windows, math.ceil(config.block_sample_tokens / config.seqlen))
    return min(available, need)


def calibrate_walk(
    source: ModelSource,
    codec: Codec | CodecPlan,
    method: Method,
    config: CalibConfig,
    stats: WalkStats | None = None,
    progress: bool = True,
    activations: ActQuant | LLMInt8 | None = None,
) -> Iterator[WalkItem]:
    """Yield every tensor of ``source`` in block order, block linears quantized with calibration
    statistics (the same stream as :func:`lowbit.walk.quantize_walk.walk_quantize`).

    Per block, for a per-linear method (GPTQ):

    * sequential, all windows in one batch (the default when they fit, see :func:`batch_windows`):
      **one** forward pass. A hook before each group of linears that share an input (q/k/v, o,
      gate/up, down) accumulates the group's statistics over all tokens, quantizes the group and puts
      the dequantized weights in place before the group runs, so the later groups' statistics see
      the quantized earlier ones (GPTQ's "true sequential" order) and the pass's output is the
      quantized block's output, the next block's input.
    * sequential in several batches: a statistics pass over the original block (stopped after the
      last group's inputs), then a pass of the quantized block for the outputs (llm-compressor's order).
    * non-sequential: one pass over the original block gives both the statistics and the outputs.

    ``codec``: one codec for every block linear, or a :class:`CodecPlan` per tensor (a GGUF mix); a
    linear the plan keeps in float is calibrated through but not quantized.

    ``activations``: how the scheme quantizes linear inputs at run time. With a static scale, each
    quantized linear's ``input_scale`` is calibrated on the inputs it sees in the *quantized* (and, for
    block-level methods, transformed) block, and carried on its :class:`WalkItem`.
    """
    static = isinstance(activations, ActQuant) and not activations.dynamic
    plan = CodecPlan.of(codec)
    refine = method.refinement if method.refines else None
    if refine is not None and activations is not None:
        raise ArgumentError(
            "block-output refinement (--refine) is for weight-only schemes; this scheme quantizes activations"
        )
    runner = BlockRunner(source, dtype=config.dtype)
    arch = source.arch
    ids = calibration_tokens(source, config)
    n_win = _windows_for(method, config, ids.shape[0])
    if n_win < ids.shape[0]:
        log.info(
            "%s searches on %d tokens: running the first %d of %d windows",
            method.name,
            config.block_sample_tokens,
            n_win,
            ids.shape[0],
        )
        ids = ids[:n_win]
    batch = batch_windows(source, config, ids.shape[0])
    one_pass = config.sequential and batch >= ids.shape[0] and not method.transforms_block
    log.info(
        "calibrating on %d windows x %d tokens of %s (%s, %d windows per pass, %s)",
        ids.shape[0],
        ids.shape[1],
        config.text,
        "sequential" if config.sequential else "non-sequential",
        batch,
        config.dtype,
    )
    # A plan that quantizes the embeddings (a GGUF mix: token_embd is Q3_K in Q3_K_M) calibrates the
    # blocks on the embeddings the quantized model will run with.
    embed_name = f"{arch.embed}.weight"
    embed_codec = plan.tensors.get(embed_name)
    embed_q: QuantizedTensor | None = None
    embed_w: torch.Tensor | None = None
    if embed_codec is not None:
        t = source.read(embed_name)
        check_finite(embed_name, t)
        embed_q = embed_codec.quantize(t)
        embed_w = embed_codec.dequantize(embed_q).reshape(t.shape)
    hidden = torch.cat([runner.embed(ids[i : i + batch], embed_w) for i in range(0, ids.shape[0], batch)])
    # Refinement and the input-error statistic follow the original model's trajectory too: its inputs
    # to each block, the original block's outputs (refinement's targets) and its linears' inputs. The
    # statistic is estimated on the first ``original_windows`` windows (refinement needs them all).
    cross = any(getattr(ACCUMULATORS[n], "needs_original", False) for n in method.statistics)
    hidden_f = None
    n_orig = ids.shape[0]
    if refine is None and config.original_windows is not None:
        n_orig = min(ids.shape[0], config.original_windows)
    if refine is not None or cross:
        hidden_f = (
            hidden[:n_orig].clone()
            if embed_w is None
            else torch.cat([runner.embed(ids[i : min(i + batch, n_orig)]) for i in range(0, n_orig, batch)])
        )
    pos = runner.position_embeddings(hidden[:batch])
    batches = [slice(b, b + batch) for b in range(0, hidden.shape[0], batch)]
    orig_batches = [slice(b, min(b + batch, n_orig)) for b in range(0, n_orig, batch)]
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
                yield WalkItem(name, t, embed_q if name == embed_name else None)
            bar.update()
            continue
        i = grp.index
        prefix = arch.block_prefix.format(i=i)
        block_weights = {}
        for n in grp.names:
            block_weights[n[len(prefix) :]] = t = source.read(n)
            check_finite(n, t)  # before the block runs: a NaN would otherwise surface as NaN activations
        blk = _BlockCalibration(
            runner, plan, method, config, i, block_weights, gen, activations, n_orig == ids.shape[0]
        )
        targets = None
        if hidden_f is not None:
            targets = blk.original_pass(block_weights, hidden_f, pos, orig_batches, capture=cross)
        outputs = blk.one_pass(hidden, pos) if one_pass else blk.statistics_pass(hidden, pos, batches)
        blk.finish(hidden)
        if refine is not None:
            assert targets is not None
            blk.refine(refine, hidden, targets)
        blk.originals.clear()
        quantized: dict[str, torch.Tensor] = {}
        items: list[WalkItem] = []
        for rel, w in blk.weights.items():
            name = prefix + rel
            lin = rel[: -len(".weight")]
            if rel.endswith(".weight") and lin in blk.results:
                q, deq = blk.results[lin], blk.dequantized[lin]
                quantized[rel] = deq
                if stats is not None:
                    c = plan(name)
                    assert c is not None
                    bits = c.storage_bits(tuple(w.shape))
                    notes = blk.notes.get(lin, {})
                    stats.layers.append(LayerStat(name, tuple(w.shape), bits, sqnr_db(w, deq), notes))
                    stats.quantized_params += w.numel()
                    stats.quantized_bits += bits
                items.append(WalkItem(name, w, q))
            else:
                if stats is not None:
                    stats.other_params += w.numel()
                    stats.other_bits += w.numel() * w.element_size() * 8
                items.append(WalkItem(name, w))
        if (config.sequential and not one_pass) or static or refine is not None:
            layer = runner.layer(i, {**blk.weights, **quantized})
            ranges: dict[str, torch.Tensor] = {}
            handles = _range_hooks(layer, list(blk.key_of), ranges) if static else []
            rerun = [runner.run_layer(layer, hidden[sl], pos) for sl in batches]
            for h in handles:
                h.remove()
            if (config.sequential and not one_pass) or refine is not None:
                outputs = rerun
            if static:
                assert isinstance(activations, ActQuant)
                for k, item in enumerate(items):
                    lin = item.name[len(prefix) : -len(".weight")]
                    if item.quantized is not None and lin in ranges:
                        scale = activations.scale_from_absmax(ranges[lin]).reshape(1)
                        items[k] = dataclasses.replace(item, input_scale=scale)
            del layer, rerun
        yield from items
        hidden = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        if targets is not None:
            hidden_f = targets
        del blk, quantized, outputs
        bar.update()
    bar.close()


def _range_hooks(layer: torch.nn.Module, linears: list[str], ranges: dict[str, torch.Tensor]) -> list[Any]:
    """Hooks recording each linear's largest input magnitude (a static activation scale's range)."""
    modules = dict(layer.named_modules())

    def hook(lin: str, x: torch.Tensor) -> None:
        m = x.detach().abs().amax().float()
        ranges[lin] = torch.maximum(ranges[lin], m) if lin in ranges else m

    return [
        modules[lin].register_forward_pre_hook(lambda _m, args, lin=lin: hook(lin, args[0]))
        for lin in linears
    ]


class _BlockCalibration:
    """One block's calibration: its layer, the hooks on its linears, their statistics and results.

    Linears that share an input (the registry's norm mappings: q/k/v, gate/up) form one group with one
    set of accumulators, keyed by the feeding op's name (the linear's own name otherwise)."""

    def __init__(
        self,
        runner: BlockRunner,
        plan: CodecPlan,
        method: Method,
        config: CalibConfig,
        index: int,
        weights: dict[str, torch.Tensor],
        gen: torch.Generator,
        activations: ActQuant | LLMInt8 | None = None,
        original_everywhere: bool = False,
    ) -> None:
        self.runner, self.plan, self.method, self.config = runner, plan, method, config
        self.index, self.weights, self.gen = index, weights, gen
        self.activations = activations
        self.notes: dict[str, dict[str, float]] = {}  # linear -> what the method reports about it
        arch = runner.source.arch
        self.prefix = arch.block_prefix.format(i=index)
        self.layer = runner.layer(index, weights)
        self.modules = dict(self.layer.named_modules())
        rel_linears = [n[: -len(".weight")] for n in weights if arch.is_quantizable(self.prefix + n)]
        keys = input_keys(arch.mappings, rel_linears)
        self.key_of = {lin: keys[lin] for lin in rel_linears}
        self.members: dict[str, list[str]] = {}
        for lin in rel_linears:
            self.members.setdefault(keys[lin], []).append(lin)
        self.accs: dict[str, dict[str, Any]] = {
            key: {
                need: ACCUMULATORS[need](weights[lins[0] + ".weight"].shape[1]) for need in method.statistics
            }
            for key, lins in self.members.items()
        }
        if original_everywhere:  # the input-error statistic's tokens are the Hessian's: one xᵀx for both
            for acc in self.accs.values():
                if "input_error" in acc and "hessian" in acc:
                    acc["input_error"].share_gram(acc["hessian"])
        self.samples: dict[str, list[torch.Tensor]] = {}
        # The original model's inputs of each group of linears, (windows, T, in) for the first windows
        # (the input-error statistic), and the windows of the batch running now.
        self.originals: dict[str, torch.Tensor] = {}
        self.batch = slice(0, 0)
        self.results: dict[str, QuantizedTensor] = {}
        self.transformed_stats: dict[str, dict[str, torch.Tensor]] = {}
        self.dequantized: dict[str, torch.Tensor] = {}  # (out, in) float32, checked finite
        self.seen: list[str] = []  # group keys in the order their hooks fired
        self.stop_after: str | None = None  # the group whose inputs come last in the block, once known

    def _hooks(self, fn: Callable[[str, torch.Tensor], None]) -> list[Any]:
        return [
            self.modules[lin].register_forward_pre_hook(lambda _m, args, key=key: fn(key, args[0]))
            for key, lins in self.members.items()
            for lin in lins
        ]

    def codec_for(self, lin: str) -> Codec | None:
        """The plan's codec of block-relative linear ``lin``; None: it stays in float."""
        return self.plan(self.prefix + lin + ".weight")

    def _quantize_linear(self, lin: str) -> None:
        w = self.weights[lin + ".weight"]
        check_finite(self.prefix + lin + ".weight", w)
        codec = self.codec_for(lin)
        if codec is None:  # kept in float: the block runs it as it is
            self.dequantized[lin] = w.float()
            return
        key = self.key_of[lin]
        accs = self.accs[key]
        q = _quantize_one(self.method, codec, w, accs, self.prefix + lin, self.transformed_stats.get(key))
        if all(acc.count for acc in accs.values()):
            self.notes[lin] = self.method.describe_layer({need: acc.result() for need, acc in accs.items()})
        deq = codec.dequantize(q).reshape(w.shape)
        check_finite(self.prefix + lin + ".weight (quantized)", deq)  # never a NaN into a checkpoint
        self.results[lin] = q
        self.dequantized[lin] = deq

    def _accumulate(self, key: str, x: torch.Tensor) -> None:
        for acc in self.accs[key].values():
            if not getattr(acc, "needs_original", False):
                acc.add(x)
                continue
            orig = self.originals[key]
            start = self.batch.start
            n = min(self.batch.stop, orig.shape[0]) - start  # windows of this batch with original inputs
            if n > 0:
                acc.add(x[:n], orig[start : start + n])

    def original_pass(
        self,
        original: Mapping[str, torch.Tensor],
        hidden_f: torch.Tensor,
        pos: Any,
        batches: list[slice],
        capture: bool,
    ) -> torch.Tensor:
        """The ``original`` block on the original model's inputs ``hidden_f`` (the first windows): its
        outputs (the next block's original inputs, refinement's targets), and with ``capture`` each group
        of linears' input, kept for the input-error statistic."""
        layer = self.runner.layer(self.index, original)
        modules = dict(layer.named_modules())
        kept: dict[str, list[torch.Tensor]] = {}

        def keep(key: str, x: torch.Tensor, b: int) -> None:
            if len(kept.setdefault(key, [])) == b:  # a group's members share one input: keep it once
                kept[key].append(x.detach().clone())

        current = [0]
        handles = []
        if capture:
            handles = [
                modules[lin].register_forward_pre_hook(
                    lambda _m, args, key=key: keep(key, args[0], current[0])
                )
                for key, lins in self.members.items()
                for lin in lins
            ]
        outs = []
        try:
            for b, sl in enumerate(batches):
                current[0] = b
                outs.append(self.runner.run_layer(layer, hidden_f[sl], pos))
        finally:
            for h in handles:
                h.remove()
        self.originals = {key: v[0] if len(v) == 1 else torch.cat(v) for key, v in kept.items()}
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def one_pass(self, hidden: torch.Tensor, pos: Any) -> list[torch.Tensor]:
        """Statistics, quantization and the quantized block's output in one forward pass of all windows."""

        def quantize_before(key: str, x: torch.Tensor) -> None:
            if key in self.seen:  # another member of the group: already quantized and in place
                return
            self.seen.append(key)
            self.batch = slice(0, x.shape[0])
            self._accumulate(key, x)
            for lin in self.members[key]:
                self._quantize_linear(lin)
                w = self.modules[lin].weight
                w.copy_(self.dequantized[lin])

        handles = self._hooks(quantize_before)
        try:
            return [self.runner.run_layer(self.layer, hidden, pos)]
        finally:
            for h in handles:
                h.remove()

    def statistics_pass(self, hidden: torch.Tensor, pos: Any, batches: list[slice]) -> list[torch.Tensor]:
        """Statistics (and AWQ's samples) over the original block; its outputs when non-sequential."""

        def collect(key: str, x: torch.Tensor) -> None:
            if key not in self.seen:
                self.seen.append(key)
            self._accumulate(key, x)
            if self.method.transforms_block:
                self.samples.setdefault(key, []).append(
                    _sample_tokens(x, self.config.block_sample_tokens, self.gen)
                )
            if key == self.stop_after:
                raise _StopForward

        outputs = []
        handles = self._hooks(collect)
        try:
            for k, sl in enumerate(batches):
                self.batch = sl
                with contextlib.suppress(_StopForward):
                    outputs.append(self.runner.run_layer(self.layer, hidden[sl], pos))
                if k == 0 and self.config.sequential and len(self.seen) == len(self.members):
                    # The outputs of this pass are not used: from the second batch on, stop as soon
                    # as the last group's inputs are in.
                    self.stop_after = self.seen[-1]
        finally:
            for h in handles:
                h.remove()
        return outputs

    def refine(self, config: RefineConfig, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        """Refine the block's codes on its output (:func:`lowbit.methods.refine.refine_block`): inputs
        ``hidden`` (the quantized model's), ``targets`` the original block's outputs on the original
        model's inputs (:meth:`original_pass`)."""
        runner, i = self.runner, self.index
        layer32 = runner.layer(i, self.weights, dtype=torch.float32)
        pos32 = runner.position_embeddings(hidden[:1].float())
        quantized: dict[str, tuple[Codec, QuantizedTensor]] = {}
        for lin, q in self.results.items():
            codec = self.codec_for(lin)
            assert codec is not None
            quantized[lin + ".weight"] = (codec, q)

        def forward(w: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return runner.layer_forward(layer32, x, pos32, w)

        floats = {name: self.weights[name] for name in quantized}
        new, report = refine_block(i, floats, quantized, forward, hidden, targets, config)
        self.refine_report = report
        for name, q in new.items():
            lin = name[: -len(".weight")]
            codec = quantized[name][0]
            self.results[lin] = q
            deq = codec.dequantize(q).reshape(self.weights[name].shape)
            check_finite(self.prefix + name + " (refined)", deq)
            self.dequantized[lin] = deq

    def finish(self, hidden: torch.Tensor) -> None:
        """Block-level transform (AWQ) on ``hidden``'s first windows, then quantize every linear not
        quantized yet (all of them after a statistics pass; those no token reached after a one-pass)."""
        if self.method.transforms_block:
            # Block outputs for the search are float32, so that its comparisons are not bf16 noise.
            sub = hidden[: self.config.block_sample_windows].float()
            runner, i = self.runner, self.index

            def run(w: Mapping[str, torch.Tensor]) -> torch.Tensor:
                layer = runner.layer(i, w, dtype=torch.float32)
                return runner.run_layer(layer, sub, runner.position_embeddings(sub))

            n = self.config.block_sample_tokens
            default = self.plan.default or next(iter(self.plan.codecs()))
            ctx = BlockContext(
                index=i,
                weights=self.weights,
                arch=runner.source.arch,
                codec=default,
                codecs={lin: c for lin in self.key_of if (c := self.codec_for(lin)) is not default},
                inputs={k: torch.cat(v)[:n] for k, v in self.samples.items()},
                run=run,
                stats={k: {need: acc.result() for need, acc in a.items()} for k, a in self.accs.items()},
                activations=self.activations,
            )
            # Statistics above were taken on the original block; the transform updates those of the
            # inputs it changed (AWQ: the importance of the scaled inputs), which quantize its linears.
            self.weights = self.method.transform_block(ctx)
            self.transformed_stats = ctx.stats
        for rel in self.weights:  # in the block's tensor order
            lin = rel[: -len(".weight")]
            if lin in self.key_of and lin not in self.dequantized:
                self._quantize_linear(lin)


def _quantize_one(
    method: Method,
    codec: Codec,
    w: torch.Tensor,
    accs: Mapping[str, Any],
    name: str,
    transformed: Mapping[str, torch.Tensor] | None = None,
) -> QuantizedTensor:
    """One linear with its group's statistics (``transformed``: as a block transform updated them). A
    group no calibration token reached (an MoE expert the router never picked) has no statistics: it is
    quantized by round-to-nearest, with a warning."""
    if any(acc.count == 0 for acc in accs.values()):
        log.warning("%s: no calibration token reached this linear; quantized by round-to-nearest", name)
        return codec.quantize(w)
    stats = {need: acc.result() for need, acc in accs.items()}
    if transformed is not None:
        stats.update({k: v for k, v in transformed.items() if k in stats})
    return method.quantize_linear(w, codec, stats)

"""The library entry points the CLI calls: quantize a model to a file, simulate a scheme in memory."""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.calib.imatrix import Imatrix, load_imatrix
from lowbit.errors import ArgumentError, SchemeError
from lowbit.export.atomic import check_output
from lowbit.formats.activations import ActQuant, LinearActivation, LLMInt8
from lowbit.schemes import GGUF_FORMAT, Scheme, gguf_mix_name, parse_scheme
from lowbit.walk.stats import WalkStats

# torch and the model walk load only for the paths that need them: GGUF mixes from a GGUF file run on
# numpy alone (torch's import is ~1.7 s and ~190 MB of the process).
if TYPE_CHECKING:
    import torch

    from lowbit.formats.base import Codec
    from lowbit.formats.gguf.mixes import TypeOverride
    from lowbit.methods.base import Method
    from lowbit.transforms.rotation import RotationConfig
    from lowbit.walk.calibrate import CalibConfig
    from lowbit.walk.quantize_walk import WalkItem
    from lowbit.walk.sources import ModelSource

log = logging.getLogger(__name__)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass(frozen=True)
class QuantizeReport:
    """What one ``lowbit quantize`` run produced and cost."""

    output: Path
    scheme: str
    method: str
    format: str
    seconds: float
    peak_rss_bytes: int
    file_bytes: int
    linear_bits_per_weight: float  # as stored in the file (codes + scales + zeros + padding)
    codec_bits_per_weight: float  # the codec's own count, without the format's padding
    model_bits_per_weight: float
    mean_sqnr_db: float
    quantized_layers: int
    stats: WalkStats = field(repr=False, compare=False)

    def to_json_dict(self) -> dict[str, object]:
        """JSON-ready numbers; a value that is not known (NaN) is ``None``, so the output is strict JSON."""
        d: dict[str, object] = {
            "output": str(self.output),
            "scheme": self.scheme,
            "method": self.method,
            "format": self.format,
            "seconds": round(self.seconds, 3),
            "peak_rss_bytes": self.peak_rss_bytes,
            "file_bytes": self.file_bytes,
            "bpw": self.linear_bits_per_weight,
            "codec_bpw": self.codec_bits_per_weight,
            "model_bpw": self.model_bits_per_weight,
            "mean_sqnr_db": self.mean_sqnr_db,
            "quantized_layers": self.quantized_layers,
        }
        notes = {ls.name: ls.notes for ls in self.stats.layers if ls.notes}
        if notes:
            d["layer_notes"] = notes
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}


def _activation_sites(
    items: Iterable[WalkItem], acts: ActQuant | LLMInt8 | None
) -> tuple[list[WalkItem], dict[str, LinearActivation]]:
    """The walk's items, and how each quantized linear's input is quantized at run time."""
    out = list(items)
    from lowbit.formats.int8 import Int8RowQuantized

    sites: dict[str, LinearActivation] = {}
    if acts is None:
        return out, sites
    for it in out:
        if it.quantized is None:
            continue
        module = it.name.removesuffix(".weight")
        if isinstance(acts, LLMInt8):
            q = it.quantized
            assert isinstance(q, Int8RowQuantized)
            sites[module] = LinearActivation(acts, int8_weight=(q.codes, q.row_absmax))
        else:
            sites[module] = LinearActivation(acts, input_scale=it.input_scale)
    return out, sites


def resolve_scheme(
    scheme: str | None, method: str, fmt: str | None = None, threshold: float | None = None
) -> Scheme:
    """The scheme to quantize with: ``scheme``, or the one ``method`` implies (llm-int8 -> int8,
    smoothquant -> w8a8); ``threshold`` sets LLM.int8()'s outlier threshold."""
    if scheme is None:
        from lowbit.methods.base import METHODS, get_method

        get_method(method)  # registers the built-ins; a one-line error for an unknown method
        scheme = METHODS[method].default_scheme
        if scheme is None:
            raise ArgumentError(f"method {method} needs a --scheme (e.g. w4g128)")
    sch = parse_scheme(scheme, fmt)
    if threshold is not None:
        if not isinstance(sch.activations, LLMInt8):
            raise ArgumentError(
                f"--threshold is LLM.int8()'s outlier threshold; scheme {sch.name} has none (use --scheme int8)"
            )
        if not threshold > 0:
            raise ArgumentError(f"--threshold must be > 0 (bitsandbytes' default is 6.0), not {threshold}")
        sch = dataclasses.replace(sch, activations=LLMInt8(threshold))
    return sch


def quantize(
    model: str | Path | ModelSource,
    scheme: str | None,
    out: str | Path,
    method: str = "rtn",
    fmt: str | None = None,
    force: bool = False,
    progress: bool = True,
    calib: CalibConfig | None = None,
    imatrix: str | Path | Imatrix | None = None,
    method_options: Mapping[str, Any] | None = None,
    threshold: float | None = None,
    rotate: RotationConfig | str | None = None,
    tensor_types: Sequence[str] = (),
) -> QuantizeReport:
    """Quantize every block linear of ``model`` with ``scheme`` and write ``out`` in ``fmt``.

    The model is read one block at a time; ``out`` appears only when complete. Methods that need
    calibration statistics (GPTQ, AWQ) take them from ``calib``, block by block. GGUF mixes (``Q4_K_M``
    ..., ``fmt="gguf"``, the default for them) are written by :func:`lowbit.export.gguf.write_gguf`,
    optionally guided by an importance matrix ``imatrix`` (a llama-imatrix/lowbit file or an
    :class:`~lowbit.calib.imatrix.Imatrix`).

    ``rotate`` (``"hadamard"``, ``"random"`` or a :class:`~lowbit.transforms.rotation.RotationConfig`):
    quantize the rotated model (:class:`~lowbit.walk.rotated.RotatedSource`: norms folded, the residual
    stream and each head's values rotated; the same outputs in float), in every format.
    """
    out_path = Path(out)
    check_output(out_path, force)
    rotation = _rotation(rotate)
    if rotation is not None and imatrix is not None:
        raise ArgumentError(
            "an importance matrix describes the unrotated model's activations; with --rotate, pass --calib "
            "instead (the importance is then computed on the rotated model)"
        )
    if scheme is not None and (fmt or (GGUF_FORMAT if gguf_mix_name(scheme) else None)) == GGUF_FORMAT:
        from lowbit.formats.gguf.mixes import parse_type_overrides

        overrides = parse_type_overrides(tensor_types)
        return _quantize_gguf(
            model, scheme, out_path, method, force, progress, calib, imatrix, method_options, rotation,
            overrides,
        )  # fmt: skip
    if tensor_types:
        raise ArgumentError("--tensor-type chooses ggml types: it applies only when writing a GGUF mix")
    if imatrix is not None:
        raise ArgumentError("--imatrix is used only when writing GGUF (--format gguf with a GGUF mix)")
    from lowbit.export.hf_checkpoint import get_format, model_dtype, write_checkpoint
    from lowbit.methods.base import get_method
    from lowbit.walk.calibrate import calibrate_walk
    from lowbit.walk.sources import ModelSource, open_model

    sch = resolve_scheme(scheme, method, fmt, threshold)
    fmt_name = fmt or sch.default_format
    if fmt_name not in sch.formats:
        raise SchemeError(
            f"scheme {sch.name} cannot be written as {fmt_name}; it is written as {', '.join(sch.formats)}"
        )
    exporter = get_format(fmt_name, sch.activations)
    opts = dict(method_options or {})
    if isinstance(sch.activations, LLMInt8) and method == "llm-int8":
        opts.setdefault("threshold", sch.activations.threshold)
    meth = get_method(method, **opts)
    if meth.needs_calibration and calib is None:
        raise ArgumentError(f"method {meth.name} needs calibration text; pass --calib TEXTFILE")
    if sch.static_activations and calib is None:
        raise ArgumentError(
            f"scheme {sch.name} calibrates a static activation scale per linear; pass --calib TEXTFILE "
            "(or use a dynamic scheme such as w8a8)"
        )
    t0 = time.perf_counter()
    source = _rotated(model if isinstance(model, ModelSource) else open_model(model), rotation)
    codec = sch.codec(exporter.scale_dtype(model_dtype(source)))
    shapes = [source.info(n).shape for n in source.names() if source.arch.is_quantizable(n)]
    exporter.check(codec, shapes)
    grouped = getattr(getattr(codec, "block", None), "cols", None) is not None
    if meth.scatters_groups and grouped and not exporter.holds_group_index:
        raise SchemeError(
            f"{fmt_name} cannot store activation-order groups (a per-column group index, g_idx); add "
            "--act-order static (contiguous groups, the default) or use --format gptq"
        )
    stats = WalkStats()
    if calib is not None and (meth.needs_calibration or sch.static_activations or meth.statistics):
        items = calibrate_walk(
            source, codec, meth, calib, stats, progress=progress, activations=sch.activations
        )
    else:
        items = walk_quantize(source, codec, meth, stats, progress=progress)
    written = write_checkpoint(items, source, exporter, codec, out_path, force=force)
    return QuantizeReport(
        output=out_path,
        scheme=sch.name,
        method=meth.name,
        format=fmt_name,
        seconds=time.perf_counter() - t0,
        peak_rss_bytes=peak_rss_bytes(),
        file_bytes=written.file_bytes,
        linear_bits_per_weight=written.linear_bits_per_weight,
        codec_bits_per_weight=stats.linear_bits_per_weight,
        model_bits_per_weight=stats.model_bits_per_weight,
        mean_sqnr_db=stats.mean_sqnr_db,
        quantized_layers=len(stats.layers),
        stats=stats,
    )


def walk_quantize(
    source: ModelSource, codec: Codec, method: Method, stats: WalkStats | None = None, progress: bool = True
) -> Iterator[WalkItem]:
    """:func:`lowbit.walk.quantize_walk.walk_quantize`, imported on first use."""
    from lowbit.walk.quantize_walk import walk_quantize as walk

    return walk(source, codec, method, stats, progress=progress)


def _quantize_gguf(
    model: str | Path | ModelSource,
    scheme: str,
    out: Path,
    method: str,
    force: bool,
    progress: bool,
    calib: CalibConfig | None,
    imatrix: str | Path | Imatrix | None,
    method_options: Mapping[str, Any] | None = None,
    rotation: RotationConfig | None = None,
    overrides: Sequence[TypeOverride] = (),
) -> QuantizeReport:
    """A llama-quantize mix as a GGUF file; the report's numbers are per tensor as written.

    Round-to-nearest without calibration is llama-quantize's own path (numpy, every tensor in parallel
    pieces: :func:`lowbit.export.gguf.write_gguf`). A method (GPTQ, AWQ) or calibration text runs the
    quantize walk over the model, each block linear quantized with its ggml block type as a codec, and
    the GGUF writer takes the walk's output (:func:`lowbit.export.gguf.write_gguf_walk`); ``--method rtn
    --calib TEXT`` is round-to-nearest with an importance matrix computed in that walk.
    """
    sch = parse_scheme(scheme, GGUF_FORMAT)
    im: Imatrix | None = None
    im_file: str | None = None
    if isinstance(imatrix, Imatrix):
        im = imatrix
    elif imatrix is not None:
        im = load_imatrix(imatrix)
        im_file = str(imatrix)
    t0 = time.perf_counter()
    plain_rtn = method == "rtn" and calib is None and not method_options and rotation is None
    # A quantized checkpoint (GPTQ, AWQ, compressed-tensors) converted with RTN keeps its grids where
    # the block types hold them: the walk, which reads what the checkpoint stores.
    checkpoint = _quantized_checkpoint(model) if plain_rtn else None
    keep_grids = checkpoint is not None
    if plain_rtn and not keep_grids:
        from lowbit.export.gguf import write_gguf

        rep = write_gguf(
            model, sch.name, out, imatrix=im, force=force, progress=progress, imatrix_file=im_file,
            overrides=overrides,
        )  # fmt: skip
        label = "ggml+imatrix" if im is not None else "ggml"
        stats = WalkStats()
    else:
        rep, label, stats = _quantize_gguf_walk(
            checkpoint or model,
            sch.name,
            out,
            method,
            force,
            progress,
            calib,
            im,
            im_file,
            method_options,
            rotation,
            keep_grids=keep_grids,
            overrides=overrides,
        )
    from lowbit.formats.gguf.types import is_quantized

    quantized = [t for t in rep.tensors if t.quantizable and is_quantized(t.type)]
    return QuantizeReport(
        output=out,
        scheme=sch.name,
        method=label,
        format=GGUF_FORMAT,
        seconds=time.perf_counter() - t0,
        peak_rss_bytes=peak_rss_bytes(),
        file_bytes=rep.file_bytes,
        linear_bits_per_weight=rep.linear_bits_per_weight,
        codec_bits_per_weight=rep.linear_bits_per_weight,
        model_bits_per_weight=rep.model_bits_per_weight,
        mean_sqnr_db=stats.mean_sqnr_db,
        quantized_layers=len(quantized),
        stats=stats,
    )


def _quantize_gguf_walk(
    model: str | Path | ModelSource,
    mix: str,
    out: Path,
    method: str,
    force: bool,
    progress: bool,
    calib: CalibConfig | None,
    im: Imatrix | None,
    im_file: str | None,
    method_options: Mapping[str, Any] | None,
    rotation: RotationConfig | None = None,
    keep_grids: bool = False,
    overrides: Sequence[TypeOverride] = (),
) -> tuple[Any, str, WalkStats]:
    """The quantize walk with each block linear's ggml type as its codec, written by the GGUF writer;
    ``keep_grids``: linears a quantized checkpoint stores keep their grid where their type holds it."""
    from lowbit.export.gguf import plan_gguf_walk, write_gguf_walk
    from lowbit.methods.base import get_method
    from lowbit.methods.rtn import RTN, WeightedRTN
    from lowbit.walk.calibrate import calibrate_walk
    from lowbit.walk.quantize_walk import walk_quantize
    from lowbit.walk.sources import ModelSource, open_model

    meth = get_method(method, **dict(method_options or {}))
    if meth.activation_method is not None:
        raise ArgumentError(
            f"method {meth.name} prepares a model for {meth.activation_method}, which GGUF mixes do not "
            "quantize; use --method rtn, gptq or awq"
        )
    if type(meth) is RTN and calib is not None:
        refinement = meth.refinement
        meth = WeightedRTN()
        meth.refinement = refinement
    if meth.needs_calibration and calib is None:
        raise ArgumentError(f"method {meth.name} needs calibration text; pass --calib TEXTFILE")
    source = _rotated(model if isinstance(model, ModelSource) else open_model(model), rotation)
    arch = source.arch
    calibrated = [n for n in source.names() if arch.is_quantizable(n)] if calib is not None else []
    plan = plan_gguf_walk(
        source, mix, calibrated=calibrated, imatrix=im, imatrix_file=im_file, overrides=overrides
    )
    codecs = plan.codec_plan(arch.is_quantizable, embedding=f"{arch.embed}.weight")
    stats = WalkStats()
    if calib is not None:
        items = calibrate_walk(source, codecs, meth, calib, stats, progress=progress)
    else:
        items = walk_quantize(source, codecs, meth, stats, progress=progress, keep_grids=keep_grids)
    rep = write_gguf_walk(items, plan, out, force=force)
    label = meth.name or "rtn"
    if keep_grids:
        label += " (checkpoint grids kept)"
    if isinstance(meth, WeightedRTN):
        label = "rtn+imatrix"
    if rotation is not None:
        label += f"+{rotation.kind.value}"
    return rep, label, stats


def _quantized_checkpoint(model: str | Path | ModelSource) -> ModelSource | None:
    """``model`` opened, if it is a checkpoint whose linears are stored quantized (lowbit reads their
    codes and scales); None otherwise."""
    if not isinstance(model, str | Path):
        return model if model.holds_quantized else None
    cfg = Path(model) / "config.json"
    if not cfg.is_file() or "quantization_config" not in cfg.read_text():
        return None  # a float checkpoint or a GGUF file: no torch import on the fast path
    from lowbit.walk.sources import open_model

    src = open_model(model)
    if src.holds_quantized:
        return src
    src.close()
    return None


def _rotation(rotate: RotationConfig | str | None) -> RotationConfig | None:
    if rotate is None:
        return None
    from lowbit.transforms.rotation import RotationConfig, RotationKind

    if isinstance(rotate, RotationConfig):
        return rotate
    try:
        return RotationConfig(kind=RotationKind(rotate))
    except ValueError:
        kinds = ", ".join(k.value for k in RotationKind)
        raise ArgumentError(f"unknown rotation {rotate!r}; choose one of: {kinds}") from None


def _rotated(source: ModelSource, rotation: RotationConfig | None) -> ModelSource:
    """``source`` seen through ``rotation`` (None: as it is)."""
    if rotation is None:
        return source
    from lowbit.walk.rotated import RotatedSource

    return RotatedSource(source, rotation)


def simulate_scheme(
    source: ModelSource,
    scheme: str | None,
    method: str = "rtn",
    progress: bool = False,
    calib: CalibConfig | None = None,
    method_options: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], WalkStats]:
    """Float weights of ``source`` with ``scheme`` applied in memory, and the walk stats.

    Scales are in the dtype the scheme's output format stores for this model (fp16 where lowbit has no
    writer for that format yet), so the weights equal what :func:`quantize` writes, read back. For a
    scheme that quantizes activations, ``stats.activations`` says how each linear's input is quantized
    (pass it to the evaluator).
    """
    import torch

    from lowbit.export.hf_checkpoint import get_format, model_dtype
    from lowbit.methods.base import get_method
    from lowbit.walk.calibrate import calibrate_walk
    from lowbit.walk.quantize_walk import simulate

    sch = resolve_scheme(scheme, method)
    try:
        scale_dtype = get_format(sch.default_format, sch.activations).scale_dtype(model_dtype(source))
    except SchemeError:  # no writer registered for the format
        scale_dtype = torch.float16
    stats = WalkStats()
    meth = get_method(method, **(method_options or {}))
    codec = sch.codec(scale_dtype)
    if meth.needs_calibration and calib is None:
        raise ArgumentError(f"method {meth.name} needs calibration text")
    if sch.static_activations and calib is None:
        raise ArgumentError(
            f"scheme {sch.name} calibrates static activation scales; it needs calibration text"
        )
    if sch.activations is None and not meth.needs_calibration:
        return simulate(source, codec, meth, stats, progress=progress), stats
    if calib is not None and (meth.needs_calibration or sch.static_activations or meth.statistics):
        walk = calibrate_walk(
            source, codec, meth, calib, stats, progress=progress, activations=sch.activations
        )
    else:
        walk = walk_quantize(source, codec, meth, stats, progress=progress)
    items, stats.activations = _activation_sites(walk, sch.activations)
    weights = {
        it.name: codec.dequantize(it.quantized).to(torch.float32) if it.quantized is not None else it.tensor
        for it in items
    }
    return weights, stats

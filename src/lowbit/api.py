"""The library entry points the CLI calls: quantize a model to a file, simulate a scheme in memory."""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lowbit.calib.imatrix import Imatrix, load_imatrix
from lowbit.errors import ArgumentError, SchemeError
from lowbit.export.atomic import check_output
from lowbit.schemes import GGUF_FORMAT, gguf_mix_name, parse_scheme
from lowbit.walk.stats import WalkStats

# torch and the model walk load only for the paths that need them: GGUF mixes from a GGUF file run on
# numpy alone (torch's import is ~1.7 s and ~190 MB of the process).
if TYPE_CHECKING:
    import torch

    from lowbit.formats.base import Codec
    from lowbit.methods.base import Method
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
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}


def quantize(
    model: str | Path | ModelSource,
    scheme: str,
    out: str | Path,
    method: str = "rtn",
    fmt: str | None = None,
    force: bool = False,
    progress: bool = True,
    calib: CalibConfig | None = None,
    imatrix: str | Path | Imatrix | None = None,
) -> QuantizeReport:
    """Quantize every block linear of ``model`` with ``scheme`` and write ``out`` in ``fmt``.

    The model is read one block at a time; ``out`` appears only when complete. Methods that need
    calibration statistics (GPTQ, AWQ) take them from ``calib``, block by block. GGUF mixes (``Q4_K_M``
    ..., ``fmt="gguf"``, the default for them) are written by :func:`lowbit.export.gguf.write_gguf`,
    optionally guided by an importance matrix ``imatrix`` (a llama-imatrix/lowbit file or an
    :class:`~lowbit.calib.imatrix.Imatrix`).
    """
    out_path = Path(out)
    check_output(out_path, force)
    if (fmt or (GGUF_FORMAT if gguf_mix_name(scheme) else None)) == GGUF_FORMAT:
        return _quantize_gguf(model, scheme, out_path, method, force, progress, calib, imatrix)
    if imatrix is not None:
        raise ArgumentError("--imatrix is used only when writing GGUF (--format gguf with a GGUF mix)")
    from lowbit.export.hf_checkpoint import get_format, model_dtype, write_checkpoint
    from lowbit.methods.base import get_method
    from lowbit.walk.calibrate import calibrate_walk
    from lowbit.walk.sources import ModelSource, open_model

    sch = parse_scheme(scheme, fmt)
    fmt_name = fmt or sch.default_format
    if fmt_name not in sch.formats:
        raise SchemeError(
            f"scheme {sch.name} cannot be written as {fmt_name}; it is written as {', '.join(sch.formats)}"
        )
    exporter = get_format(fmt_name)
    meth = get_method(method)
    if meth.needs_calibration and calib is None:
        raise ArgumentError(f"method {meth.name} needs calibration text; pass --calib TEXTFILE")
    t0 = time.perf_counter()
    source = model if isinstance(model, ModelSource) else open_model(model)
    codec = sch.codec(exporter.scale_dtype(model_dtype(source)))
    shapes = [source.info(n).shape for n in source.names() if source.arch.is_quantizable(n)]
    exporter.check(codec, shapes)
    stats = WalkStats()
    if meth.needs_calibration:
        assert calib is not None
        items = calibrate_walk(source, codec, meth, calib, stats, progress=progress)
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
) -> QuantizeReport:
    """A llama-quantize mix as a GGUF file; the report's numbers are per tensor as written."""
    import math

    from lowbit.export.gguf import write_gguf
    from lowbit.formats.gguf.types import is_quantized

    sch = parse_scheme(scheme, GGUF_FORMAT)
    if method != "rtn" or calib is not None:
        from lowbit.methods.base import get_method

        get_method(method)  # an unknown name: the error that lists the methods
        raise ArgumentError(
            "GGUF mixes are quantized by ggml's own quantizers, guided by --imatrix FILE if given; "
            "--method and --calib do not apply to --format gguf"
        )
    im: Imatrix | None = None
    im_file: str | None = None
    if isinstance(imatrix, Imatrix):
        im = imatrix
    elif imatrix is not None:
        im = load_imatrix(imatrix)
        im_file = str(imatrix)
    t0 = time.perf_counter()
    rep = write_gguf(model, sch.name, out, imatrix=im, force=force, progress=progress, imatrix_file=im_file)
    quantized = [t for t in rep.tensors if t.quantizable and is_quantized(t.type)]
    return QuantizeReport(
        output=out,
        scheme=sch.name,
        method="ggml+imatrix" if im is not None else "ggml",
        format=GGUF_FORMAT,
        seconds=time.perf_counter() - t0,
        peak_rss_bytes=peak_rss_bytes(),
        file_bytes=rep.file_bytes,
        linear_bits_per_weight=rep.linear_bits_per_weight,
        codec_bits_per_weight=rep.linear_bits_per_weight,
        model_bits_per_weight=rep.model_bits_per_weight,
        mean_sqnr_db=math.nan,
        quantized_layers=len(quantized),
        stats=WalkStats(),
    )


def simulate_scheme(
    source: ModelSource,
    scheme: str,
    method: str = "rtn",
    progress: bool = False,
    calib: CalibConfig | None = None,
) -> tuple[dict[str, torch.Tensor], WalkStats]:
    """Float weights of ``source`` with ``scheme`` applied in memory, and the walk stats.

    Scales are in the dtype the scheme's output format stores for this model (fp16 where lowbit has no
    writer for that format yet), so the weights equal what :func:`quantize` writes, read back.
    """
    import torch

    from lowbit.export.hf_checkpoint import get_format, model_dtype
    from lowbit.methods.base import get_method
    from lowbit.walk.calibrate import calibrate_walk
    from lowbit.walk.quantize_walk import simulate

    sch = parse_scheme(scheme)
    try:
        scale_dtype = get_format(sch.default_format).scale_dtype(model_dtype(source))
    except SchemeError:  # no writer registered for the format
        scale_dtype = torch.float16
    stats = WalkStats()
    meth = get_method(method)
    codec = sch.codec(scale_dtype)
    if meth.needs_calibration:
        if calib is None:
            raise ArgumentError(f"method {meth.name} needs calibration text")
        items = calibrate_walk(source, codec, meth, calib, stats, progress=progress)
        weights = {
            it.name: codec.dequantize(it.quantized) if it.quantized is not None else it.tensor for it in items
        }
    else:
        weights = simulate(source, codec, meth, stats, progress=progress)
    return weights, stats

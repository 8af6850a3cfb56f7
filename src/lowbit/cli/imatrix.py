"""``lowbit imatrix MODEL --text FILE [--ctx 512] [--chunks N] -o OUT [--format gguf|dat] [--force]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lowbit.calib.imatrix import ImatrixFormat


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "imatrix",
        help="compute an importance matrix (llama-imatrix's) for llama-quantize --imatrix",
        description="Sum the squared inputs of every block linear over calibration text, in chunks of "
        "--ctx tokens with BOS at each chunk start, exactly as llama.cpp's llama-imatrix does, one "
        "transformer block at a time. Writes llama.cpp's GGUF imatrix (default) or its legacy .dat file.",
    )
    p.add_argument("model", help="Hugging Face model directory (safetensors) or .gguf file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="calibration text file (tokenized with the model's tokenizer)")
    src.add_argument(
        "--token-ids",
        help="token ids instead of text, as `llama-tokenize -m MODEL.gguf -f TEXT --ids --no-parse-special` "
        "prints them (to use llama.cpp's own tokenization)",
    )
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (llama-imatrix -c; default 512)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: all)")
    p.add_argument(
        "--process-output",
        action="store_true",
        help="also collect output.weight (lm_head), as llama-imatrix --process-output",
    )
    p.add_argument("--batch", type=int, default=4, help="chunks run through a block at once (default 4)")
    p.add_argument("-o", "--output", required=True, help="output file (written atomically)")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=[f.value for f in ImatrixFormat],
        default=None,
        help="gguf (llama-imatrix's default) or dat (legacy); default: dat if OUT ends in .dat, else gguf",
    )
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lowbit.calib.imatrix import (
        ImatrixConfig,
        compute_imatrix,
        read_token_ids,
        text_tokens,
        write_imatrix,
    )
    from lowbit.export.atomic import check_output
    from lowbit.walk.sources import open_model

    out = Path(args.output)
    check_output(out, args.force)
    config = ImatrixConfig(
        ctx=args.ctx, chunks=args.chunks, process_output=args.process_output, batch=args.batch
    )
    t0 = time.perf_counter()
    with open_model(args.model) as source:
        if args.text is not None:
            dataset = args.text
            tokens, bos = text_tokens(source, Path(args.text))
        else:
            dataset = args.token_ids
            tokens, bos = read_token_ids(Path(args.token_ids), source)
        im = compute_imatrix(source, tokens, bos, config, dataset=dataset, progress=sys.stderr.isatty())
    fmt = ImatrixFormat(args.fmt) if args.fmt else ImatrixFormat.for_path(out)
    write_imatrix(im, out, fmt, force=args.force)
    print(
        f"{out}: importance matrix ({fmt.value}) of {len(im)} weights from {im.chunk_count} chunks x "
        f"{im.chunk_size} tokens of {dataset}, {time.perf_counter() - t0:.1f} s"
    )
    return 0

"""The ``lowbit`` command: subcommands parse arguments, call the library and print.

Each subcommand lives in its own module exposing ``register(subparsers) -> None``, which adds its parser
and sets ``func`` (``Callable[[argparse.Namespace], int]``) as the parser default.
Any :class:`lowbit.errors.LowbitError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from lowbit import __version__
from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")

# Subcommand modules, in the order `lowbit --help` lists them.
SUBCOMMANDS: tuple[str, ...] = ("demo", "quantize", "imatrix", "eval", "fit", "inspect")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Quantize language models, write files real runtimes load, and measure what was lost.",
    )
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"lowbit.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (
        logging.ERROR if args.quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was completed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

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
SUBCOMMANDS: tuple[str, ...] = ("demo", "quantize", "imatrix", "eval", "compare", "fit", "inspect")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``only``) one with just that subcommand: each subcommand module imports
    the library it drives, and ``lowbit quantize`` need not pay for importing the others'."""
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Quantize language models, write files real runtimes load, and measure what was lost.",
    )
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS if only is None else (only,):
        module = importlib.import_module(f"lowbit.cli.{name}")
        module.register(sub)
    return parser


def _subcommand(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (its first word that is not an option), if it is one of ours."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in SUBCOMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_subcommand(argv))
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

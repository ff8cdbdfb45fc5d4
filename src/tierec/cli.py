"""The `tierec` command line.

Each command group lives next to the code it drives and exposes
``register(subparsers)``; every sub-parser sets ``func(args) -> int``.
User errors (`TierecError`) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tierec import __version__
from tierec.errors import TierecError

# Modules that add sub-commands, in the order they appear in --help.
COMMAND_MODULES = [
    "tierec.data.commands",  # tierec data synth|convert|info|verify
    "tierec.train.commands",  # tierec train|eval|demo
    "tierec.analyze",  # tierec analyze
    "tierec.inference.commands",  # tierec serve
    "tierec.storage.commands",  # tierec probe
]

log = logging.getLogger("tierec")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tierec",
        description="Train and serve recommendation models whose embedding tables are bigger than memory.",
    )
    p.add_argument("--version", action="version", version=f"tierec {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TierecError as e:
        print(f"tierec: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tierec: interrupted", file=sys.stderr)
        return 130

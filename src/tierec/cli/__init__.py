"""The `tierec` command line.

The command-line layer, on top of every other: one module per command group in this
package (``tierec.cli.data``, ``train``, ``analyze``, ``export``, ``serve``, ``probe``), each with
``register(subparsers)``; every sub-parser sets ``func(args) -> int``. Argument parsing
lives here only; the layers below take typed configs and plain arguments.

One handler (`run_command`) maps every *expected* error to one line on stderr and
exit code 2, never a traceback: user errors (`TierecError`), and what the world can
do to a run -- file-system errors (disk full, permissions, a path that is a file),
undecodable text, unreadable Arrow/Parquet data, truncated compressed input. A
closed stdout (``tierec data info | head``) ends quietly. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import zlib

from tierec import __version__
from tierec.errors import TierecError

# Modules that add sub-commands, in the order they appear in --help.
COMMAND_MODULES = [
    "tierec.cli.data",  # tierec data synth|convert|cluster|info|verify
    "tierec.cli.train",  # tierec train|eval
    "tierec.cli.demo",  # tierec demo
    "tierec.cli.checkpoint",  # tierec checkpoint list|verify|compact
    "tierec.cli.export",  # tierec export
    "tierec.cli.analyze",  # tierec analyze
    "tierec.cli.serve",  # tierec serve
    "tierec.cli.serve_many",  # tierec serve-many
    "tierec.cli.cascade",  # tierec distill-exit
    "tierec.cli.probe",  # tierec probe
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
    return run_command(args.func, args)


def describe_error(e: BaseException) -> str | None:
    """One line for an expected error (module doc), or None for one that is a bug."""
    import pyarrow as pa

    if isinstance(e, TierecError):
        return str(e)
    if isinstance(e, OSError) and not isinstance(e, pa.ArrowException):
        where = f"{e.filename}: " if e.filename else ""
        what = e.strerror or str(e) or type(e).__name__
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            what += " (the disk is full; files being written were discarded, earlier checkpoints are intact)"
        return f"{where}{what}"
    if isinstance(e, UnicodeError):
        return f"text is not valid UTF-8 ({e})"
    if isinstance(e, (pa.ArrowException, zlib.error, EOFError)):
        first = str(e).strip().splitlines()[0] if str(e).strip() else "truncated input"
        return f"cannot read the data ({type(e).__name__}: {first})"
    return None


def run_command(func, args) -> int:
    """Run a sub-command; expected errors become one line and exit 2 (module doc)."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("tierec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our stdout went away (`| head`): nothing left to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not raise again
        return 141
    except Exception as e:
        message = describe_error(e)
        if message is None:
            raise
        print(f"tierec: error: {' '.join(message.split())}", file=sys.stderr)
        return getattr(e, "exit_code", 2)

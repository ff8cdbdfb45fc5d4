"""User-facing errors.

Anything the user can fix (bad input file, bad flag, bad config) raises a
`TierecError`; the CLI prints its message on one line and exits with code 2,
without a traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class TierecError(Exception):
    """An error caused by user input; its message is shown as-is."""

    exit_code = 2


class DataError(TierecError):
    """Malformed input data: names the file and line (1-based) when known."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path, self.line, self.reason = path, line, message
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)


class ConfigError(TierecError):
    """A config file or flag that is unknown, mistyped or out of range."""


class CheckpointError(TierecError):
    """A checkpoint or table file that is missing, truncated or corrupt."""

"""The run directory of `tierec train`: claimed by one process at a time, never reused silently.

A run directory (``--out``) holds ``metrics.jsonl``, ``checkpoints/`` and, by default, the
SSD working files in ``tables/``. `claim_run_dir`

- refuses an existing run unless ``resume`` (continue it) or ``overwrite`` (delete its
  metrics, checkpoints and working tables first): training into it silently would append
  to its metrics and repoint its ``LATEST``;
- takes an exclusive ``flock`` on ``OUT/.lock`` (released when the `RunLock` is closed or
  the process ends, even by ``kill -9``), so a second `tierec train` on the same ``--out``
  stops at once instead of pruning the first one's checkpoints.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
from pathlib import Path

from tierec.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
RUN_ENTRIES = ("metrics.jsonl", "checkpoints", "tables")  # what a run writes into its directory


class RunLock:
    """An exclusive lock on a run directory (``OUT/.lock``, holding the owner's pid)."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = os.pread(self._fd, 32, 0).decode("ascii", "replace").strip()
            os.close(self._fd)
            self._fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" (pid {owner})" if owner.isdigit() else ""
                raise ConfigError(f"{out}: another tierec train is using this run directory{who}; wait for it "
                                  "or choose another --out") from None
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __del__(self):
        self.close()


def existing_run(out: Path) -> list[str]:
    """The run entries (metrics, checkpoints with something in them) already in ``out``."""
    found = []
    if (out / "metrics.jsonl").exists():
        found.append("metrics.jsonl")
    ck = out / "checkpoints"
    if ck.is_dir() and any(ck.iterdir()):
        found.append("checkpoints/")
    return found


def make_run_dir(out: Path) -> None:
    """Create ``out`` (and parents), or say in one line why it cannot be a run directory."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write a run directory there ({e.strerror})") from None


def claim_run_dir(out: str | os.PathLike, resume: bool, overwrite: bool) -> RunLock:
    """Create and lock run directory ``out`` for one training process (module doc); returns the lock."""
    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run, or start it over")
    make_run_dir(out)
    lock = RunLock(out)
    found = existing_run(out)
    if found and not resume:
        if not overwrite:
            lock.close()
            raise ConfigError(f"--out {out}: already holds a run ({', '.join(found)}); pass --resume to continue it "
                              "or --overwrite to start over (deletes them)")
        log.warning("--overwrite: deleting the run in %s (%s)", out, ", ".join(found))
        for name in RUN_ENTRIES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return lock

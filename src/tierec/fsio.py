"""Small file-system helpers: checksums, atomic writes, directory fsync, whole-array positional I/O."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

MAX_IO = 1 << 26  # bytes per preadv/pwritev call (Linux caps one call at ~2 GiB)


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(bufsize):
            h.update(b)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames and new entries in it are durable (or a closed file: its bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def transfer_all(op, fd: int, buf: np.ndarray, offset: int, where: str | os.PathLike, what: str) -> None:
    """Every byte of the contiguous array ``buf`` written to (``op=os.pwritev``) or read into (``os.preadv``) file
    ``fd`` at byte ``offset``, at most `MAX_IO` bytes per call; OSError (EIO) naming ``where`` on a short one."""
    mv = memoryview(buf.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy stubs: a Buffer on 3.12+ only
    done = 0
    while done < len(mv):
        n = op(fd, [mv[done : done + MAX_IO]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"{where}: short {what} at byte {offset + done}")
        done += n

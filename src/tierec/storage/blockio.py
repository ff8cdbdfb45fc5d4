"""Block I/O of table files: rows -> aligned block runs, and running those runs.

A set of rows (byte offsets in a file) maps to the ``align``-byte blocks that hold them;
overlapping or adjacent blocks are coalesced into *runs* (`plan_runs`, vectorised), laid end to
end in one buffer. The runs are then read or written with one ``os.preadv`` per run
(`pread_exact`) or all at once through Linux native AIO (`aio_runs`, `tierec.storage.aio`)
where `use_aio` says it applies. Also here: the process's shared I/O threads (`io_pool`),
opening a file with ``O_DIRECT`` (`open_direct`), probing the smallest direct-I/O block a
descriptor takes (`direct_align`), and writing a new file front to back past the page cache
(`SequentialWriter`: checkpoints' row sets). See docs/storage.md.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tierec.fsio import MAX_IO, transfer_all
from tierec.storage import aio

ALIGN = 4096  # O_DIRECT block size and buffer alignment
SECTOR = 512  # the smallest direct I/O a device may take (its logical sector): what reading one row costs at least
IO_LANES = 8  # concurrent preadv loops of one batched read (a random row read waits on the device)


class BlockPlan(NamedTuple):
    """The block runs that hold a sorted set of rows: run file offsets, byte lengths and buffer
    offsets (int64 [R], multiples of ALIGN), each row's float offset in the buffer [U], buffer
    bytes, and the index of each run's first row [R]."""

    foff: np.ndarray
    nbytes: np.ndarray
    boff: np.ndarray
    pos: np.ndarray
    total: int
    first: np.ndarray  # index of each run's first row [R]


def plan_runs(start: np.ndarray, row_bytes: int, group: np.ndarray | None = None, align: int = ALIGN,
              gap: int = 0) -> BlockPlan:
    """Rows at byte offsets ``start`` (int64 [U], ascending within each ``group``, groups contiguous)
    -> the ``align``-byte block runs that hold them (overlapping/adjacent blocks of one group
    coalesced, vectorised) and where each row lands in a buffer of the runs laid end to end.
    ``align=ALIGN`` for O_DIRECT; 4 (exactly the rows' bytes) for buffered reads. Reads may pass
    ``gap`` > 0: runs at most ``gap`` blocks apart are merged, reading the blocks between (a dense
    set of rows -- a cache warm-up -- then costs a few large reads instead of one per block)."""
    if start.size == 0:
        e = np.empty(0, np.int64)
        return BlockPlan(e, e, e, e, 0, e)
    blo = start // align
    bhi = (start + row_bytes + align - 1) // align
    new = np.empty(start.size, bool)
    new[0] = True
    new[1:] = blo[1:] > bhi[:-1] + gap
    if group is not None:
        new[1:] |= group[1:] != group[:-1]
    first = np.flatnonzero(new)
    run_of = np.cumsum(new) - 1
    run_lo = blo[first]
    last = np.append(first[1:], start.size) - 1
    run_len = bhi[last] - run_lo
    run_buf = np.concatenate([[0], np.cumsum(run_len)[:-1]])
    pos = (run_buf[run_of] * align + start - run_lo[run_of] * align) // 4  # float index of each row
    return BlockPlan(run_lo * align, run_len * align, run_buf * align, pos, int(run_len.sum()) * align, first)


def pread_exact(fd: int, mv: memoryview, foff: int, nbytes: int, boff: int, size: int, path) -> int:
    """Read file bytes [foff, foff + nbytes) -- clipped at the file's ``size`` -- into ``mv[boff:]``,
    one ``preadv`` per MAX_IO; bytes read."""
    want, done = min(nbytes, size - foff), 0
    while done < want:
        r = os.preadv(fd, [mv[boff + done : boff + min(nbytes, done + MAX_IO)]], foff + done)
        if r <= 0:
            raise OSError(errno.EIO, f"{path}: short read at byte {foff + done}")
        done += r
    return done


def aio_runs(opcode: int, fds: np.ndarray, foff: np.ndarray, nbytes: np.ndarray, addrs: np.ndarray,
             sizes: np.ndarray, path_of) -> int:
    """Block runs through Linux AIO (`tierec.storage.aio`), ``opcode`` one for all runs or one per run:
    run i moves ``nbytes[i]`` bytes at file offset ``foff[i]`` of ``fds[i]`` (a file of ``sizes[i]``
    bytes: a read of its last block stops at the end) from/to address ``addrs[i]``. All in flight at
    once, no Python per run; bytes moved. ``path_of(i)`` names run i's file in an error."""
    res = aio.ring().run(opcode, fds, foff, nbytes, addrs)
    reads = np.asarray(opcode) == aio.IOCB_CMD_PREAD
    want = np.where(reads, np.minimum(nbytes, sizes - foff), nbytes)
    bad = np.flatnonzero(res != want)
    if bad.size:
        i = int(bad[0])
        what = "read" if np.broadcast_to(reads, res.shape)[i] else "write"
        if res[i] < 0:
            raise OSError(int(-res[i]), f"{path_of(i)}: {what} at byte {int(foff[i])}: {os.strerror(int(-res[i]))}")
        raise OSError(errno.EIO, f"{path_of(i)}: short {what} at byte {int(foff[i])} ({int(res[i])} of {int(want[i])})")
    return int(want.sum())


def use_aio(odirect: bool, nbytes: np.ndarray) -> bool:
    """Batched AIO for O_DIRECT block runs (buffered descriptors would make the kernel run them one by one)."""
    return odirect and nbytes.size > 0 and int(nbytes.max()) <= MAX_IO and aio.available()


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def io_pool() -> ThreadPoolExecutor:
    """The process's shared threads for concurrent table reads (``IO_LANES - 1``, started on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(IO_LANES - 1, thread_name_prefix="tierec-ssd-io")
        return _pool


def open_direct(path: Path) -> int:
    """Open ``path`` with O_DIRECT (a function so that tests can make it fail)."""
    return os.open(path, os.O_RDWR | os.O_DIRECT)


def direct_align(fd: int, want: int, file_bytes: int) -> int:
    """``want`` if the O_DIRECT descriptor ``fd`` takes reads of ``want`` bytes at ``want``-aligned offsets
    (a device with 512-byte logical sectors takes 512), else ALIGN."""
    if file_bytes < 2 * want:
        return ALIGN
    buf = aio.aligned_buffer(want)
    try:
        got = os.preadv(fd, [memoryview(buf)], want)  # type: ignore[arg-type]  # numpy stubs: a Buffer on 3.12+ only
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return ALIGN
    return want if got == want else ALIGN


WRITE_BUFFER = 1 << 23  # bytes a `SequentialWriter` gathers before one O_DIRECT write (whole blocks)
SMALL_FILE = 1 << 20  # a `SequentialWriter`'s file of at most this many bytes goes through the page cache at close


class SequentialWriter:
    """A new file written front to back, with O_DIRECT where the file system takes it: the bytes go from one aligned
    buffer of `WRITE_BUFFER` bytes to the device, not through the page cache, so writing costs a copy instead of the
    page cache's allocation and later writeback, and ``close(sync=True)`` has only the metadata left to flush
    (measured in docs/storage.md, "Checkpoints at 1.2x RAM"). Elsewhere (tmpfs, some network file systems:
    EINVAL) buffered, positional writes. Not thread-safe: one writer."""

    def __init__(self, path: str | os.PathLike, buffer_bytes: int = WRITE_BUFFER):
        self.path, self.size = Path(path), 0  # bytes written so far
        flags, direct = os.O_WRONLY | os.O_CREAT | os.O_TRUNC, getattr(os, "O_DIRECT", 0)  # none on macOS
        self.fd, self.direct = -1, bool(direct)
        if direct:
            try:
                self.fd = os.open(self.path, flags | direct, 0o666)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False
        if not self.direct:
            self.fd = os.open(self.path, flags, 0o666)
        self._buf = aio.aligned_buffer(max(ALIGN, buffer_bytes // ALIGN * ALIGN)) if self.direct else None
        self._fill = 0  # bytes waiting in the buffer; they go at file byte size - fill

    def write(self, data) -> None:
        """Append ``data`` (bytes or a contiguous buffer)."""
        src = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        if self._buf is None:
            transfer_all(os.pwritev, self.fd, src, self.size, self.path, "write")
            self.size += src.size
            return
        pos = 0
        while pos < src.size:
            n = min(src.size - pos, self._buf.size - self._fill)
            self._buf[self._fill : self._fill + n] = src[pos : pos + n]
            self._fill, pos, self.size = self._fill + n, pos + n, self.size + n
            if self._fill == self._buf.size:
                self._flush()

    def _flush(self) -> None:
        """The buffer's bytes to the file, the last block padded with zeros (`close` cuts the file to its size)."""
        n = -(-self._fill // ALIGN) * ALIGN
        assert self._buf is not None
        self._buf[self._fill : n] = 0
        try:
            transfer_all(os.pwritev, self.fd, self._buf[:n], self.size - self._fill, self.path, "write")
        except OSError as e:  # a file system that opens O_DIRECT but refuses its writes: buffered from here on
            if e.errno != errno.EINVAL or not self.direct:
                raise
            self._buffered()
            transfer_all(os.pwritev, self.fd, self._buf[:n], self.size - self._fill, self.path, "write")
        self._fill = 0

    def _buffered(self) -> None:
        """Write through the page cache from here on (O_DIRECT cleared on the open descriptor)."""
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def close(self, sync: bool = True) -> None:
        """Write what is left, cut the file to the bytes written and, with ``sync``, fsync it. A file of at most
        `SMALL_FILE` bytes (all still in the buffer) is written through the page cache instead: one O_DIRECT
        write is a device round trip in the caller's thread, where a checkpoint writes two small files per
        table and fsyncs them on other threads (docs/storage.md, "Checkpoints at 1.2x RAM")."""
        if self.fd < 0:
            return
        try:
            if self.direct and 0 < self._fill == self.size <= SMALL_FILE:
                self._buffered()
                assert self._buf is not None
                transfer_all(os.pwritev, self.fd, self._buf[: self._fill], 0, self.path, "write")
                self._fill = 0
            elif self._fill:
                self._flush()
                os.ftruncate(self.fd, self.size)
            if sync:
                os.fsync(self.fd)
        finally:
            self.discard()

    def discard(self) -> None:
        """Close without writing what is left (after an error: the file is not used). Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

"""Weights kept on the SSD tier and read back block by block, ahead of use (dense weights off-device).

`WeightFile`: a process-private file of *blocks*, each the float32 tensors of one layer laid end to
end (every tensor at a 64-byte offset, every block at a 4 KiB file offset and a whole number of 4 KiB
pages: O_DIRECT reads need nothing else), with a crc32 per block. It is written once (`append`,
`finish`: fsync, then the page cache dropped with ``POSIX_FADV_DONTNEED``), rewritten in place only by
`rewrite` (a live update of the same layers), and read with O_DIRECT (large blocks in 1 MiB runs through
one Linux AIO submission, `tierec.storage.blockio.aio_runs`; else ``preadv``) or through the page cache.
Every read is checked against its block's crc32 (``verify``): a corrupt or stale block raises
`WeightFileError` naming the file and the block instead of computing with wrong weights.

`BlockStream`: the blocks consumed one at a time by one thread (the model thread) in a mostly repeating
order, read ahead by one reader thread into a ring of ``depth + 1`` aligned buffers: while the consumer
computes with block i, blocks i+1 .. i+depth are read. The order is learnt as the consumer goes (the
block that followed each block last time); a block that was not predicted is read on demand, and
predicted blocks that were skipped (a sparse mixture of experts that did not run) are dropped. ``depth
== 0`` reads every block on demand on the consumer's thread (no reader thread, one buffer).

Thread safety: `acquire` / `release` / `quiesce` / `close` belong to one consumer thread; the reader thread
only reads into the slots the consumer handed it (slot state under one condition variable); `stats` may be
read from any thread.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import time
import zlib
from collections import deque
from pathlib import Path

import numpy as np

from tierec.errors import CheckpointError
from tierec.storage import aio, blockio

log = logging.getLogger(__name__)

BLOCK_ALIGN = 4096  # file offset and size of every block: O_DIRECT needs no more
TENSOR_ALIGN = 64  # each tensor's offset in its block (what torch's CPU allocator gives a tensor)
AIO_RUN = 1 << 20  # O_DIRECT blocks larger than this are read as 1 MiB runs, all in flight at once


class WeightFileError(CheckpointError):
    """A block of a weight file that cannot be read back as written (short read, crc32 mismatch)."""


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def block_layout(nbytes: list[int]) -> tuple[list[int], int]:
    """Byte sizes of a block's tensors -> (their offsets in the block, block bytes: whole 4 KiB pages)."""
    offs, a = [], 0
    for n in nbytes:
        offs.append(a)
        a = _round_up(a + n, TENSOR_ALIGN)
    return offs, max(BLOCK_ALIGN, _round_up(a, BLOCK_ALIGN))


class WeightFile:
    """Blocks of float32 tensors in one file under ``directory`` (created private, removed by `close`)."""

    def __init__(self, directory: str | os.PathLike | None = None, direct_io: bool = True, verify: bool = True,
                 prefix: str = "tierec-dense-"):
        d = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".weights", dir=d)
        self.path = Path(name)
        self._wfd: int | None = fd
        self._rfd: int | None = None
        self.want_direct, self.direct, self.verify = bool(direct_io), False, bool(verify)
        self.blocks: list[tuple[int, int]] = []  # (file offset, bytes) per block
        self.crcs: list[int] = []
        self.size = 0
        self.bytes_read = 0
        self._count = threading.Lock()  # reads run on the reader thread and (on demand) on the consumer's

    @staticmethod
    def _pack(arrays: list[np.ndarray], offs: list[int], nbytes: int) -> np.ndarray:
        buf = aio.aligned_buffer(nbytes)
        buf[:] = 0
        for a, o in zip(arrays, offs, strict=True):
            raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            buf[o : o + raw.size] = raw
        return buf

    def append(self, arrays: list[np.ndarray]) -> tuple[int, list[int]]:
        """Write one block holding ``arrays`` (any dtype, copied as bytes); -> (block index, each array's
        byte offset in the block)."""
        if self._wfd is None:
            raise RuntimeError(f"{self.path}: closed")
        offs, nbytes = block_layout([a.nbytes for a in arrays])
        buf = self._pack(arrays, offs, nbytes)
        self._write(self.size, buf)
        self.blocks.append((self.size, nbytes))
        self.crcs.append(zlib.crc32(buf))  # type: ignore[arg-type]  # numpy stubs: a Buffer on 3.12+ only
        self.size += nbytes
        return len(self.blocks) - 1, offs

    def rewrite(self, i: int, arrays: list[np.ndarray]) -> None:
        """New contents for block ``i`` (the same tensors' sizes): written, synced, its crc32 replaced. No read of
        the block may be in flight (`BlockStream.quiesce`)."""
        offs, nbytes = block_layout([a.nbytes for a in arrays])
        foff, have = self.blocks[i]
        if nbytes != have:
            raise ValueError(f"{self.path}: block {i} holds {have} bytes, new contents need {nbytes}")
        buf = self._pack(arrays, offs, nbytes)
        self._write(foff, buf)
        self.crcs[i] = zlib.crc32(buf)  # type: ignore[arg-type]

    def _write(self, foff: int, buf: np.ndarray) -> None:
        fd = self._wfd if self._wfd is not None else self._rfd
        assert fd is not None
        mv, done = memoryview(buf), 0  # type: ignore[arg-type]  # numpy stubs: a Buffer on 3.12+ only
        while done < buf.size:
            done += os.pwrite(fd, mv[done : done + blockio.MAX_IO], foff + done)
        if self._rfd is not None:  # a rewrite after `finish`: on disk, and out of the page cache again
            self._settle()

    def finish(self) -> None:
        """Done writing: sync the file, open it for reads (O_DIRECT where asked for and the file system takes
        it; else buffered, logged) and drop its pages from the page cache (O_DIRECT mode)."""
        assert self._wfd is not None
        fd = self._wfd
        if self.want_direct:
            try:
                self._rfd = blockio.open_direct(self.path)
                self.direct = True
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                log.warning("%s: the file system refuses O_DIRECT (%s): dense weights are read through the page "
                            "cache", self.path.parent, e.strerror)
        if self._rfd is None:
            self._rfd = os.open(self.path, os.O_RDWR)
        self._wfd = None
        self._settle(fd)
        os.close(fd)

    def _settle(self, fd: int | None = None) -> None:
        fd = fd if fd is not None else self._rfd
        assert fd is not None
        os.fsync(fd)
        if self.direct and hasattr(os, "posix_fadvise"):  # written through the page cache: drop those pages
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read_into(self, i: int, buf: np.ndarray) -> int:
        """Block ``i`` into ``buf`` (uint8, 4 KiB-aligned, at least the block's bytes), checked against its crc32
        (``verify``); bytes read."""
        fd = self._rfd
        if fd is None:
            raise RuntimeError(f"{self.path}: not open for reading (finish() first, or closed)")
        foff, n = self.blocks[i]
        if self.direct and n > AIO_RUN and aio.available():
            runs = np.arange(0, n, AIO_RUN, dtype=np.int64)
            lens = np.minimum(AIO_RUN, n - runs)
            blockio.aio_runs(aio.IOCB_CMD_PREAD, np.full(runs.size, fd, np.int64), foff + runs, lens,
                             buf.ctypes.data + runs, np.full(runs.size, self.size, np.int64),
                             lambda _: self.path)
        else:
            blockio.pread_exact(fd, memoryview(buf), foff, n, 0, self.size, self.path)  # type: ignore[arg-type]
        if self.verify and zlib.crc32(buf[:n]) != self.crcs[i]:  # type: ignore[arg-type]
            raise WeightFileError(f"{self.path}: block {i} (bytes {foff}..{foff + n}) does not match its crc32 "
                                  "(corrupt weight file)")
        with self._count:
            self.bytes_read += n
        return n

    def close(self) -> None:
        for name in ("_wfd", "_rfd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass


FREE, PENDING, READING, READY, HELD = range(5)


class _Slot:
    __slots__ = ("buf", "state", "block", "gen", "cancel", "error")

    def __init__(self, nbytes: int):
        self.buf = aio.aligned_buffer(max(nbytes, BLOCK_ALIGN))
        self.state, self.block, self.gen, self.cancel = FREE, -1, 0, False
        self.error: BaseException | None = None


class BlockStream:
    """Blocks of ``wf`` handed to one consumer thread, ``depth`` blocks read ahead (module doc).

    ``order``: the blocks in the order the consumer first wants them (it repeats: after the last comes the first
    again); later, the block that followed each block last time is predicted to follow it again."""

    def __init__(self, wf: WeightFile, order: list[int], depth: int = 2):
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.wf, self.depth = wf, int(depth)
        biggest = max((wf.blocks[b][1] for b in order), default=BLOCK_ALIGN)
        self.slots = [_Slot(biggest) for _ in range(self.depth + 1)]
        self.slot_bytes = biggest
        self.next = {b: order[(k + 1) % len(order)] for k, b in enumerate(order)}
        self.outstanding: deque[int] = deque()  # slots submitted to the reader, in prediction order
        self.held: int | None = None  # the slot the consumer computes with
        self.last: int | None = None  # the block acquired last (to learn the order)
        self.wait_s = 0.0
        self.acquires = self.demand_reads = self.discarded = 0
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, int]] = deque()  # (slot, generation) for the reader
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.depth:
            self._thread = threading.Thread(target=self._reader, name="tierec-dense-prefetch", daemon=True)
            self._thread.start()
            if order:
                self._top_up(order[-1])  # the first blocks are read while the server finishes starting

    @property
    def buffer_bytes(self) -> int:
        return sum(s.buf.nbytes for s in self.slots)

    # ------------------------------------------------------------------ reader thread
    def _reader(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                si, gen = self._queue.popleft()
                s = self.slots[si]
                if s.gen != gen or s.state != PENDING:
                    continue
                s.state = READING
            err: BaseException | None = None
            try:
                self.wf.read_into(s.block, s.buf)
            except BaseException as e:  # noqa: BLE001 -- handed to the consumer, raised there
                err = e
            with self._cond:
                s.error = err
                if s.cancel:
                    s.state, s.cancel = FREE, False
                else:
                    s.state = READY
                self._cond.notify_all()

    # ------------------------------------------------------------------ consumer thread
    def _submit(self, block: int) -> bool:
        with self._cond:
            for si, s in enumerate(self.slots):
                if s.state == FREE:
                    s.state, s.block, s.error, s.cancel = PENDING, block, None, False
                    s.gen += 1
                    self._queue.append((si, s.gen))
                    self.outstanding.append(si)
                    self._cond.notify_all()
                    return True
        return False

    def _drop(self, si: int) -> None:
        """Give up outstanding slot ``si`` (a misprediction): free now, or once its read in flight ends."""
        with self._cond:
            s = self.slots[si]
            if s.state == READING:
                s.cancel = True
            else:
                s.state = FREE
        self.discarded += 1

    def _top_up(self, after: int) -> None:
        """Submit the predicted successors of block ``after`` that are not outstanding yet, into free slots."""
        if not self.depth:
            return
        queued = [self.slots[si].block for si in self.outstanding]
        want, b = [], after
        for _ in range(self.depth + 1):
            b = self.next[b]
            want.append(b)
        # the outstanding reads must be the prefix of the prediction; a stale tail is dropped
        k = 0
        while k < len(queued) and k < len(want) and queued[k] == want[k]:
            k += 1
        while len(self.outstanding) > k:
            self._drop(self.outstanding.pop())
        for b in want[k:]:
            if not self._submit(b):
                break

    def acquire(self, block: int) -> np.ndarray:
        """Block ``block``'s bytes (a view of a ring buffer, valid until `release` or the next `acquire`); waits
        for its read (prefetched, or read now if it was not predicted). Raises `WeightFileError` for a block that
        fails its check."""
        t0 = time.perf_counter()
        if self.held is not None:
            self.release()
        if self.last is not None and self.next.get(self.last) != block:
            self.next[self.last] = block  # learn the order
        self.last = block
        self.acquires += 1
        hit = None
        for k, si in enumerate(self.outstanding):
            if self.slots[si].block == block:
                hit = k
                break
        if hit is None:
            while self.outstanding:
                self._drop(self.outstanding.popleft())
            si = self._read_now(block)
        else:
            for _ in range(hit):
                self._drop(self.outstanding.popleft())
            si = self.outstanding.popleft()
            s = self.slots[si]
            with self._cond:
                while s.state in (PENDING, READING):
                    self._cond.wait()
                s.state = HELD
            if s.error is not None:
                err, s.error, s.state = s.error, None, FREE
                self.wait_s += time.perf_counter() - t0
                raise err
        self.held = si
        self._top_up(block)
        self.wait_s += time.perf_counter() - t0
        s = self.slots[si]
        return s.buf[: self.wf.blocks[block][1]]

    def _read_now(self, block: int) -> int:
        """Read ``block`` on this thread into a free slot (one exists: at most one read is in flight)."""
        with self._cond:
            while True:
                free = [si for si, s in enumerate(self.slots) if s.state == FREE]
                if free:
                    break
                self._cond.wait()
            si = free[0]
            s = self.slots[si]
            s.state, s.block, s.error, s.cancel = HELD, block, None, False
            s.gen += 1
        self.demand_reads += 1
        try:
            self.wf.read_into(block, s.buf)
        except BaseException:
            with self._cond:
                s.state = FREE
            raise
        return si

    def release(self) -> None:
        """The consumer is done with the block it holds: its buffer goes back to the ring (and the next predicted
        block is read into it)."""
        si, self.held = self.held, None
        if si is None:
            return
        with self._cond:
            self.slots[si].state = FREE
        if self.last is not None:
            self._top_up(self.last)

    def quiesce(self) -> None:
        """Drop every read ahead and wait until none is in flight (before `WeightFile.rewrite`)."""
        if self.held is not None:
            self.release()
        while self.outstanding:
            self._drop(self.outstanding.popleft())
        with self._cond:
            while any(s.state == READING for s in self.slots):
                self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None

    def stats(self) -> dict:
        return {"bytes_read": self.wf.bytes_read, "wait_seconds": self.wait_s, "acquires": self.acquires,
                "demand_reads": self.demand_reads, "discarded": self.discarded, "buffer_bytes": self.buffer_bytes}

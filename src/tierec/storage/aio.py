"""Batched block I/O through Linux native AIO (``io_submit`` / ``io_getevents``), by ctypes.

Reading the scattered 4 KiB blocks of a batch's missed rows one ``os.preadv`` at a time costs a
system call, a thread hand-off and a GIL round trip per block. Worse, every time a read returns,
its thread must take the GIL back: while another thread runs Python (the server's event loop
parsing a request, the trainer's Python between kernels) that wait lasts up to the interpreter's
switch interval, per read (what that cost `tierec serve` is measured in docs/serving.md).

`AioRing.run` instead describes every block of a batch in one vectorised array of ``struct
iocb`` (numpy, no per-block Python), hands them to the kernel with ``io_submit`` and waits for
them with ``io_getevents``: a few system calls per batch, all blocks in flight at once (up to
``depth``), and the GIL released during each call, so nothing in Python runs per block. With
``O_DIRECT`` file descriptors the kernel runs the reads truly asynchronously.

Linux only (x86-64 and aarch64 system call numbers); `available()` says whether it works here
(the syscalls may be refused, e.g. by a seccomp profile or ``fs.aio-max-nr``), and callers fall
back to the thread lanes of `tierec.storage.multifile` otherwise.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import threading

import numpy as np

log = logging.getLogger(__name__)

IOCB_CMD_PREAD, IOCB_CMD_PWRITE = 0, 1
DEPTH = 256  # most blocks in flight per ring

# struct iocb (linux/aio_abi.h, little-endian field order: aio_key before aio_rw_flags): 64 bytes
IOCB = np.dtype([("data", "<u8"), ("key", "<u4"), ("rw_flags", "<i4"), ("opcode", "<u2"), ("reqprio", "<i2"),
                 ("fildes", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"),
                 ("flags", "<u4"), ("resfd", "<u4")])
EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])  # struct io_event

_SYSCALLS = {"x86_64": (206, 207, 208, 209), "amd64": (206, 207, 208, 209),  # setup, destroy, getevents, submit
             "aarch64": (0, 1, 4, 2), "arm64": (0, 1, 4, 2)}
_NR = _SYSCALLS.get(platform.machine().lower()) if os.name == "posix" and platform.system() == "Linux" else None
_libc = None
_state: dict = {"ok": None}
_local = threading.local()


def _syscall(nr: int, *args: int) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    r = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))  # GIL released during the call
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


class AioRing:
    """One kernel AIO context (``io_setup``) of ``depth`` slots; use one per thread (`ring()`)."""

    def __init__(self, depth: int | None = None):
        if _NR is None:
            raise OSError(errno.ENOSYS, "Linux AIO is not available on this platform")
        self._nr = _NR  # system call numbers: setup, destroy, getevents, submit
        self.depth = int(depth or DEPTH)
        self._ctx = ctypes.c_ulong(0)
        _syscall(self._nr[0], self.depth, ctypes.addressof(self._ctx))
        self._events = np.zeros(self.depth, EVENT)

    def run(self, opcode, fds: np.ndarray, offsets: np.ndarray, nbytes: np.ndarray,
            addrs: np.ndarray) -> np.ndarray:
        """Do ``len(fds)`` reads (IOCB_CMD_PREAD) or writes (IOCB_CMD_PWRITE), ``opcode`` one for all or one
        per op (ops of one batch have no order: they must not overlap where one writes) -- op i moves ``nbytes[i]``
        bytes between file ``fds[i]`` at byte ``offsets[i]`` and memory at address ``addrs[i]`` -- and
        wait for all of them. Returns each op's result (bytes moved), in op order. Every op has
        completed when this returns, also when it raises (an error cancels or waits out the rest)."""
        n = int(fds.size)
        res = np.zeros(n, np.int64)
        if n == 0:
            return res
        cbs = np.zeros(n, IOCB)
        cbs["data"] = np.arange(n, dtype=np.uint64)
        cbs["opcode"] = opcode
        cbs["fildes"] = fds
        cbs["buf"] = addrs
        cbs["nbytes"] = nbytes
        cbs["offset"] = offsets
        ptrs = cbs.ctypes.data + IOCB.itemsize * np.arange(n, dtype=np.uint64)
        ev = self._events
        submitted = done = 0
        try:
            while done < n:
                room = self.depth - (submitted - done)
                if submitted < n and room > 0:
                    k = min(room, n - submitted)
                    try:
                        submitted += _syscall(self._nr[3], self._ctx.value, k, ptrs.ctypes.data + 8 * submitted)
                    except OSError as e:
                        if e.errno != errno.EAGAIN or submitted == done:
                            raise
                inflight = submitted - done
                if inflight == 0:
                    continue
                want = inflight if submitted == n else max(1, inflight // 2)
                try:
                    got = _syscall(self._nr[2], self._ctx.value, want, min(inflight, self.depth), ev.ctypes.data, 0)
                except OSError as e:
                    if e.errno == errno.EINTR:
                        continue
                    raise
                res[ev["data"][:got].astype(np.int64)] = ev["res"][:got]
                done += got
        except BaseException:
            if submitted > done:  # never return while the kernel may still write into the caller's buffer
                self._drain(submitted - done)
            raise
        return res

    def _drain(self, left: int) -> None:
        """Wait out ``left`` ops in flight; if that fails, destroy the context (which waits for them)."""
        try:
            while left > 0:
                try:
                    left -= _syscall(self._nr[2], self._ctx.value, 1, min(left, self.depth), self._events.ctypes.data, 0)
                except OSError as e:
                    if e.errno != errno.EINTR:
                        raise
        except OSError:
            self.close()

    def close(self) -> None:
        if self._ctx.value:
            try:
                _syscall(self._nr[1], self._ctx.value)
            finally:
                self._ctx = ctypes.c_ulong(0)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass


def ring() -> AioRing:
    """This thread's `AioRing` (created on first use; raises OSError where it cannot be)."""
    r = getattr(_local, "ring", None)
    if r is None or not r._ctx.value:
        r = _local.ring = AioRing()
    return r


def available() -> bool:
    """True where this thread can use Linux AIO: the platform has it and this thread's context is set
    up (``io_setup`` can fail later too, e.g. once ``fs.aio-max-nr`` contexts exist: then False)."""
    if _state["ok"] is False:
        return False
    if getattr(_local, "failed", False):
        return False
    try:
        ring()
    except OSError as e:
        if _state["ok"] is None:  # never worked here: say so once, at debug level
            log.debug("Linux AIO unavailable (%s): block I/O uses one system call per run", e)
            _state["ok"] = False
        else:
            log.warning("Linux AIO context refused in thread %s (%s): its block I/O uses one system call per run",
                        threading.current_thread().name, e)
            _local.failed = True
        return False
    _state["ok"] = True
    return True


def aligned_buffer(nbytes: int, align: int = 4096) -> np.ndarray:
    """An uint8 array of ``nbytes`` whose data starts on an ``align``-byte boundary (O_DIRECT)."""
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes]

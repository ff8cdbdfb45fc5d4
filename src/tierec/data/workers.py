"""Worker processes of the input pipeline (`tierec.data.loader`: ``process_readers``, ``process_batches``).

Threads share one GIL: the Python-level parts of decode (`Chunk.from_arrow`) and of
`Batch.from_chunk` (the dedup and the KJT) cannot run beside the trainer's Python. With
``process_readers`` the ``reader_threads`` reader workers are processes, and with ``process_batches``
the ``batch_workers`` are: each has its own interpreter. A pass starts its pools (`PROCESS_START`:
``forkserver``, whose server imported this module and `tierec.data.dataset` once and forks each
worker from itself: never a fork of the threaded consumer) and shuts them down when it ends, however
it ends (exhausted, closed early, or raising): no process outlives its pass. A reader worker reopens
the data set from its path (`Dataset` by root, once per worker) and runs the reader stages of the
row groups it is sent (their manifest entries, shuffle seeds and rows to drop: not the plan); a batch
worker builds a `Batch` from the chunk it is sent. Results go back as arrays (`TRANSFER`): written
into one file of /dev/shm per result (``send``) that the consumer maps without a copy and unlinks at
once (``receive``), or pickled through the pool's pipe (``pipe``, where there is no /dev/shm); only
their layout goes through the pipe. Each result brings the worker's per-stage totals, added to the
consumer's `StageClock` (stages ``send`` and ``receive`` besides), so a profile reports every stage
whichever the workers. A worker's `tierec.errors.TierecError` (a `DataError` naming the file and row
group) reaches the consumer as itself, one line; a worker that dies becomes one `TierecError`. The
decoded cache is the consumer's (``cache_bytes`` and ``process_readers`` exclude each other).
"""

from __future__ import annotations

import itertools
import mmap
import multiprocessing
import os
import signal
import time
import uuid
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

import numpy as np

from tierec.data.loader import StageClock, batch_nbytes, load_group
from tierec.errors import TierecError

if TYPE_CHECKING:
    from tierec.data.dataset import Batch, Chunk, Dataset, ReadPlan

PROCESS_START = "forkserver"  # how worker processes start (module doc); "spawn" works too, slower to start
TRANSFER = "shm"  # how arrays go to and from worker processes: "shm" (/dev/shm files, mapped) or "pipe" (pickled)
SHM_DIR = "/dev/shm"

# what the forkserver imports once (pyarrow.compute: Table.take's, ~0.25 s a worker otherwise)
_PRELOAD = ["tierec.data.workers", "tierec.data.loader", "tierec.data.dataset", "pyarrow.compute"]
_names = itertools.count()
_DATASETS: dict[str, Dataset] = {}  # a worker process's data sets, by root


def _context() -> Any:
    ctx = multiprocessing.get_context(PROCESS_START)
    if PROCESS_START == "forkserver":  # the server imports them once; each worker is forked from it, ready
        ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _worker_init() -> None:
    """A worker process's start: Ctrl-C is the consumer's to handle (it shuts the pool down); torch on one thread."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)


def start_process_server() -> None:
    """Start the server worker processes are forked from (`PROCESS_START`), if not yet running: its one-time start
    (importing torch and pyarrow, 1-3 s) then falls outside the first pass that uses worker processes."""
    _context()
    if PROCESS_START == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


class ProcPool:
    """Worker processes whose number follows the settings of the moment (as `_Pool`); each result's files in
    /dev/shm are named after ``prefix``."""

    def __init__(self) -> None:
        self._prefix = f"tierec-in-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.used = False  # a file may have been named after the prefix: swept at close
        self.size = 0
        self.pool: ProcessPoolExecutor | None = None
        self.old: list[ProcessPoolExecutor] = []

    @property
    def prefix(self) -> str:
        self.used = True
        return self._prefix

    def submit(self, size: int, fn, *args) -> Future:
        self.used = True
        if self.pool is None or size != self.size:
            if self.pool is not None:
                self.pool.shutdown(wait=False)
                self.old.append(self.pool)
            self.pool = ProcessPoolExecutor(size, mp_context=_context(), initializer=_worker_init)
            self.size = size
        args = (*args, TRANSFER, self._prefix)
        return self.pool.submit(fn, *args)

    def close(self, pending: list[tuple[bool, Future]]) -> None:
        """Shut the pools down (their running tasks finish), and drop what ``pending`` results of theirs were
        never taken, and any file left under the prefix."""
        for _, f in pending:
            f.cancel()
        pools = [*self.old, *([self.pool] if self.pool is not None else [])]
        for p in pools:
            p.shutdown(wait=True, cancel_futures=True)
        self.pool, self.old = None, []
        if not self.used:
            return
        for remote, f in pending:
            if remote and f.done() and not f.cancelled() and f.exception() is None:
                _discard(f.result()[0])
        try:
            names = os.listdir(SHM_DIR)
        except OSError:
            names = []
        for n in names:
            if n.startswith(self._prefix + "-"):
                _discard(("shm", os.path.join(SHM_DIR, n), []))


def remote(fut: Future) -> Any:
    """A worker process's result; its `TierecError` (a `DataError` naming file and row group) as itself, one line;
    a pool whose worker died: one `TierecError`."""
    try:
        return fut.result()
    except BrokenProcessPool as e:
        raise TierecError(f"an input worker process ended abruptly ({e}); run without process_readers and "
                          "process_batches (the --input-*-processes flags) to see why") from None
    except TierecError as e:  # the worker's traceback is its cause: the error alone, as threads raise it
        raise e.with_traceback(None) from None


Handle = tuple  # ("shm", path, [(dtype, shape, offset)]) or ("pipe", [arrays])


def pack(arrays: list[np.ndarray], transfer: str, prefix: str) -> Handle:
    """``arrays`` ready to go to another process (`TRANSFER`): written into one new file of /dev/shm (64-byte
    aligned), or themselves, to be pickled (``pipe``; also where /dev/shm is missing or full)."""
    if transfer != "shm" or not os.path.isdir(SHM_DIR):
        return ("pipe", arrays)
    layout, off = [], 0
    for a in arrays:
        layout.append((a.dtype.str, a.shape, off))
        off += -(-a.nbytes // 64) * 64
    path = os.path.join(SHM_DIR, f"{prefix}-{os.getpid()}-{next(_names)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for a, (_, _, o) in zip(arrays, layout, strict=True):
            buf = np.ascontiguousarray(a).reshape(-1).view(np.uint8).data
            while len(buf):
                n = os.pwrite(fd, buf, o)
                buf, o = buf[n:], o + n
        os.ftruncate(fd, max(off, 64))
    except OSError:  # /dev/shm full: through the pipe
        os.close(fd)
        os.unlink(path)
        return ("pipe", arrays)
    os.close(fd)
    return ("shm", path, layout)


def unpack(handle: Handle, unlink: bool = True) -> list[np.ndarray]:
    """The arrays of a `pack` ed handle: views of its file mapped into memory (no copy; the mapping lives as long
    as they do, its pages populated), the file unlinked at once."""
    if handle[0] == "pipe":
        return handle[1]
    _, path, layout = handle
    fd = os.open(path, os.O_RDWR)
    try:  # populated: its pages mapped at once, not one fault at a time by the stage that reads them next
        mm = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)
        if unlink:
            _discard(handle)
    return [np.ndarray(shape, np.dtype(dt), buffer=mm, offset=o) for dt, shape, o in layout]


def _discard(handle: Handle) -> None:
    if handle[0] == "shm":
        try:
            os.unlink(handle[1])
        except FileNotFoundError:
            pass


def chunk_parts(chunks: list[Chunk]) -> tuple[list[np.ndarray], list[tuple]]:
    """The arrays of ``chunks`` in one list, and what each chunk is made of (`chunks_of`)."""
    arrays: list[np.ndarray] = []
    metas = []
    for c in chunks:
        arrays += [c.label, c.dense]
        for v, o in c.sparse.values():
            arrays += [v, o]
        arrays += [a for a in (c.session, c.inverse) if a is not None]
        metas.append((list(c.sparse), c.session is not None, c.inverse is not None, c.inverse_keys))
    return arrays, metas


def chunks_of(arrays: list[np.ndarray], metas: list[tuple]) -> list[Chunk]:
    from tierec.data.dataset import Chunk

    it = iter(arrays)
    out = []
    for keys, has_session, has_inverse, inverse_keys in metas:
        label, dense = next(it), next(it)
        sparse = {k: (next(it), next(it)) for k in keys}
        session = next(it) if has_session else None
        inverse = next(it) if has_inverse else None
        out.append(Chunk(label, dense, sparse, session, inverse, tuple(inverse_keys)))
    return out


def batch_parts(b: Batch) -> tuple[list[np.ndarray], tuple]:
    arrays = [b.dense.numpy(), b.labels.numpy(), b.sparse.values().numpy(), b.sparse.lengths().numpy()]
    if b.session is not None:
        arrays.append(b.session.numpy())
    user = None
    if b.user is not None:
        ikeys, inv = b.user.inverse_indices()
        arrays += [b.user.values().numpy(), b.user.lengths().numpy(), inv.numpy()]
        user = (b.user.keys(), b.user.stride(), list(ikeys))
    return arrays, (b.sparse.keys(), b.sparse.stride(), b.session is not None, user)


def batch_of(arrays: list[np.ndarray], meta: tuple) -> Batch:
    import torch

    from tierec.data.dataset import Batch
    from tierec.sparse import KeyedJaggedTensor

    t = [torch.from_numpy(a) for a in arrays]
    keys, stride, has_session, user = meta
    sparse = KeyedJaggedTensor(keys, t[2], t[3], stride=stride)
    session = t[4] if has_session else None
    u = None
    if user is not None:
        ukeys, ustride, ikeys = user
        u = KeyedJaggedTensor(ukeys, t[-3], t[-2], stride=ustride, inverse_indices=(ikeys, t[-1]), validate=False)
    return Batch(t[0], sparse, t[1], session, u)


def send_chunks(chunks: list[Chunk], prefix: str) -> tuple[Handle, list[tuple]]:
    """``chunks`` as a worker process sends them (`TRANSFER`): (the handle, their makeup); `receive_chunks` takes
    them back, `discard` drops them unread. ``prefix``: the /dev/shm file's name starts with it."""
    arrays, metas = chunk_parts(chunks)
    return pack(arrays, TRANSFER, prefix), metas


def receive_chunks(handle: Handle, metas: list[tuple]) -> list[Chunk]:
    return chunks_of(unpack(handle), metas)


def discard(handle: Handle) -> None:
    _discard(handle)


def read_args(ds: Dataset, plan: ReadPlan, take: list[tuple[int, int]]) -> tuple:
    """What a reader process needs for the row groups ``take`` of ``plan``: the data set's root, their entries,
    shuffle seeds and rows to drop, and how the plan reads (not the plan: a pass over a large split has many)."""
    groups = [plan.groups[gi] for gi, _ in take]
    seeds = [int(plan.perms_seed[gi]) for gi, _ in take]
    items = [(i, drop) for i, (_, drop) in enumerate(take)]
    return str(ds.root), groups, seeds, items, (plan.shuffle, plan.compact, plan.by_session)


def read_task(root: str, groups: list, seeds: list[int], items: list[tuple[int, int]], how: tuple[bool, bool, bool],
               transfer: str, prefix: str) -> tuple[Handle, list[tuple], dict, float]:
    """In a reader process: row groups through the reader stages (`load_group`), the data set reopened from its
    root once per process. (the chunks sent, their makeup, the stage totals, the task's CPU seconds)."""
    from tierec.data.dataset import Dataset, ReadPlan

    c0 = time.process_time()
    ds = _DATASETS.get(root)
    if ds is None:
        ds = _DATASETS[root] = Dataset(root)
    plan = ReadPlan(groups, [], np.asarray(seeds, dtype=np.int64), 0, *how)
    clock = StageClock()
    chunks = [load_group(ds, plan, i, drop, clock) for i, drop in items]
    with clock.stage("send", sum(len(c) for c in chunks)) as sp:
        arrays, metas = chunk_parts(chunks)
        handle = pack(arrays, transfer, prefix)
        sp.bytes = sum(a.nbytes for a in arrays)
    return handle, metas, clock.snapshot()["stages"], time.process_time() - c0


def build_task(handle: Handle, metas: list[tuple], keys: list[str], users: list[str], transfer: str,
                prefix: str) -> tuple[Handle, tuple, dict, float]:
    """In a batch process: the `Batch` of the chunk sent. (the batch sent, its makeup, stage totals, CPU s)."""
    from tierec.data.dataset import Batch

    c0 = time.process_time()
    clock = StageClock()
    with clock.stage("receive", 0) as sp:
        arrays = unpack(handle)
        (chunk,) = chunks_of(arrays, metas)
        sp.rows, sp.bytes = len(chunk), sum(a.nbytes for a in arrays)
    with clock.stage("dedup", len(chunk)) as sp:
        b = Batch.from_chunk(chunk, keys, users)
        sp.bytes = batch_nbytes(b)
    with clock.stage("send", b.size) as sp:
        out, meta = batch_parts(b)
        sent = pack(out, transfer, prefix)
        sp.bytes = sum(a.nbytes for a in out)
    return sent, meta, clock.snapshot()["stages"], time.process_time() - c0

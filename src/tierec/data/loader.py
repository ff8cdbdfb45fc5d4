"""The input pipeline that turns a data set's row groups into training batches: its stages, its knobs.

One pass (`Dataset.chunks` / `Dataset.batches`) runs these stages, each a method of `Dataset` or of
`Batch`, timed by a `StageClock` when one is given:

======== ============================================================== ====================
stage    work                                                           runs on
======== ============================================================== ====================
read     the row group's bytes (pread) and their CRC32                  reader threads
parquet  decompression (zstd) and Parquet decoding to Arrow; columns     reader threads
         checked
shuffle  the row group's rows permuted (whole sessions when clustered)  reader threads
decode   Arrow -> numpy `Chunk`; IDs and labels checked                  reader threads
batch    chunks cut and joined into batches of ``batch_size`` rows      the consumer
dedup    `Batch.from_chunk`: tensors, keyed jagged tensors, and with     batch workers, or
         ``dedup`` the inverse KJT of the user-side keys                 the consumer
======== ============================================================== ====================

`LoaderSettings` are the knobs: ``reader_threads`` threads run the reader stages of ``prefetch``
row-group reads in flight (0: each read on the consumer's thread when it needs it), ``read_groups``
row groups per read, ``batch_workers`` threads build the batches ``batch_prefetch`` ahead (0: on the
consumer's thread, i.e. the trainer's), and ``cache_bytes`` of decoded row groups (Arrow, before
the shuffle) are kept in memory for later passes (filled until full, never evicted: a pass reads
every group once, so LRU would evict each group before its next use). Results are taken in
submission order, so every setting yields the same batches, bit for bit: the settings change only
how fast. An `InputControl` holds settings that change while a pass runs (the autotuner,
`tierec.data.autotune`): each read and each batch is submitted under the settings of that moment.

The default settings are the loader before it had knobs: one reader thread one row group ahead,
batches built on the consumer's thread, no cache. While a pass runs, the interpreter's GIL switch
interval is `SWITCH_INTERVAL_S` (as the look-ahead pipeline's): a consumer that gives up the GIL in
every torch kernel gets it back from a busy worker within 0.5 ms instead of 5.

Worker processes (``process_readers``, ``process_batches``): `tierec.data.workers`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from tierec.data.rowgroup import RowGroupColumns
from tierec.errors import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa

    from tierec.data.dataset import Batch, Chunk, Dataset, ReadPlan

SWITCH_INTERVAL_S = 5e-4  # the interpreter's GIL switch interval while a pass has threads (`_short_switch`)
READER_STAGES = ("read", "parquet", "shuffle", "decode")  # one row group each, on the reader threads
STAGES = (*READER_STAGES, "batch", "dedup")
TRANSFER_STAGES = ("send", "receive")  # a result to or from a worker process (`workers.TRANSFER`): write it, map it
MAX_THREADS = 64


@dataclass(frozen=True)
class LoaderSettings:
    """The input pipeline's knobs (module doc); validated on construction."""

    reader_threads: int = 1  # reader workers running the reader stages (read, parquet, shuffle, decode)
    prefetch: int = 1  # row-group reads in flight ahead of the consumer; 0: read on demand, on its thread
    read_groups: int = 1  # row groups per read (a larger read amortises per-read costs, holds more memory)
    batch_workers: int = 0  # workers building batches (dedup, KJT); 0: on the consumer's (trainer's) thread
    batch_prefetch: int = 2  # batches built ahead of the consumer (with batch_workers)
    cache_bytes: int = 0  # decoded row groups kept in memory for later passes; 0: none
    process_readers: bool = False  # the reader workers are processes, not threads (module doc)
    process_batches: bool = False  # the batch workers are processes, not threads

    def __post_init__(self):
        for name, lo in (("reader_threads", 1), ("prefetch", 0), ("read_groups", 1), ("batch_workers", 0),
                         ("batch_prefetch", 1), ("cache_bytes", 0)):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"input setting {name} must be an integer >= {lo}, got {v!r}")
        for name in ("reader_threads", "batch_workers"):
            if getattr(self, name) > MAX_THREADS:
                raise ConfigError(f"input setting {name} must be at most {MAX_THREADS}, got {getattr(self, name)}")
        for name in ("process_readers", "process_batches"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"input setting {name} must be true or false, got {getattr(self, name)!r}")
        if self.process_readers and not self.prefetch:
            raise ConfigError("input setting process_readers needs prefetch >= 1 (with prefetch 0 each read runs on "
                              "the consumer's thread, not on a reader worker)")
        if self.process_readers and self.cache_bytes:
            raise ConfigError("input settings process_readers and cache_bytes exclude each other (the decoded cache "
                              "is the consumer process's; reader processes do not share it)")
        if self.process_batches and not self.batch_workers:
            raise ConfigError("input setting process_batches needs batch_workers >= 1 (with none the batches are "
                              "built on the consumer's thread)")

    @property
    def threads(self) -> int:
        """Workers (threads or processes) the pipeline adds beside its consumer."""
        return (self.reader_threads if self.prefetch else 0) + self.batch_workers

    @property
    def processes(self) -> int:
        """Of `threads`, the worker processes."""
        return ((self.reader_threads if self.prefetch and self.process_readers else 0)
                + (self.batch_workers if self.process_batches else 0))

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        cache = f", cache {self.cache_bytes / 2**20:.0f} MiB" if self.cache_bytes else ""
        readers = "reader process(es)" if self.process_readers else "reader thread(s)"
        reads = (f"{self.reader_threads} {readers}, {self.prefetch} read(s) ahead" if self.prefetch
                 else "reads on demand (no prefetch)")
        workers = "batch process(es)" if self.process_batches else "batch worker(s)"
        build = (f"{self.batch_workers} {workers} {self.batch_prefetch} ahead" if self.batch_workers
                 else "batches built on the consumer's thread")
        return f"{reads}, {self.read_groups} row group(s) per read, {build}{cache}"

    def with_(self, **kw) -> LoaderSettings:
        return replace(self, **kw)


@dataclass
class StageTotals:
    """What one stage did: calls, rows, bytes out, wall seconds inside it, CPU seconds of its threads."""

    calls: int = 0
    rows: int = 0
    bytes: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0


class _Span:
    __slots__ = ("rows", "bytes")

    def __init__(self, rows: int):
        self.rows, self.bytes = rows, 0


class StageClock:
    """Per-stage totals of a running pipeline (thread-safe; a few microseconds per row group or batch).

    ``waits``: seconds the consumer waited for reads (``read``) and for built batches (``batch``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stages: dict[str, StageTotals] = {}
        self.waits: dict[str, float] = {}
        self.cache_hits = 0
        self.worker_cpu_s = 0.0  # CPU seconds of worker processes (their whole tasks: stages and sending)
        self.t0 = time.perf_counter()

    @contextmanager
    def stage(self, name: str, rows: int) -> Iterator[_Span]:
        span = _Span(rows)
        w, c = time.perf_counter(), time.thread_time()
        yield span
        self.record(name, span.rows, span.bytes, time.perf_counter() - w, time.thread_time() - c, calls=1)

    def record(self, name: str, rows: int, nbytes: int, wall_s: float, cpu_s: float, calls: int = 0) -> None:
        """Add work timed by the caller to stage ``name`` (``calls`` 0: more work of a call counted before)."""
        with self._lock:
            t = self.stages.setdefault(name, StageTotals())
            t.calls += calls
            t.rows += rows
            t.bytes += nbytes
            t.wall_s += wall_s
            t.cpu_s += cpu_s

    def wait(self, name: str, seconds: float) -> None:
        with self._lock:
            self.waits[name] = self.waits.get(name, 0.0) + seconds

    def hit(self) -> None:
        with self._lock:
            self.cache_hits += 1

    def add(self, stages: dict[str, dict], cpu_s: float = 0.0) -> None:
        """A worker process's totals (``StageTotals`` as dicts, its `snapshot`'s ``stages``) and the CPU seconds
        of its task."""
        with self._lock:
            for name, d in stages.items():
                t = self.stages.setdefault(name, StageTotals())
                t.calls += d["calls"]
                t.rows += d["rows"]
                t.bytes += d["bytes"]
                t.wall_s += d["wall_s"]
                t.cpu_s += d["cpu_s"]
            self.worker_cpu_s += cpu_s

    def snapshot(self) -> dict:
        """{"elapsed_s", "stages": {name: StageTotals as dict}, "waits", "cache_hits", "worker_cpu_s"} at this
        moment."""
        with self._lock:
            return {"elapsed_s": time.perf_counter() - self.t0,
                    "stages": {k: asdict(v) for k, v in self.stages.items()},
                    "waits": dict(self.waits), "cache_hits": self.cache_hits, "worker_cpu_s": self.worker_cpu_s}


class _NullClock(StageClock):
    @contextmanager
    def stage(self, name: str, rows: int) -> Iterator[_Span]:
        yield _Span(rows)

    def record(self, name: str, rows: int, nbytes: int, wall_s: float, cpu_s: float, calls: int = 0) -> None:
        pass

    def wait(self, name: str, seconds: float) -> None:
        pass

    def hit(self) -> None:
        pass

    def add(self, stages: dict[str, dict], cpu_s: float = 0.0) -> None:
        pass


NULL_CLOCK = _NullClock()


@dataclass
class InputControl:
    """Settings read by a running pass at each read and each batch (changed live by the autotuner), and the
    clock it reports to."""

    settings: LoaderSettings = field(default_factory=LoaderSettings)
    clock: StageClock = field(default_factory=StageClock)


def _settings(loader: LoaderSettings | InputControl | None) -> LoaderSettings:
    if loader is None:
        return DEFAULT
    return loader.settings if isinstance(loader, InputControl) else loader


DEFAULT = LoaderSettings()


class DecodedCache:
    """Decoded row groups (Arrow tables, before the shuffle) by (file, row group), up to ``max_bytes``;
    filled until full, never evicted (module doc). Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._tables: dict[tuple[str, int], pa.Table] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> pa.Table | None:
        with self._lock:
            return self._tables.get(key)

    def put(self, key: tuple[str, int], table: pa.Table) -> None:
        n = int(table.nbytes)
        with self._lock:
            if key not in self._tables and self.bytes + n <= self.max_bytes:
                self._tables[key] = table
                self.bytes += n


def cache_of(ds: Dataset, max_bytes: int) -> DecodedCache | None:
    """The data set's cache of decoded row groups (kept across passes on the `Dataset` object), resized to
    ``max_bytes`` (entries beyond a smaller size dropped); None when ``max_bytes`` is 0."""
    cache: DecodedCache | None = getattr(ds, "_decoded_cache", None)
    if not max_bytes:
        return None
    if cache is None or cache.max_bytes != max_bytes:
        new = DecodedCache(max_bytes)
        if cache is not None:
            for k, t in list(cache._tables.items()):
                new.put(k, t)
        cache = new
        ds._decoded_cache = cache  # type: ignore[attr-defined]
    return cache


def chunk_nbytes(chunk: Chunk) -> int:
    n = chunk.label.nbytes + chunk.dense.nbytes + sum(v.nbytes + o.nbytes for v, o in chunk.sparse.values())
    return n + (chunk.inverse.nbytes if chunk.inverse is not None else 0)


def load_group(ds: Dataset, plan: ReadPlan, gi: int, drop: int, clock: StageClock = NULL_CLOCK,
               cache: DecodedCache | None = None) -> Chunk:
    """Row group ``gi`` through the reader stages (module doc), each timed on ``clock``. Its columns are
    decoded and permuted one at a time inside ``decode`` (`tierec.data.rowgroup`); that work is charged to
    ``parquet`` and ``shuffle``."""
    path, rg, n, entry = plan.groups[gi]
    table = cache.get((path, rg)) if cache is not None else None
    if table is not None:
        clock.hit()
        cols = RowGroupColumns.from_table(table)
    else:
        with clock.stage("read", n) as sp:
            data = ds.stage_read(plan, gi)
            sp.bytes = len(data) if data is not None else int(entry["bytes"] * n / max(entry["rows"], 1))
        with clock.stage("parquet", n):
            cols = ds.stage_parquet(plan, gi, data)
            del data  # the open row group holds what it needs
            if cache is not None:
                cache.put((path, rg), cols.table())
    with clock.stage("shuffle", n):
        cols = ds.stage_shuffle(plan, gi, cols)
    cols.take_spent()  # timed by the stages above already (a cache fill decodes every column there)
    w, c = time.perf_counter(), time.thread_time()
    chunk = ds.stage_decode(plan, gi, cols, drop)
    w, c = time.perf_counter() - w, time.thread_time() - c
    for name, (sw, sc, sb) in cols.take_spent().items():  # decoding and permuting columns, done inside decode
        clock.record(name, 0, sb, sw, sc)
        w, c = w - sw, c - sc
    clock.record("decode", n - drop, chunk_nbytes(chunk), max(w, 0.0), max(c, 0.0), calls=1)
    return chunk


class _Pool:
    """A thread pool whose size follows the settings of the moment (a resize starts a new pool; the old one
    finishes what it runs)."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.size = prefix, 0
        self.pool: ThreadPoolExecutor | None = None
        self.old: list[ThreadPoolExecutor] = []

    def submit(self, size: int, fn, *args) -> Future:
        if self.pool is None or size != self.size:
            if self.pool is not None:
                self.pool.shutdown(wait=False)
                self.old.append(self.pool)
            self.pool, self.size = ThreadPoolExecutor(size, thread_name_prefix=self.prefix), size
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        for p in [*self.old, *([self.pool] if self.pool is not None else [])]:
            p.shutdown(wait=True, cancel_futures=True)
        self.pool, self.old = None, []


# --------------------------------------------------------------------------- worker processes (module doc)
_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


@contextmanager
def _short_switch() -> Iterator[None]:
    """While a pass runs threads beside its consumer: the GIL switch interval at `SWITCH_INTERVAL_S` (CPython's
    5 ms default makes a trainer that gives up the GIL in every kernel wait up to 5 ms to take it back from a
    reader or batch worker running Python: the convoy `tierec.train.pipeline` measured). Nested passes share
    it; the last one out restores the interval it found."""
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            if SWITCH_INTERVAL_S < _switch_saved:
                sys.setswitchinterval(SWITCH_INTERVAL_S)
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


T = TypeVar("T")


def _take_next(pending: deque[tuple[bool, Future]], clock: StageClock, waited: str,
               receive: Callable[[Future], T]) -> T:
    """The oldest pending result (submission order): a worker process's through ``receive``, a thread's as it is;
    the time spent waiting for it goes to ``clock`` as ``waited``, apart from the receiving."""
    remote, fut = pending.popleft()
    if not fut.done():
        t0 = time.perf_counter()
        wait([fut])
        clock.wait(waited, time.perf_counter() - t0)
    return receive(fut) if remote else fut.result()


def stream_chunks(ds: Dataset, plan: ReadPlan, batch_size: int, drop_last: bool,
                  loader: LoaderSettings | InputControl | None = None,
                  clock: StageClock | None = None) -> Iterator[Chunk]:
    """The chunks of ``batch_size`` rows of ``plan`` (`Dataset.chunks`), read as ``loader`` says."""
    from tierec.data import workers  # its processes import this module

    clock = clock or (loader.clock if isinstance(loader, InputControl) else NULL_CLOCK)
    items, remaining = plan.items, plan.remaining
    if not items or remaining <= 0:
        return
    pool = _Pool("tierec-read")
    procs = workers.ProcPool()
    pending: deque[tuple[bool, Future]] = deque()  # (from a worker process, the read) in submission order
    k = 0  # next item of the plan to submit

    def read(take: list[tuple[int, int]], cache: DecodedCache | None) -> list[Chunk]:
        return [load_group(ds, plan, gi, drop, clock, cache) for gi, drop in take]

    def refill() -> None:
        nonlocal k
        while k < len(items):
            s = _settings(loader)
            if len(pending) >= s.prefetch:
                return
            take, k = items[k : k + s.read_groups], k + s.read_groups
            if s.process_readers:
                pending.append((True, procs.submit(s.reader_threads, workers.read_task, *workers.read_args(ds, plan, take))))
            else:
                pending.append((False, pool.submit(s.reader_threads, read, take, cache_of(ds, s.cache_bytes))))

    def receive(fut: Future) -> list[Chunk]:
        handle, metas, stages, cpu = workers.remote(fut)
        clock.add(stages, cpu)
        with clock.stage("receive", 0) as sp:
            arrays = workers.unpack(handle)
            chunks = workers.chunks_of(arrays, metas)
            sp.rows, sp.bytes = sum(len(c) for c in chunks), sum(a.nbytes for a in arrays)
        return chunks

    buf: list[Chunk] = []
    buffered = 0
    switch = _short_switch()
    switch.__enter__()
    try:
        refill()
        while pending or k < len(items):
            if pending:
                got = _take_next(pending, clock, "read", receive)
            else:  # prefetch 0: this thread reads
                s = _settings(loader)
                take, k = items[k : k + s.read_groups], k + s.read_groups
                got = read(take, cache_of(ds, s.cache_bytes))
            refill()
            got.reverse()  # popped in order: a chunk is let go once cut
            while got and remaining > 0:
                chunk = got.pop()
                with clock.stage("batch", 0):
                    if len(chunk) > remaining:
                        chunk = chunk.slice(0, remaining)
                    remaining -= len(chunk)
                    buf.append(chunk)
                    buffered += len(chunk)
                    del chunk
                    if buffered < batch_size:
                        continue
                    data = buf[0].concat(buf)
                    nfull = len(data) // batch_size
                    rest = data.slice(nfull * batch_size, len(data))
                    buf, buffered = ([rest], len(rest)) if len(rest) else ([], 0)
                    del rest
                # One batch's slice at a time: a slice's offsets are a copy, and all of a row group's slices
                # made at once held ~13 MB more (16 batches of 4096 x 26 features, bench_scale --quick) in
                # ~400 heap blocks; none of the group is held here once its last batch is out.
                for b in range(nfull):
                    with clock.stage("batch", batch_size):
                        piece = data.slice(b * batch_size, (b + 1) * batch_size)
                    yield piece
                    del piece
                del data
            if remaining <= 0:
                break
    finally:
        for _, f in pending:
            f.cancel()
        pool.close()
        procs.close(list(pending))
        switch.__exit__(None, None, None)
    if buffered and not drop_last:
        yield buf[0].concat(buf)


def stream_batches(chunks: Iterator[Chunk], keys: list[str], users: list[str],
                   loader: LoaderSettings | InputControl | None = None,
                   clock: StageClock | None = None) -> Iterator[Batch]:
    """`Batch` es of ``chunks`` (`Batch.from_chunk`; ``users``: user-side keys deduplicated), built by the
    settings' batch workers (threads or processes) ahead of the caller, or on its thread."""
    from tierec.data import workers  # its processes import this module
    from tierec.data.dataset import Batch

    clock = clock or (loader.clock if isinstance(loader, InputControl) else NULL_CLOCK)

    def build(chunk: Chunk) -> Batch:
        with clock.stage("dedup", len(chunk)) as sp:
            b = Batch.from_chunk(chunk, keys, users)
            sp.bytes = batch_nbytes(b)
        return b

    def submit(s: LoaderSettings, chunk: Chunk) -> tuple[bool, Future]:
        if not s.process_batches:
            return False, pool.submit(s.batch_workers, build, chunk)
        with clock.stage("send", len(chunk)) as sp:
            arrays, metas = workers.chunk_parts([chunk])
            handle = workers.pack(arrays, workers.TRANSFER, procs.prefix)
            sp.bytes = sum(a.nbytes for a in arrays)
        return True, procs.submit(s.batch_workers, workers.build_task, handle, metas, keys, users)

    def receive(fut: Future) -> Batch:
        handle, meta, stages, cpu = workers.remote(fut)
        clock.add(stages, cpu)
        with clock.stage("receive", 0) as sp:
            arrays = workers.unpack(handle)
            b = workers.batch_of(arrays, meta)
            sp.rows, sp.bytes = b.size, sum(a.nbytes for a in arrays)
        return b

    pool = _Pool("tierec-batch")
    procs = workers.ProcPool()
    pending: deque[tuple[bool, Future]] = deque()
    exhausted = False
    switch = _short_switch()
    switch.__enter__()
    try:
        while True:
            s = _settings(loader)
            while not exhausted and s.batch_workers and len(pending) < max(s.batch_prefetch, s.batch_workers):
                nxt = next(chunks, None)
                if nxt is None:
                    exhausted = True
                    break
                pending.append(submit(s, nxt))
            if pending:
                yield _take_next(pending, clock, "batch", receive)
                continue
            if exhausted:
                return
            nxt = next(chunks, None)  # no workers: this thread builds
            if nxt is None:
                return
            b, nxt = build(nxt), None  # the chunk (views of its row group's arrays) not held while `b` is used
            yield b
    finally:
        for _, f in pending:
            f.cancel()
        pool.close()
        procs.close(list(pending))
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
        switch.__exit__(None, None, None)


def batch_nbytes(b: Batch) -> int:
    n = b.dense.nbytes + b.labels.nbytes + b.sparse.values().nbytes + b.sparse.lengths().nbytes
    if b.user is not None:
        n += b.user.values().nbytes + b.user.lengths().nbytes
    return int(n)

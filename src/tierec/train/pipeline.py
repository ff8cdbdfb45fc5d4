"""`LookaheadPipeline`: read batches ahead, tell the caches the future, prefetch in the background.

The pipeline is the one owner of the look-ahead step protocol (`tierec.storage.lookahead`):
it drives the caches downward and hands each step's rows down to the tables, as TorchRec's
train pipeline calls ``module.prefetch``; the caches know nothing of it beyond the
`LookaheadGuard` it gives them (whether its worker may run beside a caller).

Its input is an iterable of batches -- `Batch` es, or any object that names the IDs each sparse key
looks up at its step (`StepIds`: SASRec's sequence batches, `tierec.train.sequence`) -- and a list
of `PrefetchTarget` s: one `LookaheadCache` each, and the tables it
serves (`Member` s: one table, or the members of a `tierec.storage.group.TableGroup`, whose
`RowSpace` says where each member's rows are in the cache). One worker thread:

1. reads batches ``window`` steps ahead of the trainer (bounded by ``max_bytes``: what the
   pipeline holds of every step from its read until the trainer takes it -- the batch, its unique IDs,
   the prepared `Lookup` s -- plus the oracles' own memory, `LookaheadCache.window_nbytes`; the step
   in training is the trainer's, as in any mode), takes each target's
   unique IDs of each batch (its members' IDs, joined in its row space) and hands them to
   the cache's `LookaheadCache.observe` (the oracle) -- with ``next_uses`` (a `NextUses`: the run's
   next-use trace, `tierec.train.nextuse.NextUseTrace`) each ID's next use beyond the window too,
   so that eviction is Belady's MIN over the whole run and write-backs are placed by next use;
2. *prepares* the next steps in order, up to ``depth`` steps ahead of the trainer: for every
   target the step's rows are made resident and pinned (`LookaheadCache.prepare`: evict by
   next use, write back dirty victims, read the misses), and each member's `Lookup` is made:
   its slice of the working set, with the dedup of its IDs computed here, off the trainer's
   path. A step whose rows do not fit waits until an earlier step is released; a step with
   more unique rows than a cache gets a temporary copy, and the worker waits for its release
   before touching that cache again;
3. iterating the pipeline yields the prepared batches in order, each member table holding its
   `Lookup` for the step (`EmbeddingBag.use_lookup`). A member's ``release`` comes back here;
   when all members of a target are back the cache's working set is released. The time the
   trainer waits for a batch is the *stall* (prefetch lateness): it is summed, and steps that
   waited are counted as late.

Everything that reads or writes table rows outside the step protocol
(evaluation, checkpoints) must run inside ``with pipeline.paused():``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

from tierec.data.dataset import Batch
from tierec.modules.embedding import Lookup, dedup
from tierec.storage.base import WorkingSet
from tierec.storage.concat import default_io_threads
from tierec.storage.lookahead import LookaheadCache
from tierec.storage.rowspace import RowSpace

log = logging.getLogger(__name__)

_worker_of = threading.local()  # .pipeline: set on a pipeline's worker and I/O threads
LATE_S = 1e-4  # a step that waited longer than this for its rows counts as late
SWITCH_INTERVAL_S = 5e-4  # the interpreter's GIL switch interval while a pipeline runs (see __init__)
# Batches read ahead after each step prepared for a trainer that was waiting, while the window is short of
# `window`: when the storage is slower than the steps, the worker would otherwise only prepare, the window
# would shrink to the few steps being prepared, and eviction would see no further than them.
CATCH_UP_READS = 2


class StepIds(Protocol):
    """A batch that is not a `Batch` (no KeyedJaggedTensor), as the pipeline reads it ahead."""

    def lookup_ids(self) -> dict[str, torch.Tensor]:
        """Sparse key -> the IDs (int64 [N]) its table looks up at this batch's step."""
        ...

    def nbytes(self) -> int:
        """Bytes the batch holds while it waits in the window."""
        ...


B = TypeVar("B", bound="Batch | StepIds")  # what a pipeline iterates: the batches it was given


def batch_nbytes(b: Batch | StepIds) -> int:
    """Bytes a batch holds in the window: its tensors, and the offsets its KJT computes and keeps."""
    if not isinstance(b, Batch):
        return b.nbytes()
    kjt = b.sparse
    n = b.dense.nbytes + b.labels.nbytes + kjt.values().nbytes + 2 * kjt.lengths().nbytes + 8
    w = kjt.weights_or_none()
    n += w.nbytes if w is not None else 0
    u = b.user
    return n + (u.values().nbytes + 2 * u.lengths().nbytes + 8 if u is not None else 0)


class NextUses(Protocol):
    """Each step's lookups' next-use steps, known ahead (`tierec.train.nextuse.NextUseTrace`)."""

    def at(self, step: int) -> dict[str, torch.Tensor]:
        """Sparse key -> int64 [N]: for each ID the step looks up (`StepIds.lookup_ids` order), the next step that
        looks it up again (`tierec.storage.lookahead.NEVER`: none)."""
        ...

    def matches(self, step: int, ids: dict[str, torch.Tensor]) -> bool:
        """Whether ``ids`` (sparse key -> IDs) are the lookups traced for step ``step``."""
        ...

    def close(self) -> None: ...


class LookupUser(Protocol):
    """What takes a step's prefetched rows: an `tierec.modules.embedding.EmbeddingBag`."""

    def use_lookup(self, lookup: Lookup | None) -> None: ...


class LookupMaker(LookupUser, Protocol):
    """A table whose rows are in memory: its step's `Lookup` is the dedup of the step's IDs alone, which any thread
    may compute ahead (`tierec.modules.embedding.EmbeddingBag.make_lookup`)."""

    def make_lookup(self, values: torch.Tensor) -> Lookup: ...


@dataclass(frozen=True)
class InMemoryMember:
    """A table in memory, beside the prefetch targets: the worker deduplicates its IDs (sparse key ``feature``)
    when it prepares a step, so that the trainer's thread does not."""

    table: LookupMaker
    feature: str


@dataclass(frozen=True)
class Member:
    """A table fed by a `PrefetchTarget`: it looks up the IDs of sparse key ``feature`` of each batch.

    ``lo``/``hi``: a row-wise shard sees only the IDs in ``[lo, hi)``, renumbered from 0 (``hi`` None: all).
    ``direct``: the table's forward gets exactly this feature's IDs of the batch, in order, so the
    dedup is computed ahead with the rows; False for a shard, whose IDs arrive by all-to-all."""

    table: LookupUser
    feature: str
    lo: int = 0
    hi: int | None = None
    direct: bool = True


@dataclass(frozen=True)
class PrefetchTarget:
    """One look-ahead cache and the tables it serves. ``space``: where each member's rows are in the
    cache (a table group); None for a cache of one member, whose rows are its own."""

    name: str
    cache: LookaheadCache
    members: tuple[Member, ...]
    space: RowSpace | None = None

    def __post_init__(self):
        if (self.space is None and len(self.members) != 1) or (self.space is not None and
                                                               len(self.space) != len(self.members)):
            raise ValueError(f"prefetch target {self.name!r}: {len(self.members)} members for a row space of "
                             f"{len(self.space) if self.space is not None else 1}")


@dataclass
class _Lease:
    """A target's working set of one step, while its members hold their `Lookup` s."""

    target: PrefetchTarget
    step: int
    ws: WorkingSet
    lookups: list[Lookup] = field(default_factory=list)
    left: int = 0  # members that have not released their lookup yet
    dirty: bool = False
    handed: bool = False  # the members hold their lookups (the trainer took the step)


@dataclass
class _Prepared:
    """A step prepared for the trainer: its batch, its targets' leases, and its in-memory tables' lookups."""

    step: int
    batch: Any
    leases: list[_Lease]
    lookups: list[Lookup]  # one per `InMemoryMember`, in order


class LookaheadPipeline(Generic[B]):
    """Iterate ``batches`` (steps ``start_step``, ``start_step`` + 1, ...) with look-ahead prefetching
    into ``targets`` (module doc); ``in_memory``: tables in memory whose lookups (the dedup of their IDs) the
    worker makes too. Use as a context manager, or call `close`."""

    def __init__(self, batches: Iterable[B], targets: list[PrefetchTarget], window: int = 200,
                 depth: int = 2, max_bytes: int = 1 << 30, start_step: int = 0, lower_depth: int | None = None,
                 io_threads: int | None = None, switch_interval: float | None = SWITCH_INTERVAL_S,
                 leave_a_core: bool = False, next_uses: NextUses | None = None,
                 in_memory: Sequence[InMemoryMember] = ()):
        if window < 1 or depth < 1:
            raise ValueError(f"window and depth must be >= 1, got {window}, {depth}")
        # The trainer gives up the GIL in every kernel and must take it back from the prefetch threads, which run
        # Python between their reads: at CPython's 5 ms switch interval that wait is a large part of a step
        # (measured in docs/lookahead.md). Restored by close().
        self._switch = sys.getswitchinterval()
        if switch_interval is not None and switch_interval < self._switch:
            sys.setswitchinterval(switch_interval)
        self.targets = {t.name: t for t in targets}
        if len(self.targets) != len(targets):
            raise ValueError(f"prefetch targets need distinct names, got {[t.name for t in targets]}")
        self.caches = {t.name: t.cache for t in targets}
        self.in_memory = tuple(in_memory)
        self.window, self.depth, self.max_bytes = window, min(depth, window), max_bytes
        # Lower tiers of a chain (device <- DRAM <- SSD): a LookaheadCache backing a LookaheadCache.
        # Each is prefetched `lower_depth` steps ahead, so the tier above finds its misses there.
        self.lower_depth = min(window, lower_depth or 4 * self.depth)
        self._lanes: list[_Lane] = []
        self._lane_groups: dict[str, list[_Lane]] = {}  # per table, lowest tier first
        for key, top in self.caches.items():
            c = top.backing
            while isinstance(c, LookaheadCache):
                self._lanes.append(_Lane(key, c, start_step))
                self._lane_groups.setdefault(key, []).insert(0, self._lanes[-1])
                c = c.backing
        # Tables are independent (own cache, own file): their I/O runs in parallel, one task per table.
        n = min(io_threads or default_io_threads(list(self.caches.values())), len(self.caches))
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="tierec-prefetch", initializer=self._mark_worker) \
            if n > 1 else None
        self._it: Iterator[B] = iter(batches)
        self._next_uses = next_uses  # closed with the pipeline; dropped if the batches differ from its trace
        self._cond = threading.Condition()
        self._observed: deque[tuple[int, B, dict]] = deque()  # read and observed, not yet prepared
        self._ready: deque[_Prepared] = deque()  # prepared, not yet taken
        self._partial: dict[str, WorkingSet] = {}  # step being prepared: target -> working set
        self._leases: dict[int, list[_Lease]] = {}  # steps taken by the trainer, not yet fully released
        self._bytes = 0  # what the steps read and not yet taken hold: sum of _nbytes
        self._nbytes: dict[int, int] = {}  # step -> its bytes (batch, unique IDs, prepared lookups) until taken
        self._next_read = start_step
        self._next_take = start_step  # next step the trainer takes
        self.current_step = start_step - 1  # step the trainer works on
        self._released_upto = start_step - 1
        self._barrier: int | None = None  # a bypassed step: wait for its release
        self._release_gen = 0  # counts releases: a worker waiting for room waits for the next one
        self._exhausted = self._stop = False
        self._error: BaseException | None = None
        self._pause_req = 0
        self._worker_parked = False
        self._window_capped = False
        self.stats = {"steps": 0, "stall_s": 0.0, "late_steps": 0, "max_stall_s": 0.0, "lead_sum": 0,
                      "bypass_table_steps": 0, "worker_wait_room": 0, "window_peak": 0,
                      "worker_cpu_s": 0.0, "window_sum": 0, "prepared_steps": 0, "held_peak_bytes": 0,
                      "traced_steps": 0}
        driven: list[LookaheadCache] = []
        try:
            for c in self._all_caches():
                c.begin_lookahead(self)
                driven.append(c)
        except BaseException:
            for c in driven:
                c.end_lookahead()
            if self._pool is not None:
                self._pool.shutdown()
            sys.setswitchinterval(self._switch)
            raise
        # ``leave_a_core`` (the caller's --num-threads unset): torch's intra-op threads one fewer while the worker
        # runs, so its ~30 ms of CPU per step (bench_scale) has a core instead of preempting the step's threads,
        # which wait for each other at every parallel region. Restored by close().
        self._threads = torch.get_num_threads()
        if leave_a_core and self._threads > 1:
            torch.set_num_threads(self._threads - 1)
            log.info("look-ahead worker: torch intra-op threads %d -> %d while it runs (one core for it; "
                     "--num-threads chooses)", self._threads, self._threads - 1)
        self.stats["trainer_threads"] = torch.get_num_threads()  # what the model trains with beside the worker
        self._thread = threading.Thread(target=self._run, name="tierec-lookahead", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ trainer side
    def __iter__(self):
        return self

    def __next__(self) -> B:
        t0 = time.perf_counter()
        with self._cond:
            while not self._ready and self._error is None and not (self._exhausted and not self._observed
                                                                  and not self._partial):
                self._cond.wait()
            if self._error is not None:
                raise RuntimeError("look-ahead worker failed") from self._error
            if not self._ready:
                raise StopIteration
            ready = self._ready.popleft()
            step, batch, leases = ready.step, ready.batch, ready.leases
            self.stats["lead_sum"] += len(self._ready)
            self.current_step = step
            self._next_take = step + 1
            self._leases[step] = leases
            self._bytes -= self._nbytes.pop(step, 0)  # the trainer's now
            self._cond.notify_all()
        for lease in leases:  # each table finds its rows of the step when its forward runs
            lease.handed = True
            for m, lk in zip(lease.target.members, lease.lookups, strict=True):
                m.table.use_lookup(lk)
        for im, lk in zip(self.in_memory, ready.lookups, strict=True):
            im.table.use_lookup(lk)
        stall = time.perf_counter() - t0
        st = self.stats
        st["steps"] += 1
        st["stall_s"] += stall
        st["max_stall_s"] = max(st["max_stall_s"], stall)
        st["late_steps"] += stall > LATE_S
        return batch

    @property
    def is_paused(self) -> bool:
        return self._pause_req > 0 and self._worker_parked

    @contextmanager
    def paused(self):
        """Stop the worker at a safe point (no I/O in flight) for evaluation or checkpoints."""
        with self._cond:
            self._pause_req += 1
            self._cond.notify_all()
            while not self._worker_parked and self._thread.is_alive():
                self._cond.wait()
            if not self._thread.is_alive():
                self._worker_parked = True
        try:
            yield self
        finally:
            with self._cond:
                self._pause_req -= 1
                if self._pause_req == 0 and self._thread.is_alive():
                    self._worker_parked = False
                self._cond.notify_all()

    def _all_caches(self) -> list[LookaheadCache]:
        return list(self.caches.values()) + [lane.cache for lane in self._lanes]

    def on_worker_thread(self) -> bool:
        """True on the worker thread and its I/O threads."""
        return getattr(_worker_of, "pipeline", None) is self

    def busy(self) -> bool:
        """`LookaheadGuard`: the worker may touch the caches beside the calling thread (not paused, not the
        worker itself: the worker drives lower tiers from its own threads)."""
        return not self.is_paused and not self.on_worker_thread()

    def _mark_worker(self) -> None:
        _worker_of.pipeline = self

    def _each_table(self, fn, keys: list[str]) -> list:
        if self._pool is None or len(keys) < 2:
            return [fn(k) for k in keys]
        return list(self._pool.map(fn, keys))

    def _release_member(self, lease: _Lease, dirty: bool) -> None:
        """A member table is done with its rows of ``lease.step`` (the trainer's thread, in backward). When
        all members are, the target's working set goes back to the cache: pinned rows are released in the
        cache's own bookkeeping; a temporary copy writes back, with the worker parked."""
        lease.dirty |= bool(dirty)  # marking a clean row dirty costs a write-back, never a value
        lease.left -= 1
        if lease.left:
            return
        lease.lookups.clear()  # each lookup's release refers back to its lease: no cycle left for the GC to find
        self._give_back(lease)
        with self._cond:
            self._release_gen += 1
            step = lease.step
            left = [x for x in self._leases.get(step, ()) if x.left]
            if not left:
                self._leases.pop(step, None)
                self._released_upto = max(self._released_upto, step)
                if self._barrier is not None and step >= self._barrier:
                    self._barrier = None
            self._cond.notify_all()

    def _give_back(self, lease: _Lease, dirty: bool | None = None) -> None:
        c = lease.target.cache
        if c.is_copy(lease.ws):
            with self.paused():
                c.release(lease.ws, lease.dirty if dirty is None else dirty)
        else:
            c.release(lease.ws, lease.dirty if dirty is None else dirty)

    def _lease(self, target: PrefetchTarget, step: int, ws: WorkingSet, batch: B) -> _Lease:
        """The target's working set of ``step`` cut into its members' `Lookup` s (worker thread)."""
        lease = _Lease(target, step, ws, left=len(target.members))
        by_key = batch_ids(batch)
        bounds = target.space.bounds(ws.ids) if target.space is not None else [0, ws.ids.numel()]
        release = lambda dirty: self._release_member(lease, dirty)  # noqa: E731
        for t, m in enumerate(target.members):
            lo, hi = bounds[t], bounds[t + 1]
            ids = ws.ids[lo:hi] - target.space.offset(t) if target.space is not None else ws.ids
            part = WorkingSet(ids, ws.index[lo:hi], ws.weight, ws.state) if target.space is not None else ws
            if m.direct:
                uniq, inverse, perm, counts = dedup(by_key[m.feature].to(ids.device))
                if not torch.equal(uniq, ids):
                    raise RuntimeError(f"prefetch target {target.name!r}: step {step}'s IDs of {m.feature!r} do not "
                                       "match the rows prepared for them")
                lease.lookups.append(Lookup(part, inverse, perm, counts, release))
            else:
                lease.lookups.append(Lookup(part, None, None, None, release))
        return lease

    def held_nbytes(self) -> int:
        """Bytes the window holds: every step from its read until the trainer takes it (its batch, unique IDs and
        prepared lookups), and the oracles (`LookaheadCache.window_nbytes`); held to ``max_bytes``."""
        return self._bytes + sum(c.window_nbytes for c in self._all_caches())

    def _note_held(self) -> None:
        self.stats["held_peak_bytes"] = max(self.stats["held_peak_bytes"], self.held_nbytes())

    def summary(self) -> dict:
        st = dict(self.stats)
        n = max(st["steps"], 1)
        st["mean_lead_steps"] = st.pop("lead_sum") / n
        st["mean_window_steps"] = st.pop("window_sum") / max(st["prepared_steps"], 1)  # the future eviction saw
        st["late_fraction"] = st["late_steps"] / n
        st.update(window=self.window, depth=self.depth)
        return st

    def close(self) -> None:
        """Stop the worker, release what it prepared: steps never taken (clean), steps the model held when the
        pipeline stopped (an error mid-step: dirty, which is exact -- at worst a write-back of unchanged
        rows), and the lower tiers' prefetches; then end the step protocol on every cache."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        if self._pool is not None:
            self._pool.shutdown()
        for step in sorted(self._leases):
            for lease in self._leases.pop(step):
                for m in lease.target.members:
                    m.table.use_lookup(None)
                if lease.left:
                    self.caches[lease.target.name].release(lease.ws, True)
        for im in self.in_memory:  # a step taken and not trained (an error mid-step): its lookups withdrawn
            im.table.use_lookup(None)
        for ready in self._ready:
            for lease in ready.leases:
                self.caches[lease.target.name].release(lease.ws, False)
            for lk in ready.lookups:
                lk.release(False)
        for name, ws in self._partial.items():
            self.caches[name].release(ws, False)
        self._partial.clear()
        for lane in self._lanes:
            for step in sorted(lane.prepared):
                held = lane.prepared[step]
                if held is not None:
                    lane.cache.release(held, dirty=False)
            lane.prepared.clear()
        for c in self._all_caches():
            c.end_lookahead()
        self._ready.clear()
        self._observed.clear()
        self._nbytes.clear()
        self._bytes = 0
        sys.setswitchinterval(self._switch)
        torch.set_num_threads(self._threads)
        if self._next_uses is not None:
            self._next_uses.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ worker
    def _park_if_paused(self) -> bool:
        """At a safe point: wait while a pause is requested. Returns False when stopping."""
        with self._cond:
            while self._pause_req and not self._stop:
                if not self._worker_parked:
                    self._worker_parked = True
                    self._cond.notify_all()
                self._cond.wait()
            return not self._stop

    def _run(self) -> None:
        self._mark_worker()
        owed = 0  # batches still to read ahead before serving the trainer again
        try:
            while self._park_if_paused():
                self.stats["worker_cpu_s"] = time.thread_time()  # CPU time of the look-ahead thread
                if owed:  # a worker that only ever served a waiting trainer would let the window run dry
                    if self._read_ahead():
                        owed -= 1
                        continue
                    owed = 0
                if not self._ready and self._prepare_next():  # the trainer waits: serve it before reading on
                    owed = CATCH_UP_READS if self._next_read - self._next_take < self.window else 0
                    continue
                if self._read_ahead():
                    continue
                if self._prepare_next():
                    continue
                if self._lanes and self._prepare_lower():
                    continue
                with self._cond:  # nothing to do until the trainer takes or releases a step
                    if not self._stop and not self._pause_req and not self._can_progress():
                        self._cond.wait(timeout=1.0)
        except BaseException as e:  # handed to the trainer thread
            log.debug("look-ahead worker failed", exc_info=True)
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            with self._cond:
                self._worker_parked = True
                self._cond.notify_all()

    def _can_progress(self) -> bool:
        if self._window_room() or (self._observed and self._may_prepare(self._observed[0][0])):
            return True
        if not self._lanes or not self._observed:
            return False
        last = min(self._observed[-1][0], self._next_take + self.lower_depth - 1)
        return any(lane.next_step <= last for lane in self._lanes)

    def _window_room(self) -> bool:
        if self._exhausted:
            return False
        if self._next_read - self._next_take >= self.window:
            return False
        step_nbytes = max(self._nbytes.values(), default=0)  # room for one more step, as large as the largest held
        if self.held_nbytes() + step_nbytes > self.max_bytes and self._next_read - self._next_take >= self.depth:
            if not self._window_capped:
                self._window_capped = True
                log.warning("look-ahead window limited to %d batches by its memory (%d bytes: --lookahead-memory, "
                            "or its share of --memory-budget)",
                            self._next_read - self._next_take, self.max_bytes)
            return False
        return True

    def _read_ahead(self) -> bool:
        """Read and observe one more batch if the window has room. Returns True if it did."""
        with self._cond:
            if not self._window_room():
                return False
        try:
            batch = next(self._it)
        except StopIteration:
            with self._cond:
                self._exhausted = True
                self._cond.notify_all()
            return False
        step = self._next_read
        by_key = batch_ids(batch)
        far = self._traced(step, by_key)
        uniq, nexts = {}, {}
        for key, target in self.targets.items():
            parts, nparts = [], []
            for m in target.members:
                v, f = by_key[m.feature], far.get(m.feature) if far is not None else None
                if m.hi is not None:  # a row-wise shard: its rows of the table, renumbered from 0
                    keep = (v >= m.lo) & (v < m.hi)
                    v, f = v[keep] - m.lo, (f[keep] if f is not None else None)
                if f is None:
                    parts.append(torch.unique(v))  # sorted, as the model's dedup
                    continue
                u, inv = torch.unique(v, return_inverse=True)
                parts.append(u)  # every lookup of an ID at one step has the same next use: any one will do
                nparts.append(torch.empty_like(u).scatter_(0, inv, f))
            u = target.space.join(parts) if target.space is not None else parts[0]
            nu = (torch.cat(nparts) if len(nparts) > 1 else nparts[0]) if len(nparts) == len(parts) else None
            target.cache.observe(step, u, nu)
            uniq[key], nexts[key] = u, nu
        for lane in self._lanes:
            lane.cache.observe(step, uniq[lane.key], nexts[lane.key])
        with self._cond:
            self._observed.append((step, batch, uniq))
            self._nbytes[step] = batch_nbytes(batch) + sum(u.nbytes for u in uniq.values())
            self._bytes += self._nbytes[step]
            self._next_read += 1
            self.stats["window_peak"] = max(self.stats["window_peak"], self._next_read - self._next_take)
            self._note_held()
        return True

    def _traced(self, step: int, by_key: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The next uses of step ``step``'s lookups from the trace, if there is one and it traced these batches
        (else the trace is dropped, with a warning: eviction then sees the window only)."""
        if self._next_uses is None:
            return None
        if not self._next_uses.matches(step, by_key):
            log.warning("step %d: the batches differ from the next-use trace built for them; eviction sees the "
                        "look-ahead window only from here on", step)
            self._next_uses.close()
            self._next_uses = None
            return None
        self.stats["traced_steps"] += 1
        return self._next_uses.at(step)

    def _prepare_lower(self, force_upto: int | None = None) -> bool:
        """Prefetch one step into every lower tier that is behind its depth (or behind ``force_upto``).
        A step with no room there is skipped: the tier above then reads those rows from below it."""
        with self._cond:
            observed = {s: u for s, _, u in self._observed}
            limit = self._next_take + self.lower_depth - 1 if force_upto is None else force_upto

        def one(key: str) -> bool:
            did = False
            for lane in self._lane_groups[key]:  # lowest tier first: the tier above reads from it
                s = lane.next_step
                if s <= limit and s in observed:
                    lane.prepared[s] = lane.cache.prepare(s, observed[s][key])
                    lane.next_step += 1
                    did = True
            return did

        return any(self._each_table(one, list(self._lane_groups)))

    def _retire_lower(self, step: int, uniq: dict) -> None:
        """The tier above has taken step ``step``'s rows: unpin them in the lower tiers."""
        for lane in self._lanes:
            ws = lane.prepared.pop(step, None)
            if ws is not None:
                lane.cache.release(ws, dirty=False)
            else:
                lane.cache.retire(step, uniq[lane.key])

    def _may_prepare(self, step: int) -> bool:
        return step < self._next_take + self.depth and self._barrier is None

    def _prepare_next(self) -> bool:
        """Prepare the oldest observed step for every table. True if the step became ready."""
        with self._cond:
            if not self._observed or not self._may_prepare(self._observed[0][0]):
                return False
            step, batch, uniq = self._observed[0]
        while any(lane.next_step <= step for lane in self._lanes):
            self._prepare_lower(force_upto=step)
        with self._cond:
            alone = self._released_upto == step - 1  # no other step holds pins
            gen = self._release_gen
        keys = [k for k in self.caches if k not in self._partial]
        got = self._each_table(lambda k: self.caches[k].prepare(step, uniq[k], allow_bypass=alone), keys)
        for key, ws in zip(keys, got, strict=True):
            if ws is None:
                continue
            self._partial[key] = ws
            if self.caches[key].is_copy(ws):
                with self._cond:
                    self._barrier = step
                    self.stats["bypass_table_steps"] += 1
        if len(self._partial) < len(self.caches):  # no room yet: wait for the trainer to release a step
            with self._cond:  # (a release since `gen` may have made room already: then retry at once)
                self.stats["worker_wait_room"] += 1
                while self._release_gen == gen and not self._stop and not self._pause_req:
                    self._cond.wait()
            return False
        self.stats["window_sum"] += self._next_read - step  # steps observed from this one on
        self.stats["prepared_steps"] += 1
        leases = [self._lease(self.targets[key], step, self._partial[key], batch) for key in self.caches]
        self._partial.clear()
        self._retire_lower(step, uniq)
        by_key = batch_ids(batch) if self.in_memory else {}
        lookups = [im.table.make_lookup(by_key[im.feature]) for im in self.in_memory]
        _index_features(batch)
        made = sum(_lease_nbytes(lease) for lease in leases) + sum(_lookup_nbytes(lk) for lk in lookups)
        with self._cond:
            self._observed.popleft()
            self._nbytes[step] += made  # held until the trainer takes the step
            self._bytes += made
            self._note_held()
            self._ready.append(_Prepared(step, batch, leases, lookups))
            self._cond.notify_all()
        return True


def _lease_nbytes(lease: _Lease) -> int:
    """Bytes a prepared step's lease holds beyond the cache: its working set's IDs and positions (its rows too
    when they are a temporary copy), and its members' lookups (their IDs where renumbered, and the dedup)."""
    ws = lease.ws
    n = ws.ids.nbytes + ws.index.nbytes
    if lease.target.cache.is_copy(ws):
        n += ws.weight.nbytes + ws.state.nbytes
    for lk in lease.lookups:
        n += lk.ws.ids.nbytes if lease.target.space is not None else 0
        n += sum(t.nbytes for t in (lk.inverse, lk.perm, lk.counts) if t is not None)
    return n


def _index_features(batch: Batch | StepIds) -> None:
    """Compute what the model's forward asks of a `Batch`'s features, ahead: each key's view and offsets (kept
    by the batch's `tierec.sparse.KeyedJaggedTensor` s)."""
    if isinstance(batch, Batch):
        for kjt in (batch.sparse, batch.user):
            for jt in kjt.split_by_key() if kjt is not None else ():
                jt.offsets()


def _lookup_nbytes(lk: Lookup) -> int:
    """Bytes an in-memory table's prepared lookup holds: its unique IDs and the dedup (its rows are the table's)."""
    return lk.ws.ids.nbytes + sum(t.nbytes for t in (lk.inverse, lk.perm, lk.counts) if t is not None)


def batch_ids(batch: Batch | StepIds) -> dict[str, torch.Tensor]:
    """Sparse key -> the IDs of ``batch`` its table looks up: a `Batch`'s values of each key (the
    deduplicated user-side keys too: the same IDs, once per unique row, as the model looks them up), or
    a `StepIds` batch's own."""
    if not isinstance(batch, Batch):
        return batch.lookup_ids()
    by_key = batch.sparse.to_dict()
    if batch.user is not None:
        by_key.update(batch.user.to_dict())
    return {k: jt.values for k, jt in by_key.items()}


class _Lane:
    """A lower tier of one table's chain: its next step to prefetch and its prepared working sets."""

    def __init__(self, key: str, cache: LookaheadCache, start_step: int):
        self.key, self.cache, self.next_step = key, cache, start_step
        self.prepared: dict[int, WorkingSet | None] = {}  # step -> working set, or None where skipped

"""`LookaheadPipeline`: read batches ahead, tell the caches the future, prefetch in the background.

One worker thread owns the look-ahead:

1. it reads batches ``window`` steps ahead of the trainer (bounded by
   ``max_bytes``: the batches held plus the oracles' `OCCURRENCE_BYTES` per
   unique ID), takes each table's unique IDs of each batch and hands them to
   the table's `LookaheadCache.observe` (the oracle);
2. it *prepares* the next steps in order, up to ``depth`` steps ahead of the
   trainer: for every table the step's rows are made resident and pinned
   (`LookaheadCache.prepare`: evict by next use, write back dirty victims, read
   the misses). A step whose rows do not fit waits until an earlier step is
   released; a step with more unique rows than a cache gets a temporary copy,
   and the worker waits for its release before touching that cache again;
3. iterating the pipeline yields the prepared batches in order. The time the
   trainer waits for a batch is the *stall* (prefetch lateness): it is summed,
   and steps that waited are counted as late.

Everything that reads or writes table rows outside the step protocol
(evaluation, checkpoints) must run inside ``with pipeline.paused():``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from tierec.data.dataset import Batch
from tierec.storage.group import default_io_threads
from tierec.storage.lookahead import LookaheadCache

log = logging.getLogger(__name__)

_worker_of = threading.local()  # .pipeline: set on a pipeline's worker and I/O threads
LATE_S = 1e-4  # a step that waited longer than this for its rows counts as late
# Memory the oracles hold per unique ID of an observed step (counted against max_bytes): the IDs (8 B), the
# next-use ring and its index positions (12 B, with 1.5x growth slack 18 B), a share of the hash map id -> latest use
OCCURRENCE_BYTES = 32
SWITCH_INTERVAL_S = 5e-4  # the interpreter's GIL switch interval while a pipeline runs (see __init__)
# Batches read ahead after each step prepared for a trainer that was waiting, while the window is short of
# `window`: when the storage is slower than the steps, the worker would otherwise only prepare, the window
# would shrink to the few steps being prepared, and eviction would see no further than them.
CATCH_UP_READS = 2


def batch_nbytes(b: Batch) -> int:
    kjt = b.sparse
    n = b.dense.nbytes + b.labels.nbytes + kjt.values().nbytes + kjt.lengths().nbytes
    w = kjt.weights_or_none()
    n += w.nbytes if w is not None else 0
    u = getattr(b, "user", None)
    return n + (u.values().nbytes + u.lengths().nbytes if u is not None else 0)


class LookaheadPipeline:
    """Iterate ``batches`` (steps ``start_step``, ``start_step`` + 1, ...) with look-ahead prefetching
    into ``caches`` (sparse key -> `LookaheadCache`). ``sources`` maps a cache's name to the IDs it sees
    when that is not its own key's: ``(feature, lo, hi)`` (a row-wise shard), or a list of
    ``(feature, lo, hi, offset)`` (a `tierec.storage.group.TableGroup`: its members' IDs, each shifted
    by the member's offset). Use as a context manager, or call `close`."""

    def __init__(self, batches: Iterable[Batch], caches: dict[str, LookaheadCache], window: int = 200,
                 depth: int = 2, max_bytes: int = 1 << 30, start_step: int = 0, lower_depth: int | None = None,
                 io_threads: int | None = None, sources: dict[str, tuple[str, int, int]] | None = None,
                 switch_interval: float | None = SWITCH_INTERVAL_S):
        if window < 1 or depth < 1:
            raise ValueError(f"window and depth must be >= 1, got {window}, {depth}")
        # The trainer gives up the GIL in every kernel and must take it back from the prefetch threads, which run
        # Python between their reads: at CPython's 5 ms switch interval that wait is a large part of a step
        # (2-core VM, O_DIRECT: 1.20x the in-memory step at 5 ms, 1.10x at 0.5 ms). Restored by close().
        self._switch = sys.getswitchinterval()
        if switch_interval is not None and switch_interval < self._switch:
            sys.setswitchinterval(switch_interval)
        self.caches, self.window, self.depth, self.max_bytes = caches, window, min(depth, window), max_bytes
        # Which IDs of a batch each cache sees: parts (sparse key, lo, hi, offset) -> the key's IDs in [lo, hi),
        # minus lo (a row-wise shard of a table under torch.distributed; hi None: all), plus offset (a member
        # of a table group); default: its own key's IDs.
        self.sources = {name: _parts((sources or {}).get(name) or _default_source(name, c))
                        for name, c in caches.items()}
        # Lower tiers of a chain (device <- DRAM <- SSD): a LookaheadCache backing a LookaheadCache.
        # Each is prefetched `lower_depth` steps ahead, so the tier above finds its misses there.
        self.lower_depth = min(window, lower_depth or 4 * self.depth)
        self._lanes: list[_Lane] = []
        self._lane_groups: dict[str, list[_Lane]] = {}  # per table, lowest tier first
        for key, top in caches.items():
            c = top.backing
            while isinstance(c, LookaheadCache):
                self._lanes.append(_Lane(key, c, start_step))
                self._lane_groups.setdefault(key, []).insert(0, self._lanes[-1])
                c = c.backing
        # Tables are independent (own cache, own file): their I/O runs in parallel, one task per table.
        n = min(io_threads or default_io_threads(list(caches.values())), len(caches))
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="tierec-prefetch", initializer=self._mark_worker) \
            if n > 1 else None
        self._it: Iterator[Batch] = iter(batches)
        self._cond = threading.Condition()
        self._observed: deque[tuple[int, Batch, dict]] = deque()  # read and observed, not yet prepared
        self._ready: deque[tuple[int, Batch]] = deque()  # prepared, not yet taken
        self._partial: dict[str, object] = {}  # step being prepared: key -> working set
        self._bytes = 0  # batch data held in the window: sum of _nbytes
        self._nbytes: dict[int, int] = {}  # step -> its batch's bytes
        self._next_read = start_step
        self._next_take = start_step  # next step the trainer takes
        self.current_step = start_step - 1  # step the trainer works on
        self._released_upto = start_step - 1
        self._release_counts: dict[int, int] = {}
        self._barrier: int | None = None  # a bypassed step: wait for its release
        self._release_gen = 0  # counts releases: a worker waiting for room waits for the next one
        self._exhausted = self._stop = False
        self._error: BaseException | None = None
        self._pause_req = 0
        self._worker_parked = False
        self._window_capped = False
        self.stats = {"steps": 0, "stall_s": 0.0, "late_steps": 0, "max_stall_s": 0.0, "lead_sum": 0,
                      "bypass_table_steps": 0, "worker_wait_room": 0, "window_peak": 0,
                      "worker_cpu_s": 0.0, "window_sum": 0, "prepared_steps": 0}
        for c in self._all_caches():
            if c.pipeline is not None:
                raise RuntimeError(f"cache {c.name!r} is already driven by another pipeline")
            c.pipeline = self
        self._thread = threading.Thread(target=self._run, name="tierec-lookahead", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ trainer side
    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        t0 = time.perf_counter()
        with self._cond:
            while not self._ready and self._error is None and not (self._exhausted and not self._observed
                                                                  and not self._partial):
                self._cond.wait()
            if self._error is not None:
                raise RuntimeError("look-ahead worker failed") from self._error
            if not self._ready:
                raise StopIteration
            step, batch = self._ready.popleft()
            self.stats["lead_sum"] += len(self._ready)
            self.current_step = step
            self._next_take = step + 1
            self._cond.notify_all()
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

    def _mark_worker(self) -> None:
        _worker_of.pipeline = self

    def _each_table(self, fn, keys: list[str]) -> list:
        if self._pool is None or len(keys) < 2:
            return [fn(k) for k in keys]
        return list(self._pool.map(fn, keys))

    def on_release(self, step: int, cache: LookaheadCache) -> None:
        """Called by each top-tier cache when the trainer releases its working set of ``step``."""
        if any(lane.cache is cache for lane in self._lanes):
            return  # lower tiers are released by the worker itself
        with self._cond:
            self._release_gen += 1
            n = self._release_counts.get(step, 0) + 1
            if n == len(self.caches):
                self._release_counts.pop(step, None)
                self._released_upto = max(self._released_upto, step)
                if self._barrier is not None and step >= self._barrier:
                    self._barrier = None
            else:
                self._release_counts[step] = n
            self._cond.notify_all()

    def summary(self) -> dict:
        st = dict(self.stats)
        n = max(st["steps"], 1)
        st["mean_lead_steps"] = st.pop("lead_sum") / n
        st["mean_window_steps"] = st.pop("window_sum") / max(st["prepared_steps"], 1)  # the future eviction saw
        st["late_fraction"] = st["late_steps"] / n
        st.update(window=self.window, depth=self.depth)
        return st

    def close(self) -> None:
        """Stop the worker and unpin the rows of steps prepared but never taken."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        if self._pool is not None:
            self._pool.shutdown()
        for c in self._all_caches():
            c.pipeline = None
        for key, c in self.caches.items():
            if getattr(c, "group", None) is not None:  # slices handed to the model and never released
                c.group.abandon()
            while c._prepared:
                c.release(c._prepared.popleft(), dirty=False)
            if key in self._partial:
                c.release(self._partial.pop(key), dirty=False)
            c.end_lookahead()
        for lane in self._lanes:
            for step in sorted(lane.prepared):
                if lane.prepared[step] is not None:
                    lane.cache.release(lane.prepared[step], dirty=False)
            lane.prepared.clear()
            lane.cache.end_lookahead()
        self._ready.clear()
        self._observed.clear()
        sys.setswitchinterval(self._switch)

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
        if self._bytes >= self.max_bytes and self._next_read - self._next_take >= self.depth:
            if not self._window_capped:
                self._window_capped = True
                log.warning("look-ahead window limited to %d batches by lookahead_memory (%d bytes)",
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
        by_key = batch.sparse.to_dict()
        if getattr(batch, "user", None) is not None:  # deduplicated user-side features: same IDs, once per row
            by_key.update(batch.user.to_dict())
        uniq = {}
        for key, cache in self.caches.items():
            parts = []
            for feature, lo, hi, off in self.sources[key]:
                v = by_key[feature].values
                if hi is not None:  # a row-wise shard: its rows of the table, renumbered from 0
                    v = v[(v >= lo) & (v < hi)] - lo
                u = torch.unique(v)  # sorted, as the model's dedup
                parts.append(u + off if off else u)
            u = parts[0] if len(parts) == 1 else torch.cat(parts)  # members in offset order: still sorted
            cache.observe(step, u)
            uniq[key] = u
        for lane in self._lanes:
            lane.cache.observe(step, uniq[lane.key])
        with self._cond:
            self._observed.append((step, batch, uniq))
            occ = sum(u.numel() for u in uniq.values()) + sum(uniq[lane.key].numel() for lane in self._lanes)
            self._nbytes[step] = batch_nbytes(batch) + occ * OCCURRENCE_BYTES  # the batch + the oracles' share
            self._bytes += self._nbytes[step]
            self._next_read += 1
            self.stats["window_peak"] = max(self.stats["window_peak"], self._next_read - self._next_take)
        return True

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
        for key, ws in zip(keys, got):
            if ws is None:
                continue
            self._partial[key] = ws
            if ws.handle.kind == "temp":
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
        for key, cache in self.caches.items():
            cache.push_prepared(self._partial[key])
        self._partial.clear()
        self._retire_lower(step, uniq)
        with self._cond:
            self._observed.popleft()
            self._bytes -= self._nbytes.pop(step)
            self._ready.append((step, batch))
            self._cond.notify_all()
        return True


def _default_source(name: str, cache) -> tuple | list:
    """A table group's cache sees its members' features; any other cache its own key's IDs."""
    group = getattr(cache, "group", None)
    return group.sources() if group is not None else (name, 0, None)


def _parts(src) -> list[tuple[str, int, int | None, int]]:
    if isinstance(src, tuple):
        return [(*src, 0)]
    parts = [tuple(p) for p in src]
    if any(b[3] <= a[3] for a, b in zip(parts, parts[1:])):
        raise ValueError(f"table group sources must be in increasing offset order, got {parts}")
    return parts


class _Lane:
    """A lower tier of one table's chain: its next step to prefetch and its prepared working sets."""

    def __init__(self, key: str, cache: LookaheadCache, start_step: int):
        self.key, self.cache, self.next_step = key, cache, start_step
        self.prepared: dict[int, object] = {}  # step -> working set, or None where skipped

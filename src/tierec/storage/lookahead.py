"""Look-ahead (oracle) caching: Belady's rule within a window of future batches.

During training the future is known: the loader can read the next batches now.
Two pieces use it, one per table:

* `NextUseOracle` holds the unique IDs of every *observed* future step (the
  window) and answers "when is this row used next?" in O(1) per row. Where the
  driver knows more -- a next-use trace of the whole run
  (`tierec.train.nextuse.NextUseTrace`) -- ``observe`` takes each ID's next use
  beyond the window too, and the answer is exact at any distance.
* `LookaheadCache` is a `CachedTable` whose eviction order comes from the
  oracle: rows with no known next use go first (lowest long-run frequency
  first), then the row whose next use is furthest away (Belady; with a trace,
  Belady's MIN over the whole run). Its dirty victims go to the backing store
  with their next use as the placement rank (`RowStore.exchange`'s
  ``write_rank``), so a write-back log lays rows read back together side by
  side, and the block neighbours of a step's misses that the window uses come
  in with them at no extra I/O.
  Rows are brought in ahead of their step by `prepare(step, ids)` -- called by
  the `tierec.train.pipeline.LookaheadPipeline` worker, overlapped with compute --
  which also pins them until the step's working set is released.

The step protocol, for steps in increasing order (driven by its one owner,
`tierec.train.pipeline.LookaheadPipeline`; the cache knows nothing of it)::

    cache.begin_lookahead(guard)      # the driver says when a worker may be running beside a caller
    cache.observe(s, ids_s)           # the loader read step s (s may be far ahead)
    ws = cache.prepare(s, ids_s)      # rows resident and pinned (None: no room yet); the driver
                                      # hands ws to the model for step s ...
    cache.release(ws, dirty=True)     # ... and returns it: unpinned, next use updated
    cache.end_lookahead()             # the window is forgotten; cached rows stay

Exactness: a row is only ever read from the backing store when it is not
resident here, and a dirty row is written back (by the thread that evicts it,
before that thread reads anything else) when it is evicted. During training only
the driver's worker thread reads or writes the backing store; the trainer
thread touches cache rows that the worker has pinned for it. Anything else
(evaluation, checkpoints) runs with the worker paused (`LookaheadGuard.busy` is
False); then `acquire` serves a temporary copy without changing what is cached.
A temporary copy made by `prepare` for a step larger than the cache (`is_copy`)
writes back on release, so the driver releases it with its worker paused.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch

from tierec.masks import count, select, where
from tierec.storage.base import WorkingSet
from tierec.storage.cache import _MAX, CachedTable, _Handle
from tierec.storage.hashindex import HashIndex
from tierec.storage.sketch import CountMinSketch
from tierec.storage.sweep import SortedSweep

log = logging.getLogger(__name__)

NEVER = torch.iinfo(torch.int64).max  # "no use inside the window"
# with a trace of the run's next uses, occurrences used again within this many steps stay out of the oracle's map
# (`NextUseOracle.observe`)
UNTRACKED_WITHIN = 16
_COLD_BASE = torch.iinfo(torch.int64).min // 2  # eviction keys of rows not used in the window
# `LookaheadCache._victims`: a pass over every slot keeps this many of the lowest keys' slots (at least), or this
# many steps' victims; without ties, below a threshold estimated from this many keys
CANDIDATES = 1 << 16
CANDIDATE_STEPS = 16
CANDIDATE_SAMPLE = 1 << 16
CANDIDATE_CAP = 4  # candidates beyond this many times a pass's share drop rows tied at the threshold (half stay)
# below this many resident rows a pass costs less than keeping candidates (bench_scale --quick, ~180K rows: the
# look-ahead worker's CPU 12.2-12.6 s without candidates, 16.4-18.5 s with them)
CANDIDATE_MIN_ROWS = 1 << 20


def _search_sorted(keys: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool [n]: which of ``ids`` the sorted, distinct ``keys`` hold; int64 [n]: their positions, where held): a
    search per ID, no pass over ``keys``. ``keys`` not empty."""
    pos = torch.searchsorted(keys, ids).clamp_(max=keys.numel() - 1)
    return keys.index_select(0, pos) == ids, pos


def _sorted_holds(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """bool [n]: which of ``ids`` the sorted ``keys`` hold."""
    if keys.numel() == 0:
        return torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
    return _search_sorted(keys, ids)[0]


def _positions_in(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 [k]: the positions in the sorted, distinct ``keys`` of those of ``ids`` (any order) they hold: for few
    ``ids`` in many keys (a victim pass's protected slots among its candidates)."""
    if keys.numel() == 0 or ids.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=keys.device)
    held, pos = _search_sorted(keys, ids)
    return select(held, pos)[0]


class NextUseOracle:
    """Next-use steps of row IDs inside a window of future steps.

    ``observe(step, ids)`` registers the unique IDs of a future step (steps in
    increasing order); ``consume(step)`` retires the oldest observed step and
    returns, for each of its IDs, the next observed step that uses it -- or,
    where the window holds none, the next use the observer gave for it (a trace
    of the run), else `NEVER`. Memory is O(occurrences in the window): every
    observed (step, id) is an *occurrence*, numbered in order; a ring buffer
    holds each occurrence's next-use step and whether it is its ID's latest in
    the window, and a hash map id -> latest occurrence links a new occurrence
    to the previous one of the same ID. No per-ID Python loop.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._steps: deque[tuple[int, torch.Tensor, int]] = deque()  # (step, ids, first occurrence)
        self._ring = torch.full((1024,), NEVER, dtype=torch.int64, device=self.device)
        self._pring = torch.zeros(1024, dtype=torch.int32, device=self.device)  # occurrence -> its entry in _last
        self._latest = torch.zeros(1024, dtype=torch.bool, device=self.device)  # its ID's latest occurrence
        self._next_occ = 0
        self._last = HashIndex(1024, self.device, torch.int64)  # id -> latest occurrence
        self.last_observed = -1

    def __len__(self) -> int:
        """Observed steps not yet consumed."""
        return len(self._steps)

    @property
    def nbytes(self) -> int:
        """Bytes it holds beyond the observed steps' ID tensors (the caller's): the ring, and the hash map."""
        return self._ring.nbytes + self._pring.nbytes + self._latest.nbytes + self._last.nbytes

    @property
    def occurrences(self) -> int:
        return self._next_occ - self._steps[0][2] if self._steps else 0

    def observe(self, step: int, ids: torch.Tensor, next_use: torch.Tensor | None = None) -> torch.Tensor:
        """Register step ``step``'s unique IDs (int64 [U]); ``next_use`` (int64 [U], > ``step``, `NEVER` for
        none): each ID's next use after this step where the caller knows it exactly (a trace of the run): the
        answer of `consume`. Returns bool [U]: True where the ID has no earlier use in the window (its next
        use is now ``step``).

        With ``next_use``, an occurrence used again within `UNTRACKED_WITHIN` steps stays out of the hash map:
        its next use is known, and its row is used again before long. The map then holds only the other
        occurrences (most of a skewed stream's are hot: about a third of the map work is left), so for an ID
        used that soon `last_use` may be earlier than its last use (or -1) and ``True`` is returned only
        for tracked occurrences (an earlier untracked one may exist)."""
        if step <= self.last_observed:
            raise ValueError(f"observe: step {step} after step {self.last_observed}; steps must increase")
        ids = ids.to(self.device)
        U = ids.numel()
        self._reserve(U)
        occ = self._next_occ + torch.arange(U, device=self.device)
        R = self._ring.numel()
        if next_use is None:
            self._ring.index_fill_(0, occ % R, NEVER)
            tracked, tid, tocc = None, ids, occ
        else:
            next_use = next_use.to(self.device, torch.int64)
            self._ring.index_copy_(0, occ % R, next_use)  # exact: no later step rewrites it
            self._latest.index_fill_(0, occ % R, False)
            tracked = where(next_use > step + UNTRACKED_WITHIN)
            tid, tocc = ids.index_select(0, tracked), occ.index_select(0, tracked)
        found, prev, pos = self._last.lookup(tid)
        fi = where(found)
        if fi.numel():
            at_prev = prev.index_select(0, fi) % R
            if next_use is None:
                self._ring.index_fill_(0, at_prev, step)  # previous occurrence -> this step
            self._latest.index_fill_(0, at_prev, False)
            self._last.vals.index_copy_(0, pos.index_select(0, fi), tocc.index_select(0, fi))
        self._latest.index_fill_(0, tocc % R, True)
        fn = where(~found)
        pos.index_copy_(0, fn, self._last.insert(tid.index_select(0, fn), tocc.index_select(0, fn)))
        self._pring.index_copy_(0, tocc % R, pos.to(torch.int32))
        self._steps.append((step, ids, self._next_occ))
        self._next_occ += U
        self.last_observed = step
        if tracked is None:
            return ~found
        first = torch.zeros(U, dtype=torch.bool, device=self.device)
        return first.index_fill_(0, tracked.index_select(0, fn), True)

    def last_use(self, ids: torch.Tensor) -> torch.Tensor:
        """The last observed step that uses each of ``ids`` (int64 [U]); -1 where the window holds none."""
        out = torch.full_like(ids, -1)
        if not self._steps or ids.numel() == 0:
            return out
        found, occ, _ = self._last.lookup(ids)
        fi = where(found)
        if fi.numel():
            first = torch.tensor([s[2] for s in self._steps], device=self.device)
            steps = torch.tensor([s[0] for s in self._steps], device=self.device)
            out.index_copy_(0, fi, steps[torch.searchsorted(first, occ.index_select(0, fi), right=True) - 1])
        return out

    def consume(self, step: int) -> torch.Tensor:
        """Retire the oldest observed step (must be ``step``); returns the next use of each of its
        IDs, int64 [U] (`NEVER` where the window holds no later use)."""
        if not self._steps or self._steps[0][0] != step:
            oldest = self._steps[0][0] if self._steps else None
            raise ValueError(f"consume: step {step} is not the oldest observed step ({oldest})")
        _, ids, o0 = self._steps.popleft()
        at = (o0 + torch.arange(ids.numel(), device=self.device)) % self._ring.numel()
        nu = self._ring.index_select(0, at)
        # the IDs used last here leave the map (their entries were recorded when observed)
        self._last.remove_at(self._pring.index_select(0, select(self._latest.index_select(0, at), at)[0]).long())
        return nu

    def _reserve(self, n: int) -> None:
        """Room for ``n`` more occurrences in the ring and the hash map. The ring grows to 1.5x what is
        needed (rounded up to 64K entries): 13 B per occurrence in the window, plus that slack."""
        live = self.occurrences
        R = self._ring.numel()
        if live + n > R:
            R2 = -(-(3 * (live + n) // 2) // 65536) * 65536
            ring = torch.full((R2,), NEVER, dtype=torch.int64, device=self.device)
            pring = torch.zeros(R2, dtype=torch.int32, device=self.device)
            latest = torch.zeros(R2, dtype=torch.bool, device=self.device)
            if live:
                occ = torch.arange(self._steps[0][2], self._next_occ, device=self.device)
                ring[occ % R2] = self._ring[occ % R]
                pring[occ % R2] = self._pring[occ % R]
                latest[occ % R2] = self._latest[occ % R]
            self._ring, self._pring, self._latest = ring, pring, latest
        h = self._last
        if h.live + h.tomb + n > h.max_fill:  # rebuild from the live latest occurrences, with room for two more steps
            ids, occ = self._latest_occurrences()  # (a map holds 4-8x its capacity in entries of 16 B: no more slack)
            self._last = HashIndex(max(1024, ids.numel() + 2 * n), self.device, torch.int64)
            self._pring.index_copy_(0, occ % self._pring.numel(), self._last.insert(ids, occ).to(torch.int32))

    def _latest_occurrences(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._steps:
            e = torch.empty(0, dtype=torch.int64, device=self.device)
            return e, e
        ids = torch.cat([s[1] for s in self._steps])
        occ = torch.arange(self._steps[0][2], self._next_occ, device=self.device)
        last = self._latest.index_select(0, occ % self._latest.numel())
        return ids[last], occ[last]


class LookaheadGuard(Protocol):
    """What a look-ahead driver tells its caches (`LookaheadCache.begin_lookahead`)."""

    def busy(self) -> bool:
        """True while the driver's worker may read or write the cache's rows or backing store
        concurrently with the calling thread (not paused, and the caller is not the worker)."""
        ...


SKETCH_DEPTH = 2  # rows of the long-run count-min sketch
# a bulk read's pieces of at least this many IDs are found by a `SortedSweep` of the cached IDs, not the hash map
SWEEP_MIN_IDS = 1 << 14


def default_sketch_width(capacity: int) -> int:
    """Counters per row of a cache's sketch: a power of two >= its capacity (at least 1024)."""
    return max(1024, 1 << (int(capacity) - 1).bit_length())


def _with_misses(rows: torch.Tensor, mi: torch.Tensor, misses: Future | torch.Tensor | None) -> torch.Tensor:
    """Rows [U, width] with rows ``mi`` [M] copied in from ``misses`` (their rows [M, width] on the CPU, or a
    future of them; None where M = 0), on the CPU."""
    if misses is not None:
        rows.index_copy_(0, mi, (misses.result() if isinstance(misses, Future) else misses).to(rows.device))
    return rows.cpu()


class LookaheadCache(CachedTable):
    """A `CachedTable` that evicts by next use inside the look-ahead window (see module doc).

    Per cached row it adds ``_next`` (step of next use, `NEVER` outside the
    window), ``_lfreq`` (long-run use count from a count-min sketch of every
    observed step, kept across evictions: it ranks the rows with no known next
    use, so steps observed with a trace of the run's next uses, where such a row
    is never used again, skip it) and whether it came in as a block
    neighbour not yet used: 17 B per row, and the sketch behind ``_lfreq`` (2 x a power
    of two >= capacity int64 counters: 16-32 B per row; the planner charges it,
    `tierec.storage.tiered.LOOKAHEAD_INDEX_BYTES_PER_ROW`). ``stats()`` counts a
    row brought in by `prepare` as a miss, so ``hit_rate`` is 1 - rows fetched /
    rows looked up, directly comparable to Belady's MIN of `tierec.sim.policies`.
    """

    def __init__(self, backing, capacity_rows: int, device="cpu", name: str = "", *, sketch_width: int | None = None,
                 neighbours: bool = True):
        super().__init__(backing, capacity_rows, "lru", device, name)
        self.policy = "lookahead"
        C = self.capacity
        self._next = torch.full((C,), NEVER, dtype=torch.int64, device=self.device)
        self._lfreq = torch.zeros(C, dtype=torch.int64, device=self.device)
        self.take_neighbours = neighbours  # take the backing store's block neighbours that the window uses
        self._neighbour = torch.zeros(C, dtype=torch.bool, device=self.device)  # came in as one, not yet used
        width = sketch_width or default_sketch_width(C)  # it only ranks rows unused in the window
        self._sketch = CountMinSketch(width=width, depth=SKETCH_DEPTH, device=self.device)
        self.oracle = NextUseOracle(self.device)
        self._mu = threading.Lock()  # metadata: index, pins, dirty bits, next uses, oracle
        self._ahead: ThreadPoolExecutor | None = None  # read_each's thread, made once (docs/storage.md)
        self._released: deque[tuple[WorkingSet, bool, int]] = deque()  # trainer's releases, not yet applied
        self._guard: LookaheadGuard | None = None  # the driver of the step protocol, while there is one
        # victims by candidates (`_victims`): slots that may hold the lowest eviction keys, and the slots whose
        # keys went down since (`_rekeyed`); every other slot's key is >= ``_cand_thr``
        self._cand: torch.Tensor | None = None
        self._cand_thr = 0
        self._cand_keep = CANDIDATES  # the candidates a pass keeps
        self._rekeys: list[torch.Tensor] = []

    # ------------------------------------------------------------------ policy
    def _victim_key(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        """int64 [size] (or [k]: of ``slots`` only): each resident slot's eviction key, lowest evicted first."""
        def at(t: torch.Tensor) -> torch.Tensor:
            return t[: self.size] if slots is None else t.index_select(0, slots)
        nxt = at(self._next)
        if not self._sketch.total:  # no long-run counts (a traced run): rows with no next use all rank first, alike
            return -nxt
        cold = _COLD_BASE + at(self._lfreq).clamp(max=1 << 40)
        return torch.where(nxt == NEVER, cold, -nxt)

    def _rekeyed(self, slots: torch.Tensor) -> None:
        """``slots``' eviction keys may have gone down (a new next use or count, a new row): `_victims` looks at
        them again."""
        if self._cand is not None:
            self._rekeys.append(slots)

    def _victims(self, need: int, protect: torch.Tensor) -> torch.Tensor | None:
        """`CachedTable._victims` without a pass over the whole cache at every step, where the run has a trace.

        Belady's rule evicts the rows used furthest in the future; with a trace most steps evict rows never used
        again, and a pass over every slot's key costs O(cache rows) per step: ~60 ms at 8.4M rows (bench_scale
        at 1.2x RAM), more than the rest of the step's work. So a pass keeps the `CANDIDATES` lowest keys'
        slots (its threshold: every other slot's key is >= it); between passes a slot's key only goes down where
        `_rekeyed` says so (a released row's new next use, a new row), and those slots join the candidates at
        the next call, which evicts the lowest of them -- the same keys a whole pass would pick, ties among
        them in slot order as in a pass (`_tie_break`: evicting any of them costs the same misses). A new pass
        runs when fewer than ``need`` candidates may go. Without a trace the keys (counts, least recently used
        ties) change at every touch, and below `CANDIDATE_MIN_ROWS` a pass costs less: one pass per call, as
        before."""
        if self._sketch.total or self.size < CANDIDATE_MIN_ROWS:
            self._cand = None
            return super()._victims(need, protect)
        if self._cand is not None:
            got = self._from_candidates(need, protect)
            if got is not None:
                return got
        key = self._victim_key()
        self._cand_keep = max(CANDIDATES, CANDIDATE_STEPS * need)
        cand = self._lowest_slots(key, self._cand_keep)
        self._cand, self._cand_thr, self._rekeys = cand, int(key.index_select(0, cand).max()), []
        got = self._from_candidates(need, protect)
        if got is not None:
            return got
        return self._lowest(self._eligible(key, protect), need)  # fewer than ``need`` of them may go: the whole pass

    def _lowest_slots(self, key: torch.Tensor, keep: int) -> torch.Tensor:
        """About ``keep`` slots (int64, increasing) holding the lowest of ``key`` (int64 [K]): every slot left out has
        a key >= theirs. With a trace most are rows never used again, which tie: the first ``keep`` of them;
        else those below a threshold estimated from a sample (no selection pass over all K: `torch.topk` of
        64K of 8.4M keys took 120 ms, twice a pass)."""
        if keep >= key.numel():
            return torch.arange(key.numel(), device=key.device)
        low = key.min()
        tied = where(key == low)
        if tied.numel() >= keep:
            return tied[:keep]
        sample = key.index_select(0, torch.randint(key.numel(), (CANDIDATE_SAMPLE,), generator=self._gen,
                                                   device=key.device))
        thr = torch.kthvalue(sample, max(1, min(CANDIDATE_SAMPLE, CANDIDATE_SAMPLE * keep // key.numel()))).values
        below, tied = where(key < thr), where(key == thr)
        return torch.cat([below, tied[: max(0, keep - below.numel())]]).sort().values

    def _from_candidates(self, need: int, protect: torch.Tensor) -> torch.Tensor | None:
        """``need`` victims among the candidates and the slots rekeyed since (`_victims`), or None if fewer may go
        with keys within the last pass's threshold. The candidates become those with keys within it."""
        cand, thr = self._cand, self._cand_thr
        assert cand is not None
        if self._rekeys:
            more = torch.cat(self._rekeys)
            self._rekeys = []
            more = torch.unique(select(self._victim_key(more) <= thr, more)[0])
            if more.numel():
                more = select(~_sorted_holds(cand, more), more)[0]
                cand = torch.cat([cand, more]).sort().values if more.numel() else cand
        key = self._victim_key(cand)
        cand, key = select(key <= thr, cand, key)  # rows whose keys went up since leave
        if cand.numel() > CANDIDATE_CAP * self._cand_keep:  # rows tied at the threshold may leave too: their keys are
            drop = where(key == thr)[CANDIDATE_CAP * self._cand_keep // 2 :]  # >= it (late in a run most rows
            if drop.numel():  # are never used again: the candidates would grow without bound)
                left = torch.ones(cand.numel(), dtype=torch.bool, device=cand.device)
                left.index_fill_(0, drop, False)
                cand, key = select(left, cand, key)
        self._cand = cand
        key.index_fill_(0, _positions_in(cand, protect), _MAX)
        key.masked_fill_(self._pins.index_select(0, cand) > 0, _MAX)
        return self._lowest(key, need, cand) if count(key != _MAX) >= need else None

    def _tie_break(self, slots: torch.Tensor, n: int) -> torch.Tensor:
        """With no long-run counts (a traced run) the first ``n`` of ``slots``: rows tied on their eviction key are
        next used at the same step, or never again, so evicting any of them costs the same misses. Else the
        least recently used (rows with no use in the window tie on their counts)."""
        return super()._tie_break(slots, n) if self._sketch.total else slots[:n]

    def _install(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        super()._install(ids, slots)
        self._next.index_fill_(0, slots, NEVER)
        self._rekeyed(slots)
        self._neighbour.index_fill_(0, slots, False)
        if self._sketch.total:
            self._lfreq.index_copy_(0, slots, self._sketch.query(ids))

    @property
    def index_nbytes(self) -> int:
        return super().index_nbytes + self._next.nbytes + self._lfreq.nbytes + self._neighbour.nbytes

    @property
    def window_nbytes(self) -> int:
        """Bytes the oracle holds for the observed window (its ID tensors are the driver's to count)."""
        return self.oracle.nbytes

    LOOKAHEAD_SLOT_BYTES = 8 + 8 + 1  # _next, _lfreq (int64), _neighbour (bool)

    @classmethod
    def bookkeeping_bytes(cls, capacity: int, policy: str = "lookahead") -> int:
        """`CachedTable.bookkeeping_bytes` + the look-ahead metadata and the count-min sketch of its default width."""
        return (super().bookkeeping_bytes(capacity) + capacity * cls.LOOKAHEAD_SLOT_BYTES
                + CountMinSketch.bytes_for(default_sketch_width(capacity), SKETCH_DEPTH))

    # ------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def _locked(self):
        """The metadata lock, with the trainer's pending releases applied first (in step order):
        until then their rows stay pinned, so nothing evicts, writes back or re-reads them."""
        with self._mu:
            while self._released:
                ws, dirty, step = self._released.popleft()
                if dirty:
                    self._dirty.index_fill_(0, ws.index, True)
                self._pins.index_add_(0, ws.index, self._pins.new_full((1,), -1).expand(ws.index.numel()))
                self._next.index_copy_(0, ws.index, self.oracle.consume(step))
                if self._sketch.total:
                    self._lfreq.index_copy_(0, ws.index, self._sketch.query(ws.ids))
                self._rekeyed(ws.index)
            yield

    # ------------------------------------------------------------------ step protocol
    def begin_lookahead(self, guard: LookaheadGuard) -> None:
        """A driver starts the step protocol on this cache (one at a time); ``guard`` says when its worker
        may run beside a caller (module doc)."""
        if self._guard is not None:
            raise RuntimeError(f"cache {self.name!r} is already driven by another look-ahead pipeline")
        self._guard = guard

    def end_lookahead(self) -> None:
        """The driver stopped (every working set it prepared is released): forget the window; cached rows
        stay, their next uses become unknown."""
        with self._locked():
            self.oracle = NextUseOracle(self.device)
            self._next.fill_(NEVER)
            self._cand = None
        self._guard = None

    def is_copy(self, ws: WorkingSet) -> bool:
        """True when ``ws`` (from `prepare`) is a temporary copy, not pinned cache rows: a step with more
        rows than the cache. Its release writes the rows back, so it needs the driver's worker paused."""
        return self._own(ws).kind == "temp"

    def observe(self, step: int, ids: torch.Tensor, next_use: torch.Tensor | None = None) -> None:
        """The loader read step ``step``; ``ids`` int64 [U] are its unique row IDs, sorted; ``next_use`` (int64 [U]),
        where the driver has a trace of the run: each one's next use after this step (`NextUseOracle.observe`)."""
        ids = ids.to(self.device)
        with self._locked():
            first = self.oracle.observe(step, ids, next_use)
            if next_use is None:  # with the run's next uses, a row with none is never used again: no rank needed
                self._sketch.update(ids)
            if self.size:  # resident rows used first at this step: their next use is at most this step
                hit, slots = self._lookup(select(first, ids)[0])
                slots = select(hit, slots)[0]
                self._next.index_copy_(0, slots, self._next.index_select(0, slots).clamp_(max=step))

    def prepare(self, step: int, ids: torch.Tensor, allow_bypass: bool = False) -> WorkingSet | None:
        """Make step ``step``'s rows (``ids``, unique, sorted) resident and pin them; returns the working
        set the model will `acquire`. Misses evict rows used furthest in the future (never a pinned
        row). None when there is no room until an earlier step is released; with ``allow_bypass``
        (no other step outstanding) a step with more rows than the cache gets a temporary copy.
        With ``neighbours``, rows that share the misses' device blocks and that a later step of the
        window uses come in with them (`_neighbours_for`). Does the backing-store I/O outside the
        metadata lock."""
        ids = ids.to(self.device)
        U = ids.numel()
        wb = None
        e = ids[:0]
        nb, nb_slots = e, e
        with self._locked():
            hit, slots = self._lookup(ids)
            hit_slots = select(hit, slots)[0]
            nh = hit_slots.numel()
            miss = where(~hit)
            used = count(self._neighbour.index_select(0, hit_slots))
            if used:
                self._st["neighbour_hits"] += used
                self._neighbour.index_fill_(0, hit_slots, False)
            if nh < U:
                picked = self._pick_slots(U - nh, hit_slots) if U <= self.capacity else None
                if picked is None:
                    if not allow_bypass:
                        return None
                    ws = self._acquire_temp(ids, hit, slots, step)  # reads the misses under the lock: rare
                    self._count_lookups(U, nh)
                    return ws
                free_slots, victims = picked
                miss_ids = ids.index_select(0, miss)
                nb, nb_next, nb_free, nb_victims = self._neighbours_for(step, miss_ids, torch.cat([hit_slots, victims]),
                                                                        free_slots.numel())
                wb = self._detach(torch.cat([victims, nb_victims]))
                self.size += free_slots.numel() + nb_free.numel()
                new = torch.cat([free_slots, victims])
                nb_slots = torch.cat([nb_free, nb_victims])
                self._install(torch.cat([miss_ids, nb]), torch.cat([new, nb_slots]))  # one call: see _install
                slots = slots.index_copy(0, miss, new)
                if nb.numel():  # pinned until their rows are in, not part of the step
                    self._next.index_copy_(0, nb_slots, nb_next)
                    self._rekeyed(nb_slots)
                    self._neighbour.index_fill_(0, nb_slots, True)
                    self._pins.index_add_(0, nb_slots, self._pins.new_ones(1).expand(nb_slots.numel()))
                    self._st["neighbour_rows"] += nb.numel()
            self._touch(slots)
            self._count_lookups(U, nh)
            ws = self._handle(WorkingSet(ids, slots, self.weight, self.state), "cache", slots, step=step)
        if nh < U:  # the new slots are pinned and not yet handed out: nobody else reads them
            # the victims' write-back and the misses' read in one pass (disjoint rows: a victim is resident,
            # a miss is not); a victim fetched again by a later step is read after this write is done
            if nb.numel():
                fetch, order = torch.sort(torch.cat([miss_ids, nb]))
                dst = torch.cat([new, nb_slots]).index_select(0, order)
            else:
                fetch, dst = miss_ids, new
            w, s = self._bexchange(wb, fetch)
            self.weight.index_copy_(0, dst, w)
            self.state.index_copy_(0, dst, s)
            self._st["prefetched_rows"] += miss_ids.numel()
            if nb.numel():
                with self._mu:
                    self._pins.index_add_(0, nb_slots, self._pins.new_full((1,), -1).expand(nb_slots.numel()))
        return ws

    def _neighbours_for(self, step: int, miss_ids: torch.Tensor, protect: torch.Tensor, free_used: int):
        """Rows to bring in with step ``step``'s misses at no extra I/O: the backing store's block neighbours
        of ``miss_ids`` (`RowStore.neighbours`) that are not resident and that a later step of the
        window uses, in slots that Belady's rule gives up for them -- free slots, then rows with no use
        in the window (never ``protect`` ed or pinned ones). Returns (IDs [K] sorted, their last use in
        the window [K], free slots, victims). Their next use is set to that last use (an upper bound:
        the oracle keeps each ID's latest occurrence) until the step that uses them releases them."""
        e = miss_ids[:0]
        if not self.take_neighbours or miss_ids.numel() == 0:
            return e, e, e, e
        cand = self.backing.neighbours(miss_ids.to(self._bdev)).to(self.device)
        last = self.oracle.last_use(cand)
        cand, last = select(last > step, cand, last)  # used later in the window (then not resident yet: most are)
        if cand.numel():
            cand, last = select(~self._lookup(cand)[0], cand, last)
        if cand.numel() == 0:
            return e, e, e, e
        start = self.size + free_used
        n_free = min(self.capacity - start, cand.numel())
        free = torch.arange(start, start + n_free, device=self.device)
        victims = e
        need = cand.numel() - n_free
        if need:
            K = self.size
            ok = (self._next[:K] > self.oracle.last_observed) & (self._pins[:K] == 0)  # no use in the window
            ok[protect] = False
            take = min(need, count(ok))
            if take:
                victims = torch.topk(self._victim_key().masked_fill(~ok, _MAX), take, largest=False).indices
            if n_free + take < cand.numel():  # room for some: the ones used soonest (by last use)
                sel = torch.topk(last, n_free + take, largest=False).indices.sort().values
                cand, last = cand[sel], last[sel]
        return cand, last, free, victims

    def _count_lookups(self, U: int, nh: int) -> None:
        self._st["lookups"] += U
        self._st["hits"] += nh
        self._st["misses"] += U - nh

    def _detach(self, victims: torch.Tensor):
        """Drop ``victims`` from the cache; returns their dirty rows (ids sorted, weight, state, next use) to write
        back: the next use is their placement rank (`RowStore.exchange`'s ``write_rank``)."""
        dirty = self._drop(victims)
        if dirty is None:
            return None
        wid, sl = dirty
        return wid, self.weight.index_select(0, sl), self.state.index_select(0, sl), self._next.index_select(0, sl)

    # ------------------------------------------------------------------ TableStorage
    def _busy(self) -> bool:
        return self._guard is not None and self._guard.busy()

    def acquire(self, ids: torch.Tensor) -> WorkingSet:
        """A temporary copy of rows ``ids`` that leaves the cached rows as they are (evaluation, checkpoints:
        outside the step protocol, with any driver's worker paused)."""
        self._check_quiet("acquire()")
        ids = ids.to(self.device)
        with self._locked():
            hit, slots = self._lookup(ids)
            ws = self._acquire_temp(ids, hit, slots)
            self._st["sync_acquires"] += 1
            return ws

    def release(self, ws: WorkingSet, dirty: bool) -> None:
        """Give back ``ws``: a step's working set from `prepare` (pinned rows: the bookkeeping is left to
        whoever takes the lock next, off the trainer's path; a temporary copy: written back now, see
        `is_copy`), or a temporary copy from `acquire`."""
        h = ws.handle
        if not isinstance(h, _Handle) or h.step is None:  # a temporary copy from `acquire`
            with self._locked():
                super().release(ws, dirty)
            return
        step = h.step
        if h.owner is not self or h.released:
            raise RuntimeError(f"cache {self.name!r}: bad or repeated release of step {step}")
        if h.kind == "temp":  # a bypassed step writes its rows back (the driver's worker is paused)
            with self._locked():
                super().release(ws, dirty)
                nu = self.oracle.consume(step)
                assert h.hit_idx is not None  # a "temp" handle has it
                self._next.index_copy_(0, h.pinned, nu.index_select(0, h.hit_idx))
                self._rekeyed(h.pinned)
        else:
            h.released = True
            h.fin.detach()
            if dirty and ws.ids.numel():
                self.backing.mark_written(ws.ids)
            self._released.append((ws, dirty, step))

    def _check_quiet(self, what: str) -> None:
        if self._busy():
            raise RuntimeError(f"cache {self.name!r}: {what} while the look-ahead worker runs; pause it first")

    def flush(self) -> None:
        self._check_quiet("flush()")
        with self._locked():
            super().flush()

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.shutdown()
            self._ahead = None
        super().close()

    def read_rows(self, start: int, end: int):
        self._check_quiet("read_rows()")
        with self._locked():
            return super().read_rows(start, end)

    def write_rows(self, start: int, weight: torch.Tensor, state: torch.Tensor) -> None:
        self._check_quiet("write_rows()")
        with self._locked():
            super().write_rows(start, weight, state)

    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``ids`` (unique, sorted) for an upper tier's misses: cached rows (e.g. pinned by
        `prepare` for this step) plus the rest from the backing store, without admitting them."""
        self._check_quiet("read()")
        ids = ids.to(self.device)
        w = torch.empty(ids.numel(), self.dim, device=self.device)
        s = torch.empty(ids.numel(), self.state_dim, device=self.device)
        with self._locked():
            mi = self._read_hits(ids, w, s)
            if mi.numel():
                bw, bs = self._bread(ids.index_select(0, mi))
                w.index_copy_(0, mi, bw)
                s.index_copy_(0, mi, bs)
            return w, s

    def read_each(self, pieces: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """`read` of each piece of IDs in turn (a bulk read: a checkpoint's row set; sorted pieces, each above the
        last), joined (float32 CPU [U, dim + state_dim]), the backing store one piece ahead: a piece's misses are
        read on a thread of their own (the backing store's ``read_each`` of them: no split and join) while this
        one finds and copies the next piece's hits -- pieces of `SWEEP_MIN_IDS` or more through a `SortedSweep`
        of the cached IDs instead of the hash map. One thread at a time in the backing store, and the cache's
        own state only read (the worker paused), so the rows are `read`'s."""
        self._check_quiet("read_each()")
        sweep: SortedSweep | None = None  # made at the first large piece
        if self._ahead is None:
            self._ahead = ThreadPoolExecutor(1, thread_name_prefix="tierec-read-ahead")
        waiting: deque = deque()  # (rows, miss positions, their rows or a future of them): 2 pieces at most
        it = iter(pieces)
        nxt = next(it, None)
        try:
            while (ids := nxt) is not None:
                nxt = next(it, None)  # known before this piece's misses are asked for: a single piece reads them here
                ids = ids.to(self.device)
                rows = torch.empty(ids.numel(), self.dim + self.state_dim, device=self.device)
                with self._locked():
                    if sweep is None and ids.numel() >= SWEEP_MIN_IDS and self.size:
                        sweep = SortedSweep(self._slot_id[: self.size], self.num_embeddings)
                    mi = self._read_hits(ids, rows[:, : self.dim], rows[:, self.dim:],
                                         sweep if ids.numel() >= SWEEP_MIN_IDS else None)
                misses: Future | torch.Tensor | None
                if not mi.numel():
                    misses = None
                elif nxt is None and not waiting:  # nothing to read them beside
                    misses = self._bread_joined(ids.index_select(0, mi))
                else:
                    misses = self._ahead.submit(self._bread_joined, ids.index_select(0, mi))
                waiting.append((rows, mi, misses))
                if len(waiting) > 1:
                    yield _with_misses(*waiting.popleft())
            while waiting:
                yield _with_misses(*waiting.popleft())
        finally:  # the caller stopped early (an error): no read of this call left running in the backing store
            for *_, misses in waiting:
                if isinstance(misses, Future):
                    misses.exception()

    def _read_hits(self, ids: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
                   sweep: SortedSweep | None = None) -> torch.Tensor:
        """Copy the cached ones of rows ``ids`` [U] into ``w`` [U, dim] and ``s`` [U, state_dim] (found through
        the hash map or ``sweep``); the positions of the misses [M], their rows not filled in. Under the lock."""
        hit, slots = self._lookup(ids) if sweep is None else sweep.find(ids)
        hi, mi = where(hit), where(~hit)
        at = slots.index_select(0, hi)
        w.index_copy_(0, hi, self.weight.index_select(0, at))
        s.index_copy_(0, hi, self.state.index_select(0, at))
        self._st["upper_reads"] += ids.numel()
        self._st["upper_read_hits"] += hi.numel()
        return mi

    def write(self, ids, weight, state):
        """An upper tier's write-backs: write-allocate (victims by next use, never pinned rows)."""
        self._check_quiet("write()")
        with self._locked():
            return super().write(ids, weight, state)

    def retire(self, step: int, ids: torch.Tensor) -> None:
        """Step ``step`` (unique ``ids``) is over for this tier without a prepared working set (a lower
        tier whose prefetch was skipped): advance the window, update the next use of resident rows."""
        ids = ids.to(self.device)
        with self._locked():
            nu = self.oracle.consume(step)
            hit, slots = self._lookup(ids)
            slots, nu = select(hit, slots, nu)
            self._next.index_copy_(0, slots, nu)
            self._rekeyed(slots)

    def reset_stats(self, recursive: bool = True) -> None:
        super().reset_stats(recursive)
        self._st.update(prefetched_rows=0, sync_acquires=0, upper_reads=0, upper_read_hits=0, neighbour_rows=0,
                        neighbour_hits=0)

    def stats(self) -> dict:
        with self._locked():  # pending releases applied: dirty_rows is current
            out = super().stats()
        out["window_steps"] = len(self.oracle)
        out["window_occurrences"] = self.oracle.occurrences
        return out

    def __repr__(self) -> str:
        return (f"LookaheadCache({self.backing!r}, capacity_rows={self.capacity}, device={str(self.device)!r}, "
                f"name={self.name!r})")

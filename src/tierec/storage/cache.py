"""A software cache of embedding rows in front of a slower `TableStorage`.

`CachedTable` keeps up to ``capacity_rows`` rows -- weights and optimizer state
together -- in two tensors on ``device`` (``weight`` [C, D], ``state`` [C, S]),
in front of a *backing* store: an `SsdTable`, another `CachedTable` (stack them
for device <- DRAM <- SSD), or any `TableStorage` such as `InMemoryTable`.

Index (memory proportional to the cache, not the table): an open-addressing
hash map id -> slot held in two tensors of H = 2^k >= 4 x capacity entries
(linear probing, Fibonacci hashing), probed for a whole batch at once: one
gather + compare per probe round, rounds repeated only for the few IDs that
collided (see `HashIndex`). Per-slot bookkeeping is O(C) too: slot -> ID,
dirty bit, last-access stamp, LFU count, static frequency, pin count. Nothing
is sized by ``num_embeddings``.

Policies (the eviction priority; every miss is admitted):

* ``lru``:  least recently used first (unique access stamps).
* ``lfu``:  smallest in-cache access count first (count starts at 1 on
  admission, forgotten on eviction), ties least recently used first.
* ``freq``: smallest static frequency first -- frequencies given up front as
  ``(ids, counts)`` tensors or a `CountMinSketch`, e.g. counted over the data
  set -- ties least recently used first; `warm_up` preloads the hottest rows.

Victims are picked with one ``topk`` over the resident slots (none when enough
rows share the lowest key; `_tie_break` among ties), never among the rows the
current batch needs or rows pinned by an outstanding working set.

Coherence: a row lives in at most one place where it can be *newer* than below:
if it is cached, the cached copy is the newest. Rows are read from the backing
store only on a miss; a dirty row is written back when evicted or flushed;
``read_rows`` overlays cached rows on the backing store's, ``write_rows`` writes
through to the backing store and refreshes (and cleans) the cached copies.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tierec.errors import ConfigError
from tierec.masks import any_true, count, select, where
from tierec.storage.base import RowStore, RowStoreDefaults, WorkingSet, read_joined
from tierec.storage.hashindex import HashIndex, NeedsRebuild
from tierec.storage.lazy import LazyRows
from tierec.storage.sketch import CountMinSketch

POLICIES = ("lru", "lfu", "freq")
_MAX = torch.iinfo(torch.int64).max


def sort_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``ids`` sorted, the permutation that sorted them), or (``ids``, None) if already sorted."""
    if ids.numel() < 2 or bool((ids[1:] > ids[:-1]).all()):
        return ids, None
    return torch.sort(ids)


def unsort(order: torch.Tensor | None, w: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of sorted IDs (``w``, ``s``) back in the order the IDs came in (`sort_ids`'s ``order``)."""
    if order is None:
        return w, s
    w2, s2 = torch.empty_like(w), torch.empty_like(s)
    w2[order], s2[order] = w, s
    return w2, s2


def _unpin(pins: torch.Tensor, slots: torch.Tensor) -> None:
    pins.index_add_(0, slots, pins.new_full((1,), -1).expand(slots.numel()))


@dataclass
class _Handle:
    """Backend-private part of a working set of a `CachedTable`."""

    owner: CachedTable
    kind: str  # "cache": ws.index are cache slots; "temp": ws.weight/state are a gathered copy
    pinned: torch.Tensor  # cache slots pinned until release
    fin: weakref.finalize  # unpins ``pinned`` if the working set is dropped unreleased
    hit_idx: torch.Tensor | None = None  # temp: positions (in ids) served from the cache ...
    miss_idx: torch.Tensor | None = None  # ... and from the backing store
    released: bool = False
    step: int | None = None  # look-ahead caches: the training step this working set was prepared for


class _FreqTable:
    """Static frequencies as sorted (ids, counts) tensors: memory proportional to the IDs kept."""

    def __init__(self, ids: torch.Tensor, counts: torch.Tensor, device):
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        counts = torch.as_tensor(counts).reshape(-1).to(torch.int64)
        if ids.numel() != counts.numel():
            raise ConfigError(f"freq: {ids.numel()} ids but {counts.numel()} counts")
        order = torch.argsort(ids)
        self.ids, self.counts = ids[order].to(device), counts[order].to(device)

    def query(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ids.numel() == 0:
            return torch.zeros(ids.numel(), dtype=torch.int64, device=ids.device)
        pos = torch.searchsorted(self.ids, ids).clamp_(max=self.ids.numel() - 1)
        return torch.where(self.ids[pos] == ids, self.counts[pos], 0)

    def hottest(self, n: int) -> torch.Tensor:
        k = min(n, self.ids.numel())
        return self.ids[torch.topk(self.counts, k).indices]


class CachedTable(RowStoreDefaults):
    """Rows cached on ``device`` in front of ``backing``. A ``TableStorage``, and a ``RowStore`` for a
    cache above it (tiers stack); exact.

    ``acquire(ids)`` (unique, sorted) makes the rows resident and returns a working
    set over the cache tensors, updated in place by the optimizer; when they
    cannot all be resident at once (more unique rows than the capacity, or too
    many pinned) it returns a temporary gathered copy and writes it back on
    release. ``freq`` (policy ``"freq"``): ``(ids, counts)`` tensors, a mapping
    id -> count, or a `CountMinSketch`; rows it does not list count 0.

    Working sets must be released (the `EmbeddingBag` does it in backward, or at
    once in eval); a working set dropped without release just unpins its slots.
    Two outstanding *temporary* working sets that share a row and are both
    released dirty keep only the later update (as for `SsdTable` alone).
    """

    def __init__(self, backing: RowStore, capacity_rows: int, policy: str = "lru", device="cpu", name: str = "", *,
                 freq=None):
        if policy not in POLICIES:
            raise ConfigError(f"cache policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if int(capacity_rows) < 1:
            raise ConfigError(f"cache {name!r}: capacity_rows must be >= 1, got {capacity_rows}")
        self.backing = backing
        self.num_embeddings, self.dim, self.state_dim = backing.num_embeddings, backing.dim, backing.state_dim
        self.capacity = min(int(capacity_rows), self.num_embeddings)
        self.policy, self.name = policy, name
        self.device = torch.device(device)
        # > 0: pick victims among victim_sample x (rows needed) random slots instead of all (serving)
        self.victim_sample = 0
        self._gen = torch.Generator(device=self.device).manual_seed(0)
        self.row_bytes = (self.dim + self.state_dim) * 4
        self._bdev = torch.device(backing.device)
        C, dev, i64 = self.capacity, self.device, torch.int64
        self.weight = torch.zeros(C, self.dim, device=dev)
        self.state = torch.zeros(C, self.state_dim, device=dev)
        # slots [0, size) are occupied; slots are never freed, so free slots are [size, C)
        self.size = 0
        self._index = HashIndex(C, dev)  # cached id -> slot
        self._hpos = torch.zeros(C, dtype=i64, device=dev)  # slot -> its entry in the index (remove without lookup)
        self._slot_id = torch.full((C,), -1, dtype=i64, device=dev)
        self._dirty = torch.zeros(C, dtype=torch.bool, device=dev)
        self._stamp = torch.zeros(C, dtype=i64, device=dev)  # last access, unique per access
        self._pins = torch.zeros(C, dtype=torch.int32, device=dev)
        self._count = torch.zeros(C, dtype=i64, device=dev) if policy == "lfu" else None
        self._prio = torch.zeros(C, dtype=i64, device=dev) if policy == "freq" else None
        self._clock = 1
        self._freq: CountMinSketch | _FreqTable | None = None
        if freq is not None:
            self.set_frequencies(freq)
        elif policy == "freq":
            raise ConfigError(f"cache {name!r}: policy 'freq' needs freq=(ids, counts) or a CountMinSketch")
        self._counting = True
        self.reset_stats()

    # ------------------------------------------------------------------ frequencies
    def set_frequencies(self, freq) -> None:
        """Static per-row frequencies for policy "freq" (re-ranks the resident rows too)."""
        if isinstance(freq, CountMinSketch):
            self._freq = freq
        elif isinstance(freq, Mapping):
            self._freq = _FreqTable(torch.tensor(list(freq.keys()), dtype=torch.int64),
                                    torch.tensor(list(freq.values()), dtype=torch.int64), self.device)
        elif isinstance(freq, (tuple, list)) and len(freq) == 2:
            self._freq = _FreqTable(freq[0], freq[1], self.device)
        else:
            raise ConfigError("freq must be (ids, counts) tensors, a mapping id -> count, or a CountMinSketch")
        if self._prio is not None and self.size:
            self._prio[: self.size] = self._frequency(self._slot_id[: self.size])

    def _frequency(self, ids: torch.Tensor) -> torch.Tensor:
        if self._freq is None:
            return torch.zeros(ids.numel(), dtype=torch.int64, device=self.device)
        return self._freq.query(ids).to(self.device, torch.int64)

    def warm_up(self, ids: torch.Tensor | None = None) -> int:
        """Load rows before training: the hottest ``capacity`` of ``ids`` (by the static frequencies
        when given, else the first ``capacity`` distinct ones), or with ``ids=None`` the hottest rows
        of the ``(ids, counts)`` frequencies. Not counted as hits/misses. Returns rows loaded."""
        if ids is None:
            if not isinstance(self._freq, _FreqTable):
                raise ConfigError("warm_up() without ids needs frequencies given as (ids, counts)")
            ids = self._freq.hottest(self.capacity)
        ids = torch.unique(torch.as_tensor(ids, dtype=torch.int64).to(self.device))
        if ids.numel() > self.capacity:
            if self._freq is not None:
                ids = ids[torch.topk(self._frequency(ids), self.capacity).indices]
            else:
                ids = ids[: self.capacity]
            ids = torch.sort(ids).values
        self._counting = False
        try:
            self.release(self.acquire(ids), dirty=False)
        finally:
            self._counting = True
        self._st["warmup_rows"] += ids.numel()
        return ids.numel()

    # ------------------------------------------------------------------ index
    def _lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [U] -> (hit bool [U], slot [U]; valid where hit)."""
        if self.size == 0 or ids.numel() == 0:
            return torch.zeros(ids.numel(), dtype=torch.bool, device=self.device), torch.zeros_like(ids)
        found, slot, _ = self._index.lookup(ids)
        return found, slot

    def _index_insert(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        try:
            self._hpos.index_copy_(0, slots, self._index.insert(ids, slots))
        except NeedsRebuild:  # too many tombstones: rebuild from the slot table (amortised O(1) per row)
            self._hpos[: self.size] = self._index.rebuild(self._slot_id[: self.size],
                                                          torch.arange(self.size, device=self.device))

    def _cached_in_range(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, slots) of the cached rows in [start, end): a hash lookup of the range, or a scan of the
        slots when the range is larger than the cache -- O(min(end - start, capacity))."""
        if self.size == 0 or end <= start:
            e = torch.empty(0, dtype=torch.int64, device=self.device)
            return e, e
        if end - start <= self.size:
            ids = torch.arange(start, end, device=self.device)
            hit, slot = self._lookup(ids)
            return ids[hit], slot[hit]
        sid = self._slot_id[: self.size]
        sl = ((sid >= start) & (sid < end)).nonzero().squeeze(1)
        return sid[sl], sl

    def resident_ids(self) -> torch.Tensor:
        """The cached row IDs, sorted."""
        return torch.sort(self._slot_id[: self.size]).values

    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        """bool [U]: which of ``ids`` are cached (no counters or recency changed)."""
        return self._lookup(ids.to(self.device))[0]

    def peek(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read-only hit path: ids [U] -> (hit bool [U], weights of the hits [H, dim], in ``ids`` order).
        One index lookup; the hits count as uses (recency, frequency, hit counters); misses are
        neither fetched nor admitted (the caller decides)."""
        ids = ids.to(self.device)
        hit, slots = self._lookup(ids)
        hs = slots[hit]
        if self._counting:
            self._st["lookups"] += ids.numel()
            self._st["hits"] += hs.numel()
            self._st["misses"] += ids.numel() - hs.numel()
        if hs.numel():
            self._touch(hs)
        return hit, self.weight.index_select(0, hs)

    @property
    def index_nbytes(self) -> int:
        """Bytes of all bookkeeping (index + per-slot metadata): O(capacity), independent of the table."""
        ts = [self._slot_id, self._hpos, self._dirty, self._stamp, self._pins, self._count, self._prio]
        return self._index.nbytes + sum(t.numel() * t.element_size() for t in ts if t is not None)

    # per slot: _slot_id, _hpos, _stamp (int64), _pins (int32), _dirty (bool); lfu / freq add _count / _prio (int64)
    SLOT_BYTES = 8 + 8 + 8 + 4 + 1

    @classmethod
    def bookkeeping_bytes(cls, capacity: int, policy: str = "lru") -> int:
        """What a cache of ``capacity`` rows allocates beside its rows, exactly as `__init__` does (the memory
        budget's planner sizes caches with it: `tierec.storage.tiered.fit_caches`); `index_nbytes` once built."""
        extra = 8 if policy in ("lfu", "freq") else 0
        return HashIndex.bytes_for(capacity) + capacity * (cls.SLOT_BYTES + extra)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.state.nbytes

    # ------------------------------------------------------------------ replacement
    def _touch(self, slots: torch.Tensor) -> None:
        n = slots.numel()
        self._stamp.index_copy_(0, slots, self._clock + torch.arange(n, device=self.device))
        self._clock += n
        if self._count is not None:
            self._count.index_add_(0, slots, self._count.new_ones(1).expand(n))

    def _policy_key(self) -> torch.Tensor:
        """int64 [C]: the policy's eviction key per slot (lowest first): access stamps, counts or static frequencies."""
        key = self._stamp if self.policy == "lru" else (self._count if self.policy == "lfu" else self._prio)
        assert key is not None, f"cache {self.name!r}: policy {self.policy!r} has no key"  # made in __init__
        return key

    def _victim_key(self) -> torch.Tensor:
        K = self.size
        return self._policy_key()[:K].clone()

    def _pick_slots(self, n: int, protect: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Slots for ``n`` new rows -- (free slots, victims): free slots first, then the lowest-priority
        resident rows not in ``protect`` and not pinned. None if there is no room. Changes nothing."""
        K, C = self.size, self.capacity
        free = min(C - K, n)
        need = n - free
        free_slots = torch.arange(K, K + free, device=self.device)
        if need == 0:
            return free_slots, free_slots[:0]
        victims = self._victims(need, protect)
        return None if victims is None else (free_slots, victims)

    def _victims(self, need: int, protect: torch.Tensor) -> torch.Tensor | None:
        """``need`` resident slots to evict, neither in ``protect`` nor pinned, lowest `_victim_key` first (ties:
        `_tie_break`); None if fewer may go. One pass over the cache's slots (or a sample: ``victim_sample``)."""
        if self.victim_sample and self.size > 2 * self.victim_sample * need:
            picked = self._sampled_victims(need, protect)
            if picked is not None:
                return picked
        return self._lowest(self._eligible(self._victim_key(), protect), need)

    def _eligible(self, key: torch.Tensor, protect: torch.Tensor) -> torch.Tensor:
        """``key`` (int64 [size], every resident slot's) with ``protect`` ed and pinned slots at `_MAX` (may not go)."""
        key.index_fill_(0, protect, _MAX)
        return key.index_fill_(0, where(self._pins[: self.size]), _MAX)

    def _lowest(self, key: torch.Tensor, need: int, slots: torch.Tensor | None = None) -> torch.Tensor | None:
        """The ``need`` entries of ``key`` (int64 [k], `_MAX`: may not go) lowest first, ties by `_tie_break`, as
        slots: positions in ``key``, or ``slots`` [k] (increasing) at them; None if fewer than ``need`` may go."""
        thr = key.min()
        if count(key == thr) < need:  # else ``need`` rows share the lowest key (e.g. rows never used again)
            thr = torch.topk(key, need, largest=False, sorted=False).values.max()  # O(k) selection, no sort
        if thr == _MAX:  # fewer than ``need`` rows may go
            return None
        at = (lambda pos: pos) if slots is None else (lambda pos: slots.index_select(0, pos))
        victims = at(where(key < thr))
        rest = need - victims.numel()
        return torch.cat([victims, self._tie_break(at(where(key == thr)), rest)]) if rest else victims

    def _tie_break(self, slots: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` of ``slots`` (rows whose eviction keys tie at `_pick_slots`' threshold) to evict: the least
        recently used."""
        return slots[torch.topk(self._stamp.index_select(0, slots), n, largest=False).indices]

    def _sampled_victims(self, need: int, protect: torch.Tensor) -> torch.Tensor | None:
        """Approximate victims: the ``need`` lowest-priority of ``victim_sample x need`` random resident
        slots (not protected, not pinned) -- O(need) instead of a pass over the whole cache, as
        Redis approximates LRU/LFU. None if the sample holds too few candidates."""
        K = self.size
        cand = torch.unique(torch.randint(K, (self.victim_sample * need,), generator=self._gen, device=self.device))
        key = self._policy_key().index_select(0, cand)
        key[torch.isin(cand, protect)] = _MAX
        key[self._pins.index_select(0, cand) > 0] = _MAX
        if int((key != _MAX).sum()) < need:
            return None
        return cand[torch.topk(key, need, largest=False).indices]

    def _evict(self, victims: torch.Tensor) -> None:
        """Drop the victims from the index and write the dirty ones back (one batched write, sorted by id)."""
        dirty = self._drop(victims)
        if dirty is not None:
            wid, wslots = dirty
            self._bwrite(wid, self.weight.index_select(0, wslots), self.state.index_select(0, wslots))

    def _drop(self, victims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Drop ``victims`` (slots) from the index, clean; returns the dirty ones to write back -- (their IDs sorted,
        their slots in that order) -- or None. Their rows stay in the slots until the caller reuses them."""
        if victims.numel() == 0:
            return None
        vdirty = self._dirty.index_select(0, victims)
        out = None
        if any_true(vdirty):
            vid, dv = select(vdirty, self._slot_id.index_select(0, victims), victims)
            wid, order = torch.sort(vid)
            out = (wid, dv.index_select(0, order))
            self._st["writebacks"] += wid.numel()
        self._dirty.index_fill_(0, victims, False)
        self._index.remove_at(self._hpos.index_select(0, victims))
        self._st["evictions"] += victims.numel()
        return out

    def _take(self, picked: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Evict the victims of `_pick_slots` and claim its free slots; returns the slots in order."""
        free_slots, victims = picked
        self._evict(victims)
        self.size += free_slots.numel()
        return torch.cat([free_slots, victims])

    def _install(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Record ``ids`` as living in ``slots`` (their data is written by the caller). Every slot below
        ``size`` must be installed or live by the end of the call: an index rebuild inside it re-reads
        the slot table, so a caller that adds slots installs them all in one call."""
        self._slot_id.index_copy_(0, slots, ids)
        self._index_insert(ids, slots)
        if self._count is not None:
            self._count.index_fill_(0, slots, 0)
        if self._prio is not None:
            self._prio.index_copy_(0, slots, self._frequency(ids))

    # ------------------------------------------------------------------ backing I/O
    def _bread(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, s = self.backing.read(ids.to(self._bdev))
        self._st["rows_read"] += ids.numel()
        self._st["read_calls"] += 1
        return w.to(self.device), s.to(self.device)

    def _bread_joined(self, ids: torch.Tensor) -> torch.Tensor:
        """`_bread`'s rows joined, as the backing store's ``read_each`` gives them (float32 CPU [U, dim + state_dim])."""
        rows = read_joined(self.backing, ids.to(self._bdev))
        self._st["rows_read"] += ids.numel()
        self._st["read_calls"] += 1
        return rows

    def _bwrite(self, ids: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> None:
        self.backing.write(ids.to(self._bdev), w.to(self._bdev), s.to(self._bdev))
        self._st["rows_written"] += ids.numel()
        self._st["write_calls"] += 1

    def _bexchange(self, wb, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write back ``wb`` = (ids, weight, state[, placement rank]) of evicted dirty rows (or None) and read
        rows ``ids`` (not among them) from the backing store, in one pass where it can (`RowStore.exchange`)."""
        if wb is None:  # nothing to write back: still a cache's read, not a bulk one (`RowStore`)
            b = ids.to(self._bdev)
            wb = (b[:0], torch.empty(0, self.dim, device=self._bdev), torch.empty(0, self.state_dim, device=self._bdev))
        wid, w, s = wb[:3]
        rank = wb[3].to(self._bdev) if len(wb) > 3 else None
        w, s = self.backing.exchange(wid.to(self._bdev), w.to(self._bdev), s.to(self._bdev), ids.to(self._bdev),
                                     write_rank=rank)
        if wid.numel():
            self._st["rows_written"] += wid.numel()
            self._st["write_calls"] += 1
        self._st["rows_read"] += ids.numel()
        self._st["read_calls"] += 1
        return w.to(self.device), s.to(self.device)

    # ------------------------------------------------------------------ TableStorage
    def _handle(self, ws: WorkingSet, kind: str, pinned: torch.Tensor, hit_idx: torch.Tensor | None = None,
                miss_idx: torch.Tensor | None = None, step: int | None = None) -> WorkingSet:
        if pinned.numel():
            self._pins.index_add_(0, pinned, self._pins.new_ones(1).expand(pinned.numel()))
        fin = weakref.finalize(ws, _unpin, self._pins, pinned)  # unpin if dropped unreleased
        ws.handle = _Handle(self, kind, pinned, fin, hit_idx, miss_idx, step=step)
        return ws

    def _own(self, ws: WorkingSet) -> _Handle:
        """``ws``'s handle; ValueError unless ``ws`` was acquired from this table."""
        h = ws.handle
        if not isinstance(h, _Handle) or h.owner is not self:
            raise ValueError(f"cache {self.name!r}: working set was not acquired from this table")
        return h

    def acquire(self, ids: torch.Tensor) -> WorkingSet:
        """Make rows ``ids`` (int64 [U], unique, sorted) addressable; see the class doc."""
        ids = ids.to(self.device)
        U = ids.numel()
        hit, slots = self._lookup(ids)
        nh = count(hit)
        if self._counting:
            self._st["lookups"] += U
            self._st["hits"] += nh
            self._st["misses"] += U - nh
        if nh < U:
            miss = where(~hit)
            picked = self._pick_slots(U - nh, slots[hit]) if U <= self.capacity else None
            if picked is None:
                return self._acquire_temp(ids, hit, slots)
            miss_ids = ids.index_select(0, miss)
            w, s = self._bread(miss_ids)  # before any change: a failed read leaves the cache intact
            new = self._take(picked)
            self._install(miss_ids, new)
            self.weight.index_copy_(0, new, w)
            self.state.index_copy_(0, new, s)
            slots = slots.index_copy(0, miss, new)
        self._touch(slots)
        return self._handle(WorkingSet(ids, slots, self.weight, self.state), "cache", slots)

    def _acquire_temp(self, ids: torch.Tensor, hit: torch.Tensor, slots: torch.Tensor,
                      step: int | None = None) -> WorkingSet:
        U = ids.numel()
        hit_idx, miss_idx = where(hit), where(~hit)
        hit_slots = slots[hit_idx]
        w = torch.empty(U, self.dim, device=self.device)
        s = torch.empty(U, self.state_dim, device=self.device)
        w[hit_idx], s[hit_idx] = self.weight[hit_slots], self.state[hit_slots]
        w[miss_idx], s[miss_idx] = self._bread(ids[miss_idx])
        self._touch(hit_slots)
        if self._counting:
            self._st["bypass_acquires"] += 1
        ws = WorkingSet(ids, torch.arange(U, device=self.device), w, s)
        return self._handle(ws, "temp", hit_slots, hit_idx=hit_idx, miss_idx=miss_idx, step=step)

    def release(self, ws: WorkingSet, dirty: bool) -> None:
        h = self._own(ws)
        if h.released:
            raise RuntimeError(f"cache {self.name!r}: working set released twice")
        h.released = True
        h.fin.detach()
        try:
            if dirty and ws.ids.numel():
                self.backing.mark_written(ws.ids)
                if h.kind == "cache":
                    self._dirty.index_fill_(0, ws.index, True)
                else:
                    assert h.hit_idx is not None and h.miss_idx is not None  # a "temp" handle has both
                    hs = h.pinned
                    self.weight[hs] = ws.weight[h.hit_idx]
                    self.state[hs] = ws.state[h.hit_idx]
                    self._dirty[hs] = True
                    if h.miss_idx.numel():
                        self._bwrite(ws.ids[h.miss_idx], ws.weight[h.miss_idx], ws.state[h.miss_idx])
        finally:
            if h.pinned.numel():
                _unpin(self._pins, h.pinned)

    # ------------------------------------------------------------------ batched row access (for upper tiers)
    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``ids`` (unique, any order) as fresh tensors; misses are admitted like in `acquire`."""
        ids, order = sort_ids(ids.to(self.device))
        ws = self.acquire(ids)
        try:
            if self._own(ws).kind == "temp":
                w, s = ws.weight, ws.state
            else:
                w, s = ws.weight.index_select(0, ws.index), ws.state.index_select(0, ws.index)
        finally:
            self.release(ws, dirty=False)
        return unsort(order, w, s)

    def write(self, ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> None:
        """Write rows ``ids`` (unique, any order): into the cache (write-allocate, no fetch, dirty);
        when the misses cannot all be made resident they go straight to the backing store."""
        ids = ids.to(self.device)
        weight, state = weight.to(self.device), state.to(self.device)
        if ids.numel() == 0:
            return
        ids, order = sort_ids(ids)
        if order is not None:
            weight, state = weight[order], state[order]
        self.backing.mark_written(ids)
        hit, slots = self._lookup(ids)
        hit_idx, miss_idx = where(hit), where(~hit)
        hs = slots[hit_idx]
        self.weight[hs], self.state[hs] = weight[hit_idx], state[hit_idx]
        self._dirty[hs] = True
        touched = hs
        self._st["write_hits"] += hit_idx.numel()
        self._st["write_misses"] += miss_idx.numel()
        if miss_idx.numel():
            picked = self._pick_slots(miss_idx.numel(), hs) if ids.numel() <= self.capacity else None
            if picked is None:
                self._bwrite(ids[miss_idx], weight[miss_idx], state[miss_idx])
            else:
                new = self._take(picked)
                self._install(ids[miss_idx], new)
                self.weight[new], self.state[new] = weight[miss_idx], state[miss_idx]
                self._dirty[new] = True
                touched = torch.cat([hs, new])
        self._touch(touched)

    def read_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [start, end) with the newest values: the backing store's, overlaid by cached rows."""
        w, s = self.backing.read_rows(start, end)
        if not _returns_fresh(self.backing):
            w, s = w.clone(), s.clone()
        self._st["rows_read"] += end - start
        ids, sl = self._cached_in_range(start, end)
        if ids.numel():
            rel = (ids - start).to(w.device)
            w[rel] = self.weight[sl].to(w.device)
            s[rel] = self.state[sl].to(s.device)
        return w, s

    def write_rows(self, start: int, weight: torch.Tensor, state: torch.Tensor) -> None:
        """Write rows [start, start+n) through to the backing store and refresh the cached ones (clean)."""
        n = weight.shape[0]
        self.backing.write_rows(start, weight, state)
        self._st["rows_written"] += n
        ids, sl = self._cached_in_range(start, start + n)
        if ids.numel():
            rel = (ids - start).to(weight.device)
            self.weight[sl] = weight[rel].to(self.device)
            self.state[sl] = state[rel].to(self.device)
            self._dirty[sl] = False

    def flush(self) -> None:
        """Write every dirty row back (one batched write, sorted by id), mark them clean, flush below."""
        d = where(self._dirty[: self.size])
        if d.numel():
            ids, order = torch.sort(self._slot_id[d])
            sl = d[order]
            self._bwrite(ids, self.weight[sl], self.state[sl])
            self._dirty[sl] = False
            self._st["flushed_rows"] += ids.numel()
        self.backing.flush()

    def close(self) -> None:
        self.flush()
        self.backing.close()

    def lazy_rows(self) -> LazyRows | None:
        """The backing store's (it counts the rows changed here too: `mark_written`)."""
        return self.backing.lazy_rows()

    def mark_written(self, ids: torch.Tensor) -> None:
        self.backing.mark_written(ids)

    # ------------------------------------------------------------------ stats
    def reset_stats(self, recursive: bool = True) -> None:
        self._st = dict.fromkeys(("lookups", "hits", "misses", "evictions", "writebacks", "flushed_rows",
                                  "rows_read", "rows_written", "read_calls", "write_calls", "write_hits",
                                  "write_misses", "bypass_acquires", "warmup_rows"), 0)
        if recursive:
            self.backing.reset_stats()

    def stats(self) -> dict:
        """This tier's counters, with the backing store's under ``"backing"``.

        lookups = hits + misses count the unique IDs of every ``acquire``/``read`` (an
        upper tier's misses are this tier's lookups); evictions: rows evicted; writebacks:
        dirty rows written back on eviction; flushed_rows: written back by `flush`;
        bytes_read / bytes_written: traffic to the backing store (misses, write-backs,
        bypassed rows, ``read_rows``/``write_rows``); bypass_acquires: working sets that
        could not be made resident and were served as a temporary copy.
        """
        st = dict(self._st)
        out = {"tier": "cache", "name": self.name, "policy": self.policy, "device": str(self.device),
               "capacity": self.capacity, "resident": self.size,
               "dirty_rows": count(self._dirty[: self.size]), **st,
               "hit_rate": st["hits"] / st["lookups"] if st["lookups"] else 0.0,
               "bytes_read": st["rows_read"] * self.row_bytes, "bytes_written": st["rows_written"] * self.row_bytes}
        if backing := self.backing.stats():
            out["backing"] = backing
        return out

    def __repr__(self) -> str:
        return (f"CachedTable({self.backing!r}, capacity_rows={self.capacity}, policy={self.policy!r}, "
                f"device={str(self.device)!r}, name={self.name!r})")


def _returns_fresh(st) -> bool:
    from tierec.storage.ssd import SsdTable

    return isinstance(st, (SsdTable, CachedTable))

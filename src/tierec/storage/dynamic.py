"""Dynamic tables: raw 64-bit IDs -> row slots given on admission, taken back on eviction.

A fixed table hashes every raw ID into N rows: two IDs that collide share a row forever. A dynamic
table gives every *admitted* ID a slot of its own among ``capacity`` rows (the rows themselves live
in any `TableStorage`: memory, or SSD behind the caches). `DynamicIndex` is the map and its policy::

    ix = DynamicIndex([DynamicConfig(capacity=1_000_000, admit_count=2, evict="lfu")] * 2, ["user", "item"])
    m_user, m_item = ix.map([user_ids, item_ids], step=1)  # int64 [N_t] each, any raw values (64-bit hashes)
    m_user.slots                      # int64 [N_user]: the slot of each ID; -1 where it reads the zero row
    m_user.fresh_slots, m_user.fresh_ids  # int64 [F]: slots given to new IDs at this step (reset them)

All the tables of one index share its hash table (keyed by raw ID XOR the table's salt) and one slot
space, so a batch costs one probe of all its IDs, not one per table.

The protocol, one ``map`` per batch in step order (steps 1, 2, ...):

1. **decay** (steps that are multiples of ``decay_every``): LFU counts and the admission sketch
   halve; with ``evict="ttl"`` IDs not seen for more than ``ttl_steps`` steps leave, with
   ``evict="lfu"`` IDs whose count decayed to 0 leave. ``evict="l2"``: counts halve as for LFU, and the
   trainer measures the rows (`evict_ids`, below); a full table evicts as LFU does.
2. **known IDs**: last seen = this step, count += their occurrences.
3. **new IDs** (in ascending order of their index key, `DynamicIndex.keys_of`): with ``admit_count``
   K > 1 their occurrences are counted in a count-min sketch and they are admitted once its estimate
   reaches K (an over-estimate may admit early, never late); K = 1 admits at once. Admitted IDs take
   free slots (the lowest first); when too few are free and ``evict`` is not ``"none"``, live IDs
   *not in this batch* leave first, lowest score first (``ttl``: least recently seen; ``lfu``: lowest
   count, then least recently seen; ties: the lower slot), at least ``capacity // 16`` at a time (the
   O(capacity) sort is paid once per many admissions). New IDs that still find no slot are rejected
   for this batch.
4. **the default**: an ID without a slot reads ``default_row``: ``"zero"`` (slot -1: its value leaves
   its bag, so it adds nothing to a sum; a mean averages the admitted IDs) or ``"unknown"`` (slot 0,
   one shared row, trained by every such ID); either way the ID's own row gets no update, and it
   has none until admitted. An evicted ID that returns is admitted afresh: a new row at its initial
   value with zero optimizer state (``fresh_*``: the table resets those slots before the step reads
   them; `tierec.modules.embedding.EmbeddingBag.use_fresh`).
5. **norm sweeps** (``evict="l2"``): the one policy that depends on row values. After each step m that
   is a multiple of ``decay_every`` the trainer measures the rows of the IDs live at m; those below
   ``l2_threshold`` leave when batch m + ``decay_every`` is mapped (`evict_ids`; the map never runs
   further ahead than that), unless they were seen after m.

Exactness: the map is a function of the stream of IDs alone (no row values; the norm sweeps enter at
fixed steps), so it may run ahead of
training (the look-ahead pipeline maps batches a window ahead) without changing what is learned; a
slot's row changes only in training steps, and is reset exactly at the step that admits its new ID.
With K = 1 and no eviction, every distinct ID gets its own row for good: training equals a fixed table
with one row per distinct ID (tests/test_dynamic.py, also against a plain-Python reference with eviction).

Memory per slot: the hash index (12 B per entry, 4-8 entries per slot: 48-96 B), the slot's raw ID,
last-seen step and count (25 B), the free-slot stack (8 B), and with K > 1 the sketch (4 x 8 B per
counter column, as many columns as slots): `DynamicConfig.index_bytes_per_row`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tierec.errors import ConfigError
from tierec.storage.hashindex import ZERO_EMPTY, HashIndex, NeedsRebuild
from tierec.storage.sketch import CountMinSketch
from tierec.storage.spill import SpillArrays, chunks_of

assert ZERO_EMPTY == (0, 1)  # `_fold_reserved` finds both with one shift

UNKNOWN_ID = -(1 << 63)  # the raw ID the shared "unknown" row is initialised from
BULK_EVICT_DIVISOR = 16  # an eviction frees at least min(capacity // 16, BULK_EVICT_MAX) slots
BULK_EVICT_MAX = 1 << 20
SKETCH_DEPTH = 4
ARRAYS = ("slot_id", "live", "last_seen", "count", "returned")  # the O(capacity) state (+ the sketch's table)


@dataclass(frozen=True)
class DynamicConfig:
    """One dynamic table's capacity and policy (see the module docstring for the exact protocol)."""

    capacity: int  # rows (slots), including the shared unknown row when default_row="unknown"
    admit_count: int = 1  # K: an ID gets a row once seen K times (1: at once)
    default_row: Literal["zero", "unknown"] = "zero"
    evict: Literal["none", "ttl", "lfu", "l2"] = "none"
    ttl_steps: int = 0  # evict="ttl": IDs unseen for more than this many steps leave (checked every decay_every)
    decay_every: int = 0  # steps between decays (LFU counts and the sketch halve, TTL sweep); 0: never
    sketch_width: int = 0  # admission sketch counters per row (0: the capacity rounded up to a power of two)
    l2_threshold: float = 0.0  # evict="l2": rows whose L2 norm is below this leave at the sweeps (every decay_every)

    def __post_init__(self):
        def bad(field: str, want: str, got) -> ConfigError:
            return ConfigError(f"dynamic tables: {field} must be {want}, got {got!r}")

        if int(self.capacity) < 1 + (self.default_row == "unknown"):
            raise bad("capacity", "at least 1 row (2 with default_row=unknown)", self.capacity)
        if int(self.admit_count) < 1:
            raise bad("admit_count", ">= 1", self.admit_count)
        if self.default_row not in ("zero", "unknown"):
            raise bad("default_row", "'zero' or 'unknown'", self.default_row)
        if self.evict not in ("none", "ttl", "lfu", "l2"):
            raise bad("evict", "'none', 'ttl', 'lfu' or 'l2'", self.evict)
        if self.evict == "l2" and not (self.l2_threshold > 0 and self.decay_every):
            raise ConfigError("dynamic tables: evict=l2 needs l2_threshold > 0 and decay_every > 0 (how often rows "
                              "are measured)")
        if self.ttl_steps < 0 or self.decay_every < 0 or self.sketch_width < 0:
            raise bad("ttl_steps, decay_every and sketch_width", ">= 0",
                      (self.ttl_steps, self.decay_every, self.sketch_width))
        if self.evict == "ttl" and not (self.ttl_steps and self.decay_every):
            raise ConfigError("dynamic tables: evict=ttl needs ttl_steps > 0 and decay_every > 0 (how often IDs "
                              "unseen for ttl_steps are swept)")

    @property
    def width(self) -> int:
        """Counters per row of the admission sketch."""
        return self.sketch_width or 1 << max(4, (self.capacity - 1).bit_length())

    @property
    def index_bytes_per_row(self) -> int:
        """Memory per slot beside the row itself: hash index (8 entries x 12 B at most), raw ID, last seen, count,
        free stack, and the sketch's share when K > 1."""
        sketch = SKETCH_DEPTH * 8 * self.width // self.capacity if self.admit_count > 1 else 0
        return 96 + 8 + 1 + 8 + 8 + 8 + sketch


@dataclass(frozen=True)
class TableRows:
    """How a table's stored IDs become its ``rows`` rows: ``"rows"`` (they are rows), ``"hashed"`` (raw 64-bit
    IDs reduced mod ``rows``), ``"dynamic"`` (slots of a `DynamicIndex`, unknown before training: the planning
    pass counts its lookups but not which rows). ``index_bytes``: memory the table needs beside its rows."""

    rows: int
    kind: Literal["rows", "hashed", "dynamic"] = "rows"
    index_bytes: int = 0


@dataclass
class SlotMap:
    """One table's IDs of one batch mapped: ``slots`` int64 [N] (its own slots; -1: the zero row), and the
    slots given at this step to ``fresh_ids`` (int64 [F] each; reset them to the rows' initial values
    before the step reads them)."""

    slots: torch.Tensor
    fresh_slots: torch.Tensor
    fresh_ids: torch.Tensor
    zero: bool = False  # some slot is -1 (default_row="zero")


_EMPTY_I64 = torch.empty(0, dtype=torch.int64)


def _salts(n: int) -> torch.Tensor:
    """One 64-bit salt per table (splitmix64 of its position): a table's keys are its raw IDs XOR its salt."""
    z = (torch.arange(1, n + 1, dtype=torch.int64) * -7046029254386353131)  # x 0x9E3779B97F4A7C15, wrapping
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * -7723592293110705685  # 0x94D049BB133111EB
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _fold_reserved(keys: torch.Tensor) -> torch.Tensor:
    """The hash index's two reserved keys (empty = 0, tombstone = 1: its tables are zero-filled) are folded onto
    2 and 3 (2 of 2^64 values)."""
    reserved = (keys >> 1) == 0  # exactly 0 and 1
    return torch.where(reserved, keys + 2, keys) if bool(reserved.any()) else keys


class DynamicIndex:
    """Raw ID -> slot with admission and eviction for one or more dynamic tables (``configs``: one
    `DynamicConfig` each, the same policy, capacities of their own).

    All tables share one hash index, keyed by raw ID XOR the table's salt, over one slot space (table t's
    slots are ``offset(t) + local slot``, as a `TableGroup` lays rows end to end): one probe per batch
    for every table's IDs, however many tables. ``map`` in step order, ``lookup`` (read-only: evaluation,
    serving) at any time; ``state_dict``/``load_state_dict`` for checkpoints.

    ``spill``: a directory on the SSD tier: the O(capacity) arrays (hash index, per-slot state, free-slot
    stack, sketch) live in files there, at most ``resident_bytes`` of their pages in memory
    (`tierec.storage.spill.SpillArrays`); the map is the same function of the stream either way."""

    def __init__(self, configs: list[DynamicConfig] | DynamicConfig, names: list[str] | None = None,
                 spill: Path | None = None, resident_bytes: int = 64 << 20):
        configs = [configs] if isinstance(configs, DynamicConfig) else list(configs)
        policy = {(c.admit_count, c.default_row, c.evict, c.ttl_steps, c.decay_every, c.l2_threshold) for c in configs}
        if len(policy) != 1:
            raise ConfigError("dynamic tables of one index must share admission and eviction settings")
        self.configs, self.cfg = configs, configs[0]
        self.names = names or [f"t{i}" for i in range(len(configs))]
        caps = [c.capacity for c in configs]
        self.offsets = torch.tensor([0, *caps], dtype=torch.int64).cumsum(0)
        C = int(self.offsets[-1])
        self.capacity = C
        self._salt = _salts(len(configs))
        self.arrays = SpillArrays(spill, resident_bytes)
        zeros = self.arrays.zeros
        self._index = HashIndex(C, "cpu", arrays=self.arrays)
        self.slot_id = zeros(C, torch.int64)  # raw ID in each slot
        self.live = zeros(C, torch.bool)
        self.last_seen = zeros(C + 1, torch.int64)  # [C]: a sink for IDs without a slot
        self.count = zeros(C + 1, torch.int64)
        self._first = 1 if self.cfg.default_row == "unknown" else 0  # local slot 0: the shared unknown row
        # table t's free slots form one stack, lowest on top: below, the slots never used (next_new[t] .. its
        # capacity - 1, the lowest on top: no memory); above, the slots given back (`returned`, in
        # [offset(t), offset(t) + n_returned[t])), each eviction's lowest on top
        self.returned = zeros(C, torch.int64)
        self.n_returned = [0] * len(caps)
        self.next_new = [self._first] * len(caps)
        self.n_live = [0] * len(caps)
        width = sum(c.width for c in configs)
        width = 1 << (width - 1).bit_length()
        self.sketch = CountMinSketch(width, SKETCH_DEPTH, seed=0, table=zeros(SKETCH_DEPTH * width, torch.int64)) \
            if self.cfg.admit_count > 1 else None
        self.step = 0  # the last step mapped
        # per table: admitted, evicted, rejected (training lookups that read the default), lookups (saved)
        self.counters = torch.zeros(len(configs), 4, dtype=torch.int64)
        self.default_reads = torch.zeros(len(configs), dtype=torch.int64)  # read-only lookups without a row

    def n_free(self, t: int) -> int:
        """Free slots of table ``t``."""
        return self.n_returned[t] + self.configs[t].capacity - self.next_new[t]

    def _pop_free(self, t: int, take: int) -> torch.Tensor:
        """The top ``take`` free slots of table ``t`` (global), top first: given back ones, then never used ones."""
        o, r = int(self.offsets[t]), min(take, self.n_returned[t])
        top = o + self.n_returned[t]
        back = self.returned[top - r : top].flip(0)
        self.n_returned[t] -= r
        new = torch.arange(o + self.next_new[t], o + self.next_new[t] + take - r, dtype=torch.int64)
        self.next_new[t] += take - r
        return torch.cat([back, new]) if r else new

    def keys_of(self, table: int, ids: torch.Tensor) -> torch.Tensor:
        """The index keys of table ``table``'s raw IDs: new IDs are admitted in ascending key order."""
        return _fold_reserved(ids.to(torch.int64) ^ self._salt[table])

    def _keys(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Per-table IDs -> (keys int64 [N] of all tables, in table order; counts per table)."""
        counts = [int(x.numel()) for x in ids]
        salts = self._salt.tolist()
        keys = torch.cat([x.to("cpu", torch.int64).reshape(-1) ^ salts[t] for t, x in enumerate(ids)]) \
            if ids else _EMPTY_I64
        return _fold_reserved(keys), counts

    def _tables_of(self, counts: list[int]) -> torch.Tensor:
        """The table of every key, int64 [N] (keys laid out table after table, ``counts`` each)."""
        return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts), output_size=sum(counts))

    def _local(self, slots: torch.Tensor, counts: list[int], missed: bool) -> list[tuple[torch.Tensor, bool]]:
        """Global slots (int64 [N], table after table) -> each table's own slots, and whether any is -1 (the zero
        row, kept; only where ``missed``: some ID had no slot)."""
        out = []
        for t, g in enumerate(slots.split(counts)):
            o = int(self.offsets[t])
            loc = g - o if o else g
            zero = not self._first and missed and bool((g < 0).any())
            out.append((torch.where(g < 0, g, loc) if zero and o else loc, zero))
        return out

    # ------------------------------------------------------------------ the protocol
    def map(self, ids: list[torch.Tensor] | torch.Tensor, step: int) -> list[SlotMap]:
        """Map one batch's IDs (int64 [N_t] per table, in table order; a tensor: the one table's) at ``step``
        (> the last step mapped) -> one `SlotMap` per table."""
        if isinstance(ids, torch.Tensor):
            ids = [ids]
        if step <= self.step:
            raise RuntimeError(f"dynamic tables {self.names}: step {step} mapped after step {self.step}")
        cfg, T = self.cfg, len(self.configs)
        fresh: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(T)]
        if self.step == 0 and self._first:  # each table's unknown row is born with it
            for t in range(T):
                fresh[t].append((torch.zeros(1, dtype=torch.int64), torch.full((1,), UNKNOWN_ID, dtype=torch.int64)))
        self.step = step
        if cfg.decay_every and step % cfg.decay_every == 0:
            self._decay(step)
        keys, counts = self._keys(ids)
        self.counters[:, 3] += torch.tensor(counts)
        found, slots, _ = self._index.lookup(keys)  # every occurrence (no unique pass: most are hits)
        sink = torch.where(found, slots, self.capacity)
        self.last_seen.index_fill_(0, sink, step)
        self.count.index_add_(0, sink, torch.ones(1, dtype=torch.int64).expand(sink.numel()))
        missed = not bool(found.all())
        if missed:
            self._admit(keys, self._tables_of(counts), found, slots, sink, step, fresh)
        self.arrays.charge(4 * keys.numel())  # hash entries, last seen, count (and the sketch, new slots)
        return [SlotMap(part, *self._fresh(f), zero)
                for (part, zero), f in zip(self._local(slots, counts, missed), fresh, strict=True)]

    def _admit(self, keys, tid, found, slots, sink, step, fresh) -> None:
        """The batch's IDs without a slot: admission, eviction, free slots; ``slots`` gets theirs (global; -1
        zero row, a table's offset: its unknown row)."""
        cfg = self.cfg
        miss = (~found).nonzero().squeeze(1)
        new, inverse, new_occ = torch.unique(keys.index_select(0, miss), return_inverse=True, return_counts=True)
        new_t = torch.empty_like(new)
        new_t[inverse] = tid.index_select(0, miss)
        # the default: -1 (zero row) or the table's unknown row; admitted IDs get theirs below
        new_slot = self.offsets.index_select(0, new_t) if self._first else torch.full_like(new, -1)
        ok = torch.ones_like(new, dtype=torch.bool)
        if self.sketch is not None:
            self.sketch.update(new, new_occ)
            ok = self.sketch.query(new) >= cfg.admit_count
        protect = sink[found] if cfg.evict != "none" else None
        picked, given_all = [], []
        for t in torch.unique(new_t[ok]).tolist():  # the tables with IDs to admit (keys ascending within each)
            want = (ok & (new_t == t)).nonzero().squeeze(1)
            if want.numel() > self.n_free(t) and cfg.evict != "none":
                self._evict(t, want.numel() - self.n_free(t), protect)
            take = min(want.numel(), self.n_free(t))
            if take:
                picked.append(want[:take])
                given_all.append(self._pop_free(t, take))
                self.n_live[t] += take
                self.counters[t, 0] += take
        if picked:  # every table's admissions at once
            idx, given = torch.cat(picked), torch.cat(given_all)
            keys_in = new.index_select(0, idx)
            self._insert(keys_in, given)
            raw = keys_in ^ self._salt.index_select(0, new_t.index_select(0, idx))  # the raw IDs
            self.live[given] = True
            self.slot_id[given] = raw
            self.last_seen[given] = step
            self.count[given] = new_occ.index_select(0, idx)
            new_slot.index_copy_(0, idx, given)
            for p, g, r in zip(picked, given.split([x.numel() for x in picked]),
                               raw.split([x.numel() for x in picked]), strict=True):
                t = int(new_t[p[0]])
                fresh[t].append((g - self.offsets[t], r))
        slots.index_copy_(0, miss, new_slot.index_select(0, inverse))
        own = new_slot >= 0
        if self._first:
            own &= new_slot != self.offsets.index_select(0, new_t)
        rejected = torch.zeros(len(self.configs), dtype=torch.int64)
        rejected.index_add_(0, new_t[~own], new_occ[~own])
        self.counters[:, 2] += rejected

    @staticmethod
    def _fresh(parts: list) -> tuple[torch.Tensor, torch.Tensor]:
        if not parts:
            return _EMPTY_I64, _EMPTY_I64
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def lookup(self, ids: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Read-only: each ID's slot in its table, or the default (-1 zero row, 0 unknown row) where it has
        none; int64 [N_t] per table."""
        if isinstance(ids, torch.Tensor):
            ids = [ids]
        keys, counts = self._keys(ids)
        found, slots, _ = self._index.lookup(keys)
        miss = ~found
        if bool(miss.any()):
            tid = self._tables_of(counts)
            self.default_reads.index_add_(0, tid[miss], torch.ones(1, dtype=torch.int64).expand(int(miss.sum())))
            default = self.offsets.index_select(0, tid) if self._first else torch.full_like(slots, -1)
            slots = torch.where(found, slots, default)
        return [part for part, _ in self._local(slots, counts, bool(miss.any()))]

    def _insert(self, keys: torch.Tensor, slots: torch.Tensor) -> None:
        try:
            self._index.insert(keys, slots)
        except NeedsRebuild:  # too many tombstones: rebuild from the live slots (amortised O(1) per eviction)
            self._rebuild()
            self._index.insert(keys, slots)

    def _rebuild(self) -> None:
        """The hash index from the live slots, a chunk of slots at a time."""
        self._index.reset()
        for a, b in self.arrays.chunks(self.capacity, 8 + 1 + 8 + 12 * 4):
            live = self.live[a:b].nonzero().squeeze(1) + a
            self._index.insert(self._key_of(live), live)

    def _key_of(self, slots: torch.Tensor) -> torch.Tensor:
        """The hash keys of the IDs in global ``slots``."""
        t = torch.searchsorted(self.offsets, slots, right=True) - 1
        return _fold_reserved(self.slot_id.index_select(0, slots) ^ self._salt.index_select(0, t))

    def _remove(self, slots: torch.Tensor) -> None:
        """IDs in global ``slots`` leave: index entries, bookkeeping; each slot goes back on its table's stack."""
        if slots.numel() == 0:
            return
        slots = slots.sort().values
        self._index.remove(self._key_of(slots))
        self.live[slots] = False
        self.slot_id[slots] = 0
        self.count[slots] = 0
        t_of = torch.searchsorted(self.offsets, slots, right=True) - 1
        for t in torch.unique(t_of).tolist():
            mine = slots[t_of == t]
            top = int(self.offsets[t]) + self.n_returned[t]
            self.returned[top : top + mine.numel()] = mine.flip(0)  # the lowest freed on top
            self.n_returned[t] += mine.numel()
            self.n_live[t] -= mine.numel()
            self.counters[t, 1] += mine.numel()
        self.arrays.charge(6 * slots.numel())

    def _decay(self, step: int) -> None:
        """Counts and the sketch halve; TTL / LFU sweeps. Passes over every slot a chunk at a time; the sweeps
        remove the highest chunks first, so each table's stack ends with its lowest freed slot on top, as one
        removal of them all would leave it."""
        cfg = self.cfg
        for a, b in self.arrays.chunks(self.capacity + 1):
            self.count[a:b] >>= 1
        if self.sketch is not None:
            self.sketch.halve(self.arrays.chunks(self.sketch.table.numel()))
        if cfg.evict not in ("ttl", "lfu"):
            return
        for a, b in reversed(list(self.arrays.chunks(self.capacity, 17))):
            if cfg.evict == "ttl":
                gone = self.live[a:b] & (self.last_seen[a:b] < step - cfg.ttl_steps)
            else:
                gone = self.live[a:b] & (self.count[a:b] == 0)
            self._remove(gone.nonzero().squeeze(1) + a)

    def _evict(self, t: int, need: int, protect: torch.Tensor | None) -> None:
        """Free at least ``need`` slots of table ``t`` (``capacity // BULK_EVICT_DIVISOR`` at the least) from
        its live IDs outside ``protect`` (global slots of this batch's IDs)."""
        a, b = int(self.offsets[t]), int(self.offsets[t + 1])
        n = max(need, min(self.configs[t].capacity // BULK_EVICT_DIVISOR, BULK_EVICT_MAX))
        best = torch.empty(0, dtype=torch.int64)  # the n lowest (score, slot) so far, in ascending slot order
        for ca, cb in self.arrays.chunks(b - a, 17):
            cand = self.live[a + ca : a + cb].nonzero().squeeze(1) + (a + ca)
            if protect is not None and protect.numel():  # this batch's IDs stay
                cand = cand[~torch.isin(cand, protect)]
            if self._first and ca == 0:
                cand = cand[cand != a]  # the shared unknown row stays
            cand = torch.cat([best, cand])  # ascending slots: a stable sort by score breaks ties by slot
            best = cand[torch.sort(self._score(cand), stable=True).indices[:n]].sort().values
        self._remove(best)

    def _score(self, slots: torch.Tensor) -> torch.Tensor:
        """Eviction order of ``slots``, lowest first: last seen (ttl), or count then last seen (lfu, l2)."""
        score = self.last_seen.index_select(0, slots)  # steps < 2^31
        if self.cfg.evict in ("lfu", "l2"):  # lowest count first, then least recently seen: one int64 key
            score = (self.count.index_select(0, slots).clamp(max=(1 << 31) - 1) << 31) | score
        return score

    def evict_ids(self, ids: list[torch.Tensor], measured: int) -> None:
        """A norm sweep (``evict="l2"``): the IDs of each table (int64 [n_t]) whose rows measured below the
        threshold after step ``measured`` leave, unless they were seen since (their row has changed) or left
        already."""
        keys, _ = self._keys(ids)
        if keys.numel() == 0:
            return
        found, slots, _ = self._index.lookup(keys)
        slots = slots[found]
        self._remove(slots[self.last_seen.index_select(0, slots) <= measured])

    # ------------------------------------------------------------------ state
    def stats(self) -> dict[str, dict]:
        """Per table: rows live, capacity, and the counters (see the module docstring)."""
        out = {}
        for t, name in enumerate(self.names):
            a, b = int(self.offsets[t]), int(self.offsets[t + 1])
            c = self.counters[t].tolist()
            out[name] = {"live": self.n_live[t], "capacity": b - a, "admitted": c[0], "evicted": c[1],
                         "rejected": c[2], "lookups": c[3], "default_reads": int(self.default_reads[t])}
        return out

    def _arrays(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k) for k in ARRAYS}
        if self.sketch is not None:
            out["sketch"] = self.sketch.table.view(-1)
        return out

    def state_dict(self) -> dict:
        """Everything ``map`` depends on: the O(capacity) arrays under ``"arrays"`` (1-D copies, in memory or
        spilled as this index's own), the rest as ints and lists (a checkpoint's dense state; loads with
        ``weights_only=True``). The hash index is rebuilt from the live slots on load."""
        return {"arrays": {k: self.arrays.like(v) for k, v in self._arrays().items()},
                "n_returned": list(self.n_returned), "next_new": list(self.next_new), "n_live": list(self.n_live),
                "step": self.step, "counters": self.counters.clone(), "names": list(self.names)}

    def load_state_dict(self, d: dict) -> None:
        """Load a `state_dict`; its arrays may be tensors or `ArraySource` s (read a chunk at a time: a
        checkpoint's files)."""
        if "arrays" not in d and "slot_id" in d:
            raise ConfigError(f"dynamic tables {self.names}: the checkpoint's index was saved by an older tierec "
                              "(before index arrays had files of their own); resume it with that version")
        try:
            if list(d["names"]) != self.names:
                raise ValueError(f"saved for tables {d['names']}, these are {self.names}")
            mine, saved = self._arrays(), d["arrays"]
            if set(saved) != set(mine):
                raise ValueError("saved with another admit_count" if ("sketch" in saved) != ("sketch" in mine)
                                 else f"saved arrays {sorted(saved)}, expected {sorted(mine)}")
            for k, dst in mine.items():
                if saved[k].numel() != dst.numel():
                    raise ValueError(f"{k}: saved for {saved[k].numel()} entries, this index has {dst.numel()}")
                for a, b, part in chunks_of(saved[k], self.arrays.chunks(dst.numel())):
                    dst[a:b].copy_(part)
            self.n_returned, self.next_new = [int(x) for x in d["n_returned"]], [int(x) for x in d["next_new"]]
            self.n_live = [int(x) for x in d["n_live"]]
            self.step, self.counters = int(d["step"]), d["counters"].clone()
        except (KeyError, ValueError, RuntimeError, AttributeError, TypeError) as e:
            raise ConfigError(f"dynamic tables {self.names}: the saved index does not fit ({e})") from None
        if self.sketch is not None:
            row0 = self.sketch.table[0]
            self.sketch.total = sum(int(row0[a:b].sum()) for a, b in self.arrays.chunks(row0.numel()))
        self._rebuild()

    @property
    def nbytes(self) -> int:
        """Memory of the index: its arrays, or when spilled the bound on their resident pages."""
        if self.arrays.spilled:
            return self.arrays.nbytes
        return self._index.nbytes + sum(t.nbytes for t in self._arrays().values())



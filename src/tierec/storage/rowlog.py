"""Write-backs appended to a log instead of read-modify-written in place (`RowLog`).

A packed table file holds row ``r`` at file row ``r``: with 68-byte rows, 60 share a 4 KiB block, and
writing one back means reading its block first (read-modify-write: two I/Os per evicted row, more than
half of the device's reads in `benchmarks/bench_scale.py`). A `RowLog` gives an O_DIRECT working file a
log region after its rows. A write-back is appended there in whole blocks -- the step's evicted rows
packed end to end, one ``pwrite`` -- and a map ID -> log slot says where each relocated row lives now;
its home bytes are stale from then on and never read::

    file rows 0 .. base-1                  home: row r at file row r (and a hot layout's rows)
    file rows base .. base+H-1             log half 0  } H = 2 x capacity slots each, base and H
    file rows base+H .. base+2H-1          log half 1  } multiples of one block's worth of rows

Appends fill the active half; the last, partial block is kept in memory, so every write covers whole
blocks and nothing is read back. A row written again is appended again (its older copy is dead). An
append's rows land in the order of a placement rank where the caller gives one (`append`: the step its
cache reads each one back next), so rows read back at the same step share sectors.

Staging by rank. A step evicts only a few rows of each rank (a later step they are all read back at),
and a 68-byte row read alone costs a 512-byte sector. With ``staged`` rows of memory, ranked rows wait
in a staging area grouped by rank, and a rank's rows go to the log together once they fill
`STAGE_GROUP_BYTES` -- rows evicted at many steps and read back at one then sit end to end. When the
staging area is full, the lowest ranks (read back soonest) go first, until `STAGE_KEEP` of it is left:
one append of many consecutive ranks, whose rows, read back at neighbouring steps, then share sectors.
A step's read never sees staged bytes in the file: `unstage` writes the rank groups that hold any of
the rows asked for (a step's reads are a rank's rows), and `SsdTable.slots_of` calls it before it maps
IDs; `unstage` of everything before the map is saved or the file is made durable. A bulk read (a
checkpoint's, an evaluation's) copies the staged rows it asks for from the staging area instead
(`staged_rows`) and leaves their groups staged for the step that reads them back. Exactness is
untouched: a row's bytes are the same wherever, and whenever, they are written.
Unranked rows. A rank of `UNRANKED` (int64 max: the look-ahead cache's "no use inside the window", with a trace
"never used again") says no read-back is known. Such rows wait apart from the rank groups (pieces of sorted IDs,
no re-sort per append) until the staging area is full, and then go first, all together, in ID order. With a trace
they are most write-backs once a cache evicts (rows touched once), and a checkpoint reads them back by ID: one
step's write-backs per append would cut its ID-ordered reads into runs of a few rows, one per append (docs/storage.md
has the measurement). A step that asks for one of them sends them all (`unstage`); a bulk read copies them
(`staged_rows`).
Recent sectors. Staging sends the lowest ranks out together when it is full, so one sector often holds rows read
back at the next few steps: in a 2,750-step run of `benchmarks/bench_scale.py --quick`, half of the log rows a step
read sat in a sector read within the last four steps, while the look-ahead window saw ~0.2 steps past the step it
prepared (too little to take them as block neighbours). With ``recent`` sectors, `RecentSectors` holds the last
sectors a cache's steps read from the log (FIFO), and a step takes the rows whose sectors it holds from there
instead of the device (`tierec.storage.multifile.read_many` with ``recent``; bulk reads leave it alone).
Exactness: a held sector is forgotten whenever the log writes over it, and a read that overlapped such a write
keeps nothing, so a row's bytes are the file's.
When the active half is full, the live rows -- the map's entries, at most ``capacity`` -- are copied
to the other half in slot order (the old half read sequentially in chunks that hold live rows), and
appends go on there: at least half of it is free. The old half stays untouched until the next
switch, so a reader that found a row's slot just before a switch still reads the right bytes.

The map is two sorted arrays, IDs and slots (int32; IDs int32 too in a table of fewer than 2^31 rows):
8 B per relocated row (12 in larger tables: `map_entry_bytes`), at most ``capacity`` of them (the
memory budget pays for ``capacity``: `tierec.storage.tiered.split_budget`), and a small delta level of the
latest changes over them (`SlotMap`: at most `DELTA_FACTOR` x sqrt(``capacity``) more entries), so that an
append does not copy the whole map.

The compacted run. When an append finds the map full, the log is compacted (`compact`) into a *run*:
every row relocated so far, packed in ID order in one of two run regions after the log, so that row
``r`` of the run sits at run row ``rank(r)`` -- the number of relocated IDs below it, counted from a
bitmap of the run's IDs (1 bit per table row) and the running count before each 64-bit word
(`run_index_bytes`: 1.5 bits per row, paid from the budget; `RunIndex`). The new run is the old one
merged with the map's rows, written sequentially into the other region (the old run read sequentially,
the log's rows read from their slots); then the map starts empty and appends go on in the other half.
Rows do not go back home with read-modify-write: as an LSM tree's compaction writes a new sorted file
instead of updating old ones in place, a compaction costs the run's size in sequential I/O, not a
4 KiB block per relocated row. A row written again while in the run goes to the log (the map is read
first); one written in place (beyond an append's capacity) is written at its run row. Once the run
would hold more than `run_limit` rows, the compaction folds the run and the map home instead: in ID
order, in sorted batches of whole blocks (read-modify-write of at most every block once), and the
run starts empty. The limit balances the two costs: with a map of ``C`` rows and a run allowed ``K``
maps' worth, each relocated row is rewritten ~``K`` times by compactions (``K`` x its bytes) and
shares a fold's pass over the table's ``N`` rows with ``K C - 1`` others (``N / (K C)`` of its bytes
per row relocated), least at ``K = sqrt(N / C)``: a run of ``sqrt(N C)`` rows, at most 1/`RUN_SHARE`
of the table. Readers snapshot the map before the run, and a compaction replaces the run before the map,
so a reader never misses a row; the old region and half stay untouched until the next compaction, so a
slot found just before one still reads the right bytes. Exactness: a row's bytes are the same wherever
they sit; every reader maps IDs through `SsdTable.slots_of`, which asks `lookup` first.

Kept at compaction. A run holds rows in ID order, so a row a later step reads back from it costs a sector
of its own (68-byte rows: 7.5x), where in the log, appended by rank, it shares sectors with rows read back
at the same steps. So a compaction leaves in the log the rows appended with a known read-back (a rank)
that no step has read yet, at most half the map (the oldest slots: the next compaction is at least half a
map of new rows away), moved to the other half as a switch moves rows; the rest go into the run. Which
rows those are is one bit per slot of the active half (`SlotBits`, 2 bits per map entry, paid from the
budget: `log_bytes`), set by an append, carried by a switch, cleared by a step's read (`lookup` with
``read_back``; bulk reads leave it). A row read back is rewritten when its cache evicts it (a step changes
the rows it reads), which leaves its log copy dead; a kept row's older copy in the run, if any, is
shadowed by the map. The bits are not saved: a reopened log keeps nothing at its first compaction.

`save` / `load` keep the map beside the file (``<file>.log``: IDs int64 then slots int64), the run's
bitmap (``<file>.log.run``: uint64 words) and the active half, head and run in the sidecar, so that a
closed working file opens again.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tierec.errors import CheckpointError
from tierec.fsio import atomic_write_bytes, transfer_all
from tierec.storage import aio
from tierec.storage.blockio import ALIGN, SECTOR


def map_entry_bytes(num_rows: int) -> int:
    """Bytes of one map entry of a table of ``num_rows``: its ID (int32 below 2^31 rows, else int64) and slot (int32)."""
    return 8 if num_rows < 2**31 else 12


COPY_CHUNK = 4 << 20  # bytes of the old half read at a time when the live rows move to the other half
# rows merged at a time when the log is compacted into its run (or folded home): a piece reads each log row's sectors
# and its stretch of the old run (a fold: home blocks too, read-modify-write, up to 4 KiB per row: 16 MiB at 4,096)
FOLD_ROWS = 1 << 12
FOLD_WORDS = 1 << 16  # bitmap words (64 IDs each) a piece covers at most: its IDs are unpacked one byte per ID
RUN_SHARE = 2  # the compacted run holds at most 1/RUN_SHARE of the table's rows (`RowLog.run_limit_rows`)
# a compaction reads the log's rows by a sequential pass over the active half, keeping at most this many bytes of them
# (more passes where they are more), where that reads fewer bytes than a sector for each (`RowLog.compact`), in reads
# of GATHER_CHUNK: a compaction's buffers stay near 10 MiB (16 MiB, read in copied 4 MiB chunks: ~20 MiB; 4 MiB:
# ~8 MiB, but two passes over the log for bench_scale --quick's biggest tables, read amplification 8.1x -> 9.4x)
GATHER_BYTES = 8 << 20
GATHER_CHUNK = 1 << 20
STAGE_GROUP_BYTES = 1024  # a rank's staged rows go to the log once they fill two sectors
# a full staging area sends its lowest ranks to the log until this share of its limit is left: one append of many
# consecutive ranks, so rows read back at neighbouring steps share sectors (and the recent sectors catch them)
STAGE_KEEP = 0.5
STAGED_ROW_OVERHEAD = 16  # bytes of a staged row beside its floats: its ID and rank (int64 each; unranked: ID twice)
UNRANKED = np.iinfo(np.int64).max  # a placement rank that says "no read-back known" (the look-ahead cache's NEVER)
# the log map's delta level folds into its main level past DELTA_FACTOR x sqrt(main) entries, at least DELTA_MIN
DELTA_MIN = 1 << 12
DELTA_FACTOR = 64
RECENT_SECTOR_OVERHEAD = 24  # bytes of a held sector beside its bytes: its slot's owner, its number and slot (int64)


def log_capacity(nbytes: int, num_rows: int) -> int:
    """The map entries (relocated rows) ``nbytes`` of memory buys in a table of ``num_rows``: `map_entry_bytes` each,
    and the read-back bits of the log's two slots per entry (`SlotBits`: 2 bits)."""
    return int(nbytes) * 4 // (4 * map_entry_bytes(num_rows) + 1)


def log_bytes(capacity: int, num_rows: int) -> int:
    """Memory of a log of ``capacity`` map entries in a table of ``num_rows`` (`log_capacity`'s inverse)."""
    return int(capacity) * map_entry_bytes(num_rows) + -(-int(capacity) // 4)


def staged_row_bytes(row_stride: int) -> int:
    """Memory of one staged row (module doc): its ``row_stride`` bytes of floats, its ID and its rank."""
    return int(row_stride) + STAGED_ROW_OVERHEAD


def find_sorted(keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where ``ids`` sit in the sorted, distinct ``keys``: (bool [n]: present; int64 [n]: their positions, where
    present). ``ids`` are compared in the keys' dtype (IDs of the table fit its keys: no copy of the map)."""
    if keys.size == 0:
        return np.zeros(ids.size, bool), np.zeros(ids.size, np.int64)
    ids = ids.astype(keys.dtype, copy=False)
    pos = np.minimum(np.searchsorted(keys, ids), keys.size - 1)
    return keys[pos] == ids, pos


def _kept(keys: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
    """bool [K]: which of the sorted, distinct ``keys`` are not among ``ids`` (a search per ID: few IDs in many keys,
    e.g. a step's write-backs among the staged rows); None when every key is kept."""
    if not keys.size or not ids.size:
        return None
    held, pos = find_sorted(keys, ids)
    if not held.any():
        return None
    keep = np.ones(keys.size, bool)
    keep[pos[held]] = False
    return keep


def recent_sectors(nbytes: int, sector: int) -> int:
    """How many ``sector``-byte sectors `RecentSectors` holds in ``nbytes`` of memory (their bookkeeping included)."""
    return int(nbytes) // (int(sector) + RECENT_SECTOR_OVERHEAD)


def block_rows(row_stride: int, block: int = ALIGN) -> int:
    """Rows of ``row_stride`` bytes in the least whole number of ``block``-byte blocks they fill exactly."""
    return block // math.gcd(row_stride, block)


def run_index_bytes(num_rows: int) -> int:
    """Memory of a run's index over a table of ``num_rows`` (`RunIndex`): a bit per row and, per 64-bit word, the
    count of IDs before it (int32 below 2^31 rows, else int64): 1.5 (2) bits per row."""
    return -(-int(num_rows) // 64) * (8 + (4 if num_rows < 2**31 else 8))


def word_bits(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, distinct IDs (int64 [K]) -> (the bitmap words they fall in, int64 [M]; those words' bits, uint64 [M])."""
    words, first = np.unique(ids >> 6, return_index=True)
    return words, np.bitwise_or.reduceat(np.left_shift(np.uint64(1), (ids & 63).astype(np.uint64)), first)


def set_ids(bits: np.ndarray, w0: int, w1: int) -> np.ndarray:
    """The IDs (int64, sorted) whose bits are set in words [w0, w1) of bitmap ``bits`` (uint64)."""
    return np.flatnonzero(np.unpackbits(bits[w0:w1].view(np.uint8), bitorder="little")).astype(np.int64) + 64 * w0


class RunIndex:
    """Which IDs a compacted run holds and at which run row (module doc): ``bits`` (uint64 [W]: bit ``r & 63`` of
    word ``r >> 6`` set for each ID ``r`` in the run; empty: no run), ``before`` (the run's IDs in the words
    before each word, [W]), ``region`` (which of the two run regions holds it), ``rows``. Immutable: a
    compaction makes a new one."""

    def __init__(self, bits: np.ndarray, region: int, num_rows: int):
        self.bits, self.region = bits, int(region)
        counts = np.bitwise_count(bits).astype(np.int64)
        self.rows = int(counts.sum())
        self.before = np.zeros(bits.size, np.int32 if num_rows < 2**31 else np.int64)
        if bits.size > 1:
            np.cumsum(counts[:-1], out=self.before[1:], dtype=self.before.dtype)

    @classmethod
    def empty(cls, num_rows: int) -> RunIndex:
        """No run (over a table of ``num_rows``)."""
        return cls(np.empty(0, np.uint64), 1, num_rows)

    def holds(self, ids: np.ndarray) -> np.ndarray:
        """bool [U]: which of ``ids`` (int64 [U]) the run holds."""
        if not self.rows:
            return np.zeros(ids.size, bool)
        return ((self.bits[ids >> 6] >> (ids & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)

    def rank(self, ids: np.ndarray) -> np.ndarray:
        """Run rows (int64 [U]) of ``ids`` (int64 [U], all held): how many of the run's IDs are below each."""
        w = ids >> 6
        below = self.bits[w] & (np.left_shift(np.uint64(1), (ids & 63).astype(np.uint64)) - np.uint64(1))
        return self.before[w].astype(np.int64) + np.bitwise_count(below).astype(np.int64)

    def start(self, w: int) -> int:
        """Run row of the first of the run's IDs at or after word ``w``."""
        return self.rows if w >= self.bits.size else int(self.before[w])


class SlotBits:
    """One bit per slot of a log half (uint8 words, ``n`` bits): which slots hold a row a later step reads back and
    no step has read yet (module doc, "Kept at compaction"). Vectorised get / set of any slots."""

    def __init__(self, n: int):
        self.words = np.zeros(-(-int(n) // 8), np.uint8)

    def get(self, slots: np.ndarray) -> np.ndarray:
        """bool [k]: the bits of ``slots`` (int64 [k])."""
        return ((self.words[slots >> 3] >> (slots & 7).astype(np.uint8)) & 1).astype(bool)

    def set(self, slots: np.ndarray, on: np.ndarray | bool) -> None:
        """Set the bits of ``slots`` (int64 [k], distinct) to ``on`` (bool [k] or one bool for all)."""
        at, mask = slots >> 3, np.left_shift(np.uint8(1), (slots & 7).astype(np.uint8))
        np.bitwise_and.at(self.words, at, ~mask)
        on = np.broadcast_to(np.asarray(on, bool), slots.shape)
        np.bitwise_or.at(self.words, at[on], mask[on])

    def set_range(self, start: int, on: np.ndarray) -> None:
        """Set the bits of slots ``start .. start + len(on) - 1`` to ``on`` (bool [k]): unpacked and packed again
        a word at a time, as an append or a switch writes consecutive slots."""
        if not on.size:
            return
        w0, w1 = start // 8, -(-(start + on.size) // 8)
        bits = np.unpackbits(self.words[w0:w1], bitorder="little")
        bits[start - 8 * w0 : start - 8 * w0 + on.size] = on
        self.words[w0:w1] = np.packbits(bits, bitorder="little")

    def clear(self) -> None:
        self.words[:] = 0


class RecentSectors:
    """The log's sectors read lately, held in memory (module doc, "Recent sectors"): a FIFO of ``capacity``
    sectors of ``size`` bytes (``capacity x size`` bytes, paid from the budget), found by their sector number
    (sorted int64 numbers -> slots: every operation vectorised). A sector is forgotten when the log writes over
    it (`drop`, before and after the write), and a read that saw a write happen meanwhile keeps nothing
    (`epoch`), so what is held is what the file holds. Thread-safe. Counters go to ``stats``."""

    def __init__(self, capacity: int, size: int, stats: dict):
        self.capacity, self.size = max(1, int(capacity)), int(size)
        self.data = np.zeros((self.capacity, self.size), np.uint8)
        self.owner = np.full(self.capacity, -1, np.int64)  # the sector each slot holds, -1: none
        self.keys = np.empty(0, np.int64)  # the sectors held, sorted
        self.at = np.empty(0, np.int64)  # their slots
        self.next = 0  # the oldest slot: replaced next
        self.epoch = 0  # bumped by every `drop`
        self.stats = stats
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Memory held: the sectors' bytes and their bookkeeping (`recent_sectors`)."""
        return self.data.nbytes + self.owner.nbytes + 2 * 8 * self.capacity

    def _find(self, sectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bool [n]: which ``sectors`` are held; their slots, where held)."""
        held, pos = find_sorted(self.keys, sectors)
        return held, self.at[pos] if self.at.size else pos

    def rows(self, start: np.ndarray, row_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows at file byte offsets ``start`` (int64 [n]), ``row_bytes`` each -> (bool [n]: the sectors of the
        row are held; the bytes of those rows, uint8 [h, row_bytes])."""
        s0, s1 = start // self.size, (start + row_bytes - 1) // self.size
        with self._lock:
            f0, a0 = self._find(s0)
            f1, a1 = self._find(s1)
            hit = f0 & f1
            if not hit.any():
                return hit, np.empty((0, row_bytes), np.uint8)
            both = np.concatenate([self.data[a0[hit]], self.data[a1[hit]]], axis=1)  # [h, 2 x size]
            self.stats["log_recent_rows"] += int(np.count_nonzero(hit))
        off = (start[hit] - s0[hit] * self.size)[:, None] + np.arange(row_bytes)
        return hit, np.take_along_axis(both, off, axis=1)

    def keep(self, sectors: np.ndarray, data: np.ndarray, epoch: int) -> None:
        """Hold ``sectors`` (int64 [k], distinct) and their bytes (uint8 [k, size]), read after `epoch` was
        ``epoch``, in place of the oldest held; nothing if the log wrote meanwhile."""
        with self._lock:
            if epoch != self.epoch:
                return
            new = ~self._find(sectors)[0]
            sectors, data = sectors[new][-self.capacity :], data[new][-self.capacity :]
            k = sectors.size
            if not k:
                return
            slots = (self.next + np.arange(k)) % self.capacity
            self.next = int((self.next + k) % self.capacity)
            old = self.owner[slots]
            self.owner[slots] = sectors
            self.data[slots] = data
            stay = ~np.isin(self.keys, old[old >= 0])
            keys, at = np.concatenate([self.keys[stay], sectors]), np.concatenate([self.at[stay], slots])
            order = np.argsort(keys, kind="stable")
            self.keys, self.at = keys[order], at[order]
            self.stats["log_recent_kept"] += k

    def drop(self, lo: int, hi: int) -> None:
        """Forget the sectors of file bytes [lo, hi): the log writes over them."""
        with self._lock:
            self.epoch += 1
            a, b = np.searchsorted(self.keys, [lo // self.size, -(-hi // self.size)])
            if a < b:
                self.owner[self.at[a:b]] = -1
                self.keys = np.concatenate([self.keys[:a], self.keys[b:]])
                self.at = np.concatenate([self.at[:a], self.at[b:]])


class SlotMap:
    """The log's map, ID -> log slot (module doc), as two sorted levels so that an append costs O(its rows + the
    delta), not O(the map): ``keys``/``slots`` (the main level: sorted IDs in the table's key dtype, int32 slots)
    and a small ``dkeys``/``dslots`` delta over it (slot -1: the ID left the log). An ID's entry is the delta's
    where the delta has one, else the main level's. `merged` folds the delta in once it outgrows
    ``DELTA_FACTOR x sqrt(main)`` entries: an append copies the delta and, amortised, a share of the main level,
    where one level copied the whole map per append (docs/storage.md). Immutable: every update returns a new map,
    so a reader that took one sees one consistent map. ``size``: the IDs mapped (live rows)."""

    __slots__ = ("keys", "slots", "dkeys", "dslots", "size")

    def __init__(self, keys: np.ndarray, slots: np.ndarray, dkeys: np.ndarray | None = None,
                 dslots: np.ndarray | None = None, size: int | None = None):
        self.keys, self.slots = keys, slots
        self.dkeys = keys[:0] if dkeys is None else dkeys
        self.dslots = slots[:0] if dslots is None else dslots
        self.size = int(keys.size) if size is None else int(size)

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Log slots (int64 [n]) of ``ids`` (int64 [n]); -1 where an ID is not in the log."""
        found, pos = find_sorted(self.keys, ids)
        out = np.where(found, self.slots[pos] if self.slots.size else -1, -1).astype(np.int64)
        if self.dkeys.size:
            dfound, dpos = find_sorted(self.dkeys, ids)
            out[dfound] = self.dslots[dpos[dfound]]
        return out

    def _live(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bool [n]: which of ``ids`` the map holds; bool [n] and positions: which the delta has an entry for)."""
        found, pos = find_sorted(self.dkeys, ids)
        live = find_sorted(self.keys, ids)[0]
        live[found] = self.dslots[pos[found]] >= 0
        return live, found, pos

    def with_slots(self, ids: np.ndarray, slots: np.ndarray) -> SlotMap:
        """This map with ``ids`` (sorted, distinct) pointing at ``slots`` (int32 [n])."""
        ids = ids.astype(self.keys.dtype, copy=False)
        live, found, pos = self._live(ids)
        return self._with_delta(ids, slots.astype(np.int32, copy=False), self.size + int(np.count_nonzero(~live)),
                                found, pos)

    def without(self, ids: np.ndarray) -> SlotMap:
        """This map without ``ids`` (sorted, distinct; those not in it are ignored)."""
        ids = ids.astype(self.keys.dtype, copy=False)
        live, found, pos = self._live(ids)
        if not live.any():
            return self
        return self._with_delta(ids[live], np.full(int(live.sum()), -1, np.int32), self.size - int(live.sum()),
                                found[live], pos[live])

    def _with_delta(self, ids: np.ndarray, slots: np.ndarray, size: int, found: np.ndarray,
                    pos: np.ndarray) -> SlotMap:
        """The map with delta entries ``ids`` -> ``slots`` (``found``/``pos``: where the delta has them already)."""
        dslots = self.dslots.copy()
        dslots[pos[found]] = slots[found]
        dkeys, new = self.dkeys, ~found
        if new.any():
            at = np.searchsorted(dkeys, ids[new])
            dkeys, dslots = np.insert(dkeys, at, ids[new]), np.insert(dslots, at, slots[new])
        out = SlotMap(self.keys, self.slots, dkeys, dslots, size)
        return out.flat() if dkeys.size > max(DELTA_MIN, DELTA_FACTOR * math.isqrt(self.keys.size)) else out

    def flat(self) -> SlotMap:
        """The same map in one level."""
        return self if not self.dkeys.size else SlotMap(*self.merged())

    def merged(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted IDs, their slots) of every ID in the log, in one level."""
        if not self.dkeys.size:
            return self.keys, self.slots
        found, pos = find_sorted(self.keys, self.dkeys)  # delta entries that replace or remove main ones
        keys, slots = self.keys, self.slots.copy()
        slots[pos[found]] = self.dslots[found]
        if (self.dslots[found] < 0).any():
            keep = slots >= 0
            keys, slots = keys[keep], slots[keep]
        add = ~found & (self.dslots >= 0)
        at = np.searchsorted(keys, self.dkeys[add])
        return np.insert(keys, at, self.dkeys[add]), np.insert(slots, at, self.dslots[add])


class RowLog:
    """The log region of one table file (module doc): rows ``base + [0, 2 * half)`` of a file opened with
    O_DIRECT (descriptor ``fd``), rows of ``width`` float32 at ``row_stride`` bytes; at most ``capacity``
    relocated rows; at most ``staged`` ranked rows wait in memory for their rank's group; ``recent`` of its
    ``sector``-byte sectors read lately are held in memory (`RecentSectors`); then the two regions of the
    compacted run, ``run_rows`` each, holding at most ``run_limit`` rows (module doc)."""

    def __init__(self, path: Path, fd: int, base: int, capacity: int, width: int, row_stride: int, num_rows: int,
                 staged: int = 0, recent: int = 0, sector: int = SECTOR):
        unit = block_rows(row_stride)
        if base % unit:
            raise ValueError(f"log base row {base} must be a multiple of {unit}")
        self.path, self.fd = path, fd
        self.base, self.capacity = int(base), max(1, int(capacity))
        self.half = self.half_rows(self.capacity, row_stride)  # slots per half, whole blocks
        self.width, self.stride = int(width), int(row_stride)
        self.num_rows = int(num_rows)
        self.run_limit = self.run_limit_rows(num_rows, self.capacity)  # the most rows the run holds before a fold
        self.run_rows = self.run_region_rows(num_rows, self.capacity, row_stride)  # each run region (whole blocks)
        self._run = RunIndex.empty(num_rows)  # the compacted run (none yet)
        # relocated rows (int32 IDs where the table allows) -> their slots in [0, 2 * half) (int32), replaced as
        # one immutable map so a reader in another thread never sees one array updated without the other
        self.key_dtype = np.int32 if map_entry_bytes(num_rows) == 8 else np.int64
        self._map = SlotMap(np.empty(0, self.key_dtype), np.empty(0, np.int32))
        self.active = 0  # the half appends go to
        self.head = 0  # next free slot of the active half
        self._tail = np.empty(0, np.uint8)  # the active half's last partial block, as written
        # per slot of the active half (where every live row is): written with a known read-back not yet read
        self._unread = SlotBits(self.half)
        self._lock = threading.RLock()  # one appender at a time (head, tail, map capacity, staging)
        # staged rows: IDs (int64 [P], sorted), ranks (int64 [P]), rows ([P, width] float32), swapped as one tuple
        self.stage_limit = max(0, int(staged))
        self.group = max(1, -(-STAGE_GROUP_BYTES // self.stride))  # rows of one rank written together
        self._staged: tuple[np.ndarray, np.ndarray, np.ndarray] = (
            np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, self.width), np.float32))
        # unranked staged rows (module doc): their sorted IDs, and the pieces they came in [(sorted IDs, rows)],
        # disjoint from each other and from the ranked ones; swapped as one tuple
        self._unranked: tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]] = (np.empty(0, np.int64), [])
        self.stats = {"log_rows": 0, "log_switches": 0, "log_moved_rows": 0, "log_full": 0,
                      "log_bytes_written": 0, "log_bytes_read": 0, "log_staged_peak": 0, "log_folds": 0,
                      "log_folded_rows": 0, "log_compactions": 0, "log_run_rows": 0, "log_recent_rows": 0,
                      "log_recent_kept": 0, "log_unranked_batches": 0, "log_kept_rows": 0}
        self.recent = RecentSectors(recent, sector, self.stats) if recent > 0 else None

    @staticmethod
    def half_rows(capacity: int, row_stride: int) -> int:
        """Slots of one half of a ``capacity``-row log: 2 x capacity, whole blocks."""
        unit = block_rows(row_stride)
        return -(-2 * max(1, int(capacity)) // unit) * unit

    @staticmethod
    def run_limit_rows(num_rows: int, capacity: int) -> int:
        """The most rows a run holds (module doc): sqrt(``num_rows`` x ``capacity``), at most 1/`RUN_SHARE` of the
        table's rows, at least one map's worth."""
        return max(1, min(int(num_rows) // RUN_SHARE, max(int(capacity), math.isqrt(int(num_rows) * int(capacity)))))

    @classmethod
    def run_region_rows(cls, num_rows: int, capacity: int, row_stride: int) -> int:
        """Rows of one run region: `run_limit_rows`, whole blocks."""
        unit = block_rows(row_stride)
        return -(-cls.run_limit_rows(num_rows, capacity) // unit) * unit

    @classmethod
    def region_rows(cls, capacity: int, row_stride: int, num_rows: int) -> int:
        """File rows after the home rows: the log's two halves and the run's two regions (sparse until written)."""
        return 2 * cls.half_rows(capacity, row_stride) + 2 * cls.run_region_rows(num_rows, capacity, row_stride)

    def reset_stats(self) -> None:
        for k in self.stats:
            self.stats[k] = 0

    @property
    def live(self) -> int:
        """Rows in the log (entries of the map)."""
        return self._map.size

    @property
    def staged(self) -> int:
        """Rows waiting in the staging area (module doc), ranked and unranked."""
        return int(self._staged[0].size) + int(self._unranked[0].size)

    # ------------------------------------------------------------------ lookups
    _find = staticmethod(find_sorted)

    def staged_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``ids`` (int64 [U]) that wait in the staging area, copied from it: (bool [U]: staged; float32
        [k, width]: their rows, in the order of ``ids``). A bulk read (checkpoint, evaluation) takes them from here
        and leaves the rank groups staged, where `unstage` would write them to the log first: a staged row's
        bytes are its newest (a row written again replaces its staged copy)."""
        if not self.staged or not ids.size:
            return np.zeros(ids.size, bool), np.empty((0, self.width), np.float32)
        ids = np.asarray(ids, np.int64)
        with self._lock:
            sid, _, srows = self._staged
            held, pos = self._find(sid, ids)
            uids = self._unranked[0]
            if not uids.size:
                return held, srows[pos[held]]
            found, upos = self._find(uids, ids)  # a bulk read asks many times (once per checkpoint piece):
            urows = self._unranked_in_order()  # the unranked pieces merged into one piece once
            both = held | found
            at = np.cumsum(both) - 1  # where each of ids' staged rows goes among them
            out = np.empty((np.count_nonzero(both), self.width), np.float32)
            out[at[held]] = srows[pos[held]]
            out[at[found]] = urows[upos[found]]
            return both, out

    def lookup(self, ids: np.ndarray, home: np.ndarray, read_back: bool = False) -> np.ndarray:
        """File rows of ``ids`` (int64 [U]): their log slots where relocated, else their run rows where the run
        holds them, else ``home`` (int64 [U]). ``read_back``: a step reads them back (module doc, "Kept at
        compaction": their log copies need not stay in the log)."""
        lmap = self._map  # one snapshot, taken before the run's (module doc)
        run = self._run
        if run.rows:
            held = run.holds(ids)
            if held.any():
                home = home.copy()
                home[held] = self.base + self._run_slot(run.region, run.rank(ids[held]))
        if lmap.size == 0:
            return home
        slots = lmap.get(ids)
        if read_back and (slots >= 0).any():
            with self._lock:  # the bits are the current map's (the rows found stay the snapshot's)
                now = slots if lmap is self._map else self._map.get(ids)
                held = now[now >= 0] - self.active * self.half
                self._unread.set(held[(held >= 0) & (held < self.half)], False)
        return np.where(slots >= 0, self.base + slots, home)

    def drop(self, ids: np.ndarray) -> None:
        """Forget ``ids``' log copies (int64 [U]; written in place since, at their rows: home, or the run's rows),
        staged copies too."""
        with self._lock:
            ids = np.sort(np.asarray(ids, np.int64))
            self._map = self._map.without(ids)
            self._staged = self._staged_without(ids)
            self._unranked = self._unranked_without(ids)

    def _run_slot(self, region: int, rows: np.ndarray | int):
        """Slots (past the log's halves) of run rows ``rows`` of run region ``region``."""
        return 2 * self.half + region * self.run_rows + rows

    @property
    def run(self) -> RunIndex:
        """The compacted run's index (module doc)."""
        return self._run

    # ------------------------------------------------------------------ appends
    def _staged_without(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The staging area less its copies of rows ``ids`` (int64, sorted): they are stale."""
        sid, srank, srows = self._staged
        keep = _kept(sid, ids)
        return self._staged if keep is None else (sid[keep], srank[keep], srows[keep])

    def _unranked_without(self, ids: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """The unranked staged rows less their copies of rows ``ids`` (int64, sorted): they are stale."""
        uids, pieces = self._unranked
        keep = _kept(uids, ids)
        if keep is None:
            return self._unranked
        stale, kept = uids[~keep], []
        for pid, prows in pieces:
            left = _kept(pid, stale)
            if left is not None:
                pid, prows = pid[left], prows[left]
            if pid.size:
                kept.append((pid, prows))
        return uids[keep], kept

    def _room(self, ids: np.ndarray) -> tuple[np.ndarray, int]:
        """(bool [U]: which of the sorted ``ids`` the log holds or stages; map entries left for new rows)."""
        lmap = self._map
        found = lmap.get(ids) >= 0
        sid = np.concatenate([self._staged[0], self._unranked[0]])
        new_staged = int(np.count_nonzero(lmap.get(sid) < 0)) if sid.size else 0  # map entries to come
        if sid.size:
            found |= np.isin(ids, sid)
        return found, self.capacity - self.live - new_staged

    def shortfall(self, ids: np.ndarray) -> int:
        """New rows among the sorted, distinct ``ids`` beyond the map's room (> 0: `compact` first)."""
        if self.live + self.staged + ids.size <= self.capacity:  # room for all, whatever they are
            return -1
        found, room = self._room(ids)
        return int(np.count_nonzero(~found)) - room

    def accepts(self, ids: np.ndarray) -> np.ndarray:
        """bool [U]: which of the sorted, distinct ``ids`` the log takes now: those it holds, and new ones while
        the map has room (the rest go home)."""
        if self.live + self.staged + ids.size <= self.capacity:  # room for all, whatever they are (`shortfall`)
            return np.ones(ids.size, bool)
        found, room = self._room(ids)
        new = np.flatnonzero(~found)
        take = found.copy()
        take[new[:max(0, room)]] = True
        self.stats["log_full"] += int(max(0, new.size - room))
        return take

    def take(self, ids: np.ndarray, rows: np.ndarray, rank: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
        """Append those of rows ``ids`` (int64 [W], sorted, distinct; ``rows`` [W, width] float32; ``rank``: int64 [W]
        or None, as in `append`) the log takes (`accepts`): (bool [W]: taken, device bytes written, device bytes
        read). Thread-safe."""
        with self._lock:
            took = self.accepts(ids)
            if not took.any():
                return took, 0, 0
            written, read = self.append(ids[took], rows[took], None if rank is None else rank[took])
            return took, written, read

    def append(self, ids: np.ndarray, rows: np.ndarray, rank: np.ndarray | None = None) -> tuple[int, int]:
        """Append rows ``ids`` (int64 [W], sorted, distinct, all `accepts`-ed) from ``rows`` ([W, width] float32),
        in increasing (``rank``, position) order (``rank``: int64 [W], e.g. the step each is read back next, so
        rows read together share sectors; None: by ID); (device bytes written, device bytes read) -- reads
        only when a switch moves the live rows. Ranked rows go through the staging area where it has room
        (module doc): those written now are the rank groups that filled `STAGE_GROUP_BYTES`, and the lowest
        ranks beyond the staging limit."""
        with self._lock:
            if rank is not None and self.stage_limit:
                return self._stage(ids, rows, np.asarray(rank, np.int64))
            self._staged = self._staged_without(ids)  # staged copies of rows written now are stale
            self._unranked = self._unranked_without(ids)
            return self._emit(ids, rows, rank)

    def _stage(self, ids: np.ndarray, rows: np.ndarray, rank: np.ndarray) -> tuple[int, int]:
        # a row staged again (normally read -- and so unstaged -- first): its new bytes win
        ids = ids.astype(np.int64, copy=False)
        self._unranked = self._unranked_without(ids)
        sid, srank, srows = self._staged_without(ids)
        rows = np.asarray(rows, np.float32)
        un = rank == UNRANKED
        if un.any():  # no read-back known: they wait together, apart from the rank groups (module doc)
            uids, pieces = self._unranked
            new = ids[un]  # sorted, and none of them in ``uids`` (dropped above): merged in O(n), not re-sorted
            self._unranked = (np.insert(uids, np.searchsorted(uids, new), new), [*pieces, (new, rows[un])])
            ids, rank, rows = ids[~un], rank[~un], rows[~un]
        ids = np.concatenate([sid, ids])
        rank = np.concatenate([srank, rank])
        rows = np.concatenate([srows, rows])
        order = np.argsort(ids, kind="stable")
        ids, rank, rows = ids[order], rank[order], rows[order]
        ranks, of, counts = np.unique(rank, return_inverse=True, return_counts=True)
        go = counts >= self.group  # whole groups
        waiting = np.where(go, 0, counts)
        written = read = 0
        over = int(waiting.sum()) + self._unranked[0].size - self.stage_limit
        if over > 0 and self._unranked[0].size >= self.stage_limit * (1 - STAGE_KEEP):  # the unranked rows go
            over -= self._unranked[0].size  # first, all together, in ID order
            written, read = self._emit_unranked()
        if over > 0:  # the lowest ranks (read back soonest) go too, until `STAGE_KEEP` of the limit is left
            over += self.stage_limit - int(self.stage_limit * STAGE_KEEP)
            go[: int(np.searchsorted(np.cumsum(waiting), over)) + 1] = True
        out = go[of.reshape(-1)]
        self._staged = (ids[~out], rank[~out], rows[~out])
        self.stats["log_staged_peak"] = max(self.stats["log_staged_peak"], self.staged)
        if out.any():
            w, r = self._emit(ids[out], rows[out], rank[out])
            written, read = written + w, read + r
        return written, read

    def _unranked_in_order(self) -> np.ndarray:
        """The unranked staged rows [P, width] in the order of their sorted IDs, its pieces merged into one."""
        uids, pieces = self._unranked
        if len(pieces) > 1:
            rows = np.concatenate([p[1] for p in pieces])[np.argsort(np.concatenate([p[0] for p in pieces]))]
            self._unranked = (uids, [(uids, rows)])
        return self._unranked[1][0][1] if self._unranked[1] else np.empty((0, self.width), np.float32)

    def _emit_unranked(self) -> tuple[int, int]:
        """Write every unranked staged row to the log now, in ID order."""
        uids = self._unranked[0]
        if not uids.size:
            return 0, 0
        rows = self._unranked_in_order()
        self._unranked = (uids[:0], [])
        self.stats["log_unranked_batches"] += 1
        return self._emit(uids, rows, None)

    def unstage(self, ids: np.ndarray | None = None) -> tuple[int, int]:
        """Write the staged rank groups that hold any of rows ``ids`` (int64 [U]; None: every staged row) to
        the log, before they are read or the map is saved -- the unranked rows all together where any is asked
        for: (device bytes written, device bytes read)."""
        sid, uids = self._staged[0], self._unranked[0]
        if ids is not None:
            ids = np.asarray(ids, np.int64)
        if not (sid.size or uids.size) or (ids is not None and not self._find(sid, ids)[0].any()
                                            and not self._find(uids, ids)[0].any()):
            return 0, 0  # the common case, without the lock
        with self._lock:
            written = read = 0
            if self._unranked[0].size and (ids is None or self._find(self._unranked[0], ids)[0].any()):
                written, read = self._emit_unranked()
            sid, srank, srows = self._staged
            if ids is None:
                out = np.ones(sid.size, bool)
            else:
                asked = self._find(np.sort(ids), sid)[0]
                out = np.isin(srank, srank[asked])
            if out.any():
                self._staged = (sid[~out], srank[~out], srows[~out])
                w, r = self._emit(sid[out], srows[out], srank[out])
                written, read = written + w, read + r
            return written, read

    def compact(self, read: Callable[[np.ndarray], np.ndarray],
                write_home: Callable[[np.ndarray, np.ndarray], None]) -> tuple[int, int]:
        """Empty the map (a full one, module doc) but for the rows a later step reads back (module doc, "Kept at
        compaction": moved to the other half): merge its rows with the run's into a new run in the other run
        region, in ID order -- ``read`` (file rows int64 [n] -> [n, width] float32) gets the log's rows, the
        old run is read here in sequential stretches -- or, where the new run would exceed `run_limit`, write
        them all home with ``write_home`` (IDs int64 [n], rows) in sorted batches and start with no run. Then
        appends go on in the other half from its start. Staged rows stay staged (their map entries, if any,
        were older copies). (Device bytes written, device bytes read) here (``read`` and ``write_home``
        count theirs)."""
        with self._lock:
            keys, slots = self._map.merged()
            kept = self._unread.get(slots.astype(np.int64) - self.active * self.half)  # read back later: they stay
            idx = np.flatnonzero(kept)
            if idx.size > self.capacity // 2:  # at most half the map: the oldest (lowest slots)
                kept[idx[np.argsort(slots[idx], kind="stable")][self.capacity // 2 :]] = False
            half, head = self.active, self.head
            keys, slots = keys[~kept], slots[~kept]
            passes = max(1, -(-keys.size * self.stride // GATHER_BYTES))
            gather = passes * head * self.stride < keys.size * SECTOR  # sequential passes read less
            written = nread = 0
            collected = None  # the log's rows to compact, read while the kept rows move (one pass: they fit)
            if kept.any():
                written, nread, collected = self._switch(exclude=keys, collect=gather and passes == 1)
            self.stats["log_kept_rows"] += min(idx.size, self.capacity // 2)
            old = self._run
            bits = old.bits.copy() if old.bits.size else np.zeros(-(-self.num_rows // 64), np.uint64)
            words, add = word_bits(keys.astype(np.int64))
            bits[words] |= add
            new = RunIndex(bits, 1 - old.region, self.num_rows)
            home = new.rows > self.run_limit
            start, tail = self.base + self._run_slot(new.region, 0), np.empty(0, np.uint8)
            cuts = [0, *(int(keys[k * keys.size // passes]) >> 6 for k in range(1, passes)), bits.size]
            for p0, p1 in zip(cuts[:-1], cuts[1:], strict=True):
                pa, pb = np.searchsorted(keys, [64 * p0, 64 * p1])
                if collected is not None:
                    log_rows = collected
                elif gather:  # this pass's log rows, in ID order, from one sequential read of the active half
                    log_rows = np.empty(0)  # the last pass's rows go first
                    log_rows, n = self._gather(slots[pa:pb], half, head)
                    nread += n
                for w0, w1 in self._pieces(new, p0, p1):
                    ids = set_ids(bits, w0, w1)
                    rows = np.empty((ids.size, self.width), np.float32)
                    a, b = np.searchsorted(keys, [64 * w0, 64 * w1])
                    in_log = np.zeros(ids.size, bool)
                    in_log[np.searchsorted(ids, keys[a:b])] = True
                    rows[in_log] = log_rows[a - pa : b - pa] if gather else read(self.base + slots[a:b].astype(np.int64))
                    if not in_log.all():  # the rest: the old run's rows of these words, one sequential stretch
                        lo, hi = old.start(w0), old.start(w1)
                        got, n = self._read(int(self._run_slot(old.region, lo)), int(self._run_slot(old.region, hi)))
                        nread += n
                        rows[~in_log] = got[~np.isin(set_ids(old.bits, w0, w1), keys[a:b], assume_unique=True)]
                    if home:
                        write_home(ids, rows)
                    else:
                        n, tail = self._write_at(start + new.start(w0), tail, rows)
                        written += n
            self._run = RunIndex.empty(self.num_rows) if home else new  # before the map
            if kept.any():  # the kept rows moved to the other half, where appends go on after them
                self._map = self._map.without(keys.astype(np.int64)).flat()
            else:
                self._map = SlotMap(keys[:0], slots[:0])
                self.active, self.head, self._tail = 1 - self.active, 0, np.empty(0, np.uint8)
                self._unread.clear()
            self.stats["log_folds" if home else "log_compactions"] += 1
            self.stats["log_folded_rows"] += int(keys.size)
            self.stats["log_run_rows"] = self._run.rows
            return written, nread

    def _gather(self, slots: np.ndarray, half: int, head: int) -> tuple[np.ndarray, int]:
        """The log's rows at ``slots`` (int32 [n], all in the active half's written part) -> ([n, width] float32,
        device bytes read), read in order in `GATHER_CHUNK` stretches that hold any of them."""
        out = np.empty((slots.size, self.width), np.float32)
        order = np.argsort(slots, kind="stable")
        nread = 0
        for a, b, rows, n in self._stretches(slots[order].astype(np.int64), half * self.half, head, GATHER_CHUNK):
            out[order[a:b]] = rows
            nread += n
            del rows
        return out, nread

    def _stretches(self, slots: np.ndarray, first: int, span: int, chunk_bytes: int):
        """Read the rows at sorted ``slots`` (int64) of [first, first + span) in sequential stretches of about
        ``chunk_bytes`` (whole blocks), skipping stretches that hold none: yields (a, b, the rows at
        ``slots[a:b]`` [b - a, width] float32, device bytes read)."""
        unit = block_rows(self.stride)
        chunk = max(unit, chunk_bytes // self.stride // unit * unit)
        bounds = np.searchsorted(slots, first + np.arange(0, span + chunk, chunk))
        for c in range(bounds.size - 1):
            a, b = int(bounds[c]), int(bounds[c + 1])
            if a < b:
                lo = first + c * chunk
                got, n = self._read(lo, int(slots[b - 1]) + 1, copy=False)
                rows = got[slots[a:b] - lo]
                del got  # neither the buffer nor these rows stay here while the next stretch is read
                yield a, b, rows, n
                del rows

    def _pieces(self, run: RunIndex, w0: int = 0, nw: int | None = None):
        """Word ranges [w0, w1) of ``run``'s bitmap (up to word ``nw``) holding at most ~`FOLD_ROWS` of its IDs and
        `FOLD_WORDS` words."""
        nw = run.bits.size if nw is None else nw
        while w0 < nw:
            w1 = min(nw, w0 + FOLD_WORDS, max(w0 + 1, int(np.searchsorted(run.before, run.start(w0) + FOLD_ROWS))))
            if run.start(w1) > run.start(w0):
                yield w0, w1
            w0 = w1

    def _emit(self, ids: np.ndarray, rows: np.ndarray, rank: np.ndarray | None) -> tuple[int, int]:
        """Write rows ``ids`` (sorted) to the log now, in (``rank``, ID) order (`append` without staging)."""
        written = read = 0
        if self.head + ids.size > self.half:
            written, read, _ = self._switch(exclude=ids)
        order = np.arange(ids.size) if rank is None else np.argsort(np.asarray(rank, np.int64), kind="stable")
        written += self._write(rows[order])
        slots = np.empty(ids.size, np.int32)
        slots[order] = self.active * self.half + self.head - ids.size + np.arange(ids.size)  # ids[order[j]]: j-th new slot
        ranked = np.zeros(ids.size, bool) if rank is None else np.asarray(rank)[order] != UNRANKED
        self._unread.set_range(self.head - ids.size, ranked)  # slot head - n + j: ids[order[j]]
        self._remap(ids, slots)
        self.stats["log_rows"] += int(ids.size)
        return written, read

    def _write(self, rows: np.ndarray) -> int:
        """Rows [n, width] at the active half's head, after its kept partial block (`_write_at`). Device bytes."""
        written, self._tail = self._write_at(self.base + self.active * self.half + self.head, self._tail, rows)
        self.head += rows.shape[0]
        return written

    def _write_at(self, row: int, tail: np.ndarray, rows: np.ndarray) -> tuple[int, np.ndarray]:
        """Rows [n, width] at file row ``row``, the partial block before it (``tail``, its bytes as written) in
        front of them: whole blocks, one write per `MAX_IO`; (device bytes written, the new partial block)."""
        n = rows.shape[0]
        start = row * self.stride
        lo = start // ALIGN * ALIGN
        end = start + n * self.stride
        hi = -(-end // ALIGN) * ALIGN
        buf = aio.aligned_buffer(hi - lo)
        buf[: start - lo] = tail
        body = np.zeros((n, self.stride), np.uint8)
        body[:, : self.width * 4] = np.ascontiguousarray(rows, np.float32).view(np.uint8).reshape(n, -1)
        buf[start - lo : end - lo] = body.reshape(-1)
        buf[end - lo :] = 0
        if self.recent is not None:  # before and after: a read between the two keeps nothing (`RecentSectors`)
            self.recent.drop(lo, hi)
        transfer_all(os.pwritev, self.fd, buf, lo, self.path, "write")
        if self.recent is not None:
            self.recent.drop(lo, hi)
        last = end // ALIGN * ALIGN
        self.stats["log_bytes_written"] += int(buf.size)
        return int(buf.size), buf[last - lo : end - lo].copy()

    def _remap(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Point ``ids`` (sorted) at ``slots`` (int32)."""
        self._map = self._map.with_slots(ids, slots)

    def _switch(self, exclude: np.ndarray, collect: bool = False) -> tuple[int, int, np.ndarray | None]:
        """Move the live rows (but ``exclude``, about to be appended anew, or compacted) to the other half, in slot
        order, reading the old half in `COPY_CHUNK` stretches that hold live rows; appends continue after them.
        (Device bytes written, read; with ``collect``, the rows of the excluded IDs the map holds, [k, width] in ID
        order, read in the same pass -- a compaction's -- else None.)"""
        keys, kslots = self._map.merged()
        keep = ~np.isin(keys, exclude, assume_unique=True)
        take = np.ones(keys.size, bool) if collect else keep
        ids, slots, move = keys[take], kslots[take].astype(np.int64), keep[take]
        order = np.argsort(slots, kind="stable")
        ids, slots, move = ids[order], slots[order], move[order]
        old = self.active
        moved = int(np.count_nonzero(move))
        unread = self._unread.get(slots[move] - old * self.half)
        self._unread.clear()
        self._unread.set_range(0, unread)  # the moved rows' slots, in order, from the new half's start
        self.active, self.head, self._tail = 1 - old, 0, np.empty(0, np.uint8)
        got = np.empty((ids.size - moved, self.width), np.float32) if collect else None
        at = np.cumsum(~move) - 1  # where each collected row goes among them (slot order)
        # every entry keeps its old slot (the old half is intact) until its row's new copy is written
        written = read = 0
        for a, b, rows, nbytes in self._stretches(slots, old * self.half, self.half, COPY_CHUNK):
            read += nbytes
            m = move[a:b]
            if got is not None and not m.all():
                got[at[a:b][~m]] = rows[~m]
            if m.any():
                written += self._write(rows[m] if got is not None else rows)
                k = int(np.count_nonzero(m))
                self._remap_sorted_insert(ids[a:b][m], (self.active * self.half + self.head - k
                                                        + np.arange(k)).astype(np.int32))
        self.stats["log_switches"] += 1
        self.stats["log_moved_rows"] += moved
        if got is not None:
            got = got[np.argsort(ids[~move], kind="stable")]
        return written, read, got

    def _remap_sorted_insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        order = np.argsort(ids, kind="stable")
        self._remap(ids[order], slots[order])

    def _read(self, lo_row: int, hi_row: int, copy: bool = True) -> tuple[np.ndarray, int]:
        """Log rows [lo_row, hi_row) (slots) -> ([n, width] float32, device bytes read: whole blocks); ``copy=False``:
        a view of the read buffer (index it to copy out what is needed)."""
        start, end = (self.base + lo_row) * self.stride, (self.base + hi_row) * self.stride
        lo, hi = start // ALIGN * ALIGN, -(-end // ALIGN) * ALIGN
        buf = aio.aligned_buffer(hi - lo)
        transfer_all(os.preadv, self.fd, buf, lo, self.path, "read")
        self.stats["log_bytes_read"] += int(buf.size)
        rows = buf[start - lo : end - lo].reshape(hi_row - lo_row, self.stride)[:, : self.width * 4]
        return (rows.copy() if copy else rows).view(np.float32), int(buf.size)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        return {"capacity": self.capacity, "active": self.active, "head": self.head, "run_region": self._run.region,
                "run_rows": self._run.rows}

    @staticmethod
    def run_path(path: Path) -> Path:
        """Where `save` keeps the run's bitmap, beside the map at ``path``: ``<path>.run``."""
        return path.with_name(path.name + ".run")

    def save(self, path: Path) -> None:
        """The map as ``path`` (IDs int64, then slots int64) and the run's bitmap as ``<path>.run`` (uint64 words;
        none without a run), written atomically; nothing may be staged (`unstage` first)."""
        assert not self.staged, "unstage the staged rows before the map is saved"
        keys, slots = self._map.merged()
        atomic_write_bytes(path, keys.astype(np.int64).tobytes() + slots.astype(np.int64).tobytes())
        if self._run.rows:
            atomic_write_bytes(self.run_path(path), self._run.bits.tobytes())
        else:
            self.run_path(path).unlink(missing_ok=True)

    def load(self, path: Path, state: dict) -> None:
        """The map, run and position saved by `save` / `state` (the partial block is read back from the file)."""
        data = np.fromfile(path, dtype=np.int64)
        if data.size % 2:
            raise CheckpointError(f"{path}: {data.size * 8} bytes, not pairs of int64 (IDs, slots); truncated?")
        ids, slots = data[: data.size // 2], data[data.size // 2 :]
        if ids.size > self.capacity or (ids.size > 1 and not np.all(ids[1:] > ids[:-1])) or \
                (slots.size and (slots.min() < 0 or slots.max() >= 2 * self.half)):
            raise CheckpointError(f"{path}: not this table's log map (unsorted IDs or slots out of range)")
        run_rows = int(state.get("run_rows", 0))
        if run_rows:
            rpath = self.run_path(path)
            bits = np.fromfile(rpath, dtype=np.uint64) if rpath.is_file() else np.empty(0, np.uint64)
            run = RunIndex(bits, int(state.get("run_region", 1)), self.num_rows)
            if bits.size != -(-self.num_rows // 64) or run.rows != run_rows or run.rows > self.run_limit or \
                    (self.num_rows % 64 and bits[-1] >> np.uint64(self.num_rows % 64)):
                raise CheckpointError(f"{rpath}: not the bitmap of this table's {run_rows:,}-row compacted log "
                                      "(missing, truncated or another table's)")
            self._run = run
        self._map = SlotMap(ids.astype(self.key_dtype), slots.astype(np.int32))
        self.active, self.head = int(state["active"]), int(state["head"])
        start = (self.base + self.active * self.half + self.head) * self.stride
        lo = start // ALIGN * ALIGN
        if start > lo:  # the partial block appends continue in
            buf = aio.aligned_buffer(ALIGN)
            r = os.preadv(self.fd, [memoryview(buf)], lo)  # type: ignore[arg-type]  # numpy stubs: a Buffer on 3.12+ only
            if r < start - lo:
                raise CheckpointError(f"{self.path}: short read of the log's last block at byte {lo}")
            self._tail = buf[: start - lo].copy()

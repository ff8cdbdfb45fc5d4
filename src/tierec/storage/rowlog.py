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
staging area is full, the lowest ranks (read back soonest) go first. A reader never sees staged bytes
in the file: `unstage` writes the rank groups that hold any of the rows asked for (a step's reads are a
rank's rows), and `SsdTable.slots_of` calls it before it maps IDs; `unstage` of everything before the
map is saved or the file is made durable. Exactness is untouched: a row's bytes are the same wherever,
and whenever, they are written.
When the active half is full, the live rows -- the map's entries, at most ``capacity`` -- are copied
to the other half in slot order (the old half read sequentially in chunks that hold live rows), and
appends go on there: at least half of it is free. The old half stays untouched until the next
switch, so a reader that found a row's slot just before a switch still reads the right bytes.

The map is two sorted arrays, IDs and slots (int32; IDs int32 too in a table of fewer than 2^31 rows):
8 B per relocated row (12 in larger tables: `map_entry_bytes`), at most ``capacity`` of them (the
memory budget pays for ``capacity``: `tierec.storage.tiered.split_budget`). When an append finds it
full, the file may fold the log (`fold`, `SsdTable.append_log`): every relocated row is written home in
ID order -- whole blocks, read-modify-write, in large sorted batches -- and the map starts empty. That
pays where the relocated rows share home blocks (a map that holds a large share of its table's rows);
otherwise, and for rows beyond the capacity of one append, a row not in the log goes home with
read-modify-write, as without a log. Exactness: a row's bytes are the same wherever they sit; every
reader maps IDs through `SsdTable.slots_of`, which asks `lookup` first.

`save` / `load` keep the map beside the file (``<file>.log``: IDs int64 then slots int64, and the
active half and head in the sidecar) so that a closed working file opens again.
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
from tierec.storage.blockio import ALIGN


def map_entry_bytes(num_rows: int) -> int:
    """Bytes of one map entry of a table of ``num_rows``: its ID (int32 below 2^31 rows, else int64) and slot (int32)."""
    return 8 if num_rows < 2**31 else 12


COPY_CHUNK = 4 << 20  # bytes of the old half read at a time when the live rows move to the other half
# relocated rows read from the log and written home at a time when a full map folds: a piece reads each row's sectors
# from the log and its home blocks with read-modify-write, up to 4 KiB per row in buffers (16 MiB at 4,096 rows).
# 64K rows peaked ~100 MiB above the budget in a 2,750-step bench_scale --quick run (9 folds)
FOLD_ROWS = 1 << 12
STAGE_GROUP_BYTES = 1024  # a rank's staged rows go to the log once they fill two sectors
STAGED_ROW_OVERHEAD = 16  # bytes of a staged row beside its floats: its ID and rank (int64 each)


def staged_row_bytes(row_stride: int) -> int:
    """Memory of one staged row (module doc): its ``row_stride`` bytes of floats, its ID and its rank."""
    return int(row_stride) + STAGED_ROW_OVERHEAD


def block_rows(row_stride: int, block: int = ALIGN) -> int:
    """Rows of ``row_stride`` bytes in the least whole number of ``block``-byte blocks they fill exactly."""
    return block // math.gcd(row_stride, block)


class RowLog:
    """The log region of one table file (module doc): rows ``base + [0, 2 * half)`` of a file opened with
    O_DIRECT (descriptor ``fd``), rows of ``width`` float32 at ``row_stride`` bytes; at most ``capacity``
    relocated rows; at most ``staged`` ranked rows wait in memory for their rank's group (module doc)."""

    def __init__(self, path: Path, fd: int, base: int, capacity: int, width: int, row_stride: int, num_rows: int,
                 staged: int = 0):
        unit = block_rows(row_stride)
        if base % unit:
            raise ValueError(f"log base row {base} must be a multiple of {unit}")
        self.path, self.fd = path, fd
        self.base, self.capacity = int(base), max(1, int(capacity))
        self.half = self.region_rows(self.capacity, row_stride) // 2  # slots per half, whole blocks
        self.width, self.stride = int(width), int(row_stride)
        # relocated rows (sorted; int32 IDs where the table allows) and their slots in [0, 2 * half) (int32),
        # swapped as one tuple so a reader in another thread never sees one array updated without the other
        self.key_dtype = np.int32 if map_entry_bytes(num_rows) == 8 else np.int64
        self._map: tuple[np.ndarray, np.ndarray] = (np.empty(0, self.key_dtype), np.empty(0, np.int32))
        self.active = 0  # the half appends go to
        self.head = 0  # next free slot of the active half
        self._tail = np.empty(0, np.uint8)  # the active half's last partial block, as written
        self._lock = threading.RLock()  # one appender at a time (head, tail, map capacity, staging)
        # staged rows: IDs (int64 [P], sorted), ranks (int64 [P]), rows ([P, width] float32), swapped as one tuple
        self.stage_limit = max(0, int(staged))
        self.group = max(1, -(-STAGE_GROUP_BYTES // self.stride))  # rows of one rank written together
        self._staged: tuple[np.ndarray, np.ndarray, np.ndarray] = (
            np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, self.width), np.float32))
        self.stats = {"log_rows": 0, "log_switches": 0, "log_moved_rows": 0, "log_full": 0,
                      "log_bytes_written": 0, "log_bytes_read": 0, "log_staged_peak": 0, "log_folds": 0,
                      "log_folded_rows": 0}

    @staticmethod
    def region_rows(capacity: int, row_stride: int) -> int:
        """File rows of the log region of a ``capacity``-row log: two halves of 2 x capacity slots, whole blocks."""
        unit = block_rows(row_stride)
        return 2 * (-(-2 * max(1, int(capacity)) // unit) * unit)

    def reset_stats(self) -> None:
        for k in self.stats:
            self.stats[k] = 0

    @property
    def live(self) -> int:
        """Rows in the log (entries of the map)."""
        return int(self._map[0].size)

    @property
    def staged(self) -> int:
        """Rows waiting in the staging area (module doc)."""
        return int(self._staged[0].size)

    # ------------------------------------------------------------------ lookups
    @staticmethod
    def _find(keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if keys.size == 0:
            return np.zeros(ids.size, bool), np.zeros(ids.size, np.int64)
        ids = ids.astype(keys.dtype, copy=False)  # IDs of the table fit its keys: no copy of the map to compare
        pos = np.minimum(np.searchsorted(keys, ids), keys.size - 1)
        return keys[pos] == ids, pos

    def lookup(self, ids: np.ndarray, home: np.ndarray) -> np.ndarray:
        """File rows of ``ids`` (int64 [U]): their log slots where relocated, else ``home`` (int64 [U])."""
        keys, slots = self._map  # one snapshot
        if keys.size == 0:
            return home
        found, pos = self._find(keys, ids)
        return np.where(found, self.base + slots[pos].astype(np.int64), home)

    def drop(self, ids: np.ndarray) -> None:
        """Forget ``ids`` (their home bytes are current again: written there), staged copies too."""
        with self._lock:
            keys, slots = self._map
            found, pos = self._find(keys, ids)
            if found.any():
                keep = np.ones(keys.size, bool)
                keep[pos[found]] = False
                self._map = (keys[keep], slots[keep])
            self._staged = self._staged_without(np.sort(np.asarray(ids, np.int64)))

    # ------------------------------------------------------------------ appends
    def _staged_without(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The staging area less its copies of rows ``ids`` (int64, sorted): they are stale."""
        sid, srank, srows = self._staged
        if not sid.size or not ids.size:
            return self._staged
        keep = ~self._find(ids, sid)[0]
        return (sid[keep], srank[keep], srows[keep]) if not keep.all() else self._staged

    def _room(self, ids: np.ndarray) -> tuple[np.ndarray, int]:
        """(bool [U]: which of the sorted ``ids`` the log holds or stages; map entries left for new rows)."""
        keys = self._map[0]
        found, _ = self._find(keys, ids)
        sid = self._staged[0]
        new_staged = sid.size - int(self._find(keys, sid)[0].sum()) if sid.size else 0  # map entries to come
        if sid.size:
            found |= self._find(sid, ids)[0]
        return found, self.capacity - self.live - new_staged

    def relocated(self) -> np.ndarray:
        """The IDs of the rows in the log (int64 [live], sorted)."""
        return self._map[0].astype(np.int64)

    def shortfall(self, ids: np.ndarray) -> int:
        """New rows among the sorted, distinct ``ids`` beyond the map's room (> 0: `fold` first, or they go home)."""
        if self.live + self.staged + ids.size <= self.capacity:  # room for all, whatever they are
            return -1
        found, room = self._room(ids)
        return int(np.count_nonzero(~found)) - room

    def accepts(self, ids: np.ndarray) -> np.ndarray:
        """bool [U]: which of the sorted, distinct ``ids`` the log takes now: those it holds, and new ones while
        the map has room (the rest go home)."""
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
            return self._emit(ids, rows, rank)

    def _stage(self, ids: np.ndarray, rows: np.ndarray, rank: np.ndarray) -> tuple[int, int]:
        # a row staged again (normally read -- and so unstaged -- first): its new bytes win
        sid, srank, srows = self._staged_without(ids)
        ids = np.concatenate([sid, ids.astype(np.int64, copy=False)])
        rank = np.concatenate([srank, rank])
        rows = np.concatenate([srows, np.asarray(rows, np.float32)])
        order = np.argsort(ids, kind="stable")
        ids, rank, rows = ids[order], rank[order], rows[order]
        ranks, of, counts = np.unique(rank, return_inverse=True, return_counts=True)
        go = counts >= self.group  # whole groups
        waiting = np.where(go, 0, counts)
        over = int(waiting.sum()) - self.stage_limit
        if over > 0:  # the lowest ranks (read back soonest) go too, until the rest fit
            go[: int(np.searchsorted(np.cumsum(waiting), over)) + 1] = True
        out = go[of.reshape(-1)]
        self._staged = (ids[~out], rank[~out], rows[~out])
        self.stats["log_staged_peak"] = max(self.stats["log_staged_peak"], self.staged)
        return self._emit(ids[out], rows[out], rank[out]) if out.any() else (0, 0)

    def unstage(self, ids: np.ndarray | None = None) -> tuple[int, int]:
        """Write the staged rank groups that hold any of rows ``ids`` (int64 [U]; None: every staged row) to
        the log, before they are read or the map is saved: (device bytes written, device bytes read)."""
        sid = self._staged[0]
        if not sid.size or (ids is not None and not self._find(sid, np.asarray(ids, np.int64))[0].any()):
            return 0, 0  # the common case, without the lock
        with self._lock:
            sid, srank, srows = self._staged
            if ids is None:
                out = np.ones(sid.size, bool)
            else:
                asked = self._find(np.sort(np.asarray(ids, np.int64)), sid)[0]
                out = np.isin(srank, srank[asked])
            if not out.any():
                return 0, 0
            self._staged = (sid[~out], srank[~out], srows[~out])
            return self._emit(sid[out], srows[out], srank[out])

    def fold(self, read: Callable[[np.ndarray], np.ndarray], write_home: Callable[[np.ndarray, np.ndarray], None]) -> int:
        """Write every relocated row home and forget it (a full map, module doc): `FOLD_ROWS` at a time in ID
        order, ``read`` (file rows int64 [n] -> [n, width] float32) gets them from the log and ``write_home``
        (IDs int64 [n], rows) writes them at their home rows; then the map is empty and appends go on in the
        other half from its start, so a reader that found a slot before the fold still reads the right bytes.
        Staged rows stay staged (their map entries, if any, were older copies). Rows folded."""
        with self._lock:
            keys, slots = self._map
            for a in range(0, keys.size, FOLD_ROWS):
                ids = keys[a : a + FOLD_ROWS].astype(np.int64)
                write_home(ids, read(self.base + slots[a : a + FOLD_ROWS].astype(np.int64)))
            self._map = (keys[:0], slots[:0])
            self.active, self.head, self._tail = 1 - self.active, 0, np.empty(0, np.uint8)
            self.stats["log_folds"] += 1
            self.stats["log_folded_rows"] += int(keys.size)
            return int(keys.size)

    def _emit(self, ids: np.ndarray, rows: np.ndarray, rank: np.ndarray | None) -> tuple[int, int]:
        """Write rows ``ids`` (sorted) to the log now, in (``rank``, ID) order (`append` without staging)."""
        written = read = 0
        if self.head + ids.size > self.half:
            w, read = self._switch(exclude=ids)
            written += w
        order = np.arange(ids.size) if rank is None else np.argsort(np.asarray(rank, np.int64), kind="stable")
        written += self._write(rows[order])
        slots = np.empty(ids.size, np.int32)
        slots[order] = self.active * self.half + self.head - ids.size + np.arange(ids.size)  # ids[order[j]]: j-th new slot
        self._remap(ids, slots)
        self.stats["log_rows"] += int(ids.size)
        return written, read

    def _write(self, rows: np.ndarray) -> int:
        """Rows [n, width] at the active half's head, the kept partial block before them: whole blocks, one
        write per `MAX_IO`; the new partial block is kept. Device bytes written."""
        n = rows.shape[0]
        start = (self.base + self.active * self.half + self.head) * self.stride
        lo = start // ALIGN * ALIGN
        end = start + n * self.stride
        hi = -(-end // ALIGN) * ALIGN
        buf = aio.aligned_buffer(hi - lo)
        buf[: start - lo] = self._tail
        body = np.zeros((n, self.stride), np.uint8)
        body[:, : self.width * 4] = np.ascontiguousarray(rows, np.float32).view(np.uint8).reshape(n, -1)
        buf[start - lo : end - lo] = body.reshape(-1)
        buf[end - lo :] = 0
        transfer_all(os.pwritev, self.fd, buf, lo, self.path, "write")
        last = end // ALIGN * ALIGN
        self._tail = buf[last - lo : end - lo].copy()
        self.head += n
        self.stats["log_bytes_written"] += int(buf.size)
        return int(buf.size)

    def _remap(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Point ``ids`` (sorted) at ``slots``: update the entries present, insert the new ones in order."""
        keys, old = self._map
        found, pos = self._find(keys, ids)
        new_slots = old.copy()
        new_slots[pos[found]] = slots[found]
        new = ~found
        if new.any():
            at = np.searchsorted(keys, ids[new])
            keys, new_slots = np.insert(keys, at, ids[new].astype(keys.dtype)), np.insert(new_slots, at, slots[new])
        self._map = (keys, new_slots)

    def _switch(self, exclude: np.ndarray) -> tuple[int, int]:
        """Move the live rows (but ``exclude``, about to be appended anew) to the other half, in slot order,
        reading the old half in `COPY_CHUNK` pieces that hold live rows; appends continue after them."""
        keys, kslots = self._map
        keep = ~np.isin(keys, exclude, assume_unique=True)
        ids, slots = keys[keep], kslots[keep].astype(np.int64)
        order = np.argsort(slots, kind="stable")
        ids, slots = ids[order], slots[order]
        old = self.active
        self.active, self.head, self._tail = 1 - old, 0, np.empty(0, np.uint8)
        # every entry keeps its old slot (the old half is intact) until its row's new copy is written
        chunk_rows = max(1, COPY_CHUNK // self.stride) // block_rows(self.stride) * block_rows(self.stride)
        chunk_rows = max(chunk_rows, block_rows(self.stride))
        written = read = 0
        first = old * self.half
        bounds = np.searchsorted(slots, first + np.arange(0, self.half + chunk_rows, chunk_rows))
        for c in range(bounds.size - 1):
            a, b = int(bounds[c]), int(bounds[c + 1])
            if a == b:
                continue
            lo_row = first + c * chunk_rows
            hi_row = min(first + self.half, int(slots[b - 1]) + 1)
            got, nbytes = self._read(lo_row, hi_row)
            read += nbytes
            moved = got[slots[a:b] - lo_row]
            written += self._write(moved)
            self._remap_sorted_insert(ids[a:b], (self.active * self.half + self.head - (b - a)
                                                 + np.arange(b - a)).astype(np.int32))
        self.stats["log_switches"] += 1
        self.stats["log_moved_rows"] += int(ids.size)
        return written, read

    def _remap_sorted_insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        order = np.argsort(ids, kind="stable")
        self._remap(ids[order], slots[order])

    def _read(self, lo_row: int, hi_row: int) -> tuple[np.ndarray, int]:
        """Log rows [lo_row, hi_row) (slots) -> ([n, width] float32, device bytes read: whole blocks)."""
        start, end = (self.base + lo_row) * self.stride, (self.base + hi_row) * self.stride
        lo, hi = start // ALIGN * ALIGN, -(-end // ALIGN) * ALIGN
        buf = aio.aligned_buffer(hi - lo)
        transfer_all(os.preadv, self.fd, buf, lo, self.path, "read")
        self.stats["log_bytes_read"] += int(buf.size)
        rows = buf[start - lo : end - lo].reshape(hi_row - lo_row, self.stride)[:, : self.width * 4]
        return rows.copy().view(np.float32), int(buf.size)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        return {"capacity": self.capacity, "active": self.active, "head": self.head}

    def save(self, path: Path) -> None:
        """The map as ``path`` (IDs int64, then slots int64), written by the caller atomically; nothing may be
        staged (`unstage` first)."""
        assert not self.staged, "unstage the staged rows before the map is saved"
        keys, slots = self._map
        atomic_write_bytes(path, keys.astype(np.int64).tobytes() + slots.astype(np.int64).tobytes())

    def load(self, path: Path, state: dict) -> None:
        """The map and position saved by `save` / `state` (the partial block is read back from the file)."""
        data = np.fromfile(path, dtype=np.int64)
        if data.size % 2:
            raise CheckpointError(f"{path}: {data.size * 8} bytes, not pairs of int64 (IDs, slots); truncated?")
        ids, slots = data[: data.size // 2], data[data.size // 2 :]
        if ids.size > self.capacity or (ids.size > 1 and not np.all(ids[1:] > ids[:-1])) or \
                (slots.size and (slots.min() < 0 or slots.max() >= 2 * self.half)):
            raise CheckpointError(f"{path}: not this table's log map (unsorted IDs or slots out of range)")
        self._map = (ids.astype(self.key_dtype), slots.astype(np.int32))
        self.active, self.head = int(state["active"]), int(state["head"])
        start = (self.base + self.active * self.half + self.head) * self.stride
        lo = start // ALIGN * ALIGN
        if start > lo:  # the partial block appends continue in
            buf = aio.aligned_buffer(ALIGN)
            r = os.preadv(self.fd, [memoryview(buf)], lo)  # type: ignore[arg-type]  # numpy stubs: a Buffer on 3.12+ only
            if r < start - lo:
                raise CheckpointError(f"{self.path}: short read of the log's last block at byte {lo}")
            self._tail = buf[: start - lo].copy()

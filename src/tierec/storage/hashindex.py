"""An open-addressing hash map int64 ID -> int slot in two tensors, every operation vectorised.

Used wherever a structure of C entries must find IDs from a space far larger than C: a cache's
resident rows (`tierec.storage.cache`), the look-ahead oracle's latest occurrences, a dynamic
table's raw 64-bit IDs (`tierec.storage.dynamic`). Memory is O(C), never O(ID space).
The key ``EMPTY`` (-1) and ``TOMB`` (-2) mark free entries: they cannot be stored (0 and 1 instead in a map
over zero-filled `SpillArrays`, which may live in files on the SSD tier).
"""

from __future__ import annotations

import torch

from tierec.masks import any_true, count, select, where
from tierec.storage.spill import SpillArrays

GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64 (Fibonacci hashing)
EMPTY, TOMB = -1, -2
ZERO_EMPTY = (0, 1)  # (empty, tombstone) of a map whose tables come zero-filled (`SpillArrays`)


class HashIndex:
    """Open-addressing hash map id -> slot in two tensors (linear probing, vectorised probing).

    ``H`` = a power of two >= 4 x capacity entries (int64 key, int32 slot): 48-96 B
    per cached row, O(capacity), never O(table). Every operation probes all its IDs
    at once; the Python loop runs over probe *rounds* (about 1-2 on average, rarely
    over ten), each round on the IDs still unresolved. Deleted entries become
    tombstones; the map is rebuilt from the live entries when live + tombstones
    exceed 3/8 of H, so probe runs stay short (at a 1/2 fill a batch's longest runs
    took tens of rounds; docs/storage.md).
    """

    WINDOW = 8  # entries of a probe run compared at once
    # IDs probed at once by `insert` and the windowed part of `lookup`: a probe holds ~150 B per ID in
    # temporaries ([n, WINDOW] positions, keys and masks), so a look-ahead oracle rebuilding its map from
    # 200K IDs held ~30 MB for a moment (bench_scale --quick); in chunks, at most ~5 MB
    PROBE_CHUNK = 1 << 15

    def __init__(self, capacity: int, device, val_dtype: torch.dtype = torch.int32, arrays: SpillArrays | None = None):
        self.bits = self.table_bits(capacity)
        self.H = 1 << self.bits
        self.mask = self.H - 1
        self.device = device
        self.val_dtype = val_dtype
        # ``arrays``: the two tables come zero-filled from there (in memory or spilled to files), so the empty
        # key is 0 and the tombstone 1 (`ZERO_EMPTY`): the caller folds keys 0 and 1 away
        self.arrays = arrays
        self.empty, self.tombstone = ZERO_EMPTY if arrays is not None else (EMPTY, TOMB)
        self.keys, self.vals = self._tables()
        self.live = self.tomb = 0
        self._offsets = torch.arange(self.WINDOW, device=device)

    @staticmethod
    def table_bits(capacity: int) -> int:
        """log2 of the entries of a map for ``capacity`` IDs: the least power of two >= 4 x capacity (at least 16)."""
        return max(4, (4 * int(capacity) - 1).bit_length())

    @classmethod
    def bytes_for(cls, capacity: int, val_dtype: torch.dtype = torch.int32) -> int:
        """Bytes of the two tables of a map for ``capacity`` IDs (int64 keys + ``val_dtype`` values), as built."""
        return (8 + torch.empty(0, dtype=val_dtype).element_size()) << cls.table_bits(capacity)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.arrays is not None:
            return self.arrays.zeros(self.H, torch.int64), self.arrays.zeros(self.H, self.val_dtype)
        return (torch.full((self.H,), EMPTY, dtype=torch.int64, device=self.device),
                torch.full((self.H,), -1, dtype=self.val_dtype, device=self.device))

    @property
    def max_fill(self) -> int:
        """Live entries + tombstones allowed before a rebuild: 3/8 of H (live <= H/4), so probe runs
        stay short and a full cache rebuilds only after capacity/2 deletions."""
        return 3 * self.H // 8

    def _hash(self, ids: torch.Tensor) -> torch.Tensor:
        return ((ids * GOLDEN) >> (64 - self.bits)) & self.mask  # high bits of the product

    def _window(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries ``pos``, ``pos`` + 1, ... ``pos`` + WINDOW - 1 (mod H): (positions, keys), both [n, WINDOW]."""
        win = (pos.unsqueeze(1) + self._offsets) & self.mask
        return win, self.keys.index_select(0, win.view(-1)).view(win.shape)

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [U] -> (found bool [U], slot int64 [U] (valid where found), table position [U] (valid where
        found)). Each ID's home entry is compared first (at a fill of 1/4 or less most runs end there: the
        ID or an empty entry); the others compare the next WINDOW entries of their run at once, and only
        runs longer than that probe further, one entry per round."""
        pos = self._hash(ids)
        k = self.keys.index_select(0, pos)
        found = k == ids
        rest = ~(found | (k == self.empty))
        if not any_true(rest):
            return found, self.vals.index_select(0, pos).long(), pos
        slot = self.vals.index_select(0, pos).long()
        for idx in where(rest).split(self.PROBE_CHUNK):
            f, s, p = self._lookup_run(ids.index_select(0, idx), (pos.index_select(0, idx) + 1) & self.mask)
            found.index_copy_(0, idx, f)
            slot.index_copy_(0, idx, s)
            pos.index_copy_(0, idx, p)
        return found, slot, pos

    def _lookup_run(self, ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`lookup` of ``ids`` whose probe runs go on from entries ``pos``: WINDOW entries at once, then one by one."""
        win, k = self._window(pos)
        # the first entry of each run that is the ID or empty (an ID is never stored past an empty entry
        # of its run); none in the window: the run goes on
        stop, j = ((k == ids.unsqueeze(1)) | (k == self.empty)).max(1, keepdim=True)
        found = k.gather(1, j).squeeze(1) == ids
        pos = win.gather(1, j).squeeze(1)
        slot = self.vals.index_select(0, pos).long()
        pend = ~stop.squeeze(1)
        if any_true(pend):  # runs longer than the window: continue one entry per round
            idx = where(pend)
            p, cur = (pos.index_select(0, idx) + self.WINDOW - 1) & self.mask, ids.index_select(0, idx)
            while idx.numel():
                p = (p + 1) & self.mask
                k = self.keys.index_select(0, p)
                f = k == cur
                if bool(f.any()):
                    fi, fp = idx[f], p[f]
                    found[fi] = True
                    slot[fi] = self.vals.index_select(0, fp).long()
                    pos[fi] = fp
                cont = (~f) & (k != self.empty)
                idx, p, cur = idx[cont], p[cont], cur[cont]
        return found, slot, pos

    def insert(self, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Insert ``ids`` (unique, none present) -> ``slots``; returns each ID's table position (int64 [n],
        valid until the next `rebuild`: `remove_at` takes them). Each ID claims the first free entry
        (empty or tombstone) in the window of its run; IDs of the batch that chose the same entry get
        one winner, and the others go on from there."""
        n = ids.numel()
        if n == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        if self.live + self.tomb + n > self.max_fill and self.tomb:
            raise NeedsRebuild
        slots = slots.to(self.vals.dtype)
        parts = [self._insert(i, s) for i, s in zip(ids.split(self.PROBE_CHUNK), slots.split(self.PROBE_CHUNK),
                                                    strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _insert(self, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """`insert` of at most `PROBE_CHUNK` IDs (the checks done)."""
        n = ids.numel()
        p = self._hash(ids)
        # home entries first, as `lookup` does: at a fill of 3/8 or less most are free, and one gather per ID settles
        # them (a window costs WINDOW); the others -- home taken, or claimed by another ID of the batch -- go on
        # from the entry after it
        k = self.keys.index_select(0, p)
        won = self._claim(p, k, ids, slots)
        out = p.clone()  # the others' entries are overwritten below
        lost = ~won
        if not any_true(lost):
            self.live += n
            return out
        idx = where(lost)  # positions in the input of the IDs still to place
        ids, slots, p = ids.index_select(0, idx), slots.index_select(0, idx), (p.index_select(0, idx) + 1) & self.mask
        while ids.numel():  # rounds: one per window passed or race lost (usually a single round)
            win, k = self._window(p)
            has, j = ((k == self.empty) | (k == self.tombstone)).max(1, keepdim=True)  # the first free entry (any ID may be < 0)
            has = has.squeeze(1)
            fp = win.gather(1, j).squeeze(1)
            lost = ~self._claim(fp, k.gather(1, j).squeeze(1), ids, slots)
            out.index_copy_(0, idx, fp)
            if not any_true(lost):
                break
            idx, ids, slots, p = select(lost, idx, ids, slots, torch.where(has, fp + 1, p + self.WINDOW) & self.mask)
        self.live += n
        return out

    def _claim(self, pos: torch.Tensor, was: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Each of ``ids`` claims entry ``pos`` (holding key ``was``) where that entry is free; IDs of the batch
        on one entry get one winner. Returns bool [n]: the IDs stored (their slots written)."""
        free = (was == self.empty) | (was == self.tombstone)
        at, put = select(free, pos, ids)
        self.keys.index_put_((at,), put)  # several IDs on one entry: one of them stays
        won = free & (self.keys.index_select(0, pos) == ids)
        at, put, was = select(won, pos, slots, was)
        self.vals.index_put_((at,), put)
        self.tomb -= count(was == self.tombstone)
        return won

    def remove(self, ids: torch.Tensor) -> None:
        """Delete ``ids`` (all present)."""
        if ids.numel() == 0:
            return
        found, _, pos = self.lookup(ids)
        assert bool(found.all()), "removing an id that is not cached"
        self.remove_at(pos)

    def remove_at(self, pos: torch.Tensor) -> None:
        """Delete the live entries at table positions ``pos`` (from `insert` or `lookup`), without a lookup."""
        if pos.numel() == 0:
            return
        self.keys.index_fill_(0, pos, self.tombstone)
        self.vals.index_fill_(0, pos, -1)
        self.live -= pos.numel()
        self.tomb += pos.numel()

    def rebuild(self, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Empty the map and insert ``ids`` -> ``slots``; returns their positions (all others are void)."""
        self.reset()
        return self.insert(ids, slots)

    def reset(self) -> None:
        """Empty the map (spilled tables: new zero-filled files, O(1))."""
        if self.arrays is not None:
            self.keys, self.vals = self._tables()
        else:
            self.keys.fill_(EMPTY)
            self.vals.fill_(-1)
        self.live = self.tomb = 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.vals.nbytes


class NeedsRebuild(Exception):
    """`HashIndex.insert` would pass the fill limit with tombstones present: rebuild from the live entries."""

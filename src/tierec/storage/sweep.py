"""Finding many IDs among a cache's rows in one ascending sweep of the ID space, without its hash map.

A checkpoint reads every changed row of a table in ID order, ~10M at the scale of issue #18. Through a
cache's `HashIndex` each ID is a random probe into a map 4-8x the cache's size (and, after many
evictions, its tombstones): ~100 ns per ID. `SortedSweep` finds them instead in the cached IDs
sorted, a span of the ID space at a time:

1. Once: the cached IDs (the cache's slot -> ID [size]) are counted in 4,096 bins of the ID space.
2. At the first piece past the current span: a new span begins at that piece's first ID and takes
   whole bins until it holds about `SPAN_ROWS` cached rows (and at least the whole piece). One scan
   of the slots' IDs picks its rows; they are sorted by ID (each packed with its slot into one int64,
   ``id << slot_bits | slot``, where that fits: a plain sort, no argsort).
3. Each piece (sorted IDs): a binary search in the span's sorted IDs; a hit where the ID is there.

The answer is the hash map's (the same slot for each cached ID, a miss for every other), as long as
the cache does not change during the sweep: its owner makes one per bulk read, with nothing else
running. Memory: ~20 B per row of one span at its peak (12 MiB kept at `SPAN_ROWS` = 1M: the IDs sorted and
their int32 slots), never a copy of the whole cache; time: one scan of the slot IDs per span and a sort of each
cached row once.
"""

from __future__ import annotations

import numpy as np
import torch

BINS_LOG2 = 12  # the ID space in 4,096 bins: spans are whole bins
SCAN_SLOTS = 1 << 20  # slots compared at once when a span picks its rows


class SortedSweep:
    """`find` for pieces of IDs in ascending order (each sorted, each above the last), over cached rows whose
    IDs are ``slot_ids`` (int64 [size], slot -> ID; unchanged while the sweep lasts) in an ID space of
    ``num_ids``. See the module doc."""

    SPAN_ROWS = 1 << 20

    def __init__(self, slot_ids: torch.Tensor, num_ids: int):
        self.sid, self.device = slot_ids, slot_ids.device
        self.shift = max(0, (max(int(num_ids), 2) - 1).bit_length() - BINS_LOG2)
        self.slot_bits = max(1, (max(int(slot_ids.numel()), 2) - 1).bit_length())
        self.packed = (int(num_ids) << self.slot_bits) < (1 << 63)
        bins = np.bincount(slot_ids.cpu().numpy() >> self.shift, minlength=1 << BINS_LOG2)
        self.below = np.concatenate(([0], np.cumsum(bins)))  # cached rows in bins [0, b)
        self.end = -1  # the span holds the cached rows of IDs [.., end)
        self.keys = self.slots = torch.empty(0, dtype=torch.int64, device=self.device)

    def find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [U] (sorted, none below an earlier piece's) -> (hit bool [U], slot int64 [U]; valid where hit)."""
        if ids.numel() == 0:
            return torch.zeros(0, dtype=torch.bool, device=self.device), ids.clone()
        if int(ids[-1]) >= self.end:
            self._span(int(ids[0]), int(ids[-1]))
        if self.keys.numel() == 0:
            return torch.zeros(ids.numel(), dtype=torch.bool, device=self.device), torch.zeros_like(ids)
        pos = torch.searchsorted(self.keys, ids).clamp_(max=self.keys.numel() - 1)
        return self.keys.index_select(0, pos) == ids, self.slots.index_select(0, pos).long()

    def _span(self, first: int, last: int) -> None:
        """The cached rows of the bins from ``first``'s on: about `SPAN_ROWS` of them, and at least to ``last``."""
        b0 = first >> self.shift
        b1 = max(int(np.searchsorted(self.below, self.below[b0] + self.SPAN_ROWS, side="right")) - 1, b0 + 1,
                 (last >> self.shift) + 1)
        lo, hi = b0 << self.shift, b1 << self.shift
        self.end = hi
        if self.device.type != "cpu":  # a device cache: torch all the way (a sort there is fast)
            at = ((self.sid >= lo) & (self.sid < hi)).nonzero().squeeze(1)
            self.keys, order = torch.sort(self.sid.index_select(0, at))
            self.slots = at.index_select(0, order)
            return
        sid = self.sid.numpy()  # on the CPU numpy's sort is ~7x torch's for int64 (numpy 2.4, torch 2.13)
        sl = np.concatenate([np.flatnonzero((sid[a : a + SCAN_SLOTS] >= lo) & (sid[a : a + SCAN_SLOTS] < hi)) + a
                             for a in range(0, sid.size, SCAN_SLOTS)])  # a slice of the slots at a time: small masks
        small = np.int32 if self.slot_bits < 32 else np.int64
        if self.packed:  # ID and slot in one int64: a plain sort, both taken back out in place
            key = sid[sl]
            key <<= self.slot_bits
            key |= sl
            del sl
            key.sort()
            self.slots = torch.from_numpy((key & ((1 << self.slot_bits) - 1)).astype(small))
            key >>= self.slot_bits
            self.keys = torch.from_numpy(key)
        else:
            by_id = np.argsort(sid[sl], kind="stable")
            self.keys, self.slots = torch.from_numpy(sid[sl[by_id]]), torch.from_numpy(sl[by_id].astype(small))

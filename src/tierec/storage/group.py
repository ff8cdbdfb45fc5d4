"""Several tables behind ONE look-ahead cache: rows linearized, as FBGEMM's table-batched embeddings do.

A step of a DLRM looks up every table. With one `LookaheadCache` per table the
prefetch worker does every piece of cache bookkeeping once per table per step
(hash probes, victim selection, oracle updates, row copies: ~10 small kernels
each); with the tables *grouped* it does each once per step, over all tables'
rows at once. Row ``r`` of member ``t`` is row ``offsets[t] + r`` of the group.

* `tierec.storage.concat.ConcatTable` is the group's backing store: the members' own
  stores (`SsdTable` files, one per table, unchanged on disk) seen as one table.
* `TableGroup` owns the cache over the `ConcatTable` (capacity: the sum of the
  members' cache rows, shared: eviction by next use across all tables) and hands
  out one `TableView` per member.
* `TableView` is what the member's `EmbeddingBag` holds (a `TableStorage` in the
  member's own row numbers), for lookups outside the step protocol (evaluation,
  checkpoints): a window on the group's cache. During look-ahead training the
  driver (`tierec.train.pipeline.LookaheadPipeline`) prepares the group's step
  once and hands each member its slice (`TableGroup.space` says where each
  member's rows are), and releases the group's working set once all are back.

The cache is created on first use (`TableGroup.cache`): members join while the
model is built; until then a view reads and writes its member's store directly
(nothing is cached yet, so that is exact).

Exactness is the cache's: grouping changes which rows are resident, never a
row's value.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from tierec.storage.base import RowStore, WorkingSet
from tierec.storage.concat import ConcatTable
from tierec.storage.lazy import LazyRows
from tierec.storage.lookahead import LookaheadCache
from tierec.storage.rowspace import RowSpace

log = logging.getLogger(__name__)


@dataclass
class _ViewHandle:
    view: TableView
    inner: WorkingSet  # the temporary working set of the group's cache
    released: bool = False


class TableGroup:
    """One look-ahead cache (``cache_rows`` and ``host_rows`` summed over the members) for the tables
    `add`-ed to it; see the module doc. ``device``: where the cache lives; ``host_rows`` > 0 puts a
    host-DRAM look-ahead tier of that many rows between it and the files."""

    def __init__(self, name: str = "group", device="cpu", io_threads: int | None = None, neighbours: bool = True):
        self.name, self.device, self.io_threads = name, torch.device(device), io_threads
        self.neighbours = neighbours  # the cache right above the files takes block neighbours (`LookaheadCache`)
        self.members: list[tuple[str, RowStore]] = []
        self.cache_rows = self.host_rows = 0
        self.views: list[TableView] = []
        self._cache: LookaheadCache | None = None

    def add(self, backing: RowStore, cache_rows: int, name: str, host_rows: int = 0, feature: str | None = None) -> TableView:
        """Join table ``name`` (its store ``backing``; ``feature``: the sparse key it serves, default
        ``name``); returns its view. Only before first use."""
        if self._cache is not None:
            raise RuntimeError(f"table group {self.name!r} is in use; table {name!r} cannot join it now")
        off = sum(b.num_embeddings for _, b in self.members)
        self.members.append((name, backing))
        self.cache_rows += int(cache_rows)
        self.host_rows += int(host_rows)
        view = TableView(self, len(self.views), name, backing, off, feature or name)
        self.views.append(view)
        return view

    @property
    def built(self) -> bool:
        return self._cache is not None

    @property
    def space(self) -> RowSpace:
        """The members' rows as the cache numbers them (member ``t``'s row ``r`` is ``offset(t) + r``)."""
        return RowSpace([b.num_embeddings for _, b in self.members])

    @property
    def cache(self) -> LookaheadCache:
        """The group's `LookaheadCache` (created on first access; no member can join after)."""
        if self._cache is None:

            names = [n for n, _ in self.members]
            below: ConcatTable | LookaheadCache = ConcatTable([b for _, b in self.members], self.io_threads, names)
            if self.host_rows:
                below = LookaheadCache(below, self.host_rows, device="cpu", name=f"{self.name}@host",
                                       neighbours=self.neighbours)
            self._cache = LookaheadCache(below, self.cache_rows, device=self.device, name=self.name,
                                         neighbours=self.neighbours)
            log.info("table group %s: %d tables (%s) behind one look-ahead cache of %d rows%s", self.name,
                     len(names), ", ".join(names), self._cache.capacity,
                     f" (host tier {self.host_rows} rows)" if self.host_rows else "")
        return self._cache

class TableView:
    """Member ``name`` of a `TableGroup`, as a `TableStorage` in its own row numbers [0, num_embeddings)."""

    def __init__(self, group: TableGroup, index: int, name: str, backing: RowStore, offset: int,
                 feature: str | None = None):
        self.group, self.index, self.name, self.backing, self.offset = group, index, name, backing, offset
        self.feature = feature or name
        self.num_embeddings, self.dim, self.state_dim = backing.num_embeddings, backing.dim, backing.state_dim

    def acquire(self, ids: torch.Tensor) -> WorkingSet:
        """A temporary copy of rows ``ids`` (outside the step protocol: see the module doc)."""
        c = self.group.cache
        inner = c.acquire(ids.to(c.device) + self.offset)
        return WorkingSet(ids, inner.index, inner.weight, inner.state, handle=_ViewHandle(self, inner))

    def release(self, ws: WorkingSet, dirty: bool) -> None:
        h = ws.handle
        if not isinstance(h, _ViewHandle) or h.view is not self:
            raise ValueError(f"table {self.name!r}: working set was not acquired from this table")
        if h.released:
            raise RuntimeError(f"table {self.name!r}: working set released twice")
        h.released = True
        self.group.cache.release(h.inner, dirty)

    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``ids`` (unique) with the newest values, outside the step protocol (checkpoints)."""
        if not self.group.built:
            return self.backing.read(ids)
        return self.group.cache.read(ids.to(self.group.cache.device) + self.offset)

    def read_each(self, pieces: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """`read` of each piece of IDs in turn, joined (`TableStorage.read_each`): the cache's, which reads its misses
        ahead (`LookaheadCache.read_each`)."""
        if not self.group.built:
            return self.backing.read_each(pieces)
        c = self.group.cache
        return c.read_each(ids.to(c.device) + self.offset for ids in pieces)

    def write(self, ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> None:
        """Store rows ``ids`` (unique), outside the step protocol (loading a checkpoint)."""
        if not self.group.built:
            self.backing.write(ids, weight, state)
        else:
            self.group.cache.write(ids.to(self.group.cache.device) + self.offset, weight, state)

    def read_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= start <= end <= self.num_embeddings:
            raise IndexError(f"table {self.name!r}: rows [{start}, {end}) out of range [0, {self.num_embeddings})")
        if not self.group.built:
            return self.backing.read_rows(start, end)
        return self.group.cache.read_rows(self.offset + start, self.offset + end)

    def write_rows(self, start: int, weight: torch.Tensor, state: torch.Tensor) -> None:
        if not 0 <= start <= start + weight.shape[0] <= self.num_embeddings:
            raise IndexError(f"table {self.name!r}: rows [{start}, {start + weight.shape[0]}) out of range "
                             f"[0, {self.num_embeddings})")
        if not self.group.built:
            self.backing.write_rows(start, weight, state)
        else:
            self.group.cache.write_rows(self.offset + start, weight, state)

    def flush(self) -> None:
        if self.group.built:
            self.group.cache.flush()
        else:
            self.backing.flush()

    def lazy_rows(self) -> LazyRows | None:
        """The member's own store's (the group's cache marks the rows it changes there)."""
        return self.backing.lazy_rows()

    def stats(self) -> dict:
        """The group's cache counters (shared by all members: `tierec.train.trainer.cache_stats` lists
        them once, under the group's name)."""
        return self.group.cache.stats()

    def __repr__(self) -> str:
        return f"TableView({self.name!r} of group {self.group.name!r}, rows [{self.offset}, " \
               f"{self.offset + self.num_embeddings}))"

"""Several tables behind ONE look-ahead cache: rows linearized, as FBGEMM's table-batched embeddings do.

A step of a DLRM looks up every table. With one `LookaheadCache` per table the
prefetch worker does every piece of cache bookkeeping once per table per step
(hash probes, victim selection, oracle updates, row copies: ~10 small kernels
each); with the tables *grouped* it does each once per step, over all tables'
rows at once. Row ``r`` of member ``t`` is row ``offsets[t] + r`` of the group.

* `ConcatTable` is the group's backing store: the members' own stores (`SsdTable`
  files, one per table, unchanged on disk) seen as one table; every batched call
  is split by member and run on the members (in parallel threads when several
  members have work).
* `TableGroup` owns the cache over the `ConcatTable` (capacity: the sum of the
  members' cache rows, shared: eviction by next use across all tables) and hands
  out one `TableView` per member.
* `TableView` is what the member's `EmbeddingBag` holds (a `TableStorage` in the
  member's own row numbers). During look-ahead training each view's ``acquire``
  takes its slice of the step's prepared working set; when every member has
  released its slice, the group's working set is released at once.

The cache is created on first use (`TableGroup.cache`): members join while the
model is built; until then a view reads and writes its member's store directly
(nothing is cached yet, so that is exact).

Exactness is the cache's: grouping changes which rows are resident, never a
row's value.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from tierec.errors import ConfigError
from tierec.storage.base import WorkingSet
from tierec.storage.cache import sort_ids, unsort

log = logging.getLogger(__name__)


def default_io_threads(stores=None) -> int:
    """Prefetch threads for ``stores`` (tables whose I/O may run in parallel). Tables whose SSD files are
    read by batched Linux AIO (O_DIRECT) spend their prefetch time waiting on the device with the GIL
    released, so 4 threads overlap four tables' I/O at little CPU cost (2-core VM, 8 tables: 196 ms vs
    301 ms per step, stall 16% vs 51%). Otherwise (buffered or memory-mapped files: the reads cost CPU)
    one per two cores beyond the trainer's, at most 4; on 2 cores one thread, as more only contend with
    the trainer (measured: 1.31x vs 1.06x the in-memory step)."""
    if stores and all(_reads_by_aio(s) for s in stores):
        return 4
    return max(1, min(4, (os.cpu_count() or 2) // 2 - 1))


def _reads_by_aio(store) -> bool:
    """True if every file under ``store`` (a chain of tiers, or a `ConcatTable`) is an O_DIRECT
    `SsdTable` read by Linux AIO."""
    from tierec.storage import aio
    from tierec.storage.ssd import SsdTable

    b = store
    while hasattr(b, "backing"):
        b = b.backing
    if isinstance(b, ConcatTable):
        return all(_reads_by_aio(t) for t in b.tables)
    return isinstance(b, SsdTable) and b.odirect and aio.available()


class ConcatTable:
    """``tables`` (`TableStorage` with ``read``/``write``, same ``dim`` and ``state_dim``) as one table of
    ``sum(num_embeddings)`` rows: row ``offsets[t] + r`` is row ``r`` of ``tables[t]``.

    ``read``, ``write`` and ``exchange`` split their IDs by member and run each member's part (with
    up to ``io_threads`` members at once); ``read_rows``/``write_rows`` may span members."""

    def __init__(self, tables: list, io_threads: int | None = None, names: list[str] | None = None):
        if not tables:
            raise ConfigError("ConcatTable needs at least one table")
        d, s = tables[0].dim, tables[0].state_dim
        for i, t in enumerate(tables):
            if (t.dim, t.state_dim) != (d, s):
                who = names[i] if names else i
                raise ConfigError(f"table {who!r}: dim {t.dim} / state_dim {t.state_dim} differs from the group's "
                                  f"{d} / {s}; only tables of one row width share a cache")
        self.tables = list(tables)
        self.names = list(names) if names else [str(i) for i in range(len(tables))]
        self.dim, self.state_dim = d, s
        sizes = [t.num_embeddings for t in tables]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [T + 1]
        self._offsets_t = torch.from_numpy(self.offsets)
        self.num_embeddings = int(self.offsets[-1])
        from tierec.storage.ssd import SsdTable

        self._all_ssd = all(isinstance(t, SsdTable) for t in tables)  # reads: one read_many plan
        self._ssd_direct = self._all_ssd and all(t.odirect for t in tables)  # exchanges: one exchange_many pass
        n = min(io_threads or default_io_threads(self.tables), len(tables))
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="tierec-group-io") if n > 1 else None

    # ------------------------------------------------------------------ splitting
    def _bounds(self, ids: torch.Tensor) -> list[int]:
        """Positions in sorted ``ids`` where each member's rows start: [T + 1]."""
        return torch.searchsorted(ids, self._offsets_t.to(ids.device)).tolist()

    def _check(self, ids) -> None:
        """Sorted ``ids`` (tensor or array) must lie in [0, num_embeddings)."""
        if len(ids) and not (0 <= int(ids[0]) and int(ids[-1]) < self.num_embeddings):
            raise IndexError(f"row ID out of range [0, {self.num_embeddings}) of the table group")

    def _parts(self, ids: torch.Tensor) -> list[tuple[int, int, int]]:
        """(member, lo, hi) of sorted ``ids``: member's rows are ids[lo:hi], minus offsets[member]."""
        self._check(ids)
        b = self._bounds(ids)
        return [(t, b[t], b[t + 1]) for t in range(len(self.tables)) if b[t + 1] > b[t]]

    def _map(self, fn, parts: list) -> list:
        if self._pool is None or len(parts) < 2:
            return [fn(p) for p in parts]
        return list(self._pool.map(fn, parts))

    # ------------------------------------------------------------------ batched rows
    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``ids`` (unique) -> (weight [U, dim], state [U, state_dim])."""
        ids, order = sort_ids(ids)
        parts = self._parts(ids)
        if self._all_ssd and len(parts) > 1:  # one batched read over all members' files (one AIO batch)
            from tierec.storage.ssd import read_many

            got = read_many([(self.tables[t], (ids[lo:hi] - int(self.offsets[t])).numpy()) for t, lo, hi in parts])
            rows = torch.from_numpy(np.concatenate(got))
            w, s = rows[:, : self.dim].contiguous(), rows[:, self.dim:].contiguous()
        else:
            w = torch.empty(ids.numel(), self.dim)
            s = torch.empty(ids.numel(), self.state_dim)

            def one(p):
                t, lo, hi = p
                w[lo:hi], s[lo:hi] = self.tables[t].read(ids[lo:hi] - int(self.offsets[t]))

            self._map(one, parts)
        return unsort(order, w, s)

    def write(self, ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> None:
        ids, order = sort_ids(ids)
        if order is not None:
            weight, state = weight[order], state[order]

        def one(p):
            t, lo, hi = p
            self.tables[t].write(ids[lo:hi] - int(self.offsets[t]), weight[lo:hi], state[lo:hi])

        self._map(one, self._parts(ids))

    def exchange(self, write_ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor,
                 read_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write rows ``write_ids`` and read rows ``read_ids`` (both sorted, disjoint). Members that are
        O_DIRECT `SsdTable` s: all at once (`tierec.storage.ssd.exchange_many`: one AIO batch with
        padded rows, two with packed ones); otherwise each member's part in one `SsdTable.exchange`
        (one pass over its file), the members in parallel."""
        if self._ssd_direct and write_ids.numel() and read_ids.numel():
            got = self._exchange_many(write_ids, weight, state, read_ids)
            if got is not None:
                return got
        wb, rb = self._bounds(write_ids), self._bounds(read_ids)
        w = torch.empty(read_ids.numel(), self.dim)
        s = torch.empty(read_ids.numel(), self.state_dim)
        parts = [t for t in range(len(self.tables)) if wb[t + 1] > wb[t] or rb[t + 1] > rb[t]]

        def one(t):
            tab, off = self.tables[t], int(self.offsets[t])
            wid, rid = write_ids[wb[t]:wb[t + 1]] - off, read_ids[rb[t]:rb[t + 1]] - off
            ww, ws_ = weight[wb[t]:wb[t + 1]], state[wb[t]:wb[t + 1]]
            if rid.numel() == 0:
                tab.write(wid, ww, ws_)
                return
            if wid.numel() and hasattr(tab, "exchange"):
                got = tab.exchange(wid, ww, ws_, rid)
            else:
                if wid.numel():
                    tab.write(wid, ww, ws_)
                got = tab.read(rid)
            w[rb[t]:rb[t + 1]], s[rb[t]:rb[t + 1]] = got

        self._map(one, parts)
        return w, s

    def _exchange_many(self, write_ids, weight, state, read_ids):
        from tierec.storage.ssd import exchange_many

        wid, rid = write_ids.numpy(), read_ids.numpy()
        self._check(wid)
        self._check(rid)
        wt = np.searchsorted(self.offsets, wid, side="right") - 1  # member of every row
        rt = np.searchsorted(self.offsets, rid, side="right") - 1
        rows = torch.cat([weight, state], 1).numpy() if self.state_dim else weight.contiguous().numpy()
        out = exchange_many(self.tables, wt, wid - self.offsets[wt], rows, rt, rid - self.offsets[rt])
        if out is None:
            return None
        t = torch.from_numpy(out)
        return t[:, : self.dim].contiguous(), t[:, self.dim:].contiguous()

    # ------------------------------------------------------------------ ranges
    def _ranges(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(member, its start, its end) of the group rows [start, end)."""
        if not 0 <= start <= end <= self.num_embeddings:
            raise IndexError(f"rows [{start}, {end}) out of range [0, {self.num_embeddings}) of the table group")
        out = []
        for t, tab in enumerate(self.tables):
            a, b = max(start, int(self.offsets[t])), min(end, int(self.offsets[t + 1]))
            if b > a:
                out.append((t, a - int(self.offsets[t]), b - int(self.offsets[t])))
        return out

    def read_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        got = [self.tables[t].read_rows(a, b) for t, a, b in self._ranges(start, end)]
        if len(got) == 1:
            return got[0]
        if not got:
            return torch.empty(0, self.dim), torch.empty(0, self.state_dim)
        return torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])

    def write_rows(self, start: int, weight: torch.Tensor, state: torch.Tensor) -> None:
        for t, a, b in self._ranges(start, start + weight.shape[0]):
            k = int(self.offsets[t]) + a - start
            self.tables[t].write_rows(a, weight[k:k + b - a], state[k:k + b - a])

    def flush(self) -> None:
        for t in self.tables:
            t.flush()

    def close(self) -> None:
        for t in self.tables:
            if hasattr(t, "close"):
                t.close()
        if self._pool is not None:
            self._pool.shutdown()

    # ------------------------------------------------------------------ stats
    def reset_stats(self) -> None:
        for t in self.tables:
            if hasattr(t, "reset_stats"):
                t.reset_stats()

    def stats(self) -> dict:
        """The members' counters under ``"members"``, with their sums at the top."""
        members = {n: t.stats() for n, t in zip(self.names, self.tables) if hasattr(t, "stats")}
        out: dict = {"tier": "group", "tables": len(self.tables)}
        for k in ("rows_read", "rows_written", "bytes_read", "bytes_written", "read_calls", "write_calls",
                  "io_time_s", "device_bytes_read", "device_bytes_written"):
            vals = [m[k] for m in members.values() if k in m]
            if vals:
                out[k] = sum(vals)
        out["members"] = members
        return out

    def __repr__(self) -> str:
        return f"ConcatTable({len(self.tables)} tables, {self.num_embeddings} rows)"


@dataclass
class _Step:
    """The group's working set of one step, while its members hold their slices."""

    step: int
    ws: WorkingSet
    bounds: list[int]  # [T + 1]: member t's rows are ws.ids[bounds[t]:bounds[t + 1]]
    taken: list[bool] = field(default_factory=list)
    left: int = 0  # slices not yet released
    dirty: bool = False


@dataclass
class _ViewHandle:
    view: TableView
    inner: WorkingSet | None = None  # a working set of the group's cache, outside look-ahead steps
    step: _Step | None = None  # look-ahead: the step this slice belongs to
    released: bool = False


class TableGroup:
    """One look-ahead cache (``cache_rows`` and ``host_rows`` summed over the members) for the tables
    `add`-ed to it; see the module doc. ``device``: where the cache lives; ``host_rows`` > 0 puts a
    host-DRAM look-ahead tier of that many rows between it and the files."""

    def __init__(self, name: str = "group", device="cpu", io_threads: int | None = None):
        self.name, self.device, self.io_threads = name, torch.device(device), io_threads
        self.members: list[tuple[str, object]] = []
        self.cache_rows = self.host_rows = 0
        self.views: list[TableView] = []
        self._cache = None
        self._steps: dict[int, _Step] = {}

    def add(self, backing, cache_rows: int, name: str, host_rows: int = 0, feature: str | None = None) -> TableView:
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
    def cache(self):
        """The group's `LookaheadCache` (created on first access; no member can join after)."""
        if self._cache is None:
            from tierec.storage.lookahead import LookaheadCache

            names = [n for n, _ in self.members]
            below = ConcatTable([b for _, b in self.members], self.io_threads, names)
            if self.host_rows:
                below = LookaheadCache(below, self.host_rows, device="cpu", name=f"{self.name}@host")
            self._cache = LookaheadCache(below, self.cache_rows, device=self.device, name=self.name)
            self._cache.group = self
            # where each member's rows start in a step's (sorted) IDs: searchsorted against these
            self._offsets = torch.tensor([v.offset for v in self.views] + [self._cache.num_embeddings],
                                         device=self._cache.device)
            log.info("table group %s: %d tables (%s) behind one look-ahead cache of %d rows%s", self.name,
                     len(names), ", ".join(names), self._cache.capacity,
                     f" (host tier {self.host_rows} rows)" if self.host_rows else "")
        return self._cache

    def sources(self) -> list[tuple[str, int, None, int]]:
        """What the group's cache sees of a batch, for `LookaheadPipeline`: each member's feature, shifted
        by the member's offset."""
        return [(v.feature, 0, None, v.offset) for v in self.views]

    def abandon(self) -> None:
        """The pipeline stopped mid-step: release the slices' step as dirty (exact: at worst a
        write-back of unchanged rows)."""
        for step in list(self._steps):
            self.cache.release(self._steps.pop(step).ws, dirty=True)

    # ------------------------------------------------------------------ look-ahead steps (trainer thread)
    def _take(self, view: TableView, ids: torch.Tensor) -> WorkingSet:
        c = self.cache
        step = c.pipeline.current_step
        st = self._steps.get(step)
        if st is None:
            ws = c.take_prepared(step)
            b = torch.searchsorted(ws.ids, self._offsets).tolist()
            st = self._steps[step] = _Step(step, ws, b, [False] * len(self.views), len(self.views))
        t = view.index
        lo, hi = st.bounds[t], st.bounds[t + 1]
        if st.taken[t] or not torch.equal(st.ws.ids[lo:hi] - view.offset, ids):
            raise RuntimeError(f"table {view.name!r}: acquire() during look-ahead training does not match the "
                               f"prepared step {step}; pause the pipeline for other lookups")
        st.taken[t] = True
        return WorkingSet(ids, st.ws.index[lo:hi], st.ws.weight, st.ws.state,
                          handle=_ViewHandle(view, step=st))

    def _release_slice(self, h: _ViewHandle, dirty: bool) -> None:
        st = h.step
        st.dirty |= bool(dirty)  # marking a clean row dirty costs a write-back, never a value
        st.left -= 1
        if st.left == 0:
            del self._steps[st.step]
            self.cache.release(st.ws, dirty=st.dirty)


class TableView:
    """Member ``name`` of a `TableGroup`, as a `TableStorage` in its own row numbers [0, num_embeddings)."""

    def __init__(self, group: TableGroup, index: int, name: str, backing, offset: int, feature: str | None = None):
        self.group, self.index, self.name, self.backing, self.offset = group, index, name, backing, offset
        self.feature = feature or name
        self.num_embeddings, self.dim, self.state_dim = backing.num_embeddings, backing.dim, backing.state_dim

    def acquire(self, ids: torch.Tensor) -> WorkingSet:
        g = self.group
        c = g.cache
        if c._driven():
            return g._take(self, ids.to(c.device))
        inner = c.acquire(ids.to(c.device) + self.offset)
        return WorkingSet(ids, inner.index, inner.weight, inner.state, handle=_ViewHandle(self, inner=inner))

    def release(self, ws: WorkingSet, dirty: bool) -> None:
        h = ws.handle
        if not isinstance(h, _ViewHandle) or h.view is not self:
            raise ValueError(f"table {self.name!r}: working set was not acquired from this table")
        if h.released:
            raise RuntimeError(f"table {self.name!r}: working set released twice")
        h.released = True
        if h.step is not None:
            self.group._release_slice(h, dirty)
        else:
            self.group.cache.release(h.inner, dirty)

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

    def stats(self) -> dict:
        """The group's cache counters (shared by all members: `tierec.train.trainer.cache_stats` lists
        them once, under the group's name)."""
        return self.group.cache.stats()

    def __repr__(self) -> str:
        return f"TableView({self.name!r} of group {self.group.name!r}, rows [{self.offset}, " \
               f"{self.offset + self.num_embeddings}))"

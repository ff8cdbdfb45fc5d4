"""Several tables' stores as one table: `ConcatTable`, over their `RowSpace`.

Used wherever several tables' files act as one: below a table group's look-ahead cache
(`tierec.storage.group`: training) and below the served model's shared cache
(`tierec.inference.model_store`: serving, weights only). Batched reads and exchanges of
`SsdTable` members go to the device as one plan over all their files
(`tierec.storage.multifile`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from tierec.errors import ConfigError
from tierec.storage import aio, multifile
from tierec.storage.base import RowStore, read_in_turn
from tierec.storage.blockio import IO_LANES
from tierec.storage.cache import CachedTable, sort_ids, unsort
from tierec.storage.lazy import LazyRows
from tierec.storage.rowspace import RowSpace
from tierec.storage.ssd import SsdTable


def default_io_threads(stores=None) -> int:
    """Prefetch threads for ``stores`` (tables whose I/O may run in parallel). Tables whose SSD files are
    read by batched Linux AIO (O_DIRECT) spend their prefetch time waiting on the device with the GIL
    released, so 4 threads overlap four tables' I/O at little CPU cost. Otherwise (buffered or
    memory-mapped files: the reads cost CPU) one per two cores beyond the trainer's, at most 4; on 2
    cores one thread, as more only contend with the trainer (both measured in docs/lookahead.md)."""
    if stores and all(_reads_by_aio(s) for s in stores):
        return 4
    return max(1, min(4, (os.cpu_count() or 2) // 2 - 1))


def _reads_by_aio(store) -> bool:
    """True if every file under ``store`` (a chain of tiers, or a `ConcatTable`) is an O_DIRECT
    `SsdTable` read by Linux AIO."""
    b = store
    while isinstance(b, CachedTable):  # down the chain of cache tiers to the files
        b = b.backing
    if isinstance(b, ConcatTable):
        return all(_reads_by_aio(t) for t in b.tables)
    return isinstance(b, SsdTable) and b.odirect and aio.available()


class ConcatTable:
    """``tables`` (`RowStore` s of the same ``dim`` and ``state_dim``) as one `RowStore` over
    their `RowSpace`: row ``space.offset(t) + r`` is row ``r`` of ``tables[t]``.

    ``read``, ``write`` and ``exchange`` split their IDs by member and run each member's part (with
    up to ``io_threads`` members at once; all `SsdTable` s: one batched plan over their files);
    ``read_rows``/``write_rows`` may span members. ``weights_only``: a read-only view of the rows'
    weights (``state_dim`` 0; serving), whose reads skip the optimizer state."""

    def __init__(self, tables: Sequence[RowStore], io_threads: int | None = None, names: list[str] | None = None,
                 weights_only: bool = False, pool: ThreadPoolExecutor | None = None, lanes: int = IO_LANES):
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
        self.weights_only = bool(weights_only)
        self.dim, self.state_dim = d, 0 if weights_only else s
        self.space = RowSpace([t.num_embeddings for t in tables])
        self.num_embeddings = self.space.num_rows
        self.device = torch.device("cpu")
        # all members SsdTable files: reads go in one read_many plan; all O_DIRECT: exchanges in one exchange_many pass
        self._files = [t for t in tables if isinstance(t, SsdTable)]
        self._all_ssd = len(self._files) == len(tables)
        self._ssd_direct = self._all_ssd and all(t.odirect for t in self._files)
        self._read_pool, self._lanes = pool, lanes  # read_many's lanes (serving passes its I/O threads)
        n = 1 if weights_only else min(io_threads or default_io_threads(self.tables), len(tables))
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="tierec-group-io") if n > 1 else None

    # ------------------------------------------------------------------ splitting
    def _map(self, fn, parts: list) -> list:
        if self._pool is None or len(parts) < 2:
            return [fn(p) for p in parts]
        return list(self._pool.map(fn, parts))

    def _writable(self) -> None:
        if self.weights_only:
            raise RuntimeError("a weights-only ConcatTable is read-only")

    # ------------------------------------------------------------------ batched rows
    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``ids`` (unique, any order) -> (weight [U, dim], state [U, state_dim]): a bulk read (checkpoints,
        evaluation, serving); a cache's misses go through `exchange`."""
        return self._read(ids, step=False)

    def read_each(self, pieces: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """`read` of each piece in turn, joined (`RowStore.read_each`): SSD members' rows as their files hold them."""
        if not self._all_ssd or self.weights_only:
            yield from read_in_turn(self, pieces)
            return
        for ids in pieces:
            ids, order = sort_ids(ids)
            rows = self._read_files(ids, self.space.parts(ids), step=False)
            if order is not None:
                rows, sorted_rows = torch.empty_like(rows), rows
                rows[order] = sorted_rows
            yield rows

    def _read_files(self, ids: torch.Tensor, parts: list[tuple[int, int, int]], step: bool) -> torch.Tensor:
        """Rows of sorted ``ids`` (int64 [U], cut into ``parts`` by the row space), every member an `SsdTable`: one
        plan over their files (`tierec.storage.multifile.read_many`), float32 [U, width] as the files hold them."""
        got = multifile.read_many([(self._files[t], (ids[lo:hi] - self.space.offset(t)).numpy()) for t, lo, hi in parts],
                                  self._read_pool, self._lanes, recent=step)
        if len(got) == 1:
            return torch.from_numpy(got[0])
        return torch.from_numpy(np.concatenate(got)) if got else torch.empty(0, self.dim + self.state_dim)

    def _read(self, ids: torch.Tensor, step: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`read`, or with ``step`` a cache's read (`tierec.storage.multifile.read_many`'s ``recent``; the members'
        `exchange`)."""
        ids, order = sort_ids(ids)
        parts = self.space.parts(ids)
        if self._all_ssd and (len(parts) > 1 or self.weights_only):  # one batched plan over the members' files
            rows = self._read_files(ids, parts, step)
            w, s = rows[:, : self.dim].contiguous(), rows[:, self.dim:].contiguous()
            if self.weights_only:
                s = rows.new_empty(rows.shape[0], 0)
        else:
            w = torch.empty(ids.numel(), self.dim)
            s = torch.empty(ids.numel(), self.state_dim)

            def one(p):
                t, lo, hi = p
                tab, rid = self.tables[t], ids[lo:hi] - self.space.offset(t)
                w[lo:hi], s[lo:hi] = (tab.exchange(rid[:0], w[:0], s[:0], rid) if step else tab.read(rid))

            self._map(one, parts)
        return unsort(order, w, s)

    def write(self, ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> None:
        self._writable()
        ids, order = sort_ids(ids)
        if order is not None:
            weight, state = weight[order], state[order]

        def one(p):
            t, lo, hi = p
            self.tables[t].write(ids[lo:hi] - self.space.offset(t), weight[lo:hi], state[lo:hi])

        self._map(one, self.space.parts(ids))

    def exchange(self, write_ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor,
                 read_ids: torch.Tensor, write_rank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write rows ``write_ids`` and read rows ``read_ids`` (both sorted, disjoint). Members that are
        O_DIRECT `SsdTable` s: all at once (`tierec.storage.multifile.exchange_many`: one AIO batch with
        padded rows, two with packed ones); otherwise each member's part in one `SsdTable.exchange`
        (one pass over its file), the members in parallel. ``write_rank`` (int64 [W] or None): the written
        rows' placement ranks, passed to the members (`RowStore.exchange`)."""
        self._writable()
        if not write_ids.numel():  # the misses alone: one batched read, as a step's
            return self._read(read_ids, step=True)
        if write_rank is not None:
            write_rank = write_rank.to("cpu", torch.int64)
        if self._ssd_direct and read_ids.numel():
            got = self._exchange_many(write_ids, weight, state, read_ids, write_rank)
            if got is not None:
                return got
        self.space.check(write_ids)
        self.space.check(read_ids)
        wb, rb = self.space.bounds(write_ids), self.space.bounds(read_ids)
        w = torch.empty(read_ids.numel(), self.dim)
        s = torch.empty(read_ids.numel(), self.state_dim)
        parts = [t for t in range(len(self.tables)) if wb[t + 1] > wb[t] or rb[t + 1] > rb[t]]

        def one(t):
            tab, off = self.tables[t], self.space.offset(t)
            wid, rid = write_ids[wb[t]:wb[t + 1]] - off, read_ids[rb[t]:rb[t + 1]] - off
            ww, ws_ = weight[wb[t]:wb[t + 1]], state[wb[t]:wb[t + 1]]
            wr = None if write_rank is None else write_rank[wb[t]:wb[t + 1]]
            got = tab.exchange(wid, ww, ws_, rid, write_rank=wr)  # a step's read, also for a member with no writes
            w[rb[t]:rb[t + 1]], s[rb[t]:rb[t + 1]] = got

        self._map(one, parts)
        return w, s

    def _exchange_many(self, write_ids, weight, state, read_ids, write_rank=None):
        wid, rid = write_ids.numpy(), read_ids.numpy()
        wrank = None if write_rank is None else write_rank.numpy()
        self.space.check(wid)
        self.space.check(rid)
        wt, rt = self.space.member_of(wid), self.space.member_of(rid)
        off = self.space.offsets
        rows = torch.cat([weight, state], 1).numpy() if self.state_dim else weight.contiguous().numpy()
        out = multifile.exchange_many(self._files, wt, wid - off[wt], rows, rt, rid - off[rt], wrank)
        if out is None:
            return None
        t = torch.from_numpy(out)
        return t[:, : self.dim].contiguous(), t[:, self.dim:].contiguous()

    def neighbours(self, ids: torch.Tensor) -> torch.Tensor:
        """`RowStore.neighbours` over the members: each member's rows that share device blocks with its
        part of ``ids`` (unique, sorted), as row-space IDs."""
        ids = ids.cpu()
        got = [self.tables[t].neighbours(ids[lo:hi] - self.space.offset(t)) + self.space.offset(t)
               for t, lo, hi in self.space.parts(ids)]
        return torch.cat(got) if got else torch.empty(0, dtype=torch.int64)

    # ------------------------------------------------------------------ ranges
    def read_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        got = [self.tables[t].read_rows(a, b) for t, a, b in self.space.ranges(start, end)]
        if self.weights_only:
            got = [(w, w.new_empty(w.shape[0], 0)) for w, _ in got]
        if len(got) == 1:
            return got[0]
        if not got:
            return torch.empty(0, self.dim), torch.empty(0, self.state_dim)
        return torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])

    def write_rows(self, start: int, weight: torch.Tensor, state: torch.Tensor) -> None:
        self._writable()
        for t, a, b in self.space.ranges(start, start + weight.shape[0]):
            k = self.space.offset(t) + a - start
            self.tables[t].write_rows(a, weight[k:k + b - a], state[k:k + b - a])

    def flush(self) -> None:
        for t in self.tables:
            t.flush()

    def lazy_rows(self) -> LazyRows | None:
        """None: each member keeps its own (`TableView.lazy_rows`)."""
        return None

    def mark_written(self, ids: torch.Tensor) -> None:
        """Each member records its rows among ``ids`` (space rows) as written."""
        ids, _ = sort_ids(ids.to("cpu"))
        for t, lo, hi in self.space.parts(ids):
            self.tables[t].mark_written(ids[lo:hi] - self.space.offset(t))

    def close(self) -> None:
        for t in self.tables:
            t.close()
        if self._pool is not None:
            self._pool.shutdown()

    # ------------------------------------------------------------------ stats
    def reset_stats(self) -> None:
        for t in self.tables:
            t.reset_stats()

    def stats(self) -> dict:
        """The members' counters under ``"members"``, with their sums at the top."""
        members = {n: t.stats() for n, t in zip(self.names, self.tables, strict=True)}
        out: dict = {"tier": "group", "tables": len(self.tables)}
        for k in ("rows_read", "rows_written", "bytes_read", "bytes_written", "read_calls", "write_calls",
                  "io_time_s", "device_bytes_read", "device_bytes_written", "rmw_bytes_read"):
            vals = [m[k] for m in members.values() if k in m]
            if vals:
                out[k] = sum(vals)
        out["members"] = members
        return out

    def __repr__(self) -> str:
        return f"ConcatTable({len(self.tables)} tables, {self.num_embeddings} rows)"

"""The storage seam: what a table's rows live in, and how a step borrows them.

`TableStorage` is the one interface between the model (`tierec.modules.embedding`) and
every tier below it: a step *acquires* its unique rows as a `WorkingSet` (rows addressable
in a fast tensor), the fused optimizer updates them in place, and the step *releases*
them (written back if they were a temporary copy). `InMemoryTable` is the plain, exact
reference; `init_rows` gives every backend the same initial weights for any row range.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from tierec.storage.lazy import LazyRows, RowInit

INIT_CHUNK_ROWS = 65536


def init_rows(seed: int, table_index: int, num_embeddings: int, dim: int, start: int, end: int) -> torch.Tensor:
    """Initial weights of rows [start, end): uniform(-1/sqrt(n), 1/sqrt(n)), as DLRM/TorchRec do.

    Values depend only on (seed, table, row): `tierec.storage.lazy.RowInit`, a counter-based
    function, so any backend that initialises any rows, in any order, gets the same numbers."""
    return RowInit(seed, table_index, num_embeddings, dim).range(start, end)


@dataclass
class WorkingSet:
    """The rows of one step, addressable in a fast tensor.

    weight [R, D] and state [R, S] hold them; ``index`` [U] gives the position of
    each requested ID. ``ids`` [U] are the requested IDs (unique, sorted).
    """

    ids: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor
    state: torch.Tensor
    handle: object = None  # backend-private


class TableStorage(Protocol):
    """Where a table's rows (weights + optimizer state) live.

    ``read(ids)``/``write(ids, ...)``: rows by ID outside a step (checkpoints); ``read_each(pieces)``: the rows of
    each piece of IDs in turn (sorted pieces, each above the last: a checkpoint's row set), joined as a table file
    holds them (float32 CPU [U, dim + state_dim]: weights, then state), where a store may read ahead
    (`LookaheadCache`) and skip the split and join (`SsdTable`); `read_in_turn` elsewhere.
    ``lazy_rows()``: the rows written since the table was initialised (and changed since the last
    checkpoint) and the `RowInit` that gives every other row (`tierec.storage.lazy.LazyRows`), or None
    when the store does not track them; a checkpoint then copies just those rows, read by ID through
    the caches (no flush: caches mark the rows they change in the store below, `RowStore.mark_written`)."""

    num_embeddings: int
    dim: int
    state_dim: int

    def acquire(self, ids: torch.Tensor) -> WorkingSet: ...

    def release(self, ws: WorkingSet, dirty: bool) -> None: ...

    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def read_each(self, pieces: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]: ...

    def write(self, ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> None: ...

    def read_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def write_rows(self, start: int, weight: torch.Tensor, state: torch.Tensor) -> None: ...

    def flush(self) -> None: ...

    def lazy_rows(self) -> LazyRows | None: ...


class RowStore(Protocol):
    """What a cache sits on (`tierec.storage.cache.CachedTable`'s backing store): rows moved by ID.

    ``read(ids)``: rows ``ids`` (int64 [U], unique) as fresh tensors (weight [U, D], state [U, S]), a bulk read
    (checkpoints, evaluation); ``read_each(pieces)``: the rows of each piece of IDs in turn (sorted pieces,
    each above the last: a checkpoint's row set) joined, float32 CPU [U, dim + state_dim], where a store may read
    ahead; ``write(ids, weight, state)``:
    store them; ``exchange(write_ids, weight, state, read_ids, write_rank=None)``: a cache's step, its
    write-backs (maybe none) and its misses (disjoint IDs) in one pass where the store can (`SsdTable`,
    `ConcatTable`: one I/O batch), else write then read; ``write_rank`` (int64 [W] or None) is the caller's hint
    of when each written row is read back (lower: sooner), which a write-back log places them by
    (`tierec.storage.rowlog`: a step's reads also send the staged rows they ask for to the log and use its recent
    sectors; a bulk read copies staged rows), others ignore;
    ``mark_written(ids)``: rows ``ids`` changed in a cache above (their bytes reach this
    store on write-back; its `LazyRows` count them now, so a checkpoint needs no flush first);
    ``neighbours(ids)``: the rows a read of ``ids`` moves anyway (shared device blocks);
    ``read_rows``/``write_rows``/``flush``/``lazy_rows`` as in `TableStorage`; ``close`` releases
    the store's files (after a flush); ``stats``/``reset_stats``: its counters. ``device``: where
    the tensors it takes and returns live. Implemented by `InMemoryTable`, `SsdTable`, `ConcatTable`
    and the caches themselves (a cache in front of a cache: device <- DRAM <- SSD)."""

    num_embeddings: int
    dim: int
    state_dim: int
    device: torch.device

    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def read_each(self, pieces: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]: ...

    def write(self, ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> None: ...

    def exchange(self, write_ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor,
                 read_ids: torch.Tensor, write_rank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def read_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def write_rows(self, start: int, weight: torch.Tensor, state: torch.Tensor) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def stats(self) -> dict: ...

    def reset_stats(self) -> None: ...

    def lazy_rows(self) -> LazyRows | None: ...

    def mark_written(self, ids: torch.Tensor) -> None: ...

    def neighbours(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows that a read of rows ``ids`` (int64 [U]) moves anyway -- they share its device blocks --
        and that hold data there: sorted IDs (int64 [K]), not in ``ids``; empty where the store reads
        rows alone. A cache may take them with ``ids`` at no extra I/O (`LookaheadCache`)."""
        ...


def read_in_turn(store: RowStore | TableStorage, pieces: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``read_each`` of a store that reads nothing ahead: `read` of each piece, when the caller asks for it, its
    weights and state joined (float32 CPU [U, dim + state_dim])."""
    for ids in pieces:
        yield join_rows(*store.read(ids))


def join_rows(weight: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Weights [U, D] and state [U, S] (any device, dtype) -> float32 CPU [U, D + S], as a table file holds rows."""
    return torch.cat([weight.detach().to("cpu", torch.float32), state.detach().to("cpu", torch.float32)], 1)


def read_joined(store: RowStore, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (int64 [U], sorted) of ``store`` joined (float32 CPU [U, D + S]): its ``read_each`` of one piece."""
    return next(iter(store.read_each((ids,))))


class RowStoreDefaults:
    """`RowStore` methods for a store with nothing better to do: ``read_each`` = `read_in_turn`; ``exchange`` =
    write, then read; ``close`` = flush; no counters; written rows not tracked."""

    read_each = read_in_turn

    def exchange(self: RowStore, write_ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor,
                 read_ids: torch.Tensor, write_rank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if write_ids.numel():  # the placement rank is a hint for stores with a write-back log: ignored here
            self.write(write_ids, weight, state)
        return self.read(read_ids)

    def close(self: RowStore) -> None:
        self.flush()

    def stats(self) -> dict:
        return {}

    def reset_stats(self) -> None:
        pass

    def lazy_rows(self) -> LazyRows | None:
        return None

    def mark_written(self, ids: torch.Tensor) -> None:
        pass

    def neighbours(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64)


class InMemoryTable(RowStoreDefaults):
    """All rows in one tensor on ``device``: the plain, exact reference path. ``acquire(ids).index`` is
    ``ids`` itself (rows addressed by ID). Also a `RowStore` (a cache in front of memory: tests).

    With ``init`` (a `RowInit`) the weights start at its values and the rows written since are
    tracked (one bit per row: `lazy_rows`); without it they start uninitialised and untracked."""

    def __init__(self, num_embeddings: int, dim: int, state_dim: int, device="cpu", init: RowInit | None = None):
        self.num_embeddings, self.dim, self.state_dim = num_embeddings, dim, state_dim
        self.weight = torch.empty(num_embeddings, dim, device=device)
        self.state = torch.zeros(num_embeddings, state_dim, device=device)
        self.device = self.weight.device
        self._lazy = None
        if init is not None:
            if self.device.type == "cpu":
                init.fill(self.weight)
            else:
                for a in range(0, num_embeddings, INIT_CHUNK_ROWS * 16):
                    b = min(a + INIT_CHUNK_ROWS * 16, num_embeddings)
                    self.weight[a:b] = init.range(a, b).to(self.device)
            self._lazy = LazyRows.fresh(init, num_embeddings)

    def _mark(self, ids: torch.Tensor) -> None:
        if self._lazy is not None:
            self._lazy.mark(ids.detach().to("cpu", torch.int64).numpy().reshape(-1))

    def mark_written(self, ids: torch.Tensor) -> None:
        self._mark(ids)

    def acquire(self, ids: torch.Tensor) -> WorkingSet:
        return WorkingSet(ids, ids, self.weight, self.state)

    def release(self, ws: WorkingSet, dirty: bool) -> None:
        if dirty:
            self._mark(ws.ids)

    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight.index_select(0, ids), self.state.index_select(0, ids)

    def write(self, ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> None:
        self.weight.index_copy_(0, ids, weight)
        self.state.index_copy_(0, ids, state)
        self._mark(ids)

    def read_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight[start:end], self.state[start:end]

    def write_rows(self, start: int, weight: torch.Tensor, state: torch.Tensor) -> None:
        n = weight.shape[0]
        self.weight[start : start + n] = weight
        self.state[start : start + n] = state
        if self._lazy is not None:
            self._lazy.mark_range(start, start + n)

    def flush(self) -> None:
        pass

    def lazy_rows(self) -> LazyRows | None:
        return self._lazy

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.state.nbytes

"""The storage seam: what a table's rows live in, and how a step borrows them.

`TableStorage` is the one interface between the model (`tierec.modules.embedding`) and
every tier below it: a step *acquires* its unique rows as a `WorkingSet` (rows addressable
in a fast tensor), the fused optimizer updates them in place, and the step *releases*
them (written back if they were a temporary copy). `InMemoryTable` is the plain, exact
reference; `init_rows` gives every backend the same initial weights for any row range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

INIT_CHUNK_ROWS = 65536


def init_rows(seed: int, table_index: int, num_embeddings: int, dim: int, start: int, end: int) -> torch.Tensor:
    """Initial weights of rows [start, end): uniform(-1/sqrt(n), 1/sqrt(n)), as DLRM/TorchRec do.

    Values depend only on (seed, table, row), generated in fixed chunks of
    ``INIT_CHUNK_ROWS`` rows, so any storage backend that initialises any range of
    rows gets the same numbers.
    """
    bound = num_embeddings ** -0.5
    out = torch.empty(end - start, dim)
    c0 = start // INIT_CHUNK_ROWS
    c1 = (end - 1) // INIT_CHUNK_ROWS if end > start else c0 - 1
    for c in range(c0, c1 + 1):  # loop over 64K-row chunks, not rows
        a, b = c * INIT_CHUNK_ROWS, min((c + 1) * INIT_CHUNK_ROWS, num_embeddings)
        g = torch.Generator().manual_seed((seed * 1_000_003 + table_index) * 1_000_003 + c)
        vals = torch.empty(b - a, dim).uniform_(-bound, bound, generator=g)
        lo, hi = max(a, start), min(b, end)
        out[lo - start : hi - start] = vals[lo - a : hi - a]
    return out


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
    """Where a table's rows (weights + optimizer state) live."""

    num_embeddings: int
    dim: int
    state_dim: int

    def acquire(self, ids: torch.Tensor) -> WorkingSet: ...

    def release(self, ws: WorkingSet, dirty: bool) -> None: ...

    def read_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def write_rows(self, start: int, weight: torch.Tensor, state: torch.Tensor) -> None: ...

    def flush(self) -> None: ...


class RowStore(Protocol):
    """What a cache sits on (`tierec.storage.cache.CachedTable`'s backing store): rows moved by ID.

    ``read(ids)``: rows ``ids`` (int64 [U], unique) as fresh tensors (weight [U, D], state [U, S]);
    ``write(ids, weight, state)``: store them; ``exchange(write_ids, weight, state, read_ids)``: both
    (disjoint IDs) in one pass where the store can (`SsdTable`, `ConcatTable`: one I/O batch), else
    write then read; ``read_rows``/``write_rows``/``flush`` as in `TableStorage`; ``close`` releases
    the store's files (after a flush); ``stats``/``reset_stats``: its counters. ``device``: where
    the tensors it takes and returns live. Implemented by `InMemoryTable`, `SsdTable`, `ConcatTable`
    and the caches themselves (a cache in front of a cache: device <- DRAM <- SSD)."""

    num_embeddings: int
    dim: int
    state_dim: int
    device: torch.device

    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def write(self, ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> None: ...

    def exchange(self, write_ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor,
                 read_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def read_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def write_rows(self, start: int, weight: torch.Tensor, state: torch.Tensor) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def stats(self) -> dict: ...

    def reset_stats(self) -> None: ...


class RowStoreDefaults:
    """`RowStore` methods for a store with nothing better to do: ``exchange`` = write, then read;
    ``close`` = flush; no counters."""

    def exchange(self: RowStore, write_ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor,
                 read_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if write_ids.numel():
            self.write(write_ids, weight, state)
        return self.read(read_ids)

    def close(self: RowStore) -> None:
        self.flush()

    def stats(self) -> dict:
        return {}

    def reset_stats(self) -> None:
        pass


class InMemoryTable(RowStoreDefaults):
    """All rows in one tensor on ``device``: the plain, exact reference path. ``acquire(ids).index`` is
    ``ids`` itself (rows addressed by ID). Also a `RowStore` (a cache in front of memory: tests)."""

    def __init__(self, num_embeddings: int, dim: int, state_dim: int, device="cpu"):
        self.num_embeddings, self.dim, self.state_dim = num_embeddings, dim, state_dim
        self.weight = torch.empty(num_embeddings, dim, device=device)
        self.state = torch.zeros(num_embeddings, state_dim, device=device)
        self.device = self.weight.device

    def acquire(self, ids: torch.Tensor) -> WorkingSet:
        return WorkingSet(ids, ids, self.weight, self.state)

    def release(self, ws: WorkingSet, dirty: bool) -> None:
        pass

    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight.index_select(0, ids), self.state.index_select(0, ids)

    def write(self, ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> None:
        self.weight.index_copy_(0, ids, weight)
        self.state.index_copy_(0, ids, state)

    def read_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight[start:end], self.state[start:end]

    def write_rows(self, start: int, weight: torch.Tensor, state: torch.Tensor) -> None:
        n = weight.shape[0]
        self.weight[start : start + n] = weight
        self.state[start : start + n] = state

    def flush(self) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.state.nbytes

"""One row space over several tables: row ``r`` of table ``t`` is row ``offsets[t] + r``.

FBGEMM's table-batched embeddings number all tables' rows one after another so that one
kernel (or one cache, one I/O plan) serves them all. tierec does the same wherever several
tables act as one, and `RowSpace` is the one place that arithmetic lives:

- a table group's look-ahead cache and the `tierec.storage.concat.ConcatTable` below it
  (training: the tables' files as one table);
- the served model's fused lookup and shared cache (serving);
- a row-wise sharded table (distributed: the table is a row space over its shards, shard
  ``k`` being member ``k``).

IDs are int64 tensors; "sorted" means ascending, as `torch.unique` returns them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import numpy as np
import torch


class RowSpace:
    """``sizes[t]`` rows per member, numbered one after another (module doc)."""

    def __init__(self, sizes: Sequence[int]):
        if not len(sizes) or any(int(n) < 0 for n in sizes):
            raise ValueError(f"a row space needs members of >= 0 rows, got {list(sizes)}")
        self.sizes = [int(n) for n in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)  # [T + 1]
        self.offsets_t = torch.from_numpy(self.offsets)
        self.num_rows = int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.sizes)

    def offset(self, t: int) -> int:
        return int(self.offsets[t])

    def join(self, per_member: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each member's IDs (int64, in its own rows, sorted) -> one tensor of space rows, sorted."""
        parts = [ids + int(self.offsets[t]) if self.offsets[t] else ids for t, ids in enumerate(per_member)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def bounds(self, rows: torch.Tensor) -> list[int]:
        """[T + 1] positions in sorted space ``rows`` where each member's rows start (and where they end)."""
        return torch.searchsorted(rows, self.offsets_t.to(rows.device)).tolist()

    def check(self, rows) -> None:
        """Sorted space ``rows`` (tensor or array) must lie in ``[0, num_rows)``."""
        if len(rows) and not (0 <= int(rows[0]) and int(rows[-1]) < self.num_rows):
            raise IndexError(f"row {int(rows[0]) if int(rows[0]) < 0 else int(rows[-1])} out of range "
                             f"[0, {self.num_rows}) of the row space")

    def parts(self, rows: torch.Tensor) -> list[tuple[int, int, int]]:
        """(member, lo, hi) for every member with rows in sorted space ``rows``: its rows are
        ``rows[lo:hi] - offset(member)``."""
        self.check(rows)
        b = self.bounds(rows)
        return [(t, b[t], b[t + 1]) for t in range(len(self.sizes)) if b[t + 1] > b[t]]

    @overload
    def member_of(self, rows: torch.Tensor) -> torch.Tensor: ...

    @overload
    def member_of(self, rows: np.ndarray) -> np.ndarray: ...

    def member_of(self, rows: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """int64 [n] member of each space row (any order; an array or a tensor, the same kind back)."""
        if isinstance(rows, torch.Tensor):
            return torch.bucketize(rows, self.offsets_t[1:-1].to(rows.device), right=True)
        return np.searchsorted(self.offsets, rows, side="right") - 1

    def ranges(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(member, its first row, its end row) of the space rows ``[start, end)``."""
        if not 0 <= start <= end <= self.num_rows:
            raise IndexError(f"rows [{start}, {end}) out of range [0, {self.num_rows}) of the row space")
        out = []
        for t in range(len(self.sizes)):
            a, b = max(start, int(self.offsets[t])), min(end, int(self.offsets[t + 1]))
            if b > a:
                out.append((t, a - int(self.offsets[t]), b - int(self.offsets[t])))
        return out

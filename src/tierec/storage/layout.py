"""Where rows sit in a table file: rows predicted hot laid together (`HotLayout`).

A table file holds row ``r`` at file row ``r`` (its byte offset ``r * row_stride``). With 16-64
float rows a device block holds many rows (a 512-byte sector ~7 rows of 68 bytes, a 4 KiB block
~60), and a read of one row moves the whole block. Rows used at random from a large table rarely
share a block, so nearly every byte read is wasted. `HotLayout` moves the ``H`` rows predicted
hottest to the end of the file, in order of predicted hotness::

    file rows  0 .. N-1        row r at file row r (a hot row's home stays a hole: sparse, no disk)
    file rows  N .. N+H-1      hot[0], hot[1], ..., hot[H-1]   (hottest first)

so the rows a cache keeps missing and re-reading -- the warm rows just below what fits -- sit a
few to a block, and a block read for one of them brings its neighbours for free (the look-ahead
cache takes those its window will use: `tierec.storage.lookahead`). The prediction is the access
counts of the planning pass (`tierec.storage.plan.measure_lookups`): hotter = counted more often
(ties by ID). Memory: 16 bytes per hot row (the sorted IDs and their file rows), charged to the
memory budget (`tierec.storage.plan.BudgetSplit.layout`).

The layout changes where bytes go, never what a row holds: every reader maps IDs through
`file_rows`, and the file's row bitmap, checkpoints (row sets by ID) and caches all speak IDs.
"""

from __future__ import annotations

import hashlib

import numpy as np

HOT_LAYOUT_BYTES_PER_ROW = 16  # sorted hot ID (int64) + its file row (int64)


class HotLayout:
    """A table of ``num_rows`` whose rows ``hot`` (int64 [H], distinct, hottest first) live at file rows
    ``num_rows + k``; every other row ``r`` at file row ``r``. The file holds ``file_rows = N + H`` rows."""

    def __init__(self, num_rows: int, hot: np.ndarray):
        hot = np.asarray(hot, dtype=np.int64).reshape(-1)
        if hot.size and (hot.min() < 0 or hot.max() >= num_rows):
            raise ValueError(f"hot rows must be in [0, {num_rows})")
        order = np.argsort(hot, kind="stable")
        self.num_rows = int(num_rows)
        self.hot = hot
        self._sorted = hot[order]
        if self._sorted.size > 1 and not np.all(self._sorted[1:] > self._sorted[:-1]):
            raise ValueError("hot rows must be distinct")
        self._file_row = order.astype(np.int64) + self.num_rows  # file row of each sorted hot ID

    @classmethod
    def from_counts(cls, num_rows: int, ids: np.ndarray, counts: np.ndarray, max_rows: int) -> HotLayout:
        """The ``max_rows`` rows counted most often (``ids``, ``counts`` int64 [K]: a sample of accesses),
        hottest first, ties by ID."""
        ids, counts = np.asarray(ids, np.int64), np.asarray(counts, np.int64)
        keep = np.lexsort((ids, -counts))[: max(0, int(max_rows))]
        return cls(num_rows, ids[keep])

    @property
    def hot_rows(self) -> int:
        return int(self.hot.size)

    @property
    def file_rows_total(self) -> int:
        """Rows the file holds: the table's, and the hot rows' second places."""
        return self.num_rows + self.hot_rows

    @property
    def nbytes(self) -> int:
        return self.hot.nbytes + self._sorted.nbytes + self._file_row.nbytes

    def sha256(self) -> str:
        """sha256 of the hot IDs as stored (``<file>.hot``: int64, hottest first)."""
        return hashlib.sha256(self.hot.tobytes()).hexdigest()

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bool [U]: hot, int64 [U]: position in the sorted hot IDs, valid where hot)."""
        if self._sorted.size == 0:
            return np.zeros(ids.size, bool), np.zeros(ids.size, np.int64)
        pos = np.minimum(np.searchsorted(self._sorted, ids), self._sorted.size - 1)
        return self._sorted[pos] == ids, pos

    def file_rows(self, ids: np.ndarray) -> np.ndarray:
        """Row IDs (int64 [U], any order) -> their file rows (int64 [U])."""
        hot, pos = self._find(ids)
        return np.where(hot, self._file_row[pos], ids)

    def ids_at(self, rows: np.ndarray) -> np.ndarray:
        """File rows (int64 [U]) -> the row IDs stored there, -1 at a hot row's empty home."""
        rows = np.asarray(rows, np.int64)
        out = rows.copy()
        tail = rows >= self.num_rows
        out[tail] = self.hot[rows[tail] - self.num_rows]
        home = ~tail
        hot, _ = self._find(rows[home])
        out[np.flatnonzero(home)[hot]] = -1
        return out

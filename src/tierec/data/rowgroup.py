"""One row group on its way from Parquet to a `Chunk`, decoded one column at a time.

The reader stages (`tierec.data.loader`) used to decode a whole row group to an Arrow table, permute
it into a second table and convert that to numpy, holding ~3x the group at once beside the chunk
being trained on: at 65,536 rows of 26 list features and 13 dense ones (`bench_scale --quick`),
~80 MB per read in flight. `RowGroupColumns` decodes a column when the decode stage asks for it,
permutes it, and hands it over, so a read holds the chunk being built plus one column.

The stages keep their meaning and their clock:

- ``parquet`` (`Dataset.stage_parquet`) opens the row group's checked bytes; each column's Parquet
  decoding is charged to it as it happens (`take_spent`);
- ``shuffle`` (`Dataset.stage_shuffle`) sets the permutation (`permute`); columns decoded before it (a
  clustered data set's session column, or all of them, `decode_all`) are permuted at once, the others
  as they are decoded, charged to it too;
- ``decode`` (`Dataset.stage_decode`) takes each column (`pop`) into the chunk.

A whole decoded table (the loader's decoded cache, `from_table`) goes through the same steps with
every column already decoded. The permuted columns are those ``table.take(perm)`` would give, bit
for bit.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

LAZY_STAGES = ("parquet", "shuffle")  # the stages whose work `RowGroupColumns` does as columns are taken


class RowGroupColumns:
    """Row group ``index`` of the open Parquet file ``source`` (or the columns of a decoded table), by name.

    ``column(name)`` decodes (and, after `permute`, permutes) a column and keeps it; ``pop(name)`` hands
    it over and forgets it. `take_spent` says what that work cost per stage of `LAZY_STAGES`."""

    def __init__(self, source: pq.ParquetFile | None, index: int, schema: pa.Schema, num_rows: int,
                 columns: dict[str, pa.ChunkedArray] | None = None):
        self._source, self._index = source, index
        self.schema, self.num_rows = schema, num_rows
        self._cols: dict[str, pa.ChunkedArray] = dict(columns or {})
        self._perm: pa.Array | None = None
        self._taken: set[str] = set()
        self._spent: dict[str, list[float]] = {s: [0.0, 0.0, 0.0] for s in LAZY_STAGES}

    @classmethod
    def open(cls, source: pq.ParquetFile, index: int) -> RowGroupColumns:
        """Row group ``index`` of ``source``; nothing decoded yet."""
        return cls(source, index, source.schema_arrow, source.metadata.row_group(index).num_rows)

    @classmethod
    def from_table(cls, table: pa.Table) -> RowGroupColumns:
        """The columns of an already decoded table (nothing to decode; ``table`` is left as it is)."""
        return cls(None, 0, table.schema, table.num_rows, dict(zip(table.column_names, table.columns, strict=True)))

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    @property
    def nbytes(self) -> int:
        """Bytes of the columns decoded and not yet handed over."""
        return sum(int(c.nbytes) for c in self._cols.values())

    def column(self, name: str) -> pa.ChunkedArray:
        """Column ``name``: decoded now if it was not, permuted if `permute` was called; kept."""
        col = self._cols.get(name)
        if col is None:
            if name in self._taken:
                raise KeyError(f"column {name!r} was handed over already")
            if self._source is None:
                raise KeyError(f"no column {name!r}")
            source, perm = self._source, self._perm
            decoded = self._timed("parquet", lambda: source.read_row_group(self._index, columns=[name],
                                                                            use_threads=False).column(0))
            if perm is not None:
                decoded = self._timed("shuffle", functools.partial(decoded.take, perm))
            self._cols[name] = col = decoded
        return col

    def pop(self, name: str) -> pa.ChunkedArray:
        """Column ``name`` (as `column`), forgotten here: its memory goes once the caller lets it go."""
        col = self.column(name)
        del self._cols[name]
        self._taken.add(name)
        return col

    def decode_all(self) -> RowGroupColumns:
        """Decode every column now (the input profiler times the stages one after another); returns self."""
        for name in self.schema.names:
            if name not in self._taken:
                self.column(name)
        return self

    def table(self) -> pa.Table:
        """Every column, decoded, as one table (before `permute`: the row group as stored)."""
        self.decode_all()
        return pa.table({n: self._cols[n] for n in self.schema.names}, schema=self.schema)

    def permute(self, perm: pa.Array) -> None:
        """Rows in the order ``perm`` (int64 [num_rows]) from now on: the columns decoded so far at once."""
        self._perm = perm
        for name, col in list(self._cols.items()):
            self._cols[name] = self._timed("shuffle", functools.partial(col.take, perm))

    def take_spent(self) -> dict[str, tuple[float, float, int]]:
        """{stage: (wall s, CPU s of the thread, bytes out)} of the decoding and permuting done since the last
        call, for each of `LAZY_STAGES`; the totals start again from zero."""
        out = {name: (s[0], s[1], int(s[2])) for name, s in self._spent.items()}
        self._spent = {name: [0.0, 0.0, 0.0] for name in LAZY_STAGES}
        return out

    def _timed(self, stage: str, fn: Callable[[], pa.ChunkedArray]) -> pa.ChunkedArray:
        w, c = time.perf_counter(), time.thread_time()
        out = fn()
        s = self._spent[stage]
        s[0] += time.perf_counter() - w
        s[1] += time.thread_time() - c
        s[2] += int(out.nbytes)
        return out

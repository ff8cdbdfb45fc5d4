"""Lazy rows: a table whose rows get their initial values when first touched, not when it is created.

`RowInit` is the initial value of every row as a *counter-based* function of (seed, table, row,
column): each float is a splitmix64 hash of its coordinates turned into uniform(-1/sqrt(n),
1/sqrt(n)) (DLRM's and TorchRec's initialisation). No generator state is carried from one row to
the next, so any row can be computed alone, in any order, and every backend -- an in-memory
tensor filled at start, an SSD file filled on first touch, a checkpoint's never-written rows at
load -- gets the same bits::

    RowInit(seed=7, table_index=2, num_embeddings=4_000_000, dim=16).rows(np.array([5, 3_999_999]))
    # -> float32 [2, 16]; the same numbers as rows 5 and 3,999,999 of .range(0, 4_000_000)

`RowBits` is one bit per row (``ceil(n / 8)`` bytes: 0.5 MiB per 4M rows), marked with
vectorised numpy (no per-ID loop). `LazyRows` pairs them: the rows *written* since the table was
initialised, and the function that gives every other row. A store that keeps one (`SsdTable`
with ``init="lazy"``, `InMemoryTable`) needs no work at creation (an SSD file is a sparse
``ftruncate``), and a checkpoint copies only its written rows (`tierec.storage.tablefile`).

Exactness: a row's value is ``file row if written else RowInit.rows(row)`` with zero optimizer
state, for every reader; training on a lazy table is bit-identical to training on the same
table materialised up front (tests/test_lazy.py).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_CHUNK_ROWS = 1 << 16  # RowBits.ids scans 8x this many rows a pass (bounds temporary memory)
_INIT_PASS = 1 << 13  # rows per pass of RowInit.rows: ~400 B of uint64 temporaries per row (3.3 MB a pass)
_MARK_LOCK = threading.Lock()  # RowBits.mark is a read-modify-write of bytes: one marker at a time


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 [...] (in place; wrapping arithmetic)."""
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


@dataclass(frozen=True)
class RowInit:
    """Initial weights of rows of one table: float ``(r, c)`` = uniform(-b, b) with
    b = ``num_embeddings ** -0.5``, from a hash of (``seed``, ``table_index``, ``row_offset + r``, c).

    ``row_offset`` lets a shard holding rows [lo, hi) of a table number its rows from 0 and still
    get the whole table's values (``row_offset = lo``). Optimizer state starts at zero."""

    seed: int
    table_index: int
    num_embeddings: int
    dim: int
    row_offset: int = 0

    def _key(self) -> np.uint64:
        k = np.array([((self.seed * 0x100000001B3) ^ self.table_index) & (2**64 - 1)], dtype=np.uint64)
        return _mix(_mix(k))[0]

    def rows(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (int64 [U], any order, repeats allowed) -> float32 [U, dim]."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size <= _INIT_PASS:
            return self._rows(ids)
        out = np.empty((ids.size, self.dim), np.float32)  # in passes: a step of 50K missed rows held 20 MB at once
        for a in range(0, ids.size, _INIT_PASS):
            self._rows(ids[a : a + _INIT_PASS], out[a : a + _INIT_PASS])
        return torch.from_numpy(out)

    def _rows(self, ids: np.ndarray, out: np.ndarray | None = None) -> torch.Tensor:
        """Rows ``ids`` (int64 [U]) -> float32 [U, dim], written into ``out`` (float32 [U, dim]) where given."""
        r = ids.astype(np.uint64) + np.uint64(self.row_offset)
        with np.errstate(over="ignore"):  # (r * dim + c) * golden + key, mod 2**64, as r * (dim * golden) + (c * ...)
            x = (r * (np.uint64(self.dim) * _GOLDEN))[:, None] + (np.arange(self.dim, dtype=np.uint64) * _GOLDEN
                                                                  + self._key())[None, :]
        _mix(x)
        k = (x >> np.uint64(40)).astype(np.int32)  # u = k / 2**24 in [0, 1): 24 exact bits
        k <<= 1
        k -= np.int32(1 << 24)  # (2u - 1) * 2**24: exact in float32, as int32 -> float32 (no uint64 -> float)
        scale = np.float32(self.num_embeddings ** -0.5) * np.float32(2.0**-24)  # bound / 2**24, exact
        out = np.empty(x.shape, np.float32) if out is None else out
        np.multiply(k, scale, out=out, dtype=np.float32)  # = (2u - 1) * bound, rounded once as before
        return torch.from_numpy(out)

    def range(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) -> float32 [end - start, dim], in this thread (callers that stream a table chunk by
        chunk; a whole in-memory table is `fill`'s)."""
        return self.fill(torch.empty(max(0, end - start), self.dim), start, threads=1)

    def fill(self, out: torch.Tensor, start: int = 0, threads: int | None = None) -> torch.Tensor:
        """Rows [start, start + n) into ``out`` (float32 CPU [n, dim], contiguous), in `_INIT_PASS`-row passes on
        ``threads`` threads (default torch's intra-op threads; numpy lets go of the GIL in each pass): creating
        an in-memory table at start is this, ~120M floats for bench_scale's 26 Criteo-shaped tables."""
        n, flat = out.shape[0], out.numpy()

        def one(a: int) -> None:
            b = min(a + _INIT_PASS, n)
            self._rows(np.arange(start + a, start + b, dtype=np.int64), flat[a:b])

        passes = range(0, n, _INIT_PASS)
        threads = min(threads or torch.get_num_threads(), len(passes))
        if threads <= 1:
            for a in passes:
                one(a)
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="tierec-init") as pool:
                list(pool.map(one, passes))
        return out

    def to_json(self) -> dict:
        return {"kind": "counter-uniform", "seed": self.seed, "table_index": self.table_index,
                "num_embeddings": self.num_embeddings, "dim": self.dim, "row_offset": self.row_offset}

    @classmethod
    def from_json(cls, d: dict) -> RowInit:
        if not isinstance(d, dict) or d.get("kind") != "counter-uniform":
            raise ValueError(f"unknown row initialisation {d!r}")
        return cls(int(d["seed"]), int(d["table_index"]), int(d["num_embeddings"]), int(d["dim"]),
                   int(d.get("row_offset", 0)))


class RowBits:
    """One bit per row of ``num_rows`` (uint8 [ceil(num_rows / 8)], little-endian bit order)."""

    def __init__(self, num_rows: int, data: np.ndarray | None = None):
        self.num_rows = int(num_rows)
        nbytes = (self.num_rows + 7) // 8
        if data is None:
            data = np.zeros(nbytes, np.uint8)
        elif data.dtype != np.uint8 or data.size != nbytes:
            raise ValueError(f"row bitmap of {data.size} bytes, expected {nbytes} for {self.num_rows} rows")
        self.data = data

    def mark(self, ids: np.ndarray) -> None:
        """Set the bits of rows ``ids`` (int64 [U], any order)."""
        self.set_bytes(*self.bytes_of(ids))

    @staticmethod
    def bytes_of(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bits of rows ``ids`` (int64 [U], any order) as (byte positions [K], unique; their bits uint8 [K]):
        the bits of each byte ORed together in sorted order, for one store per byte (2.5x faster than the
        unbuffered `np.bitwise_or.at`; docs/storage.md), and computed once for several bitmaps of the rows."""
        if not ids.size:
            return np.empty(0, np.int64), np.empty(0, np.uint8)
        if ids.size > 1 and not (ids[1:] >= ids[:-1]).all():
            ids = np.sort(ids)
        byte = ids >> 3
        first = np.flatnonzero(np.concatenate(([True], byte[1:] != byte[:-1])))
        return byte[first], np.bitwise_or.reduceat(np.left_shift(np.uint8(1), (ids & 7).astype(np.uint8)), first)

    def set_bytes(self, pos: np.ndarray, bits: np.ndarray) -> None:
        """OR ``bits`` (uint8 [K]) into bytes ``pos`` (int64 [K], unique): `bytes_of`'s pattern."""
        self.data[pos] |= bits

    def mark_range(self, start: int, end: int) -> None:
        """Set the bits of rows [start, end)."""
        if end <= start:
            return
        a, b = -(-start // 8), end // 8  # whole bytes inside the range
        if a < b:
            self.data[a:b] = 0xFF
            self.mark(np.arange(start, a * 8, dtype=np.int64))
            self.mark(np.arange(b * 8, end, dtype=np.int64))
        else:
            self.mark(np.arange(start, end, dtype=np.int64))

    def test(self, ids: np.ndarray) -> np.ndarray:
        """bool [U]: whether each row of ``ids`` is set."""
        return ((self.data[ids >> 3] >> (ids & 7).astype(np.uint8)) & 1).astype(bool)

    def ids(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Sorted int64 IDs of the set rows in [start, end) (``start`` a multiple of 8)."""
        end = self.num_rows if end is None else end
        parts = []
        for a in range(start, end, _CHUNK_ROWS * 8):
            b = min(a + _CHUNK_ROWS * 8, end)
            chunk = self.data[a // 8 : (b + 7) // 8]
            nz = np.flatnonzero(chunk != 0)  # (nonzero of a bool array: several times numpy's speed on bytes)
            if nz.size * 8 < chunk.size:  # sparse: unpack the nonzero bytes only
                f = np.flatnonzero(np.unpackbits(chunk[nz], bitorder="little").view(bool))  # bit 8 j + k: byte j's bit k
                found = nz[f >> 3].astype(np.int64) * 8 + (f & 7)
                parts.append(found[found < b - a] + a)
            else:
                bits = np.unpackbits(chunk, bitorder="little")[: b - a].view(bool)
                parts.append(np.flatnonzero(bits).astype(np.int64) + a)
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def count(self) -> int:
        return int(np.bitwise_count(self.data).sum(dtype=np.int64))

    def clear(self) -> None:
        self.data[:] = 0

    def update(self, other: RowBits) -> None:
        """Set every bit set in ``other`` (same number of rows)."""
        self.data |= other.data

    def copy(self) -> RowBits:
        return RowBits(self.num_rows, self.data.copy())

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


@dataclass
class LazyRows:
    """The rows of a table written since it was initialised (``written``), and what every other row
    holds: ``init`` weights and zero optimizer state.

    ``slots`` (int64 [K], sorted): for a file that holds only the written rows, packed in ID order
    (a checkpoint's *row set*), the ID of each row of the file; None: row ``r`` is the file's row
    ``r`` (a sparse file of all rows). ``changed``: the rows written since the last checkpoint took
    them (`take_changed`), what an incremental checkpoint writes; None for a read-only file."""

    init: RowInit
    written: RowBits
    slots: np.ndarray | None = None
    changed: RowBits | None = None
    # rows whose bytes this file holds (a writable file: written rows reach it when a cache writes them back;
    # an attached one: the rest live in an older link); None: every written row
    here: RowBits | None = None
    origin: str | None = None  # the checkpoint an attached older link came from (`SsdTable.attach`)

    @property
    def stored(self) -> RowBits:
        """The rows the file itself holds: ``here``, or (no older link) every written row."""
        return self.written if self.here is None else self.here

    @classmethod
    def fresh(cls, init: RowInit, num_rows: int) -> LazyRows:
        """A writable table of ``num_rows`` with nothing written yet."""
        return cls(init, RowBits(num_rows), None, RowBits(num_rows), RowBits(num_rows))

    def mark(self, ids: np.ndarray, stored: bool = True) -> None:
        """Rows ``ids`` (int64 [U]) were written: into the file (``stored``), or changed in a cache above
        that writes them back before it drops them (``stored=False``: until then the file holds nothing
        of theirs, so a write-back to a block of such rows needs no read first). Thread-safe: a cache's
        worker and the trainer mark."""
        pattern = RowBits.bytes_of(ids)
        with _MARK_LOCK:
            for bits in (self.written, self.changed, self.here if stored else None):
                if bits is not None:
                    bits.set_bytes(*pattern)

    def mark_range(self, start: int, end: int) -> None:
        with _MARK_LOCK:
            for bits in (self.written, self.changed, self.here):
                if bits is not None:
                    bits.mark_range(start, end)

    def take_changed(self) -> None:
        """A checkpoint now holds every row: nothing has changed since."""
        if self.changed is not None:
            self.changed.clear()

    def file_rows(self, ids: np.ndarray) -> np.ndarray:
        """Written rows ``ids`` (int64 [U]) -> their rows in the file."""
        return ids if self.slots is None else np.searchsorted(self.slots, ids)

    def fill(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Give the never-written rows among ``ids`` (int64 [U]) their initial values in ``rows``
        ([U, dim + state_dim] float32, as read from a sparse file: zeros there), in place; returns rows."""
        if ids.size:
            fresh = np.flatnonzero(~self.stored.test(ids))
            if fresh.size:
                rows[fresh, : self.init.dim] = self.init.rows(ids[fresh]).numpy()
                rows[fresh, self.init.dim :] = 0.0
        return rows

"""The table-file format: one embedding table's rows in one file, the same for the SSD tier and checkpoints.

A table file holds float32 rows ``[num_embeddings, dim + state_dim]`` -- each row's weights,
then its optimizer state -- row ``r`` at byte offset ``r * row_stride``, no header. Packed
files (checkpoints, and SSD working files by default) have ``row_stride = (dim + state_dim) * 4``;
an SSD working file may pad each row with zeros to a multiple of a sector (``row_stride``
recorded in its sidecar). Beside a working file, ``<path>.json`` (the *sidecar*) records
``num_embeddings``, ``dim``, ``state_dim``, ``dtype`` and, while the file is unchanged
since it was written, its ``sha256``; a checkpoint records the same checksum in its manifest.

A *row set* is how a checkpoint stores a lazy table (`tierec.storage.lazy`: rows that were never
written hold a counter-based function of (seed, table, row)): ``<name>.tbl`` holds only the
written rows, packed in ID order, and ``<name>.tbl.ids`` their IDs (int64, sorted). Writing and
reading it costs time and disk in proportion to the rows written, not to the table's size. Its
manifest entry says ``"layout": "rowset"`` and carries the `RowInit` of the other rows, the row
count, and one sha256 per chunk of ``ROWSET_CHUNK_IDS`` IDs (so a 1 TB table is verified as it
is read, chunk by chunk, never hashed as one file); ``sha256`` is the digest over the chunk
digests. The IDs file is listed on its own with its sha256. `tierec.storage.ssd.open_table_file`
opens either kind read-only for serving and evaluation.

This module owns the format and its checks: `stream_rows` writes a file (fsynced) while
hashing it, `write_table_file` / `read_table_file` write and load a table (dense or row set) from
and into any `TableStorage` while verifying it, `verify_file` checks a file against its manifest
entry, and `check_bytes` checks bytes already in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tierec.errors import CheckpointError
from tierec.fsio import sha256_file
from tierec.storage.base import join_rows
from tierec.storage.blockio import SequentialWriter
from tierec.storage.lazy import LazyRows, RowBits, RowInit

FORMAT = "tierec-table"
CHUNK_ROWS = 1 << 16  # rows per streamed block when writing or loading a whole file
# rows of a row set read by ID per piece: scattered rows of an O_DIRECT file cost a sector (512 B) each, so a piece
# moves up to 64 MiB of sectors through memory at a checkpoint; larger pieces let more of a checkpoint's reads share
# sectors and runs (docs/storage.md, "Checkpoints at 1.2x RAM")
ROWSET_READ_ROWS = 1 << 17
WRITE_AHEAD = 2  # pieces of a row set waiting for the writer's thread (`RowSetWriter`)
IDS_BUFFER = 1 << 20  # bytes of a row set's IDs gathered per O_DIRECT write (8 B a row; its rows' file: 8 MiB)
ROWSET_CHUNK_IDS = 1 << 20  # a row set's checksum chunk: the written rows among 1M consecutive IDs


def sidecar_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".json")


def read_sidecar(path: str | os.PathLike) -> dict | None:
    """The sidecar of table file ``path`` (None when there is none), checked for the shape keys."""
    side = sidecar_path(path)
    if not side.exists():
        return None
    try:
        meta = json.loads(side.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{side}: table sidecar is not valid JSON ({e}); delete it or recreate the table") from None
    if not isinstance(meta, dict) or not all(k in meta for k in ("num_embeddings", "dim", "state_dim")):
        raise CheckpointError(f"{side}: table sidecar lacks num_embeddings/dim/state_dim")
    return meta


def stream_rows(f, num_rows: int, block: Callable[[int, int], bytes], sync: bool = True) -> str:
    """Write rows ``[0, num_rows)`` to the open binary file ``f`` in blocks of `CHUNK_ROWS`
    (``block(a, b)``: the bytes of rows [a, b)), fsync it (``sync``; else the caller does); returns the sha256
    of what was written."""
    h = hashlib.sha256()
    for a in range(0, num_rows, CHUNK_ROWS):
        buf = block(a, min(a + CHUNK_ROWS, num_rows))
        h.update(buf)
        f.write(buf)
    f.flush()
    if sync:
        os.fsync(f.fileno())
    return h.hexdigest()


def row_bytes_of(storage, a: int, b: int) -> bytes:
    """Rows [a, b) of a `TableStorage` as packed table-file bytes (weights | state, float32)."""
    return join_rows(*storage.read_rows(a, b)).numpy().tobytes()


def ids_path(path: Path) -> Path:
    """A row set's IDs file: ``<path>.ids``."""
    return path.with_name(path.name + ".ids")


def write_table_file(path: Path, storage, delta: bool = False, sync: bool = True) -> dict[str, dict]:
    """Write a `TableStorage`'s rows at ``path``: a row set (rows read by ID, through its caches) when it tracks its
    written rows (``lazy_rows()``) -- with ``delta``, of the rows changed since the last checkpoint
    took them (an incremental checkpoint's link) -- else a packed file of every row. Returns the
    manifest entries of the files written, by file name (beside ``path``): {name: {bytes, sha256, ...}}.
    ``sync=False``: the files are closed but not fsynced (the caller fsyncs them, e.g. while the next
    table is read)."""
    lazy = storage.lazy_rows()
    if lazy is not None:
        if delta and lazy.changed is not None:
            return write_row_set(path, storage, lazy, lazy.changed, delta=True, sync=sync)
        return write_row_set(path, storage, lazy, lazy.written, sync=sync)
    with open(path, "wb") as f:
        sha = stream_rows(f, storage.num_embeddings, lambda a, b: row_bytes_of(storage, a, b), sync)
    return {path.name: {"bytes": path.stat().st_size, "sha256": sha}}


class RowSetWriter:
    """Writes the row set ``path`` (+ ``<path>.ids``) from rows given in ascending ID order, in pieces
    (`add`): one sha256 per chunk of `ROWSET_CHUNK_IDS` IDs as it goes, fsynced by `finish`. The hashing and
    writing run on a thread of their own, `WRITE_AHEAD` pieces behind `add` (both let go of the GIL), so
    that a checkpoint reads its next rows meanwhile -- from the second piece on: a row set of one piece (most
    tables of an incremental checkpoint) is written by `finish`, in the calling thread, with no thread to
    start and join."""

    def __init__(self, path: Path):
        self.path, self.ipath = path, ids_path(path)
        self._f, self._fi = SequentialWriter(path), SequentialWriter(self.ipath, IDS_BUFFER)
        self.chunks: list[list] = []
        self._root, self._ih = hashlib.sha256(), hashlib.sha256()
        self._chunk: tuple[int, int, Any] | None = None  # (chunk index, rows, its running sha256)
        self.count = 0
        self._queue: queue.Queue = queue.Queue(WRITE_AHEAD)
        self._error: BaseException | None = None
        self._first: tuple[np.ndarray, np.ndarray] | None = None  # the first piece, until a second one comes
        self._thread: threading.Thread | None = None

    def add(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Rows ``ids`` (int64 [n], ascending, above every ID added before) and their float32 rows [n, width]
        (neither changed afterwards: they are written later, on the writer's thread)."""
        if ids.size == 0:
            return
        self._raise()
        self.count += int(ids.size)
        if self._thread is None:
            if self._first is None:
                self._first = (ids, rows)
                return
            self._thread = threading.Thread(target=self._drain, name="tierec-rowset-writer", daemon=True)
            self._thread.start()
            self._queue.put(self._first)
            self._first = None
        self._queue.put((ids, rows))

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as e:  # noqa: BLE001 -- handed to the caller's next add / finish
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _write(self, ids: np.ndarray, rows: np.ndarray) -> None:
        j = ids // ROWSET_CHUNK_IDS
        cuts = np.flatnonzero(j[1:] != j[:-1]) + 1
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), ids.size], strict=True):
            if self._chunk is None or self._chunk[0] != int(j[a]):
                self._close_chunk()
                self._chunk = (int(j[a]), 0, hashlib.sha256())
            data = np.ascontiguousarray(rows[a:b], dtype=np.float32).data.cast("B")  # no copy where contiguous
            k, n, h = self._chunk
            h.update(data)
            self._chunk = (k, n + b - a, h)
            self._f.write(data)
        raw = np.ascontiguousarray(ids, dtype=np.int64).data.cast("B")
        self._fi.write(raw)
        self._ih.update(raw)

    def _close_chunk(self) -> None:
        if self._chunk is not None and self._chunk[1]:
            digest = self._chunk[2].hexdigest()
            self.chunks.append([self._chunk[0], self._chunk[1], digest])
            self._root.update(digest.encode())
        self._chunk = None

    def finish(self, init: RowInit, delta: bool = False, sync: bool = True) -> dict[str, dict]:
        """Close and (``sync``) fsync both files; their manifest entries by file name."""
        self._stop()
        self._raise()
        if self._first is not None:
            self._write(*self._first)
            self._first = None
        self._close_chunk()
        for g in (self._f, self._fi):
            g.close(sync)
        entry = {"bytes": self.path.stat().st_size, "sha256": self._root.hexdigest(), "layout": "rowset",
                 "rows": self.count, "init": init.to_json(), "chunk_ids": ROWSET_CHUNK_IDS, "chunks": self.chunks,
                 "ids": self.ipath.name}
        if delta:
            entry["delta"] = True
        return {self.path.name: entry, self.ipath.name: {"bytes": self.ipath.stat().st_size,
                                                          "sha256": self._ih.hexdigest()}}

    def close(self) -> None:
        """Close the files without publishing them (after an error)."""
        self._stop()
        self._first = None
        self._f.discard()
        self._fi.discard()


def write_row_set(path: Path, storage, lazy: LazyRows, which: RowBits, delta: bool = False,
                  sync: bool = True) -> dict[str, dict]:
    """Rows ``which`` of ``storage`` as a row set (see the module doc); ``sync`` as `write_table_file`."""
    w = RowSetWriter(path)
    try:
        for ids, rows in _rows_by_id(storage, which):
            w.add(ids, rows)
        return w.finish(lazy.init, delta, sync)
    finally:
        w.close()


def _rows_by_id(storage, which: RowBits):
    """(IDs int64 [k], rows float32 [k, dim + state_dim]) of rows ``which`` of ``storage``, in ID order,
    `ROWSET_READ_ROWS` at a time whatever chunks they span (bounded memory: an O_DIRECT read of scattered rows
    moves a sector each; at 1.2x RAM a chunk held ~27K changed rows, and per-read costs dominated), read with
    ``storage.read_each`` (a cache reads the next piece's misses meanwhile)."""
    asked: deque[np.ndarray] = deque()  # the pieces handed to read_each and not yet back: 2 or 3

    def pieces():
        n, held = storage.num_embeddings, np.empty(0, np.int64)
        for a in range(0, n, ROWSET_CHUNK_IDS):
            ids = which.ids(a, min(a + ROWSET_CHUNK_IDS, n))
            held = np.concatenate([held, ids]) if held.size else ids
            last = a + ROWSET_CHUNK_IDS >= n
            while held.size >= ROWSET_READ_ROWS or (last and held.size):
                asked.append(held[:ROWSET_READ_ROWS])
                held = held[ROWSET_READ_ROWS:]  # a view: the rest is copied once, with the next chunk's IDs
                yield torch.from_numpy(asked[-1])

    for rows in storage.read_each(pieces()):
        yield asked.popleft(), rows.numpy()


def write_row_set_part(path: Path, storage, which: RowBits, offset: int) -> None:
    """One shard's part of a row set (torchrun): rows ``which`` of ``storage`` (a shard holding a table's rows
    ``[offset, offset + num_embeddings)``) to ``path``, their whole-table IDs to ``<path>.ids``; unhashed,
    for `merge_row_set_parts` to join."""
    with open(path, "wb") as f, open(ids_path(path), "wb") as fi:
        for ids, rows in _rows_by_id(storage, which):
            f.write(rows.tobytes())
            fi.write((ids + offset).tobytes())


def merge_row_set_parts(path: Path, parts: list[Path], width: int, init: RowInit, delta: bool = False) -> dict[str, dict]:
    """The row set ``path`` of a table from its shards' parts (`write_row_set_part`; ``parts`` in row order,
    disjoint row ranges), read 64K rows at a time; manifest entries as `write_row_set`'s."""
    w = RowSetWriter(path)
    try:
        for part in parts:
            n = ids_path(part).stat().st_size // 8
            for a in range(0, n, CHUNK_ROWS):
                k = min(CHUNK_ROWS, n - a)
                ids = np.fromfile(ids_path(part), dtype=np.int64, count=k, offset=a * 8)
                rows = np.fromfile(part, dtype=np.float32, count=k * width, offset=a * width * 4).reshape(k, width)
                w.add(ids, rows)
        return w.finish(init, delta)
    finally:
        w.close()


def is_row_set(expect: dict) -> bool:
    return expect.get("layout") == "rowset"


def is_delta(expect: dict) -> bool:
    """A row set of the rows changed since the previous checkpoint (the others: in the chain below)."""
    return is_row_set(expect) and bool(expect.get("delta"))


def row_set_init(expect: dict, path: Path) -> RowInit:
    try:
        return RowInit.from_json(expect["init"])
    except (KeyError, TypeError, ValueError) as e:
        raise _mismatch(path, f"row set without a valid 'init' in the manifest ({e}); the manifest is corrupt") from None


def read_row_set_ids(path: Path, ids_expect: dict | None, expect: dict, num_rows: int) -> np.ndarray:
    """The IDs of row set ``path`` (int64 [K], sorted), checked against the manifest and the table's rows."""
    ipath = ids_path(path)
    if ids_expect is None:
        raise _mismatch(ipath, "row set IDs file is not listed in the manifest")
    if not ipath.is_file():
        raise _mismatch(ipath, "listed in the checkpoint manifest but missing")
    data = ipath.read_bytes()
    check_bytes(ipath, data, ids_expect)
    ids = np.frombuffer(data, dtype=np.int64).copy()
    if ids.size != expect.get("rows") or (ids.size and (ids[0] < 0 or ids[-1] >= num_rows
                                                         or not np.all(ids[1:] > ids[:-1]))):
        raise _mismatch(ipath, f"row set IDs are not {expect.get('rows')} sorted IDs in [0, {num_rows}); corrupt")
    return ids


def _row_set_chunks(path: Path, expect: dict, ids: np.ndarray, width: int):
    """Yield (chunk index, IDs, rows float32 [k, width]) of row set ``path``, each chunk's sha256 checked."""
    if path.stat().st_size != ids.size * width * 4:
        raise _mismatch(path, f"{path.stat().st_size} bytes, expected {ids.size * width * 4} ({ids.size} rows x "
                              f"{width} float32); truncated or not this checkpoint's")
    pos = 0
    with open(path, "rb") as f:
        for j, k, digest in expect["chunks"]:
            h = hashlib.sha256()
            for a in range(0, k, CHUNK_ROWS):  # 64K rows at a time: bounded memory; a bad chunk stops the read
                b = min(a + CHUNK_ROWS, k)
                raw = f.read((b - a) * width * 4)
                h.update(raw)
                if len(raw) != (b - a) * width * 4 or (b == k and h.hexdigest() != digest):
                    raise _mismatch(path, f"chunk {j} (rows {pos}..{pos + k - 1} of the file) does not match its "
                                          "sha256 in the checkpoint manifest (corrupt table file)")
                yield j, ids[pos + a : pos + b], np.frombuffer(raw, dtype=np.float32).reshape(b - a, width).copy()
            pos += k
    if pos != ids.size:
        raise _mismatch(path, f"chunks cover {pos} rows, the manifest says {ids.size}; the manifest is corrupt")


def read_row_set(path: Path, storage, expect: dict, ids_expect: dict | None) -> None:
    """Load row set ``path`` into ``storage``. A delta (`is_delta`) and a base going into a fresh store of
    the same `RowInit` (nothing written yet) write only their rows; a base going anywhere else
    writes every row (initial values between them)."""
    n, d = storage.num_embeddings, storage.dim
    width = d + storage.state_dim
    init = row_set_init(expect, path)
    ids = read_row_set_ids(path, ids_expect, expect, n)
    mine = storage.lazy_rows()
    if is_delta(expect) or (mine is not None and mine.init == init and mine.written.count() == 0):
        for _, cid, rows in _row_set_chunks(path, expect, ids, width):
            t = torch.from_numpy(rows)
            storage.write(torch.from_numpy(cid), t[:, :d], t[:, d:])
        return
    chunks = _row_set_chunks(path, expect, ids, width)
    nxt = next(chunks, None)
    for j, a in enumerate(range(0, n, ROWSET_CHUNK_IDS)):
        parts = []  # this range's written rows (a fallback for untracked stores: up to 1M rows held)
        while nxt is not None and nxt[0] == j:
            parts.append(nxt[1:])
            nxt = next(chunks, None)
        cid = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
        rows = np.concatenate([p[1] for p in parts]) if parts else np.empty((0, width), np.float32)
        b = min(a + ROWSET_CHUNK_IDS, n)
        for c in range(a, b, CHUNK_ROWS):
            e = min(c + CHUNK_ROWS, b)
            w, s = init.range(c, e), torch.zeros(e - c, storage.state_dim)
            sel = (cid >= c) & (cid < e)
            r = torch.from_numpy(rows[sel])
            w[cid[sel] - c], s[cid[sel] - c] = r[:, :d], r[:, d:]
            storage.write_rows(c, w, s)
    if nxt is not None:
        raise _mismatch(path, f"chunk {nxt[0]} lies beyond the table's {n} rows; the manifest is corrupt")


def verify_row_set(path: Path, expect: dict, ids_expect: dict | None, num_rows: int, width: int) -> np.ndarray:
    """Check row set ``path`` (its IDs file, then every chunk of rows); returns its IDs."""
    ids = read_row_set_ids(path, ids_expect, expect, num_rows)
    for _ in _row_set_chunks(path, expect, ids, width):
        pass
    return ids


def _mismatch(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def check_size(path: Path, size: int, expect: dict) -> None:
    if size != expect["bytes"]:
        raise _mismatch(path, f"{size} bytes, manifest says {expect['bytes']} (truncated or not this checkpoint's)")


def check_bytes(path: Path, data: bytes, expect: dict) -> None:
    """``data`` (the content of ``path``) against ``expect`` = {bytes, sha256}."""
    check_size(path, len(data), expect)
    if hashlib.sha256(data).hexdigest() != expect["sha256"]:
        raise _mismatch(path, "sha256 does not match the checkpoint manifest (corrupt file)")


def verify_table_file(ckpt: Path, files: dict, rel: str, num_rows: int, width: int) -> None:
    """Check table file ``ckpt / rel`` against the manifest's ``files``: a row set chunk by chunk, else
    size and sha256."""
    expect = files[rel]
    if is_row_set(expect):
        verify_row_set(ckpt / rel, expect, files.get(rel + ".ids"), num_rows, width)
    else:
        verify_file(ckpt / rel, expect)


def verify_file(path: Path, expect: dict) -> None:
    """Check a file's size and sha256 against ``expect`` = {bytes, sha256} (streams the file)."""
    if not path.is_file():
        raise _mismatch(path, "listed in the checkpoint manifest but missing")
    check_size(path, path.stat().st_size, expect)
    if sha256_file(path) != expect["sha256"]:
        raise _mismatch(path, "sha256 does not match the checkpoint manifest (corrupt file)")


def read_table_file(path: Path, storage, expect: dict, ids_expect: dict | None = None) -> None:
    """Load the table file ``path`` into ``storage``, verifying it as it reads (a mismatch:
    `CheckpointError`, naming it): a row set (`read_row_set`; ``ids_expect``: its IDs file's
    entry), or a packed file of every row (``write_rows``), its size checked against the table's
    shape and ``expect`` and its sha256."""
    if is_row_set(expect):
        read_row_set(path, storage, expect, ids_expect)
        return
    n, d, s = storage.num_embeddings, storage.dim, storage.state_dim
    width = d + s
    if not path.is_file():
        raise _mismatch(path, "table file is missing")
    size = path.stat().st_size
    if size != n * width * 4:
        raise _mismatch(path, f"{size} bytes, expected {n * width * 4} ({n} rows x {width} float32); the file is "
                              "truncated or does not belong to this checkpoint")
    check_size(path, size, expect)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for a in range(0, n, CHUNK_ROWS):
            b = min(a + CHUNK_ROWS, n)
            raw = f.read((b - a) * width * 4)
            h.update(raw)
            rows = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).reshape(b - a, width).copy())
            storage.write_rows(a, rows[:, :d], rows[:, d:])
    if h.hexdigest() != expect["sha256"]:
        raise _mismatch(path, "sha256 does not match the checkpoint manifest (corrupt table file)")

"""One embedding table in one file on local disk (the SSD tier).

File format: the table-file format (`tierec.storage.tablefile`), as checkpoints:
float32 rows ``[num_embeddings, dim + state_dim]``, row ``r`` at byte offset
``r * (dim + state_dim) * 4``, weights then optimizer state, no header. A
checkpoint's ``tables/<name>.tbl`` can be opened as an `SsdTable` and an
`SsdTable` file can be loaded as a checkpoint table file.

``row_align`` (bytes, a power of two; 0 = packed, the default) pads every row to
a multiple of it: row ``r`` at byte offset ``r * row_stride``, zeros after its
floats. With ``row_align=512`` on a device that takes 512-byte direct I/O, no two
rows share a sector, so a write needs no read-modify-write and a cache's
write-back and misses go to the device in one batch (`exchange`): fewer I/Os
than packed rows, for a larger file (see docs/storage.md). The
sidecar records ``row_stride``; such a file is a working file of training, not
a checkpoint table file (checkpoints are written packed, through ``read_rows``).

Beside it, ``<path>.json`` (the *sidecar*, optional when opening) records
``num_embeddings``, ``dim``, ``state_dim``, ``dtype`` and, while the file is
unchanged since it was created, its ``sha256``. Opening a file whose size or
sidecar does not match the arguments raises `CheckpointError`.

Lazy files (``init="lazy"``, what training creates): the file is sized with ``ftruncate`` --
sparse, O(1) at any size, no disk used -- and a row gets its initial value
(`tierec.storage.lazy.RowInit`, recorded in the sidecar) the first time it is read; one bit per
row (`RowBits`, in memory, saved to ``<path>.written`` on close) says which rows were written
since. Reads of never-written rows cost no I/O at all; every reader sees ``file row if written
else RowInit(row)`` with zero optimizer state, so training is bit-identical to an eagerly
initialised file.

I/O modes:

* default (``direct_io=False``): a numpy memmap of the file; a batch of rows
  is read or written with one vectorised fancy-indexing operation (the kernel
  pages the 4 KiB pages in and out through the page cache).
* ``direct_io=True``: bypasses the page cache with ``O_DIRECT``. The rows of a
  batch are mapped to the 4 KiB blocks that hold them, overlapping/adjacent
  blocks are coalesced into runs (vectorised; `tierec.storage.blockio`), and
  the runs are read into a page-aligned buffer in one Linux AIO batch, or with
  one ``os.preadv`` per run where AIO is not available. Writes are read-modify-write of those
  blocks (a row shares its blocks with its neighbours); the last partial block
  of the file, which ``O_DIRECT`` cannot write without extending the file, is
  written through the page cache and dropped from it with
  ``posix_fadvise(DONTNEED)``. Where the filesystem refuses ``O_DIRECT``
  (tmpfs, some overlays) the same block I/O goes through the page cache
  followed by ``posix_fadvise(DONTNEED)`` on the range, and a warning says so.
* ``row_log=capacity`` (a new lazy O_DIRECT working file; what training creates for
  packed rows): a write-back log region after the rows (`tierec.storage.rowlog`).
  Writes are appended there in whole blocks instead of read-modify-written in place
  (the rows a full map cannot take still are), `slots_of` finds moved rows through
  its map, and batched reads use the device's smallest direct read (``read_align``:
  a 512-byte sector where the device takes it) since nothing is written by sector.
  Write-backs may carry a placement rank (``exchange``'s ``write_rank``: when each is
  read back), the order they are appended in.

Several tables' rows in one pass (`read_many`, `exchange_many`) are in `tierec.storage.multifile`.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import overload

import numpy as np
import torch

from tierec.errors import CheckpointError, ConfigError
from tierec.fsio import atomic_write_bytes, fsync_dir, sha256_file, umask
from tierec.sparse.dedup import expand_ranges
from tierec.storage import aio, blockio
from tierec.storage.base import WorkingSet
from tierec.storage.blockio import ALIGN, MAX_IO, BlockPlan
from tierec.storage.layout import HotLayout
from tierec.storage.lazy import LazyRows, RowBits, RowInit
from tierec.storage.multifile import exchange_many, read_many, write_block_runs
from tierec.storage.rowlog import RowLog, block_rows, recent_sectors
from tierec.storage.tablefile import (
    FORMAT,
    is_delta,
    is_row_set,
    read_row_set_ids,
    read_sidecar,
    row_set_init,
    sidecar_path,
    stream_rows,
    verify_file,
    verify_row_set,
)

log = logging.getLogger(__name__)

FAULT_AROUND_BYTES = 64 << 10  # Linux maps up to this much around a faulting file page (read faults)
PAGE_BYTES = 4096  # a write fault on a shared file mapping maps just its page
RSS_RELEASE_BYTES = 8 << 20  # mapped bytes touched before the map's pages are dropped from RSS


class SsdTable:
    """A table's rows (weights + optimizer state) in a fixed-offset row file. Implements ``TableStorage``.

    ``create=True`` (re)creates the file: ``init="lazy"`` sizes it with ``ftruncate`` (sparse,
    instant at any size) and gives each row ``RowInit(init_seed, table_index, num_embeddings,
    dim)`` when first read (see the module doc); ``init="random"`` writes those values up front,
    streaming 64K-row chunks into a temp file renamed over ``path`` (constant memory, atomic);
    ``init="zeros"``: a sparse file of zero rows. Opening an existing lazy file takes its
    `RowInit` from the sidecar, or from ``lazy_init`` (a checkpoint's table file, whose manifest
    holds it), and its written rows from ``<path>.written``; with ``slots`` (int64 [K], sorted;
    read-only) the file is a checkpoint's row set: just the written rows, packed in ID order, row
    ``slots[k]`` at file row ``k``; ``older`` (a row set of an earlier checkpoint) then holds the
    rows this one does not (a chain of incremental checkpoints, read newest first). ``readonly=True``
    opens the file without write access. ``row_log`` (a new lazy O_DIRECT file): the capacity of a
    write-back log after the rows (module doc); a working file created with one reopens with it.
    ``log_staging``: the rows its log may stage by placement rank (`tierec.storage.rowlog`, memory);
    ``log_recent``: bytes of the log's recently read sectors held in memory (`tierec.storage.rowlog.RecentSectors`).
    """

    def __init__(self, path: str | os.PathLike, num_embeddings: int, dim: int, state_dim: int, *,
                 create: bool = False, init_seed: int | None = None, table_index: int = 0,
                 direct_io: bool = False, init: str = "random", readonly: bool = False, row_align: int = 0,
                 lazy_init: RowInit | None = None, slots: np.ndarray | None = None, older: SsdTable | None = None,
                 layout: HotLayout | None = None, row_log: int = 0, log_staging: int = 0, log_recent: int = 0):
        if num_embeddings <= 0 or dim <= 0 or state_dim < 0:
            raise ConfigError(f"{path}: bad table shape {num_embeddings} rows x (dim {dim} + state {state_dim})")
        row_align = check_row_align(row_align, f"{path}: row_align")
        if init not in ("random", "zeros", "lazy"):
            raise ConfigError(f"{path}: init must be 'lazy', 'random' or 'zeros', got {init!r}")
        self.path = Path(path)
        self.num_embeddings, self.dim, self.state_dim = int(num_embeddings), int(dim), int(state_dim)
        self.width = self.dim + self.state_dim
        self.row_bytes = self.width * 4
        self.row_align = row_align
        # bytes from one row's start to the next: the row, padded with zeros to a multiple of row_align
        self.row_stride = -(-self.row_bytes // row_align) * row_align if row_align else self.row_bytes
        if slots is not None and not (readonly and lazy_init is not None):
            raise ConfigError(f"{path}: a row set (slots) opens read-only, with its lazy_init")
        if older is not None and slots is None:
            raise ConfigError(f"{path}: only a row set opens with an older link (a working file: attach)")
        self.older = older  # an incremental checkpoint's row set: the link below it in the chain
        if layout is not None and not (create and init == "lazy"):
            raise ConfigError(f"{path}: a hot-row layout is for a new lazy working file (create=True, init='lazy')")
        if not create and slots is None and layout_path(self.path).exists():  # a working file laid out by hotness
            layout = read_layout(layout_path(self.path), self.num_embeddings)
        self.layout = layout  # where rows sit in the file (None: row r at file row r)
        if slots is not None:
            self.file_rows = int(slots.size)  # rows the file holds
        else:
            self.file_rows = self.num_embeddings if layout is None else layout.file_rows_total
        self.home_rows = self.file_rows  # rows before a write-back log (`tierec.storage.rowlog`)
        if row_log and not (create and init == "lazy" and direct_io):
            raise ConfigError(f"{path}: a write-back log is for a new lazy O_DIRECT working file")
        if not create and slots is None:  # a working file with a log: its capacity is recorded
            row_log = int((read_sidecar(self.path) or {}).get("row_log", {}).get("capacity", 0))
            if row_log and not direct_io:
                raise ConfigError(f"{path}: a working file with a write-back log opens with direct_io=True")
        self._log_base = -(-self.home_rows // block_rows(self.row_stride)) * block_rows(self.row_stride)
        if row_log:
            self.file_rows = self._log_base + RowLog.region_rows(row_log, self.row_stride, self.num_embeddings)
        self._log_capacity, self._log_staging, self._log_recent = int(row_log), int(log_staging), int(log_recent)
        self.row_log: RowLog | None = None  # set once the file is open
        self.file_bytes = self.file_rows * self.row_stride
        self.align = ALIGN  # block size of direct I/O (a smaller one where the device takes it: see below)
        self.device = torch.device("cpu")
        self.readonly = readonly
        self._lazy: LazyRows | None = None
        if create:
            if readonly:
                raise ConfigError(f"{path}: cannot create a table file read-only")
            self._create(init, init_seed, table_index, lazy_init)
        self._sidecar = self._check()
        self._sha_valid = "sha256" in self._sidecar
        if not create and (lazy_init is not None or "lazy" in self._sidecar):
            self._open_lazy(lazy_init or RowInit.from_json(self._sidecar["lazy"]), slots)
        self._mm: np.memmap | None = None
        self._fd = -1  # O_DIRECT descriptor (direct mode only)
        self._bfd = -1  # buffered descriptor (direct mode: tails and fallback)
        self._rfd = -1  # buffered read-only descriptor (memmap mode: batched reads)
        self.direct_io = bool(direct_io)
        self.odirect = False  # whether O_DIRECT is really in use
        if self.direct_io:
            self._bfd = os.open(self.path, os.O_RDONLY if readonly else os.O_RDWR)
            try:
                self._fd = (blockio.open_direct(self.path) if not readonly
                            else os.open(self.path, os.O_RDONLY | os.O_DIRECT))
                self.odirect = True
            except (OSError, AttributeError) as e:
                self._direct_fallback(e)
            if self.odirect and row_align and row_align < ALIGN and self.row_stride % row_align == 0:
                self.align = blockio.direct_align(self._fd, row_align, self.file_bytes)
        elif self.file_rows:
            self._mm = np.memmap(self.path, dtype=np.float32, mode="r" if readonly else "r+",
                                 shape=(self.file_rows, self.row_stride // 4))
            self._rfd = os.open(self.path, os.O_RDONLY)  # batched reads: preadv lanes, not page faults
            if hasattr(os, "posix_fadvise"):  # random rows: no kernel read-ahead around each one
                os.posix_fadvise(self._rfd, 0, 0, os.POSIX_FADV_RANDOM)
            if hasattr(mmap, "MADV_RANDOM") and self._mm is not None:  # random rows: no read-ahead of whole files
                self._mm._mmap.madvise(mmap.MADV_RANDOM)  # type: ignore[attr-defined]  # numpy stubs omit memmap._mmap
        # block size of reads: with a write-back log, the device's smallest direct read (nothing is written
        # back in place, where sector-sized writes of packed rows would cost the device a read)
        self.read_align = self.align
        if self._log_capacity:
            if self.odirect:
                self.read_align = blockio.direct_align(self._fd, blockio.SECTOR, self.file_bytes)
            self.row_log = RowLog(self.path, self._fd if self.odirect else self._bfd, self._log_base,
                                  self._log_capacity, self.width, self.row_stride, self.num_embeddings,
                                  staged=self._log_staging, recent=recent_sectors(self._log_recent, self.read_align),
                                  sector=self.read_align)
            if not create:
                self._load_log()
        # the rows' floats in the map (a strided view of it when rows are padded); None: not memory-mapped
        self._mrows: np.ndarray | None = self._mm
        if self._mm is not None and self.row_stride != self.row_bytes:
            self._mrows = self._mm[:, : self.width]
        self._mapped_bytes = 0
        self.reset_stats()

    @property
    def direct_fd(self) -> int:
        """The O_DIRECT descriptor (-1 when O_DIRECT is not in use)."""
        return self._fd

    @property
    def buffered_fd(self) -> int:
        """The buffered descriptor of direct mode: a file's partial last block, the fallback (-1 in memmap mode)."""
        return self._bfd

    @property
    def exclusive_blocks(self) -> bool:
        """True when every direct-I/O block holds bytes of one row only (padded rows, ``row_stride`` a
        multiple of ``align``): writes then need no read-modify-write."""
        return self.odirect and self.row_stride % self.align == 0

    # ------------------------------------------------------------------ file creation and checks
    @classmethod
    def open(cls, path: str | os.PathLike, **kw) -> SsdTable:
        """Open an existing table file, taking its shape from the sidecar ``<path>.json``."""
        meta = read_sidecar(Path(path))
        if meta is None:
            raise CheckpointError(f"{sidecar_path(path)}: no sidecar; pass num_embeddings, dim and state_dim")
        if "row_stride" in meta and "row_align" not in kw:
            kw["row_align"] = _align_of(int(meta["row_stride"]))
        return cls(path, meta["num_embeddings"], meta["dim"], meta["state_dim"], **kw)

    def _meta(self, sha256: str | None) -> dict:
        m = {"format": FORMAT, "num_embeddings": self.num_embeddings, "dim": self.dim,
             "state_dim": self.state_dim, "dtype": "float32", "row_bytes": self.row_bytes}
        if self.row_stride != self.row_bytes:
            m["row_stride"] = self.row_stride
        if self._lazy is not None:
            m["lazy"] = self._lazy.init.to_json()
        if self.layout is not None:
            m["hot_rows"] = self.layout.hot_rows
            m["hot_sha256"] = self.layout.sha256()
        if self._log_capacity:
            m["row_log"] = self.row_log.state() if self.row_log is not None else {"capacity": self._log_capacity,
                                                                                   "active": 0, "head": 0}
        if sha256 is not None:
            m["sha256"] = sha256
        return m

    def _create(self, init: str, seed: int | None, table_index: int, lazy_init: RowInit | None) -> None:
        """A new file; ``lazy_init``: a lazy file's initial rows when not (``seed``, ``table_index``, its rows)."""
        if init != "zeros" and seed is None:
            raise ConfigError(f"{self.path}: create=True with init={init!r} needs init_seed")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        side = sidecar_path(self.path)
        if side.exists():  # a crash between the renames below must not leave a stale sidecar
            side.unlink()
        written_path(self.path).unlink(missing_ok=True)
        layout_path(self.path).unlink(missing_ok=True)
        log_path(self.path).unlink(missing_ok=True)
        RowLog.run_path(log_path(self.path)).unlink(missing_ok=True)
        if self.layout is not None:
            atomic_write_bytes(layout_path(self.path), self.layout.hot.tobytes())
        row_init = None if seed is None else RowInit(seed, table_index, self.num_embeddings, self.dim)
        if init == "lazy":
            assert row_init is not None
            self._lazy = LazyRows.fresh(lazy_init or row_init, self.num_embeddings)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        sha = None
        try:
            os.fchmod(fd, 0o666 & ~umask())
            if init in ("zeros", "lazy"):
                os.ftruncate(fd, self.file_bytes)
            else:
                assert row_init is not None  # init "random" needs a seed: checked above
                pad = (self.row_stride - self.row_bytes) // 4  # floats of zeros after each row

                def block(a: int, b: int) -> bytes:  # initial weights, zero state and padding
                    w = row_init.range(a, b)
                    return torch.cat([w, torch.zeros(b - a, self.state_dim + pad)], 1).numpy().tobytes()

                with os.fdopen(os.dup(fd), "wb") as f:
                    sha = stream_rows(f, self.num_embeddings, block)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, self.path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fsync_dir(self.path.parent)
        atomic_write_bytes(side, json.dumps(self._meta(sha), indent=2).encode())

    def _check(self) -> dict:
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: table file does not exist")
        meta = read_sidecar(self.path) or {}
        if meta:
            got = (meta.get("num_embeddings"), meta.get("dim"), meta.get("state_dim"), meta.get("dtype", "float32"))
            want = (self.num_embeddings, self.dim, self.state_dim, "float32")
            if got != want:
                raise CheckpointError(
                    f"{self.path}: its sidecar {sidecar_path(self.path).name} describes {got[0]} rows x (dim {got[1]} "
                    f"+ state {got[2]}) {got[3]}, but this table is {want[0]} rows x (dim {want[1]} + state "
                    f"{want[2]}) float32 (a different table or optimizer?)")
            hot = (self.layout.hot_rows, self.layout.sha256()) if self.layout is not None else (0, None)
            if (int(meta.get("hot_rows", 0)), meta.get("hot_sha256")) != hot:
                raise CheckpointError(
                    f"{self.path}: its sidecar records {meta.get('hot_rows', 0)} rows laid out by hotness, but "
                    f"{layout_path(self.path).name} holds {hot[0]} (or other rows): the layout file is missing, "
                    "truncated or not this table's")
            stride = int(meta.get("row_stride", self.row_bytes))
            if stride != self.row_stride:
                raise CheckpointError(
                    f"{self.path}: its sidecar {sidecar_path(self.path).name} says rows are {stride} bytes apart, but "
                    f"this table was opened with row_stride {self.row_stride} (row_align={self.row_align}); open it "
                    "with SsdTable.open or the row_align it was created with")
        size = self.path.stat().st_size
        if size != self.file_bytes:
            pad = f", padded to {self.row_stride} B" if self.row_stride != self.row_bytes else ""
            raise CheckpointError(
                f"{self.path}: {size} bytes, expected {self.file_bytes} ({self.num_embeddings} rows x "
                f"{self.width} float32 = dim {self.dim} + state {self.state_dim}{pad}); the table file is truncated "
                "or belongs to a different table/optimizer")
        return meta

    def _open_lazy(self, init: RowInit, slots: np.ndarray | None) -> None:
        """Take ``init`` and the written rows: ``slots``, or those of ``<path>.written`` (none yet when
        that file is absent and the file holds no data)."""
        wpath = written_path(self.path)
        nbytes = (self.num_embeddings + 7) // 8
        if slots is not None:
            bits = RowBits(self.num_embeddings)
            bits.mark(self.check_ids(slots))
        elif wpath.is_file():
            data = np.fromfile(wpath, dtype=np.uint8)
            if data.size != nbytes:
                raise CheckpointError(f"{wpath}: {data.size} bytes, expected {nbytes} (one bit per row of "
                                      f"{self.num_embeddings}); the file is truncated or not this table's")
            bits = RowBits(self.num_embeddings, data)
        elif _allocated_bytes(self.path) == 0:
            bits = RowBits(self.num_embeddings)
        else:
            raise CheckpointError(f"{wpath}: missing; without it the lazy table file {self.path.name} cannot say "
                                  "which of its rows were written")
        writable = not self.readonly
        self._lazy = LazyRows(init, bits, slots, bits.copy() if writable else None, bits.copy() if writable else None)

    def lazy_rows(self) -> LazyRows | None:
        """The rows written since creation and the `RowInit` of every other row (lazy files), else None."""
        return self._lazy

    def attach(self, older: SsdTable, origin: str) -> None:
        """Resume copy-on-write: a new lazy working file (nothing written yet) takes checkpoint ``origin``'s
        rows by linking its row sets (``older``, `open_table_chain`) below itself instead of copying
        them. Reads of rows this file does not hold go to ``older``; a row written here shadows it
        from then on. The rows count as written (checkpoints hold them) but not as changed."""
        lazy = self._lazy
        if lazy is None or self.readonly or lazy.written.count():
            raise CheckpointError(f"{self.path}: only a fresh lazy working file takes an older link")
        lazy.written.update(older.chain_written())  # every row the chain holds differs from its initial value
        lazy.here = RowBits(self.num_embeddings)
        lazy.origin = origin
        self.older = older

    def chain_written(self) -> RowBits:
        """The rows written in this row set and every older link below it (a fresh bitmap)."""
        out = RowBits(self.num_embeddings)
        link: SsdTable | None = self
        while link is not None:
            lazy = link.lazy_rows()
            if lazy is None:
                raise CheckpointError(f"{link.path}: a dense table file in a chain of row sets")
            out.update(lazy.written)
            link = link.older
        return out

    def save_written(self) -> None:
        """Write the written-rows bitmap to ``<path>.written`` (atomically; `close` does it)."""
        if self._lazy is not None and not self.readonly and (self._lazy.written.count()
                                                             or written_path(self.path).exists()):
            atomic_write_bytes(written_path(self.path), self._lazy.written.data.tobytes())

    def _save_log(self) -> None:
        """The write-back log's map to ``<path>.log`` and its position to the sidecar (`close` does it)."""
        if self.row_log is None or self.readonly:
            return
        self._unstage(None)
        self.row_log.save(log_path(self.path))
        self._sidecar = {**self._sidecar, "row_log": self.row_log.state()}
        atomic_write_bytes(sidecar_path(self.path), json.dumps(self._sidecar, indent=2).encode())

    def _load_log(self) -> None:
        assert self.row_log is not None
        lpath = log_path(self.path)
        if lpath.is_file():
            self.row_log.load(lpath, self._sidecar["row_log"])
        elif self._lazy is not None and self._lazy.written.count():
            raise CheckpointError(f"{lpath}: missing; without it the rows {self.path.name} moved to its write-back "
                                  "log cannot be found")

    def verify(self) -> bool:
        """Recompute the file's sha256 and compare it with the sidecar's; False when none is recorded."""
        if "sha256" not in self._sidecar or not self._sha_valid:
            return False
        self.flush()
        if sha256_file(self.path) != self._sidecar["sha256"]:
            raise CheckpointError(f"{self.path}: sha256 does not match its sidecar (corrupt table file)")
        return True

    def prepare_write(self) -> None:
        """Call before writing: CheckpointError if opened read-only; drops the sidecar's sha256 (stale)."""
        if self.readonly:
            raise CheckpointError(f"{self.path}: table file was opened read-only")
        if self._sha_valid:  # the recorded checksum no longer describes the file
            self._sha_valid = False
            self._sidecar = self._meta(None)
            atomic_write_bytes(sidecar_path(self.path), json.dumps(self._sidecar, indent=2).encode())

    # ------------------------------------------------------------------ batched row I/O
    def check_ids(self, ids: torch.Tensor | np.ndarray) -> np.ndarray:
        """Row IDs (tensor or array, any shape) -> int64 numpy [U]; IndexError naming the file if out of range."""
        if isinstance(ids, np.ndarray):
            ids_np = ids.astype(np.int64, copy=False).reshape(-1)
        else:
            ids_np = ids.detach().to("cpu", torch.int64).numpy().reshape(-1)
        if ids_np.size and (ids_np.min() < 0 or ids_np.max() >= self.num_embeddings):
            raise IndexError(f"{self.path}: row ids must be in [0, {self.num_embeddings}), "
                             f"got [{ids_np.min()}, {ids_np.max()}]")
        return ids_np

    def _split(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(rows)
        if self.state_dim == 0:
            return t, t[:, :0]
        return t[:, : self.dim].contiguous(), t[:, self.dim:].contiguous()

    def _join(self, w: torch.Tensor, s: torch.Tensor) -> np.ndarray:
        w = w.detach().to("cpu", torch.float32)
        if self.state_dim == 0:
            return w.contiguous().numpy()
        return torch.cat([w, s.detach().to("cpu", torch.float32)], 1).numpy()

    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``ids`` (int64 [U], any order) -> (weights [U, dim], state [U, state_dim]), fresh tensors.
        A read of ``LANE_MIN_ROWS`` or more rows goes through `tierec.storage.multifile.read_many`
        (one AIO batch, or concurrent preadv lanes). A bulk read (checkpoints, evaluation; a cache's misses go
        through `exchange`): rows waiting in the write-back log's staging area are copied from it."""
        return self._split(read_many([(self, self.check_ids(ids))])[0])

    def read_each(self, pieces: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """`read` of each piece in turn, its rows as the file holds them (float32 [U, width]: no split)."""
        for ids in pieces:
            yield torch.from_numpy(read_many([(self, self.check_ids(ids))])[0])

    def slots_of(self, ids: np.ndarray, unstage: bool = True) -> np.ndarray:
        """Row IDs (int64 [U]) -> the file rows that hold them: a row set's packed rows, a hot-row layout's
        places (`tierec.storage.layout.HotLayout`), or the IDs themselves; a write-back log's slots, its staged
        rows among ``ids`` written to it first -- unless ``unstage`` is False: the caller took them from the
        staging area (a bulk read, `RowLog.staged_rows`)."""
        if self._lazy is not None and self._lazy.slots is not None:
            return self._lazy.file_rows(ids)
        home = self._home_rows(ids)
        if self.row_log is None:
            return home
        if unstage:
            self._unstage(ids)
        return self.row_log.lookup(ids, home, read_back=unstage)

    def _home_rows(self, ids: np.ndarray) -> np.ndarray:
        """File rows of ``ids`` (int64 [U]) outside the write-back log: the IDs, or a hot-row layout's places."""
        return ids if self.layout is None else self.layout.file_rows(ids)

    def _unstage(self, ids: np.ndarray | None) -> None:
        """Write the log's staged rows among ``ids`` (None: all) before they are read or saved (`RowLog.unstage`)."""
        assert self.row_log is not None
        written, read = self.row_log.unstage(ids)
        if written or read:
            self.count_device_bytes(read=read, written=written)

    @property
    def rows_by_id(self) -> bool:
        """True when row ``r`` sits at file row ``r`` (no hot layout, no write-back log, not a row set)."""
        return self.layout is None and self.row_log is None and (self._lazy is None or self._lazy.slots is None)

    def neighbours(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The other rows this file holds whole in the direct-I/O blocks that hold rows ``ids`` (int64 [U]):
        what a read of ``ids`` moves anyway (`RowStore.neighbours`). Sorted row IDs (int64 tensor),
        rows written here only (the others have no bytes here); with a hot-row layout, only in the hot
        rows' blocks; empty where reads are not whole blocks (memmap, buffered) or the file is a
        checkpoint's row set."""
        ids_np = self.check_ids(ids)
        lazy = self._lazy
        if not self.odirect or ids_np.size == 0 or lazy is None or lazy.slots is not None:
            return torch.empty(0, dtype=torch.int64)
        start = self.slots_of(ids_np) * self.row_stride
        start = start[start < self.home_rows * self.row_stride]  # not the log's rows: its slots name no IDs
        if self.layout is not None:  # the hot rows' blocks: elsewhere rows sit by ID, seldom used together
            start = start[start >= self.num_embeddings * self.row_stride]
        blocks = np.unique(np.concatenate([start // self.align, (start + self.row_bytes - 1) // self.align]))
        lo = -(-blocks * self.align // self.row_stride)  # the first row that starts in each block
        hi = np.minimum(((blocks + 1) * self.align - self.row_bytes) // self.row_stride + 1, self.home_rows)
        ids_here, held = self.rows_with_data(expand_ranges(lo, np.maximum(hi - lo, 0)))  # rows wholly inside
        return torch.from_numpy(np.setdiff1d(ids_here[held], ids_np))

    def rows_with_data(self, frows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """File rows (int64 [K]) of a lazy working file -> (the row IDs they hold, -1 at a hot row's empty
        home; bool [K]: whether the file holds that row's bytes, i.e. it was written here)."""
        assert self._lazy is not None, "only lazy files know which of their rows hold data"
        ids = frows if self.layout is None else self.layout.ids_at(frows)
        held = ids >= 0
        held[held] = self._lazy.stored.test(ids[held])
        return ids, held

    def read_local(self, ids_np: np.ndarray) -> np.ndarray:
        """File rows ``ids_np`` (int64 [U]; `slots_of` maps IDs to them) -> [U, width] float32, in the calling
        thread: a memmap gather (page faults) or block I/O."""
        if ids_np.size == 0:
            return np.empty((0, self.width), np.float32)
        if self._mrows is not None:
            rows = np.asarray(self._mrows[ids_np])  # one vectorised gather (a copy)
            self._touched(ids_np.size, scattered=True)
            return rows
        return self._block_io(ids_np, None)

    @property
    def read_fd(self) -> int:
        """The descriptor batched reads use: O_DIRECT, else buffered (direct mode) or read-only (memmap mode)."""
        return self._fd if self.odirect else (self._bfd if self.direct_io else self._rfd)

    def write(self, ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor,
              rank: torch.Tensor | np.ndarray | None = None) -> None:
        """Write rows ``ids`` (int64 [U], unique, any order) from weight [U, dim] and state [U, state_dim];
        ``rank`` (int64 [U] or None): where a write-back log places them (`RowLog.append`: lower, read back sooner)."""
        ids_np = self.check_ids(ids)
        if ids_np.size == 0:
            return
        self.prepare_write()
        rows = self._join(weight, state)
        t0 = time.perf_counter()
        if self.row_log is not None:  # appended to the log; what it cannot take goes home
            order = np.argsort(ids_np, kind="stable")
            ids_np, rows = ids_np[order], rows[order]
            rank_np = None if rank is None else _rank_numpy(rank, ids_np.size)[order]
            took = self.append_log(ids_np, rows, rank_np)
            ids_np, rows = ids_np[~took], rows[~took]
        frows = self.slots_of(ids_np)
        if self._mrows is not None:
            self._mrows[frows] = rows  # one vectorised scatter
            self._touched(ids_np.size, scattered=True, write=True)
        elif ids_np.size:
            self._block_io(frows, rows)
        self.mark_stored(ids_np)
        self.account("write", ids_np.size, time.perf_counter() - t0)

    def mark_written(self, ids: np.ndarray | torch.Tensor) -> None:
        """Record rows ``ids`` (int64 [U]) as changed in a cache above, which writes them back before it drops
        them (lazy files; nothing otherwise): written, not yet in the file (`LazyRows.mark`)."""
        if self._lazy is not None:
            self._lazy.mark(self.check_ids(ids), stored=False)

    def append_log(self, ids: np.ndarray, rows: np.ndarray, rank: np.ndarray | None = None) -> np.ndarray:
        """Append rows ``ids`` (int64 [W], sorted, distinct) from ``rows`` [W, width] to the write-back log, those
        it takes (no read-modify-write; marked stored), in ``rank`` order (int64 [W] or None: `RowLog.append`);
        a full map is compacted first (`RowLog.compact`); bool [W]: which it took (the rest go to their rows)."""
        assert self.row_log is not None
        if self.row_log.shortfall(ids) > 0:
            t0 = time.perf_counter()
            written, read = self.row_log.compact(
                self.read_local, lambda fids, frows: self._block_io(self._home_rows(fids), frows))
            self.count_device_bytes(read=read, written=written)
            log.debug("%s: write-back log full, compacted (%d rows in its run) in %.2f s", self.path,
                      self.row_log.run.rows, time.perf_counter() - t0)
        took, written, read = self.row_log.take(ids, rows, rank)
        self.count_device_bytes(read=read, written=written)
        self.mark_stored(ids[took])
        return took

    def mark_stored(self, ids: np.ndarray) -> None:
        """Record rows ``ids`` (int64 [U], checked) as written into this file (lazy files; nothing otherwise)."""
        if self._lazy is not None:
            self._lazy.mark(ids)

    def read_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [start, end) as fresh tensors (used by checkpoints)."""
        if not 0 <= start <= end <= self.num_embeddings:
            raise IndexError(f"{self.path}: row range [{start}, {end}) outside [0, {self.num_embeddings})")
        if not self.rows_by_id or self.older is not None:  # rows by ID
            return self.read(torch.arange(start, end))
        t0 = time.perf_counter()
        if self._mrows is not None:
            rows = np.array(self._mrows[start:end])
            self._touched(end - start)
        elif end > start:
            rows = self._block_io(np.arange(start, end, dtype=np.int64), None)
        else:
            rows = np.empty((0, self.width), np.float32)
        if self._lazy is not None:
            self._lazy.fill(np.arange(start, end, dtype=np.int64), rows)
        self.account("read", end - start, time.perf_counter() - t0)
        return self._split(rows)

    def write_rows(self, start: int, weight: torch.Tensor, state: torch.Tensor) -> None:
        n = weight.shape[0]
        if not 0 <= start <= start + n <= self.num_embeddings:
            raise IndexError(f"{self.path}: row range [{start}, {start + n}) outside [0, {self.num_embeddings})")
        if n == 0:
            return
        if self.layout is not None:  # rows by ID
            self.write(torch.arange(start, start + n), weight, state)
            return
        ids = np.arange(start, start + n, dtype=np.int64)
        if self.row_log is not None:  # written in place (a bulk load, not through the log): at home or in the run
            self.row_log.drop(ids)
        self.prepare_write()
        rows = self._join(weight, state)
        t0 = time.perf_counter()
        if self._mrows is not None:
            self._mrows[start : start + n] = rows
            self._touched(n)
        else:
            self._block_io(self.slots_of(ids), rows)  # at home, or at the row's place in the log's run
        if self._lazy is not None:
            self._lazy.mark_range(start, start + n)
        self.account("write", n, time.perf_counter() - t0)

    def _touched(self, rows: int, scattered: bool = False, write: bool = False) -> None:
        """Keep mapped file pages out of the process's resident memory.

        Pages a memory map touches count in the process's RSS until unmapped. Once
        ``RSS_RELEASE_BYTES`` of rows went through the map, drop the mapping's pages
        from this process (MADV_DONTNEED on a shared file mapping loses nothing:
        they stay in the OS page cache and are written back by the kernel).
        """
        # a scattered row's read fault maps the pages around it too (the kernel's fault-around, 64 KiB);
        # a write fault maps its own page (counting writes as 64 KiB made the drop far too frequent)
        per_row = max(self.row_bytes, PAGE_BYTES if write else FAULT_AROUND_BYTES) if scattered else self.row_bytes
        self._mapped_bytes += rows * per_row
        if self._mapped_bytes >= RSS_RELEASE_BYTES and hasattr(mmap, "MADV_DONTNEED"):
            assert self._mm is not None  # only the memmap paths touch the map
            self._mm._mmap.madvise(mmap.MADV_DONTNEED)  # type: ignore[attr-defined]  # numpy stubs omit memmap._mmap
            self._mapped_bytes = 0

    # ------------------------------------------------------------------ TableStorage
    def acquire(self, ids: torch.Tensor) -> WorkingSet:
        """Without a cache: a temporary working set of the gathered rows (index = arange)."""
        w, s = self.read(ids)
        dev = ids.device
        return WorkingSet(ids, torch.arange(ids.numel(), device=dev), w.to(dev), s.to(dev), handle="ssd-temp")

    def release(self, ws: WorkingSet, dirty: bool) -> None:
        if dirty and ws.ids.numel():
            self.write(ws.ids, ws.weight, ws.state)

    def flush(self) -> None:
        """Make every write durable (msync / fsync)."""
        if self.readonly:
            return
        if self.row_log is not None:
            self._unstage(None)
        if self._mm is not None:
            self._mm.flush()
        if self._bfd >= 0:
            os.fsync(self._bfd)

    def close(self) -> None:
        if self.older is not None:
            self.older.close()
        if self._fd >= 0 or self._bfd >= 0 or self._mm is not None:
            self.save_written()
            self._save_log()
        if self._mm is not None:
            if not self.readonly:
                self._mm.flush()
            self._mm = self._mrows = None  # the mapping goes when its last view does
        for name in ("_fd", "_bfd", "_rfd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def nbytes(self) -> int:
        return self.file_bytes

    # ------------------------------------------------------------------ direct I/O
    def _direct_fallback(self, err: Exception) -> None:
        log.warning("%s: O_DIRECT is not supported here (%s); direct_io falls back to buffered reads/writes "
                    "followed by posix_fadvise(DONTNEED)", self.path, err)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self.odirect = False

    @overload
    def _block_io(self, ids_np: np.ndarray, rows: None) -> np.ndarray: ...

    @overload
    def _block_io(self, ids_np: np.ndarray, rows: np.ndarray) -> None: ...

    def _block_io(self, ids_np: np.ndarray, rows: np.ndarray | None) -> np.ndarray | None:
        """Read (rows None) or write the given rows through 4 KiB-block runs; see the module doc."""
        try:
            return self._block_io_once(ids_np, rows)
        except OSError as e:
            if self.odirect and e.errno == errno.EINVAL:  # opened, but the filesystem refuses O_DIRECT I/O
                self._direct_fallback(e)
                return self._block_io_once(ids_np, rows)
            raise

    def plan(self, ids_np: np.ndarray, align: int | None = None) -> BlockPlan:
        """Sorted row IDs -> the runs of ``align``-byte blocks that hold them (default: the write block,
        `align`); see `blockio.plan_runs`."""
        return blockio.plan_runs(ids_np * self.row_stride, self.row_bytes, align=align or self.align)

    def rows_at(self, buf, writeable: bool = False) -> np.ndarray:
        """A view of ``buf`` whose row i is the ``width`` floats starting at float offset i: index it with
        a plan's ``pos`` to gather rows (a copy) or, ``writeable``, to patch them into their blocks."""
        floats = np.frombuffer(buf, dtype=np.float32)
        return np.lib.stride_tricks.as_strided(floats, shape=(floats.size - self.width + 1, self.width),
                                               strides=(4, 4), writeable=writeable)

    def gather(self, buf, pos: np.ndarray, base: int = 0) -> np.ndarray:
        """Rows at float offsets ``base + pos`` of ``buf`` -> a fresh array [len(pos), width]."""
        return self.rows_at(buf)[pos + base]

    def _aio_read_runs(self, plan: BlockPlan, addrs: np.ndarray) -> int:
        """Read all of ``plan``'s block runs (to addresses ``addrs``) in one AIO batch; bytes read."""
        r = plan.foff.size
        return blockio.aio_runs(aio.IOCB_CMD_PREAD, np.full(r, self._fd), plan.foff, plan.nbytes, addrs,
                                np.full(r, self.file_bytes), lambda i: self.path)

    def _pread_runs(self, mv: memoryview, foffs, nbytes, boffs) -> int:
        """Read the given runs into ``mv`` (one ``preadv`` per run, split at MAX_IO); bytes read."""
        # loop over coalesced runs (not rows)
        return sum(blockio.pread_exact(self.read_fd, mv, f, n, b, self.file_bytes, self.path)
                   for f, n, b in zip(foffs, nbytes, boffs, strict=True))

    def _block_io_once(self, ids_np: np.ndarray, rows: np.ndarray | None) -> np.ndarray | None:
        order = None
        if ids_np.size > 1 and not np.all(ids_np[1:] > ids_np[:-1]):
            order = np.argsort(ids_np, kind="stable")
            ids_np = ids_np[order]
            if rows is not None:
                rows = rows[order]
        plan = self.plan(ids_np, self.read_align if rows is None else self.align)  # reads by sector where set
        pos, total = plan.pos, plan.total
        buf = aio.aligned_buffer(total)  # page-aligned, as O_DIRECT needs
        blind = rows is not None and self.exclusive_blocks  # the blocks hold just these rows: no read first
        if blind:
            buf[:] = 0  # the rows' padding
        mv = memoryview(buf)  # type: ignore[arg-type]  # numpy stubs: a Buffer on 3.12+ only
        fd = self._fd if self.odirect else self._bfd
        size = self.file_bytes
        batched = blockio.use_aio(self.odirect, plan.nbytes)
        runs = [] if batched else list(zip(plan.foff.tolist(), plan.nbytes.tolist(), plan.boff.tolist(), strict=True))
        addrs = buf.ctypes.data + plan.boff.astype(np.uint64)
        dev_read = dev_written = 0
        try:
            if not blind:  # every block of the batch in flight at once, or one preadv per run
                dev_read = self._aio_read_runs(plan, addrs) if batched else self._pread_runs(mv, *zip(*runs, strict=True))
            win = self.rows_at(buf, writeable=rows is not None)
            if rows is None:
                out = win[pos]  # vectorised gather: a copy
                if order is not None:
                    res = np.empty_like(out)
                    res[order] = out
                    out = res
                return out
            win[pos] = rows  # patch the rows into their blocks
            if batched:  # whole blocks by AIO; a file's partial last block through the page cache
                dev_written = self._aio_write_runs(plan.foff, plan.nbytes, plan.boff, addrs, mv)
                return None
            for foff, nbytes, boff in runs:
                valid = min(nbytes, size - foff)
                aligned = valid if (valid == nbytes or not self.odirect) else valid // self.align * self.align
                done = 0
                while done < aligned:
                    w = os.pwritev(fd, [mv[boff + done : boff + min(aligned, done + MAX_IO)]], foff + done)
                    if w <= 0:
                        raise OSError(errno.EIO, f"{self.path}: short write at byte {foff + done}")
                    done += w
                if valid > aligned:  # the file's partial last block: through the page cache
                    os.pwrite(self._bfd, mv[boff + aligned : boff + valid], foff + aligned)
                    os.posix_fadvise(self._bfd, foff + aligned, valid - aligned, os.POSIX_FADV_DONTNEED)
                dev_written += valid
            return None
        finally:
            if not self.odirect:  # drop what the buffered I/O put in the page cache
                lo, hi = int(plan.foff[0]), int(plan.foff[-1] + plan.nbytes[-1])
                os.posix_fadvise(self._bfd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            self._dev_bytes_read += dev_read
            if rows is not None:
                self._dev_bytes_rmw += dev_read
            self._dev_bytes_written += dev_written
            mv.release()

    def _aio_write_runs(self, foff: np.ndarray, nbytes: np.ndarray, boff: np.ndarray, addrs: np.ndarray,
                        mv: memoryview) -> int:
        """`write_block_runs` of this file's runs; bytes written."""
        return int(write_block_runs([self], np.zeros(foff.size, np.int64), foff, nbytes, boff, addrs, mv).sum())

    def exchange(self, write_ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor,
                 read_ids: torch.Tensor, write_rank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write rows ``write_ids`` (weight [W, dim], state [W, state_dim]) and read rows ``read_ids``
        ([R], none of them written here) -> (weights [R, dim], state [R, state_dim]). ``write_rank`` (int64 [W]
        or None): where a write-back log places the written rows (`RowLog.append`: lower, read back sooner).

        A cache's eviction write-back and its misses, in one pass: with O_DIRECT and AIO this is
        `exchange_many` of this one file -- the blocks that hold either set read in one batch, the
        written rows patched in, and just the blocks that hold written rows written back in a
        second batch: two device round trips where `write` then `read` take three, and a block
        holding rows of both sets is read once; with padded rows whose blocks hold one row each
        (`exclusive_blocks`) the written rows' blocks are not read at all, and go in the same batch
        as the reads. Elsewhere it is `write` then a read. Either way the read is a cache's (`read_many` with
        ``recent``): staged write-backs it asks for go to the log first, and recent log sectors serve it."""
        wid, rid = self.check_ids(write_ids), self.check_ids(read_ids)
        if wid.size and rid.size and self.odirect and aio.available():
            ws, rs = np.argsort(wid, kind="stable"), np.argsort(rid, kind="stable")
            rows = self._join(weight, state)[ws]
            wrank = None if write_rank is None else _rank_numpy(write_rank, wid.size)[ws]
            out = exchange_many([self], np.zeros(wid.size, np.int64), wid[ws], rows, np.zeros(rid.size, np.int64),
                                rid[rs], wrank)
            if out is not None:
                res = np.empty_like(out)
                res[rs] = out
                return self._split(res)
        if wid.size:  # elsewhere, or where the batched pass could not run: write, then read
            self.write(write_ids, weight, state, rank=write_rank)
        return self._split(read_many([(self, rid)], recent=True)[0])  # a cache's read, as `exchange_many`'s

    # ------------------------------------------------------------------ counters
    def account(self, op: str, rows: int, seconds: float) -> None:
        """Count one ``op`` ("read" or "write") call of ``rows`` whole rows taking ``seconds``."""
        c = self._counters
        c[f"{op}_calls"] += 1
        c[f"rows_{op}"] += rows
        c[f"bytes_{op}"] += rows * self.row_bytes
        c[f"{op}_time_s"] += seconds

    def count_device_bytes(self, read: int = 0, written: int = 0, rmw: int = 0) -> None:
        """Add bytes the device moved for this file (whole blocks) to ``device_bytes_read`` / ``_written``;
        ``rmw`` of the bytes read were blocks read only to patch written rows into (read-modify-write)."""
        self._dev_bytes_read += read
        self._dev_bytes_written += written
        self._dev_bytes_rmw += rmw

    def reset_stats(self) -> None:
        self._counters = {"read_calls": 0, "write_calls": 0, "rows_read": 0, "rows_write": 0,
                          "bytes_read": 0, "bytes_write": 0, "read_time_s": 0.0, "write_time_s": 0.0}
        self._dev_bytes_read = self._dev_bytes_written = self._dev_bytes_rmw = 0
        rlog: RowLog | None = getattr(self, "row_log", None)  # None while __init__ runs
        if rlog is not None:
            rlog.reset_stats()

    def stats(self) -> dict:
        """Counters since creation / `reset_stats`: rows and bytes (logical, row-sized) read and
        written, calls, seconds in I/O, and the bytes the device really moved (whole blocks in
        direct mode; equal to the logical bytes in memmap mode, where the kernel's paging is not seen)."""
        c = self._counters
        direct = self._mm is None
        return {
            "tier": "ssd", "path": str(self.path),
            "mode": ("o_direct" if self.odirect else "buffered+fadvise") if direct else "memmap",
            "rows_read": c["rows_read"], "rows_written": c["rows_write"],
            "bytes_read": c["bytes_read"], "bytes_written": c["bytes_write"],
            "read_calls": c["read_calls"], "write_calls": c["write_calls"],
            "read_time_s": c["read_time_s"], "write_time_s": c["write_time_s"],
            "io_time_s": c["read_time_s"] + c["write_time_s"],
            "device_bytes_read": self._dev_bytes_read if direct else c["bytes_read"],
            "device_bytes_written": self._dev_bytes_written if direct else c["bytes_write"],
            "rmw_bytes_read": self._dev_bytes_rmw if direct else 0,  # of device_bytes_read: blocks of write-backs
            **(self.row_log.stats if self.row_log is not None else {}),
        }

    def __repr__(self) -> str:
        return (f"SsdTable({str(self.path)!r}, {self.num_embeddings}, {self.dim}, {self.state_dim}, "
                f"direct_io={self.direct_io})")


def open_table_file(ckpt: Path, files: dict, rel: str, num_embeddings: int, dim: int, state_dim: int, *,
                    verify: bool = True, direct_io: bool = False, older: SsdTable | None = None) -> SsdTable:
    """A checkpoint's table file ``ckpt / rel`` (``files``: the manifest's), read-only, as an `SsdTable`:
    a packed file of every row, or a row set (its written rows by ID; the others their initial
    values, or, for an incremental checkpoint's delta, ``older``'s rows). ``verify``: check it
    against the manifest first (`verify_table_file`)."""
    path = ckpt / rel
    if rel not in files:
        raise CheckpointError(f"{path}: not listed in the checkpoint manifest")
    expect = files[rel]
    if is_delta(expect) and older is None:
        raise CheckpointError(f"{path}: an incremental checkpoint's rows; open it with its chain (open_table_chain)")
    if not is_row_set(expect):
        if verify:
            verify_file(path, expect)
        return SsdTable(path, num_embeddings, dim, state_dim, readonly=True, direct_io=direct_io)
    ids_expect = files.get(rel + ".ids")
    ids = (verify_row_set(path, expect, ids_expect, num_embeddings, dim + state_dim) if verify
           else read_row_set_ids(path, ids_expect, expect, num_embeddings))
    return SsdTable(path, num_embeddings, dim, state_dim, readonly=True, direct_io=direct_io,
                    lazy_init=row_set_init(expect, path), slots=ids, older=older if is_delta(expect) else None)


def open_table_chain(chain: list[tuple[Path, dict]], rel: str, num_embeddings: int, dim: int, state_dim: int, *,
                     verify: bool = True, direct_io: bool = False) -> SsdTable:
    """Table file ``rel`` of a chain of checkpoints (``[(checkpoint dir, manifest files)]``, base first,
    the checkpoint asked for last), read-only: each delta linked over the links below it, so a
    read finds every row in the newest checkpoint that holds it (`tierec.storage.multifile.read_many`)."""
    top: SsdTable | None = None
    for ckpt, files in chain:
        entry = files.get(rel)
        if top is not None and (entry is None or not is_delta(entry)):  # a full file: the links below are moot
            top.close()
            top = None
        top = open_table_file(ckpt, files, rel, num_embeddings, dim, state_dim, verify=verify, direct_io=direct_io,
                              older=top)
    if top is None:
        raise CheckpointError(f"{rel}: an empty checkpoint chain")
    return top


def _rank_numpy(rank: torch.Tensor | np.ndarray, n: int) -> np.ndarray:
    """A placement rank (tensor or array, [n]) -> int64 numpy [n]; ValueError if its length is not ``n``."""
    r = rank if isinstance(rank, np.ndarray) else rank.detach().to("cpu", torch.int64).numpy()
    r = np.asarray(r, np.int64).reshape(-1)
    if r.size != n:
        raise ValueError(f"write rank: {r.size} values for {n} rows")
    return r


def layout_path(path: str | os.PathLike) -> Path:
    """Where a working file laid out by hotness keeps its hot rows (int64, hottest first): ``<path>.hot``."""
    p = Path(path)
    return p.with_name(p.name + ".hot")


def read_layout(lp: Path, num_rows: int) -> HotLayout:
    """A `HotLayout` from its file ``lp`` (a working file's ``<path>.hot``, checked against its sidecar by the
    caller; a checkpoint's ``layout/<table>.hot``)."""
    data = lp.read_bytes()
    if len(data) % 8:
        raise CheckpointError(f"{lp}: {len(data)} bytes, not a whole number of int64 row IDs")
    try:
        return HotLayout(num_rows, np.frombuffer(data, dtype=np.int64).copy())
    except ValueError as e:
        raise CheckpointError(f"{lp}: {e}") from None


def log_path(path: str | os.PathLike) -> Path:
    """Where a working file's write-back log map lives: ``<path>.log`` (`tierec.storage.rowlog`)."""
    p = Path(path)
    return p.with_name(p.name + ".log")


def written_path(path: str | os.PathLike) -> Path:
    """Where a lazy table file's written-rows bitmap lives: ``<path>.written``."""
    p = Path(path)
    return p.with_name(p.name + ".written")


def _allocated_bytes(path: Path) -> int:
    """Bytes of disk a (sparse) file really uses."""
    return path.stat().st_blocks * 512


def check_row_align(value, what: str = "row_align") -> int:
    """``value`` as an int if it is 0 (packed rows) or a power of two from 4 to ALIGN; else ConfigError."""
    a = int(value or 0)
    if a < 0 or (a and (a < 4 or a & (a - 1) or a > ALIGN)):
        raise ConfigError(f"{what} must be 0 (packed rows) or a power of two from 4 to {ALIGN} bytes, got {value}")
    return a


def _align_of(stride: int) -> int:
    """The largest power of two (at most ALIGN) that divides a row stride: the row_align it came from."""
    return min(ALIGN, stride & -stride)

"""Live row updates: a server follows a training run and applies each checkpoint's changed rows in place.

A training run with incremental checkpoints (`tierec train --checkpoint-every N --checkpoint-chain L`)
publishes, at every checkpoint, the rows it changed since the previous one (a *delta* row set per
table) beside its dense weights. ``tierec serve RUN --follow`` watches the run's ``LATEST``
(`Follower`, every ``--follow-every`` seconds) and, for each new checkpoint:

1. reads, off the model thread, the publication (`read_publication`): for every table the rows of the
   links after the one it serves (deltas only: ids int64 [n_t] and weights float32 [n_t, D], the
   newest value of each row), the dense state, and the raw-ID maps of dynamic tables; every chunk is
   checked against the manifest's sha256 as it is read;
2. applies it on the model thread between two batches (`LoadedModel.apply_publication`), so no
   request sees half of one: tables in DRAM are written in place; tables served from the SSD files
   get the rows in a `RowOverlay` that every fetch consults after the cache and the files (the files
   are the checkpoint's, read-only). Dense weights, ID maps and the served step change at the same time.

A checkpoint that is not a chain of deltas over the served one (a new base once the chain reaches its
length, a compaction, a checkpoint of another run), or an overlay that would outgrow its rows, is loaded
beside in full and swapped in, as ``/v1/admin/reload`` does: the server keeps answering throughout.

Staleness: training records when each checkpoint was written (``saved_at`` in its manifest); the
follower reports the lag from then to the moment the rows serve (``tierec_live_lag_seconds``), and a
row's staleness is at most the interval between checkpoints plus that lag.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from tierec.errors import TierecError
from tierec.storage.hashindex import HashIndex
from tierec.storage.tablefile import is_delta, read_row_set
from tierec.train import checkpoint as ckpt

log = logging.getLogger(__name__)


class RowOverlay:
    """Rows changed since the served files were written: global row ID -> its newest weights, at most
    ``capacity`` rows (`HashIndex` + one [capacity, D] tensor). ``patch`` overwrites fetched rows in place."""

    def __init__(self, capacity: int, dim: int):
        self.capacity = int(capacity)
        self.index = HashIndex(self.capacity, "cpu", torch.int64)
        self.rows = torch.empty(self.capacity, dim)
        self.size = 0

    def put(self, ids: torch.Tensor, weights: torch.Tensor) -> bool:
        """Set rows ``ids`` (unique) to ``weights`` [n, D]; False (nothing changed) if they do not fit."""
        found, slot, _ = self.index.lookup(ids)
        new = (~found).nonzero().squeeze(1)
        if self.size + new.numel() > self.capacity:
            return False
        self.rows[slot[found]] = weights[found]
        given = torch.arange(self.size, self.size + new.numel())
        self.index.insert(ids[new], given)
        self.rows[given] = weights[new]
        self.size += new.numel()
        return True

    def patch(self, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """``weights`` [n, D] of rows ``ids`` (as read from the cache or the files) -> the overlay's newer ones."""
        if self.size == 0 or ids.numel() == 0:
            return
        found, slot, _ = self.index.lookup(ids)
        if bool(found.any()):
            weights[found] = self.rows[slot[found]]

    @property
    def nbytes(self) -> int:
        return self.index.nbytes + self.rows.nbytes


@dataclass
class Publication:
    """What one new checkpoint changes for a server that serves ``base``: per table name the changed rows
    (ids int64 [n], weights float32 [n, D]), the dense state, the raw-ID maps (None: rows as stored)."""

    path: Path
    step: int
    manifest: dict
    base: Path
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]]
    dense: dict
    id_maps: object | None
    saved_at: float | None
    links: list[str] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return sum(int(ids.numel()) for ids, _ in self.rows.values())


class _Collector:
    """A write-only `TableStorage` stand-in that keeps what a delta row set writes (weights only)."""

    def __init__(self, num_embeddings: int, dim: int, state_dim: int):
        self.num_embeddings, self.dim, self.state_dim = num_embeddings, dim, state_dim
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []

    def lazy_rows(self):
        return None

    def write(self, ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> None:
        self.parts.append((ids.clone(), weight.clone()))

    def newest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows written, each once with its last value: (ids sorted [n], weights [n, D])."""
        if not self.parts:
            return torch.empty(0, dtype=torch.int64), torch.empty(0, self.dim)
        ids = torch.cat([p[0] for p in self.parts])
        w = torch.cat([p[1] for p in self.parts])
        order = torch.sort(ids, stable=True).indices.flip(0)  # the last write of each row first
        rev = ids[order]
        uniq, inverse = torch.unique(rev, return_inverse=True)
        first = torch.full((uniq.numel(),), rev.numel(), dtype=torch.int64).scatter_reduce(
            0, inverse, torch.arange(rev.numel()), "amin")
        return uniq, w[order[first]]


def read_publication(new: Path, manifest: dict, base: Path, id_maps_of: Callable[[Path], object] | None = None
                     ) -> Publication | None:
    """The changes of checkpoint ``new`` (``manifest``) over the served checkpoint ``base``, or None when ``new``
    is not a chain of delta row sets over ``base`` (load it in full instead)."""
    chain = ckpt.table_chain(new, manifest)
    names = [d.name for d, _ in chain]
    if base.name not in names[:-1] or base.resolve().parent != new.resolve().parent:
        return None
    links = chain[names.index(base.name) + 1:]
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for t in manifest["tables"]:
        col = _Collector(t["num_embeddings"], t["dim"], t["state_dim"])
        for link, m in links:
            files = m["files"]
            entry = next((x for x in m["tables"] if x["name"] == t["name"]), None)
            if entry is None or entry["file"] not in files or not is_delta(files[entry["file"]]):
                return None  # a base, or a table file written in full: not a delta
            read_row_set(link / entry["file"], col, files[entry["file"]], files.get(entry["file"] + ".ids"))
        rows[t["name"]] = col.newest()
    dense = ckpt.load_dense_state(new, manifest)
    id_maps = id_maps_of(new) if id_maps_of is not None else None
    saved = manifest.get("saved_at")
    return Publication(new, int(manifest["step"]), manifest, base, rows, dense, id_maps,
                       float(saved) if isinstance(saved, (int, float)) else None, [d.name for d, _ in links])


class Served(Protocol):
    """What the follower needs of the served model: its checkpoint and step."""

    path: Path
    step: int


class Follower:
    """Polls ``run_dir``'s LATEST every ``every`` seconds and brings the served ranker to it: in place when
    the new checkpoint is a chain of deltas over the served one (`read_publication`, then ``apply`` on the
    model thread), else by ``reload(path)`` (load in full beside, swap). ``on_update(kind, pub_or_None,
    lag_s)`` reports each one (metrics)."""

    def __init__(self, run_dir: Path, every: float, current: Callable[[], Served],
                 apply: Callable[[Publication], bool], reload: Callable[[Path], None],
                 id_maps_of: Callable[[Path], object] | None = None,
                 on_update: Callable[[str, Publication | None, float | None], None] | None = None):
        self.run_dir, self.every = Path(run_dir), float(every)
        self.current, self.apply, self.reload = current, apply, reload
        self.id_maps_of, self.on_update = id_maps_of, on_update
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tierec-follow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.poll()
            except (TierecError, OSError, ValueError, KeyError) as e:  # a half-written or pruned checkpoint: retry
                log.warning("--follow: %s (retrying in %.1f s)", e, self.every)

    def poll(self) -> str | None:
        """Bring the server to the run's newest checkpoint; returns "delta", "reload" or None (nothing new)."""
        latest = ckpt.latest_or_none(self.run_dir)
        served = self.current()
        if latest is None or latest.resolve() == Path(served.path).resolve():
            return None
        m = ckpt.read_manifest(latest)
        if int(m["step"]) <= int(served.step):
            return None
        pub = read_publication(latest, m, Path(served.path), self.id_maps_of)
        kind = "delta"
        if pub is None or not self.apply(pub):
            kind = "reload"
            self.reload(latest)
        saved = m.get("saved_at")
        lag = time.time() - float(saved) if isinstance(saved, (int, float)) else None
        if self.on_update is not None:
            self.on_update(kind, pub if kind == "delta" else None, lag)
        log.info("--follow: %s -> step %d (%s%s)", latest.name, int(m["step"]), kind,
                 f", {pub.num_rows:,} rows" if pub is not None and kind == "delta" else "")
        return kind


"""Load a checkpoint for serving: tables all in DRAM, or read-only from the SSD tier behind a DRAM cache.

``tables="dram"`` loads every table into memory (the plain, exact reference).
``tables="ssd"`` opens the checkpoint's own table files read-only (``tables/<name>.tbl``, the
same fixed-offset row files training wrote) and puts an `AdmissionCache` in front of each:

- a `CachedTable` of ``cache_fraction`` x rows per table, frequency-aware (policy ``freq``:
  evicts the rows least frequent in the training data first), warmed with the hottest rows
  of the first ``warm_rows`` training rows of the data set the checkpoint was trained on;
- an admission rule: a row that misses is read from the SSD and only admitted to the cache
  from its ``admit_after``-th sighting (counted in a `CountMinSketch`, halved every
  ``8 x width`` sightings so old counts fade), so one-off IDs do not flush the hot rows.

Both modes give the same scores bit for bit: the rows are the same float32 numbers.
The dense network is always in memory. `ModelStore` holds the current model and swaps it
atomically on reload.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tierec.data.dataset import Schema
from tierec.errors import CheckpointError, ConfigError
from tierec.modules.embedding import WorkingSet
from tierec.storage.cache import CachedTable
from tierec.storage.sketch import CountMinSketch
from tierec.storage.ssd import SsdTable
from tierec.train import checkpoint as ckpt

log = logging.getLogger(__name__)

TABLE_MODES = ("dram", "ssd")


class AdmissionCache:
    """Read-only `TableStorage` for serving: SSD rows behind a `CachedTable` with an admission rule.

    ``acquire(ids)`` (int64 [U], unique, sorted) returns a working set with the U rows
    gathered into a fresh [U, D] tensor: cached rows and rows seen at least
    ``admit_after`` times come through the cache (misses among them are admitted), the
    others are read straight from the SSD file and not cached.
    """

    identity_index = False

    def __init__(self, ssd: SsdTable, cache: CachedTable, admit_after: int = 2, seed: int = 0):
        self.ssd, self.cache, self.admit_after = ssd, cache, int(admit_after)
        self.num_embeddings, self.dim, self.state_dim = ssd.num_embeddings, ssd.dim, 0
        width = 1 << max(10, (cache.capacity - 1).bit_length())  # ~ one counter per cached row and hash
        self.sketch = CountMinSketch(width, depth=2, seed=seed)
        self.lookups = self.hits = self.bypassed = 0

    def acquire(self, ids: torch.Tensor) -> WorkingSet:
        U = ids.numel()
        self.sketch.update(ids)
        if self.sketch.total > 8 * self.sketch.width:  # age: halve all counts
            self.sketch.table.floor_divide_(2)
            self.sketch.total //= 2
        hit = self.cache.contains(ids)
        admit = hit | (self.sketch.query(ids) >= self.admit_after)
        w = torch.empty(U, self.dim)
        a = admit.nonzero().squeeze(1)
        if a.numel():
            w[a] = self.cache.read(ids.index_select(0, a))[0]
        b = (~admit).nonzero().squeeze(1)
        if b.numel():
            w[b] = self.ssd.read(ids.index_select(0, b))[0]
        self.lookups += U
        self.hits += int(hit.sum())
        self.bypassed += b.numel()
        return WorkingSet(ids, torch.arange(U), w, torch.empty(U, 0))

    def release(self, ws: WorkingSet, dirty: bool) -> None:
        if dirty:
            raise RuntimeError("serving tables are read-only")

    def read_rows(self, start: int, end: int):
        return self.ssd.read_rows(start, end)

    def write_rows(self, start, weight, state) -> None:
        raise RuntimeError("serving tables are read-only")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.ssd.close()

    def stats(self) -> dict:
        """lookups = hits + misses (unique IDs per batch); bypassed: misses served from SSD without
        admission; bytes_read: bytes read from the SSD file (misses of the cache and bypassed rows)."""
        ssd = self.ssd.stats()
        return {"lookups": self.lookups, "hits": self.hits, "misses": self.lookups - self.hits,
                "bypassed": self.bypassed, "resident": self.cache.size, "capacity": self.cache.capacity,
                "bytes_read": ssd["bytes_read"], "cache_bytes": self.cache.nbytes + self.cache.index_nbytes}


@dataclass
class ServeOptions:
    """How `load_model` lays out the tables."""

    tables: str = "ssd"  # "dram" | "ssd"
    cache_fraction: float = 0.05  # ssd: cached rows per table, as a fraction of its rows
    admit_after: int = 2  # ssd: admit a missed row from its N-th sighting (1: every miss)
    warm_rows: int = 65536  # ssd: training rows counted to warm the caches (0: no warm-up)
    direct_io: bool = False  # ssd: O_DIRECT reads (no page cache, no mapped file pages)
    verify: bool = True  # check the table files' sha256 against the manifest at load
    data: str | None = None  # data set for warm-up / corpus (default: the checkpoint's)

    def __post_init__(self):
        if self.tables not in TABLE_MODES:
            raise ConfigError(f"tables must be one of {', '.join(TABLE_MODES)}, got {self.tables!r}")
        if not 0 < self.cache_fraction <= 1:
            raise ConfigError(f"cache_fraction must be in (0, 1], got {self.cache_fraction}")
        if self.admit_after < 1:
            raise ConfigError(f"admit_after must be >= 1, got {self.admit_after}")
        if self.warm_rows < 0:
            raise ConfigError(f"warm_rows must be >= 0, got {self.warm_rows}")


@dataclass
class LoadedModel:
    """A checkpoint ready to serve. ``kind``: "dlrm" or "two-tower"."""

    model: torch.nn.Module
    kind: str
    schema: Schema
    path: Path
    step: int
    manifest: dict
    options: ServeOptions
    storages: dict = field(default_factory=dict)  # table name -> storage

    def table_stats(self) -> dict[str, dict]:
        return {n: st.stats() for n, st in self.storages.items() if isinstance(st, AdmissionCache)}

    def close(self) -> None:
        for st in self.storages.values():
            if hasattr(st, "close"):
                st.close()


def training_frequencies(data: str | None, schema: Schema, rows: int) -> dict | None:
    """(ids, counts) per table over the first ``rows`` training rows of ``data``; None if unavailable."""
    from tierec.data.dataset import Dataset
    from tierec.errors import TierecError

    if not rows or not data:
        return None
    try:
        ds = Dataset(data)
    except TierecError as e:
        log.warning("no warm-up of the caches: %s", e)
        return None
    counts = {f.name: [] for f in schema.sparse}
    seen = 0
    for chunk in ds.chunks("train", 8192):
        for n in counts:
            counts[n].append(chunk.sparse[n][0])
        seen += len(chunk)
        if seen >= rows:
            break
    out = {}
    for n, parts in counts.items():
        ids, c = np.unique(np.concatenate(parts) if parts else np.zeros(0, np.int64), return_counts=True)
        out[n] = (torch.from_numpy(ids), torch.from_numpy(c.astype(np.int64)))
    return out


def load_model(checkpoint: str, options: ServeOptions | None = None) -> LoadedModel:
    """Checkpoint (run dir, checkpoints dir or step dir) -> `LoadedModel` in eval mode, on CPU."""
    from tierec.train.config import TrainConfig
    from tierec.train.trainer import build_model

    opt = options or ServeOptions()
    path = ckpt.resolve_checkpoint(checkpoint)
    m = ckpt.read_manifest(path)
    cfg = TrainConfig(**m["config"])
    schema = Schema.from_json(m["schema"])
    files = {t["name"]: t for t in m["tables"]}
    freq = None
    if opt.tables == "ssd":
        freq = training_frequencies(opt.data or cfg.data, schema, opt.warm_rows)
    storages: dict = {}

    def factory(i, tcfg, state_dim):
        if opt.tables == "dram":
            return None
        t = files.get(tcfg.name)
        if t is None:
            raise CheckpointError(f"{path}: checkpoint has no table {tcfg.name!r}")
        fpath = path / t["file"]
        if opt.verify:
            ckpt.verify_file(fpath, m["files"][t["file"]])
        ssd = SsdTable(fpath, tcfg.num_embeddings, tcfg.embedding_dim, state_dim, readonly=True,
                       direct_io=opt.direct_io)
        cap = max(1, math.ceil(opt.cache_fraction * tcfg.num_embeddings))
        f = freq.get(tcfg.name) if freq else None
        cache = CachedTable(ssd, cap, "freq" if f is not None else "lfu", name=tcfg.name, freq=f)
        if f is not None:
            cache.warm_up()
        st = AdmissionCache(ssd, cache, opt.admit_after, seed=i)
        storages[tcfg.name] = st
        return st

    model = build_model(cfg, schema, torch.device("cpu"), storage_factory=factory)
    state = ckpt.load_dense_state(path, m)
    model.load_state_dict(state["model"])
    mem = {t.config.name: t.storage for t in model.embeddings.tables if t.config.name not in storages}
    ckpt.load_tables(path, m, mem)
    if opt.tables == "dram":  # serving needs no optimizer state: drop it
        for st in mem.values():
            st.state = torch.empty(st.num_embeddings, 0)
    storages.update(mem)
    model.eval()
    log.info("loaded %s checkpoint %s (step %d), tables in %s", cfg.model, path, m["step"], opt.tables)
    return LoadedModel(model, cfg.model, schema, path, m["step"], m, opt, storages)


class ModelStore:
    """The models being served, swapped atomically: readers take ``store.ranker`` /
    ``store.retriever`` once per batch and keep using that object even if a reload
    replaces it meanwhile."""

    def __init__(self, ranker: LoadedModel, retriever=None):
        self.ranker, self.retriever = ranker, retriever
        self.reloads = 0
        self._lock = threading.Lock()

    def swap(self, ranker: LoadedModel | None = None, retriever=None) -> list:
        """Install new models; returns the replaced ones (close them once no batch uses them)."""
        with self._lock:
            old = []
            if ranker is not None:
                old.append(self.ranker)
                self.ranker = ranker
            if retriever is not None:
                old.append(self.retriever)
                self.retriever = retriever
            self.reloads += 1
            return [o for o in old if o is not None]

"""Load a checkpoint for serving: tables all in DRAM, or read-only from the SSD tier behind a DRAM cache.

``tables="dram"`` loads every table into memory (the plain, exact reference).
``tables="ssd"`` opens the checkpoint's own table files read-only (``tables/<name>.tbl``, the
same fixed-offset row files training wrote) behind one `SharedCache` for all of them:

- a `CachedTable` of ``cache_fraction`` x all rows over global row IDs (table offset + row),
  frequency-aware (policy ``freq``: evicts the rows least frequent in the training data
  first), warmed with the hottest rows of the first ``warm_rows`` training rows of the data
  set the checkpoint was trained on;
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tierec.data.dataset import Schema
from tierec.errors import CheckpointError, ConfigError
from tierec.modules.embedding import WorkingSet
from tierec.sparse import KeyedJaggedTensor
from tierec.storage.cache import CachedTable
from tierec.storage.sketch import CountMinSketch
from tierec.storage.ssd import SsdTable
from tierec.train import checkpoint as ckpt

log = logging.getLogger(__name__)

TABLE_MODES = ("dram", "ssd")


class _ConcatTables:
    """Several read-only SSD tables as one row space: global row = table offset + row; weights only.

    ``read(ids)`` splits the IDs by table and reads each table's file (concurrently on ``pool``
    when several tables are involved)."""

    def __init__(self, ssds: list[SsdTable], pool=None):
        self.ssds, self.pool = ssds, pool
        self.offsets = torch.tensor([0] + [t.num_embeddings for t in ssds]).cumsum(0)
        self.num_embeddings, self.dim, self.state_dim = int(self.offsets[-1]), ssds[0].dim, 0
        self.device = torch.device("cpu")

    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global rows ``ids`` (int64 [U], any order) -> (weights [U, D], empty state [U, 0])."""
        table = torch.searchsorted(self.offsets, ids, right=True) - 1
        w = torch.empty(ids.numel(), self.dim)
        parts = [(t, (table == t).nonzero().squeeze(1)) for t in torch.unique(table).tolist()]

        def one(t, pos):
            w[pos] = self.ssds[t].read(ids.index_select(0, pos) - self.offsets[t])[0]

        if self.pool is not None and len(parts) > 1:
            for f in [self.pool.submit(one, t, pos) for t, pos in parts]:
                f.result()
        else:
            for t, pos in parts:
                one(t, pos)
        return w, torch.empty(ids.numel(), 0)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        for t in self.ssds:
            t.close()


class SharedCache:
    """The SSD-backed tables of one model behind one DRAM cache with an admission rule.

    Rows of all tables share one `CachedTable` over global row IDs (table offset + row), so
    the cache spends its rows on whichever tables are hot, and a batch costs one cache lookup
    whatever the number of tables. ``fetch({table: ids})`` returns each table's rows: cached
    rows, and rows seen at least ``admit_after`` times (count-min sketch, halved every
    ``8 x width`` sightings), come through the cache (misses among them are admitted); the
    others are read straight from the SSD files and not cached.
    """

    def __init__(self, ssds: list[SsdTable], capacity: int, admit_after: int = 2, freq=None, pool=None):
        self.backing = _ConcatTables(ssds, pool)
        self.offsets = self.backing.offsets
        self.dim, self.admit_after = self.backing.dim, int(admit_after)
        self.cache = CachedTable(self.backing, capacity, "freq" if freq is not None else "lfu", name="ssd",
                                 freq=freq)
        if freq is not None:
            self.cache.warm_up()
        width = 1 << max(10, (2 * self.cache.capacity - 1).bit_length())  # >= 2 counters per cached row, per hash
        self.sketch = CountMinSketch(width, depth=2)
        self.lookups = self.hits = self.bypassed = 0

    def fetch(self, ids: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{table index: row IDs int64 [U_t], unique, sorted} -> {table index: weights [U_t, D]}."""
        order = sorted(ids)
        g = torch.cat([ids[t] + self.offsets[t] for t in order])  # sorted: tables' ranges ascend
        U = g.numel()
        self.sketch.update(g)
        if self.sketch.total > 8 * self.sketch.width:  # age: halve all counts
            self.sketch.table.floor_divide_(2)
            self.sketch.total //= 2
        hit = self.cache.contains(g)
        admit = hit | (self.sketch.query(g) >= self.admit_after)
        w = torch.empty(U, self.dim)
        a = admit.nonzero().squeeze(1)
        if a.numel():
            w[a] = self.cache.read(g.index_select(0, a))[0]
        b = (~admit).nonzero().squeeze(1)
        if b.numel():
            w[b] = self.backing.read(g.index_select(0, b))[0]
        self.lookups += U
        self.hits += int(hit.sum())
        self.bypassed += b.numel()
        return dict(zip(order, torch.split(w, [ids[t].numel() for t in order])))

    def close(self) -> None:
        self.backing.close()

    def stats(self) -> dict:
        """lookups = hits + misses (unique IDs per batch and table); bypassed: misses read from SSD
        without admission; bytes_read: bytes read from the SSD files (cache misses and bypassed rows)."""
        return {"lookups": self.lookups, "hits": self.hits, "misses": self.lookups - self.hits,
                "bypassed": self.bypassed, "resident": self.cache.size, "capacity": self.cache.capacity,
                "bytes_read": sum(t.stats()["bytes_read"] for t in self.backing.ssds),
                "cache_bytes": self.cache.nbytes + self.cache.index_nbytes + self.sketch.nbytes}


class SsdView:
    """One table's read-only `TableStorage` over a `SharedCache`.

    ``acquire(ids)`` returns the rows `LoadedModel.forward` fetched for this batch (one fetch
    for all tables), or fetches them itself."""

    identity_index = False

    def __init__(self, shared: SharedCache, index: int, num_embeddings: int):
        self.shared, self.index = shared, index
        self.num_embeddings, self.dim, self.state_dim = num_embeddings, shared.dim, 0
        self.stash: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, rows) of the current batch

    def acquire(self, ids: torch.Tensor) -> WorkingSet:
        st, self.stash = self.stash, None
        if st is not None and st[0].numel() == ids.numel() and torch.equal(st[0], ids):
            w = st[1]
        else:
            w = self.shared.fetch({self.index: ids})[self.index]
        return WorkingSet(ids, torch.arange(ids.numel()), w, torch.empty(ids.numel(), 0))

    def release(self, ws: WorkingSet, dirty: bool) -> None:
        if dirty:
            raise RuntimeError("serving tables are read-only")

    def read_rows(self, start: int, end: int):
        return self.shared.backing.ssds[self.index].read_rows(start, end)

    def write_rows(self, start, weight, state) -> None:
        raise RuntimeError("serving tables are read-only")

    def flush(self) -> None:
        pass


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
    shared: SharedCache | None = None  # tables="ssd": the cache in front of the table files

    @torch.no_grad()
    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """``model(dense, sparse)``; SSD-backed tables get the batch's rows in one shared fetch first."""
        if self.shared is not None:
            by_key = sparse.to_dict()
            views = [t.storage for t in self.model.embeddings.tables
                     if isinstance(t.storage, SsdView) and t.config.key in by_key]
            keys = {t.storage.index: t.config.key for t in self.model.embeddings.tables if isinstance(t.storage, SsdView)}
            uniq = {v.index: torch.unique(by_key[keys[v.index]].values) for v in views}
            rows = self.shared.fetch(uniq)
            for v in views:
                v.stash = (uniq[v.index], rows[v.index])
        return self.model(dense, sparse)

    def table_stats(self) -> dict[str, dict]:
        return {"ssd": self.shared.stats()} if self.shared is not None else {}

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()


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
    seen, chunk = 0, None
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
    del counts, chunk
    _release_heap()
    return out


def _release_heap() -> None:
    """Hand memory freed after reading the data set back to the OS (Arrow's pool, glibc's heap)."""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_model(checkpoint: str, options: ServeOptions | None = None, pool=None) -> LoadedModel:
    """Checkpoint (run dir, checkpoints dir or step dir) -> `LoadedModel` in eval mode, on CPU.
    ``pool``: threads on which the SSD tables of one batch are read concurrently."""
    from tierec.train.config import TrainConfig
    from tierec.train.trainer import build_model

    opt = options or ServeOptions()
    path = ckpt.resolve_checkpoint(checkpoint)
    m = ckpt.read_manifest(path)
    cfg = TrainConfig(**m["config"])
    schema = Schema.from_json(m["schema"])
    shared = None
    if opt.tables == "ssd":
        shared = _open_shared_cache(path, m, schema, cfg, opt, pool)

    def factory(i, tcfg, state_dim):
        return None if shared is None else SsdView(shared, i, tcfg.num_embeddings)

    model = build_model(cfg, schema, torch.device("cpu"), storage_factory=factory)
    state = ckpt.load_dense_state(path, m)
    model.load_state_dict(state["model"])
    if shared is None:
        mem = {t.config.name: t.storage for t in model.embeddings.tables}
        ckpt.load_tables(path, m, mem)
        for st in mem.values():  # serving needs no optimizer state: drop it
            st.state = torch.empty(st.num_embeddings, 0)
    model.eval()
    log.info("loaded %s checkpoint %s (step %d), tables in %s%s", cfg.model, path, m["step"], opt.tables,
             f" behind a {shared.cache.capacity:,}-row cache" if shared else "")
    return LoadedModel(model, cfg.model, schema, path, m["step"], m, opt, shared)


def _open_shared_cache(path: Path, m: dict, schema: Schema, cfg, opt: ServeOptions, pool) -> SharedCache:
    """The checkpoint's table files, read-only (checked against the manifest), behind one cache of
    ``cache_fraction`` of all rows, warmed with the rows most frequent in the training data."""
    from tierec.modules.optim import SparseOptimizer

    files = {t["name"]: t for t in m["tables"]}
    state_dim = SparseOptimizer(cfg.sparse_optimizer, cfg.sparse_lr).state_dim(cfg.embedding_dim)
    ssds = []
    for f in schema.sparse:
        t = files.get(f.name)
        if t is None:
            raise CheckpointError(f"{path}: checkpoint has no table {f.name!r}")
        if opt.verify:
            ckpt.verify_file(path / t["file"], m["files"][t["file"]])
        ssds.append(SsdTable(path / t["file"], f.num_embeddings, cfg.embedding_dim, state_dim, readonly=True,
                             direct_io=opt.direct_io))
    total = sum(f.num_embeddings for f in schema.sparse)
    capacity = max(1, math.ceil(opt.cache_fraction * total))
    freq = training_frequencies(opt.data or cfg.data, schema, opt.warm_rows)
    if freq is not None:  # global row IDs; only the hottest `capacity` rows can matter: keep those
        offs = np.cumsum([0] + [f.num_embeddings for f in schema.sparse])
        ids = torch.cat([freq[f.name][0] + int(offs[i]) for i, f in enumerate(schema.sparse)])
        counts = torch.cat([freq[f.name][1] for f in schema.sparse])
        if ids.numel() > capacity:
            top = torch.topk(counts, capacity).indices
            ids, counts = ids[top], counts[top]
        freq = (ids, counts)
    return SharedCache(ssds, capacity, opt.admit_after, freq, pool)


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

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
  ``8 x width`` sightings so old counts fade), so one-off IDs do not flush the hot rows;
  admitted rows enter the cache in batches of ``admit_batch``, between batches when the
  server is idle; victims are the least frequent of ``VICTIM_SAMPLE`` random resident rows
  per admitted row (sampled, as Redis approximates LFU: O(batch), not a pass over the cache);
- misses of direct-I/O files are read all together by concurrent ``preadv`` lanes.

Both modes give the same scores bit for bit: the rows are the same float32 numbers.
The dense network is in memory, unless ``dense`` (`tierec serve --dense-budget`) keeps its large layers in a
weight file and streams them in as they run (`tierec.inference.dense_stream`). `ModelStore` holds the current
model and swaps it atomically on reload.

A serving export (`tierec export`: tables as fp32 / fp16 / bf16 / int8 / int4 row files) is loaded by
`tierec.inference.quantized.load_export` into the same pieces: `SharedCache` and `FusedLookup` take its
`RowCodec` and decode the rows after the gather.

A sasrec checkpoint (`load_sequence_model`) is served by a `SequenceScorer`: every request scores
every item, so its item table is loaded into DRAM (weights only) whatever ``tables`` says.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from tierec.data.dataset import Schema
from tierec.errors import CheckpointError, ConfigError
from tierec.inference.dense_stream import DenseSettings, DenseStream
from tierec.inference.live import Publication, RowOverlay
from tierec.modules.dcn import DCNv2
from tierec.modules.dlrm import DLRM
from tierec.modules.optim import SparseOptimizer
from tierec.modules.sasrec import SASRec
from tierec.sparse import KeyedJaggedTensor
from tierec.storage.base import InMemoryTable, RowStoreDefaults, WorkingSet
from tierec.storage.cache import CachedTable
from tierec.storage.concat import ConcatTable
from tierec.storage.quantized import RowCodec
from tierec.storage.rowspace import RowSpace
from tierec.storage.sketch import CountMinSketch
from tierec.storage.ssd import SsdTable, open_table_chain
from tierec.train import checkpoint as ckpt
from tierec.train.idmap import IdMaps

if TYPE_CHECKING:
    from tierec.train.trainer import Model

log = logging.getLogger(__name__)

TABLE_MODES = ("dram", "ssd")
WARM_CHUNK = 1 << 13  # rows per warm-up read (hottest rows in file order: a ~20x longer stretch of the files)
INLINE_ADMIT = 4  # fetch() admits by itself once this many admission batches are queued
VICTIM_SAMPLE = 32  # eviction picks the least frequent of 32 random resident rows per row admitted


class _Stash(RowStoreDefaults):
    """The shared cache's backing (a read-only `RowStore`): the tables' files as one weights-only
    `ConcatTable`, where ``rows`` (sorted ids, weights) already read for an admission batch are served
    from memory instead of read again (the cache admits rows that were just read)."""

    def __init__(self, table: ConcatTable):
        self.table = table
        self.num_embeddings, self.dim, self.state_dim = table.num_embeddings, table.dim, 0
        self.device = torch.device("cpu")
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Space rows ``ids`` (int64 [U], any order) -> (weights [U, D], empty state [U, 0])."""
        if self.rows is not None:
            sid, rows = self.rows
            pos = torch.searchsorted(sid, ids).clamp_(max=sid.numel() - 1)
            if bool((sid[pos] == ids).all()):
                return rows[pos], torch.empty(ids.numel(), 0)
        return self.table.read(ids)

    def read_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.table.read_rows(start, end)

    def write(self, ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> None:
        raise RuntimeError("serving tables are read-only")

    def write_rows(self, start: int, weight: torch.Tensor, state: torch.Tensor) -> None:
        raise RuntimeError("serving tables are read-only")

    def flush(self) -> None:
        pass


class SharedCache:
    """The SSD-backed tables of one model behind one DRAM cache with an admission rule.

    Rows of all tables share one `CachedTable` over global row IDs (table offset + row), so
    the cache spends its rows on whichever tables are hot, and a batch costs one cache lookup
    whatever the number of tables. ``fetch({table: ids})`` returns each table's rows: hits
    from the cache, misses with one (concurrent) read of the table files. A missed row seen at
    least ``admit_after`` times (count-min sketch, halved every ``8 x width`` sightings) is
    queued for admission with the row just read; the queue enters the cache in one go, one
    eviction pass per ``admit_batch`` rows instead of one per request, when `maintain` is called
    between batches (the server does when no request waits) or, failing that, from `fetch` once
    ``INLINE_ADMIT`` batches are queued. Rows seen fewer times are not cached, so one-off IDs do not flush the hot rows.

    ``codec`` (a serving export's quantized row files, `tierec.storage.quantized`): the files and the cache hold
    the rows as stored (``codec.words`` 32-bit words each, so more rows fit the same bytes) and `fetch_global`
    decodes them to float32 after the gather.
    """

    def __init__(self, ssds: list[SsdTable], capacity: int, admit_after: int = 2, freq=None, pool=None,
                 admit_batch: int = 512, lanes: int = 8, codec: RowCodec | None = None, overlay_rows: int = 0):
        self.files = ConcatTable(ssds, weights_only=True, pool=pool, lanes=lanes)  # misses: one plan, all files
        self.space = self.files.space  # a row of table t is row space.offset(t) + r of the cache
        self.backing = _Stash(self.files)
        self.codec = codec if codec is not None and not codec.identity else None
        self.dim, self.admit_after = (codec.dim if codec is not None else self.files.dim), int(admit_after)
        self.cache = CachedTable(self.backing, capacity, "freq" if freq is not None else "lfu", name="ssd",
                                 freq=freq)
        self.cache.victim_sample = VICTIM_SAMPLE  # an admission batch's eviction costs O(batch), not O(cache)
        if freq is not None:  # pre-load the hottest rows in file order, in chunks (bounded temporaries): each
            # chunk is a dense stretch of a file, read in a few large reads rather than one random read per block
            hot = torch.sort(freq[0][torch.argsort(freq[1], descending=True)][: self.cache.capacity]).values
            for a in range(0, hot.numel(), WARM_CHUNK):
                self.cache.warm_up(hot[a : a + WARM_CHUNK])
        width = 1 << max(10, (2 * self.cache.capacity - 1).bit_length())  # >= 2 counters per cached row, per hash
        self.sketch = CountMinSketch(width, depth=2)
        self.admit_batch = max(1, min(int(admit_batch), self.cache.capacity))
        self._queue_ids: list[torch.Tensor] = []
        self._queue_rows: list[torch.Tensor] = []
        self._queued = 0
        self.lookups = self.hits = self.admitted = 0
        self.read_s = 0.0  # seconds spent reading missed rows from the table files (the SSD tier's wait)
        self.overlay: RowOverlay | None = None  # rows published since the files were written (--follow)
        self.overlay_rows = overlay_rows or max(2 * self.cache.capacity, 1 << 16)

    def fetch(self, ids: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{table index: row IDs int64 [U_t], unique, sorted} -> {table index: weights [U_t, D]}."""
        order = sorted(ids)
        w = self.fetch_global(torch.cat([ids[t] + self.space.offset(t) for t in order]))  # sorted: ranges ascend
        return dict(zip(order, torch.split(w, [ids[t].numel() for t in order]), strict=True))

    def fetch_global(self, g: torch.Tensor) -> torch.Tensor:
        """Global rows (table offset + row) int64 [U], unique -> weights [U, D]: hits from the cache,
        misses read from the table files in one go (and queued for admission, see the class doc); quantized
        rows decoded after the gather."""
        U = g.numel()
        self.sketch.update(g)
        if self.sketch.total > 8 * self.sketch.width:  # age: halve all counts
            self.sketch.table.floor_divide_(2)
            self.sketch.total //= 2
        hit, hit_rows = self.cache.peek(g)
        w = torch.empty(U, self.files.dim)  # the rows as stored (a codec's words)
        h = hit.nonzero().squeeze(1)
        w[h] = hit_rows
        m = (~hit).nonzero().squeeze(1)
        if m.numel():
            gm = g.index_select(0, m)
            t0 = time.perf_counter()
            wm = self.backing.read(gm)[0]
            self.read_s += time.perf_counter() - t0
            w[m] = wm
            admit = self.sketch.query(gm) >= self.admit_after
            if bool(admit.any()):
                self._queue_ids.append(gm[admit])
                self._queue_rows.append(wm[admit])
                self._queued += int(admit.sum())
                if self._queued >= INLINE_ADMIT * self.admit_batch:  # nobody calls maintain(): bound the queue
                    self._admit()
        if self.codec is not None:  # quantized rows: decoded after the gather (the overlay holds float32 rows)
            w = self.codec.decode(w)
        if self.overlay is not None:  # newer rows than the files' (and than cached copies of them)
            self.overlay.patch(g, w)
        self.lookups += U
        self.hits += h.numel()
        return w

    def put_rows(self, g: torch.Tensor, w: torch.Tensor) -> bool:
        """Serve weights ``w`` [n, D] for global rows ``g`` (unique) from now on (a live update, `--follow`);
        False, changing nothing, once the overlay (``overlay_rows``) would overflow."""
        if self.overlay is None:
            self.overlay = RowOverlay(self.overlay_rows, self.dim)
        return self.overlay.put(g, w)

    def maintain(self) -> bool:
        """Admit the queued rows if they fill an admission batch; True if it did. The server calls
        this between batches, so the eviction pass (a few ms over a large cache) is not paid by a
        request; `fetch` admits by itself only when the queue reaches ``INLINE_ADMIT`` batches."""
        if self._queued < self.admit_batch:
            return False
        self._admit()
        return True

    def _admit(self) -> None:
        """Install the queued rows in the cache (rows already read: the backing serves them from a stash)."""
        qid, qrows = torch.cat(self._queue_ids), torch.cat(self._queue_rows)
        self._queue_ids, self._queue_rows, self._queued = [], [], 0
        qid, first = _first_unique(qid)
        qrows = qrows[first]
        keep = ~self.cache.contains(qid)
        qid, qrows = qid[keep], qrows[keep]
        if not qid.numel():
            return
        if qid.numel() > self.cache.capacity:  # a tiny cache: admit what fits (a larger read would not cache)
            qid, qrows = qid[: self.cache.capacity], qrows[: self.cache.capacity]
        self.backing.rows = (qid, qrows)
        try:
            self.cache.read(qid)
        finally:
            self.backing.rows = None
        self.admitted += qid.numel()

    def close(self) -> None:
        self.files.close()

    def stats(self) -> dict:
        """lookups = hits + misses (unique IDs per batch and table); admitted: rows put in the cache
        after warm-up; read_seconds: time spent reading misses; bytes_read: bytes read from the SSD
        files (warm-up and misses)."""
        return {"lookups": self.lookups, "hits": self.hits, "misses": self.lookups - self.hits,
                "admitted": self.admitted, "read_seconds": self.read_s,
                "resident": self.cache.size, "capacity": self.cache.capacity,
                "bytes_read": self.files.stats().get("bytes_read", 0),
                "cache_bytes": self.cache.nbytes + self.cache.index_nbytes + self.sketch.nbytes,
                "row_bytes": self.cache.row_bytes}


def _first_unique(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N] -> (sorted unique ids [U], position in ``ids`` of each one's first occurrence [U])."""
    sorted_ids, perm = torch.sort(ids, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    return uniq, perm[torch.cumsum(counts, 0) - counts]


class SsdView:
    """One table's read-only `TableStorage` over a `SharedCache`.

    ``acquire(ids)`` returns the rows `LoadedModel.forward` fetched for this batch (one fetch
    for all tables), or fetches them itself."""

    def __init__(self, shared: SharedCache, index: int, num_embeddings: int, key: str):
        self.shared, self.index, self.key = shared, index, key
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
        return self.shared.files.tables[self.index].read_rows(start, end)

    def write_rows(self, start, weight, state) -> None:
        raise RuntimeError("serving tables are read-only")

    def flush(self) -> None:
        pass


class FusedLookup:
    """The pooled embeddings of every table of a served DLRM in one lookup, in either table mode.

    All tables form one row space (global row = table offset + row). For a KJT over the model's
    keys (key-major: lengths [T * B]) each ID becomes a global row and every bag of every table
    is pooled by one ``embedding_bag`` instead of one per table:

    - dram: over ``weight`` [R, D], the tables' weights laid end to end (each table's tensor is
      a view into it, so nothing is copied twice);
    - ssd: one ``unique`` over the batch's global rows, one `SharedCache.fetch_global` (hits
      from the cache, misses of all files read together), bags over the fetched rows [U, D].

    Each bag sums the same rows in the same order as the per-table path, so the pooled
    vectors are the same float32 numbers (tested against `tierec eval`'s model).

    ``codec`` (dram; a serving export's quantized rows, `tierec.storage.quantized`): ``weight`` holds the
    rows as stored ([R, codec.words]); the batch's unique rows are gathered and decoded, then pooled."""

    def __init__(self, keys: list[str], sizes: list[int], mean: list[bool], dim: int,
                 weight: torch.Tensor | None = None, shared: SharedCache | None = None,
                 codec: RowCodec | None = None):
        if (weight is None) == (shared is None):
            raise ValueError("FusedLookup takes the DRAM weight or the SSD cache, not both")
        self.keys, self.dim, self.weight, self.shared = list(keys), int(dim), weight, shared
        self.codec = codec if codec is not None and not codec.identity and weight is not None else None
        self.space = RowSpace(sizes)  # a row of table t is row space.offset(t) + r of ``weight`` / the cache
        self.mean = torch.tensor(mean, dtype=torch.bool)

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """KJT over ``keys`` (stride B) -> pooled embeddings [B, T, D], tables in ``keys`` order."""
        T, B = len(self.keys), kjt.stride()
        values, lengths = kjt.values(), kjt.lengths()
        per_key = lengths.view(T, B).sum(1)
        rows = values + self.space.offsets_t[:-1].repeat_interleave(per_key, output_size=values.numel())
        if self.shared is None and self.codec is not None and values.numel():
            assert self.weight is not None  # the constructor takes one of the two
            uniq, idx = torch.unique(rows, return_inverse=True)
            w = self.codec.decode(self.weight.index_select(0, uniq))
        elif self.shared is None:
            assert self.weight is not None  # the constructor takes one of the two
            idx, w = rows, self.weight if self.codec is None else torch.zeros(1, self.dim)
        elif values.numel():
            uniq, idx = torch.unique(rows, return_inverse=True)
            w = self.shared.fetch_global(uniq)
        else:
            idx, w = rows, torch.zeros(1, self.dim)
        bags = torch.zeros(T * B, dtype=torch.int64)
        if T * B > 1:
            torch.cumsum(lengths[:-1], 0, out=bags[1:])
        pooled = F.embedding_bag(idx, w, bags, mode="sum", per_sample_weights=kjt.weights_or_none()).view(T, B, -1)
        if bool(self.mean.any()):
            m = self.mean
            pooled[m] = pooled[m] / lengths.view(T, B)[m].clamp(min=1).unsqueeze(-1).to(pooled.dtype)
        return pooled.transpose(0, 1)


@dataclass
class ServeOptions:
    """How `load_model` lays out the tables."""

    tables: str = "ssd"  # "dram" | "ssd"
    cache_fraction: float = 0.05  # ssd: cached rows per table, as a fraction of its rows
    admit_after: int = 2  # ssd: admit a missed row from its N-th sighting (1: every miss)
    warm_rows: int = 262144  # ssd: training rows counted to warm the caches (0: no warm-up)
    direct_io: bool = False  # ssd: O_DIRECT reads (no page cache, no mapped file pages)
    io_lanes: int = 8  # ssd + direct_io: concurrent reads of a batch's misses (the pool needs lanes - 1 threads)
    verify: bool = True  # check the table files' sha256 against the manifest at load
    data: str | None = None  # data set for warm-up / corpus (default: the checkpoint's)
    overlay_rows: int = 0  # ssd + live updates: rows published since the files (0: 2 x the cache, >= 64K)
    dense: DenseSettings | None = None  # --dense-budget: large dense layers streamed from a weight file

    def __post_init__(self):
        if self.overlay_rows < 0:
            raise ConfigError(f"overlay_rows must be >= 0, got {self.overlay_rows}")
        if self.tables not in TABLE_MODES:
            raise ConfigError(f"tables must be one of {', '.join(TABLE_MODES)}, got {self.tables!r}")
        if not 0 < self.cache_fraction <= 1:
            raise ConfigError(f"cache_fraction must be in (0, 1], got {self.cache_fraction}")
        if self.admit_after < 1:
            raise ConfigError(f"admit_after must be >= 1, got {self.admit_after}")
        if self.io_lanes < 1:
            raise ConfigError(f"io_lanes must be >= 1, got {self.io_lanes}")
        if self.warm_rows < 0:
            raise ConfigError(f"warm_rows must be >= 0, got {self.warm_rows}")


class SequenceScorer:
    """A served SASRec (`tierec.modules.sasrec`): histories -> the top items by ``<h_last, e(item)>`` over all
    items 1..num_items (``weight`` [num_items + 1, D]: the item table in DRAM; row 0, padding, never
    recommended)."""

    def __init__(self, model: SASRec, weight: torch.Tensor):
        self.model, self.weight = model, weight
        self.num_items, self.max_len = model.num_items, model.max_len

    @torch.no_grad()
    def top_k(self, histories: list[np.ndarray], ks: list[int],
              exclude: list[np.ndarray | None]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One batch of histories (int64 item IDs in 1..num_items, oldest first; the last ``max_len`` are
        used, left-padded as in training) -> per history (items int64 [<= k], scores float32 [<= k]), best
        first; the items of ``exclude`` (and padding) are never returned."""
        L = self.max_len
        inputs = torch.zeros(len(histories), L, dtype=torch.int64)
        for r, h in enumerate(histories):
            h = h[-L:]
            inputs[r, L - len(h):] = torch.from_numpy(h)
        (emb,) = self.model.lookup(inputs)
        h_last = self.model.encode(inputs, emb)[:, -1]  # [B, D]
        scores = h_last @ self.weight.T  # [B, num_items + 1]
        scores[:, 0] = -math.inf
        for r, ex in enumerate(exclude):
            if ex is not None and ex.size:
                scores[r, torch.from_numpy(ex)] = -math.inf
        val, idx = torch.topk(scores, min(max(ks), self.num_items), dim=1)
        out = []
        for r, k in enumerate(ks):
            keep = val[r, :k] > -math.inf
            out.append((idx[r, :k][keep].numpy(), val[r, :k][keep].numpy()))
        return out


@dataclass
class LoadedModel:
    """A checkpoint ready to serve. ``kind``: "dlrm", "two-tower", ..., or "sasrec" (``sequence`` set; its
    ``schema`` has no features: /v1/predict does not apply)."""

    model: Model | SASRec
    kind: str
    schema: Schema
    path: Path
    step: int
    manifest: dict
    options: ServeOptions
    shared: SharedCache | None = None  # tables="ssd": the cache in front of the table files
    lookup: FusedLookup | None = None  # a DLRM's tables pooled in one lookup (both table modes)
    id_maps: IdMaps | None = None  # raw IDs -> rows (fixed tables over raw IDs, dynamic tables' saved indexes)
    sequence: SequenceScorer | None = None  # a sasrec checkpoint: /v1/recommend for a history
    dense: DenseStream | None = None  # --dense-budget: the dense layers streamed in (set from options.dense)

    def __post_init__(self):
        if self.dense is None and self.options.dense is not None:
            self.dense = DenseStream.attach(self.model, self.kind, self.options.dense)

    @torch.no_grad()
    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """``model(dense, sparse)`` -> logits [B]. A DLRM pools all its tables in one fused lookup
        (`FusedLookup`); other models' SSD-backed tables get the batch's rows in one shared fetch first.
        Raw IDs become rows first (`IdMaps.lookup_kjt`: an unknown or evicted ID reads the default row)."""
        if self.id_maps is not None:
            sparse = self.id_maps.lookup_kjt(sparse)
        if self.lookup is not None and isinstance(self.model, (DLRM, DCNv2)) and sparse.keys() == self.lookup.keys:
            x = self.model.bottom(dense)
            return self.model.head(x, torch.cat([x.unsqueeze(1), self.lookup.pooled(sparse)], 1))
        if self.shared is not None:
            by_key = sparse.to_dict()
            views = [t.storage for t in self.model.embeddings.bags
                     if isinstance(t.storage, SsdView) and t.config.key in by_key]
            if views:  # one unique over all tables' IDs (global rows), one fetch, split back per table
                space = self.shared.space
                g = torch.unique(torch.cat([by_key[v.key].values + space.offset(v.index) for v in views]))
                rows = self.shared.fetch_global(g)
                cut = space.bounds(g)
                for v in views:
                    a, b = cut[v.index], cut[v.index + 1]
                    v.stash = (g[a:b] - space.offset(v.index), rows[a:b])
        return self.model(dense, sparse)

    def apply_publication(self, pub: Publication) -> bool:
        """A training run's new checkpoint (`tierec.inference.live`), in place, on the model thread between
        batches: its changed rows (DRAM tables written; SSD-served ones into the cache's overlay), dense
        weights, ID maps and step. False, changing nothing, where it cannot: a sasrec model, or an overlay
        too small for the rows (the caller loads the checkpoint in full instead)."""
        embeddings = getattr(self.model, "embeddings", None)
        if self.sequence is not None or embeddings is None:
            return False
        bags = {t.config.name: t for t in embeddings.bags}
        if set(pub.rows) != set(bags):
            return False
        if self.shared is not None:
            space, index = self.shared.space, {t.config.name: i for i, t in enumerate(embeddings.bags)}
            g = torch.cat([ids + space.offset(index[n]) for n, (ids, _) in pub.rows.items()])
            if g.numel() and not self.shared.put_rows(g, torch.cat([w for _, w in pub.rows.values()])):
                return False
        else:
            for n, (ids, w) in pub.rows.items():
                bags[n].storage.weight[ids] = w
        if self.dense is not None:  # streamed layers: their blocks rewritten, the rest loaded
            self.dense.load_state(pub.dense["model"])
        else:
            self.model.load_state_dict(pub.dense["model"])
        self.model.eval()
        if pub.id_maps is not None:
            self.id_maps = pub.id_maps  # type: ignore[assignment]  # an IdMaps, read beside
        self.path, self.step, self.manifest = pub.path, pub.step, pub.manifest
        return True

    def maintain(self) -> bool:
        """Work that should not delay a request (cache admission); call it between batches."""
        return self.shared.maintain() if self.shared is not None else False

    def table_stats(self) -> dict[str, dict]:
        out = {"ssd": self.shared.stats()} if self.shared is not None else {}
        if self.id_maps is not None and self.id_maps.index is not None:
            out["dynamic"] = self.id_maps.stats()
        return out

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
        if self.dense is not None:
            self.dense.close()


def hottest_rows(data: str | None, schema: Schema, rows: int, capacity: int) -> tuple | None:
    """The ``capacity`` global rows (table offset + row) most frequent in the first ``rows``
    training rows of ``data``, as (ids int64 [K], counts int64 [K]); None if unavailable.

    Counted in a child process: reading the data set costs a few hundred MB transiently
    (Arrow buffers, reader threads) that a long-running server should not keep."""
    if not rows or not data:
        return None
    import json
    import subprocess
    import sys
    import tempfile

    names = [f.name for f in schema.sparse]
    offsets = np.cumsum([0] + [f.num_embeddings for f in schema.sparse]).tolist()
    with tempfile.TemporaryDirectory(prefix="tierec-warm-") as tmp:
        out = Path(tmp) / "hot.npz"
        args = json.dumps([data, names, offsets, rows, capacity, str(out)])
        code = "import sys, json; from tierec.inference.model_store import _count_hottest; " \
               "_count_hottest(*json.loads(sys.argv[1]))"
        r = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
        if r.returncode != 0 or not out.exists():
            log.warning("no warm-up of the cache: %s", (r.stderr.strip().splitlines() or ["counting failed"])[-1])
            return None
        with np.load(out) as z:
            return torch.from_numpy(z["ids"]), torch.from_numpy(z["counts"])


def _count_hottest(data: str, names: list[str], offsets: list[int], rows: int, capacity: int, out: str) -> None:
    """Child process of `hottest_rows`: count, keep the top ``capacity``, write ``out`` (.npz)."""
    from tierec.data.dataset import Dataset

    ds = Dataset(data)
    parts, seen = [], 0
    for chunk in ds.chunks("train", 8192):
        parts += [chunk.sparse[n][0] + offsets[i] for i, n in enumerate(names)]
        seen += len(chunk)
        if seen >= rows:
            break
    ids, counts = np.unique(np.concatenate(parts) if parts else np.zeros(0, np.int64), return_counts=True)
    if ids.size > capacity:
        top = np.argpartition(-counts, capacity - 1)[:capacity]
        ids, counts = ids[top], counts[top]
    np.savez(out, ids=ids.astype(np.int64), counts=counts.astype(np.int64))


def load_model(checkpoint: str, options: ServeOptions | None = None, pool=None) -> LoadedModel:
    """Checkpoint (run dir, checkpoints dir or step dir), or a serving export directory (`tierec export`:
    `tierec.inference.quantized.load_export`) -> `LoadedModel` in eval mode, on CPU.
    ``pool``: threads on which the SSD tables of one batch are read concurrently."""
    from tierec.train.config import TrainConfig
    from tierec.train.trainer import build_model, load_id_maps

    opt = options or ServeOptions()
    from tierec.inference.export import is_export
    from tierec.inference.quantized import load_export

    if is_export(checkpoint):  # a serving export (`tierec export`): its row files, in their row dtype
        return load_export(Path(checkpoint), opt, pool)
    path = ckpt.resolve_checkpoint(checkpoint)
    m = ckpt.read_manifest(path)
    if isinstance(m.get("config"), dict) and m["config"].get("model") == "sasrec":
        return load_sequence_model(path, m, opt)
    cfg = TrainConfig(**m["config"])
    schema = Schema.from_json(m["schema"])
    id_maps = load_id_maps(str(path), schema)
    if id_maps is not None and cfg.model == "two-tower":
        raise ConfigError(f"{path}: serving a two-tower model over raw IDs (fixed tables over raw IDs or dynamic "
                          "tables) is not supported yet; train it on a data set of rows")
    shared = None
    if opt.tables == "ssd":
        from tierec.malloc import limit_malloc_retention

        limit_malloc_retention()  # freed multi-MB temporaries (warm-up reads) go back to the OS
        shared = _open_shared_cache(path, m, schema, cfg, opt, pool, warm=id_maps is None)

    weight: torch.Tensor | None = None
    mem: list[InMemoryTable] = []
    if shared is None:  # every table a view into one tensor, filled from the checkpoint (no random init)
        rows = {t["name"]: t["num_embeddings"] for t in m["tables"]}
        weight, mem = end_to_end_tables([rows[f.name] for f in schema.sparse], cfg.embedding_dim,
                                        SparseOptimizer(cfg.sparse_optimizer, cfg.sparse_lr).state_dim(cfg.embedding_dim))

    def factory(i, tcfg, state_dim):
        return mem[i] if shared is None else SsdView(shared, i, tcfg.num_embeddings, tcfg.key)

    model = build_model(cfg, schema, torch.device("cpu"), storage_factory=factory)
    state = ckpt.load_dense_state(path, m)
    model.load_state_dict(state["model"])
    if shared is None:
        ckpt.load_tables(path, m, {t.config.name: t.storage for t in model.embeddings.bags})
        for t in mem:  # serving needs no optimizer state: drop it
            t.state = torch.empty(t.num_embeddings, 0)
    model.eval()
    lookup = None
    if cfg.model in ("dlrm", "dcnv2"):  # models whose `head` takes the pooled embeddings of all tables
        tables = model.embeddings.bags
        lookup = FusedLookup([t.config.key for t in tables], [t.config.num_embeddings for t in tables],
                             [t.config.pooling == "mean" for t in tables], cfg.embedding_dim, weight, shared)
    log.info("loaded %s checkpoint %s (step %d), tables in %s%s", cfg.model, path, m["step"], opt.tables,
             f" behind a {shared.cache.capacity:,}-row cache" if shared else "")
    return LoadedModel(model, cfg.model, schema, path, m["step"], m, opt, shared, lookup, id_maps)


def load_sequence_model(path: Path, m: dict, options: ServeOptions) -> LoadedModel:
    """Sasrec checkpoint ``path`` (manifest ``m``) -> a `LoadedModel` with a `SequenceScorer`: its item table
    in DRAM (weights only; every request scores every item, so a cache in front of the file would hold
    the whole table anyway), filled from the checkpoint's table file wherever training kept the table."""
    from tierec.train.sequence import restore_sasrec, sasrec_config, sparse_optimizer

    cfg = sasrec_config(path, m)
    rows = int(m["schema"]["num_items"]) + 1
    weight, (table,) = end_to_end_tables([rows], cfg.embedding_dim,
                                         sparse_optimizer(cfg).state_dim(cfg.embedding_dim))
    model = restore_sasrec(path, m, cfg, torch.device("cpu"), storage_factory=lambda i, tcfg, sdim: table)
    table.state = torch.empty(rows, 0)  # serving needs no optimizer state
    if options.tables == "ssd":
        log.info("sasrec: the item table (%d rows) is served from memory: every request scores every item",
                 rows)
    log.info("loaded sasrec checkpoint %s (step %d): %d items, histories of up to %d items", path, m["step"],
             rows - 1, model.max_len)
    return LoadedModel(model, "sasrec", Schema([], []), path, m["step"], m, replace(options, tables="dram"),
                       sequence=SequenceScorer(model, weight))


def end_to_end_tables(sizes: list[int], dim: int, state_dim: int) -> tuple[torch.Tensor, list[InMemoryTable]]:
    """In-memory tables of ``sizes`` rows whose weights are views into one tensor [sum(sizes), D], laid
    end to end in table order (what `FusedLookup` reads in DRAM mode); their state starts at zeros."""
    weight = torch.empty(sum(sizes), dim)  # pages become resident as the checkpoint fills them
    tables, a = [], 0
    for n in sizes:
        t = InMemoryTable(n, dim, state_dim)
        t.weight = weight[a : a + n]
        tables.append(t)
        a += n
    return weight, tables


def _open_shared_cache(path: Path, m: dict, schema: Schema, cfg, opt: ServeOptions, pool,
                       warm: bool = True) -> SharedCache:
    """The checkpoint's table files, read-only (checked against the manifest), behind one cache of
    ``cache_fraction`` of all rows, warmed (``warm``; not over raw IDs) with the rows most frequent in the
    training data."""
    files = {t["name"]: t for t in m["tables"]}
    state_dim = SparseOptimizer(cfg.sparse_optimizer, cfg.sparse_lr).state_dim(cfg.embedding_dim)
    ssds = []
    chain = [(d, mm["files"]) for d, mm in ckpt.table_chain(path, m)]  # an incremental checkpoint: its links too
    for f in schema.sparse:
        t = files.get(f.name)
        if t is None:
            raise CheckpointError(f"{path}: checkpoint has no table {f.name!r}")
        ssds.append(open_table_chain(chain, t["file"], t["num_embeddings"], cfg.embedding_dim, state_dim,
                                     verify=opt.verify, direct_io=opt.direct_io))
    total = sum(s.num_embeddings for s in ssds)
    capacity = max(1, math.ceil(opt.cache_fraction * total))
    freq = hottest_rows(opt.data or ckpt.saved_data_path(m["config"], path), schema, opt.warm_rows,
                        capacity) if warm else None
    return SharedCache(ssds, capacity, opt.admit_after, freq, pool, lanes=opt.io_lanes,
                       overlay_rows=opt.overlay_rows)


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

    def close(self) -> None:
        """Close the ranking model being served -- its SSD files, the file of its streamed dense weights -- at
        shutdown, once no batch runs (models replaced before were closed when swapped out)."""
        with self._lock:
            self.ranker.close()

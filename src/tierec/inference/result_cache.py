"""The result cache: recent /v1/predict answers per sample, bounded in entries and bytes, with a TTL.

`tierec serve --result-cache-size N [--result-cache-ttl S] [--result-cache-bytes B]`. A sample's key is a
hash (BLAKE2b, 128 bits) of its *encoded* form -- dense values after the data set's transform, then per
table its bag's length and rows, tables in schema order -- so JSON that encodes alike (``"C1": 5``,
``"C1": [5]``, ``"C1": "5"``, keys in any order, a missing dense value or ``0``) is one key, while
a different ID order inside a bag is another (sum pooling in another order may round differently).
An entry holds the sample's logits as the ranker answered (the very float32 numbers), whether it exited
early (`tierec.inference.cascade`) and the dense FLOPs its path cost.

Every entry belongs to the model version current when it was computed: (reload count, the serving
`LoadedModel`, its step). A lookup made under another version -- a reload, a swapped checkpoint, a
``--follow`` update in place -- empties the cache first, and an answer computed by another model than
the one its request looked up is not stored: a hit is always the serving model's own answer.

Hits skip the model entirely: a request's samples are looked up on the event loop before it is batched;
only the misses go to the `DynamicBatcher` (all hits: no model call at all). Least recently used entries
leave first when the cache passes ``max_entries`` or ``max_bytes``; an entry older than ``ttl_s`` is a
miss (and is removed). One lock guards the cache (the event loop and the scrape thread read it).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tierec.errors import ConfigError
from tierec.inference.cascade import Cascade
from tierec.inference.features import Encoded
from tierec.modules.dcn import dense_flops_per_sample

ENTRY_OVERHEAD = 232  # bytes per entry besides its logits: key, the entry, its array header, the LRU's node


def sample_keys(enc: Encoded, keys: list[str]) -> list[bytes]:
    """One 16-byte key per sample of ``enc``: its dense row, then its bag lengths and rows of every table in
    ``keys`` order (sample-major)."""
    B = len(enc)
    if not keys:
        return [hashlib.blake2b(enc.dense[i].tobytes(), digest_size=16).digest() for i in range(B)]
    lengths = np.stack([enc.sparse[k][1] for k in keys])  # [T, B]
    values = np.concatenate([enc.sparse[k][0] for k in keys]).astype(np.int64, copy=False)
    owner = np.repeat(np.tile(np.arange(B), len(keys)), lengths.reshape(-1))  # sample of each value, key-major
    by_sample = values[np.argsort(owner, kind="stable")]  # each sample's values, tables in ``keys`` order
    ends = np.cumsum(lengths.sum(0))
    dense = np.ascontiguousarray(enc.dense)
    lens = np.ascontiguousarray(lengths.T.astype(np.int64))
    out, a = [], 0
    for i in range(B):
        h = hashlib.blake2b(digest_size=16)
        h.update(dense[i].tobytes())
        h.update(lens[i].tobytes())
        h.update(by_sample[a : ends[i]].tobytes())
        out.append(h.digest())
        a = int(ends[i])
    return out


def take(enc: Encoded, rows: np.ndarray) -> Encoded:
    """Samples ``rows`` (sorted int indices) of ``enc``."""
    sparse = {}
    for k, (v, n) in enc.sparse.items():
        o = np.concatenate([[0], np.cumsum(n)])
        keep = np.repeat(rows, n[rows])
        pos = np.arange(keep.size) - np.repeat(np.cumsum(n[rows]) - n[rows], n[rows]) + o[keep]
        sparse[k] = (v[pos], n[rows])
    return Encoded(enc.dense[rows], sparse)


@dataclass
class Entry:
    logits: np.ndarray  # [] or [K] float32, as answered
    exited: bool | None  # None: served without early exits
    flops: float  # dense FLOPs its path cost (saved by each hit)
    expires: float
    nbytes: int


class ResultCache:
    """Sample key -> `Entry` under one model version (module doc)."""

    def __init__(self, max_entries: int, ttl_s: float, max_bytes: int = 64 << 20, clock=time.monotonic):
        if max_entries < 1:
            raise ConfigError(f"--result-cache-size must be >= 1 entries, got {max_entries}")
        if not ttl_s > 0:
            raise ConfigError(f"--result-cache-ttl must be > 0 seconds, got {ttl_s}")
        if max_bytes < ENTRY_OVERHEAD + 4:
            raise ConfigError(f"--result-cache-bytes must hold one entry ({ENTRY_OVERHEAD + 4} bytes), got {max_bytes}")
        self.max_entries, self.ttl_s, self.max_bytes, self.clock = int(max_entries), float(ttl_s), int(max_bytes), clock
        self._d: OrderedDict[bytes, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.version: object = None
        self.nbytes = 0
        self.hits = self.misses = 0
        self.flops_saved = 0.0
        self.evicted = {"size": 0, "bytes": 0, "ttl": 0, "model": 0}

    def __len__(self) -> int:
        return len(self._d)

    def lookup(self, keys: list[bytes], version: object) -> list[Entry | None]:
        """Each key's live entry (None: a miss); a new ``version`` empties the cache first."""
        now = self.clock()
        out: list[Entry | None] = []
        with self._lock:
            if version != self.version:
                self.evicted["model"] += len(self._d)
                self._d.clear()
                self.nbytes, self.version = 0, version
            for k in keys:
                e = self._d.get(k)
                if e is not None and e.expires <= now:
                    self._drop(k, "ttl")
                    e = None
                if e is None:
                    self.misses += 1
                else:
                    self._d.move_to_end(k)
                    self.hits += 1
                    self.flops_saved += e.flops
                out.append(e)
        return out

    def store(self, keys: list[bytes], logits: np.ndarray, exited: np.ndarray | None, flops: np.ndarray,
              version: object) -> int:
        """Entries for ``keys`` (their logits rows, exits, path FLOPs) computed by model ``version``; nothing is
        stored under a version that is no longer the cache's, and a live entry is kept (the same sample scored
        twice by concurrent requests: every hit answers the first). Returns how many were stored."""
        now = self.clock()
        with self._lock:
            if version != self.version:
                return 0
            stored = 0
            for i, k in enumerate(keys):
                row = np.array(logits[i], dtype=logits.dtype, copy=True)
                if not np.isfinite(row).all():  # answered with a 422: not kept
                    continue
                old = self._d.get(k)
                if old is not None and old.expires > now:  # computed twice meanwhile: the kept answer stays
                    continue
                if old is not None:
                    self._drop(k, "ttl")
                e = Entry(row, None if exited is None else bool(exited[i]), float(flops[i]), now + self.ttl_s,
                          ENTRY_OVERHEAD + row.nbytes)
                self._d[k] = e
                self.nbytes += e.nbytes
                stored += 1
            while self._d and (len(self._d) > self.max_entries or self.nbytes > self.max_bytes):
                k, e = next(iter(self._d.items()))
                self._drop(k, "ttl" if e.expires <= now else ("size" if len(self._d) > self.max_entries else "bytes"))
            return stored

    def _drop(self, key: bytes, reason: str | None) -> None:
        e = self._d.pop(key)
        self.nbytes -= e.nbytes
        if reason is not None:
            self.evicted[reason] += 1

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._d), "bytes": self.nbytes,
                    "evicted": dict(self.evicted), "flops_saved": self.flops_saved,
                    "max_entries": self.max_entries, "max_bytes": self.max_bytes, "ttl_s": self.ttl_s}


@dataclass
class Answer:
    """A /v1/predict answer before rendering: logits [n] (or [n, K]), the step that scored them, which samples
    exited early (None: no cascade) and which came from the result cache (None: no cache)."""

    logits: np.ndarray
    step: int
    exited: np.ndarray | None = None
    cached: np.ndarray | None = None

    def paths(self) -> dict:
        """The response's ``exit`` / ``cached`` lists, for what the server has (nothing for a plain server)."""
        out = {}
        if self.exited is not None:
            out["exit"] = self.exited.tolist()
        if self.cached is not None:
            out["cached"] = self.cached.tolist()
        return out


def path_flops_of(model, cascade: Cascade | None, exited: np.ndarray | None, n: int) -> np.ndarray:
    """Dense FLOPs per sample of ``n`` samples of ``model`` by the path each took (exited: the bottom MLP and the
    exit head; else the full ranker)."""
    if cascade is not None:
        full, cheap = cascade.flops(model)
        return np.where(exited, cheap, full).astype(np.float64) if exited is not None else np.full(n, float(full))
    f = dense_flops_per_sample(model)
    return np.full(n, float(f))


Submit = Callable[[Encoded], Awaitable[tuple]]


async def cached_predict(cache: ResultCache, version: object, step: int, keys: list[str], enc: Encoded,
                         submit: Submit, flops: Callable[[np.ndarray | None], np.ndarray]) -> Answer:
    """``enc``'s answer: hits from ``cache`` (under ``version``, the serving model's, whose step is ``step``),
    the misses scored by ``submit`` (the batcher: -> (logits, step, exited or None)) and stored. ``flops(exited)``:
    each sample's dense FLOPs by its path. A miss scored at another step than the hits' (a ``--follow`` update
    between): the whole request is scored again, so an answer is always one step's."""
    sk = sample_keys(enc, keys)
    found = cache.lookup(sk, version)
    miss = np.array([i for i, e in enumerate(found) if e is None], dtype=np.int64)
    n = len(enc)
    if miss.size == n:
        logits, got_step, exited = await submit(enc)
        if got_step == step:
            cache.store(sk, logits, exited, flops(exited), version)
        return Answer(logits, got_step, exited, np.zeros(n, bool))
    first = next(e for e in found if e is not None)
    logits = np.empty((n, *first.logits.shape), first.logits.dtype)
    with_exits = first.exited is not None
    exited = np.zeros(n, bool) if with_exits else None
    for i, e in enumerate(found):
        if e is not None:
            logits[i] = e.logits
            if exited is not None:
                exited[i] = bool(e.exited)
    cached = np.array([e is not None for e in found])
    if miss.size:
        sub = take(enc, miss)
        part, got_step, part_exit = await submit(sub)
        if got_step != step:  # the model moved on between the lookup and the batch: one step per answer
            logits, got_step, part_exit = await submit(enc)
            return Answer(logits, got_step, part_exit, np.zeros(n, bool))
        cache.store([sk[i] for i in miss], part, part_exit, flops(part_exit), version)
        logits[miss] = part
        if exited is not None and part_exit is not None:
            exited[miss] = part_exit
    return Answer(logits, step, exited, cached)


class EarlyAnswerCollector:
    """Scrape-time metrics of early exits (a `Cascade`) and of the result cache, either of them None (off)."""

    def __init__(self, cascade: Cascade | None, cache: ResultCache | None):
        self.cascade, self.cache = cascade, cache

    def collect(self):
        saved = CounterMetricFamily("tierec_flops_saved", "dense FLOPs not computed (estimate per path: 2 x the "
                                    "multiply-adds of the dense layers), by what saved them: an early exit, a "
                                    "result cache hit", labels=["by"])
        if self.cascade is not None:
            c = self.cascade.stats()
            ex = CounterMetricFamily("tierec_exit_samples", "samples scored by the exit head (exit) or by the full "
                                     "ranker (full)", labels=["path"])
            ex.add_metric(["exit"], c["exited"])
            ex.add_metric(["full"], c["full"])
            yield ex
            spent = CounterMetricFamily("tierec_dense_flops", "dense FLOPs computed for /v1/predict samples "
                                        "(estimate per path)")
            spent.add_metric([], c["flops_spent"])
            yield spent
            t = GaugeMetricFamily("tierec_exit_threshold", "--exit-threshold: a sample exits when |p_head - 0.5| "
                                  "is at least this")
            t.add_metric([], c["threshold"])
            yield t
            saved.add_metric(["exit"], c["flops_saved"])
        if self.cache is not None:
            s = self.cache.stats()
            look = CounterMetricFamily("tierec_result_cache_lookups", "samples looked up in the result cache, by "
                                       "result", labels=["result"])
            look.add_metric(["hit"], s["hits"])
            look.add_metric(["miss"], s["misses"])
            yield look
            ev = CounterMetricFamily("tierec_result_cache_evictions", "entries removed: size / bytes (least recently "
                                     "used, over the bound), ttl (expired), model (a new model version)",
                                     labels=["reason"])
            for k, v in s["evicted"].items():
                ev.add_metric([k], v)
            yield ev
            g = GaugeMetricFamily("tierec_result_cache_entries", "samples held in the result cache")
            g.add_metric([], s["entries"])
            yield g
            b = GaugeMetricFamily("tierec_result_cache_bytes", "bytes of the result cache (estimate: logits plus "
                                  f"{ENTRY_OVERHEAD} bytes per entry)")
            b.add_metric([], s["bytes"])
            yield b
            saved.add_metric(["result_cache"], s["flops_saved"])
        yield saved

"""Offline cache simulators: LRU, LFU and Belady's MIN over an access trace.

A *trace* is a 1-D integer array of keys (row IDs, page numbers), one per
request, in request order. A *cache size* (capacity) is a number of entries
(rows / pages), not bytes. Every simulator models a demand cache that starts
empty: a request is a *hit* if its key is in the cache, otherwise a *miss*
(cold misses, the first request of every key, are misses at every size).
Hit rates are ``hits / len(trace)`` (0.0 for an empty trace).

Policies
--------
LRU
    Evicts the least recently used entry. Computed for *all* sizes at once from
    Mattson stack distances (`stack_distances`): the request at time ``t`` hits
    in an LRU cache of ``C`` entries iff fewer than ``C`` distinct other keys
    were requested since the previous request of the same key.
LFU (in-cache)
    Every miss is admitted; when full, the entry with the smallest in-cache
    request count is evicted, ties broken by recency (least recently used
    first). Counts start at 1 on admission and are forgotten on eviction
    ("in-cache LFU", what TorchRec's and ColossalAI's LFU caches implement),
    unlike "perfect LFU" which counts over the whole history.
MIN (Belady)
    The offline optimum for demand caching. On a miss with a full cache the
    requested key is admitted and then, among the ``C + 1`` candidates, the one
    whose next request is farthest in the future is evicted -- possibly the
    requested key itself, which amounts to serving it without caching it
    (``bypass=True``, the default, and the true optimum of the hit count at a
    given size). With ``bypass=False`` the requested key is always cached and
    the victim is the cached key with the farthest next use (classic MIN under
    mandatory admission; optimal among policies that must cache every miss,
    such as LRU and LFU). Keys never requested again are always evicted first.
    Both give ``MIN >= LRU`` and ``MIN >= LFU`` at every size.

Cost (1 CPU core): `stack_distances` / `lru_hit_rates` is a vectorised
O(n log n) merge count (~1 s per million requests, every size at once);
`min_hit_rate` is one O(n log C) heap pass per size and `lfu_hit_rate` one
O(n) pass per size, in pure Python (about 0.3-1 s per million requests and size).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Stack distance given to a cold miss (first request of a key); larger than any size.
COLD = np.iinfo(np.int64).max

POLICIES = ("lru", "lfu", "min")


# --------------------------------------------------------------------------- helpers
def as_trace(trace) -> np.ndarray:
    """A 1-D int64 array view/copy of ``trace`` (any integer sequence)."""
    a = np.asarray(trace)
    if a.ndim != 1:
        raise ValueError(f"a trace must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"a trace must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def dense_ids(trace) -> tuple[np.ndarray, int]:
    """Renumber keys to ``0..u-1`` (in order of value); returns (ids int64 [n], u distinct keys)."""
    t = as_trace(trace)
    if t.size == 0:
        return np.zeros(0, np.int64), 0
    uniq, inv = np.unique(t, return_inverse=True)
    return inv.astype(np.int64, copy=False).reshape(-1), int(uniq.size)


def _check_sizes(sizes) -> np.ndarray:
    """Cache sizes as a 1-D int64 array (a scalar becomes one size); integral floats are accepted."""
    s = np.atleast_1d(np.asarray(sizes))
    if s.ndim != 1:
        raise ValueError(f"cache sizes must be a scalar or a 1-D sequence, got shape {s.shape}")
    if s.size and not np.issubdtype(s.dtype, np.integer):
        if not (np.issubdtype(s.dtype, np.floating) and np.all(np.mod(s, 1) == 0)):
            raise ValueError(f"cache sizes must be integers, got {sizes!r}")
    s = s.astype(np.int64)
    if s.size and s.min() < 0:
        raise ValueError(f"cache sizes must be >= 0, got {s.min()}")
    return s


def next_use(trace) -> np.ndarray:
    """Time of the next request of the same key.

    Returns int64 [n]: ``out[i]`` is the smallest ``j > i`` with
    ``trace[j] == trace[i]``, or ``n = len(trace)`` if the key is never requested
    again. Vectorised (one stable sort), O(n log n).
    """
    t = as_trace(trace)
    n = t.size
    out = np.full(n, n, np.int64)
    if n < 2:
        return out
    order = np.argsort(t, kind="stable")  # equal keys grouped, each group in time order
    same = t[order[1:]] == t[order[:-1]]
    out[order[:-1][same]] = order[1:][same]
    return out


def prev_use(trace) -> np.ndarray:
    """Time of the previous request of the same key: int64 [n], ``-1`` for a first request."""
    t = as_trace(trace)
    n = t.size
    out = np.full(n, -1, np.int64)
    if n < 2:
        return out
    order = np.argsort(t, kind="stable")
    same = t[order[1:]] == t[order[:-1]]
    out[order[1:][same]] = order[:-1][same]
    return out


def _count_earlier_smaller(v: np.ndarray) -> np.ndarray:
    """``out[i] = #{j < i : v[j] < v[i]}`` for an int64 array of *distinct* values.

    Bottom-up merge sort, one vectorised pass per level (log2 n levels): when two
    sorted sibling blocks of ``s`` slots are merged (a stable argsort of two
    sorted runs, which numpy's timsort does in linear time), an element of the
    right block moves forward by exactly the number of smaller elements in the
    left block: from slot ``start + s + rho`` to ``start + q``, ``q - rho``
    smaller on the left. Counts travel with their elements (``acc``); after the
    last level slot ``b`` holds the element of rank ``b``.
    """
    n = v.size
    if n < 2:
        return np.zeros(n, np.int64)
    order = np.argsort(v, kind="stable")  # order[b]: original index of the rank-b value
    vals = np.empty(n, np.int64)
    vals[order] = np.arange(n, dtype=np.int64)  # ranks 0..n-1, so block * n + rank fits in int64
    acc = np.zeros(n, np.int64)
    pos = np.arange(n, dtype=np.int64)
    k = 0
    while (1 << k) < n:  # merge blocks of s = 2**k slots into blocks of 2s
        perm = np.argsort((pos >> (k + 1)) * n + vals, kind="stable")  # new slot b <- old slot perm[b]
        vals = vals[perm]
        acc = acc[perm]
        acc += ((perm >> k) & 1) * (pos - perm + (1 << k))  # only elements from right blocks gain
        k += 1
    out = np.empty(n, np.int64)
    out[order] = acc
    return out


def stack_distances(trace) -> np.ndarray:
    """LRU (Mattson) stack distances of every request.

    Returns int64 [n]: ``out[t]`` = number of *distinct* keys requested strictly
    between the previous request of ``trace[t]`` and ``t`` (0 for an immediate
    re-request), or `COLD` (int64 max) for the first request of a key. The
    request hits in an LRU cache of ``C`` entries iff ``out[t] < C``.

    Vectorised, O(n log n): with ``p = prev[t]``, the distinct keys in ``(p, t)``
    are the requests ``j`` there with ``prev[j] < p`` (first of their key in the
    window), so ``out[t] = #{j < t : prev[j] < p} - (p + 1)`` -- an "earlier and
    smaller" count done by `_count_earlier_smaller`.
    """
    t = as_trace(trace)
    n = t.size
    prev = prev_use(t)
    cold = prev < 0
    # Make values distinct: cold requests get increasing negative values (< every real prev).
    v = np.where(cold, np.arange(n, dtype=np.int64) - n, prev)
    d = _count_earlier_smaller(v) - prev - 1
    d[cold] = COLD
    return d


def lru_hits(distances: np.ndarray, sizes) -> np.ndarray:
    """Number of LRU hits (int64, shape of ``sizes``) from `stack_distances` output."""
    s = _check_sizes(sizes)
    sd = np.sort(np.asarray(distances, np.int64))
    return np.searchsorted(sd, s, side="left").astype(np.int64)


def lru_hit_rates(trace, sizes) -> np.ndarray:
    """LRU hit rate at each cache size: float64 array, shape of ``np.atleast_1d(sizes)``.

    All sizes from one pass (`stack_distances`); cold misses count as misses.
    """
    t = as_trace(trace)
    s = _check_sizes(sizes)
    if t.size == 0:
        return np.zeros(s.shape, np.float64)
    return lru_hits(stack_distances(t), s) / t.size


def lru_hit_rate(trace, size: int) -> float:
    """LRU hit rate of one cache size (see `lru_hit_rates`)."""
    return float(lru_hit_rates(trace, [size])[0])


# --------------------------------------------------------------------------- LFU
def _lfu_hits(ids: list, size: int) -> int:
    """In-cache LFU (ties -> least recent) on dense ids; returns the hit count.

    O(1) per request: one insertion-ordered bucket per request count. A key
    enters bucket ``f`` at the request that brings its count to ``f``, i.e. at
    its latest request, so each bucket is in recency order and its first key
    is the least recent among the least frequent.
    """
    if size <= 0 or not ids:
        return 0
    freq = [0] * (max(ids) + 1)  # in-cache request count, 0 = not cached
    buckets: dict[int, OrderedDict] = {1: OrderedDict()}
    ones = buckets[1]
    minf = 1
    used = hits = 0
    for x in ids:
        f = freq[x]
        if f:
            hits += 1
            b = buckets[f]
            del b[x]
            if f == minf and not b:
                minf = f + 1
            f += 1
            nb = buckets.get(f)
            if nb is None:
                nb = buckets[f] = OrderedDict()
            nb[x] = None
            freq[x] = f
        else:
            if used < size:
                used += 1
            else:
                y, _ = buckets[minf].popitem(last=False)
                freq[y] = 0
            ones[x] = None
            freq[x] = 1
            minf = 1
    return hits


def lfu_hit_rate(trace, size: int) -> float:
    """Hit rate of an in-cache LFU cache of ``size`` entries (see module doc). O(n)."""
    ids, _ = dense_ids(trace)
    if ids.size == 0:
        return 0.0
    return _lfu_hits(ids.tolist(), int(_check_sizes([size])[0])) / ids.size


def lfu_hit_counts(trace, sizes, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """In-cache LFU hits (int64, shape of ``np.atleast_1d(sizes)``); ``progress(1)`` after each size."""
    s = _check_sizes(sizes)
    ids, u = dense_ids(trace)
    out = np.zeros(s.shape, np.int64)
    if ids.size == 0:
        return out
    lst = ids.tolist()
    for i, c in enumerate(s.tolist()):
        out[i] = _lfu_hits(lst, min(c, u))
        if progress:
            progress(1)
    return out


def lfu_hit_rates(trace, sizes, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """`lfu_hit_rate` at each size: float64 array, shape of ``np.atleast_1d(sizes)``."""
    n = as_trace(trace).size
    return lfu_hit_counts(trace, sizes, progress) / max(n, 1)


# --------------------------------------------------------------------------- MIN
def _min_hits_bypass(times: list, nexts: list, n: int, size: int) -> int:
    """Belady MIN with bypass over the requests ``times`` (increasing) with next uses ``nexts``.

    The cache is the set of future times at which a cached key is requested
    next; ``cached[t]`` says request ``t`` will hit. Heap of ``-next`` (max-heap).
    Entries of keys already requested (next <= now) are stale and stay at the
    bottom of the heap, never on top while a live entry exists.
    """
    if size <= 0:
        return 0
    cached = bytearray(n + 1)
    heap: list[int] = []
    push, replace = heapq.heappush, heapq.heapreplace
    used = hits = 0
    for t, nx in zip(times, nexts, strict=True):
        if cached[t]:
            hits += 1
            if nx < n:
                push(heap, -nx)  # the key stays; its old entry (-t) is now stale
                cached[nx] = 1
            else:
                used -= 1  # never requested again: drop it (same as evicting it first)
        elif nx < n:
            if used < size:
                used += 1
                push(heap, -nx)
                cached[nx] = 1
            else:
                far = -heap[0]
                if nx < far:  # evict the farthest next use; else bypass the requested key
                    replace(heap, -nx)
                    cached[far] = 0
                    cached[nx] = 1
    return hits


def _min_hits_no_bypass(nexts: list, n: int, size: int) -> int:
    """Belady MIN where every miss is cached (the victim is a *cached* key). ``nexts`` for all times."""
    if size <= 0:
        return 0
    cached = bytearray(n + 1)
    heap: list[int] = []
    push = heapq.heappush
    used = dead = hits = 0  # dead: cached keys never requested again (evicted first)
    for t, nx in enumerate(nexts):
        if cached[t]:
            hits += 1
            if nx < n:
                push(heap, -nx)
                cached[nx] = 1
            else:
                dead += 1
            continue
        if used < size:
            used += 1
        elif dead:
            dead -= 1
        else:
            far = -heapq.heappop(heap)
            cached[far] = 0
        if nx < n:
            push(heap, -nx)
            cached[nx] = 1
        else:
            dead += 1
    return hits


def _min_prepare(trace, bypass: bool):
    t = as_trace(trace)
    n = t.size
    nxt = next_use(t)
    if bypass:
        # Requests that can neither hit (first of a key) nor be kept (never reused) change nothing.
        keep = (prev_use(t) >= 0) | (nxt < n)
        times = np.flatnonzero(keep).tolist()
        return n, times, nxt[keep].tolist()
    return n, None, nxt.tolist()


def min_hit_rate(trace, size: int, bypass: bool = True) -> float:
    """Hit rate of Belady's MIN with a cache of ``size`` entries (see module doc). O(n log size)."""
    return float(min_hit_rates(trace, [size], bypass=bypass)[0])


def min_hit_counts(trace, sizes, bypass: bool = True,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Belady MIN hits (int64, shape of ``np.atleast_1d(sizes)``).

    Next uses are computed once; then one heap pass per size. ``progress(1)``
    is called after each size.
    """
    s = _check_sizes(sizes)
    n, times, nexts = _min_prepare(trace, bypass)
    out = np.zeros(s.shape, np.int64)
    for i, c in enumerate(s.tolist()):
        c = min(c, n)
        out[i] = _min_hits_bypass(times, nexts, n, c) if bypass else _min_hits_no_bypass(nexts, n, c)
        if progress:
            progress(1)
    return out


def min_hit_rates(trace, sizes, bypass: bool = True, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """`min_hit_rate` at each size: float64 array, shape of ``np.atleast_1d(sizes)``."""
    n = as_trace(trace).size
    return min_hit_counts(trace, sizes, bypass, progress) / max(n, 1)


# --------------------------------------------------------------------------- curves
@dataclass
class MissRatioCurve:
    """Hits of one policy on one trace at a set of cache sizes.

    ``sizes``: int64 [k], increasing cache capacities in entries; ``hits``:
    int64 [k], hits at each size; ``requests``: trace length; ``distinct``:
    number of distinct keys (footprint: every size >= it reaches the best
    possible hit count ``requests - distinct``).
    """

    policy: str
    sizes: np.ndarray
    hits: np.ndarray
    requests: int
    distinct: int
    name: str = ""
    meta: dict = field(default_factory=dict)
    #: LRU only: sorted finite stack distances (int64), for exact hits at any size; not serialised.
    distances: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        self.sizes = np.asarray(self.sizes, np.int64)
        self.hits = np.asarray(self.hits, np.int64)
        if self.sizes.shape != self.hits.shape or self.sizes.ndim != 1:
            raise ValueError("sizes and hits must be 1-D arrays of the same length")

    @property
    def misses(self) -> np.ndarray:
        """int64 [k]: misses at each size (cold misses included)."""
        return self.requests - self.hits

    @property
    def hit_ratio(self) -> np.ndarray:
        """float64 [k]: hits / requests."""
        return self.hits / max(self.requests, 1)

    @property
    def miss_ratio(self) -> np.ndarray:
        """float64 [k]: misses / requests."""
        return self.misses / max(self.requests, 1) if self.requests else np.zeros(self.sizes.shape)

    def hits_at(self, size: float) -> float:
        """Hits at any size: exact at a grid size (and everywhere for LRU with
        ``distances``), else linear interpolation between grid sizes (0 hits at
        size 0), ``requests - distinct`` from the footprint on."""
        if self.distances is not None:
            return float(np.searchsorted(self.distances, int(size), side="left"))
        xs = np.concatenate([[0], self.sizes, [max(self.distinct, int(self.sizes.max(initial=0)))]])
        ys = np.concatenate([[0], self.hits, [self.requests - self.distinct]]).astype(np.float64)
        order = np.argsort(xs, kind="stable")
        xs, ys = xs[order], ys[order]
        if size >= self.distinct:
            return float(self.requests - self.distinct)
        return float(np.interp(size, xs, ys))

    def to_dict(self) -> dict:
        return {"policy": self.policy, "name": self.name, "requests": int(self.requests),
                "distinct": int(self.distinct), "sizes": self.sizes.tolist(), "hits": self.hits.tolist(),
                "hit_ratio": [round(float(x), 8) for x in self.hit_ratio],
                "miss_ratio": [round(float(x), 8) for x in self.miss_ratio], "meta": self.meta}

    @staticmethod
    def from_dict(d: dict) -> MissRatioCurve:
        return MissRatioCurve(d["policy"], d["sizes"], d["hits"], d["requests"], d["distinct"],
                              d.get("name", ""), d.get("meta", {}))


def default_sizes(distinct: int, points: int = 16, min_fraction: float = 1e-4) -> np.ndarray:
    """A log-spaced grid of cache sizes from ``min_fraction`` of the footprint up to the footprint."""
    if distinct <= 0:
        return np.zeros(0, np.int64)
    lo = max(1.0, distinct * min_fraction)
    g = np.unique(np.round(np.geomspace(lo, distinct, max(points, 2))).astype(np.int64))
    return g[g >= 1]


def miss_ratio_curves(trace, sizes: Sequence[int] | np.ndarray | None = None,
                      policies: Iterable[str] = POLICIES, *, name: str = "", bypass: bool = True,
                      progress: Callable[[int], None] | None = None) -> dict[str, MissRatioCurve]:
    """Curves of several policies on one trace: ``{policy: MissRatioCurve}``.

    ``sizes`` defaults to `default_sizes` of the footprint. The LRU curve also
    carries ``distances`` (sorted finite stack distances, int64), so exact LRU
    hits at any other size are ``searchsorted(distances, size)``.
    ``progress(k)`` reports work done, in units of (policy, size) steps.
    """
    t = as_trace(trace)
    ids, u = dense_ids(t)
    s = default_sizes(u) if sizes is None else np.unique(_check_sizes(sizes))
    out: dict[str, MissRatioCurve] = {}
    for pol in policies:
        if pol == "lru":
            d = stack_distances(ids)
            d = np.sort(d[d != COLD])
            hits = np.searchsorted(d, s, side="left")
            out[pol] = MissRatioCurve(pol, s, hits, t.size, u, name, distances=d)
            if progress:
                progress(len(s))
        elif pol == "lfu":
            out[pol] = MissRatioCurve(pol, s, lfu_hit_counts(ids, s, progress), t.size, u, name)
        elif pol == "min":
            out[pol] = MissRatioCurve(pol, s, min_hit_counts(ids, s, bypass, progress), t.size, u, name,
                                      {"bypass": bypass})
        else:
            raise ValueError(f"unknown policy {pol!r} (choose from {', '.join(POLICIES)})")
    return out

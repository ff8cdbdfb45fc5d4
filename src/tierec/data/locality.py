"""Per-batch reuse ("locality") statistics of embedding lookups.

Meta published, for production DLRM training data (facebookresearch/dlrm_datasets),
how often each row of an embedding table is looked up again within one batch.
For one batch, aggregated over all tables, counting each (table, row) pair:

- *histogram of col sizes*: of the batch's unique (table, row) pairs, the fraction
  looked up ``k`` times within the batch, ``k`` in log2 bins
  ``(0,1], (1,2], (2,4], ..., (16384,32768], 32768+`` (17 bins);
- *ratio of index distribution*: of the batch's lookups, the fraction that fall on
  rows whose count is in each bin.

This module computes the same two histograms from ID arrays (vectorised:
``np.unique`` with counts, then ``np.bincount``), parses Meta's text files into
`LocalityStats`, and has two small metrics used to check generated data: the
share of lookups taken by the most popular rows, and a rank-based ROC AUC.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from tierec.errors import DataError

#: Upper edges of Meta's bins: (0,1], (1,2], (2,4], ..., (16384,32768]; the last bin is 32768+.
BIN_EDGES: list[int] = [0] + [1 << i for i in range(16)]  # 0, 1, 2, 4, ..., 32768
NUM_BINS = 17
BIN_LABELS: list[str] = [f"({BIN_EDGES[i]}, {BIN_EDGES[i + 1]}]" for i in range(16)] + ["32768+"]


# --------------------------------------------------------------------------- histograms
def count_bins(counts: np.ndarray) -> np.ndarray:
    """Counts ``k >= 1`` -> bin index: ``ceil(log2 k)`` capped at 16 (``k > 32768``).

    ``k=1 -> 0``, ``k=2 -> 1``, ``k=3,4 -> 2``, ..., ``k=16385..32768 -> 15``.
    """
    k = np.asarray(counts, dtype=np.int64)
    if k.size and k.min() < 1:
        raise ValueError("counts must be >= 1")
    _, e = np.frexp((k - 1).astype(np.float64))  # bit length of k-1 (exact for k-1 < 2**53)
    return np.minimum(e, NUM_BINS - 1).astype(np.int64)


@dataclass
class ReuseHistogram:
    """Reuse statistics of one batch (or a sum over batches, see `merge`)."""

    lookups: int  # total lookups
    unique: int  # unique (table, row) pairs
    unique_counts: np.ndarray  # int64 [17]: number of unique pairs per bin
    lookup_counts: np.ndarray  # int64 [17]: number of lookups per bin

    @property
    def col_size_hist(self) -> np.ndarray:
        """Fraction of unique rows per bin (Meta's "Histogram of col sizes")."""
        return self.unique_counts / max(1, self.unique)

    @property
    def index_ratio(self) -> np.ndarray:
        """Fraction of lookups per bin (Meta's "Ratio of index distribution")."""
        return self.lookup_counts / max(1, self.lookups)

    @property
    def avg_col_size(self) -> float:
        return self.lookups / max(1, self.unique)

    def merge(self, other: ReuseHistogram) -> ReuseHistogram:
        return ReuseHistogram(self.lookups + other.lookups, self.unique + other.unique,
                              self.unique_counts + other.unique_counts, self.lookup_counts + other.lookup_counts)

    @staticmethod
    def empty() -> ReuseHistogram:
        return ReuseHistogram(0, 0, np.zeros(NUM_BINS, np.int64), np.zeros(NUM_BINS, np.int64))


def histogram_from_counts(counts: np.ndarray) -> ReuseHistogram:
    """Per-row lookup counts (rows with count 0 are ignored) -> `ReuseHistogram`."""
    k = np.asarray(counts, dtype=np.int64)
    k = k[k > 0]
    b = count_bins(k)
    return ReuseHistogram(int(k.sum()), int(k.size), np.bincount(b, minlength=NUM_BINS).astype(np.int64),
                          np.bincount(b, weights=k, minlength=NUM_BINS).astype(np.int64))


def reuse_histogram(ids: np.ndarray | Sequence[np.ndarray]) -> ReuseHistogram:
    """Reuse histogram of one batch.

    ``ids`` is one int array (the row IDs of one table) or a sequence of them, one per
    table; rows of different tables are different rows (counted as (table, row) pairs).
    """
    if isinstance(ids, np.ndarray):
        ids = [ids]
    h = ReuseHistogram.empty()
    for a in ids:
        a = np.asarray(a)
        if a.size == 0:
            continue
        if a.min() >= 0 and a.max() < max(1 << 16, 4 * a.size):  # dense small range: bincount is cheaper
            counts = np.bincount(a)
        else:
            counts = np.unique(a, return_counts=True)[1]
        h = h.merge(histogram_from_counts(counts))
    return h


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation distance ``0.5 * sum |p - q|`` between two histograms (each normalised first)."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


# --------------------------------------------------------------------------- Meta's stats files
@dataclass
class LocalityStats:
    """One section of Meta's locality-stats file: one batch aggregated over all tables."""

    name: str  # e.g. "fbgemm_t856_bs65536_3.pt"
    num_batches: int
    batch_size: int
    avg_indices: float  # lookups in the batch, summed over tables
    avg_unique: float  # unique (table, row) pairs in the batch
    avg_col_size: float
    col_size_hist: np.ndarray  # float [17], fractions of unique rows (rounded to 3 decimals in the file)
    index_ratio: np.ndarray  # float [17], fractions of lookups

    @property
    def num_tables(self) -> int | None:
        m = re.search(r"_t(\d+)_", self.name)
        return int(m.group(1)) if m else None

    @property
    def lookups_per_sample_per_table(self) -> float | None:
        t = self.num_tables
        return self.avg_indices / self.batch_size / t if t else None


_HIST_LINE = re.compile(r"^\((\d+)(?:, (\d+)\]|\+):\s*([0-9.]+)$")


def parse_locality_stats(path: str | os.PathLike) -> list[LocalityStats]:
    """Parse one of Meta's ``dlrm_locality_stats_*.txt`` files into its sections."""
    path = str(path)
    with open(path) as f:
        lines = [ln.strip() for ln in f]
    sections: list[LocalityStats] = []
    cur: dict | None = None
    mode: str | None = None

    def finish(lineno: int):
        if cur is None:
            return
        for key in ("batch_size", "avg_indices", "avg_unique"):
            if key not in cur:
                raise DataError(f"section {cur['name']!r} has no {key}", path, lineno)
        for key in ("col", "idx"):
            if len(cur[key]) != NUM_BINS:
                raise DataError(f"section {cur['name']!r}: expected {NUM_BINS} histogram bins, got {len(cur[key])}",
                                path, lineno)
        avg_col = cur.get("avg_col_size", cur["avg_indices"] / cur["avg_unique"])
        sections.append(LocalityStats(cur["name"], cur.get("num_batches", 1), cur["batch_size"], cur["avg_indices"],
                                      cur["avg_unique"], avg_col, np.array(cur["col"]), np.array(cur["idx"])))

    for i, ln in enumerate(lines, 1):
        if not ln:
            continue
        if ln.endswith(".pt") or (cur is None and not ln.startswith("Locality")):
            finish(i)
            cur, mode = {"name": ln, "col": [], "idx": []}, None
            continue
        if cur is None:
            cur, mode = {"name": f"section{len(sections)}", "col": [], "idx": []}, None
        if m := re.match(r"Locality stats after processing (\d+) batches of size (\d+)", ln):
            cur["num_batches"], cur["batch_size"] = int(m.group(1)), int(m.group(2))
        elif m := re.match(r"Avg # of indices:\s*([0-9.eE+]+)", ln):
            cur["avg_indices"] = float(m.group(1))
        elif m := re.match(r"Avg # of unique cols:\s*([0-9.eE+]+)", ln):
            cur["avg_unique"] = float(m.group(1))
        elif m := re.match(r"Avg col size:\s*([0-9.eE+]+)", ln):
            cur["avg_col_size"] = float(m.group(1))
        elif ln.startswith("Histogram of col sizes"):
            mode = "col"
        elif ln.startswith("Ratio of index distribution"):
            mode = "idx"
        elif m := _HIST_LINE.match(ln):
            if mode is None:
                raise DataError("histogram line outside a histogram", path, i)
            cur[mode].append(float(m.group(3)))
        elif ln.startswith("["):
            continue  # bin edges and cumulative sums: redundant with the lines above
        else:
            raise DataError(f"unrecognised line {ln!r}", path, i)
    finish(len(lines))
    if not sections:
        raise DataError("no locality-stats sections found", path)
    return sections


def mean_stats(sections: Iterable[LocalityStats]) -> LocalityStats:
    """Average of several sections (same batch size), histograms renormalised to sum to 1."""
    sections = list(sections)
    col = np.mean([s.col_size_hist for s in sections], 0)
    idx = np.mean([s.index_ratio for s in sections], 0)
    return LocalityStats(
        f"mean of {len(sections)} sections", sum(s.num_batches for s in sections), sections[0].batch_size,
        float(np.mean([s.avg_indices for s in sections])), float(np.mean([s.avg_unique for s in sections])),
        float(np.mean([s.avg_col_size for s in sections])), col / col.sum(), idx / idx.sum())


# --------------------------------------------------------------------------- metrics
def top_share(counts: np.ndarray | Sequence[np.ndarray], fraction: float = 0.01,
              total_rows: int | None = None) -> float:
    """Share of all lookups taken by the most-looked-up ``fraction`` of rows.

    ``counts``: per-row lookup counts (one array per table, or one concatenated array).
    The number of rows in the top set is ``floor(fraction * total_rows)``, where
    ``total_rows`` defaults to the number of entries in ``counts`` (pass every table row,
    touched or not, e.g. ``np.bincount(ids, minlength=num_embeddings)`` per table).
    """
    if not isinstance(counts, np.ndarray):
        counts = np.concatenate([np.asarray(c) for c in counts])
    counts = np.asarray(counts, np.int64)
    n = counts.size if total_rows is None else int(total_rows)
    k = int(fraction * n)
    total = counts.sum()
    if total == 0 or k == 0:
        return 0.0
    k = min(k, counts.size)
    top = np.partition(counts, counts.size - k)[counts.size - k:]
    return float(top.sum() / total)


# --------------------------------------------------------------------------- expected histograms
_GRID_LO, _GRID_HI, _GRID_N = math.log(1e-9), math.log(1e8), 4000
_grid_tables: tuple[np.ndarray, np.ndarray] | None = None


def _poisson_cdf(t: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """P(Y <= t) for Y ~ Poisson(lam): lam [m], integer thresholds t [k] (t < 0 gives 0) -> [m, k]."""
    out = np.empty((lam.size, t.size))
    small = lam <= 300.0
    if small.any():
        ls = lam[small]
        kmax = 1000
        k = np.arange(kmax + 1, dtype=np.float64)
        lgam = np.array([math.lgamma(v + 1.0) for v in k])
        logp = k[None, :] * np.log(ls[:, None]) - ls[:, None] - lgam[None, :]
        c = np.cumsum(np.exp(logp), axis=1)
        ti = np.clip(t.astype(np.int64), 0, kmax)
        out[small] = np.where(t[None, :] < 0, 0.0, c[:, ti])
    if (~small).any():  # Wilson-Hilferty: P(Y <= t) = P(Gamma(t+1) > lam)
        lb = lam[~small][:, None]
        x = t[None, :] + 1.0
        with np.errstate(invalid="ignore", divide="ignore"):
            z = 3.0 * np.sqrt(x) * ((lb / x) ** (1.0 / 3.0) - 1.0 + 1.0 / (9.0 * x))
        erfc = np.vectorize(math.erfc, otypes=[np.float64])
        out[~small] = np.where(t[None, :] < 0, 0.0, 0.5 * erfc(z / math.sqrt(2.0)))
    return out


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Per grid point lam: P(count in bin j) [G, 17] and E[count; count in bin j] [G, 17]."""
    global _grid_tables
    if _grid_tables is None:
        lam = np.exp(np.linspace(_GRID_LO, _GRID_HI, _GRID_N))
        t = np.array(BIN_EDGES[1:], np.float64)  # 1, 2, 4, ..., 32768
        cdf = np.concatenate([np.exp(-lam)[:, None], _poisson_cdf(t, lam)], 1)  # P(Y<=0), P(Y<=1), ..., P(Y<=32768)
        ub = np.concatenate([np.diff(cdf, axis=1), 1.0 - cdf[:, -1:]], 1)
        # E[Y; a < Y <= b] = lam * P(a-1 < Y <= b-1)
        g = np.concatenate([np.zeros((lam.size, 1)), _poisson_cdf(t - 1.0, lam)], 1)
        lb = np.concatenate([np.diff(g, axis=1), 1.0 - g[:, -1:]], 1) * lam[:, None]
        _grid_tables = (np.clip(ub, 0, None), np.clip(lb, 0, None))
    return _grid_tables


def expected_histogram(lam: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Expected reuse histogram of one batch when row ``i``'s count is Poisson(``lam[i]``).

    ``rows[i]`` (default 1) says how many rows share that ``lam`` (for grouped tails).
    Returns (expected unique rows per bin [17], expected lookups per bin [17]); used to
    calibrate the generator (smooth in its parameters, unlike a sampled batch).
    """
    lam = np.asarray(lam, np.float64)
    w = np.ones_like(lam) if rows is None else np.asarray(rows, np.float64)
    keep = lam > 0
    lam, w = lam[keep], w[keep]
    ub, lb = _grid()
    x = (np.log(lam) - _GRID_LO) / (_GRID_HI - _GRID_LO) * (_GRID_N - 1)
    x = np.clip(x, 0, _GRID_N - 1 - 1e-9)
    i = x.astype(np.int64)
    f = x - i
    gw = np.bincount(i, weights=w * (1 - f), minlength=_GRID_N) + np.bincount(i + 1, weights=w * f, minlength=_GRID_N)
    return gw @ ub, gw @ lb

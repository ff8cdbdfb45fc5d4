"""Miss-ratio curves and cache sizing, the work behind `tierec analyze` (CLI: `tierec.cli.analyze`).

For every table (sparse feature of a data set, or the one trace of a file) it
simulates LRU, in-cache LFU and Belady's MIN (`tierec.sim.policies`) over a grid
of cache sizes, prints hit ratios, writes PNG plots and a JSON of the curves,
and, given a memory budget, splits it across tables to minimise total misses
(greedy marginal gain on the concave hull of each table's hit curve).
See docs/analyze.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from tierec.errors import TierecError


def parse_sizes(text: str) -> np.ndarray:
    """``"1000,2000,4k,1M"`` -> int64 array (k = 1,000, M = 1,000,000: sizes are counts of rows)."""
    out = []
    for tok in str(text).split(","):
        t = tok.strip().replace("_", "")
        if not t:
            continue
        mult = {"k": 1000, "m": 1000**2, "g": 1000**3}.get(t[-1].lower(), 1)
        body = t[:-1] if mult > 1 else t
        try:
            v = float(body) * mult
        except ValueError:
            raise TierecError(f"--sizes: {tok.strip()!r} is not a cache size (use e.g. 1000,10k,1M)") from None
        if v < 1 or v != int(v):
            raise TierecError(f"--sizes: cache sizes must be whole numbers >= 1, got {tok.strip()!r}")
        out.append(int(v))
    if not out:
        raise TierecError("--sizes: no sizes given")
    return np.unique(np.array(out, np.int64))


# --------------------------------------------------------------------------- allocation
def _upper_hull(xs: np.ndarray, ys: np.ndarray) -> list[tuple[int, float]]:
    """Concave majorant of points sorted by x (monotone chain): [(x, y)] from the first point."""
    hull: list[tuple[int, float]] = []
    for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
        if hull and x == hull[-1][0]:
            if y <= hull[-1][1]:
                continue
            hull.pop()
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (x - x1) <= (y - y1) * (x2 - x1):  # middle point under the chord
                hull.pop()
            else:
                break
        hull.append((x, y))
    return hull


def _curve_points(curve, dense: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, hits) candidate points for allocation, including (0, 0) and the footprint."""
    u = curve.distinct
    xs = [np.array([0, u], np.int64), curve.sizes[curve.sizes <= u]]
    if curve.distances is not None and u > 0:  # LRU: exact everywhere, use a dense grid
        xs.append(np.unique(np.round(np.geomspace(1, u, dense)).astype(np.int64)))
    x = np.unique(np.concatenate(xs))
    y = np.array([curve.hits_at(int(s)) for s in x], np.float64)
    return x, y


def allocate(curves: dict, budget_rows: int) -> dict[str, int]:
    """Split ``budget_rows`` cache rows across tables to maximise total hits.

    ``curves``: ``{table: MissRatioCurve}`` of one policy. Greedy on marginal
    gain: the segments of every table's concave hull of hits-vs-size, best
    hits-per-row first; exact for concave curves and piecewise-linear
    hits. A table never gets more rows than its footprint (no gain beyond).
    Returns ``{table: rows}``.
    """
    segs = []
    for name, c in curves.items():
        x, y = _curve_points(c)
        hull = _upper_hull(x, y)
        for j in range(1, len(hull)):
            dx, dy = hull[j][0] - hull[j - 1][0], hull[j][1] - hull[j - 1][1]
            if dx > 0 and dy > 0:
                segs.append((-dy / dx, name, j, dx))
    segs.sort(key=lambda s: (s[0], s[2]))
    alloc = dict.fromkeys(curves, 0)
    blocked: set[str] = set()
    left = int(budget_rows)
    for _, name, _, dx in segs:
        if left <= 0:
            break
        if name in blocked:
            continue
        take = min(dx, left)
        alloc[name] += take
        left -= take
        if take < dx:
            blocked.add(name)
    return alloc


def proportional_split(curves: dict, budget_rows: int) -> dict[str, int]:
    """Rows proportional to each table's footprint (a common rule of thumb), capped at it."""
    total = sum(c.distinct for c in curves.values())
    if total == 0:
        return dict.fromkeys(curves, 0)
    return {n: int(min(c.distinct, budget_rows * c.distinct // total)) for n, c in curves.items()}


# --------------------------------------------------------------------------- plotting
def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "trace"


_STYLE = {"lru": ("LRU", "C0"), "lfu": ("LFU (in-cache)", "C1"), "min": ("MIN (Belady)", "C2")}


def plot_curves(path: Path, name: str, curves: dict, alloc_rows: int | None = None,
                row_bytes: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    any_c = next(iter(curves.values()))
    n, u = any_c.requests, any_c.distinct
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pol, c in curves.items():
        label, color = _STYLE[pol]
        if c.distances is not None and u > 0:  # LRU: exact, draw it densely
            xs = np.unique(np.round(np.geomspace(1, max(u, int(c.sizes.max(initial=1))), 300)).astype(np.int64))
            hits = np.searchsorted(c.distances, xs, side="left")
            ax.plot(xs, 1 - hits / n, color=color, label=label)
            ax.plot(c.sizes, c.miss_ratio, "o", color=color, ms=3)
        else:
            ax.plot(c.sizes, c.miss_ratio, "o-", color=color, ms=3, label=label)
    ax.axhline(u / n, color="grey", ls=":", lw=1, label=f"cold misses ({u / n:.1%})")
    if alloc_rows:
        ax.axvline(alloc_rows, color="k", ls="--", lw=1, label=f"recommended: {alloc_rows:,} rows")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("cache size (rows)" + (f", {row_bytes} B each" if row_bytes else ""))
    ax.set_ylabel("miss ratio")
    ax.set_title(f"{name}: {n:,} requests, {u:,} distinct IDs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

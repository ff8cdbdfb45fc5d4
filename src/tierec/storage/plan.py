"""Placing tables in a memory budget: which stay in memory, which go to SSD, how big each cache is.

The budget counts embedding storage only: in-memory tables (weights + optimizer
state) and, for SSD tables, their caches (rows + index). Everything else (the
dense network, batches, the Python runtime) is a fixed overhead on top; see
docs/storage.md for its measured size.

Water-filling by access share: every table is entitled to a share of the budget
proportional to its share of lookups (measured in a pass over the first batches
of the data). A table whose whole size fits in its entitlement stays in memory
and hands the rest back; this repeats until no further table fits. The tables
left go to SSD, each with a cache of its entitlement.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TypedDict

import numpy as np

from tierec.config import format_bytes, parse_bytes  # noqa: F401  (re-exported)
from tierec.errors import ConfigError

log = logging.getLogger(__name__)


class TableOverrides(TypedDict, total=False):
    """One table's fixed choices for `plan_tables` (`tierec.storage.tiered.table_overrides`)."""

    placement: str  # "memory" | "ssd"
    cache_rows: int  # SSD tables: rows of the cache
    policy: str  # SSD tables: the cache's policy


@dataclass
class TableNeeds:
    name: str
    num_embeddings: int
    row_bytes: int  # weights + optimizer state
    lookups: int  # measured in the sampling pass
    sampled_rows: int = 0  # distinct IDs of the sampling pass: the most rows a hot-row layout takes

    @property
    def table_bytes(self) -> int:
        return self.num_embeddings * self.row_bytes


@dataclass
class Placement:
    name: str
    placement: str  # "memory" | "ssd"
    cache_rows: int  # 0 for memory tables
    policy: str
    table_bytes: int
    budget_bytes: int  # what this table may use from the budget
    access_share: float

    def to_dict(self) -> dict:
        return asdict(self)


def plan_tables(tables: list[TableNeeds], budget: int, policy: str = "lru", index_bytes_per_row: int = 64,
                overrides: dict[str, TableOverrides] | None = None) -> list[Placement]:
    """Split ``budget`` bytes across ``tables`` (see module doc). ``overrides[name]`` may set
    ``placement`` ("memory"/"ssd"), ``cache_rows`` and ``policy`` for one table."""
    overrides = overrides or {}
    unknown = set(overrides) - {t.name for t in tables}
    if unknown:
        raise ConfigError(f"per-table settings name unknown table(s) {sorted(unknown)}; "
                          f"tables are {[t.name for t in tables]}")
    out: dict[str, Placement] = {}
    remaining = budget
    free = []
    for t in tables:  # fixed choices first: they spend budget before the water-filling
        o = overrides.get(t.name, {})
        if o.get("placement") == "memory":
            out[t.name] = Placement(t.name, "memory", 0, policy, t.table_bytes, t.table_bytes, 0.0)
            remaining -= t.table_bytes
        elif o.get("placement") == "ssd" and "cache_rows" in o:
            rows = int(o["cache_rows"])
            cost = rows * (t.row_bytes + index_bytes_per_row)
            out[t.name] = Placement(t.name, "ssd", rows, o.get("policy", policy), t.table_bytes, cost, 0.0)
            remaining -= cost
        else:
            free.append(t)
    if remaining < 0:
        raise ConfigError(f"per-table settings need {format_bytes(budget - remaining)}, more than the memory "
                          f"budget of {format_bytes(budget)}")
    total_lookups = sum(max(t.lookups, 1) for t in free) or 1
    share = {t.name: max(t.lookups, 1) / total_lookups for t in free}
    pending = list(free)
    while pending:
        pool = sum(share[t.name] for t in pending)
        fits = [t for t in pending if t.table_bytes <= remaining * share[t.name] / pool
                and overrides.get(t.name, {}).get("placement") != "ssd"]
        if not fits:
            break
        for t in fits:
            out[t.name] = Placement(t.name, "memory", 0, policy, t.table_bytes, t.table_bytes, share[t.name])
            remaining -= t.table_bytes
            pending.remove(t)
    pool = sum(share[t.name] for t in pending) or 1.0
    for t in pending:
        entitled = int(remaining * share[t.name] / pool)
        rows = min(t.num_embeddings, entitled // (t.row_bytes + index_bytes_per_row))
        pol = overrides.get(t.name, {}).get("policy", policy)
        if rows < 1:
            raise ConfigError(f"the memory budget of {format_bytes(budget)} leaves table {t.name!r} no cache row; "
                              "raise --memory-budget")
        out[t.name] = Placement(t.name, "ssd", rows, pol, t.table_bytes, rows * (t.row_bytes + index_bytes_per_row),
                                share[t.name])
    return [out[t.name] for t in tables]


@dataclass
class BudgetSplit:
    """How a memory budget is spent (bytes). ``row_bits``: 3 bits per row of every table (rows written,
    changed since the last checkpoint, held by the SSD file); ``window``: the look-ahead window (steps read
    ahead and prepared, not yet taken by the trainer, and the oracles; the pipeline holds it to this);
    ``layout``: the SSD files' hot-row layouts (`tierec.storage.layout.HotLayout`, 16 B per hot row);
    ``write_log`` / ``log_staging`` / ``log_recent``: the SSD files' write-back log maps, the rows staged before
    them and the log sectors read lately, held in memory;
    ``log_runs``: the indexes of the logs' compacted runs (1.5 bits per row of every table);
    ``tables``: the rest, for in-memory tables
    and the SSD tables' caches (rows + index)."""

    total: int
    row_bits: int = 0
    window: int = 0
    layout: int = 0
    id_index: int = 0  # dynamic tables' raw ID -> slot indexes (`DynamicConfig.index_bytes_per_row` per slot)
    write_log: int = 0  # the SSD files' write-back log maps (`tierec.storage.rowlog`, 8 B per moved row)
    log_staging: int = 0  # write-backs staged by placement rank before the logs (`tierec.storage.rowlog`)
    log_runs: int = 0  # the logs' compacted runs' indexes (`tierec.storage.rowlog.run_index_bytes`)
    log_recent: int = 0  # the logs' sectors read lately (`tierec.storage.rowlog.RecentSectors`)

    @property
    def tables(self) -> int:
        return (self.total - self.row_bits - self.window - self.layout - self.id_index - self.write_log
                - self.log_staging - self.log_runs - self.log_recent)

    def to_dict(self) -> dict:
        return {**asdict(self), "tables": self.tables}

    def describe(self) -> str:
        parts = [("row bits", self.row_bits), ("look-ahead window", self.window), ("hot-row layouts", self.layout),
                 ("dynamic ID indexes", self.id_index), ("write-back log maps", self.write_log),
                 ("write-back staging", self.log_staging), ("write-back run indexes", self.log_runs),
                 ("recent log sectors", self.log_recent),
                 ("tables and caches", self.tables)]
        return f"memory budget {format_bytes(self.total)}: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in parts)


@dataclass
class AccessSample:
    """Per-table access counts from a pass over the first batches: ``ids`` and ``counts`` int64 [distinct]."""

    lookups: int
    ids: np.ndarray
    counts: np.ndarray


def measure_lookups(dataset, names: list[str], batch_size: int, max_batches: int = 50,
                    seed: int = 0) -> dict[str, AccessSample]:
    """Count lookups per (table, ID) over the first ``max_batches`` training batches of epoch 0."""
    seen: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i, chunk in enumerate(dataset.chunks("train", batch_size, shuffle=True, seed=seed)):
        if i >= max_batches:
            break
        for n in names:
            seen[n].append(chunk.sparse[n][0].copy())  # a view would keep the whole decoded row group alive
    out = {}
    for n in names:
        vals = np.concatenate(seen[n]) if seen[n] else np.zeros(0, np.int64)
        ids, counts = np.unique(vals, return_counts=True)
        out[n] = AccessSample(int(vals.size), ids, counts.astype(np.int64))
    return out


def describe(plan: list[Placement], budget: int) -> str:
    lines = [f"memory budget {format_bytes(budget)} for embedding storage:",
             f"  {'table':<12} {'placement':<9} {'size':>11} {'cache rows':>12} {'budget':>11} {'access':>7}"]
    for p in plan:
        cache = f"{p.cache_rows:,}" if p.placement == "ssd" else "-"
        lines.append(f"  {p.name:<12} {p.placement:<9} {format_bytes(p.table_bytes):>11} {cache:>12} "
                     f"{format_bytes(p.budget_bytes):>11} {p.access_share:7.1%}")
    used = sum(p.budget_bytes for p in plan)
    lines.append(f"  total used {format_bytes(used)} of {format_bytes(budget)}")
    return "\n".join(lines)

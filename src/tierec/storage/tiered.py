"""Build a model's table storage from a memory budget: in-memory tables, or SSD files behind caches."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tierec.config import format_bytes
from tierec.data.hashing import reduce_raw
from tierec.errors import CheckpointError, ConfigError
from tierec.malloc import limit_malloc_retention, release_free_memory
from tierec.storage.cache import CachedTable
from tierec.storage.dynamic import TableRows
from tierec.storage.group import TableGroup
from tierec.storage.layout import HOT_LAYOUT_BYTES_PER_ROW, HotLayout
from tierec.storage.lazy import RowInit
from tierec.storage.lookahead import LookaheadCache
from tierec.storage.plan import (
    AccessSample,
    BudgetSplit,
    Placement,
    TableNeeds,
    TableOverrides,
    describe,
    measure_lookups,
    plan_tables,
)
from tierec.storage.rowlog import log_bytes, log_capacity, run_index_bytes, staged_row_bytes
from tierec.storage.settings import StorageSettings, TableSettings
from tierec.storage.ssd import SsdTable, open_table_chain, read_layout
from tierec.storage.tablefile import is_row_set, verify_file

if TYPE_CHECKING:
    from tierec.data.dataset import Dataset, Schema

log = logging.getLogger(__name__)

# Cache bookkeeping per cached row (hash index + per-slot metadata), counted in the budget:
INDEX_BYTES_PER_ROW = 152  # upper bound per cached row of a CachedTable (measured 102 B at 5M rows)
# LookaheadCache: that, + 17 B of next use / long-run count / neighbour flag, + its count-min sketch (2 x a power of two
# >= capacity int64 counters: up to 32 B per row)
LOOKAHEAD_INDEX_BYTES_PER_ROW = INDEX_BYTES_PER_ROW + 17 + 32


def index_bytes_per_row(settings: StorageSettings) -> int:
    """Bookkeeping bytes per cached row that the budget pays: the look-ahead cache's when any table may
    have one."""
    return LOOKAHEAD_INDEX_BYTES_PER_ROW if settings.uses_lookahead else INDEX_BYTES_PER_ROW


def sample_as_rows(sample: dict[str, AccessSample], rows: dict[str, TableRows]) -> dict[str, AccessSample]:
    """The planning pass's sampled IDs as table rows: a fixed table's raw IDs reduced mod its rows; a dynamic
    table's slots are not known before training (its lookups count, its IDs are dropped)."""
    out = dict(sample)
    for name, r in rows.items():
        s = sample[name]
        if r.kind == "hashed":
            ids, inv = np.unique(reduce_raw(s.ids, r.rows), return_inverse=True)
            out[name] = AccessSample(s.lookups, ids, np.bincount(inv, weights=s.counts).astype(np.int64))
        elif r.kind == "dynamic":
            out[name] = AccessSample(s.lookups, np.zeros(0, np.int64), np.zeros(0, np.int64))
    return out


def plan_storage(settings: StorageSettings, schema: Schema, dataset: Dataset,
                 row_bytes: int) -> tuple[list[Placement], dict[str, AccessSample], BudgetSplit]:
    """Measure access shares on the first batches and split ``settings.memory_budget``: first what the
    tables' machinery holds (`split_budget`), then the tables of ``schema`` (rows of ``row_bytes``:
    weights + optimizer state) with the rest."""
    names = schema.sparse_names
    limit_malloc_retention()  # the pass's multi-MB arrays go back to the OS when freed ...
    sample = measure_lookups(dataset, names, settings.plan_batch_size, settings.plan_batches, settings.seed)
    release_free_memory()  # ... and what the readers' pools and arenas keep for reuse too
    rows = {f.name: settings.table_rows.get(f.name) or TableRows(f.num_embeddings) for f in schema.sparse}
    return plan_sampled(settings, {n: r.rows for n, r in rows.items()}, sample_as_rows(sample, rows), row_bytes)


def plan_sampled(settings: StorageSettings, rows: dict[str, int], sample: dict[str, AccessSample],
                 row_bytes: int) -> tuple[list[Placement], dict[str, AccessSample], BudgetSplit]:
    """`plan_storage` once the lookups are measured: tables ``rows`` (name -> rows, in table order) with
    their sampled accesses (``sample``, table rows); also for models whose batches are not a `Dataset`'s
    (SASRec's item table, `tierec.train.sequence`)."""
    needs = [TableNeeds(name, n, row_bytes, sample[name].lookups, sample[name].ids.size) for name, n in rows.items()]
    overrides = {name: table_overrides(t) for name, t in settings.tables.items()}
    split = split_budget(settings, needs)
    plan, budget = plan_budget(settings, needs, overrides, split.tables if settings.memory_budget is not None else None)
    if settings.memory_budget is None:
        split = BudgetSplit(budget)
    log.info("%s\n%s", split.describe(), describe(plan, budget))
    return plan, sample, split


WRITE_LOG_SHARE = 16  # the write-back logs' maps may take at most 1/16 of the budget
LOG_STAGING_SHARE = 64  # with look-ahead, write-backs staged by next use may take 1/64 of it (`tierec.storage.rowlog`)
LOG_RECENT_SHARE = 128  # and the log sectors read lately, held in memory, 1/128 (`tierec.storage.rowlog.RecentSectors`)
ROW_BITS = 3  # per row of every table: written, changed since the last checkpoint, held by its file (`LazyRows`)
WINDOW_SHARE = 4  # the look-ahead window may take at most 1/4 of the memory budget (above its floor)
# What the look-ahead window holds per lookup of a step (`tierec.train.pipeline.LookaheadPipeline.held_nbytes`): the
# batch (~27 B: the ID, its bag's length and offset, the dense features' share), the step's unique IDs and the
# oracle's ring and hash map (~15 B per lookup at half unique), and once prepared its lookups (the dedup's 16 B
# and the working set's 8 B); measured 45-60 B on bench_scale's Criteo-shaped batches.
WINDOW_BYTES_PER_LOOKUP = 64
LAYOUT_SHARE = 16  # the hot-row layouts may take at most 1/16 of it
LAYOUT_MIN_BUDGET = 1 << 20  # below this budget the files are laid out plain (every byte goes to the caches)


def uses_write_log(settings: StorageSettings) -> bool:
    """Whether SSD working files get a write-back log (`tierec.storage.rowlog`): O_DIRECT, packed rows, laid out
    plain (a hot layout keeps its rows in place: the block neighbours it reads are the rows written there)."""
    return settings.write_log and settings.direct_io and not settings.row_align and settings.ssd_layout == "plain"


def split_budget(settings: StorageSettings, needs: list[TableNeeds]) -> BudgetSplit:
    """What ``settings.memory_budget`` pays before the tables: `ROW_BITS` bits per row of every table, and, with
    look-ahead, the window: ``lookahead`` batches of the sampled size (`WINDOW_BYTES_PER_LOOKUP`), at most
    ``lookahead_memory`` and 1/`WINDOW_SHARE` of the budget, and at least the ``prefetch_depth`` + 1 steps
    every window holds (the prepared ones, one read ahead) where that is at most half the budget (a
    warning where it is not); the pipeline holds the window to it; with ``ssd_layout="hot"``, the SSD
    files' hot-row layouts: 16 B per sampled row, at most 1/`LAYOUT_SHARE` of a budget of
    `LAYOUT_MIN_BUDGET` or more; with a write-back log, its maps (at most 1/`WRITE_LOG_SHARE`) and, with
    look-ahead, the write-backs it stages by next use (1/`LOG_STAGING_SHARE`) and the log sectors read lately
    (1/`LOG_RECENT_SHARE`), and its compacted runs' indexes (`run_index_bytes`: 1.5 bits per row). A budget too
    small for them is a `ConfigError`."""
    total = settings.memory_budget or 0
    if settings.memory_budget is None:
        return BudgetSplit(0)
    row_bits = sum((ROW_BITS * n.num_embeddings + 7) // 8 for n in needs)
    id_index = sum(r.index_bytes for r in settings.table_rows.values())  # dynamic tables' raw ID -> slot indexes
    window = 0
    if settings.uses_lookahead:
        per_batch = WINDOW_BYTES_PER_LOOKUP * sum(n.lookups for n in needs) // max(1, settings.plan_batches)
        floor = (settings.prefetch_depth + 1) * per_batch
        window = min(settings.lookahead_memory, settings.lookahead * per_batch, total // WINDOW_SHARE)
        if window < floor <= total // 2:
            window = floor
        elif window < floor:
            log.warning("--memory-budget %s is below what the look-ahead window holds at least (%d steps of ~%s): the "
                        "window takes 1/%d of it and will hold more", format_bytes(total),
                        settings.prefetch_depth + 1, format_bytes(per_batch), WINDOW_SHARE)
    layout = 0
    if settings.ssd_layout == "hot" and total >= LAYOUT_MIN_BUDGET:
        layout = min(total // LAYOUT_SHARE, HOT_LAYOUT_BYTES_PER_ROW * sum(n.sampled_rows for n in needs))
    write_log = 0
    if uses_write_log(settings) and sum(n.table_bytes for n in needs) > total:  # some table will be on SSD
        write_log = min(total // WRITE_LOG_SHARE, sum(log_bytes(n.num_embeddings, n.num_embeddings)
                                                      for n in needs))
    staging = total // LOG_STAGING_SHARE if write_log and settings.uses_lookahead else 0
    runs = sum(run_index_bytes(n.num_embeddings) for n in needs) if write_log else 0
    recent = total // LOG_RECENT_SHARE if staging else 0
    split = BudgetSplit(total, row_bits, window, layout, id_index, write_log, staging, runs, recent)
    if split.tables <= 0:
        raise ConfigError(f"--memory-budget {format_bytes(total)} does not cover the tables' bookkeeping "
                          f"({split.describe()}); raise it")
    return split


def table_overrides(t: TableSettings, rows: int = 1, of: int = 1) -> TableOverrides:
    """`TableSettings` -> `plan_tables` overrides; a shard holding ``rows`` of the table's ``of`` rows
    gets that share of its ``cache_rows`` (rounded up)."""
    o: TableOverrides = {}
    if t.placement != "auto":
        o["placement"] = t.placement
    if t.cache_rows is not None:
        o["cache_rows"] = max(1, -(-t.cache_rows * rows // of))
        o.setdefault("placement", "ssd")
    if t.policy is not None:
        o["policy"] = t.policy
    return o


def plan_budget(settings: StorageSettings, needs: list[TableNeeds], overrides: dict[str, TableOverrides],
                budget: int | None = None) -> tuple[list[Placement], int]:
    """`plan_tables` under ``budget`` (default ``settings.memory_budget``); without one (only per-table
    settings) the budget is what those settings need, and every other table stays in memory. Fills
    ``overrides`` in."""
    index = index_bytes_per_row(settings)
    if budget is not None:
        pass
    elif settings.memory_budget is not None:
        budget = settings.memory_budget
    else:
        row_bytes = {n.name: n.row_bytes for n in needs}
        budget = sum(n.table_bytes for n in needs) + sum(
            o.get("cache_rows", 0) * (row_bytes[name] + index) for name, o in overrides.items())
        for n in needs:
            overrides.setdefault(n.name, {}).setdefault("placement", "memory")
    plan = plan_tables(needs, budget, settings.policy, index, overrides)
    if settings.memory_budget is not None:
        plan = fit_caches(plan, needs, budget, settings, overrides)
    return plan, budget


def cache_cost(plan: list[Placement], needs: list[TableNeeds], settings: StorageSettings) -> dict[str, int]:
    """Bytes each table of ``plan`` takes from the budget, exactly as the factory will build it: an in-memory
    table its rows; an SSD table its cache's rows and bookkeeping (`CachedTable.bookkeeping_bytes`), the
    look-ahead tables of one row width sharing one cache (`TableGroup`), whose bookkeeping they split
    by rows."""
    row_bytes = {n.name: n.row_bytes for n in needs}
    out = {p.name: p.table_bytes for p in plan if p.placement == "memory"}
    groups: dict[int, list[Placement]] = {}
    for p in plan:
        if p.placement != "ssd":
            continue
        if p.policy == "lookahead" and settings.group_caches:
            groups.setdefault(row_bytes[p.name], []).append(p)
            continue
        cls = LookaheadCache if p.policy == "lookahead" else CachedTable
        out[p.name] = p.cache_rows * row_bytes[p.name] + cls.bookkeeping_bytes(p.cache_rows, p.policy)
    for rb, members in groups.items():
        rows = sum(p.cache_rows for p in members)
        book = LookaheadCache.bookkeeping_bytes(rows)
        for p in members:
            out[p.name] = p.cache_rows * rb + -(-book * p.cache_rows // rows)
    return out


def fit_caches(plan: list[Placement], needs: list[TableNeeds], budget: int, settings: StorageSettings,
               overrides: dict[str, TableOverrides]) -> list[Placement]:
    """``plan`` with its SSD caches sized to what they really cost (`cache_cost`) instead of `plan_tables`'s
    per-row bound: the caches whose rows no per-table setting fixes grow (or shrink) by one factor --
    each at most its table's rows -- to the largest that fits ``budget``. The bound, made for the worst
    case, left a quarter of the budget unused at most sizes (a hash map's power-of-two rounding, the
    sketch's minimum width). A plan that does not fit even at one row per cache is returned as it was."""
    free = {p.name for p in plan if p.placement == "ssd" and "cache_rows" not in overrides.get(p.name, {})}
    if not free:
        return plan
    table_rows = {n.name: n.num_embeddings for n in needs}

    def scaled(f: float) -> list[Placement]:
        return [replace(p, cache_rows=min(table_rows[p.name], max(1, int(p.cache_rows * f))))
                if p.name in free else p for p in plan]

    def fits(f: float) -> bool:
        return sum(cache_cost(scaled(f), needs, settings).values()) <= budget

    top = max(table_rows[p.name] / p.cache_rows for p in plan if p.name in free)
    if fits(top):
        lo = top
    elif fits(0.0):
        lo, hi = 0.0, top
        for _ in range(60):  # bisection to ~1e-18 of top: exact to the row at any realistic size
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    else:
        return plan
    out = scaled(lo)
    cost = cache_cost(out, needs, settings)
    return [replace(p, budget_bytes=cost[p.name]) if p.placement == "ssd" else p for p in out]


def make_storage_factory(settings: StorageSettings, plan: list[Placement], sample: dict[str, AccessSample],
                         device: torch.device, fresh: bool = True, resume_from: ResumeChain | None = None,
                         split: BudgetSplit | None = None):
    """``factory(index, table_config, state_dim)`` for `build_collection`: None keeps a table in memory;
    SSD tables get (lazy, sparse) files under ``settings.root``, laid out by hotness
    (`tierec.storage.layout.HotLayout`, from the sampled counts) within ``split.layout`` (none:
    row r at file row r), shared by the tables in proportion to their sampled rows.

    ``fresh=False`` (resume): no cache warm-up; the checkpoint's rows come next. With
    ``resume_from`` (the checkpoint and its chain), an SSD table whose checkpoint files are row
    sets takes them copy-on-write (`SsdTable.attach`): the files are hard-linked under
    ``root/.resume`` (copied across file systems), so pruning the checkpoints cannot remove them,
    and nothing is copied into the working file; `tierec.train.checkpoint.load_tables` then skips
    the table.
    """
    by_name = {p.name: p for p in plan}
    root = settings.root
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / RESUME_DIR, ignore_errors=True)  # an earlier run's links
    limit_malloc_retention()
    host_bytes = settings.host_cache
    device_rows = sum(p.cache_rows for p in plan if p.placement == "ssd") or 1
    row_align = settings.row_align
    groups: dict[tuple[int, int], TableGroup] = {}  # (dim, state_dim) -> the look-ahead tables' shared cache
    hot = settings.ssd_layout == "hot"
    sampled = sum(s.ids.size for s in sample.values())
    layout_bytes = split.layout if split is not None else 0
    hot_share = layout_bytes / HOT_LAYOUT_BYTES_PER_ROW / sampled if hot and sampled else 0.0
    # each SSD table's share of the log maps: by the distinct rows the planning pass saw it use (what comes
    # and goes through its cache, and fills its map)
    weight = {p.name: max(1, sample[p.name].ids.size if p.name in sample else 1) for p in plan if p.placement == "ssd"}
    total_weight = sum(weight.values())
    log_share = split.write_log if split is not None and uses_write_log(settings) else 0
    staging_bytes = split.log_staging if log_share and split is not None else 0
    recent_bytes = split.log_recent if log_share and split is not None else 0
    if settings.direct_io and not row_align and weight and not log_share:
        log.info("SSD tables: rows packed and no write-back log, so every write-back reads its 4 KiB block first "
                 "(docs/storage.md)")

    def factory(i, tcfg, state_dim, init: RowInit | None = None):
        """``init``: the rows' initial values when not the table's own (a row-wise shard: its rows of the
        whole table's)."""
        p = by_name[tcfg.name]
        if p.placement == "memory":
            return None
        s = sample.get(tcfg.name)
        layout = saved_layout(resume_from, tcfg.name, tcfg.num_embeddings) if resume_from is not None and hot else None
        if layout is None and s is not None and int(s.ids.size * hot_share):
            layout = HotLayout.from_counts(tcfg.num_embeddings, s.ids, s.counts, int(s.ids.size * hot_share))
        ssd = SsdTable(root / f"{tcfg.name}.tbl", tcfg.num_embeddings, tcfg.embedding_dim, state_dim,
                       create=True, init_seed=settings.seed, table_index=i, direct_io=settings.direct_io,
                       init="lazy", row_align=row_align, layout=layout, lazy_init=init,
                       row_log=log_capacity(log_share * weight[p.name] // total_weight, tcfg.num_embeddings),
                       log_staging=staging_bytes * weight[p.name] // total_weight // staged_row_bytes(
                           4 * (tcfg.embedding_dim + state_dim)),  # packed rows: the log's stride
                       log_recent=recent_bytes * weight[p.name] // total_weight)
        if resume_from is not None:
            attach_checkpoint(ssd, tcfg.name, resume_from, root / RESUME_DIR)
        rows = 0
        if host_bytes:  # device <- host DRAM <- SSD: the host tier gets this table's share of host_cache
            row_bytes = (tcfg.embedding_dim + state_dim) * 4 + index_bytes_per_row(settings)
            rows = max(1, host_bytes * p.cache_rows // device_rows // row_bytes)
        if p.policy == "lookahead" and settings.group_caches:
            key = (tcfg.embedding_dim, state_dim)
            if key not in groups:
                groups[key] = TableGroup(f"group:d{tcfg.embedding_dim}", device, settings.prefetch_threads, hot)
            return groups[key].add(ssd, p.cache_rows, tcfg.name, host_rows=rows, feature=tcfg.key)
        below: SsdTable | CachedTable = ssd
        if host_bytes and p.policy == "lookahead":
            below = LookaheadCache(ssd, rows, device="cpu", name=f"{tcfg.name}@host", neighbours=hot)
        elif host_bytes:
            below = CachedTable(ssd, rows, "lru" if p.policy == "freq" else p.policy, device="cpu",
                                name=f"{tcfg.name}@host")
        if p.policy == "lookahead":
            return LookaheadCache(below, p.cache_rows, device=device, name=tcfg.name, neighbours=hot)
        freq = None
        if p.policy == "freq":
            s = sample[tcfg.name]
            freq = (torch.from_numpy(s.ids), torch.from_numpy(s.counts))
        cache = CachedTable(below, p.cache_rows, p.policy, device=device, name=tcfg.name, freq=freq)
        if p.policy == "freq" and fresh:
            cache.warm_up()
        return cache

    return factory


LAYOUT_DIR = "layout"  # in a checkpoint: the SSD working files' hot rows, `<table>.hot` (int64, hottest first)


def layout_files(root: Path) -> dict[str, bytes]:
    """The hot-row layouts of the SSD working files under ``root``, as checkpoint files:
    ``{"layout/<table>.hot": bytes}`` (a resumed run lays its new files out the same way)."""
    return {f"{LAYOUT_DIR}/{p.name.removesuffix('.tbl.hot')}.hot": p.read_bytes()
            for p in sorted(Path(root).glob("*.tbl.hot"))} if Path(root).is_dir() else {}


def saved_layout(resume: ResumeChain, name: str, num_rows: int) -> HotLayout | None:
    """Table ``name``'s hot-row layout kept in the checkpoint ``resume`` resumes from (checked against the
    manifest's sha256), or None when it has none."""
    ckpt, manifest = resume.chain[-1]
    rel = f"{LAYOUT_DIR}/{name}.hot"
    entry = manifest["files"].get(rel)
    if entry is None:
        return None
    verify_file(ckpt / rel, entry)
    return read_layout(ckpt / rel, num_rows)


RESUME_DIR = ".resume"  # under the SSD tables' root: hard links to the row sets a resumed run reads below its files


@dataclass(frozen=True)
class ResumeChain:
    """A checkpoint to resume from: its directory and its chain [(checkpoint dir, manifest)], base first."""

    checkpoint: Path
    chain: list[tuple[Path, dict]]


def attach_checkpoint(ssd: SsdTable, name: str, resume: ResumeChain, links_dir: Path) -> bool:
    """Link table ``name``'s row sets of ``resume`` below ``ssd`` (`SsdTable.attach`); False (nothing done)
    when a link holds a dense file or lacks the table (the rows are then loaded the usual way)."""
    rel = f"tables/{name}.tbl"
    chain: list[tuple[Path, dict]] = []
    for ckpt_dir, m in resume.chain:
        entry = m["files"].get(rel)
        if entry is None or not is_row_set(entry):
            return False
        dst = links_dir / ckpt_dir.name
        (dst / "tables").mkdir(parents=True, exist_ok=True)
        for f in (rel, rel + ".ids"):
            _link_or_copy(ckpt_dir / f, dst / f)
        chain.append((dst, m["files"]))
    top = open_table_chain(chain, rel, ssd.num_embeddings, ssd.dim, ssd.state_dim, direct_io=ssd.direct_io)
    ssd.attach(top, str(resume.checkpoint))
    return True


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(src, dst)


def checkpoint_storage_factory(ckpt_dir: Path, manifest: dict, plan: list[dict], device: torch.device,
                               chain: list[tuple[Path, dict]] | None = None):
    """Read-only storage over a checkpoint's table files: SSD tables of ``plan`` are opened in
    place behind caches of their planned size (``freq`` and ``lookahead`` caches become ``lru``:
    the training sample and future batches are not at hand); each file is checked against the
    manifest first. ``chain``: an incremental checkpoint's [(checkpoint dir, manifest files)], base
    first, this one last (default: this one alone)."""
    links = chain or [(Path(ckpt_dir), manifest["files"])]

    by_name = {p["name"]: p for p in plan if p["placement"] == "ssd"}
    files = {t["name"]: t for t in manifest["tables"]}

    def factory(i, tcfg, state_dim):
        p = by_name.get(tcfg.name)
        if p is None:
            return None
        t = files.get(tcfg.name)
        if t is None:
            raise CheckpointError(f"{ckpt_dir}: checkpoint has no table {tcfg.name!r}")
        ssd = open_table_chain(links, t["file"], tcfg.num_embeddings, tcfg.embedding_dim, state_dim)
        policy = "lru" if p["policy"] in ("freq", "lookahead") else p["policy"]
        return CachedTable(ssd, p["cache_rows"], policy, device=device, name=tcfg.name)

    return factory

"""`StorageSettings`: everything `storage/tiered.py` needs to plan and build a model's table storage,
typed (byte sizes in bytes), built once by the layer above (`TrainConfig.storage_settings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tierec.errors import ConfigError

Policy = Literal["lru", "lfu", "freq", "lookahead"]


@dataclass
class TableSettings:
    """Per-table storage settings (config file only: `[tables.C3]` in TOML)."""

    placement: Literal["auto", "memory", "ssd"] = "auto"
    cache_rows: int | None = None  # SSD tables: rows in the DRAM/device cache
    policy: Policy | None = None
    kind: Literal["fixed", "dynamic"] | None = None  # default: --table-kind
    rows: int | None = None  # a fixed table's rows over raw IDs, a dynamic table's capacity (default: --table-rows)

    def __post_init__(self):
        if self.cache_rows is not None and self.cache_rows <= 0:
            raise ConfigError(f"cache_rows must be > 0, got {self.cache_rows}")
        if self.rows is not None and self.rows <= 0:
            raise ConfigError(f"rows must be > 0, got {self.rows}")
        if self.kind not in (None, "fixed", "dynamic"):
            raise ConfigError(f"kind must be 'fixed' or 'dynamic', got {self.kind!r}")


@dataclass(frozen=True)
class StorageSettings:
    """How a model's tables are stored: planned under ``memory_budget`` (`plan_storage`, `plan_budget`),
    built by `make_storage_factory`."""

    root: Path  # where the SSD working files of the tables go
    seed: int = 0  # initial rows of new SSD files (`init_rows`), and the order of the batches sampled to plan
    memory_budget: int | None = None  # bytes for embedding storage; None: only ``tables`` leave memory
    policy: Policy = "lru"  # cache policy of SSD tables without their own
    tables: dict[str, TableSettings] = field(default_factory=dict)  # per-table settings, by table name
    plan_batches: int = 50  # batches read to measure each table's access share
    plan_batch_size: int = 1024  # samples per batch of that measurement
    host_cache: int = 0  # bytes of a host-DRAM cache tier between the device caches and SSD (0: none)
    direct_io: bool = False  # SSD files opened with O_DIRECT
    row_align: int = 0  # SSD working files: rows padded to this many bytes (0: packed)
    ssd_layout: Literal["hot", "plain"] = "plain"  # hot: rows ordered by sampled hotness + block neighbours taken
    write_log: bool = True  # O_DIRECT packed SSD files: write-backs appended to a log (`tierec.storage.rowlog`)
    group_caches: bool = True  # look-ahead SSD tables of one row width share one cache (`TableGroup`)
    prefetch_threads: int | None = None  # a group's prefetch threads (None: by cores)
    lookahead: int = 200  # policy lookahead: batches read ahead (the window)
    lookahead_memory: int = 1 << 30  # policy lookahead: most bytes the window may hold
    prefetch_depth: int = 2  # policy lookahead: steps prepared ahead of the trainer (the window holds them too)
    # table name -> how its IDs become rows (`tierec.storage.dynamic.TableRows`); absent: the schema's rows
    table_rows: dict = field(default_factory=dict)

    @property
    def uses_lookahead(self) -> bool:
        """Whether some table may get a look-ahead cache (the default policy, or a table's own)."""
        return "lookahead" in {self.policy} | {t.policy for t in self.tables.values() if t.policy}

    @property
    def tiered(self) -> bool:
        """Whether some table may leave memory: a memory budget, or per-table settings."""
        return self.memory_budget is not None or bool(self.tables)

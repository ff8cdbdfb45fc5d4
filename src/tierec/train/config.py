"""`TrainConfig`: every knob of `tierec train`, from flags and/or a TOML/YAML file."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from tierec.config import from_dict, load_config_file, parse_bytes
from tierec.data.dataset import Schema
from tierec.data.loader import LoaderSettings
from tierec.errors import ConfigError
from tierec.storage.dynamic import DynamicConfig, TableRows
from tierec.storage.settings import StorageSettings, TableSettings
from tierec.train.idmap import IdMaps

ID_INDEX_SHARE = 4  # id_index=auto: the index spills when it would take over 1/4 of --memory-budget


@dataclass
class ShardingSettings:
    """Runs under torchrun only (config file: `[sharding]`); see docs/distributed.md."""

    tables: dict[str, int | str] = field(default_factory=dict)  # table -> owning rank, "row" or "auto"
    timeout_s: float = 300.0  # a collective waiting longer than this ends the job (a rank died or hangs)

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ConfigError(f"sharding.timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class TrainConfig:
    data: str = ""  # tierec data set directory (`tierec data synth|convert`)
    # data set evaluated on (its test split, else its train split); default: data's test split
    eval_data: str | None = None
    out: str = "runs/train"  # run directory: metrics.jsonl, checkpoints/
    model: Literal["dlrm", "two-tower", "dcnv2", "mmoe", "ple", "sasrec", "lightgcn"] = "dlrm"
    preset: Literal["mlperf-dcnv2"] | None = None  # a named architecture (PRESETS); flags and the file win over it
    embedding_dim: int = 16
    pooling: Literal["sum", "mean"] = "sum"
    bottom_mlp: list[int] = field(default_factory=lambda: [64, 32])  # hidden sizes; a layer to embedding_dim follows
    top_mlp: list[int] = field(default_factory=lambda: [64, 32])  # hidden sizes; a layer to 1 logit follows
    tower_mlp: list[int] = field(default_factory=lambda: [64])  # two-tower: each tower; mmoe/ple: each task's
    cross_layers: int = 3  # dcnv2: cross layers
    cross_rank: int = 0  # dcnv2: 0 full-rank cross weights [d, d]; r > 0 low-rank U V^T (d x r)
    dcn_structure: Literal["stacked", "parallel"] = "stacked"  # dcnv2: cross then deep, or side by side
    experts: int = 4  # mmoe: experts; ple: experts per task and shared experts per level
    expert_mlp: list[int] = field(default_factory=lambda: [64])  # mmoe/ple: hidden sizes of an expert
    expert_top_k: int = 0  # mmoe/ple: 0 every expert per sample (dense gates); k: sparse top-k gating (MoE)
    ple_levels: int = 1  # ple: extraction levels
    moe_aux_weight: float = 0.01  # mmoe/ple with expert_top_k: weight of the load-balancing loss
    task_weights: list[float] | None = None  # multi-task loss weight per label (default 1 each)
    batch_size: int = 1024
    epochs: int = 1
    max_steps: int | None = None  # stop after this many steps in total (checkpointed; resume goes on)
    max_train_rows: int | None = None  # use only the first rows of each epoch
    dense_optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    lr: float = 1e-3  # dense learning rate
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    sparse_lr: float = 0.05
    shuffle: bool = True
    seed: int = 0
    eval_every: int = 0  # steps between evaluations; 0: at the end of each epoch
    eval_batch_size: int = 8192
    max_eval_rows: int | None = None
    checkpoint_every: int = 0  # steps between checkpoints; 0: at the end of each epoch
    keep_checkpoints: int = 2
    checkpoint_chain: int = 8  # incremental checkpoints: a full one, then deltas, up to this many links
    log_every: int = 50  # steps between JSONL training records
    num_threads: int | None = None  # torch intra-op threads; default: torch's choice
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True
    carbon_region: str | None = None  # grid region for operational CO2e (see docs/energy.md)
    carbon_intensity: float | None = None  # gCO2e/kWh; overrides carbon_region
    memory_budget: str | None = None  # e.g. "2GiB": tables beyond it go to SSD behind caches
    storage_dir: str | None = None  # where SSD table files live (default: OUT/tables)
    cache_policy: Literal["lru", "lfu", "freq", "lookahead"] = "lru"
    lookahead: int = 200  # cache_policy lookahead: batches read ahead to plan prefetch and eviction
    prefetch_depth: int = 2  # cache_policy lookahead: steps prepared (rows resident) ahead of the trainer
    lookahead_memory: str = "1GiB"  # cap on the look-ahead window's memory: batches + the oracle's ~32 B per unique ID
    prefetch_threads: int | None = None  # cache_policy lookahead: tables prefetched in parallel (default: by cores)
    lookahead_trace: bool = True  # cache_policy lookahead: a pass over the run's batches first: next uses beyond the window
    group_caches: bool = True  # cache_policy lookahead: SSD tables of one row width share one cache (docs/lookahead.md)
    host_cache: str | None = None  # a host-DRAM cache tier between the device caches and SSD, e.g. "8GiB"
    direct_io: bool = False  # SSD reads bypass the OS page cache (O_DIRECT)
    ssd_row_align: int = 0  # SSD working files: rows padded to this many bytes (0 packed; 512: no read-modify-write)
    ssd_layout: Literal["hot", "plain"] = "plain"  # SSD working files: hot = rows ordered by sampled hotness (docs/storage.md)
    ssd_write_log: bool = True  # --direct-io, packed rows: write-backs appended to a log, not read-modify-written
    plan_batches: int = 50  # batches read to measure each table's access share
    tables: dict[str, TableSettings] = field(default_factory=dict)
    sharding: ShardingSettings = field(default_factory=ShardingSettings)
    dedup: bool = True  # user-side features looked up once per unique row of a batch (docs/dedup.md)
    # how IDs become rows (docs/dynamic.md); per table: [tables.X] kind / rows
    table_kind: Literal["fixed", "dynamic"] = "fixed"
    table_rows: int | None = None  # fixed tables over raw IDs: rows; dynamic: capacity (default: the schema's)
    admit_count: int = 1  # dynamic: an ID gets a row once seen this many times
    default_row: Literal["zero", "unknown"] = "zero"  # dynamic: what an ID without a row reads
    evict: Literal["none", "ttl", "lfu", "l2"] = "none"  # dynamic: which IDs leave when full / on decay
    ttl_steps: int = 0  # dynamic, evict ttl: IDs unseen this many steps leave
    decay_every: int = 0  # dynamic: steps between decays (LFU counts, admission sketch halve; TTL sweep)
    l2_threshold: float = 0.0  # dynamic, evict l2: rows whose L2 norm is below this leave (measured every decay)
    id_index: Literal["auto", "memory", "ssd"] = "auto"  # dynamic: where the raw ID -> slot index lives (docs/dynamic.md)
    id_index_memory: str | None = None  # dynamic, spilled index: bytes of its pages kept in memory (default: see below)
    id_partitions: int = 1  # dynamic: partitions per table by hash of the raw ID (torchrun shards rows on them)
    # sasrec (sequence data sets, `tierec data convert --format sequences`; docs/models.md#sasrec)
    max_len: int = 50  # sasrec: the last this many items of a history are attended to
    num_blocks: int = 2  # sasrec: self-attention blocks
    num_heads: int = 1  # sasrec: attention heads (embedding_dim must be a multiple)
    attn_dropout: float = 0.5  # sasrec: dropout of embeddings, attention and feed-forward layers
    pre_ln: bool = False  # sasrec: pre-LayerNorm blocks (default: post-LN, as the original SASRec)
    item_adam: Literal["lazy", "dense"] = "lazy"  # sasrec: the item table's Adam: touched rows only, or every row
    attention: Literal["full", "pruned"] = "full"  # sasrec: full causal attention, or pruned (docs/models.md)
    attn_keep: int = 32  # sasrec, attention pruned: keys kept per query (its own included)
    attn_threshold: float | None = None  # sasrec, attention pruned: also drop keys this many logits below the best
    attn_score: Literal["int8", "lowrank"] = "int8"  # sasrec, attention pruned: the cheap scores that pick keys
    attn_rank: int = 8  # sasrec, attention pruned, attn_score lowrank: rank of the random projection
    # lightgcn (the graph of a sequence data set's user-item pairs; docs/models.md#lightgcn)
    num_layers: int = 3  # lightgcn: propagation layers K
    l2_reg: float = 1e-4  # lightgcn: weight of the L2 penalty on the batch's layer-0 rows
    test_ratio: float = 0.2  # lightgcn: share of each user's distinct items held out as test pairs (seeded)
    propagation: Literal["khop", "full"] = "khop"  # lightgcn: the batch's K-hop neighbourhood, or the whole graph
    # the input pipeline (tierec.data.loader; docs/input.md): the same batches whatever these are
    input: Literal["manual", "autotune"] = "manual"  # autotune: the input_* settings chosen at start and on drift
    profile_input: bool = False  # profile the input pipeline before training (OUT/input-profile/)
    input_readers: int = 1  # threads reading + decoding row groups
    input_prefetch: int = 1  # row-group reads in flight ahead of the trainer (0: read on demand)
    input_read_groups: int = 1  # row groups per read
    input_batch_workers: int = 0  # threads building batches (dedup, KJT); 0: on the trainer's thread
    input_batch_prefetch: int = 2  # batches built ahead by the batch workers
    input_cache: str = "0"  # decoded row groups kept in memory for later epochs, e.g. "2GiB"
    input_reader_processes: bool = False  # the input readers are processes, not threads (the GIL: docs/input.md)
    input_batch_processes: bool = False  # the batch workers are processes, not threads

    def __post_init__(self):
        for name in ("embedding_dim", "batch_size", "epochs", "eval_batch_size", "keep_checkpoints", "checkpoint_chain",
                     "log_every",
                     "plan_batches", "lookahead", "prefetch_depth"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_steps", "max_train_rows", "max_eval_rows", "num_threads", "prefetch_threads"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be > 0, got {v}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "sparse_lr"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.carbon_intensity is not None and not 0 <= self.carbon_intensity < math.inf:
            raise ConfigError(f"carbon_intensity must be a finite number >= 0, got {self.carbon_intensity}")
        if any(h <= 0 for h in self.bottom_mlp + self.top_mlp + self.tower_mlp + self.expert_mlp):
            raise ConfigError("MLP layer sizes must be > 0")
        for name in ("cross_layers", "experts", "ple_levels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.cross_rank < 0 or self.expert_top_k < 0:
            raise ConfigError(f"cross_rank and expert_top_k must be >= 0, got {self.cross_rank}, {self.expert_top_k}")
        if self.expert_top_k > self.experts * (1 if self.model == "mmoe" else 2):
            raise ConfigError(f"expert_top_k {self.expert_top_k} is more than the experts a gate chooses from")
        if not 0 <= self.moe_aux_weight < math.inf:
            raise ConfigError(f"moe_aux_weight must be a finite number >= 0, got {self.moe_aux_weight}")
        if self.task_weights is not None and (not self.task_weights or any(
                not 0 <= w < math.inf for w in self.task_weights)):
            raise ConfigError(f"task_weights must be finite numbers >= 0, got {self.task_weights}")
        self.tables = {k: TableSettings(**v) if isinstance(v, dict) else v for k, v in self.tables.items()}
        if isinstance(self.sharding, dict):
            self.sharding = ShardingSettings(**self.sharding)
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget, "memory_budget")
        parse_bytes(self.lookahead_memory, "lookahead_memory")
        if self.host_cache is not None:
            parse_bytes(self.host_cache, "host_cache")
        from tierec.storage.ssd import check_row_align

        self.ssd_row_align = check_row_align(self.ssd_row_align, "ssd_row_align")
        for name in ("max_len", "num_blocks", "num_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.item_adam not in ("lazy", "dense"):
            raise ConfigError(f"item_adam must be 'lazy' or 'dense', got {self.item_adam!r}")
        if not 0 <= self.attn_dropout < 1:
            raise ConfigError(f"attn_dropout must be in [0, 1), got {self.attn_dropout}")
        from tierec.modules.attention import check_pruning

        try:
            check_pruning(self.attn_keep, self.attn_threshold, self.attn_score, self.attn_rank)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.num_layers < 0:
            raise ConfigError(f"num_layers must be >= 0, got {self.num_layers}")
        if not 0 <= self.l2_reg < math.inf:
            raise ConfigError(f"l2_reg must be a finite number >= 0, got {self.l2_reg}")
        if not 0 <= self.test_ratio < 1:
            raise ConfigError(f"test_ratio must be in [0, 1), got {self.test_ratio}")
        if self.model == "sasrec" and self.embedding_dim % self.num_heads:
            raise ConfigError(f"embedding_dim {self.embedding_dim} must be a multiple of num_heads {self.num_heads}")
        if self.table_rows is not None and self.table_rows <= 0:
            raise ConfigError(f"table_rows must be > 0, got {self.table_rows}")
        if self.id_partitions < 1:
            raise ConfigError(f"id_partitions must be >= 1, got {self.id_partitions}")
        if self.id_index_memory is not None and parse_bytes(self.id_index_memory, "id_index_memory") < 4096:
            raise ConfigError(f"id_index_memory must be at least 4KiB (one page), got {self.id_index_memory!r}")
        self.dynamic_config()  # validated here, at the edge
        self.loader_settings()  # validated here, at the edge

    def loader_settings(self) -> LoaderSettings:
        """The input pipeline's typed settings (`tierec.data.loader.LoaderSettings`; with ``input = "autotune"`` the
        starting point the autotuner replaces)."""
        return LoaderSettings(self.input_readers, self.input_prefetch, self.input_read_groups,
                              self.input_batch_workers, self.input_batch_prefetch,
                              0 if str(self.input_cache).strip() in ("0", "none") else
                              parse_bytes(self.input_cache, "input_cache"),
                              self.input_reader_processes, self.input_batch_processes)

    def dynamic_config(self, capacity: int = 2) -> DynamicConfig:
        """The dynamic tables' policy (``capacity`` filled in per table)."""
        return DynamicConfig(capacity, self.admit_count, self.default_row, self.evict, self.ttl_steps,
                             self.decay_every, l2_threshold=self.l2_threshold)

    def row_spaces(self, schema: Schema) -> tuple[dict[str, TableRows], dict[str, DynamicConfig]]:
        """How each table's IDs become rows, and the dynamic tables' configs (`IdMaps.plan`)."""
        return IdMaps.plan(schema, self.table_kind, self.table_rows, self.tables, self.dynamic_config())

    def id_maps(self, schema: Schema, spill_root: Path | None = None) -> IdMaps:
        """The ID -> row stage of these settings (`tierec.train.idmap.IdMaps`); a spilled index (``id_index``)
        maps its files under ``spill_root`` (default: the SSD tables' directory)/id_index."""
        rows, dynamic = self.row_spaces(schema)
        resident = self.id_index_resident(rows)
        if resident is None:
            return IdMaps(rows, dynamic, partitions=self.id_partitions)
        root = spill_root or (Path(self.storage_dir) if self.storage_dir else Path(self.out) / "tables")
        return IdMaps(rows, dynamic, spill=root / "id_index", resident_bytes=resident, partitions=self.id_partitions)

    def id_index_resident(self, rows: dict[str, TableRows]) -> int | None:
        """None: the dynamic tables' index stays in memory; else it spills to files and keeps this many bytes
        of them resident: ``id_index="ssd"``, or ``"auto"`` with an index over 1/`ID_INDEX_SHARE` of
        --memory-budget. The resident share: ``id_index_memory``, or 1/16 of the budget (at least 16 MiB;
        64 MiB without one), at most the whole index."""
        total = sum(r.index_bytes for r in rows.values() if r.kind == "dynamic")
        budget = parse_bytes(self.memory_budget, "memory_budget") if self.memory_budget is not None else None
        if not total or self.id_index == "memory":
            return None
        if self.id_index == "auto" and (budget is None or total <= budget // ID_INDEX_SHARE):
            return None
        if self.id_index_memory is not None:
            return min(total, parse_bytes(self.id_index_memory, "id_index_memory"))
        return min(total, max(16 << 20, budget // 16) if budget is not None else 64 << 20)

    def to_dict(self) -> dict:
        return asdict(self)

    def storage_settings(self, table_rows: dict | None = None) -> StorageSettings:
        """The storage layer's typed view of these settings (byte sizes parsed; SSD files under
        ``storage_dir``, default ``OUT/tables``); ``table_rows``: `IdMaps.rows`."""
        return StorageSettings(
            root=Path(self.storage_dir) if self.storage_dir else Path(self.out) / "tables",
            seed=self.seed,
            memory_budget=parse_bytes(self.memory_budget, "memory_budget") if self.memory_budget is not None else None,
            policy=self.cache_policy, tables=dict(self.tables), plan_batches=self.plan_batches,
            plan_batch_size=self.batch_size,
            host_cache=parse_bytes(self.host_cache, "host_cache") if self.host_cache else 0,
            direct_io=self.direct_io, row_align=self.ssd_row_align, ssd_layout=self.ssd_layout,
            write_log=self.ssd_write_log, group_caches=self.group_caches,
            prefetch_threads=self.prefetch_threads, lookahead=self.lookahead, prefetch_depth=self.prefetch_depth,
            lookahead_memory=parse_bytes(self.lookahead_memory, "lookahead_memory"), table_rows=table_rows or {})

    @staticmethod
    def field_names() -> list[str]:
        return [f.name for f in fields(TrainConfig)]


# Settings that change what a run learns: a resumed run must keep them (`trajectory_changes`). The
# others (storage tiers and caches, which are exact; intervals; epochs and max_steps, which only
# move the end) may change between a checkpoint and its resume.
TRAJECTORY_KEYS = ("model", "cross_layers", "cross_rank", "dcn_structure", "experts", "expert_mlp", "expert_top_k",
                   "ple_levels", "moe_aux_weight", "task_weights", "embedding_dim", "pooling", "bottom_mlp",
                   "top_mlp", "tower_mlp", "batch_size", "max_train_rows", "dense_optimizer", "lr",
                   "sparse_optimizer", "sparse_lr", "shuffle", "seed", "table_kind", "table_rows", "admit_count",
                   "default_row", "evict", "ttl_steps", "decay_every", "l2_threshold", "id_partitions", "max_len", "num_blocks",
                   "num_heads", "attn_dropout", "pre_ln", "item_adam", "attention", "attn_keep", "attn_threshold", "attn_score",
                   "attn_rank", "num_layers", "l2_reg", "test_ratio", "propagation")


def trajectory_changes(saved: dict, cfg: TrainConfig) -> list[str]:
    """``"batch_size: 256 in the checkpoint, 512 now"`` for each trajectory setting that differs."""
    now = cfg.to_dict()
    default = TrainConfig(data="x").to_dict()
    out = []
    for k in TRAJECTORY_KEYS:
        old = saved.get(k, default[k])
        if old != now[k]:
            out.append(f"{k}: {old!r} in the checkpoint, {now[k]!r} now")
    return out


# Named architectures (`--preset`): their values fill every setting the file and the flags leave unset.
PRESETS: dict[str, dict] = {
    # MLPerf Training's DLRM-DCNv2 (Criteo 1TB multi-hot): embedding dim 128, bottom MLP 512-256-128, three
    # low-rank (512) cross layers stacked before the top MLP 1024-1024-512-256-1, Adagrad (the reference's
    # optimizer; its learning-rate warm-up and decay schedule are not reproduced)
    "mlperf-dcnv2": dict(model="dcnv2", embedding_dim=128, bottom_mlp=[512, 256], top_mlp=[1024, 1024, 512, 256],
                         cross_layers=3, cross_rank=512, dcn_structure="stacked", dense_optimizer="adagrad",
                         sparse_optimizer="rowwise_adagrad", lr=0.004, sparse_lr=0.004),
}


def make_config(config_file: str | None, overrides: dict) -> TrainConfig:
    """File values, then flag values that were given (not None), then a ``preset``'s, then defaults."""
    data = {}
    if config_file:
        data = load_config_file(config_file)
        source = config_file
    else:
        source = "flags"
    merged = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    preset = merged.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        merged = {**PRESETS[preset], **merged}
    cfg = from_dict(TrainConfig, merged, source)
    if not cfg.data:
        raise ConfigError("no data set given: pass --data DIR or set `data` in the config file")
    return cfg

"""The training loop: short and flat.

One step: read batch -> DLRM forward (embedding rows fetched once per unique ID)
-> BCE loss -> backward (embedding rows updated in place by the fused sparse
optimizer) -> dense optimizer step. Evaluation, JSONL records and checkpoints
happen at fixed step intervals; everything is a pure function of the config's
seed, so an interrupted and resumed run ends with the same weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tierec import __version__, energy
from tierec.config import parse_bytes
from tierec.data.dataset import Dataset, Schema
from tierec.data.loader import InputControl
from tierec.errors import CheckpointError, ConfigError, TierecError
from tierec.malloc import STEP_MALLOC, TRANSIENT_MALLOC, malloc_thresholds, release_free_memory, returning_arrow_pool
from tierec.modules import dense_optim
from tierec.modules.dcn import DCNv2
from tierec.modules.dlrm import DLRM
from tierec.modules.embedding import EmbeddingBag, TableConfig, build_collection
from tierec.modules.multitask import MultiTask
from tierec.modules.optim import SparseOptimizer
from tierec.modules.sasrec import SASRec
from tierec.modules.two_tower import TwoTower
from tierec.storage.cache import CachedTable
from tierec.storage.group import TableGroup, TableView
from tierec.storage.lookahead import LookaheadCache
from tierec.storage.ssd import SsdTable
from tierec.storage.tiered import ResumeChain, layout_files
from tierec.train import checkpoint as ckpt
from tierec.train.config import TrainConfig, trajectory_changes
from tierec.train.idmap import MAP_AHEAD_DEPTH, IdMaps, MappedBatch, map_ahead
from tierec.train.input_probe import check_input, start_input
from tierec.train.metrics import scores
from tierec.train.nextuse import NextUseTrace
from tierec.train.pipeline import InMemoryMember, LookaheadPipeline, Member, PrefetchTarget, batch_ids
from tierec.train.rundir import claim_run_dir

log = logging.getLogger(__name__)

Model = DLRM | DCNv2 | MultiTask | TwoTower  # what `build_model` builds (tierec.modules)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available")
    return torch.device(name)


def table_configs(cfg: TrainConfig, schema: Schema) -> list[TableConfig]:
    """One table per sparse feature of ``schema``, ``cfg.embedding_dim`` wide, with the rows its IDs map to
    (`TrainConfig.row_spaces`: the schema's, a fixed table's over raw IDs, a dynamic table's capacity)."""
    rows, _ = cfg.row_spaces(schema)
    tables = [TableConfig(f.name, rows[f.name].rows, cfg.embedding_dim, cfg.pooling,
                          dynamic=rows[f.name].kind == "dynamic") for f in schema.sparse]
    if not tables:
        raise ConfigError("the data set has no sparse features; DLRM needs at least one")
    return tables


def build_model(cfg: TrainConfig, schema: Schema, device: torch.device, dataset: Dataset | None = None,
                fresh: bool = True, storage_factory=None, collection=None,
                resume_from: ResumeChain | None = None) -> Model:
    """DLRM for ``schema`` (`TwoTower` when ``cfg.model == "two-tower"``); with a memory budget
    (or per-table SSD settings) and a ``dataset`` to measure access shares on, the tables that
    do not fit go to SSD behind caches. ``storage_factory`` (see `build_collection`) overrides the planning;
    ``collection(tables, sparse_optimizer)`` builds the embedding collection instead of `build_collection`
    (the distributed trainer's sharded tables; no planning here then). The collection and the dense
    layers are created after ``torch.manual_seed(cfg.seed)``, in this order: the weights depend on the
    seed alone."""
    tables = table_configs(cfg, schema)
    sparse_opt = SparseOptimizer(cfg.sparse_optimizer, cfg.sparse_lr)
    plan, split = None, None
    if collection is None:
        factory = storage_factory
        settings = cfg.storage_settings(cfg.row_spaces(schema)[0])
        if factory is None and dataset is not None and settings.tiered:
            from tierec.storage.tiered import make_storage_factory, plan_storage

            row_bytes = (cfg.embedding_dim + sparse_opt.state_dim(cfg.embedding_dim)) * 4
            plan, sample, split = plan_storage(settings, schema, dataset, row_bytes)
            factory = make_storage_factory(settings, plan, sample, device, fresh=fresh, resume_from=resume_from,
                                           split=split)

        def collection(tables, sparse_opt):
            return build_collection(tables, sparse_opt, seed=cfg.seed, storage_factory=factory, device=device)

    torch.manual_seed(cfg.seed)
    ebc = collection(tables, sparse_opt)
    model: Model
    if cfg.model == "two-tower":
        model = TwoTower(ebc, {f.name: f.side for f in schema.sparse}, cfg.tower_mlp).to(device)
    elif cfg.model == "dcnv2":
        model = DCNv2(len(schema.dense), ebc, cfg.bottom_mlp, cfg.top_mlp, cfg.cross_layers, cfg.cross_rank,
                      cfg.dcn_structure).to(device)
    elif cfg.model in ("mmoe", "ple"):
        model = MultiTask(cfg.model, len(schema.dense), ebc, len(schema.labels), cfg.bottom_mlp, cfg.expert_mlp,
                          cfg.tower_mlp, cfg.experts, cfg.expert_top_k, cfg.ple_levels).to(device)
    else:
        model = DLRM(len(schema.dense), ebc, cfg.bottom_mlp, cfg.top_mlp).to(device)
    model.storage_plan = [p.to_dict() for p in plan] if plan else None  # saved in checkpoints
    model.budget_split = split.to_dict() if split is not None else None  # how --memory-budget was spent
    return model


def cache_stats(model: Model | SASRec) -> dict[str, dict]:
    """Per-table counters of every tier that keeps them (cached / SSD tables); tables that share one
    cache (a `TableGroup`) appear once, under the group's name."""
    out = {}
    for t in model.embeddings.bags:
        st = t.storage
        if isinstance(st, TableView):
            if st.group.name not in out:
                out[st.group.name] = st.stats()
        elif isinstance(st, (CachedTable, SsdTable)):
            out[t.config.name] = st.stats()
    return out


def prefetch_targets(tables: list[EmbeddingBag],
                     ranges: dict[str, tuple[str, int, int | None]] | None = None) -> list[PrefetchTarget]:
    """What a `LookaheadPipeline` prefetches for ``tables`` (`EmbeddingBag` s): each table's own
    `LookaheadCache`, or the cache of its `TableGroup` with all the group's members, in the group's row
    order. ``ranges``: table name -> (feature, lo, hi) where a table sees other IDs than its key's
    (this rank's shards of the tables under torchrun, whose IDs arrive by all-to-all)."""
    def member(t: EmbeddingBag) -> Member:
        if ranges is None:
            return Member(t, t.config.key)
        feature, lo, hi = ranges[t.config.name]
        return Member(t, feature, lo, hi, direct=False)

    out: list[PrefetchTarget] = []
    groups: dict[str, tuple[TableGroup, dict[int, EmbeddingBag]]] = {}  # group name -> (group, its members by index)
    for t in tables:
        st = t.storage
        if isinstance(st, TableView):
            groups.setdefault(st.group.name, (st.group, {}))[1][st.index] = t
        elif isinstance(st, LookaheadCache):
            out.append(PrefetchTarget(t.config.name, st, (member(t),)))
    for name, (g, by_view) in groups.items():
        if sorted(by_view) != list(range(len(g.views))):
            raise RuntimeError(f"table group {name!r}: its members {[v.name for v in g.views]} are not all tables "
                               "of this model")
        out.append(PrefetchTarget(name, g.cache, tuple(member(by_view[i]) for i in range(len(g.views))), g.space))
    return out


def in_memory_members(tables: list[EmbeddingBag]) -> list[InMemoryMember]:
    """The tables whose rows are in memory, whose lookups (the dedup of their IDs) a `LookaheadPipeline`'s worker
    makes beside the prefetch targets' (not for a rank's shards: their IDs arrive by all-to-all in the step)."""
    return [InMemoryMember(t, t.config.key) for t in tables if t.in_memory]


def overall_hit_rate(stats: dict[str, dict]) -> float | None:
    lookups = sum(s.get("lookups", 0) for s in stats.values())
    return sum(s.get("hits", 0) for s in stats.values()) / lookups if lookups else None


@contextlib.contextmanager
def new_files_removed_on_error(root: Path):
    """Files created under ``root`` inside the block are deleted if it raises (e.g. disk full half-way
    through creating a run's table files); files that were there before are left alone."""
    before = {p for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()
    try:
        yield
    except BaseException:
        if root.is_dir():
            for p in root.rglob("*"):
                if p.is_file() and p not in before:
                    p.unlink(missing_ok=True)
        raise


def check_table_settings(cfg: TrainConfig, schema: Schema) -> None:
    """Per-table settings (``[tables.X]``, ``[sharding] tables``) must name sparse features of the data set."""
    names = schema.sparse_names
    for where, keys in (("tables", cfg.tables), ("sharding.tables", cfg.sharding.tables)):
        unknown = [k for k in keys if k not in names]
        if unknown:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(f"{where}.{unknown[0]}: the data set has no sparse feature {unknown[0]!r} "
                              f"(it has {shown})")


def schema_differences(saved: dict, schema: Schema, limit: int = 4) -> str:
    """What differs between a checkpoint's schema (JSON) and ``schema``, in words ('' when equal)."""
    try:
        other = Schema.from_json(saved)
    except (KeyError, TypeError, TierecError) as e:
        return f"the saved schema is unreadable: {e}"
    return "; ".join(other.differences(schema)[:limit])


def data_fingerprint(ds: Dataset) -> str:
    """sha256 over the train split's files (path, sha256): which rows a run trains on, in storage order."""
    files = [(f["path"], f["sha256"]) for f in ds.manifest["splits"]["train"]["files"]]
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def eval_source(cfg: TrainConfig, ds: Dataset) -> tuple[Dataset, str | None]:
    """(data set, split) evaluated during and after training: ``--eval-data`` (its test split, or its train
    split when it has no test rows), else the training data set's test split; split None: no held-out rows,
    no evaluation (a data set converted with ``--test-fraction 0``)."""
    if cfg.eval_data:
        eds = Dataset(cfg.eval_data)
        differs = schema_differences(eds.schema.to_json(), ds.schema)
        if differs:
            raise ConfigError(f"--eval-data {cfg.eval_data}: its schema differs from the training data's ({differs})")
        split = next((s for s in ("test", "train") if s in eds.splits and eds.num_rows(s) > 0), None)
        if split is None:
            raise ConfigError(f"--eval-data {cfg.eval_data}: the data set has no rows")
        log.info("evaluating on %s (split %r, %d rows)", cfg.eval_data, split, eds.num_rows(split))
        return eds, split
    if "test" in ds.splits and ds.num_rows("test") > 0:
        return ds, "test"
    log.info("%s has no held-out (test) rows: no evaluation (pass --eval-data DIR to evaluate on another set)",
             cfg.data)
    return ds, None


def make_dense_optimizer(cfg: TrainConfig, params) -> dense_optim.DenseOptimizer:
    """The MLPs' optimizer: torch.optim's arithmetic and state dict without its torch._dynamo import
    (`tierec.modules.dense_optim`)."""
    if cfg.dense_optimizer == "adam":
        return dense_optim.Adam(params, lr=cfg.lr)
    if cfg.dense_optimizer == "adagrad":
        return dense_optim.Adagrad(params, lr=cfg.lr)
    return dense_optim.SGD(params, lr=cfg.lr)


class MetricsLog(Protocol):
    """Where a run's records go (`JsonlLog`; the distributed trainer's other ranks drop them)."""

    def write(self, event: str, **fields) -> None: ...

    def close(self) -> None: ...


class JsonlLog:
    """Append-only JSON-lines metrics log (one record per line, flushed each write)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", buffering=1)

    def write(self, event: str, **fields) -> None:
        self.f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")

    def close(self) -> None:
        self.f.close()


@torch.no_grad()
def evaluate(model: Model, ds: Dataset, split: str, batch_size: int, device: torch.device,
             max_rows: int | None = None, progress: bool = True, id_maps: IdMaps | None = None) -> dict:
    """AUC and log-loss of ``model`` on ``split``; ``id_maps``: how the data's IDs become rows (raw IDs), read-only."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    n_batches = ds.num_batches(split, batch_size, max_rows=max_rows)
    t0 = time.perf_counter()
    for batch in tqdm(ds.batches(split, batch_size, max_rows=max_rows), total=n_batches, desc=f"eval {split}",
                      leave=False, disable=None if progress else True, unit="batch"):
        if id_maps is not None:
            batch = id_maps.lookup_batch(batch)
        batch = batch.to(device)
        probs.append(torch.sigmoid(model(batch.dense, batch.sparse)).cpu().numpy())
        labels.append(batch.labels.cpu().numpy())
    model.train(was_training)
    if not probs:
        raise TierecError(f"{ds.root}: split {split!r} has no rows to evaluate")
    p, y = np.concatenate(probs), np.concatenate(labels)
    return {"split": split, **scores(y, p, ds.schema.labels), "eval_s": round(time.perf_counter() - t0, 3)}


def training_loss(model: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                  total: int | None = None) -> torch.Tensor:
    """The objective: binary cross-entropy of every task (logits and labels [B] or [B, K]), averaged over the
    batch (``total``: summed and divided by it, for a slice of a global batch), tasks weighted by
    ``cfg.task_weights`` (1 each) and summed; plus ``cfg.moe_aux_weight`` times a mixture of experts'
    load-balancing loss (its share of the batch under ``total``)."""
    if logits.dim() == 1 and labels.dim() == 2:  # a one-task model on a multi-label data set: the first label
        labels = labels[:, 0]
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    per_task = bce.sum(0) / total if total else bce.mean(0)
    if per_task.dim():
        w = cfg.task_weights
        if w is not None and len(w) != per_task.numel():
            raise ConfigError(f"task_weights: {len(w)} weights for {per_task.numel()} labels")
        loss = (per_task * per_task.new_tensor(w)).sum() if w is not None else per_task.sum()
    else:
        loss = per_task
    aux = getattr(model, "aux_loss", None)
    if cfg.moe_aux_weight and isinstance(aux, torch.Tensor) and aux.requires_grad:
        loss = loss + cfg.moe_aux_weight * aux * (logits.shape[0] / total if total else 1.0)
    return loss


class Trainer:
    """One training run into ``cfg.out`` (claimed and locked for the run, see `tierec.train.rundir`).

    ``resume``: continue from the newest checkpoint there (refused when a setting that changes the
    trajectory differs from the checkpoint's, unless ``allow_config_change``); ``overwrite``: start
    over in a directory that already holds a run."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
                 allow_config_change: bool = False):
        cfg = replace(cfg, data=str(Path(cfg.data).resolve()),  # checkpoints work from any directory
                      eval_data=str(Path(cfg.eval_data).resolve()) if cfg.eval_data else None)
        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        returning_arrow_pool()  # decoded row groups freed by the loader leave the resident set (tierec.malloc)
        self.device = pick_device(cfg.device)
        self.ds = Dataset(cfg.data)
        if "train" not in self.ds.splits:
            raise TierecError(f"{cfg.data}: data set has no 'train' split")
        if self.ds.num_rows("train") == 0:
            raise TierecError(f"{cfg.data}: the train split is empty")
        check_table_settings(cfg, self.ds.schema)
        if cfg.evict == "l2" and cfg.decay_every < max(MAP_AHEAD_DEPTH + 2, cfg.prefetch_depth + 3):
            raise ConfigError(f"--evict l2: --decay-every {cfg.decay_every} is shorter than the map runs ahead of "
                              f"training; use at least {max(MAP_AHEAD_DEPTH + 2, cfg.prefetch_depth + 3)}")
        self.eval_ds, self.eval_split = eval_source(cfg, self.ds)
        self.out = Path(cfg.out)
        self._lock = self._claim_run_dir(resume, overwrite)
        self.idmaps = cfg.id_maps(self.ds.schema)  # raw IDs -> rows (fixed tables over raw IDs, dynamic tables)
        # norm sweeps enter the map one sweep period after their measurement, whatever the tiers (so runs stay
        # identical); the map may not run further ahead than that (the look-ahead window is held below it)
        self.idmaps.sweep_delay = cfg.decay_every
        self.input_control = InputControl(cfg.loader_settings())  # the loader's knobs (live: --input autotune)
        try:
            t_build = time.perf_counter()
            with new_files_removed_on_error(self.storage_root):  # no half-created table set (disk full)
                self.model = self._build_model(fresh=not resume)
            self.build_s = time.perf_counter() - t_build  # model + table storage (SSD table files created)
            self.dense_opt = make_dense_optimizer(cfg, self.model.dense_parameters())
            self.epoch, self.batch_in_epoch, self.step, self.samples = 0, 0, 0, 0
            self.train_s = 0.0
            self.parent: Path | None = None  # the checkpoint the tables were last saved to or loaded from
            if resume:
                self._resume(allow_config_change)
            self.log: MetricsLog = JsonlLog(self.out / "metrics.jsonl")
        except BaseException:
            self.close()
            raise

    @property
    def storage_root(self) -> Path:
        """Where the SSD working files of the tables live (``--storage-dir``, default ``OUT/tables``)."""
        return self.cfg.storage_settings().root

    def _claim_run_dir(self, resume: bool, overwrite: bool):  # the distributed trainer: rank 0 only
        return claim_run_dir(self.out, resume, overwrite)

    def close(self) -> None:
        """Release the run directory (`fit` does at its end)."""
        if self._lock is not None:
            self._lock.close()

    def _last_checkpoint(self) -> str:
        latest = ckpt.latest_or_none(self.out)
        return str(latest) if latest is not None else "none yet"

    def _build_model(self, fresh: bool) -> Model:  # the distributed trainer shards the tables here
        resume_from = None
        if not fresh and (latest := ckpt.latest_or_none(self.out)) is not None:  # SSD tables: linked, not copied
            resume_from = ResumeChain(latest, ckpt.table_chain(latest, ckpt.read_manifest(latest)))
        return build_model(self.cfg, self.ds.schema, self.device, dataset=self.ds, fresh=fresh,
                           resume_from=resume_from)

    # ------------------------------------------------------------------ checkpoints
    @property
    def tables(self) -> dict:
        return {t.config.name: t.storage for t in self.model.embeddings.bags}

    def save(self) -> Path:
        t0 = time.perf_counter()
        for st in self.tables.values():  # tracked tables are read through their caches: no write-back needed
            if st.lazy_rows() is None:
                st.flush()
        dense_state = {
            "model": self.model.state_dict(),
            "dense_optimizer": self.dense_opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        arrays: dict = {}
        if self.idmaps.index is not None:  # the index's O(capacity) arrays go to files of their own
            dense_state["id_maps"], arrays = ckpt.detach_arrays(self.idmaps.state_at(self.step), "id_index")
            dense_state["id_sweeps"] = self.idmaps.pending_sweeps(self.step)  # measured, not yet applied
        meta = {
            "tierec_version": __version__,
            "saved_at": round(time.time(), 3),  # when: a server that follows the run reports its lag from it
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples": self.samples,
            "train_s": self.train_s,
            "config": self.cfg.to_dict(),
            "schema": self.ds.schema.to_json(),
            "data_fingerprint": data_fingerprint(self.ds),
            "storage_plan": self.model.storage_plan,
        }
        path = ckpt.save_checkpoint(self.out, self.step, dense_state, self.tables, meta,
                                    keep=self.cfg.keep_checkpoints, parent=self.parent,
                                    max_chain=self.cfg.checkpoint_chain,
                                    extra=layout_files(self.cfg.storage_settings().root), arrays=arrays)
        self.parent = path
        nbytes = sum(f["bytes"] for f in ckpt.read_manifest(path)["files"].values())
        self.log.write("checkpoint", step=self.step, seconds=round(time.perf_counter() - t0, 6), bytes=nbytes,
                       path=str(path))
        return path

    def _resume(self, allow_config_change: bool = False) -> None:
        try:
            path = ckpt.resolve_checkpoint(self.out)
        except TierecError as e:
            if not (self.out / "checkpoints").is_dir():
                raise TierecError(f"--resume: no checkpoint in {self.out} to resume from") from None
            raise TierecError(f"--resume: {e}") from None
        m = ckpt.read_manifest(path)
        differs = schema_differences(m["schema"], self.ds.schema)
        if differs:
            raise ConfigError(f"--resume: checkpoint {path} was trained on a data set with a different schema "
                              f"({differs})")
        changes = trajectory_changes(m["config"], self.cfg)
        fp = m.get("data_fingerprint")
        if fp is not None and fp != data_fingerprint(self.ds):
            changes.append(f"data: the train split of {self.cfg.data} is not the one the checkpoint trained on")
        if changes and not allow_config_change:
            raise ConfigError(f"--resume: these settings differ from checkpoint {path.name}'s and would change the "
                              f"training trajectory: {'; '.join(changes)} (restore them, or pass "
                              "--allow-config-change to continue anyway)")
        for c in changes:
            log.warning("--resume with a changed setting (--allow-config-change): %s", c)
        state = ckpt.load_dense_state(path, m)
        self._load_weights(path, m, state["model"])
        self.dense_opt.load_state_dict(state["dense_optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.epoch, self.batch_in_epoch = m["step"], m["epoch"], m["batch_in_epoch"]
        if self.idmaps.index is not None:
            self.idmaps.load_state_dict(ckpt.attach_arrays(path, m, state.get("id_maps", {})), self.step)
            self.idmaps.load_sweeps(state.get("id_sweeps", {}))
        self.samples, self.train_s = m["samples"], m.get("train_s", 0.0)
        self.parent = path
        log.info("resumed from %s (step %d, epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)

    def _load_weights(self, path: Path, manifest: dict, model_state: dict) -> None:
        """Model weights and table rows of a checkpoint (the distributed trainer loads its shards)."""
        self.model.load_state_dict(model_state)
        ckpt.load_tables(path, manifest, self.tables)

    # ------------------------------------------------------------------ loop
    def train_step(self, batch) -> float:
        if isinstance(batch, MappedBatch) and batch.fresh:  # dynamic tables: rows given to new IDs at this step
            bags = {t.config.key: t for t in self.model.embeddings.bags}
            for key, (slots, ids) in batch.fresh.items():
                if key in bags:
                    bags[key].use_fresh(slots.to(self.device), ids)
        batch = batch.to(self.device, non_blocking=True)
        logits = self.model(batch.dense, batch.sparse, batch.user)
        loss = training_loss(self.model, logits, batch.labels, self.cfg)
        self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()  # also updates the embedding rows (fused sparse optimizer)
        self.dense_opt.step()
        return loss.item()

    def _train_batches(self, total: int):
        """Training batches from the current position to step ``total``, across epochs, their IDs mapped to rows
        (`IdMaps`; the indexes kept at the steps that checkpoint or evaluate, `_reads_tables_at`)."""
        cfg = self.cfg
        epoch, start, step = self.epoch, self.batch_in_epoch, self.step
        per_epoch = self.ds.num_batches("train", cfg.batch_size, max_rows=cfg.max_train_rows)
        mapping = self.idmaps.active
        while epoch < cfg.epochs and step < total:
            for i, b in enumerate(self.ds.batches("train", cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed,
                                                  epoch=epoch, start_batch=start, max_rows=cfg.max_train_rows,
                                                  dedup=cfg.dedup, loader=self.input_control),
                                 start=start + 1):
                step += 1
                if mapping:
                    b = self.idmaps.map_batch(b, step, snapshot=self._reads_tables_at(step, i >= per_epoch, total))
                yield b
                if step >= total:
                    return
            epoch, start = epoch + 1, 0

    def _reads_tables_at(self, step: int, end_of_epoch: bool, total: int) -> bool:
        """Whether the loop checkpoints or evaluates after step ``step`` (as `_fit` decides)."""
        cfg = self.cfg
        return (end_of_epoch or step >= total or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                or bool(cfg.eval_every and step % cfg.eval_every == 0) or self.idmaps.sweeps_at(step))

    def _norm_sweep(self) -> None:
        """``--evict l2`` after step m: the rows of the IDs live at m (the index's snapshot) are read through their
        tiers; the IDs whose L2 norm is below the threshold leave when batch m + sweep_delay is mapped."""
        arrays = self.idmaps.state_at(self.step)["arrays"]
        bags = {t.config.key: t for t in self.model.embeddings.bags}
        out = []
        for key in self.idmaps.dynamic:
            a, b = self.idmaps.slot_range(key)  # row r of the table is index slot a + r
            out.append(weak_ids(self.idmaps, arrays, a, b - a, bags[key].storage, self.device))
        self.idmaps.add_sweep(self.step, out)

    def _lookahead_pipeline(self, stream, total: int):
        """A `LookaheadPipeline` over ``stream`` when some tables have look-ahead caches, else None."""
        targets = prefetch_targets(self.model.embeddings.bags, self._shard_ranges())
        if not targets:
            return None
        cfg = self.cfg
        max_bytes = parse_bytes(cfg.lookahead_memory, "lookahead_memory")
        split = self.model.budget_split
        if split and split["window"]:  # the window holds what the memory budget set aside for it (its floor too)
            max_bytes = split["window"]
        window = cfg.lookahead
        if cfg.evict == "l2" and window > cfg.decay_every - cfg.prefetch_depth - 2:  # the map waits for the sweeps
            window = cfg.decay_every - cfg.prefetch_depth - 2
            log.info("--evict l2: the look-ahead window is %d batches (norm sweeps every %d steps enter the map one "
                     "period later)", window, cfg.decay_every)
        trace = self._next_use_trace(targets, total, max_bytes)
        in_memory = in_memory_members(self.model.embeddings.bags) if self._shard_ranges() is None else []
        return LookaheadPipeline(stream, targets, window=window, depth=cfg.prefetch_depth,
                                 max_bytes=max_bytes, start_step=self.step, io_threads=cfg.prefetch_threads,
                                 leave_a_core=cfg.num_threads is None, next_uses=trace, in_memory=in_memory)

    def _next_use_trace(self, targets: list[PrefetchTarget], total: int, memory_bytes: int) -> NextUseTrace | None:
        """``--lookahead-trace``: one pass over the batches from here to step ``total`` (a second reader of the same
        stream, `_train_batches`) gives each lookup its next use (`tierec.train.nextuse`), within ``memory_bytes``
        (the window's share, not yet in use). None where the batches are not a pure function of the data: IDs
        mapped by a dynamic index as training goes, or a rank's shards fed by all-to-all."""
        features = [m.feature for t in targets for m in t.members]
        if not self.cfg.lookahead_trace or self.idmaps.active or self._shard_ranges() is not None \
                or len(set(features)) != len(features):
            return None
        with malloc_thresholds(*TRANSIENT_MALLOC):  # its chunks go back to the OS when freed ...
            trace = NextUseTrace.build(self._train_batches(total), batch_ids, features, start_step=self.step,
                                       directory=self.out, memory_bytes=memory_bytes)
        release_free_memory()  # ... and so does what its reader's pools and arenas kept (as the planning pass)
        log.info("next-use trace: %d steps, %s lookups of %d tables, in %.1f s (%d partition(s))", trace.steps,
                 f"{trace.lookups:,}", len(features), trace.seconds, trace.partitions)
        self.log.write("trace", step=self.step, steps=trace.steps, lookups=trace.lookups, tables=len(features),
                       seconds=round(trace.seconds, 3), partitions=trace.partitions)
        return trace

    def _shard_ranges(self) -> dict | None:  # the distributed trainer maps its shards to their row ranges
        return None

    def evaluate(self) -> dict:
        """AUC and log-loss on the held-out rows (`eval_source`); callers check ``eval_split`` first."""
        if self.eval_split is None:
            raise TierecError(f"{self.eval_ds.root}: no held-out rows to evaluate")
        return evaluate(self.model, self.eval_ds, self.eval_split, self.cfg.eval_batch_size, self.device,
                        self.cfg.max_eval_rows, self.cfg.progress,
                        self.idmaps.reader_at(self.step) if self.idmaps.active else None)

    def _evaluate_safely(self) -> dict | None:
        """`evaluate`, logged; a failure is logged and recorded, never fatal to the training run."""
        try:
            res = self.evaluate() | {"step": self.step}
        except TierecError as e:
            log.error("step %d: evaluation failed, training goes on: %s", self.step, e)
            self.log.write("eval", step=self.step, epoch=self.epoch, error=str(e))
            return None
        self.log.write("eval", epoch=self.epoch, **res)
        log.info("step %d: %s AUC %.4f, log-loss %.4f%s", self.step, self.eval_split, res["auc"], res["logloss"],
                 "".join(f"; {n} AUC {t['auc']:.4f}" for n, t in list(res.get("tasks", {}).items())[1:]))
        return res

    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> dict:
        cfg = self.cfg
        per_epoch = self.ds.num_batches("train", cfg.batch_size, max_rows=cfg.max_train_rows)
        total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
        self.log.write("start", step=self.step, config=cfg.to_dict(), train_rows=self.ds.num_rows("train"),
                       steps_per_epoch=per_epoch, device=str(self.device), threads=torch.get_num_threads(),
                       build_seconds=round(self.build_s, 3), budget_split=self.model.budget_split)
        meter = energy.meter(region=cfg.carbon_region, intensity_g_per_kwh=cfg.carbon_intensity,
                             work_unit="samples").start()
        bar = tqdm(total=total, initial=min(self.step, total), desc="train", unit="step", dynamic_ncols=True,
                   disable=None if cfg.progress else True)
        last_eval: dict | None = None
        window_loss, window_n, window_t0, window_samples = 0.0, 0, time.perf_counter(), 0
        self.model.train()
        tuner = start_input(self)  # --profile-input / --input autotune (tierec.train.input_probe)
        stream = self._train_batches(total)
        pipe = self._lookahead_pipeline(stream, total)  # its worker reads (and maps) the batches ahead
        window_t0 = time.perf_counter()  # the first record's rate: not the profile's or the trace pass's seconds
        if pipe is None and self.idmaps.active:
            stream = map_ahead(stream)  # the ID map's work beside the step, not in it
        paused = pipe.paused if pipe is not None else contextlib.nullcontext

        @contextlib.contextmanager
        def quiet():  # evaluation and checkpoints: worker parked, multi-MB temporaries handed back at once
            with paused(), malloc_thresholds(*TRANSIENT_MALLOC):
                yield

        with malloc_thresholds(*STEP_MALLOC):  # activations reused from step to step, not re-mapped
            try:
                t_step = time.perf_counter()
                for batch in pipe if pipe is not None else stream:
                    loss = self.train_step(batch)
                    if not math.isfinite(loss):
                        raise TierecError(
                            f"step {self.step + 1}: the training loss is {loss} (diverged); nothing of this step is "
                            f"saved, the last checkpoint ({self._last_checkpoint()}) is intact; lower --lr or "
                            "--sparse-lr and --resume or start over")
                    now = time.perf_counter()
                    self.train_s += now - t_step
                    self.step += 1
                    self.batch_in_epoch += 1
                    self.samples += batch.size
                    meter.add_work(batch.size)
                    window_loss += loss * batch.size
                    window_n += batch.size
                    window_samples += batch.size
                    end_of_epoch = self.batch_in_epoch >= per_epoch
                    if end_of_epoch:
                        self.epoch += 1
                        self.batch_in_epoch = 0
                    bar.update(1)
                    done = self.step >= total
                    if self.step % cfg.log_every == 0 or end_of_epoch or done:
                        sps = window_samples / max(now - window_t0, 1e-9)
                        stats = cache_stats(self.model)
                        hit = overall_hit_rate(stats)
                        post = {"loss": f"{window_loss / window_n:.4f}", "samples_s": f"{sps:,.0f}"}
                        if hit is not None:
                            post["hit"] = f"{hit:.1%}"
                        extra: dict[str, object] = {"cache": stats} if stats else {}
                        if self.idmaps.index is not None:  # the mapping may run ahead of training: as of `mapped_step`
                            extra["dynamic"] = {"mapped_step": self.idmaps.step, "tables": self.idmaps.stats()}
                        if pipe is not None:
                            extra["prefetch"] = pipe.summary()
                            post["stall"] = f"{pipe.stats['stall_s'] / max(self.train_s, 1e-9):.1%}"
                        bar.set_postfix(post)
                        self.log.write("train", step=self.step, epoch=self.epoch, loss=window_loss / window_n,
                                       samples_per_s=sps, samples=self.samples, **extra)
                        window_loss, window_n, window_t0, window_samples = 0.0, 0, time.perf_counter(), 0
                        check_input(self, tuner)
                    if self.idmaps.sweeps_at(self.step):
                        with quiet():
                            self._norm_sweep()
                    if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or end_of_epoch or done:
                        with quiet():
                            self.save()  # before evaluating: an evaluation never costs the training
                    do_eval = ((cfg.eval_every and self.step % cfg.eval_every == 0)
                               or (not cfg.eval_every and end_of_epoch))
                    if do_eval and self.eval_split is not None:
                        with quiet():
                            last_eval = self._evaluate_safely() or last_eval
                    self.idmaps.forget_before(self.step)
                    if done:
                        break
                    t_step = time.perf_counter()
            finally:
                if pipe is not None:
                    pipe.close()
                elif hasattr(stream, "close"):
                    stream.close()  # map_ahead's thread, the data reader
        bar.close()
        if (last_eval is None or last_eval["step"] != self.step) and self.eval_split is not None:
            last_eval = self._evaluate_safely() or last_eval  # the summary reports the final model
        report = meter.stop()
        self.log.write("energy", step=self.step, **report.to_dict())
        log.info("%s", report.summary_line())
        summary: dict[str, object] = {"step": self.step, "epoch": self.epoch, "samples": self.samples,
                   "train_s": round(self.train_s, 3),
                   "samples_per_s": self.samples / self.train_s if self.train_s else None,
                   "checkpoint": str(ckpt.resolve_checkpoint(self.out)) if self.step else None}
        if last_eval:
            summary.update(auc=last_eval["auc"], logloss=last_eval["logloss"], eval_step=last_eval["step"])
            if "tasks" in last_eval:  # a multi-task model: every label's figures
                summary["tasks"] = last_eval["tasks"]
        stats = cache_stats(self.model)
        if stats:
            summary["cache_hit_rate"] = overall_hit_rate(stats)
            summary["ssd_bytes_read"] = sum(s.get("bytes_read", 0) for s in stats.values())
            summary["ssd_bytes_written"] = sum(s.get("bytes_written", 0) for s in stats.values())
        if self.idmaps.index is not None:
            summary["dynamic"] = self.idmaps.stats()
        if pipe is not None:
            pf = pipe.summary()
            summary["prefetch"] = pf
            summary["stall_fraction"] = pf["stall_s"] / self.train_s if self.train_s else None
        summary["energy"] = report.columns() | {"summary": report.summary_line()}
        self.log.write("end", **summary)
        self.log.close()
        return summary


def weak_ids(idmaps: IdMaps, arrays: dict, first: int, rows: int, storage, device) -> torch.Tensor:
    """Raw IDs of the live slots ``first`` .. ``first + rows - 1`` of an index snapshot (``arrays``) whose rows
    (row r at slot first + r, read through ``storage``) have an L2 norm below ``--l2-threshold``, int64 [k].
    A chunk of slots at a time (bounded temporaries, and resident pages when spilled); a shared unknown row is
    never live, so never measured."""
    ix = idmaps.index
    assert ix is not None
    live, slot_id = arrays["live"], arrays["slot_id"]
    low = []
    for ca, cb in ix.arrays.chunks(rows, 9):
        local = live[first + ca : first + cb].nonzero().squeeze(1) + ca
        for part in local.split(1 << 16):
            w, _ = storage.read(part.to(device))
            low.append(slot_id[first + part[(w.norm(dim=1) < ix.cfg.l2_threshold).cpu()]])
    return torch.cat(low) if low else torch.empty(0, dtype=torch.int64)


def _spill_root(ckpt_path: Path) -> Path:
    """Where a checkpoint's reader spills a dynamic index too large for memory: its run's tables directory,
    or the system's temporary directory where that cannot be written."""
    root = ckpt_path.resolve().parent.parent / "tables"
    probe = root if root.exists() else root.parent
    return root if os.access(probe, os.W_OK) else Path(tempfile.gettempdir()) / "tierec"


def load_id_maps(checkpoint: str, schema: Schema) -> IdMaps | None:
    """How the IDs of the data a checkpoint was trained on become its rows (raw IDs: fixed tables reduce
    them, dynamic tables look them up in the saved indexes), read-only; None when they are rows already."""
    path = ckpt.resolve_checkpoint(checkpoint)
    m = ckpt.read_manifest(path)
    cfg = TrainConfig(**{**m["config"], "data": m["config"].get("data") or "."})
    maps = cfg.id_maps(schema, spill_root=_spill_root(path))
    if not maps.active:
        return None
    if maps.index is not None:
        maps.load_state_dict(ckpt.attach_arrays(path, m, ckpt.load_dense_state(path, m).get("id_maps", {})), m["step"])
    return maps


def load_for_eval(checkpoint: str, data: str | None = None,
                  device: str = "auto") -> tuple[Model, Dataset, dict]:
    """Rebuild the model of a checkpoint and load its weights (for `tierec eval` and serving)."""
    path = ckpt.resolve_checkpoint(checkpoint)
    m = ckpt.read_manifest(path)
    cfg_dict = dict(m["config"])
    cfg_dict["data"] = data or ckpt.saved_data_path(cfg_dict, path)
    try:
        cfg = TrainConfig(**cfg_dict)
    except TypeError as e:  # a key this version does not know
        raise CheckpointError(f"{path}/manifest.json: its config does not fit this tierec ({e})") from None
    ds = Dataset(cfg.data)
    differs = schema_differences(m["schema"], ds.schema)
    if differs:
        raise ConfigError(f"{cfg.data}: its schema differs from the one checkpoint {path} was trained on ({differs})")
    dev = pick_device(device)
    plan = m.get("storage_plan") or []
    on_ssd = {p["name"] for p in plan if p["placement"] == "ssd"}
    factory = None
    if on_ssd:  # tables larger than memory are read from the checkpoint's files, behind caches
        from tierec.storage.tiered import checkpoint_storage_factory

        factory = checkpoint_storage_factory(path, m, plan, dev, [(d, mm["files"]) for d, mm in ckpt.table_chain(path, m)])
    model = build_model(cfg, ds.schema, dev, storage_factory=factory)
    state = ckpt.load_dense_state(path, m)
    model.load_state_dict(state["model"])
    ckpt.load_tables(path, m, {t.config.name: t.storage for t in model.embeddings.bags
                               if t.config.name not in on_ssd})
    model.eval()
    return model, ds, m

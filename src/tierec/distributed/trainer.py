"""`DistributedTrainer`: the single-process `Trainer` loop with sharded tables and DDP dense layers.

Every rank reads the same global batch of ``batch_size`` samples (the reader is
deterministic) and trains on its contiguous slice (`slice_batch`); the dense
layers are wrapped in DistributedDataParallel with a summing comm hook, the
tables are sharded (`ShardedEmbeddingCollection`). Each rank's loss is the sum
of its samples' losses divided by the global batch size, so the summed dense
gradients and the owners' row gradients are those of the single-process loss.

Checkpoints have the single-process layout, incremental ones included: each rank
writes its shards' parts of the tables' row sets (the rows changed since the last
checkpoint, or every written row), rank 0 joins them, writes dense.pt and the
manifest and publishes LATEST. A checkpoint therefore loads with any number of
ranks, and in `tierec eval`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tierec import __version__
from tierec.data.dataset import Batch
from tierec.distributed.comm import Dist, sum_gradients_hook
from tierec.distributed.embedding import ShardedEmbeddingCollection, ShardView
from tierec.distributed.plan import Shard, describe, plan_shards, row_bounds
from tierec.errors import ConfigError, TierecError
from tierec.fsio import sha256_file
from tierec.modules.optim import SparseOptimizer
from tierec.sparse import KeyedJaggedTensor
from tierec.storage.lazy import RowInit
from tierec.storage.plan import AccessSample, TableNeeds, measure_lookups
from tierec.storage.settings import StorageSettings
from tierec.storage.tablefile import CHUNK_ROWS, merge_row_set_parts, row_bytes_of, write_row_set_part
from tierec.storage.tiered import sample_as_rows
from tierec.train import checkpoint as ckpt
from tierec.train.idmap import MappedBatch
from tierec.train.metrics import scores
from tierec.train.rundir import claim_run_dir, existing_run
from tierec.train.trainer import Model, Trainer, build_model, data_fingerprint, table_configs, training_loss, weak_ids

log = logging.getLogger(__name__)


def slice_batch(batch: Batch, a: int, b: int) -> Batch:
    """Samples [a, b) of ``batch`` (all keys; the IDs are copied once, T slices)."""
    kjt = batch.sparse
    keys, B = kjt.keys(), kjt.stride()
    off = kjt.offsets()
    rows = torch.arange(len(keys), device=off.device) * B
    spans = torch.stack([off[rows + a], off[rows + b]], 1).tolist()
    values = torch.cat([kjt.values()[s:e] for s, e in spans]) if spans else kjt.values()[:0]
    w = kjt.weights_or_none()
    weights = torch.cat([w[s:e] for s, e in spans]) if w is not None else None
    lengths = kjt.lengths().view(len(keys), B)[:, a:b].reshape(-1)
    sparse = KeyedJaggedTensor(keys, values, lengths, weights, stride=b - a)
    session = batch.session[a:b] if batch.session is not None else None
    return Batch(batch.dense[a:b], sparse, batch.labels[a:b], session)


class _NullLog:
    def write(self, event: str, **fields) -> None:
        pass

    def close(self) -> None:
        pass


def _rank_storage(settings: StorageSettings, shards: list[Shard], sample: dict[str, AccessSample],
                  row_bytes: int, rank: int, device, fresh: bool):
    """Storage factory, plan and budget split for this rank's shards from its memory budget (per rank), or
    (None, [], None): all in memory.
    The tiers are the single-process ones, with files under ``STORAGE_DIR/rank-R/``."""
    if not settings.tiered:
        return None, [], None
    from tierec.storage.tiered import make_storage_factory, plan_budget, split_budget, table_overrides

    needs, sub, overrides = [], {}, {}
    for s in shards:
        a = sample[s.table]
        m = (a.ids >= s.lo) & (a.ids < s.hi)
        sub[s.name] = AccessSample(int(a.counts[m].sum()), a.ids[m] - s.lo, a.counts[m])
        needs.append(TableNeeds(s.name, s.rows, row_bytes, sub[s.name].lookups, sub[s.name].ids.size))
        if s.table in settings.tables:  # a row-wise shard gets its share of the table's cache
            overrides[s.name] = table_overrides(settings.tables[s.table], s.rows, s.num_embeddings)
    split = split_budget(settings, needs)  # this rank's budget: row bits and its look-ahead window first
    plan, _ = plan_budget(settings, needs, overrides, split.tables if settings.memory_budget is not None else None)
    rank_settings = replace(settings, root=settings.root / f"rank-{rank}")
    return make_storage_factory(rank_settings, plan, sub, device, fresh=fresh, split=split), plan, split


def merge_storage_plans(plans: list[list[dict]], shards: list[Shard]) -> list[dict] | None:
    """Per-table storage plan of the whole job, in the single-process format (for `tierec eval`):
    a table is on SSD if any shard is, with the sum of its shards' cache rows."""
    by_shard = {p["name"]: p for rank_plan in plans for p in rank_plan}
    if not by_shard:
        return None
    out: dict[str, dict] = {}  # table -> its plan entry
    for s in shards:
        p = by_shard.get(s.name, {"placement": "memory", "cache_rows": 0, "policy": "lru", "table_bytes": 0,
                                  "budget_bytes": 0, "access_share": 0.0})
        m = out.setdefault(s.table, {"name": s.table, "placement": "memory", "cache_rows": 0, "policy": p["policy"],
                                     "table_bytes": 0, "budget_bytes": 0, "access_share": 0.0})
        if p["placement"] == "ssd":
            m["placement"], m["policy"] = "ssd", p["policy"]
        for k in ("cache_rows", "table_bytes", "budget_bytes", "access_share"):
            m[k] += p[k]
    return list(out.values())


class DistributedTrainer(Trainer):
    """`Trainer` for one rank of a torchrun job (see module doc)."""

    def __init__(self, cfg, d: Dist, resume: bool = False, overwrite: bool = False,
                 allow_config_change: bool = False):
        if cfg.model == "two-tower":  # the sharded collection pools every table for one per-sample vector set
            raise ConfigError("--model two-tower does not run under torchrun yet (its towers split the tables); "
                              "train it in one process")
        self.dist = d
        if d.rank != 0:
            cfg = replace(cfg, progress=False)
        if cfg.dedup:  # sharded tables take plain batches: the all-to-all carries every sample's IDs
            if d.rank == 0:
                log.info("dedup of user-side features is not used with sharded tables (plain batches)")
            cfg = replace(cfg, dedup=False)
        super().__init__(cfg, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)
        ids = [d.local_rank] if d.device.type == "cuda" else None
        with warnings.catch_warnings():  # broadcast_buffers=False is still the way to skip the initial sync
            warnings.simplefilter("ignore", FutureWarning)
            # sparse experts: an expert no sample of a rank chose has no gradient there
            unused = self.cfg.model in ("mmoe", "ple") and self.cfg.expert_top_k > 0
            self.ddp = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False,
                                               find_unused_parameters=unused)
        self.ddp.register_comm_hook(None, sum_gradients_hook(d))
        if d.rank != 0:
            self.log.close()
            self.log = _NullLog()
        self.first_step = self.step

    def fit(self) -> dict:
        """`Trainer.fit`, plus ``comm``: what the training steps exchanged (all ranks, summed, per step)
        and the share of each rank's step time spent inside collectives (waiting for peers included)."""
        summary = super().fit()
        d, steps = self.dist, max(self.step - self.first_step, 1)
        mine = (dict(d.stats.bytes), dict(d.stats.seconds), self.train_s)
        every: list = [None] * d.world
        dist.all_gather_object(every, mine)
        kinds = sorted({k for b, _, _ in every for k in b})
        per_step = {k: round(sum(b.get(k, 0) for b, _, _ in every) / steps) for k in kinds}
        share = [sum(sec.values()) / max(t, 1e-9) for _, sec, t in every]
        summary["comm"] = {"steps": steps, "bytes_per_step": per_step, "total_bytes_per_step": sum(per_step.values()),
                           "seconds_per_step": {k: sum(sec.get(k, 0.0) for _, sec, _ in every) / d.world / steps
                                                for k in kinds},
                           "time_share_per_rank": [round(x, 4) for x in share]}
        return summary

    def _claim_run_dir(self, resume: bool, overwrite: bool):
        """Rank 0 claims and locks the shared run directory; the others refuse an existing run just as it
        does (so every rank stops, none waits for a peer that left)."""
        found = existing_run(self.out) if self.out.is_dir() else []
        dist.barrier()  # every rank has looked before rank 0 writes anything there
        if self.dist.rank == 0:
            return claim_run_dir(self.out, resume, overwrite)
        if found and not resume and not overwrite:
            raise ConfigError(f"--out {self.out}: already holds a run ({', '.join(found)}); pass --resume to "
                              "continue it or --overwrite to start over (deletes them)")
        return None

    @property
    def ebc(self) -> ShardedEmbeddingCollection:
        ebc = self.model.embeddings
        assert isinstance(ebc, ShardedEmbeddingCollection)  # `_build_model` shards the tables
        return ebc

    def _build_model(self, fresh: bool) -> Model:
        """`build_model` with this rank's shards of the tables (`ShardedEmbeddingCollection`), placed by a
        sharding plan over the measured lookups, each rank's under its own memory budget."""
        cfg, d, schema = self.cfg, self.dist, self.ds.schema
        self.device = d.device
        configs = table_configs(cfg, schema)
        self.state_dim = SparseOptimizer(cfg.sparse_optimizer, cfg.sparse_lr).state_dim(cfg.embedding_dim)
        row_bytes = (cfg.embedding_dim + self.state_dim) * 4
        rows = cfg.row_spaces(schema)[0]
        settings = cfg.storage_settings(rows)
        sample = sample_as_rows(measure_lookups(self.ds, schema.sparse_names, settings.plan_batch_size,
                                                settings.plan_batches, settings.seed), rows)
        loads = [TableNeeds(c.name, c.num_embeddings, row_bytes, sample[c.name].lookups) for c in configs]
        self.shards = plan_shards(loads, d.world, settings.memory_budget, cfg.sharding.tables,
                                  self._partition_splits(configs, d.world))
        if d.rank == 0:
            log.info("%s", describe(self.shards, loads, d.world))
        mine = [s for s in self.shards if s.rank == d.rank]
        factory, plan, split = _rank_storage(settings, mine, sample, row_bytes, d.rank, d.device, fresh)
        self.rank_plan = [p.to_dict() for p in plan]

        def sharded(tables, opt):
            return ShardedEmbeddingCollection(tables, self.shards, d, opt, cfg.seed, factory, d.device)

        model = build_model(cfg, schema, d.device, collection=sharded)
        model.budget_split = split.to_dict() if split is not None and split.total else None
        return model

    def _partition_splits(self, configs, world: int) -> dict[str, list[int]]:
        """Row bounds per rank of the dynamic tables split into --id-partitions (P > 1): each rank owns P / world
        whole partitions, so the rank of a row follows from its raw ID's hash (`tierec.train.idmap`)."""
        P = self.idmaps.partitions
        if P == 1:
            return {}
        if P % world:
            raise ConfigError(f"--id-partitions {P} is not a multiple of the {world} ranks: the dynamic tables' "
                              "partitions could not be owned whole by the ranks")
        out = {}
        for c in configs:
            if c.key in self.idmaps.configs:
                bounds = self.idmaps.partition_rows(c.key)
                out[c.name] = [bounds[r * P // world] for r in range(world + 1)]
        return out

    def _shard_ranges(self) -> dict:
        """Each owned shard's cache sees its table's IDs of the global batch in its row range, minus lo:
        what the owner receives after the all-to-all (every rank reads the same global batches)."""
        return {s.name: (s.table, 0, None) if s.whole else (s.table, s.lo, s.hi) for s in self.ebc.shards}

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: Batch) -> float:
        """One step on the global ``batch``; returns the global mean loss."""
        d = self.dist
        b = row_bounds(batch.size, d.world)
        if isinstance(batch, MappedBatch) and batch.fresh:  # dynamic tables: the owners reset the rows given now
            self.ebc.use_fresh(batch.fresh)
        local = slice_batch(batch, b[d.rank], b[d.rank + 1]).to(self.device, non_blocking=True)
        logits = self.ddp(local.dense, local.sparse)
        loss = training_loss(self.model, logits, local.labels, self.cfg, total=batch.size)
        self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()  # dense grads summed by DDP; row grads sent to the owners, which update their rows
        self.dense_opt.step()
        return d.all_reduce_sum(loss.detach().reshape(1), "allreduce_loss").item()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """AUC and log-loss over the whole held-out split: every rank scores its slice, the scores are gathered."""
        d, cfg = self.dist, self.cfg
        kept = (dict(d.stats.bytes), dict(d.stats.seconds), dict(d.stats.calls))  # count training steps only
        was = self.model.training
        self.model.eval()
        probs, labels = [], []
        split = self.eval_split
        if split is None:
            raise TierecError(f"{self.eval_ds.root}: no held-out rows to evaluate")
        id_maps = self.idmaps.reader_at(self.step) if self.idmaps.active else None
        for batch in self.eval_ds.batches(split, cfg.eval_batch_size, max_rows=cfg.max_eval_rows):
            if id_maps is not None:
                batch = id_maps.lookup_batch(batch)
            b = row_bounds(batch.size, d.world)
            local = slice_batch(batch, b[d.rank], b[d.rank + 1]).to(self.device)
            prob = torch.sigmoid(self.model(local.dense, local.sparse))
            width = max(b[r + 1] - b[r] for r in range(d.world))
            padded = torch.zeros(width, *prob.shape[1:], device=self.device)  # [width] or [width, K]
            padded[: prob.shape[0]] = prob
            parts = [torch.empty_like(padded) for _ in range(d.world)]
            dist.all_gather(parts, padded)
            probs.append(torch.cat([parts[r][: b[r + 1] - b[r]] for r in range(d.world)]).cpu().numpy())
            labels.append(batch.labels.numpy())
        self.model.train(was)
        d.stats.bytes, d.stats.seconds, d.stats.calls = kept
        if not probs:
            raise TierecError(f"{self.eval_ds.root}: split {split!r} has no rows to evaluate")
        p, y = np.concatenate(probs), np.concatenate(labels)
        return {"split": split, **scores(y, p, self.eval_ds.schema.labels)}

    def _norm_sweep(self) -> None:
        """``--evict l2`` after step m: every rank measures the live rows of the dynamic tables' shards it holds
        (a slot is a row), and the IDs below the threshold are gathered from all ranks, so every replica of the
        index applies the same sweep (`Trainer._norm_sweep` in one process)."""
        arrays = self.idmaps.state_at(self.step)["arrays"]
        low: list[list[torch.Tensor]] = [[] for _ in self.idmaps.dynamic]
        for s, t in zip(self.ebc.shards, self.ebc.tables, strict=True):
            key = self.ebc.configs[s.index].key
            if key in self.idmaps.dynamic:  # the shard's rows are index slots slot_range(key)[0] + s.lo ...
                low[self.idmaps.dynamic.index(key)].append(
                    weak_ids(self.idmaps, arrays, self.idmaps.slot_range(key)[0] + s.lo, s.rows, t.storage, self.device))
        mine = [torch.cat(x) if x else torch.empty(0, dtype=torch.int64) for x in low]
        gathered: list = [None] * self.dist.world
        dist.all_gather_object(gathered, mine)
        self.idmaps.add_sweep(self.step, [torch.cat([g[i] for g in gathered]) for i in range(len(mine))])

    # ------------------------------------------------------------------ checkpoints
    @property
    def tables(self) -> dict:
        return {s.name: t.storage for s, t in zip(self.ebc.shards, self.ebc.tables, strict=True)}

    def save(self) -> Path:
        """Rank 0 publishes a checkpoint of every rank's shards. Where every shard tracks its written rows
        (`LazyRows`), each rank writes the part of the row set it owns (the rows changed since the last
        checkpoint: an incremental link, while the chain is below ``--checkpoint-chain``; else every
        written row) and rank 0 joins the parts of each table into its row set; otherwise every rank
        writes its rows into full-size table files."""
        d, ebc = self.dist, self.ebc
        steps = {s.index: int(t.step) for s, t in zip(ebc.shards, ebc.tables, strict=True)}
        tracked = all(t.storage.lazy_rows() is not None for t in ebc.tables)
        gathered: list = [None] * d.world
        dist.all_gather_object(gathered, (steps, self.rank_plan, tracked))
        row_sets = all(g[2] for g in gathered)
        box: list = ["", []]  # rank 0's temporary directory and the chain below the new checkpoint
        if d.rank == 0:
            tmp = ckpt.new_checkpoint_dir(self.out, self.step)
            chain = ckpt.chain_below(self.parent, self.cfg.checkpoint_chain) if row_sets else []
            if row_sets:
                (tmp / "parts").mkdir()
            else:
                for c in ebc.configs:  # full-size files; every rank fills its row ranges
                    with open(tmp / "tables" / f"{c.name}.tbl", "wb") as f:
                        f.truncate(c.num_embeddings * (c.embedding_dim + self.state_dim) * 4)
            box = [str(tmp), chain]
        dist.broadcast_object_list(box, src=0)
        tmp, chain = Path(box[0]), box[1]
        for s, t in zip(ebc.shards, ebc.tables, strict=True):
            lazy = t.storage.lazy_rows()
            if row_sets:
                assert lazy is not None  # every shard tracks its rows (gathered above)
                which = lazy.changed if chain and lazy.changed is not None else lazy.written
                write_row_set_part(tmp / "parts" / s.name, t.storage, which, s.lo)
            else:
                t.storage.flush()
                write_shard(tmp / "tables" / f"{s.table}.tbl", s, t.storage)
        dist.barrier()
        final = None
        if d.rank == 0:
            final = self._publish(tmp, [g[:2] for g in gathered], chain if row_sets else None)
        box = [str(final)]
        dist.broadcast_object_list(box, src=0)
        for t in ebc.tables:
            if (lazy := t.storage.lazy_rows()) is not None:
                lazy.take_changed()
        self.parent = Path(box[0])
        return self.parent

    def _publish(self, tmp: Path, gathered: list, chain: list[str] | None) -> Path:
        """Rank 0: the tables' files (row sets joined from the ranks' parts, when ``chain`` is not None),
        dense state and manifest; publish."""
        ebc = self.ebc
        steps = {i: n for rank_steps, _ in gathered for i, n in rank_steps.items()}
        state = dict(self.model.state_dict())
        for i in range(len(ebc.configs)):  # the single-process model's per-table step counters
            state[f"embeddings.tables.{i}.step"] = torch.tensor(steps[i], dtype=torch.int64)
        dense_state = {"model": state, "dense_optimizer": self.dense_opt.state_dict(),
                       "torch_rng": torch.get_rng_state()}
        files, table_meta = {}, []
        if self.idmaps.index is not None:  # every rank maps the same global batches: rank 0's replica is every rank's
            dense_state["id_maps"], arrays = ckpt.detach_arrays(self.idmaps.state_at(self.step), "id_index")
            files.update(ckpt.write_arrays(tmp, arrays))
        for i, c in enumerate(ebc.configs):
            rel = f"tables/{c.name}.tbl"
            if chain is not None:
                parts = [tmp / "parts" / s.name for s in sorted((s for s in self.shards if s.index == i),
                                                               key=lambda s: s.lo)]
                init = RowInit(self.cfg.seed, i, c.num_embeddings, c.embedding_dim)
                for name, entry in merge_row_set_parts(tmp / rel, parts, c.embedding_dim + self.state_dim, init,
                                                       delta=bool(chain)).items():
                    files[f"tables/{name}"] = entry
            else:
                files[rel] = {"bytes": (tmp / rel).stat().st_size, "sha256": sha256_file(tmp / rel)}
            table_meta.append(ckpt.table_entry(c.name, c.num_embeddings, c.embedding_dim, self.state_dim))
        shutil.rmtree(tmp / "parts", ignore_errors=True)
        meta = {"tierec_version": __version__, "saved_at": round(time.time(), 3), "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "samples": self.samples, "train_s": self.train_s,
                "config": self.cfg.to_dict(), "schema": self.ds.schema.to_json(),
                "data_fingerprint": data_fingerprint(self.ds),
                "storage_plan": merge_storage_plans([p for _, p in gathered], self.shards),
                "chain": chain or []}
        return ckpt.publish_checkpoint(tmp, self.step, dense_state, files, table_meta, meta, self.cfg.keep_checkpoints)

    def _load_weights(self, path: Path, manifest: dict, model_state: dict) -> None:
        """Dense weights, this rank's tables' step counters, and its shards' rows (any world size)."""
        self.model.load_state_dict({k: v for k, v in model_state.items() if not k.startswith("embeddings.")})
        for s, t in zip(self.ebc.shards, self.ebc.tables, strict=True):
            t.step.fill_(model_state[f"embeddings.tables.{s.index}.step"])
        ckpt.load_tables(path, manifest, {s.table: ShardView(s, t.storage)
                                          for s, t in zip(self.ebc.shards, self.ebc.tables, strict=True)})
        for t in self.ebc.tables:  # the checkpoint holds every row just loaded: nothing changed since
            if (lazy := t.storage.lazy_rows()) is not None:
                lazy.take_changed()

def write_shard(path: Path, shard: Shard, storage) -> None:
    """Write a shard's rows (weights | state) at their row offsets of a full-size table file, fsynced."""
    width = storage.dim + storage.state_dim
    fd = os.open(path, os.O_WRONLY)
    try:
        for a in range(0, shard.rows, CHUNK_ROWS):
            b = min(a + CHUNK_ROWS, shard.rows)
            os.pwrite(fd, row_bytes_of(storage, a, b), (shard.lo + a) * width * 4)
        os.fsync(fd)
    finally:
        os.close(fd)

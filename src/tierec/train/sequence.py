"""Training and evaluation of sequential recommenders (`tierec train --model sasrec`).

One epoch = every user with at least two training items once, in an order drawn from (seed, epoch),
batches of `SequenceBatches` (inputs, positives, one sampled negative per position). Dense
parameters: Adam (betas 0.9, 0.98, as SASRec.pytorch); the item table: tierec's fused sparse
(lazy) Adam with the same learning rate and betas. After each epoch (``eval_every``: every N
epochs) HR@10 / NDCG@10 on the validation split, at the end on both; a
checkpoint (atomic, `tierec.train.checkpoint`) at the end of every epoch; ``--resume`` continues
from the newest one at its epoch boundary, exactly (the data order and negatives of an epoch depend
on (seed, epoch) only). Records go to ``OUT/metrics.jsonl``.

Storage of the item table: as DLRM's tables (`tierec.storage.tiered`). With ``--memory-budget`` (or
``[tables.item]`` settings) the first ``plan_batches`` batches of epoch 0 are counted (every non-padding
input, positive and negative item: `item_sample`) and the same planner (`plan_sampled`) and factory
(`make_storage_factory`) as DLRM's keep the table in memory or give it an SSD file (``OUT/tables/item.tbl``)
behind a cache of ``--cache-policy``. With ``lookahead`` a `LookaheadPipeline` iterates the steps
(`SequenceBatch`, a `StepIds`: its ``lookup_ids`` are the distinct non-padding items of inputs, positives
and negatives, what `SASRec.lookup` hands the table), reads ``--lookahead`` steps ahead, prefetches each
step's rows before the trainer needs them and pauses for evaluation and checkpoints. The item table's
member is not ``direct``: the table checks that the rows it is handed are its step's items. Every policy
is exact (bit-identical losses to the in-memory table, tests/test_sasrec_tiered.py). Checkpoints record
the plan; `load_sasrec` (``tierec eval``) opens an SSD table's checkpoint file read-only behind a cache.

Evaluation (`evaluate_sequences`): per evaluated user, the target and `NUM_EVAL_NEGATIVES` sampled
negatives (fixed seed) are scored; rank = number of negatives scoring >= the target (ties count
against the model); HR@10 = mean(rank < 10), NDCG@10 = mean(1 / log2(rank + 2) if rank < 10 else 0).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tierec.data.sequences import SequenceBatches, SequenceData, load_sequences
from tierec.errors import CheckpointError, ConfigError
from tierec.modules.dense_optim import Adam, DenseOptimizer
from tierec.modules.optim import SparseOptimizer
from tierec.modules.sasrec import SASRec
from tierec.storage.base import InMemoryTable
from tierec.storage.plan import AccessSample, BudgetSplit, Placement
from tierec.train import checkpoint as ckpt
from tierec.train.config import TrainConfig

log = logging.getLogger(__name__)

ITEM = "item"  # the SASRec item table's name and sparse key

TOP_K = 10
EVAL_SEED = 0  # seed of the evaluation negatives (fixed: every model is ranked against the same items)


def rank_metrics(ranks: np.ndarray, k: int = TOP_K) -> dict:
    """HR@k and NDCG@k of 0-based ranks."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        return {f"hr@{k}": 0.0, f"ndcg@{k}": 0.0, "users": 0}
    hit = ranks < k
    ndcg = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    return {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(ndcg.mean()), "users": int(len(ranks))}


def ranks_of(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """0-based rank of column 0 (the target) among each row: negatives scoring >= it."""
    s = torch.as_tensor(scores)
    return (s[:, 1:] >= s[:, :1]).sum(1).cpu().numpy()


@torch.no_grad()
def evaluate_sequences(model: SASRec, data: SequenceData, split: str = "test", batch_size: int = 1024,
                       seed: int = EVAL_SEED, negatives: np.ndarray | None = None) -> dict:
    """``{"hr@10", "ndcg@10", "users"}`` of ``model`` on ``split`` ("valid" or "test") per the protocol
    (module doc); ``negatives`` [E, 100] overrides the sampled ones."""
    was = model.training
    model.eval()
    try:
        inputs = data.eval_inputs(split, model.max_len)
        neg = data.eval_negatives(split, seed) if negatives is None else negatives
        cand = np.concatenate([data.targets(split)[:, None], neg], 1)
        dev = next(model.parameters()).device
        ranks = []
        for s in range(0, len(inputs), batch_size):
            sc = model.score(torch.from_numpy(inputs[s:s + batch_size]).to(dev),
                             torch.from_numpy(cand[s:s + batch_size]).to(dev))
            ranks.append(ranks_of(sc))
        return rank_metrics(np.concatenate(ranks) if ranks else np.zeros(0))
    finally:
        model.train(was)


def sparse_optimizer(cfg: TrainConfig) -> SparseOptimizer:
    """The item table's fused optimizer: Adam with the dense layers' learning rate and betas, lazy or dense
    (``cfg.item_adam``)."""
    return SparseOptimizer("adam", cfg.lr, beta2=0.98, dense=cfg.item_adam == "dense")


def build_sasrec(cfg: TrainConfig, num_items: int, storage_factory=None, device="cpu") -> SASRec:
    return SASRec(num_items, cfg.embedding_dim, cfg.max_len, cfg.num_blocks, cfg.num_heads, cfg.attn_dropout,
                  cfg.pre_ln, sparse_optimizer(cfg), cfg.seed, storage_factory, device, attention=cfg.attention,
                  attn_keep=cfg.attn_keep, attn_threshold=cfg.attn_threshold, attn_score=cfg.attn_score,
                  attn_rank=cfg.attn_rank)


def dense_optimizer(model: SASRec, lr: float) -> DenseOptimizer:
    return Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.98))


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _schema(data: SequenceData) -> dict:
    m = data.manifest
    return {"kind": "sequences", "num_items": data.num_items, "num_users": data.num_users,
            "npz_sha256": (m.get("files") or {}).get("sequences.npz", {}).get("sha256")}


def train_sasrec(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, storage_factory=None,
                 max_users: int | None = None) -> dict:
    """Train SASRec on sequence data set ``cfg.data``; returns the summary (also the last metrics record).

    ``cfg.eval_every``: evaluate on the validation split every N epochs (0: every epoch). ``max_users``:
    only the first users of the data set (tests, quick runs). ``storage_factory`` (see `build_collection`)
    overrides the storage settings (``--memory-budget``, ``[tables.item]``: planned as DLRM's tables)."""
    if cfg.table_kind != "fixed":
        raise ConfigError("--model sasrec: the item table is a fixed table of num_items + 1 rows; "
                          "--table-kind dynamic is not supported with it")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # Adam drives some activations' gradients into subnormal floats, which run ~10x slower on x86 CPUs
    # (measured: 65 -> 525 ms a step after a few hundred steps); flush them to zero while training.
    flushed = torch.set_flush_denormal(True)
    try:
        return _train(cfg, resume, overwrite, storage_factory, max_users)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


@dataclass
class SequenceBatch:
    """One training step: inputs, positives, negatives int64 [B, L] (0: padding) of epoch ``epoch`` (0-based);
    ``last``: the last step of its epoch (or of the run). A `tierec.train.pipeline.StepIds`."""

    inputs: torch.Tensor
    positives: torch.Tensor
    negatives: torch.Tensor
    epoch: int
    last: bool

    def lookup_ids(self) -> dict[str, torch.Tensor]:
        """The item table's IDs of this step: the distinct non-padding items, sorted (what `SASRec.lookup`
        looks up in its one call of the table)."""
        ids = torch.unique(torch.cat([self.inputs.reshape(-1), self.positives.reshape(-1),
                                      self.negatives.reshape(-1)]))
        return {ITEM: ids[ids != 0]}

    def nbytes(self) -> int:
        return self.inputs.nbytes + self.positives.nbytes + self.negatives.nbytes


def training_steps(batches: SequenceBatches, cfg: TrainConfig, start_epoch: int, step: int) -> Iterator[SequenceBatch]:
    """The steps after ``step`` from epoch ``start_epoch`` on, up to ``cfg.epochs`` and ``cfg.max_steps``."""
    n = len(batches)
    for epoch in range(start_epoch, cfg.epochs):
        for i, (inputs, pos, neg) in enumerate(batches.epoch(cfg.seed, epoch, cfg.shuffle)):
            step += 1
            stop = cfg.max_steps is not None and step >= cfg.max_steps
            yield SequenceBatch(torch.from_numpy(inputs), torch.from_numpy(pos), torch.from_numpy(neg), epoch,
                                i + 1 == n or stop)
            if stop:
                return


def item_sample(batches: SequenceBatches, seed: int, shuffle: bool, max_batches: int) -> dict[str, AccessSample]:
    """Accesses of the item table over the first ``max_batches`` batches of epoch 0: every non-padding
    input, positive and negative item (the planner's access counts, `tierec.storage.plan`)."""
    seen = []
    for i, arrays in enumerate(batches.epoch(seed, 0, shuffle)):
        if i >= max_batches:
            break
        seen += [a[a != 0] for a in arrays]
    vals = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    ids, counts = np.unique(vals, return_counts=True)
    return {ITEM: AccessSample(int(vals.size), ids, counts.astype(np.int64))}


def item_storage(cfg: TrainConfig, batches: SequenceBatches, device: torch.device, fresh: bool = True,
                 resume_from=None) -> tuple[object, list[Placement] | None, BudgetSplit | None]:
    """``(storage_factory, plan, split)`` of the item table from ``cfg``'s storage settings, planned as
    DLRM's tables are (`tierec.storage.tiered.plan_sampled`, `make_storage_factory`); ``(None, None,
    None)`` (the table in memory) without a memory budget or ``[tables.item]`` settings."""
    settings = cfg.storage_settings()
    if not settings.tiered:
        return None, None, None
    from tierec.storage.tiered import make_storage_factory, plan_sampled

    rows = batches.data.num_items + 1
    row_bytes = (cfg.embedding_dim + sparse_optimizer(cfg).state_dim(cfg.embedding_dim)) * 4
    sample = item_sample(batches, cfg.seed, cfg.shuffle, settings.plan_batches)
    plan, sample, split = plan_sampled(settings, {ITEM: rows}, sample, row_bytes)
    factory = make_storage_factory(settings, plan, sample, device, fresh=fresh, resume_from=resume_from,
                                   split=split)
    return factory, plan, split


def _pipeline(model: SASRec, stream: Iterator[SequenceBatch], cfg: TrainConfig, step: int,
              split: BudgetSplit | None):
    """A `LookaheadPipeline` over ``stream`` when the item table has a look-ahead cache, else None (as
    `tierec.train.trainer.Trainer` builds it)."""
    from tierec.config import parse_bytes
    from tierec.train.pipeline import LookaheadPipeline
    from tierec.train.trainer import prefetch_targets

    # not `direct`: the table is called with the step's distinct items, not a batch key's IDs in order,
    # and checks that they are the rows prefetched for it
    targets = prefetch_targets(model.embeddings.bags, {ITEM: (ITEM, 0, None)})
    if not targets:
        return None
    max_bytes = parse_bytes(cfg.lookahead_memory, "lookahead_memory")
    if split is not None and split.window:  # the window holds what the memory budget set aside for it
        max_bytes = min(max_bytes, split.window)
    return LookaheadPipeline(stream, targets, window=cfg.lookahead, depth=cfg.prefetch_depth, max_bytes=max_bytes,
                             start_step=step, io_threads=cfg.prefetch_threads, leave_a_core=cfg.num_threads is None)


def _train(cfg: TrainConfig, resume: bool, overwrite: bool, storage_factory, max_users: int | None) -> dict:
    from tierec.storage.tiered import ResumeChain
    from tierec.train.rundir import claim_run_dir
    from tierec.train.trainer import JsonlLog, cache_stats, new_files_removed_on_error, overall_hit_rate

    data = load_sequences(cfg.data, max_users=max_users)
    out = Path(cfg.out)
    lock = claim_run_dir(out, resume, overwrite)
    metrics = JsonlLog(out / "metrics.jsonl")
    pipe = None
    try:
        dev = _device(cfg.device)
        batches = SequenceBatches(data, cfg.max_len, cfg.batch_size)
        latest = ckpt.latest_or_none(out) if resume else None
        m = ckpt.read_manifest(latest) if latest is not None else None
        if m is not None and m["config"].get("model") != "sasrec":
            raise CheckpointError(f"{latest}: not a sasrec checkpoint")
        plan, split = None, None
        t_build = time.perf_counter()
        root = cfg.storage_settings().root
        with new_files_removed_on_error(root):  # no half-created table file (disk full)
            if storage_factory is None:
                chain = ResumeChain(latest, ckpt.table_chain(latest, m)) if latest is not None and m else None
                storage_factory, plan, split = item_storage(cfg, batches, dev, fresh=latest is None, resume_from=chain)
            torch.manual_seed(cfg.seed)
            model = build_sasrec(cfg, data.num_items, storage_factory, dev)
        if cfg.item_adam == "dense" and not isinstance(model.table.storage, InMemoryTable):
            raise ConfigError("--item-adam dense moves every item row at every step: it needs the item table in "
                              "memory (raise --memory-budget or use --item-adam lazy)")
        build_s = time.perf_counter() - t_build
        opt = dense_optimizer(model, cfg.lr)
        start_epoch, step = 0, 0
        if latest is not None and m is not None:
            state = ckpt.load_dense_state(latest, m)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            ckpt.load_tables(latest, m, {ITEM: model.table.storage})  # skipped if linked below an SSD file
            start_epoch, step = int(m["epoch"]), int(m["step"])
            if "rng" in state:
                torch.set_rng_state(state["rng"])
            log.info("resumed from %s (epoch %d, step %d)", latest, start_epoch, step)
        storage_plan = [p.to_dict() for p in plan] if plan else None
        metrics.write("start", config=cfg.to_dict(), users=data.num_users, train_users=len(batches.users),
                      eval_users=len(data.eval_users), num_items=data.num_items, steps_per_epoch=len(batches),
                      storage_plan=storage_plan, budget_split=split.to_dict() if split is not None else None,
                      build_seconds=round(build_s, 3))
        model.train()
        every = cfg.eval_every or 1
        last: dict = {}
        t_train = 0.0
        epochs_run = 0
        stream = training_steps(batches, cfg, start_epoch, step)
        pipe = _pipeline(model, stream, cfg, step, split)
        paused = pipe.paused if pipe is not None else contextlib.nullcontext
        bar = None
        epoch, total, n = -1, 0.0, 0
        t0 = time.perf_counter()
        for b in pipe if pipe is not None else stream:
            if b.epoch != epoch:
                epoch, total, n = b.epoch, 0.0, 0
                bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}", unit="step", disable=not cfg.progress,
                           dynamic_ncols=True, leave=False)
            loss = model.loss(b.inputs.to(dev), b.positives.to(dev), b.negatives.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise ConfigError(f"loss became {lv} at step {step} (learning rate too high?)")
            total, n = total + lv, n + 1
            assert bar is not None
            bar.update(1)
            if step % cfg.log_every == 0:
                metrics.write("train", step=step, epoch=epoch + 1, loss=lv)
                bar.set_postfix(loss=f"{total / n:.4f}")
            if not b.last:
                continue
            bar.close()
            dt = time.perf_counter() - t0
            t_train += dt
            epochs_run += 1
            rec: dict = {"epoch": epoch + 1, "step": step, "loss": total / max(n, 1), "epoch_s": round(dt, 3)}
            attn = model.attention_stats(reset=True)  # pruned: keys kept per query, FLOPs since the last record
            if attn is not None:
                rec["attention"] = attn
            stats = cache_stats(model)
            if stats:
                rec["cache"] = stats
                rec["cache_hit_rate"] = overall_hit_rate(stats)
            if pipe is not None:
                rec["prefetch"] = pipe.summary()
            with paused():  # the look-ahead worker parked: evaluation and the checkpoint read the rows
                if (epoch + 1) % every == 0 or epoch + 1 == cfg.epochs:
                    t1 = time.perf_counter()
                    rec["valid"] = evaluate_sequences(model, data, "valid", cfg.eval_batch_size)
                    rec["eval_s"] = round(time.perf_counter() - t1, 3)
                metrics.write("epoch", **rec)
                log.info("epoch %d: loss %.4f, %.1f s%s", epoch + 1, rec["loss"], dt,
                         f", valid HR@10 {rec['valid']['hr@10']:.4f} NDCG@10 {rec['valid']['ndcg@10']:.4f}"
                         if "valid" in rec else "")
                _save(model, opt, cfg, data, out, step, epoch + 1, storage_plan)
            last = rec
            t0 = time.perf_counter()
        if pipe is not None:
            pipe.close()
            pipe = None
        summary = {"epochs": (last.get("epoch") if last else start_epoch), "steps": step,
                   "epoch_s_mean": round(t_train / max(epochs_run, 1), 3),
                   "valid": evaluate_sequences(model, data, "valid", cfg.eval_batch_size),
                   "test": evaluate_sequences(model, data, "test", cfg.eval_batch_size)}
        stats = cache_stats(model)
        if stats:
            summary["cache_hit_rate"] = overall_hit_rate(stats)
            summary["ssd_bytes_read"] = sum(s.get("bytes_read", 0) for s in stats.values())
        metrics.write("final", **summary)
        return summary
    finally:
        if pipe is not None:
            pipe.close()
        metrics.close()
        lock.close()


def _save(model: SASRec, opt: DenseOptimizer, cfg: TrainConfig, data: SequenceData, out: Path, step: int,
          epoch: int, storage_plan: list[dict] | None = None) -> Path:
    from tierec.storage.tiered import layout_files

    st = model.table.storage
    if st.lazy_rows() is None:  # tracked tables are read through their caches: no write-back needed
        st.flush()
    cfg_d = cfg.to_dict()
    cfg_d["data"] = str(Path(cfg.data).resolve())
    dense = {"model": {k: v for k, v in model.state_dict().items()}, "optim": opt.state_dict(),
             "rng": torch.get_rng_state()}
    meta = {"config": cfg_d, "schema": _schema(data), "epoch": epoch, "batch_in_epoch": 0,
            "samples": 0, "storage_plan": storage_plan}
    return ckpt.save_checkpoint(out, step, dense, {ITEM: st}, meta, keep=cfg.keep_checkpoints,
                                extra=layout_files(cfg.storage_settings().root))


def is_sasrec_checkpoint(path: str) -> bool:
    try:
        m = ckpt.read_manifest(ckpt.resolve_checkpoint(path))
    except Exception:
        return False
    return isinstance(m.get("config"), dict) and m["config"].get("model") == "sasrec"


def sasrec_config(p: Path, m: dict, data: str | None = None) -> TrainConfig:
    """The `TrainConfig` of sasrec checkpoint ``p`` (manifest ``m``); ``data`` overrides the saved data path."""
    if not isinstance(m.get("config"), dict) or m["config"].get("model") != "sasrec":
        raise CheckpointError(f"{p}: not a sasrec checkpoint")
    cfg_d = dict(m["config"])
    cfg_d["data"] = data or cfg_d["data"]
    try:
        return TrainConfig(**cfg_d)
    except TypeError as e:
        raise CheckpointError(f"{p}/manifest.json: its config does not fit this tierec ({e})") from None


def restore_sasrec(p: Path, m: dict, cfg: TrainConfig, device: torch.device, storage_factory=None) -> SASRec:
    """Checkpoint ``p``'s SASRec in eval mode. Its item table: from ``storage_factory`` when given (then
    filled with the checkpoint's rows), else where training kept it -- in memory, or, planned on SSD, the
    checkpoint's table file opened read-only behind a cache of the planned size
    (`checkpoint_storage_factory`, as DLRM's tables in `tierec.train.trainer.load_for_eval`)."""
    num_items = (m.get("schema") or {}).get("num_items")
    if not isinstance(num_items, int) or num_items < 1:
        raise CheckpointError(f"{p}/manifest.json: no num_items in its schema")
    plan = m.get("storage_plan") or []
    on_ssd = storage_factory is None and any(x["name"] == ITEM and x["placement"] == "ssd" for x in plan)
    if on_ssd:
        from tierec.storage.tiered import checkpoint_storage_factory

        storage_factory = checkpoint_storage_factory(p, m, plan, device,
                                                     [(d, mm["files"]) for d, mm in ckpt.table_chain(p, m)])
    model = build_sasrec(cfg, num_items, storage_factory, device)
    state = ckpt.load_dense_state(p, m)
    model.load_state_dict(state["model"])
    if not on_ssd:
        ckpt.load_tables(p, m, {ITEM: model.table.storage})
    model.eval()
    return model


def load_sasrec(path: str, data: str | None = None, device: str = "auto") -> tuple[SASRec, SequenceData, dict]:
    """A sasrec checkpoint's model (eval mode; `restore_sasrec`) and its data set (``data`` overrides the
    saved path)."""
    p = ckpt.resolve_checkpoint(path)
    m = ckpt.read_manifest(p)
    cfg = sasrec_config(p, m, data)
    ds = load_sequences(cfg.data)
    if ds.num_items != m["schema"].get("num_items"):
        raise ConfigError(f"{cfg.data}: {ds.num_items} items, but checkpoint {p} was trained on "
                          f"{m['schema'].get('num_items')}")
    return restore_sasrec(p, m, cfg, _device(device)), ds, m


def eval_checkpoint(path: str, data: str | None = None, split: str = "test", device: str = "auto") -> dict:
    model, ds, m = load_sasrec(path, data, device)
    res = evaluate_sequences(model, ds, split)
    return {"split": split, **res, "checkpoint_step": m["step"], "epoch": m["epoch"]}

"""Training and evaluation of sequential recommenders (`tierec train --model sasrec`).

One epoch = every user with at least two training items once, in an order drawn from (seed, epoch),
batches of `SequenceBatches` (inputs, positives, one sampled negative per position). Dense
parameters: Adam (betas 0.9, 0.98, as SASRec.pytorch); the item table: tierec's fused sparse
(lazy) Adam with the same learning rate and betas. After each epoch (``eval_every``: every N
epochs) HR@10 / NDCG@10 on the validation split, at the end on both; a
checkpoint (atomic, `tierec.train.checkpoint`) at the end of every epoch; ``--resume`` continues
from the newest one at its epoch boundary, exactly (the data order and negatives of an epoch depend
on (seed, epoch) only). Records go to ``OUT/metrics.jsonl``.

Evaluation (`evaluate_sequences`): per evaluated user, the target and `NUM_EVAL_NEGATIVES` sampled
negatives (fixed seed) are scored; rank = number of negatives scoring >= the target (ties count
against the model); HR@10 = mean(rank < 10), NDCG@10 = mean(1 / log2(rank + 2) if rank < 10 else 0).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tierec.data.sequences import SequenceBatches, SequenceData, load_sequences
from tierec.errors import CheckpointError, ConfigError
from tierec.modules.optim import SparseOptimizer
from tierec.modules.sasrec import SASRec
from tierec.train import checkpoint as ckpt
from tierec.train.config import TrainConfig

log = logging.getLogger(__name__)

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


def build_sasrec(cfg: TrainConfig, num_items: int, storage_factory=None, device="cpu") -> SASRec:
    return SASRec(num_items, cfg.embedding_dim, cfg.max_len, cfg.num_blocks, cfg.num_heads, cfg.attn_dropout,
                  cfg.pre_ln, SparseOptimizer("adam", cfg.lr, beta2=0.98), cfg.seed, storage_factory, device)


def dense_optimizer(model: SASRec, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.98))


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
    only the first users of the data set (tests, quick runs)."""
    if storage_factory is None and (cfg.memory_budget is not None or cfg.table_kind != "fixed"):
        raise ConfigError("--model sasrec keeps its item table in memory from the CLI for now: --memory-budget and "
                          "--table-kind dynamic are not supported with it")
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


def _train(cfg: TrainConfig, resume: bool, overwrite: bool, storage_factory, max_users: int | None) -> dict:
    from tierec.train.rundir import claim_run_dir
    from tierec.train.trainer import JsonlLog

    data = load_sequences(cfg.data, max_users=max_users)
    out = Path(cfg.out)
    lock = claim_run_dir(out, resume, overwrite)
    metrics = JsonlLog(out / "metrics.jsonl")
    try:
        dev = _device(cfg.device)
        torch.manual_seed(cfg.seed)
        model = build_sasrec(cfg, data.num_items, storage_factory, dev)
        opt = dense_optimizer(model, cfg.lr)
        batches = SequenceBatches(data, cfg.max_len, cfg.batch_size)
        start_epoch, step = 0, 0
        latest = ckpt.latest_or_none(out) if resume else None
        if latest is not None:
            m = ckpt.read_manifest(latest)
            if m["config"].get("model") != "sasrec":
                raise CheckpointError(f"{latest}: not a sasrec checkpoint")
            state = ckpt.load_dense_state(latest, m)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            ckpt.load_tables(latest, m, {"item": model.table.storage})
            start_epoch, step = int(m["epoch"]), int(m["step"])
            if "rng" in state:
                torch.set_rng_state(state["rng"])
            log.info("resumed from %s (epoch %d, step %d)", latest, start_epoch, step)
        metrics.write("start", config=cfg.to_dict(), users=data.num_users, train_users=len(batches.users),
                      eval_users=len(data.eval_users), num_items=data.num_items, steps_per_epoch=len(batches))
        model.train()
        every = cfg.eval_every or 1
        last: dict = {}
        t_train = 0.0
        epochs_run = 0
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            total, n = 0.0, 0
            bar = tqdm(batches.epoch(cfg.seed, epoch, cfg.shuffle), total=len(batches), desc=f"epoch {epoch + 1}",
                       unit="step", disable=not cfg.progress, dynamic_ncols=True, leave=False)
            for inputs, pos, neg in bar:
                loss = model.loss(torch.from_numpy(inputs).to(dev), torch.from_numpy(pos).to(dev),
                                  torch.from_numpy(neg).to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise ConfigError(f"loss became {lv} at step {step} (learning rate too high?)")
                total, n = total + lv, n + 1
                if step % cfg.log_every == 0:
                    metrics.write("train", step=step, epoch=epoch + 1, loss=lv)
                    bar.set_postfix(loss=f"{total / n:.4f}")
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
            bar.close()
            dt = time.perf_counter() - t0
            t_train += dt
            epochs_run += 1
            rec: dict = {"epoch": epoch + 1, "step": step, "loss": total / max(n, 1), "epoch_s": round(dt, 3)}
            if (epoch + 1) % every == 0 or epoch + 1 == cfg.epochs:
                t1 = time.perf_counter()
                rec["valid"] = evaluate_sequences(model, data, "valid", cfg.eval_batch_size)
                rec["eval_s"] = round(time.perf_counter() - t1, 3)
            metrics.write("epoch", **rec)
            log.info("epoch %d: loss %.4f, %.1f s%s", epoch + 1, rec["loss"], dt,
                     f", valid HR@10 {rec['valid']['hr@10']:.4f} NDCG@10 {rec['valid']['ndcg@10']:.4f}"
                     if "valid" in rec else "")
            _save(model, opt, cfg, data, out, step, epoch + 1)
            last = rec
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        summary = {"epochs": (last.get("epoch") if last else start_epoch), "steps": step,
                   "epoch_s_mean": round(t_train / max(epochs_run, 1), 3),
                   "valid": evaluate_sequences(model, data, "valid", cfg.eval_batch_size),
                   "test": evaluate_sequences(model, data, "test", cfg.eval_batch_size)}
        metrics.write("final", **summary)
        return summary
    finally:
        metrics.close()
        lock.close()


def _save(model: SASRec, opt: torch.optim.Optimizer, cfg: TrainConfig, data: SequenceData, out: Path, step: int,
          epoch: int) -> Path:
    cfg_d = cfg.to_dict()
    cfg_d["data"] = str(Path(cfg.data).resolve())
    dense = {"model": {k: v for k, v in model.state_dict().items()}, "optim": opt.state_dict(),
             "rng": torch.get_rng_state()}
    meta = {"config": cfg_d, "schema": _schema(data), "epoch": epoch, "batch_in_epoch": 0,
            "samples": 0}
    return ckpt.save_checkpoint(out, step, dense, {"item": model.table.storage}, meta, keep=cfg.keep_checkpoints)


def is_sasrec_checkpoint(path: str) -> bool:
    try:
        m = ckpt.read_manifest(ckpt.resolve_checkpoint(path))
    except Exception:
        return False
    return isinstance(m.get("config"), dict) and m["config"].get("model") == "sasrec"


def load_sasrec(path: str, data: str | None = None, device: str = "auto") -> tuple[SASRec, SequenceData, dict]:
    """A sasrec checkpoint's model (eval mode) and its data set (``data`` overrides the saved path)."""
    p = ckpt.resolve_checkpoint(path)
    m = ckpt.read_manifest(p)
    cfg_d = dict(m["config"])
    cfg_d["data"] = data or cfg_d["data"]
    try:
        cfg = TrainConfig(**cfg_d)
    except TypeError as e:
        raise CheckpointError(f"{p}/manifest.json: its config does not fit this tierec ({e})") from None
    ds = load_sequences(cfg.data)
    if ds.num_items != m["schema"].get("num_items"):
        raise ConfigError(f"{cfg.data}: {ds.num_items} items, but checkpoint {p} was trained on "
                          f"{m['schema'].get('num_items')}")
    model = build_sasrec(cfg, ds.num_items, device=_device(device))
    state = ckpt.load_dense_state(p, m)
    model.load_state_dict(state["model"])
    ckpt.load_tables(p, m, {"item": model.table.storage})
    model.eval()
    return model, ds, m


def eval_checkpoint(path: str, data: str | None = None, split: str = "test", device: str = "auto") -> dict:
    model, ds, m = load_sasrec(path, data, device)
    res = evaluate_sequences(model, ds, split)
    return {"split": split, **res, "checkpoint_step": m["step"], "epoch": m["epoch"]}

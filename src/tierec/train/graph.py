"""Training and evaluation of LightGCN (`tierec train --model lightgcn`) on a sequence data set's graph.

Data: the distinct (user, item) pairs of a sequence data set, split per user into training and test
pairs by `tierec.data.graph.split_interactions` (seeded by ``--seed``, ``--test-ratio`` of each user's
items held out). One epoch = every training pair once as a BPR triple with one sampled negative
(`BprBatches`, order and negatives from (seed, epoch)). The user and item tables train with tierec's
fused sparse (lazy) Adam at ``--lr`` (betas 0.9, 0.999); the model has no dense parameters.
``--memory-budget`` puts both tables in SSD files (``--storage-dir``, default OUT/tables) behind LRU
caches that share the budget by rows; without it they stay in memory.

Evaluation (`topk_metrics`, the LightGCN protocol): every user with a test item ranks ALL items by
<e_u, e_i> (final embeddings of full-graph propagation), its training items excluded; Recall@20 =
|top 20 ∩ test items| / |test items|, NDCG@20 = DCG of the hits / the DCG of min(|test items|, 20) hits
at the top, averaged over those users. After each epoch (``--eval-every``: every N epochs) and at
the end; a checkpoint at the end of every epoch (``--resume``: exact, from the newest one's epoch).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tierec.config import parse_bytes
from tierec.data.graph import BprBatches, GraphSplit, split_interactions
from tierec.data.sequences import SequenceData, load_sequences
from tierec.errors import CheckpointError, ConfigError
from tierec.modules.lightgcn import InteractionGraph, LightGCN
from tierec.modules.optim import SparseOptimizer
from tierec.train import checkpoint as ckpt
from tierec.train.config import TrainConfig

log = logging.getLogger(__name__)

TOP_K = 20
MAX_SCORES = 1 << 24  # scores of one evaluation chunk (64 MiB of float32, plus 16 MiB of test flags)


@torch.no_grad()
def topk_metrics(user_emb: torch.Tensor, item_emb: torch.Tensor, split: GraphSplit, k: int = TOP_K,
                 batch_size: int = 1024) -> dict:
    """``{"recall@k", "ndcg@k", "users"}`` of final embeddings ``user_emb`` [U, D], ``item_emb`` [I, D] on
    ``split``'s test pairs, ranking all items with each user's training items excluded (module doc). Users
    are scored ``batch_size`` at a time, at most `MAX_SCORES` scores at once."""
    users = split.test_user_ids
    batch_size = max(1, min(batch_size, MAX_SCORES // max(split.num_items, 1)))
    k = min(k, split.num_items)
    disc = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    ideal = torch.cumsum(disc, 0)
    recall_sum = ndcg_sum = 0.0
    item_emb = item_emb.to(torch.float32)
    for s in range(0, len(users), batch_size):
        batch = users[s:s + batch_size]
        scores = user_emb[torch.from_numpy(batch).to(user_emb.device)].to(torch.float32) @ item_emb.T  # [b, I]
        tr_lo, tr_hi = split.train_offsets[batch], split.train_offsets[batch + 1]
        rows = np.repeat(np.arange(len(batch)), tr_hi - tr_lo)
        cols = split.train_items[_ranges(tr_lo, tr_hi)]
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -math.inf
        top = torch.topk(scores, k, dim=1).indices.cpu()  # [b, k]
        te_lo, te_hi = split.test_offsets[batch], split.test_offsets[batch + 1]
        truth = torch.zeros(len(batch), split.num_items, dtype=torch.bool)
        truth[torch.from_numpy(np.repeat(np.arange(len(batch)), te_hi - te_lo)),
              torch.from_numpy(split.test_items[_ranges(te_lo, te_hi)])] = True
        hits = truth.gather(1, top).to(torch.float64)  # [b, k]
        n_test = torch.from_numpy(te_hi - te_lo).to(torch.float64)
        recall_sum += float((hits.sum(1) / n_test).sum())
        ndcg_sum += float(((hits * disc).sum(1) / ideal[(n_test.clamp(max=k) - 1).long()]).sum())
    n = len(users)
    return {f"recall@{k}": recall_sum / max(n, 1), f"ndcg@{k}": ndcg_sum / max(n, 1), "users": int(n)}


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The concatenation of arange(lo[r], hi[r]) over r, vectorised."""
    cnt = hi - lo
    total = int(cnt.sum())
    starts = np.cumsum(cnt) - cnt
    return np.repeat(lo - starts, cnt) + np.arange(total, dtype=np.int64)


def evaluate_graph(model: LightGCN, split: GraphSplit, batch_size: int = 1024) -> dict:
    """Recall@20 / NDCG@20 of ``model`` on ``split``'s test pairs (`topk_metrics`)."""
    users, items = model.final_embeddings()
    return topk_metrics(users, items, split, TOP_K, batch_size)


def graph_of(split: GraphSplit, device="cpu") -> InteractionGraph:
    return InteractionGraph(split.num_users, split.num_items, split.train_users, split.train_items, device)


def build_lightgcn(cfg: TrainConfig, split: GraphSplit, storage_factory=None, device="cpu") -> LightGCN:
    return LightGCN(graph_of(split, device), cfg.embedding_dim, cfg.num_layers, cfg.l2_reg,
                    SparseOptimizer("adam", cfg.lr), cfg.seed, storage_factory, device, cfg.propagation)


def ssd_storage_factory(cfg: TrainConfig, split: GraphSplit, root: Path):
    """Both tables in SSD files under ``root`` behind LRU caches sharing ``cfg.memory_budget`` by rows."""
    from tierec.storage.cache import CachedTable
    from tierec.storage.lazy import RowInit
    from tierec.storage.ssd import SsdTable

    assert cfg.memory_budget is not None
    budget = parse_bytes(cfg.memory_budget, "memory_budget")
    total_rows = split.num_users + split.num_items
    root.mkdir(parents=True, exist_ok=True)

    def factory(i, tcfg, state_dim):
        row_bytes = 4 * (tcfg.embedding_dim + state_dim)
        cache_rows = max(1, budget * tcfg.num_embeddings // total_rows // row_bytes)
        init = RowInit(cfg.seed, i, tcfg.num_embeddings, tcfg.embedding_dim)
        ssd = SsdTable(root / f"{tcfg.name}.tbl", tcfg.num_embeddings, tcfg.embedding_dim, state_dim, create=True,
                       init_seed=cfg.seed, table_index=i, init="lazy", lazy_init=init, direct_io=cfg.direct_io)
        return CachedTable(ssd, cache_rows, "lru", name=tcfg.name)

    return factory


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _schema(data: SequenceData, split: GraphSplit) -> dict:
    m = data.manifest
    return {"kind": "graph", "num_items": split.num_items, "num_users": split.num_users,
            "npz_sha256": (m.get("files") or {}).get("sequences.npz", {}).get("sha256"), **split.summary()}


def train_lightgcn(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, storage_factory=None) -> dict:
    """Train LightGCN on sequence data set ``cfg.data``'s graph; returns the summary (also the last record)."""
    if cfg.table_kind != "fixed":
        raise ConfigError("--model lightgcn addresses its tables by user and item row: --table-kind dynamic is not "
                          "supported with it")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    from tierec.train.rundir import claim_run_dir
    from tierec.train.trainer import JsonlLog

    data = load_sequences(cfg.data)
    split = split_interactions(data, cfg.test_ratio, cfg.seed)
    out = Path(cfg.out)
    lock = claim_run_dir(out, resume, overwrite)
    metrics = JsonlLog(out / "metrics.jsonl")
    model, own_storage = None, storage_factory is None and cfg.memory_budget is not None
    try:
        dev = _device(cfg.device)
        if own_storage:
            storage_factory = ssd_storage_factory(cfg, split, cfg.storage_settings().root)
        model = build_lightgcn(cfg, split, storage_factory, dev)
        batches = BprBatches(split, cfg.batch_size)
        start_epoch, step = 0, 0
        latest = ckpt.latest_or_none(out) if resume else None
        if latest is not None:
            m = ckpt.read_manifest(latest)
            if m["config"].get("model") != "lightgcn":
                raise CheckpointError(f"{latest}: not a lightgcn checkpoint")
            state = ckpt.load_dense_state(latest, m)
            model.load_state_dict(state["model"])
            ckpt.load_tables(latest, m, {n: t.storage for n, t in model.tables.items()})
            start_epoch, step = int(m["epoch"]), int(m["step"])
            log.info("resumed from %s (epoch %d, step %d)", latest, start_epoch, step)
        metrics.write("start", config=cfg.to_dict(), **split.summary(), graph_edges=model.graph.num_edges,
                      steps_per_epoch=len(batches))
        model.train()
        every = cfg.eval_every or 1
        last: dict = {}
        t_train, epochs_run = 0.0, 0
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            total, n, rows = 0.0, 0, 0
            bar = tqdm(batches.epoch(cfg.seed, epoch, cfg.shuffle), total=len(batches), desc=f"epoch {epoch + 1}",
                       unit="step", disable=not cfg.progress, dynamic_ncols=True, leave=False)
            for users, pos, neg in bar:
                loss = model.loss(torch.from_numpy(users).to(dev), torch.from_numpy(pos).to(dev),
                                  torch.from_numpy(neg).to(dev))
                loss.backward()  # the tables' fused optimizer updates their rows here
                step += 1
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise ConfigError(f"loss became {lv} at step {step} (learning rate too high?)")
                total, n, rows = total + lv, n + 1, rows + model.last_rows
                if step % cfg.log_every == 0:
                    metrics.write("train", step=step, epoch=epoch + 1, loss=lv, rows_looked_up=model.last_rows)
                    bar.set_postfix(loss=f"{total / n:.4f}")
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
            bar.close()
            dt = time.perf_counter() - t0
            t_train += dt
            epochs_run += 1
            rec: dict = {"epoch": epoch + 1, "step": step, "loss": total / max(n, 1), "epoch_s": round(dt, 3),
                         "rows_per_step": round(rows / max(n, 1), 1)}
            if (epoch + 1) % every == 0 or epoch + 1 == cfg.epochs:
                t1 = time.perf_counter()
                rec["test"] = evaluate_graph(model, split, cfg.eval_batch_size)
                rec["eval_s"] = round(time.perf_counter() - t1, 3)
            metrics.write("epoch", **rec)
            log.info("epoch %d: loss %.4f, %.1f s%s", epoch + 1, rec["loss"], dt,
                     f", test Recall@20 {rec['test']['recall@20']:.4f} NDCG@20 {rec['test']['ndcg@20']:.4f}"
                     if "test" in rec else "")
            _save(model, cfg, data, split, out, step, epoch + 1)
            last = rec
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        summary = {"epochs": (last.get("epoch") if last else start_epoch), "steps": step,
                   "epoch_s_mean": round(t_train / max(epochs_run, 1), 3),
                   "test": last["test"] if "test" in last else evaluate_graph(model, split, cfg.eval_batch_size)}
        metrics.write("final", **summary)
        return summary
    finally:
        metrics.close()
        lock.close()
        if model is not None and own_storage:  # the SSD files this run made: dirty rows written, files closed
            for t in model.tables.values():
                close = getattr(t.storage, "close", None)
                if close is not None:
                    close()


def _save(model: LightGCN, cfg: TrainConfig, data: SequenceData, split: GraphSplit, out: Path, step: int,
          epoch: int) -> Path:
    cfg_d = cfg.to_dict()
    cfg_d["data"] = str(Path(cfg.data).resolve())
    dense = {"model": dict(model.state_dict())}
    meta = {"config": cfg_d, "schema": _schema(data, split), "epoch": epoch, "batch_in_epoch": 0, "samples": 0}
    return ckpt.save_checkpoint(out, step, dense, {n: t.storage for n, t in model.tables.items()}, meta,
                                keep=cfg.keep_checkpoints)


def is_lightgcn_checkpoint(path: str) -> bool:
    try:
        m = ckpt.read_manifest(ckpt.resolve_checkpoint(path))
    except Exception:
        return False
    return isinstance(m.get("config"), dict) and m["config"].get("model") == "lightgcn"


def load_lightgcn(path: str, data: str | None = None, device: str = "auto") -> tuple[LightGCN, GraphSplit, dict]:
    """A lightgcn checkpoint's model (tables in memory, eval mode) and its split (``data`` overrides the saved
    data set; the split is remade from the saved seed and test ratio and must match the saved counts)."""
    p = ckpt.resolve_checkpoint(path)
    m = ckpt.read_manifest(p)
    cfg_d = dict(m["config"])
    cfg_d["data"] = data or cfg_d["data"]
    cfg_d["memory_budget"] = None
    try:
        cfg = TrainConfig(**cfg_d)
    except TypeError as e:
        raise CheckpointError(f"{p}/manifest.json: its config does not fit this tierec ({e})") from None
    split = split_interactions(load_sequences(cfg.data), cfg.test_ratio, cfg.seed)
    saved = m.get("schema") or {}
    for key, now in split.summary().items():
        if key in saved and saved[key] != now:
            raise ConfigError(f"{cfg.data}: its split has {key} {now}, but checkpoint {p} was trained on "
                              f"{saved[key]}")
    model = build_lightgcn(cfg, split, device=_device(device))
    state = ckpt.load_dense_state(p, m)
    model.load_state_dict(state["model"])
    ckpt.load_tables(p, m, {n: t.storage for n, t in model.tables.items()})
    model.eval()
    return model, split, m


def eval_checkpoint(path: str, data: str | None = None, device: str = "auto", batch_size: int = 8192) -> dict:
    model, split, m = load_lightgcn(path, data, device)
    res = evaluate_graph(model, split, batch_size)
    return {"split": "test", **res, "checkpoint_step": m["step"], "epoch": m["epoch"]}

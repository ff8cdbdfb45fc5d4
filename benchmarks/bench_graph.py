"""LightGCN on amazon_video.txt: tierec vs PyTorch Geometric, and tierec's tables on SSD vs in memory.

One run, three trainings side by side (in lock-step: one step of each in turn, so that a load change
on the shared machine hits all of them alike; speeds are ratios over the same steps), on the same
split (`tierec.data.graph.split_interactions`: a seeded random 20% of each user's distinct items held
out) and the same BPR triples (`BprBatches`, one sampled negative per training pair, order and
negatives from (seed, epoch)):

1. tierec `LightGCN` (user and item tables in memory, fused lazy Adam, ``--propagation``)
2. PyG ``torch_geometric.nn.models.LightGCN`` (one node embedding, dense ``torch.optim.Adam``), started
   from tierec's initial rows (so both begin from the same weights), propagating over PyG's
   ``torch.sparse`` CSR adjacency (its fast path; ``--pyg-edge-index``: the ``edge_index`` message-passing
   path instead, ~7x slower here), loss = PyG's ``BPRLoss`` with the same regulariser (``lambda_reg =
   l2_reg / 2`` over the triples' layer-0 rows)
3. tierec with both tables in SSD files behind LRU caches of ``--cache-share`` (10%) of each table's
   rows, for ``--ssd-epochs``: its losses must equal run 1's bit for bit; speed ratio over the same steps

Same hyper-parameters for both peers: dim 64, 3 layers, Adam lr 1e-3 (betas 0.9, 0.999), batch 2048
triples, l2_reg 1e-4, ``--epochs``. Recall@20 / NDCG@20: all items ranked, the user's training items
excluded (`tierec.train.graph.topk_metrics`, the same code for both peers). Both peers run with
``torch.set_num_threads(--threads)`` (default 1: the machine is shared) and subnormals flushed.
PyG is optional (``make pyg``); without it the peer is skipped with a message.

    .venv/bin/python benchmarks/bench_graph.py [--quick] [--epochs 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import torch

from tierec.data.graph import BprBatches, GraphSplit, split_interactions
from tierec.data.sequences import convert_sequences, load_sequences
from tierec.modules.lightgcn import LightGCN
from tierec.modules.optim import SparseOptimizer
from tierec.train.graph import graph_of, topk_metrics

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def _batches(split: GraphSplit, args, epoch: int):
    for s, (u, p, n) in enumerate(BprBatches(split, args.batch_size).epoch(args.seed, epoch)):
        if args.max_steps is not None and s >= args.max_steps:
            return
        yield torch.from_numpy(u), torch.from_numpy(p), torch.from_numpy(n)


class _Tierec:
    """tierec's LightGCN, one training step at a time."""

    def __init__(self, split: GraphSplit, args, storage_factory=None):
        self.model = LightGCN(graph_of(split), args.dim, args.layers, args.l2_reg, SparseOptimizer("adam", args.lr),
                              args.seed, storage_factory, propagation=args.propagation)
        self.rows: list[int] = []

    def step(self, u: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> float:
        loss = self.model.loss(u, p, n)
        loss.backward()  # the tables' fused Adam updates the rows here
        self.rows.append(self.model.last_rows)
        return loss.item()

    def final(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.final_embeddings()


class _Pyg:
    """PyG's LightGCN (module doc), one training step at a time."""

    def __init__(self, split: GraphSplit, args, init: torch.Tensor):
        from torch_geometric.nn.models import LightGCN as PygLightGCN
        from torch_geometric.nn.models.lightgcn import BPRLoss
        from torch_geometric.utils import to_torch_csr_tensor

        self.U = U = split.num_users
        u, i = torch.from_numpy(split.train_users), torch.from_numpy(split.train_items) + U
        edge_index = torch.stack([torch.cat([u, i]), torch.cat([i, u])])
        n = U + split.num_items
        self.adj = edge_index if args.pyg_edge_index else to_torch_csr_tensor(edge_index, size=(n, n))
        self.model = PygLightGCN(n, args.dim, args.layers)
        with torch.no_grad():
            self.model.embedding.weight.copy_(init)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.loss_fn = BPRLoss(lambda_reg=args.l2_reg / 2)

    def step(self, u: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> float:
        p, n = p + self.U, n + self.U
        pos, neg = self.model(self.adj, torch.stack([torch.cat([u, u]), torch.cat([p, n])])).chunk(2)
        w = self.model.embedding.weight
        loss = self.loss_fn(pos, neg, torch.cat([w[u], w[p], w[n]]))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    @torch.no_grad()
    def final(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.get_embedding(self.adj)
        return out[:self.U], out[self.U:]


def _train_side_by_side(split: GraphSplit, args, runs: dict, epochs: dict) -> dict:
    """Every run steps through the same batches in lock-step (one step of each in turn), so that a load
    change on the shared machine hits them all alike; ``epochs[name]``: epochs that run takes part in."""
    log: dict = {name: {"losses": [], "step_s": [], "samples": 0} for name in runs}
    for e in range(max(epochs.values())):
        active = [name for name in runs if e < epochs[name]]
        first = {name: len(log[name]["losses"]) for name in active}
        for u, p, n in _batches(split, args, e):
            for name in active:
                t0 = time.perf_counter()
                loss = runs[name].step(u, p, n)
                log[name]["step_s"].append(time.perf_counter() - t0)
                log[name]["losses"].append(loss)
                log[name]["samples"] += len(u)
        print(f"  epoch {e + 1}: " + "; ".join(
            f"{name} loss {np.mean(log[name]['losses'][first[name]:]):.4f} ({sum(log[name]['step_s']):.0f} s)"
            for name in active), flush=True)
    return log


def _ssd_factory(root: Path, share: float, seed: int, direct_io: bool):
    from tierec.storage.cache import CachedTable
    from tierec.storage.lazy import RowInit
    from tierec.storage.ssd import SsdTable

    def factory(i, cfg, state_dim):
        ssd = SsdTable(root / f"{cfg.name}.tbl", cfg.num_embeddings, cfg.embedding_dim, state_dim, create=True,
                       init_seed=seed, table_index=i, init="lazy", direct_io=direct_io,
                       lazy_init=RowInit(seed, i, cfg.num_embeddings, cfg.embedding_dim))
        return CachedTable(ssd, max(1, int(share * cfg.num_embeddings)), "lru", name=cfg.name)

    return factory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "seq" / "amazon_video.txt"))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--max-steps", type=int, default=None, help="steps per epoch (default: all)")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--l2-reg", type=float, default=1e-4)
    ap.add_argument("--test-ratio", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--propagation", choices=["khop", "full"], default="khop")
    ap.add_argument("--cache-share", type=float, default=0.10, help="SSD run: cache rows / table rows")
    ap.add_argument("--ssd-epochs", type=int, default=1)
    ap.add_argument("--direct-io", action="store_true", help="SSD run: O_DIRECT reads (default: the OS page cache)")
    ap.add_argument("--pyg-edge-index", action="store_true", help="PyG: message passing over edge_index")
    ap.add_argument("--no-pyg", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="1 epoch of 15 steps each (a smoke run, not figures)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.max_steps, args.ssd_epochs = 1, 15, 1
    args.ssd_epochs = min(args.ssd_epochs, args.epochs)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        convert_sequences(args.data, Path(tmp) / "ds")
        ds = load_sequences(Path(tmp) / "ds")
    split = split_interactions(ds, args.test_ratio, args.seed)
    n_rows = split.num_users + split.num_items
    print(f"{split.num_users:,} users, {split.num_items:,} items; {len(split.train_users):,} training pairs, "
          f"{len(split.test_users):,} test pairs ({len(split.test_user_ids):,} users); "
          f"{len(BprBatches(split, args.batch_size))} steps/epoch of {args.batch_size}; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    res: dict = {"date": date.today().isoformat(), "machine": platform.machine(), "threads": args.threads,
                 "torch": torch.__version__, "config": {k: v for k, v in vars(args).items() if k != "json"},
                 "split": split.summary()}

    try:
        import torch_geometric

        have_pyg = not args.no_pyg
        if args.no_pyg:
            res["pyg"] = {"skipped": "--no-pyg"}
    except ImportError as e:
        have_pyg = False
        print(f"PyG peer skipped: torch_geometric is not importable ({e}); `make pyg` installs it", flush=True)
        res["pyg"] = {"skipped": f"torch_geometric not importable: {e}"}
    tmp_root = ROOT / "runs" if (ROOT / "runs").is_dir() else None
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        runs: dict = {"tierec": _Tierec(split, args)}
        epochs = {"tierec": args.epochs}
        if have_pyg:
            with torch.no_grad():
                init = _Tierec(split, args).model.lookup(torch.arange(n_rows))  # tierec's initial rows
            runs["pyg"], epochs["pyg"] = _Pyg(split, args, init), args.epochs
        runs["tierec-ssd"] = _Tierec(split, args, _ssd_factory(Path(tmp), args.cache_share, args.seed, args.direct_io))
        epochs["tierec-ssd"] = args.ssd_epochs
        print(f"side by side: {', '.join(f'{k} ({v} epochs)' for k, v in epochs.items())}; tierec-ssd: both tables "
              f"in SSD files behind LRU caches of {args.cache_share:.0%} of their rows", flush=True)
        log = _train_side_by_side(split, args, runs, epochs)
        ssd_model = runs["tierec-ssd"].model
        stats = {n: t.storage.stats() for n, t in ssd_model.tables.items()}
        for t in ssd_model.tables.values():
            t.storage.close()  # type: ignore[attr-defined]

    degree = torch.from_numpy(np.bincount(split.train_items, minlength=split.num_items).astype(np.float32))
    res["popularity"] = topk_metrics(torch.ones(split.num_users, 1), degree[:, None], split)  # score = training degree
    mem, t0 = log["tierec"], time.perf_counter()
    tierec_metrics = topk_metrics(*runs["tierec"].final(), split)
    rows = float(np.mean(runs["tierec"].rows))
    res["tierec"] = {**tierec_metrics, "train_s": round(sum(mem["step_s"]), 1),
                     "samples_per_s": round(mem["samples"] / sum(mem["step_s"]), 1), "steps": len(mem["step_s"]),
                     "rows_per_step": round(rows, 1), "rows_share": round(rows / n_rows, 4),
                     "final_loss": float(np.mean(mem["losses"][-20:])), "eval_s": round(time.perf_counter() - t0, 1)}
    if have_pyg:
        peer = log["pyg"]
        pyg_metrics = topk_metrics(*runs["pyg"].final(), split)
        res["pyg"] = {**pyg_metrics, "version": torch_geometric.__version__,
                      "adjacency": "edge_index" if args.pyg_edge_index else "torch.sparse csr",
                      "train_s": round(sum(peer["step_s"]), 1),
                      "samples_per_s": round(peer["samples"] / sum(peer["step_s"]), 1),
                      "final_loss": float(np.mean(peer["losses"][-20:])),
                      "max_loss_diff_vs_tierec": float(np.max(np.abs(np.subtract(peer["losses"], mem["losses"]))))}
        res["diff"] = {"recall@20": tierec_metrics["recall@20"] - pyg_metrics["recall@20"],
                       "ndcg@20": tierec_metrics["ndcg@20"] - pyg_metrics["ndcg@20"],
                       "within_0.005": abs(tierec_metrics["recall@20"] - pyg_metrics["recall@20"]) <= 0.005,
                       "speed_tierec_over_pyg": round(sum(peer["step_s"]) / sum(mem["step_s"]), 3)}
    ssd = log["tierec-ssd"]
    k = len(ssd["losses"])
    mem_s, ssd_s = sum(mem["step_s"][:k]), sum(ssd["step_s"])
    res["ssd"] = {"cache_share": args.cache_share, "steps": k, "direct_io": args.direct_io,
                  "losses_equal_memory": ssd["losses"] == mem["losses"][:k],
                  "samples_per_s": round(ssd["samples"] / ssd_s, 1), "memory_s": round(mem_s, 2),
                  "ssd_s": round(ssd_s, 2), "speed_ratio_ssd_over_memory": round(mem_s / ssd_s, 3),
                  "cache_stats": {n: {k2: v for k2, v in s.items() if isinstance(v, int | float)}
                                  for n, s in stats.items()}}
    res["total_s"] = round(time.perf_counter() - t_all, 1)

    print()
    print(f"{'run':34s} {'Recall@20':>10s} {'NDCG@20':>10s} {'samples/s':>10s} {'train s':>8s}")
    print(f"{'tierec (memory)':34s} {res['tierec']['recall@20']:10.4f} {res['tierec']['ndcg@20']:10.4f} "
          f"{res['tierec']['samples_per_s']:10.0f} {res['tierec']['train_s']:8.1f}")
    print(f"{'popularity (training degree)':34s} {res['popularity']['recall@20']:10.4f} "
          f"{res['popularity']['ndcg@20']:10.4f}")
    if "recall@20" in res.get("pyg", {}):
        print(f"{'PyG LightGCN':34s} {res['pyg']['recall@20']:10.4f} {res['pyg']['ndcg@20']:10.4f} "
              f"{res['pyg']['samples_per_s']:10.0f} {res['pyg']['train_s']:8.1f}")
        print(f"{'diff tierec - PyG':34s} {res['diff']['recall@20']:+10.4f} {res['diff']['ndcg@20']:+10.4f}   "
              f"(|Recall diff| <= 0.005: {res['diff']['within_0.005']}; tierec/PyG speed "
              f"{res['diff']['speed_tierec_over_pyg']:.2f}x)")
    s = res["ssd"]
    print(f"{'tierec SSD, cache ' + format(args.cache_share, '.0%') + ' of rows':34s} {'':>10s} {'':>10s} "
          f"{s['samples_per_s']:10.0f} {s['ssd_s']:8.1f}   (speed vs memory over the same {s['steps']} steps: "
          f"{s['speed_ratio_ssd_over_memory']:.3f}; losses bit-identical: {s['losses_equal_memory']})")
    print(f"rows looked up per step: {res['tierec']['rows_per_step']:.0f} of {n_rows} "
          f"({res['tierec']['rows_share']:.1%}); total {res['total_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

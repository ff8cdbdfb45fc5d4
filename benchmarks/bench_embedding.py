"""Train the same DLRM with three embedding implementations, side by side in one run.

    python benchmarks/bench_embedding.py                 # 8 tables x 1,000,000 rows x 64 dims, batch 4096
    python benchmarks/bench_embedding.py --rows 100000 --rounds 2   # quicker

Peers (each in its own worker process, so peak memory is per peer; rounds alternate
between them so that machine noise hits all three alike):

- tierec:   tierec's in-memory tables, fused row-wise Adagrad in backward;
- torchrec: TorchRec 1.8's FusedEmbeddingBagCollection (FBGEMM TBE, EXACT_ROWWISE_ADAGRAD)
            (optional: `make torchrec`; skipped with a note when not installed);
- torch:    plain torch.nn.EmbeddingBag(sparse=True) + torch.optim.Adagrad on sparse gradients.

All three share the dense part (bottom MLP 13-512-256-64, dot interaction, top MLP
512-256-1, Adam) and see the same Zipf-skewed batches. Prints samples/s (median
of rounds), peak RSS per worker, and the ratios to TorchRec.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0] + "/src")

from tierec.modules.dlrm import DLRM, DotInteraction, mlp  # noqa: E402
from tierec.modules.embedding import TableConfig, build_collection  # noqa: E402
from tierec.modules.optim import SparseOptimizer  # noqa: E402
from tierec.sparse import KeyedJaggedTensor  # noqa: E402

try:
    from tierec.energy import meter as energy_meter
except ImportError:  # energy metering is optional in this script
    energy_meter = None


def zipf_batches(n_batches, batch, tables, rows, alpha, seed, num_dense=13):
    """Deterministic Zipf(alpha) single-hot batches; hot rows scattered over the table."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, rows + 1, dtype=np.float64)
    cdf = np.cumsum(ranks ** -alpha)
    cdf /= cdf[-1]
    keys = [f"t{i}" for i in range(tables)]
    out = []
    for _ in range(n_batches):
        r = np.searchsorted(cdf, rng.random((tables, batch)))
        ids = (r * 2654435761 + np.arange(tables)[:, None] * 97) % rows  # scatter hot rows
        kjt = KeyedJaggedTensor(keys, torch.from_numpy(ids.reshape(-1).astype(np.int64)),
                                torch.ones(tables * batch, dtype=torch.int64))
        dense = torch.from_numpy(rng.random((batch, num_dense), dtype=np.float32))
        labels = torch.from_numpy((rng.random(batch) < 0.25).astype(np.float32))
        out.append((dense, kjt, labels))
    return out


class _PooledHead(torch.nn.Module):
    """DLRM's dense part over any embedding module returning [B, T, D]."""

    def __init__(self, emb, tables, dim, num_dense=13):
        super().__init__()
        self.emb = emb
        self.bottom = mlp([num_dense, 512, 256, dim], last_activation=True)
        self.interaction = DotInteraction(tables + 1)
        self.top = mlp([dim + (tables + 1) * tables // 2, 512, 256, 1], last_activation=False)

    def forward(self, dense, kjt):
        x = self.bottom(dense)
        z = torch.cat([x.unsqueeze(1), self.emb(kjt)], 1)
        return self.top(torch.cat([x, self.interaction(z)], 1)).squeeze(1)


class _TorchBags(torch.nn.Module):
    def __init__(self, tables, rows, dim):
        super().__init__()
        self.bags = torch.nn.ModuleList(torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True) for _ in range(tables))

    def forward(self, kjt):
        return torch.stack([bag(jt.values, jt.offsets()[:-1]) for bag, jt in zip(self.bags, kjt.split_by_key())], 1)


class _TorchRecBags(torch.nn.Module):
    def __init__(self, tables, rows, dim, lr):
        super().__init__()
        import torchrec.optim as trec_optim
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

        cfgs = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows, feature_names=[f"t{i}"])
                for i in range(tables)]
        self.ebc = FusedEmbeddingBagCollection(tables=cfgs, optimizer_type=trec_optim.RowWiseAdagrad,
                                               optimizer_kwargs={"lr": lr, "eps": 1e-8})
        self.tables, self.dim = tables, dim

    def forward(self, kjt):
        return self.ebc(kjt.to_torchrec()).values().view(-1, self.tables, self.dim)


def build(peer, a):
    torch.manual_seed(0)
    if peer == "tierec":
        cfgs = [TableConfig(f"t{i}", a.rows, a.dim) for i in range(a.tables)]
        ebc = build_collection(cfgs, SparseOptimizer("rowwise_adagrad", a.sparse_lr), seed=0)
        model = DLRM(13, ebc, [512, 256], [512, 256])
        return model, [torch.optim.Adam(model.dense_parameters(), lr=1e-3)]
    if peer == "torch":
        model = _PooledHead(_TorchBags(a.tables, a.rows, a.dim), a.tables, a.dim)
        sparse = [p for n, p in model.named_parameters() if n.startswith("emb.")]
        dense = [p for n, p in model.named_parameters() if not n.startswith("emb.")]
        return model, [torch.optim.Adam(dense, lr=1e-3), torch.optim.Adagrad(sparse, lr=a.sparse_lr)]
    model = _PooledHead(_TorchRecBags(a.tables, a.rows, a.dim, a.sparse_lr), a.tables, a.dim)
    dense = [p for n, p in model.named_parameters() if not n.startswith("emb.")]
    return model, [torch.optim.Adam(dense, lr=1e-3)]


def worker(peer, a, conn):
    torch.set_num_threads(a.threads)
    try:
        model, opts = build(peer, a)
    except ImportError as e:
        conn.send({"error": f"{peer} unavailable: {e} (install with `make torchrec`)"})
        return
    batches = zipf_batches(a.pool, a.batch, a.tables, a.rows, a.alpha, seed=1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    conn.send({"ready": True})
    i = 0
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            conn.send({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            return
        m = energy_meter(work_unit="samples").start() if energy_meter else None
        t0 = time.perf_counter()
        for _ in range(cmd):
            dense, kjt, labels = batches[i % len(batches)]
            i += 1
            loss = loss_fn(model(dense, kjt), labels)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
        dt = time.perf_counter() - t0
        res = {"samples_per_s": cmd * a.batch / dt, "loss": loss.item()}
        if m is not None:
            m.add_work(cmd * a.batch)
            res["energy"] = m.stop().columns()
        conn.send(res)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent of ID popularity")
    p.add_argument("--steps", type=int, default=20, help="steps per round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pool", type=int, default=16, help="distinct pre-generated batches, cycled")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--sparse-lr", type=float, default=0.05)
    p.add_argument("--peers", default="tierec,torchrec,torch")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()

    ctx = mp.get_context("spawn")
    peers, conns, procs = [], {}, []
    for peer in a.peers.split(","):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(peer, a, child), daemon=True)
        proc.start()
        msg = parent.recv()  # build sequentially: keeps peak memory and start-up noise apart
        if "error" in msg:
            print(f"# {msg['error']}")
            proc.join()
            continue
        peers.append(peer)
        conns[peer] = parent
        procs.append(proc)
        parent.send(a.warmup)
        parent.recv()
    print(f"# DLRM, {a.tables} tables x {a.rows:,} rows x {a.dim} dims, batch {a.batch}, Zipf {a.alpha}, "
          f"{a.threads} threads, {a.rounds} rounds x {a.steps} steps, peers alternate")
    results = {peer: [] for peer in peers}
    energy = {peer: [] for peer in peers}
    for r in range(a.rounds):
        for peer in (peers if r % 2 == 0 else peers[::-1]):
            conns[peer].send(a.steps)
            res = conns[peer].recv()
            results[peer].append(res["samples_per_s"])
            if "energy" in res:
                energy[peer].append(res["energy"])
    mem = {}
    for peer in peers:
        conns[peer].send("stop")
        mem[peer] = conns[peer].recv()["maxrss_mib"]
    for proc in procs:
        proc.join()
    base = statistics.median(results["torchrec"]) if "torchrec" in results else None
    print(f"{'peer':10s} {'samples/s':>12s} {'vs torchrec':>12s} {'peak RSS MiB':>13s} {'J/1k samples':>13s}  energy method")
    table = {}
    for peer in peers:
        sps = statistics.median(results[peer])
        ratio = sps / base if base else float("nan")
        e = energy[peer][-1] if energy[peer] else {}
        print(f"{peer:10s} {sps:12,.0f} {ratio:12.2f}x {mem[peer]:13,.0f} {e.get('j_per_1k', float('nan')):13.2f}  "
              f"{e.get('method', '-')}")
        table[peer] = {"samples_per_s": sps, "rounds": results[peer], "vs_torchrec": ratio, "peak_rss_mib": mem[peer],
                       "energy": e}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": table}, f, indent=2)


if __name__ == "__main__":
    main()

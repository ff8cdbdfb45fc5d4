"""Deduplication end to end (RecD-style) vs the plain path, side by side in one run.

    python benchmarks/bench_dedup.py                 # ~3 minutes on a quiet 2-core machine at --threads 1
    python benchmarks/bench_dedup.py --rows 400000 --json runs/dedup.json
    python benchmarks/bench_dedup.py --parts 5 --user-multi-hot-sweep poisson:8,poisson:32,poisson:64

One session-structured synthetic data set (tierec.data.synth: --session-length rows per session
on average, geometric; the first half of the 26 sparse features user-side, constant within a
session; user-side lists are multi-hot, --user-multi-hot, like a user's recent history; item-side
single-hot), written three ways from the same rows:

- ``shuffled``: rows interleaved across the whole split (`--cluster-by shuffle`), as raw logs of
  concurrent users are: the unclustered baseline;
- ``sorted``: sessions together within --window rows, plain Parquet (dictionary + RLE + zstd only);
- ``clustered``: the same order, user-side lists stored once per run (`--cluster-by session`).

Four parts, each with ratios against RecD's (MLSys'23) 3.71x storage, 1.79x preprocessing and
2.48x training throughput:

1. **Bytes on disk** of the three (train + test Parquet shards).
2. **Preprocessing rows/s**: one shuffled epoch of `Dataset.batches` (read row groups, decode,
   shuffle, build the batch tensors): shuffled + plain batches vs clustered + deduplicated
   batches (`dedup=True`: inverse KJT of the user-side keys), alternating rounds, best of rounds.
3. **Training samples/s**: DLRM steps (forward, BCE, backward with the fused row-wise Adagrad,
   Adam on the dense part) on the same pre-built batches: shuffled + plain, clustered + plain,
   clustered + dedup; alternating rounds, median. The dedup step (`DLRM.forward_dedup`) runs the user-side
   lookups, pooling, user x user dots and their share of the first top layer once per unique
   row (U of B) and expands with index_select. Then the embedding stage alone (the 26 tables'
   forward + fused backward).
4. **The clustering window and AUC**: the shuffled train split re-clustered with windows of
   increasing size (`tierec.data.cluster.recluster`), trained one epoch with dedup, AUC on the
   shuffled test split, beside the rows per unique user-side entry (B/U) a batch gets.
5. **User-side list length sweep** (only with ``--user-multi-hot-sweep poisson:8,poisson:32,...``):
   part 3's shuffled + plain vs clustered + dedup training and embedding stage again, on a fresh
   data set of ``--sweep-rows`` rows per list-length SPEC: how the speedup grows with the share of
   user-side work in a step; with the bytes-on-disk and preprocessing ratios of each data set. ``--parts 5`` runs the sweep alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0] + "/src")

from tierec.data.cluster import WindowedWriter, recluster
from tierec.data.dataset import SPLITS, Dataset, DatasetWriter
from tierec.data.synth import SynthConfig, Synthesizer, generate
from tierec.train.config import TrainConfig
from tierec.train.trainer import build_model, evaluate, make_dense_optimizer

RECD = {"storage": 3.71, "preprocessing": 1.79, "training": 2.48}
SPARSE_FEATURES, USER_FEATURES = 26, 13


def size_of(ds: Dataset) -> int:
    return sum(f["bytes"] for s in ds.manifest["splits"].values() for f in s["files"])


def write_sorted(cfg: SynthConfig, out: Path, window: int) -> Dataset:
    """Sessions together within ``window`` rows, but plain Parquet (no user-side runs)."""
    syn = Synthesizer(cfg)
    w = DatasetWriter(out, syn.schema, splits=SPLITS, rows_per_file=cfg.rows_per_file,
                      row_group_size=cfg.row_group_size, user_runs=False)
    for split in SPLITS:
        ww = WindowedWriter(w.splits[split], "session", window, cfg.seed)
        for chunk in syn.chunks(split):
            ww.write(chunk)
        ww.close()
    w.close(extra={"clustering": {"by": "session", "window": window, "seed": cfg.seed, "user_runs": False}})
    return Dataset(out)


def epoch_rows_per_s(ds: Dataset, batch: int, dedup: bool, epoch: int) -> tuple[float, float]:
    """(rows/s, mean B/U) of one shuffled epoch of batches."""
    t0 = time.perf_counter()
    rows = uniq = 0
    for b in ds.batches("train", batch, shuffle=True, seed=0, epoch=epoch, dedup=dedup):
        rows += b.size
        uniq += b.user.stride() if b.user is not None else b.size
    return rows / (time.perf_counter() - t0), rows / max(uniq, 1)


def train_cfg(args, data: Path, out: Path, dedup: bool = True) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), embedding_dim=args.dim, bottom_mlp=[128, 64],
                       top_mlp=[128, 64], batch_size=args.batch, progress=False, dedup=dedup, device="cpu")


def time_training(args, ds: Dataset, dedup: bool, tmp: Path) -> tuple[float, list[float]]:
    """Samples/s of --steps DLRM steps on pre-built batches; also the losses."""
    cfg = train_cfg(args, ds.root, tmp, dedup)
    model = build_model(cfg, ds.schema, torch.device("cpu"))
    opt = make_dense_optimizer(cfg, model.dense_parameters())
    loss_fn = torch.nn.BCEWithLogitsLoss()
    batches = []
    for b in ds.batches("train", args.batch, shuffle=True, seed=0, dedup=dedup):
        batches.append(b)
        if len(batches) == args.steps + 2:
            break
    losses = []
    for i, b in enumerate(batches):
        if i == 2:  # two warm-up steps
            t0 = time.perf_counter()
        loss = loss_fn(model(b.dense, b.sparse, b.user), b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return args.steps * args.batch / (time.perf_counter() - t0), losses


def synth_config(args, rows: int, user_multi_hot: str) -> SynthConfig:
    """26 sparse features, the first 13 user-side with ``user_multi_hot`` IDs per list, the rest single-hot."""
    spec = "fixed:1," + ",".join(f"C{i + 1}={user_multi_hot}" for i in range(USER_FEATURES))
    return SynthConfig(rows=rows, num_sparse=SPARSE_FEATURES, max_cardinality=args.max_cardinality, multi_hot=spec,
                       session_length=args.session_length, user_features=USER_FEATURES, row_group_size=65536,
                       rows_per_file=1 << 20, progress=False)


def time_peers(args, peers, tmp: Path) -> tuple[dict, dict, dict]:
    """Part 3 on ``peers`` [(name, Dataset, dedup)]: alternating rounds of training and of the embedding
    stage; returns the per-round samples/s of each (training, embedding stage) and the last losses."""
    tr = {n: [] for n, _, _ in peers}
    emb = {n: [] for n, _, _ in peers}
    losses = {}
    for r in range(args.rounds):  # peers back to back, order alternating: drift hits all alike
        for n, d, dedup in peers if r % 2 == 0 else peers[::-1]:
            sps, losses[n] = time_training(args, d, dedup, tmp / "train")
            tr[n].append(sps)
    for r in range(args.rounds):
        for n, d, dedup in peers if r % 2 == 0 else peers[::-1]:
            emb[n].append(time_embeddings(args, d, dedup, tmp / "emb"))
    return tr, emb, losses


def paired(rounds: dict, a: str, b: str) -> tuple[float, list[float]]:
    """Median over rounds of peer ``a``'s samples/s over peer ``b``'s in the same round, and the per-round ratios."""
    r = [x / y for x, y in zip(rounds[a], rounds[b])]
    return statistics.median(r), r


def batch_shape(args, ds: Dataset) -> tuple[float, float]:
    """(rows per unique user-side entry B/U, mean IDs per user-side list) of the timed batches."""
    rows = uniq = ids = lists = 0
    for i, b in enumerate(ds.batches("train", args.batch, shuffle=True, seed=0, dedup=True)):
        rows, uniq = rows + b.size, uniq + b.user.stride()
        ids, lists = ids + b.user.values().numel(), lists + b.user.lengths().numel()
        if i + 1 == args.steps + 2:
            break
    return rows / max(uniq, 1), ids / max(lists, 1)


def sweep(args, tmp: Path) -> dict:
    """Part 5: shuffled + plain vs clustered + dedup training for each user-side list length."""
    specs = [x for x in args.user_multi_hot_sweep.split(",") if x]
    print(f"\n## 5. user-side list length sweep: {args.sweep_rows:,} rows per data set, training as in part 3 "
          f"({args.steps} steps x {args.rounds} rounds, median)")
    w = (14, 8, 6, 7, 9, 12, 12, 7, 7, 10, 10)
    print(row(["user lists", "IDs/list", "B/U", "bytes", "preproc.", "plain/s", "dedup/s", "ratio", "/RecD",
               "emb. ratio", "emb. share"], w))
    out = {}
    for spec in specs:
        cfg = synth_config(args, args.sweep_rows, spec)
        d = tmp / "sweep"
        generate(cfg, d / "shuffled", cluster_by="shuffle", cluster_window=args.sweep_rows)
        generate(cfg, d / "clustered", cluster_by="session", cluster_window=args.window)
        plain, dedup = ("shuffled, plain", Dataset(d / "shuffled"), False), ("clustered, dedup", Dataset(d / "clustered"), True)
        size = size_of(plain[1]) / size_of(dedup[1])
        pre = {n: max(epoch_rows_per_s(ds, args.batch, dd, r)[0] for r in range(args.rounds))
               for n, ds, dd in (plain, dedup)}
        pre_ratio = pre[dedup[0]] / pre[plain[0]]
        tr, emb, _ = time_peers(args, [plain, dedup], d)
        t = {n: statistics.median(v) for n, v in tr.items()}
        e = {n: statistics.median(v) for n, v in emb.items()}
        b_u, ids = batch_shape(args, dedup[1])
        (ratio, per_round), (e_ratio, _) = paired(tr, dedup[0], plain[0]), paired(emb, dedup[0], plain[0])
        share = t[plain[0]] / e[plain[0]]  # embedding stage's share of a plain step's time
        print(row([spec, f"{ids:.1f}", f"{b_u:.2f}", f"{size:.2f}x", f"{pre_ratio:.2f}x", f"{t[plain[0]]:,.0f}",
                   f"{t[dedup[0]]:,.0f}", f"{ratio:.2f}x", f"{ratio / RECD['training']:.2f}", f"{e_ratio:.2f}x",
                   f"{share:.0%}"], w))
        out[spec] = {"ids_per_user_list": ids, "rows_per_unique": b_u, "bytes_ratio": size,
                     "preprocessing_rows_per_s": pre, "training_samples_per_s": t,
                     "embedding_stage_samples_per_s": e, "training_rounds": tr, "training_ratio_per_round": per_round}
        shutil.rmtree(d, ignore_errors=True)
    print(f"bytes: shuffled over clustered bytes on disk (RecD {RECD['storage']}x); preproc.: clustered + dedup "
          f"over shuffled + plain batch rows/s, best of rounds (RecD {RECD['preprocessing']}x)")
    print("ratio: clustered + dedup over shuffled + plain training samples/s, median over rounds of the ratio within "
          f"a round; /RecD: that ratio over RecD's {RECD['training']}x; emb. ratio: the embedding stage alone; "
          "emb. share: the embedding stage's share of a plain training step")
    return out


def time_embeddings(args, ds: Dataset, dedup: bool, tmp: Path) -> float:
    """Samples/s of the embedding stage alone: lookups + pooling forward, fused optimizer backward."""
    cfg = train_cfg(args, ds.root, tmp, dedup)
    ebc = build_model(cfg, ds.schema, torch.device("cpu")).embeddings
    batches = []
    for b in ds.batches("train", args.batch, shuffle=True, seed=0, dedup=dedup):
        batches.append(b)
        if len(batches) == args.steps + 2:
            break
    for i, b in enumerate(batches):
        if i == 2:
            t0 = time.perf_counter()
        torch.stack(ebc.pooled(b.sparse, b.user), 1).sum().backward()
    return args.steps * args.batch / (time.perf_counter() - t0)


def train_auc(args, ds: Dataset, test: Dataset) -> float:
    """One dedup epoch over ``ds``'s train split; AUC on ``test``'s test split."""
    cfg = train_cfg(args, ds.root, ds.root)
    torch.manual_seed(0)
    model = build_model(cfg, ds.schema, torch.device("cpu"))
    opt = make_dense_optimizer(cfg, model.dense_parameters())
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for b in ds.batches("train", args.auc_batch, shuffle=True, seed=0, dedup=True):
        loss = loss_fn(model(b.dense, b.sparse, b.user), b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return evaluate(model, test, "test", 8192, torch.device("cpu"), progress=False)["auc"]


def row(cells, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="rows in all (train + 10%% test)")
    p.add_argument("--session-length", type=float, default=10.0, help="mean rows per session")
    p.add_argument("--user-multi-hot", default="poisson:8", help="IDs per user-side list (synth SPEC)")
    p.add_argument("--max-cardinality", type=int, default=200_000)
    p.add_argument("--window", type=int, default=1 << 16, help="clustering window, rows")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--auc-windows", default="512,4096,32768,262144", help="windows of part 4 (rows)")
    p.add_argument("--auc-batch", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parts", default="1,2,3,4", help="parts to run; part 5, the sweep, runs whenever "
                   "--user-multi-hot-sweep is given (--parts 5: the sweep alone)")
    p.add_argument("--user-multi-hot-sweep", default="", metavar="SPEC,SPEC,...",
                   help="part 5: repeat part 3 for each user-side list length, e.g. poisson:8,poisson:32,poisson:64")
    p.add_argument("--sweep-rows", type=int, default=100_000, help="rows of each data set of the sweep")
    p.add_argument("--dir", default="runs", help="scratch directory (a temporary folder inside it)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    parts = {int(x) for x in args.parts.split(",") if x.strip().isdigit()}
    if not parts <= {1, 2, 3, 4, 5} or (parts == {5} and not args.user_multi_hot_sweep):
        p.error(f"--parts {args.parts!r}: give some of 1,2,3,4 (5 needs --user-multi-hot-sweep)")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dedup_", dir=args.dir))
    cfg = synth_config(args, args.rows, args.user_multi_hot)
    out: dict = {"config": vars(args), "recd": RECD}
    try:
        t0 = time.perf_counter()
        if parts & {1, 2, 3, 4}:
            main_parts(args, parts, cfg, tmp, out, t0)
        if args.user_multi_hot_sweep:
            out["user_multi_hot_sweep"] = sweep(args, tmp)
        print(f"\ntotal {time.perf_counter() - t0:.0f} s")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main_parts(args, parts: set[int], cfg: SynthConfig, tmp: Path, out: dict, t0: float) -> None:
    """Parts 1-4 (those in ``parts``) on one data set written three ways."""
    shuffled = tmp / "shuffled"
    generate(cfg, shuffled, cluster_by="shuffle", cluster_window=args.rows)
    generate(cfg, tmp / "clustered", cluster_by="session", cluster_window=args.window)
    ds = {"shuffled": Dataset(shuffled), "clustered": Dataset(tmp / "clustered")}
    if 1 in parts:
        ds = {"shuffled": ds["shuffled"], "sorted": write_sorted(cfg, tmp / "sorted", args.window),
              "clustered": ds["clustered"]}
    print(f"# data: {args.rows:,} rows, {SPARSE_FEATURES} sparse features ({USER_FEATURES} user-side, lists "
          f"{args.user_multi_hot}; item-side fixed:1), 13 dense, sessions of {args.session_length:g} rows on average; "
          f"window {args.window:,} rows; written in {time.perf_counter() - t0:.1f} s; torch threads {args.threads}")

    if 1 in parts:  # bytes on disk
        sizes = {n: size_of(d) for n, d in ds.items()}
        print("\n## 1. bytes on disk (train + test Parquet, zstd)")
        w = (34, 14, 12)
        print(row(["data set", "bytes", "vs shuffled"], w))
        for n, s in sizes.items():
            print(row([n, f"{s:,}", f"{sizes['shuffled'] / s:.2f}x"], w))
        st = sizes["shuffled"] / sizes["clustered"]
        print(f"storage efficiency: {st:.2f}x (RecD: {RECD['storage']}x; ratio to RecD {st / RECD['storage']:.2f})")
        out["bytes"] = sizes

    if 2 in parts:  # preprocessing
        print("\n## 2. preprocessing: one shuffled epoch of batches (read, decode, shuffle, build tensors)")
        peers = [("shuffled, plain batches", ds["shuffled"], False), ("clustered, plain batches", ds["clustered"], False),
                 ("clustered, dedup batches", ds["clustered"], True)]
        pre = {n: [] for n, _, _ in peers}
        bu = {}
        for r in range(args.rounds):
            for n, d, dedup in peers:
                rps, bu[n] = epoch_rows_per_s(d, args.batch, dedup, r)
                pre[n].append(rps)
        w = (28, 12, 8, 12)
        print(row(["peer", "rows/s", "B/U", "vs plain"], w))
        base = max(pre[peers[0][0]])
        for n, _, _ in peers:
            print(row([n, f"{max(pre[n]):,.0f}", f"{bu[n]:.2f}" if "dedup" in n else "-", f"{max(pre[n]) / base:.2f}x"], w))
        pr = max(pre[peers[2][0]]) / base
        print(f"preprocessing throughput: {pr:.2f}x (RecD: {RECD['preprocessing']}x; ratio to RecD "
              f"{pr / RECD['preprocessing']:.2f})")
        out["preprocessing_rows_per_s"] = {n: max(v) for n, v in pre.items()}
        out["rows_per_unique_user_entry"] = bu

    if 3 in parts:  # training
        print(f"\n## 3. training: DLRM, batch {args.batch}, dim {args.dim}, MLPs 13-128-64-{args.dim} / "
              f"128-64-1, row-wise Adagrad + Adam; {args.steps} steps x {args.rounds} rounds, median")
        peers = [("shuffled, plain", ds["shuffled"], False), ("clustered, plain", ds["clustered"], False),
                 ("clustered, dedup", ds["clustered"], True)]
        tr, emb, losses = time_peers(args, peers, tmp)
        same = max(abs(a - b) / abs(a) for a, b in zip(losses["clustered, plain"], losses["clustered, dedup"]))
        w = (20, 12, 10)
        print(row(["peer", "samples/s", "vs plain"], w))
        base = statistics.median(tr[peers[0][0]])
        for n, _, _ in peers:
            print(row([n, f"{statistics.median(tr[n]):,.0f}", f"{statistics.median(tr[n]) / base:.2f}x"], w))
        tt, per_round = paired(tr, peers[2][0], peers[0][0])
        print(f"training throughput: {tt:.2f}x, median of the rounds' ratios {', '.join(f'{x:.2f}' for x in per_round)} "
              f"(RecD: {RECD['training']}x; ratio to RecD {tt / RECD['training']:.2f}); "
              f"clustered plain vs dedup losses: max relative difference {same:.1e}")
        out["training_ratio_per_round"] = per_round
        out["training_samples_per_s"] = {n: statistics.median(v) for n, v in tr.items()}
        out["training_rounds"] = tr
        print("\nthe embedding stage alone (26 tables: lookups + pooling, backward with the fused optimizer)")
        print(row(["peer", "samples/s", "vs plain"], w))
        base = statistics.median(emb[peers[0][0]])
        for n, _, _ in peers:
            print(row([n, f"{statistics.median(emb[n]):,.0f}", f"{statistics.median(emb[n]) / base:.2f}x"], w))
        out["embedding_stage_samples_per_s"] = {n: statistics.median(v) for n, v in emb.items()}

    if 4 in parts:  # window vs AUC
        print(f"\n## 4. clustering window vs AUC (one dedup epoch, batch {args.auc_batch}, test AUC)")
        w = (16, 10, 8)
        print(row(["window (rows)", "test AUC", "B/U"], w))
        auc = {}
        runs = [("shuffled", ds["shuffled"])]
        for win in [int(x) for x in args.auc_windows.split(",") if x]:
            d = tmp / f"w{win}"
            recluster(shuffled, d, "session", win)
            runs.append((f"{win:,}", Dataset(d)))
        for name, d in runs:
            a = train_auc(args, d, ds["shuffled"])
            _, b_u = epoch_rows_per_s(d, args.auc_batch, True, 0)
            auc[name] = {"auc": a, "rows_per_unique": b_u}
            print(row([name, f"{a:.4f}", f"{b_u:.2f}"], w))
        out["window_auc"] = auc


if __name__ == "__main__":
    sys.exit(main())

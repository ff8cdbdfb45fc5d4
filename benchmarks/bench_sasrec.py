"""SASRec on amazon_video.txt with the reference hyper-parameters (pmixer/SASRec.pytorch).

Embedding 50, 2 blocks, 1 head, max length 50, dropout 0.5, lr 0.001 Adam (betas 0.9, 0.98), batch
128, BCE with one sampled negative per position. Trains for ``--epochs`` or until ``--minutes`` of
training time are spent, evaluates HR@10 / NDCG@10 on the validation split every ``--eval-every``
epochs, and on both splits at the end; prints the wall time per epoch. Published (about 200
epochs): HR@10 0.7318 / NDCG@10 0.5308 (post-LN), 0.7442 / 0.5376 (pre-LN).

    .venv/bin/python benchmarks/bench_sasrec.py [--minutes 10] [--pre-ln] [--data ../shared/data/seq/amazon_video.txt]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tierec.data.sequences import SequenceBatches, convert_sequences, load_sequences
from tierec.modules.optim import SparseOptimizer
from tierec.modules.sasrec import SASRec
from tierec.train.sequence import evaluate_sequences

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "seq" / "amazon_video.txt"))
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=10.0, help="stop after the epoch that passes this much time")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--pre-ln", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        convert_sequences(args.data, Path(tmp) / "ds")
        ds = load_sequences(Path(tmp) / "ds")
    torch.manual_seed(args.seed)
    model = SASRec(ds.num_items, 50, 50, 2, 1, 0.5, args.pre_ln, SparseOptimizer("adam", 1e-3, beta2=0.98),
                   seed=args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    batches = SequenceBatches(ds, 50, 128)
    print(f"{ds.num_users:,} users, {ds.num_items:,} items, {len(ds.items):,} interactions; "
          f"{len(ds.eval_users):,} evaluated users; {len(batches)} steps/epoch; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    t_start, epoch_s = time.perf_counter(), []
    res: dict = {}
    for e in range(args.epochs):
        t0 = time.perf_counter()
        total = 0.0
        model.train()
        for x, p, n in batches.epoch(args.seed, e):
            loss = model.loss(torch.from_numpy(x), torch.from_numpy(p), torch.from_numpy(n))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        epoch_s.append(time.perf_counter() - t0)
        line = f"epoch {e + 1}: loss {total / len(batches):.4f}, {epoch_s[-1]:.1f} s"
        if (e + 1) % args.eval_every == 0:
            v = evaluate_sequences(model, ds, "valid")
            line += f", valid HR@10 {v['hr@10']:.4f} NDCG@10 {v['ndcg@10']:.4f}"
        print(line, flush=True)
        if time.perf_counter() - t_start > args.minutes * 60:
            break
    res = {"epochs": len(epoch_s), "train_s": round(sum(epoch_s), 1),
           "epoch_s_mean": round(sum(epoch_s) / len(epoch_s), 2), "pre_ln": args.pre_ln,
           "valid": evaluate_sequences(model, ds, "valid"), "test": evaluate_sequences(model, ds, "test"),
           "published_200_epochs": {"post_ln": {"hr@10": 0.7318, "ndcg@10": 0.5308},
                                    "pre_ln": {"hr@10": 0.7442, "ndcg@10": 0.5376}}}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

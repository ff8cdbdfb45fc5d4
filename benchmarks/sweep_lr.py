"""Sweep the dense learning rate (and optionally the sparse one) of DLRM on real and synthetic data.

The default `lr` of `tierec train` is chosen from this sweep (docs/training.md): held-out AUC and
log-loss after the same number of epochs, per data set and learning rate, everything else at
its default. Data sets:

- ``movielens``: the real MovieLens-100K ratings as implicit feedback (rating >= 4), converted
  with `tierec data convert --format movielens` (read from the recbole 1.2.1 wheel, as the tests do:
  set ``--movielens FILE`` or ``TIEREC_TEST_CACHE``);
- ``amazon``: the real Amazon video-game histories of ``../shared/data/seq/amazon_video.txt`` as click
  data: each (user, item) interaction a positive, one item the user never interacted with (drawn
  uniformly, seeded) a negative, user_id / item_id hashed as `tierec data convert` does;
- ``criteo``: the 200 real Criteo rows of ``../shared/data/criteo_sample.csv`` (tiny: a sanity check);
- ``synth``: `tierec data synth` (Criteo-shaped, calibrated skew), ``--synth-rows`` rows.

    python benchmarks/sweep_lr.py                         # all four, lr 1e-3 .. 3e-2, 2 epochs
    python benchmarks/sweep_lr.py --lrs 0.001,0.01 --epochs 1 --data movielens
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from tierec.data.convert import convert
from tierec.data.synth import SynthConfig, generate
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def movielens_file(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    cache = Path(os.environ.get("TIEREC_TEST_CACHE", Path.home() / ".cache" / "tierec-test"))
    path = cache / "ml-100k.inter"
    if not path.exists():
        raise SystemExit(f"{path} missing: run the test suite once (it downloads it) or pass --movielens FILE")
    return path


def amazon_clicks(path: Path, out: Path, seed: int = 0) -> Path:
    """``user item`` lines -> a MovieLens-style ``user item rating`` file: every interaction rated 5 (a click),
    plus one never-interacted item per interaction rated 1 (no click), rows shuffled."""
    import numpy as np

    ui = np.loadtxt(path, dtype=np.int64)
    users, items = ui[:, 0], ui[:, 1]
    n_items = int(items.max())
    rng = np.random.default_rng(seed)
    seen = np.unique(users * (n_items + 1) + items)
    neg = rng.integers(1, n_items + 1, users.size)
    for _ in range(10):  # redraw the negatives the user did interact with
        hit = np.isin(users * (n_items + 1) + neg, seen)
        if not hit.any():
            break
        neg[hit] = rng.integers(1, n_items + 1, int(hit.sum()))
    rows = np.concatenate([np.stack([users, items, np.full(users.size, 5)], 1),
                           np.stack([users, neg, np.ones(users.size, np.int64)], 1)])
    np.savetxt(out, rows[rng.permutation(len(rows))], fmt="%d", delimiter="\t")
    return out


def make_data(name: str, work: Path, args) -> Path:
    out = work / name
    if name == "amazon":
        raw = amazon_clicks(SHARED / "seq" / "amazon_video.txt", work / "amazon_clicks.tsv")
        convert(raw, out, "movielens", test_fraction=0.1, progress=False)
    elif name == "movielens":
        convert(movielens_file(args.movielens), out, "movielens", test_fraction=0.1, progress=False)
    elif name == "criteo":
        convert(SHARED / "criteo_sample.csv", out, "criteo-csv", num_embeddings=1000, test_fraction=0.25,
                progress=False)
    else:
        generate(SynthConfig(rows=args.synth_rows, seed=0, progress=False), out, progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="amazon,movielens,criteo,synth",
                    help="comma-separated: amazon, movielens, criteo, synth")
    ap.add_argument("--lrs", default="0.001,0.003,0.01,0.03", help="dense learning rates")
    ap.add_argument("--sparse-lrs", default=None, help="sparse learning rates (default: the default only)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (AUC is averaged over them)")
    ap.add_argument("--synth-rows", type=int, default=500_000)
    ap.add_argument("--movielens", default=None, help="ml-100k .inter or u.data file")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    lrs = [float(x) for x in args.lrs.split(",")]
    sparse_lrs = [float(x) for x in args.sparse_lrs.split(",")] if args.sparse_lrs else [TrainConfig(data="x").sparse_lr]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="tierec-sweep-") as tmp:
        work = Path(tmp)
        for name in args.data.split(","):
            data = make_data(name, work, args)
            print(f"\n{name}: {args.epochs} epochs, batch {args.batch_size}, seeds {seeds}")
            print(f"{'lr':>8} {'sparse_lr':>9} {'AUC':>8} {'log-loss':>9} {'s':>6}")
            for slr in sparse_lrs:
                for lr in lrs:
                    aucs, losses, t0 = [], [], time.perf_counter()
                    for seed in seeds:
                        cfg = TrainConfig(data=str(data), out=str(work / f"run-{name}-{lr}-{slr}-{seed}"), lr=lr,
                                          sparse_lr=slr, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                                          progress=False)
                        s = Trainer(cfg).fit()
                        aucs.append(s["auc"])
                        losses.append(s["logloss"])
                    row = {"data": name, "lr": lr, "sparse_lr": slr, "auc": sum(aucs) / len(aucs),
                           "logloss": sum(losses) / len(losses), "seconds": time.perf_counter() - t0}
                    results.append(row)
                    print(f"{lr:>8g} {slr:>9g} {row['auc']:>8.4f} {row['logloss']:>9.4f} {row['seconds']:>6.1f}",
                          flush=True)
    best = {}
    for r in results:
        if r["data"] not in best or r["auc"] > best[r["data"]]["auc"]:
            best[r["data"]] = r
    print("\nbest per data set: " + ", ".join(f"{k}: lr {v['lr']:g} (AUC {v['auc']:.4f})" for k, v in best.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""SASRec with full vs pruned attention (issue #21 item 2): quality, keys kept, FLOPs, samples/s.

Two parts, each training a full-attention and a pruned-attention SASRec from the same seed on the
same batches (same data order and negatives), side by side:

1. real: amazon_video.txt (leave-one-out, HR@10 / NDCG@10 of the test target against 100 sampled
   negatives, as benchmarks/bench_sasrec.py), max length 50 (and ``--real-len 200`` on request);
2. synthetic longer histories (200, 500, 1000 items): users walk a Markov chain over items (each item
   has a few likely successors) inside their own taste cluster, with noise, so the next item is
   learnable from the recent items and the cluster from the whole history; the same protocol.

Reported per setting: HR@10 / NDCG@10 (test) and their relative change, training and inference
samples/s (sequences per second; inference = scoring each evaluated user's 101 candidates),
attention FLOPs (dense full attention vs pruned: the approximate pass, int8 ops, and the exact pass
on the gathered keys), keys kept per query against the causal keys a query has. Ratios are pruned /
full from the same run.

    .venv/bin/python benchmarks/bench_seq.py [--quick] [--json FILE] [--threads 1] [--keep 32]

Default: torch 1 thread (the machine is shared: the numbers are for one core, with other jobs
running beside it; the output says so). glibc's step malloc thresholds are set as the trainer does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tierec.data.sequences import SequenceBatches, SequenceData, convert_sequences, load_sequences
from tierec.malloc import STEP_MALLOC, set_malloc_thresholds
from tierec.modules.attention import full_attention_flops
from tierec.modules.optim import SparseOptimizer
from tierec.modules.sasrec import SASRec
from tierec.train.sequence import evaluate_sequences

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- synthetic histories
def markov_sequences(num_users: int, length: int, num_items: int = 5000, clusters: int = 10, successors: int = 3,
                     p_follow: float = 0.5, p_cluster: float = 0.3, seed: int = 0) -> SequenceData:
    """Users' histories of ``length`` items: each user has a taste cluster (num_items / clusters items); the
    next item is one of the current item's ``successors`` (fixed per item, inside the cluster, the first
    the likeliest) with probability p_follow, another item of the cluster with p_cluster, any item otherwise."""
    rng = np.random.default_rng(seed)
    size = num_items // clusters
    cluster_of = np.arange(num_items) // size
    succ = (cluster_of[:, None] * size + rng.integers(0, size, (num_items, successors))).astype(np.int64)
    w = 0.5 ** np.arange(successors)
    w /= w.sum()
    users = rng.integers(0, clusters, num_users)
    seqs = np.zeros((num_users, length), np.int64)
    cur = users * size + rng.integers(0, size, num_users)
    for t in range(length):
        seqs[:, t] = cur
        r = rng.random(num_users)
        pick = succ[cur, rng.choice(successors, num_users, p=w)]
        same = users * size + rng.integers(0, size, num_users)
        anyi = rng.integers(0, num_items, num_users)
        cur = np.where(r < p_follow, pick, np.where(r < p_follow + p_cluster, same, anyi))
    items = (seqs + 1).reshape(-1)  # IDs from 1
    offsets = np.arange(num_users + 1, dtype=np.int64) * length
    return SequenceData(items, offsets, num_items)


# --------------------------------------------------------------------------- one model
def run_model(ds: SequenceData, max_len: int, attention: str, args, batch: int, epochs: int, lr: float,
              max_steps: int | None = None, eval_batch: int = 256) -> dict:
    torch.manual_seed(args.seed)
    kw = {} if attention == "full" else dict(attn_keep=args.keep, attn_threshold=args.threshold,
                                             attn_score=args.score)
    model = SASRec(ds.num_items, args.dim, max_len, 2, 1, 0.2, False, SparseOptimizer("adam", lr, beta2=0.98),
                   seed=args.seed, attention=attention, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    batches = SequenceBatches(ds, max_len, batch)
    model.train()
    t_train, samples, steps, loss_sum = 0.0, 0, 0, 0.0
    for e in range(epochs):
        for x, p, n in batches.epoch(args.seed, e):
            t0 = time.perf_counter()
            loss = model.loss(torch.from_numpy(x), torch.from_numpy(p), torch.from_numpy(n))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t_train += time.perf_counter() - t0
            samples += len(x)
            steps += 1
            loss_sum += float(loss.detach())
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    train_attn = model.attention_stats(reset=True)
    t0 = time.perf_counter()
    test = evaluate_sequences(model, ds, "test", eval_batch)
    t_inf = time.perf_counter() - t0
    inf_attn = model.attention_stats(reset=True)
    users = test["users"]
    # dense full attention's FLOPs of the same forwards (2 blocks; inference: the evaluated batches)
    full_inf = 2 * sum(full_attention_flops(min(eval_batch, users - s), max_len, args.dim)
                       for s in range(0, users, eval_batch))
    res = {"attention": attention, "epochs": epochs, "steps": steps, "loss": loss_sum / max(steps, 1),
           "train_samples_per_s": samples / t_train, "infer_samples_per_s": users / t_inf,
           "train_s": round(t_train, 2), "infer_s": round(t_inf, 2),
           "hr@10": test["hr@10"], "ndcg@10": test["ndcg@10"], "eval_users": users,
           "attention_flops_infer": {"full": full_inf}}
    if inf_attn is not None:
        res["attention_flops_infer"].update(approx_int8=inf_attn["flops_approx"], exact=inf_attn["flops_exact"],
                                            exact_kept=inf_attn["flops_exact_kept"])
        res["keys_kept_per_query"] = inf_attn["keys_kept_per_query"]
        res["keys_causal_per_query"] = inf_attn["keys_causal_per_query"]
        res["train_keys_kept_per_query"] = train_attn["keys_kept_per_query"] if train_attn else None
    return res


def compare(name: str, ds: SequenceData, max_len: int, args, **kw) -> dict:
    print(f"\n== {name}: max length {max_len}, {ds.num_users:,} users, {ds.num_items:,} items, "
          f"{len(ds.eval_users):,} evaluated", flush=True)
    out = {}
    for att in ("full", "pruned"):
        r = run_model(ds, max_len, att, args, **kw)
        out[att] = r
        print(f"  {att:6s}: {r['steps']} steps, loss {r['loss']:.4f}, HR@10 {r['hr@10']:.4f} NDCG@10 "
              f"{r['ndcg@10']:.4f}, train {r['train_samples_per_s']:.1f} samples/s, infer "
              f"{r['infer_samples_per_s']:.1f} samples/s" + (
                  f", keys kept/query {r['keys_kept_per_query']:.1f} of {r['keys_causal_per_query']:.1f}"
                  if att == "pruned" else ""), flush=True)
    f, p = out["full"], out["pruned"]
    fl = p["attention_flops_infer"]
    out["ratios"] = {
        "hr@10_rel_change": (p["hr@10"] - f["hr@10"]) / max(f["hr@10"], 1e-12),
        "ndcg@10_rel_change": (p["ndcg@10"] - f["ndcg@10"]) / max(f["ndcg@10"], 1e-12),
        "train_speedup": p["train_samples_per_s"] / f["train_samples_per_s"],
        "infer_speedup": p["infer_samples_per_s"] / f["infer_samples_per_s"],
        "keys_kept_over_causal": p["keys_kept_per_query"] / max(p["keys_causal_per_query"], 1e-12),
        "exact_flops_over_full": fl["exact"] / fl["full"],
        "exact_kept_flops_over_full": fl["exact_kept"] / fl["full"],
        "approx_int8_ops_over_full": fl["approx_int8"] / fl["full"],
    }
    out["max_len"] = max_len
    return out


def table(results: dict) -> str:
    cols = ["setting", "HR@10 full", "HR@10 pr", "dHR", "NDCG full", "NDCG pr", "dNDCG", "keys kept/causal",
            "exact FLOPs", "kept FLOPs", "int8 ops", "train x", "infer x"]
    rows = [cols]
    for name, r in results.items():
        f, p, q = r["full"], r["pruned"], r["ratios"]
        rows.append([name, f"{f['hr@10']:.4f}", f"{p['hr@10']:.4f}", f"{q['hr@10_rel_change']:+.1%}",
                     f"{f['ndcg@10']:.4f}", f"{p['ndcg@10']:.4f}", f"{q['ndcg@10_rel_change']:+.1%}",
                     f"{p['keys_kept_per_query']:.1f}/{p['keys_causal_per_query']:.1f}",
                     f"{q['exact_flops_over_full']:.3f}", f"{q['exact_kept_flops_over_full']:.3f}",
                     f"{q['approx_int8_ops_over_full']:.3f}", f"{q['train_speedup']:.2f}",
                     f"{q['infer_speedup']:.2f}"])
    w = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "seq" / "amazon_video.txt"))
    ap.add_argument("--quick", action="store_true", help="a smoke run (< 3 minutes): fewer users, epochs, steps")
    ap.add_argument("--json", metavar="FILE", help="write every figure here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a fair, comparable core)")
    ap.add_argument("--keep", type=int, default=32, help="pruned: keys kept per query (its own included)")
    ap.add_argument("--real-keep", type=int, default=8, help="pruned on amazon_video (short histories): keys kept")
    ap.add_argument("--threshold", type=float, default=None, help="pruned: logit threshold below the row's best")
    ap.add_argument("--score", choices=["int8", "lowrank"], default="int8")
    ap.add_argument("--dim", type=int, default=50)
    ap.add_argument("--real-epochs", type=int, default=None, help="epochs on amazon_video (default 6; quick 2)")
    ap.add_argument("--real-len", type=int, nargs="+", default=[50], help="max lengths on amazon_video")
    ap.add_argument("--lengths", type=int, nargs="+", default=[200, 500, 1000], help="synthetic history lengths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    set_malloc_thresholds(*STEP_MALLOC)
    t_start = time.perf_counter()
    print(f"bench_seq {datetime.datetime.now().isoformat(timespec='seconds')}: torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s) of {os.cpu_count()} CPUs; the machine is shared with other jobs "
          f"(at least one 1-thread background job), so absolute samples/s are noisy: compare the ratios, "
          f"measured side by side in this run", flush=True)
    print(f"pruned: keep {args.keep} (amazon: {args.real_keep}), threshold {args.threshold}, score {args.score}",
          flush=True)
    results: dict = {}
    if not args.skip_real:
        real_epochs = args.real_epochs or (2 if args.quick else 6)
        with tempfile.TemporaryDirectory() as tmp:
            convert_sequences(args.data, Path(tmp) / "ds")
            ds = load_sequences(Path(tmp) / "ds", max_users=4000 if args.quick else None)
        keep = args.keep
        args.keep = args.real_keep
        for L in args.real_len:
            results[f"amazon L={L}"] = compare(f"amazon_video, {real_epochs} epochs", ds, L, args, batch=128,
                                               epochs=real_epochs, lr=1e-3, eval_batch=1024)
        args.keep = keep
    for L in args.lengths:
        # ~ the same number of trained positions per length; batch sized so a batch's full attention
        # matrix stays within a few tens of MB
        batch = max(4, min(64, 8_000_000 // (L * L)))
        users = (96 if args.quick else 512) * 1000 // L + 64
        steps = (6 if args.quick else 60)
        ds = markov_sequences(users, L + 2, seed=args.seed)  # inputs of exactly L items (+ valid, test targets)
        results[f"synthetic L={L}"] = compare(f"synthetic Markov, batch {batch}, {steps} steps", ds, L, args,
                                              batch=batch, epochs=1000, lr=3e-3, max_steps=steps,
                                              eval_batch=batch)
    print("\nratios: pruned / full, same run (exact FLOPs = the exact pass as computed over the gathered width; "
          "kept FLOPs = on the kept keys alone; int8 ops = the approximate pass; all over dense full attention's "
          "QK^T + PV FLOPs at inference; dHR, dNDCG: relative change of the test metric)")
    print(table(results))
    total = time.perf_counter() - t_start
    print(f"\ntotal {total / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": datetime.date.today().isoformat(), "threads": args.threads,
                                               "keep": args.keep, "real_keep": args.real_keep,
                                               "threshold": args.threshold, "score": args.score,
                                               "quick": args.quick, "total_s": round(total, 1),
                                               "results": results}, indent=2, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

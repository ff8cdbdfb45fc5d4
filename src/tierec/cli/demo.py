"""`tierec demo`: what tierec is for, in a few minutes on a laptop.

1. synthesise Criteo-shaped data whose 26 tables (rows + optimizer state) are several times a
   small memory budget;
2. train a DLRM with the tables beyond the budget in SSD files behind the look-ahead cache
   (O_DIRECT: the files are really read from the device, not from the page cache);
3. train the same model on the same batches with every table in memory, the reference, at the
   number of torch threads the tiered run's model trained with (it leaves a core to its look-ahead
   worker): on some CPUs (MKL on Intel Xeon) a linear layer's weight gradient sums the batch in
   per-thread parts, so the thread count changes the last bits of the result;
4. evaluate the tiered run's checkpoint, and print the comparison: table bytes against the
   budget, each run's peak resident memory, hit rate, stall, samples/s, and whether the
   training losses are identical (they must be: caching and prefetching are exact).

Each training runs in its own process (``python -m tierec train``), so each peak RSS is that
run's alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from tierec.config import format_bytes, parse_bytes
from tierec.errors import TierecError

log = logging.getLogger(__name__)

LOG_EVERY = 20  # steps between the training-loss records that are compared


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="tables several times a memory budget on SSD behind the look-ahead cache, "
                                    "against the same model in memory (a few minutes)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="where data, runs and checkpoints go (default: runs/demo)")
    p.add_argument("--rows", type=int, default=2_000_000, help="synthetic rows, train + test (default: 2000000)")
    p.add_argument("--max-cardinality", type=int, default=1_000_000,
                   help="cap on each table's rows (default: 1000000: 361 MiB of tables at dim 16)")
    p.add_argument("--budget", default="48MiB", help="memory budget for the embedding tables (default: 48MiB)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from tierec.data import synth
    from tierec.data.dataset import Dataset
    from tierec.train.trainer import evaluate, load_for_eval

    if args.rows < 1000:
        raise TierecError(f"--rows must be >= 1000, got {args.rows}")
    budget = parse_bytes(args.budget, "--budget")
    out = Path(args.out)
    data = out / "data"
    log.info("1/4 synthesising %d Criteo-shaped rows into %s", args.rows, data)
    synth.generate(synth.SynthConfig(rows=args.rows, seed=args.seed, max_cardinality=args.max_cardinality), data)
    table_bytes = _table_bytes(Dataset(data))
    common = ["--data", str(data), "--seed", str(args.seed), "--log-every", str(LOG_EVERY), "--overwrite",
              "--no-progress"]
    log.info("2/4 training with %s of tables in a %s budget: SSD files behind the look-ahead cache",
             format_bytes(table_bytes), format_bytes(budget))
    tiered, tiered_rss = _train(common + ["--out", str(out / "tiered"), "--memory-budget", str(budget),
                                          "--cache-policy", "lookahead", "--direct-io"])
    threads = int((tiered.get("prefetch") or {}).get("trainer_threads") or 0)
    log.info("3/4 training the same model with every table in memory (the reference)%s",
             f", at the tiered run's {threads} torch thread{'s' * (threads > 1)}" if threads else "")
    memory, memory_rss = _train(common + ["--out", str(out / "memory")]
                                + (["--num-threads", str(threads)] if threads else []))
    log.info("4/4 evaluating the tiered run's checkpoint %s (its tables read from the checkpoint's files)",
             tiered["checkpoint"])
    model, ds, _ = load_for_eval(str(tiered["checkpoint"]))
    res = evaluate(model, ds, "test", 8192, next(model.parameters()).device)
    same, n = _same_losses(out / "tiered" / "metrics.jsonl", out / "memory" / "metrics.jsonl")
    _print_report(table_bytes, budget, tiered, tiered_rss, memory, memory_rss, res, same, n, out, threads)
    return 0 if same else 1


def _table_bytes(ds) -> int:
    """Bytes of every table's rows: float32 weights + the default optimizer's row-wise state (1 float)."""
    from tierec.train.config import TrainConfig

    dim = TrainConfig.embedding_dim
    return sum(f.num_embeddings for f in ds.schema.sparse) * (dim + 1) * 4


def _train(argv: list[str]) -> tuple[dict, int]:
    """``tierec train ARGV`` in a child process: (its JSON summary, its peak RSS in bytes)."""
    proc = subprocess.Popen([sys.executable, "-m", "tierec", "train", *argv], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise TierecError(f"the demo's training run failed (exit {proc.returncode}): tierec train {' '.join(argv)}")
    return json.loads(text), usage.ru_maxrss * 1024  # Linux reports KiB


def _losses(path: Path) -> list[float]:
    with open(path, encoding="utf-8") as f:
        return [r["loss"] for r in map(json.loads, f) if r.get("event") == "train"]


def _same_losses(a: Path, b: Path) -> tuple[bool, int]:
    """(the two runs' logged training losses are equal bit for bit, how many were compared)."""
    la, lb = _losses(a), _losses(b)
    return la == lb and bool(la), len(la)


def _print_report(table_bytes, budget, tiered, tiered_rss, memory, memory_rss, res, same, n, out,
                  threads: int = 0) -> None:
    t_sps, m_sps = tiered["samples_per_s"], memory["samples_per_s"]
    rows = [
        ("samples/s", f"{t_sps:,.0f}", f"{m_sps:,.0f}", f"{t_sps / m_sps:.2f}x"),
        ("peak RSS", format_bytes(tiered_rss), format_bytes(memory_rss), f"{tiered_rss / memory_rss:.2f}x"),
        ("cache hit rate", f"{tiered.get('cache_hit_rate', 0):.1%}", "-", ""),
        ("stall (waiting for rows)", f"{tiered.get('stall_fraction') or 0:.1%}", "-", ""),
        ("held-out AUC", f"{tiered['auc']:.4f}", f"{memory['auc']:.4f}", ""),
    ]
    print(f"\ntierec demo: {format_bytes(table_bytes)} of embedding tables (rows + optimizer state), "
          f"memory budget {format_bytes(budget)} ({table_bytes / budget:.1f}x over it)")
    print(f"  {'':26}{'SSD + look-ahead':>18}{'all in memory':>16}{'ratio':>8}")
    for name, a, b, r in rows:
        print(f"  {name:26}{a:>18}{b:>16}{r:>8}")
    verdict = "identical, bit for bit" if same else "DIFFERENT (a bug: caching must be exact)"
    print(f"  training losses: {verdict} ({n} records of {LOG_EVERY} steps compared)")
    if threads:
        print(f"  (both models trained with {threads} torch thread{'s' * (threads > 1)}: the tiered run leaves a core "
              "to its look-ahead worker; benchmarks/bench_scale.py compares against memory at all threads)")
    print("  (peak RSS includes the fixed cost of Python, torch, the dense model and the data pipeline)")
    print(f"  evaluated from the checkpoint: AUC {res['auc']:.4f}, log-loss {res['logloss']:.4f}")
    print(f"  checkpoint {tiered['checkpoint']}; runs in {out}")

"""Input pipeline: autotuned settings vs deliberately misconfigured ones, the defaults, and the best of a sweep.

    python benchmarks/bench_input.py --quick          # ~3 minutes: smaller data, fewer steps, a small sweep
    python benchmarks/bench_input.py                  # ~3-15 minutes on a 2-core machine (by its load)
    python benchmarks/bench_input.py --json runs/input.json --keep runs/bench-input

One synthetic data set made for the input to matter (`tierec data synth`, zstd-compressed Parquet, the
default codec of tierec's writer): 26 sparse features, the first 13 user-side and multi-hot (long
histories: 1 + Poisson(15) IDs per row, --user-multi-hot), the other 13 single-hot, sessions of 8 rows
on average, rows not clustered: each batch's user-side rows are deduplicated by the loader (`dedup`:
hashing 200+ IDs a row) and the model looks each unique user row up once. So the input is heavy
(decompressing and decoding the lists, deduplicating them) and the step light: the case where the
pipeline's configuration decides the training rate. A small DLRM (dim 8) trains on it (in-memory
tables, torch on --threads threads, default 1: the pipeline gets the other core) for --steps steps
per configuration; each run's samples/s is the trainer's own (`Trainer.fit`'s samples / train_s:
the step plus every wait for a batch; model building, the profile and the final checkpoint and
evaluation are outside it).

Configurations, each a `LoaderSettings` (the same batches under all of them: only speed changes):

- ``one-reader-on-demand``: one reader thread reading, decompressing and decoding each row group on
  the trainer's thread when it needs it (prefetch 0), batches built by a worker;
- ``no-prefetch``: nothing ahead: reads and batch building (dedup, KJT) on the trainer's thread;
- ``dedup-on-trainer``: two readers four reads ahead, but the batches (dedup, KJT) built on the
  trainer's thread;
- ``defaults``: one reader one row group ahead, batches on the trainer's thread (tierec's loader
  before it had knobs);
- ``autotune``: `tierec train --input autotune` (profiled at start, chosen by the operational model);
- ``sweep``: every configuration of a grid (reader threads x reads ahead x batch workers x row groups
  per read, and the same with the reader and/or batch workers as processes), one run each; the
  three fastest are run twice more and ranked by their median: the best hand-tuned configuration.
  Autotune runs twice more beside them, and the *head to head* ratio compares those runs with the
  best's reruns of the same minutes.

Worker processes start from a server started once before the runs (`start_process_server`: its
one-time imports are no run's); each pass still forks its own workers (~0.05-0.1 s), inside the
run's time. A last section (alone: --pipeline-only) measures the pipeline without training, its
workers as threads, as processes moving their results through /dev/shm (`TRANSFER` "shm", the
default), and as processes pickling them through the pool's pipe ("pipe"), in alternating order.

The measured rows are noisy on a shared machine (other processes take cores at random): every
figure is the median of --rounds runs taken in alternating order, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0] + "/src")

from tierec.data import workers
from tierec.data.dataset import Dataset
from tierec.data.loader import LoaderSettings
from tierec.data.profile import cpu_count, measure_pipeline, other_cores
from tierec.data.synth import SynthConfig, generate
from tierec.data.workers import start_process_server
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer

MISCONFIGURED = {
    "one-reader-on-demand": LoaderSettings(reader_threads=1, prefetch=0, batch_workers=1),
    "no-prefetch": LoaderSettings(prefetch=0, batch_workers=0),
    "dedup-on-trainer": LoaderSettings(reader_threads=2, prefetch=4, batch_workers=0),
}


def settings_flags(s: LoaderSettings) -> dict:
    return dict(input_readers=s.reader_threads, input_prefetch=s.prefetch, input_read_groups=s.read_groups,
                input_batch_workers=s.batch_workers, input_batch_prefetch=s.batch_prefetch,
                input_cache=str(s.cache_bytes or 0), input_reader_processes=s.process_readers,
                input_batch_processes=s.process_batches)


def grid(quick: bool) -> list[LoaderSettings]:
    readers = (1, 2) if quick else (1, 2, 3)
    workers = (0, 1) if quick else (0, 1, 2)
    groups = (1,) if quick else (1, 4)
    out = []
    for g in groups:
        for bw in workers:
            out.append(LoaderSettings(prefetch=0, read_groups=g, batch_workers=bw, batch_prefetch=max(2, 2 * bw)))
            for r in readers:
                out.append(LoaderSettings(reader_threads=r, prefetch=2 * r, read_groups=g, batch_workers=bw,
                                          batch_prefetch=max(2, 2 * bw)))
    procs = []  # the same with worker processes (one row group a read): all its workers, and readers alone
    for s in out:
        if s.read_groups != 1 or not s.threads:
            continue
        kinds = [(bool(s.prefetch), bool(s.batch_workers))]
        if s.prefetch and s.batch_workers:
            kinds.append((True, False))  # reader processes, batch threads: one transfer a row, not three
        procs += [s.with_(process_readers=pr, process_batches=pb) for pr, pb in kinds]
    return out + procs


PIPELINE_CONFIGS = {
    "2 readers": LoaderSettings(reader_threads=2, prefetch=4),
    "2 readers + 1 batch worker": LoaderSettings(reader_threads=2, prefetch=4, batch_workers=1),
}


def pipeline_check(data: Path, args) -> dict:
    """The pipeline alone (no training), each of `PIPELINE_CONFIGS` with its workers as threads, as processes
    moving their results through /dev/shm (``TRANSFER`` "shm", the default), and as processes pickling them
    through the pool's pipe ("pipe"): rows/s, the median of ``args.rounds`` passes each, taken in alternating
    order after a first round that warms the page cache."""
    ds = Dataset(data)
    rows = min(ds.num_rows("train"), args.steps * args.batch_size * 3)
    kinds = ["threads", "processes shm", "processes pipe"]
    out: dict = {}
    try:
        for r in range(args.rounds + 1):
            for name, s in PIPELINE_CONFIGS.items():
                for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                    workers.TRANSFER = "pipe" if kind.endswith("pipe") else "shm"
                    procs = kind != "threads"
                    cfg = s.with_(process_readers=procs, process_batches=procs and s.batch_workers > 0)
                    run = measure_pipeline(ds, cfg, batch_size=args.batch_size, max_rows=rows, dedup=True)
                    if r:
                        out.setdefault(name, {}).setdefault(kind, []).append(run.rows_per_s)
    finally:
        workers.TRANSFER = "shm"
    return {"rows": rows, "configs": {k: {t: {"rows_per_s": statistics.median(v), "runs": v} for t, v in d.items()}
                                      for k, d in out.items()}}


def print_pipeline(res: dict, rounds: int) -> None:
    print(f"\npipeline alone (no training; {res['rows']:,} rows a pass, median of {rounds} passes in alternating "
          "order), rows/s:")
    print(f"  {'configuration':<28} {'threads':>9} {'processes shm':>14} {'processes pipe':>15}")
    for name, d in res["configs"].items():
        print(f"  {name:<28} {d['threads']['rows_per_s']:>9,.0f} {d['processes shm']['rows_per_s']:>14,.0f} "
              f"{d['processes pipe']['rows_per_s']:>15,.0f}")


def train(data: Path, work: Path, args, settings: LoaderSettings | None, autotune: bool = False) -> dict:
    """One short training run; samples/s and, for autotune, its choice and the profile's seconds."""
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    flags = settings_flags(settings) if settings is not None else {}
    cfg = TrainConfig(data=str(data), out=str(out), batch_size=args.batch_size, max_steps=args.steps,
                      embedding_dim=8, bottom_mlp=[32], top_mlp=[32], progress=False, max_eval_rows=1024,
                      log_every=10, input="autotune" if autotune else "manual", num_threads=args.threads, **flags)
    t0 = time.perf_counter()
    summary = Trainer(cfg).fit()
    total = time.perf_counter() - t0
    rec: dict = {"samples_per_s": summary["samples_per_s"], "train_s": summary["train_s"], "total_s": total}
    if autotune:
        events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        tuned = [e for e in events if e["event"] == "input_autotune"]
        rec["choice"] = tuned[0]["describe"]
        rec["settings"] = tuned[0]["settings"]
        rec["predicted"] = tuned[0]["predicted_rows_per_s"]
        rec["replans"] = len(tuned) - 1
    shutil.rmtree(out, ignore_errors=True)
    return rec


def median_of(runs: list[dict]) -> float:
    return statistics.median(r["samples_per_s"] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~3 minutes: 40k rows, 12 steps, a 13-configuration sweep")
    ap.add_argument("--rows", type=int, default=None, help="rows of the data set (default 120k; quick 40k)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 30; quick 12)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=None, help="runs of each named configuration (default 3; quick 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--user-multi-hot", default="poisson:16", help="IDs per row of the 13 user-side features")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--keep", default=None, help="keep the data set in this directory (reused when it exists)")
    ap.add_argument("--pipeline-only", action="store_true",
                    help="only the last section: the pipeline alone with threads vs worker processes (shm vs pipe)")
    args = ap.parse_args()
    args.rows = args.rows or (40_000 if args.quick else 120_000)
    args.steps = args.steps or (12 if args.quick else 30)
    args.rounds = args.rounds or (2 if args.quick else 3)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="tierec-bench-input-"))
    data = Path(args.keep) if args.keep else work / "data"
    try:
        if not (data / "manifest.json").exists():
            spec = ",".join(["fixed:1", *(f"C{i}={args.user_multi_hot}" for i in range(1, 14))])
            generate(SynthConfig(rows=args.rows, seed=0, multi_hot=spec, user_features=13, session_length=8.0,
                                 row_group_size=8192, progress=False), data)
        ds = Dataset(data)
        size = sum(f["bytes"] for f in ds.manifest["splits"]["train"]["files"])
        load = other_cores()
        print(f"data: {ds.num_rows('train'):,} training rows, {size / 2**20:.1f} MiB of zstd Parquet, 13 user-side "
              f"features multi-hot {args.user_multi_hot} in sessions of 8, deduplicated per batch; batch "
              f"{args.batch_size}, {args.steps} steps per run, torch on {args.threads} thread(s); "
              f"{cpu_count()} cores, {load:.1f} of them busy with other processes at the start")
        print("NOTE: a shared machine is noisy (other processes take cores at random): figures are medians of "
              f"{args.rounds} runs in alternating order; differences under ~15% are within the noise.\n")
        start_process_server()  # worker processes fork from it: its one-time start is no run's
        if args.pipeline_only:
            res = pipeline_check(data, args)
            print_pipeline(res, args.rounds)
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                                                       "cores": cpu_count(), "other_cores_at_start": load,
                                                       "pipeline_alone": res}, indent=2) + "\n")
            return 0
        named: dict[str, LoaderSettings | None] = {**MISCONFIGURED, "defaults": LoaderSettings(), "autotune": None}
        runs: dict[str, list[dict]] = {k: [] for k in named}
        for r in range(args.rounds):
            order = list(named) if r % 2 == 0 else list(reversed(named))
            for name in order:
                rec = train(data, work, args, named[name], autotune=name == "autotune")
                runs[name].append(rec)
                print(f"  round {r + 1} {name:<22} {rec['samples_per_s']:>9,.0f} samples/s"
                      + (f"  (chose: {rec['choice']})" if "choice" in rec else ""), flush=True)
        sweep = []
        print("\nsweep (one run each):")
        for s in grid(args.quick):
            rec = train(data, work, args, s)
            sweep.append({"settings": s, "runs": [rec]})
            print(f"  {s.describe():<100} {rec['samples_per_s']:>9,.0f}", flush=True)
        top = sorted(sweep, key=lambda x: -x["runs"][0]["samples_per_s"])[:3]
        final: list[dict] = []  # autotune again, beside the three fastest: the head-to-head in the same minutes
        print("\nthe three fastest again, and autotune beside them:")
        for _ in range(2):  # ranked by their median, not by one lucky run
            for x in top:
                x["runs"].append(train(data, work, args, x["settings"]))
                print(f"  {x['settings'].describe():<100} {x['runs'][-1]['samples_per_s']:>9,.0f}", flush=True)
            final.append(train(data, work, args, None, autotune=True))
            print(f"  {'autotune (' + final[-1]['choice'] + ')':<100} {final[-1]['samples_per_s']:>9,.0f}", flush=True)
        best = max(top, key=lambda x: median_of(x["runs"]))
        best_rate = median_of(best["runs"])
        head = statistics.mean(r["samples_per_s"] for r in final) / statistics.mean(
            r["samples_per_s"] for r in best["runs"][1:])  # the runs taken in the same minutes
        runs["autotune"] += final
        auto = median_of(runs["autotune"])
        print(f"\nbest hand-tuned (sweep of {len(sweep)}, top 3 rerun twice): {best['settings'].describe()}: "
              f"{best_rate:,.0f} samples/s (median of 3)\n")
        print(f"{'configuration':<22} {'samples/s':>10} {'autotune vs it':>15}")
        table = []
        for name in [*MISCONFIGURED, "defaults"]:
            m = median_of(runs[name])
            table.append({"name": name, "settings": named[name].to_dict(), "samples_per_s": m,  # type: ignore[union-attr]
                          "runs": [x["samples_per_s"] for x in runs[name]], "autotune_speedup": auto / m})
            print(f"{name:<22} {m:>10,.0f} {auto / m:>14.2f}x")
        print(f"{'best hand-tuned':<22} {best_rate:>10,.0f} {auto / best_rate:>14.2f}x   (target >= 0.9x; head to head, "
              f"the runs of the same minutes: {head:.2f}x)")
        print(f"{'autotune':<22} {auto:>10,.0f}   chose: {runs['autotune'][0]['choice']}; profile + choice "
              f"{statistics.median(x['total_s'] - x['train_s'] for x in runs['autotune']):.1f} s per run (setup "
              "included)")
        procs = [x for x in sweep if x["settings"].processes]
        if procs:
            bt = max((x for x in sweep if not x["settings"].processes), key=lambda x: median_of(x["runs"]))
            bp = max(procs, key=lambda x: median_of(x["runs"]))
            print(f"{'best with threads':<22} {median_of(bt['runs']):>10,.0f}   {bt['settings'].describe()}")
            print(f"{'best with processes':<22} {median_of(bp['runs']):>10,.0f}   {bp['settings'].describe()}")
        pipeline = pipeline_check(data, args)
        print_pipeline(pipeline, args.rounds)
        elapsed = time.perf_counter() - t_start
        print(f"\n{elapsed / 60:.1f} min; {time.strftime('%Y-%m-%d %H:%M')}")
        result = {"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args), "cores": cpu_count(),
                  "other_cores_at_start": load, "configurations": table,
                  "autotune": {"samples_per_s": auto, "runs": runs["autotune"]},
                  "best_hand_tuned": {"settings": best["settings"].to_dict(), "samples_per_s": best_rate,
                                      "runs": [x["samples_per_s"] for x in best["runs"]]},
                  "autotune_vs_best": auto / best_rate, "autotune_vs_best_head_to_head": head,
                  "sweep": [{"settings": x["settings"].to_dict(), "samples_per_s": [r["samples_per_s"] for r in x["runs"]]}
                            for x in sweep], "pipeline_alone": pipeline, "minutes": elapsed / 60}
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

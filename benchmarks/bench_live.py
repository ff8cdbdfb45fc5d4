"""Live row updates (`tierec serve --follow`): serving p99 while a training run's checkpoints stream in, and
how stale the served rows are, side by side with a server that does not follow, in one run.

    python benchmarks/bench_live.py                 # ~4 minutes
    python benchmarks/bench_live.py --quick         # ~2 minutes
    python benchmarks/bench_live.py --json runs/live.json

1. A synthetic Criteo-shaped data set (``tierec data synth``: --tables sparse features of --table-rows
   rows), and a DLRM trained --base-steps steps with incremental checkpoints (``--checkpoint-every``,
   one long chain of deltas: ``--checkpoint-chain 1000``).
2. Two ``tierec serve`` processes over that run, tables on the SSD tier behind a 5% cache: ``follow``
   (``--follow --follow-every``) and ``plain`` (the same without it).
3. Phase ``idle``: no training; then phase ``training``: the run resumes (``tierec train --resume``, a
   checkpoint every --checkpoint-every steps) while the load runs. In each phase, --rounds rounds of a
   fixed open-loop load (--rate requests/s of --samples samples, latency from the scheduled send time)
   alternate between the two servers, so both meet the same machine. The training process competes for
   the same cores in phase ``training``: the ``plain`` server's figures there are the price of training
   beside the server, and the ``follow`` server's excess over them the price of the updates.
4. From the follow server's /metrics: checkpoints applied in place (delta) or loaded in full (reload),
   rows applied, and the lag from each checkpoint's ``saved_at`` to its rows serving; from the run's
   manifests the interval between checkpoints. A row's staleness is at most interval + lag.

On this project's 2-core VM the servers, the training run and the load generator share two cores: the
figures are rough, and the output says how loaded the machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serve as bsv  # noqa: E402  (request bodies, open-loop load, /metrics scrapes)

log = logging.getLogger("bench_live")


def tierec(*args: str) -> list[str]:
    return [sys.executable, "-m", "tierec", *args]


class Server(bsv.ServeProcess):
    """`tierec serve` of the run, tables on the SSD tier behind a 5% cache, following it or not; up."""

    def __init__(self, run: Path, data: Path, follow: bool, every: float, log_path: Path, overlay_rows: int = 0):
        extra = ["--follow", "--follow-every", str(every), "--follow-overlay-rows", str(overlay_rows)] if follow else []
        super().__init__([str(run), "--data", str(data), "--tables", "ssd", "--cache-fraction", "0.05", "--warm-rows",
                          "20000", "--threads", "1", *extra], log_path.stem, log_path)
        self.wait()

    def step(self) -> int:
        return int(httpx.get(self.url + "/healthz", timeout=10).json()["ranker"]["step"])


def phase(servers: dict[str, Server], bodies: list[bytes], a, offset: int) -> dict:
    """--rounds rounds of the fixed load, alternating servers; latencies pooled per server."""
    lat: dict[str, list] = {k: [] for k in servers}
    out: dict[str, dict] = {k: {"rounds": []} for k in servers}
    for r in range(a.rounds):
        for k in list(servers) if r % 2 == 0 else list(servers)[::-1]:
            got = asyncio.run(bsv.open_loop(servers[k].url, bodies, a.rate, a.duration, offset + r * 997))
            lat[k].extend(got.pop("latencies_ms"))
            out[k]["rounds"].append(got)
    for k in servers:
        x = np.array(lat[k])
        out[k].update(requests=int(x.size), p50_ms=float(np.percentile(x, 50)), p99_ms=float(np.percentile(x, 99)),
                      errors=sum(r["errors"] for r in out[k]["rounds"]))
    return out


def cpu_busy() -> float:
    """Cores busy machine-wide over the next second (from /proc/stat)."""
    def snap():
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(v), v[3] + v[4]
    t0, i0 = snap()
    time.sleep(1.0)
    t1, i1 = snap()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(1, t1 - t0))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller data and shorter rounds (~2 minutes)")
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--table-rows", type=int, default=None, help="rows per table (default 200000; quick 50000)")
    p.add_argument("--rows", type=int, default=None, help="training samples (default 1000000; quick 300000)")
    p.add_argument("--base-steps", type=int, default=20)
    p.add_argument("--checkpoint-every", type=int, default=10, help="training steps between publications")
    p.add_argument("--follow-every", type=float, default=0.5, help="seconds between the server's looks at LATEST")
    p.add_argument("--rate", type=float, default=40.0, help="requests/s of the fixed load")
    p.add_argument("--samples", type=int, default=16, help="samples per request")
    p.add_argument("--duration", type=float, default=None, help="seconds per round (default 6; quick 3)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    a.table_rows = a.table_rows or (50_000 if a.quick else 200_000)
    a.rows = a.rows or (300_000 if a.quick else 1_000_000)
    a.duration = a.duration or (3.0 if a.quick else 6.0)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="tierec-live-", dir="runs" if Path("runs").is_dir() else None))
    work.mkdir(parents=True, exist_ok=True)
    data, run = work / "data", work / "run"
    servers: dict[str, Server] = {}
    trainer = None
    res: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
    try:
        bsv.run(tierec("data", "synth", "--out", str(data), "--rows", str(a.rows), "--num-sparse", str(a.tables),
                       "--cardinalities", str(a.table_rows), "--max-cardinality", "0", "--seed", "0",
                       "--no-progress"))
        train = tierec("train", "--data", str(data), "--out", str(run), "--embedding-dim", "16", "--batch-size",
                       "2048", "--checkpoint-every", str(a.checkpoint_every), "--checkpoint-chain", "1000",
                       "--keep-checkpoints", "3", "--eval-every", "0", "--no-progress", "--num-threads", "1")
        bsv.run(train + ["--max-steps", str(a.base_steps)])
        bodies = bsv.request_bodies(str(data), a.samples, 400)
        servers = {"follow": Server(run, data, True, a.follow_every, work / "follow.log", a.tables * a.table_rows),
                   "plain": Server(run, data, False, a.follow_every, work / "plain.log")}
        for s in servers.values():  # warm-up
            asyncio.run(bsv.closed_loop(s.url, bodies, 4, 2.0, 0))
        res["idle"] = phase(servers, bodies, a, 0)
        res["idle_cores_busy"] = cpu_busy()
        before = live_scrape(servers["follow"].url)
        step0 = servers["follow"].step()
        tlog = open(work / "train.log", "w")
        trainer = subprocess.Popen(train + ["--resume", "--max-steps", "100000"], stdout=tlog,
                                   stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while servers["follow"].step() == step0:  # the first publication reached the server: updates stream
            if trainer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"training wrote no checkpoint the server took; see {work / 'train.log'}")
            time.sleep(0.2)
        res["training"] = phase(servers, bodies, a, 5000)
        res["training_cores_busy"] = cpu_busy()
        trainer.send_signal(signal.SIGINT)
        trainer.wait(120)
        tlog.close()
        after = live_scrape(servers["follow"].url)
        res["served_steps"] = {k: s.step() for k, s in servers.items()}
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
        for s in servers.values():
            s.stop()
    res["updates"] = live_figures(before, after, run)
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    report(res)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2))
    return 0


def live_scrape(url: str) -> dict:
    """The follow server's live-update metrics, the kinds apart: {name or name@kind or bucket@le: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for smp in fam.samples:
            if smp.name.startswith("tierec_live"):
                tag = smp.labels.get("kind") or smp.labels.get("le")
                key = smp.name + (f"@{tag}" if tag is not None else "")
                out[key] = out.get(key, 0.0) + smp.value
    return out


def live_figures(before: dict, after: dict, run: Path) -> dict:
    """Publications applied between two scrapes of the follow server, rows, lag (mean, and the bucket bound of
    the largest); the run's interval between checkpoints (from the manifests' saved_at)."""
    def d(k):
        return after.get(k, 0.0) - before.get(k, 0.0)

    n = d("tierec_live_lag_seconds_count")
    buckets = sorted((float(k.split("@")[1]), d(k)) for k in after if k.startswith("tierec_live_lag_seconds_bucket@"))
    worst = next((le for le, c in buckets if c >= n), None) if n else None
    saved = []
    for m in (run / "checkpoints").glob("step-*/manifest.json"):
        s = json.loads(m.read_text()).get("saved_at")
        if isinstance(s, (int, float)):
            saved.append(s)
    saved.sort()
    gaps = np.diff(saved) if len(saved) > 1 else np.array([])
    return {"applied": int(n), "deltas": int(d("tierec_live_updates_total@delta")),
            "reloads": int(d("tierec_live_updates_total@reload")), "rows": int(d("tierec_live_rows_total")),
            "lag_mean_s": d("tierec_live_lag_seconds_sum") / n if n else None, "lag_max_bound_s": worst,
            "checkpoint_interval_s": float(np.median(gaps)) if gaps.size else None}


def report(res: dict) -> None:
    print("\nserving p50 / p99 (ms) under the same fixed load, SSD tier behind a 5% cache")
    print(f"{'phase':<10} {'server':<8} {'requests':>8} {'p50':>8} {'p99':>8} {'errors':>6}")
    for ph in ("idle", "training"):
        for k, x in res[ph].items():
            print(f"{ph:<10} {k:<8} {x['requests']:>8} {x['p50_ms']:>8.1f} {x['p99_ms']:>8.1f} {x['errors']:>6}")
        f, pl = res[ph]["follow"], res[ph]["plain"]
        print(f"{'':<10} follow/plain: p50 {f['p50_ms'] / pl['p50_ms']:.2f}x, p99 {f['p99_ms'] / pl['p99_ms']:.2f}x")
    u = res["updates"]
    print(f"\nwhile training: {u['applied']} checkpoints applied ({u['deltas']} in place, {u['reloads']} loaded in "
          f"full), {u['rows']:,} rows in place ({u['rows'] / max(1, u['deltas']):,.0f} per checkpoint); lag from "
          "saved_at to serving: "
          f"mean {u['lag_mean_s'] or 0:.2f} s, max <= {u['lag_max_bound_s']} s; checkpoint interval "
          f"{u['checkpoint_interval_s'] or 0:.2f} s: a row's staleness <= "
          f"{(u['checkpoint_interval_s'] or 0) + (u['lag_max_bound_s'] or 0):.2f} s")
    print(f"served steps at the end: {res['served_steps']}; cores busy: idle phase {res['idle_cores_busy']:.1f}, "
          f"training phase {res['training_cores_busy']:.1f} (of {os.cpu_count()})")


if __name__ == "__main__":
    sys.exit(main())

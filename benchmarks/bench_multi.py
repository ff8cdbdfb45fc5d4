"""Several models on one machine (`tierec serve-many`): total throughput and per-model p99 for N = 1..4 models
under one router against N separate `tierec serve` processes, and whether a hot model starves a cold one.

    python benchmarks/bench_multi.py            # ~6 minutes
    python benchmarks/bench_multi.py --quick    # ~3 minutes
    python benchmarks/bench_multi.py --json runs/multi.json

1. A synthetic Criteo-shaped data set and a DLRM trained --train-steps steps (every model serves this
   checkpoint: the figures are about sharing the machine, not about the models).
2. For N = 1..--max-models: (a) ``tierec serve-many`` with N models (one `tierec serve` child each, behind
   the router, in this process) and (b) N separate ``tierec serve`` processes, one port each. Every model
   gets --clients closed-loop clients for --duration seconds, all models at once: total requests/s and
   each model's p99, and the router process's own CPU time per request (/proc: what the hop costs, a
   figure that holds up better than throughput when other jobs share the cores).
3. Hot and cold: two models under the router, the cold one at a fixed --cold-rate requests/s (open loop,
   latency from the scheduled send), first alone, then while the hot one takes --hot-clients closed-loop
   clients; without and with ``--model-cpus`` (each child pinned to a core of its own).

Tables in DRAM (``--tables dram``): the comparison is about processes and cores, not the SSD tier. On this
project's 2-core VM with other jobs beside it the ratios are rough; the output says how busy the machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serve as bsv  # noqa: E402  (request bodies, ServeProcess)

log = logging.getLogger("bench_multi")


async def closed(url: str, path: str, bodies: list[bytes], clients: int, seconds: float) -> list[float]:
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        loop = asyncio.get_running_loop()
        stop = loop.time() + seconds

        async def one(k: int):
            i = k
            while loop.time() < stop:
                t = loop.time()
                r = await c.post(path, content=bodies[i % len(bodies)], headers={"content-type": "application/json"})
                if r.status_code == 200:
                    lat.append(loop.time() - t)
                i += clients

        await asyncio.gather(*(one(k) for k in range(clients)))
    return lat


async def opened(url: str, path: str, bodies: list[bytes], rate: float, seconds: float) -> list[float]:
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.05

        async def one(i: int):
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            r = await c.post(path, content=bodies[i % len(bodies)], headers={"content-type": "application/json"})
            if r.status_code == 200:
                lat.append(loop.time() - due)

        await asyncio.gather(*(one(i) for i in range(int(rate * seconds))))
    return lat


def figures(lat: list[float], seconds: float) -> dict:
    a = np.array(lat) * 1e3 if lat else np.array([np.nan])
    return {"requests": len(lat), "rps": len(lat) / seconds, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99))}


class Router(bsv.ServeProcess):
    """`tierec serve-many` as a process of its own (as a user runs it: the router's event loop is not the load
    generator's), up once its /healthz answers (every child up)."""

    def __init__(self, specs: list[str], args: list[str], cpus: list[str], work: Path):
        self.name, self.port = "serve-many", bsv.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "serve-many.log"
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "tierec", "serve-many", "--port", str(self.port), "--log-dir", str(work)]
        for m in specs:
            cmd += ["--model", m]
        for x in args:
            cmd += ["--model-args", x]
        for c in cpus:
            cmd += ["--model-cpus", c]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        self.t0 = time.perf_counter()
        self.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (its own, not its children's: the router alone)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def load_all(targets: list[tuple[str, str]], bodies, clients: int, seconds: float) -> list[dict]:
    """Every (url, path) at once, ``clients`` closed-loop clients each."""
    async def run():
        return await asyncio.gather(*(closed(u, p, bodies, clients, seconds) for u, p in targets))
    return [figures(lat, seconds) for lat in asyncio.run(run())]


def serve_args(ckpt: str, data: str) -> list[str]:
    return [ckpt, "--tables", "dram", "--warm-rows", "0", "--data", data, "--threads", "1"]


def sweep(a, ckpt: str, data: str, bodies, work: Path) -> dict:
    out = {}
    for n in range(1, a.max_models + 1):
        names = [f"m{i}" for i in range(n)]
        router = Router([f"{m}={ckpt}" for m in names],
                        [f"{m}=" + " ".join(serve_args(ckpt, data)[1:]) for m in names], [], work)
        try:
            cpu0 = cpu_seconds(router.proc.pid)
            many = load_all([(router.url, f"/v1/models/{m}/predict") for m in names], bodies, a.clients, a.duration)
            cpu = cpu_seconds(router.proc.pid) - cpu0
        finally:
            router.stop()
        procs = [bsv.ServeProcess(serve_args(ckpt, data), f"separate-{m}") for m in names]
        try:
            for p in procs:
                p.wait()
            sep = load_all([(p.url, "/v1/predict") for p in procs], bodies, a.clients, a.duration)
        finally:
            for p in procs:
                p.stop()
        done = sum(x["requests"] for x in many)
        out[n] = {"serve_many": many, "separate": sep, "router_cpu_ms_per_request": 1e3 * cpu / max(done, 1),
                  "router_cpu_share": cpu / a.duration}
        log.info("N=%d: serve-many %.1f req/s (router %.2f ms CPU a request), separate %.1f req/s", n,
                 sum(x["rps"] for x in many), out[n]["router_cpu_ms_per_request"], sum(x["rps"] for x in sep))
    return out


def hot_cold(a, ckpt: str, data: str, bodies, work: Path) -> dict:
    res = {}
    for pinned in (False, True):
        cpus = ["hot=0", "cold=1"] if pinned and len(os.sched_getaffinity(0)) >= 2 else []
        args = " ".join(serve_args(ckpt, data)[1:])
        router = Router([f"hot={ckpt}", f"cold={ckpt}"], [f"hot={args}", f"cold={args}"], cpus, work)
        try:
            alone = figures(asyncio.run(opened(router.url, "/v1/models/cold/predict", bodies, a.cold_rate,
                                               a.duration)), a.duration)

            async def both(url: str = router.url):
                return await asyncio.gather(
                    opened(url, "/v1/models/cold/predict", bodies, a.cold_rate, a.duration),
                    closed(url, "/v1/models/hot/predict", bodies, a.hot_clients, a.duration))
            cold, hot = asyncio.run(both())
        finally:
            router.stop()
        res["pinned" if cpus else "shared cores"] = {"cold_alone": alone, "cold_beside_hot": figures(cold, a.duration),
                                                     "hot": figures(hot, a.duration)}
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--max-models", type=int, default=4)
    p.add_argument("--clients", type=int, default=2, help="closed-loop clients per model")
    p.add_argument("--duration", type=float, default=None, help="seconds per measurement (default 8; quick 4)")
    p.add_argument("--samples", type=int, default=16, help="samples per request")
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--hot-clients", type=int, default=8)
    p.add_argument("--cold-rate", type=float, default=10.0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    a.duration = a.duration or (4.0 if a.quick else 8.0)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="tierec-multi-"))
    work.mkdir(parents=True, exist_ok=True)
    data, run = work / "data", work / "run"
    try:
        bsv.run([sys.executable, "-m", "tierec", "data", "synth", "--out", str(data), "--rows", "200000",
                 "--num-sparse", "8", "--cardinalities", "100000", "--max-cardinality", "0", "--seed", "0",
                 "--no-progress"])
        bsv.run([sys.executable, "-m", "tierec", "train", "--data", str(data), "--out", str(run), "--max-steps",
                 str(a.train_steps), "--batch-size", "2048", "--no-progress", "--num-threads", "1", "--eval-every",
                 "0"])
        bodies = bsv.request_bodies(str(data), a.samples, 200)
        t0 = time.time()
        res = {"sweep": sweep(a, str(run), str(data), bodies, work),
               "hot_cold": hot_cold(a, str(run), str(data), bodies, work), "seconds": time.time() - t0,
               "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report(res)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


def report(res: dict) -> None:
    print("\nN models, the same load per model (closed loop): total req/s and each model's p99 (ms)")
    print(f"{'N':>2} {'serve-many req/s':>17} {'separate req/s':>15} {'ratio':>6} {'router CPU ms/req':>18}  "
          "p99 serve-many / separate")
    for n, r in res["sweep"].items():
        m, s = r["serve_many"], r["separate"]
        tm, ts = sum(x["rps"] for x in m), sum(x["rps"] for x in s)
        p99 = ", ".join(f"{x['p99_ms']:.0f}/{y['p99_ms']:.0f}" for x, y in zip(m, s, strict=True))
        print(f"{n:>2} {tm:>17.1f} {ts:>15.1f} {tm / ts:>6.2f} {r['router_cpu_ms_per_request']:>18.3f}  {p99}")
    print("\nhot and cold (the cold model at a fixed rate, open loop): cold p50 / p99 (ms)")
    for k, r in res["hot_cold"].items():
        al, be = r["cold_alone"], r["cold_beside_hot"]
        print(f"  {k:<13} alone {al['p50_ms']:.1f} / {al['p99_ms']:.1f}; beside the hot model "
              f"{be['p50_ms']:.1f} / {be['p99_ms']:.1f} (p99 {be['p99_ms'] / al['p99_ms']:.2f}x); hot model "
              f"{r['hot']['rps']:.1f} req/s")
    print(f"({res['cpus']} cores; load average at the end {res['load_avg'][0]:.1f}: figures on a busy VM are rough)")


if __name__ == "__main__":
    sys.exit(main())

"""Dense weights off-device (`tierec serve --dense-budget`): latency and throughput of a model with large dense
towers as its budget for dense weights shrinks, with and without read-ahead, O_DIRECT vs the page cache, side
by side with the model all in memory, in one run; then a plain server and a streaming one under the same load.

    python benchmarks/bench_dense.py                 # ~5-10 minutes (a 207 MiB DCNv2)
    python benchmarks/bench_dense.py --quick         # ~1-2 minutes (a ~40 MiB DCNv2)
    python benchmarks/bench_dense.py --json runs/dense.json

1. A synthetic data set (``tierec data synth``: 13 dense, 13 sparse features of 1,000 rows) and a DCNv2 with
   wide dense towers: embedding dim --dim (z = 14 x dim wide), --cross full-rank cross layers [z, z], a top MLP
   of --top-layers layers of --top-width (default: dim 128, 4 cross layers of 12.3 MiB, 10 top layers of 14-16
   MiB: 207 MiB of dense weights). Training such a model to convergence would take hours on this VM, so it is
   *trained one SGD step* from its random initialisation (weights that are random numbers as far as timing is
   concerned); the checkpoint is a real one (`tierec serve` loads it).
2. In process, on `LoadedModel.forward` (the served path: fused lookup, bottom MLP, cross network, top MLP),
   closed loop, one batch of --batch test samples after another, --batches timed batches per configuration
   after two untimed ones: the model all in memory ("100 %"), then every budget of --budgets (percent of the
   dense bytes) x read-ahead depth 0 / 2 (`--dense-prefetch`) x O_DIRECT / page cache (`--dense-direct-io`).
   Every configuration's logits are checked equal to the in-memory model's, bit for bit ("exact"). One more row:
   budget 0 %, depth 2, O_DIRECT, without the crc32 check of each read (`--no-dense-verify`), its CPU cost.
3. Two ``tierec serve --tables dram`` processes (plain, and ``--dense-budget`` of --server-budget percent),
   --rounds rounds of --seconds each of closed-loop load (--clients clients, requests of --samples samples),
   alternating; latency, requests/s, VmRSS, and the streaming server's own /metrics.

On this project's 2-core VM, shared with other jobs, the model thread, the reader thread, the servers and the
load generator share two cores: the output reports how busy they were. Read ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import datetime
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serve as bsv  # noqa: E402  (free ports, request bodies, closed-loop load, /proc memory)

log = logging.getLogger("bench_dense")


def cpu_busy(seconds: float = 1.0) -> float:
    """Cores busy machine-wide over the next ``seconds`` (from /proc/stat)."""
    def snap():
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(v), v[3] + v[4]
    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(1, t1 - t0))


def prepare(a, work: Path) -> tuple[Path, Path]:
    from tierec.data.synth import SynthConfig, generate
    from tierec.train.config import TrainConfig
    from tierec.train.trainer import Trainer

    data, run = work / "data", work / "dcn"
    if not (data / "manifest.json").exists():
        generate(SynthConfig(rows=4000, num_sparse=13, cardinalities=[1000], num_dense=13, seed=3, progress=False),
                 data, progress=False)
    if not run.exists():
        t0 = time.perf_counter()
        Trainer(TrainConfig(data=str(data), out=str(run), model="dcnv2", embedding_dim=a.dim, bottom_mlp=[256],
                            cross_layers=a.cross, cross_rank=0, top_mlp=[a.top_width] * a.top_layers,
                            dense_optimizer="sgd", batch_size=256,
                            max_steps=1, progress=False, num_threads=1, eval_batch_size=4096, max_eval_rows=512)).fit()
        log.info("trained one step in %.1f s", time.perf_counter() - t0)
    return data, run


def measure(lm, dense, sparse, ref, batches: int) -> dict:
    with torch.no_grad():
        for _ in range(2):
            out = lm.forward(dense, sparse)
        exact = bool(torch.equal(out, ref))
        st0 = lm.dense.stats() if lm.dense is not None else None
        lat = []
        for _ in range(batches):
            t = time.perf_counter()
            lm.forward(dense, sparse)
            lat.append(time.perf_counter() - t)
    x = np.array(lat) * 1000
    res = {"p50_ms": float(np.percentile(x, 50)), "p99_ms": float(np.percentile(x, 99)),
           "samples_per_s": dense.shape[0] * batches / float(np.sum(lat)), "exact": exact}
    if st0 is not None:
        st = lm.dense.stats()
        res.update(resident_bytes=st["resident_bytes"], streamed_bytes=st["streamed_bytes"],
                   layers_streamed=st["streamed_layers"], layers_resident=st["resident_layers"], io=st["io"],
                   wait_ms_per_batch=(st["wait_seconds"] - st0["wait_seconds"]) / batches * 1000,
                   read_mb_per_batch=(st["read_bytes"] - st0["read_bytes"]) / batches / 2**20,
                   demand_reads=st["demand_reads"] - st0["demand_reads"])
    return res


def in_process(a, run: Path, data: Path) -> dict:
    from tierec.data.dataset import Dataset
    from tierec.inference.dense_stream import DenseSettings, dense_bytes
    from tierec.inference.model_store import ServeOptions, load_model

    torch.set_num_threads(1)
    plain = load_model(str(run), ServeOptions(tables="dram"))
    total = dense_bytes(plain.model)
    b = next(Dataset(str(data)).batches("test", a.batch))
    dense, sparse = b.dense, b.sparse
    with torch.no_grad():
        ref = plain.forward(dense, sparse)
    rows = [{"budget_pct": 100, "depth": None, "io": "memory", "verify": True,
             **measure(plain, dense, sparse, ref, a.batches),
             "resident_bytes": total}]
    log.info("all in memory: %s", rows[0])
    configs = [(pct, io, depth, True) for pct in a.budgets for io in ("direct", "cached") for depth in (0, 2)]
    for pct, io, depth, verify in configs + [(0, "direct", 2, False)]:
        s = DenseSettings(int(total * pct / 100), depth, str(a.dense_dir), direct_io=io == "direct", verify=verify)
        lm = dataclasses.replace(plain, model=copy.deepcopy(plain.model),
                                 options=dataclasses.replace(plain.options, dense=s), dense=None)
        try:
            r = {"budget_pct": pct, "depth": depth, "verify": verify, **measure(lm, dense, sparse, ref, a.batches)}
            r["io_asked"] = io  # r["io"]: what the weight file got ("cached" where O_DIRECT was refused)
        finally:
            lm.close()
        log.info("%s", r)
        rows.append(r)
    base = rows[0]
    for r in rows:
        r["p50_ratio"] = r["p50_ms"] / base["p50_ms"]
        r["p99_ratio"] = r["p99_ms"] / base["p99_ms"]
        r["throughput_ratio"] = r["samples_per_s"] / base["samples_per_s"]
    return {"dense_bytes": total, "rows": rows, "batch": a.batch, "batches": a.batches}


class Server(bsv.ServeProcess):
    """`tierec serve` of the run, tables in DRAM, with ``extra`` flags; up."""

    def __init__(self, run: Path, data: Path, extra: list[str], log_path: Path):
        super().__init__([str(run), "--data", str(data), "--tables", "dram", "--threads", "1", "--max-batch", "64",
                          *extra], log_path.stem, log_path)
        self.wait()


def scrape_dense(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name.startswith("tierec_dense"):
                key = s.name + "".join(f"{{{v}}}" for k, v in sorted(s.labels.items()) if k != "model")
                out[key] = s.value
    return out


def servers(a, run: Path, data: Path, total: int, work: Path) -> dict:
    bodies = bsv.request_bodies(str(data), a.samples, 64)
    budget = int(total * a.server_budget / 100)
    srv = {"plain": Server(run, data, [], work / "plain.log"),
           f"dense {a.server_budget}%": Server(run, data, ["--dense-budget", str(budget), "--dense-dir",
                                                            str(a.dense_dir)], work / "dense.log")}
    try:
        same = [httpx.post(s.url + "/v1/predict", content=bodies[0], headers={"content-type": "application/json"},
                           timeout=60).json()["logits"] for s in srv.values()]
        out: dict[str, dict] = {k: {"rounds": []} for k in srv}
        busy = []
        for r in range(a.rounds):
            for k in list(srv) if r % 2 == 0 else list(srv)[::-1]:
                got = asyncio.run(bsv.closed_loop(srv[k].url, bodies, a.clients, a.seconds, r * 7))
                out[k]["rounds"].append(got)
            busy.append(cpu_busy(0.5))
        for k, s in srv.items():
            rs = out[k]["rounds"]
            out[k].update(rps=float(np.mean([x["rps"] for x in rs])), p50_ms=float(np.median([x["p50_ms"] for x in rs])),
                          p99_ms=float(np.max([x["p99_ms"] for x in rs])), errors=sum(x["errors"] for x in rs),
                          mem=bsv.proc_mem(s.proc.pid), dense=scrape_dense(s.url))
        return {"budget_bytes": budget, "servers": out, "same_logits": same[0] == same[1], "cores_busy_after": busy}
    finally:
        for s in srv.values():
            s.stop()


def mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def report(a, res: dict) -> None:
    ip = res["in_process"]
    print(f"\n# bench_dense.py{' --quick' if a.quick else ''}: {res['date']}, {os.cpu_count()} cores shared with other "
          f"jobs (load average {res['loadavg']}; cores busy before the run: {res['cores_busy_before']:.1f})")
    print(f"DCNv2, embedding dim {a.dim}, {a.cross} full-rank cross layers, top MLP {a.top_layers} x {a.top_width}: "
          f"{mib(ip['dense_bytes'])} MiB of dense weights (random init + one SGD step); batches of {ip['batch']} "
          f"samples, {ip['batches']} timed per row, 1 torch thread\n")
    print("| budget | read-ahead | reads | resident MiB | streamed MiB/batch | p50 ms | p99 ms | samples/s | "
          "p50 / mem | p99 / mem | samples/s / mem | wait ms/batch | exact |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in ip["rows"]:
        io = r["io"] + ("" if r["verify"] else ", no crc32")
        print(f"| {r['budget_pct']} % | {'-' if r['depth'] is None else r['depth']} | {io} | "
              f"{mib(r['resident_bytes'])} | {r.get('read_mb_per_batch', 0):,.1f} | {r['p50_ms']:,.1f} | "
              f"{r['p99_ms']:,.1f} | {r['samples_per_s']:,.0f} | {r['p50_ratio']:.2f} | {r['p99_ratio']:.2f} | "
              f"{r['throughput_ratio']:.2f} | {r.get('wait_ms_per_batch', 0):,.1f} | {'yes' if r['exact'] else 'NO'} |")
    sv = res.get("servers")
    if sv:
        print(f"\nServers (`tierec serve --tables dram --threads 1 --max-batch 64`, the streaming one with "
              f"`--dense-budget {sv['budget_bytes']}`): {a.rounds} rounds x {a.seconds:g} s of {a.clients} closed-loop "
              f"clients, {a.samples} samples per request, alternating; same logits for one request: "
              f"{sv['same_logits']}; cores busy after each round pair: {', '.join(f'{x:.1f}' for x in sv['cores_busy_after'])}\n")
        print("| server | req/s | samples/s | p50 ms | p99 ms | errors | VmRSS MiB | RssAnon MiB | VmHWM MiB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for k, s in sv["servers"].items():
            print(f"| {k} | {s['rps']:,.1f} | {s['rps'] * a.samples:,.0f} | {s['p50_ms']:,.1f} | {s['p99_ms']:,.1f} | "
                  f"{s['errors']} | {mib(s['mem'].get('VmRSS', 0))} | {mib(s['mem'].get('RssAnon', 0))} | "
                  f"{mib(s['mem'].get('VmHWM', 0))} |")
        d = next(s["dense"] for k, s in sv["servers"].items() if k != "plain")
        print("\nstreaming server's /metrics: " + ", ".join(f"{k} = {v:,.3f}" if isinstance(v, float) and v % 1 else
                                                        f"{k} = {int(v):,}" for k, v in sorted(d.items())))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~70 MB model, fewer batches, shorter server rounds (~2-3 min)")
    p.add_argument("--dim", type=int, default=None, help="embedding dim (default 128; quick 64): z = 14 x dim")
    p.add_argument("--cross", type=int, default=None, help="full-rank cross layers (default 4; quick 3)")
    p.add_argument("--top-layers", type=int, default=10, help="top MLP hidden layers")
    p.add_argument("--top-width", type=int, default=None, help="top MLP width (default 2048; quick 1024)")
    p.add_argument("--batch", type=int, default=64, help="samples per batch")
    p.add_argument("--batches", type=int, default=None, help="timed batches per configuration (default 12; quick 8)")
    p.add_argument("--budgets", type=int, nargs="+", default=[50, 25, 10, 0], help="percent of the dense bytes")
    p.add_argument("--server-budget", type=int, default=25, help="the streaming server's budget, percent")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--samples", type=int, default=16, help="samples per request")
    p.add_argument("--seconds", type=float, default=None, help="seconds per server round (default 15; quick 6)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip-servers", action="store_true")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    p.add_argument("--dense-dir", type=Path, default=None, help="where the weight files go (default: the workdir)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    q = a.quick
    a.dim = a.dim or (64 if q else 128)
    a.cross = a.cross or (3 if q else 4)
    a.top_width = a.top_width or (1024 if q else 2048)
    a.batches = a.batches or (8 if q else 12)
    a.seconds = a.seconds or (6.0 if q else 15.0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("tierec").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-dense-"))
    work.mkdir(parents=True, exist_ok=True)
    a.dense_dir = a.dense_dir or work
    t0 = time.perf_counter()
    res: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "cores": os.cpu_count(), "loadavg": Path("/proc/loadavg").read_text().split()[0],
        "cores_busy_before": cpu_busy()}
    try:
        data, run = prepare(a, work)
        res["in_process"] = in_process(a, run, data)
        if not a.skip_servers:
            res["servers"] = servers(a, run, data, res["in_process"]["dense_bytes"], work)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t0
    report(a, res)
    print(f"\n({res['seconds']:.0f} s)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

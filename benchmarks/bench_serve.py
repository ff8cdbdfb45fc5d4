"""Serving from the SSD tier vs all in DRAM: a bounded HTTP load test on loopback, plus ANN retrieval.

    python benchmarks/bench_serve.py                      # 26 tables x 1,000,000 rows x 64 dims (6.2 GiB)
    python benchmarks/bench_serve.py --table-rows 250000  # a quicker run (1.55 GiB of tables)
    python benchmarks/bench_serve.py --json runs/serve.json

1. Prepare (once, kept under --dir, default runs/bench_serve/): a synthetic Criteo-shaped data
   set (tierec.data.synth, "auto" skew, --tables sparse features of --table-rows rows, the first
   3 user-side, sessions of 8), a DLRM trained for --train-steps steps (the ranker) and a
   two-tower model trained as long (the retriever), both with `tierec train`.
2. Load test. The same DLRM checkpoint is served by one `tierec serve` process per mode, all
   up at once (only one under load at a time):
   (a) ``--tables dram``: every table in memory;
   (b) ``ssd``: ``--tables ssd --cache-fraction 0.05 --direct-io``: tables read-only from the
       checkpoint's files with O_DIRECT (no table bytes in the page cache or the process's
       mappings) behind one DRAM cache of 5 % of all rows, warmed from training statistics;
   (c) ``ssd-mmap``: the same with the files memory-mapped (misses may be served from the OS
       page cache, i.e. from memory outside the process; mapped pages count in RssFile).
   Requests carry --samples rows of the test split each (pre-serialised JSON). Warm-up, then
   --rounds rounds of a fixed offered load (open loop: request i is sent at i / --rate seconds;
   latency counted from that scheduled time, so queueing is included) in which every mode gets
   the same requests, the modes alternating so that the machine's drift hits all alike;
   latencies are pooled over the rounds. Then saturation (closed loop, --concurrency clients
   back to back). Reports requests/s, p50/p99 latency, errors, the server's VmRSS / VmHWM /
   RssAnon (from /proc/PID/status), and from its /metrics the cache hit rate, bytes read from
   SSD, mean batch size and per batch the model time and the wait on SSD reads; ratios ssd/dram.
   The device under the table files is probed (`tierec.storage.probe`: random 4 KiB O_DIRECT
   reads at queue depths 1 and 8) before and after the load: an SSD-tier request that misses N
   rows waits on about N such reads, so its tail follows the device's.
3. Retrieval: the two-tower model's item vectors of the distinct items in --corpus-rows
   training rows go into a faiss HNSW index (M, efConstruction, efSearch printed); recall@10
   of 1000 test users' queries against exact search, and queries/s (one query per call).

The load generator (httpx, asyncio) runs in this process, on the same machine as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_serve")


def run(cmd: list[str]) -> None:
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def prepare(a) -> dict:
    d = Path(a.dir)
    tag = f"t{a.tables}-r{a.table_rows}-d{a.dim}-n{a.rows}-s{a.train_steps}"
    base = d / tag
    data, dlrm, tt = base / "data", base / "dlrm", base / "tt"
    py = [sys.executable, "-m", "tierec"]
    if not (data / "manifest.json").exists():
        run(py + ["data", "synth", "--out", str(data), "--rows", str(a.rows), "--num-sparse", str(a.tables),
                  "--cardinalities", str(a.table_rows), "--max-cardinality", "0", "--session-length", "8",
                  "--user-features", "3", "--seed", "0", "--no-progress"])
    common = ["--data", str(data), "--embedding-dim", str(a.dim), "--max-steps", str(a.train_steps),
              "--batch-size", "1024", "--no-progress", "--num-threads", "2", "--max-eval-rows", "20000"]
    for out, extra in ((dlrm, []), (tt, ["--model", "two-tower"])):
        if not (out / "checkpoints" / "LATEST").exists():
            run(py + ["train", "--out", str(out), "--overwrite", *common, *extra])
    return {"data": str(data), "dlrm": str(dlrm), "tt": str(tt)}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def proc_mem(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out


def request_bodies(data: str, samples: int, count: int) -> list[bytes]:
    """``count`` JSON bodies of ``samples`` test rows each (raw feature name -> values)."""
    from tierec.data.dataset import Dataset

    ds = Dataset(data)
    bodies = []
    for chunk in ds.chunks("test", samples):
        if len(chunk) < samples:
            break
        rows = [{} for _ in range(samples)]
        for j, name in enumerate(ds.schema.dense):
            for i, v in enumerate(chunk.dense[:, j].tolist()):
                rows[i][name] = v
        for name, (v, o) in chunk.sparse.items():
            vl, ol = v.tolist(), o.tolist()
            for i in range(samples):
                rows[i][name] = vl[ol[i] : ol[i + 1]]
        bodies.append(json.dumps({"samples": rows}).encode())
        if len(bodies) == count:
            break
    return bodies


async def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float, offset: int) -> dict:
    """Send request i at t0 + i / rate; latency from the scheduled time (includes queueing)."""
    n = int(rate * seconds)
    lat, codes = [], []
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.05

        async def one(i):
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            r = await c.post("/v1/predict", content=bodies[(offset + i) % len(bodies)],
                             headers={"content-type": "application/json"})
            lat.append(loop.time() - due)
            codes.append(r.status_code)

        await asyncio.gather(*(one(i) for i in range(n)))
        wall = loop.time() - t0
    return {**summarise(lat, codes, wall), "latencies_ms": [x * 1000 for x in lat]}


async def closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float, offset: int) -> dict:
    lat, codes = [], []
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        stop = t0 + seconds
        counter = iter(range(10**9))

        async def client():
            while loop.time() < stop:
                i = next(counter)
                t = loop.time()
                r = await c.post("/v1/predict", content=bodies[(offset + i) % len(bodies)],
                                 headers={"content-type": "application/json"})
                lat.append(loop.time() - t)
                codes.append(r.status_code)

        await asyncio.gather(*(client() for _ in range(clients)))
        wall = loop.time() - t0
    return summarise(lat, codes, wall)


def summarise(lat: list[float], codes: list[int], wall: float) -> dict:
    a = np.array(lat) * 1000
    return {"requests": len(lat), "rps": len(lat) / wall, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "errors": sum(c != 200 for c in codes)}


def scrape(url: str) -> dict:
    """The server's /metrics as {sample name: value} (summed over labels; histogram buckets keyed by le)."""
    from prometheus_client.parser import text_string_to_metric_families

    vals: dict = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            key = s.name + (f"@{float(s.labels['le'])}" if s.name.endswith("_bucket") else "")
            vals[key] = vals.get(key, 0.0) + s.value
    return vals


def server_figures(before: dict, after: dict) -> dict:
    """What a server did between two scrapes: cache hit rate, bytes read, mean batch size, and per batch
    the model time and the wait on reads of missed rows (means, and the shares of slow batches)."""
    d = {k: v - before.get(k, 0.0) for k, v in after.items()}

    def mean(name):
        return d.get(name + "_sum", 0.0) / max(d.get(name + "_count", 0.0), 1.0)

    def share_over(name, seconds):  # batches slower than ``seconds`` (a bucket bound)
        n = d.get(name + "_count", 0.0)
        return (n - d.get(f"{name}_bucket@{seconds}", n)) / n if n else None

    lookups = d.get("tierec_cache_lookups_total", 0.0)
    return {"hit_rate": d.get("tierec_cache_hits_total", 0.0) / lookups if lookups else None,
            "ssd_bytes_read": d.get("tierec_ssd_read_bytes_total", 0.0), "batches": d.get("tierec_model_seconds_count", 0),
            "mean_batch": mean("tierec_batch_size"), "model_ms": 1e3 * mean("tierec_model_seconds"),
            "read_ms": 1e3 * mean("tierec_ssd_read_seconds"),
            "read_over_10ms": share_over("tierec_ssd_read_seconds", 0.01),
            "read_over_50ms": share_over("tierec_ssd_read_seconds", 0.05)}


MODES = {"dram": ("dram", False), "ssd": ("ssd", True), "ssd-mmap": ("ssd", False)}


class ServeProcess:
    """``tierec serve ARGS --port P`` as a child on a free loopback port (``name`` in messages; its output to
    ``log_path``, else stderr kept for errors); `wait` returns it once /healthz answers; `stop` ends it (SIGINT)."""

    def __init__(self, args: list[str], name: str, log_path: Path | None = None):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w") if log_path is not None else None
        cmd = [sys.executable, "-m", "tierec", "serve", *args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT if self.log else subprocess.PIPE, text=True)
        self.t0 = time.perf_counter()
        self.load_s = 0.0

    def wait(self, timeout: float = 600) -> ServeProcess:
        while True:
            if self.proc.poll() is not None:
                why = f"see {self.log_path}" if self.log else self.proc.stderr.read()[-2000:]  # type: ignore[union-attr]
                raise RuntimeError(f"{self.name} server exited ({self.proc.returncode}): {why}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - self.t0 > timeout:
                raise RuntimeError(f"{self.name} server did not start in {timeout:.0f} s")
            time.sleep(0.2)
        self.load_s = time.perf_counter() - self.t0
        log.info("%s server up in %.1f s", self.name, self.load_s)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.log is not None:
            self.log.close()


class Server(ServeProcess):
    """The DLRM checkpoint served in one of `MODES`, up."""

    def __init__(self, a, paths: dict, mode: str):
        tables, direct = MODES[mode]
        super().__init__([paths["dlrm"], "--tables", tables, "--threads", str(a.threads), "--data", paths["data"],
                          "--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms), "--cache-fraction",
                          str(a.cache_fraction), *(["--direct-io"] if direct else [])], mode)
        self.mode = mode
        self.wait()


def load_test(a, paths: dict, modes: list[str], bodies: list[bytes]) -> dict:
    """All servers up at once; warm-up, then --rounds rounds of the fixed load in which every mode gets
    the same requests, modes alternating (so the machine's drift hits all alike), then saturation."""
    servers: dict[str, Server] = {}
    res: dict = {}
    try:
        for m in modes:
            servers[m] = Server(a, paths, m)
            res[m] = {"load_s": servers[m].load_s, "rounds": []}
        for m in modes:
            asyncio.run(closed_loop(servers[m].url, bodies, a.concurrency, a.warmup, 0))
        before = {m: scrape(servers[m].url) for m in modes}
        per_round = int(a.rate * a.duration)
        for r in range(a.rounds):
            off = len(bodies) // 3 + r * per_round
            for m in modes if r % 2 == 0 else modes[::-1]:
                got = asyncio.run(open_loop(servers[m].url, bodies, a.rate, a.duration, off))
                res[m]["rounds"].append(got)
                log.info("round %d/%d %s: p50 %.1f ms, p99 %.1f ms, %d errors", r + 1, a.rounds, m, got["p50_ms"],
                         got["p99_ms"], got["errors"])
        for m in modes:  # the servers' own figures over the fixed-load rounds (warm-up excluded)
            res[m].update(server_figures(before[m], scrape(servers[m].url)))
        for m in modes:
            res[m]["saturation"] = asyncio.run(closed_loop(servers[m].url, bodies, a.concurrency, a.duration,
                                                           2 * len(bodies) // 3))
            log.info("%s saturation: %s", m, res[m]["saturation"])
            res[m]["mem"] = proc_mem(servers[m].proc.pid)
    finally:
        for srv in servers.values():
            srv.stop()
    for m in modes:  # pooled over the rounds
        lat = np.concatenate([r.pop("latencies_ms") for r in res[m]["rounds"]])
        rr = res[m]["rounds"]
        res[m]["fixed"] = {"requests": int(lat.size), "rps": float(np.mean([r["rps"] for r in rr])),
                           "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                           "errors": sum(r["errors"] for r in rr)}
    return res


def probe_device(paths: dict, seconds: float) -> list[dict]:
    """Random 4 KiB O_DIRECT reads of the served checkpoint's table files at queue depths 1 and 8."""
    from tierec.storage.probe import probe_reads, table_files
    from tierec.train.checkpoint import resolve_checkpoint

    res = probe_reads(table_files([resolve_checkpoint(paths["dlrm"]) / "tables"]), (1, 8), seconds)
    for r in res:
        log.info("device: %s", r.line())
    return [r.to_dict() for r in res]


def retrieval(a, paths: dict) -> dict:
    import torch

    from tierec.data.dataset import Dataset
    from tierec.inference.features import Encoded
    from tierec.inference.model_store import ServeOptions, load_model
    from tierec.inference.retrieval import HnswParams, Retriever, embed_items, exact_topk, recall_at_k

    torch.set_num_threads(a.threads)
    params = HnswParams(a.hnsw_m, a.ef_construction, a.ef_search)
    loaded = load_model(paths["tt"], ServeOptions(tables="ssd", data=paths["data"]))
    t0 = time.perf_counter()
    r = Retriever.build(loaded, params, a.corpus_rows, index_dir=str(Path(a.dir) / "index"), on_disk=True,
                        data=paths["data"])
    build_s = time.perf_counter() - t0
    vectors = embed_items(loaded.model, r.corpus)
    ds = Dataset(paths["data"])
    chunk = next(ds.chunks("test", 1000))
    users = Encoded(chunk.dense, {k: (v, np.diff(o)) for k, (v, o) in chunk.sparse.items()})
    with torch.no_grad():
        q = loaded.model.user_embedding(users.to_inputs(loaded.model.user_keys)[1]).numpy()
    exact = exact_topk(vectors, q, 10)
    approx = r.index.search(q, 10)[1]
    t0 = time.perf_counter()
    for i in range(len(q)):
        r.index.search(q[i : i + 1], 10)
    qps = len(q) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(len(q)):
        exact_topk(vectors, q[i : i + 1], 10)
    exact_qps = len(q) / (time.perf_counter() - t0)
    return {"items": len(r.corpus), "dim": int(vectors.shape[1]), "M": params.M,
            "ef_construction": params.ef_construction, "ef_search": params.ef_search,
            "recall_at_10": recall_at_k(approx, exact), "hnsw_qps": qps, "exact_qps": exact_qps,
            "build_s": build_s, "index_bytes": os.path.getsize(r.index.path)}


def mib(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def report(a, res: dict, ret: dict | None, probes: dict) -> None:
    table_bytes = a.tables * a.table_rows * a.dim * 4
    print(f"\nserving: {a.tables} tables x {a.table_rows:,} rows x {a.dim} dims = {mib(table_bytes)} MiB of "
          f"embeddings; requests of {a.samples} samples; server --threads {a.threads}, --max-batch {a.max_batch}, "
          f"--max-wait-ms {a.max_wait_ms}; ssd modes: --cache-fraction {a.cache_fraction}; fixed load "
          f"{a.rate:g} req/s in {a.rounds} rounds of {a.duration:g} s per mode, modes alternating")
    modes = list(res)
    base = res.get("dram")
    head = f"{'':38}" + "".join(f"{m:>12}" for m in modes)
    if base is not None:
        head += "".join(f"{m + '/dram':>16}" for m in modes if m != "dram")
    print(head)

    def line(label, get, fmt="{:.1f}"):
        vals = [get(res[m]) for m in modes]
        out = f"{label:38}" + "".join(f"{(fmt.format(v) if v is not None else '-'):>12}" for v in vals)
        if base is not None:
            b = get(base)
            out += "".join(f"{(f'{v / b:.2f}' if b and v is not None else '-'):>16}"
                           for m, v in zip(modes, vals) if m != "dram")
        print(out)

    line("server start (s)", lambda r: r["load_s"])
    for part, title in (("fixed", f"fixed load {a.rate:g} req/s"), ("saturation", f"saturation, {a.concurrency} clients")):
        line(f"{title}: req/s", lambda r: r[part]["rps"])
        line("  p50 latency (ms)", lambda r: r[part]["p50_ms"], "{:.2f}")
        line("  p99 latency (ms)", lambda r: r[part]["p99_ms"], "{:.2f}")
        line("  errors", lambda r: r[part]["errors"], "{:d}")
    for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
        line(f"{k} (MiB)", lambda r: r["mem"][k] / 2**20, "{:,.0f}")
    print("server side, over the fixed-load rounds:")
    line("  cache hit rate (%)", lambda r: 100 * r["hit_rate"] if r["hit_rate"] is not None else None)
    line("  MiB read from table files", lambda r: r["ssd_bytes_read"] / 2**20, "{:,.1f}")
    line("  mean batch size", lambda r: r["mean_batch"])
    line("  model call per batch (ms)", lambda r: r["model_ms"], "{:.2f}")
    line("  of which wait on SSD reads (ms)", lambda r: r["read_ms"] if r["mode_ssd"] else None, "{:.2f}")
    line("  batches waiting > 10 ms on reads (%)", lambda r: 100 * r["read_over_10ms"] if r["mode_ssd"] else None, "{:.2f}")
    line("  batches waiting > 50 ms on reads (%)", lambda r: 100 * r["read_over_50ms"] if r["mode_ssd"] else None, "{:.2f}")
    if base is not None:
        for m in modes:
            if m != "dram":
                ratios = [x["p99_ms"] / b["p99_ms"] for x, b in zip(res[m]["rounds"], base["rounds"])]
                mm, bm = res[m]["mem"], base["mem"]
                print(f"{m}/dram p99 per round: " + ", ".join(f"{x:.2f}" for x in ratios)
                      + f" (median {statistics.median(ratios):.2f}); memory dram/{m}: VmRSS {bm['VmRSS'] / mm['VmRSS']:.2f}x, "
                      f"VmHWM {bm['VmHWM'] / mm['VmHWM']:.2f}x, RssAnon {bm['RssAnon'] / mm['RssAnon']:.2f}x")
    for when, pr in probes.items():
        print(f"device under the table files, {when} (random 4 KiB O_DIRECT reads; stalled = time with a read > 10 ms):")
        for r in pr:
            print(f"  QD {r['queue_depth']}: {r['iops']:,.0f} reads/s, p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.2f} ms, "
                  f"p99.9 {r['p999_ms']:.2f} ms, max {r['max_ms']:.1f} ms, stalled {r['stalled']:.1%}")
    if ret:
        print(f"\nretrieval: {ret['items']:,} items x {ret['dim']} dims, faiss HNSW (M={ret['M']}, efConstruction="
              f"{ret['ef_construction']}, efSearch={ret['ef_search']}), memory-mapped index file "
              f"{mib(ret['index_bytes'])} MiB, built in {ret['build_s']:.1f} s (incl. corpus + item vectors)")
        print(f"  recall@10 vs exact {ret['recall_at_10']:.4f}; queries/s (1 query per call): HNSW "
              f"{ret['hnsw_qps']:,.0f}, exact (torch matmul) {ret['exact_qps']:,.0f}, ratio "
              f"{ret['hnsw_qps'] / ret['exact_qps']:.1f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=str(ROOT / "runs" / "bench_serve"))
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--table-rows", type=int, default=1_000_000,
                   help="rows per table: the DRAM server holds them all (26 x 1M x 64 floats = 6.2 GiB)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rows", type=int, default=400_000, help="synthetic rows (train + 10%% test)")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--samples", type=int, default=8, help="samples per request")
    p.add_argument("--rate", type=float, default=25.0, help="fixed offered load, requests/s")
    p.add_argument("--concurrency", type=int, default=32, help="clients at saturation")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of each fixed-load round, and of saturation")
    p.add_argument("--rounds", type=int, default=4, help="fixed-load rounds per mode (modes alternate)")
    p.add_argument("--probe-seconds", type=float, default=1.0,
                   help="seconds per queue depth of the device probe before and after the load (0: none)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up traffic")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--cache-fraction", type=float, default=0.05)
    p.add_argument("--modes", default="dram,ssd,ssd-mmap",
                   help="servers to compare: dram, ssd (O_DIRECT reads), ssd-mmap (memory-mapped table files)")
    p.add_argument("--corpus-rows", type=int, default=100_000)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef-search", type=int, default=512)
    p.add_argument("--skip-retrieval", action="store_true")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("httpx", "faiss.loader"):
        logging.getLogger(name).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    paths = prepare(a)
    log.info("prepared in %.0f s", time.perf_counter() - t0)
    bodies = request_bodies(paths["data"], a.samples, 6000)
    modes = a.modes.split(",")
    probes = {"before the load": probe_device(paths, a.probe_seconds)} if a.probe_seconds else {}
    res = load_test(a, paths, modes, bodies)
    for m in modes:
        res[m]["mode_ssd"] = MODES[m][0] == "ssd"
    if a.probe_seconds:
        probes["after the load"] = probe_device(paths, a.probe_seconds)
    ret = None if a.skip_retrieval else retrieval(a, paths)
    report(a, res, ret, probes)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s (this machine: {os.cpu_count()} cores, shared)")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "serve": res, "retrieval": ret, "device": probes},
                                           indent=2))


if __name__ == "__main__":
    main()

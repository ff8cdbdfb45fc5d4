"""Early exits and the result cache, side by side with the plain server, in one run.

    python benchmarks/bench_exit.py --quick          # < 3 min: a smaller model, short rounds
    python benchmarks/bench_exit.py                  # < 12 min
    python benchmarks/bench_exit.py --json runs/exit.json

1. Prepare (once, kept under --dir, default runs/bench_exit/): a synthetic Criteo-shaped data set
   (tierec.data.synth: 13 dense and --tables sparse features of --table-rows rows, "auto" skew), a DLRM
   (embedding dim --dim, bottom MLP --bottom-mlp, top MLP --top-mlp) trained --train-steps steps with
   `tierec train`, and an exit head distilled from it with `tierec distill-exit` (linear, or --hidden units),
   which also reports offline, on the test split, per confidence threshold: the share of samples that exit,
   the dense FLOPs per sample (2 x the multiply-adds of the dense layers per path: an exited sample pays the
   bottom MLP and the head; the others the whole ranker), and AUC / log-loss next to the full ranker's.
2. Early exits under load. One `tierec serve` process per mode, all up at once (tables in DRAM, so the dense
   layers are what differs), only one under load at a time: "plain" (no head) and one per --thresholds value
   ("never" = 1.0: the head loaded, no sample can exit; "always" = 0). --rounds rounds of a fixed open-loop
   load (--rate requests/s of --samples test rows each; latency from the scheduled send time), the modes
   alternating and getting the same requests; latencies pooled. From each server's /metrics: the share of
   samples that exited, FLOPs per sample served, the model thread's time per sample. Before the servers
   start, the model call alone is timed in this process per threshold on test batches of --samples and of
   --max-batch rows (one torch thread, the best of 15 passes: the least disturbed by other work).
3. The result cache. Requests drawn with Zipf(--zipf) popularity from a pool of --pool distinct requests
   of --samples test rows (so requests repeat, as popular sessions and pages do), sent to the plain server,
   to one with --result-cache-size and to one with the cache and early exits at --cache-threshold,
   alternating as above: the sample hit rate, model calls, samples scored, latency.
Each phase ends with saturation: --concurrency closed-loop clients per server for --sat-duration seconds
(requests/s, and the model thread's time per sample at the batch sizes the load builds).

The load generator (httpx, asyncio) runs in this process on the same machine as the servers: on a shared
2-core VM (the figures in docs/serving.md) the servers, the client and other jobs compete for the cores,
so latencies carry that noise; compare modes within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve as bs  # noqa: E402 -- the load generator and /metrics scraper of the serving benchmark

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_exit")


def prepare(a) -> dict:
    d = Path(a.dir)
    tag = (f"t{a.tables}-r{a.table_rows}-d{a.dim}-n{a.rows}-s{a.train_steps}-b{a.bottom_mlp}-t{a.top_mlp}"
           .replace(",", "_"))
    base = d / tag
    data, dlrm = base / "data", base / "dlrm"
    head, report = base / f"head-h{a.hidden}.pt", base / f"head-h{a.hidden}.json"
    py = [sys.executable, "-m", "tierec"]
    if not (data / "manifest.json").exists():
        bs.run(py + ["data", "synth", "--out", str(data), "--rows", str(a.rows), "--num-sparse", str(a.tables),
                     "--cardinalities", str(a.table_rows), "--max-cardinality", "0", "--seed", "0", "--no-progress"])
    if not (dlrm / "checkpoints" / "LATEST").exists():
        bs.run(py + ["train", "--data", str(data), "--out", str(dlrm), "--overwrite", "--embedding-dim", str(a.dim),
                     "--bottom-mlp", a.bottom_mlp, "--top-mlp", a.top_mlp, "--max-steps", str(a.train_steps),
                     "--batch-size", "1024", "--no-progress", "--num-threads", "2", "--max-eval-rows", "20000"])
    if not report.exists():
        bs.run(py + ["distill-exit", str(dlrm), "--out", str(head), "--hidden", str(a.hidden), "--epochs",
                     str(a.distill_epochs), "--batch-size", "1024", "--thresholds",
                     ",".join(str(t) for t in a.offline_thresholds), "--json", str(report)])
    return {"data": str(data), "dlrm": str(dlrm), "head": str(head), "report": json.loads(report.read_text())}


class Server(bs.ServeProcess):
    """One `tierec serve` process with extra flags, started (`wait` waits for it); `stop` ends it (SIGINT)."""

    def __init__(self, a, paths: dict, name: str, extra: list[str]):
        super().__init__([paths["dlrm"], "--tables", "dram", "--threads", str(a.threads), "--data", paths["data"],
                          "--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms), "--warm-rows", "0",
                          *extra], name)


def start(a, paths: dict, specs: dict[str, tuple[str, list[str]]], into: dict[str, Server]) -> dict[str, Server]:
    """Servers {key: (name, extra flags)} started together (added to ``into`` at once, so that they are stopped
    whatever happens), then waited for."""
    for k, (name, extra) in specs.items():
        into[k] = Server(a, paths, name, extra)
    return {k: into[k].wait() for k in specs}


def test_rows(data: str, n: int) -> list[dict]:
    """The first ``n`` test rows as JSON samples (raw feature name -> values)."""
    from tierec.data.dataset import Dataset

    ds = Dataset(data)
    rows: list[dict] = []
    for chunk in ds.chunks("test", 4096):
        m = min(len(chunk), n - len(rows))
        part: list[dict] = [{} for _ in range(m)]
        for j, name in enumerate(ds.schema.dense):
            for i, v in enumerate(chunk.dense[:m, j].tolist()):
                part[i][name] = v
        for name, (v, o) in chunk.sparse.items():
            vl, ol = v.tolist(), o.tolist()
            for i in range(m):
                part[i][name] = vl[ol[i] : ol[i + 1]]
        rows += part
        if len(rows) >= n:
            break
    return rows


def bodies_of(rows: list[dict], samples: int, count: int, pick) -> list[bytes]:
    return [json.dumps({"samples": [rows[j] for j in pick(samples)]}).encode() for _ in range(count)]


def figures(before: dict, after: dict) -> dict:
    """What a server did between two scrapes (its /metrics): exits, FLOPs, cache hits, model time."""
    d = {k: v - before.get(k, 0.0) for k, v in after.items()}
    out = bs.server_figures(before, after)
    samples = d.get("tierec_samples_total", 0.0)
    exited = sum(v for k, v in d.items() if k == "tierec_exit_samples_total@exit")
    out.update(samples=samples, exited=exited,
               model_us_per_sample=1e6 * d.get("tierec_model_seconds_sum", 0.0) / samples if samples else None)
    hit, miss = d.get("tierec_result_cache_lookups_total@hit", 0.0), d.get("tierec_result_cache_lookups_total@miss", 0.0)
    out["cache_hit_rate"] = hit / (hit + miss) if hit + miss else None
    out["dense_flops"] = d.get("tierec_dense_flops_total")
    return out


def scrape(url: str) -> dict:
    """/metrics as {name: value}, the exit / cache counters by label, others summed (as bench_serve.scrape)."""
    from prometheus_client.parser import text_string_to_metric_families

    vals: dict = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            key = s.name + (f"@{float(s.labels['le'])}" if s.name.endswith("_bucket") else "")
            label = s.labels.get("path") or s.labels.get("result")
            if s.name in ("tierec_exit_samples_total", "tierec_result_cache_lookups_total") and label:
                key += "@" + label
            vals[key] = vals.get(key, 0.0) + s.value
    return vals


def load_rounds(a, servers: dict[str, Server], bodies: list[bytes], rounds: int) -> dict:
    """Warm-up, then ``rounds`` rounds of the fixed load, the servers alternating, the same requests for each."""
    res: dict = {m: {"rounds": []} for m in servers}
    for srv in servers.values():
        asyncio.run(bs.open_loop(srv.url, bodies, a.rate, a.warmup, len(bodies) - int(a.rate * a.warmup) - 1))
    before = {m: scrape(s.url) for m, s in servers.items()}
    per_round = int(a.rate * a.duration)
    names = list(servers)
    for r in range(rounds):
        for m in names if r % 2 == 0 else names[::-1]:
            got = asyncio.run(bs.open_loop(servers[m].url, bodies, a.rate, a.duration, r * per_round))
            res[m]["rounds"].append(got)
            log.info("round %d/%d %s: p50 %.1f ms, p99 %.1f ms, %d errors", r + 1, rounds, m, got["p50_ms"],
                     got["p99_ms"], got["errors"])
    for m, srv in servers.items():
        res[m].update(figures(before[m], scrape(srv.url)))
        lat = np.concatenate([x.pop("latencies_ms") for x in res[m]["rounds"]])
        res[m]["fixed"] = {"requests": int(lat.size), "p50_ms": float(np.percentile(lat, 50)),
                           "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()),
                           "errors": sum(x["errors"] for x in res[m]["rounds"])}
    for m, srv in servers.items():  # then each at saturation: closed loop, back to back
        before_sat = scrape(srv.url)
        res[m]["saturation"] = asyncio.run(bs.closed_loop(srv.url, bodies, a.concurrency, a.sat_duration, 0))
        f = figures(before_sat, scrape(srv.url))
        res[m]["saturation"].update(model_ms=f["model_ms"], model_us_per_sample=f["model_us_per_sample"],
                                    mean_batch=f["mean_batch"])
        log.info("%s saturation: %.0f req/s, p50 %.1f ms", m, res[m]["saturation"]["rps"],
                 res[m]["saturation"]["p50_ms"])
    return res


def model_timing(paths: dict, thresholds: list[float], sizes=(32, 256), batches: int = 8, passes: int = 15) -> dict:
    """In this process, one torch thread: the model call per sample (µs) of the plain ranker and of the cascade at
    each threshold, over ``batches`` test batches of each size, the best of ``passes`` passes (the least disturbed
    by the machine's other work)."""
    import torch

    from tierec.data.dataset import Dataset
    from tierec.inference.cascade import Cascade, load_exit_head
    from tierec.inference.model_store import ServeOptions, load_model

    torch.set_num_threads(1)
    lm = load_model(paths["dlrm"], ServeOptions(tables="dram", warm_rows=0))
    head = load_exit_head(paths["head"])
    ds = Dataset(paths["data"])
    out: dict = {}
    with torch.no_grad():
        for size in sizes:
            bs_ = [b for _, b in zip(range(batches), ds.batches("test", size), strict=False)]
            n = sum(b.size for b in bs_)
            fns = {"plain": lambda b: lm.forward(b.dense, b.sparse)}
            for t in thresholds:
                cascade = Cascade(head, t)
                fns[f"{t:g}"] = lambda b, c=cascade: c.forward(lm, b.dense, b.sparse)
            best = dict.fromkeys(fns, float("inf"))
            for _ in range(passes):
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    for b in bs_:
                        f(b)
                    best[k] = min(best[k], (time.perf_counter() - t0) / n * 1e6)
            out[size] = best
    lm.close()
    return out


def label(t: float) -> str:
    return "never (1.0)" if t > 0.5 else ("always (0)" if t == 0 else f"{t:g}")


def report(a, paths: dict, exits: dict, cache: dict, timing: dict, wall: float) -> None:
    rep = paths["report"]
    full_flops, exit_flops = rep["flops"]
    points = {p["threshold"]: p for p in rep["points"]}
    print(f"\nearly exits: DLRM of {a.tables} tables x {a.table_rows:,} rows x dim {a.dim}, bottom MLP {a.bottom_mlp}, "
          f"top MLP {a.top_mlp}, trained {a.train_steps} steps; exit head {'linear' if not a.hidden else a.hidden} over "
          f"[bottom output; pooled embeddings]; dense FLOPs/sample: full {full_flops:,}, exit path {exit_flops:,}")
    print(f"load: {a.rate:g} req/s of {a.samples} test rows each, {a.rounds} rounds of {a.duration:g} s per server, "
          f"servers alternating; tables in DRAM, --threads {a.threads}, --max-batch {a.max_batch}, --max-wait-ms "
          f"{a.max_wait_ms}; exit % (test), AUC and log-loss: offline over the test split (`tierec distill-exit`)")
    base = exits["plain"]["fixed"]
    sat0 = exits["plain"]["saturation"]
    head = (f"{'server':>14} {'exit % (served)':>16} {'exit % (test)':>14} {'FLOPs/sample':>13} {'saved %':>8} "
            f"{'model us/sample':>16} {f'call us/s b{a.samples}':>14} {f'call us/s b{a.max_batch}':>15} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'p50 vs plain':>13} {'sat req/s':>10} "
            f"{'sat model us/sample':>20} {'AUC':>8} {'dAUC':>8} {'logloss':>8} {'dlogloss':>9}")
    print(head)
    for m, r in exits.items():
        if m == "plain":
            t = None
        else:
            t = float(m)
        pt = points.get(t if t is None or t <= 0.5 else None)
        served = r["exited"] / r["samples"] if r["samples"] and m != "plain" else 0.0
        fl = r["dense_flops"] / r["samples"] if r.get("dense_flops") and r["samples"] else float(full_flops)
        print(f"{('plain' if m == 'plain' else label(t)):>14} {100 * served:>16.1f} "
              f"{100 * pt['exit_share']:>14.1f} {fl:>13,.0f} {100 * (1 - fl / full_flops):>8.1f} "
              f"{r['model_us_per_sample']:>16.1f} {timing[a.samples][m]:>14.1f} {timing[a.max_batch][m]:>15.1f} "
              f"{r['fixed']['p50_ms']:>8.2f} {r['fixed']['p99_ms']:>8.2f} "
              f"{r['fixed']['p50_ms'] / base['p50_ms']:>13.2f} {r['saturation']['rps']:>10.1f} "
              f"{r['saturation']['model_us_per_sample']:>20.1f} {pt['auc']:>8.4f} {pt['auc_change']:>+8.4f} "
              f"{pt['logloss']:>8.4f} {pt['logloss_change']:>+9.4f}")
    print(f"(model us/sample: the servers' model thread per sample scored under the fixed load, from /metrics; "
          f"call us/s bN: the same call in this process on test batches of N, best of 15 passes, 1 thread; sat: "
          f"{a.concurrency} "
          f"closed-loop clients for {a.sat_duration:g} s per server, the plain server's batches "
          f"{sat0['mean_batch']:.0f} samples on average)")
    print(f"\nresult cache: requests drawn with Zipf({a.zipf}) popularity from {a.pool:,} distinct requests of "
          f"{a.samples} test rows (share of requests repeating one sent before: {a.repeat_share:.1%}); "
          f"--result-cache-size {a.cache_size}, --result-cache-ttl {a.cache_ttl:g}")
    base = cache["plain"]["fixed"]
    print(f"{'server':>22} {'hit rate %':>11} {'model calls':>12} {'samples scored':>15} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'p50 vs plain':>13} {'sat req/s':>10} {'errors':>7}")
    for m, r in cache.items():
        hr = r["cache_hit_rate"]
        print(f"{m:>22} {(100 * hr if hr is not None else 0):>11.1f} {r['batches']:>12,.0f} {r['samples']:>15,.0f} "
              f"{r['fixed']['p50_ms']:>8.2f} {r['fixed']['p99_ms']:>8.2f} {r['fixed']['p50_ms'] / base['p50_ms']:>13.2f} "
              f"{r['saturation']['rps']:>10.1f} {r['fixed']['errors'] + r['saturation']['errors']:>7}")
    print(f"\ntotal {wall:.0f} s; this machine: {os.cpu_count()} cores, shared with other jobs (servers and the load "
          "generator compete for them: compare servers within one run)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller model and short rounds (< 3 min)")
    p.add_argument("--dir", default=str(ROOT / "runs" / "bench_exit"))
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--table-rows", type=int, default=None, help="rows per table (default 100,000; quick 10,000)")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--bottom-mlp", default="256,64")
    p.add_argument("--top-mlp", default="512,256")
    p.add_argument("--rows", type=int, default=None, help="synthetic rows (default 300,000; quick 60,000)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps (default 200; quick 50)")
    p.add_argument("--hidden", type=int, default=0, help="exit head hidden units (0: linear)")
    p.add_argument("--distill-epochs", type=int, default=1,
                   help="passes of `tierec distill-exit` over the training rows (default 1)")
    p.add_argument("--thresholds", default=None,
                   help="served thresholds (1.0: never exits, 0: always; default 1.0,0.45,0.4,0.3,0.2,0; quick "
                        "1.0,0.3,0)")
    p.add_argument("--samples", type=int, default=32, help="samples per request")
    p.add_argument("--rate", type=float, default=20.0, help="fixed offered load, requests/s")
    p.add_argument("--duration", type=float, default=None, help="seconds per round (default 8; quick 3)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per server (default 3; quick 2)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per server (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--pool", type=int, default=2000, help="result cache: distinct requests the load draws from")
    p.add_argument("--zipf", type=float, default=1.1, help="result cache: Zipf exponent of the requests' popularity")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients at saturation")
    p.add_argument("--sat-duration", type=float, default=None, help="seconds at saturation per server (default 6; "
                   "quick 2)")
    p.add_argument("--cache-size", type=int, default=100_000)
    p.add_argument("--cache-ttl", type=float, default=600.0)
    p.add_argument("--cache-threshold", type=float, default=0.4, help="the cache + exits server's threshold")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    q = a.quick
    for name, default, quick in (("table_rows", 100_000, 10_000), ("rows", 300_000, 60_000),
                                 ("train_steps", 200, 50), ("duration", 8.0, 3.0),
                                 ("rounds", 3, 2), ("warmup", 2.0, 1.0), ("sat_duration", 6.0, 2.0),
                                 ("thresholds", "1.0,0.45,0.4,0.3,0.2,0", "1.0,0.3,0")):
        if getattr(a, name) is None:
            setattr(a, name, quick if q else default)
    thresholds = [float(t) for t in a.thresholds.split(",")]
    a.offline_thresholds = sorted({t for t in thresholds if t <= 0.5} | {0.45, 0.4, 0.3, 0.2, 0.0}, reverse=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    paths = prepare(a)
    log.info("prepared in %.0f s", time.perf_counter() - t0)
    timing = model_timing(paths, thresholds, (a.samples, a.max_batch))
    log.info("model call per sample (us): %s", timing)
    rows = test_rows(paths["data"], 6000)
    rng = np.random.default_rng(0)
    n_bodies = int(a.rate * (a.duration * a.rounds + a.warmup)) + 10
    uniform = bodies_of(rows, a.samples, n_bodies, lambda k: rng.integers(0, len(rows), k))
    pool = bodies_of(rows, a.samples, a.pool, lambda k: rng.integers(0, len(rows), k))
    ranks = np.arange(1, a.pool + 1, dtype=np.float64) ** -a.zipf
    picks = rng.choice(a.pool, n_bodies, p=ranks / ranks.sum())
    zipf = [pool[i] for i in picks]
    a.repeat_share = 1 - len(set(picks.tolist())) / len(picks)
    servers: dict[str, Server] = {}
    try:
        specs = {"plain": ("plain", [])}
        for t in thresholds:
            specs[f"{t:g}"] = (f"exit {label(t)}", ["--exit-head", paths["head"], "--exit-threshold", str(t)])
        exits = load_rounds(a, start(a, paths, specs, servers), uniform, a.rounds)
        for k in specs:
            if k != "plain":
                servers.pop(k).stop()
        cached = ["--result-cache-size", str(a.cache_size), "--result-cache-ttl", str(a.cache_ttl)]
        more = start(a, paths, {"result cache": ("cache", cached),
                                f"cache + exit {a.cache_threshold:g}": ("cache+exit", [
                                    *cached, "--exit-head", paths["head"], "--exit-threshold", str(a.cache_threshold)])},
                     servers)
        cache = load_rounds(a, {"plain": servers["plain"], **more}, zipf, a.rounds)
    finally:
        for srv in servers.values():
            srv.stop()
    wall = time.perf_counter() - t0
    report(a, paths, exits, cache, timing, wall)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "distill": paths["report"], "exits": exits,
                                            "cache": cache, "model_timing": timing, "wall_s": wall,
                                            "cores": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()

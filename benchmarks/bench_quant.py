"""Quantized rows side by side: the plain server and serving exports in fp32, fp16, bf16, int8 (int4) in one run.

    python benchmarks/bench_quant.py --quick              # ~2 min prepared (~4.5 cold): 8 tables x 50,000 rows
    python benchmarks/bench_quant.py                      # 26 tables x 250,000 rows x 64 dims (1.55 GiB fp32)
    python benchmarks/bench_quant.py --dtypes fp32,fp16,bf16,int8,int4 --json runs/quant.json

1. Prepare (once, kept under --dir): a synthetic Criteo-shaped data set (`tierec data synth`, "auto" skew),
   a DLRM trained --train-steps steps (`tierec train`), and one export per dtype (`tierec export --row-dtype`).
2. The same DRAM for every server's cache: the plain server (the checkpoint's own fp32 table files,
   `--tables ssd`) gets a cache of --cache-fraction of all rows; its bytes (rows + hash index + per-slot
   bookkeeping + admission sketch, computed with the serving classes themselves) are the budget, and each
   export's cache gets the most rows whose bytes fit it (a quantized row is smaller, its bookkeeping is not).
3. Load: every server up at once (`tierec serve`, --direct-io unless --mmap), each gets the same requests
   of --samples test rows: warm-up, then --rounds rounds of a fixed open-loop load (--rate req/s; latency
   from the scheduled send time), modes alternating; latencies pooled. From each server's /metrics over the
   rounds: cache hit rate, bytes read from the row files, model time per batch.
4. Quality: AUC and log-loss of every served model on the test split (in this process, `load_model` +
   `LoadedModel.forward`, the serving code path), and the largest |probability - fp32's| over it.

The machine this was written on is a 2-core VM shared with other jobs: latency figures are noisy
(the output says so); file sizes, cache rows, hit rates and AUC are not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve as bs  # noqa: E402  (the load generator and /metrics helpers)

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_quant")
QUICK = dict(tables=8, table_rows=50_000, rows=60_000, train_steps=30, rounds=2, duration=6.0, warmup=2.0)


def run(cmd: list[str]) -> None:
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def prepare(a) -> dict:
    base = Path(a.dir) / f"t{a.tables}-r{a.table_rows}-d{a.dim}-n{a.rows}-s{a.train_steps}"
    data, dlrm = base / "data", base / "dlrm"
    py = [sys.executable, "-m", "tierec"]
    if not (data / "manifest.json").exists():
        run(py + ["data", "synth", "--out", str(data), "--rows", str(a.rows), "--num-sparse", str(a.tables),
                  "--cardinalities", str(a.table_rows), "--max-cardinality", "0", "--session-length", "8",
                  "--seed", "0", "--no-progress"])
    if not (dlrm / "checkpoints" / "LATEST").exists():
        run(py + ["train", "--data", str(data), "--out", str(dlrm), "--overwrite", "--embedding-dim", str(a.dim),
                  "--max-steps", str(a.train_steps), "--batch-size", "1024", "--no-progress", "--num-threads", "2",
                  "--max-eval-rows", "20000"])
    paths = {"data": str(data), "plain": str(dlrm)}
    for dt in a.dtypes:
        out = base / f"export-{dt}"
        if not (out / "export.json").exists():
            t0 = time.perf_counter()
            run(py + ["export", str(dlrm), "--out", str(out), "--row-dtype", dt, "--no-progress", "--overwrite"])
            log.info("export %s: %.1f s", dt, time.perf_counter() - t0)
        paths[dt] = str(out)
    return paths


def cache_bytes(capacity: int, words: int, total_rows: int) -> int:
    """Bytes of the serving cache of ``capacity`` rows of ``words`` 32-bit words: the rows, the cache's index and
    per-slot bookkeeping, the admission sketch (`SharedCache`'s structures, built here without the rows)."""
    import torch

    from tierec.storage.cache import CachedTable
    from tierec.storage.sketch import CountMinSketch

    empty = torch.zeros(0, dtype=torch.int64)
    c = CachedTable(SimpleNamespace(num_embeddings=total_rows, dim=0, state_dim=0, device="cpu",
                                    reset_stats=lambda: None), capacity, "freq",
                    freq=(empty, empty))
    width = 1 << max(10, (2 * c.capacity - 1).bit_length())
    return c.capacity * words * 4 + c.index_nbytes + CountMinSketch(width, depth=2).nbytes


def rows_for_budget(budget: int, words: int, total_rows: int) -> int:
    """The most cache rows of ``words`` words whose `cache_bytes` fit ``budget``."""
    lo, hi = 1, max(1, min(total_rows, budget // (4 * words)))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cache_bytes(mid, words, total_rows) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Server(bs.ServeProcess):
    """`tierec serve` of one mode: the checkpoint (plain) or an export, behind a cache of ``capacity`` rows; up."""

    def __init__(self, a, path: str, mode: str, data: str, capacity: int, total_rows: int):
        frac = min(1.0, capacity / total_rows)
        super().__init__([path, "--tables", "ssd", "--threads", str(a.threads), "--data", data, "--max-batch",
                          str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms), "--cache-fraction", repr(frac),
                          *([] if a.mmap else ["--direct-io"])], mode)
        self.mode = mode
        self.wait()


def load_test(a, paths: dict, modes: list[str], caps: dict, total_rows: int, bodies: list[bytes]) -> dict:
    servers: dict[str, Server] = {}
    res: dict = {}
    try:
        for m in modes:
            servers[m] = Server(a, paths[m], m, paths["data"], caps[m], total_rows)
            res[m] = {"load_s": servers[m].load_s, "rounds": []}
        for m in modes:
            asyncio.run(bs.closed_loop(servers[m].url, bodies, 8, a.warmup, 0))
        before = {m: bs.scrape(servers[m].url) for m in modes}
        per_round = int(a.rate * a.duration)
        for r in range(a.rounds):
            off = len(bodies) // 3 + r * per_round
            for m in modes if r % 2 == 0 else modes[::-1]:
                got = asyncio.run(bs.open_loop(servers[m].url, bodies, a.rate, a.duration, off))
                res[m]["rounds"].append(got)
                log.info("round %d/%d %s: p50 %.1f ms, p99 %.1f ms, %d errors", r + 1, a.rounds, m, got["p50_ms"],
                         got["p99_ms"], got["errors"])
        for m in modes:
            after = bs.scrape(servers[m].url)
            res[m].update(bs.server_figures(before[m], after))
            res[m]["cache_bytes"] = after.get("tierec_cache_bytes", 0.0)
            res[m]["cache_rows"] = after.get("tierec_cache_capacity_rows", 0.0)
            res[m]["row_bytes"] = after.get("tierec_row_bytes", 0.0)
            res[m]["mem"] = bs.proc_mem(servers[m].proc.pid)
    finally:
        for srv in servers.values():
            srv.stop()
    for m in modes:
        lat = np.concatenate([r.pop("latencies_ms") for r in res[m]["rounds"]])
        rr = res[m]["rounds"]
        res[m]["fixed"] = {"requests": int(lat.size), "p50_ms": float(np.percentile(lat, 50)),
                           "p99_ms": float(np.percentile(lat, 99)), "errors": sum(r["errors"] for r in rr)}
    return res


def quality(paths: dict, modes: list[str], max_rows: int | None) -> dict:
    """AUC / log-loss on the test split per mode, through the serving code path; |p - p_fp32| at most."""
    import torch

    from tierec.data.dataset import Dataset
    from tierec.inference.model_store import ServeOptions, load_model
    from tierec.train.metrics import log_loss, roc_auc

    torch.set_num_threads(2)
    ds = Dataset(paths["data"])
    out, probs = {}, {}
    for m in modes:
        t0 = time.perf_counter()
        lm = load_model(paths[m], ServeOptions(tables="ssd", warm_rows=0, cache_fraction=0.02))
        ps, ys = [], []
        try:
            for batch in ds.batches("test", 4096, max_rows=max_rows):
                ps.append(torch.sigmoid(lm.forward(batch.dense, batch.sparse)).numpy())
                ys.append(batch.labels.numpy())
        finally:
            lm.close()
        p, y = np.concatenate(ps), np.concatenate(ys)
        probs[m] = p
        out[m] = {"auc": roc_auc(y, p), "logloss": log_loss(y, p), "rows": int(y.size),
                  "eval_s": time.perf_counter() - t0}
        log.info("%s: AUC %.5f, log-loss %.5f (%d rows, %.1f s)", m, out[m]["auc"], out[m]["logloss"], y.size,
                 out[m]["eval_s"])
    ref = probs.get("fp32", probs[modes[0]])
    for m in modes:
        out[m]["max_abs_dp"] = float(np.abs(probs[m] - ref).max())
    return out


def file_sizes(paths: dict, modes: list[str]) -> dict:
    from tierec.train.checkpoint import read_manifest, resolve_checkpoint

    out = {}
    for m in modes:
        if m == "plain":
            c = resolve_checkpoint(paths[m])
            files = read_manifest(c)["files"]
        else:
            files = json.loads((Path(paths[m]) / "export.json").read_text())["files"]
        out[m] = sum(e["bytes"] for rel, e in files.items() if rel.startswith("tables/"))
    return out


def report(a, res: dict, q: dict, sizes: dict, total_rows: int, budget: int) -> None:
    modes = list(res)
    print(f"\nquantized rows: {a.tables} tables x {a.table_rows:,} rows x {a.dim} dims ({total_rows:,} rows); "
          f"every server --tables ssd {'(memory-mapped files)' if a.mmap else '--direct-io'}, cache DRAM budget "
          f"{budget / 2**20:,.1f} MiB (the plain server's at --cache-fraction {a.cache_fraction}: rows + index + "
          f"sketch); requests of {a.samples} samples, {a.rate:g} req/s open loop, {a.rounds} rounds x {a.duration:g} s "
          f"per mode, modes alternating")
    print(f"{'':34}" + "".join(f"{m:>11}" for m in modes) + "".join(f"{m + '/plain':>13}" for m in modes if m != "plain"))

    def line(label, get, fmt="{:.2f}"):
        vals = [get(m) for m in modes]
        out = f"{label:34}" + "".join(f"{(fmt.format(v) if v is not None else '-'):>11}" for v in vals)
        b = get("plain")
        out += "".join(f"{(f'{v / b:.2f}' if b and v is not None else '-'):>13}" for m, v in zip(modes, vals, strict=True)
                       if m != "plain")
        print(out)

    line("table files (MiB)", lambda m: sizes[m] / 2**20, "{:,.1f}")
    line("bytes per served row", lambda m: res[m]["row_bytes"], "{:.0f}")
    line("cache rows in the same DRAM", lambda m: res[m]["cache_rows"], "{:,.0f}")
    line("cache MiB (rows + bookkeeping)", lambda m: res[m]["cache_bytes"] / 2**20, "{:,.1f}")
    line("cache hit rate (%)", lambda m: 100 * res[m]["hit_rate"] if res[m]["hit_rate"] is not None else None, "{:.1f}")
    line("MiB read from table files", lambda m: res[m]["ssd_bytes_read"] / 2**20, "{:,.1f}")
    line("p50 latency (ms)", lambda m: res[m]["fixed"]["p50_ms"])
    line("p99 latency (ms)", lambda m: res[m]["fixed"]["p99_ms"])
    line("errors", lambda m: res[m]["fixed"]["errors"], "{:d}")
    line("model call per batch (ms)", lambda m: res[m]["model_ms"])
    line("  of which SSD reads (ms)", lambda m: res[m]["read_ms"])
    line("VmRSS (MiB)", lambda m: res[m]["mem"]["VmRSS"] / 2**20, "{:,.0f}")
    line("test AUC", lambda m: q[m]["auc"], "{:.5f}")
    print(f"{'test AUC - fp32 AUC':34}" + "".join(f"{q[m]['auc'] - q.get('fp32', q['plain'])['auc']:>+11.5f}"
                                                  for m in modes))
    line("test log-loss", lambda m: q[m]["logloss"], "{:.5f}")
    print(f"{'max |p - p_fp32| on test':34}" + "".join(f"{q[m]['max_abs_dp']:>11.2e}" for m in modes))
    print(f"(AUC over {q[modes[0]]['rows']:,} test rows. Latency on a 2-core VM shared with other agents: noisy, "
          "compare within one run only; sizes, cache rows, hit rates and AUC are deterministic up to the load's "
          "timing.)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a small model and short load (~2 min on 2 busy cores once prepared, ~4.5 cold): "
                        + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--dir", default=str(ROOT / "runs" / "bench_quant"), help="where data, runs and exports are kept")
    p.add_argument("--dtypes", default="fp32,fp16,bf16,int8", help="export row dtypes to compare with the plain server")
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--table-rows", type=int, default=250_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rows", type=int, default=400_000, help="synthetic rows (train + 10%% test)")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--samples", type=int, default=8, help="samples per request")
    p.add_argument("--rate", type=float, default=25.0, help="fixed offered load, requests/s")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per fixed-load round")
    p.add_argument("--rounds", type=int, default=3, help="fixed-load rounds per mode (modes alternate)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up traffic per server")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--cache-fraction", type=float, default=0.05,
                   help="the plain server's cache, as a fraction of all rows: its bytes are every server's budget")
    p.add_argument("--mmap", action="store_true", help="memory-mapped table files instead of --direct-io")
    p.add_argument("--max-eval-rows", type=int, default=None, help="test rows for AUC (default: all)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    if a.quick:
        defaults = {k: p.get_default(k) for k in QUICK}
        for k, v in QUICK.items():
            if getattr(a, k) == defaults[k]:
                setattr(a, k, v)
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    paths = prepare(a)
    log.info("prepared in %.0f s", time.perf_counter() - t0)
    modes = ["plain", *a.dtypes]
    from tierec.storage.quantized import RowCodec

    total_rows = a.tables * a.table_rows
    plain_cap = max(1, math.ceil(a.cache_fraction * total_rows))
    budget = cache_bytes(plain_cap, a.dim, total_rows)
    caps = {"plain": plain_cap, **{dt: rows_for_budget(budget, RowCodec(dt, a.dim).words, total_rows)
                                   for dt in a.dtypes}}
    log.info("cache rows for %.1f MiB: %s", budget / 2**20, caps)
    bodies = bs.request_bodies(paths["data"], a.samples, 6000)
    res = load_test(a, paths, modes, caps, total_rows, bodies)
    q = quality(paths, modes, a.max_eval_rows)
    sizes = file_sizes(paths, modes)
    report(a, res, q, sizes, total_rows, budget)
    took = time.perf_counter() - t0
    print(f"\ntotal {took:.0f} s on {os.cpu_count()} cores (a VM shared with other agents: timings are noisy); "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "budget_bytes": budget, "cache_rows": caps,
                                            "serve": res, "quality": q, "file_bytes": sizes, "total_s": took},
                                           indent=2))


if __name__ == "__main__":
    main()

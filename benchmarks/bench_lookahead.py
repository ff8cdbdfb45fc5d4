"""Look-ahead oracle caching vs LRU/LFU vs Belady's MIN, and vs all tables in memory, in one run.

    python benchmarks/bench_lookahead.py                      # both parts, 8 x 1M x 64 tables, 2% caches
    python benchmarks/bench_lookahead.py --parts hits --arc    # hit rates only, with the ARC traces
    python benchmarks/bench_lookahead.py --parts speed --threads 1 --json runs/lookahead.json

Two parts:

* ``hits``: the per-batch unique IDs of Zipf-skewed, Criteo-shaped batches (tierec.data.synth,
  "auto" profile) -- and with ``--arc`` the ARC paper's OLTP and P3 traces, cut into batches of
  ``--arc-batch`` requests -- replayed through a real `LookaheadCache` (prepare/release as
  training does, rows brought in on demand) at windows of 10, 50, 200 batches and the whole
  trace, beside simulated LRU and LFU and Belady's MIN (tierec.sim.policies) on the same trace.
  "lookahead+prefetch" also prepares ``--depth`` steps ahead, as the training pipeline does
  (those rows are pinned early, which costs some hits). "synth group of N" replays the N
  synthetic tables as one table group (rows linearized, one cache of N x the capacity), against
  MIN on the same linearized trace. Hit rate = 1 - rows fetched / lookups.
* ``speed``: the same DLRM (row-wise Adagrad, bottom MLP 13-512-256-D, top 512-256-1) trained
  on the same batches by one worker process per peer, rounds alternating:
  ``memory`` (every table in memory), ``lru`` (SsdTable files behind LRU caches of
  ``--cache-fraction`` of each table's rows, the previous issue's cache), ``lookahead``
  (the same files and cache size, `LookaheadPipeline` with ``--window``/``--depth``), ``grouped``
  (the same, all tables behind ONE look-ahead cache of the summed size: `TableGroup`, as
  ``tierec train`` builds by default). An SSD peer takes ``:ALIGN`` for padded rows (``grouped:512``).
  Reports samples/s and step time vs memory, the stall fraction (time the trainer waited for
  rows / training time), late steps, rows and bytes moved per step, hit rate, peak RSS, and
  whether all peers' losses were bit-identical at every step.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0] + "/src")
sys.path.insert(0, __file__.rsplit("/", 1)[0])

from bench_tiered import (MODEL_SEED, NUM_DENSE, SPARSE, _ask, _drop_page_cache, _positive, begin_run, end_run,
                          generate_stream)
from tierec.sim.policies import lfu_hit_rate, lru_hit_rate, min_hit_rate
from tierec.config import format_bytes
from tierec.errors import TierecError
from tierec.modules.dlrm import DLRM
from tierec.modules.embedding import TableConfig, build_collection
from tierec.storage.base import InMemoryTable
from tierec.storage import CachedTable
from tierec.storage.group import TableGroup, TableView
from tierec.storage.lookahead import LookaheadCache
from tierec.storage.ssd import SsdTable
from tierec.malloc import STEP_MALLOC, limit_malloc_retention, set_malloc_thresholds
from tierec.train.pipeline import LookaheadPipeline
from tierec.train.trainer import cache_stats, prefetch_targets

PEERS = ("memory", "lru", "lookahead", "grouped")
LOOKAHEAD_PEERS = ("lookahead", "grouped")


def _is_la(peer: str) -> bool:
    return peer.partition(":")[0] in LOOKAHEAD_PEERS


# --------------------------------------------------------------------------- part: hit rates
def replay(steps: list[torch.Tensor], capacity: int, window: int, depth: int = 0) -> float:
    """Hit rate of a LookaheadCache over per-step unique IDs; ``depth`` steps prepared ahead (pinned)."""
    n_rows = int(max(int(s.max()) for s in steps if s.numel())) + 1
    cache = LookaheadCache(InMemoryTable(n_rows, 1, 0), capacity)
    window = min(window, len(steps))
    observed, prepared, pending = -1, -1, []
    for t in range(len(steps)):
        while observed < min(len(steps) - 1, t + window - 1):
            observed += 1
            cache.observe(observed, steps[observed])
        while prepared < min(observed, t + depth):
            ws = cache.prepare(prepared + 1, steps[prepared + 1], allow_bypass=prepared + 1 == t)
            if ws is None:  # no room until step t is released
                break
            prepared += 1
            pending.append(ws)
        cache.release(pending.pop(0), dirty=True)
    return cache.stats()["hit_rate"]


def hit_table(name: str, steps: list[torch.Tensor], capacity: int, windows, depth: int) -> dict:
    flat = np.concatenate([s.numpy() for s in steps])
    row = {"trace": name, "requests": int(flat.size), "steps": len(steps), "capacity": capacity,
           "lru": lru_hit_rate(flat, capacity), "lfu": lfu_hit_rate(flat, capacity),
           "min": min_hit_rate(flat, capacity, bypass=False), "min_bypass": min_hit_rate(flat, capacity)}
    for w in windows:
        row[f"la{w}"] = replay(steps, capacity, w)
    row["la_full"] = replay(steps, capacity, len(steps))
    row[f"la{windows[-1]}_d{depth}"] = replay(steps, capacity, windows[-1], depth)
    return row


def part_hits(a, traces: dict) -> list[dict]:
    windows = [10, 50, 200]
    rows = []
    for k in list(traces)[: a.hit_tables]:
        steps = [torch.from_numpy(np.ascontiguousarray(x)) for x in traces[k]]
        rows.append(hit_table(f"synth {k}", steps, max(1, int(a.cache_fraction * a.table_rows)), windows, a.depth))
        print(f"# hits: {rows[-1]['trace']} done", file=sys.stderr, flush=True)
    keys = list(traces)[: a.hit_tables]
    if len(keys) > 1:  # the same tables as one table group: rows linearized, one cache of the summed size
        n = len(traces[keys[0]])
        steps = [torch.from_numpy(np.concatenate([np.asarray(traces[k][i], np.int64) + j * a.table_rows
                                                  for j, k in enumerate(keys)])) for i in range(n)]
        cap = len(keys) * max(1, int(a.cache_fraction * a.table_rows))
        rows.append(hit_table(f"synth group of {len(keys)}", steps, cap, windows, a.depth))
        print(f"# hits: {rows[-1]['trace']} done", file=sys.stderr, flush=True)
    if a.arc:
        from tierec.sim.traces import read_arc

        shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "arc"
        for fname, cap in (("OLTP.lis.zst", 1000), ("P3.lis.zst", 10000)):
            tr = read_arc(shared / fname, max_requests=a.arc_requests)
            steps = [torch.unique(torch.from_numpy(tr[i:i + a.arc_batch])) for i in range(0, tr.size, a.arc_batch)]
            rows.append(hit_table(f"ARC {fname.split('.')[0]}", steps, cap, windows, a.depth))
            print(f"# hits: {rows[-1]['trace']} done", file=sys.stderr, flush=True)
        # one request per step (no batch residency constraint): the full window must equal MIN exactly
        tr = read_arc(shared / "OLTP.lis.zst", max_requests=a.arc_single)
        steps = [torch.tensor([int(x)]) for x in tr]
        rows.append(hit_table("ARC OLTP (1/step)", steps, 1000, windows, a.depth))
    cols = ["lru", "lfu", "la10", "la50", "la200", f"la200_d{a.depth}", "la_full", "min", "min_bypass"]
    heads = ["LRU", "LFU", "LA w=10", "LA w=50", "LA w=200", f"LA200+pf{a.depth}", "LA full", "MIN", "MIN+bypass"]
    print("\n## hit rates (1 - rows fetched / unique lookups); LA = look-ahead cache, window in batches")
    print(f"{'trace':18s} {'capacity':>9s} " + " ".join(f"{h:>10s}" for h in heads) + "   LA full - MIN")
    for r in rows:
        print(f"{r['trace']:18s} {r['capacity']:9,d} " + " ".join(f"{r[c]:10.2%}" for c in cols)
              + f"   {100 * (r['la_full'] - r['min']):+.3f} pt")
    return rows


# --------------------------------------------------------------------------- part: speed
def _totals(model) -> dict:
    tot = dict.fromkeys(("lookups", "hits", "misses", "evictions", "writebacks", "bytes_read", "bytes_written"), 0)
    for s in cache_stats(model).values():  # a table group's shared cache counted once
        if s.get("tier") == "cache":
            for k in tot:
                tot[k] += s[k]
    return tot


def worker(peer, a, stream, root, total_steps, conn):
    try:
        torch.set_num_threads(a.threads)
        if not a.keep_malloc:
            limit_malloc_retention()
        configs = [TableConfig(k, a.table_rows, a.dim) for k in stream.keys]
        factory = None
        kind, _, align = peer.partition(":")  # "lookahead:512": the look-ahead peer on files padded to 512 B rows
        row_align = int(align) if align else a.row_align
        if peer != "memory":
            cap = max(1, int(a.cache_fraction * a.table_rows))

            def factory(i, cfg, sdim):
                ssd = SsdTable(root / peer / f"{cfg.name}.tbl", cfg.num_embeddings, cfg.embedding_dim, sdim,
                               create=True, init_seed=MODEL_SEED, table_index=i, direct_io=a.direct_io,
                               row_align=row_align)
                _drop_page_cache(root / peer / f"{cfg.name}.tbl")
                if kind == "lookahead":
                    return LookaheadCache(ssd, cap, name=cfg.name)
                if kind == "grouped":  # all tables behind one look-ahead cache of the same total size
                    return group.add(ssd, cap, cfg.name)
                return CachedTable(ssd, cap, "lru", name=cfg.name)

            group = TableGroup("group", io_threads=a.io_threads)

            (root / peer).mkdir(parents=True, exist_ok=True)
        torch.manual_seed(MODEL_SEED)
        ebc = build_collection(configs, SPARSE, seed=MODEL_SEED, storage_factory=factory)
        model = DLRM(NUM_DENSE, ebc, [512, 256], [512, 256])
        opt = torch.optim.Adam(model.dense_parameters(), lr=1e-3)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        pipe = hold = None
        if kind in LOOKAHEAD_PEERS:
            pipe = LookaheadPipeline((stream.batch_at(i) for i in range(total_steps)), prefetch_targets(ebc.tables),
                                     window=a.window, depth=a.depth, max_bytes=1 << 30, io_threads=a.io_threads)
            hold = pipe.paused()
            hold.__enter__()  # parked between rounds: no background work while the other peers run
        if not a.keep_malloc:
            set_malloc_thresholds(*STEP_MALLOC)  # the training loop's, as in `tierec train` (tierec.malloc)
        conn.send({"ready": True})
        while True:
            cmd = conn.recv()
            if cmd == "stop":
                if pipe is not None:
                    hold.__exit__(None, None, None)
                    pipe.close()
                conn.send({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
                return
            batches = None if pipe is not None else [stream.batch_at(i) for i in cmd]  # read before the clock
            for t in ebc.tables:
                if isinstance(t.storage, CachedTable):
                    t.storage.reset_stats()
                elif isinstance(t.storage, TableView):
                    t.storage.group.cache.reset_stats()
            st0 = dict(pipe.stats) if pipe is not None else None
            losses = []
            t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
            if pipe is not None:
                hold.__exit__(None, None, None)
                batches = (next(pipe) for _ in cmd)
            for b in batches:
                loss = loss_fn(model(b.dense, b.sparse), b.labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            dt, cpu, pcpu = time.perf_counter() - t0, time.thread_time() - c0, time.process_time() - p0
            res = {"samples_per_s": len(cmd) * a.batch / dt, "seconds": dt, "steps": len(cmd), "losses": losses,
                   "trainer_cpu_s": cpu, "process_cpu_s": pcpu,
                   "storage": _totals(model)}
            if pipe is not None:
                hold = pipe.paused()
                hold.__enter__()
                res["stall_s"] = pipe.stats["stall_s"] - st0["stall_s"]
                res["late_steps"] = pipe.stats["late_steps"] - st0["late_steps"]
                res["worker_cpu_s"] = pipe.stats["worker_cpu_s"] - st0["worker_cpu_s"]
                res["window_sum"] = pipe.stats["window_sum"] - st0["window_sum"]
                res["prepared_steps"] = pipe.stats["prepared_steps"] - st0["prepared_steps"]
            conn.send(res)
    except Exception as e:  # noqa: BLE001  (report, do not hang the parent)
        conn.send({"error": f"{peer}: {type(e).__name__}: {e}\n{traceback.format_exc()}"})


def _probe(dirs: list[Path], seconds: float) -> list[dict]:
    """The device under the SSD peers' table files (`tierec.storage.probe`), queue depths 1 and 32."""
    from tierec.storage.probe import probe_reads, table_files

    return [r.to_dict() for r in probe_reads(table_files(dirs), (1, 32), seconds)]


def part_speed(a, stream, work: Path) -> dict:
    cap = max(1, int(a.cache_fraction * a.table_rows))
    row_bytes = (a.dim + SPARSE.state_dim(a.dim)) * 4
    total_steps = a.warmup + a.rounds * a.steps
    print(f"\n## speed -- DLRM, {a.tables} tables x {a.table_rows:,} rows x {a.dim} dims "
          f"({format_bytes(a.tables * a.table_rows * row_bytes)} of tables); SSD peers: caches of {cap:,} rows/table "
          f"({a.cache_fraction:.1%}), {'O_DIRECT' if a.direct_io else 'memmap'} files{f' (rows padded to {a.row_align} B)' if a.row_align else ''}; look-ahead window {a.window}, "
          f"depth {a.depth}; batch {a.batch}, {a.threads} thread(s); {a.warmup} warm-up steps, then {a.rounds} "
          f"rounds x {a.steps} steps, peers alternate")
    ctx = mp.get_context("spawn")
    conns, procs = {}, []
    try:
        for peer in a.peers:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(peer, a, stream, work / "tables", total_steps, child), daemon=True)
            proc.start()
            procs.append(proc)
            conns[peer] = parent
            _ask(parent)
            print(f"# {peer}: built", file=sys.stderr, flush=True)
        probes = {}
        ssd_dirs = [work / "tables" / p for p in a.peers if p != "memory"]
        if a.probe_seconds and ssd_dirs:
            probes["before"] = _probe(ssd_dirs, a.probe_seconds)
        warm = {p: _ask(conns[p], list(range(a.warmup))) for p in a.peers} if a.warmup else {}
        results = {p: [] for p in a.peers}
        for r in range(a.rounds):
            idx = list(range(a.warmup + r * a.steps, a.warmup + (r + 1) * a.steps))
            for p in (a.peers if r % 2 == 0 else a.peers[::-1]):
                results[p].append(_ask(conns[p], idx))
            print(f"# round {r + 1}/{a.rounds}: " + ", ".join(
                f"{p} {results[p][-1]['samples_per_s']:,.0f}" for p in a.peers), file=sys.stderr, flush=True)
        if a.probe_seconds and ssd_dirs:
            probes["after"] = _probe(ssd_dirs, a.probe_seconds)
        mem = {p: _ask(conns[p], "stop") for p in a.peers}
    finally:
        for c in conns.values():
            c.close()
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
    losses = {p: [x for r in ([warm[p]] if p in warm else []) + results[p] for x in r["losses"]] for p in a.peers}
    identical = all(losses[p] == losses[a.peers[0]] for p in a.peers)
    base_p = "memory" if "memory" in a.peers else a.peers[0]
    base = statistics.median(r["samples_per_s"] for r in results[base_p])
    out = {"losses_bit_identical": identical, "cache_rows": cap, "peers": {}, "device": probes}
    print(f"{'peer':10s} {'samples/s':>10s} {'step time':>10s} {'vs memory':>10s} {'stall':>7s} {'late':>6s} "
          f"{'hit rate':>9s} {'read/step':>10s} {'write/step':>11s} {'rows/step':>10s} {'peak RSS':>10s}")
    for p in a.peers:
        rs = results[p]
        sps = statistics.median(r["samples_per_s"] for r in rs)
        steps = sum(r["steps"] for r in rs)
        secs = sum(r["seconds"] for r in rs)
        tot = {k: sum(r["storage"][k] for r in rs) for k in rs[0]["storage"]}
        stall = sum(r.get("stall_s", 0.0) for r in rs) / secs
        late = sum(r.get("late_steps", 0) for r in rs) / steps
        wcpu = sum(r.get("worker_cpu_s", 0.0) for r in rs) / steps
        tcpu = sum(r["trainer_cpu_s"] for r in rs) / steps
        pcpu = sum(r["process_cpu_s"] for r in rs) / steps
        hit = tot["hits"] / tot["lookups"] if tot["lookups"] else None
        moved = (tot["misses"] + tot["writebacks"]) / steps
        print(f"{p:10s} {sps:10,.0f} {1e3 * a.batch / sps:8.1f}ms {base / sps:9.3f}x "
              f"{(f'{stall:.1%}' if _is_la(p) else '-'):>7s} "
              f"{(f'{late:.0%}' if _is_la(p) else '-'):>6s} "
              f"{(f'{hit:.2%}' if hit is not None else '-'):>9s} "
              f"{format_bytes(tot['bytes_read'] / steps) if p != 'memory' else '-':>10s} "
              f"{format_bytes(tot['bytes_written'] / steps) if p != 'memory' else '-':>11s} "
              f"{(f'{moved:,.0f}' if p != 'memory' else '-'):>10s} {mem[p]['maxrss_mib']:6,.0f} MiB")
        out["peers"][p] = {"samples_per_s": sps, "rounds": [r["samples_per_s"] for r in rs],
                           "step_time_vs_memory": base / sps, "stall_fraction": stall, "late_fraction": late,
                           "hit_rate": hit, "bytes_read_per_step": tot["bytes_read"] / steps,
                           "bytes_written_per_step": tot["bytes_written"] / steps, "rows_moved_per_step": moved,
                           "peak_rss_mib": mem[p]["maxrss_mib"], "worker_cpu_ms_per_step": 1e3 * wcpu,
                           "trainer_cpu_ms_per_step": 1e3 * tcpu, "process_cpu_ms_per_step": 1e3 * pcpu}
        print(f"#   {p}: CPU per step of {1e3 * secs / steps:.1f} ms: trainer thread {1e3 * tcpu:.1f} ms, "
              f"other threads {1e3 * (pcpu - tcpu):.1f} ms")
        if _is_la(p):
            win = sum(r["window_sum"] for r in rs) / max(1, sum(r["prepared_steps"] for r in rs))
            out["peers"][p]["mean_window_steps"] = win
            print(f"#   look-ahead worker thread: {1e3 * wcpu:.1f} ms CPU per step (overlapped with the step); "
                  f"the oracle saw {win:.0f} steps ahead on average (window {a.window})")
    if base_p in results:  # paired: each round's peers ran back to back, so the machine's drift cancels
        for p in a.peers:
            if p != base_p:
                r = [b["samples_per_s"] / x["samples_per_s"] for b, x in zip(results[base_p], results[p])]
                out["peers"][p]["step_time_vs_memory_per_round"] = r
                print(f"# {p}: step time vs {base_p}, per round: " + ", ".join(f"{x:.3f}x" for x in r)
                      + f"; median {statistics.median(r):.3f}x")
    print("# step time vs memory: the target is <= 1.1x (storage fully hidden); rows/step = fetched + written back")
    for when, pr in probes.items():
        print(f"# device under the SSD peers' files, {when} the rounds (random 4 KiB O_DIRECT reads; stalled = time "
              "with a read > 10 ms): " + "; ".join(
                  f"QD {r['queue_depth']} {r['iops']:,.0f} reads/s, p99 {r['p99_ms']:.2f} ms, stalled {r['stalled']:.0%}"
                  for r in pr))
    print(f"# losses of all peers bit-identical at all {len(losses[a.peers[0]])} steps: {'yes' if identical else 'NO'}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="hits,speed", help="hits,speed (default both)")
    p.add_argument("--tables", type=_positive(int), default=8)
    p.add_argument("--table-rows", type=_positive(int), default=1 << 20)
    p.add_argument("--dim", type=_positive(int), default=64)
    p.add_argument("--batch", type=_positive(int), default=4096)
    p.add_argument("--hot", type=_positive(int), default=1, help="IDs per sample per table")
    p.add_argument("--zipf", default="auto")
    p.add_argument("--cache-fraction", type=_positive(float), default=0.02)
    p.add_argument("--window", type=_positive(int), default=200, help="look-ahead window in batches")
    p.add_argument("--depth", type=_positive(int), default=2, help="steps prepared ahead")
    p.add_argument("--io-threads", type=_positive(int), default=None,
                   help="look-ahead prefetch threads (default: tierec's, by cores)")
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--steps", type=_positive(int), default=40)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=_positive(int), default=3)
    p.add_argument("--threads", type=_positive(int), default=1)
    p.add_argument("--direct-io", action="store_true",
                   help="SSD peers read and write their files with O_DIRECT (no page cache: what the device delivers)")
    p.add_argument("--row-align", type=int, default=0,
                   help="SSD peers' files: rows padded to this many bytes (0 packed; 512 with --direct-io: no "
                        "read-modify-write, see SsdTable)")
    p.add_argument("--probe-seconds", type=float, default=1.0,
                   help="seconds per queue depth of the device probe before and after the rounds (0: none)")
    p.add_argument("--keep-malloc", action="store_true",
                   help="leave glibc's malloc thresholds alone (by default the peers build their tables with tierec's "
                        "transient thresholds and train with its step thresholds, as `tierec train` does)")
    p.add_argument("--hit-tables", type=_positive(int), default=2, help="synthetic tables replayed in part hits")
    p.add_argument("--hit-steps", type=_positive(int), default=300, help="batches replayed in part hits")
    p.add_argument("--arc", action="store_true", help="also replay the ARC OLTP and P3 traces (../shared/data/arc)")
    p.add_argument("--arc-batch", type=_positive(int), default=256, help="requests per batch of the ARC traces")
    p.add_argument("--arc-requests", type=_positive(int), default=400_000, help="requests read from each ARC trace")
    p.add_argument("--arc-single", type=_positive(int), default=20_000,
                   help="OLTP requests replayed one per step (full window must equal MIN)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan-batches", type=int, default=1)
    p.add_argument("--dir", default="runs")
    p.add_argument("--json")
    a = p.parse_args(argv)
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    a.peers = [x.strip() for x in a.peers.split(",") if x.strip()]
    def ok(peer: str) -> bool:  # memory | lru | lookahead, an SSD peer optionally with :ALIGN
        kind, _, align = peer.partition(":")
        return kind in PEERS and (not align or (align.isdigit() and kind != "memory"))

    if set(a.parts) - {"hits", "speed"} or not all(map(ok, a.peers)):
        p.error("--parts takes hits,speed; --peers takes memory,lru,lookahead,grouped, an SSD peer optionally with "
                ":ALIGN (e.g. lookahead:512: its files' rows padded to 512 B)")
    if a.zipf != "auto":
        a.zipf = float(a.zipf)
    return a


def main(argv=None):
    a = parse_args(argv)
    started, work, result = begin_run(a, "bench_lookahead")
    try:
        n = max(a.warmup + a.rounds * a.steps if "speed" in a.parts else 0, a.hit_steps if "hits" in a.parts else 0)
        stream, traces, _ = generate_stream(a, work / "stream", n)
        if "hits" in a.parts:
            result["hits"] = part_hits(a, {k: v[: a.hit_steps] for k, v in traces.items()})
        if "speed" in a.parts:
            result["speed"] = part_speed(a, stream, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return end_run(a, started, result)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TierecError as e:
        print(f"bench_lookahead: error: {e}", file=sys.stderr)
        sys.exit(2)

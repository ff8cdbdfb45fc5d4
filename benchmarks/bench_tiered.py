"""Embedding tables larger than memory: SSD files behind caches vs all in memory, in one run.

    python benchmarks/bench_tiered.py                # 8 tables x 1,048,576 rows x 64 dims (2.03 GiB), 512 MiB budget
    python benchmarks/bench_tiered.py --threads 1 --json runs/tiered.json
    python benchmarks/bench_tiered.py --direct-io --parts 1          # the SSD tier without the OS page cache
    python benchmarks/bench_tiered.py --direct-io --table-rows 4194304 --budget 2GiB --parts 1
                                                     # full size: 8.1 GiB (8.7 GB) of tables, 2 GiB budget

Three parts, each printed as a table with ratios (`--parts 1,2,3` picks some):

1. **Larger than memory.** The same DLRM (tierec.modules.dlrm.DLRM over build_collection,
   row-wise Adagrad, bottom MLP 13-512-256-D, top MLP 512-256-1) trained on the same
   Zipf-skewed, Criteo-shaped batches (tierec.data.synth, "auto" profile calibrated to Meta's
   locality statistics) two ways, each in its own worker process, rounds alternating:
   - `memory`: every table in memory (InMemoryTable);
   - `ssd`: every table in a file under --dir (SsdTable, memmap or --direct-io) behind a
     CachedTable whose size the planner (tierec.storage.plan.plan_tables) gives it from
     --budget (rows + index bookkeeping counted), built by tierec.storage.tiered's factory.
   Reports samples/s and the ratio, peak RSS (whole worker, and during training only), the
   cache hit rate, bytes read from / written to the SSD tier per step (tierec's counters, and
   what the kernel counted in /proc/self/io), energy per 1k samples, and whether the two
   peers' losses were bit-identical at every step (they should be).
   The table files are dropped from the OS page cache after creation (posix_fadvise
   DONTNEED), so first reads come from the disk; in memmap mode the kernel may then keep
   pages it read in its page cache (outside the budget and outside RSS), with --direct-io not.
2. **Hit rates at a small cache** (--cache-fraction of each table's rows, default 2%): the
   per-batch unique IDs of the same batches replayed through a real CachedTable
   (acquire/release dirty, as a training step does) for each policy, beside the simulated
   LRU and LFU and the offline optimum, Belady's MIN (tierec.sim.policies), on the same trace.
   `freq` gets its frequencies as `tierec train` does: counts over the first --plan-batches
   batches, then warm_up() (warm-up reads are not counted as hits or misses).
3. **The cache's own overhead.** dedup + acquire + embedding_bag + release of batches of
   --overhead-batch bags x --overhead-hot IDs over one --overhead-rows-row table at a 100% hit
   rate (capacity = table rows, warmed): CachedTable (each policy) vs InMemoryTable, lookups/s.

Everything written goes to a fresh temporary directory under --dir (default: runs/, which
git ignores), removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0] + "/src")

from tierec.sim.policies import lfu_hit_rate, lru_hit_rates, min_hit_rate
from tierec.sim.traces import dedup_per_batch
from tierec.config import format_bytes, parse_bytes
from tierec.data.dataset import Batch, Chunk
from tierec.data.synth import SynthConfig, iter_chunks
from tierec.errors import TierecError
from tierec.modules.dlrm import DLRM
from tierec.modules.embedding import TableConfig, build_collection, dedup
from tierec.storage.base import InMemoryTable, RowStoreDefaults
from tierec.modules.optim import SparseOptimizer
from tierec.storage import CachedTable
from tierec.storage.plan import AccessSample, TableNeeds, plan_tables
from tierec.malloc import STEP_MALLOC, limit_malloc_retention, set_malloc_thresholds
from tierec.storage.settings import StorageSettings
from tierec.storage.tiered import INDEX_BYTES_PER_ROW, LOOKAHEAD_INDEX_BYTES_PER_ROW, make_storage_factory

try:
    from tierec.energy import meter as energy_meter
except ImportError:  # energy metering is optional in this script
    energy_meter = None

NUM_DENSE = 13
POLICIES = ("lru", "lfu", "freq")
SPARSE = SparseOptimizer("rowwise_adagrad", 0.05)
MODEL_SEED = 0


# --------------------------------------------------------------------------- small helpers
def _rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (VmHWM) so that it covers training only (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_io() -> dict:
    """This process's /proc/self/io (read_bytes / write_bytes: what the kernel sent to or fetched from storage)."""
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f if ":" in line)}
    except OSError:
        return {}


def _drop_page_cache(path: Path) -> None:
    """Drop one file's pages from the OS page cache (only this file's; nothing machine-wide)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)


def _page_cache_bytes(paths) -> int | None:
    """Bytes of these files now in the OS page cache (mincore over a mapping that touches nothing)."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    page, total = os.sysconf("SC_PAGE_SIZE"), 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            try:
                vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                total += int((np.frombuffer(vec, np.uint8) & 1).sum()) * page
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return total


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, torch {torch.__version__}, Python {platform.python_version()}"


class _ZeroRows(RowStoreDefaults):
    """A backing store (`RowStore`) of zero rows that forgets writes: lets the cache's policy be
    replayed and timed without I/O (hit rates do not depend on the row values)."""

    def __init__(self, num_embeddings: int, dim: int, state_dim: int):
        self.num_embeddings, self.dim, self.state_dim = num_embeddings, dim, state_dim
        self.device = torch.device("cpu")

    def read(self, ids):
        return torch.zeros(ids.numel(), self.dim), torch.zeros(ids.numel(), self.state_dim)

    def write(self, ids, weight, state):
        pass

    def read_rows(self, start, end):
        return torch.zeros(end - start, self.dim), torch.zeros(end - start, self.state_dim)

    def write_rows(self, start, weight, state):
        pass

    def flush(self):
        pass


# --------------------------------------------------------------------------- the batch stream
class Stream:
    """The training batches, generated once by the parent into flat files under ``root``.

    ids int64 [S, T, B*hot] (key-major, as a KJT), dense float32 [S, B, 13], labels float32 [S, B].
    Workers read one batch at a time with np.fromfile (no mapping: nothing counts in RSS).
    """

    def __init__(self, root: Path, steps: int, tables: int, batch: int, hot: int):
        self.root, self.steps, self.tables, self.batch, self.hot = root, steps, tables, batch, hot
        self.keys = [f"C{i + 1}" for i in range(tables)]

    @property
    def _n_ids(self) -> int:
        return self.tables * self.batch * self.hot

    def batch_at(self, i: int) -> Batch:
        T, B, H = self.tables, self.batch, self.hot
        ids = np.fromfile(self.root / "ids.i64", np.int64, self._n_ids, offset=i * self._n_ids * 8).reshape(T, B * H)
        dense = np.fromfile(self.root / "dense.f32", np.float32, B * NUM_DENSE,
                            offset=i * B * NUM_DENSE * 4).reshape(B, NUM_DENSE)
        labels = np.fromfile(self.root / "labels.f32", np.float32, B, offset=i * B * 4)
        offsets = np.arange(0, B * H + 1, H, dtype=np.int64)
        chunk = Chunk(labels, dense, {k: (ids[t], offsets) for t, k in enumerate(self.keys)})
        return Batch.from_chunk(chunk, self.keys)


def generate_stream(a, root: Path, steps: int):
    """Write ``steps`` batches; return (Stream, per-table traces of per-batch unique IDs, plan sample)."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = SynthConfig(rows=steps * a.batch, test_fraction=0.0, seed=a.seed, num_sparse=a.tables,
                      cardinalities=[a.table_rows], max_cardinality=0, num_dense=NUM_DENSE,
                      multi_hot=f"fixed:{a.hot}", zipf=a.zipf, progress=False)
    stream = Stream(root, steps, a.tables, a.batch, a.hot)
    traces = {k: [] for k in stream.keys}
    plan_vals = {k: [] for k in stream.keys}
    n = 0
    with open(root / "ids.i64", "wb") as fi, open(root / "dense.f32", "wb") as fd, open(root / "labels.f32", "wb") as fl:
        for chunk in iter_chunks(cfg, "train", chunk_rows=a.batch):
            if len(chunk) != a.batch:
                break
            for k in stream.keys:
                v, o = chunk.sparse[k]
                fi.write(np.ascontiguousarray(v, np.int64).tobytes())
                traces[k].append(dedup_per_batch(v, o, a.batch))
                if n < a.plan_batches:
                    plan_vals[k].append(v)
            fd.write(np.ascontiguousarray(chunk.dense, np.float32).tobytes())
            fl.write(np.ascontiguousarray(chunk.label, np.float32).tobytes())
            n += 1
    if n != steps:
        raise TierecError(f"the generator gave {n} batches, expected {steps}")
    sample = {}
    for k in stream.keys:
        vals = np.concatenate(plan_vals[k])
        ids, counts = np.unique(vals, return_counts=True)
        sample[k] = AccessSample(int(vals.size), ids, counts.astype(np.int64))
    return stream, traces, sample


# --------------------------------------------------------------------------- part 1: the two peers
def _storage_totals(model) -> dict:
    tot = dict.fromkeys(("lookups", "hits", "misses", "evictions", "writebacks", "bypass_acquires",
                         "ssd_bytes_read", "ssd_bytes_written", "ssd_device_bytes_read",
                         "ssd_device_bytes_written", "ssd_read_time_s", "ssd_write_time_s"), 0)
    tot["resident"] = tot["dirty_rows"] = 0
    mode = None
    for t in model.embeddings.tables:
        st = t.storage
        if not isinstance(st, CachedTable):
            continue
        s = st.stats()
        for k in ("lookups", "hits", "misses", "evictions", "writebacks", "bypass_acquires", "resident",
                  "dirty_rows"):
            tot[k] += s[k]
        b = s.get("backing", {})
        tot["ssd_bytes_read"] += b.get("bytes_read", 0)
        tot["ssd_bytes_written"] += b.get("bytes_written", 0)
        tot["ssd_device_bytes_read"] += b.get("device_bytes_read", 0)
        tot["ssd_device_bytes_written"] += b.get("device_bytes_written", 0)
        tot["ssd_read_time_s"] += b.get("read_time_s", 0.0)
        tot["ssd_write_time_s"] += b.get("write_time_s", 0.0)
        mode = b.get("mode", mode)
    tot["mode"] = mode
    return tot


def _reset_storage(model) -> None:
    for t in model.embeddings.tables:
        if isinstance(t.storage, CachedTable):
            t.storage.reset_stats()


def worker(peer, a, stream, plan, sample, root, conn):
    try:
        torch.set_num_threads(a.threads)
        limit_malloc_retention()
        t0 = time.perf_counter()
        configs = [TableConfig(k, a.table_rows, a.dim) for k in stream.keys]
        factory = None
        if peer == "ssd":
            inner = make_storage_factory(StorageSettings(root, seed=MODEL_SEED, direct_io=a.direct_io), plan, sample,
                                         torch.device("cpu"))

            def factory(i, cfg, state_dim):
                st = inner(i, cfg, state_dim)
                _drop_page_cache(root / f"{cfg.name}.tbl")  # first reads really come from the disk
                return st

        torch.manual_seed(MODEL_SEED)
        ebc = build_collection(configs, SPARSE, seed=MODEL_SEED, storage_factory=factory)
        model = DLRM(NUM_DENSE, ebc, [512, 256], [512, 256])
        opt = torch.optim.Adam(model.dense_parameters(), lr=1e-3)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        info = {"ready": True, "build_s": time.perf_counter() - t0, "rss_after_build_mib": _rss_now_mib(),
                "peak_rss_build_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "cache_rows": [t.storage.capacity for t in ebc.tables if isinstance(t.storage, CachedTable)],
                "cache_index_bytes": sum(t.storage.index_nbytes for t in ebc.tables
                                         if isinstance(t.storage, CachedTable)),
                "cache_row_bytes": sum(t.storage.nbytes for t in ebc.tables if isinstance(t.storage, CachedTable))}
        set_malloc_thresholds(*STEP_MALLOC)  # the training loop's, as in `tierec train` (tierec.malloc)
        info["hwm_reset"] = _reset_hwm()
        conn.send(info)
        while True:
            cmd = conn.recv()
            if cmd == "stop":
                conn.send({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                           "train_hwm_mib": _hwm_mib() if info["hwm_reset"] else None,
                           "rss_end_mib": _rss_now_mib()})
                return
            batches = [stream.batch_at(i) for i in cmd]  # read before the clock starts
            _reset_storage(model)
            io0 = _proc_io()
            m = energy_meter(work_unit="samples").start() if energy_meter else None
            losses = []
            t0 = time.perf_counter()
            for b in batches:
                loss = loss_fn(model(b.dense, b.sparse), b.labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            dt = time.perf_counter() - t0
            io1 = _proc_io()
            res = {"samples_per_s": len(batches) * a.batch / dt, "seconds": dt, "steps": len(batches),
                   "losses": losses, "storage": _storage_totals(model),
                   "kernel_read_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0),
                   "kernel_write_bytes": io1.get("write_bytes", 0) - io0.get("write_bytes", 0)}
            if m is not None:
                m.add_work(len(batches) * a.batch)
                res["energy"] = m.stop().columns()
            del batches
            conn.send(res)
    except Exception as e:  # noqa: BLE001  (report, do not hang the parent)
        conn.send({"error": f"{peer}: {type(e).__name__}: {e}\n{traceback.format_exc()}"})


def _ask(conn, msg=None):
    if msg is not None:
        conn.send(msg)
    res = conn.recv()
    if "error" in res:
        raise TierecError(f"worker failed: {res['error']}")
    return res


def _sum_rounds(rs: list[dict]) -> dict:
    keys = [k for k, v in rs[0]["storage"].items() if isinstance(v, (int, float))]
    st = {k: sum(r["storage"][k] for r in rs) for k in keys}
    st["mode"] = rs[-1]["storage"]["mode"]
    st["resident"], st["dirty_rows"] = rs[-1]["storage"]["resident"], rs[-1]["storage"]["dirty_rows"]  # states
    st["steps"] = sum(r["steps"] for r in rs)
    st["kernel_read_bytes"] = sum(r["kernel_read_bytes"] for r in rs)
    st["kernel_write_bytes"] = sum(r["kernel_write_bytes"] for r in rs)
    st["hit_rate"] = st["hits"] / st["lookups"] if st["lookups"] else None
    return st


def part1(a, stream, sample, work: Path) -> dict:
    row_bytes = (a.dim + SPARSE.state_dim(a.dim)) * 4
    table_bytes = a.table_rows * row_bytes
    needs = [TableNeeds(k, a.table_rows, row_bytes, sample[k].lookups) for k in stream.keys]
    try:
        index = LOOKAHEAD_INDEX_BYTES_PER_ROW if a.policy == "lookahead" else INDEX_BYTES_PER_ROW
        plan = plan_tables(needs, a.budget, a.policy, index,
                           {k: {"placement": "ssd"} for k in stream.keys})
    except TierecError as e:
        raise TierecError(f"--budget {format_bytes(a.budget)}: {e}") from None
    cache_rows = [p.cache_rows for p in plan]
    total = table_bytes * a.tables
    print(f"\n## part 1: larger than memory -- DLRM, {a.tables} tables x {a.table_rows:,} rows x {a.dim} dims "
          f"(+1 row-wise Adagrad state) = {format_bytes(total)} of tables; budget {format_bytes(a.budget)} "
          f"(tables = {total / a.budget:.2f}x the budget)")
    print(f"# ssd peer: {a.policy} caches of {min(cache_rows):,}-{max(cache_rows):,} rows/table "
          f"({min(cache_rows) / a.table_rows:.1%} of rows) planned from the budget at {row_bytes} B/row + "
          f"{index} B/row index; files {'O_DIRECT' if a.direct_io else 'memmap'} under {work}")
    print(f"# batch {a.batch} x {a.hot} ID(s)/table, synth zipf={a.zipf}, {a.threads} thread(s), "
          f"{a.warmup} warm-up steps, then {a.rounds} rounds x {a.steps} steps, peers alternate", flush=True)
    if total < 4 * a.budget:
        print(f"# note: the tables are only {total / a.budget:.2f}x the budget (the benchmark is meant for >= 4x)")

    ctx = mp.get_context("spawn")
    peers = ["memory", "ssd"]
    conns, procs, ready = {}, [], {}
    root = work / "tables"
    try:
        for peer in peers:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(peer, a, stream, plan, sample, root, child), daemon=True)
            proc.start()
            procs.append(proc)
            conns[peer] = parent
            print(f"# building {peer} peer ...", file=sys.stderr, flush=True)
            ready[peer] = _ask(parent)  # build sequentially: keeps peak memory and start-up noise apart
            print(f"# {peer}: built in {ready[peer]['build_s']:.1f} s, RSS {ready[peer]['rss_after_build_mib']:,.0f} MiB",
                  file=sys.stderr, flush=True)
        warm_idx = list(range(a.warmup))
        warm = {}
        for peer in peers:
            if warm_idx:
                warm[peer] = _ask(conns[peer], warm_idx)
        results = {p: [] for p in peers}
        for r in range(a.rounds):
            idx = list(range(a.warmup + r * a.steps, a.warmup + (r + 1) * a.steps))
            for peer in (peers if r % 2 == 0 else peers[::-1]):
                results[peer].append(_ask(conns[peer], idx))
            print(f"# round {r + 1}/{a.rounds}: " + ", ".join(
                f"{p} {results[p][-1]['samples_per_s']:,.0f} samples/s" for p in peers), file=sys.stderr, flush=True)
        mem = {p: _ask(conns[p], "stop") for p in peers}
    finally:
        for c in conns.values():
            try:
                c.close()
            except OSError:
                pass
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()

    losses = {p: [x for r in ([warm[p]] if p in warm else []) + results[p] for x in r["losses"]] for p in peers}
    identical = losses["memory"] == losses["ssd"]
    base = statistics.median(r["samples_per_s"] for r in results["memory"])
    out = {"plan": [p.to_dict() for p in plan], "table_bytes_total": total, "budget_bytes": a.budget,
           "losses_bit_identical": identical, "peers": {}}
    print(f"{'peer':7s} {'samples/s':>10s} {'vs memory':>10s} {'peak RSS':>10s} {'train RSS':>10s} {'hit rate':>9s} "
          f"{'SSD read/step':>14s} {'SSD write/step':>15s} {'J/1k samples':>13s}  energy")
    for p in peers:
        rs = results[p]
        sps = statistics.median(r["samples_per_s"] for r in rs)
        tot = _sum_rounds(rs)
        steps = tot["steps"]
        es = [r["energy"] for r in rs if "energy" in r]
        jk = statistics.median(e["j_per_1k"] for e in es) if es and es[0].get("j_per_1k") is not None else float("nan")
        method = es[-1]["method"] if es else "-"
        hwm = mem[p]["train_hwm_mib"]
        hit = f"{tot['hit_rate']:9.2%}" if tot["hit_rate"] is not None else f"{'-':>9s}"
        rd = format_bytes(tot["ssd_bytes_read"] / steps) if p == "ssd" else "-"
        wr = format_bytes(tot["ssd_bytes_written"] / steps) if p == "ssd" else "-"
        print(f"{p:7s} {sps:10,.0f} {sps / base:9.2f}x {mem[p]['maxrss_mib']:6,.0f} MiB "
              f"{(f'{hwm:6,.0f} MiB' if hwm else '-'):>10s} {hit} {rd:>14s} {wr:>15s} {jk:13.3f}  {method}")
        out["peers"][p] = {"samples_per_s": sps, "rounds": [r["samples_per_s"] for r in rs], "vs_memory": sps / base,
                           "peak_rss_mib": mem[p]["maxrss_mib"], "train_peak_rss_mib": hwm,
                           "rss_after_build_mib": ready[p]["rss_after_build_mib"], "build_s": ready[p]["build_s"],
                           "storage": tot, "per_step": {k: tot[k] / steps for k in
                                                        ("ssd_bytes_read", "ssd_bytes_written",
                                                         "ssd_device_bytes_read", "ssd_device_bytes_written",
                                                         "kernel_read_bytes", "kernel_write_bytes",
                                                         "ssd_read_time_s", "ssd_write_time_s", "misses",
                                                         "lookups", "evictions", "writebacks")},
                           "energy": es, "j_per_1k": jk, "energy_method": method,
                           "warmup": ({"samples_per_s": warm[p]["samples_per_s"], "storage": _sum_rounds([warm[p]])}
                                      if p in warm else None)}
    s = out["peers"]["ssd"]
    ps, ws = s["per_step"], s["warmup"]
    print(f"# ssd per step: {ps['misses']:,.0f} misses of {ps['lookups']:,.0f} unique lookups, "
          f"{ps['evictions']:,.0f} evictions ({ps['writebacks']:,.0f} dirty write-backs); file I/O "
          f"{1e3 * (ps['ssd_read_time_s'] + ps['ssd_write_time_s']):.1f} ms/step; device blocks "
          f"{format_bytes(ps['ssd_device_bytes_read'])} read / {format_bytes(ps['ssd_device_bytes_written'])} written "
          f"({s['storage']['mode']}); kernel /proc/self/io {format_bytes(ps['kernel_read_bytes'])} read / "
          f"{format_bytes(ps['kernel_write_bytes'])} written")
    if ws:
        w = ws["storage"]
        print(f"# warm-up ({a.warmup} steps from empty caches): ssd {ws['samples_per_s']:,.0f} samples/s, "
              f"hit rate {w['hit_rate']:.2%}, {format_bytes(w['ssd_bytes_read'] / a.warmup)} read/step "
              f"(device blocks {format_bytes(w['ssd_device_bytes_read'] / a.warmup)}, kernel "
              f"{format_bytes(w['kernel_read_bytes'] / a.warmup)})")
    pc = _page_cache_bytes(sorted(root.glob("*.tbl")))
    out["page_cache_bytes_end"] = pc
    print(f"# at the end: caches hold {s['storage']['resident']:,} rows ({s['storage']['resident'] / sum(cache_rows):.1%} "
          f"of capacity); the OS page cache holds "
          + (f"{format_bytes(pc)} ({pc / total:.1%}) of the table files (outside the budget and outside RSS)"
             if pc is not None else "an unknown part of the table files"))
    print(f"# losses of the two peers bit-identical at all {len(losses['memory'])} steps: "
          f"{'yes' if identical else 'NO'}")
    return out


# --------------------------------------------------------------------------- part 2: hit rates
def part2(a, traces: dict, sample: dict, stream) -> dict:
    keys = stream.keys
    state_dim = SPARSE.state_dim(a.dim)
    row_bytes = (a.dim + state_dim) * 4
    n_batches = len(traces[keys[0]])
    flat = {k: np.concatenate(traces[k]) for k in keys}
    requests = sum(v.size for v in flat.values())
    distinct = sum(np.unique(v).size for v in flat.values())
    ceiling = 1 - distinct / requests
    print(f"\n## part 2: cache hit rates -- {a.tables} tables x {a.table_rows:,} rows, {n_batches} batches of "
          f"{a.batch}: {requests / a.tables:,.0f} per-batch-unique lookups/table, {distinct / a.tables:,.0f} "
          f"distinct IDs/table (cold-miss ceiling {ceiling:.2%})")
    print("# real CachedTable: acquire(batch's unique IDs) + release(dirty) per batch, from empty; freq: counts of "
          f"the first {a.plan_batches} batches + warm_up(); sims: tierec.sim.policies on the same per-batch-unique trace")
    t0 = time.perf_counter()
    sizes = {f: max(1, int(f * a.table_rows)) for f in a.cache_fraction}
    lru_sim = {k: lru_hit_rates(flat[k], [sizes[f] for f in a.cache_fraction]) for k in keys}
    out = {"requests": requests, "distinct": distinct, "cold_miss_ceiling": ceiling, "batches": n_batches,
           "fractions": {}}
    for fi, f in enumerate(a.cache_fraction):
        C = sizes[f]
        rows = {}
        for pol in a.policies:
            hits = lookups = rd = wr = wu = 0
            tp = time.perf_counter()
            for k in keys:
                freq = None
                if pol == "freq":
                    freq = (torch.from_numpy(sample[k].ids), torch.from_numpy(sample[k].counts))
                cache = CachedTable(_ZeroRows(a.table_rows, a.dim, state_dim), C, pol, name=k, freq=freq)
                if pol == "freq":
                    cache.warm_up()
                for ids in traces[k]:
                    ws = cache.acquire(torch.from_numpy(np.sort(ids)))
                    cache.release(ws, dirty=True)
                st = cache.stats()
                hits, lookups = hits + st["hits"], lookups + st["lookups"]
                rd, wr, wu = rd + st["bytes_read"], wr + st["bytes_written"], wu + st["warmup_rows"]
            rows[f"CachedTable {pol}" + (" (+warm-up)" if pol == "freq" else "")] = {
                "hit_rate": hits / lookups, "bytes_read_per_step": rd / n_batches,
                "bytes_written_per_step": wr / n_batches, "warmup_rows": wu,
                "replay_s": time.perf_counter() - tp}
            if pol == "freq":  # the warm-up's reads are reads too: count them as misses
                rows["  warm-up counted as misses"] = {"hit_rate": (hits - wu) / lookups,
                                                       "bytes_read_per_step": rd / n_batches,
                                                       "bytes_written_per_step": wr / n_batches}
        tp = time.perf_counter()
        w = {k: flat[k].size for k in keys}
        rows["simulated LRU"] = {"hit_rate": sum(lru_sim[k][fi] * w[k] for k in keys) / requests}
        rows["simulated LFU"] = {"hit_rate": sum(lfu_hit_rate(flat[k], C) * w[k] for k in keys) / requests}
        rows["MIN (Belady, offline)"] = {"hit_rate": sum(min_hit_rate(flat[k], C) * w[k] for k in keys) / requests}
        sim_s = time.perf_counter() - tp
        for r in rows.values():
            r["misses_per_step"] = (1 - r["hit_rate"]) * requests / n_batches
            r.setdefault("bytes_read_per_step", r["misses_per_step"] * row_bytes)
        mn = rows["MIN (Belady, offline)"]["hit_rate"]
        print(f"\ncache = {f:.1%} of rows = {C:,} rows/table ({format_bytes(C * a.tables * row_bytes)} of rows in all)")
        print(f"{'cache':30s} {'hit rate':>9s} {'vs MIN':>7s} {'misses vs MIN':>14s} {'misses/step':>12s} "
              f"{'SSD read/step':>14s} {'SSD write/step':>15s}")
        for name, r in rows.items():
            wr = r.get("bytes_written_per_step")
            print(f"{name:30s} {r['hit_rate']:9.2%} {r['hit_rate'] / mn:6.2f}x "
                  f"{(1 - r['hit_rate']) / max(1 - mn, 1e-12):13.2f}x {r['misses_per_step']:12,.0f} "
                  f"{format_bytes(r['bytes_read_per_step']):>14s} {(format_bytes(wr) if wr is not None else '-'):>15s}")
        print(f"{'(infinite cache: cold misses)':30s} {ceiling:9.2%}")
        out["fractions"][str(f)] = {"rows_per_table": C, "results": rows, "sim_seconds": sim_s}
    print(f"# part 2 took {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


# --------------------------------------------------------------------------- part 3: cache overhead
def part3(a, work: Path) -> dict:
    R, D, B, H = a.overhead_rows, a.dim, a.overhead_batch, a.overhead_hot
    state_dim = SPARSE.state_dim(D)
    pool = 16
    offsets = torch.arange(0, B * H + 1, H, dtype=torch.int64)
    cfg = SynthConfig(rows=pool * B, test_fraction=0.0, seed=a.seed + 1, num_sparse=1, cardinalities=[R],
                      max_cardinality=0, num_dense=1, multi_hot=f"fixed:{H}", zipf=a.zipf, progress=False)
    dists = {"zipf": [torch.from_numpy(c.sparse["C1"][0].astype(np.int64))
                      for c in iter_chunks(cfg, "train", chunk_rows=B)]}
    rng = np.random.default_rng(a.seed + 2)
    dists["uniform"] = [torch.from_numpy(rng.integers(0, R, B * H, dtype=np.int64)) for _ in range(pool)]
    uniq = {d: statistics.mean(torch.unique(v).numel() for v in vs) for d, vs in dists.items()}
    print(f"\n## part 3: cache overhead at a 100% hit rate -- one table of {R:,} rows x {D} dims (+{state_dim} state), "
          f"batches of {B} bags x {H} IDs = {B * H:,} IDs (unique/batch: " +
          ", ".join(f"{d} {u:,.0f}" for d, u in uniq.items()) + f"); {a.threads} thread(s), "
          f"{a.overhead_rounds} rounds x {a.overhead_batches} batches, peers alternate")
    print("# timed: dedup + acquire + embedding_bag + release(dirty), as EmbeddingBag.forward/backward do "
          "(the optimizer update is the same for both and left out)", flush=True)
    counts = torch.unique(torch.cat(dists["zipf"] + dists["uniform"]), return_counts=True)
    peers = {"InMemoryTable": InMemoryTable(R, D, state_dim)}
    peers["InMemoryTable"].weight.uniform_(-R ** -0.5, R ** -0.5)
    for pol in POLICIES:
        c = CachedTable(_ZeroRows(R, D, state_dim), R, pol, name=f"cache-{pol}",
                        freq=counts if pol == "freq" else None)
        c.warm_up(torch.arange(R))
        peers[f"CachedTable {pol}"] = c

    def run(tab, vals_list, n):
        identity = isinstance(tab, InMemoryTable)
        t0 = time.perf_counter()
        for i in range(n):
            values = vals_list[i % len(vals_list)]
            u, inv, _, _ = dedup(values, with_inverse=not identity)
            ws = tab.acquire(u)
            idx = values if identity else ws.index.index_select(0, inv)
            F.embedding_bag(idx, ws.weight, offsets[:-1], mode="sum")
            tab.release(ws, dirty=True)
        return time.perf_counter() - t0

    names = list(peers)
    times = {(p, d): [] for p in names for d in dists}
    for p in names:  # warm-up round (allocator, caches of the CPU)
        for vals in dists.values():
            run(peers[p], vals, min(4, a.overhead_batches))
            if isinstance(peers[p], CachedTable):
                peers[p].reset_stats()
    for r in range(a.overhead_rounds):
        for p in (names if r % 2 == 0 else names[::-1]):
            for d, vals in dists.items():
                times[(p, d)].append(run(peers[p], vals, a.overhead_batches))
    hit = {p: peers[p].stats()["hit_rate"] for p in names if isinstance(peers[p], CachedTable)}
    out = {"rows": R, "dim": D, "batch": B, "hot": H, "unique_per_batch": uniq, "results": {}}
    print(f"{'peer':20s} {'IDs':>8s} {'ms/batch':>9s} {'lookups/s':>12s} {'vs memory':>10s} {'hit rate':>9s}")
    for d in dists:
        base = None
        for p in names:
            t = statistics.median(times[(p, d)]) / a.overhead_batches
            lps = B * H / t
            base = base or lps
            h = f"{hit[p]:9.2%}" if p in hit else f"{'-':>9s}"
            print(f"{p:20s} {d:>8s} {1e3 * t:9.3f} {lps / 1e6:10.2f} M {lps / base:9.2f}x {h}")
            out["results"][f"{p}/{d}"] = {"ms_per_batch": 1e3 * t, "lookups_per_s": lps, "vs_memory": lps / base,
                                          "rounds_s": times[(p, d)], "hit_rate": hit.get(p)}
    out["cache_index_bytes"] = {p: peers[p].index_nbytes for p in names if isinstance(peers[p], CachedTable)}
    return out


# --------------------------------------------------------------------------- main
def _positive(kind):
    def conv(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return v
    return conv


def _nonneg_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def _bytes(text):
    try:
        return parse_bytes(text, "budget")
    except TierecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fractions(text):
    try:
        fs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions like 0.02 or 0.015,0.02,0.2, got {text!r}") from None
    if not fs or any(not 0 < f <= 1 for f in fs):
        raise argparse.ArgumentTypeError(f"cache fractions must be in (0, 1], got {text!r}")
    return fs


def _choice_list(allowed):
    def conv(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return items
    return conv


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=_positive(int), default=8, help="embedding tables (default 8)")
    p.add_argument("--table-rows", type=_positive(int), default=1 << 20, help="rows per table (default 1,048,576)")
    p.add_argument("--dim", type=_positive(int), default=64, help="embedding dim (default 64)")
    p.add_argument("--budget", type=_bytes, default=parse_bytes("512MiB"),
                   help="memory budget of the ssd peer's caches (rows + index), e.g. 512MiB, 2GiB (default 512MiB)")
    p.add_argument("--policy", choices=POLICIES, default="lru", help="cache policy of part 1 (default lru)")
    p.add_argument("--direct-io", action="store_true", help="SSD files with O_DIRECT instead of memmap")
    p.add_argument("--batch", type=_positive(int), default=4096, help="samples per batch (default 4096)")
    p.add_argument("--hot", type=_positive(int), default=1, help="IDs per sample per table (default 1, as Criteo)")
    p.add_argument("--zipf", default="auto", help="popularity: 'auto' (calibrated to Meta's stats) or a Zipf exponent")
    p.add_argument("--steps", type=_positive(int), default=30, help="training steps per round (default 30)")
    p.add_argument("--warmup", type=_nonneg_int, default=30, help="untimed steps from empty caches (default 30)")
    p.add_argument("--rounds", type=_positive(int), default=3, help="timed rounds per peer (default 3)")
    p.add_argument("--plan-batches", type=_positive(int), default=50,
                   help="first batches counted to plan the budget and for freq frequencies (default 50)")
    p.add_argument("--threads", type=_positive(int), default=torch.get_num_threads(),
                   help=f"torch threads per process (default {torch.get_num_threads()}; use 1 on a busy machine)")
    p.add_argument("--cache-fraction", type=_fractions, default=[0.02],
                   help="part 2 cache size(s) as a fraction of each table's rows, comma-separated (default 0.02)")
    p.add_argument("--policies", type=_choice_list(POLICIES), default=list(POLICIES),
                   help="part 2 policies (default lru,lfu,freq)")
    p.add_argument("--overhead-rows", type=_positive(int), default=1_000_000, help="part 3 table rows (default 1M)")
    p.add_argument("--overhead-batch", type=_positive(int), default=4096, help="part 3 bags per batch (default 4096)")
    p.add_argument("--overhead-hot", type=_positive(int), default=8, help="part 3 IDs per bag (default 8)")
    p.add_argument("--overhead-batches", type=_positive(int), default=40, help="part 3 batches per round")
    p.add_argument("--overhead-rounds", type=_positive(int), default=5, help="part 3 rounds (default 5)")
    p.add_argument("--parts", type=_choice_list(("1", "2", "3")), default=["1", "2", "3"],
                   help="which parts to run (default 1,2,3)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="data seed (default 0)")
    p.add_argument("--dir", default="runs", help="where to make the temporary directory for SSD files (default runs/, git-ignored)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.zipf != "auto":
        try:
            a.zipf = float(a.zipf)
        except ValueError:
            p.error(f"--zipf: expected 'auto' or a number, got {a.zipf!r}")
    if not Path(a.dir).is_dir():
        p.error(f"--dir {a.dir}: not a directory")
    return a


def begin_run(a, name: str):
    """Threads, a fresh work directory under ``a.dir`` and the result header; prints the banner.
    Returns (start time, work dir, result dict)."""
    torch.set_num_threads(a.threads)
    started = datetime.datetime.now().astimezone()
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=a.dir)).resolve()
    result = {"args": dict(vars(a)), "date": started.isoformat(timespec="seconds"),
              "machine": _machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(f"# {name} {started:%Y-%m-%d %H:%M %Z}; {result['machine']}; work dir {work}")
    return started, work, result


def end_run(a, started, result: dict) -> int:
    """Print the total time; write ``result`` to ``a.json`` if asked."""
    result["seconds"] = (datetime.datetime.now().astimezone() - started).total_seconds()
    print(f"# total {result['seconds']:.0f} s")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


def main(argv=None):
    a = parse_args(argv)
    started, work, result = begin_run(a, "bench_tiered")
    try:
        need_stream = "1" in a.parts or "2" in a.parts
        if need_stream:
            steps = a.warmup + a.rounds * a.steps
            t0 = time.perf_counter()
            stream, traces, sample = generate_stream(a, work / "stream", steps)
            print(f"# generated {steps} batches of {a.batch} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if "1" in a.parts:
            result["part1"] = part1(a, stream, sample, work)
        if "2" in a.parts:
            result["part2"] = part2(a, traces, sample, stream)
        if "3" in a.parts:
            result["part3"] = part3(a, work)
    finally:
        if a.keep:
            print(f"# kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return end_run(a, started, result)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TierecError as e:
        print(f"bench_tiered: error: {e}", file=sys.stderr)
        sys.exit(2)

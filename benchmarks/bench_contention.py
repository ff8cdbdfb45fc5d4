"""How much the look-ahead worker's work slows the trainer on this machine: in a thread vs in a process.

    python benchmarks/bench_contention.py                  # 8 tables x 1M rows, 2% caches, O_DIRECT files
    python benchmarks/bench_contention.py --rounds 3 --steps 30

The in-memory DLRM of `bench_lookahead.py` trains ``--steps`` steps three ways, rounds repeated:

* ``alone``: nothing else runs;
* ``thread``: a thread in the same process replays the look-ahead caches' work for the same batches
  (`LookaheadCache.observe` / `prepare` / `release` over O_DIRECT `SsdTable` files, the tables of a
  step on 4 threads, as `LookaheadPipeline` does), one step per trainer step (paced to the step time
  measured alone);
* ``process``: the same replay in a forked process (no GIL shared with the trainer).

Reports the trainer's step time and its thread's CPU time per step for each, and the replay's CPU per
step. On a machine whose cores are independent the ``process`` figure is the ``alone`` one; where two
vCPUs share a physical core (or its caches and memory bandwidth), work on the other vCPU makes the
trainer's own instructions slower, and only less background CPU helps.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0] + "/src")
sys.path.insert(0, __file__.rsplit("/", 1)[0])

from bench_tiered import MODEL_SEED, NUM_DENSE, SPARSE, generate_stream  # noqa: E402
from tierec.modules.dlrm import DLRM  # noqa: E402
from tierec.modules.embedding import TableConfig, build_collection  # noqa: E402
from tierec.storage.lookahead import LookaheadCache  # noqa: E402
from tierec.storage.ssd import SsdTable  # noqa: E402
from tierec.malloc import STEP_MALLOC, set_malloc_thresholds  # noqa: E402


def make_tables(a, keys) -> None:
    for i, k in enumerate(keys):
        SsdTable(Path(a.dir) / f"{k}.tbl", a.table_rows, a.dim, SPARSE.state_dim(a.dim), create=True,
                 init_seed=MODEL_SEED, table_index=i, row_align=a.row_align).close()


def replay(a, traces, stop, pace_s: float, out, ready) -> None:
    """The look-ahead caches' work for the batches' unique IDs, one step per ``pace_s``, until ``stop``;
    ``out["cpu_ms_per_step"]``: CPU time of the replay's threads per step."""
    torch.set_num_threads(1)
    if a.pin:
        os.sched_setaffinity(0, {a.pin[1]})  # this thread; the pool's threads started below inherit it
    keys = list(traces)
    cap = int(a.cache_fraction * a.table_rows)
    caches = {k: LookaheadCache(SsdTable.open(Path(a.dir) / f"{k}.tbl", direct_io=True), cap, name=k) for k in keys}
    pool = ThreadPoolExecutor(4)
    cpu = [0.0]  # CPU seconds of the pool's tasks
    lock = threading.Lock()

    def prepare(k, step):
        c = time.thread_time()
        ws = caches[k].prepare(step, traces[k][step])
        with lock:
            cpu[0] += time.thread_time() - c
        return ws

    n_steps = len(traces[keys[0]])
    W, D = min(a.window, n_steps // 2), 2
    observed = prepared = -1
    pending: collections.deque = collections.deque()
    ready.set()
    t, c0, counted = 0, None, 0
    while not stop.is_set():
        start = time.perf_counter()
        s = t % (n_steps - W - D)  # wrap around the trace: the window restarts with a new oracle
        if s == 0 and t:
            while pending:
                ws = pending.popleft()
                for k in keys:
                    caches[k].release(ws[k], dirty=False)
            for c in caches.values():
                c.end_lookahead()
            observed = prepared = -1
        while observed < s + W - 1:
            observed += 1
            for k in keys:
                caches[k].observe(observed, traces[k][observed])
        while prepared < s + D:
            prepared += 1
            p = prepared
            pending.append(dict(zip(keys, pool.map(lambda k: prepare(k, p), keys))))
        ws = pending.popleft()
        for k in keys:
            caches[k].release(ws[k], dirty=True)
        t += 1
        if t == 3:  # start counting once the caches are warm
            c0, counted = time.thread_time() + cpu[0], 0
        elif c0 is not None:
            counted += 1
        time.sleep(max(0.0, pace_s - (time.perf_counter() - start)))
    out["cpu_ms_per_step"] = (1e3 * (time.thread_time() + cpu[0] - c0) / max(counted, 1) if c0 is not None
                              else float("nan"))
    pool.shutdown()


def _process_replay(a, traces, stop, pace_s, q, ready) -> None:
    out = {}
    replay(a, traces, stop, pace_s, out, ready)
    q.put(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--table-rows", type=int, default=1 << 20)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--cache-fraction", type=float, default=0.02)
    p.add_argument("--window", type=int, default=200)
    p.add_argument("--row-align", type=int, default=512, help="the replay's files: rows padded to this (0 packed)")
    p.add_argument("--steps", type=int, default=30, help="trainer steps per measurement")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pin", type=lambda x: tuple(int(c) for c in x.split(",")), default=None, metavar="T,R",
                   help="pin the trainer to CPU T and the replay's threads to CPU R (e.g. 0,1)")
    p.add_argument("--dir", default="runs/contention")
    a = p.parse_args(argv)
    if a.pin:
        os.sched_setaffinity(0, {a.pin[0]})
    a.hot, a.zipf, a.seed, a.plan_batches = 1, "auto", 0, 1
    torch.set_num_threads(1)
    stream, traces, _ = generate_stream(types.SimpleNamespace(**vars(a)), Path(a.dir) / "stream", 400)
    traces = {k: [torch.from_numpy(x.astype("int64")) for x in v] for k, v in traces.items()}
    make_tables(a, list(traces))
    torch.manual_seed(MODEL_SEED)
    ebc = build_collection([TableConfig(k, a.table_rows, a.dim) for k in stream.keys], SPARSE, seed=MODEL_SEED)
    model = DLRM(NUM_DENSE, ebc, [512, 256], [512, 256])
    opt = torch.optim.Adam(model.dense_parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    set_malloc_thresholds(*STEP_MALLOC)
    batches = [stream.batch_at(i) for i in range(a.steps)]

    def train() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.thread_time()
        for b in batches:
            loss = loss_fn(model(b.dense, b.sparse), b.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return 1e3 * (time.perf_counter() - t0) / len(batches), 1e3 * (time.thread_time() - c0) / len(batches)

    train()  # warm-up
    res = collections.defaultdict(list)
    for r in range(a.rounds):
        res["alone"].append(train() + (0.0,))
        pace = res["alone"][-1][0] / 1e3
        stop, out, ready = threading.Event(), {}, threading.Event()
        th = threading.Thread(target=replay, args=(a, traces, stop, pace, out, ready), daemon=True)
        th.start()
        ready.wait()
        time.sleep(8 * pace)  # a few replay steps before the clock
        got = train()
        stop.set()
        th.join()
        res["thread"].append(got + (out["cpu_ms_per_step"],))
        ctx = mp.get_context("fork")
        q, ev, ready = ctx.Queue(), ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_process_replay, args=(a, traces, ev, pace, q, ready), daemon=True)
        proc.start()
        ready.wait()
        time.sleep(8 * pace)
        got = train()
        ev.set()
        res["process"].append(got + (q.get()["cpu_ms_per_step"],))
        proc.join()
        print(f"# round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v[-1][0]:.1f} ms/step" for k, v in res.items()),
              file=sys.stderr, flush=True)
    print(f"\n## trainer step with the look-ahead replay beside it ({a.tables} x {a.table_rows:,} rows, "
          f"{a.cache_fraction:.0%} caches, O_DIRECT, row_align {a.row_align}); medians of {a.rounds} rounds x "
          f"{a.steps} steps")
    print(f"{'replay':8s} {'step':>9s} {'vs alone':>9s} {'trainer CPU':>12s} {'replay CPU':>11s}")
    base = statistics.median(x[0] for x in res["alone"])
    for k, v in res.items():
        step, cpu, rcpu = (statistics.median(x[i] for x in v) for i in range(3))
        print(f"{k:8s} {step:7.1f}ms {step / base:8.2f}x {cpu:10.1f}ms {(f'{rcpu:.1f}ms' if k != 'alone' else '-'):>11s}")


if __name__ == "__main__":
    main()

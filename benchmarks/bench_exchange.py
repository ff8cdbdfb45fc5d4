"""The SSD traffic of one look-ahead step: packed rows (read-modify-write) against padded rows, in one run.

    python benchmarks/bench_exchange.py                      # 8 tables x 1M rows x (64 + 1) floats
    python benchmarks/bench_exchange.py --rows-per-table 400 --steps 40 --rounds 5

A look-ahead cache at 2% of 8 x 1M-row tables (`bench_lookahead.py --parts speed`) evicts ~370 dirty
rows and fetches ~370 misses per table per step. This replays that traffic without the model: per step,
one `SsdTable.exchange` per table (``--rows-per-table`` victims written back, as many misses read:
disjoint random rows), the tables of a step on ``--threads`` threads as `LookaheadPipeline` runs them.
Two layouts of the same tables, both O_DIRECT with Linux AIO, each exchanged two ways (rounds alternating):
table by table on ``--threads`` threads (``LookaheadCache`` per table), and all tables in one pass
(``one pass``: `tierec.storage.multifile.exchange_many`, as a `TableGroup`'s cache does):

* ``packed``: 260-byte rows, 4 KiB blocks; a written row's block is read first (read-modify-write),
  the misses' blocks in the same batch, then the victims' blocks written: two round trips;
* ``padded``: ``row_align=512``: one row per 512-byte sector (where the device takes 512-byte direct
  I/O); the victims' sectors written and the misses' read in one batch, nothing read-modify-written.

Reports per step: wall time (the device time a pipeline must hide), I/O operations, device bytes read
and written, and the process's system and user CPU; then padded / packed ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0] + "/src")

from tierec.config import format_bytes  # noqa: E402
from tierec.storage import aio  # noqa: E402
from tierec.storage.multifile import exchange_many  # noqa: E402
from tierec.storage.ssd import SsdTable  # noqa: E402

LAYOUTS = {"packed": 0, "padded": 512}
VARIANTS = {"packed": ("packed", False), "padded": ("padded", False), "packed, one pass": ("packed", True),
            "padded, one pass": ("padded", True)}


def _positive(kind):
    def parse(s):
        v = kind(s)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v
    return parse


def make_steps(a, rng) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step and table: (victim ids, miss ids), disjoint, random over the table."""
    out = []
    for _ in range(a.steps):
        step = []
        for _ in range(a.tables):
            ids = torch.from_numpy(rng.choice(a.table_rows, 2 * a.rows_per_table, replace=False))
            step.append((ids[: a.rows_per_table], ids[a.rows_per_table:]))
        out.append(step)
    return out


def _one_pass(step) -> tuple[np.ndarray, ...]:
    """A step's victims and misses of all tables as `exchange_many` takes them: (table, row) sorted."""
    wt, wid, rt, rid = [], [], [], []
    for k, (v, m) in enumerate(step):
        wid.append(np.sort(v.numpy()))
        rid.append(np.sort(m.numpy()))
        wt.append(np.full(v.numel(), k))
        rt.append(np.full(m.numel(), k))
    return tuple(np.concatenate(x).astype(np.int64) for x in (wt, wid, rt, rid))


def run_round(tabs: list[SsdTable], steps, a, pool, one_pass: bool = False) -> dict:
    w = torch.randn(a.rows_per_table, a.dim)
    s = torch.zeros(a.rows_per_table, 1)
    rows = np.tile(torch.cat([w, s], 1).numpy(), (len(tabs), 1))
    passes = [_one_pass(step) for step in steps] if one_pass else None
    for t in tabs:
        t.reset_stats()
    c0, t0 = os.times(), time.perf_counter()
    for i, step in enumerate(steps):
        if one_pass:
            wt, wid, rt, rid = passes[i]
            if exchange_many(tabs, wt, wid, rows, rt, rid) is None:
                raise SystemExit("exchange_many cannot run here (no O_DIRECT or no Linux AIO)")
        else:
            list(pool.map(lambda k: tabs[k].exchange(step[k][0], w, s, step[k][1]), range(len(tabs))))
    dt, c1 = time.perf_counter() - t0, os.times()
    n = len(steps)
    st = [t.stats() for t in tabs]
    return {"ms_per_step": 1e3 * dt / n, "sys_ms_per_step": 1e3 * (c1.system - c0.system) / n,
            "user_ms_per_step": 1e3 * (c1.user - c0.user) / n,
            "device_read_per_step": sum(x["device_bytes_read"] for x in st) / n,
            "device_written_per_step": sum(x["device_bytes_written"] for x in st) / n}


def io_ops(tab: SsdTable, victims: torch.Tensor, misses: torch.Tensor) -> int:
    """I/O operations of one exchange (block runs read + written), from the table's own block plans."""
    wid, rid = np.sort(victims.numpy()), np.sort(misses.numpy())
    if tab.exclusive_blocks:
        return tab.plan(wid).foff.size + tab.plan(rid).foff.size
    both = tab.plan(np.union1d(wid, rid))
    return both.foff.size + tab.plan(wid).foff.size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tables", type=_positive(int), default=8)
    p.add_argument("--table-rows", type=_positive(int), default=1 << 20)
    p.add_argument("--dim", type=_positive(int), default=64)
    p.add_argument("--rows-per-table", type=_positive(int), default=370, help="victims (and misses) per table per step")
    p.add_argument("--steps", type=_positive(int), default=30, help="steps per round")
    p.add_argument("--rounds", type=_positive(int), default=4)
    p.add_argument("--threads", type=_positive(int), default=4, help="tables exchanged in parallel")
    p.add_argument("--aio-depth", type=_positive(int), default=aio.DEPTH, help="AIO operations in flight per ring")
    p.add_argument("--dir", default="runs/exchange")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if 2 * a.rows_per_table > a.table_rows:
        p.error("--rows-per-table is more than half a table")
    aio.DEPTH = a.aio_depth
    root = Path(a.dir)
    tabs = {}
    for name, align in LAYOUTS.items():
        tabs[name] = [SsdTable(root / name / f"t{i}.tbl", a.table_rows, a.dim, 1, create=True, init_seed=a.seed,
                               table_index=i, direct_io=True, row_align=align) for i in range(a.tables)]
        t = tabs[name][0]
        print(f"# {name}: {format_bytes(a.tables * t.file_bytes)} on disk, row stride {t.row_stride} B, "
              f"direct-I/O block {t.align} B, mode {t.stats()['mode']}", file=sys.stderr, flush=True)
    rng = np.random.default_rng(a.seed)
    pool = ThreadPoolExecutor(a.threads)
    res = {name: [] for name in VARIANTS}
    ops = {}
    for r in range(a.rounds):
        steps = make_steps(a, rng)
        for name in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
            layout, one = VARIANTS[name]
            res[name].append(run_round(tabs[layout], steps, a, pool, one))
            ops[layout] = sum(io_ops(tabs[layout][k], *steps[0][k]) for k in range(a.tables))
        print(f"# round {r + 1}/{a.rounds}: "
              + ", ".join(f"{n} {res[n][-1]['ms_per_step']:.1f} ms/step" for n in VARIANTS),
              file=sys.stderr, flush=True)
    print(f"\n## one look-ahead step's SSD traffic: {a.tables} tables x {a.table_rows:,} rows x ({a.dim} + 1) floats, "
          f"{a.rows_per_table} victims + {a.rows_per_table} misses per table, {a.threads} threads, O_DIRECT + AIO; "
          f"medians of {a.rounds} rounds x {a.steps} steps")
    print(f"{'layout':17s} {'ms/step':>8s} {'I/O ops':>8s} {'dev read':>10s} {'dev write':>10s} {'sys ms':>7s} "
          f"{'user ms':>8s}")
    med = {}
    for name in VARIANTS:
        med[name] = {k: statistics.median(x[k] for x in res[name]) for k in res[name][0]}
        m = med[name]
        print(f"{name:17s} {m['ms_per_step']:8.1f} {ops[VARIANTS[name][0]]:8,d} "
              f"{format_bytes(m['device_read_per_step']):>10s} {format_bytes(m['device_written_per_step']):>10s} "
              f"{m['sys_ms_per_step']:7.1f} {m['user_ms_per_step']:8.1f}")
    pk, pd = med["packed"], med["padded"]
    print(f"# padded / packed: step {pd['ms_per_step'] / pk['ms_per_step']:.2f}x, I/O ops "
          f"{ops['padded'] / ops['packed']:.2f}x, device bytes read "
          f"{pd['device_read_per_step'] / pk['device_read_per_step']:.3f}x, "
          f"system CPU {pd['sys_ms_per_step'] / max(pk['sys_ms_per_step'], 1e-9):.2f}x; disk "
          f"{tabs['padded'][0].file_bytes / tabs['packed'][0].file_bytes:.2f}x")
    for layout in LAYOUTS:
        one, per = med[f"{layout}, one pass"], med[layout]
        cpu_one = one['sys_ms_per_step'] + one['user_ms_per_step']
        cpu_per = per['sys_ms_per_step'] + per['user_ms_per_step']
        print(f"# {layout}, one pass / table by table: step {one['ms_per_step'] / per['ms_per_step']:.2f}x, CPU "
              f"{cpu_one / max(cpu_per, 1e-9):.2f}x")
    if tabs["padded"][0].align != 512:
        print("# note: this device refused 512-byte direct I/O, so padded rows still share 4 KiB blocks")


if __name__ == "__main__":
    main()

"""`tierec analyze`: miss-ratio curves of a data set or trace, and what cache to buy.

For every table (sparse feature of a data set, or the one trace of a file) it
simulates LRU, in-cache LFU and Belady's MIN (`tierec.sim.policies`) over a grid
of cache sizes, prints hit ratios, writes PNG plots and a JSON of the curves,
and, given a memory budget, splits it across tables to minimise total misses
(greedy marginal gain on the concave hull of each table's hit curve, `tierec.sim.analyze`).
See docs/analyze.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from tierec.config import format_bytes, parse_bytes
from tierec.errors import TierecError
from tierec.sim.analyze import allocate, parse_sizes, plot_curves, proportional_split, safe_name

log = logging.getLogger("tierec.analyze")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="DATASET_OR_TRACE",
                   help="a tierec data set directory, an ARC trace (.lis, .lis.zst) or a plain trace "
                        "(one integer ID per line; zstd-compressed OK)")
    p.add_argument("--format", choices=["auto", "dataset", "arc", "plain"], default="auto",
                   help="input kind (default auto: a directory with manifest.json is a data set, *.lis[.zst] "
                        "an ARC trace, anything else a plain trace)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated cache sizes in rows, e.g. 1000,10k,1M (default: --points log-spaced "
                        "sizes from 0.01%% of each table's distinct IDs up to all of them)")
    p.add_argument("--points", type=int, default=16, help="number of sizes in the default grid (default: 16)")
    p.add_argument("--policies", default="lru,lfu,min", help="comma-separated subset of lru,lfu,min (default: all three)")
    p.add_argument("--no-bypass", action="store_true",
                   help="MIN must cache every miss (default: MIN may bypass, the true optimum)")
    p.add_argument("--max-requests", type=int, default=None, help="use only the first N requests of each trace")
    g = p.add_argument_group("data sets")
    g.add_argument("--split", default="train", help="split to read (default: train)")
    g.add_argument("--tables", default=None, help="comma-separated sparse features to analyse (default: all)")
    g.add_argument("--dedup-per-batch", type=int, default=None, metavar="BATCH_SIZE",
                   help="keep one request per distinct ID per batch of BATCH_SIZE rows "
                        "(a training step fetches each distinct row once)")
    g.add_argument("--shuffle", action="store_true",
                   help="read rows in the order `tierec train` sees in epoch 0 with --seed (default: storage order)")
    g.add_argument("--seed", type=int, default=0, help="shuffle seed, as `tierec train --seed` (default: 0)")
    g = p.add_argument_group("memory budget")
    g.add_argument("--memory-budget", default=None, metavar="BYTES",
                   help="cache memory for all tables together, e.g. 2GiB, 512MiB, 1.5GB")
    g.add_argument("--row-bytes", type=int, default=None,
                   help="bytes per cached row (default for ARC traces: 512, one block)")
    g.add_argument("--dim", type=int, default=None, help="embedding dimension: row bytes = dim * --bytes-per-elem")
    g.add_argument("--bytes-per-elem", type=int, default=4, help="bytes per embedding element (default: 4, fp32)")
    g.add_argument("--policy", choices=["lru", "lfu", "min"], default=None,
                   help="curves used to split the budget (default: lru if computed, else the first of --policies)")
    p.add_argument("--out", default=None, metavar="DIR", help="write mrc_<table>.png and curves.json here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="miss-ratio curves (LRU, LFU, MIN) of a data set or trace; cache sizing",
                       description=__doc__.split("\n\n")[0] + " Prints hit ratios per table and cache size; "
                       "with --memory-budget, recommends how many rows to cache per table. See docs/analyze.md.")
    add_arguments(p)
    p.set_defaults(func=main)


def _row_bytes(args, fmt: str) -> int | None:
    if args.row_bytes is not None and args.dim is not None:
        raise TierecError("give --row-bytes or --dim, not both")
    if args.row_bytes is not None:
        if args.row_bytes <= 0:
            raise TierecError(f"--row-bytes must be > 0, got {args.row_bytes}")
        return args.row_bytes
    if args.dim is not None:
        if args.dim <= 0 or args.bytes_per_elem <= 0:
            raise TierecError("--dim and --bytes-per-elem must be > 0")
        return args.dim * args.bytes_per_elem
    return 512 if fmt == "arc" else None


def main(args) -> int:
    from tqdm import tqdm

    from tierec.sim import policies, traces

    wanted = [s.strip().lower() for s in args.policies.split(",") if s.strip()]
    bad = [s for s in wanted if s not in policies.POLICIES]
    if bad or not wanted:
        raise TierecError(f"--policies: unknown {', '.join(bad) or '(none given)'} (choose from lru, lfu, min)")
    wanted = list(dict.fromkeys(wanted))
    sizes = parse_sizes(args.sizes) if args.sizes is not None else None
    if args.points < 2:
        raise TierecError(f"--points must be >= 2, got {args.points}")
    if args.max_requests is not None and args.max_requests <= 0:
        raise TierecError(f"--max-requests must be > 0, got {args.max_requests}")
    budget = parse_bytes(args.memory_budget) if args.memory_budget is not None else None
    if args.policy is not None and args.policy not in wanted:
        raise TierecError(f"--policy {args.policy} is not among --policies {','.join(wanted)}")
    rec_policy = args.policy or ("lru" if "lru" in wanted else wanted[0])

    fmt = traces.detect_format(args.input) if args.format == "auto" else args.format
    if fmt != "dataset":
        used = [f for f, v in (("--tables", args.tables), ("--dedup-per-batch", args.dedup_per_batch),
                               ("--shuffle", args.shuffle or None)) if v is not None]
        if used:
            raise TierecError(f"{', '.join(used)} only apply to tierec data sets, and {args.input} is a {fmt} trace")
    row_bytes = _row_bytes(args, fmt)
    if budget is not None and row_bytes is None:
        raise TierecError("--memory-budget needs the size of a row: give --row-bytes or --dim")

    progress = not args.no_progress
    t0 = time.perf_counter()
    kw = {}
    if fmt == "dataset":
        tables = [t.strip() for t in args.tables.split(",") if t.strip()] if args.tables else None
        kw = dict(split=args.split, tables=tables, dedup_batch=args.dedup_per_batch, shuffle=args.shuffle,
                  seed=args.seed, progress=progress)
    fmt, trs = traces.load_traces(args.input, fmt, max_requests=args.max_requests, **kw)
    read_s = time.perf_counter() - t0
    empty = [k for k, v in trs.items() if v.size == 0]
    if empty and len(empty) == len(trs):
        raise TierecError(f"{args.input}: no requests to analyse")
    for k in empty:
        log.warning("table %s has no requests; skipped", k)
        del trs[k]

    # Grid per table, and the amount of work for the progress bar.
    grids = {}
    for name, tr in trs.items():
        grids[name] = sizes if sizes is not None else policies.default_sizes(int(np.unique(tr).size), args.points)
    steps = sum(len(g) * len(wanted) for g in grids.values())
    results: dict[str, dict] = {}
    timings: dict[str, dict] = {}
    with tqdm(total=steps, desc="simulate", unit="size", disable=not progress, dynamic_ncols=True,
              file=sys.stderr) as bar:
        for name, tr in trs.items():
            results[name], timings[name] = {}, {}
            for pol in wanted:
                bar.set_postfix_str(f"{name} {pol}")
                t1 = time.perf_counter()
                c = policies.miss_ratio_curves(tr, grids[name], [pol], name=name, bypass=not args.no_bypass,
                                               progress=bar.update)[pol]
                timings[name][pol] = round(time.perf_counter() - t1, 3)
                results[name][pol] = c

    # ------------------------------------------------------------------ report
    out = sys.stdout
    print(f"{args.input} ({fmt}): {len(results)} table(s); read in {read_s:.1f} s", file=out)
    pol_names = {"lru": "LRU", "lfu": "LFU", "min": "MIN"}
    for name, curves in results.items():
        c0 = next(iter(curves.values()))
        n, u = c0.requests, c0.distinct
        print(f"\n{name}: {n:,} requests, {u:,} distinct IDs; best possible hit ratio "
              f"{100 * (n - u) / n:.2f}% (cold misses only)", file=out)
        head = f"{'cache size':>12} {'% of IDs':>9}" + "".join(f" {pol_names[p] + ' hit %':>10}" for p in curves)
        print(head, file=out)
        for i, s in enumerate(c0.sizes.tolist()):
            row = f"{s:>12,} {100 * s / u:>9.2f}" + "".join(f" {100 * c.hit_ratio[i]:>10.2f}" for c in curves.values())
            print(row, file=out)
        print("  (" + ", ".join(f"{pol_names[p]} {t:.2f} s" for p, t in timings[name].items()) + ")", file=out)

    rec = None
    if budget is not None and row_bytes is not None:  # (a budget without row_bytes was refused above)
        rec_curves = {n: cs[rec_policy] for n, cs in results.items()}
        budget_rows = budget // row_bytes
        alloc = allocate(rec_curves, budget_rows)
        prop = proportional_split(rec_curves, budget_rows)
        exact = rec_policy == "lru"
        tot_req = sum(c.requests for c in rec_curves.values())
        rows_used = sum(alloc.values())
        print(f"\nmemory budget {format_bytes(budget)} at {row_bytes} B/row = {budget_rows:,} rows; "
              f"split by {pol_names[rec_policy]} curves to minimise total misses:", file=out)
        print(f"{'table':<20} {'rows':>14} {'bytes':>12} {'% of IDs':>9} {'hit %':>8} {'misses':>14}", file=out)
        tables_rec = {}
        tot_hits = 0.0
        for name, c in rec_curves.items():
            r = alloc[name]
            h = c.hits_at(r)
            tot_hits += h
            tables_rec[name] = {"rows": int(r), "bytes": int(r * row_bytes), "hit_ratio": h / c.requests,
                                "misses": int(round(c.requests - h)), "distinct": c.distinct,
                                "proportional_rows": int(prop[name])}
            print(f"{name[:20]:<20} {r:>14,} {format_bytes(r * row_bytes):>12} {100 * r / c.distinct:>9.2f} "
                  f"{100 * h / c.requests:>8.2f} {int(round(c.requests - h)):>14,}", file=out)
        prop_hits = sum(c.hits_at(prop[n]) for n, c in rec_curves.items())
        print(f"{'total':<20} {rows_used:>14,} {format_bytes(rows_used * row_bytes):>12} {'':>9} "
              f"{100 * tot_hits / tot_req:>8.2f} {int(round(tot_req - tot_hits)):>14,}", file=out)
        if rows_used < budget_rows:
            print(f"  {budget_rows - rows_used:,} rows of the budget are left over: every table fits "
                  "or more rows would not cut misses", file=out)
        if len(rec_curves) > 1:
            print(f"  for comparison, rows proportional to distinct IDs: hit {100 * prop_hits / tot_req:.2f}%, "
                  f"misses {int(round(tot_req - prop_hits)):,}", file=out)
        if not exact:
            print(f"  ({pol_names[rec_policy]} hits between simulated sizes are interpolated)", file=out)
        rec = {"policy": rec_policy, "budget_bytes": budget, "row_bytes": row_bytes, "budget_rows": int(budget_rows),
               "rows_used": int(rows_used), "hit_ratio": tot_hits / tot_req,
               "misses": int(round(tot_req - tot_hits)), "proportional_hit_ratio": prop_hits / tot_req,
               "tables": tables_rec}

    if args.out:
        od = Path(args.out)
        try:
            od.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TierecError(f"{od}: cannot create output directory ({e.strerror})") from None
        pngs = {}
        for name, curves in results.items():
            path = od / f"mrc_{safe_name(name)}.png"
            plot_curves(path, name, curves, rec["tables"][name]["rows"] if rec else None, row_bytes)
            pngs[name] = path.name
        doc = {
            "input": str(args.input), "format": fmt, "policies": wanted, "min_bypass": not args.no_bypass,
            "max_requests": args.max_requests,
            "dataset": ({"split": args.split, "dedup_per_batch": args.dedup_per_batch, "shuffle": args.shuffle,
                         "seed": args.seed} if fmt == "dataset" else None),
            "tables": {name: {"requests": next(iter(cs.values())).requests,
                              "distinct": next(iter(cs.values())).distinct,
                              "png": pngs[name],
                              "curves": {p: c.to_dict() for p, c in cs.items()},
                              "seconds": timings[name]}
                       for name, cs in results.items()},
            "recommendation": rec,
        }
        (od / "curves.json").write_text(json.dumps(doc, indent=1))
        print(f"\nwrote {len(pngs)} plot(s) and curves.json to {od}", file=out)
    return 0

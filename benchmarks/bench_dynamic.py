"""Why a user would switch to dynamic tables (issue #19), measured side by side in one run.

    python benchmarks/bench_dynamic.py                 # ~10 minutes on 2 cores
    python benchmarks/bench_dynamic.py --quick         # ~3 minutes
    python benchmarks/bench_dynamic.py --json runs/dynamic.json

**Data.** ``tierec data synth --raw-ids``: ``--features`` Criteo-shaped features (the generator's calibrated
skew and hidden label model over the *true* IDs), each with ``--cardinality`` true IDs, stored as raw
64-bit IDs. A held-out test split measures AUC and log-loss.

**Equal memory.** Every table gets the same bytes, ``M = --rows x row_bytes`` (weights + row-wise Adagrad
state): a *fixed* table has ``--rows`` rows, a tenth of the true cardinality, and hashes the raw IDs into
them (colliding IDs share a row); a *dynamic* table pays its ID index from the same bytes, so it has
``C = M / (row_bytes + index bytes per slot)`` slots, each an ID's own row. Configurations, each one
``tierec train`` process on the same batches:

* ``fixed-hashed``: ``--table-kind fixed --table-rows ROWS``;
* ``dynamic-k1``: every new ID admitted at once, no eviction: once full, new IDs read the zero row;
* ``dynamic-lfu``: admission after 2 sightings, LFU eviction with counts halving every 50 steps;
* ``dynamic-ttl``: admission after 2 sightings, IDs unseen for 400 steps leave (swept every 50);
* ``dynamic-lfu-ssd-index``: ``dynamic-lfu`` with its ID index spilled to files beside the tables, 1 MiB of
  its pages in memory (``--id-index ssd --id-index-memory 1MiB``): the same AUC, the price in samples/s;
* ``no-collisions`` (reference, 10x the memory): a fixed table with a row per true ID.

Reported per configuration: AUC and log-loss on the test split, embedding memory (rows + ID index), peak
RSS of the process, training samples/s, and the dynamic tables' live / admitted / evicted / rejected counts.

**Lookup cost at 100% hits** (in this process): a fixed table behind a cache holding all its rows against
a dynamic table (its index maps every ID of the step, all known) over the same cache; the target is a
ratio of at most 1.5x. **TorchRec's managed collisions** (`mc_peer.py`, when the optional torchrec extra
is installed): ``ManagedCollisionEmbeddingBagCollection`` against tierec's dynamic tables at the same
capacity, training steps on the same batches, side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale as bs  # noqa: E402  (child processes with peak RSS)

from tierec.data.dataset import Dataset  # noqa: E402
from tierec.modules.embedding import TableConfig, build_collection  # noqa: E402
from tierec.modules.optim import SparseOptimizer  # noqa: E402
from tierec.sparse import KeyedJaggedTensor  # noqa: E402
from tierec.storage.base import InMemoryTable  # noqa: E402
from tierec.storage.cache import CachedTable  # noqa: E402
from tierec.storage.dynamic import DynamicConfig  # noqa: E402
from tierec.train.idmap import IdMaps  # noqa: E402

log = logging.getLogger("bench_dynamic")
ADAGRAD_STATE = 1  # row-wise Adagrad: one float of state per row


def configs(rows: int, slots: dict[str, int], card: int) -> dict[str, list[str]]:
    """name -> `tierec train` flags. ``slots``: the dynamic configurations' capacity at equal memory."""
    return {
        "fixed-hashed": ["--table-kind", "fixed", "--table-rows", str(rows)],
        "dynamic-k1": ["--table-kind", "dynamic", "--table-rows", str(slots["k1"])],
        "dynamic-lfu": ["--table-kind", "dynamic", "--table-rows", str(slots["admit"]), "--admit-count", "2",
                        "--evict", "lfu", "--decay-every", "50"],
        "dynamic-ttl": ["--table-kind", "dynamic", "--table-rows", str(slots["admit"]), "--admit-count", "2",
                        "--evict", "ttl", "--ttl-steps", "400", "--decay-every", "50"],
        # dynamic-lfu with its ID index spilled to files, 1 MiB of its pages in memory: the same model, slower
        "dynamic-lfu-ssd-index": ["--table-kind", "dynamic", "--table-rows", str(slots["admit"]), "--admit-count",
                                  "2", "--evict", "lfu", "--decay-every", "50", "--id-index", "ssd",
                                  "--id-index-memory", "1MiB"],
        "no-collisions": ["--table-kind", "fixed", "--table-rows", str(card)],
    }


def equal_memory_slots(rows: int, row_bytes: int) -> dict[str, int]:
    """Slots of a dynamic table that cost at most what ``rows`` fixed rows cost, its index included (the
    index's bytes per slot step with the sketch's power-of-two width: the largest C that fits)."""
    budget = rows * row_bytes
    out = {}
    for name, k in (("k1", 1), ("admit", 2)):
        c = rows
        while c * (row_bytes + DynamicConfig(capacity=c, admit_count=k).index_bytes_per_row) > budget:
            c -= max(1, c // 1000)
        out[name] = c
    return out


def read_batches(data: Path, batch_size: int, n: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The first ``n`` training batches as feature -> (raw IDs int64 [N], lengths int64 [B])."""
    out = []
    for b in Dataset(str(data)).batches("train", batch_size, shuffle=False, dedup=False):
        out.append({k: (jt.values, jt.lengths) for k, jt in b.sparse.to_dict().items()})
        if len(out) == n:
            break
    return out


def kjt_of(batch: dict) -> KeyedJaggedTensor:
    keys = list(batch)
    return KeyedJaggedTensor(keys, torch.cat([batch[k][0] for k in keys]), torch.cat([batch[k][1] for k in keys]))


def lookup_cost(batches: list[dict], dim: int, repeat: int) -> dict:
    """ms per step of pooled lookups at 100% hits (eval mode): fixed rows behind a cache holding them all, and a
    dynamic table whose index knows every ID (mapped in training mode, so its bookkeeping is paid) over the same
    kind of cache. Returns both and the ratio."""
    keys = list(batches[0])
    uniq = {k: torch.unique(torch.cat([b[k][0] for b in batches])) for k in keys}
    opt = SparseOptimizer("rowwise_adagrad", 0.05)

    def cached(n: int):
        def factory(i, tcfg, sdim):
            c = CachedTable(InMemoryTable(n, dim, sdim), n, "lru")
            c.release(c.acquire(torch.arange(n)), False)  # every row resident
            return c
        return factory

    rows = {k: int(u.numel()) for k, u in uniq.items()}
    fixed = build_collection([TableConfig(k, rows[k], dim) for k in keys], opt, 0, cached(max(rows.values())))
    dyn = build_collection([TableConfig(k, rows[k], dim, dynamic=True) for k in keys], opt, 0,
                           cached(max(rows.values())))
    fixed.eval()
    dyn.eval()
    from tierec.data.dataset import Schema, SparseFeature

    schema = Schema([], [SparseFeature(k, rows[k], raw=True) for k in keys])
    maps = IdMaps(*IdMaps.plan(schema, "dynamic", None, {}, DynamicConfig(capacity=2)))
    step = 1
    maps.index.map([uniq[k] for k in maps.dynamic], step)  # admit every ID first: the timed steps all hit
    # the fixed table sees the IDs as rows 0..n-1 (the same distinct IDs, so the same unique counts per step)
    fixed_batches = [{k: (torch.searchsorted(uniq[k], b[k][0]), b[k][1]) for k in keys} for b in batches]
    times: dict[str, list[float]] = {"fixed": [], "dynamic": []}
    with torch.no_grad():
        for _ in range(repeat):
            for fb, b in zip(fixed_batches, batches, strict=True):
                t0 = time.perf_counter()
                fixed(kjt_of(fb))
                times["fixed"].append(time.perf_counter() - t0)
                step += 1
                t0 = time.perf_counter()
                dyn(maps.map_batch(_batch(b), step).sparse)
                times["dynamic"].append(time.perf_counter() - t0)
    f, d = (statistics.median(times[k]) * 1e3 for k in ("fixed", "dynamic"))
    return {"fixed_cached_ms": round(f, 3), "dynamic_ms": round(d, 3), "ratio": round(d / f, 3)}


def _batch(b: dict):
    from tierec.data.dataset import Batch

    kjt = kjt_of(b)
    n = kjt.stride()
    return Batch(torch.zeros(n, 0), kjt, torch.zeros(n))


def tierec_dynamic_steps(batches: list[dict], capacity: int, dim: int, warmup: int = 3) -> dict:
    """Training steps of tierec's dynamic tables alone (map, pooled lookup, fused row-wise update), the same
    shape of work as `mc_peer.torchrec_mc_steps`: loss = sum of the pooled vectors."""
    keys = list(batches[0])
    from tierec.data.dataset import Schema, SparseFeature

    schema = Schema([], [SparseFeature(k, capacity, raw=True) for k in keys])
    cfg = DynamicConfig(capacity=2, admit_count=1, evict="lfu", decay_every=10)
    maps = IdMaps(*IdMaps.plan(schema, "dynamic", capacity, {}, cfg))
    ebc = build_collection([TableConfig(k, capacity, dim, dynamic=True) for k in keys],
                           SparseOptimizer("sgd", 0.05), 0)
    ebc.train()
    bags = {t.config.key: t for t in ebc.bags}
    t_total, steps = 0.0, 0
    for i, b in enumerate(batches, start=1):
        t0 = time.perf_counter()
        mb = maps.map_batch(_batch(b), i)
        for k, (slots, ids) in mb.fresh.items():
            bags[k].use_fresh(slots, ids)
        ebc(mb.sparse).sum().backward()
        if i > warmup:
            t_total += time.perf_counter() - t0
            steps += 1
    B = next(iter(batches[0].values()))[1].numel()
    return {"samples_per_s": round(steps * B / t_total, 1), "ms_per_step": round(t_total / steps * 1e3, 3),
            "steps": steps, "evicted": sum(s["evicted"] for s in maps.stats().values())}


def _rss() -> int:
    """This process's resident bytes (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def index_spill_cost(capacity: int, residents: list[int], steps: int, batch_ids: int, workdir: Path) -> dict:
    """The dynamic index alone, at ``capacity`` slots: ms per ``map`` of a batch of ``batch_ids`` Zipf(1.1) IDs
    drawn from 4 x capacity true IDs (LFU eviction, counts halving every 20 steps: the table fills and evicts),
    with the index in memory and spilled to files under ``workdir`` at each resident share; the process's RSS
    growth while it maps (the index's own memory, or the bound on its resident pages)."""
    import gc

    import numpy as np

    from tierec.storage.dynamic import DynamicIndex

    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(np.minimum(rng.zipf(1.1, batch_ids), 4 * capacity).astype(np.int64))
               * -7046029254386353131 for _ in range(steps)]  # raw 64-bit-looking IDs
    cfg = DynamicConfig(capacity=capacity, evict="lfu", decay_every=20)
    out: dict = {"capacity": capacity, "batch_ids": batch_ids, "steps": steps}
    # spilled first: each RSS growth is measured from a baseline no earlier index has raised
    for name, res in [(f"ssd, {r >> 20} MiB resident", r) for r in residents] + [("memory", 0)]:
        gc.collect()
        rss0 = _rss()
        ix = DynamicIndex(cfg, ["t"], spill=workdir / "id_index" if res else None, resident_bytes=res or 1)
        times, peak = [], 0
        for step, b in enumerate(batches, start=1):
            t0 = time.perf_counter()
            ix.map(b, step)
            times.append(time.perf_counter() - t0)
            peak = max(peak, _rss() - rss0)
        out[name] = {"ms_per_map": round(statistics.median(times[steps // 4:]) * 1e3, 2),
                     "rss_growth_mib": round(peak / 2**20, 1), "index_mib": round(ix.nbytes / 2**20, 1),
                     "evicted": ix.stats()["t"]["evicted"], "trims": ix.arrays.trims}
        log.info("index %s: %s", name, out[name])
        del ix
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller run (~3 minutes)")
    p.add_argument("--features", type=int, default=8, help="sparse features (tables)")
    p.add_argument("--cardinality", type=int, default=None, help="true IDs per feature (default 200000; quick 50000)")
    p.add_argument("--train-rows", type=int, default=None, help="samples (default 600000; quick 150000)")
    p.add_argument("--dim", type=int, default=32, help="embedding dimension")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="--num-threads of every training run")
    p.add_argument("--workdir", type=Path, default=None, help="where the data and runs go (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--only", default=None, help="comma-separated configurations to train (default: all)")
    p.add_argument("--index-capacity", type=int, default=None,
                   help="slots of the index-alone comparison, in memory vs spilled (default 8M; quick 2M; 0: skip)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = parse_args(argv)
    card = a.cardinality or (50_000 if a.quick else 200_000)
    n_rows = a.train_rows or (150_000 if a.quick else 600_000)
    rows = card // 10
    row_bytes = (a.dim + ADAGRAD_STATE) * 4
    slots = equal_memory_slots(rows, row_bytes)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="tierec-dynamic-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    results: dict = {"features": a.features, "true_cardinality": card, "fixed_rows": rows, "dim": a.dim,
                     "row_bytes": row_bytes, "table_bytes": rows * row_bytes, "dynamic_slots": slots,
                     "train_rows": n_rows, "runs": {}}
    try:
        if not data.exists():
            bs.run_logged([sys.executable, "-m", "tierec", "data", "synth", "--out", str(data), "--raw-ids",
                           "--rows", str(n_rows), "--num-sparse", str(a.features), "--cardinalities", str(card),
                           "--max-cardinality", "0", "--test-fraction", "0.1", "--seed", "0", "--no-progress"],
                          work / "synth.log")
        chosen = configs(rows, slots, card)
        if a.only:
            chosen = {k: v for k, v in chosen.items() if k in a.only.split(",")}
        for name, flags in chosen.items():
            run = work / name
            cmd = [sys.executable, "-m", "tierec", "train", "--data", str(data), "--out", str(run), "--overwrite",
                   "--no-progress", "--embedding-dim", str(a.dim), "--batch-size", str(a.batch_size),
                   "--seed", "0", "--log-every", "20", *flags]
            if a.threads:
                cmd += ["--num-threads", str(a.threads)]
            child = bs.run_logged(cmd, work / f"{name}.log")
            summary = json.loads(child.out)
            dyn = summary.get("dynamic") or {}
            mem = (slots["k1"] if name == "dynamic-k1" else slots["admit"]) if name.startswith("dynamic") else None
            table_rows = mem if mem is not None else (card if name == "no-collisions" else rows)
            index_bytes = sum(DynamicConfig(capacity=s["capacity"], admit_count=2 if "k1" not in name else 1)
                              .index_bytes_per_row * s["capacity"] for s in dyn.values())
            results["runs"][name] = {
                "auc": summary.get("auc"), "logloss": summary.get("logloss"),
                "samples_per_s": summary.get("samples_per_s"), "peak_rss_mib": round(child.peak_rss / 2**20, 1),
                "embedding_bytes": a.features * table_rows * row_bytes + index_bytes,
                "live": sum(s["live"] for s in dyn.values()) if dyn else None,
                "admitted": sum(s["admitted"] for s in dyn.values()) if dyn else None,
                "evicted": sum(s["evicted"] for s in dyn.values()) if dyn else None,
                "rejected_share": (sum(s["rejected"] for s in dyn.values()) / max(1, sum(s["lookups"] for s in
                                   dyn.values()))) if dyn else None,
            }
            log.info("%s: %s", name, results["runs"][name])
        batches = read_batches(data, a.batch_size, 12 if a.quick else 30)
        results["lookup_100pct_hits"] = lookup_cost(batches, a.dim, 2 if a.quick else 4)
        results["train_steps_tierec"] = tierec_dynamic_steps(batches, slots["admit"], a.dim)
        cap = a.index_capacity if a.index_capacity is not None else (2 << 20 if a.quick else 8 << 20)
        if cap:
            results["index_spill"] = index_spill_cost(cap, [16 << 20, 128 << 20], 40, 26 * a.batch_size, work)
        try:
            import mc_peer

            results["train_steps_torchrec_mc"] = mc_peer.torchrec_mc_steps(batches, slots["admit"], a.dim)
        except Exception as e:  # the optional extra: absent or failing, the rest of the report stands
            results["train_steps_torchrec_mc"] = {"error": str(e).splitlines()[0] if str(e) else repr(e)}
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_report(results)
    bs.write_json(a.json, results)
    return 0


def print_report(r: dict) -> None:
    print(f"\n{r['features']} raw-ID features, {r['true_cardinality']:,} true IDs each, dim {r['dim']} "
          f"({r['row_bytes']} B rows): every table gets {r['table_bytes'] / 2**20:.2f} MiB = "
          f"{r['fixed_rows']:,} fixed rows or {r['dynamic_slots']['admit']:,} dynamic slots "
          f"({r['dynamic_slots']['k1']:,} with K=1)\n")
    head = f"{'configuration':<15} {'AUC':>7} {'logloss':>8} {'emb MiB':>8} {'RSS MiB':>8} {'samples/s':>10} " \
           f"{'live':>8} {'evicted':>8} {'rejected':>8}"
    print(head)
    print("-" * len(head))
    base = r["runs"].get("fixed-hashed", {})
    for name, x in r["runs"].items():
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        print(f"{name:<15} {f(x['auc'], '.4f'):>7} {f(x['logloss'], '.4f'):>8} {x['embedding_bytes'] / 2**20:>8.2f} "
              f"{x['peak_rss_mib']:>8.0f} {f(x['samples_per_s'], ',.0f'):>10} {f(x['live'], ','):>8} "
              f"{f(x['evicted'], ','):>8} {f(x['rejected_share'], '.1%'):>8}")
    if base.get("auc"):
        for name, x in r["runs"].items():
            if name != "fixed-hashed" and x["auc"]:
                print(f"  {name}: AUC {x['auc'] - base['auc']:+.4f} vs fixed-hashed, speed "
                      f"{x['samples_per_s'] / base['samples_per_s']:.2f}x")
    sp = r.get("index_spill")
    if sp:
        mem = sp["memory"]
        sp = {"memory": mem, **{k: v for k, v in sp.items() if k != "memory"}}
        print(f"\nthe index alone, {sp['capacity']:,} slots, maps of {sp['batch_ids']:,} Zipf IDs (LFU, full):")
        for name, x in sp.items():
            if isinstance(x, dict):
                print(f"  {name:<24} {x['ms_per_map']:>8.2f} ms/map ({x['ms_per_map'] / mem['ms_per_map']:.2f}x)  "
                      f"RSS +{x['rss_growth_mib']:,.0f} MiB  (index in memory: {x['index_mib']:,.0f} MiB)  "
                      f"evicted {x['evicted']:,}, trims {x['trims']}")
    lc = r.get("lookup_100pct_hits")
    if lc:
        print(f"\nlookup at 100% hits: fixed cached {lc['fixed_cached_ms']} ms/step, dynamic {lc['dynamic_ms']} "
              f"ms/step: {lc['ratio']:.2f}x (target <= 1.5x: {'met' if lc['ratio'] <= 1.5 else 'MISSED'})")
    t, mc = r.get("train_steps_tierec"), r.get("train_steps_torchrec_mc")
    if t:
        print(f"training steps at {r['dynamic_slots']['admit']:,} slots/table: tierec dynamic "
              f"{t['samples_per_s']:,.0f} samples/s", end="")
        if mc and "samples_per_s" in mc:
            print(f", TorchRec ManagedCollisionEBC {mc['samples_per_s']:,.0f} samples/s: tierec "
                  f"{t['samples_per_s'] / mc['samples_per_s']:.2f}x")
        else:
            print(f"; TorchRec MC: {(mc or {}).get('error', 'not run')}")


if __name__ == "__main__":
    sys.exit(main())

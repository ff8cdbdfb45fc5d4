"""Training with tables on SSD behind caches: bit-identical to all-in-memory, within a memory budget."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tierec.errors import ConfigError
from tierec.storage.plan import TableNeeds, parse_bytes, plan_tables
from tierec.malloc import STEP_MALLOC, TRANSIENT_MALLOC
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer


def cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), embedding_dim=8, bottom_mlp=[16], top_mlp=[16], batch_size=256,
                epochs=2, progress=False, log_every=4, plan_batches=4)
    base.update(kw)
    return TrainConfig(**base)


def table_rows(trainer):
    out = {}
    for t in trainer.model.embeddings.tables:
        t.storage.flush()
        out[t.config.name] = t.storage.read_rows(0, t.storage.num_embeddings)
    return out


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    t = Trainer(cfg(tiny_dataset, tmp_path_factory.mktemp("ref")))
    return t.fit(), table_rows(t)


@pytest.mark.parametrize("budget,policy", [("6KiB", "lru"), ("6KiB", "lfu"), ("6KiB", "freq"), ("20KiB", "lru"),
                                           ("20KiB", "freq")])
def test_tiered_training_is_bit_identical(tiny_dataset, tmp_path, reference, budget, policy):
    ref_summary, ref_rows = reference
    t = Trainer(cfg(tiny_dataset, tmp_path, memory_budget=budget, cache_policy=policy))
    summary = t.fit()
    kinds = {type(tb.storage).__name__ for tb in t.model.embeddings.tables}
    assert "CachedTable" in kinds, "the budget must push tables to SSD"
    assert summary["auc"] == ref_summary["auc"] and summary["logloss"] == ref_summary["logloss"]
    for name, (w, s) in table_rows(t).items():
        assert torch.equal(w, ref_rows[name][0]) and torch.equal(s, ref_rows[name][1]), name
    assert summary["ssd_bytes_read"] > 0 and 0 <= summary["cache_hit_rate"] < 1
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    cache = next(r for r in records if r["event"] == "train")["cache"]
    st = next(iter(cache.values()))
    assert st["hits"] + st["misses"] == st["lookups"] and "bytes_read" in st["backing"]


def test_tiered_resume_and_per_table_settings(tiny_dataset, tmp_path, reference):
    _, ref_rows = reference
    tables = {"s0": {"placement": "ssd", "cache_rows": 5, "policy": "lfu"}, "s1": {"placement": "memory"}}
    Trainer(cfg(tiny_dataset, tmp_path, memory_budget="20KiB", tables=tables, max_steps=11)).fit()
    t = Trainer(cfg(tiny_dataset, tmp_path, memory_budget="20KiB", tables=tables), resume=True)
    t.fit()
    storages = {tb.config.name: tb.storage for tb in t.model.embeddings.tables}
    assert storages["s0"].capacity == 5 and storages["s0"].policy == "lfu"
    assert type(storages["s1"]).__name__ == "InMemoryTable"
    for name, (w, s) in table_rows(t).items():
        assert torch.equal(w, ref_rows[name][0]) and torch.equal(s, ref_rows[name][1]), name


def test_padded_o_direct_lookahead_resumes_bit_identical_with_packed_checkpoints(tiny_dataset, tmp_path, reference):
    """--ssd-row-align 512 --direct-io --cache-policy lookahead: the working files are padded, a resume
    in the middle loads the checkpoint into them, and the result equals all-in-memory training; the
    checkpoint's own table files stay packed (what eval and serving read)."""
    ref_summary, ref_rows = reference
    kw = dict(memory_budget="6KiB", cache_policy="lookahead", lookahead=6, direct_io=True, ssd_row_align=512)
    Trainer(cfg(tiny_dataset, tmp_path, max_steps=11, **kw)).fit()
    t = Trainer(cfg(tiny_dataset, tmp_path, **kw), resume=True)
    summary = t.fit()
    ssd = [tb.storage.backing for tb in t.model.embeddings.tables if hasattr(tb.storage, "backing")]
    assert ssd and all(b.row_stride == 512 and b.path.stat().st_size == b.file_rows * 512 for b in ssd)
    assert summary["auc"] == ref_summary["auc"]
    for name, (w, s) in table_rows(t).items():
        assert torch.equal(w, ref_rows[name][0]) and torch.equal(s, ref_rows[name][1]), name
    from tierec.train import checkpoint as ckpt

    c = ckpt.resolve_checkpoint(tmp_path)
    m = ckpt.read_manifest(c)
    files = {f.stem: f for f in (c / "tables").glob("*.tbl")}
    assert {b.path.stem for b in ssd} <= set(files)
    for b in ssd:  # a row set: the written rows, packed
        rows = m["files"][f"tables/{b.path.stem}.tbl"]["rows"]
        assert 0 < rows <= b.num_embeddings
        assert files[b.path.stem].stat().st_size == rows * b.row_bytes, "checkpoint tables are packed"


@pytest.mark.parametrize("policy", ["lookahead", "lru"])
def test_write_back_log_trains_and_resumes_bit_identical(tiny_dataset, tmp_path, reference, policy):
    """--direct-io with packed rows: write-backs go to each SSD working file's log (the budget pays its
    map; the 20 KiB budget's maps fill, and are compacted into runs, hundreds of times), a resume in the
    middle starts new working files from the checkpoint, and the result equals all-in-memory training."""
    ref_summary, ref_rows = reference
    kw = dict(memory_budget="20KiB", cache_policy=policy, lookahead=6, direct_io=True)
    first = Trainer(cfg(tiny_dataset, tmp_path, max_steps=11, **kw))
    first.fit()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in records if r["event"] == "start")["budget_split"]["write_log"] > 0
    t = Trainer(cfg(tiny_dataset, tmp_path, **kw), resume=True)
    summary = t.fit()

    def total(st, key: str) -> int:  # summed over the SSD files below a cache's stats
        if isinstance(st, dict):
            return int(st.get(key, 0)) + sum(total(v, key) for k, v in st.items() if k != key)
        return 0

    stats = [tb.storage.stats() for tb in t.model.embeddings.tables if hasattr(tb.storage, "stats")]
    assert sum(total(st, "log_rows") for st in stats) > 0
    assert sum(total(st, "log_compactions") for st in stats) > 0  # full maps merged into runs, read back exactly
    assert summary["auc"] == ref_summary["auc"] and summary["logloss"] == ref_summary["logloss"]
    for name, (w, s) in table_rows(t).items():
        assert torch.equal(w, ref_rows[name][0]) and torch.equal(s, ref_rows[name][1]), name


def test_tiered_checkpoint_evaluates_from_its_table_files(tiny_dataset, tmp_path, reference):
    from tierec.errors import CheckpointError
    from tierec.train import checkpoint as ckpt
    from tierec.train.trainer import evaluate, load_for_eval

    ref_summary, _ = reference
    Trainer(cfg(tiny_dataset, tmp_path, memory_budget="6KiB")).fit()
    model, ds, manifest = load_for_eval(str(tmp_path))
    kinds = {type(tb.storage).__name__ for tb in model.embeddings.tables}
    assert kinds == {"CachedTable"}, "SSD tables must be served from the checkpoint files, not loaded into memory"
    assert all(tb.storage.backing.readonly for tb in model.embeddings.tables)
    res = evaluate(model, ds, "test", 512, torch.device("cpu"), progress=False)
    assert res["auc"] == ref_summary["auc"]
    f = next((ckpt.resolve_checkpoint(tmp_path) / "tables").iterdir())
    data = bytearray(f.read_bytes())
    data[7] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_for_eval(str(tmp_path))


def test_plan_water_fills_by_access_share():
    needs = [TableNeeds("small_hot", 100, 100, 900), TableNeeds("big", 10_000, 100, 90),
             TableNeeds("cold", 10_000, 100, 10)]
    plan = {p.name: p for p in plan_tables(needs, 200_000, index_bytes_per_row=0)}
    assert plan["small_hot"].placement == "memory"
    assert plan["big"].placement == plan["cold"].placement == "ssd"
    # what small_hot left over is split 90:10
    assert plan["big"].cache_rows == 1710 and plan["cold"].cache_rows == 190
    assert sum(p.budget_bytes for p in plan.values()) <= 200_000


@pytest.mark.parametrize("policy,grouped", [("lookahead", True), ("lookahead", False), ("lru", False)])
def test_planned_caches_fill_the_budget_with_what_they_really_allocate(tmp_path, policy, grouped):
    """The planner sizes the SSD caches by what a cache of that many rows allocates (its hash map's
    power-of-two table, per-slot metadata, the look-ahead sketch), not by a worst-case bound per row: the
    caches built from the plan cost exactly what the plan charges, within the budget, and hold more rows
    than the bound allowed."""
    from tierec.storage.cache import CachedTable
    from tierec.storage.lookahead import LookaheadCache
    from tierec.storage.settings import StorageSettings
    from tierec.storage.tiered import cache_cost, index_bytes_per_row, plan_budget

    needs = [TableNeeds(f"t{i}", 400_000 * (i + 1), 68, 1000) for i in range(4)] + [TableNeeds("small", 50, 68, 1000)]
    budget = 20 << 20
    settings = StorageSettings(root=tmp_path, memory_budget=budget, policy=policy, group_caches=grouped)
    plan, _ = plan_budget(settings, needs, {})
    bound = {p.name: p for p in plan_tables(needs, budget, policy, index_bytes_per_row(settings))}
    ssd = [p for p in plan if p.placement == "ssd"]
    assert [p.name for p in ssd] == [f"t{i}" for i in range(4)] and plan[-1].placement == "memory"
    assert sum(p.budget_bytes for p in plan) <= budget
    assert sum(p.cache_rows for p in ssd) > 1.1 * sum(bound[p.name].cache_rows for p in ssd)
    # what the caches allocate when built from the plan is what it charged
    if grouped:
        rows = sum(p.cache_rows for p in ssd)
        built = [LookaheadCache.bookkeeping_bytes(rows) + 68 * rows]
    else:
        cls = LookaheadCache if policy == "lookahead" else CachedTable
        built = [cls.bookkeeping_bytes(p.cache_rows, policy) + 68 * p.cache_rows for p in ssd]
    charged = sum(p.budget_bytes for p in ssd)
    assert charged >= sum(built) > charged - len(ssd)  # the group's bookkeeping split by rows, rounded up
    assert cache_cost(plan, needs, settings) == {p.name: p.budget_bytes for p in plan}
    # the largest that fits: one more row per cache would not
    grown = [p if p.placement == "memory" else type(p)(**{**p.to_dict(), "cache_rows": int(p.cache_rows * 1.01) + 1})
             for p in plan]
    assert sum(cache_cost(grown, needs, settings).values()) > budget


def test_cache_bookkeeping_bytes_is_what_a_cache_allocates():
    from tierec.storage.base import InMemoryTable
    from tierec.storage.cache import CachedTable
    from tierec.storage.lookahead import LookaheadCache

    below = InMemoryTable(2_000_000, 4, 1)
    for cap in (1, 7, 1000, 4097, 70_001):
        la = LookaheadCache(below, cap)
        assert la.index_nbytes + la._sketch.nbytes == LookaheadCache.bookkeeping_bytes(cap)
        for policy in ("lru", "lfu"):
            assert CachedTable(below, cap, policy).index_nbytes == CachedTable.bookkeeping_bytes(cap, policy)


def test_plan_errors():
    with pytest.raises(ConfigError, match="cannot read"):
        parse_bytes("two gigs")
    with pytest.raises(ConfigError, match="unknown table"):
        plan_tables([TableNeeds("a", 10, 4, 1)], 100, overrides={"b": {}})
    with pytest.raises(ConfigError, match="no cache row"):
        plan_tables([TableNeeds("a", 1000, 400, 1)], 100)
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("1.5kB") == 1500 and parse_bytes("1K") == 1024


RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from tierec.data.synth import SynthConfig, generate
    from tierec.train.config import TrainConfig
    from tierec.train.trainer import Trainer
    data, out, card, budget, policy, direct = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6] == "1"
    if out == "-":  # make the data in its own process: its memory is not the trainer's
        generate(SynthConfig(rows=20000, seed=0, cardinalities=[card] * 4, max_cardinality=0, num_dense=4), data,
                 progress=False)
        sys.exit(0)
    cfg = TrainConfig(data=data, out=out, embedding_dim=32, bottom_mlp=[16], top_mlp=[16], batch_size=512,
                      progress=False, memory_budget=None if budget == "none" else budget, max_eval_rows=2000,
                      direct_io=direct, cache_policy=policy, checkpoint_every=10)  # checkpoints and evaluation too
    Trainer(cfg).fit()
    # VmHWM: this process's peak RSS (ru_maxrss would carry the forking parent's over exec)
    hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    print(json.dumps({"maxrss": hwm * 1024}))
""")


def peak_rss(tmp_path, name, card, budget, policy="lru", direct=True):
    data = tmp_path / f"data-{card}"
    if not data.exists():
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(data), "-", str(card), budget, policy, "1"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(data), str(tmp_path / name), str(card), budget, policy,
                        "1" if direct else "0"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["maxrss"]


@pytest.mark.slow
def test_peak_rss_stays_within_budget_plus_overhead(tmp_path):
    """Peak RSS = base + budget + a fixed overhead, whatever the table size, in every mode: LRU or
    look-ahead caches (the window and the sketch paid from the budget), O_DIRECT or memmap files,
    with checkpoints and evaluation in the run. Tables 16x the budget."""
    rows = 1_000_000  # 4 tables x 1M rows x (32 + 1) floats = 528 MB of tables
    tables_bytes = 4 * rows * 33 * 4
    budget = 32 << 20
    # documented in docs/storage.md: allocator, Arrow pool, I/O buffers, checkpoint/eval transients
    # (measured 1-14 MiB over the budget in these modes)
    overhead = 64 << 20
    base = peak_rss(tmp_path, "base", 100, "none")  # same process with negligible tables
    in_memory = peak_rss(tmp_path, "mem", rows, "none")
    assert in_memory - base > tables_bytes * 0.9, "the measurement must see tables held in memory"
    for policy, direct in (("lru", True), ("lookahead", True), ("lookahead", False)):
        tiered = peak_rss(tmp_path, f"tiered-{policy}-{direct}", rows, "32MiB", policy, direct)
        assert tiered - base <= budget + overhead, (policy, direct, (tiered - base) / 2**20)


MALLOC_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from tierec import malloc

    def faults_per_alloc(n=21):  # median page faults of one 8 MiB block (a batch-4096 x 512 activation)
        x = torch.empty(8 << 18).fill_(1.0); del x
        faults = []
        for _ in range(n):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            x = torch.empty(8 << 18).fill_(1.0)
            del x
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        return sorted(faults)[n // 2]

    out = {}
    assert malloc.limit_malloc_retention()
    out["transient"] = faults_per_alloc()
    with malloc.malloc_thresholds(*malloc.STEP_MALLOC):
        out["step"] = faults_per_alloc()
        out["inside"] = malloc._malloc_now
    out["after"] = malloc._malloc_now
    print(json.dumps(out))
""")


def test_step_malloc_thresholds_reuse_activations_and_restore():
    """Transient thresholds hand an 8 MiB block back at once (its 2048 pages fault in again on the next
    allocation); the training loop's keep it for the next step; leaving the block restores the transient ones."""
    r = subprocess.run([sys.executable, "-c", MALLOC_SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["transient"] > 1000 and out["step"] < 50, out
    assert tuple(out["inside"]) == STEP_MALLOC and tuple(out["after"]) == TRANSIENT_MALLOC


def test_training_decodes_into_arrows_jemalloc_pool_unless_the_user_chose_one():
    """`returning_arrow_pool` (called by the trainer): Arrow's jemalloc pool, whose freed pages go back to the OS at
    once, where this pyarrow has one; an ARROW_DEFAULT_MEMORY_POOL the user set stands. In a fresh process: the
    default pool is the process's."""
    import os

    pa = pytest.importorskip("pyarrow")
    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        pytest.skip("this pyarrow has no jemalloc pool")
    code = "from tierec import malloc; print(malloc.returning_arrow_pool())"
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    for extra, want in (({}, "jemalloc"), ({"ARROW_DEFAULT_MEMORY_POOL": "system"}, "system")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env | extra, timeout=120)
        assert r.returncode == 0 and r.stdout.split()[-1] == want, (extra, r.stdout, r.stderr[-2000:])


def test_lookahead_window_share_has_a_floor(caplog):
    """The window's share of the budget is at least the prepared steps + one read ahead (what the pipeline
    holds at the least) where that is at most half the budget; below that it is its 1/4 share, with a warning."""
    from pathlib import Path

    from tierec.storage.settings import StorageSettings
    from tierec.storage.tiered import WINDOW_BYTES_PER_LOOKUP, WINDOW_SHARE, split_budget

    needs = [TableNeeds("t", 100_000, 68, lookups=50 * 4096)]  # 4096 lookups per sampled batch
    per = WINDOW_BYTES_PER_LOOKUP * 4096

    def window(budget: int) -> int:
        s = StorageSettings(root=Path("."), memory_budget=budget, policy="lookahead", plan_batches=50,
                            prefetch_depth=2)
        return split_budget(s, needs).window

    assert window(40 * per) == 40 * per // WINDOW_SHARE  # its share is above the floor
    assert window(8 * per) == 3 * per  # the floor: 2 prepared steps + 1 read ahead
    assert "look-ahead window holds at least" not in caplog.text
    with caplog.at_level("WARNING", logger="tierec.storage.tiered"):
        assert window(5 * per) == 5 * per // WINDOW_SHARE  # the floor would take over half the budget
    assert "look-ahead window holds at least" in caplog.text

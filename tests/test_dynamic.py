"""Dynamic tables: the index against a plain-Python reference, and training exactness."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from tierec.data.dataset import Batch
from tierec.errors import ConfigError
from tierec.sparse import KeyedJaggedTensor
from tierec.storage.dynamic import BULK_EVICT_DIVISOR, UNKNOWN_ID, DynamicConfig, DynamicIndex


class RefIndex:
    """The protocol of `tierec.storage.dynamic` in plain Python dicts and lists (exact counts)."""

    def __init__(self, cfg: DynamicConfig, key=lambda i: i):
        self.cfg, self.key = cfg, key  # key: the admission order of new IDs (the index's keys)
        self.slot_of, self.last, self.cnt, self.pending = {}, {}, {}, Counter()
        first = 1 if cfg.default_row == "unknown" else 0
        self.free = list(range(cfg.capacity - 1, first - 1, -1))
        self.started = False
        self.stats = Counter()

    def _remove(self, ids):
        slots = sorted(self.slot_of.pop(i) for i in ids)
        for i in ids:
            del self.last[i], self.cnt[i]
        self.free.extend(reversed(slots))
        self.stats["evicted"] += len(slots)

    def map(self, ids, step):
        cfg = self.cfg
        fresh = []
        if not self.started and cfg.default_row == "unknown":
            fresh.append((0, UNKNOWN_ID))
        self.started = True
        if cfg.decay_every and step % cfg.decay_every == 0:
            for d in (self.cnt, self.pending):
                for i in d:
                    d[i] //= 2
            if cfg.evict == "ttl":
                self._remove([i for i in self.slot_of if self.last[i] < step - cfg.ttl_steps])
            elif cfg.evict == "lfu":
                self._remove([i for i in self.slot_of if self.cnt[i] == 0])
        occ = Counter(ids)
        for i in sorted(occ):
            if i in self.slot_of:
                self.last[i] = step
                self.cnt[i] += occ[i]
        new = [i for i in sorted(occ, key=self.key) if i not in self.slot_of]
        if cfg.admit_count > 1:
            for i in new:
                self.pending[i] += occ[i]
            new = [i for i in new if self.pending[i] >= cfg.admit_count]
        if len(new) > len(self.free) and cfg.evict != "none":
            cand = [i for i in self.slot_of if i not in occ]
            key = ((lambda i: (self.last[i], self.slot_of[i])) if cfg.evict == "ttl"
                   else (lambda i: (self.cnt[i], self.last[i], self.slot_of[i])))
            cand.sort(key=key)
            self._remove(cand[: min(len(cand), max(len(new) - len(self.free), cfg.capacity // BULK_EVICT_DIVISOR))])
        for i in new[: len(self.free)]:
            s = self.free.pop()
            self.slot_of[i], self.last[i], self.cnt[i] = s, step, occ[i]
            fresh.append((s, i))
        default = -1 if cfg.default_row == "zero" else 0
        out = [self.slot_of.get(i, default) for i in ids]
        self.stats["rejected"] += sum(occ[i] for i in occ if i not in self.slot_of)
        return out, fresh


def _stream(seed, steps=60, n=40, vocab=300):
    rng = np.random.default_rng(seed)
    for _ in range(steps):  # skewed IDs, raw 64-bit-looking values (negatives too)
        r = np.minimum(rng.zipf(1.3, n), vocab) - 1
        yield np.array([(int(x) * 0x9E3779B97F4A7C15) % (1 << 64) - (1 << 63) for x in r], dtype=np.int64)


CONFIGS = [
    dict(capacity=1000),  # K=1, no eviction: every ID its own row for good
    dict(capacity=25),  # full: the rest rejected
    dict(capacity=30, admit_count=2, default_row="unknown"),
    dict(capacity=24, evict="lfu", decay_every=7),
    dict(capacity=24, evict="ttl", ttl_steps=5, decay_every=3, admit_count=3),
    dict(capacity=130, evict="lfu", admit_count=2, default_row="unknown", decay_every=10),
]


def _key_of(ix: DynamicIndex, table: int):
    return lambda i: int(ix.keys_of(table, torch.tensor([i], dtype=torch.int64))[0])


@pytest.mark.parametrize("kw", CONFIGS)
def test_index_matches_plain_python_reference(kw):
    cfg = DynamicConfig(**kw, sketch_width=1 << 20)
    ix = DynamicIndex(cfg, ["t"])
    ref = RefIndex(cfg, _key_of(ix, 0))
    for step, ids in enumerate(_stream(len(str(kw))), start=1):
        (m,) = ix.map(torch.from_numpy(ids), step)
        want, fresh = ref.map(ids.tolist(), step)
        assert m.slots.tolist() == want, f"step {step}"
        assert list(zip(m.fresh_slots.tolist(), m.fresh_ids.tolist(), strict=True)) == fresh, f"step {step}"
        assert torch.equal(ix.lookup(torch.from_numpy(ids))[0], m.slots)
    st = ix.stats()["t"]
    assert st["live"] == len(ref.slot_of) and st["evicted"] == ref.stats["evicted"]
    assert st["rejected"] == ref.stats["rejected"]
    if kw.get("evict"):
        assert st["evicted"] > 0  # the stream is long enough to evict
    assert st["live"] <= cfg.capacity


def test_one_index_over_several_tables_is_each_table_alone():
    """Three tables (one capacity each) in one index, the same raw IDs in all of them: each table maps exactly
    as its own plain-Python reference; slots are the table's own."""
    kw = dict(admit_count=2, evict="lfu", decay_every=7, sketch_width=1 << 20)
    cfgs = [DynamicConfig(capacity=c, **kw) for c in (24, 40, 130)]
    ix = DynamicIndex(cfgs, ["a", "b", "c"])
    refs = [RefIndex(c, _key_of(ix, t)) for t, c in enumerate(cfgs)]
    streams = [list(_stream(s)) for s in (1, 1, 2)]  # tables a and b see the same IDs
    for step in range(1, 61):
        batch = [torch.from_numpy(st[step - 1]) for st in streams]
        maps = ix.map(batch, step)
        for t, (m, ref) in enumerate(zip(maps, refs, strict=True)):
            want, fresh = ref.map(batch[t].tolist(), step)
            assert m.slots.tolist() == want, f"table {t} step {step}"
            assert list(zip(m.fresh_slots.tolist(), m.fresh_ids.tolist(), strict=True)) == fresh
    stats = ix.stats()
    assert [stats[n]["evicted"] for n in "abc"] == [r.stats["evicted"] for r in refs]
    assert stats["a"]["evicted"] > 0


def test_index_state_round_trip_continues_identically():
    cfg = DynamicConfig(capacity=24, evict="lfu", decay_every=7, admit_count=2)
    a, batches = DynamicIndex(cfg), [torch.from_numpy(x) for x in _stream(3)]
    for s, ids in enumerate(batches[:30], start=1):
        a.map(ids, s)
    b = DynamicIndex(cfg)
    b.load_state_dict(a.state_dict())
    for s, ids in enumerate(batches[30:], start=31):
        (ma,), (mb,) = a.map(ids, s), b.map(ids, s)
        assert torch.equal(ma.slots, mb.slots) and torch.equal(ma.fresh_ids, mb.fresh_ids)
    with pytest.raises(ConfigError, match="does not fit"):
        DynamicIndex(DynamicConfig(capacity=25)).load_state_dict(a.state_dict())


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="admit_count"):
        DynamicConfig(capacity=10, admit_count=0)
    with pytest.raises(ConfigError, match="ttl"):
        DynamicConfig(capacity=10, evict="ttl")
    with pytest.raises(RuntimeError, match="after step"):
        ix = DynamicIndex(DynamicConfig(capacity=10))
        ix.map(torch.tensor([1]), 2)
        ix.map(torch.tensor([1]), 2)


# ---------------------------------------------------------------------------- training
from tierec.modules.embedding import TableConfig, build_collection  # noqa: E402
from tierec.modules.optim import SparseOptimizer  # noqa: E402
from tierec.storage.lazy import RowInit  # noqa: E402
from tierec.train.idmap import IdMaps  # noqa: E402
from tierec.train.trainer import Trainer  # noqa: E402

from conftest import write_tiny_dataset  # noqa: E402
from test_tiered import cfg, table_rows  # noqa: E402


@pytest.mark.parametrize("opt", ["rowwise_adagrad", "adam"])
def test_k1_without_eviction_trains_like_a_fixed_table_with_one_row_per_id(opt):
    """Admission K=1, no eviction: bit-identical to a plain in-memory table that gives every distinct raw ID its
    own row, initialised from that ID (rows in first-seen order there, slots here)."""
    C, D, seed = 500, 6, 3
    rng = np.random.default_rng(0)
    batches = [np.array(list(_stream(5, steps=1, n=64))[0]) for _ in range(1)] + list(_stream(6, steps=25, n=64))
    sparse_opt = SparseOptimizer(opt, 0.05)
    dyn = build_collection([TableConfig("t", C, D, dynamic=True)], sparse_opt, seed=seed)
    ref = build_collection([TableConfig("t", C, D)], sparse_opt, seed=seed)
    maps = IdMaps(*IdMaps.plan(_schema(C), "dynamic", C, {}, DynamicConfig(capacity=2)))
    row_of: dict[int, int] = {}
    init = RowInit(seed, 0, C, D)
    for step, ids in enumerate(batches, start=1):
        lengths = torch.from_numpy(rng.integers(0, 5, 16))
        ids = ids[: int(lengths.sum())] if lengths.sum() <= ids.size else np.resize(ids, int(lengths.sum()))
        for x in ids.tolist():  # the reference: a new distinct ID takes the next row, at its initial value
            if x not in row_of:
                row_of[x] = len(row_of)
                ref.bags[0].storage.weight[row_of[x]] = init.rows(np.array([x]))[0]
        kjt = KeyedJaggedTensor(["t"], torch.from_numpy(ids), lengths)
        mapped = maps.map_batch(Batch(torch.zeros(16, 1), kjt, torch.zeros(16)), step)
        if "t" in mapped.fresh:
            dyn.bags[0].use_fresh(*mapped.fresh["t"])
        ref_kjt = KeyedJaggedTensor(["t"], torch.tensor([row_of[x] for x in ids.tolist()], dtype=torch.int64), lengths)
        out_d, out_r = dyn(mapped.sparse), ref(ref_kjt)
        assert torch.equal(out_d, out_r), f"step {step}"
        target = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(step))
        ((out_d - target) ** 2).sum().backward()
        ((out_r - target) ** 2).sum().backward()
    ix = maps.index
    ids = torch.tensor(list(row_of), dtype=torch.int64)
    slots = ix.lookup(ids)[0]
    rows = torch.tensor(list(row_of.values()))
    dw, ds = dyn.bags[0].storage.read(slots)
    rw, rs = ref.bags[0].storage.read(rows)
    assert torch.equal(dw, rw) and torch.equal(ds, rs)
    assert ix.stats()["t"]["live"] == len(row_of) and ix.stats()["t"]["evicted"] == 0


def _schema(n):
    from tierec.data.dataset import Schema, SparseFeature

    return Schema(["d"], [SparseFeature("t", n, raw=True)])


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("raw") / "data", raw=True, cardinality=400)


DYN = dict(table_kind="dynamic", table_rows=120, admit_count=2, evict="lfu", decay_every=6, log_every=1,
           eval_every=7, checkpoint_every=5)


@pytest.fixture(scope="module")
def dyn_reference(raw_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dynref")
    t = Trainer(cfg(raw_data, out, **DYN))
    return t.fit(), table_rows(t), _losses(out), t.idmaps.stats()


def _losses(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["event"] == "train"], [r["auc"] for r in recs if r["event"] == "eval"]


@pytest.mark.parametrize("tiers", [dict(memory_budget="86KiB", cache_policy="lru"),
                                   dict(memory_budget="118KiB", cache_policy="lookahead", lookahead=20,
                                        prefetch_depth=3, id_index="memory"),
                                   dict(memory_budget="118KiB", cache_policy="lookahead", lookahead=20,
                                        id_index="ssd")])
def test_dynamic_tables_train_bit_identically_on_every_tier(raw_data, tmp_path, dyn_reference, tiers):
    ref_summary, ref_rows, ref_losses, ref_stats = dyn_reference
    assert ref_stats["s0"]["evicted"] > 0 and ref_stats["s0"]["rejected"] > 0  # the policy is exercised
    t = Trainer(cfg(raw_data, tmp_path, **DYN, **tiers))
    summary = t.fit()
    assert {type(tb.storage).__name__ for tb in t.model.embeddings.tables} != {"InMemoryTable"}
    assert _losses(tmp_path) == ref_losses
    assert summary["auc"] == ref_summary["auc"]
    for name, (w, s) in table_rows(t).items():
        assert torch.equal(w, ref_rows[name][0]) and torch.equal(s, ref_rows[name][1]), name


@pytest.mark.parametrize("tiers", [{}, dict(memory_budget="118KiB", cache_policy="lookahead", lookahead=30),
                                   dict(id_index="ssd")])
def test_dynamic_resume_is_exact(raw_data, tmp_path, dyn_reference, tiers):
    """Stopped at step 13 (checkpoints every 5: the index is saved as of step 13 while mapping ran ahead)."""
    _, ref_rows, ref_losses, ref_stats = dyn_reference
    Trainer(cfg(raw_data, tmp_path, max_steps=13, **DYN, **tiers)).fit()
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*/arrays/*.bin"))
    assert "id_index.slot_id.bin" in saved  # the index's arrays: files of their own, not in dense.pt
    t = Trainer(cfg(raw_data, tmp_path, **DYN, **tiers), resume=True)
    assert (t.idmaps.spill is None) == (not tiers)  # a budget of 118 KiB spills the index (auto) 
    t.fit()
    for name, (w, s) in table_rows(t).items():
        assert torch.equal(w, ref_rows[name][0]) and torch.equal(s, ref_rows[name][1]), name
    assert t.idmaps.stats() == ref_stats


def test_eval_command_reads_the_saved_index(raw_data, tmp_path, dyn_reference):
    from tierec.cli import main

    ref_summary = dyn_reference[0]
    Trainer(cfg(raw_data, tmp_path, **DYN)).fit()
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["eval", str(tmp_path)]) == 0
    assert json.loads(buf.getvalue())["auc"] == ref_summary["auc"]


def test_served_dynamic_model_equals_offline_and_counts_unknown_ids(tmp_path):
    """`tierec serve` over a dynamic-table checkpoint (DRAM and SSD tables): /v1/predict takes raw IDs, as ints
    and as decimal strings; an ID the index does not hold reads the default row; /metrics shows the tables."""
    from tierec.data.dataset import Dataset
    from tierec.data.synth import SynthConfig, generate
    from tierec.inference.service import ServeConfig, build_server
    from tierec.train.config import TrainConfig
    from tierec.train.trainer import load_for_eval, load_id_maps

    from test_serve import metrics, serving

    data = tmp_path / "data"
    generate(SynthConfig(rows=6000, num_sparse=3, cardinalities=[3000], num_dense=2, raw_ids=True, seed=2,
                         progress=False), data, progress=False)
    run = tmp_path / "run"
    Trainer(TrainConfig(data=str(data), out=str(run), batch_size=256, progress=False, num_threads=1,
                        table_kind="dynamic", table_rows=800, evict="lfu", decay_every=5, default_row="unknown")).fit()
    ds = Dataset(str(data))
    batch = next(ds.batches("test", 32))
    model, _, _ = load_for_eval(str(run), str(data), "cpu")
    maps = load_id_maps(str(run), ds.schema)
    with torch.no_grad():
        offline = model(batch.dense, maps.lookup_batch(batch).sparse).numpy()
    samples = [{n: float(batch.dense[i, j]) for j, n in enumerate(ds.schema.dense)} for i in range(32)]
    for f in ds.schema.sparse:
        jt = batch.sparse.to_dict()[f.name]
        o = jt.offsets().tolist()
        for i in range(32):
            vals = jt.values[o[i] : o[i + 1]].tolist()
            samples[i][f.name] = [str(v) for v in vals] if i % 2 else vals  # strings: the same raw IDs
    for tables in ("dram", "ssd"):
        cfg = ServeConfig(checkpoint=str(run), data=str(data), tables=tables, warm_rows=0, threads=1)
        with serving(build_server(cfg)) as c:
            r = c.post("/v1/predict", json={"samples": samples})
            assert r.status_code == 200, r.text
            np.testing.assert_array_equal(np.array(r.json()["logits"], np.float32), offline)
            unknown = dict(samples[0], C1=[123456789012345])
            assert c.post("/v1/predict", json={"samples": [unknown]}).status_code == 200
            m = metrics(c)
            live = {s[0]["table"]: s[1] for s in m["tierec_dynamic_rows"] if s[0]["kind"] == "live"}
            assert set(live) == {"C1", "C2", "C3"} and all(0 < v <= 800 for v in live.values())
            reads = {s[0]["table"]: s[1] for s in m["tierec_dynamic_ids_total"] if s[0]["kind"] == "default_reads"}
            assert reads["C1"] >= 1


def test_cli_trains_dynamic_tables_and_refuses_misused_flags(tmp_path, capsys):
    """From the command line: a raw-ID data set, dynamic tables, their figures in the summary and the log;
    --table-rows on a data set of rows is a one-line error (exit 2)."""
    from tierec.cli import main

    data = tmp_path / "d"
    assert main(["data", "synth", "--out", str(data), "--rows", "4000", "--num-sparse", "3", "--raw-ids",
                 "--cardinalities", "5000", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--table-kind", "dynamic",
                 "--table-rows", "600", "--admit-count", "2", "--evict", "lfu", "--decay-every", "4",
                 "--batch-size", "256", "--log-every", "4", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["dynamic"]) == {"C1", "C2", "C3"} and summary["auc"] > 0.5
    assert all(0 < s["live"] <= 600 and s["admitted"] >= s["live"] for s in summary["dynamic"].values())
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any("dynamic" in r for r in recs if r["event"] == "train")
    plain = tmp_path / "p"
    assert main(["data", "synth", "--out", str(plain), "--rows", "2000", "--num-sparse", "2", "--no-progress"]) == 0
    assert main(["train", "--data", str(plain), "--out", str(tmp_path / "x"), "--table-rows", "50",
                 "--no-progress"]) == 2
    assert "--table-rows" in capsys.readouterr().err


L2 = dict(DYN, evict="l2", l2_threshold=0.2, decay_every=6, checkpoint_every=7)


@pytest.fixture(scope="module")
def l2_reference(raw_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("l2ref")
    t = Trainer(cfg(raw_data, out, **L2))
    return t.fit(), table_rows(t), _losses(out), t.idmaps.stats()


def test_l2_sweeps_evict_weak_rows_identically_on_every_tier_and_through_resume(raw_data, tmp_path, l2_reference):
    """--evict l2: the rows measured after every 6th step leave one period later (the map never runs further
    ahead), so the run is the same in memory, behind the look-ahead cache (its window held to 1) and resumed
    mid-way with measured sweeps not yet applied."""
    ref_summary, ref_rows, ref_losses, ref_stats = l2_reference
    assert sum(s["evicted"] for s in ref_stats.values()) > 0
    no_sweeps = Trainer(cfg(raw_data, tmp_path / "big", **dict(L2, l2_threshold=1e-9)))
    no_sweeps.fit()  # nothing measures below the threshold: only the full table's LFU evictions
    assert sum(s["evicted"] for s in no_sweeps.idmaps.stats().values()) < sum(
        s["evicted"] for s in ref_stats.values())
    lfu = Trainer(cfg(raw_data, tmp_path / "lfu", **dict(L2, evict="lfu")))
    lfu.fit()
    assert lfu.idmaps.stats() != ref_stats  # the sweeps change what is evicted
    t = Trainer(cfg(raw_data, tmp_path / "la", memory_budget="118KiB", cache_policy="lookahead", lookahead=20,
                    prefetch_depth=3, **L2))  # window 20 held to 6 - 3 - 2 = 1
    s = t.fit()
    assert _losses(tmp_path / "la") == ref_losses and s["auc"] == ref_summary["auc"]
    Trainer(cfg(raw_data, tmp_path / "res", max_steps=13, **L2)).fit()  # checkpoint at 13: sweeps pending
    r = Trainer(cfg(raw_data, tmp_path / "res", **L2), resume=True)
    r.fit()
    for name, (w, st) in table_rows(r).items():
        assert torch.equal(w, ref_rows[name][0]) and torch.equal(st, ref_rows[name][1]), name
    assert r.idmaps.stats() == ref_stats


def test_l2_config_needs_a_threshold_and_a_long_enough_period(raw_data, tmp_path):
    with pytest.raises(ConfigError, match="l2_threshold"):
        DynamicConfig(capacity=10, evict="l2", decay_every=5)
    with pytest.raises(ConfigError, match="decay-every"):
        Trainer(cfg(raw_data, tmp_path, **dict(L2, decay_every=3)))


@pytest.mark.parametrize("kw", [dict(capacity=61, evict="lfu", decay_every=7, admit_count=2),
                                dict(capacity=46, evict="ttl", ttl_steps=5, decay_every=3, default_row="unknown")])
def test_a_partitioned_table_maps_each_partition_as_a_table_of_its_own(kw):
    """--id-partitions 3: a raw ID's partition is a hash of it; each partition admits and evicts within its
    own capacity exactly as the plain-Python reference of one table, its rows after the earlier partitions'."""
    from dataclasses import replace

    from tierec.storage.dynamic import TableRows
    from tierec.train.idmap import IdMaps, partition_of, split_capacity

    P = 3
    cfg = DynamicConfig(**kw, sketch_width=1 << 20)
    maps = IdMaps({"t": TableRows(cfg.capacity, "dynamic")}, {"t": cfg}, partitions=P)
    caps, bounds = split_capacity(cfg.capacity, P), maps.partition_rows("t")
    assert bounds == [0, caps[0], caps[0] + caps[1], cfg.capacity] and maps.slot_range("t") == (0, cfg.capacity)
    refs = [RefIndex(replace(cfg, capacity=c), _key_of(maps.index, p)) for p, c in enumerate(caps)]
    for step, ids in enumerate(_stream(5), start=1):
        v = torch.from_numpy(ids)
        kjt = KeyedJaggedTensor(["t"], v, torch.ones(v.numel(), dtype=torch.int64))
        mb = maps.map_batch(Batch(torch.zeros(v.numel(), 0), kjt, torch.zeros(v.numel())), step)
        jt = mb.sparse.to_dict()["t"]
        got = torch.full((v.numel(),), -1, dtype=torch.int64)
        got[jt.lengths == 1] = jt.values  # an ID without a row (the zero row) left its bag
        part = partition_of(v, P)
        want = torch.full_like(got, -99)
        fresh_want = []
        for p in range(P):
            sel = (part == p).nonzero().squeeze(1)
            slots, fresh = refs[p].map(ids[sel.numpy()].tolist(), step)
            want[sel] = torch.tensor([s + bounds[p] if s >= 0 else -1 for s in slots], dtype=torch.int64)
            fresh_want += [(s + bounds[p], i) for s, i in fresh]
        assert torch.equal(got, want), step
        fs, fi = mb.fresh.get("t", (torch.empty(0, dtype=torch.int64),) * 2)
        assert sorted(zip(fs.tolist(), fi.tolist(), strict=True)) == sorted(fresh_want), step
    st = maps.stats()["t"]
    assert st["evicted"] == sum(r.stats["evicted"] for r in refs) > 0
    assert st["capacity"] == cfg.capacity and st["live"] == sum(len(r.slot_of) for r in refs)

"""The input pipeline's knobs, profiler, operational model and autotuner (issue #23).

No timing thresholds: stages are slowed down by sleeps far beyond their natural cost where a test needs
a known bottleneck, and the model and the tuner are checked on given costs."""

import json
import logging
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from tierec.cli import main
from tierec.data.autotune import DriftMonitor, TuneBudget, choose
from tierec.data.dataset import Batch, Chunk, Dataset
from tierec.data.loader import (
    READER_STAGES,
    STAGES,
    TRANSFER_STAGES,
    InputControl,
    LoaderSettings,
    StageClock,
    load_group,
)
from tierec.data.opmodel import Machine, StageModel, TrainerCost, predict
from tierec.data.profile import InputProfile, measure_pipeline, profile_stages
from tierec.data.rowgroup import RowGroupColumns
from tierec.data.synth import SynthConfig, generate
from tierec.errors import ConfigError
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """Clustered sessions with user-side multi-hot features: every stage (dedup's inverse KJT too) has work."""
    out = tmp_path_factory.mktemp("input") / "ds"
    generate(SynthConfig(rows=3000, seed=1, num_sparse=6, cardinalities=[100], num_dense=3, multi_hot="poisson:3",
                         user_features=3, session_length=3.0, row_group_size=256, progress=False), out,
             cluster_by="session", cluster_window=1024)
    return Dataset(out)


def _same(a: Batch, b: Batch) -> bool:
    eq = torch.equal
    ok = eq(a.dense, b.dense) and eq(a.labels, b.labels) and a.sparse.keys() == b.sparse.keys()
    ok = ok and eq(a.sparse.values(), b.sparse.values()) and eq(a.sparse.lengths(), b.sparse.lengths())
    if (a.user is None) != (b.user is None):
        return False
    if a.user is not None and b.user is not None:
        ok = ok and eq(a.user.values(), b.user.values()) and eq(a.user.lengths(), b.user.lengths())
        ok = ok and eq(a.user.inverse_indices()[1], b.user.inverse_indices()[1])
    return ok


@pytest.mark.parametrize("settings", [
    LoaderSettings(prefetch=0),
    LoaderSettings(reader_threads=3, prefetch=5, read_groups=3),
    LoaderSettings(reader_threads=2, prefetch=2, batch_workers=2, batch_prefetch=3, cache_bytes=1 << 30),
])
def test_every_setting_yields_the_same_batches(sessions, settings):
    def run(loader, epoch, start):
        return list(sessions.batches("train", 200, shuffle=True, seed=3, epoch=epoch, start_batch=start,
                                     max_rows=2500, dedup=True, loader=loader))

    for epoch, start in ((0, 0), (1, 3), (1, 0)):  # the second pass of epoch 1 comes from the cache
        ref, got = run(None, epoch, start), run(settings, epoch, start)
        assert len(ref) == len(got) > 0 and all(_same(a, b) for a, b in zip(ref, got, strict=True))


def test_a_pass_holds_one_slice_of_a_row_group_at_a_time(sessions):
    """The chunks of a pass are cut from their row group one batch at a time: once the caller lets a chunk go,
    nothing holds it (each has its own copy of its offsets). The pass used to cut all of a group's batches
    at once (~13 MB of offsets for 16 batches of 4096 x 26 features, bench_scale --quick)."""
    import weakref

    refs: list[weakref.ref] = []
    held = []  # at each chunk: the earlier ones still alive
    for c in sessions.chunks("train", 64, shuffle=True, seed=2):
        held.append(sum(r() is not None for r in refs))
        refs.append(weakref.ref(c))
        del c
    assert len(refs) > 20 and not any(held), held


@pytest.fixture(scope="module")
def criteo_like(tmp_path_factory):
    """26 single-ID features and 13 dense ones, row groups of 8192 rows: the shape of bench_scale's data."""
    out = tmp_path_factory.mktemp("input") / "plain"
    generate(SynthConfig(rows=20000, seed=2, num_sparse=26, cardinalities=[5000], num_dense=13, row_group_size=8192,
                         progress=False), out)
    return Dataset(out)


def _same_chunk(a: Chunk, b: Chunk) -> bool:
    arrays = [(a.label, b.label), (a.dense, b.dense), (a.session, b.session), (a.inverse, b.inverse)]
    arrays += [(x, y) for k in a.sparse for x, y in zip(a.sparse[k], b.sparse[k], strict=True)]
    return a.sparse.keys() == b.sparse.keys() and all(
        (x is None and y is None) or (x is not None and y is not None and x.dtype == y.dtype and np.array_equal(x, y))
        for x, y in arrays)


def test_a_row_group_decoded_a_column_at_a_time_is_the_whole_table_shuffled(criteo_like, sessions):
    """The loader decodes, permutes and converts one column at a time (`RowGroupColumns`); the chunk is the one the
    whole decoded table, permuted with ``take``, gives: plain data, and session runs shuffled whole, compact."""
    for ds, compact in ((criteo_like, False), (sessions, True), (sessions, False)):
        plan = ds.read_plan("train", 200, shuffle=True, seed=3, compact=compact)
        for gi, _ in plan.items:
            path, rg, n, entry = plan.groups[gi]
            table = ds._read_group(path, entry, rg)
            if plan.by_session:  # whole runs: the same permutation applied to the decoded table at once
                ref = ds.stage_decode(plan, gi, ds.stage_shuffle(plan, gi, RowGroupColumns.from_table(table)))
            else:
                perm = np.random.default_rng(plan.perms_seed[gi]).permutation(n)
                ref = Chunk.from_arrow(table.take(pa.array(perm)), ds.schema, compact)
            got = load_group(ds, plan, gi, 0)
            assert _same_chunk(got, ref), (ds.root, gi)
            if ds is criteo_like:  # one ID per row: every feature shares one offsets array
                offsets = {id(o) for _, o in got.sparse.values()}
                assert len(offsets) == 1 and np.array_equal(got.sparse["C1"][1], np.arange(n + 1))


def test_a_read_holds_one_column_of_arrow_beside_its_chunk(criteo_like, monkeypatch):
    """While a row group is decoded, Arrow holds the chunk's ID buffers and one more column, never the whole
    decoded group: the loader used to hold the decoded table and its shuffled copy at once (>= 2x the group),
    ~80 MB per read in flight at bench_scale --quick."""
    plan = criteo_like.read_plan("train", 256, shuffle=True, seed=1)
    gi = plan.items[0][0]
    path, rg, _, entry = plan.groups[gi]
    whole = criteo_like._read_group(path, entry, rg).nbytes
    base, peak = pa.total_allocated_bytes(), [0]
    pop = RowGroupColumns.pop

    def watched(self, name):
        col = pop(self, name)
        peak[0] = max(peak[0], pa.total_allocated_bytes() - base)
        return col
    monkeypatch.setattr(RowGroupColumns, "pop", watched)
    chunk = load_group(criteo_like, plan, gi, 0)
    assert len(chunk) == plan.groups[gi][2] and 0 < peak[0] <= 0.75 * whole, (peak[0], whole)


def test_each_reader_stage_keeps_its_own_time_when_the_cache_fills(sessions):
    """Columns are decoded inside ``decode`` and charged back to ``parquet`` and ``shuffle``; a pass that fills the
    decoded cache decodes them all in ``parquet`` instead (the cache holds whole groups). Either way each stage
    keeps its own time: none counted twice, none left at zero."""
    for cache in (0, 1 << 30):
        ctl = InputControl(LoaderSettings(cache_bytes=cache), StageClock())
        t0 = time.perf_counter()
        rows = sum(b.size for b in Dataset(sessions.root).batches("train", 200, shuffle=True, seed=5, loader=ctl))
        wall = time.perf_counter() - t0
        st = ctl.clock.snapshot()["stages"]
        assert rows > 0 and all(st[s]["wall_s"] > 0 and st[s]["rows"] > 0 for s in READER_STAGES), (cache, st)
        assert sum(st[s]["wall_s"] for s in READER_STAGES) <= wall, (cache, st)


def test_settings_are_validated_and_can_change_while_a_pass_runs(sessions):
    with pytest.raises(ConfigError, match="reader_threads"):
        LoaderSettings(reader_threads=0)
    with pytest.raises(ConfigError, match="prefetch"):
        TrainConfig(data="x", input_prefetch=-1)
    assert TrainConfig(data="x", input_cache="64MiB").loader_settings().cache_bytes == 64 << 20
    control = InputControl(LoaderSettings())
    ref = list(sessions.batches("train", 128, shuffle=True, dedup=True))
    got = []
    for i, b in enumerate(sessions.batches("train", 128, shuffle=True, dedup=True, loader=control)):
        got.append(b)
        if i == 2:
            control.settings = LoaderSettings(reader_threads=3, prefetch=6, read_groups=2, batch_workers=2)
        if i == 9:
            control.settings = LoaderSettings(prefetch=0)
    assert len(ref) == len(got) and all(_same(a, b) for a, b in zip(ref, got, strict=True))
    snap = control.clock.snapshot()
    assert set(STAGES) <= set(snap["stages"]) and all(v["rows"] > 0 for v in snap["stages"].values())


def test_every_stage_is_reported_with_positive_rates(sessions):
    extra = [("ids", lambda b: [torch.unique(b.sparse.values())])]
    stages = profile_stages(sessions, batch_size=200, sample_rows=1024, extra=extra)
    assert list(stages) == [*STAGES, *TRANSFER_STAGES, "ids"]
    for name, st in stages.items():
        assert st.rows > 0 and st.wall_s > 0 and 0 < st.rows_per_s < float("inf"), name
        assert st.cpu_s >= 0 and 0 <= st.serial_fraction <= 1
    for name in ("read", "parquet", "decode", "dedup"):
        assert stages[name].bytes > 0 and stages[name].bytes_per_s > 0
    run = measure_pipeline(sessions, LoaderSettings(batch_workers=1), batch_size=200, max_rows=2000)
    assert run.rows > 0 and run.rows_per_s > 0 and run.peak_rss_bytes > 0
    assert set(STAGES) <= set(run.stage_rates())
    prof = InputProfile(str(sessions.root), 200, LoaderSettings(), stages, Machine(2.0, 1 << 30), run,
                        TrainerCost(1e9, 1e-12), group_rows=256)
    text = prof.to_text()
    assert all(name in text for name in stages) and "bottleneck" in text
    json.dumps(prof.to_dict(), default=float)


@pytest.mark.parametrize("slow", ["decode", "dedup"])
def test_the_slowed_stage_is_named_the_bottleneck(sessions, monkeypatch, slow, tmp_path):
    if slow == "decode":
        orig = Dataset.stage_decode

        def stage_decode(self, *a, **kw):
            time.sleep(0.03)  # ~120 us per row of a 256-row group: far beyond any stage's own cost
            return orig(self, *a, **kw)
        monkeypatch.setattr(Dataset, "stage_decode", stage_decode)
    else:
        orig_from = Batch.from_chunk

        def from_chunk(*a, **kw):
            time.sleep(0.03)
            return orig_from(*a, **kw)
        monkeypatch.setattr(Batch, "from_chunk", staticmethod(from_chunk))
    stages = profile_stages(sessions, batch_size=256, sample_rows=1024, concurrency=False, repeats=1)
    run = measure_pipeline(sessions, LoaderSettings(), batch_size=256, max_rows=1536)
    prof = InputProfile(str(sessions.root), 256, LoaderSettings(), stages, Machine(2.0, 1 << 30), run,
                        TrainerCost(1e9, 1e-12), group_rows=256)
    b = prof.bottleneck()
    assert b["stage"] == slow and b["input_bound"]
    assert f"bottleneck: {slow}" in prof.to_text()
    assert prof.plot(tmp_path / "p.png").stat().st_size > 0


def _reader_bound(f: float) -> dict[str, StageModel]:
    return {"read": StageModel("read", 1e-6, 1e-6, f), "parquet": StageModel("parquet", 10e-6, 10e-6, f, 1000),
            "decode": StageModel("decode", 2e-6, 2e-6, f, 1000), "batch": StageModel("batch", 0.1e-6, 0.1e-6),
            "dedup": StageModel("dedup", 1e-6, 1e-6, 0.5, 1000)}


def test_the_model_responds_to_parallelism():
    many = Machine(8.0, 1 << 34)
    one, two, four = (predict(_reader_bound(0.0), LoaderSettings(reader_threads=r, prefetch=r), many).rows_per_s
                      for r in (1, 2, 4))
    assert two == pytest.approx(2 * one) and four > two
    assert predict(_reader_bound(0.0), LoaderSettings(reader_threads=4, prefetch=1), many).rows_per_s == \
        pytest.approx(one)  # one read in flight: one thread busy
    serial = [predict(_reader_bound(1.0), LoaderSettings(reader_threads=r, prefetch=r), many).rows_per_s
              for r in (1, 4)]
    assert serial[1] == pytest.approx(serial[0])  # a wholly serial stage (the GIL) gains nothing
    amdahl = [predict(_reader_bound(0.5), LoaderSettings(reader_threads=r, prefetch=r), many).rows_per_s
              for r in (1, 2)]
    assert amdahl[0] < amdahl[1] < 2 * amdahl[0]
    p = predict(_reader_bound(0.0), LoaderSettings(reader_threads=4, prefetch=4), Machine(1.0, 1 << 34))
    assert p.limit == "cpu" and p.rows_per_s < four  # one core: threads do not add cores
    nopf = predict(_reader_bound(0.0), LoaderSettings(prefetch=0), many, TrainerCost(50_000, 20e-6))
    overlap = predict(_reader_bound(0.0), LoaderSettings(prefetch=1), many, TrainerCost(50_000, 20e-6))
    assert overlap.rows_per_s > nopf.rows_per_s and nopf.limit == "consumer"
    assert predict(_reader_bound(0.0), LoaderSettings(), many).bottleneck == "parquet"


def test_autotune_stays_within_the_budget_and_logs(caplog):
    stages = _reader_bound(0.1)
    budget = TuneBudget(Machine(3.0, 1 << 30), threads=3, rows=100_000, decoded_bytes_per_row=1000, passes=3)
    c = choose(stages, budget, TrainerCost(200_000, 5e-6), group_rows=4096, batch_rows=1024)
    s = c.settings
    assert s.reader_threads + s.batch_workers <= budget.threads + 1
    assert c.prediction.memory_bytes <= budget.machine.memory_bytes
    assert s.reader_threads > 1 and s.prefetch >= s.reader_threads  # reader-bound: more readers
    assert s.cache_bytes >= 100_000 * 1000  # read three times, fits: cached
    naive = predict(stages, LoaderSettings(), budget.machine, TrainerCost(200_000, 5e-6), 4096, 1024)
    assert c.rows_per_s > naive.rows_per_s
    tight = TuneBudget(Machine(3.0, 20 << 20), threads=3, rows=100_000, decoded_bytes_per_row=1000, passes=3)
    t = choose(stages, tight, None, group_rows=4096, batch_rows=1024)
    assert t.settings.cache_bytes == 0 and t.prediction.memory_bytes <= 20 << 20
    # drift: the batch builder gets 20x slower -> the next plan builds batches off the consumer's thread
    mon = DriftMonitor(stages, budget, c, TrainerCost(200_000, 5e-6), 4096, 1024)
    snap = {"stages": {k: {"rows": 0, "wall_s": 0.0} for k in stages}}

    def advance(mult: dict):
        for k, v in snap["stages"].items():
            v["rows"] += 1 << 16
            v["wall_s"] += (1 << 16) * stages[k].s * mult.get(k, 1.0)
        return mon.observe(snap)

    with caplog.at_level(logging.INFO, logger="tierec"):
        assert advance({}) is None and advance({}) is None
        new = advance({"dedup": 20.0})
    assert new is not None and new.settings.batch_workers >= 1
    assert "input autotune: stage rates drifted" in caplog.text


def test_train_profile_input_and_autotune(sessions, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(sessions.root), out=str(out), max_steps=6, batch_size=256, progress=False,
                      embedding_dim=8, bottom_mlp=[8], top_mlp=[8], log_every=2, epochs=2, input="autotune",
                      profile_input=True)
    with caplog.at_level(logging.INFO, logger="tierec"):
        Trainer(cfg).fit()
    assert "input autotune: " in caplog.text
    for name in ("input-profile.txt", "input-profile.json", "input-profile.png"):
        assert (out / "input-profile" / name).stat().st_size > 0
    prof = json.loads((out / "input-profile" / "input-profile.json").read_text())
    assert prof["trainer"]["rows_per_s"] > 0 and prof["bottleneck"]["stage"]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tuned = [r for r in recs if r["event"] == "input_autotune"]
    assert tuned and tuned[0]["reason"] == "start"
    s = LoaderSettings(**tuned[0]["settings"])
    assert s.threads <= max(2, len(__import__("os").sched_getaffinity(0))) + 1
    assert tuned[0]["first_pass"]["memory_bytes"] > 0


def test_cli_profile_bad_path_is_one_line(tmp_path, capsys):
    code = main(["data", "profile", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tierec: error: ") and "does not exist" in err[0]
    code = main(["data", "profile", str(tmp_path), "--batch-size", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--batch-size must be > 0" in err[0]


def test_cli_profile_writes_the_table_and_plot(sessions, tmp_path, capsys):
    code = main(["data", "profile", str(sessions.root), "--out", str(tmp_path / "p"), "--batch-size", "256",
                 "--sample-rows", "512", "--rows", "1024", "--no-train-probe", "--autotune"])
    out = capsys.readouterr().out
    assert code == 0 and "bottleneck" in out and "autotune would choose" in out
    assert (tmp_path / "p" / "input-profile.png").stat().st_size > 0
    np.testing.assert_equal(json.loads((tmp_path / "p" / "input-profile.json").read_text())["batch_size"], 256)

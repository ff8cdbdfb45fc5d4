"""Sharded tables + DDP under torchrun: planner, batch slicing, and real 2-process runs (gloo, localhost)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tierec.data.dataset import Dataset
from tierec.distributed.embedding import ShardView
from tierec.distributed.plan import plan_shards, row_bounds
from tierec.distributed.trainer import slice_batch
from tierec.errors import ConfigError
from tierec.storage.base import InMemoryTable
from tierec.storage.lazy import RowInit
from tierec.storage.plan import TableNeeds
from tierec.storage.ssd import open_table_chain
from tierec.storage.tablefile import read_table_file, write_table_file
from tierec.train import checkpoint as ckpt
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer, evaluate, load_for_eval

# Tolerance of the 2-rank run against one process (float32): the dense gradient is the sum of two
# half-batch gradients instead of one full-batch reduction, so it differs in its last bits (~1e-8
# absolute here); a row-wise table's pooled vector is the sum of two partial sums, and mean pooling
# divides after the exchange (x / n instead of the single process's x * (1 / n) in backward). After 8 steps of
# Adam / row-wise Adagrad the weights differ by < 1e-6; 1e-5 leaves room without hiding a real bug
# (one wrong gradient moves weights by ~lr = 1e-3 .. 5e-2).
ATOL = 1e-5
STEPS = 8
ARGS = ["--batch-size", "250", "--max-steps", str(STEPS), "--num-threads", "1", "--no-progress", "--seed", "3",
        "--sparse-optimizer", "rowwise_adagrad", "--pooling", "mean", "--checkpoint-every", "3"]
SHARDING = '[sharding]\ntables = {s0 = "row", s1 = 1}\ntimeout_s = 60\n'


def torchrun(nproc, argv, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "tierec", "train", *argv]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw)


def test_plan_balances_table_wise_and_goes_row_wise_over_budget():
    t = [TableNeeds("big", 1000, 100, 10), TableNeeds("a", 100, 100, 500), TableNeeds("b", 100, 100, 480),
         TableNeeds("c", 10, 100, 10)]
    shards = plan_shards(t, 2)
    owner = {s.table: s.rank for s in shards}
    assert owner["big"] != owner["a"] and len(shards) == 4  # the two heaviest tables on different ranks
    rw = plan_shards(t, 2, budget_per_rank=50_000)  # "big" is 100 kB: split by rows
    big = [s for s in rw if s.table == "big"]
    assert [(s.rank, s.lo, s.hi) for s in big] == [(0, 0, 500), (1, 500, 1000)]
    pinned = plan_shards(t, 3, overrides={"a": 2, "c": "row"})
    assert [s.rank for s in pinned if s.table == "a"] == [2]
    assert [(s.lo, s.hi) for s in pinned if s.table == "c"] == [(0, 3), (3, 6), (6, 10)]


@pytest.mark.parametrize("overrides, match", [({"nope": 0}, "sharding.tables.nope: no such table"),
                                              ({"a": 2}, "rank 2 does not exist"),
                                              ({"a": "rows"}, "expected a rank number")])
def test_plan_override_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        plan_shards([TableNeeds("a", 10, 8, 1)], 2, overrides=overrides)


def test_sharding_config_is_validated(tmp_path):
    from tierec.train.config import make_config

    f = tmp_path / "c.toml"
    f.write_text('data = "x"\n[sharding]\ntables = {s0 = [1]}\n')
    with pytest.raises(ConfigError, match="sharding"):
        make_config(str(f), {})


def test_slices_of_a_batch_concatenate_to_the_batch(tiny_dataset):
    batch = next(Dataset(tiny_dataset).batches("train", 101))
    b = row_bounds(batch.size, 3)
    parts = [slice_batch(batch, b[r], b[r + 1]) for r in range(3)]
    assert [p.size for p in parts] == [33, 34, 34]
    for key in batch.sparse.keys():
        whole = batch.sparse[key].to_dense()
        assert [x.tolist() for p in parts for x in p.sparse[key].to_dense()] == [x.tolist() for x in whole]
    assert torch.equal(torch.cat([p.dense for p in parts]), batch.dense)


@pytest.mark.parametrize("layout", ["dense", "rowset"])
def test_table_file_loads_into_any_row_split(tmp_path, layout):
    """A checkpoint's table file (every row, or a row set of the written ones) fills the shards of any
    world size (here 4 row-wise ranks)."""
    full = InMemoryTable(10, 3, 1, init=RowInit(0, 0, 10, 3) if layout == "rowset" else None)
    written = torch.tensor([1, 4, 5, 9]) if layout == "rowset" else torch.arange(10)
    full.write(written, torch.arange(30.0).view(10, 3)[written], torch.arange(10.0).view(10, 1)[written])
    files = write_table_file(tmp_path / "t.tbl", full)
    assert ("layout" in files["t.tbl"]) == (layout == "rowset")
    from tierec.distributed.plan import Shard

    b = row_bounds(10, 4)
    for r in range(4):
        s = Shard("t", 0, r, b[r], b[r + 1], 10)
        part = InMemoryTable(s.rows, 3, 1)
        read_table_file(tmp_path / "t.tbl", ShardView(s, part), files["t.tbl"], files.get("t.tbl.ids"))
        assert torch.equal(part.weight, full.weight[s.lo : s.hi]) and torch.equal(part.state, full.state[s.lo : s.hi])


@pytest.fixture(scope="module")
def two_rank_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist2") / "run"
    conf = out.parent / "sharding.toml"
    conf.write_text(SHARDING)
    p = torchrun(2, ["--config", str(conf), "--data", str(tiny_dataset), "--out", str(out), *ARGS])
    log, _ = p.communicate(timeout=240)
    assert p.returncode == 0, log[-3000:]
    assert "sharding plan over 2 rank(s)" in log and "s0.rows-0-100" in log
    return out, log


def checkpoint_rows(c, m, t) -> np.ndarray:
    """Every row of table entry ``t`` of checkpoint ``c`` (dense file, row set or a chain of them), float32
    [rows * width]."""
    f = open_table_chain([(d, x["files"]) for d, x in ckpt.table_chain(c, m)], t["file"], t["num_embeddings"],
                         t["dim"], t["state_dim"])
    w, s = f.read_rows(0, t["num_embeddings"])
    f.close()
    return torch.cat([w, s], 1).numpy().reshape(-1)


def test_two_ranks_match_one_process(tiny_dataset, tmp_path, two_rank_run):
    out2, log = two_rank_run
    summary = json.loads(log[log.index("{\n") : log.rindex("}") + 1])
    assert summary["world_size"] == 2 and summary["step"] == STEPS and summary["samples"] == STEPS * 250
    cfg = TrainConfig(data=str(tiny_dataset), out=str(tmp_path / "one"), batch_size=250, max_steps=STEPS,
                      num_threads=1, progress=False, seed=3, sparse_optimizer="rowwise_adagrad", pooling="mean")
    one = Trainer(cfg).fit()
    c1, c2 = ckpt.resolve_checkpoint(one["checkpoint"]), ckpt.resolve_checkpoint(out2)
    m1, m2 = ckpt.read_manifest(c1), ckpt.read_manifest(c2)
    # the same checkpoint format: same keys, tables and files (row sets; torchrun's are a chain of increments)
    assert set(m1) == set(m2) and m1["tables"] == m2["tables"]
    assert set(m1["files"]) == set(m2["files"])
    d1, d2 = ckpt.load_dense_state(c1, m1), ckpt.load_dense_state(c2, m2)
    assert d1["model"].keys() == d2["model"].keys()
    for k, v in d1["model"].items():
        torch.testing.assert_close(d2["model"][k], v, atol=ATOL, rtol=0, msg=k)
    moved = 0.0
    for t in m1["tables"]:
        a, b = checkpoint_rows(c1, m1, t), checkpoint_rows(c2, m2, t)
        np.testing.assert_allclose(b, a, atol=ATOL, rtol=0, err_msg=t["name"])
        moved = max(moved, float(np.abs(a.reshape(200, -1)[:, :16]).max()))
    assert moved > 0 and summary["auc"] == pytest.approx(one["auc"], abs=1e-4)


def test_two_ranks_with_lookahead_caches_match_one_process(tiny_dataset, tmp_path):
    """Each rank keeps its shards on SSD behind look-ahead caches and runs its own prefetch pipeline
    (a row-wise shard sees only its row range): same weights as one in-memory process."""
    conf = tmp_path / "sharding.toml"
    conf.write_text(SHARDING)
    out2 = tmp_path / "la"
    p = torchrun(2, ["--config", str(conf), "--data", str(tiny_dataset), "--out", str(out2), *ARGS,
                     "--memory-budget", "6KiB", "--cache-policy", "lookahead", "--lookahead", "5"])
    log, _ = p.communicate(timeout=240)
    assert p.returncode == 0, log[-3000:]
    summary = json.loads(log[log.index("{\n") : log.rindex("}") + 1])
    assert summary["prefetch"]["steps"] == STEPS and summary["cache_hit_rate"] is not None
    cfg = TrainConfig(data=str(tiny_dataset), out=str(tmp_path / "one"), batch_size=250, max_steps=STEPS,
                      num_threads=1, progress=False, seed=3, sparse_optimizer="rowwise_adagrad", pooling="mean")
    one = Trainer(cfg).fit()
    c1, c2 = ckpt.resolve_checkpoint(one["checkpoint"]), ckpt.resolve_checkpoint(out2)
    m1, m2 = ckpt.read_manifest(c1), ckpt.read_manifest(c2)
    assert any(p["placement"] == "ssd" and p["policy"] == "lookahead" for p in m2["storage_plan"])
    for t in m1["tables"]:
        a, b = checkpoint_rows(c1, m1, t), checkpoint_rows(c2, m2, t)
        np.testing.assert_allclose(b, a, atol=ATOL, rtol=0, err_msg=t["name"])
    # row-wise SSD shards start lazily from the whole table's initial rows: the base holds the rows touched
    base = ckpt.read_manifest(out2 / "checkpoints" / "step-00000003")
    assert 0 < base["files"]["tables/s0.tbl"]["rows"] < 200


def test_two_rank_checkpoint_evaluates_in_one_process(tiny_dataset, two_rank_run):
    out2, log = two_rank_run
    summary = json.loads(log[log.index("{\n") : log.rindex("}") + 1])
    model, ds, m = load_for_eval(str(out2), device="cpu")
    res = evaluate(model, ds, "test", 512, torch.device("cpu"), progress=False)
    assert m["step"] == STEPS
    assert res["auc"] == pytest.approx(summary["auc"], abs=1e-6)
    assert res["logloss"] == pytest.approx(summary["logloss"], abs=1e-6)


def test_two_rank_checkpoint_is_served(two_rank_run):
    """`tierec serve`'s loader takes a 2-rank checkpoint as it is: same logits as `tierec eval`'s model."""
    from tierec.inference.model_store import ServeOptions, load_model

    out2, _ = two_rank_run
    model, ds, _ = load_for_eval(str(out2))
    b = next(iter(ds.batches("test", 64)))
    with torch.no_grad():
        ref = model(b.dense, b.sparse)
    for tables in ("dram", "ssd"):
        served = load_model(str(out2), ServeOptions(tables=tables, warm_rows=0))
        assert torch.equal(served.forward(b.dense, b.sparse), ref), tables


def test_two_rank_checkpoint_resumes_in_one_process(tiny_dataset, tmp_path, two_rank_run):
    """Stop after 8 steps on 2 ranks, continue to 12 in one process: the same as 12 steps in one process."""
    import shutil

    out2, _ = two_rank_run
    run = tmp_path / "resumed"
    shutil.copytree(out2 / "checkpoints", run / "checkpoints")
    kw = dict(data=str(tiny_dataset), batch_size=250, max_steps=STEPS + 4, num_threads=1, progress=False, seed=3,
              sparse_optimizer="rowwise_adagrad", pooling="mean")
    resumed = Trainer(TrainConfig(out=str(run), **kw), resume=True)
    assert resumed.step == STEPS
    resumed.fit()
    straight = Trainer(TrainConfig(out=str(tmp_path / "straight"), **kw))
    straight.fit()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0, msg=k)
    for ta, tb in zip(straight.model.embeddings.tables, resumed.model.embeddings.tables):
        torch.testing.assert_close(tb.storage.weight, ta.storage.weight, atol=ATOL, rtol=0)
        torch.testing.assert_close(tb.storage.state, ta.storage.state, atol=ATOL, rtol=0)


def _rank_pid(root_pid: int, rank: int) -> int | None:
    """PID of the torchrun worker whose environment has RANK=rank (walks /proc children)."""
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") and pid != root_pid:
                return pid
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return None


def test_killed_rank_names_it_keeps_the_checkpoint_and_resume_continues(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(tiny_dataset), "--out", str(out), "--batch-size", "16", "--checkpoint-every", "5",
            "--num-threads", "1", "--no-progress", "--eval-every", "100000"]
    p = torchrun(2, [*args, "--epochs", "3"])
    deadline = time.time() + 120
    while not (out / "checkpoints" / "LATEST").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pid = _rank_pid(p.pid, 1)
    assert pid is not None and p.poll() is None
    os.kill(pid, signal.SIGKILL)
    log, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    root_cause = log[log.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "SIGKILL" in root_cause, log[-2000:]
    last = ckpt.resolve_checkpoint(out)  # still valid: every file (and link of its chain) matches its manifest
    ckpt.verify_checkpoint(last)
    m = ckpt.read_manifest(last)
    assert 5 <= m["step"] < 750
    p = torchrun(2, [*args, "--resume", "--max-steps", str(m["step"] + 5)])
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 0, log[-3000:]
    assert f"resumed from {last}" in log
    assert json.loads(log[log.index("{\n") : log.rindex("}") + 1])["step"] == m["step"] + 5


def test_an_incremental_chain_loads_into_any_row_split(tmp_path):
    """A full row set, then a delta over it, fill the shards of 3 row-wise ranks (torchrun resuming from
    a chain of a one-process run)."""
    full = InMemoryTable(12, 3, 1, init=RowInit(0, 0, 12, 3))
    full.write(torch.tensor([1, 4, 5, 9]), torch.ones(4, 3), torch.ones(4, 1))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base = write_table_file(tmp_path / "a" / "t.tbl", full)
    full.lazy_rows().take_changed()
    full.write(torch.tensor([4, 10]), torch.full((2, 3), 7.0), torch.full((2, 1), 2.0))
    delta = write_table_file(tmp_path / "b" / "t.tbl", full, delta=True)
    assert delta["t.tbl"]["delta"] and delta["t.tbl"]["rows"] == 2
    from tierec.distributed.plan import Shard

    b = row_bounds(12, 3)
    for r in range(3):
        s = Shard("t", 0, r, b[r], b[r + 1], 12)
        part = InMemoryTable(s.rows, 3, 1)
        read_table_file(tmp_path / "a" / "t.tbl", ShardView(s, part), base["t.tbl"], base["t.tbl.ids"])
        read_table_file(tmp_path / "b" / "t.tbl", ShardView(s, part), delta["t.tbl"], delta["t.tbl.ids"])
        assert torch.equal(part.weight, full.weight[s.lo : s.hi]) and torch.equal(part.state, full.state[s.lo : s.hi])


def test_two_rank_checkpoints_are_row_sets_in_a_chain(two_rank_run):
    """Each rank writes the rows it owns that changed since the last checkpoint; rank 0 joins them into one
    row set per table: the checkpoints at steps 3, 6 and 8 are a base and two increments, verified."""
    from tierec.cli import main

    out2, _ = two_rank_run
    root = out2 / "checkpoints"
    latest = root / (root / "LATEST").read_text().strip()
    m = json.loads((latest / "manifest.json").read_text())
    assert m["step"] == STEPS and m["chain"] == ["step-00000003", "step-00000006"]
    for t in m["tables"]:
        entry = m["files"][t["file"]]
        assert entry["layout"] == "rowset" and entry["delta"] and entry["rows"] > 0, t["name"]
    base = json.loads((root / "step-00000003" / "manifest.json").read_text())
    assert base["chain"] == [] and not any(e.get("delta") for e in base["files"].values())
    assert not (latest / "parts").exists()
    assert main(["checkpoint", "verify", str(latest)]) == 0


@pytest.mark.parametrize("policy", [dict(table_rows=120, evict="lfu", decay_every=3, max_steps=STEPS),
                                    dict(table_rows=300, evict="l2", l2_threshold=0.3, decay_every=5, max_steps=12),
                                    dict(table_rows=121, evict="lfu", decay_every=3, max_steps=STEPS, id_partitions=2)])
def test_two_ranks_with_dynamic_tables_match_one_process(tmp_path, policy):
    """Dynamic tables (admission, LFU eviction; or L2 norm sweeps, whose rows every rank measures in the shards
    it holds) under torchrun: every rank maps the same global batches (an index replica each), the owners
    reset the slots given to new IDs; a row-wise shard too. Same weights, and the same index in the
    checkpoint, as one process."""
    from conftest import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "raw", raw=True, cardinality=400)
    conf = tmp_path / "sharding.toml"
    conf.write_text(SHARDING)
    dyn = ["--table-kind", "dynamic", "--admit-count", "2"]
    for k, v in policy.items():
        dyn += [f"--{k.replace('_', '-')}", str(v)]
    out2 = tmp_path / "two"
    p = torchrun(2, ["--config", str(conf), "--data", str(data), "--out", str(out2), *ARGS, *dyn])
    log, _ = p.communicate(timeout=240)
    assert p.returncode == 0, log[-3000:]
    if policy.get("id_partitions"):  # s0 is sharded on its partitions' bounds (61 + 60 slots), not in halves
        assert "s0.rows-0-61" in log and "s0.rows-61-121" in log, log[-3000:]
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "one"), batch_size=250, num_threads=1,
                      progress=False, seed=3, sparse_optimizer="rowwise_adagrad", pooling="mean",
                      table_kind="dynamic", admit_count=2, **policy)
    one = Trainer(cfg)
    one.fit()
    c2 = ckpt.resolve_checkpoint(out2)
    m2 = ckpt.read_manifest(c2)
    d2 = ckpt.attach_arrays(c2, m2, ckpt.load_dense_state(c2, m2)["id_maps"])
    ix1 = one.idmaps.state_dict()
    st = one.idmaps.stats()["s0"]
    assert 0 < st["evicted"] < st["admitted"]
    if policy["evict"] == "l2":  # the sweeps evict (so the two ranks' gathered sweeps are what matched)
        weak = Trainer(replace(cfg, out=str(tmp_path / "no-sweeps"), l2_threshold=1e-9))
        weak.fit()
        assert weak.idmaps.stats()["s0"]["evicted"] < st["evicted"]
    for f, v in ix1.items():
        if f == "arrays":
            for k, arr in v.items():
                saved = torch.cat([x for _, _, x in d2["arrays"][k].chunks([(0, arr.numel())])])
                assert torch.equal(saved, arr), k
        else:
            assert (torch.equal(d2[f], v) if isinstance(v, torch.Tensor) else d2[f] == v), f
    for t in m2["tables"]:
        mine = next(b for b in one.model.embeddings.bags if b.config.name == t["name"]).storage
        a = torch.cat(mine.read_rows(0, t["num_embeddings"]), 1).numpy().reshape(-1)
        np.testing.assert_allclose(checkpoint_rows(c2, m2, t), a, atol=ATOL, rtol=0, err_msg=t["name"])


def test_two_ranks_train_a_multitask_moe_like_one_process(tmp_path):
    """MMoE with sparse top-2 experts on a click + conversion data set under torchrun: the experts are
    replicated by DDP (an expert no sample of a rank chose has no gradient there), the tables sharded; same
    weights and per-label AUC as one process (without the balancing loss, which each rank takes over its slice)."""
    from tierec.data.synth import SynthConfig, generate

    data = tmp_path / "d"
    generate(SynthConfig(rows=3000, num_sparse=3, cardinalities=[300], num_dense=3, tasks=2, seed=1, progress=False),
             data, progress=False)
    # the balancing loss is each rank's over its slice (as DeepSpeed-MoE computes it per device), a different
    # function of the batch than one process's: off here, so the two runs optimise the same loss
    mtl = ["--model", "mmoe", "--experts", "4", "--expert-top-k", "2", "--expert-mlp", "8", "--tower-mlp", "4",
           "--moe-aux-weight", "0"]
    out2 = tmp_path / "two"
    p = torchrun(2, ["--data", str(data), "--out", str(out2), *ARGS, *mtl])
    log, _ = p.communicate(timeout=240)
    assert p.returncode == 0, log[-3000:]
    summary = json.loads(log[log.index("{\n") : log.rindex("}") + 1])
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "one"), batch_size=250, max_steps=STEPS, num_threads=1,
                      progress=False, seed=3, sparse_optimizer="rowwise_adagrad", pooling="mean", model="mmoe",
                      experts=4, expert_top_k=2, expert_mlp=[8], tower_mlp=[4], moe_aux_weight=0.0)
    one = Trainer(cfg).fit()
    assert set(summary["tasks"]) == {"label", "conversion"}
    for name, t in one["tasks"].items():
        assert summary["tasks"][name]["auc"] == pytest.approx(t["auc"], abs=1e-3), name
    c1, c2 = ckpt.resolve_checkpoint(one["checkpoint"]), ckpt.resolve_checkpoint(out2)
    d1, d2 = ckpt.load_dense_state(c1, ckpt.read_manifest(c1)), ckpt.load_dense_state(c2, ckpt.read_manifest(c2))
    for k, v in d1["model"].items():
        torch.testing.assert_close(d2["model"][k], v, atol=ATOL, rtol=0, msg=k)

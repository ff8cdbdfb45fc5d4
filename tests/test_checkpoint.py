"""Checkpoints: atomic, checksummed, and resume-exact."""

import json

import pytest
import torch

from tierec.errors import CheckpointError, TierecError
from tierec.train import checkpoint as ckpt
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer, load_for_eval


def cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), embedding_dim=8, bottom_mlp=[16], top_mlp=[16], batch_size=256,
                epochs=2, progress=False, log_every=5)
    base.update(kw)
    return TrainConfig(**base)


def weights(trainer):
    tables = {n: (s.weight.clone(), s.state.clone()) for n, s in trainer.tables.items()}
    return trainer.model.state_dict(), tables


def assert_same(a, b):
    (da, ta), (db, tb) = a, b
    for k in da:
        assert torch.equal(da[k], db[k]), k
    for n in ta:
        assert torch.equal(ta[n][0], tb[n][0]) and torch.equal(ta[n][1], tb[n][1]), n


@pytest.mark.parametrize("sparse_optimizer", ["rowwise_adagrad", "adam"])
def test_interrupted_and_resumed_run_is_bit_identical(tiny_dataset, tmp_path, sparse_optimizer):
    full = Trainer(cfg(tiny_dataset, tmp_path / "full", sparse_optimizer=sparse_optimizer))
    s_full = full.fit()
    # 16 batches per epoch: stop mid-way through epoch 2, then resume twice
    Trainer(cfg(tiny_dataset, tmp_path / "cut", sparse_optimizer=sparse_optimizer, max_steps=7)).fit()
    Trainer(cfg(tiny_dataset, tmp_path / "cut", sparse_optimizer=sparse_optimizer, max_steps=21), resume=True).fit()
    resumed = Trainer(cfg(tiny_dataset, tmp_path / "cut", sparse_optimizer=sparse_optimizer), resume=True)
    s_res = resumed.fit()
    assert s_full["step"] == s_res["step"] == 32
    assert_same(weights(full), weights(resumed))
    assert s_full["auc"] == s_res["auc"]


def test_same_seed_same_run_and_seed_matters(tiny_dataset, tmp_path):
    a = Trainer(cfg(tiny_dataset, tmp_path / "a", epochs=1))
    a.fit()
    b = Trainer(cfg(tiny_dataset, tmp_path / "b", epochs=1))
    b.fit()
    assert_same(weights(a), weights(b))
    c = Trainer(cfg(tiny_dataset, tmp_path / "c", epochs=1, seed=1))
    c.fit()
    assert not torch.equal(a.model.top[0].weight, c.model.top[0].weight)


def test_checkpoint_round_trip_and_eval(tiny_dataset, tmp_path):
    t = Trainer(cfg(tiny_dataset, tmp_path / "r", epochs=1))
    summary = t.fit()
    model, ds, manifest = load_for_eval(str(tmp_path / "r"))
    assert manifest["step"] == summary["step"]
    for table in model.embeddings.tables:
        assert torch.equal(table.storage.weight, t.tables[table.config.name].weight)


def test_crash_while_writing_keeps_previous_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    t = Trainer(cfg(tiny_dataset, tmp_path / "r", epochs=1))
    t.fit()
    good = ckpt.resolve_checkpoint(tmp_path / "r")

    def boom(path, storage, **kw):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "write_table_file", boom)
    t.step += 1
    with pytest.raises(OSError):
        t.save()
    assert ckpt.resolve_checkpoint(tmp_path / "r") == good
    assert not [p for p in (tmp_path / "r" / "checkpoints").iterdir() if ".tmp-" in p.name]
    load_for_eval(str(tmp_path / "r"))  # still loads


@pytest.fixture
def saved_run(tiny_dataset, tmp_path):
    Trainer(cfg(tiny_dataset, tmp_path / "r", epochs=1)).fit()
    return tmp_path / "r", ckpt.resolve_checkpoint(tmp_path / "r")


def test_truncated_table_file_is_refused(saved_run):
    run, c = saved_run
    f = next((c / "tables").iterdir())
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_for_eval(str(run))


def test_corrupt_table_file_is_refused(saved_run):
    run, c = saved_run
    f = next((c / "tables").iterdir())
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_for_eval(str(run))


def test_corrupt_dense_state_and_manifest_are_refused(saved_run):
    run, c = saved_run
    d = c / "dense.pt"
    d.write_bytes(d.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_for_eval(str(run))
    (c / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_for_eval(str(run))


def test_resume_without_checkpoint_is_a_clear_error(tiny_dataset, tmp_path):
    with pytest.raises(TierecError, match="no checkpoint"):
        Trainer(cfg(tiny_dataset, tmp_path / "empty"), resume=True)


def test_metrics_log_records(saved_run):
    run, _ = saved_run
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end"
    assert {"train", "eval", "energy"} <= set(events)
    end = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.5 < end["auc"] <= 1 and end["energy"]["method"] in ("measured", "estimated", "partly estimated")


def test_old_checkpoints_are_pruned(tiny_dataset, tmp_path):
    Trainer(cfg(tiny_dataset, tmp_path / "r", epochs=1, checkpoint_every=3, keep_checkpoints=2,
                checkpoint_chain=1)).fit()
    kept = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir() if p.is_dir())
    assert len(kept) == 2 and kept[-1] == "step-00000016"
    # incremental checkpoints: the newest two, and the chain they build on
    Trainer(cfg(tiny_dataset, tmp_path / "i", epochs=1, checkpoint_every=3, keep_checkpoints=2,
                checkpoint_chain=3)).fit()
    root = tmp_path / "i" / "checkpoints"
    kept = sorted(p.name for p in root.iterdir() if p.is_dir())
    needed = set(kept[-2:]) | {n for k in kept[-2:] for n in ckpt.read_manifest(root / k)["chain"]}
    assert set(kept) == needed and len(kept) < 6


def test_checkpoints_and_table_building_are_timed_in_the_metrics_log(tiny_dataset, tmp_path):
    # a table on SSD behind a cache, so building the model creates a table file
    t = Trainer(cfg(tiny_dataset, tmp_path / "r", epochs=1, checkpoint_every=5, keep_checkpoints=10,
                    memory_budget="64KiB", tables={"s0": {"placement": "ssd", "cache_rows": 32}}))
    assert list((tmp_path / "r" / "tables").rglob("s0*.tbl")), "s0 should be an SSD table file"
    assert t.build_s > 0
    t.fit()
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    start = records[0]
    assert start["event"] == "start" and start["build_seconds"] == round(t.build_s, 3) and start["build_seconds"] > 0
    saves = [r for r in records if r["event"] == "checkpoint"]
    assert [r["step"] for r in saves] == [5, 10, 15, 16]  # every 5 steps, and at the end of the 16-step epoch
    for r in saves:
        path = ckpt.resolve_checkpoint(r["path"])
        manifest = ckpt.read_manifest(path)
        assert manifest["step"] == r["step"] and path.name == f"step-{r['step']:08d}"
        assert r["bytes"] == sum(f["bytes"] for f in manifest["files"].values())
        assert r["bytes"] == sum((path / name).stat().st_size for name in manifest["files"])
        assert 0 < r["seconds"] < 60
    steps = [r["step"] for r in records if r["event"] in ("train", "checkpoint")]
    assert steps == sorted(steps)  # each checkpoint is logged when it is written, between the training records

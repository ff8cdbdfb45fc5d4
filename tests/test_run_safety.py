"""Runs that cannot be hijacked or lost (issue #16): checkpoints never run code, a run directory is
claimed by one run, a resume keeps its trajectory, and evaluation never costs the training."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from tierec.cli import main
from tierec.errors import CheckpointError, ConfigError, TierecError
from tierec.train import checkpoint as ckpt
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer, load_for_eval


def cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), embedding_dim=8, bottom_mlp=[16], top_mlp=[16], batch_size=256,
                epochs=1, progress=False, log_every=5)
    return TrainConfig(**{**base, **kw})


class _RunsCode:
    """Unpickling this calls os.system: what a crafted dense.pt could do with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(checkpoint_dir, payload) -> None:
    """Replace dense.pt by ``payload`` and fix the manifest's checksums, as an attacker who can write files can."""
    data = (checkpoint_dir / "dense.pt")
    torch.save(payload, data)
    m = json.loads((checkpoint_dir / "manifest.json").read_text())
    raw = data.read_bytes()
    m["files"]["dense.pt"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    if hasattr(ckpt, "manifest_digest"):
        m["manifest_sha256"] = ckpt.manifest_digest(m)
    (checkpoint_dir / "manifest.json").write_text(json.dumps(m))


def test_a_checkpoint_cannot_run_code_on_load(tiny_dataset, tmp_path):
    run = tmp_path / "r"
    Trainer(cfg(tiny_dataset, run, max_steps=3)).fit()
    c = ckpt.resolve_checkpoint(run)
    marker = tmp_path / "pwned"
    state = torch.load(c / "dense.pt", weights_only=True)
    _plant(c, {**state, "torch_rng": _RunsCode(marker)})
    from tierec.inference.model_store import load_model

    for load in (lambda: load_for_eval(str(run)),  # tierec eval
                 lambda: Trainer(cfg(tiny_dataset, run, max_steps=6), resume=True),  # --resume
                 lambda: load_model(str(run))):  # tierec serve and /v1/admin/reload
        with pytest.raises(CheckpointError, match="refused"):
            load()
        assert not marker.exists(), "loading the checkpoint ran code"


def test_a_clean_checkpoint_loads_with_weights_only(tiny_dataset, tmp_path):
    """Everything a checkpoint holds (Adam state, RNG state, step counters) loads as plain data."""
    run = tmp_path / "r"
    Trainer(cfg(tiny_dataset, run, max_steps=4, dense_optimizer="adam", sparse_optimizer="adam")).fit()
    c = ckpt.resolve_checkpoint(run)
    state = ckpt.load_dense_state(c, ckpt.read_manifest(c))
    assert set(state) == {"model", "dense_optimizer", "torch_rng"}
    t = Trainer(cfg(tiny_dataset, run, max_steps=6, dense_optimizer="adam", sparse_optimizer="adam"), resume=True)
    assert t.step == 4


def test_the_manifests_own_fields_are_checksummed(tiny_dataset, tmp_path):
    run = tmp_path / "r"
    Trainer(cfg(tiny_dataset, run, max_steps=3)).fit()
    c = ckpt.resolve_checkpoint(run)
    m = json.loads((c / "manifest.json").read_text())
    m["batch_in_epoch"] += 1  # a position that would silently skip batches on resume
    (c / "manifest.json").write_text(json.dumps(m, indent=2))
    with pytest.raises(CheckpointError, match="manifest_sha256"):
        Trainer(cfg(tiny_dataset, run, max_steps=6), resume=True)


def test_no_held_out_rows_means_no_evaluation_not_a_lost_run(shared_data, tmp_path, capsys):
    data, run = tmp_path / "d", tmp_path / "r"
    assert main(["data", "convert", str(shared_data / "criteo_sample.csv"), "--format", "criteo-csv", "--out",
                 str(data), "--num-embeddings", "500", "--test-fraction", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(run), "--batch-size", "32", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 7 and "auc" not in summary  # 200 rows / 32, a checkpoint, no evaluation
    assert ckpt.read_manifest(ckpt.resolve_checkpoint(run))["step"] == 7
    # --eval-data: a separate test set (here all of another conversion's rows)
    other = tmp_path / "d2"
    assert main(["data", "convert", str(shared_data / "criteo_sample.csv"), "--format", "criteo-csv", "--out",
                 str(other), "--num-embeddings", "500", "--test-fraction", "0", "--seed", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r2"), "--batch-size", "32",
                 "--eval-data", str(other), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 <= summary["auc"] <= 1
    ev = [json.loads(x) for x in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    assert [e["rows"] for e in ev if e["event"] == "eval"] == [200]


def test_a_failing_evaluation_never_costs_the_training(tiny_dataset, tmp_path, monkeypatch):
    def broken(self):
        raise TierecError("test split unreadable (simulated)")

    monkeypatch.setattr(Trainer, "evaluate", broken)
    summary = Trainer(cfg(tiny_dataset, tmp_path / "r", eval_every=4)).fit()
    assert summary["step"] == 16 and "auc" not in summary
    assert ckpt.read_manifest(ckpt.resolve_checkpoint(tmp_path / "r"))["step"] == 16
    errors = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for e in errors if e["event"] == "eval" and "error" in e) == 5  # steps 4, 8, 12, 16 + end


def test_an_existing_run_is_not_silently_restarted(tiny_dataset, tmp_path):
    run = tmp_path / "r"
    Trainer(cfg(tiny_dataset, run, max_steps=3)).fit()
    first = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="--resume to continue it or --overwrite"):
        Trainer(cfg(tiny_dataset, run, max_steps=5))
    assert (run / "metrics.jsonl").read_text() == first and ckpt.read_manifest(ckpt.resolve_checkpoint(run))["step"] == 3
    Trainer(cfg(tiny_dataset, run, max_steps=5), overwrite=True).fit()
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "start"] == [0]  # only the new run's records
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step-00000005"]


def test_two_runs_cannot_share_a_run_directory(tiny_dataset, tmp_path):
    run = tmp_path / "r"
    first = Trainer(cfg(tiny_dataset, run, max_steps=3))
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        Trainer(cfg(tiny_dataset, run, max_steps=3))
    code = ("from tierec.train.trainer import Trainer; from tierec.train.config import TrainConfig; "
            f"Trainer(TrainConfig(data={str(tiny_dataset)!r}, out={str(run)!r}, progress=False))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode != 0 and "another tierec train is using this run directory" in p.stderr
    first.fit()  # releases the directory
    Trainer(cfg(tiny_dataset, run, max_steps=5), resume=True).fit()


def test_resume_refuses_a_changed_trajectory(tiny_dataset, tmp_path):
    run = tmp_path / "r"
    Trainer(cfg(tiny_dataset, run, max_steps=3)).fit()
    with pytest.raises(ConfigError, match=r"batch_size: 256 in the checkpoint, 128 now.*sparse_lr"):
        Trainer(cfg(tiny_dataset, run, max_steps=6, batch_size=128, sparse_lr=0.1), resume=True)
    t = Trainer(cfg(tiny_dataset, run, max_steps=6, batch_size=128), resume=True, allow_config_change=True)
    assert t.fit()["step"] == 6
    # settings that do not change what is learned may differ: the tiers are exact, epochs only move the end
    Trainer(cfg(tiny_dataset, run, max_steps=8, batch_size=128, memory_budget="20KiB", epochs=3),
            resume=True).fit()


def test_resume_refuses_other_training_data(tiny_dataset, tmp_path):
    from conftest import write_tiny_dataset

    other = write_tiny_dataset(tmp_path / "other", seed=5)
    run = tmp_path / "r"
    Trainer(cfg(tiny_dataset, run, max_steps=3)).fit()
    with pytest.raises(ConfigError, match="data: the train split"):
        Trainer(cfg(other, run, max_steps=6), resume=True)


def test_eval_works_from_another_directory(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_dataset.parent)
    Trainer(cfg(tiny_dataset.name, tmp_path / "r", max_steps=3)).fit()  # a relative --data
    monkeypatch.chdir(tmp_path)
    model, ds, m = load_for_eval(str(tmp_path / "r"))
    assert ds.root.resolve() == tiny_dataset.resolve() and os.path.isabs(m["config"]["data"])


def test_schema_mismatch_says_what_differs(tiny_dataset, tmp_path):
    from conftest import write_tiny_dataset

    other = write_tiny_dataset(tmp_path / "other", tables=3, cardinality=300)
    Trainer(cfg(tiny_dataset, tmp_path / "r", max_steps=2)).fit()
    with pytest.raises(ConfigError, match=r"sparse features \[s0, s1, s2, s3\] vs \[s0, s1, s2\].*num_embeddings 200 vs 300"):
        load_for_eval(str(tmp_path / "r"), str(other))


def test_a_diverging_run_stops_naming_the_step(tiny_dataset, tmp_path):
    run = tmp_path / "r"
    t = Trainer(cfg(tiny_dataset, run, sparse_optimizer="sgd", sparse_lr=1e30, checkpoint_every=1))
    with pytest.raises(TierecError, match=r"step \d+: the training loss is nan .*last checkpoint \(.*step-"):
        t.fit()
    last = ckpt.read_manifest(ckpt.resolve_checkpoint(run))
    assert last["step"] >= 1  # the checkpoints before the divergence stay; the NaN step is not saved
    state = ckpt.load_dense_state(ckpt.resolve_checkpoint(run), last)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_unknown_table_settings_are_refused(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="tables.C99: the data set has no sparse feature 'C99'"):
        Trainer(cfg(tiny_dataset, tmp_path / "r", tables={"C99": {"placement": "ssd"}}))


def test_no_dense_features_trains_without_warnings(tmp_path, recwarn):
    from tierec.data.dataset import Chunk, DatasetWriter, Schema, SparseFeature
    import numpy as np

    schema = Schema([], [SparseFeature("a", 50), SparseFeature("b", 50)])
    w = DatasetWriter(tmp_path / "d", schema)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        n = 300
        sp = {k: (rng.integers(0, 50, n), np.arange(n + 1)) for k in ("a", "b")}
        w.splits[split].write(Chunk(rng.integers(0, 2, n).astype(np.float32), np.zeros((n, 0), np.float32), sp))
    w.close()
    Trainer(cfg(tmp_path / "d", tmp_path / "r")).fit()
    assert not [str(x.message) for x in recwarn if "zero-element" in str(x.message)]

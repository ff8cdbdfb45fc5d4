"""Incremental checkpoints (issue #18 item 2): deltas over a base, read as a chain everywhere, compacted,
kept by retention, and safe against kill -9 at any moment."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tierec.errors import CheckpointError
from tierec.storage.ssd import SsdTable, open_table_chain
from tierec.train import checkpoint as ckpt
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer, evaluate, load_for_eval


def cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), embedding_dim=8, bottom_mlp=[16], top_mlp=[16], batch_size=128,
                epochs=1, progress=False, log_every=5, plan_batches=4, checkpoint_every=5, keep_checkpoints=2)
    base.update(kw)
    return TrainConfig(**base)


def rows_of(c: ckpt.Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row of table ``name`` as checkpoint ``c`` holds it (its chain read in place)."""
    m = ckpt.read_manifest(c)
    t = next(t for t in m["tables"] if t["name"] == name)
    f = open_table_chain([(d, mm["files"]) for d, mm in ckpt.table_chain(c, m)], t["file"], t["num_embeddings"],
                         t["dim"], t["state_dim"])
    try:
        return f.read_rows(0, t["num_embeddings"])
    finally:
        f.close()


def step_dirs(run):
    return sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir() and ".tmp-" not in p.name)


@pytest.mark.parametrize("budget", [None, "6KiB"])
def test_deltas_hold_the_changed_rows_and_every_reader_sees_the_same_tables(tiny_dataset, tmp_path, budget):
    run = tmp_path / "r"
    t = Trainer(cfg(tiny_dataset, run, memory_budget=budget, keep_checkpoints=1))
    summary = t.fit()
    dirs = step_dirs(run)
    manifests = [ckpt.read_manifest(d) for d in dirs]
    assert len(dirs) >= 4 and not manifests[0]["chain"]  # keep=1, yet the whole chain of the newest stays
    assert manifests[-1]["chain"] == [d.name for d in dirs[:-1]]
    live = {n: s.read_rows(0, s.num_embeddings) for n, s in t.tables.items()}
    for name in live:
        for a, b in zip(dirs, dirs[1:], strict=False):  # a delta holds exactly the rows that changed (and more)
            wa, sa = rows_of(a, name)
            wb, sb = rows_of(b, name)
            changed = np.flatnonzero(((wa != wb).any(1) | (sa != sb).any(1)).numpy())
            held = np.fromfile(b / "tables" / f"{name}.tbl.ids", np.int64)
            assert np.isin(changed, held).all() and changed.size > 0
            entry = ckpt.read_manifest(b)["files"][f"tables/{name}.tbl"]
            assert entry["delta"] and entry["rows"] == held.size
        w, s = rows_of(dirs[-1], name)  # the chain read in place = the trainer's tables
        assert torch.equal(w, live[name][0]) and torch.equal(s, live[name][1]), name
    model, ds, _ = load_for_eval(str(run))  # eval: loaded (memory) or opened in place (SSD plan)
    res = evaluate(model, ds, "test", 512, torch.device("cpu"), progress=False)
    assert res["auc"] == summary["auc"]
    assert ckpt.verify_checkpoint(dirs[-1])["links"] == [d.name for d in dirs]


def test_resume_from_the_middle_of_a_chain_is_bit_identical(tiny_dataset, tmp_path):
    full = Trainer(cfg(tiny_dataset, tmp_path / "full", epochs=2))
    full.fit()
    want = {n: s.read_rows(0, s.num_embeddings) for n, s in full.tables.items()}
    part = Trainer(cfg(tiny_dataset, tmp_path / "part", epochs=2, max_steps=17, checkpoint_chain=100))
    part.fit()
    assert ckpt.read_manifest(ckpt.resolve_checkpoint(tmp_path / "part"))["chain"]  # resuming from a delta
    again = Trainer(cfg(tiny_dataset, tmp_path / "part", epochs=2, checkpoint_chain=100), resume=True)
    again.fit()
    for n, (w, s) in want.items():
        got = again.tables[n].read_rows(0, again.tables[n].num_embeddings)
        assert torch.equal(got[0], w) and torch.equal(got[1], s), n
    last = ckpt.resolve_checkpoint(tmp_path / "part")
    assert ckpt.read_manifest(last)["chain"][0] == "step-00000005"  # the resumed run extended the same chain


def test_a_chain_reaches_its_limit_then_starts_a_new_base_and_retention_frees_the_old(tiny_dataset, tmp_path):
    run = tmp_path / "r"
    Trainer(cfg(tiny_dataset, run, epochs=2, checkpoint_chain=3, keep_checkpoints=1)).fit()
    names = [d.name for d in step_dirs(run)]
    chains = {n: ckpt.read_manifest(run / "checkpoints" / n)["chain"] for n in names}
    latest = ckpt.resolve_checkpoint(run).name
    assert set(names) == set(chains[latest]) | {latest}  # nothing kept but what the newest needs
    assert len(chains[latest]) <= 2


def test_compaction_folds_the_chain_into_one_full_checkpoint(tiny_dataset, tmp_path):
    run = tmp_path / "r"
    t = Trainer(cfg(tiny_dataset, run, memory_budget="6KiB"))
    t.fit()
    before = ckpt.resolve_checkpoint(run)
    assert ckpt.read_manifest(before)["chain"]
    r = subprocess.run([sys.executable, "-m", "tierec", "checkpoint", "compact", str(run), "--keep", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    after = ckpt.resolve_checkpoint(run)
    m = ckpt.read_manifest(after)
    assert after.name == before.name + "-full" and m["chain"] == [] and m["step"] == t.step
    assert [d.name for d in step_dirs(run)] == [after.name]  # the chain it replaced is pruned (--keep 1)
    for n, st in t.tables.items():
        w, s = rows_of(after, n)
        live = st.read_rows(0, st.num_embeddings)
        assert torch.equal(w, live[0]) and torch.equal(s, live[1]), n
    r = subprocess.run([sys.executable, "-m", "tierec", "checkpoint", "list", str(run)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "full" in r.stdout and "LATEST" in r.stdout
    resumed = Trainer(cfg(tiny_dataset, run, epochs=2, memory_budget="6KiB"), resume=True)
    resumed.fit()
    assert ckpt.read_manifest(ckpt.resolve_checkpoint(run))["chain"][0] == after.name


def test_a_missing_or_corrupt_link_is_named(tiny_dataset, tmp_path):
    run = tmp_path / "r"
    Trainer(cfg(tiny_dataset, run, keep_checkpoints=5)).fit()
    dirs = step_dirs(run)
    f = dirs[1] / "tables" / "s0.tbl"
    raw = bytearray(f.read_bytes())
    raw[3] ^= 0x40
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{dirs[1].name}/tables/s0\.tbl: chunk 0"):
        ckpt.verify_checkpoint(dirs[-1])
    r = subprocess.run([sys.executable, "-m", "tierec", "checkpoint", "verify", str(run)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "s0.tbl: chunk 0" in r.stderr and "Traceback" not in r.stderr
    import shutil

    shutil.rmtree(dirs[0])
    with pytest.raises(CheckpointError, match=rf"chain names '{dirs[0].name}'"):
        load_for_eval(str(run))


def test_a_failed_save_keeps_its_changes_for_the_next(tiny_dataset, tmp_path, monkeypatch):
    run = tmp_path / "r"
    t = Trainer(cfg(tiny_dataset, run, max_steps=10))
    t.fit()
    real = ckpt.write_table_file
    calls = []

    def flaky(path, storage, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(path, storage, **kw)

    monkeypatch.setattr(ckpt, "write_table_file", flaky)
    monkeypatch.setattr(t, "log", type("NoLog", (), {"write": lambda self, *a, **k: None})())  # fit() closed it
    for tb in t.model.embeddings.tables:  # change some rows, as a training step would
        ids = torch.arange(0, 7)
        w, s = tb.storage.read(ids)
        tb.storage.write(ids, w + 1, s)
    t.step += 1
    with pytest.raises(OSError):
        t.save()
    monkeypatch.setattr(ckpt, "write_table_file", real)
    t.step += 1
    c = t.save()
    for n, st in t.tables.items():
        w, s = rows_of(c, n)
        live = st.read_rows(0, st.num_embeddings)
        assert torch.equal(w, live[0]) and torch.equal(s, live[1]), n


KILL_SCRIPT = """
import sys
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer
cfg = TrainConfig(data=sys.argv[1], out=sys.argv[2], embedding_dim=8, bottom_mlp=[16], top_mlp=[16], batch_size=64,
                  epochs=50, progress=False, log_every=50, plan_batches=4, checkpoint_every=1, keep_checkpoints=2,
                  memory_budget="6KiB", num_threads=1)
Trainer(cfg, resume=sys.argv[3] == "1").fit()
"""


def test_kill_9_at_any_moment_leaves_the_last_published_checkpoint_intact(tiny_dataset, tmp_path):
    """SIGKILL a training run that checkpoints every step (mostly deltas) at random moments, resume it,
    repeat: every time, the newest published checkpoint and its chain verify and load."""
    run = tmp_path / "r"
    rng = np.random.default_rng(0)
    resumed = False
    kills = 0
    for _ in range(6):
        p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tiny_dataset), str(run), "1" if resumed else "0"],
                             stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and ckpt.latest_or_none(run) is None:
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.2, 1.5)))
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        kills += 1
        latest = ckpt.resolve_checkpoint(run)
        assert ckpt.verify_checkpoint(latest)["links"][-1] == latest.name
        resumed = True
        lock = run / ".lock"
        assert lock.exists()
    assert kills == 6
    load_for_eval(str(run))


def test_resume_links_the_checkpoint_below_the_ssd_files_instead_of_copying(tiny_dataset, tmp_path):
    """--resume with SSD tables: the checkpoint's row sets are hard-linked under tables/.resume and read
    below the fresh working files (copy-on-write): nothing is written at resume, pruning the original
    checkpoints later changes nothing, and the run ends bit-identical to an uninterrupted one."""
    kw = dict(epochs=2, memory_budget="6KiB", checkpoint_chain=3, keep_checkpoints=1)
    full = Trainer(cfg(tiny_dataset, tmp_path / "full", **kw))
    full.fit()
    want = {n: s.read_rows(0, s.num_embeddings) for n, s in full.tables.items()}
    Trainer(cfg(tiny_dataset, tmp_path / "part", max_steps=22, **kw)).fit()
    again = Trainer(cfg(tiny_dataset, tmp_path / "part", **kw), resume=True)
    ssd = [st.backing for st in again.tables.values() if isinstance(getattr(st, "backing", None), SsdTable)]
    assert ssd and all(s.older is not None and s.stats()["rows_written"] == 0 for s in ssd)
    links = tmp_path / "part" / "tables" / ".resume"
    assert sorted(p.name for p in links.iterdir()) == ckpt.read_manifest(ckpt.resolve_checkpoint(tmp_path / "part"))[
        "chain"] + [ckpt.resolve_checkpoint(tmp_path / "part").name]
    again.fit()  # prunes the checkpoints it resumed from (keep 1, chain of 3): the links keep their files
    for n, (w, s) in want.items():
        got = again.tables[n].read_rows(0, again.tables[n].num_embeddings)
        assert torch.equal(got[0], w) and torch.equal(got[1], s), n


def test_checkpoint_commands_refuse_bad_paths_in_one_line(tmp_path):
    for args in (["list", str(tmp_path / "nope")], ["verify", str(tmp_path / "nope")],
                 ["compact", str(tmp_path)], ["compact", str(tmp_path), "--keep", "0"]):
        r = subprocess.run([sys.executable, "-m", "tierec", "checkpoint", *args], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, (args, r.stderr)

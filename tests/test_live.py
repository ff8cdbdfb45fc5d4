"""Live row updates (`tierec serve --follow`, `tierec.inference.live`): a served model brought to a training
run's newer checkpoints in place equals that checkpoint loaded offline, in DRAM and from the SSD tier, and a
real server following a run that trains meanwhile answers every request with one checkpoint's scores."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import json_samples
from test_serve import metrics, serving

from tierec.data.dataset import Batch, Dataset
from tierec.data.synth import SynthConfig, generate
from tierec.inference.live import RowOverlay, _Collector, read_publication
from tierec.inference.model_store import ServeOptions, load_model
from tierec.inference.service import ServeConfig, build_server
from tierec.train import checkpoint as ckpt
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer


def test_overlay_and_collector_keep_the_newest_row():
    rng = np.random.default_rng(0)
    parts, ref = [], {}
    col = _Collector(1000, 4, 1)
    for _ in range(5):  # writes overlap: the last value of each row wins
        ids = np.unique(rng.integers(0, 1000, 200))
        w = rng.standard_normal((ids.size, 4)).astype(np.float32)
        parts.append((ids, w))
        col.write(torch.from_numpy(ids), torch.from_numpy(w), torch.zeros(ids.size, 1))
        ref.update({int(i): r for i, r in zip(ids, w, strict=True)})
    ids, w = col.newest()
    assert ids.tolist() == sorted(ref)
    assert np.array_equal(w.numpy(), np.stack([ref[i] for i in sorted(ref)]))
    ov = RowOverlay(300, 4)
    g = torch.tensor([5, 900, 17])
    assert ov.put(g, torch.ones(3, 4)) and ov.put(torch.tensor([17, 2]), torch.full((2, 4), 2.0))
    fetched = torch.zeros(5, 4)
    ov.patch(torch.tensor([1, 2, 5, 17, 900]), fetched)
    assert fetched[:, 0].tolist() == [0.0, 2.0, 1.0, 2.0, 1.0]
    assert not ov.put(torch.arange(1000, 1300), torch.zeros(300, 4)) and ov.size == 4  # full: nothing changed


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A DLRM trained 12 steps, checkpoints every 4 as one chain of deltas (base at 4, deltas at 8 and 12)."""
    root = tmp_path_factory.mktemp("live")
    data = root / "data"
    generate(SynthConfig(rows=6000, num_sparse=4, cardinalities=[800], num_dense=3, seed=2, progress=False), data,
             progress=False)
    cfg = TrainConfig(data=str(data), out=str(root / "run"), batch_size=256, progress=False, num_threads=1,
                      checkpoint_every=4, checkpoint_chain=8, keep_checkpoints=8, max_steps=12, eval_every=0)
    Trainer(cfg).fit()
    return root, data, cfg


def _step(run_dir: Path, n: int) -> Path:
    return run_dir / "checkpoints" / f"step-{n:08d}"


def _batch(data: Path):
    b = next(Dataset(str(data)).batches("test", 128))
    return b.dense, b.sparse


@pytest.mark.parametrize("tables", ["dram", "ssd"])
def test_applied_publications_equal_the_newer_checkpoint(run, tables):
    root, data, _ = run
    rd = root / "run"
    m12 = ckpt.read_manifest(_step(rd, 12))
    assert [x for x in m12["chain"]] == ["step-00000004", "step-00000008"]
    opts = ServeOptions(tables=tables, cache_fraction=0.05, warm_rows=0)
    served = load_model(str(_step(rd, 4)), opts)
    want = load_model(str(_step(rd, 12)), ServeOptions(tables="dram"))
    dense, sparse = _batch(data)
    before = served.forward(dense, sparse)
    assert not torch.equal(before, want.forward(dense, sparse))  # training changed the scores
    pub = read_publication(_step(rd, 12), m12, _step(rd, 4))
    assert pub is not None and pub.links == ["step-00000008", "step-00000012"] and pub.num_rows > 0
    assert isinstance(m12["saved_at"], float)
    assert served.apply_publication(pub)
    assert served.step == 12
    assert torch.equal(served.forward(dense, sparse), want.forward(dense, sparse))  # bit for bit
    if tables == "dram":
        for a, b in zip(served.model.embeddings.bags, want.model.embeddings.bags, strict=True):
            assert torch.equal(a.storage.weight, b.storage.weight), a.config.name
    # a checkpoint that is not a chain of deltas over the served one: None (load it in full)
    assert read_publication(_step(rd, 4), ckpt.read_manifest(_step(rd, 4)), _step(rd, 12)) is None


def test_a_following_server_serves_each_checkpoint_whole_while_training_goes_on(run, tmp_path):
    """The server starts on a run's first checkpoint; training resumes and writes two more; concurrent
    requests never fail, and every answer is exactly the offline scores of the step it reports."""
    root, data, cfg = run
    src = root / "run"
    rd = tmp_path / "run"
    Trainer(TrainConfig(**{**cfg.to_dict(), "out": str(rd), "max_steps": 4, "sharding": cfg.sharding})).fit()
    dense, sparse = _batch(data)
    samples = json_samples(Dataset(str(data)).schema, Batch(dense[:16], _first(sparse, 16), torch.zeros(16)))
    answers, errors, stop = [], [], threading.Event()
    app = build_server(ServeConfig(checkpoint=str(rd), data=str(data), tables="ssd", cache_fraction=0.05,
                                   warm_rows=0, threads=1, max_batch=16, follow=True, follow_every=0.2))
    with serving(app) as c:
        def hammer():
            import httpx

            with httpx.Client(base_url=c.url, timeout=30) as h:
                while not stop.is_set():
                    r = h.post("/v1/predict", json={"samples": samples})
                    (answers if r.status_code == 200 else errors).append(r.json() if r.status_code == 200 else r.text)

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        Trainer(TrainConfig(**{**cfg.to_dict(), "out": str(rd), "sharding": cfg.sharding}), resume=True).fit()
        deadline = time.monotonic() + 60
        while c.get("/healthz").json()["ranker"]["step"] != 12:
            assert time.monotonic() < deadline, "the server did not reach step 12"
            time.sleep(0.1)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
        m = metrics(c)
    assert not errors and answers
    kinds = {lab["kind"]: v for lab, v in m["tierec_live_updates_total"]}
    assert kinds.get("delta", 0) >= 1 and sum(v for _, v in m["tierec_live_rows_total"]) > 0
    assert sum(v for lab, v in m["tierec_live_lag_seconds_count"]) >= 1
    offline = {}
    for step in sorted({a["step"] for a in answers}):
        lm = load_model(str(_step(rd, step)), ServeOptions(tables="dram"))
        offline[step] = lm.forward(dense[:16], _first(sparse, 16)).numpy()
    assert 12 in offline and len(offline) >= 2
    for a in answers:
        assert np.array_equal(np.array(a["logits"], np.float32), offline[a["step"]]), a["step"]
    assert np.array_equal(offline[12], load_model(str(_step(src, 12)), ServeOptions(tables="dram")).forward(
        dense[:16], _first(sparse, 16)).numpy())  # the same training as the fixture's uninterrupted run


def _first(kjt, n):
    from tierec.sparse import KeyedJaggedTensor

    keys, vals, lens = [], [], []
    for k, jt in kjt.to_dict().items():
        keys.append(k)
        o = int(jt.offsets()[n])
        vals.append(jt.values[:o])
        lens.append(jt.lengths[:n])
    return KeyedJaggedTensor(keys, torch.cat(vals), torch.cat(lens))


def test_follow_settings_are_checked_at_the_edge(run, capsys):
    from tierec.cli import main

    root, _, _ = run
    assert main(["serve", str(root / "run"), "--follow", "--follow-every", "0"]) == 2
    assert "follow_every must be > 0" in capsys.readouterr().err
    assert main(["serve", str(root / "run"), "--follow", "--retriever", str(root / "run")]) == 2
    assert "--follow updates the ranker only" in capsys.readouterr().err
    assert main(["serve", str(root / "run"), "--follow-overlay-rows", "-1"]) == 2

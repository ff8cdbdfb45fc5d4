"""Dense weights off-device (`tierec serve --dense-budget`): a model's large dense layers in a weight file,
streamed in layer by layer with read-ahead; the logits equal the all-in-memory model's bit for bit."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from test_serve import metrics, serving

from tierec.cli import main
from tierec.data.dataset import Dataset
from tierec.data.synth import SynthConfig, generate
from tierec.inference.dense_stream import DenseSettings, dense_bytes, dense_layers
from tierec.inference.model_store import ServeOptions, load_model
from tierec.inference.service import ServeConfig, build_server
from tierec.storage.weightfile import WeightFileError
from tierec.train import checkpoint as ckpt
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer

# layers of 64 KiB and more are streamed: DLRM's top MLP (31 -> 512 -> 256 -> 1), DCNv2's cross layers (192 x 192)
# and top MLP (192 -> 256 -> 1)
MODELS = {"dlrm": dict(top_mlp=[512, 256]),
          "dcnv2": dict(model="dcnv2", embedding_dim=32, cross_layers=2, top_mlp=[256])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    data = root / "data"
    generate(SynthConfig(rows=3000, num_sparse=5, cardinalities=[500], num_dense=3, seed=2, progress=False), data,
             progress=False)
    out = {"root": root, "data": str(data)}
    for name, kw in MODELS.items():
        Trainer(TrainConfig(data=str(data), out=str(root / name), batch_size=256, progress=False, num_threads=1,
                            eval_batch_size=4096, max_steps=6, checkpoint_every=3, **kw)).fit()
        out[name] = str(root / name)
    return out


def _batch(runs, n=64):
    b = next(Dataset(runs["data"]).batches("test", n))
    return b.dense, b.sparse


def _forward(lm, dense, sparse):
    with torch.no_grad():
        return lm.forward(dense, sparse)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_streamed_forward_equals_in_memory_at_every_budget(runs, kind):
    dense, sparse = _batch(runs)
    plain = load_model(runs[kind], ServeOptions(tables="dram"))
    ref = _forward(plain, dense, sparse)
    total = dense_bytes(plain.model)
    big = [x for x in dense_layers(plain.model) if x.nbytes >= 64 << 10]
    assert len(big) >= 2
    budgets = {"0": 0, "one layer": max(x.nbytes for x in big), "half": total // 2, "all": total}
    for label, budget in budgets.items():
        for depth in (0, 2) if label in ("0", "half") else (2,):
            lm = load_model(runs[kind], ServeOptions(tables="dram", dense=DenseSettings(budget, depth)))
            try:
                if label == "all":
                    assert lm.dense is None  # fits: nothing streamed
                else:
                    assert lm.dense is not None
                    st = lm.dense.stats()
                    assert st["streamed_layers"] >= 1 and st["streamed_bytes"] > 0
                    assert st["io"] in ("direct", "cached")
                    if label == "0":
                        assert st["streamed_layers"] == len(big)  # nothing pinned
                    for x in lm.dense.layers:  # the streamed weights are not in memory between batches
                        assert all(p.numel() == 0 for _, p in x.params)
                for _ in range(3):  # the same numbers batch after batch (read ahead across batches)
                    assert torch.equal(_forward(lm, dense, sparse), ref), (kind, label, depth)
                if lm.dense is not None:
                    st = lm.dense.stats()
                    assert st["read_bytes"] >= 3 * st["file_bytes"]  # read ahead: the next batch's too
                    if not depth:
                        assert st["read_bytes"] == 3 * st["file_bytes"]
                    assert st["resident_bytes"] == total - st["streamed_bytes"] + st["buffer_bytes"]
                    if depth:
                        assert st["demand_reads"] == 0  # every layer was read ahead
            finally:
                lm.close()


def test_live_update_rewrites_the_streamed_layers(runs):
    """A publication's dense state reaches the streamed layers (blocks rewritten in place): the logits equal the
    in-memory model given the same state."""
    dense, sparse = _batch(runs)
    path = ckpt.resolve_checkpoint(runs["dlrm"])
    older = sorted(path.parent.glob("step-*"))[0]
    state = ckpt.load_dense_state(older, ckpt.read_manifest(older))["model"]
    plain = load_model(runs["dlrm"], ServeOptions(tables="dram"))
    plain.model.load_state_dict(state)
    lm = load_model(runs["dlrm"], ServeOptions(tables="dram", dense=DenseSettings(0, 2)))
    try:
        _forward(lm, dense, sparse)  # reads in flight when the update comes
        lm.dense.load_state(state)
        assert torch.equal(_forward(lm, dense, sparse), _forward(plain, dense, sparse))
        bad = dict(state)
        bad.pop(next(iter(bad)))
        with pytest.raises(RuntimeError, match="dense state"):
            lm.dense.load_state(bad)
    finally:
        lm.close()


@pytest.mark.parametrize("depth", [0, 2])
def test_a_corrupt_weight_file_is_detected(runs, depth):
    dense, sparse = _batch(runs, 8)
    lm = load_model(runs["dcnv2"], ServeOptions(tables="dram", dense=DenseSettings(0, depth)))
    try:
        _forward(lm, dense, sparse)
        wf = lm.dense.wf
        foff, _ = wf.blocks[len(wf.blocks) // 2]
        with open(wf.path, "r+b") as f:  # one flipped byte in a streamed layer
            f.seek(foff + 100)
            b = f.read(1)
            f.seek(foff + 100)
            f.write(bytes([b[0] ^ 0x40]))
        with pytest.raises(WeightFileError, match=r"block \d+ .*crc32"):
            for _ in range(2):  # a block read ahead before the damage is used once more
                _forward(lm, dense, sparse)
    finally:
        path = lm.dense.wf.path
        lm.close()
    assert not path.exists()  # the weight file goes with the model


def test_server_with_a_dense_budget_answers_as_the_plain_one_under_concurrent_requests(runs):
    """Two real servers side by side, one streaming every large layer of the DCNv2; concurrent clients. Each
    request is one batch (max batch = its 8 samples), so the answers must be the same float32 numbers."""
    ds = Dataset(runs["data"])
    b = next(ds.batches("test", 256))
    by_key = b.sparse.to_dict()
    samples = []
    for i in range(256):
        s = {name: float(b.dense[i, j]) for j, name in enumerate(ds.schema.dense)}
        for f in ds.schema.sparse:
            o = by_key[f.name].offsets()
            s[f.name] = by_key[f.name].values[int(o[i]) : int(o[i + 1])].tolist()
        samples.append(s)
    requests = [samples[a : a + 8] for a in range(0, 256, 8)]
    base = dict(checkpoint=runs["dcnv2"], data=runs["data"], tables="dram", warm_rows=0, threads=1, max_batch=8)
    weight_files = set(Path(tempfile.gettempdir()).glob("tierec-dense-*.weights"))
    with serving(build_server(ServeConfig(**base))) as plain, \
            serving(build_server(ServeConfig(**base, dense_budget="0", dense_prefetch=2))) as streamed:
        async def load(url):
            async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
                rs = await asyncio.gather(*(ac.post("/v1/predict", json={"samples": r}) for r in requests))
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200][:1]
            return [r.json()["logits"] for r in rs]

        async def both():
            return await asyncio.gather(load(plain.url), load(streamed.url))

        a, s = asyncio.run(both())
        assert np.array_equal(np.array(a, np.float32), np.array(s, np.float32))
        bad = streamed.post("/v1/predict", json={"samples": [{"I1": "high"}]})
        assert bad.status_code == 422 and bad.json()["field"] == "samples[0].I1"
        assert streamed.post("/v1/predict", content=b"{not json",
                             headers={"content-type": "application/json"}).status_code == 400
        assert streamed.post("/v1/predict", json={"samples": samples[:8]}).json()["logits"] == a[0]
        m = metrics(streamed)
        where = {lab["where"]: v for lab, v in m["tierec_dense_bytes"]}
        assert where["streamed"] > 0 and where["buffers"] > 0 and where["budget"] == 0
        layers = {lab["where"]: v for lab, v in m["tierec_dense_layers"]}
        assert layers["streamed"] >= 3
        assert m["tierec_dense_read_bytes_total"][0][1] >= len(requests) * where["streamed"]
        assert "tierec_dense_wait_seconds_total" in m
        assert {lab["kind"] for lab, _ in m["tierec_dense_layer_reads_total"]} == {"ahead", "demand", "discarded"}
        assert "tierec_dense_bytes" not in metrics(plain)
        assert set(Path(tempfile.gettempdir()).glob("tierec-dense-*.weights")) > weight_files  # streamed from a file
    # a server that stops removes its streamed weights' file (it used to stay behind in the temp directory)
    assert set(Path(tempfile.gettempdir()).glob("tierec-dense-*.weights")) <= weight_files


@pytest.mark.parametrize("flags, says", [
    (["--dense-budget", "lots"], "--dense-budget"),
    (["--dense-budget", "-5"], "--dense-budget"),
    (["--dense-budget", "64MiB", "--dense-prefetch", "-1"], "--dense-prefetch"),
    (["--dense-budget", "64MiB", "--dense-dir", "/nonexistent/dir"], "--dense-dir"),
    (["--dense-prefetch", "4"], "--dense-budget"),
])
def test_bad_dense_flags_exit_2_with_one_line(runs, capsys, flags, says):
    assert main(["serve", runs["dlrm"], "--tables", "dram", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err

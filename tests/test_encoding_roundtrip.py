"""Train/serve skew (issue #16, item 4): raw rows of real files go through `tierec data convert`,
training and `tierec serve`, and the server scores the raw rows exactly as the offline model scores
the converted ones -- the manifest records how each feature was encoded and serving follows it."""

import numpy as np
import pyarrow.csv as pcsv
import pytest
import torch

from test_serve import serving
from tierec.data.convert import convert, is_test_row
from tierec.data.dataset import Dataset
from tierec.inference.service import ServeConfig, build_server
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer, load_for_eval


def train_small(data, out):
    Trainer(TrainConfig(data=str(data), out=str(out), embedding_dim=8, bottom_mlp=[8], top_mlp=[8], batch_size=64,
                        max_steps=12, progress=False, num_threads=1)).fit()


def offline_logits(run, n):
    model, ds, _ = load_for_eval(str(run), device="cpu")
    batch = next(ds.batches("test", n))
    with torch.no_grad():
        return model(batch.dense, batch.sparse).numpy()


def served_logits(run, samples):
    cfg = ServeConfig(checkpoint=str(run), tables="dram", warm_rows=0, threads=1)
    with serving(build_server(cfg)) as c:
        r = c.post("/v1/predict", json={"samples": samples})
        assert r.status_code == 200, r.text
        return np.array(r.json()["logits"], np.float32)


def test_raw_criteo_rows_round_trip(shared_data, tmp_path):
    """Criteo: hex strings hashed as text, integer features through log1p -- from the raw CSV values."""
    src = shared_data / "criteo_sample.csv"
    data = tmp_path / "data"
    convert(src, data, "criteo-csv", num_embeddings=500, test_fraction=0.3, progress=False)
    schema = Dataset(data).schema
    assert schema.dense_transform == "log1p" and {f.encoding for f in schema.sparse} == {"hash-string"}
    train_small(data, tmp_path / "run")
    table = pcsv.read_csv(src, convert_options=pcsv.ConvertOptions(
        column_types={c: "string" for c in ["label", *[f"C{i}" for i in range(1, 27)]]}))
    rows = table.to_pylist()
    test = np.flatnonzero(is_test_row(np.arange(2, len(rows) + 2), 0.3, 0))  # line 1 is the header
    samples = []
    for i in test:
        raw = rows[i]
        samples.append({k: v for k, v in raw.items() if k != "label" and v is not None and v != ""})
    got = served_logits(tmp_path / "run", samples)
    np.testing.assert_array_equal(got, offline_logits(tmp_path / "run", len(test)))


@pytest.mark.parametrize("id_encoding", ["hash", "identity"])
def test_raw_movielens_rows_round_trip(ml100k_inter, tmp_path, id_encoding):
    """MovieLens: integer user and item IDs as the file holds them. Hashed, an integer is its text (not a
    row, which is what served 45%-overlapping top-10 lists before); identity, the ID is the row (no
    collisions: every item its own row)."""
    data = tmp_path / "data"
    convert(ml100k_inter, data, "movielens", test_fraction=0.1, progress=False, id_encoding=id_encoding,
            num_embeddings=16384 if id_encoding == "hash" else None)
    schema = Dataset(data).schema
    items = np.loadtxt(ml100k_inter, skiprows=1, usecols=(0, 1, 3), dtype=np.int64)
    if id_encoding == "identity":
        assert [f.num_embeddings for f in schema.sparse] == [int(items[:, 0].max()) + 1, int(items[:, 1].max()) + 1]
    train_small(data, tmp_path / "run")
    test = np.flatnonzero(is_test_row(np.arange(2, len(items) + 2), 0.1, 0))[:200]
    samples = [{"user_id": int(u), "item_id": int(i), "hour": int(ts // 3600 % 24)} for u, i, ts in items[test]]
    got = served_logits(tmp_path / "run", samples)
    np.testing.assert_array_equal(got, offline_logits(tmp_path / "run", len(test)))
    if id_encoding == "identity":  # an ID outside the table is refused, not hashed into a stranger's row
        cfg = ServeConfig(checkpoint=str(tmp_path / "run"), tables="dram", warm_rows=0, threads=1)
        with serving(build_server(cfg)) as c:
            r = c.post("/v1/predict", json={"samples": [{"user_id": 1, "item_id": 10**6}]})
            assert r.status_code == 422 and r.json()["field"] == "samples[0].item_id", r.text

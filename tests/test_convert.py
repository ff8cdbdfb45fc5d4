"""`tierec data convert`: raw text -> tierec data set (Python API and CLI)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tierec.data.convert import convert, is_test_row
from tierec.data.dataset import Chunk, Dataset
from tierec.data.hashing import hash_strings
from tierec.errors import DataError, TierecError

REPO = Path(__file__).resolve().parents[1]


def _sample_rows() -> list[list[str]]:
    for p in (REPO.parent / "shared" / "data" / "criteo_sample.csv", REPO / "shared" / "data" / "criteo_sample.csv"):
        if p.exists():
            with open(p, newline="") as f:
                return list(csv.reader(f))[1:]
    pytest.fail("criteo_sample.csv not found under ../shared/data or shared/data")


@pytest.fixture(scope="module")
def criteo_tsv(tmp_path_factory) -> Path:
    """A Criteo Kaggle-style TSV: the 200 sample rows repeated 5 times (1000 rows)."""
    rows = _sample_rows() * 5
    path = tmp_path_factory.mktemp("criteo") / "train.txt"
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return path


def _all_rows(ds: Dataset, split: str) -> Chunk | None:
    chunks = list(ds.chunks(split, 4096))
    return Chunk.concat(chunks) if chunks else None


# --------------------------------------------------------------------------- Criteo round trip
def test_criteo_tsv_round_trip(tmp_path, criteo_tsv):
    out = tmp_path / "ds"
    m = convert(criteo_tsv, out, "criteo-tsv", test_fraction=0.2, seed=3, rows_per_file=300, row_group_size=128,
                num_embeddings=5000, progress=False, block_size=8192)
    ds = Dataset(out)
    ds.verify()
    assert ds.splits == ["train", "test"]
    n_train, n_test = ds.num_rows("train"), ds.num_rows("test")
    assert n_train + n_test == 1000 and 120 <= n_test <= 280
    assert len(m["splits"]["train"]["files"]) >= 3  # rolled over every 300 rows
    assert all(len(f["sha256"]) == 64 for s in m["splits"].values() for f in s["files"])
    src = m["source"]
    assert src["format"] == "criteo-tsv" and src["rows_read"] == 1000 and src["bad_rows_skipped"] == 0
    assert src["path"] == str(criteo_tsv.resolve()) and src["options"]["seed"] == 3
    assert src["options"]["test_fraction"] == 0.2
    assert [f.num_embeddings for f in ds.schema.sparse][:3] == [1460, 583, 5000]
    assert json.loads((out / "manifest.json").read_text()) == m

    # The rows come back in input order within each split, with the right values.
    rows = _sample_rows() * 5
    lines = np.arange(1, 1001)
    test = is_test_row(lines, 0.2, 3)
    for split, sel in (("train", ~test), ("test", test)):
        got = _all_rows(ds, split)
        want = [rows[i] for i in np.flatnonzero(sel)]
        assert len(got) == len(want)
        np.testing.assert_array_equal(got.label, [float(r[0]) for r in want])
        i2 = [0.0 if r[2] == "" else math.log1p(max(float(r[2]), 0)) for r in want]
        np.testing.assert_allclose(got.dense[:, 1], i2, rtol=1e-6)
        c1 = hash_strings(pa.array([r[14] for r in want]), 1460)
        v, o = got.sparse["C1"]
        assert (np.diff(o) == 1).all()
        np.testing.assert_array_equal(v, c1)

    # Batches (what training reads) cover every row once.
    seen = sum(b.size for b in ds.batches("train", 64))
    assert seen == n_train
    b = next(ds.batches("test", 16))
    assert b.dense.shape == (16, 13) and b.labels.shape == (16,)


def test_split_is_deterministic_given_seed(tmp_path, criteo_tsv):
    ms = [convert(criteo_tsv, tmp_path / f"d{i}", "criteo-tsv", seed=s, progress=False, num_embeddings=1000)
          for i, s in enumerate((7, 7, 8))]
    sha = lambda m: [f["sha256"] for s in m["splits"].values() for f in s["files"]]  # noqa: E731
    assert sha(ms[0]) == sha(ms[1])
    assert ms[0]["splits"]["test"]["rows"] == ms[1]["splits"]["test"]["rows"]
    assert sha(ms[0]) != sha(ms[2])  # another seed holds out other rows
    lines = np.arange(1, 200_001)
    frac = is_test_row(lines, 0.1, 0).mean()
    assert abs(frac - 0.1) < 0.005
    assert (is_test_row(lines, 0.1, 0) != is_test_row(lines, 0.1, 1)).any()
    assert not is_test_row(lines, 0.0, 0).any()
    # Rewriting an existing data set replaces its shards.
    m = convert(criteo_tsv, tmp_path / "d0", "criteo-tsv", seed=7, max_rows=100, progress=False)
    assert m["source"]["rows_read"] == 100 and Dataset(tmp_path / "d0").num_rows("train") + \
        Dataset(tmp_path / "d0").num_rows("test") == 100
    assert sorted(p.name for p in (tmp_path / "d0" / "train").iterdir()) == ["part-00000.parquet"]


def test_convert_bad_rows_stop_or_are_counted(tmp_path):
    rows = _sample_rows()[:50]
    rows[20] = rows[20][:10]  # line 21: too few fields
    rows[33][5] = "1.5.5"  # line 34: I5 not a number
    path = tmp_path / "bad.tsv"
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        convert(path, tmp_path / "out", "criteo-tsv", progress=False)
    assert e.value.line == 21 and str(e.value).startswith(f"{path}:21: expected 40 fields, got 10")
    assert not (tmp_path / "out" / "manifest.json").exists()  # a failed conversion is not a data set
    m = convert(path, tmp_path / "out", "criteo-tsv", skip_bad_rows=True, progress=False)
    assert m["source"]["bad_rows_skipped"] == 2 and m["source"]["rows_read"] == 48
    assert m["splits"]["train"]["rows"] + m["splits"]["test"]["rows"] == 48
    assert m["source"]["bad_row_examples"][1].startswith(f"{path}:34: I5 is not a number: '1.5.5'")


def test_convert_user_errors(tmp_path, criteo_tsv):
    with pytest.raises(TierecError, match="no such file"):
        convert(tmp_path / "missing.tsv", tmp_path / "o", "criteo-tsv")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(TierecError, match="empty input"):
        convert(empty, tmp_path / "o", "criteo-tsv")
    with pytest.raises(TierecError, match="unknown format"):
        convert(criteo_tsv, tmp_path / "o", "tsv")
    with pytest.raises(TierecError, match="must be > 0"):
        convert(criteo_tsv, tmp_path / "o", "criteo-tsv", num_embeddings=-5)
    with pytest.raises(TierecError, match="test-fraction"):
        convert(criteo_tsv, tmp_path / "o", "criteo-tsv", test_fraction=1.5)
    other = tmp_path / "notempty"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(TierecError, match="holds other files"):
        convert(criteo_tsv, other, "criteo-tsv")


# --------------------------------------------------------------------------- CLI
def test_cli_bad_file_exits_2_with_one_line(tmp_path, capsys):
    from tierec.cli import main

    path = tmp_path / "bad.tsv"
    path.write_text("0\t1\t2\n")
    rc = main(["data", "convert", str(path), "--format", "criteo-tsv", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"tierec: error: {path}:1: expected 40 fields, got 3")
    rc = main(["data", "convert", str(tmp_path / "nope.tsv"), "--format", "criteo-tsv", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no such file" in err[0]


def test_cli_convert_summary_and_skip_bad_rows(tmp_path, capsys):
    from tierec.cli import main

    rows = _sample_rows()[:100]
    rows[50][0] = "yes"
    path = tmp_path / "t.tsv"
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    out = tmp_path / "ds"
    rc = main(["data", "convert", str(path), "--format", "criteo-tsv", "--out", str(out), "--skip-bad-rows",
               "--table-sizes", ",".join(["100"] * 26), "--test-fraction", "0.25", "--seed", "1"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "wrote 99 rows" in lines[0] and "bad rows skipped: 1" in lines[0]
    assert "rows/s" in lines[0]
    ds = Dataset(out)
    assert ds.manifest["source"]["bad_rows_skipped"] == 1
    assert [f.num_embeddings for f in ds.schema.sparse] == [100] * 26


def test_cli_libsvm_with_field_map(tmp_path, capsys):
    from tierec.cli import main

    path = tmp_path / "a.svm"
    path.write_text("".join(f"{i % 2} 1:{i} 5:1 {10 + i % 7}:1\n" for i in range(200)))
    fm = tmp_path / "fields.yaml"
    fm.write_text("dense:\n  count: 1\nsparse:\n  flag: 5\n  bucket: {keys: '10-16', num_embeddings: 7}\n")
    rc = main(["data", "convert", str(path), "--format", "libsvm", "--field-map", str(fm), "--out",
               str(tmp_path / "ds"), "--num-embeddings", "64"])
    assert rc == 0, capsys.readouterr().err
    ds = Dataset(tmp_path / "ds")
    assert ds.schema.dense == ["count"] and ds.schema.sparse_names == ["flag", "bucket"]
    assert [f.num_embeddings for f in ds.schema.sparse] == [64, 7]
    rows = Chunk.concat([c for s in ds.splits for c in ds.chunks(s, 1000)])
    assert len(rows) == 200 and rows.label.sum() == 100
    assert (np.diff(rows.sparse["bucket"][1]) == 1).all()
    assert ds.manifest["source"]["options"]["field_map"] == str(fm)


# --------------------------------------------------------------------------- MovieLens
def test_movielens_u_data(tmp_path):
    rng = np.random.default_rng(0)
    n = 500
    users, items = rng.integers(1, 50, n), rng.integers(1, 300, n)
    ratings, ts = rng.integers(1, 6, n), rng.integers(874_724_710, 893_286_638, n)
    path = tmp_path / "u.data"
    path.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in zip(users, items, ratings, ts)))
    m = convert(path, tmp_path / "ds", "movielens", progress=False, num_embeddings=1000)
    ds = Dataset(tmp_path / "ds")
    assert ds.schema.session_key == "user_id" and ds.schema.dense == ["hour"]
    assert [(f.name, f.side) for f in ds.schema.sparse] == [("user_id", "user"), ("item_id", "item")]
    assert m["source"]["options"]["rating_threshold"] == 4.0
    test = is_test_row(np.arange(1, n + 1), 0.1, 0)
    got = _all_rows(ds, "train")
    np.testing.assert_array_equal(got.label, (ratings[~test] >= 4).astype(np.float32))
    np.testing.assert_array_equal(got.sparse["user_id"][0], hash_strings(pa.array(users[~test].astype(str)), 1000))
    assert got.session is not None and len(np.unique(got.session)) == len(np.unique(users[~test]))
    b = next(ds.batches("train", 32))
    assert b.session is not None and b.session.shape == (32,)


def test_movielens_100k_from_recbole(tmp_path, ml100k_inter):
    ratings = np.loadtxt(ml100k_inter, skiprows=1, usecols=2)
    assert len(ratings) == 100_000
    m = convert(ml100k_inter, tmp_path / "ml", "movielens", progress=False, table_sizes="user_id=2000,item_id=4000")
    ds = Dataset(tmp_path / "ml")
    assert ds.num_rows("train") + ds.num_rows("test") == 100_000
    assert 9_000 < ds.num_rows("test") < 11_000
    assert m["source"]["rows_read"] == 100_000 and m["source"]["bad_rows_skipped"] == 0
    assert [f.num_embeddings for f in ds.schema.sparse] == [2000, 4000]
    labels = sum(float(c.label.sum()) for s in ds.splits for c in ds.chunks(s, 20_000))
    assert labels == (ratings >= 4).sum() == 55_375
    first = next(ds.chunks("train", 1))  # line 2 of the file: 196 242 3 881250949
    if is_test_row(np.array([2]), 0.1, 0)[0]:
        first = next(ds.chunks("test", 1))
    assert first.label[0] == 0
    assert first.sparse["user_id"][0][0] == hash_strings(pa.array(["196"]), 2000)[0]
    m3 = convert(ml100k_inter, tmp_path / "ml3", "movielens", progress=False, rating_threshold=3)
    assert m3["splits"]["train"]["rows"] == m["splits"]["train"]["rows"]  # same split, other labels


def _run_cli(*args: str) -> "subprocess.CompletedProcess":
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "tierec", *args], capture_output=True, text=True, timeout=120,
                          env=env, errors="replace")


def test_cli_garbage_and_header_only_exit_2_without_abort(tmp_path):
    """No reader thread is left running at exit: exit code 2 and one error line, never SIGABRT or a hang."""
    import gzip as _gzip

    rng = np.random.default_rng(0)
    garbage = tmp_path / "x.bin"
    garbage.write_bytes(rng.bytes(20 << 20))  # big enough that a read-ahead thread would still be reading
    gz = tmp_path / "x.tsv.gz"
    gz.write_bytes(_gzip.compress(rng.bytes(8 << 20), compresslevel=1)[: 5 << 20])
    header = tmp_path / "h.csv"
    header.write_text(",".join(["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]) + "\n")
    for path, fmt in ((garbage, "criteo-tsv"), (gz, "criteo-tsv"), (header, "criteo-csv"), (garbage, "criteo-csv")):
        proc = _run_cli("data", "convert", str(path), "--format", fmt, "--out", str(tmp_path / "out"))
        err = proc.stderr.strip().splitlines()
        errors = [line for line in err if " INFO " not in line and " WARNING " not in line]
        assert proc.returncode == 2, (path.name, fmt, proc.returncode, err[-3:])
        assert len(errors) == 1 and errors[0].startswith(f"tierec: error: {path}"), (path.name, fmt, err)
        assert "terminate called" not in proc.stderr

"""Data sets with several binary labels per sample: storage, readers, clustering, synth --tasks,
synth --multi-hot mlperf, convert --num-labels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tierec.cli import main
from tierec.data.cluster import recluster
from tierec.data.convert import convert
from tierec.data.dataset import Chunk, Dataset, DatasetWriter, Schema, SparseFeature, file_checksums
from tierec.data.synth import (
    CONVERSION_RATE,
    MLPERF_MULTI_HOT,
    SynthConfig,
    Synthesizer,
    generate,
    iter_chunks,
    write_criteo_tsv,
)
from tierec.errors import ConfigError, DataError, TierecError
from tierec.fsio import sha256_file
from tierec.train.metrics import roc_auc

LABELS = ["click", "conversion", "like"]


# --------------------------------------------------------------------------- storage and readers
def _expected_labels(rid: np.ndarray) -> np.ndarray:
    """float32 [n, 3]: the labels of rows ``rid`` (a pure function of the row ID; conversion <= click)."""
    h = (rid.astype(np.int64) * 2654435761) % 1000
    click = h % 3 == 0
    return np.stack([click, click & (h % 2 == 0), h % 5 == 0], 1).astype(np.float32)


def _write_three_label_set(root: Path, rows: int = 3000) -> Schema:
    """Sessions of 1..6 rows; u0/u1 user-side (constant within a session), i0 item-side multi-hot;
    dense column 0 is the row ID (exact in float32), so every row can be found again."""
    rng = np.random.default_rng(5)
    schema = Schema(["rid", "x"], [SparseFeature("u0", 50, side="user"), SparseFeature("u1", 30, side="user"),
                                   SparseFeature("i0", 100)], session_key="user", labels=list(LABELS))
    w = DatasetWriter(root, schema, row_group_size=256, rows_per_file=1024)
    start = 0
    for split, n in (("train", rows), ("test", rows // 5)):
        lens = rng.integers(1, 7, size=n)
        sess = np.repeat(np.arange(lens.size), lens)[:n] + start
        start = int(sess[-1]) + 1
        rid = np.arange(n) + (0 if split == "train" else rows)
        sparse = {}
        for name, card in (("u0", 50), ("u1", 30)):
            per = rng.integers(0, card, size=int(sess.max()) + 1)
            sparse[name] = (per[sess], np.arange(n + 1, dtype=np.int64))
        il = rng.integers(0, 3, size=n)
        sparse["i0"] = (rng.integers(0, 100, size=int(il.sum())), np.concatenate([[0], np.cumsum(il)]).astype(np.int64))
        dense = np.stack([rid, rng.normal(size=n)], 1).astype(np.float32)
        w.splits[split].write(Chunk(_expected_labels(rid), dense, sparse, sess.astype(np.int64)))
    w.close(source={"generator": "tests/test_multilabel.py"})
    return schema


def _check_rows(labels: np.ndarray, dense: np.ndarray) -> None:
    assert labels.dtype == np.float32 and labels.shape == (len(dense), 3)
    np.testing.assert_array_equal(labels, _expected_labels(dense[:, 0]))


def test_three_labels_round_trip_through_writer_readers_and_clustering(tmp_path):
    schema = _write_three_label_set(tmp_path / "d")
    ds = Dataset(tmp_path / "d")
    assert ds.schema.labels == LABELS and ds.schema.num_tasks == 3 and ds.schema == schema
    assert ds.schema.arrow_schema().names[:3] == LABELS
    assert pq.read_schema(next((tmp_path / "d" / "train").glob("*.parquet"))).names[:3] == LABELS

    # plain chunks, storage order
    c = Chunk.concat(list(ds.chunks("train", 1000)))
    assert c.label.shape == (3000, 3)
    _check_rows(c.label, c.dense)
    np.testing.assert_array_equal(c.dense[:, 0], np.arange(3000))

    # shuffled batches: every row's labels travel with it; start_batch resumes exactly; max_rows
    kw = dict(shuffle=True, seed=3, epoch=1)
    full = list(ds.batches("train", 128, **kw))
    assert all(b.labels.shape == (b.size, 3) and b.labels.dtype == torch.float32 for b in full)
    seen = np.concatenate([b.dense[:, 0].numpy() for b in full])
    assert sorted(seen.tolist()) == list(range(3000)) and not np.array_equal(seen, np.arange(3000))
    for b in full:
        _check_rows(b.labels.numpy(), b.dense.numpy())
    resumed = list(ds.batches("train", 128, start_batch=7, **kw))
    assert len(resumed) == len(full) - 7
    for a, b in zip(full[7:], resumed, strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.dense, b.dense)
    capped = list(ds.batches("train", 100, max_rows=250, **kw))
    assert [b.size for b in capped] == [100, 100, 50] and capped[-1].labels.shape == (50, 3)
    assert ds.batches("train", 100, max_rows=250, **kw).__next__().to("cpu").labels.shape == (100, 3)

    # deduplicated batches with user-side inverse KJTs: the same rows and labels
    plain = list(ds.batches("test", 64))
    dedup = list(ds.batches("test", 64, dedup=True))
    assert all(b.user is not None for b in dedup)
    for a, b in zip(plain, dedup, strict=True):
        assert torch.equal(a.labels, b.labels) and b.labels.shape == (b.size, 3)
        fa, fb = a.full_sparse(), b.full_sparse()
        for k in ("u0", "u1", "i0"):
            assert torch.equal(fa[k].values, fb[k].values) and torch.equal(fa[k].lengths, fb[k].lengths)

    # clustering by session (window reorder, user-side runs stored once): labels move with their rows
    m = recluster(tmp_path / "d", tmp_path / "c", by="session", window=700, seed=1)
    assert m["schema"]["labels"] == LABELS
    cs = Dataset(tmp_path / "c")
    assert cs.clustering is not None and cs.clustering["by"] == "session"
    for split in ("train", "test"):
        rows = Chunk.concat(list(cs.chunks(split, 500)))
        _check_rows(rows.label, rows.dense)
        assert len(rows) == ds.num_rows(split)
        assert not np.array_equal(rows.dense[:, 0], np.sort(rows.dense[:, 0]))
    for b in cs.batches("train", 200, shuffle=True, dedup=True):
        assert b.user is not None and b.user.stride() < b.size
        _check_rows(b.labels.numpy(), b.dense.numpy())
    assert main(["data", "verify", str(tmp_path / "c")]) == 0


def test_one_label_keeps_the_vector_shape_and_old_manifests_read(tmp_path):
    s = Schema(["d"], [SparseFeature("a", 10)])
    assert s.labels == ["label"] and s.num_tasks == 1 and s.arrow_schema().names == ["label", "d", "a"]
    w = DatasetWriter(tmp_path / "d", s, splits=("train",))
    w.splits["train"].write(Chunk(np.array([0, 1, 1], np.float32), np.zeros((3, 1), np.float32),
                                  {"a": (np.array([1, 2, 3]), np.arange(4))}))
    w.close()
    mpath = tmp_path / "d" / "manifest.json"
    m = json.loads(mpath.read_text())
    del m["schema"]["labels"]  # a manifest written before labels were recorded
    mpath.write_text(json.dumps(m))
    ds = Dataset(tmp_path / "d")
    assert ds.schema.labels == ["label"]
    b = next(ds.batches("train", 8))
    assert b.labels.shape == (3,) and b.labels.tolist() == [0.0, 1.0, 1.0]
    assert next(ds.chunks("train", 8)).label.shape == (3,)


def test_bad_labels_are_refused_naming_the_column(tmp_path, capsys):
    with pytest.raises(TierecError, match="labels must be"):
        Schema([], [SparseFeature("a", 10)], labels=["x", "x"])
    with pytest.raises(TierecError, match="'a' is also the name of a feature"):
        Schema([], [SparseFeature("a", 10)], labels=["label", "a"])
    s = Schema(["d"], [SparseFeature("a", 10)], labels=["click", "conversion"])
    assert "labels [click, conversion] vs [label]" in s.differences(Schema(["d"], [SparseFeature("a", 10)]))
    n = 40
    good = np.zeros((n, 2), np.float32)
    sp = {"a": (np.arange(n) % 10, np.arange(n + 1, dtype=np.int64))}
    w = DatasetWriter(tmp_path / "w", s, splits=("train",), row_group_size=16)
    with pytest.raises(TierecError, match=r"labels of shape \(40,\) do not fit the schema's 2 label"):
        w.splits["train"].write(Chunk(np.zeros(n, np.float32), np.zeros((n, 1), np.float32), sp))
    bad = good.copy()
    bad[3, 1] = np.nan
    with pytest.raises(TierecError, match="label column 'conversion' holds a non-finite value"):
        w.splits["train"].write(Chunk(bad, np.zeros((n, 1), np.float32), sp))
    w.splits["train"].write(Chunk(good, np.zeros((n, 1), np.float32), sp))
    w.close()

    # A shard rewritten (checksums updated to match) with a NaN and a 2 in its label columns.
    root = tmp_path / "w"
    part = root / "train" / "part-00000.parquet"
    table = pq.read_table(part)
    for col, value in (("conversion", np.nan), ("click", 2.0)):
        vals = np.zeros(n, np.float32)
        vals[20] = value
        t = table.set_column(table.column_names.index(col), col, pa.array(vals))
        pq.write_table(t, part, row_group_size=16)
        m = json.loads((root / "manifest.json").read_text())
        m["splits"]["train"]["files"][0].update(bytes=part.stat().st_size, sha256=sha256_file(part),
                                                **file_checksums(part))
        (root / "manifest.json").write_text(json.dumps(m))
        assert main(["data", "verify", str(root)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"row group 1: label column '{col}' holds" in err[0], err
        assert ("non-finite" if col == "conversion" else "other than 0 or 1") in err[0]
        with pytest.raises(DataError, match=f"label column '{col}'"):
            list(Dataset(root).chunks("train", 8))

    # A manifest naming a label column the shards lack, or no labels at all.
    m = json.loads((root / "manifest.json").read_text())
    m["schema"]["labels"] = ["click", "conversion", "extra"]
    (root / "manifest.json").write_text(json.dumps(m))
    assert main(["data", "verify", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part-00000.parquet: row group 0: label column 'extra': no such column" in err[0], err
    with pytest.raises(DataError, match="row group 0: label column 'extra': no such column"):
        list(Dataset(root).chunks("train", 8))
    m["schema"]["labels"] = []
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="schema: labels must be a list of distinct non-empty names"):
        Dataset(root)


# --------------------------------------------------------------------------- synth --tasks
def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_tasks_1_is_byte_identical_to_the_default(tmp_path):
    kw = dict(rows=3000, seed=11, row_group_size=512, rows_per_file=2000, progress=False, multi_hot="poisson:2")
    generate(SynthConfig(**kw), tmp_path / "a")
    generate(SynthConfig(tasks=1, **kw), tmp_path / "b")
    a, b = _tree_hashes(tmp_path / "a"), _tree_hashes(tmp_path / "b")
    assert a == b and len(a) >= 4
    ds = Dataset(tmp_path / "a")
    assert ds.schema.labels == ["label"] and next(ds.chunks("train", 100)).label.shape == (100,)


def test_synth_two_tasks_conversion_model(tmp_path):
    cfg = SynthConfig(rows=60_000, tasks=2, seed=4, progress=False)
    syn = Synthesizer(cfg)
    assert syn.schema.labels == ["label", "conversion"] and syn.schema.num_tasks == 2
    c = Chunk.concat(list(syn.chunks("train")))
    y = c.label
    assert y.shape == (len(c), 2) and y.dtype == np.float32 and set(np.unique(y)) == {0.0, 1.0}
    assert (y[:, 1] <= y[:, 0]).all()  # a conversion only after a click
    click = y[:, 0] == 1
    assert 0.22 < y[:, 0].mean() < 0.28
    rate = y[click, 1].mean()
    assert 0.10 < rate < 0.30 and abs(rate - CONVERSION_RATE) < 0.03  # documented: ~15 % of clicks
    gt = syn.ground_truth(c)
    assert gt["probs"].shape == (len(c), 2) and gt["conversion_probs"].shape == (len(c), 1)
    np.testing.assert_allclose(gt["probs"][:, 0], gt["prob"])
    np.testing.assert_allclose(gt["probs"][:, 1], gt["prob"] * gt["conversion_probs"][:, 0])
    # predictable beyond the click: the true conversion probability ranks conversions among clicks,
    # better than the click probability alone does
    auc_conv = roc_auc(y[click, 1], gt["conversion_probs"][click, 0])
    auc_click = roc_auc(y[click, 1], gt["prob"][click])
    assert auc_conv > 0.7 and auc_conv > auc_click + 0.05, (auc_conv, auc_click)
    assert abs(gt["probs"][:, 1].mean() - y[:, 1].mean()) < 0.01
    # the click label is the one of the single-task config: same rows, same draws
    one = Chunk.concat(list(Synthesizer(SynthConfig(rows=60_000, seed=4, progress=False)).chunks("train")))
    np.testing.assert_array_equal(one.label, y[:, 0])
    # chunks do not depend on the chunk size
    small = Chunk.concat(list(iter_chunks(cfg, "train", chunk_rows=7_000)))
    np.testing.assert_array_equal(small.label, y)
    # three tasks: names, and labels 1.. differ from each other
    c3 = next(Synthesizer(SynthConfig(rows=20_000, tasks=3, progress=False)).chunks("train"))
    assert c3.label.shape[1] == 3 and (c3.label[:, 1:] <= c3.label[:, :1]).all()
    assert SynthConfig(tasks=3).schema().labels == ["label", "conversion", "label_2"]
    assert not np.array_equal(c3.label[:, 1], c3.label[:, 2])


def test_synth_cli_tasks_writes_labels_and_records_them(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "--rows", "4000", "--tasks", "2", "--session-length", "4",
                 "--user-features", "2", "--cluster-by", "session", "--cluster-window", "1000",
                 "--row-group-size", "512", "--no-progress"]) == 0
    assert "labels label, conversion" in capsys.readouterr().out
    ds = Dataset(out)
    m = ds.manifest
    assert m["schema"]["labels"] == ["label", "conversion"] and m["source"]["config"]["tasks"] == 2
    assert m["source"]["task_models"][0]["name"] == "conversion"
    for b in ds.batches("train", 256, shuffle=True, dedup=True):
        assert b.labels.shape == (b.size, 2) and (b.labels[:, 1] <= b.labels[:, 0]).all()
    assert main(["data", "verify", str(out)]) == 0
    assert main(["data", "info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["schema"]["labels"] == ["label", "conversion"]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "0"], "tasks: must be an integer in [1, 8]"),
    (["--tasks", "9"], "tasks: must be an integer in [1, 8]"),
    (["--multi-hot", "mlperf", "--num-sparse", "13"], "'mlperf' sets the multi-hot sizes of MLPerf DLRM-DCNv2's 26"),
    (["--multi-hot", "mlperf,fixed:2"], "gives both 'mlperf' and a SPEC"),
])
def test_synth_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--rows", "100", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# --------------------------------------------------------------------------- --multi-hot mlperf
def test_multi_hot_mlperf_gives_the_reference_lengths(capsys):
    assert MLPERF_MULTI_HOT == [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
    cfg = SynthConfig(rows=600, multi_hot="mlperf", num_dense=2, progress=False)
    assert cfg.to_dict()["multi_hot_resolved"] == [f"fixed:{k}" for k in MLPERF_MULTI_HOT]
    c = next(iter_chunks(cfg, "train"))
    for name, k in zip(cfg.feature_names, MLPERF_MULTI_HOT, strict=True):
        assert (np.diff(c.sparse[name][1]) == k).all(), name
    over = SynthConfig(multi_hot="mlperf, C21=fixed:50 ,C1=poisson:2", rows=10, progress=False).length_specs()
    assert [str(s) for s in over[:3]] == ["poisson:2", "fixed:2", "fixed:1"] and str(over[20]) == "fixed:50"
    with pytest.raises(ConfigError, match="num_sparse is 8"):
        SynthConfig(multi_hot="mlperf", num_sparse=8)
    from tierec.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "synth", "--help"])
    assert "mlperf" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------- convert --num-labels
def _criteo_line(labels, i: int) -> str:
    dense = [str((i * 7 + j) % 50) if (i + j) % 5 else "" for j in range(13)]
    cats = [f"{(i * 31 + j * 17) % 997:08x}" if (i + j) % 7 else "" for j in range(26)]
    return "\t".join([*map(str, labels), *dense, *cats]) + "\n"


def test_convert_num_labels(tmp_path, capsys):
    rows = [(i % 2, int(i % 6 == 0)) for i in range(40)]
    path = tmp_path / "two.tsv"
    lines = [_criteo_line(r, i) for i, r in enumerate(rows)]
    lines[9] = _criteo_line((1, 2), 9)  # a bad conversion label
    path.write_text("".join(lines))
    out = tmp_path / "o"
    argv = ["data", "convert", str(path), "--format", "criteo-tsv", "--num-labels", "2", "--out", str(out),
            "--test-fraction", "0", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "two.tsv:10: label 'conversion' (field 2) must be 0 or 1, got '2'" in err[0], err
    assert main([*argv, "--skip-bad-rows"]) == 0
    assert "bad rows skipped: 1" in capsys.readouterr().out
    ds = Dataset(out)
    assert ds.schema.labels == ["label", "conversion"] and ds.manifest["source"]["options"]["num_labels"] == 2
    c = Chunk.concat(list(ds.chunks("train", 100)))
    want = np.array([r for i, r in enumerate(rows) if i != 9], np.float32)
    np.testing.assert_array_equal(c.label, want)
    assert c.dense.shape == (39, 13) and len(c.sparse) == 26
    # the same rows with one label column read as before; a named pair of labels; criteo-csv with a header
    one = tmp_path / "one.tsv"
    one.write_text("".join(_criteo_line(r[:1], i) for i, r in enumerate(rows)))
    m = convert(one, tmp_path / "o1", "criteo-tsv", test_fraction=0.0, progress=False)
    assert m["schema"]["labels"] == ["label"]
    one_rows = Chunk.concat(list(Dataset(tmp_path / "o1").chunks("train", 100)))
    assert one_rows.label.shape == (40,)
    np.testing.assert_array_equal(np.delete(one_rows.dense, 9, 0), c.dense)
    csv = tmp_path / "two.csv"
    header = ",".join(["click", "buy", *[f"I{j}" for j in range(1, 14)], *[f"C{j}" for j in range(1, 27)]])
    csv.write_text(header + "\n" + "".join(_criteo_line(r, i).replace("\t", ",") for i, r in enumerate(rows)))
    m = convert(csv, tmp_path / "o2", "criteo-csv", num_labels=2, label_names="click,buy", test_fraction=0.0,
                progress=False)
    assert m["schema"]["labels"] == ["click", "buy"]
    np.testing.assert_array_equal(Chunk.concat(list(Dataset(tmp_path / "o2").chunks("train", 100))).label,
                                  np.array(rows, np.float32))


def test_synth_criteo_tsv_with_tasks_converts_back(tmp_path):
    cfg = SynthConfig(rows=1500, tasks=2, seed=2, progress=False)
    write_criteo_tsv(cfg, tmp_path / "s.tsv")
    first = (tmp_path / "s.tsv").read_text().split("\n", 1)[0].split("\t")
    assert len(first) == 2 + 13 + 26
    m = convert(tmp_path / "s.tsv", tmp_path / "o", "criteo-tsv", num_labels=2, test_fraction=0.0, progress=False)
    assert m["schema"]["labels"] == ["label", "conversion"]
    got = Chunk.concat(list(Dataset(tmp_path / "o").chunks("train", 1 << 12))).label
    syn = Synthesizer(cfg)
    want = np.concatenate([Chunk.concat(list(syn.chunks(s))).label for s in ("train", "test")])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("extra, message", [
    (["--format", "libsvm", "--num-labels", "2"], "--num-labels 2: only criteo-tsv and criteo-csv rows hold"),
    (["--format", "criteo-tsv", "--num-labels", "2", "--label-names", "a,b,c"], "gives 3 names for --num-labels 2"),
    (["--format", "criteo-tsv", "--num-labels", "0"], "--num-labels must be an integer >= 1"),
    (["--format", "criteo-tsv", "--label-names", "click,I3"], "'I3' is also the name of a feature"),
    (["--format", "criteo-tsv", "--label-names", "a,a"], "a name is given twice"),
])
def test_convert_label_errors_are_one_line(tmp_path, capsys, extra, message):
    path = tmp_path / "in.txt"
    path.write_text("1 3:1\n")
    assert main(["data", "convert", str(path), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_convert_names_the_one_label_of_other_formats(tmp_path):
    path = tmp_path / "in.svm"
    path.write_text("1 3:1 5:1\n0 2:1\n")
    m = convert(path, tmp_path / "o", "libsvm", label_names="click", test_fraction=0.0, progress=False)
    assert m["schema"]["labels"] == ["click"]
    assert Chunk.concat(list(Dataset(tmp_path / "o").chunks("train", 8))).label.tolist() == [1.0, 0.0]

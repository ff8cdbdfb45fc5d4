"""Tests of the synthetic generator (tierec.data.synth) and the locality statistics (tierec.data.locality)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from tierec.data import synth
from tierec.data.dataset import Chunk, Dataset
from tierec.data.locality import (
    count_bins,
    mean_stats,
    parse_locality_stats,
    reuse_histogram,
    top_share,
    total_variation,
)
from tierec.data.synth import SynthConfig, Synthesizer, generate, ground_truth, iter_chunks
from tierec.errors import ConfigError, DataError
from tierec.train.metrics import roc_auc

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STATS_2021 = SHARED / "dlrm_locality_stats_2021.txt"
STATS_2022 = SHARED / "dlrm_locality_stats_2022.txt"
needs_stats = pytest.mark.skipif(not STATS_2021.exists(), reason="Meta's locality stats not found in ../shared/data")

# Tolerances of the calibration against Meta's 2021 statistics (one batch of 65,536 rows, default config).
# Measured (docs/synth.md): TV 0.015 (col sizes) and 0.072 (index ratio); a plain Zipf(1) gives 0.20 / 0.24.
TV_COL_SIZE_MAX = 0.04
TV_INDEX_RATIO_MAX = 0.10


def _sha256s(manifest: dict) -> list[str]:
    return [f["sha256"] for s in manifest["splits"].values() for f in s["files"]]


def _read_all(path, split) -> Chunk:
    ds = Dataset(path)
    return Chunk.concat(list(ds.chunks(split, 1 << 20)))


# --------------------------------------------------------------------------- reproducibility, shape
def test_same_seed_same_bytes_different_seed_different(tmp_path):
    kw = {"rows": 20_000, "rows_per_file": 8_000, "row_group_size": 4_000, "multi_hot": "fixed:1,C2=poisson:3",
          "session_length": 3.0, "user_features": 2, "progress": False}
    m1 = generate(SynthConfig(seed=7, **kw), tmp_path / "a")
    m2 = generate(SynthConfig(seed=7, **kw), tmp_path / "b")
    m3 = generate(SynthConfig(seed=8, **kw), tmp_path / "c")
    assert len(_sha256s(m1)) == 4  # train: 18,000 rows in 3 files; test: 2,000 rows in 1
    assert _sha256s(m1) == _sha256s(m2)
    shard = "train/part-00000.parquet"
    assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    assert not set(_sha256s(m1)) & set(_sha256s(m3))
    Dataset(tmp_path / "a").verify()


def test_schema_shapes_and_ranges(tmp_path):
    cfg = SynthConfig(rows=30_000, test_fraction=0.2, seed=1, progress=False)
    m = generate(cfg, tmp_path / "d")
    ds = Dataset(tmp_path / "d")
    assert ds.num_rows("train") == 24_000 and ds.num_rows("test") == 6_000
    assert ds.schema.dense == [f"I{i}" for i in range(1, 14)]
    assert ds.schema.sparse_names == [f"C{i}" for i in range(1, 27)]
    assert ds.schema.session_key is None
    sizes = [f.num_embeddings for f in ds.schema.sparse]
    assert sizes == [min(c, 100_000) for c in synth.CRITEO_KAGGLE_CARDINALITIES]
    assert m["source"]["config"]["seed"] == 1
    c = _read_all(tmp_path / "d", "train")
    assert set(np.unique(c.label)) == {0.0, 1.0}
    assert 0.22 < c.label.mean() < 0.28  # Criteo-like positive rate
    assert c.dense.shape == (24_000, 13) and np.isfinite(c.dense).all() and (c.dense >= 0).all()
    for f in ds.schema.sparse:
        v, o = c.sparse[f.name]
        assert (np.diff(o) == 1).all()  # single-hot by default
        assert v.min() >= 0 and v.max() < f.num_embeddings
    # the written rows are exactly what iter_chunks yields (the benchmarks' path), in any chunking
    t = _read_all(tmp_path / "d", "test")
    again = Chunk.concat(list(iter_chunks(cfg, "test", chunk_rows=1000)))
    assert np.array_equal(t.label, again.label) and np.array_equal(t.dense, again.dense)
    for name in ds.schema.sparse_names:
        assert np.array_equal(t.sparse[name][0], again.sparse[name][0])


def test_ids_in_range_for_tiny_and_huge_tables():
    # plain Zipf(1) over up to 50M rows: exercises the continuous tail beyond the exact head
    cfg = SynthConfig(rows=40_000, cardinalities=[1, 2, 3, 1000, 10_000_000, 50_000_000], max_cardinality=0,
                      zipf=1.0, multi_hot="poisson:2", num_dense=0, progress=False)
    syn = Synthesizer(cfg)
    c = next(syn.chunks("train"))
    for f in syn.schema.sparse:
        v, o = c.sparse[f.name]
        assert len(o) == len(c) + 1 and o[-1] == len(v)
        assert v.min() >= 0 and v.max() < f.num_embeddings
    big = syn.tables[-1]
    ranks = big.sample_ranks(np.random.default_rng(0), 200_000)
    assert ranks.max() >= synth.HEAD_RANKS  # the tail is sampled ...
    tail_share = (ranks >= synth.HEAD_RANKS).mean()
    assert abs(tail_share - big.tail_mass) < 0.01  # ... with its mass
    assert len(np.unique(big.ranks_to_ids(np.arange(100_000)))) == 100_000  # a permutation, hot rows scattered
    assert big.ranks_to_ids(np.arange(3)).min() > 1000


def test_multi_hot_length_distributions():
    cfg = SynthConfig(rows=50_000, num_sparse=4, cardinalities=[5000],
                      multi_hot="poisson:3,C2=uniform:1-5,C3=fixed:2,C4=poisson0:0.5", progress=False)
    c = next(iter_chunks(cfg, chunk_rows=40_000))
    lens = {n: np.diff(c.sparse[n][1]) for n in ["C1", "C2", "C3", "C4"]}
    assert abs(lens["C1"].mean() - 3.0) < 0.05 and lens["C1"].min() >= 1
    assert abs(lens["C2"].mean() - 3.0) < 0.05 and lens["C2"].min() == 1 and lens["C2"].max() == 5
    assert (lens["C3"] == 2).all()
    assert abs(lens["C4"].mean() - 0.5) < 0.03 and (lens["C4"] == 0).mean() > 0.55  # empty lists: missing values
    gt = ground_truth(cfg, c)
    assert np.isfinite(gt["logit"]).all()


# --------------------------------------------------------------------------- calibration
@needs_stats
def test_reuse_histogram_matches_meta_2021():
    ref = mean_stats(parse_locality_stats(STATS_2021)[1:])  # sections 1..16: the same batch size and table set
    assert ref.batch_size == 65536

    def tv(cfg):
        batch = next(iter_chunks(cfg, chunk_rows=65536))
        h = reuse_histogram([batch.sparse[n][0] for n in cfg.feature_names])
        assert h.lookups == 26 * 65536
        return total_variation(h.col_size_hist, ref.col_size_hist), total_variation(h.index_ratio, ref.index_ratio)

    tv_col, tv_idx = tv(SynthConfig(rows=80_000, num_dense=0))
    assert tv_col < TV_COL_SIZE_MAX and tv_idx < TV_INDEX_RATIO_MAX, (tv_col, tv_idx)
    # the check has teeth: plain Zipf popularity is far off
    z_col, z_idx = tv(SynthConfig(rows=80_000, num_dense=0, zipf=1.0))
    assert z_col > 2 * TV_COL_SIZE_MAX and z_idx > 2 * TV_INDEX_RATIO_MAX


def test_top_one_percent_of_rows_take_over_90_percent_of_lookups():
    # The top 1% of ALL table rows ((table, row) pairs, touched or not) by lookups.
    # Published (uncapped) Criteo sizes, 33.8M rows: in the limit of infinitely many samples ...
    assert Synthesizer(SynthConfig(rows=1, max_cardinality=0, num_dense=0)).expected_top_share(0.01) > 0.9
    uniform = SynthConfig(rows=1, max_cardinality=0, num_dense=0, zipf=0.0)
    assert Synthesizer(uniform).expected_top_share(0.01) < 0.85
    # ... and counted over a whole generated data set. Tables capped at 3M rows (14.8M rows in all) so that
    # this data set touches more than 1% of them, else the share would be trivially 1.
    cfg = SynthConfig(rows=200_000, test_fraction=0.0, max_cardinality=3_000_000, num_dense=0, progress=False)
    syn = Synthesizer(cfg)
    ids = [[] for _ in syn.sizes]
    for c in syn.chunks("train"):
        for t, name in enumerate(syn.schema.sparse_names):
            ids[t].append(c.sparse[name][0])
    counts = [np.unique(np.concatenate(x), return_counts=True)[1] for x in ids]  # untouched rows count 0
    assert sum(len(x) for x in counts) > 2 * 0.01 * sum(syn.sizes)
    share = top_share(counts, 0.01, total_rows=sum(syn.sizes))
    assert share > 0.9, share
    assert abs(share - syn.expected_top_share(0.01)) < 0.02


def test_top_share_and_count_bins_helpers():
    k = np.array([1, 2, 3, 4, 5, 8, 9, 32768, 32769, 10**9])
    assert count_bins(k).tolist() == [0, 1, 2, 2, 3, 3, 4, 15, 16, 16]
    c = np.array([90, 5, 5] + [0] * 97)  # 100 rows, the top 1 (1%) takes 90%
    assert top_share(c, 0.01) == pytest.approx(0.9)
    assert top_share(c[:3], 0.01, total_rows=100) == pytest.approx(0.9)
    h = reuse_histogram([np.array([1, 1, 2]), np.array([7] * 5)])  # (t0,1)x2, (t0,2)x1, (t1,7)x5
    assert h.unique == 3 and h.lookups == 8
    assert h.unique_counts.tolist()[:4] == [1, 1, 0, 1] and h.lookup_counts.tolist()[:4] == [1, 2, 0, 5]


# --------------------------------------------------------------------------- labels
def test_bayes_auc_high_and_first_order_lower():
    cfg = SynthConfig(rows=150_000, seed=3, progress=False)
    syn = Synthesizer(cfg)
    c = Chunk.concat(list(syn.chunks("train", max_rows=131_072)))
    gt = syn.ground_truth(c)
    y = c.label
    assert 0.23 < y.mean() < 0.27
    bayes = roc_auc(y, gt["logit"])
    first = roc_auc(y, gt["first_order"])
    first_dense = roc_auc(y, gt["first_order"] + gt["dense"])
    assert bayes > 0.75, bayes
    assert first < bayes - 0.05 and first_dense < bayes - 0.03, (first, first_dense, bayes)
    assert first > 0.6 and roc_auc(y, gt["pairwise"]) > 0.6  # both parts carry signal
    assert np.allclose(gt["prob"], 1 / (1 + np.exp(-gt["logit"])))


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = np.round(rng.normal(size=300) + y, 1)  # with ties
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
    assert roc_auc(y, s) == pytest.approx(brute)
    assert np.isnan(roc_auc(np.ones(3), np.arange(3)))  # one class: undefined


# --------------------------------------------------------------------------- sessions
def test_sessions_user_features_constant_within_session(tmp_path):
    cfg = SynthConfig(rows=30_000, session_length=5.0, user_features=3, multi_hot="fixed:1,C2=uniform:1-4",
                      test_fraction=0.1, progress=False)
    generate(cfg, tmp_path / "s")
    ds = Dataset(tmp_path / "s")
    assert ds.schema.session_key == "session"
    assert [f.side for f in ds.schema.sparse[:4]] == ["user", "user", "user", "item"]
    c = _read_all(tmp_path / "s", "train")
    s = c.session
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    assert len(np.unique(s)) == len(starts)  # each session is one contiguous run
    assert abs(len(s) / len(starts) - 5.0) < 0.35  # geometric lengths, mean 5
    sess_of_row = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(s)]))
    for name in ["C1", "C2", "C3"]:
        v, o = c.sparse[name]
        rows = [tuple(v[o[i]:o[i + 1]]) for i in range(len(s))]
        for i in range(1, len(s)):
            if sess_of_row[i] == sess_of_row[i - 1]:
                assert rows[i] == rows[i - 1]
    v4 = c.sparse["C4"][0]  # an item feature varies within sessions
    same = (v4[1:] == v4[:-1])[sess_of_row[1:] == sess_of_row[:-1]]
    assert same.mean() < 0.5
    t = _read_all(tmp_path / "s", "test")
    assert not set(np.unique(t.session)) & set(np.unique(s))  # session ids are unique across splits


# --------------------------------------------------------------------------- config and CLI
@pytest.mark.parametrize("kw, field", [
    ({"rows": 0}, "rows"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"seed": -1}, "seed"),
    ({"num_sparse": 0}, "num_sparse"),
    ({"cardinalities": [10, 0]}, "cardinalities"),
    ({"num_sparse": 3, "cardinalities": [10, 20]}, "cardinalities"),
    ({"max_cardinality": -5}, "max_cardinality"),
    ({"num_dense": -1}, "num_dense"),
    ({"zipf": "steep"}, "zipf"),
    ({"zipf": -0.5}, "zipf"),
    ({"multi_hot": "poisson:0.5"}, "multi_hot"),
    ({"multi_hot": "geometric:3"}, "multi_hot"),
    ({"multi_hot": "C99=fixed:2"}, "multi_hot"),
    ({"session_length": 0.5}, "session_length"),
    ({"user_features": 27}, "user_features"),
    ({"positive_rate": 0.0}, "positive_rate"),
    ({"rows_per_file": 0}, "rows_per_file"),
    ({"row_group_size": -1}, "row_group_size"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"^{field}\b"):
        SynthConfig(**kw)


def test_cli_writes_a_data_set(tmp_path, capsys):
    from tierec.cli.data import add_synth_arguments, config_from_args, synth_main

    p = argparse.ArgumentParser()
    add_synth_arguments(p)
    out = tmp_path / "cli"
    args = p.parse_args(["--out", str(out), "--rows", "5000", "--num-sparse", "3", "--cardinalities", "1k,2k,50",
                         "--num-dense", "2", "--multi-hot", "uniform:1-3", "--zipf", "0.8", "--seed", "4"])
    assert synth_main(args) == 0
    line = capsys.readouterr().out
    assert "wrote 5,000 rows (train 4,500, test 500)" in line and "rows/s" in line
    m = json.loads((out / "manifest.json").read_text())
    assert [f["num_embeddings"] for f in m["schema"]["sparse"]] == [1000, 2000, 50]
    assert m["source"]["config"]["zipf"] == 0.8
    with pytest.raises(ConfigError, match="^cardinalities"):
        config_from_args(p.parse_args(["--out", "x", "--cardinalities", "ten"]))


# --------------------------------------------------------------------------- Meta's files and machinery
@needs_stats
def test_parse_meta_locality_stats():
    s21 = parse_locality_stats(STATS_2021)
    assert len(s21) == 17 and {s.batch_size for s in s21} == {65536}
    assert s21[1].name == "fbgemm_t856_bs65536_0.pt" and s21[1].num_tables == 856
    assert s21[1].avg_indices == 468084223 and s21[1].avg_unique == 61644628
    assert s21[1].col_size_hist[:3].tolist() == [0.423, 0.165, 0.167]
    assert s21[1].index_ratio[-1] == 0.020
    if STATS_2022.exists():
        s22 = parse_locality_stats(STATS_2022)
        assert len(s22) == 16 and s22[0].batch_size == 131072 and s22[0].num_tables == 788
    for s in s21:
        assert abs(s.col_size_hist.sum() - 1) < 0.01 and abs(s.index_ratio.sum() - 1) < 0.01


def test_parse_rejects_a_malformed_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("x.pt\nLocality stats after processing 1 batches of size 8\nAvg # of indices: 10\n"
                   "Avg # of unique cols: 5\nHistogram of col sizes:\n(0, 1]: 0.5\nthis is not a stat line\n")
    with pytest.raises(DataError, match=r"bad.txt:7: unrecognised line"):
        parse_locality_stats(bad)


def test_alias_table_and_permutation_are_exact():
    rng = np.random.default_rng(5)
    for p in [rng.random(7), np.arange(1, 3001.0) ** -1.3, np.array([1.0]), rng.random(2000) ** 6]:
        p = p / p.sum()
        prob, alias = synth.alias_table(p)
        got = prob / p.size
        np.add.at(got, alias, (1 - prob) / p.size)
        assert np.abs(got - p).max() < 1e-12
    for n in [1, 2, 5, 1000, 4097]:
        y = synth.feistel_permute(np.arange(n), n, key=99)
        assert np.array_equal(np.sort(y), np.arange(n))

"""Deduplication end to end: inverse KJTs, session-clustered data sets, the dedup lookup path.

Exactness contract (docs/dedup.md): the deduplicated path computes every pooled vector
bit-identically; DLRM's user-only network part (user x user dots and their share of the first
top layer, `DLRM.forward_dedup`) runs on the U unique rows and its first layer sums its input
columns in two parts (rest + user-only), so logits and losses agree within float32 rounding
(rtol 1e-5). The backward sums a sample's gradients into its unique row first (index_select's
backward) and then into the embedding rows, a different summation order than the plain path,
so weights agree within float32 rounding (here rtol 1e-4 after a few steps of Adam/row-wise
Adagrad). When nothing is deduplicated (sessions of length 1, every row unique) `forward`
keeps the plain order and the results are bit-identical.
"""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tierec.data.cluster import recluster, window_order
from tierec.data.dataset import Batch, Chunk, Dataset
from tierec.data.synth import SynthConfig, generate
from tierec.modules.dlrm import DLRM
from tierec.modules.embedding import TableConfig, build_collection
from tierec.modules.optim import SparseOptimizer
from tierec.sparse import KeyedJaggedTensor, dedup_kjt
from tierec.sparse import dedup as dd
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer, load_for_eval


def synth(root, rows=3000, session_length=8.0, user_features=2, num_sparse=4, card=500, multi_hot="poisson:2",
          by="none", window=1024, seed=0):
    cfg = SynthConfig(rows=rows, num_sparse=num_sparse, cardinalities=[card] * num_sparse, num_dense=2,
                      session_length=session_length, user_features=user_features, multi_hot=multi_hot,
                      row_group_size=512, rows_per_file=2048, seed=seed, progress=False)
    generate(cfg, root, cluster_by=by, cluster_window=window)
    return Dataset(root)


def rows_of(chunk: Chunk, keys) -> list[tuple]:
    """Each row as a hashable tuple (tests only)."""
    out = []
    for i in range(len(chunk)):
        r = [float(chunk.label[i]), tuple(chunk.dense[i].tolist())]
        for k in keys:
            v, o = chunk.sparse[k]
            r.append(tuple(v[o[i]:o[i + 1]].tolist()))
        out.append(tuple(r))
    return out


def all_rows(ds, split="train"):
    return Chunk.concat(list(ds.chunks(split, 1 << 20)))


# --------------------------------------------------------------------------- dedup_rows / KJT
def random_jagged(rng, n, card, max_len):
    lens = rng.integers(0, max_len + 1, n)
    return rng.integers(0, card, int(lens.sum())), np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


@pytest.mark.parametrize("seed", range(3))
def test_dedup_rows_is_exact(seed):
    rng = np.random.default_rng(seed)
    base = [random_jagged(rng, 20, 4, 2), random_jagged(rng, 20, 3, 3)]
    pick = rng.integers(0, 20, 300)  # 300 rows drawn from 20 distinct-ish rows
    feats = [dd.jagged_take(v, o, pick) for v, o in base]
    rep, inv = dd.dedup_rows(feats, 300)
    assert rep.size <= 20 and inv.shape == (300,)
    assert np.all(np.diff(rep) > 0), "entries in first-occurrence order"
    for v, o in feats:
        ev, eo = dd.jagged_take(v, o, rep)
        assert np.array_equal(dd.jagged_take(ev, eo, inv)[0], v) and np.array_equal(dd.jagged_take(ev, eo, inv)[1], o)
    keys = {tuple(tuple(v[o[i]:o[i + 1]]) for v, o in feats) for i in range(300)}
    assert rep.size == len(keys), "rows equal in every feature share one entry, and only those"
    # session keys: used when they determine the rows, ignored (exactly) when they do not
    for sess in (pick, np.zeros(300, np.int64), pick % 3):
        r2, i2 = dd.dedup_rows(feats, 300, sess)
        for v, o in feats:
            assert np.array_equal(dd.jagged_take(*dd.jagged_take(v, o, r2), i2)[0], v)
    assert dd.dedup_rows(feats, 300, pick)[0].tolist() == rep.tolist(), "same entries with or without keys"


def test_dedup_rows_survives_hash_collisions(monkeypatch):
    monkeypatch.setattr(dd, "row_hashes", lambda feats, n: np.zeros(n, np.uint64))  # everything collides
    v, o = np.array([1, 1, 2, 2, 1]), np.array([0, 1, 2, 3, 4, 5])
    rep, inv = dd.dedup_rows([(v, o)], 5)
    assert np.array_equal(v[rep[inv]], v)  # exact fallback: merge equal neighbours only
    assert rep.tolist() == [0, 2, 4]


def test_kjt_inverse_round_trip_and_validation():
    keys = ["u", "v"]
    lengths = torch.tensor([1, 0, 1, 0, 2, 1, 2, 1])  # B = 4; u: [7],[],[7],[]  v: [3,4],[5],[3,4],[5]
    values = torch.tensor([7, 7, 3, 4, 5, 3, 4, 5])
    kjt = KeyedJaggedTensor(keys, values, lengths, stride=4)
    d = dedup_kjt(kjt)
    assert d.stride() == 2 and d.batch_size() == 4
    ikeys, inv = d.inverse_indices()
    assert ikeys == keys and inv.tolist() == [0, 1, 0, 1]
    assert d.values().tolist() == [7, 3, 4, 5]
    e = d.expand()
    assert torch.equal(e.values(), values) and torch.equal(e.lengths(), lengths) and e.stride() == 4
    assert d.to("cpu").inverse_indices()[1].tolist() == [0, 1, 0, 1]
    per_key = KeyedJaggedTensor(keys, d.values(), d.lengths(), stride=2,
                                inverse_indices=(keys, torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1]])))
    assert torch.equal(per_key.expand().values(), values)
    with pytest.raises(ValueError, match="out of range"):
        KeyedJaggedTensor(keys, d.values(), d.lengths(), stride=2, inverse_indices=(keys, torch.tensor([0, 2])))
    with pytest.raises(ValueError, match="keys"):
        KeyedJaggedTensor(keys, d.values(), d.lengths(), stride=2, inverse_indices=(["u"], torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="int64"):
        KeyedJaggedTensor(keys, d.values(), d.lengths(), stride=2, inverse_indices=(keys, torch.tensor([0.0, 1.0])))
    with pytest.raises(ValueError, match="not deduplicated"):
        kjt.inverse_indices()
    with pytest.raises(ValueError, match="inverse KJT over the batch's 3 samples"):
        Batch(torch.zeros(3, 1), KeyedJaggedTensor([], torch.zeros(0, dtype=torch.int64),
                                                   torch.zeros(0, dtype=torch.int64), stride=3), torch.zeros(3), user=d)


# --------------------------------------------------------------------------- clustered data sets
def test_window_order_groups_sessions():
    keys = np.array([5, 3, 5, 9, 3, 5])
    order = window_order(keys, np.random.default_rng(0))
    runs = keys[order]
    assert sorted(order.tolist()) == list(range(6))
    assert len(np.flatnonzero(np.diff(runs)) + 1) == 2, "three sessions -> three runs"
    assert [i for i in order if keys[i] == 5] == [0, 2, 5], "stable within a session"


def test_clustered_data_set_same_rows_smaller_and_session_shuffle(tmp_path):
    raw = synth(tmp_path / "raw", by="shuffle", window=1 << 20)  # sessions interleaved: raw-log order
    recluster(raw.root, tmp_path / "clu", "session", window=1 << 20)
    clu = Dataset(tmp_path / "clu")
    keys = raw.schema.sparse_names
    for split in ("train", "test"):
        assert sorted(rows_of(all_rows(raw, split), keys)) == sorted(rows_of(all_rows(clu, split), keys))
    assert clu.clustering["by"] == "session"
    # user-side columns are stored once per run: nulls = "as above"; item-side columns are not
    f = pq.ParquetFile(clu.root / "train" / "part-00000.parquet")
    t = f.read_row_group(0)
    user, item = clu.schema.user_names, [k for k in keys if k not in clu.schema.user_names]
    assert t.column(user[0]).null_count > len(t) // 2 and t.column(item[0]).null_count == 0
    size = lambda ds: sum(fl["bytes"] for s in ds.manifest["splits"].values() for fl in s["files"])  # noqa: E731
    assert size(clu) < size(raw)
    # a shuffled epoch keeps every session in one run, and dedup finds them
    sess = np.concatenate([c.session for c in clu.chunks("train", 256, shuffle=True, seed=3)])
    starts = np.flatnonzero(np.r_[True, sess[1:] != sess[:-1]])
    assert len(np.unique(sess)) >= len(starts) - 6, "a session is split only at row group edges"
    b_raw = [b.user.stride() for b in raw.batches("train", 256, shuffle=True, dedup=True)]
    b_clu = [b.user.stride() for b in clu.batches("train", 256, shuffle=True, dedup=True)]
    assert sum(b_clu) * 3 < sum(b_raw)


@pytest.mark.parametrize("by", ["session", "none"])
def test_dedup_batches_expand_to_plain_batches(tmp_path, by):
    ds = synth(tmp_path / "d", by=by, window=700, multi_hot="poisson0:1")  # empty lists too
    plain = list(ds.batches("train", 200, shuffle=True, seed=1, epoch=2, start_batch=1))
    dedup = list(ds.batches("train", 200, shuffle=True, seed=1, epoch=2, start_batch=1, dedup=True))
    assert len(plain) == len(dedup) > 5
    saw_empty = False
    for p, d in zip(plain, dedup):
        assert torch.equal(p.labels, d.labels) and torch.equal(p.dense, d.dense)
        assert d.user.keys() == ds.schema.user_names and d.user.stride() <= d.size
        full = d.full_sparse().to_dict()
        for k, jt in p.sparse.to_dict().items():
            assert torch.equal(jt.values, full[k].values) and torch.equal(jt.lengths, full[k].lengths), k
        saw_empty |= bool((d.user.lengths() == 0).any())
        u = d.user.to_dict()  # entries are unique within the batch
        rows = {tuple(tuple(u[k].to_dense()[i].tolist()) for k in u) for i in range(d.user.stride())}
        assert len(rows) == d.user.stride()
    assert saw_empty


def test_convert_cluster_by_session_cli(tmp_path, shared_data):
    lines = []
    rng = np.random.default_rng(0)
    for t in range(1500):  # interleaved sessions of 30 users
        lines.append(f"{rng.integers(1, 31)}\t{rng.integers(1, 400)}\t{rng.integers(1, 6)}\t{880000000 + t}")
    src = tmp_path / "u.data"
    src.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "tierec", "data", "convert", str(src), "--format", "movielens", "--no-progress"]
    subprocess.run(cmd + ["--out", str(tmp_path / "flat")], check=True, capture_output=True)
    subprocess.run(cmd + ["--out", str(tmp_path / "clu"), "--cluster-by", "session", "--cluster-window", "1000"],
                   check=True, capture_output=True)
    flat, clu = Dataset(tmp_path / "flat"), Dataset(tmp_path / "clu")
    m = json.loads((tmp_path / "clu" / "manifest.json").read_text())
    assert m["clustering"] == {"by": "session", "window": 1000, "seed": 0, "user_runs": True}
    keys = flat.schema.sparse_names
    assert sorted(rows_of(all_rows(flat), keys)) == sorted(rows_of(all_rows(clu), keys))
    sess = all_rows(clu).session[:1000]  # the first window: 30 users -> at most 30 runs
    assert np.count_nonzero(np.diff(sess)) + 1 <= 30
    bad = subprocess.run([sys.executable, "-m", "tierec", "data", "convert", str(shared_data / "criteo_sample.csv"),
                          "--format", "criteo-csv", "--out", str(tmp_path / "c"), "--cluster-by", "session"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no session key and no user-side sparse feature" in bad.stderr


# --------------------------------------------------------------------------- training exactness
def train(data, out, dedup, **kw):
    base = dict(data=str(data), out=str(out), embedding_dim=8, bottom_mlp=[16], top_mlp=[16], batch_size=128,
                max_steps=6, progress=False, log_every=1, dedup=dedup, eval_batch_size=512)
    base.update(kw)
    t = Trainer(TrainConfig(**base))
    t.fit()
    losses = [json.loads(x)["loss"] for x in (t.out / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["event"] == "train"]
    weights = {t_.config.name: t_.storage.read_rows(0, t_.storage.num_embeddings)[0].clone()
               for t_ in t.model.embeddings.tables}
    dense = {k: v.clone() for k, v in t.model.state_dict().items()}
    return losses, weights, dense


def uniques(ds, bs=128):
    b = [(x.user.stride(), x.size) for x in ds.batches("train", bs, shuffle=True, dedup=True)]
    return sum(u for u, _ in b), sum(n for _, n in b)


@pytest.mark.parametrize("case", ["long_sessions", "empty_lists", "rowwise_adagrad_adam"])
def test_dedup_training_matches_plain(tmp_path, case):
    kw = dict(session_length=8.0, multi_hot="poisson:2")
    opt = dict(sparse_optimizer="sgd", dense_optimizer="sgd", lr=0.05)
    if case == "long_sessions":
        kw["session_length"] = 400.0  # a batch is one or two sessions
    elif case == "empty_lists":
        kw["multi_hot"] = "poisson0:1"  # many empty user-side lists
    else:
        opt = {}
    ds = synth(tmp_path / "d", by="session", window=2048, **kw)
    u, n = uniques(ds)
    assert u * 4 < n, "the case must actually deduplicate"
    lp, wp, dp = train(ds.root, tmp_path / "p", False, **opt)
    ld, wd, ddn = train(ds.root, tmp_path / "q", True, **opt)
    assert len(lp) == len(ld) == 6
    np.testing.assert_allclose(ld, lp, rtol=1e-5)
    for k in wp:
        torch.testing.assert_close(wd[k], wp[k], rtol=1e-4, atol=1e-6)
    for k in dp:
        torch.testing.assert_close(ddn[k], dp[k], rtol=1e-4, atol=1e-6)


def test_sessions_of_length_one_are_bit_identical(tmp_path):
    ds = synth(tmp_path / "d", session_length=1.0, card=1_000_000, by="session", window=4096)
    u, n = uniques(ds)
    assert u == n, "nothing to deduplicate"
    lp, wp, dp = train(ds.root, tmp_path / "p", False)
    ld, wd, ddn = train(ds.root, tmp_path / "q", True)
    assert lp == ld
    assert all(torch.equal(wd[k], wp[k]) for k in wp) and all(torch.equal(ddn[k], dp[k]) for k in dp)


def test_tiered_dedup_moves_each_row_once(tmp_path):
    """With tables on SSD behind caches, a deduplicated step looks up each unique row once per table."""
    ds = synth(tmp_path / "d", by="session", window=4096, card=4000)
    common = dict(memory_budget="40KiB", tables={f"C{i}": {"placement": "ssd", "cache_rows": 64} for i in (1, 2)},
                  max_steps=4)
    train(ds.root, tmp_path / "ref", False, **common)
    for dedup in (False, True):
        out = tmp_path / f"t{int(dedup)}"
        train(ds.root, out, dedup, **common)
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        cache = [r["cache"] for r in recs if r["event"] == "train"]
        assert len(cache) == 4
        # lookups per step == unique IDs of the step's batch (counted on the same batches)
        batches = list(ds.batches("train", 128, shuffle=True, dedup=dedup))[:4]
        for name in ("C1", "C2"):
            looked = np.diff([0] + [c[name]["lookups"] for c in cache])
            for b, got in zip(batches, looked):
                ids = (b.user if dedup else b.sparse)[name].values
                assert got == ids.unique().numel(), (name, dedup)


def test_lookahead_caches_with_dedup_batches_are_bit_identical(tmp_path):
    """The look-ahead pipeline reads user-side IDs from the inverse KJT: same result as in memory."""
    ds = synth(tmp_path / "d", by="session", window=4096, card=4000)
    ref = train(ds.root, tmp_path / "ref", True)
    la = train(ds.root, tmp_path / "la", True, memory_budget="20KiB", cache_policy="lookahead", lookahead=4)
    assert la[0] == ref[0]
    assert all(torch.equal(la[1][k], ref[1][k]) for k in ref[1]) and all(torch.equal(la[2][k], ref[2][k])
                                                                      for k in ref[2])


# --------------------------------------------------------------------------- DLRM's user-only part on U rows
def small_dlrm(keys):
    torch.manual_seed(0)
    ebc = build_collection([TableConfig(k, 50, 8) for k in keys], SparseOptimizer("rowwise_adagrad", 0.1), seed=0)
    return DLRM(3, ebc, [16], [16, 8])


def jagged_batch(rng, keys, n, max_len):
    lens = torch.from_numpy(rng.integers(0, max_len + 1, len(keys) * n))
    return KeyedJaggedTensor(keys, torch.from_numpy(rng.integers(0, 50, int(lens.sum()))), lens, stride=n)


@pytest.mark.parametrize("unique_rows", [64, 9])  # 64: sessions of length 1 (U = B), nothing to deduplicate
def test_forward_dedup_matches_plain_dlrm(unique_rows):
    """forward_dedup vs the plain DLRM over 4 training steps, user tables interleaved with item tables."""
    keys, user_keys, item_keys = ["a", "b", "c", "d", "e", "f"], ["e", "b", "d"], ["a", "c", "f"]
    plain, dedup = small_dlrm(keys), small_dlrm(keys)
    assert plain.state_dict().keys() == dedup.state_dict().keys()
    opts = [torch.optim.Adam(m.dense_parameters(), lr=0.01) for m in (plain, dedup)]
    rng = np.random.default_rng(unique_rows)
    for step in range(4):
        n = 64
        uniq = jagged_batch(rng, user_keys, unique_rows, 3)  # empty lists included
        inv = torch.from_numpy(rng.permutation(n) % unique_rows)
        user = KeyedJaggedTensor(user_keys, uniq.values(), uniq.lengths(), stride=unique_rows,
                                 inverse_indices=(user_keys, inv))
        items, dense, labels = jagged_batch(rng, item_keys, n, 2), torch.randn(n, 3), torch.rand(n).round()
        full = {**user.expand().to_dict(), **items.to_dict()}
        plain_kjt = KeyedJaggedTensor(keys, torch.cat([full[k].values for k in keys]),
                                      torch.cat([full[k].lengths for k in keys]), stride=n)
        logits = [plain(dense, plain_kjt), dedup.forward_dedup(dense, items, user)]
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-6)
        for m, opt, out in zip((plain, dedup), opts, logits):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.binary_cross_entropy_with_logits(out, labels).backward()
            opt.step()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(dedup.state_dict()[k], v, rtol=1e-4, atol=1e-6)
    for tp, td, t0 in zip(plain.embeddings.tables, dedup.embeddings.tables, small_dlrm(keys).embeddings.tables):
        torch.testing.assert_close(td.storage.weight, tp.storage.weight, rtol=1e-4, atol=1e-6)
        assert not torch.equal(td.storage.weight, t0.storage.weight), "trained"


def test_checkpoint_trained_with_dedup_loads_into_the_plain_model(tmp_path):
    ds = synth(tmp_path / "d", by="session", window=2048)
    t = Trainer(TrainConfig(data=str(ds.root), out=str(tmp_path / "o"), embedding_dim=8, bottom_mlp=[16],
                            top_mlp=[16], batch_size=128, max_steps=4, progress=False, dedup=True))
    t.fit()
    plain, _, _ = load_for_eval(str(tmp_path / "o"))  # strict load_state_dict into a plain DLRM
    t.model.eval()
    with torch.no_grad():
        for b in list(ds.batches("test", 256, dedup=True))[:3]:
            assert b.user.stride() * 2 < b.size, "the batch must actually deduplicate"
            ref = plain(b.dense, b.full_sparse())
            assert torch.equal(t.model(b.dense, b.full_sparse()), ref), "same weights"
            torch.testing.assert_close(t.model(b.dense, b.sparse, b.user), ref, rtol=1e-5, atol=1e-6)

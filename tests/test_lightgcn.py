"""LightGCN on tierec tables: the per-user split, BPR triples, propagation, gradients, tiers, metrics, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tierec.cli import main
from tierec.data.graph import BprBatches, split_interactions
from tierec.data.sequences import SequenceData
from tierec.modules.lightgcn import InteractionGraph, LightGCN
from tierec.modules.optim import SparseOptimizer
from tierec.train.graph import graph_of, topk_metrics


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny graphs gain nothing from a second thread, and on a loaded 2-core machine torch's second thread
    waiting for a core made these tests ~8x slower (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n_users: int = 40, n_items: int = 30, seed: int = 1, max_len: int = 12) -> SequenceData:
    """Random histories (repeats included: the graph keeps distinct pairs)."""
    rng = np.random.default_rng(seed)
    hist = [rng.integers(1, n_items + 1, size=int(rng.integers(1, max_len))) for _ in range(n_users)]
    offsets = np.zeros(n_users + 1, np.int64)
    offsets[1:] = np.cumsum([len(h) for h in hist])
    return SequenceData(np.concatenate(hist), offsets, n_items)


def _graph(n_users=25, n_items=20, edges=90, seed=0) -> InteractionGraph:
    rng = np.random.default_rng(seed)
    return InteractionGraph(n_users, n_items, rng.integers(0, n_users, edges), rng.integers(0, n_items, edges))


# --------------------------------------------------------------------------- data
def test_split_is_per_user_seeded_and_complete():
    ds = _data()
    sp = split_interactions(ds, 0.2, seed=3)
    pairs = {(u, int(i) - 1) for u in range(ds.num_users) for i in ds.history(u)}
    train = set(zip(sp.train_users.tolist(), sp.train_items.tolist(), strict=True))
    test = set(zip(sp.test_users.tolist(), sp.test_items.tolist(), strict=True))
    assert train | test == pairs and not train & test and len(train) == len(sp.train_users)
    for u in range(ds.num_users):
        n = len({int(i) for i in ds.history(u)})
        n_test = min(math.floor(0.2 * n + 0.5), n - 1)
        assert sum(1 for x in test if x[0] == u) == n_test
    again = split_interactions(ds, 0.2, seed=3)
    assert np.array_equal(again.test_items, sp.test_items) and np.array_equal(again.test_users, sp.test_users)
    other = split_interactions(ds, 0.2, seed=4)
    assert not (np.array_equal(other.test_items, sp.test_items) and np.array_equal(other.test_users, sp.test_users))
    assert sp.test_user_ids.tolist() == sorted(set(sp.test_users.tolist()))


def test_bpr_batches_cover_every_training_pair_with_unseen_negatives():
    sp = split_interactions(_data(), 0.2, seed=0)
    b = BprBatches(sp, 16)
    seen = []
    for users, pos, neg in b.epoch(0, 0):
        assert sp.in_train(users, pos).all() and not sp.in_train(users, neg).any()
        seen += list(zip(users.tolist(), pos.tolist(), strict=True))
    assert sorted(seen) == list(zip(sp.train_users.tolist(), sp.train_items.tolist(), strict=True))
    first = [x.tolist() for x in next(iter(b.epoch(0, 1)))]
    assert first == [x.tolist() for x in next(iter(b.epoch(0, 1)))]  # from (seed, epoch) alone
    assert first != [x.tolist() for x in next(iter(b.epoch(0, 2)))]


# --------------------------------------------------------------------------- model
def _dense_reference(g: InteractionGraph, e0: torch.Tensor, layers: int) -> torch.Tensor:
    a = g.adj.to_dense().to(torch.float64)
    x, out = e0.to(torch.float64), e0.to(torch.float64).clone()
    for _ in range(layers):
        x = a @ x
        out = out + x
    return out / (layers + 1)


def test_normalised_adjacency_is_symmetric_with_degree_weights():
    g = _graph()
    a = g.adj.to_dense()
    assert torch.equal(a, a.T)
    deg = (a != 0).sum(1).to(torch.float32)
    r, c = (a != 0).nonzero().unbind(1)
    assert torch.allclose(a[r, c], 1 / torch.sqrt(deg[r] * deg[c]))
    assert ((r < g.num_users) != (c < g.num_users)).all()  # bipartite: user-item entries only


@pytest.mark.parametrize("layers", [0, 1, 3])
def test_propagation_equals_dense_reference_and_khop_equals_full(layers):
    g = _graph()
    khop = LightGCN(g, 8, layers, seed=5)
    full = LightGCN(g, 8, layers, seed=5, propagation="full")
    with torch.no_grad():
        e0 = khop.lookup(torch.arange(g.num_nodes))
    ref = _dense_reference(g, e0, layers)
    users, items = khop.final_embeddings()
    assert torch.allclose(torch.cat([users, items]).double(), ref, atol=1e-7, rtol=1e-5)
    nodes = torch.tensor([0, 3, 7, g.num_users + 2, g.num_users + 11])
    with torch.no_grad():
        fk, zk = khop.propagate(nodes)
        ff, zf = full.propagate(nodes)
    # the K-hop sub-matrices sum each row over the same neighbours in the same order as the whole graph
    assert torch.equal(fk, ff) and torch.equal(zk, e0[nodes]) and torch.equal(fk, torch.cat([users, items])[nodes])
    assert torch.allclose(fk.double(), ref[nodes], atol=1e-7, rtol=1e-5)


def test_khop_reads_only_the_neighbourhood():
    # two components: users 0-1 with items 0-1, users 2-3 with items 2-3
    g = InteractionGraph(4, 4, [0, 1, 1, 2, 3], [0, 0, 1, 2, 3])
    m = LightGCN(g, 4, 2)
    m.propagate(torch.tensor([0]))
    assert m.last_rows == 3  # user 0 -> item 0 -> user 1 (2 hops), never item 1 (3 hops) or the other component
    sets, _ = g.khop(torch.tensor([0]), 2)
    assert [s.tolist() for s in sets] == [[0], [0, 4], [0, 1, 4]]


@dataclass(frozen=True)
class _Recording(SparseOptimizer):
    """Records (table rows, rows, gradient) of every fused update instead of applying it."""

    log: list | None = None

    def update(self, weight, state, index, grad, step=1):  # type: ignore[override]
        assert self.log is not None
        self.log.append((weight.shape[0], index.clone(), grad.clone()))


@pytest.mark.parametrize("propagation", ["khop", "full"])
def test_bpr_gradient_matches_plain_torch(propagation):
    """The gradient each table's fused optimizer receives equals autograd's on a dense float64 reference
    (the same loss: BPR + l2_reg / 2 * squared norms of the triples' layer-0 rows / B). Tolerance: float32
    sparse sums vs float64 dense ones over 3 layers, ~1e-6 relative."""
    g = _graph(30, 25, 120, seed=2)
    log: list = []
    model = LightGCN(g, 8, 3, l2_reg=0.1, optimizer=_Recording("sgd", 1.0, log=log), seed=1, propagation=propagation)
    users, pos, neg = torch.tensor([0, 4, 4, 9]), torch.tensor([1, 2, 3, 1]), torch.tensor([7, 7, 11, 0])
    with torch.no_grad():
        e0 = model.lookup(torch.arange(g.num_nodes)).double()
    model.loss(users, pos, neg).backward()
    (_, u_rows, u_grad), (_, i_rows, i_grad) = sorted(log, key=lambda r: r[0], reverse=True)  # user table: 30 rows
    got = torch.zeros(g.num_nodes, 8, dtype=torch.float64)
    got[u_rows] = u_grad.double()
    got[i_rows + g.num_users] = i_grad.double()

    ref_e0 = e0.clone().requires_grad_(True)
    final = _dense_reference(g, ref_e0, 3)
    U = g.num_users
    fu, fp, fn = final[users], final[U + pos], final[U + neg]
    bpr = -F.logsigmoid((fu * fp).sum(-1) - (fu * fn).sum(-1)).mean()
    reg = 0.1 / 2 * (ref_e0[users].pow(2).sum() + ref_e0[U + pos].pow(2).sum() + ref_e0[U + neg].pow(2).sum()) / 4
    (bpr + reg).backward()
    ref = ref_e0.grad
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    looked_up = torch.cat([u_rows, i_rows + U])
    assert (ref.abs().sum(1)[torch.ones(g.num_nodes, dtype=torch.bool).index_fill_(0, looked_up, False)] == 0).all()
    if propagation == "full":
        assert looked_up.numel() == g.num_nodes


def _ssd_factory(tmp_path: Path, cache_rows: int):
    from tierec.storage.cache import CachedTable
    from tierec.storage.lazy import RowInit
    from tierec.storage.ssd import SsdTable

    def factory(i, cfg, state_dim):
        ssd = SsdTable(tmp_path / f"{cfg.name}.tbl", cfg.num_embeddings, cfg.embedding_dim, state_dim, create=True,
                       init_seed=7, table_index=i, init="lazy",
                       lazy_init=RowInit(7, i, cfg.num_embeddings, cfg.embedding_dim))
        return CachedTable(ssd, cache_rows, "lru")

    return factory


@pytest.mark.parametrize("propagation", ["khop", "full"])
def test_ssd_tables_behind_a_small_cache_are_bit_identical(tmp_path, propagation):
    sp = split_interactions(_data(60, 50, seed=3), 0.2, seed=0)
    runs = []
    for factory in (None, _ssd_factory(tmp_path / propagation, 6)):
        if factory is not None:
            (tmp_path / propagation).mkdir()
        model = LightGCN(graph_of(sp), 8, 2, optimizer=SparseOptimizer("adam", 0.01), seed=7,
                         storage_factory=factory, propagation=propagation)
        losses = []
        for users, pos, neg in BprBatches(sp, 32).epoch(0, 0):
            loss = model.loss(torch.from_numpy(users), torch.from_numpy(pos), torch.from_numpy(neg))
            loss.backward()
            losses.append(loss.item())
            if len(losses) == 6:
                break
        u, i = model.final_embeddings()
        runs.append((losses, u, i))
    assert len(runs[0][0]) == 6 and runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])


def test_training_separates_positives_from_negatives():
    sp = split_interactions(_data(60, 50, seed=3), 0.2, seed=0)
    model = LightGCN(graph_of(sp), 16, 2, optimizer=SparseOptimizer("adam", 0.05), seed=0)
    losses = []
    for e in range(4):
        for users, pos, neg in BprBatches(sp, 32).epoch(0, e):
            loss = model.loss(torch.from_numpy(users), torch.from_numpy(pos), torch.from_numpy(neg))
            loss.backward()
            losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=0.02) and np.mean(losses[-5:]) < 0.5, losses[::10]


# --------------------------------------------------------------------------- metrics
def test_topk_metrics_hand_computed():
    # 2 users, 5 items, dim = 5 one-hot items: score(u, i) = user_emb[u, i]
    ds = SequenceData(np.array([1, 2, 3, 4, 5, 1, 2, 3]), np.array([0, 5, 8]), 5)
    sp = split_interactions(ds, 0.4, seed=0)
    items = torch.eye(5)
    user = torch.tensor([[5.0, 4, 3, 2, 1], [1.0, 2, 3, 4, 5]])
    res = topk_metrics(user, items, sp, k=2)
    want_r, want_n = [], []
    for u in range(2):
        train = set(sp.train_items[sp.train_users == u].tolist())
        test = set(sp.test_items[sp.test_users == u].tolist())
        ranked = [i for i in np.argsort(-user[u].numpy(), kind="stable") if i not in train][:2]
        hits = [1.0 if i in test else 0.0 for i in ranked]
        want_r.append(sum(hits) / len(test))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(test), 2)))
        want_n.append(sum(h / math.log2(r + 2) for r, h in enumerate(hits)) / idcg)
    assert res["users"] == 2
    assert res["recall@2"] == pytest.approx(np.mean(want_r)) and res["ndcg@2"] == pytest.approx(np.mean(want_n))


# --------------------------------------------------------------------------- CLI
def test_cli_train_eval_resume_and_ssd(tmp_path, capsys):
    src = tmp_path / "pairs.txt"
    ds = _data(50, 40, seed=4)
    src.write_text("".join(f"{u + 1} {i}\n" for u in range(ds.num_users) for i in ds.history(u)))
    assert main(["data", "convert", "--format", "sequences", str(src), "--out", str(tmp_path / "ds")]) == 0
    common = ["train", "--model", "lightgcn", "--data", str(tmp_path / "ds"), "--embedding-dim", "8",
              "--num-layers", "2", "--batch-size", "64", "--lr", "0.01", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "run"), "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "run"), "--epochs", "2", "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs"] == 2 and 0 <= summary["test"]["recall@20"] <= 1 and summary["test"]["users"] > 0
    assert main(["eval", str(tmp_path / "run")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["split"] == "test" and {k: res[k] for k in summary["test"]} == summary["test"]
    # uninterrupted, and with both tables on SSD behind caches of a few rows: the same model
    assert main([*common, "--out", str(tmp_path / "run2"), "--epochs", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == summary["test"]
    assert main([*common, "--out", str(tmp_path / "run3"), "--epochs", "2", "--memory-budget", "2KiB"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == summary["test"]
    assert (tmp_path / "run3" / "tables" / "user.tbl").is_file()
    # a bad setting: one line, exit 2
    assert main([*common, "--out", str(tmp_path / "run4"), "--test-ratio", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test_ratio" in err[0]

"""SASRec on tierec tables: sequence data sets, the leave-one-out protocol, the model, training, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tierec.cli import main
from tierec.data.sequences import (
    MIN_EVAL_LENGTH,
    SequenceBatches,
    SequenceData,
    convert_sequences,
    load_sequences,
)
from tierec.errors import DataError
from tierec.modules.optim import SparseOptimizer
from tierec.modules.sasrec import SASRec
from tierec.train.sequence import evaluate_sequences, rank_metrics, ranks_of

VIDEO = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "seq" / "amazon_video.txt"


def _write_pairs(path: Path, n_users: int = 60, n_items: int = 40, seed: int = 1) -> dict[int, list[int]]:
    """A random ``user item`` file, users interleaved; returns each user's items in order."""
    rng = np.random.default_rng(seed)
    hist = {u: list(rng.integers(1, n_items + 1, size=int(rng.integers(1, 12)))) for u in range(1, n_users + 1)}
    events = [(u, i) for u, items in hist.items() for i in items]
    # interleave users, keeping each user's order: sort by a random key per event, stable within a user
    keys = {u: sorted(rng.random(len(items))) for u, items in hist.items()}
    order = sorted(((keys[u][k], u, i) for u, items in hist.items() for k, i in enumerate(items)))
    assert len(order) == len(events)
    path.write_text("".join(f"{u} {i}\n" for _, u, i in order))
    return {u: [int(x) for x in items] for u, items in hist.items()}


# --------------------------------------------------------------------------- converter
def test_convert_round_trip_and_verification(tmp_path):
    src = tmp_path / "pairs.txt"
    hist = _write_pairs(src)
    m = convert_sequences(src, tmp_path / "ds")
    ds = load_sequences(tmp_path / "ds")
    assert m["num_users"] == len(hist) and m["num_interactions"] == sum(map(len, hist.values()))
    assert ds.num_items == max(max(v) for v in hist.values())
    import hashlib

    assert m["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    for k, u in enumerate(ds.users):
        assert ds.history(k).tolist() == hist[int(u)]
    # a changed npz is refused
    npz = tmp_path / "ds" / "sequences.npz"
    data = bytearray(npz.read_bytes())
    data[-20] ^= 1
    npz.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        load_sequences(tmp_path / "ds")


@pytest.mark.parametrize("bad", ["1 2 3", "1 x", "0 5", "-1 2", "7"])
def test_convert_bad_lines(tmp_path, capsys, bad):
    src = tmp_path / "pairs.txt"
    src.write_text(f"1 2\n\n1 3\n{bad}\n2 4\n")
    rc = main(["data", "convert", "--format", "sequences", str(src), "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and f"{src}:4:" in err[0] and "--skip-bad-rows" in err[0]
    rc = main(["data", "convert", "--format", "sequences", str(src), "--out", str(tmp_path / "ds"),
               "--skip-bad-rows"])
    assert rc == 0
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert m["source"]["bad_rows_skipped"] == 1 and m["num_interactions"] == 3


# --------------------------------------------------------------------------- protocol
def test_split_and_negatives_match_plain_python(tmp_path):
    src = tmp_path / "pairs.txt"
    hist = _write_pairs(src, n_users=80, n_items=30)
    convert_sequences(src, tmp_path / "ds")
    ds = load_sequences(tmp_path / "ds")
    users = [int(u) for u in ds.users]
    ev = [u for u in users if len(hist[u]) >= MIN_EVAL_LENGTH]
    assert [users[k] for k in ds.eval_users] == ev
    assert ds.targets("test").tolist() == [hist[u][-1] for u in ev]
    assert ds.targets("valid").tolist() == [hist[u][-2] for u in ev]
    L = 5
    want_test = [([0] * L + hist[u][:-1])[-L:] for u in ev]
    want_valid = [([0] * L + hist[u][:-2])[-L:] for u in ev]
    assert ds.eval_inputs("test", L).tolist() == want_test
    assert ds.eval_inputs("valid", L).tolist() == want_valid
    for k, u in enumerate(users):
        train = hist[u][:-2] if len(hist[u]) >= MIN_EVAL_LENGTH else hist[u]
        assert ds.train_history(k).tolist() == train

    # negatives: the documented draw (one [E, 100] draw, then rounds redrawing bad positions in row-major order)
    neg = ds.eval_negatives("test", seed=3)
    rng = np.random.default_rng([3, 1])
    ref = rng.integers(1, ds.num_items + 1, size=(len(ev), 100), dtype=np.int64).tolist()
    seen = [set(hist[u]) for u in ev]
    bad = [(r, c) for r in range(len(ev)) for c in range(100) if ref[r][c] in seen[r]]
    while bad:
        new = rng.integers(1, ds.num_items + 1, size=len(bad), dtype=np.int64).tolist()
        for (r, c), x in zip(bad, new, strict=True):
            ref[r][c] = x
        bad = [(r, c) for r, c in bad if ref[r][c] in seen[r]]
    assert neg.tolist() == ref
    assert all(x not in seen[r] for r in range(len(ev)) for x in neg[r])
    assert np.array_equal(ds.eval_negatives("test", seed=3), neg)
    assert not np.array_equal(ds.eval_negatives("valid", seed=3), neg)

    # training batches: next-item targets, negatives never seen and 0 exactly at padding
    b = SequenceBatches(ds, L, 16)
    rows = 0
    for inputs, pos, negs in b.epoch(0, 0):
        rows += len(inputs)
        assert ((pos == 0) == (negs == 0)).all()
        assert (inputs[:, 1:][pos[:, :-1] != 0] == pos[:, :-1][pos[:, :-1] != 0]).all()
    assert rows == sum(1 for k in range(len(users)) if len(ds.train_history(k)) >= 2)
    for k, u in zip(b.users[:5], range(5), strict=True):
        h = ds.train_history(int(k)).tolist()
        assert b.inputs[u].tolist() == ([0] * L + h[:-1])[-L:] and b.positives[u].tolist() == ([0] * L + h[1:])[-L:]


def test_rank_metrics_hand_computed():
    ranks = np.array([0, 3, 9, 10, 50])
    m = rank_metrics(ranks)
    assert m["hr@10"] == pytest.approx(3 / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(11)) / 5)
    # target in column 0; ties count against it
    scores = np.array([[0.5, 0.1, 0.9, 0.5], [2.0, 1.0, 0.0, -1.0]])
    assert ranks_of(scores).tolist() == [2, 0]


def test_evaluate_with_a_fixed_scorer(tmp_path):
    """evaluate_sequences ranks the target among its negatives exactly as computed by hand."""
    src = tmp_path / "pairs.txt"
    _write_pairs(src, n_users=30, n_items=50)
    convert_sequences(src, tmp_path / "ds")
    ds = load_sequences(tmp_path / "ds")

    class ByItemId(SASRec):  # score = item id: rank = negatives with a larger or equal id
        def score(self, inputs, candidates):
            return candidates.to(torch.float32)

    model = ByItemId(ds.num_items, 8, 5, 1, 1, 0.0)
    neg = ds.eval_negatives("test")
    t = ds.targets("test")
    ranks = (neg >= t[:, None]).sum(1)
    assert evaluate_sequences(model, ds, "test") == rank_metrics(ranks)


# --------------------------------------------------------------------------- model
@pytest.mark.parametrize("pre_ln", [False, True])
def test_causal(pre_ln):
    torch.manual_seed(0)
    model = SASRec(50, 16, 8, 2, 2, 0.5, pre_ln).eval()
    x = torch.tensor([[0, 0, 3, 7, 9, 11, 2, 5], [1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        h = model.encode(x, model.lookup(x)[0])
        y = x.clone()
        y[:, 5:] = torch.tensor([[40, 41, 42], [13, 14, 15]])
        h2 = model.encode(y, model.lookup(y)[0])
    assert torch.equal(h[:, :5], h2[:, :5])
    assert not torch.allclose(h[:, 5:], h2[:, 5:])


def test_one_table_call_per_step_and_rows_train():
    model = SASRec(30, 8, 6, 1, 1, 0.0, optimizer=SparseOptimizer("adam", 0.01))
    calls = []
    model.table.register_forward_hook(lambda m, i, o: calls.append(i[0].numel()))
    x = torch.tensor([[0, 0, 1, 2, 3, 4]])
    pos = torch.tensor([[0, 0, 2, 3, 4, 5]])
    neg = torch.tensor([[0, 0, 9, 9, 10, 11]])
    ws = model.table.storage.acquire(torch.arange(31))
    before = ws.weight[ws.index].clone()
    model.loss(x, pos, neg).backward()
    assert calls == [8]  # one call: items 1..5, 9, 10, 11 once each; padding is an empty bag
    ws = model.table.storage.acquire(torch.arange(31))
    after = ws.weight[ws.index]
    changed = (before != after).any(1).nonzero().flatten().tolist()
    assert changed == [1, 2, 3, 4, 5, 9, 10, 11]


# --------------------------------------------------------------------------- training
def _popularity_hr(ds: SequenceData, split: str) -> float:
    pop = np.bincount(np.concatenate([ds.train_history(k) for k in range(ds.num_users)]),
                      minlength=ds.num_items + 1).astype(np.float64)
    cand = np.concatenate([ds.targets(split)[:, None], ds.eval_negatives(split)], 1)
    return rank_metrics(ranks_of(pop[cand]))["hr@10"]


def _train(model: SASRec, batches: SequenceBatches, epochs: int, lr: float, max_steps: int | None = None):
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    losses, step = [], 0
    for e in range(epochs):
        for x, p, n in batches.epoch(0, e):
            loss = model.loss(torch.from_numpy(x), torch.from_numpy(p), torch.from_numpy(n))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if max_steps is not None and step >= max_steps:
                return losses
    return losses


@pytest.mark.skipif(not VIDEO.is_file(), reason="amazon_video.txt not available")
def test_training_on_amazon_video_beats_popularity(tmp_path):
    convert_sequences(VIDEO, tmp_path / "video")
    ds = load_sequences(tmp_path / "video", max_users=3000)
    torch.manual_seed(0)
    flushed = torch.set_flush_denormal(True)
    try:
        model = SASRec(ds.num_items, 32, 50, 2, 1, 0.5, optimizer=SparseOptimizer("adam", 0.002, beta2=0.98))
        _train(model, SequenceBatches(ds, 50, 128), 3, 0.002)
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    res = evaluate_sequences(model, ds, "valid")
    pop = _popularity_hr(ds, "valid")
    assert res["users"] == len(ds.eval_users) > 2900
    assert res["hr@10"] > pop, (res, pop)


def test_ssd_cached_item_table_is_bit_identical(tmp_path):
    from tierec.storage.cache import CachedTable
    from tierec.storage.lazy import RowInit
    from tierec.storage.ssd import SsdTable

    src = tmp_path / "pairs.txt"
    _write_pairs(src, n_users=100, n_items=300)
    convert_sequences(src, tmp_path / "ds")
    ds = load_sequences(tmp_path / "ds")

    def ssd_factory(i, cfg, state_dim):
        ssd = SsdTable(tmp_path / f"{cfg.name}.tbl", cfg.num_embeddings, cfg.embedding_dim, state_dim, create=True,
                       init_seed=7, table_index=i, init="lazy",
                       lazy_init=RowInit(7, i, cfg.num_embeddings, cfg.embedding_dim))
        return CachedTable(ssd, 40, "lru")

    runs = []
    for factory in (None, ssd_factory):
        torch.manual_seed(0)
        model = SASRec(ds.num_items, 16, 10, 2, 1, 0.2, optimizer=SparseOptimizer("adam", 0.01, beta2=0.98), seed=7,
                       storage_factory=factory)
        runs.append(_train(model, SequenceBatches(ds, 10, 16), 1, 0.01, max_steps=5))
    assert len(runs[0]) == 5 and runs[0] == runs[1]


# --------------------------------------------------------------------------- CLI
def test_cli_train_eval_resume(tmp_path, capsys):
    src = tmp_path / "pairs.txt"
    _write_pairs(src, n_users=120, n_items=60)
    assert main(["data", "convert", "--format", "sequences", str(src), "--out", str(tmp_path / "ds")]) == 0
    common = ["train", "--model", "sasrec", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"),
              "--embedding-dim", "8", "--max-len", "10", "--batch-size", "32", "--num-blocks", "1", "--no-progress"]
    assert main([*common, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main([*common, "--epochs", "2", "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs"] == 2 and 0 <= summary["test"]["hr@10"] <= 1
    assert main(["eval", str(tmp_path / "run")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["split"] == "test" and res["hr@10"] == summary["test"]["hr@10"]
    # resuming gives the run an uninterrupted one reaches
    assert main([*common[:-1], "--out", str(tmp_path / "run2"), "--epochs", "2", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == summary["test"]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2]


def test_dense_item_adam_is_torch_adam_on_the_whole_table():
    """``SparseOptimizer(dense=True)`` over steps that touch a few rows each equals torch.optim.Adam on the whole
    table bit for bit (rows a step does not touch move by their momentum); the lazy one leaves them still."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(50, 6, generator=gen)
    ref = torch.nn.Parameter(w0.clone())
    torch_adam = torch.optim.Adam([ref], lr=0.01, betas=(0.9, 0.98))
    dense, lazy = SparseOptimizer("adam", 0.01, beta2=0.98, dense=True), SparseOptimizer("adam", 0.01, beta2=0.98)
    w, state = w0.clone(), torch.zeros(50, 12)
    wl, statel = w0.clone(), torch.zeros(50, 12)
    for step in range(1, 8):
        index = torch.unique(torch.randint(0, 50, (9,), generator=gen))
        grad = torch.randn(index.numel(), 6, generator=gen)
        full = torch.zeros(50, 6)
        full[index] = grad
        ref.grad = full
        torch_adam.step()
        moved = dense.update(w, state, index, grad, step)
        assert moved is not None and moved.numel() == 50
        assert lazy.update(wl, statel, index, grad, step) is None
        torch.testing.assert_close(w, ref.detach(), rtol=0, atol=0)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[index] = False
    assert not torch.equal(w[untouched], wl[untouched])  # momentum moved rows the last step did not touch
    with pytest.raises(Exception, match="Adam only"):
        SparseOptimizer("rowwise_adagrad", dense=True)


def _item_rows(run: Path) -> torch.Tensor:
    """The item table's weights in the latest checkpoint of ``run`` (its chain resolved)."""
    from tierec.storage.ssd import open_table_chain
    from tierec.train import checkpoint as ckpt

    path = ckpt.resolve_checkpoint(str(run))
    m = ckpt.read_manifest(path)
    (t,) = m["tables"]
    chain = [(d, mm["files"]) for d, mm in ckpt.table_chain(path, m)]
    with open_table_chain(chain, t["file"], t["num_embeddings"], t["dim"], t["state_dim"]) as f:
        return f.read_rows(0, t["num_embeddings"])[0]


def test_cli_dense_item_adam_resumes_exactly_and_needs_the_table_in_memory(tmp_path, capsys):
    src = tmp_path / "pairs.txt"
    _write_pairs(src, n_users=120, n_items=3000)  # most items untouched by a step: moved by momentum alone
    assert main(["data", "convert", "--format", "sequences", str(src), "--out", str(tmp_path / "ds")]) == 0
    common = ["train", "--model", "sasrec", "--data", str(tmp_path / "ds"), "--embedding-dim", "8", "--max-len", "10",
              "--batch-size", "32", "--num-blocks", "1", "--item-adam", "dense", "--no-progress"]
    # a base checkpoint and an incremental one (rows moved by momentum alone must be in it), then resume
    assert main([*common, "--out", str(tmp_path / "run"), "--epochs", "2"]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "run"), "--epochs", "3", "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out)["test"]
    assert main([*common, "--out", str(tmp_path / "whole"), "--epochs", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == resumed
    rows = [_item_rows(tmp_path / r) for r in ("run", "whole")]
    assert torch.equal(rows[0], rows[1])  # rows moved by momentum alone are saved too
    assert main([*common, "--out", str(tmp_path / "ssd"), "--epochs", "1", "--memory-budget", "2KiB"]) == 2
    err = capsys.readouterr().err
    assert "--item-adam dense" in err and len(err.strip().splitlines()) == 1

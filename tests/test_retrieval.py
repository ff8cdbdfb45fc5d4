"""Two-tower training, the HNSW index (recall vs exact, memory-mapped file) and the serving cache's admission rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tierec.data.synth import SynthConfig, generate
from tierec.errors import ConfigError
from tierec.inference.model_store import SharedCache, SsdView
from tierec.inference.retrieval import HnswIndex, HnswParams, exact_topk, recall_at_k
from tierec.storage.ssd import SsdTable
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_hnsw_recall_at_10_vs_exact_and_mmap_file(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, 16))
    items = unit(centers[rng.integers(0, 50, 5000)] + 0.5 * rng.normal(size=(5000, 16)))
    queries = unit(rng.normal(size=(200, 16)))
    params = HnswParams(M=32, ef_construction=200, ef_search=128)
    exact = exact_topk(items, queries, 10)
    mem = HnswIndex.build(items, params)
    _, approx = mem.search(queries, 10)
    assert recall_at_k(approx, exact) >= 0.95
    weak = HnswIndex.build(items, HnswParams(M=4, ef_construction=8, ef_search=10))
    assert recall_at_k(weak.search(queries, 10)[1], exact) < recall_at_k(approx, exact)  # the metric can fail
    disk = HnswIndex.build(items, params, tmp_path / "items.faiss", mmap=True)
    assert disk.ntotal == 5000
    assert np.array_equal(disk.search(queries, 10)[1], approx)  # same graph from the mapped file


def test_recall_at_k_counts_overlap():
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 9]])) == pytest.approx(2 / 3)


def test_shared_cache_admits_on_second_sighting_and_returns_ssd_rows(tmp_path):
    n, d = 1000, 4
    ssd = [SsdTable(tmp_path / f"t{i}.tbl", n, d, 1, create=True, init_seed=0, table_index=i) for i in range(2)]
    ro = [SsdTable(tmp_path / f"t{i}.tbl", n, d, 1, readonly=True) for i in range(2)]
    st = SharedCache(ro, 50, admit_after=2, admit_batch=1)
    ids = torch.arange(100, 130)
    rows = st.fetch({0: ids, 1: ids[:5]})
    assert torch.equal(rows[0], ssd[0].read(ids)[0]) and torch.equal(rows[1], ssd[1].read(ids[:5])[0])
    assert st.cache.size == 0  # first sighting: read from SSD, not cached
    st.fetch({1: torch.arange(100, 110)})
    assert st.cache.size == 5  # rows 100..104 of table 1, seen twice, are admitted; 105..109 are not
    assert bool(st.cache.contains(torch.arange(100, 105) + n).all())
    st.fetch({0: torch.arange(500, 900)})  # a scan of one-off IDs does not flush them
    assert bool(st.cache.contains(torch.arange(100, 105) + n).all())
    again = st.fetch({1: torch.arange(100, 105)})[1]
    assert st.hits == 5 and torch.equal(again, ssd[1].read(torch.arange(100, 105))[0])
    view = SsdView(st, 1, n, "C2")
    ws = view.acquire(torch.arange(3))
    assert torch.equal(ws.weight[ws.index], ssd[1].read(torch.arange(3))[0])
    with pytest.raises(RuntimeError):
        view.release(ws, dirty=True)


def test_shared_cache_admits_in_batches_without_rereading(tmp_path):
    n = 1000
    SsdTable(tmp_path / "t.tbl", n, 4, 1, create=True, init_seed=0)
    ro = SsdTable(tmp_path / "t.tbl", n, 4, 1, readonly=True)
    st = SharedCache([ro], 100, admit_after=1, admit_batch=20)
    st.fetch({0: torch.arange(0, 15)})
    assert st.cache.size == 0  # 15 queued, below the admission batch
    read = ro.stats()["rows_read"]
    st.fetch({0: torch.arange(15, 30)})
    assert st.cache.size == 0  # admission waits for maintain() (between the server's batches)
    assert st.maintain() and not st.maintain()
    assert st.cache.size == 30 and st.admitted == 30
    assert ro.stats()["rows_read"] == read + 15  # admitted rows came from the queue, not the file again
    assert torch.equal(st.fetch({0: torch.arange(30)})[0], ro.read(torch.arange(30))[0])
    st.fetch({0: torch.arange(100, 180)})  # nobody calls maintain(): fetch admits at 4 batches queued
    assert st.cache.size == 100 and st.admitted == 110


@pytest.mark.parametrize("batched", ["aio", "lanes"])
def test_direct_io_concurrent_reads_match_memmap(tmp_path, monkeypatch, batched):
    """read_many (all tables' misses in one plan, all blocks in flight by Linux AIO, or concurrent
    preadv lanes) == per-table reads."""
    from concurrent.futures import ThreadPoolExecutor

    from tierec.storage import blockio, multifile
    from tierec.storage.multifile import read_many

    if batched == "lanes":
        monkeypatch.setattr(blockio, "use_aio", lambda *a: False)
        monkeypatch.setattr(multifile, "READ_GAP_BLOCKS", 0)  # one run per block group: 4 lanes busy below

    n, d = 5000, 7  # 32-byte rows: several rows per 4 KiB block, rows straddling blocks
    for i in range(3):
        SsdTable(tmp_path / f"t{i}.tbl", n, d, 1, create=True, init_seed=0, table_index=i)
    mm = [SsdTable(tmp_path / f"t{i}.tbl", n, d, 1, readonly=True) for i in range(3)]
    dio = [SsdTable(tmp_path / f"t{i}.tbl", n, d, 1, readonly=True, direct_io=True) for i in range(3)]
    g = torch.Generator().manual_seed(0)
    ids = [torch.unique(torch.randint(0, n, (k,), generator=g)) for k in (300, 1, 0)]
    ids[0] = torch.cat([ids[0], torch.tensor([n - 1])]).unique()  # the file's last (partial) block
    with ThreadPoolExecutor(4) as pool:
        for p in (pool, None):
            got = read_many([(t, x.numpy()) for t, x in zip(dio, ids)], p, lanes=4)
            for t, x, r in zip(mm, ids, got):
                w, s = t.read(x)
                assert r.shape == (x.numel(), d + 1) and np.array_equal(r, torch.cat([w, s], 1).numpy())
    assert dio[0].stats()["rows_read"] == 2 * ids[0].numel()

    class CountingPool(ThreadPoolExecutor):
        submits = 0

        def submit(self, *a, **k):
            CountingPool.submits += 1
            return super().submit(*a, **k)

    few = [torch.arange(0, 4000, 300)[:12] for _ in dio]  # 12 rows per table: 36 in all, over LANE_MIN_ROWS
    with CountingPool(4) as pool:
        got = read_many([(t, x.numpy()) for t, x in zip(dio, few)], pool, lanes=4)
    # small per-table reads still share one batched read: all blocks at once (AIO), or 4 lanes (3 on the pool)
    assert CountingPool.submits == (0 if batched == "aio" else 3)
    for t, x, r in zip(mm, few, got):
        assert np.array_equal(r, torch.cat(t.read(x), 1).numpy())
    st = SharedCache(dio, 50, admit_after=1, pool=None)
    glob = torch.cat([ids[0], ids[1] + n])
    rows = st.fetch({0: ids[0], 1: ids[1]})
    assert torch.equal(rows[0], mm[0].read(ids[0])[0]) and torch.equal(rows[1], mm[1].read(ids[1])[0])
    assert glob.numel() == st.lookups


def test_two_tower_trains_and_records_its_kind(tmp_path):
    data = tmp_path / "d"
    generate(SynthConfig(rows=6000, num_sparse=4, cardinalities=[500], num_dense=2, session_length=4,
                         user_features=1, seed=2, progress=False), data, progress=False)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "tt"), model="two-tower", batch_size=256, epochs=2,
                      progress=False, num_threads=1)
    summary = Trainer(cfg).fit()
    assert summary["auc"] > 0.55
    from tierec.train.checkpoint import read_manifest, resolve_checkpoint

    assert read_manifest(resolve_checkpoint(tmp_path / "tt"))["config"]["model"] == "two-tower"
    nouser = tmp_path / "n"
    generate(SynthConfig(rows=1000, num_sparse=3, cardinalities=[100], num_dense=1, seed=0, progress=False),
             nouser, progress=False)
    with pytest.raises(ConfigError, match="user-side"):
        Trainer(TrainConfig(data=str(nouser), out=str(tmp_path / "x"), model="two-tower", progress=False))


def test_two_tower_on_deduplicated_batches_matches_plain(tmp_path):
    """Deduplicated batches run the user tower once per unique user row: same first loss, close weights."""
    import json

    data = tmp_path / "d"
    generate(SynthConfig(rows=3000, num_sparse=4, cardinalities=[500], num_dense=2, session_length=8,
                         user_features=2, seed=2, progress=False), data, progress=False, cluster_by="session",
             cluster_window=2048)
    losses = {}
    for dedup in (False, True):
        cfg = TrainConfig(data=str(data), out=str(tmp_path / f"tt{dedup}"), model="two-tower", batch_size=128,
                          max_steps=5, progress=False, num_threads=1, dedup=dedup, log_every=1)
        Trainer(cfg).fit()
        losses[dedup] = [json.loads(x)["loss"] for x in (tmp_path / f"tt{dedup}" / "metrics.jsonl").read_text()
                         .splitlines() if json.loads(x)["event"] == "train"]
    assert len(losses[True]) == 5 and losses[True][0] == pytest.approx(losses[False][0], rel=1e-6)
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_batcher_runs_idle_work_only_when_no_request_waits():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from tierec.inference.batcher import DynamicBatcher

    events = []

    def run(payloads):
        events.append(("batch", sum(len(p) for p in payloads)))
        return [len(p) for p in payloads]

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = DynamicBatcher(run, max_batch=4, max_wait_s=0.01, executor=ex, idle=lambda: events.append(("idle",)))
            b.start()
            res = await asyncio.gather(*(b.submit([0] * 2) for _ in range(5)))  # 10 items: batches of 4, 4, 2
            await asyncio.sleep(0.05)
            await b.stop()
            return res

    assert asyncio.run(main()) == [2] * 5
    assert [e[1] for e in events if e[0] == "batch"] == [4, 4, 2]
    assert events[-1] == ("idle",) and ("idle",) not in events[:2]  # not while requests were waiting


def test_sampled_eviction_keeps_frequent_rows_and_protected_ones(tmp_path):
    """victim_sample: victims come from a random sample, lowest frequency first, never a row the
    same acquire needs; the cache stays full and correct."""
    from tierec.storage.base import InMemoryTable
    from tierec.storage.cache import CachedTable

    n, cap = 10_000, 1000
    ids = torch.arange(n)
    freq = (ids, torch.where(ids < 500, 1000, 1))  # rows 0..499 are hot
    table = InMemoryTable(n, 4, 0)
    table.weight.copy_(torch.randn(n, 4, generator=torch.Generator().manual_seed(0)))  # torch.empty may hold NaN
    c = CachedTable(table, cap, "freq", freq=freq)
    c.victim_sample = 32
    c.warm_up(torch.arange(cap))
    for a in range(cap, 3000, 100):  # admit cold rows 100 at a time
        new = torch.arange(a, a + 100)
        w, _ = c.read(new)
        assert torch.equal(w, c.backing.weight[new]) and bool(c.contains(new).all())
        assert c.size == cap
    assert bool(c.contains(torch.arange(500)).all())  # no hot row was ever chosen

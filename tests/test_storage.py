"""Tiered storage: SSD table files, the row cache (exactness against InMemoryTable), policies, stats."""

import errno
import fcntl
import json
import logging
import os

import numpy as np
import pytest
import torch

from tierec.errors import CheckpointError, ConfigError
from tierec.modules.embedding import TableConfig, build_collection
from tierec.storage.base import InMemoryTable, init_rows
from tierec.modules.optim import KINDS, SparseOptimizer
from tierec.sparse import KeyedJaggedTensor
from tierec.storage import CachedTable, CountMinSketch, SsdTable
from tierec.storage.ssd import open_table_file
from tierec.storage import aio
from tierec.storage import blockio
from tierec.train.checkpoint import read_table_file, write_table_file

SEED = 7


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add sync waits, which become milliseconds per op when
    # other processes share the two cores. Restored after this module.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------- SsdTable
def test_ssd_create_read_write_roundtrip(tmp_path):
    n, d, s = 1000, 6, 2
    t = SsdTable(tmp_path / "t.tbl", n, d, s, create=True, init_seed=SEED, table_index=3)
    assert (tmp_path / "t.tbl").stat().st_size == n * (d + s) * 4
    meta = (tmp_path / "t.tbl.json").read_text()
    assert '"sha256"' in meta and '"num_embeddings": 1000' in meta
    assert t.verify()
    w, st = t.read_rows(0, n)
    assert torch.equal(w, init_rows(SEED, 3, n, d, 0, n)) and torch.equal(st, torch.zeros(n, s))
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([999, 0, 17, 18, 500])
    nw, ns = torch.randn(5, d, generator=g), torch.randn(5, s, generator=g)
    t.write(ids, nw, ns)
    rw, rs = t.read(ids)
    assert torch.equal(rw, nw) and torch.equal(rs, ns)
    assert '"sha256"' not in (tmp_path / "t.tbl.json").read_text(), "checksum must go once the file changes"
    t.write_rows(100, nw, ns)
    t.flush()
    t.close()
    t2 = SsdTable.open(tmp_path / "t.tbl")
    rw, rs = t2.read(torch.arange(100, 105))
    assert torch.equal(rw, nw) and torch.equal(rs, ns)
    rw, rs = t2.read(ids)
    assert torch.equal(rw, nw)
    # acquire/release alone: a temporary working set written back when dirty
    ws = t2.acquire(torch.tensor([1, 2]))
    assert torch.equal(ws.index, torch.arange(2))
    ws.weight.add_(1.0)
    t2.release(ws, dirty=True)
    assert torch.equal(t2.read(torch.tensor([1, 2]))[0], init_rows(SEED, 3, n, d, 1, 3) + 1.0)
    st_ = t2.stats()
    assert st_["rows_written"] == 2 and st_["bytes_read"] == st_["rows_read"] * (d + s) * 4
    with pytest.raises(IndexError):
        t2.read(torch.tensor([n]))


def test_ssd_size_mismatch_raises(tmp_path):
    p = tmp_path / "t.tbl"
    SsdTable(p, 100, 4, 1, create=True, init_seed=0).close()
    with pytest.raises(CheckpointError, match="t.tbl"):
        SsdTable(p, 100, 8, 1)  # sidecar says dim 4
    os.truncate(p, 100 * 5 * 4 - 4)
    with pytest.raises(CheckpointError, match=r"t\.tbl: 1996 bytes, expected 2000.*truncated"):
        SsdTable(p, 100, 4, 1)
    os.unlink(str(p) + ".json")
    os.truncate(p, 100 * 5 * 4)
    SsdTable(p, 100, 4, 1).close()  # no sidecar: size alone decides
    with pytest.raises(CheckpointError, match="t.tbl"):
        SsdTable(p, 101, 4, 1)
    with pytest.raises(CheckpointError, match="does not exist"):
        SsdTable(tmp_path / "missing.tbl", 100, 4, 1)


def test_ssd_file_is_a_checkpoint_table_file(tmp_path):
    """An eagerly initialised SSD file, a lazy one and an in-memory table hold the same rows; the
    dense checkpoint file of the eager one is its data file byte for byte, the lazy ones' row sets
    are identical, and each kind opens in place and loads into fresh stores of either kind."""
    n, d, kind = 70000, 3, "rowwise_adagrad"  # > one 64K init chunk
    opt = SparseOptimizer(kind)
    sd = opt.state_dim(d)
    ref = build_collection([TableConfig("a", 10, 2), TableConfig("b", n, d)], opt, seed=SEED).tables[1].storage
    eager = SsdTable(tmp_path / "b.tbl", n, d, sd, create=True, init_seed=SEED, table_index=1)
    lazy = SsdTable(tmp_path / "lazy.tbl", n, d, sd, create=True, init="lazy", init_seed=SEED, table_index=1)
    assert torch.equal(eager.read_rows(0, n)[0], ref.weight) and torch.equal(lazy.read_rows(0, n)[0], ref.weight)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, n, (500,), generator=g).unique()
    w, s = torch.randn(ids.numel(), d, generator=g), torch.rand(ids.numel(), 1, generator=g)
    for st in (eager, lazy, ref):
        st.write(ids, w, s)
        st.flush()
    files = {}
    for name, st in (("eager", eager), ("lazy", lazy), ("ref", ref)):
        files.update({f"{name}/{k}": v for k, v in write_table_file(_mk(tmp_path / name) / "t.tbl", st).items()})
    assert (tmp_path / "eager" / "t.tbl").read_bytes() == (tmp_path / "b.tbl").read_bytes()
    assert "layout" not in files["eager/t.tbl"] and files["lazy/t.tbl"]["layout"] == "rowset"
    assert files["lazy/t.tbl"]["rows"] == ids.numel()
    assert files["lazy/t.tbl"] == files["ref/t.tbl"] and files["lazy/t.tbl.ids"] == files["ref/t.tbl.ids"]
    assert (tmp_path / "lazy" / "t.tbl").stat().st_size == ids.numel() * (d + sd) * 4  # the written rows only
    for name in ("eager", "lazy"):  # opened in place, and loaded into a lazy and an untracked store
        direct = open_table_file(tmp_path, files, f"{name}/t.tbl", n, d, sd)
        assert torch.equal(direct.read_rows(0, n)[0], ref.weight) and torch.equal(direct.read_rows(0, n)[1], ref.state)
        for init in ("lazy", "zeros"):
            fresh = SsdTable(tmp_path / f"fresh-{name}-{init}.tbl", n, d, sd, create=True, init=init, init_seed=SEED,
                             table_index=1)
            read_table_file(tmp_path / name / "t.tbl", fresh, files[f"{name}/t.tbl"], files.get(f"{name}/t.tbl.ids"))
            got = fresh.read_rows(0, n)
            assert torch.equal(got[0], ref.weight) and torch.equal(got[1], ref.state), (name, init)


def _mk(p):
    p.mkdir()
    return p


@pytest.mark.parametrize("io", ["aio", "preadv", "fallback"])
def test_ssd_direct_io_matches_memmap(tmp_path, monkeypatch, caplog, io):
    """O_DIRECT block I/O (batched by Linux AIO, or one preadv/pwritev per run, or the buffered
    fallback where O_DIRECT is refused) reads and writes exactly what the memmap sees."""
    force_fallback = io == "fallback"
    if io == "aio":
        assert aio.available()  # Linux: the batched path is the one under test
    if io == "preadv":
        monkeypatch.setattr(blockio, "use_aio", lambda *a: False)
    if force_fallback:
        def refuse(path):
            raise OSError(22, "Invalid argument (O_DIRECT refused by test)")
        monkeypatch.setattr(blockio, "open_direct", refuse)
    n, d, s = 3001, 13, 1  # 56-byte rows: rows straddle 4 KiB blocks, the last block is partial
    p = tmp_path / "t.tbl"
    SsdTable(p, n, d, s, create=True, init_seed=SEED).close()
    mm = SsdTable(p, n, d, s)
    with caplog.at_level(logging.WARNING, logger="tierec.storage.ssd"):
        dio = SsdTable(p, n, d, s, direct_io=True)
    if force_fallback:
        assert not dio.odirect and "posix_fadvise" in caplog.text
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, n, (300,), generator=g), torch.arange(2990, 3001), torch.tensor([0, 1, 73])])
    ids = ids.unique()[torch.randperm(ids.unique().numel(), generator=g)]  # unsorted on purpose
    for a, b in zip(mm.read(ids), dio.read(ids)):
        assert torch.equal(a, b)
    for a, b in zip(mm.read_rows(0, n), dio.read_rows(0, n)):
        assert torch.equal(a, b)
    w, st = torch.randn(ids.numel(), d, generator=g), torch.randn(ids.numel(), s, generator=g)
    dio.write(ids, w, st)
    dio.write_rows(1500, w[:40], st[:40])
    dio.flush()
    expect_w, expect_s = mm.read_rows(0, n)
    expect_w[ids], expect_s[ids] = w, st  # written through direct I/O, seen through the memmap
    expect_w[1500:1540], expect_s[1500:1540] = w[:40], st[:40]
    got = dio.read_rows(0, n)
    assert torch.equal(got[0], expect_w) and torch.equal(got[1], expect_s)
    assert torch.equal(SsdTable(p, n, d, s).read_rows(0, n)[0], expect_w)
    assert p.stat().st_size == n * (d + s) * 4, "direct writes must not grow the file"
    assert dio.stats()["device_bytes_read"] % 8 == 0 and dio.stats()["rows_written"] == ids.numel() + 40


def test_exchange_equals_write_then_read(tmp_path):
    """`SsdTable.exchange` (a cache's write-back + misses in one pass) leaves the file and returns the
    rows exactly as `write` then `read` would: rows of both sets in one block, the partial last block,
    unsorted IDs; a row both written and read is refused."""
    n, d, s = 3001, 13, 1
    p, q = tmp_path / "x.tbl", tmp_path / "ref.tbl"
    for path in (p, q):
        SsdTable(path, n, d, s, create=True, init_seed=SEED).close()
    x, ref = SsdTable(p, n, d, s, direct_io=True), SsdTable(q, n, d, s, direct_io=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        perm = torch.randperm(n, generator=g)
        wid = torch.cat([perm[:200], torch.tensor([3000])]) if 3000 not in perm[200:400] else perm[:200]
        rid = perm[200:400]
        if 3000 in wid:
            rid = rid[rid != 3000]
        w, st = torch.randn(wid.numel(), d, generator=g), torch.randn(wid.numel(), s, generator=g)
        got = x.exchange(wid, w, st, rid)
        ref.write(wid, w, st)
        want = ref.read(rid)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    x.flush()
    ref.flush()
    assert p.read_bytes() == q.read_bytes()
    assert x.stats()["rows_written"] == ref.stats()["rows_written"]
    assert x.stats()["rows_read"] == ref.stats()["rows_read"]
    with pytest.raises(ValueError, match="both written and read"):
        x.exchange(torch.tensor([5, 6]), torch.zeros(2, d), torch.zeros(2, s), torch.tensor([6, 7]))
    e = x.exchange(torch.tensor([], dtype=torch.int64), torch.zeros(0, d), torch.zeros(0, s), torch.tensor([9]))
    assert torch.equal(e[0], ref.read(torch.tensor([9]))[0])


@pytest.mark.parametrize("row_align", [0, 512])
def test_exchange_many_equals_table_by_table(tmp_path, row_align):
    """`exchange_many` (a table group's step: several O_DIRECT files in one batched pass) reads and writes
    exactly what each table's write-then-read does -- rows straddling blocks, the files' partial last
    blocks (packed) included -- and counts the traffic per table."""
    from tierec.storage import aio
    from tierec.storage.multifile import exchange_many

    sizes, d, s = [2999, 1500, 777], 4, 1  # 20-byte rows; the files end in partial blocks
    tabs = [SsdTable(tmp_path / f"t{k}.tbl", n, d, s, create=True, init_seed=SEED, table_index=k, direct_io=True,
                     row_align=row_align) for k, n in enumerate(sizes)]
    refs = [SsdTable(tmp_path / f"r{k}.tbl", n, d, s, create=True, init_seed=SEED, table_index=k)
            for k, n in enumerate(sizes)]
    if not (all(t.odirect for t in tabs) and aio.available()):
        assert exchange_many(tabs, np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros((1, d + s), np.float32),
                             np.zeros(1, np.int64), np.ones(1, np.int64)) is None
        return
    rng = np.random.default_rng(3)
    for _ in range(3):
        wt, wid, rt, rid = [], [], [], []
        for k, n in enumerate(sizes):
            perm = rng.permutation(n)
            w, r = np.sort(perm[:120]), np.sort(perm[120:200])
            if k == 0 and n - 1 not in r:
                w = np.unique(np.append(w[:-1], n - 1))  # the last row: the file's partial block
            wt.append(np.full(w.size, k))
            wid.append(w)
            rt.append(np.full(r.size, k))
            rid.append(r)
        wt, wid, rt, rid = (np.concatenate(x).astype(np.int64) for x in (wt, wid, rt, rid))
        rows = rng.standard_normal((wid.size, d + s)).astype(np.float32)
        got = exchange_many(tabs, wt, wid, rows, rt, rid)
        want = []
        for k, ref in enumerate(refs):
            m = wt == k
            ref.write(torch.from_numpy(wid[m]), torch.from_numpy(rows[m, :d]), torch.from_numpy(rows[m, d:]))
            w_, s_ = ref.read(torch.from_numpy(rid[rt == k]))
            want.append(torch.cat([w_, s_], 1).numpy())
        assert np.array_equal(got, np.concatenate(want))
    for t, ref, n in zip(tabs, refs, sizes):
        st = t.stats()
        assert st["rows_read"] == 3 * 80 and st["device_bytes_read"] > 0 and st["device_bytes_written"] > 0
        for a, b in zip(t.read_rows(0, n), ref.read_rows(0, n)):
            assert torch.equal(a, b)
    if not row_align:  # a row both written and read is refused before any I/O
        with pytest.raises(ValueError, match="both written and read"):
            exchange_many(tabs, np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros((1, d + s), np.float32),
                          np.zeros(1, np.int64), np.zeros(1, np.int64))


@pytest.mark.parametrize("direct", [False, True])
def test_padded_rows_hold_the_same_rows_as_packed(tmp_path, direct):
    """row_align pads each row to whole sectors (a larger file, a ``row_stride`` in the sidecar): every way
    in and out (read, write, read_rows, write_rows, exchange, reopen) sees exactly the rows of a packed file."""
    n, d, s = 3001, 13, 1  # 56-byte rows -> 512-byte stride
    pad = SsdTable(tmp_path / "pad.tbl", n, d, s, create=True, init_seed=SEED, direct_io=direct, row_align=512)
    ref = SsdTable(tmp_path / "ref.tbl", n, d, s, create=True, init_seed=SEED)
    assert pad.row_stride == 512 and (tmp_path / "pad.tbl").stat().st_size == n * 512
    assert json.loads((tmp_path / "pad.tbl.json").read_text())["row_stride"] == 512
    assert torch.equal(pad.read_rows(0, n)[0], ref.read_rows(0, n)[0])
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        perm = torch.randperm(n, generator=g)
        wid, rid = perm[:300], perm[300:500]
        w, st = torch.randn(300, d, generator=g), torch.randn(300, s, generator=g)
        got = pad.exchange(wid, w, st, rid)
        ref.write(wid, w, st)
        want = ref.read(rid)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        w2 = torch.randn(50, d, generator=g)
        pad.write(perm[500:550], w2, torch.zeros(50, s))
        ref.write(perm[500:550], w2, torch.zeros(50, s))
    some = torch.randperm(n, generator=g)[:400]  # >= LANE_MIN_ROWS: the batched `read_many` plan
    for a, b in zip(pad.read(some), ref.read(some)):
        assert torch.equal(a, b)
    pad.write_rows(n - 7, torch.ones(7, d), torch.full((7, s), 2.0))
    ref.write_rows(n - 7, torch.ones(7, d), torch.full((7, s), 2.0))
    for a, b in zip(pad.read_rows(0, n), ref.read_rows(0, n)):
        assert torch.equal(a, b)
    pad.close()
    again = SsdTable.open(tmp_path / "pad.tbl", direct_io=direct)  # the stride comes from the sidecar
    assert again.row_stride == 512 and torch.equal(again.read_rows(0, n)[0], ref.read_rows(0, n)[0])
    assert again.read(torch.tensor([5, 3000]))[1].tolist() == ref.read(torch.tensor([5, 3000]))[1].tolist()
    again.close()
    raw = np.fromfile(tmp_path / "pad.tbl", np.float32).reshape(n, 128)
    assert not raw[:, d + s:].any(), "the padding stays zero"
    with pytest.raises(CheckpointError, match="512 bytes apart"):
        SsdTable(tmp_path / "pad.tbl", n, d, s)
    with pytest.raises(ConfigError, match="row_align"):
        SsdTable(tmp_path / "x.tbl", n, d, s, create=True, init_seed=SEED, row_align=300)


def test_padded_o_direct_exchange_writes_without_reading_first(tmp_path):
    """Padded rows on a device that takes 512-byte direct I/O: no sector holds two rows, so `exchange`
    reads only the missed rows' sectors (none of the written rows') and writes in the same batch."""
    n, d, s = 4000, 63, 1  # 256-byte rows, padded to 512
    t = SsdTable(tmp_path / "t.tbl", n, d, s, create=True, init_seed=SEED, direct_io=True, row_align=512)
    if not t.odirect:
        pytest.skip("this filesystem refuses O_DIRECT")
    packed = SsdTable(tmp_path / "p.tbl", n, d, s, create=True, init_seed=SEED, direct_io=True)
    wid, rid = torch.arange(0, 4000, 8), torch.arange(3, 4000, 8)  # no two rows of one set adjacent
    for x in (t, packed):
        x.reset_stats()
        x.exchange(wid, torch.ones(wid.numel(), d), torch.ones(wid.numel(), s), rid)
    if t.align == 512:
        assert t.exclusive_blocks
        assert t.stats()["device_bytes_read"] == rid.numel() * 512  # the misses' sectors only
        assert t.stats()["device_bytes_written"] == wid.numel() * 512
    assert packed.stats()["device_bytes_read"] > 2 * t.stats()["device_bytes_read"]  # 4 KiB blocks of both sets
    assert torch.equal(t.read(wid)[0], torch.ones(wid.numel(), d))


def test_dense_reads_merge_nearby_blocks_into_few_large_reads(tmp_path, monkeypatch):
    """O_DIRECT reads merge runs at most READ_GAP_BLOCKS apart (a cache warm-up of hot rows in file
    order): the same rows, from far fewer reads."""
    n, d = 20000, 15  # 64-byte rows, 64 per block
    p = tmp_path / "t.tbl"
    SsdTable(p, n, d, 1, create=True, init_seed=SEED).close()
    mm, dio = SsdTable(p, n, d, 1, readonly=True), SsdTable(p, n, d, 1, readonly=True, direct_io=True)
    ids = torch.arange(0, n, 97)  # a row every ~1.5 blocks
    runs = []
    real = blockio.plan_runs
    monkeypatch.setattr(blockio, "plan_runs", lambda *a, **k: runs.append(real(*a, **k)) or runs[-1])
    want = mm.read(ids)
    got = dio.read(ids)
    assert len(runs[-1].foff) == 1  # gaps of < 8 blocks: one read of the whole span
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    sparse = torch.arange(0, n, 64 * 10)  # a row every 10 blocks: no merging
    want = mm.read(sparse)[0]
    assert torch.equal(dio.read(sparse)[0], want) and len(runs[-1].foff) == sparse.numel()


# ---------------------------------------------------------------------------------------------- exactness
N = 300
TABLES = [TableConfig(f"t{i}", N, 8, "mean" if i % 2 else "sum") for i in range(8)]


def skewed_batches(steps, B=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        vals, lens = [], []
        for _t in TABLES:
            lengths = torch.randint(0, 6, (B,), generator=g)
            lengths[0] = 0
            u = torch.rand(int(lengths.sum()), generator=g)
            vals.append((u ** 3 * N).long().clamp_(max=N - 1))  # skewed: low ids are hot
            lens.append(lengths)
        kjt = KeyedJaggedTensor([t.name for t in TABLES], torch.cat(vals), torch.cat(lens))
        out.append((kjt, torch.randn(B, len(TABLES), 8, generator=g)))
    return out


def cache_factory(tmp_path, policy, sketch, exact):
    """Per table a different tier layout (same collection, so every layout sees the same batches)."""
    made = {}

    def ssd(i, cfg, sdim, tag=""):
        return SsdTable(tmp_path / f"{cfg.name}{tag}.tbl", cfg.num_embeddings, cfg.embedding_dim, sdim,
                        create=True, init_seed=SEED, table_index=i)

    def cached(backing, cap, pol=policy, name=""):
        f = None
        if pol == "freq":
            f = sketch if cap % 2 else exact  # both kinds: count-min sketch (odd), (ids, counts) (even)
        return CachedTable(backing, cap, pol, name=name, freq=f)

    def factory(i, cfg, sdim):
        if i == 0:
            st = cached(ssd(i, cfg, sdim), 1)  # capacity 1
        elif i == 1:
            st = cached(ssd(i, cfg, sdim), 12)  # smaller than one batch's unique rows
        elif i == 2:
            st = cached(ssd(i, cfg, sdim), 52)  # a batch's unique rows fit about 2 steps in 3
        elif i == 3:  # 2-level chain: device <- DRAM <- SSD
            st = cached(cached(ssd(i, cfg, sdim), 121, "lru", "dram"), 55, policy, "hbm")
        elif i == 4:
            st = cached(ssd(i, cfg, sdim), N + 50)  # >= table size
        elif i == 5:  # chain whose lower tier is smaller than the upper one (bypasses below)
            st = cached(cached(ssd(i, cfg, sdim), 30, policy, "dram"), 57, "lfu" if policy == "lru" else "lru")
        elif i == 6:
            st = ssd(i, cfg, sdim)  # no cache at all
        else:  # a cache over an in-memory table
            mem = InMemoryTable(cfg.num_embeddings, cfg.embedding_dim, sdim)
            mem.weight[:] = init_rows(SEED, i, cfg.num_embeddings, cfg.embedding_dim, 0, cfg.num_embeddings)
            st = cached(mem, 33)
        made[i] = st
        return st

    return factory, made


def bottom(st):
    while isinstance(st, CachedTable):
        st = st.backing
    return st


@pytest.mark.parametrize("policy", ["lru", "lfu", "freq"])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_training_is_bit_identical(tmp_path, kind, policy):
    batches = skewed_batches(30)
    vals = torch.cat([b[0].values() for b in batches])
    sketch = CountMinSketch(width=64, depth=3)  # narrow: collisions on purpose, still exact
    sketch.update(vals)
    exact = torch.unique(vals, return_counts=True)
    opt = SparseOptimizer(kind, lr=0.1)
    ref = build_collection(TABLES, opt, seed=SEED)
    factory, made = cache_factory(tmp_path, policy, sketch, exact)
    coll = build_collection(TABLES, opt, seed=SEED, storage_factory=factory)
    if policy == "freq":
        made[4].warm_up()  # preload the hottest rows
        assert made[4].stats()["resident"] == exact[0].numel()
    for step, (kjt, target) in enumerate(batches):
        if step % 7 == 3:  # an eval lookup in between: release(dirty=False)
            ref.eval(), coll.eval()
            with torch.no_grad():
                assert torch.equal(ref(kjt), coll(kjt)), f"eval output differs at step {step}"
            ref.train(), coll.train()
        if step == 15:  # a checkpoint mid-training: flush makes cached rows clean, training goes on
            for tr, tc in zip(ref.tables, coll.tables):
                tc.storage.flush()
                assert all(torch.equal(a, b) for a, b in zip(tr.storage.read_rows(0, N), tc.storage.read_rows(0, N)))
        out_r, out_c = ref(kjt), coll(kjt)
        assert torch.equal(out_r, out_c), f"pooled output differs at step {step}"
        ((out_r - target) ** 2).sum().backward()
        ((out_c - target) ** 2).sum().backward()
    for i, (tr, tc) in enumerate(zip(ref.tables, coll.tables)):
        rw, rs = tr.storage.read_rows(0, N)
        cw, cs = tc.storage.read_rows(0, N)  # newest values before any flush
        assert torch.equal(rw, cw) and torch.equal(rs, cs), f"table {i}: read_rows differs before flush"
        tc.storage.flush()
        bw, bs = bottom(tc.storage).read_rows(0, N)  # the file itself after flush
        assert torch.equal(rw, bw) and torch.equal(rs, bs), f"table {i}: backing store differs after flush"
        if isinstance(tc.storage, CachedTable):
            assert tc.storage.stats()["dirty_rows"] == 0
    s0, s1, s2 = (made[i].stats() for i in range(3))
    assert s0["bypass_acquires"] > 0 and s0["bytes_written"] > 0
    assert s1["bypass_acquires"] > 0, "capacity below a batch's unique rows must take the temporary path"
    assert s2["evictions"] > 0 and s2["writebacks"] > 0 and s2["hits"] > 0 and s2["bypass_acquires"] > 0
    s3 = made[3].stats()
    assert s3["backing"]["lookups"] == s3["misses"], "an upper tier's misses are the lower tier's lookups"
    assert made[4].stats()["evictions"] == 0


@pytest.mark.parametrize("policy", ["lru", "lfu", "freq"])
def test_row_evicted_dirty_then_needed_next_step(tmp_path, policy):
    """Rows updated at step t are evicted (dirty) at t+1 and needed again at t+2, and t+3."""
    cfg = [TableConfig("t", 20, 4)]
    opt = SparseOptimizer("adam", lr=0.1)
    freq = (torch.arange(20), torch.arange(20, 0, -1))
    caches = []

    def factory(i, c, sdim):
        ssd = SsdTable(tmp_path / "t.tbl", c.num_embeddings, c.embedding_dim, sdim, create=True, init_seed=SEED)
        caches.append(CachedTable(ssd, 3, policy, freq=freq if policy == "freq" else None))
        return caches[-1]

    ref = build_collection(cfg, opt, SEED)
    coll = build_collection(cfg, opt, SEED, storage_factory=factory)
    cache = caches[0]
    seq = [[0, 1, 2], [3, 4, 5], [0, 1, 2], [0, 5, 7], [2, 1]]
    for t, ids in enumerate(seq):
        kjt = KeyedJaggedTensor(["t"], torch.tensor(ids), torch.tensor([len(ids) - 1, 1]))
        out_r, out_c = ref(kjt), coll(kjt)
        assert torch.equal(out_r, out_c), f"step {t}"
        out_r.square().sum().backward()
        out_c.square().sum().backward()
        if t == 1:
            st = cache.stats()
            assert st["evictions"] == 3 and st["writebacks"] == 3, "rows 0,1,2 were dirty"
            assert cache.resident_ids().tolist() == [3, 4, 5]
        if t == 2:
            assert cache.stats()["misses"] == 9, "rows 0,1,2 come back from the SSD"
        if t == 3:  # rows 1, 2 (updated at step 2) make room for 5, 7
            assert cache.resident_ids().tolist() == [0, 5, 7] and cache.stats()["writebacks"] == 3 + 3 + 2
        if t == 4:  # ... and are needed again right away
            assert cache.stats()["misses"] == 13
    assert torch.equal(cache.read_rows(0, 20)[0], ref.tables[0].storage.weight)
    assert torch.equal(cache.read_rows(0, 20)[1], ref.tables[0].storage.state)


# ---------------------------------------------------------------------------------------------- index, stats, policies
def test_index_memory_is_proportional_to_the_cache(tmp_path):
    n, cap = 10_000_000, 1000
    ssd = SsdTable(tmp_path / "big.tbl", n, 4, 0, create=True, init="zeros")  # sparse file via ftruncate
    assert "sha256" not in (tmp_path / "big.tbl.json").read_text()
    cache = CachedTable(ssd, cap, "lfu")
    g = torch.Generator().manual_seed(0)
    for k in (500, 900, 2500, 700):  # 2500 > capacity: temporary path
        ids = torch.randint(0, n, (k,), generator=g).unique()
        ws = cache.acquire(ids)
        assert torch.equal(ws.weight[ws.index], torch.zeros(ids.numel(), 4))
        ws.weight[ws.index] = ids.float().unsqueeze(1).expand(-1, 4)
        cache.release(ws, dirty=True)
    tensors = [cache._slot_id, cache._dirty, cache._stamp, cache._pins, cache._count]
    assert max(t.numel() for t in tensors) <= cap and cache._index.keys.numel() <= 8 * cap
    assert cache.index_nbytes <= 128 * cap, cache.index_nbytes  # 48-96 B (hash map) + 29 B (per slot) per row
    assert cache.weight.shape[0] == cap
    cache.flush()
    probe = torch.tensor([int(ids[0]), int(ids[-1])])
    assert torch.equal(ssd.read(probe)[0][:, 0], probe.float())


def test_stats_account_for_every_lookup(tmp_path):
    n, d, s = 200, 5, 1
    ssd = SsdTable(tmp_path / "t.tbl", n, d, s, create=True, init_seed=1)
    cache = CachedTable(ssd, 50, "lru", name="c")
    g = torch.Generator().manual_seed(0)
    total = 0
    for step in range(40):
        k = 80 if step % 5 == 0 else 20  # some batches exceed the capacity
        ids = (torch.rand(k, generator=g) ** 2 * n).long().unique()
        total += ids.numel()
        cache.release(cache.acquire(ids), dirty=step % 2 == 0)
    st = cache.stats()
    rb = (d + s) * 4
    assert st["lookups"] == total == st["hits"] + st["misses"]
    assert 0 < st["hits"] and 0 < st["misses"] and st["hit_rate"] == st["hits"] / total
    assert st["bytes_read"] == st["misses"] * rb == st["backing"]["bytes_read"]
    assert st["backing"]["rows_written"] * rb == st["bytes_written"]
    assert st["writebacks"] <= st["evictions"] and st["bypass_acquires"] == 8
    assert st["bytes_written"] >= st["writebacks"] * rb
    # only dirty victims are written back
    c = CachedTable(ssd, 3, "lru")
    c.release(c.acquire(torch.tensor([0, 1, 2])), dirty=True)
    c.release(c.acquire(torch.tensor([3, 4, 5])), dirty=False)
    c.release(c.acquire(torch.tensor([6, 7, 8])), dirty=False)
    assert c.stats()["evictions"] == 6 and c.stats()["writebacks"] == 3 and c.stats()["dirty_rows"] == 0
    cache.reset_stats()
    st = cache.stats()
    assert st["lookups"] == 0 and st["backing"]["rows_read"] == 0 and st["resident"] == 50


def _run(cache, seq):
    for i in seq:
        cache.release(cache.acquire(torch.tensor([i])), dirty=False)
    return cache.resident_ids().tolist()


def test_lru_lfu_freq_victims(tmp_path):
    ssd = SsdTable(tmp_path / "t.tbl", 10, 2, 0, create=True, init_seed=0)
    assert _run(CachedTable(ssd, 2, "lru"), [0, 0, 0, 1, 2]) == [1, 2]  # 0 least recently used
    assert _run(CachedTable(ssd, 2, "lfu"), [0, 0, 0, 1, 2]) == [0, 2]  # 1 least frequently used
    assert _run(CachedTable(ssd, 2, "lfu"), [0, 1, 2]) == [1, 2]  # tie: least recently used
    # 2 evicts 1 (count 2 < 3); then 0 and 2 both have count 3: 3 evicts the least recently used, 0
    assert _run(CachedTable(ssd, 2, "lfu"), [0, 1, 1, 0, 0, 2, 2, 2, 3]) == [2, 3]
    assert _run(CachedTable(ssd, 2, "lfu"), [0, 1, 1, 0, 0, 2, 2, 3]) == [0, 3]  # 2 (count 2) < 0 (count 3)
    assert _run(CachedTable(ssd, 3, "lru"), [0, 1, 2, 0, 3, 4]) == [0, 3, 4]
    freq = {0: 10, 1: 1, 2: 5}
    assert _run(CachedTable(ssd, 2, "freq", freq=freq), [0, 1, 2]) == [0, 2]  # lowest frequency goes
    assert _run(CachedTable(ssd, 2, "freq", freq=freq), [0, 1, 2, 1]) == [0, 1]
    # a batch's own rows are never victims, even when they are the coldest
    c = CachedTable(ssd, 3, "lru")
    _run(c, [5, 6, 7])
    c.release(c.acquire(torch.tensor([5, 8])), dirty=False)
    assert c.resident_ids().tolist() == [5, 7, 8]
    # warm_up loads the hottest rows (by frequency) and is not counted as lookups
    w = CachedTable(ssd, 2, "freq", freq=(torch.tensor([3, 4, 9]), torch.tensor([1, 7, 8])))
    assert w.warm_up() == 2 and w.resident_ids().tolist() == [4, 9] and w.stats()["lookups"] == 0
    sk = CountMinSketch(width=1024, depth=4)
    sk.update(torch.tensor([1] * 50 + [2] * 5 + [3]))
    w2 = CachedTable(ssd, 1, "freq", freq=sk)
    w2.warm_up(torch.tensor([3, 2, 1]))
    assert w2.resident_ids().tolist() == [1]


def test_pinned_rows_are_not_evicted(tmp_path):
    ssd = SsdTable(tmp_path / "t.tbl", 50, 2, 0, create=True, init_seed=0)
    c = CachedTable(ssd, 4, "lru")
    ws1 = c.acquire(torch.tensor([1, 2, 3]))  # outstanding (forward done, backward pending)
    ws2 = c.acquire(torch.tensor([4, 5]))  # cannot evict 1, 2, 3: served as a temporary copy
    assert ws2.handle.kind == "temp" and c.resident_ids().tolist() == [1, 2, 3]
    ws1.weight[ws1.index] += 1.0
    c.release(ws1, dirty=True)
    c.release(ws2, dirty=False)
    with pytest.raises(RuntimeError):
        c.release(ws2, dirty=False)
    c.acquire(torch.tensor([6, 7, 8, 9]))  # dropped without release: GC unpins
    c.release(c.acquire(torch.tensor([10, 11, 12, 13])), dirty=False)
    assert c.resident_ids().tolist() == [10, 11, 12, 13]
    c.flush()
    assert torch.equal(ssd.read(torch.tensor([1, 2, 3]))[0], init_rows(0, 0, 50, 2, 1, 4) + 1.0)


def test_count_min_sketch():
    sk = CountMinSketch(width=256, depth=4, seed=1)
    g = torch.Generator().manual_seed(0)
    ids = (torch.rand(5000, generator=g) ** 3 * 10_000_000_000).long()
    sk.update(ids)
    sk.update(torch.tensor([123]), torch.tensor([1000]))
    uniq, counts = torch.unique(ids, return_counts=True)
    est = sk.query(uniq)
    assert torch.all(est >= counts) and sk.total == 6000
    assert int(sk.query(torch.tensor([123]))) >= 1000
    wide = CountMinSketch(width=1 << 16, depth=4)
    wide.update(torch.tensor([5, 5, 9]))
    assert wide.query(torch.tensor([5, 9, 11])).tolist() == [2, 1, 0]


@pytest.mark.parametrize("num_ids,span_rows", [(5000, 64), (5000, 1 << 20), (1 << 61, 50)],
                         ids=["small_spans", "one_span", "ids_too_wide_to_pack"])
def test_a_sorted_sweep_finds_what_the_hash_map_finds(monkeypatch, num_ids, span_rows):
    """`SortedSweep` (a checkpoint's ascending pieces) answers as a dict of the cached rows does: each cached ID's
    slot, a miss for every other ID, across spans cut from the bins, pieces that straddle them, empty ones."""
    from tierec.storage.sweep import SortedSweep

    monkeypatch.setattr(SortedSweep, "SPAN_ROWS", span_rows)
    g = torch.Generator().manual_seed(num_ids % 1000 + span_rows)
    hot = torch.randint(0, 300, (400,), generator=g)  # many cached rows in a few bins, as a skewed cache holds
    wide = torch.randint(0, num_ids, (900,), generator=g)
    cached = torch.cat([hot, wide, torch.tensor([0, num_ids - 1])]).unique()
    slot_ids = cached[torch.randperm(cached.numel(), generator=g)]  # slot -> ID, in no order
    where_is = {i: s for s, i in enumerate(slot_ids.tolist())}
    asked = torch.cat([cached, torch.randint(0, num_ids, (3000,), generator=g)]).unique()
    sweep = SortedSweep(slot_ids, num_ids)
    cuts = sorted(set(torch.randint(0, asked.numel(), (40,), generator=g).tolist()) | {0, asked.numel()})
    pieces = [asked[a:b] for a, b in zip(cuts[:-1], cuts[1:])] + [asked[:0]]
    hits = 0
    for piece in pieces:
        hit, slot = sweep.find(piece)
        assert hit.tolist() == [i in where_is for i in piece.tolist()]
        assert slot[hit].tolist() == [where_is[i] for i in piece[hit].tolist()]
        hits += int(hit.sum())
    assert hits == cached.numel()
    assert sweep.packed == (num_ids < 1 << 40)


@pytest.mark.parametrize("chunk", [None, 4], ids=["whole", "probes_in_chunks"])
def test_hash_index_against_a_dict(monkeypatch, chunk):
    from tierec.storage.hashindex import HashIndex, NeedsRebuild

    if chunk:  # insert and the windowed lookup probe 4 IDs at a time: chunks whose claims collide
        monkeypatch.setattr(HashIndex, "PROBE_CHUNK", chunk)
    cap = 40
    ix = HashIndex(cap, "cpu")
    # ids that all hash to the same entry: long probe chains, claims that collide within one round
    allh = ix._hash(torch.arange(200_000))
    same = torch.nonzero(allh == allh[0]).squeeze(1)[:12]
    assert same.numel() == 12
    g = torch.Generator().manual_seed(0)
    ref = {}
    free_slots = list(range(cap))
    rebuilds = 0
    for step in range(300):
        if ref and step % 3 == 0:  # remove some
            gone = torch.tensor(list(ref))[torch.randperm(len(ref), generator=g)[: max(1, len(ref) // 3)]]
            ix.remove(gone)
            for i in gone.tolist():
                free_slots.append(ref.pop(i))
        pool = same if step % 5 == 0 else torch.randint(0, 10**12, (30,), generator=g)
        new = [i for i in pool.unique().tolist() if i not in ref][: len(free_slots)]
        slots = [free_slots.pop() for _ in new]
        try:
            ix.insert(torch.tensor(new, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64))
        except NeedsRebuild:  # too many tombstones: rebuild with everything live, as CachedTable does
            rebuilds += 1
            ref_all = {**ref, **dict(zip(new, slots))}
            ix.rebuild(torch.tensor(list(ref_all), dtype=torch.int64), torch.tensor(list(ref_all.values())))
        ref.update(zip(new, slots))
        q = torch.cat([torch.tensor(list(ref), dtype=torch.int64), same, torch.randint(0, 10**12, (20,), generator=g)])
        found, slot, _ = ix.lookup(q)
        expect = [i in ref for i in q.tolist()]
        assert found.tolist() == expect, f"step {step}"
        assert slot[found].tolist() == [ref[i] for i in q[found].tolist()]
        assert ix.live == len(ref)
    assert rebuilds > 0


def _takes_o_direct(folder) -> bool:
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("direct", [True, False, "refused-writes"])
def test_sequential_writer_writes_every_byte_with_or_without_o_direct(tmp_path, monkeypatch, direct):
    """`SequentialWriter` (checkpoints' row sets): pieces of odd sizes, larger and smaller than its buffer, make the
    exact file, with O_DIRECT or, where the file system refuses it (EINVAL at open, or at the first write),
    buffered; a file that never filled the buffer goes through the page cache at close (no O_DIRECT write); a
    discarded writer leaves only what it had written."""
    if direct == "refused-writes":
        real_transfer, refused = blockio.transfer_all, []

        def refuse_direct(op, fd, *a):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                refused.append(fd)
                raise OSError(errno.EINVAL, "O_DIRECT write refused (simulated)")
            return real_transfer(op, fd, *a)

        monkeypatch.setattr(blockio, "transfer_all", refuse_direct)
    elif not direct:
        real_open = os.open

        def no_direct(path, flags, *a):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "O_DIRECT not supported (simulated)")
            return real_open(path, flags, *a)

        monkeypatch.setattr(blockio.os, "open", no_direct)
    rng = np.random.default_rng(3)
    pieces = [rng.integers(0, 256, n, dtype=np.uint8) for n in (1, 4095, 4096, 9000, 0, 20000, 68 * 129, 3)]
    w = blockio.SequentialWriter(tmp_path / "f", buffer_bytes=8192)
    assert w.direct == (direct is True and _takes_o_direct(tmp_path)) or direct == "refused-writes"
    for p in pieces:
        w.write(p.data)
    w.close()
    w.close()  # idempotent
    assert (tmp_path / "f").read_bytes() == np.concatenate(pieces).tobytes()
    if direct == "refused-writes":
        assert not w.direct and len(refused) == (1 if _takes_o_direct(tmp_path) else 0)
        return
    small = blockio.SequentialWriter(tmp_path / "s", buffer_bytes=8192)
    small.write(pieces[1].data)
    small.write(pieces[7].data)
    small.close(sync=False)
    assert not small.direct and (tmp_path / "s").read_bytes() == pieces[1].tobytes() + pieces[7].tobytes()
    w = blockio.SequentialWriter(tmp_path / "g", buffer_bytes=8192)
    w.write(pieces[3].data)  # O_DIRECT: one full buffer goes out, the rest waits in it; buffered: all goes out
    w.discard()
    assert (tmp_path / "g").read_bytes() == pieces[3][: 8192 if w.direct else None].tobytes()

"""Lazy rows: counter-based initial values, sparse SSD files, row-set checkpoints (issue #18 item 1)."""

import json
import os
import time

import numpy as np
import pytest
import torch

from tierec.errors import CheckpointError
from tierec.storage.base import InMemoryTable
from tierec.storage.lazy import RowBits, RowInit
from tierec.storage.ssd import SsdTable, open_table_file, written_path
from tierec.storage import tablefile
from tierec.storage.tablefile import read_table_file, verify_table_file, write_table_file


def test_row_init_does_not_depend_on_order_chunking_or_sharding():
    init = RowInit(seed=7, table_index=3, num_embeddings=200_000, dim=5)
    whole = init.range(0, 200_000)
    ids = np.random.default_rng(0).permutation(200_000)[:5000]
    assert torch.equal(init.rows(ids), whole[ids])  # any order, any subset
    assert torch.equal(init.range(65_530, 131_080), whole[65_530:131_080])  # across pass boundaries
    shard = RowInit(7, 3, 200_000, 5, row_offset=120_000)  # a shard holding rows [120000, 200000)
    assert torch.equal(shard.range(0, 80_000), whole[120_000:])
    bound = 200_000 ** -0.5
    assert float(whole.abs().max()) <= bound and abs(float(whole.mean())) < 0.01 * bound
    assert abs(float(whole.std()) - bound / 3 ** 0.5) < 0.01 * bound  # uniform(-b, b)
    for other in (RowInit(8, 3, 200_000, 5), RowInit(7, 4, 200_000, 5)):  # seed and table matter
        assert not torch.equal(other.range(0, 10), whole[:10])
    assert RowInit.from_json(json.loads(json.dumps(shard.to_json()))) == shard
    threaded = init.fill(torch.empty(150_000, 5), 50_000, threads=3)  # an in-memory table's creation
    assert torch.equal(threaded, whole[50_000:])
    for row, col in ((0, 0), (1, 4), (65_536, 2), (199_999, 3)):  # the documented function, one float at a time:
        assert whole[row, col].item() == _reference_value(7, 3, 200_000, 5, row, col)  # checkpoints rely on it


def _reference_value(seed: int, table: int, n: int, dim: int, row: int, col: int) -> float:
    """`RowInit`'s float (row, col) in plain Python integers: splitmix64 of the coordinates, uniform(-b, b)."""
    m = 2**64 - 1

    def mix(z: int) -> int:
        z ^= z >> 30
        z = (z * 0xBF58476D1CE4E5B9) & m
        z ^= z >> 27
        z = (z * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    key = mix(mix(((seed * 0x100000001B3) ^ table) & m))
    x = mix(((row * dim + col) * 0x9E3779B97F4A7C15 + key) & m)
    u = np.float32(x >> 40) * np.float32(2.0**-24)
    return float((u * np.float32(2.0) - np.float32(1.0)) * np.float32(n**-0.5))


def test_row_bits_match_a_set():
    rng = np.random.default_rng(1)
    n = 100_003
    bits, ref = RowBits(n), set()
    for _ in range(20):
        ids = rng.integers(0, n, 500)
        bits.mark(ids)
        ref.update(ids.tolist())
        a, b = sorted(rng.integers(0, n, 2).tolist())
        bits.mark_range(a, b)
        ref.update(range(a, b))
    want = np.array(sorted(ref), np.int64)
    assert np.array_equal(bits.ids(), want) and bits.count() == len(ref)
    probe = rng.integers(0, n, 1000)
    assert np.array_equal(bits.test(probe), np.isin(probe, want))
    assert np.array_equal(bits.ids(80_000, 90_001), want[(want >= 80_000) & (want < 90_001)])


@pytest.mark.parametrize("density", [0.0, 0.0005, 0.01, 0.3, 1.0])
def test_row_bits_list_their_ids_at_any_density(density):
    """`RowBits.ids` unpacks only the nonzero bytes of a sparse chunk, every byte of a dense one: both give the set
    rows, in order, across chunk edges and a last partial byte."""
    from tierec.storage.lazy import _CHUNK_ROWS

    n = 3 * _CHUNK_ROWS * 8 + 13
    rng = np.random.default_rng(int(density * 1e4))
    want = np.flatnonzero(rng.random(n) < density)
    bits = RowBits(n)
    bits.mark(want)
    assert np.array_equal(bits.ids(), want)
    a, b = _CHUNK_ROWS * 8 - 64, n - 5  # from a multiple of 8, across a chunk edge
    assert np.array_equal(bits.ids(a, b), want[(want >= a) & (want < b)])


def test_creating_a_huge_lazy_table_is_instant_and_uses_no_disk(tmp_path):
    n, dim = 20_000_000_000, 16  # 1.36 TB of rows + row-wise Adagrad state
    t0 = time.perf_counter()
    t = SsdTable(tmp_path / "huge.tbl", n, dim, 1, create=True, init="lazy", init_seed=5, table_index=2,
                 direct_io=True)
    created = time.perf_counter() - t0
    assert created < 2.0, created
    assert t.file_bytes == n * 68 and os.stat(t.path).st_blocks == 0
    ids = torch.tensor([0, 12_345_678_901, n - 1])
    w, s = t.read(ids)
    assert torch.equal(w, RowInit(5, 2, n, dim).rows(ids)) and not s.any()
    assert t.stats()["device_bytes_read"] == 0  # never-written rows cost no I/O
    t.write(ids[1:2], w[1:2] + 1, s[1:2] + 2)
    w2, s2 = t.read(ids)
    assert torch.equal(w2[1], w[1] + 1) and torch.equal(s2[1], s[1] + 2) and torch.equal(w2[0], w[0])
    assert os.stat(t.path).st_blocks * 512 <= 64 << 10  # one block written
    t.close()
    assert written_path(t.path).stat().st_size == (n + 7) // 8


@pytest.mark.parametrize("direct_io", [False, True])
def test_lazy_file_reads_and_exchanges_like_an_eager_one(tmp_path, direct_io):
    n, d, sd = 20_000, 6, 1
    lazy = SsdTable(tmp_path / "l.tbl", n, d, sd, create=True, init="lazy", init_seed=3, table_index=1,
                    direct_io=direct_io)
    eager = SsdTable(tmp_path / "e.tbl", n, d, sd, create=True, init="random", init_seed=3, table_index=1,
                     direct_io=direct_io)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        perm = torch.randperm(n, generator=g)
        wid, rid = perm[:200], perm[200:700]
        w, s = torch.randn(200, d, generator=g), torch.randn(200, sd, generator=g)
        got = [t.exchange(wid, w, s, rid) for t in (lazy, eager)]
        assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    a, b = lazy.read_rows(0, n), eager.read_rows(0, n)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert lazy.stats()["device_bytes_read"] < eager.stats()["device_bytes_read"]
    lazy.close()
    again = SsdTable.open(tmp_path / "l.tbl", direct_io=direct_io)  # the sidecar and .written say it all
    assert torch.equal(again.read_rows(0, n)[0], a[0])


def _table_after_writes(n: int, d: int, written: int, seed: int = 11) -> tuple[InMemoryTable, torch.Tensor]:
    t = InMemoryTable(n, d, 1, init=RowInit(seed, 0, n, d))
    ids = torch.from_numpy(np.random.default_rng(seed).choice(n, written, replace=False))
    t.write(ids, torch.randn(written, d), torch.rand(written, 1))
    return t, ids


def test_a_row_set_checkpoint_scales_with_the_rows_written(tmp_path):
    n, d = 3_000_000, 8
    t, ids = _table_after_writes(n, d, 2000)
    files = write_table_file(tmp_path / "t.tbl", t)
    entry = files["t.tbl"]
    assert entry["layout"] == "rowset" and entry["rows"] == 2000
    assert (tmp_path / "t.tbl").stat().st_size == 2000 * (d + 1) * 4  # not 3M rows
    assert files["t.tbl.ids"]["bytes"] == 2000 * 8
    assert len(entry["chunks"]) <= 3  # one checksum per 1M IDs holding written rows
    back = InMemoryTable(n, d, 1, init=RowInit(11, 0, n, d))
    read_table_file(tmp_path / "t.tbl", back, entry, files["t.tbl.ids"])
    assert torch.equal(back.weight, t.weight) and torch.equal(back.state, t.state)
    assert np.array_equal(back.lazy_rows().written.ids(), np.sort(ids.numpy()))  # resume knows what was written


def test_a_row_set_written_on_its_thread_equals_one_in_small_pieces_and_a_failed_write_reaches_the_caller(
        tmp_path, monkeypatch):
    """`RowSetWriter` hashes and writes on a thread of its own: the files and manifest entries are those of the
    same rows in many small pieces, and a write that fails there (disk full) raises in `write_table_file`."""
    n, d = 2_500_000, 4
    t, _ = _table_after_writes(n, d, 5000)
    big = write_table_file(tmp_path / "big.tbl", t)
    monkeypatch.setattr(tablefile, "ROWSET_READ_ROWS", 7)
    small = write_table_file(tmp_path / "small.tbl", t)
    assert (tmp_path / "big.tbl").read_bytes() == (tmp_path / "small.tbl").read_bytes()
    assert (tmp_path / "big.tbl.ids").read_bytes() == (tmp_path / "small.tbl.ids").read_bytes()
    assert big["big.tbl"]["chunks"] == small["small.tbl"]["chunks"] and len(small["small.tbl"]["chunks"]) == 3
    assert big["big.tbl"]["sha256"] == small["small.tbl"]["sha256"]
    pieces = []

    def full_disk(self, ids, rows):
        pieces.append(ids.size)
        if len(pieces) == 40:
            raise OSError(28, "No space left on device")
        self._f.write(rows.tobytes())

    monkeypatch.setattr(tablefile.RowSetWriter, "_write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_table_file(tmp_path / "full.tbl", t)
    assert len(pieces) == 40  # the pieces after the failure were not written


def test_a_row_set_chunk_flip_is_caught_and_named(tmp_path):
    n, d = 2_500_000, 4
    t, _ = _table_after_writes(n, d, 3000)
    files = write_table_file(tmp_path / "t.tbl", t)
    verify_table_file(tmp_path, files, "t.tbl", n, d + 1)
    raw = bytearray((tmp_path / "t.tbl").read_bytes())
    raw[len(raw) - 7] ^= 0x10  # a bit in the last chunk
    (tmp_path / "t.tbl").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"t\.tbl: chunk 2 .*sha256"):
        verify_table_file(tmp_path, files, "t.tbl", n, d + 1)
    with pytest.raises(CheckpointError, match="chunk 2"):
        open_table_file(tmp_path, files, "t.tbl", n, d, 1)
    ids = bytearray((tmp_path / "t.tbl.ids").read_bytes())
    ids[0] ^= 1
    (tmp_path / "t.tbl.ids").write_bytes(bytes(ids))
    with pytest.raises(CheckpointError, match=r"t\.tbl\.ids: sha256"):
        verify_table_file(tmp_path, files, "t.tbl", n, d + 1)


def test_a_row_set_opened_in_place_serves_every_row_as_training_sees_it(tmp_path):
    n, d = 50_000, 4
    t, ids = _table_after_writes(n, d, 700)
    files = write_table_file(tmp_path / "t.tbl", t)
    for direct in (False, True):
        f = open_table_file(tmp_path, files, "t.tbl", n, d, 1, direct_io=direct)
        probe = torch.cat([ids[:50], torch.arange(0, 300)]).unique()
        w, s = f.read(probe)
        assert torch.equal(w, t.weight[probe]) and torch.equal(s, t.state[probe])
        assert torch.equal(f.read_rows(0, n)[0], t.weight)
        f.close()


def test_a_large_row_set_is_read_in_bounded_pieces_into_any_store(tmp_path):
    """A chunk of more than 64K written rows is written and read 64K rows at a time; a fresh tracked store
    gets only the written rows, an untracked one every row; a flipped bit stops the load."""
    n, d = 300_000, 4
    t, _ = _table_after_writes(n, d, 150_000)
    files = write_table_file(tmp_path / "t.tbl", t)
    assert [c[1] for c in files["t.tbl"]["chunks"]] == [150_000]
    for init in (RowInit(11, 0, n, d), None):
        back = InMemoryTable(n, d, 1, init=init)
        read_table_file(tmp_path / "t.tbl", back, files["t.tbl"], files["t.tbl.ids"])
        assert torch.equal(back.weight, t.weight) and torch.equal(back.state, t.state)
    raw = bytearray((tmp_path / "t.tbl").read_bytes())
    raw[100] ^= 0x01  # in the first 64K rows, which reach the store before the chunk's digest is checked
    (tmp_path / "t.tbl").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="chunk 0"):
        read_table_file(tmp_path / "t.tbl", InMemoryTable(n, d, 1, init=RowInit(11, 0, n, d)), files["t.tbl"],
                        files["t.tbl.ids"])


def test_a_checkpoint_reads_changed_rows_through_the_cache_without_a_flush(tmp_path):
    """Rows changed in a cache are counted by the store below at once (`mark_written`), so a checkpoint
    writes them, read through the cache, while the SSD file does not hold them yet."""
    from tierec.storage import CachedTable

    n, d = 10_000, 4
    ssd = SsdTable(tmp_path / "t.tbl", n, d, 1, create=True, init="lazy", init_seed=1, direct_io=True)
    cache = CachedTable(ssd, 500, "lru")
    ids = torch.arange(100, 400, 3)
    ws = cache.acquire(ids)
    ws.weight[ws.index] += 1.0  # what the fused optimizer does in place
    cache.release(ws, dirty=True)
    assert ssd.stats()["rows_written"] == 0  # nothing written back yet
    files = write_table_file(tmp_path / "ckpt.tbl", cache, delta=True)
    assert files["ckpt.tbl"]["rows"] == ids.numel() and files["ckpt.tbl"]["delta"]
    back = InMemoryTable(n, d, 1, init=RowInit(1, 0, n, d))
    read_table_file(tmp_path / "ckpt.tbl", back, files["ckpt.tbl"], files["ckpt.tbl.ids"])
    assert torch.equal(back.weight[ids], cache.read(ids)[0])
    assert torch.equal(back.weight[ids], RowInit(1, 0, n, d).rows(ids) + 1.0)


def test_a_write_back_among_never_written_rows_does_not_read_its_block(tmp_path):
    """Packed O_DIRECT rows share blocks; a block whose other rows were never written holds no bytes anyone
    reads, so a write-back into it skips the read of read-modify-write -- and reads stay exact."""
    n, d = 100_000, 16  # 68-byte rows: 60 to a 4 KiB block
    t = SsdTable(tmp_path / "l.tbl", n, d, 1, create=True, init="lazy", init_seed=2, direct_io=True)
    if not t.odirect:
        pytest.skip("this filesystem refuses O_DIRECT")
    first = torch.arange(0, n, 600)  # one row every 10 blocks
    t.exchange(first, torch.ones(first.numel(), d), torch.ones(first.numel(), 1), torch.tensor([1]))
    st = t.stats()
    assert st["rmw_bytes_read"] == 0 and st["device_bytes_read"] <= t.align  # only row 1's block: never written
    t.reset_stats()
    again = first + 1  # the same blocks, which now hold the first rows' bytes: read, patched, written
    t.exchange(again, torch.full((again.numel(), d), 2.0), torch.ones(again.numel(), 1), torch.tensor([2]))
    assert t.stats()["rmw_bytes_read"] >= (first.numel() - 1) * t.align
    w, s = t.read(torch.cat([first, again, torch.tensor([3])]))
    assert (w[: first.numel()] == 1).all() and (w[first.numel() : -1] == 2).all() and (s[:-1] == 1).all()
    assert torch.equal(w[-1:], RowInit(2, 0, n, d).rows(torch.tensor([3])))


def test_rows_changed_in_a_cache_but_not_written_back_do_not_force_a_read(tmp_path):
    """A cache marks the rows it changes as written at once (checkpoints must know them), but their bytes
    reach the file only at write-back: until then a write-back of a neighbour into their block needs no
    read first. After it, the block holds data and the next write-back into it reads the block."""
    n, d = 100_000, 16
    t = SsdTable(tmp_path / "l.tbl", n, d, 1, create=True, init="lazy", init_seed=2, direct_io=True)
    if not t.odirect:
        pytest.skip("this filesystem refuses O_DIRECT")
    dirty = torch.arange(0, n, 600)  # changed in a cache above, one row every 10 blocks
    t.mark_written(dirty)
    assert t.lazy_rows().written.test(dirty.numpy()).all()
    t.exchange(dirty + 1, torch.ones(dirty.numel(), d), torch.ones(dirty.numel(), 1), torch.tensor([5]))
    assert t.stats()["rmw_bytes_read"] == 0  # the dirty rows' bytes are not in the file: nothing to keep
    t.reset_stats()
    t.exchange(dirty, torch.full((dirty.numel(), d), 3.0), torch.ones(dirty.numel(), 1), torch.tensor([6]))
    assert t.stats()["rmw_bytes_read"] >= (dirty.numel() - 1) * t.align  # now the neighbours' bytes are there
    w, s = t.read(torch.cat([dirty, dirty + 1]))
    assert (w[: dirty.numel()] == 3).all() and (w[dirty.numel():] == 1).all() and (s == 1).all()

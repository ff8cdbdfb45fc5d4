"""The write-back log of O_DIRECT working files (`tierec.storage.rowlog`): rows read back bit for bit as from a
plain file, write-backs never read a block first, switches between the log's halves move the live rows,
a full map sends rows home, and a closed file opens again."""

import numpy as np
import pytest
import torch

from tierec.errors import CheckpointError
from tierec.storage import rowlog
from tierec.storage.lazy import RowInit
from tierec.storage.ssd import SsdTable, log_path

N, DIM = 20_000, 16


def pair(tmp_path, capacity, staging=0, recent=0):
    log = SsdTable(tmp_path / "log.tbl", N, DIM, 1, create=True, init="lazy", init_seed=3, direct_io=True,
                   row_log=capacity, log_staging=staging, log_recent=recent)
    plain = SsdTable(tmp_path / "plain.tbl", N, DIM, 1, create=True, init="lazy", init_seed=3, direct_io=True)
    if not (log.odirect and plain.odirect):
        pytest.skip("this filesystem refuses O_DIRECT")
    return log, plain


def same(a: SsdTable, b: SsdTable, ids: torch.Tensor) -> None:
    (wa, sa), (wb, sb) = a.read(ids), b.read(ids)
    assert torch.equal(wa, wb) and torch.equal(sa, sb)


@pytest.mark.parametrize("capacity, span, small_delta", [(500, N, False), (5000, 3000, False), (5000, 3000, True)])
def test_rows_read_back_as_from_a_plain_file(tmp_path, monkeypatch, capacity, span, small_delta):
    """Random exchanges (write-backs + misses), single writes and a range write: every read equals the
    plain file's; with 500 slots the map fills (its rows fold home), with 5,000 and rows written again
    and again the halves switch; ``small_delta``: the map's delta level folds into its main level every few
    appends."""
    if small_delta:
        monkeypatch.setattr(rowlog, "DELTA_MIN", 16)
        monkeypatch.setattr(rowlog, "DELTA_FACTOR", 1)
    log, plain = pair(tmp_path, capacity)
    rng = np.random.default_rng(capacity)
    for step in range(120):
        w = np.unique(rng.integers(0, span, 300))
        r = np.setdiff1d(np.unique(rng.integers(0, N, 200)), w)
        weight, state = torch.randn(w.size, DIM), torch.rand(w.size, 1)
        got = log.exchange(torch.from_numpy(w), weight, state, torch.from_numpy(r))
        want = plain.exchange(torch.from_numpy(w), weight, state, torch.from_numpy(r))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), step
        if step % 40 == 7:
            for t in (log, plain):
                t.write(torch.from_numpy(w[:9]), weight[:9] * 2, state[:9])
    for t in (log, plain):  # a range written in place: its rows leave the log
        t.write_rows(100, torch.full((50, DIM), 7.0), torch.ones(50, 1))
    same(log, plain, torch.arange(N))
    assert torch.equal(log.read_rows(90, 160)[0], plain.read_rows(90, 160)[0])
    st = log.stats()
    assert st["log_rows"] > 0 and log.row_log.live <= capacity
    if capacity == 500:
        assert st["log_folds"] > 0
    else:
        assert st["log_folds"] == 0 and st["log_switches"] > 0 and st["log_moved_rows"] > 0


def test_the_two_level_map_maps_ids_as_a_dict_does(monkeypatch):
    """`SlotMap` under random updates and removals, its delta folding in every few of them: every lookup,
    its size and its one-level form equal a dict's."""
    monkeypatch.setattr(rowlog, "DELTA_MIN", 8)
    monkeypatch.setattr(rowlog, "DELTA_FACTOR", 2)
    rng = np.random.default_rng(5)
    m, ref = rowlog.SlotMap(np.empty(0, np.int32), np.empty(0, np.int32)), {}
    folds = 0
    for step in range(400):
        ids = np.unique(rng.integers(0, 3000, rng.integers(1, 40)))
        if step % 3 == 2:
            m = m.without(ids)
            for i in ids.tolist():
                ref.pop(i, None)
        else:
            slots = rng.integers(0, 1 << 20, ids.size).astype(np.int32)
            m = m.with_slots(ids, slots)
            ref.update(zip(ids.tolist(), slots.tolist(), strict=True))
        folds += not m.dkeys.size
        probe = np.arange(3000, dtype=np.int64)
        assert m.get(probe).tolist() == [ref.get(i, -1) for i in range(3000)], step
        assert m.size == len(ref)
    keys, slots = m.merged()
    assert keys.tolist() == sorted(ref) and slots.tolist() == [ref[k] for k in sorted(ref)]
    assert 10 < folds < 300 and m.merged()[0].dtype == np.int32


def test_write_backs_never_read_a_block_first(tmp_path):
    """Packed 68-byte rows: write-backs into blocks that hold other written rows read them first in place
    (read-modify-write); appended to the log they read nothing and write whole blocks of just them."""
    log, plain = pair(tmp_path, 10_000)
    first = torch.arange(0, N, 61)  # one row in every ~block
    for t in (log, plain):
        t.write(first, torch.ones(first.numel(), DIM), torch.ones(first.numel(), 1))
        t.reset_stats()
        t.exchange(first + 1, torch.full((first.numel(), DIM), 2.0), torch.ones(first.numel(), 1),
                   torch.tensor([5]))
    assert plain.stats()["rmw_bytes_read"] >= (first.numel() - 1) * plain.align
    st = log.stats()
    assert st["rmw_bytes_read"] == 0
    assert st["device_bytes_written"] <= first.numel() * log.row_stride + 2 * 4096  # packed, whole blocks
    same(log, plain, torch.cat([first, first + 1]))


def test_a_closed_working_file_opens_again(tmp_path):
    log, plain = pair(tmp_path, 2000)
    rng = np.random.default_rng(1)
    for _ in range(20):
        w = np.unique(rng.integers(0, N, 400))
        weight = torch.randn(w.size, DIM)
        for t in (log, plain):
            t.write(torch.from_numpy(w), weight, torch.ones(w.size, 1))
    live = log.row_log.live
    log.close()
    again = SsdTable.open(tmp_path / "log.tbl", direct_io=True)
    assert again.row_log is not None and again.row_log.live == live
    same(again, plain, torch.arange(N))
    w = torch.arange(0, N, 7)  # appends go on after the last partial block
    for t in (again, plain):
        t.write(w, torch.full((w.numel(), DIM), 3.0), torch.zeros(w.numel(), 1))
    same(again, plain, torch.arange(N))
    again.close()
    ro = SsdTable.open(tmp_path / "log.tbl", direct_io=True, readonly=True)
    same(ro, plain, torch.arange(N))
    ro.close()
    from tierec.errors import ConfigError

    with pytest.raises(ConfigError, match="direct_io=True"):
        SsdTable.open(tmp_path / "log.tbl")
    log_path(tmp_path / "log.tbl").unlink()
    with pytest.raises(CheckpointError, match="write-back"):
        SsdTable.open(tmp_path / "log.tbl", direct_io=True)


def test_the_log_is_for_new_lazy_o_direct_working_files(tmp_path):
    from tierec.errors import ConfigError

    with pytest.raises(ConfigError, match="write-back log"):
        SsdTable(tmp_path / "x.tbl", 100, 4, 1, create=True, init="lazy", init_seed=0, row_log=10)
    t = SsdTable(tmp_path / "y.tbl", 100, 4, 1, create=True, init="lazy", init_seed=0, direct_io=True, row_log=10)
    assert t.file_rows > t.home_rows and t.path.stat().st_size == t.file_bytes  # the region is sparse
    assert torch.equal(t.read(torch.arange(100))[0], RowInit(0, 0, 100, 4).rows(torch.arange(100)))


def test_reads_go_by_the_devices_sector(tmp_path):
    """Nothing is written in place by sector, so reads -- a few rows in the calling thread or a batch --
    move the device's smallest direct read per row (512 B where it takes it), not a 4 KiB block."""
    log, _ = pair(tmp_path, 10_000)
    rows = torch.arange(0, N, 97)
    log.write(rows, torch.ones(rows.numel(), DIM), torch.ones(rows.numel(), 1))
    assert log.read_align in (512, 4096) and log.align == 4096
    for ids in (rows[:3], rows):  # read_local, then read_many's batched plan
        log.reset_stats()
        w, _ = log.read(ids)
        assert (w == 1).all()
        assert log.stats()["device_bytes_read"] <= ids.numel() * 2 * log.read_align


# ---------------------------------------------------------------------------- placement rank
def log_slots(t: SsdTable, ids: np.ndarray) -> np.ndarray:
    """Log slots of rows ``ids`` (all in the log)."""
    slots = t.row_log.lookup(ids, np.full(ids.size, -1)) - t.row_log.base
    assert (slots >= 0).all()
    return slots


def test_a_placement_rank_orders_the_appended_rows(tmp_path):
    """Rows appended with a rank land in increasing (rank, ID) order, through `exchange`, `write` and a
    `ConcatTable` over two files (its ranks sliced per member)."""
    from tierec.storage.concat import ConcatTable

    log, _ = pair(tmp_path, 5000)
    rng = np.random.default_rng(5)
    ids = np.unique(rng.integers(0, N, 900))
    rank = rng.integers(0, 40, ids.size)  # ties: by ID
    log.exchange(torch.from_numpy(ids), torch.randn(ids.size, DIM), torch.rand(ids.size, 1), torch.tensor([7]),
                 write_rank=torch.from_numpy(rank))
    assert np.array_equal(ids[np.argsort(log_slots(log, ids))], ids[np.lexsort((ids, rank))])
    more = np.setdiff1d(np.unique(rng.integers(0, N, 300)), ids)
    perm = rng.permutation(more.size)  # any order of IDs: the rank goes with its row
    mrank = rng.integers(-5, 5, more.size)
    log.write(torch.from_numpy(more[perm]), torch.randn(more.size, DIM), torch.rand(more.size, 1),
              rank=torch.from_numpy(mrank[perm]))
    got = log_slots(log, more)
    assert got.min() > log_slots(log, ids).max()  # appended after the first batch
    assert np.array_equal(more[np.argsort(got)], more[np.lexsort((more, mrank))])

    a = SsdTable(tmp_path / "a.tbl", 1000, DIM, 1, create=True, init="lazy", init_seed=1, direct_io=True, row_log=2000)
    b = SsdTable(tmp_path / "b.tbl", 3000, DIM, 1, create=True, init="lazy", init_seed=2, direct_io=True, row_log=2000)
    cat = ConcatTable([a, b], io_threads=1)
    for read in (torch.tensor([4, 1500]), torch.empty(0, dtype=torch.int64)):  # exchange_many, then per member
        w = np.setdiff1d(np.unique(rng.integers(0, 4000, 600)), read.numpy())
        r = rng.integers(0, 1000, w.size)
        cat.exchange(torch.from_numpy(w), torch.randn(w.size, DIM), torch.rand(w.size, 1), read,
                     write_rank=torch.from_numpy(r))
        for t, lo, hi in ((a, 0, 1000), (b, 1000, 4000)):
            m = (w >= lo) & (w < hi)
            mine = w[m] - lo
            assert np.array_equal(mine[np.argsort(log_slots(t, mine))], mine[np.lexsort((mine, r[m]))])
    cat.close()


@pytest.mark.parametrize("staging, recent", [(0, 0), (150, 0), (150, 64 << 10)])
def test_ranked_appends_read_back_as_from_a_plain_file(tmp_path, staging, recent):
    """Random exchanges with random ranks (or none), single ranked writes, range writes (rows leave the log),
    switches of halves and a reopen: every read equals the plain file's; with staging, reads of staged rows,
    staged rows written again and range writes over staged rows too; with recent sectors held, rows read from
    them while the log keeps writing over its halves."""
    log, plain = pair(tmp_path, 600, staging, recent)
    rng = np.random.default_rng(11)
    for step in range(250):
        w = np.unique(rng.integers(0, 550 if step < 120 else N, 350))  # rows written again (switches), then folds
        r = np.setdiff1d(np.unique(np.concatenate([rng.integers(0, N, 100), rng.integers(0, 600, 100)])), w)
        weight, state = torch.randn(w.size, DIM), torch.rand(w.size, 1)
        rank = None if step % 5 == 0 else torch.from_numpy(
            np.where(rng.random(w.size) < 0.3, rowlog.UNRANKED, rng.integers(0, 20, w.size)))  # some unranked
        got = log.exchange(torch.from_numpy(w), weight, state, torch.from_numpy(r), write_rank=rank)
        want = plain.exchange(torch.from_numpy(w), weight, state, torch.from_numpy(r))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), step
        if step % 30 == 3:
            k = torch.from_numpy(rng.permutation(w)[:40])
            log.write(k, weight[:40] * 3, state[:40], rank=torch.from_numpy(rng.integers(0, 3, 40)))
            plain.write(k, weight[:40] * 3, state[:40])
        if step % 50 == 20:
            start = int(rng.integers(0, N - 200))
            for t in (log, plain):
                t.write_rows(start, torch.full((200, DIM), float(step)), torch.ones(200, 1))
    st = log.stats()
    assert st["log_switches"] > 0 and st["log_folds"] > 0
    assert st["log_staged_peak"] == 0 if not staging else 0 < st["log_staged_peak"] <= staging
    assert (st["log_unranked_batches"] > 0) == bool(staging)
    assert (st["log_recent_rows"] > 0) == bool(recent), st
    same(log, plain, torch.arange(N))
    log.close()
    again = SsdTable.open(tmp_path / "log.tbl", direct_io=True)
    same(again, plain, torch.arange(N))
    w = np.arange(0, N, 13)
    weight = torch.randn(w.size, DIM)
    again.write(torch.from_numpy(w), weight, torch.zeros(w.size, 1), rank=torch.from_numpy(-w))
    plain.write(torch.from_numpy(w), weight, torch.zeros(w.size, 1))
    same(again, plain, torch.arange(N))
    again.close()


def test_recent_sectors_hold_the_last_sectors_read_until_written_over():
    """`RecentSectors`: rows whose sectors are held come back byte for byte (also across two sectors); the oldest
    sectors go first; a write over a sector forgets it; a read that overlapped a write keeps nothing."""
    stats = {"log_recent_rows": 0, "log_recent_kept": 0}
    r = rowlog.RecentSectors(4, 512, stats)
    disk = np.random.default_rng(0).integers(0, 256, 512 * 16, dtype=np.uint8)
    r.keep(np.array([2, 3, 7]), disk.reshape(-1, 512)[[2, 3, 7]], r.epoch)
    start = np.array([2 * 512 + 10, 3 * 512 - 30, 7 * 512, 5 * 512, 7 * 512 + 500])  # the 2nd spans 2 and 3
    hit, rows = r.rows(start, 68)
    assert hit.tolist() == [True, True, True, False, False]  # sector 5 not held; the last spans 7 and 8
    assert np.array_equal(rows, np.stack([disk[s : s + 68] for s in start[hit]]))
    r.keep(np.array([9, 10]), disk.reshape(-1, 512)[[9, 10]], r.epoch)  # four slots: sectors 2 and 3 go
    assert r.rows(start[:3], 68)[0].tolist() == [False, False, True]
    r.drop(7 * 512 + 100, 7 * 512 + 200)  # written over
    assert not r.rows(start[2:3], 68)[0].any()
    seen = r.epoch
    r.drop(0, 512)  # a write while a read was in flight
    r.keep(np.array([11]), disk.reshape(-1, 512)[[11]], seen)
    assert not r.rows(np.array([11 * 512]), 68)[0].any() and stats["log_recent_rows"] == 3 + 1


def step_read(t: SsdTable, ids: torch.Tensor, spare: int = N - 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``ids`` read as a cache's step reads them: an exchange that writes one row back (``spare``)."""
    w, s = t.read(torch.tensor([spare]))
    return t.exchange(torch.tensor([spare]), w, s, ids)


def test_rows_of_sectors_read_lately_come_from_memory(tmp_path):
    """With recent sectors, a step's read of rows that share sectors with the last step's costs no device bytes,
    and the rows equal the plain file's; once the log writes over those sectors (a switch moves its live rows)
    the device is read again. A bulk read (checkpoints, evaluation) neither uses nor fills them."""
    log, plain = pair(tmp_path, 2000, recent=64 << 10)
    assert 60 << 10 < log.row_log.recent.nbytes <= 64 << 10  # its share of memory, bookkeeping included
    ids = np.arange(0, 1400, 2)
    weight, state = torch.randn(ids.size, DIM), torch.rand(ids.size, 1)
    for t in (log, plain):
        t.write(torch.from_numpy(ids), weight, state, rank=torch.zeros(ids.size, dtype=torch.int64))
    first, second = torch.from_numpy(ids[0:400:2]), torch.from_numpy(ids[1:398:2])  # between each other in the log
    same(log, plain, first)  # a bulk read: nothing kept
    log.reset_stats()
    same(log, plain, second)
    assert log.stats()["device_bytes_read"] > 0 and log.stats()["log_recent_rows"] == 0
    log.reset_stats()
    got = step_read(log, first)
    want = plain.read(first)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert log.stats()["device_bytes_read"] > 0
    log.reset_stats()
    got = step_read(log, second)
    want = plain.read(second)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    st = log.stats()
    assert st["log_recent_rows"] == second.numel() and st["device_bytes_read"] <= 2 * log.read_align, st  # the spare row
    for _ in range(8):  # write the rows again and again: the halves switch, every sector is written over
        w = torch.from_numpy(ids)
        more = torch.randn(w.numel(), DIM)
        for t in (log, plain):
            t.write(w, more, torch.zeros(w.numel(), 1))
    assert log.stats()["log_switches"] > 0
    log.reset_stats()
    got = step_read(log, second)
    want = plain.read(second)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert log.stats()["device_bytes_read"] > 2 * log.read_align
    log.close()


def test_the_write_log_budget_buys_map_entries():
    """A log's memory is its map, `map_entry_bytes` per capacity row (8 B, 12 in tables of 2^31 rows or more) and 2
    bits of read-back flags (`log_bytes`, `log_capacity`), and its run's index, `run_index_bytes` (1.5 bits per table row, 2 from 2^31 rows); `split_budget` charges both, and
    with look-ahead its staging area (1/64 of the budget) and recent sectors (1/128)."""
    from pathlib import Path

    from tierec.storage.plan import TableNeeds
    from tierec.storage.rowlog import map_entry_bytes
    from tierec.storage.settings import StorageSettings
    from tierec.storage.tiered import split_budget

    assert (map_entry_bytes(N), map_entry_bytes(2**31)) == (8, 12)
    assert (rowlog.log_bytes(1000, N), rowlog.log_bytes(1001, 2**31)) == (8250, 12263)
    assert rowlog.log_capacity(8250, N) == 1000 and rowlog.log_capacity(8249, N) == 999
    rows, row_bytes = 1000, 1028  # a log of every row costs less than the share
    s = StorageSettings(root=Path("."), memory_budget=rows * row_bytes - 1, direct_io=True)
    assert split_budget(s, [TableNeeds("t", rows, row_bytes, lookups=1)]).write_log == rows * 8 + rows // 4
    s = StorageSettings(root=Path("."), memory_budget=20 * rows * 68, direct_io=True)
    assert split_budget(s, [TableNeeds("t", 40 * rows, 68, lookups=1)]).write_log == 20 * rows * 68 // 16
    split = split_budget(s, [TableNeeds("t", 40 * rows, 68, lookups=1)])
    assert split.log_staging == split.log_recent == 0  # no ranks (nor groups of them to read) without look-ahead
    assert split_budget(s, [TableNeeds("t", 40 * rows, 68, lookups=1)]).log_runs == 40 * rows * 12 // 64
    assert (rowlog.run_index_bytes(64), rowlog.run_index_bytes(65), rowlog.run_index_bytes(2**31)) == (12, 24, 2**29)
    s = StorageSettings(root=Path("."), memory_budget=20 * rows * 68, direct_io=True, policy="lookahead")
    split = split_budget(s, [TableNeeds("t", 40 * rows, 68, lookups=1)])
    assert (split.log_staging, split.log_recent) == (20 * rows * 68 // 64, 20 * rows * 68 // 128)
    assert split.tables == split.total - split.row_bits - split.window - split.write_log - split.log_staging \
        - split.log_recent - split.log_runs


def test_staged_rows_of_one_rank_are_read_back_together(tmp_path):
    """Forty steps each evict a few rows of each of ten later steps (ranks): staged, a rank's rows reach the
    log in groups of `STAGE_GROUP_BYTES`, so reading one step's rows back moves at most two sectors per group
    beyond the rows' own bytes -- without staging each step's few rows of a rank sit among the others and
    the same read moves over twice as much. Staged rows read, flushed and saved equal the plain file's."""
    from tierec.storage.rowlog import STAGE_GROUP_BYTES

    moved = {}
    for staging in (0, 2000):
        (tmp_path / str(staging)).mkdir()
        log, plain = pair(tmp_path / str(staging), 20_000, staging)
        rng = np.random.default_rng(4)
        ids = rng.permutation(N)[: 40 * 10 * 3].reshape(40, 10, 3)  # step, rank, row
        for step in range(40):
            order = np.argsort(ids[step].reshape(-1))
            w, rank = ids[step].reshape(-1)[order], np.repeat(100 + np.arange(10), 3)[order]
            weight = torch.randn(w.size, DIM)
            log.exchange(torch.from_numpy(w), weight, torch.ones(w.size, 1), torch.tensor([N - 1]),
                         write_rank=torch.from_numpy(rank))
            plain.write(torch.from_numpy(w), weight, torch.ones(w.size, 1))
        log.reset_stats()
        for r in range(10):
            mine = np.sort(ids[:, r].reshape(-1))  # 120 rows of 68 B read back at step 100 + r
            same(log, plain, torch.from_numpy(mine))
        moved[staging] = log.stats()["device_bytes_read"]
        if staging:
            group = -(-STAGE_GROUP_BYTES // log.row_stride)
            groups = 10 * -(-120 // group)
            assert moved[staging] <= 10 * 120 * log.row_stride + 2 * groups * log.read_align
            log.flush()
            assert log.row_log.staged == 0
        same(log, plain, torch.arange(N))
        log.close()
    assert moved[2000] * 2 < moved[0]


def test_the_staging_limit_sends_the_soonest_ranks_first(tmp_path):
    """Past its limit the staging area writes the lowest ranks (read back soonest), in one append, until
    `STAGE_KEEP` of the limit is left, and keeps the rest. A bulk read (a checkpoint's) takes staged rows from
    memory and leaves them staged; a step's read (`exchange`) sends the rank groups it asks for to the log first
    and reads them back together."""
    log, _ = pair(tmp_path, 5000, staging=50)
    assert rowlog.STAGE_KEEP == 0.5
    ids = np.arange(0, 80)
    weight, state = torch.randn(80, DIM), torch.rand(80, 1)
    log.exchange(torch.from_numpy(ids), weight, state, torch.tensor([N - 1]),
                 write_rank=torch.from_numpy(ids // 10))  # 8 ranks of 10 rows, below a group each
    assert log.row_log.staged == 20  # 80 > 50: ranks 0..5 went (at most 25 left), 6 and 7 wait
    written = log.row_log.lookup(ids, np.full(80, -1)) >= 0  # a lookup that names no staged row unstages nothing
    assert np.array_equal(written, ids < 60) and log.row_log.staged == 20
    assert np.array_equal(np.argsort(log_slots(log, ids[:60]), kind="stable"), np.arange(60))  # in rank order
    log.reset_stats()
    w, s = log.read(torch.tensor([5, 75, 65]))  # one row from the log, two staged
    assert torch.equal(w, weight[[5, 75, 65]]) and torch.equal(s, state[[5, 75, 65]])
    st = log.stats()
    assert log.row_log.staged == 20 and st["log_bytes_written"] == 0 and st["rows_read"] == 3
    assert st["device_bytes_read"] == log.read_align  # the logged row's sector alone
    got = log.exchange(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM), torch.empty(0, 1), torch.tensor([75]))
    assert torch.equal(got[0], weight[[75]]) and log.row_log.staged == 10  # its rank went to the log first
    log.close()


def test_bulk_reads_copy_staged_rows_and_step_reads_log_them_first(tmp_path):
    """Over a `ConcatTable` of two files (a table group's store): a bulk read (`read`: a checkpoint's) of staged
    rows copies them from the staging areas, moves no device byte for them and leaves every rank group staged; a
    cache's read without write-backs (`exchange` of no rows) is a step's, which sends the rank groups it asks for
    to the logs first. Both return the rows as written."""
    from tierec.storage.concat import ConcatTable

    tabs = [SsdTable(tmp_path / f"{k}.tbl", 1000, DIM, 1, create=True, init="lazy", init_seed=k, direct_io=True,
                     row_log=2000, log_staging=500) for k in range(2)]
    if not all(t.odirect for t in tabs):
        pytest.skip("this filesystem refuses O_DIRECT")
    cat = ConcatTable(tabs, io_threads=1)
    ids = np.arange(0, 2000, 7)  # both members; ranks of ~14 rows each: below a group, all staged
    weight, state = torch.randn(ids.size, DIM), torch.rand(ids.size, 1)
    cat.exchange(torch.from_numpy(ids), weight, state, torch.tensor([1]), write_rank=torch.from_numpy(ids // 100))
    staged = [t.row_log.staged for t in tabs]
    assert sum(staged) == ids.size
    for t in tabs:
        t.reset_stats()
    ask = torch.from_numpy(ids[::3].copy())
    w, s = cat.read(ask)
    assert torch.equal(w, weight[::3]) and torch.equal(s, state[::3])
    assert [t.row_log.staged for t in tabs] == staged
    assert sum(t.stats()["device_bytes_read"] + t.stats()["log_bytes_written"] for t in tabs) == 0
    e = torch.empty(0, dtype=torch.int64)
    w, s = cat.exchange(e, torch.empty(0, DIM), torch.empty(0, 1), ask)
    assert torch.equal(w, weight[::3]) and torch.equal(s, state[::3])
    assert sum(t.row_log.staged for t in tabs) < sum(staged)  # the asked ranks went to the logs, then were read
    assert sum(t.stats()["device_bytes_read"] for t in tabs) > 0
    cat.close()


def test_read_each_joins_rows_in_the_order_asked_wherever_they_are(tmp_path):
    """`read_each` (a checkpoint's bulk read, pieces of sorted IDs) of a table with a write-back log, alone and as a
    member of a `ConcatTable`: each piece's rows, joined as the file holds them (weights, then state), equal
    `read`'s and a plain file's bit for bit -- rows in the log (at slots out of ID order: read in file order and
    gathered back in the order asked), staged rows (copied, left staged), rows at home and rows never written."""
    from tierec.storage.concat import ConcatTable

    log, plain = pair(tmp_path, 20_000, staging=300)
    rng = np.random.default_rng(7)
    for _ in range(6):
        w = np.unique(rng.integers(0, N, 400))
        weight, state = torch.randn(w.size, DIM), torch.rand(w.size, 1)
        rank = torch.from_numpy(rng.integers(0, 50, w.size))  # read back in no ID order: logged out of ID order
        log.exchange(torch.from_numpy(w), weight, state, torch.tensor([1]), write_rank=rank)
        plain.exchange(torch.from_numpy(w), weight, state, torch.tensor([1]))
    ids = np.unique(rng.integers(0, N, 3000))
    slots = log.slots_of(ids, unstage=False)
    logged = slots[slots >= N]
    assert logged.size > 100 and not np.all(np.diff(logged) > 0)
    staged = log.row_log.staged
    assert log.row_log.staged_rows(ids)[0].any()  # some of the rows asked for wait in the staging area
    log.reset_stats()
    pieces = [torch.from_numpy(ids[a : a + 700]) for a in range(0, ids.size, 700)]
    for rows, p in zip(log.read_each(iter(pieces)), pieces, strict=True):
        assert rows.shape == (p.numel(), DIM + 1) and rows.is_contiguous()
        assert torch.equal(rows, torch.cat(plain.read(p), 1)) and torch.equal(rows, torch.cat(log.read(p), 1))
    assert log.row_log.staged == staged and log.stats()["log_bytes_written"] == 0
    cat = ConcatTable([log, plain], io_threads=1)  # pieces across both members: one plan over both files
    both = [torch.cat([p[p.numel() // 2 :], p[: p.numel() // 2] + N]).sort().values for p in pieces]
    for rows, p in zip(cat.read_each(iter(both)), both, strict=True):
        assert torch.equal(rows, torch.cat(cat.read(p), 1))
        assert torch.equal(rows, torch.cat([torch.cat(plain.read(p % N), 1)]))
    cat.close()


def test_unranked_rows_wait_in_the_staging_area_and_go_to_the_log_together_in_id_order(tmp_path):
    """Write-backs with no read-back known (`rowlog.UNRANKED`: rows the look-ahead cache never sees again) wait
    in the staging area apart from the rank groups until it is full, then go to the log in one batch,
    in ID order, so that a checkpoint's reads by ID find them in long runs. Meanwhile a bulk read copies them
    (no device byte) and a step's read of one sends them all; every read equals the plain file's."""
    log, plain = pair(tmp_path, 20_000, staging=1000)
    rng = np.random.default_rng(4)
    written = []
    for step in range(9):  # 9 x ~120 rows: past the 1,000-row staging area at the last step
        w = np.unique(rng.integers(0, N, 120))
        weight, state = torch.randn(w.size, DIM), torch.rand(w.size, 1)
        log.exchange(torch.from_numpy(w), weight, state, torch.tensor([1]),
                     write_rank=torch.full((w.size,), rowlog.UNRANKED))
        plain.exchange(torch.from_numpy(w), weight, state, torch.tensor([1]))
        written.append(w)
        st = log.stats()
        if sum(x.size for x in written) <= 1000:
            assert st["log_unranked_batches"] == 0 and st["log_bytes_written"] == 0
            assert log.row_log.staged == np.unique(np.concatenate(written)).size
            log.reset_stats()
            same(log, plain, torch.from_numpy(np.concatenate(written)))  # a bulk read: copied from the staging area
            assert log.stats()["device_bytes_read"] == 0 and log.row_log.staged > 0
    assert log.stats()["log_unranked_batches"] == 1 and log.row_log.staged == 0
    ids = np.unique(np.concatenate(written))
    slots = log.slots_of(ids)
    assert np.array_equal(np.diff(slots), np.ones(ids.size - 1))  # one run, in ID order
    w = np.unique(rng.integers(0, N, 120))  # staged again, then a step reads one of them: all go
    weight = torch.randn(w.size, DIM)
    for t in (log, plain):
        t.exchange(torch.from_numpy(w), weight, torch.zeros(w.size, 1), torch.tensor([1]),
                   **({"write_rank": torch.full((w.size,), rowlog.UNRANKED)} if t is log else {}))
    assert log.row_log.staged == w.size
    got = log.exchange(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM), torch.empty(0, 1),
                       torch.from_numpy(w[:1]))
    assert torch.equal(got[0], weight[:1]) and log.row_log.staged == 0
    same(log, plain, torch.arange(N))


def write_back_random_rows(rng, steps: int, *tables: SsdTable, span: int = N) -> None:
    """``steps`` exchanges that write back ~120 random rows of the first ``span`` each (the same into every table)
    and read one."""
    for _ in range(steps):
        w = np.unique(rng.integers(0, span, 120))
        weight, state = torch.randn(w.size, DIM), torch.rand(w.size, 1)
        for t in tables:
            t.exchange(torch.from_numpy(w), weight, state, torch.tensor([N - 1]))


def test_the_run_index_ranks_ids_as_a_sorted_array_does():
    """`RunIndex`: which IDs a bitmap holds and their rank among them, against `np.isin` / `np.searchsorted` on
    the sorted IDs, at word edges and in a table whose rows are not a multiple of 64."""
    rng = np.random.default_rng(5)
    n = 64 * 40 + 13
    ids = np.unique(np.concatenate([rng.integers(0, n, 700), [0, 63, 64, 127, n - 1]]))
    bits = np.zeros(-(-n // 64), np.uint64)
    words, add = rowlog.word_bits(ids)
    bits[words] |= add
    run = rowlog.RunIndex(bits, 0, n)
    every = np.arange(n)
    assert run.rows == ids.size and np.array_equal(run.holds(every), np.isin(every, ids))
    assert np.array_equal(run.rank(ids), np.arange(ids.size))
    assert np.array_equal(rowlog.set_ids(bits, 3, 17), ids[(ids >= 3 * 64) & (ids < 17 * 64)])
    assert run.start(0) == 0 and run.start(bits.size) == ids.size and run.start(2) == np.searchsorted(ids, 128)


@pytest.mark.parametrize("fold_rows, gather_bytes", [(rowlog.FOLD_ROWS, rowlog.GATHER_BYTES), (300, 50_000),
                                                      (300, 4096)])
def test_a_full_map_is_compacted_into_a_run(tmp_path, monkeypatch, fold_rows, gather_bytes):
    """A long run writes back more distinct rows than the map holds: the full map's rows are merged with the
    run's into a new run, in ID order, written sequentially (no row goes home, nothing is read-modify-written),
    and the log starts again: every read equals the plain file's, before and after a reopen. In pieces of
    `FOLD_ROWS` rows: 300, so a compaction takes several, and the old run is read in stretches; the log's rows
    gathered by one sequential pass over the log (~136 KB of them), by three (`GATHER_BYTES` 50,000), or read
    by sector where 34 passes would read more (4,096)."""
    monkeypatch.setattr(rowlog, "FOLD_ROWS", fold_rows)
    monkeypatch.setattr(rowlog, "GATHER_BYTES", gather_bytes)
    log, plain = pair(tmp_path, 2000)  # 10% of the rows; a run of up to sqrt(20,000 x 2,000) = 6,324
    rng = np.random.default_rng(8)
    for _ in range(4):
        write_back_random_rows(rng, 20, log, plain, span=6000)
        same(log, plain, torch.arange(N))
    st = log.stats()
    assert st["log_compactions"] >= 3 and st["log_folds"] == 0 and st["log_full"] == 0
    assert st["rmw_bytes_read"] == 0 and plain.stats()["rmw_bytes_read"] > 0
    assert 2000 < log.row_log.run.rows <= log.row_log.run_limit and log.row_log.live <= 2000
    log.close()
    again = SsdTable.open(tmp_path / "log.tbl", direct_io=True)
    assert again.row_log.run.rows == log.row_log.run.rows
    same(again, plain, torch.arange(N))
    write_back_random_rows(rng, 20, again, plain, span=6000)  # compactions go on from the reopened run
    same(again, plain, torch.arange(N))
    assert again.stats()["log_compactions"] >= 1
    again.close()
    log_path(tmp_path / "log.tbl").with_name("log.tbl.log.run").unlink()
    with pytest.raises(CheckpointError, match="compacted log"):
        SsdTable.open(tmp_path / "log.tbl", direct_io=True)


def test_a_run_beyond_its_share_folds_home_and_reads_fewer_bytes_than_folding_every_map(tmp_path, monkeypatch):
    """Once the run would hold more than its limit (sqrt(rows x map), at most 1/`RUN_SHARE` of the rows), the run
    and the map go home in ID order and the run starts empty; reads stay exact. Against a file whose run is too
    small to ever be used (every full map folds home, read-modify-writing a block for every ~6 rows),
    compacting into the run reads fewer bytes."""
    monkeypatch.setattr(rowlog, "RUN_SHARE", 4)  # a run of at most 5,000 rows (sqrt(20,000 x 2,000) = 6,324)
    log, plain = pair(tmp_path, 2000)
    monkeypatch.setattr(rowlog, "RUN_SHARE", N)  # a run of one row: each full map folds home
    folding = SsdTable(tmp_path / "fold.tbl", N, DIM, 1, create=True, init="lazy", init_seed=3, direct_io=True,
                       row_log=2000)
    write_back_random_rows(np.random.default_rng(4), 80, log, plain, folding)
    for t in (log, folding):
        same(t, plain, torch.arange(N))
    st, ft = log.stats(), folding.stats()
    assert st["log_folds"] >= 1 and st["log_compactions"] >= 1 and log.row_log.run.rows <= 5000
    assert ft["log_folds"] >= 3 and ft["log_compactions"] == 0
    assert st["device_bytes_read"] < ft["device_bytes_read"]


def test_a_sparse_full_map_is_compacted_too(tmp_path):
    """A map of 150 rows of a 20,000-row table (its rows in ~150 different blocks, where folding them home would
    cost a block per row): compacted into the run, no row goes home."""
    log, plain = pair(tmp_path, 150)
    write_back_random_rows(np.random.default_rng(9), 6, log, plain)
    st = log.stats()
    assert st["log_compactions"] > 0 and st["log_full"] == 0 and st["rmw_bytes_read"] == 0
    same(log, plain, torch.arange(N))


def test_a_compaction_holds_a_bounded_share_of_the_map_rows(tmp_path, monkeypatch):
    """A compaction's buffers are bounded by `GATHER_BYTES` (the log's rows kept per pass), not by the map: two files
    with the same ~7,600-row map (~520 KB of rows) compact in one sequential pass over the log and in three of
    ~175 KB; the three-pass compaction's Python allocations peak lower by most of the difference (tracemalloc),
    both read the log by passes (not by sector), and every row reads back as from a plain file."""
    import tracemalloc

    monkeypatch.setattr(rowlog, "GATHER_CHUNK", 32 << 10)
    monkeypatch.setattr(rowlog, "FOLD_ROWS", 512)  # the pieces written: ~35 KB each
    one, plain = pair(tmp_path, 8000)
    three = SsdTable(tmp_path / "three.tbl", N, DIM, 1, create=True, init="lazy", init_seed=3, direct_io=True,
                     row_log=8000)
    rng = np.random.default_rng(12)
    while one.row_log.live < 7500:
        write_back_random_rows(rng, 10, one, three, plain, span=N - 1)
    live = one.row_log.live
    peaks = []
    for t, gather in ((one, 16 << 20), (three, 192 << 10)):
        monkeypatch.setattr(rowlog, "GATHER_BYTES", gather)
        before = t.stats()["log_bytes_read"]
        tracemalloc.start()
        try:
            t.row_log.compact(t.read_local, lambda i, r, t=t: t._block_io(t._home_rows(i), r))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert t.row_log.live == 0 and t.row_log.run.rows >= live
        assert t.stats()["log_bytes_read"] > before  # the log's sequential passes, not a sector per row
        same(t, plain, torch.arange(N))
    assert peaks[1] < peaks[0] - 0.5 * (live * one.row_stride - (192 << 10)), peaks


@pytest.mark.parametrize("unread, gather_bytes", [(400, rowlog.GATHER_BYTES), (700, rowlog.GATHER_BYTES),
                                                   (400, 20_000), (400, 2_000)])
def test_a_compaction_keeps_the_rows_a_later_step_reads_back_in_the_log(tmp_path, monkeypatch, unread, gather_bytes):
    """A full map's rows written with a known read-back (a rank) that no step has read yet stay in the log, in the
    other half, where they were appended in rank order (a step reads them back by sector runs, not one sector per
    row from the ID-ordered run); rows read back already, and rows with no known read-back, go into the run. At
    most half the map stays (the oldest), so the next compaction is at least half a map away. Every read equals
    the plain file's, before and after the next compaction. The rows compacted are read while the kept ones
    move (one pass over the old half), or where they would not fit one pass (`GATHER_BYTES` 20,000: three) by
    passes over it after the move, or by sector (2,000)."""
    monkeypatch.setattr(rowlog, "GATHER_BYTES", gather_bytes)
    cap = 1000
    log, plain = pair(tmp_path, cap)
    rng = np.random.default_rng(unread)
    ids = np.sort(rng.permutation(N)[:cap])
    ranked = np.zeros(cap, bool)
    ranked[rng.permutation(cap)[: unread + 200]] = True
    rank = np.where(ranked, 10**6 + rng.permutation(cap), rowlog.UNRANKED)
    weight, state = torch.randn(cap, DIM), torch.rand(cap, 1)
    for part in np.array_split(np.arange(cap), 4):  # four appends: the oldest rows sit in the lowest slots
        log.write(torch.from_numpy(ids[part]), weight[part], state[part], rank=rank[part])
        plain.write(torch.from_numpy(ids[part]), weight[part], state[part])
    done = ids[ranked][rng.permutation(unread + 200)[:200]]  # a step reads 200 of the ranked rows back
    got = log.exchange(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM), torch.empty(0, 1),
                       torch.from_numpy(done))
    assert torch.equal(got[0], plain.read(torch.from_numpy(done))[0])
    waiting = np.setdiff1d(ids[ranked], done)
    slots = log.row_log.lookup(waiting, waiting) - log.row_log.base
    waiting = waiting[np.argsort(slots)][: cap // 2]  # the kept ones: the oldest, at most half the map
    new = np.setdiff1d(np.arange(N), ids)[:100]
    w2, s2 = torch.randn(100, DIM), torch.rand(100, 1)
    for t in (log, plain):  # the map is full: compacted first
        t.write(torch.from_numpy(new), w2, s2)
    st, rl = log.stats(), log.row_log
    assert st["log_compactions"] == 1 and st["log_kept_rows"] == waiting.size == min(unread, cap // 2)
    assert rl.live == waiting.size + 100 and rl.run.rows == cap - waiting.size
    assert not rl.run.holds(waiting).any() and rl.run.holds(np.setdiff1d(ids, waiting)).all()
    moved = rl.lookup(waiting, np.full(waiting.size, -1)) - rl.base
    assert (moved >= 0).all() and (moved // rl.half == rl.active).all()  # in the half appends go to now
    same(log, plain, torch.arange(N))
    log.exchange(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM), torch.empty(0, 1), torch.from_numpy(waiting))
    more = np.setdiff1d(np.arange(N), np.concatenate([ids, new]))[:900]
    w3, s3 = torch.randn(more.size, DIM), torch.rand(more.size, 1)
    for t in (log, plain):  # read back now: the next compaction takes them into the run
        t.write(torch.from_numpy(more), w3, s3)
    st = log.stats()
    assert st["log_compactions"] == 2 and st["log_kept_rows"] == waiting.size and rl.live == more.size
    assert rl.run.holds(np.concatenate([waiting, new])).all()
    same(log, plain, torch.arange(N))


def test_slot_bits_set_get_and_ranges_agree():
    """`SlotBits`: a range set word by word equals the same bits set one by one, at every alignment, and `get`
    reads back what was set (against a bool array)."""
    rng = np.random.default_rng(21)
    n = 1001
    ranges, scattered, want = rowlog.SlotBits(n), rowlog.SlotBits(n), np.zeros(n, bool)
    for _ in range(300):
        s = int(rng.integers(0, n))
        on = rng.random(int(rng.integers(0, n - s + 1))) < 0.5
        ranges.set_range(s, on)
        scattered.set(np.arange(s, s + on.size), on)
        want[s : s + on.size] = on
        assert np.array_equal(ranges.words, scattered.words)
    assert np.array_equal(ranges.get(np.arange(n)), want)
    some = rng.permutation(n)[:50]
    ranges.set(some, False)
    want[some] = False
    assert np.array_equal(ranges.get(np.arange(n)), want)

"""Rows of several table files in one pass: `read_many` and `exchange_many` over `SsdTable` s.

`read_many` plans all tables' rows together (one `tierec.storage.blockio.plan_runs` per kind of
file) into one buffer, read by one Linux AIO batch or by concurrent ``preadv`` lanes;
`exchange_many` writes and reads several O_DIRECT tables' rows in one or two AIO batches (a
`TableGroup`'s step, `SsdTable.exchange` of one file). Counters stay per table. See
docs/storage.md.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from tierec.sparse.dedup import expand_ranges
from tierec.storage import aio, blockio

if TYPE_CHECKING:
    from tierec.storage.ssd import SsdTable

log = logging.getLogger(__name__)

LANE_MIN_ROWS = 32  # a read of fewer rows stays in the calling thread
READ_GAP_BLOCKS = 1  # O_DIRECT reads: runs at most one block apart become one read of the span


def read_many(reads: list[tuple[SsdTable, np.ndarray]], pool: ThreadPoolExecutor | None = None,
              lanes: int = blockio.IO_LANES, recent: bool = False) -> list[np.ndarray]:
    """Rows of several tables at once: [(table, row IDs int64 [U_i])] -> [rows [U_i, width] float32].

    The tables' reads are planned together in one vectorised pass per kind of file (O_DIRECT:
    the 4 KiB blocks that hold the rows; buffered: exactly the rows' bytes; adjacent runs
    coalesced) into one buffer, read by up to ``lanes`` concurrent ``preadv`` loops (on ``pool``,
    default `tierec.storage.blockio.io_pool`, plus the calling thread) -- a few hundred random rows cost a few device
    latencies instead of one each, and no page faults -- and one gather copies the rows out.
    A kind with fewer than ``LANE_MIN_ROWS`` rows in all stays in the calling thread (memmap
    gather or block I/O). Counters are kept per table. Never-written rows of lazy files are not
    read: they get their initial values (`tierec.storage.lazy`). A row set with an ``older`` link
    (an incremental checkpoint) gives the rows it does not hold to the link below, newest first;
    every link's reads go in the same plan. ``recent``: a cache's step (`exchange_many`, `SsdTable.exchange`) --
    rows in log sectors read lately come from memory and the log sectors read are kept
    (`tierec.storage.rowlog.RecentSectors`), and the staged rank groups it asks for go to the log first, to be
    read back together; bulk reads (checkpoints, evaluation, serving) leave the recent sectors alone and copy
    staged rows from the staging area, which stays as it is (`RowLog.staged_rows`)."""
    asked = [(t, t.check_ids(ids)) for t, ids in reads]
    parts: list[tuple[int, SsdTable, np.ndarray, np.ndarray]] = []  # (read i, file, file rows, positions in i)
    fresh: list[tuple[int, np.ndarray, np.ndarray]] = []  # (read i, never-written IDs, their positions)
    staged: list[tuple[int, np.ndarray, np.ndarray]] = []  # (read i, positions in i, rows): a bulk read's staged rows
    for i, (t, ids) in enumerate(asked):
        link: SsdTable | None = t
        left, pos = ids, np.arange(ids.size)
        if not recent and t.row_log is not None:  # staged write-backs from memory, their rank groups left staged
            held, rows = t.row_log.staged_rows(left)
            if held.any():
                staged.append((i, pos[held], rows))
                t.account("read", rows.shape[0], 0.0)
                left, pos = left[~held], pos[~held]
        while link is not None and left.size:
            lazy = link.lazy_rows()
            if lazy is None:
                parts.append((i, link, link.slots_of(left, unstage=recent), pos))
                left = left[:0]
                break
            w = lazy.stored.test(left)
            parts.append((i, link, link.slots_of(left[w], unstage=recent), pos[w]))
            left, pos = left[~w], pos[~w]
            link = link.older
        if left.size:
            fresh.append((i, left, pos))
    got = _read_files([(f, rows) for _, f, rows, _ in parts], pool, lanes, recent)
    if len(parts) == len(asked) and not fresh and not staged:  # every row from its own file: the plain case
        return got
    out = [np.zeros((ids.size, t.width), np.float32) for t, ids in asked]
    for (i, _, _, pos), rows in zip(parts, got, strict=True):
        out[i][pos] = rows
    for i, pos, rows in staged:
        out[i][pos] = rows
    for i, left, pos in fresh:
        lazy = asked[i][0].lazy_rows()
        assert lazy is not None  # only lazy files leave rows unread
        out[i][pos, : lazy.init.dim] = lazy.init.rows(left).numpy()
    return out


def _written(t: SsdTable, ids: np.ndarray) -> np.ndarray | None:
    """bool [U]: which rows ``ids`` of ``t`` were written (a lazy file); None: all rows are read."""
    lazy = t.lazy_rows()
    return None if lazy is None else lazy.stored.test(ids)


def _read_files(reads: list[tuple[SsdTable, np.ndarray]], pool: ThreadPoolExecutor | None, lanes: int,
                recent: bool = False) -> list[np.ndarray]:
    """`read_many` of rows that are all in the files."""
    out: list = [None] * len(reads)
    groups: dict[tuple, list[int]] = {}
    for i, (t, ids) in enumerate(reads):
        if ids.size and lanes > 1 and t.read_fd >= 0:
            groups.setdefault((t.width, t.odirect, t.row_stride, t.read_align), []).append(i)
    for idx in groups.values():
        if sum(reads[i][1].size for i in idx) < LANE_MIN_ROWS:
            continue  # read below, in this thread
        got = _read_group([reads[i][0] for i in idx], [reads[i][1] for i in idx], pool or blockio.io_pool(), lanes,
                          recent)
        for i, rows in zip(idx, got, strict=True):
            out[i] = rows
    for i, (t, ids) in enumerate(reads):
        if out[i] is None:
            t0 = time.perf_counter()
            out[i] = t.read_local(ids)
            t.account("read", ids.size, time.perf_counter() - t0)
    return out


def _read_group(tabs: list[SsdTable], ids: list[np.ndarray], pool: ThreadPoolExecutor, lanes: int,
                use_recent: bool = False) -> list[np.ndarray]:
    """`read_many` for tables of one row width and one kind of descriptor (``ids``: file rows, any order).
    With ``use_recent``, rows whose sectors a write-back log holds in memory (`tierec.storage.rowlog.RecentSectors`)
    are copied from there; the rest are read, and the log sectors read are handed to it."""
    recent = [t.row_log.recent if t.row_log is not None and use_recent else None for t in tabs]
    if all(r is None for r in recent):
        return _read_devices(tabs, ids, pool, lanes)
    epochs = [0 if r is None else r.epoch for r in recent]  # before any byte is read
    held = [None if r is None else r.rows(x * t.row_stride, t.row_bytes) for t, x, r in zip(tabs, ids, recent, strict=True)]
    got = _read_devices(tabs, [x if h is None else x[~h[0]] for x, h in zip(ids, held, strict=True)], pool, lanes,
                        keep=lambda plan, tab_of_run, buf: _keep_recent(tabs, recent, epochs, plan, tab_of_run, buf))
    out = []
    for t, x, h, rows in zip(tabs, ids, held, got, strict=True):
        if h is not None and h[0].any():
            rows, read = np.empty((x.size, t.width), np.float32), rows
            rows[~h[0]] = read
            rows[h[0]] = h[1].view(np.float32)[:, : t.width]
            t.account("read", int(np.count_nonzero(h[0])), 0.0)
        out.append(rows)
    return out


def _keep_recent(tabs: list[SsdTable], recent: list, epochs: list[int], plan: blockio.BlockPlan,
                 tab_of_run: np.ndarray, buf) -> None:
    """Hand the sectors of ``plan``'s runs (read into ``buf``) that lie in a table's log halves to its
    `RecentSectors` (at most as many as it holds: the last ones)."""
    flat = np.frombuffer(buf, np.uint8)
    for k, r in enumerate(recent):
        lg = tabs[k].row_log
        if r is None or lg is None:
            continue
        lo, hi = lg.base * lg.stride, (lg.base + 2 * lg.half) * lg.stride
        sel = np.flatnonzero((tab_of_run == k) & (plan.foff >= lo) & (plan.foff + plan.nbytes <= hi))
        if sel.size:
            count = plan.nbytes[sel] // r.size
            sectors = expand_ranges(plan.foff[sel] // r.size, count)[-r.capacity :]
            at = expand_ranges(plan.boff[sel] // r.size, count)[-r.capacity :]
            r.keep(sectors, flat[: flat.size // r.size * r.size].reshape(-1, r.size)[at], epochs[k])
    del flat


def _read_devices(tabs: list[SsdTable], ids: list[np.ndarray], pool: ThreadPoolExecutor, lanes: int,
                  keep: Callable | None = None) -> list[np.ndarray]:
    """`_read_group`'s device reads: one plan over the tables' file rows ``ids`` (any order: planned sorted, and
    the rows gathered from the buffer in the order asked, one copy); ``keep(plan, table of each run, buffer)``
    sees the runs read before the buffer goes."""
    t0 = time.perf_counter()
    if not any(x.size for x in ids):
        return [np.empty((0, t.width), np.float32) for t in tabs]
    n = np.array([x.size for x in ids])
    tab_of = np.repeat(np.arange(len(tabs)), n)
    rb, stride = tabs[0].row_bytes, tabs[0].row_stride
    odirect = tabs[0].odirect
    order = [None if x.size < 2 or np.all(x[1:] > x[:-1]) else np.argsort(x, kind="stable") for x in ids]
    plan = blockio.plan_runs(np.concatenate([x if o is None else x[o] for x, o in zip(ids, order, strict=True)]) * stride,
                             rb, tab_of, tabs[0].read_align if odirect else 4, READ_GAP_BLOCKS if odirect else 0)
    at = _in_order_asked(plan.pos, n, order)
    run_tab = tab_of[plan.first].tolist()
    fds = [t.read_fd for t in tabs]
    sizes = [t.file_bytes for t in tabs]
    if blockio.use_aio(odirect, plan.nbytes):  # all blocks of all tables in flight at once
        buf = aio.aligned_buffer(plan.total)
        rt = tab_of[plan.first]
        try:
            blockio.aio_runs(aio.IOCB_CMD_PREAD, np.array(fds)[rt], plan.foff, plan.nbytes,
                             buf.ctypes.data + plan.boff.astype(np.uint64), np.array(sizes)[rt],
                             lambda i: tabs[rt[i]].path)
        except OSError as e:  # e.g. a filesystem that opened O_DIRECT but refuses the I/O: the per-table path copes
            log.debug("batched read failed (%s); reading table by table", e)
            return [t.read_local(x) for t, x in zip(tabs, ids, strict=True)]
        if keep is not None:
            keep(plan, rt, buf)
        return _finish_group(tabs, ids, plan, tab_of, n, tabs[0].gather(buf, at), sizes, t0)
    runs = list(zip(run_tab, plan.foff.tolist(), plan.nbytes.tolist(), plan.boff.tolist(), strict=True))
    mm = mmap.mmap(-1, plan.total)  # page-aligned, as O_DIRECT needs
    mv = memoryview(mm)
    lanes = max(1, min(lanes, len(runs)))

    def lane(k: int) -> None:
        for t, foff, nbytes, boff in runs[k::lanes]:
            blockio.pread_exact(fds[t], mv, foff, nbytes, boff, sizes[t], tabs[t].path)

    try:
        futs = [pool.submit(lane, k) for k in range(1, lanes)]
        errors = []
        try:
            lane(0)
        except OSError as e:
            errors.append(e)
        for f in futs:  # every lane is done before the buffer goes
            try:
                f.result()
            except OSError as e:
                errors.append(e)
        if errors:  # e.g. a filesystem that opened O_DIRECT but refuses the I/O: the per-table path copes
            log.debug("concurrent read failed (%s); reading table by table", errors[0])
            return [t.read_local(x) for t, x in zip(tabs, ids, strict=True)]
        if keep is not None:
            keep(plan, tab_of[plan.first], mm)
        rows = tabs[0].gather(mm, at)
    finally:
        mv.release()
        try:
            mm.close()
        except BufferError:  # a numpy view still exports it; freed at GC
            pass
    return _finish_group(tabs, ids, plan, tab_of, n, rows, sizes, t0)


def _in_order_asked(pos: np.ndarray, n: np.ndarray, order: list[np.ndarray | None]) -> np.ndarray:
    """Buffer positions of rows planned sorted (``pos`` [sum n]: tables' rows end to end, table k's ``n[k]`` rows
    in the order ``order[k]``, an argsort, or None: as asked) -> the same positions in the order asked."""
    if all(o is None for o in order):
        return pos
    pos, ends = pos.copy(), np.cumsum(n)
    for o, a, b in zip(order, ends - n, ends, strict=True):
        if o is not None:
            pos[a:b][o] = pos[a:b].copy()  # rows asked o[r]-th were planned r-th
    return pos


def _finish_group(tabs, ids, plan: blockio.BlockPlan, tab_of, n, rows: np.ndarray, sizes,
                  t0: float) -> list[np.ndarray]:
    """Counters of a `_read_group` (device bytes per table, rows, time) and its rows split per table."""
    dt = (time.perf_counter() - t0) / len(tabs)
    got = np.minimum(plan.nbytes, np.array(sizes)[tab_of[plan.first]] - plan.foff)
    per_tab = np.bincount(tab_of[plan.first], weights=got, minlength=len(tabs))
    for k, t in enumerate(tabs):
        t.count_device_bytes(read=int(per_tab[k]))
        t.account("read", int(n[k]), dt)
        if t.direct_io and not t.odirect:  # the buffered fallback: drop what the reads put in the page cache
            os.posix_fadvise(t.buffered_fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return np.split(rows, np.cumsum(n)[:-1])


def exchange_many(tabs: list[SsdTable], wt: np.ndarray, wid: np.ndarray, rows: np.ndarray, rt: np.ndarray,
                  rid: np.ndarray, wrank: np.ndarray | None = None) -> np.ndarray | None:
    """`SsdTable.exchange` of several tables at once: rows ``wid`` of tables ``tabs[wt]`` written from
    ``rows`` [W, width], rows ``rid`` of tables ``tabs[rt]`` read -> [R, width] (both sets sorted by
    (table, row), disjoint, W and R > 0); ``wrank`` (int64 [W] or None): where tables with a write-back
    log place the written rows (`tierec.storage.rowlog.RowLog.append`). For O_DIRECT tables read by
    Linux AIO that share one row width, stride and block size:

    * padded rows, one per block (`SsdTable.exclusive_blocks`): the written rows' blocks are written
      without being read, in the same AIO batch as the reads -- one device round trip per step;
    * packed rows: the blocks of both sets, of all tables, read in one batch, the written rows patched
      in, and the blocks that hold them written in a second batch -- two round trips.

    A few system calls for all tables instead of a thread and a pair of batches per table. None
    where this cannot run (nothing was written: the caller goes table by table)."""
    t0 = tabs[0]
    if not (aio.available() and all(t.odirect and (t.width, t.row_stride, t.align)
                                    == (t0.width, t0.row_stride, t0.align) for t in tabs)):
        return None
    asked_t, asked = rt, rid  # never-written rows of lazy files are not read (initial values)
    written = np.ones(rid.size, bool)
    for k in np.unique(rt).tolist():
        mine = rt == k
        if (w := _written(tabs[k], rid[mine])) is not None:
            written[mine] = w
    rt, rid = rt[written], rid[written]
    for k in np.unique(wt).tolist():
        tabs[k].prepare_write()
    wt, wid, rows = _append_to_logs(tabs, wt, wid, rows, wrank)
    if wid.size == 0 or t0.read_align < t0.align:  # nothing left to write in place, or reads by sector and
        if wid.size and _exchange_blocks(tabs, wt, wid, rows, rt[:0], rid[:0]) is None:  # writes by block
            return None  # (what went to a log is there: written again by the caller, the same bytes)
        out = np.concatenate([np.empty((0, t0.width), np.float32),
                              *read_many([(tabs[k], rid[rt == k]) for k in np.unique(rt).tolist()], recent=True)])
        return _fill_unread(tabs, out, written, asked_t, asked)
    got = _exchange_blocks(tabs, wt, wid, rows, rt, rid)
    return None if got is None else _fill_unread(tabs, got, written, asked_t, asked)


def _exchange_blocks(tabs, wt: np.ndarray, wid: np.ndarray, rows: np.ndarray, rt: np.ndarray,
                     rid: np.ndarray) -> np.ndarray | None:
    """`exchange_many`'s block pass over rows that are all in the files: writes in place (blind or
    read-modify-write) and reads, counted per table; the rows read, or None where it cannot run."""
    start = time.perf_counter()
    blind = all(t.exclusive_blocks for t in tabs)
    fw, fr, ow, orr = _to_file_rows(tabs, wt, wid, rt, rid)
    try:
        got = (_many_blind if blind else _many_rmw)(tabs, wt[ow], fw, rows[ow], rt[orr], fr)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        log.debug("batched exchange refused (%s); table by table", e)  # each table then finds its own way
        return None
    if got is None:
        return None
    out, dev_w, dev_r, dev_rmw = got
    if isinstance(orr, np.ndarray):  # back to the callers' (table, ID) order
        out[orr] = out.copy()
    n = len(tabs)
    for k in np.unique(wt).tolist():
        tabs[k].mark_stored(wid[wt == k])
    rows_w, rows_r = np.bincount(wt, minlength=n), np.bincount(rt, minlength=n)
    dt = (time.perf_counter() - start) / max(1, int(np.count_nonzero(rows_w + rows_r)))
    for k, t in enumerate(tabs):
        t.count_device_bytes(read=int(dev_r[k]), written=int(dev_w[k]), rmw=int(dev_rmw[k]))
        if rows_w[k]:
            t.account("write", int(rows_w[k]), dt / 2 if rows_r[k] else dt)
        if rows_r[k]:
            t.account("read", int(rows_r[k]), dt / 2 if rows_w[k] else dt)
    return out


def _fill_unread(tabs, out: np.ndarray, written: np.ndarray, asked_t: np.ndarray, asked: np.ndarray) -> np.ndarray:
    """The rows asked (``asked`` of tables ``tabs[asked_t]``) from ``out``, the rows read (those ``written``),
    and for the rest -- not in the files -- their initial values or an older link's (`SsdTable.attach`)."""
    if written.all():
        return out
    width, dim = tabs[0].width, tabs[0].dim
    full = np.zeros((asked.size, width), np.float32)
    full[written] = out
    for k in np.unique(asked_t[~written]).tolist():
        fresh = np.flatnonzero(~written & (asked_t == k))
        older = tabs[k].older
        if older is not None:
            full[fresh] = read_many([(older, asked[fresh])])[0]
            continue
        lazy = tabs[k].lazy_rows()
        assert lazy is not None
        full[fresh, :dim] = lazy.init.rows(asked[fresh]).numpy()
    return full


def _append_to_logs(tabs, wt: np.ndarray, wid: np.ndarray, rows: np.ndarray, wrank: np.ndarray | None = None):
    """Writes (sorted by table, ID; ``wrank``: their placement ranks, int64 [W] or None) to tables with a write-back
    log appended there (`SsdTable.append_log`); the writes left for the block path: (tables, IDs, rows)."""
    keep = np.ones(wid.size, bool)
    for k in np.unique(wt).tolist():
        t = tabs[k]
        if t.row_log is None:
            continue
        m = np.flatnonzero(wt == k)
        t0 = time.perf_counter()
        took = m[t.append_log(wid[m], rows[m], None if wrank is None else wrank[m])]
        if took.size:
            t.account("write", int(took.size), time.perf_counter() - t0)
            keep[took] = False
    return (wt, wid, rows) if keep.all() else (wt[keep], wid[keep], rows[keep])


def _to_file_rows(tabs, wt, wid, rt, rid):
    """The file rows of (table, ID)-sorted writes and reads, sorted by (table, file row) as block plans
    need: (file rows written, file rows read, the writes' order, the reads' order); orders are
    slices (no reordering) where no table has a hot-row layout."""
    if all(t.rows_by_id for t in tabs):
        return wid, rid, slice(None), slice(None)
    fw, fr = wid.copy(), rid.copy()
    for tab, ids, f in ((wt, wid, fw), (rt, rid, fr)):
        for k in np.unique(tab).tolist():
            m = tab == k
            f[m] = tabs[k].slots_of(ids[m])
    ow, orr = np.lexsort((fw, wt)), np.lexsort((fr, rt))
    return fw[ow], fr[orr], ow, orr


def _other_rows_hold_data(tabs, run_tab: np.ndarray, foff: np.ndarray, nbytes: np.ndarray, wtab: np.ndarray,
                          wrows: np.ndarray) -> np.ndarray:
    """bool [R]: whether block run i (``nbytes[i]`` bytes at ``foff[i]`` of ``tabs[run_tab[i]]``) holds bytes of
    a row with data in the file besides the file rows being written now (``wrows``, sorted per table
    ``wtab``). A lazy file's never-written rows (and a hot row's empty home) hold none: their bytes are
    never read, so a run of written rows among them is written without reading it first. Runs past the home
    rows (a write-back log's compacted run: `tierec.storage.rowlog`) count as holding data."""
    out = np.ones(run_tab.size, bool)
    for k in np.unique(run_tab).tolist():
        t = tabs[k]
        if t.lazy_rows() is None:
            continue  # every row holds data
        m = np.flatnonzero(run_tab == k)
        lo = foff[m] // t.row_stride
        hi = np.minimum((foff[m] + nbytes[m] - 1) // t.row_stride, t.home_rows - 1)  # rows overlapping each run
        cnt = np.maximum(hi - lo + 1, 0)  # none past the home rows: those runs keep True
        frows = expand_ranges(lo, cnt)
        _, data = t.rows_with_data(frows)
        mine = wrows[wtab == k]
        pos = np.minimum(np.searchsorted(mine, frows), max(mine.size - 1, 0))
        data &= ~((mine[pos] == frows) if mine.size else np.zeros(frows.size, bool))
        home = cnt > 0
        if frows.size:
            out[m[home]] = np.add.reduceat(data, np.concatenate([[0], np.cumsum(cnt[home])[:-1]])) > 0
    return out


def _refuse_repeats(tabs, tab: np.ndarray, ids: np.ndarray) -> None:
    """ValueError naming the file if a (table, row) of the (table, row)-sorted arrays comes twice."""
    bad = np.flatnonzero((ids[1:] == ids[:-1]) & (tab[1:] == tab[:-1]))
    if bad.size:
        k = int(bad[0])
        raise ValueError(f"{tabs[tab[k]].path}: exchange: row {int(ids[k])} is repeated, or both written and read")


def write_block_runs(tabs: list[SsdTable], run_tab: np.ndarray, foff: np.ndarray, nbytes: np.ndarray,
                     boff: np.ndarray, addrs: np.ndarray, mv: memoryview) -> np.ndarray:
    """Write block runs from the aligned buffer behind ``mv`` (run i: ``nbytes[i]`` bytes of file
    ``tabs[run_tab[i]]`` at offset ``foff[i]``, buffer offset ``boff[i]``, address ``addrs[i]``): whole
    blocks in one AIO batch, a file's partial last block through the page cache. Bytes written per run
    (int64 [R])."""
    fds, size = _runs_of(tabs, run_tab)
    valid = np.minimum(nbytes, size - foff)
    align = tabs[0].align
    aligned = np.where(valid == nbytes, valid, valid // align * align)
    a = np.flatnonzero(aligned > 0)
    blockio.aio_runs(aio.IOCB_CMD_PWRITE, fds[a], foff[a], aligned[a], addrs[a], size[a],
                     lambda i: tabs[run_tab[a[i]]].path)
    for i in np.flatnonzero(valid > aligned).tolist():  # only a file's last run can have a tail
        t = tabs[run_tab[i]]
        off, v, b = int(foff[i] + aligned[i]), int(valid[i] - aligned[i]), int(boff[i] + aligned[i])
        os.pwrite(t.buffered_fd, mv[b : b + v], off)
        os.posix_fadvise(t.buffered_fd, off, v, os.POSIX_FADV_DONTNEED)
    return valid


def _runs_of(tabs, run_tab):
    """Per block run: its table's O_DIRECT descriptor and file size."""
    return np.array([t.direct_fd for t in tabs])[run_tab], np.array([t.file_bytes for t in tabs])[run_tab]


def _many_blind(tabs, wt, wid, rows, rt, rid):
    """`exchange_many` of padded rows: writes and reads in one AIO batch. (rows read, device bytes
    written per table, device bytes read per table, of which read-modify-write: none), or None if a run is
    too long for one op."""
    t0, n = tabs[0], len(tabs)
    tab, ids = np.concatenate([wt, rt]).astype(np.int64), np.concatenate([wid, rid])
    order = np.lexsort((ids, tab))
    _refuse_repeats(tabs, tab[order], ids[order])  # a block both written and read in one batch: a race
    pw = blockio.plan_runs(wid * t0.row_stride, t0.row_bytes, wt, t0.align)
    pr = blockio.plan_runs(rid * t0.row_stride, t0.row_bytes, rt, t0.align)
    nbytes = np.concatenate([pw.nbytes, pr.nbytes])
    if not blockio.use_aio(True, nbytes):
        return None
    buf = aio.aligned_buffer(pw.total + pr.total)
    buf[: pw.total] = 0  # the written rows' padding
    t0.rows_at(buf, writeable=True)[pw.pos] = rows
    run_tab = np.concatenate([wt[pw.first], rt[pr.first]])
    addrs = np.uint64(buf.ctypes.data) + np.concatenate([pw.boff, pw.total + pr.boff]).astype(np.uint64)
    ops = np.concatenate([np.full(pw.foff.size, aio.IOCB_CMD_PWRITE), np.full(pr.foff.size, aio.IOCB_CMD_PREAD)])
    fds, sizes = _runs_of(tabs, run_tab)
    blockio.aio_runs(ops, fds, np.concatenate([pw.foff, pr.foff]), nbytes, addrs, sizes,
                     lambda i: tabs[run_tab[i]].path)
    return (t0.gather(buf, pr.pos, pw.total // 4), np.bincount(wt[pw.first], weights=pw.nbytes, minlength=n),
            np.bincount(rt[pr.first], weights=pr.nbytes, minlength=n), np.zeros(n))


def _many_rmw(tabs, wt, wid, rows, rt, rid):
    """`exchange_many` of packed rows: every block of both sets read in one AIO batch, the written
    rows patched in, their blocks written in a second (a file's partial last block through the page
    cache). Same result as `_many_blind`."""
    t0, n, W = tabs[0], len(tabs), wid.size
    tab = np.concatenate([wt, rt]).astype(np.int64)
    ids = np.concatenate([wid, rid])
    order = np.lexsort((ids, tab))  # by (table, row)
    tab, ids = tab[order], ids[order]
    _refuse_repeats(tabs, tab, ids)
    is_w = order < W
    plan = blockio.plan_runs(ids * t0.row_stride, t0.row_bytes, tab, t0.align)
    if not blockio.use_aio(True, plan.nbytes):
        return None
    buf = aio.aligned_buffer(plan.total)
    base = np.uint64(buf.ctypes.data)
    addrs = base + plan.boff.astype(np.uint64)
    run_tab = tab[plan.first]
    fds, sizes = _runs_of(tabs, run_tab)
    run_of = np.searchsorted(plan.first, np.arange(ids.size), side="right") - 1
    only_w = np.ones(plan.first.size, bool)  # runs read only to patch written rows in: read-modify-write
    only_w[run_of[~is_w]] = False
    blind = only_w.copy()  # ... unless no other row of theirs holds data: then not read at all
    blind[only_w] = ~_other_rows_hold_data(tabs, run_tab[only_w], plan.foff[only_w], plan.nbytes[only_w], tab[is_w],
                                           ids[is_w])
    if blind.any():  # zeros where the rows without data sit (never read back: their initial values are)
        a = t0.align
        buf.reshape(-1, a)[expand_ranges(plan.boff[blind] // a, plan.nbytes[blind] // a)] = 0
    r = np.flatnonzero(~blind)
    blockio.aio_runs(aio.IOCB_CMD_PREAD, fds[r], plan.foff[r], plan.nbytes[r], addrs[r], sizes[r],
                     lambda i: tabs[run_tab[r[i]]].path)
    got = np.minimum(plan.nbytes, sizes - plan.foff) * ~blind
    dev_r = np.bincount(run_tab, weights=got, minlength=n)
    dev_rmw = np.bincount(run_tab[only_w], weights=got[only_w], minlength=n)
    win = t0.rows_at(buf, writeable=True)
    out = np.empty((rid.size, t0.width), np.float32)
    out[order[~is_w] - W] = win[plan.pos[~is_w]]  # before the patch: the read rows as on disk
    win[plan.pos[is_w]] = rows[order[is_w]]
    wr = np.unique(run_of[is_w])  # runs with a written row
    mv = memoryview(buf)
    try:
        valid = write_block_runs(tabs, run_tab[wr], plan.foff[wr], plan.nbytes[wr], plan.boff[wr], addrs[wr], mv)
    finally:
        mv.release()
    dev_w = np.bincount(run_tab[wr], weights=valid, minlength=n)
    return out, dev_w, dev_r, dev_rmw

"""Linux AIO batches (tierec.storage.aio): many blocks per call, results in op order, errors raised."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tierec.storage import aio

pytestmark = pytest.mark.skipif(not aio.available(), reason="Linux AIO is refused on this machine")


def _file(tmp_path, blocks):
    p = tmp_path / "f.bin"
    data = np.random.default_rng(0).integers(0, 255, blocks * 4096 + 1000, dtype=np.uint8)  # a partial last block
    p.write_bytes(data.tobytes())
    return p, data


def test_reads_and_writes_more_blocks_than_the_ring_holds(tmp_path):
    p, data = _file(tmp_path, 700)
    fd = os.open(p, os.O_RDWR | os.O_DIRECT)
    try:
        ring = aio.AioRing(depth=64)  # 701 ops through 64 slots
        order = np.random.default_rng(1).permutation(701)
        offs = order.astype(np.int64) * 4096
        buf = aio.aligned_buffer(701 * 4096)
        addrs = buf.ctypes.data + 4096 * np.arange(701, dtype=np.uint64)
        res = ring.run(aio.IOCB_CMD_PREAD, np.full(701, fd), offs, np.full(701, 4096), addrs)
        assert res.tolist() == [1000 if o == 700 else 4096 for o in order]  # the last block stops at the end
        for i, o in enumerate(order[:50]):
            n = int(res[i])
            assert np.array_equal(buf[i * 4096 : i * 4096 + n], data[o * 4096 : o * 4096 + n])
        buf[:] = 7
        full = np.array([o for o in order[:11] if o != 700][:10])  # whole blocks only
        res = ring.run(aio.IOCB_CMD_PWRITE, np.full(10, fd), full * 4096, np.full(10, 4096), addrs[:10])
        assert res.tolist() == [4096] * 10
        ring.close()
    finally:
        os.close(fd)
    back = np.frombuffer(p.read_bytes(), np.uint8)
    assert all(bool((back[o * 4096 : (o + 1) * 4096] == 7).all()) for o in full)
    assert np.array_equal(np.delete(back.reshape(-1)[: 700 * 4096].reshape(700, 4096), full, 0),
                          np.delete(data[: 700 * 4096].reshape(700, 4096), full, 0))  # nothing else changed


def test_bad_ops_report_per_op_errors_or_raise(tmp_path):
    p, _ = _file(tmp_path, 4)
    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    buf = aio.aligned_buffer(8192)
    try:
        res = aio.ring().run(aio.IOCB_CMD_PREAD, np.array([fd, fd]), np.array([0, 100]), np.array([4096, 4096]),
                             np.array([buf.ctypes.data, buf.ctypes.data + 4096], dtype=np.uint64))
        assert res[0] == 4096 and res[1] < 0  # a misaligned O_DIRECT read fails alone (-EINVAL)
    finally:
        os.close(fd)
    with pytest.raises(OSError):  # a closed descriptor: refused at submission
        aio.ring().run(aio.IOCB_CMD_PREAD, np.array([fd]), np.array([0]), np.array([4096]),
                       np.array([buf.ctypes.data], dtype=np.uint64))
    assert aio.ring().run(aio.IOCB_CMD_PREAD, *(np.zeros(0, np.int64),) * 4).size == 0


def test_a_thread_refused_a_context_falls_back_to_one_call_per_run(tmp_path, monkeypatch):
    """io_setup can fail in a new thread (fs.aio-max-nr reached): that thread's block I/O still works."""
    import threading

    import torch

    from tierec.storage.ssd import SsdTable

    SsdTable(tmp_path / "t.tbl", 3000, 13, 1, create=True, init_seed=0).close()
    mm = SsdTable(tmp_path / "t.tbl", 3000, 13, 1, readonly=True)
    dio = SsdTable(tmp_path / "t.tbl", 3000, 13, 1, readonly=True, direct_io=True)
    ids = torch.arange(0, 3000, 7)
    real = aio.AioRing.__init__

    def refuse(self, depth=aio.DEPTH):
        raise OSError(11, "Resource temporarily unavailable (refused by test)")

    out = {}

    def other_thread():
        monkeypatch.setattr(aio.AioRing, "__init__", refuse)
        try:
            out["available"] = aio.available()
            out["rows"] = dio.read(ids)[0]
        finally:
            monkeypatch.setattr(aio.AioRing, "__init__", real)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert out["available"] is False and torch.equal(out["rows"], mm.read(ids)[0])
    assert aio.available()  # this thread keeps its context

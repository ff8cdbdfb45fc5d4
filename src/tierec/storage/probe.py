"""What the SSD tier's device delivers: random block reads at several queue depths.

Every figure of the SSD tier -- a training step's prefetch, a served request's misses -- is
bounded by the device under the table files: its random-read rate (IOPS) and its latency tail.
`probe_reads` measures both the way the tier reads (``O_DIRECT`` ``preadv`` of 4 KiB blocks at
random offsets of the table files, ``queue_depth`` threads each with one read in flight), so a
run's numbers can be read against the device's:

    tierec probe runs/a/checkpoints            # the table files of a run
    tierec probe --scratch /mnt/nvme --size 2GiB

Reads of a file that refuses ``O_DIRECT`` (tmpfs, some overlays) go through the page cache,
which makes them memory reads; the result says so (``direct=False``).

One Python thread issues one read at a time, with a few microseconds of overhead per read, so
rates beyond ~100K IOPS per queue depth are under-reported: a bound that matters only for
devices far faster than what the tier needs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tierec.errors import ConfigError
from tierec.storage.aio import aligned_buffer

log = logging.getLogger(__name__)

BLOCK = 4096  # bytes per read, the tier's O_DIRECT block


@dataclass
class ReadProbe:
    """Random reads of ``block`` bytes at ``queue_depth`` for ``seconds``: rate and latency (ms)."""

    queue_depth: int
    block: int
    direct: bool
    reads: int
    seconds: float
    iops: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    stalled: float  # share of the probe's time during which some read took more than STALL_MS

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (f"QD {self.queue_depth:>3}: {self.iops:>9,.0f} reads/s {self.iops * self.block / 2**20:>8.1f} MiB/s   "
                f"latency p50 {self.p50_ms:7.3f} ms  p99 {self.p99_ms:8.2f} ms  p99.9 {self.p999_ms:8.2f} ms  "
                f"max {self.max_ms:8.1f} ms   stalled {self.stalled:6.1%}{'' if self.direct else '   (page cache!)'}")


STALL_MS = 10.0  # a read slower than this counts as a device stall


def table_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Files named, plus every ``*.tbl`` under the folders named (a run, a checkpoint, a tables folder)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("*.tbl"))
            if not found:
                raise ConfigError(f"{p}: no table files (*.tbl) under this folder")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder")
    big = [f for f in out if f.stat().st_size >= 16 * BLOCK]
    if not big:
        raise ConfigError(f"{', '.join(map(str, paths))}: the table files are too small to probe (< 64 KiB)")
    return big


def _open(path: Path) -> tuple[int, bool]:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError:
        return os.open(path, os.O_RDONLY), False


def probe_reads(files: list[Path], queue_depths: tuple[int, ...] = (1, 8, 32), seconds: float = 2.0,
                block: int = BLOCK, seed: int = 0) -> list[ReadProbe]:
    """Random ``block``-byte reads over ``files`` (block-aligned offsets, files picked by size) for
    ``seconds`` at each queue depth; one `ReadProbe` per depth."""
    if seconds <= 0 or block <= 0 or block % 512 or any(q < 1 for q in queue_depths):
        raise ConfigError(f"probe: seconds > 0, block a multiple of 512 and queue depths >= 1 "
                          f"(got {seconds}, {block}, {queue_depths})")
    fds, direct = zip(*(_open(f) for f in files), strict=True)
    try:
        blocks = np.array([os.fstat(fd).st_size // block for fd in fds], dtype=np.int64)
        cum = np.cumsum(blocks)
        out = []
        for k, qd in enumerate(queue_depths):
            out.append(_probe(fds, cum, qd, seconds, block, seed + 1000 * k, all(direct)))
            log.debug("probe %s", out[-1].line())
        return out
    finally:
        for fd in fds:
            os.close(fd)


def _probe(fds, cum: np.ndarray, qd: int, seconds: float, block: int, seed: int, direct: bool) -> ReadProbe:
    lats: list[np.ndarray] = [np.empty(0)] * qd
    ends: list[np.ndarray] = [np.empty(0)] * qd
    errors: list[BaseException] = []
    t0 = time.perf_counter()
    stop = t0 + seconds

    def lane(k: int) -> None:
        rng = np.random.default_rng(seed + k)
        mv = memoryview(aligned_buffer(block))  # type: ignore[arg-type]  # page-aligned; numpy stubs: a Buffer on 3.12+ only
        picks = rng.integers(0, int(cum[-1]), 1 << 16)
        files = np.searchsorted(cum, picks, side="right")
        offs = (picks - np.concatenate([[0], cum[:-1]])[files]) * block
        lat, end = [], []
        try:
            i = 0
            while True:
                t = time.perf_counter()
                if t >= stop:
                    break
                j = i % picks.size
                os.preadv(fds[files[j]], [mv], int(offs[j]))
                e = time.perf_counter()
                lat.append(e - t)
                end.append(e)
                i += 1
        except BaseException as exc:  # noqa: BLE001 -- re-raised on the calling thread
            errors.append(exc)
        finally:
            mv.release()
        lats[k], ends[k] = np.array(lat), np.array(end)

    threads = [threading.Thread(target=lane, args=(k,), daemon=True) for k in range(qd)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    wall = time.perf_counter() - t0
    lat = np.concatenate(lats) * 1e3
    if lat.size == 0:
        raise ConfigError("probe: no read finished")
    # Stalled time: the union of the intervals of reads slower than STALL_MS.
    end = np.concatenate(ends)
    slow = lat > STALL_MS
    stalled = 0.0
    if slow.any():
        iv = sorted(zip(end[slow] - lat[slow] / 1e3, end[slow], strict=True))
        a, b = iv[0]
        for s, e in iv[1:]:
            if s > b:
                stalled += b - a
                a, b = s, e
            else:
                b = max(b, e)
        stalled += b - a
    p50, p99, p999 = np.percentile(lat, [50, 99, 99.9])
    return ReadProbe(qd, block, direct, int(lat.size), wall, lat.size / wall, float(p50), float(p99), float(p999),
                     float(lat.max()), min(1.0, stalled / wall))


def scratch_file(folder: str | os.PathLike, nbytes: int) -> Path:
    """A file of ``nbytes`` of random data in ``folder`` (written, fsynced and dropped from the page
    cache, so reads come from the device); the caller removes it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder")
    nbytes = max(16 * BLOCK, nbytes // BLOCK * BLOCK)
    path = folder / f".tierec-probe-{os.getpid()}.tbl"
    chunk = np.random.default_rng(0).integers(0, 255, 1 << 22, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        left = nbytes
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path

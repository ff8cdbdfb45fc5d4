"""benchmarks/bench_scale.py's disk accounting and guard (the benchmark itself runs outside the suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_scale  # noqa: E402


def sizing(*argv: str) -> bench_scale.Sizing:
    return bench_scale.size_run(bench_scale.parse_args(list(argv)))


def test_disk_bounds_grow_with_the_run_and_stay_above_what_it_surely_writes():
    short, long_ = sizing("--quick", "--steps", "100"), sizing("--quick", "--steps", "2000")
    for s in (short, long_):
        assert bench_scale.disk_sure(s) <= bench_scale.disk_need(s)
        assert bench_scale.disk_sure(s) >= s.table_bytes  # the full copy is always written
    assert bench_scale.disk_need(short) < bench_scale.disk_need(long_)
    # a table's checkpoint rows and touched rows are at most its rows and at most its lookups
    s = sizing("--quick", "--steps", "50")
    assert bench_scale.touched_rows(s.cards, 10) == sum(min(c, 10) for c in s.cards)
    assert bench_scale.checkpoint_bound(s, s.cards) <= (
        bench_scale.CHECKPOINTS * sum(s.cards) * (s.row_bytes + 8))


def test_the_guard_stops_a_child_once_the_disk_use_passes_its_limit(tmp_path: Path):
    guard = bench_scale.DiskGuard(tmp_path, limit=4 << 20)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        guard.watch(child)
        guard.sample()
        guard.check()  # nothing written yet: no trip
        (tmp_path / "big").write_bytes(b"\0" * (64 << 20))
        subprocess.run(["sync"], check=False)
        guard.sample()
        assert guard.tripped and guard.peak >= 32 << 20
        assert child.wait(timeout=10) != 0  # killed
        with pytest.raises(RuntimeError, match="disk use passed"):
            guard.check()
    finally:
        child.kill()
        child.wait()

"""`tierec probe`: random reads of real files at several queue depths, and its errors."""

from __future__ import annotations

import json

import pytest

from tierec.cli import main
from tierec.errors import ConfigError
from tierec.storage.probe import STALL_MS, probe_reads, scratch_file, table_files
from tierec.storage.ssd import SsdTable


def test_probe_reads_table_files_at_each_queue_depth(tmp_path):
    (tmp_path / "run").mkdir()
    SsdTable(tmp_path / "run" / "a.tbl", 4096, 16, 1, create=True, init_seed=0).close()
    files = table_files([tmp_path / "run"])
    assert [f.name for f in files] == ["a.tbl"]
    res = probe_reads(files, (1, 2), seconds=0.2)
    assert [r.queue_depth for r in res] == [1, 2]
    for r in res:
        assert r.reads > 0 and r.iops == pytest.approx(r.reads / r.seconds)
        assert 0 < r.p50_ms <= r.p99_ms <= r.p999_ms <= r.max_ms
        assert 0.0 <= r.stalled <= 1.0 and (r.stalled > 0) == (r.max_ms > STALL_MS)


def test_probe_command_with_a_scratch_file(tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main(["probe", "--scratch", str(tmp_path), "--size", "1MiB", "--seconds", "0.1", "--queue-depths", "1,4",
                 "--json", str(out)]) == 0
    assert "QD   4:" in capsys.readouterr().out
    assert [r["queue_depth"] for r in json.loads(out.read_text())] == [1, 4]
    assert not list(tmp_path.glob(".tierec-probe-*"))  # the scratch file is removed


def test_probe_errors_name_what_is_wrong(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no table files"):
        table_files([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="no such file"):
        table_files([tmp_path / "nope.tbl"])
    p = scratch_file(tmp_path, 1 << 20)
    with pytest.raises(ConfigError, match="queue depths"):
        probe_reads([p], (0,), seconds=0.1)
    assert main(["probe"]) == 2
    assert main(["probe", str(p), "--queue-depths", "1,x"]) == 2
    assert "--queue-depths" in capsys.readouterr().err

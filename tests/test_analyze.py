"""Cache simulators (tierec.sim.policies), trace readers (tierec.sim.traces) and `tierec analyze`."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from tierec import cli
from tierec.config import parse_bytes
from tierec.sim.analyze import allocate, parse_sizes
from tierec.sim import policies, traces
from tierec.errors import DataError, TierecError

ARC = Path("/work/shared/data/arc")


# --------------------------------------------------------------------------- brute-force references
def ref_lru(tr, c):
    cache, hits = OrderedDict(), 0
    for x in tr:
        if x in cache:
            hits += 1
            cache.move_to_end(x)
        elif c > 0:
            if len(cache) >= c:
                cache.popitem(last=False)
            cache[x] = None
    return hits


def ref_lfu(tr, c):
    """In-cache LFU: evict min (count since admission, last request time)."""
    freq, last, hits = {}, {}, 0
    for t, x in enumerate(tr):
        if x in freq:
            hits += 1
            freq[x] += 1
        elif c > 0:
            if len(freq) >= c:
                victim = min(freq, key=lambda y: (freq[y], last[y]))
                del freq[victim]
            freq[x] = 1
        else:
            continue
        last[x] = t
    return hits


def ref_min(tr, c, bypass=True):
    """Belady: on a miss evict the farthest next use (the requested key too if bypass)."""
    n, cache, hits = len(tr), set(), 0

    def nxt(t, y):
        return next((j for j in range(t + 1, n) if tr[j] == y), n)

    for t, x in enumerate(tr):
        if x in cache:
            hits += 1
        elif c > 0:
            if len(cache) < c:
                cache.add(x)
                continue
            cand = list(cache) + ([x] if bypass else [])
            victim = max(cand, key=lambda y: (nxt(t, y), y == x))
            if victim != x:
                cache.remove(victim)
                cache.add(x)
    return hits


def random_traces(seed=0, count=120):
    rng = np.random.default_rng(seed)
    for i in range(count):
        n, k = int(rng.integers(0, 50)), int(rng.integers(1, 12))
        tr = rng.integers(0, k, n) if i % 2 else rng.zipf(1.4, n) % k
        yield [int(x) * 7 - 20 for x in tr], k  # arbitrary (also negative) keys


# --------------------------------------------------------------------------- simulators
def test_next_prev_use_and_stack_distances_match_brute_force():
    for tr, _ in random_traces(1, 60):
        a = np.array(tr, np.int64)
        n = len(tr)
        nx = [next((j for j in range(i + 1, n) if tr[j] == tr[i]), n) for i in range(n)]
        pv = [next((j for j in range(i - 1, -1, -1) if tr[j] == tr[i]), -1) for i in range(n)]
        assert policies.next_use(a).tolist() == nx
        assert policies.prev_use(a).tolist() == pv
        sd = [policies.COLD if pv[i] < 0 else len(set(tr[pv[i] + 1 : i])) for i in range(n)]
        assert policies.stack_distances(a).tolist() == sd


def test_count_earlier_smaller():
    rng = np.random.default_rng(5)
    for n in [0, 1, 2, 3, 7, 64, 100, 257]:
        v = rng.permutation(n * 3)[:n].astype(np.int64) - n
        ref = [sum(v[j] < v[i] for j in range(i)) for i in range(n)]
        assert policies._count_earlier_smaller(v).tolist() == ref


def test_simulators_match_brute_force():
    for tr, k in random_traces(2):
        sizes = list(range(0, k + 2))
        n = max(len(tr), 1)
        assert (policies.lru_hit_rates(tr, sizes) * n).round().astype(int).tolist() == [ref_lru(tr, c) for c in sizes]
        assert policies.lfu_hit_counts(tr, sizes).tolist() == [ref_lfu(tr, c) for c in sizes]
        assert policies.min_hit_counts(tr, sizes).tolist() == [ref_min(tr, c) for c in sizes]
        assert policies.min_hit_counts(tr, sizes, bypass=False).tolist() == [ref_min(tr, c, False) for c in sizes]


def test_single_size_functions_and_edge_cases():
    tr = [1, 2, 1, 3, 1, 2, 4, 1]
    assert policies.lru_hit_rate(tr, 2) == ref_lru(tr, 2) / len(tr)
    assert policies.lfu_hit_rate(tr, 2) == ref_lfu(tr, 2) / len(tr)
    assert policies.min_hit_rate(tr, 2) == ref_min(tr, 2) / len(tr)
    assert policies.min_hit_rate(tr, 2, bypass=False) == ref_min(tr, 2, False) / len(tr)
    assert policies.lru_hit_rates([], [1, 2]).tolist() == [0.0, 0.0]
    assert policies.min_hit_rate([], 3) == 0.0 and policies.lfu_hit_rate([], 3) == 0.0
    # Beyond the footprint every policy hits all but the cold misses.
    for f in (policies.lru_hit_rate, policies.lfu_hit_rate, policies.min_hit_rate):
        assert f(tr, 100) == (len(tr) - 4) / len(tr)
    with pytest.raises(ValueError):
        policies.lru_hit_rates(tr, [-1])
    with pytest.raises(ValueError):
        policies.stack_distances(np.zeros((2, 2), np.int64))


def test_min_dominates_lru_and_lfu_at_every_size():
    rng = np.random.default_rng(3)
    tr = np.concatenate([rng.zipf(1.2, 4000) % 3000, rng.integers(0, 500, 2000), np.arange(300)])
    rng.shuffle(tr)
    sizes = policies.default_sizes(np.unique(tr).size, 12)
    lru = policies.lru_hit_rates(tr, sizes)
    lfu = policies.lfu_hit_rates(tr, sizes)
    opt = policies.min_hit_rates(tr, sizes)
    opt_nb = policies.min_hit_rates(tr, sizes, bypass=False)
    assert np.all(opt >= lru) and np.all(opt >= lfu)
    assert np.all(opt_nb >= lru) and np.all(opt_nb >= lfu) and np.all(opt >= opt_nb)
    assert np.all(np.diff(lru) >= 0) and np.all(np.diff(opt) >= 0)  # inclusion: more cache, more hits
    assert np.any(opt > lru)  # the test can tell them apart


def test_miss_ratio_curves_and_dataclass():
    rng = np.random.default_rng(4)
    tr = rng.zipf(1.3, 3000) % 700
    curves = policies.miss_ratio_curves(tr, [10, 50, 200], name="t")
    assert set(curves) == {"lru", "lfu", "min"}
    u = np.unique(tr).size
    for pol, c in curves.items():
        assert c.requests == tr.size and c.distinct == u and c.sizes.tolist() == [10, 50, 200]
        assert np.allclose(c.hit_ratio + c.miss_ratio, 1)
        assert c.hits_at(10**9) == tr.size - u and c.hits_at(0) == 0
        d = policies.MissRatioCurve.from_dict(json.loads(json.dumps(c.to_dict())))
        assert d.hits.tolist() == c.hits.tolist() and d.policy == pol
    lru = curves["lru"]
    assert lru.hits_at(37) == ref_lru(tr.tolist(), 37)  # exact between grid sizes
    assert curves["min"].hits.tolist() == (policies.min_hit_rates(tr, [10, 50, 200]) * tr.size).round().tolist()


# --------------------------------------------------------------------------- the ARC OLTP trace
@pytest.mark.skipif(not (ARC / "OLTP.lis.zst").exists(), reason="ARC traces not in /work/shared/data/arc")
def test_arc_oltp_lru_reproduces_paper():
    tr = traces.read_arc(ARC / "OLTP.lis.zst")
    assert tr.size == 914145 and np.unique(tr).size == 186880  # ARC paper, Table III
    lru = 100 * policies.lru_hit_rate(tr, 1000)
    assert abs(lru - 32.83) <= 0.005, lru  # ARC paper, Table IV: LRU at c = 1000
    opt = 100 * policies.min_hit_rate(tr, 1000)
    lfu = 100 * policies.lfu_hit_rate(tr, 1000)
    assert lfu < lru < opt
    assert abs(opt - 53.62) < 0.005 and abs(lfu - 13.83) < 0.005  # our own figures (regression)


# --------------------------------------------------------------------------- trace readers
def test_read_plain_text_and_zstd(tmp_path):
    import zstandard

    p = tmp_path / "ids.txt"
    p.write_text("# a comment\n5\n7\n\n5\r\n-3\n  9  \n")
    assert traces.read_plain(p).tolist() == [5, 7, 5, -3, 9]
    assert traces.read_plain(p, max_requests=2).tolist() == [5, 7]
    z = tmp_path / "ids.txt.zst"
    z.write_bytes(zstandard.ZstdCompressor().compress(b"1\n2\n3\n1"))
    assert traces.read_plain(z).tolist() == [1, 2, 3, 1]
    fmt, trs = traces.load_traces(z)
    assert fmt == "plain" and list(trs) == ["ids"] and trs["ids"].tolist() == [1, 2, 3, 1]


def test_read_plain_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("1\n2\nabc\n4\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: not an integer"):
        traces.read_plain(p)
    p.write_text("1\n2 3\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: expected one integer ID"):
        traces.read_plain(p)
    p.write_text("1\n99999999999999999999\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: integer out of the int64 range"):
        traces.read_plain(p)


def test_read_arc_expands_ranges(tmp_path):
    p = tmp_path / "t.lis"
    p.write_text("10 3 0 0\n5 1 0 1\n11 2 0 2\n")
    assert traces.read_arc(p).tolist() == [10, 11, 12, 5, 11, 12]
    assert traces.read_arc(p, max_requests=4).tolist() == [10, 11, 12, 5]
    assert traces.detect_format(p) == "arc"
    with pytest.raises(DataError, match=r"t\.lis:1: expected one integer ID"):
        traces.load_traces(p, "plain")  # the format override is obeyed
    assert traces.expand_ranges([3, 0], [2, 0]).tolist() == [3, 4]
    p.write_text("10 3 0 0\n5 0 0 1\n")
    with pytest.raises(DataError, match=r"t\.lis:2: n_blocks must be >= 1"):
        traces.read_arc(p)
    p.write_text("10 3 0 0\n5 1 0\n")
    with pytest.raises(DataError, match=r"t\.lis:2: expected 4 fields"):
        traces.read_arc(p)


def test_dedup_per_batch():
    rng = np.random.default_rng(6)
    lens = rng.integers(0, 4, 50)
    offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    vals = rng.integers(0, 10, offs[-1]).astype(np.int64)
    ref = []
    for b in range(0, 50, 8):
        seen = []
        for x in vals[offs[b] : offs[min(b + 8, 50)]].tolist():
            if x not in seen:
                seen.append(x)
        ref += seen
    assert traces.dedup_per_batch(vals, offs, 8).tolist() == ref


# --------------------------------------------------------------------------- allocation
def test_allocate_is_optimal_on_concave_curves():
    rng = np.random.default_rng(7)
    for _ in range(20):
        curves = {}
        for t in range(3):
            u = int(rng.integers(1, 12))
            gains = np.sort(rng.integers(0, 20, u))[::-1]  # decreasing marginal gains: concave
            hits = np.cumsum(gains)
            curves[f"t{t}"] = policies.MissRatioCurve("lru", np.arange(1, u + 1), hits, int(hits[-1]) + u, u)
        budget = int(rng.integers(0, 30))
        alloc = allocate(curves, budget)
        assert sum(alloc.values()) <= budget
        assert all(alloc[n] <= c.distinct for n, c in curves.items())
        got = sum(c.hits_at(alloc[n]) for n, c in curves.items())
        us = [c.distinct for c in curves.values()]
        cs = list(curves.values())
        best = max(cs[0].hits_at(a) + cs[1].hits_at(b) + cs[2].hits_at(c)
                   for a in range(us[0] + 1) for b in range(us[1] + 1) for c in range(us[2] + 1)
                   if a + b + c <= budget)
        assert got == best


def test_parse_bytes_and_sizes():
    assert parse_bytes("2GiB") == 2 * 1024**3 and parse_bytes("1.5G") == int(1.5 * 1024**3)
    assert parse_bytes("500MB") == 500 * 10**6 and parse_bytes("4096") == 4096
    assert parse_sizes("1000, 10k,1M,10k").tolist() == [1000, 10000, 10**6]
    for bad in ("", "2 parsecs", "-1G"):
        with pytest.raises(TierecError):
            parse_bytes(bad)
    with pytest.raises(TierecError):
        parse_sizes("10,abc")


# --------------------------------------------------------------------------- the command
@pytest.fixture
def tierec(monkeypatch):
    """Run `tierec ...` through cli.main; only the analyze command is registered, so
    this test does not depend on the other command groups."""
    assert "tierec.cli.analyze" in cli.COMMAND_MODULES
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["tierec.cli.analyze"])
    return cli.main


def test_cli_plain_trace(tmp_path, tierec, capsys):
    rng = np.random.default_rng(8)
    tr = rng.zipf(1.3, 5000) % 800
    p = tmp_path / "ids.txt"
    p.write_text("\n".join(map(str, tr)) + "\n")
    out = tmp_path / "out"
    rc = tierec(["analyze", str(p), "--sizes", "10,100,1k", "--memory-budget", "1KiB", "--row-bytes", "16",
                 "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "LRU hit %" in text and "LFU hit %" in text and "MIN hit %" in text
    assert f"{tr.size:,} requests" in text
    lru100 = 100 * ref_lru(tr.tolist(), 100) / tr.size
    assert f"{lru100:.2f}" in text
    doc = json.loads((out / "curves.json").read_text())
    t = doc["tables"]["ids"]
    assert t["curves"]["lru"]["sizes"] == [10, 100, 1000]
    assert t["curves"]["lru"]["hits"][1] == ref_lru(tr.tolist(), 100)
    assert (out / t["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = doc["recommendation"]
    assert rec["budget_rows"] == 64 and rec["tables"]["ids"]["rows"] == 64
    assert rec["tables"]["ids"]["bytes"] <= 1024


def _tiny_dataset(root):
    from tierec.data.dataset import Chunk, DatasetWriter, Schema, SparseFeature

    rng = np.random.default_rng(9)
    schema = Schema(dense=["d0"], sparse=[SparseFeature("user", 50), SparseFeature("item", 400)])
    w = DatasetWriter(root, schema, splits=("train",), row_group_size=256)
    n = 2000
    offs = np.concatenate([[0], np.cumsum(rng.integers(0, 4, n))]).astype(np.int64)
    sp = {"user": (rng.integers(0, 50, n).astype(np.int64), np.arange(n + 1, dtype=np.int64)),
          "item": ((rng.zipf(1.3, offs[-1]) % 400).astype(np.int64), offs)}
    w.splits["train"].write(Chunk(np.zeros(n, np.float32), rng.random((n, 1), dtype=np.float32), sp))
    w.close()
    return sp


def test_cli_dataset_budget_split(tmp_path, tierec, capsys):
    sp = _tiny_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    rc = tierec(["analyze", str(tmp_path / "ds"), "--dedup-per-batch", "64", "--memory-budget", "4KiB",
                 "--dim", "4", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "user:" in text and "item:" in text and "memory budget 4.00 KiB" in text
    doc = json.loads((out / "curves.json").read_text())
    assert set(doc["tables"]) == {"user", "item"}
    for name in ("user", "item"):
        assert (out / doc["tables"][name]["png"]).exists()
    # The item trace is its IDs in batch order, deduplicated per batch of 64 rows.
    v, o = sp["item"]
    ref = traces.dedup_per_batch(v, o, 64)
    assert doc["tables"]["item"]["requests"] == ref.size
    rec = doc["recommendation"]
    assert rec["budget_rows"] == 4096 // 16
    assert sum(t["bytes"] for t in rec["tables"].values()) <= 4096
    assert rec["tables"]["user"]["rows"] <= 50
    assert rec["hit_ratio"] >= rec["proportional_hit_ratio"]


def test_cli_bad_input(tmp_path, tierec, capsys):
    assert tierec(["analyze", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file or directory" in capsys.readouterr().err
    p = tmp_path / "bad.txt"
    p.write_text("1\n2\nx7\n")
    assert tierec(["analyze", str(p), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{p}:3: not an integer" in err and "Traceback" not in err
    p.write_text("1\n2\n")
    assert tierec(["analyze", str(p), "--memory-budget", "1GiB", "--no-progress"]) == 2
    assert "--row-bytes or --dim" in capsys.readouterr().err
    assert tierec(["analyze", str(p), "--policies", "lru,fifo", "--no-progress"]) == 2
    assert "fifo" in capsys.readouterr().err
    assert tierec(["analyze", str(p), "--dedup-per-batch", "8", "--no-progress"]) == 2
    assert "only apply to tierec data sets" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert tierec(["analyze", str(tmp_path / "empty.txt"), "--no-progress"]) == 2
    assert "no requests" in capsys.readouterr().err

"""Streaming readers: Criteo TSV/CSV, libSVM/libFM, MovieLens; bad-row handling."""

from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tierec.data.dataset import Chunk
from tierec.data.hashing import hash_ints, hash_strings
from tierec.data.readers import (
    CRITEO_DENSE,
    CRITEO_KAGGLE_CARDINALITIES,
    CRITEO_SPARSE,
    DEFAULT_NUM_EMBEDDINGS,
    SESSION_MODULUS,
    load_field_map,
    open_reader,
    read_chunks,
    resolve_table_sizes,
)
from tierec.errors import DataError, TierecError

REPO = Path(__file__).resolve().parents[1]


def _find_sample() -> Path:
    for p in (REPO.parent / "shared" / "data" / "criteo_sample.csv", REPO / "shared" / "data" / "criteo_sample.csv"):
        if p.exists():
            return p
    pytest.fail("criteo_sample.csv not found under ../shared/data or shared/data")


@pytest.fixture(scope="module")
def sample_csv() -> Path:
    return _find_sample()


@pytest.fixture(scope="module")
def sample_rows(sample_csv) -> list[list[str]]:
    with open(sample_csv, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["label", "I1", "I2"]
    return rows[1:]


def _read_all(path, fmt, **kw):
    r = open_reader(path, fmt, progress=False, **kw)
    blocks = list(r)
    chunk = Chunk.concat([b.chunk for b in blocks])
    lines = np.concatenate([b.lines for b in blocks])
    return r, chunk, lines, blocks


def _ids(chunk: Chunk, name: str, row: int) -> list[int]:
    v, o = chunk.sparse[name]
    return v[o[row] : o[row + 1]].tolist()


def _expected_dense(s: str) -> float:
    return 0.0 if s == "" else math.log1p(max(float(s), 0.0))


def _write_tsv(path: Path, rows: list[list[str]], trailer: str = "") -> Path:
    path.write_text("".join("\t".join(r) + "\n" for r in rows) + trailer)
    return path


# --------------------------------------------------------------------------- Criteo
def test_criteo_csv_sample_all_rows(sample_csv, sample_rows):
    r, chunk, lines, _ = _read_all(sample_csv, "criteo-csv")
    assert len(sample_rows) == 200
    assert len(chunk) == 200 and r.stats.rows_read == 200 and r.stats.bad_rows == 0
    assert lines.tolist() == list(range(2, 202))  # the header is line 1
    # Known values of the first data row.
    assert chunk.label[0] == 0
    assert chunk.dense[0, CRITEO_DENSE.index("I2")] == pytest.approx(math.log1p(3))
    assert chunk.dense[0, CRITEO_DENSE.index("I3")] == pytest.approx(math.log1p(260))
    assert chunk.dense[0, CRITEO_DENSE.index("I1")] == 0  # missing
    assert chunk.dense[1, CRITEO_DENSE.index("I2")] == 0  # -1 -> log(1 + max(-1, 0)) = 0
    c1 = hash_strings(pa.array(["05db9164"]), r.schema.sparse[0].num_embeddings)[0]
    assert _ids(chunk, "C1", 0) == [c1]
    assert _ids(chunk, "C19", 0) == []  # empty field -> no ID
    # Every row against a plain-Python reading of the file.
    sizes = [f.num_embeddings for f in r.schema.sparse]
    assert sizes == [min(c, DEFAULT_NUM_EMBEDDINGS) for c in CRITEO_KAGGLE_CARDINALITIES]
    exp_label = np.array([float(row[0]) for row in sample_rows], np.float32)
    exp_dense = np.array([[_expected_dense(x) for x in row[1:14]] for row in sample_rows], np.float32)
    np.testing.assert_array_equal(chunk.label, exp_label)
    np.testing.assert_allclose(chunk.dense, exp_dense, rtol=1e-6)
    assert chunk.label.sum() > 0
    for j, name in enumerate(CRITEO_SPARSE):
        col = [row[14 + j] for row in sample_rows]
        h = hash_strings(pa.array([c or "x" for c in col]), sizes[j])
        for i, c in enumerate(col):
            assert _ids(chunk, name, i) == ([] if c == "" else [h[i]]), (name, i)


def test_criteo_tsv_equals_csv_and_streams_in_blocks(tmp_path, sample_csv, sample_rows):
    tsv = _write_tsv(tmp_path / "day_0", sample_rows, trailer="\n\n")  # blank trailing lines are ignored
    _, ref, _, _ = _read_all(sample_csv, "criteo-csv")
    r, chunk, lines, blocks = _read_all(tsv, "criteo-tsv", block_size=4096)
    assert len(blocks) > 3  # really streamed in several blocks
    assert lines.tolist() == list(range(1, 201))
    np.testing.assert_array_equal(chunk.label, ref.label)
    np.testing.assert_array_equal(chunk.dense, ref.dense)
    for k in CRITEO_SPARSE:
        np.testing.assert_array_equal(chunk.sparse[k][0], ref.sparse[k][0])
        np.testing.assert_array_equal(chunk.sparse[k][1], ref.sparse[k][1])
    # Compressed input gives the same rows.
    gz = tmp_path / "day_0.gz"
    gz.write_bytes(gzip.compress(tsv.read_bytes()))
    _, zchunk, _, _ = _read_all(gz, "criteo-tsv", block_size=4096)
    np.testing.assert_array_equal(zchunk.dense, ref.dense)
    # read_chunks / max_rows.
    got = sum(len(c) for c in read_chunks(tsv, "criteo-tsv", progress=False, block_size=4096, max_rows=77))
    assert got == 77


def _bad(rows, i, what):
    rows = [list(r) for r in rows]
    if what == "fields":
        rows[i] = rows[i][:-1]
    elif what == "label":
        rows[i][0] = "2"
    elif what == "dense":
        rows[i][3] = "abc"
    return rows


@pytest.mark.parametrize("what,reason", [("fields", "expected 40 fields, got 39"),
                                         ("label", "label must be 0 or 1"),
                                         ("dense", "I3 is not a number: 'abc'")])
@pytest.mark.parametrize("fmt", ["criteo-tsv", "criteo-csv"])
def test_criteo_bad_row_names_file_and_line(tmp_path, sample_rows, fmt, what, reason):
    rows = _bad(sample_rows[:150], 120, what)  # data row 121 (0-based 120)
    if fmt == "criteo-tsv":
        path = _write_tsv(tmp_path / "bad.tsv", rows)
        line = 121
    else:
        path = tmp_path / "bad.csv"
        with open(path, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(
                [["label", *CRITEO_DENSE, *CRITEO_SPARSE], *rows])
        line = 122  # the header is line 1
    for block_size in (1 << 20, 2048):  # the bad row in the first block, or in a later one
        with pytest.raises(DataError) as e:
            _read_all(path, fmt, block_size=block_size)
        assert e.value.line == line and e.value.path == str(path)
        assert str(e.value).startswith(f"{path}:{line}: {reason}")
    r, chunk, lines, _ = _read_all(path, fmt, skip_bad_rows=True, block_size=2048)
    assert r.stats.bad_rows == 1 and len(chunk) == 149 and line not in lines
    assert r.stats.bad_row_examples[0].startswith(f"{path}:{line}: {reason}")


def test_criteo_first_bad_row_wins_and_blank_lines_keep_line_numbers(tmp_path, sample_rows):
    rows = [list(r) for r in sample_rows[:40]]
    rows[30][0] = "x"  # line 32 below (one blank line before it)
    rows[10] = rows[10][:5]  # line 11
    text = "".join("\t".join(r) + "\n" for r in rows[:5]) + "\n" + "".join("\t".join(r) + "\n" for r in rows[5:])
    path = tmp_path / "t.tsv"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        _read_all(path, "criteo-tsv")
    assert e.value.line == 12  # 10 rows + 1 blank line before it
    r, chunk, lines, _ = _read_all(path, "criteo-tsv", skip_bad_rows=True)
    assert r.stats.bad_rows == 2 and len(chunk) == 38
    assert 6 not in lines and 12 not in lines and 32 not in lines
    assert lines[:6].tolist() == [1, 2, 3, 4, 5, 7]
    assert r.stats.bad_row_examples[0].startswith(f"{path}:12: expected 40 fields, got 5")
    assert r.stats.bad_row_examples[1].startswith(f"{path}:32: label must be 0 or 1, got 'x'")


def test_missing_empty_and_bad_options(tmp_path, sample_rows):
    with pytest.raises(TierecError, match="no such file"):
        open_reader(tmp_path / "nope.tsv", "criteo-tsv")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(TierecError, match="empty input"):
        _read_all(empty, "criteo-tsv")
    blank = tmp_path / "blank.tsv"
    blank.write_text("\n\n\n")
    with pytest.raises(TierecError, match="empty input"):
        _read_all(blank, "criteo-tsv")
    header_only = tmp_path / "h.csv"
    header_only.write_text(",".join(["label", *CRITEO_DENSE, *CRITEO_SPARSE]) + "\n")
    with pytest.raises(TierecError, match="empty input"):
        _read_all(header_only, "criteo-csv")
    ok = _write_tsv(tmp_path / "ok.tsv", sample_rows[:3])
    with pytest.raises(TierecError, match="unknown format"):
        open_reader(ok, "parquet")
    with pytest.raises(TierecError, match="must be > 0"):
        open_reader(ok, "criteo-tsv", num_embeddings=0)
    with pytest.raises(TierecError, match="must be > 0"):
        open_reader(ok, "criteo-tsv", table_sizes=[10] * 25 + [-1])
    with pytest.raises(TierecError, match="26 sparse features"):
        open_reader(ok, "criteo-tsv", table_sizes="10,20")
    # all rows bad and skipped -> still "no data rows"
    with pytest.raises(TierecError, match="empty input"):
        _read_all(_write_tsv(tmp_path / "allbad.tsv", [r[:3] for r in sample_rows[:3]]), "criteo-tsv",
                  skip_bad_rows=True)


def test_table_sizes():
    names = ["a", "b", "c"]
    assert resolve_table_sizes(names) == [DEFAULT_NUM_EMBEDDINGS] * 3
    assert resolve_table_sizes(names, num_embeddings=7) == [7, 7, 7]
    assert resolve_table_sizes(names, num_embeddings=50, defaults=[10, 100, 1000]) == [10, 50, 50]
    assert resolve_table_sizes(names, "1,2,3") == [1, 2, 3]
    assert resolve_table_sizes(names, "b=5", num_embeddings=9) == [9, 5, 9]
    assert resolve_table_sizes(names, {"c": 4}) == [DEFAULT_NUM_EMBEDDINGS, DEFAULT_NUM_EMBEDDINGS, 4]
    with pytest.raises(TierecError, match="unknown sparse feature"):
        resolve_table_sizes(names, "z=5")


# --------------------------------------------------------------------------- libSVM / libFM
LIBSVM = """1 3:1 7:0.5 100:2
0 7:1

-1 3:1 5:0 9:4.5
+1 1:1
"""


def test_libsvm_default_one_multihot_feature(tmp_path):
    path = tmp_path / "a.svm"
    path.write_text(LIBSVM)
    r, chunk, lines, _ = _read_all(path, "libsvm", num_embeddings=1000)
    assert r.schema.sparse_names == ["features"] and r.schema.dense == []
    assert lines.tolist() == [1, 2, 4, 5]  # blank line 3 skipped
    assert chunk.label.tolist() == [1, 0, 0, 1]  # -1 -> 0, +1 -> 1
    h = lambda *xs: hash_ints(np.array(xs, np.int64), 1000).tolist()  # noqa: E731
    assert _ids(chunk, "features", 0) == h(3, 7, 100)
    assert _ids(chunk, "features", 1) == h(7)
    assert _ids(chunk, "features", 2) == h(3, 9)  # 5:0 dropped (value 0)
    assert _ids(chunk, "features", 3) == h(1)


def test_libsvm_field_map(tmp_path):
    path = tmp_path / "a.svm"
    path.write_text(LIBSVM)
    fm = tmp_path / "fm.yaml"
    fm.write_text("sparse:\n  low: '0-5'\n  high: {keys: [8, '10-200'], num_embeddings: 50, side: item}\n"
                  "dense:\n  nine: 9\n  seven: [7]\nunmapped: drop\n")
    r, chunk, _, _ = _read_all(path, "libsvm", field_map=fm, num_embeddings=100)
    assert r.schema.sparse_names == ["low", "high"] and r.schema.dense == ["nine", "seven"]
    assert [f.num_embeddings for f in r.schema.sparse] == [100, 50]
    h = lambda n, *xs: hash_ints(np.array(xs, np.int64), n).tolist()  # noqa: E731
    assert _ids(chunk, "low", 0) == h(100, 3) and _ids(chunk, "high", 0) == h(50, 100)
    assert _ids(chunk, "low", 2) == h(100, 3)
    assert _ids(chunk, "high", 1) == []
    np.testing.assert_allclose(chunk.dense[:, 0], np.log1p([0, 0, 4.5, 0]), rtol=1e-6)
    np.testing.assert_allclose(chunk.dense[:, 1], np.log1p([0.5, 1, 0, 0]), rtol=1e-6)
    # unmapped: error (the default) names the line
    fm2 = tmp_path / "fm2.json"
    fm2.write_text('{"sparse": {"low": "0-5"}}')
    with pytest.raises(DataError) as e:
        _read_all(path, "libsvm", field_map=fm2)
    assert e.value.line == 1 and "index 7 is not in the field map" in str(e.value)
    with pytest.raises(TierecError, match="mapped twice"):
        load_field_map({"sparse": {"a": "1-5", "b": 3}})


def test_libsvm_bad_rows(tmp_path):
    path = tmp_path / "bad.svm"
    path.write_text("1 1:1\n0 2:1\n0 2:x\n1 2\n3 1:1\n1 a:1\n1 1:1\n")
    with pytest.raises(DataError) as e:
        _read_all(path, "libsvm")
    assert e.value.line == 3 and "value is not a number: 'x'" in str(e.value)
    r, chunk, lines, _ = _read_all(path, "libsvm", skip_bad_rows=True)
    assert lines.tolist() == [1, 2, 7] and r.stats.bad_rows == 4
    ex = r.stats.bad_row_examples
    assert [e.split(":")[1] for e in ex] == ["3", "4", "5", "6"]
    assert "expected idx:val, got '2'" in ex[1] and "label must be 0 or 1" in ex[2] and "index is not" in ex[3]


def test_libsvm_streams_many_blocks(tmp_path):
    rng = np.random.default_rng(0)
    n = 3000
    lines = []
    for i in range(n):
        idx = np.sort(rng.choice(1000, size=rng.integers(1, 6), replace=False))
        lines.append(f"{i % 2} " + " ".join(f"{j}:1" for j in idx))
    path = tmp_path / "big.svm"
    path.write_text("\n".join(lines))  # no final newline
    _, chunk, ln, blocks = _read_all(path, "libsvm", block_size=1000, num_embeddings=1 << 20)
    assert len(blocks) > 10 and len(chunk) == n and ln.tolist() == list(range(1, n + 1))
    assert chunk.label.tolist() == [i % 2 for i in range(n)]
    for i in (0, 1234, n - 1):
        want = [int(t.split(":")[0]) for t in lines[i].split()[1:]]
        assert _ids(chunk, "features", i) == hash_ints(np.array(want), 1 << 20).tolist()


LIBFM = "1 0:10:1 1:20:1 2:0:3.5\n0 0:11:1 2:0:0\n1 1:21:1\n"


def test_libfm_default_fields_and_field_map(tmp_path):
    path = tmp_path / "a.fm"
    path.write_text(LIBFM)
    r, chunk, _, _ = _read_all(path, "libfm", num_embeddings=1000)
    assert r.schema.sparse_names == ["f0", "f1", "f2"]
    h = lambda *xs: hash_ints(np.array(xs, np.int64), 1000).tolist()  # noqa: E731
    assert _ids(chunk, "f0", 0) == h(10) and _ids(chunk, "f1", 0) == h(20) and _ids(chunk, "f2", 0) == h(0)
    assert _ids(chunk, "f0", 2) == [] and _ids(chunk, "f2", 1) == []
    r, chunk, _, _ = _read_all(path, "libfm", field_map={"sparse": {"user": 0, "item": {"fields": [1],
                               "num_embeddings": 30, "side": "item"}}, "dense": {"price": 2}}, num_embeddings=1000)
    assert r.schema.sparse_names == ["user", "item"] and r.schema.dense == ["price"]
    assert _ids(chunk, "item", 2) == hash_ints(np.array([21]), 30).tolist()
    np.testing.assert_allclose(chunk.dense[:, 0], np.log1p([3.5, 0, 0]), rtol=1e-6)
    bad = tmp_path / "b.fm"
    bad.write_text(LIBFM + "1 0:1\n")
    with pytest.raises(DataError) as e:
        _read_all(bad, "libfm")
    assert e.value.line == 4 and "expected field:idx:val, got '0:1'" in str(e.value)
    late = tmp_path / "c.fm"
    late.write_text(LIBFM + "1 7:1:1\n")
    with pytest.raises(DataError) as e:
        _read_all(late, "libfm", block_size=40)  # field 7 first appears after the first block
    assert e.value.line == 4 and "field 7" in str(e.value)


# --------------------------------------------------------------------------- MovieLens
def test_movielens_u_data(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("196\t242\t3\t881250949\n186\t302\t4\t891717742\n22\t377\t5\t878887116\n")
    r, chunk, lines, _ = _read_all(path, "movielens", num_embeddings=5000)
    assert lines.tolist() == [1, 2, 3]
    assert chunk.label.tolist() == [0, 1, 1]
    s = r.schema
    assert s.session_key == "user_id" and [(f.name, f.side) for f in s.sparse] == [("user_id", "user"),
                                                                                   ("item_id", "item")]
    assert _ids(chunk, "user_id", 0) == hash_strings(pa.array(["196"]), 5000).tolist()
    assert _ids(chunk, "item_id", 2) == hash_strings(pa.array(["377"]), 5000).tolist()
    assert chunk.session.tolist() == hash_strings(pa.array(["196", "186", "22"]), SESSION_MODULUS).tolist()
    hour = (881250949 // 3600) % 24
    assert chunk.dense[0, 0] == pytest.approx(math.log1p(hour))
    r, chunk, _, _ = _read_all(path, "movielens", rating_threshold=3)
    assert chunk.label.tolist() == [1, 1, 1]


def test_movielens_inter_header_and_bad_rows(tmp_path):
    path = tmp_path / "x.inter"
    path.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                    "1\t10\t4.5\t100\n2\t20\tgood\t200\n3\t30\t1\n")
    with pytest.raises(DataError) as e:
        _read_all(path, "movielens")
    assert e.value.line == 3 and "rating is not a number: 'good'" in str(e.value)
    r, chunk, lines, _ = _read_all(path, "movielens", skip_bad_rows=True)
    assert lines.tolist() == [2] and chunk.label.tolist() == [1] and r.stats.bad_rows == 2
    assert "x.inter:4: expected 4 fields, got 3" in r.stats.bad_row_examples[1]
    other = tmp_path / "y.inter"
    other.write_text("item_id:token\tuser_id:token\trating:float\n5\t7\t2\n")  # other order, no timestamp
    r, chunk, _, _ = _read_all(other, "movielens", num_embeddings=100)
    assert r.schema.dense == [] and chunk.dense.shape == (1, 0)
    assert _ids(chunk, "user_id", 0) == hash_strings(pa.array(["7"]), 100).tolist()
    nohdr = tmp_path / "z.inter"
    nohdr.write_text("user:token\titem:token\n1\t2\n")
    with pytest.raises(DataError, match="header lacks user_id"):
        open_reader(nohdr, "movielens")


def test_libfm_matches_reference_parser(tmp_path):
    """Random libFM text with messy whitespace, CRLF and blank lines, against a plain-Python parse."""
    rng = np.random.default_rng(1)
    lines, want = [], []
    for i in range(2000):
        toks = [(int(f), int(rng.integers(0, 10**6)), float(rng.choice([0, 1, 2.5])))
                for f in rng.choice(5, size=rng.integers(0, 5), replace=False)]
        sep = lambda: rng.choice([" ", "  ", "\t", " \t "])  # noqa: E731
        lab = int(rng.integers(0, 2))
        lines.append(f"{lab}" + "".join(f"{sep()}{f}:{j}:{v:g}" for f, j, v in toks) + rng.choice(["", " ", "\r"]))
        want.append((lab, toks))
        if i % 97 == 0:
            lines.append(rng.choice(["", "   ", "\t"]))
    path = tmp_path / "r.fm"
    path.write_text("\n".join(lines) + "\n")
    fm = {"sparse": {f"s{k}": k for k in range(4)}, "dense": {"d4": 4}}
    r, chunk, _, blocks = _read_all(path, "libfm", field_map=fm, num_embeddings=997, block_size=3000)
    assert len(blocks) > 5 and len(chunk) == len(want)
    for i, (lab, toks) in enumerate(want):
        assert chunk.label[i] == lab
        for k in range(4):
            ids = [j for f, j, v in toks if f == k and v != 0]
            assert _ids(chunk, f"s{k}", i) == hash_ints(np.array(ids, np.int64), 997).tolist()
        d = sum(v for f, j, v in toks if f == 4)
        assert chunk.dense[i, 0] == pytest.approx(math.log1p(d), rel=1e-6)


def test_max_rows_stops_before_a_later_bad_row(tmp_path, sample_rows):
    rows = [list(r) for r in sample_rows[:30]]
    rows[20][0] = "bad"
    path = _write_tsv(tmp_path / "t.tsv", rows)
    r, chunk, lines, _ = _read_all(path, "criteo-tsv", max_rows=20)
    assert len(chunk) == 20 and lines[-1] == 20 and r.stats.bad_rows == 0
    with pytest.raises(DataError) as e:
        _read_all(path, "criteo-tsv", max_rows=21)
    assert e.value.line == 21
    svm = tmp_path / "t.svm"
    svm.write_text("1 1:1\n0 2:1\n1 x\n")
    r, chunk, _, _ = _read_all(svm, "libsvm", max_rows=2)
    assert len(chunk) == 2


# --------------------------------------------------------------------------- headers, blank lines, compression
def test_criteo_csv_without_header_keeps_first_row(tmp_path, sample_rows, caplog):
    path = tmp_path / "nohdr.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(sample_rows[:50])
    with caplog.at_level("WARNING", logger="tierec.data.readers"):
        r, chunk, lines, _ = _read_all(path, "criteo-csv")
    assert len(chunk) == 50 and lines.tolist() == list(range(1, 51))
    assert "no header" in caplog.text
    _, ref, _, _ = _read_all(_write_tsv(tmp_path / "ref.tsv", sample_rows[:50]), "criteo-tsv")
    np.testing.assert_array_equal(chunk.dense, ref.dense)
    np.testing.assert_array_equal(chunk.sparse["C3"][0], ref.sparse["C3"][0])


WS_LINES = ["   ", "\t", " \t \r", "\r", ""]


@pytest.mark.parametrize("fmt", ["criteo-tsv", "criteo-csv", "movielens", "movielens-inter", "libsvm", "libfm"])
def test_whitespace_only_lines_are_ignored_everywhere(tmp_path, sample_rows, fmt):
    """Blank and whitespace-only lines anywhere (also before a header) are skipped; line numbers stay right."""
    if fmt.startswith("criteo"):
        sep = "," if fmt == "criteo-csv" else "\t"
        data = [sep.join(r) for r in sample_rows[:12]]
        bad = sep.join(["0"] * 5)
        header = [sep.join(["label", *CRITEO_DENSE, *CRITEO_SPARSE])] if fmt == "criteo-csv" else []
        reason = "expected 40 fields, got 5"
    elif fmt.startswith("movielens"):
        data = [f"{u}\t{i}\t{r}\t{874724710 + u}" for u, i, r in zip(range(1, 13), range(20, 32), [1, 5] * 6)]
        bad = "9\t9\tgood\t1"
        header = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"] if fmt == "movielens-inter" else []
        reason = "rating is not a number"
    else:
        tok = "{}:1" if fmt == "libsvm" else "0:{}:1"
        data = [f"{i % 2} " + tok.format(i) for i in range(12)]
        bad = "1 x" if fmt == "libsvm" else "1 0:x:1"
        header = []
        reason = "expected" if fmt == "libsvm" else "idx is not"
    body = WS_LINES[:2] + header + data[:4] + WS_LINES + data[4:8] + [WS_LINES[2]] + data[8:] + WS_LINES[:3]
    text = "\n".join(body) + "\n"
    path = tmp_path / ("x.inter" if fmt == "movielens-inter" else "x.txt")
    path.write_text(text)
    rfmt = "movielens" if fmt.startswith("movielens") else fmt
    r, chunk, lines, _ = _read_all(path, rfmt, block_size=1024)
    assert len(chunk) == 12 and r.stats.bad_rows == 0
    want = [i + 1 for i, line in enumerate(body) if line in data]
    assert lines.tolist() == want
    path.write_text(text + WS_LINES[0] + "\n" + bad + "\n")  # a bad row after blank lines: its line number
    for bs in (1024, 1 << 20):
        with pytest.raises(DataError) as e:
            _read_all(path, rfmt, block_size=bs)
        assert e.value.line == len(body) + 2 and reason in str(e.value), str(e.value)


def _compressed(kind: str, data: bytes) -> bytes:
    import bz2
    import lzma

    import zstandard

    if kind == "gz":
        return gzip.compress(data)
    if kind == "bz2":
        return bz2.compress(data)
    if kind == "xz":
        return lzma.compress(data)
    c = zstandard.ZstdCompressor()
    half = len(data) // 2
    return c.compress(data[:half]) + c.compress(data[half:])  # two frames, as pzstd / cat a.zst b.zst make


@pytest.mark.parametrize("kind", ["gz", "bz2", "xz", "zst"])
def test_bad_compressed_input_is_one_data_error(tmp_path, sample_rows, kind):
    text = "".join("\t".join(r) + "\n" for r in sample_rows) * 20
    blob = _compressed(kind, text.encode())
    good = tmp_path / f"ok.tsv.{kind}"
    good.write_bytes(blob)
    _, chunk, _, _ = _read_all(good, "criteo-tsv", block_size=1 << 16)
    assert len(chunk) == 4000  # every frame / member read
    cases = {"plain": text.encode()[:50_000], "truncated": blob[: len(blob) * 2 // 5],
             "cut-short": blob[: len(blob) - 3], "garbage": np.random.default_rng(0).bytes(50_000)}
    for what, data in cases.items():
        for fmt in ("criteo-tsv", "criteo-csv", "movielens", "libsvm"):
            path = tmp_path / f"{what}.{kind}"
            path.write_bytes(data)
            with pytest.raises(DataError) as e:
                _read_all(path, fmt, block_size=1 << 16)
            assert e.value.path == str(path) and "\n" not in str(e.value), (what, fmt, str(e.value))


def test_lone_carriage_return_is_a_bad_row_and_keeps_line_numbers(tmp_path, sample_rows):
    rows = ["\t".join(r) for r in sample_rows[:10]]
    rows[3] = rows[3][:20] + "\r" + rows[3][20:]  # pyarrow would end a row there
    path = tmp_path / "cr.tsv"
    path.write_bytes(("\r\n".join(rows[:6]) + "\r\n" + "\n".join(rows[6:]) + "\n").encode())
    with pytest.raises(DataError) as e:
        _read_all(path, "criteo-tsv")
    assert e.value.line == 4 and "carriage return" in str(e.value)
    r, chunk, lines, _ = _read_all(path, "criteo-tsv", skip_bad_rows=True)
    assert lines.tolist() == [1, 2, 3, 5, 6, 7, 8, 9, 10] and r.stats.bad_rows == 1

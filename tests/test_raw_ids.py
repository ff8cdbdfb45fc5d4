"""Raw 64-bit IDs: data sets whose sparse features hold the unreduced hashes (`SparseFeature.raw`), for
collision-free dynamic tables; a fixed table reduces them (`reduce_raw`) to the rows a plain data set holds."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_convert import _sample_rows

from tierec.cli import main
from tierec.data import hashing
from tierec.data.convert import convert
from tierec.data.dataset import Chunk, Dataset, DatasetWriter, Schema, SparseFeature
from tierec.data.hashing import (
    encode_ints,
    encode_request_ids,
    encode_strings,
    hash_ints,
    hash_ints_raw,
    hash_strings,
    hash_strings_raw,
    reduce_raw,
    reduce_raw_torch,
    splitmix64,
    splitmix64_inverse,
)
from tierec.data.readers import ids_to_jagged
from tierec.data.synth import SynthConfig, Synthesizer, generate, write_criteo_tsv
from tierec.errors import ConfigError, DataError
from tierec.inference.features import FeatureEncoder, InputError

SIZES = [1, 2, 3, 7, 1000, 1460, (1 << 31) - 1, 1 << 31, (1 << 31) + 11, 1 << 32, (1 << 40) + 3, 1 << 62,
         (1 << 62) + 1, (1 << 63) - 1, 1 << 63]
MINUS_ONE = int(splitmix64_inverse(np.array([(1 << 64) - 1], np.uint64)).view(np.int64)[0])  # hash_ints_raw -> -1


def _random_int64(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64, endpoint=True)
    x[:6] = [-(1 << 63), -1, 0, 1, (1 << 63) - 1, -(1 << 32)]
    return x


def _all_rows(path, split: str) -> Chunk:
    return Chunk.concat(list(Dataset(path).chunks(split, 1 << 20)))


# --------------------------------------------------------------------------- hashing
def test_reduce_raw_of_raw_int_hashes_is_hash_ints():
    x = _random_int64(20_000)
    for n in SIZES[:-1]:
        for salt in (0, 12345):
            np.testing.assert_array_equal(reduce_raw(hash_ints_raw(x, salt), n), hash_ints(x, n, salt))
    raw = hash_ints_raw(x)
    assert raw.dtype == np.int64 and (raw < 0).any()  # the full 64 bits, read as int64
    ref = [(int(v) % (1 << 64)) % 1000003 for v in raw[:500]]  # the unsigned remainder, in Python ints
    assert reduce_raw(raw[:500], 1000003).tolist() == ref
    assert reduce_raw(raw, 1 << 63).min() >= 0
    with pytest.raises(ValueError):
        reduce_raw(raw, 0)


def test_reduce_raw_of_raw_string_hashes_is_hash_strings():
    words = ["05db9164", "", None, "a", "é" * 20, "68fd1e64", "x" * 300, "05db9164", "0", "-1"]
    rng = np.random.default_rng(1)
    vals = [words[i] for i in rng.integers(0, len(words), 5000)]
    arr = pa.array(vals, pa.string())
    raw, missing = hash_strings_raw(arr)
    np.testing.assert_array_equal(missing, [v is None or v == "" for v in vals])
    for n in SIZES[:-1]:
        plain = hash_strings(arr, n)
        np.testing.assert_array_equal(np.where(missing, -1, reduce_raw(raw, n)), plain)
        np.testing.assert_array_equal(plain[missing], -1)
    chunked = pa.chunked_array([arr[:100], arr[100:]])
    np.testing.assert_array_equal(hash_strings_raw(chunked)[0], raw)
    empty_raw, empty_missing = hash_strings_raw(pa.array([], pa.string()))
    assert empty_raw.shape == (0,) and empty_missing.shape == (0,)


def test_reduce_raw_torch_equals_reduce_raw():
    x = _random_int64(50_000, seed=2)
    t = torch.from_numpy(x)
    for n in SIZES:
        got = reduce_raw_torch(t, n)
        assert got.dtype == torch.int64 and got.shape == t.shape
        np.testing.assert_array_equal(got.numpy(), reduce_raw(x, n), err_msg=f"N={n}")
    np.testing.assert_array_equal(reduce_raw_torch(t.view(100, 500), 977).view(-1).numpy(), reduce_raw(x, 977))
    with pytest.raises(ValueError):
        reduce_raw_torch(t, 0)
    with pytest.raises(ValueError):
        reduce_raw_torch(t.to(torch.int32), 7)


def test_splitmix64_inverse():
    z = np.random.default_rng(3).integers(0, (1 << 64) - 1, 10_000, dtype=np.uint64, endpoint=True)
    np.testing.assert_array_equal(splitmix64_inverse(splitmix64(z)), z)
    np.testing.assert_array_equal(splitmix64(splitmix64_inverse(z)), z)
    assert hash_ints_raw(np.array([MINUS_ONE]))[0] == -1


def test_encodings_raw_mode():
    x = np.array([0, 5, 17, MINUS_ONE, -3, (1 << 63) - 1], np.int64)
    raw, bad = encode_ints(x, "identity", 10, raw=True)
    np.testing.assert_array_equal(raw, x)  # the integer itself, any int64, no range check
    assert not bad.any()
    assert encode_ints(x, "identity", 10)[1].tolist() == [False, False, True, True, True, True]
    for enc in ("hash-int", "hash-string"):
        raw, bad = encode_ints(x, enc, 1000, raw=True)
        assert not bad.any()
        np.testing.assert_array_equal(reduce_raw(raw, 1000), encode_ints(x, enc, 1000)[0])
    assert encode_ints(x, "hash-int", 1000, raw=True)[0][3] == -1  # a raw ID of -1 is a value, not missing
    text = pa.array(["12", "", None, "7", "abc", "99999"])
    for enc in ("hash-string", "hash-int", "identity"):
        rows, bad = encode_strings(text, enc, 50)
        raw, rbad = encode_strings(text, enc, 50, raw=True)
        assert rbad.tolist() == [False, False, False, False, enc != "hash-string", False]
        ok = (rows >= 0) & ~rbad
        np.testing.assert_array_equal(reduce_raw(raw[ok], 50), rows[ok])
    assert encode_strings(text, "identity", 50, raw=True)[0].tolist()[-1] == 99999  # not checked against the table
    got, bad = encode_request_ids(["05db9164", 242, "242", ""], "hash-string", 1000, raw=True)
    assert not bad.any() and got[1] == got[2] == hash_strings_raw(pa.array(["242"]))[0][0]
    np.testing.assert_array_equal(reduce_raw(got[:3], 1000), encode_request_ids(["05db9164", 242, "242"],
                                                                                 "hash-string", 1000)[0])
    with pytest.raises(ValueError, match="recorded encoding"):
        encode_request_ids([1], None, 10, raw=True)


def test_missing_values_come_from_a_mask_not_from_minus_one():
    ids = np.array([MINUS_ONE, 3, -1, 8])
    v, o = ids_to_jagged(hash_ints_raw(ids), np.array([True, True, False, True]))
    assert np.diff(o).tolist() == [1, 1, 0, 1] and v[0] == -1
    v, o = ids_to_jagged(np.array([4, -1, 2]))  # rows: -1 is missing, as before
    assert np.diff(o).tolist() == [1, 0, 1]


# --------------------------------------------------------------------------- schema and manifest
def test_sparse_feature_raw_field_in_schema_and_manifest(tmp_path):
    f = SparseFeature("C1", 100, encoding="hash-string", raw=True)
    assert asdict(f)["raw"] is True and SparseFeature("C2", 5).raw is False
    with pytest.raises(Exception, match="raw must be true or false"):
        SparseFeature("C1", 100, raw="yes")  # type: ignore[arg-type]
    old = {"dense": [], "sparse": [{"name": "C1", "num_embeddings": 100, "side": "item"}]}
    s = Schema.from_json(old)
    assert s.sparse[0].raw is False and s.sparse[0].encoding is None
    raw = Schema([], [SparseFeature("C1", 100, raw=True)])
    plain = Schema([], [SparseFeature("C1", 100)])
    assert raw.differences(plain) == ["C1.raw True vs False"] and Schema.from_json(raw.to_json()) == raw

    # A data set whose manifest lacks the key reads as non-raw; a bad value is a DataError.
    w = DatasetWriter(tmp_path / "d", plain, splits=("train",))
    w.splits["train"].write(Chunk(np.zeros(3, np.float32), np.zeros((3, 0), np.float32),
                                  {"C1": (np.array([1, 2, 3]), np.arange(4))}))
    w.close()
    mpath = tmp_path / "d" / "manifest.json"
    m = json.loads(mpath.read_text())
    assert m["schema"]["sparse"][0]["raw"] is False
    del m["schema"]["sparse"][0]["raw"]
    mpath.write_text(json.dumps(m))
    assert Dataset(tmp_path / "d").schema.sparse[0].raw is False
    m["schema"]["sparse"][0]["raw"] = "true"
    mpath.write_text(json.dumps(m))
    with pytest.raises(DataError, match="raw must be true or false"):
        Dataset(tmp_path / "d")


def test_raw_features_skip_the_range_check_but_plain_ones_keep_it(tmp_path):
    vals = np.array([-5, 1 << 62, 7, -(1 << 63)], np.int64)
    chunk = Chunk(np.zeros(4, np.float32), np.zeros((4, 0), np.float32),
                  {"a": (vals, np.arange(5)), "b": (np.array([0, 1, 2, 3]), np.arange(5))})
    schema = Schema([], [SparseFeature("a", 10, raw=True), SparseFeature("b", 4)])
    w = DatasetWriter(tmp_path / "ok", schema, splits=("train",))
    w.splits["train"].write(chunk)
    w.close()
    got = _all_rows(tmp_path / "ok", "train")
    np.testing.assert_array_equal(got.sparse["a"][0], vals)  # raw values come back unchanged
    b = next(Dataset(tmp_path / "ok").batches("train", 4))
    np.testing.assert_array_equal(b.sparse["a"].values.numpy(), vals)

    bad = Schema([], [SparseFeature("a", 10), SparseFeature("b", 4)])  # the same values, not raw: refused
    w = DatasetWriter(tmp_path / "bad", bad, splits=("train",))
    w.splits["train"].write(chunk)
    w.close()
    with pytest.raises(DataError, match="'a': ID -9223372036854775808 is outside"):
        list(Dataset(tmp_path / "bad").chunks("train", 4))

    ds = Dataset(tmp_path / "ok")
    ds._check_columns(pa.table({"a": pa.array([[1]], pa.list_(pa.int64())), "b": pa.array([[1]], pa.list_(pa.int64()))}))
    with pytest.raises(DataError, match="'a': column type list<item: double>, expected list<int64>"):
        ds._check_columns(pa.table({"a": pa.array([[1.0]]), "b": pa.array([[1]], pa.list_(pa.int64()))}))
    with pytest.raises(DataError, match="'b': no such column"):
        ds._check_columns(pa.table({"a": pa.array([[1]], pa.list_(pa.int64()))}))


# --------------------------------------------------------------------------- convert
@pytest.fixture(scope="module")
def criteo_small(tmp_path_factory):
    """The 200 Criteo sample rows as TSV (row 0's C3 is emptied, so a feature has a missing value)."""
    rows = _sample_rows()
    rows[0][16] = ""
    path = tmp_path_factory.mktemp("raw") / "train.txt"
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return path


def test_convert_raw_ids_reduce_to_the_plain_conversion(tmp_path, criteo_small):
    kw = dict(test_fraction=0.25, seed=1, num_embeddings=5000, progress=False, block_size=4096,
              table_sizes="C2=1000000")
    plain = convert(criteo_small, tmp_path / "plain", "criteo-tsv", **kw)
    raw = convert(criteo_small, tmp_path / "raw", "criteo-tsv", raw_ids=True, **kw)
    assert raw["source"]["options"]["raw_ids"] is True and plain["source"]["options"]["raw_ids"] is False
    ps, rs = Dataset(tmp_path / "plain").schema, Dataset(tmp_path / "raw").schema
    assert all(f.raw for f in rs.sparse) and not any(f.raw for f in ps.sparse)
    assert [f.num_embeddings for f in rs.sparse] == [f.num_embeddings for f in ps.sparse]
    assert [f.encoding for f in rs.sparse] == [f.encoding for f in ps.sparse] == ["hash-string"] * 26
    assert rs.differences(ps) == [f"C{i}.raw True vs False" for i in range(1, 27)]
    negative = missing = 0
    for split in ("train", "test"):
        p, r = _all_rows(tmp_path / "plain", split), _all_rows(tmp_path / "raw", split)
        np.testing.assert_array_equal(r.label, p.label)
        np.testing.assert_array_equal(r.dense, p.dense)
        for f in ps.sparse:
            (pv, po), (rv, ro) = p.sparse[f.name], r.sparse[f.name]
            np.testing.assert_array_equal(ro, po)  # the same lists: missing values stay empty
            np.testing.assert_array_equal(reduce_raw(rv, f.num_embeddings), pv)
            negative += int((rv < 0).sum())
            missing += int((np.diff(ro) == 0).sum())
    assert negative > 0 and missing > 0  # the full 64 bits; empty fields stay empty lists


def test_convert_raw_hash_of_minus_one_is_kept(tmp_path, criteo_small, monkeypatch):
    """A string whose raw hash is -1 stays an ID (a list of one); only empty fields are missing."""
    target = int(hash_strings_raw(pa.array(["05db9164"]))[0][0]) % (1 << 64)
    real = hashing._hash_words

    def fake(words, lens):
        h = real(words, lens)
        return np.where(h == np.uint64(target), np.uint64((1 << 64) - 1), h)

    monkeypatch.setattr(hashing, "_hash_words", fake)
    convert(criteo_small, tmp_path / "raw", "criteo-tsv", test_fraction=0.0, raw_ids=True, progress=False)
    rows = _sample_rows()
    got = _all_rows(tmp_path / "raw", "train")
    v, o = got.sparse["C1"]
    assert (np.diff(o) == 1).all()  # no C1 field is empty in the sample
    want = np.array([r[14] == "05db9164" for r in rows])
    assert want.any()
    np.testing.assert_array_equal(v == -1, want)
    lens = np.diff(got.sparse["C3"][1])
    np.testing.assert_array_equal(lens, [0 if i == 0 or r[16] == "" else 1 for i, r in enumerate(rows)])


def test_convert_raw_libsvm_and_identity(tmp_path):
    path = tmp_path / "a.svm"
    path.write_text("".join(f"{i % 2} {i * 7919 % 1000 + 1}:1 {123456789012 + i}:1\n" for i in range(300)))
    kw = dict(test_fraction=0.0, num_embeddings=97, progress=False)
    convert(path, tmp_path / "plain", "libsvm", **kw)
    convert(path, tmp_path / "raw", "libsvm", raw_ids=True, **kw)
    p, r = _all_rows(tmp_path / "plain", "train"), _all_rows(tmp_path / "raw", "train")
    (pv, po), (rv, ro) = p.sparse["features"], r.sparse["features"]
    np.testing.assert_array_equal(ro, po)
    np.testing.assert_array_equal(reduce_raw(rv, 97), pv)
    assert Dataset(tmp_path / "raw").schema.sparse[0].encoding == "hash-int"

    # identity + raw: the integer itself; an explicitly sized table does not refuse larger IDs
    convert(path, tmp_path / "ident", "libsvm", id_encoding="identity", raw_ids=True, **kw)
    got = _all_rows(tmp_path / "ident", "train")
    want = np.array([[i * 7919 % 1000 + 1, 123456789012 + i] for i in range(300)]).reshape(-1)
    np.testing.assert_array_equal(got.sparse["features"][0], want)
    assert Dataset(tmp_path / "ident").schema.sparse[0].num_embeddings == 97


def test_cli_convert_raw_ids_and_info(tmp_path, criteo_small, capsys):
    out = tmp_path / "ds"
    assert main(["data", "convert", str(criteo_small), "--format", "criteo-tsv", "--out", str(out),
                 "--num-embeddings", "1000", "--raw-ids", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert all(f["raw"] is True for f in info["schema"]["sparse"])
    assert info["source"]["options"]["raw_ids"] is True


def test_movielens_raw_ids_dedup_batches(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    users, items = np.repeat(np.arange(1, 41), 10), rng.integers(1, 300, n)
    path = tmp_path / "u.data"
    path.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in
                            zip(users, items, rng.integers(1, 6, n), rng.integers(874_724_710, 893_286_638, n), strict=True)))
    convert(path, tmp_path / "raw", "movielens", progress=False, num_embeddings=1000, raw_ids=True,
            cluster_by="session", test_fraction=0.0)
    ds = Dataset(tmp_path / "raw")
    assert [f.raw for f in ds.schema.sparse] == [True, True]
    plain = [b.full_sparse() for b in ds.batches("train", 64)]
    dedup = [b for b in ds.batches("train", 64, dedup=True)]
    assert any(b.user is not None and b.user.stride() < b.size for b in dedup)
    for a, b in zip(plain, dedup, strict=True):
        fa, fb = a.to_dict(), b.full_sparse().to_dict()
        for k in fa:
            assert torch.equal(fa[k].values, fb[k].values) and torch.equal(fa[k].lengths, fb[k].lengths)
    u = Chunk.concat(list(ds.chunks("train", 1000))).sparse["user_id"][0]
    assert np.unique(u).size == 40 and np.isin(u, hash_strings_raw(pa.array(users.astype(str)))[0]).all()


# --------------------------------------------------------------------------- synth
SYNTH = dict(rows=6000, seed=5, num_sparse=4, cardinalities=[50, 3000, 200, 7], num_dense=3,
             multi_hot="fixed:1,C2=poisson0:3", session_length=4.0, user_features=1, rows_per_file=4000,
             row_group_size=1000, progress=False)


def test_synth_raw_ids_same_rows_other_ids(tmp_path):
    generate(SynthConfig(**SYNTH), tmp_path / "plain")
    m = generate(SynthConfig(raw_ids=True, **SYNTH), tmp_path / "raw")
    assert m["source"]["config"]["raw_ids"] is True
    schema = Dataset(tmp_path / "raw").schema
    assert [f.raw for f in schema.sparse] == [True] * 4 and [f.num_embeddings for f in schema.sparse] == [50, 3000, 200, 7]
    assert Dataset(tmp_path / "plain").manifest["source"]["config"]["raw_ids"] is False
    syn = Synthesizer(SynthConfig(raw_ids=True, **SYNTH))
    for split in ("train", "test"):
        p, r = _all_rows(tmp_path / "plain", split), _all_rows(tmp_path / "raw", split)
        np.testing.assert_array_equal(r.label, p.label)
        np.testing.assert_array_equal(r.dense, p.dense)
        np.testing.assert_array_equal(r.session, p.session)
        for i, name in enumerate(schema.sparse_names):
            (pv, po), (rv, ro) = p.sparse[name], r.sparse[name]
            np.testing.assert_array_equal(ro, po)
            assert np.unique(rv).size == np.unique(pv).size
            # one bijection per feature: equal plain IDs <-> equal raw IDs
            pairs = np.unique(np.stack([pv, rv]), axis=1)
            assert pairs.shape[1] == np.unique(pv).size
            np.testing.assert_array_equal(rv, syn.raw_ids(i, pv))
            np.testing.assert_array_equal(syn.ids(i, rv), pv)
        np.testing.assert_allclose(syn.ground_truth(r)["prob"], Synthesizer(SynthConfig(**SYNTH)).ground_truth(p)["prob"])
    c1 = syn.raw_ids(0, np.arange(50))
    c3 = syn.raw_ids(2, np.arange(50))
    assert not np.array_equal(c1, c3)  # per-feature keys
    assert (Synthesizer(SynthConfig(**SYNTH)).raw_ids(0, np.arange(50)) == c1).all()


def test_synth_raw_ids_config_and_cli(tmp_path, capsys):
    with pytest.raises(ConfigError, match="raw_ids"):
        SynthConfig(raw_ids="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--raw-ids"):
        write_criteo_tsv(SynthConfig(rows=100, raw_ids=True, progress=False), tmp_path / "x.tsv")
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--rows", "500", "--num-sparse", "3",
                 "--cardinalities", "100", "--raw-ids", "--no-progress"]) == 0
    ds = Dataset(tmp_path / "d")
    assert all(f.raw for f in ds.schema.sparse) and ds.manifest["source"]["config"]["raw_ids"] is True
    assert main(["data", "synth", "--out", str(tmp_path / "t.tsv"), "--format", "criteo-tsv", "--rows", "100",
                 "--raw-ids", "--no-progress"]) == 2
    assert "--raw-ids" in capsys.readouterr().err


# --------------------------------------------------------------------------- serving
def test_serving_encodes_raw_features_raw():
    schema = Schema([], [SparseFeature("s", 1000, encoding="hash-string", raw=True),
                         SparseFeature("h", 50, encoding="hash-int", raw=True),
                         SparseFeature("i", 10, encoding="identity", raw=True),
                         SparseFeature("p", 10, encoding="identity")])
    enc = FeatureEncoder(schema)
    e = enc.encode([{"s": ["05db9164", ""], "h": MINUS_ONE, "i": [-(1 << 63), 12345678901], "p": 3},
                    {"s": 242, "i": "77"}])
    v, lens = e.sparse["s"]
    assert lens.tolist() == [1, 1]
    np.testing.assert_array_equal(v, hash_strings_raw(pa.array(["05db9164", "242"]))[0])
    assert e.sparse["h"][0].tolist() == [-1] and e.sparse["h"][1].tolist() == [1, 0]
    assert e.sparse["i"][0].tolist() == [-(1 << 63), 12345678901, 77]
    with pytest.raises(InputError):
        enc.encode([{"p": 12}])  # a plain identity feature still refuses rows outside its table
    with pytest.raises(InputError):
        enc.encode([{"i": "abc"}])  # raw identity: still an integer
    kjt = e.to_inputs(["s", "h", "i", "p"])[1]
    np.testing.assert_array_equal(reduce_raw_torch(kjt["s"].values, 1000).numpy(),
                                  hash_strings(pa.array(["05db9164", "242"]), 1000))

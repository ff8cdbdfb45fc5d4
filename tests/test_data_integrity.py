"""A data set's shards are verified as they are read: bit flips, corrupt Parquet, IDs out of range, bad manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tierec.data.dataset as dataset_mod
from tierec.data.dataset import Chunk, Dataset, DatasetWriter, Schema, SparseFeature
from tierec.errors import DataError

ROWS = 1000


def _chunk(rng: np.random.Generator, n: int, card: int = 50) -> Chunk:
    sparse = {}
    for k in ("a", "b"):
        lens = rng.integers(0, 3, n)
        sparse[k] = (rng.integers(0, card, int(lens.sum())), np.concatenate([[0], np.cumsum(lens)]))
    return Chunk(rng.integers(0, 2, n).astype(np.float32), rng.normal(size=(n, 2)).astype(np.float32), sparse)


def _write(root: Path, chunk: Chunk | None = None) -> tuple[Path, Chunk]:
    chunk = chunk if chunk is not None else _chunk(np.random.default_rng(0), ROWS)
    schema = Schema(["x", "y"], [SparseFeature("a", 50), SparseFeature("b", 50)])
    w = DatasetWriter(root, schema, splits=("train",), row_group_size=256, rows_per_file=ROWS)
    w.splits["train"].write(chunk)
    w.close()
    return root, chunk


def _read_all(root: Path) -> Chunk:
    return Chunk.concat(list(Dataset(root).chunks("train", 300)))


def _same(a: Chunk, b: Chunk) -> bool:
    return (np.array_equal(a.label, b.label) and np.array_equal(a.dense, b.dense)
            and all(np.array_equal(a.sparse[k][i], b.sparse[k][i]) for k in a.sparse for i in (0, 1)))


def _flip_positions(size: int, rng: np.random.Generator) -> list[int]:
    """Random positions over the whole file plus every byte of its first and last 64 (magic, footer, trailer)."""
    return sorted(set(rng.integers(0, size, 150).tolist()) | set(range(64)) | set(range(size - 64, size)))


def _assert_every_flip_caught(root: Path, rng: np.random.Generator) -> None:
    path = root / "train" / "part-00000.parquet"
    clean = path.read_bytes()
    silent = []
    for pos in _flip_positions(len(clean), rng):
        bad = bytearray(clean)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(bad))
        try:
            if pos % 2:
                _read_all(root)
            else:
                list(Dataset(root).batches("train", 128, shuffle=True))
            silent.append(pos)
        except DataError as e:
            assert e.path == str(path), (pos, str(e))
        finally:
            path.write_bytes(clean)
    assert not silent, f"{len(silent)} single-bit flips read without an error, at bytes {silent[:10]}"


def test_clean_read_unchanged_and_checksums_recorded(tmp_path):
    root, chunk = _write(tmp_path / "ds")
    assert _same(_read_all(root), chunk)
    f = Dataset(root).manifest["splits"]["train"]["files"][0]
    groups = f["row_groups"]
    assert [g["rows"] for g in groups] == [256, 256, 256, 232]
    assert groups[0]["offset"] == 4  # right after the leading magic
    assert all(a["offset"] + a["bytes"] == b["offset"] for a, b in zip(groups, groups[1:]))
    assert isinstance(f["footer_crc32"], int)


def test_every_single_bit_flip_is_caught(tmp_path):
    root, _ = _write(tmp_path / "ds")
    _assert_every_flip_caught(root, np.random.default_rng(1))


def test_flip_message_names_file_and_row_group(tmp_path):
    root, _ = _write(tmp_path / "ds")
    f = Dataset(root).manifest["splits"]["train"]["files"][0]
    path = root / f["path"]
    g = f["row_groups"][2]
    data = bytearray(path.read_bytes())
    data[g["offset"] + g["bytes"] // 2] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        _read_all(root)
    assert str(e.value) == (f"{path}: row group 2 fails its checksum (corrupt data; re-run `tierec data convert` "
                            "or restore the file)")
    from tierec.cli import main

    assert main(["data", "verify", str(root)]) == 2


def test_legacy_manifest_verified_by_sha256_once_per_file(tmp_path, monkeypatch):
    root, chunk = _write(tmp_path / "ds")
    mpath = root / "manifest.json"
    m = json.loads(mpath.read_text())
    for f in m["splits"]["train"]["files"]:
        del f["row_groups"], f["footer_crc32"]
    mpath.write_text(json.dumps(m))
    calls = []
    real = dataset_mod.sha256_file
    monkeypatch.setattr(dataset_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    ds = Dataset(root)
    for _ in range(2):
        assert _same(Chunk.concat(list(ds.chunks("train", 300))), chunk)
    assert len(calls) == 1  # once per file per Dataset
    monkeypatch.undo()
    _assert_every_flip_caught(root, np.random.default_rng(2))


def _rewrite_checksums(root: Path) -> None:
    """Make the manifest match the files as they are now (a corrupt file that a bad copy 'blessed')."""
    mpath = root / "manifest.json"
    m = json.loads(mpath.read_text())
    for f in m["splits"]["train"]["files"]:
        p = root / f["path"]
        f["bytes"] = p.stat().st_size
        f["sha256"] = dataset_mod.sha256_file(p)
        f.pop("row_groups", None)
        f.pop("footer_crc32", None)
    mpath.write_text(json.dumps(m))


@pytest.mark.parametrize("how", ["zeros", "truncate", "garbage"])
def test_corrupt_parquet_is_one_data_error(tmp_path, how):
    root, _ = _write(tmp_path / "ds")
    path = root / "train" / "part-00000.parquet"
    data = bytearray(path.read_bytes())
    if how == "zeros":
        data[100:3000] = bytes(2900)
    elif how == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(np.random.default_rng(0).bytes(len(data)))
    path.write_bytes(bytes(data))
    _rewrite_checksums(root)
    with pytest.raises(DataError) as e:
        _read_all(root)
    assert e.value.path == str(path) and "\n" not in str(e.value)


def test_ids_out_of_range_or_negative(tmp_path):
    root, _ = _write(tmp_path / "ds")
    mpath = root / "manifest.json"
    m = json.loads(mpath.read_text())
    m["schema"]["sparse"][1]["num_embeddings"] = 10  # hand-edited: IDs up to 49 are stored
    mpath.write_text(json.dumps(m))
    with pytest.raises(DataError) as e:
        _read_all(root)
    path = root / "train" / "part-00000.parquet"
    assert e.value.path == str(path)
    assert "sparse feature 'b'" in str(e.value) and "num_embeddings 10" in str(e.value)
    bad_id = int(str(e.value).split("ID ")[1].split()[0])
    assert bad_id >= 10
    chunk = _chunk(np.random.default_rng(3), ROWS)
    chunk.sparse["a"][0][7] = -3
    root2, _ = _write(tmp_path / "neg", chunk)
    with pytest.raises(DataError, match=r"sparse feature 'a'.* ID -3"):
        list(Dataset(root2).batches("train", 64))


def _manifest_error(root: Path, text: bytes | str) -> str:
    mpath = root / "manifest.json"
    mpath.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError) as e:
        Dataset(root)
    assert e.value.path == str(mpath) and "\n" not in str(e.value)
    return e.value.reason


def test_bad_manifests_are_one_line_errors(tmp_path):
    root, _ = _write(tmp_path / "ds")
    good = json.loads((root / "manifest.json").read_text())

    def without(*keys) -> str:
        m = json.loads(json.dumps(good))
        d = m
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
        return json.dumps(m)

    assert "UTF-8" in _manifest_error(root, b"\xff\xfe{" + json.dumps(good).encode())
    assert "JSON object" in _manifest_error(root, "[1, 2]")
    assert "'schema'" in _manifest_error(root, without("schema"))
    assert "'splits'" in _manifest_error(root, without("splits"))
    assert "'rows'" in _manifest_error(root, without("splits", "train", "files", 0, "rows"))
    assert "'path'" in _manifest_error(root, without("splits", "train", "files", 0, "path"))
    assert "'bytes'" in _manifest_error(root, without("splits", "train", "files", 0, "bytes"))
    assert "'sha256'" in _manifest_error(root, without("splits", "train", "files", 0, "sha256"))
    assert "'num_embeddings'" in _manifest_error(root, without("schema", "sparse", 0, "num_embeddings"))
    assert "'crc32'" in _manifest_error(root, without("splits", "train", "files", 0, "row_groups", 1, "crc32"))
    m = json.loads(json.dumps(good))
    m["splits"]["train"]["files"] = {"path": "x"}
    assert "'files'" in _manifest_error(root, json.dumps(m))
    m = json.loads(json.dumps(good))
    m["schema"]["sparse"][0]["num_embeddings"] = "many"
    assert "num_embeddings" in _manifest_error(root, json.dumps(m))

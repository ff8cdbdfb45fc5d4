import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tierec.data.dataset import Chunk, DatasetWriter, Schema, SparseFeature
from tierec.data.hashing import splitmix64

RECBOLE = "recbole==1.2.1"
INTER_IN_WHEEL = "recbole/dataset_example/ml-100k/ml-100k.inter"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED.is_dir(), f"{SHARED} is missing: tests read real data from ../shared/data"
    return SHARED


def write_tiny_dataset(root, rows=4000, tables=4, cardinality=200, seed=0, multi_hot=True, raw=False):
    """A small learnable data set: labels from hidden per-ID effects, Zipf-ish IDs, some empty bags.
    ``raw``: the IDs stored as raw 64-bit hashes (`SparseFeature.raw`), the same data otherwise."""
    rng = np.random.default_rng(seed)
    schema = Schema(["d0", "d1", "d2"], [SparseFeature(f"s{t}", cardinality, raw=raw) for t in range(tables)])
    effects = rng.normal(size=(tables, cardinality))
    w = DatasetWriter(root, schema, row_group_size=512, rows_per_file=2048)
    for split, n in (("train", rows), ("test", rows // 4)):
        dense = rng.normal(size=(n, 3)).astype(np.float32)
        logit = dense[:, 0] * 0.5
        sparse = {}
        for t in range(tables):
            lengths = rng.integers(0, 3, n) if multi_hot else np.ones(n, np.int64)
            ids = (rng.zipf(1.3, int(lengths.sum())) - 1) % cardinality
            offs = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            sums = np.add.reduceat(np.r_[effects[t, ids], 0.0], offs[:-1]) * (lengths > 0)
            logit = logit + sums
            stored = splitmix64(ids.astype(np.uint64)).view(np.int64) if raw else ids.astype(np.int64)
            sparse[f"s{t}"] = (stored, offs)
        y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        w.splits[split].write(Chunk(y, dense, sparse))
    w.close(source={"generator": "tests/conftest.py"})
    return Path(root)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Every test's training at one torch intra-op thread, whatever ran before it. Bit-identical comparisons
    need the same thread count on both sides: on some CPUs (MKL on Intel Xeon) a linear layer's weight
    gradient sums the batch in per-thread parts, and a look-ahead run trains with one thread fewer than torch's
    default (`tierec.train.pipeline`), which at one thread it leaves as it is."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _quiet_threads():
    # Two cores on CI: keep torch from oversubscribing when tests run beside other work.
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield


@pytest.fixture(scope="session")
def ml100k_inter() -> Path:
    """The real MovieLens-100k ratings from the recbole 1.2.1 wheel, downloaded once into a cache dir."""
    cache = Path(os.environ.get("TIEREC_TEST_CACHE", Path.home() / ".cache" / "tierec-test"))
    path = cache / "ml-100k.inter"
    if path.exists() and path.stat().st_size > 1_000_000:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as d:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", RECBOLE,
                               "-d", d], capture_output=True, text=True, timeout=300)
        wheels = list(Path(d).glob("recbole-1.2.1-*.whl"))
        if proc.returncode != 0 or not wheels:
            pytest.fail(f"could not download {RECBOLE} (needed for the MovieLens test): "
                        f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            data = z.read(INTER_IN_WHEEL)
        tmp = Path(d) / "ml-100k.inter"
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def movielens_inter(ml100k_inter) -> Path:
    return ml100k_inter


def json_samples(schema: Schema, batch) -> list[dict]:
    """A `Batch` (dense [B, F], sparse KJT) as the JSON samples /v1/predict takes: feature name -> value(s)."""
    samples: list[dict] = [{} for _ in range(batch.dense.shape[0])]
    for j, name in enumerate(schema.dense):
        for i, v in enumerate(batch.dense[:, j].tolist()):
            samples[i][name] = float(v)
    by_key = batch.sparse.to_dict()
    for f in schema.sparse:
        o, vals = by_key[f.name].offsets().tolist(), by_key[f.name].values.tolist()
        for i, s in enumerate(samples):
            s[f.name] = vals[o[i] : o[i + 1]]
    return samples


def write_sequences(root: Path, users: int, items: int, seed: int, lengths: tuple[int, int] = (3, 14)) -> Path:
    """``users`` random histories of ``lengths`` (low, high exclusive) items in 1..``items`` as a `user item`
    pairs file, converted to a sequence data set (`tierec data convert --format sequences`); its directory."""
    from tierec.data.sequences import convert_sequences

    rng = np.random.default_rng(seed)
    lines = [f"{u} {int(i)}\n" for u in range(1, users + 1)
             for i in rng.integers(1, items + 1, size=int(rng.integers(*lengths)))]
    (root / "pairs.txt").write_text("".join(lines))
    convert_sequences(root / "pairs.txt", root / "ds")
    return root / "ds"

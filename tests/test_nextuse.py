"""NextUseTrace against a brute-force reference: one and many partitions, one and many chunks, matches,
files, a stream consumed once, the memory bound."""

import os
import tracemalloc

import numpy as np
import pytest
import torch

from tierec.storage.lookahead import NEVER
from tierec.train import nextuse
from tierec.train.nextuse import NextUseTrace

FEATURES = ["a", "b", "c"]


def random_stream(seed: int, steps: int, max_len: int) -> list[dict[str, torch.Tensor]]:
    """Steps of feature -> int64 IDs: lengths 0..max_len (some features absent), IDs from a small pool (repeats
    within and across steps), up to 2^40, and one hot ID."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 1 << 40, 64)
    out = []
    for _ in range(steps):
        batch = {}
        for f in FEATURES:
            if rng.random() < 0.1:
                continue  # absent: no lookups
            n = int(rng.integers(0, max_len + 1))
            kind = rng.integers(0, 3, n)
            ids = np.where(kind == 0, pool[rng.integers(0, pool.size, n)],
                           np.where(kind == 1, rng.integers(0, 1 << 40, n), 7))
            batch[f] = torch.from_numpy(ids.astype(np.int64))
        out.append(batch)
    return out


def brute_force(batches: list[dict[str, torch.Tensor]], start: int) -> list[dict[str, list[int]]]:
    """Per step, feature -> next use of each lookup: a dict of each ID's next step, walked backwards."""
    out: list[dict[str, list[int]]] = [{} for _ in batches]
    for f in FEATURES:
        later: dict[int, int] = {}
        for i in range(len(batches) - 1, -1, -1):
            ids = batches[i][f].tolist() if f in batches[i] else []
            out[i][f] = [later.get(x, NEVER) for x in ids]
            for x in ids:
                later[x] = start + i
    return out


def ids_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


def check(trace: NextUseTrace, batches: list[dict[str, torch.Tensor]], start: int) -> None:
    expected = brute_force(batches, start)
    assert trace.steps == len(batches)
    assert trace.lookups == sum(t.numel() for b in batches for t in b.values())
    for i, want in enumerate(expected):
        got = trace.at(start + i)
        assert set(got) == set(FEATURES)
        for f in FEATURES:
            assert got[f].dtype == torch.int64
            assert got[f].tolist() == want[f], (i, f)


def test_one_partition_matches_brute_force(tmp_path):
    batches = random_stream(0, steps=120, max_len=40)
    with NextUseTrace.build(iter(batches), ids_of, FEATURES, start_step=17, directory=tmp_path,
                            memory_bytes=64 << 20) as trace:
        assert trace.partitions == 1
        check(trace, batches, 17)
        assert trace.seconds > 0 and trace.nbytes == len(FEATURES) * (8 * (len(batches) + 1) + 8 * len(batches))


def test_one_partition_many_chunks_matches_brute_force(tmp_path, monkeypatch):
    """Chunk boundaries inside steps: the carry's step is then the lookup's own."""
    batches = random_stream(1, steps=400, max_len=80)  # ~10k lookups per feature
    most = max(sum(b[f].numel() for b in batches if f in b) for f in FEATURES)
    memory = most * 2 * nextuse.BYTES_PER_CARRIED_ID  # one partition, chunks of memory / 2 / BYTES_PER_LOOKUP
    monkeypatch.setattr(nextuse, "MIN_CHUNK", 256)
    partitions, chunk = nextuse._plan(most, memory)
    assert partitions == 1 and chunk * 3 < most
    with NextUseTrace.build(iter(batches), ids_of, FEATURES, start_step=5, directory=tmp_path,
                            memory_bytes=memory) as trace:
        assert trace.partitions == 1
        check(trace, batches, 5)


def test_many_partitions_match_brute_force(tmp_path):
    batches = random_stream(2, steps=300, max_len=60)
    with NextUseTrace.build(iter(batches), ids_of, FEATURES, start_step=1000, directory=tmp_path,
                            memory_bytes=4096) as trace:
        assert trace.partitions > 1
        check(trace, batches, 1000)


def test_every_lookup_the_same_id(tmp_path):
    """One hot ID: every partition but one empty, runs spanning chunks."""
    batches = [{"a": torch.full((n,), 3, dtype=torch.int64)} for n in [5, 0, 3000, 1, 2500, 4000]]
    for memory in (64 << 20, 4096):
        with NextUseTrace.build(iter(batches), ids_of, ["a"], start_step=0, directory=tmp_path,
                                memory_bytes=memory) as trace:
            want = [2, NEVER, 3, 4, 5, NEVER]  # step 1 looks nothing up
            for s, b in enumerate(batches):
                nxt = trace.at(s)["a"]
                assert nxt.numel() == b["a"].numel() and bool((nxt == want[s]).all())


def test_matches(tmp_path):
    batches = random_stream(3, steps=30, max_len=20)
    with NextUseTrace.build(iter(batches), ids_of, FEATURES, start_step=2, directory=tmp_path,
                            memory_bytes=1 << 20) as trace:
        for i, b in enumerate(batches):
            assert trace.matches(2 + i, b)
            assert trace.matches(2 + i, {**b, "untraced": torch.arange(3)})
        i = next(i for i, b in enumerate(batches) if "a" in b and b["a"].numel() >= 2)
        b = batches[i]
        changed = b["a"].clone()
        changed[1] += 1
        assert not trace.matches(2 + i, {**b, "a": changed})
        assert not trace.matches(2 + i, {**b, "a": b["a"].flip(0)}) or bool((b["a"] == b["a"].flip(0)).all())
        assert not trace.matches(2 + i, {**b, "a": b["a"][:-1]})
        assert not trace.matches(2 + i, {**b, "a": torch.cat([b["a"], b["a"][:1]])})
        assert not trace.matches(2 + i, {f: t for f, t in b.items() if f != "a"})
        assert not trace.matches(1, b) and not trace.matches(2 + len(batches), b)


def test_files_removed_by_close_and_context_manager(tmp_path):
    batches = random_stream(4, steps=50, max_len=30)
    trace = NextUseTrace.build(iter(batches), ids_of, FEATURES, start_step=0, directory=tmp_path,
                               memory_bytes=4096)
    root = trace.directory
    assert os.path.dirname(root) == str(tmp_path) and os.path.basename(root).startswith("next-use.")
    assert sorted(os.listdir(root)) == [f"{i}.next" for i in range(len(FEATURES))]  # the spill files are gone
    trace.close()
    assert not os.path.exists(root) and os.listdir(tmp_path) == []
    trace.close()  # idempotent
    with pytest.raises(ValueError):
        trace.at(0)
    assert not trace.matches(0, batches[0])
    with NextUseTrace.build(iter(batches), ids_of, FEATURES, start_step=0, directory=tmp_path,
                            memory_bytes=1 << 20) as trace:
        assert os.path.isdir(trace.directory)
    assert os.listdir(tmp_path) == []


def test_a_failing_stream_leaves_no_files(tmp_path):
    def failing():
        yield {"a": torch.arange(4)}
        raise RuntimeError("reader failed")

    with pytest.raises(RuntimeError):
        NextUseTrace.build(failing(), ids_of, ["a"], start_step=0, directory=tmp_path, memory_bytes=1 << 20)
    assert os.listdir(tmp_path) == []


def test_generator_consumed_once_and_empty_stream(tmp_path):
    batches = random_stream(5, steps=40, max_len=25)
    pulled = []

    def generate():
        for b in batches:
            pulled.append(1)
            yield b

    with NextUseTrace.build(generate(), ids_of, FEATURES, start_step=9, directory=tmp_path,
                            memory_bytes=4096) as trace:
        assert len(pulled) == len(batches)
        check(trace, batches, 9)
    with NextUseTrace.build(iter([]), ids_of, FEATURES, start_step=3, directory=tmp_path,
                            memory_bytes=1 << 20) as empty:
        assert (empty.steps, empty.lookups) == (0, 0)
        assert not empty.matches(3, {})
        with pytest.raises(IndexError):
            empty.at(3)
    with NextUseTrace.build(iter([{}, {}]), ids_of, ["a"], start_step=0, directory=tmp_path,
                            memory_bytes=1 << 20) as nothing:  # steps without lookups
        assert nothing.at(1)["a"].numel() == 0 and nothing.matches(1, {"a": torch.empty(0, dtype=torch.int64)})


@pytest.mark.parametrize("distinct", [True, False])
def test_build_memory_within_budget(tmp_path, distinct):
    """numpy reports its buffers to tracemalloc: the build's peak stays within memory_bytes (plus one batch)."""
    memory = 2 << 20
    rng = np.random.default_rng(6)

    def stream():
        for _ in range(100):
            high = 1 << 40 if distinct else 1000
            yield {f: torch.from_numpy(rng.integers(0, high, 4096)) for f in ("a", "b")}

    tracemalloc.start()
    try:
        with NextUseTrace.build(stream(), ids_of, ["a", "b"], start_step=0, directory=tmp_path,
                                memory_bytes=memory) as trace:
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert trace.partitions > 1
    assert peak < memory + 2 * 4096 * 8 + (256 << 10), peak

"""Arrays spilled to files (`tierec.storage.spill`) and the dynamic tables' index over them: the same map as in
memory, chunked passes included, resident pages bounded, checkpoints in array files verified on load."""

import json

import numpy as np
import pytest
import torch

from tierec.errors import CheckpointError
from tierec.storage.dynamic import DynamicConfig, DynamicIndex
from tierec.storage.spill import PAGE, SpillArrays, release_pages


def _rss(t: torch.Tensor) -> int:
    """Resident bytes of the mapping that holds ``t`` (from /proc/self/smaps)."""
    addr, cur, rss = t.data_ptr(), False, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                cur = lo <= addr < hi
            elif cur and head == "Rss:":
                rss += int(line.split()[1]) * 1024
    return rss


def test_spilled_arrays_are_sparse_files_whose_pages_leave_memory_and_keep_their_values(tmp_path):
    sp = SpillArrays(tmp_path, resident_bytes=1 << 20)
    a = sp.zeros(1 << 24, torch.int64)  # 128 MiB of zeros, mapped from an unlinked sparse file
    assert list(tmp_path.iterdir()) == [] and int(a[:: 1 << 12].sum()) == 0
    idx = torch.randint(0, 1 << 24, (20_000,), generator=torch.Generator().manual_seed(0))
    a[idx] = idx
    assert _rss(a) > 16 << 20  # ~20K scattered pages became resident
    sp.charge(idx.numel())  # over the bound: trimmed
    assert _rss(a) <= 1 << 20 and sp.trims == 1
    assert torch.equal(a[idx], idx)  # the values are still there (page cache / file)
    assert int(a.sum()) == int(torch.unique(idx).sum())
    sp.trim()
    _ = a[: 1 << 22].sum()  # a long read (32 MiB), then its pages released
    assert _rss(a) >= 32 << 20
    release_pages(a[: 1 << 22])
    assert _rss(a) <= 2 * PAGE
    b = torch.ones(4)
    release_pages(b)  # ordinary memory: untouched
    assert b.tolist() == [1.0] * 4


def _stream(seed, steps, n, vocab):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        r = np.minimum(rng.zipf(1.2, n), vocab) - 1
        yield torch.from_numpy(r.astype(np.int64)) * -7046029254386353131  # raw 64-bit-looking IDs (wrapping)


POLICIES = [dict(evict="lfu", decay_every=5, admit_count=2),
            dict(evict="ttl", ttl_steps=4, decay_every=3, default_row="unknown"),
            dict(evict="none")]


@pytest.mark.parametrize("kw", POLICIES)
def test_spilled_index_maps_exactly_like_the_in_memory_one(tmp_path, kw):
    """Capacities of several passes' chunks (4,096 slots at this resident bound): eviction's chunked selection,
    the sweeps' chunked removals and the chunked rebuilds give the in-memory index's slots, fresh rows and
    counters, step for step; a state saved by either continues identically in the other."""
    cfgs = [DynamicConfig(capacity=9000, **kw), DynamicConfig(capacity=5000, **kw)]
    mem = DynamicIndex(cfgs, ["a", "b"])
    sp = DynamicIndex(cfgs, ["a", "b"], spill=tmp_path, resident_bytes=64 << 10)
    streams = [list(_stream(s, 40, 1500, 80_000)) for s in (1, 2)]
    for step in range(1, 31):
        batch = [st[step - 1] for st in streams]
        for m, s in zip(mem.map(batch, step), sp.map(batch, step), strict=True):
            assert torch.equal(m.slots, s.slots) and torch.equal(m.fresh_slots, s.fresh_slots), step
            assert torch.equal(m.fresh_ids, s.fresh_ids), step
    assert mem.stats() == sp.stats() and sp.arrays.trims > 0
    if kw["evict"] != "none":
        assert mem.stats()["a"]["evicted"] > 0 and mem.stats()["b"]["evicted"] > 0
    a, b = DynamicIndex(cfgs, ["a", "b"]), DynamicIndex(cfgs, ["a", "b"], spill=tmp_path, resident_bytes=64 << 10)
    a.load_state_dict(sp.state_dict())
    b.load_state_dict(mem.state_dict())
    for step in range(31, 41):
        batch = [st[step - 1] for st in streams]
        outs = [ix.map(batch, step) for ix in (mem, sp, a, b)]
        for t in range(2):
            assert all(torch.equal(outs[0][t].slots, o[t].slots) for o in outs[1:]), step
    assert mem.stats() == sp.stats() == a.stats() == b.stats()
    assert sp.nbytes == 64 << 10 and mem.nbytes > 10 * sp.nbytes


def test_spill_decision_pays_the_resident_share_from_the_budget(tmp_path):
    from tierec.data.dataset import Schema, SparseFeature
    from tierec.train.config import TrainConfig

    schema = Schema(["d"], [SparseFeature("u", 10_000_000, raw=True), SparseFeature("i", 10_000_000, raw=True)])
    base = dict(data=".", out=str(tmp_path / "run"), table_kind="dynamic", table_rows=2_000_000)
    mem = TrainConfig(**base, memory_budget="4GiB").id_maps(schema)  # 2 x 2M slots x ~129 B: under 1 GiB
    assert mem.spill is None
    big = TrainConfig(**base, memory_budget="1GiB").id_maps(schema)
    assert big.spill == tmp_path / "run" / "tables" / "id_index" and big.resident_bytes == 64 << 20
    assert sum(r.index_bytes for r in big.rows.values()) <= 64 << 20
    assert TrainConfig(**base, id_index="memory", memory_budget="1GiB").id_maps(schema).spill is None
    assert TrainConfig(**base, id_index="ssd").id_maps(schema).resident_bytes == 64 << 20


def test_checkpoint_array_files_are_verified_on_load(tmp_path):
    from tierec.train import checkpoint as ckpt

    t = torch.arange(100_000, dtype=torch.int64)
    state, arrays = ckpt.detach_arrays({"arrays": {"x": t, "live": t % 3 == 0}, "step": 4}, "ix")
    assert state["arrays"] == {"x": "arrays/ix.x.bin", "live": "arrays/ix.live.bin"}
    files = ckpt.write_arrays(tmp_path, arrays)
    manifest = {"files": files}
    back = ckpt.attach_arrays(tmp_path, manifest, state)["arrays"]
    got = torch.cat([p for _, _, p in back["x"].chunks([(0, 60_000), (60_000, 100_000)])])
    assert torch.equal(got, t)
    live = torch.cat([p for _, _, p in back["live"].chunks([(0, 100_000)])])
    assert live.dtype == torch.bool and torch.equal(live, t % 3 == 0)
    raw = bytearray((tmp_path / "arrays/ix.x.bin").read_bytes())
    raw[8] ^= 1
    (tmp_path / "arrays/ix.x.bin").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        list(ckpt.attach_arrays(tmp_path, manifest, state)["arrays"]["x"].chunks([(0, 100_000)]))
    with pytest.raises(CheckpointError, match="not in the manifest"):
        ckpt.attach_arrays(tmp_path, {"files": {}}, state)
    assert json.dumps(files)  # the entries are plain JSON

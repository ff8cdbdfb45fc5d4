"""Serving's fused lookup (all tables pooled by one embedding_bag) equals the per-table path bit for bit."""

from __future__ import annotations

import pytest
import torch

from tierec.inference.model_store import FusedLookup, SharedCache, end_to_end_tables
from tierec.modules.embedding import TableConfig, build_collection
from tierec.modules.optim import SparseOptimizer
from tierec.sparse import KeyedJaggedTensor
from tierec.storage.ssd import SsdTable


def _batch(sizes, B, gen, weighted):
    """A KJT over len(sizes) keys with bags of 0..5 IDs (some empty), optionally weighted."""
    lengths = torch.randint(0, 6, (len(sizes) * B,), generator=gen)
    lengths[::7] = 0
    values = torch.cat([torch.randint(0, n, (int(lengths[t * B:(t + 1) * B].sum()),), generator=gen)
                        for t, n in enumerate(sizes)])
    weights = torch.rand(values.numel(), generator=gen) if weighted else None
    return KeyedJaggedTensor([f"C{t}" for t in range(len(sizes))], values, lengths, weights, stride=B)


@pytest.mark.parametrize("weighted", [False, True])
def test_fused_lookup_equals_per_table_pooling(tmp_path, weighted):
    sizes, D, B = [50, 7, 300, 1], 8, 33
    configs = [TableConfig(f"C{t}", n, D, "mean" if t % 2 else "sum") for t, n in enumerate(sizes)]
    ebc = build_collection(configs, SparseOptimizer("rowwise_adagrad", 0.1), seed=3).eval()
    tables = [t.storage for t in ebc.tables]
    for i, (t, n) in enumerate(zip(tables, sizes)):  # the same rows as SSD files, read-only behind a cache
        with SsdTable(tmp_path / f"{i}.tbl", n, D, 1, create=True, init="zeros") as f:
            f.write(torch.arange(n), t.weight, t.state)
    ro = [SsdTable(tmp_path / f"{i}.tbl", n, D, 1, readonly=True) for i, n in enumerate(sizes)]
    shared = SharedCache(ro, capacity=20, admit_after=1, admit_batch=4)  # admissions larger than the cache
    keys, mean = [c.key for c in configs], [c.pooling == "mean" for c in configs]
    ssd = FusedLookup(keys, sizes, mean, D, shared=shared)
    gen = torch.Generator().manual_seed(0)
    batches = [_batch(sizes, B, gen, weighted) for _ in range(6)]
    with torch.no_grad():
        ref = [torch.stack(ebc.pooled(k), 1) for k in batches]  # [B, T, D], one embedding_bag per table
    weight, views = end_to_end_tables(sizes, D, 1)
    for t, v in zip(tables, views):
        v.write_rows(0, t.weight, t.state)
        assert v.weight.data_ptr() == weight[int(sum(sizes[: views.index(v)]))].data_ptr()  # a view, no copy
    dram = FusedLookup(keys, sizes, mean, D, weight=weight)
    for k, r in zip(batches, ref):
        assert torch.equal(dram.pooled(k), r)
        assert torch.equal(ssd.pooled(k), r)
        shared.maintain()  # admissions between batches change what is cached, not the numbers
    assert shared.hits > 0 and shared.lookups > shared.hits


def test_fused_lookup_of_a_batch_without_ids(tmp_path):
    SsdTable(tmp_path / "t.tbl", 10, 4, 0, create=True, init="zeros").close()
    shared = SharedCache([SsdTable(tmp_path / "t.tbl", 10, 4, 0, readonly=True)], capacity=2)
    kjt = KeyedJaggedTensor(["C0"], torch.zeros(0, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), stride=3)
    out = FusedLookup(["C0"], [10], [True], 4, shared=shared).pooled(kjt)
    assert out.shape == (3, 1, 4) and not bool(out.any())
    with pytest.raises(ValueError):
        FusedLookup(["C0"], [10], [False], 4)

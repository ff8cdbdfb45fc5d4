"""Rows laid out by hotness (`HotLayout`) and block neighbours: where bytes go changes, never what a row holds."""

import json

import numpy as np
import pytest
import torch
from conftest import write_tiny_dataset

from tierec.errors import CheckpointError, ConfigError, TierecError
from tierec.storage.layout import HotLayout
from tierec.storage.ssd import SsdTable, layout_path
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer


def test_hot_layout_orders_by_count_and_maps_both_ways():
    n = 100
    lay = HotLayout.from_counts(n, np.array([7, 3, 50, 9, 11]), np.array([2, 5, 5, 1, 2]), max_rows=4)
    assert lay.hot.tolist() == [3, 50, 7, 11]  # most counted first, ties by ID; 9 did not make the cut
    assert lay.file_rows_total == n + 4
    ids = np.arange(n)
    f = lay.file_rows(ids)
    assert np.unique(f).size == n and f[3] == n and f[50] == n + 1 and f[11] == n + 3 and f[9] == 9
    back = lay.ids_at(np.arange(n + 4))
    assert back[f].tolist() == ids.tolist()
    assert sorted(np.flatnonzero(back == -1).tolist()) == [3, 7, 11, 50]  # the hot rows' empty homes
    with pytest.raises(ValueError, match="distinct"):
        HotLayout(n, np.array([1, 1]))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        HotLayout(n, np.array([100]))


@pytest.mark.parametrize("direct_io", [False, True])
def test_a_laid_out_file_reads_and_writes_like_a_plain_one(tmp_path, direct_io):
    n, d, sd = 20_000, 6, 1
    rng = np.random.default_rng(0)
    hot = rng.choice(n, 3000, replace=False)
    kw = dict(create=True, init="lazy", init_seed=3, table_index=1, direct_io=direct_io)
    laid = SsdTable(tmp_path / "h.tbl", n, d, sd, layout=HotLayout(n, hot), **kw)
    plain = SsdTable(tmp_path / "p.tbl", n, d, sd, **kw)
    assert laid.file_bytes == (n + 3000) * laid.row_stride
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        perm = torch.randperm(n, generator=g)
        wid, rid = perm[:300], perm[300:900]
        w, s = torch.randn(300, d, generator=g), torch.randn(300, sd, generator=g)
        if i % 3 == 2:  # plain writes and reads too, not just the batched exchange
            got = []
            for t in (laid, plain):
                t.write(wid, w, s)
                got.append(t.read(rid))
        else:
            got = [t.exchange(wid, w, s, rid) for t in (laid, plain)]
        assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    for t in (laid, plain):
        t.write_rows(100, torch.full((50, d), 2.0), torch.full((50, sd), 3.0))
    a, b = laid.read_rows(0, n), plain.read_rows(0, n)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    laid.close()
    again = SsdTable.open(tmp_path / "h.tbl", direct_io=direct_io)  # the sidecar and .hot say it all
    assert again.layout is not None and again.layout.hot.tolist() == hot.tolist()
    assert torch.equal(again.read_rows(0, n)[0], a[0])
    again.close()


def test_a_missing_or_altered_layout_file_is_refused(tmp_path):
    n = 1000
    t = SsdTable(tmp_path / "h.tbl", n, 4, 1, create=True, init="lazy", init_seed=0, layout=HotLayout(n, np.arange(10)))
    t.close()
    hot = layout_path(tmp_path / "h.tbl")
    hot.write_bytes(np.arange(1, 11, dtype=np.int64).tobytes())  # other rows, same size
    with pytest.raises(CheckpointError, match=r"h\.tbl\.hot"):
        SsdTable.open(tmp_path / "h.tbl")
    hot.unlink()
    with pytest.raises(CheckpointError, match="laid out by hotness"):
        SsdTable.open(tmp_path / "h.tbl")
    with pytest.raises(ConfigError, match="new lazy working file"):
        SsdTable(tmp_path / "e.tbl", n, 4, 1, create=True, init="random", init_seed=0, layout=HotLayout(n, []))


def test_neighbours_are_the_written_rows_in_the_same_blocks(tmp_path):
    n, d = 50_000, 16  # 68-byte rows: 60 whole rows per 4 KiB block
    hot = np.arange(40_000, 40_120)  # 120 hot rows: two blocks' worth, laid end to end after row n - 1
    t = SsdTable(tmp_path / "h.tbl", n, d, 1, create=True, init="lazy", init_seed=0, direct_io=True,
                 layout=HotLayout(n, hot))
    if not t.odirect:
        pytest.skip("this filesystem refuses O_DIRECT")
    written = torch.from_numpy(hot[::2])  # every other hot row has bytes in the file
    t.write(written, torch.ones(written.numel(), d), torch.zeros(written.numel(), 1))
    got = t.neighbours(torch.tensor([40_000]))
    f = t.slots_of(hot) * t.row_stride
    same = (f // t.align == f[0] // t.align) & ((f + t.row_bytes - 1) // t.align == f[0] // t.align)
    want = [int(i) for i, s in zip(hot, same, strict=True) if s and i % 2 == 0 and i != 40_000]
    assert got.tolist() == want and len(want) > 10
    assert t.neighbours(torch.tensor([5])).numel() == 0  # a cold row among never-written ones
    plain = SsdTable(tmp_path / "m.tbl", n, d, 1, create=True, init="lazy", init_seed=0)  # memmap: no blocks
    plain.write(written, torch.ones(written.numel(), d), torch.zeros(written.numel(), 1))
    assert plain.neighbours(written[:1]).numel() == 0


@pytest.fixture(scope="module")
def wide_dataset(tmp_path_factory):
    """Tables of 60K rows: several MiB of tables, a budget of 1 MiB (hot layouts need at least that) or less."""
    return write_tiny_dataset(tmp_path_factory.mktemp("wide") / "data", rows=12_000, cardinality=60_000, seed=4)


def _run(data, out, resume=False, **kw):
    base = dict(data=str(data), out=str(out), embedding_dim=16, bottom_mlp=[16], top_mlp=[16], batch_size=512,
                epochs=1, progress=False, log_every=5, plan_batches=4, eval_every=0)
    t = Trainer(TrainConfig(**(base | kw)), resume=resume)
    summary = t.fit()
    rows = {}
    for tb in t.model.embeddings.tables:
        tb.storage.flush()
        rows[tb.config.name] = tb.storage.read_rows(0, tb.storage.num_embeddings)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, records


def test_hot_layout_and_block_neighbours_train_bit_identically(wide_dataset, tmp_path):
    ref_summary, ref_rows, _ = _run(wide_dataset, tmp_path / "mem")
    # without the run's next-use trace: with it Belady's MIN evicts only rows this one epoch never uses again, so
    # nothing is read back and no block has neighbours to take
    tiered = dict(memory_budget="1MiB", cache_policy="lookahead", direct_io=True, lookahead_trace=False)
    for layout in ("plain", "hot"):
        summary, rows, records = _run(wide_dataset, tmp_path / layout, ssd_layout=layout, **tiered)
        assert summary["auc"] == ref_summary["auc"] and summary["logloss"] == ref_summary["logloss"], layout
        for name, (w, s) in rows.items():
            assert torch.equal(w, ref_rows[name][0]) and torch.equal(s, ref_rows[name][1]), (layout, name)
        start = next(r for r in records if r["event"] == "start")
        cache = next(iter([r for r in records if r["event"] == "train"][-1]["cache"].values()))
        if layout == "hot":
            assert start["budget_split"]["layout"] > 0
            assert cache["neighbour_rows"] > 0 and cache["neighbour_hits"] > 0, cache
        else:
            assert start["budget_split"]["layout"] == 0 and cache["neighbour_rows"] == 0


def test_the_layout_is_kept_in_the_checkpoint_and_a_resume_lays_its_files_out_the_same(wide_dataset, tmp_path):
    from tierec.cli import main

    _, ref_rows, _ = _run(wide_dataset, tmp_path / "mem")
    tiered = dict(memory_budget="1MiB", cache_policy="lookahead", direct_io=True, checkpoint_every=10, ssd_layout="hot")
    _run(wide_dataset, tmp_path / "run", max_steps=10, **tiered)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000010"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    saved = {k: v for k, v in manifest["files"].items() if k.startswith("layout/")}
    assert saved, "the SSD tables' hot rows go into the checkpoint"
    hot_before = {k: (ckpt / k).read_bytes() for k in saved}
    assert main(["checkpoint", "verify", str(ckpt)]) == 0
    _, rows, _ = _run(wide_dataset, tmp_path / "run", resume=True, **tiered)
    for rel, data in hot_before.items():
        name = rel.removeprefix("layout/").removesuffix(".hot")
        assert (tmp_path / "run" / "tables" / f"{name}.tbl.hot").read_bytes() == data  # the new working file's
    for name, (w, s) in rows.items():
        assert torch.equal(w, ref_rows[name][0]) and torch.equal(s, ref_rows[name][1]), name
    latest = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "LATEST").read_text().strip()
    hot = next(latest.glob("layout/*.hot"))
    hot.write_bytes(bytes(hot.stat().st_size))
    with pytest.raises(TierecError, match=r"layout/.*sha256"):
        _run(wide_dataset, tmp_path / "run", resume=True, **tiered)


def test_write_backs_staged_by_next_use_train_bit_identically(wide_dataset, tmp_path):
    """Two epochs with the next-use trace: evicted rows come back in the second, so their write-backs carry a
    next use and wait in the write-back log's staging area (`tierec.storage.rowlog`) -- read back, flushed
    for checkpoints and resumed from -- and training equals all-in-memory training bit for bit."""
    ref_summary, ref_rows, _ = _run(wide_dataset, tmp_path / "mem", epochs=2)
    tiered = dict(memory_budget="512KiB", cache_policy="lookahead", direct_io=True, epochs=2, checkpoint_every=9)
    _run(wide_dataset, tmp_path / "run", max_steps=30, **tiered)
    summary, rows, records = _run(wide_dataset, tmp_path / "run", resume=True, **tiered)
    assert summary["auc"] == ref_summary["auc"] and summary["logloss"] == ref_summary["logloss"]
    for name, (w, s) in rows.items():
        assert torch.equal(w, ref_rows[name][0]) and torch.equal(s, ref_rows[name][1]), name
    start = next(r for r in records if r["event"] == "start")
    assert start["budget_split"]["log_staging"] > 0
    assert any(r["event"] == "trace" for r in records)

    def total(st, key: str) -> int:  # summed over the SSD files below a cache's stats
        if isinstance(st, dict):
            return int(st.get(key, 0)) + sum(total(v, key) for k, v in st.items() if k != key)
        return 0

    last = [r for r in records if r["event"] == "train"][-1]["cache"]
    assert total(last, "log_staged_peak") > 0 and total(last, "log_rows") > 0, last
    assert start["budget_split"]["log_recent"] > 0 and total(last, "log_recent_rows") > 0, last  # read from memory

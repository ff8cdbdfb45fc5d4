"""`tierec export` (serving exports, quantized rows) and `tierec serve EXPORT`: round trips per row dtype, served
scores against the offline model of the dequantized rows (a real server, a real client, concurrent requests),
corrupt exports refused, bad arguments exit 2."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import json_samples, write_tiny_dataset
from test_serve import metrics, serving

from tierec.cli import main
from tierec.data.dataset import Dataset
from tierec.errors import CheckpointError
from tierec.inference.export import write_export
from tierec.inference.model_store import ServeOptions, SharedCache, load_model
from tierec.inference.service import ServeConfig, build_server
from tierec.storage.quantized import ROW_DTYPES, RowCodec, open_row_file, read_row_file
from tierec.storage.ssd import SsdTable, open_table_chain
from tierec.train import checkpoint as ckpt
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer, load_for_eval

DIM = 12  # not a multiple of 8: padded int4 / int8 codes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny DLRM (4 tables of 300 rows, dim 12, mean pooling on a multi-hot data set) and its exports per dtype."""
    root = tmp_path_factory.mktemp("export")
    data = write_tiny_dataset(root / "data", rows=3000, tables=4, cardinality=300)
    Trainer(TrainConfig(data=str(data), out=str(root / "dlrm"), batch_size=256, embedding_dim=DIM, progress=False,
                        num_threads=1, eval_batch_size=4096, bottom_mlp=[16], top_mlp=[16])).fit()
    exports = {dt: str(root / f"exp-{dt}") for dt in ROW_DTYPES}
    for dt, out in exports.items():
        write_export(root / "dlrm", out, dt, progress=False)
    return {"root": root, "data": str(data), "dlrm": str(root / "dlrm"), "exports": exports}


def _checkpoint_rows(run) -> dict[str, torch.Tensor]:
    path = ckpt.resolve_checkpoint(run["dlrm"])
    m = ckpt.read_manifest(path)
    chain = [(d, mm["files"]) for d, mm in ckpt.table_chain(path, m)]
    out = {}
    for t in m["tables"]:
        with open_table_chain(chain, t["file"], t["num_embeddings"], t["dim"], t["state_dim"]) as f:
            out[t["name"]] = f.read_rows(0, t["num_embeddings"])[0]
    return out


def _export_rows(out: str) -> dict[str, tuple[torch.Tensor, RowCodec]]:
    m = json.loads(open(f"{out}/export.json").read())
    got = {}
    for t in m["tables"]:
        codec = RowCodec(t["row_dtype"], t["dim"])
        words = torch.empty(t["num_embeddings"], codec.words)
        read_row_file(Path(out) / t["file"], m["files"][t["file"]], codec, t["num_embeddings"], words)
        got[t["name"]] = (words, codec)
    return got


def test_export_round_trip_per_dtype(run):
    ref = _checkpoint_rows(run)
    for dt, out in run["exports"].items():
        for name, (words, codec) in _export_rows(out).items():
            x, y = ref[name], codec.decode(words)
            assert words.shape[1] * 4 == codec.row_bytes and y.shape == x.shape
            if dt == "fp32":
                assert torch.equal(y, x)
            elif dt in ("fp16", "bf16"):  # exact to their precision: round to nearest, then widened
                assert torch.equal(y, x.to(torch.float16 if dt == "fp16" else torch.bfloat16).float())
            else:  # row-wise affine: bias = the row's min (exact), scale = range / levels, error <= scale / 2
                levels = 255 if dt == "int8" else 15
                scale, bias = words[:, -2], words[:, -1]
                assert torch.equal(bias, x.min(1).values)
                assert torch.allclose(scale, (x.max(1).values - x.min(1).values) / levels, rtol=1e-6, atol=0)
                err = (y - x).abs()
                slack = 1e-6 * x.abs().amax(1, keepdim=True)  # float32 rounding of the affine arithmetic
                assert bool((err <= scale[:, None] / 2 + slack).all()), (dt, name, float((err - scale[:, None] / 2).max()))
                assert float(err.max()) > 0  # it is lossy
    sizes = {dt: sum((run["root"] / f"exp-{dt}" / "tables" / f"s{t}.rows").stat().st_size for t in range(4))
             for dt in ROW_DTYPES}
    assert sizes == {dt: 4 * 300 * RowCodec(dt, DIM).row_bytes for dt in ROW_DTYPES}
    assert RowCodec("int8", DIM).row_bytes == 12 + 8 and RowCodec("int4", DIM).row_bytes == 8 + 8


def _samples(run, n=64):
    """The first n test rows as JSON samples, and the batch."""
    ds = Dataset(run["data"])
    batch = next(ds.batches("test", n))
    samples = json_samples(ds.schema, batch)
    return samples, batch


def _offline_dequantized(run, dt: str, batch) -> np.ndarray:
    """`tierec eval`'s model of the checkpoint with every table's rows replaced by decode(encode(rows))."""
    model, _, _ = load_for_eval(run["dlrm"], run["data"], "cpu")
    for t in model.embeddings.bags:
        codec = RowCodec(dt, t.storage.dim)
        t.storage.weight.copy_(codec.decode(codec.encode(t.storage.weight)))
    with torch.no_grad():
        return model(batch.dense, batch.sparse).numpy()


@pytest.mark.parametrize("dt", ["int8", "fp16"])
def test_served_export_equals_offline_dequantized_model_under_concurrency(run, dt):
    samples, batch = _samples(run)
    offline = _offline_dequantized(run, dt, batch)
    got = {}
    for tables in ("ssd", "dram"):
        cfg = ServeConfig(checkpoint=run["exports"][dt], tables=tables, cache_fraction=0.03, warm_rows=0,
                          admit_after=1, max_batch=64, max_wait_ms=5, threads=1)
        with serving(build_server(cfg)) as c:
            async def burst():
                async with httpx.AsyncClient(base_url=c.url, timeout=30) as ac:
                    full = [ac.post("/v1/predict", json={"samples": samples}) for _ in range(4)]
                    single = [ac.post("/v1/predict", json={"samples": [s]}) for s in samples[:24]]
                    return await asyncio.gather(*full, *single)

            rs = asyncio.run(burst())
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
            full = [np.array(r.json()["logits"], np.float32) for r in rs[:4]]
            single = np.array([r.json()["logits"][0] for r in rs[4:]], np.float32)
            for f in full:  # a 64-sample request is a batch of its own (max_batch 64): the same numbers exactly
                assert np.array_equal(f, offline), (tables, np.abs(f - offline).max())
            np.testing.assert_allclose(single, offline[:24], rtol=1e-5, atol=1e-6)  # coalesced with others
            got[tables] = full[0]
            m = metrics(c)
            (labels, nbytes), = m["tierec_row_bytes"]
            assert labels == {"model": "ranker", "row_dtype": dt} and nbytes == RowCodec(dt, DIM).row_bytes
            if tables == "ssd":
                assert c.get("/healthz").json()["ranker"]["tables"] == "ssd"
                assert sum(v for _, v in m["tierec_cache_hits_total"]) > 0  # hits decode from the cached words
                (_, cap), = m["tierec_cache_capacity_rows"]
                assert cap == 36  # 3 % of 1200 rows
            r = c.post("/v1/predict", json={"samples": [{"s0": 300}]})  # bad input: still a 4xx naming the field
            assert r.status_code == 422 and r.json()["field"] == "samples[0].s0", r.text
            r = c.post("/v1/predict", json={"samples": [{"nope": 1}]})
            assert r.status_code == 422 and r.json()["field"] == "samples[0].nope"
    assert np.array_equal(got["ssd"], got["dram"])
    # the price of the row dtype: close to the fp32 model, not equal
    model, _, _ = load_for_eval(run["dlrm"], run["data"], "cpu")
    with torch.no_grad():
        exact = model(batch.dense, batch.sparse).numpy()
    assert not np.array_equal(offline, exact) and np.abs(offline - exact).max() < 0.05


def test_fp32_export_serves_the_checkpoints_numbers(run):
    samples, _ = _samples(run, 32)
    out = {}
    for name, path in (("checkpoint", run["dlrm"]), ("export", run["exports"]["fp32"])):
        lm = load_model(path, ServeOptions(tables="ssd", warm_rows=0, cache_fraction=0.05))
        try:
            _, batch = _samples(run, 32)
            out[name] = lm.forward(batch.dense, batch.sparse).numpy()
        finally:
            lm.close()
    assert np.array_equal(out["checkpoint"], out["export"])


def test_stored_words_pass_the_ssd_tier_and_cache_bit_for_bit(tmp_path):
    """Quantized rows travel as float32 words: copies only, so even NaN bit patterns come back unchanged."""
    codec = RowCodec("int8", 16)
    n = 500
    raw = np.random.default_rng(0).integers(0, 2**32, size=(n, codec.words), dtype=np.uint64).astype(np.uint32)
    raw[:, 0] = 0x7F800001  # signalling NaN, negative NaN, a denormal: codes that are not floats
    raw[:, 1] = 0xFF800001
    raw[:, 2] = 1
    (tmp_path / "t.rows").write_bytes(raw.tobytes())
    shared = SharedCache([SsdTable(tmp_path / "t.rows", n, codec.words, 0, readonly=True)], capacity=50,
                         admit_after=1, admit_batch=8)
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        g = torch.unique(torch.randint(0, n, (120,), generator=gen))
        got = shared.fetch_global(g)
        assert np.array_equal(got.numpy().view(np.uint32), raw[g.numpy()])
        shared.maintain()
    assert shared.hits > 0
    shared.close()
    dec = SharedCache([SsdTable(tmp_path / "t.rows", n, codec.words, 0, readonly=True)], capacity=50, codec=codec)
    g = torch.arange(0, n, 7)
    torch.testing.assert_close(dec.fetch_global(g), codec.decode(torch.from_numpy(raw[g.numpy()].view(np.float32))),
                               rtol=0, atol=0, equal_nan=True)  # random scale / bias words: some are NaN
    dec.close()


def test_corrupt_export_is_refused_with_one_line(run, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(run["exports"]["int8"], bad)
    f = bad / "tables" / "s2.rows"
    data = bytearray(f.read_bytes())
    data[1000] ^= 0x40
    f.write_bytes(bytes(data))
    for tables in ("ssd", "dram"):
        with pytest.raises(CheckpointError, match=r"s2\.rows: chunk 0 .* sha256"):
            load_model(str(bad), ServeOptions(tables=tables, warm_rows=0))
    assert main(["serve", str(bad), "--warm-rows", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tierec: error:") and "s2.rows" in err and len(err.splitlines()) == 1
    f.write_bytes(bytes(data[:-20]))  # truncated: refused even without --verify
    with pytest.raises(CheckpointError, match="bytes, expected"):
        load_model(str(bad), ServeOptions(tables="ssd", warm_rows=0, verify=False))
    shutil.copy(run["root"] / "exp-int8" / "tables" / "s2.rows", f)
    m = json.loads((bad / "export.json").read_text())
    m["row_dtype"] = "int4"  # an edited manifest
    (bad / "export.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="manifest_sha256"):
        load_model(str(bad))
    (bad / "export.json").write_text("{not json")
    assert main(["serve", str(bad)]) == 2
    assert "export.json" in capsys.readouterr().err


def test_export_cli(run, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["export", run["dlrm"], "--out", str(out), "--row-dtype", "bf16", "--no-progress"]) == 0
    assert "bf16" in capsys.readouterr().out and (out / "export.json").is_file()
    assert not list(tmp_path.glob("e.tmp-*"))  # written aside, renamed into place
    for args, what in (([run["dlrm"], "--out", str(tmp_path / "x"), "--row-dtype", "int3"], "row-dtype"),
                       ([str(tmp_path / "missing"), "--out", str(tmp_path / "y"), "--row-dtype", "int8"], "missing"),
                       ([run["dlrm"], "--out", str(out), "--row-dtype", "int8"], "--overwrite"),
                       ([run["dlrm"], "--out", run["data"], "--row-dtype", "int8", "--overwrite"], "not an export")):
        assert main(["export", *args, "--no-progress"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("tierec: error:") and what in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert main(["export", run["dlrm"], "--out", str(out), "--row-dtype", "int4", "--overwrite", "--no-progress"]) == 0
    assert json.loads((out / "export.json").read_text())["row_dtype"] == "int4"
    with pytest.raises(SystemExit) as e:  # argparse: a missing required flag
        main(["export", run["dlrm"], "--row-dtype", "int8"])
    assert e.value.code == 2


def test_row_file_opens_as_words(run):
    m = json.loads(open(f"{run['exports']['int4']}/export.json").read())
    t = m["tables"][0]
    codec = RowCodec("int4", DIM)
    f = open_row_file(Path(run["exports"]["int4"]) / t["file"], m["files"][t["file"]], codec, t["num_embeddings"])
    try:
        assert (f.dim, f.state_dim, f.row_bytes) == (codec.words, 0, codec.row_bytes)
    finally:
        f.close()


def test_dram_views_decode_what_the_fused_lookup_pools():
    """The DRAM pieces of an export: `FusedLookup` over stored words (+ codec) pools the decoded rows, as a
    float32 table of those rows does; `QuantizedMemoryView` (other models' tables) reads the same rows."""
    from tierec.inference.model_store import FusedLookup
    from tierec.inference.quantized import QuantizedMemoryView
    from tierec.sparse import KeyedJaggedTensor

    gen = torch.Generator().manual_seed(0)
    sizes, D, B = [40, 9], 10, 6
    rows = torch.randn(sum(sizes), D, generator=gen)
    for dt in ("fp16", "int8", "int4"):
        codec = RowCodec(dt, D)
        words = codec.encode(rows)
        dec = codec.decode(words)
        lengths = torch.tensor([2, 0, 1, 3, 1, 1, 1, 2, 0, 1, 1, 1])
        values = torch.cat([torch.randint(0, 40, (8,), generator=gen), torch.randint(0, 9, (6,), generator=gen)])
        kjt = KeyedJaggedTensor(["a", "b"], values, lengths, stride=B)
        q = FusedLookup(["a", "b"], sizes, [False, True], D, weight=words, codec=codec).pooled(kjt)
        ref = FusedLookup(["a", "b"], sizes, [False, True], D, weight=dec).pooled(kjt)
        torch.testing.assert_close(q, ref, rtol=1e-6, atol=1e-6)
        empty = KeyedJaggedTensor(["a", "b"], torch.zeros(0, dtype=torch.int64), torch.zeros(2 * B, dtype=torch.int64),
                                  stride=B)
        assert not bool(FusedLookup(["a", "b"], sizes, [False, True], D, weight=words, codec=codec).pooled(empty).any())
        view = QuantizedMemoryView(words, codec, 40, 9)
        ids = torch.tensor([0, 3, 8])
        ws = view.acquire(ids)
        assert torch.equal(ws.weight, dec[40 + ids]) and torch.equal(view.read_rows(0, 9)[0], dec[40:])
        with pytest.raises(RuntimeError):
            view.release(ws, dirty=True)


def test_dynamic_tables_export_with_their_id_index(tmp_path):
    """A dynamic-table checkpoint exports with its ID index: served from the export, raw IDs (known, evicted or
    never seen) score as served from the checkpoint -- exactly at fp32, within the quantization at int8 -- and a
    corrupt index file is refused with one line naming it."""
    from tierec.data.synth import SynthConfig, generate

    data = tmp_path / "data"
    generate(SynthConfig(rows=5000, num_sparse=3, cardinalities=[3000], num_dense=2, raw_ids=True, seed=3,
                         progress=False), data, progress=False)
    run = tmp_path / "run"
    Trainer(TrainConfig(data=str(data), out=str(run), batch_size=256, progress=False, num_threads=1,
                        embedding_dim=DIM, bottom_mlp=[16], top_mlp=[16], table_kind="dynamic", table_rows=700,
                        evict="lfu", decay_every=5, default_row="unknown")).fit()
    m = ckpt.read_manifest(ckpt.resolve_checkpoint(str(run)))
    assert any(k.startswith("arrays/") for k in m["files"])  # the index is in array files
    for dt in ("fp32", "int8"):
        write_export(run, tmp_path / f"e-{dt}", dt, progress=False)
    batch = next(Dataset(str(data)).batches("test", 64))
    out = {}
    for name, path in (("checkpoint", run), ("fp32", tmp_path / "e-fp32"), ("int8", tmp_path / "e-int8")):
        for tables in ("ssd", "dram"):
            lm = load_model(str(path), ServeOptions(tables=tables, warm_rows=0, cache_fraction=0.1))
            try:
                assert lm.id_maps is not None
                out[name, tables] = lm.forward(batch.dense, batch.sparse).numpy()
            finally:
                lm.close()
    for tables in ("ssd", "dram"):
        np.testing.assert_array_equal(out["fp32", tables], out["checkpoint", "ssd"])
        diff = np.abs(out["int8", tables] - out["checkpoint", "ssd"])
        assert 0 < diff.max() < 0.05
    f = next((tmp_path / "e-int8" / "arrays").iterdir())
    data_ = bytearray(f.read_bytes())
    data_[len(data_) // 2] ^= 0x01
    f.write_bytes(bytes(data_))
    with pytest.raises(CheckpointError, match=f.name):
        load_model(str(tmp_path / "e-int8"), ServeOptions(tables="dram", warm_rows=0))

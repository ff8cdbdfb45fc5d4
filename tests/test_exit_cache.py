"""Early exits (`tierec.inference.cascade`) and the result cache (`tierec.inference.result_cache`): real uvicorn
servers driven by a real httpx client, as tests/test_serve.py does."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import torch
from test_serve import metrics, serving

from tierec.cli import main
from tierec.data.dataset import Dataset
from tierec.data.synth import SynthConfig, generate
from tierec.errors import CheckpointError, ConfigError
from tierec.inference.cascade import (
    Cascade,
    DistillSettings,
    ExitHead,
    distill,
    load_exit_head,
    operating_points,
    path_flops,
    ranker_inputs,
    save_exit_head,
    split_scores,
)
from tierec.inference.features import Encoded, FeatureEncoder
from tierec.inference.model_store import ServeOptions, load_model
from tierec.inference.result_cache import ResultCache, sample_keys, take
from tierec.inference.service import ServeConfig, build_server
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer

N = 48  # test samples per request


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny data set, a DLRM with two checkpoints, an exit head distilled from the newest, test samples."""
    root = tmp_path_factory.mktemp("exit")
    data = root / "data"
    generate(SynthConfig(rows=6000, num_sparse=4, cardinalities=[800], num_dense=3, seed=3, progress=False), data,
             progress=False)
    Trainer(TrainConfig(data=str(data), out=str(root / "dlrm"), batch_size=256, progress=False, num_threads=1,
                        eval_batch_size=4096, checkpoint_every=6, keep_checkpoints=3, max_steps=12)).fit()
    lm = load_model(str(root / "dlrm"), ServeOptions(tables="dram", warm_rows=0))
    ds = Dataset(str(data))
    head = distill(lm, ds, DistillSettings(epochs=2, batch_size=512, lr=1e-2))
    save_exit_head(root / "head.pt", head)
    chunk = next(ds.chunks("test", N))
    samples = [{} for _ in range(N)]
    for j, name in enumerate(ds.schema.dense):
        for i in range(N):
            samples[i][name] = float(chunk.dense[i, j])
    for name, (v, o) in chunk.sparse.items():
        for i in range(N):
            samples[i][name] = v[o[i] : o[i + 1]].tolist()
    enc = FeatureEncoder(lm.schema).encode(samples)
    dense, kjt = enc.to_inputs(lm.schema.sparse_names)
    with torch.no_grad():
        x, z = ranker_inputs(lm, dense, kjt)
        offline_head = head(z.flatten(1)).numpy()
        offline_full = lm.model.head(x, z).numpy()
    conf = np.abs(1 / (1 + np.exp(-offline_head.astype(np.float32))) - np.float32(0.5))
    return {"root": root, "data": str(data), "dlrm": str(root / "dlrm"), "head": str(root / "head.pt"),
            "samples": samples, "lm": lm, "ds": ds, "head_model": head, "offline_head": offline_head,
            "offline_full": offline_full, "conf": conf}


def cfg(env, **kw) -> ServeConfig:
    base = dict(checkpoint=env["dlrm"], data=env["data"], tables="dram", warm_rows=0, threads=1)
    return ServeConfig(**{**base, **kw})


def post(c, samples):
    r = c.post("/v1/predict", json={"samples": samples})
    assert r.status_code == 200, r.text
    return r.json()


def test_head_file_is_verified(env, tmp_path):
    head = load_exit_head(env["head"])
    assert head.meta["step"] == env["lm"].step and head.in_features == 5 * env["lm"].lookup.dim
    for k, v in head.state_dict().items():
        assert torch.equal(v, env["head_model"].state_dict()[k])
    payload = torch.load(env["head"], weights_only=True)
    payload["state"]["net.0.bias"] = payload["state"]["net.0.bias"] + 1  # weights changed, sha256 not
    torch.save(payload, tmp_path / "tampered.pt")
    (tmp_path / "text.pt").write_text("not a head")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    for name, says in (("tampered.pt", "sha256"), ("text.pt", "not an exit head"), ("other.pt", "not an exit head"),
                       ("missing.pt", "no such file")):
        with pytest.raises(CheckpointError, match=says):
            load_exit_head(tmp_path / name)


def test_never_exit_equals_the_plain_server_bit_for_bit(env):
    with serving(build_server(cfg(env))) as c:
        plain = post(c, env["samples"])
    with serving(build_server(cfg(env, exit_head=env["head"], exit_threshold=1.0))) as c:
        never = post(c, env["samples"])
        m = metrics(c)
    assert "exit" not in plain and "cached" not in plain  # a plain server's answers are as before
    assert never["logits"] == plain["logits"] and never["probabilities"] == plain["probabilities"]
    assert never["exit"] == [False] * N
    assert np.array_equal(np.array(plain["logits"], np.float32), env["offline_full"])
    assert m["tierec_exit_samples_total"] == [({"path": "exit"}, 0.0), ({"path": "full"}, float(N))]


def test_always_exit_equals_the_head_offline(env):
    with serving(build_server(cfg(env, exit_head=env["head"], exit_threshold=0.0))) as c:
        got = post(c, env["samples"])
        m = metrics(c)
    assert got["exit"] == [True] * N
    assert np.array_equal(np.array(got["logits"], np.float32), env["offline_head"])
    full, cheap = path_flops(env["lm"].model, env["head_model"])
    assert dict((d["by"], v) for d, v in m["tierec_flops_saved_total"])["exit"] == N * (full - cheap)


def test_mixed_threshold_exits_where_the_head_is_confident(env):
    t = float(np.median(env["conf"]))
    want = env["conf"] >= t
    assert 0 < want.sum() < N
    with serving(build_server(cfg(env))) as c:
        plain = np.array(post(c, env["samples"])["logits"], np.float32)
    with serving(build_server(cfg(env, exit_head=env["head"], exit_threshold=t))) as c:
        got = post(c, env["samples"])
        m = metrics(c)
    ex = np.array(got["exit"])
    logits = np.array(got["logits"], np.float32)
    assert np.array_equal(ex, want)
    assert np.array_equal(logits[ex], env["offline_head"][ex])
    # the rest: the ranker's top on those rows alone (same float32 numbers as the plain server's whole batch,
    # up to the matmul's blocking for another number of rows)
    np.testing.assert_allclose(logits[~ex], plain[~ex], rtol=1e-6, atol=1e-6)
    lm = env["lm"]
    dense, kjt = FeatureEncoder(lm.schema).encode(env["samples"]).to_inputs(lm.schema.sparse_names)
    with torch.no_grad():
        x, z = ranker_inputs(lm, dense, kjt)
        rest = torch.from_numpy(np.flatnonzero(~want))
        exact = lm.model.head(x[rest], z[rest]).numpy()
    assert np.array_equal(logits[~ex], exact)  # exactly the ranker on the same rows
    assert m["tierec_exit_samples_total"] == [({"path": "exit"}, float(want.sum())),
                                              ({"path": "full"}, float(N - want.sum()))]
    assert m["tierec_exit_threshold"][0][1] == t


def test_operating_points_and_the_cli(env, tmp_path, capsys):
    lm, head = env["lm"], env["head_model"]
    pts = operating_points(split_scores(lm, head, env["ds"]), path_flops(lm.model, head), (0.4, 0.0))
    assert [p["threshold"] for p in pts] == [None, 0.4, 0.0]
    assert pts[0]["exit_share"] == 0 and pts[0]["auc_change"] == 0 and pts[-1]["exit_share"] == 1
    assert pts[-1]["flops_per_sample"] < pts[0]["flops_per_sample"]
    out = tmp_path / "h.pt"
    assert main(["distill-exit", env["dlrm"], "--out", str(out), "--epochs", "1", "--batch-size", "1024",
                 "--thresholds", "0.3,0", "--json", str(tmp_path / "h.json")]) == 0
    text = capsys.readouterr().out
    assert "threshold" in text and "never" in text and load_exit_head(out).meta["operating_points"]
    assert [p["threshold"] for p in json.loads((tmp_path / "h.json").read_text())["points"]] == [None, 0.3, 0.0]
    for bad, says in ((["--epochs", "0"], "--epochs"), (["--thresholds", "0.3,x"], "--thresholds"),
                      (["--thresholds", "2"], "--thresholds")):
        assert main(["distill-exit", env["dlrm"], "--out", str(out), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1


def test_result_cache_bounds_ttl_and_versions():
    now = [0.0]
    c = ResultCache(3, ttl_s=10, max_bytes=1 << 20, clock=lambda: now[0])
    keys = [bytes([i]) * 16 for i in range(5)]
    logits = np.arange(5, dtype=np.float32)
    flops = np.ones(5)
    assert c.lookup(keys[:3], "v1") == [None] * 3
    assert c.store(keys[:3], logits[:3], None, flops[:3], "v1") == 3
    assert [e.logits for e in c.lookup(keys[:1], "v1")] == [0.0]  # key 0 now most recent
    c.store(keys[3:4], logits[3:4], None, flops[3:4], "v1")  # over 3 entries: the least recent (key 1) leaves
    assert len(c) == 3 and c.lookup([keys[1]], "v1") == [None] and c.evicted["size"] == 1
    now[0] = 10.0  # every entry is 10 s old: expired
    assert c.lookup(keys[:1], "v1") == [None] and c.evicted["ttl"] == 1
    c.store(keys[:2], logits[:2], None, flops[:2], "v1")
    assert c.lookup(keys[:2], "v2") == [None, None] and len(c) == 0 and c.evicted["model"] >= 2  # a new version
    assert c.store(keys[:1], logits[:1], None, flops[:1], "v1") == 0  # computed by the old model: not kept
    c.store([keys[4]], np.array([np.inf], np.float32), None, flops[:1], "v2")  # a 422 answer: not kept
    assert c.lookup([keys[4]], "v2") == [None]
    c.store([keys[3]], np.array([1.0], np.float32), None, flops[:1], "v2")
    assert c.store([keys[3]], np.array([2.0], np.float32), None, flops[:1], "v2") == 0  # the kept answer stays
    assert c.lookup([keys[3]], "v2")[0].logits == 1.0
    small = ResultCache(100, ttl_s=10, max_bytes=2 * 240, clock=lambda: now[0])  # two entries' bytes
    small.lookup([], "v")
    small.store(keys[:4], logits[:4], None, flops[:4], "v")
    assert len(small) == 2 and small.nbytes <= 2 * 240 and small.evicted["bytes"] == 2
    with pytest.raises(ConfigError):
        ResultCache(0, 1)
    with pytest.raises(ConfigError):
        ResultCache(1, 0)


def test_keys_are_the_encoded_sample(env):
    enc = FeatureEncoder(env["lm"].schema)
    a = enc.encode([{"C1": 5, "I1": 0.0, "C2": [3, 4]}, {"C1": [7]}])
    b = enc.encode([{"C2": [3, 4], "C1": "5"}, {"C1": 7, "C3": []}])
    c = enc.encode([{"C1": 5, "C2": [4, 3]}, {"C1": 7, "I2": 1.0}])
    ka, kb, kc = (sample_keys(e, env["lm"].schema.sparse_names) for e in (a, b, c))
    assert ka == kb and ka[0] != kc[0] and ka[1] != kc[1] and ka[0] != ka[1]
    part = take(a, np.array([1]))
    assert isinstance(part, Encoded) and len(part) == 1
    assert sample_keys(part, env["lm"].schema.sparse_names) == ka[1:]


def test_cached_answers_are_identical_and_a_new_model_invalidates(env):
    app = build_server(cfg(env, result_cache_size=1000, exit_head=env["head"],
                           exit_threshold=float(np.median(env["conf"]))))
    with serving(app) as c:
        first = post(c, env["samples"])
        assert first["cached"] == [False] * N
        again = post(c, env["samples"])
        assert again["cached"] == [True] * N
        assert again["logits"] == first["logits"] and again["exit"] == first["exit"] and again["step"] == first["step"]
        mixed = env["samples"][:8] + [{"C1": 3}]  # 8 hits and one miss, in one answer
        got = post(c, mixed)
        assert got["cached"] == [True] * 8 + [False] and got["logits"][:8] == first["logits"][:8]
        m = metrics(c)
        look = dict((d["result"], v) for d, v in m["tierec_result_cache_lookups_total"])
        assert look == {"hit": N + 8, "miss": N + 1}
        assert m["tierec_result_cache_entries"][0][1] == N + 1
        saved = dict((d["by"], v) for d, v in m["tierec_flops_saved_total"])
        assert saved["result_cache"] > 0 and saved["exit"] > 0
        older = load_model(env["dlrm"] + "/checkpoints/step-00000006", ServeOptions(tables="dram", warm_rows=0))
        app.state.store.swap(older)  # a reload: every kept answer belongs to the model that left
        after = post(c, env["samples"])
        assert after["step"] == 6 and after["cached"] == [False] * N and after["logits"] != first["logits"]
        m = metrics(c)
        assert dict((d["reason"], v) for d, v in m["tierec_result_cache_evictions_total"])["model"] == N + 1


def test_concurrent_requests_with_exits_and_the_cache(env):
    t = float(np.median(env["conf"]))
    with serving(build_server(cfg(env, exit_head=env["head"], exit_threshold=t, result_cache_size=64,
                                  max_wait_ms=20))) as c:
        rng = np.random.default_rng(0)
        picks = rng.integers(0, 12, 120)  # 120 one-sample requests over 12 distinct samples: repeats

        async def burst():
            async with httpx.AsyncClient(base_url=c.url, timeout=60) as ac:
                return await asyncio.gather(*(ac.post("/v1/predict", json={"samples": [env["samples"][i]]})
                                              for i in picks))

        rs = asyncio.run(burst())
        m = metrics(c)
    assert all(r.status_code == 200 for r in rs)
    want = env["conf"] >= t
    for i, r in zip(picks, rs, strict=True):
        body = r.json()
        assert body["exit"] == [bool(want[i])]
        # the same sample in batches of other sizes: the matmuls may round in another order
        want_logit = env["offline_head"][i] if want[i] else env["offline_full"][i]
        np.testing.assert_allclose(body["logits"][0], want_logit, rtol=1e-5, atol=1e-6)
    look = dict((d["result"], v) for d, v in m["tierec_result_cache_lookups_total"])
    assert look["hit"] + look["miss"] == 120 and look["hit"] > 0
    by_sample: dict[int, set] = {}
    for i, r in zip(picks, rs, strict=True):
        if r.json()["cached"] == [True]:
            by_sample.setdefault(int(i), set()).add(r.json()["logits"][0])
    assert all(len(v) == 1 for v in by_sample.values())  # a hit is one kept answer


def test_bad_requests_get_4xx(env):
    with serving(build_server(cfg(env, exit_head=env["head"], exit_threshold=0.3, result_cache_size=10,
                                  max_batch=64))) as c:
        r = c.post("/v1/predict", content=b"{bad", headers={"content-type": "application/json"})
        assert r.status_code == 400
        for body, code, field in (({"samples": [{"C99": 1}]}, 422, "samples[0].C99"),
                                  ({"samples": [{"C1": 10**6}]}, 422, "samples[0].C1"),
                                  ({"samples": [{}] * 65}, 413, "samples"), ({"samples": []}, 422, "samples"),
                                  ({"samples": [{"I1": 1e39}]}, 422, "samples[0].I1")):
            r = c.post("/v1/predict", json=body)
            assert r.status_code == code and r.json()["field"] == field, r.text
        assert post(c, env["samples"][:2])["cached"] == [False, False]  # still serving


@pytest.mark.parametrize("flags, says", [
    (["--exit-threshold", "0.3"], "--exit-threshold needs --exit-head"),
    (["--exit-head", "HEAD", "--exit-threshold", "1.5"], "--exit-threshold must be in [0, 1]"),
    (["--exit-head", "MISSING"], "no such file"),
    (["--exit-head", "OTHER"], "inputs"),
    (["--result-cache-size", "-1"], "--result-cache-size"),
    (["--result-cache-size", "5", "--result-cache-ttl", "0"], "--result-cache-ttl"),
    (["--result-cache-bytes", "10"], "--result-cache-bytes"),
])
def test_bad_flags_exit_2_with_one_line(env, tmp_path, capsys, flags, says):
    other = tmp_path / "other.pt"
    save_exit_head(other, ExitHead(7))
    subst = {"HEAD": env["head"], "MISSING": str(tmp_path / "missing.pt"), "OTHER": str(other)}
    argv = ["serve", env["dlrm"], "--tables", "dram", "--warm-rows", "0", "--port", "0",
            *[subst.get(f, f) for f in flags]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


def test_cascade_forward_rows_match_their_paths(env):
    lm, head = env["lm"], env["head_model"]
    dense, kjt = FeatureEncoder(lm.schema).encode(env["samples"]).to_inputs(lm.schema.sparse_names)
    for t in (0.0, float(np.median(env["conf"])), 0.5000001, 1.0):
        cas = Cascade(head, t)
        logits, ex = cas.forward(lm, dense, kjt)
        assert np.array_equal(ex.numpy(), env["conf"] >= t)
        assert np.array_equal(logits.numpy()[ex.numpy()], env["offline_head"][ex.numpy()])
        if not ex.any():
            assert torch.equal(logits, lm.forward(dense, kjt))
    with pytest.raises(ConfigError):
        Cascade(head, 1.5)


def test_every_serve_flag_has_help_text():
    from dataclasses import fields

    from tierec.cli.serve import HELP

    assert [f.name for f in fields(ServeConfig) if f.name != "checkpoint" and not HELP.get(f.name)] == []


def test_dcnv2_exits_skip_the_cross_network(env, tmp_path):
    Trainer(TrainConfig(data=env["data"], out=str(tmp_path / "dcn"), model="dcnv2", batch_size=512, progress=False,
                        num_threads=1, eval_batch_size=4096, max_steps=4, cross_layers=2)).fit()
    lm = load_model(str(tmp_path / "dcn"), ServeOptions(tables="dram", warm_rows=0))
    head = distill(lm, env["ds"], DistillSettings(epochs=1, batch_size=1024))
    dense, kjt = FeatureEncoder(lm.schema).encode(env["samples"]).to_inputs(lm.schema.sparse_names)
    with torch.no_grad():
        x, z = ranker_inputs(lm, dense, kjt)
        cheap = head(z.flatten(1))
        conf = (torch.sigmoid(cheap) - 0.5).abs()
    full, exit_flops = path_flops(lm.model, head)
    assert exit_flops < full  # the cross network and the top MLP are what an exit skips
    never, _ = Cascade(head, 1.0).forward(lm, dense, kjt)
    assert torch.equal(never, lm.forward(dense, kjt))
    t = float(conf.median())
    logits, ex = Cascade(head, t).forward(lm, dense, kjt)
    assert torch.equal(ex, conf >= t) and 0 < int(ex.sum()) < N
    assert torch.equal(logits[ex], cheap[ex])
    rest = (~ex).nonzero().squeeze(1)
    with torch.no_grad():
        assert torch.equal(logits[~ex], lm.model.head(x[rest], z[rest]))

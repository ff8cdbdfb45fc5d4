"""`tierec serve`: a real uvicorn server on an ephemeral localhost port, driven by a real httpx client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from conftest import json_samples
from prometheus_client.parser import text_string_to_metric_families

from tierec.cli import main
from tierec.data.dataset import Dataset
from tierec.data.synth import SynthConfig, generate
from tierec.inference.service import ServeConfig, build_server
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer, load_for_eval

CARD = 1500


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny session data set (C1, C2 user-side), a DLRM with two checkpoints and a two-tower model."""
    root = tmp_path_factory.mktemp("serve")
    data = root / "data"
    generate(SynthConfig(rows=8000, num_sparse=5, cardinalities=[CARD], num_dense=3, session_length=4,
                         user_features=2, seed=1, progress=False), data, progress=False)
    common = dict(data=str(data), batch_size=256, progress=False, num_threads=1, eval_batch_size=4096)
    Trainer(TrainConfig(out=str(root / "dlrm"), checkpoint_every=20, keep_checkpoints=3, **common)).fit()
    Trainer(TrainConfig(out=str(root / "tt"), model="two-tower", **common)).fit()
    return {"root": root, "data": str(data), "dlrm": str(root / "dlrm"), "tt": str(root / "tt")}


@contextlib.contextmanager
def serving(app):
    """Run ``app`` on uvicorn in a thread on a free localhost port; yields an httpx client."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert t.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            c.url = url
            yield c
    finally:
        server.should_exit = True
        t.join(30)
        sock.close()


def config(runs, **kw) -> ServeConfig:
    """Tables in DRAM unless a test is about the SSD tier (each SSD warm-up counts in a child process)."""
    base = dict(checkpoint=runs["dlrm"], data=runs["data"], tables="dram", warm_rows=0, corpus_rows=3000, threads=1)
    return ServeConfig(**{**base, **kw})


def test_samples(runs, n=64):
    """The first n test rows as JSON samples, and the offline model's logits for them (one batch)."""
    ds = Dataset(runs["data"])
    batch = next(ds.batches("test", n))
    model, _, _ = load_for_eval(runs["dlrm"], runs["data"], "cpu")
    with torch.no_grad():
        offline = model(batch.dense, batch.sparse).numpy()
    samples = json_samples(ds.schema, batch)
    return samples, offline


test_samples.__test__ = False


def metrics(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_predict_equals_offline_dram_and_ssd(runs):
    samples, offline = test_samples(runs)
    got = {}
    for tables in ("dram", "ssd"):
        with serving(build_server(config(runs, tables=tables, cache_fraction=0.02, warm_rows=2000))) as c:
            r = c.post("/v1/predict", json={"samples": samples})
            assert r.status_code == 200, r.text
            got[tables] = np.array(r.json()["logits"], np.float32)
            again = np.array(c.post("/v1/predict", json={"samples": samples}).json()["logits"], np.float32)
            assert np.array_equal(again, got[tables])  # second pass: served from the warmer cache
            if tables == "ssd":
                m = metrics(c)
                assert sum(v for _, v in m["tierec_cache_lookups_total"]) > 0
                assert sum(v for _, v in m["tierec_ssd_read_bytes_total"]) > 0
                lookups = sum(v for _, v in m["tierec_cache_lookups_total"])
                hits = sum(v for _, v in m["tierec_cache_hits_total"])
                assert lookups - hits > sum(v for _, v in m["tierec_cache_admitted_total"])  # one-offs not admitted
    assert np.array_equal(got["dram"], offline)  # exact: same rows, same batch
    assert np.array_equal(got["ssd"], got["dram"])


def test_ids_are_encoded_as_the_data_set_encoded_them(runs):
    """A synthetic data set's IDs are rows (encoding identity): an integer (or its decimal text) in the
    table is the row, anything else is refused naming the field, never hashed somewhere else. Hashed
    encodings are covered by test_serve_trust.py's raw round trip."""
    with serving(build_server(config(runs, tables="dram"))) as c:
        def post(v):
            return c.post("/v1/predict", json={"samples": [{"C3": v}]})

        assert post(5).json()["logits"] == post("5").json()["logits"]
        assert post(5).json()["logits"] != post(6).json()["logits"]
        for bad in (CARD + 12345, -7, CARD, "a4f1"):
            r = post(bad)
            assert r.status_code == 422 and r.json()["field"] == "samples[0].C3", r.text
            assert "identity" in r.json()["error"] or "not a row" in r.json()["error"]


def test_concurrent_requests_are_batched(runs):
    samples, _ = test_samples(runs, 24)
    with serving(build_server(config(runs, max_wait_ms=100, max_batch=64))) as c:
        single = [c.post("/v1/predict", json={"samples": [s]}).json()["logits"][0] for s in samples]
        before = metrics(c)

        async def burst():
            async with httpx.AsyncClient(base_url=c.url, timeout=30) as ac:
                rs = await asyncio.gather(*(ac.post("/v1/predict", json={"samples": [s]}) for s in samples))
            return [r.json()["logits"][0] for r in rs]

        together = asyncio.run(burst())
        m = metrics(c)
    calls = m["tierec_batch_size_count"][0][1] - before["tierec_batch_size_count"][0][1]
    scored = m["tierec_batch_size_sum"][0][1] - before["tierec_batch_size_sum"][0][1]
    assert scored == len(samples)
    assert calls < len(samples)  # coalesced: fewer model calls than requests
    np.testing.assert_allclose(together, single, rtol=1e-5, atol=1e-6)  # each answer is its own sample's


BAD_PREDICT = [
    ({"samples": [{"C99": 1}]}, 422, "samples[0].C99"),  # unknown feature
    ({"samples": [{"I1": 1.0}, {"I2": "high"}]}, 422, "samples[1].I2"),  # dense given a string
    ({"samples": [{"C1": [3, 1.5]}]}, 422, "samples[0].C1[1]"),  # an ID that is a float
    ({"samples": [{"C1": True}]}, 422, "samples[0].C1"),
    ({"samples": [{"C1": {"a": 1}}]}, 422, "samples[0].C1"),
    ({"samples": [{"C1": 2**70}]}, 422, "samples[0].C1"),
    ({"samples": [{"C2": list(range(300))}]}, 422, "samples[0].C2"),  # too many values
    ({"samples": [{}] * 65}, 413, "samples"),  # oversized batch
    ({"samples": []}, 422, "samples"),
    ({"samples": [7]}, 422, "samples[0]"),
    ({"samples": "x"}, 422, "samples"),
    ({"rows": []}, 422, "samples"),
]


def test_bad_input_gets_4xx_json_naming_the_field(runs):
    with serving(build_server(config(runs, retriever=runs["tt"], max_batch=64, max_ids=256))) as c:
        for body, status, field in BAD_PREDICT:
            r = c.post("/v1/predict", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["field"] == field, (body, r.text)
        r = c.post("/v1/predict", content=b'{"samples": [', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["field"] == "body" and "JSON" in r.json()["error"]
        for body, field in [({"user": {"C3": 1}}, "user.C3"),  # an item-side feature in a user
                            ({"user": {"C1": "x"}, "k": 0}, "k"),
                            ({"user": {"C1": 1}, "k": 5000}, "k"),
                            ({"user": {"C1": 1}, "k": 20, "candidates": 10}, "candidates"),
                            ({"user": [1]}, "user"),
                            ({"user": {"C1": None}}, "user.C1")]:
            r = c.post("/v1/recommend", json=body)
            assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)
        assert c.get("/v1/nothing").status_code == 404
        assert c.get("/v1/predict").status_code == 405
        # still serving
        assert c.get("/healthz").json()["status"] == "ok"
        assert c.post("/v1/predict", json={"samples": [{"C1": 1}]}).status_code == 200
        codes = {tuple(sorted(lab.items())): v for lab, v in metrics(c)["tierec_requests_total"]}
        assert codes[(("code", "422"), ("endpoint", "/v1/predict"))] >= 10
        assert not any(lab[1][1].startswith("5") for lab in codes)


def test_reload_under_load_drops_no_request(runs, monkeypatch):
    ckpts = sorted((runs["root"] / "dlrm" / "checkpoints").glob("step-*"))
    assert len(ckpts) >= 2
    first, last = str(ckpts[0]), int(ckpts[-1].name.split("-")[1])
    samples, _ = test_samples(runs, 8)
    token = "reload-token-0123456789"
    monkeypatch.setenv("TIEREC_ADMIN_TOKEN", token)
    auth = {"authorization": f"Bearer {token}"}
    with serving(build_server(config(runs, checkpoint=first, tables="ssd", max_wait_ms=1, admin=True))) as c:
        start = c.get("/healthz").json()["ranker"]["step"]

        async def load():
            async with httpx.AsyncClient(base_url=c.url, timeout=60) as ac:
                stop = asyncio.Event()

                async def client():
                    out = []
                    while not stop.is_set():
                        r = await ac.post("/v1/predict", json={"samples": samples})
                        out.append((r.status_code, r.json().get("step")))
                    return out

                tasks = [asyncio.create_task(client()) for _ in range(6)]
                await asyncio.sleep(0.3)
                rr = await ac.post("/v1/admin/reload", json={"checkpoint": runs["dlrm"]}, headers=auth)
                await asyncio.sleep(0.3)
                stop.set()
                return rr, [x for t in tasks for x in await t]

        rr, results = asyncio.run(load())
        assert rr.status_code == 200, rr.text
        assert rr.json()["ranker"]["step"] == last and rr.json()["reloads"] == 1
        assert all(code == 200 for code, _ in results), {code for code, _ in results}
        steps = [s for _, s in results]
        assert start in steps and last in steps and start != last
        # inside the admin root (the startup checkpoint's run directory): a specific error; outside: 403
        r = c.post("/v1/admin/reload", json={"checkpoint": str(runs["root"] / "dlrm" / "nope")}, headers=auth)
        assert r.status_code == 409 and "nope" in r.json()["error"], r.text
        assert c.post("/v1/admin/reload", json={"checkpoint": runs["tt"]}, headers=auth).status_code == 403
        assert c.post("/v1/admin/reload", json={"checkpoint": runs["dlrm"]}).status_code == 401


def test_recommend_ranks_retrieved_items(runs):
    with serving(build_server(config(runs, retriever=runs["tt"], index_dir=str(runs["root"] / "index"),
                                     index_on_disk=True))) as c:
        r = c.post("/v1/recommend", json={"user": {"C1": 17, "C2": [4], "I1": 0.5}, "k": 5, "candidates": 50})
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert len(items) == 5 and len({it["item"] for it in items}) == 5
        scores = [it["score"] for it in items]
        assert scores == sorted(scores, reverse=True)
        # each score is the ranker's probability for (user features + the item's features)
        top = items[0]
        sample = {"C1": 17, "C2": [4], "I1": 0.5, **top["features"]}
        p = c.post("/v1/predict", json={"samples": [sample]}).json()["probabilities"][0]
        assert p == pytest.approx(top["score"], rel=1e-5)
        assert c.get("/healthz").json()["retriever"]["items"] > 100
    assert (runs["root"] / "index" / "index.json").exists()


def test_metrics_are_prometheus_text(runs):
    with serving(build_server(config(runs, tables="ssd"))) as c:
        c.post("/v1/predict", json={"samples": [{"C1": 1}, {"C1": 2}]})
        m = metrics(c)
    for name in ("tierec_requests_total", "tierec_request_seconds_bucket", "tierec_batch_size_bucket",
                 "tierec_cache_hit_ratio", "tierec_ssd_read_bytes_total", "tierec_energy_joules_total",
                 "tierec_model_step", "process_resident_memory_bytes", "tierec_model_seconds_bucket",
                 "tierec_ssd_read_seconds_bucket"):
        assert name in m, name
    assert 0 <= m["tierec_cache_hit_ratio"][0][1] <= 1
    count = {k: m[k][0][1] for k in ("tierec_model_seconds_count", "tierec_ssd_read_seconds_count")}
    assert count == {"tierec_model_seconds_count": 1, "tierec_ssd_read_seconds_count": 1}  # one batch
    assert 0 < m["tierec_ssd_read_seconds_sum"][0][1] <= m["tierec_model_seconds_sum"][0][1]  # cold cache: reads


def test_openapi_schema_documents_the_endpoints(runs, monkeypatch):
    monkeypatch.setenv("TIEREC_ADMIN_TOKEN", "openapi-token-0123456789")
    with serving(build_server(config(runs, tables="dram", admin=True))) as c:
        paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/recommend", "/healthz", "/metrics", "/v1/admin/reload"} <= set(paths)
    body = paths["/v1/admin/reload"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"checkpoint", "retriever"}


def test_serve_cli_rejects_bad_settings(runs, capsys):
    assert main(["serve", runs["dlrm"], "--cache-fraction", "2"]) == 2
    assert "cache_fraction" in capsys.readouterr().err
    assert main(["serve", str(runs["root"] / "missing")]) == 2
    assert main(["serve", runs["dlrm"], "--index-on-disk"]) == 2


def test_tierec_serve_command_serves_until_interrupted(runs):
    """The real command line: a `tierec serve` process answers, then stops cleanly on SIGINT."""
    import signal
    import subprocess
    import sys

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([sys.executable, "-m", "tierec", "serve", runs["dlrm"], "--port", str(port),
                             "--tables", "ssd", "--warm-rows", "0", "--data", runs["data"]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "tierec serve did not come up"
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert r.json()["ranker"]["tables"] == "ssd"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"samples": [{"C1": 3}]})
        assert r.status_code == 200 and 0 < r.json()["probabilities"][0] < 1
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0

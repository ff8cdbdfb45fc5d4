"""`tierec serve` under hostile or careless clients (issue #16): admin auth and path confinement,
loopback binding, one bad request never failing its batch, body and ID size limits, the event loop
staying free while a large request is encoded. Real uvicorn servers, real HTTP (tests/test_serve.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from test_serve import config, runs, serving, test_samples  # noqa: F401 -- `runs` is a fixture
from tierec.cli import main
from tierec.data.dataset import Dataset
from tierec.errors import ConfigError
from tierec.inference.service import ServeConfig, build_server
from tierec.inference.features import FeatureEncoder, InputError

TOKEN = "s3cret-token-0123456789abcdef"


def post_json(client, path: str, body, **kw) -> httpx.Response:
    """JSON with \\u escapes (json.dumps' default), so lone surrogates survive the client."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json", **kw})


def admin_config(runs, tmp_path, **kw) -> ServeConfig:
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    return config(runs, admin=True, admin_token_file=str(f), **kw)


def reload(c, body, token=TOKEN) -> httpx.Response:
    return post_json(c, "/v1/admin/reload", body, **({"authorization": f"Bearer {token}"} if token else {}))


# ------------------------------------------------------------------------------------------------ admin

def test_admin_route_is_absent_unless_enabled(runs):
    with serving(build_server(config(runs))) as c:
        r = reload(c, {"checkpoint": runs["dlrm"]})
        assert r.status_code == 404, r.text
        assert r.json() == c.post("/v1/nothing").json()  # as if it did not exist
        assert "/v1/admin/reload" not in c.get("/openapi.json").json()["paths"]
        assert c.get("/healthz").json()["reloads"] == 0


def test_admin_without_a_token_is_a_startup_error(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TIEREC_ADMIN_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="token"):
        build_server(config(runs, admin=True))
    assert main(["serve", runs["dlrm"], "--admin", "--tables", "dram", "--warm-rows", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TIEREC_ADMIN_TOKEN" in err and "--admin-token-file" in err
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="token"):
        build_server(config(runs, admin=True, admin_token_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="token"):
        build_server(config(runs, admin=True, admin_token_file=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="--admin"):
        config(runs, admin_root=[str(tmp_path)])  # admin flags without --admin


def test_admin_needs_the_bearer_token(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("TIEREC_ADMIN_TOKEN", TOKEN)
    with serving(build_server(config(runs, admin=True))) as c:
        for token in (None, "wrong-token-0123456789abcdef", TOKEN + "x", TOKEN[:-1]):
            r = reload(c, {"checkpoint": runs["dlrm"]}, token=token)
            assert r.status_code == 401, (token, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
        for header in (f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN} x", "Bearer", b"Bearer " + b"\xe9" * 30):
            r = post_json(c, "/v1/admin/reload", {}, authorization=header)
            assert r.status_code == 401, (header, r.text)
        # nothing about the body or the paths is looked at before the token is checked
        r = c.post("/v1/admin/reload", content=b'{"checkpoint": ', headers={"content-type": "application/json"})
        assert r.status_code == 401 and set(r.json()) == {"error", "field"}
        r = reload(c, {"checkpoint": "/etc"}, token=None)
        assert r.status_code == 401 and "etc" not in r.text
        assert c.get("/healthz").json()["reloads"] == 0
        r = reload(c, {"checkpoint": runs["dlrm"]})
        assert r.status_code == 200, r.text
        assert r.json()["reloads"] == 1
        r = c.post("/v1/admin/reload", content=b'{"checkpoint": ', headers={
            "content-type": "application/json", "authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 400 and r.json()["field"] == "body"
        assert reload(c, {"checkpoint": 7}).status_code == 422
    with serving(build_server(admin_config(runs, tmp_path))) as c:  # the token from a file
        assert reload(c, {}, token="x" * 30).status_code == 401
        assert reload(c, {}).status_code == 200


def test_admin_reload_paths_are_confined_to_the_roots(runs, tmp_path):
    ckpts = sorted((runs["root"] / "dlrm" / "checkpoints").glob("step-*"))
    with serving(build_server(admin_config(runs, tmp_path, checkpoint=str(ckpts[0])))) as c:
        # default root: the run directory of the startup checkpoint
        outside = [runs["tt"],  # a real checkpoint, outside the run directory
                   str(runs["root"] / "nope"),  # does not exist
                   "/etc", "/", str(runs["root"] / "dlrm" / ".." / "tt"), "\x00"]
        answers = {reload(c, {"checkpoint": p}).status_code for p in outside}
        assert answers == {403}
        bodies = {(reload(c, {"checkpoint": p}).json()["error"]) for p in outside[:2]}
        assert len(bodies) == 1  # same message whether or not the path exists
        assert reload(c, {"retriever": runs["tt"]}).status_code == 403
        r = reload(c, {"checkpoint": str(runs["root"] / "dlrm" / "nope")})  # inside: specific
        assert r.status_code == 409 and "nope" in r.json()["error"], r.text
        assert c.get("/healthz").json()["reloads"] == 0
        r = reload(c, {"checkpoint": str(ckpts[-1])})
        assert r.status_code == 200, r.text

    # explicit roots; symlinks are resolved before the check
    models = tmp_path / "models"
    (models / "run" / "checkpoints").mkdir(parents=True)
    copy_with_chain(ckpts[-1], models / "run" / "checkpoints")
    (models / "run" / "checkpoints" / "LATEST").write_text(ckpts[-1].name)
    (models / "escape").symlink_to(runs["root"] / "dlrm")  # inside by name, outside in fact
    (models / "sneaky" / "checkpoints").mkdir(parents=True)
    (models / "sneaky" / "checkpoints" / ckpts[0].name).symlink_to(ckpts[0])  # LATEST leads out
    (models / "sneaky" / "checkpoints" / "LATEST").write_text(ckpts[0].name)
    (models / "inside").symlink_to(models / "run")  # a link that stays inside is fine
    with serving(build_server(admin_config(runs, tmp_path, admin_root=[str(models)]))) as c:
        for p in (models / "escape", models / "escape" / "checkpoints", models / "sneaky", runs["dlrm"]):
            r = reload(c, {"checkpoint": str(p)})
            assert r.status_code == 403 and r.json()["field"] == "checkpoint", (p, r.text)
        for p in (models / "run", models / "inside"):
            r = reload(c, {"checkpoint": str(p)})
            assert r.status_code == 200, (p, r.text)
        r = reload(c, {})  # no path: the startup checkpoint, wherever the roots are
        assert r.status_code == 200, r.text


def test_remote_host_is_refused_unless_allowed(runs, capsys, caplog):
    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost"):
        ServeConfig(checkpoint=runs["dlrm"], host=host)
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com", ""):
        with pytest.raises(ConfigError, match="--allow-remote"):
            ServeConfig(checkpoint=runs["dlrm"], host=host)
    assert main(["serve", runs["dlrm"], "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-remote" in err and "0.0.0.0" in err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--allow-remote" in out and "loopback" in out
    with caplog.at_level(logging.WARNING, logger="tierec"):
        build_server(config(runs, host="0.0.0.0", allow_remote=True))
    assert any("reachable from the network" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------ bad samples

def test_encoder_rows_are_checked_and_empty_strings_are_missing(runs, monkeypatch):
    from tierec.inference import features

    enc = FeatureEncoder(Dataset(runs["data"]).schema)
    a = enc.encode([{"C1": ["", 5, ""], "C2": ""}, {"C1": [5]}])
    rows, lengths = a.sparse["C1"]
    assert rows.tolist() == [5, 5] and lengths.tolist() == [1, 1]
    assert a.sparse["C2"][1].tolist() == [0, 0]  # "" alone: an empty bag, as training reads Criteo's ""
    def broken(values, encoding, n):  # an encoder bug that puts the second ID outside the table
        rows = np.arange(len(values), dtype=np.int64) * n
        return rows, np.zeros(len(values), bool)

    monkeypatch.setattr(features, "encode_request_ids", broken)
    with pytest.raises(InputError) as e:
        enc.encode([{"C1": 1}, {"C1": 2, "C2": [3, "7"]}])
    assert e.value.field == "samples[1].C1" and "outside [0, 1500)" in e.value.message


BAD_SAMPLES = [  # (sample, status, field, text in the error)
    ({"C1": "\ud800"}, 422, "samples[0].C1", "Unicode"),
    ({"C2": [1, "ok", "\udfff"]}, 422, "samples[0].C2[2]", "Unicode"),
    ({"I1": 10**400}, 422, "samples[0].I1", "float32"),
    ({"I1": -(10**400)}, 422, "samples[0].I1", "float32"),
    ({"I1": 1e39}, 422, "samples[0].I1", "float32"),
    ({"I2": -3.5e38}, 422, "samples[0].I2", "float32"),
    ({"C1": "a" * 257}, 422, "samples[0].C1", "bytes"),
    ({"C2": [3, "é" * 129]}, 422, "samples[0].C2[1]", "bytes"),  # 258 UTF-8 bytes
    ({"\ud800": 1}, 422, "samples[0].\ud800", "unknown feature"),
    ({"I1": 3.4e38, "I2": -3.4e38, "I3": 3.4e38}, 422, "samples[0]", "finite"),  # float32, but the model overflows
]


def test_bad_samples_get_4xx_naming_the_field(runs):
    with serving(build_server(config(runs))) as c:
        for sample, status, field, text in BAD_SAMPLES:
            r = post_json(c, "/v1/predict", {"samples": [sample]})
            assert r.status_code == status, (sample, r.text)
            assert r.json()["field"] == field and text in r.json()["error"], (sample, r.text)
        ok = post_json(c, "/v1/predict", {"samples": [{"I1": 3.4e38, "C1": 5}]})
        assert ok.status_code == 200 and np.isfinite(ok.json()["probabilities"][0]), ok.text
    schema = Dataset(runs["data"]).schema  # synthetic IDs are rows; a hashed feature takes any text up to the limit
    hashed = dataclasses.replace(schema, sparse=[dataclasses.replace(f, encoding="hash-string") for f in schema.sparse])
    assert FeatureEncoder(hashed).encode([{"C1": "a" * 256}]).sparse["C1"][1].tolist() == [1]


def test_one_bad_request_never_fails_its_batch(runs):
    samples, _ = test_samples(runs, 30)
    with serving(build_server(config(runs, max_wait_ms=50, max_batch=256))) as c:
        alone = [c.post("/v1/predict", json={"samples": [s]}).json()["logits"][0] for s in samples]
        missing = c.post("/v1/predict", json={"samples": [{"I1": 0.5}]}).json()["logits"][0]

        async def burst(bad):
            async with httpx.AsyncClient(base_url=c.url, timeout=60) as ac:
                reqs = [ac.post("/v1/predict", json={"samples": [s]}) for s in samples]
                reqs.insert(len(reqs) // 2, ac.post("/v1/predict", content=json.dumps({"samples": [bad]}),
                                                    headers={"content-type": "application/json"}))
                return await asyncio.gather(*reqs)

        cases = [({"I1": 0.5, "C1": ""}, 200), ({"I1": 0.5, "C2": ["", ""]}, 200)] + [
            (s, status) for s, status, _, _ in BAD_SAMPLES]
        for bad, status in cases:
            rs = asyncio.run(burst(bad))
            bad_r = rs.pop(len(rs) // 2)
            assert [r.status_code for r in rs] == [200] * len(samples), (bad, [r.text for r in rs][:3])
            assert [r.json()["logits"][0] for r in rs] == pytest.approx(alone, rel=1e-5, abs=1e-6)
            assert bad_r.status_code == status, (bad, bad_r.text)
            if status == 200:  # "" is a missing value: the same score as leaving the feature out
                assert bad_r.json()["logits"][0] == pytest.approx(missing, rel=1e-5, abs=1e-6)


def test_a_failing_model_call_fails_only_its_request(runs, caplog):
    samples, _ = test_samples(runs, 20)
    app = build_server(config(runs, max_wait_ms=100, max_batch=256))
    run = app.state.batcher.run

    def flaky(payloads):
        if any(float(p.dense[0, 0]) == 777.0 for p in payloads):
            raise RuntimeError("marked payload")
        return run(payloads)

    app.state.batcher.run = flaky
    with serving(app) as c:
        alone = [c.post("/v1/predict", json={"samples": [s]}).json()["logits"][0] for s in samples]

        async def burst():
            async with httpx.AsyncClient(base_url=c.url, timeout=60) as ac:
                reqs = [ac.post("/v1/predict", json={"samples": [s]}) for s in samples]
                reqs.insert(7, ac.post("/v1/predict", json={"samples": [{"I1": 777.0}]}))
                return await asyncio.gather(*reqs)

        with caplog.at_level(logging.ERROR):
            rs = asyncio.run(burst())
        bad = rs.pop(7)
        assert bad.status_code == 500 and bad.json() == {"error": "internal server error"}
        assert [r.status_code for r in rs] == [200] * len(samples), [r.text for r in rs][:3]
        assert [r.json()["logits"][0] for r in rs] == pytest.approx(alone, rel=1e-5, abs=1e-6)
        assert any("marked payload" in (r.exc_text or "") + r.getMessage() for r in caplog.records)
        assert c.get("/healthz").status_code == 200


# ------------------------------------------------------------------------------------- big requests

def _raw_request(url: str, head: str, body: bytes, wait_s: float = 10) -> bytes:
    """Send ``head`` and a *partial* ``body`` on a raw socket; what the server answers meanwhile."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        s.sendall(head.encode() + body)
        out = b""
        try:
            while b"\r\n\r\n" not in out or not out.rstrip().endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
        return out


def test_oversized_body_gets_413_before_it_is_read(runs):
    limit = 64 * 1024
    with serving(build_server(config(runs, max_body_bytes=limit))) as c:
        # Content-Length over the limit: refused up front, the body never sent
        head = (f"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                f"content-length: {100 * limit}\r\n\r\n")
        out = _raw_request(c.url, head, b'{"samples": [')
        assert out.startswith(b"HTTP/1.1 413"), out[:200]
        assert json.loads(out.split(b"\r\n\r\n", 1)[1]) == {
            "error": f"request body over {limit} bytes (--max-body-bytes)", "field": "body"}
        # chunked (no Content-Length): refused once the count passes the limit, the rest never awaited
        head = ("POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                "transfer-encoding: chunked\r\n\r\n")
        chunk = b"x" * 16384
        out = _raw_request(c.url, head, (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 8)
        assert out.startswith(b"HTTP/1.1 413"), out[:200]
        assert b'"field":"body"' in out
        # ordinary clients get the same answers, with and without Content-Length
        r = c.post("/v1/predict", content=b"x" * (8 << 20), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["field"] == "body", r.text

        def gen():
            for _ in range(8 << 20 >> 16):
                yield b"y" * 65536

        r = c.post("/v1/predict", content=gen(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["field"] == "body", r.text
        r = c.post("/v1/predict", json={"samples": [{"C1": 1}]})  # the connection and server still serve
        assert r.status_code == 200, r.text
        samples, _ = test_samples(runs, 64)
        assert len(json.dumps({"samples": samples})) < limit
        assert c.post("/v1/predict", json={"samples": samples}).status_code == 200


def test_oversized_body_does_not_grow_the_servers_memory(runs):
    """A `tierec serve` process: a 64 MiB chunked body leaves its peak RSS (VmHWM) where it was."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([sys.executable, "-m", "tierec", "serve", runs["dlrm"], "--port", str(port),
                             "--tables", "dram", "--warm-rows", "0", "--data", runs["data"]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def hwm() -> int:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1]) * 1024

    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "tierec serve did not come up"
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        httpx.post(f"{url}/v1/predict", json={"samples": [{"C1": 1}]})
        before = hwm()

        def gen():
            for _ in range(64 << 20 >> 16):
                yield b"z" * 65536

        r = httpx.post(f"{url}/v1/predict", content=gen(), headers={"content-type": "application/json"}, timeout=60)
        assert hwm() - before < 16 << 20, (hwm() - before) >> 20  # MiB; it grew by 130 before the limit
        assert r.status_code == 413 and r.json()["field"] == "body", r.text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def copy_with_chain(c: Path, dst: Path) -> None:
    """Copy checkpoint ``c`` and the checkpoints its chain builds on (an incremental one) into ``dst``."""
    from tierec.train import checkpoint as ckpt

    for name in [*ckpt.read_manifest(c).get("chain", []), c.name]:
        shutil.copytree(c.parent / name, dst / name)


def hashed_copy(run: str, dst: Path) -> str:
    """A copy of checkpoint ``run`` whose schema says its IDs were hashed as strings (Criteo's encoding)."""
    from tierec.train import checkpoint as ckpt

    c = ckpt.resolve_checkpoint(run)
    out = dst / c.name
    copy_with_chain(c, dst)
    m = json.loads((out / "manifest.json").read_text())
    for f in m["schema"]["sparse"]:
        f["encoding"] = "hash-string"
    m["manifest_sha256"] = ckpt.manifest_digest(m)
    (out / "manifest.json").write_text(json.dumps(m))
    return str(out)


def test_healthz_answers_while_a_large_request_is_encoded(runs, tmp_path):
    big = "k" * (2 << 20)  # one 2 MiB ID: hashing it takes seconds (hash_strings pads to the longest)
    hashed = hashed_copy(runs["dlrm"], tmp_path)
    with serving(build_server(config(runs, checkpoint=hashed, max_body_bytes=8 << 20, max_id_bytes=4 << 20))) as c:
        done = threading.Event()
        res = {}

        def send():
            res["r"] = c.post("/v1/predict", json={"samples": [{"C1": big}]}, timeout=120)
            done.set()

        t = threading.Thread(target=send)
        t0 = time.perf_counter()
        t.start()
        worst, n = 0.0, 0
        with httpx.Client(base_url=c.url, timeout=60) as hc:
            while not done.is_set():
                a = time.perf_counter()
                assert hc.get("/healthz").status_code == 200
                worst, n = max(worst, time.perf_counter() - a), n + 1
                time.sleep(0.05)
        t.join()
        took = time.perf_counter() - t0
    assert res["r"].status_code == 200, res["r"].text
    assert worst < 0.5, (worst, took, n)
    assert took > 0.5 and n >= 3, (took, n)  # the probes overlapped the encoding


# ------------------------------------------------------------------------------------------- faiss

def test_faiss_import_logs_no_missing_module_lines():
    code = ("import logging, numpy as np\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "from tierec.inference.retrieval import HnswIndex, HnswParams\n"
            "HnswIndex.build(np.random.default_rng(0).random((64, 8), dtype=np.float32), HnswParams(8, 16, 16))\n"
            "assert logging.getLogger('faiss.loader').isEnabledFor(logging.WARNING)\n"
            "logging.getLogger('faiss').warning('still shown')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ModuleNotFoundError" not in r.stderr and "Could not load library" not in r.stderr, r.stderr
    assert "still shown" in r.stderr

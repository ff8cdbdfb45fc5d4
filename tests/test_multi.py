"""`tierec serve-many`: real `tierec serve` children behind the router, driven by a real client (httpx, and raw
sockets for what a well-behaved client never sends)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from test_serve import metrics, runs, test_samples  # noqa: F401 -- `runs` is a fixture

from tierec.cli import main
from tierec.errors import ConfigError
from tierec.inference.multi import create_multi_app, free_port, parse_specs, start_children, stop_children


@contextlib.contextmanager
def serving(router):
    """The router in a thread of its own on a free loopback port; yields an httpx client (``.url``: its base)."""
    with router.running() as url, httpx.Client(base_url=url, timeout=30) as c:
        c.url = url
        yield c


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def raw_request(method: str, path: str, body: bytes = b"", extra: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: router\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n").encode() + extra + b"\r\n" + body


def read_response(f) -> tuple[int, dict, bytes]:
    """One response from a socket's binary file: status, header fields (lower-cased names), body."""
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, f.read(int(headers["content-length"]))


@pytest.fixture(scope="module")
def two_models(runs):  # noqa: F811
    """The same DLRM served twice with different flags: tables in DRAM, and on the SSD tier behind a 2% cache."""
    specs = parse_specs([f"dram={runs['dlrm']}", f"ssd={runs['dlrm']}"],
                        [f"dram=--tables dram --warm-rows 0 --data {runs['data']}",
                         f"ssd=--tables ssd --cache-fraction 0.02 --warm-rows 0 --data {runs['data']}"])
    children = start_children(specs, timeout=300)
    try:
        yield children
    finally:
        stop_children(children)


def test_each_model_answers_on_its_route_as_its_own_server_would(runs, two_models):  # noqa: F811
    samples, offline = test_samples(runs, 16)
    with serving(create_multi_app(two_models)) as c:
        got = {}
        for name in ("dram", "ssd"):
            r = c.post(f"/v1/models/{name}/predict", json={"samples": samples})
            assert r.status_code == 200, r.text
            got[name] = np.array(r.json()["logits"], np.float32)
        assert np.array_equal(got["dram"], offline) and np.array_equal(got["ssd"], offline)
        listed = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert listed.keys() == {"dram", "ssd"} and all(m["alive"] and m["step"] > 0 for m in listed.values())
        # the child's own validation reaches the client: 4xx naming the field; unknown model or route: 404
        bad = c.post("/v1/models/ssd/predict", json={"samples": [{"C1": "x" * 10_000}]})
        assert bad.status_code == 422 and bad.json()["field"]
        assert c.post("/v1/models/nope/predict", json={"samples": samples}).status_code == 404
        assert c.post("/v1/models/dram/admin/reload", json={}).status_code == 404
        assert c.post("/v1/models/dram/predict", content=b"x" * (2 << 20)).status_code == 413
        # concurrent requests to both models: every answer right
        errors, answers = [], []

        def client(name: str):
            with httpx.Client(base_url=c.url, timeout=60) as h:
                for _ in range(8):
                    r = h.post(f"/v1/models/{name}/predict", json={"samples": samples})
                    if r.status_code != 200:
                        errors.append(r.text)
                    else:
                        answers.append(np.array(r.json()["logits"], np.float32))

        threads = [threading.Thread(target=client, args=(n,)) for n in ("dram", "ssd", "dram", "ssd")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and len(answers) == 32 and all(np.array_equal(a, offline) for a in answers)
        m = metrics(c)
        counts = {lab["model"]: v for lab, v in m["tierec_multi_requests_total"] if lab["code"] == "200"}
        assert counts["dram"] >= 17 and counts["ssd"] >= 17


def test_keep_alive_pipelining_and_bad_clients(runs, two_models):  # noqa: F811
    """Several requests over one client connection to both models (one pooled connection per child serves
    them); a malformed request, an oversize Content-Length or head: an answer and that connection closed;
    clients that stall hold their own connection only."""
    samples, offline = test_samples(runs, 16)
    body = json.dumps({"samples": samples}).encode()
    router = create_multi_app(two_models)
    with router.running() as url:
        addr = address(url)
        stalled = socket.create_connection(addr)  # half a body, then nothing
        stalled.sendall(raw_request("POST", "/v1/models/dram/predict", body)[:-10])
        half = socket.create_connection(addr)  # half a head
        half.sendall(b"POST /v1/models/ssd/predict HTTP/1.1\r\nHost: router\r\n")
        with socket.create_connection(addr, timeout=60) as s, s.makefile("rb") as f:
            for name in ("dram", "ssd", "dram", "ssd", "dram"):
                s.sendall(raw_request("POST", f"/v1/models/{name}/predict", body))
                status, headers, got = read_response(f)
                assert status == 200 and headers.get("connection") != "close", got
                assert np.array_equal(np.array(json.loads(got)["logits"], np.float32), offline)
            # two requests in one write: answered in order, on the same connection
            s.sendall(raw_request("GET", "/v1/models/ssd/healthz") + raw_request("POST", "/v1/models/dram/predict", body))
            status, _, got = read_response(f)
            assert status == 200 and json.loads(got)["ranker"]["step"] > 0
            status, _, got = read_response(f)
            assert status == 200 and np.array_equal(np.array(json.loads(got)["logits"], np.float32), offline)
            # the router's 404 (its body dropped) and a child's 422 keep the connection; so do its own routes
            s.sendall(raw_request("POST", "/v1/models/nope/predict", body))
            assert read_response(f)[0] == 404
            s.sendall(raw_request("POST", "/v1/models/ssd/predict", b'{"samples": [{"C1": "%s"}]}' % (b"x" * 10_000)))
            status, _, got = read_response(f)
            assert status == 422 and json.loads(got)["field"]
            s.sendall(raw_request("GET", "/v1/models") + raw_request("GET", "/metrics"))
            assert read_response(f)[0] == 200 and read_response(f)[0] == 200
            s.sendall(raw_request("POST", "/v1/models/ssd/predict", body, b"connection: close\r\n"))
            status, headers, _ = read_response(f)
            assert status == 200 and headers["connection"] == "close" and f.read() == b""
        assert router.upstreams["dram"].opened == 1 and router.upstreams["ssd"].opened == 1
        bad = [b"GET /v1/models HTTP/1.1 extra\r\nHost: router\r\n\r\n",  # malformed request line
               b"GET /v1/models HTTP/1.1\r\nHost : router\r\n\r\n",  # whitespace before the colon
               b"GET /v1/models HTTP/1.1\r\nHost: router\r\n folded\r\n\r\n",  # obsolete line folding
               b"GET /v1/models HTTP/1.1\r\n\r\n",  # no Host
               b"POST /v1/models/dram/predict HTTP/1.1\r\nHost: router\r\ncontent-length: 5\r\n"
               b"transfer-encoding: chunked\r\n\r\n",  # both framings
               b"POST /v1/models/dram/predict HTTP/1.1\r\nHost: router\r\ncontent-length: -5\r\n\r\n"]
        for req in bad:
            with socket.create_connection(addr, timeout=10) as s, s.makefile("rb") as f:
                s.sendall(req)
                status, headers, got = read_response(f)
                assert status == 400 and headers["connection"] == "close" and json.loads(got)["error"], req
                assert f.read() == b""
        # 413 from Content-Length alone: answered although not one byte of the body is sent
        with socket.create_connection(addr, timeout=10) as s, s.makefile("rb") as f:
            s.sendall(b"POST /v1/models/dram/predict HTTP/1.1\r\nHost: router\r\ncontent-length: %d\r\n\r\n" % (1 << 30))
            status, headers, got = read_response(f)
            assert status == 413 and json.loads(got)["field"] == "body" and headers["connection"] == "close"
        with socket.create_connection(addr, timeout=10) as s, s.makefile("rb") as f:  # bounded head
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: router\r\nx-big: " + b"y" * 40_000 + b"\r\n\r\n")
            assert read_response(f)[0] == 431
        with httpx.Client(base_url=url, timeout=60) as c:
            # a chunked body: decoded and forwarded; past the bound: 413
            r = c.post("/v1/models/dram/predict", content=iter([body[:100], body[100:]]),
                       headers={"content-type": "application/json"})
            assert r.status_code == 200 and np.array_equal(np.array(r.json()["logits"], np.float32), offline)
            r = c.post("/v1/models/dram/predict", content=iter([b"x" * (1 << 19)] * 3))
            assert r.status_code == 413
            r = c.post("/v1/models/dram/predict", content=body,
                       headers={"expect": "100-continue", "content-type": "application/json"})
            assert r.status_code == 200, r.text
        # the stalled clients still hold their connections; nobody waited for them
        for s in (stalled, half):
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
            s.close()


def test_a_silent_model_is_504_and_a_closed_port_503():
    """No processes: one 'child' is a socket that accepts and never answers, one a port nobody listens on."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)

    def child(port: int):
        return SimpleNamespace(port=port, alive=lambda: True, proc=None, spec=SimpleNamespace(checkpoint="-", cpus=None))

    router = create_multi_app({"slow": child(silent.getsockname()[1]), "gone": child(free_port())}, timeout=0.5)
    try:
        with serving(router) as c:
            t0 = time.monotonic()
            r = c.post("/v1/models/slow/predict", json={"samples": []})
            assert r.status_code == 504 and r.json()["field"] == "name" and time.monotonic() - t0 < 10
            assert c.get("/v1/models/slow/healthz").status_code == 504
            assert c.post("/v1/models/gone/predict", json={"samples": []}).status_code == 503
            h = c.get("/healthz")
            assert h.status_code == 503 and not any(m["alive"] for m in h.json()["models"])
            codes = {(lab["model"], lab["code"]): v for lab, v in metrics(c)["tierec_multi_requests_total"]}
            assert codes[("slow", "504")] == 2 and codes[("gone", "503")] == 1
    finally:
        silent.close()


def test_a_dead_model_fails_alone(runs):  # noqa: F811
    specs = parse_specs([f"a={runs['dlrm']}", f"b={runs['dlrm']}"],
                        [f"a=--tables dram --warm-rows 0 --data {runs['data']}",
                         f"b=--tables dram --warm-rows 0 --data {runs['data']}"])
    children = start_children(specs, timeout=300)
    samples, _ = test_samples(runs, 4)
    try:
        with serving(create_multi_app(children)) as c:
            children["b"].proc.kill()
            children["b"].proc.wait(30)
            assert c.post("/v1/models/b/predict", json={"samples": samples}).status_code == 503
            assert c.post("/v1/models/a/predict", json={"samples": samples}).status_code == 200
            h = c.get("/healthz")
            assert h.status_code == 503 and h.json()["status"] == "degraded"
    finally:
        stop_children(children)


def test_specs_are_checked_at_the_edge(capsys):
    with pytest.raises(ConfigError, match="given twice"):
        parse_specs(["a=x", "a=y"])
    with pytest.raises(ConfigError, match="no --model named 'c'"):
        parse_specs(["a=x"], ["c=--tables dram"])
    with pytest.raises(ConfigError, match="set by serve-many"):
        parse_specs(["a=x"], ["a=--port 9"])
    with pytest.raises(ConfigError, match="cores must be among"):
        parse_specs(["a=x"], None, ["a=999"])
    assert parse_specs(["a=x"], ['a=--tables dram --cache-fraction 0.1'], ["a=0"])[0].args == [
        "--tables", "dram", "--cache-fraction", "0.1"]
    assert main(["serve-many", "--model", "a=/no/such/run", "--port", "0"]) == 2
    assert "model 'a'" in capsys.readouterr().err
    assert main(["serve-many", "--model", "a=x", "--host", "0.0.0.0"]) == 2

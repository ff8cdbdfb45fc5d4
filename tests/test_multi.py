"""`tierec serve-many`: real `tierec serve` children behind the router, driven by a real client."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
from test_serve import metrics, runs, serving, test_samples  # noqa: F401 -- `runs` is a fixture

from tierec.cli import main
from tierec.errors import ConfigError
from tierec.inference.multi import create_multi_app, parse_specs, start_children, stop_children


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

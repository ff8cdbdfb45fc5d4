"""`tierec serve` of a sasrec checkpoint: POST /v1/recommend with a history, on a real uvicorn server and a real
httpx client; answers checked against the model computed directly (`load_sasrec`)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch
from conftest import write_sequences
from test_serve import metrics, serving

from tierec.inference.service import ServeConfig, build_server
from tierec.train.config import TrainConfig
from tierec.train.sequence import load_sasrec, train_sasrec

ITEMS, MAX_LEN = 300, 8


@pytest.fixture(scope="module")
def sasrec_run(tmp_path_factory) -> str:
    """A sasrec run whose item table was trained on SSD behind an LRU cache (the served rows are the file's)."""
    root = tmp_path_factory.mktemp("serve_sasrec")
    write_sequences(root, 60, ITEMS, seed=3, lengths=(3, 12))
    train_sasrec(TrainConfig(data=str(root / "ds"), out=str(root / "run"), model="sasrec", embedding_dim=16,
                             max_len=MAX_LEN, batch_size=16, num_blocks=1, epochs=1, progress=False, num_threads=1,
                             memory_budget="32KiB", eval_batch_size=64))
    return str(root / "run")


def _config(run: str, **kw) -> ServeConfig:
    return ServeConfig(**{"checkpoint": run, "threads": 1, "warm_rows": 0, **kw})


def _direct(run: str, history: list[int], k: int, exclude: bool = False) -> tuple[list[int], np.ndarray]:
    """Top-k items and all scores [num_items] after ``history``, from the model as `tierec eval` loads it."""
    model, _, _ = load_sasrec(run, device="cpu")
    h = history[-MAX_LEN:]
    inputs = torch.tensor([[0] * (MAX_LEN - len(h)) + h])
    with torch.no_grad():
        scores = model.score(inputs, torch.arange(1, ITEMS + 1).unsqueeze(0))[0].numpy()  # items 1..N
    order = [int(i) + 1 for i in np.argsort(-scores, kind="stable") if not (exclude and int(i) + 1 in history)]
    return order[:k], scores


HISTORIES = [[5], [3, 17, 42], list(range(1, MAX_LEN + 1)), [7, 9] * 20]  # one item, short, exactly max_len, longer


def test_recommend_for_a_history_matches_the_model(sasrec_run):
    with serving(build_server(_config(sasrec_run))) as c:  # --tables ssd (the default): the table in DRAM anyway
        health = c.get("/healthz").json()
        assert health["ranker"]["kind"] == "sasrec" and health["ranker"]["items"] == ITEMS
        for hist in HISTORIES:
            for exclude in (False, True):
                r = c.post("/v1/recommend", json={"history": hist, "k": 10, "exclude_history": exclude})
                assert r.status_code == 200, r.text
                body = r.json()
                top, scores = _direct(sasrec_run, hist, 10, exclude)
                got = [it["item"] for it in body["items"]]
                assert got == top, (hist, exclude)
                np.testing.assert_allclose([it["score"] for it in body["items"]], scores[np.array(got) - 1],
                                           rtol=1e-5, atol=1e-5)
                assert body["history_used"] == min(len(hist), MAX_LEN)
                if exclude:
                    assert not set(got) & set(hist)
        # a longer history is its last max_len items; k beyond the items left gives them all
        long = c.post("/v1/recommend", json={"history": [1, 2, 3] + HISTORIES[2], "k": 5}).json()
        assert long["items"] == c.post("/v1/recommend", json={"history": HISTORIES[2], "k": 5}).json()["items"]
        everything = c.post("/v1/recommend", json={"history": [1, 2], "k": 1000, "exclude_history": True}).json()
        assert len(everything["items"]) == ITEMS - 2


BAD = [
    ({"history": [0]}, "history[0]"),  # padding is not an item
    ({"history": [1, ITEMS + 1]}, "history[1]"),  # unknown item
    ({"history": [1, 2**70]}, "history[1]"),
    ({"history": [-3]}, "history[0]"),
    ({"history": ["4"]}, "history[0]"),  # strict: IDs are JSON integers
    ({"history": [1.5]}, "history[0]"),
    ({"history": [True]}, "history[0]"),
    ({"history": []}, "history"),
    ({"history": "1 2"}, "history"),
    ({"k": 3}, "history"),
    ({"history": [1], "k": 0}, "k"),
    ({"history": [1], "k": 1001}, "k"),
    ({"history": [1], "exclude_history": "yes"}, "exclude_history"),
    ({"history": [1], "candidates": 50}, "candidates"),
    ({"user": {"C1": 1}}, "user"),
    ({"history": [1], "items": [2]}, "items"),
]


def test_bad_histories_get_4xx_naming_the_field(sasrec_run):
    with serving(build_server(_config(sasrec_run, tables="dram"))) as c:
        for body, field in BAD:
            r = c.post("/v1/recommend", json=body)
            assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)
        r = c.post("/v1/recommend", content=b'{"history": [1,', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["field"] == "body"
        r = c.post("/v1/predict", json={"samples": [{"C1": 1}]})
        assert r.status_code == 404 and "history" in r.json()["error"]
        assert c.post("/v1/recommend", json={"history": [1, 2], "k": 3}).status_code == 200  # still serving
        codes = {tuple(sorted(lab.items())): v for lab, v in metrics(c)["tierec_requests_total"]}
    assert codes[(("code", "422"), ("endpoint", "/v1/recommend"))] == len(BAD)
    assert codes[(("code", "200"), ("endpoint", "/v1/recommend"))] == 1


def test_concurrent_histories_are_batched(sasrec_run):
    rng = np.random.default_rng(0)
    hists = [rng.integers(1, ITEMS + 1, size=int(rng.integers(1, 12))).tolist() for _ in range(24)]
    with serving(build_server(_config(sasrec_run, max_wait_ms=100, max_batch=64))) as c:
        single = [c.post("/v1/recommend", json={"history": h, "k": 5}).json() for h in hists]
        before = metrics(c)

        async def burst():
            async with httpx.AsyncClient(base_url=c.url, timeout=30) as ac:
                rs = await asyncio.gather(*(ac.post("/v1/recommend", json={"history": h, "k": 5}) for h in hists))
            return [r.json() for r in rs]

        together = asyncio.run(burst())
        m = metrics(c)
    calls = m["tierec_batch_size_count"][0][1] - before["tierec_batch_size_count"][0][1]
    scored = m["tierec_batch_size_sum"][0][1] - before["tierec_batch_size_sum"][0][1]
    assert scored == len(hists) and calls < len(hists)  # coalesced: fewer encoder passes than requests
    for a, b in zip(together, single, strict=True):  # each answer is its own history's
        assert [it["item"] for it in a["items"]] == [it["item"] for it in b["items"]]
        np.testing.assert_allclose([it["score"] for it in a["items"]], [it["score"] for it in b["items"]],
                                   rtol=1e-5, atol=1e-5)
    codes = {tuple(sorted(lab.items())): v for lab, v in m["tierec_requests_total"]}
    assert codes[(("code", "200"), ("endpoint", "/v1/recommend"))] == 2 * len(hists)
    assert m["tierec_model_seconds_count"][0][1] == m["tierec_batch_size_count"][0][1]

"""SASRec's item table in tiers (`tierec train --model sasrec --memory-budget ...`): planned as DLRM's tables,
an SSD file behind an LRU or look-ahead cache, bit-identical to the table in memory; checkpoints, resume and
`tierec eval` read the tiered table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_sequences

from tierec.cli import main
from tierec.train.config import TrainConfig
from tierec.train.sequence import eval_checkpoint, train_sasrec

ITEMS = 2000


@pytest.fixture(scope="module")
def seq_data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("seqtier")
    return str(write_sequences(root, 80, ITEMS, seed=5, lengths=(3, 14)))


def _cfg(data: str, out: Path, **kw) -> TrainConfig:
    # dim 16, Adam state 2 x 16: 192 B a row, 2001 rows = 375 KiB; 128 KiB leaves the cache a few hundred rows
    base = dict(data=data, out=str(out), model="sasrec", embedding_dim=16, max_len=10, batch_size=8, num_blocks=1,
                attn_dropout=0.2, lr=0.01, epochs=2, log_every=1, progress=False, num_threads=1, eval_batch_size=64,
                lookahead=16, plan_batches=4)
    return TrainConfig(**{**base, **kw})


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _records(out) if r["event"] == "train"]


@pytest.mark.parametrize("policy", ["lru", "lookahead"])
def test_item_table_on_ssd_is_bit_identical(seq_data, tmp_path, policy):
    mem = train_sasrec(_cfg(seq_data, tmp_path / "mem"))
    tiered = train_sasrec(_cfg(seq_data, tmp_path / policy, memory_budget="128KiB", cache_policy=policy))
    start = next(r for r in _records(tmp_path / policy) if r["event"] == "start")
    (item,) = start["storage_plan"]
    assert item["placement"] == "ssd" and item["policy"] == policy and 0 < item["cache_rows"] < ITEMS // 4
    assert (tmp_path / policy / "tables" / "item.tbl").exists()
    losses = _losses(tmp_path / "mem")
    assert len(losses) > 10 and _losses(tmp_path / policy) == losses  # every step's loss, bit for bit
    assert tiered["test"] == mem["test"] and tiered["valid"] == mem["valid"]
    assert 0 < tiered["cache_hit_rate"] < 1 and tiered["ssd_bytes_read"] > 0
    epochs = [r for r in _records(tmp_path / policy) if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all("valid" in r for r in epochs)
    if policy == "lookahead":  # the pipeline fed every step, and evaluation / checkpoints ran with it paused
        assert epochs[-1]["prefetch"]["steps"] == losses[-1][0]
    # tierec eval reads the checkpoint's table file behind a cache (not loaded into memory): the same figures
    res = eval_checkpoint(str(tmp_path / policy), split="test", device="cpu")
    assert {k: res[k] for k in ("hr@10", "ndcg@10", "users")} == mem["test"]


def test_resume_with_the_item_table_on_ssd(seq_data, tmp_path, capsys):
    """Resume links the checkpoint's rows below a fresh SSD file; the run continues as an uninterrupted one."""
    flags = ["train", "--model", "sasrec", "--data", seq_data, "--embedding-dim", "16", "--max-len", "10",
             "--batch-size", "8", "--num-blocks", "1", "--attn-dropout", "0.2", "--lr", "0.01", "--log-every", "1",
             "--no-progress", "--num-threads", "1", "--memory-budget", "128KiB", "--cache-policy", "lookahead",
             "--lookahead", "16", "--plan-batches", "4", "--direct-io"]
    assert main([*flags, "--out", str(tmp_path / "a"), "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main([*flags, "--out", str(tmp_path / "a"), "--epochs", "2", "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert main([*flags, "--out", str(tmp_path / "b"), "--epochs", "2"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert resumed["test"] == whole["test"]
    assert main(["eval", str(tmp_path / "a"), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["hr@10"] == whole["test"]["hr@10"]

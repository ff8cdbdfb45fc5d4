"""End-to-end through the CLI: synth -> convert -> train -> eval, real Criteo rows, MovieLens."""

import json
import subprocess
import sys

import pytest

from tierec.cli import main


def run_cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.mark.slow
def test_synth_convert_train_eval_reaches_auc(tmp_path, capsys):
    raw = tmp_path / "raw.tsv"
    # tables capped at 1,000 rows and a stronger label signal: learnable within the test budget
    run_cli(["data", "synth", "--out", str(raw), "--format", "criteo-tsv", "--rows", "300000", "--seed", "1", "--signal", "1.5",
             "--max-cardinality", "1000", "--no-progress"], capsys)
    data = tmp_path / "data"
    run_cli(["data", "convert", str(raw), "--format", "criteo-tsv", "--out", str(data), "--num-embeddings", "10000",
             "--test-fraction", "0.1", "--no-progress"], capsys)
    out = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "2", "--batch-size",
                   "1024", "--no-progress"], capsys)
    summary = json.loads(out)
    assert summary["auc"] > 0.70, summary
    res = json.loads(run_cli(["eval", str(tmp_path / "run")], capsys))
    assert res["auc"] == pytest.approx(summary["auc"], abs=1e-9)
    assert res["rows"] > 10000 and res["energy"]["method"]


def test_all_criteo_sample_rows_train(shared_data, tmp_path, capsys):
    data = tmp_path / "criteo"
    run_cli(["data", "convert", str(shared_data / "criteo_sample.csv"), "--format", "criteo-csv", "--out", str(data),
             "--num-embeddings", "1000", "--test-fraction", "0.25", "--no-progress"], capsys)
    info = json.loads(run_cli(["data", "info", str(data)], capsys))
    assert info["splits"]["train"]["rows"] + info["splits"]["test"]["rows"] == 200
    summary = json.loads(run_cli(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--batch-size", "32",
                                  "--no-progress"], capsys))
    assert summary["samples"] == info["splits"]["train"]["rows"]
    run_cli(["data", "verify", str(data)], capsys)


def test_movielens_sample_trains(movielens_inter, tmp_path, capsys):
    data = tmp_path / "ml"
    run_cli(["data", "convert", str(movielens_inter), "--format", "movielens", "--out", str(data),
             "--num-embeddings", "5000", "--no-progress"], capsys)
    summary = json.loads(run_cli(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "2",
                                  "--batch-size", "2048", "--no-progress"], capsys))
    assert summary["auc"] > 0.70, summary  # user and item effects are learnable


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "tierec", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for cmd in ("train", "eval", "data", "analyze", "demo"):
        assert cmd in r.stdout


def test_demo_puts_the_tables_over_the_budget_and_matches_memory(tmp_path, capsys):
    """`tierec demo`: tables several times the budget go to SSD behind the look-ahead cache, and the run's
    losses equal the all-in-memory run's, step for step."""
    out = run_cli(["demo", "--out", str(tmp_path), "--rows", "30000", "--max-cardinality", "20000",
                   "--budget", "256KiB"], capsys)
    assert "identical, bit for bit" in out and "x over it" in out and "both models trained with" in out, out
    plan = json.loads(next((tmp_path / "tiered" / "checkpoints").glob("step-*/manifest.json")).read_text())
    assert any(p["placement"] == "ssd" for p in plan["storage_plan"]), plan["storage_plan"]

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["event"] == "train"]

    assert losses("tiered") == losses("memory") and losses("memory")

"""Every expected failure of the command line is one line on stderr and exit code 2, never a traceback
(issue #16, item 8): a sweep over bad settings, bad files and a hostile environment."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tierec.cli import main
from tierec.train import checkpoint as ckpt
from tierec.train.config import TrainConfig
from tierec.train.trainer import Trainer


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    """A finished run with one checkpoint, copied per case by `fresh_run`."""
    out = tmp_path_factory.mktemp("cli") / "run"
    Trainer(TrainConfig(data=str(tiny_dataset), out=str(out), max_steps=3, progress=False, embedding_dim=8,
                        bottom_mlp=[8], top_mlp=[8], batch_size=256)).fit()
    return out


def fresh_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def expect_one_line_error(argv, capsys, match: str) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == 2 and last.startswith("tierec: error: "), (code, err[-2000:])
    assert match in last, last
    return last


def train_argv(data, tmp_path, *extra):
    return ["train", "--data", data, "--out", tmp_path / "out", "--no-progress", "--max-steps", "2", *extra]


def test_bad_numbers_and_paths(tiny_dataset, tmp_path, capsys):
    expect_one_line_error(train_argv(tiny_dataset, tmp_path, "--memory-budget", "1e400"), capsys, "too large")
    expect_one_line_error(train_argv(tiny_dataset, tmp_path, "--lr", "inf"), capsys, "lr must be a finite number")
    expect_one_line_error(train_argv(tiny_dataset, tmp_path, "--sparse-lr", "nan"), capsys, "sparse_lr must be")
    expect_one_line_error(["train", "--data", tiny_dataset, "--out", "/proc/x/run", "--no-progress"], capsys,
                          "cannot write a run directory there")
    f = tmp_path / "a-file"
    f.write_text("x")
    expect_one_line_error(["train", "--data", tiny_dataset, "--out", f, "--no-progress"], capsys,
                          "exists and is not a directory")


def test_bad_config_files(tiny_dataset, tmp_path, capsys):
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(f"data: {tiny_dataset}\n1: 2\n")
    expect_one_line_error(["train", "--config", mixed, "--out", tmp_path / "o"], capsys, "key 1 is a int")
    toml = tmp_path / "c99.toml"
    toml.write_text(f'data = "{tiny_dataset}"\n[tables.C99]\nplacement = "ssd"\n')
    expect_one_line_error(["train", "--config", toml, "--out", tmp_path / "o"], capsys, "tables.C99")
    utf16 = tmp_path / "utf16.toml"
    utf16.write_bytes(f'data = "{tiny_dataset}"\n'.encode("utf-16"))
    expect_one_line_error(["train", "--config", utf16, "--out", tmp_path / "o"], capsys, "not UTF-8")


@pytest.mark.parametrize("case", ["manifest-binary", "manifest-list", "manifest-incomplete", "latest-binary",
                                  "latest-dir", "latest-empty", "latest-elsewhere"])
def test_broken_checkpoints(run, tmp_path, capsys, case):
    r = fresh_run(run, tmp_path)
    c = ckpt.resolve_checkpoint(r)
    latest = r / "checkpoints" / "LATEST"
    if case == "manifest-binary":
        (c / "manifest.json").write_bytes(b"\xff\xfe{\x00")
    elif case == "manifest-list":
        (c / "manifest.json").write_text("[1, 2]")
    elif case == "manifest-incomplete":
        (c / "manifest.json").write_text(json.dumps({"format": "tierec-checkpoint", "version": 1}))
    elif case == "latest-binary":
        latest.write_bytes(b"\xff\xfe\x00")
    elif case == "latest-dir":
        latest.unlink()
        latest.mkdir()
    elif case == "latest-empty":
        latest.write_text("")
    else:
        latest.write_text("../../elsewhere")
    line = expect_one_line_error(["eval", r], capsys, str(r))
    if case.startswith("latest"):
        assert "the newest checkpoint directory is" in line and c.name in line  # says what to do


def test_disk_full_while_checkpointing(tiny_dataset, tmp_path, capsys, monkeypatch):
    """A real ENOSPC (writes to /dev/full) while the checkpoint's tables are written: one line, the
    previous checkpoint stays the newest and valid, no temporary directory is left."""
    out = tmp_path / "out"
    assert main(["train", "--data", str(tiny_dataset), "--out", str(out), "--no-progress", "--max-steps", "2"]) == 0
    before = ckpt.resolve_checkpoint(out)

    def full_disk(path, storage, **kw):
        with open("/dev/full", "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()

    monkeypatch.setattr(ckpt, "write_table_file", full_disk)
    capsys.readouterr()
    expect_one_line_error(["train", "--data", tiny_dataset, "--out", out, "--no-progress", "--max-steps", "4",
                           "--resume"], capsys, "No space left on device (the disk is full")
    assert ckpt.resolve_checkpoint(out) == before
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_file_size_limit_leaves_no_partial_table_files(tiny_dataset, tmp_path):
    """The SSD working tables cannot all be created (the process may not write files over 64 KiB): one
    line, exit 2, and no table file of the run is left behind."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); from tierec.cli import main; "
            f"sys.exit(main(['train', '--data', {str(tiny_dataset)!r}, '--out', {str(tmp_path / 'out')!r}, "
            "'--no-progress', '--memory-budget', '4KiB', '--embedding-dim', '128']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("tierec: error: "), p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    left = [f for f in (tmp_path / "out").rglob("*") if f.is_file() and f.name != ".lock"]
    assert not left, left


def test_closed_stdout_ends_quietly(tiny_dataset):
    """`tierec data info DIR | true`: the reader is gone before tierec writes (it is still importing)."""
    p = subprocess.run(f"{sys.executable} -m tierec data info {tiny_dataset} | true; echo ${{PIPESTATUS[0]}}",
                       shell=True, capture_output=True, text=True, executable="/bin/bash")
    assert p.stderr == "" and p.stdout.strip() == "141", (p.stdout, p.stderr)


def test_diverging_run_via_the_cli(tiny_dataset, tmp_path, capsys):
    expect_one_line_error(train_argv(tiny_dataset, tmp_path, "--sparse-optimizer", "sgd", "--sparse-lr", "1e30"),
                          capsys, "the training loss is nan")


def _copy_data(src: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["not-utf8", "a-list", "no-splits", "ids-beyond-table", "flipped-bit"])
def test_broken_data_sets(tiny_dataset, tmp_path, capsys, case):
    data = _copy_data(tiny_dataset, tmp_path)
    mpath = data / "manifest.json"
    m = json.loads(mpath.read_text())
    if case == "not-utf8":
        mpath.write_bytes(b"\xff" + mpath.read_bytes())
    elif case == "a-list":
        mpath.write_text("[]")
    elif case == "no-splits":
        del m["splits"]
        mpath.write_text(json.dumps(m))
    elif case == "ids-beyond-table":
        m["schema"]["sparse"][1]["num_embeddings"] = 5  # the stored IDs go up to 199
        mpath.write_text(json.dumps(m))
    else:
        f = data / m["splits"]["train"]["files"][0]["path"]
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 3] ^= 0x10
        f.write_bytes(bytes(raw))
    # a whole epoch reads every row group (flipped-bit: the corrupt one is somewhere in the first file)
    expect_one_line_error(["train", "--data", data, "--out", tmp_path / "out", "--no-progress"], capsys, str(data))


def test_bad_compressed_input(tmp_path, capsys):
    import gzip

    raw = gzip.compress(b"0\t1\t2\n" * 5000)
    bad = tmp_path / "day.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    expect_one_line_error(["data", "convert", bad, "--format", "criteo-tsv", "--out", tmp_path / "d",
                           "--no-progress"], capsys, "day.gz")


def test_two_tower_without_user_side_features_says_how(tiny_dataset, tmp_path, capsys):
    expect_one_line_error(train_argv(tiny_dataset, tmp_path, "--model", "two-tower"), capsys, "`side: user`")


def test_every_train_setting_has_help_text():
    """Each TrainConfig field is a `tierec train` flag (or a config-file section) and says what it does."""
    from dataclasses import fields

    from tierec.cli.train import CONFIG_ONLY, HELP
    from tierec.train.config import TrainConfig

    missing = [f.name for f in fields(TrainConfig) if f.name not in CONFIG_ONLY and not HELP.get(f.name)]
    assert missing == []

"""Worker processes in the input pipeline (issue #23, item 3): the reader and batch workers as processes.

Every setting must yield the same batches bit for bit; a pass leaves no process and no /dev/shm file behind
however it ends; a worker's DataError reaches the consumer as the same one line; the settings are validated;
the model and the autotuner weigh processes against threads. The first test to start a pool pays the
forkserver's start (~1-3 s: it imports torch and pyarrow once); later pools fork from it in ~20 ms."""

import multiprocessing
import os
import shutil

import pytest
import torch

from tierec.data import loader, workers
from tierec.data.autotune import TuneBudget, choose
from tierec.data.dataset import Batch, Dataset
from tierec.data.loader import STAGES, TRANSFER_STAGES, InputControl, LoaderSettings, StageClock
from tierec.data.opmodel import Machine, StageModel, TrainerCost, predict
from tierec.data.profile import measure_pipeline
from tierec.data.synth import SynthConfig, generate
from tierec.errors import ConfigError, DataError
from tierec.train.config import TrainConfig


def _make(root, cluster: bool) -> Dataset:
    """Multi-hot features, the first three user-side (deduplicated per batch), in sessions; ``cluster``: stored
    as session runs (compact chunks: `Chunk.inverse`), else rows apart (dedup by hashing)."""
    kw = {"cluster_by": "session", "cluster_window": 1024} if cluster else {}
    generate(SynthConfig(rows=3000, seed=2, num_sparse=6, cardinalities=[100], num_dense=3, multi_hot="poisson:3",
                         user_features=3, session_length=3.0, row_group_size=256, progress=False), root, **kw)
    return Dataset(root)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("procs")
    return {"clustered": _make(base / "clustered", True), "rows": _make(base / "rows", False)}


def _same(a: Batch, b: Batch) -> bool:
    eq = torch.equal
    ok = eq(a.dense, b.dense) and eq(a.labels, b.labels) and a.sparse.keys() == b.sparse.keys()
    ok = ok and a.sparse.stride() == b.sparse.stride()
    ok = ok and eq(a.sparse.values(), b.sparse.values()) and eq(a.sparse.lengths(), b.sparse.lengths())
    ok = ok and (a.session is None) == (b.session is None) and (a.session is None or eq(a.session, b.session))
    if (a.user is None) != (b.user is None):
        return False
    if a.user is not None and b.user is not None:
        ok = ok and a.user.keys() == b.user.keys() and a.user.stride() == b.user.stride()
        ok = ok and eq(a.user.values(), b.user.values()) and eq(a.user.lengths(), b.user.lengths())
        ok = ok and a.user.inverse_indices()[0] == b.user.inverse_indices()[0]
        ok = ok and eq(a.user.inverse_indices()[1], b.user.inverse_indices()[1])
    return ok


def _leftovers() -> list[str]:
    """Files of this process's passes left in /dev/shm."""
    if not os.path.isdir(workers.SHM_DIR):
        return []
    return [n for n in os.listdir(workers.SHM_DIR) if n.startswith(f"tierec-in-{os.getpid()}-")]


def _clean() -> bool:
    return multiprocessing.active_children() == [] and _leftovers() == []


MODES = {
    "threads": LoaderSettings(reader_threads=2, prefetch=3, batch_workers=2),
    "reader processes": LoaderSettings(reader_threads=2, prefetch=3, process_readers=True),
    "both, 2 groups a read": LoaderSettings(reader_threads=2, prefetch=2, read_groups=2, process_readers=True,
                                            batch_workers=2, batch_prefetch=3, process_batches=True),
    "batch processes": LoaderSettings(batch_workers=1, process_batches=True),
}


@pytest.mark.parametrize("transfer", ["shm", "pipe"])
def test_process_workers_yield_the_same_batches(datasets, monkeypatch, transfer):
    monkeypatch.setattr(workers, "TRANSFER", transfer)
    def run(ds, settings):
        return list(ds.batches("train", 200, shuffle=True, seed=3, epoch=1, start_batch=2, max_rows=2500,
                               dedup=True, loader=settings))

    for name, ds in datasets.items():
        ref = run(ds, None)
        assert len(ref) > 5 and ref[0].user is not None
        for mode, settings in MODES.items():
            got = run(ds, settings)
            assert len(got) == len(ref) and all(_same(a, b) for a, b in zip(ref, got, strict=True)), (name, mode)
        plain = list(ds.batches("train", 256, dedup=False, loader=MODES["both, 2 groups a read"]))  # no inverse KJT
        assert all(_same(a, b) for a, b in zip(list(ds.batches("train", 256)), plain, strict=True))
    assert _clean()


def test_switching_between_threads_and_processes_mid_pass(datasets):
    ds = datasets["clustered"]
    ref = list(ds.batches("train", 128, shuffle=True, dedup=True))
    control = InputControl(LoaderSettings())
    got = []
    for i, b in enumerate(ds.batches("train", 128, shuffle=True, dedup=True, loader=control)):
        got.append(b)
        if i == 2:
            control.settings = MODES["both, 2 groups a read"]
        if i == 9:
            control.settings = LoaderSettings(reader_threads=3, prefetch=3, process_readers=True, batch_workers=1)
        if i == 14:
            control.settings = LoaderSettings(prefetch=0)
    assert len(got) == len(ref) and all(_same(a, b) for a, b in zip(ref, got, strict=True))
    snap = control.clock.snapshot()
    assert set(STAGES) | set(TRANSFER_STAGES) <= set(snap["stages"])
    assert all(v["rows"] > 0 and v["wall_s"] > 0 for v in snap["stages"].values())
    assert snap["worker_cpu_s"] > 0
    assert _clean()


def test_stage_clock_reports_the_workers_stages(datasets):
    clock = StageClock()
    ds = datasets["rows"]
    n = sum(b.size for b in ds.batches("train", 200, dedup=True, loader=MODES["both, 2 groups a read"], clock=clock))
    st = clock.snapshot()["stages"]
    assert st["decode"]["rows"] == st["dedup"]["rows"] == n == ds.num_rows("train")
    assert st["read"]["bytes"] > 0 and st["decode"]["cpu_s"] > 0 and st["dedup"]["cpu_s"] > 0
    assert st["send"]["rows"] == st["receive"]["rows"] == 3 * n  # reads back; each batch there and back
    run = measure_pipeline(ds, MODES["reader processes"], batch_size=200, max_rows=2000)
    assert run.rows > 0 and set(STAGES) | {"send", "receive"} <= set(run.stage_rates()) and run.cpu_s > 0
    assert _clean()


def test_consumer_stopping_early_or_raising_leaves_no_process(datasets):
    ds = datasets["clustered"]
    settings = MODES["both, 2 groups a read"]
    it = ds.batches("train", 100, shuffle=True, dedup=True, loader=settings)
    next(it), next(it)
    assert len(multiprocessing.active_children()) == 4  # two readers, two builders
    it.close()
    assert _clean()

    def consume():
        for i, _ in enumerate(ds.batches("train", 100, dedup=True, loader=settings)):
            if i == 3:
                raise RuntimeError("the trainer failed")

    with pytest.raises(RuntimeError, match="the trainer failed"):
        consume()
    assert _clean()


def _corrupt(ds: Dataset, root) -> tuple[Dataset, str]:
    """A copy of ``ds`` with one byte of row group 2 of its first training file flipped."""
    shutil.copytree(ds.root, root)
    copy = Dataset(root)
    f = copy.manifest["splits"]["train"]["files"][0]
    path = root / f["path"]
    g = f["row_groups"][2]
    data = bytearray(path.read_bytes())
    data[g["offset"] + g["bytes"] // 2] ^= 0x04
    path.write_bytes(bytes(data))
    return Dataset(root), str(path)


def test_a_workers_data_error_is_the_same_one_line(datasets, tmp_path):
    bad, path = _corrupt(datasets["rows"], tmp_path / "bad")
    errors = {}
    for name, settings in [("default", None), ("threads", MODES["threads"]),
                           ("reader processes", MODES["reader processes"])]:
        with pytest.raises(DataError) as e:
            for _ in bad.batches("train", 200, dedup=True, loader=settings):
                pass
        errors[name] = e.value
    msg = f"{path}: row group 2 fails its checksum (corrupt data; re-run `tierec data convert` or restore the file)"
    assert {str(e) for e in errors.values()} == {msg}
    remote = errors["reader processes"]
    assert remote.path == path and remote.__cause__ is None and "\n" not in str(remote)
    assert _clean()
    from tierec.cli import describe_error

    assert describe_error(remote) == msg


def test_settings_are_validated_and_described():
    with pytest.raises(ConfigError, match="process_readers needs prefetch"):
        LoaderSettings(prefetch=0, process_readers=True)
    with pytest.raises(ConfigError, match="exclude each other"):
        LoaderSettings(process_readers=True, cache_bytes=1 << 20)
    with pytest.raises(ConfigError, match="process_batches needs batch_workers"):
        LoaderSettings(process_batches=True)
    with pytest.raises(ConfigError, match="process_readers must be true or false"):
        LoaderSettings(process_readers=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="process_batches needs"):
        TrainConfig(data="x", input_batch_processes=True)
    s = TrainConfig(data="x", input_readers=2, input_reader_processes=True, input_batch_workers=1,
                    input_batch_processes=True).loader_settings()
    assert s.process_readers and s.process_batches and s.processes == 3 and s.threads == 3
    assert "2 reader process(es)" in s.describe() and "1 batch process(es)" in s.describe()
    assert LoaderSettings(**s.to_dict()) == s
    assert "reader thread(s)" in LoaderSettings().describe() and LoaderSettings().processes == 0


def _gil_bound() -> dict[str, StageModel]:
    """Python-heavy reader stages (serial fraction 1: the GIL), a cheap transfer."""
    return {"read": StageModel("read", 1e-6, 1e-6, 1.0), "parquet": StageModel("parquet", 4e-6, 4e-6, 1.0, 1000),
            "shuffle": StageModel("shuffle", 2e-6, 2e-6, 1.0, 1000),
            "decode": StageModel("decode", 10e-6, 10e-6, 1.0, 1000), "batch": StageModel("batch", 0.1e-6, 0.1e-6),
            "dedup": StageModel("dedup", 8e-6, 8e-6, 1.0, 800),
            "send": StageModel("send", 0.3e-6, 0.3e-6, 0.0, 1000),
            "receive": StageModel("receive", 0.05e-6, 0.05e-6, 0.0, 1000)}


def test_the_model_frees_process_workers_from_the_gil():
    many = Machine(16.0, 1 << 34)
    stages = _gil_bound()
    threads = predict(stages, LoaderSettings(reader_threads=4, prefetch=4, batch_workers=2), many)
    procs = predict(stages, LoaderSettings(reader_threads=4, prefetch=4, batch_workers=2, process_readers=True,
                                           process_batches=True), many)
    assert threads.limit == "gil" and procs.rows_per_s > 2 * threads.rows_per_s
    free = predict(stages, LoaderSettings(reader_threads=4, prefetch=4, batch_workers=2), many, gil=False)
    assert free.rows_per_s > procs.rows_per_s  # processes pay to move their results
    assert procs.memory_bytes > threads.memory_bytes  # and their own memory
    one = Machine(1.0, 1 << 34)  # one core: processes add no core
    assert predict(stages, LoaderSettings(reader_threads=4, prefetch=4, process_readers=True), one).limit == "cpu"
    # without the transfer stages measured, a process pool costs what its stages do, and no GIL
    bare = {k: v for k, v in stages.items() if k not in TRANSFER_STAGES}
    assert predict(bare, LoaderSettings(reader_threads=2, prefetch=2, process_readers=True), many).rows_per_s > 0


def test_autotune_considers_processes_only_where_the_gil_binds(caplog):
    stages = _gil_bound()
    budget = TuneBudget(Machine(16.0, 1 << 34), threads=8, rows=100_000, decoded_bytes_per_row=1000, passes=1)
    c = choose(stages, budget, TrainerCost(400_000, 3e-6), group_rows=4096, batch_rows=1024)
    assert c.settings.processes > 0 and c.settings.cache_bytes == 0
    assert any(r.startswith("worker processes considered: the GIL binds") for r in c.reasons)
    assert any(r.startswith("worker processes chosen") for r in c.reasons)
    free = {k: StageModel(v.name, v.s, v.c, 0.0, v.out_bytes) for k, v in stages.items()}
    t = choose(free, budget, TrainerCost(400_000, 3e-6), group_rows=4096, batch_rows=1024)
    assert t.settings.processes == 0
    assert any(r.startswith("worker processes not considered: the GIL does not bind") for r in t.reasons)
    # two cores: the GIL binds less than the cores do
    small = TuneBudget(Machine(2.0, 1 << 34), threads=2, rows=100_000, decoded_bytes_per_row=1000, passes=1)
    s = choose(stages, small, TrainerCost(20_000, 60e-6), group_rows=4096, batch_rows=1024)
    assert s.settings.processes == 0

"""Profile the input pipeline: each stage alone, the whole pipeline under a configuration, the machine.

`profile_stages` runs every stage of `tierec.data.loader` (and any a caller adds: the trainer's
look-ahead ID extraction and host-to-device copy, `tierec.train.input_probe`) alone over the same
sample of row groups, one after another: wall time on one thread, CPU time of the whole process
(pyarrow's threads included), bytes in or out, and the same work split over two concurrent threads
(the serial fraction). `measure_pipeline` runs the real pipeline under `LoaderSettings` and reads
its `StageClock` (time inside each stage, the consumer's waits) and the process's resident memory.
`LoadMeter` measures other processes' load (the cores they keep busy). Besides the stages of a pass,
the cost of moving a worker process's results (``send``, ``receive``: the decoded chunks written to
/dev/shm and mapped back) is measured alone, for the model of process workers.
`InputProfile` puts them together with the operational model's prediction (`tierec.data.opmodel`)
and renders the table and the plot (docs/input.md explains how to read them).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tierec.data.dataset import Batch, Chunk, Dataset
from tierec.data.loader import (
    TRANSFER_STAGES,
    LoaderSettings,
    StageClock,
    batch_nbytes,
    chunk_nbytes,
)
from tierec.data.opmodel import Machine, Prediction, StageModel, TrainerCost, predict
from tierec.data.rowgroup import RowGroupColumns
from tierec.data.workers import discard, receive_chunks, send_chunks
from tierec.errors import TierecError

log = logging.getLogger(__name__)

ExtraStage = tuple[str, Callable[[Batch], object]]  # (name, work on one batch) added by a caller
DESCRIPTIONS = {
    "read": "pread + CRC32 of the row group's bytes",
    "parquet": "zstd decompression + Parquet -> Arrow",
    "shuffle": "rows permuted within the row group",
    "decode": "Arrow -> numpy chunk, ID/label checks",
    "batch": "chunks cut/joined into batches",
    "dedup": "Batch.from_chunk: KJT (+ inverse KJT)",
    "send": "a worker process's result written to /dev/shm",
    "receive": "a worker process's result mapped back",
    "ids": "look-ahead ID extraction (unique IDs per table)",
    "h2d": "pin + host-to-device copy",
}


@dataclass
class StageCost:
    """One stage measured alone (module doc)."""

    name: str
    rows: int
    bytes: int  # bytes out of the stage (read: the compressed bytes read)
    wall_s: float  # one thread
    cpu_s: float  # the whole process's CPU while it ran
    wall2_s: float | None = None  # the same work split over two concurrent threads (net of waits for a core)
    out_bytes_per_row: float = 0.0  # what a row holds after this stage (memory of a row in flight)
    wait_s: float = 0.0  # of wall_s, the time the thread waited for a core (other processes' load)

    @property
    def service_s(self) -> float:
        """Wall seconds net of waiting for a core: the stage's own time (its I/O and sleeps included)."""
        return max(self.wall_s - self.wait_s, 0.1 * self.wall_s, 1e-9)  # a stage this short: waits are noise

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.service_s

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.service_s

    @property
    def core_wait(self) -> float:
        """Share of the wall time spent waiting for a core."""
        return self.wait_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_us_per_row(self) -> float:
        return 1e6 * self.cpu_s / max(self.rows, 1)

    @property
    def serial_fraction(self) -> float:
        """Amdahl's serial fraction from the two-thread run (the GIL's share, a shared pool's): speedup
        S = service / wall2, f = 2 / S - 1 in [0, 1]."""
        if not self.wall2_s or self.wall2_s <= 0:
            return 0.0
        return min(1.0, max(0.0, 2.0 * self.wall2_s / self.service_s - 1.0))

    def model(self) -> StageModel:
        rows = max(self.rows, 1)
        return StageModel(self.name, self.service_s / rows, self.cpu_s / rows, self.serial_fraction,
                          self.out_bytes_per_row)

    def to_dict(self) -> dict:
        return {**asdict(self), "rows_per_s": self.rows_per_s, "bytes_per_s": self.bytes_per_s,
                "cpu_us_per_row": self.cpu_us_per_row, "serial_fraction": self.serial_fraction,
                "core_wait": self.core_wait}


@dataclass
class PipelineRun:
    """The pipeline measured under one configuration: rows/s at the consumer, each stage's time inside the
    pipeline (`StageClock`), the consumer's waits, CPU (its worker processes' included), peak resident memory
    (the consumer's process)."""

    settings: LoaderSettings
    rows: int
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    clock: dict
    other_cores: float = 0.0  # cores other processes kept busy meanwhile (`LoadMeter`)

    def machine(self, memory_bytes: int = 0) -> Machine:
        """The machine this run had: its cores, other processes' load."""
        return Machine(float(cpu_count()), memory_bytes, self.other_cores)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else float("inf")

    def stage_rates(self) -> dict[str, float]:
        """Rows/s of each stage counting only the time inside it (its rate in the pipeline, on one thread)."""
        return {k: v["rows"] / v["wall_s"] for k, v in self.clock["stages"].items() if v["wall_s"] > 0 and v["rows"]}

    def to_dict(self) -> dict:
        return {"settings": self.settings.to_dict(), "rows": self.rows, "wall_s": self.wall_s,
                "other_cores": self.other_cores,
                "rows_per_s": self.rows_per_s, "cpu_s": self.cpu_s, "peak_rss_bytes": self.peak_rss_bytes,
                "stage_rates": self.stage_rates(), "clock": self.clock}


# --------------------------------------------------------------------------- the machine
def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_memory() -> int:
    """MemAvailable of /proc/meminfo (bytes), else physical memory, else 0."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_ticks() -> tuple[float, float]:
    """(seconds of CPU all processes used, seconds this process used), from /proc/stat and /proc/self/stat."""
    try:
        hz = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # all but idle and iowait
        with open("/proc/self/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        return busy / hz, (int(st[11]) + int(st[12])) / hz
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0


def _own_sched() -> tuple[float, float]:
    """(seconds this process's threads ran, seconds they waited for a core), summed over its threads."""
    run = wait = 0.0
    try:
        for t in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{t}/schedstat") as f:
                    a, b = f.read().split()[:2]
                run, wait = run + int(a) / 1e9, wait + int(b) / 1e9
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return run, wait


class LoadMeter:
    """Other processes' load while it runs (``start`` ... ``stop``): the cores they kept busy (/proc/stat less
    this process's CPU time), and the share of a core this process's threads got meanwhile (``share``: their
    running over running + waiting for a core, /proc/self/task/*/schedstat)."""

    def start(self) -> LoadMeter:
        self.t0, (self.all0, self.own0) = time.perf_counter(), _cpu_ticks()
        self.run0, self.wait0 = _own_sched()
        return self

    def stop(self, workers_cpu_s: float = 0.0) -> float:
        """Cores other processes kept busy since ``start`` (0 on an idle machine); ``workers_cpu_s``: CPU seconds
        this process's worker processes used meanwhile (theirs, not other processes' load)."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        a, o = _cpu_ticks()
        used = max(0.0, ((a - self.all0) - (o - self.own0) - workers_cpu_s) / dt)
        run, wait = _own_sched()
        run, wait = run - self.run0, wait - self.wait0
        share = run / (run + wait) if run + wait > 1e-3 else 1.0
        self.used, self.share, self.others = used, share, used
        return self.others

    def machine(self, memory_bytes: int) -> Machine:
        return Machine(float(cpu_count()), memory_bytes, self.others)


def measure_machine(memory_bytes: int, seconds: float = 0.5) -> Machine:
    """The machine now: its cores and what other processes kept busy over ``seconds`` (`LoadMeter`)."""
    m = LoadMeter().start()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    m.stop()
    return m.machine(memory_bytes)


def other_cores(seconds: float = 0.5) -> float:
    """Cores other processes keep busy now (`measure_machine`)."""
    return measure_machine(0, seconds).others


# --------------------------------------------------------------------------- stages alone
def runqueue_s() -> float:
    """Seconds the calling thread has waited for a core (runnable, not running: other threads' and processes'
    load) since it started, from /proc/thread-self/schedstat; 0.0 where that is not available."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """(fn(), wall s, process CPU s, s of the wall time lost to waiting for a core). The loss: the wall time
    times the share of their runnable time this process's threads (pyarrow's too) spent waiting for a core
    rather than running; time blocked on I/O or sleeping is neither, and stays the stage's."""
    w, c, (r0, q0) = time.perf_counter(), time.process_time(), _own_sched()
    out = fn()
    wall, cpu, (r1, q1) = time.perf_counter() - w, time.process_time() - c, _own_sched()
    run, wait = r1 - r0, q1 - q0
    lost = wall * wait / (run + wait) if run + wait > 1e-4 else 0.0
    return out, wall, cpu, lost


def _keep(fn: Callable[[Batch], object], b: Batch) -> tuple[Batch, object]:
    return b, fn(b)


def _twice(items: list, fn: Callable) -> float:
    """Wall seconds of ``fn`` over ``items`` split between two concurrent threads, less the time they waited
    for a core on average (other processes' load is not the stage's)."""
    halves = [items[0::2], items[1::2]]

    def run(part: list) -> float:
        q = runqueue_s()
        for x in part:
            fn(x)
        return runqueue_s() - q

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        waits = list(pool.map(run, halves))
    return max(1e-9, time.perf_counter() - t0 - sum(waits) / 2)


def profile_stages(ds: Dataset, split: str = "train", batch_size: int = 1024, sample_rows: int = 131072,
                   dedup: bool = True, extra: Sequence[ExtraStage] = (), concurrency: bool = True,
                   repeats: int = 2) -> dict[str, StageCost]:
    """Every stage alone over the first row groups (shuffled order, ``sample_rows`` rows or more, at least two
    groups), in pipeline order, each fed the previous stage's output (module doc); each stage warmed on its first
    input, then the best of ``repeats`` runs."""
    users = ds.schema.user_names if dedup else []
    plan = ds.read_plan(split, batch_size, shuffle=True, seed=0, compact=bool(users))
    items: list[int] = []
    rows = 0
    for gi, _ in plan.items:
        if rows >= sample_rows and len(items) >= 2:
            break
        items.append(gi)
        rows += plan.groups[gi][2]
    if not items:
        raise TierecError(f"{ds.root}: split {split!r} has no rows to profile")
    out: dict[str, StageCost] = {}
    two = concurrency and len(items) >= 2

    def stage(name: str, inputs: list, fn: Callable[[Any], Any], nrows: Callable[[Any], int],
              nbytes: Callable[[Any], int]) -> list:
        fn(inputs[0])  # warm: first-call costs (footers, allocator, imports) are not the stage's rate
        res, w, c, q = _timed(lambda: [fn(x) for x in inputs])
        for _ in range(repeats - 1):  # best of ``repeats``: the least disturbed by other processes
            _, w2, c2, q2 = _timed(lambda: [fn(x) for x in inputs])
            if w2 - q2 < w - q:
                w, c, q = w2, c2, q2
        assert isinstance(res, list)
        n = sum(nrows(r) for r in res)
        b = sum(nbytes(r) for r in res)
        cost = StageCost(name, n, b, w, c, _twice(inputs, fn) if two and len(inputs) >= 2 else None, b / max(n, 1),
                         min(q, w))
        out[name] = cost
        log.debug("stage %s alone: %.0f rows/s", name, cost.rows_per_s)
        return res

    group_rows = {gi: plan.groups[gi][2] for gi in items}
    datas = stage("read", items, lambda gi: (gi, ds.stage_read(plan, gi)), lambda r: group_rows[r[0]],
                  lambda r: len(r[1]) if r[1] is not None else 0)
    # each stage timed alone on whole row groups, as Arrow tables: a stage runs more than once on the same input
    # (the loader decodes each column as the decode stage takes it, and charges that time to parquet and shuffle:
    # `tierec.data.loader.load_group`)
    tables = stage("parquet", datas, lambda r: (r[0], ds.stage_parquet(plan, r[0], r[1]).table()),
                   lambda r: r[1].num_rows, lambda r: r[1].nbytes)
    out["read"].out_bytes_per_row = 0.0 if datas[0][1] is None else out["read"].out_bytes_per_row
    shuffled = stage("shuffle", tables,
                     lambda r: (r[0], ds.stage_shuffle(plan, r[0], RowGroupColumns.from_table(r[1])).table()),
                     lambda r: r[1].num_rows, lambda r: r[1].nbytes)
    chunks = stage("decode", shuffled, lambda r: ds.stage_decode(plan, r[0], RowGroupColumns.from_table(r[1])),
                   len, chunk_nbytes)

    def cut(chunk: Chunk) -> list[Chunk]:
        return [chunk.slice(a, min(a + batch_size, len(chunk))) for a in range(0, len(chunk), batch_size)]
    parts = stage("batch", chunks, cut, lambda r: sum(len(c) for c in r), lambda r: sum(chunk_nbytes(c) for c in r))
    pieces = [c for p in parts for c in p]
    batches = stage("dedup", pieces, lambda c: Batch.from_chunk(c, ds.schema.sparse_names, users),
                    lambda b: b.size, batch_nbytes)
    out.update(transfer_costs(chunks, repeats))
    for name, fn in extra:
        stage(name, batches, functools.partial(_keep, fn), lambda r: r[0].size, lambda r: 0)
    return out


def _receive_all(sent: list) -> list:
    return [receive_chunks(h, m) for h, m in sent]


def transfer_costs(chunks: list[Chunk], repeats: int = 2) -> dict[str, StageCost]:
    """What moving ``chunks`` from a worker process costs (`tierec.data.workers.TRANSFER`), best of ``repeats``:
    ``send`` (written to /dev/shm, or readied for the pipe) and ``receive`` (mapped back: no copy)."""
    prefix = f"tierec-profile-{os.getpid()}"
    rows = sum(len(c) for c in chunks)
    nbytes = sum(chunk_nbytes(c) for c in chunks)
    best: dict[str, StageCost] = {}
    for _ in range(max(repeats, 1)):
        sent, w, c, q = _timed(lambda: [send_chunks([ch], prefix) for ch in chunks])
        try:
            _, w2, c2, q2 = _timed(functools.partial(_receive_all, sent))
        finally:
            for h, _m in sent:
                discard(h)
        for name, (wall, cpu, lost) in (("send", (w, c, q)), ("receive", (w2, c2, q2))):
            cost = StageCost(name, rows, nbytes, wall, cpu, None, nbytes / max(rows, 1), min(lost, wall))
            if name not in best or cost.service_s < best[name].service_s:
                best[name] = cost
    return best


# --------------------------------------------------------------------------- the pipeline
def measure_pipeline(ds: Dataset, settings: LoaderSettings, split: str = "train", batch_size: int = 1024,
                     max_rows: int | None = None, dedup: bool = True, epoch: int = 0,
                     consume: Callable[[Batch], object] | None = None, warmup_batches: int = 2) -> PipelineRun:
    """The pipeline under ``settings`` for ``max_rows`` rows (shuffled, from ``epoch``, the next epochs when the
    split is shorter; default one epoch); ``consume`` runs on each batch on the consumer's thread (extra stages,
    or a training step). The first ``warmup_batches`` are not timed."""
    clock = StageClock()
    stop = threading.Event()
    peak = [_rss()]

    def sample():
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _rss())

    sampler = threading.Thread(target=sample, name="tierec-rss", daemon=True)
    sampler.start()
    rows, t0, c0, w0 = 0, time.perf_counter(), time.process_time(), 0.0
    load = LoadMeter().start()
    want = max_rows if max_rows is not None else ds.num_rows(split)
    try:
        i, seen = 0, 0
        while seen < want:  # epochs after ``epoch`` when the split has fewer rows than asked for
            it = ds.batches(split, batch_size, shuffle=True, seed=0, epoch=epoch, max_rows=want - seen, dedup=dedup,
                            loader=settings, clock=clock)
            for b in it:
                if consume is not None:
                    consume(b)
                seen += b.size
                i += 1
                if i == warmup_batches:
                    rows, t0, c0, w0 = 0, time.perf_counter(), time.process_time(), clock.worker_cpu_s
                    load.start()
                    continue
                rows += b.size
            epoch += 1
            if ds.num_rows(split) == 0:
                break
    finally:
        stop.set()
        sampler.join()
    workers = clock.worker_cpu_s - w0  # worker processes' CPU: the pipeline's, not other processes' load
    others = load.stop(workers)
    return PipelineRun(settings, rows, time.perf_counter() - t0, time.process_time() - c0 + workers, peak[0],
                       clock.snapshot(), others)


# --------------------------------------------------------------------------- the report
@dataclass
class InputProfile:
    """A profile: stages alone, the machine, the pipeline under ``settings``, the trainer's rate (optional), the
    model's prediction and the bottleneck; ``sweep``: predicted vs measured over configurations."""

    dataset: str
    batch_size: int
    settings: LoaderSettings
    stages: dict[str, StageCost]
    machine: Machine
    pipeline: PipelineRun | None = None
    trainer: TrainerCost | None = None
    group_rows: int = 65536
    sweep: list[dict] = field(default_factory=list)
    off_path: tuple[str, ...] = ()  # stages measured but not run by this configuration (not in the model)
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M"))

    def models(self) -> dict[str, StageModel]:
        return {k: v.model() for k, v in self.stages.items() if k not in self.off_path}

    def idle(self) -> tuple[str, ...]:
        """Stages measured for the model that this configuration does not run: moving results, without worker
        processes."""
        return () if self.settings.processes else TRANSFER_STAGES

    def predict(self, settings: LoaderSettings | None = None, trainer: bool = False) -> Prediction:
        return predict(self.models(), settings or self.settings, self.machine, self.trainer if trainer else None,
                       self.group_rows, self.batch_size)

    def bottleneck(self) -> dict:
        """The stage that binds the pipeline alone, and how far the pipeline runs below the trainer."""
        alone = self.predict()
        out = {"stage": alone.bottleneck, "limit": alone.limit, "predicted_rows_per_s": alone.rows_per_s}
        measured = self.pipeline.rows_per_s if self.pipeline is not None else None
        out["measured_rows_per_s"] = measured
        if self.trainer is not None:
            out["trainer_rows_per_s"] = self.trainer.rows_per_s
            rate = measured if measured is not None else alone.rows_per_s
            out["input_over_trainer"] = rate / self.trainer.rows_per_s
            together = self.predict(trainer=True)
            out["with_trainer"] = together.to_dict()
            out["input_bound"] = rate < self.trainer.rows_per_s
        return out

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "date": self.date, "batch_size": self.batch_size,
                "settings": self.settings.to_dict(), "machine": asdict(self.machine),
                "stages": {k: v.to_dict() for k, v in self.stages.items()},
                "pipeline": self.pipeline.to_dict() if self.pipeline is not None else None,
                "trainer": asdict(self.trainer) if self.trainer is not None else None,
                "prediction": self.predict().to_dict(), "bottleneck": self.bottleneck(), "sweep": self.sweep}

    def to_text(self) -> str:
        """The table (docs/input.md: how to read it)."""
        lines = [f"input profile of {self.dataset} ({self.date}; batch {self.batch_size}; "
                 f"{self.machine.cores:.0f} cores, {self.machine.others:.1f} of them busy with other "
                 f"processes, "
                 f"{self.machine.memory_bytes / 2**30:.1f} GiB available)",
                 f"configuration: {self.settings.describe()}", ""]
        in_pipe = self.pipeline.stage_rates() if self.pipeline is not None else {}
        hdr = f"{'stage':<8} {'rows/s alone':>13} {'MB/s':>8} {'CPU us/row':>10} {'serial':>6} {'wait':>5} " \
              f"{'B/row':>7} {'rows/s in pipe':>14}  bar (rows/s alone, log scale)"
        lines += [hdr, "-" * len(hdr)]
        rates = [v.rows_per_s for v in self.stages.values() if v.rows_per_s < float("inf")]
        top = max(rates, default=1.0)
        b = self.bottleneck()
        import math

        for k, v in self.stages.items():
            width = int(round(30 * max(0.0, math.log10(max(v.rows_per_s, 1.0))) / max(math.log10(max(top, 10.0)),
                                                                                        1e-9)))
            mark = ("  <- bottleneck" if k == b["stage"] else "  (not on this run's path)" if k in self.off_path
                    else "  (process workers only)" if k in self.idle() else "")
            pipe = f"{in_pipe[k]:>14,.0f}" if k in in_pipe else f"{'-':>14}"
            lines.append(f"{k:<8} {v.rows_per_s:>13,.0f} {v.bytes_per_s / 1e6:>8.1f} {v.cpu_us_per_row:>10.2f} "
                         f"{v.serial_fraction:>6.2f} {v.core_wait:>5.0%} {v.out_bytes_per_row:>7.0f} {pipe}  "
                         f"{'#' * width}{mark}")
        lines.append("")
        p = self.predict()
        lines.append(f"pipeline, predicted: {p.rows_per_s:,.0f} rows/s (binding: {p.limit}, stage {p.bottleneck})")
        if self.pipeline is not None:
            pr = self.pipeline
            err = (p.rows_per_s - pr.rows_per_s) / pr.rows_per_s if pr.rows_per_s else float("nan")
            waits = ", ".join(f"{k} {v:.2f} s" for k, v in pr.clock.get("waits", {}).items()) or "none"
            lines.append(f"pipeline, measured:  {pr.rows_per_s:,.0f} rows/s over {pr.rows:,} rows "
                         f"(model {err:+.0%}); consumer waited for: {waits}; peak RSS "
                         f"{pr.peak_rss_bytes / 2**20:,.0f} MiB")
        if self.trainer is not None:
            tr = self.trainer
            lines.append(f"trainer alone (batches in memory): {tr.rows_per_s:,.0f} rows/s net of waits for a core "
                         f"({tr.wall_rows_per_s or tr.rows_per_s:,.0f} as measured), "
                         f"{1e6 * tr.cpu_s_per_row:.1f} CPU us/row")
            ratio = b["input_over_trainer"]
            if b["input_bound"]:
                lines.append(f"=> INPUT-BOUND: the pipeline delivers {ratio:.2f}x of what the trainer consumes "
                             f"({1 - ratio:.0%} below it); bottleneck: {b['stage']} ({b['limit']})")
            else:
                lines.append(f"=> the pipeline keeps up: {ratio:.2f}x the trainer's rate; its slowest part: "
                             f"{b['stage']} ({b['limit']})")
            w = b["with_trainer"]
            lines.append(f"   training with this input, predicted: {w['rows_per_s']:,.0f} rows/s "
                         f"(binding: {w['limit']}, {w['bottleneck']})")
        else:
            lines.append(f"=> bottleneck of the pipeline: {b['stage']} ({b['limit']})")
        if self.sweep:
            lines += ["", "model check: predicted vs measured rows/s (pipeline alone)",
                      f"{'configuration':<58} {'predicted':>10} {'measured':>10} {'error':>7}"]
            for r in self.sweep:
                lines.append(f"{r['label']:<58} {r['predicted']:>10,.0f} {r['measured']:>10,.0f} "
                             f"{r['error']:>+7.0%}")
            errs = [abs(r["error"]) for r in self.sweep]
            lines.append(f"mean |error| {sum(errs) / len(errs):.0%}, max {max(errs):.0%}; within 15%: "
                         f"{sum(e <= 0.15 for e in errs)}/{len(errs)}")
        lines.append("(a shared machine is noisy: rates move with other processes' load; rerun to compare)")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Bar chart of each stage's rows/s alone (and in the pipeline), the pipeline's measured and predicted
        rates and the trainer's as lines; PNG or SVG by the suffix (matplotlib, Agg)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.stages)
        alone = [min(self.stages[k].rows_per_s, 1e12) for k in names]
        in_pipe = self.pipeline.stage_rates() if self.pipeline is not None else {}
        b = self.bottleneck()
        fig, ax = plt.subplots(figsize=(11, 4.8))
        x = list(range(len(names)))
        colors = ["#d62728" if k == b["stage"] else "#c7c7c7" if k in self.off_path or k in self.idle() else "#1f77b4"
                  for k in names]
        ax.bar([i - 0.2 for i in x], alone, 0.4, color=colors, label="stage alone (1 thread)")
        if in_pipe:
            ax.bar([i + 0.2 for i in x], [in_pipe.get(k, 0.0) for k in names], 0.4, color="#aec7e8",
                   label="stage in the pipeline (time inside it)")
        pred = self.predict().rows_per_s
        ax.axhline(pred, color="#2ca02c", ls="--", label=f"pipeline predicted {pred:,.0f}")
        if self.pipeline is not None:
            ax.axhline(self.pipeline.rows_per_s, color="#2ca02c", label=f"pipeline measured "
                                                                       f"{self.pipeline.rows_per_s:,.0f}")
        if self.trainer is not None:
            ax.axhline(self.trainer.rows_per_s, color="#ff7f0e", label=f"trainer consumes "
                                                                      f"{self.trainer.rows_per_s:,.0f}")
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{k}\n(off path)" if k in self.off_path or k in self.idle() else k for k in names])
        ax.set_ylabel("rows/s (log)")
        ax.set_title(f"input pipeline of {Path(self.dataset).name}: bottleneck {b['stage']} ({b['limit']})")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        plt.close(fig)
        return path

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """input-profile.json, .txt and .png in ``out_dir``."""
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        paths = {"json": d / "input-profile.json", "text": d / "input-profile.txt", "plot": d / "input-profile.png"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=float) + "\n")
        paths["text"].write_text(self.to_text() + "\n")
        self.plot(paths["plot"])
        return paths


def sweep_model(ds: Dataset, profile: InputProfile, configs: Sequence[tuple[str, LoaderSettings]],
                max_rows: int, split: str = "train", dedup: bool = True,
                consume: Callable[[Batch], object] | None = None, extra: Sequence[ExtraStage] | None = None,
                sample_rows: int = 32768) -> list[dict]:
    """Predicted vs measured rows/s of the pipeline alone (``consume``: the consumer's stages) under each
    configuration (`InputProfile.sweep`). With ``extra`` (the consumer's stages, as `profile_stages` takes them)
    the stages are measured again before each run, on ``sample_rows`` rows: on a shared machine the load moves
    between the profile and the runs, and the model is checked, not the weather; without it the profile's."""
    out = []
    for label, s in configs:
        models = profile.models()
        if extra is not None:  # the stages again, now: the same load as the run that follows
            fresh = profile_stages(ds, split, profile.batch_size, sample_rows, dedup, extra, repeats=1)
            models = {k: v.model() for k, v in fresh.items() if k not in profile.off_path}
        run = measure_pipeline(ds, s, split, profile.batch_size, max_rows=max_rows, dedup=dedup, consume=consume)
        m = run.machine(profile.machine.memory_bytes)  # the cores other processes left it: the model's input
        pred = predict(models, s, m, None, profile.group_rows, profile.batch_size).rows_per_s
        out.append({"label": label, "settings": s.to_dict(), "predicted": pred, "measured": run.rows_per_s,
                    "other_cores": m.others,
                    "error": (pred - run.rows_per_s) / run.rows_per_s if run.rows_per_s else float("nan")})
        log.info("model check %s: predicted %.0f, measured %.0f rows/s", label, pred, run.rows_per_s)
    profile.sweep = out
    return out


def sweep_configs(cores: int) -> list[tuple[str, LoaderSettings]]:
    """A spread of configurations for the model check: no prefetch, the default, more readers, batch workers,
    worker processes."""
    out = [("no prefetch", LoaderSettings(prefetch=0)),
           ("default (1 reader, 1 ahead)", LoaderSettings()),
           ("1 reader, 4 ahead", LoaderSettings(prefetch=4)),
           ("1 reader, 1 batch worker", LoaderSettings(prefetch=2, batch_workers=1))]
    for r in sorted({2, max(2, cores)}):
        out.append((f"{r} readers, {2 * r} ahead", LoaderSettings(reader_threads=r, prefetch=2 * r)))
        out.append((f"{r} readers, {2 * r} ahead, 1 batch worker",
                    LoaderSettings(reader_threads=r, prefetch=2 * r, batch_workers=1)))
    out.append(("2 readers, 4 ahead, 2 batch workers", LoaderSettings(reader_threads=2, prefetch=4, batch_workers=2)))
    out.append(("2 reader processes, 4 ahead", LoaderSettings(reader_threads=2, prefetch=4, process_readers=True)))
    out.append(("2 reader processes, 4 ahead, 1 batch process",
                LoaderSettings(reader_threads=2, prefetch=4, process_readers=True, batch_workers=1,
                               process_batches=True)))
    return out


def group_rows_of(ds: Dataset, split: str = "train") -> int:
    rows = [g[2] for g in ds.row_groups(split)]
    return int(sum(rows) / len(rows)) if rows else 0



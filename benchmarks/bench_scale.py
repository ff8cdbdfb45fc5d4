"""Tables beyond RAM: a DLRM whose embedding tables are larger than the machine's memory, against the same
model with tables small enough for memory (issue #18, item 5).

    python benchmarks/bench_scale.py --quick                 # 512 MiB of tables, ~3 minutes: checks it end to end
    python benchmarks/bench_scale.py                         # tables 1.2x RAM, budget 1/6 of RAM (hours, disk!)
    python benchmarks/bench_scale.py --quick --json runs/scale.json --keep

Sizing. RAM is MemTotal (/proc/meminfo). The 26 tables are Criteo Kaggle's published cardinalities, all
scaled by one factor so that rows x (dim + 1) float32 (the weights plus row-wise Adagrad's one float of
state per row) reach --ram-factor x RAM (default 1.2); the memory budget is --budget-fraction of RAM
(default 1/6). ``--tables SIZE`` (``--quick``: 512 MiB) sets the table bytes instead; the budget then keeps
the same tables : budget ratio (7.2 at the defaults), as on a machine with tables / --ram-factor of RAM.
Disk. The benchmark keeps its disk use below 70% of the space free where --workdir is when it starts: a guard
polls the free space while it runs and stops the benchmark (exit 1, files removed) the moment its use passes
that share. Before anything runs it is refused (exit 2, one line) when the budget is not below the tables, or
when what the run surely writes -- the full copy of the tables' rows, both data sets at ~54 B per row, the
probe's scratch file -- already exceeds the share. The worst case is printed beside it, bounded by the run's
length (a table's rows touched, its checkpoints' rows and the logs' runs are at most its lookups): both data
sets, then the larger of the reference's checkpoints and the tiered run's SSD files (rows touched, their
write-back logs' halves and runs), next-use trace files and the larger of its checkpoint chain and the copy.
Lazy files and row-set checkpoints usually take far less than that bound; the guard, not the bound, keeps
the promise.

What runs, each training in its own process (``python -m tierec train``, so each peak RSS is that run's
alone, from ``os.wait4``):

1. ``tierec data synth`` writes two data sets with the same rows, seed and skew ("auto"): one for the large
   tables, one for the reference, whose tables are scaled down to the budget's size. ``--steps`` batches of
   ``--batch-size`` rows and no test split (no evaluation): the run is one epoch. ``--steps`` defaults to 8
   samples per cache row (budget / (row + 152 B of index)), enough at ``--quick`` for the cache to fill and
   evict by step ~30. At 1.2x RAM the default popularity (``--zipf auto``, calibrated to Meta's reuse
   statistics: the larger the table, the steeper) touches too few distinct rows for that (the cache of
   8.4M rows holds them for ~200K steps); ``--zipf 1.0`` makes it evict within the first quarter of a
   6,000-step run (docs/benchmarks.md, "Session 25").
2. reference: the same model, batch, steps and checkpoint interval, every table in memory;
3. tiered: ``--memory-budget B --cache-policy lookahead --direct-io``: the tables beyond the budget in
   O_DIRECT SSD files behind the look-ahead cache; a checkpoint every steps/5 steps (5 in all, one kept);
4. right after it, a full copy of the tiered run's SSD tables (each working file's rows, not its write-back log
   region; dropped from the page cache first; read, written, fsynced), the yardstick for its checkpoints. The
   device is probed (``tierec probe --scratch``: random 4 KiB O_DIRECT reads at queue depths 1 and 32)
   before the first tiered run and after the last copy; a slowdown between the two is reported as such.

With ``--pairs N``, steps 2-4 run N times, the pairs alternately reference first and tiered first (ABBA), and
the speed ratio and the checkpoints' share of the copy are judged on the median over the pairs (each pair's
printed): on this 2-core VM the same code's samples/s drift by 20% or more within minutes, more than one pair
can tell apart. The other figures are the last tiered run's, and peak RSS the highest of each side's runs.

From the runs' metrics.jsonl: table creation (``build_seconds`` of the start record: the model, its tables
and SSD files); the next-use trace pass that the look-ahead cache runs before step 1 (the ``trace`` record:
a second reader of the run's batches, ``--lookahead-trace``); samples/s, the median over the --log-every-step
intervals without a checkpoint (robust to a busy neighbour on a shared VM; the means over the training time
are printed beside), for the whole run and from the first eviction on, and what it compares: the torch
threads each run trained with (the tiered run leaves one core to its look-ahead worker unless --threads is
given) and the worker's CPU; the stall fraction (time waiting for prefetched rows); the hit rate; the first
training record with evictions; each checkpoint's seconds and bytes (the files in its manifest); and the
read amplification: bytes the device read (whole blocks with O_DIRECT, the read-modify-write of packed
write-backs included) per byte of rows read from the files, and beside it per byte of rows the cache
missed (lazy files serve never-written rows without I/O), over the intervals without a checkpoint (a
checkpoint reads whole tables), by quarter of the run (it grows as evicted rows come back from further
away), and the device bytes read per sample (the I/O itself: a smaller cache lowers the ratio by
reading more rows), with the write-back logs' counters (rows staged by next use, folds of a
full map, rows a full map sent home alone); peak RSS against the budget + 0.5 GiB, and what the tiered process holds
beyond its budget against what the in-memory one holds beyond its tables (the fixed overhead of this
model, batch and data, measured), and both runs' resident sets at their sampled peaks split into anonymous memory
and mapped files (/proc/PID/status every 0.2 s: the mapped files are mostly torch's and Arrow's libraries, whose
resident pages depend on the kernel, not the code: ~250 MiB on a 6.18 kernel, docs/benchmarks.md "Session 30").
Each figure is printed beside its target from the issue, PASS or MISS,
with the CPU other processes used during each run (a busy neighbour makes the speed figures noisy). All
files go to a fresh ``bench_scale.*`` directory under --workdir (default: the repository's runs/),
removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tierec.config import format_bytes, parse_bytes  # noqa: E402  (light: no torch in this process)

log = logging.getLogger("bench_scale")

# Criteo Kaggle's published cardinalities (tierec.data.readers.CRITEO_KAGGLE_CARDINALITIES), copied: importing
# that module loads torch, ~250 MB that would show in every child's peak RSS (a child's ru_maxrss starts at
# the RSS of the parent it was forked from).
CRITEO_KAGGLE_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]

GiB = 1 << 30
# Targets of issue #18 item 5.
CREATE_S = 5.0  # table creation, at any size
CHECKPOINT_SHARE = 0.10  # 2nd..5th checkpoint: at most this share of a full copy's time
RSS_OVERHEAD = GiB // 2  # the stated fixed overhead above the budget
RSS_POLL_S = 0.2  # how often a child's resident set's parts are sampled (`RssSampler`)
READ_AMPLIFICATION = 4.0  # at dim 16
SPEED_RATIO = 0.8  # samples/s with the tables beyond RAM, against the in-memory model
DISK_SHARE = 0.70  # of the free space, at most
# Sizing.
QUICK_TABLES = GiB // 2
CHECKPOINTS = 5
INDEX_BYTES_PER_ROW = 201  # a look-ahead cache row's bookkeeping, at most (tierec.storage.tiered.LOOKAHEAD_INDEX_BYTES_PER_ROW)
SAMPLES_PER_CACHE_ROW = 8  # samples that make this generator's distinct rows outgrow a cache of that many rows
DATA_BYTES_PER_ROW = 80  # a synthetic Criteo row on disk (~54 B measured), with margin
DATA_BYTES_MEASURED = 54  # the same, as measured (what the run surely writes)
LOG_MAP_SHARE = 16  # the write-back logs' maps get 1/16 of the budget (tierec.storage.tiered.split_budget)
LOG_MAP_ENTRY = 8  # bytes per map entry (tierec.storage.rowlog.map_entry_bytes): 4 x that many rows of log halves
TRACE_BYTES_PER_LOOKUP = 80  # the next-use trace's files, at most (tierec.train.nextuse: 24 or 80 B per lookup)
DISK_POLL_S = 0.5  # the disk guard's polling interval
PROBE_BYTES = 512 << 20  # the probe's scratch file
COPY_CHUNK = 16 << 20


# ------------------------------------------------------------------------------------------- sizing
@dataclass
class Sizing:
    ram: int
    dim: int
    row_bytes: int
    cards: list[int]  # the large tables
    ref_cards: list[int]  # the reference's, scaled to the budget
    table_bytes: int
    ref_table_bytes: int
    budget: int
    batch_size: int
    steps: int
    checkpoint_every: int
    log_every: int
    emulated_ram: int = 0  # tables / ram_factor: the RAM the sizing stands for (the real RAM unless --tables/--quick)
    file_bytes: int = 0  # the SSD working files at worst: rows touched (padded with --ssd-row-align), the logs
    disk_need: int = 0  # at worst (`disk_need`)
    disk_sure: int = 0  # what the run surely writes (`disk_sure`)
    disk_free: int = 0


def mem_total() -> int:
    """MemTotal of /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def scaled_cardinalities(target_bytes: int, row_bytes: int) -> list[int]:
    """Criteo Kaggle's 26 cardinalities times one factor, so that their rows take about ``target_bytes``."""
    scale = target_bytes / row_bytes / sum(CRITEO_KAGGLE_CARDINALITIES)
    return [max(1, round(c * scale)) for c in CRITEO_KAGGLE_CARDINALITIES]


def default_steps(budget: int, row_bytes: int, batch_size: int, multiple: int) -> int:
    """Steps for the cache to fill and evict: `SAMPLES_PER_CACHE_ROW` samples per (estimated) cache row."""
    cache_rows = budget // (row_bytes + INDEX_BYTES_PER_ROW)
    steps = math.ceil(SAMPLES_PER_CACHE_ROW * cache_rows / batch_size)
    return max(multiple, math.ceil(steps / multiple) * multiple)


def size_run(a: argparse.Namespace) -> Sizing:
    ram = mem_total()
    row_bytes = (a.dim + 1) * 4  # float32 weights + row-wise Adagrad's one float of state (docs/training.md)
    tables = parse_bytes(a.tables, "--tables") if a.tables else (QUICK_TABLES if a.quick else int(a.ram_factor * ram))
    budget = int(tables * a.budget_fraction / a.ram_factor)  # = budget_fraction x RAM at full size
    cards, ref_cards = scaled_cardinalities(tables, row_bytes), scaled_cardinalities(budget, row_bytes)
    multiple = CHECKPOINTS * a.log_every  # checkpoints fall on logged steps
    steps = a.steps or default_steps(budget, row_bytes, a.batch_size, multiple)
    steps = math.ceil(steps / multiple) * multiple
    emulated = ram if not (a.tables or a.quick) else int(tables / a.ram_factor)
    align = row_align(shlex.split(a.tiered_args))
    stride = -(-row_bytes // align) * align if align else row_bytes
    s = Sizing(ram, a.dim, row_bytes, cards, ref_cards, sum(cards) * row_bytes, sum(ref_cards) * row_bytes, budget,
               a.batch_size, steps, steps // CHECKPOINTS, a.log_every, emulated)
    s.file_bytes = ssd_file_bound(s, stride)
    return s


def lookups(s: Sizing, steps: int) -> int:
    """Lookups of one table in ``steps`` steps: one ID per feature and sample (the synthetic data is one-hot)."""
    return steps * s.batch_size


def touched_rows(cards: list[int], n: int) -> int:
    """Rows of tables ``cards`` that ``n`` lookups of each can touch, at most."""
    return sum(min(c, n) for c in cards)


def ssd_file_bound(s: Sizing, stride: int) -> int:
    """The tiered run's SSD files at worst: the rows the run touches, as many again in their write-back logs' two
    run regions (each at most half a table), and the logs' halves (4 x the maps' rows, paid from the budget)."""
    touched = touched_rows(s.cards, lookups(s, s.steps))
    runs = sum(min(c, 2 * min(c, lookups(s, s.steps))) for c in s.cards)
    halves = 4 * (s.budget // LOG_MAP_SHARE // LOG_MAP_ENTRY)
    return (touched + runs + halves) * stride


def checkpoint_bound(s: Sizing, cards: list[int]) -> int:
    """The most a run's checkpoints can take at once: the kept one needs its whole chain (a full checkpoint, then
    increments), up to all `CHECKPOINTS`, each a row set (a row and its 8-byte ID) of at most the rows its interval
    touched."""
    return CHECKPOINTS * touched_rows(cards, lookups(s, s.checkpoint_every)) * (s.row_bytes + 8)


def data_bytes(s: Sizing, per_row: int = DATA_BYTES_PER_ROW) -> int:
    return 2 * s.steps * s.batch_size * per_row  # both data sets


def disk_need(s: Sizing) -> int:
    """Bytes on disk at the peak, at worst: both data sets, then the larger of the reference run's checkpoints
    (deleted after it) and the tiered run's SSD files, next-use trace (every feature's lookups) and checkpoints,
    or, after those are deleted, the full copy of its files."""
    trace = TRACE_BYTES_PER_LOOKUP * lookups(s, s.steps) * len(s.cards)
    tiered = s.file_bytes + max(checkpoint_bound(s, s.cards) + trace, s.table_bytes)
    return data_bytes(s) + max(checkpoint_bound(s, s.ref_cards), tiered) + PROBE_BYTES


def disk_sure(s: Sizing) -> int:
    """Bytes the run surely has on disk at once: both data sets (as measured per row), the full copy of the
    tables' rows and the probe's scratch file."""
    return data_bytes(s, DATA_BYTES_MEASURED) + s.table_bytes + PROBE_BYTES


def row_align(tiered_args: list[str]) -> int:
    """The ``--ssd-row-align`` among the tiered run's extra flags (0: packed rows)."""
    for k, arg in enumerate(tiered_args):
        if arg.startswith("--ssd-row-align="):
            return int(arg.split("=", 1)[1])
        if arg == "--ssd-row-align" and k + 1 < len(tiered_args):
            return int(tiered_args[k + 1])
    return 0


def refusal(s: Sizing, where: Path) -> str | None:
    """Why the run cannot go ahead (budget, disk), or None."""
    if s.budget >= s.table_bytes:
        return (f"the budget {format_bytes(s.budget)} is not below the tables' {format_bytes(s.table_bytes)}: "
                "nothing would be beyond memory (raise --ram-factor or lower --budget-fraction)")
    s.disk_free = free_bytes(where)
    s.disk_need, s.disk_sure = disk_need(s), disk_sure(s)
    if s.disk_sure > DISK_SHARE * s.disk_free:
        return (f"needs at least {format_bytes(s.disk_sure)} of disk (the full copy of {format_bytes(s.table_bytes)} "
                f"of tables, data {format_bytes(data_bytes(s, DATA_BYTES_MEASURED))} for {s.steps:,} steps), more than "
                f"{DISK_SHARE:.0%} of the {format_bytes(s.disk_free)} free under {where} "
                f"({format_bytes(int(DISK_SHARE * s.disk_free))}); use --workdir on a larger disk, lower --ram-factor "
                "or --steps")
    return None


def free_bytes(where: Path) -> int:
    st = os.statvfs(where)
    return st.f_bavail * st.f_frsize


class DiskGuard:
    """Keeps the benchmark's disk use (the free space it took under ``where`` since `start`) at most ``limit``
    bytes: a thread polls the free space every `DISK_POLL_S` and, past the limit, kills the running child
    (`watch`); `check` then raises. ``peak`` is the most it took."""

    def __init__(self, where: Path, limit: int):
        self.where, self.limit = where, int(limit)
        self.free0 = free_bytes(where)
        self.peak = 0
        self.tripped = False
        self._child: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="disk-guard", daemon=True)

    def start(self) -> DiskGuard:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def used(self) -> int:
        return max(0, self.free0 - free_bytes(self.where))

    def _poll(self) -> None:
        while not self._stop.wait(DISK_POLL_S):
            self.sample()

    def sample(self) -> None:
        used = self.used()
        self.peak = max(self.peak, used)
        if used > self.limit and not self.tripped:
            self.tripped = True
            log.error("bench_scale: disk use %s passed the limit %s: stopping", format_bytes(used),
                      format_bytes(self.limit))
            if (child := self._child) is not None:
                child.kill()

    def watch(self, child: subprocess.Popen | None) -> None:
        self._child = child
        if child is not None and self.tripped:
            child.kill()

    def check(self) -> None:
        if self.tripped:
            raise RuntimeError(f"stopped: the benchmark's disk use passed {format_bytes(self.limit)} "
                               f"({DISK_SHARE:.0%} of the {format_bytes(self.free0)} free under {self.where} at the "
                               f"start; the most it took: {format_bytes(self.peak)}); use --workdir on a larger disk, "
                               "lower --ram-factor or --steps")


GUARD: DiskGuard | None = None  # the benchmark's disk guard while `measure` runs


# ------------------------------------------------------------------------------------------- processes
@dataclass
class Child:
    """A finished child process: its stdout, peak RSS, wall time, and the CPU the rest of the machine used
    meanwhile (in cores: a busy neighbour on a shared VM shows here)."""

    out: str
    peak_rss: int
    wall_s: float
    others_cores: float
    rss_parts: dict[str, int] = field(default_factory=dict)  # RssAnon / RssFile / RssShmem (bytes) at the sampled peak


class RssSampler:
    """Polls a process's /proc/PID/status every `RSS_POLL_S` and keeps its resident set's parts -- anonymous memory
    (heap, arenas, tensors), mapped files (shared libraries' pages, memory-mapped files), shared memory -- at the
    highest VmRSS seen. ru_maxrss is exact but one number; the parts say how much of it is the libraries' mapped
    pages, whose size differs by kernel (fault-around, large folios) for the same code."""

    def __init__(self, pid: int):
        self.pid, self.best, self.parts = pid, 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="rss-sampler", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(RSS_POLL_S):
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            kib = {k: int(v.split()[0]) * 1024 for k, _, v in (ln.partition(":") for ln in text.splitlines())
                   if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
            if kib.get("VmRSS", 0) > self.best:
                self.best, self.parts = kib["VmRSS"], {k: v for k, v in kib.items() if k != "VmRSS"}

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.parts


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run_logged(cmd: list[str], logfile: Path) -> Child:
    """Run ``cmd``, its stderr to ``logfile``. A failure raises RuntimeError with the log's tail."""
    log.info("$ %s", shlex.join(cmd))
    busy0, t0 = busy_cpu_s(), time.perf_counter()
    with open(logfile, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        rss = RssSampler(proc.pid)
        if GUARD is not None:
            GUARD.watch(proc)
        assert proc.stdout is not None
        out = proc.stdout.read()
        parts = rss.stop()  # stdout ends as the process exits
        _, status, usage = os.wait4(proc.pid, 0)
        if GUARD is not None:
            GUARD.watch(None)
            GUARD.check()
    wall, busy = time.perf_counter() - t0, busy_cpu_s() - busy0
    code = proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    if code != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"exit {code}: {shlex.join(cmd)}\n" + "\n".join(tail))
    others = max(0.0, busy - usage.ru_utime - usage.ru_stime) / max(wall, 1e-9)
    return Child(out, usage.ru_maxrss * 1024, wall, others, parts)  # ru_maxrss: KiB on Linux


def write_json(path: Path | None, figures: dict) -> None:
    """Every figure of a benchmark run as JSON at ``path`` (its folder made), when a path was given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2))


def signed_bytes(n: int) -> str:
    """``format_bytes`` of a difference that may be negative (the tiered run below its budget)."""
    return format_bytes(n) if n >= 0 else "-" + format_bytes(-n)


def synth(out: Path, cards: list[int], rows: int, seed: int, zipf: str) -> None:
    run_logged([sys.executable, "-m", "tierec", "data", "synth", "--out", str(out), "--rows", str(rows),
                "--seed", str(seed), "--test-fraction", "0", "--max-cardinality", "0", "--zipf", zipf,
                "--cardinalities", ",".join(map(str, cards)), "--no-progress"], out.parent / f"{out.name}.log")


def train(run: Path, data: Path, s: Sizing, a: argparse.Namespace, extra: list[str]) -> tuple[dict, Child]:
    """``tierec train`` into ``run``: (its JSON summary, the process)."""
    cmd = [sys.executable, "-m", "tierec", "train", "--data", str(data), "--out", str(run), "--no-progress",
           "--seed", str(a.seed), "--embedding-dim", str(s.dim), "--batch-size", str(s.batch_size),
           "--max-steps", str(s.steps), "--log-every", str(s.log_every),
           "--checkpoint-every", str(s.checkpoint_every), "--keep-checkpoints", "1"]
    if a.threads:
        cmd += ["--num-threads", str(a.threads)]
    child = run_logged(cmd + extra, run.parent / f"{run.name}.log")
    return json.loads(child.out), child


def probe(workdir: Path, seconds: float) -> list[dict]:
    """``tierec probe`` on a fresh scratch file: random 4 KiB O_DIRECT reads at queue depths 1 and 32."""
    out = workdir / "probe.json"
    run_logged([sys.executable, "-m", "tierec", "probe", "--scratch", str(workdir), "--size", str(PROBE_BYTES),
                "--queue-depths", "1,32", "--seconds", str(seconds), "--json", str(out)], workdir / "probe.log")
    res = json.loads(out.read_text())
    out.unlink()
    return res


def table_extent(f: Path) -> int:
    """Bytes of a working file that hold its table's rows (``num_embeddings`` x the row stride, from the sidecar):
    not the write-back log region after them (tierec.storage.rowlog), which a copy of the table would not need."""
    meta = json.loads(f.with_name(f.name + ".json").read_text())
    return int(meta["num_embeddings"]) * int(meta.get("row_stride", meta["row_bytes"]))


def full_copy(src: Path, dst: Path) -> tuple[float, int]:
    """Copy every table's rows under ``src`` (each file's `table_extent`) into ``dst``, sources dropped from the
    page cache first, each copy fsynced: (seconds, bytes). What a checkpoint that copies whole tables costs at
    least."""
    files = sorted(src.rglob("*.tbl"))
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    dst.mkdir()
    nbytes = 0
    t0 = time.perf_counter()
    for f in files:
        left = table_extent(f)
        with open(f, "rb", buffering=0) as r, open(dst / f.name, "wb", buffering=0) as w:
            while left and (chunk := r.read(min(COPY_CHUNK, left))):
                w.write(chunk)
                nbytes += len(chunk)
                left -= len(chunk)
                if GUARD is not None:
                    GUARD.check()
            os.fsync(w.fileno())
    seconds = time.perf_counter() - t0
    shutil.rmtree(dst)
    return seconds, nbytes


# ------------------------------------------------------------------------------------------- metrics
def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def lowest_tiers(entry: dict) -> tuple[dict, dict]:
    """(the cache right above the files, the files' counters) of one cache entry of a train record: the
    entry's ``backing`` chain followed down to the SSD table or the table group's files."""
    cache: dict = {}
    while entry.get("tier") == "cache":
        cache, entry = entry, entry.get("backing", {})
    return cache, entry if entry.get("tier") in ("ssd", "group") else {}


COUNTERS = ("lookups", "hits", "evictions", "missed_bytes", "bytes_read", "device_bytes_read", "log_bytes_read")


LOG_COUNTERS = ("log_staged_peak", "log_compactions", "log_run_rows", "log_folds", "log_full", "log_recent_rows",
                "log_unranked_batches", "log_kept_rows", "log_bytes_read")


def log_totals(stats) -> dict[str, int]:
    """The write-back log counters (`LOG_COUNTERS`) of a train record's cache stats, summed over every SSD file
    below them: the most rows each file staged by next use, the compactions of full maps into their runs, the
    rows in the runs, the folds of runs home, the rows an append had no room for, the rows read from the log
    sectors held in memory (`tierec.storage.rowlog.RecentSectors`), the batches of unranked rows sent to the logs,
    the rows compactions kept in the logs (read back later), the device bytes the logs' upkeep read (switches
    between halves, compactions)."""
    tot = dict.fromkeys(LOG_COUNTERS, 0)
    if isinstance(stats, dict):
        for k, v in stats.items():
            if k in tot and isinstance(v, int):
                tot[k] += v
            elif isinstance(v, dict):
                for kk, vv in log_totals(v).items():
                    tot[kk] += vv
    return tot


def cache_totals(record: dict) -> dict[str, int]:
    """Counters of a train record summed over its caches: lookups, hits, evictions; missed_bytes, the row
    bytes the cache above the files fetched (misses, never-written rows included); the files' bytes_read
    (rows read from them: lazy files serve never-written rows without I/O) and device_bytes_read (whole
    blocks the device moved, the read-modify-write of packed write-backs included)."""
    tot = dict.fromkeys(COUNTERS, 0)
    for entry in record.get("cache", {}).values():
        for k in ("lookups", "hits", "evictions"):
            tot[k] += entry.get(k, 0)
        cache, files = lowest_tiers(entry)
        tot["missed_bytes"] += cache.get("bytes_read", 0)
        for k in ("bytes_read", "device_bytes_read"):
            tot[k] += files.get(k, 0)
        tot["log_bytes_read"] += log_totals(files)["log_bytes_read"]
    return tot


@dataclass
class Interval:
    """Training between two consecutive train records, with no checkpoint or evaluation in between."""

    start: int  # step
    end: int
    samples: int
    seconds: float
    missed_bytes: int
    bytes_read: int
    device_bytes_read: int
    log_bytes_read: int  # of device_bytes_read: the write-back logs' upkeep (switches, compactions)


@dataclass
class RunFigures:
    build_s: float | None = None
    trace: dict | None = None  # the next-use trace pass (``trace`` record): steps, lookups, seconds
    samples_per_s: float | None = None  # samples / training time (checkpoints and evaluation excluded)
    threads: int | None = None  # torch intra-op threads the model trained with (beside a look-ahead worker: its own)
    worker_cpu_s: float | None = None  # CPU time of the look-ahead worker thread over the run
    steps: int = 0
    stall_fraction: float | None = None
    hit_rate: float | None = None
    first_eviction_step: int | None = None  # first train record with evictions
    checkpoints: list[dict] = field(default_factory=list)  # step, seconds, bytes
    intervals: list[Interval] = field(default_factory=list)
    peak_rss: int = 0
    rss_parts: dict[str, int] = field(default_factory=dict)  # anonymous / mapped files / shared at the sampled peak
    others_cores: float = 0.0  # CPU other processes used during the run
    write_log: dict = field(default_factory=dict)  # the SSD files' write-back log counters at the last train record

    def median_samples_per_s(self, step: int = 0) -> float | None:
        """The median samples/s of the clean intervals that start at ``step`` or later."""
        rates = [i.samples / i.seconds for i in self.intervals if i.start >= step and i.seconds > 0]
        return statistics.median(rates) if rates else None

    def read_amplification(self, per: str = "bytes_read", intervals: list[Interval] | None = None,
                           read: str = "device_bytes_read") -> float | None:
        """Device bytes read per byte of rows read from the files (``per="missed_bytes"``: per byte of rows
        the cache fetched), over the clean intervals (or the given ones); ``read="log_bytes_read"``: the part
        the write-back logs' upkeep read."""
        intervals = self.intervals if intervals is None else intervals
        needed = sum(getattr(i, per) for i in intervals)
        return sum(getattr(i, read) for i in intervals) / needed if needed else None

    def amplification_by_part(self, steps: int, parts: int = 4) -> list[float | None]:
        """`read_amplification` over each of ``parts`` equal stretches of the run's ``steps`` (how it grows as
        rows come back from further away: docs/benchmarks.md)."""
        return [self.read_amplification(intervals=[i for i in self.intervals if k * steps <= i.start * parts < (k + 1) * steps])
                for k in range(parts)]

    def device_bytes_per_sample(self) -> float | None:
        """Device bytes read per training sample over the clean intervals: the I/O a run really costs, which a
        smaller cache can raise while it lowers `read_amplification` (more rows read, each more cheaply)."""
        samples = sum(i.samples for i in self.intervals)
        return sum(i.device_bytes_read for i in self.intervals) / samples if samples else None


def analyse(records: list[dict], summary: dict, child: Child) -> RunFigures:
    """A run's figures from its metrics records, its summary (the ``end`` record) and its process."""
    fig = RunFigures(peak_rss=child.peak_rss, rss_parts=child.rss_parts, others_cores=child.others_cores,
                     samples_per_s=summary.get("samples_per_s"), stall_fraction=summary.get("stall_fraction"))
    prefetch = summary.get("prefetch") or {}
    fig.worker_cpu_s, fig.steps = prefetch.get("worker_cpu_s"), int(summary.get("step") or 0)
    prev_step, prev_samples, prev = 0, 0, cache_totals({})
    clean = True
    for r in records:
        ev = r["event"]
        if ev == "start":
            fig.build_s = r.get("build_seconds")
            fig.threads = r.get("threads")
        elif ev == "trace":
            fig.trace = {k: r[k] for k in ("steps", "lookups", "seconds")}
        elif ev == "checkpoint":
            fig.checkpoints.append({k: r[k] for k in ("step", "seconds", "bytes")})
            clean = False
        elif ev == "eval":
            clean = False
        elif ev == "train":
            tot = cache_totals(r)
            if fig.first_eviction_step is None and tot["evictions"] > 0:
                fig.first_eviction_step = r["step"]
            n = r["samples"] - prev_samples
            if clean and n > 0 and r["samples_per_s"] > 0:
                fig.intervals.append(Interval(prev_step, r["step"], n, n / r["samples_per_s"],
                                              *(tot[k] - prev[k] for k in COUNTERS[3:])))
            if tot["lookups"]:
                fig.hit_rate = tot["hits"] / tot["lookups"]
            fig.write_log = log_totals(r.get("cache", {}))
            prev_step, prev_samples, prev, clean = r["step"], r["samples"], tot, True
    fig.threads = prefetch.get("trainer_threads", fig.threads)
    return fig


# ------------------------------------------------------------------------------------------- report
def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def ratio_line(tiered: list[float | None], memory: list[float | None], note: str = "") -> tuple[str, bool | None]:
    """samples/s of the tiered runs against the reference runs, pair by pair: one pair's figures, or the median
    of the pairs' ratios (judged) with each pair's."""
    pairs = [(t, m) for t, m in zip(tiered, memory, strict=True) if t and m]
    if not pairs:
        return "n/a", None
    ratios = [t / m for t, m in pairs]
    r = statistics.median(ratios)
    if len(pairs) == 1:  # the judged figure with three decimals: 0.796x is a miss that .2f would print as 0.80x
        return f"{pairs[0][0]:,.0f} vs {pairs[0][1]:,.0f} in memory = {r:.3f}x{note}", r >= SPEED_RATIO
    each = ", ".join(f"{t:,.0f} vs {m:,.0f} = {x:.2f}x" for (t, m), x in zip(pairs, ratios, strict=True))
    return f"{r:.3f}x, the median of {len(pairs)} pairs: {each}{note}", r >= SPEED_RATIO


Row = tuple[str, str, str, str]  # measure, measured, target, PASS / MISS / -


def speed_rows(s: Sizing, ts: list[RunFigures], ms: list[RunFigures]) -> list[Row]:
    """Table creation; samples/s against the in-memory model (pair by pair), whole run and from the first eviction
    on."""
    rows: list[Row] = []
    t, m = ts[-1], ms[-1]
    ok = None if t.build_s is None else t.build_s < CREATE_S
    rows.append(("table creation (model build)", f"{t.build_s:.1f} s (in memory: {m.build_s:.1f} s)"
                 if t.build_s is not None and m.build_s is not None else "n/a", f"< {CREATE_S:g} s", verdict(ok)))
    if t.trace is not None:
        rows.append(("next-use trace pass (before step 1)", f"{t.trace['seconds']:.1f} s: {t.trace['steps']:,} steps, "
                     f"{t.trace['lookups']:,} lookups", "", "-"))
    means = (f" (means {t.samples_per_s:,.0f} vs {m.samples_per_s:,.0f})"
             if len(ts) == 1 and t.samples_per_s and m.samples_per_s else "")
    text, ok = ratio_line([x.median_samples_per_s() for x in ts], [x.median_samples_per_s() for x in ms], means)
    rows.append((f"samples/s (median, {s.log_every}-step intervals)", text, f">= {SPEED_RATIO}x", verdict(ok)))
    ev = t.first_eviction_step
    if ev is not None:
        text, ok = ratio_line([x.median_samples_per_s(ev) for x in ts], [x.median_samples_per_s(ev) for x in ms])
        rows.append((f"  from step {ev:,} (evicting)", text, f">= {SPEED_RATIO}x", verdict(ok)))
    if t.threads is not None and m.threads is not None:  # what the ratio compares (docs/lookahead.md)
        worker = (f", beside its look-ahead worker ({t.worker_cpu_s:.1f} s of CPU, "
                  f"{1000 * t.worker_cpu_s / max(t.steps, 1):.0f} ms per step)" if t.worker_cpu_s else "")
        rows.append(("  torch threads training", f"{t.threads}{worker}; in memory {m.threads}", "", "-"))
    return rows


def rss_parts(parts: dict[str, int]) -> str:
    """A resident set's parts (`RssSampler`) in words."""
    if not parts:
        return "n/a"
    return (f"{format_bytes(parts.get('RssAnon', 0))} anonymous + {format_bytes(parts.get('RssFile', 0))} mapped "
            f"files" + (f" + {format_bytes(parts['RssShmem'])} shared" if parts.get("RssShmem") else ""))


def tier_rows(s: Sizing, t: RunFigures, m: RunFigures) -> list[Row]:
    """Stall, hit rate, when evictions start, peak RSS against the budget, read amplification."""
    ev = t.first_eviction_step
    limit = s.budget + RSS_OVERHEAD
    # the fixed overhead of this model, batch and data, measured: the in-memory run less its tables' bytes
    fixed, beyond = m.peak_rss - s.ref_table_bytes, t.peak_rss - s.budget
    amp, amp_missed = t.read_amplification(), t.read_amplification("missed_bytes")
    return [
        ("stall (waiting for rows)", "n/a" if t.stall_fraction is None else f"{t.stall_fraction:.1%} of training time",
         "", "-"),
        ("cache hit rate", "n/a" if t.hit_rate is None else f"{t.hit_rate:.1%}", "", "-"),
        ("evictions start", f"by step {ev:,} of {s.steps:,}" if ev is not None
         else f"none in {s.steps:,} steps (raise --steps)", "cache fills and evicts", verdict(ev is not None)),
        ("peak RSS", f"{format_bytes(t.peak_rss)} (in memory: {format_bytes(m.peak_rss)})",
         f"<= {format_bytes(limit)} (budget + 0.5 GiB)", verdict(t.peak_rss <= limit)),
        ("  beyond the budget, against in memory", f"{signed_bytes(beyond)} (the in-memory run's process without "
         f"its tables: {format_bytes(fixed)})", "<= the in-memory run's", verdict(beyond <= fixed)),
        ("  at the sampled peak", f"{rss_parts(t.rss_parts)} (in memory: {rss_parts(m.rss_parts)})", "", "-"),
        (f"read amplification (dim {s.dim})",
         "n/a" if amp is None else f"{amp:.1f}x: device bytes read / row bytes read from the files",
         f"<= {READ_AMPLIFICATION:g}x", verdict(None if amp is None else amp <= READ_AMPLIFICATION)),
        ("  of which the logs' upkeep", "n/a" if (up := t.read_amplification(read="log_bytes_read")) is None else
         f"{up:.1f}x (switches between log halves, compactions); the steps' reads {amp - up:.1f}x", "", "-"),
        ("  per row byte the cache missed",
         "n/a" if amp_missed is None else f"{amp_missed:.1f}x (never-written rows are not read)", "", "-"),
        ("  by quarter of the run", ", ".join("n/a" if a is None else f"{a:.1f}x" for a in
                                             t.amplification_by_part(s.steps)), "", "-"),
        ("  device bytes read per sample", "n/a" if (per := t.device_bytes_per_sample()) is None else
         f"{per:,.0f} B ({per * s.batch_size / 2**20:.2f} MiB per step)", "", "-"),
        ("  write-back logs", f"{t.write_log.get('log_staged_peak', 0):,} rows staged at most "
         f"({t.write_log.get('log_unranked_batches', 0):,} batches of unranked rows), "
         f"{t.write_log.get('log_compactions', 0):,} compactions ({t.write_log.get('log_run_rows', 0):,} rows in the "
         f"runs, {t.write_log.get('log_kept_rows', 0):,} kept in the logs to be read back), "
         f"{t.write_log.get('log_folds', 0):,} folds home, {t.write_log.get('log_full', 0):,} rows past a full map, "
         f"{t.write_log.get('log_recent_rows', 0):,} rows read from recent sectors (memory)", "", "-"),
    ]


def slowest_share(t: RunFigures, copy_s: float) -> float | None:
    """The slowest of the 2nd..5th checkpoints of a run, as a share of the full copy's time."""
    later = t.checkpoints[1:CHECKPOINTS]
    return max(c["seconds"] for c in later) / copy_s if len(later) > 1 and copy_s else None


def checkpoint_rows(ts: list[RunFigures], copies: list[tuple[float, int]]) -> list[Row]:
    """The full copy, the 1st, 2nd and 5th checkpoint against it, and the slowest of the 2nd..5th (the last tiered run;
    with several, the median over the runs of each one's slowest against the copy made right after it)."""
    t, (copy_s, copy_bytes) = ts[-1], copies[-1]
    rows: list[Row] = [("full copy of the tables' rows", f"{copy_s:.1f} s, {format_bytes(copy_bytes)}", "", "-")]
    target = f"< {CHECKPOINT_SHARE:.0%} of the copy's time"
    for k in (1, 2, CHECKPOINTS):
        if len(t.checkpoints) < k:
            rows.append((f"checkpoint {k}", "not written", "", "MISS"))
            continue
        c = t.checkpoints[k - 1]
        share = c["seconds"] / copy_s if copy_s else math.inf
        text = (f"step {c['step']:,}: {c['seconds']:.2f} s, {format_bytes(c['bytes'])} = {share:.3f}x the copy's "
                f"time, {c['bytes'] / max(copy_bytes, 1):.2f}x its bytes")
        rows.append((f"checkpoint {k}", text, "", "-") if k == 1
                    else (f"checkpoint {k}", text, target, verdict(share < CHECKPOINT_SHARE)))
    shares = [x for x in (slowest_share(r, c[0]) for r, c in zip(ts, copies, strict=True)) if x is not None]
    if shares:
        worst = statistics.median(shares)
        text = (f"{worst:.3f}x the copy's time" if len(ts) == 1 else
                f"{worst:.3f}x the copy's time, the median of {len(shares)} runs: "
                + ", ".join(f"{x:.3f}x (copy {c[0]:.1f} s)" for x, c in zip(shares, copies, strict=True)))
        rows.append((f"checkpoints 2..{min(len(t.checkpoints), CHECKPOINTS)}, slowest", text, target,
                     verdict(worst < CHECKPOINT_SHARE)))
    return rows


def probe_lines(probes: dict[str, list[dict]]) -> list[str]:
    """The probes before and after, and whether the device slowed down between them."""
    lines = []
    for when, res in probes.items():
        figs = ", ".join(f"QD {r['queue_depth']} {r['iops']:,.0f} reads/s (p99 {r['p99_ms']:.1f} ms, stalled "
                         f"{r['stalled']:.0%})" for r in res)
        lines.append(f"  device {when}: {figs}")
    if len(probes) == 2:
        before, after = (max(probes[w], key=lambda r: r["queue_depth"]) for w in probes)
        slower = after["iops"] < 0.7 * before["iops"] or after["stalled"] > before["stalled"] + 0.10
        lines.append("  the device SLOWED DOWN during the run: read the speed and checkpoint figures with that in mind"
                     if slower else "  the device kept its speed through the run (within 30%)")
    return lines


def print_report(s: Sizing, ts: list[RunFigures], ms: list[RunFigures], copies: list[tuple[float, int]],
                 probes: dict[str, list[dict]], zipf: str = "auto") -> list[Row]:
    """The report; with several pairs, the last tiered run's figures (its files were copied), the speed pair by pair,
    and the highest peak RSS and busiest neighbour of each side's runs."""
    t = replace(ts[-1], peak_rss=max(x.peak_rss for x in ts), others_cores=max(x.others_cores for x in ts),
                rss_parts=max(ts, key=lambda x: x.peak_rss).rss_parts)
    m = replace(ms[-1], peak_rss=max(x.peak_rss for x in ms), others_cores=max(x.others_cores for x in ms),
                rss_parts=max(ms, key=lambda x: x.peak_rss).rss_parts)
    rows = speed_rows(s, ts, ms) + tier_rows(s, t, m) + checkpoint_rows(ts, copies)
    print(f"\nbench_scale: {os.cpu_count()} cores, RAM {format_bytes(s.ram)} (MemTotal); "
          f"{format_bytes(s.disk_free)} free on the work directory's disk: {disk_line(s)}")
    print(f"  tables {format_bytes(s.table_bytes)} ({s.table_bytes / s.ram:.2f}x RAM; 26 Criteo-shaped, dim {s.dim}, "
          f"rows + row-wise Adagrad state), budget {format_bytes(s.budget)} ({s.budget / s.ram:.3f} of RAM, tables "
          f"{s.table_bytes / s.budget:.1f}x over it); reference: {format_bytes(s.ref_table_bytes)} of tables in memory")
    if s.emulated_ram != s.ram:
        print(f"  (sized as on a machine with {format_bytes(s.emulated_ram)} of RAM: tables / --ram-factor)")
    print(f"  batch {s.batch_size:,}, {s.steps:,} steps, a checkpoint every {s.checkpoint_every:,}, ID popularity "
          f"{'calibrated (auto)' if zipf == 'auto' else 'Zipf ' + zipf}; look-ahead "
          "cache, O_DIRECT" + (f"; {len(ts)} pairs of runs (ABBA), the other figures from the last tiered run and "
                               "the highest peak RSS" if len(ts) > 1 else ""))
    w0, w1, w2 = (max(len(r[i]) for r in rows) for i in range(3))
    for name, value, target, v in rows:
        print(f"  {name:<{w0}}  {value:<{w1}}  {target:<{w2}}  {v}")
    for line in probe_lines(probes):
        print(line)
    busy = max(t.others_cores, m.others_cores) > 0.25
    runs = "run" if len(ts) == 1 else "runs (the busiest)"
    print(f"  CPU used by other processes meanwhile: {m.others_cores:.2f} cores during the reference {runs}, "
          f"{t.others_cores:.2f} during the tiered {runs} (of {os.cpu_count()})"
          + ("; the machine was NOT quiet: the speed figures are noisy" if busy else ""))
    return rows


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"tables of {format_bytes(QUICK_TABLES)} (unless --tables), same ratio to the budget: a few "
                        "minutes, to check the pipeline end to end")
    p.add_argument("--ram-factor", type=float, default=1.2, help="tables = this x MemTotal (default: 1.2)")
    p.add_argument("--budget-fraction", type=float, default=1 / 6,
                   help="memory budget = this x MemTotal (default: 1/6)")
    p.add_argument("--tables", help="table bytes instead of --ram-factor x RAM, e.g. 4GiB (the budget keeps the "
                                    "ratio --ram-factor : --budget-fraction)")
    p.add_argument("--dim", type=int, default=16, help="embedding dimension (default: 16)")
    p.add_argument("--batch-size", type=int, default=4096, help="default: 4096")
    p.add_argument("--steps", type=int, help=f"training steps, rounded up to a multiple of {CHECKPOINTS} x "
                                             f"--log-every (default: {SAMPLES_PER_CACHE_ROW} samples per estimated "
                                             "cache row)")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics records (default: 10)")
    p.add_argument("--threads", type=int, help="torch threads of each training (default: torch's)")
    p.add_argument("--pairs", type=int, default=1,
                   help="reference and tiered runs, N of each, alternately reference first and tiered first (ABBA); "
                        "the speed ratio is the median of the pairs' (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zipf", default="auto", metavar="ALPHA|auto",
                   help="the data's ID popularity (`tierec data synth --zipf`): 'auto' (default) is calibrated to "
                        "Meta's reuse statistics, under which a table's distinct rows grow slowly (at 1.2x RAM the "
                        "cache holds them for tens of thousands of steps); a plain Zipf exponent such as 1.0 touches "
                        "more rows and makes the cache evict early")
    p.add_argument("--probe-seconds", type=float, default=1.0,
                   help="seconds per queue depth of the device probe before and after (0: no probe)")
    p.add_argument("--tiered-args", default="",
                   help="more `tierec train` flags for the tiered run, e.g. '--ssd-row-align 512'")
    p.add_argument("--workdir", default=str(ROOT / "runs"),
                   help="a fresh bench_scale.* directory is made here (default: runs/ of the repository)")
    p.add_argument("--keep", action="store_true", help="keep the data, runs and logs")
    p.add_argument("--json", help="also write every figure here")
    a = p.parse_args(argv)
    if not (a.ram_factor > 0 and 0 < a.budget_fraction < 1 and a.dim > 0 and a.batch_size > 0 and a.log_every > 0
            and a.pairs > 0):
        p.error("--ram-factor > 0, 0 < --budget-fraction < 1, --dim, --batch-size, --log-every, --pairs > 0")
    return a


def pair_order(pairs: int) -> list[tuple[int, str]]:
    """(pair, "memory" | "tiered") in the order they run: pairs alternately reference first and tiered first
    (ABBA), so that a machine that slows down or speeds up through the benchmark weighs on both sides alike."""
    kinds = ("memory", "tiered")
    return [(i, k) for i in range(pairs) for k in (kinds if i % 2 == 0 else kinds[::-1])]


def measure(a: argparse.Namespace, s: Sizing, work: Path) -> dict:
    """Data, the runs (``--pairs`` of each), the full copy and the probes; every figure."""
    n = s.steps * s.batch_size
    log.info("synthesising %s rows twice: %s of tables, and %s for the reference", f"{n:,}",
             format_bytes(s.table_bytes), format_bytes(s.ref_table_bytes))
    synth(work / "data", s.cards, n, a.seed, a.zipf)
    synth(work / "data-ref", s.ref_cards, n, a.seed, a.zipf)
    tiered = ["--memory-budget", str(s.budget), "--cache-policy", "lookahead", "--direct-io"]
    probes: dict[str, list[dict]] = {}
    runs: dict[str, list[tuple[RunFigures, dict]]] = {"memory": [], "tiered": []}
    copies: list[tuple[float, int]] = []  # the full copy after each tiered run: (seconds, bytes)
    for i, kind in pair_order(a.pairs):
        run = work / (kind if a.pairs == 1 else f"{kind}-{i + 1}")
        if kind == "memory":
            log.info("reference: every table in memory%s", f" (pair {i + 1} of {a.pairs})" if a.pairs > 1 else "")
            summary, child = train(run, work / "data-ref", s, a, [])
        else:
            if a.probe_seconds and not probes:
                probes["before"] = probe(work, a.probe_seconds)
            log.info("tiered: %s of tables in a %s budget, look-ahead cache, O_DIRECT%s", format_bytes(s.table_bytes),
                     format_bytes(s.budget), f" (pair {i + 1} of {a.pairs})" if a.pairs > 1 else "")
            summary, child = train(run, work / "data", s, a, tiered + shlex.split(a.tiered_args))
        shutil.rmtree(run / "checkpoints")  # room for the copy
        runs[kind].append((analyse(read_metrics(run), summary, child), summary))
        if kind == "tiered":
            log.info("full copy of the SSD table files")
            copies.append(full_copy(run / "tables", work / "copy"))
            shutil.rmtree(run / "tables")  # one tiered run's files at a time on the disk
    if a.probe_seconds:
        probes["after"] = probe(work, a.probe_seconds)
    ts, ms = [f for f, _ in runs["tiered"]], [f for f, _ in runs["memory"]]
    rows = print_report(s, ts, ms, copies, probes, a.zipf)
    return {"sizing": asdict(s), "disk_peak_bytes": GUARD.peak if GUARD is not None else None,
            "tiered": asdict(ts[-1]), "memory": asdict(ms[-1]),
            "tiered_summary": runs["tiered"][-1][1], "memory_summary": runs["memory"][-1][1],
            "pairs": [{"memory": asdict(m), "tiered": asdict(t), "full_copy": {"seconds": c[0], "bytes": c[1]}}
                      for m, t, c in zip(ms, ts, copies, strict=True)],
            "full_copy": {"seconds": copies[-1][0], "bytes": copies[-1][1]}, "device": probes,
            "report": [dict(zip(("measure", "measured", "target", "verdict"), r, strict=True)) for r in rows]}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    s = size_run(a)
    parent = Path(a.workdir)
    parent.mkdir(parents=True, exist_ok=True)
    why = refusal(s, parent)
    if why:
        print(f"bench_scale: refused: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench_scale.", dir=parent))
    log.info("work directory %s (%s free): %s", work, format_bytes(s.disk_free), disk_line(s))
    t0 = time.perf_counter()
    global GUARD
    GUARD = DiskGuard(parent, int(DISK_SHARE * s.disk_free)).start()
    try:
        res = measure(a, s, work)
        print(f"  total {time.perf_counter() - t0:.0f} s")
        if a.json:
            Path(a.json).write_text(json.dumps(res | {"args": vars(a)}, indent=2))
    except RuntimeError as e:  # a step failed: its command and the tail of its log
        log.error("bench_scale: %s", e)
        return 1
    finally:
        GUARD.stop()
        GUARD = None
        if a.keep:
            log.info("kept %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def disk_line(s: Sizing) -> str:
    """What the run needs of the disk, and where the guard stops it (and, once it ran, the most it took)."""
    took = f"; the most it took: {format_bytes(GUARD.peak)}" if GUARD is not None and GUARD.peak else ""
    return (f"this run needs at least {format_bytes(s.disk_sure)}, at worst {format_bytes(s.disk_need)}; stopped past "
            f"{format_bytes(int(DISK_SHARE * s.disk_free))} ({DISK_SHARE:.0%}){took}")


if __name__ == "__main__":
    sys.exit(main())

"""An operational model of the input pipeline (Plumber's idea): predicted rows/s of a configuration.

Each stage of `tierec.data.loader` was measured alone (`tierec.data.profile.StageCost`): its wall
seconds per row on one thread ``s``, net of the time the thread waited for a core (other processes'
load: /proc/thread-self/schedstat; its I/O waits stay in), the CPU seconds per row of the whole
process while it ran ``c`` (pyarrow's own threads included), and its serial fraction ``f`` (the
same work split over two threads, net of their waits for a core: what does not run in parallel, the
GIL's share and a shared pool's such as pyarrow's). The machine's state is an input
(`Machine`): the cores other processes leave it, ``free``, and the share of a core one of its
threads gets, ``g = min(1, free)``; ``k`` busy threads get ``min(k, free)`` cores. ``k``: the
consumer's (or the trainer's torch threads), plus each pool's busy threads at the predicted rate
(``X S``, at most its threads): rate and ``k`` are solved together by a few damped iterations. The
stages run in three places (`tierec.data.loader` module doc):

- the reader pool: read + parquet + shuffle + decode of a row group, ``p = min(reader_threads,
  prefetch)`` at a time (with ``prefetch`` 0 they run on the consumer's thread instead);
- the batch pool: dedup (`Batch.from_chunk`) on ``batch_workers`` threads (0: on the consumer's);
- the consumer: batch (cutting chunks into batches), the stages a caller adds (look-ahead ID
  extraction, host-to-device copy) and, in training, the step itself (``1 / trainer rows/s``).

Either pool's workers may be processes (``process_readers``, ``process_batches``): each has its own
interpreter, so the pool scales without its serial fractions (``F = 0``) and its stages leave the GIL
bound; it pays to move its results (`tierec.data.loader.TRANSFER_STAGES`, measured alone on decoded
chunks and scaled by the bytes a row holds): ``send`` in the worker and ``receive`` on the consumer's
thread for a read; for a batch, the consumer sends the chunk and receives the batch, the worker the
reverse; and `MESSAGE_S` a task, on the consumer's side; and when the pass's length is known,
`PROCESS_START_S` a pass spread over its rows. Its processes take cores as threads do, and
`PROCESS_BYTES` of memory each.

Each is a resource with a capacity, and the pipeline runs at the smallest of their bounds:

- a pool of ``p`` workers whose stages take ``S = sum(s)`` seconds per row together:
  ``g p / (S (1 + F (p - 1)))`` rows/s, F their serial fractions weighted by time (Amdahl; 0 for processes)
  (``p = min(reader_threads, prefetch)`` for the readers, ``batch_workers`` for the builders);
- the consumer's one thread: ``g / (S + 1 / trainer rows/s)``;
- the cores it gets: ``cores_for(k) / sum(c)``, the trainer's CPU per row included;
- the GIL: one thread of the process runs Python at a time: ``1 / (sum f s)`` over the stages on its
  threads (the pools' when they are threads, the consumer's) plus `TRAINER_GIL` of the training step.

The stage named the *bottleneck* is the longest stage of the bound that binds; on the consumer's
thread, the trainer when the input stages there take less than `CONSUMER_SHARE` of its time (the
input pipeline keeps up), else the longest input stage there; for the GIL, the stage holding it longest.

Memory: the reads in flight (``prefetch + p`` reads of ``read_groups`` row groups, each holding its
Arrow table and its chunk), the batches built ahead, the decoded cache, and the worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tierec.data.loader import READER_STAGES, TRANSFER_STAGES, LoaderSettings

CONSUMER_SHARE = 0.1  # input stages on the trainer's thread taking a tenth of it or more: the input binds
MESSAGE_S = 2e-4  # a task to a worker process and its result back (~150 us measured on a 2-core VM, idle pool)
PROCESS_START_S = 0.1  # a pass's pool of worker processes started: forked, data set reopened, first read
PROCESS_BYTES = 48 << 20  # a worker process's own memory (forked from the preloaded server, pages shared)
TRAINER_GIL = 0.3  # the share of a CPU training step holding the GIL (Python dispatch, autograd): an estimate


@dataclass(frozen=True)
class StageModel:
    """One stage's measured costs (per row): wall seconds on one thread, process CPU seconds, its serial fraction,
    and the bytes a row holds after it."""

    name: str
    s: float  # wall s/row, one thread, alone
    c: float  # process CPU s/row, alone
    f: float = 0.0  # serial fraction in [0, 1] (the GIL's share, a shared pool's)
    out_bytes: float = 0.0  # bytes per row after this stage

    @property
    def demand(self) -> float:
        """Core-seconds per row: the process's CPU time while the stage ran alone (pyarrow's threads included)."""
        return self.c


@dataclass(frozen=True)
class Machine:
    """What the pipeline may use: ``cores`` (the CPUs this process may run on), ``memory_bytes`` (what is left
    for the pipeline and its cache), ``others``: the cores other processes keep busy, on average
    (`tierec.data.profile.LoadMeter`). ``k`` busy threads of this process get `cores_for` (k) cores, each of
    them `share_for` (k) of a core."""

    cores: float
    memory_bytes: int
    others: float = 0.0

    @property
    def free(self) -> float:
        """Cores left by other processes (at least a tenth of one)."""
        return max(0.1, self.cores - self.others)

    def cores_for(self, k: float) -> float:
        return min(max(k, 1e-9), self.free)

    def share_for(self, k: float) -> float:
        """The share of a core one thread gets: the cores left, at most a whole one (its own threads' contention
        is the cores bound's)."""
        return min(1.0, self.free)


@dataclass(frozen=True)
class TrainerCost:
    """The training step alone, on batches already in memory (`tierec.train.input_probe`): rows/s and CPU
    seconds per row (torch's intra-op threads included)."""

    rows_per_s: float  # net of the time its thread waited for a core
    cpu_s_per_row: float
    wall_rows_per_s: float = 0.0  # as measured (0: same as rows_per_s)
    threads: int = 1  # torch's intra-op threads


@dataclass
class Prediction:
    rows_per_s: float
    limit: str  # "reader pool", "batch pool", "consumer", "cpu", "gil" or "trainer"
    bottleneck: str  # the stage (or "trainer") that binds
    bounds: dict[str, float] = field(default_factory=dict)  # each bound's rows/s
    memory_bytes: int = 0

    def to_dict(self) -> dict:
        return {"rows_per_s": self.rows_per_s, "limit": self.limit, "bottleneck": self.bottleneck,
                "bounds": self.bounds, "memory_bytes": self.memory_bytes}


def pool_rate(stages: list[StageModel], p: int) -> float:
    """Rows/s of ``p`` threads, each a whole core, running ``stages`` one after another per row (Amdahl over
    their serial parts: ``p / (S (1 + F (p - 1)))``, F their serial fractions weighted by time)."""
    total = sum(st.s for st in stages)
    if total <= 0:
        return float("inf")
    f = sum(st.f * st.s for st in stages) / total
    return p / (total * (1 + f * (p - 1)))


def _scaled(stages: dict[str, StageModel], name: str, bytes_per_row: float, as_: str) -> StageModel | None:
    """Transfer stage ``name`` (measured on decoded chunks) for a payload of ``bytes_per_row``, as stage ``as_``."""
    st = stages.get(name)
    if st is None:
        return None
    k = bytes_per_row / st.out_bytes if st.out_bytes > 0 else 1.0
    return StageModel(as_, st.s * k, st.c * k, 0.0, 0.0)


def predict(stages: dict[str, StageModel], settings: LoaderSettings, machine: Machine,
            trainer: TrainerCost | None = None, group_rows: int = 65536, batch_rows: int = 1024,
            cached: bool = False, gil: bool = True, pass_rows: int = 0) -> Prediction:
    """Rows/s of the pipeline under ``settings`` (module doc); ``trainer``: the step runs on the consumer's
    thread too. ``cached``: every row group comes from the decoded cache (read and parquet cost nothing).
    ``gil``: False, the model without the GIL (no GIL bound, no serial fractions): what threads would do if
    they did not share one. ``pass_rows``: the rows of a pass (0: long enough for the start of worker
    processes not to count). Stages not in ``stages`` cost nothing."""
    def get(names) -> list[StageModel]:
        out = [stages[n] for n in names if n in stages]
        if cached:
            out = [st for st in out if st.name not in ("read", "parquet")]
        return out

    readers = get(READER_STAGES)
    builders = get(["dedup"])
    consumer = get([n for n in stages if n not in READER_STAGES and n != "dedup" and n not in TRANSFER_STAGES])
    if settings.prefetch == 0:
        consumer, readers = readers + consumer, []
    if settings.batch_workers == 0:
        consumer, builders = consumer + builders, []
    proc_r, proc_b = bool(readers) and settings.process_readers, bool(builders) and settings.process_batches

    def out_bytes(name: str) -> float:
        return stages[name].out_bytes if name in stages else 0.0

    def add(to: list[StageModel], name: str, payload: float, as_: str) -> None:
        st = _scaled(stages, name, payload, as_)
        if st is not None:
            to.append(st)

    transfer: list[StageModel] = []  # what moving results costs (CPU), wherever it runs
    if proc_r:  # a read's chunks: sent by the worker, received by the consumer; a message a read
        rows = max(group_rows * settings.read_groups, 1)
        add(readers, "send", out_bytes("decode"), "send")
        add(consumer, "receive", out_bytes("decode"), "receive")
        consumer.append(StageModel("message", MESSAGE_S / rows, MESSAGE_S / rows, 1.0))
    if proc_b:  # a batch: its chunk sent by the consumer and received by the worker, the batch the other way
        add(consumer, "send", out_bytes("batch"), "send")
        add(consumer, "receive", out_bytes("dedup"), "receive")
        add(builders, "receive", out_bytes("batch"), "receive")
        add(builders, "send", out_bytes("dedup"), "send")
        consumer.append(StageModel("message", MESSAGE_S / max(batch_rows, 1), MESSAGE_S / max(batch_rows, 1), 1.0))
    if (proc_r or proc_b) and pass_rows > 0:  # the consumer waits for the pools to start, once a pass
        consumer.append(StageModel("start", PROCESS_START_S * (proc_r + proc_b) / pass_rows, 0.0, 0.0))
    for st in [*readers, *builders, *consumer]:
        if st.name in (*TRANSFER_STAGES, "message"):
            transfer.append(st)
    p = min(settings.reader_threads, settings.prefetch)
    step = 1.0 / trainer.rows_per_s if trainer is not None else 0.0
    consumer_s = sum(st.s for st in consumer) + step
    cpu = sum(st.demand for st in get([n for n in stages if n not in TRANSFER_STAGES])) + sum(
        st.demand for st in transfer) + (trainer.cpu_s_per_row if trainer is not None else 0.0)
    base = trainer.threads if trainer is not None else 1
    s_read, s_build = sum(st.s for st in readers), sum(st.s for st in builders)

    def serial(pool: list[StageModel], process: bool) -> list[StageModel]:
        return [replace(st, f=0.0) for st in pool] if process or not gil else pool

    # the GIL: the stages on this process's threads, each holding it f of its time; and the step's share
    holders = [*([] if proc_r else readers), *([] if proc_b else builders), *consumer]
    gil_s = sum(st.f * st.s for st in holders) + TRAINER_GIL * step

    def bounds_at(busy: float) -> dict[str, float]:
        g = machine.share_for(busy)
        out: dict[str, float] = {}
        if readers:
            out["reader pool"] = g * pool_rate(serial(readers, proc_r), p)
        if builders:
            out["batch pool"] = g * pool_rate(serial(builders, proc_b), settings.batch_workers)
        out["consumer"] = g / consumer_s if consumer_s > 0 else float("inf")
        out["cpu"] = machine.cores_for(busy) / cpu if cpu > 0 else float("inf")
        if gil and gil_s > 0:
            out["gil"] = 1.0 / gil_s
        return out

    # Busy threads and the rate depend on each other: a pool thread is busy X * S of the time at rate X, and
    # the cores they get depend on how many are busy: a few damped iterations.
    busy = float(base + (p if readers else 0) + settings.batch_workers)
    for _ in range(8):
        bounds = bounds_at(busy)
        x = min(bounds.values())
        if not x < float("inf"):
            break
        nxt = base + min(p, x * s_read) + min(settings.batch_workers, x * s_build)
        if abs(nxt - busy) < 1e-3:
            break
        busy = (busy + nxt) / 2
    limit = min(bounds, key=lambda k: bounds[k])
    rate = bounds[limit]
    if limit == "reader pool":
        name = max(readers, key=lambda st: st.s).name
    elif limit == "batch pool":
        name = max(builders, key=lambda st: st.s).name
    elif limit == "cpu":
        everything = get([n for n in stages if n not in TRANSFER_STAGES]) + transfer
        name = max(everything, key=lambda st: st.demand).name if everything else "cpu"
        if trainer is not None and trainer.cpu_s_per_row >= max((st.demand for st in everything), default=0.0):
            name = "trainer"
    elif limit == "gil":
        top = max(holders, key=lambda st: st.f * st.s) if holders else None
        name = "trainer" if top is None or TRAINER_GIL * step >= top.f * top.s else top.name
    else:  # the consumer's thread: the input's share of it names an input stage, else the trainer binds
        own = max(consumer, key=lambda st: st.s) if consumer else None
        inputs = sum(st.s for st in consumer)
        if own is None or (step and inputs < CONSUMER_SHARE * consumer_s):
            name, limit = "trainer", "trainer"
        else:
            name = own.name
    return Prediction(rate, limit, name, bounds, memory_bytes(stages, settings, group_rows, batch_rows))


def memory_bytes(stages: dict[str, StageModel], settings: LoaderSettings, group_rows: int, batch_rows: int) -> int:
    """Bytes the pipeline holds at most under ``settings``: reads in flight (a chunk each, and on each thread
    decoding one, a column of Arrow -- bounded here by the whole decoded group; `tierec.data.rowgroup`),
    batches ahead, the cache, the worker processes."""
    def per_row(n: str) -> float:
        return stages[n].out_bytes if n in stages else 0.0

    p = min(settings.reader_threads, settings.prefetch)
    reads = (settings.prefetch + p + 1) * settings.read_groups * group_rows * per_row("decode")
    reads += (p + 1) * group_rows * per_row("parquet")
    ahead = (max(settings.batch_prefetch, settings.batch_workers) + 1 if settings.batch_workers else 1)
    return int(reads + ahead * batch_rows * per_row("dedup") + settings.cache_bytes + settings.processes * PROCESS_BYTES)

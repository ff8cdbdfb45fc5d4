"""Choose the input pipeline's settings from its operational model, within the machine's budget.

`choose` enumerates configurations (`candidates`: reader threads, reads ahead, row groups per read,
batch workers and how far ahead they build, and a cache of decoded row groups when the data set is
read more than once and fits the memory left), predicts each one's rows/s with
`tierec.data.opmodel.predict` -- with the training step on the consumer's thread when its cost is
known -- drops those over the memory budget or over the thread budget, and takes the fastest;
configurations within ``TIE`` of it are equal, and the one with fewer workers, then fewer worker
processes, then less memory, wins. The batches are the same under every configuration
(`tierec.data.loader`), so the choice never changes what a run learns.

Worker processes (``process_readers``, ``process_batches``) are considered when the GIL binds: when the
best configuration of threads falls more than ``GIL_BINDS`` short of what the same candidates would
reach without the GIL (`tierec.data.opmodel.predict` with ``gil=False``), the candidates are run again
with their reader and/or batch workers as processes (which pay to move their results), and one of
those is taken only if it beats the threads by ``PROCESS_MARGIN`` (they cost memory and a start). The
reasons say which, and why.

`DriftMonitor` watches a running pipeline's `StageClock`: when a stage's time per row inside the
pipeline moves by more than ``DRIFT`` from what it was when the settings were chosen (other
processes took cores, the page cache was dropped, the rows got longer), it scales that stage's
model by the change and chooses again; new settings apply from the next read and the next batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from tierec.data.loader import MAX_THREADS, LoaderSettings
from tierec.data.opmodel import Machine, Prediction, StageModel, TrainerCost, predict

log = logging.getLogger(__name__)

TIE = 0.01  # predictions within 1% of the best are equal: fewer threads, then less memory, win
DRIFT = 0.30  # a stage's time per row moving by more than 30% re-plans
MIN_ROWS = 1 << 15  # rows a stage must have seen in a window before its rate counts
CACHE_SHARE = 0.5  # the decoded cache takes at most half the memory left to the pipeline
GIL_BINDS = 0.10  # threads predicted 10% or more below the model without the GIL: worker processes are considered
PROCESS_MARGIN = 0.05  # worker processes must beat the threads by 5% (memory, start-up, moving results)


@dataclass(frozen=True)
class TuneBudget:
    """What the pipeline may use: ``machine`` (effective cores, memory left after the tables), ``threads``
    (most pipeline threads), the split's ``rows`` and decoded bytes per row (for the cache), ``passes`` over
    it (epochs; > 1: a cache pays)."""

    machine: Machine
    threads: int
    rows: int = 0
    decoded_bytes_per_row: float = 0.0
    passes: float = 1.0

    def __post_init__(self):
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass
class Choice:
    settings: LoaderSettings
    prediction: Prediction  # first pass (the cache fills during it)
    rows_per_s: float  # over all passes (the cached ones too)
    considered: int
    rejected_memory: int = 0
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"settings": self.settings.to_dict(), "describe": self.settings.describe(),
                "predicted_rows_per_s": self.rows_per_s, "first_pass": self.prediction.to_dict(),
                "considered": self.considered, "rejected_memory": self.rejected_memory, "reasons": self.reasons}


def candidates(threads: int, group_rows: int, batch_rows: int, processes: bool = False) -> list[LoaderSettings]:
    """The configurations `choose` compares (a few hundred at most); ``processes``: also each with its reader
    and/or batch workers as processes."""
    readers = sorted({r for r in (1, 2, 3, 4, 6, 8) if r <= max(1, threads)})
    groups = sorted({1, max(1, -(-max(32768, 2 * batch_rows) // max(group_rows, 1)))})  # reads of >= 32k rows
    groups = [g for g in groups if g <= 64]
    out = []
    for g in groups:
        for bw in range(0, min(2, threads) + 1):
            ahead = max(2, 2 * bw)
            out.append(LoaderSettings(reader_threads=1, prefetch=0, read_groups=g, batch_workers=bw,
                                      batch_prefetch=ahead))
            for r in readers:
                if r + bw > max(threads, 1) + 1 or r > MAX_THREADS:
                    continue
                for pf in sorted({r, 2 * r}):
                    out.append(LoaderSettings(reader_threads=r, prefetch=pf, read_groups=g, batch_workers=bw,
                                              batch_prefetch=ahead))
    if processes:
        out += [replace(s, process_readers=pr, process_batches=pb) for s in list(out)
                for pr in (False, bool(s.prefetch)) for pb in (False, bool(s.batch_workers)) if pr or pb]
        out = list(dict.fromkeys(out))
    return out


def _with_cache(stages: dict[str, StageModel], s: LoaderSettings, budget: TuneBudget, trainer: TrainerCost | None,
                group_rows: int, batch_rows: int, gil: bool = True) -> tuple[Prediction, float]:
    """(first pass's prediction, rows/s over all passes); ``gil``: as `predict`'s."""
    first = predict(stages, s, budget.machine, trainer, group_rows, batch_rows, gil=gil, pass_rows=budget.rows)
    if not s.cache_bytes or budget.passes <= 1:
        return first, first.rows_per_s
    again = predict(stages, s, budget.machine, trainer, group_rows, batch_rows, cached=True, gil=gil,
                    pass_rows=budget.rows)
    later = budget.passes - 1
    return first, budget.passes / (1 / first.rows_per_s + later / again.rows_per_s)


def choose(stages: dict[str, StageModel], budget: TuneBudget, trainer: TrainerCost | None = None,
           group_rows: int = 65536, batch_rows: int = 1024) -> Choice:
    """The fastest configuration within ``budget`` by the model (module doc)."""
    cache = 0
    data_bytes = int(budget.rows * budget.decoded_bytes_per_row)
    reasons = []
    if budget.passes > 1 and data_bytes and data_bytes * 1.1 <= CACHE_SHARE * budget.machine.memory_bytes:
        cache = int(data_bytes * 1.1)
        reasons.append(f"cache: the decoded split ({data_bytes / 2**20:,.0f} MiB) fits in half the memory left "
                       f"({budget.machine.memory_bytes / 2**20:,.0f} MiB) and is read {budget.passes:.1f} times")
    elif budget.passes > 1 and data_bytes:
        reasons.append(f"no cache: the decoded split ({data_bytes / 2**20:,.0f} MiB) does not fit in half the "
                       f"memory left ({budget.machine.memory_bytes / 2**20:,.0f} MiB)")
    best: tuple[LoaderSettings, Prediction, float] | None = None
    considered = rejected = 0
    free = 0.0  # the best rate of the thread candidates without the GIL

    def consider(cands: list[LoaderSettings]) -> None:
        nonlocal best, considered, rejected, free
        for s in cands:
            for c in sorted({0, 0 if s.process_readers else cache}):  # the cache is the consumer process's
                cand = replace(s, cache_bytes=c)
                first, rate = _with_cache(stages, cand, budget, trainer, group_rows, batch_rows)
                considered += 1
                if first.memory_bytes > budget.machine.memory_bytes:
                    rejected += 1
                    continue
                if not cand.processes:
                    free = max(free, _with_cache(stages, cand, budget, trainer, group_rows, batch_rows, gil=False)[1])
                if best is None or _better(cand, first, rate, *best):
                    best = (cand, first, rate)

    threads = candidates(budget.threads, group_rows, batch_rows)
    consider(threads)
    if best is not None:
        bound = best[2]
        if free > bound * (1 + GIL_BINDS):
            reasons.append(f"worker processes considered: the GIL binds (threads reach {bound:,.0f} rows/s by the "
                           f"model, {free:,.0f} without the GIL)")
            thread_best = best
            consider([s for s in candidates(budget.threads, group_rows, batch_rows, processes=True) if s.processes])
            if best is not thread_best:
                reasons.append(f"worker processes chosen: {best[0].describe()} at {best[2]:,.0f} rows/s against "
                               f"{thread_best[2]:,.0f} with threads")
            else:
                reasons.append(f"worker processes not chosen: none beats the threads' {bound:,.0f} rows/s by "
                               f"{PROCESS_MARGIN:.0%} (moving results costs, and their cores are the same)")
        else:
            reasons.append(f"worker processes not considered: the GIL does not bind (threads reach {bound:,.0f} "
                           f"rows/s by the model, {free:,.0f} without the GIL)")
    if best is None:  # nothing fits: the smallest configuration
        s = LoaderSettings(prefetch=0)
        first, rate = _with_cache(stages, s, budget, trainer, group_rows, batch_rows)
        best = (s, first, rate)
        reasons.append("no configuration fits the memory budget: reads on demand")
    s, first, rate = best
    reasons.append(f"binding: {first.limit} ({first.bottleneck}) at {first.rows_per_s:,.0f} rows/s")
    return Choice(s, first, rate, considered, rejected, reasons)


def _better(s: LoaderSettings, p: Prediction, rate: float, bs: LoaderSettings, bp: Prediction, brate: float) -> bool:
    rate, brate = _score(s, rate), _score(bs, brate)
    if rate > brate * (1 + TIE):
        return True
    if rate < brate * (1 - TIE):
        return False
    return (s.threads, s.processes, p.memory_bytes, -rate) < (bs.threads, bs.processes, bp.memory_bytes, -brate)


def _score(s: LoaderSettings, rate: float) -> float:
    """The rate a configuration competes with: worker processes must beat threads by `PROCESS_MARGIN`."""
    return rate / (1 + PROCESS_MARGIN) if s.processes else rate


class DriftMonitor:
    """Re-plans when the stages' measured rates drift (module doc). ``observe(snapshot)`` takes a
    `StageClock.snapshot` and returns a new `Choice` when the settings should change, else None."""

    def __init__(self, stages: dict[str, StageModel], budget: TuneBudget, choice: Choice,
                 trainer: TrainerCost | None = None, group_rows: int = 65536, batch_rows: int = 1024):
        self.stages, self.budget, self.choice, self.trainer = dict(stages), budget, choice, trainer
        self.group_rows, self.batch_rows = group_rows, batch_rows
        self.baseline: dict[str, float] = {}  # stage -> s/row inside the pipeline, first full window
        self._last: dict[str, dict] = {}
        self.replans = 0

    def _window(self, snapshot: dict) -> dict[str, float]:
        """s/row of each stage since the last observation (stages with at least MIN_ROWS rows)."""
        out = {}
        for k, v in snapshot["stages"].items():
            prev = self._last.get(k, {"rows": 0, "wall_s": 0.0})
            rows, wall = v["rows"] - prev["rows"], v["wall_s"] - prev["wall_s"]
            if rows >= MIN_ROWS and wall > 0:
                out[k] = wall / rows
        return out

    def observe(self, snapshot: dict) -> Choice | None:
        now = self._window(snapshot)
        if not now:
            return None
        self._last = {k: dict(v) for k, v in snapshot["stages"].items()}
        if not self.baseline:
            self.baseline = now
            return None
        drift = {k: now[k] / self.baseline[k] for k in now if k in self.baseline and k in self.stages}
        moved = {k: r for k, r in drift.items() if abs(r - 1) > DRIFT}
        # only stages that matter: a tenth of the pipeline's time per row or more
        total = sum(st.s for st in self.stages.values()) or 1.0
        moved = {k: r for k, r in moved.items() if self.stages[k].s * r >= 0.1 * total}
        if not moved:
            return None
        for k, r in moved.items():
            st = self.stages[k]
            self.stages[k] = replace(st, s=st.s * r, c=st.c * r)
            self.baseline[k] = now[k]
        new = choose(self.stages, self.budget, self.trainer, self.group_rows, self.batch_rows)
        changes = ", ".join(f"{k} x{r:.2f}" for k, r in moved.items())
        if new.settings == self.choice.settings:
            log.info("input autotune: stage rates drifted (%s); the settings stay: %s", changes,
                     new.settings.describe())
            self.choice = new
            return None
        self.replans += 1
        log.info("input autotune: stage rates drifted (%s); new settings: %s (predicted %.0f rows/s)", changes,
                 new.settings.describe(), new.rows_per_s)
        self.choice = new
        return new

"""Choose the input pipeline's settings from its operational model, within the machine's budget.

`choose` enumerates configurations (`candidates`: reader threads, reads ahead, row groups per read,
batch workers and how far ahead they build, and a cache of decoded row groups when the data set is
read more than once and fits the memory left), predicts each one's rows/s with
`tierec.data.opmodel.predict` -- with the training step on the consumer's thread when its cost is
known -- drops those over the memory budget or over the thread budget, and takes the fastest;
configurations within ``TIE`` of it are equal, and the one with fewer threads, then less memory,
wins. The batches are the same under every configuration (`tierec.data.loader`), so the choice never
changes what a run learns.

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


def candidates(threads: int, group_rows: int, batch_rows: int) -> list[LoaderSettings]:
    """The configurations `choose` compares (a few hundred at most)."""
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
    return out


def _with_cache(stages: dict[str, StageModel], s: LoaderSettings, budget: TuneBudget, trainer: TrainerCost | None,
                group_rows: int, batch_rows: int) -> tuple[Prediction, float]:
    """(first pass's prediction, rows/s over all passes)."""
    first = predict(stages, s, budget.machine, trainer, group_rows, batch_rows)
    if not s.cache_bytes or budget.passes <= 1:
        return first, first.rows_per_s
    again = predict(stages, s, budget.machine, trainer, group_rows, batch_rows, cached=True)
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
    for s in candidates(budget.threads, group_rows, batch_rows):
        for c in sorted({0, cache}):
            cand = replace(s, cache_bytes=c)
            first, rate = _with_cache(stages, cand, budget, trainer, group_rows, batch_rows)
            considered += 1
            if first.memory_bytes > budget.machine.memory_bytes:
                rejected += 1
                continue
            if best is None or _better(cand, first, rate, *best):
                best = (cand, first, rate)
    if best is None:  # nothing fits: the smallest configuration
        s = LoaderSettings(prefetch=0)
        first, rate = _with_cache(stages, s, budget, trainer, group_rows, batch_rows)
        best = (s, first, rate)
        reasons.append("no configuration fits the memory budget: reads on demand")
    s, first, rate = best
    reasons.append(f"binding: {first.limit} ({first.bottleneck}) at {first.rows_per_s:,.0f} rows/s")
    return Choice(s, first, rate, considered, rejected, reasons)


def _better(s: LoaderSettings, p: Prediction, rate: float, bs: LoaderSettings, bp: Prediction, brate: float) -> bool:
    if rate > brate * (1 + TIE):
        return True
    if rate < brate * (1 - TIE):
        return False
    return (s.threads, p.memory_bytes, -rate) < (bs.threads, bp.memory_bytes, -brate)


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

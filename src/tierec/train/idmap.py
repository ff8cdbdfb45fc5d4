"""How a batch's stored IDs become table rows, one stage before the model: `IdMaps`.

A data set holds per sparse feature either rows (``IDs < num_embeddings``: nothing to do) or raw
64-bit IDs (``SparseFeature.raw``). A *fixed* table over raw IDs reduces them mod its rows
(`tierec.data.hashing.reduce_raw_torch`: the rows a non-raw conversion would have written); a
*dynamic* table maps them through its `DynamicIndex` (admission, eviction; collision-free).

Training maps batches in step order, possibly a window ahead of the trainer (the look-ahead
pipeline reads its batches from this stage, so its oracle sees slots, not raw IDs). Because the map
runs ahead, its state at the step a checkpoint or an evaluation happens is kept as a *snapshot* when
that step's batch is mapped (`map_batch(..., snapshot=True)`): checkpoints save it, evaluation reads
through it. Evaluation and serving map read-only (`lookup`): an ID without a row reads the default.

One mapped batch: ``MappedBatch`` = the `Batch` with rows in place of raw IDs (values that read the
zero row dropped from their bags) and ``fresh``: per sparse key, the slots given to new IDs at this
step and those IDs (the tables reset them: `EmbeddingBag.use_fresh`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tierec.data.dataset import Batch, Schema
from tierec.data.hashing import reduce_raw_torch
from tierec.errors import ConfigError
from tierec.sparse import KeyedJaggedTensor
from tierec.storage.dynamic import DynamicConfig, DynamicIndex, TableRows


@dataclass
class MappedBatch(Batch):
    """A `Batch` whose IDs are table rows; ``fresh``: sparse key -> (slots int64 [F], raw IDs int64 [F])
    given at this step (dynamic tables)."""

    fresh: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _drop(values: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor,
          weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Values where ``keep`` (bool [N]), and each bag's new length (lengths int64 [B])."""
    ends = torch.cumsum(lengths, 0)
    kept = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(keep.to(torch.int64), 0)])
    new_lengths = kept[ends] - kept[ends - lengths]
    return values[keep], new_lengths, (weights[keep] if weights is not None else None)


_NO_IDS = torch.empty(0, dtype=torch.int64)


def partition_of(raw: torch.Tensor, partitions: int) -> torch.Tensor:
    """The partition of each raw 64-bit ID, int64 [N] in [0, partitions): the high bits of a multiplicative
    hash (independent of the index's own hashing of the key), mod ``partitions``."""
    h = raw.to(torch.int64) * -4658895280553007687  # x 0xBF58476D1CE4E5B9, wrapping
    return ((h >> 20) & ((1 << 43) - 1)) % partitions


def split_capacity(capacity: int, partitions: int) -> list[int]:
    """A dynamic table's slots over its partitions: capacity // P each, the first capacity % P one more."""
    q, r = divmod(capacity, partitions)
    return [q + (p < r) for p in range(partitions)]
SWEEP_WAIT_S = 600  # the longest the map waits for a norm measurement it needs


class IdMaps:
    """Per sparse feature its `TableRows`; the dynamic tables' `DynamicIndex` (one for all of them: one hash
    probe per batch, whatever the number of tables)."""

    def __init__(self, rows: dict[str, TableRows], dynamic: dict[str, DynamicConfig], spill: Path | None = None,
                 resident_bytes: int = 0, partitions: int = 1):
        """``spill``: the index's arrays live in files there, ``resident_bytes`` of their pages in memory (the
        dynamic tables' `TableRows.index_bytes` become their shares of it, what the budget pays).
        ``partitions`` P: each dynamic table's IDs are split by a hash of the raw ID into P partitions of
        capacity / P slots each, laid end to end in its rows (partition p's rows: `partition_rows`), each
        admitting and evicting on its own: P sub-tables of the index. Under torchrun the table's rows are then
        sharded on partition bounds, so a row's owner follows from its raw ID; one process maps identically."""
        if partitions < 1:
            raise ConfigError(f"id_partitions must be >= 1, got {partitions}")
        self.spill, self.resident_bytes, self.partitions = spill, resident_bytes, partitions
        if spill is not None:
            total = sum(r.index_bytes for k, r in rows.items() if k in dynamic) or 1
            rows = {k: replace(r, index_bytes=r.index_bytes * resident_bytes // total) if k in dynamic else r
                    for k, r in rows.items()}
        self.rows, self.configs = rows, dynamic
        self.dynamic = list(dynamic)  # the dynamic features, in order; each P consecutive tables of the index
        P = partitions
        subs = [replace(dynamic[k], capacity=c) for k in self.dynamic
                for c in split_capacity(dynamic[k].capacity, P)]
        names = [k if P == 1 else f"{k}#{p}" for k in self.dynamic for p in range(P)]
        self._bounds = {k: [0, *torch.tensor(split_capacity(dynamic[k].capacity, P)).cumsum(0).tolist()]
                        for k in self.dynamic}  # each feature's partitions' first rows, and its rows
        self.index = DynamicIndex(subs, names, spill, resident_bytes or 1) if dynamic else None
        self.snapshots: dict[int, dict] = {}  # step -> the index's state after mapping that step's batch
        self.step = 0  # the last step mapped
        # evict="l2": the rows measured after step m leave when batch m + sweep_delay is mapped (set by the
        # trainer beyond how far the map runs ahead, so the measurement is always there in time)
        self.sweep_delay = 0
        self._sweeps: dict[int, tuple[int, list[torch.Tensor]]] = {}  # apply step -> (measured step, IDs per table)
        self._sweep_ready = threading.Condition()

    @staticmethod
    def plan(schema: Schema, kind: str, rows: int | None, tables: dict,
             dyn: DynamicConfig) -> tuple[dict[str, TableRows], dict[str, DynamicConfig]]:
        """Each table's `TableRows` and the dynamic tables' configs, from the settings:
        ``kind`` ("fixed" | "dynamic") and ``rows`` (a fixed table's rows over raw IDs, or
        a dynamic table's capacity; default the feature's num_embeddings) for every table, overridden per table
        by ``tables[name].kind`` / ``.rows``; ``dyn``: the dynamic tables' policy (its capacity is replaced)."""
        out_rows, dynamic = {}, {}
        for f in schema.sparse:
            t = tables.get(f.name)
            k = (t.kind if t is not None and t.kind else None) or kind
            if k == "fixed" and not f.raw and t is not None and t.rows:
                raise ConfigError(f"tables.{f.name}.rows: feature {f.name!r} holds rows already (its data set was "
                                  "not written with --raw-ids): rows applies to fixed tables over raw IDs and to "
                                  "dynamic tables")
            n = (t.rows if t is not None and t.rows else None) or rows or f.num_embeddings
            if k == "dynamic":
                c = DynamicConfig(**{**dyn.__dict__, "capacity": n})
                dynamic[f.name] = c
                out_rows[f.name] = TableRows(n, "dynamic", c.index_bytes_per_row * n)
            elif f.raw:
                out_rows[f.name] = TableRows(n, "hashed")
            else:
                out_rows[f.name] = TableRows(f.num_embeddings, "rows")
        if rows and all(r.kind == "rows" for r in out_rows.values()):
            raise ConfigError("--table-rows: the data set's features hold rows already (not written with --raw-ids) "
                              "and no table is dynamic: it applies to fixed tables over raw IDs and to dynamic tables")
        return out_rows, dynamic

    @property
    def active(self) -> bool:
        """Whether any feature's IDs need mapping."""
        return any(r.kind != "rows" for r in self.rows.values())

    def _map(self, kjts: list[KeyedJaggedTensor | None], step: int | None,
             fresh: dict) -> list[KeyedJaggedTensor | None]:
        """``kjts`` (a batch's item-side and user-side KJTs) with rows for IDs: hashed features reduced, the
        dynamic ones mapped (``step``: in training, at that step, filling ``fresh``; None: read-only)."""
        dyn: dict[str, tuple[torch.Tensor, bool]] = {}  # key -> (slots, whether some are -1: the zero row)
        if self.index is not None:
            by_key = {k: jt.values for kjt in kjts if kjt is not None for k, jt in kjt.to_dict().items()}
            ids, orders = self._split([by_key.get(k, _NO_IDS) for k in self.dynamic])
            if step is None:
                parts = self.index.lookup(ids)
                for f, k in enumerate(self.dynamic):
                    v = self._join(f, orders[f], [(x, _NO_IDS, _NO_IDS) for x in self._of(f, parts)])[0]
                    dyn[k] = (v, bool((v < 0).any()))
            else:
                maps = self.index.map(ids, step)
                for f, k in enumerate(self.dynamic):
                    mine = self._of(f, maps)
                    v, fs, fi = self._join(f, orders[f], [(m.slots, m.fresh_slots, m.fresh_ids) for m in mine])
                    dyn[k] = (v, any(m.zero for m in mine))
                    if fs.numel():
                        fresh[k] = (fs, fi)
        return [self._rebuild(kjt, dyn) for kjt in kjts]

    # ------------------------------------------------------------------ partitions
    def _of(self, f: int, per_table: list):
        """Feature ``f``'s entries of a list over the index's tables (its P partitions)."""
        return per_table[f * self.partitions : (f + 1) * self.partitions]

    def partition_rows(self, feature: str) -> list[int]:
        """The first row of each partition of a dynamic feature's table, and its row count: bounds [P + 1]."""
        return self._bounds[feature]

    def slot_range(self, feature: str) -> tuple[int, int]:
        """The index slots of a dynamic feature's rows: row r of its table is index slot a + r (its partitions'
        slots lie end to end)."""
        assert self.index is not None
        t = self.dynamic.index(feature) * self.partitions
        return int(self.index.offsets[t]), int(self.index.offsets[t + self.partitions])

    def _split(self, ids: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Per feature its IDs -> per index table (feature, partition) its IDs, in their order within the
        feature; and per feature the permutation that grouped them (None: one partition)."""
        if self.partitions == 1:
            return ids, [None] * len(ids)
        out: list[torch.Tensor] = []
        orders: list[torch.Tensor | None] = []
        for v in ids:
            part = partition_of(v, self.partitions)
            order = torch.sort(part, stable=True).indices
            counts = torch.bincount(part, minlength=self.partitions).tolist()
            out += list(v.index_select(0, order).split(counts))
            orders.append(order)
        return out, orders

    def _join(self, f: int, order: torch.Tensor | None, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A feature's partitions' (slots, fresh slots, fresh IDs), local to each partition -> the feature's: slots
        in the order of its IDs, partition p's rows shifted by its first row (-1, the zero row, stays)."""
        if order is None:
            return parts[0]
        bounds = self.partition_rows(self.dynamic[f])
        slots = torch.cat([torch.where(s >= 0, s + bounds[p], s) for p, (s, _, _) in enumerate(parts)])
        out = torch.empty_like(slots)
        out[order] = slots
        fresh = torch.cat([fs + bounds[p] for p, (_, fs, _) in enumerate(parts)])
        return out, fresh, torch.cat([fi for _, _, fi in parts])

    def _rebuild(self, kjt: KeyedJaggedTensor | None,
                 dyn: dict[str, tuple[torch.Tensor, bool]]) -> KeyedJaggedTensor | None:
        if kjt is None or not any(self.rows[k].kind != "rows" for k in kjt.keys()):
            return kjt
        vals, lens, wts = [], [], []
        w_all = kjt.weights_or_none()
        for k, jt, lo in zip(kjt.keys(), kjt.split_by_key(), kjt.offset_per_key(), strict=False):
            v, ln = jt.values, jt.lengths
            w = w_all[lo : lo + v.numel()] if w_all is not None else None
            r = self.rows[k]
            if r.kind == "hashed":
                v = reduce_raw_torch(v, r.rows)
            elif r.kind == "dynamic":
                v, zero = dyn[k]
                if zero:  # IDs without a row (-1: the zero row) leave their bags
                    v, ln, w = _drop(v, ln, v >= 0, w)
            vals.append(v)
            lens.append(ln)
            wts.append(w)
        weights = torch.cat(wts) if w_all is not None else None  # type: ignore[arg-type]
        return KeyedJaggedTensor(kjt.keys(), torch.cat(vals), torch.cat(lens), weights, kjt.stride(),
                                 kjt.inverse_indices_or_none(), validate=False)

    def map_batch(self, batch: Batch, step: int, snapshot: bool = False) -> MappedBatch:
        """Training: ``batch`` is step ``step``'s (steps in order); ``snapshot``: keep the index's state after
        it (a step where a checkpoint or an evaluation will read it)."""
        fresh: dict = {}
        self._apply_sweep(step)
        sparse, user = self._map([batch.sparse, batch.user], step, fresh)
        assert sparse is not None
        self.step = step
        if snapshot and self.index is not None:
            self.snapshots[step] = self.state_dict()
        return MappedBatch(batch.dense, sparse, batch.labels, batch.session, user, fresh)

    def lookup_kjt(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Serving: rows of ``kjt``'s IDs, read-only (no row: the default)."""
        out = self._map([kjt], None, {})[0]
        assert out is not None
        return out

    def lookup_batch(self, batch: Batch) -> Batch:
        """Evaluation: rows of ``batch``'s IDs without changing anything (no row: the default)."""
        sparse, user = self._map([batch.sparse, batch.user], None, {})
        return Batch(batch.dense, sparse, batch.labels, batch.session, user)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ norm sweeps (evict="l2")
    def sweeps_at(self, step: int) -> bool:
        """Whether the rows are measured after training step ``step``."""
        ix = self.index
        return ix is not None and ix.cfg.evict == "l2" and step > 0 and step % ix.cfg.decay_every == 0

    def add_sweep(self, measured: int, ids: list[torch.Tensor]) -> None:
        """The trainer's measurement after step ``measured``: per dynamic table the IDs whose rows fell below the
        threshold; they leave when batch ``measured + sweep_delay`` is mapped."""
        with self._sweep_ready:
            self._sweeps[measured + self.sweep_delay] = (measured, ids)
            self._sweep_ready.notify_all()

    def _apply_sweep(self, step: int) -> None:
        measured = step - self.sweep_delay
        if self.index is None or not self.sweeps_at(measured):
            return
        with self._sweep_ready:
            if not self._sweep_ready.wait_for(lambda: step in self._sweeps, timeout=SWEEP_WAIT_S):
                raise RuntimeError(f"dynamic tables: no norm measurement of step {measured} after {SWEEP_WAIT_S} s "
                                   f"(the map of step {step} waits for it)")
            m, ids = self._sweeps[step]
        self.index.evict_ids(self._split(ids)[0], m)

    def pending_sweeps(self, after: int) -> dict[int, tuple[int, list[torch.Tensor]]]:
        """The measurements not applied by step ``after`` (a checkpoint's: resume applies them)."""
        with self._sweep_ready:
            return {k: v for k, v in self._sweeps.items() if k > after}

    def load_sweeps(self, sweeps: dict) -> None:
        with self._sweep_ready:
            self._sweeps = {int(k): (int(m), list(ids)) for k, (m, ids) in sweeps.items()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return self.index.state_dict() if self.index is not None else {}

    def load_state_dict(self, d: dict, step: int) -> None:
        if self.index is None:
            return
        if not d:
            raise ConfigError(f"dynamic table(s) {self.dynamic}: the checkpoint has no index for them (it was "
                              "trained with fixed tables)")
        self.index.load_state_dict(d)
        self.step = step

    def state_at(self, step: int) -> dict:
        """The index as it was after mapping step ``step``'s batch (its snapshot, or the live state when nothing
        was mapped since)."""
        if step in self.snapshots:
            return self.snapshots[step]
        if step == self.step or self.index is None:
            return self.state_dict()
        raise RuntimeError(f"no snapshot of the dynamic tables' index at step {step} (mapped up to {self.step})")

    def reader_at(self, step: int) -> IdMaps:
        """A read-only copy as of step ``step`` (evaluation during training: from its snapshot, as the map may
        run ahead in another thread); the live maps themselves when nothing was mapped since."""
        if self.index is None or (step not in self.snapshots and step == self.step):
            return self
        other = IdMaps(self.rows, self.configs, self.spill, self.resident_bytes, self.partitions)
        other.load_state_dict(self.state_at(step), step)
        return other

    def forget_before(self, step: int) -> None:
        for s in [s for s in list(self.snapshots) if s < step]:
            del self.snapshots[s]
        with self._sweep_ready:
            for s in [s for s in self._sweeps if s < step]:
                del self._sweeps[s]

    def stats(self) -> dict[str, dict]:
        """Per dynamic feature: rows live, capacity and the counters (`DynamicIndex.stats`), its partitions
        summed."""
        if self.index is None:
            return {}
        per = self.index.stats()
        if self.partitions == 1:
            return per
        out: dict[str, dict] = {}
        for k in self.dynamic:
            for p in range(self.partitions):
                for field_, v in per[f"{k}#{p}"].items():
                    out.setdefault(k, {}).setdefault(field_, 0)
                    out[k][field_] += v
        return out

_END = object()


MAP_AHEAD_DEPTH = 2  # batches `map_ahead` maps beyond the one the trainer holds


def map_ahead(stream: Iterable, depth: int = MAP_AHEAD_DEPTH) -> Iterator:
    """Iterate ``stream`` (mapped batches) in a background thread, ``depth`` items ahead: the ID map's work
    (unique, hash probes, admission, eviction) overlaps the training step. Exact: the map is a function of
    the stream alone, and checkpoints and evaluations read its snapshots (`IdMaps.map_batch`). An error in
    the stream is raised here; closing this iterator stops the thread."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def run():
        try:
            for item in stream:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=run, name="tierec-idmap", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a put, then wait for the thread
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(0.05)

"""Next-use trace: for every lookup of a deterministic batch stream, the next step that looks the same ID up.

Training reads its batches as a deterministic stream (steps ``s0, s0 + 1, ...``). For each sparse feature
(one embedding table) a lookup -- one ID in a step's values of that feature -- has a *next-use step*: the
smallest step greater than its own whose values of the same feature hold the same ID, or `NEVER`
(``torch.iinfo(torch.int64).max``) where no later traced step does. A look-ahead cache
(`tierec.storage.lookahead`) takes it for exact Belady eviction and to place write-backs by next use.

Protocol::

    trace = NextUseTrace.build(batches, ids_of, features, start_step=s0, directory=out, memory_bytes=M)
    # consumes ``batches`` once; ids_of(batch) -> {feature: int64 [n]} (a missing feature: 0 lookups)
    if trace.matches(s, ids_of(batch_s)):  # count and 64-bit hash of each feature's lookups at step s
        nxt = trace.at(s)                   # {feature: int64 [n]}, aligned with ids_of(batch_s)[feature]
    trace.close()                           # removes its files (also: ``with trace: ...``)

Storage: a private directory ``directory/next-use.XXXX`` (`tempfile.mkdtemp`). In memory the trace keeps, per
feature, the lookups' offsets per step (int64 [steps + 1]) and a hash per step (uint64 [steps]): ``nbytes``.
The next uses live in one file per feature, int64 [n] in lookup order (`NEVER` stored as is); `at` reads one
step's slice with ``preadv`` (thread-safe: no shared file position).

Algorithm (F features; n lookups of one feature; M = ``memory_bytes``). Memory beyond one batch stays within
about M whatever the ID distribution (a hot ID used by every step included): half of M bounds the
temporaries of a chunk of ``c = M / 2 / BYTES_PER_LOOKUP`` lookups, the other half the carry below.

1. Stream the batches once. Per feature append the IDs (int64) to a spill file ``<i>.ids`` and record the
   step's lookup count and hash.
2. Per feature, walk the lookups *backwards* in chunks, carrying for every ID already seen (that is: used
   later) its first later step and that use's next use, sorted by ID (int64 [U] IDs, steps, next uses). A
   chunk's (ID, step) pairs (int64 [c] each) are stable-argsorted by ID; runs of equal (ID, step) share one
   next use: the next run's step where the next run has the same ID, else the carry's step for that ID --
   or its next use where a step straddles the chunk boundary and the carried step is the run's own --
   `NEVER` where the carry lacks the ID. The chunk's first run of each ID (step, next use) then replaces or
   joins the carry (``searchsorted`` + ``np.insert``).
   Everything is vectorised; no Python loop touches single IDs.
3. The carry holds the distinct IDs used later, up to n. Where n * ``BYTES_PER_CARRIED_ID`` > M / 2 the IDs
   are split into ``P = ceil(n * BYTES_PER_CARRIED_ID / (M / 2))`` partitions by a multiplicative hash
   (``(id * 0x9E3779B97F4A7C15) >> 32``, scaled to ``[0, P)``): a partition's carry holds ~1/P of the
   distinct IDs (the hash spreads distinct IDs, not lookups, so a skewed stream does not unbalance it).
   * P == 1: step 2 reads the spill file and writes the final file directly, chunk by chunk.
   * P > 1: a counting read gives each partition's size; a distribution read writes each chunk's
     (ID, step) pairs (int64 [k, 2]) to the partition's region of ``<i>.parts`` (partition order, lookup
     order within), step 2 runs on each region (reading it backwards in chunks) and writes its next uses
     to the same region of ``<i>.next`` (int64), and a merge read of the spill file puts them back in
     lookup order: per chunk, the partition of each lookup, a stable argsort by partition, and one
     sequential read of each partition's next ``count`` entries.
   I/O per feature: 24n bytes for P == 1, 80n for P > 1, whatever P is.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import weakref
from array import array
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np
import torch

from tierec.fsio import transfer_all
from tierec.storage.lookahead import NEVER

log = logging.getLogger(__name__)

B = TypeVar("B")

# The budget model of pass 2: peak ~= BYTES_PER_LOOKUP * c + BYTES_PER_CARRIED_ID * U (c lookups per chunk,
# U distinct IDs carried). Measured with tracemalloc (numpy reports its buffers to it), chunks of 2^16 lookups:
# * one chunk of distinct IDs (every lookup its own (ID, step) run), empty carry: 150 B per lookup, of which
#   24 B are the new carry; with repeated IDs 59 B;
# * one partition, 8 chunks of distinct IDs (U up to 8c): 374 B per chunk lookup (the model: 144 + 32 * 8 = 400);
# * 8 partitions (the distribution and merge reads included): 150 B (distinct), 57 B (repeated) per lookup.
# tests/test_nextuse.py checks a whole build's traced peak against ``memory_bytes``.
BYTES_PER_LOOKUP = 144
# The carry: 24 B per distinct ID held (ID, step, next use), + 8 while `np.insert` copies one of its arrays.
BYTES_PER_CARRIED_ID = 32
MIN_CHUNK = 1 << 12  # lookups per chunk at the least (syscalls stay amortised): budgets under ~1 MiB are exceeded
MAX_PARTITIONS = 1 << 12  # beyond this the carry outgrows the budget (logged); the merge does P reads per chunk

_FIB = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: the multiplicative hash
_SHIFT32 = np.uint64(32)
_I64 = np.dtype(np.int64).itemsize


def _as_ids(ids: torch.Tensor | None) -> np.ndarray:
    """A feature's IDs as a contiguous int64 numpy array [n] (None: no lookups)."""
    if ids is None:
        return np.empty(0, np.int64)
    return np.ascontiguousarray(ids.detach().reshape(-1).to("cpu", torch.int64).numpy())


def _mix64(x: np.ndarray) -> None:
    """splitmix64's finaliser, in place on a uint64 array."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)


def _step_hash(ids: np.ndarray) -> int:
    """A 64-bit hash of the ID sequence int64 [n]: the wrapped sum of mix(id + (i + 1) * golden) (order counts)."""
    mixed = np.arange(1, ids.size + 1, dtype=np.uint64)
    mixed *= _FIB
    mixed += ids.view(np.uint64)
    _mix64(mixed)
    return (int(np.add.reduce(mixed, dtype=np.uint64)) ^ (ids.size * 0xD6E8FEB86659FD93)) & 0xFFFFFFFFFFFFFFFF


def _partition_of(ids: np.ndarray, partitions: int) -> np.ndarray:
    """The partition of each ID, uint16 [n] in ``[0, partitions)``: top 32 bits of id * golden, scaled."""
    h = ids.view(np.uint64) * _FIB
    h >>= _SHIFT32
    h *= np.uint64(partitions)
    h >>= _SHIFT32
    return h.astype(np.uint16)  # stable argsort of uint16 is a radix sort


def _plan(lookups: int, memory_bytes: int) -> tuple[int, int]:
    """(partitions, lookups per chunk) for a feature of ``lookups`` lookups within ``memory_bytes``."""
    share = max(1, memory_bytes // 2)
    chunk = max(MIN_CHUNK, share // BYTES_PER_LOOKUP)
    partitions = max(1, -(-lookups * BYTES_PER_CARRIED_ID // share))
    if partitions > MAX_PARTITIONS:
        log.warning("next-use trace: %s lookups need %d partitions to stay within %d bytes; using %d (the carry "
                    "may hold more)", f"{lookups:,}", partitions, memory_bytes, MAX_PARTITIONS)
        partitions = MAX_PARTITIONS
    return partitions, chunk


def _read_into(fd: int, out: np.ndarray, offset: int) -> None:
    """Fill the contiguous array ``out`` from file ``fd`` at byte ``offset``."""
    transfer_all(os.preadv, fd, out, offset, "next-use trace", "read")


def _write_from(fd: int, data: np.ndarray, offset: int) -> None:
    """Write the contiguous array ``data`` to file ``fd`` at byte ``offset``."""
    transfer_all(os.pwritev, fd, data, offset, "next-use trace", "write")


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]


def _steps_of(offsets: np.ndarray, lo: int, hi: int, start_step: int) -> np.ndarray:
    """The step of each lookup position in ``[lo, hi)``, int64 [hi - lo] (offsets: int64 [steps + 1])."""
    first = int(np.searchsorted(offsets, lo, "right")) - 1
    last = int(np.searchsorted(offsets, hi - 1, "right")) - 1
    per_step = np.diff(np.clip(offsets[first:last + 2], lo, hi))
    return np.repeat(np.arange(start_step + first, start_step + last + 1, dtype=np.int64), per_step)


class _Carry:
    """For each ID used after the chunks walked so far: its first such step and that use's own next use (a
    step may straddle a chunk boundary: a lookup of the same step then takes the latter). IDs int64 [U]
    sorted, steps int64 [U], next uses int64 [U]."""

    def __init__(self) -> None:
        self.ids = np.empty(0, np.int64)
        self.steps = np.empty(0, np.int64)
        self.next_uses = np.empty(0, np.int64)

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(insertion index int64 [k], whether the ID is held bool [k]) of sorted or unsorted ``ids``."""
        at = np.searchsorted(self.ids, ids)
        if self.ids.size == 0:
            return at, np.zeros(ids.size, bool)
        held = self.ids[np.minimum(at, self.ids.size - 1)] == ids
        return at, held

    def next_use(self, ids: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """The next use after ``steps`` of each ID (int64 [k] each) from the later chunks, `NEVER` where none."""
        at, held = self._find(ids)
        out = np.full(ids.size, NEVER, np.int64)
        at = at[held]
        carried = self.steps[at]
        out[held] = np.where(carried == steps[held], self.next_uses[at], carried)
        return out

    def advance(self, ids: np.ndarray, steps: np.ndarray, next_uses: np.ndarray) -> None:
        """The earlier chunk uses ``ids`` (sorted, distinct) first at ``steps``, next at ``next_uses``: they
        replace or join the carry."""
        at, held = self._find(ids)
        self.steps[at[held]] = steps[held]
        self.next_uses[at[held]] = next_uses[held]
        fresh = ~held
        where = at[fresh]
        self.ids = np.insert(self.ids, where, ids[fresh])
        self.steps = np.insert(self.steps, where, steps[fresh])
        self.next_uses = np.insert(self.next_uses, where, next_uses[fresh])


def _chunk_next_uses(ids: np.ndarray, steps: np.ndarray, carry: _Carry) -> np.ndarray:
    """Next use of each lookup of a chunk, int64 [m], given its IDs and steps (int64 [m], lookup order) and
    the carry of the later chunks; the carry then covers this chunk too."""
    m = ids.size
    if m == 0:
        return np.empty(0, np.int64)
    order = np.argsort(ids, kind="stable")  # within an ID, lookup order: steps non-decreasing
    sorted_ids = ids[order]
    sorted_steps = steps[order]
    new_run = np.empty(m, bool)  # a run: equal (ID, step)
    new_run[0] = True
    np.not_equal(sorted_ids[1:], sorted_ids[:-1], out=new_run[1:])
    new_run[1:] |= sorted_steps[1:] != sorted_steps[:-1]
    run_start = np.flatnonzero(new_run)
    run_id, run_step = sorted_ids[run_start], sorted_steps[run_start]
    del sorted_ids, sorted_steps, run_start
    same_id_next = run_id[1:] == run_id[:-1]  # bool [R - 1]: run r + 1 is the same ID
    run_next = np.empty(run_id.size, np.int64)
    run_next[:-1] = run_step[1:]  # kept only where the next run is the same ID
    last_of_id = np.ones(run_id.size, bool)
    last_of_id[:-1] = ~same_id_next
    run_next[last_of_id] = carry.next_use(run_id[last_of_id], run_step[last_of_id])
    first_of_id = np.ones(run_id.size, bool)
    first_of_id[1:] = ~same_id_next
    carry.advance(run_id[first_of_id], run_step[first_of_id], run_next[first_of_id])
    del run_id, run_step, same_id_next, last_of_id, first_of_id
    run_of = np.cumsum(new_run, dtype=np.int64)
    run_of -= 1
    del new_run
    out = np.empty(m, np.int64)
    out[order] = run_next[run_of]
    return out


def _trace_feature(directory: str, name: str, offsets: np.ndarray, start_step: int, memory_bytes: int) -> int:
    """Pass 2 (and 3) for one feature: ``<name>.ids`` (int64 [n]) -> ``<name>.next`` (int64 [n]); the
    spill file is removed. Returns the partitions used."""
    n = int(offsets[-1])
    partitions, chunk = _plan(n, memory_bytes)
    spill_path, final_path = os.path.join(directory, f"{name}.ids"), os.path.join(directory, f"{name}.next")
    spill = os.open(spill_path, os.O_RDONLY)
    final = os.open(final_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(final, n * _I64)
        if partitions == 1:
            carry = _Carry()
            for lo, hi in reversed(_chunks(n, chunk)):
                ids = np.empty(hi - lo, np.int64)
                _read_into(spill, ids, lo * _I64)
                _write_from(final, _chunk_next_uses(ids, _steps_of(offsets, lo, hi, start_step), carry), lo * _I64)
        else:
            _trace_partitioned(directory, name, spill, final, offsets, start_step, partitions, chunk)
    finally:
        os.close(spill)
        os.close(final)
        os.unlink(spill_path)
    return partitions


def _trace_partitioned(directory: str, name: str, spill: int, final: int, offsets: np.ndarray, start_step: int,
                       partitions: int, chunk: int) -> None:
    """P > 1: count, distribute (ID, step) pairs by partition, walk each partition backwards, merge."""
    n = int(offsets[-1])
    size = np.zeros(partitions, np.int64)
    for lo, hi in _chunks(n, chunk):  # counting read
        ids = np.empty(hi - lo, np.int64)
        _read_into(spill, ids, lo * _I64)
        size += np.bincount(_partition_of(ids, partitions), minlength=partitions)
    base = np.zeros(partitions, np.int64)
    np.cumsum(size[:-1], out=base[1:])
    parts_path, next_path = os.path.join(directory, f"{name}.parts"), os.path.join(directory, f"{name}.part-next")
    parts = os.open(parts_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    nexts = os.open(next_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        filled = base.copy()  # distribution read: partition p's pairs go to entries [base[p], base[p] + size[p])
        for lo, hi in _chunks(n, chunk):
            ids = np.empty(hi - lo, np.int64)
            _read_into(spill, ids, lo * _I64)
            part = _partition_of(ids, partitions)
            order = np.argsort(part, kind="stable")
            counts = np.bincount(part, minlength=partitions)
            del part
            pairs = np.empty((hi - lo, 2), np.int64)  # (ID, step), partition order, lookup order within
            pairs[:, 0] = ids[order]
            del ids
            pairs[:, 1] = _steps_of(offsets, lo, hi, start_step)[order]
            del order
            ends = np.cumsum(counts)
            for p in np.flatnonzero(counts).tolist():
                _write_from(parts, pairs[ends[p] - counts[p]:ends[p]], int(filled[p]) * 2 * _I64)
            filled += counts
        for p in range(partitions):  # step 2 on each partition's region
            carry = _Carry()
            for lo, hi in reversed(_chunks(int(size[p]), chunk)):
                pairs = np.empty((hi - lo, 2), np.int64)
                _read_into(parts, pairs, int(base[p] + lo) * 2 * _I64)
                _write_from(nexts, _chunk_next_uses(pairs[:, 0], pairs[:, 1], carry), int(base[p] + lo) * _I64)
        os.close(parts)
        parts = -1
        os.unlink(parts_path)
        taken = base.copy()  # merge read: lookup order back
        for lo, hi in _chunks(n, chunk):
            ids = np.empty(hi - lo, np.int64)
            _read_into(spill, ids, lo * _I64)
            part = _partition_of(ids, partitions)
            del ids
            order = np.argsort(part, kind="stable")
            counts = np.bincount(part, minlength=partitions)
            del part
            by_partition = np.empty(hi - lo, np.int64)
            ends = np.cumsum(counts)
            for p in np.flatnonzero(counts).tolist():
                _read_into(nexts, by_partition[ends[p] - counts[p]:ends[p]], int(taken[p]) * _I64)
            taken += counts
            in_order = np.empty(hi - lo, np.int64)
            in_order[order] = by_partition
            _write_from(final, in_order, lo * _I64)
    finally:
        if parts >= 0:
            os.close(parts)
        os.close(nexts)
        for path in (parts_path, next_path):
            if os.path.exists(path):
                os.unlink(path)


def _remove(fds: list[int], directory: str) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
    shutil.rmtree(directory, ignore_errors=True)


class NextUseTrace:
    """Each lookup's next-use step for a stream of steps ``start_step ..``, built by `build` within a memory
    budget and read back per step by `at` (see the module docstring for the protocol and the algorithm).

    ``steps``: the traced steps; ``lookups``: all features' lookups; ``seconds``: the build's time;
    ``partitions``: the most ID partitions a feature needed; ``nbytes``: what the trace holds in memory;
    ``directory``: its private directory (removed by `close`)."""

    def __init__(self, directory: str, features: list[str], start_step: int, offsets: list[np.ndarray],
                 hashes: list[np.ndarray], seconds: float, partitions: int):
        self.directory = directory
        self.features = list(features)
        self.start_step = start_step
        self._offsets = offsets  # per feature int64 [steps + 1]
        self._hashes = hashes  # per feature uint64 [steps]
        self.steps = len(hashes[0]) if hashes else 0
        self.lookups = int(sum(int(o[-1]) for o in offsets))
        self.seconds = seconds
        self.partitions = partitions
        self.nbytes = sum(o.nbytes + h.nbytes for o, h in zip(offsets, hashes, strict=True))
        self._fds: list[int] = []
        self._remover = weakref.finalize(self, _remove, self._fds, directory)  # also if never closed
        for i in range(len(features)):
            self._fds.append(os.open(os.path.join(directory, f"{i}.next"), os.O_RDONLY))

    @classmethod
    def build(cls, batches: Iterable[B], ids_of: Callable[[B], dict[str, torch.Tensor]], features: list[str],
              start_step: int, directory: str | os.PathLike, memory_bytes: int) -> NextUseTrace:
        """Consume ``batches`` (step ``start_step`` first) once and trace ``features``' lookups (``ids_of(batch)``:
        feature -> int64 [n] IDs; a missing feature looks nothing up) within about ``memory_bytes``
        beyond one batch, in a new private directory under ``directory``."""
        t0 = time.perf_counter()
        root = tempfile.mkdtemp(prefix="next-use.", dir=directory)
        try:
            counts = [array("q") for _ in features]
            hashes = [array("Q") for _ in features]
            spills = [open(os.path.join(root, f"{i}.ids"), "wb") for i in range(len(features))]
            try:
                for batch in batches:  # pass 1
                    by_feature = ids_of(batch)
                    for i, feature in enumerate(features):
                        ids = _as_ids(by_feature.get(feature))
                        counts[i].append(ids.size)
                        hashes[i].append(_step_hash(ids))
                        if ids.size:
                            spills[i].write(ids.view(np.uint8).data)
            finally:
                for f in spills:
                    f.close()
            offsets, step_hashes, partitions = [], [], 0
            for i, feature in enumerate(features):  # passes 2 and 3
                t1 = time.perf_counter()
                off = np.zeros(len(counts[i]) + 1, np.int64)
                np.cumsum(np.frombuffer(counts[i], np.int64), out=off[1:])
                counts[i] = array("q")
                used = _trace_feature(root, str(i), off, start_step, memory_bytes)
                log.debug("next-use trace of %s: %s lookups, %d partition(s), %.2f s", feature, f"{int(off[-1]):,}",
                          used, time.perf_counter() - t1)
                offsets.append(off)
                step_hashes.append(np.frombuffer(hashes[i], np.uint64).copy())
                partitions = max(partitions, used)
            return cls(root, features, start_step, offsets, step_hashes, time.perf_counter() - t0, partitions)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise

    def _index(self, step: int) -> int:
        i = step - self.start_step
        if not 0 <= i < self.steps:
            raise IndexError(f"step {step} is outside the traced steps [{self.start_step}, "
                             f"{self.start_step + self.steps})")
        return i

    def at(self, step: int) -> dict[str, torch.Tensor]:
        """Feature -> int64 [n]: the next-use step of each of step ``step``'s lookups of that feature, aligned
        with ``ids_of(batch)[feature]`` (`NEVER`: no later traced step looks the ID up)."""
        if not self._remover.alive:
            raise ValueError("the next-use trace is closed")
        i = self._index(step)
        out = {}
        for feature, off, fd in zip(self.features, self._offsets, self._fds, strict=True):
            lo, hi = int(off[i]), int(off[i + 1])
            next_use = np.empty(hi - lo, np.int64)
            _read_into(fd, next_use, lo * _I64)
            out[feature] = torch.from_numpy(next_use)
        return out

    def matches(self, step: int, ids: dict[str, torch.Tensor]) -> bool:
        """Whether ``ids`` (feature -> IDs; others ignored, a missing feature: none) are the lookups traced for
        step ``step``: per feature the same count and 64-bit hash. False outside the traced steps."""
        i = step - self.start_step
        if not 0 <= i < self.steps or not self._remover.alive:
            return False
        for feature, off, step_hash in zip(self.features, self._offsets, self._hashes, strict=True):
            looked_up = _as_ids(ids.get(feature))
            if looked_up.size != off[i + 1] - off[i] or _step_hash(looked_up) != int(step_hash[i]):
                return False
        return True

    def close(self) -> None:
        """Close and remove the trace's files (idempotent)."""
        self._remover()

    def __enter__(self) -> NextUseTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

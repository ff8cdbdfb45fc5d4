"""Look-ahead oracle caching: next-use oracle, Belady optimality, and bit-identical training."""

import gc
import threading
import json
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from tierec.sim.policies import min_hit_rate
from tierec.data.dataset import Batch
from tierec.errors import ConfigError
from tierec.modules.embedding import TableConfig, build_collection
from tierec.storage.base import InMemoryTable
from tierec.storage.cache import CachedTable
from tierec.modules.optim import SparseOptimizer
from tierec.sparse import KeyedJaggedTensor
from tierec.storage.lookahead import NEVER, UNTRACKED_WITHIN, LookaheadCache, NextUseOracle
from tierec.storage.ssd import SsdTable
from tierec.train.pipeline import LookaheadPipeline, Member, PrefetchTarget
from tierec.train.trainer import in_memory_members, prefetch_targets

from test_tiered import cfg, table_rows


# ---------------------------------------------------------------------------- oracle
def brute_next_use(steps, t, window_end):
    """Next step in (t, window_end] that uses each ID of step t (NEVER if none)."""
    out = []
    for i in steps[t]:
        nxt = next((s for s in range(t + 1, window_end + 1) if i in set(steps[s])), NEVER)
        out.append(nxt)
    return out


@pytest.mark.parametrize("window", [1, 3, 40, 10_000])
def test_oracle_matches_brute_force(window):
    rng = np.random.default_rng(window)
    n = 300
    steps = [np.unique(rng.zipf(1.3, size=rng.integers(0, 30)) % 500).tolist() for _ in range(n)]
    o = NextUseOracle()
    observed = -1
    for t in range(n):
        while observed < min(n - 1, t + window - 1):  # the window: steps t .. t+window-1 observed
            observed += 1
            first = o.observe(observed, torch.tensor(steps[observed], dtype=torch.int64))
            earlier = set().union(*[set(steps[s]) for s in range(t, observed)]) if observed > t else set()
            assert first.tolist() == [i not in earlier for i in steps[observed]]
        got = o.consume(t).tolist()
        assert got == brute_next_use(steps, t, observed), t
    assert len(o) == 0 and o.occurrences == 0


def trace_next_uses(steps):
    """Each step's next use of each of its IDs over the whole run (NEVER: none), from the end backwards."""
    last, out = {}, [None] * len(steps)
    for t in range(len(steps) - 1, -1, -1):
        out[t] = [last.get(i, NEVER) for i in steps[t]]
        last.update((i, t) for i in steps[t])
    return out


@pytest.mark.parametrize("window", [1, 3, 40])
def test_oracle_with_a_trace_answers_beyond_the_window(window):
    """Given each ID's next use at observe (a trace of the run), consume answers it at any distance; the map holds
    only the occurrences not used again within UNTRACKED_WITHIN steps, and forgets an ID when its last such
    occurrence in the window is consumed; `first` and `last_use` answer for those occurrences."""
    rng = np.random.default_rng(window)
    n = 300
    steps = [np.unique(rng.zipf(1.3, size=rng.integers(0, 30)) % 500).tolist() for _ in range(n)]
    far = trace_next_uses(steps)
    tracked = [{i for i, nu in zip(steps[s], far[s], strict=True) if nu > s + UNTRACKED_WITHIN} for s in range(n)]
    o = NextUseOracle()
    observed = -1
    for t in range(n):
        while observed < min(n - 1, t + window - 1):
            observed += 1
            first = o.observe(observed, torch.tensor(steps[observed], dtype=torch.int64),
                              torch.tensor(far[observed], dtype=torch.int64))
            earlier = set().union(*tracked[t:observed])  # a tracked occurrence earlier in the window
            assert first.tolist() == [i in tracked[observed] and i not in earlier for i in steps[observed]]
        assert o.consume(t).tolist() == far[t], t
        # the map holds the IDs with a tracked occurrence in the window: those used again soon stay out of it
        assert o._last.live == len(set().union(*tracked[t + 1 : observed + 1]))
        last = o.last_use(torch.arange(500))
        for i in range(0, 500, 7):
            uses = [s for s in range(t + 1, observed + 1) if i in tracked[s]]
            assert last[i] == (uses[-1] if uses else -1), (t, i)
    assert len(o) == 0 and o.occurrences == 0
    assert sum(map(len, tracked)) < sum(map(len, steps)) / 2  # most of this skewed stream's occurrences are hot


def test_a_trace_makes_a_one_step_window_belady_min(shared_data):
    """With the run's next uses a one-step window evicts as the whole-trace window does: Belady's MIN."""
    from tierec.sim.traces import read_arc

    trace = read_arc(shared_data / "arc" / "OLTP.lis.zst", max_requests=6000)
    steps = [torch.tensor([int(x)]) for x in trace]
    far = trace_next_uses([[int(x)] for x in trace])
    for size in (50, 400):
        cache = LookaheadCache(InMemoryTable(int(trace.max()) + 1, 1, 0), size)
        for t, ids in enumerate(steps):
            cache.observe(t, ids, torch.tensor(far[t]))
            cache.release(cache.prepare(t, ids, allow_bypass=True), dirty=False)
        assert cache.stats()["hits"] == round(min_hit_rate(trace, size, bypass=False) * len(trace)), size


@pytest.mark.parametrize("window", [1, 4])
def test_victims_from_candidates_are_those_of_a_whole_pass(shared_data, monkeypatch, window):
    """`LookaheadCache._victims` keeps the lowest keys' slots between passes over the cache: every choice has the
    keys a whole pass would evict (the same hits as Belady's MIN on a traced ARC stream), with passes rare."""
    import tierec.storage.lookahead as la
    from tierec.sim.traces import read_arc

    monkeypatch.setattr(la, "CANDIDATES", 16)
    monkeypatch.setattr(la, "CANDIDATE_STEPS", 2)
    monkeypatch.setattr(la, "CANDIDATE_MIN_ROWS", 0)
    trace = read_arc(shared_data / "arc" / "OLTP.lis.zst", max_requests=12000)
    steps = [np.unique(c).tolist() for c in np.array_split(trace.astype(np.int64), 1500)]  # ~8 IDs a step
    far = trace_next_uses(steps)
    checked, passes = [0], [0]

    class WholePass(LookaheadCache):
        def _victims(self, need, protect):
            return CachedTable._victims(self, need, protect)

    class Checked(LookaheadCache):
        def _victims(self, need, protect):
            key = self._victim_key()  # a whole pass, for comparison
            key.index_fill_(0, protect, la._MAX)
            key.index_fill_(0, torch.nonzero(self._pins[: self.size]).squeeze(1), la._MAX)
            lowest = torch.sort(key).values[:need]
            got = super()._victims(need, protect)
            assert got is not None and got.unique().numel() == need
            assert torch.equal(torch.sort(key.index_select(0, got)).values, lowest)
            checked[0] += 1
            return got

        def _victim_key(self, slots=None):
            passes[0] += slots is None  # a whole pass (candidates' keys are read by slot)
            return super()._victim_key(slots)

    ref = WholePass(InMemoryTable(int(trace.max()) + 1, 1, 0), 300)
    cache = Checked(InMemoryTable(int(trace.max()) + 1, 1, 0), 300)
    for c in (ref, cache):
        pending = []
        for t, ids in enumerate(steps):
            c.observe(t, torch.tensor(ids), torch.tensor(far[t]))
            pending.append(c.prepare(t, torch.tensor(ids)))
            if len(pending) == window:  # the trainer releases a step once ``window`` are prepared
                c.release(pending.pop(0), dirty=False)
    assert checked[0] > 500
    assert passes[0] - checked[0] < checked[0] / 2  # a pass of its own (beside the check's) in few calls
    assert cache.stats()["hits"] == ref.stats()["hits"]


def test_oracle_rejects_out_of_order_steps():
    o = NextUseOracle()
    o.observe(3, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="must increase"):
        o.observe(3, torch.tensor([1]))
    with pytest.raises(ValueError, match="oldest"):
        o.consume(4)


# ---------------------------------------------------------------------------- Belady
def run_protocol(cache, steps, window, dirty=True):
    """Drive a LookaheadCache by hand: observe `window` steps ahead, prepare/acquire/release each step."""
    observed = -1
    for t, ids in enumerate(steps):
        while observed < min(len(steps) - 1, t + window - 1):
            observed += 1
            cache.observe(observed, steps[observed])
        ws = cache.prepare(t, ids, allow_bypass=True)
        assert ws is not None
        cache.release(ws, dirty=dirty)


def test_full_window_equals_min_on_arc_trace(shared_data):
    """One request per step, window = whole trace: hits == Belady's MIN (every miss admitted)."""
    from tierec.sim.traces import read_arc

    trace = read_arc(shared_data / "arc" / "OLTP.lis.zst", max_requests=6000)
    steps = [torch.tensor([int(x)]) for x in trace]
    n_pages = int(trace.max()) + 1
    for size in (50, 400):
        cache = LookaheadCache(InMemoryTable(n_pages, 1, 0), size)
        run_protocol(cache, steps, window=len(steps), dirty=False)
        st = cache.stats()
        assert st["lookups"] == len(trace)
        assert st["hits"] == round(min_hit_rate(trace, size, bypass=False) * len(trace)), size


def test_short_window_is_between_lru_and_min(shared_data):
    from tierec.sim.policies import lru_hit_rate
    from tierec.sim.traces import read_arc

    trace = read_arc(shared_data / "arc" / "OLTP.lis.zst", max_requests=6000)
    steps = [torch.tensor([int(x)]) for x in trace]
    size = 200
    rates = {}
    for w in (1, 20, 500):
        cache = LookaheadCache(InMemoryTable(int(trace.max()) + 1, 1, 0), size)
        run_protocol(cache, steps, window=w, dirty=False)
        rates[w] = cache.stats()["hit_rate"]
    assert rates[500] <= min_hit_rate(trace, size, bypass=False) + 1e-12
    assert rates[500] > lru_hit_rate(trace, size) and rates[500] >= rates[20] >= rates[1] - 0.02, rates


# ---------------------------------------------------------------------------- exactness
def make_batches(rng, n_steps, B, keys, card, zipf=1.2, empty_every=0):
    out = []
    for s in range(n_steps):
        vals, lens = [], []
        for _ in keys:
            ln = rng.integers(0, 4, size=B)
            if empty_every and s % empty_every == 0:
                ln[:] = 0
            v = (rng.zipf(zipf, size=int(ln.sum())) - 1) % card
            vals.append(v)
            lens.append(ln)
        kjt = KeyedJaggedTensor(keys, torch.from_numpy(np.concatenate(vals).astype(np.int64)),
                                torch.from_numpy(np.concatenate(lens).astype(np.int64)), stride=B)
        out.append(Batch(torch.zeros(B, 1), kjt, torch.zeros(B)))
    return out


class Taker:
    """Takes the `Lookup` the pipeline hands down for a step, as an `EmbeddingBag` does."""

    def __init__(self):
        self.lookup = None

    def use_lookup(self, lookup):
        self.lookup = lookup

    def take(self):
        lk, self.lookup = self.lookup, None
        assert lk is not None, "the pipeline handed no rows for this step"
        return lk


def raw_targets(caches: dict) -> tuple[list, dict]:
    """One target per cache (sparse key -> `LookaheadCache`), each feeding a `Taker`."""
    takers = {k: Taker() for k in caches}
    return [PrefetchTarget(k, c, (Member(takers[k], k),)) for k, c in caches.items()], takers


def train_tables(batches, storage_factory, optimizer, pipeline_kw=None, card=60, dim=4, step_s=0.0,
                 in_memory=False):
    keys = ["a", "b"]
    ebc = build_collection([TableConfig(k, card, dim) for k in keys], SparseOptimizer(optimizer, 0.1), seed=3,
                           storage_factory=storage_factory)
    head = torch.linspace(-1, 1, dim)
    losses = []
    stream = batches
    pipe = None
    if pipeline_kw is not None:
        kw = dict(pipeline_kw, in_memory=in_memory_members(ebc.tables)) if in_memory else pipeline_kw
        pipe = stream = LookaheadPipeline(batches, prefetch_targets(ebc.tables), **kw)
    for b in stream:
        pooled = ebc(b.sparse)  # [B, T, D]
        loss = ((pooled * head).sum(-1).tanh() ** 2).mean()
        loss.backward()
        losses.append(loss.item())
        time.sleep(step_s)  # a slower step: the worker has time to read ahead
    if pipe is not None:
        assert pipe.stats["steps"] == len(batches)
        assert pipe.summary()["trainer_threads"] == torch.get_num_threads()  # what the steps trained with
        pipe.close()
    rows = {}
    for t in ebc.tables:
        t.storage.flush()
        w, s = t.storage.read_rows(0, card)
        rows[t.config.name] = (w.clone(), s.clone())
    return losses, rows, ebc


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
@pytest.mark.parametrize("capacity,window,depth", [
    (1, 5, 2),        # capacity 1: smaller than every batch -> temporary copies, steps in lock-step
    (12, 3, 3),       # smaller than one batch's unique rows for most steps
    (40, 1, 1),       # no look-ahead beyond the step itself
    (40, 8, 4),       # rows updated at t, evicted, needed again shortly after
    (60, 1000, 6),    # window longer than the data; cache holds the whole table
])
def test_lookahead_training_is_bit_identical(tmp_path, optimizer, capacity, window, depth):
    rng = np.random.default_rng(capacity * 7 + window)
    batches = make_batches(rng, 30, 16, ["a", "b"], 60, empty_every=7)
    ref_losses, ref_rows, _ = train_tables(batches, None, optimizer)

    def factory(i, tcfg, sdim):
        ssd = SsdTable(tmp_path / f"{tcfg.name}.tbl", tcfg.num_embeddings, tcfg.embedding_dim, sdim, create=True,
                       init_seed=3, table_index=i)
        return LookaheadCache(ssd, capacity, name=tcfg.name)

    losses, rows, ebc = train_tables(batches, factory, optimizer, dict(window=window, depth=depth))
    assert losses == ref_losses
    for name in rows:
        assert torch.equal(rows[name][0], ref_rows[name][0]) and torch.equal(rows[name][1], ref_rows[name][1])
    st = ebc.tables[0].storage.stats()
    assert st["lookups"] == st["hits"] + st["misses"] > 0
    if capacity < 60:
        assert st["backing"]["bytes_read"] > 0 and st["evictions"] + st["bypass_acquires"] > 0


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_the_worker_deduplicates_the_tables_in_memory_beside_the_cached_ones(tmp_path, monkeypatch, optimizer):
    """Table "a" behind a look-ahead cache, "b" in memory: the pipeline's worker makes b's lookups (the dedup of its
    IDs) ahead of each step, the trainer's thread none, and training is bit-identical to both tables in memory."""
    from tierec.modules.embedding import EmbeddingBag

    rng = np.random.default_rng(11)
    batches = make_batches(rng, 25, 16, ["a", "b"], 60, empty_every=6)
    ref_losses, ref_rows, _ = train_tables(batches, None, optimizer)
    made_on = []
    make = EmbeddingBag.make_lookup

    def spy(self, values):
        made_on.append((self.config.name, threading.current_thread().name))
        return make(self, values)

    monkeypatch.setattr(EmbeddingBag, "make_lookup", spy)

    def factory(i, tcfg, sdim):
        if tcfg.name == "b":
            return None
        ssd = SsdTable(tmp_path / f"{tcfg.name}.tbl", tcfg.num_embeddings, tcfg.embedding_dim, sdim, create=True,
                       init_seed=3, table_index=i)
        return LookaheadCache(ssd, 12, name=tcfg.name)

    losses, rows, ebc = train_tables(batches, factory, optimizer, dict(window=4, depth=2), in_memory=True)
    assert losses == ref_losses
    for name in rows:
        assert torch.equal(rows[name][0], ref_rows[name][0]) and torch.equal(rows[name][1], ref_rows[name][1])
    assert [type(t.storage).__name__ for t in ebc.tables] == ["LookaheadCache", "InMemoryTable"]
    assert len(made_on) == len(batches) and {n for n, _ in made_on} == {"b"}
    assert {t for _, t in made_on} == {"tierec-lookahead"}  # the worker's, never the trainer's
    # b's rows were marked changed exactly as in memory: what checkpoints write
    changed = ebc.tables[1].storage.lazy_rows().changed.ids()
    touched = torch.cat([b.sparse.to_dict()["b"].values for b in batches]).unique().numpy()
    assert np.array_equal(changed, touched)


def test_a_lookup_made_from_other_ids_is_not_used(tmp_path):
    """A table in memory handed a lookup made from other IDs than its forward looks up (a model that looks a table
    up twice in a step) deduplicates its own IDs: the same rows as with no lookup handed."""
    ebc = build_collection([TableConfig("a", 30, 4)], SparseOptimizer("rowwise_adagrad", 0.1), seed=1)
    (t,) = ebc.tables
    ids = torch.tensor([3, 7, 3, 9]), torch.tensor([5, 5, 1, 2])
    offsets = torch.tensor([0, 2, 4])
    t.eval()
    want = t(ids[1], offsets)
    released = []
    handed = t.make_lookup(ids[0])
    t.use_lookup(handed.__class__(handed.ws, handed.inverse, handed.perm, handed.counts,
                                  lambda dirty: released.append(dirty), handed.values))
    assert torch.equal(t(ids[1], offsets), want) and released == [False]
    t.use_lookup(t.make_lookup(ids[1].clone()))  # the same IDs in other memory: used
    assert torch.equal(t(ids[1], offsets), want)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
@pytest.mark.parametrize("capacity,window,depth,host", [
    (2, 5, 2, 0),       # smaller than every step's rows of both tables: temporary copies of the group
    (24, 3, 3, 0),      # smaller than one batch's unique rows for most steps
    (80, 8, 4, 0),      # rows updated at t, evicted, needed again shortly after
    (120, 1000, 6, 0),  # window longer than the data; the cache holds both tables
    (24, 8, 2, 60),     # device <- host <- files, both tiers grouped
])
def test_grouped_lookahead_training_is_bit_identical(tmp_path, optimizer, capacity, window, depth, host):
    """Both tables behind ONE look-ahead cache (`TableGroup`, rows linearized): same losses and rows as
    in memory; the cache's counters cover both tables; eviction is shared across them."""
    from tierec.storage.group import TableGroup, TableView

    rng = np.random.default_rng(capacity * 5 + window)
    batches = make_batches(rng, 30, 16, ["a", "b"], 60, empty_every=7)
    ref_losses, ref_rows, _ = train_tables(batches, None, optimizer)
    group = TableGroup("g")

    def factory(i, tcfg, sdim):
        ssd = SsdTable(tmp_path / f"{tcfg.name}.tbl", tcfg.num_embeddings, tcfg.embedding_dim, sdim, create=True,
                       init_seed=3, table_index=i)
        return group.add(ssd, capacity // 2, tcfg.name, host_rows=host // 2)

    losses, rows, ebc = train_tables(batches, factory, optimizer, dict(window=window, depth=depth, lower_depth=4))
    assert {type(t.storage) for t in ebc.tables} == {TableView}
    assert losses == ref_losses
    for name in rows:
        assert torch.equal(rows[name][0], ref_rows[name][0]) and torch.equal(rows[name][1], ref_rows[name][1])
    st = group.cache.stats()
    assert st["capacity"] == min(capacity // 2 * 2, 120) and st["lookups"] == st["hits"] + st["misses"] > 0
    assert st["lookups"] == sum(int(torch.unique(b.sparse.to_dict()[k].values).numel())
                                for b in batches for k in ("a", "b"))
    if capacity < 120:
        assert st["evictions"] + st["bypass_acquires"] > 0
    if host:
        assert group.cache.backing.stats()["upper_reads"] > 0


def test_table_group_reads_and_writes_its_members_in_their_own_row_numbers(tmp_path):
    """A view reads/writes its member's rows (before the cache exists: the member's file itself; after:
    through the shared cache, newest values first); ConcatTable splits batched calls by member."""
    from tierec.storage.concat import ConcatTable
    from tierec.storage.group import TableGroup

    a = SsdTable(tmp_path / "a.tbl", 10, 2, 1, create=True, init_seed=1, table_index=0)
    b = SsdTable(tmp_path / "b.tbl", 7, 2, 1, create=True, init_seed=1, table_index=1)
    g = TableGroup("g")
    va, vb = g.add(a, 3, "a"), g.add(b, 3, "b")
    assert (va.offset, vb.offset) == (0, 10) and not g.built
    vb.write_rows(2, torch.full((2, 2), 5.0), torch.full((2, 1), 6.0))  # straight to b's file
    assert torch.equal(b.read_rows(2, 4)[0], torch.full((2, 2), 5.0))
    ws = vb.acquire(torch.tensor([0, 3]))  # no pipeline: a temporary copy through the group's cache
    assert torch.equal(ws.weight[ws.index[1]], torch.full((2,), 5.0))
    ws.weight[ws.index] += 1
    vb.release(ws, dirty=True)
    assert g.built and torch.equal(vb.read_rows(3, 4)[0], torch.full((1, 2), 6.0))
    with pytest.raises(RuntimeError, match="cannot join"):
        g.add(a, 1, "late")
    with pytest.raises(ValueError, match="not acquired from this table"):
        va.release(vb.acquire(torch.tensor([1])), dirty=False)
    with pytest.raises(IndexError, match="out of range"):
        va.read_rows(5, 11)
    cat = g.cache.backing
    assert isinstance(cat, ConcatTable) and cat.num_embeddings == 17
    w, s = cat.read(torch.tensor([13, 0, 12]))  # unsorted, across members
    assert torch.equal(w[0], b.read(torch.tensor([3]))[0][0]) and torch.equal(w[1], a.read(torch.tensor([0]))[0][0])
    w2, s2 = cat.read_rows(8, 13)  # spans both members
    assert torch.equal(w2, torch.cat([a.read_rows(8, 10)[0], b.read_rows(0, 3)[0]]))
    with pytest.raises(ConfigError, match="row width"):
        ConcatTable([a, SsdTable(tmp_path / "c.tbl", 4, 3, 1, create=True, init_seed=1)], names=["a", "c"])


def test_group_stopped_mid_step_keeps_the_slices_updates(tmp_path):
    """A pipeline closed while the model holds its slices of a step (an error in the step): the group's
    working set is released dirty, so nothing stays pinned and the slices' updates reach the files."""
    from tierec.storage.group import TableGroup

    rng = np.random.default_rng(1)
    batches = make_batches(rng, 6, 8, ["a", "b"], 60)
    g = TableGroup("g")
    views = [g.add(SsdTable(tmp_path / f"{k}.tbl", 60, 4, 1, create=True, init_seed=3, table_index=i), 20, k)
             for i, k in enumerate("ab")]
    takers = [Taker(), Taker()]
    target = PrefetchTarget("g", g.cache, (Member(takers[0], "a"), Member(takers[1], "b")), g.space)
    pipe = LookaheadPipeline(batches, [target], window=4, depth=2)
    for step, b in zip(range(4), pipe):
        d = b.sparse.to_dict()
        lks = [t.take() for t in takers]
        assert [torch.equal(lk.ws.ids, torch.unique(d[k].values)) for lk, k in zip(lks, "ab")] == [True, True]
        if step == 3:
            ws = lks[0].ws
            ids = ws.ids
            before = ws.weight.index_select(0, ws.index).clone()
            ws.weight.index_add_(0, ws.index, torch.ones(ids.numel(), 4))
            break
        for lk in lks:
            lk.release(True)
    pipe.close()
    assert int(g.cache._pins.sum()) == 0
    g.cache.flush()
    assert torch.equal(views[0].backing.read(ids)[0], before + 1)


@pytest.mark.parametrize("capacity,window,depth,row_align,grouped", [
    (40, 3, 2, 0, False), (120, 8, 4, 0, False), (40, 3, 2, 512, False), (80, 3, 2, 0, True), (80, 6, 3, 512, True)])
def test_lookahead_training_on_o_direct_files_is_bit_identical(tmp_path, monkeypatch, capacity, window, depth,
                                                               row_align, grouped):
    """O_DIRECT files: each prepare writes its dirty victims back and reads its misses in one
    `SsdTable.exchange` (blocks shared by both read once, only blocks with written rows written;
    3,000 rows of 20 B: rows straddle blocks, and the file ends in a partial block; with
    row_align=512 every row has its own sector and the write-back is written without a read).
    Grouped (both tables behind one cache): both files' exchange in one pass (`exchange_many`: one AIO
    batch with padded rows; with packed ones, one batch of reads and one of writes, the file's partial
    last block through the page cache)."""
    from tierec.storage import aio, multifile
    from tierec.storage.group import TableGroup

    card = 3000
    rng = np.random.default_rng(capacity + window)
    batches = make_batches(rng, 30, 16, ["a", "b"], card, zipf=1.1)
    ref_losses, ref_rows, _ = train_tables(batches, None, "rowwise_adagrad", card=card)
    calls, fused = [], []
    orig, orig_many = SsdTable.exchange, multifile.exchange_many

    def spy(self, *a, **kw):
        calls.append(a[0].numel())
        return orig(self, *a, **kw)

    def spy_many(tabs, wt, *a, **kw):
        out = orig_many(tabs, wt, *a, **kw)
        fused.append(out is not None and len(set(wt.tolist())) > 0)
        return out

    monkeypatch.setattr(SsdTable, "exchange", spy)
    monkeypatch.setattr(multifile, "exchange_many", spy_many)
    group = TableGroup("g")

    def factory(i, tcfg, sdim):
        ssd = SsdTable(tmp_path / f"{tcfg.name}.tbl", tcfg.num_embeddings, tcfg.embedding_dim, sdim, create=True,
                       init_seed=3, table_index=i, direct_io=True, row_align=row_align)
        return group.add(ssd, capacity // 2, tcfg.name) if grouped else LookaheadCache(ssd, capacity, name=tcfg.name)

    losses, rows, ebc = train_tables(batches, factory, "rowwise_adagrad", dict(window=window, depth=depth), card=card)
    assert losses == ref_losses
    for name in rows:
        assert torch.equal(rows[name][0], ref_rows[name][0]) and torch.equal(rows[name][1], ref_rows[name][1])
    first = ebc.tables[0].storage.backing
    if first.odirect and aio.available():
        if grouped:
            assert any(fused) and not calls, "both files' exchange in one batched pass"
        else:
            assert sum(calls) > 0, "write-backs went through exchange"


def test_window_is_capped_by_max_bytes(tmp_path, caplog):
    """max_bytes bounds what the window holds (every step from its read to its release: batch, unique IDs,
    prepared lookups; and the oracles): a window of 100 batches shrinks to what a few batches take, with a
    warning, the bytes held stay within max_bytes and one step, and training stays bit-identical."""
    from tierec.train.pipeline import batch_nbytes

    rng = np.random.default_rng(5)
    batches = make_batches(rng, 30, 16, ["a", "b"], 60)
    ref_losses, ref_rows, _ = train_tables(batches, None, "sgd")

    def step_nbytes(b):  # the batch, its unique IDs, and its lookups: working set (16 B/row) and dedup (24 B/ID)
        by_key = b.sparse.to_dict().values()
        return batch_nbytes(b) + sum(24 * int(torch.unique(v.values).numel()) + 24 * v.values.numel()
                                     for v in by_key)

    per = max(step_nbytes(b) for b in batches)
    oracle = 2 * NextUseOracle().nbytes  # each cache's oracle at its least (1024 occurrences)
    max_bytes = 5 * per + oracle

    def factory(i, tcfg, sdim):
        ssd = SsdTable(tmp_path / f"{tcfg.name}.tbl", tcfg.num_embeddings, tcfg.embedding_dim, sdim, create=True,
                       init_seed=3, table_index=i)
        return LookaheadCache(ssd, 20, name=tcfg.name)

    peaks, held = [], []
    orig_close, orig_next = LookaheadPipeline.close, LookaheadPipeline.__next__

    def close(self):
        peaks.append(self.stats["window_peak"])
        orig_close(self)

    def next_(self):
        held.append(self.held_nbytes())
        return orig_next(self)

    with caplog.at_level("WARNING", logger="tierec.train.pipeline"):
        LookaheadPipeline.close, LookaheadPipeline.__next__ = close, next_
        try:
            losses, rows, _ = train_tables(batches, factory, "sgd", dict(window=100, depth=2, max_bytes=max_bytes),
                                           step_s=0.01)
        finally:
            LookaheadPipeline.close, LookaheadPipeline.__next__ = orig_close, orig_next
    assert losses == ref_losses and all(torch.equal(rows[k][0], ref_rows[k][0]) for k in rows)
    assert 3 <= peaks[0] <= 15, peaks  # some batches read ahead (step_nbytes is generous), never all 30
    assert max(held) <= max_bytes + per, (max(held), max_bytes, per)
    assert "window limited" in caplog.text, (peaks, per)


def test_storage_bound_worker_keeps_reading_ahead():
    """Storage slower than the steps: the worker serves the waiting trainer, but still reads ahead
    (CATCH_UP_READS per step), so eviction keeps seeing far beyond the step being prepared."""

    class SlowTable(InMemoryTable):
        def read(self, ids):
            time.sleep(0.01)  # 10 ms per batched read: slower than the trainer's steps
            return self.weight[ids].clone(), self.state[ids].clone()

        def write(self, ids, w, s):
            self.weight[ids], self.state[ids] = w, s

    rng = np.random.default_rng(2)
    batches = make_batches(rng, 60, 16, ["a"], 400, zipf=1.05)
    cache = LookaheadCache(SlowTable(400, 4, 1), 30, name="a")
    targets, takers = raw_targets({"a": cache})
    with LookaheadPipeline(batches, targets, window=50, depth=2) as pipe:
        for b in pipe:
            takers["a"].take().release(True)
        summary = pipe.summary()
    assert summary["late_fraction"] > 0.5  # storage-bound, as intended
    assert summary["mean_window_steps"] > 8, summary  # without the catch-up reads: ~2, the steps being prepared


@pytest.mark.parametrize("top,lower", [(12, 30), (40, 8), (1, 20)])
def test_two_tier_chain_is_bit_identical(tmp_path, top, lower):
    """device <- DRAM <- SSD as two look-ahead caches: the lower tier is prefetched further ahead
    (or skipped when it has no room), the upper reads its misses from it, write-backs go through it."""
    rng = np.random.default_rng(top + lower)
    batches = make_batches(rng, 30, 16, ["a", "b"], 60, empty_every=9)
    ref_losses, ref_rows, _ = train_tables(batches, None, "rowwise_adagrad")

    def factory(i, tcfg, sdim):
        ssd = SsdTable(tmp_path / f"{tcfg.name}.tbl", tcfg.num_embeddings, tcfg.embedding_dim, sdim, create=True,
                       init_seed=3, table_index=i)
        return LookaheadCache(LookaheadCache(ssd, lower, name=tcfg.name + "@host"), top, name=tcfg.name)

    losses, rows, ebc = train_tables(batches, factory, "rowwise_adagrad", dict(window=12, depth=2, lower_depth=6))
    assert losses == ref_losses
    for name in rows:
        assert torch.equal(rows[name][0], ref_rows[name][0]) and torch.equal(rows[name][1], ref_rows[name][1])
    low = ebc.tables[0].storage.backing.stats()
    assert low["upper_reads"] > 0
    if lower >= 16:
        # the upper tier's misses were prefetched into the lower one
        assert low["lookups"] > 0 and low["upper_read_hits"] > 0


def test_cycle_that_defeats_lru(tmp_path):
    """A cycle of 6 rows through 5 slots: rows updated at step t are evicted and needed again at t+3.
    LRU misses every time; look-ahead (one step prefetched ahead) keeps some."""
    ids = [[0, 1], [2, 3], [4, 5]] * 10
    kj = [KeyedJaggedTensor(["a", "b"], torch.tensor(x + x), torch.ones(4, dtype=torch.int64), stride=2) for x in ids]
    batches = [Batch(torch.zeros(2, 1), k, torch.zeros(2)) for k in kj]
    ref_losses, ref_rows, _ = train_tables(batches, None, "sgd", card=6)

    def factory(i, tcfg, sdim):
        return LookaheadCache(InMemoryTable(tcfg.num_embeddings, tcfg.embedding_dim, sdim), 5, name=tcfg.name)

    losses, rows, ebc = train_tables(batches, _init_like_reference(factory), "sgd", dict(window=10, depth=1), card=6)
    assert losses == ref_losses
    for name in rows:
        assert torch.equal(rows[name][0], ref_rows[name][0])
    st = ebc.tables[0].storage.stats()
    assert st["hit_rate"] > 0.3 and st["writebacks"] > 0  # LRU with 5 slots on a cycle of 6 rows hits 0%


def _init_like_reference(factory):
    from tierec.storage.base import init_rows

    def f(i, tcfg, sdim):
        c = factory(i, tcfg, sdim)
        c.backing.weight[:] = init_rows(3, i, tcfg.num_embeddings, tcfg.embedding_dim, 0, tcfg.num_embeddings)
        return c

    return f


def test_the_pipeline_owns_the_step_and_pause_allows_sync_reads(tmp_path):
    """While the worker runs, the caches refuse lookups outside the protocol (the model gets its rows from
    the pipeline); paused, they serve temporary copies; a second pipeline cannot drive a driven cache."""
    rng = np.random.default_rng(0)
    batches = make_batches(rng, 6, 8, ["a", "b"], 60)
    caches = {k: LookaheadCache(InMemoryTable(60, 4, 1), 10, name=k) for k in ["a", "b"]}
    targets, takers = raw_targets(caches)
    with LookaheadPipeline(batches, targets, window=4, depth=2) as pipe:
        b = next(pipe)
        with pytest.raises(RuntimeError, match="pause it first"):
            caches["a"].acquire(torch.tensor([59]))
        with pytest.raises(RuntimeError, match="pause it first"):
            caches["a"].flush()
        with pytest.raises(RuntimeError, match="already driven"):
            LookaheadPipeline(batches, raw_targets({"a": caches["a"]})[0])
        with pipe.paused():
            assert pipe.is_paused
            w, _ = caches["a"].read_rows(0, 60)  # checkpoint-style read while the worker is parked
            assert w.shape == (60, 4)
            ws = caches["a"].acquire(torch.tensor([1, 2]))  # evaluation-style lookup: a temporary copy
            caches["a"].release(ws, dirty=False)
        lk = takers["a"].take()
        assert torch.equal(lk.ws.ids, torch.unique(b.sparse.to_dict()["a"].values))
        lk.release(False)
        takers["b"].take().release(False)
    assert int(caches["a"]._pins.sum()) == 0 and int(caches["b"]._pins.sum()) == 0
    caches["a"].flush()  # no driver any more


def test_pipeline_sets_the_switch_interval_and_prefetch_threads_by_io_mode(tmp_path):
    import sys

    from tierec.storage.ssd import SsdTable
    from tierec.storage.concat import default_io_threads

    before = sys.getswitchinterval()
    caches = {"a": LookaheadCache(InMemoryTable(10, 2, 0), 4, name="a")}
    with LookaheadPipeline(make_batches(np.random.default_rng(0), 2, 4, ["a"], 10), raw_targets(caches)[0],
                           window=2, depth=1):
        assert sys.getswitchinterval() == pytest.approx(min(before, 5e-4))
    assert sys.getswitchinterval() == before  # restored by close()
    SsdTable(tmp_path / "t.tbl", 100, 4, 1, create=True, init="zeros").close()
    direct = LookaheadCache(SsdTable(tmp_path / "t.tbl", 100, 4, 1, direct_io=True), 8)
    mapped = LookaheadCache(SsdTable(tmp_path / "t.tbl", 100, 4, 1), 8)
    from tierec.storage import aio

    assert default_io_threads([direct]) == (4 if direct.backing.odirect and aio.available() else default_io_threads())
    assert default_io_threads([direct, mapped]) == default_io_threads()  # buffered reads cost CPU: by cores


def test_worker_error_reaches_the_trainer():
    def bad():
        yield from make_batches(np.random.default_rng(0), 2, 4, ["a"], 10)
        raise OSError("disk on fire")

    caches = {"a": LookaheadCache(InMemoryTable(10, 2, 0), 4, name="a")}
    targets, takers = raw_targets(caches)
    with LookaheadPipeline(bad(), targets, window=5, depth=1) as pipe:
        with pytest.raises(RuntimeError, match="worker failed") as e:
            for b in pipe:
                takers["a"].take().release(False)
        assert "disk on fire" in str(e.value.__cause__)


# ---------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    from tierec.train.trainer import Trainer

    t = Trainer(cfg(tiny_dataset, tmp_path_factory.mktemp("ref")))
    return t.fit(), table_rows(t)


@pytest.mark.parametrize("budget,window,depth,grouped", [("6KiB", 3, 2, True), ("6KiB", 3, 2, False),
                                                         ("20KiB", 500, 4, True)])
def test_trainer_lookahead_is_bit_identical(tiny_dataset, tmp_path, reference, budget, window, depth, grouped):
    from tierec.train.trainer import Trainer

    ref_summary, ref_rows = reference
    t = Trainer(cfg(tiny_dataset, tmp_path, memory_budget=budget, cache_policy="lookahead", lookahead=window,
                    prefetch_depth=depth, eval_every=5, group_caches=grouped))
    summary = t.fit()
    kinds = {type(tb.storage).__name__ for tb in t.model.embeddings.tables}
    assert kinds == ({"TableView"} if grouped else {"LookaheadCache"})
    if grouped:  # one cache for all tables, listed once under the group's name
        assert list(summary_cache(tmp_path)) == ["group:d8"]
    assert summary["auc"] == ref_summary["auc"] and summary["logloss"] == ref_summary["logloss"]
    for name, (w, s) in table_rows(t).items():
        assert torch.equal(w, ref_rows[name][0]) and torch.equal(s, ref_rows[name][1]), name
    pf = summary["prefetch"]
    assert pf["steps"] == summary["step"] and 0 <= summary["stall_fraction"] <= 1
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rec = next(r for r in records if r["event"] == "train")
    assert "prefetch" in rec and next(iter(rec["cache"].values()))["policy"] == "lookahead"


def summary_cache(run: Path) -> dict:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["event"] == "train")["cache"]


@pytest.mark.parametrize("grouped", [True, False])
def test_trainer_lookahead_resume_mid_window(tiny_dataset, tmp_path, reference, grouped):
    """Stop at step 11 (mid-epoch, mid-window, with a 50-step window), resume: same weights."""
    from tierec.train.trainer import Trainer

    _, ref_rows = reference
    kw = dict(memory_budget="6KiB", cache_policy="lookahead", lookahead=50, prefetch_depth=3, group_caches=grouped)
    Trainer(cfg(tiny_dataset, tmp_path, max_steps=11, **kw)).fit()
    t = Trainer(cfg(tiny_dataset, tmp_path, **kw), resume=True)
    t.fit()
    for name, (w, s) in table_rows(t).items():
        assert torch.equal(w, ref_rows[name][0]) and torch.equal(s, ref_rows[name][1]), name


@pytest.mark.parametrize("policy", ["lookahead", "lru"])
def test_trainer_host_cache_tier(tiny_dataset, tmp_path, reference, policy):
    """--host-cache stacks a DRAM tier between the (device) caches and SSD; still bit-identical."""
    from tierec.train.trainer import Trainer

    _, ref_rows = reference
    t = Trainer(cfg(tiny_dataset, tmp_path, memory_budget="6KiB", cache_policy=policy, host_cache="12KiB",
                    lookahead=20))
    t.fit()
    st = t.model.embeddings.tables[0].storage
    if policy == "lookahead":  # grouped (the default): device group cache <- host group cache <- the files
        st = st.group.cache
        assert type(st.backing.backing).__name__ == "ConcatTable"
    else:
        assert type(st.backing.backing).__name__ == "SsdTable"
    assert st.backing.name.endswith("@host")
    for name, (w, s) in table_rows(t).items():
        assert torch.equal(w, ref_rows[name][0]) and torch.equal(s, ref_rows[name][1]), name


@pytest.mark.parametrize("leave", [True, False])
def test_the_worker_takes_a_core_from_the_steps_threads_while_it_runs(tmp_path, leave):
    """``leave_a_core`` (the trainer's default when --num-threads is not given): torch's intra-op threads one
    fewer while the look-ahead worker runs, restored when the pipeline closes; training stays exact."""
    rng = np.random.default_rng(5)
    batches = make_batches(rng, 12, 16, ["a", "b"], 60)
    ref_losses, _, _ = train_tables(batches, None, "rowwise_adagrad")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        class Spy(list):  # the batches, noting the threads in use as the trainer takes each
            def __iter__(self):
                for b in super().__iter__():
                    seen.append(torch.get_num_threads())
                    yield b

        def factory(i, tcfg, sdim):
            ssd = SsdTable(tmp_path / f"{leave}{tcfg.name}.tbl", tcfg.num_embeddings, tcfg.embedding_dim, sdim,
                           create=True, init_seed=3, table_index=i)
            return LookaheadCache(ssd, 20, name=tcfg.name)

        losses, _, _ = train_tables(Spy(batches), factory, "rowwise_adagrad",
                                    dict(window=4, depth=2, leave_a_core=leave))
        assert losses == ref_losses
        assert set(seen) == ({1} if leave else {2})
        assert torch.get_num_threads() == 2  # restored by close()
    finally:
        torch.set_num_threads(before)


def test_a_batch_owns_its_arrays():
    """A batch made from a slice of a chunk copies its dense features and labels: a view would keep the whole
    chunk alive while the batch waits in the look-ahead window (its bytes counted, the chunk's not)."""
    from tierec.data.dataset import Chunk

    n = 4096
    rng = np.random.default_rng(0)
    offs = np.arange(n + 1, dtype=np.int64)
    chunk = Chunk(rng.random(n, dtype=np.float32), rng.random((n, 13), dtype=np.float32),
                  {"a": (rng.integers(0, 100, n), offs)})
    b = Batch.from_chunk(chunk.slice(0, 256), ["a"])
    assert torch.equal(b.dense, torch.from_numpy(chunk.dense[:256]))
    dense, label = weakref.ref(chunk.dense), weakref.ref(chunk.label)
    del chunk
    gc.collect()
    assert dense() is None and label() is None, "the batch keeps the chunk's arrays alive"
    assert b.dense.shape == (256, 13)


def test_released_steps_leave_nothing_for_the_gc(tmp_path, monkeypatch):
    """A step's lookups are freed as soon as its tables release them (reference counting), not at the next
    cyclic collection: a lease and its lookups referred to each other, and with the GC's own timing 4-8
    steps of dedup tensors stayed alive beyond the window's count (bench_scale --quick)."""
    from tierec.modules.embedding import Lookup

    made: list[weakref.ref] = []
    orig = Lookup.__init__

    def init(self, *a, **kw):
        orig(self, *a, **kw)
        made.append(weakref.ref(self))

    monkeypatch.setattr(Lookup, "__init__", init)
    rng = np.random.default_rng(1)
    batches = make_batches(rng, 20, 16, ["a", "b"], 60)

    def factory(i, tcfg, sdim):
        ssd = SsdTable(tmp_path / f"{tcfg.name}.tbl", tcfg.num_embeddings, tcfg.embedding_dim, sdim, create=True,
                       init_seed=3, table_index=i)
        return LookaheadCache(ssd, 40, name=tcfg.name)

    peak = 0
    orig_next = LookaheadPipeline.__next__

    def next_(self):
        nonlocal peak
        peak = max(peak, sum(r() is not None for r in made))
        return orig_next(self)

    monkeypatch.setattr(LookaheadPipeline, "__next__", next_)
    gc.disable()
    try:
        train_tables(batches, factory, "sgd", dict(window=6, depth=2), step_s=0.005)
    finally:
        gc.enable()
    assert peak <= 2 * 3, peak  # two tables x (the step in training + 2 prepared)


@pytest.mark.parametrize("sweep", [False, True], ids=["hash_map", "sorted_sweep"])
def test_read_each_reads_the_next_pieces_misses_ahead_on_a_thread_and_equals_read(monkeypatch, sweep):
    """A checkpoint's bulk read (`LookaheadCache.read_each`): each piece's rows equal `read`'s bit for bit -- cached
    rows (changed since they left the store) and the store's -- while the store reads the next piece's misses on a
    thread of its own; an error there reaches the caller. ``sorted_sweep``: the cached rows found by a
    `SortedSweep` (the pieces of a large table), not the hash map."""
    import tierec.storage.lookahead as lookahead

    monkeypatch.setattr(lookahead, "SWEEP_MIN_IDS", 8 if sweep else 1 << 40)
    threads: list[str] = []

    class Store(InMemoryTable):
        fail_at: int | None = None

        def read(self, ids):
            threads.append(threading.current_thread().name)
            if self.fail_at is not None and bool((ids == self.fail_at).any()):
                raise OSError("device gone")
            return super().read(ids)

    store = Store(500, 4, 1)
    store.weight.copy_(torch.randn(500, 4, generator=torch.Generator().manual_seed(0)))
    cache = LookaheadCache(store, 64, name="a")
    cached = torch.arange(3, 500, 8)[:60]  # in the cache and changed there: the store holds stale rows
    cache.write(cached, torch.randn(60, 4), torch.rand(60, 1))
    expect = store.weight.clone(), store.state.clone()
    expect[0][cached], expect[1][cached] = cache.read(cached)
    assert not torch.equal(expect[0][cached], store.weight[cached])
    pieces = [torch.arange(a, min(a + 70, 500)) for a in range(0, 500, 70)]
    asked: list[int] = []

    def ask():
        for k, p in enumerate(pieces):
            asked.append(k)
            yield p

    threads.clear()
    got = []
    for k, rows in enumerate(cache.read_each(ask())):
        assert len(asked) >= min(k + 2, len(pieces))  # the next piece is asked for (its misses read) first
        got.append(rows)
    assert all(t.startswith("tierec-read-ahead") for t in threads) and len(threads) == len(pieces), threads
    for p, rows in zip(pieces, got, strict=True):  # joined as a table file holds them: weights, then state
        assert rows.shape == (p.numel(), 5) and rows.dtype == torch.float32 and rows.is_contiguous()
        assert torch.equal(rows, torch.cat(cache.read(p), 1))
        assert torch.equal(rows, torch.cat([expect[0][p], expect[1][p]], 1))
    threads.clear()
    rows, = cache.read_each(iter(pieces[:1]))  # a single piece: nothing to read beside, so no thread
    assert threads == [threading.current_thread().name] and torch.equal(rows[:, :4], expect[0][pieces[0]])
    more = torch.arange(1, 500, 8)[:60]  # rows installed since: a new sweep of the cached IDs
    cache.write(more, torch.randn(60, 4), torch.rand(60, 1))
    expect[0][more], expect[1][more] = cache.read(more)
    for p, rows in zip(pieces, cache.read_each(iter(pieces)), strict=True):
        assert torch.equal(rows, torch.cat([expect[0][p], expect[1][p]], 1))
    store.fail_at = 300
    with pytest.raises(OSError, match="device gone"):
        list(cache.read_each(iter(pieces)))
    cache.close()

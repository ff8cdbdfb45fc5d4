"""Embedding bags over pluggable row storage, with the optimizer fused into backward.

One training step for one table (B samples, N IDs, U unique IDs, D dims):

1. forward:  ``uniq, inverse, perm, counts = dedup(ids)``; ``ws = storage.acquire(uniq)``
   makes the U rows addressable in a fast tensor (``ws.weight[ws.index[k]]`` is row
   ``uniq[k]``); pooled [B, D] = ``embedding_bag(ws.weight, ws.index[inverse], offsets)``.
2. backward: per-ID gradient = pooled gradient of its bag (divided by the bag
   length for mean pooling), summed per unique row with one embedding_bag into
   [U, D] (``perm``, ``counts``); the sparse optimizer updates those U rows (and their
   state) in place; the rows are released (written back if they were a temporary copy).

A step's `Lookup` (the dedup of its IDs, its working set and how to release it) is
made by the table itself from its `TableStorage`, or handed down ahead of the step
by whoever prefetched it (`EmbeddingBag.use_lookup`; the look-ahead pipeline does,
as TorchRec's train pipeline calls ``module.prefetch``): the table then neither
deduplicates nor touches its storage in the step.

So every unique row is fetched once and updated once per step, and no dense
gradient of a table exists. Storage backends implement `tierec.storage.base.TableStorage`
(in memory: `InMemoryTable`; the tiers: the rest of ``tierec.storage``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import torch
import torch.nn.functional as F

from tierec.errors import ConfigError
from tierec.modules.optim import SparseOptimizer
from tierec.sparse import KeyedJaggedTensor
from tierec.storage.base import InMemoryTable, TableStorage, WorkingSet
from tierec.storage.lazy import RowInit


@dataclass(frozen=True)
class TableConfig:
    """One embedding table. ``feature`` is the sparse key it serves (defaults to ``name``)."""

    name: str
    num_embeddings: int
    embedding_dim: int
    pooling: str = "sum"  # "sum" | "mean"
    feature: str | None = None
    dynamic: bool = False  # rows are slots of a dynamic table (`tierec.storage.dynamic`): reset on admission

    def __post_init__(self):
        if self.num_embeddings <= 0:
            raise ConfigError(f"table {self.name!r}: num_embeddings must be > 0, got {self.num_embeddings}")
        if self.embedding_dim <= 0:
            raise ConfigError(f"table {self.name!r}: embedding_dim must be > 0, got {self.embedding_dim}")
        if self.pooling not in ("sum", "mean"):
            raise ConfigError(f"table {self.name!r}: pooling must be 'sum' or 'mean', got {self.pooling!r}")

    @property
    def key(self) -> str:
        return self.feature or self.name


def dedup(values: torch.Tensor, with_inverse: bool = True):
    """values int64 [N] -> (uniq [U] sorted, inverse [N] or None, perm [N], counts [U]).

    ``values[perm]`` is sorted (stable: equal IDs keep their input order), so the
    IDs of unique row k are ``perm[seg[k]:seg[k+1]]`` with ``seg`` the prefix sums
    of ``counts``; ``uniq[inverse] == values``.
    """
    sorted_vals, perm = torch.sort(values, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_vals, return_counts=True)
    inverse = None
    if with_inverse:
        inverse = torch.empty_like(values)
        inverse[perm] = torch.repeat_interleave(torch.arange(uniq.numel(), device=values.device), counts,
                                                output_size=values.numel())
    return uniq, inverse, perm, counts


def row_gradients(grad_out: torch.Tensor, lengths: torch.Tensor, perm: torch.Tensor, counts: torch.Tensor,
                  mean: bool, weights: torch.Tensor | None) -> torch.Tensor:
    """Summed gradient of every unique row, [U, D], from the pooled gradient [B, D].

    A row's gradient is the sum, over its occurrences, of its bag's gradient
    (times the ID's weight; divided by the bag length for mean pooling). Computed
    as one embedding_bag over ``grad_out``: bag k gathers the occurrences of row k.
    """
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths,
                                  output_size=perm.numel())
    scale = None
    if mean:
        scale = (1.0 / lengths.clamp(min=1).to(grad_out.dtype)).index_select(0, bag)
    if weights is not None:
        scale = weights if scale is None else scale * weights
    seg = torch.cumsum(counts, 0) - counts
    psw = scale.index_select(0, perm) if scale is not None else None
    return F.embedding_bag(bag.index_select(0, perm), grad_out, seg, mode="sum", per_sample_weights=psw)


def _same_ids(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ID tensors ``a`` and ``b`` hold the same IDs (at once when they are the same memory)."""
    if a.numel() != b.numel() or a.device != b.device:
        return False
    return (a.data_ptr() == b.data_ptr() and a.stride() == b.stride()) or torch.equal(a, b)


@dataclass
class Lookup:
    """One step's rows of one table: its IDs deduplicated, the rows resident, and how to give them back.

    ``ws.ids`` [U] are the step's unique IDs (sorted) and ``ws.weight[ws.index]`` their rows;
    ``inverse`` [N] maps each ID of the step to its unique row, ``perm`` [N] sorts the IDs (stably),
    ``counts`` [U] counts each unique ID (see `dedup`); None when the maker did not know the step's
    IDs in order (a shard whose IDs arrive by all-to-all): the table computes them and checks that
    they give ``ws.ids``. ``release(dirty)`` returns the rows once the step is done with them.
    ``values``: the IDs [N] it was made from, where `EmbeddingBag.make_lookup` made it ahead of the step
    (the forward checks that it looks up the same IDs)."""

    ws: WorkingSet
    inverse: torch.Tensor | None
    perm: torch.Tensor | None
    counts: torch.Tensor | None
    release: Callable[[bool], None]
    values: torch.Tensor | None = None


class _FusedPooledLookup(torch.autograd.Function):
    """pooled = embedding_bag(ws rows); backward applies the sparse optimizer in place."""

    @staticmethod
    def forward(ctx, anchor, table: EmbeddingBag, lk: Lookup, idx, offsets, psw):
        pooled = F.embedding_bag(idx, lk.ws.weight, offsets[:-1], mode="sum", per_sample_weights=psw)
        lengths = offsets[1:] - offsets[:-1]
        if table.config.pooling == "mean":
            pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(pooled.dtype)
        ctx.table, ctx.lk, ctx.weighted = table, lk, psw is not None
        ctx.save_for_backward(lengths, lk.perm, lk.counts, psw if psw is not None else torch.empty(0))
        return pooled

    @staticmethod
    def backward(ctx, grad_out):
        lengths, perm, counts, psw = ctx.saved_tensors
        table, lk = ctx.table, ctx.lk
        grad_rows = row_gradients(grad_out.contiguous(), lengths, perm, counts, table.config.pooling == "mean",
                                  psw if ctx.weighted else None)
        table.step += 1
        moved = table.optimizer.update(lk.ws.weight, lk.ws.state, lk.ws.index, grad_rows, int(table.step))
        if moved is not None:  # a dense optimizer also moved rows the step did not touch
            table.storage.mark_written(moved)
        lk.release(True)
        ctx.lk = None
        return (None,) * 6


class EmbeddingBag(torch.nn.Module):
    """One table: pooled lookups over a `TableStorage`, updated by a fused sparse optimizer."""

    _anchor: torch.Tensor  # buffers (registered in __init__)
    step: torch.Tensor

    def __init__(self, config: TableConfig, storage: TableStorage, optimizer: SparseOptimizer):
        super().__init__()
        self.config, self.storage, self.optimizer = config, storage, optimizer
        # Autograd needs one input that requires grad for backward to reach us.
        self.register_buffer("_anchor", torch.ones((), requires_grad=False), persistent=False)
        # Number of optimizer steps applied (Adam's bias correction); saved with the dense state.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

        self._next: Lookup | None = None  # handed down for the next forward (`use_lookup`)
        self._fresh: tuple[torch.Tensor, torch.Tensor] | None = None  # (`use_fresh`)
        self.row_init: RowInit | None = None  # a dynamic table's initial rows, by raw ID (set by build_collection)

    def use_fresh(self, slots: torch.Tensor, ids: torch.Tensor) -> None:
        """A dynamic table's next training step gives ``slots`` (int64 [F], all among the step's IDs) to new
        raw IDs ``ids`` (int64 [F]): before the step reads them, each becomes the initial row of its ID
        (``row_init.rows(ids)``) with zero optimizer state, in whatever tier holds it."""
        if self.row_init is None:
            raise RuntimeError(f"table {self.config.name!r} is not a dynamic table")
        self._fresh = (slots, ids)

    def _reset_fresh(self, ws: WorkingSet) -> None:
        slots, ids = self._fresh  # type: ignore[misc]
        self._fresh = None
        assert self.row_init is not None
        pos = ws.index.index_select(0, torch.searchsorted(ws.ids, slots.to(ws.ids.device)))
        ws.weight.index_copy_(0, pos, self.row_init.rows(ids).to(ws.weight.device))
        ws.state.index_fill_(0, pos, 0.0)
    def use_lookup(self, lookup: Lookup | None) -> None:
        """The next `forward` uses ``lookup`` (made ahead of the step) instead of deduplicating its IDs and
        acquiring its rows itself; None withdraws one that was not used."""
        self._next = lookup

    def _lookup(self, values: torch.Tensor) -> Lookup:
        """The step's `Lookup` (its fresh rows reset, `use_fresh`)."""
        lk = self._find_lookup(values)
        if self._fresh is not None:
            self._reset_fresh(lk.ws)
        return lk

    def _find_lookup(self, values: torch.Tensor) -> Lookup:
        """The one handed down, completed where it lacks the dedup; else from storage."""
        lk, self._next = self._next, None
        if lk is not None and lk.values is not None and not _same_ids(lk.values, values):
            lk.release(False)  # made ahead from other IDs than this forward's (a model that looks a table up twice)
            lk = None
        if lk is not None and lk.perm is not None:
            return lk
        if lk is None:
            return self.make_lookup(values)
        uniq, inverse, perm, counts = dedup(values)
        if not torch.equal(uniq, lk.ws.ids):
            lk.release(False)
            raise RuntimeError(f"table {self.config.name!r}: the step's IDs do not match the rows prefetched for it")
        return Lookup(lk.ws, inverse, perm, counts, lk.release)

    @property
    def in_memory(self) -> bool:
        """Whether the rows are a plain table in CPU memory (`InMemoryTable`): a `Lookup` of them is the dedup of
        the step's IDs alone, which `make_lookup` may compute on another thread ahead of the step."""
        return type(self.storage) is InMemoryTable and self.storage.device.type == "cpu"

    def make_lookup(self, values: torch.Tensor) -> Lookup:
        """The step's `Lookup` of IDs ``values`` (int64 [N]) from the table's storage: their dedup, and the rows
        acquired (an in-memory table's rows are addressed by ID: no inverse)."""
        identity = isinstance(self.storage, InMemoryTable)
        uniq, inverse, perm, counts = dedup(values, with_inverse=not identity)
        ws = self.storage.acquire(uniq)
        return Lookup(ws, inverse, perm, counts, lambda dirty: self.storage.release(ws, dirty), values)

    def forward(self, values: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None = None):
        """values int64 [N], offsets int64 [B+1] -> pooled float32 [B, D]."""
        lk = self._lookup(values)
        idx = values if lk.inverse is None else lk.ws.index.index_select(0, lk.inverse)  # positions in ws.weight
        if self.training and torch.is_grad_enabled():
            anchor = self._anchor.detach().requires_grad_(True)
            return _FusedPooledLookup.apply(anchor, self, lk, idx, offsets, weights)
        try:
            pooled = F.embedding_bag(idx, lk.ws.weight, offsets[:-1], mode="sum", per_sample_weights=weights)
            if self.config.pooling == "mean":
                pooled = pooled / (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1).to(pooled.dtype)
            return pooled
        finally:
            lk.release(False)


class EmbeddingCollection(Protocol):
    """What a model needs of its tables: an `EmbeddingBagCollection`, or this rank's shards of them
    (`tierec.distributed.embedding.ShardedEmbeddingCollection`)."""

    keys: list[str]  # sparse key of every table, in table order

    @property
    def bags(self) -> list[EmbeddingBag]: ...  # the table modules held here (a rank's shards)

    @property
    def table_configs(self) -> list[TableConfig]: ...  # every table, also those held by other ranks

    def pooled(self, kjt: KeyedJaggedTensor, user: KeyedJaggedTensor | None = None,
               expand: bool = True) -> list[torch.Tensor]: ...


class EmbeddingBagCollection(torch.nn.Module):
    """Several tables, one per sparse key; ``forward(kjt) -> [B, T, D]`` in table order
    (``pooled(kjt)`` gives the T tensors [B, D] without stacking them)."""

    def __init__(self, tables: list[EmbeddingBag]):
        super().__init__()
        self.tables = torch.nn.ModuleList(tables)  # registers them (state_dict keys ``tables.{i}.*``)
        keys = [t.config.key for t in tables]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"two tables serve the same feature: {keys}")
        self.keys = keys

    @property
    def bags(self) -> list[EmbeddingBag]:
        """The tables, typed (``self.tables`` is the `ModuleList` that registers them)."""
        return cast("list[EmbeddingBag]", list(self.tables))

    @property
    def table_configs(self) -> list[TableConfig]:
        return [t.config for t in self.bags]

    def forward(self, kjt: KeyedJaggedTensor, user: KeyedJaggedTensor | None = None) -> torch.Tensor:
        return torch.stack(self.pooled(kjt, user), 1)

    def pooled(self, kjt: KeyedJaggedTensor, user: KeyedJaggedTensor | None = None,
               expand: bool = True) -> list[torch.Tensor]:
        """T tensors [B, D]. ``user``: an inverse KJT (stride U, see `tierec.sparse.jagged`) whose
        keys are looked up and pooled once per unique row, [U, D], then expanded with
        ``index_select``; its backward sums the B gradients into each of the U rows.
        ``expand=False`` leaves the user-side tensors at [U, D] (the caller expands them)."""
        by_key = kjt.to_dict()
        user_jts = user.to_dict() if user is not None else {}
        missing = [k for k in self.keys if k not in by_key and k not in user_jts]
        if missing:
            raise ConfigError(f"batch has no sparse feature(s) {missing}; it has {kjt.keys()}")
        out: list = []
        on_u = []  # (position in out, [U, D]) of the user-side tables
        for table in self.bags:
            jt = user_jts.get(table.config.key) or by_key[table.config.key]
            out.append(table(jt.values, jt.offsets(), jt.weights))
            if table.config.key in user_jts:
                on_u.append(len(out) - 1)
        if user is not None and on_u and expand:  # expand U -> B: one index_select over the user tables side by side
            inv = user.inverse_indices()[1]
            if inv.dim() == 1:
                wide = torch.cat([out[i] for i in on_u], 1).index_select(0, inv)
                for i, part in zip(on_u, wide.split([out[i].shape[1] for i in on_u], 1), strict=True):
                    out[i] = part
            else:
                per_key = dict(zip(user.keys(), inv, strict=True))
                for i in on_u:
                    out[i] = out[i].index_select(0, per_key[self.keys[i]])
        return out


def build_collection(configs: list[TableConfig], optimizer: SparseOptimizer, seed: int,
                     storage_factory=None, device="cpu") -> EmbeddingBagCollection:
    """Create tables with deterministic initial weights (`tierec.storage.lazy.RowInit` of (seed, table index));
    a dynamic table's slots start at the `RowInit` of the raw ID admitted to them.

    ``storage_factory(index, config, state_dim) -> TableStorage | None`` picks the
    backend; None (or no factory) keeps the table in memory.
    """
    tables = []
    for i, cfg in enumerate(configs):
        sdim = optimizer.state_dim(cfg.embedding_dim)
        st = storage_factory(i, cfg, sdim) if storage_factory is not None else None
        init = RowInit(seed, i, cfg.num_embeddings, cfg.embedding_dim)
        if st is None:
            st = InMemoryTable(cfg.num_embeddings, cfg.embedding_dim, sdim, device=device, init=init)
        bag = EmbeddingBag(cfg, st, optimizer)
        if cfg.dynamic:  # a slot's first row is its raw ID's: the same as a fixed table's row of that ID
            bag.row_init = init
        tables.append(bag)
    return EmbeddingBagCollection(tables)

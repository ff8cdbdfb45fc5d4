"""Sharded embedding tables: IDs go to the rank that owns their rows, pooled rows come back.

Every rank holds a slice of the global batch (B_r samples of B) and the shards
the plan gave it (`tierec.distributed.plan`), each an ordinary `EmbeddingBag`
over its own storage (in memory, or the tiered cache + SSD files of that rank).
One forward, W ranks, T tables, S shards in all (S = T with table-wise sharding):

1. sizes:  all_to_all of (B_r, number of IDs for rank d)            int64 [W, 2]
2. input:  all_to_all of the per-sample lengths of every shard of d  int64 [S_d * B_r]
           then of the IDs themselves                                int64 [N_d]
   The owner concatenates what it got in rank order: that is the shard's part
   of the *global* batch, B samples, in the same order as a single process.
3. lookup: each owned shard pools its B bags (sum) -> [B, D], with the fused
   sparse optimizer in backward (`_FusedPooledLookup`), exactly as one process.
4. output: all_to_all of the pooled rows, rows of rank r to rank r   float [S_d * B_r, D]
   -> every rank has [B_r, D] per shard; row-wise shards of one table are summed
   (rank order), mean pooling divides by the bag length after that sum.

Backward is the transpose of step 4 (`AllToAll.backward`: the same exchange with
send and receive swapped): the pooled gradients [B_r, D] go back to the owners,
which see the gradient of the whole global batch and apply the sparse optimizer
once per unique row with its summed gradient. No dense gradient of a table and
no copy of a remote row ever exists.
"""

from __future__ import annotations

import torch
from torch import nn

from tierec.distributed.comm import Dist
from tierec.distributed.plan import Shard
from tierec.errors import ConfigError
from tierec.modules.embedding import EmbeddingBag, TableConfig
from tierec.modules.optim import SparseOptimizer
from tierec.sparse import KeyedJaggedTensor
from tierec.sparse.jagged import lengths_to_offsets
from tierec.storage.base import INIT_CHUNK_ROWS, InMemoryTable
from tierec.storage.lazy import RowInit
from tierec.storage.rowspace import RowSpace


class AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single: rows out by ``send``, in by ``recv``; backward swaps them.

    ``anchor`` (a scalar that requires grad) makes every rank run the backward
    exchange, also a rank whose ``x`` is empty (it owns no shard)."""

    @staticmethod
    def forward(ctx, anchor, x, d: Dist, send: list[int], recv: list[int]):
        ctx.d, ctx.send, ctx.recv, ctx.x_grad = d, send, recv, x.requires_grad
        return d.all_to_all(x.detach(), send, recv, "alltoall_pooled")

    @staticmethod
    def backward(ctx, grad):
        g = ctx.d.all_to_all(grad.contiguous(), ctx.recv, ctx.send, "alltoall_grad")
        return None, (g if ctx.x_grad else None), None, None, None


class ShardView:
    """A shard's storage seen in whole-table row numbers (to load a table file into a shard): the table is a
    `RowSpace` of its rows before the shard, the shard's, and those after; only the shard's are kept."""

    def __init__(self, shard: Shard, storage):
        self.shard, self.storage = shard, storage
        self.num_embeddings, self.dim, self.state_dim = shard.num_embeddings, storage.dim, storage.state_dim
        self.space = RowSpace([shard.lo, shard.rows, shard.num_embeddings - shard.hi])

    def write_rows(self, start: int, weight: torch.Tensor, state: torch.Tensor) -> None:
        for member, a, b in self.space.ranges(start, start + weight.shape[0]):
            if member == 1:
                k = self.space.offset(1) + a - start
                self.storage.write_rows(a, weight[k : k + b - a], state[k : k + b - a])

    def write(self, ids: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> None:
        """Rows ``ids`` (whole-table numbers) of an incremental checkpoint: the shard keeps its own."""
        mine = (ids >= self.shard.lo) & (ids < self.shard.hi)
        if bool(mine.any()):
            self.storage.write(ids[mine] - self.shard.lo, weight[mine], state[mine])

    def lazy_rows(self) -> None:
        """Untracked: a row set is loaded into a shard row range by row range (initial values between)."""
        return None


class ShardedEmbeddingCollection(nn.Module):
    """Drop-in for `EmbeddingBagCollection` in `DLRM` under torch.distributed (see module doc).

    ``pooled(kjt)`` takes this rank's slice of the batch (B_r samples, all T keys)
    and returns T tensors [B_r, D]. ``tables`` are this rank's shard modules (kept
    out of the module tree: their step counters are per shard, not per model, so
    DDP never sees them); ``shards`` are the same shards' plan entries.
    """

    def __init__(self, configs: list[TableConfig], plan: list[Shard], d: Dist, optimizer: SparseOptimizer,
                 seed: int, storage_factory=None, device="cpu"):
        super().__init__()
        self.configs, self.plan, self.d = configs, plan, d
        self.keys = [c.key for c in configs]
        self.shards = [s for s in plan if s.rank == d.rank]
        # Shards in the order their pooled rows arrive: by owner rank, then plan order.
        arrival = sorted(range(len(plan)), key=lambda i: (plan[i].rank, i))
        self.n_owned = [sum(1 for s in plan if s.rank == r) for r in range(d.world)]
        self.pos_of_table = [[arrival.index(i) for i, s in enumerate(plan) if s.index == t]
                             for t in range(len(configs))]
        self.send_order = [[i for i in arrival if plan[i].rank == r] for r in range(d.world)]
        # each table is a row space over its shards, in row order (shard k of table t: member k)
        self.spaces = [RowSpace([s.rows for s in sorted((s for s in plan if s.index == t), key=lambda s: s.lo)])
                       for t in range(len(configs))]
        self.tables: list[EmbeddingBag] = []
        for s in self.shards:
            cfg = configs[s.index]
            sdim = optimizer.state_dim(cfg.embedding_dim)
            tcfg = TableConfig(s.name, s.rows, cfg.embedding_dim, "sum", dynamic=cfg.dynamic)
            init = RowInit(seed, s.index, s.num_embeddings, cfg.embedding_dim, row_offset=s.lo)
            st = storage_factory(s.index, tcfg, sdim, init=init) if storage_factory is not None else None
            if st is None:
                st = InMemoryTable(s.rows, cfg.embedding_dim, sdim, device=device, init=init)
            elif (lazy := st.lazy_rows()) is None or lazy.init != init:  # a store that did not take the shard's init
                for a in range(0, s.rows, INIT_CHUNK_ROWS * 16):
                    b = min(a + INIT_CHUNK_ROWS * 16, s.rows)
                    st.write_rows(a, init.range(a, b).to(device), torch.zeros(b - a, sdim, device=device))
            bag = EmbeddingBag(tcfg, st, optimizer).to(device)
            if cfg.dynamic:  # a slot's first row is its raw ID's, whichever shard holds the slot
                bag.row_init = RowInit(seed, s.index, s.num_embeddings, cfg.embedding_dim)
            self.tables.append(bag)
        self._anchor = torch.ones((), device=device)

    def use_fresh(self, fresh: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Dynamic tables: slots given to new raw IDs at the next step (sparse key -> (slots [F], IDs [F]), whole-
        table slot numbers): each owned shard resets those in its row range (`EmbeddingBag.use_fresh`)."""
        for s, t in zip(self.shards, self.tables, strict=True):
            key = self.configs[s.index].key
            if key in fresh:
                slots, ids = fresh[key]
                mine = (slots >= s.lo) & (slots < s.hi)
                if bool(mine.any()):
                    t.use_fresh((slots[mine] - s.lo).to(self._anchor.device), ids[mine])

    @property
    def table_configs(self) -> list[TableConfig]:
        return self.configs

    @property
    def bags(self) -> list[EmbeddingBag]:
        return self.tables

    def train(self, mode: bool = True):
        super().train(mode)
        for t in self.tables:
            t.train(mode)
        return self

    def _split_by_shard(self, kjt: KeyedJaggedTensor):
        """Per plan shard: (lengths int64 [B_r], IDs int64 [n]) of this rank's samples."""
        out = []
        for t, jt in enumerate(kjt.split_by_key()):
            shards = [s for s in self.plan if s.index == t]
            if len(shards) == 1:
                out.append((jt.lengths, jt.values))
                continue
            k = self.spaces[t].member_of(jt.values)  # shard of every ID
            b = jt.lengths.numel()
            sample = torch.repeat_interleave(torch.arange(b, device=k.device), jt.lengths, output_size=k.numel())
            lengths = torch.bincount(k * b + sample, minlength=len(shards) * b).view(len(shards), b)
            vals = jt.values[torch.argsort(k, stable=True)]  # grouped by shard, sample order kept
            counts = lengths.sum(1).tolist()
            out += [(lengths[i], v) for i, v in enumerate(torch.split(vals, counts))]
        return out

    def pooled(self, kjt: KeyedJaggedTensor, user: KeyedJaggedTensor | None = None,
               expand: bool = True) -> list[torch.Tensor]:
        """This rank's samples (B_r, all T keys) -> T tensors [B_r, D]. ``user``/``expand``: as in
        `EmbeddingBagCollection.pooled`, but deduplicated batches are not supported: ``user`` must be None."""
        if user is not None:
            raise ConfigError("deduplicated batches are not supported by sharded tables (they take plain batches)")
        if kjt.keys() != self.keys:
            raise ConfigError(f"batch keys {kjt.keys()} differ from the sharded tables' keys {self.keys}")
        if kjt.weights_or_none() is not None:
            raise ConfigError("weighted sparse features are not supported by sharded tables yet")
        d, W, B_me = self.d, self.d.world, kjt.stride()
        per_shard = self._split_by_shard(kjt)
        # 1. sizes: my batch size and how many IDs each rank gets from me
        n_ids = [sum(per_shard[i][1].numel() for i in self.send_order[r]) for r in range(W)]
        sizes = torch.tensor([[B_me, n] for n in n_ids], dtype=torch.int64, device=kjt.values().device)
        got = d.all_to_all(sizes, [1] * W, [1] * W, "alltoall_sizes").tolist()  # [W, 2]
        B_of = [g[0] for g in got]
        # 2. lengths, then IDs, of the shards each rank owns
        dev = kjt.values().device
        lens = [per_shard[i][0] for r in range(W) for i in self.send_order[r]]
        vals = [per_shard[i][1] for r in range(W) for i in self.send_order[r]]
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        n_own = self.n_owned[d.rank]
        r_lens = d.all_to_all(torch.cat(lens) if lens else empty, [n * B_me for n in self.n_owned],
                              [n_own * b for b in B_of], "alltoall_lengths")
        r_vals = d.all_to_all(torch.cat(vals) if vals else empty, n_ids, [g[1] for g in got], "alltoall_ids")
        # 3. every owned shard pools its part of the global batch
        lens_by_src = [x.view(n_own, b) for x, b in zip(torch.split(r_lens, [n_own * b for b in B_of]), B_of, strict=True)]
        vals_by_src = [torch.split(v, lb.sum(1).tolist()) for v, lb in
                       zip(torch.split(r_vals, [g[1] for g in got]), lens_by_src, strict=True)]
        pooled = []
        for j, (s, mod) in enumerate(zip(self.shards, self.tables, strict=True)):
            lengths = torch.cat([lb[j] for lb in lens_by_src])
            ids = torch.cat([vb[j] for vb in vals_by_src])
            pooled.append(mod(ids - s.lo if s.lo else ids, lengths_to_offsets(lengths)))  # [B, D]
        # 4. rows of rank r's samples go back to rank r
        D = self.configs[0].embedding_dim
        starts = [sum(B_of[:r]) for r in range(W + 1)]
        send = [p[starts[r] : starts[r + 1]] for r in range(W) for p in pooled]
        x = torch.cat(send) if send else torch.zeros(0, D, device=dev)
        anchor = self._anchor.detach().requires_grad_(self.training and torch.is_grad_enabled())
        recv = AllToAll.apply(anchor, x, d, [n_own * b for b in B_of], [n * B_me for n in self.n_owned])
        recv = recv.view(len(self.plan), B_me, D)
        out = []
        for t, cfg in enumerate(self.configs):
            ps = self.pos_of_table[t]
            e = recv[ps[0]] if len(ps) == 1 else recv[ps].sum(0)
            if cfg.pooling == "mean":
                e = e / kjt.lengths()[t * B_me : (t + 1) * B_me].clamp(min=1).unsqueeze(1).to(e.dtype)
            out.append(e)
        return out

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return torch.stack(self.pooled(kjt), 1)

"""LightGCN (He et al., SIGIR 2020) with its node embeddings in tierec tables.

Users and items are rows of two tierec `EmbeddingBag` tables (``user`` [U, D], ``item`` [I, D]),
so they train through the tables' fused sparse optimizer in whatever storage the tables have
(memory, an SSD file behind a cache, ...). The graph has U + I nodes (users 0..U-1, item i is
node U + i) and an edge per training pair; ``A = D^-1/2 (adjacency) D^-1/2`` (`InteractionGraph`,
one CSR matrix, degrees of the whole training graph). Propagation: ``E^(k+1) = A E^(k)``; the final
embedding is the mean of layers 0..K: ``e = (E^(0) + ... + E^(K)) / (K + 1)``; score(u, i) = <e_u, e_i>.

One training step, B triples (u, i, j), K layers, D dims, ``propagation="khop"`` (the default):

1. batch nodes ``S_0`` = unique(u, U + i, U + j)                                     [n_0]
2. K-hop neighbourhood: ``S_(h+1) = S_h ∪ neighbours(S_h)`` (sorted node IDs), and with it
   ``M_h = A[S_h, S_(h+1)]`` [n_h, n_(h+1)]: the rows of ``S_h``, which have all their neighbours
   in ``S_(h+1)`` -- a row slice of A's CSR, columns renumbered (order kept)        h = 0..K-1
3. layer 0: ``X_K = E^(0)[S_K]`` [n_K, D] from ONE call of each table (each node a bag of one)
4. layer k = 1..K: ``X_(K-k) = M_(K-k) X_(K-k+1)`` [n_(K-k), D] (torch.sparse.mm): row v of it is
   ``E^(k)[v]`` exactly, since every neighbour of v is in ``S_(K-k+1)`` and carries its exact
   ``E^(k-1)``; ``e[S_0] += E^(k)[S_0] / (K + 1)``
5. BPR: ``-mean(log sigmoid(<e_u, e_i> - <e_u, e_j>))`` + ``l2_reg / 2 * (|E0_u|^2 + |E0_i|^2 +
   |E0_j|^2) / B`` on the layer-0 rows of the batch's triples (the paper's regulariser)
6. backward: ``grad X_(K-k+1) += M^T grad X_(K-k)`` (``M^T = A[S_(h+1), S_h]``: A is symmetric, so
   it is cut from A's rows like M, when backward needs it) down to layer 0, whose gradient [n_K, D]
   reaches the two tables, whose fused optimizer updates those n_K rows (and only those) in place

The batch's final embeddings equal full-graph propagation's (the same neighbour sums; a row's sum
runs over its neighbours in the same order, `tests/test_lightgcn.py` checks bit equality).
``propagation="full"`` instead looks up every row and propagates the whole graph each step (as
PyG's LightGCN does): the same forward values, but rows outside the batch's K-hop neighbourhood
are also acquired, and with a zero gradient the (lazy) Adam still moves them by its momentum, as a
dense Adam would.

Tiers: a step reads rows ``S_K`` through each table, one lookup per table. How many that is depends
on the graph: on a sparse graph with small K it is a small share, so a cache of a share of the
rows (the rest on SSD) holds the working set; on a dense or small-world graph the K-hop
neighbourhood of a batch is almost every node (amazon_video, K = 3: 96% of the nodes for a batch of
256 triples, 98% for 2048, docs/models.md#lightgcn), and every step then reads (and writes back)
almost the whole table through the cache: exact, but each step moves the table. Sampled neighbourhoods (a fixed
fan-out per hop, as PinSage) would bound the rows per step but change the model (not exact w.r.t.
full propagation); they are not built.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tierec.modules.embedding import EmbeddingBag, TableConfig, build_collection
from tierec.modules.optim import SparseOptimizer

Propagation = Literal["khop", "full"]
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")  # torch's, once per process


def _csr(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(indptr, indices, values, shape, check_invariants=False)


class _SpMM(torch.autograd.Function):
    """``a @ x`` for a constant CSR matrix ``a``; backward ``a^T @ grad``, ``a^T`` given as a matrix (e.g. ``a``
    itself when symmetric) or a function that makes it (called in backward only)."""

    @staticmethod
    def forward(ctx, a, at, x):
        ctx.at = at
        return torch.sparse.mm(a, x)

    @staticmethod
    def backward(ctx, grad):
        at = ctx.at() if callable(ctx.at) else ctx.at
        ctx.at = None
        return None, None, torch.sparse.mm(at, grad.contiguous())


def spmm(a: torch.Tensor, x: torch.Tensor, at) -> torch.Tensor:
    """``a @ x``; its gradient w.r.t. x is ``at @ grad`` (``at``: ``a^T``, or a function that makes it)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _SpMM.apply(a, at, x)
    return torch.sparse.mm(a, x)


class InteractionGraph:
    """The symmetric-normalised adjacency ``A = D^-1/2 adj D^-1/2`` of a user-item graph (module doc), CSR.

    ``users``, ``items``: int64 [E] the training pairs (users 0..U-1, items 0..I-1; repeats count once).
    A node without edges has an empty row (its propagated layers are 0). Sub-matrices of A
    (`submatrix`, `expand`) are cut on the CPU with a node -> position map kept between calls (8 bytes
    per node): no sort per step, O(entries cut + nodes named)."""

    def __init__(self, num_users: int, num_items: int, users, items, device="cpu"):
        self.num_users, self.num_items = int(num_users), int(num_items)
        n = self.num_nodes
        u = torch.as_tensor(users, dtype=torch.int64).reshape(-1).cpu()
        i = torch.as_tensor(items, dtype=torch.int64).reshape(-1).cpu()
        if u.numel() and (int(u.min()) < 0 or int(u.max()) >= self.num_users or int(i.min()) < 0
                          or int(i.max()) >= self.num_items):
            raise ValueError("a pair's user or item is outside the graph's users / items")
        key = torch.unique(torch.cat([u * n + (self.num_users + i), (self.num_users + i) * n + u]))  # sorted (row, col)
        rows, cols = key // n, key % n
        deg = torch.bincount(rows, minlength=n).to(torch.float32)
        dinv = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
        self.indptr = torch.zeros(n + 1, dtype=torch.int64)
        self.indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
        self.indices = cols
        self.values = dinv[rows] * dinv[cols]
        self.degree = deg
        self.device = torch.device(device)
        self.adj = _csr(self.indptr, self.indices, self.values, (n, n)).to(self.device)
        self._pos = torch.full((n,), -1, dtype=torch.int64)  # node -> position in the current set, else -1
        self._seen = torch.zeros(n, dtype=torch.bool)

    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_items

    @property
    def num_edges(self) -> int:
        """Directed entries of A (2 per training pair)."""
        return int(self.indices.numel())

    def _rows(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indptr [n+1], entry positions in A)`` of the rows ``nodes`` [n] of A, in order."""
        start = self.indptr.index_select(0, nodes)
        cnt = self.indptr.index_select(0, nodes + 1) - start
        indptr = torch.zeros(nodes.numel() + 1, dtype=torch.int64)
        torch.cumsum(cnt, 0, out=indptr[1:])
        total = int(indptr[-1])
        return indptr, torch.repeat_interleave(start - indptr[:-1], cnt, output_size=total) + torch.arange(total)

    def expand(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(next, M)`` for sorted unique ``nodes`` [n]: next = nodes ∪ their neighbours, sorted [m];
        M = A[nodes, next] [n, m] (CSR; within a row the columns keep A's order, so ``M @ x`` sums each row
        as ``A @ x`` does)."""
        nodes = nodes.cpu()
        indptr, entries = self._rows(nodes)
        cols = self.indices.index_select(0, entries)
        seen = self._seen
        seen[nodes] = True
        seen[cols] = True
        nxt = seen.nonzero().squeeze(1)  # sorted
        seen[nxt] = False
        pos = self._pos
        pos[nxt] = torch.arange(nxt.numel())
        m = _csr(indptr, pos.index_select(0, cols), self.values.index_select(0, entries), (nodes.numel(), nxt.numel()))
        pos[nxt] = -1
        return nxt.to(self.device), m.to(self.device)

    def submatrix(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """A[rows, cols] (CSR [len(rows), len(cols)]) for sorted unique ``rows`` and ``cols``; entries whose column
        is not in ``cols`` are dropped, the rest keep A's order."""
        rows, cols = rows.cpu(), cols.cpu()
        indptr, entries = self._rows(rows)
        pos = self._pos
        pos[cols] = torch.arange(cols.numel())
        at = pos.index_select(0, self.indices.index_select(0, entries))
        pos[cols] = -1
        keep = at >= 0
        row_of = torch.repeat_interleave(torch.arange(rows.numel()), indptr[1:] - indptr[:-1], output_size=at.numel())
        kept_indptr = torch.zeros(rows.numel() + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(row_of[keep], minlength=rows.numel()), 0, out=kept_indptr[1:])
        m = _csr(kept_indptr, at[keep], self.values.index_select(0, entries[keep]), (rows.numel(), cols.numel()))
        return m.to(self.device)

    def positions(self, within: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """Positions in sorted unique ``within`` of ``nodes`` (each one of them)."""
        pos = self._pos
        w = within.cpu()
        pos[w] = torch.arange(w.numel())
        out = pos.index_select(0, nodes.cpu())
        pos[w] = -1
        return out.to(nodes.device)

    def khop(self, nodes: torch.Tensor, num_layers: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(sets, mats)``: sets[h] = ``S_h`` (sets[0] = ``nodes``, sorted unique), mats[h] = ``A[S_h, S_(h+1)]``."""
        sets, mats = [nodes], []
        for _ in range(num_layers):
            nxt, m = self.expand(sets[-1])
            sets.append(nxt)
            mats.append(m)
        return sets, mats


class LightGCN(nn.Module):
    """See the module doc. ``storage_factory`` as in `build_collection` (None: the tables in memory)."""

    def __init__(self, graph: InteractionGraph, dim: int = 64, num_layers: int = 3, l2_reg: float = 1e-4,
                 optimizer: SparseOptimizer | None = None, seed: int = 0, storage_factory=None, device="cpu",
                 propagation: Propagation = "khop"):
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        if propagation not in ("khop", "full"):
            raise ValueError(f"propagation must be 'khop' or 'full', got {propagation!r}")
        self.graph, self.dim, self.num_layers = graph, int(dim), int(num_layers)
        self.l2_reg, self.propagation = float(l2_reg), propagation
        self.num_users, self.num_items = graph.num_users, graph.num_items
        optimizer = optimizer or SparseOptimizer("adam", 1e-3)
        self.embeddings = build_collection([TableConfig("user", self.num_users, self.dim),
                                            TableConfig("item", self.num_items, self.dim)], optimizer, seed,
                                           storage_factory=storage_factory, device=device)
        self.last_rows = 0  # rows looked up by the last `propagate` (both tables)

    @property
    def tables(self) -> dict[str, EmbeddingBag]:
        user, item = self.embeddings.bags
        return {"user": user, "item": item}

    def lookup(self, nodes: torch.Tensor) -> torch.Tensor:
        """Layer-0 rows [n, D] of sorted unique node IDs ``nodes`` [n]: ONE call of each table (a bag of one
        per node). Call once per training step (the tables' fused optimizer updates the rows in backward)."""
        split = int(torch.searchsorted(nodes, torch.tensor(self.num_users, device=nodes.device)))
        user, item = self.embeddings.bags
        parts = []
        for table, ids in ((user, nodes[:split]), (item, nodes[split:] - self.num_users)):
            if ids.numel():
                parts.append(table(ids, torch.arange(ids.numel() + 1, device=ids.device)))
        self.last_rows = int(nodes.numel())
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def propagate(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(final [n, D], layer0 [n, D])`` of sorted unique node IDs ``nodes`` [n] (module doc, steps 2-4)."""
        a = 1.0 / (self.num_layers + 1)
        if self.propagation == "full":
            x = self.lookup(torch.arange(self.graph.num_nodes, device=nodes.device))
            x0 = x.index_select(0, nodes)
            out = x0 * a
            for _ in range(self.num_layers):
                x = spmm(self.graph.adj, x, self.graph.adj)  # A symmetric: A^T = A
                out = out + x.index_select(0, nodes) * a
            return out, x0
        g = self.graph
        sets, mats = g.khop(nodes, self.num_layers)
        x = self.lookup(sets[-1])
        x0 = x.index_select(0, g.positions(sets[-1], nodes))
        out = x0 * a
        for h in range(self.num_layers - 1, -1, -1):
            # E^(K-h) on S_h; backward: A[S_h, S_(h+1)]^T = A[S_(h+1), S_h] (A symmetric), cut when needed
            x = spmm(mats[h], x, lambda h=h: g.submatrix(sets[h + 1], sets[h]))
            out = out + (x if h == 0 else x.index_select(0, g.positions(sets[h], nodes))) * a
        return out, x0

    def _batch(self, users: torch.Tensor, *item_lists: torch.Tensor):
        """Final and layer-0 rows of ``users`` and each of ``item_lists`` (item rows), in their shapes."""
        ids = [users] + [i + self.num_users for i in item_lists]
        flat = torch.cat([t.reshape(-1) for t in ids])
        nodes, inverse = torch.unique(flat, return_inverse=True)
        final, x0 = self.propagate(nodes)
        f, z = final.index_select(0, inverse), x0.index_select(0, inverse)
        sizes = [t.numel() for t in ids]
        return f.split(sizes), z.split(sizes)

    def loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """BPR + L2 of the batch's layer-0 rows (module doc, step 5) of triples int64 [B] each."""
        (fu, fp, fn), (zu, zp, zn) = self._batch(users, positives, negatives)
        pos, neg = (fu * fp).sum(-1), (fu * fn).sum(-1)
        bpr = -F.logsigmoid(pos - neg).mean()
        reg = (zu.pow(2).sum() + zp.pow(2).sum() + zn.pow(2).sum()) * (self.l2_reg / 2) / users.numel()
        return bpr + reg

    @torch.no_grad()
    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(users [U, D], items [I, D])``: every node's final embedding (full-graph propagation; every row
        read once through the tables)."""
        was = self.training
        self.eval()
        try:
            n = self.graph.num_nodes
            x = self.lookup(torch.arange(n, device=self.graph.device))
            a = 1.0 / (self.num_layers + 1)
            out = x * a
            for _ in range(self.num_layers):
                x = torch.sparse.mm(self.graph.adj, x)
                out = out + x * a
            return out[:self.num_users], out[self.num_users:]
        finally:
            self.train(was)

    @torch.no_grad()
    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores [B, C] of candidate item rows ``items`` [B, C] for ``users`` [B] (exact, via the K-hop
        neighbourhood of the batch)."""
        was = self.training
        self.eval()
        try:
            (fu, fi), _ = self._batch(users, items)
            return torch.einsum("bd,bcd->bc", fu, fi.view(*items.shape, self.dim))
        finally:
            self.train(was)

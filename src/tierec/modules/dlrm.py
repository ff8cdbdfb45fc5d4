"""DLRM (Naumov et al., 2019): bottom MLP, embedding bags, dot interaction, top MLP.

Shapes for a batch of B samples, T sparse features, embedding dim D:

    dense [B, n_dense] --bottom MLP--> x [B, D]
    sparse KJT         --embeddings--> e [B, T, D]
    z = [x; e]  [B, T+1, D];  pairwise dots of z, strict lower triangle  [B, (T+1)T/2]
    top MLP([x, dots]) --> logit [B]

With a deduplicated batch (``user``: inverse KJT, U unique user rows, inverse [B]) the part of
the network that depends on the user row alone runs on U rows (`DLRM.forward_dedup`): split
z into the user-side vectors zu [U, Tu, D] and the others zo = [x; item vectors] [B, To, D];

    user x user dots  on zu                      [U, Tu(Tu-1)/2]  --W_uu-->  [U, H] --expand--> [B, H]
    other x other dots on zo, user x other dots  [B, ...]         --W_rest--> [B, H] (+ bias)

where W_uu and W_rest are column slices of the top MLP's first Linear weight, so the
parameters, the state_dict and the logits (within float rounding) are the plain model's.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from tierec.modules.embedding import EmbeddingCollection
from tierec.sparse import KeyedJaggedTensor


def mlp(sizes: list[int], last_activation: bool) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ReLUs between. ``sizes[0]`` may be 0 (a data set
    without dense features): the first layer is then its bias alone, a learned constant."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        with warnings.catch_warnings():  # a [n, 0] weight: its (no-op) initialisation warns on every run
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def lower_pairs(n: int, device=None) -> torch.Tensor:
    """Positions in the flattened [n, n] products of the pairs (i, j), i > j, row-major: [n(n-1)/2]."""
    rows, cols = torch.tril_indices(n, n, offset=-1, device=device)
    return rows * n + cols


class DotInteraction(nn.Module):
    """[B, F, D] -> [B, F(F-1)/2]: dot products of every pair (i, j), i > j, of feature vectors, in
    row-major order of the strict lower triangle: pair (i, j) is column i(i-1)/2 + j."""

    pairs: torch.Tensor  # buffer: positions of the pairs in the flattened [F, F] products

    def __init__(self, num_features: int):
        super().__init__()
        self.register_buffer("pairs", lower_pairs(num_features), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # index_select on the flattened products: the same gather as [:, rows, cols], much faster on CPU
        return torch.bmm(z, z.transpose(1, 2)).flatten(1).index_select(1, self.pairs)


class DLRM(nn.Module):
    def __init__(self, num_dense: int, embeddings: EmbeddingCollection, bottom_mlp: list[int],
                 top_mlp: list[int]):
        super().__init__()
        configs = embeddings.table_configs  # all tables, also when they are sharded over ranks
        dims = {c.embedding_dim for c in configs}
        if len(dims) != 1:
            raise ValueError(f"DLRM's dot interaction needs one embedding dim for all tables, got {sorted(dims)}")
        dim = dims.pop()
        num_sparse = len(configs)
        self.embeddings = embeddings
        self.bottom = mlp([num_dense, *bottom_mlp, dim], last_activation=True)
        self.interaction = DotInteraction(num_sparse + 1)
        n_inter = (num_sparse + 1) * num_sparse // 2
        self.top = mlp([dim + n_inter, *top_mlp, 1], last_activation=False)
        self.dim = dim
        self._plans: dict[tuple, dict] = {}  # forward_dedup's index tensors per (user keys, device)
        self.storage_plan: list[dict] | None = None  # where the tables live (set by `build_model`; in checkpoints)
        self.budget_split: dict | None = None  # how the memory budget was spent (set by `build_model`)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor,
                user: KeyedJaggedTensor | None = None) -> torch.Tensor:
        """dense float32 [B, n_dense], sparse KJT (, user: inverse KJT of the user-side keys) -> logits [B].

        A batch that deduplicates (one inverse for all user keys, U < B) takes `forward_dedup`;
        otherwise the user-side rows are expanded after pooling and the rest runs per sample
        (so a batch with nothing to deduplicate gives bit-identical results)."""
        if user is not None and user.stride() < dense.shape[0] and user.inverse_indices()[1].dim() == 1 \
                and self._plan(tuple(user.keys()))["user"]:
            return self.forward_dedup(dense, sparse, user)
        x = self.bottom(dense)
        pooled = self.embeddings.pooled(sparse, user) if user is not None else self.embeddings.pooled(sparse)
        return self.head(x, torch.stack([x, *pooled], 1))  # [B, T+1, D], one copy

    def head(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Bottom output x [B, D] and z = [x; pooled embeddings in table order] [B, T+1, D] -> logits [B]
        (interaction and top MLP; serving calls it with embeddings pooled in one fused lookup)."""
        return self.top(torch.cat([x, self.interaction(z)], 1)).squeeze(1)

    def forward_dedup(self, dense: torch.Tensor, sparse: KeyedJaggedTensor, user: KeyedJaggedTensor) -> torch.Tensor:
        """Logits [B] with the user-only part -- lookups, pooling, user x user dots and their share
        of the first top layer -- computed once per unique user row (see the module docstring).
        ``user``: inverse KJT with one inverse [B] shared by its keys (stride U)."""
        inv = user.inverse_indices()[1]
        if inv.dim() != 1:
            raise ValueError("forward_dedup needs one inverse [B] shared by the user keys, got a per-key inverse")
        plan = self._plan(tuple(user.keys()))
        x = self.bottom(dense)  # [B, D]
        pooled = self.embeddings.pooled(sparse, user, expand=False)  # user tables [U, D], item tables [B, D]
        zu = torch.stack([pooled[t] for t in plan["user"]], 1)  # [U, Tu, D]
        zo = torch.stack([x, *(pooled[t] for t in plan["other"])], 1)  # [B, To, D]
        uu = torch.bmm(zu, zu.transpose(1, 2)).flatten(1).index_select(1, plan["uu"])  # [U, Tu(Tu-1)/2]
        oo = torch.bmm(zo, zo.transpose(1, 2)).flatten(1).index_select(1, plan["oo"])  # [B, To(To-1)/2]
        uo = torch.bmm(zu.index_select(0, inv), zo.transpose(1, 2)).flatten(1)  # [B, Tu * To]
        first = self._first_top()
        h = torch.addmm(first.bias, torch.cat([x, oo, uo], 1), first.weight.index_select(1, plan["rest_cols"]).t())
        h = h + (uu @ first.weight.index_select(1, plan["uu_cols"]).t()).index_select(0, inv)  # [B, H]
        return self.top[1:](h).squeeze(1)

    def _plan(self, user_keys: tuple[str, ...]) -> dict:
        """Index tensors of `forward_dedup` for a set of user-side keys (cached): table indices of the
        user and other sides, pair positions in the flattened products, their first-layer columns."""
        dev = self._first_top().weight.device
        plan = self._plans.get((user_keys, dev))
        if plan is None:
            on_u = torch.tensor([k in user_keys for k in self.embeddings.keys], dtype=torch.bool)
            tables = torch.arange(len(on_u))
            u = tables[on_u] + 1  # positions in z = [x, e_1 .. e_T]
            o = torch.cat([torch.zeros(1, dtype=torch.long), tables[~on_u] + 1])
            ru, cu = torch.tril_indices(len(u), len(u), offset=-1)
            ro, co = torch.tril_indices(len(o), len(o), offset=-1)
            ui, oj = u.repeat_interleave(len(o)), o.repeat(len(u))  # user x other, [Tu, To] row-major

            def col(i, j):  # column of the dot of z_i and z_j in the first Linear's input [x, dots]
                hi, lo = torch.maximum(i, j), torch.minimum(i, j)
                return self.dim + hi * (hi - 1) // 2 + lo

            plan = {"user": (u - 1).tolist(), "other": (o[1:] - 1).tolist(),
                    "uu": lower_pairs(len(u), dev), "oo": lower_pairs(len(o), dev),
                    "uu_cols": col(u[ru], u[cu]).to(dev),
                    "rest_cols": torch.cat([torch.arange(self.dim), col(o[ro], o[co]), col(ui, oj)]).to(dev)}
            self._plans[user_keys, dev] = plan
        return plan

    def _first_top(self) -> nn.Linear:
        """The top MLP's first layer, nn.Linear(D + pairs, H); its columns in [x, dots] order."""
        first = self.top[0]
        assert isinstance(first, nn.Linear)  # `mlp` starts with a Linear
        return first

    def dense_parameters(self):
        """Parameters trained by the dense optimizer (embeddings update themselves)."""
        return [p for n, p in self.named_parameters() if not n.startswith("embeddings.")]

"""Two-tower retrieval model: a user tower and an item tower scored by a dot product.

The data set's sparse features are split by their schema ``side``: the *user* tower pools
the user-side features, the *item* tower the item-side ones. Each tower concatenates its
pooled embeddings and maps them through an MLP to an L2-normalised vector of
``embedding_dim``. Shapes for a batch of B samples, embedding dim D:

    user features --tables--> [B, Tu * D] --user MLP--> u [B, D], |u| = 1
    item features --tables--> [B, Ti * D] --item MLP--> v [B, D], |v| = 1
    logit = scale * <u, v> + bias   [B]      (trained with BCE on the labels)

All tables sit in one `EmbeddingBagCollection` (so checkpoints, tiers and the fused sparse
optimizer work as for DLRM). At serving time item vectors go into an ANN index and a
user vector is the query: the ranking of items by ``<u, v>`` is the ranking by the logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tierec.errors import ConfigError
from tierec.modules.dlrm import mlp
from tierec.modules.embedding import EmbeddingBagCollection
from tierec.sparse import KeyedJaggedTensor


class TwoTower(nn.Module):
    def __init__(self, embeddings: EmbeddingBagCollection, sides: dict[str, str], tower_mlp: list[int]):
        """``sides`` maps each table's feature key to "user" or "item"."""
        super().__init__()
        self.embeddings = embeddings
        self.user_keys = [k for k in embeddings.keys if sides.get(k) == "user"]
        self.item_keys = [k for k in embeddings.keys if sides.get(k) == "item"]
        if not self.user_keys or not self.item_keys:
            raise ConfigError("the two-tower model needs user-side and item-side sparse features; this data set has "
                              f"{len(self.user_keys)} user-side and {len(self.item_keys)} item-side; declare "
                              "user-side features with `side: user` in the field map of `tierec data convert` "
                              "(MovieLens: user_id is user-side), or `tierec data synth --user-features K "
                              "--session-length L`")
        dim = embeddings.table_configs[0].embedding_dim
        self.dim = dim
        self.user_mlp = mlp([len(self.user_keys) * dim, *tower_mlp, dim], last_activation=False)
        self.item_mlp = mlp([len(self.item_keys) * dim, *tower_mlp, dim], last_activation=False)
        self.scale = nn.Parameter(torch.tensor(5.0))
        self.bias = nn.Parameter(torch.zeros(()))
        self._by_key = {t.config.key: t for t in embeddings.bags}
        self.storage_plan: list[dict] | None = None  # where the tables live (set by `build_model`; in checkpoints)
        self.budget_split: dict | None = None  # how the memory budget was spent (set by `build_model`)

    def _pool(self, kjt: KeyedJaggedTensor, keys: list[str]) -> torch.Tensor:
        by_key = kjt.to_dict()
        missing = [k for k in keys if k not in by_key]
        if missing:
            raise ConfigError(f"batch has no sparse feature(s) {missing}; it has {kjt.keys()}")
        out = []
        for k in keys:
            jt = by_key[k]
            out.append(self._by_key[k](jt.values, jt.offsets(), jt.weights))
        return torch.cat(out, 1)

    def user_embedding(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """KJT with (at least) the user-side keys -> u float32 [B, D], unit norm."""
        return F.normalize(self.user_mlp(self._pool(sparse, self.user_keys)), dim=1)

    def item_embedding(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """KJT with (at least) the item-side keys -> v float32 [B, D], unit norm."""
        return F.normalize(self.item_mlp(self._pool(sparse, self.item_keys)), dim=1)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor,
                user: KeyedJaggedTensor | None = None) -> torch.Tensor:
        """dense (unused) [B, n_dense], sparse KJT (, user: inverse KJT of the user-side keys) -> logits [B].

        With ``user`` (deduplicated batches) the whole user tower -- lookups, pooling, MLP -- runs
        once per unique user row, [U, D], and is expanded to [B, D] with one ``index_select``."""
        if user is None:
            u = self.user_embedding(sparse)
        else:
            inv = user.inverse_indices()[1]
            if inv.dim() == 1:  # one map shared by the user keys
                u = self.user_embedding(user).index_select(0, inv)
            else:
                u = self.user_embedding(user.expand())
        v = self.item_embedding(sparse)
        return self.scale * (u * v).sum(1) + self.bias

    def dense_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("embeddings.")]

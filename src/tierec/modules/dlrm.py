"""DLRM (Naumov et al., 2019): bottom MLP, embedding bags, dot interaction, top MLP.

Shapes for a batch of B samples, T sparse features, embedding dim D:

    dense [B, n_dense] --bottom MLP--> x [B, D]
    sparse KJT         --embeddings--> e [B, T, D]
    z = [x; e]  [B, T+1, D];  pairwise dots of z, strict lower triangle  [B, (T+1)T/2]
    top MLP([x, dots]) --> logit [B]
"""

from __future__ import annotations

import torch
from torch import nn

from tierec.modules.embedding import EmbeddingBagCollection
from tierec.sparse import KeyedJaggedTensor


def mlp(sizes: list[int], last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DotInteraction(nn.Module):
    """[B, F, D] -> [B, F(F-1)/2]: dot products of every pair of feature vectors."""

    def __init__(self, num_features: int):
        super().__init__()
        rows, cols = torch.tril_indices(num_features, num_features, offset=-1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.bmm(z, z.transpose(1, 2))[:, self.rows, self.cols]


class DLRM(nn.Module):
    def __init__(self, num_dense: int, embeddings: EmbeddingBagCollection, bottom_mlp: list[int],
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

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor,
                user: KeyedJaggedTensor | None = None) -> torch.Tensor:
        """dense float32 [B, n_dense], sparse KJT (, user: inverse KJT of the user-side keys) -> logits [B]."""
        x = self.bottom(dense)
        pooled = self.embeddings.pooled(sparse, user) if user is not None else self.embeddings.pooled(sparse)
        z = torch.stack([x, *pooled], 1)  # [B, T+1, D], one copy
        return self.top(torch.cat([x, self.interaction(z)], 1)).squeeze(1)

    def dense_parameters(self):
        """Parameters trained by the dense optimizer (embeddings update themselves)."""
        return [p for n, p in self.named_parameters() if not n.startswith("embeddings.")]

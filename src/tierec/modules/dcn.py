"""DCN-V2 (Wang et al., 2021): bottom MLP, embedding bags, a cross network, top MLP.

Shapes for a batch of B samples, T sparse features, embedding dim D, d = (T+1) D:

    dense [B, n_dense] --bottom MLP--> x [B, D]
    sparse KJT         --embeddings--> e [B, T, D]
    z = [x; e_1; ..; e_T] flattened                               [B, d]
    cross network: x_0 = z, x_{l+1} = x_0 * (W_l x_l + b_l) + x_l   [B, d]   (L layers)
    stacked:  top MLP(x_L)                                --> logit [B]
    parallel: top Linear([x_L, deep MLP(z)])              --> logit [B]

W_l is [d, d] (``rank == 0``), or low rank W_l = U_l V_l^T with U_l, V_l [d, r] (``rank == r``).

"parallel" (the paper's parallel structure): the cross network and a deep network both read z;
the deep network is the top MLP's hidden layers (``top_mlp``, ReLU after each), the two outputs
[B, d] and [B, top_mlp[-1]] are concatenated and one Linear maps them to the logit. "stacked"
(the paper's stacked structure; TorchRec's `DLRM_DCN` and MLPerf's DLRM-DCNv2): the top MLP
(hidden layers, then a Linear to 1) reads the cross network's output.

The layout is TorchRec's ``torchrec.models.dlrm.DLRM_DCN`` (``InteractionDCNArch`` over
``LowRankCrossNet``; ``CrossNet`` for full rank), so its weights copy over one to one
(``tests/test_dcn.py``): z puts the bottom output first, then the tables in order; the bottom
MLP has a ReLU after every layer, the stacked top MLP after every layer but the last; U_l is
``W_kernels[l]`` [d, r], V_l^T is ``V_kernels[l]`` [r, d] (stored as TorchRec stores it: the
weight of the map d -> r), b_l is ``bias[l]`` [d] (``CrossNet``: ``kernels[l]`` [d, d] and
``bias[l]`` [d, 1]).

A deduplicated batch (``user``: inverse KJT) looks its user-side rows up and pools them once
per unique row, then expands them to the B samples. Nothing more is shared per user: from the
first cross layer on, every element of x_0 * (W x_l + b) mixes the user's features with the
item's, so the dense network runs per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tierec.modules.dlrm import DLRM, mlp
from tierec.modules.embedding import EmbeddingCollection
from tierec.sparse import KeyedJaggedTensor

STRUCTURES = ("stacked", "parallel")


class CrossNetV2(nn.Module):
    """[B, d] -> [B, d]: ``num_layers`` cross layers x_{l+1} = x_0 * (W_l x_l + b_l) + x_l.

    ``rank == 0``: W_l a full [d, d] matrix (``W[l]``; TorchRec's ``CrossNet``). ``rank > 0``:
    W_l = U_l V_l^T, computed as U_l (V_l^T x_l) (``U[l]`` [d, r], ``V[l]`` = V_l^T [r, d];
    TorchRec's ``LowRankCrossNet``, same order of operations: two matmuls, then the bias).
    Weights start Xavier-normal, biases at zero, as TorchRec's do."""

    def __init__(self, dim: int, num_layers: int, rank: int = 0):
        super().__init__()
        if num_layers < 0 or rank < 0:
            raise ValueError(f"CrossNetV2 needs num_layers >= 0 and rank >= 0, got {num_layers}, {rank}")
        self.dim, self.num_layers, self.rank = dim, num_layers, rank

        def xavier(*shape: int) -> nn.Parameter:
            return nn.Parameter(nn.init.xavier_normal_(torch.empty(*shape)))

        if rank == 0:
            self.W = nn.ParameterList([xavier(dim, dim) for _ in range(num_layers)])
        else:
            self.U = nn.ParameterList([xavier(dim, rank) for _ in range(num_layers)])
            self.V = nn.ParameterList([xavier(rank, dim) for _ in range(num_layers)])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in range(num_layers)])
        # called with i before layer i runs: serving streams layer weights in (tierec.inference.dense_stream)
        self.layer_hook: Callable[[int], None] | None = None

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        hook = self.layer_hook
        for i in range(self.num_layers):
            if hook is not None:
                hook(i)
            if self.rank:
                h = F.linear(F.linear(x, self.V[i]), self.U[i])  # U (V^T x): [B, r], then [B, d]
            else:
                h = F.linear(x, self.W[i])  # W x: [B, d]
            x = x0 * (h + self.b[i]) + x
        return x

    def macs(self) -> int:
        """Multiply-adds per sample of the matmuls (element-wise work not counted)."""
        per_layer = self.dim * self.dim if self.rank == 0 else 2 * self.dim * self.rank
        return self.num_layers * per_layer


class DCNv2(nn.Module):
    def __init__(self, num_dense: int, embeddings: EmbeddingCollection, bottom_mlp: list[int],
                 top_mlp: list[int], cross_layers: int = 3, cross_rank: int = 0, structure: str = "stacked"):
        super().__init__()
        configs = embeddings.table_configs  # all tables, also when they are sharded over ranks
        dims = {c.embedding_dim for c in configs}
        if len(dims) != 1:
            raise ValueError(f"DCNv2 stacks the bottom output with the embeddings: it needs one embedding dim for "
                             f"all tables, got {sorted(dims)}")
        if structure not in STRUCTURES:
            raise ValueError(f"DCNv2 structure must be one of {', '.join(STRUCTURES)}, got {structure!r}")
        dim = dims.pop()
        width = (len(configs) + 1) * dim  # d: z = [x; e_1 .. e_T] flattened
        self.embeddings = embeddings
        self.bottom = mlp([num_dense, *bottom_mlp, dim], last_activation=True)
        self.cross = CrossNetV2(width, cross_layers, cross_rank)
        self.deep: nn.Sequential | None = None
        if structure == "stacked":
            self.top = mlp([width, *top_mlp, 1], last_activation=False)
        else:
            self.deep = mlp([width, *top_mlp], last_activation=True)
            self.top = mlp([width + (top_mlp[-1] if top_mlp else width), 1], last_activation=False)
        self.dim, self.width, self.structure = dim, width, structure
        self.storage_plan: list[dict] | None = None  # where the tables live (set by `build_model`; in checkpoints)
        self.budget_split: dict | None = None  # how the memory budget was spent (set by `build_model`)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor,
                user: KeyedJaggedTensor | None = None) -> torch.Tensor:
        """dense float32 [B, n_dense], sparse KJT (, user: inverse KJT of the user-side keys) -> logits [B].
        User-side rows are pooled once per unique row and expanded to the B samples (module docstring)."""
        x = self.bottom(dense)
        pooled = self.embeddings.pooled(sparse, user) if user is not None else self.embeddings.pooled(sparse)
        return self.head(x, torch.stack([x, *pooled], 1))  # [B, T+1, D], one copy

    def head(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Bottom output x [B, D] and z = [x; pooled embeddings in table order] [B, T+1, D] -> logits [B]
        (cross network and top MLP; serving calls it with embeddings pooled in one fused lookup).
        ``x`` is z's first vector: it is taken for the signature `DLRM.head` has."""
        z = z.flatten(1)  # [B, d]
        c = self.cross(z)
        if self.deep is None:
            return self.top(c).squeeze(1)
        return self.top(torch.cat([c, self.deep(z)], 1)).squeeze(1)

    def dense_parameters(self):
        """Parameters trained by the dense optimizer (embeddings update themselves)."""
        return [p for n, p in self.named_parameters() if not n.startswith("embeddings.")]


def dense_flops_per_sample(model: nn.Module) -> int:
    """FLOPs per sample of a model's dense part, forward: 2 x the multiply-adds of its matmuls -- every
    ``nn.Linear`` (in x out), every `CrossNetV2` (d^2 per layer, 2 d r low rank) and a `DLRM`'s dot
    interaction ((T+1)^2 D, as the batched matmul computes it). Biases, activations, the cross layers'
    element-wise products and the embedding lookups are not counted."""
    macs = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            macs += m.in_features * m.out_features
        elif isinstance(m, CrossNetV2):
            macs += m.macs()
    if isinstance(model, DLRM):
        n = len(model.embeddings.table_configs) + 1
        macs += n * n * model.dim
    return 2 * macs

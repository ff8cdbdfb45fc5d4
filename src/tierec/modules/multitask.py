"""Multi-task ranking: MMoE and PLE, with dense or sparse (top-k) mixtures of experts.

One forward for B samples, T sparse features, embedding dim D, K tasks (one per label of the data set),
n experts of output width E:

    dense [B, n_dense] --bottom MLP--> x [B, D];  sparse --embeddings--> e [B, T, D]
    h0 = [x, e_1, ..., e_T] flattened                                            [B, (T+1) D]
    MMoE (Ma et al., 2018): n shared experts f_i(h0) [B, E]; per task k a gate g_k = softmax(W_k h0) [B, n];
        tower_k(sum_i g_k,i f_i(h0)) -> logit_k
    PLE (Tang et al., 2020): per level, n experts per task and n shared ones; task k's gate mixes its own
        and the shared experts (input: task k's output of the level below), a shared gate mixes all of
        them (input: the shared output below; not on the last level); towers on the last level's outputs
    logits [B, K]  ([B] when the data set has one label)

**Sparse experts** (``top_k`` > 0, DeepSpeed-MoE / Switch style): a gate keeps its k highest logits per
sample and renormalises them (softmax over those k); the others weigh 0 and *do not run*: every expert
gathers the rows that some gate chose it for (``index_select``), runs on those alone and scatters its
weighted output back (``index_add_``). A sample pays for the experts its gates chose, not for all n.
The load-balancing loss (Switch Transformer's, per gate: n * sum_i f_i P_i with f_i the share of the
batch's choices that went to expert i and P_i its mean gate probability; averaged over gates) is
``aux_loss`` after each forward; the trainer adds ``moe_aux_weight`` times it. ``expert_rows_per_sample``
reports how many expert evaluations a sample cost in the last forward (FLOPs: `dense_flops_per_sample`).

The embeddings are the same tiered, exact tables as DLRM's; the experts mix every feature, so a
deduplicated batch shares only the user-side lookups (pooled once per unique row, then expanded).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from tierec.modules.dlrm import mlp
from tierec.modules.embedding import EmbeddingCollection
from tierec.sparse import KeyedJaggedTensor


def gate_weights(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate logits [B, m] -> (weights [B, m]: softmax over the top ``k`` per row, 0 elsewhere (k = 0 or k >= m:
    softmax over all), probabilities [B, m]: softmax over all (for the balancing loss))."""
    probs = F.softmax(logits, dim=1)
    if k <= 0 or k >= logits.shape[1]:
        return probs, probs
    top = logits.topk(k, dim=1)
    return torch.zeros_like(logits).scatter(1, top.indices, F.softmax(top.values, dim=1)), probs


def balancing_loss(weights: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss of one gate: m * sum_i f_i * P_i; f_i = share of the batch's
    (sample, chosen expert) pairs on expert i, P_i = mean probability of i. 1 when perfectly balanced."""
    chosen = (weights > 0).to(probs.dtype)
    f = chosen.sum(0) / chosen.sum().clamp(min=1)
    return probs.shape[1] * (f * probs.mean(0)).sum()


class Gate(nn.Module):
    """A softmax gate over ``candidates`` (indices into a level's experts), on an input of ``in_dim``."""

    candidates: list[int]

    def __init__(self, in_dim: int, candidates: list[int]):
        super().__init__()
        self.candidates = candidates
        self.proj = nn.Linear(in_dim, len(candidates))


class MixtureLevel(nn.Module):
    """Experts and the gates that mix them. ``expert_input[i]``: which input expert i reads (index into the
    inputs of `forward`); ``gate_input[g]``: which input gate g reads."""

    def __init__(self, in_dim: int, expert_mlp: list[int], expert_input: list[int], gate_input: list[int],
                 gate_candidates: list[list[int]], top_k: int):
        super().__init__()
        self.experts = nn.ModuleList(mlp([in_dim, *expert_mlp], last_activation=True) for _ in expert_input)
        self.expert_input = expert_input
        self.gates = nn.ModuleList(Gate(in_dim, c) for c in gate_candidates)
        self.gate_input = gate_input
        self.top_k = top_k
        self.out_dim = expert_mlp[-1]

    def forward(self, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        """inputs [B, in] each -> (one mixed output [B, E] per gate, the gates' mean balancing loss, expert rows
        evaluated)."""
        B = inputs[0].shape[0]
        mixes = []
        for gate, gi in zip(cast("list[Gate]", list(self.gates)), self.gate_input, strict=True):
            w, p = gate_weights(gate.proj(inputs[gi]), self.top_k)
            mixes.append((gate.candidates, w, p))
        aux = torch.stack([balancing_loss(w, p) for _, w, p in mixes]).mean() if self.top_k else inputs[0].new_zeros(())
        outs = [inputs[0].new_zeros(B, self.out_dim) for _ in mixes]
        rows_run = 0
        for e, (expert, ei) in enumerate(zip(self.experts, self.expert_input, strict=True)):
            users = [(g, cands.index(e), w) for g, (cands, w, _) in enumerate(mixes) if e in cands]
            if not users:
                continue
            if not self.top_k:  # dense: every expert on every row
                y = expert(inputs[ei])
                for g, j, w in users:
                    outs[g] = outs[g] + w[:, j : j + 1] * y
                rows_run += B
                continue
            need = torch.stack([w[:, j] > 0 for _, j, w in users]).any(0)
            rows = need.nonzero().squeeze(1)  # the rows some gate sent to this expert
            if rows.numel() == 0:
                continue
            y = expert(inputs[ei].index_select(0, rows))  # [n_e, E]: this expert runs on its rows alone
            for g, j, w in users:
                outs[g] = outs[g].index_add(0, rows, w.index_select(0, rows)[:, j : j + 1] * y)
            rows_run += rows.numel()
        return outs, aux, rows_run


class MultiTask(nn.Module):
    """MMoE (``kind="mmoe"``) or PLE (``kind="ple"``) over tierec embeddings; see the module docstring."""

    def __init__(self, kind: str, num_dense: int, embeddings: EmbeddingCollection, num_tasks: int,
                 bottom_mlp: list[int], expert_mlp: list[int], tower_mlp: list[int], experts: int, top_k: int = 0,
                 levels: int = 1):
        super().__init__()
        if kind not in ("mmoe", "ple"):
            raise ValueError(f"kind must be 'mmoe' or 'ple', got {kind!r}")
        configs = embeddings.table_configs
        dims = {c.embedding_dim for c in configs}
        if len(dims) != 1:
            raise ValueError(f"{kind} needs one embedding dim for all tables, got {sorted(dims)}")
        dim = dims.pop()
        self.kind, self.num_tasks, self.dim, self.top_k = kind, num_tasks, dim, top_k
        self.embeddings = embeddings
        self.bottom = mlp([num_dense, *bottom_mlp, dim], last_activation=True)
        in_dim = (len(configs) + 1) * dim
        E = expert_mlp[-1]
        self.levels = nn.ModuleList()
        K, n = num_tasks, experts
        if kind == "mmoe":
            self.levels.append(MixtureLevel(in_dim, expert_mlp, [0] * n, [0] * K, [list(range(n))] * K, top_k))
        else:  # experts of level l: task k's at [k n, (k+1) n), the shared ones at [K n, (K+1) n)
            for lvl in range(levels):
                last = lvl == levels - 1
                src = in_dim if lvl == 0 else E
                shared = list(range(K * n, (K + 1) * n))
                cands = [list(range(k * n, (k + 1) * n)) + shared for k in range(K)]
                gate_in = list(range(K))
                if not last:  # the shared gate mixes every expert, for the next level's shared input
                    cands.append(list(range((K + 1) * n)))
                    gate_in.append(K)
                expert_in = [k for k in range(K) for _ in range(n)] + [K] * n
                self.levels.append(MixtureLevel(src, expert_mlp, expert_in, gate_in, cands, top_k))
        self.towers = nn.ModuleList(mlp([E, *tower_mlp, 1], last_activation=False) for _ in range(K))
        self.aux_loss = torch.zeros(())  # the last forward's load-balancing loss (0 with dense gates)
        self.expert_rows_per_sample = 0.0  # expert evaluations per sample in the last forward
        self.storage_plan: list[dict] | None = None  # where the tables live (set by `build_model`)
        self.budget_split: dict | None = None

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor,
                user: KeyedJaggedTensor | None = None) -> torch.Tensor:
        """dense float32 [B, n_dense], sparse KJT (, user: inverse KJT) -> logits [B, K] ([B] for one task)."""
        x = self.bottom(dense)
        pooled = self.embeddings.pooled(sparse, user) if user is not None else self.embeddings.pooled(sparse)
        h0 = torch.cat([x, *pooled], 1)  # [B, (T+1) D]
        inputs = [h0] * (self.num_tasks + 1)  # per task, and the shared input (PLE)
        aux, rows = h0.new_zeros(()), 0
        for level in self.levels:
            outs, a, r = level(inputs)
            aux, rows = aux + a, rows + r
            inputs = outs if len(outs) > self.num_tasks else [*outs, outs[0]]  # the last level has no shared gate
        self.aux_loss = aux / len(self.levels)
        self.expert_rows_per_sample = rows / max(1, dense.shape[0])
        logits = torch.cat([tower(inputs[k]) for k, tower in enumerate(self.towers)], 1)  # [B, K]
        return logits.squeeze(1) if self.num_tasks == 1 else logits

    def dense_parameters(self):
        """Parameters trained by the dense optimizer (embeddings update themselves)."""
        return [p for n, p in self.named_parameters() if not n.startswith("embeddings.")]


def linear_flops(module: nn.Module) -> int:
    """2 x multiply-adds of every Linear in ``module``, per sample."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def dense_flops_per_sample(model: MultiTask) -> float:
    """FLOPs per sample of the dense part in the last forward: bottom MLP, gates and towers always, experts as
    many times as they ran per sample (``expert_rows_per_sample``; with top-k gating, k or a little more)."""
    levels = cast("list[MixtureLevel]", list(model.levels))
    per_expert = sum(linear_flops(lvl.experts[0]) for lvl in levels) / len(levels)
    gates = sum(linear_flops(lvl.gates) for lvl in levels)
    return linear_flops(model.bottom) + gates + linear_flops(model.towers) + per_expert * model.expert_rows_per_sample

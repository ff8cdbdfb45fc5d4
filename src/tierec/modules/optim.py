"""Fused sparse row-wise optimizers for embedding tables.

They update only the rows a batch touched, in place, from the summed gradient of
each unique row: no dense gradient of a table is ever built. Each row's optimizer
state lives beside its weights (``state`` [rows, state_dim]) so that a tiered
store can move weights and state together.

State layouts (``state_dim`` columns per row, float32):

- ``sgd``:             0
- ``rowwise_adagrad``: 1   (sum of mean squared gradients; FBGEMM's EXACT_ROWWISE_ADAGRAD)
- ``adagrad``:         D   (element-wise sum of squared gradients)
- ``adam``:            2D  (first and second moments; lazy Adam as torch.optim.SparseAdam and
                       FBGEMM do it: only touched rows move, bias correction uses the
                       table's global step count; ``dense=True``: every row of the table
                       moves each step, as torch.optim.Adam on the whole table -- rows
                       absent from a step keep moving by their momentum. Only for a table
                       whole in memory: the working set must be the table)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierec.errors import ConfigError

KINDS = ("sgd", "rowwise_adagrad", "adagrad", "adam")


@dataclass(frozen=True)
class SparseOptimizer:
    kind: str = "rowwise_adagrad"
    lr: float = 0.05
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    dense: bool = False  # adam only: every row moves each step (module doc)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"sparse optimizer must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.dense and self.kind != "adam":
            raise ConfigError(f"a dense sparse optimizer is Adam only, not {self.kind!r}")
        if not self.lr > 0:
            raise ConfigError(f"sparse learning rate must be > 0, got {self.lr}")

    def state_dim(self, dim: int) -> int:
        return {"sgd": 0, "rowwise_adagrad": 1, "adagrad": dim, "adam": 2 * dim}[self.kind]

    @torch.no_grad()
    def update(self, weight: torch.Tensor, state: torch.Tensor, index: torch.Tensor, grad: torch.Tensor,
               step: int = 1) -> torch.Tensor | None:
        """Apply step number ``step`` (1-based, per table) to rows ``weight[index]``.

        ``index`` [U] is unique; ``grad`` [U, D] is each row's summed gradient. Returns None, or with
        ``dense`` the rows moved besides ``index``: all of ``weight`` (the caller marks them written).
        """
        if self.dense:
            return self._dense_adam(weight, state, index, grad, step)
        if index.numel() == 0:
            return None
        # index is unique: gather rows, update, scatter back (index_copy_ is much faster than
        # index_add_ on CPU).
        w = weight.index_select(0, index)
        if self.kind == "sgd":
            w.add_(grad, alpha=-self.lr)
        elif self.kind == "rowwise_adagrad":
            acc = state.index_select(0, index).squeeze(1) + (grad * grad).mean(1)
            state.index_copy_(0, index, acc.unsqueeze(1))
            w.addcmul_(grad, (-self.lr / (acc.sqrt() + self.eps)).unsqueeze(1))
        elif self.kind == "adagrad":
            acc = state.index_select(0, index).addcmul_(grad, grad)
            state.index_copy_(0, index, acc)
            w.addcdiv_(grad, acc.sqrt().add_(self.eps), value=-self.lr)
        else:  # adam
            d = weight.shape[1]
            s = state.index_select(0, index)
            m, v = s[:, :d], s[:, d:]
            m.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
            v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            state.index_copy_(0, index, s)
            bc1 = 1 - self.beta1**step
            bc2 = 1 - self.beta2**step
            # the same expression order as torch.optim.SparseAdam
            denom = v.sqrt().div_(bc2**0.5).add_(self.eps)
            w.addcdiv_(m, denom, value=-self.lr / bc1)
        weight.index_copy_(0, index, w)
        return None

    def _dense_adam(self, weight: torch.Tensor, state: torch.Tensor, index: torch.Tensor, grad: torch.Tensor,
                    step: int) -> torch.Tensor:
        """torch.optim.Adam's step on the whole table (same expression order): the gradient is ``grad`` on rows
        ``index`` and zero elsewhere."""
        d = weight.shape[1]
        full = torch.zeros_like(weight)
        full.index_copy_(0, index, grad)
        m, v = state[:, :d], state[:, d:]
        m.lerp_(full, 1 - self.beta1)  # as torch.optim.Adam writes it (lerp, not mul + add: other roundings)
        v.mul_(self.beta2).addcmul_(full, full, value=1 - self.beta2)
        bc1 = 1 - self.beta1**step
        bc2 = 1 - self.beta2**step
        denom = v.sqrt().div_(bc2**0.5).add_(self.eps)
        weight.addcdiv_(m, denom, value=-self.lr / bc1)
        return torch.arange(weight.shape[0], device=weight.device)

"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018) on a tierec item table.

Items are rows of one tierec `EmbeddingBag` table (``item``, ``num_items + 1`` rows; row 0 is never
used): every step looks up the union of the step's input, positive and negative items in ONE call
of the table, each item a bag of length 1 and padding (item 0) an empty bag (the zero vector), then
indexes the pooled rows. So the item rows train through the table's fused sparse optimizer (no dense
gradient of the table), in whatever storage the table has (memory, SSD behind a cache, ...).

For inputs [B, L] (left-padded with 0), positions 1..L, dim D::

    x = e(items) * sqrt(D) + p(positions), dropout, zeroed at padding
    per block (post-LN, as the original / pmixer's SASRec.pytorch):
        q = LN(x); x = q + MHA(q, x, x, causal); x = LN(x); x = x + FFN(x); zeroed at padding
    per block (pre_ln):
        x = x + MHA(LN(x), causal); x = x + FFN(LN(x)); zeroed at padding
    h = LN(x)                                                   [B, L, D]
    score(t, item) = <h_t, e(item)>

FFN = Linear, ReLU, Linear with dropout (point-wise). Training loss: binary cross-entropy of the
positive (next item) and one sampled negative per non-padding position.

``attention="full"`` (default): MHA is nn.MultiheadAttention with the causal mask (padding keys
are attended, as in the original). ``attention="pruned"``: MHA is `tierec.modules.attention.PrunedAttention`
(same parameters and state-dict keys): cheap int8 or low-rank scores pick each query's ``attn_keep``
keys (its own included; padding keys never), optionally only those within ``attn_threshold`` logits
of the row's best, and exact attention runs on those alone. `attention_stats` sums its counters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tierec.modules.attention import AttentionStats, PrunedAttention, check_pruning
from tierec.modules.embedding import EmbeddingBag, TableConfig, build_collection
from tierec.modules.optim import SparseOptimizer


class _FFN(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.l2(F.relu(self.drop1(self.l1(x)))))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, pre_ln: bool, pruned: dict | None = None):
        super().__init__()
        self.pre_ln = pre_ln
        self.ln1, self.ln2 = nn.LayerNorm(dim, eps=1e-8), nn.LayerNorm(dim, eps=1e-8)
        if pruned is None:
            self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        else:
            self.attn = PrunedAttention(dim, heads, dropout=dropout, **pruned)
        self.ffn = _FFN(dim, dropout)

    def forward(self, x: torch.Tensor, causal: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.attn, PrunedAttention):  # causal by construction; padding keys never kept
            return self._forward_pruned(x, pad)
        if self.pre_ln:
            q = self.ln1(x)
            x = x + self.attn(q, q, q, attn_mask=causal, need_weights=False)[0]
            return x + self.ffn(self.ln2(x))
        q = self.ln1(x)
        x = q + self.attn(q, x, x, attn_mask=causal, need_weights=False)[0]
        x = self.ln2(x)
        return x + self.ffn(x)

    def _forward_pruned(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        attn = self.attn
        assert isinstance(attn, PrunedAttention)
        if self.pre_ln:
            q = self.ln1(x)
            x = x + attn(q, q, q, key_padding_mask=pad)
            return x + self.ffn(self.ln2(x))
        q = self.ln1(x)
        x = q + attn(q, x, x, key_padding_mask=pad)
        x = self.ln2(x)
        return x + self.ffn(x)


ATTENTIONS = ("full", "pruned")


class SASRec(nn.Module):
    """See the module doc. ``storage_factory`` as in `build_collection` (None: the table in memory).

    ``attention``: "full" or "pruned"; with "pruned", ``attn_keep`` keys per query, ``attn_threshold`` (None:
    off), ``attn_score`` ("int8" or "lowrank") and ``attn_rank`` (lowrank) as in `PrunedAttention`."""

    def __init__(self, num_items: int, dim: int = 50, max_len: int = 50, num_blocks: int = 2, num_heads: int = 1,
                 dropout: float = 0.5, pre_ln: bool = False, optimizer: SparseOptimizer | None = None,
                 seed: int = 0, storage_factory=None, device="cpu", *, attention: str = "full", attn_keep: int = 32,
                 attn_threshold: float | None = None, attn_score: str = "int8", attn_rank: int = 8):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not a multiple of num_heads {num_heads}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        pruned = None
        if attention == "pruned":
            check_pruning(attn_keep, attn_threshold, attn_score, attn_rank)
            pruned = dict(keep=attn_keep, threshold=attn_threshold, score=attn_score, rank=attn_rank, seed=seed)
        self.attention = attention
        self.num_items, self.dim, self.max_len = int(num_items), int(dim), int(max_len)
        optimizer = optimizer or SparseOptimizer("adam", 1e-3, beta2=0.98)
        self.embeddings = build_collection([TableConfig("item", self.num_items + 1, self.dim)], optimizer, seed,
                                           storage_factory=storage_factory, device=device)
        self.pos = nn.Embedding(self.max_len, self.dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([_Block(self.dim, num_heads, dropout, pre_ln, pruned) for _ in range(num_blocks)])
        self.last_ln = nn.LayerNorm(self.dim, eps=1e-8)
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith("embeddings."):
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / (p.shape[0] + p.shape[1])))
        self.register_buffer("_causal", torch.ones(self.max_len, self.max_len, dtype=torch.bool).triu(1),
                             persistent=False)
        self.to(device)

    @property
    def table(self) -> EmbeddingBag:
        return self.embeddings.bags[0]

    def lookup(self, *ids: torch.Tensor) -> list[torch.Tensor]:
        """Embeddings of several int64 ID tensors (0 = padding -> zeros), from ONE call of the item table:
        a bag of length 1 per distinct item, an empty bag for 0. Call once per training step (the table's
        fused optimizer updates its rows in backward)."""
        flat = torch.cat([t.reshape(-1) for t in ids])
        uniq, inverse = torch.unique(flat, return_inverse=True)  # sorted: 0 (padding) first if present
        nonzero = uniq != 0
        offsets = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=flat.device)
        offsets[1:] = torch.cumsum(nonzero.to(torch.int64), 0)
        pooled = self.table(uniq[nonzero], offsets)  # [len(uniq), D]
        rows = pooled.index_select(0, inverse)
        out, start = [], 0
        for t in ids:
            out.append(rows[start:start + t.numel()].view(*t.shape, self.dim))
            start += t.numel()
        return out

    def encode(self, inputs: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Hidden states h [B, L, D] of inputs [B, L] (left-padded) with their embeddings ``emb`` [B, L, D]."""
        L = inputs.shape[1]
        if L > self.max_len:
            raise ValueError(f"sequence length {L} > max_len {self.max_len}")
        keep = (inputs != 0).unsqueeze(-1).to(emb.dtype)
        x = emb * math.sqrt(self.dim) + self.pos.weight[self.max_len - L:].unsqueeze(0)
        x = self.drop(x) * keep
        causal: torch.Tensor = self._causal[:L, :L]  # type: ignore[index]
        if self.attention == "full":
            for block in self.blocks:
                x = block(x, causal) * keep
        else:
            pad = inputs == 0
            for block in self.blocks:
                x = block(x, causal, pad) * keep
        return self.last_ln(x)

    def attention_stats(self, reset: bool = False) -> dict | None:
        """The pruned attention's counters summed over blocks since the last reset (`AttentionStats.summary`:
        keys kept per query, FLOPs of the approximate, exact and dense full passes), or None with full
        attention. ``reset``: start counting afresh."""
        if self.attention != "pruned":
            return None
        total = AttentionStats()
        for block in self.blocks:
            attn = block.attn
            assert isinstance(attn, PrunedAttention)
            total.add(attn.reset_stats() if reset else attn.stats)
        return total.summary()

    def loss(self, inputs: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """BCE of positives (label 1) and negatives (label 0) over the non-padding positions (positives != 0)."""
        e_in, e_pos, e_neg = self.lookup(inputs, positives, negatives)
        h = self.encode(inputs, e_in)
        pos_logit, neg_logit = (h * e_pos).sum(-1), (h * e_neg).sum(-1)
        mask = positives != 0
        return (F.binary_cross_entropy_with_logits(pos_logit[mask], torch.ones_like(pos_logit[mask]))
                + F.binary_cross_entropy_with_logits(neg_logit[mask], torch.zeros_like(neg_logit[mask])))

    def score(self, inputs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Scores [B, C] of candidate items [B, C] after each history in inputs [B, L] (its last position)."""
        e_in, e_c = self.lookup(inputs, candidates)
        h = self.encode(inputs, e_in)[:, -1]  # [B, D]
        return torch.einsum("bd,bcd->bc", h, e_c)

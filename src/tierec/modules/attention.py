"""Pruned causal self-attention: cheap scores pick each query's keys, exact attention runs on those alone.

SPRINT's idea (Yazdanbakhsh et al., "Sparse Attention Acceleration with Synergistic In-Memory Pruning and
On-Chip Recomputation", MICRO 2022) in software. SPRINT scores every (query, key) pair in low precision
inside the memory, prunes the keys whose approximate score is far below the row's best, and recomputes
exact attention on the chip for the keys that survive. Here, per head, for inputs [B, L, D] (D = H * dh)::

    q, k, v = the projections of nn.MultiheadAttention (same parameters, same state-dict keys)  [B, H, L, dh]
    1. approximate scores a[i, j] for every causal pair j <= i (no gradient):
         int8:    q row-wise and k per (sequence, head) quantized to int8, integer q.k (int32 sums);
                  ranks within a row exactly as the int8 products do (the per-row scale of q does not
                  change a row's order, and k has one scale per sequence and head)
         lowrank: (q P) . (k P) with P a fixed random Gaussian projection dh -> r (scaled 1/sqrt(r), so
                  the estimate is unbiased); not trained, not saved
       computed in query chunks, a chunk [s, e) against keys [0, e) only (the causal triangle, about half
       of the L x L pairs)
    2. per query keep: its own position (always), then the top ``keep - 1`` other causal, non-padding keys
       by approximate score; with ``threshold`` t only those whose approximate logit a * dh^-0.5 is
       within t of the row's best (their softmax weight >= exp(-t) of the best key's), so t = 4 keeps
       keys of weight >= 1.8% of the top one. Chosen keys are a prefix of the sorted top-k, so the gathered
       width is trimmed to the most any query of the batch keeps.
    3. exact attention on the kept keys only, full precision, gradients through q, k, v and the
       projections: K and V rows gathered [B, H, L, w, dh] (w <= keep), s = q . k_j / sqrt(dh),
       softmax over the kept keys, dropout on the weights (as MultiheadAttention), sum of p_j v_j,
       out_proj.

With ``keep >= L`` and no threshold every causal non-padding key is kept and the result equals full
causal attention with padding keys masked (up to float summation order). Padding keys (``key_padding_mask``
True) are never chosen, except a padding query's own position (so no row is empty).

`stats` accumulates, per forward, the counts the benchmarks and training records report
(`AttentionStats`): FLOPs of the approximate pass (int8 or fp32 multiply-adds x 2), of the exact pass
(as computed: every query times the gathered width; and on the kept keys alone), of dense full
attention (QK^T and PV over L x L, what nn.MultiheadAttention computes), and the keys kept per real
(non-padding) query against the causal non-padding keys it could attend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SCORES = ("int8", "lowrank")
_INT_MIN = torch.iinfo(torch.int32).min
_INT_MAX = torch.iinfo(torch.int32).max
_CHUNK_BYTES = 16 << 20  # a query chunk's approximate scores, and its gathered K and V rows, at most
_INT_MM_MIN_LEN = 128  # below this many keys the integer products run as one float bmm (exact, see _int8_scores)


def full_attention_flops(batch: int, length: int, dim: int) -> int:
    """Multiply-add FLOPs (x 2) of dense attention over L x L: QK^T and PV, every head together (dim = H * dh)."""
    return 4 * batch * length * length * dim


@dataclass
class AttentionStats:
    """Counters summed over forwards (`PrunedAttention.stats`); `summary` gives the means and ratios."""

    forwards: int = 0
    queries: int = 0  # real (non-padding) queries x heads
    keys_kept: int = 0  # kept keys summed over real queries x heads
    keys_causal: int = 0  # causal non-padding keys summed over real queries x heads
    width: int = 0  # gathered width summed over forwards
    flops_full: int = 0  # dense attention over L x L (nn.MultiheadAttention)
    flops_approx: int = 0  # the approximate pass as computed (int8 ops for int8, fp32 for lowrank)
    flops_exact: int = 0  # the exact pass as computed (every query x gathered width)
    flops_exact_kept: int = 0  # the exact pass on the kept keys alone (a sparse kernel's work)
    precision: str = ""
    extra: dict = field(default_factory=dict)

    def add(self, other: AttentionStats) -> AttentionStats:
        for k in ("forwards", "queries", "keys_kept", "keys_causal", "width", "flops_full", "flops_approx",
                  "flops_exact", "flops_exact_kept"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.precision = self.precision or other.precision
        return self

    def summary(self) -> dict:
        """Means per real query and FLOP ratios against dense full attention."""
        full = max(self.flops_full, 1)
        return {"keys_kept_per_query": self.keys_kept / max(self.queries, 1),
                "keys_causal_per_query": self.keys_causal / max(self.queries, 1),
                "gather_width_mean": self.width / max(self.forwards, 1),
                "flops_full": self.flops_full, "flops_approx": self.flops_approx, "flops_exact": self.flops_exact,
                "flops_exact_kept": self.flops_exact_kept, "approx_precision": self.precision,
                "exact_over_full": self.flops_exact / full,
                "exact_kept_over_full": self.flops_exact_kept / full,
                "approx_over_full": self.flops_approx / full,
                "total_over_full": (self.flops_approx + self.flops_exact) / full}


def check_pruning(keep: int, threshold: float | None, score: str, rank: int) -> None:
    """ValueError (one line) for settings `PrunedAttention` refuses."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"attn_keep must be an integer >= 1 (keys kept per query, its own included), got {keep!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 <= threshold < math.inf):
        raise ValueError(f"attn_threshold must be a finite number >= 0 (logits below the row's best), got {threshold!r}")
    if score not in SCORES:
        raise ValueError(f"attn_score must be one of {', '.join(SCORES)}, got {score!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"attn_rank must be an integer >= 1, got {rank!r}")


class PrunedAttention(nn.MultiheadAttention):
    """Causal self-attention over [B, L, D] (batch first) with per-query key pruning (module doc).

    The parameters are nn.MultiheadAttention's (in_proj_weight, in_proj_bias, out_proj), so a state dict
    moves between the two. ``keep``: keys per query (its own included); ``threshold``: also drop keys whose
    approximate logit is more than this below the row's best (None: off); ``score``: "int8" or "lowrank"
    (``rank`` r of the projection); ``seed``: of the low-rank projection."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, keep: int = 32,
                 threshold: float | None = None, score: str = "int8", rank: int = 8, seed: int = 0):
        super().__init__(embed_dim, num_heads, dropout=dropout, batch_first=True)
        check_pruning(keep, threshold, score, rank)
        self.keep, self.threshold, self.score, self.rank = int(keep), threshold, score, int(rank)
        dh = embed_dim // num_heads
        g = torch.Generator().manual_seed(int(seed))
        proj = torch.randn(dh, self.rank, generator=g) / math.sqrt(self.rank) if score == "lowrank" else torch.zeros(0)
        self.register_buffer("_proj", proj, persistent=False)  # not in the state dict: same keys as full attention
        self.stats = AttentionStats(precision="int8" if score == "int8" else "fp32")

    def reset_stats(self) -> AttentionStats:
        old, self.stats = self.stats, AttentionStats(precision=self.stats.precision)
        return old

    # ------------------------------------------------------------------ 1. approximate scores
    def _int8_scores(self, qi: torch.Tensor, ki: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """int32 [N, e - s, e]: q rows s..e-1 against keys 0..e-1 (int8 [N, L, dh] each)."""
        n = qi.shape[0]
        if qi.device.type == "cpu" and e >= _INT_MM_MIN_LEN:
            out = torch.empty(n, e - s, e, dtype=torch.int32)
            for b in range(n):  # one integer GEMM per sequence and head (torch._int_mm is 2-D)
                torch._int_mm(qi[b, s:e], ki[b, :e].t(), out=out[b])
            return out
        # small L, or not a CPU: the integer products as floats (exact: |sum| <= dh * 127^2 < 2^24)
        return torch.bmm(qi[:, s:e].float(), ki[:, :e].float().transpose(1, 2)).to(torch.int32)

    @torch.no_grad()
    def _prepare(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(q', k', logit per unit [N, L, 1], approx FLOPs of the projections): the operands of the approximate
        scores, q and k [N, L, dh] -> int8 (int8) or [N, L, r] (lowrank)."""
        N, L, dh = q.shape
        if self.score == "int8":
            sq = (q.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30)  # per row
            sk = (k.abs().amax((1, 2), keepdim=True) / 127).clamp_min(1e-30)  # per sequence and head
            qa = (q / sq).round_().to(torch.int8)
            ka = (k / sk).round_().to(torch.int8)
            return qa, ka, sq * sk / math.sqrt(dh), 0
        proj: torch.Tensor = self._proj  # type: ignore[assignment]
        P = proj.to(q.dtype)
        unit = torch.full((N, L, 1), 1 / math.sqrt(dh), dtype=q.dtype, device=q.device)
        return q @ P, k @ P, unit, 2 * 2 * N * L * dh * self.rank

    @torch.no_grad()
    def _select(self, qa: torch.Tensor, ka: torch.Tensor, unit: torch.Tensor, padk: torch.Tensor | None,
                s: int, e: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(idx int64 [N, e - s, w], valid bool [N, e - s, w], approx FLOPs): the kept keys of queries s..e-1,
        each query's own position first, then the others by approximate score (prefix of the top-k)."""
        N, c, dev = qa.shape[0], e - s, qa.device
        kk = min(self.keep, e)
        lo: float
        hi: float
        if self.score == "int8":
            a = self._int8_scores(qa, ka, s, e)
            lo, hi = _INT_MIN, _INT_MAX
        else:
            a = torch.bmm(qa[:, s:e], ka[:, :e].transpose(1, 2))
            lo, hi = -math.inf, math.inf
        flops = 2 * N * c * e * qa.shape[-1]
        rows, pos = torch.arange(c, device=dev), torch.arange(s, e, device=dev)
        own = a[:, rows, pos]  # [N, c]: each query's own approximate score
        a.masked_fill_((torch.arange(e, device=dev).unsqueeze(0) > pos.unsqueeze(1)).unsqueeze(0), lo)  # future
        if padk is not None:
            a.masked_fill_(padk[:, None, :e], lo)
        a[:, rows, pos] = hi  # own position first
        top, idx = a.topk(kk, -1)  # sorted
        valid = top != lo
        if self.threshold is not None and kk > 1:
            others = top[..., 1:].to(unit.dtype)
            mine = own.to(unit.dtype).unsqueeze(-1)
            best = torch.where(valid[..., 1:2], torch.maximum(others[..., :1], mine), mine)  # the row's best
            valid[..., 1:] &= (best - others) * unit[:, s:e] <= self.threshold  # logits below the best
        w = int(valid.sum(-1).max())
        return idx[..., :w], valid[..., :w], flops

    def _rows_per_chunk(self, N: int, L: int, dh: int) -> int:
        kk = min(self.keep, L)
        per_row = N * max(L * 4, kk * dh * 4 * 2)  # approximate scores (int32) / gathered K and V rows (float)
        return max(1, min(L, _CHUNK_BYTES // per_row))

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B * H, L, dh] from [B, L, D] inputs (nn.MultiheadAttention's in-projection)."""
        B, L, D = query.shape
        H = self.num_heads
        if query is key and key is value:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
        else:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
            b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        return tuple(t.reshape(B, L, H, D // H).transpose(1, 2).reshape(B * H, L, D // H)  # type: ignore[return-value]
                     for t in (q, k, v))

    @torch.no_grad()
    def kept_keys(self, query: torch.Tensor, key: torch.Tensor, key_padding_mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx int64 [B, H, L, w], valid bool [B, H, L, w]): the key positions each query would attend
        (``idx[..., j]`` counts where ``valid[..., j]``; its own position first), for inspection and tests."""
        B, L, _ = query.shape
        q, k, _v = self._project(query, key, key)
        padk = None if key_padding_mask is None else key_padding_mask.repeat_interleave(self.num_heads, 0)
        qa, ka, unit, _ = self._prepare(q, k)
        idx, valid, _ = self._select(qa, ka, unit, padk, 0, L)
        return idx.view(B, self.num_heads, L, -1), valid.view(B, self.num_heads, L, -1)

    # ------------------------------------------------------------------ 2./3. exact attention on kept keys
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # type: ignore[override]
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query, key, value [B, L, D] -> [B, L, D], causal; key_padding_mask bool [B, L] (True: padding).

        Queries run in chunks of rows (each chunk's approximate scores and gathered keys stay under
        `_CHUNK_BYTES`, so no temporary is big enough for a fresh memory mapping of its own)."""
        B, L, D = query.shape
        H = self.num_heads
        dh, N = D // H, B * H
        q, k, v = self._project(query, key, value)  # [N, L, dh]
        padk = None if key_padding_mask is None else key_padding_mask.repeat_interleave(H, 0)  # [N, L]
        qa, ka, unit, flops_approx = self._prepare(q.detach(), k.detach())
        kflat, vflat = k.reshape(N * L, dh), v.reshape(N * L, dh)
        base = (torch.arange(N, device=q.device) * L).view(N, 1, 1)
        scale = 1.0 / math.sqrt(dh)
        outs, kept, widths = [], [], []
        c = self._rows_per_chunk(N, L, dh)
        for s in range(0, L, c):
            e = min(L, s + c)
            idx, valid, f = self._select(qa, ka, unit, padk, s, e)
            flops_approx += f
            w = idx.shape[-1]
            flat = (idx + base).reshape(-1)
            kg = kflat.index_select(0, flat).view(N, e - s, w, dh)
            vg = vflat.index_select(0, flat).view(N, e - s, w, dh)
            sc = torch.einsum("ncwd,ncd->ncw", kg, q[:, s:e]) * scale
            p = torch.softmax(sc.masked_fill(~valid, -math.inf), -1)
            p = F.dropout(p, self.dropout, self.training)
            outs.append(torch.einsum("ncw,ncwd->ncd", p, vg))
            kept.append(valid.sum(-1))
            widths.append(w * (e - s))
        o = outs[0] if len(outs) == 1 else torch.cat(outs, 1)  # [N, L, dh]
        out = self.out_proj(o.view(B, H, L, dh).transpose(1, 2).reshape(B, L, D))
        self._count(torch.cat(kept, 1).view(B, H, L), key_padding_mask, flops_approx, sum(widths), B, L, D)
        return out

    @torch.no_grad()
    def _count(self, kept: torch.Tensor, pad: torch.Tensor | None, flops_approx: int, width_rows: int,
               B: int, L: int, D: int) -> None:
        """Adds one forward to `stats`: kept [B, H, L] keys per query; width_rows: gathered width x rows."""
        H = self.num_heads
        real = torch.ones(B, L, dtype=torch.bool, device=kept.device) if pad is None else ~pad
        causal = real.to(torch.int64).cumsum(-1)  # non-padding keys j <= i
        st = self.stats
        st.forwards += 1
        st.queries += int(real.sum()) * H
        st.keys_kept += int((kept * real.unsqueeze(1)).sum())
        st.keys_causal += int((causal * real).sum()) * H
        st.width += width_rows // L
        st.flops_full += full_attention_flops(B, L, D)
        st.flops_approx += flops_approx
        st.flops_exact += 4 * B * width_rows * D
        st.flops_exact_kept += 4 * int(kept.sum()) * (D // H)

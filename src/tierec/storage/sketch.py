"""A small vectorised count-min sketch for row-access frequencies.

Used by the ``"freq"`` cache policy when counting every distinct ID exactly
would cost memory proportional to the table: the sketch has a fixed size
(``depth x width`` int64 counters) whatever the number of IDs. ``query`` never
under-estimates a count; it over-estimates by at most ``e * N / width`` with
probability ``1 - exp(-depth)`` (N = total count inserted).

Hashing: for each of the ``depth`` rows, ``h(x) = ((a1*lo + a2*hi + b) mod p) mod
width`` with ``lo``/``hi`` the low and high 30 bits of the ID, ``a1, a2 < 2^31``
and ``p = 2^61 - 1``: every intermediate stays below 2^63, so int64 tensor
arithmetic never overflows. IDs are taken modulo 2^60. When ``width`` is a power
of two ``2^k`` the sketch uses multiply-shift instead, ``h(x) = ((a*x + b) mod 2^64)
>> (64 - k)`` with ``a`` odd (Dietzfelbinger et al.): two collide with probability
at most ``2 / width``, so the bound above doubles, and there is no int64 division
(a third of the cost of a query of a few thousand IDs).
"""

from __future__ import annotations

import numpy as np
import torch

_P = (1 << 61) - 1
_MASK30 = (1 << 30) - 1


class CountMinSketch:
    """``depth x width`` counters; ``update(ids[, counts])`` and ``query(ids)`` are one tensor op each."""

    def __init__(self, width: int = 1 << 20, depth: int = 4, seed: int = 0, device="cpu",
                 table: torch.Tensor | None = None):
        if width <= 0 or depth <= 0:
            raise ValueError(f"CountMinSketch needs width > 0 and depth > 0, got {width}x{depth}")
        self.width, self.depth = int(width), int(depth)
        rng = np.random.default_rng(seed)
        coef = rng.integers(1, 1 << 31, size=(3, depth), dtype=np.int64)
        self._a1, self._a2, self._b = (torch.from_numpy(c.copy()).to(device).unsqueeze(1) for c in coef)
        # ``table``: depth * width zeroed int64 counters to use (e.g. spilled to a file: `tierec.storage.spill`)
        self.table = torch.zeros(depth, width, dtype=torch.int64, device=device) if table is None \
            else table.view(depth, width)
        self._row_base = (torch.arange(depth, device=device) * width).unsqueeze(1)
        self._shift = 64 - (width.bit_length() - 1) if width & (width - 1) == 0 and width > 1 else 0
        if self._shift:  # multiply-shift: a odd, both 64-bit (as int64: the products wrap mod 2^64)
            ab = rng.integers(-(1 << 63), (1 << 63) - 1, size=(2, depth), dtype=np.int64, endpoint=True)
            ab[0] |= 1
            self._ms_a, self._ms_b = (torch.from_numpy(c.copy()).to(device).unsqueeze(1) for c in ab)
        self.total = 0

    def _flat_buckets(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.table.device, torch.int64).reshape(-1)
        if self._shift:  # the top k bits of a*x + b (arithmetic shift, so mask the sign copies off)
            return (((self._ms_a * ids + self._ms_b) >> self._shift) & (self.width - 1)) + self._row_base
        lo = (ids & _MASK30).unsqueeze(0)
        hi = ((ids >> 30) & _MASK30).unsqueeze(0)
        h = (self._a1 * lo + self._a2 * hi + self._b) % _P  # [depth, N], all < 2^63
        return h % self.width + self._row_base

    def update(self, ids: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Add ``counts`` (default 1 each) to every ID of ``ids`` (repeats allowed)."""
        if ids.numel() == 0:
            return
        flat = self._flat_buckets(ids)
        if counts is None:
            counts = torch.ones(ids.numel(), dtype=torch.int64, device=self.table.device)
        counts = counts.to(self.table.device, torch.int64).reshape(1, -1).expand(self.depth, -1)
        self.table.view(-1).index_add_(0, flat.reshape(-1), counts.reshape(-1))
        self.total += int(counts[0].sum())

    def query(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated count of every ID, int64 [N] (>= its true count)."""
        if ids.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.table.device)
        flat = self._flat_buckets(ids)
        return self.table.view(-1)[flat].min(0).values

    def halve(self, chunks=None) -> None:
        """Decay: every counter halves (rounded down), so old counts fade. ``chunks``: (start, end) ranges
        covering the flat counters, halved one range at a time (a pass that bounds its memory)."""
        if chunks is None:
            self.table >>= 1
            self.total = int(self.table[0].sum())
            return
        flat, total = self.table.view(-1), 0
        for a, b in chunks:
            flat[a:b] >>= 1
            if a < self.width:
                total += int(flat[a:min(b, self.width)].sum())
        self.total = total

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    @staticmethod
    def bytes_for(width: int, depth: int) -> int:
        """Bytes of the counters of a ``depth`` x ``width`` sketch (int64)."""
        return 8 * int(width) * int(depth)

    def __repr__(self) -> str:
        return f"CountMinSketch(width={self.width}, depth={self.depth}, total={self.total})"

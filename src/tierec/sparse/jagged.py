"""Keyed jagged tensors with TorchRec's layout conventions.

A batch of B samples with sparse features ``keys = [k_0, ..., k_{T-1}]`` is

- ``values``:  int64 [N], all IDs, key-major: every ID of key 0 for samples 0..B-1,
  then every ID of key 1, and so on;
- ``lengths``: int64 [T * B], number of IDs of sample b for key t at ``t * B + b``;
- ``offsets``: int64 [T * B + 1], exclusive prefix sum of ``lengths``;
- ``weights``: optional float32 [N], per-ID weights (weighted bags).

This is the layout of ``torchrec.sparse.jagged_tensor.KeyedJaggedTensor``; use
:meth:`KeyedJaggedTensor.to_torchrec` to hand a batch to TorchRec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """[n] lengths -> [n + 1] offsets (int64, leading 0)."""
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=out[1:])
    return out


@dataclass
class JaggedTensor:
    """One key's slice of a batch: ``values`` [N] and ``lengths`` [B]."""

    values: torch.Tensor
    lengths: torch.Tensor
    weights: torch.Tensor | None = None

    def offsets(self) -> torch.Tensor:
        return lengths_to_offsets(self.lengths)

    def to_dense(self) -> list[torch.Tensor]:
        """Per-sample ID lists (for tests and debugging, not hot paths)."""
        return list(torch.split(self.values, self.lengths.tolist()))


class KeyedJaggedTensor:
    """A batch of multi-hot sparse features for several keys (see module doc)."""

    __slots__ = ("_keys", "_values", "_lengths", "_weights", "_stride", "_offsets", "_length_per_key")

    def __init__(
        self,
        keys: Sequence[str],
        values: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None = None,
        stride: int | None = None,
    ):
        keys = list(keys)
        if lengths.dim() != 1:
            raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
        if stride is None:
            if not keys:
                raise ValueError("stride is required when there are no keys")
            if lengths.numel() % len(keys):
                raise ValueError(f"{lengths.numel()} lengths do not split evenly over {len(keys)} keys")
            stride = lengths.numel() // len(keys)
        if lengths.numel() != stride * len(keys):
            raise ValueError(f"expected {stride * len(keys)} lengths (keys x stride), got {lengths.numel()}")
        if weights is not None and weights.numel() != values.numel():
            raise ValueError("weights must have one entry per value")
        self._keys = keys
        self._values = values
        self._lengths = lengths.to(torch.int64)
        self._weights = weights
        self._stride = int(stride)
        self._offsets: torch.Tensor | None = None
        self._length_per_key: list[int] | None = None

    # --- TorchRec-style accessors -------------------------------------------------
    @staticmethod
    def from_lengths_sync(keys, values, lengths, weights=None, stride=None) -> "KeyedJaggedTensor":
        return KeyedJaggedTensor(keys, values, lengths, weights, stride)

    def keys(self) -> list[str]:
        return self._keys

    def values(self) -> torch.Tensor:
        return self._values

    def lengths(self) -> torch.Tensor:
        return self._lengths

    def weights_or_none(self) -> torch.Tensor | None:
        return self._weights

    def stride(self) -> int:
        return self._stride

    def offsets(self) -> torch.Tensor:
        if self._offsets is None:
            self._offsets = lengths_to_offsets(self._lengths)
        return self._offsets

    def length_per_key(self) -> list[int]:
        """Number of values of each key (one host sync, cached)."""
        if self._length_per_key is None:
            self._length_per_key = self._lengths.view(len(self._keys), self._stride).sum(1).tolist()
        return self._length_per_key

    def offset_per_key(self) -> list[int]:
        out = [0]
        for n in self.length_per_key():
            out.append(out[-1] + n)
        return out

    def __getitem__(self, key: str) -> JaggedTensor:
        t = self._keys.index(key)
        start, end = self.offset_per_key()[t], self.offset_per_key()[t + 1]
        w = self._weights[start:end] if self._weights is not None else None
        return JaggedTensor(self._values[start:end], self._lengths[t * self._stride : (t + 1) * self._stride], w)

    def split_by_key(self) -> list[JaggedTensor]:
        """One JaggedTensor per key, in key order (views, no copies)."""
        lpk = self.length_per_key()
        vals = torch.split(self._values, lpk)
        lens = torch.split(self._lengths, self._stride)
        ws = torch.split(self._weights, lpk) if self._weights is not None else [None] * len(lpk)
        return [JaggedTensor(v, l, w) for v, l, w in zip(vals, lens, ws)]

    def to_dict(self) -> dict[str, JaggedTensor]:
        return dict(zip(self._keys, self.split_by_key()))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "KeyedJaggedTensor":
        w = self._weights.to(device, non_blocking=non_blocking) if self._weights is not None else None
        out = KeyedJaggedTensor(
            self._keys,
            self._values.to(device, non_blocking=non_blocking),
            self._lengths.to(device, non_blocking=non_blocking),
            w,
            self._stride,
        )
        out._length_per_key = self._length_per_key
        return out

    def pin_memory(self) -> "KeyedJaggedTensor":
        w = self._weights.pin_memory() if self._weights is not None else None
        out = KeyedJaggedTensor(self._keys, self._values.pin_memory(), self._lengths.pin_memory(), w, self._stride)
        out._length_per_key = self._length_per_key
        return out

    def to_torchrec(self):
        """The same batch as a ``torchrec`` KeyedJaggedTensor (needs torchrec installed)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor as TRKJT

        return TRKJT(keys=self._keys, values=self._values, lengths=self._lengths, weights=self._weights)

    def __repr__(self) -> str:
        return (
            f"KeyedJaggedTensor(keys={self._keys}, stride={self._stride}, "
            f"values={self._values.numel()}, weighted={self._weights is not None})"
        )

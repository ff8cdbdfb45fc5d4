"""Keyed jagged tensors with TorchRec's layout conventions.

A batch of B samples with sparse features ``keys = [k_0, ..., k_{T-1}]`` is

- ``values``:  int64 [N], all IDs, key-major: every ID of key 0 for samples 0..B-1,
  then every ID of key 1, and so on;
- ``lengths``: int64 [T * B], number of IDs of sample b for key t at ``t * B + b``;
- ``offsets``: int64 [T * B + 1], exclusive prefix sum of ``lengths``;
- ``weights``: optional float32 [N], per-ID weights (weighted bags).

This is the layout of ``torchrec.sparse.jagged_tensor.KeyedJaggedTensor``; use
:meth:`KeyedJaggedTensor.to_torchrec` to hand a batch to TorchRec.

**Inverse keyed jagged tensors** (deduplicated features, TorchRec's ``inverse_indices``
convention): a KJT of stride U holds U unique rows per key and
``inverse_indices = (keys, inverse)`` with ``inverse`` int64 [B] (one map shared by
all keys) or [T, B] (one per key): sample b's lists are row ``inverse[b]`` (or
``inverse[t, b]``). :meth:`KeyedJaggedTensor.expand` gives back the plain batch of
stride B; :func:`dedup_kjt` builds one from a plain batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
    _offsets: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def offsets(self) -> torch.Tensor:
        """int64 [B + 1] (computed once)."""
        if self._offsets is None:
            self._offsets = lengths_to_offsets(self.lengths)
        return self._offsets

    def to_dense(self) -> list[torch.Tensor]:
        """Per-sample ID lists (for tests and debugging, not hot paths)."""
        return list(torch.split(self.values, self.lengths.tolist()))


class KeyedJaggedTensor:
    """A batch of multi-hot sparse features for several keys (see module doc)."""

    __slots__ = ("_keys", "_values", "_lengths", "_weights", "_stride", "_offsets", "_length_per_key", "_inverse",
                 "_by_key")

    def __init__(
        self,
        keys: Sequence[str],
        values: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None = None,
        stride: int | None = None,
        inverse_indices: tuple[list[str], torch.Tensor] | None = None,
        validate: bool = True,
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
        self._by_key: list[JaggedTensor] | None = None  # split_by_key's, kept (a KJT is not changed after it is made)
        self._inverse = inverse_indices
        if inverse_indices is not None and validate:
            self._check_inverse(inverse_indices)

    def _check_inverse(self, inverse: tuple[list[str], torch.Tensor]) -> None:
        ikeys, inv = inverse
        if list(ikeys) != self._keys:
            raise ValueError(f"inverse_indices keys {list(ikeys)} differ from the KJT's keys {self._keys}")
        if inv.dtype != torch.int64 or inv.dim() not in (1, 2) or (inv.dim() == 2 and inv.shape[0] != len(self._keys)):
            raise ValueError(f"inverse_indices must be int64 [B] or [{len(self._keys)}, B], "
                             f"got {inv.dtype} {tuple(inv.shape)}")
        if inv.numel() and (int(inv.min()) < 0 or int(inv.max()) >= self._stride):
            raise ValueError(f"inverse_indices out of range [0, {self._stride}): "
                             f"min {int(inv.min())}, max {int(inv.max())}")

    # --- TorchRec-style accessors -------------------------------------------------
    @staticmethod
    def from_lengths_sync(keys, values, lengths, weights=None, stride=None,
                          inverse_indices=None) -> KeyedJaggedTensor:
        return KeyedJaggedTensor(keys, values, lengths, weights, stride, inverse_indices)

    def inverse_indices(self) -> tuple[list[str], torch.Tensor]:
        if self._inverse is None:
            raise ValueError("this KeyedJaggedTensor has no inverse_indices (it is not deduplicated)")
        return self._inverse

    def inverse_indices_or_none(self) -> tuple[list[str], torch.Tensor] | None:
        return self._inverse

    def batch_size(self) -> int:
        """B: samples of the batch (the stride, or the inverse's length when deduplicated)."""
        return self._stride if self._inverse is None else int(self._inverse[1].shape[-1])

    def inverse_per_key(self) -> torch.Tensor:
        """int64 [T, B]: the inverse of every key (a broadcast view of a shared [B] map)."""
        inv = self.inverse_indices()[1]
        return inv.expand(len(self._keys), -1) if inv.dim() == 1 else inv

    def expand(self) -> KeyedJaggedTensor:
        """The plain KJT of stride B (sample b of key t = unique row ``inverse[t, b]``); no-op if not deduplicated."""
        if self._inverse is None:
            return self
        inv = self.inverse_per_key()
        t_of = torch.arange(len(self._keys), device=inv.device).unsqueeze(1)
        rows = (t_of * self._stride + inv).reshape(-1)  # [T * B] positions in lengths
        values, lengths = jagged_index_select(self._values, self.offsets(), rows)
        w = None
        if self._weights is not None:
            w, _ = jagged_index_select(self._weights, self.offsets(), rows)
        return KeyedJaggedTensor(self._keys, values, lengths, w, inv.shape[1])

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
        """One JaggedTensor per key, in key order (views, no copies; made once, with their offsets when asked)."""
        if self._by_key is None:
            lpk = self.length_per_key()
            vals = torch.split(self._values, lpk)
            lens = torch.split(self._lengths, self._stride)
            ws = torch.split(self._weights, lpk) if self._weights is not None else [None] * len(lpk)
            self._by_key = [JaggedTensor(v, n, w) for v, n, w in zip(vals, lens, ws, strict=True)]
        return list(self._by_key)

    def to_dict(self) -> dict[str, JaggedTensor]:
        return dict(zip(self._keys, self.split_by_key(), strict=True))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> KeyedJaggedTensor:
        """This KJT on ``device``: itself where it is there already (what it computed kept)."""
        if self._values.device == torch.device(device):
            return self
        w = self._weights.to(device, non_blocking=non_blocking) if self._weights is not None else None
        inv = None
        if self._inverse is not None:
            inv = (self._inverse[0], self._inverse[1].to(device, non_blocking=non_blocking))
        out = KeyedJaggedTensor(
            self._keys,
            self._values.to(device, non_blocking=non_blocking),
            self._lengths.to(device, non_blocking=non_blocking),
            w,
            self._stride,
            inv,
            validate=False,
        )
        out._length_per_key = self._length_per_key
        return out

    def pin_memory(self) -> KeyedJaggedTensor:
        w = self._weights.pin_memory() if self._weights is not None else None
        inv = (self._inverse[0], self._inverse[1].pin_memory()) if self._inverse is not None else None
        out = KeyedJaggedTensor(self._keys, self._values.pin_memory(), self._lengths.pin_memory(), w, self._stride,
                                inv, validate=False)
        out._length_per_key = self._length_per_key
        return out

    def to_torchrec(self):
        """The same batch as a ``torchrec`` KeyedJaggedTensor (needs torchrec installed)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor as TRKJT

        if self._inverse is not None:  # TorchRec's variable-batch form: stride U per key, inverse [T, B]
            return TRKJT(keys=self._keys, values=self._values, lengths=self._lengths, weights=self._weights,
                         stride_per_key_per_rank=[[self._stride]] * len(self._keys),
                         inverse_indices=(self._keys, self.inverse_per_key().contiguous()))
        return TRKJT(keys=self._keys, values=self._values, lengths=self._lengths, weights=self._weights)

    def __repr__(self) -> str:
        inv = f", batch_size={self.batch_size()} (deduplicated)" if self._inverse is not None else ""
        return (
            f"KeyedJaggedTensor(keys={self._keys}, stride={self._stride}{inv}, "
            f"values={self._values.numel()}, weighted={self._weights is not None})"
        )


def jagged_index_select(values: torch.Tensor, offsets: torch.Tensor, idx: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists ``idx`` [k] of a jagged tensor (values [N], offsets [n + 1]) -> (values [N'], lengths [k])."""
    lengths = offsets[idx + 1] - offsets[idx]
    out_off = lengths_to_offsets(lengths)
    total = int(out_off[-1])
    pos = torch.repeat_interleave(offsets[idx] - out_off[:-1], lengths, output_size=total)
    pos += torch.arange(total, device=values.device)
    return values.index_select(0, pos), lengths


def dedup_kjt(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The inverse KJT of a plain one: samples equal in every key share one row (first-occurrence order).

    Exact (see `tierec.sparse.dedup.dedup_rows`); runs on the host. Weighted KJTs are not deduplicated.
    """
    from tierec.sparse.dedup import dedup_rows

    if kjt.inverse_indices_or_none() is not None:
        return kjt
    if kjt.weights_or_none() is not None:
        raise ValueError("dedup_kjt: weighted KJTs are not supported")
    b = kjt.stride()
    feats = [(jt.values.cpu().numpy(), jt.offsets().cpu().numpy()) for jt in kjt.split_by_key()]
    rep, inv = dedup_rows(feats, b)
    dev = kjt.values().device
    rep_t = torch.from_numpy(rep).to(dev)
    rows = (torch.arange(len(kjt.keys()), device=dev).unsqueeze(1) * b + rep_t).reshape(-1)
    values, lengths = jagged_index_select(kjt.values(), kjt.offsets(), rows)
    return KeyedJaggedTensor(kjt.keys(), values, lengths, stride=rep.size,
                             inverse_indices=(kjt.keys(), torch.from_numpy(inv).to(dev)))

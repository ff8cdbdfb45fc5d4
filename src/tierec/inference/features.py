"""Request samples (feature name -> values, as JSON) -> model inputs, validated field by field.

A sample is a JSON object. Dense features take a number (missing: 0.0). Sparse features take
an ID or a list of IDs (missing or ``[]``: an empty bag). An ID is

- an integer in ``[0, num_embeddings)``: used as the row, as the data set stores it;
- any other integer (negative, too large): hashed with `hash_ints` into the table;
- a string: hashed with `hash_strings`, as `tierec data convert` hashes Criteo's values.

Anything else -- an unknown feature name, a wrong type, more than ``max_ids`` IDs in one
list, a non-finite number -- raises `InputError` naming the field, e.g. ``samples[3].C7[2]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from tierec.data.dataset import Schema
from tierec.data.hashing import hash_ints, hash_strings
from tierec.sparse import KeyedJaggedTensor

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


class InputError(ValueError):
    """Bad request input; ``field`` names where (``samples[0].C1``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass
class Encoded:
    """B encoded samples: dense float32 [B, n_dense]; per sparse key (rows int64 [N_k], lengths int64 [B])."""

    dense: np.ndarray
    sparse: dict[str, tuple[np.ndarray, np.ndarray]]

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    @staticmethod
    def concat(parts: list["Encoded"]) -> "Encoded":
        if len(parts) == 1:
            return parts[0]
        keys = parts[0].sparse.keys()
        return Encoded(np.concatenate([p.dense for p in parts]),
                       {k: (np.concatenate([p.sparse[k][0] for p in parts]),
                            np.concatenate([p.sparse[k][1] for p in parts])) for k in keys})

    def take(self, keys: list[str], repeat: int = 1) -> "Encoded":
        """Only ``keys`` (each sample repeated ``repeat`` times: one user against many items)."""
        sp = {}
        for k in keys:
            v, n = self.sparse[k]
            sp[k] = (np.tile(v, repeat), np.tile(n, repeat))
        return Encoded(np.tile(self.dense, (repeat, 1)), sp)

    def to_inputs(self, keys: list[str]) -> tuple[torch.Tensor, KeyedJaggedTensor]:
        """(dense [B, n_dense], KJT over ``keys``) as the models take them."""
        values = np.concatenate([self.sparse[k][0] for k in keys]) if keys else np.zeros(0, np.int64)
        lengths = np.concatenate([self.sparse[k][1] for k in keys]) if keys else np.zeros(0, np.int64)
        kjt = KeyedJaggedTensor(keys, torch.from_numpy(values), torch.from_numpy(lengths), stride=len(self))
        return torch.from_numpy(self.dense), kjt


def _bad_type(v) -> str:
    return "null" if v is None else type(v).__name__


class FeatureEncoder:
    """Validates and encodes samples for one schema. ``max_ids``: most IDs in one sparse list."""

    def __init__(self, schema: Schema, max_ids: int = 256):
        self.schema, self.max_ids = schema, int(max_ids)
        self.dense_index = {n: i for i, n in enumerate(schema.dense)}
        self.sizes = {f.name: f.num_embeddings for f in schema.sparse}

    def encode(self, samples: list, where: str = "samples", allowed: set[str] | None = None) -> Encoded:
        """JSON samples -> `Encoded`. ``allowed`` restricts which feature names may appear."""
        B = len(samples)
        dense = np.zeros((B, len(self.schema.dense)), np.float32)
        ids: dict[str, list] = {k: [] for k in self.sizes}
        lengths = {k: np.zeros(B, np.int64) for k in self.sizes}
        for i, s in enumerate(samples):
            at = f"{where}[{i}]" if where.endswith("samples") else where
            if not isinstance(s, dict):
                raise InputError(at, f"a sample must be an object of feature name -> values, got {_bad_type(s)}")
            for name, v in s.items():
                f = f"{at}.{name}"
                if (allowed is not None and name not in allowed) or (
                        name not in self.sizes and name not in self.dense_index):
                    known = sorted(allowed) if allowed is not None else [*self.schema.dense, *self.sizes]
                    raise InputError(f, f"unknown feature (known: {', '.join(known)})")
                if name in self.dense_index:
                    if isinstance(v, bool) or not isinstance(v, (int, float)):
                        raise InputError(f, f"dense feature takes a number, got {_bad_type(v)}")
                    if not math.isfinite(v):
                        raise InputError(f, "dense feature must be a finite number")
                    dense[i, self.dense_index[name]] = v
                    continue
                vals = v if isinstance(v, list) else [v]
                if len(vals) > self.max_ids:
                    raise InputError(f, f"{len(vals)} IDs, at most {self.max_ids} per feature")
                for j, x in enumerate(vals):
                    if isinstance(x, bool) or not isinstance(x, (int, str)):
                        raise InputError(f"{f}[{j}]" if isinstance(v, list) else f,
                                         f"an ID is an integer or a string, got {_bad_type(x)}")
                    if isinstance(x, int) and not _I64_MIN <= x <= _I64_MAX:
                        raise InputError(f"{f}[{j}]" if isinstance(v, list) else f, "integer ID outside int64")
                ids[name].extend(vals)
                lengths[name][i] = len(vals)
        return Encoded(dense, {k: (self._rows(k, ids[k]), lengths[k]) for k in self.sizes})

    def _rows(self, name: str, vals: list) -> np.ndarray:
        """Raw IDs (ints and strings) -> rows in [0, num_embeddings), vectorised per kind."""
        n = self.sizes[name]
        out = np.zeros(len(vals), np.int64)
        if not vals:
            return out
        is_str = np.fromiter((isinstance(x, str) for x in vals), bool, len(vals))
        if is_str.any():
            si = np.flatnonzero(is_str)
            out[si] = hash_strings(pa.array([vals[k] for k in si], pa.string()), n)
        ii = np.flatnonzero(~is_str)
        if ii.size:
            raw = np.array([vals[k] for k in ii], dtype=np.int64)
            inside = (raw >= 0) & (raw < n)
            out[ii] = np.where(inside, raw, hash_ints(raw, n))
        return out

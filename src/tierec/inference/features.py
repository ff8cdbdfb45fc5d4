"""Request samples (feature name -> values, as JSON) -> model inputs, validated field by field.

A sample is a JSON object of raw values, as the input file the data set was converted from
holds them. They are encoded exactly as `tierec data convert` encoded that file, by what the
checkpoint's schema records (`tierec.data.hashing.encode_request_ids`, `transform_dense`):

- a dense feature takes a number (missing: 0.0) and gets the data set's transform
  (``log1p``: log(1 + max(x, 0)), as Criteo's integer features; ``none``: as given);
- a sparse feature takes an ID or a list of IDs (missing or ``[]``: an empty bag), encoded as
  its data set encoded it: ``hash-string`` hashes the ID's text (an integer as its decimal
  text, as the file held it), ``hash-int`` hashes an integer (or a decimal string),
  ``identity`` takes the integer as the row and refuses one outside the table. The empty
  string is a missing value, dropped from the bag as training drops empty fields.

A checkpoint from before encodings were recorded is served by the old rule (with a warning at
start): an integer in ``[0, num_embeddings)`` is the row, other integers are hashed with
`hash_ints`, strings with `hash_strings`, dense values are taken as stored.

Anything else -- an unknown feature name, a wrong type, more than ``max_ids`` IDs in one
list, a string that is not valid Unicode (a lone surrogate) or longer than ``max_id_bytes``
UTF-8 bytes, an ID its encoding cannot take, a dense value that is not a finite float32 --
raises `InputError` naming the field, e.g. ``samples[3].C7[2]``. Every row the encoder produces
is checked to lie in ``[0, num_embeddings)`` before the samples may join a batch: a bad sample
fails alone. A feature whose data set holds raw IDs (``SparseFeature.raw``) gets raw IDs, as the
converter wrote them (any int64; the model's table reduces or maps them), not checked against a range.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from tierec.data.dataset import Schema
from tierec.data.hashing import encode_request_ids, transform_dense
from tierec.sparse import KeyedJaggedTensor

log = logging.getLogger(__name__)

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_F32_MAX = float(np.finfo(np.float32).max)


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
    def concat(parts: list[Encoded]) -> Encoded:
        if len(parts) == 1:
            return parts[0]
        keys = parts[0].sparse.keys()
        return Encoded(np.concatenate([p.dense for p in parts]),
                       {k: (np.concatenate([p.sparse[k][0] for p in parts]),
                            np.concatenate([p.sparse[k][1] for p in parts])) for k in keys})

    def take(self, keys: list[str], repeat: int = 1) -> Encoded:
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


def _dense_value(field: str, v) -> float:
    """A JSON number -> float (within float32's range), or `InputError` (not a number, NaN/inf, beyond
    float32's range). Kept in float64 until the data set's transform, as the converter does."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(field, f"dense feature takes a number, got {_bad_type(v)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise InputError(field, "dense feature must be a finite number")
    try:
        with np.errstate(over="ignore"):
            x = np.float32(float(v))  # float() of a 400-digit integer overflows
    except OverflowError:
        x = np.float32(np.inf)
    if not np.isfinite(x):
        raise InputError(field, f"out of float32 range (magnitude at most {_F32_MAX:.6g})")
    return float(v)


def _at(where: str, i: int) -> str:
    return f"{where}[{i}]" if where.endswith("samples") else where


class FeatureEncoder:
    """Validates and encodes samples for one schema. ``max_ids``: most IDs in one sparse list;
    ``max_id_bytes``: longest string ID (UTF-8 bytes)."""

    def __init__(self, schema: Schema, max_ids: int = 256, max_id_bytes: int = 256):
        self.schema, self.max_ids, self.max_id_bytes = schema, int(max_ids), int(max_id_bytes)
        self.dense_index = {n: i for i, n in enumerate(schema.dense)}
        self.sizes = {f.name: f.num_embeddings for f in schema.sparse}
        self.encodings = {f.name: f.encoding for f in schema.sparse}
        self.raw = {f.name: f.raw for f in schema.sparse}
        legacy = [k for k, e in self.encodings.items() if e is None]
        if legacy or (schema.dense and schema.dense_transform is None):
            log.warning("the checkpoint's data set predates recorded ID encodings (%s): integer IDs inside a table "
                        "are taken as rows, others hashed, dense values as stored; re-convert the data and retrain "
                        "for exactly the training encoding", ", ".join(legacy[:4]) or "dense transform")

    def encode(self, samples: list, where: str = "samples", allowed: set[str] | None = None) -> Encoded:
        """JSON samples -> `Encoded`. ``allowed`` restricts which feature names may appear."""
        B = len(samples)
        dense = np.zeros((B, len(self.schema.dense)), np.float64)
        ids: dict[str, list] = {k: [] for k in self.sizes}
        lengths = {k: np.zeros(B, np.int64) for k in self.sizes}
        for i, s in enumerate(samples):
            at = _at(where, i)
            if not isinstance(s, dict):
                raise InputError(at, f"a sample must be an object of feature name -> values, got {_bad_type(s)}")
            for name, v in s.items():
                f = f"{at}.{name}"
                if (allowed is not None and name not in allowed) or (
                        name not in self.sizes and name not in self.dense_index):
                    known = sorted(allowed) if allowed is not None else [*self.schema.dense, *self.sizes]
                    raise InputError(f, f"unknown feature (known: {', '.join(known)})")
                if name in self.dense_index:
                    dense[i, self.dense_index[name]] = _dense_value(f, v)
                    continue
                vals = v if isinstance(v, list) else [v]
                if len(vals) > self.max_ids:
                    raise InputError(f, f"{len(vals)} IDs, at most {self.max_ids} per feature")
                for j, x in enumerate(vals):
                    self._check_id(f"{f}[{j}]" if isinstance(v, list) else f, x)
                kept = [x for x in vals if x != ""]  # "" is a missing value: an empty bag, as in training
                ids[name].extend(kept)
                lengths[name][i] = len(kept)
        sparse = {}
        for k, n in self.sizes.items():
            rows, refused = self._rows(k, ids[k])
            bad = np.flatnonzero(refused if self.raw[k] else refused | (rows < 0) | (rows >= n))
            if bad.size:  # whatever the cause, it fails this request here, never the batch it would join
                i = int(np.searchsorted(np.cumsum(lengths[k]), bad[0], side="right"))
                why = (self._refusal(k, ids[k][bad[0]]) if refused[bad[0]]
                       else f"an ID encodes to row {rows[bad[0]]}, outside [0, {n})")
                raise InputError(f"{_at(where, i)}.{k}", why)
            sparse[k] = (rows, lengths[k])
        return Encoded(transform_dense(dense, self.schema.dense_transform), sparse)

    def _check_id(self, field: str, x) -> None:
        if isinstance(x, bool) or not isinstance(x, (int, str)):
            raise InputError(field, f"an ID is an integer or a string, got {_bad_type(x)}")
        if isinstance(x, int):
            if not _I64_MIN <= x <= _I64_MAX:
                raise InputError(field, "integer ID outside int64")
            return
        try:
            size = len(x) if len(x) > self.max_id_bytes else len(x.encode("utf-8", errors="strict"))
        except UnicodeEncodeError:
            raise InputError(field, "an ID string must be valid Unicode (it holds a lone surrogate)") from None
        if size > self.max_id_bytes:
            raise InputError(field, f"ID string over {self.max_id_bytes} bytes (UTF-8; --max-id-bytes)")

    def _rows(self, name: str, vals: list) -> tuple[np.ndarray, np.ndarray]:
        """Raw IDs (ints and strings) -> (rows int64 [n], bad bool [n]) as the data set encoded them."""
        args = (vals, self.encodings[name], self.sizes[name])
        return encode_request_ids(*args, raw=True) if self.raw[name] else encode_request_ids(*args)

    def _refusal(self, name: str, value) -> str:
        enc, n = self.encodings[name], self.sizes[name]
        if enc == "identity":
            return (f"ID {str(value)[:40]!r} is not a row of this table [0, {n}) (the data set's IDs are rows: "
                    "--id-encoding identity)")
        return f"ID {str(value)[:40]!r} is not an integer (this feature's IDs are integers, hashed as in training)"

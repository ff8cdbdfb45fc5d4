"""tierec's on-disk data set: Parquet shards plus a JSON manifest.

Layout of a data set directory::

    DATASET/
      manifest.json              schema, row counts, per-file sizes and checksums
      train/part-00000.parquet   one file per shard, row groups of ``row_group_size``
      test/part-00000.parquet

Columns of every shard:

- one float32 column per label (``Schema.labels``, in order; one label: ``label``), each 0 or 1;
- one float32 column per dense feature (already transformed, e.g. ``log(1 + x)``);
- one ``list<int64>`` column per sparse feature: row IDs already hashed into
  ``[0, num_embeddings)``, or for a feature with raw IDs (``SparseFeature.raw``) the full
  64-bit hashes (any int64); an empty list is a missing value;
- ``session`` (int64), only when the data set has a session key.

A data set written clustered by session (`tierec.data.cluster`; manifest key
``clustering``) stores the user-side columns **once per run**: a row whose user-side
lists all equal the previous row's (same session, same row group) holds a null there,
meaning "as above" (an empty list stays a missing value). Readers expand the runs, or
with ``dedup=True`` keep them as an inverse map (`Chunk.inverse`); shuffling moves whole
runs, so a session's samples stay together.

Readers stream one row group at a time (constant memory), shuffle row-group
order and rows within a row group from ``(seed, epoch)``, and can start at any
batch index (for exact resume) without reading the skipped row groups.

Every byte read is checked first: the manifest holds, per file, a CRC32 of each row
group's byte range (page headers and data of all its column chunks) and one of the rest
of the file (leading magic, footer, trailer). `Dataset` checks the rest when it first
opens a file and each row group as it reads it, then decodes the checked bytes; a
mismatch, an undecodable row group, a label column missing or not float, a label other than
0 or 1 (NaN included), a sparse column missing or not ``list<int64>``, or a sparse ID outside
``[0, num_embeddings)`` (raw features excepted) raises `DataError` naming the file and the row
group. Files listed without row-group checksums (data sets written
before them) are checked against their sha256 once per `Dataset`, before the first read.
"""

from __future__ import annotations

import functools
import io
import json
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tierec.data.rowgroup import RowGroupColumns
from tierec.errors import DataError, TierecError
from tierec.fsio import atomic_write_bytes, sha256_file
from tierec.sparse import KeyedJaggedTensor
from tierec.sparse.dedup import dedup_rows, jagged_take, same_as_previous

if TYPE_CHECKING:
    from tierec.data.loader import InputControl, LoaderSettings, StageClock

FORMAT = "tierec-dataset"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")  # the splits `convert` and `synth` write
T = TypeVar("T")


# --------------------------------------------------------------------------- schema
# How a feature's raw values became rows (`tierec.data.hashing.encode_ids`); None: a data set or
# checkpoint written before encodings were recorded (served by the old rule, with a warning).
ENCODINGS = ("hash-string", "hash-int", "identity")
DENSE_TRANSFORMS = ("log1p", "none")  # raw dense value -> stored value (`tierec.data.hashing.transform_dense`)


@dataclass
class SparseFeature:
    """One categorical feature and the embedding table behind it.

    ``encoding``: how a raw value becomes a row in ``[0, num_embeddings)`` -- ``hash-string`` (the
    value's text, `hash_strings`), ``hash-int`` (an integer, `hash_ints`) or ``identity`` (the
    value is the row); training, evaluation and serving all encode by it.

    ``raw``: the data set holds raw IDs, the encoding's full 64-bit hashes never reduced (any
    int64; ``identity``: the integer itself), for tables that map IDs without collisions; a
    fixed table of ``num_embeddings`` rows reduces them (`tierec.data.hashing.reduce_raw`) to
    the rows a non-raw data set holds. A manifest without the key: False."""

    name: str
    num_embeddings: int
    side: str = "item"  # "user": constant within a session; "item": varies per sample
    encoding: str | None = "identity"
    raw: bool = False

    def __post_init__(self):
        if self.num_embeddings <= 0:
            raise TierecError(f"sparse feature {self.name!r}: num_embeddings must be > 0, got {self.num_embeddings}")
        if self.side not in ("user", "item"):
            raise TierecError(f"sparse feature {self.name!r}: side must be 'user' or 'item', got {self.side!r}")
        if self.encoding is not None and self.encoding not in ENCODINGS:
            raise TierecError(f"sparse feature {self.name!r}: encoding must be one of {', '.join(ENCODINGS)}, "
                              f"got {self.encoding!r}")
        if not isinstance(self.raw, bool):
            raise TierecError(f"sparse feature {self.name!r}: raw must be true or false, got {self.raw!r}")


@dataclass
class Schema:
    """Features of a data set. ``dense_transform``: what the converter applied to each raw dense value
    (``log1p``: log(1 + max(x, 0)); ``none``); None when not recorded (an older data set)."""

    dense: list[str]
    sparse: list[SparseFeature]
    session_key: str | None = None
    dense_transform: str | None = "none"
    # the binary labels of a sample, one per task (columns of these names; one: "label")
    labels: list[str] = field(default_factory=lambda: ["label"])

    def __post_init__(self):
        if not isinstance(self.labels, (list, tuple)) or not self.labels or len(set(self.labels)) != len(
                self.labels) or not all(isinstance(x, str) and x.strip() == x and x for x in self.labels):
            raise TierecError(f"labels must be a list of distinct non-empty names, got {self.labels!r}")
        self.labels = list(self.labels)
        taken = set(self.dense) | {f.name for f in self.sparse} | ({"session"} if self.session_key is not None else set())
        clash = [x for x in self.labels if x in taken]
        if clash:
            raise TierecError(f"label name {clash[0]!r} is also the name of a feature column")
        if self.dense_transform is not None and self.dense_transform not in DENSE_TRANSFORMS:
            raise TierecError(f"dense_transform must be one of {', '.join(DENSE_TRANSFORMS)}, "
                              f"got {self.dense_transform!r}")

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def num_tasks(self) -> int:
        """Labels per sample (``len(labels)``): `Chunk.label` / `Batch.labels` are ``[n]`` for one, ``[n, K]`` else."""
        return len(self.labels)

    @property
    def user_names(self) -> list[str]:
        """The user-side sparse features (constant within a session)."""
        return [f.name for f in self.sparse if f.side == "user"]

    def arrow_schema(self) -> pa.Schema:
        fields = [pa.field(n, pa.float32()) for n in self.labels]
        fields += [pa.field(n, pa.float32()) for n in self.dense]
        fields += [pa.field(f.name, pa.list_(pa.int64())) for f in self.sparse]
        if self.session_key is not None:
            fields.append(pa.field("session", pa.int64()))
        return pa.schema(fields)

    def to_json(self) -> dict:
        return {"dense": self.dense, "sparse": [asdict(f) for f in self.sparse], "session_key": self.session_key,
                "dense_transform": self.dense_transform, "labels": list(self.labels)}

    @staticmethod
    def from_json(d: dict) -> Schema:
        """The schema of a manifest; encodings and the dense transform are None where it predates them,
        ``raw`` False."""
        sparse = [SparseFeature(**{"encoding": None, **f}) for f in d["sparse"]]
        labels = d.get("labels")
        if labels is None:  # written before labels were recorded: the one column "label"
            labels = ["label"]
        if not isinstance(labels, list):
            raise TierecError(f"labels must be a list of names, got {labels!r}")
        return Schema(list(d["dense"]), sparse, d.get("session_key"), d.get("dense_transform"), list(labels))

    def differences(self, other: Schema) -> list[str]:
        """What differs from ``other``, in words, this schema's side first (empty when equal)."""
        out = []
        if self.dense != other.dense:
            out.append(f"dense features {_names(self.dense)} vs {_names(other.dense)}")
        mine, theirs = {f.name: f for f in self.sparse}, {f.name: f for f in other.sparse}
        if list(mine) != list(theirs):
            out.append(f"sparse features {_names(list(mine))} vs {_names(list(theirs))}")
        for name in (n for n in mine if n in theirs):
            for k, a in asdict(mine[name]).items():
                b = getattr(theirs[name], k)
                if a != b:
                    out.append(f"{name}.{k} {a!r} vs {b!r}")
        if self.session_key != other.session_key:
            out.append(f"session key {self.session_key!r} vs {other.session_key!r}")
        if self.dense_transform != other.dense_transform:
            out.append(f"dense transform {self.dense_transform!r} vs {other.dense_transform!r}")
        if self.labels != other.labels:
            out.append(f"labels {_names(self.labels)} vs {_names(other.labels)}")
        return out


def _names(names: list[str], limit: int = 6) -> str:
    return "[" + ", ".join(names[:limit]) + (f", ... ({len(names)})" if len(names) > limit else "") + "]"


def default_label_names(n: int) -> list[str]:
    """Names of ``n`` labels when none are given: ``label``, then ``conversion``, then ``label_2``, ..."""
    if not 1 <= n:
        raise TierecError(f"a data set needs at least one label, got {n}")
    return ["label", "conversion", *[f"label_{k}" for k in range(2, n)]][:n]


def bad_labels(label: np.ndarray, names: list[str]) -> str | None:
    """Why a chunk's labels (``[n]`` or ``[n, K]``, columns ``names``) are not all 0 or 1, naming the first
    bad column; None when they are. `TierecError` when the shape does not fit ``names``."""
    m = label_matrix(label, len(names))
    bad = (m != 0) & (m != 1)  # NaN too
    if not bad.any():
        return None
    k = int(np.flatnonzero(bad.any(0))[0])
    v = float(m[np.flatnonzero(bad[:, k])[0], k])
    what = "a non-finite value" if not np.isfinite(v) else "a value other than 0 or 1"
    return f"label column {names[k]!r} holds {what} ({v!r}; labels must be 0 or 1)"


def label_matrix(label: np.ndarray, k: int) -> np.ndarray:
    """float32 ``[n, k]`` view of a chunk's labels (``[n]`` when ``k == 1``, else ``[n, k]``); `TierecError`
    when the shape does not fit ``k`` labels."""
    a = np.asarray(label)
    if a.ndim == 1 and k == 1:
        return a.reshape(-1, 1)
    if a.ndim == 2 and a.shape[1] == k:
        return a
    raise TierecError(f"labels of shape {tuple(a.shape)} do not fit the schema's {k} label(s) "
                      f"(expected {'[n]' if k == 1 else f'[n, {k}]'})")


# --------------------------------------------------------------------------- in-memory chunks
@dataclass
class Chunk:
    """A block of rows as numpy arrays (host memory).

    ``sparse[name] = (values int64 [m], offsets int64 [n + 1])`` with ``offsets[0] == 0``.
    ``label``: float32 ``[n]`` for a schema of one label, ``[n, K]`` for K > 1 (column k is
    ``Schema.labels[k]``); every row operation moves all of them.

    *Compact* chunks (``inverse`` set) hold the features ``inverse_keys`` once per
    entry: ``sparse[k]`` has U lists and row i's list is entry ``inverse[i]``;
    ``inverse`` int64 [n] is non-decreasing (entries in row order).
    """

    label: np.ndarray  # float32 [n] (one label) or [n, K] (K labels, `Schema.labels` order)
    dense: np.ndarray  # float32 [n, n_dense]
    sparse: dict[str, tuple[np.ndarray, np.ndarray]]
    session: np.ndarray | None = None  # int64 [n]
    inverse: np.ndarray | None = None  # int64 [n], compact chunks only
    inverse_keys: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def slice(self, a: int, b: int) -> Chunk:
        lo = hi = 0
        inv = None
        if self.inverse is not None:
            lo, hi = (int(self.inverse[a]), int(self.inverse[b - 1]) + 1) if b > a else (0, 0)
            inv = self.inverse[a:b] - lo
        sp = {}
        for k, (v, o) in self.sparse.items():
            i, j = (lo, hi) if k in self.inverse_keys else (a, b)
            sp[k] = (v[o[i] : o[j]], o[i : j + 1] - o[i])
        s = self.session[a:b] if self.session is not None else None
        return Chunk(self.label[a:b], self.dense[a:b], sp, s, inv, self.inverse_keys)

    def take(self, idx: np.ndarray) -> Chunk:
        """Rows ``idx`` (any order) of a plain chunk."""
        sp = {k: jagged_take(v, o, idx) for k, (v, o) in self.expand().sparse.items()}
        s = self.session[idx] if self.session is not None else None
        return Chunk(self.label[idx], self.dense[idx], sp, s)

    def expand(self) -> Chunk:
        """The plain chunk (every row holds its own lists)."""
        if self.inverse is None:
            return self
        sp = dict(self.sparse)
        for k in self.inverse_keys:
            sp[k] = jagged_take(*sp[k], self.inverse)
        return Chunk(self.label, self.dense, sp, self.session)

    @staticmethod
    def concat(chunks: list[Chunk]) -> Chunk:
        if len(chunks) == 1:
            return chunks[0]
        if len({c.inverse_keys for c in chunks}) > 1 or any((c.inverse is None) != (chunks[0].inverse is None)
                                                           for c in chunks):
            chunks = [c.expand() for c in chunks]
        sp = {}
        for k in chunks[0].sparse:
            vals = np.concatenate([c.sparse[k][0] for c in chunks])
            lens = np.concatenate([np.diff(c.sparse[k][1]) for c in chunks])
            sp[k] = (vals, np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
        s = np.concatenate([c.session for c in chunks]) if chunks[0].session is not None else None
        inv = None
        if chunks[0].inverse is not None:
            k0 = chunks[0].inverse_keys[0]
            shift = np.cumsum([0] + [len(c.sparse[k0][1]) - 1 for c in chunks[:-1]])
            inv = np.concatenate([c.inverse + d for c, d in zip(chunks, shift, strict=True)])
        return Chunk(
            np.concatenate([c.label for c in chunks]), np.concatenate([c.dense for c in chunks]), sp, s,
            inv, chunks[0].inverse_keys,
        )

    @staticmethod
    def from_arrow(table: pa.Table | RowGroupColumns, schema: Schema, compact: bool = False) -> Chunk:
        """A chunk of ``table``; user-side runs (see module doc) are expanded unless ``compact``. From
        `RowGroupColumns` each column is handed over as it is converted (one column of Arrow at a time).
        Features with one ID in every row share one offsets array (``arange(n + 1)``)."""
        take = table.pop if isinstance(table, RowGroupColumns) else table.column
        labs = [take(c).to_numpy().astype(np.float32, copy=False) for c in schema.labels]
        label = labs[0] if len(labs) == 1 else np.stack(labs, 1)
        n = len(label)
        if schema.dense:
            dense = np.stack([take(c).to_numpy().astype(np.float32, copy=False) for c in schema.dense], 1)
        else:
            dense = np.zeros((n, 0), np.float32)
        sp = {}
        heads = None
        users = schema.user_names
        if users and table.column(users[0]).null_count:
            heads = ~table.column(users[0]).is_null().to_numpy(zero_copy_only=False)
        one_each = np.arange(n + 1, dtype=np.int64)  # the offsets of a feature with one ID per row
        for f in schema.sparse:
            col = take(f.name).combine_chunks()
            offs = col.offsets.to_numpy()
            o0 = int(offs[0])
            vals = col.values.to_numpy().astype(np.int64, copy=False)[o0 : int(offs[-1])]
            offs = one_each if int(offs[-1]) - o0 == n and (np.diff(offs) == 1).all() else np.subtract(
                offs, o0, dtype=np.int64)
            if f.side == "user" and heads is not None:
                idx = np.flatnonzero(heads)
                if not heads[0] or col.null_count != n - idx.size or not np.array_equal(
                        ~col.is_null().to_numpy(zero_copy_only=False), heads):
                    raise DataError(f"sparse feature {f.name!r}: user-side runs (null = as above) do not line up "
                                    "with the other user-side features or start a row group with a null")
                if offs[-1] == offs[idx + 1].sum() - offs[idx].sum():  # null lists are empty: share the values
                    sp[f.name] = (vals, np.append(offs[idx], offs[-1]))
                else:
                    sp[f.name] = jagged_take(vals, offs, idx)
            else:
                sp[f.name] = (vals, offs)
        session = take("session").to_numpy() if schema.session_key is not None else None
        if heads is None:
            return Chunk(label, dense, sp, session)
        chunk = Chunk(label, dense, sp, session, np.cumsum(heads, dtype=np.int64) - 1, tuple(users))
        return chunk if compact else chunk.expand()

    def to_arrow(self, schema: Schema, user_runs: bool = False) -> pa.Table:
        """Arrow table of a plain chunk; ``user_runs``: user-side lists once per run (module doc)."""
        heads = self.run_heads(schema) if user_runs and schema.user_names else None
        if schema.num_tasks == 1 and self.label.ndim == 1:
            cols = [pa.array(self.label, pa.float32())]
        else:
            lab = label_matrix(self.label, schema.num_tasks)
            cols = [pa.array(np.ascontiguousarray(lab[:, k]), pa.float32()) for k in range(schema.num_tasks)]
        cols += [pa.array(self.dense[:, i], pa.float32()) for i in range(len(schema.dense))]
        for f in schema.sparse:
            v, o = self.sparse[f.name]
            mask = None
            if heads is not None and f.side == "user":
                ev, eo = jagged_take(v, o, np.flatnonzero(heads))
                lens = np.zeros(len(self), np.int64)
                lens[heads] = np.diff(eo)
                v, o, mask = ev, np.concatenate([[0], np.cumsum(lens)]), pa.array(~heads)
            cols.append(pa.ListArray.from_arrays(pa.array(o.astype(np.int32)), pa.array(v, pa.int64()), mask=mask))
        if schema.session_key is not None:
            cols.append(pa.array(self.session, pa.int64()))
        return pa.Table.from_arrays(cols, schema=schema.arrow_schema())

    def run_heads(self, schema: Schema) -> np.ndarray:
        """bool [n]: row i starts a run (its user-side lists or session differ from row i - 1's)."""
        feats = [self.sparse[k] for k in schema.user_names]
        heads = ~same_as_previous(feats, len(self))
        if self.session is not None and len(self):
            heads[1:] |= self.session[1:] != self.session[:-1]
        return heads


@dataclass
class Batch:
    """One training batch of B samples.

    dense: float32 [B, n_dense]; sparse: KeyedJaggedTensor over the sparse keys;
    labels: float32 [B] for a data set of one label, [B, K] for K labels (column k is
    ``Schema.labels[k]``). Deduplicated batches put the user-side keys in ``user``, an
    inverse KJT (stride U <= B, ``inverse_indices = (keys, int64 [B])``), and only the
    item-side keys in ``sparse``.
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    session: torch.Tensor | None = None
    user: KeyedJaggedTensor | None = None

    def __post_init__(self):
        if self.user is not None:
            b = self.labels.shape[0]
            if self.user.inverse_indices_or_none() is None or self.user.batch_size() != b:
                raise ValueError(f"Batch.user must be an inverse KJT over the batch's {b} samples, got {self.user}")
            if set(self.user.keys()) & set(self.sparse.keys()):
                raise ValueError(f"keys {sorted(set(self.user.keys()) & set(self.sparse.keys()))} are in both "
                                 "Batch.sparse and Batch.user")

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device, non_blocking: bool = False) -> Batch:
        s = self.session.to(device, non_blocking=non_blocking) if self.session is not None else None
        u = self.user.to(device, non_blocking=non_blocking) if self.user is not None else None
        return Batch(
            self.dense.to(device, non_blocking=non_blocking),
            self.sparse.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            s,
            u,
        )

    def full_sparse(self) -> KeyedJaggedTensor:
        """All keys with stride B (user-side keys expanded; item-side keys first)."""
        if self.user is None:
            return self.sparse
        u = self.user.expand()
        b = self.size
        return KeyedJaggedTensor(self.sparse.keys() + u.keys(), torch.cat([self.sparse.values(), u.values()]),
                                 torch.cat([self.sparse.lengths(), u.lengths()]), stride=b)

    @staticmethod
    def from_chunk(chunk: Chunk, keys: list[str], user_keys: list[str] | None = None) -> Batch:
        """Batch of ``chunk``; with ``user_keys``, those keys become a deduplicated ``user`` KJT
        (rows equal in every user key share one entry, see `tierec.sparse.dedup.dedup_rows`)."""
        s = _tensor(chunk.session) if chunk.session is not None else None
        if not user_keys:
            kjt = _kjt(chunk.expand(), keys, len(chunk))
            return Batch(_tensor(chunk.dense), kjt, _tensor(chunk.label), s)
        if chunk.inverse is not None and set(user_keys) == set(chunk.inverse_keys):
            inv0 = chunk.inverse  # entries of the stored runs
        else:
            chunk, inv0 = chunk.expand(), np.arange(len(chunk), dtype=np.int64)
        n0 = len(chunk.sparse[user_keys[0]][1]) - 1
        sess = None  # sessions of plain rows: candidate groups, verified by dedup_rows (runs need none)
        if chunk.session is not None and chunk.inverse is None:
            sess = chunk.session
        rep, inv = dedup_rows([chunk.sparse[k] for k in user_keys], n0, sess)
        if rep.size < n0:
            ent = Chunk(chunk.label, chunk.dense, {k: jagged_take(*chunk.sparse[k], rep) for k in user_keys})
        else:
            ent = chunk
        inverse = torch.from_numpy(inv[inv0])
        user = KeyedJaggedTensor(user_keys, *_kjt_parts(ent, user_keys), stride=int(rep.size),
                                 inverse_indices=(list(user_keys), inverse))
        item_keys = [k for k in keys if k not in user_keys]
        return Batch(_tensor(chunk.dense), _kjt(chunk, item_keys, len(chunk)), _tensor(chunk.label), s, user)


def _kjt_parts(chunk: Chunk, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    vals = [chunk.sparse[k][0] for k in keys]
    lens = [np.diff(chunk.sparse[k][1]) for k in keys]
    values = torch.from_numpy(np.concatenate(vals) if vals else np.zeros(0, np.int64))
    lengths = torch.from_numpy(np.concatenate(lens).astype(np.int64) if lens else np.zeros(0, np.int64))
    return values, lengths


def _kjt(chunk: Chunk, keys: list[str], stride: int) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys, *_kjt_parts(chunk, keys), stride=stride)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """numpy -> torch, a batch's own copy: ``a`` is mostly a slice of a whole chunk's array (or a read-only
    Arrow buffer), which a view would keep alive for as long as the batch lives -- in a look-ahead window, a
    chunk per batch held (~0.2 MB copied per batch of 4096 Criteo rows)."""
    return torch.from_numpy(np.array(a, copy=True))


# --------------------------------------------------------------------------- writing
class SplitWriter:
    """Appends chunks to one split (e.g. ``train``), rolling files every ``rows_per_file`` rows."""

    def __init__(self, root: Path, split: str, schema: Schema, rows_per_file: int = 1 << 20,
                 row_group_size: int = 65536, compression: str = "zstd", user_runs: bool = False):
        self.dir = Path(root) / split
        self.user_runs = user_runs  # user-side lists once per run (module doc)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.schema, self.rows_per_file, self.row_group_size = schema, rows_per_file, row_group_size
        self.compression = compression
        self.files: list[dict] = []
        self._pending: list[Chunk] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0
        self.rows = 0

    def write(self, chunk: Chunk) -> None:
        if len(chunk) == 0:
            return
        why = bad_labels(chunk.label, self.schema.labels)
        if why is not None:
            raise TierecError(f"{self.dir}: {why}")
        self._pending.append(chunk)
        self._pending_rows += len(chunk)
        while self._pending_rows >= self.row_group_size:
            self._flush_group(self.row_group_size)

    def _flush_group(self, n: int) -> None:
        all_rows = Chunk.concat(self._pending)
        group, rest = all_rows.slice(0, n), all_rows.slice(n, len(all_rows))
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)
        if self._writer is None:
            path = self.dir / f"part-{len(self.files):05d}.parquet"
            self._writer = pq.ParquetWriter(path, self.schema.arrow_schema(), compression=self.compression)
            self.files.append({"path": f"{self.dir.name}/{path.name}", "rows": 0})
        self._writer.write_table(group.to_arrow(self.schema, self.user_runs), row_group_size=n)
        self.files[-1]["rows"] += n
        self._file_rows += n
        self.rows += n
        if self._file_rows >= self.rows_per_file:
            self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._file_rows = 0

    def close(self) -> dict:
        if self._pending_rows:
            self._flush_group(self._pending_rows)
        self._close_file()
        for f in self.files:
            p = self.dir.parent / f["path"]
            f["bytes"] = p.stat().st_size
            f["sha256"] = sha256_file(p)
            f.update(file_checksums(p))
        return {"rows": self.rows, "files": self.files}


# --------------------------------------------------------------------------- checksums
CORRUPT = "corrupt data; re-run `tierec data convert` or restore the file"


def _group_ranges(md: pq.FileMetaData) -> list[tuple[int, int]]:
    """(offset, bytes) of each row group: its first page (dictionary or data) to the end of its last column chunk."""
    out = []
    for i in range(md.num_row_groups):
        cols = [md.row_group(i).column(j) for j in range(md.num_columns)]
        starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in cols]
        end = max(a + c.total_compressed_size for a, c in zip(starts, cols, strict=True))
        out.append((min(starts), end - min(starts)))
    return out


def _outside(groups: list[dict], size: int) -> list[tuple[int, int]]:
    """(offset, bytes) of the parts of a file outside its row groups: leading magic, any gaps, footer + trailer."""
    out, pos = [], 0
    for g in sorted(groups, key=lambda g: g["offset"]):
        if g["offset"] > pos:
            out.append((pos, g["offset"] - pos))
        pos = max(pos, g["offset"] + g["bytes"])
    if size > pos:
        out.append((pos, size - pos))
    return out


def _pread(path: str | Path, parts: list[tuple[int, int]]) -> list[bytes]:
    with open(path, "rb") as f:
        return [os.pread(f.fileno(), n, o) for o, n in parts]


def file_checksums(path: str | Path) -> dict:
    """A Parquet shard's manifest checksums: ``row_groups`` ({offset, bytes, rows, crc32} per row group,
    over its whole byte range) and ``footer_crc32`` (over every other byte). CRC32 (docs/data.md: twice
    sha256's speed) detects every single-bit error and every burst of up to 32 bits."""
    md = pq.read_metadata(path)
    ranges = _group_ranges(md)
    groups = [{"offset": o, "bytes": n, "rows": md.row_group(i).num_rows, "crc32": zlib.crc32(data)}
              for i, ((o, n), data) in enumerate(zip(ranges, _pread(path, ranges), strict=True))]
    crc = 0
    for data in _pread(path, _outside(groups, Path(path).stat().st_size)):
        crc = zlib.crc32(data, crc)
    return {"row_groups": groups, "footer_crc32": crc}


class _Span(io.RawIOBase):
    """File-like view of ``data``, the bytes at ``offset`` of a file of ``size`` bytes: the checked bytes
    of one row group, decoded by pyarrow without reading the file again (other reads fail)."""

    def __init__(self, offset: int, data: bytes, size: int):
        self.offset, self.data, self.size, self.pos = offset, memoryview(data), size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = (0, self.pos, self.size)[whence] + pos
        return self.pos

    def read(self, n: int = -1):
        a = self.pos - self.offset
        n = self.size - self.pos if n is None or n < 0 else n
        if a < 0 or a + n > len(self.data):
            raise OSError(f"read of bytes {self.pos}..{self.pos + n} outside the checked row group")
        self.pos += n
        return self.data[a : a + n]


class DatasetWriter:
    """Writes a whole data set: one `SplitWriter` per split, then the manifest."""

    def __init__(self, root: str | os.PathLike, schema: Schema, splits=SPLITS, **kw):
        self.root = Path(root)
        if (self.root / MANIFEST).exists():
            (self.root / MANIFEST).unlink()  # an unfinished rewrite must not look complete
        self.root.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.splits = {s: SplitWriter(self.root, s, schema, **kw) for s in splits}

    def close(self, source: dict | None = None, extra: dict | None = None) -> dict:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "schema": self.schema.to_json(),
            "splits": {name: w.close() for name, w in self.splits.items()},
            "source": source or {},
        }
        if extra:
            manifest.update(extra)
        atomic_write_bytes(self.root / MANIFEST, json.dumps(manifest, indent=2).encode())
        return manifest


def prepare_output_dir(out: Path) -> None:
    """Refuse to write into a non-empty directory that is not (an unfinished) tierec data set; clear old shards."""
    if out.exists() and not out.is_dir():
        raise TierecError(f"{out}: exists and is not a directory")
    if not out.exists():
        return
    entries = [e for e in out.iterdir() if not e.name.startswith(".")]
    foreign = [e.name for e in entries if e.name not in (MANIFEST, *SPLITS)]
    if foreign:
        raise TierecError(f"{out}: directory exists and holds other files ({', '.join(sorted(foreign)[:3])}); "
                          "choose an empty or new --out")
    for split in SPLITS:
        d = out / split
        if d.is_dir():
            for f in d.glob("part-*.parquet"):
                f.unlink()


# --------------------------------------------------------------------------- reading
def _decoding(path: str, what: str, fn: Callable[[], T]) -> T:
    """``fn()``; what a corrupt or mismatched file makes pyarrow or the decoder raise becomes one `DataError`."""
    try:
        return fn()
    except DataError as e:
        if e.path is not None:
            raise
        raise DataError(f"{what}: {e.reason}", path) from None
    except (pa.ArrowException, OSError, KeyError) as e:
        reason = (str(e).splitlines() or [""])[0]
        raise DataError(f"{what} cannot be decoded ({type(e).__name__}: {reason}; {CORRUPT})", path) from None


_FIELDS: dict[str, dict[str, type]] = {  # what a manifest must hold: key -> type, per level
    "manifest": {"format": str, "schema": dict, "splits": dict},
    "schema": {"dense": list, "sparse": list},
    "sparse feature": {"name": str, "num_embeddings": int},
    "split": {"rows": int, "files": list},
    "file": {"path": str, "rows": int, "bytes": int, "sha256": str},
    "row group": {"offset": int, "bytes": int, "rows": int, "crc32": int},
}
_TYPES = {str: "a string", int: "an integer", list: "a list", dict: "a JSON object"}


def _need(d, level: str, where: str, mpath: Path) -> None:
    """``d`` is a JSON object holding the keys of ``level`` (`_FIELDS`) with their types, else `DataError`."""
    if not isinstance(d, dict):
        raise DataError(f"{where} must be a JSON object, got {type(d).__name__}", str(mpath))
    for key, kind in _FIELDS[level].items():
        if key not in d:
            raise DataError(f"{where} lacks {key!r} (incomplete or corrupt manifest)", str(mpath))
        if not isinstance(d[key], kind) or (kind is int and isinstance(d[key], bool)):
            raise DataError(f"{where}: {key!r} must be {_TYPES[kind]}, got {type(d[key]).__name__}", str(mpath))


def load_manifest(mpath: Path) -> dict:
    """A data set's manifest, checked for the keys and types readers rely on; `DataError` naming it otherwise."""
    try:
        m = json.loads(mpath.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"manifest is not UTF-8 text (byte {e.start})", str(mpath)) from None
    except json.JSONDecodeError as e:
        raise DataError(f"manifest is not valid JSON ({e.msg})", str(mpath), e.lineno) from None
    if not isinstance(m, dict):
        raise DataError(f"manifest must be a JSON object, got {type(m).__name__}", str(mpath))
    if m.get("format") != FORMAT:
        raise DataError(f"not a {FORMAT} manifest (format={m.get('format')!r})", str(mpath))
    _need(m, "manifest", "manifest", mpath)
    _need(m["schema"], "schema", "schema", mpath)
    for i, f in enumerate(m["schema"]["sparse"]):
        _need(f, "sparse feature", f"schema.sparse[{i}]", mpath)
    for name, split in m["splits"].items():
        _need(split, "split", f"splits.{name}", mpath)
        for i, f in enumerate(split["files"]):
            where = f"splits.{name}.files[{i}]"
            _need(f, "file", where, mpath)
            if "row_groups" in f:
                if not isinstance(f["row_groups"], list) or not isinstance(f.get("footer_crc32"), int):
                    raise DataError(f"{where}: 'row_groups' must be a list, with 'footer_crc32' an integer",
                                    str(mpath))
                for j, g in enumerate(f["row_groups"]):
                    _need(g, "row group", f"{where}.row_groups[{j}]", mpath)
                if sum(g["rows"] for g in f["row_groups"]) != f["rows"]:
                    raise DataError(f"{where}: its row groups' rows do not add up to its {f['rows']} rows",
                                    str(mpath))
    return m


class Dataset:
    """A tierec data set directory (see module doc)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not self.root.exists():
            raise TierecError(f"{self.root}: data set directory does not exist")
        if not mpath.exists():
            raise TierecError(f"{mpath}: no manifest; is this a tierec data set? "
                              "(make one with `tierec data convert` or `tierec data synth`)")
        self.manifest = load_manifest(mpath)
        try:
            self.schema = Schema.from_json(self.manifest["schema"])
        except (TypeError, ValueError, TierecError) as e:
            raise DataError(f"schema: {e}", str(mpath)) from None
        self._footers: dict[str, pq.FileMetaData] = {}  # files whose footer (or sha256) has been checked
        for split in self.manifest["splits"].values():
            for f in split["files"]:
                p = self.root / f["path"]
                if not p.exists():
                    raise DataError("listed in the manifest but missing", str(p))
                if p.stat().st_size != f["bytes"]:
                    raise DataError(f"size {p.stat().st_size} bytes does not match the manifest's {f['bytes']} "
                                    "(truncated or rewritten; re-run `tierec data convert`)", str(p))

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def clustering(self) -> dict | None:
        """``{"by": "session", "window": rows, ...}`` for a data set written clustered, else None."""
        return self.manifest.get("clustering")

    def _run_starts(self, table: pa.Table | RowGroupColumns) -> np.ndarray:
        """Start rows of the session runs of a row group of a clustered data set."""
        users = self.schema.user_names
        if users:
            heads = ~table.column(users[0]).is_null().to_numpy(zero_copy_only=False)
        else:
            heads = np.ones(table.num_rows, bool)
        if self.schema.session_key is not None and table.num_rows:
            sess = table.column("session").to_numpy()
            heads[1:] |= sess[1:] != sess[:-1]
        return np.flatnonzero(heads)

    def num_rows(self, split: str) -> int:
        return int(self._split(split)["rows"])

    def _split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise TierecError(f"{self.root}: no split {split!r} (has: {', '.join(self.splits)})")
        return self.manifest["splits"][split]

    def verify(self) -> None:
        """Recompute every file's sha256 and, where recorded, its row-group and footer checksums; then
        decode every row group's label columns and check that they hold only 0 and 1 (`DataError` naming
        the column, the file and the row group otherwise)."""
        for split in self.manifest["splits"].values():
            for f in split["files"]:
                p = str(self.root / f["path"])
                if sha256_file(p) != f["sha256"]:
                    raise DataError(f"sha256 does not match the manifest ({CORRUPT})", p)
                if "row_groups" in f:
                    self._footers.pop(p, None)
                    self._footer(p, f)
                else:  # checked by its sha256 just now
                    self._footers[p] = _decoding(p, "footer", functools.partial(pq.read_metadata, p))
                for i in range(self._footers[p].num_row_groups):
                    data = self._group_bytes(p, f, i) if "row_groups" in f else None
                    _decoding(p, f"row group {i}", functools.partial(self._verify_labels, p, f, i, data))

    def _verify_labels(self, path: str, entry: dict, i: int, data: bytes | None) -> None:
        """Decode row group ``i``'s label columns (from ``data``, its checked bytes) and check them."""
        table = self._read_group(path, entry, i, self.schema.labels, data)
        self._check_label_columns(table)
        labs = [table.column(c).to_numpy().astype(np.float32, copy=False) for c in self.schema.labels]
        self._check_labels(labs[0] if len(labs) == 1 else np.stack(labs, 1), path, i)

    def row_groups(self, split: str) -> list[tuple[str, int, int]]:
        """[(file path, row group index, rows)] in storage order."""
        return [g[:3] for g in self._groups(split)]

    def _groups(self, split: str) -> list[tuple[str, int, int, dict]]:
        """[(file path, row group index, rows, the file's manifest entry)] in storage order."""
        out = []
        for f in self._split(split)["files"]:
            p = str(self.root / f["path"])
            if "row_groups" in f:
                rows = [g["rows"] for g in f["row_groups"]]
            else:
                md = self._footer(p, f)
                rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            out += [(p, i, n, f) for i, n in enumerate(rows)]
        return out

    def _footer(self, path: str, entry: dict) -> pq.FileMetaData:
        """The file's Parquet metadata, from bytes checked against the manifest once per Dataset: the
        footer checksum, or for a file listed without row-group checksums, the whole file's sha256."""
        md = self._footers.get(path)
        if md is not None:
            return md
        if "row_groups" not in entry:
            if sha256_file(path) != entry["sha256"]:
                raise DataError(f"sha256 does not match the manifest ({CORRUPT})", path)
            md = _decoding(path, "footer", lambda: pq.read_metadata(path))
        else:
            parts = _pread(path, _outside(entry["row_groups"], entry["bytes"]))
            crc = 0
            for data in parts:
                crc = zlib.crc32(data, crc)
            if not parts or crc != entry["footer_crc32"]:
                raise DataError(f"footer fails its checksum ({CORRUPT})", path)
            md = _decoding(path, "footer", lambda: pq.ParquetFile(pa.BufferReader(parts[-1])).metadata)
            if [md.row_group(i).num_rows for i in range(md.num_row_groups)] != [g["rows"] for g in entry["row_groups"]]:
                raise DataError("the footer's row groups do not match the manifest's", path)
        self._footers[path] = md
        return md

    def _group_bytes(self, path: str, entry: dict, i: int) -> bytes:
        """Row group ``i``'s bytes, checked against its checksum."""
        g = entry["row_groups"][i]
        data = _pread(path, [(g["offset"], g["bytes"])])[0]
        if zlib.crc32(data) != g["crc32"]:
            raise DataError(f"row group {i} fails its checksum ({CORRUPT})", path)
        return data

    def _read_group(self, path: str, entry: dict, i: int, columns: list[str] | None = None,
                    data: bytes | None = None) -> pa.Table:
        """Row group ``i`` of a file (only ``columns`` if given), decoded from checked bytes (module doc;
        ``data``: its bytes, already checked)."""
        if columns is not None:
            have = set(self._footer(path, entry).schema.to_arrow_schema().names)
            columns = [c for c in columns if c in have]  # a missing one: `_check_columns` names it
        # use_threads=False: decoded on the calling thread (a reader thread of the loader, which has its own knob for
        # parallel reads), not on Arrow's CPU pool, whose threads each kept a heap of decoded buffers in Arrow's
        # allocator: 20-30 MiB less peak RSS of a training run (bench_scale --quick), no slower on 2 cores
        return self._open_group(path, entry, i, data).read_row_group(i, columns=columns, use_threads=False)

    def _open_group(self, path: str, entry: dict, i: int, data: bytes | None = None) -> pq.ParquetFile:
        """The file, open for reading row group ``i`` from its checked bytes (``data``, or read and checked
        now); a file listed without row-group checksums is read from disk (checked whole by `_footer`)."""
        md = self._footer(path, entry)
        if "row_groups" not in entry:
            return pq.ParquetFile(path, metadata=md)
        g = entry["row_groups"][i]
        data = self._group_bytes(path, entry, i) if data is None else data
        return pq.ParquetFile(pa.PythonFile(_Span(g["offset"], data, entry["bytes"]), mode="r"), metadata=md,
                              pre_buffer=False)

    def _check_label_columns(self, table: pa.Table | RowGroupColumns) -> None:
        """Every label column is there and is a float, else `DataError`."""
        for name in self.schema.labels:
            if name not in table.column_names:
                raise DataError(f"label column {name!r}: no such column (the manifest does not match the data; "
                                "re-run `tierec data convert`)")
            t = table.schema.field(name).type
            if not pa.types.is_floating(t):
                raise DataError(f"label column {name!r}: column type {t}, expected float (the manifest does not "
                                "match the data; re-run `tierec data convert`)")

    def _check_columns(self, table: pa.Table | RowGroupColumns) -> None:
        """Every sparse feature's column is there and is a list of int64 (raw features too), else `DataError`."""
        for f in self.schema.sparse:
            if f.name not in table.column_names:
                raise DataError(f"sparse feature {f.name!r}: no such column (the manifest does not match the data; "
                                "re-run `tierec data convert`)")
            t = table.schema.field(f.name).type
            if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_int64(t.value_type):
                raise DataError(f"sparse feature {f.name!r}: column type {t}, expected list<int64> (the manifest does "
                                "not match the data; re-run `tierec data convert`)")

    def _check_labels(self, label: np.ndarray, path: str, i: int) -> None:
        """Every label 0 or 1 (`bad_labels`), else `DataError` naming the column, the file and the row group."""
        why = bad_labels(label, self.schema.labels)
        if why is not None:
            raise DataError(f"row group {i}: {why}", path)

    def _check_ids(self, chunk: Chunk, path: str, i: int) -> None:
        """Every sparse ID in ``[0, num_embeddings)``: one unsigned max per column (negative IDs wrap to huge).
        Raw features (any int64) are not checked."""
        for f in self.schema.sparse:
            if f.raw:
                continue
            v = chunk.sparse[f.name][0]
            if v.size and v.view(np.uint64).max() >= f.num_embeddings:
                bad = int(v.min()) if v.min() < 0 else int(v.max())
                raise DataError(f"row group {i}: sparse feature {f.name!r}: ID {bad} is outside [0, num_embeddings "
                                f"{f.num_embeddings}) (the manifest does not match the data; re-run "
                                "`tierec data convert`)", path)

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                start_batch: int = 0, drop_last: bool = False, max_rows: int | None = None,
                dedup: bool = False, loader: LoaderSettings | InputControl | None = None,
                clock: StageClock | None = None) -> Iterator[Batch]:
        """Stream batches of ``batch_size`` rows (the last may be smaller unless ``drop_last``).

        Order is a pure function of ``(seed, epoch)``; ``start_batch`` skips batches
        without reading the skipped row groups, so a resumed run sees the same batches.
        ``dedup``: user-side features come as an inverse KJT (`Batch.user`), if the schema has any.
        ``loader``: the input pipeline's settings (`tierec.data.loader.LoaderSettings`; batches are built
        by ``batch_workers`` threads ahead of the caller, or on its thread); the batches are the same
        whatever the settings. ``clock``: each stage's time (`tierec.data.loader.StageClock`).
        """
        from tierec.data.loader import stream_batches

        users = self.schema.user_names if dedup else []
        chunks = self.chunks(split, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, start_batch=start_batch,
                             drop_last=drop_last, max_rows=max_rows, compact=bool(users), loader=loader, clock=clock)
        yield from stream_batches(chunks, self.schema.sparse_names, users, loader, clock)

    def num_batches(self, split: str, batch_size: int, drop_last: bool = False, max_rows: int | None = None) -> int:
        n = self.num_rows(split) if max_rows is None else min(max_rows, self.num_rows(split))
        return n // batch_size if drop_last else -(-n // batch_size)

    def chunks(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
               start_batch: int = 0, drop_last: bool = False, max_rows: int | None = None,
               compact: bool = False, loader: LoaderSettings | InputControl | None = None,
               clock: StageClock | None = None) -> Iterator[Chunk]:
        """Chunks of ``batch_size`` rows (see `batches`). Shuffling permutes row groups and, within
        a row group, rows, or whole session runs in a data set written clustered by session.
        ``compact``: keep stored user-side runs as `Chunk.inverse` instead of expanding them.
        ``loader``: how the row groups are read (`tierec.data.loader.LoaderSettings`: reader threads,
        read-ahead, row groups per read, a cache of decoded row groups; default: one thread, one row
        group ahead); the chunks are the same whatever the settings. ``clock``: each stage's time."""
        from tierec.data.loader import stream_chunks

        plan = self.read_plan(split, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, start_batch=start_batch,
                              max_rows=max_rows, compact=compact)
        yield from stream_chunks(self, plan, batch_size, drop_last, loader, clock)

    def read_plan(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                  start_batch: int = 0, max_rows: int | None = None, compact: bool = False) -> ReadPlan:
        """Which row groups a pass reads, in order, and the rows it drops and keeps (see `chunks`)."""
        if batch_size <= 0:
            raise TierecError(f"batch size must be > 0, got {batch_size}")
        groups = self._groups(split)
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(groups)) if shuffle else np.arange(len(groups))
        total = sum(g[2] for g in groups) if max_rows is None else min(max_rows, sum(g[2] for g in groups))
        skip = start_batch * batch_size
        # Plan: (group, rows to drop at its start) after skipping; shuffle perms drawn for every group
        # in order so that the permutation of a group does not depend on start_batch.
        perms_seed = rng.integers(0, 2**63 - 1, size=len(groups))
        items, seen = [], 0
        for gi in order:
            n = groups[gi][2]
            if seen + n <= skip:
                seen += n
                continue
            items.append((int(gi), max(0, skip - seen)))
            seen += n
        return ReadPlan(groups, items, perms_seed, total - skip, shuffle, compact,
                        (self.clustering or {}).get("by") == "session")

    # One row group through the reader's stages (`tierec.data.loader` runs them, `tierec.data.profile` times
    # them): read (bytes + checksum) -> parquet (open, column checks) -> shuffle (the permutation) -> decode (Arrow ->
    # numpy `Chunk`, ID and label checks), which decodes and permutes each column as it takes it (`RowGroupColumns`).
    def stage_read(self, plan: ReadPlan, gi: int) -> bytes | None:
        """Row group ``gi``'s bytes, checked against the manifest (None: a file listed without row-group
        checksums, read by pyarrow in `stage_parquet`)."""
        path, rg, _, entry = plan.groups[gi]
        if "row_groups" not in entry:
            return None
        return _decoding(path, f"row group {rg}", lambda: self._group_bytes(path, entry, rg))

    def stage_parquet(self, plan: ReadPlan, gi: int, data: bytes | None) -> RowGroupColumns:
        """Row group ``gi`` open for decoding from its checked bytes, its columns checked against the schema;
        each column is decoded when the decode stage takes it (`tierec.data.rowgroup`)."""
        path, rg, _, entry = plan.groups[gi]

        def run() -> RowGroupColumns:
            cols = RowGroupColumns.open(self._open_group(path, entry, rg, data), rg)
            self._check_label_columns(cols)
            self._check_columns(cols)
            return cols
        return _decoding(path, f"row group {rg}", run)

    def stage_shuffle(self, plan: ReadPlan, gi: int, cols: RowGroupColumns) -> RowGroupColumns:
        """Row group ``gi``'s rows in the pass's order: permuted from (seed, epoch, group) when shuffling,
        whole session runs moved together in a data set clustered by session (the columns are permuted as
        they are decoded, `RowGroupColumns.permute`)."""
        if not plan.shuffle:
            return cols
        path, rg, n, _ = plan.groups[gi]

        def run() -> RowGroupColumns:
            if plan.by_session:  # whole runs: a session's rows stay together
                starts = self._run_starts(cols)
                lens = np.diff(np.append(starts, n))
                order = np.random.default_rng(plan.perms_seed[gi]).permutation(starts.size)
                out_start = np.cumsum(lens[order]) - lens[order]
                perm = np.repeat(starts[order] - out_start, lens[order]) + np.arange(n)
            else:
                perm = np.random.default_rng(plan.perms_seed[gi]).permutation(n)
            cols.permute(pa.array(perm))
            return cols
        return _decoding(path, f"row group {rg}", run)

    def stage_decode(self, plan: ReadPlan, gi: int, cols: RowGroupColumns, drop: int = 0) -> Chunk:
        """Row group ``gi``'s `Chunk` (its first ``drop`` rows left out), IDs and labels checked; its columns
        are decoded (and permuted) one at a time as they are converted."""
        path, rg, _, _ = plan.groups[gi]
        chunk = _decoding(path, f"row group {rg}", lambda: Chunk.from_arrow(cols, self.schema, plan.compact))
        self._check_ids(chunk, path, rg)
        self._check_labels(chunk.label, path, rg)
        return chunk.slice(drop, len(chunk)) if drop else chunk


@dataclass
class ReadPlan:
    """One pass over a split (`Dataset.read_plan`): ``groups`` [(path, row group, rows, manifest entry)],
    ``items`` [(group index, rows dropped at its start)] in reading order, one shuffle seed per group,
    ``remaining``: rows the pass yields."""

    groups: list[tuple[str, int, int, dict]]
    items: list[tuple[int, int]]
    perms_seed: np.ndarray
    remaining: int
    shuffle: bool
    compact: bool
    by_session: bool

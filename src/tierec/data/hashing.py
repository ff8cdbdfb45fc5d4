"""Stable, vectorised hashing of categorical values into table rows, and the encodings built on it.

Every categorical value becomes ``splitmix64(value) mod num_embeddings``:

- integers are hashed from their int64 bit pattern;
- strings are hashed from their UTF-8 bytes, read as little-endian 8-byte words,
  each word folded in with splitmix64, then the length mixed in.

The hash is stable across runs, machines and numpy versions (pure uint64
arithmetic), so the same raw value maps to the same row in training, in
evaluation and at serving time. Out-of-range IDs are hashed the same way.

A data set records per sparse feature how its raw values became rows (its *encoding*:
``hash-string``, ``hash-int`` or ``identity``) and how dense values were transformed
(``log1p`` or ``none``); `encode_strings` / `encode_ints` (the converter) and
`encode_request_ids` / `transform_dense` (serving) apply them, so a raw row gets the same
rows and values in training and at serving time.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_C1 = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0xBF58476D1CE4E5B9)
_C3 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64, copy=True) + _C1
        z = (z ^ (z >> np.uint64(30))) * _C2
        z = (z ^ (z >> np.uint64(27))) * _C3
        return z ^ (z >> np.uint64(31))


def hash_ints(values: np.ndarray, num_embeddings: int, salt: int = 0) -> np.ndarray:
    """int64 [n] raw IDs -> int64 [n] rows in ``[0, num_embeddings)``."""
    x = np.asarray(values).astype(np.int64, copy=False).view(np.uint64)
    if salt:
        x = x ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF)
    return (splitmix64(x) % np.uint64(num_embeddings)).astype(np.int64)


def _strings_to_words(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Arrow string array without nulls [n] -> (uint64 [n, w] zero-padded words, uint64 [n] byte lengths)."""
    arr = arr.cast(pa.large_string())
    n = len(arr)
    offs = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    lens = np.diff(offs)
    width = max(8, int((lens.max() if n else 0) + 7) // 8 * 8)
    buf = np.zeros((n, width), dtype=np.uint8)
    total = int(offs[-1] - offs[0]) if n else 0
    if total:
        data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offs[0] : offs[-1]]
        rows = np.repeat(np.arange(n), lens)
        cols = np.arange(total) - np.repeat(offs[:-1] - offs[0], lens)
        buf[rows, cols] = data
    return buf.view("<u8"), lens.astype(np.uint64)


def _hash_words(words: np.ndarray, lens: np.ndarray) -> np.ndarray:
    h = splitmix64(lens)
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):  # loop over 8-byte words (a handful), not over values
            h = splitmix64(h ^ words[:, j])
    return h


def hash_strings(values: pa.Array | pa.ChunkedArray, num_embeddings: int) -> np.ndarray:
    """Arrow string array [n] -> int64 [n] rows; nulls and empty strings map to -1 (missing).

    Hashes each distinct string once (dictionary encoding), then expands.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    enc = pc.dictionary_encode(values)
    words, lens = _strings_to_words(enc.dictionary)
    rows = (_hash_words(words, lens) % np.uint64(num_embeddings)).astype(np.int64)
    rows[lens == 0] = -1
    idx = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.where(idx >= 0, rows[np.maximum(idx, 0)] if len(rows) else -1, -1)
    return out.astype(np.int64)


# --------------------------------------------------------------------------- encodings
def encode_strings(values: pa.Array | pa.ChunkedArray, encoding: str, num_embeddings: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw values as text (a string column of an input file) -> (int64 rows [n], bool bad [n]).

    ``hash-string``: `hash_strings`; ``hash-int``: the text read as a non-negative integer, then
    `hash_ints`; ``identity``: the text read as an integer row in ``[0, num_embeddings)``. Null and
    empty strings are missing values: row -1, not bad. ``bad`` marks values the encoding cannot take
    (not an integer, or outside the table for ``identity``)."""
    if encoding == "hash-string":
        rows = hash_strings(values, num_embeddings)
        return rows, np.zeros(rows.size, bool)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    missing = pc.fill_null(pc.equal(pc.utf8_length(values), 0), True).to_numpy(zero_copy_only=False)
    ok = pc.fill_null(pc.match_substring_regex(values, r"^[0-9]{1,18}$"), False).to_numpy(zero_copy_only=False)
    ints = pc.cast(pc.if_else(pa.array(ok), values, pa.scalar("0", values.type)), pa.int64()).to_numpy()
    rows, bad = encode_ints(ints, encoding, num_embeddings)
    bad = (bad | ~ok) & ~missing
    return np.where(missing | bad, -1, rows), bad


def encode_ints(values: np.ndarray, encoding: str, num_embeddings: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw integer IDs int64 [n] -> (int64 rows [n], bool bad [n]): ``hash-int`` hashes (`hash_ints`);
    ``identity`` takes the value as the row (bad outside ``[0, num_embeddings)``); ``hash-string``
    hashes the decimal text, as a text input file holds the integer."""
    values = np.asarray(values, np.int64)
    if encoding == "hash-int":
        return hash_ints(values, num_embeddings), np.zeros(values.size, bool)
    if encoding == "identity":
        bad = (values < 0) | (values >= num_embeddings)
        return np.where(bad, -1, values), bad
    if encoding == "hash-string":
        return hash_strings(pa.array(values.astype(str)), num_embeddings), np.zeros(values.size, bool)
    raise ValueError(f"unknown ID encoding {encoding!r}")


def encode_request_ids(values: list, encoding: str | None, num_embeddings: int) -> tuple[np.ndarray, np.ndarray]:
    """IDs as a JSON request holds them (ints and strings, mixed) -> (int64 rows [n], bool bad [n]), encoded
    as the data set was: an integer is its decimal text where the input file held text (``hash-string``),
    a decimal string an integer where it held integers (``hash-int``, ``identity``). Empty strings are
    missing values (row -1, as the converter reads empty fields). ``encoding`` None (a checkpoint from
    before encodings were recorded): an integer in the table is the row, other integers are hashed with
    `hash_ints`, strings with `hash_strings`."""
    n = len(values)
    rows, bad = np.full(n, -1, np.int64), np.zeros(n, bool)
    is_str = np.fromiter((isinstance(x, str) for x in values), bool, n)
    si, ii = np.flatnonzero(is_str), np.flatnonzero(~is_str)
    if si.size:
        strs = pa.array([values[k] for k in si], pa.string())
        if encoding is None:
            rows[si] = hash_strings(strs, num_embeddings)
        else:
            rows[si], bad[si] = encode_strings(strs, encoding, num_embeddings)
    if ii.size:
        ints = np.array([values[k] for k in ii], np.int64)
        if encoding is None:
            rows[ii] = np.where((ints >= 0) & (ints < num_embeddings), ints, hash_ints(ints, num_embeddings))
        else:
            rows[ii], bad[ii] = encode_ints(ints, encoding, num_embeddings)
    return rows, bad


def log1p_dense(x: np.ndarray) -> np.ndarray:
    """DLRM's dense transform: ``log(1 + max(x, 0))``; NaN (missing) -> 0. Returns float32."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.log1p(np.maximum(x, 0.0)).astype(np.float32)


def transform_dense(x: np.ndarray, transform: str | None) -> np.ndarray:
    """Raw dense values float64 [...] -> the stored float32 values: ``log1p`` (`log1p_dense`), or as they are
    (``none``, or None: not recorded)."""
    return log1p_dense(x) if transform == "log1p" else np.asarray(x, np.float32)

"""Stable, vectorised hashing of categorical values into table rows.

Every categorical value becomes ``splitmix64(value) mod num_embeddings``:

- integers are hashed from their int64 bit pattern;
- strings are hashed from their UTF-8 bytes, read as little-endian 8-byte words,
  each word folded in with splitmix64, then the length mixed in.

The hash is stable across runs, machines and numpy versions (pure uint64
arithmetic), so the same raw value maps to the same row in training, in
evaluation and at serving time. Out-of-range IDs are hashed the same way.
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

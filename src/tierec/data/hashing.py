"""Stable, vectorised hashing of categorical values into table rows, and the encodings built on it.

Every categorical value becomes ``splitmix64(value) mod num_embeddings``:

- integers are hashed from their int64 bit pattern;
- strings are hashed from their UTF-8 bytes, read as little-endian 8-byte words,
  each word folded in with splitmix64, then the length mixed in.

The hash is stable across runs, machines and numpy versions (pure uint64
arithmetic), so the same raw value maps to the same row in training, in
evaluation and at serving time. Out-of-range IDs are hashed the same way.

*Raw* IDs are the full 64-bit hashes, never reduced (`hash_ints_raw`, `hash_strings_raw`;
the uint64 bits stored as int64, so they may be negative): a data set written with raw IDs
(``SparseFeature.raw``) keeps them, and a fixed table of N rows reduces them with `reduce_raw`
(numpy) or `reduce_raw_torch` (torch, any device) to exactly the rows a non-raw data set
holds: ``reduce_raw(hash_ints_raw(x), N) == hash_ints(x, N)``, the same for strings.

A data set records per sparse feature how its raw values became rows (its *encoding*:
``hash-string``, ``hash-int`` or ``identity``) and how dense values were transformed
(``log1p`` or ``none``); `encode_strings` / `encode_ints` (the converter) and
`encode_request_ids` / `transform_dense` (serving) apply them, so a raw row gets the same
rows and values in training and at serving time; with ``raw=True`` they give raw IDs.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

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


_C2_INV = np.uint64(pow(int(_C2), -1, 1 << 64))
_C3_INV = np.uint64(pow(int(_C3), -1, 1 << 64))


def splitmix64_inverse(z: np.ndarray) -> np.ndarray:
    """The inverse of `splitmix64` over a uint64 array: ``splitmix64_inverse(splitmix64(x)) == x``
    (each xorshift undone by repeated shifts, each multiply by the constant's inverse mod 2^64)."""
    with np.errstate(over="ignore"):
        z = z.astype(np.uint64, copy=True)
        z = z ^ (z >> np.uint64(31)) ^ (z >> np.uint64(62))
        z = z * _C3_INV
        z = z ^ (z >> np.uint64(27)) ^ (z >> np.uint64(54))
        z = z * _C2_INV
        z = z ^ (z >> np.uint64(30)) ^ (z >> np.uint64(60))
        return z - _C1


def reduce_raw(values: np.ndarray, num_embeddings: int) -> np.ndarray:
    """Raw IDs int64 [n] (uint64 bits, any int64) -> int64 [n] rows ``uint64(value) mod num_embeddings``,
    in ``[0, num_embeddings)``: the row of a fixed table of ``num_embeddings`` (1 .. 2^63) rows."""
    n = int(num_embeddings)
    if not 0 < n <= 1 << 63:
        raise ValueError(f"num_embeddings must be in [1, 2^63], got {n}")
    u = np.asarray(values).astype(np.int64, copy=False).view(np.uint64)
    return (u % np.uint64(n)).astype(np.int64)


def reduce_raw_torch(values: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """`reduce_raw` in torch, on the tensor's device: raw IDs int64 [...] -> int64 rows in
    ``[0, num_embeddings)``, the same as ``reduce_raw`` element for element.

    torch has no uint64 remainder: ``a = v mod n`` (floor remainder of the signed value, in
    ``[0, n)``) is the answer for ``v >= 0``; a negative ``v`` stands for ``v + 2^64``, whose
    remainder is ``(a + c) mod n`` with ``c = 2^64 mod n``, computed as ``a - (n - c)`` (+ n when
    negative) so that no intermediate leaves int64. A table of 2^63 rows goes through numpy."""
    n = int(num_embeddings)
    if not 0 < n <= 1 << 63:
        raise ValueError(f"num_embeddings must be in [1, 2^63], got {n}")
    if values.dtype != torch.int64:
        raise ValueError(f"raw IDs must be int64, got {values.dtype}")
    if n >= 1 << 63:
        return torch.from_numpy(reduce_raw(values.cpu().numpy(), n)).to(values.device)
    a = torch.remainder(values, n)
    c = (1 << 64) % n
    if c == 0:  # n is a power of two: 2^64 is a multiple of n
        return a
    r = a - (n - c)
    r = torch.where(r < 0, r + n, r)
    return torch.where(values < 0, r, a)


def hash_ints_raw(values: np.ndarray, salt: int = 0) -> np.ndarray:
    """int64 [n] IDs -> int64 [n] raw IDs: ``splitmix64(value ^ salt)``, all 64 bits (any int64)."""
    x = np.asarray(values).astype(np.int64, copy=False).view(np.uint64)
    if salt:
        x = x ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF)
    return splitmix64(x).view(np.int64)


def hash_ints(values: np.ndarray, num_embeddings: int, salt: int = 0) -> np.ndarray:
    """int64 [n] raw IDs -> int64 [n] rows in ``[0, num_embeddings)``: `hash_ints_raw` reduced (`reduce_raw`)."""
    return reduce_raw(hash_ints_raw(values, salt), num_embeddings)


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


def missing_strings(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Arrow string array [n] -> bool [n]: the missing values (null or empty strings)."""
    return pc.fill_null(pc.equal(pc.utf8_length(values), 0), True).to_numpy(zero_copy_only=False)


def _string_hashes(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Arrow string array [n] -> (raw hashes int64 [d] of its distinct strings, int64 [n] the distinct string
    of each value, -1 for a missing one: null or empty). Each distinct string is hashed once."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    enc = pc.dictionary_encode(values)
    words, lens = _strings_to_words(enc.dictionary)
    idx = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    empty = np.flatnonzero(lens == 0)  # at most one: the dictionary holds distinct strings
    if empty.size:
        idx[idx == empty[0]] = -1
    return _hash_words(words, lens).view(np.int64), idx


def _expand(per_distinct: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per-distinct values [d] -> per value [n] by ``idx`` (`_string_hashes`); -1 where ``idx`` is -1."""
    if not per_distinct.size:
        return np.full(idx.size, -1, np.int64)
    return np.where(idx >= 0, per_distinct[np.maximum(idx, 0)], -1).astype(np.int64)


def hash_strings_raw(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Arrow string array [n] -> (raw IDs int64 [n], bool missing [n]): the full 64-bit hash of each string.
    Nulls and empty strings are missing; they hold -1, but so may a string's hash: tell them by the mask."""
    h, idx = _string_hashes(values)
    return _expand(h, idx), idx < 0


def hash_strings(values: pa.Array | pa.ChunkedArray, num_embeddings: int) -> np.ndarray:
    """Arrow string array [n] -> int64 [n] rows (`hash_strings_raw` reduced by `reduce_raw`); nulls and empty
    strings map to -1 (missing). Reduces each distinct string's hash once, then expands."""
    h, idx = _string_hashes(values)
    return _expand(reduce_raw(h, num_embeddings), idx)


# --------------------------------------------------------------------------- encodings
def encode_strings(values: pa.Array | pa.ChunkedArray, encoding: str, num_embeddings: int,
                   raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raw values as text (a string column of an input file) -> (int64 rows [n], bool bad [n]).

    ``hash-string``: `hash_strings`; ``hash-int``: the text read as a non-negative integer, then
    `hash_ints`; ``identity``: the text read as an integer row in ``[0, num_embeddings)``. Null and
    empty strings are missing values: row -1, not bad. ``bad`` marks values the encoding cannot take
    (not an integer, or outside the table for ``identity``).

    ``raw``: raw IDs instead of rows (`hash_strings_raw`, `hash_ints_raw`; ``identity``: the integer,
    not checked against the table). Missing and bad values hold -1, which is also a raw ID: tell
    missing values by `missing_strings`."""
    if encoding == "hash-string":
        rows = hash_strings_raw(values)[0] if raw else hash_strings(values, num_embeddings)
        return rows, np.zeros(rows.size, bool)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    missing = missing_strings(values)
    if raw and encoding == "identity":  # any int64, as decimal text (19 digits and a sign)
        ok = pc.fill_null(pc.match_substring_regex(values, r"^-?[0-9]{1,19}$"), False).to_numpy(zero_copy_only=False)
        dec = pc.cast(pc.if_else(pa.array(ok), values, pa.scalar("0", values.type)), pa.decimal128(20, 0))
        ok &= pc.and_(pc.greater_equal(dec, pa.scalar(-(1 << 63), pa.decimal128(20, 0))),
                      pc.less_equal(dec, pa.scalar((1 << 63) - 1, pa.decimal128(20, 0)))).to_numpy(zero_copy_only=False)
        ints = pc.cast(pc.if_else(pa.array(ok), dec, pa.scalar(0, pa.decimal128(20, 0))), pa.int64()).to_numpy()
    else:
        ok = pc.fill_null(pc.match_substring_regex(values, r"^[0-9]{1,18}$"), False).to_numpy(zero_copy_only=False)
        ints = pc.cast(pc.if_else(pa.array(ok), values, pa.scalar("0", values.type)), pa.int64()).to_numpy()
    rows, bad = encode_ints(ints, encoding, num_embeddings, raw)
    bad = (bad | ~ok) & ~missing
    return np.where(missing | bad, -1, rows), bad


def encode_ints(values: np.ndarray, encoding: str, num_embeddings: int, raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raw integer IDs int64 [n] -> (int64 rows [n], bool bad [n]): ``hash-int`` hashes (`hash_ints`);
    ``identity`` takes the value as the row (bad outside ``[0, num_embeddings)``); ``hash-string``
    hashes the decimal text, as a text input file holds the integer. ``raw``: raw IDs instead of rows,
    never bad (the unreduced hash; ``identity``: the integer itself, any int64)."""
    values = np.asarray(values, np.int64)
    if encoding == "identity":
        if raw:
            return values.copy(), np.zeros(values.size, bool)
        bad = (values < 0) | (values >= num_embeddings)
        return np.where(bad, -1, values), bad
    if encoding == "hash-int":
        h = hash_ints_raw(values)
    elif encoding == "hash-string":
        h = hash_strings_raw(pa.array(values.astype(str)))[0]  # decimal text: never missing
    else:
        raise ValueError(f"unknown ID encoding {encoding!r}")
    return (h if raw else reduce_raw(h, num_embeddings)), np.zeros(values.size, bool)


def encode_request_ids(values: list, encoding: str | None, num_embeddings: int,
                       raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """IDs as a JSON request holds them (ints and strings, mixed) -> (int64 rows [n], bool bad [n]), encoded
    as the data set was: an integer is its decimal text where the input file held text (``hash-string``),
    a decimal string an integer where it held integers (``hash-int``, ``identity``). Empty strings are
    missing values (row -1, as the converter reads empty fields). ``encoding`` None (a checkpoint from
    before encodings were recorded): an integer in the table is the row, other integers are hashed with
    `hash_ints`, strings with `hash_strings`. ``raw``: raw IDs, as a data set with raw IDs holds them
    (`encode_ints`, `encode_strings`); needs a recorded encoding."""
    if raw and encoding is None:
        raise ValueError("raw IDs need a recorded encoding (hash-string, hash-int or identity)")
    n = len(values)
    rows, bad = np.full(n, -1, np.int64), np.zeros(n, bool)
    is_str = np.fromiter((isinstance(x, str) for x in values), bool, n)
    si, ii = np.flatnonzero(is_str), np.flatnonzero(~is_str)
    if si.size:
        strs = pa.array([values[k] for k in si], pa.string())
        if encoding is None:
            rows[si] = hash_strings(strs, num_embeddings)
        else:
            rows[si], bad[si] = encode_strings(strs, encoding, num_embeddings, raw)
    if ii.size:
        ints = np.array([values[k] for k in ii], np.int64)
        if encoding is None:
            rows[ii] = np.where((ints >= 0) & (ints < num_embeddings), ints, hash_ints(ints, num_embeddings))
        else:
            rows[ii], bad[ii] = encode_ints(ints, encoding, num_embeddings, raw)
    return rows, bad


def log1p_dense(x: np.ndarray) -> np.ndarray:
    """DLRM's dense transform: ``log(1 + max(x, 0))``; NaN (missing) -> 0. Returns float32."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.log1p(np.maximum(x, 0.0)).astype(np.float32)


def transform_dense(x: np.ndarray, transform: str | None) -> np.ndarray:
    """Raw dense values float64 [...] -> the stored float32 values: ``log1p`` (`log1p_dense`), or as they are
    (``none``, or None: not recorded)."""
    return log1p_dense(x) if transform == "log1p" else np.asarray(x, np.float32)

"""Deduplication of user-side feature rows (numpy, vectorised; no per-row Python loops).

A *row* of a group of jagged features is the tuple of its ID lists, one list per
feature (e.g. a sample's user ID, its 50 recently clicked items, its country).
Rows that are equal in every feature share one entry: ``rows -> (rep [U], inverse [n])``
with ``row b == row rep[inverse[b]]``, entries in first-occurrence order.

Jagged arrays are ``(values int64 [m], offsets int64 [n + 1])`` with ``offsets[0] == 0``.
"""

from __future__ import annotations

import numpy as np

Jagged = tuple[np.ndarray, np.ndarray]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over uint64 (wrapping); the same as `tierec.data.hashing.splitmix64`,
    repeated here so that the sparse layer does not import the data layer."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64, copy=True) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def expand_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concat([arange(s, s + c) for s, c in zip(starts, counts)])``, vectorised: int64."""
    starts = np.asarray(starts, np.int64)
    counts = np.asarray(counts, np.int64)
    before = np.cumsum(counts) - counts  # output index of each range's first element
    return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - before, counts)


def jagged_take(values: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> Jagged:
    """Rows ``idx`` [k] of a jagged array, in that order -> (values [m'], offsets [k + 1])."""
    idx = np.asarray(idx, np.int64)
    lens = offsets[idx + 1] - offsets[idx]
    out_off = np.zeros(idx.size + 1, np.int64)
    np.cumsum(lens, out=out_off[1:])
    if int(out_off[-1]) == 0:
        return values[:0], out_off
    return values[expand_ranges(offsets[idx], lens)], out_off


def same_as_previous(feats: list[Jagged], n: int) -> np.ndarray:
    """bool [n]: row i equals row i - 1 in every feature (exact; row 0 is False)."""
    same = np.ones(n, bool)
    same[:1] = False
    for values, offs in feats:
        lens = np.diff(offs)
        eq_len = np.zeros(n, bool)
        eq_len[1:] = lens[1:] == lens[:-1]
        same &= eq_len
        # Element j of row i (same length L as row i - 1) sits L positions after its peer.
        row_of = np.repeat(np.arange(n), lens)
        cand = same[row_of]
        j = np.nonzero(cand)[0]
        bad = j[values[j] != values[j - lens[row_of[j]]]]
        same[row_of[bad]] = False
    return same


def row_hashes(feats: list[Jagged], n: int) -> np.ndarray:
    """uint64 [n]: an order-sensitive hash of each row's lists, joint over the K features.

    One pass over all values: value v at position p of its list in feature k adds
    ``mix(v ^ (p * c + salt_k))`` to its (feature, row) segment; each segment's sum is
    mixed with its length and feature, and the K of a row are summed (all mod 2^64).
    """
    k = len(feats)
    lens = np.stack([np.diff(o) for _, o in feats]).reshape(-1)  # [K * n], feature-major
    values = np.concatenate([v for v, _ in feats]).astype(np.int64, copy=False)
    seg = np.repeat(np.arange(k * n), lens)
    starts = np.cumsum(lens) - lens
    salt = (np.arange(1, k + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)).repeat(n)  # [K * n]
    with np.errstate(over="ignore"):
        pos = (np.arange(values.size, dtype=np.int64) - starts[seg]).view(np.uint64)
        e = _mix64(values.view(np.uint64) ^ (pos * np.uint64(0xD6E8FEB86659FD93) + salt[seg]))
        sums = np.zeros(k * n, np.uint64)
        nz = np.flatnonzero(lens)
        if nz.size:
            sums[nz] = np.add.reduceat(e, starts[nz])
        per = _mix64(sums ^ _mix64(lens.view(np.uint64) + salt))
        return per.reshape(k, n).sum(0, dtype=np.uint64)


def dedup_rows(feats: list[Jagged], n: int, keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Joint deduplication of ``n`` rows of ``feats`` -> (rep int64 [U], inverse int64 [n]).

    Exact: rows are grouped by ``keys`` (int64 [n], e.g. session IDs, which should
    determine the rows; the groups' representatives are then deduplicated by content) or
    else by a 64-bit hash of the rows, then every row is compared with its representative.
    Should any differ (rows that vary within a session; a hash collision, ~n^2 / 2^64), keys
    fall back to the hash, and the hash to merging equal neighbours only (`same_as_previous`), which is exact by construction.
    """
    if n == 0 or not feats:
        return np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64)
    if keys is not None:
        rep, inverse = _group(keys)
        if rep.size < n and _all_equal(feats, rep[inverse]):
            # different keys may still hold equal rows: deduplicate the U representatives by content
            rep2, inv2 = dedup_rows([jagged_take(v, o, rep) for v, o in feats], rep.size)
            return rep[rep2], inv2[inverse]
    rep, inverse = _group(row_hashes(feats, n))
    if rep.size < n and not _all_equal(feats, rep[inverse]):
        head = ~same_as_previous(feats, n)
        inverse = np.cumsum(head) - 1
        rep = np.flatnonzero(head).astype(np.int64)
    return rep, inverse


def _group(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with equal ``h`` -> (first row of each group, in first-occurrence order; group of each row)."""
    _, first, inv = np.unique(h, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # entries in first-occurrence order
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return first[order].astype(np.int64), rank[inv.reshape(-1)].astype(np.int64)


def _all_equal(feats: list[Jagged], src: np.ndarray) -> bool:
    """Row b equals row src[b] for every b, in every feature."""
    for values, offs in feats:
        v2, o2 = jagged_take(values, offs, src)
        if not (np.array_equal(o2, offs) and np.array_equal(v2, values)):
            return False
    return True

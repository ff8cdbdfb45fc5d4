"""User-item interaction graphs for graph recommenders (LightGCN): a seeded per-user train/test split, BPR triples.

Input: a sequence data set (`tierec data convert --format sequences`, `tierec.data.sequences`): user k
(0-based, the data set's order) interacted with items ``history(k)`` (IDs 1..num_items). The graph
ignores order and repeats: its edges are the distinct (user, item) pairs, item ID i as item row i - 1.

Split (`split_interactions`, reproducible from ``(seed, test_ratio)`` alone): each user's distinct items
are ordered by one uniform draw per pair (``numpy.random.default_rng([seed, 2])``, drawn over the pairs
sorted by (user, item)); the first ``floor(test_ratio * n + 0.5)`` of a user's n items (at most n - 1,
so every user keeps one training item) are that user's test items, the rest training items. This is
the LightGCN paper's protocol (a random 80/20 of each user's interactions), not leave-last-out.

Training triples (`BprBatches`): one epoch = every training pair once, in an order drawn from
``(seed, epoch)``; each pair (u, i) gets one negative j drawn uniformly from the items u has no
training pair with (redrawn until so; test items may be drawn: they are unknown while training).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from tierec.data.sequences import SequenceData
from tierec.errors import ConfigError, DataError

SPLIT_STREAM = 2  # rng stream of the split: default_rng([seed, SPLIT_STREAM])
EPOCH_STREAM = 2000  # rng stream of epoch e's order and negatives: default_rng([seed, EPOCH_STREAM + e])


@dataclass
class GraphSplit:
    """Training and test pairs of a user-item graph; users 0..num_users-1, items 0..num_items-1.

    Pairs are sorted by (user, item) and distinct; ``train_offsets`` [U+1] / ``test_offsets`` [U+1]
    delimit each user's pairs (user u's training items are ``train_items[train_offsets[u]:train_offsets[u+1]]``)."""

    num_users: int
    num_items: int
    train_users: np.ndarray  # int64 [E]
    train_items: np.ndarray  # int64 [E]
    test_users: np.ndarray  # int64 [T]
    test_items: np.ndarray  # int64 [T]
    seed: int = 0
    test_ratio: float = 0.2

    def __post_init__(self):
        self.train_offsets = _offsets(self.train_users, self.num_users)
        self.test_offsets = _offsets(self.test_users, self.num_users)
        self._train_keys = self.train_users * self.num_items + self.train_items  # sorted (pairs are)

    @property
    def test_user_ids(self) -> np.ndarray:
        """Users with at least one test item (the evaluated users), sorted."""
        return np.flatnonzero(np.diff(self.test_offsets) > 0)

    def in_train(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """bool, same shape: whether (user, item) is a training pair (broadcast)."""
        k = np.asarray(users, np.int64) * self.num_items + np.asarray(items, np.int64)
        if len(self._train_keys) == 0:
            return np.zeros(k.shape, bool)
        pos = np.minimum(np.searchsorted(self._train_keys, k), len(self._train_keys) - 1)
        return self._train_keys[pos] == k

    def sample_negatives(self, rng: np.random.Generator, users: np.ndarray) -> np.ndarray:
        """One item per user in ``users`` [B], uniform over the items the user has no training pair with:
        one draw of B items, then rounds redrawing the positions still bad (in order) until none is left."""
        out = rng.integers(0, self.num_items, size=len(users), dtype=np.int64)
        bad = np.flatnonzero(self.in_train(users, out))
        while len(bad):
            out[bad] = rng.integers(0, self.num_items, size=len(bad), dtype=np.int64)
            bad = bad[self.in_train(users[bad], out[bad])]
        return out

    def summary(self) -> dict:
        return {"users": self.num_users, "items": self.num_items, "train_pairs": int(len(self.train_users)),
                "test_pairs": int(len(self.test_users)), "test_users": int(len(self.test_user_ids)),
                "seed": self.seed, "test_ratio": self.test_ratio}


def _offsets(users: np.ndarray, num_users: int) -> np.ndarray:
    off = np.zeros(num_users + 1, np.int64)
    np.cumsum(np.bincount(users, minlength=num_users), out=off[1:])
    return off


def split_interactions(data: SequenceData, test_ratio: float = 0.2, seed: int = 0) -> GraphSplit:
    """The per-user split of the module doc over ``data``'s distinct (user, item) pairs."""
    if not 0 <= test_ratio < 1:
        raise ConfigError(f"test_ratio must be in [0, 1), got {test_ratio}")
    num_users, num_items = data.num_users, int(data.num_items)
    users = np.repeat(np.arange(num_users, dtype=np.int64), np.diff(data.offsets))
    keys = np.unique(users * num_items + (data.items - 1))  # distinct pairs, sorted by (user, item)
    users, items = keys // num_items, keys % num_items
    draw = np.random.default_rng([seed, SPLIT_STREAM]).random(len(keys))
    order = np.lexsort((draw, users))  # by user, then by the draw
    n = np.bincount(users, minlength=num_users)
    n_test = np.minimum(np.floor(test_ratio * n + 0.5).astype(np.int64), np.maximum(n - 1, 0))
    start = np.zeros(num_users, np.int64)
    start[1:] = np.cumsum(n)[:-1]
    rank = np.empty(len(keys), np.int64)
    rank[order] = np.arange(len(keys), dtype=np.int64) - np.repeat(start, n)
    test = rank < n_test[users]
    return GraphSplit(num_users, num_items, users[~test], items[~test], users[test], items[test], seed, test_ratio)


class BprBatches:
    """Batches of BPR triples ``(users, positives, negatives)``, int64 [B] each (module doc)."""

    def __init__(self, split: GraphSplit, batch_size: int):
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be > 0, got {batch_size}")
        if len(split.train_users) == 0:
            raise DataError("the split has no training pairs: nothing to train on")
        if int(np.diff(split.train_offsets).max()) >= split.num_items:
            raise DataError("a user has a training pair with every item: no negative to sample")
        self.split, self.batch_size = split, int(batch_size)

    def __len__(self) -> int:
        return -(-len(self.split.train_users) // self.batch_size)

    def epoch(self, seed: int, epoch: int, shuffle: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The batches of epoch ``epoch``, from (seed, epoch) alone."""
        s = self.split
        rng = np.random.default_rng([seed, EPOCH_STREAM + epoch])
        order = rng.permutation(len(s.train_users)) if shuffle else np.arange(len(s.train_users))
        for b in range(0, len(order), self.batch_size):
            rows = order[b:b + self.batch_size]
            users = s.train_users[rows]
            yield users, s.train_items[rows], s.sample_negatives(rng, users)

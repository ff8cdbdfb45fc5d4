"""Sequence data sets for sequential recommenders (SASRec): ``user item`` histories, leave-one-out.

Input (`tierec data convert --format sequences`): one ``user item`` pair a line, two positive
integers separated by white space, each user's lines in time order (users may interleave; a stable
sort by user keeps each user's order). Blank lines are skipped; any other malformed line stops the
conversion with ``FILE:LINE: reason`` (exit 2), or is counted and skipped with ``skip_bad_rows``.

Data set directory::

    DIR/sequences.npz   items int64 [N] (IDs from 1), offsets int64 [U+1] (user k's history is
                        items[offsets[k]:offsets[k+1]]), users int64 [U] (the input's user IDs, sorted)
    DIR/manifest.json   format, counts, num_items, sha256 of sequences.npz and of the input file

`load_sequences` checks the npz's sha256 and the arrays' consistency, and loads it with
``allow_pickle=False``.

Protocol (`SequenceData`): a user with at least `MIN_EVAL_LENGTH` interactions has the last item as
test target, the second last as validation target and the rest as training history; a shorter
user's whole history is training history. Each evaluated target is ranked against
`NUM_EVAL_NEGATIVES` items drawn uniformly (with replacement) from the items the user never
interacted with, by `eval_negatives` from a fixed seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tierec.errors import DataError, TierecError
from tierec.fsio import atomic_write_bytes, sha256_file

log = logging.getLogger(__name__)

FORMAT = "tierec-sequences"
VERSION = 1
NPZ = "sequences.npz"
MANIFEST = "manifest.json"
MIN_EVAL_LENGTH = 4  # users with at least this many interactions have a validation and a test target
NUM_EVAL_NEGATIVES = 100
MAX_EXAMPLES = 5
SPLITS = ("valid", "test")


# --------------------------------------------------------------------------- reading and converting
def read_pairs(path: str | Path, skip_bad_rows: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(users int64 [N], items int64 [N], stats)`` of a ``user item`` file, in file order.
    ``stats``: rows_read, bad_rows_skipped, bad_row_examples."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot open ({e.strerror or e})", str(path)) from None
    users: list[int] = []
    items: list[int] = []
    bad = 0
    examples: list[str] = []
    with f:
        for lineno, raw in enumerate(f, 1):
            parts = raw.split()
            if not parts:
                continue
            reason = None
            if len(parts) != 2:
                reason = f"expected two fields 'user item', got {len(parts)}"
            elif not (parts[0].isdigit() and parts[1].isdigit()):
                reason = f"expected two positive integers 'user item', got {raw.strip()[:60]!r}"[:200]
            else:
                u, i = int(parts[0]), int(parts[1])
                if u <= 0 or i <= 0 or u >= 1 << 62 or i >= 1 << 62:
                    reason = f"IDs must be positive integers below 2**62, got {u} {i}"
            if reason is not None:
                if not skip_bad_rows:
                    raise DataError(reason + " (use --skip-bad-rows to skip malformed rows)", str(path), lineno)
                bad += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append(f"{path}:{lineno}: {reason}")
                continue
            users.append(u)
            items.append(i)
    if not users:
        raise DataError("no interactions ('user item' lines) found", str(path))
    stats = {"rows_read": len(users) + bad, "bad_rows_skipped": bad, "bad_row_examples": examples}
    return np.asarray(users, np.int64), np.asarray(items, np.int64), stats


def group_by_user(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(user_ids [U] sorted, items [N] grouped by user in input order, offsets [U+1])``."""
    order = np.argsort(users, kind="stable")
    su = users[order]
    uid, starts = np.unique(su, return_index=True)
    offsets = np.append(starts, len(su)).astype(np.int64)
    return uid.astype(np.int64), items[order].astype(np.int64), offsets


def convert_sequences(input_path: str | Path, out_dir: str | Path, skip_bad_rows: bool = False) -> dict:
    """Convert a ``user item`` file into a sequence data set at ``out_dir``; returns its manifest."""
    input_path, out = Path(input_path), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TierecError(f"{out}: exists and is not a directory")
    if out.exists():
        foreign = [e.name for e in out.iterdir() if not e.name.startswith(".") and e.name not in (NPZ, MANIFEST)]
        if foreign:
            raise TierecError(f"{out}: directory exists and holds other files ({', '.join(sorted(foreign)[:3])}); "
                              "choose an empty or new --out")
    users, items, stats = read_pairs(input_path, skip_bad_rows)
    uid, grouped, offsets = group_by_user(users, items)
    out.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    np.savez(buf, items=grouped, offsets=offsets, users=uid)
    data = buf.getvalue()
    atomic_write_bytes(out / NPZ, data)
    lengths = np.diff(offsets)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_users": int(len(uid)),
        "num_items": int(grouped.max()),
        "distinct_items": int(len(np.unique(grouped))),
        "num_interactions": int(len(grouped)),
        "eval_users": int((lengths >= MIN_EVAL_LENGTH).sum()),
        "files": {NPZ: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}},
        "source": {"path": str(input_path.resolve()), "format": "sequences", "bytes": input_path.stat().st_size,
                   "sha256": sha256_file(input_path), **stats},
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    log.info("%s: %d users, %d items, %d interactions", out, manifest["num_users"], manifest["num_items"],
             manifest["num_interactions"])
    return manifest


def is_sequence_dataset(path: str | Path) -> bool:
    p = Path(path) / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_sequences(path: str | Path, max_users: int | None = None) -> SequenceData:
    """Load and verify a sequence data set (``max_users``: only the first users, for quick runs)."""
    d = Path(path)
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise DataError("not a sequence data set (no manifest.json; make one with `tierec data convert --format "
                        "sequences`)", str(d))
    try:
        m = json.loads(mpath.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"manifest is not valid JSON ({e})", str(mpath)) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"not a sequence data set (format={m.get('format') if isinstance(m, dict) else None!r})",
                        str(mpath))
    npz = d / NPZ
    expect = (m.get("files") or {}).get(NPZ) or {}
    if not npz.is_file():
        raise DataError("missing", str(npz))
    data = npz.read_bytes()
    if len(data) != expect.get("bytes") or hashlib.sha256(data).hexdigest() != expect.get("sha256"):
        raise DataError("size or sha256 does not match the manifest (corrupt or changed file)", str(npz))
    import io

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            items, offsets, users = z["items"], z["offsets"], z["users"]
    except (ValueError, KeyError, OSError) as e:
        raise DataError(f"cannot read ({e})", str(npz)) from None
    n_items = int(m["num_items"])
    ok = (items.dtype == np.int64 and offsets.dtype == np.int64 and users.dtype == np.int64
          and items.ndim == offsets.ndim == users.ndim == 1 and len(offsets) == len(users) + 1
          and len(offsets) > 0 and offsets[0] == 0 and offsets[-1] == len(items) and bool(np.all(np.diff(offsets) >= 0))
          and len(items) == m["num_interactions"] and len(users) == m["num_users"]
          and (len(items) == 0 or (int(items.min()) >= 1 and int(items.max()) <= n_items)))
    if not ok:
        raise DataError("arrays are inconsistent with each other or with the manifest", str(npz))
    if max_users is not None and max_users < len(users):
        offsets = offsets[:max_users + 1]
        items, users = items[:offsets[-1]], users[:max_users]
    return SequenceData(items, offsets, n_items, users=users, manifest=m)


# --------------------------------------------------------------------------- the protocol
def _left_pad(seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    """[len(seqs), max_len]: the last ``max_len`` items of each sequence, right-aligned, 0 before."""
    out = np.zeros((len(seqs), max_len), np.int64)
    for r, s in enumerate(seqs):
        s = s[-max_len:]
        if len(s):
            out[r, max_len - len(s):] = s
    return out


@dataclass
class SequenceData:
    """Users' histories and the leave-one-out protocol over them (module doc)."""

    items: np.ndarray  # int64 [N], IDs 1..num_items
    offsets: np.ndarray  # int64 [U+1]
    num_items: int
    users: np.ndarray | None = None  # the input's user IDs [U]
    manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        self.items = np.asarray(self.items, np.int64)
        self.offsets = np.asarray(self.offsets, np.int64)
        lengths = np.diff(self.offsets)
        self.eval_users = np.flatnonzero(lengths >= MIN_EVAL_LENGTH)  # user indices with valid/test targets
        held = np.zeros(len(lengths), np.int64)
        held[self.eval_users] = 2
        self.train_lengths = lengths - held
        # (user index, item) of every interaction, as one sorted key: "did user u interact with item i"
        users = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        self._keys = np.unique(users * (self.num_items + 1) + self.items)

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    def history(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u]:self.offsets[u + 1]]

    def train_history(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u]:self.offsets[u] + self.train_lengths[u]]

    def targets(self, split: str) -> np.ndarray:
        """[E] the target item of every evaluated user (`eval_users`) for ``split``."""
        if split not in SPLITS:
            raise TierecError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        ends = self.offsets[self.eval_users + 1]
        return self.items[ends - (2 if split == "valid" else 1)]

    def eval_inputs(self, split: str, max_len: int) -> np.ndarray:
        """[E, max_len] the history each evaluated user's ``split`` target is predicted from: the training
        history for valid, the training history plus the validation target for test; left-padded with 0."""
        extra = 1 if split == "test" else 0
        return _left_pad([self.items[self.offsets[u]:self.offsets[u] + self.train_lengths[u] + extra]
                          for u in self.eval_users], max_len)

    def interacted(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """bool, same shape: whether user index ``users`` ever interacted with ``items`` (broadcast)."""
        k = users * (self.num_items + 1) + items
        pos = np.minimum(np.searchsorted(self._keys, k), len(self._keys) - 1)
        return self._keys[pos] == k

    def sample_unseen(self, rng: np.random.Generator, users: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Items uniform over 1..num_items, redrawn until the user never interacted with them.

        ``users`` broadcasts against ``shape``. One draw of ``shape`` items, then rounds redrawing the
        positions still bad (row-major order) until none is left."""
        out = rng.integers(1, self.num_items + 1, size=shape, dtype=np.int64)
        users = np.broadcast_to(users, shape)
        bad = self.interacted(users, out)
        while bad.any():
            idx = np.flatnonzero(bad)
            uf = users.reshape(-1)[idx]
            new = rng.integers(1, self.num_items + 1, size=len(idx), dtype=np.int64)
            out.reshape(-1)[idx] = new
            still = self.interacted(uf, new)
            bad = np.zeros(shape, bool)
            bad.reshape(-1)[idx[still]] = True
        return out

    def eval_negatives(self, split: str, seed: int = 0, num: int = NUM_EVAL_NEGATIVES) -> np.ndarray:
        """[E, num] negatives of every evaluated user for ``split``: the same for the same seed."""
        if split not in SPLITS:
            raise TierecError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        lengths = np.diff(self.offsets)[self.eval_users]
        if len(lengths) and int(lengths.max()) >= self.num_items:  # a user who saw every item has no negatives
            if max(len(np.unique(self.history(u))) for u in self.eval_users) >= self.num_items:
                raise DataError("a user interacted with every item: no negatives to rank against")
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        return self.sample_unseen(rng, self.eval_users[:, None], (len(self.eval_users), num))

    # ----------------------------------------------------------------------- training batches
    def training_arrays(self, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(users [T], inputs [T, L], positives [T, L])`` over the users with at least 2 training items:
        inputs = training history minus its last item, positives = it minus its first (next-item targets),
        the last ``max_len`` of each, left-padded with 0. Built once (a loop over users)."""
        train_users = np.flatnonzero(self.train_lengths >= 2)
        hist = [self.train_history(int(u)) for u in train_users]
        return (train_users, _left_pad([h[:-1] for h in hist], max_len), _left_pad([h[1:] for h in hist], max_len))


class SequenceBatches:
    """Training batches: ``(inputs, positives, negatives)`` int64 [B, L] each; one sampled negative per
    non-padding position (an item the user never interacted with), 0 at padding. Vectorised per batch."""

    def __init__(self, data: SequenceData, max_len: int, batch_size: int):
        self.data, self.max_len, self.batch_size = data, int(max_len), int(batch_size)
        self.users, self.inputs, self.positives = data.training_arrays(self.max_len)
        if len(self.users) == 0:
            raise DataError("no user has two training interactions: nothing to train on")

    def __len__(self) -> int:
        return -(-len(self.users) // self.batch_size)

    def epoch(self, seed: int, epoch: int, shuffle: bool = True):
        """The batches of epoch ``epoch`` (every training user once), from (seed, epoch) alone."""
        rng = np.random.default_rng([seed, 1000 + epoch])
        order = rng.permutation(len(self.users)) if shuffle else np.arange(len(self.users))
        for s in range(0, len(order), self.batch_size):
            rows = order[s:s + self.batch_size]
            inputs, pos = self.inputs[rows], self.positives[rows]
            neg = self.data.sample_unseen(rng, self.users[rows][:, None], pos.shape)
            neg[pos == 0] = 0
            yield inputs, pos, neg

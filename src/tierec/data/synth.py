"""`tierec data synth`: a seeded, Criteo-shaped synthetic data set generator.

Model (details, calibration and measured figures in docs/synth.md):

- **Sparse features** ``C1..CK``, one embedding table each (default: the 26 published
  Criteo Kaggle cardinalities, capped at ``max_cardinality``). A row's list of IDs has a
  length drawn from a per-feature length distribution (``fixed:1`` = single-hot, as in
  Criteo; ``uniform:A-B``; ``poisson:M``; ``poisson0:M``), or ``mlperf``: the fixed multi-hot
  sizes of MLPerf's DLRM-DCNv2 reference (`MLPERF_MULTI_HOT`, 26 features).
- **Skewed popularity**: each ID is drawn i.i.d. from a popularity profile over the
  table's *ranks* (``p(r) ∝ r^-alpha (1 + r/knee)^-gamma``, mixed with a 1 % uniform share of
  "fresh" IDs), sampled in O(1) with an alias table over the first 2^18 ranks plus a continuous
  power-law tail, then mapped to a row by a keyed Feistel permutation of ``[0, num_embeddings)``
  (hot rows are scattered over the table). ``zipf="auto"`` uses a profile calibrated to Meta's
  published per-batch reuse statistics; a number uses a plain Zipf law with that exponent.
- **Dense features** ``I1..I13``: log-normal counts, written after ``log(1 + max(x, 0))``
  (as `tierec data convert` writes Criteo).
- **Labels** from a hidden model: ``logit = bias + first-order effects + pairwise latent
  dot products + f(dense)``, where each ID's scalar effect and latent vector are hashes of
  ``(seed, feature, id)`` (no per-row tables), damped by ``sqrt(10,000 / N)`` in tables of
  ``N > 10,000`` rows; scaled so the positive rate is ~25 %.
  `ground_truth` recomputes the logits of any chunk (Bayes AUC, first-order-only AUC).
- **Several labels** (``tasks = K > 1``): label 0 is the click label above; labels ``1..K-1`` are
  conversion-style labels, ``click & Bernoulli(sigmoid(logit_k))``, whose logit mixes the click
  model's score (shared) with independent per-ID and dense effects of their own (task-specific),
  calibrated so that ``P(label_k | click)`` is ~`CONVERSION_RATE` (`TaskModel`).
- **Sessions** (``session_length > 1`` or ``user_features > 0``): rows come in contiguous
  sessions of geometric length; the first ``user_features`` sparse features are constant
  within a session (side ``user``) and the data set gets a ``session`` column.
- **Raw IDs** (``raw_ids``): each ID ``x`` of feature ``i`` is written as
  ``splitmix64(x ^ key_i)`` (a bijection of the 64-bit IDs per feature; any int64), the schema
  marks the features ``raw`` with the cardinality as ``num_embeddings``; labels and everything
  else are those of the same config without it (`Synthesizer.raw_ids`, `Synthesizer.ids`).

Output is a pure function of the config (seed included) and the numpy version: rows are
made in blocks of `BLOCK_ROWS`, block ``b`` of split ``s`` from ``SeedSequence([seed, s, b])``,
so any ``--rows`` streams in constant memory and the same seed gives byte-identical shards.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from tierec.data.dataset import SPLITS, Chunk, Schema, SparseFeature, default_label_names, prepare_output_dir
from tierec.data.hashing import splitmix64, splitmix64_inverse
from tierec.data.readers import CRITEO_KAGGLE_CARDINALITIES
from tierec.errors import ConfigError, TierecError

#: Published cardinalities of the 26 categorical features of Criteo Kaggle (C1..C26).
BLOCK_ROWS = 65536  # rows generated per block (part of the reproducibility contract)
HEAD_RANKS = 1 << 18  # ranks sampled exactly (alias table); beyond: continuous power-law tail
REF_BATCH = 65536  # batch size the "auto" profile is calibrated at (Meta's 2021 statistics)

#: The "auto" popularity profile, fitted to Meta's 2021 statistics (docs/synth.md, `fit_auto_profile`).
#: For a table of N rows with L = REF_BATCH * (mean IDs per sample) draws per reference batch:
#: alpha = clip(a0 + a1 * log10(N / L), 0, 3), knee = rho * L, p(r) ∝ r^-alpha (1 + r/knee)^-gamma.
AUTO_PROFILE = {"a0": 0.501, "a1": -0.0831, "rho": 1.20, "gamma": 7.31, "fresh": 0.01}

SPLIT_CODES = {"train": 0, "test": 1, "pilot": 2}
MAX_TASKS = 8  # labels per sample (`SynthConfig.tasks`)
#: ``--multi-hot mlperf``: IDs per row of C1..C26 in MLPerf Training's DLRM-DCNv2 reference (the Criteo 1TB
#: multi-hot data set's fixed pooling factors).
MLPERF_MULTI_HOT = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
_MASK64 = 0xFFFFFFFFFFFFFFFF


# --------------------------------------------------------------------------- length distributions
@dataclass(frozen=True)
class LengthSpec:
    """How many IDs a row has for one feature: ``fixed:K``, ``uniform:A-B``, ``poisson:M``, ``poisson0:M``.

    ``poisson:M`` is ``1 + Poisson(M - 1)`` (never empty, mean M, needs M >= 1);
    ``poisson0:M`` is ``Poisson(M)`` (may be empty: a missing value).
    """

    kind: str
    a: float
    b: float = 0.0

    @staticmethod
    def parse(text: str, what: str = "multi_hot") -> LengthSpec:
        t = text.strip().lower()
        try:
            if m := re.fullmatch(r"fixed:(\d+)", t):
                k = int(m.group(1))
                if k < 1:
                    raise ValueError("fixed length must be >= 1")
                return LengthSpec("fixed", k)
            if m := re.fullmatch(r"uniform:(\d+)-(\d+)", t):
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi or hi < 1:
                    raise ValueError("uniform:A-B needs 0 <= A <= B and B >= 1")
                return LengthSpec("uniform", lo, hi)
            if m := re.fullmatch(r"poisson(0?):([0-9.eE+-]+)", t):
                mean = float(m.group(2))
                if m.group(1) == "0":
                    if not mean > 0 or not math.isfinite(mean):
                        raise ValueError("poisson0:M needs M > 0")
                    return LengthSpec("poisson0", mean)
                if not mean >= 1 or not math.isfinite(mean):
                    raise ValueError("poisson:M needs M >= 1 (use poisson0:M for lists that may be empty)")
                return LengthSpec("poisson", mean)
        except ValueError as e:
            raise ConfigError(f"{what}: bad length distribution {text!r}: {e}") from None
        raise ConfigError(f"{what}: bad length distribution {text!r} "
                          "(expected fixed:K, uniform:A-B, poisson:M or poisson0:M)")

    @property
    def mean(self) -> float:
        if self.kind == "fixed":
            return float(self.a)
        if self.kind == "uniform":
            return (self.a + self.b) / 2.0
        return float(self.a)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, int(self.a), np.int64)
        if self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, size=n, dtype=np.int64)
        if self.kind == "poisson":
            return 1 + rng.poisson(self.a - 1.0, size=n).astype(np.int64)
        return rng.poisson(self.a, size=n).astype(np.int64)

    def __str__(self) -> str:
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}-{int(self.b)}"
        if self.kind == "fixed":
            return f"fixed:{int(self.a)}"
        return f"{self.kind}:{self.a:g}"


# --------------------------------------------------------------------------- config
@dataclass
class SynthConfig:
    """Every knob of the generator; validated on construction (errors name the field)."""

    rows: int = 1_000_000  # total rows, train + test
    test_fraction: float = 0.1  # the last round(rows * test_fraction) rows form the test split
    seed: int = 0
    num_sparse: int | None = None  # default: len(cardinalities), or 26
    cardinalities: list[int] | None = None  # default: Criteo Kaggle's, cycled to num_sparse; one value: all
    max_cardinality: int = 100_000  # cap on every table size; 0: no cap
    num_dense: int = 13
    multi_hot: str = "fixed:1"  # 'SPEC' (or 'mlperf') for all, plus optional 'C3=SPEC' overrides, comma-separated
    zipf: str | float = "auto"  # 'auto' (calibrated profile) or a plain Zipf exponent >= 0
    session_length: float = 1.0  # mean rows per session (geometric); 1: no sessions
    user_features: int = 0  # the first K sparse features are user-side (constant within a session)
    positive_rate: float = 0.25
    signal: float = 1.0  # multiplies the label logit's parts (LOGIT_STD): > 1 is easier to learn
    rows_per_file: int = 1 << 20
    row_group_size: int = 65536
    raw_ids: bool = False  # write raw 64-bit IDs (a per-feature bijection of the IDs), schema raw=True
    tasks: int = 1  # labels per sample: the click label, then conversion-style labels (`TaskModel`)
    progress: bool = True

    def __post_init__(self):
        def req(name: str, ok: bool, msg: str):
            if not ok:
                raise ConfigError(f"{name}: {msg}, got {getattr(self, name)!r}")

        for name in ("rows", "rows_per_file", "row_group_size"):
            v = getattr(self, name)
            req(name, isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0, "must be an integer > 0")
        req("test_fraction", isinstance(self.test_fraction, (int, float)) and 0.0 <= self.test_fraction < 1.0,
            "must be in [0, 1)")
        req("seed", isinstance(self.seed, (int, np.integer)) and 0 <= self.seed <= _MASK64, "must be an integer >= 0")
        req("max_cardinality", isinstance(self.max_cardinality, (int, np.integer)) and self.max_cardinality >= 0,
            "must be an integer >= 0 (0: no cap)")
        req("num_dense", isinstance(self.num_dense, (int, np.integer)) and self.num_dense >= 0,
            "must be an integer >= 0")
        if self.num_sparse is not None:
            req("num_sparse", isinstance(self.num_sparse, (int, np.integer)) and self.num_sparse > 0,
                "must be an integer > 0")
        if self.cardinalities is not None:
            if isinstance(self.cardinalities, (int, np.integer)):
                self.cardinalities = [int(self.cardinalities)]
            cards = list(self.cardinalities)
            req("cardinalities", len(cards) > 0, "must not be empty")
            req("cardinalities", all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c > 0
                                     for c in cards), "every table size must be an integer > 0")
            if self.num_sparse is not None and len(cards) not in (1, self.num_sparse):
                raise ConfigError(f"cardinalities: {len(cards)} values given for num_sparse={self.num_sparse} "
                                  "features (give one value, or one per feature)")
        req("signal", isinstance(self.signal, (int, float)) and self.signal > 0, "must be > 0")
        req("raw_ids", isinstance(self.raw_ids, (bool, np.bool_)), "must be true or false")
        req("tasks", isinstance(self.tasks, (int, np.integer)) and not isinstance(self.tasks, bool)
            and 1 <= self.tasks <= MAX_TASKS, f"must be an integer in [1, {MAX_TASKS}] (labels per sample)")
        self.tasks = int(self.tasks)
        self.raw_ids = bool(self.raw_ids)
        req("positive_rate", isinstance(self.positive_rate, (int, float)) and 0.0 < self.positive_rate < 1.0,
            "must be in (0, 1)")
        req("session_length", isinstance(self.session_length, (int, float)) and math.isfinite(self.session_length)
            and self.session_length >= 1.0, "must be >= 1 (mean rows per session)")
        k = self.num_features
        req("user_features", isinstance(self.user_features, (int, np.integer)) and 0 <= self.user_features <= k,
            f"must be an integer in [0, num_sparse={k}]")
        if isinstance(self.zipf, str) and self.zipf.strip().lower() != "auto":
            try:
                self.zipf = float(self.zipf)
            except ValueError:
                raise ConfigError(f"zipf: must be 'auto' or a number >= 0, got {self.zipf!r}") from None
        if not isinstance(self.zipf, str):
            req("zipf", isinstance(self.zipf, (int, float)) and math.isfinite(self.zipf) and 0 <= self.zipf <= 10,
                "must be 'auto' or a number in [0, 10]")
            self.zipf = float(self.zipf)
        else:
            self.zipf = "auto"
        self.length_specs()  # validates multi_hot

    # ----- resolved views
    @property
    def num_features(self) -> int:
        if self.num_sparse is not None:
            return int(self.num_sparse)
        if self.cardinalities is not None and len(self.cardinalities) > 1:
            return len(self.cardinalities)
        return len(CRITEO_KAGGLE_CARDINALITIES)

    @property
    def feature_names(self) -> list[str]:
        return [f"C{i + 1}" for i in range(self.num_features)]

    @property
    def dense_names(self) -> list[str]:
        return [f"I{i + 1}" for i in range(self.num_dense)]

    def table_sizes(self) -> list[int]:
        k = self.num_features
        if self.cardinalities is None:
            raw = [CRITEO_KAGGLE_CARDINALITIES[i % len(CRITEO_KAGGLE_CARDINALITIES)] for i in range(k)]
        elif len(self.cardinalities) == 1:
            raw = [int(self.cardinalities[0])] * k
        else:
            raw = [int(c) for c in self.cardinalities]
        cap = int(self.max_cardinality)
        return [min(c, cap) if cap else c for c in raw]

    def length_specs(self) -> list[LengthSpec]:
        """Each feature's length distribution from ``multi_hot``: a default (a SPEC, or ``mlperf``: the fixed
        sizes `MLPERF_MULTI_HOT`, 26 features only) plus ``Cn=SPEC`` overrides."""
        names = self.feature_names
        default = LengthSpec("fixed", 1)
        base: list[LengthSpec] | None = None
        per: dict[int, LengthSpec] = {}
        items = [s for s in str(self.multi_hot).split(",") if s.strip()]
        if not items:
            raise ConfigError("multi_hot: empty length distribution")
        spec_given = False
        for item in items:
            if "=" in item:
                name, spec = item.split("=", 1)
                name = name.strip()
                if name not in names:
                    raise ConfigError(f"multi_hot: unknown feature {name!r} (features are C1..C{len(names)})")
                per[names.index(name)] = LengthSpec.parse(spec)
            elif item.strip().lower() == "mlperf":
                if len(names) != len(MLPERF_MULTI_HOT):
                    raise ConfigError(f"multi_hot: 'mlperf' sets the multi-hot sizes of MLPerf DLRM-DCNv2's "
                                      f"{len(MLPERF_MULTI_HOT)} features, but num_sparse is {len(names)} "
                                      f"(use {len(MLPERF_MULTI_HOT)} sparse features)")
                base = [LengthSpec("fixed", k) for k in MLPERF_MULTI_HOT]
            else:
                default = LengthSpec.parse(item)
                spec_given = True
        if base is not None and spec_given:
            raise ConfigError(f"multi_hot: {self.multi_hot!r} gives both 'mlperf' and a SPEC for all features "
                              "(give one of them, plus Cn=SPEC overrides)")
        return [per.get(i, base[i] if base is not None else default) for i in range(len(names))]

    @property
    def sessions(self) -> bool:
        return self.session_length > 1.0 or self.user_features > 0

    def split_rows(self) -> dict[str, int]:
        n_test = int(round(self.rows * float(self.test_fraction)))
        return {"train": self.rows - n_test, "test": n_test}

    def schema(self) -> Schema:
        sp = [SparseFeature(n, s, "user" if i < self.user_features else "item", raw=self.raw_ids)
              for i, (n, s) in enumerate(zip(self.feature_names, self.table_sizes(), strict=True))]
        return Schema(self.dense_names, sp, "session" if self.sessions else None,
                      labels=default_label_names(self.tasks))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("progress")
        d["table_sizes"] = self.table_sizes()
        d["multi_hot_resolved"] = [str(s) for s in self.length_specs()]
        return d


# --------------------------------------------------------------------------- sampling machinery
def _u64(x: int) -> np.uint64:
    return np.uint64(int(x) & _MASK64)


def _key(*parts: int) -> np.uint64:
    """A 64-bit key from integers, by chained splitmix64."""
    h = np.array([0x5EED], np.uint64)
    with np.errstate(over="ignore"):
        for p in parts:
            h = splitmix64(h ^ np.array([int(p) & _MASK64], np.uint64))
    return h[0]


def _unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> float64 uniform in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table for probabilities ``p`` (vectorised construction, O(n log n)).

    Buckets are filled in index order by a sweep over "light" (``n p < 1``) and "heavy"
    items, written with cumulative sums: light ``i`` takes its alias from the heavy item
    whose cumulative excess covers the start of its deficit; a heavy item that runs out
    takes its alias from the next heavy item. Returns (prob float64 [n], alias int64 [n]).
    """
    p = np.asarray(p, np.float64)
    n = p.size
    q = p * (n / p.sum())
    prob = np.ones(n)
    alias = np.arange(n, dtype=np.int64)
    light = np.flatnonzero(q < 1.0)
    heavy = np.flatnonzero(q >= 1.0)
    if light.size == 0 or heavy.size == 0:
        return prob, alias
    d = 1.0 - q[light]
    dend = np.cumsum(d)
    e = np.cumsum(q[heavy] - 1.0)
    e *= dend[-1] / e[-1]  # the two totals agree up to rounding
    j = np.minimum(np.searchsorted(e, dend - d, side="right"), heavy.size - 1)
    prob[light] = q[light]
    alias[light] = heavy[j]
    if heavy.size > 1:
        i = np.minimum(np.searchsorted(dend, e[:-1], side="left"), light.size - 1)
        over = np.clip(dend[i] - e[:-1], 0.0, 1.0)
        prob[heavy[:-1]] = 1.0 - over
        alias[heavy[:-1]] = heavy[1:]
    return prob, alias


def feistel_permute(x: np.ndarray, n: int, key: int, rounds: int = 6) -> np.ndarray:
    """A keyed bijection of ``[0, n)``: a Feistel network over ``2^k >= n`` with cycle walking."""
    x = np.asarray(x, np.int64).astype(np.uint64)
    k = max(2, (int(n) - 1).bit_length())
    b = k // 2
    mb, ma = np.uint64((1 << b) - 1), np.uint64((1 << (k - b)) - 1)
    keys = [_key(key, r) for r in range(rounds)]
    sb = np.uint64(b)

    def once(v):
        left, right = v >> sb, v & mb
        for r in range(rounds):
            if r % 2 == 0:
                left = left ^ (splitmix64(right ^ keys[r]) & ma)
            else:
                right = right ^ (splitmix64(left ^ keys[r]) & mb)
        return (left << sb) | right

    y = once(x)
    bad = np.flatnonzero(y >= np.uint64(n))
    while bad.size:
        y[bad] = once(y[bad])
        bad = bad[y[bad] >= np.uint64(n)]
    return y.astype(np.int64)


@dataclass(frozen=True)
class Profile:
    """Popularity over 1-based ranks ``r``: a mixture of ``1 - fresh`` times the law
    ``w(r) = r^-alpha (1 + r/knee)^-gamma`` (knee=inf: plain Zipf) and ``fresh`` times the uniform
    law over all rows (rarely seen IDs that keep turning up, as new IDs do in production data)."""

    alpha: float
    gamma: float = 0.0
    knee: float = math.inf
    fresh: float = 0.0

    def weights(self, r: np.ndarray) -> np.ndarray:
        r = np.asarray(r, np.float64)
        w = r ** -self.alpha
        if self.gamma and math.isfinite(self.knee):
            w = w * (1.0 + r / self.knee) ** -self.gamma
        return w

    def slope(self, r: float) -> float:
        """-d log w / d log r at rank r."""
        if self.gamma and math.isfinite(self.knee):
            return self.alpha + self.gamma * (r / self.knee) / (1.0 + r / self.knee)
        return self.alpha


def auto_profile(num_embeddings: int, draws_per_batch: float, params: dict | None = None) -> Profile:
    """The calibrated profile of a table of ``num_embeddings`` rows drawn ``draws_per_batch`` times per
    reference batch (``REF_BATCH`` samples times the mean IDs per sample)."""
    p = AUTO_PROFILE if params is None else params
    L = max(1.0, float(draws_per_batch))
    alpha = float(np.clip(p["a0"] + p["a1"] * math.log10(num_embeddings / L), 0.0, 3.0))
    return Profile(alpha, float(p["gamma"]), float(p["rho"]) * L, float(p.get("fresh", 0.0)))


def _integral(a: float, b: float, beta: float) -> float:
    """Integral of x^-beta over [a, b]."""
    if abs(beta - 1.0) < 1e-12:
        return math.log(b / a)
    return (b ** (1 - beta) - a ** (1 - beta)) / (1 - beta)


@dataclass
class _Dist:
    """Probabilities of one table: head ranks ``0..k-1`` exactly, ranks ``k..n-1`` as a tail.

    Tail = ``law_mass`` of the continuous law ``x^-beta`` on ``[k + 0.5, n + 0.5]`` (beta: the
    profile's local slope at k) plus ``fresh / n`` per rank.
    """

    n: int
    k: int
    beta: float
    fresh: float
    p_head: np.ndarray  # [k], fresh share included
    law_mass: float  # mass of the power-law part of the tail

    @property
    def tail_mass(self) -> float:
        return self.law_mass + self.fresh * (self.n - self.k) / self.n

    @staticmethod
    def build(n: int, profile: Profile) -> _Dist:
        k = min(n, HEAD_RANKS)
        w = profile.weights(np.arange(1, k + 1))
        beta = profile.slope(k)
        tail = w[-1] * float(k) ** beta * _integral(k + 0.5, n + 0.5, beta) if n > k else 0.0
        total = w.sum() + tail
        f = float(profile.fresh)
        return _Dist(n, k, beta, f, (1 - f) * w / total + f / n, (1 - f) * tail / total)

    def tail_probs(self, r1: np.ndarray) -> np.ndarray:
        """Probabilities of 1-based tail ranks ``r1`` (> k)."""
        z = self.law_mass / _integral(self.k + 0.5, self.n + 0.5, self.beta)
        if abs(self.beta - 1.0) < 1e-12:
            pt = z * np.log((r1 + 0.5) / (r1 - 0.5))
        else:
            e = 1.0 - self.beta
            pt = z * ((r1 + 0.5) ** e - (r1 - 0.5) ** e) / e
        return pt + self.fresh / self.n

    def rank_probs(self, upto: int) -> np.ndarray:
        """Probabilities of ranks ``0..min(upto, n)-1``."""
        upto = min(int(upto), self.n)
        if upto <= self.k:
            return self.p_head[:upto]
        return np.concatenate([self.p_head, self.tail_probs(np.arange(self.k + 1, upto + 1, dtype=np.float64))])

    def lambda_groups(self, draws: float, groups: int = 400) -> tuple[np.ndarray, np.ndarray]:
        """(expected count per batch of ``draws`` draws, number of rows) for every head rank and for
        geometric groups of tail ranks (for `tierec.data.locality.expected_histogram`)."""
        lam = [draws * self.p_head]
        rows = [np.ones(self.k)]
        if self.n > self.k:
            edges = np.unique(np.geomspace(self.k + 0.5, self.n + 0.5, groups + 1))
            z = self.law_mass / _integral(self.k + 0.5, self.n + 0.5, self.beta)
            mass = np.array([z * _integral(lo, hi, self.beta) for lo, hi in zip(edges[:-1], edges[1:], strict=True)])
            cnt = np.diff(edges)
            lam.append(draws * (mass / cnt + self.fresh / self.n))
            rows.append(cnt)
        return np.concatenate(lam), np.concatenate(rows)


@lru_cache(maxsize=64)
def _distribution(n: int, profile: Profile) -> tuple[_Dist, np.ndarray, np.ndarray]:
    """Cached per (table size, profile): the probabilities and the alias table over head ranks + tail."""
    d = _Dist.build(n, profile)
    prob, alias = alias_table(np.append(d.p_head, d.tail_mass) if d.n > d.k else d.p_head)
    for a in (d.p_head, prob, alias):
        a.setflags(write=False)
    return d, prob, alias


class Popularity:
    """The ID distribution of one table (see `_Dist`), sampled in O(1) per ID.

    An alias table picks a head rank or "the tail"; tail draws pick a uniform rank with
    probability ``fresh share / tail mass``, else invert the power law's continuous CDF.
    Ranks map to row IDs through `feistel_permute` keyed by ``key`` (a table of the first
    ``k`` ranks' IDs is kept; tail ranks are permuted on the fly).
    """

    def __init__(self, n: int, profile: Profile, key: int):
        self.n, self.profile, self.key = int(n), profile, int(key)
        self.dist, self.prob, self.alias = _distribution(self.n, profile)
        self.k = self.dist.k
        self.m = self.prob.size
        self.head_ids = feistel_permute(np.arange(self.k), self.n, self.key)

    @property
    def tail_mass(self) -> float:
        return self.dist.tail_mass

    def sample_ranks(self, rng: np.random.Generator, size: int) -> np.ndarray:
        x = rng.random(size) * self.m
        j = x.astype(np.int64)
        np.minimum(j, self.m - 1, out=j)
        r = np.where(x - j < self.prob[j], j, self.alias[j])
        if self.n > self.k:
            t = np.flatnonzero(r == self.k)
            if t.size:
                r[t] = self._tail_ranks(rng, t.size)
        return r

    def _tail_ranks(self, rng: np.random.Generator, size: int) -> np.ndarray:
        d = self.dist
        u = rng.random(size)
        a, b, beta = d.k + 0.5, d.n + 0.5, d.beta
        if abs(beta - 1.0) < 1e-12:
            x = a * (b / a) ** u
        else:
            e = 1.0 - beta
            x = (a ** e + u * (b ** e - a ** e)) ** (1.0 / e)
        r = np.clip(np.rint(x), d.k + 1, d.n).astype(np.int64) - 1  # 0-based
        if d.fresh > 0:
            fresh = rng.random(size) * d.tail_mass < d.tail_mass - d.law_mass
            r[fresh] = rng.integers(d.k, d.n, size=int(fresh.sum()))
        return r

    def ranks_to_ids(self, r: np.ndarray) -> np.ndarray:
        if self.n == self.k:
            return self.head_ids[r]
        out = np.empty_like(r)
        head = r < self.k
        out[head] = self.head_ids[r[head]]
        if not head.all():
            out[~head] = feistel_permute(r[~head], self.n, self.key)
        return out

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return self.ranks_to_ids(self.sample_ranks(rng, size))


# --------------------------------------------------------------------------- label model
LATENT_DIM = 4
INTERACTION_ROWS = 10_000  # effects and latent vectors of a table of N rows are scaled by min(1, sqrt(this / N))
#: Target standard deviations of the logit's parts (before the bias), tuned so that the Bayes AUC is
#: ~0.80 and the first-order part alone scores ~0.70 on the default config (docs/synth.md).
LOGIT_STD = {"first_order": 0.9, "pairwise": 0.8, "dense": 0.5}
PILOT_ROWS = 16384


#: Labels ``1..K-1`` (``tasks = K > 1``): target ``P(label_k = 1 | click)``, and the standard deviations of
#: their logit's parts (times ``signal``): the click model's score (shared with the click label) and the
#: task's own per-ID and dense effects (docs/synth.md).
CONVERSION_RATE = 0.15
CONVERSION_STD = {"shared": 0.7, "own_first": 0.8, "own_dense": 0.4}


@dataclass
class LabelModel:
    bias: float = 0.0
    scale_first: float = 1.0
    scale_pair: float = 1.0
    scale_dense: float = 1.0
    dense_mean: list[float] = field(default_factory=list)
    dense_std: list[float] = field(default_factory=list)
    dense_coef: list[float] = field(default_factory=list)


@dataclass
class TaskModel:
    """Label ``k >= 1`` (a conversion-style label): ``label_k = click & Bernoulli(sigmoid(logit_k))`` with
    ``logit_k = bias + scale_shared * (click logit - click bias) + scale_own * own first-order effects +
    scale_dense * own dense score``. The own effects are independent per-ID effects (hashes of ``(seed,
    k, feature, id)``, pooled and damped like the click model's first-order effects); the own dense score
    is ``z @ dense_coef`` over the click model's standardised dense features."""

    name: str
    bias: float = 0.0
    scale_shared: float = 0.0
    scale_own: float = 0.0
    scale_dense: float = 0.0
    dense_coef: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- the generator
class Synthesizer:
    """The generator of one `SynthConfig`: tables, label model, blocks of rows."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        self.schema = cfg.schema()
        self.sizes = cfg.table_sizes()
        self.specs = cfg.length_specs()
        self.k = len(self.sizes)
        self.num_user = int(cfg.user_features)
        self.profiles: list[Profile] = []
        self.tables: list[Popularity] = []
        for i, (n, spec) in enumerate(zip(self.sizes, self.specs, strict=True)):
            draws = REF_BATCH * spec.mean / (cfg.session_length if i < self.num_user else 1.0)
            prof = auto_profile(n, draws) if cfg.zipf == "auto" else Profile(float(cfg.zipf))
            self.profiles.append(prof)
            self.tables.append(Popularity(n, prof, int(_key(cfg.seed, 1, i))))
        self._effect_keys = [_key(cfg.seed, 2, i) for i in range(self.k)]
        self._raw_keys = [_key(cfg.seed, 6, i) for i in range(self.k)]
        self.latent_weight = [min(1.0, (INTERACTION_ROWS / n) ** 0.5) for n in self.sizes]
        d = cfg.num_dense
        hd = _unit(splitmix64(np.array([_key(cfg.seed, 3, j) for j in range(d)], np.uint64))) if d else np.zeros(0)
        hs = _unit(splitmix64(np.array([_key(cfg.seed, 4, j) for j in range(d)], np.uint64))) if d else np.zeros(0)
        self.dense_mu = 0.5 + 2.5 * hd  # log-normal location of the raw counts
        self.dense_sigma = 0.8 + 0.8 * hs
        self._task_keys = [[_key(cfg.seed, 7, t, i) for i in range(self.k)] for t in range(1, cfg.tasks)]
        self._pilot: Chunk | None = None
        self.tasks: list[TaskModel] = []  # labels 1.. (tasks > 1)
        self.label = LabelModel()
        self.label = self._fit_label_model()
        if cfg.tasks > 1:
            self.tasks = self._fit_task_models()

    # ----- rows
    def num_blocks(self, split: str) -> int:
        return -(-self.cfg.split_rows()[split] // BLOCK_ROWS)

    def block(self, split: str, b: int) -> Chunk:
        """Block ``b`` of ``split`` (rows ``b*BLOCK_ROWS ..``), a pure function of (config, split, b)."""
        n_split = self.cfg.split_rows()[split] if split != "pilot" else PILOT_ROWS
        n = min(BLOCK_ROWS, n_split - b * BLOCK_ROWS)
        if n <= 0:
            raise IndexError(f"block {b} is past the end of split {split!r}")
        global_block = b if split != "test" else self.num_blocks("train") + b
        return self._make(n, SPLIT_CODES[split], b, global_block)

    def _make(self, n: int, code: int, b: int, global_block: int) -> Chunk:
        cfg = self.cfg
        ss = np.random.SeedSequence([int(cfg.seed), code, b])
        rngs = [np.random.default_rng(s) for s in ss.spawn(self.k + 3)]
        r_sess, r_dense, r_label = rngs[self.k], rngs[self.k + 1], rngs[self.k + 2]
        session = None
        sess_of_row = None
        if cfg.sessions:
            lens = _session_lengths(r_sess, n, float(cfg.session_length))
            sess_of_row = np.repeat(np.arange(lens.size, dtype=np.int64), lens)
            session = global_block * BLOCK_ROWS + sess_of_row
        sparse = {}
        for i, (name, spec, tab) in enumerate(zip(self.schema.sparse_names, self.specs, self.tables, strict=True)):
            rng = rngs[i]
            if i < self.num_user and sess_of_row is not None:
                s = int(sess_of_row[-1]) + 1
                slen = spec.sample(rng, s)
                svals = tab.sample(rng, int(slen.sum()))
                soff = np.concatenate([[0], np.cumsum(slen)])
                rlen = slen[sess_of_row]
                roff = np.concatenate([[0], np.cumsum(rlen)]).astype(np.int64)
                idx = np.repeat(soff[:-1][sess_of_row] - roff[:-1], rlen) + np.arange(roff[-1])
                sparse[name] = (svals[idx], roff)
            else:
                lens = spec.sample(rng, n)
                vals = tab.sample(rng, int(lens.sum()))
                sparse[name] = (vals, np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
        if cfg.num_dense:
            eps = r_dense.standard_normal((n, cfg.num_dense))
            raw = np.floor(np.exp(self.dense_mu + self.dense_sigma * eps) - 1.0)
            dense = np.log1p(np.maximum(raw, 0.0)).astype(np.float32)
        else:
            dense = np.zeros((n, 0), np.float32)
        chunk = Chunk(np.zeros(n, np.float32), dense, sparse, session)
        if code != SPLIT_CODES["pilot"]:
            truth = self._truth(chunk)
            click = r_label.random(n) < truth["prob"]
            if not self.tasks:
                chunk.label = click.astype(np.float32)
            else:  # labels 1..: only where the click label is 1 (`TaskModel`)
                conv = click[:, None] & (r_label.random((n, len(self.tasks))) < truth["conversion_probs"])
                chunk.label = np.column_stack([click, conv]).astype(np.float32)
            if cfg.raw_ids:  # after the labels: the same rows and labels, other ID values
                chunk.sparse = {k: (self.raw_ids(i, v), o) for i, (k, (v, o)) in enumerate(sparse.items())}
        return chunk

    def raw_ids(self, i: int, ids: np.ndarray) -> np.ndarray:
        """IDs int64 [m] of feature ``i`` (in ``[0, cardinality)``) -> raw IDs int64 [m] (any int64):
        ``splitmix64(id ^ key_i)``, a bijection of the 64-bit values per feature."""
        with np.errstate(over="ignore"):
            return splitmix64(ids.astype(np.int64, copy=False).view(np.uint64) ^ self._raw_keys[i]).view(np.int64)

    def ids(self, i: int, raw: np.ndarray) -> np.ndarray:
        """The inverse of `raw_ids`: raw IDs int64 [m] of feature ``i`` -> its IDs."""
        return (splitmix64_inverse(raw.astype(np.int64, copy=False).view(np.uint64)) ^ self._raw_keys[i]).view(np.int64)

    def chunks(self, split: str = "train", chunk_rows: int | None = None,
               max_rows: int | None = None) -> Iterator[Chunk]:
        """Yield the rows of ``split`` in order, as chunks of ``chunk_rows`` (default: `BLOCK_ROWS`)."""
        if split not in SPLITS:
            raise TierecError(f"no split {split!r} (splits: {', '.join(SPLITS)})")
        if chunk_rows is not None and chunk_rows <= 0:
            raise TierecError(f"chunk_rows must be > 0, got {chunk_rows}")
        total = self.cfg.split_rows()[split]
        if max_rows is not None:
            total = min(total, int(max_rows))
        step = chunk_rows or BLOCK_ROWS
        buf: list[Chunk] = []
        have = done = 0
        for b in range(-(-total // BLOCK_ROWS)):
            blk = self.block(split, b)
            if done + have + len(blk) > total:
                blk = blk.slice(0, total - done - have)
            buf.append(blk)
            have += len(blk)
            while have >= step:
                data = Chunk.concat(buf)
                yield data.slice(0, step)
                rest = data.slice(step, len(data))
                buf, have = ([rest], len(rest)) if len(rest) else ([], 0)
                done += step
        if have:
            yield Chunk.concat(buf)

    # ----- labels
    def _id_effects(self, i: int, vals: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Hidden effect (mean 0, variance 1) and `LATENT_DIM` latent coordinates of feature ``i``'s IDs.

        ``h0 = splitmix64(id ^ key_i)`` gives the effect (its top 53 bits); ``h1 = splitmix64(h0 ^ c)``
        gives the latent vector, 16 bits per coordinate. No table the size of the cardinality.
        """
        with np.errstate(over="ignore"):
            h0 = splitmix64(vals.astype(np.int64, copy=False).view(np.uint64) ^ self._effect_keys[i])
            h1 = splitmix64(h0 ^ np.uint64(0xD1B54A32D192ED03))
        w = (h0 >> np.uint64(11)).astype(np.float64) * (math.sqrt(12.0) / (1 << 53)) - math.sqrt(3.0)
        v = []
        for j in range(LATENT_DIM):
            q = ((h1 >> np.uint64(16 * j)) & np.uint64(0xFFFF)).astype(np.float64)
            v.append(q * (math.sqrt(12.0) / 65536.0) - (math.sqrt(3.0) - math.sqrt(12.0) / 131072.0))
        return w, v

    def _components(self, chunk: Chunk) -> dict[str, np.ndarray]:
        n = len(chunk)
        first = np.zeros(n)
        vsum = [np.zeros(n) for _ in range(LATENT_DIM)]
        vsq = np.zeros(n)
        for i, name in enumerate(self.schema.sparse_names):
            vals, offs = chunk.sparse[name]
            w, v = self._id_effects(i, vals)
            if vals.size != n or offs[-1] != n or not np.array_equal(offs, np.arange(n + 1)):
                # multi-hot: mean over each row's list; an empty list contributes 0
                lens = np.diff(offs)
                w, v = _mean_pool(w, offs, lens, n), [_mean_pool(x, offs, lens, n) for x in v]
            lw = self.latent_weight[i]
            first += w * lw if lw != 1.0 else w
            for j in range(LATENT_DIM):
                x = v[j] * lw if lw != 1.0 else v[j]
                vsum[j] += x
                vsq += x * x
        pair = 0.5 * (sum(s * s for s in vsum) - vsq)
        dense = np.zeros(n)
        lm = self.label
        if self.cfg.num_dense and lm.dense_mean:
            z = (chunk.dense.astype(np.float64) - np.array(lm.dense_mean)) / np.array(lm.dense_std)
            dense = z @ np.array(lm.dense_coef)
            if z.shape[1] >= 2:
                dense = dense + 0.5 * z[:, 0] * z[:, 1]
            if z.shape[1] >= 4:
                dense = dense + np.tanh(z[:, 2] - z[:, 3])
        return {"first_order": first, "pairwise": pair, "dense": dense}

    def ground_truth(self, chunk: Chunk) -> dict[str, np.ndarray]:
        """The hidden model's parts for each row of ``chunk`` (as the config writes it: raw IDs with
        ``raw_ids``): ``first_order``, ``pairwise``, ``dense`` (already scaled), ``bias``, ``logit``
        (their sum) and ``prob`` (sigmoid of the logit): the click label's, all ``[n]``; ``probs``
        ``[n, K]``: the true probability of each label (column k: ``Schema.labels[k]``; column 0 is
        ``prob``). With ``tasks = K > 1`` also ``conversion_logits`` and ``conversion_probs`` ``[n, K - 1]``:
        label k's `TaskModel` logit and ``P(label_k = 1 | click = 1)``, so ``probs[:, k] = prob *
        conversion_probs[:, k - 1]``."""
        if self.cfg.raw_ids:
            sp = {k: (self.ids(i, chunk.sparse[k][0]), chunk.sparse[k][1]) for i, k in enumerate(self.schema.sparse_names)}
            chunk = Chunk(chunk.label, chunk.dense, sp, chunk.session, chunk.inverse, chunk.inverse_keys)
        return self._truth(chunk)

    def _truth(self, chunk: Chunk) -> dict[str, np.ndarray]:
        """`ground_truth` of a chunk of IDs in ``[0, cardinality)`` (never raw)."""
        c = self._components(chunk)
        lm = self.label
        out = {"first_order": lm.scale_first * c["first_order"], "pairwise": lm.scale_pair * c["pairwise"],
               "dense": lm.scale_dense * c["dense"]}
        logit = lm.bias + out["first_order"] + out["pairwise"] + out["dense"]
        out["bias"] = np.full(len(chunk), lm.bias)
        out["logit"] = logit
        out["prob"] = 1.0 / (1.0 + np.exp(-logit))
        if not self.tasks:
            out["probs"] = out["prob"][:, None]
            return out
        own, own_dense = self._task_components(chunk)
        tl = np.stack([t.bias + t.scale_shared * (logit - lm.bias) + t.scale_own * own[:, j]
                       + t.scale_dense * own_dense[:, j] for j, t in enumerate(self.tasks)], 1)
        out["conversion_logits"] = tl
        out["conversion_probs"] = 1.0 / (1.0 + np.exp(-tl))
        out["probs"] = np.column_stack([out["prob"], out["prob"][:, None] * out["conversion_probs"]])
        return out

    def _task_components(self, chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
        """Unscaled own parts of labels 1..: first-order effects and dense score, each float64 ``[n, K - 1]``."""
        n, nt = len(chunk), self.cfg.tasks - 1
        own = np.zeros((n, nt))
        for i, name in enumerate(self.schema.sparse_names):
            vals, offs = chunk.sparse[name]
            single = vals.size == n and offs[-1] == n and np.array_equal(offs, np.arange(n + 1))
            lens = None if single else np.diff(offs)
            lw = self.latent_weight[i]
            with np.errstate(over="ignore"):
                u = vals.astype(np.int64, copy=False).view(np.uint64)
                for t in range(nt):
                    h = splitmix64(u ^ self._task_keys[t][i])
                    w = (h >> np.uint64(11)).astype(np.float64) * (math.sqrt(12.0) / (1 << 53)) - math.sqrt(3.0)
                    if lens is not None:  # multi-hot: mean over each row's list; an empty list contributes 0
                        w = _mean_pool(w, offs, lens, n)
                    own[:, t] += w * lw
        dense = np.zeros((n, nt))
        lm = self.label
        if self.cfg.num_dense and lm.dense_mean and self.tasks and self.tasks[0].dense_coef:
            z = (chunk.dense.astype(np.float64) - np.array(lm.dense_mean)) / np.array(lm.dense_std)
            dense = z @ np.array([t.dense_coef for t in self.tasks]).T
        return own, dense

    def _pilot_block(self) -> Chunk:
        if self._pilot is None:
            self._pilot = self.block("pilot", 0)
        return self._pilot

    def _fit_task_models(self) -> list[TaskModel]:
        """Labels 1..: scale their parts to `CONVERSION_STD` and solve each bias so that the mean of
        ``P(label_k | click)`` over the pilot block's clicks (weighted by the click probability) is
        `CONVERSION_RATE`."""
        pilot = self._pilot_block()
        names = self.schema.labels
        d = self.cfg.num_dense
        self.tasks = [TaskModel(names[t]) for t in range(1, self.cfg.tasks)]
        for t, tm in enumerate(self.tasks, start=1):
            if d:
                h = _unit(splitmix64(np.array([_key(self.cfg.seed, 8, t, j) for j in range(d)], np.uint64)))
                tm.dense_coef = (2.0 * h - 1.0).tolist()
        truth = self._truth_click(pilot)
        z = truth["logit"] - self.label.bias
        p = truth["prob"]
        own, own_dense = self._task_components(pilot)
        k = float(self.cfg.signal)

        def scale(v, target):
            s = float(np.std(v))
            return target / s if s > 1e-12 else 0.0

        for j, tm in enumerate(self.tasks):
            tm.scale_shared = scale(z, k * CONVERSION_STD["shared"])
            tm.scale_own = scale(own[:, j], k * CONVERSION_STD["own_first"])
            tm.scale_dense = scale(own_dense[:, j], k * CONVERSION_STD["own_dense"])
            zt = tm.scale_shared * z + tm.scale_own * own[:, j] + tm.scale_dense * own_dense[:, j]
            lo, hi = -30.0, 30.0
            for _ in range(100):  # bisection: E[p_click * sigmoid(bias + zt)] / E[p_click] = CONVERSION_RATE
                mid = 0.5 * (lo + hi)
                if np.sum(p / (1.0 + np.exp(-(mid + zt)))) < CONVERSION_RATE * np.sum(p):
                    lo = mid
                else:
                    hi = mid
            tm.bias = 0.5 * (lo + hi)
        return self.tasks

    def _truth_click(self, chunk: Chunk) -> dict[str, np.ndarray]:
        """`_truth` of the click label only (labels 1.. left out)."""
        tasks, self.tasks = self.tasks, []
        try:
            return self._truth(chunk)
        finally:
            self.tasks = tasks

    def _fit_label_model(self) -> LabelModel:
        """Scale the parts to `LOGIT_STD` and solve the bias for ``positive_rate``, on a pilot block."""
        pilot = self._pilot_block()
        lm = LabelModel()
        if self.cfg.num_dense:
            x = pilot.dense.astype(np.float64)
            lm.dense_mean = x.mean(0).tolist()
            lm.dense_std = np.maximum(x.std(0), 1e-6).tolist()
            hc = _unit(splitmix64(np.array([_key(self.cfg.seed, 5, j) for j in range(self.cfg.num_dense)], np.uint64)))
            lm.dense_coef = (2.0 * hc - 1.0).tolist()
        self.label = lm
        c = self._components(pilot)

        def scale(v, target):
            s = float(np.std(v))
            return target / s if s > 1e-12 else 0.0

        k = float(self.cfg.signal)
        lm.scale_first = scale(c["first_order"], k * LOGIT_STD["first_order"])
        lm.scale_pair = scale(c["pairwise"], k * LOGIT_STD["pairwise"])
        lm.scale_dense = scale(c["dense"], k * LOGIT_STD["dense"])
        z = lm.scale_first * c["first_order"] + lm.scale_pair * c["pairwise"] + lm.scale_dense * c["dense"]
        lo, hi = -30.0, 30.0
        for _ in range(100):  # bisection: mean sigmoid(bias + z) = positive_rate
            mid = 0.5 * (lo + hi)
            if np.mean(1.0 / (1.0 + np.exp(-(mid + z)))) < self.cfg.positive_rate:
                lo = mid
            else:
                hi = mid
        lm.bias = 0.5 * (lo + hi)
        return lm

    # ----- statistics of the ID distributions (no sampling)
    def draws_per_sample(self, i: int) -> float:
        return self.specs[i].mean

    def expected_top_share(self, fraction: float = 0.01) -> float:
        """Share of lookups that the most popular ``fraction`` of all table rows (every (table, row) pair,
        touched or not) take, under the generator's distributions (an infinitely long data set)."""
        total_rows = sum(self.sizes)
        k = int(fraction * total_rows)
        if k <= 0:
            return 0.0
        parts = [self.draws_per_sample(i) * t.dist.rank_probs(k) for i, t in enumerate(self.tables)]
        allp = np.concatenate(parts)
        mass = sum(self.draws_per_sample(i) for i in range(self.k))
        k = min(k, allp.size)
        return float(np.partition(allp, allp.size - k)[allp.size - k:].sum() / mass)

    def expected_reuse(self, batch_size: int = REF_BATCH):
        """Expected per-batch `ReuseHistogram` fractions (Poisson approximation) over all tables.

        Returns (col_size_hist [17], index_ratio [17]); ignores sessions.
        """
        from tierec.data.locality import expected_histogram

        u = np.zeros(17)
        lk = np.zeros(17)
        for i, t in enumerate(self.tables):
            lam, rows = t.dist.lambda_groups(batch_size * self.draws_per_sample(i))
            a, b = expected_histogram(lam, rows)
            u += a
            lk += b
        return u / u.sum(), lk / lk.sum()


def _mean_pool(x: np.ndarray, offs: np.ndarray, lens: np.ndarray, n: int) -> np.ndarray:
    """Mean of ``x`` over each row's slice ``offs[i]:offs[i+1]``; 0 for empty rows."""
    out = np.zeros(n)
    nz = lens > 0
    if x.size:
        out[nz] = np.add.reduceat(x, offs[:-1][nz]) / lens[nz]
    return out


def _session_lengths(rng: np.random.Generator, n: int, mean: float) -> np.ndarray:
    """Geometric session lengths (mean ``mean``) covering ``n`` rows; the last one is cut at ``n``."""
    if mean <= 1.0:
        return np.ones(n, np.int64)
    parts, have = [], 0
    while have < n:
        m = int((n - have) / mean * 1.1) + 16
        lens = rng.geometric(1.0 / mean, size=m).astype(np.int64)
        parts.append(lens)
        have += int(lens.sum())
    lens = np.concatenate(parts)
    c = np.cumsum(lens)
    s = int(np.searchsorted(c, n)) + 1  # sessions needed to cover n rows
    lens = lens[:s].copy()
    lens[-1] -= int(c[s - 1]) - n
    return lens


# --------------------------------------------------------------------------- module API
def iter_chunks(cfg: SynthConfig, split: str = "train", chunk_rows: int | None = None,
                max_rows: int | None = None) -> Iterator[Chunk]:
    """Yield the rows ``generate`` would write for ``split``, without writing (for benchmarks)."""
    yield from Synthesizer(cfg).chunks(split, chunk_rows, max_rows)


def ground_truth(cfg: SynthConfig | Synthesizer, chunk: Chunk) -> dict[str, np.ndarray]:
    """The hidden label model's logits/probabilities for ``chunk`` (see `Synthesizer.ground_truth`)."""
    syn = cfg if isinstance(cfg, Synthesizer) else Synthesizer(cfg)
    return syn.ground_truth(chunk)


def generate(cfg: SynthConfig, out_dir, progress: bool | None = None, cluster_by: str = "none",
             cluster_window: int = 1 << 18) -> dict:
    """Write the data set of ``cfg`` (train and test splits) to ``out_dir``; returns the manifest.

    Sessions come out contiguous; ``cluster_by`` (`tierec.data.cluster`) reorders within
    windows of ``cluster_window`` rows: ``session`` shuffles whole sessions and stores
    user-side lists once per run, ``shuffle`` interleaves rows (a raw-log-like baseline).
    """
    from tqdm import tqdm

    from tierec.data.cluster import clustering_record, open_writers

    out = Path(out_dir)
    prepare_output_dir(out)
    syn = Synthesizer(cfg)
    show = cfg.progress if progress is None else progress
    disable = not show or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    writer, windowed = open_writers(out, syn.schema, cluster_by, cluster_window, cfg.seed,
                                    rows_per_file=cfg.rows_per_file,
                                    row_group_size=min(cfg.row_group_size, cfg.rows_per_file))
    with tqdm(total=cfg.rows, unit="rows", unit_scale=True, desc="synth", file=sys.stderr, disable=disable) as bar:
        for split in SPLITS:
            for chunk in syn.chunks(split):
                windowed[split].write(chunk)
                bar.update(len(chunk))
            windowed[split].close()
    lm = syn.label
    source = {
        "generator": "tierec.data.synth",
        "config": cfg.to_dict(),
        "numpy": np.__version__,
        "block_rows": BLOCK_ROWS,
        "split_rule": "train: the first rows - round(rows * test_fraction) rows; test: the rest, "
                      "generated from the same distribution with their own random streams",
        "popularity": [{"feature": f.name, "num_embeddings": f.num_embeddings, "alpha": p.alpha,
                        "gamma": p.gamma, "knee": p.knee if math.isfinite(p.knee) else None,
                        "mean_length": s.mean}
                       for f, p, s in zip(syn.schema.sparse, syn.profiles, syn.specs, strict=True)],
        "label_model": asdict(lm) | {"latent_dim": LATENT_DIM, "logit_std": LOGIT_STD},
    }
    if syn.tasks:
        source["task_models"] = [asdict(t) for t in syn.tasks]
        source["conversion"] = {"rate_given_click": CONVERSION_RATE, "logit_std": CONVERSION_STD}
    clustering = clustering_record(cluster_by, cluster_window, cfg.seed)
    return writer.close(source=source, extra={"clustering": clustering} if clustering else None)


def _hex8(ids: np.ndarray) -> np.ndarray:
    """uint32-range int64 [n] -> 'S8' [n] lower-case hex, vectorised (Criteo's categorical look)."""
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    shifts = np.arange(28, -4, -4, dtype=np.uint64)
    nib = (ids.astype(np.uint64)[:, None] >> shifts) & np.uint64(15)
    return np.ascontiguousarray(digits[nib.astype(np.int64)]).view("S8").ravel()


def write_criteo_tsv(cfg: SynthConfig, path, progress: bool | None = None) -> int:
    """Write the rows of ``cfg`` (train, then test) as raw Criteo Kaggle text: ``label, I1..I13,
    C1..C26`` tab-separated, dense values as the raw integer counts (before ``log(1 + x)``),
    categorical values as 8 hex digits of the row ID. For `tierec data convert` round trips;
    single-hot only (Criteo has one value per feature). With ``tasks = K > 1`` each line starts with the
    K labels (`tierec data convert --num-labels K` reads it). Returns rows written."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    from tqdm import tqdm

    specs = cfg.length_specs()
    if cfg.raw_ids:
        raise ConfigError("--raw-ids writes a tierec data set (--format dataset); Criteo text holds 8 hex digits per "
                          "ID: write it without --raw-ids and `tierec data convert --raw-ids` it")
    if (len(specs), cfg.num_dense) != (26, 13):
        raise TierecError(f"--format criteo-tsv needs Criteo's 13 dense and 26 sparse features, got {cfg.num_dense} "
                          f"and {len(specs)}")
    if any((sp.kind, sp.a) != ("fixed", 1) for sp in specs):
        raise TierecError("--format criteo-tsv holds one ID per feature: use --multi-hot fixed:1")
    out = Path(path)
    if out.is_dir():
        raise TierecError(f"{out}: is a directory; --format criteo-tsv writes one text file")
    out.parent.mkdir(parents=True, exist_ok=True)
    syn = Synthesizer(cfg)
    sch = syn.schema
    show = cfg.progress if progress is None else progress
    disable = not show or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    opts = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    rows = 0
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as f, tqdm(total=cfg.rows, unit="rows", unit_scale=True, desc="synth", file=sys.stderr,
                                     disable=disable) as bar:
        for split in SPLITS:
            for chunk in syn.chunks(split):
                lab = chunk.label.reshape(len(chunk), -1).astype(np.int64)
                cols = {name: pa.array(lab[:, k]) for k, name in enumerate(sch.labels)}
                raw = np.rint(np.expm1(chunk.dense.astype(np.float64))).astype(np.int64)
                for i, name in enumerate(sch.dense):
                    cols[name] = pa.array(raw[:, i])
                for feat in sch.sparse:
                    vals, offs = chunk.sparse[feat.name]
                    present = np.diff(offs) > 0
                    text = np.zeros(len(chunk), "S8")
                    text[present] = _hex8(vals)
                    cols[feat.name] = pa.array(text.astype(object), pa.binary()).cast(pa.string())
                pacsv.write_csv(pa.table(cols), f, write_options=opts)
                rows += len(chunk)
                bar.update(len(chunk))
    tmp.replace(out)
    return rows


# --------------------------------------------------------------------------- calibration
def fit_auto_profile(stats_path, cfgs: SynthConfig | list[SynthConfig] | None = None, batch_size: int | None = None,
                     start: dict | None = None, iters: int = 250) -> tuple[dict, list[dict]]:
    """Refit `AUTO_PROFILE` to one of Meta's locality-stats files (the mean of its sections).

    Minimises TV(col sizes) + TV(index ratio) between the generator's expected per-batch
    histograms (Poisson approximation, at ``batch_size``, default the file's) and Meta's,
    averaged over ``cfgs`` (default: the 26 published Criteo cardinalities uncapped and capped
    at 100,000, single-hot), by Nelder-Mead over (a0, a1, log rho, gamma). Returns
    (params, one dict of figures per config). Takes about half a minute.
    """
    from tierec.data.locality import expected_histogram, mean_stats, parse_locality_stats, total_variation

    secs = parse_locality_stats(stats_path)
    med = float(np.median([t.avg_indices for t in secs]))
    ref = mean_stats([s for s in secs if abs(s.avg_indices - med) < 0.05 * med])  # drop odd sections out
    bs = int(batch_size or ref.batch_size)
    if cfgs is None:
        cfgs = [SynthConfig(rows=1, max_cardinality=0, num_dense=0), SynthConfig(rows=1, num_dense=0)]
    elif isinstance(cfgs, SynthConfig):
        cfgs = [cfgs]
    setups = [(c.table_sizes(), c.length_specs()) for c in cfgs]

    def hist(params, sizes, specs):
        u = np.zeros(17)
        lk = np.zeros(17)
        for n, s in zip(sizes, specs, strict=True):
            lam, rows = _Dist.build(n, auto_profile(n, REF_BATCH * s.mean, params)).lambda_groups(bs * s.mean)
            a, b = expected_histogram(lam, rows)
            u += a
            lk += b
        return u / u.sum(), lk / lk.sum()

    s0 = start or AUTO_PROFILE

    def unpack(x):
        return {"a0": float(x[0]), "a1": float(x[1]), "rho": float(math.exp(x[2])), "gamma": float(abs(x[3])),
                "fresh": float(s0.get("fresh", 0.0))}

    def f(x):
        tot = 0.0
        for sizes, specs in setups:
            u, lk = hist(unpack(x), sizes, specs)
            tot += total_variation(u, ref.col_size_hist) + total_variation(lk, ref.index_ratio)
        return tot / len(setups)

    x, _ = _nelder_mead(f, [s0["a0"], s0["a1"], math.log(s0["rho"]), s0["gamma"]], [0.2, 0.1, 0.5, 1.0], iters)
    params = unpack(x)
    figures = []
    for c, (sizes, specs) in zip(cfgs, setups, strict=True):
        u, lk = hist(params, sizes, specs)
        figures.append({"max_cardinality": c.max_cardinality, "batch_size": bs,
                        "tv_col_size": total_variation(u, ref.col_size_hist),
                        "tv_index_ratio": total_variation(lk, ref.index_ratio),
                        "col_size_hist": u.round(4).tolist(), "index_ratio": lk.round(4).tolist()})
    return params, figures


def _nelder_mead(f, x0, step, iters):
    n = len(x0)
    pts = [np.array(x0, float)]
    for i in range(n):
        x = np.array(x0, float)
        x[i] += step[i]
        pts.append(x)
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[-1] - vals[0] < 1e-7:
            break
        c = np.mean(pts[:-1], 0)
        xr = c + (c - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = c + 2 * (c - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = c + 0.5 * (pts[-1] - c)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                for i in range(1, n + 1):
                    pts[i] = pts[0] + 0.5 * (pts[i] - pts[0])
                    vals[i] = f(pts[i])
    i = int(np.argmin(vals))
    return pts[i], vals[i]


# --------------------------------------------------------------------------- CLI
def parse_cardinalities(text: str) -> list[int]:
    out = []
    for tok in text.replace(" ", "").split(","):
        if not tok:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", tok.replace("_", ""))
        if not m:
            raise ConfigError(f"cardinalities: {tok!r} is not a positive integer (e.g. 1000, 50k, 10M)")
        v = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
        out.append(int(v))
    if not out:
        raise ConfigError("cardinalities: empty list")
    return out

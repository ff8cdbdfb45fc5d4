"""Candidate retrieval: an HNSW index (faiss) over the item-tower embeddings of an item corpus.

- `item_corpus`: the distinct item-side feature tuples among the first ``rows`` training rows
  of a data set (an item = one combination of the item-side features' ID lists).
- `HnswIndex`: faiss ``IndexHNSWFlat`` with inner-product metric over unit vectors. It can
  be written to a file and memory-mapped back (``faiss.IO_FLAG_MMAP``), so the vectors and
  graph stay in the page cache rather than in the process's heap and the corpus may exceed DRAM.
- `exact_topk`, `recall_at_k`: brute-force search to measure the index's recall.
- `Retriever`: a two-tower `LoadedModel` + its corpus + index; ``search(users, k)``.

faiss is imported through `_faiss`, which quiets its loader's INFO lines about the optional
AVX builds it does not find (a ``ModuleNotFoundError`` each, at every start); the loader's
warnings and errors, and a failed import, still show.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tierec.data.dataset import Dataset, Schema
from tierec.data.hashing import splitmix64
from tierec.errors import ConfigError
from tierec.inference.features import Encoded
from tierec.sparse.dedup import expand_ranges
from tierec.train import checkpoint as ckpt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HnswParams:
    """M: graph degree; ef_construction / ef_search: candidate list sizes when building / searching."""

    M: int = 32
    ef_construction: int = 200
    ef_search: int = 512

    def __post_init__(self):
        for k, v in asdict(self).items():
            if v < 1:
                raise ConfigError(f"hnsw {k} must be >= 1, got {v}")


def _faiss():
    quiet = logging.getLogger("faiss.loader")
    if quiet.level == logging.NOTSET:  # a level set by the user stands
        quiet.setLevel(logging.WARNING)
    import faiss

    return faiss


class HnswIndex:
    """Approximate maximum-inner-product search over ``vectors`` float32 [N, D]."""

    def __init__(self, index, params: HnswParams, path: Path | None = None):
        self.index, self.params, self.path = index, params, path
        self.index.hnsw.efSearch = params.ef_search

    @classmethod
    def build(cls, vectors: np.ndarray, params: HnswParams, path: str | Path | None = None,
              mmap: bool = False) -> HnswIndex:
        """Build over ``vectors``; with ``path`` write it there, and with ``mmap`` serve the mapped file."""
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.IndexHNSWFlat(vectors.shape[1], params.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.add(vectors)
        if path is None:
            if mmap:
                raise ConfigError("an on-disk (memory-mapped) index needs a file path")
            return cls(index, params)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        faiss.write_index(index, str(tmp))
        tmp.replace(path)
        if mmap:
            del index
            return cls.load(path, params, mmap=True)
        return cls(index, params, path)

    @classmethod
    def load(cls, path: str | Path, params: HnswParams, mmap: bool = True) -> HnswIndex:
        faiss = _faiss()
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
        return cls(index, params, Path(path))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [Q, D] -> (scores float32 [Q, k], ids int64 [Q, k]; -1 where fewer than k)."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k by inner product: ids int64 [Q, k]."""
    scores = torch.from_numpy(np.ascontiguousarray(queries)) @ torch.from_numpy(np.ascontiguousarray(vectors)).T
    return torch.topk(scores, min(k, vectors.shape[0]), dim=1).indices.numpy()


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / k (both int [Q, k])."""
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True))
    return hits / exact.size


def _take_rows(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Jagged (values, offsets [n+1]) restricted to ``rows`` -> (values, lengths [len(rows)])."""
    lens = (offsets[1:] - offsets[:-1])[rows]
    starts = offsets[:-1][rows]
    return values[expand_ranges(starts, lens)], lens


def item_corpus(data: str, schema: Schema, keys: list[str], rows: int) -> Encoded:
    """Distinct combinations of the item-side features ``keys`` in the first ``rows`` training rows.

    Rows are keyed by a hash of their ID lists (order-insensitive within a list); the first
    row of each key is kept, in order of appearance. Returns the items as `Encoded` (no dense).
    """
    ds = Dataset(data)
    vals: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    lens: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    seen = 0
    for chunk in ds.chunks("train", 8192):
        take = min(len(chunk), rows - seen)
        for k in keys:
            v, o = chunk.sparse[k]
            vals[k].append(v[: o[take]])
            lens[k].append(np.diff(o[: take + 1]))
        seen += take
        if seen >= rows:
            break
    if not seen:
        raise ConfigError(f"{data}: no training rows to build an item corpus from")
    cols = {k: (np.concatenate(vals[k]), np.concatenate([[0], np.cumsum(np.concatenate(lens[k]))]))
            for k in keys}
    key = np.zeros(seen, np.uint64)
    with np.errstate(over="ignore"):
        for j, k in enumerate(keys):
            v, o = cols[k]
            h = np.concatenate([[np.uint64(0)], np.cumsum(splitmix64(v.view(np.uint64) ^ np.uint64(j + 1)))])
            key = splitmix64(key ^ (h[o[1:]] - h[o[:-1]]) ^ np.uint64(1 + (j << 40)))
    _, first = np.unique(key, return_index=True)
    first = np.sort(first)
    return Encoded(np.zeros((first.size, 0), np.float32), {k: _take_rows(*cols[k], first) for k in keys})


@torch.no_grad()
def embed_items(model, corpus: Encoded, batch: int = 8192) -> np.ndarray:
    """Item-tower vectors of every corpus item: float32 [N, D]."""
    out = []
    keys = model.item_keys
    for a in range(0, len(corpus), batch):
        part = _slice(corpus, a, min(a + batch, len(corpus)))
        out.append(model.item_embedding(part.to_inputs(keys)[1]).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.dim), np.float32)


def _slice(e: Encoded, a: int, b: int) -> Encoded:
    sp = {}
    for k, (v, n) in e.sparse.items():
        o = np.concatenate([[0], np.cumsum(n)])
        sp[k] = (v[o[a] : o[b]], n[a:b])
    return Encoded(e.dense[a:b], sp)


def item_features(corpus: Encoded, item: int) -> dict[str, list[int]]:
    """The item-side rows of corpus item ``item`` as {feature: [rows]}."""
    return {k: v.tolist() for k, (v, _) in _slice(corpus, item, item + 1).sparse.items()}


class Retriever:
    """A two-tower model, its item corpus and an HNSW index over the corpus's item vectors."""

    def __init__(self, loaded, corpus: Encoded, index: HnswIndex):
        self.loaded, self.corpus, self.index = loaded, corpus, index
        self.vectors: np.ndarray | None = None  # the item vectors [N, D] when kept in memory (`build`)

    @classmethod
    def build(cls, loaded, params: HnswParams, corpus_rows: int, index_dir: str | None = None,
              on_disk: bool = False, data: str | None = None) -> Retriever:
        """Corpus from ``data`` (default: the data set the model was trained on), item vectors,
        index; with ``index_dir`` the index file is written there (and memory-mapped if ``on_disk``)."""
        if loaded.kind != "two-tower":
            raise ConfigError(f"{loaded.path}: the retriever must be a two-tower checkpoint, this one is {loaded.kind!r}")
        model = loaded.model
        source = data or ckpt.saved_data_path(loaded.manifest["config"], loaded.path)
        corpus = item_corpus(source, loaded.schema, model.item_keys, corpus_rows)
        vectors = embed_items(model, corpus)
        path = None
        if index_dir is not None:
            path = Path(index_dir) / f"items-step{loaded.step}.faiss"
            (Path(index_dir)).mkdir(parents=True, exist_ok=True)
            (Path(index_dir) / "index.json").write_text(json.dumps(
                {"checkpoint": str(loaded.path), "step": loaded.step, "items": len(corpus), **asdict(params)}))
        index = HnswIndex.build(vectors, params, path, mmap=on_disk)
        log.info("item index: %d items, dim %d, HNSW M=%d efConstruction=%d efSearch=%d%s", len(corpus),
                 vectors.shape[1], params.M, params.ef_construction, params.ef_search,
                 f", memory-mapped from {path}" if on_disk else "")
        r = cls(loaded, corpus, index)
        r.vectors = None if on_disk else vectors
        return r

    @torch.no_grad()
    def search(self, users: Encoded, k: int) -> tuple[np.ndarray, np.ndarray]:
        """B users -> (inner products float32 [B, k], item ids int64 [B, k])."""
        model = self.loaded.model
        u = model.user_embedding(users.to_inputs(model.user_keys)[1]).numpy()
        return self.index.search(u, k)


def take_items(corpus: Encoded, items: np.ndarray) -> Encoded:
    """Corpus items ``items`` (int [n]) as `Encoded`, in that order."""
    sp = {}
    for k, (v, n) in corpus.sparse.items():
        sp[k] = _take_rows(v, np.concatenate([[0], np.cumsum(n)]), items)
    return Encoded(corpus.dense[items], sp)

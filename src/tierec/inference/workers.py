"""The server's threads: `ModelWorker` (the one model thread and the work it runs over a `ModelStore`)
and `EncodePool` (request samples validated and hashed off the event loop).

One model thread: the models and their caches are not thread-safe, and the event loop stays free
to accept requests. A batch takes ``store.ranker`` (and ``store.retriever``) once, so a reload that
swaps them meanwhile never changes the model under a running batch.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from tierec.inference.api import NOT_FINITE, ApiError
from tierec.inference.cascade import Cascade
from tierec.inference.features import Encoded, FeatureEncoder
from tierec.inference.metrics import ServingMetrics
from tierec.inference.model_store import LoadedModel, ModelStore
from tierec.inference.retrieval import Retriever, take_items


@dataclass
class HistoryQuery:
    """One /v1/recommend request for a history (a `DynamicBatcher` payload of one sample): ``items`` int64,
    oldest first, already checked to lie in 1..num_items of the model it was checked against (``num_items``);
    ``exclude``: items never to return (None: none); ``k``: items wanted."""

    items: np.ndarray
    exclude: np.ndarray | None
    k: int
    num_items: int

    def __len__(self) -> int:
        return 1


def loaded_model(m: LoadedModel | Retriever) -> LoadedModel:
    """The `LoadedModel` of a ranker (itself) or of a retriever (its two-tower model)."""
    return m.loaded if isinstance(m, Retriever) else m


class ModelWorker:
    """Every model call of the server, on one thread (``executor``) with ``threads`` torch threads."""

    def __init__(self, store: ModelStore, metrics: ServingMetrics, threads: int | None = None,
                 cascade: Cascade | None = None):
        self.store, self.metrics = store, metrics
        self.cascade = cascade  # early exits (`tierec.inference.cascade`): the head answers where it is confident
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="tierec-model",
                                           initializer=(lambda: torch.set_num_threads(threads)) if threads else None)

    @torch.no_grad()
    def predict(self, payloads: list[Encoded]) -> list[tuple[np.ndarray, int, np.ndarray | None]]:
        """One batch of predict requests -> (logits, ranker step, exited: per sample whether the exit head
        answered, None without one) per request (`DynamicBatcher.run`)."""
        lm = self.store.ranker  # one model for the whole batch, even if a reload swaps it meanwhile
        dense, kjt = Encoded.concat(payloads).to_inputs(lm.schema.sparse_names)
        read0 = lm.shared.read_s if lm.shared is not None else 0.0
        t0 = time.perf_counter()
        exited = None
        if self.cascade is not None:
            scored, ex = self.cascade.forward(lm, dense, kjt)
            logits, exited = scored.numpy(), ex.numpy()
        else:
            logits = lm.forward(dense, kjt).numpy()
        self.metrics.ranker_call(time.perf_counter() - t0, lm.shared.read_s - read0 if lm.shared is not None else None)
        out, a = [], 0
        for p in payloads:
            out.append((logits[a : a + len(p)], lm.step, None if exited is None else exited[a : a + len(p)]))
            a += len(p)
        return out

    def upkeep(self) -> None:
        """Deferred cache admission of the serving models (`LoadedModel.maintain`)."""
        r = self.store.retriever
        for lm in (self.store.ranker, r.loaded if r is not None else None):
            if lm is not None:
                lm.maintain()

    @torch.no_grad()
    def recommend(self, user: Encoded, k: int, n_cand: int) -> dict:
        """The ``n_cand`` nearest items of ``user``'s vector, scored by the ranker; the best ``k``
        (a `RecommendResponse`)."""
        ret, lm = self.store.retriever, self.store.ranker
        ip, ids = ret.search(user, n_cand)
        keep = ids[0] >= 0
        ip, ids = ip[0][keep], ids[0][keep]
        items = take_items(ret.corpus, ids)
        batch = user.take(list(user.sparse), repeat=len(ids))
        for key in ret.loaded.model.item_keys:
            batch.sparse[key] = items.sparse[key]
        dense, kjt = batch.to_inputs(lm.schema.sparse_names)
        logits = lm.forward(dense, kjt)
        if logits.dim() == 2:  # a multi-task ranker: items ranked by the first label (e.g. a click)
            logits = logits[:, 0]
        self.metrics.batch(len(ids))
        if not bool(torch.isfinite(logits).all()):
            raise ApiError(422, "user", NOT_FINITE)
        top = torch.argsort(logits, descending=True)[:k].numpy()
        probs = torch.sigmoid(logits).numpy()
        sel = take_items(ret.corpus, ids[top])
        res = []
        for j, t in enumerate(top):
            o = {key: int(n[:j].sum()) for key, (_, n) in sel.sparse.items()}
            feats = {key: v[o[key] : o[key] + int(n[j])].tolist() for key, (v, n) in sel.sparse.items()}
            res.append({"item": int(ids[t]), "score": float(probs[t]), "retrieval_score": float(ip[t]),
                        "features": feats})
        return {"items": res, "ranker_step": lm.step, "retriever_step": ret.loaded.step}

    @torch.no_grad()
    def recommend_histories(self, queries: list[HistoryQuery]) -> list[dict]:
        """One batch of history requests -> a `HistoryRecommendResponse` each: one encoder pass over all the
        histories, one product with the item table (`SequenceScorer.top_k`)."""
        lm = self.store.ranker  # one model for the whole batch, even if a reload swaps it meanwhile
        seq = lm.sequence
        if seq is None:
            raise ApiError(409, "history", "the serving checkpoint is no longer a sequence model (reloaded)")
        for q in queries:  # checked against the model of the request's time; a reload may have shrunk it
            if q.num_items > seq.num_items and int(q.items.max()) > seq.num_items:
                raise ApiError(422, "history", f"an item ID above {seq.num_items}, the serving model's items")
        t0 = time.perf_counter()
        top = seq.top_k([q.items for q in queries], [q.k for q in queries], [q.exclude for q in queries])
        self.metrics.ranker_call(time.perf_counter() - t0, None)
        used = [min(len(q.items), seq.max_len) for q in queries]
        return [{"items": [{"item": int(i), "score": float(v)} for i, v in zip(items, vals, strict=True)],
                 "step": lm.step, "history_used": n} for (items, vals), n in zip(top, used, strict=True)]

    async def run(self, fn, *args):
        """``fn(*args)`` on the model thread, awaited."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def later(self, fn, *args) -> None:
        """``fn(*args)`` on the model thread after what is queued there (not awaited)."""
        self.executor.submit(fn, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class EncodePool:
    """``encoder.encode`` on ``threads`` worker threads: hashing a long string takes a while, and a large
    request must not hold up the event loop."""

    def __init__(self, encoder: FeatureEncoder, threads: int):
        self.encoder = encoder
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="tierec-encode")

    async def encode(self, samples: list, **kw) -> Encoded:
        """`FeatureEncoder.encode` off the event loop (raises its `InputError`)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(
            self.encoder.encode, samples, **kw))

    def close(self) -> None:
        self.pool.shutdown(wait=True)

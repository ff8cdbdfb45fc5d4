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

import numpy as np
import torch

from tierec.inference.api import NOT_FINITE, ApiError
from tierec.inference.features import Encoded, FeatureEncoder
from tierec.inference.metrics import ServingMetrics
from tierec.inference.model_store import LoadedModel, ModelStore
from tierec.inference.retrieval import Retriever, take_items


def loaded_model(m: LoadedModel | Retriever) -> LoadedModel:
    """The `LoadedModel` of a ranker (itself) or of a retriever (its two-tower model)."""
    return m.loaded if isinstance(m, Retriever) else m


class ModelWorker:
    """Every model call of the server, on one thread (``executor``) with ``threads`` torch threads."""

    def __init__(self, store: ModelStore, metrics: ServingMetrics, threads: int | None = None):
        self.store, self.metrics = store, metrics
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="tierec-model",
                                           initializer=(lambda: torch.set_num_threads(threads)) if threads else None)

    @torch.no_grad()
    def predict(self, payloads: list[Encoded]) -> list[tuple[np.ndarray, int]]:
        """One batch of predict requests -> (logits, ranker step) per request (`DynamicBatcher.run`)."""
        lm = self.store.ranker  # one model for the whole batch, even if a reload swaps it meanwhile
        dense, kjt = Encoded.concat(payloads).to_inputs(lm.schema.sparse_names)
        read0 = lm.shared.read_s if lm.shared is not None else 0.0
        t0 = time.perf_counter()
        logits = lm.forward(dense, kjt).numpy()
        self.metrics.ranker_call(time.perf_counter() - t0, lm.shared.read_s - read0 if lm.shared is not None else None)
        out, a = [], 0
        for p in payloads:
            out.append((logits[a : a + len(p)], lm.step))
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

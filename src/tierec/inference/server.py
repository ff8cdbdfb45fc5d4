"""The HTTP API (FastAPI on uvicorn): predict, recommend, health, metrics, reload.

Endpoints (OpenAPI schema at ``/openapi.json``, browsable at ``/docs``):

- ``POST /v1/predict``  ``{"samples": [{"I1": 0.3, "C1": 17, "C2": [3, "abc"]}, ...]}`` ->
  ``{"probabilities": [...], "logits": [...], "step": N}`` (a multi-task model: also ``"tasks": {label:
  [...]}``, every label's probability); samples of concurrent requests are
  scored together (`DynamicBatcher`). With an exit head (`tierec.inference.cascade`) also ``"exit": [bool]``
  (the head answered), with a result cache (`tierec.inference.result_cache`) ``"cached": [bool]``.
- ``POST /v1/recommend`` ``{"user": {"C1": 5, "I1": 0.2}, "k": 10, "candidates": 100}`` ->
  the ``candidates`` nearest items of the user vector in the HNSW index, re-scored by the
  ranker (user features + the item's features), best ``k`` first. A server of a sasrec checkpoint
  takes ``{"history": [items, oldest first], "k": 10, "exclude_history": false}`` instead -> the
  ``k`` items of highest ``<h_last, e(item)>`` over all items (``{"items": [{"item", "score"}],
  "step", "history_used"}``; a history longer than the model's max_len: its last max_len items);
  concurrent histories are encoded together (a second `DynamicBatcher`).
- ``GET /healthz``, ``GET /metrics`` (Prometheus text format).
- ``POST /v1/admin/reload`` ``{"checkpoint": PATH?, "retriever": PATH?}``: only with `AdminSettings`
  (`tierec serve --admin`; otherwise the route does not exist: 404). Needs ``Authorization: Bearer
  TOKEN`` (401 otherwise, before the body is read); paths resolve (symlinks followed) under the
  admin roots or get 403, whether or not they exist. Loads a checkpoint (default: the newest one of
  the path the server was started with) beside the serving one, then swaps it in atomically;
  requests in flight finish on the model they started with.

Bad input never gives a 500: ``{"error": MESSAGE, "field": "samples[2].C7"}`` with 400
(malformed JSON), 413 (a body over ``max_body_bytes``, refused before it is read -- by its
Content-Length, or once the chunks received pass the limit -- or more samples than
``max_batch``) or 422 (anything else). Samples are validated and hashed on worker threads, so a
large request never holds up the event loop (/healthz), and fully, before they join a batch: a
bad sample fails its own request only (`DynamicBatcher` also retries a failed batch one request
at a time).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount, Route, WebSocketRoute

from tierec.errors import CheckpointError
from tierec.inference.admin import AdminReload, AdminSettings
from tierec.inference.api import (
    NOT_FINITE,
    ApiError,
    HistoryRecommendResponse,
    PredictRequest,
    PredictResponse,
    RecommendRequest,
    RecommendResponse,
    ReloadRequest,
    error_response,
)
from tierec.inference.batcher import DynamicBatcher
from tierec.inference.cascade import Cascade
from tierec.inference.features import FeatureEncoder, InputError
from tierec.inference.live import Follower, Publication
from tierec.inference.metrics import ServingMetrics
from tierec.inference.model_store import LoadedModel, ModelStore
from tierec.inference.result_cache import Answer, EarlyAnswerCollector, ResultCache, cached_predict, path_flops_of
from tierec.inference.workers import EncodePool, HistoryQuery, ModelWorker, loaded_model

__all__ = ["AdminSettings", "ServerSettings", "create_app"]

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    max_batch: int = 256  # most samples per model call (and per predict request)
    max_wait_ms: float = 2.0  # longest a request waits for others to join its batch
    max_ids: int = 256  # most IDs in one sparse feature of one sample
    max_k: int = 1000  # most items per recommend answer
    max_candidates: int = 4096  # most candidates retrieved per recommend request
    default_candidates: int = 100
    max_body_bytes: int = 1 << 20  # largest request body: 413 before it is read
    max_id_bytes: int = 256  # longest string ID (UTF-8 bytes)
    encode_threads: int = 4  # threads validating and hashing request samples (not the model thread)


class BodyTooLarge(HTTPException):  # FastAPI re-raises an HTTPException met while reading the body
    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes (--max-body-bytes)")


class BodyLimit:
    """Pure ASGI middleware: a request body over ``limit`` bytes gets 413 before it is read -- at once
    when its Content-Length says so, else as soon as the chunks received pass the limit (chunked
    bodies have no Content-Length). Nothing beyond the limit is buffered."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await error_response(413, BodyTooLarge(self.limit).detail, "body")(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


def observe(metrics: ServingMetrics, known: set[str]):
    """HTTP middleware: every answer counted and timed by route (a path outside ``known``: "other"); an
    unhandled exception still gets an answer (500), never a dropped connection."""

    async def observe(request: Request, call_next):
        t0 = time.perf_counter()
        route = request.url.path if request.url.path in known else "other"
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 -- never let an exception end the connection without an answer
            log.exception("unhandled error on %s", request.url.path)
            response = error_response(500, "internal server error")
        metrics.request(route, response.status_code, time.perf_counter() - t0)
        return response

    return observe


def _loc(loc) -> str:
    """Pydantic location ('body', 'samples', 0, 'C1') -> 'samples[0].C1'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


async def on_validation(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    e: dict[str, Any] = errs[0] if errs else {"loc": ("body",), "msg": "invalid request", "type": ""}
    if e.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON body: {e.get('ctx', {}).get('error', e['msg'])}", "body")
    return error_response(422, e["msg"], _loc(e.get("loc", ())))


async def on_input(request: Request, exc: InputError):
    return error_response(422, exc.message, exc.field)


async def on_api(request: Request, exc: ApiError):
    return error_response(exc.status, exc.message, exc.field)


async def on_too_large(request: Request, exc: BodyTooLarge):
    return error_response(413, exc.detail, "body")


async def on_http(request: Request, exc: StarletteHTTPException):
    return error_response(exc.status_code, str(exc.detail), "body" if exc.status_code == 400 else None)


ERROR_HANDLERS = ((RequestValidationError, on_validation), (InputError, on_input), (ApiError, on_api),
                  (BodyTooLarge, on_too_large), (StarletteHTTPException, on_http))


class Routes:
    """The public endpoints over ``store``: checks against ``settings``, samples encoded on ``encode``,
    predictions batched by ``batcher``, recommendations and upkeep on the model thread (``worker``)."""

    def __init__(self, store: ModelStore, settings: ServerSettings, encode: EncodePool, batcher: DynamicBatcher,
                 worker: ModelWorker, metrics: ServingMetrics, histories: DynamicBatcher | None = None):
        self.store, self.cfg, self.encode = store, settings, encode
        self.batcher, self.worker, self.stats = batcher, worker, metrics
        self.histories = histories  # sasrec: /v1/recommend histories, batched
        self.results: ResultCache | None = None  # the result cache (`tierec.inference.result_cache`), if on
        schema = store.ranker.schema
        self.user_allowed = set(schema.dense) | {f.name for f in schema.sparse if f.side == "user"}

    async def predict(self, req: PredictRequest):
        """Score samples with the ranker (click probability)."""
        if self.store.ranker.sequence is not None:
            raise ApiError(404, None, "this server serves a sasrec checkpoint: POST /v1/recommend with a history")
        if len(req.samples) > self.cfg.max_batch:
            raise ApiError(413, "samples", f"{len(req.samples)} samples, at most {self.cfg.max_batch} per request")
        enc = await self.encode.encode(req.samples)
        ans = await self.answer(enc)
        logits, step = ans.logits, ans.step  # [n], or [n, K] for a multi-task model
        bad = np.flatnonzero(~np.isfinite(logits).reshape(logits.shape[0], -1).all(1))
        if bad.size:
            raise ApiError(422, f"samples[{bad[0]}]", NOT_FINITE)
        with np.errstate(over="ignore"):
            probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
        if logits.ndim == 1:
            return {"probabilities": probs.tolist(), "logits": logits.tolist(), "step": step, **ans.paths()}
        names = self.store.ranker.schema.labels
        return {"probabilities": probs[:, 0].tolist(), "logits": logits[:, 0].tolist(), "step": step,
                "tasks": {n: probs[:, k].tolist() for k, n in enumerate(names)}, **ans.paths()}

    async def answer(self, enc) -> Answer:
        """``enc`` scored: through the result cache when there is one (hits skip the batch), else batched."""
        if self.results is None:
            return Answer(*await self.batcher.submit(enc))
        lm = self.store.ranker  # the model first, then the reload count (module doc of result_cache)
        step = lm.step
        version = (self.store.reloads, id(lm), step)
        cascade = self.worker.cascade
        return await cached_predict(self.results, version, step, lm.schema.sparse_names, enc, self.batcher.submit,
                                    lambda exited: path_flops_of(lm.model, cascade, exited, len(enc)))

    async def recommend(self, req: RecommendRequest):
        """Top-k items for a user: HNSW retrieval over two-tower item vectors, then ranking; or, served by a
        sasrec checkpoint, the top-k next items after a history."""
        cfg = self.cfg
        if self.store.ranker.sequence is not None:
            return await self.recommend_history(req)
        if req.history is not None:
            raise ApiError(422, "history", "a history needs a sasrec checkpoint; this server recommends for user "
                           "features (\"user\")")
        if req.user is None:
            raise ApiError(422, "user", "Field required")
        if self.store.retriever is None:
            raise ApiError(404, None, "no retriever loaded: start the server with --retriever TWO_TOWER_CHECKPOINT")
        if req.k > cfg.max_k:
            raise ApiError(422, "k", f"k={req.k}, at most {cfg.max_k}")
        n_cand = req.candidates if req.candidates is not None else max(cfg.default_candidates, req.k)
        if n_cand > cfg.max_candidates:
            raise ApiError(422, "candidates", f"{n_cand} candidates, at most {cfg.max_candidates}")
        if n_cand < req.k:
            raise ApiError(422, "candidates", f"candidates ({n_cand}) must be >= k ({req.k})")
        user = await self.encode.encode([req.user], where="user", allowed=self.user_allowed)
        res = await self.worker.run(self.worker.recommend, user, req.k, n_cand)
        self.worker.later(self.worker.upkeep)  # after the answer: cache admission does not delay this request
        return res

    async def recommend_history(self, req: RecommendRequest):
        """The ``k`` best next items after ``req.history`` (sasrec): validated here, scored in batches."""
        seq = self.store.ranker.sequence
        assert seq is not None and self.histories is not None
        for name in ("user", "candidates"):
            if getattr(req, name) is not None:
                raise ApiError(422, name, "a sasrec checkpoint recommends for a history: send \"history\" (and "
                               "\"k\", \"exclude_history\")")
        if req.history is None:
            raise ApiError(422, "history", "Field required (a list of item IDs, oldest first)")
        if req.k > self.cfg.max_k:
            raise ApiError(422, "k", f"k={req.k}, at most {self.cfg.max_k}")
        n = seq.num_items
        bad = next((i for i, x in enumerate(req.history) if not 1 <= x <= n), None)
        if bad is not None:
            raise ApiError(422, f"history[{bad}]", f"unknown item {req.history[bad]}: item IDs are 1..{n}")
        items = np.asarray(req.history, dtype=np.int64)
        query = HistoryQuery(items, np.unique(items) if req.exclude_history else None, req.k, n)
        return await self.histories.submit(query)

    async def healthz(self):
        def desc(lm):
            d = {"checkpoint": str(lm.path), "step": lm.step, "kind": lm.kind, "tables": lm.options.tables}
            if lm.sequence is not None:
                d.update(items=lm.sequence.num_items, max_len=lm.sequence.max_len)
            return d

        r = self.store.retriever
        return {"status": "ok", "ranker": desc(self.store.ranker), "reloads": self.store.reloads,
                "retriever": None if r is None else {**desc(r.loaded), "items": len(r.corpus)}}

    async def metrics(self):
        return Response(self.stats.render(), media_type=self.stats.content_type)


@dataclass
class FollowSettings:
    """``tierec serve --follow``: the training run directory to follow, how often to look (s), and how to load a
    checkpoint in full (``load(path)``) and its raw-ID maps (``id_maps_of(path)``, None: rows as stored)."""

    run_dir: Path
    every: float
    load: Callable[[Path], LoadedModel]
    id_maps_of: Callable[[Path], object] | None = None


def _follower(store: ModelStore, worker: ModelWorker, metrics: ServingMetrics, follow: FollowSettings) -> Follower:
    """A `Follower` whose publications are applied on the model thread and whose full loads are swapped in."""
    schema = store.ranker.schema

    def apply(pub: Publication) -> bool:
        lm = store.ranker
        return worker.executor.submit(lm.apply_publication, pub).result()

    def reload(path: Path) -> None:
        new = follow.load(path)
        if new.schema.to_json() != schema.to_json():
            new.close()
            raise CheckpointError(f"{path}: a different schema than the serving model's; not loaded")
        for o in store.swap(new):  # closed on the model thread once every batch that took it ran
            worker.later(loaded_model(o).close)

    def report(kind: str, pub: Publication | None, lag: float | None) -> None:
        metrics.live_update(kind, pub.num_rows if pub is not None else 0, lag)

    return Follower(follow.run_dir, follow.every, lambda: store.ranker, apply, reload, follow.id_maps_of, report)


def create_app(store: ModelStore, settings: ServerSettings, admin: AdminSettings | None = None,
               threads: int | None = None, follow: FollowSettings | None = None, cascade: Cascade | None = None,
               results: ResultCache | None = None) -> FastAPI:
    """The ASGI app over ``store``; ``admin``: enable ``/v1/admin/reload``; ``follow``: apply a training run's
    new checkpoints as they come (`tierec.inference.live`; module doc); ``cascade``: early exits of /v1/predict
    samples (`tierec.inference.cascade`); ``results``: a result cache in front of the batcher
    (`tierec.inference.result_cache`)."""
    metrics = ServingMetrics(store)
    worker = ModelWorker(store, metrics, threads, cascade)
    encoder = FeatureEncoder(store.ranker.schema, settings.max_ids, settings.max_id_bytes)
    encode = EncodePool(encoder, settings.encode_threads)
    batcher = DynamicBatcher(worker.predict, settings.max_batch, settings.max_wait_ms / 1000, worker.executor,
                             metrics.batch, worker.upkeep)
    histories = DynamicBatcher(worker.recommend_histories, settings.max_batch, settings.max_wait_ms / 1000,
                               worker.executor, metrics.batch, worker.upkeep)
    routes = Routes(store, settings, encode, batcher, worker, metrics, histories)
    routes.results = results
    if cascade is not None or results is not None:  # early exits, result cache: their counters on /metrics
        metrics.registry.register(EarlyAnswerCollector(cascade, results))
    follower = _follower(store, worker, metrics, follow) if follow is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        histories.start()
        metrics.start()
        if follower is not None:
            follower.start()
        try:
            yield
        finally:
            if follower is not None:
                await asyncio.to_thread(follower.stop)
            await batcher.stop()
            await histories.stop()
            metrics.stop()
            worker.close()
            encode.close()
            store.close()  # after the model thread: no batch runs; a streamed model's weight file is removed

    app = FastAPI(title="tierec serving", version="1", lifespan=lifespan,
                  description="Recommendation inference with embedding tables served from the SSD tier.")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)  # inside `observe`: 413s are counted
    known_paths: set[str] = set()
    app.middleware("http")(observe(metrics, known_paths))
    for exc, handler in ERROR_HANDLERS:
        app.add_exception_handler(exc, handler)  # type: ignore[arg-type]  # Starlette types handlers for Exception only
    app.post("/v1/predict", response_model=PredictResponse)(routes.predict)
    app.post("/v1/recommend", response_model=RecommendResponse | HistoryRecommendResponse)(routes.recommend)
    app.get("/healthz")(routes.healthz)
    app.get("/metrics")(routes.metrics)
    if admin is not None:
        body = {"content": {"application/json": {"schema": ReloadRequest.model_json_schema()}}}
        reload = AdminReload(store, admin, worker, routes.healthz)
        app.post("/v1/admin/reload", openapi_extra={"requestBody": body})(reload.admin_reload)
    known_paths.update(r.path for r in app.routes if isinstance(r, (Route, WebSocketRoute, Mount)))
    app.state.store, app.state.registry, app.state.batcher = store, metrics.registry, batcher
    app.state.encoder, app.state.follower = encoder, follower
    app.state.cascade, app.state.results = cascade, results
    return app

"""The HTTP API (FastAPI on uvicorn): predict, recommend, health, metrics, reload.

Endpoints (OpenAPI schema at ``/openapi.json``, browsable at ``/docs``):

- ``POST /v1/predict``  ``{"samples": [{"I1": 0.3, "C1": 17, "C2": [3, "abc"]}, ...]}`` ->
  ``{"probabilities": [...], "logits": [...], "step": N}``; samples of concurrent requests are
  scored together (`DynamicBatcher`).
- ``POST /v1/recommend`` ``{"user": {"C1": 5, "I1": 0.2}, "k": 10, "candidates": 100}`` ->
  the ``candidates`` nearest items of the user vector in the HNSW index, re-scored by the
  ranker (user features + the item's features), best ``k`` first.
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
import functools
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierec import energy
from tierec.errors import TierecError
from tierec.inference.batcher import DynamicBatcher
from tierec.inference.features import Encoded, FeatureEncoder, InputError
from tierec.inference.model_store import ModelStore
from tierec.inference.retrieval import take_items
from tierec.train.checkpoint import resolve_checkpoint

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


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


@dataclass
class AdminSettings:
    """``POST /v1/admin/reload``: the bearer ``token``, the directories (real paths) reloads may read
    from, and ``reload(checkpoint, retriever) -> (ranker, retriever)`` loading replacement models
    (either None: keep the current one; a checkpoint None: the newest of the startup path)."""

    token: bytes
    roots: list[str]
    reload: Callable[[str | None, str | None], tuple]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: list[dict[str, Any]] = Field(min_length=1, description="samples: feature name -> number / ID / list of IDs")


class PredictResponse(BaseModel):
    probabilities: list[float]
    logits: list[float]
    step: int = Field(description="training step of the checkpoint that scored the samples")


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: dict[str, Any] = Field(description="user-side sparse features and dense features: name -> values")
    k: int = Field(10, ge=1, description="items to return")
    candidates: int | None = Field(None, ge=1, description="items retrieved from the index before ranking")


class RecommendedItem(BaseModel):
    item: int = Field(description="index of the item in the corpus")
    score: float = Field(description="ranker probability")
    retrieval_score: float = Field(description="inner product of the user and item vectors")
    features: dict[str, list[int]] = Field(description="the item's item-side feature rows")


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    ranker_step: int
    retriever_step: int


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = Field(None, description="ranker checkpoint (default: newest of the startup path)")
    retriever: str | None = Field(None, description="two-tower checkpoint to reload the retriever from")


class ApiError(Exception):
    def __init__(self, status: int, field: str | None, message: str):
        self.status, self.field, self.message = status, field, message


class _AsciiJSON(JSONResponse):
    """JSON with \\u escapes: an error naming a field that holds a lone surrogate still renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": message}
    if field is not None:
        body["field"] = field
    return _AsciiJSON(body, status_code=status, headers=headers)


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
            return await _error(413, BodyTooLarge(self.limit).detail, "body")(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


NOT_FINITE = "the ranker's score is not a finite number for these dense values (too large for the model)"
OUTSIDE_ROOTS = "not under a directory this server may load checkpoints from (--admin-root)"


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def confine(path: str, roots: list[str], field: str) -> str:
    """``path`` -> the checkpoint directory it resolves to, symlinks followed (``os.path.realpath``),
    if both the path and that directory lie under one of ``roots``; else 403, with the same message
    whether or not the path exists (nothing is looked up before the check)."""
    try:
        real = os.path.realpath(path)
    except (ValueError, OSError):  # a NUL byte
        raise ApiError(403, field, OUTSIDE_ROOTS) from None
    if not _under(real, roots):
        raise ApiError(403, field, OUTSIDE_ROOTS)
    step = os.path.realpath(resolve_checkpoint(real))  # inside: errors may be specific (409)
    if not _under(step, roots):  # a LATEST or step-N symlink leading out
        raise ApiError(403, field, OUTSIDE_ROOTS)
    return step


def _authorized(header: str | None, token: bytes) -> bool:
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode("latin-1"), token)


def _loc(loc) -> str:
    """Pydantic location ('body', 'samples', 0, 'C1') -> 'samples[0].C1'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


class _StatsCollector:
    """Scrape-time metrics: cache and SSD counters of the serving tables, model steps, energy."""

    def __init__(self, store: ModelStore, meter):
        self.store, self.meter = store, meter

    def collect(self):
        r = self.store.retriever
        stats = {"ranker": self.store.ranker.table_stats().get("ssd")}
        if r is not None:
            stats["retriever"] = r.loaded.table_stats().get("ssd")
        stats = {k: v for k, v in stats.items() if v is not None}
        fams = {
            "lookups": CounterMetricFamily("tierec_cache_lookups", "unique IDs looked up in the DRAM caches", labels=["model"]),
            "hits": CounterMetricFamily("tierec_cache_hits", "lookups served from the DRAM cache", labels=["model"]),
            "admitted": CounterMetricFamily("tierec_cache_admitted", "rows admitted to the cache after warm-up", labels=["model"]),
            "bytes_read": CounterMetricFamily("tierec_ssd_read_bytes", "bytes read from the SSD table files", labels=["model"]),
            "resident": GaugeMetricFamily("tierec_cache_resident_rows", "rows in the DRAM cache", labels=["model"]),
        }
        for name, s in stats.items():
            for k, fam in fams.items():
                fam.add_metric([name], s[k])
        yield from fams.values()
        lookups = sum(s["lookups"] for s in stats.values())
        hit = GaugeMetricFamily("tierec_cache_hit_ratio", "hits / lookups over all cached tables (NaN: none)")
        hit.add_metric([], sum(s["hits"] for s in stats.values()) / lookups if lookups else float("nan"))
        yield hit
        step = GaugeMetricFamily("tierec_model_step", "training step of the serving checkpoint", labels=["model"])
        step.add_metric(["ranker"], self.store.ranker.step)
        if r is not None:
            step.add_metric(["retriever"], r.loaded.step)
        yield step
        rel = CounterMetricFamily("tierec_reloads", "checkpoint swaps")
        rel.add_metric([], self.store.reloads)
        yield rel
        if self.meter is not None and self.meter.running:
            rep = self.meter.snapshot()
            e = CounterMetricFamily("tierec_energy_joules", "energy since start (measured or estimated, see "
                                    "tierec_energy_measured)", labels=["component"])
            for c in rep.components:
                e.add_metric([c.name], c.joules)
            yield e
            m = GaugeMetricFamily("tierec_energy_measured", "1 if every energy component is measured by a counter")
            m.add_metric([], float(rep.measured))
            yield m
            cpu = CounterMetricFamily("tierec_cpu_seconds", "CPU seconds of the server process")
            cpu.add_metric([], rep.cpu_s)
            yield cpu


def create_app(store: ModelStore, settings: ServerSettings, admin: AdminSettings | None = None,
               threads: int | None = None) -> FastAPI:
    """The ASGI app over ``store``; ``admin``: enable ``/v1/admin/reload`` (module doc)."""
    cfg = settings
    encoder = FeatureEncoder(store.ranker.schema, cfg.max_ids, cfg.max_id_bytes)
    schema = store.ranker.schema
    user_allowed = set(schema.dense) | {f.name for f in schema.sparse if f.side == "user"}
    executor = ThreadPoolExecutor(1, thread_name_prefix="tierec-model",
                                  initializer=(lambda: torch.set_num_threads(threads)) if threads else None)
    encode_pool = ThreadPoolExecutor(cfg.encode_threads, thread_name_prefix="tierec-encode")

    async def encode(samples: list, **kw) -> Encoded:
        """Validate and hash off the event loop (hashing a long string takes a while)."""
        return await asyncio.get_running_loop().run_in_executor(encode_pool, functools.partial(
            encoder.encode, samples, **kw))
    registry = CollectorRegistry()
    requests = Counter("tierec_requests", "HTTP requests", ["endpoint", "code"], registry=registry)
    latency = Histogram("tierec_request_seconds", "request latency (s)", ["endpoint"], buckets=LATENCY_BUCKETS,
                        registry=registry)
    batch_size = Histogram("tierec_batch_size", "samples per model call", buckets=BATCH_BUCKETS, registry=registry)
    samples = Counter("tierec_samples", "samples scored", registry=registry)
    model_time = Histogram("tierec_model_seconds", "time of one ranker call (one batch), table reads included (s)",
                           buckets=STAGE_BUCKETS, registry=registry)
    read_time = Histogram("tierec_ssd_read_seconds", "time one ranker batch waited on reads of missed rows from the "
                          "table files (s; 0 when every row was cached)", buckets=STAGE_BUCKETS, registry=registry)
    ProcessCollector(registry=registry)
    meter = energy.meter(work_unit="samples")
    registry.register(_StatsCollector(store, meter))

    def on_batch(n: int) -> None:
        batch_size.observe(n)
        samples.inc(n)
        meter.add_work(n)

    @torch.no_grad()
    def run_predict(payloads: list[Encoded]) -> list[tuple[np.ndarray, int]]:
        lm = store.ranker  # one model for the whole batch, even if a reload swaps it meanwhile
        dense, kjt = Encoded.concat(payloads).to_inputs(lm.schema.sparse_names)
        read0 = lm.shared.read_s if lm.shared is not None else 0.0
        t0 = time.perf_counter()
        logits = lm.forward(dense, kjt).numpy()
        model_time.observe(time.perf_counter() - t0)
        if lm.shared is not None:
            read_time.observe(lm.shared.read_s - read0)
        out, a = [], 0
        for p in payloads:
            out.append((logits[a : a + len(p)], lm.step))
            a += len(p)
        return out

    def upkeep() -> None:
        for lm in (store.ranker, getattr(store.retriever, "loaded", None)):
            if lm is not None:
                lm.maintain()

    batcher = DynamicBatcher(run_predict, cfg.max_batch, cfg.max_wait_ms / 1000, executor, on_batch, upkeep)

    @torch.no_grad()
    def run_recommend(user: Encoded, k: int, n_cand: int) -> dict:
        ret, lm = store.retriever, store.ranker
        ip, ids = ret.search(user, n_cand)
        keep = ids[0] >= 0
        ip, ids = ip[0][keep], ids[0][keep]
        items = take_items(ret.corpus, ids)
        batch = user.take(list(user.sparse), repeat=len(ids))
        for key in ret.loaded.model.item_keys:
            batch.sparse[key] = items.sparse[key]
        dense, kjt = batch.to_inputs(lm.schema.sparse_names)
        logits = lm.forward(dense, kjt)
        on_batch(len(ids))
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

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        meter.start()
        try:
            yield
        finally:
            await batcher.stop()
            meter.stop()
            executor.shutdown(wait=True)
            encode_pool.shutdown(wait=True)

    app = FastAPI(title="tierec serving", version="1", lifespan=lifespan,
                  description="Recommendation inference with embedding tables served from the SSD tier.")
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)  # inside `observe`: 413s are counted

    @app.middleware("http")
    async def observe(request: Request, call_next):
        t0 = time.perf_counter()
        route = request.url.path if request.url.path in KNOWN_PATHS else "other"
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 -- never let an exception end the connection without an answer
            log.exception("unhandled error on %s", request.url.path)
            response = _error(500, "internal server error")
        latency.labels(route).observe(time.perf_counter() - t0)
        requests.labels(route, str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0] if errs else {"loc": ("body",), "msg": "invalid request", "type": ""}
        if e.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {e.get('ctx', {}).get('error', e['msg'])}", "body")
        return _error(422, e["msg"], _loc(e.get("loc", ())))

    @app.exception_handler(InputError)
    async def on_input(request: Request, exc: InputError):
        return _error(422, exc.message, exc.field)

    @app.exception_handler(ApiError)
    async def on_api(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.field)

    @app.exception_handler(BodyTooLarge)
    async def on_too_large(request: Request, exc: BodyTooLarge):
        return _error(413, exc.detail, "body")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "body" if exc.status_code == 400 else None)

    @app.post("/v1/predict", response_model=PredictResponse)
    async def predict(req: PredictRequest):
        """Score samples with the ranker (click probability)."""
        if len(req.samples) > cfg.max_batch:
            raise ApiError(413, "samples", f"{len(req.samples)} samples, at most {cfg.max_batch} per request")
        enc = await encode(req.samples)
        logits, step = await batcher.submit(enc)
        bad = np.flatnonzero(~np.isfinite(logits))
        if bad.size:
            raise ApiError(422, f"samples[{bad[0]}]", NOT_FINITE)
        with np.errstate(over="ignore"):
            probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
        return {"probabilities": probs.tolist(), "logits": logits.tolist(), "step": step}

    @app.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(req: RecommendRequest):
        """Top-k items for a user: HNSW retrieval over two-tower item vectors, then ranking."""
        if store.retriever is None:
            raise ApiError(404, None, "no retriever loaded: start the server with --retriever TWO_TOWER_CHECKPOINT")
        if req.k > cfg.max_k:
            raise ApiError(422, "k", f"k={req.k}, at most {cfg.max_k}")
        n_cand = req.candidates if req.candidates is not None else max(cfg.default_candidates, req.k)
        if n_cand > cfg.max_candidates:
            raise ApiError(422, "candidates", f"{n_cand} candidates, at most {cfg.max_candidates}")
        if n_cand < req.k:
            raise ApiError(422, "candidates", f"candidates ({n_cand}) must be >= k ({req.k})")
        user = await encode([req.user], where="user", allowed=user_allowed)
        res = await asyncio.get_running_loop().run_in_executor(executor, run_recommend, user, req.k, n_cand)
        executor.submit(upkeep)  # after the answer: cache admission does not delay this request
        return res

    @app.get("/healthz")
    async def healthz():
        def desc(lm):
            return {"checkpoint": str(lm.path), "step": lm.step, "kind": lm.kind, "tables": lm.options.tables}

        r = store.retriever
        return {"status": "ok", "ranker": desc(store.ranker), "reloads": store.reloads,
                "retriever": None if r is None else {**desc(r.loaded), "items": len(r.corpus)}}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if admin is not None:
        reload_lock = asyncio.Lock()

        def load(req: ReloadRequest) -> tuple:
            paths = {f: confine(p, admin.roots, f) for f in ("checkpoint", "retriever")
                     if (p := getattr(req, f)) is not None}
            return admin.reload(paths.get("checkpoint"), paths.get("retriever"))

        @app.post("/v1/admin/reload", openapi_extra={"requestBody": {"content": {"application/json": {
            "schema": ReloadRequest.model_json_schema()}}}})
        async def admin_reload(request: Request):
            """Load a checkpoint beside the serving one, then swap it in; no request is dropped.
            Needs ``Authorization: Bearer TOKEN``; paths must lie under the admin roots."""
            if not _authorized(request.headers.get("authorization"), admin.token):
                return _error(401, "missing or wrong bearer token", "authorization", {"WWW-Authenticate": "Bearer"})
            raw = await request.body()
            try:
                req = ReloadRequest.model_validate_json(raw) if raw.strip() else ReloadRequest()
            except ValidationError as e:
                raise RequestValidationError(e.errors(include_url=False)) from None
            async with reload_lock:
                try:
                    ranker, retriever = await asyncio.to_thread(load, req)
                except TierecError as e:
                    raise ApiError(409, "checkpoint", str(e)) from None
                for name, new in (("checkpoint", ranker), ("retriever", getattr(retriever, "loaded", None))):
                    if new is not None and new.schema.to_json() != schema.to_json():
                        for m in (ranker, retriever):
                            if m is not None:
                                getattr(m, "loaded", m).close()
                        raise ApiError(409, name, f"{new.path}: a different schema than the serving model's")
                old = store.swap(ranker, retriever)
                # Close the replaced models on the model thread: every batch that took them ran before.
                for o in old:
                    executor.submit(getattr(o, "loaded", o).close)
            return await healthz()

    KNOWN_PATHS = {r.path for r in app.routes}
    app.state.store, app.state.registry, app.state.batcher, app.state.encoder = store, registry, batcher, encoder
    return app

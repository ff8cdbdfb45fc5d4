"""Several models on one machine: ``tierec serve-many``, one ``tierec serve`` process per model under a small
supervisor that routes ``/v1/models/{name}/...`` to it.

    tierec serve-many --model ranker=runs/dlrm --model small=runs/dlrm-int8 \\
        --model-args small="--tables dram" --model-cpus ranker=0 --model-cpus small=1

Each model is a child process (`Child`) with its own flags (``--model-args``: its memory budget and cache,
``--tables``, ``--cache-fraction``, ``--dense-budget``, ...), its own batcher and model thread, and its own
interpreter: a hot model's requests never wait behind a cold model's batch or for its GIL, only for the
cores they share; ``--model-cpus`` pins a child to cores of its own (``sched_setaffinity``), which is what
partitioning one accelerator among models (the MIG paper) amounts to on a CPU. The supervisor
(`create_multi_app`, a `MultiRouter`) is a minimal asyncio HTTP/1.1 reverse proxy (`tierec.inference.proxy`):
it forwards a request's head (path rewritten) and body bytes to its model's child over a pooled keep-alive
connection and the child's response bytes back unchanged -- no JSON parsed or re-encoded on the way -- so
every child's validation and errors (4xx with the field) reach the client as they are; a child that died
answers 503 for its model alone, one that does not answer within ``timeout`` 504. The children listen on loopback ports of their
own; the supervisor binds like ``tierec serve`` (loopback unless ``--allow-remote``).

Routes: ``POST /v1/models/{name}/predict`` and ``/recommend``, ``GET /v1/models/{name}/healthz`` and
``/metrics`` (the child's), ``GET /v1/models`` (every model, alive or not, and its step), ``GET /healthz``,
``GET /metrics`` (the supervisor's: requests and latency per model).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from tierec.errors import ConfigError
from tierec.inference.metrics import LATENCY_BUCKETS
from tierec.inference.proxy import BACKEND_ERRORS, Body, HttpError, Proxy, Reply, Request, Upstream, json_reply, reply

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
FORWARDED = {("POST", "predict"): "/v1/predict", ("POST", "recommend"): "/v1/recommend",  # route -> child's path
             ("GET", "healthz"): "/healthz", ("GET", "metrics"): "/metrics"}


@dataclass
class ModelSpec:
    """One served model: its route name, checkpoint (or export), more `tierec serve` flags, and the cores its
    process may run on (None: any)."""

    name: str
    checkpoint: str
    args: list[str] = field(default_factory=list)
    cpus: list[int] | None = None


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not NAME.fullmatch(name):
            raise ConfigError(f"{flag} {v!r}: expected NAME=VALUE with NAME of letters, digits, '_', '.', '-'")
        if name in out:
            raise ConfigError(f"{flag}: {name!r} given twice")
        out[name] = rest
    return out


def parse_specs(models: list[str], model_args: list[str] | None = None,
                model_cpus: list[str] | None = None) -> list[ModelSpec]:
    """``--model NAME=CHECKPOINT`` (repeated), ``--model-args NAME="FLAGS"``, ``--model-cpus NAME=0,1`` ->
    specs, checked (one-line `ConfigError` naming the flag)."""
    if not models:
        raise ConfigError("--model NAME=CHECKPOINT: give at least one model")
    paths = _pairs(models, "--model")
    extra = _pairs(model_args or [], "--model-args")
    cpus = _pairs(model_cpus or [], "--model-cpus")
    for flag, d in (("--model-args", extra), ("--model-cpus", cpus)):
        unknown = sorted(set(d) - set(paths))
        if unknown:
            raise ConfigError(f"{flag}: no --model named {unknown[0]!r} (models: {', '.join(paths)})")
    have = os.sched_getaffinity(0)
    specs = []
    for name, path in paths.items():
        if not path:
            raise ConfigError(f"--model {name}=: the checkpoint path is empty")
        args = shlex.split(extra.get(name, ""))
        for a in args:
            if a.split("=")[0] in ("--port", "--host", "--allow-remote", "--admin"):
                raise ConfigError(f"--model-args {name}: {a.split('=')[0]} is set by serve-many, not per model")
        cores = None
        if name in cpus:
            try:
                cores = sorted({int(c) for c in cpus[name].split(",") if c.strip()})
            except ValueError:
                raise ConfigError(f"--model-cpus {name}={cpus[name]!r}: expected core numbers, e.g. 0,1") from None
            if not cores or not set(cores) <= have:
                raise ConfigError(f"--model-cpus {name}={cpus[name]!r}: cores must be among {sorted(have)}")
        specs.append(ModelSpec(name, path, args, cores))
    return specs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """One model's `tierec serve` process on a loopback port; `wait` returns once its /healthz answers."""

    def __init__(self, spec: ModelSpec, log_dir: Path | None = None):
        self.spec, self.port = spec, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / f"{spec.name}.log", "w") if log_dir is not None else None
        cmd = [sys.executable, "-m", "tierec", "serve", spec.checkpoint, "--host", "127.0.0.1",
               "--port", str(self.port), *spec.args]
        self.proc = subprocess.Popen(cmd, stdout=self.log or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT if self.log else subprocess.PIPE, text=True)
        if spec.cpus is not None:
            os.sched_setaffinity(self.proc.pid, spec.cpus)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 600) -> None:
        t0 = time.monotonic()
        while True:
            if not self.alive():
                why = self.proc.stderr.read().strip().splitlines()[-1:] if self.proc.stderr else ["see its log"]
                raise ConfigError(f"model {self.spec.name!r} ({self.spec.checkpoint}): `tierec serve` exited "
                                  f"({self.proc.returncode}): {why[0] if why else ''}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > timeout:
                raise ConfigError(f"model {self.spec.name!r}: not up after {timeout:.0f} s")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.log is not None:
            self.log.close()


def start_children(specs: list[ModelSpec], log_dir: Path | None = None, timeout: float = 600) -> dict[str, Child]:
    """Every model's process, started together and waited for; on a failure the others are stopped."""
    children = {s.name: Child(s, log_dir) for s in specs}
    try:
        for c in children.values():
            c.wait(timeout)
    except BaseException:
        stop_children(children)
        raise
    return children


def stop_children(children: dict[str, Child]) -> None:
    for c in children.values():
        c.stop()


class MultiRouter(Proxy):
    """The supervisor's router over running ``children`` (module doc): a `Proxy` that maps
    ``/v1/models/{name}/<route>`` to the child's path (`FORWARDED`) and forwards the request there on a pooled
    keep-alive connection (`Upstream`), the child's answer going back byte for byte, and answers
    ``/v1/models``, ``/healthz`` and ``/metrics`` itself."""

    def __init__(self, children: dict[str, Child], max_body_bytes: int = 1 << 20, timeout: float = 60.0):
        super().__init__(max_body_bytes, timeout)
        self.children = children
        self.upstreams = {name: Upstream("127.0.0.1", c.port) for name, c in children.items()}
        self.registry = CollectorRegistry()
        self.requests = Counter("tierec_multi_requests", "requests forwarded, by model and status", ["model", "code"],
                                registry=self.registry)
        self.latency = Histogram("tierec_multi_request_seconds", "latency through the supervisor, by model (s)",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._latency = {name: self.latency.labels(name) for name in children}
        self._counts: dict[tuple[str, int], Any] = {}

    def _count(self, name: str, status: int) -> None:
        c = self._counts.get((name, status))
        if c is None:
            c = self._counts[name, status] = self.requests.labels(name, str(status))
        c.inc()

    async def handle(self, req: Request, body: Body) -> Reply:
        path = req.path
        if path.startswith("/v1/models/"):
            return await self.forward(req, body, *path[len("/v1/models/"):].partition("/")[::2])
        if req.method == "GET" and path in ("/v1/models", "/healthz", "/metrics"):
            await body.read()
            if path == "/metrics":
                return reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
            models = await asyncio.gather(*(self.describe(n, c) for n, c in self.children.items()))
            if path == "/v1/models":
                return json_reply(200, {"models": models})
            ok = all(m["alive"] for m in models)
            return json_reply(200 if ok else 503, {"status": "ok" if ok else "degraded", "models": models})
        raise HttpError(404, f"no route {req.method} {path}")

    async def forward(self, req: Request, body: Body, name: str, route: str) -> Reply:
        t0 = time.perf_counter()
        child = self.children.get(name)
        if child is None:
            raise HttpError(404, f"no model {name!r} (models: {', '.join(self.children)})", "name")
        target = FORWARDED.get((req.method, route))
        if target is None:
            raise HttpError(404, f"no route {req.method} /v1/models/{name}/{route}")
        data = await body.read()  # 413 from Content-Length before reading
        if not child.alive():
            self._count(name, 503)
            raise HttpError(503, f"model {name!r} is down (its process exited with {child.proc.returncode})", "name")
        try:
            async with asyncio.timeout(self.timeout):
                r = await self.upstreams[name].exchange(req.method, target.encode() + req.query,
                                                        req.forwarded_fields(), data)
        except TimeoutError:
            self._count(name, 504)
            raise HttpError(504, f"model {name!r} did not answer in {self.timeout:g} s", "name") from None
        except BACKEND_ERRORS as e:
            self._count(name, 503)
            raise HttpError(503, f"model {name!r} did not answer ({type(e).__name__})", "name") from None
        self._count(name, r.status)
        self._latency[name].observe(time.perf_counter() - t0)
        return Reply(r.raw, r.close, r.status)

    async def describe(self, name: str, child: Child) -> dict:
        d = {"name": name, "checkpoint": child.spec.checkpoint, "alive": child.alive(), "cpus": child.spec.cpus}
        if d["alive"]:
            try:
                async with asyncio.timeout(min(5.0, self.timeout)):
                    r = await self.upstreams[name].exchange("GET", b"/healthz", b"", b"")
                d["step"] = json.loads(r.body())["ranker"]["step"]
            except (TimeoutError, KeyError, TypeError, *BACKEND_ERRORS):
                d["alive"] = False
        return d

    async def close(self) -> None:
        for u in self.upstreams.values():
            u.close()


def create_multi_app(children: dict[str, Child], max_body_bytes: int = 1 << 20, timeout: float = 60.0) -> MultiRouter:
    """The supervisor's router over running ``children``: ``.serve(host, port)`` (blocking, until SIGINT or
    SIGTERM) or ``with .running() as url:`` (in a thread of its own)."""
    return MultiRouter(children, max_body_bytes, timeout)

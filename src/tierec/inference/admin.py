"""``POST /v1/admin/reload``: bearer token, paths confined to the admin roots, load beside, swap.

The route exists only with `AdminSettings` (`tierec serve --admin`). A request without the right
``Authorization: Bearer TOKEN`` gets 401 before its body is read; a path that does not resolve
(symlinks followed) under one of the roots gets 403, with the same message whether or not it exists.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from tierec.errors import TierecError
from tierec.inference.api import ApiError, ReloadRequest, error_response
from tierec.inference.model_store import ModelStore
from tierec.inference.workers import ModelWorker, loaded_model
from tierec.train.checkpoint import resolve_checkpoint

OUTSIDE_ROOTS = "not under a directory this server may load checkpoints from (--admin-root)"


@dataclass
class AdminSettings:
    """``POST /v1/admin/reload``: the bearer ``token``, the directories (real paths) reloads may read
    from, and ``reload(checkpoint, retriever) -> (ranker, retriever)`` loading replacement models
    (either None: keep the current one; a checkpoint None: the newest of the startup path)."""

    token: bytes
    roots: list[str]
    reload: Callable[[str | None, str | None], tuple]


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


class AdminReload:
    """The reload route of a server over ``store`` (`admin_reload`); reloads run one at a time, and the
    replaced models are closed on the model thread once every batch that took them has run.
    ``describe()``: the answer after a reload (the /healthz body)."""

    def __init__(self, store: ModelStore, admin: AdminSettings, worker: ModelWorker,
                 describe: Callable[[], Awaitable[dict]]):
        self.store, self.admin, self.worker, self.describe = store, admin, worker, describe
        self.schema = store.ranker.schema  # every model served must keep the startup schema
        self.lock = asyncio.Lock()

    def load(self, req: ReloadRequest) -> tuple:
        paths = {f: confine(p, self.admin.roots, f) for f in ("checkpoint", "retriever")
                 if (p := getattr(req, f)) is not None}
        return self.admin.reload(paths.get("checkpoint"), paths.get("retriever"))

    async def admin_reload(self, request: Request):
        """Load a checkpoint beside the serving one, then swap it in; no request is dropped.
        Needs ``Authorization: Bearer TOKEN``; paths must lie under the admin roots."""
        if not _authorized(request.headers.get("authorization"), self.admin.token):
            return error_response(401, "missing or wrong bearer token", "authorization",
                                  {"WWW-Authenticate": "Bearer"})
        raw = await request.body()
        try:
            req = ReloadRequest.model_validate_json(raw) if raw.strip() else ReloadRequest()
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from None
        async with self.lock:
            try:
                ranker, retriever = await asyncio.to_thread(self.load, req)
            except TierecError as e:
                raise ApiError(409, "checkpoint", str(e)) from None
            new_retriever = retriever.loaded if retriever is not None else None
            for name, new in (("checkpoint", ranker), ("retriever", new_retriever)):
                if new is not None and new.schema.to_json() != self.schema.to_json():
                    for m in (ranker, retriever):
                        if m is not None:
                            loaded_model(m).close()
                    raise ApiError(409, name, f"{new.path}: a different schema than the serving model's")
            old = self.store.swap(ranker, retriever)
            for o in old:  # on the model thread: every batch that took them ran before
                self.worker.later(loaded_model(o).close)
        return await self.describe()

"""Dynamic batching: concurrent requests are coalesced into one model call.

`DynamicBatcher.submit(items)` queues a request's items and awaits their results. One
asyncio task takes the first waiting request, then keeps taking more until the batch
holds ``max_batch`` items or ``max_wait_s`` has passed since the first, and runs
``run(items) -> results`` on the model thread (one thread: the models and their
caches are not thread-safe, and the event loop stays free to accept requests). While a
batch runs, new requests queue up and form the next one, so batches grow with the load.
When a batch is done and nothing waits, ``idle()`` does deferred upkeep on the model thread.

One request never fails another: samples are validated before they are submitted, and if a
batch's model call raises all the same, its requests are run again one by one, so only the
request that fails alone gets the error (logged) and the others their results.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class DynamicBatcher:
    def __init__(self, run: Callable[[list], list], max_batch: int, max_wait_s: float,
                 executor: ThreadPoolExecutor, on_batch: Callable[[int], None] | None = None,
                 idle: Callable[[], object] | None = None):
        """``run(payloads) -> results`` (one result per payload) runs one batch; a payload is one
        request's samples and ``len(payload)`` their number (at most ``max_batch``). ``idle()``
        runs on the model thread after a batch when no request is waiting (deferred upkeep such
        as cache admission; a request that arrives meanwhile waits for it)."""
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait >= 0, got {max_batch}, {max_wait_s}")
        self.run, self.max_batch, self.max_wait_s = run, int(max_batch), float(max_wait_s)
        self.executor, self.on_batch, self.idle = executor, on_batch, idle
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._held = None  # a request that did not fit into the previous batch

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(self._queue))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, payload):
        """Queue one request's ``payload`` and wait for its result."""
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.submit before start()")
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((payload, fut))
        return await fut

    async def _collect(self, queue: asyncio.Queue) -> list:
        """The next batch: the first waiting request, then more until full or ``max_wait_s`` passed."""
        loop = asyncio.get_running_loop()
        first, self._held = (self._held, None) if self._held is not None else (await queue.get(), None)
        group, n = [first], len(first[0])
        deadline = loop.time() + self.max_wait_s
        while n < self.max_batch:
            left = deadline - loop.time()
            try:
                req = await asyncio.wait_for(queue.get(), left) if left > 0 else queue.get_nowait()
            except (TimeoutError, asyncio.QueueEmpty):
                break
            if n + len(req[0]) > self.max_batch:
                self._held = req
                break
            group.append(req)
            n += len(req[0])
        return [(p, fut) for p, fut in group if not fut.done()]  # drop requests whose client went away

    async def _loop(self, queue: asyncio.Queue) -> None:
        """Runs until cancelled (`stop`); ``queue``: the one `start` made, where `submit` puts requests."""
        loop = asyncio.get_running_loop()
        while True:
            group = await self._collect(queue)
            if not group:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.run, [p for p, _ in group])
            except Exception as e:
                if len(group) == 1:
                    _fail(group[0][1], e)
                    continue
                log.warning("a batch of %d requests failed in the model (%r): running them one by one", len(group), e)
                results = [await self._alone(p, fut) for p, fut in group]
            ok = [(len(p), fut, r) for (p, fut), r in zip(group, results, strict=True) if r is not _FAILED]
            if self.on_batch is not None and ok:
                self.on_batch(sum(n for n, _, _ in ok))
            for _, fut, r in ok:
                if not fut.done():
                    fut.set_result(r)
            if self.idle is not None and self._held is None and queue.empty():
                try:
                    await loop.run_in_executor(self.executor, self.idle)
                except Exception:
                    log.exception("idle work after a batch failed")

    async def _alone(self, payload, fut: asyncio.Future):
        """One request of a failed batch, run by itself: its result, or `_FAILED` (its future has the error)."""
        try:
            return (await asyncio.get_running_loop().run_in_executor(self.executor, self.run, [payload]))[0]
        except Exception as e:
            return _fail(fut, e)


_FAILED = object()


def _fail(fut: asyncio.Future, e: Exception) -> object:
    """The request's error goes to its handler (the server logs it and answers 500)."""
    if not fut.done():
        fut.set_exception(e)
    return _FAILED

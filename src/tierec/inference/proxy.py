"""A minimal asyncio HTTP/1.1 server and reverse proxy: the router of ``tierec serve-many``
(`tierec.inference.multi`), light enough that the hop costs little next to the model.

`Proxy` serves client connections (asyncio streams, one task per connection, keep-alive): it reads a
request head (bounded: ``max_head_bytes``, else 431), parses it (`parse_head`: the request line and header
fields, strictly; anything malformed is 400 and that connection is closed), and hands it with a `Body` to
`Proxy.handle`, which answers a `Reply` -- the raw bytes of a response. A subclass routes: it answers
itself (errors, its own routes) or forwards the head (path rewritten) and the body bytes as they are to an
`Upstream`, a small pool of keep-alive connections to one backend, whose response bytes (status line,
headers and body, Content-Length or chunked framing) go back to the client unchanged. Nothing in the
proxy parses or re-encodes JSON.

Bodies: ``Content-Length`` over ``max_body_bytes`` is 413 from the header, before a byte of the body is
read; a chunked body is decoded as it arrives and 413 once it passes the bound, and forwarded with a
Content-Length. After an answer that leaves a body unread the connection is closed (reading, and dropping,
what the client still sends for a moment first, so it sees the answer rather than a reset). ``Expect:
100-continue`` is answered when the body is read, so a refused body is never sent. Each client connection
is a task of its own and a backend's response is read whole before it is written back, so a slow or bad
client holds its own connection only; reads from clients are bounded in time (``idle_s`` for a head,
``timeout`` for a body), as are exchanges with a backend (``timeout``: the subclass answers 504).
HTTP/1.0 clients are answered and the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])")
HEADER_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
# not forwarded to a backend: hop-by-hop fields, and the framing the proxy sets itself
HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
                 b"upgrade", b"host", b"content-length", b"expect"})
REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout",
           411: "Length Required", 413: "Content Too Large", 417: "Expectation Failed",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


# what `Upstream.exchange` raises when a backend fails (refused, reset, closed early, a malformed answer)
BACKEND_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


class HttpError(Exception):
    """An answer instead of a forward: ``status`` with ``{"error": message, "field": field}``."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


@dataclass
class Request:
    """A parsed request head. ``fields``: every header line as received (name lower-cased, raw line)."""

    method: str
    path: str            # the target's path, without the query
    query: bytes         # b"" or b"?..."
    version: int         # 0 or 1 (HTTP/1.x)
    fields: list[tuple[bytes, bytes]]
    content_length: int | None
    chunked: bool
    keep_alive: bool
    expect_continue: bool

    def forwarded_fields(self) -> bytes:
        """The end-to-end header lines (each with its CRLF), as the client sent them."""
        drop = HOP
        conn = [v for n, v in self._values() if n == b"connection"]
        if conn:  # fields named in Connection are hop-by-hop too
            drop = HOP | {t.strip().lower() for v in conn for t in v.split(b",")}
        return b"".join(line + b"\r\n" for name, line in self.fields if name not in drop)

    def _values(self) -> Iterator[tuple[bytes, bytes]]:
        for name, line in self.fields:
            yield name, line.split(b":", 1)[1].strip(b" \t")


def parse_head(head: bytes) -> Request:
    """A request head (request line and header fields, CRLF-separated, ending in an empty line) -> `Request`;
    `HttpError` 400 (or 501, 417) for anything malformed or unsupported (RFC 9112, strictly: no whitespace
    before a field's colon, no obsolete line folding, no bare CR/LF, no conflicting framing)."""
    lines = head.split(b"\r\n")
    if len(lines) < 3 or lines[-1] or lines[-2]:
        raise HttpError(400, "malformed request head")
    m = REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise HttpError(400, "malformed request line")
    method, target, minor = m.group(1).decode(), m.group(2), int(m.group(3))
    if target.startswith((b"http://", b"https://")):  # absolute form: the path is what routes
        target = b"/" + target.split(b"//", 1)[1].partition(b"/")[2]
    if not target.startswith(b"/"):
        raise HttpError(400, "request target must be a path")
    path, q, query = target.partition(b"?")
    fields: list[tuple[bytes, bytes]] = []
    lengths: set[bytes] = set()
    codings: list[bytes] = []
    connection: list[bytes] = []
    expect: list[bytes] = []
    host = 0
    for line in lines[1:-2]:
        f = HEADER_FIELD.fullmatch(line)
        if f is None:
            raise HttpError(400, "malformed header field")
        name, value = f.group(1).lower(), f.group(2)
        fields.append((name, line))
        if name == b"content-length":
            lengths.update(v.strip() for v in value.split(b","))
        elif name == b"transfer-encoding":
            codings += [v.strip().lower() for v in value.split(b",") if v.strip()]
        elif name == b"connection":
            connection += [v.strip().lower() for v in value.split(b",")]
        elif name == b"expect":
            expect.append(value.lower())
        elif name == b"host":
            host += 1
    if minor == 1 and host != 1:
        raise HttpError(400, "an HTTP/1.1 request needs one Host header")
    content_length = None
    if lengths:
        if len(lengths) > 1 or not all(v.isdigit() and len(v) < 19 for v in lengths):
            raise HttpError(400, "invalid Content-Length")
        content_length = int(lengths.pop())
    chunked = False
    if codings:
        if content_length is not None:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if codings != [b"chunked"]:
            raise HttpError(501, f"transfer coding {b', '.join(codings).decode(errors='replace')!r} not supported")
        chunked = True
    if any(e != b"100-continue" for e in expect):
        raise HttpError(417, "only Expect: 100-continue is supported")
    keep_alive = minor == 1 and b"close" not in connection
    return Request(method, path.decode("latin-1"), q + query, minor, fields, content_length, chunked, keep_alive,
                   bool(expect))


class Body:
    """A request's body, read when the handler asks for it (`read`), bounded by ``limit``."""

    def __init__(self, req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int,
                 timeout: float):
        self.req, self.reader, self.writer, self.limit, self.timeout = req, reader, writer, limit, timeout
        self.done = not req.chunked and not req.content_length  # nothing (left) to read
        self.started = False  # reading began (a failed read leaves the stream where it stopped)

    def check(self) -> None:
        """413 from the Content-Length alone, before anything is read."""
        if self.req.content_length is not None and self.req.content_length > self.limit:
            raise HttpError(413, f"request body over {self.limit} bytes", "body")

    async def read(self) -> bytes:
        self.check()
        if self.done:
            return b""
        self.started = True
        if self.req.expect_continue:
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            async with asyncio.timeout(self.timeout):
                if not self.req.chunked:
                    data = await self.reader.readexactly(self.req.content_length or 0)
                else:
                    data = await self._chunked()
        except TimeoutError:
            raise HttpError(408, "request body not received in time", "body") from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            raise HttpError(400, "incomplete or malformed request body", "body") from None
        self.done = True
        return data

    async def _chunked(self) -> bytes:
        out = bytearray()
        while True:
            line = await self.reader.readuntil(b"\r\n")
            size = line[:-2].split(b";", 1)[0].strip(b" \t")
            if not CHUNK_SIZE.fullmatch(size):
                raise HttpError(400, "malformed chunk size", "body")
            n = int(size, 16)
            if n == 0:
                break
            if len(out) + n > self.limit:
                raise HttpError(413, f"request body over {self.limit} bytes", "body")
            out += await self.reader.readexactly(n)
            if await self.reader.readexactly(2) != b"\r\n":
                raise HttpError(400, "malformed chunk", "body")
        trailers = 0
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":  # trailer fields: dropped
            trailers += len(line)
            if trailers > self.limit:
                raise HttpError(413, "trailer fields too large", "body")
        return bytes(out)


@dataclass
class Reply:
    """A whole response as bytes; ``close``: close the client connection after it."""

    raw: bytes
    close: bool = False
    status: int = 0


def reply(status: int, body: bytes, content_type: str = "application/json", close: bool = False) -> Reply:
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode("latin-1")
    return Reply(head + body, close, status)


def json_reply(status: int, obj: object, close: bool = False) -> Reply:
    return reply(status, json.dumps(obj).encode(), close=close)


def error_reply(e: HttpError, close: bool = False) -> Reply:
    return json_reply(e.status, {"error": e.message, "field": e.field}, close)


@dataclass
class Response:
    """A backend's response: ``raw`` (status line, header fields, body) as it came, its status, and whether
    the backend will close the connection after it."""

    raw: bytes
    status: int
    close: bool

    def body(self) -> bytes:
        return self.raw.partition(b"\r\n\r\n")[2]


async def read_response(reader: asyncio.StreamReader, max_bytes: int, method: str = "GET") -> Response:
    """One response from a backend, framing kept (Content-Length, chunked, or to the end of the stream)."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.") or len(head) < 12 or not head[9:12].isdigit():
            raise ValueError("malformed response from the backend")
        status = int(head[9:12])
        if status >= 200 or status == 101:
            break  # 1xx interim answers (none are asked for) are skipped
    length, chunked, close = None, False, head[7:8] == b"0"
    for line in head.split(b"\r\n")[1:-2]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value.endswith(b"chunked")
        elif name == b"connection":
            close = close or any(t.strip() == b"close" for t in value.split(b","))
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return Response(head, status, close)
    if chunked:
        out = bytearray(head)
        while True:
            line = await reader.readuntil(b"\r\n")
            n = int(line[:-2].split(b";", 1)[0], 16)
            out += line
            if len(out) + n > max_bytes:
                raise ValueError("response from the backend too large")
            if n == 0:
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    out += line
                out += line
                return Response(bytes(out), status, close)
            out += await reader.readexactly(n + 2)
    if length is not None:
        if length > max_bytes:
            raise ValueError("response from the backend too large")
        return Response(head + await reader.readexactly(length), status, close)
    out = bytearray(head)  # no framing: the body runs to the end of the stream
    while chunk := await reader.read(1 << 16):
        out += chunk
        if len(out) > max_bytes:
            raise ValueError("response from the backend too large")
    return Response(bytes(out), status, True)


class Upstream:
    """A backend at ``host:port`` and a small pool of idle keep-alive connections to it. `exchange` sends one
    request on a pooled connection (a new one when none is idle) and returns the response; a pooled
    connection that the backend closed meanwhile (it answers nothing) is replaced once. Connections idle for
    more than ``idle_s`` (under uvicorn's 5 s keep-alive) are not reused."""

    def __init__(self, host: str, port: int, max_idle: int = 16, idle_s: float = 4.0, max_head_bytes: int = 1 << 16,
                 max_response_bytes: int = 1 << 28):
        self.host, self.port, self.max_idle, self.idle_s = host, port, max_idle, idle_s
        self.max_head_bytes, self.max_response_bytes = max_head_bytes, max_response_bytes
        self.authority = f"{host}:{port}".encode()
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.opened = 0  # connections opened so far

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port, limit=self.max_head_bytes)

    def _pooled(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        now = time.monotonic()
        while self.idle:
            r, w, t = self.idle.pop()
            if now - t < self.idle_s and not r.at_eof() and not w.is_closing():
                return r, w
            w.close()
        return None

    async def exchange(self, method: str, target: bytes, fields: bytes, body: bytes) -> Response:
        """``method target`` with header lines ``fields`` (CRLF-terminated each; Host and Content-Length are
        added) and ``body``; raises one of `BACKEND_ERRORS` when the backend fails. Cancelled (a timeout), the
        connection is dropped, not pooled. A pooled connection found closed is retried on a new one: for
        idempotent requests only (the router forwards predict, recommend, healthz and metrics)."""
        framing = b"content-length: %d\r\n" % len(body) if body or method == "POST" else b""
        msg = b"%s %s HTTP/1.1\r\nhost: %s\r\n%s%s\r\n%s" % (method.encode(), target, self.authority, fields, framing,
                                                            body)
        while True:
            conn = self._pooled()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            r, w = conn
            try:
                w.write(msg)
                if w.transport.get_write_buffer_size():
                    await w.drain()
                resp = await read_response(r, self.max_response_bytes, method)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                w.close()
                if reused and not getattr(e, "partial", b""):
                    continue  # the backend had closed the idle connection: once more on a new one
                raise
            except BaseException:
                w.close()
                raise
            if resp.close or len(self.idle) >= self.max_idle:
                w.close()
            else:
                self.idle.append((r, w, time.monotonic()))
            return resp

    def close(self) -> None:
        for _, w, _ in self.idle:
            w.close()
        self.idle.clear()


class Proxy:
    """The HTTP/1.1 server loop (module doc); subclasses implement `handle`."""

    def __init__(self, max_body_bytes: int = 1 << 20, timeout: float = 60.0, max_head_bytes: int = 1 << 14,
                 idle_s: float = 30.0):
        self.max_body_bytes, self.timeout = max_body_bytes, timeout
        self.max_head_bytes, self.idle_s = max_head_bytes, idle_s
        self._tasks: set[asyncio.Task] = set()  # one per open client connection

    async def handle(self, req: Request, body: Body) -> Reply:
        raise NotImplementedError

    async def close(self) -> None:
        """Called once the server stopped (drop pooled connections)."""

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_s):
                        head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    return await self._send(reader, writer, error_reply(HttpError(
                        431, f"request head over {self.max_head_bytes} bytes"), True), linger=True)
                except (asyncio.IncompleteReadError, TimeoutError):
                    return  # the client went away (or stayed silent): nothing to answer
                head = head.lstrip(b"\r\n")  # a stray CRLF between requests is allowed
                if not head:
                    continue
                try:
                    req = parse_head(head)
                except HttpError as e:
                    return await self._send(reader, writer, error_reply(e, True), linger=True)
                body = Body(req, reader, writer, self.max_body_bytes, self.timeout)
                try:
                    rep = await self.handle(req, body)
                except HttpError as e:
                    rep = error_reply(e)
                    if not (body.done or body.started or req.expect_continue):
                        with contextlib.suppress(HttpError):  # a body within bounds: dropped, to keep the connection
                            await body.read()
                except Exception:
                    log.exception("serving %s %s", req.method, req.path)
                    rep = error_reply(HttpError(500, "internal error in the router"))
                close = rep.close or not req.keep_alive or not body.done
                await self._send(reader, writer, rep, close, linger=not body.done)
                if close:
                    return
        except (ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # shutdown; ending normally (3.11's stream callback would log a cancelled task's exception)
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _send(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rep: Reply,
                    close: bool = True, linger: bool = False) -> None:
        raw = rep.raw
        if close and b"\r\nconnection: close\r\n" not in raw[:raw.find(b"\r\n\r\n") + 2].lower():
            end = raw.index(b"\r\n") + 2  # tell the client (a backend's answer does not say so)
            raw = raw[:end] + b"connection: close\r\n" + raw[end:]
        writer.write(raw)
        if writer.transport.get_write_buffer_size():
            async with asyncio.timeout(self.timeout):
                await writer.drain()
        if linger:  # the client may still be sending a body we will not read: drop it for a moment, then close
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(2.0):
                    while await reader.read(1 << 16):
                        pass

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    sock: socket.socket | None = None) -> asyncio.Server:
        if sock is not None:
            return await asyncio.start_server(self._connection, sock=sock, limit=self.max_head_bytes)
        return await asyncio.start_server(self._connection, host, port, limit=self.max_head_bytes)

    def serve(self, host: str, port: int) -> None:
        """Serve on ``host:port`` until SIGINT or SIGTERM (from the main thread)."""
        async def main() -> None:
            server = await self.start(host, port)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                await stop.wait()
            finally:
                await self.shutdown(server)
        asyncio.run(main())

    async def shutdown(self, server: asyncio.Server) -> None:
        """Stop listening, end the open connections, `close`."""
        server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.close()

    @contextlib.contextmanager
    def running(self, sock: socket.socket | None = None) -> Iterator[str]:
        """Serve in a thread of its own (its own event loop) on ``sock`` (default: a free loopback port);
        yields the base URL."""
        if sock is None:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
        loop = asyncio.new_event_loop()
        started = threading.Event()
        holder: dict = {}

        async def up() -> None:
            holder["server"] = await self.start(sock=sock)
            started.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(up())
            loop.run_forever()

        t = threading.Thread(target=run, daemon=True, name="tierec-proxy")
        t.start()
        if not started.wait(30):
            raise RuntimeError("the proxy did not start")
        host, port = sock.getsockname()[:2]
        try:
            yield f"http://{host}:{port}"
        finally:
            asyncio.run_coroutine_threadsafe(self.shutdown(holder["server"]), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            t.join(30)
            loop.close()
            sock.close()

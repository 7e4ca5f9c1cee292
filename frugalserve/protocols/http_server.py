"""A lean HTTP/1.1 server for the V2 handler: httptools parsing on asyncio (uvloop) protocols.

Why not uvicorn: on a small model the server's own per-request work is the bottleneck, and an
ASGI server spends it on message dicts, header re-validation and two socket writes per
response. Here a response is one write, and a request is one task. Keep-alive, pipelining
(answered in order), chunked request bodies, `Expect: 100-continue`, body limits (413) and
graceful shutdown (in-flight requests finish) are handled; the ASGI app remains for embedding.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import deque
from http import HTTPStatus
from urllib.parse import unquote

import httptools
import orjson

from .v2_rest import Headers, Response, V2Handler

log = logging.getLogger("frugalserve.http")

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_MAX_PIPELINED = 64  # stop reading from a connection that has this many requests waiting
_MAX_URL = 65535
# httptools buffers a request line or header however long it is: past this many bytes of one
# request's head, refuse it (the body limit alone left a client free to send 200 MB of headers)
MAX_HEAD_BYTES = 1 << 20
_Request = tuple[str, str, Headers, bytes, bool]  # method, path, headers, body, keep-alive


def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))


def encode(response: Response, keep_alive: bool, head: bool = False) -> bytes:
    """The response as bytes; `head`: for a HEAD request, the headers only (a body there would
    be read as the start of the next response on the connection)."""
    status, headers, body = response
    parts = [_status_line(status)]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"content-length: %d\r\n" % len(body))
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts += (b"\r\n", b"" if head else body)
    return b"".join(parts)


def _refusal(status: int, message: str) -> bytes:
    return encode((status, ((b"content-type", b"application/json"),),
                   orjson.dumps({"error": message})), keep_alive=False)


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer):
        self.server = server
        self.handler = server.handler
        self.limit = server.handler.max_body_bytes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[_Request] = deque()
        self.busy = False  # a request of this connection is being answered
        self._answering: asyncio.Task | None = None
        self.closed = False
        self.read_paused = False
        self._in_head = True  # between requests, or inside one's request line and headers
        self._head_size = 0
        self._url = b""
        self._headers: Headers = {}
        self._body: list[bytes] = []
        self._size = 0

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        # the client went away: cancelling the answer cancels the request's future, so the
        # request is recorded as 499; still queued, it never runs (its batcher drops it)
        self.waiting.clear()
        if self._answering is not None:
            self._answering.cancel()
        # the parser refers back to this connection: without the cycle, a closed connection
        # is freed at once rather than at the next cyclic GC pass (rare under load: app.py)
        self.parser = None

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_size += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            if not self.closed:
                self._refuse(400, f"malformed HTTP request: {exc}")
        if self._in_head and self._head_size > MAX_HEAD_BYTES and not self.closed:
            self._refuse(431, f"request line and headers exceed {MAX_HEAD_BYTES} bytes")

    def pause_writing(self) -> None:
        self._pause_reading()

    def resume_writing(self) -> None:
        self._resume_reading()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        if self.closed:
            return
        self._url += url
        if len(self._url) > _MAX_URL:  # httptools.parse_url's own limit
            self._refuse(414, f"request URL exceeds {_MAX_URL} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self.closed:
            return
        length = self._headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            self._refuse(413, f"request body of {int(length)} bytes exceeds the "
                              f"{self.limit}-byte limit")
            return
        if self._headers.get(b"expect", b"").lower() == b"100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.closed:
            return
        self._size += len(body)
        if self._size > self.limit:
            self._refuse(413, f"request body exceeds the {self.limit}-byte limit")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        # the next request's head starts here; what of it shares the chunk being parsed goes
        # uncounted (one read at most)
        self._in_head = True
        self._head_size = 0
        if self.closed:
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError as exc:
            self._refuse(400, f"malformed request URL: {exc}")
            return
        path = url.path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        if url.query:  # kept for the routes that read one (admin); the handler splits it off
            path = f"{path}?{url.query.decode('latin-1')}"
        request = (self.parser.get_method().decode("ascii"), path, self._headers, body,
                   self.parser.should_keep_alive())
        if self.busy:
            self.waiting.append(request)
            if len(self.waiting) >= _MAX_PIPELINED:
                self._pause_reading()
        else:
            self._start(request)

    # -- answering ---------------------------------------------------------------------------

    def _start(self, request: _Request) -> None:
        self.busy = True
        self._answering = self.server.loop.create_task(self._answer(request))

    async def _answer(self, request: _Request) -> None:
        method, path, headers, body, keep_alive = request
        response = await self.handler.handle(method, path, headers, body)
        self.busy = False
        self._answering = None
        if self.closed:
            return
        keep_alive = keep_alive and not self.server.stopping
        self.transport.write(encode(response, keep_alive, method == "HEAD"))
        if not keep_alive:
            self.closed = True
            self.transport.close()
        elif self.waiting:
            self._start(self.waiting.popleft())
            if self.read_paused and len(self.waiting) < _MAX_PIPELINED // 2:
                self._resume_reading()

    def _refuse(self, status: int, message: str) -> None:
        """Answer an unreadable request and close: the rest of the stream cannot be trusted."""
        self.closed = True
        self.transport.write(_refusal(status, message))
        self.transport.close()

    def _pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def close_if_idle(self) -> bool:
        if not self.busy and not self.waiting:
            if not self.closed:
                self.closed = True
                self.transport.close()
            return True
        return False


class HttpServer:
    """Serves a V2Handler; `serve()` runs until `stop()`, then drains requests and the core."""

    def __init__(self, handler: V2Handler, host: str = "127.0.0.1", port: int = 8000):
        if not 0 <= port <= 65535:  # uvloop would listen on port % 65536 without a word
            raise ValueError(f"port {port} is outside 0-65535")
        self.handler = handler
        self.host = host
        self.port = port
        self.connections: set[_Connection] = set()
        self.stopping = False
        self.started = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    async def serve(self, grace_s: float = 30.0) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self.handler.dataplane.start()
        try:
            server = await self.loop.create_server(lambda: _Connection(self), self.host,
                                                   self.port, reuse_address=True, backlog=2048)
        except OSError:
            await self.handler.dataplane.stop()
            raise
        self.port = server.sockets[0].getsockname()[1]
        # Everything loaded so far (engines, models, libraries) lives as long as the server:
        # keep it out of the cyclic GC, whose full passes over it stalled requests by ~70 ms.
        gc.collect()
        gc.freeze()
        self.started.set()
        log.info("serving on http://%s:%d", self.host, self.port)
        try:
            await self._stop.wait()
        finally:
            self.stopping = True
            server.close()
            await self._drain_connections(grace_s)
            await self.handler.dataplane.stop()

    def stop(self) -> None:
        """Thread-safe: begin a graceful shutdown."""
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)

    async def _drain_connections(self, grace_s: float) -> None:
        deadline = self.loop.time() + grace_s
        while self.connections and self.loop.time() < deadline:
            for conn in list(self.connections):
                if conn.close_if_idle():
                    self.connections.discard(conn)
            if self.connections:
                await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.transport.close()

"""A minimal HTTP/1.1 keep-alive client connection for the load generator.

An asyncio Protocol rather than streams or an HTTP library: the request bytes are prepared once,
and a response is parsed straight from the receive buffer, so one core can drive thousands of
requests a second. It speaks just what a benchmark needs: one request at a time per connection
(no pipelining) and responses framed by Content-Length.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from urllib.parse import urlsplit


class ProtocolError(ConnectionError):
    """The server's response cannot be framed (no Content-Length, or a malformed head)."""


def prepare_request(method: str, url: str, body: bytes = b"",
                    headers: Mapping[str, str] | None = None) -> bytes:
    """The full request as bytes, ready to be written again and again on a keep-alive socket."""
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}",
             f"Content-Length: {len(body)}"]
    if body and not any(k.lower() == "content-type" for k in headers or {}):
        lines.append("Content-Type: application/json")
    lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"{url}: only http:// URLs are supported")
    return parts.hostname or "127.0.0.1", parts.port or 80


class HttpConnection(asyncio.Protocol):
    """Send a prepared request, await (status, body); then the next one on the same socket."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.sent_at = 0.0  # perf_counter of the request in flight, for the caller's watchdog
        self._buffer = bytearray()
        self._waiter: asyncio.Future | None = None
        self._status = 0
        self._body_at = -1  # where the body starts in the buffer, -1 while the head is incomplete
        self._end = 0
        self._close_after = False

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, host, port)
        return conn

    @property
    def busy(self) -> bool:
        return self._waiter is not None

    def request(self, raw: bytes) -> asyncio.Future:
        if self.closed:
            raise ConnectionError("connection is closed")
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self.transport.write(raw)
        return waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str = "connection aborted") -> None:
        """Drop the connection now; the request in flight fails with `reason`."""
        self._fail(ConnectionError(reason))
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is not None:
            try:
                self._parse()
            except ProtocolError as exc:
                self._fail(exc)
                self.abort(str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionError("server closed the connection"))

    # -- framing -----------------------------------------------------------------------------

    def _parse(self) -> None:
        buffer = self._buffer
        if self._body_at < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._status, length, self._close_after = _parse_head(bytes(buffer[:end]))
            self._body_at = end + 4
            self._end = self._body_at + length
        if len(buffer) < self._end:
            return
        body = bytes(buffer[self._body_at:self._end])
        del buffer[:self._end]
        self._body_at = -1
        waiter, self._waiter = self._waiter, None
        if not waiter.done():
            waiter.set_result((self._status, body))
        if self._close_after:
            self.closed = True
            self.close()

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """(status, content length, close after) from a response head."""
    if not head.startswith(b"HTTP/1.") or len(head) < 12:
        raise ProtocolError(f"not an HTTP/1.x response: {head[:40]!r}")
    try:
        status = int(head[9:12])
    except ValueError:
        raise ProtocolError(f"bad status line: {head[:40]!r}") from None
    lower = head.lower()
    close = b"\r\nconnection: close" in lower or head.startswith(b"HTTP/1.0")
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        if status in (204, 304) or 100 <= status < 200:
            return status, 0, close
        raise ProtocolError("response has no Content-Length (chunked bodies are not supported)")
    end = lower.find(b"\r\n", at + 2)
    try:
        return status, int(lower[at + 17:end if end >= 0 else None]), close
    except ValueError:
        raise ProtocolError("malformed Content-Length") from None

"""The Open Inference Protocol (V2) over HTTP, with Triton's repository and binary extensions.

Plain functions over (method, path, headers, body) rather than a framework router: on a small
model the per-request work of routing and request objects costs more than the model, and this
adapter only translates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..economics import report as spend_report
from ..serving import (
    BadInput,
    DataPlane,
    InferenceError,
    NotFound,
    PayloadTooLarge,
    Unavailable,
)
from ..serving.metrics import QueueGauge
from .v2_codec import decode_request, encode_response

log = logging.getLogger("frugalserve.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

_JSON = (b"content-type", b"application/json")
_OCTETS = (b"content-type", b"application/octet-stream")
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


class ClientGone(Exception):
    pass


Headers = dict[bytes, bytes]  # lower-case names
Response = tuple[int, tuple[tuple[bytes, bytes], ...], bytes]  # status, headers, body


class V2Handler:
    """The V2 routes over any HTTP transport: (method, path, headers, body) in, a response out.
    The native server (http_server.py) and the ASGI adapter below both call it."""

    def __init__(self, dataplane: DataPlane, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.dataplane = dataplane
        self.max_body_bytes = max_body_bytes
        self.registry = CollectorRegistry()
        self.registry.register(dataplane.metrics)
        self.registry.register(QueueGauge(dataplane.queue_depths))

    async def handle(self, method: str, path: str, headers: Headers, body: bytes) -> Response:
        try:
            return await self._route(method, path, headers, body)
        except InferenceError as exc:
            return error_response(exc)
        except Exception:
            log.exception("unhandled error on %s %s", method, path)
            return 500, (_JSON,), orjson.dumps({"error": "internal server error"})

    async def _route(self, method: str, path: str, headers: Headers, body: bytes) -> Response:
        query = ""
        if "?" in path:
            path, _, query = path.partition("?")
        parts = path.strip("/").split("/")
        if parts[0] == "v2":
            if len(parts) >= 2 and parts[1] == "admin":
                self.dataplane.authorize_admin(headers.get(b"authorization"))
                return await self._admin_route(method, parts[2:], query)
            if len(parts) >= 3 and parts[1] == "models":
                return await self._model_route(method, path, parts, headers, body)
            if method == "GET":
                if len(parts) == 1:
                    return _json(200, self.dataplane.server_metadata())
                if parts[1:] == ["health", "live"]:
                    return 200, (_JSON,), b""
                if parts[1:] == ["health", "ready"]:
                    return (200 if self.dataplane.ready else 400), (_JSON,), b""
            if method == "POST" and len(parts) >= 3 and parts[1] == "repository":
                self.dataplane.authorize_admin(headers.get(b"authorization"))
                return await self._repository_route(parts[2:])
        elif path == "/metrics" and method == "GET":
            return 200, ((b"content-type", CONTENT_TYPE_LATEST.encode()),), generate_latest(
                self.registry)
        raise NotFound(f"no route for {method} {path}")

    async def _model_route(self, method: str, path: str, parts: list[str], headers: Headers,
                           body: bytes) -> Response:
        # v2/models/{m}[/versions/{v}][/ready|/infer]
        model, rest = parts[2], parts[3:]
        version = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if method == "POST" and rest == ["infer"]:
            return await self._infer(model, version, headers, body)
        if method == "GET" and not rest:
            return _json(200, self.dataplane.model_metadata(model, version))
        if method == "GET" and rest == ["ready"]:
            self.dataplane.model_ready(model, version)
            return 200, (_JSON,), b""
        raise NotFound(f"no route for {method} {path}")

    async def _infer(self, model: str, version: str | None, headers: Headers,
                     body: bytes) -> Response:
        # the key is checked before the body is decoded: a wrong key costs no parsing
        tenant, tier = self.dataplane.authenticate(headers.get(b"authorization"),
                                                   headers.get(b"x-tenant"))
        header_length = headers.get(b"inference-header-content-length")
        request, binary = decode_request(
            body, None if header_length is None else _int_header(header_length), model, version,
            tenant, tier)
        response = await self.dataplane.infer(request)
        payload, json_length = encode_response(response, binary)
        if json_length is None:
            return 200, (_JSON,), payload
        return 200, (_OCTETS, (b"inference-header-content-length", str(json_length).encode())), \
            payload

    async def _admin_route(self, method: str, parts: list[str], query: str) -> Response:
        # GET /v2/admin/report?since=30d&by=tenant[&until=...]: economics.report as JSON
        if method == "GET" and parts == ["report"]:
            ledger = self.dataplane.ledger
            if ledger is None:
                raise NotFound("metering is off: this server keeps no ledger to report on")
            args = dict(parse_qsl(query))
            try:
                since = spend_report.parse_since(args.get("since", "30d"))
                until = spend_report.parse_since(args["until"]) if "until" in args else None
                # build_report refuses an unknown `by` itself (a ValueError, like the others)
                report = await asyncio.to_thread(spend_report.build_report, ledger.engine,
                                                 since, until, args.get("by", "model"))
            except ValueError as exc:
                raise BadInput(str(exc)) from None
            return _json(200, report.to_dict())
        raise NotFound(f"no admin route {method} /v2/admin/{'/'.join(parts)}")

    async def _repository_route(self, parts: list[str]) -> Response:
        if parts == ["index"]:
            return _json(200, self.dataplane.repository_index())
        if len(parts) == 3 and parts[0] == "models" and parts[2] in ("load", "unload"):
            if parts[2] == "load":
                await self.dataplane.load_model(parts[1])
            else:
                await self.dataplane.unload_model(parts[1])
            return _json(200, {})
        raise NotFound(f"no repository route /v2/repository/{'/'.join(parts)}")


class V2App:
    """The same routes as an ASGI application, for ASGI servers (uvicorn, Ray Serve)."""

    def __init__(self, dataplane: DataPlane, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.handler = V2Handler(dataplane, max_body_bytes)
        self.dataplane = dataplane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                body = await self._read_body(receive, scope["headers"])
            except PayloadTooLarge as exc:
                return await _send(send, error_response(exc))
            except ClientGone:
                return
            path = scope["path"]
            if scope.get("query_string"):
                path = f"{path}?{scope['query_string'].decode('latin-1')}"
            answer = self.handler.handle(scope["method"], path, dict(scope["headers"]), body)
            if scope["path"].endswith("/infer"):
                response = await _unless_gone(answer, receive)
                if response is None:
                    return
            else:
                response = await answer
            await _send(send, response)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.dataplane.start()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.dataplane.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _read_body(self, receive: Receive, headers: list) -> bytes:
        limit = self.handler.max_body_bytes
        for key, value in headers:
            if key == b"content-length" and int(value) > limit:
                raise PayloadTooLarge(f"request body of {int(value)} bytes exceeds the "
                                      f"{limit}-byte limit")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _unless_gone(answer: Awaitable[Response], receive: Receive) -> Response | None:
    """The answer, or None when the client disconnects first: the answer is cancelled then,
    as the native server does, so the request is recorded as 499 and, still queued, never
    runs. With the body read, the next message an ASGI server gives is the disconnect."""
    task = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(receive())
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and gone.result()["type"] == "http.disconnect":
            return None
        return await task  # a server that says something else: no more watching
    finally:
        task.cancel()  # no-op once done
        gone.cancel()


def _int_header(value: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        raise BadInput("header Inference-Header-Content-Length must be an integer") from None


def _json(status: int, doc: Any) -> Response:
    return status, (_JSON,), orjson.dumps(doc)


def error_response(exc: InferenceError) -> Response:
    headers: tuple = (_JSON,)
    if isinstance(exc, Unavailable):
        headers = (_JSON, (b"retry-after", str(exc.retry_after_s).encode()))
    elif exc.status == 401:
        headers = (_JSON, (b"www-authenticate", b'Bearer realm="frugalserve"'))
    return exc.status, headers, orjson.dumps({"error": str(exc)})


async def _send(send: Send, response: Response) -> None:
    status, headers, body = response
    await send({"type": "http.response.start", "status": status,
                "headers": (*headers, (b"content-length", str(len(body)).encode()))})
    await send({"type": "http.response.body", "body": body})

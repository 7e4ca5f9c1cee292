"""The Open Inference Protocol (V2) over HTTP, with Triton's repository and binary extensions.

A plain ASGI application rather than a framework router: on a small model the per-request work
of routing and request objects costs more than the model, and this adapter only translates.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..serving import (
    BadInput,
    DataPlane,
    InferenceError,
    NotFound,
    PayloadTooLarge,
    Unavailable,
)
from ..serving.metrics import QueueGauge
from ..serving.types import ANONYMOUS
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


class V2App:
    def __init__(self, dataplane: DataPlane, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.dataplane = dataplane
        self.max_body_bytes = max_body_bytes
        self.registry = CollectorRegistry()
        self.registry.register(dataplane.metrics)
        self.registry.register(QueueGauge(dataplane.queue_depths))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            try:
                await self._route(scope, receive, send)
            except InferenceError as exc:
                await _error(send, exc)
            except ClientGone:
                pass
            except Exception:
                log.exception("unhandled error on %s %s", scope["method"], scope["path"])
                await _send(send, 500, orjson.dumps({"error": "internal server error"}))
        elif kind == "lifespan":
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

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        parts = path.strip("/").split("/")
        if parts[0] == "v2":
            if len(parts) >= 3 and parts[1] == "models":
                return await self._model_route(scope, receive, send, method, parts)
            if method == "GET":
                if len(parts) == 1:
                    return await _json(send, 200, self.dataplane.server_metadata())
                if parts[1:] == ["health", "live"]:
                    return await _send(send, 200, b"")
                if parts[1:] == ["health", "ready"]:
                    return await _send(send, 200 if self.dataplane.ready else 400, b"")
            if method == "POST" and len(parts) >= 3 and parts[1] == "repository":
                return await self._repository_route(receive, send, parts[2:])
        elif path == "/metrics" and method == "GET":
            body = generate_latest(self.registry)
            return await _send(send, 200, body, ((b"content-type", CONTENT_TYPE_LATEST.encode()),))
        raise NotFound(f"no route for {method} {path}")

    async def _model_route(self, scope: Scope, receive: Receive, send: Send, method: str,
                           parts: list[str]) -> None:
        # v2/models/{m}[/versions/{v}][/ready|/infer]
        model, rest = parts[2], parts[3:]
        version = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if method == "POST" and rest == ["infer"]:
            return await self._infer(scope, receive, send, model, version)
        if method == "GET" and not rest:
            return await _json(send, 200, self.dataplane.model_metadata(model, version))
        if method == "GET" and rest == ["ready"]:
            self.dataplane.model_ready(model, version)
            return await _send(send, 200, b"")
        raise NotFound(f"no route for {method} {scope['path']}")

    async def _infer(self, scope: Scope, receive: Receive, send: Send, model: str,
                     version: str | None) -> None:
        header_length = content_length = None
        tenant = ANONYMOUS
        for key, value in scope["headers"]:
            if key == b"content-length":
                content_length = int(value)
            elif key == b"inference-header-content-length":
                header_length = _int_header(key, value)
            elif key == b"x-tenant":
                tenant = value.decode("latin-1")
        body = await self._read_body(receive, content_length)
        request, binary = decode_request(body, header_length, model, version, tenant)
        response = await self.dataplane.infer(request)
        payload, json_length = encode_response(response, binary)
        if json_length is None:
            headers = (_JSON, (b"content-length", str(len(payload)).encode()))
        else:
            headers = (_OCTETS, (b"content-length", str(len(payload)).encode()),
                       (b"inference-header-content-length", str(json_length).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _read_body(self, receive: Receive, content_length: int | None) -> bytes:
        limit = self.max_body_bytes
        if content_length is not None and content_length > limit:
            raise PayloadTooLarge(f"request body of {content_length} bytes exceeds the "
                                  f"{limit}-byte limit")
        message = await receive()
        body = message.get("body", b"")
        if not message.get("more_body"):
            if message["type"] == "http.disconnect":
                raise ClientGone
            return body
        chunks = [body]
        size = len(body)
        while message.get("more_body"):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _repository_route(self, receive: Receive, send: Send, parts: list[str]) -> None:
        await self._read_body(receive, None)  # Triton's load/unload bodies carry nothing we use
        if parts == ["index"]:
            return await _json(send, 200, self.dataplane.repository_index())
        if len(parts) == 3 and parts[0] == "models" and parts[2] in ("load", "unload"):
            if parts[2] == "load":
                await self.dataplane.load_model(parts[1])
            else:
                await self.dataplane.unload_model(parts[1])
            return await _json(send, 200, {})
        raise NotFound(f"no repository route /v2/repository/{'/'.join(parts)}")


def _int_header(key: bytes, value: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        raise BadInput(f"header {key.decode()} must be an integer") from None


async def _send(send: Send, status: int, body: bytes, headers: tuple = (_JSON,)) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": (*headers, (b"content-length", str(len(body)).encode()))})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, doc: Any) -> None:
    await _send(send, status, orjson.dumps(doc))


async def _error(send: Send, exc: InferenceError) -> None:
    headers: tuple = (_JSON,)
    if isinstance(exc, Unavailable):
        headers = (_JSON, (b"retry-after", str(exc.retry_after_s).encode()))
    await _send(send, exc.status, orjson.dumps({"error": str(exc)}), headers)

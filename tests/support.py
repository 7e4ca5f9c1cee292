"""Test support: small real models, a live server in a thread, V2 request helpers.

Imported by name (`import support`) from conftest.py and the test modules, so that the gated
model class pickled into the repository and the gate the tests hold are one and the same.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import uvicorn
import yaml
from prometheus_client.parser import text_string_to_metric_families

from frugalserve.app import ServerSettings, ServerThread, build_app

# --------------------------------------------------------------------------------------------
# A scikit-learn classifier whose predict can be held: any batch containing a row whose first
# feature is SENTINEL waits on a gate. Warm-up feeds zeros, so loading is never held.
# --------------------------------------------------------------------------------------------

SENTINEL = 999.0
FAIL_SENTINEL = -999.0  # a batch holding a row that starts with this makes predict raise
_gate = threading.Event()
_gate.set()
_entered = 0
_cond = threading.Condition()


class GatedClassifier:
    """Wraps a fitted classifier; only predict/predict_proba are gated."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.n_features_in_ = inner.n_features_in_
        self.classes_ = inner.classes_

    def _hold(self, x: np.ndarray) -> None:
        global _entered
        if x.shape[0] and bool((x[:, 0] == FAIL_SENTINEL).any()):
            raise ValueError("GatedClassifier was asked to fail")
        if x.shape[0] and bool((x[:, 0] == SENTINEL).any()):
            with _cond:
                _entered += 1
                _cond.notify_all()
            if not _gate.wait(60):
                raise RuntimeError("test gate was never opened")

    def predict(self, x: np.ndarray) -> np.ndarray:
        self._hold(x)
        return self.inner.predict(x)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        self._hold(x)
        return self.inner.predict_proba(x)


class BrokenClassifier:
    """Loads fine, fails every prediction (warm-up included): a model that cannot run."""

    def __init__(self, n_features: int = 64):
        self.n_features_in_ = n_features
        self.classes_ = np.arange(10)

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise ValueError("BrokenClassifier cannot predict")

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        raise ValueError("BrokenClassifier cannot predict")


class Hold:
    def __init__(self) -> None:
        with _cond:
            self.base = _entered

    def wait_entered(self, n: int = 1, timeout: float = 30.0) -> None:
        """Wait until n held batches have entered the model since the hold began."""
        with _cond:
            ok = _cond.wait_for(lambda: _entered - self.base >= n, timeout)
        assert ok, f"{n} held batch(es) never reached the model"


@contextmanager
def hold_gate():
    """Close the gate for the duration; it always reopens, even if the test fails."""
    _gate.clear()
    try:
        yield Hold()
    finally:
        _gate.set()


def release_gate() -> None:
    _gate.set()


def sentinel_row(n_features: int = 64, value: float = SENTINEL) -> np.ndarray:
    row = np.zeros((1, n_features), dtype=np.float32)
    row[0, 0] = value
    return row


# --------------------------------------------------------------------------------------------
# Model repositories
# --------------------------------------------------------------------------------------------


def write_model(repo: Path, name: str, versions: dict[str, Any], config: Any = None) -> Path:
    """Write <repo>/<name>/config.yaml and one artifact per version.

    versions: {"1": bytes (an ONNX model) or an object to pickle with joblib}.
    config: a dict (dumped as YAML), a str (written verbatim) or None (no config.yaml).
    """
    folder = Path(repo) / name
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        (folder / "config.yaml").write_text(text)
    for version, artifact in versions.items():
        vdir = folder / version
        vdir.mkdir(exist_ok=True)
        if isinstance(artifact, bytes):
            (vdir / "model.onnx").write_bytes(artifact)
        else:
            joblib.dump(artifact, vdir / "model.joblib")
    return folder


# --------------------------------------------------------------------------------------------
# A live server
# --------------------------------------------------------------------------------------------


TRANSPORTS = ("native", "asgi")


class LiveServer:
    """frugalserve on a background thread, on a free port of 127.0.0.1.

    transport "native": frugalserve's own HTTP server (app.ServerThread, what `frugalserve
    serve` runs); "asgi": the ASGI app (app.build_app) under uvicorn, lifespan on.
    """

    def __init__(self, settings: ServerSettings, transport: str = "native"):
        assert transport in TRANSPORTS, transport
        self.settings = settings
        self.transport = transport
        self.port = 0
        if transport == "native":
            self._native = ServerThread(settings)
            self.dataplane = self._native.dataplane
            return
        self.app = build_app(settings)
        self.dataplane = self.app.dataplane
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
        # listening socket says TCP (as one from getaddrinfo does); with proto 0 every response,
        # which uvicorn writes in two parts, would wait ~40 ms for the client's delayed ACK.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, loop="asyncio",
                                http="httptools", lifespan="on", log_level="warning",
                                access_log=False, backlog=4096)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                       name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        if self.transport == "native":
            return self._native._thread.is_alive()
        return self.thread.is_alive()

    def start(self, timeout: float = 60.0) -> LiveServer:
        if self.transport == "native":
            self._native.start(timeout)
            self.port = self._native.server.port
            return self
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server exited during startup")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """A clean shutdown: open requests finish, the batchers drain, the ledger flushes."""
        if self.transport == "native":
            self._native.stop(timeout)
            assert not self._native._thread.is_alive(), "the server did not shut down"
            return
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not shut down"
        self._sock.close()

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0, **kw)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.running:
            self.stop()


def settings(repository: Path, **kw: Any) -> ServerSettings:
    """ServerSettings for tests: no polling unless asked, a fast ledger flush."""
    kw.setdefault("poll_interval_s", None)
    kw.setdefault("flush_interval_s", 0.1)
    # the suite names tenants with X-Tenant on anonymous requests (tests/test_keys.py covers keys)
    kw.setdefault("trust_tenant_header", True)
    return ServerSettings(repository=Path(repository), **kw)


# --------------------------------------------------------------------------------------------
# V2 requests and responses
# --------------------------------------------------------------------------------------------


def json_body(inputs: dict[str, np.ndarray], *, datatype: str = "FP32", id: str | None = None,
              parameters: dict | None = None, outputs: list[str] | None = None) -> dict:
    doc: dict[str, Any] = {
        "inputs": [{"name": name, "shape": list(arr.shape), "datatype": datatype,
                    "data": arr.reshape(-1).tolist()} for name, arr in inputs.items()],
    }
    if id is not None:
        doc["id"] = id
    if parameters is not None:
        doc["parameters"] = parameters
    if outputs is not None:
        doc["outputs"] = [{"name": o} for o in outputs]
    return doc


DTYPE_NAMES = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
               np.dtype(np.float16): "FP16", np.dtype(np.int64): "INT64",
               np.dtype(np.int32): "INT32", np.dtype(np.bool_): "BOOL"}


def typed_json_body(inputs: dict[str, np.ndarray], **kw: Any) -> dict:
    """Like json_body, each input with the datatype of its array."""
    doc = json_body(inputs, **kw)
    for entry, arr in zip(doc["inputs"], inputs.values(), strict=True):
        entry["datatype"] = DTYPE_NAMES[arr.dtype]
    return doc


def binary_body(inputs: dict[str, np.ndarray], *, id: str | None = None,
                parameters: dict | None = None, outputs: list[str] | None = None,
                binary_outputs: bool | Iterable[str] = True) -> tuple[bytes, dict[str, str]]:
    """A request in Triton's binary tensor extension: JSON header + raw little-endian tensors."""
    doc: dict[str, Any] = {"inputs": []}
    blobs = []
    for name, arr in inputs.items():
        raw = np.ascontiguousarray(arr).tobytes()
        doc["inputs"].append({"name": name, "shape": list(arr.shape),
                              "datatype": DTYPE_NAMES[arr.dtype],
                              "parameters": {"binary_data_size": len(raw)}})
        blobs.append(raw)
    params = dict(parameters or {})
    if outputs is None:
        if binary_outputs is True:
            params["binary_data_output"] = True
    else:
        chosen = set(outputs) if binary_outputs is True else set(binary_outputs or ())
        doc["outputs"] = [{"name": o, "parameters": {"binary_data": o in chosen}}
                          for o in outputs]
    if params:
        doc["parameters"] = params
    if id is not None:
        doc["id"] = id
    head = json.dumps(doc).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)),
               "Content-Type": "application/octet-stream"}
    return head + b"".join(blobs), headers


_NP = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
       "FP16": np.float16, "BOOL": np.bool_, "UINT8": np.uint8}


def decode_response(response: httpx.Response | Reply) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON document and its outputs as arrays, for JSON and binary responses alike."""
    header = response.headers.get("inference-header-content-length")
    body = response.content
    if header is None:
        doc = json.loads(body)
        blob = b""
    else:
        n = int(header)
        doc, blob = json.loads(body[:n]), body[n:]
    outputs, offset = {}, 0
    for out in doc.get("outputs", []):
        dtype = _NP[out["datatype"]]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arr = np.frombuffer(blob[offset:offset + size], dtype=dtype)
            offset += size
        else:
            arr = np.asarray(out["data"], dtype=dtype)
        outputs[out["name"]] = arr.reshape(out["shape"])
    assert offset == len(blob), "binary response has unclaimed bytes"
    return doc, outputs


@dataclass
class Req:
    """One HTTP request to send concurrently with others."""

    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Reply:
    """The parts of a response the tests read (the same names as httpx.Response)."""

    status_code: int
    headers: dict[str, str]  # lower-cased names
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


def body_of(req: Req) -> tuple[bytes, dict[str, str]]:
    headers = dict(req.headers)
    if req.json is not None:
        headers.setdefault("Content-Type", "application/json")
        return json.dumps(req.json).encode(), headers
    return req.content or b"", headers


def doc_of(response: httpx.Response | Reply) -> dict:
    """The JSON document of a response, binary or not."""
    return decode_response(response)[0]


def run_concurrently(url: str, requests: list[Req], max_connections: int = 500) -> list[Reply]:
    """Send every request at once (up to max_connections in flight); replies in order.

    aiohttp (installed with tritonclient[http]) drives the load: httpx's connection pool
    costs O(connections) per request, which makes hundreds of concurrent connections slow."""
    import aiohttp

    async def main() -> list[Reply]:
        connector = aiohttp.TCPConnector(limit=max_connections, force_close=False)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(base_url=url, connector=connector,
                                         timeout=timeout) as session:

            async def one(req: Req) -> Reply:
                data, headers = body_of(req)
                async with session.request(req.method, req.path, data=data,
                                           headers=headers) as r:
                    content = await r.read()
                    return Reply(r.status, {k.lower(): v for k, v in r.headers.items()},
                                 content)

            return await asyncio.gather(*(one(req) for req in requests))

    return asyncio.run(main())


class Hammer:
    """Keep `connections` clients sending requests (make(i) -> Req, i counting up) from a
    background thread until stop(); every (i, reply) or (i, exception) is kept."""

    def __init__(self, url: str, make: Callable[[int], Req], connections: int = 8):
        self.url = url
        self.make = make
        self.connections = connections
        self.results: list[tuple[int, Reply | BaseException]] = []
        self._stop = threading.Event()
        self._next = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[tuple[int, Reply | BaseException]]:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "load did not stop"
        return self.results

    def wait_for_replies(self, n: int, timeout: float = 30.0) -> None:
        target = len(self.results) + n
        wait_for(lambda: len(self.results) >= target, timeout, what=f"{n} more replies")

    async def _main(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(base_url=self.url) as session:

            async def worker() -> None:
                while not self._stop.is_set():
                    i = self._next
                    self._next += 1
                    req = self.make(i)
                    data, headers = body_of(req)
                    try:
                        async with session.request(req.method, req.path, data=data,
                                                   headers=headers) as r:
                            content = await r.read()
                            reply: Reply | BaseException = Reply(
                                r.status, {k.lower(): v for k, v in r.headers.items()}, content)
                    except Exception as exc:  # noqa: BLE001 - kept for the test to judge
                        reply = exc
                    self.results.append((i, reply))

            await asyncio.gather(*(worker() for _ in range(self.connections)))


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Start fn in a thread now; the returned callable joins it and returns (or raises) its
    result."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the joining test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()

    def join(timeout: float = 60.0) -> Any:
        t.join(timeout)
        assert not t.is_alive(), "background call did not finish"
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


def raw_http(port: int, request: bytes, timeout: float = 30.0) -> Reply:
    """Send bytes exactly as given, in one write, and read one response (Content-Length)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed before a response: {buf!r}")
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in
                   (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return Reply(status, headers, rest[:length])


def chunked_request(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    """An HTTP/1.1 POST with Transfer-Encoding: chunked (no Content-Length), body in one chunk."""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            f"{len(body):x}\r\n").encode() + body + b"\r\n0\r\n\r\n"


# --------------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------------


class Scrape:
    """One /metrics scrape: sample values by name and labels."""

    def __init__(self, text: str):
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.families: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, default: float = 0.0, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), default)

    def matching(self, name: str, **labels: str) -> dict[frozenset, float]:
        want = set(labels.items())
        return {lv: v for (n, lv), v in self.samples.items() if n == name and want <= set(lv)}


def scrape(client: httpx.Client) -> Scrape:
    r = client.get("/metrics")
    assert r.status_code == 200
    return Scrape(r.text)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.02) -> None:
    """Poll until predicate() is true (a wait, never an assertion about how long it took)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def queue_depth(client: httpx.Client, model: str, version: str = "1") -> float:
    return scrape(client).get("frugalserve_queue_depth", model=model, version=version)


def leave_while_queued(live: LiveServer, model: str, row: np.ndarray) -> None:
    """Request id "held" (a SENTINEL row) holds `model`'s worker; request id "gone" (`row`)
    queues behind it, then its connection closes. Once the server has seen the client leave,
    the held request is let through and must answer 200."""
    body = json.dumps(json_body({"input": row}, id="gone")).encode()
    with live.client() as c1, live.client() as c2:
        with hold_gate() as hold:
            held = in_thread(lambda: c1.post(
                f"/v2/models/{model}/infer", json=json_body({"input": sentinel_row()}, id="held")))
            hold.wait_entered(1)
            with socket.create_connection(("127.0.0.1", live.port)) as sock:
                sock.sendall(b"POST /v2/models/%s/infer HTTP/1.1\r\nhost: x\r\n"
                             b"content-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s"
                             % (model.encode(), len(body), body))
                wait_for(lambda: queue_depth(c2, model) == 1, what="the request queued")
            wait_for(lambda: _queued_caller_gone(live.dataplane, model),
                     what="the server seeing the disconnect")
            release_gate()
            assert held().status_code == 200
        wait_for(lambda: queue_depth(c2, model) == 0, what="the queue drained")


def _queued_caller_gone(dataplane, model: str) -> bool:
    return any(item.future.done() for served in dataplane.served_versions()
               if served.model == model for batcher in served.batchers.values()
               for item in list(batcher._queue))


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def finite(x: float) -> bool:
    return math.isfinite(x)

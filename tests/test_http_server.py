"""HTTP/1.1 behaviour of both transports (frugalserve's native server and the ASGI app under
uvicorn): pipelining, 100-continue, percent-encoded paths, malformed requests."""

from __future__ import annotations

import gc
import json
import socket
import time

import pytest
import support

from frugalserve.app import ServerThread
from frugalserve.protocols.http_server import _Connection


class _Reader:
    """Reads Content-Length framed responses off one socket, one after another."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed; have {self.buf[:200]!r}")
        self.buf += chunk

    def response(self) -> support.Reply:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip()
                   for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return support.Reply(status, headers, body)


def _post(path: str, doc: dict, extra: str = "") -> bytes:
    body = json.dumps(doc).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_pipelined_requests_are_answered_in_order(server, artifacts):
    n = 5
    raw = b"".join(_post("/v2/models/digits/versions/1/infer",
                         support.json_body({"X": artifacts.X[i:i + 1]}, id=f"p{i}"))
                   for i in range(n))
    raw += b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(raw)
        reader = _Reader(sock)
        replies = [reader.response() for _ in range(n + 1)]
    expected = artifacts.onnx_predict("lr", artifacts.X[:n])
    for i, r in enumerate(replies[:n]):
        assert r.status_code == 200, r.text
        doc, out = support.decode_response(r)
        assert doc["id"] == f"p{i}"
        support.assert_close(out["probabilities"][0], expected["probabilities"][i])
    assert replies[n].status_code == 200


def test_expect_100_continue(server, artifacts):
    doc = support.json_body({"X": artifacts.X[:1]}, id="cont")
    body = json.dumps(doc).encode()
    head = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        reader = _Reader(sock)
        while b"\r\n\r\n" not in reader.buf:
            reader._fill()
        assert reader.buf.startswith(b"HTTP/1.1 100")
        reader.buf = reader.buf.split(b"\r\n\r\n", 1)[1]
        sock.sendall(body)
        r = reader.response()
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "cont"


def test_expect_100_continue_over_the_limit_is_refused_before_the_body(server):
    head = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: {10 * 1024 * 1024}\r\n"
            "Expect: 100-continue\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        r = _Reader(sock).response()
    assert r.status_code == 413
    assert set(r.json()) == {"error"}


def test_percent_encoded_path(server, artifacts):
    r = support.raw_http(server.port, _post("/v2/models/dig%69ts/versions/1/infer",
                                            support.json_body({"X": artifacts.X[:1]}),
                                            "Connection: close\r\n"))
    assert r.status_code == 200, r.text
    assert r.json()["model_name"] == "digits"


def test_query_string_is_ignored(server, artifacts):
    r = support.raw_http(server.port, _post("/v2/models/digits/infer?trace=1",
                                            support.json_body({"X": artifacts.X[:1]}),
                                            "Connection: close\r\n"))
    assert r.status_code == 200, r.text


def test_malformed_http_gets_a_400(server):
    r = support.raw_http(server.port, b"BLAH BLAH BLAH\r\n\r\n")
    assert r.status_code == 400


@pytest.mark.parametrize("target,status", [
    (b"/v2/models/" + b"a" * 70000 + b"/ready", 414),  # past httptools.parse_url's limit
    (b"http://x:99999/v2/health/ready", 400),
    (b"http://[bad/v2/health/ready", 400),
])
def test_a_url_that_cannot_be_parsed_is_refused_by_name(server, target, status):
    r = support.raw_http(server.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    if server.transport == "asgi":  # uvicorn answers these itself, in plain text
        assert r.status_code in (400, 414)
        return
    # the native server said "`on_message_complete` callback error" for all three
    assert r.status_code == status, r.text
    assert "URL" in r.json()["error"], r.text


def test_connection_close_is_honoured(server, artifacts):
    raw = _post("/v2/models/digits/infer", support.json_body({"X": artifacts.X[:1]}),
                "Connection: close\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(raw)
        reader = _Reader(sock)
        r = reader.response()
        assert r.status_code == 200
        assert sock.recv(1) == b""  # the server closed its side


def test_a_request_head_past_the_limit_is_refused(server):
    # the body limit alone let a client send headers without end (200 MB were buffered)
    if server.transport == "asgi":
        pytest.skip("uvicorn's httptools protocol has no header limit of its own")
    from frugalserve.protocols.http_server import MAX_HEAD_BYTES

    start = b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: "
    # one byte past the limit and no more: the server has read all of it when it answers
    r = support.raw_http(server.port, start + b"a" * (MAX_HEAD_BYTES + 1 - len(start)))
    assert r.status_code == 431, r.text
    assert "headers exceed" in r.json()["error"]


def test_a_head_request_is_answered_without_a_body(server):
    # the body of a HEAD answer would be read as the start of the next response; both
    # transports refuse HEAD (no V2 route has it) and the GET behind it comes back intact
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"HEAD /v2 HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = _Reader(sock)
        while reader.buf.count(b"\r\n\r\n") < 2:
            reader._fill()
        head_status = int(reader.buf.split(b" ", 2)[1])
        reader.buf = reader.buf.split(b"\r\n\r\n", 1)[1]  # HEAD: headers, never a body
        r = reader.response()
    assert head_status == 404
    assert r.status_code == 200, r.content


def test_a_closed_connection_is_freed_without_the_cyclic_gc(tmp_path):
    """A connection's parser refers back to it; the server breaks that cycle when the client
    leaves, so what a closed connection held goes at once, not at the next GC pass (rare under
    load: the server raises the young generation's threshold)."""
    (tmp_path / "models").mkdir()

    with ServerThread(support.settings(tmp_path / "models", metering=False)) as running:

        def connections() -> int:  # this server's, alive or garbage not yet collected
            return sum(type(o) is _Connection and o.server is running.server
                       for o in gc.get_objects())

        gc.collect()
        gc.disable()
        try:
            for _ in range(20):
                with socket.create_connection(("127.0.0.1", running.server.port)) as sock:
                    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert sock.recv(1000).startswith(b"HTTP/1.1 200")
            deadline = time.monotonic() + 10
            while running.server.connections and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not running.server.connections
            assert connections() == 0
        finally:
            gc.enable()

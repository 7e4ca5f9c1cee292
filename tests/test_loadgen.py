"""The load generator against a real (tiny) HTTP server: counts, checks, errors, reconnects."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Iterator

import pytest
from rich.progress import Progress
from typer.testing import CliRunner

from frugalserve import loadgen
from frugalserve.cli import app
from frugalserve.http1 import ProtocolError, _parse_head, prepare_request
from frugalserve.loadgen import NO_RESPONSE, LoadSpec

QUIET = Progress(disable=True)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """/echo answers the body back; /fail says 503; /close closes after answering; /slow waits."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            status, extra = b"200 OK", b""
            if path == b"/fail":
                status, body = b"503 Service Unavailable", b'{"error": "busy"}'
            elif path == b"/close":
                extra = b"Connection: close\r\n"
            elif path == b"/slow":
                await asyncio.sleep(5)
            writer.write(b"HTTP/1.1 " + status + b"\r\n" + extra +
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
            if extra:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    srv = loop.run_until_complete(asyncio.start_server(_handle, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    srv.close()
    tasks = asyncio.all_tasks(loop)  # handlers still waiting on open connections
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.close()


BODIES = [f'{{"i": {i}}}'.encode() for i in range(7)]


def test_closed_loop_stops_at_count_and_checks_every_response(server: str) -> None:
    seen: set[int] = set()

    def check(i: int, body: bytes) -> bool:
        seen.add(i)
        return body == BODIES[i]

    spec = LoadSpec(server + "/echo", BODIES, concurrency=4, requests=200, duration_s=None,
                    check=check)
    summary = loadgen.run(spec, QUIET).summary()
    assert (summary.requests, summary.ok, summary.errors) == (200, 200, {})
    assert summary.accuracy == 1.0
    assert seen == set(range(len(BODIES)))
    assert summary.p50_ms <= summary.p99_ms <= summary.max_ms


def test_open_loop_poisson_is_bounded_by_duration(server: str) -> None:
    spec = LoadSpec(server + "/echo", BODIES, rate=200, connections=8, duration_s=0.5)
    result = loadgen.run(spec, QUIET)
    summary = result.summary()
    assert summary.requests > 0 and summary.ok == summary.requests
    assert summary.offered_rps == 200 and summary.mode == "Poisson 200/s"
    assert (result.correct == -1).all()  # no check given


def test_errors_are_counted_by_status(server: str) -> None:
    summary = loadgen.run(LoadSpec(server + "/fail", BODIES, requests=20, duration_s=None),
                          QUIET).summary()
    assert summary.ok == 0 and summary.errors == {503: 20}
    assert summary.last_error.startswith("HTTP 503") and "busy" in summary.last_error


def test_server_closing_connections_is_survived(server: str) -> None:
    def check(i: int, body: bytes) -> bool:  # each answer is its own request's echo
        return body == BODIES[i]

    summary = loadgen.run(LoadSpec(server + "/close", BODIES, concurrency=2, requests=30,
                                   duration_s=None, check=check), QUIET).summary()
    assert summary.ok == 30 and summary.accuracy == 1.0


def test_a_request_past_its_timeout_counts_as_no_response(server: str) -> None:
    summary = loadgen.run(LoadSpec(server + "/slow", BODIES, concurrency=1, requests=1,
                                   duration_s=None, timeout_s=0.2), QUIET).summary()
    assert summary.errors == {NO_RESPONSE: 1}
    assert "no response within" in summary.last_error


def test_a_refused_connection_counts_as_no_response() -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    summary = loadgen.run(LoadSpec(f"http://127.0.0.1:{port}/x", BODIES, concurrency=1,
                                   requests=3, duration_s=None), QUIET).summary()
    assert summary.errors == {NO_RESPONSE: 3}
    assert "cannot connect" in summary.last_error


def test_a_check_that_cannot_read_the_response_marks_it_wrong(server: str) -> None:
    def check(i: int, body: bytes) -> bool:
        raise ValueError("unreadable")

    summary = loadgen.run(LoadSpec(server + "/echo", BODIES, requests=5, duration_s=None,
                                   check=check), QUIET).summary()
    assert summary.ok == 5 and summary.accuracy == 0.0
    assert "unreadable" in summary.last_error


def test_spec_refuses_an_endless_or_empty_load() -> None:
    with pytest.raises(ValueError, match="never ends"):
        LoadSpec("http://h/x", BODIES, duration_s=None)
    with pytest.raises(ValueError, match="at least one"):
        LoadSpec("http://h/x", [])


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"duration_s": 0}, "duration must be positive"),  # once meant: no limit at all
    ({"duration_s": float("nan")}, "duration must be positive"),
    ({"duration_s": float("inf")}, "duration must be positive and finite"),
    ({"duration_s": None, "requests": 0}, "requests must be >= 1"),
    ({"timeout_s": 0}, "timeout must be positive"),  # once: a watchdog that never slept
    ({"concurrency": 0}, "must be >= 1"),
    ({"rate": -5}, "rate must be positive"),
    ({"url": "ftp://h/x"}, "only http://"),
    ({"url": "http://h:99999/x"}, "out of range"),
    ({"headers": {"X-Name": "\u4e2d"}}, "latin-1"),
])
def test_spec_refuses_limits_out_of_range_before_any_request(kwargs: dict, says: str) -> None:
    spec = {"url": "http://h/x", "bodies": BODIES} | kwargs
    with pytest.raises(ValueError, match=says):
        LoadSpec(**spec)


@pytest.mark.parametrize(("options", "says"), [
    (["-c", "0"], "must be >= 1"),  # once silently 16 connections
    (["-d", "0"], "duration must be positive"),
    (["-n", "0"], "requests must be >= 1"),
    (["--timeout", "0"], "timeout must be positive"),
    (["-H", "no colon"], "not 'Name: value'"),
])
def test_bench_command_refuses_bad_options_in_one_line(server: str, tmp_path, options: list[str],
                                                      says: str) -> None:
    body = tmp_path / "request.json"
    body.write_text('{"inputs": []}')
    result = CliRunner().invoke(app, ["bench", server, "-m", "m", "--input-file", str(body),
                                      *options])
    assert result.exit_code == 2 and says in result.output, result.output
    assert "Traceback" not in result.output


def test_bench_command_counts_answers_and_fails_when_none_came(server: str, tmp_path) -> None:
    body = tmp_path / "request.json"
    body.write_text('{"inputs": []}')
    ran = CliRunner().invoke(app, ["bench", server, "-m", "m", "--input-file", str(body),
                                   "-n", "25", "-c", "2"])
    assert ran.exit_code == 0, ran.output
    assert "/v2/models/m/infer" in ran.output
    assert re.search(r"requests\s+│\s+25 │", ran.output) and re.search(r"ok\s+│\s+25 │",
                                                                       ran.output), ran.output
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = CliRunner().invoke(app, ["bench", f"http://127.0.0.1:{port}", "-m", "m",
                                       "--input-file", str(body), "-n", "3"])
    assert refused.exit_code == 1 and "no request succeeded" in refused.output
    unreachable = CliRunner().invoke(app, ["bench", f"http://127.0.0.1:{port}", "-m", "m"])
    assert unreachable.exit_code == 2 and "Connection refused" in unreachable.output


def test_request_and_response_framing() -> None:
    raw = prepare_request("POST", "http://h:81/v2/models/m/infer?x=1", b"{}", {"X-Tenant": "t"})
    assert raw.startswith(b"POST /v2/models/m/infer?x=1 HTTP/1.1\r\nHost: h:81\r\n")
    assert b"Content-Length: 2\r\n" in raw and b"X-Tenant: t\r\n" in raw
    assert raw.endswith(b"\r\n\r\n{}")
    assert _parse_head(b"HTTP/1.1 404 Not Found\r\ncontent-length: 12") == (404, 12, False)
    assert _parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close")[2]
    with pytest.raises(ProtocolError, match="chunked"):
        _parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked")

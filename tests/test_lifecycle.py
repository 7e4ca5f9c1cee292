"""Starting and stopping: a clean shutdown answers what it took in and flushes the ledger;
`frugalserve serve` stops cleanly on SIGTERM; a server that cannot start says so."""

from __future__ import annotations

import gc
import math
import os
import signal
import socket
import subprocess
import sys

import httpx
import numpy as np
import pytest
import support
from conftest import DIGITS_CONFIG
from ledger_support import rows as query

from frugalserve.app import GC_YOUNG_THRESHOLD, SWITCH_INTERVAL_S, ServerThread
from frugalserve.server_process import free_port


def _count(url: str, sql: str) -> int:
    ((value,),) = query(url, sql)
    return value


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory, artifacts):
    repo = tmp_path_factory.mktemp("lifecycle") / "models"
    support.write_model(repo, "digits", {"1": artifacts.lr_onnx}, DIGITS_CONFIG)
    support.write_model(repo, "held", {"1": artifacts.gated},
                        {"batching": {"max_batch_size": 4, "max_queue_size": 64}})
    return repo


@pytest.mark.parametrize("transport", support.TRANSPORTS)
def test_shutdown_answers_in_flight_requests_then_flushes(small_repo, tmp_path, artifacts,
                                                          transport):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    live = support.LiveServer(support.settings(small_repo, ledger_url=url,
                                               flush_interval_s=3600), transport=transport)
    live.start()
    n = 6
    x = artifacts.distinct_rows(n, start=40)
    try:
        with support.hold_gate() as hold, live.client() as c:
            first = support.in_thread(lambda: support.run_concurrently(live.url, [support.Req(
                "POST", "/v2/models/held/infer",
                json=support.json_body({"input": support.sentinel_row()}, id="s"))]))
            hold.wait_entered(1)
            rest = support.in_thread(lambda: support.run_concurrently(live.url, [
                support.Req("POST", "/v2/models/held/infer",
                            json=support.json_body({"input": x[i:i + 1]}, id=f"q{i}"))
                for i in range(n)]))
            support.wait_for(lambda: support.queue_depth(c, "held") == n, what="queued requests")
            stopping = support.in_thread(live.stop)
            support.release_gate()
            replies = first() + rest()
            stopping()
    finally:
        if live.running:
            live.stop()
    assert [r.status_code for r in replies] == [200] * (n + 1)
    expected = artifacts.lr.predict_proba(x).astype(np.float32)
    for i, r in enumerate(replies[1:]):
        support.assert_close(support.decode_response(r)[1]["probabilities"][0], expected[i])
    assert _count(url, "SELECT count(*) FROM usage WHERE status = 200") == n + 1
    assert _count(url, "SELECT sum(cost_pusd) FROM usage") == \
        _count(url, "SELECT sum(cost_pusd) FROM batches")


def test_server_thread_start_reports_a_port_in_use(small_repo, tmp_path):
    """If the server cannot listen, start() must raise instead of returning as if it ran."""
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        thread = ServerThread(support.settings(small_repo, metering=False), port=port)
        with pytest.raises(RuntimeError, match="server failed to start: .*address"):
            thread.start(timeout_s=60)
    finally:
        blocker.close()


def test_a_started_server_sets_the_interpreter_up_for_serving(small_repo):
    """Process-wide, so start() sets them: a short GIL switch interval, and a GC young threshold
    above what the requests in flight hold (at the default 700 the young generation was
    collected every ~100 requests under load, finding next to nothing)."""
    gc.set_threshold(700, *gc.get_threshold()[1:])
    sys.setswitchinterval(0.005)
    with ServerThread(support.settings(small_repo, metering=False)):
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)


@pytest.mark.parametrize("kw,port,words", [
    ({}, 70000, "port 70000 is outside 0-65535"),  # uvloop listened on 70000 % 65536
    ({"poll_interval_s": -1.0}, 0, "poll interval must be positive"),  # polled non-stop
    ({"max_body_bytes": -1}, 0, "body limit must be positive"),  # refused every body
    ({"budget_safety": -2.0}, 0, "budget safety factor must be positive"),  # reserved < 0
    ({"budget_safety": math.inf}, 0, "budget safety factor must be positive and finite"),
    # the ledger writer's thread died of an OverflowError, writing nothing until shutdown
    ({"flush_interval_s": math.inf}, 0, "flush interval must be positive and at most 86400"),
    ({"flush_interval_s": 1e12}, 0, "flush interval must be positive and at most 86400"),
])
def test_settings_out_of_range_are_refused_before_serving(small_repo, kw, port, words):
    # `frugalserve serve` prints these ValueErrors as one "cannot start" line
    with pytest.raises(ValueError, match=words):
        ServerThread(support.settings(small_repo, metering=False, **kw), port=port)


def test_cli_serve_and_sigterm(small_repo, tmp_path, artifacts):
    """`frugalserve serve` (the native server): serves, then on SIGTERM stops cleanly with every
    usage record written."""
    repo = tmp_path / "cli-models"
    support.write_model(repo, "digits", {"1": artifacts.lr_onnx}, DIGITS_CONFIG)
    ledger = f"sqlite:///{tmp_path / 'cli-ledger.db'}"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "frugalserve.cli", "serve", str(repo), "--port", str(port),
         "--ledger", ledger, "--poll-interval", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {proc.stdout.read().decode()}")
            try:
                return httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        support.wait_for(up, timeout=60, what="frugalserve serve", interval=0.1)
        with httpx.Client(base_url=base, timeout=30) as c:
            for i in range(25):
                r = c.post("/v2/models/digits/infer",
                           json=support.json_body({"X": artifacts.X[i:i + 1]}, id=str(i)))
                assert r.status_code == 200, r.text
                assert r.json()["parameters"]["cost_pico_usd"] > 0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _count(ledger, "SELECT count(*) FROM usage WHERE status = 200") == 25
    assert _count(ledger, "SELECT sum(cost_pusd) FROM usage") == \
        _count(ledger, "SELECT sum(cost_pusd) FROM batches")


def test_cli_serve_explains_why_it_cannot_start(tmp_path, small_repo):
    """A wrong repository path, price file or ledger URL: one clear line and exit code 1."""
    from typer.testing import CliRunner

    from frugalserve.cli import app

    runner = CliRunner()
    cases = {
        (str(tmp_path / "nowhere"),): "model repository is not a directory",
        (str(small_repo), "--rate-card", str(tmp_path / "none.yaml")): "cannot read",
        (str(small_repo), "--ledger", "postgresql+psycopg://postgres@127.0.0.1:1/test"):
            "connection",
    }
    for args, words in cases.items():
        result = runner.invoke(app, ["serve", *args, "--port", str(free_port())])
        assert result.exit_code == 1, result.output
        assert "cannot start" in result.output and words in result.output
        assert "Traceback" not in result.output

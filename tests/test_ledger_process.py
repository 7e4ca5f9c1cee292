"""The ledger writer's SQL work in a child process (economics/ledger_process.py): it writes
what the server's writer thread hands it, on SQLite and PostgreSQL; a child that dies loses
nothing; a try whose commit took but whose answer was lost is not written twice; and a
server writes its ledger through such a child by default, which idles on its core."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
import support
from conftest import DIGITS_CONFIG
from ledger_support import (  # noqa: F401 - fixtures
    ledger_url_fixture,
    pg_url_fixture,
    rows,
    write_batch,
    write_rejected,
)

from frugalserve.app import ServerThread
from frugalserve.economics import ledger, ledger_process
from frugalserve.economics.ledger import LedgerWriter, open_engine

T0 = 1_790_000_000.0
# a server that may move its child out of SCHED_IDLE runs it idle and hurries it; one that may
# not (no CAP_SYS_NICE, RLIMIT_NICE 0) runs it at nice 10 and never hurries it
MAY_IDLE = hasattr(os, "SCHED_IDLE") and ledger_process._may_leave_idle()
needs_idle = pytest.mark.skipif(not MAY_IDLE, reason="this process may not leave SCHED_IDLE")


def _child_writer(url: str) -> LedgerWriter:
    return LedgerWriter(open_engine(url), flush_interval_s=3600, in_child=True)


def test_a_child_process_writes_every_batch_and_request(ledger_url):
    writer = _child_writer(ledger_url)
    try:
        write_batch(writer, T0, "m", "1", [("acme", 1, 11, 200), ("globex", 2, 7, 200)], 1.5)
        write_rejected(writer, T0, "m", "1", "globex")
        assert writer.flush()
        assert writer._child.pid not in (None, os.getpid())
        write_batch(writer, T0 + 61, "m", "1", [("acme", 1, 5, 200)], 0.5)
        assert writer.flush()
    finally:
        writer.close()
    assert rows(ledger_url, "SELECT count(*), sum(cost_pusd) FROM usage") == [(4, 23)]
    assert rows(ledger_url, "SELECT count(*), sum(cost_pusd) FROM batches") == [(2, 23)]
    assert rows(ledger_url, "SELECT sum(requests), sum(cost_pusd) FROM usage_rollup") == \
        [(4, 23)]


def test_a_child_that_dies_loses_nothing_and_a_new_one_writes_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    writer = _child_writer(url)
    try:
        write_batch(writer, T0, "m", "1", [("acme", 1, 11, 200)], 1.5)
        assert writer.flush()
        first = writer._child.pid
        os.kill(first, signal.SIGKILL)
        os.waitpid(first, 0)
        write_batch(writer, T0 + 1, "m", "1", [("acme", 1, 5, 200)], 0.5)
        write_rejected(writer, T0 + 1, "m", "1", "globex")
        assert not writer.flush()  # the child is gone: the records stay
        assert writer.pending == 2
        assert writer.flush()  # a new child
        assert writer._child.pid != first
    finally:
        writer.close()
    assert rows(url, "SELECT count(*), sum(cost_pusd) FROM usage") == [(3, 16)]
    assert rows(url, "SELECT count(*), sum(cost_pusd) FROM batches") == [(2, 16)]


def test_a_commit_whose_answer_was_lost_is_not_written_twice(ledger_url, monkeypatch):
    """The write commits, then the answer is lost (a connection dropped at commit, a child
    that died after it): the retry leaves out what is in, and writes what came after."""
    writer = LedgerWriter(open_engine(ledger_url), flush_interval_s=3600)
    write_batch(writer, T0, "m", "1", [("acme", 1, 11, 200), ("globex", 2, 7, 200)], 1.5)
    write_rejected(writer, T0, "m", "1", "globex")
    real_write = ledger._write

    def commit_then_fail(*args, **kwargs):
        real_write(*args, **kwargs)
        raise ConnectionError("the connection dropped as the commit returned")

    monkeypatch.setattr(ledger, "_write", commit_then_fail)
    assert not writer.flush()
    monkeypatch.setattr(ledger, "_write", real_write)
    write_batch(writer, T0 + 1, "m", "1", [("acme", 1, 5, 200)], 0.5)
    assert writer.flush()
    writer.close()
    assert rows(ledger_url, "SELECT count(*), sum(cost_pusd) FROM usage") == [(4, 23)]
    assert rows(ledger_url, "SELECT count(*), sum(cost_pusd) FROM batches") == [(2, 23)]
    assert rows(ledger_url, "SELECT sum(requests), sum(cost_pusd) FROM usage_rollup") == \
        [(4, 23)]


def test_a_server_writes_its_ledger_from_an_idle_priority_child(artifacts, tmp_path):
    support.write_model(tmp_path / "repo", "digits", {"1": artifacts.lr_onnx}, DIGITS_CONFIG)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    server = ServerThread(support.settings(tmp_path / "repo", ledger_url=url)).start()
    try:
        child = server.dataplane.ledger._child
        assert child.pid is not None  # started with the server, before the first flush
        if MAY_IDLE:
            assert os.sched_getscheduler(child.pid) == os.SCHED_IDLE
        else:
            assert os.getpriority(os.PRIO_PROCESS, child.pid) == ledger_process._NICE
        with httpx.Client(base_url=server.url) as client:
            answers = [client.post("/v2/models/digits/infer", json=support.json_body(
                {"X": artifacts.X[i:i + 1]})).json() for i in range(20)]
    finally:
        server.stop()
    assert child.pid is None  # closed with the server
    charged = sum(a["parameters"]["cost_pico_usd"] for a in answers)
    assert charged > 0
    assert rows(url, "SELECT count(*), sum(cost_pusd) FROM usage") == [(20, charged)]


@needs_idle
def test_a_write_that_waits_too_long_for_an_idle_core_is_hurried(tmp_path, monkeypatch):
    """On a core that is never idle the child would starve: past its patience a write runs
    under the default policy, and the child idles again after it."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    writer = _child_writer(url)
    seen = []
    real = ledger_process._set_policy

    def spy(pid, policy):
        seen.append(policy)
        return real(pid, policy)

    monkeypatch.setattr(ledger_process, "_set_policy", spy)
    writer._child.patience_s = 0.0  # every write "waited too long"
    try:
        write_batch(writer, T0, "m", "1", [("acme", 1, 11, 200)], 1.5)
        assert writer.flush()
        assert seen[-2:] == [os.SCHED_OTHER, os.SCHED_IDLE]
        assert os.sched_getscheduler(writer._child.pid) == os.SCHED_IDLE
    finally:
        writer.close()
    assert rows(url, "SELECT count(*) FROM usage") == [(1,)]


@needs_idle
def test_a_child_starved_before_it_reads_a_large_flush_is_hurried_too(tmp_path):
    """A starved child does not read its pipe, so sending a flush larger than the pipe's
    buffer waits as long as the answer would: the patience runs from the send. A busy process
    on the child's only core starves it for a minute unless it is hurried."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    writer = _child_writer(url)
    writer._child.start()
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(writer._child.pid, {core})
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 60\n"
                                "while time.time() < end: pass"])
    try:
        os.sched_setaffinity(spinner.pid, {core})
        writer._child.patience_s = 0.5
        for i in range(3000):  # about 200 KB of columns: more than a pipe holds
            write_batch(writer, T0 + i, "m", "1", [("acme", 1, 1, 200)], 0.5)
        assert writer.flush()
        assert spinner.poll() is None  # written while the core was still busy
    finally:
        spinner.kill()
        spinner.wait()
        writer.close()
    assert rows(url, "SELECT count(*) FROM usage") == [(3000,)]


def test_without_leave_to_hurry_it_the_child_runs_at_a_low_nice_not_idle(tmp_path, monkeypatch):
    """An unprivileged server (no CAP_SYS_NICE, RLIMIT_NICE 0, as in a default container) could
    never move a child back out of SCHED_IDLE: it runs the child at nice 10 instead."""
    monkeypatch.setattr(ledger_process, "_may_leave_idle", lambda: False)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    writer = _child_writer(url)
    writer._child.patience_s = 0.0
    try:
        write_batch(writer, T0, "m", "1", [("acme", 1, 11, 200)], 1.5)
        assert writer.flush()
        pid = writer._child.pid
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, pid) == ledger_process._NICE
    finally:
        writer.close()
    assert rows(url, "SELECT count(*) FROM usage") == [(1,)]


def test_the_ledger_url_reaches_the_child_off_its_command_line(pg_url):
    """A URL's password must not show in `ps`: the child reads the URL on its stdin."""
    url = pg_url.replace("postgres@", "postgres:s3cret-word@")  # trust auth ignores it
    writer = _child_writer(url)
    try:
        write_batch(writer, T0, "m", "1", [("acme", 1, 11, 200)], 1.5)
        assert writer.flush()
        cmdline = open(f"/proc/{writer._child.pid}/cmdline", "rb").read()  # noqa: SIM115
        assert b"s3cret-word" not in cmdline and b"ledger_process" in cmdline
    finally:
        writer.close()
    assert rows(url, "SELECT count(*) FROM usage") == [(1,)]


@pytest.mark.parametrize("python", ["/bin/false", "/nonexistent/python3"])
def test_a_child_that_cannot_start_leaves_the_writing_to_the_thread(tmp_path, monkeypatch,
                                                                     python):
    """A child that exits at once, or a Python that is not there: metering goes on."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    writer = _child_writer(url)
    monkeypatch.setattr(ledger_process.sys, "executable", python)
    writer.start()
    monkeypatch.undo()
    try:
        assert writer._child is None
        write_batch(writer, T0, "m", "1", [("acme", 1, 11, 200)], 1.5)
        assert writer.flush()
    finally:
        writer.close()
    assert rows(url, "SELECT count(*), sum(cost_pusd) FROM usage") == [(1, 11)]

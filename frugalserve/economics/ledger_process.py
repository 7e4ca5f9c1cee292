"""The ledger writer's SQL work in a child process, off the server's GIL.

    child = LedgerProcess("sqlite:////srv/ledger.db")
    child.write(log.codes(), replica_id, pages, chunks, seen, recheck)  # blocks its caller
    child.close()

A flush turns batch log pages into rows, JSON columns and rollups and writes them: about 10 µs
of Python a batch. In the server's process that work holds the GIL in bursts which the event
loop waits behind, several times a request: at one connection a metered server's p99 was four
times an unmetered one's, and the same as unmetered when its writer did not flush during the
run (BENCHMARKS.md, "the ledger writer in a child process"). A child shares at most the CPU,
and where a core is free, not even that. The writer thread still takes the log (numpy columns,
about 2 µs a batch) and keeps what it hands over until the child says it is written: a child
that dies loses nothing, and a try whose outcome is unknown is checked before the next
(ledger.write_flush, recheck).

The child is `python -m frugalserve.economics.ledger_process`, the ledger's URL then pickled
calls on its stdin and answers on its stdout: not multiprocessing, whose spawn re-runs the
host program's main script in the child (a script without a main guard would start again).
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .batch_log import Codes, Page
from .ledger import UsageChunk, connect, write_flush

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the child imports this frugalserve


class LedgerProcess:
    """One child process that writes flushes to the ledger at `url` (its schema in place),
    started at the first write and again after one that died."""

    def __init__(self, url: str, patience_s: float = 2.0):
        self.url = url
        self.patience_s = patience_s  # how long a write may wait for an idle core
        self._child: subprocess.Popen | None = None
        self._idle = False  # the child runs under SCHED_IDLE (see _may_leave_idle)

    def write(self, codes: Codes, replica_id: int, pages: list[Page], chunks: list[UsageChunk],
              seen: tuple[float, int] | None, recheck: bool) -> None:
        """ledger.write_flush in the child; raises what made it fail."""
        child = self._child or self._start()
        hurry = None  # timed from the send: a starved child does not read, so a send waits too
        if self._idle:
            hurry = threading.Timer(self.patience_s, _set_policy, (child.pid, _NORMAL))
            hurry.start()
        try:
            pickle.dump((codes, replica_id, pages, chunks, seen, recheck), child.stdin,
                        protocol=pickle.HIGHEST_PROTOCOL)
            child.stdin.flush()
            failure = pickle.load(child.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self._end(kill=True)
            raise ConnectionError(f"the ledger writer process ended: {exc!r}") from None
        finally:
            if hurry is not None:
                hurry.cancel()
                hurry.join()  # a hurry that began is over
        if hurry is not None and os.sched_getscheduler(child.pid) != _IDLE:
            _set_policy(child.pid, _IDLE)  # it was hurried: idle again
        if failure is not None:
            raise RuntimeError(failure)

    @property
    def pid(self) -> int | None:
        """The child's process id; None while none runs."""
        return None if self._child is None else self._child.pid

    def start(self) -> None:
        """Start the child now, before serving, and wait until it is ready."""
        if self._child is None:
            self._start()

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)}
        try:
            self._child = subprocess.Popen([sys.executable, "-m", __name__],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            # on its stdin, not its command line, which any user can read (with the password)
            pickle.dump(self.url, self._child.stdin)
            self._child.stdin.flush()
            # its imports take a few hundred ms of CPU: at normal priority, before serving; at
            # idle priority under load they waited, then ran hurried inside a measured run
            pickle.load(self._child.stdout)
            self._idle = _may_leave_idle() and _set_policy(self._child.pid, _IDLE)
            if not self._idle:
                os.setpriority(os.PRIO_PROCESS, self._child.pid, _NICE)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self._end(kill=True)
            raise ConnectionError(f"the ledger writer process did not start: {exc!r}") from None
        return self._child

    def _end(self, kill: bool) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        if kill:
            child.kill()
        child.stdin.close()  # the child's cue to end
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()

    def close(self) -> None:
        self._end(kill=False)


# The child runs only on a core that nothing else wants (SCHED_IDLE): a server thread that
# wakes takes the core from it at once. Under the default policy, even at nice 19, the child's
# flushes on the server's core raised the p99 at one connection about as much as a writer
# thread did (BENCHMARKS.md). A core that is never idle would starve it, so a write that waits
# longer than the patience runs under the default policy until it is done. Moving a process
# out of SCHED_IDLE takes CAP_SYS_NICE or an RLIMIT_NICE of 20 (sched(7)); without either the
# child could never be hurried, so it runs at nice _NICE instead.
_IDLE = getattr(os, "SCHED_IDLE", None)
_NORMAL = getattr(os, "SCHED_OTHER", None)
_NICE = 10  # CFS weight 110 against a busy thread's 1024: a tenth of the core, above a flush's need
_CAP_SYS_NICE = 23


def _may_leave_idle() -> bool:
    if _IDLE is None:
        return False
    soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    if soft == resource.RLIM_INFINITY or soft >= 20:  # nice 0 is within 20 - soft
        return True
    try:
        status = Path("/proc/self/status").read_text()
        effective = int(next(ln.split()[1] for ln in status.splitlines()
                             if ln.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError):
        return False
    return bool(effective >> _CAP_SYS_NICE & 1)


def _set_policy(pid: int, policy: int | None) -> bool:
    if policy is None:
        return False
    try:
        os.sched_setscheduler(pid, policy, os.sched_param(0))
    except OSError as exc:  # the process ended, or a policy we may not set after all
        logging.getLogger("frugalserve.ledger").warning(
            "could not set the ledger writer process's scheduling policy: %s", exc)
        return False
    return True


def _serve() -> None:
    """The child: read the ledger's URL, then write each flush it is sent, answer None or why
    it failed; end at EOF."""
    # The server stops on SIGINT or SIGTERM, flushes through this process, then closes it. A
    # terminal's Ctrl-C reaches the whole process group: it must not end a write midway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    calls = sys.stdin.buffer
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not break the pipe
    engine = connect(pickle.load(calls))
    pickle.dump(None, answers)  # ready
    answers.flush()
    while True:
        try:
            call = pickle.load(calls)
        except EOFError:
            return
        try:
            write_flush(engine, *call)
            failure = None
        except Exception as exc:  # noqa: BLE001 - the parent keeps the records and retries
            failure = f"{type(exc).__name__}: {exc}"
        pickle.dump(failure, answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()


if __name__ == "__main__":
    _serve()

"""`frugalserve serve` in a process of its own, for measuring a server as it is deployed.

A server on a thread of the process that drives its load shares that process's GIL with the
load generator: its worker threads then wait for the GIL behind client code, and on a machine
of two cores a worker that waits so burns CPU itself: 9.7x the thread CPU time of the same
predict call alone (bench/gil_wait.py, BENCHMARKS.md). Costs and throughput measured that way
are the client's as much as the server's. Here the server runs alone on core 0 and this process
keeps to the other cores while it runs, as the serving benchmark places them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

SERVER_CORE = 0
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A context manager: start the server on `repository` with the ledger at `ledger_url`,
    wait until it is ready; on exit, stop it with SIGTERM (it finishes in-flight requests and
    flushes the ledger) and restore this process's cores."""

    def __init__(self, repository: Path, ledger_url: str, *, ready_timeout_s: float = 300.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.repository = Path(repository)
        self.ledger_url = ledger_url
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall it
        self._cores: set[int] | None = None

    def __enter__(self) -> ServerProcess:
        argv = [sys.executable, "-m", "frugalserve.cli", "serve", str(self.repository),
                "--port", str(self.port), "--ledger", self.ledger_url, "--poll-interval", "0",
                "--log-level", "warning"]
        cores = os.sched_getaffinity(0)
        pin = SERVER_CORE in cores and len(cores) > 1
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        if pin:  # by pid, not preexec_fn (unsafe in a process with threads); before it serves
            os.sched_setaffinity(self.process.pid, {SERVER_CORE})
            self._cores = cores
            os.sched_setaffinity(0, cores - {SERVER_CORE})
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"frugalserve serve exited with {self.process.returncode}:\n"
                                   f"{self._log_tail()}")
            try:
                with _LOCAL.open(f"{self.url}/v2/health/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"frugalserve serve not ready after {self.ready_timeout_s:.0f} s")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._cores is not None:
            os.sched_setaffinity(0, self._cores)
            self._cores = None
        process = self.process
        try:
            if process is None or process.poll() is not None:
                return
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.returncode != 0 and kind is None:
                raise RuntimeError(f"frugalserve serve stopped with {process.returncode}:\n"
                                   f"{self._log_tail()}")
        finally:
            self._log.close()

    def _log_tail(self, limit: int = 4000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-limit:]

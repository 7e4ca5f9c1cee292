"""The servers under test: how each is laid out and launched, pinned to core 0, and stopped.

Every server runs in its own session (process group), so stopping it stops everything it
spawned; `Running` is a context manager, so a server is stopped on errors and Ctrl-C too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from machine import process_cpu_seconds, tree_cpu_seconds
from workloads import Workload

from frugalserve.server_process import free_port

SERVER_CORE = 0
BENCH = Path(__file__).resolve().parent
PEERS = BENCH / "peers"
MLSERVER_TEMPLATE = PEERS / "mlserver_onnx"
MLSERVER_VENV = BENCH / ".venv-mlserver"
VENV_BIN = Path(sys.executable).parent
_LIVE: set[Running] = set()  # started and not yet stopped, for stop_all()
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Server:
    key: str
    label: str
    # (workload, port, scratch dir) -> how to start it; lays out any files it needs
    prepare: Callable[[Workload, int, Path], Launch]
    # base URL -> the server's own cumulative counters (requests, batches, busy_seconds)
    counters: Callable[[str], dict[str, float]] | None = None
    binary: bool = False  # the load sends V2 binary-extension requests instead of JSON


def _frugalserve(metering: bool) -> Callable[[Workload, int, Path], Launch]:
    def prepare(workload: Workload, port: int, scratch: Path) -> Launch:
        model_dir = scratch / "repo" / workload.name
        (model_dir / "1").mkdir(parents=True)
        shutil.copy(workload.onnx_path, model_dir / "1" / "model.onnx")
        (model_dir / "config.yaml").write_text(
            f"batching: {{max_batch_size: {workload.max_batch_size}, max_queue_delay_ms: 2}}\n"
            "device: {type: aws-c7i.large, share: 0.5}\n")
        argv = [str(VENV_BIN / "frugalserve"), "serve", str(scratch / "repo"), "--port",
                str(port), "--log-level", "warning"]
        if metering:
            argv += ["--ledger", f"sqlite:///{scratch / 'ledger.db'}"]
        else:
            argv.append("--no-metering")
        return Launch(argv)

    return prepare


def _naive(workload: Workload, port: int, scratch: Path) -> Launch:
    return Launch([sys.executable, str(PEERS / "naive_fastapi.py"), "--model",
                   str(workload.onnx_path), "--port", str(port)])


def _bare(workload: Workload, port: int, scratch: Path) -> Launch:
    return Launch([sys.executable, str(PEERS / "bare_asgi.py"), "--port", str(port)])


def _mlserver(workload: Workload, port: int, scratch: Path) -> Launch:
    settings = json.loads((MLSERVER_TEMPLATE / "settings.json").read_text())
    settings |= {"http_port": port, "grpc_port": free_port(), "metrics_port": free_port()}
    (scratch / "settings.json").write_text(json.dumps(settings))
    model = json.loads((MLSERVER_TEMPLATE / "model-settings.json").read_text())
    model |= {"name": workload.name, "max_batch_size": workload.max_batch_size}
    model_dir = scratch / workload.name
    model_dir.mkdir()
    (model_dir / "model-settings.json").write_text(json.dumps(model))
    shutil.copy(workload.onnx_path, model_dir / "model.onnx")
    return Launch([str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(scratch)],
                  {"PYTHONPATH": str(MLSERVER_TEMPLATE)})


def _frugalserve_counters(base_url: str) -> dict[str, float]:
    with _LOCAL.open(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = dict.fromkeys(("requests", "batches", "busy_seconds"), 0.0)
    for name, value in re.findall(r"^frugalserve_(\w+)_total\{[^}]*\} (\S+)$", text, re.M):
        if name in totals:
            totals[name] += float(value)
    return totals


FRUGAL = Server("frugalserve", "frugalserve", _frugalserve(metering=True),
                _frugalserve_counters)
FRUGAL_BINARY = Server("frugalserve-binary", "frugalserve binary", _frugalserve(metering=True),
                       _frugalserve_counters, binary=True)
FRUGAL_OFF = Server("frugalserve-nometer", "frugalserve no-metering", _frugalserve(False),
                    _frugalserve_counters)


def frugalserve_at(source: Path, label: str) -> Server:
    """Metered frugalserve run from another source tree (a `git archive` of a revision)."""
    metered = _frugalserve(metering=True)

    def prepare(workload: Workload, port: int, scratch: Path) -> Launch:
        launch = metered(workload, port, scratch)
        return Launch(launch.argv, {**launch.env, "PYTHONPATH": str(source)})

    return Server(f"frugalserve-{label}", f"frugalserve {label}", prepare, _frugalserve_counters)


def frugalserve_with(options: list[str], name: str, label: str) -> Server:
    """Metered frugalserve started with more `serve` options."""
    metered = _frugalserve(metering=True)

    def prepare(workload: Workload, port: int, scratch: Path) -> Launch:
        launch = metered(workload, port, scratch)
        return Launch([*launch.argv, *options], launch.env)

    return Server(name, label, prepare, _frugalserve_counters)


def frugalserve_flushing(interval_s: float) -> Server:
    """Metered frugalserve whose ledger writer flushes every `interval_s` seconds."""
    return frugalserve_with(["--flush-interval", str(interval_s)],
                            f"frugalserve-flush-{interval_s:g}",
                            f"frugalserve flushing every {interval_s:g} s")


# metered, its ledger written from a thread of the server rather than a child process
FRUGAL_LEDGER_THREAD = frugalserve_with(["--ledger-thread"], "frugalserve-ledger-thread",
                                        "frugalserve, ledger thread")
NAIVE = Server("naive", "naive FastAPI", _naive)
MLSERVER = Server("mlserver", "MLServer", _mlserver)
BARE = Server("bare", "bare ASGI", _bare)


def _get_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with _LOCAL.open(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def post(url: str, body: bytes, timeout: float = 10.0,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, body, headers or {"Content-Type": "application/json"})
    try:
        with _LOCAL.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Running:
    """One server process: started pinned to SERVER_CORE, ready when /v2/health/ready is 200."""

    def __init__(self, server: Server, workload: Workload, scratch: Path, log_path: Path):
        self.server, self.workload = server, workload
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        scratch.mkdir(parents=True, exist_ok=True)
        launch = server.prepare(workload, self.port, scratch)
        argv = ["taskset", "-c", str(SERVER_CORE), *launch.argv]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=scratch, env=os.environ | launch.env, start_new_session=True)
        _LIVE.add(self)

    @property
    def infer_url(self) -> str:
        return f"{self.base_url}/v2/models/{self.workload.name}/infer"

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.server.label} exited with {self.process.returncode}:"
                                   f"\n{self.log_tail()}")
            if _get_status(f"{self.base_url}/v2/health/ready") == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.server.label} not ready after {timeout_s:.0f}s:\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cpu_seconds(self, main_thread: bool = False) -> float:
        """The server's CPU seconds: all its threads and child processes (the ledger writer's),
        or its main (event loop) thread."""
        pid = self.process.pid
        return process_cpu_seconds(pid, pid) if main_thread else tree_cpu_seconds(pid)

    def counters(self) -> dict[str, float] | None:
        return self.server.counters(self.base_url) if self.server.counters else None

    def stop(self) -> None:
        _LIVE.discard(self)
        if self.process.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> Running:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def stop_all() -> None:
    """Stop every server still running: the last line of defence on errors and Ctrl-C."""
    for running in list(_LIVE):
        running.stop()

"""Wiring: a repository, a rate card and a ledger become a served V2 endpoint.

`run_server` is what `frugalserve serve` runs (the native HTTP server); `ServerThread` runs the
same in the background of another program (tests, the demo); `build_app` gives an ASGI app for
embedding in ASGI servers.
"""

from __future__ import annotations

import asyncio
import gc
import math
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import uvloop

from .economics.alerts import AlertSink
from .economics.ledger import FLUSH_INTERVAL_S, LedgerWriter, open_engine, sqlite_url
from .economics.ratecard import RateCard
from .protocols.http_server import HttpServer
from .protocols.v2_rest import DEFAULT_MAX_BODY_BYTES, V2App, V2Handler
from .repository import ModelRepository
from .serving import DataPlane
from .serving.admission import Admission

LEDGER_FILE = "frugalserve-ledger.db"
# A worker thread that finishes a batch waits for the GIL while the event loop parses requests;
# the default 5 ms switch interval idles the engine for that long per batch.
SWITCH_INTERVAL_S = 0.0005
# The cyclic GC collects its young generation every 700 net container allocations by default.
# 64 requests in flight hold about that many, so under load it ran every ~100 requests, cost
# 1.6 us of CPU a request (mostly the event loop's) and freed fewer than 2 objects a pass: a
# request's objects die by reference counting. At 10,000 it ran twice in 194,000 requests
# (BENCHMARKS.md, "session 7").
GC_YOUNG_THRESHOLD = 10_000
MAX_INTERVAL_S = 86400.0  # the longest poll, flush or refresh interval a server accepts


@dataclass
class ServerSettings:
    repository: Path
    ledger_url: str | None = None  # default: SQLite file next to the repository
    rate_card: Path | None = None
    metering: bool = True
    poll_interval_s: float | None = 2.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    flush_interval_s: float = FLUSH_INTERVAL_S
    ledger_process: bool = True  # write the ledger from a child process (ledger_process.py)
    retention_days: float | None = 30.0  # raw usage/batch rows; rollups are kept (None: all)
    # API keys: None (auto) = anonymous requests allowed while the ledger holds no active key;
    # True = always (a trusted network); False = never. Admin routes follow the same rule.
    allow_anonymous: bool | None = None
    trust_tenant_header: bool = False  # anonymous requests may name their tenant (X-Tenant)
    budgets_file: Path | None = None  # budgets.yaml, in force beside the ledger's `budgets`
    alert_webhook: str | None = None  # budget alerts are POSTed here as JSON
    admission_refresh_s: float = 2.0  # keys and budgets are reloaded from the ledger this often
    budget_safety: float = 2.0  # reservation = this x the measured cost of the request's rows

    def check(self) -> None:
        """ValueError naming the first setting out of range: a negative poll interval polled
        the repository without pause, a limit below one byte refused every body."""
        if self.max_body_bytes < 1:
            raise ValueError(f"the request body limit must be positive, got {self.max_body_bytes}"
                             " bytes")
        # an interval of inf (or over threading.TIMEOUT_MAX) killed the ledger writer's thread
        # with an OverflowError, and nothing was written until shutdown
        intervals = {"poll interval": self.poll_interval_s,
                     "flush interval": self.flush_interval_s,
                     "admission refresh interval": self.admission_refresh_s}
        for what, value in intervals.items():
            if value is not None and not 0 < value <= MAX_INTERVAL_S:  # NaN too
                raise ValueError(f"the {what} must be positive and at most {MAX_INTERVAL_S:g} s "
                                 f"(a day), got {value}")
        if not 0 < self.budget_safety < math.inf:
            raise ValueError(f"the budget safety factor must be positive and finite, got "
                             f"{self.budget_safety}")

    def resolved_ledger_url(self) -> str:
        if self.ledger_url:
            return self.ledger_url
        return sqlite_url(Path(self.repository).resolve().parent / LEDGER_FILE)


def build_dataplane(settings: ServerSettings) -> DataPlane:
    settings.check()
    repository = ModelRepository(settings.repository)
    ledger = None
    if settings.metering:
        engine = open_engine(settings.resolved_ledger_url())
        ledger = LedgerWriter(engine, settings.flush_interval_s,
                              spill_dir=Path(settings.repository).resolve().parent,
                              retention_days=settings.retention_days,
                              in_child=settings.ledger_process)
    return DataPlane(repository, RateCard.load(settings.rate_card),
                     build_admission(settings, ledger), ledger, settings.poll_interval_s)


def build_admission(settings: ServerSettings, ledger: LedgerWriter | None) -> Admission:
    """Keys and budgets live in the ledger's database; with metering off it is still opened
    for the keys, unless anonymous access is allowed outright."""
    if ledger is not None:
        engine = ledger.engine
    elif settings.allow_anonymous is not True:
        engine = open_engine(settings.resolved_ledger_url())
    else:
        engine = None
    alerts = AlertSink(engine, settings.alert_webhook)
    return Admission(engine, allow_anonymous=settings.allow_anonymous,
                     trust_tenant_header=settings.trust_tenant_header,
                     refresh_s=settings.admission_refresh_s, budgets_file=settings.budgets_file,
                     alerts=alerts, safety=settings.budget_safety)


def build_app(settings: ServerSettings) -> V2App:
    return V2App(build_dataplane(settings), settings.max_body_bytes)


def build_server(settings: ServerSettings, host: str, port: int) -> HttpServer:
    handler = V2Handler(build_dataplane(settings), settings.max_body_bytes)
    return HttpServer(handler, host, port)


def run_server(settings: ServerSettings, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then finish in-flight requests and flush the ledger."""
    server = build_server(settings, host, port)
    _tune_interpreter()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        await server.serve()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def _tune_interpreter() -> None:
    """The GIL switch interval and the GC's young-generation threshold, for serving."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


class ServerThread:
    """The server on a background thread with its own event loop (port 0: a free port)."""

    def __init__(self, settings: ServerSettings, host: str = "127.0.0.1", port: int = 0):
        self.server = build_server(settings, host, port)
        self._thread = threading.Thread(target=self._run, name="frugalserve", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    @property
    def dataplane(self) -> DataPlane:
        return self.server.handler.dataplane

    def _run(self) -> None:
        async def main() -> None:
            task = asyncio.create_task(self.server.serve())
            started = asyncio.create_task(self.server.started.wait())
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():  # it ended before it listened: raise why (port in use...)
                started.cancel()
                task.result()
            self._ready.set()
            await task

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()

    def start(self, timeout_s: float = 120.0) -> ServerThread:
        _tune_interpreter()  # process-wide: the host program shares it
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("server did not start in time")
        if self._error is not None:
            raise RuntimeError(f"server failed to start: {self._error}") from self._error
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Graceful: in-flight requests finish, batches drain, the ledger is flushed."""
        self.server.stop()
        self._thread.join(timeout_s)
        if self._error is not None:
            raise RuntimeError(f"server failed: {self._error}") from self._error

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

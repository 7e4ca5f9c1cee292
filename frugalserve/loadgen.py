"""The load generator behind `frugalserve bench` and the demo.

Two ways to offer load, both over keep-alive HTTP/1.1 connections (see `http1`):

- closed loop: `concurrency` connections, each sending its next request as soon as the last
  one answered; the throughput found is the server's capacity at that concurrency;
- open loop: requests arrive as a Poisson process at `rate` per second, whatever the server
  does; an arrival waits for a free connection of the pool, and its latency counts from the
  moment it was due (so a slow server cannot hide its queue: no coordinated omission).

Both stop by themselves after `duration_s` or `requests`, whichever comes first. Bodies are
sent in turn, and each response can be checked against what was sent (`check`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from rich.progress import Progress

from .http1 import HttpConnection, address, prepare_request
from .progress import new_progress

NO_RESPONSE = 0  # the status recorded when no response came: refused, reset, timed out
Check = Callable[[int, bytes], bool]  # (index of the body sent, response body) -> correct?


@dataclass
class LoadSpec:
    url: str
    bodies: Sequence[bytes]
    concurrency: int = 16  # closed loop: connections sending back to back
    rate: float | None = None  # open loop: mean arrivals per second; None means closed loop
    connections: int = 64  # open loop: the connection pool arrivals wait for
    duration_s: float | None = 10.0
    requests: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    check: Check | None = None
    timeout_s: float = 30.0
    seed: int = 0
    label: str = "load"

    def __post_init__(self) -> None:
        if not self.bodies:
            raise ValueError("need at least one request body")
        if self.duration_s is None and self.requests is None:
            raise ValueError("give a duration or a number of requests, or the load never ends")
        # `not x > 0` refuses NaN too; a duration of 0 used to mean no limit at all, and a
        # timeout of 0 a watchdog that never slept
        if self.duration_s is not None and not 0 < self.duration_s < float("inf"):
            raise ValueError(f"the duration must be positive and finite, got {self.duration_s:g} s")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"the number of requests must be >= 1, got {self.requests}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("rate must be positive")
        if not self.timeout_s > 0:
            raise ValueError(f"the timeout must be positive, got {self.timeout_s:g} s")
        if min(self.concurrency, self.connections) < 1:
            raise ValueError("concurrency and connections must be >= 1")
        address(self.url)  # only http:// URLs, with a valid port
        prepare_request("POST", self.url, b"", self.headers)  # headers HTTP can carry

    @property
    def mode(self) -> str:
        if self.rate is None:
            return f"closed x{self.concurrency}"
        return f"Poisson {self.rate:,.0f}/s"


@dataclass(frozen=True)
class LoadSummary:
    mode: str
    requests: int
    ok: int
    errors: dict[int, int]  # status -> count; 0 = no response
    rps: float  # achieved: responses per second of wall time
    offered_rps: float | None  # open loop: the rate asked for
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    accuracy: float | None  # share of checked responses that were right
    last_error: str | None  # the last failure: a transport error or an error response


@dataclass
class LoadResult:
    spec: LoadSpec
    started_at: float  # epoch seconds when the first request could go
    elapsed_s: float
    latency_s: np.ndarray
    status: np.ndarray
    correct: np.ndarray  # 1 right, 0 wrong, -1 not checked
    last_error: str | None = None

    def summary(self) -> LoadSummary:
        ok = self.status == 200
        # Percentiles of successful requests: a fast 503 is not a fast answer.
        lat = (self.latency_s[ok] if ok.any() else self.latency_s) * 1000
        p50, p90, p99, top = np.percentile(lat, [50, 90, 99, 100]) if len(lat) else [0.0] * 4
        codes, counts = np.unique(self.status[~ok], return_counts=True)
        checked = self.correct >= 0
        return LoadSummary(
            mode=self.spec.mode,
            requests=len(self.status),
            ok=int(ok.sum()),
            errors={int(c): int(n) for c, n in zip(codes, counts, strict=True)},
            rps=len(self.status) / self.elapsed_s if self.elapsed_s > 0 else 0.0,
            offered_rps=self.spec.rate,
            p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), max_ms=float(top),
            accuracy=float(self.correct[checked].mean()) if checked.any() else None,
            last_error=self.last_error,
        )


def run(spec: LoadSpec, progress: Progress | None = None) -> LoadResult:
    """Run a load to its end on a fresh event loop (uvloop when installed)."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        if progress is not None:
            return runner.run(run_load(spec, progress))
        with new_progress() as own:
            return runner.run(run_load(spec, own))


async def run_load(spec: LoadSpec, progress: Progress) -> LoadResult:
    return await _Run(spec, progress).go()


class _Run:
    """One load run: the connections, the stop rule, and what every request gave."""

    def __init__(self, spec: LoadSpec, progress: Progress):
        self.spec = spec
        self.progress = progress
        self.addr = address(spec.url)
        self.raws = [prepare_request("POST", spec.url, b, spec.headers) for b in spec.bodies]
        self.conns: list[HttpConnection | None] = []
        self.issued = 0
        self.failed = 0  # responses other than 200, for the live display
        self.limit = spec.requests if spec.requests is not None else float("inf")
        self.start = self.deadline = 0.0
        self.last_error: str | None = None
        self.latency: list[float] = []
        self.status: list[int] = []
        self.correct: list[int] = []

    async def go(self) -> LoadResult:
        spec = self.spec
        pool = spec.concurrency if spec.rate is None else spec.connections
        self.conns = list(await asyncio.gather(*(self._connect() for _ in range(pool))))
        # the bar counts requests when a count is given (whichever limit comes first), else time
        task = self.progress.add_task(f"{spec.label}: {spec.mode}",
                                      total=spec.duration_s if spec.requests is None
                                      else spec.requests)
        started_at = time.time()
        self.start = time.perf_counter()
        self.deadline = self.start + (float("inf") if spec.duration_s is None
                                      else spec.duration_s)
        helpers = [asyncio.create_task(self._tick(task)), asyncio.create_task(self._watchdog())]
        try:
            if spec.rate is None:
                await asyncio.gather(*(self._closed_worker(s) for s in range(pool)))
            else:
                await self._open_loop(pool)
        finally:
            for helper in helpers:
                helper.cancel()
            for conn in self.conns:
                if conn is not None:
                    conn.close()
        elapsed = time.perf_counter() - self.start
        self._show(task, final=True)
        return LoadResult(spec, started_at, elapsed, np.array(self.latency),
                          np.array(self.status, dtype=np.int16),
                          np.array(self.correct, dtype=np.int8), self.last_error)

    # -- offering load -----------------------------------------------------------------------

    def _take(self, due: float) -> int | None:
        """The next body to send, or None when the run is over."""
        if self.issued >= self.limit or due >= self.deadline:
            return None
        i = self.issued % len(self.raws)
        self.issued += 1
        return i

    async def _closed_worker(self, slot: int) -> None:
        while (i := self._take(time.perf_counter())) is not None:
            await self._send(slot, i, time.perf_counter())

    async def _open_loop(self, pool: int) -> None:
        queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
        workers = [asyncio.create_task(self._open_worker(s, queue)) for s in range(pool)]
        rng = random.Random(self.spec.seed)
        due = self.start
        while (i := self._take(due := due + rng.expovariate(self.spec.rate))) is not None:
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            queue.put_nowait((i, due))  # due in the past: the sleep overslept; send at once
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)

    async def _open_worker(self, slot: int, queue: asyncio.Queue) -> None:
        while (item := await queue.get()) is not None:
            await self._send(slot, *item)

    async def _send(self, slot: int, i: int, origin: float) -> None:
        conn = self.conns[slot]
        if conn is None or conn.closed:
            conn = self.conns[slot] = await self._connect()
            if conn is None:
                self._record(i, origin, NO_RESPONSE, b"")
                await asyncio.sleep(0.05)  # server down: do not spin on refusals
                return
        conn.sent_at = time.perf_counter()
        try:
            status, body = await conn.request(self.raws[i])
        except ConnectionError as exc:
            self.last_error = str(exc) or type(exc).__name__
            status, body = NO_RESPONSE, b""
        self._record(i, origin, status, body)

    async def _connect(self) -> HttpConnection | None:
        try:
            return await HttpConnection.open(*self.addr)
        except OSError as exc:
            self.last_error = f"cannot connect to {self.addr[0]}:{self.addr[1]}: {exc.strerror}"
            return None

    def _record(self, i: int, origin: float, status: int, body: bytes) -> None:
        self.latency.append(time.perf_counter() - origin)
        self.status.append(status)
        if status != 200:
            self.failed += 1
            if status != NO_RESPONSE:  # the server's reason, for the summary
                self.last_error = f"HTTP {status}: {body[:300].decode(errors='replace')}"
        self.correct.append(self._check(i, body) if status == 200 else -1)

    def _check(self, i: int, body: bytes) -> int:
        if self.spec.check is None:
            return -1
        try:
            return int(self.spec.check(i, body))
        except Exception as exc:  # noqa: BLE001 - a response the check cannot read is wrong
            self.last_error = f"check failed on a 200 response: {exc!r}"
            return 0

    # -- housekeeping ------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        """Abort requests past the timeout: one sweep a second costs less than a timer each."""
        timeout = self.spec.timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 2))
            now = time.perf_counter()
            for conn in self.conns:
                if conn is not None and conn.busy and now - conn.sent_at > timeout:
                    conn.abort(f"no response within {timeout:g} s")

    async def _tick(self, task) -> None:
        while True:
            await asyncio.sleep(0.25)
            self._show(task)

    def _show(self, task, final: bool = False) -> None:
        spec = self.spec
        done = len(self.status)
        elapsed = time.perf_counter() - self.start
        text = f"{spec.label}: {spec.mode}, {done:,} req, {done / max(elapsed, 1e-9):,.0f}/s"
        if self.failed:
            text += f", {self.failed:,} errors"
        if spec.requests is None:
            completed = spec.duration_s if final else min(elapsed, spec.duration_s)
        else:
            completed = spec.requests if final else done
        self.progress.update(task, description=text, completed=completed)

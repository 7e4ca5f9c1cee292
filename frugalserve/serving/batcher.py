"""Deadline-aware dynamic batching for one model version.

The scheduler (an asyncio task) forms batches; worker threads (one per instance) run them.
A batch is cut when an instance is free and one of these holds:
  - it is full: it holds the preferred batch size, the one whose measured device time per
    row (what the meter bills) is lowest (max_batch_size unless a smaller size is 5% cheaper
    per row, as it can be for a convolutional network whose activations outgrow the cache);
  - waiting longer would break the oldest request's deadline: its max queue delay (time in
    the queue, as Triton's), or its own timeout (time to its answer, so the measured
    execution time of the current batch size is subtracted);
  - the queue has gone quiet: no arrival during two turns of the event loop and for a
    quarter of the batch's own execution time. A lone request on a small model leaves at
    once; on a heavy model, requests a few hundred microseconds apart still share a batch.
While every instance is busy, requests simply accumulate, so batches grow with load.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any

import numpy as np

from .errors import DeadlineExceeded, Overloaded, Unavailable

_IDLE_TURNS = 2  # loop turns with no arrival before an under-full batch may be cut
_PATIENCE = 0.25  # ... and quiet for this share of the batch's measured execution time
_PREFER = 0.95  # a smaller batch size is preferred when its time per row is below this share
_RISE = 0.02  # how fast a bucket's cost per row follows measures above it (at once below)


class Pending:
    """One request waiting for its share of a batch."""

    __slots__ = ("inputs", "rows", "arrival", "deadline", "expires", "future", "context")

    def __init__(self, inputs: dict[str, np.ndarray], rows: int, arrival: float, deadline: float,
                 expires: float | None, future: asyncio.Future, context: Any):
        self.inputs = inputs
        self.rows = rows
        self.arrival = arrival  # perf_counter seconds
        self.deadline = deadline  # its max queue delay ends: cut its batch by then
        self.expires = expires  # its own timeout: answer by then; after it, failed unserved
        self.future = future
        self.context = context  # opaque to the batcher: the DataPlane's request


@dataclass(slots=True)
class Batch:
    items: list[Pending]
    rows: int
    dispatched: float  # perf_counter when cut
    started_at: float = 0.0  # epoch seconds when compute began
    wall_s: float = 0.0  # how long predict took: what scheduling must plan for
    compute_s: float = 0.0  # the device time it used: what the meter bills
    outputs: dict[str, np.ndarray] | None = None
    error: BaseException | None = None


class ExecProfile:
    """Execution seconds per batch size: an EWMA per power-of-two bucket, seeded by a warm-up
    at load time and refreshed by every batch that runs.

    Two clocks: wall seconds, which deadlines must plan for, and device seconds per row, which
    pick the preferred size. For an engine computing on one thread those are its CPU seconds:
    its wall time also holds the time the core ran something else (another process, the
    ledger writer, the event loop holding the GIL), noise that made the preferred size of a
    small MLP flip between 8 and 64 several times a second under load. Device time is noisy
    too (a cold cache after the core ran something else), and that noise only ever adds, so
    the cost per row follows the lower envelope of what was measured: it falls at once and
    rises slowly (_RISE). One interrupted batch no longer makes a bucket look dearer."""

    def __init__(self, max_batch_size: int, alpha: float = 0.2):
        self.alpha = alpha
        self.max_batch_size = max_batch_size
        self.preferred = max_batch_size  # rows per batch at the lowest device time per row
        self._seconds: list[float | None] = [None] * (max_batch_size.bit_length() + 1)
        # seconds per row, by the same buckets: a bucket holds batches of several sizes, and
        # its seconds over its top size would favour it by up to 2x
        self._per_row: list[float | None] = [None] * len(self._seconds)

    @staticmethod
    def _bucket(rows: int) -> int:
        return (rows - 1).bit_length()  # 1->0, 2->1, 3..4->2, 5..8->3 ...

    def observe(self, rows: int, seconds: float, device_s: float | None = None) -> None:
        """A batch of `rows` took `seconds` of wall time and `device_s` of device time (None:
        the same)."""
        i = min(self._bucket(rows), len(self._seconds) - 1)
        old = self._seconds[i]
        self._seconds[i] = seconds if old is None else old + self.alpha * (seconds - old)
        per_row, old = (seconds if device_s is None else device_s) / rows, self._per_row[i]
        if old is None or per_row < old:
            self._per_row[i] = per_row
        else:
            self._per_row[i] = old + _RISE * (per_row - old)
        self.preferred = self._most_efficient()

    def _most_efficient(self) -> int:
        """The largest measured size, unless a smaller one is clearly cheaper per row."""
        best_rows, best = self.max_batch_size, None
        for i in range(len(self._per_row) - 1, -1, -1):
            per_row = self._per_row[i]
            if per_row is not None and (best is None or per_row < best * _PREFER):
                best_rows, best = min(1 << i, self.max_batch_size), per_row
        return best_rows

    def estimate(self, rows: int) -> float:
        i = min(self._bucket(max(rows, 1)), len(self._seconds) - 1)
        known = self._seconds[i]
        if known is not None:
            return known
        # nearest measured bucket, scaled by size: an overestimate for batch-friendly engines
        for step in range(1, len(self._seconds)):
            for j in (i - step, i + step):
                if 0 <= j < len(self._seconds) and self._seconds[j] is not None:
                    return self._seconds[j] * 2.0 ** (i - j)
        return 0.0


class Batcher:
    def __init__(
        self,
        predict: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
        on_batch: Callable[[Batch], None],
        on_dropped: Callable[[Pending, int], None],
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        instances: int = 1,
        name: str = "model",
        thread_cpu: bool = False,
    ):
        self.predict = predict
        # the engine computes only on the calling thread: that thread's CPU time is the device
        # time a batch used, and its wall time also holds waits for the GIL and the core
        self.thread_cpu = thread_cpu
        self.on_batch = on_batch  # called on the loop thread: settles every item's future
        # called on the loop thread for an item taken off the queue unserved, with its status:
        # 504 past its own timeout, 499 its caller gone (its future done: cancelled or failed)
        self.on_dropped = on_dropped
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.instances = instances
        self.name = name
        self.profile = ExecProfile(max_batch_size)
        self._queue: deque[Pending] = deque()
        self._rows = 0
        self._inflight = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Future | None = None
        self._slots: asyncio.Semaphore | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._work: SimpleQueue[Batch | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def warm_up(self, example: Callable[[int], dict[str, np.ndarray]], repeats: int = 3) -> None:
        """Measure execution time at each power-of-two batch size (blocking: call off the loop)."""
        rows = 1
        while True:
            rows = min(rows, self.max_batch_size)
            feeds = example(rows)
            self.predict(feeds)  # unmeasured: a first call at a new size allocates
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.thread_time()
                self.predict(feeds)
                self.profile.observe(rows, time.perf_counter() - t0,
                                     time.thread_time() - c0 if self.thread_cpu else None)
            if rows == self.max_batch_size:
                return
            rows *= 2

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.instances)
        self._idle = asyncio.Event()
        self._idle.set()
        for i in range(self.instances):
            t = threading.Thread(target=self._worker, name=f"{self.name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self._task = asyncio.create_task(self._schedule(), name=f"batcher:{self.name}")

    async def drain(self) -> None:
        """Refuse new requests, finish every queued and running one, then stop the workers."""
        self._closed = True
        assert self._idle is not None and self._task is not None
        await self._idle.wait()
        self._task.cancel()
        for _ in self._threads:
            self._work.put(None)
        for t in self._threads:
            await asyncio.to_thread(t.join)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- hot path ----------------------------------------------------------------------------

    def submit(self, item: Pending) -> None:
        if self._closed:
            raise Unavailable(f"model '{self.name}' is unloading")
        if len(self._queue) >= self.max_queue_size:
            backlog_s = self.profile.estimate(self.max_batch_size) * (
                self._rows / self.max_batch_size + 1)
            raise Overloaded(f"model '{self.name}' queue is full ({self.max_queue_size} requests)",
                             retry_after_s=max(1, round(backlog_s)))
        self._queue.append(item)
        self._rows += item.rows
        self._idle.clear()
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _schedule(self) -> None:
        while True:
            if not self._queue:
                self._wake = self._loop.create_future()
                await self._wake
                self._wake = None
            await self._slots.acquire()
            await self._gather()
            batch = self._take()
            if batch is None:
                self._slots.release()
                self._check_idle()
                continue
            self._inflight += 1
            self._work.put(batch)

    async def _gather(self) -> None:
        queue = self._queue
        idle_turns = 0
        while self._rows < self.profile.preferred:
            cut_at = self._cut_at(queue[0])
            if time.perf_counter() >= cut_at:
                return
            before = len(queue)
            await asyncio.sleep(0)
            if len(queue) != before:
                idle_turns = 0
                continue
            idle_turns += 1
            if idle_turns < _IDLE_TURNS:
                continue
            patience = self.profile.estimate(self._rows) * _PATIENCE
            quiet = time.perf_counter() - queue[-1].arrival
            if quiet >= patience:
                return
            await asyncio.sleep(min(patience - quiet, cut_at - time.perf_counter()))

    def _cut_at(self, oldest: Pending) -> float:
        if oldest.expires is None:
            return oldest.deadline
        return min(oldest.deadline, oldest.expires - self.profile.estimate(self._rows))

    def _take(self) -> Batch | None:
        items: list[Pending] = []
        rows = 0
        now = time.perf_counter()
        queue = self._queue
        limit = max(self.profile.preferred, queue[0].rows) if queue else 0
        while queue and rows + queue[0].rows <= limit:
            item = queue.popleft()
            self._rows -= item.rows
            if item.future.done():  # nobody waits for its answer: computing it is waste
                self.on_dropped(item, 499)
                continue
            if item.expires is not None and now > item.expires:
                waited_ms = 1000 * (now - item.arrival)
                item.future.set_exception(DeadlineExceeded(
                    f"request timed out after {waited_ms:.1f} ms in the queue"))
                self.on_dropped(item, 504)
                continue
            items.append(item)
            rows += item.rows
        return Batch(items, rows, now) if items else None

    def _worker(self) -> None:
        while (batch := self._work.get()) is not None:
            items = batch.items
            if len(items) == 1:
                feeds = items[0].inputs
            else:
                feeds = {name: np.concatenate([it.inputs[name] for it in items])
                         for name in items[0].inputs}
            batch.started_at = time.time()
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                batch.outputs = self.predict(feeds)
            except Exception as exc:  # noqa: BLE001 - the engine's failure goes to its requests
                batch.error = exc
            batch.wall_s = time.perf_counter() - t0
            batch.compute_s = time.thread_time() - c0 if self.thread_cpu else batch.wall_s
            self._loop.call_soon_threadsafe(self._complete, batch)

    def _complete(self, batch: Batch) -> None:
        self._inflight -= 1
        self._slots.release()
        if batch.error is None:
            self.profile.observe(batch.rows, batch.wall_s, batch.compute_s)
        self.on_batch(batch)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._queue and not self._inflight:
            self._idle.set()

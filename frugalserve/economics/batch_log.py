"""The batch log: each batch the event loop ran, and its plain requests.

    log = BatchLog()
    key = log.key("digits", "1", "reference", "aws-c7i.large", "on_demand", 0.5)
    log.record(key, batch_id, usage_id, started_at, rows, requests, compute_ms, cost,
               dispatched, done, done_at, arrivals, costs, "acme")
    pages = log.take()  # the ledger writer, at each flush: numpy columns

The loop appends one tuple per batch: the cost shares it made anyway, and the arrival times
copied into one array. Each arrival was a float object of its own, held until the flush and
scattered among the loop's short-lived objects; the copy frees them at once (what that saves
the loop is within the side-by-side bench's noise: BENCHMARKS.md, "session 7"). The writer drains
the tuples and lays them out as numpy columns (a Page), from which it makes rows and rollups
over whole pages. Why this split: under load the hot path's every numpy call runs with cold
caches, and writing a batch into preallocated arrays on the loop (six numpy calls) took about
1 % of the loop's samples in a py-spy profile; one append does
not show (BENCHMARKS.md, "Metering cost: this session's steps").
"""

from __future__ import annotations

import logging
from array import array
from collections import deque
from collections.abc import Sequence
from itertools import chain
from typing import NamedTuple

import numpy as np

# columns of Page.ints, one row per batch
BATCH_ID, USAGE_ID, KEY, ROWS, REQUESTS, PLAIN, COST, TENANT, FLAGS = range(9)
# columns of Page.times: epoch seconds (STARTED_AT, DONE_AT), milliseconds, perf_counter seconds
STARTED_AT, COMPUTE_MS, DISPATCHED, DONE, DONE_AT = range(5)
# FLAGS bits: the batch's requests' rows (items) or statuses are not all 1 and 200
ITEMS, STATUSES = 1, 2
MIXED = -1  # Page.ints TENANT of a batch whose requests' tenants differ: see Page.tenant

Key = tuple[str, str, str, str, str, float]  # model, version, variant, device, pricing, share
RECORD_FIELDS = ("key", "batch_id", "usage_id", "started_at", "rows", "requests", "compute_ms",
                 "cost", "dispatched", "done", "done_at", "arrivals", "costs", "tenant", "items",
                 "statuses", "request_ids")  # of a record(), in order
_LAYOUT_ERRORS = (OverflowError, TypeError, ValueError)

log = logging.getLogger("frugalserve.ledger")


class Codes(NamedTuple):
    """What the key and tenant codes of a log's pages stand for: what the page functions read
    of a BatchLog, and all of it that another process needs to write the pages."""

    keys: Sequence[Key]
    tenants: Sequence[str]


class BatchLog:
    """Batches recorded by the event loop, taken by the ledger writer. Nothing is dropped:
    what the writer has not taken waits, however long it is away."""

    def __init__(self) -> None:
        self.keys: list[Key] = []
        self.tenants: list[str] = []  # by code; the writer's alone, as is _codes
        self._codes: dict[str, int] = {}
        self._records: deque[tuple] = deque()  # append and popleft are atomic under the GIL
        self.unwritable: list[tuple] = []  # records no page can hold (see take)

    def key(self, model: str, version: str, variant: str, device: str, pricing: str,
            share: float) -> int:
        """The code a served variant records its batches under (look it up once, at load)."""
        key = (model, version, variant, device, pricing, share)
        if key not in self.keys:
            self.keys.append(key)
        return self.keys.index(key)

    def record(self, key: int, batch_id: int, usage_id: int, started_at: float, rows: int,
               requests: int, compute_ms: float, cost: int, dispatched: float, done: float,
               done_at: float, arrivals: Sequence[float], costs: Sequence[int],
               tenant: str | Sequence[str], items: Sequence[int] | None = None,
               statuses: Sequence[int] | None = None,
               request_ids: Sequence[str | None] | None = None) -> None:
        """One batch: `requests` items rode in it, of which the plain ones (`arrivals`, their
        `costs`, `tenant` one str for all or one each, `items` None for one row each,
        `statuses` None for all 200) are its usage; usage_id is their chunk's id. The
        arrivals are copied, the other sequences kept as they are: the caller hands them
        over."""
        self._records.append((key, batch_id, usage_id, started_at, rows, requests, compute_ms,
                              cost, dispatched, done, done_at, array("d", arrivals), costs,
                              tenant, items, statuses, request_ids))

    def take(self) -> list[Page]:
        """What was recorded so far, as one page (none when nothing was). A record that cannot
        be laid out as columns (a cost beyond int64 pico-dollars, which no rate card price
        allows short of a 92-hour batch) is set aside in `unwritable`, not left to stop the
        others: the ledger's columns could never hold it."""
        queue = self._records
        records = [queue.popleft() for _ in range(len(queue))]
        if not records:
            return []
        try:
            return [Page(records, self._tenant_code)]
        except _LAYOUT_ERRORS:
            fit = [r for r in records if self._fits(r)]
            return [Page(fit, self._tenant_code)] if fit else []

    def _fits(self, record: tuple) -> bool:
        try:
            Page([record], self._tenant_code)
        except _LAYOUT_ERRORS as exc:
            self.unwritable.append(record)
            log.error("batch %d of %s set aside: it cannot be laid out as the ledger's columns "
                      "(%s); it is written to a file at shutdown", record[1],
                      "/".join(map(str, self.keys[record[0]][:3])), exc)
            return False
        return True

    def unwritable_docs(self) -> list[dict]:
        """The records set aside, each as a JSON-ready mapping (its key spelled out)."""
        return [{**dict(zip(RECORD_FIELDS, r, strict=True)), "key": self.keys[r[0]],
                 "arrivals": list(r[11])} for r in self.unwritable]

    def codes(self) -> Codes:
        """A copy of the codes as they stand (after a take: every code its pages hold)."""
        return Codes(tuple(self.keys), tuple(self.tenants))

    def _tenant_code(self, tenant: str) -> int:
        code = self._codes.get(tenant)
        if code is None:
            self.tenants.append(tenant)
            code = self._codes[tenant] = len(self.tenants) - 1
        return code

    @property
    def pending(self) -> int:
        """Batches recorded and not yet taken."""
        return len(self._records)


class Page:
    """Recorded batches as columns: `ints` and `times` have a row per batch; a batch's plain
    requests are the next PLAIN entries of the request columns, in batch order."""

    __slots__ = ("batches", "requests", "ints", "times", "arrival", "cost", "items", "status",
                 "tenant", "request_ids")

    def __init__(self, records: list[tuple], tenant_code) -> None:
        counts = [len(r[11]) for r in records]
        self.batches, self.requests = len(records), sum(counts)
        self.ints = np.array(
            [(r[1], r[2], r[0], r[4], r[5], n, r[7],
              tenant_code(r[13]) if type(r[13]) is str else MIXED,
              (0 if r[14] is None else ITEMS) | (0 if r[15] is None else STATUSES))
             for r, n in zip(records, counts, strict=True)], np.int64).reshape(-1, 9)
        self.times = np.array([(r[3], r[6], r[8], r[9], r[10]) for r in records],
                              np.float64).reshape(-1, 5)
        # perf_counter seconds
        self.arrival = np.frombuffer(b"".join([r[11] for r in records]), np.float64)
        self.cost = np.fromiter(chain.from_iterable(r[12] for r in records), np.int64,
                                self.requests)  # pico-dollars
        self.items = np.ones(self.requests, np.int64)
        self.status = np.full(self.requests, 200, np.int16)
        self.tenant = np.empty(self.requests, np.int32)  # set only for a MIXED batch's requests
        self.request_ids: dict[int, Sequence[str | None]] = {}  # by batch, when any was sent
        start = 0
        for b, (r, n) in enumerate(zip(records, counts, strict=True)):
            end = start + n
            if r[14] is not None:
                self.items[start:end] = r[14]
            if r[15] is not None:
                self.status[start:end] = r[15]
            if type(r[13]) is not str:
                self.tenant[start:end] = list(map(tenant_code, r[13]))
            if r[16] is not None:
                self.request_ids[b] = r[16]
            start = end

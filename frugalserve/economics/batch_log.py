"""The batch log: each batch the event loop ran, and its plain requests, as numpy columns.

    log = BatchLog()
    key = log.key("digits", "1", "reference", "aws-c7i.large", "on_demand", 0.5)
    log.record(key, batch_id, usage_id, started_at, rows, requests, compute_ms, cost,
               dispatched, done, done_at, arrivals, costs, "acme")
    pages = log.take()  # the ledger writer, at each flush

The loop writes a batch's numbers into arrays allocated once (a page); the writer takes the
filled pages and makes rows and rollups from them with numpy, then hands the pages back.
Why columns: the loop used to keep a few Python objects per batch until the writer's flush,
and keeping any objects alive across ~85 batches of the hot path's short-lived ones cost the
server about 2 % of its throughput, whatever their number (BENCHMARKS.md, "Where the metering
cost goes"); a page holds none. Only request ids, when clients send them, are kept as objects.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

# columns of Page.ints, one row per batch
BATCH_ID, USAGE_ID, KEY, ROWS, REQUESTS, PLAIN, COST, TENANT, FLAGS = range(9)
# columns of Page.times: epoch seconds (STARTED_AT, DONE_AT), milliseconds, perf_counter seconds
STARTED_AT, COMPUTE_MS, DISPATCHED, DONE, DONE_AT = range(5)
# FLAGS bits: the batch's requests' rows (items) or statuses are not all 1 and 200
ITEMS, STATUSES = 1, 2
MIXED = -1  # Page.ints TENANT of a batch whose requests' tenants differ: see Page.tenant

Key = tuple[str, str, str, str, str, float]  # model, version, variant, device, pricing, share


class Page:
    """Room for `capacity` batches and `room` requests. A batch's requests are the next PLAIN
    entries of the request columns, in batch order."""

    __slots__ = ("capacity", "room", "batches", "requests", "ints", "times", "arrival", "cost",
                 "items", "status", "tenant", "request_ids")

    def __init__(self, capacity: int, room: int):
        self.capacity, self.room = capacity, room
        self.batches = 0
        self.requests = 0
        self.ints = np.empty((capacity, 9), np.int64)
        self.times = np.empty((capacity, 5), np.float64)
        self.arrival = np.empty(room, np.float64)  # perf_counter seconds
        self.cost = np.empty(room, np.int64)  # pico-dollars
        self.items = np.empty(room, np.int64)
        self.status = np.empty(room, np.int16)
        self.tenant = np.empty(room, np.int32)  # set only for a MIXED batch's requests
        self.request_ids: dict[int, tuple[str | None, ...]] = {}  # by batch, when any was sent


class BatchLog:
    """Pages the event loop fills and the ledger writer takes. Nothing is dropped: a full page
    is sealed and a fresh one begun, however long the writer is away."""

    def __init__(self, capacity: int = 1024, room: int = 32768):
        self.capacity, self.room = capacity, room
        self.keys: list[Key] = []
        self.tenants: list[str] = []
        self._codes: dict[str, int] = {}
        self._lock = threading.Lock()  # the writer swaps pages out while the loop records
        self._page = Page(capacity, room)
        self._sealed: list[Page] = []
        self._spare: list[Page] = []

    def key(self, model: str, version: str, variant: str, device: str, pricing: str,
            share: float) -> int:
        """The code a served variant records its batches under (look it up once, at load)."""
        key = (model, version, variant, device, pricing, share)
        if key not in self.keys:
            self.keys.append(key)
        return self.keys.index(key)

    def _tenant_code(self, tenant: str) -> int:
        code = self._codes.get(tenant)
        if code is None:
            self.tenants.append(tenant)  # before the code is seen: the writer reads by code
            code = self._codes[tenant] = len(self.tenants) - 1
        return code

    def record(self, key: int, batch_id: int, usage_id: int, started_at: float, rows: int,
               requests: int, compute_ms: float, cost: int, dispatched: float, done: float,
               done_at: float, arrivals: Sequence[float], costs: Sequence[int],
               tenant: str | Sequence[str], items: Sequence[int] | None = None,
               statuses: Sequence[int] | None = None,
               request_ids: tuple[str | None, ...] | None = None) -> None:
        """One batch: `requests` items rode in it, of which the plain ones (`arrivals`, their
        `costs`, `tenant` one str for all or one each, `items` None for one row each,
        `statuses` None for all 200) are its usage; usage_id is their chunk's id."""
        n = len(arrivals)
        with self._lock:
            page = self._page
            k, p = page.batches, page.requests
            if k == page.capacity or p + n > page.room:
                page = self._turn(n)
                k = p = 0
            end = p + n
            if type(tenant) is str:
                code = self._codes.get(tenant)
                if code is None:
                    code = self._tenant_code(tenant)
            else:
                code = MIXED
                page.tenant[p:end] = list(map(self._tenant_code, tenant))
            page.ints[k] = (batch_id, usage_id, key, rows, requests, n, cost, code,
                            (0 if items is None else ITEMS)
                            | (0 if statuses is None else STATUSES))
            page.times[k] = (started_at, compute_ms, dispatched, done, done_at)
            if n:
                page.arrival[p:end] = arrivals
                page.cost[p:end] = costs
                page.items[p:end] = 1 if items is None else items
                page.status[p:end] = 200 if statuses is None else statuses
                if request_ids is not None:
                    page.request_ids[k] = request_ids
            page.batches = k + 1
            page.requests = end

    def _turn(self, n: int) -> Page:
        """Seal the full page and begin one with room for at least n requests."""
        if self._page.batches:  # else it is only too small for this batch
            self._sealed.append(self._page)
        self._page = self._fresh(n)
        return self._page

    def _fresh(self, n: int = 0) -> Page:
        if self._spare and self._spare[-1].room >= n:
            return self._spare.pop()
        return Page(self.capacity, max(self.room, n))

    def take(self) -> list[Page]:
        """The pages filled so far, oldest first; the loop goes on in a fresh one."""
        with self._lock:
            pages, self._sealed = self._sealed, []
            if self._page.batches:
                pages.append(self._page)
                self._page = self._fresh()
        return pages

    def recycle(self, pages: list[Page]) -> None:
        """Pages whose rows are written, to be filled again (two are kept)."""
        for page in pages:
            page.batches = page.requests = 0
            page.request_ids.clear()
        with self._lock:
            self._spare = (self._spare + pages)[:2]

    @property
    def pending(self) -> int:
        """Batches recorded and not yet taken."""
        return sum(page.batches for page in (*self._sealed, self._page))

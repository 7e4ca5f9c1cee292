"""The ledger: usage and batch records in SQL, written in batches off the hot path.

SQLite (WAL) by default, PostgreSQL by URL; the same schema on both. The hot path records a
batch in the batch log or appends a chunk to a deque, nothing more; a writer thread takes what
accumulated every `flush_interval_s` and writes it (`write_flush`), itself or through a child
process (`ledger_process`, what a server does), and nothing is ever dropped: a failed write is
retried, and rows that still cannot be written at shutdown are spilled to a JSON-lines file
beside the database (or the working directory).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from itertools import repeat
from pathlib import Path

import numpy as np
import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    TypeDecorator,
    column,
    create_engine,
    event,
    select,
    table,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from .batch_log import (
    BATCH_ID,
    COMPUTE_MS,
    COST,
    DISPATCHED,
    DONE,
    DONE_AT,
    ITEMS,
    KEY,
    MIXED,
    PLAIN,
    REQUESTS,
    ROWS,
    STARTED_AT,
    STATUSES,
    TENANT,
    USAGE_ID,
    BatchLog,
    Codes,
    Page,
)

log = logging.getLogger("frugalserve.ledger")

metadata = MetaData()

# One row per server process that writes to the ledger; its id prefixes every record id the
# process makes (id = replica << 40 | n), so replicas sharing a database never collide.
replicas = Table(
    "replicas",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("started_at", Float, nullable=False),
    Column("host", String(256), nullable=False),
    Column("pid", Integer, nullable=False),
    # uptime, for amortized (busy + idle) cost: the writer stamps last_seen_at every
    # HEARTBEAT_S and stopped_at at a clean shutdown
    Column("last_seen_at", Float),
    Column("stopped_at", Float),
)

# Usage is stored in chunks: one row per batch (or per request that never ran), holding its
# requests in the JSON `requests` column, in one of two forms. The `usage` view reads both and
# gives one row per request. A row per request cost SQLite ~3 us of the server's core to write;
# a chunk costs well under 1 us per request.
# - Records (UsageChunk: requests that never ran, cascade flows): an array of [id, request_id,
#   ts, tenant, items, queue_ms, total_ms, cost_pusd, status]. A record may leave id, ts and
#   total_ms null: the view derives them (id: the chunk's id + its place, from 1; total_ms:
#   queue_ms + the chunk's run_ms; ts: the chunk's done_at - total_ms).
# - Columns (a batch's own requests, from the batch log: page_usage_rows; migration 0006): an
#   object {"queue_us": [...] (integer microseconds), "request_id", "tenant", "items",
#   "cost_pusd", "status"}, each of the last five a list or, when it is the same for every
#   request, one value; id, ts and total_ms derived as above.
#   No per-request Python to make it, and a fifth of the bytes of records: the writer shares
#   the server's core.
REQUEST_FIELDS = ("id", "request_id", "ts", "tenant", "items", "queue_ms", "total_ms",
                  "cost_pusd", "status")

usage_log = Table(
    "usage_log",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", Float, nullable=False, index=True),  # earliest arrival in the chunk
    Column("model", String(128), nullable=False),
    Column("version", String(32), nullable=False),
    # the variant path its requests took: "reference", "int8", "int8>reference" (a cascade)
    Column("variant", String(128)),
    Column("batch_id", BigInteger),  # null: the requests never ran (rejected, expired)
    Column("batch_size", Integer, nullable=False),
    Column("compute_ms", Float, nullable=False),
    Column("done_at", Float),  # epoch seconds the batch's answers went out
    Column("run_ms", Float),  # from the batch's dispatch to its answers (same for each request)
    Column("requests", JSON().with_variant(JSONB(), "postgresql"), nullable=False),
)

# The per-request view (read it like a table; the migrations make it, 0004 last): ts = arrival
# (epoch seconds), batch_size = rows in the batch the request rode in, items = its own rows,
# cost_pusd = its pico-dollars, status = HTTP-style (200 ok).
usage = table(
    "usage",
    column("id", BigInteger), column("request_id", String), column("ts", Float),
    column("model", String), column("version", String), column("variant", String),
    column("tenant", String),
    column("batch_id", BigInteger), column("batch_size", Integer), column("items", Integer),
    column("queue_ms", Float), column("compute_ms", Float), column("total_ms", Float),
    column("cost_pusd", BigInteger), column("status", Integer),
)

batches = Table(
    "batches",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", Float, nullable=False, index=True),  # epoch seconds at start of compute
    Column("model", String(128), nullable=False),
    Column("version", String(32), nullable=False),
    Column("variant", String(64)),  # the variant that ran the batch (null: "reference")
    Column("device", String(64), nullable=False),
    Column("pricing", String(16), nullable=False),
    Column("share", Float, nullable=False),
    Column("size", Integer, nullable=False),
    Column("requests", Integer, nullable=False),
    Column("compute_ms", Float, nullable=False),
    Column("cost_pusd", BigInteger, nullable=False),
)

# -- per-minute rollups (what reports read; raw usage_log/batches rows expire) ----------------
# The writer aggregates each flush in Python dicts and upserts one row per key in the same
# transaction as the raw rows, so the rollups always equal the sum of everything written.
# minute = epoch seconds of the minute's start (usage: request arrival; batches: batch start);
# variant: usage rolls up by the variant path of its requests ("int8>reference"), busy time by
# the variant that ran each batch.
usage_rollup = Table(
    "usage_rollup",
    metadata,
    Column("minute", BigInteger, primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("version", String(32), primary_key=True),
    Column("variant", String(64), primary_key=True),
    Column("tenant", String(256), primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("ok", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("items", BigInteger, nullable=False),
    Column("cost_pusd", BigInteger, nullable=False),
    Column("compute_ms", Float, nullable=False),  # per request: its batch's compute time
    Column("queue_ms", Float, nullable=False),
    Column("total_ms", Float, nullable=False),
)

# The same per hour: a 30-day report reads 720 hours, not 43,200 minutes, of every key
# (the minute table serves the window's ragged edges and short windows).
usage_rollup_hourly = Table(
    "usage_rollup_hourly",
    metadata,
    *[Column("hour" if c.name == "minute" else c.name, c.type, primary_key=c.primary_key,
             nullable=c.nullable) for c in usage_rollup.columns],
)

# Busy time per replica and device: marginal cost, utilization and (with replicas' uptime)
# amortized cost. cost_pusd over compute_ms is the price the meter used (P x share).
batch_rollup = Table(
    "batch_rollup",
    metadata,
    Column("minute", BigInteger, primary_key=True),
    Column("replica_id", Integer, primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("version", String(32), primary_key=True),
    Column("variant", String(64), primary_key=True),
    Column("device", String(64), primary_key=True),
    Column("pricing", String(16), primary_key=True),
    Column("share", Float, nullable=False),
    Column("batches", BigInteger, nullable=False),
    Column("rows", BigInteger, nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("compute_ms", Float, nullable=False),
    Column("cost_pusd", BigInteger, nullable=False),
)

# Batches by size per day: the batch-1 counterfactual (savings of the batching lever).
batch_size_rollup = Table(
    "batch_size_rollup",
    metadata,
    Column("day", BigInteger, primary_key=True),  # epoch seconds of the UTC day's start
    Column("model", String(128), primary_key=True),
    Column("version", String(32), primary_key=True),
    Column("variant", String(64), primary_key=True),
    Column("device", String(64), primary_key=True),
    Column("pricing", String(16), primary_key=True),
    Column("size", Integer, primary_key=True),
    Column("batches", BigInteger, nullable=False),
    Column("rows", BigInteger, nullable=False),
    Column("compute_ms", Float, nullable=False),
    Column("cost_pusd", BigInteger, nullable=False),
)

ROLLUPS = (usage_rollup, usage_rollup_hourly, batch_rollup, batch_size_rollup)


PICO_MAX = 10**38 - 1  # the most pico-dollars a PicoAmount holds ($1e26)


class PicoAmount(TypeDecorator):
    """Integer pico-dollars of any size. BIGINT stops at 9.2e18 pico-dollars ($9.2 million),
    less than one large training run costs (Llama 2 70B on demand: $8.7 million; a 400B model:
    hundreds of millions), so: exact NUMERIC(38, 0) on PostgreSQL, decimal text on SQLite, whose
    integers are 64-bit too. On SQLite, sum these in Python (SQL SUM would go through floats)."""

    impl = Numeric(38, 0)
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(40))
        return dialect.type_descriptor(Numeric(38, 0))

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        return str(int(value)) if dialect.name == "sqlite" else Decimal(int(value))

    def process_result_value(self, value, dialect):
        return None if value is None else int(value)


# One row per training job: measured here (`track_training`), imported from elsewhere
# (`frugalserve training add`), or estimated from 6ND (`frugalserve training estimate --record`).
# A model version's training cost is the sum of its rows (see economics.training).
training_runs = Table(
    "training_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(128), nullable=False),
    Column("version", String(32), nullable=False),
    Column("device", String(64), nullable=False),
    Column("pricing", String(16), nullable=False),
    Column("devices", Integer, nullable=False),  # how many of the device the run held
    Column("share", Float, nullable=False),  # of each device, as in a model's config
    Column("started_at", Float, nullable=False),  # epoch seconds
    Column("wall_s", Float, nullable=False),
    Column("cpu_s", Float),  # null: not measured (imported, estimated)
    Column("gpu_s", Float),  # GPU-seconds held; null: no GPU or not measured
    Column("peak_rss_bytes", BigInteger),
    Column("energy_kwh", Float, nullable=False),  # an estimate: device watts x time
    Column("cost_pusd", PicoAmount, nullable=False),
    Column("source", String(16), nullable=False),  # measured | imported | estimated
    Column("status", String(16), nullable=False),  # ok | failed (a failed run is still paid)
    Column("params", JSON().with_variant(JSONB(), "postgresql")),  # N, D, FLOPs, MFU, ...
    Column("notes", Text),
    Index("ix_training_runs_model_version", "model", "version"),
)


# A batch record is a plain tuple in `batches` column order, and so is each request record of
# a chunk (REQUEST_FIELDS order): a tuple literal costs a tenth of a NamedTuple.
BatchRecord = tuple
REF = "reference"  # the variant a version's own artifact is


@dataclass(slots=True)
class UsageChunk:
    """A usage_log row whose records are stated whole: requests that never ran, cascade flows."""

    id: int
    ts: float  # the earliest arrival
    model: str
    version: str
    variant: str | None  # the variant path; None: "reference"
    batch_id: int | None  # None: the requests never ran
    batch_size: int
    compute_ms: float
    records: tuple[tuple, ...]

    def row(self) -> tuple:
        """In usage_log column order, `requests` as JSON text."""
        return (self.id, self.ts, self.model, self.version, self.variant, self.batch_id,
                self.batch_size, self.compute_ms, None, None, orjson.dumps(self.records).decode())

    def rollup_into(self, acc: dict[tuple, list]) -> None:
        head = (self.model, self.version, self.variant or REF)
        for r in self.records:
            ts = int(r[2])
            ok = int(r[8] == 200)
            _add(acc, (ts - ts % 60, *head, r[3]),
                 (1, ok, 1 - ok, r[4], r[7], self.compute_ms, r[5], r[6]))


# -- a batch log page (see batch_log) as rows ------------------------------------------------
# The writer's side: per page, numpy over all its requests at once and a step per batch, never
# one per request (but for the spill, which states every record).


def page_batch_rows(page: Page, log: BatchLog | Codes) -> list[BatchRecord]:
    """The page's `batches` rows."""
    return [(i[BATCH_ID], t[STARTED_AT], *log.keys[i[KEY]], i[ROWS], i[REQUESTS],
             t[COMPUTE_MS], i[COST])
            for i, t in zip(page.ints.tolist(), page.times.tolist(), strict=True)]


def _request_batches(page: Page) -> np.ndarray:
    """The batch (its row in the page) of each of the page's requests."""
    return np.repeat(np.arange(page.batches), page.ints[:, PLAIN])


def page_usage_rows(page: Page, log: BatchLog | Codes) -> list[tuple]:
    """The page's usage_log rows, one per batch that had plain requests: `requests` as an
    object of columns (see usage_log), a column the same for every request stated once."""
    if not page.requests:
        return []
    ints, times, arrival = page.ints, page.times, page.arrival
    # whole microseconds: a third of the bytes of float milliseconds, and cheaper to write
    queue_us = ((times[_request_batches(page), DISPATCHED] - arrival) * 1e6 + 0.5).astype(np.int64)
    counts = ints[:, PLAIN]
    ran = np.flatnonzero(counts)
    starts = (np.cumsum(counts) - counts)[ran]
    first = np.minimum.reduceat(arrival, starts)
    all_ints, all_times = ints.tolist(), times.tolist()
    rows = []
    for b, s, earliest in zip(ran.tolist(), starts.tolist(), first.tolist(), strict=True):
        batch_id, usage_id, key, size, _, n, _, tenant, flags = all_ints[b]
        _, compute_ms, dispatched, done, done_at = all_times[b]
        e = s + n
        columns = {
            "queue_us": queue_us[s:e],
            "request_id": page.request_ids.get(b),
            "tenant": log.tenants[tenant] if tenant != MIXED
            else [log.tenants[c] for c in page.tenant[s:e].tolist()],
            "items": page.items[s:e] if flags & ITEMS else 1,
            "cost_pusd": page.cost[s:e],
            "status": page.status[s:e] if flags & STATUSES else 200,
        }
        rows.append((usage_id, done_at - (done - earliest), *log.keys[key][:3], batch_id, size,
                     compute_ms, done_at, (done - dispatched) * 1000,
                     orjson.dumps(columns, option=orjson.OPT_SERIALIZE_NUMPY).decode()))
    return rows


def page_rollup_into(page: Page, log: BatchLog | Codes, acc: dict[tuple, list]) -> None:
    """Add the page's requests to usage rollup sums by (minute, model, version, variant,
    tenant). A batch of one tenant whose requests all arrived in one minute (the common case)
    is summed whole, with numpy over its requests and one Python step; the requests of the
    other batches are grouped one by one."""
    if not page.requests:
        return
    counts = page.ints[:, PLAIN]
    ran = np.flatnonzero(counts)
    n = counts[ran]
    starts = np.cumsum(counts)[ran] - n
    ints, times = page.ints[ran], page.times[ran]
    arrival = page.arrival
    epoch = times[:, DONE_AT] - times[:, DONE]  # perf_counter seconds to epoch seconds
    minute = (np.minimum.reduceat(arrival, starts) + epoch).astype(np.int64) // 60
    last = (np.maximum.reduceat(arrival, starts) + epoch).astype(np.int64) // 60
    whole = (minute == last) & (ints[:, TENANT] != MIXED)
    arrived = np.add.reduceat(arrival, starts)
    batches = zip(
        whole.tolist(), (minute * 60).tolist(), ints[:, KEY].tolist(), ints[:, TENANT].tolist(),
        n.tolist(), np.add.reduceat(page.status == 200, starts, dtype=np.int64).tolist(),
        np.add.reduceat(page.items, starts).tolist(), np.add.reduceat(page.cost, starts).tolist(),
        (times[:, COMPUTE_MS] * n).tolist(),
        ((n * times[:, DISPATCHED] - arrived) * 1000).tolist(),
        ((n * times[:, DONE] - arrived) * 1000).tolist(), strict=True)
    for one, m, key, tenant, count, ok, items, cost, compute_ms, queue, total in batches:
        if one:
            _add(acc, (m, *_head(log, key), log.tenants[tenant]),
                 (count, ok, count - ok, items, cost, compute_ms, queue, total))
    if not whole.all():
        _rollup_requests(page, log, acc, np.flatnonzero(np.repeat(~whole, n)))


def _head(log: BatchLog | Codes, key: int) -> tuple[str, str, str]:
    model, version, variant = log.keys[key][:3]
    return model, version, variant or REF


def _rollup_requests(page: Page, log: BatchLog | Codes, acc: dict[tuple, list],
                     chosen: np.ndarray) -> None:
    """Add some of the page's requests (their places) to usage rollup sums request by request:
    sorted by key, summed per run of equal keys."""
    of = _request_batches(page)[chosen]
    ints, times = page.ints[of], page.times[of]
    arrival = page.arrival[chosen]
    minute = (arrival + times[:, DONE_AT] - times[:, DONE]).astype(np.int64)
    minute -= minute % 60
    key = ints[:, KEY]
    tenant = ints[:, TENANT]
    tenant = np.where(tenant == MIXED, page.tenant[chosen], tenant)
    order = np.lexsort((tenant, key, minute))
    minute, key, tenant = minute[order], key[order], tenant[order]
    starts = np.flatnonzero(np.concatenate((
        [True], (minute[1:] != minute[:-1]) | (key[1:] != key[:-1])
        | (tenant[1:] != tenant[:-1]))))

    def sums(values: np.ndarray) -> list:
        return np.add.reduceat(values[order], starts).tolist()

    queue_ms = (times[:, DISPATCHED] - arrival) * 1000
    groups = zip(minute[starts].tolist(), key[starts].tolist(), tenant[starts].tolist(),
                 np.diff(np.append(starts, len(chosen))).tolist(),
                 sums((page.status[chosen] == 200).astype(np.int64)),
                 sums(page.items[chosen]), sums(page.cost[chosen]),
                 sums(times[:, COMPUTE_MS]), sums(queue_ms),
                 sums((times[:, DONE] - arrival) * 1000), strict=True)
    for m, k, t, n, ok, items, cost, compute_ms, queue, total in groups:
        _add(acc, (m, *_head(log, k), log.tenants[t]),
             (n, ok, n - ok, items, cost, compute_ms, queue, total))


def page_chunks(page: Page, log: BatchLog | Codes) -> list[UsageChunk]:
    """The page's usage with every record stated (spill files keep this)."""
    arrival, cost = page.arrival.tolist(), page.cost.tolist()
    items, status = page.items.tolist(), page.status.tolist()
    chunks, s = [], 0
    for b, (i, t) in enumerate(zip(page.ints.tolist(), page.times.tolist(), strict=True)):
        n = i[PLAIN]
        if not n:
            continue
        e = s + n
        epoch = t[DONE_AT] - t[DONE]  # perf_counter seconds to epoch seconds
        tenants = (repeat(log.tenants[i[TENANT]], n) if i[TENANT] != MIXED
                   else [log.tenants[c] for c in page.tenant[s:e].tolist()])
        columns = zip(page.request_ids.get(b) or repeat(None, n), tenants, items[s:e],
                      arrival[s:e], cost[s:e], status[s:e], strict=False)
        records = tuple((i[USAGE_ID] + place, request_id, epoch + a, tenant, rows,
                         (t[DISPATCHED] - a) * 1000, (t[DONE] - a) * 1000, c, st)
                        for place, (request_id, tenant, rows, a, c, st)
                        in enumerate(columns, start=1))
        chunks.append(UsageChunk(i[USAGE_ID], epoch + min(arrival[s:e]), *log.keys[i[KEY]][:3],
                                 i[BATCH_ID], i[ROWS], t[COMPUTE_MS], records))
        s = e
    return chunks


def open_engine(url: str) -> Engine:
    """An engine with the schema in place; SQLite files get WAL so readers never block writes."""
    engine = connect(url)
    from .migrations import upgrade

    upgrade(engine)
    return engine


def connect(url: str) -> Engine:
    """An engine on a ledger whose schema is in place (see open_engine)."""
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name not in ("sqlite", "postgresql"):
        raise ValueError(f"ledger URL {url!r}: only SQLite and PostgreSQL are supported")
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


@cache
def _insert_sql(table: Table) -> str:
    # Plain DB-API executemany on tuples: several times cheaper per row than Core inserts,
    # which matters because the writer shares the server's core.
    names = [c.name for c in table.columns]
    return f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"


@cache
def _copy_sql(table: Table) -> str:
    return f"COPY {table.name} ({', '.join(c.name for c in table.columns)}) FROM STDIN"


def _register_replica(engine: Engine) -> int:
    with engine.begin() as conn:
        result = conn.execute(replicas.insert().values(
            started_at=time.time(), host=socket.gethostname(), pid=os.getpid()))
        return int(result.inserted_primary_key[0])


# Seconds between the writer's flushes. A flush has a fixed cost (a transaction, its commit,
# the rollup upserts: about 0.5 ms of the server's core here) and the writer shares the core
# with the server: flushing every 2 s rather than 0.5 s cut the writer thread's CPU per request
# under load by a third to a half (BENCHMARKS.md, "flush interval 2 s against 0.5 s"). A crash
# loses at most this much usage; a clean shutdown writes everything.
FLUSH_INTERVAL_S = 2.0


class LedgerWriter:
    """Collects records from the hot path and writes them in batches from one thread."""

    def __init__(self, engine: Engine, flush_interval_s: float = FLUSH_INTERVAL_S,
                 spill_dir: Path | None = None, retention_days: float | None = None,
                 prune_interval_s: float = 3600.0, in_child: bool = False):
        """in_child: write in a child process (ledger_process), off this process's GIL."""
        self.engine = engine
        self.flush_interval_s = flush_interval_s
        self.spill_dir = spill_dir or Path.cwd()
        if retention_days:
            _check_retention(retention_days)
        self.retention_days = retention_days  # None or 0: raw rows are kept for ever
        self.prune_interval_s = prune_interval_s
        self._next_prune = time.monotonic() + min(60.0, prune_interval_s)
        self._next_heartbeat = 0.0
        self.log = BatchLog()  # batches and their plain requests, from the event loop
        self._usage: deque[UsageChunk] = deque()  # the rest: rejects, cascade flows
        self._unwritten: list[Page] = []  # taken from the log, not yet written
        self._unsure = False  # the last write failed: some of it may be in the ledger
        self._child = None
        if in_child:
            from .ledger_process import LedgerProcess

            self._child = LedgerProcess(engine.url.render_as_string(hide_password=False),
                                        flush_interval_s)
        self.replica_id = _register_replica(engine)
        self._next_id = (self.replica_id << 40) + 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reserve_ids(self, n: int = 1) -> int:
        """The first of n fresh record ids in a row (on the event loop only: not locked)."""
        first = self._next_id
        self._next_id = first + n
        return first

    # hot path: deque.append is atomic under the GIL, no lock needed
    def add_usage(self, chunk: UsageChunk) -> None:
        self._usage.append(chunk)

    @property
    def pending(self) -> int:
        """Batches and usage chunks not yet written."""
        return len(self._usage) + self.log.pending + sum(p.batches for p in self._unwritten)

    def start(self) -> None:
        if self._child is not None:
            try:
                self._child.start()
            except ConnectionError as exc:  # metering goes on: the thread writes
                log.warning("%s; the ledger is written from a thread instead", exc)
                self._child = None
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and write everything still pending; spill what cannot be written."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + timeout_s
        while self.pending:
            if self.flush():
                continue
            if time.monotonic() > deadline:
                self._spill()
                break
            time.sleep(0.2)
        if self.log.unwritable:
            self._set_aside()
        if self._child is not None:
            self._child.close()
        try:
            with self.engine.begin() as conn:
                now = time.time()
                conn.execute(replicas.update().where(replicas.c.id == self.replica_id)
                             .values(last_seen_at=now, stopped_at=now))
        except Exception as exc:  # noqa: BLE001 - uptime is best effort; the money is written
            log.warning("could not stamp the replica's stop time: %s", exc)
        self.engine.dispose()

    def _run(self) -> None:
        backoff = self.flush_interval_s
        while not self._stop.wait(backoff):
            backoff = self.flush_interval_s if self.flush() else min(backoff * 2, 10.0)
            if self.retention_days and time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + self.prune_interval_s
                try:
                    prune(self.engine, self.retention_days)
                except Exception as exc:  # noqa: BLE001 - try again next interval
                    log.warning("ledger prune failed, will retry: %s", exc)

    def flush(self) -> bool:
        """Write what is pending now; on failure put it back and say so."""
        pages = self._unwritten
        chunks = _drain(self._usage)
        heartbeat = time.monotonic() >= self._next_heartbeat
        if not pages and not self.log.pending and not chunks and not heartbeat:
            return True
        try:
            pages = pages + self.log.take()
            seen = (time.time(), self.replica_id) if heartbeat else None
            if self._child is not None:
                self._child.write(self.log.codes(), self.replica_id, pages, chunks, seen,
                                  self._unsure)
            else:
                write_flush(self.engine, self.log, self.replica_id, pages, chunks, seen,
                            self._unsure)
            if heartbeat:
                self._next_heartbeat = time.monotonic() + HEARTBEAT_S
        except Exception as exc:  # noqa: BLE001 - any database failure: keep the rows, retry
            rows = len(chunks) + sum(page.batches for page in pages)
            log.warning("ledger write of %d batches and chunks failed, will retry: %s", rows, exc)
            self._unwritten = pages
            self._usage.extendleft(reversed(chunks))
            self._unsure = True
            return False
        self._unwritten = []
        self._unsure = False
        return True

    def _set_aside(self) -> None:
        """Records the ledger's columns cannot hold, written whole to a JSON file beside where
        spills go: out of the ledger, yet not lost."""
        path = self.spill_dir / f"ledger-unwritable-{int(time.time())}.json"
        path.write_text(json.dumps(self.log.unwritable_docs(), indent=1))
        log.error("%d batch records cost more than the ledger can hold (int64 pico-dollars); "
                  "written to %s", len(self.log.unwritable), path)
        self.log.unwritable = []

    def _spill(self) -> None:
        path = self.spill_dir / f"ledger-spill-{int(time.time())}.jsonl"
        batch_names = [str(c.name) for c in batches.columns]  # orjson: keys exactly str
        usage_names = [str(c.name) for c in usage_log.columns]
        pages, self._unwritten = self._unwritten + self.log.take(), []
        with path.open("ab") as out:
            for row in (row for page in pages for row in page_batch_rows(page, self.log)):
                out.write(orjson.dumps({"table": "batches", **dict(zip(batch_names, row,
                                                                        strict=True))}) + b"\n")
            for chunk in [c for page in pages for c in page_chunks(page, self.log)] + \
                    _drain(self._usage):
                doc = dict(zip(usage_names, chunk.row(), strict=True))
                doc["requests"] = chunk.records
                out.write(orjson.dumps({"table": "usage_log", **doc}) + b"\n")
        log.error("ledger unreachable at shutdown; pending records spilled to %s", path)


HEARTBEAT_S = 30.0  # how often a writer stamps replicas.last_seen_at


def write_flush(engine: Engine, codes: BatchLog | Codes, replica_id: int, pages: list[Page],
                chunks: list[UsageChunk], seen: tuple[float, int] | None = None,
                recheck: bool = False) -> None:
    """One flush: the pages' batch and usage rows, the chunks, their rollups and the
    heartbeat `seen`, in one transaction. recheck: an earlier try failed, and its commit may
    have taken all the same (a connection lost at commit, a writer process that died after
    it): what is in the ledger already is left out, so that nothing is written twice."""
    if recheck:
        pages, chunks = _not_written(engine, pages, chunks)
    batch_rows = [row for page in pages for row in page_batch_rows(page, codes)]
    usage_rows = [row for page in pages for row in page_usage_rows(page, codes)]
    usage_rows += [c.row() for c in chunks]
    minutes = rollup_usage(chunks, pages, codes)
    upserts = ((usage_rollup, minutes), (usage_rollup_hourly, rollup_hours(minutes)),
               *rollup_batches(batch_rows, replica_id))
    _write(engine, ((batches, batch_rows), (usage_log, usage_rows)), upserts, seen)


def _not_written(engine: Engine, pages: list[Page],
                 chunks: list[UsageChunk]) -> tuple[list[Page], list[UsageChunk]]:
    """The pages and chunks not in the ledger. A try writes all it has in one transaction, so
    a page is in when its first batch is."""
    firsts = [int(page.ints[0, BATCH_ID]) for page in pages]
    with engine.connect() as conn:
        have = _present(conn, batches, firsts) | _present(conn, usage_log, [c.id for c in chunks])
    return ([page for page, first in zip(pages, firsts, strict=True) if first not in have],
            [c for c in chunks if c.id not in have])


def _present(conn, table: Table, ids: list[int], step: int = 500) -> set[int]:
    found: set[int] = set()
    for i in range(0, len(ids), step):
        found.update(conn.execute(select(table.c.id).where(table.c.id.in_(ids[i:i + step])))
                     .scalars())
    return found


def _write(engine: Engine, work: tuple[tuple[Table, list], ...],
           upserts: tuple[tuple[Table, list], ...] = (),
           seen: tuple[float, int] | None = None) -> None:
    """One transaction; COPY on PostgreSQL (parsed by the server, not on our core); the
    rollups are upserted in the same transaction, so they never disagree with raw rows.
    seen: (time, replica id) to stamp as the replica's last_seen_at."""
    raw = engine.raw_connection()
    postgres = engine.dialect.name == "postgresql"
    mark = "%s" if postgres else "?"
    try:
        cursor = raw.cursor()
        for table, rows in work:
            if not rows:
                continue
            if postgres:
                with cursor.copy(_copy_sql(table)) as copy:
                    for row in rows:
                        copy.write_row(row)
            else:
                cursor.executemany(_insert_sql(table), rows)
        for table, rows in upserts:
            if rows:
                cursor.executemany(_upsert_sql(table, mark), rows)
        if seen is not None:
            cursor.execute(f"UPDATE replicas SET last_seen_at = {mark} WHERE id = {mark}", seen)
        raw.commit()
    except Exception:
        raw.rollback()
        raise
    finally:
        raw.close()


def load_spill(engine: Engine, path: Path) -> dict[str, int]:
    """Write a spill file's records (what a writer could not write at shutdown) to the ledger,
    with their rollups, in one transaction. Rows per table. A file loaded before (some or all
    of its records are in the ledger), or one that is not a spill file, raises ValueError and
    writes nothing."""
    batch_rows: list[tuple] = []
    chunks: list[UsageChunk] = []
    for n, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        try:
            doc = orjson.loads(line)
            if doc["table"] == "batches":
                batch_rows.append(tuple(doc[c.name] for c in batches.columns))
            elif doc["table"] == "usage_log":
                chunks.append(_spilled_chunk(doc))
            else:
                raise ValueError(f"table {doc['table']!r} is not batches or usage_log")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}, line {n}: not a ledger spill record ({exc})") from None
    by_replica: dict[int, list[tuple]] = {}
    try:
        for row in batch_rows:
            by_replica.setdefault(row[0] >> 40, []).append(row)  # id = replica << 40 | n
        minutes = rollup_usage(chunks)
        upserts = ((usage_rollup, minutes), (usage_rollup_hourly, rollup_hours(minutes)),
                   *(u for replica, rows in sorted(by_replica.items())
                     for u in rollup_batches(rows, replica)))
    except (TypeError, ValueError) as exc:  # a batch row's numbers are not numbers
        raise ValueError(f"{path}: not a ledger spill file ({exc})") from None
    try:
        _write(engine, ((batches, batch_rows), (usage_log, [c.row() for c in chunks])), upserts)
    except engine.dialect.loaded_dbapi.IntegrityError:  # raw DB-API: not SQLAlchemy's class
        raise ValueError(f"{path}: its records are in the ledger already") from None
    return {"batches": len(batch_rows), "usage_log": len(chunks)}


def _spilled_chunk(doc: dict) -> UsageChunk:
    records = []
    for r in doc["requests"]:
        numbers = (r[0], r[2], r[4], r[5], r[6], r[7], r[8]) if len(r) == len(REQUEST_FIELDS) \
            else ()
        if not numbers or not isinstance(r[3], str) or \
                not all(isinstance(x, int | float) for x in numbers):
            raise TypeError(f"a request record is not {list(REQUEST_FIELDS)}")
        records.append(tuple(r))
    return UsageChunk(id=doc["id"], ts=doc["ts"], model=doc["model"], version=doc["version"],
                      variant=doc["variant"], batch_id=doc["batch_id"],
                      batch_size=doc["batch_size"], compute_ms=doc["compute_ms"],
                      records=tuple(records))


@cache
def _upsert_sql(table: Table, mark: str = "?") -> str:
    """INSERT ... ON CONFLICT DO UPDATE adding the new sums (SQLite >= 3.24 and PostgreSQL)."""
    names = [c.name for c in table.columns]
    keys = [c.name for c in table.primary_key.columns]
    sums = ", ".join(f"{n} = {table.name}.{n} + excluded.{n}" for n in names
                     if n not in keys and n != "share")
    extra = ", share = excluded.share" if "share" in names else ""
    return (f"INSERT INTO {table.name} ({', '.join(names)}) "
            f"VALUES ({', '.join([mark] * len(names))}) "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sums}{extra}")


def rollup_usage(chunks: list[UsageChunk], pages: list[Page] = (),
                 log: BatchLog | Codes | None = None) -> list[tuple]:
    """usage_rollup rows for some chunks and batch log pages (of `log`): one per (minute, model,
    version, variant, tenant), sorted by key (concurrent writers then lock rows in one order:
    no deadlocks)."""
    acc: dict[tuple, list] = {}
    for chunk in chunks:
        chunk.rollup_into(acc)
    for page in pages:
        page_rollup_into(page, log, acc)
    return [(*key, *a) for key, a in sorted(acc.items())]


def _add(acc: dict[tuple, list], key: tuple, values: tuple) -> None:
    totals = acc.get(key)
    if totals is None:
        acc[key] = list(values)
    else:
        for i, v in enumerate(values):
            totals[i] += v


def rollup_hours(minute_rows: list[tuple]) -> list[tuple]:
    """usage_rollup_hourly rows from usage_rollup rows (a few dozen per flush)."""
    acc: dict[tuple, list] = {}
    for row in minute_rows:
        _add(acc, (row[0] - row[0] % 3600, *row[1:5]), row[5:])
    return [(*key, *a) for key, a in sorted(acc.items())]


def rollup_batches(rows: list[BatchRecord], replica_id: int) -> tuple[tuple[Table, list], ...]:
    """batch_rollup rows (per minute and replica) and batch_size_rollup rows (per day and
    batch size) for some batch records."""
    by_minute: dict[tuple, list] = {}
    by_size: dict[tuple, list] = {}
    for _id, ts, model, version, variant, device, pricing, share, size, requests, compute_ms, \
            cost in rows:
        t = int(ts)
        variant = variant or REF
        key = (t - t % 60, replica_id, model, version, variant, device, pricing)
        a = by_minute.get(key)
        if a is None:
            by_minute[key] = a = [share, 0, 0, 0, 0.0, 0]
        a[0] = share
        a[1] += 1
        a[2] += size
        a[3] += requests
        a[4] += compute_ms
        a[5] += cost
        key = (t - t % 86400, model, version, variant, device, pricing, size)
        b = by_size.get(key)
        if b is None:
            by_size[key] = b = [0, 0, 0.0, 0]
        b[0] += 1
        b[1] += size
        b[2] += compute_ms
        b[3] += cost
    return ((batch_rollup, [(*k, *a) for k, a in sorted(by_minute.items())]),
            (batch_size_rollup, [(*k, *b) for k, b in sorted(by_size.items())]))


def prune(engine: Engine, retention_days: float, now: float | None = None,
          chunk: int = 20_000) -> dict[str, int]:
    """Delete raw usage_log and batches rows older than the retention (the rollups stay), a
    chunk at a time so that writers are never blocked for long. Rows deleted per table."""
    _check_retention(retention_days)
    cutoff = (time.time() if now is None else now) - retention_days * 86400
    deleted = {}
    for name in ("usage_log", "batches"):
        sql = text(f"DELETE FROM {name} WHERE id IN "
                   f"(SELECT id FROM {name} WHERE ts < :cutoff LIMIT {int(chunk)})")
        total = 0
        while True:
            with engine.begin() as conn:
                n = conn.execute(sql, {"cutoff": cutoff}).rowcount
            total += n
            if n < chunk:
                break
        deleted[name] = total
    return deleted


def _check_retention(days: float) -> None:
    # a negative retention would put the cutoff in the future and delete every raw row
    if not 0 < days < math.inf:
        raise ValueError(f"retention must be a positive number of days, got {days}")


def _drain(queue: deque) -> list:
    rows = []
    pop = queue.popleft
    for _ in range(len(queue)):
        rows.append(pop())
    return rows

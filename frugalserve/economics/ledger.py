"""The ledger: usage and batch records in SQL, written in batches off the hot path.

SQLite (WAL) by default, PostgreSQL by URL; the same schema on both. The hot path only appends
a tuple to a deque; a writer thread inserts what accumulated every `flush_interval_s`, and
nothing is ever dropped: a failed write is retried, and rows that still cannot be written at
shutdown are spilled to a JSON-lines file beside the database (or the working directory).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import NamedTuple

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
)

log = logging.getLogger("frugalserve.ledger")

metadata = MetaData()

usage = Table(
    "usage",
    metadata,
    Column("id", String(48), primary_key=True),
    Column("request_id", String(256)),
    Column("ts", Float, nullable=False, index=True),  # epoch seconds at arrival
    Column("model", String(128), nullable=False),
    Column("version", String(32), nullable=False),
    Column("tenant", String(128), nullable=False),
    Column("batch_id", String(48)),
    Column("batch_size", Integer, nullable=False),  # rows in the batch this request rode in
    Column("items", Integer, nullable=False),  # rows of this request
    Column("queue_ms", Float, nullable=False),
    Column("compute_ms", Float, nullable=False),
    Column("total_ms", Float, nullable=False),
    Column("cost_pusd", BigInteger, nullable=False),  # pico-dollars
    Column("status", Integer, nullable=False),  # HTTP-style: 200 ok, 4xx/5xx failed
)

batches = Table(
    "batches",
    metadata,
    Column("id", String(48), primary_key=True),
    Column("ts", Float, nullable=False, index=True),  # epoch seconds at start of compute
    Column("model", String(128), nullable=False),
    Column("version", String(32), nullable=False),
    Column("device", String(64), nullable=False),
    Column("pricing", String(16), nullable=False),
    Column("share", Float, nullable=False),
    Column("size", Integer, nullable=False),
    Column("requests", Integer, nullable=False),
    Column("compute_ms", Float, nullable=False),
    Column("cost_pusd", BigInteger, nullable=False),
)


class UsageRecord(NamedTuple):
    id: str
    request_id: str | None
    ts: float
    model: str
    version: str
    tenant: str
    batch_id: str | None
    batch_size: int
    items: int
    queue_ms: float
    compute_ms: float
    total_ms: float
    cost_pusd: int
    status: int


class BatchRecord(NamedTuple):
    id: str
    ts: float
    model: str
    version: str
    device: str
    pricing: str
    share: float
    size: int
    requests: int
    compute_ms: float
    cost_pusd: int


def open_engine(url: str) -> Engine:
    """An engine with the schema in place; SQLite files get WAL so readers never block writes."""
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    metadata.create_all(engine)
    return engine


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def _insert_sql(engine: Engine, table: Table) -> str:
    # Plain DB-API executemany on tuples: several times cheaper per row than ORM-style inserts,
    # which matters because the writer shares the server's core.
    names = [c.name for c in table.columns]
    mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    marks = ", ".join([mark] * len(names))
    return f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({marks})"


class LedgerWriter:
    """Collects records from the hot path and writes them in batches from one thread."""

    def __init__(self, engine: Engine, flush_interval_s: float = 0.5,
                 spill_dir: Path | None = None):
        self.engine = engine
        self.flush_interval_s = flush_interval_s
        self.spill_dir = spill_dir or Path.cwd()
        self._usage: deque[UsageRecord] = deque()
        self._batches: deque[BatchRecord] = deque()
        self._usage_sql = _insert_sql(engine, usage)
        self._batch_sql = _insert_sql(engine, batches)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.written_usage = 0
        self.written_batches = 0

    # hot path: deque.append is atomic under the GIL, no lock needed
    def add_usage(self, record: UsageRecord) -> None:
        self._usage.append(record)

    def add_batch(self, record: BatchRecord) -> None:
        self._batches.append(record)

    @property
    def pending(self) -> int:
        return len(self._usage) + len(self._batches)

    def start(self) -> None:
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
        self.engine.dispose()

    def _run(self) -> None:
        backoff = self.flush_interval_s
        while not self._stop.wait(backoff):
            backoff = self.flush_interval_s if self.flush() else min(backoff * 2, 10.0)

    def flush(self) -> bool:
        """Write what is pending now; on failure put it back and say so."""
        usage_rows = _drain(self._usage)
        batch_rows = _drain(self._batches)
        if not usage_rows and not batch_rows:
            return True
        try:
            with self.engine.begin() as conn:
                if batch_rows:
                    conn.exec_driver_sql(self._batch_sql, batch_rows)
                if usage_rows:
                    conn.exec_driver_sql(self._usage_sql, usage_rows)
        except Exception as exc:  # noqa: BLE001 - any database failure: keep the rows, retry
            rows = len(usage_rows) + len(batch_rows)
            log.warning("ledger write of %d rows failed, will retry: %s", rows, exc)
            self._usage.extendleft(reversed(usage_rows))
            self._batches.extendleft(reversed(batch_rows))
            return False
        self.written_usage += len(usage_rows)
        self.written_batches += len(batch_rows)
        return True

    def _spill(self) -> None:
        path = self.spill_dir / f"ledger-spill-{int(time.time())}.jsonl"
        with path.open("ab") as out:
            for kind, rows in (("batch", _drain(self._batches)), ("usage", _drain(self._usage))):
                for row in rows:
                    out.write(orjson.dumps({"table": kind, **row._asdict()}) + b"\n")
        log.error("ledger unreachable at shutdown; pending records spilled to %s", path)


def _drain(queue: deque) -> list:
    rows = []
    pop = queue.popleft
    for _ in range(len(queue)):
        rows.append(pop())
    return rows

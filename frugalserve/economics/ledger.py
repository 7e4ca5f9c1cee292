"""The ledger: usage and batch records in SQL, written in batches off the hot path.

SQLite (WAL) by default, PostgreSQL by URL; the same schema on both. The hot path only appends
a tuple to a deque; a writer thread inserts what accumulated every `flush_interval_s`, and
nothing is ever dropped: a failed write is retried, and rows that still cannot be written at
shutdown are spilled to a JSON-lines file beside the database (or the working directory).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from itertools import count
from pathlib import Path

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

# One row per server process that writes to the ledger; its id prefixes every record id the
# process makes (id = replica << 40 | n), so replicas sharing a database never collide.
replicas = Table(
    "replicas",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("started_at", Float, nullable=False),
    Column("host", String(256), nullable=False),
    Column("pid", Integer, nullable=False),
)

usage = Table(
    "usage",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("request_id", String(256)),
    Column("ts", Float, nullable=False, index=True),  # epoch seconds at arrival
    Column("model", String(128), nullable=False),
    Column("version", String(32), nullable=False),
    Column("tenant", String(128), nullable=False),
    Column("batch_id", BigInteger),
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
    Column("id", BigInteger, primary_key=True, autoincrement=False),
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


# Records are plain tuples in column order: a tuple literal costs a tenth of a NamedTuple on
# the hot path, and executemany takes tuples as they are.
UsageRecord = tuple
BatchRecord = tuple
USAGE_COLUMNS = tuple(c.name for c in usage.columns)
BATCH_COLUMNS = tuple(c.name for c in batches.columns)


def open_engine(url: str) -> Engine:
    """An engine with the schema in place; SQLite files get WAL so readers never block writes."""
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

    metadata.create_all(engine)
    return engine


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def _insert_sql(table: Table) -> str:
    # Plain DB-API executemany on tuples: several times cheaper per row than Core inserts,
    # which matters because the writer shares the server's core.
    names = [c.name for c in table.columns]
    return f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"


def _copy_sql(table: Table) -> str:
    return f"COPY {table.name} ({', '.join(c.name for c in table.columns)}) FROM STDIN"


def _register_replica(engine: Engine) -> int:
    with engine.begin() as conn:
        result = conn.execute(replicas.insert().values(
            started_at=time.time(), host=socket.gethostname(), pid=os.getpid()))
        return int(result.inserted_primary_key[0])


class LedgerWriter:
    """Collects records from the hot path and writes them in batches from one thread."""

    def __init__(self, engine: Engine, flush_interval_s: float = 0.5,
                 spill_dir: Path | None = None):
        self.engine = engine
        self.flush_interval_s = flush_interval_s
        self.spill_dir = spill_dir or Path.cwd()
        self._usage: deque[UsageRecord] = deque()
        self._batches: deque[BatchRecord] = deque()
        self.replica_id = _register_replica(engine)
        self.ids = count((self.replica_id << 40) + 1)  # next(ids): a record id, on the loop
        self._postgres = engine.dialect.name == "postgresql"
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
            self._write(((batches, batch_rows), (usage, usage_rows)))
        except Exception as exc:  # noqa: BLE001 - any database failure: keep the rows, retry
            rows = len(usage_rows) + len(batch_rows)
            log.warning("ledger write of %d rows failed, will retry: %s", rows, exc)
            self._usage.extendleft(reversed(usage_rows))
            self._batches.extendleft(reversed(batch_rows))
            return False
        self.written_usage += len(usage_rows)
        self.written_batches += len(batch_rows)
        return True

    def _write(self, work: tuple[tuple[Table, list], ...]) -> None:
        """One transaction; COPY on PostgreSQL (parsed by the server, not on our core)."""
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            for table, rows in work:
                if not rows:
                    continue
                if self._postgres:
                    with cursor.copy(_copy_sql(table)) as copy:
                        for row in rows:
                            copy.write_row(row)
                else:
                    cursor.executemany(_insert_sql(table), rows)
            raw.commit()
        except Exception:
            raw.rollback()
            raise
        finally:
            raw.close()

    def _spill(self) -> None:
        path = self.spill_dir / f"ledger-spill-{int(time.time())}.jsonl"
        with path.open("ab") as out:
            for table, columns, queue in ((batches, BATCH_COLUMNS, self._batches),
                                          (usage, USAGE_COLUMNS, self._usage)):
                for row in _drain(queue):
                    doc = {"table": table.name, **dict(zip(columns, row, strict=True))}
                    out.write(orjson.dumps(doc) + b"\n")
        log.error("ledger unreachable at shutdown; pending records spilled to %s", path)


def _drain(queue: deque) -> list:
    rows = []
    pop = queue.popleft
    for _ in range(len(queue)):
        rows.append(pop())
    return rows

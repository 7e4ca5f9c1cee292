"""Ledgers for the rollup, report and migration tests: a fresh PostgreSQL schema per test (as in
test_metering.py), SQLite files, and synthetic batches written the way the server writes them
(LedgerWriter.log.record / add_usage, then flush)."""

from __future__ import annotations

import os
import uuid
from itertools import count

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from frugalserve.economics.ledger import UsageChunk

PG_URL = os.environ.get("FRUGALSERVE_TEST_PG_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def postgres_unavailable() -> str | None:
    try:
        engine = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except OperationalError as exc:
        return f"PostgreSQL is unreachable at {PG_URL}: {exc.orig}"
    return None


@pytest.fixture(name="pg_url")
def pg_url_fixture():
    why = postgres_unavailable()
    if why:
        pytest.skip(why)
    schema = f"frugalserve_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(name="ledger_url", params=["sqlite", "postgresql"])
def ledger_url_fixture(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_url")


_rid = count()


def write_batch(writer, ts: float, model: str, version: str,
                requests: list[tuple[str, int, int, int]], compute_ms: float,
                device: str = "aws-c7i.large", pricing: str = "on_demand",
                share: float = 0.5) -> int:
    """One batch of `requests` = [(tenant, items, cost_pusd, status)], as ServedVersion records
    it (ids, arrivals and totals left to the chunk: each waited 1 ms, the batch ran 1 ms); its
    cost is the sum of its requests'. Returns the batch id."""
    batch_id = writer.reserve_ids()
    statuses = [r[3] for r in requests]
    writer.log.record(
        writer.log.key(model, version, None, device, pricing, share), batch_id,
        writer.reserve_ids(len(requests) + 1), ts, sum(r[1] for r in requests), len(requests),
        compute_ms, sum(r[2] for r in requests), dispatched=100.001, done=100.002,
        done_at=ts + 0.002, arrivals=[100.0] * len(requests), costs=[r[2] for r in requests],
        tenant=tuple(r[0] for r in requests), items=[r[1] for r in requests],
        statuses=None if set(statuses) == {200} else statuses,
        request_ids=tuple(f"r{next(_rid)}" for _ in requests))
    return batch_id


def write_rejected(writer, ts: float, model: str, version: str, tenant: str,
                   status: int = 503) -> None:
    record = (writer.reserve_ids(), f"r{next(_rid)}", ts, tenant, 0, 0.0, 1.0, 0, status)
    writer.add_usage(UsageChunk(writer.reserve_ids(), ts, model, version, None, None, 0, 0.0,
                                (record,)))


def rows(url: str, sql: str, **params) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()

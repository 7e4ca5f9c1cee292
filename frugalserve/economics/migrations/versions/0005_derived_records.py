"""Derived request fields: a usage record may leave its id, ts and total_ms null, and the usage
view derives them from its chunk (id: the chunk's id + the record's place, from 1; total_ms:
queue_ms + the chunk's new run_ms; ts: the chunk's new done_at - total_ms). Stored records that
state them read as before.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

import json
from collections.abc import Callable
from importlib import import_module
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_v0004 = import_module("frugalserve.economics.migrations.versions.0004_variants")

# frozen here: the view as this revision makes it
_FIELDS = ("id", "request_id", "ts", "tenant", "items", "queue_ms", "total_ms", "cost_pusd",
           "status")
_PG_CASTS = {"id": "bigint", "ts": "double precision", "items": "integer",
             "queue_ms": "double precision", "total_ms": "double precision",
             "cost_pusd": "bigint", "status": "integer"}
_COLUMNS = ("id", "request_id", "ts", "model", "version", "variant", "tenant", "batch_id",
            "batch_size", "items", "queue_ms", "compute_ms", "total_ms", "cost_pusd", "status")


def _view_sql(dialect: str) -> str:
    head = "CREATE OR REPLACE VIEW" if dialect == "postgresql" else "CREATE VIEW IF NOT EXISTS"
    return f"{head} usage AS {records_select(dialect)}"


def records_select(dialect: str, requests: str = "l.requests") -> str:
    """The view's SELECT: a row per record of the JSON array `requests` (an expression over
    usage_log AS l)."""

    def field(name: str) -> str:
        i = _FIELDS.index(name)
        if dialect == "postgresql":
            cast = _PG_CASTS.get(name)
            return f"(r.value->>{i})::{cast}" if cast else f"r.value->>{i}"
        return f"json_extract(r.value, '$[{i}]')"

    place = "r.ord" if dialect == "postgresql" else "(r.key + 1)"
    total = f"COALESCE({field('total_ms')}, {field('queue_ms')} + l.run_ms)"
    derived = {
        "id": f"COALESCE({field('id')}, l.id + {place})",
        "ts": f"COALESCE({field('ts')}, l.done_at - ({field('queue_ms')} + l.run_ms) / 1000.0)",
        "total_ms": total,
        "variant": "COALESCE(l.variant, 'reference')",
    }
    select = ", ".join(
        f"{derived.get(name) or (field(name) if name in _FIELDS else f'l.{name}')} AS {name}"
        for name in _COLUMNS)
    if dialect == "postgresql":
        return (f"SELECT {select} FROM usage_log AS l, "
                f"jsonb_array_elements({requests}) WITH ORDINALITY AS r(value, ord)")
    return f"SELECT {select} FROM usage_log AS l, json_each({requests}) AS r"


def rewrite_requests(rewrite: Callable[[int, float | None, float | None, Any], Any]) -> None:
    """Set each usage_log row's requests to rewrite(id, done_at, run_ms, requests), where that
    is not None."""
    bind = op.get_bind()
    value = "CAST(:r AS jsonb)" if bind.dialect.name == "postgresql" else ":r"
    update = sa.text(f"UPDATE usage_log SET requests = {value} WHERE id = :id")
    rows = bind.execute(sa.text("SELECT id, done_at, run_ms, requests FROM usage_log")).all()
    for chunk_id, done_at, run_ms, requests in rows:
        doc = rewrite(chunk_id, done_at, run_ms,
                      json.loads(requests) if isinstance(requests, str) else requests)
        if doc is not None:
            bind.execute(update, {"r": json.dumps(doc), "id": chunk_id})


def upgrade() -> None:
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("usage_log")}
    op.execute("DROP VIEW IF EXISTS usage")
    for name in ("done_at", "run_ms"):
        if name not in have:
            op.add_column("usage_log", sa.Column(name, sa.Float))
    op.execute(_view_sql(op.get_bind().dialect.name))


def downgrade() -> None:
    """States every derived field in the records again, then drops the chunk's columns."""
    bind = op.get_bind()
    op.execute("DROP VIEW IF EXISTS usage")

    def state(chunk_id: int, done_at: float | None, run_ms: float | None,
              records: list) -> list | None:
        if done_at is None:
            return None
        for place, r in enumerate(records, start=1):
            total = r[6] if r[6] is not None else r[5] + run_ms
            r[0] = r[0] if r[0] is not None else chunk_id + place
            r[2] = r[2] if r[2] is not None else done_at - total / 1000
            r[6] = total
        return records

    rewrite_requests(state)
    with op.batch_alter_table("usage_log") as batch:
        batch.drop_column("run_ms")
        batch.drop_column("done_at")
    op.execute(_v0004._v0001.usage_view_sql(bind.dialect.name, _v0004._COLUMNS, _v0004._VARIANT))

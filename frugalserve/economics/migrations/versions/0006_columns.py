"""Column chunks: a batch's usage_log row may hold its requests as an object of columns,
{"queue_us": [...] (integer microseconds), "request_id", "tenant", "items", "cost_pusd",
"status"}, each of the last five a list or one value that holds for every request; id, ts and
total_ms are derived as in 0005. The usage view reads both forms. No stored row changes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from importlib import import_module

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_v0005 = import_module("frugalserve.economics.migrations.versions.0005_derived_records")

# frozen here: the columns as this revision reads them
_COLUMNS = ("request_id", "tenant", "items", "cost_pusd", "status")


def _view_sql(dialect: str) -> str:
    postgres = dialect == "postgresql"
    if postgres:
        records = "CASE WHEN jsonb_typeof(l.requests) = 'array' THEN l.requests ELSE '[]' END"
        head = "CREATE OR REPLACE VIEW"
    else:
        records = "CASE WHEN json_type(l.requests) = 'array' THEN l.requests ELSE '[]' END"
        head = "CREATE VIEW IF NOT EXISTS"
    return (f"{head} usage AS {_v0005.records_select(dialect, records)} "
            f"UNION ALL {_columns_select(dialect)}")


def _columns_select(dialect: str) -> str:
    """A row per element of requests.queue_us; a column's value at that place, or its one
    value."""
    if dialect == "postgresql":
        casts = _v0005._PG_CASTS

        def field(name: str) -> str:
            cast = f"::{casts[name]}" if name in casts else ""
            return (f"(CASE jsonb_typeof(l.requests->'{name}') WHEN 'array' "
                    f"THEN l.requests->'{name}'->>(r.ord::int - 1) "
                    f"ELSE l.requests->>'{name}' END){cast}")

        place, queue = "r.ord", "r.value::double precision / 1000.0"
        source = ("jsonb_array_elements(CASE WHEN jsonb_typeof(l.requests) = 'object' "
                  "THEN l.requests->'queue_us' ELSE '[]' END) WITH ORDINALITY AS r(value, ord)")
    else:

        def field(name: str) -> str:
            return (f"CASE json_type(l.requests, '$.{name}') WHEN 'array' "
                    f"THEN json_extract(l.requests, '$.{name}[' || r.key || ']') "
                    f"ELSE json_extract(l.requests, '$.{name}') END")

        place, queue = "(r.key + 1)", "r.value / 1000.0"
        source = "json_each(l.requests, '$.queue_us') AS r"
    derived = {
        "id": f"l.id + {place}",
        "ts": f"l.done_at - ({queue} + l.run_ms) / 1000.0",
        "variant": "COALESCE(l.variant, 'reference')",
        "queue_ms": queue,
        "total_ms": f"{queue} + l.run_ms",
        **{name: field(name) for name in _COLUMNS},
    }
    select = ", ".join(f"{derived.get(name, f'l.{name}')} AS {name}"
                       for name in _v0005._COLUMNS)
    return f"SELECT {select} FROM usage_log AS l, {source}"


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS usage")
    op.execute(_view_sql(op.get_bind().dialect.name))


def downgrade() -> None:
    """Turns column chunks into 0005's records (id, ts and total_ms left to the view)."""
    op.execute("DROP VIEW IF EXISTS usage")

    def records(_id: int, _done_at: float | None, _run_ms: float | None, doc) -> list | None:
        if not isinstance(doc, dict):
            return None
        n = len(doc["queue_us"])
        column = {name: doc[name] if isinstance(doc[name], list) else [doc[name]] * n
                  for name in _COLUMNS}
        return [[None, column["request_id"][i], None, column["tenant"][i], column["items"][i],
                 doc["queue_us"][i] / 1000, None, column["cost_pusd"][i], column["status"][i]]
                for i in range(n)]

    _v0005.rewrite_requests(records)
    op.execute(_v0005._view_sql(op.get_bind().dialect.name))

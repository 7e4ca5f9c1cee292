"""The ledger as it was before migrations: replicas, usage_log (+ the usage view), batches,
training_runs. Creates only what is missing, so ledgers made by create_all are adopted.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(JSONB(), "postgresql")
# PicoAmount: exact NUMERIC(38, 0) on PostgreSQL, decimal text on SQLite
_PICO = sa.Numeric(38, 0).with_variant(sa.String(40), "sqlite")

# The `usage` view as this revision makes it: one row per request of each usage_log chunk,
# whose requests are JSON arrays in REQUEST_FIELDS order. Frozen here, not read from
# ledger.py, which moves on: 0004 makes the view again (with the variant) through this.
REQUEST_FIELDS = ("id", "request_id", "ts", "tenant", "items", "queue_ms", "total_ms",
                  "cost_pusd", "status")
_PG_CASTS = {"id": "bigint", "ts": "double precision", "items": "integer",
             "queue_ms": "double precision", "total_ms": "double precision",
             "cost_pusd": "bigint", "status": "integer"}
VIEW_COLUMNS = ("id", "request_id", "ts", "model", "version", "tenant", "batch_id",
                "batch_size", "items", "queue_ms", "compute_ms", "total_ms", "cost_pusd",
                "status")


def usage_view_sql(dialect: str, columns: tuple[str, ...] = VIEW_COLUMNS,
                   chunk_sql: dict[str, str] | None = None) -> str:
    """CREATE the usage view with `columns` in order: a request's field, else the chunk's
    column l.<name>, or the expression `chunk_sql` gives for it."""
    chunk_sql = chunk_sql or {}
    select = []
    for name in columns:
        if name not in REQUEST_FIELDS:
            sql = chunk_sql.get(name, f"l.{name}")
        elif dialect == "postgresql":
            i, cast = REQUEST_FIELDS.index(name), _PG_CASTS.get(name)
            sql = f"(r.value->>{i})::{cast}" if cast else f"r.value->>{i}"
        else:
            sql = f"json_extract(r.value, '$[{REQUEST_FIELDS.index(name)}]')"
        select.append(f"{sql} AS {name}")
    if dialect == "postgresql":
        return (f"CREATE OR REPLACE VIEW usage AS SELECT {', '.join(select)} "
                "FROM usage_log AS l, jsonb_array_elements(l.requests) AS r(value)")
    return (f"CREATE VIEW IF NOT EXISTS usage AS SELECT {', '.join(select)} "
            "FROM usage_log AS l, json_each(l.requests) AS r")


def upgrade() -> None:
    bind = op.get_bind()
    have = set(sa.inspect(bind).get_table_names())
    if "replicas" not in have:
        op.create_table(
            "replicas",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("started_at", sa.Float, nullable=False),
            sa.Column("host", sa.String(256), nullable=False),
            sa.Column("pid", sa.Integer, nullable=False),
        )
    if "usage_log" not in have:
        op.create_table(
            "usage_log",
            sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("ts", sa.Float, nullable=False),
            sa.Column("model", sa.String(128), nullable=False),
            sa.Column("version", sa.String(32), nullable=False),
            sa.Column("batch_id", sa.BigInteger),
            sa.Column("batch_size", sa.Integer, nullable=False),
            sa.Column("compute_ms", sa.Float, nullable=False),
            sa.Column("requests", _JSON, nullable=False),
        )
        op.create_index("ix_usage_log_ts", "usage_log", ["ts"])
    if "batches" not in have:
        op.create_table(
            "batches",
            sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("ts", sa.Float, nullable=False),
            sa.Column("model", sa.String(128), nullable=False),
            sa.Column("version", sa.String(32), nullable=False),
            sa.Column("device", sa.String(64), nullable=False),
            sa.Column("pricing", sa.String(16), nullable=False),
            sa.Column("share", sa.Float, nullable=False),
            sa.Column("size", sa.Integer, nullable=False),
            sa.Column("requests", sa.Integer, nullable=False),
            sa.Column("compute_ms", sa.Float, nullable=False),
            sa.Column("cost_pusd", sa.BigInteger, nullable=False),
        )
        op.create_index("ix_batches_ts", "batches", ["ts"])
    if "training_runs" not in have:
        op.create_table(
            "training_runs",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("model", sa.String(128), nullable=False),
            sa.Column("version", sa.String(32), nullable=False),
            sa.Column("device", sa.String(64), nullable=False),
            sa.Column("pricing", sa.String(16), nullable=False),
            sa.Column("devices", sa.Integer, nullable=False),
            sa.Column("share", sa.Float, nullable=False),
            sa.Column("started_at", sa.Float, nullable=False),
            sa.Column("wall_s", sa.Float, nullable=False),
            sa.Column("cpu_s", sa.Float),
            sa.Column("gpu_s", sa.Float),
            sa.Column("peak_rss_bytes", sa.BigInteger),
            sa.Column("energy_kwh", sa.Float, nullable=False),
            sa.Column("cost_pusd", _PICO, nullable=False),
            sa.Column("source", sa.String(16), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("params", _JSON),
            sa.Column("notes", sa.Text),
        )
        op.create_index("ix_training_runs_model_version", "training_runs",
                        ["model", "version"])
    if "usage" in have:
        # the first ledgers kept a row per request in a `usage` table; the view takes its name
        # and the old rows stay readable beside it
        op.rename_table("usage", "usage_rows_v0")
    op.execute(usage_view_sql(bind.dialect.name))


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS usage")
    for name in ("training_runs", "batches", "usage_log", "replicas"):
        op.drop_table(name)

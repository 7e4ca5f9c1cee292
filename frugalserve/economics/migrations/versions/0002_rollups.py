"""Per-minute and per-hour rollups (usage by tenant, busy time by replica and device, batch
sizes per day) and replica uptime; the rollups are backfilled from the raw rows already there.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _key(*names_types):
    return [sa.Column(n, t, primary_key=True) for n, t in names_types]


def _usage_rollup(name: str, period: str) -> None:
    """usage_rollup (period "minute") and usage_rollup_hourly ("hour"): the same sums."""
    op.create_table(
        name,
        *_key((period, sa.BigInteger), ("model", sa.String(128)), ("version", sa.String(32)),
              ("variant", sa.String(64)), ("tenant", sa.String(256))),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("ok", sa.BigInteger, nullable=False),
        sa.Column("errors", sa.BigInteger, nullable=False),
        sa.Column("items", sa.BigInteger, nullable=False),
        sa.Column("cost_pusd", sa.BigInteger, nullable=False),
        sa.Column("compute_ms", sa.Float, nullable=False),
        sa.Column("queue_ms", sa.Float, nullable=False),
        sa.Column("total_ms", sa.Float, nullable=False),
    )


def upgrade() -> None:
    bind = op.get_bind()
    have = {c["name"] for c in sa.inspect(bind).get_columns("replicas")}
    for name in ("last_seen_at", "stopped_at"):
        if name not in have:
            op.add_column("replicas", sa.Column(name, sa.Float))
    _usage_rollup("usage_rollup", "minute")
    _usage_rollup("usage_rollup_hourly", "hour")
    op.create_table(
        "batch_rollup",
        *_key(("minute", sa.BigInteger), ("replica_id", sa.Integer), ("model", sa.String(128)),
              ("version", sa.String(32)), ("variant", sa.String(64)), ("device", sa.String(64)),
              ("pricing", sa.String(16))),
        sa.Column("share", sa.Float, nullable=False),
        sa.Column("batches", sa.BigInteger, nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("compute_ms", sa.Float, nullable=False),
        sa.Column("cost_pusd", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "batch_size_rollup",
        *_key(("day", sa.BigInteger), ("model", sa.String(128)), ("version", sa.String(32)),
              ("variant", sa.String(64)), ("device", sa.String(64)), ("pricing", sa.String(16)),
              ("size", sa.Integer)),
        sa.Column("batches", sa.BigInteger, nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("compute_ms", sa.Float, nullable=False),
        sa.Column("cost_pusd", sa.BigInteger, nullable=False),
    )
    # backfill from what is already there (raw rows not yet expired)
    minute = "(CAST(ts AS BIGINT) - CAST(ts AS BIGINT) % 60)"
    day = "(CAST(ts AS BIGINT) - CAST(ts AS BIGINT) % 86400)"
    op.execute(
        "INSERT INTO usage_rollup (minute, model, version, variant, tenant, requests, ok, "
        "errors, items, cost_pusd, compute_ms, queue_ms, total_ms) "
        f"SELECT {minute}, model, version, version, tenant, count(*), "
        "sum(CASE WHEN status = 200 THEN 1 ELSE 0 END), "
        "sum(CASE WHEN status = 200 THEN 0 ELSE 1 END), sum(items), sum(cost_pusd), "
        "sum(compute_ms), sum(queue_ms), sum(total_ms) FROM usage "
        f"GROUP BY {minute}, model, version, tenant")
    op.execute(
        "INSERT INTO usage_rollup_hourly (hour, model, version, variant, tenant, requests, ok, "
        "errors, items, cost_pusd, compute_ms, queue_ms, total_ms) "
        "SELECT minute - minute % 3600, model, version, variant, tenant, sum(requests), "
        "sum(ok), sum(errors), sum(items), sum(cost_pusd), sum(compute_ms), sum(queue_ms), "
        "sum(total_ms) FROM usage_rollup "
        "GROUP BY minute - minute % 3600, model, version, variant, tenant")
    # raw batches carry no replica: their id does (id = replica << 40 | n)
    replica = "CAST(id / 1099511627776 AS INTEGER)"
    op.execute(
        "INSERT INTO batch_rollup (minute, replica_id, model, version, variant, device, "
        "pricing, share, batches, rows, requests, compute_ms, cost_pusd) "
        f"SELECT {minute}, {replica}, model, version, version, device, pricing, max(share), "
        "count(*), sum(size), sum(requests), sum(compute_ms), sum(cost_pusd) FROM batches "
        f"GROUP BY {minute}, {replica}, model, version, device, pricing")
    op.execute(
        "INSERT INTO batch_size_rollup (day, model, version, variant, device, pricing, size, "
        "batches, rows, compute_ms, cost_pusd) "
        f"SELECT {day}, model, version, version, device, pricing, size, count(*), sum(size), "
        "sum(compute_ms), sum(cost_pusd) FROM batches "
        f"GROUP BY {day}, model, version, device, pricing, size")


def downgrade() -> None:
    for name in ("batch_size_rollup", "batch_rollup", "usage_rollup_hourly", "usage_rollup"):
        op.drop_table(name)
    with op.batch_alter_table("replicas") as batch:
        batch.drop_column("stopped_at")
        batch.drop_column("last_seen_at")

"""Variants: the variant (path) on usage chunks and batches, and in the rollups' variant column
(which held the version until now: those rows become "reference").

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from importlib import import_module

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ROLLUPS = ("usage_rollup", "usage_rollup_hourly", "batch_rollup", "batch_size_rollup")

# the usage view of 0001 (frozen there) with the chunk's variant path after the version
_v0001 = import_module("frugalserve.economics.migrations.versions.0001_initial")
_COLUMNS = (*_v0001.VIEW_COLUMNS[:5], "variant", *_v0001.VIEW_COLUMNS[5:])
_VARIANT = {"variant": "COALESCE(l.variant, 'reference')"}


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    op.execute("DROP VIEW IF EXISTS usage")  # it lists usage_log's columns: made again below
    if "variant" not in {c["name"] for c in inspector.get_columns("usage_log")}:
        op.add_column("usage_log", sa.Column("variant", sa.String(128)))
    if "variant" not in {c["name"] for c in inspector.get_columns("batches")}:
        op.add_column("batches", sa.Column("variant", sa.String(64)))
    for table in ROLLUPS:
        op.execute(f"UPDATE {table} SET variant = 'reference' WHERE variant = version")
    op.execute(_v0001.usage_view_sql(bind.dialect.name, _COLUMNS, _VARIANT))


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS usage")
    for table in ROLLUPS:
        op.execute(f"UPDATE {table} SET variant = version WHERE variant = 'reference'")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("variant")
    with op.batch_alter_table("usage_log") as batch:
        batch.drop_column("variant")
    op.execute(_v0001.usage_view_sql(op.get_bind().dialect.name))

"""API keys, budgets and budget alerts. Creates only what is missing: ledgers made while these
tables were still created outside migrations are adopted as they are.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(JSONB(), "postgresql")
# PicoAmount: exact NUMERIC(38, 0) on PostgreSQL, decimal text on SQLite
_PICO = sa.Numeric(38, 0).with_variant(sa.String(40), "sqlite")


def upgrade() -> None:
    have = set(sa.inspect(op.get_bind()).get_table_names())
    if "api_keys" not in have:
        op.create_table(
            "api_keys",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("key_id", sa.String(32), nullable=False, unique=True),
            sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
            sa.Column("tenant", sa.String(256), nullable=False),
            sa.Column("tier", sa.String(32), nullable=False),
            sa.Column("admin", sa.Boolean, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("revoked_at", sa.Float),
            sa.Column("name", sa.String(256)),
        )
    if "budgets" not in have:
        op.create_table(
            "budgets",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("scope", sa.String(16), nullable=False),
            sa.Column("target", sa.String(256), nullable=False),
            sa.Column("period", sa.String(16), nullable=False),
            sa.Column("amount_pusd", _PICO, nullable=False),
            sa.Column("thresholds", _JSON, nullable=False),
            sa.Column("fallback_model", sa.String(128)),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.UniqueConstraint("scope", "target", "period",
                                name="uq_budgets_scope_target_period"),
        )
    if "alerts" not in have:
        op.create_table(
            "alerts",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("ts", sa.Float, nullable=False),
            sa.Column("budget_id", sa.Integer),
            sa.Column("scope", sa.String(16), nullable=False),
            sa.Column("target", sa.String(256), nullable=False),
            sa.Column("period", sa.String(16), nullable=False),
            sa.Column("period_start", sa.Float, nullable=False),
            sa.Column("percent", sa.Float, nullable=False),
            sa.Column("action", sa.String(16), nullable=False),
            sa.Column("spent_pusd", _PICO, nullable=False),
            sa.Column("amount_pusd", _PICO, nullable=False),
            sa.Column("message", sa.Text, nullable=False),
        )
        op.create_index("ix_alerts_ts", "alerts", ["ts"])


def downgrade() -> None:
    op.drop_index("ix_alerts_ts", table_name="alerts")
    for name in ("alerts", "budgets", "api_keys"):
        op.drop_table(name)

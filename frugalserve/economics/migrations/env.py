"""Alembic environment for the ledger: a connection handed in by `migrations.upgrade`, or an
engine made from sqlalchemy.url (the alembic command line)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

config = context.config


def _run(connection) -> None:
    if connection.dialect.name == "postgresql":
        # two servers starting at once on a fresh database: one migrates, the other waits
        connection.execute(text("SELECT pg_advisory_xact_lock(7205011)"))
    context.configure(connection=connection, target_metadata=None,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()

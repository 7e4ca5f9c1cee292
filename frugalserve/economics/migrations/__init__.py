"""Alembic migrations of the ledger, run programmatically: `open_engine` calls `upgrade`.

`frugalserve ledger upgrade --ledger URL` does the same by hand. A database made before the
migrations existed (by create_all) is adopted: the first revision creates only what is missing.
"""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

HERE = Path(__file__).resolve().parent
_lock = threading.Lock()


def config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url",
                            engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


@cache
def head() -> str:
    heads = ScriptDirectory.from_config(config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"ledger migrations have {len(heads)} heads: {heads}")
    return heads[0]


def current(engine: Engine) -> str | None:
    """The revision the database is at (None: not under Alembic yet)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the ledger schema to `revision`; a no-op (one query) when it is there already.
    Returns the revision it was at before."""
    before = current(engine)
    if revision == "head" and before == head():
        return before
    with _lock, engine.begin() as conn:
        cfg = config(engine)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return before

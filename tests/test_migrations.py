"""Alembic migrations of the ledger on SQLite and PostgreSQL (a fresh schema per test): a fresh
ledger reaches head; a ledger from before migrations (tables made by create_all, raw rows in
them) is adopted and its rollups backfilled; downgrade and upgrade again; the CLI command."""

from __future__ import annotations

from importlib import import_module

from ledger_support import (  # noqa: F401 - fixtures
    ledger_url_fixture,
    pg_url_fixture,
    rows,
    write_batch,
    write_rejected,
)
from sqlalchemy import MetaData, Table, create_engine, inspect, text
from typer.testing import CliRunner

from frugalserve.cli import app
from frugalserve.economics import migrations
from frugalserve.economics.ledger import (
    ROLLUPS,
    LedgerWriter,
    batches,
    open_engine,
    replicas,
    training_runs,
    usage,
    usage_log,
)

V0001 = import_module("frugalserve.economics.migrations.versions.0001_initial")

T0 = 1_790_000_000.0
OWN = ("replicas", "usage_log", "batches", "training_runs", "usage_rollup", "batch_rollup",
       "batch_size_rollup")


def test_fresh_ledger_reaches_head_with_the_declared_schema(ledger_url):
    engine = open_engine(ledger_url)
    assert migrations.current(engine) == migrations.head()
    insp = inspect(engine)
    assert set(OWN) <= set(insp.get_table_names())
    for table in (replicas, usage_log, batches, training_runs, *ROLLUPS):
        assert {c["name"] for c in insp.get_columns(table.name)} == \
            {c.name for c in table.columns}, table.name
        pk = insp.get_pk_constraint(table.name)["constrained_columns"]
        assert set(pk) == {c.name for c in table.primary_key.columns}, table.name
    assert "usage" in insp.get_view_names()
    # the view the migrations froze is the one ledger.usage describes
    assert [c["name"] for c in insp.get_columns("usage")] == [c.name for c in usage.c]
    # a second open is a no-op, and the writer works on the migrated schema
    open_engine(ledger_url)
    writer = LedgerWriter(engine, flush_interval_s=3600)
    writer.close()
    assert rows(ledger_url, "SELECT count(*) FROM replicas WHERE stopped_at IS NOT NULL") == \
        [(1,)]


def test_a_ledger_from_before_migrations_is_adopted_and_backfilled(ledger_url):
    engine = create_engine(ledger_url)
    # the schema as create_all made it before this change: no alembic_version, no rollups
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE replicas (id INTEGER PRIMARY KEY, started_at FLOAT "
                          "NOT NULL, host VARCHAR(256) NOT NULL, pid INTEGER NOT NULL)"))
    old = MetaData()  # before revision 0004: no variant columns
    for table in (usage_log, batches):
        Table(table.name, old, *[c._copy() for c in table.columns if c.name != "variant"])
    old.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(V0001.usage_view_sql(engine.dialect.name))
        conn.execute(text("INSERT INTO replicas VALUES (3, 1.0, 'h', 1)"))
        rid = 3 << 40
        ts = 1_790_000_030.5
        conn.execute(batches.insert(), [
            {"id": rid + 1, "ts": ts, "model": "m", "version": "1", "device": "d",
             "pricing": "on_demand", "share": 0.5, "size": 3, "requests": 2,
             "compute_ms": 2.0, "cost_pusd": 30}])
        conn.execute(usage_log.insert(), [
            {"id": rid + 2, "ts": ts, "model": "m", "version": "1", "batch_id": rid + 1,
             "batch_size": 3, "compute_ms": 2.0,
             "requests": [[rid + 3, "a", ts, "acme", 2, 1.0, 3.0, 20, 200],
                          [rid + 4, "b", ts + 1, "globex", 1, 1.0, 3.0, 10, 200]]},
            {"id": rid + 5, "ts": ts, "model": "m", "version": "1", "batch_id": None,
             "batch_size": 0, "compute_ms": 0.0,
             "requests": [[rid + 6, "c", ts, "acme", 0, 0.0, 1.0, 0, 503]]}])
    engine.dispose()

    engine = open_engine(ledger_url)
    assert migrations.current(engine) == migrations.head()
    minute = 1_790_000_030 - 1_790_000_030 % 60
    got = rows(ledger_url, "SELECT minute, tenant, requests, ok, errors, items, cost_pusd "
                           "FROM usage_rollup ORDER BY tenant")
    assert [tuple(int(x) if not isinstance(x, str) else x for x in r) for r in got] == [
        (minute, "acme", 2, 1, 1, 2, 20), (minute, "globex", 1, 1, 0, 1, 10)]
    got = rows(ledger_url, "SELECT replica_id, batches, rows, requests, cost_pusd "
                           "FROM batch_rollup")
    assert [tuple(int(x) for x in r) for r in got] == [(3, 1, 3, 2, 30)]
    got = rows(ledger_url, "SELECT size, batches, cost_pusd FROM batch_size_rollup")
    assert [tuple(int(x) for x in r) for r in got] == [(3, 1, 30)]
    assert {c["name"] for c in inspect(engine).get_columns("replicas")} >= \
        {"last_seen_at", "stopped_at"}


def test_downgrade_and_upgrade_again(ledger_url):
    engine = open_engine(ledger_url)
    migrations.upgrade(engine, "0001")  # already past it: a no-op
    from alembic import command

    with engine.begin() as conn:
        cfg = migrations.config(engine)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert migrations.current(engine) == "0001"
    assert "usage_rollup" not in inspect(engine).get_table_names()
    migrations.upgrade(engine)
    assert migrations.current(engine) == migrations.head()
    assert "usage_rollup" in inspect(engine).get_table_names()


def test_cli_ledger_upgrade_and_prune(ledger_url):
    runner = CliRunner()
    result = runner.invoke(app, ["ledger", "upgrade", "--ledger", ledger_url])
    assert result.exit_code == 0, result.output
    assert f"revision {migrations.head()}" in result.output
    assert "unversioned" in result.output
    result = runner.invoke(app, ["ledger", "upgrade", "--ledger", ledger_url])
    assert result.exit_code == 0 and f"was {migrations.head()}" in result.output
    result = runner.invoke(app, ["ledger", "prune", "--ledger", ledger_url, "--days", "7"])
    assert result.exit_code == 0, result.output
    assert "usage_log" in result.output


def test_a_first_ledger_with_a_usage_table_gets_the_view_and_keeps_its_rows(ledger_url):
    """The very first ledgers kept one `usage` row per request; the view takes the name."""
    raw = create_engine(ledger_url)
    with raw.begin() as conn:
        conn.execute(text("CREATE TABLE usage (id BIGINT PRIMARY KEY, ts FLOAT, model "
                          "VARCHAR(128), cost_pusd BIGINT, status INTEGER)"))
        conn.execute(text("INSERT INTO usage VALUES (1, 1.0, 'm', 5, 200)"))
    raw.dispose()
    engine = open_engine(ledger_url)
    assert "usage" in inspect(engine).get_view_names()
    assert rows(ledger_url, "SELECT count(*) FROM usage") == [(0,)]
    assert rows(ledger_url, "SELECT model, cost_pusd FROM usage_rows_v0") == [("m", 5)]
    engine.dispose()


def test_derived_request_fields_read_the_same_before_and_after_a_downgrade(ledger_url):
    """0005: a batch's records leave id, ts and total_ms to the chunk. The view derives them,
    and a downgrade to 0004 writes them into the records, so the view reads the same."""
    engine = open_engine(ledger_url)
    writer = LedgerWriter(engine, flush_interval_s=3600)
    batch_id = write_batch(writer, T0, "m", "1", [("acme", 1, 5, 200), ("acme", 2, 7, 200)],
                           compute_ms=3.0)
    write_rejected(writer, T0 + 1, "m", "1", "globex")
    writer.close()
    sql = ("SELECT id, ts, tenant, items, queue_ms, total_ms, cost_pusd, status, batch_id "
           "FROM usage ORDER BY id")
    before = rows(ledger_url, sql)
    # the batch's chunk id is the one after the batch's; its records follow it
    assert [r[0] for r in before[:2]] == [batch_id + 2, batch_id + 3]
    for r in before[:2]:  # each waited 1 ms; the batch ran 1 ms after dispatch, done at T0+2ms
        assert abs(r[4] - 1.0) < 1e-9 and abs(r[5] - 2.0) < 1e-9 and abs(r[1] - T0) < 1e-6
        assert r[8] == batch_id
    assert before[2][2:] == ("globex", 0, 0.0, 1.0, 0, 503, None)
    from alembic import command

    with engine.begin() as conn:
        cfg = migrations.config(engine)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
    after = rows(ledger_url, sql)
    assert [r[0] for r in after] == [r[0] for r in before]
    for a, b in zip(after, before, strict=True):
        assert a[2:] == b[2:] and abs(a[1] - b[1]) < 1e-6 and abs(a[5] - b[5]) < 1e-9
    migrations.upgrade(engine)
    assert rows(ledger_url, sql) == after


def test_cli_ledger_load_spill_loads_once_and_renames_the_file(tmp_path, ledger_url):
    spilled = f"sqlite:///{tmp_path / 'spilled.db'}"
    writer = LedgerWriter(open_engine(spilled), flush_interval_s=3600, spill_dir=tmp_path)
    write_batch(writer, T0, "m", "1", [("acme", 1, 9, 200), ("acme", 1, 8, 200)], 1.0)
    with open_engine(spilled).begin() as conn:  # the database breaks before the last flush
        conn.exec_driver_sql("DROP TABLE usage_log")
    writer.close(timeout_s=0.3)
    [spill] = tmp_path.glob("ledger-spill-*.jsonl")
    runner = CliRunner()
    result = runner.invoke(app, ["ledger", "load-spill", str(spill), "--ledger", ledger_url])
    assert result.exit_code == 0, result.output
    assert "1 batches, 1 usage chunks written" in result.output
    assert not spill.exists() and spill.with_name(spill.name + ".loaded").exists()
    assert rows(ledger_url, "SELECT count(*), sum(cost_pusd) FROM usage") == [(2, 17)]
    result = runner.invoke(app, ["ledger", "load-spill", str(spill.with_name(spill.name
                                                                             + ".loaded")),
                                 "--ledger", ledger_url])
    assert result.exit_code == 2 and "in the ledger already" in result.output
    assert rows(ledger_url, "SELECT count(*), sum(cost_pusd) FROM usage") == [(2, 17)]

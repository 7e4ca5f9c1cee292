"""Per-minute rollups: written by the LedgerWriter in the same transaction as the raw rows, equal
to them at every key; raw rows expire by retention while the rollups stay; and after a real load
run with several tenants the money reconciles to the pico-dollar. SQLite and PostgreSQL."""

from __future__ import annotations

import math
import time
from collections import defaultdict

import numpy as np
import orjson
import pytest
import support
from conftest import DIGITS_CONFIG
from ledger_support import (  # noqa: F401 - fixtures
    ledger_url_fixture,
    pg_url_fixture,
    rows,
    write_batch,
    write_rejected,
)

from frugalserve.economics import ledger
from frugalserve.economics.batch_log import BatchLog
from frugalserve.economics.ledger import (
    LedgerWriter,
    UsageChunk,
    load_spill,
    open_engine,
    page_chunks,
    prune,
    rollup_usage,
)

T0 = 1_790_000_000.0  # a fixed epoch second: minutes and days land where the test says


def _writer(url: str) -> LedgerWriter:
    return LedgerWriter(open_engine(url), flush_interval_s=3600)


def test_rollup_usage_aggregates_per_minute_and_tenant():
    chunk = UsageChunk(1, T0, "m", "1", "int8>reference", 7, 3, 4.0, (
        (2, "a", T0 + 1, "acme", 2, 1.0, 5.0, 10, 200),
        (3, "b", T0 + 2, "acme", 1, 2.0, 6.0, 5, 200),
        (4, "c", T0 + 61, "globex", 1, 3.0, 7.0, 0, 500)))
    minute = int(T0) - int(T0) % 60
    assert rollup_usage([chunk]) == [
        (minute, "m", "1", "int8>reference", "acme", 2, 2, 0, 3, 15, 8.0, 3.0, 11.0),
        (minute + 60, "m", "1", "int8>reference", "globex", 1, 0, 1, 1, 0, 4.0, 3.0, 7.0),
    ]


def _record(log: BatchLog, arrivals: tuple[float, ...], tenants: tuple[str, ...],
            statuses: list[int] | None = None, *, request_ids=None, items=None,
            costs=None, variant=None, ids=(100, 101)) -> None:
    """A batch dispatched at perf time 10.0 and answered at 10.5, epoch `T0 + 40.5` then."""
    n = len(arrivals)
    costs = costs or [10] * n
    log.record(log.key("m", "1", variant, "aws-c7i.large", "on_demand", 0.5), *ids, T0 + 40,
               n if items is None else sum(items), n, 4.0, sum(costs), dispatched=10.0,
               done=10.5, done_at=T0 + 40.5, arrivals=list(arrivals), costs=costs,
               tenant=tenants[0] if len(set(tenants)) == 1 else tenants, items=items,
               statuses=statuses, request_ids=request_ids)


def _rollup(arrivals: tuple[float, ...], tenants: tuple[str, ...],
            statuses: list[int] | None = None) -> list[tuple]:
    log = BatchLog()
    _record(log, arrivals, tenants, statuses)
    return rollup_usage([], log.take(), log)


def test_a_batch_of_one_tenant_in_one_minute_rolls_up_in_one_step_as_record_by_record():
    """The column sums of the common case equal the record-by-record path's."""
    minute = int(T0) - int(T0) % 60  # T0 is 20 s into its minute: arrivals at +39..+40 s
    [row] = _rollup((9.0, 9.5, 9.75), ("acme",) * 3, [200, 499, 200])
    assert row[:10] == (minute, "m", "1", "reference", "acme", 3, 2, 1, 3, 30)
    assert row[10] == 12.0
    assert abs(row[11] - (1000 + 500 + 250)) < 1e-6  # queue: dispatch - arrival
    assert abs(row[12] - (1500 + 1000 + 750)) < 1e-6  # total: answer - arrival
    # the same requests as two tenants take the per-record path; the sums agree
    two = _rollup((9.0, 9.5, 9.75), ("acme", "acme", "globex"), [200, 499, 200])
    assert [r[4] for r in two] == ["acme", "globex"]
    assert sum(r[5] for r in two) == 3 and sum(r[6] for r in two) == 2
    assert abs(sum(r[11] for r in two) - row[11]) < 1e-6
    assert abs(sum(r[12] for r in two) - row[12]) < 1e-6


def test_the_log_keeps_its_own_copy_of_a_batchs_arrivals():
    """The loop's list of arrival floats is not held until the flush: changing it after the
    record leaves what the writer lays out as it was recorded."""
    log = BatchLog()
    arrivals = [9.0, 9.5, 9.75]
    log.record(log.key("m", "1", None, "aws-c7i.large", "on_demand", 0.5), 100, 101, T0, 3, 3,
               4.0, 30, 10.0, 10.5, T0 + 40.5, arrivals, [10] * 3, "acme")
    arrivals[:] = [0.0, 0.0, 0.0]
    [page] = log.take()
    assert page.arrival.tolist() == [9.0, 9.5, 9.75]


def test_a_batch_whose_arrivals_span_two_minutes_is_split_between_them():
    # answered at T0 + 40.5 s (minute + 60.5 s): arrivals 1.5 s and 0.25 s before the answer
    [early, late] = _rollup((9.0, 10.25), ("acme", "acme"))
    minute = int(T0) - int(T0) % 60
    assert (early[0], early[5]) == (minute, 1) and (late[0], late[5]) == (minute + 60, 1)


@pytest.mark.parametrize("mixed", [True, False], ids=["columns-as-lists", "columns-as-one-value"])
def test_a_batch_stored_as_columns_reads_in_the_usage_view_as_its_records(ledger_url, mixed):
    """A batch's requests are stored as JSON columns (a column the same for every request as
    one value); the view gives each request the record `page_chunks` states."""
    n = 4

    def record(log: BatchLog) -> None:
        _record(log, (9.0, 9.5, 9.75, 9.9999995),
                ("acme", "acme", "globex", "acme") if mixed else ("acme",) * n,
                [200, 499, 200, 500] if mixed else None,
                request_ids=("a", None, "c", None) if mixed else None,
                items=[1, 3, 2, 1] if mixed else None, costs=[10, 9, 9, 9], variant="int8")

    stated = BatchLog()
    record(stated)
    [chunk] = page_chunks(stated.take()[0], stated)
    writer = _writer(ledger_url)
    record(writer.log)
    writer.close()
    got = rows(ledger_url, "SELECT id, request_id, ts, tenant, items, queue_ms, total_ms, "
                           "cost_pusd, status, model, version, variant, batch_id, batch_size, "
                           "compute_ms FROM usage ORDER BY id")
    want = chunk.records
    assert len(got) == n
    for g, w in zip(got, want, strict=True):
        assert (g[0], g[1], g[3], g[4], g[7], g[8]) == (w[0], w[1], w[3], w[4], w[7], w[8])
        # times are kept to the microsecond
        assert g[2] == pytest.approx(w[2], abs=1e-6)
        assert g[5] == pytest.approx(w[5], abs=1e-3) and g[6] == pytest.approx(w[6], abs=1e-3)
        assert g[9:] == ("m", "1", "int8", 100, 7 if mixed else n, 4.0)


def test_rollups_equal_the_raw_rows_across_flushes(ledger_url):
    writer = _writer(ledger_url)
    for i in range(40):  # 40 batches over ~4 minutes, two models, three tenants, two flushes
        ts = T0 + i * 6
        write_batch(writer, ts, "m" if i % 3 else "n", "1" if i % 2 else "2",
                    [("acme", 1 + i % 4, 100 + i, 200), ("globex", 1, 7, 200 if i % 5 else 500),
                     ("anonymous", 2, 3 * i, 200)][: 1 + i % 3], compute_ms=1.5 + i)
        write_rejected(writer, ts, "m", "1", "globex")
        if i == 19:
            assert writer.flush()
    assert writer.flush()
    writer.close()

    raw = rows(ledger_url, """
        SELECT CAST(ts AS BIGINT) - CAST(ts AS BIGINT) % 60, model, version, tenant, count(*),
               sum(CASE WHEN status = 200 THEN 1 ELSE 0 END), sum(items), sum(cost_pusd)
        FROM usage GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4""")
    rolled = rows(ledger_url, """
        SELECT minute, model, version, tenant, requests, ok, items, cost_pusd
        FROM usage_rollup ORDER BY 1, 2, 3, 4""")
    assert [tuple(int(x) if not isinstance(x, str) else x for x in r) for r in raw] == \
        [tuple(int(x) if not isinstance(x, str) else x for x in r) for r in rolled]
    assert rows(ledger_url,
                "SELECT count(*) FROM usage_rollup WHERE variant <> 'reference'") == [(0,)]
    # busy time: per minute and replica, and per day and batch size, equal the raw batches
    raw_b = rows(ledger_url, "SELECT count(*), sum(size), sum(compute_ms), sum(cost_pusd) "
                             "FROM batches")[0]
    for table in ("batch_rollup", "batch_size_rollup"):
        got = rows(ledger_url, f"SELECT sum(batches), sum(rows), sum(compute_ms), "
                               f"sum(cost_pusd) FROM {table}")[0]
        assert int(got[0]) == raw_b[0] and int(got[1]) == int(raw_b[1])
        assert got[2] == pytest.approx(raw_b[2]) and int(got[3]) == int(raw_b[3])
    assert rows(ledger_url, "SELECT DISTINCT replica_id FROM batch_rollup") == \
        [(writer.replica_id,)]
    # a clean close stamps the replica's uptime
    (seen, stopped), = rows(ledger_url, "SELECT last_seen_at, stopped_at FROM replicas")
    assert stopped is not None and seen is not None


def test_prune_expires_raw_rows_and_keeps_rollups(ledger_url):
    writer = _writer(ledger_url)
    now = time.time()
    old, new = now - 40 * 86400, now - 3600
    write_batch(writer, old, "m", "1", [("acme", 1, 11, 200)], 1.0)
    write_batch(writer, new, "m", "1", [("acme", 1, 13, 200), ("globex", 2, 17, 200)], 1.0)
    writer.flush()
    writer.close()
    before = rows(ledger_url, "SELECT tenant, sum(cost_pusd) FROM usage_rollup GROUP BY tenant "
                              "ORDER BY tenant")
    deleted = prune(open_engine(ledger_url), retention_days=30)
    assert deleted == {"usage_log": 1, "batches": 1}
    assert rows(ledger_url, "SELECT count(*) FROM usage") == [(2,)]
    assert rows(ledger_url, "SELECT tenant, sum(cost_pusd) FROM usage_rollup GROUP BY tenant "
                            "ORDER BY tenant") == before
    assert prune(open_engine(ledger_url), retention_days=30) == {"usage_log": 0, "batches": 0}


@pytest.mark.parametrize("days", [-1.0, 0.0, math.nan, math.inf])
def test_prune_refuses_a_retention_that_is_not_a_positive_number_of_days(tmp_path, days):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    writer = _writer(url)
    write_batch(writer, time.time() - 60, "m", "1", [("acme", 1, 5, 200)], 1.0)
    writer.close()
    with pytest.raises(ValueError, match="positive number of days"):  # -1 deleted every row
        prune(open_engine(url), retention_days=days)
    assert rows(url, "SELECT count(*) FROM batches") == [(1,)]
    if days:  # 0 (and None) means: keep raw rows for ever
        with pytest.raises(ValueError, match="positive number of days"):
            LedgerWriter(open_engine(url), retention_days=days)


def test_the_writer_thread_prunes_by_retention(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    writer = LedgerWriter(open_engine(url), flush_interval_s=0.02, retention_days=1,
                          prune_interval_s=0.05)
    writer._next_prune = 0.0
    write_batch(writer, time.time() - 3 * 86400, "m", "1", [("acme", 1, 5, 200)], 1.0)
    writer.flush()
    writer.start()
    support.wait_for(lambda: rows(url, "SELECT count(*) FROM batches") == [(0,)],
                     what="the writer's periodic prune")
    writer.close()
    assert rows(url, "SELECT sum(cost_pusd) FROM usage_rollup") == [(5,)]


def test_every_batch_the_log_records_reaches_the_ledger_in_order(ledger_url):
    """Batches of 1 to 20 requests, taken as one page (their requests' columns in batch order),
    written, then more recorded and written: every batch and request is in the ledger."""
    writer = _writer(ledger_url)
    sizes = [1, 5, 3, 20, 2, 7, 1, 4, 6, 3]

    def record_all() -> None:
        for n in sizes:
            _record(writer.log, (9.5,) * n, ("acme",) * n, costs=list(range(1, n + 1)),
                    request_ids=(None,) * (n - 1) + ("last",),
                    ids=(writer.reserve_ids(), writer.reserve_ids(n + 1)))

    record_all()
    assert writer.pending == len(sizes)
    [page] = writer.log.take()
    assert writer.log.pending == 0
    assert page.ints[:, 5].tolist() == sizes  # PLAIN, in order
    assert page.cost.tolist() == [c for n in sizes for c in range(1, n + 1)]
    writer._unwritten = [page]  # as a flush that failed leaves it
    assert writer.pending == len(sizes)
    assert writer.flush()
    record_all()
    assert writer.flush()
    writer.close()
    total = 2 * sum(n * (n + 1) // 2 for n in sizes)
    assert rows(ledger_url, "SELECT count(*), sum(cost_pusd) FROM usage") == \
        [(2 * sum(sizes), total)]
    assert rows(ledger_url, "SELECT count(*), sum(cost_pusd) FROM batches") == \
        [(2 * len(sizes), total)]
    assert rows(ledger_url, "SELECT sum(requests), sum(cost_pusd) FROM usage_rollup") == \
        [(2 * sum(sizes), total)]
    assert rows(ledger_url, "SELECT count(*) FROM usage WHERE request_id = 'last'") == \
        [(2 * len(sizes),)]


def test_a_failed_write_keeps_its_rows_for_the_next_flush(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    writer = _writer(url)
    write_batch(writer, T0, "m", "1", [("acme", 1, 11, 200), ("globex", 2, 7, 200)], 1.5)
    write_rejected(writer, T0, "m", "1", "globex")
    real_write = ledger._write

    def broken(*args, **kwargs):
        raise ConnectionError("the database is away")

    monkeypatch.setattr(ledger, "_write", broken)
    assert not writer.flush()
    assert writer.pending == 2  # the batch and the rejected request's chunk
    write_batch(writer, T0 + 1, "m", "1", [("acme", 1, 5, 200)], 0.5)
    monkeypatch.setattr(ledger, "_write", real_write)
    assert writer.flush()
    assert writer.pending == 0
    writer.close()
    assert rows(url, "SELECT count(*), sum(cost_pusd) FROM usage") == [(4, 23)]
    assert rows(url, "SELECT count(*), sum(cost_pusd) FROM batches") == [(2, 23)]


def test_a_batch_the_ledger_cannot_hold_is_set_aside_and_the_rest_written(tmp_path):
    """A cost beyond int64 pico-dollars cannot go into the batch log's columns (nor the
    ledger's BIGINT): that record is set aside and written to a file at shutdown, and the
    records around it reach the ledger (it used to hold every flush back, and at shutdown
    the spill raised and lost them all)."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    writer = LedgerWriter(open_engine(url), flush_interval_s=3600, spill_dir=tmp_path)
    write_batch(writer, T0, "m", "1", [("acme", 1, 3, 200)], 1.5)
    huge = write_batch(writer, T0, "m", "1", [("acme", 1, 2**63, 200)], 1.5)
    write_batch(writer, T0, "m", "1", [("globex", 1, 4, 200)], 1.5)
    write_rejected(writer, T0, "m", "1", "globex")
    assert writer.flush()
    assert writer.pending == 0 and len(writer.log.unwritable) == 1
    writer.close()
    assert rows(url, "SELECT count(*), sum(cost_pusd) FROM usage") == [(3, 7)]
    [aside] = tmp_path.glob("ledger-unwritable-*.json")
    [doc] = orjson.loads(aside.read_bytes())
    assert doc["batch_id"] == huge and doc["cost"] == 2**63 and doc["costs"] == [2**63]
    assert doc["key"][:2] == ["m", "1"]


def test_rows_that_cannot_be_written_at_shutdown_are_spilled_whole(tmp_path):
    """The last line of "nothing is ever dropped": this raised TypeError (SQLAlchemy's column
    names are a str subclass, which orjson refuses as keys) and lost the rows."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    writer = LedgerWriter(open_engine(url), flush_interval_s=3600, spill_dir=tmp_path)
    batch_id = write_batch(writer, T0, "m", "1", [("acme", 2, 2**62, 200),
                                                   ("globex", 1, 7, 200)], 1.5)
    with open_engine(url).begin() as conn:  # the database breaks before the last flush
        conn.exec_driver_sql("DROP TABLE batches")
    writer.close(timeout_s=0.3)
    [spill] = tmp_path.glob("ledger-spill-*.jsonl")
    docs = [orjson.loads(line) for line in spill.read_bytes().splitlines()]
    assert [d["table"] for d in docs] == ["batches", "usage_log"]
    assert docs[0]["id"] == batch_id and docs[0]["cost_pusd"] == 2**62 + 7
    assert docs[1]["batch_id"] == batch_id
    assert [(r[3], r[7]) for r in docs[1]["requests"]] == [("acme", 2**62), ("globex", 7)]


def test_a_spill_file_loads_into_a_ledger_once_with_its_rollups(tmp_path, ledger_url):
    """What a writer spilled at shutdown goes into a ledger by `load_spill` (the CLI's `ledger
    load-spill`): the same per-request rows and rollups as if it had been written; a second
    load is refused and changes nothing."""
    url = f"sqlite:///{tmp_path / 'spilled.db'}"
    writer = LedgerWriter(open_engine(url), flush_interval_s=3600, spill_dir=tmp_path)
    write_batch(writer, T0, "m", "1", [("acme", 2, 11, 200), ("globex", 1, 7, 499)], 1.5)
    write_batch(writer, T0 + 70, "m", "2", [("acme", 1, 5, 200)], 0.5)
    write_rejected(writer, T0 + 71, "m", "1", "globex")
    with open_engine(url).begin() as conn:  # the database breaks before the last flush
        conn.exec_driver_sql("DROP TABLE batches")
    writer.close(timeout_s=0.3)
    [spill] = tmp_path.glob("ledger-spill-*.jsonl")

    reference = f"sqlite:///{tmp_path / 'reference.db'}"  # the same records, written normally
    ref = LedgerWriter(open_engine(reference), flush_interval_s=3600)
    write_batch(ref, T0, "m", "1", [("acme", 2, 11, 200), ("globex", 1, 7, 499)], 1.5)
    write_batch(ref, T0 + 70, "m", "2", [("acme", 1, 5, 200)], 0.5)
    write_rejected(ref, T0 + 71, "m", "1", "globex")
    ref.close()

    assert load_spill(open_engine(ledger_url), spill) == {"batches": 2, "usage_log": 3}
    per_request = ("SELECT model, version, tenant, items, queue_ms, total_ms, cost_pusd, status, "
                   "batch_size FROM usage ORDER BY ts, tenant")
    rollup = ("SELECT minute, model, version, tenant, requests, ok, errors, items, cost_pusd "
              "FROM usage_rollup ORDER BY minute, model, version, tenant")
    batch_sums = "SELECT model, version, batches, rows, cost_pusd FROM batch_rollup ORDER BY 1, 2"
    for sql in (per_request, rollup, batch_sums):
        got, want = rows(ledger_url, sql), rows(reference, sql)
        assert len(got) == len(want) > 0
        for g, w in zip(got, want, strict=True):
            assert g == pytest.approx(w), sql
    with pytest.raises(ValueError, match="in the ledger already"):
        load_spill(open_engine(ledger_url), spill)
    assert rows(ledger_url, "SELECT count(*), sum(cost_pusd) FROM usage") == [(4, 23)]


_CHUNK = {"table": "usage_log", "id": 9, "ts": T0, "model": "m", "version": "1",
          "variant": None, "batch_id": None, "batch_size": 0, "compute_ms": 0.0,
          "done_at": None, "run_ms": None}
_BATCH = {"table": "batches", "id": 8, "ts": T0, "model": "m", "version": "1", "variant": None,
          "device": "aws-c7i.large", "pricing": "on_demand", "share": 0.5, "size": 1,
          "requests": 1, "compute_ms": 1.0, "cost_pusd": 5}


@pytest.mark.parametrize(("doc", "problem"), [
    ({"table": "usage_log", "id": 1}, "line 1: not a ledger spill record"),
    ({**_CHUNK, "table": "usage"}, "'usage' is not batches or usage_log"),
    ({**_CHUNK, "requests": [[10, "r", T0, "acme", 1, 1.0, 2.0, 5]]}, "not .'id', 'request_id'"),
    ({**_CHUNK, "requests": [[10, "r", "today", "acme", 1, 1.0, 2.0, 5, 200]]},
     "a request record is not"),
    ({**_BATCH, "ts": "today"}, "not a ledger spill file"),
])
def test_a_file_that_is_not_a_spill_is_refused_and_nothing_is_written(tmp_path, doc, problem):
    bad = tmp_path / "notes.jsonl"
    bad.write_bytes(orjson.dumps(doc) + b"\n")
    url = f"sqlite:///{tmp_path / 'l.db'}"
    with pytest.raises(ValueError, match=problem):
        load_spill(open_engine(url), bad)
    assert rows(url, "SELECT (SELECT count(*) FROM usage_log), (SELECT count(*) FROM batches)") \
        == [(0, 0)]


# -- money reconciliation after a real load run ----------------------------------------------

TENANTS = ("acme", "globex", "initech", None)  # None: no tenant given: "anonymous"


@pytest.fixture(scope="module")
def recon_repo(tmp_path_factory, artifacts):
    repo = tmp_path_factory.mktemp("recon") / "models"
    support.write_model(repo, "digits", {"1": artifacts.lr_onnx, "2": artifacts.mlp_onnx},
                        DIGITS_CONFIG)
    support.write_model(repo, "other", {"1": artifacts.lr_onnx}, {
        **DIGITS_CONFIG, "device": {"type": "nvidia-t4", "share": 0.25, "pricing": "spot"}})
    return repo


def test_money_reconciles_across_tenants_models_and_device_busy_cost(recon_repo, artifacts,
                                                                      ledger_url):
    requests, expected_ok = [], 0
    for i in range(240):
        tenant = TENANTS[i % len(TENANTS)]
        headers = {} if tenant is None else {"X-Tenant": tenant}
        path = ("/v2/models/other/infer" if i % 3 == 0 else
                "/v2/models/digits/versions/1/infer" if i % 3 == 1 else
                "/v2/models/digits/infer")
        x = artifacts.distinct_rows(1 + i % 3, start=5 * i)
        requests.append(support.Req("POST", path, json=support.json_body({"X": x}),
                                    headers=headers))
        expected_ok += 1
    bad = support.Req("POST", "/v2/models/digits/infer", headers={"X-Tenant": "acme"},
                      json=support.json_body({"X": np.zeros((1, 63), np.float32)}))
    settings = support.settings(recon_repo, ledger_url=ledger_url, flush_interval_s=0.05)
    with support.LiveServer(settings) as live:
        replies = support.run_concurrently(live.url, requests + [bad] * 6)
    assert sum(r.status_code == 200 for r in replies) == expected_ok
    served = sum(support.doc_of(r)["parameters"]["cost_pico_usd"] for r in replies
                 if r.status_code == 200)

    by_tenant = dict(rows(ledger_url, "SELECT tenant, sum(cost_pusd) FROM usage_rollup "
                                      "GROUP BY tenant"))
    by_model = dict(rows(ledger_url, "SELECT model, sum(cost_pusd) FROM usage_rollup "
                                     "GROUP BY model"))
    (busy,), = rows(ledger_url, "SELECT sum(cost_pusd) FROM batches")
    (busy_rollup,), = rows(ledger_url, "SELECT sum(cost_pusd) FROM batch_rollup")
    assert set(by_tenant) == {"acme", "globex", "initech", "anonymous"}
    assert set(by_model) == {"digits", "other"}
    tenants_total = sum(int(v) for v in by_tenant.values())
    models_total = sum(int(v) for v in by_model.values())
    assert tenants_total == models_total == int(busy) == int(busy_rollup) == served > 0
    # and per tenant, the rollup is exactly the raw per-request view
    raw = defaultdict(int)
    for tenant, cost in rows(ledger_url, "SELECT tenant, cost_pusd FROM usage"):
        raw[tenant] += int(cost)
    assert {t: int(v) for t, v in by_tenant.items()} == dict(raw)
    # per device: the busy cost of each model's device is its batches' cost
    per_device = dict(rows(ledger_url, "SELECT device, sum(cost_pusd) FROM batches "
                                       "GROUP BY device"))
    assert int(per_device["nvidia-t4"]) == int(by_model["other"])
    assert int(per_device["aws-c7i.large"]) == int(by_model["digits"])
    (errors,), = rows(ledger_url, "SELECT sum(errors) FROM usage_rollup WHERE tenant = 'acme'")
    assert int(errors) == 6

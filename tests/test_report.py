"""The spend report (economics.report) on a ledger with known numbers: breakdowns, training
share, marginal and amortized cost per 1k, utilization, batching savings, break-even, budgets;
its JSON, CSV, FOCUS CSV and chart; the CLI; and the admin route over HTTP."""

from __future__ import annotations

import csv
import io
import json
import time
from decimal import Decimal

import pytest
import support
from ledger_support import (  # noqa: F401 - fixtures
    ledger_url_fixture,
    pg_url_fixture,
    rows,
    write_batch,
)
from sqlalchemy import text
from typer.testing import CliRunner

from frugalserve.cli import app
from frugalserve.economics import report as spend
from frugalserve.economics.budgets import Budget, set_budget
from frugalserve.economics.ledger import LedgerWriter, open_engine
from frugalserve.economics.training import TrainingRun, record_run

NOW = time.time()
T = NOW - 2 * 86400  # inside a 30-day window


def _ledger(url: str, budgets: bool = False):
    engine = open_engine(url)
    writer = LedgerWriter(engine, flush_interval_s=3600)
    for i in range(4):  # m v1: four batches of one row, 100 pico-dollars each
        write_batch(writer, T + i, "m", "1", [("acme", 1, 100, 200)], 10.0)
    for i in range(2):  # m v1: two batches of four rows at 50 each: batching saved 50 x 8
        write_batch(writer, T + 10 + i, "m", "1", [("globex", 1, 50, 200)] * 4, 20.0)
    for i in range(2):  # n v1 on a T4: batches of 2 only (no batch-1 reference)
        write_batch(writer, T + 20 + i, "n", "1", [("initech", 1, 30, 200)] * 2, 5.0,
                    device="nvidia-t4", pricing="spot", share=0.25)
    writer.flush()
    writer.close()
    with engine.begin() as conn:  # the replica was up 1,000 s around its batches
        conn.execute(text("UPDATE replicas SET started_at = :a, stopped_at = :b"),
                     {"a": T - 100, "b": T + 900})
    record_run(engine, TrainingRun(model="m", version="1", device="aws-c7i.large",
                                   pricing="on_demand", started_at=T - 86400, wall_s=60.0,
                                   energy_kwh=0.001, cost_pusd=10**6, source="imported"))
    if budgets:  # as `frugalserve budgets set` makes it: 1,000 pico-dollars for acme
        set_budget(engine, Budget("tenant", "acme", "total", 1000))
    return engine


def test_report_numbers(ledger_url):
    engine = _ledger(ledger_url, budgets=True)
    r = spend.build_report(engine, NOW - 30 * 86400, NOW, by="tenant")
    assert {row["tenant"]: row["cost_pusd"] for row in r.rows} == \
        {"acme": 400, "globex": 400, "initech": 120}
    assert r.totals["inference_pusd"] == 920 and r.totals["ok"] == 16
    assert r.totals["training_pusd"] == 10**6
    assert r.totals["training_share"] == pytest.approx(10**6 / (10**6 + 920))
    models = {row["model"]: row for row in r.spend["model"]}
    assert models["m"]["cost_pusd"] == 800 and models["n"]["cost_pusd"] == 120
    # marginal per 1k: 800 pico-dollars over 12 predictions
    assert Decimal(models["m"]["per_1k_marginal_usd"]) == pytest.approx(
        Decimal(800) * 1000 / 12 / 10**12, rel=Decimal("1e-9"))
    # amortized: 800 pico-dollars per 0.08 busy second x 1,000 s up
    econ = {e["model"]: e for e in r.economics}
    assert econ["m"]["provisioned_pusd"] == 10**7
    assert econ["m"]["utilization"] == pytest.approx(0.08 / 1000)
    assert Decimal(econ["m"]["per_1k_amortized_usd"]) == pytest.approx(
        Decimal(10**7) * 1000 / 12 / 10**12, rel=Decimal("1e-9"))
    # savings: batch-1 per row 100, 12 rows, actual 800 -> 400; n has no batch-1 reference
    saved = {s["model"]: s for s in r.savings["by_version"]}
    assert saved["m"]["batching_saving_pusd"] == 400 and saved["m"]["exact_reference"]
    assert saved["n"]["batching_saving_pusd"] == 0 and saved["n"]["reference_batch_size"] == 2
    assert r.savings["levers"]["batching_pusd"] == 400
    assert r.savings["levers"]["cache_pusd"] is None
    # break-even: 10^6 / (400 / 12) predictions
    (run,) = r.training
    assert run["predictions_needed"] == 30_000
    assert run["break_even_at"] is not None
    # the budget: 1,000 pico-dollars for acme, 400 spent in the last 7 days: 10.5 days left
    (budget,) = r.budgets
    assert budget["spent_usd"] == spend.usd(400)
    assert budget["runway_days"] == pytest.approx(600 / (400 / 7))
    # a total budget counts all spend, as serving enforces it (budgets.period_bounds)
    assert budget["period_start"] == "1970-01-01T00:00:00+00:00"
    # by day: one day holds it all; series carries training and inference
    by_day = spend.build_report(engine, NOW - 30 * 86400, NOW, by="day")
    assert sum(row["cost_pusd"] for row in by_day.rows) == 920
    assert sum(s["training_pusd"] for s in by_day.series) == 10**6
    assert sum(s["inference_pusd"] for s in by_day.series) == 920


def test_no_budgets_table_and_a_training_run_without_savings(tmp_path):
    engine = open_engine(f"sqlite:///{tmp_path / 'l.db'}")
    record_run(engine, TrainingRun(model="z", version="1", device="aws-c7i.large",
                                   pricing="on_demand", started_at=NOW - 60, wall_s=1.0,
                                   energy_kwh=0.0, cost_pusd=5, source="imported"))
    with engine.begin() as conn:  # a ledger from before budgets existed
        conn.execute(text("DROP TABLE IF EXISTS budgets"))
    r = spend.build_report(engine, NOW - 86400, NOW + 1)
    assert r.budgets is None
    assert r.training[0]["break_even"].startswith("n/a")
    assert r.totals["training_share"] == 1.0
    assert r.rows == []


def test_money_sums_are_exact_past_float_precision(tmp_path):
    """A day of one model on one device past $9,007 (2^53 pico-dollars) is beyond a float's
    integers: the batching saving must still be exact to the pico-dollar."""
    engine = open_engine(f"sqlite:///{tmp_path / 'l.db'}")
    writer = LedgerWriter(engine, flush_interval_s=3600)
    big = 2**53 + 1
    write_batch(writer, T, "m", "1", [("acme", 1, big, 200)], 10.0)
    write_batch(writer, T + 1, "m", "1", [("acme", 1, big - 2, 200)] * 2, 10.0)
    writer.close()
    r = spend.build_report(engine, NOW - 30 * 86400, NOW)
    (saved,) = r.savings["by_version"]
    assert saved["counterfactual_pusd"] == 3 * big
    assert saved["batching_saving_pusd"] == 4 and r.savings["total_pusd"] == 4
    assert r.spend["model"][0]["batching_saving_usd"] == spend.usd(4)


def test_a_break_even_past_the_year_9999_is_said_not_raised(tmp_path):
    """$1M of training that saves 33 pico-dollars a prediction at 16 predictions a month: the
    date does not fit a datetime (this raised OverflowError in the report and the CLI)."""
    engine = _ledger(f"sqlite:///{tmp_path / 'l.db'}")
    record_run(engine, TrainingRun(model="m", version="1", device="nvidia-h100-80gb",
                                   pricing="on_demand", started_at=T, wall_s=3600.0,
                                   energy_kwh=1.0, cost_pusd=10**18, source="imported"))
    r = spend.build_report(engine, NOW - 30 * 86400, NOW)
    big = next(run for run in r.training if run["cost_pusd"] == 10**18)
    assert big["predictions_needed"] == 3 * 10**16
    assert big["break_even_at"] is None
    assert big["break_even"] == "not before the year 10000 at the current rate"
    result = CliRunner().invoke(app, ["report", "--ledger", f"sqlite:///{tmp_path / 'l.db'}"])
    assert result.exit_code == 0, result.output


def test_a_budget_row_edited_into_nonsense_is_reported_not_raised(tmp_path):
    engine = _ledger(f"sqlite:///{tmp_path / 'l.db'}", budgets=True)
    with engine.begin() as conn:
        conn.execute(text("UPDATE budgets SET thresholds = '[]'"))
    (budget,) = spend.build_report(engine, NOW - 30 * 86400, NOW).budgets
    assert "at least one threshold" in budget["error"]


def test_formats_and_chart(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    engine = _ledger(url)
    r = spend.build_report(engine, NOW - 30 * 86400, NOW, by="model")
    doc = json.loads(r.to_json())
    assert doc["by"] == "model" and {row["model"] for row in doc["rows"]} == {"m", "n"}
    table = list(csv.DictReader(io.StringIO(r.to_csv())))
    assert {row["model"] for row in table} == {"m", "n"}
    for row in table:  # dollars in fixed notation: spreadsheets and FOCUS tools read "0.00000"
        assert not any("E" in v for k, v in row.items() if k.endswith("_usd")), row
    empty = spend.build_report(engine, NOW - 10 * 365 * 86400, NOW - 9 * 365 * 86400)
    assert empty.to_csv().startswith("model,requests,ok,errors,items,cost_pusd,cost_usd,")
    focus = list(csv.DictReader(io.StringIO(r.to_focus_csv())))
    assert list(focus[0]) == spend.FOCUS_COLUMNS
    usage = [f for f in focus if f["ChargeCategory"] == "Usage"]
    purchase = [f for f in focus if f["ChargeCategory"] == "Purchase"]
    assert sum(Decimal(f["BilledCost"]) for f in usage) == Decimal(920) / 10**12
    assert len(purchase) == 1 and Decimal(purchase[0]["EffectiveCost"]) == Decimal("0.000001")
    assert json.loads(usage[0]["Tags"])["tenant"] in ("acme", "globex", "initech")

    runner = CliRunner()
    chart = tmp_path / "spend.png"
    result = runner.invoke(app, ["report", "--ledger", url, "--since", "30d", "--by", "tenant",
                                 "--chart", str(chart)])
    assert result.exit_code == 0, result.output
    assert "acme" in result.output and chart.stat().st_size > 1000
    for fmt, marker in (("json", '"rows"'), ("csv", "tenant,requests"), ("focus", "BilledCost")):
        result = runner.invoke(app, ["report", "--ledger", url, "--by", "tenant", "--format",
                                     fmt])
        assert result.exit_code == 0, result.output
        assert marker in result.output
    result = runner.invoke(app, ["report", "--ledger", url, "--by", "planet"])
    assert result.exit_code != 0


def test_parse_since():
    assert spend.parse_since("30d", now=1000.0 + 30 * 86400) == 1000.0
    assert spend.parse_since("2h", now=7200.0) == 0.0
    assert spend.parse_since("2026-01-01") == 1767225600.0
    with pytest.raises(ValueError):
        spend.parse_since("yesterday")


@pytest.mark.parametrize("since", ["inf", "nan", "1e400d", "99999999999d", "-1e20"])
def test_parse_since_refuses_times_no_report_can_span(since):
    # inf crashed the report with OverflowError; 99999999999d left it bucketing for ever
    with pytest.raises(ValueError, match="out of range"):
        spend.parse_since(since)


def test_admin_report_over_http(tmp_path, artifacts):
    repo = tmp_path / "models"
    support.write_model(repo, "digits", {"1": artifacts.lr_onnx})
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with support.LiveServer(support.settings(repo, ledger_url=url)) as live, \
            live.client() as c:
        for i, tenant in enumerate(("acme", "globex", "acme")):
            r = c.post("/v2/models/digits/infer", headers={"X-Tenant": tenant},
                       json=support.json_body({"X": artifacts.X[i:i + 1]}))
            assert r.status_code == 200, r.text
        support.wait_for(lambda: rows(url, "SELECT count(*) FROM usage_rollup") != [(0,)],
                         what="the rollups to be written")
        support.wait_for(lambda: rows(url, "SELECT sum(requests) FROM usage_rollup") == [(3,)],
                         what="every request in the rollups")
        r = c.get("/v2/admin/report", params={"since": "1h", "by": "tenant"})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["by"] == "tenant"
        assert {row["tenant"]: row["ok"] for row in doc["rows"]} == {"acme": 2, "globex": 1}
        paid = sum(row["cost_pusd"] for row in doc["rows"])
        (busy,), = rows(url, "SELECT sum(cost_pusd) FROM batches")
        assert paid == busy > 0
        assert c.get("/v2/admin/report", params={"by": "planet"}).status_code == 400
        bad = c.get("/v2/admin/report", params={"since": "whenever"})
        assert bad.status_code == 400 and "since" in bad.json()["error"]
        assert c.get("/v2/admin/nothing").status_code == 404

"""Budgets: reserve before inference, settle after, so that concurrency cannot overspend;
402 with the budget, spend and reset time; downgrade to a fallback model; alerts to the log, a
webhook (retried) and the ledger; spend that survives a restart."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import support
import yaml
from conftest import DIGITS_CONFIG
from ledger_support import rows as query
from typer.testing import CliRunner

from frugalserve.cli import app
from frugalserve.economics import keys
from frugalserve.economics.alerts import list_alerts
from frugalserve.economics.budgets import (
    Budget,
    Threshold,
    list_budgets,
    period_bounds,
    set_budget,
    usd_to_pico,
)
from frugalserve.economics.ledger import open_engine
from frugalserve.economics.meter import exact_usd as usd

GATED_CONFIG = {"batching": {"max_batch_size": 32, "max_queue_delay_ms": 2,
                             "max_queue_size": 256},
                "device": DIGITS_CONFIG["device"]}


@pytest.fixture
def budget_repo(tmp_path, artifacts):
    repo = tmp_path / "models"
    support.write_model(repo, "digits", {"1": artifacts.lr_onnx}, DIGITS_CONFIG)
    support.write_model(repo, "spare", {"1": artifacts.lr_onnx}, DIGITS_CONFIG)
    support.write_model(repo, "gated", {"1": artifacts.gated}, GATED_CONFIG)
    return repo, f"sqlite:///{tmp_path / 'ledger.db'}"


def live(repo, url, **kw):
    kw.setdefault("admission_refresh_s", 0.2)
    return support.LiveServer(support.settings(repo, ledger_url=url, **kw))


def usage_rows(url: str) -> list[dict]:
    columns = ("request_id", "model", "tenant", "cost_pusd", "status")
    return [dict(zip(columns, r, strict=True))
            for r in query(url, f"SELECT {', '.join(columns)} FROM usage")]


def install(engine, dataplane, budget: Budget):
    """Store a budget and wait until the running server has it in force."""
    budget_id = set_budget(engine, budget)
    admission = dataplane.admission
    support.wait_for(lambda: budget_id in admission.counters
                     and admission.counters[budget_id].budget.amount_pusd == budget.amount_pusd,
                     10, what="the budget to be picked up")
    return admission.counters[budget_id]


# -- units -------------------------------------------------------------------------------------


def test_periods_thresholds_and_amounts():
    t = datetime(2025, 3, 12, 15, 30, tzinfo=UTC).timestamp()  # a Wednesday
    day = period_bounds("day", t)
    assert day == (datetime(2025, 3, 12, tzinfo=UTC).timestamp(),
                   datetime(2025, 3, 13, tzinfo=UTC).timestamp())
    assert period_bounds("week", t) == (datetime(2025, 3, 10, tzinfo=UTC).timestamp(),
                                        datetime(2025, 3, 17, tzinfo=UTC).timestamp())
    assert period_bounds("month", t) == (datetime(2025, 3, 1, tzinfo=UTC).timestamp(),
                                         datetime(2025, 4, 1, tzinfo=UTC).timestamp())
    dec = datetime(2025, 12, 31, 23, 59, tzinfo=UTC).timestamp()
    assert period_bounds("month", dec)[1] == datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    assert period_bounds("total", t) == (0.0, None)
    assert Threshold.parse("80:alert") == Threshold(80.0, "alert")
    assert Threshold.parse("reject@100%") == Threshold(100.0, "reject")
    for bad in ("80:nap", "x:alert", "0:reject"):
        with pytest.raises(ValueError):
            Threshold.parse(bad)
    assert usd_to_pico("12.5") == 12_500_000_000_000 and usd_to_pico("$0.000001") == 1_000_000
    with pytest.raises(ValueError):
        usd_to_pico("-1")
    with pytest.raises(ValueError, match="fallback"):
        Budget("tenant", "a", "day", 1, (Threshold(90, "downgrade"),))
    with pytest.raises(ValueError, match="target"):
        Budget("tenant", "", "day", 1)
    assert usd(1) == "$0.000000000001" and usd(12_500_000_000_000) == "$12.50"


def test_cli_budgets_set_list_delete(tmp_path):
    url = f"sqlite:///{tmp_path / 'b.db'}"
    runner = CliRunner()
    r = runner.invoke(app, ["budgets", "set", "--amount", "25", "--scope", "tenant", "--target",
                            "team-a", "--period", "week", "-t", "50:alert", "-t", "90:downgrade",
                            "-t", "100:reject", "--fallback-model", "small", "--ledger", url])
    assert r.exit_code == 0, r.output
    # setting the same (scope, target, period) replaces it
    r = runner.invoke(app, ["budgets", "set", "--amount", "30", "--scope", "tenant", "--target",
                            "team-a", "--period", "week", "--ledger", url])
    assert r.exit_code == 0, r.output
    (b,) = list_budgets(open_engine(url))
    assert (b.amount_pusd, b.thresholds) == (usd_to_pico(30), (Threshold(80, "alert"),
                                                               Threshold(100, "reject")))
    listed = runner.invoke(app, ["budgets", "list", "--ledger", url])
    assert listed.exit_code == 0 and "team-a" in listed.output and "$30.00" in listed.output
    bad = runner.invoke(app, ["budgets", "set", "--amount", "1", "--scope", "planet",
                              "--ledger", url])
    assert bad.exit_code != 0 and "scope" in bad.output
    assert runner.invoke(app, ["budgets", "delete", str(b.id), "--ledger", url]).exit_code == 0
    assert list_budgets(open_engine(url)) == []
    assert runner.invoke(app, ["budgets", "alerts", "--ledger", url]).exit_code == 0


# -- concurrency -------------------------------------------------------------------------------


def test_200_concurrent_requests_against_a_budget_that_affords_50(budget_repo):
    """The model is held while all 200 are admitted or refused, so nothing settles in between:
    admission alone must stop at 50. Each admission checks spent + reserved + estimate <= amount
    and reserves on the loop thread with no await in between, so exactly floor(amount /
    estimate) = 50 are admitted and the other 150 get 402 at once."""
    repo, url = budget_repo
    engine = open_engine(url)
    with live(repo, url) as server:
        dp = server.dataplane
        est = dp.admission.estimate(dp._resolve("gated", None), 1)
        amount = 50 * est + est // 2  # affords 50 reservations, not 51
        counter = install(engine, dp, Budget("model", "gated", "day", amount,
                                             (Threshold(100, "reject"),)))
        x = support.sentinel_row()
        reqs = [support.Req("POST", "/v2/models/gated/infer",
                            json=support.json_body({"input": x}, id=f"r{i}")) for i in range(200)]
        with support.hold_gate():
            join = support.in_thread(lambda: support.run_concurrently(server.url, reqs))
            support.wait_for(lambda: counter.reserved // est + dp.admission.rejected >= 200, 60,
                             what="all 200 admission decisions")
            assert counter.reserved == 50 * est and counter.spent == 0
        replies = join()
        statuses = [r.status_code for r in replies]
        assert statuses.count(200) == 50 and statuses.count(402) == 150, statuses
        refusal = next(r for r in replies if r.status_code == 402).json()["error"]
        assert "budget exceeded" in refusal and "model 'gated'" in refusal
        assert f"{usd(amount)} per day" in refusal and "spent" in refusal
        assert "resets" in refusal and "T00:00:00Z" in refusal
        served_cost = sum(r.json()["parameters"]["cost_pico_usd"] for r in replies
                          if r.status_code == 200)
        # everything settled: reservations are back to zero, spend is what was charged
        assert counter.reserved == 0 and counter.spent == served_cost
        # the bound: spend <= amount + E, E = what settled requests cost over their estimate
        # (here the model was held, so E is the held time: a stall is paid for)
        assert counter.spent <= amount + counter.excess
        spent, excess = counter.spent, counter.excess
    rows = [u for u in usage_rows(url) if u["model"] == "gated"]
    assert sum(u["cost_pusd"] for u in rows) == spent
    refused = [u for u in rows if u["status"] == 402]
    assert len(refused) == 150 and all(u["cost_pusd"] == 0 for u in refused)
    assert spent - excess <= amount

    # spend survives a restart: read back from the ledger for the period
    with live(repo, url) as server:
        dp = server.dataplane
        (counter,) = dp.admission.counters.values()
        assert counter.spent == spent
        est = dp.admission.estimate(dp._resolve("gated", None), 1)
        with server.client() as c:
            r = c.post("/v2/models/gated/infer",
                       json=support.json_body({"input": support.sentinel_row(value=0.0)}))
        assert r.status_code == (402 if spent + est > amount else 200)
    engine.dispose()


def test_unheld_burst_settles_to_the_ledger_exactly(budget_repo, artifacts):
    """A free-running model: settled spend equals the ledger, reservations drain to zero, and
    spend stays within amount + E (E = 0 when no batch ran slower than its estimate)."""
    repo, url = budget_repo
    engine = open_engine(url)
    with live(repo, url) as server:
        dp = server.dataplane
        est = dp.admission.estimate(dp._resolve("digits", None), 1)
        amount = 20 * est
        counter = install(engine, dp, Budget("global", "", "day", amount))
        x = artifacts.distinct_rows(200)
        reqs = [support.Req("POST", "/v2/models/digits/infer",
                            json=support.json_body({"X": x[i:i + 1]}, id=f"u{i}"))
                for i in range(200)]
        replies = support.run_concurrently(server.url, reqs)
        statuses = [r.status_code for r in replies]
        assert set(statuses) <= {200, 402} and statuses.count(200) >= 1
        assert counter.reserved == 0
        assert counter.spent <= amount + counter.excess
        spent = counter.spent
    assert sum(u["cost_pusd"] for u in usage_rows(url)) == spent
    engine.dispose()


# -- tenants, downgrade, alerts ----------------------------------------------------------------


def test_tenant_budget_rejects_only_that_tenant(budget_repo, artifacts):
    repo, url = budget_repo
    engine = open_engine(url)
    _, key_a = keys.create_key(engine, "team-a")
    _, key_b = keys.create_key(engine, "team-b")
    set_budget(engine, Budget("tenant", "team-a", "month", 0))
    body = support.json_body({"X": artifacts.X[:1]}, id="ta")
    with live(repo, url) as server, server.client() as c:
        r = c.post("/v2/models/digits/infer", json=body, headers={"Authorization":
                                                                  f"Bearer {key_a}"})
        assert r.status_code == 402
        error = r.json()["error"]
        assert "tenant 'team-a' budget is $0.00 per month" in error and "resets" in error
        r = c.post("/v2/models/digits/infer", json=body,
                   headers={"Authorization": f"Bearer {key_b}"})
        assert r.status_code == 200
    rows = {(u["tenant"], u["status"]): u for u in usage_rows(url)}
    assert rows[("team-a", 402)]["cost_pusd"] == 0 and rows[("team-b", 200)]["cost_pusd"] > 0
    engine.dispose()


class Receiver:
    """A local webhook: the first POST fails with 500 (so the sink must retry), then 200."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.attempts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                outer.attempts += 1
                body = self.rfile.read(int(self.headers["content-length"]))
                if outer.attempts == 1:
                    self.send_response(500)
                else:
                    outer.bodies.append(json.loads(body))
                    self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_downgrade_to_fallback_and_alerts_to_log_webhook_and_ledger(budget_repo, artifacts,
                                                                     caplog):
    repo, url = budget_repo
    engine = open_engine(url)
    with Receiver() as hook, live(repo, url, alert_webhook=hook.url) as server, \
            server.client() as c:
        dp = server.dataplane
        est = dp.admission.estimate(dp._resolve("digits", None), 1)
        counter = install(engine, dp, Budget(
            "model", "digits", "day", 4 * est,
            (Threshold(1, "alert"), Threshold(50, "downgrade")), fallback_model="spare"))
        served_by = []
        for i in range(60):
            r = c.post("/v2/models/digits/infer",
                       json=support.json_body({"X": artifacts.X[i:i + 1]}))
            assert r.status_code == 200, r.text
            served_by.append(r.json()["model_name"])
            if served_by[-1] == "spare":
                break
        # served from the model until spend + reservations would pass 50%, then the fallback
        assert served_by[0] == "digits" and served_by[-1] == "spare", served_by
        assert dp.admission.downgraded >= 1 and counter.spent > 0
        support.wait_for(lambda: {b["action"] for b in hook.bodies} >= {"alert", "downgrade"},
                         30, what="alerts at the webhook")
    assert hook.attempts > len(hook.bodies)  # the first delivery failed and was retried
    alert = next(b for b in hook.bodies if b["action"] == "alert")
    assert alert["scope"] == "model" and alert["target"] == "digits" and alert["percent"] == 1
    assert alert["amount_pusd"] == 4 * est and alert["spent_pusd"] > 0
    assert "model 'digits' budget" in alert["message"]
    recorded = list_alerts(open_engine(url))
    assert {a["action"] for a in recorded} == {"alert", "downgrade"}
    assert any("budget alert" in rec.getMessage() for rec in caplog.records)
    # the downgraded request is billed where it ran
    assert any(u["model"] == "spare" and u["cost_pusd"] > 0 for u in usage_rows(url))
    engine.dispose()


def test_budgets_file(budget_repo, artifacts, tmp_path):
    repo, url = budget_repo
    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump({"budgets": [
        {"scope": "model", "target": "spare", "period": "total", "amount_usd": 0,
         "thresholds": ["100:reject"]}]}))
    rid = uuid.uuid4().hex
    with live(repo, url, budgets_file=path) as server, server.client() as c:
        body = support.json_body({"X": artifacts.X[:1]}, id=rid)
        r = c.post("/v2/models/spare/infer", json=body)
        assert r.status_code == 402 and "resets never" in r.json()["error"]
        assert c.post("/v2/models/digits/infer", json=body).status_code == 200

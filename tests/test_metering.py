"""Metering end to end: after a load run and a clean shutdown, the ledger holds one usage record
per request, and request costs add up exactly to batch costs. On SQLite and on PostgreSQL."""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import numpy as np
import pytest
import support
from conftest import DIGITS_CONFIG
from ledger_support import rows as query

# -- ledgers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metering_repo(tmp_path_factory, artifacts):
    repo = tmp_path_factory.mktemp("metering") / "models"
    support.write_model(repo, "digits", {"1": artifacts.lr_onnx, "2": artifacts.mlp_onnx},
                        DIGITS_CONFIG)
    support.write_model(repo, "gated_tiny", {"1": artifacts.gated}, {
        "batching": {"max_batch_size": 1, "max_queue_delay_ms": 0, "max_queue_size": 1},
        "device": {"type": "nvidia-t4", "share": 1.0, "pricing": "spot"},
    })
    return repo


USAGE_COLUMNS = ("id, request_id, ts, model, version, tenant, batch_id, batch_size, items, "
                 "queue_ms, compute_ms, total_ms, cost_pusd, status")


def usage_rows(url: str) -> list[dict]:
    names = [c.strip() for c in USAGE_COLUMNS.split(",")]
    return [dict(zip(names, row, strict=True))
            for row in query(url, f"SELECT {USAGE_COLUMNS} FROM usage")]


def batch_rows(url: str) -> list[dict]:
    names = ["id", "model", "version", "device", "pricing", "share", "size", "requests",
             "cost_pusd"]
    return [dict(zip(names, row, strict=True))
            for row in query(url, f"SELECT {', '.join(names)} FROM batches")]


# -- the load ---------------------------------------------------------------------------------

TENANTS = ("acme", "globex", None)  # None: no X-Tenant header, recorded as "anonymous"


def load_run(server, artifacts, n_good: int = 300, n_bad: int = 20, n_unknown: int = 5):
    """Concurrent good requests (JSON and binary, 1-3 rows, three tenants, both versions),
    requests with a wrong shape (400) and requests for an unknown model (404)."""
    plan, requests = [], []
    for i in range(n_good):
        rows = 1 + i % 3
        x = artifacts.distinct_rows(rows, start=3 * i)
        tenant = TENANTS[i % 3]
        headers = {} if tenant is None else {"X-Tenant": tenant}
        path = "/v2/models/digits/infer" if i % 4 else "/v2/models/digits/versions/1/infer"
        rid = f"good-{i}"
        if i % 2:
            body, h = support.binary_body({"X": x}, id=rid)
            requests.append(support.Req("POST", path, content=body, headers={**headers, **h}))
        else:
            requests.append(support.Req("POST", path, json=support.json_body({"X": x}, id=rid),
                                        headers=headers))
        plan.append(("good", rid, rows, tenant or "anonymous", x))
    for i in range(n_bad):
        rid = f"bad-{i}"
        requests.append(support.Req("POST", "/v2/models/digits/infer", json=support.json_body(
            {"X": np.zeros((1, 63), np.float32)}, id=rid), headers={"X-Tenant": "acme"}))
        plan.append(("bad", rid, 1, "acme", None))
    for i in range(n_unknown):
        rid = f"unknown-{i}"
        requests.append(support.Req("POST", "/v2/models/nope/infer", json=support.json_body(
            {"X": np.zeros((1, 64), np.float32)}, id=rid)))
        plan.append(("unknown", rid, 1, "anonymous", None))
    order = np.random.default_rng(7).permutation(len(requests))
    replies = support.run_concurrently(server.url, [requests[i] for i in order])
    by_index = {int(i): reply for i, reply in zip(order, replies, strict=True)}
    return [(plan[i], by_index[i]) for i in range(len(plan))]


def check_ledger(url: str, results, metrics_cost_by_tenant: dict[str, float] | None = None,
                 window: tuple[float, float] | None = None):
    usage = usage_rows(url)
    batches = batch_rows(url)
    for u in usage:
        # arrival time in epoch seconds, inside the run; durations that nest
        if window is not None:
            assert window[0] - 1 <= u["ts"] <= window[1] + 1, u
        assert u["queue_ms"] >= 0 and u["compute_ms"] >= 0
        assert u["total_ms"] >= u["queue_ms"]
    ok = [(p, r) for p, r in results if r.status_code == 200]
    statuses = Counter(r.status_code for _, r in results)
    assert statuses[200] == sum(1 for p, _ in results if p[0] == "good"), statuses
    assert statuses[400] == sum(1 for p, _ in results if p[0] == "bad")
    assert statuses[404] == sum(1 for p, _ in results if p[0] == "unknown")

    # one usage record per successful response, one per rejected request, none for a 404
    recorded = Counter(u["status"] for u in usage)
    assert recorded[200] == len(ok)
    assert recorded[400] == statuses[400]
    assert recorded[404] == 0
    assert len(usage) == len(ok) + statuses[400]
    assert len({u["id"] for u in usage}) == len(usage)

    # request costs add up exactly to batch costs
    assert sum(u["cost_pusd"] for u in usage) == sum(b["cost_pusd"] for b in batches)
    assert sum(b["cost_pusd"] for b in batches) > 0
    assert sum(support.doc_of(r)["parameters"]["cost_pico_usd"] for _, r in ok) == \
        sum(b["cost_pusd"] for b in batches)

    # each response's cost, version, rows and batch are the ones its record keeps
    by_request = {u["request_id"]: u for u in usage}
    assert len(by_request) == len(usage)
    for (_kind, rid, rows, tenant, _x), reply in ok:
        doc = support.doc_of(reply)
        u = by_request[rid]
        assert u["status"] == 200
        assert u["cost_pusd"] == doc["parameters"]["cost_pico_usd"]
        assert u["model"] == "digits" and u["version"] == doc["model_version"]
        assert u["tenant"] == tenant
        assert u["items"] == rows
        assert u["batch_size"] == doc["parameters"]["batch_size"]
        assert u["batch_id"] is not None
    for (kind, rid, _rows, _tenant, _x), _reply in results:
        if kind == "bad":
            u = by_request[rid]
            assert (u["status"], u["cost_pusd"], u["batch_id"], u["tenant"]) == \
                (400, 0, None, "acme")

    # each batch: its requests and rows are the records that name it; its cost is theirs
    members = defaultdict(list)
    for u in usage:
        if u["batch_id"] is not None:
            members[u["batch_id"]].append(u)
    assert set(members) == {b["id"] for b in batches}
    for b in batches:
        mine = members[b["id"]]
        assert b["requests"] == len(mine)
        assert b["size"] == sum(u["items"] for u in mine)
        assert b["cost_pusd"] == sum(u["cost_pusd"] for u in mine)
        assert all(u["batch_size"] == b["size"] for u in mine)
        assert (b["model"], b["device"], b["pricing"], b["share"]) == \
            ("digits", "aws-c7i.large", "on_demand", 0.5)
    assert any(b["requests"] > 1 for b in batches), "no batch of more than one request formed"

    if metrics_cost_by_tenant is not None:
        ledger_by_tenant = defaultdict(int)
        for u in usage:
            ledger_by_tenant[u["tenant"]] += u["cost_pusd"]
        for tenant, pico in ledger_by_tenant.items():
            assert metrics_cost_by_tenant.get(tenant, 0.0) == pytest.approx(pico / 1e12,
                                                                            rel=1e-9)
    return usage, batches


def metrics_cost(client) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for labels, value in support.scrape(client).matching("frugalserve_cost_usd_total",
                                                         model="digits").items():
        totals[dict(labels)["tenant"]] += value
    return totals


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", support.TRANSPORTS)
def test_load_run_then_clean_shutdown_flushes_an_exact_ledger(metering_repo, artifacts,
                                                              ledger_url, transport):
    # a flush interval far longer than the test: only the shutdown can write the records
    settings = support.settings(metering_repo, ledger_url=ledger_url, flush_interval_s=3600)
    live = support.LiveServer(settings, transport=transport).start()
    try:
        t0 = time.time()
        results = load_run(live, artifacts)
        t1 = time.time()
        with live.client() as client:
            cost_by_tenant = metrics_cost(client)
        assert query(ledger_url, "SELECT count(*) FROM usage") == [(0,)]
    finally:
        live.stop()
    check_ledger(ledger_url, results, cost_by_tenant, window=(t0, t1))
    assert query(ledger_url, "SELECT count(*) FROM replicas") == [(1,)]
    assert not list(metering_repo.parent.glob("ledger-spill-*")), "records were spilled"


def test_records_are_written_while_serving(metering_repo, artifacts, ledger_url):
    settings = support.settings(metering_repo, ledger_url=ledger_url, flush_interval_s=0.05)
    with support.LiveServer(settings) as live:
        results = load_run(live, artifacts, n_good=60, n_bad=5, n_unknown=0)
        support.wait_for(
            lambda: query(ledger_url, "SELECT count(*) FROM usage") == [(65,)],
            what="the periodic flush to write every record")
        # the periodic flush wrote every record while the server was still serving
        usage_written = usage_rows(ledger_url)
        batches_written = batch_rows(ledger_url)
    usage_final = usage_rows(ledger_url)
    assert sorted(u["id"] for u in usage_written) == sorted(u["id"] for u in usage_final)
    assert sum(b["cost_pusd"] for b in batches_written) == \
        sum(u["cost_pusd"] for u in usage_written)
    check_ledger(ledger_url, results)


def test_two_servers_share_one_ledger_without_collisions(metering_repo, artifacts, ledger_url):
    """Two replicas on one database: record ids never collide, and both ledgers add up."""
    results = []
    for _ in range(2):
        settings = support.settings(metering_repo, ledger_url=ledger_url, flush_interval_s=0.1)
        with support.LiveServer(settings) as live:
            results += load_run(live, artifacts, n_good=40, n_bad=0, n_unknown=0)
    # the request ids repeat across the two runs: compare totals, not per-request rows
    usage, batches = usage_rows(ledger_url), batch_rows(ledger_url)
    assert len(usage) == 80 == len({u["id"] for u in usage})
    assert sum(u["cost_pusd"] for u in usage) == sum(b["cost_pusd"] for b in batches)
    assert sum(support.doc_of(r)["parameters"]["cost_pico_usd"] for _, r in results) == \
        sum(u["cost_pusd"] for u in usage)
    assert query(ledger_url, "SELECT count(*) FROM replicas") == [(2,)]


def test_shed_and_expired_requests_are_recorded_at_zero_cost(metering_repo, artifacts,
                                                             ledger_url):
    """gated_tiny (max_batch_size 1, queue of 1, a spot T4): a 503 and a 504 each leave a
    usage record with no cost and no batch; the served ones are priced on their device."""
    settings = support.settings(metering_repo, ledger_url=ledger_url, flush_interval_s=0.1)
    with support.LiveServer(settings) as live, live.client() as c1, live.client() as c2, \
            live.client() as c3:
        with support.hold_gate() as hold:
            held = support.in_thread(lambda: c1.post(
                "/v2/models/gated_tiny/infer",
                json=support.json_body({"input": support.sentinel_row()}, id="held")))
            hold.wait_entered(1)
            late = support.in_thread(lambda: c2.post(
                "/v2/models/gated_tiny/infer",
                json=support.json_body({"input": artifacts.X[:1]}, id="late",
                                       parameters={"timeout": 1000})))
            support.wait_for(lambda: support.queue_depth(c3, "gated_tiny") == 1,
                             what="a queued request")
            shed = c3.post("/v2/models/gated_tiny/infer",
                           json=support.json_body({"input": artifacts.X[:1]}, id="shed"))
            assert shed.status_code == 503
            time.sleep(0.05)  # past the queued request's 1 ms timeout
            support.release_gate()
            assert held().status_code == 200
            assert late().status_code == 504
        ok = c1.post("/v2/models/gated_tiny/infer",
                     json=support.json_body({"input": artifacts.X[:1]}, id="ok"))
        assert ok.status_code == 200
    usage = {u["request_id"]: u for u in usage_rows(ledger_url)}
    assert usage["shed"]["status"] == 503 and usage["late"]["status"] == 504
    for rid in ("shed", "late"):
        assert usage[rid]["cost_pusd"] == 0 and usage[rid]["batch_id"] is None
    for rid in ("held", "ok"):
        assert usage[rid]["status"] == 200 and usage[rid]["cost_pusd"] > 0
    assert usage["ok"]["cost_pusd"] == ok.json()["parameters"]["cost_pico_usd"]
    batches = batch_rows(ledger_url)
    assert {(b["device"], b["pricing"], b["share"]) for b in batches} == {("nvidia-t4", "spot",
                                                                          1.0)}
    assert sum(b["cost_pusd"] for b in batches) == sum(u["cost_pusd"] for u in usage.values())


@pytest.mark.parametrize("transport", support.TRANSPORTS)
def test_a_client_that_disconnects_while_queued_is_recorded_as_499(metering_repo, artifacts,
                                                                    ledger_url, transport):
    """The connection closes while its request waits behind a held one: the request is taken
    off the queue without running (nobody would read its answer), and its usage record says
    499 at zero cost, not 200 with a bill. Native server and ASGI app alike."""
    settings = support.settings(metering_repo, ledger_url=ledger_url, flush_interval_s=0.1)
    with support.LiveServer(settings, transport) as live:
        support.leave_while_queued(live, "gated_tiny", artifacts.X[:1])
    usage = {u["request_id"]: u for u in usage_rows(ledger_url)}
    assert usage["held"]["status"] == 200
    assert (usage["gone"]["status"], usage["gone"]["cost_pusd"], usage["gone"]["batch_id"]) \
        == (499, 0, None)
    assert [b["id"] for b in batch_rows(ledger_url)] == [usage["held"]["batch_id"]]


def test_long_request_id_and_tenant_do_not_poison_the_ledger(metering_repo, artifacts,
                                                             ledger_url):
    """A client-chosen id of 300 characters and an X-Tenant of 200: either refused up front
    (400) or recorded; in no case may they stop the other requests' records being written."""
    settings = support.settings(metering_repo, ledger_url=ledger_url, flush_interval_s=0.1)
    with support.LiveServer(settings) as live, live.client() as client:
        odd = client.post("/v2/models/digits/infer",
                          json=support.json_body({"X": artifacts.X[:1]}, id="i" * 300),
                          headers={"X-Tenant": "t" * 200})
        assert odd.status_code in (200, 400), odd.text
        for i in range(10):
            r = client.post("/v2/models/digits/infer",
                            json=support.json_body({"X": artifacts.X[i:i + 1]}, id=f"n{i}"))
            assert r.status_code == 200
    usage = usage_rows(ledger_url)
    ids = {u["request_id"] for u in usage}
    assert {f"n{i}" for i in range(10)} <= ids, "normal requests' records were lost"
    assert not list(metering_repo.parent.glob("ledger-spill-*")), "records were spilled"
    assert sum(u["cost_pusd"] for u in usage) == sum(b["cost_pusd"]
                                                     for b in batch_rows(ledger_url))


def test_rate_card_override_prices_the_batches(tmp_path, artifacts):
    """A user rate card replaces a shipped price and adds a device; batches are priced from it:
    t seconds on share s of a device at P $/h cost t·P·s/3600."""
    rates = tmp_path / "rates.yaml"
    rates.write_text(
        "devices:\n"
        "  aws-c7i.large: {on_demand_usd_per_hour: '3.6', source: test, date: '2025-07-01'}\n"
        "  onprem-box: {on_demand_usd_per_hour: '7.2', source: test, date: '2025-07-01'}\n")
    repo = tmp_path / "models"
    support.write_model(repo, "shipped", {"1": artifacts.lr_onnx},
                        {"device": {"type": "aws-c7i.large", "share": 0.5}})
    support.write_model(repo, "mine", {"1": artifacts.lr_onnx},
                        {"device": {"type": "onprem-box", "share": 0.25}})
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with support.LiveServer(support.settings(repo, ledger_url=url, rate_card=rates)) as live, \
            live.client() as c:
        for model in ("shipped", "mine"):
            for i in range(5):
                r = c.post(f"/v2/models/{model}/infer",
                           json=support.json_body({"X": artifacts.X[i:i + 1]}))
                assert r.status_code == 200, r.text
    rows = query(url, "SELECT model, device, share, compute_ms, cost_pusd FROM batches")
    assert {r[0] for r in rows} == {"shipped", "mine"}
    pico_per_second = {"aws-c7i.large": 3.6e12 / 3600, "onprem-box": 7.2e12 / 3600}
    for _model, device, share, compute_ms, cost in rows:
        expected = compute_ms / 1000 * pico_per_second[device] * share
        assert cost == pytest.approx(expected, abs=1.5), (device, compute_ms, cost)


def test_unknown_rate_card_device_in_a_config_fails_only_that_model(tmp_path, artifacts):
    repo = tmp_path / "models"
    support.write_model(repo, "priced", {"1": artifacts.lr_onnx})
    support.write_model(repo, "unpriced", {"1": artifacts.lr_onnx},
                        {"device": {"type": "quantum-box"}})
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with support.LiveServer(support.settings(repo, ledger_url=url)) as live, \
            live.client() as c:
        assert c.post("/v2/models/priced/infer",
                      json=support.json_body({"X": artifacts.X[:1]})).status_code == 200
        r = c.post("/v2/models/unpriced/infer", json=support.json_body({"X": artifacts.X[:1]}))
        assert r.status_code == 404
        assert "quantum-box" in r.json()["error"]

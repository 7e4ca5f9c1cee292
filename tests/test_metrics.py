"""Prometheus /metrics: request counters, histograms, cost by model, version and tenant."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import support

HISTOGRAMS = ("frugalserve_queue_seconds", "frugalserve_compute_seconds",
              "frugalserve_request_seconds", "frugalserve_batch_size")


def test_metrics_is_prometheus_text(http):
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    s = support.Scrape(r.text)
    assert s.families["frugalserve_requests"] == "counter"
    assert s.families["frugalserve_cost_usd"] == "counter"
    assert s.families["frugalserve_queue_depth"] == "gauge"
    for name in HISTOGRAMS:
        assert s.families[name] == "histogram"


def test_requests_and_errors_are_counted(http, artifacts):
    labels = {"model": "digits", "version": "1"}
    before = support.scrape(http)
    for i in range(7):
        r = http.post("/v2/models/digits/versions/1/infer",
                      json=support.json_body({"X": artifacts.X[i:i + 1]}))
        assert r.status_code == 200
    for _ in range(3):
        r = http.post("/v2/models/digits/versions/1/infer",
                      json=support.json_body({"X": np.zeros((1, 63), np.float32)}))
        assert r.status_code == 400
    after = support.scrape(http)
    assert after.get("frugalserve_requests_total", **labels) - \
        before.get("frugalserve_requests_total", **labels) == 7
    assert after.get("frugalserve_errors_total", status="400", **labels) - \
        before.get("frugalserve_errors_total", status="400", **labels) == 3
    for name in ("frugalserve_queue_seconds", "frugalserve_request_seconds"):
        assert after.get(f"{name}_count", **labels) - before.get(f"{name}_count", **labels) == 7
    # every histogram has cumulative buckets ending in +Inf == count
    for name in HISTOGRAMS:
        buckets = sorted(
            ((float(dict(lv)["le"]), v) for lv, v in after.matching(f"{name}_bucket",
                                                                    **labels).items()))
        assert buckets and buckets[-1][0] == float("inf")
        values = [v for _, v in buckets]
        assert values == sorted(values)
        assert values[-1] == after.get(f"{name}_count", **labels)
        assert after.get(f"{name}_sum", **labels) >= 0


def test_cost_by_model_version_and_tenant(http, artifacts):
    tenant_a, tenant_b = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    spent = {tenant_a: 0, tenant_b: 0}
    for i in range(12):
        tenant = tenant_a if i % 3 else tenant_b
        version = "1" if i % 2 else "2"
        r = http.post(f"/v2/models/digits/versions/{version}/infer",
                      json=support.json_body({"X": artifacts.X[i:i + 2]}),
                      headers={"X-Tenant": tenant})
        assert r.status_code == 200
        spent[tenant] += r.json()["parameters"]["cost_pico_usd"]
    s = support.scrape(http)
    for tenant, pico in spent.items():
        series = s.matching("frugalserve_cost_usd_total", model="digits", tenant=tenant)
        assert {dict(lv)["version"] for lv in series} == {"1", "2"}
        assert sum(series.values()) == pytest.approx(pico / 1e12, rel=1e-9)
        assert pico > 0


def test_anonymous_tenant_without_header(http, artifacts):
    before = sum(support.scrape(http).matching("frugalserve_cost_usd_total", model="skdigits",
                                               tenant="anonymous").values())
    r = http.post("/v2/models/skdigits/infer",
                  json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                    "data": artifacts.X[0].tolist()}]})
    assert r.status_code == 200
    after = sum(support.scrape(http).matching("frugalserve_cost_usd_total", model="skdigits",
                                              tenant="anonymous").values())
    assert after - before == pytest.approx(r.json()["parameters"]["cost_pico_usd"] / 1e12,
                                           rel=1e-6)


def test_batches_and_busy_time_are_counted(http, artifacts):
    labels = {"model": "digits", "version": "2"}
    before = support.scrape(http)
    r = http.post("/v2/models/digits/infer", json=support.json_body({"X": artifacts.X[:5]}))
    assert r.status_code == 200
    after = support.scrape(http)
    assert after.get("frugalserve_batches_total", **labels) > \
        before.get("frugalserve_batches_total", **labels)
    assert after.get("frugalserve_busy_seconds_total", **labels) > \
        before.get("frugalserve_busy_seconds_total", **labels)
    assert after.get("frugalserve_batch_size_sum", **labels) - \
        before.get("frugalserve_batch_size_sum", **labels) >= 5


def test_requests_for_unknown_models_are_counted_without_their_names(http, artifacts):
    labels = {"model": "", "version": "", "status": "404"}
    before = support.scrape(http).get("frugalserve_errors_total", **labels)
    body = support.json_body({"X": artifacts.X[:1]})
    for name in ("no-such-model", f"random-{uuid.uuid4().hex}"):
        assert http.post(f"/v2/models/{name}/infer", json=body).status_code == 404
    assert http.post("/v2/models/digits/versions/99/infer", json=body).status_code == 404
    after = support.scrape(http)
    assert after.get("frugalserve_errors_total", **labels) - before == 3
    assert not after.matching("frugalserve_errors_total", model="no-such-model")

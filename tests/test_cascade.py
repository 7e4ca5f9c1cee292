"""Cascades through the server: rows below a stage's threshold, and only those, go to the next
stage; a request's cost is the sum of the stages its rows passed; tiers pick routes; the
ledger records the variant path. Plan files that fail validation name the file and the fault.

The two variants are exact by construction: "cheap" answers probabilities = x, the reference
answers 1 - x, so a row's confidence at the first stage is max(x) and which stage answered it
shows in the values.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import joblib
import numpy as np
import onnx
import pytest
import support
import yaml
from ledger_support import rows as query
from onnx import TensorProto, helper

from frugalserve.economics.keys import create_key
from frugalserve.economics.ledger import open_engine
from frugalserve.repository import ModelRepository, RepositoryError
from frugalserve.repository.config import ConfigError
from frugalserve.repository.plan import Plan, load_plan

THRESHOLD = 0.8
CONFIG = {"batching": {"max_batch_size": 32, "max_queue_delay_ms": 2},
          "device": {"type": "aws-c7i.large", "share": 0.5}}
PLAN = {
    "version": "1",
    "default_tier": "standard",
    "tiers": {
        "premium": {"stages": [{"variant": "reference"}]},
        "standard": {"stages": [{"variant": "cheap", "threshold": THRESHOLD},
                                {"variant": "reference"}]},
        "economy": {"stages": [{"variant": "cheap"}]},
    },
}


def two_class_model(reference: bool) -> bytes:
    """probabilities = 1 - x (reference) or x (cheap); label = argmax."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 2])
    p = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, [None])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = ([helper.make_node("Sub", ["one", "X"], ["probabilities"])] if reference
             else [helper.make_node("Identity", ["X"], ["probabilities"])])
    nodes.append(helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0))
    graph = helper.make_graph(nodes, "cascade-test", [x], [p, label],
                              initializer=[one] if reference else [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def cascade_repo(root: Path, plan: dict | str | bytes | None = PLAN) -> Path:
    repo = root / "models"
    support.write_model(repo, "pair", {"1": two_class_model(reference=True)}, CONFIG)
    variant = repo / "pair" / "1" / "variants" / "cheap"
    variant.mkdir(parents=True)
    (variant / "model.onnx").write_bytes(two_class_model(reference=False))
    if plan is not None:
        raw = plan if isinstance(plan, bytes) else (
            plan if isinstance(plan, str) else yaml.safe_dump(plan)).encode()
        (repo / "pair" / "plan.yaml").write_bytes(raw)
    return repo


def rows_with_confidence(confidence: list[float]) -> np.ndarray:
    """Two-class rows whose max is the given confidence (class 0 or 1 alternately)."""
    x = np.empty((len(confidence), 2), np.float32)
    for i, c in enumerate(confidence):
        x[i] = (c, 1 - c) if i % 2 else (1 - c, c)
    return x


@pytest.fixture
def served(tmp_path, ledger_url):
    repo = cascade_repo(tmp_path)
    with support.LiveServer(support.settings(repo, ledger_url=ledger_url)) as server:
        yield server


def test_only_rows_below_the_threshold_reach_the_next_stage(served, ledger_url):
    rng = np.random.default_rng(0)
    confidence = np.round(rng.uniform(0.5, 1.0, 200), 3).astype(np.float32).tolist()
    confidence[:4] = [THRESHOLD, np.nextafter(np.float32(THRESHOLD), np.float32(0)), 1.0, 0.5]
    x = rows_with_confidence(confidence)
    # requests of 1 to 4 rows, sent concurrently so that stages batch across requests
    sizes, start, requests = [], 0, []
    while start < len(x):
        n = min(1 + start % 4, len(x) - start)
        requests.append(support.Req("POST", "/v2/models/pair/infer",
                                    json=support.json_body({"X": x[start:start + n]},
                                                           id=f"r{start}")))
        sizes.append((start, n))
        start += n
    replies = support.run_concurrently(served.url, requests, max_connections=32)
    escalated_rows = 0
    costs = {}
    for (start, n), reply in zip(sizes, replies, strict=True):
        assert reply.status_code == 200, reply.text
        doc, outputs = support.decode_response(reply)
        rows = x[start:start + n]
        sure = rows.max(axis=1) >= THRESHOLD
        expected = np.where(sure[:, None], rows, 1 - rows)
        np.testing.assert_array_equal(outputs["probabilities"], expected)
        np.testing.assert_array_equal(outputs["label"], expected.argmax(axis=1))
        escalated_rows += int((~sure).sum())
        costs[doc["id"]] = doc["parameters"]["cost_pico_usd"]
        assert doc["parameters"]["variant"] == ("cheap" if sure.all() else "cheap>reference")
    assert 0 < escalated_rows < len(x)
    scrape = support.scrape(served.client())
    assert scrape.get("frugalserve_cascade_escalated_rows_total", model="pair", version="1",
                      variant="cheap") == escalated_rows
    served.stop()

    # each batch's cost is split over the rows that rode in it; a request pays every stage
    batches = query(ledger_url, "SELECT variant, size, cost_pusd FROM batches")
    assert sum(size for v, size, _ in batches if v == "cheap") == len(x)
    assert sum(size for v, size, _ in batches if v == "reference") == escalated_rows
    usage = query(ledger_url, "SELECT request_id, variant, cost_pusd, status FROM usage")
    assert len(usage) == len(requests)
    assert {r[0]: int(r[2]) for r in usage} == costs
    assert sum(int(r[2]) for r in usage) == sum(int(b[2]) for b in batches)
    paths = defaultdict(int)
    for _rid, variant, _cost, status in usage:
        assert status == 200
        paths[variant] += 1
    assert set(paths) == {"cheap", "cheap>reference"}
    rolled = query(ledger_url, "SELECT variant, sum(requests) FROM usage_rollup GROUP BY variant")
    assert dict((v, int(n)) for v, n in rolled) == dict(paths)


def test_a_request_pays_the_sum_of_the_stages_it_passed(served):
    with served.client() as client:
        sure = client.post("/v2/models/pair/infer",
                           json=support.json_body({"X": rows_with_confidence([0.95])})).json()
        unsure = client.post("/v2/models/pair/infer",
                             json=support.json_body({"X": rows_with_confidence([0.6])})).json()
    assert sure["parameters"]["variant"] == "cheap"
    assert unsure["parameters"]["variant"] == "cheap>reference"
    # the escalated request ran two batches: its compute time and cost cover both
    assert unsure["parameters"]["cost_pico_usd"] > 0
    assert unsure["parameters"]["compute_ms"] > 0
    assert unsure["outputs"][0]["name"] in ("probabilities", "label")


def test_key_tiers_select_routes(tmp_path, ledger_url):
    engine = open_engine(ledger_url)
    keys = {tier: create_key(engine, f"t-{tier}", tier)[1]
            for tier in ("premium", "standard", "economy", "free")}
    engine.dispose()
    repo = cascade_repo(tmp_path)
    x = rows_with_confidence([0.6])  # below the threshold: the standard route escalates it
    expected = {"premium": ("reference", 1 - x), "standard": ("cheap>reference", 1 - x),
                "economy": ("cheap", x), "free": ("cheap>reference", 1 - x)}  # free: default
    with support.LiveServer(support.settings(repo, ledger_url=ledger_url,
                                             trust_tenant_header=False)) as server:
        with server.client() as client:
            for tier, (variant, probabilities) in expected.items():
                r = client.post("/v2/models/pair/infer", json=support.json_body({"X": x}),
                                headers={"Authorization": f"Bearer {keys[tier]}"})
                assert r.status_code == 200, r.text
                doc, outputs = support.decode_response(r)
                assert doc["parameters"]["variant"] == variant, tier
                np.testing.assert_array_equal(outputs["probabilities"], probabilities)


def test_a_model_without_a_plan_reports_the_reference_variant(tmp_path, ledger_url):
    repo = cascade_repo(tmp_path, plan=None)
    with support.LiveServer(support.settings(repo, ledger_url=ledger_url)) as server:
        with server.client() as client:
            doc = client.post("/v2/models/pair/infer",
                              json=support.json_body({"X": rows_with_confidence([0.6])})).json()
    assert doc["parameters"]["variant"] == "reference"
    assert query(ledger_url, "SELECT variant FROM batches") == [("reference",)]


# -- plan files that fail validation -----------------------------------------------------------


def _with(**changes) -> dict:
    return {**PLAN, **changes}


BAD_PLANS = [
    ("tiers: [1, 2]", "tiers must be a non-empty mapping"),
    (_with(tiers={}), "tiers must be a non-empty mapping"),
    (_with(default_tier="gold"), "default_tier 'gold' is not one of the tiers"),
    (_with(tiers={"standard": {"stages": [{"variant": "cheap"}, {"variant": "reference"}]}}),
     "every stage but the last needs a threshold"),
    (_with(tiers={"standard": {"stages": [{"variant": "cheap", "threshold": 1.5},
                                   {"variant": "reference"}]}}), "threshold must be in [0, 1]"),
    (_with(tiers={"standard": {"stages": [{"variant": "reference", "threshold": 0.5}]}}),
     "the last stage answers every row"),
    (_with(tiers={"standard": {"stages": [{"variant": "../x"}]}}), "is not a variant name"),
    (_with(tiers={"standard": {"stages": [{"variant": "cheap", "threshold": 0.5},
                                   {"variant": "cheap"}]}}), "appears twice"),
    (_with(speed="fast"), "unknown key(s) speed"),
    (_with(tiers={"standard": {"stages": [{"variant": "cheap", "threshold": 0.5},
                                          {"variant": "reference"}]},
                  "odd": {"stages": [{"variant": "reference", "threshold": 0.5},
                                     {"variant": "cheap"}]}}),
     "cascades must agree on the order of their variants"),
    (_with(budget_downgrade={"spent_fraction": 0.8, "tier": "gold"}),
     "budget_downgrade.tier 'gold'"),
    ("tiers: {s: {stages: [{variant: cheap, threshold: 0.5}", "not valid YAML"),
    (b"tiers: {standard: {stages: [{variant: caf\xe9}]}}", "not UTF-8"),
]


@pytest.mark.parametrize(("plan", "message"), BAD_PLANS)
def test_plan_files_that_fail_validation_name_the_file(tmp_path, plan, message):
    repo = cascade_repo(tmp_path, plan)
    with pytest.raises(ConfigError) as info:
        load_plan(repo / "pair" / "plan.yaml")
    assert str(info.value).startswith(str(repo / "pair" / "plan.yaml"))
    assert message in str(info.value)
    with pytest.raises(RepositoryError, match="plan.yaml"):
        ModelRepository(repo).load("pair")


@pytest.mark.parametrize(("plan", "message"), [
    (_with(tiers={"standard": {"stages": [{"variant": "missing"}]}}),
     "variant 'missing' has no folder"),
    (_with(version="7"), "version '7' is not in the repository"),
    (_with(confidence_output="label"), "confidence_output 'label' must be a floating-point"),
])
def test_plans_naming_what_the_repository_lacks_fail_to_load(tmp_path, plan, message):
    repo = cascade_repo(tmp_path, plan)
    with pytest.raises(RepositoryError, match="plan.yaml") as info:
        ModelRepository(repo).load("pair")
    assert message in str(info.value)


def test_a_variant_whose_signature_differs_is_refused(tmp_path):
    repo = cascade_repo(tmp_path)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 3])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["X"], ["probabilities"])], "g",
                              [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (repo / "pair" / "1" / "variants" / "cheap" / "model.onnx").write_bytes(
        model.SerializeToString())
    with pytest.raises(RepositoryError, match="variant 'cheap' does not match the reference"):
        ModelRepository(repo).load("pair")


def test_plan_parse_defaults_and_variants():
    plan = Plan.parse({"tiers": {"only": {"stages": [{"variant": "a", "threshold": 0.5},
                                                       {"variant": "reference"}]}}})
    assert plan.default_tier == "only" and plan.version is None
    assert plan.variants == ["a", "reference"]


def test_a_tenant_past_the_plans_budget_share_gets_the_downgrade_tier(tmp_path, ledger_url):
    plan = _with(budget_downgrade={"spent_fraction": 0.5, "tier": "economy"})
    repo = cascade_repo(tmp_path, plan)
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text(yaml.safe_dump({"budgets": [
        {"scope": "tenant", "target": "acme", "period": "total", "amount_usd": 4e-8,
         "thresholds": ["1000:reject"]}]}))
    x = rows_with_confidence([0.6])
    seen = []
    with support.LiveServer(support.settings(repo, ledger_url=ledger_url,
                                             budgets_file=budgets)) as server:
        with server.client() as client:
            while seen.count("cheap") < 5 and len(seen) < 500:
                r = client.post("/v2/models/pair/infer", json=support.json_body({"X": x}),
                                headers={"X-Tenant": "acme"})
                assert r.status_code == 200, r.text
                seen.append(r.json()["parameters"]["variant"])
            other = client.post("/v2/models/pair/infer", json=support.json_body({"X": x}),
                                headers={"X-Tenant": "globex"}).json()
    # acme's first requests take the standard cascade; past half its budget, the economy tier
    first = seen.index("cheap")
    assert first > 0 and set(seen[:first]) == {"cheap>reference"}
    assert set(seen[first:]) == {"cheap"}
    assert other["parameters"]["variant"] == "cheap>reference"  # other tenants: no budget


def test_replay_reads_accuracy_and_metered_cost_and_the_naive_copy_batches_by_one(
        tmp_path, ledger_url):
    from frugalserve.replay import naive_repository, request_bodies, serve_and_replay

    repo = cascade_repo(tmp_path)
    x = rows_with_confidence([0.95, 0.6, 0.9, 0.55, 0.99, 0.7])
    cheap, reference = x.argmax(axis=1), (1 - x).argmax(axis=1)
    labels = np.where(x.max(axis=1) >= THRESHOLD, cheap, reference)
    labels[0] = 1 - labels[0]  # one wrong answer: accuracy 5/6
    bodies = request_bodies("X", x)
    planned, metered = serve_and_replay(repo, "pair", bodies, labels, ledger_url, label="plan",
                                        concurrency=2)
    assert planned.ok == len(x) and planned.accuracy == pytest.approx(5 / 6)
    assert planned.cost_pusd == metered > 0
    assert planned.variants == {"cheap": 3, "cheap>reference": 3}

    naive = naive_repository(repo, "pair", tmp_path / "naive")
    assert not (naive / "pair" / "plan.yaml").exists()
    assert not (naive / "pair" / "1" / "variants").exists()
    config = yaml.safe_load((naive / "pair" / "config.yaml").read_text())
    assert config["batching"]["max_batch_size"] == 1
    alone, metered = serve_and_replay(naive, "pair", bodies, reference, ledger_url,
                                      label="naive", concurrency=2)
    assert alone.variants == {"reference": len(x)} and alone.accuracy == 1.0
    assert alone.cost_pusd == metered > 0


def test_a_flow_whose_client_left_while_queued_is_dropped_unrun(tmp_path, artifacts, ledger_url):
    """A cascade request waits at its first stage behind a held batch; its connection closes.
    Its rows are taken off the queue without running (nobody would read them): the request is
    recorded as 499 at zero cost, and only the held request's stages ran."""
    repo = tmp_path / "models"
    support.write_model(repo, "pair", {"1": artifacts.lr}, {
        "batching": {"max_batch_size": 1, "max_queue_delay_ms": 0, "max_queue_size": 8},
        "device": {"type": "aws-c7i.large", "share": 0.5}})
    cheap = repo / "pair" / "1" / "variants" / "cheap"
    cheap.mkdir(parents=True)
    joblib.dump(artifacts.gated, cheap / "model.joblib")  # the first stage can be held
    (repo / "pair" / "plan.yaml").write_text(yaml.safe_dump({
        "version": "1", "default_tier": "standard",
        "tiers": {"standard": {"stages": [{"variant": "cheap", "threshold": 0.5},
                                          {"variant": "reference"}]}}}))
    settings = support.settings(repo, ledger_url=ledger_url, flush_interval_s=0.1)
    with support.LiveServer(settings) as live:
        support.leave_while_queued(live, "pair", artifacts.X[:1])
    usage = {r[0]: r[1:] for r in query(
        ledger_url, "SELECT request_id, status, cost_pusd, batch_id, variant FROM usage")}
    assert usage["gone"][:3] == (499, 0, None) and usage["gone"][3] == "cheap"
    assert usage["held"][0] == 200 and usage["held"][1] > 0
    # every batch is one of the held request's stages: none ran the request that left
    stages = [(variant, 1) for variant in usage["held"][3].split(">")]
    assert query(ledger_url, "SELECT variant, size FROM batches ORDER BY id") == stages

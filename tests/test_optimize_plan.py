"""Plan search on hand-made profiles: the known cheapest plan, the Pareto frontier, the p99
filter, the levers, the meter's arithmetic, and a plan.yaml the repository accepts."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pytest
import yaml

from frugalserve.economics.meter import PICO_PER_USD, Meter
from frugalserve.optimize.plan_search import (
    Batching,
    Price,
    Targets,
    VariantStats,
    chains,
    evaluate_option,
    pareto,
    plan_document,
    search,
)
from frugalserve.repository.plan import load_plan

N = 1000
PRICE = Price(Decimal("0.36"), 0.5, "test-cpu", "on_demand")  # 5e7 pico-dollars per second


def _variants() -> list[VariantStats]:
    """reference: right on items 0..899. fast: right on 0..799 with confidence 0.9, wrong on the
    rest with 0.3, and 8x cheaper. slow-copy: as accurate as the reference and dearer."""
    ref_ok = np.arange(N) < 900
    fast_ok = np.arange(N) < 800
    fast_conf = np.where(fast_ok, 0.9, 0.3).astype(np.float32)
    ref_conf = np.full(N, 0.8, dtype=np.float32)
    reference = VariantStats("reference", 0.9, {1: 1.0, 8: 2.0, 64: 8.0},
                             {1: 1.5, 8: 3.0, 64: 12.0}, ref_ok, ref_conf)
    fast = VariantStats("fast", 0.8, {1: 0.5, 8: 0.6, 64: 1.0}, {1: 0.7, 8: 0.9, 64: 1.5},
                        fast_ok, fast_conf)
    slow = VariantStats("slow-copy", 0.9, {1: 2.0, 8: 4.0, 64: 16.0},
                        {1: 3.0, 8: 6.0, 64: 24.0}, ref_ok, ref_conf)
    return [reference, fast, slow]


def _per_1m(ms: float, batch: int) -> float:
    """What the server's meter charges for 1M items riding batches of `batch` that take `ms`."""
    return Meter(PRICE.usd_per_hour, PRICE.share).cost(ms / 1000) / batch * 1e6 / PICO_PER_USD


def _ref_at(rows: float) -> tuple[float, float]:
    """The reference's mean and p99 ms at a fractional batch size, interpolated."""
    return (float(np.interp(rows, [1, 8, 64], [1.0, 2.0, 8.0])),
            float(np.interp(rows, [1, 8, 64], [1.5, 3.0, 12.0])))


def test_cost_per_1m_is_the_meters_arithmetic():
    assert PRICE.usd_per_1m(8.0, 64) == pytest.approx(_per_1m(8.0, 64))
    assert PRICE.usd_per_1m(8.0, 64) == pytest.approx(0.00625)  # 0.125 ms x 5e7 pico/s


def test_the_known_cheapest_plan_is_chosen():
    result = search(_variants(), PRICE, Targets(0.0, 50.0), delays_ms=(1.0, 5.0))
    chosen = result.chosen
    assert chosen.stages == ("fast", "reference")
    assert chosen.thresholds == (pytest.approx(0.9),)
    assert chosen.batching == Batching(64, 1.0)  # the shorter delay: same cost, lower p99
    assert chosen.accuracy == pytest.approx(0.9) and chosen.reach == (1.0, pytest.approx(0.2))
    # the reference stage runs the escalated 20% of each batch: 12.8 rows
    assert chosen.batch_rows == (64.0, pytest.approx(12.8))
    assert chosen.cost_per_1m_usd == pytest.approx(
        _per_1m(1.0, 64) + 0.2 * PRICE.usd_per_1m(_ref_at(12.8)[0], 12.8))
    # 80% answered at stage 1 < 99%: the tail is the escalated path through both batchers
    assert chosen.p99_ms == pytest.approx(1.0 + 1.5 + 1.0 + _ref_at(12.8)[1])
    assert result.counterfactual.stages == ("reference",)
    assert result.counterfactual.batching == Batching(1, 0.0)
    assert result.counterfactual.cost_per_1m_usd == pytest.approx(_per_1m(1.0, 1))
    # no plan meeting the targets is cheaper
    ok = [p for p in result.plans if p.accuracy >= 0.9 - 1e-9 and p.p99_ms <= 50]
    assert min(p.cost_per_1m_usd for p in ok) == pytest.approx(chosen.cost_per_1m_usd)


def test_tiers_share_the_chosen_batching():
    result = search(_variants(), PRICE, Targets(0.0, 50.0), delays_ms=(1.0, 5.0))
    tiers = result.tiers
    assert tiers["standard"] == result.chosen
    assert tiers["premium"].stages == ("reference",)
    assert tiers["economy"].stages == ("fast",)  # cheapest within p99, accuracy aside
    assert {t.batching for t in tiers.values()} == {Batching(64, 1.0)}


def test_the_p99_target_rules_out_slow_batches():
    result = search(_variants(), PRICE, Targets(0.0, 6.0), delays_ms=(1.0, 5.0))
    chosen = result.chosen
    assert chosen.p99_ms <= 6.0
    assert chosen.stages == ("fast", "reference") and chosen.batching == Batching(8, 1.0)
    assert chosen.p99_ms == pytest.approx(1.0 + 0.9 + 1.0 + _ref_at(1.6)[1])
    cheaper = [p for p in result.plans if p.cost_per_1m_usd < chosen.cost_per_1m_usd
               and p.accuracy >= 0.9 - 1e-9]
    assert cheaper and all(p.p99_ms > 6.0 for p in cheaper)


def test_no_plan_when_the_p99_target_is_out_of_reach():
    result = search(_variants(), PRICE, Targets(0.0, 0.1))
    assert result.chosen is None and not result.tiers and not result.levers
    with pytest.raises(ValueError, match="no plan"):
        plan_document(result, "1")


def test_an_accuracy_drop_lets_the_cheap_variant_answer_more():
    strict = search(_variants(), PRICE, Targets(0.0, 50.0)).chosen
    loose = search(_variants(), PRICE, Targets(0.12, 50.0)).chosen
    assert loose.cost_per_1m_usd < strict.cost_per_1m_usd
    assert loose.accuracy >= 0.9 - 0.12 - 1e-9
    assert loose.stages == ("fast",)  # 0.8 is within 12 points: no cascade needed


def test_the_safety_margin_rules_out_a_lucky_variant():
    """`lucky` is 0.1 points below the reference on validation, but it disagrees with it on 101
    rows: the paired drop's standard error is ~1 point, so with a margin it is not trusted."""
    ref_ok = np.arange(N) < 900
    lucky_ok = ref_ok.copy()
    lucky_ok[:51] = False  # 51 rows the reference gets right
    lucky_ok[900:950] = True  # 50 rows it gets wrong
    lucky = VariantStats("lucky", float(lucky_ok.mean()), {1: 0.1, 8: 0.1, 64: 0.2},
                         {1: 0.2, 8: 0.2, 64: 0.3}, lucky_ok, None)
    variants = [*_variants(), lucky]
    trusting = search(variants, PRICE, Targets(0.005, 50.0, margin_z=0.0)).chosen
    assert trusting.stages == ("lucky",) and trusting.drop_bound == pytest.approx(0.001)
    careful = search(variants, PRICE, Targets(0.005, 50.0, margin_z=1.0)).chosen
    assert careful.stages == ("fast", "reference") and careful.drop_bound <= 0.005
    d = ref_ok.astype(int) - lucky_ok.astype(int)
    bound = d.mean() + d.std() / np.sqrt(N)
    assert [p.drop_bound for p in search(variants, PRICE, Targets(0.005, 50.0)).plans
            if p.stages == ("lucky",)][0] == pytest.approx(bound)


def _dominates(a, b) -> bool:
    no_worse = (a.accuracy >= b.accuracy and a.cost_per_1m_usd <= b.cost_per_1m_usd
                and a.p99_ms <= b.p99_ms)
    better = (a.accuracy > b.accuracy or a.cost_per_1m_usd < b.cost_per_1m_usd
              or a.p99_ms < b.p99_ms)
    return no_worse and better


def test_the_frontier_is_exactly_the_undominated_plans():
    result = search(_variants(), PRICE, Targets(0.05, 50.0))
    front = result.frontier
    assert front == pareto(result.plans)
    assert [p.cost_per_1m_usd for p in front] == sorted(p.cost_per_1m_usd for p in front)
    for p in front:
        assert not any(_dominates(q, p) for q in result.plans)
    keys = {p.key() for p in front}
    for p in result.plans:
        if p.key() not in keys:  # off the frontier: something on it is at least as good
            assert any(_dominates(q, p) or (q.accuracy, q.cost_per_1m_usd, q.p99_ms)
                       == (p.accuracy, p.cost_per_1m_usd, p.p99_ms) for q in front)
    assert not any(p.stages == ("slow-copy",) for p in front)  # the reference beats it


def test_the_levers_add_up_to_the_saving():
    result = search(_variants(), PRICE, Targets(0.0, 50.0), delays_ms=(1.0,))
    levers = {lv.name: lv for lv in result.levers}
    assert list(levers) == ["batching", "variant", "cascade"]
    total = result.counterfactual.cost_per_1m_usd - result.chosen.cost_per_1m_usd
    assert sum(lv.usd_per_1m for lv in levers.values()) == pytest.approx(total)
    assert sum(lv.share for lv in levers.values()) == pytest.approx(1.0)
    assert levers["batching"].usd_per_1m == pytest.approx(_per_1m(1.0, 1) - _per_1m(8.0, 64))
    assert levers["variant"].usd_per_1m == pytest.approx(0.0)  # no single variant is cheaper
    assert levers["cascade"].usd_per_1m == pytest.approx(
        _per_1m(8.0, 64) - _per_1m(1.0, 64) - 0.2 * PRICE.usd_per_1m(_ref_at(12.8)[0], 12.8))
    assert result.saving_factor == pytest.approx(
        result.counterfactual.cost_per_1m_usd / result.chosen.cost_per_1m_usd)


def test_a_last_stage_may_be_a_little_less_accurate_than_the_reference():
    """A cheap copy 0.2 points below the reference ends chains when the search calibrates for
    drops that large, never when it calibrates for none."""
    reference, fast, _slow = _variants()
    near = VariantStats("int8", 0.898, {1: 0.6, 8: 1.2, 64: 5.0}, {1: 0.9, 8: 1.8, 64: 7.0},
                        reference.correct, reference.confidence)
    costs = {"fast": 1.0, "int8": 5.0, "reference": 8.0}
    ends = {c[-1].name for c in chains([reference, fast, near], costs, reference, 0.005)}
    assert ends == {"int8", "reference"}
    ends = {c[-1].name for c in chains([reference, fast, near], costs, reference, 0.0)}
    assert ends == {"reference"}


def test_few_escalations_stay_out_of_the_p99():
    fast, ref = _variants()[1], _variants()[0]
    batching = Batching(8, 2.0)
    rare = evaluate_option((fast, ref), (0.5,), 0.9, (1.0, 0.005), batching, PRICE)
    assert rare.p99_ms == pytest.approx(2.0 + 0.9)  # 99.5% answered by stage 1
    common = evaluate_option((fast, ref), (0.5,), 0.9, (1.0, 0.02), batching, PRICE)
    # 2% of a batch of 8 escalate: the reference runs them as batches of one
    assert common.batch_rows == (8.0, 1.0)
    assert common.p99_ms == pytest.approx(2.0 + 0.9 + 2.0 + 1.5)


def test_an_arrival_rate_sizes_each_stages_batches():
    fast, ref = _variants()[1], _variants()[0]
    option = evaluate_option((fast, ref), (0.5,), 0.9, (1.0, 0.2), Batching(64, 10.0), PRICE,
                             rate=1000.0)
    # 1000 items/s fill 1 + 10 rows in the 10 ms delay; stage 2 sees 200/s: 1 + 2 rows
    assert option.batch_rows == (pytest.approx(11.0), pytest.approx(3.0))
    fast_ms = np.interp(11.0, [1, 8, 64], [0.5, 0.6, 1.0])
    ref_ms = np.interp(3.0, [1, 8, 64], [1.0, 2.0, 8.0])
    assert option.cost_per_1m_usd == pytest.approx(
        PRICE.usd_per_1m(fast_ms, 11.0) + 0.2 * PRICE.usd_per_1m(ref_ms, 3.0))
    # a full batch before the delay ends: the wait is the time to fill it
    busy = evaluate_option((ref,), (), 0.9, (1.0,), Batching(8, 10.0), PRICE, rate=2000.0)
    assert busy.batch_rows == (8.0,)
    assert busy.p99_ms == pytest.approx(7 / 2000 * 1000 + 3.0)
    # more than one instance can compute: not a plan for this replica
    assert evaluate_option((ref,), (), 0.9, (1.0,), Batching(1, 0.0), PRICE, rate=5000) is None


def test_plan_yaml_validates_and_carries_the_estimate(tmp_path):
    result = search(_variants(), PRICE, Targets(0.005, 50.0))
    tests = {tier: (0.89, (1.0, 0.21)) if o.is_cascade else (0.9, (1.0,))
             for tier, o in result.tiers.items()}
    doc = plan_document(result, "3", tests=tests, extra={"data": "synthetic"})
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    plan = load_plan(path)
    assert plan.version == "3" and plan.default_tier == "standard"
    assert set(plan.tiers) == {"premium", "standard", "economy"}
    standard = plan.tiers["standard"]
    assert [s.variant for s in standard] == list(result.chosen.stages)
    assert [s.threshold for s in standard[:-1]] == list(result.chosen.thresholds)
    assert standard[-1].threshold is None
    assert plan.batching.max_batch_size == result.chosen.batching.max_batch_size
    assert plan.batching.max_queue_delay_ms == result.chosen.batching.max_queue_delay_ms
    est = plan.estimate
    assert est["tiers"]["standard"]["cost_per_1m_usd"] == pytest.approx(
        result.chosen.cost_per_1m_usd, rel=1e-5)
    assert est["tiers"]["standard"]["test_accuracy"] == 0.89
    assert [lv["lever"] for lv in est["levers"]] == ["batching", "variant", "cascade"]
    assert est["data"] == "synthetic" and est["targets"]["max_accuracy_drop_pp"] == 0.5
    assert est["targets"]["margin_z"] == 1.0
    assert est["tiers"]["standard"]["drop_bound_pp"] <= 0.5

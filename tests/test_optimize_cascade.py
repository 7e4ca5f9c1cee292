"""Cascade threshold calibration on synthetic scores whose best thresholds are known."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from frugalserve.optimize.cascade import calibrate, drop_bound, evaluate, routed_correct


def _uniform(n: int, seed: int) -> np.ndarray:
    """n distinct confidences in (0, 1), shuffled."""
    return np.random.default_rng(seed).permutation((np.arange(n) + 0.5) / n).astype(np.float32)


def test_two_stages_escalate_exactly_the_items_the_cheap_stage_gets_wrong():
    # stage 1 is right exactly when its confidence is >= 0.7; stage 2 is always right
    n = 1000
    conf = _uniform(n, 0)
    ok1 = conf >= 0.7
    ok2 = np.ones(n, dtype=bool)
    cal = calibrate([ok1, ok2], [conf, None], [1.0, 10.0], min_accuracy=1.0)
    assert cal is not None
    assert cal.thresholds == (pytest.approx(float(conf[ok1].min())),)
    assert cal.accuracy == 1.0
    assert cal.reach == (1.0, pytest.approx(0.7))  # the 700 items below 0.7 go on
    assert cal.escalated == (pytest.approx(0.7),)
    assert cal.expected_cost == pytest.approx(1.0 + 10.0 * 0.7)


def test_two_stages_spend_the_allowed_drop_on_the_most_confident_mistakes():
    n = 1000
    conf = _uniform(n, 1)
    ok1 = conf >= 0.7
    ok2 = np.ones(n, dtype=bool)
    # 2 points may be lost: stage 1 keeps the 20 most confident of its wrong answers
    cal = calibrate([ok1, ok2], [conf, None], [1.0, 10.0], min_accuracy=0.98)
    wrong_kept = np.sort(conf[~ok1])[-20:]
    assert cal.thresholds == (pytest.approx(float(wrong_kept.min())),)
    assert cal.accuracy == pytest.approx(0.98)
    assert cal.reach[1] == pytest.approx(0.68)
    # one more would be too many: 0.98 is the floor, not a rounding of it
    tighter = calibrate([ok1, ok2], [conf, None], [1.0, 10.0], min_accuracy=0.9801)
    assert tighter.accuracy == pytest.approx(0.981)


def test_thresholds_reproduce_the_validation_routing():
    """The server escalates when confidence < threshold: the thresholds returned give back the
    calibrated accuracy and reach, ties included."""
    rng = np.random.default_rng(2)
    n = 2000
    conf = rng.integers(0, 50, n).astype(np.float32) / 50  # many ties
    ok1 = rng.random(n) < conf
    ok2 = rng.random(n) < 0.95
    cal = calibrate([ok1, ok2], [conf, None], [1.0, 4.0], min_accuracy=0.9)
    accuracy, reach = evaluate([ok1, ok2], [conf, None], cal.thresholds)
    assert (accuracy, reach) == (cal.accuracy, cal.reach)
    assert cal.accuracy >= 0.9
    escalated = conf < cal.thresholds[0]
    assert reach[1] == pytest.approx(escalated.mean())
    assert cal.thresholds[0] in set(conf.tolist())  # a confidence seen on validation


@pytest.mark.parametrize("stages", [2, 3])
def test_nan_confidences_route_as_the_server_routes_them(stages):
    """The server escalates a row when confidence < threshold, which NaN never is (an fp16
    variant's softmax can overflow to NaN): such a row is answered where it is, and the
    calibration must count it so. Checked against brute force under the server's rule."""
    rng = np.random.default_rng(15)
    n = 400
    conf = [rng.random(n).round(2).astype(np.float32) for _ in range(stages - 1)]
    for c in conf:
        c[rng.choice(n, 20, replace=False)] = np.nan
    ok = [rng.random(n) < np.nan_to_num(c, nan=0.3) for c in conf] + [rng.random(n) < 0.97]
    costs = (1.0, 4.0, 12.0)[-stages:]
    floor = 0.88
    cal = calibrate(ok, [*conf, None], costs, floor)
    best = None
    for ts in itertools.product(*(np.unique(c[~np.isnan(c)]) for c in conf)):
        pending, right, cost = np.ones(n, bool), np.zeros(n, bool), 0.0
        for k, ok_k in enumerate(ok):
            cost += costs[k] * pending.mean()
            here = pending & ~(conf[k] < ts[k]) if k < len(conf) else pending
            right |= here & ok_k
            pending &= ~here
        if right.mean() >= floor - 1e-12 and (best is None or cost < best):
            best = cost
    assert cal.expected_cost == pytest.approx(best)
    assert all(np.isfinite(t) for t in cal.thresholds)
    low = conf[0] < cal.thresholds[0]  # what the server sends on from stage 1
    assert cal.reach[1] == pytest.approx(low.mean())
    if stages == 2:
        assert cal.accuracy == pytest.approx(np.where(low, ok[1], ok[0]).mean())
    assert evaluate(ok, [*conf, None], cal.thresholds) == (cal.accuracy, cal.reach)


def _brute_force_two(ok1, conf, ok2, costs, floor):
    best = None
    for t in np.unique(conf):
        acc, reach = evaluate([ok1, ok2], [conf, None], (float(t),))
        cost = costs[0] + costs[1] * reach[1]
        if acc >= floor - 1e-12 and (best is None or cost < best):
            best = cost
    return best


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_two_stages_are_exact(seed):
    rng = np.random.default_rng(seed)
    n = 400
    conf = rng.random(n).round(2)
    ok1 = rng.random(n) < conf
    ok2 = rng.random(n) < 0.9
    floor = 0.8
    cal = calibrate([ok1, ok2], [conf, None], [1.0, 5.0], floor)
    assert cal.expected_cost == pytest.approx(_brute_force_two(ok1, conf, ok2, (1, 5), floor))


def test_three_stages_find_the_known_optimum():
    # stage 1 is right when c1 >= 0.8, stage 2 when c2 >= 0.6, stage 3 always: with no drop
    # allowed the only thresholds that keep every answer right and escalate least are those
    n = 3000
    c1, c2 = _uniform(n, 6), _uniform(n, 7)
    ok1, ok2, ok3 = c1 >= 0.8, c2 >= 0.6, np.ones(n, dtype=bool)
    cal = calibrate([ok1, ok2, ok3], [c1, c2, None], [1.0, 3.0, 10.0], min_accuracy=1.0)
    assert cal.thresholds == (pytest.approx(float(c1[ok1].min())),
                              pytest.approx(float(c2[~ok1 & ok2].min())))
    assert cal.accuracy == 1.0
    to_third = (~ok1 & ~ok2).mean()
    assert cal.reach == (1.0, pytest.approx(0.8), pytest.approx(to_third))
    assert cal.expected_cost == pytest.approx(1 + 3 * 0.8 + 10 * to_third)


def _brute_force_three(ok, conf, costs, floor):
    best = None
    for t1 in np.unique(conf[0]):
        for t2 in np.unique(conf[1]):
            acc, reach = evaluate(ok, [conf[0], conf[1], None], (float(t1), float(t2)))
            cost = sum(c * r for c, r in zip(costs, reach, strict=True))
            if acc >= floor - 1e-12 and (best is None or cost < best):
                best = cost
    return best


@pytest.mark.parametrize("seed", [8, 9])
def test_three_stages_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 500
    c1, c2 = rng.random(n).round(2), rng.random(n).round(2)
    ok = [rng.random(n) < c1, rng.random(n) < 0.3 + 0.7 * c2, rng.random(n) < 0.95]
    costs = (1.0, 3.0, 10.0)
    cal = calibrate(ok, [c1, c2, None], costs, 0.88)
    best = _brute_force_three(ok, (c1, c2), costs, 0.88)
    assert cal.accuracy >= 0.88
    assert cal.expected_cost == pytest.approx(best)


def test_three_stage_grid_search_comes_close_to_the_exhaustive_one():
    """Past `exhaustive` stage-1 cuts the search is a grid plus refinement: within 1% of the
    cost of trying every cut (itself checked against brute force above)."""
    rng = np.random.default_rng(11)
    n = 3000
    c1, c2 = rng.random(n), rng.random(n)
    ok = [rng.random(n) < c1, rng.random(n) < 0.3 + 0.7 * c2, rng.random(n) < 0.95]
    costs = (1.0, 3.0, 10.0)
    fast = calibrate(ok, [c1, c2, None], costs, 0.9, exhaustive=100)
    exact = calibrate(ok, [c1, c2, None], costs, 0.9, exhaustive=n)
    assert fast.accuracy >= 0.9 and exact.accuracy >= 0.9
    assert exact.expected_cost <= fast.expected_cost <= 1.01 * exact.expected_cost


def _scores(seed: int, n: int):
    """A reference right ~85% of the time; a cheap stage that agrees with it when confident;
    a middle stage in between. Confidences rounded: few enough cuts to brute-force."""
    rng = np.random.default_rng(seed)
    ref = rng.random(n) < 0.85
    c1, c2 = rng.random(n).round(2), rng.random(n).round(2)
    ok1 = np.where(rng.random(n) < c1, ref, ~ref)
    ok2 = np.where(rng.random(n) < 0.5 + 0.5 * c2, ref, ~ref)
    return ref, (c1, c2), (ok1, ok2)


def test_drop_bound_is_the_paired_mean_plus_z_standard_errors():
    ref = np.array([1, 1, 1, 1, 0, 0, 1, 0], dtype=bool)
    plan = np.array([1, 0, 1, 0, 1, 0, 1, 0], dtype=bool)
    d = ref.astype(int) - plan.astype(int)  # two losses, one win
    se = d.std() / np.sqrt(len(d))
    assert drop_bound(ref, plan) == pytest.approx(d.mean())
    assert drop_bound(ref, plan, 1.5) == pytest.approx(d.mean() + 1.5 * se)
    assert drop_bound(ref, ref, 2.0) == 0.0


@pytest.mark.parametrize("z", [0.0, 1.0, 2.0])
def test_two_stages_with_a_margin_are_exact(z):
    ref, (c1, _), (ok1, _) = _scores(12, 600)
    costs, floor = (1.0, 6.0), ref.mean() - 0.02
    cal = calibrate([ok1, ref], [c1, None], costs, floor, reference_correct=ref, margin_z=z)
    best = None
    for t in np.unique(c1):
        right, reach = routed_correct([ok1, ref], [c1, None], (float(t),))
        if drop_bound(ref, right, z) <= 0.02 + 1e-12:
            cost = costs[0] + costs[1] * reach[1]
            best = cost if best is None else min(best, cost)
    assert cal.expected_cost == pytest.approx(best)
    assert cal.drop_bound <= 0.02 + 1e-12


def test_three_stages_with_a_margin_match_brute_force():
    ref, (c1, c2), (ok1, ok2) = _scores(13, 400)
    costs, z = (1.0, 3.0, 10.0), 1.0
    cal = calibrate([ok1, ok2, ref], [c1, c2, None], costs, ref.mean() - 0.03,
                    reference_correct=ref, margin_z=z)
    best = None
    for t1 in np.unique(c1):
        for t2 in np.unique(c2):
            right, reach = routed_correct([ok1, ok2, ref], [c1, c2, None],
                                          (float(t1), float(t2)))
            if drop_bound(ref, right, z) <= 0.03 + 1e-12:
                cost = sum(c * r for c, r in zip(costs, reach, strict=True))
                best = cost if best is None else min(best, cost)
    assert cal.expected_cost == pytest.approx(best)


def test_a_margin_costs_more_and_keeps_a_lower_bound():
    ref, (c1, _), (ok1, _) = _scores(14, 5000)
    plain = calibrate([ok1, ref], [c1, None], (1.0, 8.0), ref.mean() - 0.005,
                      reference_correct=ref)
    safe = calibrate([ok1, ref], [c1, None], (1.0, 8.0), ref.mean() - 0.005,
                     reference_correct=ref, margin_z=1.0)
    assert plain.drop_bound <= 0.005 + 1e-12 and safe.drop_bound <= 0.005 + 1e-12
    assert safe.expected_cost > plain.expected_cost
    assert safe.accuracy > plain.accuracy  # the point estimate sits below the bound
    # without a margin, measuring against the reference is the plain accuracy requirement
    bare = calibrate([ok1, ref], [c1, None], (1.0, 8.0), ref.mean() - 0.005)
    assert bare.thresholds == plain.thresholds


def test_unreachable_accuracy_gives_none():
    n = 100
    conf = _uniform(n, 10)
    ok1 = conf >= 0.5
    ok2 = conf >= 0.2  # even the last stage alone gets 80%
    assert calibrate([ok1, ok2], [conf, None], [1.0, 2.0], min_accuracy=0.9) is None


def test_bad_inputs_are_refused():
    ok = np.ones(4, dtype=bool)
    conf = np.full(4, 0.5)
    with pytest.raises(ValueError, match="2 or 3 stages"):
        calibrate([ok], [conf], [1.0], 0.5)
    with pytest.raises(ValueError, match="confidence"):
        calibrate([ok, ok], [None, None], [1.0, 2.0], 0.5)
    with pytest.raises(ValueError, match="one prediction per"):
        calibrate([ok, ok[:3]], [conf, None], [1.0, 2.0], 0.5)
    with pytest.raises(ValueError, match="thresholds"):
        evaluate([ok, ok], [conf, None], (0.1, 0.2))
    with pytest.raises(ValueError, match="reference"):
        calibrate([ok, ok], [conf, None], [1.0, 2.0], 0.5, margin_z=1.0)

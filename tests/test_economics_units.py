"""Unit tests for cost attribution (economics.meter), the rate card (economics.ratecard),
budgets files (economics.budgets), API key input (economics.keys) and alert listing
(economics.alerts)."""

from __future__ import annotations

import random
from decimal import Decimal
from fractions import Fraction

import orjson
import pytest

from frugalserve.economics.alerts import alerts, list_alerts
from frugalserve.economics.budgets import Budget, load_budgets_file, usd_to_pico
from frugalserve.economics.keys import create_key, list_keys
from frugalserve.economics.ledger import open_engine
from frugalserve.economics.meter import (
    PICO_PER_USD,
    Meter,
    pico_to_micro,
    pico_to_usd,
    split_cost,
)
from frugalserve.economics.ratecard import RateCard, RateCardError

# -- split_cost ---------------------------------------------------------------------------------


@pytest.mark.parametrize("total,weights", [
    (0, [1, 2, 3]),
    (1, [1, 1, 1]),
    (10, [1, 1, 1]),
    (100, [3]),
    (7, [1, 0, 6]),
    (999_999_999_999, [1, 2, 3, 4, 5, 6, 7]),
    (12345, [64] * 64),
    (5, [1] * 17),
])
def test_split_cost_sums_exactly(total, weights):
    parts = split_cost(total, weights)
    assert len(parts) == len(weights)
    assert sum(parts) == total
    assert all(isinstance(p, int) and p >= 0 for p in parts)


def test_split_cost_random_inputs_sum_exactly_and_stay_within_one_unit():
    rng = random.Random(1234)
    for _ in range(2000):
        n = rng.randint(1, 40)
        weights = [rng.randint(0, 64) for _ in range(n)]
        if sum(weights) == 0:
            weights[0] = 1
        total = rng.randint(0, 10**12)
        parts = split_cost(total, weights)
        assert sum(parts) == total
        whole = sum(weights)
        for part, w in zip(parts, weights, strict=True):
            exact = Fraction(total * w, whole)
            # each share is its exact proportional amount, floored or raised by one unit
            assert exact - 1 < part < exact + 1
            assert part in (total * w // whole, total * w // whole + 1)


def test_split_cost_is_proportional_when_it_divides():
    assert split_cost(600, [1, 2, 3]) == [100, 200, 300]
    assert split_cost(1000, [5, 5]) == [500, 500]
    assert split_cost(0, [4, 4]) == [0, 0]
    # a zero weight pays nothing
    assert split_cost(90, [0, 1, 2]) == [0, 30, 60]


def test_split_cost_gives_remainder_to_largest_fractional_parts():
    # 10 * [1, 2, 4] / 7 = [1.43, 2.86, 5.71]: floors [1, 2, 5] sum 8; the two units go to the
    # parts with the largest remainders (0.86 and 0.71), not to the first ones
    assert split_cost(10, [1, 2, 4]) == [1, 3, 6]
    # 100 * [1, 1, 1] / 3: equal remainders, the single unit goes to the earliest
    assert split_cost(100, [1, 1, 1]) == [34, 33, 33]
    # 2 units over four equal parts: ties to the earliest
    assert split_cost(2, [1, 1, 1, 1]) == [1, 1, 0, 0]
    # 7 * [3, 1, 3] / 7 = [3, 1, 3]: exact, no remainder
    assert split_cost(7, [3, 1, 3]) == [3, 1, 3]
    # 11 * [2, 3, 5] / 10 = [2.2, 3.3, 5.5]: floors [2, 3, 5], the unit goes to 5.5
    assert split_cost(11, [2, 3, 5]) == [2, 3, 6]


def test_split_cost_single_weight_takes_everything():
    assert split_cost(123, [7]) == [123]


@pytest.mark.parametrize("weights", [[], [0], [0, 0]])
def test_split_cost_rejects_weights_without_a_positive_sum(weights):
    with pytest.raises(ValueError):
        split_cost(100, weights)


# -- Meter ----------------------------------------------------------------------------------------


def test_meter_cost_is_seconds_times_hourly_price_times_share():
    # 3.6 USD/h is exactly 0.001 USD (1e9 pico-dollars) per second of a whole device
    whole = Meter(Decimal("3.6"), 1.0)
    assert whole.cost(1.0) == 10**9
    assert whole.cost(0.5) == 5 * 10**8
    assert whole.cost(0.0) == 0
    half = Meter(Decimal("3.6"), 0.5)
    assert half.cost(1.0) == 5 * 10**8
    assert half.cost(2.0) == 10**9


def test_meter_cost_matches_the_cost_model_formula():
    price = Decimal("0.08925")  # aws-c7i.large on demand
    meter = Meter(price, 0.5)
    for seconds in (1e-6, 5e-5, 0.001, 0.0123, 1.0, 3600.0):
        expected = Decimal(str(seconds)) * price * Decimal("0.5") / 3600 * PICO_PER_USD
        assert meter.cost(seconds) == pytest.approx(float(expected), rel=1e-9, abs=1)
        assert isinstance(meter.cost(seconds), int)
    # an hour of half a device costs half the hourly price
    assert meter.cost(3600.0) == int(price * PICO_PER_USD / 2)


def test_meter_cost_of_a_tiny_batch_is_not_rounded_to_zero():
    # a 50-microsecond batch on half a cheap CPU instance: about 620 pico-dollars
    assert Meter(Decimal("0.08925"), 0.5).cost(50e-6) > 0


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_meter_rejects_a_share_outside_0_1(share):
    with pytest.raises(ValueError, match="share"):
        Meter(Decimal("1"), share)


def test_pico_conversions():
    assert pico_to_usd(PICO_PER_USD) == Decimal(1)
    assert pico_to_usd(1) == Decimal("1e-12")
    assert pico_to_micro(2_500_000) == 2.5


# -- Rate card ------------------------------------------------------------------------------------


def test_shipped_rate_card_has_priced_sourced_devices():
    card = RateCard.load()
    assert "aws-c7i.large" in card.devices
    for key, device in card.devices.items():
        assert device.key == key
        assert device.on_demand_usd_per_hour > 0
        assert device.source and device.date
    c7i = card.device("aws-c7i.large")
    assert c7i.usd_per_hour() == Decimal("0.08925")
    assert c7i.usd_per_hour("spot") == Decimal("0.0357")


def test_unknown_device_gives_a_clear_error():
    card = RateCard.load()
    with pytest.raises(RateCardError) as info:
        card.device("no-such-device")
    message = str(info.value)
    assert "no-such-device" in message
    assert "aws-c7i.large" in message  # it says what the card does have


def test_unknown_pricing_basis_gives_a_clear_error():
    with pytest.raises(RateCardError, match="reserved"):
        RateCard.load().device("aws-c7i.large").usd_per_hour("reserved")


def test_override_file_replaces_a_device_and_adds_one(tmp_path):
    override = tmp_path / "rates.yaml"
    override.write_text(
        "devices:\n"
        "  aws-c7i.large:\n"
        "    on_demand_usd_per_hour: '0.05'\n"
        "    source: negotiated contract\n"
        "    date: '2025-07-01'\n"
        "  onprem-box:\n"
        "    kind: cpu\n"
        "    description: our own server\n"
        "    on_demand_usd_per_hour: '0.02'\n"
        "    spot_usd_per_hour: '0.01'\n"
        "    watts: 200\n"
        "    source: capex / 3 years + power\n"
        "    date: '2025-07-01'\n"
    )
    shipped = RateCard.load()
    card = RateCard.load(override)
    replaced = card.device("aws-c7i.large")
    assert replaced.on_demand_usd_per_hour == Decimal("0.05")
    assert replaced.source == "negotiated contract"
    # the entry is replaced as a whole: the shipped spot price does not leak into it
    assert replaced.spot_usd_per_hour is None
    added = card.device("onprem-box")
    assert added.usd_per_hour() == Decimal("0.02")
    assert added.usd_per_hour("spot") == Decimal("0.01")
    assert added.watts == 200
    # every other shipped device is still there, unchanged
    for key, device in shipped.devices.items():
        if key != "aws-c7i.large":
            assert card.device(key) == device
    assert set(card.devices) == set(shipped.devices) | {"onprem-box"}


@pytest.mark.parametrize("text,expect", [
    ("devices: [1, 2]\n", "devices"),
    ("not: a card\n", "devices"),
    ("devices:\n  x:\n    on_demand_usd_per_hour: '1'\n", "lacks"),
    ("devices:\n  x:\n    on_demand_usd_per_hour: 'cheap'\n    source: s\n    date: d\n",
     "not a price"),
    ("devices:\n  x:\n    on_demand_usd_per_hour: '-1'\n    source: s\n    date: d\n",
     "negative"),
    ("devices: {x: [unclosed\n", "YAML"),
    # watts and peak_flops are checked as strictly as prices, naming the file and the device
    ("devices:\n  x:\n    on_demand_usd_per_hour: '1'\n    source: s\n    date: d\n"
     "    watts: lots\n", "device 'x'.watts: 'lots' is not a number of watts"),
    ("devices:\n  x:\n    on_demand_usd_per_hour: '1'\n    source: s\n    date: d\n"
     "    watts: -70\n", "watts cannot be negative"),
    ("devices:\n  x:\n    on_demand_usd_per_hour: '1'\n    source: s\n    date: d\n"
     "    peak_flops: .inf\n", "peak_flops must be a finite number"),
    # a price no device has: under it, a batch's cost fits the ledger's int64 pico-dollars
    ("devices:\n  x:\n    on_demand_usd_per_hour: '1'\n    spot_usd_per_hour: '250000'\n"
     "    source: s\n    date: d\n", "spot $250,000/h is over $100,000/h"),
    ("devices:\n  x:\n    source: s\n    date: d\n    on_prem: {purchase_usd: 1e12, "
     "lifetime_years: 1, electricity_usd_per_kwh: 0.1, pue: 1.2, source: s, date: d}\n",
     "on_prem $"),
])
def test_bad_override_file_names_the_file_and_the_problem(tmp_path, text, expect):
    override = tmp_path / "bad-rates.yaml"
    override.write_text(text)
    with pytest.raises(RateCardError) as info:
        RateCard.load(override)
    assert str(override) in str(info.value)
    assert expect in str(info.value)


def test_override_file_that_is_not_text_names_the_file(tmp_path):
    binary = tmp_path / "rates.yaml"
    binary.write_bytes(b"\xff\xfe\x00devices")
    with pytest.raises(RateCardError, match="rates.yaml: not a text file"):
        RateCard.load(binary)


def test_missing_override_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RateCardError, match="nope.yaml"):
        RateCard.load(missing)


def test_device_without_spot_price_says_so(tmp_path):
    override = tmp_path / "rates.yaml"
    override.write_text("devices:\n  box:\n    on_demand_usd_per_hour: '1'\n"
                        "    source: s\n    date: d\n")
    with pytest.raises(RateCardError, match="spot"):
        RateCard.load(override).device("box").usd_per_hour("spot")


# -- budgets files --------------------------------------------------------------------------------


def test_budgets_file_in_both_shapes(tmp_path):
    path = tmp_path / "budgets.yaml"
    path.write_text("- {scope: tenant, target: 42, period: day, amount_usd: '2.5',\n"
                    "   thresholds: ['50:alert', {percent: 90, action: downgrade}],\n"
                    "   fallback_model: small}\n"
                    "- amount_usd: 0.000001\n")
    first, second = load_budgets_file(path)
    assert first.target == "42" and first.amount_pusd == 2_500_000_000_000
    assert [(t.percent, t.action) for t in first.thresholds] == [(50, "alert"),
                                                                  (90, "downgrade")]
    assert second.scope == "global" and second.period == "month" and second.id == -2
    assert second.amount_pusd == 10**6
    path.write_text("budgets:\n  - {amount_usd: 1}\n")
    assert [b.amount_pusd for b in load_budgets_file(path)] == [PICO_PER_USD]
    path.write_text("")
    assert load_budgets_file(path) == []


@pytest.mark.parametrize("text,expect", [
    ("budgets: [unclosed\n", "not valid YAML"),
    ("42\n", "expected a list of budgets"),
    ("budgets: 5\n", "expected a list of budgets"),
    ("amount_usd: 5\n", "expected a list of budgets"),  # one budget, not a list: not ignored
    ("- hello\n", "budget #1: expected a mapping"),
    ("- {scope: tenant, target: acme}\n", "budget #1: lacks amount_usd"),
    ("- {amount_usd: 5, scpoe: tenant}\n", "budget #1: unknown key(s) scpoe"),
    ("- {amount_usd: 5}\n- {amount_usd: lots}\n", "budget #2: amount 'lots' is not a number"),
    ("- {amount_usd: '1e400'}\n", "more than the ledger holds"),
    ("- {amount_usd: 5, thresholds: '80:alert'}\n", "thresholds must be a list"),
    ("- {amount_usd: 5, thresholds: [80]}\n", "threshold 80: expected 'PERCENT:ACTION'"),
    ("- {amount_usd: 5, thresholds: [{percent: x, action: alert}]}\n", "percent must be"),
    ("- {amount_usd: 5, scope: tenant, target: [a]}\n", "target must be a name"),
    ("- {amount_usd: 5, scope: planet}\n", "scope 'planet'"),
])
def test_bad_budgets_file_is_a_value_error_naming_file_and_budget(tmp_path, text, expect):
    path = tmp_path / "budgets.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_budgets_file(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expect in str(info.value)


def test_unreadable_budgets_file_is_a_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="nope.yaml: cannot read"):
        load_budgets_file(tmp_path / "nope.yaml")
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="b.yaml: not a text file"):
        load_budgets_file(binary)


def test_budget_amounts_and_names_must_fit_the_ledger():
    assert usd_to_pico("$0.5") == PICO_PER_USD // 2
    with pytest.raises(ValueError, match="more than the ledger holds"):
        usd_to_pico("1e27")
    with pytest.raises(ValueError, match="256"):
        Budget("tenant", "t" * 257, "month", 1)
    with pytest.raises(ValueError, match="128"):
        Budget("model", "m", "month", 1, fallback_model="f" * 129)


def test_a_key_name_longer_than_its_column_is_refused_and_nothing_is_written(tmp_path):
    engine = open_engine(f"sqlite:///{tmp_path / 'l.db'}")
    with pytest.raises(ValueError, match="256"):
        create_key(engine, "acme", name="n" * 257)
    assert list_keys(engine) == []


def test_alerts_list_as_json_ready_dicts_and_refuse_a_limit_below_one(tmp_path):
    engine = open_engine(f"sqlite:///{tmp_path / 'l.db'}")
    with engine.begin() as conn:
        conn.execute(alerts.insert().values(
            ts=1.0, scope="global", target="", period="month", period_start=0.0, percent=80.0,
            action="alert", spent_pusd=800, amount_pusd=1000, message="80% of $0.000000001"))
    (alert,) = list_alerts(engine, 5)
    # ready for orjson, which refused SQLAlchemy's key type (a str subclass)
    assert orjson.loads(orjson.dumps(alert)) == {**alert, "id": 1}
    assert alert["spent_pusd"] == 800 and alert["message"].startswith("80%")
    with pytest.raises(ValueError, match="at least 1"):
        list_alerts(engine, -1)

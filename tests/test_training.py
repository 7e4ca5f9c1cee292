"""Training runs: the 6ND estimator against published figures, on-prem pricing, measured runs
(`track_training`), runs added by hand, and the `frugalserve training` CLI; on SQLite and on
PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
import warnings
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

import frugalserve
from frugalserve.cli import app
from frugalserve.economics.ratecard import RateCard, RateCardError
from frugalserve.economics.training import (
    DEFAULT_MFU,
    LLAMA2_70B_GPU_HOURS,
    TrainingRun,
    estimate_training,
    implied_mfu,
    imported_run,
    open_ledger,
    record_run,
    track_training,
    training_flops,
    training_runs_for,
    training_totals,
)
from frugalserve.repository.config import ModelConfig

PICO = 10**12


@pytest.fixture(scope="module")
def card() -> RateCard:
    return RateCard.load()


def rel_error(ours: float, published: float) -> float:
    return ours / published - 1


# -- the estimator against published figures ----------------------------------------------------


def test_gpt3_175b_on_300b_tokens_is_3_14e23_flops():
    # Brown et al. 2020, "Language Models are Few-Shot Learners", Table D.1: 3.14e23 FLOPs
    # (3,640 petaflop/s-days). 6ND with N = 175e9 gives 3.15e23: +0.32%, because the model
    # has 174.6e9 parameters, with which 6ND is 3.1428e23 (+0.09%).
    flops = training_flops(175e9, 300e9)
    assert flops == pytest.approx(3.15e23)
    assert abs(rel_error(flops, 3.14e23)) < 0.005
    assert abs(rel_error(training_flops(174.6e9, 300e9), 3.14e23)) < 0.001


def test_chinchilla_70b_on_1_4t_tokens_is_within_3_percent_of_5_76e23_flops():
    # Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models": Chinchilla was
    # given Gopher's budget, 5.76e23 FLOPs. The paper counts FLOPs in more detail than 6ND
    # (embeddings, attention; its Appendix F), and 6 x 70e9 x 1.4e12 = 5.88e23 overshoots that
    # by 2.1%. The tolerance is 3%: about what 6ND leaves out or adds at this scale.
    flops = training_flops(70e9, 1.4e12)
    assert flops == pytest.approx(5.88e23)
    error = rel_error(flops, 5.76e23)
    assert error == pytest.approx(0.0208, abs=0.0005)
    assert abs(error) < 0.03


def test_llama2_70b_gpu_hours_imply_an_mfu_of_0_435_which_is_the_default():
    # Touvron et al. 2023, "Llama 2", Table 2: 1,720,320 A100-80GB GPU-hours for 70B on 2T
    # tokens. 8.4e23 FLOPs / (1,720,320 h x 3600 s x 312e12 FLOP/s) = 0.4347.
    mfu = implied_mfu(70e9, 2e12, 1_720_320, 312e12)
    assert mfu == pytest.approx(8.4e23 / (1_720_320 * 3600 * 312e12))
    assert mfu == pytest.approx(0.4347, abs=1e-4)
    assert LLAMA2_70B_GPU_HOURS == 1_720_320
    assert DEFAULT_MFU == mfu


def test_llama2_70b_estimate_gives_back_the_published_gpu_hours_energy_and_cost(card):
    est = estimate_training(card, "nvidia-a100-80gb", params=70e9, tokens=2e12)
    assert est.peak_flops == 312e12  # the rate card's A100 figure is what the MFU came from
    assert est.mfu == DEFAULT_MFU and est.mfu_is_default
    assert est.flops == pytest.approx(8.4e23)
    assert est.device_hours == pytest.approx(1_720_320, rel=1e-12)
    # Meta's carbon accounting counts 400 W per A100 for these hours: 688,128 kWh
    assert est.energy_kwh == pytest.approx(1_720_320 * 0.4, rel=1e-12)
    # cost = device-hours x $/h: 1,720,320 x $5.0688 on demand = $8,719,958.016
    assert est.usd_per_hour == Decimal("5.0688")
    assert est.cost_pusd == pytest.approx(8_719_958_016 * 10**9, rel=1e-12)
    spot = estimate_training(card, "nvidia-a100-80gb", params=70e9, tokens=2e12, pricing="spot")
    assert spot.cost_pusd == pytest.approx(int(Decimal("2700902.4") * PICO), rel=1e-12)


def test_given_gpu_hours_are_used_as_they_are_and_imply_the_mfu(card):
    est = estimate_training(card, "nvidia-a100-80gb", params=70e9, tokens=2e12,
                            gpu_hours=1_720_320, pricing="spot")
    assert est.device_hours == 1_720_320
    assert est.mfu == pytest.approx(DEFAULT_MFU) and not est.mfu_is_default
    assert est.cost_pusd == 1_720_320 * 157 * PICO // 100  # exact: $1.57 x 1,720,320
    hours_only = estimate_training(card, "aws-c7i.large", gpu_hours=10)
    assert hours_only.mfu is None and hours_only.flops is None
    assert hours_only.cost_pusd == int(Decimal("0.8925") * PICO)


def test_mfu_and_device_count_scale_time_and_not_cost_as_they_should(card):
    base = estimate_training(card, "nvidia-h100-80gb", params=7e9, tokens=1e12, mfu=0.5)
    assert base.device_hours == pytest.approx(6 * 7e9 * 1e12 / (989e12 * 0.5) / 3600)
    half = estimate_training(card, "nvidia-h100-80gb", params=7e9, tokens=1e12, mfu=0.25)
    assert half.device_hours == pytest.approx(2 * base.device_hours)
    wide = estimate_training(card, "nvidia-h100-80gb", params=7e9, tokens=1e12, mfu=0.5,
                             devices=64)
    assert wide.wall_hours == pytest.approx(base.device_hours / 64)
    assert wide.cost_pusd == base.cost_pusd


@pytest.mark.parametrize("kwargs,match", [
    ({"params": 7e9, "tokens": 1e12, "mfu": 0.4, "gpu_hours": 10}, "not both"),
    ({"params": 7e9}, "tokens"),
    ({"params": 7e9, "tokens": 1e12, "mfu": 1.5}, "MFU"),
    ({"params": -1.0, "tokens": 1e12}, "params"),
    ({"gpu_hours": 10, "devices": 0}, "devices"),
    ({"params": 1e300, "tokens": 1e300}, "out of range"),
    ({"gpu_hours": float("inf")}, "out of range"),
    ({"gpu_hours": 1e300}, "more than the ledger holds"),  # PostgreSQL refused it at insert
    ({"gpu_hours": 10, "devices": 10**20}, "devices"),
])
def test_bad_estimate_inputs_say_what_is_wrong(card, kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_training(card, "nvidia-a100-80gb", **kwargs)


def test_a_device_without_peak_flops_asks_for_gpu_hours(card):
    with pytest.raises(ValueError, match="peak_flops"):
        estimate_training(card, "aws-c7i.large", params=1e6, tokens=1e9)


# -- the rate card: peak FLOP/s and on-prem prices ------------------------------------------------


def test_shipped_gpus_carry_sourced_peak_flops_and_on_prem_prices(card):
    expected = {"nvidia-t4": 65e12, "nvidia-l4": 121e12, "nvidia-a10g": 70e12,
                "nvidia-a100-40gb": 312e12, "nvidia-a100-80gb": 312e12,
                "nvidia-h100-80gb": 989e12, "nvidia-h200-141gb": 989e12}
    for key, flops in expected.items():
        device = card.device(key)
        assert device.peak_flops == flops, key
        assert device.peak_flops_source, key
        on_prem = device.on_prem
        assert on_prem is not None and on_prem.source and on_prem.date, key
        # the shared defaults' sources travel with every entry
        assert "EIA" in on_prem.source and "Uptime" in on_prem.source, key
        assert 0 < device.usd_per_hour("on_prem") < device.usd_per_hour("on_demand"), key


def test_on_prem_price_is_capital_over_lifetime_plus_power_times_pue_plus_ops(tmp_path):
    override = tmp_path / "rates.yaml"
    override.write_text(
        "devices:\n"
        "  our-gpu:\n"
        "    kind: gpu\n"
        "    watts: 700\n"
        "    source: own hardware\n"
        "    date: '2025-07-01'\n"
        "    on_prem:\n"
        "      purchase_usd: 30000\n"
        "      lifetime_years: 3\n"
        "      electricity_usd_per_kwh: '0.10'\n"
        "      pue: '1.5'\n"
        "      ops_usd_per_hour: '0.25'\n"
        "      source: invoice 2025-123\n"
        "      date: '2025-07-01'\n"
    )
    device = RateCard.load(override).device("our-gpu")
    # by hand: 30000 / (3 x 8760) = 1.141552511 $/h of capital; 0.7 kW x $0.10 x 1.5 = 0.105
    # $/h of power; 0.25 $/h of operations: 1.496552511 $/h
    price = device.usd_per_hour("on_prem")
    assert device.on_prem.capital_usd_per_hour() == Decimal(30000) / Decimal(26280)
    assert device.on_prem.power_usd_per_hour() == Decimal("0.105")
    assert price == Decimal(30000) / Decimal(26280) + Decimal("0.355")
    assert float(price) == pytest.approx(1.496552511)
    # a device priced only on-prem has no on-demand price, and says so
    with pytest.raises(RateCardError, match="on-demand"):
        device.usd_per_hour()


def test_shipped_h100_on_prem_price_by_hand(card):
    # $317,000 / 8 = $39,625 over 5 years of 8,760 h: 0.904680365 $/h; 10.2 kW / 8 = 1.275 kW
    # x $0.13/kWh x PUE 1.58 = 0.261885 $/h: 1.166565365 $/h in all
    price = card.device("nvidia-h100-80gb").usd_per_hour("on_prem")
    assert price == Decimal(39625) / Decimal(43800) + Decimal("0.261885")
    assert float(price) == pytest.approx(1.166565365)


def test_override_defaults_reprice_shipped_on_prem_entries_and_utilization_spreads_capital(
        tmp_path, card):
    override = tmp_path / "rates.yaml"
    override.write_text("on_prem_defaults:\n  electricity_usd_per_kwh: '0.20'\n"
                        "  hours_per_year: 4380\ndevices: {}\n")
    mine = RateCard.load(override).device("nvidia-h100-80gb")
    shipped = card.device("nvidia-h100-80gb")
    # half the hours in use: twice the capital per hour; power follows the new price
    assert mine.on_prem.capital_usd_per_hour() == 2 * shipped.on_prem.capital_usd_per_hour()
    assert mine.on_prem.power_usd_per_hour() == Decimal("1.275") * Decimal("0.20") * \
        Decimal("1.58")
    # the rest of the card is as shipped
    assert mine.usd_per_hour("spot") == shipped.usd_per_hour("spot")
    assert RateCard.load(override).device("aws-c7i.large") == card.device("aws-c7i.large")


def test_device_without_on_prem_block_says_so(card):
    with pytest.raises(RateCardError, match="on-prem"):
        card.device("aws-c7i.large").usd_per_hour("on_prem")


@pytest.mark.parametrize("block,expect", [
    ("    on_prem: {purchase_usd: 1, source: s, date: d, colour: red}\n", "unknown key"),
    ("    on_prem: {purchase_usd: 1, source: s}\n", "lacks date"),
    ("    on_prem: {source: s, date: d}\n", "lacks purchase_usd"),
    ("    on_prem: {purchase_usd: 1, source: s, date: d, pue: '0.9'}\n", "PUE"),
    ("    on_prem: {purchase_usd: 1, source: s, date: d, hours_per_year: 9000}\n", "8760"),
    ("    on_prem: {purchase_usd: cheap, source: s, date: d}\n", "not a price"),
    ("    on_prem: [1, 2]\n", "mapping"),
    ("", "lacks on_demand_usd_per_hour"),  # a device needs at least one price
])
def test_bad_on_prem_block_names_the_file_and_the_problem(tmp_path, block, expect):
    override = tmp_path / "bad-rates.yaml"
    override.write_text("devices:\n  box:\n    source: s\n    date: d\n" + block)
    with pytest.raises(RateCardError) as info:
        RateCard.load(override)
    assert str(override) in str(info.value)
    assert expect in str(info.value)


def test_bad_on_prem_defaults_name_their_own_file(tmp_path):
    override = tmp_path / "bad-defaults.yaml"
    override.write_text("on_prem_defaults: {pue: '0.5'}\ndevices: {}\n")
    with pytest.raises(RateCardError, match="bad-defaults.yaml: on_prem_defaults.pue"):
        RateCard.load(override)


def test_a_model_config_can_ask_for_on_prem_pricing_and_the_server_can_price_it(card):
    # the serving side prices a model as rate_card.device(type).usd_per_hour(pricing)
    config = ModelConfig.parse({"device": {"type": "nvidia-t4", "share": 0.5,
                                           "pricing": "on_prem"}}, "m")
    price = card.device(config.device.type).usd_per_hour(config.device.pricing)
    assert price == card.device("nvidia-t4").on_prem.usd_per_hour()


# -- ledgers --------------------------------------------------------------------------------------


def exact_cost(usd_per_hour: Decimal, seconds: float, share: float = 1.0) -> int:
    """The rate-card formula, written out again: seconds / 3600 x $/h x share, in pico-dollars."""
    amount = Decimal(repr(seconds)) / 3600 * usd_per_hour * Decimal(repr(share)) * PICO
    return int(amount.to_integral_value(ROUND_HALF_EVEN))


def fit_small_model() -> LogisticRegression:
    X, y = load_digits(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(max_iter=300).fit(X / 16.0, y)


# -- measured runs --------------------------------------------------------------------------------


def test_track_training_records_a_measured_run_priced_by_the_rate_card(ledger_url, card):
    with frugalserve.track_training(model="digits-lr", version="1", device="aws-c7i.large",
                                    ledger_url=ledger_url, share=0.5,
                                    pricing="on_demand") as run:
        model = fit_small_model()
        run.params["n_params"] = int(model.coef_.size + model.intercept_.size)
    rec = run.record
    assert run.id is not None and rec.status == "ok" and rec.source == "measured"
    assert rec.wall_s > 0 and rec.cpu_s > 0
    assert rec.peak_rss_bytes > 10 * 2**20  # a Python process with numpy and scikit-learn
    assert rec.gpu_s is None  # no torch in this process: no GPU measured
    price = card.device("aws-c7i.large")
    assert rec.cost_pusd == exact_cost(price.usd_per_hour("on_demand"), rec.wall_s, 0.5)
    assert rec.cost_pusd > 0
    # an estimate: the card's watts x the share held x the time
    assert rec.energy_kwh == pytest.approx(price.watts * 0.5 * rec.wall_s / 3.6e6)
    [stored] = training_runs_for(open_ledger(ledger_url), "digits-lr", "1")
    assert stored == TrainingRun(**{**rec.__dict__, "id": run.id})
    assert stored.params == {"n_params": 650}


def test_a_run_that_raises_is_recorded_as_failed_and_the_error_goes_on(tmp_path, card):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with pytest.raises(ZeroDivisionError):
        with track_training("digits-lr", "2", "nvidia-t4", ledger_url=url,
                            pricing="on_prem", notes="lr sweep") as run:
            fit_small_model()
            1 / 0  # noqa: B018 - the training code fails
    [stored] = training_runs_for(open_ledger(url), "digits-lr", "2")
    assert stored.status == "failed"
    assert stored.notes.startswith("lr sweep; failed: ZeroDivisionError")
    # the time it ran was paid for, at the on-prem price
    on_prem = card.device("nvidia-t4").usd_per_hour("on_prem")
    assert stored.cost_pusd == exact_cost(on_prem, stored.wall_s) > 0
    assert run.record.cost_pusd == stored.cost_pusd


def test_a_wrong_device_or_pricing_fails_before_the_training_runs(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ran = []
    with pytest.raises(RateCardError, match="no-such-gpu"):
        with track_training("m", "1", "no-such-gpu", ledger_url=url):
            ran.append(1)
    with pytest.raises(RateCardError, match="on-prem"):
        with track_training("m", "1", "aws-c7i.large", ledger_url=url, pricing="on_prem"):
            ran.append(1)
    with pytest.raises(ValueError, match="share"):
        track_training("m", "1", "aws-c7i.large", ledger_url=url, share=0)
    assert ran == []


def test_a_ledger_that_fails_at_the_end_keeps_the_run_in_a_file_and_the_script_goes_on(
        tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with track_training("m", "1", "aws-c7i.large", ledger_url=url) as run:
        fit_small_model()
        with create_engine(url).begin() as conn:  # the database breaks during the training
            conn.execute(text("DROP TABLE training_runs"))
    assert run.id is None and run.record.cost_pusd > 0
    [spill] = tmp_path.glob("training-run-spill-*.jsonl")
    doc = json.loads(spill.read_text())
    assert doc["model"] == "m" and int(doc["cost_pusd"]) == run.record.cost_pusd
    assert str(spill) in caplog.text


def test_gpu_time_is_counted_when_torch_has_used_cuda(tmp_path, monkeypatch):
    """The torch installed here is the CPU build (no CUDA); a stand-in with torch.cuda's
    interface plays a process that used one of its two GPUs."""
    calls = []
    cuda = types.SimpleNamespace(
        is_available=lambda: True, is_initialized=lambda: True, device_count=lambda: 2,
        reset_peak_memory_stats=lambda i: calls.append(("reset", i)),
        synchronize=lambda i: calls.append(("sync", i)),
        max_memory_allocated=lambda i: [3 * 2**30, 0][i])
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with track_training("m", "1", "nvidia-a10g", ledger_url=url) as run:
        fit_small_model()
    assert run.record.gpu_s == run.record.wall_s  # one GPU held for the whole block
    assert run.record.params["gpu_peak_bytes"] == 3 * 2**30
    assert ("sync", 0) in calls and ("sync", 1) in calls  # queued kernels waited for
    assert ("reset", 0) in calls


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux's /proc/self/clear_refs to reset the RSS peak")
def test_peak_memory_is_the_runs_own_not_the_process_lifetime_peak(tmp_path):
    big = np.ones(512 * 2**20 // 8)  # 512 MiB, touched, then freed back to the OS
    lifetime_peak = int(next(line.split()[1] for line in
                             Path("/proc/self/status").read_text().splitlines()
                             if line.startswith("VmHWM:"))) * 1024
    del big
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with track_training("m", "1", "aws-c7i.large", ledger_url=url) as run:
        small = np.ones(64 * 2**20 // 8)
        del small
    assert run.record.peak_rss_bytes < lifetime_peak - 256 * 2**20


def test_import_frugalserve_stays_light_and_track_training_loads_on_first_use():
    code = ("import sys, frugalserve\n"
            "assert 'sqlalchemy' not in sys.modules, 'import frugalserve loaded SQLAlchemy'\n"
            "assert callable(frugalserve.track_training)\n"
            "assert 'track_training' in frugalserve.__all__\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError):
        _ = frugalserve.no_such_thing


# -- runs added by hand, totals, and big amounts --------------------------------------------------


def test_an_imported_run_costs_its_device_hours_at_the_card_price(card):
    run = imported_run(card, model="llama", version="2", device="nvidia-a100-80gb", hours=12,
                       devices=8, pricing="spot")
    assert run.cost_pusd == 15072 * PICO // 100  # 96 device-hours x $1.57 = $150.72
    assert run.device_hours == 96
    assert run.gpu_s == 96 * 3600
    assert run.energy_kwh == pytest.approx(96 * 0.4)
    assert run.source == "imported" and run.cpu_s is None
    with pytest.raises(ValueError, match="hours"):
        imported_run(card, model="m", version="1", device="nvidia-t4", hours=0)


@pytest.mark.parametrize("hours,devices", [(float("inf"), 1), (1e300, 1), (1e300, 10**6)])
def test_an_imported_run_of_impossible_length_is_refused(card, hours, devices):
    # inf or 1e300*1e6 hours raised OverflowError; 1e300 hours stored a start that broke listing
    with pytest.raises(ValueError, match="hours|out of range"):
        imported_run(card, model="m", version="1", device="nvidia-t4", hours=hours,
                     devices=devices)


def test_an_imported_run_cannot_start_in_the_future(card):
    # --started 9999-12-31 was stored, and the report's FOCUS rows then overflowed datetime
    with pytest.raises(ValueError, match="future"):
        imported_run(card, model="m", version="1", device="nvidia-t4", hours=1,
                     started_at=time.time() + 3600)


def test_a_versions_runs_link_to_it_and_sum_exactly_even_past_64_bit(ledger_url, card):
    engine = open_ledger(ledger_url)
    # a 405B model on 15.6T tokens on H100s on demand: about $168 million, 1.7e20 pico-dollars,
    # more than a 64-bit integer holds
    huge = estimate_training(card, "nvidia-h100-80gb", params=405e9, tokens=15.6e12)
    assert huge.cost_pusd > 2**63
    runs = [
        huge.as_run("big", "1"),
        imported_run(card, model="big", version="1", device="nvidia-h100-80gb", hours=3,
                     devices=16),
        imported_run(card, model="big", version="2", device="nvidia-t4", hours=1),
        imported_run(card, model="other", version="1", device="nvidia-t4", hours=1),
    ]
    ids = [record_run(engine, run) for run in runs]
    assert len(set(ids)) == 4
    v1 = training_runs_for(engine, "big", "1")
    # oldest first: the imported run started 3 hours ago, the estimate is stamped now
    assert [r.id for r in v1] == [ids[1], ids[0]]
    assert v1[1].cost_pusd == huge.cost_pusd  # exact, on both databases
    assert v1[1].params["mfu"] == pytest.approx(DEFAULT_MFU)
    totals = training_totals(v1)
    assert totals.runs == 2 and totals.failed == 0
    assert totals.cost_pusd == huge.cost_pusd + runs[1].cost_pusd
    assert totals.cost_pusd_by_source == {"estimated": huge.cost_pusd,
                                          "imported": runs[1].cost_pusd}
    assert totals.device_hours == pytest.approx(huge.device_hours + 48)
    assert len(training_runs_for(engine, "big")) == 3
    assert len(training_runs_for(engine)) == 4
    engine.dispose()


# -- the CLI --------------------------------------------------------------------------------------


runner = CliRunner()


@pytest.mark.parametrize("url", ["garbage://x", "mysql://x/y", "sqlite:////nonexistent/dir/x.db"])
@pytest.mark.parametrize("command", [["training", "list"], ["report"], ["keys", "list"],
                                     ["budgets", "list"], ["ledger", "upgrade"]])
def test_cli_a_ledger_it_cannot_open_is_a_bad_parameter_not_a_traceback(command, url):
    result = runner.invoke(app, [*command, "--ledger", url])
    assert result.exit_code == 2, result.output
    assert "cannot open it" in result.output


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_add_estimate_record_and_list(ledger_url):
    out = invoke("training", "add", "--model", "llama", "--version", "2", "--device",
                 "nvidia-a100-80gb", "--hours", "12", "--gpus", "8", "--pricing", "spot",
                 "--ledger", ledger_url)
    assert "$150.72" in out
    out = invoke("training", "estimate", "--params", "70e9", "--tokens", "2e12", "--device",
                 "nvidia-a100-80gb", "--gpus", "2048", "--ledger", ledger_url)
    assert "1,720,320" in out and "0.435" in out and "$8,719,958.02" in out
    engine = open_ledger(ledger_url)
    assert len(training_runs_for(engine)) == 1  # no --record: nothing written
    out = invoke("training", "estimate", "--params", "70e9", "--tokens", "2e12", "--device",
                 "nvidia-a100-80gb", "--mfu", "0.5", "--pricing", "on_prem", "--record",
                 "--model", "llama", "--version", "70b", "--ledger", ledger_url)
    assert "recorded as training run" in out
    [estimated] = training_runs_for(engine, "llama", "70b")
    assert estimated.source == "estimated" and estimated.pricing == "on_prem"
    assert estimated.params["mfu"] == 0.5
    assert estimated.device_hours == pytest.approx(8.4e23 / (312e12 * 0.5) / 3600)
    out = invoke("training", "list", "--ledger", ledger_url)
    assert "llama v2" in out and "llama v70b" in out and "2 runs" in out
    out = invoke("training", "list", "--model", "llama", "--version", "2", "--ledger", ledger_url)
    assert "llama v70b" not in out and "$150.72" in out
    engine.dispose()


def test_cli_gpu_hours_and_started_are_taken_as_given(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    out = invoke("training", "estimate", "--device", "nvidia-a100-80gb", "--gpu-hours",
                 "1720320", "-N", "70e9", "-D", "2e12", "--pricing", "spot")
    assert "0.435" in out and "$2,700,902.40" in out
    invoke("training", "add", "-m", "m", "-v", "1", "--device", "nvidia-t4", "--hours", "2",
           "--started", "2025-01-02T03:04:05", "--ledger", url)
    [run] = training_runs_for(open_ledger(url), "m", "1")
    assert run.started_at == 1735787045.0  # 2025-01-02 03:04:05 UTC


def test_cli_uses_the_ledger_from_the_environment_or_the_working_directory(tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FRUGALSERVE_LEDGER", raising=False)
    invoke("training", "add", "-m", "m", "-v", "1", "--device", "nvidia-t4", "--hours", "1")
    assert (tmp_path / "frugalserve-ledger.db").exists()
    other = tmp_path / "other.db"
    monkeypatch.setenv("FRUGALSERVE_LEDGER", f"sqlite:///{other}")
    invoke("training", "add", "-m", "m", "-v", "2", "--device", "nvidia-t4", "--hours", "1")
    assert [r.version for r in training_runs_for(open_ledger(f"sqlite:///{other}"))] == ["2"]


@pytest.mark.parametrize("args,expect", [
    (["add", "-m", "m", "-v", "1", "--device", "no-such-gpu", "--hours", "1"], "no-such-gpu"),
    (["add", "-m", "m", "-v", "1", "--device", "nvidia-t4", "--hours", "1", "--pricing",
      "reserved"], "reserved"),
    (["estimate", "--device", "aws-c7i.large", "-N", "1e6", "-D", "1e9"], "peak_flops"),
    (["estimate", "--device", "nvidia-t4", "-N", "1e6", "-D", "1e9", "--record"], "--model"),
    # OverflowError from SQLite's INTEGER, with a traceback
    (["add", "-m", "m", "-v", "1", "--device", "nvidia-t4", "--hours", "1", "--gpus",
      "100000000000000000000"], "devices must be in"),
])
def test_cli_errors_say_what_is_wrong_and_write_nothing(tmp_path, args, expect):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    result = runner.invoke(app, ["training", *args, "--ledger", url])
    assert result.exit_code == 2
    assert expect in result.output
    assert training_runs_for(open_ledger(url)) == []

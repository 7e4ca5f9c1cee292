"""The rate card: what each device costs per hour, with where the price came from.

Three pricing bases: `on_demand` and `spot` are rental prices read off a cloud price list;
`on_prem` is what owning the device costs per hour of use (see `OnPremCost`). GPUs also carry
their peak dense tensor FLOP/s, which the training estimator needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PRICING_BASES = ("on_demand", "spot", "on_prem")
# A rack-scale system rents for hundreds of dollars an hour. The ledger keeps a batch's cost in
# int64 pico-dollars ($9.2 million): under this cap only a batch computing for over 92 hours
# could pass it, where a price typed a thousand times too high would have in hours.
MAX_USD_PER_HOUR = 100_000
HOURS_PER_YEAR = Decimal(8760)

_ON_PREM_KEYS = {"purchase_usd", "lifetime_years", "hours_per_year", "watts",
                 "electricity_usd_per_kwh", "pue", "ops_usd_per_hour", "source", "date"}


class RateCardError(ValueError):
    """A rate card file or a device lookup is wrong; the message names which and why."""


@dataclass(frozen=True, slots=True)
class OnPremCost:
    """Owning a device, per hour of use:

        purchase / (lifetime_years x hours_per_year) + watts/1000 x $/kWh x PUE + ops $/h

    `hours_per_year` is the hours the device is in use (8760: always): capital is spread over
    the hours that do work, so a half-idle device costs twice as much per hour of use. Power is
    counted only while in use; idle draw is left out, which slightly flatters low utilization.
    """

    purchase_usd: Decimal
    lifetime_years: Decimal
    hours_per_year: Decimal
    watts: Decimal  # power drawn per device in use, its share of the host included if known
    electricity_usd_per_kwh: Decimal
    pue: Decimal  # facility power over IT power: cooling and distribution losses
    ops_usd_per_hour: Decimal  # staff, space, support contracts: zero unless you know yours
    source: str
    date: str

    def capital_usd_per_hour(self) -> Decimal:
        return self.purchase_usd / (self.lifetime_years * self.hours_per_year)

    def power_usd_per_hour(self) -> Decimal:
        return self.watts / 1000 * self.electricity_usd_per_kwh * self.pue

    def usd_per_hour(self) -> Decimal:
        return self.capital_usd_per_hour() + self.power_usd_per_hour() + self.ops_usd_per_hour


@dataclass(frozen=True, slots=True)
class DevicePrice:
    key: str
    kind: str
    description: str
    on_demand_usd_per_hour: Decimal | None  # None only for a device priced on-prem alone
    spot_usd_per_hour: Decimal | None
    watts: float
    source: str
    date: str
    peak_flops: float | None = None  # dense BF16/FP16 tensor FLOP/s of one device
    peak_flops_source: str | None = None
    on_prem: OnPremCost | None = None

    def usd_per_hour(self, pricing: str = "on_demand") -> Decimal:
        if pricing == "on_demand":
            if self.on_demand_usd_per_hour is None:
                raise RateCardError(f"device '{self.key}' has no on-demand price")
            return self.on_demand_usd_per_hour
        if pricing == "spot":
            if self.spot_usd_per_hour is None:
                raise RateCardError(f"device '{self.key}' has no spot price")
            return self.spot_usd_per_hour
        if pricing == "on_prem":
            if self.on_prem is None:
                raise RateCardError(f"device '{self.key}' has no on-prem cost; give it an "
                                    "on_prem block with purchase_usd, source and date")
            return self.on_prem.usd_per_hour()
        raise RateCardError(f"unknown pricing basis {pricing!r}; use one of {PRICING_BASES}")


def _money(value: object, where: str, what: str = "a price") -> Decimal:
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise RateCardError(f"{where}: {value!r} is not {what}") from exc
    if not amount.is_finite():
        raise RateCardError(f"{where}: {value!r} is not {what}")
    if amount < 0:
        raise RateCardError(f"{where}: {what} cannot be negative")
    return amount


def _positive(value: object, where: str) -> Decimal:
    amount = _money(value, where)
    if amount == 0:
        raise RateCardError(f"{where}: must be greater than zero")
    return amount


def _flops(value: object, where: str) -> float:
    # YAML reads 312e12 as a string (its floats need a dot and a signed exponent): accept both
    try:
        flops = float(str(value))
    except ValueError:
        raise RateCardError(f"{where}: peak_flops {value!r} is not a number") from None
    if not 0 < flops < math.inf:
        raise RateCardError(f"{where}: peak_flops must be a finite number greater than zero")
    return flops


def _parse_on_prem(raw: object, defaults: dict[str, Any], device_watts: float,
                   where: str) -> OnPremCost:
    where = f"{where}: on_prem"
    if not isinstance(raw, dict):
        raise RateCardError(f"{where} must be a mapping")
    unknown = sorted(set(raw) - _ON_PREM_KEYS)
    if unknown:
        raise RateCardError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(_ON_PREM_KEYS))}")
    missing = [k for k in ("purchase_usd", "source", "date") if raw.get(k) in (None, "")]
    merged = {"hours_per_year": HOURS_PER_YEAR, "ops_usd_per_hour": 0, "watts": device_watts,
              **defaults, **raw}
    missing += [k for k in ("lifetime_years", "electricity_usd_per_kwh", "pue")
                if merged.get(k) in (None, "")]
    if missing:
        raise RateCardError(f"{where} lacks {', '.join(missing)}")
    # the device's own source and date cover its purchase price; the defaults' cover the rest
    shared = defaults.get("source")
    if shared and defaults.get("date"):
        shared = f"{shared} (as of {defaults['date']})"
    source = "; ".join(str(s) for s in (raw["source"], shared) if s)
    pue = _positive(merged["pue"], f"{where}.pue")
    if pue < 1:
        raise RateCardError(f"{where}.pue: {pue} is below 1; PUE is facility over IT power")
    hours = _positive(merged["hours_per_year"], f"{where}.hours_per_year")
    if hours > HOURS_PER_YEAR:
        raise RateCardError(f"{where}.hours_per_year: {hours} is more than a year has (8760)")
    return OnPremCost(
        purchase_usd=_money(merged["purchase_usd"], f"{where}.purchase_usd"),
        lifetime_years=_positive(merged["lifetime_years"], f"{where}.lifetime_years"),
        hours_per_year=hours,
        watts=_money(merged["watts"], f"{where}.watts"),
        electricity_usd_per_kwh=_money(merged["electricity_usd_per_kwh"],
                                       f"{where}.electricity_usd_per_kwh"),
        pue=pue,
        ops_usd_per_hour=_money(merged["ops_usd_per_hour"], f"{where}.ops_usd_per_hour"),
        source=source,
        date=str(raw["date"]),
    )


def _parse_device(key: str, raw: object, origin: str,
                  on_prem_defaults: dict[str, Any]) -> DevicePrice:
    where = f"{origin}: device '{key}'"
    if not isinstance(raw, dict):
        raise RateCardError(f"{where} must be a mapping")
    missing = [f for f in ("source", "date") if f not in raw]
    if "on_demand_usd_per_hour" not in raw and "on_prem" not in raw:
        missing.insert(0, "on_demand_usd_per_hour")  # a device needs at least one price
    if missing:
        raise RateCardError(f"{where} lacks {', '.join(missing)}")
    on_demand = raw.get("on_demand_usd_per_hour")
    spot = raw.get("spot_usd_per_hour")
    peak = raw.get("peak_flops")
    watts = float(_money(raw.get("watts", 0), f"{where}.watts", "a number of watts"))
    on_prem = raw.get("on_prem")
    device = DevicePrice(
        key=key,
        kind=str(raw.get("kind", "cpu")),
        description=str(raw.get("description", key)),
        on_demand_usd_per_hour=None if on_demand is None else _money(on_demand, where),
        spot_usd_per_hour=None if spot is None else _money(spot, where),
        watts=watts,
        source=str(raw["source"]),
        date=str(raw["date"]),
        peak_flops=None if peak is None else _flops(peak, where),
        peak_flops_source=raw.get("peak_flops_source"),
        on_prem=(None if on_prem is None
                 else _parse_on_prem(on_prem, on_prem_defaults, watts, where)),
    )
    for pricing, given in zip(PRICING_BASES, (on_demand, spot, on_prem), strict=True):
        if given is not None and device.usd_per_hour(pricing) > MAX_USD_PER_HOUR:
            raise RateCardError(f"{where}: {pricing} ${device.usd_per_hour(pricing):,f}/h is over "
                                f"${MAX_USD_PER_HOUR:,}/h, more than any device costs (a typo?)")
    return device


@dataclass(frozen=True)
class _CardFile:
    """One YAML file, read but not yet priced: on-prem defaults may come from a later file."""

    origin: str
    devices: dict[str, Any]
    on_prem_defaults: dict[str, Any]


def _read(text: str, origin: str) -> _CardFile:
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RateCardError(f"{origin}: not valid YAML: {exc}") from exc
    devices = doc.get("devices") if isinstance(doc, dict) else None
    if not isinstance(devices, dict):
        raise RateCardError(f"{origin}: expected a top-level 'devices' mapping")
    defaults = doc.get("on_prem_defaults") or {}
    if not isinstance(defaults, dict):
        raise RateCardError(f"{origin}: on_prem_defaults must be a mapping")
    _check_defaults(defaults, f"{origin}: on_prem_defaults")
    return _CardFile(origin, devices, defaults)


def _check_defaults(defaults: dict[str, Any], where: str) -> None:
    """Reject bad defaults here, naming their own file, not each device they would apply to."""
    unknown = sorted(set(defaults) - _ON_PREM_KEYS)
    if unknown:
        raise RateCardError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(_ON_PREM_KEYS))}")
    for key in sorted(set(defaults) - {"source", "date"}):
        _money(defaults[key], f"{where}.{key}")
    for key in ("lifetime_years", "hours_per_year", "pue"):
        if key in defaults:
            _positive(defaults[key], f"{where}.{key}")
    if "pue" in defaults and Decimal(str(defaults["pue"])) < 1:
        raise RateCardError(f"{where}.pue: below 1; PUE is facility over IT power")


def _price(files: list[_CardFile]) -> dict[str, DevicePrice]:
    """Later files replace earlier devices whole; on-prem defaults merge key by key, and the
    merged defaults apply to every device, so one electricity price set by the user reprices
    the shipped on-prem entries too."""
    defaults: dict[str, Any] = {}
    for f in files:
        defaults |= f.on_prem_defaults
    devices: dict[str, DevicePrice] = {}
    for f in files:
        for key, raw in f.devices.items():
            devices[key] = _parse_device(key, raw, f.origin, defaults)
    return devices


@dataclass(frozen=True)
class RateCard:
    devices: dict[str, DevicePrice]

    @classmethod
    def load(cls, override: Path | None = None) -> RateCard:
        """The shipped card, with the user's entries (if any) replacing or adding devices."""
        shipped = resources.files(__package__).joinpath("ratecard.yaml").read_text()
        files = [_read(shipped, "shipped rate card")]
        if override is not None:
            try:
                text = Path(override).read_text()
            except OSError as exc:
                raise RateCardError(f"{override}: cannot read: {exc.strerror}") from exc
            except UnicodeDecodeError as exc:
                raise RateCardError(f"{override}: not a text file ({exc.reason})") from exc
            files.append(_read(text, str(override)))
        return cls(_price(files))

    def device(self, key: str) -> DevicePrice:
        try:
            return self.devices[key]
        except KeyError:
            known = ", ".join(sorted(self.devices))
            raise RateCardError(f"unknown device '{key}'; the rate card has: {known}") from None

"""The rate card: what each device costs per hour, with where the price came from."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path

import yaml

PRICING_BASES = ("on_demand", "spot")


class RateCardError(ValueError):
    """A rate card file or a device lookup is wrong; the message names which and why."""


@dataclass(frozen=True, slots=True)
class DevicePrice:
    key: str
    kind: str
    description: str
    on_demand_usd_per_hour: Decimal
    spot_usd_per_hour: Decimal | None
    watts: float
    source: str
    date: str

    def usd_per_hour(self, pricing: str = "on_demand") -> Decimal:
        if pricing == "on_demand":
            return self.on_demand_usd_per_hour
        if pricing == "spot":
            if self.spot_usd_per_hour is None:
                raise RateCardError(f"device '{self.key}' has no spot price")
            return self.spot_usd_per_hour
        raise RateCardError(f"unknown pricing basis {pricing!r}; use one of {PRICING_BASES}")


def _money(value: object, where: str) -> Decimal:
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise RateCardError(f"{where}: {value!r} is not a price") from exc
    if amount < 0:
        raise RateCardError(f"{where}: a price cannot be negative")
    return amount


def _parse_device(key: str, raw: object, origin: str) -> DevicePrice:
    where = f"{origin}: device '{key}'"
    if not isinstance(raw, dict):
        raise RateCardError(f"{where} must be a mapping")
    missing = [f for f in ("on_demand_usd_per_hour", "source", "date") if f not in raw]
    if missing:
        raise RateCardError(f"{where} lacks {', '.join(missing)}")
    spot = raw.get("spot_usd_per_hour")
    return DevicePrice(
        key=key,
        kind=str(raw.get("kind", "cpu")),
        description=str(raw.get("description", key)),
        on_demand_usd_per_hour=_money(raw["on_demand_usd_per_hour"], where),
        spot_usd_per_hour=None if spot is None else _money(spot, where),
        watts=float(raw.get("watts", 0)),
        source=str(raw["source"]),
        date=str(raw["date"]),
    )


def _read(text: str, origin: str) -> dict[str, DevicePrice]:
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RateCardError(f"{origin}: not valid YAML: {exc}") from exc
    devices = doc.get("devices") if isinstance(doc, dict) else None
    if not isinstance(devices, dict):
        raise RateCardError(f"{origin}: expected a top-level 'devices' mapping")
    return {key: _parse_device(key, raw, origin) for key, raw in devices.items()}


@dataclass(frozen=True)
class RateCard:
    devices: dict[str, DevicePrice]

    @classmethod
    def load(cls, override: Path | None = None) -> RateCard:
        """The shipped card, with the user's entries (if any) replacing or adding devices."""
        shipped = resources.files(__package__).joinpath("ratecard.yaml").read_text()
        devices = _read(shipped, "shipped rate card")
        if override is not None:
            try:
                text = Path(override).read_text()
            except OSError as exc:
                raise RateCardError(f"{override}: cannot read: {exc.strerror}") from exc
            devices |= _read(text, str(override))
        return cls(devices)

    def device(self, key: str) -> DevicePrice:
        try:
            return self.devices[key]
        except KeyError:
            known = ", ".join(sorted(self.devices))
            raise RateCardError(f"unknown device '{key}'; the rate card has: {known}") from None

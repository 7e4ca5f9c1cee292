"""Cost attribution: what a batch cost, and each request's exact share of it.

Money is integer pico-dollars (1e-12 USD). Integer micro-dollars, as first designed, round a
small model's prediction to zero (the demo's Fashion-MNIST MLP: about 6e-5 micro-dollars, 62
pico-dollars, under load), so nothing could be attributed; pico-dollars keep two to four
significant digits there and still sum exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal

PICO_PER_USD = 10**12
PICO_PER_MICRO = 10**6


def pico_to_usd(pico: int) -> Decimal:
    return Decimal(pico) / PICO_PER_USD


def format_usd(amount: Decimal | float | None, digits: int = 3) -> str:
    """Dollars for tables: fixed notation, `digits` significant digits ($0.000000123, never
    1.23e-07); "-" for no amount."""
    if amount is None:
        return "-"
    if amount == 0:
        return "$0"
    places = max(2, digits - 1 - math.floor(math.log10(abs(float(amount)))))
    return f"{'-' if amount < 0 else ''}${abs(amount):.{places}f}"


def exact_usd(pico: int) -> str:
    """Exact dollars for messages: $12.50, $0.000000123."""
    text = f"{Decimal(pico).scaleb(-12):f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def pico_to_micro(pico: int) -> float:
    """For display only (response parameters, tables); sums are always taken in pico-dollars."""
    return pico / PICO_PER_MICRO


@dataclass(frozen=True, slots=True)
class Meter:
    """Prices busy time on a share of a device: a batch that ran t seconds costs t·P·s/3600.

    t is the device time the batch used. For an engine computing on one CPU thread that is
    the thread's CPU time, not its wall time: batches and the event loop share the core, and
    billing each batch's wall time would bill the same core-second to every batch waiting on
    it (beside a busy thread on one core, the sum of wall times was 5.7x the thread's CPU time:
    bench/gil_wait.py, BENCHMARKS.md)."""

    usd_per_hour: Decimal
    share: float
    pico_per_second: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1:
            raise ValueError(f"device share must be in (0, 1], got {self.share}")
        rate = float(self.usd_per_hour * PICO_PER_USD / 3600) * self.share
        object.__setattr__(self, "pico_per_second", rate)

    def cost(self, seconds: float) -> int:
        return round(seconds * self.pico_per_second)


def split_evenly(total: int, n: int) -> list[int]:
    """split_cost with n equal weights (the common case: a batch of one-row requests), without
    the weights: the first `total % n` parts are one unit larger."""
    part, short = divmod(total, n)
    return [part + 1] * short + [part] * (n - short)


def split_cost(total: int, weights: list[int]) -> list[int]:
    """Split an integer amount in proportion to weights so that the parts sum to it exactly.

    Each part is floored; the remainder goes one unit at a time to the largest fractional
    parts (ties to the earliest), so no request pays more than one pico-dollar of rounding.
    """
    whole = sum(weights)
    if whole <= 0:
        raise ValueError("weights must sum to a positive number")
    if len(weights) == 1:
        return [total]
    if weights.count(weights[0]) == len(weights):
        return split_evenly(total, len(weights))
    parts = [total * w // whole for w in weights]
    short = total - sum(parts)
    if short:
        remainders = sorted(
            range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i)
        )
        for i in remainders[:short]:
            parts[i] += 1
    return parts

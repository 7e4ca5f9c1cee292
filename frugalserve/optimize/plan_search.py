"""Plan search: the cheapest way to serve a model that meets an accuracy and a p99 target.

Candidate plans are single variants and cascades (chains of 2-3 variants, cheaper first, the last
one the reference or a variant within the largest calibrated drop of it), each under every batch
setting (`max_batch_size` among the profiled batch sizes, a few `max_queue_delay_ms`). A cascade's
thresholds are calibrated (`cascade.calibrate`) at several levels of drop (none, half, all and
twice the allowed drop), with the stage costs of that batch size.

Cost, as the server's meter prices it (economics/meter.py): a batch that computed t seconds costs
t x $/h x share / 3600 and its items split it, so an item of a batch of b costs
mean_ms(b) / 1000 / b x $/h x share / 3600; a cascade item pays each stage it reached:
sum_k reach_k x cost_k. Quoted per 1M predictions.

Load: with no arrival rate given, the first stage's batches are assumed full (the server is
busy), and an item waits at most the queue delay for its batch. A later stage gets the rows its
predecessor escalates, which leave a batch together: its batches hold B x reach_k rows (at least
one). Through the server at 64 connections (bench/optimizer.py) the stages of a three-stage
cascade ran batches of 19, 11.7 and 4.2 rows at reaches 1, 0.52 and 0.14: proportional, as
modelled. Taking full batches at every stage instead made the last stage 2x too cheap and chose a
variant that is cheap only at large batches. With a rate (items/s), stage k sees rate x reach_k;
its batches hold min(B, 1 + rate_k x delay) items and an item waits until the batch is full or
the delay ends; the latency and cost at a fractional batch size are interpolated linearly between
the profiled sizes; a plan whose instance would be busy more than 100% of the time is dropped.

p99: an item answered at stage k took sum over j <= k of (wait_j + p99_j at its batch); the
plan's p99 is that of the first stage by which 99% of items are answered (escalated items count
in the tail only when more than 1% escalate).

Accuracy target: a plan's drop is measured paired against the reference on the same
validation rows, plus `margin_z` standard errors of that difference (cascade.drop_bound): the
cheapest of many plans that just meet a target on validation tends to fall short on new data,
and the margin pays for that. Cascades are calibrated to the same bound.

The Pareto frontier is over (accuracy up, cost down, p99 down). The chosen plan is the cheapest
whose drop bound is <= the max drop and whose p99 <= target. Tiers share its batch
setting (plan.yaml has one): premium = the reference alone, standard = the chosen plan, economy =
the cheapest plan meeting the p99 target whatever its accuracy. The saving against the
counterfactual (the reference at batch 1) is split into levers: batching (the reference at the
chosen batch setting), variant (the cheapest single variant there meeting both targets) and
cascade (the rest).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np

from ..economics.meter import PICO_PER_USD, Meter
from ..repository.plan import REFERENCE
from .cascade import calibrate, drop_bound, routed_correct
from .profile import Predictions, Profile

DELAYS_MS = (1.0, 2.0, 5.0, 10.0)
TIERS = ("premium", "standard", "economy")
P99 = 0.99
_EPS = 1e-9


@dataclass(frozen=True)
class VariantStats:
    """What the search needs of one variant: validation accuracy, per-row correctness and
    confidence (cascade stages), mean and p99 ms of one call per profiled batch size."""

    name: str
    accuracy: float
    mean_ms: Mapping[int, float]
    p99_ms: Mapping[int, float]
    correct: np.ndarray | None = None
    confidence: np.ndarray | None = None

    @classmethod
    def from_profile(cls, profile: Profile, predictions: Predictions | None = None,
                     y: np.ndarray | None = None) -> VariantStats:
        correct = None if predictions is None or y is None else predictions.correct(y)
        confidence = None if predictions is None else predictions.confidence
        return cls(profile.variant, profile.accuracy,
                   {b: v.mean_ms if v.trimmed_mean_ms is None else v.trimmed_mean_ms
                    for b, v in profile.latency.items()},
                   {b: v.p99_ms for b, v in profile.latency.items()}, correct, confidence)

    def at(self, batch: float) -> tuple[float, float]:
        """(mean ms, p99 ms) of one call of `batch` rows, linear between profiled sizes."""
        sizes = sorted(self.mean_ms)
        return (float(np.interp(batch, sizes, [self.mean_ms[b] for b in sizes])),
                float(np.interp(batch, sizes, [self.p99_ms[b] for b in sizes])))


@dataclass(frozen=True)
class Price:
    """A share of a priced device, as config.yaml's `device` and the rate card give it."""

    usd_per_hour: Decimal
    share: float
    device: str = ""
    pricing: str = "on_demand"
    pico_per_second: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pico_per_second",
                           Meter(self.usd_per_hour, self.share).pico_per_second)

    def usd_per_1m(self, ms_per_call: float, batch: float) -> float:
        """What 1M predictions cost when each call of `batch` rows takes `ms_per_call`."""
        return ms_per_call / 1000 / batch * self.pico_per_second * 1e6 / PICO_PER_USD


@dataclass(frozen=True, order=True)
class Batching:
    max_batch_size: int
    max_queue_delay_ms: float

    def label(self) -> str:
        if self.max_batch_size == 1:
            return "1"
        return f"{self.max_batch_size} / {self.max_queue_delay_ms:g} ms"


@dataclass(frozen=True)
class Targets:
    max_accuracy_drop: float  # a fraction: 0.005 is half a percentage point
    p99_ms: float
    margin_z: float = 1.0  # standard errors of the paired drop kept as a safety margin

    def __post_init__(self) -> None:
        if not 0 <= self.max_accuracy_drop < 1:
            raise ValueError(f"max accuracy drop must be in [0, 1), got {self.max_accuracy_drop}")
        if not self.p99_ms > 0:
            raise ValueError(f"the p99 target must be > 0 ms, got {self.p99_ms}")
        if not self.margin_z >= 0:
            raise ValueError(f"the safety margin must be >= 0 standard errors, got "
                             f"{self.margin_z}")


@dataclass(frozen=True)
class PlanOption:
    stages: tuple[str, ...]
    thresholds: tuple[float, ...]  # one per stage but the last
    batching: Batching
    accuracy: float  # validation
    cost_per_1m_usd: float
    p99_ms: float
    reach: tuple[float, ...]  # fraction of items reaching each stage
    batch_rows: tuple[float, ...]  # expected rows per batch at each stage
    drop_bound: float = 0.0  # paired drop vs the reference + margin (validation), a fraction

    @property
    def is_cascade(self) -> bool:
        return len(self.stages) > 1

    def label(self) -> str:
        return " → ".join(self.stages)

    def key(self) -> tuple:
        return self.stages, self.thresholds, self.batching


@dataclass(frozen=True)
class Lever:
    name: str  # batching, variant, cascade
    usd_per_1m: float  # saving per 1M predictions this lever made
    share: float  # of the whole saving
    detail: str


@dataclass
class SearchResult:
    reference_accuracy: float
    targets: Targets
    price: Price
    rate_rps: float | None
    plans: list[PlanOption]
    frontier: list[PlanOption]
    counterfactual: PlanOption  # the reference at batch 1
    chosen: PlanOption | None  # None: no plan meets both targets
    tiers: dict[str, PlanOption] = field(default_factory=dict)
    levers: list[Lever] = field(default_factory=list)

    @property
    def saving_usd_per_1m(self) -> float:
        return 0.0 if self.chosen is None else (self.counterfactual.cost_per_1m_usd
                                                - self.chosen.cost_per_1m_usd)

    @property
    def saving_factor(self) -> float:
        if self.chosen is None or self.chosen.cost_per_1m_usd <= 0:
            return 1.0
        return self.counterfactual.cost_per_1m_usd / self.chosen.cost_per_1m_usd


# -- evaluating one plan under one batch setting -------------------------------------------------

def _stage_timing(v: VariantStats, batching: Batching, rate: float | None,
                  reach: float = 1.0) -> tuple[float, float, float, float] | None:
    """(rows per batch, queue wait ms, mean ms, p99 ms) of one stage that `reach` of the items
    get to; `rate`: the items/s arriving at it (None: saturated). None if overloaded."""
    size, delay = batching.max_batch_size, batching.max_queue_delay_ms
    if size == 1:
        rows, wait = 1.0, 0.0
    elif rate is None:
        rows, wait = max(1.0, size * reach), delay
    else:
        fill_ms = (size - 1) / rate * 1000 if rate > 0 else math.inf
        rows, wait = ((float(size), fill_ms) if fill_ms <= delay
                      else (1.0 + rate * delay / 1000, delay))
    mean, p99 = v.at(rows)
    if rate is not None and rate / rows * mean / 1000 > 1:
        return None  # the instance cannot keep up: more replicas are a different plan
    return rows, wait, mean, p99


def evaluate_option(stages: Sequence[VariantStats], thresholds: tuple[float, ...],
                    accuracy: float, reach: tuple[float, ...], batching: Batching, price: Price,
                    rate: float | None = None, bound: float = 0.0) -> PlanOption | None:
    """Cost and p99 of a chain (or one variant) with known accuracy and reach; None when an
    instance would be overloaded at `rate`."""
    cost, path_ms, answered, p99 = 0.0, 0.0, 0.0, None
    rows_per_batch = []
    for k, v in enumerate(stages):
        timing = _stage_timing(v, batching, None if rate is None else rate * reach[k],
                               reach[k])
        if timing is None:
            return None
        rows, wait, mean, stage_p99 = timing
        rows_per_batch.append(rows)
        cost += reach[k] * price.usd_per_1m(mean, rows)
        path_ms += wait + stage_p99
        answered += reach[k] - (reach[k + 1] if k + 1 < len(stages) else 0.0)
        if p99 is None and answered >= P99 - _EPS:
            p99 = path_ms
    return PlanOption(tuple(v.name for v in stages), thresholds, batching, accuracy, cost,
                      path_ms if p99 is None else p99, reach, tuple(rows_per_batch), bound)


# -- enumerating plans ------------------------------------------------------------------------

def batch_settings(sizes: Iterable[int], delays_ms: Iterable[float]) -> list[Batching]:
    """Batch 1 (no queue delay) and every larger size with every delay."""
    out = [Batching(1, 0.0)] if 1 in set(sizes) else []
    out += [Batching(b, float(d)) for b in sorted(set(sizes)) if b > 1 for d in delays_ms]
    return out


def accuracy_levels(max_drop: float) -> tuple[float, ...]:
    """Drops from the reference a cascade is calibrated for: none, half, all and twice the
    allowed drop (the last two fill the frontier below the target)."""
    return tuple(sorted({0.0, max_drop / 2, max_drop, 2 * max_drop}))


def chains(variants: Sequence[VariantStats], costs: Mapping[str, float],
           reference: VariantStats, slack: float = 0.0) -> list[tuple[VariantStats, ...]]:
    """Chains of 2-3 variants in strictly rising cost whose stages but the last have a
    confidence to route on and whose last stage is the reference or at most `slack` less
    accurate (calibration then holds the whole chain to the target: an int8 copy 0.06 points
    below the reference, and 2x cheaper at small batches, is a fair last stage)."""
    usable = sorted((v for v in variants if v.correct is not None), key=lambda v: costs[v.name])
    out = []
    for length in (2, 3):
        for chain in itertools.combinations(usable, length):
            last = chain[-1]
            if last.name != reference.name and last.accuracy < reference.accuracy - slack:
                continue
            if any(v.confidence is None for v in chain[:-1]):
                continue
            if all(costs[a.name] < costs[b.name] for a, b in itertools.pairwise(chain)):
                out.append(chain)
    return out


def _calibrated(chain: Sequence[VariantStats], costs: Mapping[str, float],
                reference: VariantStats, levels: Sequence[float],
                margin_z: float) -> list[tuple[tuple[float, ...], float, tuple, float]]:
    """(thresholds, accuracy, reach, drop bound) per accuracy level, skipping cascades in which
    a stage but the last answers nothing or everything (shorter plans, at a higher cost)."""
    found = {}
    for level in levels:
        cal = calibrate([v.correct for v in chain], [v.confidence for v in chain],
                        [costs[v.name] for v in chain], reference.accuracy - level,
                        reference_correct=reference.correct, margin_z=margin_z)
        if cal is None:
            continue
        r = cal.reach
        if any(r[k + 1] <= 0 or r[k + 1] >= r[k] for k in range(len(r) - 1)):
            continue
        found[cal.thresholds] = (cal.thresholds, cal.accuracy, cal.reach, cal.drop_bound)
    return list(found.values())


def _single_bound(v: VariantStats, reference: VariantStats, margin_z: float) -> float:
    if v.correct is None or reference.correct is None:
        return max(0.0, reference.accuracy - v.accuracy)  # no rows to pair: the point drop
    return drop_bound(reference.correct, v.correct, margin_z)


def option_correct(stages: Sequence[VariantStats], thresholds: Sequence[float]) -> np.ndarray:
    """Per validation row: does the plan answer it right."""
    return routed_correct([v.correct for v in stages], [v.confidence for v in stages],
                          thresholds)[0]


def enumerate_plans(variants: Sequence[VariantStats], price: Price, *,
                    reference: str = REFERENCE, batch_sizes: Sequence[int] | None = None,
                    delays_ms: Sequence[float] = DELAYS_MS, rate_rps: float | None = None,
                    levels: Sequence[float] = (0.0,), margin_z: float = 0.0) -> list[PlanOption]:
    ref = _by_name(variants, reference)
    common = set.intersection(*(set(v.mean_ms) for v in variants))
    sizes = sorted(common if batch_sizes is None else common & set(batch_sizes))
    if not sizes:
        raise ValueError("no batch size was profiled for every variant")
    plans: dict[tuple, PlanOption] = {}
    for size in sizes:
        costs = {v.name: price.usd_per_1m(v.mean_ms[size], size) for v in variants}
        options = [((v,), (), v.accuracy, (1.0,), _single_bound(v, ref, margin_z))
                   for v in variants]
        for chain in chains(variants, costs, ref, max(levels)):
            options += [(chain, *found) for found
                        in _calibrated(chain, costs, ref, levels, margin_z)]
        for batching in batch_settings([size], delays_ms):
            for stages, thresholds, accuracy, reach, bound in options:
                option = evaluate_option(stages, thresholds, accuracy, reach, batching, price,
                                         rate_rps, bound)
                if option is not None:
                    plans[option.key()] = option
    return list(plans.values())


def _by_name(variants: Sequence[VariantStats], name: str) -> VariantStats:
    for v in variants:
        if v.name == name:
            return v
    raise ValueError(f"no variant named {name!r} among {[v.name for v in variants]}")


# -- choosing -----------------------------------------------------------------------------------

def pareto(plans: Sequence[PlanOption]) -> list[PlanOption]:
    """Plans no other plan beats on accuracy, cost and p99 at once, cheapest first."""
    if not plans:
        return []
    acc = np.array([p.accuracy for p in plans])
    cost = np.array([p.cost_per_1m_usd for p in plans])
    p99 = np.array([p.p99_ms for p in plans])
    keep = []
    for i in range(len(plans)):
        no_worse = (acc >= acc[i] - _EPS) & (cost <= cost[i] * (1 + _EPS)) & (p99 <= p99[i] + _EPS)
        better = ((acc > acc[i] + _EPS) | (cost < cost[i] * (1 - _EPS))
                  | (p99 < p99[i] - _EPS))
        if not np.any(no_worse & better):
            keep.append(plans[i])
    # equal on all three (the same numbers by different routes): keep one
    unique: dict[tuple, PlanOption] = {}
    for p in sorted(keep, key=_rank):
        unique.setdefault((round(p.accuracy, 12), round(p.cost_per_1m_usd, 15),
                           round(p.p99_ms, 9)), p)
    return sorted(unique.values(), key=_rank)


def _rank(p: PlanOption) -> tuple:
    return p.cost_per_1m_usd, -p.accuracy, p.p99_ms, len(p.stages), p.batching


def _cheapest(plans: Iterable[PlanOption]) -> PlanOption | None:
    return min(plans, key=_rank, default=None)


def search(variants: Sequence[VariantStats], price: Price, targets: Targets, *,
           reference: str = REFERENCE, batch_sizes: Sequence[int] | None = None,
           delays_ms: Sequence[float] = DELAYS_MS, rate_rps: float | None = None) -> SearchResult:
    """Every plan, the frontier, the chosen plan, its tiers and the levers of its saving."""
    ref = _by_name(variants, reference)
    if 1 not in ref.mean_ms:
        raise ValueError("the reference needs a batch-1 profile: it is the counterfactual")
    plans = enumerate_plans(variants, price, reference=reference, batch_sizes=batch_sizes,
                            delays_ms=delays_ms, rate_rps=rate_rps,
                            levels=accuracy_levels(targets.max_accuracy_drop),
                            margin_z=targets.margin_z)
    counterfactual = evaluate_option((ref,), (), ref.accuracy, (1.0,), Batching(1, 0.0), price,
                                     rate_rps)
    if counterfactual is None:
        raise ValueError(f"the reference at batch 1 cannot keep up with {rate_rps} items/s")
    def meets(p: PlanOption, accuracy: bool = True) -> bool:
        return p.p99_ms <= targets.p99_ms + _EPS and (
            not accuracy or p.drop_bound <= targets.max_accuracy_drop + _EPS)

    result = SearchResult(ref.accuracy, targets, price, rate_rps, plans, pareto(plans),
                          counterfactual, _cheapest(p for p in plans if meets(p)))
    chosen = result.chosen
    if chosen is None:
        return result
    same = [p for p in plans if p.batching == chosen.batching]
    premium = next(p for p in same if p.stages == (reference,))
    economy = _cheapest(p for p in same if meets(p, accuracy=False))
    result.tiers = {"premium": premium, "standard": chosen, "economy": economy or chosen}
    best_single = _cheapest(p for p in same if not p.is_cascade and meets(p)) or premium
    result.levers = levers(counterfactual, premium, best_single, chosen)
    return result


def levers(counterfactual: PlanOption, reference_batched: PlanOption, best_single: PlanOption,
           chosen: PlanOption) -> list[Lever]:
    """The saving from the counterfactual to the chosen plan, step by step."""
    steps = [("batching", counterfactual, reference_batched,
              f"reference: batch 1 → batch {reference_batched.batching.label()}"),
             ("variant", reference_batched, best_single,
              f"reference → {best_single.label()} (best single variant)"),
             ("cascade", best_single, chosen,
              f"{best_single.label()} → cascade {chosen.label()}" if chosen.is_cascade
              else "no cascade")]
    total = counterfactual.cost_per_1m_usd - chosen.cost_per_1m_usd
    out = []
    for name, before, after, detail in steps:
        saved = before.cost_per_1m_usd - after.cost_per_1m_usd
        out.append(Lever(name, saved, saved / total if total > 0 else 0.0, detail))
    return out


# -- plan.yaml ----------------------------------------------------------------------------------

def _sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def tier_stages(option: PlanOption) -> list[dict[str, Any]]:
    stages: list[dict[str, Any]] = [{"variant": name, "threshold": float(t)}
                                    for name, t in zip(option.stages, option.thresholds,
                                                       strict=False)]
    stages.append({"variant": option.stages[-1]})
    return stages


def option_estimate(option: PlanOption) -> dict[str, Any]:
    return {"plan": option.label(), "accuracy": round(option.accuracy, 6),
            "drop_bound_pp": round(option.drop_bound * 100, 4),
            "cost_per_1m_usd": _sig(option.cost_per_1m_usd), "p99_ms": round(option.p99_ms, 4),
            "escalation": [round(r, 6) for r in option.reach[1:]],
            "rows_per_batch": [round(r, 3) for r in option.batch_rows]}


def plan_document(result: SearchResult, version: str, *,
                  confidence_output: str = "probabilities",
                  tests: Mapping[str, tuple[float, tuple[float, ...]]] | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """plan.yaml as a dict (the contract of repository/plan.py); `tests` adds each tier's
    test-set accuracy and escalation beside the validation estimate."""
    chosen = result.chosen
    if chosen is None:
        raise ValueError("no plan meets the targets: nothing to write")
    estimate_tiers = {}
    for tier, option in result.tiers.items():
        est = option_estimate(option)
        if tests and tier in tests:
            accuracy, reach = tests[tier]
            est["test_accuracy"] = round(accuracy, 6)
            est["test_escalation"] = [round(r, 6) for r in reach[1:]]
        estimate_tiers[tier] = est
    price = result.price
    estimate: dict[str, Any] = {
        "reference_accuracy": round(result.reference_accuracy, 6),
        "targets": {"max_accuracy_drop_pp": round(result.targets.max_accuracy_drop * 100, 6),
                    "p99_ms": result.targets.p99_ms, "margin_z": result.targets.margin_z},
        "device": {"type": price.device, "pricing": price.pricing, "share": price.share,
                   "usd_per_hour": str(price.usd_per_hour)},
        "load": ("saturated (full first-stage batches)" if result.rate_rps is None
                 else f"{result.rate_rps:g} items/s"),
        "counterfactual": option_estimate(result.counterfactual),
        "tiers": estimate_tiers,
        "saving": {"usd_per_1m": _sig(result.saving_usd_per_1m),
                   "factor": round(result.saving_factor, 3)},
        "levers": [{"lever": lv.name, "usd_per_1m": _sig(lv.usd_per_1m),
                    "share": round(lv.share, 4), "detail": lv.detail} for lv in result.levers],
        **dict(extra or {}),
    }
    return {
        "version": str(version),
        "default_tier": "standard",
        "tiers": {tier: {"stages": tier_stages(option)} for tier, option in result.tiers.items()},
        "confidence_output": confidence_output,
        "batching": {"max_batch_size": chosen.batching.max_batch_size,
                     "max_queue_delay_ms": float(chosen.batching.max_queue_delay_ms)},
        "estimate": estimate,
    }

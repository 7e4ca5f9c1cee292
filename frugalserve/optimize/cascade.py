"""Cascade calibration: confidence thresholds for an ordered chain of variants.

A cascade runs stage 1 on every item; an item whose confidence (the maximum of its probability
row) is below stage k's threshold goes on to stage k+1, and the last stage answers whatever
reaches it. An item pays for every stage it passed, so the expected cost per item is

    sum_k cost_k x reach_k       (reach_1 = 1; reach_k = fraction of items reaching stage k)

Calibration picks the thresholds, on validation predictions, that meet a minimum accuracy at the
lowest expected cost:

- two stages: exact. Accepting at stage 1 the items with confidence >= t is accepting a prefix of
  the items sorted by confidence (descending), cut where the confidence changes; cumulative sums
  give every cut's accuracy at once, and cost falls as the prefix grows, so the answer is the
  longest prefix that still meets the accuracy.
- three stages: for a fixed stage-1 cut, the rest is the two-stage problem on the escalated items
  (exact, in one pass over a presorted order). Every stage-1 cut is tried when there are at most
  `exhaustive` of them (exact); otherwise a grid of `grid` cuts at confidence quantiles, then the
  cuts between the grid neighbours of the best three grid points (thinned to `refine` each).

A safety margin (`margin_z` > 0, with the reference's per-item correctness): choosing the
cheapest thresholds that just meet the target on validation picks, among many, the one whose
validation luck was best, and it then loses more on new data. So the drop is measured paired,
against the reference on the same items (d_i = reference right - cascade right, in {-1, 0, 1}),
and the requirement is mean(d) + margin_z x SE(mean(d)) <= allowed drop, SE = std(d) / sqrt(n):
the disagreements, not the accuracy, are what is noisy, and pairing removes the rest.

Pure numpy; thresholds are confidences seen on validation, so the server's `confidence <
threshold` reproduces the validation routing exactly when the server computes the same
confidences. Engines do not always: measured on Fashion-MNIST (onnxruntime 1.32, one thread),
an int8-dynamic MLP's confidences move by up to 0.025 with the rows that share their batch
(activations are quantized per call, over the whole batch) and a logistic regression's by 4e-6
between batches of 1 and 256 (another kernel), while an fp32 or int8-static MLP's do not move.
For such stages the calibrated routing is an estimate; the test split's numbers check it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_REFINED = 3  # grid points refined around, best first

@dataclass(frozen=True)
class Calibration:
    thresholds: tuple[float, ...]  # one per stage but the last: escalate when confidence < t
    accuracy: float  # on the validation rows
    reach: tuple[float, ...]  # fraction of items reaching each stage (reach[0] = 1)
    expected_cost: float  # per item, in the units of the stage costs
    drop_bound: float  # paired drop vs the reference + margin_z standard errors (a fraction)

    @property
    def escalated(self) -> tuple[float, ...]:
        """Fraction of all items sent past each stage but the last."""
        return self.reach[1:]


def routed_correct(correct: Sequence[np.ndarray], confidence: Sequence[np.ndarray | None],
                   thresholds: Sequence[float]) -> tuple[np.ndarray, tuple[float, ...]]:
    """Per item: is the chain's answer right; and the fraction of items reaching each stage."""
    if len(thresholds) != len(correct) - 1:
        raise ValueError(f"{len(correct)} stages need {len(correct) - 1} thresholds")
    n = len(correct[0])
    pending = np.ones(n, dtype=bool)
    right = np.zeros(n, dtype=bool)
    reach = []
    for k, ok in enumerate(correct):
        reach.append(float(pending.mean()) if n else 0.0)
        if k == len(correct) - 1:
            right |= np.asarray(ok, dtype=bool) & pending
            break
        conf = confidence[k]
        if conf is None:
            raise ValueError(f"stage {k + 1} has no confidence output to route on")
        answered = pending & ~(np.asarray(conf) < thresholds[k])  # the server's rule: NaN stays
        right |= np.asarray(ok, dtype=bool) & answered
        pending &= ~answered
    return right, tuple(reach)


def evaluate(correct: Sequence[np.ndarray], confidence: Sequence[np.ndarray | None],
             thresholds: Sequence[float]) -> tuple[float, tuple[float, ...]]:
    """Accuracy and reach of a chain with these thresholds (validation or test predictions)."""
    right, reach = routed_correct(correct, confidence, thresholds)
    return (float(right.mean()) if len(right) else 0.0), reach


def _bound_count(losses: np.ndarray | int, wins: np.ndarray | int, n: int,
                 z: float) -> np.ndarray:
    """Paired drop in items (losses - wins) plus z standard errors of it, in items."""
    d = np.asarray(losses, dtype=np.float64) - wins
    spread = np.maximum(0.0, (np.asarray(losses, dtype=np.float64) + wins) - d * d / n)
    return d + z * np.sqrt(spread)


def drop_bound(reference_correct: np.ndarray, plan_correct: np.ndarray,
               margin_z: float = 0.0) -> float:
    """The plan's accuracy drop against the reference on the same items, plus `margin_z`
    standard errors of that paired difference; a fraction (0.005 = half a point)."""
    ref, plan = np.asarray(reference_correct, bool), np.asarray(plan_correct, bool)
    n = len(ref)
    if n == 0:
        return 0.0
    losses, wins = int(np.count_nonzero(ref & ~plan)), int(np.count_nonzero(~ref & plan))
    return float(_bound_count(losses, wins, n, margin_z)) / n


@dataclass(frozen=True)
class _Bound:
    """Feasibility of a cut: paired drop + z SE <= `allowed` items."""

    n: int
    allowed: float
    z: float

    def ok(self, losses: np.ndarray, wins: np.ndarray) -> np.ndarray:
        return _bound_count(losses, wins, self.n, self.z) <= self.allowed + 1e-9


def _routing_confidence(confidence: np.ndarray) -> np.ndarray:
    """Confidences as the server's `confidence < threshold` orders them: NaN is never below a
    threshold, so a NaN row is always answered, like one more confident than any other."""
    c = np.asarray(confidence, dtype=np.float64)
    return np.where(np.isnan(c), np.inf, c)


def _cuts(conf_sorted: np.ndarray) -> np.ndarray:
    """Prefix lengths j (1..n) that a threshold can make: accept the first j of the items sorted
    by confidence, descending; only where the next item's confidence is lower, and where the
    last accepted one's is finite (it becomes the threshold)."""
    n = len(conf_sorted)
    j = np.arange(1, n + 1)
    return j[np.append(conf_sorted[:-1] > conf_sorted[1:], True) & np.isfinite(conf_sorted)]


def _best_two(first: tuple[np.ndarray, np.ndarray], conf1: np.ndarray,
              second: tuple[np.ndarray, np.ndarray], base: tuple[int, int],
              bound: _Bound) -> tuple[int, float] | None:
    """Items in stage-1 confidence order (descending), each stage's (losses, wins) per item
    against the reference: the longest prefix j that stage 1 may answer, stage 2 answering the
    rest, that keeps the bound with `base` (losses, wins) already counted. (j, threshold) or
    None when no cut is good enough."""
    if len(conf1) == 0:
        return None
    cuts = _cuts(conf1)
    counts = []
    for (a, b) in zip(first, second, strict=True):  # losses, then wins
        counts.append(np.cumsum(a)[cuts - 1] + (int(b.sum()) - np.cumsum(b)[cuts - 1]))
    good = cuts[bound.ok(base[0] + counts[0], base[1] + counts[1])]
    if not len(good):
        return None
    j = int(good[-1])
    return j, float(conf1[j - 1])


class _Chain:
    """Per-stage (losses, wins) against the reference; cost falls as early stages answer more."""

    def __init__(self, ok: Sequence[np.ndarray], ref: np.ndarray):
        self.lw = [(ref & ~o, ~ref & o) for o in ok]

    def stage(self, k: int, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.lw[k][0][order], self.lw[k][1][order]


def _calibrate_two(chain: _Chain, conf: Sequence[np.ndarray],
                   bound: _Bound) -> tuple[float, ...] | None:
    # cost falls as stage 1 answers more, whatever the stage costs: no need to read them
    order = np.argsort(-conf[0], kind="stable")
    best = _best_two(chain.stage(0, order), conf[0][order], chain.stage(1, order), (0, 0),
                     bound)
    return None if best is None else (best[1],)


class _ThreeStage:
    """Stage-1 cut -> the best stage-2 threshold on the items it escalates, in O(n) per cut."""

    def __init__(self, chain: _Chain, conf: Sequence[np.ndarray], costs: Sequence[float],
                 bound: _Bound):
        self.n, self.costs, self.bound = bound.n, costs, bound
        self.order1 = np.argsort(-conf[0], kind="stable")
        self.conf1 = conf[0][self.order1]
        losses, wins = chain.stage(0, self.order1)
        self.base = (np.concatenate([[0], np.cumsum(losses)]),
                     np.concatenate([[0], np.cumsum(wins)]))
        self.order2 = np.argsort(-conf[1], kind="stable")
        self.second, self.third = chain.stage(1, self.order2), chain.stage(2, self.order2)
        self.conf2 = conf[1][self.order2]
        self.cuts = _cuts(self.conf1)

    def solve(self, j1: int) -> tuple[float, float, float] | None:
        """(cost, t1, t2) of the cheapest feasible stage-2 threshold after cutting stage 1 at
        j1, or None."""
        escalated = np.zeros(self.n, dtype=bool)
        escalated[self.order1[j1:]] = True
        keep = escalated[self.order2]
        best = _best_two((self.second[0][keep], self.second[1][keep]), self.conf2[keep],
                         (self.third[0][keep], self.third[1][keep]),
                         (int(self.base[0][j1]), int(self.base[1][j1])), self.bound)
        if best is None:
            return None
        j2, t2 = best
        m = int(keep.sum())
        c1, c2, c3 = self.costs
        cost = c1 + c2 * m / self.n + c3 * (m - j2) / self.n
        return cost, float(self.conf1[j1 - 1]), t2

    def search(self, grid: int, refine: int, exhaustive: int) -> tuple[float, ...] | None:
        cuts = self.cuts[:-1]  # the last cut answers everything at stage 1: no cascade
        if not len(cuts):
            return None
        if len(cuts) <= exhaustive:
            picks = np.arange(len(cuts))
        else:
            picks = np.unique(np.linspace(0, len(cuts) - 1, grid).round().astype(int))
        scored = sorted(((s, i) for i in picks if (s := self.solve(int(cuts[i]))) is not None),
                        key=lambda t: t[0][0])
        if not scored:
            return None
        best = scored[0][0]
        if len(cuts) > exhaustive:
            # feasibility is not monotone in the stage-1 cut: refine around the best few
            for _, at in scored[:_REFINED]:
                k = int(np.searchsorted(picks, at))
                lo, hi = picks[max(0, k - 1)], picks[min(len(picks) - 1, k + 1)]
                for i in np.unique(np.linspace(lo, hi, min(refine, hi - lo + 1)).round()):
                    s = self.solve(int(cuts[int(i)]))
                    if s is not None and s[0] < best[0]:
                        best = s
        return best[1], best[2]


def calibrate(correct: Sequence[np.ndarray], confidence: Sequence[np.ndarray | None],
              costs: Sequence[float], min_accuracy: float, *,
              reference_correct: np.ndarray | None = None, margin_z: float = 0.0,
              grid: int = 64, refine: int = 128, exhaustive: int = 512) -> Calibration | None:
    """Thresholds for a chain of 2 or 3 stages (cheapest first) meeting `min_accuracy` on these
    validation predictions at the lowest expected cost; None when no thresholds can.

    correct[k][i]: stage k answers item i right; confidence[k][i]: its confidence there (the last
    stage's is not used and may be None); costs[k]: what stage k costs per item. With
    `reference_correct` and `margin_z` > 0 the requirement is the module's safety margin: paired
    drop against the reference + margin_z SE <= reference accuracy - min_accuracy."""
    stages = len(correct)
    if stages not in (2, 3) or len(confidence) != stages or len(costs) != stages:
        raise ValueError("calibrate takes 2 or 3 stages, each with correct, confidence, cost")
    ok = [np.asarray(c, dtype=bool) for c in correct]
    n = len(ok[0])
    if n == 0 or any(len(c) != n for c in ok):
        raise ValueError("every stage needs one prediction per validation item")
    if any(c is None for c in confidence[:-1]):
        raise ValueError("every stage but the last needs a confidence to route on")
    if margin_z and reference_correct is None:
        raise ValueError("a safety margin needs the reference's per-item correctness")
    # without a reference, measure against one that is always right: the paired drop is then
    # n - right, and the plain requirement right >= min_accuracy x n
    ref = (np.ones(n, dtype=bool) if reference_correct is None
           else np.asarray(reference_correct, dtype=bool))
    if len(ref) != n:
        raise ValueError("the reference needs one prediction per validation item")
    bound = _Bound(n, float(ref.sum()) - min_accuracy * n, margin_z)
    conf = [_routing_confidence(c) for c in confidence[:-1]]
    chain = _Chain(ok, ref)
    if stages == 2:
        thresholds = _calibrate_two(chain, conf, bound)
    else:
        thresholds = _ThreeStage(chain, conf, costs, bound).search(grid, refine, exhaustive)
    if thresholds is None:
        return None
    right, reach = routed_correct(ok, confidence, thresholds)
    cost = float(sum(c * r for c, r in zip(costs, reach, strict=True)))
    return Calibration(tuple(thresholds), float(right.mean()), reach, cost,
                       drop_bound(ref, right, margin_z))

"""Per-model totals from the ledger over a time window: what the demo and reports print.

Money stays in integer pico-dollars until it is shown; ratios (cost per 1k, utilization) are
computed here so every caller means the same thing by them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from sqlalchemy import Engine, func, select

from .ledger import batches, usage
from .meter import Meter, pico_to_usd


@dataclass(frozen=True)
class ModelUsage:
    model: str
    requests: int = 0
    ok: int = 0
    errors: dict[int, int] = field(default_factory=dict)  # status -> count
    cost_pusd: int = 0  # every request's share, failed ones included (work done is paid)
    batches: int = 0
    batch_rows: int = 0
    compute_ms: float = 0.0
    device: str | None = None  # where its batches ran (one of them, if it moved)
    pricing: str | None = None
    share: float = 0.0

    def cost_per_1k_usd(self) -> Decimal | None:
        """Cost of 1,000 successful predictions: all cost over the successes."""
        if not self.ok:
            return None
        return pico_to_usd(self.cost_pusd) * 1000 / self.ok

    def provisioned_per_1k_usd(self, usd_per_hour: Decimal, wall_s: float,
                               replicas: int = 1) -> Decimal | None:
        """Busy plus idle: the replicas' whole provisioned share over the window, over the
        successes. Marginal cost (above) counts engine time only; this is what the bill says."""
        if not self.ok or not self.share:
            return None
        pico = Meter(usd_per_hour, self.share).cost(wall_s) * replicas
        return pico_to_usd(pico) * 1000 / self.ok

    @property
    def mean_batch_size(self) -> float:
        return self.batch_rows / self.batches if self.batches else 0.0

    def utilization(self, wall_s: float, replicas: int = 1) -> float:
        """Busy share of the replicas' provisioned time: compute time over wall time."""
        return self.compute_ms / 1000 / (wall_s * replicas) if wall_s > 0 else 0.0


def model_usage(engine: Engine, since: float, until: float,
                model: str | None = None) -> dict[str, ModelUsage]:
    """Totals per model for records stamped in [since, until) (epoch seconds)."""
    by_status = (
        select(usage.c.model, usage.c.status, func.count(), func.sum(usage.c.cost_pusd))
        .where(usage.c.ts >= since, usage.c.ts < until)
        .group_by(usage.c.model, usage.c.status)
    )
    by_batch = (
        select(batches.c.model, func.count(), func.sum(batches.c.size),
               func.sum(batches.c.compute_ms), func.max(batches.c.device),
               func.max(batches.c.pricing), func.max(batches.c.share))
        .where(batches.c.ts >= since, batches.c.ts < until)
        .group_by(batches.c.model)
    )
    if model is not None:
        by_status = by_status.where(usage.c.model == model)
        by_batch = by_batch.where(batches.c.model == model)
    totals: dict[str, dict] = {}
    with engine.connect() as conn:
        for name, status, n, cost in conn.execute(by_status):
            t = totals.setdefault(name, {"requests": 0, "ok": 0, "errors": {}, "cost_pusd": 0})
            t["requests"] += n
            t["cost_pusd"] += int(cost or 0)
            if status == 200:
                t["ok"] += n
            else:
                t["errors"][status] = n
        for name, n, rows, compute_ms, device, pricing, share in conn.execute(by_batch):
            t = totals.setdefault(name, {})
            t.update(batches=n, batch_rows=int(rows or 0), compute_ms=float(compute_ms or 0.0),
                     device=device, pricing=pricing, share=float(share or 0.0))
    return {name: ModelUsage(name, **t) for name, t in sorted(totals.items())}

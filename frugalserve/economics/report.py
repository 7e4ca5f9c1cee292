"""The spend report: what inference and training cost over a window, read from the rollups.

Everything here reads `usage_rollup`, `batch_rollup`, `batch_size_rollup`, `replicas` and
`training_runs` (never the raw per-request rows), so a report costs the same at 10^7 requests
as at 10^3: one scan of the window's rollup rows, grouped in SQL to (bucket, model, version,
variant, tenant), and the rest in Python on a few hundred rows.

What the numbers mean:

- cost (marginal, busy): the ledger's pico-dollars, each batch's engine time x device price x
  share; per 1k predictions = cost over successful predictions x 1000.
- provisioned (amortized, busy + idle): for each replica that ran a model version, the price it
  paid per busy second (its batches' cost over their engine time: P x share) times the seconds
  the replica was up inside the window (replicas.started_at to stopped_at, else last_seen_at).
  utilization = busy seconds / provisioned seconds.
- savings, batching lever: the counterfactual is the reference variant at batch size 1 with no
  cache. For each model version and device, the per-row cost at batch size 1 is estimated from
  the smallest batches observed in the window (their cost over their rows; exact when batches of
  1 were seen, an underestimate of the saving otherwise); saving = that per-row cost x rows
  served - actual cost. The batch-size histogram is kept per UTC day, so savings use the window
  rounded out to whole days. Variants and cascades are served (plan.yaml), and spend per
  variant path is in the `variant` breakdown, but the report does not yet split their saving
  from the ledger (null): `frugalserve optimize` estimates it per lever, and the replay in
  `bench/optimizer.py` measures it against the naive deployment.
- break-even of a training run: if its model version (else its model) has a measured saving
  per prediction, predictions needed = run cost / saving per prediction, and the date at which
  the version's prediction rate in the window reaches it; otherwise n/a.
- budgets: each budget's spend this period, burn rate and runway (see `budget_rows`).
"""

from __future__ import annotations

import csv
import io
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import Engine, func, inspect, select

from .budgets import budget_from_row, period_bounds, spent_query
from .budgets import budgets as budgets_table
from .ledger import (
    batch_rollup,
    batch_size_rollup,
    replicas,
    training_runs,
    usage_rollup,
    usage_rollup_hourly,
)
from .meter import PICO_PER_USD, pico_to_usd

BY = ("model", "version", "variant", "tenant", "day")
_KEY_NAMES = {"model": ("model",), "version": ("model", "version"),
              "variant": ("model", "version", "variant"), "tenant": ("tenant",), "day": ("day",)}


def parse_since(text_: str | float | None, now: float | None = None) -> float:
    """'30d', '12h', '15m', '90s', '2w', an ISO date/time (UTC unless zoned) or epoch seconds."""
    when = _parse_since(text_, now)
    # inf, nan or 1e11d would crash or stall the report: only instants a datetime can hold
    if not (_EARLIEST <= when <= _LATEST):
        raise ValueError(f"since {text_!r}: the time is out of range (years 1 to 9999)")
    return when


_EARLIEST = datetime(1, 1, 1, tzinfo=UTC).timestamp()
_LATEST = datetime(9999, 12, 31, tzinfo=UTC).timestamp()


def _parse_since(text_: str | float | None, now: float | None) -> float:
    now = time.time() if now is None else now
    if text_ is None or text_ == "":
        return now - 30 * 86400
    if isinstance(text_, int | float):
        return float(text_)
    s = str(text_).strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    if s[-1:].lower() in units:
        try:
            return now - float(s[:-1]) * units[s[-1].lower()]
        except ValueError:
            pass
    try:
        return float(s)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"since {s!r}: give a duration (30d, 12h, 15m), an ISO date or epoch "
                         "seconds") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def usd(pico: int | float | Decimal | None) -> str | None:
    """Dollars as a decimal string (exact for integer pico-dollars)."""
    if pico is None:
        return None
    if isinstance(pico, float):
        pico = round(pico)
    # fixed notation: CSV and FOCUS consumers read "0.000000098298", not "9.8298E-8"
    return format(pico_to_usd(int(pico)).normalize(), "f") if pico else "0"


def _per_1k(pico: float | int, n: int) -> str | None:
    if not n:
        return None
    return format((Decimal(round(pico)) * 1000 / n / PICO_PER_USD).quantize(Decimal("1e-15")),
                  "f")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass
class Report:
    since: float
    until: float
    by: str
    bucket_s: int
    rows: list[dict] = field(default_factory=list)  # the breakdown asked for (`by`)
    spend: dict[str, list[dict]] = field(default_factory=dict)  # every breakdown
    totals: dict[str, Any] = field(default_factory=dict)
    economics: list[dict] = field(default_factory=list)  # per model version/variant
    savings: dict[str, Any] = field(default_factory=dict)
    training: list[dict] = field(default_factory=list)
    budgets: list[dict] | None = None
    series: list[dict] = field(default_factory=list)  # spend over time
    focus: list[dict] = field(default_factory=list)  # FOCUS-style charge rows
    generated_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {
            "since": _iso(self.since), "until": _iso(self.until), "by": self.by,
            "generated_at": _iso(self.generated_at), "bucket_s": self.bucket_s,
            "totals": self.totals, "rows": self.rows, "spend": self.spend,
            "economics": self.economics, "savings": self.savings, "training": self.training,
            "budgets": self.budgets, "series": self.series,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2)

    def to_csv(self) -> str:
        """The breakdown's rows; the header is there even when the window is empty."""
        economics = _ECONOMICS_COLUMNS if self.by in ("model", "version", "variant") else ()
        return _csv(self.rows, [*_KEY_NAMES[self.by], *_SPEND_COLUMNS, *economics])

    def to_focus_csv(self) -> str:
        return _csv(self.focus, FOCUS_COLUMNS)


_SPEND_COLUMNS = ("requests", "ok", "errors", "items", "cost_pusd", "cost_usd",
                  "per_1k_marginal_usd")
_ECONOMICS_COLUMNS = ("provisioned_usd", "per_1k_amortized_usd", "utilization",
                      "batching_saving_usd")


def _csv(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return out.getvalue()


# -- the report ---------------------------------------------------------------------------------

def build_report(engine: Engine, since: float, until: float | None = None,
                 by: str = "model") -> Report:
    if by not in BY:
        raise ValueError(f"by {by!r}: use one of {', '.join(BY)}")
    until = time.time() if until is None else until
    if until <= since:
        raise ValueError("the report window is empty: since must be before until")
    bucket = 86400 if by == "day" or until - since > 2 * 86400 else 3600
    report = Report(since, until, by, bucket)
    with engine.connect() as conn:
        cells = _usage_cells(conn, since, until, bucket)
        busy = _busy(conn, since, until)
        sizes = _sizes(conn, since, until)
        runs = [dict(r) for r in conn.execute(
            select(training_runs).order_by(training_runs.c.started_at)).mappings()]
        ups = _uptimes(conn, {k[0] for k in busy})
        has_budgets = inspect(conn).has_table("budgets")
        budgets = budget_rows(conn, until) if has_budgets else None

    spend = {name: _breakdown(cells, name) for name in BY}
    report.spend = spend
    inference = sum(c["cost_pusd"] for c in cells.values())
    training_in_window = sum(int(r["cost_pusd"]) for r in runs
                             if since <= r["started_at"] < until)
    whole = inference + training_in_window
    ok = sum(c["ok"] for c in cells.values())
    report.totals = {
        "requests": sum(c["requests"] for c in cells.values()), "ok": ok,
        "errors": sum(c["errors"] for c in cells.values()),
        "items": sum(c["items"] for c in cells.values()),
        "inference_pusd": inference, "inference_usd": usd(inference),
        "training_pusd": training_in_window, "training_usd": usd(training_in_window),
        "total_usd": usd(whole),
        "training_share": training_in_window / whole if whole else None,
        "inference_share": inference / whole if whole else None,
        "per_1k_marginal_usd": _per_1k(inference, ok),
    }
    report.economics = _economics(cells, busy, ups, since, until)
    provisioned = sum(e["provisioned_pusd"] for e in report.economics)
    busy_s = sum(e["busy_s"] for e in report.economics)
    up_s = sum(e["provisioned_s"] for e in report.economics)
    report.totals.update(
        provisioned_usd=usd(provisioned), per_1k_amortized_usd=_per_1k(provisioned, ok),
        utilization=busy_s / up_s if up_s else None)
    report.savings = _savings(sizes, cells)
    _attach_economics(spend, report.economics, report.savings)
    report.rows = spend[by]
    report.training = _break_even(runs, report.savings, cells, since, until)
    report.budgets = budgets
    report.series = _series(cells, runs, since, until, bucket)
    report.focus = _focus(cells, runs, since, until, bucket)
    return report


def _usage_cells(conn, since: float, until: float, bucket: int) -> dict[tuple, dict]:
    """Sums per (bucket, model, version, variant, tenant): whole hours of the window from the
    hourly rollup, its ragged edges (minute resolution) from the minute rollup."""
    lo = int(since) - int(since) % 60
    h_lo = -(-lo // 3600) * 3600  # first whole hour inside the window
    h_hi = int(until) - int(until) % 3600  # end of the last whole hour inside it
    parts = [(usage_rollup, "minute", lo, until)]
    if h_hi > h_lo:
        parts = [(usage_rollup, "minute", lo, h_lo), (usage_rollup_hourly, "hour", h_lo, h_hi),
                 (usage_rollup, "minute", h_hi, until)]
    cells: dict[tuple, dict] = {}
    for table, time_col, start, end in parts:
        if end <= start:
            continue
        u = table.c
        t = u[time_col]
        b = (t - t % bucket).label("bucket")
        q = (select(b, u.model, u.version, u.variant, u.tenant, func.sum(u.requests),
                    func.sum(u.ok), func.sum(u.errors), func.sum(u["items"]),
                    func.sum(u.cost_pusd))
             .where(t >= start, t < end)
             .group_by(b, u.model, u.version, u.variant, u.tenant))
        for bk, model, version, variant, tenant, n, ok, err, items, cost in conn.execute(q):
            c = cells.setdefault((int(bk), model, version, variant, tenant), {
                "requests": 0, "ok": 0, "errors": 0, "items": 0, "cost_pusd": 0})
            c["requests"] += int(n)
            c["ok"] += int(ok)
            c["errors"] += int(err)
            c["items"] += int(items or 0)
            c["cost_pusd"] += int(cost or 0)
    return cells


def _busy(conn, since: float, until: float) -> dict[tuple, dict]:
    r = batch_rollup.c
    lo = int(since) - int(since) % 60
    q = (select(r.replica_id, r.model, r.version, r.variant, r.device, r.pricing,
                func.max(r.share), func.sum(r.batches), func.sum(r.rows), func.sum(r.compute_ms),
                func.sum(r.cost_pusd), func.max(r.minute))
         .where(r.minute >= lo, r.minute < until)
         .group_by(r.replica_id, r.model, r.version, r.variant, r.device, r.pricing))
    return {tuple(row[:6]): {"share": float(row[6]), "batches": int(row[7]),
                             "rows": int(row[8]), "compute_ms": float(row[9]),
                             "cost_pusd": int(row[10]), "last_minute": int(row[11])}
            for row in conn.execute(q)}


def _sizes(conn, since: float, until: float) -> dict[tuple, dict[int, list]]:
    s = batch_size_rollup.c
    lo = int(since) - int(since) % 86400
    q = (select(s.model, s.version, s.variant, s.device, s.pricing, s.size,
                func.sum(s.batches), func.sum(s.rows), func.sum(s.cost_pusd))
         .where(s.day >= lo, s.day < until)
         .group_by(s.model, s.version, s.variant, s.device, s.pricing, s.size))
    out: dict[tuple, dict[int, list]] = defaultdict(dict)
    for model, version, variant, device, pricing, size, n, rows, cost in conn.execute(q):
        out[(model, version, variant, device, pricing)][int(size)] = [int(n), int(rows),
                                                                      int(cost)]
    return out


def _uptimes(conn, ids: set[int]) -> dict[int, tuple[float, float | None]]:
    if not ids:
        return {}
    q = select(replicas.c.id, replicas.c.started_at, replicas.c.stopped_at,
               replicas.c.last_seen_at).where(replicas.c.id.in_(sorted(ids)))
    return {i: (start, stop or seen) for i, start, stop, seen in conn.execute(q)}


def _breakdown(cells: dict[tuple, dict], by: str) -> list[dict]:
    acc: dict[tuple, dict] = {}
    for (bk, model, version, variant, tenant), c in cells.items():
        values = {"model": model, "version": version, "variant": variant, "tenant": tenant,
                  "day": datetime.fromtimestamp(bk - bk % 86400, UTC).date().isoformat()}
        key = tuple(values[n] for n in _KEY_NAMES[by])
        a = acc.setdefault(key, {"requests": 0, "ok": 0, "errors": 0, "items": 0,
                                 "cost_pusd": 0})
        for k in a:
            a[k] += c[k]
    rows = []
    for key, a in sorted(acc.items()):
        row = dict(zip(_KEY_NAMES[by], key, strict=True))
        row.update(a, cost_usd=usd(a["cost_pusd"]),
                   per_1k_marginal_usd=_per_1k(a["cost_pusd"], a["ok"]))
        rows.append(row)
    return rows


def _economics(cells, busy, ups, since, until) -> list[dict]:
    """Per (model, version, variant): busy and provisioned cost, utilization."""
    ok: dict[tuple, int] = defaultdict(int)
    for (_b, model, version, variant, _t), c in cells.items():
        ok[(model, version, variant)] += c["ok"]
    acc: dict[tuple, dict] = {}
    for (replica, model, version, variant, device, _pricing), b in busy.items():
        busy_s = b["compute_ms"] / 1000
        start, stop = ups.get(replica, (None, None))
        stop = stop or b["last_minute"] + 60
        start = start if start is not None else since
        up_s = max(0.0, min(stop, until) - max(start, since))
        up_s = max(up_s, busy_s)  # never less than it was busy (clock skew, coarse stamps)
        a = acc.setdefault((model, version, variant), {
            "busy_s": 0.0, "provisioned_s": 0.0, "busy_pusd": 0, "provisioned_pusd": 0,
            "batches": 0, "rows": 0, "devices": set()})
        a["busy_s"] += busy_s
        a["provisioned_s"] += up_s
        a["busy_pusd"] += b["cost_pusd"]
        # the replica's price per busy second (P x share) over its uptime, rounded once
        a["provisioned_pusd"] += round(b["cost_pusd"] * up_s / busy_s) if busy_s else 0
        a["batches"] += b["batches"]
        a["rows"] += b["rows"]
        a["devices"].add(f"{device} x{b['share']:g}")
    out = []
    for key, a in sorted(acc.items()):
        n = ok.get(key, 0)
        prov = a["provisioned_pusd"]
        out.append({
            "model": key[0], "version": key[1], "variant": key[2],
            "devices": sorted(a["devices"]), "ok": n, "batches": a["batches"],
            "mean_batch_size": a["rows"] / a["batches"] if a["batches"] else None,
            "busy_s": a["busy_s"], "provisioned_s": a["provisioned_s"],
            "busy_pusd": a["busy_pusd"], "busy_usd": usd(a["busy_pusd"]),
            "provisioned_pusd": prov, "provisioned_usd": usd(prov),
            "idle_usd": usd(max(0, prov - a["busy_pusd"])),
            "utilization": a["busy_s"] / a["provisioned_s"] if a["provisioned_s"] else None,
            "per_1k_marginal_usd": _per_1k(a["busy_pusd"], n),
            "per_1k_amortized_usd": _per_1k(prov, n),
        })
    return out


def _savings(sizes, cells) -> dict[str, Any]:
    per_version = []
    total = 0
    for (model, version, variant, device, pricing), hist in sorted(sizes.items()):
        smallest = min(hist)
        n1, rows1, cost1 = hist[smallest]  # a batch has at least one row: rows1 > 0
        rows = sum(h[1] for h in hist.values())
        actual = sum(h[2] for h in hist.values())
        counterfactual = (2 * cost1 * rows + rows1) // (2 * rows1)  # cost1/rows1 x rows, rounded
        saving = counterfactual - actual
        total += saving
        per_version.append({
            "model": model, "version": version, "variant": variant, "device": device,
            "pricing": pricing, "reference_batch_size": smallest,
            "reference_batches": n1, "batch1_per_row_pusd": cost1 / rows1, "rows": rows,
            "actual_pusd": actual, "counterfactual_pusd": counterfactual,
            "batching_saving_pusd": saving, "batching_saving_usd": usd(saving),
            "saving_per_prediction_pusd": saving / rows if rows else None,
            "exact_reference": smallest == 1,
        })
    return {
        "method": "batching: for each model version and device, per-row cost at batch size 1 "
                  "= cost/rows of the smallest batches observed in the window (whole UTC days); "
                  "saving = that x rows served - actual cost (each variant against its own "
                  "batch-1 cost). Cache: not built; cascade, quantization: served, but their "
                  "saving is not split from the ledger yet (null; see plan.yaml's estimate).",
        "levers": {"batching_pusd": total, "batching_usd": usd(total),
                   "cache_pusd": None, "cascade_pusd": None, "quantization_pusd": None},
        "total_pusd": total, "total_usd": usd(total),
        "by_version": per_version,
    }


def _attach_economics(spend, economics, savings) -> None:
    """Amortized cost and utilization on the model/version/variant breakdowns."""
    for by in ("model", "version", "variant"):
        names = _KEY_NAMES[by]
        agg: dict[tuple, list] = defaultdict(lambda: [0, 0.0, 0.0, 0])  # pico, s, s, pico
        for e in economics:
            a = agg[tuple(e[n] for n in names)]
            a[0] += e["provisioned_pusd"]
            a[1] += e["busy_s"]
            a[2] += e["provisioned_s"]
        for s in savings["by_version"]:
            agg[tuple(s[n] for n in names)][3] += s["batching_saving_pusd"]
        for row in spend[by]:
            prov, busy_s, up_s, saved = agg.get(tuple(row[n] for n in names), (0, 0.0, 0.0, 0))
            row["provisioned_usd"] = usd(prov)
            row["per_1k_amortized_usd"] = _per_1k(prov, row["ok"])
            row["utilization"] = busy_s / up_s if up_s else None
            row["batching_saving_usd"] = usd(saved)


def _break_even(runs, savings, cells, since, until) -> list[dict]:
    per_pred: dict[tuple, list] = defaultdict(lambda: [0, 0])  # saving (pico-dollars), rows
    for s in savings["by_version"]:
        for key in ((s["model"], s["version"]), (s["model"], None)):
            per_pred[key][0] += s["batching_saving_pusd"]
            per_pred[key][1] += s["rows"]
    rate: dict[tuple, int] = defaultdict(int)  # successful predictions in the window
    for (_b, model, version, _v, _t), c in cells.items():
        rate[(model, version)] += c["ok"]
        rate[(model, None)] += c["ok"]
    span = until - since
    out = []
    for r in runs:
        cost = int(r["cost_pusd"])
        row = {"id": r["id"], "model": r["model"], "version": r["version"],
               "started_at": _iso(r["started_at"]), "cost_pusd": cost, "cost_usd": usd(cost),
               "status": r["status"], "saving_per_prediction_pusd": None,
               "predictions_needed": None, "break_even_at": None, "break_even": "n/a"}
        key = (r["model"], r["version"]) if per_pred.get((r["model"], r["version"]), [0, 0])[1] \
            else (r["model"], None)
        saved, rows = per_pred.get(key, (0, 0))
        if rows and saved > 0:
            needed = -(-cost * rows // saved)  # cost / (saved / rows), rounded up, exactly
            per_s = rate.get(key, 0) / span
            row.update(saving_per_prediction_pusd=saved / rows, predictions_needed=needed,
                       predictions_per_day=per_s * 86400)
            if per_s > 0:
                # predictions since the run ended are not tracked separately: from now on
                when = max(until, r["started_at"] + r["wall_s"]) + needed / per_s
                if when <= _LATEST:
                    row["break_even_at"] = _iso(when)
                    row["break_even"] = "at the current rate"
                else:  # a large run against little traffic: a datetime cannot hold it
                    row["break_even"] = "not before the year 10000 at the current rate"
            else:
                row["break_even"] = "n/a: no predictions in the window"
        else:
            row["break_even"] = "n/a: no measured saving per prediction for this model"
        out.append(row)
    return out


def _series(cells, runs, since, until, bucket) -> list[dict]:
    def empty() -> dict:
        return {"inference_pusd": 0, "training_pusd": 0, "by_model": defaultdict(int)}

    # every bucket of the window, spent in or not
    acc = {b: empty() for b in range(int(since) - int(since) % bucket, int(until) + 1, bucket)}
    for (b, model, _v, _var, _t), c in cells.items():
        a = acc.setdefault(b, empty())
        a["inference_pusd"] += c["cost_pusd"]
        a["by_model"][model] += c["cost_pusd"]
    for r in runs:
        if since <= r["started_at"] < until:
            b = int(r["started_at"]) - int(r["started_at"]) % bucket
            acc.setdefault(b, empty())["training_pusd"] += int(r["cost_pusd"])
    return [{"start": _iso(b), "ts": b, "inference_pusd": a["inference_pusd"],
             "training_pusd": a["training_pusd"], "by_model": dict(a["by_model"])}
            for b, a in sorted(acc.items())]


# -- FOCUS --------------------------------------------------------------------------------------

FOCUS_COLUMNS = [
    "BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd",
    "ChargeCategory", "ChargeDescription", "BilledCost", "EffectiveCost", "ListCost",
    "BillingCurrency", "ConsumedQuantity", "ConsumedUnit", "PricingQuantity", "PricingUnit",
    "ResourceId", "ResourceName", "ResourceType", "ServiceName", "ServiceCategory",
    "ProviderName", "SubAccountId", "Tags",
]


def _focus(cells, runs, since, until, bucket) -> list[dict]:
    """FinOps FOCUS-style rows: inference per (period, model version, tenant) as Usage;
    training runs as Purchase (a one-off investment). Costs in USD; the ledger bills at list
    price, so BilledCost = EffectiveCost = ListCost."""
    common = {"BillingPeriodStart": _iso(since), "BillingPeriodEnd": _iso(until),
              "BillingCurrency": "USD", "ProviderName": "frugalserve",
              "ServiceCategory": "AI and Machine Learning"}
    rows = []
    for (b, model, version, variant, tenant), c in sorted(cells.items()):
        cost = usd(c["cost_pusd"])
        rows.append({
            **common, "ChargePeriodStart": _iso(max(b, since)),
            "ChargePeriodEnd": _iso(min(b + bucket, until)), "ChargeCategory": "Usage",
            "ChargeDescription": f"inference {model} v{version} ({variant}) for {tenant}",
            "BilledCost": cost, "EffectiveCost": cost, "ListCost": cost,
            "ConsumedQuantity": c["ok"], "ConsumedUnit": "Predictions",
            "PricingQuantity": c["ok"], "PricingUnit": "Predictions",
            "ResourceId": f"model/{model}/version/{version}/variant/{variant}",
            "ResourceName": f"{model} v{version}", "ResourceType": "Model version",
            "ServiceName": "frugalserve inference", "SubAccountId": tenant,
            "Tags": orjson.dumps({"model": model, "version": version, "variant": variant,
                                  "tenant": tenant, "requests": c["requests"],
                                  "errors": c["errors"]}).decode(),
        })
    for r in runs:
        if not since <= r["started_at"] < until:
            continue
        cost = usd(int(r["cost_pusd"]))
        hours = r["wall_s"] * r["devices"] * r["share"] / 3600
        rows.append({
            **common, "ChargePeriodStart": _iso(r["started_at"]),
            "ChargePeriodEnd": _iso(r["started_at"] + r["wall_s"]),
            "ChargeCategory": "Purchase",
            "ChargeDescription": f"training run {r['id']} of {r['model']} v{r['version']} "
                                 f"({r['source']})",
            "BilledCost": cost, "EffectiveCost": cost, "ListCost": cost,
            "ConsumedQuantity": f"{hours:.6g}", "ConsumedUnit": "Device-Hours",
            "PricingQuantity": f"{hours:.6g}", "PricingUnit": "Device-Hours",
            "ResourceId": f"training_run/{r['id']}", "ResourceName": f"{r['model']} "
            f"v{r['version']} training", "ResourceType": "Training run",
            "ServiceName": "frugalserve training", "SubAccountId": None,
            "Tags": orjson.dumps({"model": r["model"], "version": r["version"],
                                  "device": r["device"], "pricing": r["pricing"],
                                  "source": r["source"], "status": r["status"]}).decode(),
        })
    return rows


# -- budgets ------------------------------------------------------------------------------------

def budget_rows(conn, now: float) -> list[dict]:
    """Burn rate and runway of each budget in the ledger: spent this period (from the rollups,
    the period and scope as serving enforces them), burn = spend over the last 7 days per day,
    runway = what is left / burn. A row that is not a valid budget is reported with its error."""
    out = []
    for row in conn.execute(select(budgets_table).order_by(budgets_table.c.id)):
        try:
            b = budget_from_row(row)
        except (TypeError, ValueError) as exc:  # edited by hand: say so, report the rest
            out.append({"id": row.id, "error": f"unreadable budget row: {exc}"})
            continue
        start, _end = period_bounds(b.period, now)
        spent, week = (int(conn.execute(spent_query(b.scope, b.target, t)).scalar() or 0)
                       for t in (start, now - 7 * 86400))
        burn = week / 7  # pico-dollars per day
        left = b.amount_pusd - spent
        out.append({
            "id": b.id, "scope": b.scope, "scope_value": b.target or None, "period": b.period,
            "amount_usd": usd(b.amount_pusd), "spent_usd": usd(spent),
            "left_usd": usd(max(left, 0)), "burn_usd_per_day": usd(burn),
            "runway_days": (left / burn if burn > 0 else None) if left > 0 else 0.0,
            "period_start": _iso(start),
        })
    return out

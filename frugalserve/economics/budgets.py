"""Budgets: how much may be spent, on what, per which period, and what happens as it runs out.

A budget has a scope (global; one tenant; one model), a period (day, week or month, in UTC, or
total: never resets), an amount in dollars (stored as integer pico-dollars) and thresholds,
each a percentage of the amount with an action:
  - alert: when settled spend reaches it (once per period): log, webhook, `alerts` table;
  - downgrade: when spend plus in-flight reservations would pass it, serve the request from the
    budget's fallback model instead (until plan tiers exist, a configured model name);
  - reject: when spend plus in-flight reservations would pass it, refuse with HTTP 402.
Without thresholds a budget alerts at 80% and rejects at 100%.

This module is the data and its storage; enforcement lives in serving.admission.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path

from sqlalchemy import (
    JSON,
    Column,
    Engine,
    Float,
    Integer,
    Select,
    String,
    Table,
    UniqueConstraint,
    and_,
    delete,
    func,
    select,
)

from .ledger import PICO_MAX, PicoAmount, metadata, usage_rollup
from .meter import PICO_PER_USD

SCOPES = ("global", "tenant", "model")
PERIODS = ("day", "week", "month", "total")
ACTIONS = ("alert", "downgrade", "reject")

budgets = Table(
    "budgets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("scope", String(16), nullable=False),
    Column("target", String(256), nullable=False),  # tenant or model name; "" for global
    Column("period", String(16), nullable=False),
    Column("amount_pusd", PicoAmount, nullable=False),
    Column("thresholds", JSON, nullable=False),  # [[percent, action], ...]
    Column("fallback_model", String(128)),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("scope", "target", "period", name="uq_budgets_scope_target_period"),
)


@dataclass(frozen=True, slots=True)
class Threshold:
    percent: float
    action: str

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"threshold action {self.action!r}: choose one of "
                             f"{', '.join(ACTIONS)}")
        if not 0 < self.percent <= 1000:
            raise ValueError(f"threshold {self.percent}% must be in (0, 1000]")

    @classmethod
    def parse(cls, text: str) -> Threshold:
        """'80:alert', '90:downgrade', '100:reject' (or 'alert@80')."""
        text = text.strip()
        if "@" in text:
            action, _, pct = text.partition("@")
        else:
            pct, _, action = text.partition(":")
        try:
            return cls(float(pct.strip().rstrip("%")), action.strip().lower())
        except ValueError as exc:
            raise ValueError(f"threshold {text!r}: expected PERCENT:ACTION, e.g. 80:alert "
                             f"({exc})") from None


DEFAULT_THRESHOLDS = (Threshold(80.0, "alert"), Threshold(100.0, "reject"))


@dataclass(frozen=True)
class Budget:
    scope: str
    target: str
    period: str
    amount_pusd: int
    thresholds: tuple[Threshold, ...] = DEFAULT_THRESHOLDS
    fallback_model: str | None = None
    id: int | None = None
    created_at: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope {self.scope!r}: choose one of {', '.join(SCOPES)}")
        if self.period not in PERIODS:
            raise ValueError(f"period {self.period!r}: choose one of {', '.join(PERIODS)}")
        if self.scope == "global" and self.target:
            raise ValueError("a global budget has no target")
        if self.scope != "global" and not self.target:
            raise ValueError(f"a {self.scope} budget needs a target ({self.scope} name)")
        if len(self.target) > 256:  # the ledger's column widths
            raise ValueError("a budget's target is at most 256 characters")
        if self.fallback_model is not None and len(self.fallback_model) > 128:
            raise ValueError("a fallback model name is at most 128 characters")
        if self.amount_pusd < 0:
            raise ValueError("a budget's amount cannot be negative")
        if not self.thresholds:
            raise ValueError("a budget needs at least one threshold")
        if any(t.action == "downgrade" for t in self.thresholds) and not self.fallback_model:
            raise ValueError("a downgrade threshold needs a fallback model")

    @property
    def amount_usd(self) -> Decimal:
        return Decimal(self.amount_pusd) / PICO_PER_USD

    @property
    def label(self) -> str:
        return "global" if self.scope == "global" else f"{self.scope} '{self.target}'"


def usd_to_pico(amount: str | float | Decimal) -> int:
    try:
        value = Decimal(str(amount).strip().lstrip("$"))
    except InvalidOperation:
        raise ValueError(f"amount {amount!r} is not a number of dollars") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"amount {amount!r} must be a finite, non-negative number of dollars")
    if value * PICO_PER_USD > PICO_MAX:
        raise ValueError(f"amount {amount!r} is more than the ledger holds "
                         f"(${PICO_MAX // PICO_PER_USD:.3g})")
    return int(value * PICO_PER_USD)


def period_bounds(period: str, now: float) -> tuple[float, float | None]:
    """(start, end) of the period holding `now`, epoch seconds, UTC; end None: never."""
    if period == "total":
        return 0.0, None
    t = datetime.fromtimestamp(now, UTC)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    elif period == "month":
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"period {period!r}: choose one of {', '.join(PERIODS)}")
    return start.timestamp(), end.timestamp()


# -- storage -----------------------------------------------------------------------------------


def set_budget(engine: Engine, budget: Budget) -> int:
    """Create or replace the budget of (scope, target, period); its id."""
    values = {"amount_pusd": budget.amount_pusd,
              "thresholds": [[t.percent, t.action] for t in budget.thresholds],
              "fallback_model": budget.fallback_model}
    key = and_(budgets.c.scope == budget.scope, budgets.c.target == budget.target,
               budgets.c.period == budget.period)
    with engine.begin() as conn:
        existing = conn.execute(select(budgets.c.id).where(key)).scalar()
        if existing is not None:
            conn.execute(budgets.update().where(budgets.c.id == existing).values(**values))
            return int(existing)
        result = conn.execute(budgets.insert().values(
            scope=budget.scope, target=budget.target, period=budget.period,
            created_at=time.time(), **values))
        return int(result.inserted_primary_key[0])


def delete_budget(engine: Engine, budget_id: int) -> bool:
    with engine.begin() as conn:
        return conn.execute(delete(budgets).where(budgets.c.id == budget_id)).rowcount > 0


def list_budgets(engine: Engine) -> list[Budget]:
    with engine.connect() as conn:
        return [budget_from_row(row)
                for row in conn.execute(select(budgets).order_by(budgets.c.id))]


def budget_from_row(row) -> Budget:
    return Budget(row.scope, row.target, row.period, int(row.amount_pusd),
                  tuple(Threshold(float(p), a) for p, a in row.thresholds),
                  row.fallback_model, int(row.id), row.created_at)


_FILE_KEYS = ("scope", "target", "period", "amount_usd", "thresholds", "fallback_model")


def load_budgets_file(path: Path) -> list[Budget]:
    """budgets.yaml: a list (or a `budgets:` key holding one) of {scope, target, period,
    amount_usd, thresholds: ['80:alert', ...], fallback_model}. File budgets have negative ids
    (they are not in the table). Anything wrong in the file is a ValueError naming it."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text file ({exc.reason})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(doc, dict) and list(doc) == ["budgets"]:
        doc = doc["budgets"]
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise ValueError(f"{path}: expected a list of budgets, or a 'budgets:' key holding one")
    out = []
    for i, entry in enumerate(doc, start=1):
        try:
            out.append(_file_budget(entry, -i))
        except ValueError as exc:
            raise ValueError(f"{path}: budget #{i}: {exc}") from None
    return out


def _file_budget(entry: object, budget_id: int) -> Budget:
    if not isinstance(entry, dict):
        raise ValueError(f"expected a mapping with amount_usd and any of "
                         f"{', '.join(k for k in _FILE_KEYS if k != 'amount_usd')}, "
                         f"got {entry!r}")
    unknown = sorted(str(k) for k in set(entry) - set(_FILE_KEYS))
    if unknown:  # a misspelt scope would make a tenant's budget global
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(_FILE_KEYS)}")
    if "amount_usd" not in entry:
        raise ValueError("lacks amount_usd")
    raw = entry.get("thresholds")
    if not raw:
        thresholds = DEFAULT_THRESHOLDS
    elif isinstance(raw, list):
        thresholds = tuple(_file_threshold(t) for t in raw)
    else:
        raise ValueError(f"thresholds must be a list, e.g. ['80:alert', '100:reject'], "
                         f"got {raw!r}")
    return Budget(_text(entry, "scope", "global"), _text(entry, "target", "") or "",
                  _text(entry, "period", "month"), usd_to_pico(entry["amount_usd"]),
                  thresholds, _text(entry, "fallback_model", None), budget_id)


def _text(entry: dict, key: str, default: str | None) -> str | None:
    value = entry.get(key, default)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):  # a tenant named 42
        return str(value)
    raise ValueError(f"{key} must be a name, got {value!r}")


def _file_threshold(raw: object) -> Threshold:
    if isinstance(raw, str):
        return Threshold.parse(raw)
    if isinstance(raw, dict) and set(raw) == {"percent", "action"}:
        try:
            percent = float(raw["percent"])
        except (TypeError, ValueError):
            raise ValueError(f"threshold {raw!r}: percent must be a number") from None
        return Threshold(percent, str(raw["action"]))
    raise ValueError(f"threshold {raw!r}: expected 'PERCENT:ACTION' (e.g. '80:alert') or "
                     "{percent: 80, action: alert}")


def spent_since(engine: Engine, budget: Budget, start: float) -> int:
    """What the ledger says was spent in the budget's scope since `start` (pico-dollars, by
    request arrival), from the per-minute rollups (raw rows expire; periods start on a minute,
    so the two agree exactly)."""
    with engine.connect() as conn:
        return int(conn.execute(spent_query(budget.scope, budget.target, start)).scalar() or 0)


def spent_query(scope: str, target: str, start: float) -> Select:
    """SELECT the spend of a scope ('global', 'tenant', 'model') since `start`."""
    r = usage_rollup.c
    query = select(func.sum(r.cost_pusd)).where(r.minute >= start)
    if scope == "tenant":
        query = query.where(r.tenant == target)
    elif scope == "model":
        query = query.where(r.model == target)
    return query

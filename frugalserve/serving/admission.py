"""Admission: API key → tenant, and budget reserve/settle. Everything here runs on the event
loop thread with dict lookups and integer arithmetic; the database is read only by a background
refresh (keys and budgets every `refresh_s`, and at most once a second after an unknown key).

Budget enforcement (one replica). Each budget has a counter: `spent` (settled pico-dollars this
period) and `reserved` (estimates of admitted requests that have not finished). A request is
admitted only if, for every budget that covers it, spent + reserved + estimate stays within the
reject level; its estimate is then added to `reserved`, and when its batch finishes (or it
fails or expires) the estimate is taken back out and its actual share of the batch's cost is
added to `spent`. Admission and settlement both run on the loop thread, so the check and the
reservation happen with no await between them: no two requests can both see the same headroom.

The bound. At every admission, spent + reserved <= amount holds after the reservation. Every
admitted request is accounted at all times as either its estimate (in flight) or its actual
cost (settled), so at any moment spent + reserved <= amount + E, where E is the sum over settled
requests of max(0, actual - estimate). The estimate is `safety` (default 2) x the measured
execution time of a batch of the request's own rows (ExecProfile, the batcher's EWMA) x the
meter's price: a request that rides in a bigger batch pays only its share of a batch that runs
far less than `rows x` longer, so actual <= estimate and E = 0 unless one batch runs more than
`safety` times slower per row than the profile says (a stall). And while no request settles,
the number admitted is exactly the largest n with n x estimate <= amount - spent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from ..economics.alerts import AlertSink
from ..economics.budgets import Budget, list_budgets, load_budgets_file, period_bounds, spent_since
from ..economics.keys import hash_key, load_key_table
from ..economics.meter import exact_usd as usd
from .errors import BudgetExceeded, Forbidden, InferenceError, Unauthorized
from .types import ANONYMOUS, InferenceRequest

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ..economics.keys import KeyInfo
    from .served import ServedVersion

log = logging.getLogger("frugalserve.admission")

_NEVER = 1 << 126  # a level no spend reaches
_MAX_COMBOS = 10_000  # cached (model, tenant) → budgets entries before the cache is reset


class Counter:
    """One budget's state in the current period (plain ints, loop thread only)."""

    __slots__ = ("budget", "owner", "spent", "reserved", "excess", "start", "end", "gate",
                 "reject_at", "downgrade_at", "alerts", "next_alert", "fired")

    def __init__(self, budget: Budget, owner: Admission, spent: int, now: float):
        self.owner = owner
        self.spent = spent
        self.reserved = 0
        self.excess = 0  # sum of max(0, actual - estimate) over settled requests: E below
        self.start, self.end = period_bounds(budget.period, now)
        self.fired: set = set()  # alert percents; (action, percent) events
        self.configure(budget)

    def configure(self, budget: Budget) -> None:
        self.budget = budget
        amount = budget.amount_pusd
        levels: dict[str, list[tuple[int, float]]] = {"alert": [], "downgrade": [],
                                                       "reject": []}
        for t in budget.thresholds:
            levels[t.action].append((int(Decimal(str(t.percent)) * amount / 100), t.percent))
        self.reject_at = min((lv for lv, _ in levels["reject"]), default=_NEVER)
        self.downgrade_at = min((lv for lv, _ in levels["downgrade"]), default=_NEVER)
        self.gate = min(self.reject_at, self.downgrade_at)
        self.alerts = sorted(levels["alert"])
        self._next_alert()

    def _next_alert(self) -> None:
        self.next_alert = next((lv for lv, pct in self.alerts if pct not in self.fired), _NEVER)

    def roll(self, now: float) -> None:
        """A new period: spend starts over; requests in flight keep their reservations."""
        self.start, self.end = period_bounds(self.budget.period, now)
        self.spent = 0
        self.excess = 0
        self.fired.clear()
        self._next_alert()

    @property
    def resets(self) -> str:
        if self.end is None:
            return "never (a total budget)"
        return datetime.fromtimestamp(self.end, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def state(self) -> dict:
        b = self.budget
        return {"id": b.id, "scope": b.scope, "target": b.target, "period": b.period,
                "amount_pusd": b.amount_pusd, "spent_pusd": self.spent,
                "reserved_pusd": self.reserved, "excess_pusd": self.excess,
                "period_start": self.start, "period_end": self.end}


def settle(counters: tuple[Counter, ...], reserved: int, actual: int) -> None:
    """A request finished (or failed, or expired): its estimate out, its actual cost in."""
    over = actual - reserved if actual > reserved else 0
    for c in counters:
        c.reserved -= reserved
        if over:
            c.excess += over
        spent = c.spent + actual
        c.spent = spent
        if spent >= c.next_alert:
            c.owner._crossed(c)


class Admission:
    def __init__(self, engine: Engine | None, *, allow_anonymous: bool | None = None,
                 trust_tenant_header: bool = False, refresh_s: float = 2.0,
                 budgets_file: Path | None = None, alerts: AlertSink | None = None,
                 safety: float = 2.0):
        self.engine = engine
        self.allow_anonymous = allow_anonymous  # None: while no active key exists
        self.trust_tenant_header = trust_tenant_header
        self.refresh_s = refresh_s
        self.budgets_file = budgets_file
        self.alerts = alerts
        self.safety = safety
        # keys
        self._by_hash: dict[str, KeyInfo] = {}
        self._memo: dict[bytes, KeyInfo] = {}  # Authorization header value → active key
        self._anonymous = allow_anonymous is not False
        self._last_key_load = 0.0
        self._key_load: asyncio.Task | None = None
        # budgets
        self.active = False  # any budget at all: the DataPlane skips admit() otherwise
        self.counters: dict[int, Counter] = {}
        self._global: tuple[Counter, ...] = ()
        self._by_tenant: dict[str, tuple[Counter, ...]] = {}
        self._by_model: dict[str, tuple[Counter, ...]] = {}
        self._combos: dict[str, dict[str, tuple[Counter, ...]]] = {}
        self._resolve: Callable[[str, str | None], ServedVersion] | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._est: dict[ServedVersion, list[int]] = {}  # estimates by rows, per served version
        self.rejected = 0
        self.downgraded = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, resolve: Callable[[str, str | None], ServedVersion]) -> None:
        self._loop = asyncio.get_running_loop()
        self._resolve = resolve
        await self.refresh()
        if self.alerts is not None:
            self.alerts.start()
        if self.engine is not None or self.budgets_file is not None:
            self._task = asyncio.create_task(self._refresh_loop(), name="admission-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.alerts is not None:
            await asyncio.to_thread(self.alerts.close)

    async def refresh(self) -> None:
        """Reload keys and budgets from the ledger (off the loop), install them on the loop."""
        await self._reload_keys()
        await self._reload_budgets()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
                self._roll(time.time())
                self._est = {}
            except Exception:  # noqa: BLE001 - keep the last good state, try again
                log.exception("refreshing keys and budgets failed")

    # -- keys --------------------------------------------------------------------------------

    async def _reload_keys(self) -> None:
        if self.engine is None:
            return
        self._last_key_load = time.monotonic()
        table = await asyncio.to_thread(load_key_table, self.engine)
        self._by_hash = table
        self._memo = {}
        if self.allow_anonymous is None:
            self._anonymous = not any(k.revoked_at is None for k in table.values())

    def authenticate(self, authorization: bytes | None,
                     label: bytes | None) -> tuple[str, str | None]:
        """The tenant a request is billed to and its key's tier, from its Authorization
        header."""
        if authorization is None:
            if self._anonymous:
                if label is not None and self.trust_tenant_header:
                    return label.decode("latin-1"), None
                return ANONYMOUS, None
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
        key = self._memo.get(authorization)
        if key is None:
            key = self._lookup(authorization)
        return key.tenant, key.tier

    def authorize_admin(self, authorization: bytes | None) -> None:
        if authorization is None:
            if self._anonymous:
                return
            raise Unauthorized("this route needs an admin API key: send "
                               "'Authorization: Bearer <key>'")
        key = self._memo.get(authorization) or self._lookup(authorization)
        if not key.admin:
            raise Forbidden(f"API key {key.key_id} (tenant '{key.tenant}') is not an admin key")

    def _lookup(self, authorization: bytes) -> KeyInfo:
        scheme, _, token = authorization.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        key = self._by_hash.get(hash_key(token))
        if key is None:
            self._reload_keys_soon()
            raise Unauthorized("invalid API key")
        if key.revoked_at is not None:
            raise Unauthorized(f"API key {key.key_id} was revoked")
        if len(self._memo) < _MAX_COMBOS:
            self._memo[authorization] = key
        return key

    def _reload_keys_soon(self) -> None:
        """A key we do not know may be one made since the last load: reload, at most once a
        second whatever the rate of bad keys."""
        if (self.engine is None or self._loop is None
                or time.monotonic() - self._last_key_load < 1.0
                or (self._key_load is not None and not self._key_load.done())):
            return
        self._last_key_load = time.monotonic()
        self._key_load = self._loop.create_task(self._reload_keys())

    # -- budgets -----------------------------------------------------------------------------

    async def _reload_budgets(self) -> None:
        known = {i: (c.budget.scope, c.budget.target, c.budget.period)
                 for i, c in self.counters.items()}
        loaded = await asyncio.to_thread(self._read_budgets, known)
        now = time.time()
        counters: dict[int, Counter] = {}
        for budget, spent in loaded:
            c = self.counters.get(budget.id)
            if c is not None and spent is None:
                if c.budget != budget:
                    c.configure(budget)
                counters[budget.id] = c
            else:
                counters[budget.id] = Counter(budget, self, spent or 0, now)
        if counters.keys() == self.counters.keys() and all(
                counters[i] is self.counters[i] for i in counters):
            return
        self.counters = counters
        scoped: dict[str, dict[str, list[Counter]]] = {"tenant": {}, "model": {}}
        glob = []
        for c in counters.values():
            if c.budget.scope == "global":
                glob.append(c)
            else:
                scoped[c.budget.scope].setdefault(c.budget.target, []).append(c)
        self._global = tuple(glob)
        self._by_tenant = {k: tuple(v) for k, v in scoped["tenant"].items()}
        self._by_model = {k: tuple(v) for k, v in scoped["model"].items()}
        self._combos = {}
        self.active = bool(counters)
        log.info("%d budget(s) in force", len(counters))

    def _read_budgets(self, known: dict[int, tuple]) -> list[tuple[Budget, int | None]]:
        """Blocking: the budgets, each with its period's spend from the ledger when it is new
        to this process (None: keep the in-memory count)."""
        found = list_budgets(self.engine) if self.engine is not None else []
        if self.budgets_file is not None:
            found += load_budgets_file(self.budgets_file)
        now = time.time()
        out = []
        for b in found:
            if known.get(b.id) == (b.scope, b.target, b.period):
                out.append((b, None))
            else:
                start, _ = period_bounds(b.period, now)
                out.append((b, spent_since(self.engine, b, start)
                            if self.engine is not None else 0))
        return out

    def _roll(self, now: float) -> None:
        for c in self.counters.values():
            if c.end is not None and now >= c.end:
                c.roll(now)

    def _combine(self, model: str, tenant: str) -> tuple[Counter, ...]:
        combos = self._combos.get(model)
        if combos is None:
            combos = self._combos[model] = {}
        elif len(combos) >= _MAX_COMBOS:
            combos.clear()
        counters = self._global + self._by_tenant.get(tenant, ()) + self._by_model.get(model, ())
        combos[tenant] = counters
        return counters

    def estimate(self, served: ServedVersion, rows: int) -> int:
        """Pico-dollars to reserve: an over-estimate of what this request will be charged."""
        seconds = served.exec_estimate(rows)
        return int(seconds * served.meter.pico_per_second * self.safety) + 1

    def _estimates(self, served: ServedVersion) -> list[int] | None:
        """The estimate for every row count, cached until the next refresh (the profile moves
        slowly; reading it costs more than the rest of admission)."""
        if served.meter is None:
            return None
        table = [self.estimate(served, rows) for rows in range(served.max_batch_size + 1)]
        self._est[served] = table
        return table

    def admit(self, request: InferenceRequest, served: ServedVersion,
              rows: int) -> tuple[ServedVersion, int]:
        """Reserve the request's estimated cost against every budget that covers it, or refuse
        it (402), or send it to a budget's fallback model. Loop thread; no await."""
        combos = self._combos.get(served.model)
        counters = combos.get(request.tenant) if combos is not None else None
        if counters is None:
            counters = self._combine(served.model, request.tenant)
        if not counters:
            return served, rows
        table = self._est.get(served)
        if table is None:
            table = self._estimates(served)
            if table is None:  # metering off: nothing is ever charged
                return served, rows
        est = table[rows]
        for c in counters:  # reserve as we check; a refusal takes the reservations back
            reserved = c.reserved + est
            if c.spent + reserved > c.gate:
                for done in counters[:counters.index(c)]:
                    done.reserved -= est
                return self._over(request, served, rows, counters, est, downgrade=True)
            c.reserved = reserved
        request.budget = counters
        request.reserved = est
        if served.downgrade is not None:
            _plan_downgrade(request, served, counters)
        return served, rows

    def _over(self, request: InferenceRequest, served: ServedVersion, rows: int,
              counters: tuple[Counter, ...], est: int, downgrade: bool) -> tuple:
        """The slow path: some budget is past its downgrade or reject level."""
        fallback = None
        for c in counters:
            level = c.spent + c.reserved + est
            if level > c.reject_at:
                self.rejected += 1
                self._event(c, "reject")
                raise BudgetExceeded(
                    f"budget exceeded: the {c.budget.label} budget is {usd(c.budget.amount_pusd)}"
                    f" per {c.budget.period}; spent {usd(c.spent)} (+{usd(c.reserved)} reserved "
                    f"by requests in flight), this request needs about {usd(est)}; "
                    f"it resets {c.resets}")
            if downgrade and level > c.downgrade_at and fallback is None:
                fallback = c
        if fallback is not None:
            target = self._fallback(request, served, fallback)
            if target is not None:
                self.downgraded += 1
                self._event(fallback, "downgrade")
                fb_served, fb_rows = target
                fb_counters = self._combine(fb_served.model, request.tenant)
                if fb_served.meter is None or not fb_counters:
                    return fb_served, fb_rows
                fb_est = self.estimate(fb_served, fb_rows)
                # the fallback is held to the reject levels only
                for c in fb_counters:
                    if c.spent + c.reserved + fb_est > c.reject_at:
                        return self._over(request, fb_served, fb_rows, fb_counters, fb_est,
                                          downgrade=False)
                served, rows, counters, est = fb_served, fb_rows, fb_counters, fb_est
        for c in counters:
            c.reserved += est
        request.budget = counters
        request.reserved = est
        if served.downgrade is not None:
            _plan_downgrade(request, served, counters)
        return served, rows

    def _fallback(self, request: InferenceRequest, served: ServedVersion,
                  counter: Counter) -> tuple[ServedVersion, int] | None:
        name = counter.budget.fallback_model
        if not name or name == served.model or self._resolve is None:
            return None
        try:
            fb = self._resolve(name, None)
            return fb, fb.check(request)
        except InferenceError as exc:
            if "fallback" not in counter.fired:
                counter.fired.add("fallback")  # log it once a period
                log.error("%s budget: cannot downgrade '%s' to fallback '%s' (%s); serving "
                          "the requested model", counter.budget.label, served.model, name, exc)
            return None

    # -- alerts ------------------------------------------------------------------------------

    def _crossed(self, c: Counter) -> None:
        """Settled spend reached one or more alert levels."""
        for level, pct in c.alerts:
            if c.spent >= level and pct not in c.fired:
                c.fired.add(pct)
                self._emit(c, pct, "alert")
        c._next_alert()

    def _event(self, c: Counter, action: str) -> None:
        """A downgrade or reject level was hit: alert once per period."""
        pct = next((t.percent for t in sorted(c.budget.thresholds, key=lambda t: t.percent)
                    if t.action == action), 100.0)
        key = (action, pct)
        if key in c.fired:
            return
        c.fired.add(key)
        self._emit(c, pct, action)

    def _emit(self, c: Counter, pct: float, action: str) -> None:
        b = c.budget
        verb = {"alert": "reached", "downgrade": "downgrading at", "reject": "rejecting at"}
        message = (f"{b.label} budget {usd(b.amount_pusd)} per {b.period}: {verb[action]} "
                   f"{pct:g}% (spent {usd(c.spent)}, {usd(c.reserved)} in flight; resets "
                   f"{c.resets})")
        alert = {"ts": time.time(), "budget_id": b.id, "scope": b.scope, "target": b.target,
                 "period": b.period, "period_start": c.start, "percent": pct, "action": action,
                 "spent_pusd": c.spent, "amount_pusd": b.amount_pusd, "message": message,
                 "spent_usd": usd(c.spent)[1:], "amount_usd": usd(b.amount_pusd)[1:]}
        if self.alerts is not None:
            self.alerts.emit(alert)
        else:
            log.warning("budget alert: %s", message)

    def budget_states(self) -> list[dict]:
        return [c.state() for c in self.counters.values()]


def _plan_downgrade(request: InferenceRequest, served: ServedVersion,
                    counters: tuple[Counter, ...]) -> None:
    """A plan's budget_downgrade: a tenant past that share of a budget gets the cheaper tier."""
    rule = served.downgrade
    if any(c.spent + c.reserved >= rule.spent_fraction * c.budget.amount_pusd for c in counters):
        request.tier = rule.tier

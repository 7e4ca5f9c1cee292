"""Budget alerts: to the log, into the ledger's `alerts` table, and to a webhook.

`AlertSink.emit` only puts the alert on a queue (the request path never waits); one background
thread logs it, inserts it and POSTs it as JSON to the webhook, retrying with exponential
backoff. An alert that still cannot be delivered after the retries is logged and dropped from
the webhook (it stays in the table).
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from queue import Empty, SimpleQueue

import orjson
from sqlalchemy import Column, Engine, Float, Integer, String, Table, Text, select

from .ledger import PicoAmount, metadata

log = logging.getLogger("frugalserve.alerts")

alerts = Table(
    "alerts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False, index=True),
    Column("budget_id", Integer),
    Column("scope", String(16), nullable=False),
    Column("target", String(256), nullable=False),
    Column("period", String(16), nullable=False),
    Column("period_start", Float, nullable=False),
    Column("percent", Float, nullable=False),
    Column("action", String(16), nullable=False),
    Column("spent_pusd", PicoAmount, nullable=False),
    Column("amount_pusd", PicoAmount, nullable=False),
    Column("message", Text, nullable=False),
)

_COLUMNS = tuple(c.name for c in alerts.columns if c.name != "id")
_STOP = object()


class AlertSink:
    def __init__(self, engine: Engine | None = None, webhook_url: str | None = None, *,
                 retries: int = 5, backoff_s: float = 0.5, timeout_s: float = 5.0):
        self.engine = engine
        self.webhook_url = webhook_url
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._queue: SimpleQueue = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.delivered = 0  # webhook deliveries that succeeded
        self.failed = 0  # alerts the webhook never took

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._thread.start()

    def emit(self, alert: dict) -> None:
        """Never blocks: the alert is handled on the sink's thread."""
        self._queue.put(alert)

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued, giving up on webhook retries after `timeout_s`."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        self._stopping.set()  # any webhook still retrying stops at its next wait
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            try:
                alert = self._queue.get(timeout=1.0)
            except Empty:
                continue
            if alert is _STOP:
                return
            try:
                self._handle(alert)
            except Exception:  # noqa: BLE001 - the sink must outlive one bad alert
                log.exception("alert handling failed")

    def _handle(self, alert: dict) -> None:
        log.warning("budget alert: %s", alert["message"])
        if self.engine is not None:
            self._insert(alert)
        if self.webhook_url:
            self._post(alert)

    def _insert(self, alert: dict) -> None:
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    conn.execute(alerts.insert().values(**{k: alert[k] for k in _COLUMNS}))
                return
            except Exception as exc:  # noqa: BLE001 - a database hiccup: retry, then log
                if attempt == 2:
                    log.error("could not record alert in the ledger: %s", exc)
                else:
                    time.sleep(0.2 * (attempt + 1))

    def _post(self, alert: dict) -> None:
        body = orjson.dumps(alert)
        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            request = urllib.request.Request(
                self.webhook_url, data=body, method="POST",
                headers={"content-type": "application/json", "user-agent": "frugalserve"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    if 200 <= response.status < 300:
                        self.delivered += 1
                        return
                    reason = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                reason = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                reason = str(exc)
            if attempt == self.retries:
                break
            log.info("alert webhook attempt %d failed (%s); retrying in %.1fs", attempt, reason,
                     delay)
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, 30.0)
        self.failed += 1
        log.error("alert webhook %s did not take the alert: %s", self.webhook_url, reason)


def list_alerts(engine: Engine, limit: int = 100) -> list[dict]:
    """The newest `limit` alerts, as plain dicts (str keys: orjson refuses SQLAlchemy's)."""
    if limit < 1:  # SQLite reads LIMIT -1 as no limit; PostgreSQL refuses it
        raise ValueError(f"limit must be at least 1, got {limit}")
    with engine.connect() as conn:
        rows = conn.execute(select(alerts).order_by(alerts.c.id.desc()).limit(limit))
        return [{str(k): v for k, v in row._mapping.items()} for row in rows]
